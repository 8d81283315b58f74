"""How state is stored: symmetric packing is lossless, and state saved under one storage setting
loads under another (plain state dicts and DCP checkpoints), converted exactly."""

from __future__ import annotations

import pytest
import torch
from convnet import OPTS, batch, make_model, roundtrip, train

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint


def _unpacked(x: torch.Tensor) -> torch.Tensor:
    """A packed upper triangle as its symmetric matrix, written out by loops (the test's own
    reference for the layout: rows of the upper triangle, one after the other)."""
    p = x.numel()
    m = int(((8 * p + 1) ** 0.5 - 1) / 2)
    out = torch.empty(m, m, dtype=x.dtype)
    k = 0
    for i in range(m):
        for j in range(i, m):
            out[i, j] = out[j, i] = x[k]
            k += 1
    return out


def _upper(x: torch.Tensor) -> torch.Tensor:
    """A matrix's upper triangle, row by row."""
    return torch.stack([x[i, j] for i in range(x.shape[0]) for j in range(i, x.shape[0])])


def _symmetric_keys(state: dict) -> list[str]:
    return [
        k
        for k in state
        if k.rsplit(".", 1)[-1].split("_")[0] in ("factor", "root")
        and k.rsplit("_", 1)[-1].isdigit()
    ]


def test_packing_keeps_the_math_in_float64():
    """The same training with factors and roots packed or full: parameters agree to float64
    rounding, and each packed factor is the full one's upper triangle."""
    runs = {}
    for packing in (True, False):
        model = make_model().double()
        opt = ShardedShampoo(
            model.parameters(), **OPTS, symmetric_packing=packing, factor_dtype=torch.float64
        )
        for step in range(10):
            x, y = batch(step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.double()), y).backward()
            opt.step()
        runs[packing] = (model, opt)
    (packed, opt_p), (full, opt_f) = runs[True], runs[False]
    for p, q in zip(packed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    for p, q in zip(packed.parameters(), full.parameters(), strict=True):
        for key in _symmetric_keys(opt_p.state[p]):
            x, y = opt_p.state[p][key], opt_f.state[q][key]
            assert x.dim() == 1 and y.dim() == 2, key
            torch.testing.assert_close(_unpacked(x), y, rtol=1e-10, atol=1e-12)


def _trained(packing: bool, steps: int = 6):
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS, symmetric_packing=packing)
    train(model, opt, steps)
    return model, opt


def _fresh(model_state, packing: bool):
    model = make_model(seed=7)
    model.load_state_dict(model_state)
    return model, ShardedShampoo(model.parameters(), **OPTS, symmetric_packing=packing)


def _assert_same_state(a: ShardedShampoo, b: ShardedShampoo, convert=None) -> None:
    for p, q in zip(a.state, b.state, strict=True):
        assert a.state[p].keys() == b.state[q].keys()
        for key, x in a.state[p].items():
            y = b.state[q][key]
            if convert is not None and key in _symmetric_keys(a.state[p]):
                x = convert(x)
            assert torch.equal(x, y), key


def test_a_state_dict_loads_under_the_other_packing_exactly():
    """Packed -> full -> packed: the full optimizer holds the packed one's matrices written out,
    the packed one at the end holds bitwise what the first held, and both resume alike. Each
    keeps its own symmetric_packing."""
    model, opt = _trained(True)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    full_model, full = _fresh(saved_model, False)
    full.load_state_dict(roundtrip(opt.state_dict()))
    assert full.param_groups[0]["symmetric_packing"] is False
    _assert_same_state(opt, full, convert=_unpacked)
    again_model, again = _fresh(saved_model, True)
    again.load_state_dict(roundtrip(full.state_dict()))
    assert again.param_groups[0]["symmetric_packing"] is True
    _assert_same_state(opt, again)
    assert train(model, opt, 4, start=6) == train(again_model, again, 4, start=6)
    for p, q in zip(model.parameters(), again_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("saved_packing", [True, False])
def test_a_checkpoint_loads_under_the_other_packing_exactly(tmp_path, saved_packing):
    """The same through DCP: the saved layout is read and converted on load. Full matrices
    load as their upper triangles (a computed root is symmetric only up to rounding)."""
    model, opt = _trained(saved_packing)
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    other_model, other = _fresh(model.state_dict(), not saved_packing)
    load_checkpoint(str(tmp_path / "ckpt"), other_model, other)
    if saved_packing:
        _assert_same_state(opt, other, convert=_unpacked)
    else:
        _assert_same_state(opt, other, convert=_upper)
    assert other.param_groups[0]["step"] == 6


def test_packing_halves_the_symmetric_state():
    """Factors and roots take m (m + 1) / 2 entries per dim instead of m^2."""
    _, packed = _trained(True, steps=1)
    _, full = _trained(False, steps=1)
    sizes = {}
    for name, opt in (("packed", packed), ("full", full)):
        sizes[name] = sum(
            t.numel() for s in opt.state.values() for k, t in s.items() if k in _symmetric_keys(s)
        )
    expected_full = expected_packed = 0
    for s in full.state.values():
        for key in _symmetric_keys(s):
            m = s[key].shape[0]
            expected_full += m * m
            expected_packed += m * (m + 1) // 2
    assert sizes == {"packed": expected_packed, "full": expected_full}


def _steps_with_fixed_gradients(steps: int, **options):
    """A (12, 8) weight and an (8,) bias stepped with gradients that do not depend on the
    parameters, so that factors (and roots) of runs with different storage are the same. Roots
    from step 12, when every factor has full rank: where epsilon fills a factor's null space
    instead, a root is about epsilon^-e I plus a small part that bfloat16 rounds away (a
    240-element bias after 3 steps: the direction 50% off)."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.zeros(12, 8, requires_grad=True), torch.zeros(8, requires_grad=True)]
    opt = ShardedShampoo(
        params, lr=0.01, precondition_frequency=4, start_preconditioning_step=12,
        merge_dims=False, epsilon=1e-6, **options,
    )  # fmt: skip
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def test_bfloat16_roots_are_the_float32_roots_rounded():
    """root_dtype=bfloat16 keeps roots computed in float32, rounded to bfloat16 (packed or not),
    and applies them in float32: parameters stay within bfloat16's rounding of the float32
    run."""
    for packing in (True, False):
        full_params, full = _steps_with_fixed_gradients(20, symmetric_packing=packing)
        bf_params, bf = _steps_with_fixed_gradients(
            20, symmetric_packing=packing, root_dtype=torch.bfloat16
        )
        for p, q in zip(full_params, bf_params, strict=True):
            for key, root in full.state[p].items():
                if "root_" in key and key[-1].isdigit():
                    stored = bf.state[q][key]
                    assert stored.dtype == torch.bfloat16, key
                    assert torch.equal(stored, root.to(torch.bfloat16)), key
                    assert torch.equal(bf.state[q][key.replace("root", "factor")],
                                       full.state[p][key.replace("root", "factor")])  # fmt: skip
            assert (q - p).norm() <= 5e-3 * p.norm()  # 9e-4 measured
        assert bf.param_groups[0]["root_dtype"] == "bfloat16"
        kinds = bf.memory_report().state
        assert kinds["roots"] * 2 == full.memory_report().state["roots"]


def test_a_state_dict_loads_under_another_root_dtype():
    """Roots saved in float32 load into a bfloat16-roots optimizer (rounded) and back (widened);
    each optimizer keeps its own root_dtype."""
    params, opt = _steps_with_fixed_gradients(13)
    _, bf = _steps_with_fixed_gradients(0, root_dtype="bfloat16")
    bf.load_state_dict(roundtrip(opt.state_dict()))
    assert bf.param_groups[0]["root_dtype"] == "bfloat16"
    for p, q in zip(opt.state, bf.state, strict=True):
        assert torch.equal(
            bf.state[q]["blocks.0.root_0"], opt.state[p]["blocks.0.root_0"].bfloat16()
        )
    _, back = _steps_with_fixed_gradients(0)
    back.load_state_dict(roundtrip(bf.state_dict()))
    assert back.state[next(iter(back.state))]["blocks.0.root_0"].dtype == torch.float32


def test_bfloat16_moving_averages_train_resume_and_convert():
    """grafting_dtype and first_moment_dtype: bfloat16 state, half the bytes, losses within
    1e-2 of the float32 run's, a resume from a state dict continues bitwise, and a float32
    state loads (rounded to nearest)."""
    narrow = {"grafting_dtype": torch.bfloat16, "first_moment_dtype": "bfloat16"}
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **OPTS, **narrow)
    losses = train(model, opt, 12)
    reference_model = make_model()
    reference = train(reference_model, ShardedShampoo(reference_model.parameters(), **OPTS), 12)
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 1e-2
    assert losses != reference  # the storage is narrower: something differs
    state = opt.state[next(model.parameters())]
    assert (
        state["blocks.0.graft_v"].dtype == state["blocks.0.filtered_grad"].dtype == torch.bfloat16
    )
    _, wide = _trained(True, steps=1)
    kinds, wide_kinds = opt.memory_report().state, wide.memory_report().state
    assert 2 * kinds["grafting"] == wide_kinds["grafting"]
    assert 2 * kinds["first moment"] == wide_kinds["first moment"]

    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = roundtrip(opt.state_dict())
    after = train(model, opt, 4, start=12)
    again_model = make_model(seed=5)
    again_model.load_state_dict(saved_model)
    again = ShardedShampoo(again_model.parameters(), **OPTS, **narrow)
    again.load_state_dict(saved)
    assert train(again_model, again, 4, start=12) == after

    wide_model, wide = _trained(True, steps=3)
    into = ShardedShampoo(make_model().parameters(), **OPTS, **narrow)
    into.load_state_dict(roundtrip(wide.state_dict()))
    for p, q in zip(wide.state, into.state, strict=True):
        for key in ("blocks.0.graft_v", "blocks.0.filtered_grad"):
            assert torch.equal(into.state[q][key], wide.state[p][key].bfloat16())


def test_int8_roots_stay_near_the_float32_run_and_resume_bitwise():
    """root_dtype="int8": codes and scales (1.06 bytes per entry instead of 4), parameters
    within 1% of the float32 run's, eigenvalue-corrected too; a resume is bitwise; a float32
    state is refused naming root_dtype."""
    for extra in ({}, {"preconditioner": "eigenvalue_corrected"}):
        full_params, full = _steps_with_fixed_gradients(20, **extra)
        q_params, quantized = _steps_with_fixed_gradients(20, root_dtype="int8", **extra)
        for p, q in zip(full_params, q_params, strict=True):
            assert (q - p).norm() <= 1e-2 * p.norm(), extra
        kind = "eigenvectors" if extra else "roots"
        ratio = quantized.memory_report().state[kind] / full.memory_report().state[kind]
        assert 0.26 < ratio < 0.30, ratio
    params, opt = _steps_with_fixed_gradients(13, root_dtype="int8")
    state = opt.state[params[0]]
    assert state["blocks.0.root_0"].dtype == torch.int8 and "blocks.0.root_0_scale" in state
    saved = roundtrip(opt.state_dict())
    again_params, again = _steps_with_fixed_gradients(0, root_dtype="int8")
    with torch.no_grad():
        for p, q in zip(params, again_params, strict=True):
            q.copy_(p)
    again.load_state_dict(saved)
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for o, ps in ((opt, params), (again, again_params)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            o.step()
    for p, q in zip(params, again_params, strict=True):
        assert torch.equal(p, q)
    _, wide = _steps_with_fixed_gradients(0)
    with pytest.raises(ValueError, match="root_dtype: 'int8' saved, None here"):
        wide.load_state_dict(saved)


@pytest.mark.parametrize("stagger", [False, True])
def test_the_lean_setting_resumes_bitwise_from_a_checkpoint(tmp_path, stagger):
    """Every memory option at once (8-bit roots, bfloat16 moving averages, diagonal 1-D blocks),
    staggered refreshes too: a DCP checkpoint resumes bitwise, and the full state dict holds
    the quantized roots' scales."""
    lean = dict(
        OPTS, max_factor_ratio=4, root_dtype="int8", grafting_dtype="bfloat16",
        first_moment_dtype="bfloat16", stagger_roots=stagger,
    )  # fmt: skip
    model = make_model()
    opt = ShardedShampoo(model.parameters(), **lean)
    train(model, opt, 6)
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    after = train(model, opt, 6, start=6)
    again_model = make_model(seed=3)
    again = ShardedShampoo(again_model.parameters(), **lean)
    load_checkpoint(str(tmp_path / "ckpt"), again_model, again)
    assert train(again_model, again, 6, start=6) == after
    for p, q in zip(model.parameters(), again_model.parameters(), strict=True):
        assert torch.equal(p, q)
    keys = set().union(*(s.keys() for s in again.full_state_dict()["state"].values()))
    assert any(k.endswith("root_0_scale") for k in keys)


def test_a_float32_checkpoint_loads_into_bfloat16_storage(tmp_path):
    """Through DCP: roots and moving averages saved in float32 load, rounded to nearest, into
    an optimizer that keeps them in bfloat16."""
    model, opt = _trained(True)
    save_checkpoint(str(tmp_path / "ckpt"), model, opt)
    narrow = dict(root_dtype="bfloat16", grafting_dtype="bfloat16", first_moment_dtype="bfloat16")
    other_model = make_model(seed=2)
    other = ShardedShampoo(other_model.parameters(), **OPTS, **narrow)
    load_checkpoint(str(tmp_path / "ckpt"), other_model, other)
    for p, q in zip(opt.state, other.state, strict=True):
        for key, value in opt.state[p].items():
            if key.startswith("blocks."):
                stored = other.state[q][key]
                assert torch.equal(stored, value.to(stored.dtype)), key
    assert other.param_groups[0]["root_dtype"] == "bfloat16"
