"""The functional core: one Shampoo step for a stack of same-shape blocks.

Everything here is batched over the leading (block) dim and knows nothing about parameters,
param groups or processes: the same stack gives the same result wherever it is computed.

Nothing here reads a value back to the host in a step without a refresh: which blocks step
(a non-finite gradient skips a block) is a mask on the device (``RowGate``), applied with
per-row constants, so that the decision never waits for the device.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict

from ..options import GroupOptions
from .modes import factored_dims, precondition
from .packing import pack
from .refresh import refresh
from .roots import inverse_power
from .rounding import store_, widened
from .spectral import fixed_norm, muon_multiplier, orthogonalize
from .storage import read

__all__ = ["RowGate", "factor_gram_inputs", "stack_step"]


def factor_gram_inputs(g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``A @ B`` the Gram matrix of the mode-``dim`` unfolding of each block.

    ``g`` is (n, *block_shape). The first and last dims need no copy.
    """
    n, shape = g.shape[0], g.shape[1:]
    m = shape[dim]
    before = math.prod(shape[:dim])
    after = math.prod(shape[dim + 1 :])
    if before == 1:
        a = g.reshape(n, m, after)
        return a, a.mT
    if after == 1:
        a = g.reshape(n, before, m)
        return a.mT, a
    a = g.reshape(n, before, m, after).transpose(1, 2).reshape(n, m, before * after)
    return a, a.mT


class RowGate:
    """Which blocks of a stack step: ``keep`` (n,) bool, on the stack's device. A block not
    kept (its gradient is not finite) leaves its state bitwise unchanged and gets a zero
    direction: its gradient is zeroed, each moving average decays it by 1 instead of beta, and
    its direction is zeroed at the end. All of it on the device, whatever ``keep`` holds, with
    multiplications by 0 or 1 per row (elementwise kernels as cheap as a copy; a broadcast
    ``masked_fill_`` costs several times more on the CPU)."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep
        self.skip = ~keep
        self._ones: dict[torch.dtype, torch.Tensor] = {}

    def _kept(self, like: torch.Tensor) -> torch.Tensor:
        """(n, 1, ..., 1) in ``like``'s dtype: 1 for the kept blocks, 0 for the others."""
        kept = self._ones.get(like.dtype)
        if kept is None:
            kept = self._ones[like.dtype] = self.keep.to(like.dtype)
        return kept.view(-1, *([1] * (like.dim() - 1)))

    def rows(self, value: float, other: float, like: torch.Tensor) -> torch.Tensor:
        """(n, 1, ..., 1) in ``like``'s dtype: ``value`` for the kept blocks, ``other`` for the
        others. Filled on the device (no host-to-device copy)."""
        shape = (self.keep.shape[0],) + (1,) * (like.dim() - 1)
        full = torch.full(shape, value, dtype=like.dtype, device=like.device)
        return full.masked_fill_(self.skip.view(shape), other)

    def zero_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient with the skipped blocks' rows set to 0, in place (theirs may hold NaN,
        Inf or values whose squares overflow; a kept row is finite, so unchanged)."""
        return g.nan_to_num_(0.0, 0.0, 0.0).mul_(self._kept(g))

    def zero_skipped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (finite: computed from the blocks' unchanged state) with the skipped blocks'
        rows set to 0, in place."""
        return x.mul_(self._kept(x))

    def kept(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``x`` where kept, else 0, written into ``out`` (``x`` may be state: left as it is)."""
        return torch.mul(x, self._kept(x), out=out)


def _ema(x: torch.Tensor, beta: float, gate: RowGate) -> torch.Tensor:
    """``x`` multiplied by ``beta`` in the kept rows, in place (``beta == 1``: unchanged)."""
    return x if beta == 1.0 else x.mul_(gate.rows(beta, 1.0, x))


def _update_factors(
    state: TensorDict,
    source: torch.Tensor,
    dims: list[int],
    opts: GroupOptions,
    gate: RowGate,
) -> None:
    """Each factor's EMA with the Gram matrices of ``source`` (zero in the blocks not kept);
    with ``kl_shampoo``, of ``source`` preconditioned along the other dims by their current
    roots (those of the last refresh: this step's comes after)."""
    roots = None
    if opts.kl_shampoo:
        order = source.dim() - 1
        roots = [
            read(state, f"root_{j}", source.dtype) if j in dims else None for j in range(order)
        ]
    for i in dims:
        x = source
        if roots is not None and len(dims) > 1:
            x = precondition(source, [None if j == i else r for j, r in enumerate(roots)])
        _update_factor(state[f"factor_{i}"], x, i, opts.beta2, gate)


def _update_factor(f: torch.Tensor, g: torch.Tensor, dim: int, beta2: float, gate: RowGate) -> None:
    """``f`` (full or packed: ``packing``) <- its EMA with the Gram matrices of ``g``."""
    a, b = factor_gram_inputs(g, dim)  # zero for skipped blocks
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    _ema(f, beta2, gate)
    if f.dim() == 2:  # packed: its Gram's upper triangle
        f.add_(pack(torch.bmm(a, b)).to(f.dtype), alpha=weight)
    elif f.dtype == g.dtype:
        f.baddbmm_(a, b, alpha=weight)
    else:
        f.add_(torch.bmm(a, b).to(f.dtype), alpha=weight)


def _corrected_step(
    state: TensorDict,
    grad: torch.Tensor,
    v: torch.Tensor | None,
    filtered: torch.Tensor | None,
    opts: GroupOptions,
    t: int,
    gate: RowGate,
) -> torch.Tensor:
    """The eigenvalue-corrected direction: the corrected eigenvalues and the filtered gradient
    follow the gradient in the current eigenbasis (the filtered gradient is kept there, and
    re-rotated when the basis changes: ``eigenbasis.refresh_eigenbasis``), Adam's direction is
    taken there and rotated back. Two mode-product chains per step (in, out), a third with
    grafting."""
    order = grad.dim() - 1
    dims = factored_dims(state, order)
    q = [read(state, f"eigenvectors_{i}", grad.dtype) if i in dims else None for i in range(order)]
    rotated = precondition(grad, [None if x is None else x.mT for x in q])
    corrected = state["corrected_eigenvalues"]
    weight = 1.0 if opts.beta2 == 1.0 else 1.0 - opts.beta2
    _ema(corrected, opts.beta2, gate).addcmul_(rotated, rotated, value=weight)
    m = _first_moment(rotated, filtered, opts, t, gate)
    graft = None
    if opts.grafting is not None:
        graft = _grafting_direction(precondition(m, q), v, opts, t)
        if t < opts.first_preconditioned_step or not dims:
            return graft  # before the first refresh, or a block with no factor (diagonal)
    c2 = 1.0 - opts.beta2**t if opts.use_bias_correction and opts.beta2 < 1.0 else 1.0
    exponent = opts.inverse_exponent_override.get(order, 0.5)
    if opts.pseudo_inverse:
        weights = inverse_power(
            (corrected / c2).flatten(1),
            exponent=exponent,
            epsilon=0.0,
            rank_tolerance=opts.rank_tolerance,
            size=max(corrected.shape[1:]),
        )
        d = precondition(m * weights.view_as(m), q)
    else:
        denom = (corrected / c2).pow_(exponent).add_(opts.epsilon)
        d = precondition(m / denom, q)
    if graft is not None:
        _take_norm(d, graft)
    return d


def _first_moment(
    g: torch.Tensor, filtered: torch.Tensor | None, opts: GroupOptions, t: int, gate: RowGate
) -> torch.Tensor:
    """The direction's input: the filtered gradient (its EMA, updated in place in the kept
    blocks, bias-corrected) or ``g`` itself without one; with ``first_moment_nesterov``,
    ``(1 - beta1) g + beta1 m``. May be ``filtered`` itself (then left unchanged after)."""
    if filtered is None:
        return g
    filtered.lerp_(g, gate.rows(1.0 - opts.beta1, 0.0, filtered))
    m = filtered / (1.0 - opts.beta1**t) if opts.use_bias_correction else filtered
    return g.lerp(m, opts.beta1) if opts.first_moment_nesterov else m


def _grafting_direction(
    m: torch.Tensor, v: torch.Tensor | None, opts: GroupOptions, t: int
) -> torch.Tensor:
    if opts.grafting == "sgd":
        return m
    if opts.grafting in ("shape", "rms"):
        return _take_norm(m.clone(), fixed_norm(opts.grafting, tuple(m.shape[1:])))
    assert v is not None
    if opts.grafting == "adam":
        denom = (v / (1.0 - opts.grafting_beta2**t)).sqrt_()
    else:  # rmsprop, adagrad
        denom = v.sqrt()
    return m / denom.add_(opts.grafting_epsilon)


def _spectral_direction(
    m: torch.Tensor, v: torch.Tensor | None, opts: GroupOptions, t: int
) -> torch.Tensor:
    """Muon's: ``m`` orthogonalized, times Muon's multiplier (``grafting`` shape or rms), or
    with the grafting direction's norm (another grafting), or as it is (None)."""
    d = orthogonalize(m, opts.newton_schulz, opts.newton_schulz_steps)
    if opts.grafting in ("shape", "rms"):
        return d.mul_(muon_multiplier(opts.grafting, tuple(m.shape[1:])))
    if opts.grafting is not None:
        _take_norm(d, _grafting_direction(m, v, opts, t))
    return d


def _block_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def _take_norm(d: torch.Tensor, norm: torch.Tensor | float) -> torch.Tensor:
    """``d`` scaled in place so that each block's norm is ``norm``'s (a stack's blocks' norms
    are taken), or ``norm`` (a number)."""
    if isinstance(norm, torch.Tensor):
        norm = _block_norms(norm)
    return d.mul_((norm / (_block_norms(d) + 1e-16)).view(-1, *([1] * (d.dim() - 1))))


def stack_step(
    state: TensorDict,
    grad: torch.Tensor,
    param: torch.Tensor | None,
    opts: GroupOptions,
    t: int,
    keep: torch.Tensor | None = None,
    due: torch.Tensor | bool = False,
    seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 3 to 9 of the algorithm for one stack; returns ``(direction, roots_ok)``.

    ``grad`` (n, *shape) is consumed (it may be modified in place). ``param`` holds the blocks of
    the parameters, needed only with weight decay. ``state`` is updated in place. ``keep``
    (n,) bool on the stack's device: the blocks that step (see ``RowGate``; None: all).
    ``due``: the blocks whose roots are recomputed in this step (``due_rows``): True, False,
    or their indices on the stack's device; ``roots_ok`` then says, per such block, whether
    its roots were computed (True for blocks not kept). ``seeds`` (n,) on the stack's device:
    the blocks' rounding seeds, for moving averages kept in bfloat16 (``rounding``). The
    direction never shares memory with the state.
    """
    order = grad.dim() - 1
    if keep is None:
        keep = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    gate = RowGate(keep)
    wd = opts.weight_decay
    if wd > 0 and not opts.decoupled_weight_decay:
        assert param is not None
        grad.add_(param, alpha=wd)
    gate.zero_gradient(grad)

    dims = factored_dims(state, order)
    f_state = filtered = m = None
    if not opts.eigenvalue_corrected:
        # Before the factors, which may be built from it. (Eigenvalue-corrected: after the
        # refresh, which rotates it into the new eigenbasis: ``_corrected_step``.)
        f_state = state.get("filtered_grad", None)
        filtered = None if f_state is None else widened(f_state, grad.dtype)
        m = _first_moment(grad, filtered, opts, t, gate)
    source = grad
    if opts.factor_source == "first_moment":
        source = gate.kept(m, out=torch.empty_like(m))  # a skipped block's is not zero
    _update_factors(state, source, dims, opts, gate)
    # Moving averages in the math dtype (a copy when kept narrower, stored back below).
    v_state = state.get("graft_v", None)
    v = None if v_state is None else widened(v_state, grad.dtype)
    if opts.grafting in ("adam", "rmsprop"):
        _ema(v, opts.grafting_beta2, gate).addcmul_(grad, grad, value=1.0 - opts.grafting_beta2)
    elif opts.grafting == "adagrad":
        v.addcmul_(grad, grad)
    if v is not None:
        store_(v_state, v, seeds, t)

    roots_ok = None
    if due is True:
        roots_ok = refresh(state, opts, t, order, keep)
    elif due is not False:
        roots_ok = refresh(state, opts, t, order, keep, due)

    if opts.eigenvalue_corrected:
        f_state = state.get("filtered_grad", None)
        filtered = None if f_state is None else widened(f_state, grad.dtype)
        # From step 1 (in the identity basis until the first refresh) unless grafting is on.
        d = _corrected_step(state, grad, v, filtered, opts, t, gate)
    elif opts.preconditioner == "spectral":
        d = _spectral_direction(m, v, opts, t)
    else:
        if t < opts.first_preconditioned_step or not dims:
            # Roots are still the identity, or the block has none (``max_factor_ratio``): the
            # Shampoo direction would be m itself, grafting takes it alone (diagonal).
            d = _grafting_direction(m, v, opts, t) if opts.grafting is not None else m
        else:
            roots = [read(state, f"root_{i}", m.dtype) if i in dims else None for i in range(order)]
            d = precondition(m, roots)
            if opts.grafting is not None:
                _take_norm(d, _grafting_direction(m, v, opts, t))
    if filtered is not None:
        store_(f_state, filtered, seeds, t)
    if d is filtered:
        # Weight decay and the gate below write into d: keep the state out of it.
        d = d.clone()

    if wd > 0 and opts.decoupled_weight_decay:
        assert param is not None
        d.add_(param, alpha=wd)
    gate.zero_skipped(d)
    if opts.momentum > 0:
        buf = state["momentum"]
        _ema(buf, opts.momentum, gate).add_(d, alpha=1.0 - opts.dampening)
        if opts.nesterov:
            gate.zero_skipped(d.add_(buf, alpha=opts.momentum))
        else:
            d = gate.kept(buf, out=d)
    return d, roots_ok
