"""Batched eigenbases of the Kronecker factors, for the eigenvalue-corrected preconditioner.

Every refresh replaces each factor's eigenvectors ``Q_i`` (columns by decreasing eigenvalue):

- ``eigh``: an eigendecomposition of the factor; a matrix whose batched ``eigh`` raised or came
  back non-finite is retried alone in float64, as the roots are (``roots.py``).
- ``qr``: ``qr_iterations`` steps of an orthogonal (QR) iteration warm-started from the previous
  ``Q_i``, as SOAP does: the columns are first put in order of decreasing estimated eigenvalue
  ``diag(Q^T F Q)``, and the corrected eigenvalues are permuted along dim i the same way, so
  that each entry keeps following its eigenvector; then ``Q <- qr(F Q)`` each iteration.

The filtered gradient, kept in the eigenbasis, is rotated into the new one. A block for which
any dim fails keeps all its previous eigenvectors (and its corrected eigenvalues' order and
filtered gradient), and its failure count goes up; a success resets it.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from .modes import precondition
from .options import GroupOptions
from .roots import eigh, keep_successes

__all__ = ["refresh_eigenbasis"]


def _eigh_descending(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of the stack ``a`` by decreasing eigenvalue, and a per-matrix ``ok``."""
    try:
        _, q = eigh(a)
        q = q.flip(-1)
        ok = torch.isfinite(q).flatten(1).all(1)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        q = torch.empty_like(a)
        ok = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    for j in (~ok).nonzero().flatten().tolist():  # rare: alone, in float64
        try:
            _, qj = eigh(a[j : j + 1].double())
        except RuntimeError:
            continue
        qj = qj.flip(-1).to(a.dtype)
        if bool(torch.isfinite(qj).all()):
            q[j], ok[j] = qj[0], True
    return q, ok


# Factors of fewer gradients than their dimension have a null space, whose eigenvectors LAPACK
# picks by rounding: they would differ with a matrix's place in a stack, hence with the world
# size, and the corrected eigenvalues (per coordinate of the basis) with them. A deterministic
# diagonal ramp of this size relative to the mean eigenvalue orders such eigenvalues.
TIE_BREAK = 1e-6


def _tie_broken(a: torch.Tensor) -> torch.Tensor:
    m = a.shape[-1]
    mean = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)
    ramp = torch.arange(1, m + 1, dtype=a.dtype, device=a.device) / m
    return a + torch.diag_embed((TIE_BREAK * mean).unsqueeze(-1) * ramp)


def refresh_eigenbasis(
    state: TensorDict, opts: GroupOptions, order: int, keep: torch.Tensor
) -> torch.Tensor:
    """Recomputes the eigenvectors of the kept blocks (``keep``) of the stack; returns which
    succeeded, True for the blocks not kept (they change nothing)."""
    values = state["corrected_eigenvalues"]
    new, permutations, ok = [], [], None
    for i in range(order):
        old = state[f"eigenvectors_{i}"]
        f = state[f"factor_{i}"]
        a = _tie_broken(f.to(torch.promote_types(f.dtype, torch.float32)))
        if opts.eigenbasis == "eigh":
            q, good = _eigh_descending(a)
        else:
            q = old.to(a.dtype)
            # One product serves both: diag(Q^T F Q) = column sums of Q * (F Q), and the
            # first iteration's F Q is that product with its columns in the new order.
            fq = a @ q
            estimates = (q * fq).sum(-2)
            perm = torch.argsort(estimates, dim=-1, descending=True, stable=True)
            permutations.append((i, perm))
            fq = fq.gather(2, perm.unsqueeze(1).expand_as(fq))
            for it in range(opts.qr_iterations):
                q, _ = torch.linalg.qr(fq if it == 0 else a @ q)
            good = torch.isfinite(q).flatten(1).all(1)
        new.append(q.to(old.dtype))
        ok = good if ok is None else ok & good
    assert ok is not None
    take = (ok & keep).view(-1, *([1] * (values.dim() - 1)))
    filtered = state.get("filtered_grad", None)
    if filtered is not None:  # kept in the eigenbasis: into the new one
        old_q = [state[f"eigenvectors_{i}"] for i in range(order)]
        moved = precondition(precondition(filtered, old_q), [q.mT for q in new])
        filtered.copy_(torch.where(take, moved, filtered))
    for i, perm in permutations:
        # Entry j of dim i follows column perm[j] of the old eigenvectors.
        shape = [1] * values.dim()
        shape[0], shape[i + 1] = perm.shape[0], perm.shape[1]
        index = perm.view(shape).expand_as(values)
        values.copy_(torch.where(take, values.gather(i + 1, index), values))
    return keep_successes(state, "eigenvectors", new, ok, keep)
