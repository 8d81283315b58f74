"""Distributed checkpoints of a model and its ShardedShampoo, through torch.distributed.checkpoint.

A checkpoint holds the model's state dict and the optimizer's, as ``get_model_state_dict`` and
``get_optimizer_state_dict`` give them (flattened): parameter FQNs and blocks of the full
parameter shapes, never ranks, so it loads at any world size and in any mode (one process, DDP,
FSDP2, HSDP). Each rank writes only the blocks it owns; nothing is gathered.

A directory becomes a checkpoint only when ``COMPLETE`` appears in it, written after every
rank finished ``dcp.save``: a process killed while saving leaves a directory without it, which
``load_checkpoint`` refuses and ``latest_checkpoint`` skips.

A load changes nothing unless it succeeds: the checkpoint's metadata and blocking records are
checked first, and tensors are read into staging copies that replace the live state only once
everything was read and validated. That costs, for the duration of the load, one more copy of
the rank's share of the model and of its optimizer state.

Checkpoints must come from a trusted source: DCP reads a checkpoint's ``.metadata`` with
``pickle``, which can run code, as ``torch.load(weights_only=False)`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .agreement import on_device
from .algorithm.packing import other_layout, symmetric_state
from .state.record import RECORD_SIZE, record_difference

__all__ = [
    "IncompleteCheckpointError",
    "full_optimizer_state_dict",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "step_directory",
]

MARKER = "COMPLETE"


def _options(flatten: bool) -> StateDictOptions:
    return StateDictOptions(flatten_optimizer_state_dict=flatten)


class IncompleteCheckpointError(RuntimeError):
    """The directory is not a complete checkpoint (its save was interrupted, or it is not one)."""


def full_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, cpu_offload: bool = True
) -> dict[str, Any]:
    """Every block of the optimizer's state, keyed by parameter names, as torch's
    ``get_optimizer_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=...))``
    gives it: on rank 0 only, on the CPU, with ``cpu_offload``; else on every rank. Asks
    ShardedShampoo explicitly (``full_state``), so it never depends on reading torch's options
    from its frames. Collective: every rank calls it. For callbacks that save one file
    (Lightning, torchtitan, the Hugging Face Trainer)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    full = getattr(optimizer, "full_state", None)
    with full(cpu_offload) if full is not None else contextlib.nullcontext():
        return get_optimizer_state_dict(model, optimizer, options=options)


def step_directory(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _on_params_device(optimizer: torch.optim.Optimizer):
    """DCP's object collectives and barriers on the device of the optimizer's parameters (see
    ``communication.on_device``)."""
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), None)
    return on_device(device)


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict | None = None,
    flatten: bool = True,
    asynchronous: bool = False,
) -> Future | None:
    """Saves model and optimizer state (and ``extra``, small picklable values) to ``path``.

    Collective: every rank calls it. ``path`` is marked complete after every rank is done.
    ``flatten`` is ``flatten_optimizer_state_dict``; a checkpoint loads with the same setting.

    ``asynchronous``: the state is copied to host memory now (``dcp.async_save``'s staging)
    and written by a background thread while training goes on; returns a future that is done
    once this rank's part is written (on the first rank: once the checkpoint is marked
    complete). Its collectives use a process group of their own (gloo), created at the first
    asynchronous save, so that they never interleave with training's. Wait for it before the
    next save; a job killed before it is done leaves a checkpoint without its marker, which
    ``load_checkpoint`` refuses and ``latest_checkpoint`` skips.
    """
    with _on_params_device(optimizer):
        return _save(path, model, optimizer, extra, flatten, asynchronous)


def _save(path, model, optimizer, extra, flatten, asynchronous) -> Future | None:
    """``save_checkpoint``, on the parameters' device."""
    # A save only reads the optimizer state: views of it, no copy (ShardedShampoo.saving); an
    # asynchronous one copies them to host memory before it returns.
    views = optimizer.saving() if hasattr(optimizer, "saving") else contextlib.nullcontext()
    first = not _distributed() or dist.get_rank() == 0
    with views:
        state: dict[str, Any] = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer, options=_options(flatten)),
        }
        if extra:
            state["extra"] = dict(extra)
        # Saving over an older checkpoint: drop its marker first, so that an interrupted save
        # cannot leave a half-overwritten directory that still looks complete.
        if first:
            marker = os.path.join(path, MARKER)
            if os.path.exists(marker):
                os.remove(marker)
        if _distributed():
            dist.barrier()
        if asynchronous:
            written = dcp.async_save(
                state,
                checkpoint_id=path,
                process_group=_async_group(),
                no_dist=not _distributed(),
            )
            return _then_mark(written, path, extra) if first else written
        dcp.save(state, checkpoint_id=path, no_dist=not _distributed())
    if _distributed():
        dist.barrier()
    if first:
        _mark_complete(path, extra)
    if _distributed():
        dist.barrier()
    return None


_ASYNC_GROUPS: dict[int, Any] = {}


def _async_group():
    """The process group of asynchronous saves' collectives (None without one)."""
    if not _distributed():
        return None
    world = dist.get_world_size()
    if world not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[world] = dist.new_group(backend="gloo")
    return _ASYNC_GROUPS[world]


def _then_mark(written: Any, path: str, extra: dict | None) -> Future:
    """A future done once ``written`` (DCP's, done on the first rank once every rank's part
    and the metadata are written) is, and the marker is written after it."""
    future = getattr(written, "upload_completion", written)
    done: Future = Future()

    def mark(f: Future) -> None:
        try:
            f.result()
            _mark_complete(path, extra)
            done.set_result(None)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            done.set_exception(e)

    future.add_done_callback(mark)
    return done


def _mark_complete(path: str, extra: dict | None) -> None:
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"extra": {k: v for k, v in (extra or {}).items()}}, fh, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(path, MARKER))


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(
        os.path.join(path, ".metadata")
    )


def latest_checkpoint(root: str) -> str | None:
    """The newest complete ``step-NNNNNNNN`` directory under ``root``, or None.

    Only load checkpoints from a trusted source (see the module docstring: DCP unpickles).
    """
    if not os.path.isdir(root):
        return None
    found = []
    for name in os.listdir(root):
        m = re.fullmatch(r"step-(\d+)", name)
        if m and is_complete(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return max(found)[1] if found else None


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict | None = None,
    flatten: bool = True,
) -> dict:
    """Loads ``path`` into ``model`` and ``optimizer`` (built as for saving, at any world size
    and in any mode); returns the saved ``extra`` (give the keys to read, with defaults).

    Collective. Checks first, on every rank alike, that the checkpoint is complete, that it
    holds exactly this model's entries with their shapes and ShardedShampoo state for exactly
    its parameters, and that each parameter's blocking record matches this optimizer; a mismatch
    raises ValueError before any state changes, naming the first entry that differs. Tensors are
    then read into staging copies, so a load that fails while reading (a truncated file raises
    ``CheckpointException``) leaves the model and the optimizer as they were.

    Only load checkpoints from a trusted source (see the module docstring: DCP unpickles).
    """
    with _on_params_device(optimizer):
        return _load(path, model, optimizer, extra, flatten)


def _load(path, model, optimizer, extra, flatten) -> dict:
    """``load_checkpoint``, on the parameters' device."""
    if not is_complete(path):
        raise IncompleteCheckpointError(
            f"{path} is not a complete checkpoint (no {MARKER} marker or no .metadata): its save "
            "was interrupted, or it is not a checkpoint. Use latest_checkpoint(root) to find "
            "the newest complete one."
        )
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    model_sd = get_model_state_dict(model)
    # ShardedShampoo's state_dict() is a copy already: the staging buffers of the optimizer.
    osd = get_optimizer_state_dict(model, optimizer, options=_options(flatten))
    if flatten:
        records = {
            k: v for k, v in osd.items() if k.startswith("state.") and k.endswith(".blocking")
        }
    else:
        records = {f"state.{fqn}.blocking": s["blocking"] for fqn, s in osd["state"].items()}
    _check_entries(path, saved, model_sd, records)
    _check_records(path, records)
    _read_as_saved(saved, osd, flatten)
    _drop_unsaved_checksums(saved, osd, flatten)
    staged = {
        k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in model_sd.items()
    }
    state: dict[str, Any] = {"model": staged, "optim": osd}
    if extra:
        state["extra"] = dict(extra)
    dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    # The optimizer first: its load validates the state once more before copying anything.
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_options(flatten))
    set_model_state_dict(model, state["model"])
    return state.get("extra", {})


def _drop_unsaved_checksums(saved: dict[str, Any], osd: dict[str, Any], flatten: bool) -> None:
    """A checkpoint written before block checksums has none to read (nor to verify)."""
    if flatten:
        for key in [k for k in osd if k.endswith(".checksum") and f"optim.{k}" not in saved]:
            del osd[key]
        return
    for fqn, state in osd["state"].items():
        for key in [k for k in state if k.endswith(".checksum")]:
            if f"optim.state.{fqn}.{key}" not in saved:
                del state[key]


def _read_as_saved(saved: dict[str, Any], osd: dict[str, Any], flatten: bool) -> None:
    """State saved in another storage is read as it was saved (the optimizer's load verifies
    its checksums, then converts it): factors and roots saved with the other
    ``symmetric_packing`` take the saved shape, tensors saved in another floating dtype
    (``root_dtype``, ``grafting_dtype``, ...) the saved dtype."""
    entries = (
        [(osd, k, f"optim.{k}") for k in osd if k.startswith("state.")]
        if flatten
        else [
            (state, k, f"optim.state.{fqn}.{k}")
            for fqn, state in osd["state"].items()
            for k in state
        ]
    )
    for holder, key, name in entries:
        value, meta = holder[key], saved.get(name)
        if not isinstance(value, torch.Tensor) or not isinstance(meta, TensorStorageMetadata):
            continue
        size, dtype = tuple(meta.size), meta.properties.dtype
        if size != tuple(value.shape) and other_layout(tuple(value.shape)) == size:
            if symmetric_state(key):
                value = holder[key] = torch.empty(size, dtype=value.dtype, device=value.device)
        if dtype != value.dtype and value.is_floating_point():  # another storage dtype
            holder[key] = torch.empty(value.shape, dtype=dtype, device=value.device)


def _check_entries(
    path: str, saved: dict[str, Any], model_sd: dict[str, Any], records: dict[str, torch.Tensor]
) -> None:
    """Compares the checkpoint's keys with this model's and optimizer's, from its metadata
    alone: an entry either side lacks, or a tensor of another shape, raises ValueError."""
    ours = {f"model.{k}": v for k, v in model_sd.items()}
    theirs = {k for k in saved if k.startswith("model.")}
    _refuse_difference(path, "model entries", set(ours), theirs)
    for key, value in ours.items():
        meta = saved[key]
        if isinstance(value, torch.Tensor) and isinstance(meta, TensorStorageMetadata):
            if tuple(meta.size) != tuple(value.shape):
                raise ValueError(
                    f"the checkpoint at {path} does not fit this model: {key[6:]!r} has shape "
                    f"{tuple(meta.size)} there, {tuple(value.shape)} here"
                )
    ours = {f"optim.{k}" for k in records}
    theirs = {k for k in saved if k.startswith("optim.state.") and k.endswith(".blocking")}
    _refuse_difference(path, "parameters with ShardedShampoo state", ours, theirs)


def _refuse_difference(path: str, what: str, ours: set[str], theirs: set[str]) -> None:
    def names(keys: set[str]) -> str:
        shown = sorted(
            k.split(".", 1)[1].removeprefix("state.").removesuffix(".blocking") for k in keys
        )
        return ", ".join(repr(k) for k in shown[:5]) + (
            f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        )

    if theirs - ours:
        raise ValueError(
            f"the checkpoint at {path} has {what} that this model lacks: {names(theirs - ours)}. "
            "It was saved from another model; build the model as it was when it was saved."
        )
    if ours - theirs:
        raise ValueError(
            f"the checkpoint at {path} lacks {what} that this model has: {names(ours - theirs)}. "
            "It was saved from another model or another optimizer."
        )


def _check_records(path: str, records: dict[str, torch.Tensor]) -> None:
    """Loads only the saved blocking records and compares them with ours. Every rank holds every
    parameter's record, so every rank reaches the same verdict: no rank is left waiting."""
    saved = {k: torch.empty(RECORD_SIZE, dtype=torch.int64) for k in records}
    dcp.load(
        {"optim": saved},
        checkpoint_id=path,
        planner=DefaultLoadPlanner(allow_partial_load=True),
        no_dist=not _distributed(),
    )
    for key in sorted(records):
        fqn = key[len("state.") : -len(".blocking")]
        diff = record_difference(saved[key], records[key])
        if diff is not None:
            raise ValueError(
                f"the checkpoint at {path} does not fit parameter {fqn!r}: {diff}. Build the "
                "model and optimizer as they were when it was saved."
            )
