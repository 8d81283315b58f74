"""The functional core: one Shampoo step for a stack of same-shape blocks.

Everything here is batched over the leading (block) dim and knows nothing about parameters,
param groups or processes: the same stack gives the same result wherever it is computed.
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict

from .eigenbasis import refresh_eigenbasis
from .modes import precondition
from .options import GroupOptions
from .roots import inverse_roots, keep_successes

__all__ = ["stack_step", "factor_gram_inputs", "precondition", "refresh_roots"]


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


def _update_factor(f: torch.Tensor, g: torch.Tensor, dim: int, beta2: float) -> None:
    a, b = factor_gram_inputs(g, dim)
    decay, weight = (1.0, 1.0) if beta2 == 1.0 else (beta2, 1.0 - beta2)
    if f.dtype == g.dtype:
        f.baddbmm_(a, b, beta=decay, alpha=weight)
    else:
        gram = torch.bmm(a, b).to(f.dtype)
        if decay != 1.0:
            f.mul_(decay)
        f.add_(gram, alpha=weight)


def refresh_roots(state: TensorDict, opts: GroupOptions, t: int, order: int) -> torch.Tensor:
    """Recomputes every root of the stack; returns which blocks succeeded (n,) bool.

    A block for which any factor's root fails keeps all its previous roots, and its
    ``root_failures`` count goes up; a success resets the count.
    """
    if opts.use_bias_correction and opts.beta2 < 1.0:
        scale = 1.0 / (1.0 - opts.beta2**t)
    else:
        scale = 1.0
    exponent = opts.exponent(order)
    new_roots, ok = [], None
    for i in range(order):
        old = state[f"root_{i}"]
        r, good = inverse_roots(
            state[f"factor_{i}"],
            scale=scale,
            epsilon=opts.epsilon,
            exponent=exponent,
            out_dtype=old.dtype,
        )
        new_roots.append(r)
        ok = good if ok is None else ok & good
    assert ok is not None
    keep_successes(state, "root", new_roots, ok)
    return ok


def _refresh(state: TensorDict, opts: GroupOptions, t: int, order: int) -> torch.Tensor:
    """Roots, or eigenvectors with the eigenvalue-corrected preconditioner, of every block."""
    if opts.eigenvalue_corrected:
        return refresh_eigenbasis(state, opts, order)
    return refresh_roots(state, opts, t, order)


def _refresh_rows(
    state: TensorDict, opts: GroupOptions, t: int, order: int, rows: torch.Tensor
) -> torch.Tensor:
    """``_refresh`` for the blocks ``rows`` only (one batched decomposition per dim)."""
    changed = [f"{opts.basis}_{i}" for i in range(order)] + ["root_failures"]
    if opts.eigenvalue_corrected:
        changed.append("corrected_eigenvalues")
        if "filtered_grad" in state.keys():
            changed.append("filtered_grad")  # kept in the eigenbasis
    idx = rows.to(state.device) if state.device is not None else rows
    sub = state.select(*[f"factor_{i}" for i in range(order)], *changed)[idx]
    ok = _refresh(sub, opts, t, order)
    for key in changed:
        state[key][idx] = sub[key]
    return ok


def _corrected_step(
    state: TensorDict, grad: torch.Tensor, v: torch.Tensor | None, opts: GroupOptions, t: int
) -> torch.Tensor:
    """The eigenvalue-corrected direction: the corrected eigenvalues and the filtered gradient
    follow the gradient in the current eigenbasis (the filtered gradient is kept there, and
    re-rotated when the basis changes: ``eigenbasis.refresh_eigenbasis``), Adam's direction is
    taken there and rotated back. Two mode-product chains per step (in, out), a third with
    grafting."""
    order = grad.dim() - 1
    q = [state[f"eigenvectors_{i}"] for i in range(order)]
    rotated = precondition(grad, [x.mT for x in q])
    corrected = state["corrected_eigenvalues"]
    if opts.beta2 == 1.0:
        corrected.addcmul_(rotated, rotated)
    else:
        corrected.mul_(opts.beta2).addcmul_(rotated, rotated, value=1.0 - opts.beta2)
    filtered = state.get("filtered_grad", None)
    if filtered is not None:
        filtered.lerp_(rotated, 1.0 - opts.beta1)
        m = filtered / (1.0 - opts.beta1**t) if opts.use_bias_correction else filtered
    else:
        m = rotated
    graft = None
    if opts.grafting is not None:
        graft = _grafting_direction(precondition(m, q), v, opts, t)
        if t < opts.start_preconditioning_step:
            return graft
    c2 = 1.0 - opts.beta2**t if opts.use_bias_correction and opts.beta2 < 1.0 else 1.0
    exponent = opts.inverse_exponent_override.get(order, 0.5)
    denom = (corrected / c2).pow_(exponent).add_(opts.epsilon)
    d = precondition(m / denom, q)
    if graft is not None:
        d.mul_((_block_norms(graft) / (_block_norms(d) + 1e-16)).view(-1, *([1] * order)))
    return d


def _grafting_direction(
    m: torch.Tensor, v: torch.Tensor | None, opts: GroupOptions, t: int
) -> torch.Tensor:
    if opts.grafting == "sgd":
        return m
    assert v is not None
    if opts.grafting == "adam":
        denom = (v / (1.0 - opts.grafting_beta2**t)).sqrt_()
    else:  # rmsprop, adagrad
        denom = v.sqrt()
    return m / denom.add_(opts.grafting_epsilon)


def _block_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def stack_step(
    state: TensorDict,
    grad: torch.Tensor,
    param: torch.Tensor | None,
    opts: GroupOptions,
    t: int,
    phases: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Steps 3 to 9 of the algorithm for one stack; returns ``(direction, roots_ok, rows)``.

    ``grad`` (n, *shape) is consumed (it may be modified in place). ``param`` holds the blocks of
    the parameters, needed only with weight decay. ``state`` is updated in place. ``phases``
    (n,) on the CPU: each block's phase with ``stagger_roots`` (roots at ``start``, then at the
    steps ``t > start`` with ``t % precondition_frequency == phase``). ``roots_ok`` says which of the
    blocks ``rows`` (CPU indices) computed roots in this step, if any did. The direction may
    share memory with the state.
    """
    order = grad.dim() - 1
    wd = opts.weight_decay
    if wd > 0 and not opts.decoupled_weight_decay:
        assert param is not None
        grad.add_(param, alpha=wd)

    for i in range(order):
        _update_factor(state[f"factor_{i}"], grad, i, opts.beta2)
    v = state.get("graft_v", None)
    if opts.grafting in ("adam", "rmsprop"):
        v.mul_(opts.grafting_beta2).addcmul_(grad, grad, value=1.0 - opts.grafting_beta2)
    elif opts.grafting == "adagrad":
        v.addcmul_(grad, grad)

    start = opts.start_preconditioning_step
    roots_ok, due = None, None
    if phases is None or t == start:
        # Every block at the start (staggered too: no block waits for its phase to be
        # preconditioned), and every f steps after it without staggering.
        if opts.is_amortized_step(t):
            due = torch.arange(grad.shape[0])
            roots_ok = _refresh(state, opts, t, order)
    elif t > start:  # staggered: the blocks whose phase this step is
        due = (phases == t % opts.precondition_frequency).nonzero().flatten()
        if due.numel():
            roots_ok = _refresh_rows(state, opts, t, order, due)
        else:
            due = None

    filtered = state.get("filtered_grad", None)
    if opts.eigenvalue_corrected:
        # From step 1 (in the identity basis until the first refresh) unless grafting is on.
        d = _corrected_step(state, grad, v, opts, t)
    else:
        if filtered is not None:
            filtered.lerp_(grad, 1.0 - opts.beta1)
            m = filtered / (1.0 - opts.beta1**t) if opts.use_bias_correction else filtered
        else:
            m = grad
        if t < start:
            # Roots are still the identity: the Shampoo direction would be m itself.
            d = _grafting_direction(m, v, opts, t) if opts.grafting is not None else m
        else:
            d = precondition(m, [state[f"root_{i}"] for i in range(order)])
            if opts.grafting is not None:
                graft = _grafting_direction(m, v, opts, t)
                scale = _block_norms(graft) / (_block_norms(d) + 1e-16)
                d.mul_(scale.view(-1, *([1] * order)))
    if d is filtered:
        # Weight decay and momentum below write into d: keep the state out of it.
        d = d.clone()

    if wd > 0 and opts.decoupled_weight_decay:
        assert param is not None
        d.add_(param, alpha=wd)
    if opts.momentum > 0:
        buf = state["momentum"]
        buf.mul_(opts.momentum).add_(d, alpha=1.0 - opts.dampening)
        d = d.add_(buf, alpha=opts.momentum) if opts.nesterov else buf
    return d, roots_ok, due
