"""Roots and eigenvectors quantized to 8 bits (``root_dtype="int8"``).

A stored matrix (packed or full, flattened) is cut into runs of ``GROUP`` = 64 entries; each run
keeps one float32 scale (its largest magnitude / 127) and one int8 code per entry (the entry /
scale, rounded to nearest): 1.06 bytes per entry instead of 4, and an entry is off by at most
half a step, ``scale / 2`` (0.4% of its run's largest magnitude). Codes keep the shape of the
matrix they stand for; scales sit beside them as ``<name>_scale``.

Eigenvectors lose orthogonality to quantization (by about the step size); after dequantizing
they are rectified by one Newton-Schulz step, ``Q (3 I - Q^T Q) / 2``, which squares the
distance from orthogonality (as 4-bit Shampoo, Wang et al. 2024, rectifies its eigenvectors).
Roots are used as dequantized. Quantization is per block, so a block is stored alike on every
rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["GROUP", "dequantize", "quantize", "scale_shape"]

GROUP = 64


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scales of one matrix stored with ``shape`` (its entries in runs of ``GROUP``)."""
    return (math.ceil(math.prod(shape) / GROUP),)


def _runs(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, ...) as (n, runs, GROUP), zero-padded."""
    flat = x.reshape(x.shape[0], -1)
    pad = -flat.shape[1] % GROUP
    return F.pad(flat, (0, pad)).view(x.shape[0], -1, GROUP)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, shaped like ``x``) and scales (float32, (n, runs)) of the stack ``x``."""
    runs = _runs(x.float())
    scales = runs.abs().amax(-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(runs / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    numel = math.prod(x.shape[1:])
    return codes.view(x.shape[0], -1)[:, :numel].reshape(x.shape), scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, rectify: bool = False
) -> torch.Tensor:
    """The stack the codes and scales stand for, in ``dtype``; ``rectify``: (n, m, m)
    eigenvectors brought back toward orthogonality (see the module docstring)."""
    runs = _runs(codes.to(dtype)) * scales.to(dtype).unsqueeze(-1)
    numel = math.prod(codes.shape[1:])
    x = runs.view(codes.shape[0], -1)[:, :numel].reshape(codes.shape)
    if rectify:
        eye = torch.eye(x.shape[-1], dtype=dtype, device=x.device)
        x = x @ (1.5 * eye - 0.5 * (x.mT @ x))
    return x
