"""state_dict round trips, LR schedulers, closures, and a model that actually learns."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sharded_shampoo import ShardedShampoo

OPTS = dict(
    lr=0.02,
    betas=(0.9, 0.99),
    momentum=0.5,
    weight_decay=0.01,
    max_preconditioner_dim=16,
    precondition_frequency=4,
    epsilon=1e-6,
)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 20),
        torch.nn.ReLU(), torch.nn.Linear(20, 3),
    )


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def train(model, opt, steps, start=0):
    losses = []
    for s in range(start, start + steps):
        x, y = batch(s)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_resume_from_state_dict_is_bitwise_identical():
    full_model = make_model()
    full_opt = ShardedShampoo(full_model.parameters(), **OPTS)
    full_losses = train(full_model, full_opt, 14)

    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    losses = train(model, opt, 6)
    saved_model = roundtrip(model.state_dict())
    saved_opt = roundtrip(opt.state_dict())
    del model, opt

    model = make_model(seed=123)  # different initial weights: everything must come from the save
    model.load_state_dict(saved_model)
    opt = ShardedShampoo(model.parameters(), **OPTS)
    opt.load_state_dict(saved_opt)
    losses += train(model, opt, 8, start=6)

    assert losses == full_losses
    for p, q in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["step"] == 14


def test_state_dict_names_blocks_of_full_parameters():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    train(model, opt, 1)
    sd = opt.state_dict()
    # Linear(144, 20): weight (20, 144) cut into rows 16 + 4 and columns 9 x 16: 18 blocks.
    linear_weight = sd["state"][2]
    blocks = {k.split(".")[1] for k in linear_weight if k.startswith("blocks.")}
    assert sorted(blocks, key=int) == [str(i) for i in range(18)]
    # Every parameter carries its blocking record and step, whoever owns its blocks.
    assert set(linear_weight) - {k for k in linear_weight if k.startswith("blocks.")} == {
        "blocking", "step"
    }
    assert int(linear_weight["step"]) == 1
    assert linear_weight["blocks.0.factor_0"].shape == (16, 16)
    assert linear_weight["blocks.17.factor_0"].shape == (4, 4)
    assert linear_weight["blocks.17.factor_1"].shape == (16, 16)
    assert sd["param_groups"][0]["step"] == 1


def test_loading_a_mismatched_state_dict_raises_and_changes_nothing():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    train(model, opt, 5)
    before = copy.deepcopy(opt.state_dict())

    other = ShardedShampoo(make_model().parameters(), **{**OPTS, "max_preconditioner_dim": 8})
    with pytest.raises(
        ValueError,
        match=r"state of param_groups\[0\]\['params'\]\[0\] .* max_preconditioner_dim: 8 saved, 16 here",
    ):
        opt.load_state_dict(other.state_dict())
    other = ShardedShampoo(make_model().parameters(), **{**OPTS, "grafting": "sgd"})
    with pytest.raises(ValueError, match="grafting: sgd saved, adam here"):
        opt.load_state_dict(other.state_dict())
    smaller = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3))
    other = ShardedShampoo(smaller.parameters(), **OPTS)
    with pytest.raises(ValueError, match="2 parameters, this optimizer has 6"):
        opt.load_state_dict(other.state_dict())

    bad = copy.deepcopy(opt.state_dict())
    bad["state"][2]["blocks.2.factor_0"] = torch.zeros(8, 8)
    bad["state"][5]["blocks.0.factor_0"].fill_(7.0)  # would be copied first if not validated first
    with pytest.raises(ValueError, match=r"blocks.2.factor_0.*shape \(8, 8\), expected \(16, 16\)"):
        opt.load_state_dict(bad)

    bad = copy.deepcopy(opt.state_dict())
    del bad["state"][0]["blocks.0.root_0"]
    with pytest.raises(ValueError, match=r"params'\]\[0\].*missing \['blocks.0.root_0'\]"):
        opt.load_state_dict(bad)

    # Keys of blocks the parameter does not have, or of another block's shape, are refused
    # (a full state dict may carry blocks other ranks own, but only real ones).
    for key, value in (("blocks.99.factor_0", torch.zeros(16, 16)),
                       ("blocks.0.factor_0x", torch.zeros(16, 16)),
                       ("extra", torch.zeros(1))):
        bad = copy.deepcopy(opt.state_dict())
        bad["state"][0][key] = value
        with pytest.raises(ValueError, match=rf"unexpected \['{key}'\]"):
            opt.load_state_dict(bad)

    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be"):
        opt.load_state_dict(bad)

    after = opt.state_dict()
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][i][k]), (i, k)
    assert after["param_groups"][0]["lr"] == OPTS["lr"]


def test_lr_scheduler_drives_the_step_size():
    # With grafting "sgd", beta1 = 0 and before preconditioning starts, the step is -lr * grad.
    p = torch.zeros(4, requires_grad=True)
    opt = ShardedShampoo([p], lr=1.0, betas=(0.0, 1.0), grafting="sgd", start_preconditioning_step=100)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    moves = []
    for _ in range(6):
        before = p.detach().clone()
        p.grad = torch.ones(4)
        opt.step()
        sched.step()
        moves.append((before - p.detach())[0].item())
    assert moves == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_one_cycle_scheduler_cycles_beta1():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    beta1s = []
    for s in range(10):
        train(model, opt, 1, start=s)
        sched.step()
        beta1s.append(opt.param_groups[0]["betas"][0])
    assert len(set(beta1s)) > 3


def test_closure_is_evaluated_and_its_loss_returned():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_named_parameters_name_blocks_in_warnings():
    model = torch.nn.Linear(4, 3)
    opt = ShardedShampoo(model.named_parameters(), lr=0.1)
    model.weight.grad = torch.full((3, 4), float("nan"))
    model.bias.grad = torch.ones(3)
    with pytest.warns(UserWarning, match=r"of parameter weight \(3, 4\)"):
        opt.step()


def test_small_model_learns():
    """A teacher-student regression: the loss falls by more than 20x in 300 steps."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(512, 8)
    with torch.no_grad():
        y = teacher(x)
    student = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = ShardedShampoo(student.parameters(), lr=0.01, precondition_frequency=10, epsilon=1e-8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_parameter_dtypes(dtype):
    torch.manual_seed(0)
    p = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    opt = ShardedShampoo([p], lr=0.1, precondition_frequency=2)
    for _ in range(4):
        p.grad = torch.randn(6, 5).to(dtype)
        opt.step()
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert opt.state[p]["blocks.0.filtered_grad"].dtype == torch.promote_types(dtype, torch.float32)


def test_channels_last_parameter_is_updated_like_a_contiguous_one():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2, 2)
    a = w.clone().requires_grad_()
    b = w.clone().to(memory_format=torch.channels_last).requires_grad_()
    opt_a = ShardedShampoo([a], lr=0.1, max_preconditioner_dim=4, precondition_frequency=2)
    opt_b = ShardedShampoo([b], lr=0.1, max_preconditioner_dim=4, precondition_frequency=2)
    for s in range(4):
        g = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(s))
        a.grad = g.clone()
        b.grad = g.clone().to(memory_format=torch.channels_last)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_root_inverse_state_refused_by_an_eigenvalue_corrected_optimizer():
    model = make_model()
    shampoo = ShardedShampoo(model.parameters(), **OPTS)
    corrected = ShardedShampoo(model.parameters(), **OPTS, preconditioner="eigenvalue_corrected")
    before = copy.deepcopy(corrected.state_dict())
    with pytest.raises(ValueError, match="preconditioner: shampoo saved, eigenvalue_corrected here"):
        corrected.load_state_dict(shampoo.state_dict())
    after = corrected.state_dict()
    assert all(torch.equal(v, after["state"][i][k])
               for i, st in before["state"].items() for k, v in st.items())


def test_full_state_dict_with_cpu_offload_in_one_process():
    """torch's full state dict, asked for with cpu_offload and no process group: every block,
    on the CPU (it used to ask the missing process group for its rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = torch.nn.Linear(12, 10)
    opt = ShardedShampoo(model.parameters(), max_preconditioner_dim=4, precondition_frequency=1)
    model(torch.randn(3, 12)).sum().backward()
    opt.step()
    sd = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    blocks = {k.split(".")[1] for k in sd["state"]["weight"] if k.startswith("blocks.")}
    assert blocks == {str(b) for b in range(9)}  # 12 x 10 in blocks of 4: 3 x 3
    assert all(t.device.type == "cpu" for t in sd["state"]["weight"].values())


def _twins(seed=0):
    """Two same-shaped layers, so that only their names tell them apart."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))


def _twin_steps(model, opt, steps, start=0):
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(s)
        opt.zero_grad()
        model(torch.randn(8, 6, generator=gen)).square().mean().backward()
        opt.step()


def test_saved_param_names_decide_where_state_goes():
    """A dict saved with layers named 0.*, 1.* loaded into an optimizer listing them 1.*, 0.*:
    each layer gets its own state (before: position decided, and layer 0's factors landed in
    layer 1). Names that differ are refused."""
    model = _twins()
    opt = ShardedShampoo(list(model.named_parameters()), **OPTS)
    _twin_steps(model, opt, 5)
    saved = roundtrip(opt.state_dict())
    named = dict(model.named_parameters())
    order = ["1.weight", "1.bias", "0.weight", "0.bias"]
    other = ShardedShampoo([(n, named[n]) for n in order], **OPTS)
    other.load_state_dict(saved)
    for n in order:
        mine, theirs = other.state[named[n]], opt.state[named[n]]
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), n
    renamed = ShardedShampoo([(f"x{n}", named[n]) for n in named], **OPTS)
    with pytest.raises(ValueError, match=r"names other parameters .*missing \['x0.bias'"):
        renamed.load_state_dict(saved)


def test_staggered_phases_are_checked_on_load():
    """Phases follow the order parameters are listed in: a staggered state loaded into an
    optimizer listing them in another order is refused (before: it resumed on another
    trajectory, 2.3e-2 off after 14 steps), the same order loads."""
    model = _twins()
    options = {**OPTS, "stagger_roots": True, "max_preconditioner_dim": 3}
    opt = ShardedShampoo(list(model.named_parameters()), **options)
    _twin_steps(model, opt, 5)
    saved = roundtrip(opt.state_dict())
    named = dict(model.named_parameters())
    reordered = ShardedShampoo([(n, named[n]) for n in reversed(named)], **options)
    with pytest.raises(ValueError, match="stagger_roots phases differ"):
        reordered.load_state_dict(saved)
    same = ShardedShampoo(list(model.named_parameters()), **options)
    same.load_state_dict(saved)


def test_staggered_phases_are_checked_on_a_checkpoint_load(tmp_path):
    """The same through DCP (state keyed by parameter names): refused before anything is read,
    naming the parameter."""
    from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint

    model = _twins()
    options = {**OPTS, "stagger_roots": True, "max_preconditioner_dim": 3}
    opt = ShardedShampoo(list(model.named_parameters()), **options)
    _twin_steps(model, opt, 5)
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    named = dict(model.named_parameters())
    reordered = ShardedShampoo([(n, named[n]) for n in reversed(named)], **options)
    with pytest.raises(ValueError, match=r"does not fit parameter '\d\.\w+': its blocks' stagger_roots phases"):
        load_checkpoint(str(tmp_path / "ckpt"), model, reordered)
    load_checkpoint(str(tmp_path / "ckpt"), model, ShardedShampoo(list(model.named_parameters()), **options))
