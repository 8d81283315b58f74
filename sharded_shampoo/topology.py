"""How the parameters are spread over processes, read once from the parameters and the process
group (``Topology``).

Plain parameters with a process group of more than one rank are sharded by block over a 1-D
mesh (DDP style); DTensor parameters (FSDP2, HSDP, tensor parallel, FSDP2 x TP) are split over
their world mesh as their placements say (``placement.sharding``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .blocking import make_blocking
from .options import resolve_merge_dims
from .placement.sharding import Sharding
from .placement.world import Axis, Mode, WorldMesh, modes_of, world_of

__all__ = [
    "MIN_BLOCKS_PER_RANK",
    "Topology",
    "peers_of",
    "auto_shard_width",
    "check_backend",
    "dtensor_mesh",
    "dtensor_sharding",
    "mesh_layout",
    "sharding_of",
    "is_dtensor",
    "iter_tensors",
    "param_device",
    "shard_width",
    "shard_mesh",
]


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


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


def mesh_layout(mesh: Any, world: WorldMesh) -> list[list[Mode]]:
    """Per dim of ``mesh``, the modes (size, stride) its ranks walk over ``world``'s positions,
    read from the ranks of this rank's slice of ``mesh``: however the mesh was made
    (``init_device_mesh``, sliced, ``_unflatten``, ``_flatten``), only which ranks it spans, and
    in which order, count. ValueError when its dims walk no layout of positive strides."""
    grid = mesh.mesh
    at = [world.position(r) for r in grid.flatten().tolist()]
    if None in at:
        raise ValueError(f"the mesh {mesh} spans ranks outside the world's")
    positions = torch.tensor(at, dtype=torch.long).view(grid.shape)
    origin = (0,) * positions.dim()
    walks = [
        (positions[origin[:d] + (slice(None),) + origin[d + 1 :]] - positions[origin]).tolist()
        for d in range(positions.dim())
    ]
    layout = [modes_of(w) for w in walks]
    # The mesh is the sum of its dims' walks (each dim walks alike from every point).
    expected = positions[origin]
    for d, w in enumerate(walks):
        shape = [1] * positions.dim()
        shape[d] = len(w)
        expected = expected + torch.tensor(w, dtype=torch.long).view(shape)
    if None in layout or not torch.equal(expected, positions):
        raise ValueError(
            f"the mesh {mesh} is not a grid of evenly strided ranks in the world's rank order "
            f"(the first DTensor parameter's root mesh's): positions {positions.tolist()}"
        )
    return layout


def dtensor_mesh(params: list) -> WorldMesh | None:
    """The world mesh of the DTensor parameters (``placement.world``), or None when there
    are none: the world's ranks in the first DTensor's root mesh's order, cut so that every
    DTensor's mesh dims are runs of its dims."""
    meshes = {}
    for t in iter_tensors(params):
        if is_dtensor(t):
            meshes.setdefault(t.device_mesh, None)
    if not meshes:
        return None
    if not dist.is_initialized():
        raise ValueError("DTensor parameters need an initialized process group")
    ranks = next(iter(meshes))._get_root_mesh().mesh.flatten().tolist()
    world = dist.get_world_size()
    if sorted(ranks) != list(range(world)):
        raise ValueError(
            "the DTensor parameters' mesh must span the whole world (ranks 0..world_size-1); "
            f"got {ranks}"
        )
    line = WorldMesh(ranks, (world,))  # the positions, before the world is cut
    return world_of(ranks, {str(m): mesh_layout(m, line) for m in meshes})


def sharding_of(
    placements, mesh_axes: tuple[Axis, ...], world_shape: tuple[int, ...], ndim: int, name: str
) -> Sharding:
    """How a tensor of ``ndim`` dims with ``placements`` on a mesh whose dims are the world
    axes ``mesh_axes`` (``WorldMesh.axes``) is split over a world mesh of shape
    ``world_shape``.

    Placements: ``Replicate()``; ``Shard(d)`` (nested left to right); ``_StridedShard(d)`` whose
    ``split_factor`` is the size of the one later mesh dim splitting d (FSDP2 over a
    tensor-parallel dim: it splits inside it). A mesh dim of one rank splits nothing. Anything
    else raises ValueError naming ``name``.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    def size(axis: Axis) -> int:
        return math.prod(world_shape[m] for m in axis)

    by_dim: dict[int, list[tuple[Axis, Any]]] = {}
    for i, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, (Shard, _StridedShard)):
            raise ValueError(
                f"{name}: placement {pl!r} on mesh dim {i} is not supported "
                "(Shard, _StridedShard and Replicate are)"
            )
        if size(mesh_axes[i]) > 1:
            by_dim.setdefault(pl.dim, []).append((mesh_axes[i], pl))
    splits: list[tuple[Axis, ...]] = []
    for d in range(ndim):
        entries = by_dim.get(d, [])
        strided = [k for k, (_, pl) in enumerate(entries) if isinstance(pl, _StridedShard)]
        order = [a for a, _ in entries]
        if strided:
            k = strided[0]
            later = entries[k + 1 :]
            factor = math.prod(size(a) for a, _ in later)
            # DTensor's strided layout is the nested one only inside one later mesh dim (with
            # two, uneven sizes place elements elsewhere): FSDP2 over tensor parallelism.
            if len(strided) > 1 or len(later) > 1 or entries[k][1].split_factor != factor:
                raise ValueError(
                    f"{name}: placements {tuple(placements)} are not supported (a "
                    "_StridedShard must split inside the one later mesh dim sharding its dim)"
                )
            order = [a for a, _ in entries[:k]] + [a for a, _ in later] + [entries[k][0]]
        splits.append(tuple(order))
    return Sharding(world_shape, tuple(splits))


def dtensor_sharding(p: Any, world: WorldMesh, axes: tuple[Axis, ...], name: str) -> Sharding:
    """How DTensor ``p``, whose mesh dims are the world axes ``axes``, is split over the world
    mesh (``sharding_of``), checked against what this rank holds: its local shape always; its
    offset against DTensor's own ``compute_local_shape_and_global_offset`` unless a
    ``_StridedShard`` is involved. For those the data FSDP2 holds is the nested split (it
    chunks each tensor-parallel shard), but DTensor's offsets for uneven splits are not: 7 rows
    on a (3, 2) FSDP2 x TP mesh, rank (2, 0) holds no row and (2, 1) holds row 6, where DTensor
    (torch 2.13) says the reverse (measured with real FSDP2 on 6 ranks)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    sharding = sharding_of(p.placements, axes, world.shape, p.dim(), name)
    box = sharding.box(tuple(p.shape), world.coord(dist.get_rank()))
    local = tuple(p.to_local().shape)
    if any(isinstance(pl, _StridedShard) for pl in p.placements):
        shape, offset = local, tuple(lo for lo, _ in box)
    else:
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    empty = math.prod(local) == 0
    if empty and math.prod(hi - lo for lo, hi in box) == 0:
        # Nothing held: DTensor and the nested chunks may put an empty shard at different
        # shapes and offsets ((0, 0) at (0, 1) against ((0, 2), (1, 1)) for a (3, 1) weight
        # sharded on dim 1 by tensor parallelism and on dim 0 by FSDP2); no piece is cut from it.
        return sharding
    if (
        tuple(hi - lo for lo, hi in box) != local
        or tuple(shape) != local
        or any(hi > lo and lo != o for (lo, hi), o in zip(box, offset, strict=True))
    ):
        raise ValueError(
            f"{name}: placements {tuple(p.placements)} give this rank a local tensor of "
            f"{local} at {tuple(offset)}, not the nested-chunk box {box} this optimizer assumes"
        )
    return sharding


def param_device(params: list) -> torch.device:
    """Where the parameters are (the first one's device; the optimizer requires one)."""
    return next((t.device for t in iter_tensors(params)), torch.device("cpu"))


def check_backend(device: torch.device) -> None:
    """Raises ValueError when the default process group has no backend for ``device``'s
    tensors: FSDP2's ``CPUOffloadPolicy`` keeps parameters on the CPU, which a process group
    started with ``"nccl"`` alone cannot move."""
    group = dist.distributed_c10d._get_default_group()
    types = getattr(group, "_device_types", None)
    if types is None or device.type in {d.type for d in types}:
        return
    raise ValueError(
        f"the parameters are on {device.type} (FSDP2's CPUOffloadPolicy keeps them there), "
        f"but the process group has a backend only for {sorted(d.type for d in types)}: "
        'initialize it with init_process_group("cuda:nccl,cpu:gloo") (or backend=None, '
        "which gives both)"
    )


# Data-parallel sharding needs blocks to balance: with fewer than this many blocks per rank on
# average, the AllGather's pieces (padded to the largest) and the ranks' memory grow uneven.
MIN_BLOCKS_PER_RANK = 8


def auto_shard_width(world: int, num_blocks: int) -> int:
    """How many ranks data-parallel blocks are sharded over when ``num_trainers_per_group`` is
    not given: the largest divisor of the world size that leaves every rank at least
    ``MIN_BLOCKS_PER_RANK`` blocks on average (1: not sharded), replicated across the groups.
    GPT-2 small (about 300 blocks of up to 1024) shards over 32 ranks at 64 or 4,096."""
    fits = [
        k for k in range(1, world + 1) if world % k == 0 and k * MIN_BLOCKS_PER_RANK <= num_blocks
    ]
    return max(fits, default=1)


def shard_width(
    mesh: Any, num_trainers_per_group: int | None, num_blocks: int | None = None
) -> tuple[int, int]:
    """``(k, i)``: blocks are sharded over k ranks, of which this one is the i-th (k = 1: every
    block is computed here). Creates no process group: ranks must first agree on the settings
    (a mesh built from settings that differ between ranks hangs in ``new_group``).

    Without ``mesh`` or ``num_trainers_per_group``, k is ``auto_shard_width`` of
    ``num_blocks``, or the whole world when ``num_blocks`` is None (DTensor parameters: their
    blocks are placed over every rank)."""
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
    mesh2d = init_device_mesh(device_type, (world // k, k), mesh_dim_names=("replicate", "shard"))
    return mesh2d["shard"]


def peers_of(mesh: Any) -> Any:
    """The group whose ranks check that they built the same optimizer (None: the default
    group), or False when there is none: ``mesh``'s ranks when it has several, or every rank
    of an initialized process group of more than one. Derived from the arguments alone, so that
    a rank whose construction failed early still finds the group the others check in."""
    if mesh is not None:
        size = getattr(mesh, "size", None)
        if callable(size) and getattr(mesh, "ndim", None) == 1 and size() > 1:
            return mesh.get_group()
        return False
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return None
    return False


def count_blocks(params: list, defaults: dict[str, Any]) -> int:
    """Blocks of all parameters given at construction (what the automatic sharding width
    depends on). Options not yet checked count as the defaults; the check follows."""
    total = 0
    for item in params:
        options = {**defaults, **item} if isinstance(item, dict) else defaults
        md = options["max_preconditioner_dim"]
        merge = resolve_merge_dims(options["merge_dims"], options["preconditioner"])
        if isinstance(md, bool) or not isinstance(md, int) or md < 1:
            md = defaults["max_preconditioner_dim"]
        for t in iter_tensors([item]):
            total += make_blocking(tuple(t.shape), md, bool(merge)).num_blocks
    return total


class Topology:
    """Where this optimizer's parameters are and who it works with, read once at construction.

    ``world_mesh``: the DTensor parameters' world mesh (None without DTensors). ``shards``: the
    ranks blocks are sharded over, of which this one is ``rank`` (1: every block computed
    here). ``device``: the parameters' device. ``peers``: the group that checks agreement
    (None: the default group), or False when there is no other rank. The sharding mesh is
    created only once the ranks agreed on the settings (``mesh()``): a mesh built from settings
    that differ between ranks hangs in ``new_group``.
    """

    def __init__(
        self,
        params: list,
        mesh: Any,
        num_trainers_per_group: int | None,
        defaults: dict[str, Any],
        communication_dtype: torch.dtype,
        exchange_buckets: int = 1,
    ) -> None:
        self.world_mesh = dtensor_mesh(params)
        self._mesh_axes: dict[Any, tuple[Axis, ...]] = {}
        self.exchange_buckets = exchange_buckets
        if self.world_mesh is not None and (mesh is not None or num_trainers_per_group is not None):
            raise ValueError(
                "with DTensor parameters the optimizer shards over the whole "
                "world: mesh and num_trainers_per_group must be left at None"
            )
        blocks = None if self.world_mesh is not None else count_blocks(params, defaults)
        self.shards, self.rank = shard_width(mesh, num_trainers_per_group, blocks)
        self._mesh = mesh if self.shards > 1 else None
        self.distributed = self.shards > 1 or self.world_mesh is not None
        # Ranks check that they built the same optimizer whenever there are several, sharded
        # or not (a replicated optimizer whose ranks disagree diverges silently).
        self.peers = peers_of(mesh)
        self.device = param_device(params)
        if self.distributed:
            check_backend(self.device)
        self.settings = [
            ("setting", "the number of ranks blocks are sharded over", self.shards),
            ("setting", "communication_dtype", str(communication_dtype)),
            # How many collectives each exchange is split into: the same everywhere, or a rank
            # waits in one the others never issue.
            ("setting", "exchange_buckets", exchange_buckets),
            (
                "setting",
                "the DTensor parameters' world mesh",
                None if self.world_mesh is None else self.world_mesh.shape,
            ),
        ]
        # Built before torch.distributed was initialized (the optimizer is then not sharded):
        # worth a warning at the first step if a process group exists by then.
        self.late_process_group = (
            mesh is None
            and num_trainers_per_group is None
            and self.world_mesh is None
            and not (dist.is_available() and dist.is_initialized())
        )

    @property
    def checks_agreement(self) -> bool:
        return self.peers is not False

    @property
    def agreement_group(self) -> Any:
        return self.peers if self.peers is not False else None

    def warn_if_built_too_early(self) -> None:
        """Warns, once, when the optimizer was built before torch.distributed was initialized
        and a process group of several ranks exists now (the Hugging Face Trainer's order)."""
        if not self.late_process_group:
            return
        self.late_process_group = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from .diagnostics import warn

            warn(
                UserWarning(
                    "ShardedShampoo was built before torch.distributed was initialized, so it "
                    "does not shard: every rank keeps the state of every block and computes "
                    "it. Build the optimizer after init_process_group (under the Hugging Face "
                    "Trainer: after TrainingArguments)."
                )
            )

    def sharding(self, p: Any, name: str) -> Sharding:
        """How DTensor ``p`` is split over the world mesh (``dtensor_sharding``); each mesh's
        dims are read onto the world's once."""
        if self.world_mesh is None:
            raise ValueError("DTensor parameters must be passed when the optimizer is built")
        mesh = p.device_mesh
        if mesh not in self._mesh_axes:
            self._mesh_axes[mesh] = self.world_mesh.axes(
                mesh_layout(mesh, self.world_mesh), f"{name}: its mesh {mesh}"
            )
        return dtensor_sharding(p, self.world_mesh, self._mesh_axes[mesh], name)

    def mesh(self) -> Any:
        """The 1-D mesh blocks are sharded over (created on first use), or None."""
        if self.shards > 1 and self._mesh is None:
            self._mesh = shard_mesh(self.shards, self.device.type)
        return self._mesh
