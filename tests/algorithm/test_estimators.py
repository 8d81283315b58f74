"""The estimators against what they are known to equal: Muon's polar factor (Shampoo with factors
of the momentum), torch.optim.Muon (the spectral preconditioner), torch.optim.AdamW (a diagonal
group); and the model splitter."""

from __future__ import annotations

import pytest
import torch

from sharded_shampoo import ShardedShampoo, hidden_matrix_groups

SHAPES = [(6, 4), (5, 9), (7, 7)]


def _params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _polar(m):
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def test_shampoo_of_the_momentum_is_its_polar_factor():
    """betas[1] = 0, factors of the first moment, a refresh every step, exponent 1/4,
    pseudo-inverse roots, no grafting: each update is -lr U V^T of the (bias-corrected)
    momentum, from an SVD, to 1e-9 (float64), across steps."""
    params = _params()
    lr, beta1 = 0.1, 0.9
    opt = ShardedShampoo(
        params,
        lr=lr,
        betas=(beta1, 0.0),
        factor_source="first_moment",
        precondition_frequency=1,
        start_preconditioning_step=1,
        inverse_exponent_override={2: 0.25},
        epsilon=0.0,
        pseudo_inverse=True,
        grafting=None,
        factor_dtype=torch.float64,
        merge_dims=False,  # (6, 4) would be a vector of 24
    )
    moments = [torch.zeros_like(p) for p in params]
    for step in range(1, 9):
        before = [p.detach().clone() for p in params]
        for p, g, m in zip(params, _grads(params, step), moments, strict=True):
            p.grad = g
            m.lerp_(g, 1 - beta1)
        opt.step()
        for p, b, m in zip(params, before, moments, strict=True):
            expected = b - lr * _polar(m / (1 - beta1**step))
            err = (p.detach() - expected).abs().max().item()
            assert err < 1e-9, f"step {step}, {tuple(p.shape)}: {err:.2e}"


def _muon_float64(params, grads_per_step, lr, momentum, weight_decay, adjust):
    """torch.optim.Muon's algorithm, with its Newton-Schulz iteration in float64 instead of
    bfloat16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, buf in zip(params, grads, bufs, strict=True):
            buf.lerp_(g, 1 - momentum)
            x = g.lerp(buf, momentum)
            tall = x.shape[0] > x.shape[1]
            x = x.T if tall else x
            x = x / x.norm().clamp_min(1e-7)
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if tall else x
            rows, cols = p.shape
            ratio = (
                max(1, rows / cols) ** 0.5 if adjust == "original" else 0.2 * max(p.shape) ** 0.5
            )
            p.mul_(1 - lr * weight_decay).add_(x, alpha=-lr * ratio)
    return params


@pytest.mark.parametrize("adjust,grafting", [("original", "shape"), ("match_rms_adamw", "rms")])
def test_spectral_preconditioner_is_torch_muon(adjust, grafting):
    """The spectral preconditioner with Muon's settings against torch.optim.Muon: equal to
    Muon's algorithm in float64 (1e-10), and as far from torch.optim.Muon as torch's own
    bfloat16 iteration is from that algorithm."""
    steps, lr, momentum, wd = 6, 0.02, 0.95, 0.1
    grads = [_grads(_params(), s) for s in range(steps)]

    def run(make, dtype):
        params = [p.detach().to(dtype).requires_grad_() for p in _params()]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.to(dtype)
            opt.step()
        return [p.detach().double() for p in params]

    def ours(params):
        return ShardedShampoo(
            params,
            lr=lr,
            betas=(momentum, 1.0),
            use_bias_correction=False,
            first_moment_nesterov=True,
            weight_decay=wd,
            preconditioner="spectral",
            grafting=grafting,
        )

    def muon(params):
        return torch.optim.Muon(
            params, lr=lr, momentum=momentum, weight_decay=wd, adjust_lr_fn=adjust
        )

    exact = _muon_float64(_params(), grads, lr, momentum, wd, adjust)
    ours64 = run(ours, torch.float64)
    torch_muon = run(muon, torch.float32)
    ours32 = run(ours, torch.float32)

    def dist(xs, ys):
        return max((x - y).abs().max().item() for x, y in zip(xs, ys, strict=True))

    assert dist(ours64, exact) < 1e-10
    torch_rounding = dist(torch_muon, exact)  # bfloat16: about 1e-3 of the updates
    assert dist(ours32, exact) < 1e-2 * torch_rounding
    assert dist(ours32, torch_muon) < 1.01 * torch_rounding


def test_diagonal_group_is_adamw():
    """A diagonal group (the default: Adam) == torch.optim.AdamW in float64, with its own lr
    and weight decay, next to a Shampoo group."""
    params = _params()
    shampoo_params, adam_params = params[:1], params[1:]
    copies = [p.detach().clone().requires_grad_() for p in adam_params]
    opt = ShardedShampoo(
        [
            {"params": shampoo_params, "lr": 0.01},
            {
                "params": adam_params,
                "preconditioner": "diagonal",
                "lr": 0.003,
                "weight_decay": 0.1,
                "betas": (0.8, 1.0),
                "grafting_beta2": 0.95,
                "grafting_epsilon": 1e-6,
            },
        ],
        factor_dtype=torch.float64,
    )
    adamw = torch.optim.AdamW(copies, lr=0.003, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for step in range(10):
        for p, c, g in zip(params, [None, *copies], _grads(params, step), strict=True):
            p.grad = g
            if c is not None:
                c.grad = g.clone()
        opt.step()
        adamw.step()
    for p, c in zip(adam_params, copies, strict=True):
        assert (p.detach() - c.detach()).abs().max().item() < 1e-12


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        self.conv = torch.nn.Conv1d(8, 8, 3)
        self.head = torch.nn.Linear(8, 10, bias=False)


def test_hidden_matrix_groups_split_as_muon_documents():
    """Hidden matrices (2-D and up, not embeddings, not the head) in the first group; the
    embedding, the head (the last Linear by default), biases and norms in the diagonal one,
    each group with its own options; every parameter exactly once."""
    model = _Model()
    hidden, rest = hidden_matrix_groups(
        model, hidden={"lr": 0.02}, other={"lr": 0.003, "weight_decay": 0.0}
    )
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden["params"]) == ["body.0.weight", "conv.weight"]
    assert sorted(names[id(p)] for p in rest["params"]) == [
        "body.0.bias",
        "body.1.bias",
        "body.1.weight",
        "conv.bias",
        "embed.weight",
        "head.weight",
    ]
    assert hidden["lr"] == 0.02 and "preconditioner" not in hidden
    assert rest["preconditioner"] == "diagonal" and rest["lr"] == 0.003
    hidden, rest = hidden_matrix_groups(model, head=("body.0",))
    assert "head.weight" in {names[id(p)] for p in hidden["params"]}
    assert "body.0.weight" in {names[id(p)] for p in rest["params"]}
    with pytest.raises(ValueError, match="head: model has no module 'nope'"):
        hidden_matrix_groups(model, head=("nope",))
    hidden, rest = hidden_matrix_groups(model, exclude=["conv.weight"])
    assert [names[id(p)] for p in hidden["params"]] == ["body.0.weight"]
    with pytest.raises(ValueError, match="exclude: model has no parameter 'conv'"):
        hidden_matrix_groups(model, exclude=["conv"])
    ShardedShampoo([hidden, rest])  # the groups are valid param groups
