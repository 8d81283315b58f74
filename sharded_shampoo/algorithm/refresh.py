"""Refreshes: the roots of root-inverse Shampoo or the eigenbases of the eigenvalue-corrected
preconditioner, of a stack's blocks, and when each block's is due.

One interface for both (``refresh``): per block, whether it succeeded; a block that fails
keeps what it had and counts a failure (``roots.keep_successes``), a block not kept (a
non-finite gradient in this step) changes nothing. Steps that refresh read the device back
(the decompositions check their convergence on the host; failures are retried alone in
float64); the others do not come here.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from ..options import GroupOptions
from .eigenbasis import refresh_eigenbasis
from .modes import factored_dims
from .packing import unpack
from .roots import inverse_roots, keep_successes

__all__ = ["due_rows", "refresh", "refresh_roots"]


def refresh_roots(
    state: TensorDict, opts: GroupOptions, t: int, order: int, keep: torch.Tensor
) -> torch.Tensor:
    """Recomputes the roots of the kept blocks of the stack; returns which succeeded (n,) bool,
    True for the blocks not kept (they keep their roots, as they keep all their state).

    A block for which any factor's root fails keeps all its previous roots, and its
    ``root_failures`` count goes up; a success resets the count.
    """
    if opts.use_bias_correction and opts.beta2 < 1.0:
        scale = 1.0 / (1.0 - opts.beta2**t)
    else:
        scale = 1.0
    dims = factored_dims(state, order)
    # A block's order is that of its preconditioned dims (the others act as a batch).
    exponent = opts.exponent(len(dims))
    new_roots, ok = {}, None
    for i in dims:
        old, factor = state[f"root_{i}"], unpack(state[f"factor_{i}"])
        # Quantized roots are computed in the factors' work dtype (``storage`` quantizes them).
        work = torch.promote_types(factor.dtype, torch.float32)
        r, good = inverse_roots(
            factor,
            scale=scale,
            epsilon=opts.epsilon,
            exponent=exponent,
            out_dtype=old.dtype if old.is_floating_point() else work,
        )
        new_roots[i] = r
        ok = good if ok is None else ok & good
    assert ok is not None
    return keep_successes(state, "root", new_roots, ok, keep)


def _refresh(
    state: TensorDict, opts: GroupOptions, t: int, order: int, keep: torch.Tensor
) -> torch.Tensor:
    """Roots, or eigenvectors with the eigenvalue-corrected preconditioner, of every block."""
    if not factored_dims(state, order):  # nothing to refresh (``max_factor_ratio``)
        return torch.ones_like(keep)
    if opts.eigenvalue_corrected:
        return refresh_eigenbasis(state, opts, t, order, keep)
    return refresh_roots(state, opts, t, order, keep)


def refresh(
    state: TensorDict,
    opts: GroupOptions,
    t: int,
    order: int,
    keep: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recomputes the roots (or eigenbases) of the blocks ``rows`` (indices on the stack's
    device; None: all), one batched decomposition per dim; returns per row whether it
    succeeded (see ``refresh_roots``)."""
    if rows is None:
        return _refresh(state, opts, t, order, keep)
    dims = factored_dims(state, order)
    changed = [f"{opts.basis}_{i}" for i in dims] + ["root_failures"]
    changed += [f"{key}_scale" for key in changed if f"{key}_scale" in state.keys()]
    if opts.eigenvalue_corrected:
        changed.append("corrected_eigenvalues")
        if "filtered_grad" in state.keys():
            changed.append("filtered_grad")  # kept in the eigenbasis
    sub = state.select(*[f"factor_{i}" for i in dims], *changed)[rows]
    ok = _refresh(sub, opts, t, order, keep[rows])
    for key in changed:
        state[key][rows] = sub[key]
    return ok


def due_rows(opts: GroupOptions, t: int, phases: torch.Tensor | None) -> torch.Tensor | bool:
    """Which blocks refresh their roots at step ``t``: True (all), False (none), or the host
    indices of those whose phase (``phases``, host tensor, with ``stagger_roots``) is due."""
    start = opts.start_preconditioning_step
    if phases is None or t == start:
        # Every block at the start (staggered too: no block waits for its phase to be
        # preconditioned), and every f steps after it without staggering.
        return opts.is_amortized_step(t)
    if t < start:
        return False
    due = (phases == t % opts.precondition_frequency).nonzero().flatten()
    return due if due.numel() else False
