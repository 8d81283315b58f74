"""DTensor geometry (every placement), and what the exchange sends, without processes.

The reference for what a rank holds is torch's own ``_compute_local_shape_and_global_offset``
(what DCP uses); pieces are checked against a brute-force intersection of every block with
every rank's box.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Partial, _StridedShard

from sharded_shampoo.blocking import make_blocking
from sharded_shampoo.options import OPTION_DEFAULTS, GroupOptions
from sharded_shampoo.placement import GroupSpec, Plan, WorldMesh, pieces_of_block, shard_pieces
from sharded_shampoo.placement.routes import PieceRoutes, stack_buckets
from sharded_shampoo.placement.sharding import block_box, largest_piece
from sharded_shampoo.topology import sharding_of


def torch_box(shape, mesh_shape, coord, placements):
    """What the rank at ``coord`` holds: DTensor's own computation, except along a dim split by
    a ``_StridedShard`` (FSDP2 over tensor parallelism), where it is what FSDP2 really holds
    (checked with FSDP2 on 6 ranks): the tensor-parallel chunk, chunked again by FSDP2, both by
    torch.chunk. (DTensor's offsets disagree with FSDP2's data for some uneven splits.)"""
    size, offset = _compute_local_shape_and_global_offset(
        shape, mesh_shape, list(coord), placements
    )
    out = [(o, o + n) if n else None for n, o in zip(size, offset, strict=True)]
    for m, pl in enumerate(placements):
        if isinstance(pl, _StridedShard):
            inner = next(k for k, q in enumerate(placements) if k > m and q == Shard(pl.dim))
            rows = torch_chunk(torch.arange(shape[pl.dim]), mesh_shape[inner], coord[inner])
            rows = torch_chunk(rows, mesh_shape[m], coord[m])
            out[pl.dim] = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else None
    return tuple(out)


def torch_chunk(t, n, i):
    """Chunk ``i`` of ``t`` split into ``n`` by torch.chunk (empty past the last chunk)."""
    chunks = t.chunk(n)
    return chunks[i] if i < len(chunks) else t[:0]


def brute_block_box(b, bid):
    """Block ``bid`` in the parameter's dims, by cutting an index tensor of the full shape."""
    idx = torch.arange(b.numel).view(b.merged)[b.block_slices(bid)].flatten()
    coords = torch.stack(torch.unravel_index(idx, b.shape), 1) if b.shape else None
    if coords is None:
        return ()
    return tuple((int(c.min()), int(c.max()) + 1) for c in coords.T)


@st.composite
def layouts(draw):
    """A tensor shape, a world mesh, the parameter mesh's dims as axes of the world (each one
    or more world dims flattened, in any order; world dims in none replicate) and placements."""
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    world = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=4)))
    order = draw(st.permutations(range(len(world))))
    labels = [draw(st.integers(-1, len(world) - 1)) for _ in world]
    axes = [tuple(m for m in order if labels[m] == k) for k in range(len(world))]
    axes = tuple(a for a in axes if a) or ((order[0],),)
    placements = []
    for _ in axes:
        d = draw(st.integers(-1, len(shape) - 1))
        placements.append(Replicate() if d < 0 else Shard(d))
    if draw(st.booleans()):
        # FSDP2 over tensor parallelism: the first mesh dim splits inside the later ones.
        # (DTensor places uneven elements elsewhere with two later mesh dims: refused.)
        d = next((p.dim for p in placements[1:] if isinstance(p, Shard)), None)
        later = [m for m, p in enumerate(placements) if m > 0 and d is not None and p == Shard(d)]
        if len(later) == 1:
            size = math.prod(world[m] for m in axes[later[0]])
            placements[0] = _StridedShard(d, split_factor=size)
    return shape, world, axes, placements


def axis_coord(world, axes, c):
    """The parameter mesh's coordinate of world coordinate ``c``: row-major on each axis."""
    out = []
    for axis in axes:
        k = 0
        for m in axis:
            k = k * world[m] + c[m]
        out.append(k)
    return tuple(out)


@settings(max_examples=400, deadline=None)
@given(layout=layouts(), max_dim=st.integers(1, 12), merge=st.booleans())
def test_boxes_and_pieces_match_torch_for_every_placement(layout, max_dim, merge):
    shape, world, axes, placements = layout
    sharding = sharding_of(placements, axes, world, len(shape), "p")
    b = make_blocking(shape, max_dim, merge)
    coords = list(itertools.product(*(range(n) for n in world)))
    mesh_shape = tuple(math.prod(world[m] for m in a) for a in axes)
    boxes = {}
    for c in coords:
        mine = sharding.box(shape, c)
        expected = torch_box(shape, mesh_shape, axis_coord(world, axes, c), placements)
        assert all(
            e is None and lo == hi or e == (lo, hi)
            for (lo, hi), e in zip(mine, expected, strict=True)
        )
        boxes[tuple(c[m] for m in sharding.shard_dims)] = mine
    # Replicas (same coordinates on the sharding mesh dims) hold the same box.
    assert len(boxes) == len({tuple(c[m] for m in sharding.shard_dims) for c in coords})
    for bid in range(b.num_blocks):
        box = block_box(b, bid)
        assert box == brute_block_box(b, bid)
        brute = []
        for shard, mine in sorted(boxes.items()):
            inter = tuple(
                (max(a, lo), min(z, hi)) for (a, z), (lo, hi) in zip(box, mine, strict=True)
            )
            if all(lo < hi for lo, hi in inter):
                brute.append((shard, inter))
        pieces = pieces_of_block(b, sharding, bid)
        assert [(p.shard, p.box) for p in pieces] == brute
        # The pieces tile the block.
        assert sum(p.numel for p in pieces) == torch.Size(b.block_shape(bid)).numel()
        size = {shard: torch.Size([hi - lo for lo, hi in inter]).numel() for shard, inter in brute}
        assert size[largest_piece(b, sharding, bid)] == max(size.values())
    for c in coords:
        shard = tuple(c[m] for m in sharding.shard_dims)
        expected = [
            (bid, p.box)
            for bid in range(b.num_blocks)
            for p in pieces_of_block(b, sharding, bid)
            if p.shard == shard
        ]
        assert [(bid, p.box) for bid, p in shard_pieces(b, sharding, c)] == expected


def test_edge_cases_by_hand():
    def S(*p):
        mesh = (4,) if len(p) == 1 else (2, 2)
        return sharding_of(p, tuple((m,) for m in range(len(p))), mesh, 1, "p")

    # 10 rows on 4 ranks in the torch.chunk layout: 3, 3, 3, 1; 3 rows on 4: one rank empty.
    assert [S(Shard(0)).box((10,), (k,)) for k in range(4)] == [
        ((0, 3),),
        ((3, 6),),
        ((6, 9),),
        ((9, 10),),
    ]
    assert [S(Shard(0)).box((3,), (k,)) for k in range(4)] == [
        ((0, 1),),
        ((1, 2),),
        ((2, 3),),
        ((3, 3),),
    ]
    # FSDP2 x TP on a 2 x 2 mesh, column-parallel: TP halves first, FSDP2 inside each half.
    ss = S(_StridedShard(0, split_factor=2), Shard(0))
    assert [ss.box((10,), (d, t)) for d in range(2) for t in range(2)] == [
        ((0, 3),),
        ((5, 8),),
        ((3, 5),),
        ((8, 10),),
    ]
    # A merged block spans its dims whole: (4, 8, 16) with max_dim 100 merges (4, 8) -> 32.
    lead = make_blocking((4, 8, 16), 100, True)
    assert lead.merged == (32, 16) and block_box(lead, 0) == ((0, 4), (0, 8), (0, 16))


@pytest.mark.parametrize(
    "placements",
    [
        (Partial(), Shard(0)),
        (_StridedShard(0, split_factor=3), Shard(0)),
        (_StridedShard(0, split_factor=4), Shard(0), Shard(0)),
    ],
)
def test_unsupported_placements_are_named(placements):
    with pytest.raises(ValueError, match="layer.weight"):
        sharding_of(placements, ((0,), (1,), (2,)), (2, 2, 2), 2, "layer.weight")


def routes_of(shapes, mesh_shape, placements, buckets=1, **options):
    world = torch.Size(mesh_shape).numel()
    mesh = WorldMesh(list(range(world)), mesh_shape)
    plan = Plan(world, mesh)
    shardings = tuple(
        sharding_of(
            placements, tuple((m,) for m in range(len(mesh_shape))), mesh_shape, len(s), "p"
        )
        for s in shapes
    )
    plan.add_group(
        GroupSpec(
            tuple(shapes),
            (torch.float32,) * len(shapes),
            GroupOptions.from_group({**OPTION_DEFAULTS, **options}),
            shardings,
        )
    )
    return plan, mesh, [PieceRoutes(plan, r, sections=1, buckets=buckets) for r in range(world)]


def bytes_that_must_move(plan, mesh):
    """Over all ranks, from every block's brute-force pieces: each piece's gradient once when
    its owner does not hold it, its direction once to every other holder."""
    total = 0
    for g in plan.groups:
        for pi, b in enumerate(g.blockings):
            sharding = g.spec.sharding(pi)
            coords = list(itertools.product(*(range(n) for n in mesh.shape)))
            for bid in range(b.num_blocks):
                owner, box = g.owners[pi][bid], block_box(b, bid)
                holding: dict[tuple, list[int]] = {}
                for c in coords:
                    mine = sharding.box(b.shape, c)
                    inter = tuple(
                        (max(a, lo), min(z, hi)) for (a, z), (lo, hi) in zip(box, mine, strict=True)
                    )
                    if all(lo < hi for lo, hi in inter):
                        holding.setdefault(inter, []).append(mesh.rank(c))
                for inter, holders in holding.items():
                    n = 4 * torch.Size([hi - lo for lo, hi in inter]).numel()
                    total += n * (owner not in holders) + n * len(set(holders) - {owner})
    return total


GPT_LAYOUTS = [
    ((2,), [Shard(0)]),  # FSDP2
    ((2, 2), [Replicate(), Shard(0)]),  # HSDP
    ((2,), [Shard(1)]),  # tensor parallel, row-wise
    ((2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP2 x TP, column-wise
    ((2, 2), [Shard(0), Shard(1)]),  # FSDP2 x TP, row-wise
    ((2, 2), [Shard(0), Replicate()]),  # FSDP2 x TP, a norm
    ((3, 2), [Shard(1), Shard(0)]),
]


@pytest.mark.parametrize("buckets", [1, 4])
@pytest.mark.parametrize("mesh_shape, placements", GPT_LAYOUTS)
def test_exactly_the_pieces_that_must_move_are_sent(mesh_shape, placements, buckets):
    """No padding: all ranks together send the pieces that must move, plus a flag per piece
    and a few status words per peer, in one collective each way or in buckets; and ranks send
    about equal amounts."""
    from workloads import GPT, GPTConfig

    shapes = [tuple(p.shape) for p in GPT(GPTConfig()).parameters() if p.dim() == 2]
    plan, mesh, built = routes_of(shapes, mesh_shape, placements, buckets)
    assert all(len(r.grad_send) == min(buckets, 3) for r in built)  # 3 block shapes
    minimum = bytes_that_must_move(plan, mesh)
    sent = [routes.bytes_sent(4, 4) for routes in built]
    assert minimum <= sum(sent) <= 1.001 * minimum, (sum(sent), minimum)


def test_set_up_visits_only_a_ranks_own_pieces():
    """4,096 shards of a 4096 x 4096 weight: each rank holds one row; building the exchange
    routes of one rank must not walk the other ranks' pieces (16M of them)."""

    world = 4096
    mesh = WorldMesh(list(range(world)), (world,))
    plan = Plan(world, mesh)
    sharding = sharding_of([Shard(0)], ((0,),), (world,), 2, "w")
    plan.add_group(
        GroupSpec(
            ((4096, 4096),) * 4,
            (torch.float32,) * 4,
            GroupOptions.from_group(OPTION_DEFAULTS),
            (sharding,) * 4,
        )
    )
    routes = PieceRoutes(plan, 7, sections=1)
    # Rank 7 holds one row of each weight: 4 pieces per weight (one per column block).
    assert (
        sum(len(e) for c in routes.grad_send for e in c.entries)
        + sum(len(e) for c in routes.dir_recv for e in c.entries)
        == 32
    )


@pytest.mark.parametrize("buckets", [1, 2, 3, 8])
def test_stack_kinds_are_cut_into_runs_of_about_equal_size(buckets):
    """Each kind of stack (group, dtype, block shape) goes to one bucket: in order of first
    appearance, none empty, at most as many as asked or as there are kinds."""
    from workloads import GPT, GPTConfig

    shapes = [tuple(p.shape) for p in GPT(GPTConfig()).parameters()]
    plan, _, _ = routes_of(shapes, (2,), [Shard(0)], max_preconditioner_dim=256)
    of = stack_buckets(plan, buckets)
    order = list(of.values())
    assert order == sorted(order) and set(order) == set(range(max(order) + 1))
    assert max(order) + 1 == min(buckets, len(of))
