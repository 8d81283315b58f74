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
    """Moves rows of row-sharded (FSDP2, HSDP) parameters between shard holders and owners.

    Under FSDP2 (one replica group) and HSDP (R replica groups of S shards) alike:

    1. gradient rows go from the rank holding them to the block's owner, by one
       ``all_to_all_single`` inside the owner's replica group (the shard group): the holder in
       the owner's own group is the source, so gradients never cross replica groups;
    2. direction rows (``communication_dtype``) go from the owner to the holder of those rows
       in its own group, by one more ``all_to_all_single`` over the shard group;
    3. under HSDP only, every rank forwards the direction rows for its shard that its group
       computed to the same shard's holders in the other groups, by one
       ``all_gather_single`` over the replicate group: the work is split over all R x S ranks,
       and each row crosses replica groups once.

    gloo needs equal split sizes, so chunks are padded to the largest pair; every rank derives
    all layouts from the plan in canonical order, so no sizes are exchanged. Every direction
    piece carries a flag (updated, or skipped for a non-finite gradient), and every chunk ends
    with a status word: a failure anywhere reaches every rank (through steps 2 and 3) before
    any rank applies anything. Values are rounded to ``communication_dtype`` before any rank,
    the owner included, applies them, so replicas of a row stay identical.
    """

    def __init__(
        self,
        plan: Plan,
        rank: int,
        coords: dict[int, tuple[int, int]],
        shard_group,
        replicate_group,
        dtype: torch.dtype,
        grad_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        from .placement.sharding import block_pieces

        self.rank = rank
        self.replica, self.shard = coords[rank]
        self.shard_group, self.replicate_group = shard_group, replicate_group
        holders = plan.shard_holders
        self.num_shards = len(holders)
        self.num_replicas = len(holders[0]) if holders else 1
        self.dtype, self.grad_dtype, self.device = dtype, grad_dtype, device
        # Entries are (peer shard or replica index, offset, gi, pi, bid, piece, elements).
        self.grad_in: list[tuple] = []  # gradient pieces of my blocks, from a holder
        self.grad_out: list[tuple] = []  # gradient pieces I hold, for an owner
        self.upd_out: list[tuple] = []  # direction pieces of my blocks, for a holder
        self.upd_in: list[tuple] = []  # direction pieces of my rows, from an owner in my group
        self.forward: list[tuple] = []  # (my offset, entry): pieces I forward to other groups
        self.forwarded: list[tuple] = []  # (replica, offset, entry): pieces forwarded to me
        grad_used: dict[tuple[int, int], int] = {}
        upd_used: dict[tuple[int, int], int] = {}
        fwd_used: dict[tuple[int, int], int] = {}
        for gi, group in enumerate(plan.groups):
            for pi, blocking in enumerate(group.blockings):
                sharding = group.spec.sharding(pi)
                if sharding is None:
                    continue
                for bid, pieces in enumerate(block_pieces(blocking, sharding)):
                    owner = group.owners[pi][bid]
                    q, ko = coords[owner]
                    cols = 1
                    for d in blocking.block_shape(bid)[1:]:
                        cols *= d
                    for piece in pieces:
                        n = piece.rows * cols
                        entry = (gi, pi, bid, piece, n)
                        holder = holders[piece.shard][q]  # in the owner's group
                        off = grad_used.get((holder, owner), 0)
                        grad_used[(holder, owner)] = off + n
                        if owner == rank:
                            self.grad_in.append((piece.shard, off, *entry))
                        if holder == rank:
                            self.grad_out.append((ko, off, *entry))
                        # + 1 element: the block's updated flag.
                        off = upd_used.get((owner, holder), 0)
                        upd_used[(owner, holder)] = off + n + 1
                        if owner == rank:
                            self.upd_out.append((piece.shard, off, *entry))
                        if holder == rank:
                            self.upd_in.append((ko, off, *entry))
                        off = fwd_used.get((q, piece.shard), 0)
                        fwd_used[(q, piece.shard)] = off + n + 1
                        if holder == rank:
                            self.forward.append((off, *entry))
                        elif piece.shard == self.shard:
                            self.forwarded.append((q, off, *entry))
        # Chunks to oneself are never sent: only pairs of different ranks set the sizes.
        self.grad_chunk = max([n for (a, b), n in grad_used.items() if a != b], default=0)
        self.upd_chunk = max([n for (a, b), n in upd_used.items() if a != b], default=0) + 1
        self.fwd_chunk = max([n for (q, k), n in fwd_used.items() if k == self.shard], default=0) + 1
        # Where the "updated" flags of received pieces sit, to read them all with one host sync
        # instead of one per piece.
        self._in_flags = torch.tensor(
            # (pieces from myself are never sent: 0 stands in, and is not read)
            [peer * self.upd_chunk + off + n if peer != self.shard else 0
             for peer, off, *_, n in self.upd_in],
            dtype=torch.long,
        )
        self._fwd_flags = torch.tensor(
            [q * self.fwd_chunk + off + n for q, off, *_, n in self.forwarded], dtype=torch.long
        )

    def bytes_sent_per_step(self, with_weights: bool) -> int:
        grads = self.grad_chunk * (2 if with_weights else 1) * _itemsize(self.grad_dtype)
        sent = (self.num_shards - 1) * (grads + self.upd_chunk * _itemsize(self.dtype))
        if self.num_replicas > 1:
            sent += (self.num_replicas - 1) * self.fwd_chunk * _itemsize(self.dtype)
        return sent

    def collect(self, fetch_rows, store_rows, with_weights: bool) -> None:
        """Sends my gradient (and weight) rows to their blocks' owners; stores what I receive.

        ``fetch_rows(gi, pi, bid, piece, weights)`` returns my rows of a block (or None when the
        parameter has no gradient); ``store_rows(gi, pi, bid, piece, rows, weights)`` puts a
        piece of one of my blocks into its stack.
        """
        chunk = self.grad_chunk * (2 if with_weights else 1)
        send = torch.zeros(self.num_shards, chunk, dtype=self.grad_dtype, device=self.device)
        sections = (False, True) if with_weights else (False,)
        for peer, off, gi, pi, bid, piece, n in self.grad_out:
            for weights in sections:
                rows = fetch_rows(gi, pi, bid, piece, weights)
                if rows is None:
                    continue
                if peer == self.shard:  # I own it: no need to send
                    store_rows(gi, pi, bid, piece, rows, weights)
                else:
                    start = off + (self.grad_chunk if weights else 0)
                    send[peer, start : start + n] = rows.reshape(-1)
        recv = self._all_to_all(send)
        for peer, off, gi, pi, bid, piece, n in self.grad_in:
            if peer == self.shard:
                continue
            for weights in sections:
                start = off + (self.grad_chunk if weights else 0)
                store_rows(gi, pi, bid, piece, recv[peer, start : start + n], weights)

    def distribute(self, direction_rows, apply_rows, failed: bool) -> bool:
        """Delivers the direction rows of my blocks to every rank holding them and applies those
        for my rows; returns whether any rank reported a failure (then nothing is applied).

        ``direction_rows(gi, pi, bid, piece)`` gives ``(rows, updated)`` or None when the
        parameter has no gradient; ``apply_rows(gi, pi, bid, piece, rows)`` is called for the
        pieces of my rows whose block was updated.
        """
        send = torch.zeros(self.num_shards, self.upd_chunk, dtype=self.dtype, device=self.device)
        send[:, -1] = 1.0 if failed else 0.0
        # The pieces of my own rows computed in my group: (gi, pi, bid) -> (piece, rows).
        mine: dict[tuple[int, int, int], tuple] = {}
        for peer, off, gi, pi, bid, piece, n in self.upd_out:
            got = direction_rows(gi, pi, bid, piece)
            if got is None:
                continue
            rows, updated = got[0].to(self.dtype).reshape(-1), got[1]
            if peer == self.shard:
                if updated:
                    mine[(gi, pi, bid)] = (piece, rows)
            else:
                send[peer, off : off + n] = rows
                send[peer, off + n] = 1.0 if updated else 0.0
        recv = self._all_to_all(send)
        anyone_failed = failed or bool((recv[:, -1] != 0).any())
        in_flags = recv.view(-1)[self._in_flags.to(recv.device)].tolist()
        for (peer, off, gi, pi, bid, piece, n), flag in zip(self.upd_in, in_flags):
            if peer != self.shard and flag != 0:
                mine[(gi, pi, bid)] = (piece, recv[peer, off : off + n])
        forwarded = None
        if self.num_replicas > 1:
            payload = torch.zeros(self.fwd_chunk, dtype=self.dtype, device=self.device)
            payload[-1] = 1.0 if anyone_failed else 0.0
            for off, gi, pi, bid, piece, n in self.forward:
                got = mine.get((gi, pi, bid))
                if got is not None:
                    payload[off : off + n] = got[1]
                    payload[off + n] = 1.0
            forwarded = torch.empty(
                self.num_replicas, self.fwd_chunk, dtype=self.dtype, device=self.device
            )
            _all_gather_single(forwarded.view(-1), payload, group=self.replicate_group)
            anyone_failed = anyone_failed or bool((forwarded[:, -1] != 0).any())
        if anyone_failed:
            return True
        for (gi, pi, bid), (piece, rows) in mine.items():
            apply_rows(gi, pi, bid, piece, rows)
        if forwarded is not None:
            fwd_flags = forwarded.view(-1)[self._fwd_flags.to(forwarded.device)].tolist()
            for (q, off, gi, pi, bid, piece, n), flag in zip(self.forwarded, fwd_flags):
                if q != self.replica and flag != 0:
                    apply_rows(gi, pi, bid, piece, forwarded[q, off : off + n])
        return False

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send)
        if send.shape[1] == 0 or self.num_shards == 1:
            recv.copy_(send)
            return recv
        dist.all_to_all_single(recv.view(-1), send.view(-1), group=self.shard_group)
        return recv


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """``dist.all_gather_single`` (torch 2.13), or its older name."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
