"""Spectral descent (Muon) and the fixed update norms, for a stack of same-shape blocks.

A block is a matrix of ``rows`` (its first dim) by ``cols`` (the product of the others). Its
polar factor ``U V^T`` (``M = U S V^T``) is what Muon steps along; ``orthogonalize``
approximates it with an odd polynomial iteration, products only:
``X <- a X + (b X X^T + c (X X^T)^2) X`` from ``X = M / ||M||_F`` (wide: on ``M^T``, so that
the Gram matrices are the smaller side's). ``"muon"``: Keller Jordan's quintic, the same
``(a, b, c)`` every step, as ``torch.optim.Muon`` (which runs it in bfloat16; here it runs in
the math dtype); ``"polar_express"``: Amsel et al.'s schedule, a triple per step, from
``M / (1.02 ||M||_F + 1e-6)``, as modded-nanogpt runs it.

The update's size is fixed by the block's shape (``grafting`` "shape" or "rms"): the norm
of the block's scaled polar factor, ``sqrt(min(rows, cols))`` times Muon's multiplier,
``sqrt(max(1, rows / cols))`` ("shape", torch.optim.Muon's "original") or
``0.2 sqrt(max(rows, cols))`` ("rms": root mean square 0.2, AdamW's, as its
"match_rms_adamw"). Spectral descent applies the multiplier to its orthogonalized direction,
as Muon does; any other direction is scaled to that norm.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fixed_norm", "muon_multiplier", "orthogonalize"]

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express's five-step schedule with its 2% safety factor (as modded-nanogpt).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# torch.optim.Muon's floor on the norm it divides by.
_MUON_EPS = 1e-7


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


def orthogonalize(m: torch.Tensor, method: str, steps: int) -> torch.Tensor:
    """The approximate polar factor of each block of ``m`` (n, *shape), a new tensor of the
    same shape (see the module docstring)."""
    n, shape = m.shape[0], m.shape[1:]
    rows, cols = _matrix_shape(shape)
    x = m.reshape(n, rows, cols)
    if rows > cols:
        x = x.mT
    norms = torch.linalg.matrix_norm(x).view(n, 1, 1)
    if method == "muon":
        x = x / norms.clamp_min(_MUON_EPS)
        schedule = [MUON_COEFFICIENTS] * steps
    else:
        x = x / (norms * 1.02 + 1e-6)
        schedule = list(POLAR_EXPRESS_COEFFICIENTS[:steps])
    for a, b, c in schedule:
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if rows > cols:
        x = x.mT
    return x.reshape(m.shape)


def muon_multiplier(kind: str, shape: tuple[int, ...]) -> float:
    """What Muon multiplies a block's polar factor by: ``kind`` "shape" or "rms"."""
    rows, cols = _matrix_shape(shape)
    if kind == "shape":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def fixed_norm(kind: str, shape: tuple[int, ...]) -> float:
    """The Frobenius norm of a block's polar factor scaled by ``muon_multiplier``."""
    rows, cols = _matrix_shape(shape)
    return math.sqrt(min(rows, cols)) * muon_multiplier(kind, shape)
