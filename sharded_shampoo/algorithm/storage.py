"""Reading and writing a stack's per-dim matrices (roots, eigenvectors) whatever their storage:
packed (``packing``), narrow or quantized (``quantize``)."""

from __future__ import annotations

import torch

from .packing import pack, unpack
from .quantize import dequantize, quantize

__all__ = ["copy_where", "read", "stored", "write_where"]


def read(state, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The matrices ``state[key]`` (n, m, m), in ``dtype``: the state itself when it is kept
    full in ``dtype`` (copy it to keep it past a write), else a new tensor."""
    x = state[key]
    if x.dtype == torch.int8:
        rectify = key.startswith("eigenvectors")
        x = dequantize(x, state[f"{key}_scale"], dtype, rectify=rectify and x.dim() == 3)
    return unpack(x).to(dtype)


def stored(state, key: str, new: torch.Tensor) -> dict[str, torch.Tensor]:
    """The matrices ``new`` (n, m, m) as ``state[key]`` stores them: ``{key: ...}``, and
    ``{key}_scale`` beside quantized codes."""
    like = state[key]
    if like.dim() == 2:
        new = pack(new)
    if like.dtype == torch.int8:
        codes, scales = quantize(new)
        return {key: codes, f"{key}_scale": scales}
    return {key: new.to(like.dtype)}


def copy_where(state, values: dict[str, torch.Tensor], take: torch.Tensor) -> None:
    """``state[k]`` <- ``values[k]`` (stored as ``state[k]`` is: ``stored``) for the blocks
    where ``take`` (n,) bool; the other blocks' entries are left bitwise as they were."""
    for k, v in values.items():
        old = state[k]
        old.copy_(torch.where(take.view(-1, *([1] * (old.dim() - 1))), v, old))


def write_where(state, key: str, new: torch.Tensor, take: torch.Tensor) -> None:
    """``state[key]`` <- ``new`` (n, m, m) for the blocks where ``take`` (n,) bool, stored as
    ``state[key]`` is; the other blocks' stored matrices are left bitwise as they were."""
    copy_where(state, stored(state, key, new), take)
