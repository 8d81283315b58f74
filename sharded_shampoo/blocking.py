"""Where blocks are made: the block partition of a parameter, from its *full* shape.

A parameter of shape ``(s_1, ..., s_n)`` is first reshaped to a "merged" shape (with
``merge_dims``: size-1 dims dropped, then adjacent dims merged from the last towards the first
while their product stays <= ``max_preconditioner_dim``), then every merged dim is cut into chunks
of ``max_preconditioner_dim`` (the last chunk takes the remainder, as ``torch.split`` does). Each
chunk of the grid is a block.

Blocks are numbered row-major over the chunk grid; that number, with the parameter, names a
block everywhere (state keys, warnings, checkpoints), whatever process computes it.

Copying blocks one by one would cost one kernel launch per block. Instead, the blocks of a
parameter are grouped into *regions*: sets of blocks of equal shape that form a regular grid
(full chunks along a dim, or the remainder chunk). A region moves between the parameter and a
stacked buffer with one strided copy, so launches grow with the number of parameters, not with
the number of blocks. A 2-D parameter has at most 4 regions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "merged_shape",
    "merge_groups",
    "block_grid",
    "Region",
    "ParamBlocking",
    "make_blocking",
]


def merged_shape(shape: tuple[int, ...], max_dim: int, merge_dims: bool) -> tuple[int, ...]:
    """The shape whose dims carry one preconditioner each, before splitting into blocks.

    A 0-d tensor counts as shape ``(1,)``. Without ``merge_dims`` the shape is kept as it is.
    """
    return merge_groups(shape, max_dim, merge_dims)[0]


def merge_groups(
    shape: tuple[int, ...], max_dim: int, merge_dims: bool
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The merged shape, and per merged dim the dims of ``shape`` it is made of (size-1 dims
    dropped by merging belong to none; a group of two or more is at most ``max_dim`` long)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return (1,), ((),)
    if not merge_dims:
        return shape, tuple((d,) for d in range(len(shape)))
    kept = [d for d, s in enumerate(shape) if s != 1]
    if not kept:
        return (1,), ((),)
    merged, groups = [shape[kept[-1]]], [[kept[-1]]]
    for d in reversed(kept[:-1]):
        if shape[d] * merged[0] <= max_dim:
            merged[0] *= shape[d]
            groups[0].insert(0, d)
        else:
            merged.insert(0, shape[d])
            groups.insert(0, [d])
    return tuple(merged), tuple(tuple(g) for g in groups)


def _chunks(size: int, max_dim: int) -> list[int]:
    full, rest = divmod(size, max_dim)
    return [max_dim] * full + ([rest] if rest else [])


def block_grid(shape: tuple[int, ...], max_dim: int) -> list[list[int]]:
    """Chunk sizes along each dim of a merged shape."""
    return [_chunks(s, max_dim) for s in shape]


@dataclass(frozen=True)
class Region:
    """Blocks of one parameter that share a shape and form a regular grid.

    ``start[i]`` is where the region begins along merged dim ``i``; it spans ``counts[i]`` blocks
    of ``block_shape[i]`` each. ``block_ids`` lists the parameter's block numbers in the order the
    region's blocks are laid out when copied (row-major over ``counts``).
    """

    start: tuple[int, ...]
    counts: tuple[int, ...]
    block_shape: tuple[int, ...]
    block_ids: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    def view_of(self, merged: torch.Tensor) -> torch.Tensor:
        """A view of ``merged`` (a tensor of the merged shape) as ``(*counts, *block_shape)``.

        Slicing and splitting a dim into two are always views, whatever the strides, so this
        never copies and can be written through.
        """
        k = len(self.start)
        v = merged[
            tuple(
                slice(a, a + c * m)
                for a, c, m in zip(self.start, self.counts, self.block_shape, strict=True)
            )
        ]
        for i in reversed(range(k)):
            v = v.unflatten(i, (self.counts[i], self.block_shape[i]))
        return v.permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2))


@dataclass(frozen=True)
class ParamBlocking:
    """The block partition of one parameter."""

    shape: tuple[int, ...]
    merged: tuple[int, ...]
    grid: tuple[tuple[int, ...], ...]
    regions: tuple[Region, ...]
    # Per merged dim, the dims of ``shape`` it is made of (``merge_groups``).
    groups: tuple[tuple[int, ...], ...]

    @property
    def num_blocks(self) -> int:
        return math.prod(len(c) for c in self.grid) if self.numel else 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_shape(self, block_id: int) -> tuple[int, ...]:
        idx = _unravel(block_id, tuple(len(c) for c in self.grid))
        return tuple(self.grid[d][i] for d, i in enumerate(idx))

    def block_slices(self, block_id: int) -> tuple[slice, ...]:
        """Where block ``block_id`` sits in the merged view of the parameter."""
        idx = _unravel(block_id, tuple(len(c) for c in self.grid))
        out = []
        for d, i in enumerate(idx):
            lo = sum(self.grid[d][:i])
            out.append(slice(lo, lo + self.grid[d][i]))
        return tuple(out)


def _unravel(index: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for d in reversed(dims):
        index, r = divmod(index, d)
        out.append(r)
    return tuple(reversed(out))


def make_blocking(
    shape: torch.Size | tuple[int, ...], max_dim: int, merge_dims: bool
) -> ParamBlocking:
    """The block partition of a parameter of full shape ``shape``."""
    shape = tuple(int(s) for s in shape)
    merged, groups = merge_groups(shape, max_dim, merge_dims)
    grid = tuple(tuple(c) for c in block_grid(merged, max_dim))
    if math.prod(shape) == 0:
        # An empty parameter has nothing to precondition.
        return ParamBlocking(shape, merged, grid, (), groups)
    grid_dims = tuple(len(c) for c in grid)
    # Along each dim the chunks form at most two runs: the full chunks and the remainder.
    runs_per_dim = []
    for chunks in grid:
        runs, i = [], 0
        while i < len(chunks):
            j = i
            while j < len(chunks) and chunks[j] == chunks[i]:
                j += 1
            runs.append((i, j - i, chunks[i]))
            i = j
        runs_per_dim.append(runs)
    regions = []
    for combo in itertools.product(*runs_per_dim):
        start = tuple(first * max_dim for first, _, _ in combo)
        counts = tuple(n for _, n, _ in combo)
        bshape = tuple(m for _, _, m in combo)
        ids = []
        for local in itertools.product(*(range(n) for n in counts)):
            gidx = [first + j for (first, _, _), j in zip(combo, local, strict=True)]
            ids.append(_ravel(gidx, grid_dims))
        regions.append(Region(start, counts, bshape, tuple(ids)))
    return ParamBlocking(shape, merged, grid, tuple(regions), groups)


def _ravel(index: list[int], dims: tuple[int, ...]) -> int:
    flat = 0
    for i, d in zip(index, dims, strict=True):
        flat = flat * d + i
    return flat
