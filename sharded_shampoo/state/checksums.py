"""A checksum per block in every state dict, verified on load: DCP and ``torch.save`` keep none,
so a flipped byte in a saved optimizer payload would otherwise load without a word.

``blocks.<id>.checksum`` (an int64 tensor of shape (1,): torch's full-state-dict loading
mishandles 0-d tensors of keys a rank does not hold) is computed from the block's saved
tensors when a state dict is made and checked against them when one is loaded, before anything
changes. It is a sum of 64-bit words, wrapping, so that it is computed where the state is, in
a few reductions per tensor and in any order (the sum is the same whatever the reduction
order, on any device): any change of a single word (a flipped bit or byte) changes it, and so
does a change of the tensors' lengths; it is no cryptographic digest (words swapped between
places cancel out). Each tensor's sum is weighted by an odd number derived from its name, so
that tensors of a block do not stand in for each other.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["CHECKSUM", "add_checksums", "block_checksum", "verify_checksums"]

CHECKSUM = "checksum"


def _weight(name: str) -> int:
    """An odd 62-bit number for the state tensor ``name`` (odd: multiplying by it mod 2**64
    loses no change)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 2 | 1


def _word_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum, mod 2**64, of ``t``'s bytes read as int64 words (a short tail as bytes), plus
    its length in bytes."""
    raw = t.detach().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    try:
        words = raw[:whole].view(torch.int64)
    except RuntimeError:  # a view whose start is not 8-byte aligned
        words = raw[:whole].clone().view(torch.int64)
    total = words.sum() + raw.numel()
    if whole < raw.numel():
        total = total + raw[whole:].to(torch.int64).sum() * 257
    return total


def block_checksum(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The checksum of one block's saved tensors, by state name (``factor_0``, ...)."""
    total = None
    for name in sorted(tensors):
        term = _word_sum(tensors[name]) * _weight(name)
        total = term if total is None else total + term.to(total.device)
    return total if total is not None else torch.zeros((), dtype=torch.int64)


def _blocks(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """A parameter's saved block tensors by block id and state name."""
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "blocks" and isinstance(value, torch.Tensor):
            if parts[2] != CHECKSUM:
                blocks.setdefault(parts[1], {})[parts[2]] = value
    return blocks


def add_checksums(state: dict[str, Any]) -> None:
    """Adds ``blocks.<id>.checksum`` to a parameter's saved ``state`` for each block in it."""
    for bid, tensors in _blocks(state).items():
        state[f"blocks.{bid}.{CHECKSUM}"] = block_checksum(tensors).reshape(1)


def verify_checksums(items: list[tuple[str, dict[str, Any], set[str]]]) -> None:
    """For each (parameter name, its saved state, the ids of the blocks to check), compares
    each block's checksum, where one was saved, with its tensors; raises ValueError naming the
    first block that differs. One host read for all of them."""
    names, differs = [], []
    for param, state, bids in items:
        for bid, tensors in _blocks(state).items():
            stored = state.get(f"blocks.{bid}.{CHECKSUM}")
            if bid not in bids or not isinstance(stored, torch.Tensor):
                continue  # another rank's block, or saved before checksums
            names.append(f"block {bid} of {param}")
            computed = block_checksum(tensors)
            stored = stored.detach().reshape(()).to(computed.device, torch.int64)
            differs.append((computed != stored).to(differs[0].device if differs else None))
    if not names:
        return
    differs = torch.stack(differs)
    if bool(differs.any()):
        first = int(differs.nonzero()[0])
        raise ValueError(
            f"the saved state of {names[first]} does not match its checksum: the checkpoint "
            "was corrupted (a changed byte) after it was written; nothing was loaded. Resume "
            "from another checkpoint."
        )
