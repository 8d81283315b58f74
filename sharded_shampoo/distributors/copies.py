"""How a stack's rows move to and from the parameters they are blocks of (plain parameters:
one process, or every rank holding them whole).

By *parts* (``placement.layout``): a region owned entirely by the rank moves with one strided
view copy; a region shared with other ranks moves with one advanced-indexing copy of the owned
blocks, whose positions are put on the parameters' device once. Either way the copies per step
grow with the number of regions, never with the number of blocks.
"""

from __future__ import annotations

import torch

from ..blocking import ParamBlocking
from ..placement.layout import StackLayout

__all__ = ["StackCopies"]


class StackCopies:
    """The copies between the parameters and one stack's rows, on ``device``."""

    def __init__(self, layout: StackLayout, device: torch.device) -> None:
        self.layout = layout
        # Per part: its blocks' positions as index tensors on the device (None: the whole
        # region). A host index on an accelerator's tensor would be a copy and a wait per use.
        self.positions = [
            None
            if part.positions is None
            else tuple(torch.tensor(c, dtype=torch.long, device=device) for c in part.positions)
            for part in layout.parts
        ]

    def gather(
        self, tensors: list[torch.Tensor | None], blockings: list[ParamBlocking], out: torch.Tensor
    ) -> torch.Tensor:
        """Copies the stack's blocks of ``tensors`` (indexed like the group's parameters) into
        ``out`` (num_rows, *block_shape); rows whose tensor is None are left as they are."""
        for part, positions in zip(self.layout.parts, self.positions, strict=True):
            t = tensors[part.param]
            if t is None:
                continue
            grid = part.region.view_of(t.reshape(blockings[part.param].merged))
            src = grid if positions is None else grid[positions]
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
        for part, positions in zip(self.layout.parts, self.positions, strict=True):
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
                _add(part.region.view_of(merged), positions, src, alpha)
            else:
                # Strides that allow no merged view (e.g. channels_last): build the update in a
                # dense buffer and add that.
                buf = torch.zeros(blocking.merged, dtype=p.dtype, device=p.device)
                _add(part.region.view_of(buf), positions, src, 1.0)
                p.add_(buf.view(p.shape), alpha=alpha)


def _add(grid: torch.Tensor, positions, rows: torch.Tensor, alpha: float) -> None:
    """``grid[positions] += alpha * rows``, in place (all of ``grid`` when None)."""
    if positions is None:
        grid.add_(rows.view(grid.shape).to(grid.dtype), alpha=alpha)
    else:
        grid.index_put_(positions, (rows * alpha).to(grid.dtype), accumulate=True)
