"""Moving averages kept in bfloat16 (``grafting_dtype``, ``first_moment_dtype``), updated in
float32 and stored with stochastic rounding.

Rounded to nearest, an average with ``beta = 0.999`` stops moving in bfloat16: its increments,
0.1% of its value, are below bfloat16's resolution (0.4%). Rounded stochastically (up with the
probability of the fraction cut off) it is unbiased, and its increments add up on average.

The rounding is deterministic: the bits added before truncation are a function of the block
(its parameter and block id, ``row_seeds``), the element's place in the block and the step, so
a block rounds alike on every rank and at every world size. For one element the added bits run
through all 2^16 values as the step goes on (an odd stride modulo 2^16), and neighbouring
elements and blocks start at different places.

A value already in bfloat16 has zero low bits: what is added never carries into the kept
bits, so an unchanged value (a skipped block's) is stored unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["pattern_bytes", "row_seeds", "store_", "widened"]

_ELEMENT, _ROW, _STEP = 40503, 2654435, 30011  # odd multipliers, small enough for int64


def row_seeds(owners: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """A seed per row of a stack from its (parameter, block id): (n,) int64 on ``device``."""
    seeds = [(param * 1_000_003 + block) % 2_147_483_647 for param, block in owners]
    return torch.tensor(seeds, dtype=torch.int64, device=device)


def widened(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` to compute with in ``dtype``: ``x`` itself when it is kept in ``dtype``, else a
    copy (stored back with ``store_``)."""
    return x if x.dtype == dtype else x.to(dtype)


def store_(dst: torch.Tensor, value: torch.Tensor, seeds: torch.Tensor | None, t: int) -> None:
    """Writes ``value`` (n, ...), in the math dtype, into ``dst``: nothing to do when it is
    ``dst``; into bfloat16 with stochastic rounding; else a copy."""
    if value is dst:
        return
    if dst.dtype != torch.bfloat16:
        dst.copy_(value)
        return
    value = value.float()  # float64 math: to float32 first, then stochastically
    n = value.shape[0]
    flat = value.reshape(n, -1)
    row = 0 if seeds is None else ((seeds.view(n, 1) * _ROW) & 0xFFFF).to(torch.int32)
    # Small ints throughout: the sum stays far below 2^31 before it is reduced mod 2^16.
    noise = (_pattern(flat.shape[1], value.device) + (row + (t * _STEP) % 65536)) & 0xFFFF
    bits = flat.view(torch.int32) + noise
    rounded = bits.bitwise_and_(-65536).view(torch.float32)  # the low 16 bits cleared
    dst.copy_(rounded.view(value.shape))


_PATTERNS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _pattern(numel: int, device: torch.device) -> torch.Tensor:
    """``(element x a) mod 2^16`` for the elements of a block, int32, cached per block size."""
    key = (numel, torch.device(device))
    hit = _PATTERNS.get(key)
    if hit is None:
        element = torch.arange(numel, dtype=torch.int64)
        hit = _PATTERNS[key] = ((element * _ELEMENT) & 0xFFFF).to(device, torch.int32)
    return hit


def pattern_bytes(numel: int) -> int:
    """What ``_pattern`` keeps for one block size on one device."""
    return 4 * numel
