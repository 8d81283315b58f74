"""Cases for test_lightning.py: ShardedShampoo from ``configure_optimizers`` under Lightning's
DDP strategy, sharded over 2 ranks; checkpoint and resume."""

from __future__ import annotations

import os

import fsdp_cases
import torch
from harness import DEVICE_TYPE

from sharded_shampoo import ShardedShampoo

STEPS, SAVE = 8, 4


def module_class(fsdp=False):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = fsdp_cases.make_net()
            self.losses: list[float] = []

        def configure_model(self):
            if fsdp:  # ModelParallelStrategy: FSDP2 over its data-parallel mesh dim
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for name in ("inp", "squeeze", "expand", "out"):
                    fully_shard(getattr(self.net, name), mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, index):
            # By the global step, not the loader's index: a resumed fit restarts the loader.
            x, y = batch_of(self.global_step, self.trainer.global_rank, self.trainer.world_size)
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            # Sharded over both ranks even for this small model (it has too few blocks for the
            # automatic width to shard): each rank keeps half the blocks.
            shard = {} if fsdp else {"num_trainers_per_group": torch.distributed.get_world_size()}
            opt = ShardedShampoo(
                [p for p in self.net.parameters() if p.requires_grad], **fsdp_cases.OPTIONS, **shard
            )
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Module


def batch_of(step, rank, world):
    """This rank's slice of ``fsdp_cases.batch(step)`` (each rank its own, as a
    DistributedSampler would give)."""
    x, y = fsdp_cases.batch(step)
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def fit(rank, world, root, steps, ckpt=None, fsdp=False):
    import warnings

    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        LOCAL_WORLD_SIZE=str(world),
    )
    module = module_class(fsdp)()
    data = torch.utils.data.DataLoader(range(STEPS), batch_size=None)  # steps, not data
    trainer = L.Trainer(
        accelerator="gpu" if DEVICE_TYPE == "cuda" else "cpu",
        devices=world,
        max_steps=steps,
        logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        if fsdp
        else "ddp",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data, ckpt_path=ckpt)
    return trainer, module


def train_and_resume(rank, world, root, fsdp=False):
    """STEPS steps with a checkpoint after SAVE, then a new Trainer resuming from it."""
    path = os.path.join(root, "fsdp.ckpt" if fsdp else "ddp.ckpt")
    trainer, module = fit(rank, world, root, SAVE, fsdp=fsdp)
    trainer.save_checkpoint(path)
    out = {}
    if not fsdp:  # one file, written by rank 0: it must hold every rank's blocks
        saved = torch.load(path, weights_only=False)["optimizer_states"][0]
        opt = module.optimizers().optimizer
        with opt.sharded_state():
            own = opt.state_dict()
        count = lambda sd: sum(  # noqa: E731
            len([k for k in s if k.startswith("blocks.")]) for s in sd["state"].values()
        )
        out.update(saved_blocks=count(saved), own_blocks=count(own))
    _, first = fit(rank, world, root, STEPS, fsdp=fsdp)  # uninterrupted, from scratch
    _, resumed = fit(rank, world, root, STEPS, ckpt=path, fsdp=fsdp)
    full = lambda m: [  # noqa: E731
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for p in m.net.parameters()
    ]
    same = all(torch.equal(a, b) for a, b in zip(full(first), full(resumed), strict=True))
    return {**out, "losses": first.losses, "resumed": resumed.losses, "same_params": same}
