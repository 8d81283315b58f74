"""A torchft job on gloo CPUs for test_torchft.py: replica groups of FSDP2 ranks (or one rank)
training a small network with ShardedShampoo under a ``torchft.Manager`` and its
``OptimizerWrapper``, started as processes by ``run_job``, which can kill a group (between two
steps, in the optimizer's step, in the backward) and start it again, several times.

Each group's data depends on the manager's step and the group, so that a restarted group takes
up the schedule where the job is. At the end every rank writes its shard of the parameters and
its blocks of the optimizer state (``replica_state``), which the test compares across groups.
"""

from __future__ import annotations

import datetime
import os
import time
from unittest import mock

import torch
import torch.distributed as dist

STEPS = 12
BATCH = 16
OPTIONS = dict(
    lr=0.02,
    betas=(0.9, 0.99),
    epsilon=1e-6,
    max_preconditioner_dim=8,
    precondition_frequency=3,
    start_preconditioning_step=2,
    factor_dtype=torch.float64,
    communication_dtype=torch.float64,
    # A refresh in flight across steps, and blocks refreshed in their own phase: what a
    # skipped step must leave as it was.
    refresh_delay=1,
    stagger_roots=True,
)


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10), torch.nn.Tanh()
    ).double()


def batch(step: int, group: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + 10 * group + rank)
    x = torch.randn(BATCH, 12, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 10, (BATCH,), generator=gen)


def worker(group, groups, rank, size, store_port, pg_store, lighthouse, out, kill, start) -> None:
    """One rank of replica group ``group`` of ``groups`` (``size`` ranks, FSDP2 when more than
    one). ``kill``: None, or (after, where): this incarnation dies ``after`` steps after its
    first (its recovery), ``where`` "between" two steps, "mid-step" (inside the optimizer's
    step) or "backward" (before the gradients' average over the groups). ``start``: a file
    every first incarnation's rank appends a line to, and waits for all of them, so that the
    job starts with every group in the quorum."""
    torch.set_num_threads(1)
    from torchft import Manager, ProcessGroupGloo
    from torchft.optim import OptimizerWrapper

    from sharded_shampoo import ShardedShampoo
    from sharded_shampoo.integrations.torchft import average_across_groups, replica_state

    timeout = datetime.timedelta(seconds=20)
    model = make_net()
    if size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group(
            "gloo", store=dist.FileStore(pg_store, size), rank=rank, world_size=size,
            timeout=timeout,
        )  # fmt: skip
        mesh = init_device_mesh("cpu", (size,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ShardedShampoo(model.parameters(), **OPTIONS)
    save, load = replica_state(model, opt)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=datetime.timedelta(seconds=5)),
        min_replica_size=1,
        load_state_dict=load,
        state_dict=save,
        replica_id=f"group{group}",
        store_addr="localhost",
        store_port=store_port,
        rank=rank,
        world_size=size,
        lighthouse_addr=lighthouse,
        use_async_quorum=False,
        timeout=timeout,
        quorum_timeout=datetime.timedelta(seconds=60),
    )
    if size > 1:
        average_across_groups(model, manager)
    else:
        from torchft import DistributedDataParallel

        model = DistributedDataParallel(manager, model)
    optimizer = OptimizerWrapper(manager, opt)
    if start is not None:
        with open(start, "a") as fh:
            fh.write("ready\n")
        while open(start).read().count("ready") < groups * size:
            time.sleep(0.05)
    skipped, recovered_at, first = [], None, None
    dies = lambda *args: os._exit(3)  # noqa: E731
    # At least STEPS steps, and on until the last incarnation of every group is in the
    # quorum (a restarted group rejoins while the others go on): every group stops after the
    # same committed step.
    final = os.path.join(out, "final")  # the last incarnation of every group is started
    while True:
        ending = os.path.exists(final)  # before this step's quorum
        before = manager.current_step()
        optimizer.zero_grad()  # the quorum; a restarted group recovers here
        step = manager.current_step()
        if step != before:
            recovered_at = step
        first = step if first is None else first
        where = kill[1] if kill is not None and step == first + kill[0] else None
        if where == "backward" and rank == 0:  # before the average over the groups
            mock.patch.object(manager, "allreduce", side_effect=dies).start()
        x, y = batch(step, group, rank)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if where == "mid-step" and rank == 0:
            # Inside the optimizer's step: its peer fails in the step's exchange and exits.
            mock.patch("sharded_shampoo.optimizer.compute", side_effect=dies).start()
        try:
            optimizer.step()
        except RuntimeError:
            os._exit(4)  # a rank of this group died inside the step: the group restarts
        if manager.current_step() == step:
            skipped.append(step)
        if where == "between":
            os._exit(5)
        committed = manager.current_step() > step
        if ending and committed and step >= STEPS and manager.num_participants() == groups:
            break
    state = save()
    torch.save(
        {
            "state": state,
            "step": manager.current_step(),
            "optimizer_step": opt.param_groups[0]["step"],
            "skipped": skipped,
            "recovered_at": recovered_at,
        },
        os.path.join(out, f"group{group}_rank{rank}.pt"),
    )
    time.sleep(0.5)  # let peers that recover from this group fetch its state first
    manager.shutdown(wait=False)
    os._exit(0)


def run_job(out: str, groups: int, size: int, kills=(), deadline_s: float = 150) -> dict:
    """Runs ``groups`` replica groups of ``size`` ranks. ``kills``: the last group's deaths, in
    order, each ``(after, where)`` (see ``worker``): its first incarnation dies at the first,
    is started again, the next dies at the second, ... and the last one runs to the end.
    Returns each incarnation's exit codes, by ``group<g>`` and ``group<g> restart <i>``."""
    import multiprocessing

    from torchft.coordination import LighthouseServer

    ctx = multiprocessing.get_context("spawn")
    lighthouse = LighthouseServer(
        bind="[::]:0", min_replicas=1, join_timeout_ms=500, heartbeat_timeout_ms=1000
    )
    stores = []
    start_file = os.path.join(out, "started")
    victim = groups - 1

    def start(group: int, incarnation: int) -> list:
        store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        stores.append(store)
        pg_store = os.path.join(out, f"pg{group}_{incarnation}")
        dies = kills[incarnation] if group == victim and incarnation < len(kills) else None
        if group == victim and dies is None:
            open(os.path.join(out, "final"), "w").close()
        procs = []
        for rank in range(size):
            p = ctx.Process(
                target=worker,
                args=(group, groups, rank, size, store.port, pg_store, lighthouse.address(),
                      out, dies, start_file if incarnation == 0 else None),
                daemon=True,
            )  # fmt: skip
            p.start()
            procs.append(p)
        return procs

    try:
        running = {g: (0, start(g, 0)) for g in range(groups)}
        exits: dict[str, list] = {}
        deadline = time.monotonic() + deadline_s
        while running and time.monotonic() < deadline:
            for g, (incarnation, procs) in list(running.items()):
                if any(p.is_alive() for p in procs):
                    continue
                exits[f"group{g}" + (f" restart {incarnation}" if incarnation else "")] = [
                    p.exitcode for p in procs
                ]
                del running[g]
                if g == victim and incarnation < len(kills) and any(p.exitcode for p in procs):
                    running[g] = (incarnation + 1, start(g, incarnation + 1))
            time.sleep(0.1)
        for _, procs in running.values():
            for p in procs:
                p.kill()
        exits.update({f"group{g} hung": [None] * size for g in running})
        return exits
    finally:
        lighthouse.shutdown()
