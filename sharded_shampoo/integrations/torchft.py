"""ShardedShampoo under torchft: fault-tolerant replica groups that die, restart and rejoin.

torchft (``pip install torchft``) runs each replica group as its own job (one process, DDP or
FSDP2 over the group's ranks); a ``torchft.Manager`` averages gradients across the groups
that are alive, commits or skips each step on every group alike, and a restarted group
recovers the model and optimizer state live from a healthy group before it steps again.

ShardedShampoo runs inside a group as anywhere else (its collectives use the group's own
process group); what torchft needs from it:

- ``replica_state(model, optimizer)``: the functions the ``Manager`` takes as
  ``state_dict`` / ``load_state_dict`` (or ``register_state_dict_fn``). Rank r of a recovering
  group receives what rank r of a healthy group holds: its shard of the model and its blocks of
  the optimizer's state (the same ones: the groups have the same shape, so the same plan),
  with the per-block checksums verified on load.
- ``average_across_groups(model, manager)``: FSDP2's gradients averaged over the groups by the
  manager after each reduce-scatter (FSDP2's all-reduce hook), for FSDP2 inside a group. (A
  group of one rank, or DDP: ``torchft.DistributedDataParallel(manager, model)``.)

A step the manager does not commit (``torchft.optim.OptimizerWrapper`` does not call the
optimizer's ``step()`` then) leaves the optimizer as it was: its state, its step count and its
refreshes in flight (installed at a group's step count, which only a step advances) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

__all__ = ["average_across_groups", "replica_state"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def replica_state(
    model: torch.nn.Module, optimizer: Any
) -> tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """``(state_dict, load_state_dict)`` for ``torchft.Manager``: this rank's part of the model
    (its local shards, copied) and of ``optimizer`` (a ShardedShampoo: its blocks, copied), and
    the load of what a healthy peer sent, on this rank alone (``load_rank_state_dict``)."""

    def tensors() -> dict[str, torch.Tensor]:
        # Not model.state_dict(): torchft may ask from its quorum thread while the forward
        # runs, and FSDP2's state-dict hooks would reshard under it.
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def state_dict() -> dict[str, Any]:
        with optimizer.sharded_state():
            optim = optimizer.state_dict()
        return {
            "model": {k: _local(v).detach().clone() for k, v in tensors().items()},
            "optimizer": optim,
        }

    def load_state_dict(state: dict[str, Any]) -> None:
        ours = tensors()
        if set(ours) != set(state["model"]):
            missing = sorted(set(ours) - set(state["model"]))[:3]
            unexpected = sorted(set(state["model"]) - set(ours))[:3]
            raise ValueError(
                "the replica group's peer sent another model's state (missing "
                f"{missing}, unexpected {unexpected})"
            )
        # On this rank alone: torchft may recover some ranks of a group and not others (at its
        # first step, with init_sync).
        optimizer.load_rank_state_dict(state["optimizer"])  # checks everything first
        with torch.no_grad():
            for key, value in ours.items():
                _local(value).copy_(state["model"][key])

    return state_dict, load_state_dict


def average_across_groups(model: torch.nn.Module, manager: Any) -> None:
    """Averages FSDP2's reduce-scattered gradients over the replica groups alive, through
    ``manager`` (a ``torchft.Manager``), on every FSDP2 module of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    def hook(output: torch.Tensor) -> None:
        manager.allreduce(output).wait()

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(hook)
