"""Where a rank's blocks sit in its stacks: which blocks, in which rows, in which parts.

A rank keeps, per param group, one *stack* per (parameter dtype, block shape): its owned blocks
of that kind, in canonical order (parameter, then block id). A stack's rows are filled from the
parameters by *parts*: the owned blocks of one region of one parameter, a whole region (one
strided view) or some of its blocks (their positions in the region's grid). How the data
moves is the distributors' (``distributors.copies``); this is only where it goes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..blocking import ParamBlocking, Region

__all__ = ["Part", "StackLayout", "group_stacks"]


@dataclass(frozen=True, eq=False)
class Part:
    """Blocks ``positions`` of ``region`` of parameter ``param``, in rows ``[row, row + count)``.

    ``positions`` index the region's blocks (per grid dim, the blocks' coordinates, row-major
    over ``region.counts``); None means all of them, in order, which allows a plain view copy.
    """

    param: int
    region: Region
    row: int
    count: int
    positions: tuple[tuple[int, ...], ...] | None = None


@dataclass
class StackLayout:
    """The owned blocks of one (dtype, block shape) in one param group, on one rank."""

    param_dtype: Any  # a torch.dtype
    block_shape: tuple[int, ...]
    # Blocks of DTensor parameters reach the stack by all_to_all, not by parts.
    sharded: bool = False
    parts: list[Part] = field(default_factory=list)
    # Per row: (index of the parameter in its group, block id within the parameter).
    row_owner: list[tuple[int, int]] = field(default_factory=list)
    # Per row, with stagger_roots: the step of the period in which the block computes roots.
    row_phases: tuple[int, ...] | None = None

    @property
    def num_rows(self) -> int:
        return len(self.row_owner)

    @property
    def row_numel(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    @property
    def params(self) -> tuple[int, ...]:
        """Indices (in the group) of the parameters with blocks in this stack."""
        return tuple(dict.fromkeys(p.param for p in self.parts))


def group_stacks(
    blockings: list[ParamBlocking],
    dtypes: list[Any],
    owned: dict[int, set[int]],
    dtensor: list[bool] | None = None,
    phases: tuple[tuple[int, ...], ...] | None = None,
) -> list[StackLayout]:
    """The stacks of one param group on one rank.

    ``owned[p]`` holds the ids of the blocks of parameter ``p`` this rank owns (parameters with
    none are absent, and not visited); ``phases[p][b]`` the phase of block b (stagger_roots);
    ``dtensor[p]`` whether parameter ``p`` is a
    DTensor (its blocks get stacks of their own, exchanged by all_to_all instead of the
    AllGather). Stacks come in order of first appearance, rows in canonical order: both depend
    only on the inputs.
    """
    stacks: dict[tuple, StackLayout] = {}
    for pi in sorted(owned):
        blocking, dtype = blockings[pi], dtypes[pi]
        for region in blocking.regions:
            mine = [j for j, bid in enumerate(region.block_ids) if bid in owned[pi]]
            if not mine:
                continue
            sharded = bool(dtensor and dtensor[pi])
            key = (dtype, region.block_shape, sharded)
            stack = stacks.setdefault(key, StackLayout(dtype, region.block_shape, sharded))
            if len(mine) == region.num_blocks:
                positions = None
            else:
                grid = list(itertools.product(*(range(c) for c in region.counts)))
                positions = tuple(zip(*(grid[j] for j in mine), strict=True))
            stack.parts.append(Part(pi, region, stack.num_rows, len(mine), positions))
            stack.row_owner.extend((pi, region.block_ids[j]) for j in mine)
    if phases is not None:
        for stack in stacks.values():
            stack.row_phases = tuple(phases[pi][bid] for pi, bid in stack.row_owner)
    return list(stacks.values())
