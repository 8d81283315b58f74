"""Plain parameters every rank holds whole (DDP): one owner per block, an AllGather per step.

Every rank writes the directions of the blocks it owns into its piece of a flat buffer (in
``communication_dtype``), and a ``Shard(0) -> Replicate()`` redistribution of that buffer, an
AllGather, hands every rank every direction. Every rank, the owner included, then applies the
gathered values, so replicas stay bitwise identical whatever the communication dtype. Each
piece ends with status words (``communication``): an error on one rank, or ranks stepping with
different options, reaches every rank in the same collective, and every rank raises.

The AllGather is issued in ``exchange_buckets`` asynchronous parts, slices of equal length of
every rank's piece (no padding beyond the one AllGather's): a slice leaves as soon as the
stacks it holds are computed on this rank, while later stacks compute; the last, with the
status words, once all the math is done. Every rank's slices land where the one AllGather
would put them, so the result is bitwise the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..placement import Plan
from ..placement.routes import allgather_segments
from ..state import GroupBlocks
from ..status import FAILED, STATUS_WORDS, Status, StatusWords, read_status
from .base import StackWork, Step
from .copies import StackCopies
from .local import LocalDistributor

__all__ = ["ReplicatedDistributor"]


class ReplicatedDistributor(LocalDistributor):
    """Gathers gradients into the stacks as ``LocalDistributor`` does (every rank has them
    all); shares the directions by AllGather over ``mesh`` (the ranks blocks are sharded over)."""

    collective = True

    def __init__(
        self,
        blocks: list[GroupBlocks],
        plan: Plan,
        rank: int,
        mesh,
        dtype: torch.dtype,
        device: torch.device,
        buckets: int = 1,
    ) -> None:
        super().__init__(blocks, device)
        self.mesh = mesh
        self.group = mesh.get_group()
        # Every rank's stacks and their copies to the parameters, on this rank's device: every
        # rank applies every rank's directions.
        self.segments = [
            [(gi, si, layout, start, StackCopies(layout, device)) for gi, si, layout, start in segs]
            for segs in allgather_segments(plan)
        ]
        longest = max(
            (
                start + lay.num_rows * lay.row_numel
                for segs in self.segments
                for _, _, lay, start, _ in segs
            ),
            default=0,
        )
        self.status_index = longest
        self.local = torch.zeros(longest + STATUS_WORDS, dtype=dtype, device=device)
        self.gathered = torch.zeros(mesh.size(), self.local.numel(), dtype=dtype, device=device)
        self._words = StatusWords(dtype, device)
        self._differs: torch.Tensor | None = None
        self._slots = {
            (gi, si): self.local[start : start + lay.num_rows * lay.row_numel].view(
                lay.num_rows, *lay.block_shape
            )
            for gi, si, lay, start, _ in self.segments[rank]
        }
        # The AllGather's slices of each piece, and where this rank's stacks start in its
        # piece (in layout order, the order they are computed in).
        total, count = self.local.numel(), max(1, min(buckets, self.local.numel()))
        self._slices = [(b * total // count, (b + 1) * total // count) for b in range(count)]
        self._starts = [(start, (gi, si)) for gi, si, _, start, _ in self.segments[rank]]
        self._computing: set[tuple[int, int]] = set()  # this step's stacks not computed yet
        self._handles: list = []

    def bytes_sent_per_step(self) -> int:
        """What this rank sends in one ring AllGather: its piece to each of the others."""
        return (self.mesh.size() - 1) * self.local.numel() * self.local.element_size()

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        return {**super().buffers(), "allgather": [self.local, self.gathered]}

    def collect(self, step: Step) -> list[StackWork]:
        work = super().collect(step)
        self._computing = {(w.group, w.stack_index) for w in work}
        self._handles = []
        return work

    def computed(self, w: StackWork) -> None:
        self._slots[(w.group, w.stack_index)].copy_(w.direction)
        self._computing.discard((w.group, w.stack_index))
        self._gather_ready(flush=False)

    def flush(self) -> None:
        self._gather_ready(flush=True)

    def _gather_ready(self, flush: bool) -> None:
        """Starts, in order, the AllGathers of the slices whose stacks are computed (all with
        ``flush``), but those holding status words (written in ``exchange``)."""
        ready = self.status_index  # up to the first stack still computing
        if not flush:
            ready = next((a for a, key in self._starts if key in self._computing), ready)
        while len(self._handles) < len(self._slices):
            lo, hi = self._slices[len(self._handles)]
            if hi > ready:
                break
            self._handles.append(self._gather(lo, hi))

    def _gather(self, lo: int, hi: int):
        """Starts the AllGather of elements ``[lo, hi)`` of every rank's piece, into place.
        (The pieces are the local shards of a Shard(0) DTensor over the mesh; this is its
        redistribution to Replicate(), into a buffer allocated once.)"""
        if len(self._slices) == 1:
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            return gather(self.gathered.view(-1), self.local, group=self.group, async_op=True)
        out = [self.gathered[r, lo:hi] for r in range(self.gathered.shape[0])]
        return dist.all_gather(out, self.local[lo:hi], group=self.group, async_op=True)

    def exchange(self, step: Step, failed: bool) -> torch.Tensor:
        mine = self._words.write(FAILED if failed else 0, step.digest)
        self.local[self.status_index :].copy_(mine)
        while len(self._handles) < len(self._slices):
            self._handles.append(self._gather(*self._slices[len(self._handles)]))
        self._wait()
        words = self.gathered[:, self.status_index :]
        # Whose digest differs from rank 0's: kept on the device, read only when the summary
        # says some does.
        failed = read_status(words, mine)[:, 0].any()
        self._differs = (words[:, 1:] != words[0, 1:]).any(1)
        return torch.stack([failed, self._differs.any()])

    def _wait(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            if h is not None:
                h.wait()

    def release(self) -> None:
        self._wait()  # nothing may still be writing into the buffers (a step that raised)
        super().release()

    def status(self, summary: list[float]) -> Status:
        differing = self._differs.nonzero().flatten().tolist() if summary[1] else False
        return Status(bool(summary[0]), differing)

    def apply(self, step: Step) -> None:
        for r, segs in enumerate(self.segments):
            piece = self.gathered[r]
            for gi, _, layout, start, copies in segs:
                if gi not in step.active:
                    continue
                n = layout.num_rows * layout.row_numel
                rows = piece[start : start + n].view(layout.num_rows, *layout.block_shape)
                copies.scatter_add_(
                    step.params[gi],
                    step.active[gi],
                    self.blocks[gi].blockings,
                    rows,
                    -step.options[gi].lr,
                )
