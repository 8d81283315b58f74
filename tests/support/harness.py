"""Run functions on a spawned group of gloo ranks, several cases per group, with a deadline.

Process-group start-up dominates the cost of a distributed test (importing torch takes about 2 s
per process), so a group runs a list of cases and returns every rank's result of each. A case
that raises on some rank is recorded as that rank's error and the group moves on; a hang (a rank
left in a collective) is cut by the collectives' timeout, and the whole group by the harness's
deadline, so a test fails instead of stalling CI.

The device: the CPU with gloo by default; CUDA with NCCL (and gloo for CPU tensors), one GPU
per rank, when ``SHARDED_SHAMPOO_TEST_DEVICE=cuda`` (``pytest --device cuda`` sets it). Cases
put their models and data on ``device()`` and name ``DEVICE_TYPE`` in every device mesh, so a
visible GPU changes nothing unless asked; results come back on the CPU.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 45
DEVICE_TYPE = os.environ.get("SHARDED_SHAMPOO_TEST_DEVICE", "cpu")
if DEVICE_TYPE not in ("cpu", "cuda"):
    raise ValueError(f"SHARDED_SHAMPOO_TEST_DEVICE must be cpu or cuda, got {DEVICE_TYPE!r}")


def device() -> torch.device:
    """Where this process's tensors go: its GPU in CUDA mode (rank r uses cuda:r; the test
    process itself cuda:0), else the CPU."""
    if DEVICE_TYPE == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exact_math() -> None:
    """Float64 comparisons on a GPU need TF32 off (matrix products would round to 10 bits)."""
    if DEVICE_TYPE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def to_host(x: Any) -> Any:
    """``x`` with every tensor in it moved to the CPU (results cross processes pickled)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: to_host(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_host(v) for v in x)
    return x


@dataclass
class CaseResult:
    """One case's outcome on every rank: ``values[r]`` or ``errors[r]`` (a traceback)."""

    values: list[Any]
    errors: list[str | None]

    def ok(self) -> list[Any]:
        for r, e in enumerate(self.errors):
            if e is not None:
                raise AssertionError(f"rank {r} raised:\n{e}")
        return self.values


def _worker(rank: int, world: int, store_path: str, cases, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    backend = "gloo"
    if DEVICE_TYPE == "cuda":
        torch.cuda.set_device(rank)
        exact_math()
        backend = "cuda:nccl,cpu:gloo"
    dist.init_process_group(
        backend,
        store=dist.FileStore(store_path, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results = []
    for fn, kwargs in cases:
        try:
            results.append((to_host(fn(rank, world, **kwargs)), None))
        except BaseException:  # CheckpointException is a BaseException
            results.append((None, traceback.format_exc()))
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(results, fh)
    dist.destroy_process_group()
    # torch 2.13 on gloo sometimes aborts in C++ static destructors at interpreter exit
    # (SIGABRT, "terminate called without an active exception"); the results are written, so
    # leave without that teardown.
    os._exit(0)


def run_cases(
    world: int, cases: list[tuple[Callable[..., Any], dict[str, Any]]], deadline_s: float = 240
) -> list[CaseResult]:
    """Runs ``fn(rank, world, **kwargs)`` for each case, in order, on ``world`` spawned ranks
    (in CUDA mode, skips the test when there are fewer GPUs than ranks)."""
    if DEVICE_TYPE == "cuda" and world > torch.cuda.device_count():
        pytest.skip(f"needs {world} GPUs (one per rank), {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world, store, cases, tmp), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=deadline_s)
        for p in procs:
            p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        per_rank = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pkl")
            got = []
            if os.path.exists(path):
                with open(path, "rb") as fh:
                    got = pickle.load(fh)
            per_rank.append(got)
    out = []
    for i in range(len(cases)):
        values, errors = [], []
        for r in range(world):
            if i < len(per_rank[r]):
                v, e = per_rank[r][i]
            else:
                why = "hung past the deadline" if r in hung else f"exited ({procs[r].exitcode})"
                v, e = None, f"no result: rank {r} {why} before finishing this case"
            values.append(v)
            errors.append(e)
        out.append(CaseResult(values, errors))
    return out
