"""What the optimizer tells the user about blocks that went wrong: warnings that name the block,
and the decisions they come with (skip a block with a non-finite gradient; give up on roots
that keep failing)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import torch

from .blocking import ParamBlocking

__all__ = [
    "BlockNamer",
    "NonFiniteGradientWarning",
    "ParamNamer",
    "RootFailureWarning",
    "block_name",
    "param_name",
    "warn",
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
