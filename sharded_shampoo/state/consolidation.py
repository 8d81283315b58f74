"""Consolidated ("full") state dicts: every block's state, from the ranks that own them.

A rank keeps only the blocks it owns, and ``state_dict()`` presents only those: that is what
DCP's sharded save wants (each block written once, by its owner, with no copy). torch's
``get_optimizer_state_dict(..., StateDictOptions(full_state_dict=True))`` wants every block on
rank 0 (or on every rank): it gathers DTensors and leaves plain tensors as they are, so the
blocks other ranks own would silently be missing. When a full state dict is asked for, the
optimizer gathers them itself (``gather_blocks``): explicitly (``ShardedShampoo.full_state``,
``checkpoint.full_optimizer_state_dict``), or when torch's ``get_optimizer_state_dict`` is
found asking (``full_state_request``). A sharded optimizer whose ``state_dict()`` is called by
torch's state-dict code in a way this cannot read, or by FSDP1's ``optim_state_dict``, raises
instead of returning a dict that holds one rank's blocks and looks full.

Why not present the state as DTensors that torch would gather: a block's state lives on one
arbitrary rank (the planner's choice), which no DTensor placement expresses without a global
shape that depends on the world size; a layout that DTensor does express (contiguous chunks in
rank order) would cost an all_to_all of the whole state on every save, sharded ones included.
Gathering on request costs nothing on the sharded path.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..placement import Plan
from .pool import StatePool
from .stacks import pool_lengths, state_spec

__all__ = [
    "UNSAID",
    "FullRequest",
    "StateDictRequestError",
    "full_state_request",
    "gather_blocks",
]

_TORCH_STATE_DICT = "torch.distributed.checkpoint.state_dict"
# FSDP1's optimizer state-dict functions, which would gather plain tensors by their own rules.
_FSDP1 = "torch.distributed.fsdp"
# Accelerate's save_state: every rank calls state_dict(), the main process (each node's with
# save_on_each_node) writes it.
_ACCELERATE_SAVE = ("accelerate.checkpointing", "save_accelerator_state")
# Accelerate wrapping an optimizer: every rank loads its own state_dict() back, on its device.
_ACCELERATE_WRAP = ("accelerate.optimizer", "__init__")

UNSAID = (
    "ShardedShampoo shards its state over {ranks} ranks, each keeping the blocks it owns, so a "
    "plain state_dict() would hold this rank's blocks only, and a checkpoint saved from one "
    "rank could not be resumed. Say which is wanted: every rank calls "
    "opt.consolidate_state_dict(to=0) before rank 0's state_dict() (every block, on rank 0); "
    "`with opt.full_state(cpu_offload=...):` around a call every rank makes (every block); "
    "`with opt.sharded_state():` when every rank saves its own blocks; torch's "
    "get_optimizer_state_dict and sharded_shampoo.checkpoint say it themselves. Under the "
    "Hugging Face Trainer with DDP: Trainer(..., "
    "callbacks=[sharded_shampoo.integrations.hf.FullOptimizerStateCallback()])"
)


@dataclass(frozen=True)
class FullRequest:
    """A request for a full state dict: every block on every rank, or with ``cpu_offload``
    on rank 0 only, on the CPU (as torch's ``StateDictOptions`` say it)."""

    full_state_dict: bool = True
    cpu_offload: bool = False


class StateDictRequestError(RuntimeError):
    """A sharded optimizer's ``state_dict()`` was called in a way that does not say whether
    every block or this rank's are wanted."""


def full_state_request(sharded: bool) -> Any | None:
    """Which blocks the caller of ``state_dict()`` wants, read from the callers' frames (at
    any depth: a wrapper may add frames), or None (unsaid):

    - torch's ``torch.distributed.checkpoint.state_dict`` code: its options
      (``full_state_dict``, ``cpu_offload``). torch passes none to an optimizer's
      ``state_dict()``; they are a local ``info`` of its frames (a test asserts it is found,
      ``tests/state/test_full_state_dict.py``).
    - Accelerate's ``save_state``, which every rank calls and the main process writes: every
      block, on rank 0 (on each rank with ``save_on_each_node``); Accelerate wrapping the
      optimizer (``AcceleratedOptimizer``), which loads each rank's dict back on its device:
      this rank's blocks.

    Fails closed when ``sharded``: torch's state-dict code in the stack without options this
    can read (a torch that moved them), or FSDP1's ``optim_state_dict``, raise
    ``StateDictRequestError`` instead of returning this rank's blocks as if they were all."""
    frame = sys._getframe(1)
    torch_frames = 0
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == _TORCH_STATE_DICT:
            torch_frames += 1
            info = frame.f_locals.get("info")
            if hasattr(info, "full_state_dict") and hasattr(info, "cpu_offload"):
                return info
        elif (module, frame.f_code.co_name) == _ACCELERATE_SAVE:
            return FullRequest(cpu_offload=not frame.f_locals.get("save_on_each_node", False))
        elif (module, frame.f_code.co_name) == _ACCELERATE_WRAP:
            return FullRequest(full_state_dict=False)
        elif sharded and module.startswith(_FSDP1) and "optim_state_dict" in frame.f_code.co_name:
            raise StateDictRequestError(
                "FSDP1's optim_state_dict cannot hold ShardedShampoo's state (each rank owns "
                "whole blocks, not FSDP1's flat shards): use torch's get_optimizer_state_dict, "
                "or ShardedShampoo.full_state() / checkpoint.full_optimizer_state_dict for "
                "every block"
            )
        frame = frame.f_back
    if sharded and torch_frames:
        raise StateDictRequestError(
            "torch's state-dict code asked for ShardedShampoo's state_dict() without options "
            "this version can read (torch changed where it keeps them): whether every block "
            "or this rank's are wanted is unknown, and one rank's blocks must not pass for "
            "all. Ask explicitly: `with opt.full_state(cpu_offload=...):` around the call "
            "for every block, `with opt.sharded_state():` for this rank's"
        )
    return None


def _fits(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` more fit on ``device`` (with a margin for the step's own work)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


def gather_blocks(
    plan: Plan, rank: int, pools: list[StatePool], group, keep: bool, offload: bool = False
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The state of the blocks other ranks of ``group`` (the ranks blocks are sharded over:
    plan rank r is its group rank r) own, as ``{(group index, parameter index):
    {"blocks.<id>.<name>": tensor}}``; empty unless ``keep``. Every rank must call it.

    Rank r's state is one flat buffer per dtype per param group whose layout every rank knows
    from the plan (``state.pool``: stacks in order, each stack's tensors in ``state_spec``
    order): each is broadcast from its owner into one receive buffer (per dtype, reused for
    every rank), and a rank that keeps the blocks copies them out: onto the CPU with
    ``offload``, or when its device would not hold them all, else onto its device. So no rank
    ever holds more than one other rank's buffer on its device beyond what it keeps. One
    broadcast per (param group, rank, dtype): O(world) collectives, the price of a
    consolidated dict."""
    device = next((p.device for p in pools), torch.device("cpu"))
    sizes = [
        [pool_lengths(g.layout(r), g.spec.opts) for r in range(plan.world_size)]
        for g in plan.groups
    ]
    if keep and not offload:
        others = sum(
            n * dtype.itemsize
            for per_rank in sizes
            for r, lengths in enumerate(per_rank)
            if r != rank
            for dtype, n in lengths.items()
        )
        offload = not _fits(device, others)
    scratch: dict[torch.dtype, torch.Tensor] = {}
    for per_rank in sizes:
        for lengths in per_rank:
            for dtype, n in lengths.items():
                if dtype not in scratch or scratch[dtype].numel() < n:
                    scratch[dtype] = torch.empty(n, dtype=dtype, device=device)
    out: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for gi, g in enumerate(plan.groups):
        opts = g.spec.opts
        mine = pools[gi].buffers
        for r in range(plan.world_size):
            buffers = {}
            for dtype, n in sizes[gi][r].items():
                if n == 0:
                    continue
                buf = mine[dtype] if r == rank else scratch[dtype][:n]
                dist.broadcast(buf, src=dist.get_global_rank(group, r), group=group)
                if r != rank and keep:  # out of the reused buffer, in one copy
                    buffers[dtype] = buf.to("cpu", copy=True) if offload else buf.clone()
            if r == rank or not keep:
                continue
            used = dict.fromkeys(buffers, 0)
            for layout in g.layout(r):
                for key, shape, dtype in state_spec(layout, opts):
                    n = math.prod(shape)
                    stacked = buffers[dtype][used[dtype] : used[dtype] + n].view(shape)
                    used[dtype] += n
                    for j, (pi, bid) in enumerate(layout.row_owner):
                        out.setdefault((gi, pi), {})[f"blocks.{bid}.{key}"] = stacked[j]
    return out
