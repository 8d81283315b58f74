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

__all__ = [
    "DirectionExchange",
    "PlanMismatchError",
    "RowShardedExchange",
    "check_plan_agreement",
]


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
                    if layout.row_sharded:  # these go by RowShardedExchange
                        continue
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


class RowShardedExchange:
    """Moves rows of row-sharded (FSDP2, HSDP) parameters between shard holders and block owners.

    Two ``all_to_all_single`` calls per step, over the default process group:

    1. gradient rows (and weight rows, when weight decay needs them) from the rank holding them
       to the block's owner. Under HSDP the source is the holder in the owner's replicate group.
    2. direction rows (in ``communication_dtype``) from the owner to every rank holding those
       rows (one per replicate group). Owners round their own rows through the same dtype, so
       every holder of a row applies the same value.

    gloo's all_to_all needs equal split sizes, so every (source, destination) chunk is padded to
    the largest. Each rank derives every chunk's layout (which piece at which offset) from the
    plan, in canonical order, so no sizes are exchanged. A status word ends each chunk of the
    second call, for the same purpose as in DirectionExchange.
    """

    def __init__(
        self,
        plan: Plan,
        rank: int,
        coords: dict[int, tuple[int, int]],
        dtype: torch.dtype,
        grad_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        from .placement.sharding import block_pieces

        self.rank = rank
        self.world = plan.world_size
        self.dtype = dtype
        self.grad_dtype = grad_dtype
        self.device = device
        holders = plan.shard_holders
        # (group, param, block, piece, elements)
        self.incoming: list[tuple] = []  # gradient pieces of my blocks: (src, offset, ...)
        self.outgoing: list[tuple] = []  # gradient pieces I hold for others: (dst, offset, ...)
        self.updates_out: list[tuple] = []  # direction pieces of my blocks: (dst, offset, ...)
        self.updates_in: list[tuple] = []  # direction pieces for my rows: (src, offset, ...)
        grad_used: dict[tuple[int, int], int] = {}
        upd_used: dict[tuple[int, int], int] = {}
        self.params: set[tuple[int, int]] = set()
        for gi, group in enumerate(plan.groups):
            for pi, blocking in enumerate(group.blockings):
                sharding = group.spec.sharding(pi)
                if sharding is None:
                    continue
                self.params.add((gi, pi))
                trailing = 1
                for d in blocking.merged[1:]:
                    trailing *= d
                for bid, pieces in enumerate(block_pieces(blocking, sharding)):
                    owner = group.owners[pi][bid]
                    cols = 1
                    for d in blocking.block_shape(bid)[1:]:
                        cols *= d
                    for piece in pieces:
                        n = piece.rows * cols
                        src = holders[piece.shard][coords[owner][0]]
                        off = grad_used.get((src, owner), 0)
                        grad_used[(src, owner)] = off + n
                        entry = (gi, pi, bid, piece, n)
                        if owner == rank:
                            self.incoming.append((src, off, *entry))
                        if src == rank:
                            self.outgoing.append((owner, off, *entry))
                        for dst in holders[piece.shard]:
                            # One more element: 1 if the block was updated, 0 if skipped.
                            off = upd_used.get((owner, dst), 0)
                            upd_used[(owner, dst)] = off + n + 1
                            if owner == rank:
                                self.updates_out.append((dst, off, *entry))
                            if dst == rank:
                                self.updates_in.append((owner, off, *entry))
        # Chunks to oneself are never sent: only pairs between different ranks set the size.
        self.grad_chunk = max([n for (a, b), n in grad_used.items() if a != b], default=0)
        self.update_chunk = max([n for (a, b), n in upd_used.items() if a != b], default=0) + 1

    def bytes_sent_per_step(self, with_weights: bool) -> int:
        g = self.grad_chunk * (2 if with_weights else 1) * _itemsize(self.grad_dtype)
        u = self.update_chunk * _itemsize(self.dtype)
        return (self.world - 1) * (g + u)

    def collect(self, fetch_rows, store_rows, with_weights: bool) -> None:
        """Sends my gradient (and weight) rows to their blocks' owners; stores what I receive.

        ``fetch_rows(gi, pi, bid, piece, weights)`` returns my rows of a block (or None when the
        parameter has no gradient); ``store_rows(gi, pi, bid, piece, rows, weights)`` puts a
        piece of one of my blocks into its stack.
        """
        chunk = self.grad_chunk * (2 if with_weights else 1)
        send = torch.zeros(self.world, chunk, dtype=self.grad_dtype, device=self.device)
        sections = (False, True) if with_weights else (False,)
        for dst, off, gi, pi, bid, piece, n in self.outgoing:
            for weights in sections:
                rows = fetch_rows(gi, pi, bid, piece, weights)
                if rows is None:
                    continue
                if dst == self.rank:
                    store_rows(gi, pi, bid, piece, rows, weights)
                else:
                    start = off + (self.grad_chunk if weights else 0)
                    send[dst, start : start + n] = rows.reshape(-1)
        recv = self._all_to_all(send)
        for src, off, gi, pi, bid, piece, n in self.incoming:
            if src == self.rank:
                continue
            for weights in sections:
                start = off + (self.grad_chunk if weights else 0)
                store_rows(gi, pi, bid, piece, recv[src, start : start + n], weights)

    def distribute(self, direction_rows, apply_rows, failed: bool) -> list[int]:
        """Sends the direction rows of my blocks to the ranks holding them, applies those I
        receive (and my own); returns the ranks that reported a failure (then nothing is
        applied).

        ``direction_rows(gi, pi, bid, piece)`` gives ``(rows, updated)`` or None when the
        parameter has no gradient; ``apply_rows(gi, pi, bid, piece, rows)`` is called for the
        pieces of blocks that were updated (not skipped for a non-finite gradient).
        """
        send = torch.zeros(self.world, self.update_chunk, dtype=self.dtype, device=self.device)
        send[:, -1] = 1.0 if failed else 0.0
        local = []
        for dst, off, gi, pi, bid, piece, n in self.updates_out:
            got = direction_rows(gi, pi, bid, piece)
            if got is None:
                continue
            rows, updated = got
            rows = rows.to(self.dtype)  # every holder applies the same rounded value
            if dst == self.rank:
                if updated:
                    local.append((gi, pi, bid, piece, rows))
            else:
                send[dst, off : off + n] = rows.reshape(-1)
                send[dst, off + n] = 1.0 if updated else 0.0
        recv = self._all_to_all(send)
        failed_ranks = (recv[:, -1] != 0).nonzero().flatten().tolist()
        if failed or failed_ranks:
            return sorted(set(failed_ranks) | ({self.rank} if failed else set()))
        for gi, pi, bid, piece, rows in local:
            apply_rows(gi, pi, bid, piece, rows)
        for src, off, gi, pi, bid, piece, n in self.updates_in:
            if src != self.rank and recv[src, off + n] != 0:
                apply_rows(gi, pi, bid, piece, recv[src, off : off + n])
        return []

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send)
        if send.shape[1] == 0:
            return recv
        dist.all_to_all_single(recv.view(-1), send.view(-1))
        return recv


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
