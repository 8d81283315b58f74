"""How gradients reach the blocks' stacks and directions reach the parameters: one distributor
per way the parameters are held, behind one interface.

- ``LocalDistributor``: plain parameters whose blocks are all computed on this rank (one
  process, or every rank replicating the work).
- ``ReplicatedDistributor``: plain parameters every rank holds whole (DDP); each block has one
  owner on a 1-D mesh and an AllGather shares the directions.
- ``ShardedDistributor``: DTensor parameters (FSDP2, HSDP, TP, FSDP2 x TP); pieces travel by
  ``all_to_all``.

A model may need several (FSDP2 with a few plain parameters). The optimizer's step is then the
same whatever the mode: ``collect`` (each distributor starts filling its stacks' gradient
buffers) -> the math on every stack (``arrive`` before it, ``computed`` after it: a bucket's
communication overlaps another's math) -> ``exchange`` (the last directions travel; status
words tell every rank whether any rank failed or stepped differently) -> ``apply`` (only once
every distributor's exchange came back clean, so a failure anywhere changes no parameter
anywhere).
"""

from __future__ import annotations

import torch

from .base import Distributor, StackWork, Step
from .local import LocalDistributor
from .replicated import ReplicatedDistributor
from .sharded import ShardedDistributor


def build_distributors(
    blocks, plan, topology, dtype: torch.dtype, buckets: int = 1
) -> list[Distributor]:
    """One distributor per way the parameters are held. FSDP2 on a single rank still goes
    through the DTensor one (with nothing to send): its parameters are DTensors, which only it
    reads and writes."""
    device, out = topology.device, []
    mesh = topology.mesh()
    if mesh is None:
        out.append(LocalDistributor(blocks, device))
    else:
        replicated = ReplicatedDistributor(
            blocks, plan, topology.rank, mesh, dtype, device, buckets
        )
        if replicated.status_index > 0:  # some rank has blocks of plain parameters
            out.append(replicated)
    if topology.world_mesh is not None:
        out.append(ShardedDistributor(blocks, plan, topology.rank, dtype, device, buckets))
    return out


__all__ = [
    "Distributor",
    "build_distributors",
    "LocalDistributor",
    "ReplicatedDistributor",
    "ShardedDistributor",
    "StackWork",
    "Step",
]
