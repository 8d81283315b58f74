"""One flat buffer per dtype holding a rank's optimizer state for a param group.

Each rank packs the state of the blocks it owns back to back, and nothing else: no padding to
another rank's size, so a rank's memory is exactly what the plan gives it. Stacks are views into
the buffer, so state is updated in place and its per-block views stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["StatePool", "pooled_sizes"]


def pooled_sizes(specs: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> dict[torch.dtype, int]:
    """Elements per dtype that tensors of the given (shape, dtype) take in a pool."""
    sizes: dict[torch.dtype, int] = {}
    for shape, dtype in specs:
        n = 1
        for d in shape:
            n *= d
        sizes[dtype] = sizes.get(dtype, 0) + n
    return sizes


class StatePool:
    """Hands out views of one zero-initialized buffer per dtype of ``lengths[dtype]`` elements."""

    def __init__(self, lengths: dict[torch.dtype, int], device: torch.device) -> None:
        self.device = torch.device(device)
        self.buffers = {
            dtype: torch.zeros(n, dtype=dtype, device=device) for dtype, n in lengths.items()
        }
        self._used = {dtype: 0 for dtype in lengths}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        start = self._used[dtype]
        if start + n > self.buffers[dtype].numel():
            raise RuntimeError("state pool too small: the plan and the allocation disagree")
        self._used[dtype] = start + n
        return self.buffers[dtype][start : start + n].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
