"""One step's math on this rank's stacks: for each, which rows step (``gate``), then its update
(``compute``). Between the distributors' ``collect`` and ``exchange``; nothing here is read back
from the device, except in steps that refresh roots."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .algorithm import due_rows, stack_step
from .diagnostics import (
    BlockNamer,
    NonFiniteGradientWarning,
    ParamNamer,
    warn,
)
from .distributors import Distributor, StackWork, Step
from .options import GroupOptions
from .refreshes import Refreshes, check_roots
from .state import Rows
from .status import step_digest

__all__ = ["begin_step", "compute", "gate", "warn_skipped"]


def begin_step(
    param_groups: list[dict[str, Any]],
    options: Callable[[int], GroupOptions],
    collective: bool,
    name: ParamNamer,
) -> tuple[Step | None, ValueError | None]:
    """This step's options (``options(group)``, checked) and active parameters; None when
    there is nothing to do and no collective to take.

    With collectives every rank takes this step's, whatever happens on it (bad options, no
    gradients): a rank that raised or returned alone would leave the others waiting. Its error
    is returned instead, rides the status words, and every rank raises.
    """
    chosen: dict[int, GroupOptions] = {}
    active: dict[int, list[bool]] = {}
    invalid = None
    try:
        for gi, group in enumerate(param_groups):
            opts = options(gi)
            grads = [p.grad for p in group["params"]]
            for pi, g in enumerate(grads):
                if g is not None and g.is_sparse:
                    raise ValueError(
                        f"ShardedShampoo does not support sparse gradients ({name(gi, pi)})"
                    )
            if any(g is not None for g in grads):
                chosen[gi], active[gi] = opts, [g is not None for g in grads]
    except ValueError as e:
        if not collective:
            raise
        invalid, chosen, active = e, {}, {}
    if not active and not collective:
        return None, None
    digest = (
        step_digest(
            [
                (gi, chosen[gi].fields_text(), param_groups[gi]["step"], tuple(flags))
                for gi, flags in active.items()
            ]
        )
        if collective
        else 0
    )
    return Step([g["params"] for g in param_groups], chosen, active, digest), invalid


def gate(w: StackWork) -> None:
    """Which rows of the stack step (``StackWork.keep``, on the device): those whose
    gradient's norm is finite (no NaN or Inf, and a square that does not overflow its dtype);
    rows of parameters without a gradient count as kept (they are not computed at all)."""
    w.norms = torch.linalg.vector_norm(w.grad.flatten(1), dim=1)
    finite = torch.isfinite(w.norms)
    w.keep = finite if w.rows is None else finite | ~w.rows.mask


def compute(
    collected: list[tuple[Distributor, list[StackWork]]],
    steps: list[int],
    name: BlockNamer,
    refreshes: Refreshes,
    crash: Exception | None = None,
) -> tuple[str | None, Exception | None]:
    """The math, distributor by distributor, stack by stack in each one's order, at each
    group's next step (``steps[group] + 1``): each stack's gradient is waited for (``arrive``),
    gated (``gate``) and computed, and its distributor told (``computed``, then ``flush``
    after its last). With ``refresh_delay`` the refreshes due are started in the background
    (``refreshes``) instead of computed in the step.

    Returns the error to raise (roots that kept failing) and the exception the math raised, if
    any (``crash``: also one raised before, installing refreshes). Once one is raised, the
    remaining stacks are not computed but still handed to their distributor, so that this rank
    takes every collective of the step as the others do and tells them in the status words."""
    error = None
    for distributor, work in collected:
        for w in work:
            distributor.arrive(w)
            if crash is None:
                try:
                    gate(w)
                    error = _compute(w, steps[w.group] + 1, name, refreshes) or error
                except Exception as e:  # noqa: BLE001 - every rank raises it after the exchange
                    crash = e
            if crash is not None:  # nothing is applied: any direction will do
                w.keep = torch.ones(w.stack.num_rows, dtype=torch.bool, device=w.grad.device)
                w.direction = w.grad
            distributor.computed(w)
        distributor.flush()
    return error, crash


def _compute(w: StackWork, t: int, name: BlockNamer, refreshes: Refreshes) -> str | None:
    """One stack's math at step ``t``; returns the error to raise, if any."""
    stack, rows = w.stack, w.rows
    due = _due(w, t)
    delayed = w.opts.refresh_delay > 0 and due is not False
    index = due.index if isinstance(due, Rows) else due
    # Rounding seeds only where a moving average is kept in bfloat16.
    rounded = w.opts.grafting_dtype is not None or w.opts.first_moment_dtype is not None
    seeds = stack.seeds if rounded else None
    if rows is None:
        w.direction, ok = stack_step(
            stack.working, w.grad, w.param, w.opts, t, w.keep, False if delayed else index, seeds
        )
    else:
        w.direction = torch.zeros_like(w.grad)
        sub = stack.working[rows.index]
        w.direction[rows.index], ok = stack_step(
            sub,
            w.grad[rows.index],
            None if w.param is None else w.param[rows.index],
            w.opts,
            t,
            w.keep[rows.index],
            False if delayed else index,
            None if seeds is None else seeds[rows.index],
        )
        stack.working[rows.index] = sub
    if delayed:
        refreshes.launch(w.group, stack, w.opts, t, _stack_rows(due, rows), w.keep)
    if ok is None:
        return None
    if isinstance(due, Rows):
        named = due.host
    else:
        named = torch.arange(stack.num_rows, device="cpu") if rows is None else rows.host
    return check_roots(w.group, w.opts, stack, ok, named, name, t)


def _stack_rows(due: Rows | bool, rows: Rows | None) -> Rows | None:
    """The rows of the stack that ``due`` (of the selected ``rows``) names; None: all."""
    if due is True:
        return rows
    assert isinstance(due, Rows)
    return due if rows is None else Rows(rows.index[due.index], due.host)


def _due(w: StackWork, t: int) -> Rows | bool:
    """The rows of ``w`` (of its selected rows) whose roots are refreshed at step ``t``: True
    or False for all or none (``algorithm.due_rows``), or ``Rows``. Staggered roots' due rows
    are computed once per (active rows, phase)."""
    stack, rows, opts = w.stack, w.rows, w.opts
    phases = stack.phases
    if phases is None or t <= opts.start_preconditioning_step:
        return due_rows(opts, t, phases)

    def make():
        due = due_rows(opts, t, phases if rows is None else phases[rows.host])
        if due is False:
            return False
        return Rows(due.to(stack.device), due if rows is None else rows.host[due])

    key = ("due", None if rows is None else rows.key, t % opts.precondition_frequency)
    return stack.cached(key, make)


def warn_skipped(w: StackWork, name: BlockNamer, step: int) -> None:
    """Warns about the blocks of ``w`` skipped for a non-finite (or too large) gradient. A slow
    path, taken only when the step's host read said some block was: it reads the step's
    per-block masks and norms back."""
    bad = (~w.keep).cpu()
    norms = w.norms.cpu()
    for r in bad.nonzero().flatten().tolist():
        pi, bid = w.stack.row_owner[r]
        if math.isnan(float(norms[r])):
            what = "a non-finite gradient (NaN or Inf)"
        else:  # no NaN, yet the norm is infinite: the block's factor would become infinite
            what = f"an infinite gradient, or one too large for its squared norm in {w.grad.dtype}"
        warn(
            NonFiniteGradientWarning(
                f"{what} in {name(w.group, pi, bid)}: the block is skipped in this step"
            ),
            step,
        )
