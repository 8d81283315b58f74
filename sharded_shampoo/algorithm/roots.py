"""Batched inverse p-th roots of symmetric positive semi-definite matrices, with a fallback.

``(A / c + epsilon * I) ** (-e)`` is computed from one symmetric eigendecomposition of ``A``:
``Q diag((max(lambda, 0) / c + epsilon) ** -e) Q^T``. The eigenvalues are clamped at zero because
``A`` is a sum of Gram matrices (PSD in exact arithmetic); rounding can push its smallest
eigenvalues slightly negative, and a negative base would turn the root into NaN.

The whole stack goes through one batched ``eigh``. If it raises, or any matrix comes back with
non-finite values, the matrices concerned are retried one by one in float64; those that still fail
are reported to the caller, which keeps their previous roots.
"""

from __future__ import annotations

import torch

from .storage import copy_where

__all__ = ["inverse_roots", "eigh", "keep_successes"]


def keep_successes(
    state, values: dict[str, torch.Tensor], ok: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Copies ``values`` (new roots or eigenvectors, stored as the state stores them:
    ``storage.stored``) into ``state`` for the kept blocks (``keep``) where ``ok``; the other
    kept blocks keep their previous matrices and count one more consecutive failure, a success
    resets it; blocks not kept change nothing. Returns ``ok``, True for the blocks not kept. On
    the device: no host read."""
    copy_where(state, values, ok & keep)
    failures = state["root_failures"]
    counted = torch.where(ok.view(-1, 1), torch.zeros_like(failures), failures + 1)
    failures.copy_(torch.where(keep.view(-1, 1), counted, failures))
    return ok | ~keep


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``; a module-level name so tests can make it fail."""
    return torch.linalg.eigh(a)


def _roots_from_eigh(
    a: torch.Tensor, scale: float, epsilon: float, exponent: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roots of a stack ``a`` (n, d, d) and a per-matrix ``ok`` flag (n,)."""
    evals, evecs = eigh(a)
    w = (evals.clamp_min(0.0) * scale + epsilon).pow(-exponent)
    roots = (evecs * w.unsqueeze(-2)) @ evecs.mT
    ok = torch.isfinite(roots).flatten(1).all(1)
    return roots, ok


def inverse_roots(
    factors: torch.Tensor,
    *,
    scale: float,
    epsilon: float,
    exponent: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(roots, ok)``: ``roots[j]`` is valid where ``ok[j]`` is True.

    ``factors`` is (n, d, d), in any floating dtype; roots are computed in at least float32 and
    returned in ``out_dtype``. ``scale`` multiplies the factor (1 / bias correction).
    """
    work_dtype = torch.promote_types(factors.dtype, torch.float32)
    a = factors.to(work_dtype)
    try:
        roots, ok = _roots_from_eigh(a, scale, epsilon, exponent)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        roots = torch.empty_like(a)
        ok = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    roots = roots.to(out_dtype)
    if out_dtype != work_dtype:
        # Narrowing can overflow (roots of float64 factors with a tiny epsilon, kept in float32).
        ok &= torch.isfinite(roots).flatten(1).all(1)
    if not bool(ok.all()):
        # Rare: retry the failed matrices alone, in float64; a root is kept only if it is still
        # finite in the dtype it is stored in.
        for j in (~ok).nonzero().flatten().tolist():
            try:
                r, good = _roots_from_eigh(a[j : j + 1].double(), scale, epsilon, exponent)
            except RuntimeError:
                continue
            r = r[0].to(out_dtype)
            if bool(good.all()) and bool(torch.isfinite(r).all()):
                roots[j] = r
                ok[j] = True
    return roots, ok
