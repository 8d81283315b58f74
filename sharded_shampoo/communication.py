"""Where communication happens: the agreement check at construction and the per-step exchanges.

At construction the ranks check, in one collective, that they built the same optimizer
(``check_agreement``). Per step, data-parallel (plain) parameters add one collective: every rank
writes the search directions of the blocks it owns into its piece of a flat buffer (in
``communication_dtype``), and one ``Shard(0) -> Replicate()`` redistribution of that buffer, an
AllGather, hands every rank every direction. Every rank, the owner included, then applies the
gathered values, so replicas stay bitwise identical whatever the communication dtype.
Row-sharded (FSDP2/HSDP) parameters go through ``RowShardedExchange`` instead.

Every piece ends with status words (see below): a rank that hits an error it must raise (a block
whose roots failed too often) says so there, and so does a rank whose per-step options differ;
after the collective every rank raises, instead of a failing rank leaving the others waiting in
a collective or replicas drifting apart.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from .placement.layout import StackLayout
from .placement.plan import Plan

__all__ = [
    "DirectionExchange",
    "PlanMismatchError",
    "RowShardedExchange",
    "STATUS_WORDS",
    "check_agreement",
    "read_status",
    "status_words",
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
        self.local = torch.zeros(longest + STATUS_WORDS, dtype=dtype, device=device)
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

    def exchange(self, failed: bool, digest: int) -> tuple[torch.Tensor, list[int], list[int]]:
        """AllGathers every rank's piece. Returns them as (world_size, piece length), the ranks
        that failed, and the ranks whose options digest differs from rank 0's."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        words = status_words(FAILED if failed else 0, digest)
        self.local[self.status_index :] = torch.tensor(words, dtype=self.dtype)
        world = self.mesh.size()
        piece = DTensor.from_local(
            self.local, self.mesh, [Shard(0)], run_check=False,
            shape=(world * self.local.numel(),), stride=(1,),
        )
        gathered = piece.redistribute(self.mesh, [Replicate()]).to_local().view(world, -1)
        flags, digests = read_status(gathered[:, self.status_index :])
        failed_ranks = [r for r, f in enumerate(flags) if f & FAILED]
        disagreeing = [r for r, d in enumerate(digests) if d != digests[0]]
        return gathered, failed_ranks, disagreeing

    def rows_of(self, gathered: torch.Tensor, rank: int):
        """(group index, layout, rows) for each stack of ``rank`` in the gathered buffer."""
        piece = gathered[rank]
        for gi, _, lay, start in self.segments[rank]:
            n = lay.num_rows * lay.row_numel
            yield gi, lay, piece[start : start + n].view(lay.num_rows, *lay.block_shape)


def check_agreement(group, items: list[tuple[str, str, Any]], owners: str) -> None:
    """Checks that every rank of ``group`` (None: the default group) built the same optimizer.

    ``items`` are ``(kind, description, value)``: kind ``"setting"`` (an optimizer-wide
    setting), ``"group"`` (a param group's options, a tuple of ``name=value``) or ``"param"``
    (a parameter, compared by a fingerprint of its shape, dtype, sharding and name). One
    collective of a short digest per rank; only when they differ, a second one gathers the
    details, and every rank raises the same PlanMismatchError naming the first difference.
    Every rank sees the same digests, so every rank takes the second collective or none.
    """
    digest = hashlib.sha1(repr((items, owners)).encode()).hexdigest()[:16]
    world = dist.get_world_size(group)
    digests: list = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) == 1:
        return
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (items, owners), group=group)
    longest = max(len(i) for i, _ in everyone)
    params_seen = 0
    for n in range(longest):
        entries = [i[n] if n < len(i) else None for i, _ in everyone]
        kind = next(e[0] for e in entries if e is not None)
        if len({None if e is None else (e[0], e[2]) for e in entries}) > 1:
            raise PlanMismatchError(_describe_difference(kind, params_seen, entries))
        params_seen += kind == "param"
    raise PlanMismatchError(
        "ranks computed different block placements from the same parameters and options; "
        "this is a bug in the planner's determinism"
    )


def _describe_difference(kind: str, param_index: int, entries: list) -> str:
    by_value: dict[str, list[int]] = {}
    if kind == "group":
        # Name only the options that differ.
        fields = [set(e[2]) for e in entries if e is not None and e[0] == "group"]
        common = set.intersection(*fields) if fields else set()
    for r, e in enumerate(entries):
        if e is None:
            text = "no such parameter" if kind == "param" else "nothing"
        elif kind == "param":
            text = e[1]
        elif kind == "group":
            text = ", ".join(v for v in e[2] if v not in common) or "(same)"
        else:
            text = str(e[2])
        by_value.setdefault(text, []).append(r)
    per_rank = "; ".join(
        f"rank {rs[0]}: {text}" if len(rs) == 1 else f"ranks {_ranks(rs)}: {text}"
        for text, rs in by_value.items()
    )
    if kind == "param":
        what = f"parameter #{param_index} differs"
        advice = "the same parameters (shapes, dtypes, order, names)"
    elif kind == "group":
        what = f"the options of {entries[0][1] if entries[0] else 'a param group'} differ"
        advice = "the same options"
    else:
        what = f"{entries[0][1] if entries[0] else 'a setting'} differs"
        advice = "the same settings"
    return (
        f"ranks built different optimizers: {what} ({per_rank}). Every rank must construct "
        f"ShardedShampoo with {advice}."
    )


def _ranks(rs: list[int]) -> str:
    return ", ".join(map(str, rs[:8])) + (f" and {len(rs) - 8} more" if len(rs) > 8 else "")


# ---------------------------------------------------------------- status words
#
# Every piece a rank sends in a step's exchange ends with STATUS_WORDS values: a flags word
# (FAILED: a block's roots failed too often; DISAGREED: this rank saw ranks step with different
# options) and a 32-bit digest of the options it stepped with, one byte per word. Small
# integers are exact in every communication dtype (bfloat16 holds integers up to 256 exactly),
# so the words survive the rounding of the payload; a rank learns from them, in the collective
# it takes anyway, whether to raise, and every rank raises in the same step.

STATUS_WORDS = 5
FAILED, DISAGREED = 1, 2


def status_words(flags: int, digest: int) -> list[float]:
    return [float(flags)] + [float((digest >> (8 * i)) & 0xFF) for i in range(4)]


def read_status(words: torch.Tensor) -> tuple[list[int], list[int]]:
    """``(flags, digests)`` per row of ``words`` (n, STATUS_WORDS)."""
    rows = words.to(torch.float64).tolist()
    flags = [int(w[0]) for w in rows]
    digests = [sum(int(b) << (8 * i) for i, b in enumerate(w[1:])) for w in rows]
    return flags, digests


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
        self.upd_chunk = (
            max([n for (a, b), n in upd_used.items() if a != b], default=0) + STATUS_WORDS
        )
        self.fwd_chunk = (
            max([n for (q, k), n in fwd_used.items() if k == self.shard], default=0)
            + STATUS_WORDS
        )
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

    def distribute(
        self, direction_rows, apply_rows, failed: bool, digest: int
    ) -> tuple[bool, bool]:
        """Delivers the direction rows of my blocks to every rank holding them and applies those
        for my rows. Returns (any rank reported a failure, some ranks stepped with options
        whose digest differs from ``digest``); in either case nothing is applied.

        ``direction_rows(gi, pi, bid, piece)`` gives ``(rows, updated)`` or None when the
        parameter has no gradient; ``apply_rows(gi, pi, bid, piece, rows)`` is called for the
        pieces of my rows whose block was updated.
        """
        send = torch.zeros(self.num_shards, self.upd_chunk, dtype=self.dtype, device=self.device)
        send[:, -STATUS_WORDS:] = torch.tensor(
            status_words(FAILED if failed else 0, digest), dtype=self.dtype
        )
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
        # One host sync for the status words and the received pieces' flags together.
        n_in = len(self._in_flags)
        flat = torch.cat(
            [recv.view(-1)[self._in_flags.to(recv.device)], recv[:, -STATUS_WORDS:].reshape(-1)]
        )
        in_flags = flat[:n_in].tolist()
        flags, digests = read_status(flat[n_in:].view(-1, STATUS_WORDS))
        anyone_failed = failed or any(f & FAILED for f in flags)
        disagreed = any(d != digest for d in digests)
        for (peer, off, gi, pi, bid, piece, n), flag in zip(self.upd_in, in_flags):
            if peer != self.shard and flag != 0:
                mine[(gi, pi, bid)] = (piece, recv[peer, off : off + n])
        forwarded = None
        if self.num_replicas > 1:
            payload = torch.zeros(self.fwd_chunk, dtype=self.dtype, device=self.device)
            # What this rank learnt in its shard group reaches the other replica groups.
            seen = (FAILED if anyone_failed else 0) | (DISAGREED if disagreed else 0)
            payload[-STATUS_WORDS:] = torch.tensor(status_words(seen, digest), dtype=self.dtype)
            for off, gi, pi, bid, piece, n in self.forward:
                got = mine.get((gi, pi, bid))
                if got is not None:
                    payload[off : off + n] = got[1]
                    payload[off + n] = 1.0
            forwarded = torch.empty(
                self.num_replicas, self.fwd_chunk, dtype=self.dtype, device=self.device
            )
            _all_gather_single(forwarded.view(-1), payload, group=self.replicate_group)
            flags, digests = read_status(forwarded[:, -STATUS_WORDS:])
            anyone_failed = anyone_failed or any(f & FAILED for f in flags)
            disagreed = (
                disagreed or any(f & DISAGREED for f in flags) or any(d != digest for d in digests)
            )
        if anyone_failed or disagreed:
            return anyone_failed, disagreed
        for (gi, pi, bid), (piece, rows) in mine.items():
            apply_rows(gi, pi, bid, piece, rows)
        if forwarded is not None:
            fwd_flags = forwarded.view(-1)[self._fwd_flags.to(forwarded.device)].tolist()
            for (q, off, gi, pi, bid, piece, n), flag in zip(self.forwarded, fwd_flags):
                if q != self.replica and flag != 0:
                    apply_rows(gi, pi, bid, piece, forwarded[q, off : off + n])
        return False, False

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
