"""Batched eigenbases of the Kronecker factors, for the eigenvalue-corrected preconditioner.

Every refresh replaces each factor's eigenvectors ``Q_i``, in one of two conventions
(``eigenbasis_convention``):

- ``"reference"`` (the reference implementation's, facebookresearch/optimizers): the basis of
  ``A = F / c + epsilon I`` (``c``: the second moment's bias correction) with columns by
  increasing eigenvalue, as ``eigh`` returns them; the corrected eigenvalues are left where
  they are (entry j keeps accumulating along whichever vector is column j now).
  ``eigenbasis="eigh"``: an eigendecomposition, skipped for a block whose previous basis still
  diagonalizes ``A`` within ``eigenbasis_tolerance`` (``||B - diag(B)||_F <= tol ||B||_F`` for
  ``B = Q^T A Q``). ``eigenbasis="qr"``: up to ``qr_iterations`` steps of the QR algorithm
  on ``B`` (``B = R Q_k``, ``Q <- Q Q_k`` from ``Q_k R = qr(B)``), warm-started from the
  previous basis and stopped for a block once ``B`` is diagonal within the tolerance; then
  the columns sorted by increasing ``diag(B)``.
- ``"soap"`` (the SOAP paper's): the basis of ``F``, columns by decreasing eigenvalue.
  ``eigh``: an eigendecomposition. ``qr``: the columns and the corrected eigenvalues (along dim
  i) are first put in order of decreasing estimated eigenvalue ``diag(Q^T F Q)``, so that each
  entry keeps following its eigenvector, then ``qr_iterations`` steps of ``Q <- qr(F Q)``
  (whose ``|diag(R)|`` estimates the new columns' eigenvalues, for the null space below).

With ``eigenbasis="qr"`` the first refresh (``start_preconditioning_step``) takes ``eigh``'s
basis with ``qr_start="eigh"`` (the default for SOAP's convention), as SOAP's code does; with
``"identity"`` (the default for the reference convention) it starts from the identity, as the
reference implementation does. From the identity, one iteration left eigenvalue-corrected
Shampoo (reference convention, from step 1, a refresh every 20) with validation losses peaking
at 0.46-1.06 after step 20 on digits seeds 1-5 (lr 0.01) and finals of 0.022-0.082; from eigh's
basis, peaks of 0.18-0.24 and finals of 0.022-0.038. But the reference's QR algorithm,
warm-started from an accurate basis in increasing order, amplifies the rounding of its
off-diagonal entries by up to ``lambda_max / epsilon`` per iteration: from eigh's first basis,
HSDP at 4 ranks ended 8.1e-4 away from one process, so the options refuse that pairing. SOAP's
convention (decreasing order, simultaneous iteration) did not spike from either start.

A factor of fewer gradients than its dimension has a null space (a cluster of smallest
eigenvalues equal up to rounding), whose eigenvectors LAPACK picks by rounding: they would
differ with a matrix's place in a stack, hence with the world size, and the corrected
eigenvalues (per coordinate of the basis) with them. In both conventions the columns of that
cluster are replaced by a basis that depends on their span alone (fixed directions projected
onto the span and orthonormalized), which leaves every other column as computed.

A matrix whose batched ``eigh`` raised or came back non-finite is retried alone in float64, as
the roots are (``roots.py``). The filtered gradient, kept in the eigenbasis, is rotated into
the new one. A block for which any dim fails keeps all its previous eigenvectors (and its
corrected eigenvalues' order and filtered gradient), and its failure count goes up; a success
resets it.
"""

from __future__ import annotations

import functools

import torch
from tensordict import TensorDict

from ..options import GroupOptions
from .modes import precondition
from .packing import unpack
from .roots import eigh, inverse_power, keep_successes
from .storage import read

__all__ = ["canonical_ties", "eigenbases", "install_eigenbases", "warm_roots"]

# Eigenvalues within TIES x eps(dtype) x m x max|eigenvalue| of the smallest form its cluster:
# the rounding of a null space's eigenvalues, far below any eigenvalue gradients make.
TIES = 64.0


def _tied(values: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` (n, m): which belong to the cluster of the smallest."""
    spread = TIES * torch.finfo(values.dtype).eps * values.shape[-1]
    low = values.amin(-1, keepdim=True)
    return values - low <= spread * values.abs().amax(-1, keepdim=True)


def _sort_key(values: torch.Tensor) -> torch.Tensor:
    """``values`` with the smallest's cluster set to the smallest: sorted stably, tied columns
    keep their order instead of an order rounding would give them."""
    return torch.where(_tied(values), values.amin(-1, keepdim=True), values)


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``eigh`` of the stack ``a`` (ascending) and a per-matrix ``ok``; a matrix that failed
    is retried alone in float64 (a host read per failed matrix, at refreshes only)."""
    try:
        values, q = eigh(a)
        ok = torch.isfinite(q).flatten(1).all(1) & torch.isfinite(values).all(1)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        values = torch.zeros(a.shape[:-1], dtype=a.dtype, device=a.device)
        q = torch.empty_like(a)
        ok = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    for j in (~ok).nonzero().flatten().tolist():  # rare: alone, in float64
        try:
            lj, qj = eigh(a[j : j + 1].double())
        except RuntimeError:
            continue
        if bool(torch.isfinite(qj).all()) and bool(torch.isfinite(lj).all()):
            values[j], q[j], ok[j] = lj[0].to(a.dtype), qj[0].to(a.dtype), True
    return values, q, ok


def _off_diagonal_small(b: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per matrix of ``b``: ``||B - diag(B)||_F <= tolerance ||B||_F``, computed as the
    reference does (from the two norms: when rounding makes ``||B||^2 - ||diag(B)||^2``
    negative, the square root is NaN and the test fails)."""
    norm = torch.linalg.matrix_norm(b)
    diagonal = torch.linalg.vector_norm(torch.diagonal(b, dim1=-2, dim2=-1), dim=-1)
    return (norm.square() - diagonal.square()).sqrt() <= tolerance * norm


def _qr_algorithm(
    a: torch.Tensor, q: torch.Tensor, iterations: int, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's QR algorithm, batched: a matrix stops iterating once its ``B`` is
    diagonal within ``tolerance`` (masked on the device, no host read). Returns the estimated
    eigenvalues ``diag(B)`` in increasing order and the eigenvectors sorted the same way."""
    b = q.mT @ a @ q
    for _ in range(iterations):
        going = ~_off_diagonal_small(b, tolerance)
        qk, r = torch.linalg.qr(b)
        step = going.view(-1, 1, 1)
        b = torch.where(step, r @ qk, b)
        q = torch.where(step, q @ qk, q)
    _, order = _sort_key(torch.diagonal(b, dim1=-2, dim2=-1)).sort(dim=-1, stable=True)
    values = torch.diagonal(b, dim1=-2, dim2=-1).gather(-1, order)
    return values, q.gather(-1, order.unsqueeze(-2).expand_as(q))


@functools.lru_cache(maxsize=16)
def _directions(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``X``, m x m: fixed Gaussian directions (seeded by ``m``, drawn on the CPU in float64 so
    that every device and dtype gets the same ones)."""
    gen = torch.Generator().manual_seed(m)
    return torch.randn(m, m, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def canonical_ties(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` (n, m, m) with, per matrix, the columns ``N`` of the cluster of its smallest
    eigenvalues (``values``, (n, m)) replaced by ``N Q_c``, where ``Q_c R = N^T X_t`` is the
    QR decomposition (``diag(R) >= 0``) of ``N``'s inner products with the columns of fixed
    directions ``X`` at those positions: the orthonormalized projections of ``X_t`` onto the
    span, a basis of the span that does not depend on which basis of it LAPACK returned
    (``N W`` gives ``W^T N^T X_t``, hence ``N W W^T Q_c``). Other columns are left as they are.
    Batched over the matrices that have such a cluster (an earlier version took an ``eigh`` of
    ``N^T D N`` per matrix, one at a time: 80 ms of lm's 155 ms eigenvalue-corrected step,
    float32 clusters being up to the whole factor). One host read (which matrices have a
    cluster), at refreshes only."""
    m = values.shape[-1]
    tied = _tied(values)
    rows = (tied.sum(-1) > 1).nonzero().flatten()
    if rows.numel() == 0:
        return q
    t, n = tied[rows].unsqueeze(-2), q[rows] * tied[rows].unsqueeze(-2)  # other columns: zero
    # N^T X_t in the cluster's rows and columns, the identity elsewhere: its QR decomposition
    # orthogonalizes the cluster's columns among themselves and leaves the others e_j.
    c = n.mT @ (_directions(m, q.dtype, q.device) * t) + torch.diag_embed((~t[:, 0]).to(q.dtype))
    qc, r = torch.linalg.qr(c)
    qc = qc * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)
    q = q.clone()
    q[rows] = torch.where(t, n @ qc, q[rows])
    return q


def eigenbases(
    state: TensorDict, opts: GroupOptions, t: int, dims: tuple[int, ...]
) -> tuple[dict[int, torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]:
    """The new eigenvectors of dims ``dims`` of every block of the stack at step ``t``, from
    its factors and current eigenvectors (nothing else is read, nothing written): per dim the
    matrices (the previous ones where the block failed), per block whether every dim
    succeeded, and per dim (soap QR only) the permutation the corrected eigenvalues follow."""
    reference = opts.eigenbasis_convention == "reference"
    first = t == opts.start_preconditioning_step and opts.qr_start == "eigh"
    new, permutations, ok = {}, {}, None
    for i in dims:
        f = unpack(state[f"factor_{i}"])
        a = f.to(torch.promote_types(f.dtype, torch.float32))
        if reference:
            scale = 1.0 - opts.beta2**t if opts.use_bias_correction and opts.beta2 < 1.0 else 1.0
            a = a / scale + opts.epsilon * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        q_old = read(state, f"eigenvectors_{i}", a.dtype)
        if opts.eigenbasis == "eigh" or first:
            estimates, q, good = _eigh(a)
            if reference and opts.eigenbasis_tolerance > 0:
                b = q_old.mT @ a @ q_old
                skip = _off_diagonal_small(b, opts.eigenbasis_tolerance)
                estimates = torch.where(
                    skip.unsqueeze(-1), torch.diagonal(b, dim1=-2, dim2=-1), estimates
                )
                q = torch.where(skip.view(-1, 1, 1), q_old, q)
                good = good | skip
            elif not reference:
                estimates, q = estimates.flip(-1), q.flip(-1)
                if opts.eigenbasis == "qr":  # its refreshes all give one (the background's too)
                    permutations[i] = torch.arange(q.shape[-1], device=q.device).expand(
                        q.shape[:-1]
                    )
        elif reference:
            estimates, q = _qr_algorithm(a, q_old, opts.qr_iterations, opts.eigenbasis_tolerance)
            good = torch.isfinite(q).flatten(1).all(1)
        else:
            # One product serves both: diag(Q^T F Q) = column sums of Q * (F Q), and the
            # first iteration's F Q is that product with its columns in the new order.
            fq = a @ q_old
            estimates = (q_old * fq).sum(-2)
            _, perm = torch.sort(_sort_key(estimates), dim=-1, descending=True, stable=True)
            estimates = estimates.gather(-1, perm)
            permutations[i] = perm
            fq = fq.gather(2, perm.unsqueeze(1).expand_as(fq))
            for it in range(opts.qr_iterations):
                q, r = torch.linalg.qr(fq if it == 0 else a @ q)
            # |diag(R)| of the last step estimates the eigenvalues of the new columns: a null
            # space shows there as the cluster of smallest values, wherever the old basis had it.
            estimates = torch.diagonal(r, dim1=-2, dim2=-1).abs()
            good = torch.isfinite(q).flatten(1).all(1)
        new[i] = canonical_ties(estimates, torch.where(good.view(-1, 1, 1), q, q_old))
        ok = good if ok is None else ok & good
    assert ok is not None
    return new, ok, permutations


def warm_roots(
    state: TensorDict,
    opts: GroupOptions,
    t: int,
    scale: float,
    exponent: float,
    dims: tuple[int, ...],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Root-inverse Shampoo's roots from warm-started eigenbases (``eigenbasis="qr"``), as the
    reference implementation's eigendecomposed Shampoo computes them: per dim, with
    ``A = F * scale`` (``scale``: 1 / the bias correction) and the previous basis ``Q``,
    ``qr_iterations`` steps of ``Q <- qr((A + s I) Q)`` (simultaneous iteration, its columns
    first put in order of decreasing ``diag(Q^T A Q)``), the eigenvalues
    ``lambda = diag(Q^T A Q)`` of the basis it ends with, and the root
    ``Q diag((max(lambda, 0) + epsilon) ** -exponent) Q^T`` (or its pseudo-inverse:
    ``roots.inverse_power``).

    ``A``'s rounding is ``u = eps(dtype) x m x ||A||_F`` (a bound on a Rayleigh quotient's).
    The shift ``s`` is ``max(epsilon, u)``: it leaves the eigenvectors ``A``'s, and a column
    in ``A``'s null space (a factor of fewer gradients than its order: 1-D blocks, unseen
    embedding rows, early steps) comes out of the product as ``s`` times itself plus
    rounding, so that the QR decomposition keeps it, orthogonalized against the range,
    instead of a direction the rounding gives, which differs between modes. For the order,
    estimates at most ``u`` count as zero: those columns keep their previous order.
    Unlike ``eigh`` of ``A``, no ``eigh`` or host read is needed for a rank-deficient
    factor (an ``eigh`` fallback for those made the QR refresh of lm 3.3x slower).

    The first refresh (``t`` is ``start_preconditioning_step``) takes ``eigh``'s basis, its
    null space's made canonical (``canonical_ties``: one host read), columns largest first, as
    SOAP takes its first (``qr_start="identity"``: the identity, as the reference does).
    From the identity, one QR step a refresh left the roots far from the factor's for tens of
    steps (lm, a refresh every step from step 1: validation loss 4.03 after 60 steps against
    eigh's 2.54). Later ones are batched over the stack, with no
    host read: per iteration a product and a QR decomposition, then a product for the
    eigenvalues and one for the root. Returns ``{"root_i", "eigenvectors_i"}`` and per block
    whether every dim's came out finite."""
    new, ok = {}, None
    for i in dims:
        f = unpack(state[f"factor_{i}"])
        a = f.to(torch.promote_types(f.dtype, torch.float32)) * scale
        m = a.shape[-1]
        if t == opts.start_preconditioning_step and opts.qr_start == "eigh":
            values, q, good = _eigh(a)
            eye = torch.eye(m, dtype=q.dtype, device=q.device)
            q = canonical_ties(values, torch.where(good.view(-1, 1, 1), q, eye)).flip(-1)
        else:
            # Columns by decreasing diag(Q^T A Q) before the QR decomposition, which
            # orthogonalizes them in order: the range's first, the null space's after them.
            old = read(state, f"eigenvectors_{i}", a.dtype)
            rounding = torch.finfo(a.dtype).eps * m * torch.linalg.matrix_norm(a)
            shift = rounding.clamp_min(opts.epsilon).view(-1, 1, 1)
            aq = a @ old
            estimates = (old * aq).sum(-2)
            estimates = torch.where(estimates <= rounding.unsqueeze(-1), 0.0, estimates)
            order = torch.sort(estimates, descending=True, stable=True)[1]  # null: as it was
            index = order.unsqueeze(-2).expand_as(aq)
            q = old.gather(-1, index)
            sq = aq.gather(-1, index) + shift * q  # (A + s I) Q, its columns in the new order
            for it in range(opts.qr_iterations):
                q = torch.linalg.qr(sq if it == 0 else a @ q + shift * q)[0]
        values = (q * (a @ q)).sum(-2)  # diag(Q^T A Q): column j of Q dotted with (A Q)_j
        w = inverse_power(
            values, exponent=exponent, epsilon=opts.epsilon, rank_tolerance=opts.rank_tolerance
        )
        root = (q * w.unsqueeze(-2)) @ q.mT
        good = torch.isfinite(root).flatten(1).all(1)
        new[f"root_{i}"], new[f"eigenvectors_{i}"] = root, q
        ok = good if ok is None else ok & good
    assert ok is not None
    return new, ok


def install_eigenbases(
    state: TensorDict,
    values: dict[str, torch.Tensor],
    ok: torch.Tensor,
    permutations: dict[int, torch.Tensor],
    keep: torch.Tensor,
    order: int,
) -> torch.Tensor:
    """Installs new eigenvectors (``values``, stored as the state stores them) in the kept
    blocks (``keep``) where ``ok``: the corrected eigenvalues follow ``permutations``, the
    filtered gradient is rotated from the old basis into the new one. Returns which succeeded,
    True for the blocks not kept (they change nothing)."""
    corrected = state["corrected_eigenvalues"]
    take = (ok & keep).view(-1, *([1] * (corrected.dim() - 1)))
    dims = [i for i in range(order) if f"eigenvectors_{i}" in values]
    filtered = state.get("filtered_grad", None)
    if filtered is not None:  # kept in the eigenbasis: the old one, as stored, copied first
        old_q = [
            read(state, f"eigenvectors_{i}", corrected.dtype).clone() if i in dims else None
            for i in range(order)
        ]
    for i, perm in permutations.items():
        # Entry j of dim i follows column perm[j] of the old eigenvectors.
        shape = [1] * corrected.dim()
        shape[0], shape[i + 1] = perm.shape[0], perm.shape[1]
        index = perm.view(shape).expand_as(corrected)
        corrected.copy_(torch.where(take, corrected.gather(i + 1, index), corrected))
    succeeded = keep_successes(state, values, ok, keep)
    if filtered is not None:
        # Into the new basis as it is stored (rounded or quantized), which later steps use.
        new_qt = [
            read(state, f"eigenvectors_{i}", corrected.dtype).mT if i in dims else None
            for i in range(order)
        ]
        wide = filtered.to(corrected.dtype)
        moved = precondition(precondition(wide, old_q), new_qt)
        filtered.copy_(torch.where(take, moved, wide))
    return succeeded
