"""Cases for test_full_state_dict.py: consolidated state dicts through torch's own API."""

from __future__ import annotations

import os

import torch
from ckpt_cases import FIRST, THEN, build, full_params, train
from harness import to_host
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def save_full(rank, world, mode, root, cpu_offload):
    """Trains FIRST steps and takes torch's full state dicts; rank 0 writes them with
    torch.save. Returns, per rank, what torch handed it (the optimizer's, on CPU)."""
    model, wrapped, opt = build(mode, world)
    train(model, wrapped, opt, 0, FIRST, rank, world)
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    osd = get_optimizer_state_dict(wrapped, opt, options=options)
    msd = get_model_state_dict(wrapped, options=options)
    if rank == 0:
        torch.save({"model": msd, "optim": osd}, os.path.join(root, f"{mode}{world}.pt"))
    return to_host(osd)


def load_full(rank, world, mode, root, source, broadcast):
    """Loads a full state dict saved by ``save_full`` (only rank 0 reads the file when
    ``broadcast``), then trains THEN steps."""
    model, wrapped, opt = build(mode, world)
    saved = {"model": {}, "optim": {}}
    if rank == 0 or not broadcast:
        saved = torch.load(os.path.join(root, f"{source}.pt"), weights_only=False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_model_state_dict(wrapped, saved["model"], options=options)
    set_optimizer_state_dict(wrapped, opt, saved["optim"], options=options)
    assert all(g["step"] == FIRST for g in opt.param_groups)
    train(model, wrapped, opt, FIRST, THEN, rank, world)
    return full_params(model)


def load_plain(rank, world, mode, root):
    """Loads one process's plain ``opt.state_dict()`` (torch.save'd, keyed by parameter
    index) with ``opt.load_state_dict`` on every rank, then trains THEN steps."""
    model, wrapped, opt = build(mode, world)
    saved = torch.load(os.path.join(root, "single1-plain.pt"), weights_only=False)
    set_model_state_dict(wrapped, saved["model"], options=StateDictOptions(full_state_dict=True))
    opt.load_state_dict(saved["optim"])
    train(model, wrapped, opt, FIRST, THEN, rank, world)
    return full_params(model)


def save_single(root):
    """One process (no process group): the reference full state dict, the same as a plain
    ``opt.state_dict()`` torch.save'd, and the uninterrupted run's parameters."""
    reference = save_full(0, 1, "single", root, cpu_offload=False)
    model, wrapped, opt = build("single", 1)
    train(model, wrapped, opt, 0, FIRST, 0, 1)
    torch.save(
        {"model": model.state_dict(), "optim": opt.state_dict()},
        os.path.join(root, "single1-plain.pt"),
    )
    train(model, wrapped, opt, FIRST, THEN, 0, 1)
    return reference, full_params(model)


def requests(rank, world, mode, root):
    """The ways of asking for a state dict, after FIRST steps: explicit (``full_state``, the
    checkpoint helper), torch's API behind wrappers that add frames, a plain ``state_dict()``,
    and torch's state-dict code with options this cannot read (emulated: a function of that
    module without them), which must raise on every rank of a sharded optimizer."""
    from sharded_shampoo.checkpoint import full_optimizer_state_dict
    from sharded_shampoo.state.consolidation import StateDictRequestError

    model, wrapped, opt = build(mode, world)
    train(model, wrapped, opt, 0, FIRST, rank, world)
    out = {
        "helper": to_host(full_optimizer_state_dict(wrapped, opt, cpu_offload=False)),
        "helper_offload": to_host(full_optimizer_state_dict(wrapped, opt, cpu_offload=True)),
    }

    def wrapper(depth):
        if depth:
            return wrapper(depth - 1)
        options = StateDictOptions(full_state_dict=True)
        return get_optimizer_state_dict(wrapped, opt, options=options)

    out["wrapped"] = to_host(wrapper(6))
    blocks = lambda sd: sum(  # noqa: E731
        1 for s in sd["state"].values() for k in s if k.startswith("blocks.")
    )
    with opt.full_state():
        out["context_blocks"] = blocks(opt.state_dict())
    try:
        opt.state_dict()
        out["plain"] = "no error"
    except StateDictRequestError as e:
        out["plain"] = str(e)
    with opt.sharded_state():
        out["sharded_blocks"] = blocks(opt.state_dict())
    namespace = {"__name__": "torch.distributed.checkpoint.state_dict", "opt": opt}
    exec("def _get_optim_state_dict_renamed(opt):\n    return opt.state_dict()\n", namespace)
    try:
        namespace["_get_optim_state_dict_renamed"](opt)
        out["unreadable"] = "no error"
    except StateDictRequestError as e:
        out["unreadable"] = str(e)
    return out
