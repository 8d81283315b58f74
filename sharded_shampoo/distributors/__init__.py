"""How gradients reach the blocks' stacks and directions reach the parameters: one distributor
per way the parameters are held, behind one interface.

- ``LocalDistributor``: plain parameters whose blocks are all computed on this rank (one
  process, or every rank replicating the work).
- ``ReplicatedDistributor``: plain parameters every rank holds whole (DDP); each block has one
  owner on a 1-D mesh and an AllGather shares the directions.
- ``ShardedDistributor``: DTensor parameters (FSDP2, HSDP, TP, FSDP2 x TP); pieces travel by
  ``all_to_all``.

A model may need several (FSDP2 with a few plain parameters). The optimizer's step is then the
same whatever the mode: ``collect`` (each distributor fills its stacks' gradient buffers) ->
the math on every stack -> ``exchange`` (directions travel; status words tell every rank
whether any rank failed or stepped differently) -> ``apply`` (only once every distributor's
exchange came back clean, so a failure anywhere changes no parameter anywhere).
"""

from .base import Distributor, Status, Step, StackWork
from .local import LocalDistributor
from .replicated import ReplicatedDistributor
from .sharded import ShardedDistributor

__all__ = [
    "Distributor",
    "LocalDistributor",
    "ReplicatedDistributor",
    "ShardedDistributor",
    "Status",
    "StackWork",
    "Step",
]
