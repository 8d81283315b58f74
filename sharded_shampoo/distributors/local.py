"""Plain parameters whose blocks this rank computes: gathered into stacks, applied in place."""

from __future__ import annotations

import torch

from ..state import GroupBlocks
from .base import Distributor, StackWork, Step
from .copies import StackCopies

__all__ = ["LocalDistributor"]


class LocalDistributor(Distributor):
    """Every block of the plain parameters is computed here (one process, or every rank of a
    job that does not shard): no communication."""

    def __init__(self, blocks: list[GroupBlocks], device: torch.device) -> None:
        super().__init__(blocks, sharded=False)
        self._copies = {(gi, si): StackCopies(s.layout, device) for gi, si, s in self.stacks}

    def collect(self, step: Step) -> list[StackWork]:
        work = self._stack_work(step, lambda opts: (opts, opts.weight_decay > 0))
        for w in work:
            blockings = self.blocks[w.group].blockings
            params = step.params[w.group]
            copies = self._copies[(w.group, w.stack_index)]
            copies.gather([p.grad for p in params], blockings, w.grad)
            if w.param is not None:
                copies.gather(list(params), blockings, w.param)
        return work

    def apply(self, step: Step) -> None:
        for w in self._work:
            self._copies[(w.group, w.stack_index)].scatter_add_(
                step.params[w.group],
                step.active[w.group],
                self.blocks[w.group].blockings,
                w.direction,
                -step.options[w.group].lr,
            )
