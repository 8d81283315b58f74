"""The interface every distributor implements, and what a step hands them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import GroupOptions
from ..state import BlockStack, GroupBlocks, RowSelection
from ..status import Status

__all__ = ["Distributor", "StackWork", "Step"]


@dataclass
class Step:
    """What one step fixes before the math, the same for every distributor."""

    params: list[list[torch.Tensor]]  # every group's parameters
    options: dict[int, GroupOptions]  # per stepping group (one with a gradient): its options
    active: dict[int, list[bool]]  # per stepping group: which of its parameters have a gradient
    digest: int  # 32 bits of the above, compared across ranks in the status words


@dataclass
class StackWork:
    """One stack's part in one step: its gradient (and weight) rows in, its direction out."""

    group: int
    stack_index: int
    opts: GroupOptions  # what the math runs with (a distributor may apply weight decay itself)
    stack: BlockStack
    grad: torch.Tensor  # (rows, *block_shape) in the math dtype; consumed by the math
    param: torch.Tensor | None  # the blocks' weights, when the math needs them
    rows: RowSelection | None  # the rows of parameters with a gradient; None: all
    # Per row, on the device: the gradient's norm (NaN or Inf: skipped), and whether the row
    # steps (finite, or not of an active parameter: such rows are not computed at all).
    norms: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    direction: torch.Tensor | None = None


class Distributor:
    """Moves one kind of parameter's gradients into stacks and directions back.

    ``collect(step)`` returns the work of the stacks with something to compute, in the order
    to compute it; before the math of one the optimizer calls ``arrive(work)`` (its gradient
    buffer is then filled), after it ``computed(work)`` (its ``direction`` is set), so that
    communication can overlap the math of other stacks, and ``flush()`` after the last.
    ``exchange(step, failed)`` shares the last directions (``failed``: this rank hit an error
    it will raise) and returns what the status words said as a summary on the device, ``(any
    rank failed, ranks disagree)`` (None without collectives): the optimizer reads every
    summary in the step's one host read, and ``status(summary)`` turns this distributor's into
    a ``Status`` (naming ranks takes a second read, only when something went wrong).
    ``apply(step)`` updates the parameters, called only when no distributor's exchange
    reported a problem.
    ``collective`` distributors take collectives in ``collect`` and ``exchange`` on every step,
    whatever happens, so that no rank waits alone.
    """

    collective = False
    # The process group of the exchanges (None: the default group), where the ranks that saw a
    # failure in the status words gather its message.
    group = None
    # Whether the gradient and weight stacks live between steps: the all_to_all exchange keeps
    # views into them; the others allocate them per step (not kept between steps, so not
    # counted as optimizer memory; a caching allocator hands the same blocks back).
    persistent_stacks = False

    def __init__(self, blocks: list[GroupBlocks], sharded: bool) -> None:
        # (group, stack index, stack) of the stacks this distributor serves.
        self.stacks = [
            (gi, si, stack)
            for gi, group in enumerate(blocks)
            for si, stack in enumerate(group.stacks)
            if stack.layout.sharded == sharded
        ]
        self.blocks = blocks
        self._grads: dict[tuple[int, int], torch.Tensor] = {}
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self._work: list[StackWork] = []

    def collect(self, step: Step) -> list[StackWork]:
        raise NotImplementedError

    def arrive(self, work: StackWork) -> None:
        """Makes sure ``work``'s gradient buffer is filled."""

    def computed(self, work: StackWork) -> None:
        """``work.direction`` is ready."""

    def flush(self) -> None:
        """Every stack of this distributor is computed (on this rank): the communication it
        could start before ``exchange`` starts now. Called in distributor order, so that
        every rank issues the same collectives in the same order, whatever it computed."""

    def exchange(self, step: Step, failed: bool) -> torch.Tensor | None:
        return None

    def status(self, summary: list[float]) -> Status:
        return Status()

    def apply(self, step: Step) -> None:
        raise NotImplementedError

    def bytes_sent_per_step(self) -> int:
        return 0

    def release(self) -> None:
        """Forgets the step's work (its directions, and its stacks unless persistent), at the
        end of every step."""
        self._work = []
        if not self.persistent_stacks:
            self._grads.clear()
            self._weights.clear()

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        """The large tensors this distributor keeps between steps, by name (for
        ``memory_report``; small index tensors are found there by walking)."""
        return {
            "gradient stacks": list(self._grads.values()),
            "weight stacks": list(self._weights.values()),
        }

    def _buffer(self, store: dict, gi: int, si: int, stack: BlockStack) -> torch.Tensor:
        buf = store.get((gi, si))
        if buf is None:
            buf = store[(gi, si)] = torch.empty(
                (stack.num_rows, *stack.block_shape), dtype=stack.dtype, device=stack.device
            )
        return buf

    def _stack_work(self, step: Step, math_options) -> list[StackWork]:
        """A StackWork for every stack with rows of active parameters; ``math_options(opts)``
        gives (the options the math runs with, whether it needs the weights)."""
        work = []
        for gi, si, stack in self.stacks:
            active = step.active.get(gi)
            if active is None:
                continue
            rows = stack.select(active)
            if rows is not None and rows.host.numel() == 0:
                continue
            opts, needs_weights = math_options(step.options[gi])
            grad = self._buffer(self._grads, gi, si, stack)
            param = self._buffer(self._weights, gi, si, stack) if needs_weights else None
            work.append(StackWork(gi, si, opts, stack, grad, param, rows))
        self._work = work
        return work
