"""Refreshes computed in the background (``refresh_delay``): the result does not depend on
when the worker finishes, a checkpoint taken while one is in flight resumes bitwise, failures
surface at the install step. The math itself is checked against the reference in
test_against_reference.py (the ``delayed`` configurations)."""

from __future__ import annotations

import copy
import threading
import time
import warnings

import pytest
import torch

import sharded_shampoo.algorithm.roots as roots_module
import sharded_shampoo.refreshes as refreshes_module
from sharded_shampoo import RootFailureWarning, ShardedShampoo

SHAPES = [(12, 10), (9,), (4, 3, 5), (16, 6)]
BASE = dict(
    lr=0.05,
    epsilon=1e-4,
    max_preconditioner_dim=8,
    precondition_frequency=5,
    factor_dtype=torch.float64,
    betas=(0.9, 0.99),
)
CONFIGS = {
    # Saved after step 6: the refresh of step 5 is in flight until 8 (and the blocks whose
    # phase is 6 or 7 skip theirs).
    "staggered": dict(stagger_roots=True, refresh_delay=3, momentum=0.5),
    # The corrected eigenvalues of a refresh in flight follow a permutation when installed.
    "ec_soap_qr": dict(
        preconditioner="eigenvalue_corrected",
        eigenbasis="qr",
        eigenbasis_convention="soap",
        refresh_delay=2,
    ),
    "ec_eigh_staggered": dict(
        preconditioner="eigenvalue_corrected", stagger_roots=True, refresh_delay=4
    ),
    # Quantized roots in flight, bfloat16 averages, one-sided blocks.
    "lean": dict(
        refresh_delay=2,
        max_factor_ratio=4,
        root_dtype=torch.int8,
        grafting_dtype=torch.bfloat16,
        first_moment_dtype=torch.bfloat16,
    ),
}


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]


def train(opt, params, start, stop):
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = None if (step + i) % 6 == 0 else g  # some steps without a gradient
        opt.step()


def snapshot(opt, params):
    """Parameters and state (from ``state_dict``, which waits for what is in flight)."""
    state = {
        (i, k): v
        for i, s in opt.state_dict()["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    return [p.detach().clone() for p in params], state


def assert_identical(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def run(options, steps=14):
    params = make_params()
    opt = ShardedShampoo(params, **options)
    train(opt, params, 0, steps)
    return snapshot(opt, params)


def test_result_does_not_depend_on_when_the_worker_finishes(monkeypatch):
    options = {**BASE, **CONFIGS["staggered"]}
    fast = run(options)
    threads = set()
    original = refreshes_module.decompose

    def slow(*args, **kwargs):
        threads.add(threading.current_thread().name)
        time.sleep(0.02)  # still running when the next steps start
        return original(*args, **kwargs)

    monkeypatch.setattr(refreshes_module, "decompose", slow)
    assert_identical(run(options), fast)
    # Computed off the training thread.
    assert threads and threading.current_thread().name not in threads
    # And the delay changed the result: the comparison means something.
    synchronous = run({**options, "refresh_delay": 0})
    assert not torch.equal(synchronous[0][0], fast[0][0])


@pytest.mark.parametrize("name", ["staggered", "lean", "ec_soap_qr"])
def test_the_background_copy_holds_only_what_the_decomposition_reads(monkeypatch, name):
    """New roots need only the factors (quantized roots included); a new eigenbasis also
    starts from the current one."""
    seen = []
    original = refreshes_module.decompose

    def spy(state, *args, **kwargs):
        seen.append(sorted(k.rsplit("_", 1)[0] for k in state.keys()))
        return original(state, *args, **kwargs)

    monkeypatch.setattr(refreshes_module, "decompose", spy)
    run({**BASE, **CONFIGS[name]})
    ec = name.startswith("ec")
    assert seen and all(set(keys) == ({"factor", "eigenvectors"} if ec else {"factor"})
                        for keys in seen)  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_with_a_refresh_in_flight_resumes_bitwise(name):
    options = {**BASE, **CONFIGS[name]}
    uninterrupted = run(options)
    params = make_params()
    opt = ShardedShampoo(params, **options)
    train(opt, params, 0, 6)
    saved = copy.deepcopy(opt.state_dict())
    pending = [
        v for s in saved["state"].values() for k, v in s.items() if k.endswith("pending_step")
    ]
    assert any(int(v) > 6 for v in pending), "nothing was in flight"
    # The original goes on as if nothing happened (the save waited, changed nothing).
    train(opt, params, 6, 14)
    assert_identical(snapshot(opt, params), uninterrupted)
    # A new optimizer resumes from the checkpoint.
    params = make_params(seed=1)
    with torch.no_grad():
        for p, q in zip(params, make_params(), strict=True):
            p.copy_(q)
    fresh = ShardedShampoo(params, **options)
    train(fresh, params, 0, 6)  # weights as they were at the save
    resumed = ShardedShampoo(params, **options)
    resumed.load_state_dict(saved)
    train(resumed, params, 6, 14)
    assert_identical(snapshot(resumed, params), uninterrupted)


def test_refresh_in_flight_loads_into_the_other_packing():
    options = {**BASE, **CONFIGS["staggered"]}
    uninterrupted = run(options)
    params = make_params()
    opt = ShardedShampoo(params, **options)
    train(opt, params, 0, 6)
    saved = copy.deepcopy(opt.state_dict())
    resumed = ShardedShampoo(params, **options, symmetric_packing=False)
    resumed.load_state_dict(saved)
    assert resumed.state[params[0]]["blocks.0.pending_root_0"].shape == (8, 8)
    train(resumed, params, 6, 14)
    for p, q in zip(params, uninterrupted[0], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)


class Broken:
    """eigh that always fails (float64 retries too)."""

    def __call__(self, a):
        raise torch.linalg.LinAlgError("injected failure")


def test_failures_are_warned_counted_and_raised_at_the_install_step(monkeypatch):
    params = make_params()
    options = {**BASE, "precondition_frequency": 2, "start_preconditioning_step": 2}
    opt = ShardedShampoo(params, refresh_delay=1, max_consecutive_root_failures=3, **options)
    monkeypatch.setattr(roots_module, "eigh", Broken())
    counts = []
    for t in range(1, 8):
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        before = [p.detach().clone() for p in params]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if t == 7:  # the third failure in a row, installed at 7
                with pytest.raises(RuntimeError, match="failed 3 times in a row"):
                    opt.step()
                assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
                break
            opt.step()
        failed = [w for w in caught if issubclass(w.category, RootFailureWarning)]
        # Due at 2, 4, 6; installed, and failing, at 3, 5.
        assert bool(failed) == (t in (3, 5)), (t, failed)
        counts.append(int(opt.state[params[0]]["blocks.0.root_failures"]))
    assert counts == [0, 0, 1, 1, 2, 2]
    # The roots were never replaced: the identity they started as.
    fresh_params = make_params()
    fresh = ShardedShampoo(fresh_params, **options)
    identity = fresh.state[fresh_params[0]]["blocks.0.root_0"]
    assert torch.equal(opt.state[params[0]]["blocks.0.root_0"], identity)


def test_block_with_a_nonfinite_gradient_when_due_keeps_its_roots():
    params = make_params()
    options = {**BASE, "precondition_frequency": 4, "start_preconditioning_step": 2}
    opt = ShardedShampoo(params, refresh_delay=2, **options)
    state = opt.state[params[0]]
    for t in range(1, 11):  # due at 2, 4, 8; installed at 4, 6, 10
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if t == 8:
            params[0].grad[0, 0] = float("nan")  # block 0 of parameter 0, in its due step
        if t == 10:
            before = {k: v.clone() for k, v in state.items() if k.startswith("blocks.")}
            assert int(state["blocks.0.pending_step"]) == -10  # computed, not to install
            assert int(state["blocks.1.pending_step"]) == 10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    assert torch.equal(state["blocks.0.root_0"], before["blocks.0.root_0"])
    assert torch.equal(state["blocks.0.root_failures"], before["blocks.0.root_failures"])
    assert not torch.equal(state["blocks.1.root_0"], before["blocks.1.root_0"])
    assert int(state["blocks.0.pending_step"]) == 0 == int(state["blocks.1.pending_step"])


def test_options():
    params = make_params()
    with pytest.raises(ValueError, match="refresh_delay must be less than precondition_frequency"):
        ShardedShampoo(params, precondition_frequency=4, refresh_delay=4)
    with pytest.raises(ValueError, match=r"refresh_delay must be an int in \[0,"):
        ShardedShampoo(params, refresh_delay=-1)
    opt = ShardedShampoo(params, precondition_frequency=4, refresh_delay=1)
    opt.param_groups[0]["refresh_delay"] = 2
    train_error = None
    try:
        train(opt, params, 0, 1)
    except ValueError as e:
        train_error = str(e)
    assert train_error is not None and "refresh_delay cannot change" in train_error


def test_memory_report_counts_the_refreshes_in_flight():
    params = make_params()
    opt = ShardedShampoo(params, **BASE, refresh_delay=1)
    report = opt.memory_report()
    roots = report.state["roots"]
    pending = report.state["refreshes in flight"]
    assert roots < pending < roots * 1.2  # the roots again, and an ok flag and step per block
