"""One flat buffer per dtype holding all of a rank's optimizer state, as a sharded DTensor.

Each rank's state is packed back to back; every rank's buffer is padded to the longest one, so
that the per-rank pieces form a DTensor with ``Shard(0)`` over the mesh in the torch.chunk layout
DTensor understands (local pieces of unequal sizes are not supported). Padding is the only waste:
with a balanced plan it is the gap between a rank's state and the largest rank's. Stacks are
plain-tensor views into the local piece, so the math never pays DTensor dispatch.
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
    """Hands out views of one zero-initialized buffer per dtype.

    ``lengths[dtype]`` is the padded local length (the largest rank's need); ``mesh``, when
    given, is the 1-D DeviceMesh the buffers are sharded over.
    """

    def __init__(self, lengths: dict[torch.dtype, int], device: torch.device, mesh=None) -> None:
        self.buffers = {
            dtype: torch.zeros(n, dtype=dtype, device=device) for dtype, n in lengths.items()
        }
        self._used = {dtype: 0 for dtype in lengths}
        self.dtensors = {}
        if mesh is not None:
            from torch.distributed.tensor import DTensor, Shard

            world = mesh.size()
            for dtype, buf in self.buffers.items():
                self.dtensors[dtype] = DTensor.from_local(
                    buf, mesh, [Shard(0)], run_check=False, shape=(world * buf.numel(),), stride=(1,)
                )

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
