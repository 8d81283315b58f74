"""Block partitions: merging, splitting, regions, and the batched path against per-block math."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_blocks

from sharded_shampoo.algorithm.modes import precondition
from sharded_shampoo.algorithm.step import factor_gram_inputs
from sharded_shampoo.blocking import make_blocking, merged_shape


@pytest.mark.parametrize(
    "shape, max_dim, merge, expected",
    [
        ((), 1024, True, (1,)),
        ((), 1024, False, (1,)),
        ((1, 1), 1024, True, (1,)),
        ((7,), 1024, True, (7,)),
        ((1, 6), 1024, True, (6,)),
        ((1, 6), 1024, False, (1, 6)),
        ((64, 3, 3, 3), 1024, True, (64, 27)),  # conv: 3*3*3 = 27 merges, 64*27 > 1024
        ((64, 3, 3, 3), 27, True, (64, 27)),
        ((64, 3, 3, 3), 26, True, (64, 3, 9)),  # 27 > 26, so only the last two merge
        ((4, 8, 16), 1024, True, (512,)),
        ((4, 8, 16), 200, True, (4, 128)),
        ((4, 8, 16), 100, True, (32, 16)),  # 8*16 > 100, then 4*8 merges
        ((2, 1, 3, 1, 5), 1024, True, (30,)),
        ((768, 3072), 1024, True, (768, 3072)),
    ],
)
def test_merged_shape(shape, max_dim, merge, expected):
    assert merged_shape(shape, max_dim, merge) == expected


def test_blocks_of_a_split_matrix():
    b = make_blocking((10, 12), 8, True)
    assert b.merged == (10, 12)
    assert b.grid == ((8, 2), (8, 4))
    assert b.num_blocks == 4
    assert [b.block_shape(i) for i in range(4)] == [(8, 8), (8, 4), (2, 8), (2, 4)]
    assert b.block_slices(3) == (slice(8, 10), slice(8, 12))
    # Four regions, one per (full | remainder) combination.
    assert sorted(r.block_shape for r in b.regions) == [(2, 4), (2, 8), (8, 4), (8, 8)]


def test_regions_group_equal_blocks():
    b = make_blocking((2100, 3000), 1024, True)
    assert b.grid == ((1024, 1024, 52), (1024, 1024, 952))
    shapes = {r.block_shape: r.num_blocks for r in b.regions}
    assert shapes == {(1024, 1024): 4, (1024, 952): 2, (52, 1024): 2, (52, 952): 1}


def test_empty_parameter_has_no_blocks():
    b = make_blocking((0, 5), 8, True)
    assert b.num_blocks == 0 and b.regions == ()


shapes = st.lists(st.integers(1, 12), min_size=0, max_size=4).map(tuple)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, max_dim=st.integers(1, 20), merge=st.booleans())
def test_regions_tile_the_parameter(shape, max_dim, merge):
    """Every block appears in exactly one region, and the region views read the block's slice,
    as an independent per-block slicing (the test reference) says."""
    b = make_blocking(shape, max_dim, merge)
    merged, slices = ref_blocks(shape, max_dim, merge)
    assert b.merged == tuple(merged)
    assert b.num_blocks == len(slices)
    ids = sorted(i for r in b.regions for i in r.block_ids)
    assert ids == list(range(len(slices)))
    x = torch.arange(math.prod(shape) or 1, dtype=torch.float64).reshape(merged)
    for r in b.regions:
        view = r.view_of(x).reshape(r.num_blocks, *r.block_shape)
        for j, bid in enumerate(r.block_ids):
            assert torch.equal(view[j], x[slices[bid]])
            assert tuple(view[j].shape) == b.block_shape(bid)
            assert b.block_slices(bid) == slices[bid]


@pytest.mark.parametrize("shape", [(5,), (4, 6), (3, 4, 5), (2, 3, 2, 4)])
def test_batched_grams_and_preconditioning_equal_per_block_loops(shape):
    gen = torch.Generator().manual_seed(0)
    n = 5
    g = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    roots = []
    for d in shape:
        a = torch.randn(n, d, d, generator=gen, dtype=torch.float64)
        roots.append(a @ a.mT)
    batched = precondition(g, roots)
    for j in range(n):
        for i, d in enumerate(shape):
            a, b = factor_gram_inputs(g, i)
            unfold = g[j].movedim(i, 0).reshape(d, -1)
            torch.testing.assert_close((a @ b)[j], unfold @ unfold.T, rtol=1e-12, atol=1e-12)
        expected = g[j]
        for i in range(len(shape)):
            expected = torch.tensordot(roots[i][j], expected, dims=([1], [i])).movedim(0, i)
        torch.testing.assert_close(batched[j], expected, rtol=1e-12, atol=1e-12)
