"""Symmetric matrices stored as their upper triangles (``symmetric_packing``).

A stack of symmetric (m, m) matrices is kept as (n, m (m + 1) / 2): the entries ``(i, j)``,
``i <= j``, row by row, as ``torch.triu_indices`` lists them (the reference implementation's
packed format too). The math unpacks into a temporary (``unpack``, one gather) and writes back
the upper triangle (``pack``, one gather): lossless, since the matrices are symmetric; what is
kept between steps is half the size.

A full (n, m, m) tensor passes through both unchanged, so the math is written once for both
storages. The index tensors are cached per (m, device), in int32 (the largest block of 8192
has 33.6M entries).
"""

from __future__ import annotations

import math
import re

import torch

__all__ = [
    "index_bytes",
    "pack",
    "other_layout",
    "packed_order",
    "packed_size",
    "relayout",
    "symmetric_state",
    "unpack",
]

_INDICES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def packed_size(m: int) -> int:
    """Entries of the upper triangle of an (m, m) matrix."""
    return m * (m + 1) // 2


def packed_order(p: int) -> int | None:
    """The m of a packed (m, m) matrix of ``p`` entries; None when ``p`` is no such size."""
    m = (math.isqrt(8 * p + 1) - 1) // 2
    return m if packed_size(m) == p else None


def _indices(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper, full): ``upper[k]``, the flat position in an (m, m) matrix of packed entry k;
    ``full[i * m + j]``, the packed entry holding (i, j) or (j, i)."""
    key = (m, torch.device(device))
    hit = _INDICES.get(key)
    if hit is None:
        rows, cols = torch.triu_indices(m, m)
        upper = rows * m + cols
        full = torch.empty(m * m, dtype=torch.long)
        entries = torch.arange(rows.numel())
        full[upper] = entries
        full[cols * m + rows] = entries
        hit = _INDICES[key] = (upper.to(device, torch.int32), full.to(device, torch.int32))
    return hit


def index_bytes(m: int) -> int:
    """What ``_indices`` keeps for one block size on one device."""
    return 4 * (packed_size(m) + m * m)


def pack(x: torch.Tensor) -> torch.Tensor:
    """The upper triangles of ``x`` (..., m, m) as (..., m (m + 1) / 2)."""
    m = x.shape[-1]
    upper, _ = _indices(m, x.device)
    return x.flatten(-2).index_select(-1, upper)


def unpack(x: torch.Tensor) -> torch.Tensor:
    """The symmetric (n, m, m) matrices of packed ``x`` (n, p): a new tensor. Full ``x``
    (n, m, m): ``x`` itself."""
    if x.dim() == 3:
        return x
    m = packed_order(x.shape[-1])
    if m is None:
        raise ValueError(f"{x.shape[-1]} is not the size of a packed symmetric matrix")
    _, full = _indices(m, x.device)
    return x.index_select(-1, full).view(*x.shape[:-1], m, m)


def other_layout(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of one symmetric matrix of ``shape`` in the other layout: (m, m) packed,
    (p,) full; None when ``shape`` is neither."""
    if len(shape) == 2 and shape[0] == shape[1]:
        return (packed_size(shape[0]),)
    if len(shape) == 1:
        m = packed_order(shape[0])
        return None if m is None else (m, m)
    return None


def symmetric_state(key: str) -> bool:
    """Whether the state named ``key`` (``...factor_i``, ``...root_i`` or a refresh in
    flight's ``...pending_root_i``) is a symmetric matrix."""
    return re.fullmatch(r"(factor|root|pending_root)_\d+", key.rsplit(".", 1)[-1]) is not None


def relayout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """One symmetric matrix ``x`` as ``shape`` (a state dict saved with the other
    ``symmetric_packing``): converted, or ``x`` when it has that shape; None when it is
    neither."""
    shape = tuple(shape)
    if tuple(x.shape) == shape:
        return x
    if other_layout(tuple(x.shape)) != shape:
        return None
    return pack(x) if x.dim() == 2 else unpack(x.unsqueeze(0))[0]
