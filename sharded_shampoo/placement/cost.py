"""What a block costs the rank that owns it.

The unit is the float32 matrix-product FLOP of this kind of machine. Per step, a block of shape
(d_1, ..., d_k) with ``numel`` elements costs

    sum_i 4 * d_i * numel         its factor Grams (2 d_i numel each) and its preconditioning
                                  (one mode product per dim, 2 d_i numel each)
  + sum_i EIGH_COST * d_i**3 / f  one symmetric eigendecomposition per factor every
                                  ``f = precondition_frequency`` steps
  + ELEMENTWISE_COST * numel      grafting, filtered gradient, momentum, norms, copies

and a block of the spectral preconditioner (no factors) its Newton-Schulz iterations
(``spectral_cost``).

``EIGH_COST`` converts an eigendecomposition into matrix-product FLOPs: measured on this machine
kind, ``torch.linalg.eigh`` of a 256 x 256 float32 matrix takes 3.2 ms and of 1024 x 1024 136 ms
(one thread), 5-8 GFLOP/s counted as d^3, against about 90 GFLOP/s for matrix products: an
eigendecomposition costs about 12-17 matrix-product FLOPs per d^3. ``ELEMENTWISE_COST`` is the
same kind of estimate for the dozen memory-bound passes over a block each step.

Its memory is ``block_state_elements``: a factor and the matrices a refresh writes per dim (a
root: 2 d_i^2, half that packed; eigenvectors are never packed; none for a dim
``max_factor_ratio`` leaves without a factor) plus the vector states. Within one block shape the
two are proportional; across shapes they are not (a 1-D block of 1024 holds as large a factor
as a 1024 x 1024 block and costs almost no compute), so the planner balances both (``planner``).

So a 1024 x 1024 block (8.6 GFLOP per step plus 2 x 15 GFLOP every f steps) costs far more
than sixteen 256 x 256 blocks (16 x 0.54 GFLOP), though their bytes are the same.

With ``stagger_roots`` a block computes its roots in one step of each period, its *phase*
(``phases``), not amortized: the step at phase p costs a rank ``S_r + R_{r,p}``, its
``step_cost`` sum plus the ``root_cost`` of its blocks of phase p. The planner then balances
``S_r`` and, for each block, ``R_{r,p}`` of the block's phase, separately: with every rank near
the mean in both, the slowest step of the period is near ``mean S + max_p mean R_p``, and the
phases are chosen (before owners, from shapes alone) so that the ``R_p`` are even.
"""

from __future__ import annotations

import math

__all__ = [
    "EIGH_COST",
    "ELEMENTWISE_COST",
    "block_cost",
    "block_state_elements",
    "root_cost",
    "spectral_cost",
    "step_cost",
]

EIGH_COST = 15.0
ELEMENTWISE_COST = 20.0


def _factored(shape: tuple[int, ...], dims: tuple[int, ...] | None) -> list[int]:
    """The sizes of the dims that have a factor (``dims``; None: all)."""
    return list(shape) if dims is None else [shape[i] for i in dims]


def block_cost(
    shape: tuple[int, ...], precondition_frequency: int, dims: tuple[int, ...] | None = None
) -> float:
    """Estimated matrix-product FLOPs per step for the owner of a block of ``shape``, its roots
    amortized over the frequency (``dims``: the dims with a factor; None: all)."""
    return step_cost(shape, dims) + root_cost(shape, dims) / precondition_frequency


def step_cost(shape: tuple[int, ...], dims: tuple[int, ...] | None = None) -> float:
    """What a block costs its owner in every step: Grams, preconditioning, elementwise work."""
    numel = math.prod(shape)
    return sum(4.0 * d * numel for d in _factored(shape, dims)) + ELEMENTWISE_COST * numel


def spectral_cost(shape: tuple[int, ...], steps: int) -> float:
    """What spectral descent's Newton-Schulz iterations cost a block every step: per step, on
    the block as an m x n matrix (m the smaller side), a Gram matrix (2 m^2 n), its square
    (2 m^3) and the product with the iterate (2 m^2 n)."""
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if shape else 1
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def root_cost(shape: tuple[int, ...], dims: tuple[int, ...] | None = None) -> float:
    """What a block's root computation costs, in the step it happens."""
    return sum(EIGH_COST * float(d) ** 3 for d in _factored(shape, dims))


def block_state_elements(
    shape: tuple[int, ...],
    vector_states: int,
    dims: tuple[int, ...] | None = None,
    packed: bool = False,
    bases: tuple[str, ...] = ("root",),
) -> int:
    """Elements of state a block keeps: per dim with a factor (``dims``; None: all) the factor
    and the matrices of ``bases`` (``GroupOptions.bases``: roots symmetric, upper triangles
    when ``packed``; eigenvectors full), plus ``vector_states`` tensors of the block's own
    shape (grafting, filtered gradient, momentum)."""
    symmetric = (lambda d: d * (d + 1) // 2) if packed else (lambda d: d * d)
    matrices = sum(
        symmetric(d) + sum(symmetric(d) if b == "root" else d * d for b in bases)
        for d in _factored(shape, dims)
    )
    return matrices + vector_states * math.prod(shape)
