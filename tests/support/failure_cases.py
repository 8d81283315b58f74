"""Cases for test_failures.py: what an adversarial user does on 2-4 ranks, and what must follow
(an error on every rank, nothing changed) instead of silent divergence, corruption or a hang."""

from __future__ import annotations

import glob
import os
import pickle
import time
import warnings
from unittest import mock

import ckpt_cases
import fsdp_cases
import scenarios
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from harness import device
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from sharded_shampoo import ShardedShampoo
from sharded_shampoo.checkpoint import load_checkpoint, save_checkpoint

OPTIONS = dict(lr=0.01, max_preconditioner_dim=8, precondition_frequency=2, epsilon=1e-4)


def _outcome(fn) -> str:
    """``ExceptionType: message`` of what ``fn()`` raised (BaseException included: DCP raises
    CheckpointException), or ``"no error"``."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the type is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def _snapshot(model: torch.nn.Module, opt: ShardedShampoo) -> list[torch.Tensor]:
    """Every parameter (full) and every tensor of the live optimizer state, copied."""
    out = [t.detach().clone() for t in ckpt_cases.full_params(model)]
    for group in opt.param_groups:
        for p in group["params"]:
            out += [v.detach().clone() for _, v in sorted(opt.state[p].items())]
    return out


def _unchanged(before: list[torch.Tensor], model, opt) -> bool:
    after = _snapshot(model, opt)
    return len(after) == len(before) and all(
        torch.equal(a, b) for a, b in zip(after, before, strict=True)
    )


def _group_still_works(world: int) -> bool:
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item() == world


def _train(model, wrapped, opt, rank, world, steps, start=0):
    ckpt_cases.train(model, wrapped, opt, start, steps, rank, world)


def _grads(model, wrapped, rank, world, step=100):
    per = fsdp_cases.BATCH // world
    x, y = fsdp_cases.batch(step)
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    torch.nn.functional.cross_entropy(wrapped(x), y).backward()


# ---------------------------------------------------------------- settings that differ


def invalid_lr_on_one_rank(rank, world):
    """An lr that fails validation on rank 1 only: rank 1 raises the ValueError before changing
    anything, the others learn of it from the status words of the step's collective and raise
    before updating any parameter (their optimizer state has taken the step's gradient in: the
    collective comes after the math); nobody waits in a collective."""
    model, wrapped, opt = ckpt_cases.build("ddp", world)
    _train(model, wrapped, opt, rank, world, 2)
    if rank == 1:
        opt.param_groups[0]["lr"] = -1.0
    opt.zero_grad()
    _grads(model, wrapped, rank, world)
    before = _snapshot(model, opt)
    message = _outcome(opt.step)
    params = ckpt_cases.full_params(model)
    params_unchanged = all(
        torch.equal(a, b) for a, b in zip(params, before[: len(params)], strict=True)
    )
    return message, params_unchanged, _unchanged(before, model, opt), _group_still_works(world)


def no_gradients_on_one_rank(rank, world):
    """Rank 1 forgot its backward: it has no gradient at all. Before, it returned from step()
    alone and left the others in the AllGather until the timeout."""
    groups = scenarios.make_params([[(6, 4), (4,)]])
    opt = ShardedShampoo(groups[0], **OPTIONS, num_trainers_per_group=world)
    for p in groups[0]:
        p.grad = None if rank == 1 else torch.ones_like(p)
    before = [p.detach().clone() for p in groups[0]]
    start = time.monotonic()
    message = _outcome(opt.step)
    unchanged = all(torch.equal(a, b) for a, b in zip(groups[0], before, strict=True))
    return message, unchanged, time.monotonic() - start


def construction_differs(rank, world, what):
    """Ranks build the optimizer with different settings: PlanMismatchError on every rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    kwargs = {}
    params = list(model.parameters())
    if what == "communication_dtype_same_size":
        kwargs["communication_dtype"] = torch.bfloat16 if rank == 0 else torch.float16
    elif what == "communication_dtype_other_size":
        kwargs["communication_dtype"] = torch.float32 if rank == 0 else torch.bfloat16
    elif what == "exchange_buckets":  # different collectives per step: must not get that far
        kwargs["exchange_buckets"] = 4 if rank == 0 else 2
    elif what == "lr":
        kwargs["lr"] = 0.01 if rank == 0 else 0.02
    elif what == "names_order":
        named = list(model.named_parameters())
        if rank == 1:  # same shapes, another order: each layer would get the other's update
            named = [named[2], named[3], named[0], named[1]]
        params = named
    return _outcome(lambda: ShardedShampoo(params, **{**OPTIONS, **kwargs})), _group_still_works(
        world
    )


def bad_option_on_one_rank(rank, world, when):
    """An option only rank 1 gets wrong, at construction or in a later add_param_group: rank 1
    raises its ValueError, the others learn of it in the agreement's collective and raise too,
    at once (before, they waited there for rank 1 until the timeout)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    bad = -1.0 if rank == 1 else 0.01
    start = time.monotonic()
    if when == "construction":
        message = _outcome(lambda: ShardedShampoo(model.parameters(), **{**OPTIONS, "lr": bad}))
    else:
        opt = ShardedShampoo(model[0].parameters(), **OPTIONS)
        message = _outcome(
            lambda: opt.add_param_group({"params": model[1].parameters(), "lr": bad})
        )
        assert len(opt.param_groups) == 1  # refused: the optimizer is as it was
    return message, time.monotonic() - start, _group_still_works(world)


def trainer_groups_differ(rank, world):
    """num_trainers_per_group 2 on ranks 0-1 and 4 on ranks 2-3: before, ranks hung in
    init_device_mesh; now the settings are compared before any mesh exists."""
    k = 2 if rank < 2 else 4
    params = scenarios.make_params([[(6, 4), (4,)]])[0]
    start = time.monotonic()
    message = _outcome(lambda: ShardedShampoo(params, **OPTIONS, num_trainers_per_group=k))
    return message, time.monotonic() - start, _group_still_works(world)


# ---------------------------------------------------------------- item 2 and 5: loads


def truncated_checkpoint(rank, world, root):
    """A .distcp file cut in half: load_checkpoint raises CheckpointException on every rank and
    neither the model nor the optimizer changed (before, DCP had already written into both)."""
    model, wrapped, opt = ckpt_cases.build("ddp", world)
    _train(model, wrapped, opt, rank, world, 3)
    save_checkpoint(os.path.join(root, "truncated"), wrapped, opt)
    if rank == 0:
        path = sorted(glob.glob(os.path.join(root, "truncated", "*.distcp")))[-1]
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
    dist.barrier()
    return _load_into_test_network(os.path.join(root, "truncated"), rank, world)


def plain_dcp_load_refused(rank, world, root):
    """torch's own path (get_optimizer_state_dict, dcp.load, set_optimizer_state_dict) with a
    checkpoint saved with adam grafting into rmsprop: the promised ValueError, and the live
    state untouched (before, dcp.load had overwritten 96 of 117 state tensors)."""
    model, wrapped, opt = ckpt_cases.build("ddp", world, grafting="adam")
    _train(model, wrapped, opt, rank, world, 3)
    path = os.path.join(root, "plain")
    osd = get_optimizer_state_dict(wrapped, opt)
    dcp.save({"optim": osd}, checkpoint_id=path)
    model, wrapped, opt = ckpt_cases.build("ddp", world, grafting="rmsprop")
    _train(model, wrapped, opt, rank, world, 1, start=50)
    before = _snapshot(model, opt)

    def load():
        state = {"optim": get_optimizer_state_dict(wrapped, opt)}
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(wrapped, opt, state["optim"])

    message = _outcome(load)
    return message, _unchanged(before, model, opt), _group_still_works(world)


class _Bigger(fsdp_cases.Net):
    """The test network with one more layer."""

    def __init__(self):
        super().__init__()
        self.extra = torch.nn.Linear(3, 3)


def other_model_checkpoint(rank, world, root):
    """A checkpoint of a model with an extra layer: refused from its metadata, naming the
    layer, before anything is read (before, it loaded silently)."""
    torch.manual_seed(0)
    big = _Bigger().double().to(device())
    wrapped = torch.nn.parallel.DistributedDataParallel(big)
    opt = ShardedShampoo([p for p in big.parameters() if p.requires_grad], **fsdp_cases.OPTIONS)
    _grads(big, wrapped, rank, world)
    opt.step()
    save_checkpoint(os.path.join(root, "bigger"), wrapped, opt)
    return _load_into_test_network(os.path.join(root, "bigger"), rank, world)


def _load_into_test_network(path, rank, world):
    """load_checkpoint into the test network after a step of its own: (outcome, whether the
    model and optimizer are unchanged, whether the group still works)."""
    model, wrapped, opt = ckpt_cases.build("ddp", world)
    _train(model, wrapped, opt, rank, world, 1)
    before = _snapshot(model, opt)
    message = _outcome(lambda: load_checkpoint(path, wrapped, opt))
    return message, _unchanged(before, model, opt), _group_still_works(world)


def groups_at_different_steps(rank, world, root):
    """Two param groups saved at steps 9 and 3, loaded into one group (flattened state dicts
    give a group the step of its first parameter): refused, nothing changed."""
    model, wrapped, opt = _two_groups(world)
    per = fsdp_cases.BATCH // world
    for step in range(9):
        opt.zero_grad()
        x, y = fsdp_cases.batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        if step % 3:  # the second group's layer gets no gradient in 6 of the 9 steps
            for p in model.out.parameters():
                p.grad = None
        opt.step()
    assert [g["step"] for g in opt.param_groups] == [9, 3], [g["step"] for g in opt.param_groups]
    save_checkpoint(os.path.join(root, "two-groups"), wrapped, opt)
    return _load_into_test_network(os.path.join(root, "two-groups"), rank, world)


def _two_groups(world):
    model = fsdp_cases.make_net()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    last = set(model.out.parameters())
    opt = ShardedShampoo(
        [
            {"params": [p for p in params if p not in last]},
            {"params": list(model.out.parameters())},
        ],
        **fsdp_cases.OPTIONS,
    )
    return model, wrapped, opt


# ---------------------------------------------------------------- memory and the order of set-up


def per_layer_groups_memory(rank, world):
    """Eight groups of one 64 x 64 weight each: every rank holds exactly its blocks' state
    (before, each group's pool was padded to its largest rank: 2 of 8 blocks' worth per group
    and rank at 4 ranks, 3x the share)."""
    params = [torch.randn(64, 64, device=device(), requires_grad=True) for _ in range(8)]
    opt = ShardedShampoo(
        [{"params": [p]} for p in params],
        max_preconditioner_dim=64,
        betas=(0.9, 0.999),
        num_trainers_per_group=world,  # 8 blocks: too few to shard by default
    )
    return opt.state_bytes(), opt.owned_blocks()


def built_before_process_group(rank, world):
    """The Hugging Face pattern: the optimizer is made before init_process_group. It cannot
    shard then; the first step says so (and the result is still the replicated one)."""
    params = scenarios.make_params([[(6, 4), (4,)]])[0]
    with mock.patch.object(dist, "is_initialized", return_value=False):
        opt = ShardedShampoo(params, **OPTIONS)
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
    messages = [str(w.message) for w in caught if "before torch.distributed" in str(w.message)]
    return messages, opt.owned_blocks()


def copy_refused(rank, world):
    """pickle and deepcopy of a sharded optimizer raise (before: a broken copy)."""
    import copy

    params = scenarios.make_params([[(6, 4), (4,)]])[0]
    opt = ShardedShampoo(params, **OPTIONS, num_trainers_per_group=world)
    return _outcome(lambda: pickle.dumps(opt)), _outcome(lambda: copy.deepcopy(opt))


def lr_differs_at_step(rank, world, mode, odd_rank=1):
    """A scheduler that gave one rank another lr (ReduceLROnPlateau fed its own loss): every
    rank raises in the same step and no parameter moves. Under HSDP 2 x 2 with rank 3 odd, its
    shard group sees it in the all_to_all, the other group through the cross-replica forward."""
    model, wrapped, opt = ckpt_cases.build(mode, world)
    _train(model, wrapped, opt, rank, world, 2)
    if rank == odd_rank:
        opt.param_groups[0]["lr"] *= 2
    opt.zero_grad()
    _grads(model, wrapped, rank, world)
    before = ckpt_cases.full_params(model)
    message = _outcome(opt.step)
    unchanged = all(
        torch.equal(a, b) for a, b in zip(ckpt_cases.full_params(model), before, strict=True)
    )
    return message, unchanged, _group_still_works(world)


def fsdp1(rank, world):
    """FSDP1 (FullyShardedDataParallel) hands each rank flat pieces of other sizes: refused at
    construction on every rank, naming FSDP2's fully_shard (its optim_state_dict would also be
    refused: see state.consolidation)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = fsdp_cases.make_net()
    wrapped = FullyShardedDataParallel(model, device_id=device(), use_orig_params=True)
    return _outcome(
        lambda: ShardedShampoo(
            [p for p in wrapped.parameters() if p.requires_grad], num_trainers_per_group=world
        )
    ), _group_still_works(world)


# ---------------------------------------------------------------- failures inside the step


class InjectedFault(Exception):
    """What a refresh on one rank raises in ``fault_in_refresh`` (a lost device, a bug)."""


def _faulty_decompose(*args, **kwargs):
    raise InjectedFault("injected: the refresh lost its device")


def fault_in_refresh(rank, world, mode, delay):
    """Rank 1's refresh raises (in the step, or in the background worker with ``delay``,
    surfacing at the install step). Every rank raises in that same step, the others naming
    rank 1 and its exception, at once (before, they waited in the next collective until the
    process group's timeout and reported the timeout); no parameter moves. Returns, per rank,
    (the step that raised, its message, its seconds, parameters unchanged, group works)."""
    model, wrapped, opt = ckpt_cases.build(mode, world, refresh_delay=delay)
    _train(model, wrapped, opt, rank, world, 3)  # refreshes at 5 (installed at 5 + delay)
    patches = [
        mock.patch("sharded_shampoo.algorithm.refresh.decompose", _faulty_decompose),
        mock.patch("sharded_shampoo.refreshes.decompose", _faulty_decompose),
    ]
    if rank == 1:
        for p in patches:
            p.start()
    try:
        for step in range(3, 10):
            opt.zero_grad()
            _grads(model, wrapped, rank, world, step)
            before = ckpt_cases.full_params(model)
            start = time.monotonic()
            message = _outcome(opt.step)
            seconds = time.monotonic() - start
            if message != "no error":
                unchanged = all(
                    torch.equal(a, b)
                    for a, b in zip(ckpt_cases.full_params(model), before, strict=True)
                )
                return step + 1, message, seconds, unchanged, _group_still_works(world)
        return None
    finally:
        if rank == 1:
            for p in patches:
                p.stop()


def rank_killed_in_step(rank, world, mode):
    """Rank 1's process dies inside the optimizer's step (after its gradients went out). The
    others raise in that step, within seconds (gloo sees the closed connection), before any
    parameter changes: a restart from the last checkpoint loses nothing. Run last: the group
    is broken afterwards."""
    model, wrapped, opt = ckpt_cases.build(mode, world)
    _train(model, wrapped, opt, rank, world, 2)
    opt.zero_grad()
    _grads(model, wrapped, rank, world)
    if rank == 1:
        mock.patch("sharded_shampoo.optimizer.compute", side_effect=lambda *a: os._exit(9)).start()
    local = lambda: [p.to_local().clone() for p in model.parameters()]  # noqa: E731 - no collective
    before = local()
    start = time.monotonic()
    message = _outcome(opt.step)
    seconds = time.monotonic() - start
    unchanged = all(torch.equal(a, b) for a, b in zip(local(), before, strict=True))
    return message, seconds, unchanged
