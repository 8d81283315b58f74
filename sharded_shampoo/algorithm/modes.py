"""Mode products: a matrix applied along each dim of every block of a stack."""

from __future__ import annotations

import torch

__all__ = ["factored_dims", "precondition"]


def factored_dims(state, order: int) -> list[int]:
    """The dims of a stack's blocks that have a factor (``max_factor_ratio`` leaves the others
    unpreconditioned)."""
    keys = state.keys()
    return [i for i in range(order) if f"factor_{i}" in keys]


def precondition(m: torch.Tensor, roots: list[torch.Tensor | None]) -> torch.Tensor:
    """``m x_1 P_1 x_2 P_2 ... x_k P_k`` for each block of the stack ``m`` (n, *shape); a
    ``P_i`` of None is the identity.

    Each mode product contracts the leading block dim and moves the result to the back, so after
    k products the dims are in their original order again; every product is one ``bmm`` with no
    copy of its input.
    """
    n, shape = m.shape[0], m.shape[1:]
    x = m
    for p, d in zip(roots, shape, strict=True):
        # x as (n, d, rest): (P @ x)^T = x^T @ P^T, laid out (n, rest, d).
        y = x.reshape(n, d, -1).mT
        x = y if p is None else torch.bmm(y, p.mT.to(m.dtype))
    return x.reshape(m.shape)
