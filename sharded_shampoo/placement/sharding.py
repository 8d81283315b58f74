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

__all__ = ["RowSharding", "Piece", "band", "block_pieces"]


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


def block_pieces(blocking: ParamBlocking, sharding: RowSharding) -> list[list[Piece]]:
    """For each block, the non-empty pieces of it each shard holds, in shard order."""
    bands = [band(blocking, sharding, k) for k in range(sharding.num_shards)]
    out = []
    for bid in range(blocking.num_blocks):
        rows = blocking.block_slices(bid)[0]
        pieces = []
        for k, (lo, hi) in enumerate(bands):
            a, b = max(rows.start, lo), min(rows.stop, hi)
            if a < b:
                pieces.append(Piece(k, a - rows.start, b - rows.start, a - lo, b - lo))
        out.append(pieces)
    return out
