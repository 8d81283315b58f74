"""Cases for test_checkpoint.py: train, save, load at another world size or in another mode."""

from __future__ import annotations

import os

import fsdp_cases
import torch
import torch.distributed as dist
from harness import DEVICE_TYPE, to_host

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint

FIRST, THEN = 6, 6  # steps before the checkpoint, steps after


def build(mode, world, **overrides):
    """The test network in ``mode`` ('single', 'ddp', 'fsdp' or 'hsdp') and its optimizer."""
    model = fsdp_cases.make_net()
    wrapped = model
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif mode in ("fsdp", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        kwargs = {"mesh": fsdp_cases.world_mesh(world)}
        if mode == "hsdp":
            kwargs["mesh"] = init_device_mesh(
                DEVICE_TYPE, (2, world // 2), mesh_dim_names=("rep", "shard")
            )
        for name in ("inp", "squeeze", "expand", "out"):
            fully_shard(getattr(model, name), **kwargs)
        fully_shard(model, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, wrapped, ShardedShampoo(params, **{**fsdp_cases.OPTIONS, **overrides})


def train(model, wrapped, opt, start, steps, rank, world):
    per = fsdp_cases.BATCH // world
    losses = []
    for step in range(start, start + steps):
        x, y = fsdp_cases.batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(wrapped(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def full_params(model):
    """Every parameter whole, on the CPU."""
    return to_host(
        [
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()
        ]
    )


# A checkpoint name ending in one of these was saved with these options (and loads into them).
VARIANTS = {
    "-staggered": {"stagger_roots": True},
    "-ec": {"preconditioner": "eigenvalue_corrected", "eigenbasis": "qr"},
    # Saved after step 6 with the refresh due at 5 in flight (installed at 8).
    "-background": {
        "preconditioner": "eigenvalue_corrected",
        "eigenbasis": "qr",
        "stagger_roots": True,
        "refresh_delay": 3,
    },
    # The estimators: KL-Shampoo's pseudo-inverse roots of factors of the first moment.
    "-kl": {
        "kl_shampoo": True,
        "factor_source": "first_moment",
        "first_moment_nesterov": True,
        "epsilon": 0.0,
        "pseudo_inverse": True,
        "rank_rtol": 1e-10,
    },
    # Saved asynchronously (save_checkpoint(asynchronous=True)) while training went on.
    "-async": {},
}


def variant_of(name: str) -> dict:
    return next((v for suffix, v in VARIANTS.items() if name.endswith(suffix)), {})


def save(rank, world, mode, root, flatten=True, variant=""):
    """An uninterrupted run of FIRST + THEN steps, and a run saved after FIRST steps."""
    overrides = VARIANTS.get(variant, {})
    model, wrapped, opt = build(mode, world, **overrides)
    losses = train(model, wrapped, opt, 0, FIRST + THEN, rank, world)
    uninterrupted = {"params": full_params(model), "losses": losses[FIRST:]}
    model, wrapped, opt = build(mode, world, **overrides)
    train(model, wrapped, opt, 0, FIRST, rank, world)
    name = f"{mode}{world}" + ("" if flatten else "-nested") + variant
    path = os.path.join(root, name)
    asynchronous = variant == "-async"
    written = save_checkpoint(
        path, wrapped, opt, extra={"step": FIRST}, flatten=flatten, asynchronous=asynchronous
    )
    if asynchronous:  # the state saved is that of the call: later steps must not reach it
        train(model, wrapped, opt, FIRST, THEN, rank, world)
        written.result()
        dist.barrier()  # the first rank's future marks the checkpoint complete
    return uninterrupted


def resume(rank, world, mode, root, source):
    """Loads the checkpoint ``source`` and trains THEN more steps."""
    model, wrapped, opt = build(mode, world, **variant_of(source))
    flatten = not source.endswith("-nested")
    extra = load_checkpoint(
        os.path.join(root, source), wrapped, opt, extra={"step": -1}, flatten=flatten
    )
    assert extra["step"] == FIRST, extra
    assert all(g["step"] == FIRST for g in opt.param_groups)
    losses = train(model, wrapped, opt, FIRST, THEN, rank, world)
    return {"params": full_params(model), "losses": losses}


def mismatch(rank, world, mode, root, source):
    """A checkpoint saved with max_preconditioner_dim 8 into an optimizer built with 4: every
    rank raises the same error, and nothing changed."""
    model, wrapped, opt = build(mode, world, max_preconditioner_dim=4)
    train(model, wrapped, opt, 0, 2, rank, world)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    params_before = full_params(model)
    try:
        load_checkpoint(os.path.join(root, source), wrapped, opt)
        message = "no error"
    except ValueError as e:
        message = str(e)
    unchanged = all(
        torch.equal(v, before[id(p)][k]) for p in opt.state for k, v in opt.state[p].items()
    ) and all(torch.equal(a, b) for a, b in zip(full_params(model), params_before, strict=True))
    if dist.is_initialized():
        t = torch.ones(1)
        dist.all_reduce(t)  # the group still works
    return message, unchanged
