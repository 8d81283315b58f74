"""What ``state_dict()`` holds and what ``load_state_dict()`` takes, in one process: round
trips, block names, refusals that change nothing, full dicts, names and staggered phases."""

from __future__ import annotations

import copy

import pytest
import torch
from convnet import OPTS, make_model, roundtrip, train

from sharded_shampoo import ShardedShampoo


@pytest.mark.parametrize("extra", [{}, {"eigenbasis": "qr"}], ids=["eigh", "qr_roots"])
def test_resume_from_state_dict_is_bitwise_identical(extra):
    """With roots from warm-started eigenbases too: the bases are state."""
    full_model = make_model()
    full_opt = ShardedShampoo(full_model.parameters(), **OPTS, **extra)
    full_losses = train(full_model, full_opt, 14)

    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS, **extra)
    losses = train(model, opt, 6)
    saved_model = roundtrip(model.state_dict())
    saved_opt = roundtrip(opt.state_dict())
    del model, opt

    model = make_model(seed=123)  # different initial weights: everything must come from the save
    model.load_state_dict(saved_model)
    opt = ShardedShampoo(model.parameters(), **OPTS, **extra)
    opt.load_state_dict(saved_opt)
    losses += train(model, opt, 8, start=6)

    assert losses == full_losses
    for p, q in zip(model.parameters(), full_model.parameters(), strict=True):
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
        "blocking",
        "step",
    }
    assert int(linear_weight["step"]) == 1
    # Factors and roots as upper triangles (symmetric_packing): 16 x 17 / 2 and 4 x 5 / 2.
    assert linear_weight["blocks.0.factor_0"].shape == (136,)
    assert linear_weight["blocks.17.factor_0"].shape == (10,)
    assert linear_weight["blocks.17.root_1"].shape == (136,)
    assert sd["param_groups"][0]["step"] == 1


def test_loading_a_mismatched_state_dict_raises_and_changes_nothing():
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS)
    train(model, opt, 5)
    before = copy.deepcopy(opt.state_dict())

    other = ShardedShampoo(make_model().parameters(), **{**OPTS, "max_preconditioner_dim": 8})
    with pytest.raises(
        ValueError,
        match=(
            r"state of param_groups\[0\]\['params'\]\[0\] .* "
            r"max_preconditioner_dim: 8 saved, 16 here"
        ),
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
    with pytest.raises(ValueError, match=r"blocks.2.factor_0.*shape \(8, 8\), expected \(136,\)"):
        opt.load_state_dict(bad)

    bad = copy.deepcopy(opt.state_dict())
    del bad["state"][0]["blocks.0.root_0"]
    with pytest.raises(ValueError, match=r"params'\]\[0\].*missing \['blocks.0.root_0'\]"):
        opt.load_state_dict(bad)

    # Keys of blocks the parameter does not have, or of another block's shape, are refused
    # (a full state dict may carry blocks other ranks own, but only real ones).
    for key, value in (
        ("blocks.99.factor_0", torch.zeros(136)),
        ("blocks.0.factor_0x", torch.zeros(136)),
        ("extra", torch.zeros(1)),
    ):
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


def test_state_of_other_preconditioned_dims_is_refused_naming_the_option():
    """max_factor_ratio decides which dims have factors: another value is refused by the
    record, before anything is loaded."""
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS, max_factor_ratio=4)
    train(model, opt, 2)
    other = ShardedShampoo(make_model().parameters(), **OPTS)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="max_factor_ratio: 4 saved, None here"):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    for p in before["state"]:
        for key, value in before["state"][p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][p][key]))


def test_root_inverse_state_refused_by_an_eigenvalue_corrected_optimizer():
    model = make_model()
    shampoo = ShardedShampoo(model.parameters(), **OPTS)
    corrected = ShardedShampoo(model.parameters(), **OPTS, preconditioner="eigenvalue_corrected")
    before = copy.deepcopy(corrected.state_dict())
    with pytest.raises(
        ValueError, match="preconditioner: shampoo saved, eigenvalue_corrected here"
    ):
        corrected.load_state_dict(shampoo.state_dict())
    after = corrected.state_dict()
    assert all(
        torch.equal(v, after["state"][i][k])
        for i, st in before["state"].items()
        for k, v in st.items()
    )


def test_roots_of_another_eigenbasis_are_refused_naming_it():
    """Root-inverse Shampoo keeps its eigenbases with eigenbasis="qr" only: a state dict of the
    other method is refused by the record, before anything is loaded."""
    model = make_model()
    qr = ShardedShampoo(model.parameters(), **OPTS, eigenbasis="qr")
    train(model, qr, 2)
    eigh = ShardedShampoo(make_model().parameters(), **OPTS)
    with pytest.raises(ValueError, match="eigenbasis: qr saved, eigh here"):
        eigh.load_state_dict(qr.state_dict())
    with pytest.raises(ValueError, match="eigenbasis: eigh saved, qr here"):
        qr.load_state_dict(eigh.state_dict())


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
    with pytest.raises(
        ValueError, match=r"does not fit parameter '\d\.\w+': its blocks' stagger_roots phases"
    ):
        load_checkpoint(str(tmp_path / "ckpt"), model, reordered)
    load_checkpoint(
        str(tmp_path / "ckpt"), model, ShardedShampoo(list(model.named_parameters()), **options)
    )
