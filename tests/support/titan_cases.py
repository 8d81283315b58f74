"""Cases for test_torchtitan.py: torchtitan's own optimizer container, LR schedulers, gradient
clipping and checkpoint manager around ShardedShampoo, on the small Llama of tp_cases.

torchtitan's trainer itself does not run on CPU/gloo (see the README), so the training loop is
the trainer's, written out: zero_grad, forward/backward, ``clip_grad_norm_``, the optimizers'
step, the schedulers' step, ``CheckpointManager.save``.
"""

from __future__ import annotations

import os

import tp_cases

STEPS, FIRST = 10, 5  # a checkpoint after FIRST steps
OPTIONS = {**tp_cases.OPTIONS, "precondition_frequency": 3}
COMMUNICATION = tp_cases.OPTIONS["communication_dtype"]


def build(mode, world, root, folder, async_mode="disabled"):
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer

    from sharded_shampoo.integrations.torchtitan import sharded_shampoo_config

    # Without the logit scale: under FSDP2 x TP it would sit on the "dp" slice of the mesh, and
    # torchtitan's clip_grad_norm_ stacks the norms of all parameters, which DTensor refuses
    # across meshes (torchtitan's models keep every parameter on one mesh).
    model = tp_cases.make_llama(scaled=False)
    wrapped, dp, index = tp_cases.parallelize(model, mode, world)
    options = {k: v for k, v in OPTIONS.items() if k != "communication_dtype"}
    optimizers = sharded_shampoo_config(
        factory_kwargs={"communication_dtype": COMMUNICATION}, **options
    ).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(
        optimizers=optimizers, training_steps=STEPS
    )
    checkpointer = CheckpointManager.Config(
        enable=True,
        folder=folder,
        interval=FIRST,
        async_mode=async_mode,
        last_save_model_only=False,
    ).build(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={},
        sd_adapter=None,
        base_folder=root,
    )
    return model, wrapped, optimizers, schedulers, checkpointer, (dp, index)


def train(model, wrapped, optimizers, schedulers, checkpointer, data, start, stop):
    from torchtitan.distributed.utils import clip_grad_norm_

    losses, lrs = [], []
    for step in range(start, stop):
        optimizers.zero_grad()
        losses.append(tp_cases.train_backward(wrapped, data, step))
        clip_grad_norm_([p for p in model.parameters()], max_norm=1.0)
        optimizers.step()
        schedulers.step()
        lrs.append(optimizers.optimizers[0].param_groups[0]["lr"])
        checkpointer.save(curr_step=step + 1, last_step=step + 1 == STEPS)
    checkpointer.maybe_wait_for_staging()
    checkpointer.maybe_wait_for_saving()
    return losses, lrs


def run(rank, world, mode, root, async_mode="disabled"):
    """Uninterrupted STEPS (checkpoints every FIRST steps), then a fresh job that loads the
    checkpoint of step FIRST and trains the rest: both runs' losses and final parameters."""
    folder = f"{mode}-{async_mode}"
    parts = build(mode, world, root, folder, async_mode)
    losses, lrs = train(*parts[:5], parts[5], 0, STEPS)
    full = tp_cases.full_params(parts[0])
    parts[4].close()
    # A new job: the same config; the manager loads step FIRST from the same folder.
    parts = build(mode, world, root, folder, async_mode)
    assert parts[4].load(step=FIRST)
    resumed, resumed_lrs = train(*parts[:5], parts[5], FIRST, STEPS)
    parts[4].close()
    return {
        "losses": losses,
        "lrs": lrs,
        "params": full,
        "resumed": resumed,
        "resumed_lrs": resumed_lrs,
        "resumed_params": tp_cases.full_params(parts[0]),
        "saved": sorted(os.listdir(os.path.join(root, folder))),
    }
