"""What a block costs the rank that owns it.

The unit is the float32 matrix-product FLOP of this kind of machine. Per step, a block of shape
(d_1, ..., d_k) with ``numel`` elements costs

    sum_i 4 * d_i * numel         its factor Grams (2 d_i numel each) and its preconditioning
                                  (one mode product per dim, 2 d_i numel each)
  + sum_i EIGH_COST * d_i**3 / f  one symmetric eigendecomposition per factor every
                                  ``f = precondition_frequency`` steps
  + ELEMENTWISE_COST * numel      grafting, filtered gradient, momentum, norms, copies

``EIGH_COST`` converts an eigendecomposition into matrix-product FLOPs: measured on this machine
kind, ``torch.linalg.eigh`` of a 256 x 256 float32 matrix takes 3.2 ms and of 1024 x 1024 136 ms
(one thread), 5-8 GFLOP/s counted as d^3, against about 90 GFLOP/s for matrix products: an
eigendecomposition costs about 12-17 matrix-product FLOPs per d^3. ``ELEMENTWISE_COST`` is the
same kind of estimate for the dozen memory-bound passes over a block each step.

Its memory is ``block_state_elements``: a factor and a root per dim (2 d_i^2) plus the vector
states. Within one block shape the two are proportional; across shapes they are not (a 1-D
block of 1024 holds as large a factor as a 1024 x 1024 block and costs almost no compute), so
the planner balances both (``planner``).

So a 1024 x 1024 block (8.6 GFLOP per step plus 2 x 15 GFLOP every f steps) costs far more
than sixteen 256 x 256 blocks (16 x 0.54 GFLOP), though their bytes are the same.
"""

from __future__ import annotations

import math

__all__ = ["EIGH_COST", "ELEMENTWISE_COST", "block_cost", "block_state_elements"]

EIGH_COST = 15.0
ELEMENTWISE_COST = 20.0


def block_cost(shape: tuple[int, ...], precondition_frequency: int) -> float:
    """Estimated matrix-product FLOPs per step for the owner of a block of ``shape``."""
    numel = math.prod(shape)
    per_step = sum(4.0 * d * numel for d in shape) + ELEMENTWISE_COST * numel
    amortized = sum(EIGH_COST * float(d) ** 3 for d in shape) / precondition_frequency
    return per_step + amortized


def block_state_elements(shape: tuple[int, ...], vector_states: int) -> int:
    """Elements of state a block keeps: a factor and a root per dim, plus ``vector_states``
    tensors of the block's own shape (grafting, filtered gradient, momentum)."""
    return sum(2 * d * d for d in shape) + vector_states * math.prod(shape)
