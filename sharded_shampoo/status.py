"""What a step learns from the other ranks, and how every rank raises together.

Per step, the distributors' exchanges carry status words at the end of every piece a rank
sends: a rank that hits an error it must raise (a block whose roots failed too often, invalid
options, an exception in its math or in a background refresh) says so there, and a digest of
the options, step and gradient presence it stepped with lets every rank see a disagreement;
after the collective every rank raises, instead of a failing rank leaving the others waiting
in a collective until the process group's timeout, or replicas drifting apart. The step reads
what it learnt back from the device once (``read_outcome``); only when a rank failed do the
ranks that read it gather the failing ranks' messages (``gather_failures``), so that each
raises with the cause.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DISAGREED",
    "FAILED",
    "STATUS_WORDS",
    "Status",
    "StatusWords",
    "failure_message",
    "gather_failures",
    "raise_if_failed",
    "read_outcome",
    "read_status",
    "status_words",
    "step_digest",
]


@dataclass
class Status:
    """What a distributor's exchange learnt: whether a rank reported an error (its message is
    gathered then: ``gather_failures``), and the ranks that stepped with other options or
    gradients (a list, or True when only their existence is known). Built on the host from
    the exchange's summary (``Distributor.status``)."""

    failed: bool = False
    disagreeing: list[int] | bool = False


# Every piece a rank sends in a step's exchange ends with STATUS_WORDS values: a flags word
# (FAILED: a block's roots failed too often; DISAGREED: this rank saw ranks step with different
# options) and a 32-bit digest of the options it stepped with, one byte per word. Small
# integers are exact in every communication dtype (bfloat16 holds integers up to 256 exactly),
# so the words survive the rounding of the payload; a rank learns from them, in the collective
# it takes anyway, whether to raise, and every rank raises in the same step.

STATUS_WORDS = 5
FAILED, DISAGREED = 1, 2


def status_words(flags: int, digest: int) -> list[float]:
    return [float(flags)] + [float((digest >> (8 * i)) & 0xFF) for i in range(4)]


class StatusWords:
    """This rank's status words for a step, on ``device``: written on the host into pinned
    memory and copied without blocking, the one host-to-device copy a step needs (the digest
    is computed on the host). The host buffer is rewritten only once the previous copy is done
    (it always is: the step's host read comes after it)."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        device = torch.device(device)
        pinned = device.type == "cuda"
        self.host = torch.zeros(STATUS_WORDS, dtype=dtype, device="cpu", pin_memory=pinned)
        self.device = torch.zeros(STATUS_WORDS, dtype=dtype, device=device)
        self._copied = torch.cuda.Event() if pinned else None

    def write(self, flags: int, digest: int) -> torch.Tensor:
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()
        words = torch.tensor(status_words(flags, digest), dtype=self.host.dtype, device="cpu")
        self.host.copy_(words)
        self.device.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return self.device


def read_status(words: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """Per row of ``words`` (n, STATUS_WORDS): (FAILED set, DISAGREED set, digest differs from
    this rank's, whose words are ``mine``), as an (n, 3) bool tensor on their device. Tensor
    operations, not a Python loop over peers: a rank reads a status from every peer, thousands
    of them at scale."""
    w = words.to(torch.int64)
    digest = mine[1:].to(torch.int64)
    return torch.stack(
        [(w[:, 0] & FAILED) != 0, (w[:, 0] & DISAGREED) != 0, (w[:, 1:] != digest).any(1)], dim=1
    )


def step_digest(entries: list[tuple]) -> int:
    """32 bits of everything that must be equal on every rank in a step: per stepping group,
    its index, options (``fields_text``), step, and which parameters have a gradient."""
    text = repr(sorted(entries))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def read_outcome(
    skipped: torch.Tensor | None, summaries: list[torch.Tensor | None], statuses: list
) -> tuple[bool, list[Status]]:
    """The step's one host read: whether this rank skipped a block (``skipped``, one bool on
    the device, or None), and each exchange's summary turned into a ``Status`` by
    ``statuses[i]`` (a distributor's ``status``). Returns (skipped, statuses)."""
    parts = [s for s in summaries if s is not None]
    if skipped is not None:
        parts.insert(0, skipped.view(1))
    flags = torch.cat(parts).tolist() if parts else []
    any_skipped = bool(flags.pop(0)) if skipped is not None else False
    out, at = [], 0
    for summary, status in zip(summaries, statuses, strict=True):
        n = 0 if summary is None else summary.numel()
        out.append(status(flags[at : at + n]))
        at += n
    return any_skipped, out


def failure_message(
    error: str | None, invalid: ValueError | None, crash: Exception | None
) -> str | None:
    """What this rank tells the others about its failure in a step, if it failed."""
    if crash is not None:
        return f"{type(crash).__name__}: {crash}"
    if invalid is not None:
        return f"ValueError: {invalid}"
    return error


def gather_failures(
    groups: list, statuses: list[Status], message: str | None
) -> list[tuple[int, str]]:
    """(global rank, message) of the failing ranks, gathered over the process group of each
    exchange whose status words reported a failure (``groups[i]``, None: the default group).
    A collective taken only then, by every rank of that group: each of them read the same
    words."""
    failures = set()
    for group, status in zip(groups, statuses, strict=True):
        if not status.failed:
            continue
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (dist.get_rank(), message), group=group)
        failures.update((r, m) for r, m in gathered if m is not None)
    return sorted(failures)


def raise_if_failed(
    statuses: list[Status],
    error: str | None,
    invalid: ValueError | None,
    crash: Exception | None = None,
    failures: list[tuple[int, str]] = (),
) -> None:
    """Raises on every rank once a step's status words reported a problem: this rank's own
    exception or error first, then another rank's failure with its message (``failures``,
    from ``gather_failures``), then a disagreement between ranks."""
    values = [s.disagreeing for s in statuses]
    disagreeing = sorted({r for v in values if isinstance(v, list) for r in v}) or any(
        v is True for v in values
    )
    if crash is not None:
        raise crash
    if invalid is not None:
        raise invalid
    if error is not None:
        raise RuntimeError(error)
    # Before a disagreement: a failing rank's digest may differ for its failure's sake.
    if failures:
        rank, message = failures[0]
        also = f" (and rank(s) {[r for r, _ in failures[1:]]})" if len(failures) > 1 else ""
        raise RuntimeError(
            f"rank {rank}{also} failed in this step, and every rank raises before any "
            f"parameter changes: {message}"
        )
    if disagreeing:
        who = (
            f"rank(s) {disagreeing} differ from rank 0"
            if isinstance(disagreeing, list)
            else "some ranks differ from others"
        )
        raise RuntimeError(
            f"ranks stepped with different options or gradients: {who} in the options "
            "of a param group (lr, betas, weight_decay, ...), its step, or which "
            "parameters have a gradient. Schedulers must give every rank the same values "
            "(ReduceLROnPlateau fed each rank's own loss does not). Parameters were not "
            "updated in this step."
        )
