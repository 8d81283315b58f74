"""Run functions on a spawned group of gloo ranks, several cases per group, with a deadline.

Process-group start-up dominates the cost of a distributed test (importing torch takes about 2 s
per process), so a group runs a list of cases and returns every rank's result of each. A case
that raises on some rank is recorded as that rank's error and the group moves on; a hang (a rank
left in a collective) is cut by gloo's timeout, and the whole group by the harness's deadline,
so a test fails instead of stalling CI.
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

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 45


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
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results = []
    for fn, kwargs in cases:
        try:
            results.append((fn(rank, world, **kwargs), None))
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
    """Runs ``fn(rank, world, **kwargs)`` for each case, in order, on ``world`` spawned ranks."""
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
