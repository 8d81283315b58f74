"""What a user hits inside a training framework: frozen and unfrozen parameters, a compiled
model, bf16 autocast, gradient accumulation, ``zero_grad(set_to_none=False)``. Each against a
plain run of the same optimizer that it must equal (float64), or the behaviour it must have."""

from __future__ import annotations

import pytest
import scenarios  # the DDP tests' float64 model and batches
import torch

from sharded_shampoo import ShardedShampoo

OPTS = dict(
    lr=0.02,
    betas=(0.9, 0.99),
    momentum=0.5,
    weight_decay=0.01,
    max_preconditioner_dim=8,
    precondition_frequency=3,
    epsilon=1e-6,
    factor_dtype=torch.float64,
)


def model(seed=0):
    return scenarios.make_mlp(seed)


def batch(step):
    return scenarios.global_batch(step, 16)


def loss_of(net, step, reduction="mean"):
    x, y = batch(step)
    return torch.nn.functional.cross_entropy(net(x), y, reduction=reduction)


def train(net, opt, steps, set_to_none=True):
    for s in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss_of(net, s).backward()
        opt.step()


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_frozen_parameter_stays_then_trains_once_unfrozen():
    """Frozen (no gradient): its blocks are skipped, it does not move, and the others follow
    exactly the run without it; unfrozen, it trains."""
    net, ref = model(), model()
    frozen = net[2].weight
    frozen.requires_grad_(False)
    opt = ShardedShampoo(net.parameters(), **OPTS)
    ref_opt = ShardedShampoo([p for n, p in ref.named_parameters() if n != "2.weight"], **OPTS)
    ref[2].weight.requires_grad_(False)
    before = frozen.detach().clone()
    train(net, opt, 5)
    train(ref, ref_opt, 5)
    assert torch.equal(frozen, before)
    assert all(torch.equal(a, b) for a, b in zip(params(net), params(ref), strict=True))
    frozen.requires_grad_(True)
    train(net, opt, 4)
    assert not torch.equal(frozen, before) and torch.isfinite(frozen).all()


def test_a_compiled_step_is_refused_before_anything_changes():
    """``torch.compile(opt.step)`` and a compiled function that calls ``opt.step()`` raise at
    once, naming the way out, with parameters and state untouched; the eager step then runs
    as if nothing happened."""
    net, ref = model(), model()
    opt = ShardedShampoo(net.parameters(), **OPTS)
    ref_opt = ShardedShampoo(ref.parameters(), **OPTS)
    train(net, opt, 4)
    train(ref, ref_opt, 4)
    state = [t.clone() for s in opt.state_dict()["state"].values() for t in s.values()]

    def train_step(step):
        loss_of(net, step).backward()
        opt.step()

    for compiled in (torch.compile(opt.step, backend="eager"), torch.compile(train_step)):
        opt.zero_grad()
        loss_of(net, 4).backward()
        before = params(net)
        with pytest.raises(RuntimeError, match=r"cannot run under torch.compile.*outside"):
            compiled() if compiled.__name__ == "step" else compiled(4)
        assert all(torch.equal(a, b) for a, b in zip(params(net), before, strict=True))
        after = [t for s in opt.state_dict()["state"].values() for t in s.values()]
        assert all(torch.equal(a, b) for a, b in zip(after, state, strict=True))
    opt.zero_grad()
    train(net, opt, 3)  # steps 0-2 of the batches again, after the 4: as the reference does
    train(ref, ref_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(params(net), params(ref), strict=True))


def test_compiled_model_trains_like_the_eager_one():
    """``torch.compile(model)`` wraps the same parameters (names gain ``_orig_mod.``)."""
    net, eager = model(), model()
    compiled = torch.compile(net, backend="eager")
    opt = ShardedShampoo(compiled.named_parameters(), **OPTS)
    assert opt.param_groups[0]["param_names"][0] == "_orig_mod.0.weight"
    train(compiled, opt, 5)
    train(eager, ShardedShampoo(eager.named_parameters(), **OPTS), 5)
    assert all(
        torch.allclose(a, b, rtol=0, atol=1e-12)
        for a, b in zip(params(net), params(eager), strict=True)
    )


def test_bf16_autocast_trains_with_float32_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = ShardedShampoo(net.parameters(), lr=0.05, precondition_frequency=3)
    losses = []
    for s in range(30):
        x, y = batch(s % 4)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x.float()), y)
        assert loss.dtype == torch.float32 and net(x.float()).dtype == torch.float32
        loss.backward()
        assert net[0].weight.grad.dtype == torch.float32
        opt.step()
        losses.append(loss.item())
    state = opt.state[net[0].weight]
    assert state["blocks.0.factor_0"].dtype == torch.float32  # statistics not in bf16
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses


def test_gradient_accumulation_equals_one_step_on_the_summed_gradient():
    """Two micro-batches accumulated into ``.grad`` before each step: the same as one
    backward of the summed loss over both."""
    net, ref = model(), model()
    opt = ShardedShampoo(net.parameters(), **OPTS)
    ref_opt = ShardedShampoo(ref.parameters(), **OPTS)
    for s in range(6):
        opt.zero_grad()
        for micro in (2 * s, 2 * s + 1):
            loss_of(net, micro, "sum").backward()
        opt.step()
        ref_opt.zero_grad()
        (loss_of(ref, 2 * s, "sum") + loss_of(ref, 2 * s + 1, "sum")).backward()
        ref_opt.step()
    err = max((a - b).abs().max().item() for a, b in zip(params(net), params(ref), strict=True))
    assert err < 1e-12, err


def test_zero_grad_without_none_equals_set_to_none():
    a, b = model(), model()
    train(a, ShardedShampoo(a.parameters(), **OPTS), 5, set_to_none=False)
    train(b, ShardedShampoo(b.parameters(), **OPTS), 5, set_to_none=True)
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b), strict=True))
