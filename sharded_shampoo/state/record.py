"""What a checkpoint records of how a parameter's state is laid out, as a fixed-size tensor.

Every rank presents this record for every parameter (it is replicated, so DCP writes it once),
whoever owns the blocks. On load it is compared with the current optimizer's before any state
changes, so a checkpoint from another model or another blocking is refused with a message that
names the parameter and what differs. A fixed size keeps the record loadable whatever it holds.

Layout (version 2): version, numel, shape (its length, then up to 8 dims), merged shape (the
same), blocks, the staggered phases' digest, then the options the table marks as recorded
(``options.OPTIONS``, in its order), padded with -1. Version 1 records (fixed option fields,
written before) are read too.
"""

from __future__ import annotations

import hashlib

import torch

from ..blocking import ParamBlocking
from ..options import EIGENBASES, GRAFTING_TYPES, RECORDED, GroupOptions

__all__ = ["RECORD_SIZE", "blocking_record", "phases_digest", "record_difference"]

RECORD_SIZE = 32
_VERSION = 2
_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PHASES = "stagger_roots phases"


def phases_digest(phases: tuple[int, ...] | None) -> int:
    """31 bits of a parameter's blocks' refresh phases (-1: not staggered). Phases come from
    the order the parameters were given in: a checkpoint loaded with another order would
    refresh blocks at other steps, so the record tells."""
    if phases is None:
        return -1
    digest = hashlib.blake2b(repr(tuple(phases)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _dims(shape: tuple[int, ...]) -> list[int]:
    dims = list(shape[:_MAX_DIMS])
    return [len(shape)] + dims + [-1] * (_MAX_DIMS - len(dims))


def blocking_record(
    blocking: ParamBlocking, opts: GroupOptions, phases: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The record of a parameter's blocking under ``opts`` (``phases``: its blocks' refresh
    phases with ``stagger_roots``)."""
    values = [
        _VERSION,
        blocking.numel,
        *_dims(blocking.shape),
        *_dims(blocking.merged),
        blocking.num_blocks,
        phases_digest(phases if opts.stagger_roots else None),
        *opts.recorded(),
    ]
    values += [-1] * (RECORD_SIZE - len(values))
    # On the CPU whatever the parameters' device: it is read on the host only.
    return torch.tensor(values, dtype=torch.int64, device="cpu")


def _shape(v: list[int], at: int) -> tuple:
    n = v[at]
    return tuple(v[at + 1 : at + 1 + n]) if n <= _MAX_DIMS else ("...",)


def _option_values(opts_ints: dict[str, int]) -> dict[str, object]:
    """Recorded option ints as readable values, by field name."""
    out: dict[str, object] = {}
    for name, i in opts_ints.items():
        if name == "grafting":
            out[name] = None if i == -1 else GRAFTING_TYPES[i]
        elif name == "factor_dtype":
            out[name] = _DTYPES[i]
        elif name == "preconditioner":
            out[name] = {1: "eigenvalue_corrected", 2: "diagonal", 3: "spectral"}.get(i, "shampoo")
        elif name == "eigenbasis_convention":
            # -1 in an eigenvalue-corrected record: written before conventions, so SOAP's.
            out[name] = {1: "soap", 2: "reference", -1: "soap"}[i]
        elif name == "max_factor_ratio":
            out[name] = None if i == -1 else i
        elif name == "eigenbasis":
            # -1 in a root-inverse record: written before the option was recorded, so eigh.
            out[name] = EIGENBASES[max(i, 0)]
        elif name == "merge_dims" or "> 0" in name:
            out[name] = bool(i)
        else:
            out[name] = i
    if out.get("preconditioner") != "eigenvalue_corrected":
        out.pop("eigenbasis_convention", None)
    else:
        out.pop("eigenbasis", None)  # its state is the same with either
    return out


def _decode(record: torch.Tensor) -> dict[str, object]:
    v = [int(x) for x in record.tolist()]
    base = 2 + 1 + _MAX_DIMS
    out: dict[str, object] = {
        "numel": v[1],
        "shape": _shape(v, 2),
        "merged shape": _shape(v, base),
    }
    rest = v[base + 1 + _MAX_DIMS :]
    if v[0] == 1:
        names = (
            "max_preconditioner_dim",
            "merge_dims",
            "factor_dtype",
            "grafting",
            "betas[0] > 0",
            "momentum > 0",
        )
        out["blocks"] = rest[6]
        out[_PHASES] = None if rest[9] == -1 else rest[9]
        ints = dict(zip(names, rest[:6], strict=True))
        ints.update(preconditioner=rest[7], eigenbasis_convention=rest[8])
    elif v[0] == _VERSION:
        out["blocks"] = rest[0]
        out[_PHASES] = None if rest[1] == -1 else rest[1]
        names = [o.structure_name or o.name for o in RECORDED]
        ints = dict(zip(names, rest[2 : 2 + len(names)], strict=True))
    else:
        raise ValueError(f"record version {v[0]}")
    out.update(_option_values(ints))
    return out


def record_difference(saved: torch.Tensor, current: torch.Tensor) -> str | None:
    """None when the records agree, else what differs, e.g. ``max_preconditioner_dim: 8 saved,
    16 here``."""
    if tuple(saved.shape) != (RECORD_SIZE,):
        return f"the saved blocking record has shape {tuple(saved.shape)}, not ({RECORD_SIZE},)"
    # A loader may hand the saved record on an accelerator (broadcast_from_rank0 under NCCL).
    saved = saved.to("cpu", torch.int64)
    if torch.equal(saved, current.to("cpu")):
        return None
    try:
        a, b = _decode(saved), _decode(current)
    except (IndexError, ValueError, KeyError):
        return "the saved blocking record is not one this version can read"
    diffs = []
    for k in dict.fromkeys([*a, *b]):
        x, y = a.get(k), b.get(k)
        if x == y or (k == _PHASES and None in (x, y)):  # phases unrecorded: nothing to check
            continue
        if k == _PHASES:
            diffs.append(
                "its blocks' stagger_roots phases differ (phases follow the order parameters "
                "are given in: pass them in the order they had when saved)"
            )
        else:
            diffs.append(f"{k}: {x} saved, {y} here")
    return "; ".join(diffs) or None
