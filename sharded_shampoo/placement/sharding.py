"""Row-sharded parameters (FSDP2, HSDP): which rows of which block each rank holds.

FSDP2 splits a parameter's dim 0 in the torch.chunk layout: with K shards, chunk c = ceil(n/K),
shard k holds rows [k c, min((k + 1) c, n)) (empty when k c >= n). Blocks are cut from the
merged full shape, whose dim 0 is the product of the parameter's leading dims (size-1 dims
dropped), so a shard is always a band of consecutive rows of merged dim 0 with every other
merged dim complete: its local tensor, viewed with the merged trailing dims, is exactly that
band. Every edge case (uneven shards, empty shards, a dim 0 of 1, fewer rows than shards) is a
band of some length, possibly zero, and is handled here only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..blocking import ParamBlocking

__all__ = [
    "RowSharding", "Piece", "band", "band_pieces", "pieces_of_block",
    "most_rows_shard",
]


@dataclass(frozen=True)
class RowSharding:
    """Dim 0 of a parameter split over ``num_shards`` shards (torch.chunk layout)."""

    num_shards: int


@dataclass(frozen=True)
class Piece:
    """The rows ``[block_lo, block_hi)`` of a block that shard ``shard`` holds, at rows
    ``[band_lo, band_hi)`` of that shard's band."""

    shard: int
    block_lo: int
    block_hi: int
    band_lo: int
    band_hi: int

    @property
    def rows(self) -> int:
        return self.block_hi - self.block_lo


def band(blocking: ParamBlocking, sharding: RowSharding, shard: int) -> tuple[int, int]:
    """Merged-dim-0 rows ``[lo, hi)`` held by ``shard``."""
    shape, merged = blocking.shape, blocking.merged
    n0 = shape[0] if shape else 1
    chunk = -(-n0 // sharding.num_shards)
    rows_lo = min(shard * chunk, n0)
    rows_hi = min((shard + 1) * chunk, n0)
    # One row of dim 0 is numel / n0 elements, i.e. that many / prod(merged[1:]) merged rows.
    per_row = math.prod(shape) // n0 // math.prod(merged[1:]) if n0 else 0
    return rows_lo * per_row, rows_hi * per_row


def _rows_per_shard(blocking: ParamBlocking, sharding: RowSharding) -> int:
    """Merged rows of a full shard (every shard but the tail ones holds this many)."""
    lo, hi = band(blocking, sharding, 0)
    return hi - lo


def _piece(blocking, sharding, shard: int, rows: slice) -> Piece | None:
    lo, hi = band(blocking, sharding, shard)
    a, b = max(rows.start, lo), min(rows.stop, hi)
    return Piece(shard, a - rows.start, b - rows.start, a - lo, b - lo) if a < b else None


def pieces_of_block(blocking: ParamBlocking, sharding: RowSharding, bid: int) -> list[Piece]:
    """The non-empty pieces of block ``bid``, in shard order; only the shards its rows touch
    are visited, so the cost does not grow with the number of shards."""
    per = _rows_per_shard(blocking, sharding)
    if per == 0:
        return []
    rows = blocking.block_slices(bid)[0]
    first = rows.start // per
    last = min((rows.stop - 1) // per, sharding.num_shards - 1)
    return [p for k in range(first, last + 1) if (p := _piece(blocking, sharding, k, rows))]


def most_rows_shard(blocking: ParamBlocking, sharding: RowSharding, bid: int) -> int | None:
    """The shard holding the most rows of block ``bid`` (the lowest among equals), or None.
    Shards strictly inside the block's rows all hold a full shard, so only the first, the
    second and the last of the shards it touches can hold the most."""
    per = _rows_per_shard(blocking, sharding)
    if per == 0:
        return None
    rows = blocking.block_slices(bid)[0]
    first = rows.start // per
    last = min((rows.stop - 1) // per, sharding.num_shards - 1)
    candidates = [k for k in dict.fromkeys((first, first + 1, last)) if first <= k <= last]
    pieces = [p for k in candidates if (p := _piece(blocking, sharding, k, rows))]
    return max(pieces, key=lambda q: (q.rows, -q.shard)).shard if pieces else None


def band_pieces(blocking: ParamBlocking, sharding: RowSharding, shard: int) -> list[tuple[int, Piece]]:
    """``(block id, piece)`` for every block the band of ``shard`` intersects, in block order;
    only those blocks are visited."""
    lo, hi = band(blocking, sharding, shard)
    if lo >= hi or not blocking.num_blocks:
        return []
    row_chunks = blocking.grid[0]
    per_row_block = blocking.num_blocks // len(row_chunks)
    step = row_chunks[0]  # every row chunk but the last has this many rows
    out = []
    for rb in range(lo // step, min((hi - 1) // step, len(row_chunks) - 1) + 1):
        for bid in range(rb * per_row_block, (rb + 1) * per_row_block):
            piece = _piece(blocking, sharding, shard, blocking.block_slices(bid)[0])
            if piece is not None:
                out.append((bid, piece))
    return out
