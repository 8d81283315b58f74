"""How the parameters are spread over processes, read from the parameters and the process group.

Plain parameters with a process group of more than one rank are sharded by block over a 1-D
mesh (DDP style); DTensor parameters are FSDP2 (``Shard(0)``) or HSDP
(``(Replicate(), Shard(0))``) row shards, and their mesh says which rank holds which rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "FsdpMesh",
    "MIN_BLOCKS_PER_RANK",
    "auto_shard_width",
    "check_fsdp_param",
    "device_type",
    "fsdp_mesh",
    "is_dtensor",
    "iter_tensors",
    "shard_width",
    "shard_mesh",
]


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@dataclass(frozen=True)
class FsdpMesh:
    """How FSDP2/HSDP spreads row shards over the world: ``coords[rank] = (replica, shard)``,
    ``holders[shard]`` = the ranks holding that shard, one per replica group."""

    mesh: Any
    num_shards: int
    coords: dict[int, tuple[int, int]]
    holders: dict[int, tuple[int, ...]]


def iter_tensors(params: list):
    for item in params:
        tensors = item["params"] if isinstance(item, dict) else [item]
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for t in tensors:
            if isinstance(t, tuple):  # named parameters
                t = t[1]
            if isinstance(t, torch.Tensor):
                yield t


def fsdp_mesh(params: list) -> FsdpMesh | None:
    """The row-sharding layout of the DTensor parameters, or None when there are none."""
    mesh = None
    for t in iter_tensors(params):
        if is_dtensor(t):
            mesh = t.device_mesh
            break
    if mesh is None:
        return None
    if not dist.is_initialized():
        raise ValueError("DTensor parameters need an initialized process group")
    ranks = mesh.mesh.reshape(-1, mesh.mesh.shape[-1]) if mesh.ndim <= 2 else None
    if ranks is None:
        raise ValueError(f"FSDP2/HSDP meshes have 1 or 2 dims, got {mesh.ndim}")
    world = dist.get_world_size()
    if sorted(ranks.flatten().tolist()) != list(range(world)):
        raise ValueError(
            "the FSDP2/HSDP mesh must span the whole world (ranks 0..world_size-1); "
            f"got {mesh.mesh.tolist()}"
        )
    coords, holders = {}, {}
    for q, row in enumerate(ranks.tolist()):
        for k, r in enumerate(row):
            coords[r] = (q, k)
            holders[k] = holders.get(k, ()) + (r,)
    layout = FsdpMesh(mesh, ranks.shape[1], coords, holders)
    for t in iter_tensors(params):
        if is_dtensor(t):
            check_fsdp_param(t, layout)
    return layout


def check_fsdp_param(p: torch.Tensor, layout: FsdpMesh | None) -> None:
    from torch.distributed.tensor import Replicate, Shard

    if layout is None:
        raise ValueError("DTensor parameters must be passed when the optimizer is built")
    expected = (Shard(0),) if layout.mesh.ndim == 1 else (Replicate(), Shard(0))
    if p.device_mesh != layout.mesh or tuple(p.placements) != expected:
        raise ValueError(
            "DTensor parameters must be FSDP2 (Shard(0)) or HSDP (Replicate(), Shard(0)) "
            f"shards on one mesh; got {tuple(p.placements)} on {p.device_mesh}"
        )


def device_type(params: list) -> str:
    return next((t.device.type for t in iter_tensors(params)), "cpu")


# Data-parallel sharding needs blocks to balance: with fewer than this many blocks per rank on
# average, the AllGather's pieces (padded to the largest) and the ranks' memory grow uneven.
MIN_BLOCKS_PER_RANK = 8


def auto_shard_width(world: int, num_blocks: int) -> int:
    """How many ranks data-parallel blocks are sharded over when ``num_trainers_per_group`` is
    not given: the largest divisor of the world size that leaves every rank at least
    ``MIN_BLOCKS_PER_RANK`` blocks on average (1: not sharded), replicated across the groups.
    GPT-2 small (about 300 blocks of up to 1024) shards over 32 ranks at 64 or 4,096."""
    fits = [k for k in range(1, world + 1) if world % k == 0 and k * MIN_BLOCKS_PER_RANK <= num_blocks]
    return max(fits, default=1)


def shard_width(
    mesh: Any, num_trainers_per_group: int | None, num_blocks: int | None = None
) -> tuple[int, int]:
    """``(k, i)``: blocks are sharded over k ranks, of which this one is the i-th (k = 1: every
    block is computed here). Creates no process group: ranks must first agree on the settings
    (a mesh built from settings that differ between ranks hangs in ``new_group``).

    Without ``mesh`` or ``num_trainers_per_group``, k is ``auto_shard_width`` of
    ``num_blocks``, or the whole world when ``num_blocks`` is None (FSDP2/HSDP: their blocks are
    placed over every rank)."""
    if mesh is not None:
        if num_trainers_per_group is not None:
            raise ValueError("pass either mesh or num_trainers_per_group, not both")
        if mesh.ndim != 1:
            raise ValueError(f"mesh must be a 1-D DeviceMesh, got {mesh.ndim} dims")
        return (mesh.size(), mesh.get_local_rank()) if mesh.size() > 1 else (1, 0)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if num_trainers_per_group is not None:
        k = num_trainers_per_group
    else:
        k = world if num_blocks is None else auto_shard_width(world, num_blocks)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= world or world % k:
        raise ValueError(
            f"num_trainers_per_group must be an int dividing the world size {world}, got "
            f"{num_trainers_per_group!r}"
        )
    if k == 1:
        return 1, 0
    # Groups of k consecutive ranks: rank r is (r // k, r % k) on a (world // k, k) mesh.
    return k, dist.get_rank() % k


def shard_mesh(k: int, device_type: str):
    """The 1-D DeviceMesh of the k ranks this one shards blocks with (see ``shard_width``)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if k == world:
        return init_device_mesh(device_type, (world,))
    mesh2d = init_device_mesh(
        device_type, (world // k, k), mesh_dim_names=("replicate", "shard")
    )
    return mesh2d["shard"]
