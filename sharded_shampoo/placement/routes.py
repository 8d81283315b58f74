"""Where blocks' elements travel in a step, computed once from the plan.

Plain parameters held whole by every rank (DDP): each rank's owned blocks' directions form its
piece of an AllGather, stack after stack (``allgather_segments``).

DTensor parameters (FSDP2, HSDP, tensor parallel, FSDP2 x TP), for one rank (``PieceRoutes``):

A DTensor parameter's blocks are cut from its full shape, and each block meets the shards of
the ranks holding it in *pieces* (``sharding.py``). Per step, each piece's gradient goes from
one of its holders to the block's owner and its direction back to every holder. This module
lists, for one rank, every *route*: a piece of a block and where its elements lie in the flat
buffers of the step's two ``all_to_all_single`` calls over the world. Both sides of a pair
derive the same routes in the same canonical order (group, parameter, block) from the plan, so
no sizes are ever exchanged, and a rank visits only its own pieces: those of the shards it
holds and of the blocks it owns, never another pair's, so building them does not grow with
the world size.

A piece held by several ranks (HSDP replica groups, dims a parameter is replicated on) sends
its gradient from the holder that agrees with the owner on those mesh dims (under HSDP: the
one in the owner's replica group, so gradients never cross replica groups), and its direction
to every holder. This moves the same bytes as forwarding rows between replica groups, in one
collective instead of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..status import STATUS_WORDS
from .layout import StackLayout
from .plan import Plan
from .sharding import Piece, pieces_of_block, shard_pieces

__all__ = ["Chunks", "PieceRoutes", "Route", "allgather_segments", "stack_buckets"]


def allgather_segments(plan: Plan) -> list[list[tuple[int, int, StackLayout, int]]]:
    """Per rank of the plan, ``(group, stack index, layout, start)`` of each of its stacks of
    plain parameters in its AllGather piece (DTensor stacks travel by ``PieceRoutes``).
    Every rank reads every piece, so it needs every rank's; there are at most as many ranks as
    blocks / ``MIN_BLOCKS_PER_RANK`` (``parallelism.auto_shard_width``) unless the user sets a
    wider mesh."""
    out = []
    for r in range(plan.world_size):
        start, segments = 0, []
        for gi, group in enumerate(plan.groups):
            for si, layout in enumerate(group.layout(r)):
                if not layout.sharded:
                    segments.append((gi, si, layout, start))
                    start += layout.num_rows * layout.row_numel
        out.append(segments)
    return out


def stack_buckets(plan: Plan, buckets: int) -> dict[tuple, int]:
    """Which ``all_to_all`` (of at most ``buckets``) carries each kind of stack of the plan's
    DTensor parameters: ``(group, dtype, block shape) -> bucket``, the same on every rank (from
    the shapes alone). Kinds in order of first appearance, cut into runs of about equal
    elements, none empty, so that the exchange of one run overlaps the math of another."""
    sizes: dict[tuple, int] = {}
    for gi, group in enumerate(plan.groups):
        for pi, blocking in enumerate(group.blockings):
            if group.spec.sharding(pi) is None:
                continue
            for region in blocking.regions:
                key = (gi, group.spec.dtypes[pi], region.block_shape)
                sizes[key] = sizes.get(key, 0) + region.num_blocks * math.prod(region.block_shape)
    count = max(1, min(buckets, len(sizes)))
    total, seen, out = sum(sizes.values()), 0, {}
    for key, size in sizes.items():
        # The bucket in which this kind's middle element falls.
        out[key] = min(count - 1, (seen + size // 2) * count // max(total, 1))
        seen += size
    used = {b: i for i, b in enumerate(sorted(set(out.values())))}
    return {key: used[b] for key, b in out.items()}


@dataclass(frozen=True)
class Route:
    """Piece ``piece`` of block ``block`` of parameter ``param`` in param group ``group``."""

    group: int
    param: int
    block: int
    piece: Piece

    @property
    def numel(self) -> int:
        return self.piece.numel


class Chunks:
    """A flat buffer cut into one chunk per peer (what ``all_to_all_single`` takes as split
    sizes), each holding its routes' elements back to back, ``sections`` times over (gradients,
    then weights when they travel too), then, if asked, a flag per route and status words.

    ``entries[j]``: ``(offset, route)`` for the routes of peer ``j``, in order;
    ``flag_at[j]``: where each of those routes' flag sits; ``status_at[j]``: where the status
    words of the chunk start; ``starts[j]``, ``sizes[j]``: the chunk; ``data[j]``: elements
    of one section of it; ``total``: the buffer's length."""

    def __init__(self, per_peer: list[list[Route]], sections: int, flags: bool, status: bool):
        self.entries: list[list[tuple[int, Route]]] = []
        self.flag_at: list[list[int]] = []
        self.status_at: list[int] = []
        self.starts: list[int] = []
        self.sizes: list[int] = []
        self.data: list[int] = []
        start = 0
        for routes in per_peer:
            data = sum(r.numel for r in routes)
            entries, off = [], start
            for r in routes:
                entries.append((off, r))
                off += r.numel
            end = start + sections * data
            self.flag_at.append(list(range(end, end + len(routes))) if flags else [])
            end += len(routes) if flags else 0
            self.status_at.append(end)
            end += STATUS_WORDS if status else 0
            self.entries.append(entries)
            self.data.append(data)
            self.starts.append(start)
            self.sizes.append(end - start)
            start = end
        self.total = start


def _chunks(per_bucket, sections: int, flags: bool, status: bool) -> list[Chunks]:
    """One ``Chunks`` (one buffer) per bucket; status words in the last one's chunks."""
    last = len(per_bucket) - 1
    return [
        Chunks(per_peer, sections, flags, status and b == last)
        for b, per_peer in enumerate(per_bucket)
    ]


class PieceRoutes:
    """Every route of one rank, by bucket (``stack_buckets``: one ``all_to_all_single`` each)
    and by peer (global rank):

    - ``grad_send`` / ``grad_recv``: gradient (and weight) pieces: mine to the blocks' owners;
      my blocks' pieces from their sources.
    - ``dir_send`` / ``dir_recv``: direction pieces back, to every holder, each route with a
      flag, the last bucket's chunks with status words.
    - My own pieces of my own blocks go through my own chunk, like anyone's.
    """

    def __init__(self, plan: Plan, rank: int, sections: int, buckets: int = 1) -> None:
        mesh = plan.mesh
        W = plan.world_size
        self.buckets = bucket_of = stack_buckets(plan, buckets)
        count = max(bucket_of.values(), default=0) + 1

        def lists() -> list[list[list[Route]]]:
            return [[[] for _ in range(W)] for _ in range(count)]

        grad_out, dir_in = lists(), lists()  # by bucket, then owner
        grad_in, dir_out = lists(), lists()  # by bucket, then source / holder
        coord = mesh.coord(rank) if mesh is not None else ()
        for gi, group in enumerate(plan.groups):
            mine = group.owned.get(rank, {})
            for pi, blocking in enumerate(group.blockings):
                sharding = group.spec.sharding(pi)
                if sharding is None:
                    continue
                dtype = group.spec.dtypes[pi]
                for bid, piece in shard_pieces(blocking, sharding, coord):
                    route = Route(gi, pi, bid, piece)
                    owner = group.owners[pi][bid]
                    b = bucket_of[(gi, dtype, blocking.block_shape(bid))]
                    if mesh.source(sharding, piece.shard, owner) == rank:
                        grad_out[b][owner].append(route)
                    dir_in[b][owner].append(route)
                for bid in sorted(mine.get(pi, ())):
                    b = bucket_of[(gi, dtype, blocking.block_shape(bid))]
                    for piece in pieces_of_block(blocking, sharding, bid):
                        route = Route(gi, pi, bid, piece)
                        grad_in[b][mesh.source(sharding, piece.shard, rank)].append(route)
                        for h in mesh.holders(sharding, piece.shard):
                            dir_out[b][h].append(route)
        self.rank = rank
        self.sections = sections
        self.grad_send = _chunks(grad_out, sections, flags=False, status=False)
        self.grad_recv = _chunks(grad_in, sections, flags=False, status=False)
        self.dir_send = _chunks(dir_out, 1, flags=True, status=True)
        self.dir_recv = _chunks(dir_in, 1, flags=True, status=True)

    def bytes_sent(self, grad_itemsize: int, dir_itemsize: int) -> int:
        """Exactly what this rank sends to other ranks in one step."""

        def others(chunks: list[Chunks]) -> int:
            return sum(s for c in chunks for j, s in enumerate(c.sizes) if j != self.rank)

        return others(self.grad_send) * grad_itemsize + others(self.dir_send) * dir_itemsize
