"""Where communication happens: the plan check at construction and the per-step AllGather.

Per step the optimizer adds exactly one collective: every rank writes the search directions of
the blocks it owns into its piece of a flat buffer (in ``communication_dtype``), and one
``Shard(0) -> Replicate()`` redistribution of that buffer, an AllGather, hands every rank every
direction. Every rank, the owner included, then applies the gathered values, so replicas stay
bitwise identical whatever the communication dtype.

The last element of each rank's piece is a status word: a rank that hits an error it must raise
(a block whose roots failed too often) says so there, and after the AllGather every rank raises,
instead of the failing rank leaving the others waiting in a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .placement.layout import StackLayout
from .placement.plan import Plan

__all__ = ["DirectionExchange", "check_plan_agreement", "PlanMismatchError"]


class PlanMismatchError(ValueError):
    """Ranks built different plans (different models or options)."""


class DirectionExchange:
    """The flat direction buffer of one rank, and the AllGather over the mesh."""

    def __init__(self, plan: Plan, rank: int, mesh, dtype: torch.dtype, device: torch.device):
        self.mesh = mesh
        self.rank = rank
        self.dtype = dtype
        # segments[r]: (group index, stack index, layout, start) for each stack of rank r.
        self.segments: list[list[tuple[int, int, StackLayout, int]]] = []
        longest = 0
        for r in range(plan.world_size):
            start, segs = 0, []
            for gi, group in enumerate(plan.groups):
                for si, layout in enumerate(group.layouts[r]):
                    segs.append((gi, si, layout, start))
                    start += layout.num_rows * layout.row_numel
            self.segments.append(segs)
            longest = max(longest, start)
        self.status_index = longest
        self.local = torch.zeros(longest + 1, dtype=dtype, device=device)
        self._slots = {
            (gi, si): self.local[start : start + lay.num_rows * lay.row_numel].view(
                lay.num_rows, *lay.block_shape
            )
            for gi, si, lay, start in self.segments[rank]
        }

    def slot(self, group: int, stack: int) -> torch.Tensor:
        """Where this rank writes the directions of one of its stacks."""
        return self._slots[(group, stack)]

    @property
    def bytes_sent_per_step(self) -> int:
        """What this rank sends in one ring AllGather: its piece to each of the others."""
        return (self.mesh.size() - 1) * self.local.numel() * self.local.element_size()

    def exchange(self, failed: bool) -> torch.Tensor:
        """AllGathers every rank's piece; returns them as (world_size, piece length)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        self.local[self.status_index] = 1.0 if failed else 0.0
        world = self.mesh.size()
        piece = DTensor.from_local(
            self.local, self.mesh, [Shard(0)], run_check=False,
            shape=(world * self.local.numel(),), stride=(1,),
        )
        return piece.redistribute(self.mesh, [Replicate()]).to_local().view(world, -1)

    def failed_ranks(self, gathered: torch.Tensor) -> list[int]:
        return (gathered[:, self.status_index] != 0).nonzero().flatten().tolist()

    def rows_of(self, gathered: torch.Tensor, rank: int):
        """(group index, layout, rows) for each stack of ``rank`` in the gathered buffer."""
        piece = gathered[rank]
        for gi, _, lay, start in self.segments[rank]:
            n = lay.num_rows * lay.row_numel
            yield gi, lay, piece[start : start + n].view(lay.num_rows, *lay.block_shape)


def check_plan_agreement(
    mesh, fingerprints: list[str], descriptions: list[str], owners: str
) -> None:
    """One collective: every rank learns every rank's plan; on a mismatch all of them raise
    the same PlanMismatchError naming the first parameter that differs."""
    group = mesh.get_group()
    world = mesh.size()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (fingerprints, descriptions, owners), group=group)
    longest = max(len(f) for f, _, _ in everyone)
    for i in range(longest):
        seen = {f[i] if i < len(f) else None for f, _, _ in everyone}
        if len(seen) > 1:
            per_rank = "; ".join(
                f"rank {r}: {d[i] if i < len(d) else 'no such parameter'}"
                for r, (_, d, _) in enumerate(everyone)
            )
            raise PlanMismatchError(
                f"ranks built different optimizers: parameter #{i} differs ({per_rank}). "
                "Every rank must construct ShardedShampoo with the same parameters (shapes, "
                "dtypes, order) and the same options."
            )
    if len({o for _, _, o in everyone}) > 1:
        raise PlanMismatchError(
            "ranks computed different block placements from the same parameters; "
            "this is a bug in the planner's determinism"
        )
