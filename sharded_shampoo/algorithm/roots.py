"""Batched inverse p-th roots of symmetric positive semi-definite matrices, with a fallback.

``(A / c + epsilon * I) ** (-e)`` is computed from one symmetric eigendecomposition of ``A``:
``Q diag((max(lambda, 0) / c + epsilon) ** -e) Q^T``. The eigenvalues are clamped at zero because
``A`` is a sum of Gram matrices (PSD in exact arithmetic); rounding can push its smallest
eigenvalues slightly negative, and a negative base would turn the root into NaN. Pseudo-inverse
roots (``pseudo_inverse``) drop the eigenvalues below a cutoff instead (``inverse_power``).

The whole stack goes through one batched ``eigh``. If it raises, or any matrix comes back with
non-finite values, the matrices concerned are retried one by one in float64; those that still fail
are reported to the caller, which keeps their previous roots.
"""

from __future__ import annotations

import torch

from .storage import copy_where

__all__ = ["eigh", "inverse_power", "inverse_roots", "keep_successes", "newton_inverse_roots"]


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


def inverse_power(
    values: torch.Tensor,
    *,
    exponent: float,
    epsilon: float,
    rank_tolerance: tuple[float, float | None] | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """``(max(lambda, 0) + epsilon) ** -exponent`` for each eigenvalue ``lambda`` of ``values``
    (..., m). With ``rank_tolerance = (atol, rtol)`` (``pseudo_inverse``), a pseudo-inverse
    power instead, as the reference implementation's ``PseudoInverseConfig``: per row, the
    eigenvalues at most ``max(atol, rtol x max(largest, 0))`` get 0 and the others
    ``lambda ** -exponent`` (``rtol`` None: ``size`` (default m) times the dtype's rounding
    unit)."""
    if rank_tolerance is None:
        return (values.clamp_min(0.0) + epsilon).pow(-exponent)
    atol, rtol = rank_tolerance
    if rtol is None:
        rtol = (values.shape[-1] if size is None else size) * torch.finfo(values.dtype).eps
    cutoff = (values.amax(-1, keepdim=True).clamp_min(0.0) * rtol).clamp_min(atol)
    kept = values > cutoff
    # Dropped eigenvalues may be 0 or negative: their power is replaced, never used.
    return torch.where(kept, torch.where(kept, values, 1.0).pow(-exponent), 0.0)


def _roots_from_eigh(
    a: torch.Tensor,
    scale: float,
    epsilon: float,
    exponent: float,
    rank_tolerance: tuple[float, float | None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roots of a stack ``a`` (n, d, d) and a per-matrix ``ok`` flag (n,)."""
    evals, evecs = eigh(a)
    w = inverse_power(
        evals * scale, exponent=exponent, epsilon=epsilon, rank_tolerance=rank_tolerance
    )
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
    rank_tolerance: tuple[float, float | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(roots, ok)``: ``roots[j]`` is valid where ``ok[j]`` is True.

    ``factors`` is (n, d, d), in any floating dtype; roots are computed in at least float32 and
    returned in ``out_dtype``. ``scale`` multiplies the factor (1 / bias correction);
    ``rank_tolerance``: pseudo-inverse roots (``inverse_power``).
    """
    work_dtype = torch.promote_types(factors.dtype, torch.float32)
    a = factors.to(work_dtype)
    try:
        roots, ok = _roots_from_eigh(a, scale, epsilon, exponent, rank_tolerance)
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
                r, good = _roots_from_eigh(
                    a[j : j + 1].double(), scale, epsilon, exponent, rank_tolerance
                )
            except RuntimeError:
                continue
            r = r[0].to(out_dtype)
            if bool(good.all()) and bool(torch.isfinite(r).all()):
                roots[j] = r
                ok[j] = True
    return roots, ok


def _power(m: torch.Tensor, p: int) -> torch.Tensor:
    """``m ** p`` for a stack of matrices, by squaring (a product per bit of ``p``)."""
    out = None
    while True:
        if p & 1:
            out = m if out is None else out @ m
        p >>= 1
        if not p:
            return out
        m = m @ m


def newton_inverse_roots(
    factors: torch.Tensor,
    *,
    scale: float,
    epsilon: float,
    p: int,
    iterations: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A / c + epsilon I) ** (-1 / p)`` of a stack of factors by ``iterations`` steps of the
    coupled Newton iteration (Guo and Higham, 2006): matrix products only, batched, no host
    read. Returns ``(roots, ok)`` as ``inverse_roots`` does; ``ok`` is False where a root
    came out non-finite.

    With ``A' = A * scale + max(epsilon, d u ||A * scale||_F) I`` (``u``: the work dtype's
    rounding unit) and ``z = (1 + p) / (2 ||A'||_F)``:
    ``X_0 = z^(1/p) I``, ``M_0 = z A'``, then ``T = ((p + 1) I - M_k) / p``,
    ``X_{k+1} = X_k T``, ``M_{k+1} = T^p M_k``. ``M_k = X_k^p A'`` throughout, and ``M_k -> I``:
    ``X_k -> A'^(-1/p)``. ``z`` puts the eigenvalues of ``M_0`` in ``(0, (1 + p) / 2]``, where
    the iteration converges for each eigenvalue ``m``: ``m -> m ((p + 1 - m) / p)^p`` grows
    by about ``(1 + 1/p)^p`` (2.25 to 2.7) per step while small, then converges
    quadratically. So ``log(cond(A')) / log(2.25) + 5`` steps reach the working precision;
    an eigenvector whose eigenvalue has not converged gets a smaller root than
    ``eigh`` would give (``z^(1/p)`` times the growth so far): for a rank-deficient factor
    with a small ``epsilon``, its null space is preconditioned less than by ``eigh`` (by the
    fixed count, and by the shift's floor where ``epsilon`` is below it). The root is
    symmetrized at the end (rounding makes ``X`` slightly asymmetric). It does not start from
    the previous root: the coupled iteration needs ``X_0`` to commute with ``A'``, which a
    root of an older factor does not."""
    work_dtype = torch.promote_types(factors.dtype, torch.float32)
    a = factors.to(work_dtype) * scale
    d = a.shape[-1]
    eye = torch.eye(d, dtype=work_dtype, device=a.device)
    # The iteration cannot clamp a rounding-negative eigenvalue as eigh's roots do, and one
    # would grow without bound: the shift is at least d rounding units of the factor's norm,
    # above the rounding of every product (1e-12 on a float32 factor of rank 1 diverged in
    # 24 iterations).
    floor = d * torch.finfo(work_dtype).eps * torch.linalg.matrix_norm(a)
    a = a + floor.clamp_min(epsilon).view(-1, 1, 1) * eye
    z = (1.0 + p) / (2.0 * torch.linalg.matrix_norm(a).clamp_min(torch.finfo(work_dtype).tiny))
    x = z.pow(1.0 / p).view(-1, 1, 1) * eye
    m = z.view(-1, 1, 1) * a
    for _ in range(iterations):
        t = ((p + 1) * eye - m) / p
        x = x @ t
        m = _power(t, p) @ m
    roots = ((x + x.mT) / 2).to(out_dtype)
    ok = torch.isfinite(roots).flatten(1).all(1)
    return roots, ok
