"""Meshes made every way torch makes them, against one process (float64, ``DDP_TOLERANCE``).

A parameter's mesh is read by the ranks it spans, not by its dim names (``placement.world``):
FSDP2 and HSDP on meshes ``_unflatten``-ed from a 1-D world mesh (torchtitan 0.3), on a
``_flatten``-ed (dp_shard, cp) dim and a slice of it, on a mix of a flattened dim and its parts,
and on an explicit rank grid in another order; FSDP2 x TP and HSDP x TP on unflattened meshes.
A grid of ranks that is no mesh of evenly strided ranks is refused on every rank.
"""

from __future__ import annotations

import fsdp_cases
import meshes
import pytest
import tp_cases
from harness import run_cases


def refused(rank, world):
    """One layer on the world mesh, another on a 2-D grid whose rows are no evenly strided walk
    of the ranks ([[0, 1], [3, 2]]): the optimizer refuses on every rank, before any step."""
    import torch
    from harness import DEVICE_TYPE
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sharded_shampoo import ShardedShampoo

    model = fsdp_cases.make_net()
    fully_shard(model.inp, mesh=init_device_mesh(DEVICE_TYPE, (world,)))
    grid = torch.tensor([[0, 1], [3, 2]])
    fully_shard(model.out, mesh=DeviceMesh(DEVICE_TYPE, grid, mesh_dim_names=("a", "b")))
    params = [model.inp.weight, model.out.weight]
    try:
        ShardedShampoo(params, **fsdp_cases.OPTIONS)
    except ValueError as e:
        return str(e)
    return "built"


# init_device_mesh's own meshes are test_fsdp.py's and test_tensor_parallel.py's. Steps: two
# refreshes each (FSDP: every 5; Llama: every 4).
KINDS = [k for k in meshes.FSDP_KINDS if k != "init"]
FSDP_STEPS, LLAMA_STEPS = 12, 9


@pytest.fixture(scope="module")
def world4():
    cases = [(fsdp_cases.fsdp, {"meshes": kind, "steps": FSDP_STEPS}) for kind in KINDS]
    cases += [(tp_cases.run, {"mode": m, "steps": LLAMA_STEPS}) for m in tp_cases.UNFLATTENED]
    cases += [(refused, {})]
    results = run_cases(4, cases)
    names = [*KINDS, *tp_cases.UNFLATTENED, "refused"]
    return dict(zip(names, results, strict=True))


@pytest.fixture(scope="module")
def fsdp_reference():
    return fsdp_cases.train_reference(steps=FSDP_STEPS)


@pytest.fixture(scope="module")
def llama_reference():
    return tp_cases.run(0, 1, "single", steps=LLAMA_STEPS)


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_on_every_mesh_matches_single_process(world4, fsdp_reference, kind):
    fsdp_cases.check_against_reference(world4[kind].ok(), fsdp_reference)


@pytest.mark.parametrize("mode", list(tp_cases.UNFLATTENED))
def test_tensor_parallel_on_unflattened_meshes_matches_single_process(
    world4, llama_reference, mode
):
    tp_cases.check(world4[mode].ok(), llama_reference)


def test_a_grid_that_is_no_mesh_is_refused_on_every_rank(world4):
    for message in world4["refused"].ok():
        assert "is not a grid of evenly strided ranks" in message, message
