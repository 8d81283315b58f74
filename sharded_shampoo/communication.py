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
import math
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
                for si, layout in enumerate(group.layout(r)):
                    if layout.row_sharded:  # these go by RowShardedExchange
                        continue
                    segs.append((gi, si, layout, start))
                    start += layout.num_rows * layout.row_numel
            self.segments.append(segs)
            longest = max(longest, start)
        self.status_index = longest
        self.local = torch.zeros(longest + STATUS_WORDS, dtype=dtype, device=device)
        self.gathered = torch.zeros(mesh.size(), self.local.numel(), dtype=dtype, device=device)
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
        words = status_words(FAILED if failed else 0, digest)
        self.local[self.status_index :] = torch.tensor(words, dtype=self.dtype)
        # The pieces are the local shards of a Shard(0) DTensor over the mesh; this is its
        # redistribution to Replicate(), into a buffer allocated once instead of every step
        # (the size of the parameters: a fresh one costs page faults each step).
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(self.gathered.view(-1), self.local, group=self.mesh.get_group())
        gathered = self.gathered
        w = gathered[:, self.status_index :].to(torch.int64)
        # One host sync: who failed, whose digest differs from rank 0's.
        failed_mask, differs = torch.stack(
            [(w[:, 0] & FAILED) != 0, (w[:, 1:] != w[0, 1:]).any(1)]
        ).tolist()
        failed_ranks = [r for r, f in enumerate(failed_mask) if f]
        disagreeing = [r for r, d in enumerate(differs) if d]
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


def read_status(words: torch.Tensor, digest: int) -> torch.Tensor:
    """Per row of ``words`` (n, STATUS_WORDS): (FAILED set, DISAGREED set, digest differs from
    ``digest``), as an (n, 3) bool tensor. Tensor operations, not a Python loop over peers:
    a rank reads a status from every peer, thousands of them at scale."""
    w = words.to(torch.int64)
    mine = torch.tensor(status_words(0, digest)[1:], device=w.device).to(torch.int64)
    return torch.stack(
        [(w[:, 0] & FAILED) != 0, (w[:, 0] & DISAGREED) != 0, (w[:, 1:] != mine).any(1)], dim=1
    )


class _Chunks:
    """A flat buffer cut into one chunk per peer, each holding pieces back to back, then
    ``extra`` words (a flag per piece, and status words). ``entries[j]`` lists
    ``(offset, route)`` of the pieces of peer ``j``'s chunk; ``starts[j]`` and ``sizes[j]`` are
    where the chunk begins and its length (what ``all_to_all_single`` takes as split sizes);
    ``data[j]`` is the elements of one section of its pieces (gradients, then weights)."""

    def __init__(self, per_peer: list[list[tuple]], sections: int, flags: bool, status: bool):
        self.entries: list[list[tuple[int, tuple]]] = []
        self.flag_at: list[list[int]] = []  # per peer: where each piece's flag sits
        self.status_at: list[int] = []  # per peer: where its status words start
        self.starts: list[int] = []
        self.sizes: list[int] = []
        self.data: list[int] = []
        start = 0
        for routes in per_peer:
            data = sum(r[-1] for r in routes)
            self.data.append(data)
            self.starts.append(start)
            entries, off = [], start
            for r in routes:
                entries.append((off, r))
                off += r[-1]
            self.entries.append(entries)
            end = start + sections * data
            self.flag_at.append(list(range(end, end + len(routes))) if flags else [])
            end += len(routes) if flags else 0
            self.status_at.append(end)
            end += STATUS_WORDS if status else 0
            self.sizes.append(end - start)
            start = end
        self.total = start


class RowShardedExchange:
    """Moves rows of row-sharded (FSDP2, HSDP) parameters between shard holders and owners.

    Under FSDP2 (one replica group) and HSDP (R replica groups of S shards) alike:

    1. gradient rows go from the rank holding them to the block's owner, by one
       ``all_to_all_single`` inside the owner's replica group (the shard group): the holder in
       the owner's own group is the source, so gradients never cross replica groups;
    2. direction rows (``communication_dtype``) go from the owner to the holder of those rows
       in its own group, by one more ``all_to_all_single`` over the shard group;
    3. under HSDP only, every rank forwards the direction rows for its shard that its group
       computed to the same shard's holders in the other groups, by one ``all_to_all_single``
       over the replicate group: the work is split over all R x S ranks, and each row crosses
       replica groups once.

    Exactly the rows that must move are sent: each rank sends each peer the pieces that peer
    needs, with ``all_to_all_single``'s split sizes, no padding. Both sides of a pair derive
    the same pieces in the same canonical order (group, parameter, block) from the plan, so no
    sizes are exchanged; each rank computes only its own pieces (those of the rows it holds and
    of the blocks it owns), so set-up does not grow with the world size. Buffers are allocated
    once. Every direction piece carries a flag (updated, or skipped for a non-finite gradient),
    and every chunk ends with status words (see above): a failure or a disagreement anywhere
    reaches every rank (through steps 2 and 3) before any rank applies anything. Values are
    rounded to ``communication_dtype`` before any rank, the owner included, applies them, so
    replicas of a row stay identical.
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
        with_weights: bool = False,
    ) -> None:
        from .placement.sharding import band_pieces, pieces_of_block

        self.rank = rank
        self.replica, self.shard = coords[rank]
        self.shard_group, self.replicate_group = shard_group, replicate_group
        holders = plan.shard_holders
        self.num_shards = len(holders)
        self.num_replicas = len(holders[0]) if holders else 1
        self.dtype, self.grad_dtype, self.device = dtype, grad_dtype, device
        self.with_weights = with_weights
        S, R, q, k = self.num_shards, self.num_replicas, self.replica, self.shard
        # Routes are (gi, pi, bid, piece, elements).
        held: list[tuple[tuple, int]] = []  # pieces of my rows, with their block's owner
        owned: list[tuple] = []  # pieces of my blocks
        for gi, group in enumerate(plan.groups):
            mine = group.owned.get(rank, {})
            for pi, blocking in enumerate(group.blockings):
                sharding = group.spec.sharding(pi)
                if sharding is None:
                    continue
                for bid, piece in band_pieces(blocking, sharding, k):
                    n = piece.rows * math.prod(blocking.block_shape(bid)[1:])
                    held.append(((gi, pi, bid, piece, n), group.owners[pi][bid]))
                for bid in sorted(mine.get(pi, ())):
                    cols = math.prod(blocking.block_shape(bid)[1:])
                    owned += [(gi, pi, bid, p, p.rows * cols) for p in pieces_of_block(blocking, sharding, bid)]
        grad_out: list[list[tuple]] = [[] for _ in range(S)]  # by owner's shard index
        dir_in: list[list[tuple]] = [[] for _ in range(S)]
        forward: list[list[tuple]] = [[] for _ in range(R)]  # my rows, by owner's replica group
        for route, owner in held:
            qo, ko = coords[owner]
            if qo == q:
                grad_out[ko].append(route)
                dir_in[ko].append(route)
            forward[qo].append(route)
        grad_in: list[list[tuple]] = [[] for _ in range(S)]  # by holder's shard index
        for route in owned:
            grad_in[route[3].shard].append(route)
        # Pieces I hold of my own blocks never travel: they are handed over here.
        self.local = grad_in[k]
        grad_out[k], grad_in[k], dir_in[k] = [], [], []
        sections = 2 if with_weights else 1
        self.grad_send = _Chunks(grad_out, sections, flags=False, status=False)
        self.grad_recv = _Chunks(grad_in, sections, flags=False, status=False)
        self.dir_send = _Chunks(grad_in, 1, flags=True, status=True)
        self.dir_recv = _Chunks(dir_in, 1, flags=True, status=True)
        self._bufs = {
            "grad_send": torch.zeros(self.grad_send.total, dtype=grad_dtype, device=device),
            "grad_recv": torch.zeros(self.grad_recv.total, dtype=grad_dtype, device=device),
            "dir_send": torch.zeros(self.dir_send.total, dtype=dtype, device=device),
            "dir_recv": torch.zeros(self.dir_recv.total, dtype=dtype, device=device),
        }
        # Where flags and status words sit in what arrives, to read them with one host sync.
        self._dir_words = torch.tensor(
            [i for j in range(S) for i in self.dir_recv.flag_at[j]]
            + [self.dir_recv.status_at[j] + w for j in range(S) if j != k for w in range(STATUS_WORDS)],
            dtype=torch.long, device=device,
        )
        if R > 1:
            # The same payload (my rows computed in my group) goes to every other group.
            self.fwd = _Chunks(forward, 1, flags=True, status=True)
            self._bufs["fwd_send"] = torch.zeros(R * self.fwd.sizes[q], dtype=dtype, device=device)
            self._bufs["fwd_recv"] = torch.zeros(self.fwd.total, dtype=dtype, device=device)
            self._fwd_words = torch.tensor(
                [i for j in range(R) if j != q for i in self.fwd.flag_at[j]]
                + [self.fwd.status_at[j] + w for j in range(R) if j != q for w in range(STATUS_WORDS)],
                dtype=torch.long, device=device,
            )

    def bytes_sent_per_step(self) -> int:
        """Exactly what this rank sends to other ranks in one step."""
        others = [j for j in range(self.num_shards) if j != self.shard]
        sent = sum(self.grad_send.sizes[j] for j in others) * _itemsize(self.grad_dtype)
        sent += sum(self.dir_send.sizes[j] for j in others) * _itemsize(self.dtype)
        if self.num_replicas > 1:
            sent += (self.num_replicas - 1) * self.fwd.sizes[self.replica] * _itemsize(self.dtype)
        return sent

    def collect(self, fetch_rows, store_rows) -> None:
        """Sends my gradient (and weight) rows to their blocks' owners; stores what I receive.

        ``fetch_rows(gi, pi, bid, piece, weights)`` returns my rows of a block (or None when the
        parameter has no gradient, or its weights are not needed: what is sent then is not
        read); ``store_rows(gi, pi, bid, piece, rows, weights)`` puts a piece of one of my
        blocks into its stack.
        """
        sections = (False, True) if self.with_weights else (False,)
        send, recv = self._bufs["grad_send"], self._bufs["grad_recv"]
        for weights in sections:
            for gi, pi, bid, piece, n in self.local:
                rows = fetch_rows(gi, pi, bid, piece, weights)
                if rows is not None:
                    store_rows(gi, pi, bid, piece, rows, weights)
            for j, entries in enumerate(self.grad_send.entries):
                shift = self.grad_send.data[j] if weights else 0
                for off, (gi, pi, bid, piece, n) in entries:
                    rows = fetch_rows(gi, pi, bid, piece, weights)
                    if rows is not None:
                        send[off + shift : off + shift + n] = rows.reshape(-1)
        self._all_to_all(recv, send, self.grad_recv.sizes, self.grad_send.sizes, self.shard_group)
        for weights in sections:
            for j, entries in enumerate(self.grad_recv.entries):
                shift = self.grad_recv.data[j] if weights else 0
                for off, (gi, pi, bid, piece, n) in entries:
                    store_rows(gi, pi, bid, piece, recv[off + shift : off + shift + n], weights)

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
        send, recv = self._bufs["dir_send"], self._bufs["dir_recv"]
        words = torch.tensor(status_words(FAILED if failed else 0, digest), dtype=self.dtype)
        # The pieces of my own rows computed in my group: (gi, pi, bid) -> (piece, rows).
        mine: dict[tuple[int, int, int], tuple] = {}
        for gi, pi, bid, piece, n in self.local:
            got = direction_rows(gi, pi, bid, piece)
            if got is not None and got[1]:
                mine[(gi, pi, bid)] = (piece, got[0].to(self.dtype).reshape(-1))
        for j, entries in enumerate(self.dir_send.entries):
            for (off, (gi, pi, bid, piece, n)), flag_at in zip(entries, self.dir_send.flag_at[j]):
                got = direction_rows(gi, pi, bid, piece)
                if got is not None:
                    send[off : off + n] = got[0].reshape(-1)
                send[flag_at] = 1.0 if got is not None and got[1] else 0.0
            if j != self.shard:
                at = self.dir_send.status_at[j]
                send[at : at + STATUS_WORDS] = words
        self._all_to_all(recv, send, self.dir_recv.sizes, self.dir_send.sizes, self.shard_group)
        # One host sync for the received pieces' flags and the status words together.
        n_flags = len(self._dir_words) - STATUS_WORDS * (self.num_shards - 1)
        picked = recv[self._dir_words]
        status = read_status(picked[n_flags:].view(-1, STATUS_WORDS), digest).any(0)
        values = torch.cat([picked[:n_flags], status.to(picked.dtype)]).tolist()
        anyone_failed = failed or values[n_flags] != 0
        disagreed = values[n_flags + 2] != 0
        received = iter(values[:n_flags])
        for entries in self.dir_recv.entries:
            for off, (gi, pi, bid, piece, n) in entries:
                if next(received) != 0:
                    mine[(gi, pi, bid)] = (piece, recv[off : off + n])
        forwarded = None
        if self.num_replicas > 1:
            anyone_failed, disagreed, forwarded = self._forward(mine, anyone_failed, disagreed, digest)
        if anyone_failed or disagreed:
            return anyone_failed, disagreed
        for (gi, pi, bid), (piece, rows) in mine.items():
            apply_rows(gi, pi, bid, piece, rows)
        for gi, pi, bid, piece, rows in forwarded or ():
            apply_rows(gi, pi, bid, piece, rows)
        return False, False

    def _forward(self, mine, anyone_failed: bool, disagreed: bool, digest: int):
        """Step 3 (HSDP): my rows computed in my group to the other groups, theirs to me."""
        q, R = self.replica, self.num_replicas
        size = self.fwd.sizes[q]
        payload = self._bufs["fwd_send"][:size]
        # My own chunk of the layout is the payload; its offsets, shifted to the payload.
        start = self.fwd.starts[q]
        entries, flag_at, status_at = self.fwd.entries[q], self.fwd.flag_at[q], self.fwd.status_at[q]
        for (off, (gi, pi, bid, piece, n)), fa in zip(entries, flag_at):
            got = mine.get((gi, pi, bid))
            if got is not None:
                payload[off - start : off - start + n] = got[1]
            payload[fa - start] = 1.0 if got is not None else 0.0
        # What this rank learnt in its shard group reaches the other replica groups.
        seen = (FAILED if anyone_failed else 0) | (DISAGREED if disagreed else 0)
        at = status_at - start
        payload[at : at + STATUS_WORDS] = torch.tensor(status_words(seen, digest), dtype=self.dtype)
        send = self._bufs["fwd_send"]
        for j in range(1, R):
            send[j * size : (j + 1) * size] = payload
        recv = self._bufs["fwd_recv"]
        self._all_to_all(recv, send, self.fwd.sizes, [size] * R, self.replicate_group)
        n_flags = len(self._fwd_words) - STATUS_WORDS * (R - 1)
        picked = recv[self._fwd_words]
        status = read_status(picked[n_flags:].view(-1, STATUS_WORDS), digest).any(0)
        values = torch.cat([picked[:n_flags], status.to(picked.dtype)]).tolist()
        anyone_failed = anyone_failed or values[n_flags] != 0
        disagreed = disagreed or values[n_flags + 1] != 0 or values[n_flags + 2] != 0
        received, out = iter(values[:n_flags]), []
        for j, entries in enumerate(self.fwd.entries):
            if j == q:
                continue
            for off, (gi, pi, bid, piece, n) in entries:
                if next(received) != 0:
                    out.append((gi, pi, bid, piece, recv[off : off + n]))
        return anyone_failed, disagreed, out

    def _all_to_all(self, recv: torch.Tensor, send: torch.Tensor, recv_sizes, send_sizes, group) -> None:
        # A group of one rank (FSDP2 on a single rank) has nobody to send to: what it would
        # send itself is never read.
        if len(send_sizes) > 1:
            dist.all_to_all_single(recv, send, list(recv_sizes), list(send_sizes), group=group)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
