"""Cases for test_torchtitan.py, run on every rank of a spawned group (each installs
``titan_train``'s CPU shims before importing torchtitan's trainer).

- ``trainer``: torchtitan's own ``Trainer`` (what ``torchtitan.train`` builds) on
  ``titan_job``'s config: its ``ParallelDims`` meshes, its Llama 3 debug model parallelized by
  its ``parallelize_llama``, its optimizer container holding ShardedShampoo, its LR schedulers,
  gradient clipping, training loop and checkpointer. Trains 6 steps saving at 3 and 6; a
  second job (new processes) on the same folder resumes from step 3 and trains to 6.
- ``built``: the same trainer built, not trained (context parallelism, whose attention has no
  CPU kernels): the optimizer's view of its meshes.
- ``dims``: tp_cases' float64 Llama on the meshes ``ParallelDims(...).build_mesh()`` makes,
  against one process.
"""

from __future__ import annotations

import contextlib
import os
import time
import types

import titan_train
import torch
from harness import to_host

STEPS, FIRST = 6, 3  # the job saves every FIRST steps; the resumed job starts at FIRST
LAYERS = 2


def config(folder: str, degrees: dict[str, int], backend: str, **checkpoint):
    """``titan_job``'s config with these parallelism degrees (torchtitan's names, without
    ``_degree``) and checkpoint options (after ``titan_train.install_cpu_shims``)."""
    import titan_job

    job = titan_job.shampoo_debugmodel()
    # Two of the debug model's six layers: the same kinds of parameters, a third of the time.
    del job.model_spec.model.layers[LAYERS:]
    job.dump_folder = folder
    job.training.steps = STEPS
    job.checkpoint.interval = FIRST
    job.parallelism.spmd_backend = backend
    for name, degree in degrees.items():
        setattr(job.parallelism, f"{name}_degree", degree)
    for name, value in checkpoint.items():
        setattr(job.checkpoint, name, value)
    return job


@contextlib.contextmanager
def no_final_sleep():
    """The trainer's rank 0 sleeps 2 s at the end of ``train()`` "for other ranks to
    complete"; nothing here needs it (the harness waits for every rank)."""
    import torchtitan.trainer

    module_time = torchtitan.trainer.time
    torchtitan.trainer.time = types.SimpleNamespace(
        **{n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    )
    torchtitan.trainer.time.sleep = lambda seconds: None
    try:
        yield
    finally:
        torchtitan.trainer.time = module_time


def train_with(job) -> dict:
    """Builds torchtitan's trainer from ``job`` and runs its training loop: the losses it
    logged, every parameter whole, and this rank's optimizer state."""
    trainer = job.build()
    losses = []
    log = trainer.metrics_processor.log

    def logged(step, loss, *args, **kwargs):
        losses.append(float(loss))
        return log(step, loss, *args, **kwargs)

    trainer.metrics_processor.log = logged
    try:
        with no_final_sleep():
            trainer.train()
        model = trainer.model_parts[0]
        params = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()
        }
        opt = trainer.optimizers.optimizers[0]
        with opt.sharded_state():
            own = opt.state_dict()["state"]
        state = {
            f"{n}.{k}": (v.to_local() if hasattr(v, "to_local") else v).clone()
            for n, s in own.items()
            for k, v in s.items()
            if isinstance(v, torch.Tensor)
        }
        return to_host({"losses": losses, "params": params, "state": state})
    finally:
        trainer.close()


def trainer(
    rank, world, root, name, degrees, backend="partial_dtensor", async_mode="disabled", resume=False
):
    """The job of ``name`` (its checkpoints under ``root/name``): uninterrupted, or (``resume``,
    in processes of their own, as a new job) resumed from its step-FIRST checkpoint."""
    titan_train.install_cpu_shims()
    os.environ.setdefault("LOCAL_RANK", "0")  # one CPU "device" per process
    folder = os.path.join(root, name)
    if resume:
        out = train_with(config(folder, degrees, backend, load_step=FIRST))
    else:
        out = train_with(config(folder, degrees, backend, async_mode=async_mode))
    return {**out, "saved": sorted(os.listdir(os.path.join(folder, "checkpoint")))}


def built(rank, world, root, name, degrees, backend="partial_dtensor", flex=False):
    """The trainer built (not trained): each parameter's mesh and placements, and the world
    mesh the optimizer read from them."""
    titan_train.install_cpu_shims()
    os.environ.setdefault("LOCAL_RANK", "0")
    job = config(os.path.join(root, name), degrees, backend)
    if flex:  # full-DTensor context parallelism refuses SDPA (FlexAttention cannot train here)
        from torchtitan.models.common.attention import FlexAttention

        for layer in job.model_spec.model.layers:
            layer.attention.inner_attention = FlexAttention.Config()
    built = job.build()
    try:
        params = built.model_parts[0].parameters()
        meshes = sorted({str(p.device_mesh) for p in params if hasattr(p, "device_mesh")})
        opt = built.optimizers.optimizers[0]
        return {"meshes": meshes, "world": opt.plan.mesh.shape, "blocks": opt.owned_blocks()}
    finally:
        built.close()


def dims(rank, world, dp_replicate=1, dp_shard=1, cp=1, tp=1):
    """tp_cases' Llama (float64) on torchtitan's meshes: tensor parallel on its ``tp`` mesh,
    FSDP2 (HSDP with ``dp_replicate``) on its ``fsdp`` mesh (dp_shard x cp: context-parallel
    ranks shard parameters and, as the model here has no context-parallel attention, take
    their own slice of the batch, the gradient FSDP2 averages being the same)."""
    import tp_cases
    from torch.distributed.fsdp import fully_shard
    from torchtitan.distributed import ParallelDims
    from workloads import parallelize_llama

    from sharded_shampoo import ShardedShampoo

    titan_train.install_cpu_shims()
    pdims = ParallelDims(
        dp_replicate=dp_replicate,
        dp_shard=dp_shard,
        cp=cp,
        tp=tp,
        pp=1,
        ep=1,
        world_size=world,
        spmd_backend="partial_dtensor",
    )
    pdims.build_mesh()
    model = tp_cases.make_llama()
    dp_mesh = None
    if dp_replicate * dp_shard * cp > 1:
        dp_mesh = pdims.get_mesh(["dp_replicate", "fsdp"] if dp_replicate > 1 else "fsdp")
    if tp > 1:
        parallelize_llama(model, pdims.get_mesh("tp"), dp_mesh)
    else:
        for layer in model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    opt = ShardedShampoo(list(model.named_parameters()), **tp_cases.OPTIONS)
    data = (world // tp, rank // tp)  # tp innermost: the data-parallel index
    losses = tp_cases.train(model, model, opt, data, 0, tp_cases.STEPS)
    return {"params": tp_cases.full_params(model), "losses": losses, "world": opt.plan.mesh.shape}
