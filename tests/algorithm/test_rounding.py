"""Moving averages kept in bfloat16: stochastic rounding that is unbiased, keeps an average with
beta = 0.999 moving, leaves unchanged values unchanged and rounds a block alike wherever it is
stacked (so on every rank)."""

from __future__ import annotations

import torch

from sharded_shampoo.algorithm.rounding import row_seeds, store_


def _bf16_neighbours(x: float) -> tuple[float, float]:
    """The bfloat16 values just below and above ``x`` (float32 arithmetic on the bits, written
    apart from the package)."""
    bits = torch.tensor([x], dtype=torch.float32).view(torch.int32).item()
    low = bits & ~0xFFFF
    down = torch.tensor([low], dtype=torch.int32).view(torch.float32).item()
    up = torch.tensor([low + 0x10000], dtype=torch.int32).view(torch.float32).item()
    return down, up


def test_rounding_is_unbiased_over_steps():
    """Over 2^16 steps an element's stored value averages to the float32 value (each step
    rounds down or up to the neighbouring bfloat16 values)."""
    for x in (1.0 + 2**-10, -3.3, 1e-5 * 1.37):
        value = torch.full((1, 3), x)
        dst = torch.empty(1, 3, dtype=torch.bfloat16)
        down, up = _bf16_neighbours(abs(x))
        total = torch.zeros(1, 3, dtype=torch.float64)
        for t in range(1, 2**16 + 1, 7):  # every 7th step: a sample of the cycle
            store_(dst, value, None, t)
            got = dst.float().abs()
            assert bool(((got == down) | (got == up)).all()), (x, got)
            total += dst.double()
        mean = total / len(range(1, 2**16 + 1, 7))
        assert torch.allclose(mean, torch.full_like(mean, x), rtol=1e-4), (x, mean)


def test_an_average_with_beta_0999_keeps_moving():
    """EMA of a constant 1 from 0, beta 0.999, 3000 steps: stored in bfloat16 with stochastic
    rounding it stays within 2% of the float32 average; rounded to nearest it stalls."""
    beta, exact = 0.999, 0.0
    stochastic = torch.zeros(1, 64, dtype=torch.bfloat16)
    nearest = torch.zeros(1, 64, dtype=torch.bfloat16)
    for t in range(1, 3001):
        exact = beta * exact + (1 - beta)
        store_(stochastic, stochastic.float() * beta + (1 - beta), None, t)
        nearest.copy_(nearest.float() * beta + (1 - beta))
    assert abs(stochastic.float().mean().item() - exact) < 0.02 * exact
    assert nearest.float().mean().item() < 0.6 * exact  # 1 - 0.999^3000 = 0.95 in float32


def test_unchanged_values_are_stored_unchanged():
    values = torch.randn(4, 5, 6).bfloat16()
    dst = values.clone()
    for t in (1, 2, 999):
        store_(dst, values.float(), row_seeds([(0, 1), (2, 3), (4, 5), (6, 7)], "cpu"), t)
        assert torch.equal(dst, values)


def test_a_block_rounds_alike_in_any_stack():
    """Two blocks stacked together, in the other order, or alone: each rounds the same, given
    its seed (from its parameter and block id) and the step."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 8, 8, generator=gen), torch.randn(1, 8, 8, generator=gen)
    owners = [(3, 0), (5, 2)]
    together = torch.empty(2, 8, 8, dtype=torch.bfloat16)
    store_(together, torch.cat([a, b]), row_seeds(owners, "cpu"), 17)
    swapped = torch.empty(2, 8, 8, dtype=torch.bfloat16)
    store_(swapped, torch.cat([b, a]), row_seeds(owners[::-1], "cpu"), 17)
    alone = torch.empty(1, 8, 8, dtype=torch.bfloat16)
    store_(alone, b, row_seeds(owners[1:], "cpu"), 17)
    assert torch.equal(together[0], swapped[1]) and torch.equal(together[1], swapped[0])
    assert torch.equal(together[1], alone[0])
    # Another step or another block rounds differently somewhere.
    other = torch.empty(1, 8, 8, dtype=torch.bfloat16)
    store_(other, b, row_seeds(owners[1:], "cpu"), 18)
    assert not torch.equal(other, alone)
