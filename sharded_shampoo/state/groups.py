"""One param group's state on this rank (``GroupState``): its stacks, the options that shaped
them, its step count, and what every parameter's entry in ``Optimizer.state`` holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..options import GroupOptions
from ..placement.plan import GroupPlan
from .checksums import CHECKSUM
from .pool import StatePool
from .record import blocking_record
from .stacks import GroupBlocks, pool_lengths

__all__ = ["GroupState"]


@dataclass
class GroupState:
    """A param group's blocks this rank owns (views into one pool per dtype), the options that
    shaped them (``structure``: they cannot change), and the group's step count: one CPU tensor,
    held by every parameter's state, as torch keeps optimizer steps."""

    plan: GroupPlan
    pool: StatePool
    blocks: GroupBlocks
    structure: tuple
    step: torch.Tensor

    @classmethod
    def create(cls, plan: GroupPlan, rank: int, opts: GroupOptions, device: torch.device):
        """Allocates exactly this rank's blocks' state (nothing padded)."""
        layouts = plan.layout(rank)
        pool = StatePool(pool_lengths(layouts, opts), device)
        blocks = GroupBlocks(plan.blockings, layouts, opts, pool)
        step = torch.zeros((), dtype=torch.int64, device="cpu")
        return cls(plan, pool, blocks, opts.structure(), step)

    def phases(self, param: int) -> tuple[int, ...] | None:
        """The refresh phases of parameter ``param``'s blocks with ``stagger_roots``."""
        return None if self.plan.phases is None else self.plan.phases[param]

    def param_state(self, param: int, opts: GroupOptions) -> dict[str, Any]:
        """What ``Optimizer.state`` holds for parameter ``param``: views of the blocks this rank
        owns, and, on every rank, its blocking record and the group's step, so that checkpoints
        record both whoever owned what, and a regrouped load finds the step. Each block's
        ``checksum`` is a placeholder here, computed in state dicts (``checksums``): torch's
        state-dict functions keep only the keys the live state has."""
        views = self.blocks.block_views(param)
        slot = torch.zeros(1, dtype=torch.int64, device=self.pool.device)
        return {
            **views,
            **{f"blocks.{bid}.{CHECKSUM}": slot for bid in {k.split(".")[1] for k in views}},
            "blocking": blocking_record(self.blocks.blockings[param], opts, self.phases(param)),
            "step": self.step,
        }
