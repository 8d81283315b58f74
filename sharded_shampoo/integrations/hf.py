"""Hugging Face Trainer: checkpoints that hold every rank's blocks.

The Trainer takes ShardedShampoo either built (``optimizers=(opt, scheduler)``) or as a class
(``optimizer_cls_and_kwargs=(ShardedShampoo, {...})``, built after the model is wrapped: the
path HF requires under FSDP). Under DDP the Trainer saves ``optimizer.state_dict()`` from the
main process alone, while a sharded ShardedShampoo keeps on each rank only the blocks it owns:
the checkpoint would lack the other ranks' blocks, and resuming from it raises on every rank
(``load_state_dict`` names what is missing). ``FullOptimizerStateCallback`` completes it: after
each save, every rank gathers all blocks (``ShardedShampoo.full_state_dict``) and the main
process writes them over ``optimizer.pt``. Every rank of a resumed job reads the whole dict and
keeps its own blocks, at any world size.

    trainer = Trainer(..., optimizers=(opt, sched), callbacks=[FullOptimizerStateCallback()])

Under FSDP the Trainer saves through DCP (``get_optimizer_state_dict``), which needs no help.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..optimizer import ShardedShampoo
from ..topology import is_dtensor

__all__ = ["FullOptimizerStateCallback", "OPTIMIZER_FILE"]

OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's name for it


class FullOptimizerStateCallback(TrainerCallback):
    """Rewrites each checkpoint's optimizer file with every rank's blocks (see the module)."""

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        opt = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
        if not isinstance(opt, ShardedShampoo) or opt.plan.world_size == 1:
            return control
        if any(is_dtensor(p) for g in opt.param_groups for p in g["params"]):
            return control  # FSDP: saved through DCP, every rank its own blocks
        full = opt.full_state_dict()  # a collective: on_save runs on every rank
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            torch.save(full, os.path.join(folder, OPTIMIZER_FILE))
        return control
