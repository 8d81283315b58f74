"""DeviceMeshes over every rank, made each way torch (and the trainers built on it) makes them.

``fsdp_meshes(kind, world)``: the mesh each layer of fsdp_cases' Net is sharded on (a 1-D mesh
for FSDP2, a 2-D one for HSDP), by ``kind``:

- ``init``: ``init_device_mesh`` over the world (the reference construction);
- ``unflattened``: torchtitan 0.3's way: a 1-D ``("world",)`` mesh ``_unflatten``-ed into
  (pp, dp_replicate, fsdp, tp) = (1, 1, world, 1), FSDP2 on its ``fsdp`` slice;
- ``unflattened_hsdp``: the same into (dp_replicate, fsdp) = (2, world / 2), HSDP on both;
- ``flattened``: a (dp_shard, cp) mesh with the two dims ``_flatten``-ed into one;
- ``flattened_slice``: that flattened dim sliced by name from the 2-D root;
- ``unflattened_flattened``: the 1-D world unflattened into (dp_shard, cp), then flattened
  back (torchtitan's full-DTensor FSDP over dp_shard x cp);
- ``mixed``: some layers FSDP2 on the flattened (dp_shard, cp) dim, others HSDP on its two
  dims (replicated over dp_shard, sharded over cp), as MoE trainers mix meshes;
- ``transposed``: a mesh built from an explicit rank grid in another order than the ranks'
  ([[0, 2], [1, 3]] at 4 ranks), HSDP on it.

``tp_meshes(kind, world)``: ``(tp mesh, data-parallel mesh or None)`` for tp_cases, the
data-parallel one FSDP2's (``unflattened``: FSDP2 x TP from a 1-D world unflattened into
(dp, tp); ``unflattened_hsdp``: HSDP x TP from (dp_replicate, fsdp, tp) = (2, 1, world / 2)).
"""

from __future__ import annotations

from harness import DEVICE_TYPE

FSDP_KINDS = (
    "init",
    "unflattened",
    "unflattened_hsdp",
    "flattened",
    "flattened_slice",
    "unflattened_flattened",
    "mixed",
    "transposed",
)
TP_KINDS = ("unflattened", "unflattened_hsdp")
LAYERS = ("inp", "squeeze", "expand", "out")


def _world(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(DEVICE_TYPE, (world,), mesh_dim_names=("world",))


def _dp_shard_cp(world: int, unflattened: bool = False):
    from torch.distributed.device_mesh import init_device_mesh

    names = ("dp_shard", "cp")
    if unflattened:
        return _world(world)._unflatten(0, (2, world // 2), names)
    return init_device_mesh(DEVICE_TYPE, (2, world // 2), mesh_dim_names=names)


def fsdp_meshes(kind: str, world: int) -> dict[str, object]:
    """The mesh of each of Net's sharded layers and of the root (key ``""``)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if kind == "init":
        mesh = init_device_mesh(DEVICE_TYPE, (world,))
    elif kind == "unflattened":
        names = ("pp", "dp_replicate", "fsdp", "tp")
        mesh = _world(world)._unflatten(0, (1, 1, world, 1), names)["fsdp"]
    elif kind == "unflattened_hsdp":
        names = ("dp_replicate", "fsdp")
        mesh = _world(world)._unflatten(0, (2, world // 2), names)[names]
    elif kind == "flattened":
        mesh = _dp_shard_cp(world)["dp_shard", "cp"]._flatten("dp_shard_cp")
    elif kind == "flattened_slice":
        root = _dp_shard_cp(world)
        root["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh = root["dp_shard_cp"]
    elif kind == "unflattened_flattened":
        mesh = _dp_shard_cp(world, unflattened=True)["dp_shard", "cp"]._flatten("dp_shard_cp")
    elif kind == "mixed":
        both = _dp_shard_cp(world)
        flat = both["dp_shard", "cp"]._flatten("dp_shard_cp")
        return {"inp": flat, "squeeze": both, "expand": flat, "out": both, "": flat}
    elif kind == "transposed":
        import torch

        grid = torch.arange(world).view(world // 2, 2).T.contiguous()
        mesh = DeviceMesh(DEVICE_TYPE, grid, mesh_dim_names=("rep", "shard"))
    else:
        raise ValueError(kind)
    return {name: mesh for name in (*LAYERS, "")}


def tp_meshes(kind: str, world: int):
    """``(tp mesh, data-parallel mesh)`` made by unflattening a 1-D world mesh."""
    if kind == "unflattened":
        mesh = _world(world)._unflatten(0, (2, world // 2), ("dp", "tp"))
        return mesh["tp"], mesh["dp"]
    if kind == "unflattened_hsdp":
        names = ("dp_replicate", "fsdp", "tp")
        mesh = _world(world)._unflatten(0, (2, 1, world // 2), names)
        return mesh["tp"], mesh["dp_replicate", "fsdp"]
    raise ValueError(kind)
