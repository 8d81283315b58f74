"""Reading and writing a stack's per-dim matrices (roots, eigenvectors) whatever their storage:
packed (``packing``), narrow or quantized (``quantize``)."""

from __future__ import annotations

import torch

from .packing import pack, unpack
from .quantize import dequantize, quantize

__all__ = ["read", "write_where"]


def read(state, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The matrices ``state[key]`` (n, m, m), in ``dtype``: the state itself when it is kept
    full in ``dtype`` (copy it to keep it past a write), else a new tensor."""
    x = state[key]
    if x.dtype == torch.int8:
        rectify = key.startswith("eigenvectors")
        x = dequantize(x, state[f"{key}_scale"], dtype, rectify=rectify and x.dim() == 3)
    return unpack(x).to(dtype)


def write_where(state, key: str, new: torch.Tensor, take: torch.Tensor) -> None:
    """``state[key]`` <- ``new`` (n, m, m) for the blocks where ``take`` (n,) bool, stored as
    ``state[key]`` is; the other blocks' stored matrices are left bitwise as they were."""
    old = state[key]
    if old.dim() == 2:
        new = pack(new)
    where = take.view(-1, *([1] * (old.dim() - 1)))
    if old.dtype == torch.int8:
        codes, scales = quantize(new)
        old_scales = state[f"{key}_scale"]
        old.copy_(torch.where(where, codes, old))
        old_scales.copy_(torch.where(take.view(-1, 1), scales, old_scales))
    else:
        old.copy_(torch.where(where, new.to(old.dtype), old))
