"""Refreshes: the roots of root-inverse Shampoo or the eigenbases of the eigenvalue-corrected
preconditioner, of a stack's blocks, and when each block's is due.

A refresh is two halves: ``decompose`` computes the new matrices from the factors (a pure
function: with ``refresh_delay`` it runs in the background, see ``sharded_shampoo.refreshes``)
and ``install`` writes them into the state; ``refresh`` does both at once. Per block, whether
it succeeded: a block that fails keeps what it had and counts a failure
(``roots.keep_successes``), a block not kept (a non-finite gradient when it was due) changes
nothing. Decompositions read the device back (they check their convergence on the host;
failures are retried alone in float64); steps without one do not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDict

from ..options import GroupOptions, newton_root
from .eigenbasis import eigenbases, install_eigenbases, warm_roots
from .modes import factored_dims
from .packing import unpack
from .roots import inverse_roots, keep_successes, newton_inverse_roots
from .storage import stored

__all__ = [
    "decompose",
    "due_rows",
    "install",
    "install_keys",
    "refresh",
    "refresh_inputs",
    "storage_format",
]


def refresh_inputs(state: TensorDict, opts: GroupOptions, order: int) -> list[str]:
    """The state a refresh reads (``decompose``): the factors, and with eigenvalue correction
    the current eigenvectors (a new eigenbasis starts from the old one). New roots need only
    the factors."""
    dims = factored_dims(state, order)
    keys = [f"factor_{i}" for i in dims]
    if "eigenvectors" in opts.bases:  # a new eigenbasis starts from the old one
        keys += [k for i in dims for k in (f"eigenvectors_{i}", f"eigenvectors_{i}_scale")]
    return [k for k in keys if k in state.keys()]


def storage_format(state: TensorDict, opts: GroupOptions, order: int) -> dict[str, torch.Tensor]:
    """How ``state`` stores each dim's matrix (packed or not, its dtype), as ``decompose``
    writes them: a view of no rows of each, which copies nothing."""
    return {
        f"{base}_{i}": state[f"{base}_{i}"][:0]
        for i in factored_dims(state, order)
        for base in opts.bases
    }


def install_keys(state: TensorDict, opts: GroupOptions, order: int) -> list[str]:
    """The state ``install`` writes."""
    dims = factored_dims(state, order)
    keys = [f"{base}_{i}" for i in dims for base in opts.bases] + ["root_failures"]
    keys += [f"{key}_scale" for key in keys if f"{key}_scale" in state.keys()]
    if opts.eigenvalue_corrected:
        keys.append("corrected_eigenvalues")
        if "filtered_grad" in state.keys():
            keys.append("filtered_grad")  # kept in the eigenbasis
    return keys


def decompose(
    state: TensorDict,
    opts: GroupOptions,
    t: int,
    order: int,
    like: Mapping[str, torch.Tensor] | None = None,
) -> TensorDict:
    """The new roots (or eigenvectors) of every block of the stack at step ``t``, from its
    factors (and current eigenvectors: ``refresh_inputs``); nothing is written. A TensorDict
    over the blocks: the matrices as the state stores them (packed, narrow or quantized), ``ok``
    (n, 1) whether every dim succeeded (a failed block's matrices are its previous ones), and
    with soap QR ``permutation_i``, the order its corrected eigenvalues of dim i follow.
    ``like`` says how the state stores the matrices (``storage_format``; default ``state``).

    A pure function of its inputs: what ``install`` makes of it is the same whenever and
    wherever it was computed (``refresh_delay`` computes it in the background)."""
    dims = factored_dims(state, order)
    n = state.batch_size[0]
    like = state if like is None else like
    permutations: dict[int, torch.Tensor] = {}
    if opts.eigenvalue_corrected:
        bases, ok, permutations = eigenbases(state, opts, t, dims)
        new = {f"eigenvectors_{i}": q for i, q in bases.items()}
    else:
        scale = 1.0
        if opts.use_bias_correction and opts.beta2 < 1.0:
            scale = 1.0 / (1.0 - opts.beta2**t)
        # A block's order is that of its preconditioned dims (the others act as a batch).
        exponent = opts.exponent(len(dims))
        if opts.eigenbasis == "qr":
            new, ok = warm_roots(state, opts, t, scale, exponent, dims)
        else:
            new, ok = {}, torch.ones(n, dtype=torch.bool, device=state.device)
            # Newton's iteration for exponents 1/p it takes (the options refuse overrides it
            # does not; an order above 8 falls back to eigh).
            p = None if opts.newton_iterations is None else newton_root(exponent)
            for i in dims:
                old, factor = like[f"root_{i}"], unpack(state[f"factor_{i}"])
                # Quantized roots are computed in the factors' work dtype (``storage``
                # quantizes).
                work = torch.promote_types(factor.dtype, torch.float32)
                common = dict(
                    scale=scale,
                    epsilon=opts.epsilon,
                    out_dtype=old.dtype if old.is_floating_point() else work,
                )
                if p is None:
                    root, good = inverse_roots(
                        factor, exponent=exponent, rank_tolerance=opts.rank_tolerance, **common
                    )
                else:
                    root, good = newton_inverse_roots(
                        factor, p=p, iterations=opts.newton_iterations, **common
                    )
                new[f"root_{i}"], ok = root, ok & good
    out = {"ok": ok.view(n, 1)}
    for key, matrices in new.items():
        out.update(stored(like, key, matrices))
    for i, perm in permutations.items():
        out[f"permutation_{i}"] = perm
    return TensorDict(out, batch_size=[n], device=state.device)


def install(
    state: TensorDict, new: TensorDict, opts: GroupOptions, order: int, keep: torch.Tensor
) -> torch.Tensor:
    """Installs what ``decompose`` computed (``new``) in the kept blocks (``keep``, (n,) bool)
    of ``state``; returns per block whether it succeeded, True for the blocks not kept.

    A block for which any dim failed keeps all its previous matrices, and its
    ``root_failures`` count goes up; a success resets the count; a block not kept (a
    non-finite gradient when it was due) changes nothing."""
    ok = new["ok"].view(-1)
    values = {k: new[k] for k in new.keys() if k.startswith(opts.bases)}
    if opts.eigenvalue_corrected:
        permutations = {
            int(k.rsplit("_", 1)[1]): new[k] for k in new.keys() if k.startswith("permutation_")
        }
        return install_eigenbases(state, values, ok, permutations, keep, order)
    return keep_successes(state, values, ok, keep)


def refresh(
    state: TensorDict,
    opts: GroupOptions,
    t: int,
    order: int,
    keep: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recomputes and installs at once the roots (or eigenbases) of the blocks ``rows``
    (indices on the stack's device; None: all), one batched decomposition per dim; returns per
    row whether it succeeded (see ``install``)."""
    if not factored_dims(state, order):  # nothing to refresh (``max_factor_ratio``)
        return torch.ones_like(keep if rows is None else keep[rows])
    if rows is None:
        return install(state, decompose(state, opts, t, order), opts, order, keep)
    changed = install_keys(state, opts, order)
    keys = dict.fromkeys([*refresh_inputs(state, opts, order), *changed])
    sub = state.select(*keys)[rows]
    ok = install(sub, decompose(sub, opts, t, order), opts, order, keep[rows])
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
