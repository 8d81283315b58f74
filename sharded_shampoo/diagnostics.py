"""What the optimizer tells the user about blocks that went wrong: warnings that name the block,
and the decisions they come with (skip a block with a non-finite gradient; give up on roots
that keep failing)."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable

import torch

from .blocking import ParamBlocking
from .distributors import StackWork
from .options import GroupOptions
from .state import BlockStack

__all__ = [
    "BlockNamer",
    "NonFiniteGradientWarning",
    "ParamNamer",
    "RootFailureWarning",
    "block_name",
    "check_roots",
    "param_name",
    "warn",
    "warn_skipped",
]


class NonFiniteGradientWarning(UserWarning):
    """A block's gradient had a NaN or Inf, or was too large for its squared norm to be
    represented; the block was skipped for that step. ``step`` is the param group's step."""

    step: int | None = None


class RootFailureWarning(UserWarning):
    """A block's inverse roots could not be computed; it kept its previous roots. ``step`` is
    the param group's step."""

    step: int | None = None


_INTERNAL_DIRS = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def warn(warning: Warning, step: int | None = None) -> None:
    """Warns at the user's call to ``step()``, past this package's and torch's wrappers.

    The step is an attribute, not part of the text: Python's warning registry keeps one entry
    per distinct text, so a text with the step in it would grow the registry by one entry per
    step while a block keeps failing.
    """
    warning.step = step
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level, frame = level + 1, frame.f_back
    warnings.warn(warning, stacklevel=level)


def block_name(blocking: ParamBlocking, param_name: str, bid: int) -> str:
    where = ", ".join(f"{s.start}:{s.stop}" for s in blocking.block_slices(bid))
    return f"block {bid} [{where}] of parameter {param_name} (merged shape {blocking.merged})"


# name(group, param, block id) -> the block's name in messages
BlockNamer = Callable[[int, int, int], str]
# name(group, param) -> the parameter's name in messages
ParamNamer = Callable[[int, int], str]


def param_name(groups: list[dict], gi: int, pi: int) -> str:
    """Parameter ``pi`` of param group ``gi`` as messages name it: its name and shape when the
    optimizer was given named parameters, else its position and shape."""
    group = groups[gi]
    names = group.get("param_names")
    shape = tuple(group["params"][pi].shape)
    if names:
        return f"{names[pi]} {shape}"
    return f"param_groups[{gi}]['params'][{pi}] {shape}"


def warn_skipped(w: StackWork, name: BlockNamer, step: int) -> None:
    """Warns about the blocks of ``w`` skipped for a non-finite (or too large) gradient. A slow
    path, taken only when the step's host read said some block was: it reads the step's
    per-block masks and norms back."""
    bad = (~w.keep).cpu()
    norms = w.norms.cpu()
    for r in bad.nonzero().flatten().tolist():
        pi, bid = w.stack.row_owner[r]
        if math.isnan(float(norms[r])):
            what = "a non-finite gradient (NaN or Inf)"
        else:  # no NaN, yet the norm is infinite: the block's factor would become infinite
            what = f"an infinite gradient, or one too large for its squared norm in {w.grad.dtype}"
        warn(
            NonFiniteGradientWarning(
                f"{what} in {name(w.group, pi, bid)}: the block is skipped in this step"
            ),
            step,
        )


def check_roots(
    gi: int,
    opts: GroupOptions,
    stack: BlockStack,
    ok: torch.Tensor,
    rows: torch.Tensor,
    name: BlockNamer,
    step: int,
) -> str | None:
    """Warns about blocks whose roots failed; returns the error to raise, if any."""
    if bool(ok.all()):
        return None
    failures = stack.state["root_failures"]
    what = "eigenbasis" if opts.eigenvalue_corrected else "inverse roots"
    error = None
    for j in (~ok).nonzero().flatten().tolist():
        r = int(rows[j])
        pi, bid = stack.row_owner[r]
        count = int(failures[r])
        if count >= opts.max_consecutive_root_failures:
            error = error or (
                f"the {what} of {name(gi, pi, bid)} failed {count} times in a row (also "
                "in float64); its factors are likely non-finite or badly scaled, or epsilon "
                "is too small for the roots to fit the parameter dtype. Parameters were not "
                "updated in this step."
            )
            continue
        warn(
            RootFailureWarning(
                f"{what} of {name(gi, pi, bid)} could not be computed (failure {count} "
                f"of {opts.max_consecutive_root_failures} allowed); keeping its previous ones"
            ),
            step,
        )
    return error
