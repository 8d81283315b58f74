"""DTensor parameters: which part of which block each rank holds, for every placement.

Every shard-shape edge case is handled here, and only here.

A DTensor parameter (FSDP2, HSDP, tensor parallel, or FSDP2 x TP) lives on a mesh whose dims
are *axes* of the *world mesh* (``world``: each axis one or more world dims, flattened). On
each axis its placement is ``Shard(d)``, ``_StridedShard(d)`` or ``Replicate()``. Along a
tensor dim d, the axes that shard it split it by nested torch.chunk (chunk size ceil(n / k)
over the axis's k ranks, trailing chunks possibly short or empty), outermost first: left to
right for ``Shard``; a ``_StridedShard`` (FSDP2 over a tensor-parallel dim) splits *inside*
the later axis that shards the same tensor dim, as its ``split_factor`` says. So what a rank
holds is a *box*, one interval per tensor dim, fixed by its coordinates on the world dims of
the axes that shard the parameter (its *shard*); the ranks that differ only on the other
world dims hold copies (its *holders*).

Blocks are boxes too, in the parameter's own dims: a merged dim made of two or more dims is
at most ``max_preconditioner_dim`` long (``blocking.merged_shape``), so it is one chunk, which
spans those dims whole. A block and a shard therefore meet in a box, a *piece*, which is a
strided view of the holder's local tensor and of the owner's block alike: no shape is ever
special-cased, and an empty intersection is just absent.

Pieces are found by arithmetic on chunk sizes, visiting only the chunks a box meets, so that
nothing here grows with the number of ranks but the pieces themselves.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..blocking import ParamBlocking
from .world import Axis

__all__ = [
    "Box",
    "Piece",
    "Sharding",
    "block_box",
    "largest_piece",
    "pieces_of_block",
    "shard_pieces",
]

Box = tuple[tuple[int, int], ...]  # per tensor dim, [lo, hi)


@dataclass(frozen=True)
class Sharding:
    """How a parameter is split over the world mesh of shape ``mesh_shape``: ``splits[d]``
    lists the axes splitting tensor dim d, outermost first, each axis the world dims
    (outermost first) flattened into one mesh dim. World dims in no split replicate the
    parameter."""

    mesh_shape: tuple[int, ...]
    splits: tuple[tuple[Axis, ...], ...]

    @property
    def shard_dims(self) -> tuple[int, ...]:
        """The world dims a rank's coordinates on which fix what it holds, in mesh order."""
        return tuple(sorted(m for axes in self.splits for axis in axes for m in axis))

    def replica_dims(self) -> tuple[int, ...]:
        """The world dims along which ranks hold copies of the same part."""
        sharding = set(self.shard_dims)
        return tuple(m for m in range(len(self.mesh_shape)) if m not in sharding)

    def sizes(self) -> list[list[int]]:
        """Per tensor dim, the number of ranks of each axis splitting it."""
        return [[math.prod(self.mesh_shape[m] for m in a) for a in axes] for axes in self.splits]

    def box(self, shape: tuple[int, ...], coord: tuple[int, ...]) -> Box:
        """What the rank at world coordinate ``coord`` holds."""
        out = []
        for n, axes, sizes in zip(shape, self.splits, self.sizes(), strict=True):
            lo, hi = 0, n
            for axis, k in zip(axes, sizes, strict=True):
                c = 0
                for m in axis:  # the coordinate on the axis: row-major over its world dims
                    c = c * self.mesh_shape[m] + coord[m]
                chunk = -(-(hi - lo) // k)
                lo, hi = min(lo + c * chunk, hi), min(lo + (c + 1) * chunk, hi)
            out.append((lo, hi))
        return tuple(out)


@dataclass(frozen=True)
class Piece:
    """The part ``box`` (in the parameter's dims) of a block that the ranks of shard ``shard``
    (their coordinates on ``Sharding.shard_dims``, in that order) hold."""

    shard: tuple[int, ...]
    box: Box

    @property
    def numel(self) -> int:
        return math.prod(hi - lo for lo, hi in self.box)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.box)


def block_box(blocking: ParamBlocking, bid: int) -> Box:
    """Block ``bid`` in the parameter's dims."""
    box = [(0, n) for n in blocking.shape]
    for group, sl in zip(blocking.groups, blocking.block_slices(bid), strict=True):
        if len(group) == 1:  # a dim of its own: its chunk (a merged dim is one whole chunk)
            box[group[0]] = (sl.start, sl.stop)
    return tuple(box)


def _meets(lo: int, hi: int, a: int, b: int, sizes: list[int]):
    """``(coords, (lo', hi'))`` for every nested chunk of ``[lo, hi)`` (split by ``sizes``,
    outermost first) that meets ``[a, b)``, with that intersection; only those are visited."""
    if not sizes:
        if max(lo, a) < min(hi, b):
            yield (), (max(lo, a), min(hi, b))
        return
    chunk = -(-(hi - lo) // sizes[0])
    if chunk == 0:
        return
    first = max(a - lo, 0) // chunk
    last = min((min(b, hi) - 1 - lo) // chunk, sizes[0] - 1)
    for c in range(first, last + 1):
        c_lo, c_hi = lo + c * chunk, min(lo + (c + 1) * chunk, hi)
        for rest, inter in _meets(c_lo, c_hi, a, b, sizes[1:]):
            yield (c, *rest), inter


def _largest(lo: int, hi: int, a: int, b: int, sizes: list[int]) -> tuple[int, tuple]:
    """The longest intersection of a nested chunk of ``[lo, hi)`` with ``[a, b)``: (length,
    coords), the lowest coords among equals. Chunks strictly inside ``[a, b)`` are all full
    chunks, alike inside, so the first, the second and the last that meet it are enough."""
    if not sizes:
        return max(0, min(hi, b) - max(lo, a)), ()
    chunk = -(-(hi - lo) // sizes[0])
    if chunk == 0:
        return 0, (0,) * len(sizes)
    first = max(a - lo, 0) // chunk
    last = min((max(min(b, hi), lo + 1) - 1 - lo) // chunk, sizes[0] - 1)
    best = (-1, ())
    for c in dict.fromkeys((first, min(first + 1, last), last)):
        n, rest = _largest(lo + c * chunk, min(lo + (c + 1) * chunk, hi), a, b, sizes[1:])
        if n > best[0]:
            best = (n, (c, *rest))
    return best


def _shard_coord(sharding: Sharding, per_dim: list[tuple]) -> tuple[int, ...]:
    """Coordinates on ``shard_dims`` from each tensor dim's chunk coordinates (one per axis)."""
    at = {}
    for axes, coords in zip(sharding.splits, per_dim, strict=True):
        for axis, c in zip(axes, coords, strict=True):
            for m in reversed(axis):
                c, at[m] = divmod(c, sharding.mesh_shape[m])
    return tuple(at[m] for m in sharding.shard_dims)


def pieces_of_block(blocking: ParamBlocking, sharding: Sharding, bid: int) -> list[Piece]:
    """The non-empty pieces of block ``bid``, in shard order."""
    box = block_box(blocking, bid)
    sizes = sharding.sizes()
    per_dim = [
        list(_meets(0, n, a, b, s)) for n, (a, b), s in zip(blocking.shape, box, sizes, strict=True)
    ]
    pieces = [
        Piece(_shard_coord(sharding, [c for c, _ in combo]), tuple(i for _, i in combo))
        for combo in itertools.product(*per_dim)
    ]
    return sorted(pieces, key=lambda p: p.shard)


def largest_piece(blocking: ParamBlocking, sharding: Sharding, bid: int) -> tuple[int, ...] | None:
    """The shard holding the largest piece of block ``bid`` (the lowest among equals), or
    None when no shard holds any of it; the size of a piece is a product over dims, so each
    dim's longest intersection is found on its own."""
    box = block_box(blocking, bid)
    found = []
    for n, (a, b), sizes in zip(blocking.shape, box, sharding.sizes(), strict=True):
        length, coords = _largest(0, n, a, b, sizes)
        if length <= 0:
            return None
        found.append(coords)
    return _shard_coord(sharding, found)


def shard_pieces(
    blocking: ParamBlocking, sharding: Sharding, coord: tuple[int, ...]
) -> list[tuple[int, Piece]]:
    """``(block id, piece)`` for every block the rank at mesh coordinate ``coord`` holds part
    of, in block order; only those blocks are visited."""
    mine = sharding.box(blocking.shape, coord)
    if not blocking.num_blocks or any(lo >= hi for lo, hi in mine):
        return []
    shard = tuple(coord[m] for m in sharding.shard_dims)
    # Per merged dim, the chunks that meet my box: a dim of its own by its interval; a merged
    # dim (one chunk) always.
    ranges = []
    for group, chunks in zip(blocking.groups, blocking.grid, strict=True):
        if len(group) != 1:
            ranges.append(range(len(chunks)))
            continue
        (lo, hi), step = mine[group[0]], chunks[0]
        ranges.append(range(lo // step, min((hi - 1) // step, len(chunks) - 1) + 1))
    dims = [len(c) for c in blocking.grid]
    out = []
    for idx in itertools.product(*ranges):
        bid = 0
        for i, d in zip(idx, dims, strict=True):
            bid = bid * d + i
        box = tuple(
            (max(a, lo), min(b, hi))
            for (a, b), (lo, hi) in zip(block_box(blocking, bid), mine, strict=True)
        )
        out.append((bid, Piece(shard, box)))
    return out
