"""Hugging Face Trainer: checkpoints that hold every rank's blocks.

The Trainer takes ShardedShampoo either built (``optimizers=(opt, scheduler)``) or as a class
(``optimizer_cls_and_kwargs=(ShardedShampoo, {...})``, built after the model is wrapped: the
path HF requires under FSDP). Under DDP the Trainer saves ``optimizer.state_dict()`` from the
main process alone, while a sharded ShardedShampoo keeps on each rank only the blocks it owns:
that call alone cannot say whether the other ranks' blocks are wanted, so it raises
``StateDictRequestError`` naming this callback rather than write a checkpoint that could not
be resumed. ``FullOptimizerStateCallback`` completes it: whenever the Trainer is about to save
(its ``should_save``, set at the end of a step or an epoch), every rank consolidates the
blocks onto rank 0 (``ShardedShampoo.consolidate_state_dict``), whose ``state_dict()`` in the
save then returns them all, written once. Every rank of a resumed job reads the whole dict and
keeps its own blocks, at any world size.

    trainer = Trainer(..., optimizers=(opt, sched), callbacks=[FullOptimizerStateCallback()])

Under FSDP the Trainer saves through DCP (``get_optimizer_state_dict``), which needs no help.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..optimizer import ShardedShampoo
from ..topology import is_dtensor

__all__ = ["FullOptimizerStateCallback"]


class FullOptimizerStateCallback(TrainerCallback):
    """Gathers every rank's blocks onto rank 0 before each save (see the module)."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        return self._before_save(control, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        return self._before_save(control, optimizer)

    @staticmethod
    def _before_save(control, optimizer):
        opt = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
        if not control.should_save or not isinstance(opt, ShardedShampoo):
            return control
        if opt.plan.world_size == 1:
            return control
        if any(is_dtensor(p) for g in opt.param_groups for p in g["params"]):
            return control  # FSDP: saved through DCP, every rank its own blocks
        opt.consolidate_state_dict(to=0)  # a collective: the callbacks run on every rank
        return control
