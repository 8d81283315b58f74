"""How ranks agree at construction that they built the same optimizer (``check_agreement``),
and raise together when one of them refuses something (``raise_anywhere``). Per step, the
status words do the same (``status``)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "PlanMismatchError",
    "RankFailedError",
    "agreement_items",
    "check_agreement",
    "on_device",
    "raise_anywhere",
]


def on_device(device: torch.device | None):
    """A context in which object collectives (``all_gather_object``) and barriers run on this
    rank's accelerator: NCCL puts their tensors on the current CUDA device, which is cuda:0
    unless the script called ``torch.cuda.set_device(local_rank)``; inside, it is ``device``,
    where this rank's parameters are."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def raise_anywhere(group, error: Exception | None) -> None:
    """Raises on every rank of ``group`` when any rank has an ``error``: its own, or the
    first failing rank's message. One collective; every rank must call it."""
    messages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else str(error), group=group)
    _raise_first(error, messages, ValueError, "refused it")


def _raise_first(error: Exception | None, messages: list, kind: type, what: str) -> None:
    """Raises this rank's ``error``, or else ``kind`` naming the first rank with a message."""
    if error is not None:
        raise error
    for r, message in enumerate(messages):
        if message is not None:
            raise kind(f"rank {r} {what}: {message}")


class RankFailedError(ValueError):
    """Another rank could not build the optimizer (its reason is in the message)."""


class PlanMismatchError(ValueError):
    """Ranks built different plans (different models or options)."""


def agreement_items(settings: list, plan: Any, name: Any) -> list[tuple[str, str, Any]]:
    """What ranks compare at construction (``check_agreement``'s items): the optimizer-wide
    ``settings``, each group's options and each parameter's fingerprint and name
    (``name(group, param)``)."""
    items: list[tuple[str, str, Any]] = list(settings)
    for gi, g in enumerate(plan.groups):
        items.append(("group", f"param group {gi}", g.spec.opts.fields_text()))
        for pi, fingerprint in enumerate(g.spec.param_fingerprints()):
            items.append(("param", name(gi, pi), f"{fingerprint}:{name(gi, pi)}"))
    return items


def check_agreement(
    group, items: list[tuple[str, str, Any]], owners: str, error: Exception | None = None
) -> None:
    """Checks that every rank of ``group`` (None: the default group) built the same optimizer.

    A rank whose construction failed (``error``, raised on that rank alone, e.g. an option only
    it got wrong) takes part in the same first collective with its error instead of a digest,
    so that the others raise too instead of waiting for it.

    ``items`` are ``(kind, description, value)``: kind ``"setting"`` (an optimizer-wide
    setting), ``"group"`` (a param group's options, a tuple of ``name=value``) or ``"param"``
    (a parameter, compared by a fingerprint of its shape, dtype, sharding and name). One
    collective of a short digest per rank; only when they differ, a second one gathers the
    details, and every rank raises the same PlanMismatchError naming the first difference.
    Every rank sees the same digests, so every rank takes the second collective or none.
    """
    digest = (
        None if error is not None else hashlib.sha1(repr((items, owners)).encode()).hexdigest()[:16]
    )
    world = dist.get_world_size(group)
    first: list = [None] * world
    dist.all_gather_object(first, (None if error is None else str(error), digest), group=group)
    _raise_first(error, [m for m, _ in first], RankFailedError, "could not build the optimizer")
    digests = [d for _, d in first]
    if len(set(digests)) == 1:
        return
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (items, owners), group=group)
    longest = max(len(i) for i, _ in everyone)
    params_seen = 0
    for n in range(longest):
        entries = [i[n] if n < len(i) else None for i, _ in everyone]
        kind = next(e[0] for e in entries if e is not None)
        if len({None if e is None else (e[0], e[2]) for e in entries}) > 1:
            raise PlanMismatchError(_describe_difference(kind, params_seen, entries))
        params_seen += kind == "param"
    raise PlanMismatchError(
        "ranks computed different block placements from the same parameters and options; "
        "this is a bug in the planner's determinism"
    )


def _describe_difference(kind: str, param_index: int, entries: list) -> str:
    by_value: dict[str, list[int]] = {}
    if kind == "group":
        # Name only the options that differ.
        fields = [set(e[2]) for e in entries if e is not None and e[0] == "group"]
        common = set.intersection(*fields) if fields else set()
    for r, e in enumerate(entries):
        if e is None:
            text = "no such parameter" if kind == "param" else "nothing"
        elif kind == "param":
            text = e[1]
        elif kind == "group":
            text = ", ".join(v for v in e[2] if v not in common) or "(same)"
        else:
            text = str(e[2])
        by_value.setdefault(text, []).append(r)
    per_rank = "; ".join(
        f"rank {rs[0]}: {text}" if len(rs) == 1 else f"ranks {_ranks(rs)}: {text}"
        for text, rs in by_value.items()
    )
    if kind == "param":
        what = f"parameter #{param_index} differs"
        advice = (
            "the same parameters (shapes, dtypes, order, names; FSDP1's "
            "FullyShardedDataParallel gives each rank flat pieces of other sizes, which "
            "ShardedShampoo does not take: shard with FSDP2's fully_shard)"
        )
    elif kind == "group":
        what = f"the options of {entries[0][1] if entries[0] else 'a param group'} differ"
        advice = "the same options"
    else:
        what = f"{entries[0][1] if entries[0] else 'a setting'} differs"
        advice = "the same settings"
    return (
        f"ranks built different optimizers: {what} ({per_rank}). Every rank must construct "
        f"ShardedShampoo with {advice}."
    )


def _ranks(rs: list[int]) -> str:
    return ", ".join(map(str, rs[:8])) + (f" and {len(rs) - 8} more" if len(rs) > 8 else "")
