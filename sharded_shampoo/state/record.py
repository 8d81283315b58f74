"""What a checkpoint records of how a parameter's state is laid out, as a fixed-size tensor.

Every rank presents this record for every parameter (it is replicated, so DCP writes it once),
whoever owns the blocks. On load it is compared with the current optimizer's before any state
changes, so a checkpoint from another model or another blocking is refused with a message that
names the parameter and what differs. A fixed size keeps the record loadable whatever it holds.
"""

from __future__ import annotations

import hashlib

import torch

from ..blocking import ParamBlocking
from ..options import GRAFTING_TYPES, GroupOptions

__all__ = ["RECORD_SIZE", "blocking_record", "record_difference"]

RECORD_SIZE = 32
_VERSION = 1
_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FIELDS = (
    "version", "numel", "shape", "merged shape", "max_preconditioner_dim", "merge_dims",
    "factor_dtype", "grafting", "betas[0] > 0", "momentum > 0", "blocks", "preconditioner",
    "eigenbasis_convention", "stagger_roots phases",
)
# Fields a record written before them holds as -1 (the padding): read as "not recorded", which
# matches anything (an eigenvalue-corrected record without a convention is the SOAP one, the
# only convention then).
_CONVENTIONS = {1: "soap", 2: "reference"}


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
    grafting = -1 if opts.grafting is None else GRAFTING_TYPES.index(opts.grafting)
    convention = -1
    if opts.eigenvalue_corrected:
        convention = next(k for k, v in _CONVENTIONS.items() if v == opts.eigenbasis_convention)
    values = [
        _VERSION,
        blocking.numel,
        *_dims(blocking.shape),
        *_dims(blocking.merged),
        opts.max_preconditioner_dim,
        int(opts.merge_dims),
        _DTYPES.index(opts.factor_dtype),
        grafting,
        int(opts.beta1 > 0),
        int(opts.momentum > 0),
        blocking.num_blocks,
        # -1 (the padding) for root-inverse Shampoo: records written before this field match.
        1 if opts.eigenvalue_corrected else -1,
        convention,
        phases_digest(phases if opts.stagger_roots else None),
    ]
    values += [-1] * (RECORD_SIZE - len(values))
    # On the CPU whatever the parameters' device: it is read on the host only.
    return torch.tensor(values, dtype=torch.int64, device="cpu")


def _decode(record: torch.Tensor) -> dict[str, object]:
    v = [int(x) for x in record.tolist()]
    shape = tuple(v[3 : 3 + v[2]]) if v[2] <= _MAX_DIMS else ("...",)
    base = 2 + 1 + _MAX_DIMS
    merged = tuple(v[base + 1 : base + 1 + v[base]])
    rest = v[base + 1 + _MAX_DIMS :]
    grafting = None if rest[3] == -1 else GRAFTING_TYPES[rest[3]]
    corrected = rest[7] == 1
    return dict(zip(_FIELDS, (
        v[0], v[1], shape, merged, rest[0], bool(rest[1]), _DTYPES[rest[2]], grafting,
        bool(rest[4]), bool(rest[5]), rest[6],
        "eigenvalue_corrected" if corrected else "shampoo",
        _CONVENTIONS.get(rest[8], "soap") if corrected else None,
        None if rest[9] == -1 else rest[9],
    )))


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
    diffs = [
        _difference(k, a[k], b[k]) for k in _FIELDS
        if a[k] != b[k] and not (k == "stagger_roots phases" and None in (a[k], b[k]))
    ]
    return "; ".join(diffs) or None


def _difference(field: str, saved, here) -> str:
    if field == "stagger_roots phases":
        return (
            "its blocks' stagger_roots phases differ (phases follow the order parameters are "
            "given in: pass them in the order they had when saved)"
        )
    return f"{field}: {saved} saved, {here} here"
