"""Whether a state dict fits an optimizer, checked in full before anything is loaded."""

from __future__ import annotations

from typing import Any

import torch

from ..algorithm.packing import other_layout, relayout, symmetric_state
from ..blocking import ParamBlocking
from ..diagnostics import ParamNamer
from ..options import STORAGE, GroupOptions
from .checksums import CHECKSUM, verify_checksums
from .groups import GroupState
from .record import blocking_record, record_difference
from .stacks import block_state_spec

__all__ = ["check_state_dict"]


def check_state_dict(
    state_dict: dict[str, Any],
    param_groups: list[dict[str, Any]],
    groups: list[GroupState],
    live: dict[torch.Tensor, dict[str, Any]],
    name: ParamNamer,
) -> tuple[list[dict], list[tuple]]:
    """Whether ``state_dict`` fits an optimizer with ``param_groups``, whose groups' state is
    ``groups`` and whose ``Optimizer.state`` is ``live``: returns each group's options to take
    and the (live tensor, saved tensor) pairs to copy, or raises ValueError naming the first
    parameter or group that does not fit: the number of groups and parameters, each parameter's
    blocking record, its saved step, the options that shape the state, and the name and shape
    of every state tensor. Every rank holds every parameter's record, so every rank raises
    alike."""
    saved_groups = state_dict["param_groups"]
    saved_state = state_dict["state"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} param groups, this optimizer has "
            f"{len(param_groups)}"
        )
    new_options, copies, checked = [], [], []
    for gi, (group, saved) in enumerate(zip(param_groups, saved_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {gi}: the state dict has {len(saved['params'])} parameters, "
                f"this optimizer has {len(group['params'])}"
            )
        saved_ids = _by_name(gi, saved, group)
        # Storage options (how state is kept, not what it is) stay this optimizer's: the
        # state is converted below.
        options = {k: v for k, v in saved.items() if k not in ("params", "param_names", *STORAGE)}
        current = GroupOptions.from_group(group)
        steps = set()
        for pi, pid in enumerate(saved_ids):
            theirs = saved_state.get(pid, {})
            if "blocking" not in theirs or "step" not in theirs:
                raise ValueError(
                    f"the state dict has no blocking record for {name(gi, pi)}: it was not "
                    "saved by ShardedShampoo (or by an older version)"
                )
            record = blocking_record(
                groups[gi].blocks.blockings[pi], current, groups[gi].phases(pi)
            )
            diff = record_difference(theirs["blocking"], record)
            if diff is not None:
                raise ValueError(
                    f"the state of {name(gi, pi)} does not fit this optimizer: {diff}. Load it "
                    "into "
                    "an optimizer built with the same model and options."
                )
            steps.add(int(theirs["step"]))
        # Each parameter's own step decides: a flattened state dict gives a group the
        # options (and step) of its first parameter only, and a regrouped load none.
        if len(steps) > 1:
            raise ValueError(
                f"param group {gi}: its parameters were saved at different steps "
                f"{sorted(steps)} (they were in different param groups then); load the "
                "state into an optimizer with the same grouping"
            )
        if steps:
            options["step"] = steps.pop()
        _check_quantized(gi, saved, group)
        candidate = {**group, **options}
        try:
            opts = GroupOptions.from_group(candidate)
        except (KeyError, ValueError) as e:
            raise ValueError(f"param group {gi} of the state dict: {e}") from None
        changed = opts.structure_changes(groups[gi].structure)
        if changed:
            raise ValueError(
                f"param group {gi}: the state dict was saved with a different "
                f"{changed}; its state does not fit this optimizer's blocks"
            )
        new_options.append(options)
        for pi, (p, pid) in enumerate(zip(group["params"], saved_ids, strict=True)):
            mine = {
                k: v
                for k, v in live[p].items()
                if k not in ("blocking", "step") and not k.endswith(f".{CHECKSUM}")
            }
            # This rank's blocks: each block is checked by its owner.
            checked.append((name(gi, pi), saved_state[pid], {k.split(".")[1] for k in mine}))
            theirs = {k: v for k, v in saved_state[pid].items() if k not in ("blocking", "step")}
            blocking = groups[gi].blocks.blockings[pi]
            # A full state dict (or one process's) also holds the blocks other ranks own: each
            # rank takes its own, and checks that the others are blocks of this parameter.
            missing = sorted(set(mine) - set(theirs))[:3]
            extra = sorted(
                k
                for k in theirs
                if k not in mine and not _fits_block(k, theirs[k], blocking, p.dtype, opts)
            )[:3]
            if missing or extra:
                raise ValueError(
                    f"state of {name(gi, pi)} does not fit this optimizer's blocks "
                    f"(missing {missing}, unexpected {extra})"
                )
            for key, t in mine.items():
                src = theirs[key]
                if isinstance(src, torch.Tensor):
                    src = _as_stored(key, src, tuple(t.shape))
                if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(t.shape):
                    got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src)
                    raise ValueError(
                        f"state {key!r} of {name(gi, pi)} has shape {got}, expected "
                        f"{tuple(t.shape)}"
                    )
                copies.append((t, src))
    verify_checksums(checked)
    return new_options, copies


def _check_quantized(gi: int, saved: dict[str, Any], group: dict[str, Any]) -> None:
    """Quantized roots (``root_dtype="int8"``) load only into the same storage: their codes and
    scales do not convert."""
    ours, theirs = group.get("root_dtype"), saved.get("root_dtype")
    if "int8" not in (ours, theirs):
        return
    for name in ("root_dtype", "symmetric_packing"):
        if saved.get(name) != group.get(name):
            raise ValueError(
                f"param group {gi}: {name}: {saved.get(name)!r} saved, {group.get(name)!r} "
                "here; quantized roots load only with the same root_dtype and "
                "symmetric_packing"
            )


def _by_name(gi: int, saved: dict[str, Any], group: dict[str, Any]) -> list:
    """The saved parameter ids in the order of this group's parameters: by name when both the
    state dict and the group name their parameters (a dict saved from a model whose layers were
    listed in another order still puts each layer's state on that layer), else by position."""
    ours, theirs = group.get("param_names"), saved.get("param_names")
    ids = list(saved["params"])
    if not ours or not theirs or list(ours) == list(theirs):
        return ids
    if len(set(ours)) == len(ours) and sorted(ours) == sorted(theirs):
        position = {name: i for i, name in enumerate(theirs)}
        return [ids[position[name]] for name in ours]
    missing = sorted(set(ours) - set(theirs))[:3]
    unexpected = sorted(set(theirs) - set(ours))[:3]
    raise ValueError(
        f"param group {gi}: the state dict names other parameters than this optimizer "
        f"(missing {missing}, unexpected {unexpected}): it was saved from another model"
    )


def _fits_block(
    key: str, value: Any, blocking: ParamBlocking, param_dtype: torch.dtype, opts: GroupOptions
) -> bool:
    """Whether ``key`` (``blocks.<id>.<name>``) names a state tensor of one of the parameter's
    blocks, and ``value`` has its shape."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return False
    bid = int(parts[1])
    if bid >= blocking.num_blocks:
        return False
    if parts[2] == CHECKSUM:  # {}: torch's stand-in for a key the checkpoint lacks
        return (isinstance(value, torch.Tensor) and value.numel() == 1) or value == {}
    spec = {
        k: shape for k, shape, _ in block_state_spec(blocking.block_shape(bid), param_dtype, opts)
    }
    return (
        parts[2] in spec
        and isinstance(value, torch.Tensor)
        and _same_matrix_shape(parts[2], tuple(value.shape), tuple(spec[parts[2]]))
    )


def _same_matrix_shape(name: str, saved: tuple[int, ...], ours: tuple[int, ...]) -> bool:
    """Whether state ``name`` saved with shape ``saved`` loads where we keep ``ours``: the
    same, or a factor or root in the other ``symmetric_packing``."""
    return saved == ours or (symmetric_state(name) and other_layout(saved) == ours)


def _as_stored(key: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``value`` as this optimizer stores ``key`` (a factor or root saved with the other
    ``symmetric_packing``: converted); else ``value`` as it is."""
    if symmetric_state(key):
        converted = relayout(value, shape)
        if converted is not None:
            return converted
    return value
