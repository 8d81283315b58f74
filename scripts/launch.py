"""How the scripts start their processes and wrap their models (gloo, CPU).

``launch(fn, args, nproc)`` runs ``fn(args)`` on every rank: under torchrun (RANK in the
environment) in this process, otherwise in ``nproc`` spawned processes sharing a FileStore.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=300)


def wrap(model: torch.nn.Module, parallelism: str, world: int) -> torch.nn.Module:
    """DDP, or FSDP2 per transformer block (``model.blocks``, if any) and at the root; HSDP
    uses 2 replica groups. 'none' (or one process) leaves the model as it is."""
    if parallelism == "none" or world == 1:
        return model
    if parallelism == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Named, not torch's default accelerator mesh: the scripts run on the CPU (gloo).
    kwargs = {"mesh": init_device_mesh("cpu", (world,))}
    if parallelism == "hsdp":
        if world % 2:
            raise SystemExit("--parallelism hsdp needs an even number of processes")
        kwargs["mesh"] = init_device_mesh(
            "cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")
        )
    for block in getattr(model, "blocks", []):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def finish() -> None:
    """Tears down the process group and leaves without the interpreter's own teardown.

    With torch 2.13 on CPU/gloo, about 1 run in 10 of two ranks (torchrun, even with plain DDP
    and AdamW) aborts in the C++ static destructors at interpreter exit ("terminate called
    without an active exception", SIGABRT), after all work is done. Exiting with os._exit once
    everything is flushed skips those destructors: 0 aborts in 30 runs, against 8 in 60 without.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank(rank: int, world: int, store: str, fn: Callable[[Any], None], args: Any, threads: int):
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=TIMEOUT
    )
    fn(args)
    finish()


def launch(fn: Callable[[Any], None], args: Any, nproc: int, threads: int = 1) -> None:
    if "RANK" in os.environ:  # torchrun
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", timeout=TIMEOUT)
        fn(args)
        finish()
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank,
            args=(nproc, os.path.join(tmp, "store"), fn, args, threads),
            nprocs=nproc,
            start_method="spawn",
        )
