"""Failed eigendecompositions and non-finite gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

import sharded_shampoo.algorithm.roots as roots_module
from sharded_shampoo import NonFiniteGradientWarning, RootFailureWarning, ShardedShampoo

OPTS = dict(
    lr=0.1,
    max_preconditioner_dim=4,
    precondition_frequency=2,
    start_preconditioning_step=2,
    epsilon=1e-3,
)


def model_params():
    torch.manual_seed(0)
    # Two 4x4 blocks (stacked together) and a 1-d parameter.
    return [torch.randn(8, 4, requires_grad=True), torch.randn(3, requires_grad=True)]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def roots_of(opt, p, block):
    return opt.state[p][f"blocks.{block}.root_0"].clone()


class FlakyEigh:
    """An eigh that fails for matrices whose (0, 0) entry is marked, in the chosen ways."""

    def __init__(self, mode, dtypes=(torch.float32,)):
        self.mode, self.dtypes, self.calls = mode, dtypes, []

    def __call__(self, a):
        self.calls.append((tuple(a.shape), a.dtype))
        evals, evecs = torch.linalg.eigh(a)
        if a.dtype in self.dtypes:
            if self.mode == "raise":
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            if self.mode == "nan":
                evals = evals.clone()
                evals[..., 0] = float("nan")
        return evals, evecs


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_failed_float32_eigh_is_retried_in_float64(monkeypatch, mode):
    params = model_params()
    clean = [p.detach().clone().requires_grad_() for p in params]
    opt = ShardedShampoo(params, **OPTS)
    ref = ShardedShampoo(clean, **OPTS)
    flaky = FlakyEigh(mode)
    for step in range(4):
        set_grads(params, step)
        set_grads(clean, step)
        ref.step()
        monkeypatch.setattr(roots_module, "eigh", flaky)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the float64 retry succeeds: no warning
            opt.step()
        monkeypatch.undo()
    assert any(dtype == torch.float64 for _, dtype in flaky.calls)
    for p, q in zip(params, clean, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_block_keeps_previous_roots_then_raises_after_repeated_failures(monkeypatch):
    params = model_params()
    opt = ShardedShampoo(params, max_consecutive_root_failures=3, **OPTS)
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    opt.step()  # t = 2: roots computed normally
    good = roots_of(opt, params[0], 1)
    assert not torch.equal(good, torch.eye(4))

    monkeypatch.setattr(roots_module, "eigh", FlakyEigh("raise", (torch.float32, torch.float64)))
    for t in range(3, 9):
        set_grads(params, t)
        before = [p.detach().clone() for p in params]
        if t == 8:
            with pytest.raises(RuntimeError, match=r"failed 3 times in a row"):
                opt.step()
            # Raised before any parameter changed.
            for p, b in zip(params, before, strict=True):
                assert torch.equal(p, b)
            break
        if t % 2 == 0:
            with pytest.warns(RootFailureWarning, match=r"block 1 \[4:8, 0:4\] of parameter"):
                opt.step()
        else:
            opt.step()  # not an amortized step
        assert torch.equal(roots_of(opt, params[0], 1), good)
        assert all(torch.isfinite(p).all() for p in params)


def test_failure_count_resets_after_success(monkeypatch):
    params = model_params()
    opt = ShardedShampoo(params, max_consecutive_root_failures=2, **OPTS)
    fail = FlakyEigh("raise", (torch.float32, torch.float64))
    for t in range(1, 11):
        set_grads(params, t)
        # Fail on every other amortized step: never two in a row, so never an error.
        if t % 4 == 0:
            monkeypatch.setattr(roots_module, "eigh", fail)
            with pytest.warns(RootFailureWarning):
                opt.step()
            monkeypatch.undo()
        else:
            opt.step()
    failures = opt.state[params[0]]["blocks.0.root_failures"]
    assert int(failures) == 0


def test_nonfinite_gradient_skips_only_that_block():
    params = model_params()
    opt = ShardedShampoo(params, momentum=0.5, weight_decay=0.01, **OPTS)
    set_grads(params, 0)
    opt.step()
    w_before = params[0].detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    set_grads(params, 1)
    params[0].grad[5, 2] = float("nan")  # inside block 1 (rows 4:8)
    with pytest.warns(NonFiniteGradientWarning, match=r"block 1 \[4:8, 0:4\]"):
        opt.step()
    # Block 1 untouched, block 0 updated.
    assert torch.equal(params[0][4:8], w_before[4:8])
    assert not torch.equal(params[0][0:4], w_before[0:4])
    for k, v in opt.state[params[0]].items():
        if k.startswith("blocks.1."):
            assert torch.equal(v, state_before[k]), k
    assert not torch.equal(
        opt.state[params[0]]["blocks.0.factor_0"], state_before["blocks.0.factor_0"]
    )
    # Training goes on, finite.
    for t in range(2, 6):
        set_grads(params, t)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(v).all() for v in opt.state[params[0]].values())


def test_infinite_gradient_everywhere_changes_nothing():
    params = model_params()
    opt = ShardedShampoo(params, **OPTS)
    for p in params:
        p.grad = torch.full(p.shape, float("inf"))
    before = [p.detach().clone() for p in params]
    with pytest.warns(NonFiniteGradientWarning):
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
    for p in params:
        for v in opt.state[p].values():
            assert torch.isfinite(v.float()).all()
