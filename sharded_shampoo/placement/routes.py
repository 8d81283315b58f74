"""Where blocks' rows travel in a step, computed once from the plan.

Plain parameters held whole by every rank (DDP): each rank's owned blocks' directions form its
piece of an AllGather, stack after stack (``allgather_segments``).

Row-sharded parameters (FSDP2, HSDP), for one rank (``RowRoutes``):

A row-sharded parameter's blocks are cut from its full shape, and the rows of a block are held
by one or more shards (``sharding.py``). Per step, gradient rows go from their holders to the
block's owner and direction rows back. This module lists, for one rank, every *route*: a piece
of a block (which rows, where they sit in the holder's band) and where its elements lie in the
flat buffers of the step's ``all_to_all_single`` calls. Both sides of a pair derive the same
routes in the same canonical order (group, parameter, block) from the plan, so no sizes are
ever exchanged, and a rank visits only its own pieces: those of the rows it holds and of the
blocks it owns, never another pair's, so building them does not grow with the world size.

Under HSDP (R replica groups of S shards), a block's owner sits in one replica group; the
holders in that group exchange rows with it, and each holder forwards the direction rows its
group computed to the holders of the same shard in the other groups (``forward``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..communication import STATUS_WORDS
from .layout import StackLayout
from .plan import Plan
from .sharding import Piece, band_pieces, pieces_of_block

__all__ = ["Chunks", "Route", "RowRoutes", "allgather_segments"]


def allgather_segments(plan: Plan) -> list[list[tuple[int, int, StackLayout, int]]]:
    """Per rank of the plan, ``(group, stack index, layout, start)`` of each of its stacks of
    plain parameters in its AllGather piece (row-sharded stacks travel by ``RowRoutes``).
    Every rank reads every piece, so it needs every rank's; there are at most as many ranks as
    blocks / ``MIN_BLOCKS_PER_RANK`` (``parallelism.auto_shard_width``) unless the user sets a
    wider mesh."""
    out = []
    for r in range(plan.world_size):
        start, segments = 0, []
        for gi, group in enumerate(plan.groups):
            for si, layout in enumerate(group.layout(r)):
                if not layout.row_sharded:
                    segments.append((gi, si, layout, start))
                    start += layout.num_rows * layout.row_numel
        out.append(segments)
    return out


@dataclass(frozen=True)
class Route:
    """The rows ``piece`` of block ``block`` of parameter ``param`` in param group ``group``:
    ``numel`` elements, ``piece.rows`` rows of the block's trailing shape."""

    group: int
    param: int
    block: int
    piece: Piece
    numel: int


class Chunks:
    """A flat buffer cut into one chunk per peer (what ``all_to_all_single`` takes as split
    sizes), each holding its routes' elements back to back, ``sections`` times over (gradients,
    then weights when they travel too), then, if asked, a flag per route and status words.

    ``entries[j]``: ``(offset, route)`` for the routes of peer ``j``, in order;
    ``flag_at[j]``: where each of those routes' flag sits; ``status_at[j]``: where the status
    words of the chunk start; ``starts[j]``, ``sizes[j]``: the chunk; ``data[j]``: elements
    of one section of it."""

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


class RowRoutes:
    """Every route of one rank (``rank`` at ``coords[rank] = (replica group, shard)``).

    - ``grad_send`` / ``grad_recv``: gradient (and weight) rows, by shard in my replica group:
      mine to the blocks' owners; my blocks' rows from their holders.
    - ``dir_send`` / ``dir_recv``: direction rows back, each route with a flag, each chunk
      with status words.
    - My own rows of my own blocks go through my own chunk (``shard``), like anyone's.
    - ``forward`` (HSDP only, else None): by replica group, the rows of my shard whose blocks
      are owned in that group; my own group's chunk is what I send every other group.
    """

    def __init__(
        self, plan: Plan, rank: int, coords: dict[int, tuple[int, int]], sections: int
    ) -> None:
        holders = plan.shard_holders
        self.num_shards = S = len(holders)
        self.num_replicas = R = len(holders[0]) if holders else 1
        self.replica, self.shard = q, k = coords[rank]
        grad_out: list[list[Route]] = [[] for _ in range(S)]  # by owner's shard
        dir_in: list[list[Route]] = [[] for _ in range(S)]
        forward: list[list[Route]] = [[] for _ in range(R)]  # by owner's replica group
        grad_in: list[list[Route]] = [[] for _ in range(S)]  # by holder's shard
        for gi, group in enumerate(plan.groups):
            mine = group.owned.get(rank, {})
            for pi, blocking in enumerate(group.blockings):
                sharding = group.spec.sharding(pi)
                if sharding is None:
                    continue
                for bid, piece in band_pieces(blocking, sharding, k):
                    route = Route(gi, pi, bid, piece, piece.rows * _cols(blocking, bid))
                    qo, ko = coords[group.owners[pi][bid]]
                    if qo == q:
                        grad_out[ko].append(route)
                        dir_in[ko].append(route)
                    forward[qo].append(route)
                for bid in sorted(mine.get(pi, ())):
                    cols = _cols(blocking, bid)
                    for piece in pieces_of_block(blocking, sharding, bid):
                        grad_in[piece.shard].append(Route(gi, pi, bid, piece, piece.rows * cols))
        self.sections = sections
        self.grad_send = Chunks(grad_out, sections, flags=False, status=False)
        self.grad_recv = Chunks(grad_in, sections, flags=False, status=False)
        self.dir_send = Chunks(grad_in, 1, flags=True, status=True)
        self.dir_recv = Chunks(dir_in, 1, flags=True, status=True)
        self.forward = Chunks(forward, 1, flags=True, status=True) if R > 1 else None

    def bytes_sent(self, grad_itemsize: int, dir_itemsize: int) -> int:
        """Exactly what this rank sends to other ranks in one step."""
        others = [j for j in range(self.num_shards) if j != self.shard]
        sent = sum(self.grad_send.sizes[j] for j in others) * grad_itemsize
        sent += sum(self.dir_send.sizes[j] for j in others) * dir_itemsize
        if self.forward is not None:
            sent += (self.num_replicas - 1) * self.forward.sizes[self.replica] * dir_itemsize
        return sent


def _cols(blocking, bid: int) -> int:
    """Elements of one row of block ``bid``."""
    return math.prod(blocking.block_shape(bid)[1:])
