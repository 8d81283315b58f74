"""Where a rank's blocks sit in its buffers, and how they move to and from the parameters.

A rank keeps, per param group, one *stack* per (parameter dtype, block shape): its owned blocks
of that kind, in canonical order (parameter, then block id). A stack's rows are filled from the
parameters by *parts*: the owned blocks of one region of one parameter. A region owned entirely
by the rank moves with one strided view copy; a region shared with other ranks moves with one
advanced-indexing copy of the owned blocks. Either way the copies per step grow with the number
of regions, never with the number of blocks.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch

from ..blocking import ParamBlocking, Region

__all__ = ["Part", "StackLayout", "group_stacks"]


@dataclass(frozen=True, eq=False)
class Part:
    """Blocks ``positions`` of ``region`` of parameter ``param``, in rows ``[row, row + count)``.

    ``positions`` index the region's blocks (row-major over ``region.counts``); None means all
    of them, in order, which allows a plain view copy.
    """

    param: int
    region: Region
    row: int
    count: int
    positions: tuple[torch.Tensor, ...] | None = None

    def read(self, merged: torch.Tensor) -> torch.Tensor:
        """The part's blocks of ``merged`` (a tensor of the parameter's merged shape),
        as (count, *block_shape); a view when the part is a whole region."""
        grid = self.region.view_of(merged)
        if self.positions is None:
            return grid
        return grid[self.positions]

    def add_to(self, merged: torch.Tensor, rows: torch.Tensor, alpha: float) -> None:
        """``merged[blocks of this part] += alpha * rows``, in place."""
        grid = self.region.view_of(merged)
        if self.positions is None:
            grid.add_(rows.view(grid.shape).to(merged.dtype), alpha=alpha)
        else:
            grid.index_put_(self.positions, (rows * alpha).to(merged.dtype), accumulate=True)


@dataclass
class StackLayout:
    """The owned blocks of one (dtype, block shape) in one param group, on one rank."""

    param_dtype: torch.dtype
    block_shape: tuple[int, ...]
    # Blocks of DTensor parameters reach the stack by all_to_all, not by parts.
    sharded: bool = False
    parts: list[Part] = field(default_factory=list)
    # Per row: (index of the parameter in its group, block id within the parameter).
    row_owner: list[tuple[int, int]] = field(default_factory=list)
    # Per row, with stagger_roots: the step of the period in which the block computes roots.
    row_phases: torch.Tensor | None = None

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

    def on(self, device: torch.device) -> StackLayout:
        """This layout with its parts' block positions on ``device`` (where the tensors they
        index live: a host index on an accelerator's tensor is a copy and a wait per use)."""
        device = torch.device(device)
        if all(p.positions is None or p.positions[0].device == device for p in self.parts):
            return self
        parts = [
            p if p.positions is None
            else dataclasses.replace(p, positions=tuple(x.to(device) for x in p.positions))
            for p in self.parts
        ]
        return dataclasses.replace(self, parts=parts)

    def gather(
        self,
        tensors: list[torch.Tensor | None],
        blockings: list[ParamBlocking],
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Copies the stack's blocks of ``tensors`` (indexed like the group's parameters) into
        ``out`` (num_rows, *block_shape); rows whose tensor is None are left as they are."""
        for part in self.parts:
            t = tensors[part.param]
            if t is None:
                continue
            src = part.read(t.reshape(blockings[part.param].merged))
            out[part.row : part.row + part.count].view(src.shape).copy_(src)
        return out

    def scatter_add_(
        self,
        params: list[torch.Tensor],
        active: list[bool],
        blockings: list[ParamBlocking],
        rows: torch.Tensor,
        alpha: float,
    ) -> None:
        """``param += alpha * rows`` block by block, for the parameters marked active."""
        for part in self.parts:
            if not active[part.param]:
                continue
            p = params[part.param]
            src = rows[part.row : part.row + part.count]
            blocking = blockings[part.param]
            try:
                merged = p.view(blocking.merged)
            except RuntimeError:
                merged = None
            if merged is not None:
                part.add_to(merged, src, alpha)
            else:
                # Strides that allow no merged view (e.g. channels_last): build the update in a
                # dense buffer and add that.
                buf = torch.zeros(blocking.merged, dtype=p.dtype, device=p.device)
                part.add_to(buf, src, 1.0)
                p.add_(buf.view(p.shape), alpha=alpha)


def group_stacks(
    blockings: list[ParamBlocking],
    dtypes: list[torch.dtype],
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
                coords = list(zip(*(grid[j] for j in mine)))
                positions = tuple(torch.tensor(c, dtype=torch.long, device="cpu") for c in coords)
            stack.parts.append(Part(pi, region, stack.num_rows, len(mine), positions))
            stack.row_owner.extend((pi, region.block_ids[j]) for j in mine)
    if phases is not None:
        for stack in stacks.values():
            stack.row_phases = torch.tensor(  # read on the host only
                [phases[pi][bid] for pi, bid in stack.row_owner], dtype=torch.long, device="cpu"
            )
    return list(stacks.values())
