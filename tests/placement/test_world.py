"""The world mesh read from DeviceMeshes by the ranks they span (``placement.world``).

Pure cases first: the modes of rank walks, the world cut from several meshes' modes, and the
refusals. Then real DeviceMeshes on torch's fake process group (one process plays one rank of
a larger job), made every way torch makes them, read by ``topology.mesh_layout`` from two
ranks' points of view; and a pair of meshes no one world holds, refused when the optimizer is
built, naming them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sharded_shampoo.placement.world import WorldMesh, modes_of, world_of
from sharded_shampoo.topology import dtensor_mesh, mesh_layout


def walk(modes):
    """The positions a dim of ``modes`` (outermost first) visits, in row-major order."""
    out = [0]
    for size, stride in reversed(modes):
        out = [k * stride + p for k in range(size) for p in out]
    return out


@pytest.mark.parametrize(
    "modes",
    [
        [],
        [(4, 1)],
        [(2, 4)],
        [(2, 4), (2, 1)],
        [(3, 4), (2, 1)],
        [(2, 1), (2, 2)],
        [(2, 6), (3, 1)],
    ],
)
def test_modes_of_a_walk_are_its_coalesced_modes(modes):
    assert modes_of(walk(modes)) == modes


def test_adjacent_modes_coalesce_and_irregular_walks_are_refused():
    assert modes_of(walk([(2, 2), (2, 1)])) == [(4, 1)]
    assert modes_of([0, 1, 3, 2]) is None  # not row-major over any modes
    assert modes_of([0, 2, 1]) is None  # 3 entries, a run of 2
    assert modes_of([0, -1]) is None  # a stride must be positive


def test_world_is_the_coarsest_mixed_radix_holding_every_mode():
    # torchtitan's (dp_replicate, fsdp, tp) = (2, 2, 2), beside fsdp x tp flattened.
    dense = [[(2, 4)], [(2, 2)], [(2, 1)]]
    world = world_of(list(range(8)), {"dense": dense, "flat": [[(4, 1)]]})
    assert world.shape == (2, 2, 2)
    assert world.axes(dense, "dense") == ((0,), (1,), (2,))
    assert world.axes([[(4, 1)]], "flat") == ((1, 2),)
    # Two non-adjacent dims flattened, outermost first; and in the other order.
    assert world.axes([[(2, 4), (2, 1)]], "outer") == ((0, 2),)
    assert world.axes([[(2, 1), (2, 4)]], "reversed") == ((2, 0),)
    # One mesh alone: as coarse as its dims.
    assert world_of(list(range(8)), {"flat": [[(4, 1)]]}).shape == (2, 4)
    assert world_of(list(range(8)), {}).shape == (8,)


def test_meshes_no_one_world_holds_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"cut the 6 ranks.*pairs: \[\[\(2, 1\)\]\].*triples"):
        world_of(list(range(6)), {"pairs": [[(2, 1)]], "triples": [[(3, 1)]]})
    world = WorldMesh(list(range(8)), (2, 4))
    with pytest.raises(ValueError, match="late: its dims .* do not fit the world mesh"):
        world.axes([[(2, 2)]], "late")  # stride 2 cuts inside the world's dim of 4
    with pytest.raises(ValueError, match="two of its dims span the same ranks"):
        world.axes([[(2, 4)], [(2, 4)]], "twice")


def test_world_mesh_coordinates_follow_its_rank_order():
    world = WorldMesh([0, 2, 1, 3], (2, 2))
    assert [world.coord(r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [world.rank(world.coord(r)) for r in range(4)] == list(range(4))
    assert world.position(2) == 1 and world.position(7) is None


@pytest.fixture
def fake_world(request):
    """Rank ``rank`` of a job of ``size`` ranks on torch's fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    size, rank = request.param
    dist.init_process_group("fake", rank=rank, world_size=size, store=FakeStore())
    yield size, rank
    dist.destroy_process_group()


def dtensor_on(mesh, placements, shape=(12, 8)):
    """A DTensor of ``shape`` on ``mesh`` (its local shard uninitialized: the fake group
    moves no data)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    return DTensor.from_local(
        torch.empty(local),
        mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


@pytest.mark.parametrize("fake_world", [(8, 0), (8, 5)], indirect=True)
def test_every_mesh_construction_reads_as_its_ranks(fake_world):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard

    size, rank = fake_world
    root = init_device_mesh("cpu", (size,), mesh_dim_names=("world",))
    line = WorldMesh(list(range(size)), (size,))
    names = ("pp", "dp_replicate", "fsdp", "tp")
    dense = root._unflatten(0, (1, 2, 2, 2), names)
    assert mesh_layout(dense, line) == [[], [(2, 4)], [(2, 2)], [(2, 1)]]
    assert mesh_layout(dense["fsdp"], line) == [[(2, 2)]]
    assert mesh_layout(dense["dp_replicate", "tp"], line) == [[(2, 4)], [(2, 1)]]
    flat = dense["dp_replicate", "tp"]._flatten("dp_replicate_tp")
    assert mesh_layout(flat, line) == [[(2, 4), (2, 1)]]
    assert mesh_layout(dense["fsdp", "tp"]._flatten("fsdp_tp"), line) == [[(4, 1)]]
    grid = torch.arange(size).view(2, 4).T.contiguous()  # columns first
    transposed = DeviceMesh("cpu", grid, mesh_dim_names=("a", "b"))
    assert mesh_layout(transposed, line) == [[(4, 1)], [(2, 4)]]
    # The optimizer's world from DTensors on several of them, and each one's axes.
    params = [
        dtensor_on(dense["dp_replicate", "fsdp", "tp"], [Shard(0), Shard(0), Shard(1)]),
        dtensor_on(flat, [Shard(0)]),
    ]
    world = dtensor_mesh(params)
    assert world.shape == (2, 2, 2)
    assert world.axes(mesh_layout(flat, world), "flat") == ((0, 2),)
    assert world.coord(rank) == ((rank >> 2) & 1, (rank >> 1) & 1, rank & 1)


@pytest.mark.parametrize("fake_world", [(6, 0), (6, 4)], indirect=True)
def test_meshes_no_one_world_holds_are_refused_at_construction(fake_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from sharded_shampoo import ShardedShampoo

    size, _ = fake_world
    root = init_device_mesh("cpu", (size,), mesh_dim_names=("world",))
    pairs = root._unflatten(0, (3, 2), ("x", "pairs"))["pairs"]
    triples = root._unflatten(0, (2, 3), ("y", "triples"))["triples"]
    params = [dtensor_on(pairs, [Shard(0)]), dtensor_on(triples, [Shard(0)])]
    with pytest.raises(ValueError, match=r"cut the 6 ranks in ways no one mesh holds.*pairs"):
        ShardedShampoo(params, lr=0.1)
