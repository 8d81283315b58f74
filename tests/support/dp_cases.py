"""Cases run on every rank of a spawned group by test_data_parallel.py."""

from __future__ import annotations

import warnings

import scenarios
import torch
import torch.distributed as dist
from harness import DEVICE_TYPE

import sharded_shampoo.algorithm.roots as roots_module
from sharded_shampoo import ShardedShampoo


def same_grads(
    rank,
    world,
    tiny=False,
    explicit_mesh=False,
    variant=None,
    **kwargs,
):
    if kwargs.get("num_trainers_per_group") == "world":
        kwargs["num_trainers_per_group"] = world
    if explicit_mesh:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh(DEVICE_TYPE, (world,))
    shapes, options = (
        (scenarios.TINY_SHAPES, scenarios.TINY_OPTIONS)
        if tiny
        else (scenarios.GROUP_SHAPES, scenarios.GROUP_OPTIONS)
    )
    if variant is not None:
        options = scenarios.VARIANTS[variant]
    params, opt = scenarios.train_with_same_grads(shapes=shapes, options=options, **kwargs)
    return {
        "params": params,
        "state_bytes": opt.state_bytes(),
        "owned_blocks": opt.owned_blocks(),
        "bytes_sent": opt.bytes_sent_per_step(),
    }


def ddp(rank, world, steps=30, batch=24):
    from torch.nn.parallel import DistributedDataParallel

    model = scenarios.make_mlp()
    ddp_model = DistributedDataParallel(model)
    opt = ShardedShampoo(ddp_model.parameters(), **scenarios.DDP_OPTIONS)
    per = batch // world
    for step in range(steps):
        x, y = scenarios.global_batch(step, batch)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp_model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def plan_mismatch(rank, world):
    shapes = [list(s) for s in scenarios.GROUP_SHAPES]
    if rank == 1:
        shapes[1][2] = (34,)  # one parameter of another size on rank 1
    groups = scenarios.make_params(shapes)
    try:
        ShardedShampoo(
            [{"params": ps, **o} for ps, o in zip(groups, scenarios.GROUP_OPTIONS, strict=True)]
        )
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def root_failure(rank, world, **options):
    """Rank 0's eigendecompositions always fail: every rank must raise, none may hang."""
    original = roots_module.eigh
    if rank == 0:

        def broken(a):
            raise torch.linalg.LinAlgError("injected failure")

        roots_module.eigh = broken
    try:
        return _train_until_error(rank, world, **options)
    finally:
        roots_module.eigh = original


def _train_until_error(rank, world, **options):
    groups = scenarios.make_params(scenarios.GROUP_SHAPES)
    opt = ShardedShampoo(
        [
            {"params": ps, **o, "precondition_frequency": 2, **options}
            for ps, o in zip(groups, scenarios.GROUP_OPTIONS, strict=True)
        ],
        max_consecutive_root_failures=2,
    )
    outcome = "no error"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(12):
            scenarios.set_grads(groups, step)
            before = [p.detach().clone() for g in groups for p in g]
            try:
                opt.step()
            except RuntimeError as e:
                after = [p.detach() for g in groups for p in g]
                unchanged = all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
                outcome = f"step {step}: unchanged={unchanged}: {e}"
                break
    # The group is still usable: a collective completes.
    t = torch.ones(1)
    dist.all_reduce(t)
    return outcome, t.item()


def added_group(rank, world, steps=32):
    """The second param group arrives through add_param_group after construction."""
    groups = scenarios.make_params(scenarios.GROUP_SHAPES)
    opt = ShardedShampoo(
        [{"params": groups[0], **scenarios.GROUP_OPTIONS[0]}], communication_dtype=torch.float64
    )
    opt.add_param_group({"params": groups[1], **scenarios.GROUP_OPTIONS[1]})
    for step in range(steps):
        scenarios.set_grads(groups, step)
        opt.step()
    return {
        "params": [[p.detach().clone() for p in g] for g in groups],
        "owned_blocks": opt.owned_blocks(),
    }
