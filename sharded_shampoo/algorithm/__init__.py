"""The math: one Shampoo step for a stack of same-shape blocks (``step``), the refreshes of its
roots or eigenbases (``refresh``, ``roots``, ``eigenbasis``), mode products (``modes``) and
how state is stored (``packing``: symmetric matrices as upper triangles; ``rounding``:
moving averages in bfloat16).
Batched over the blocks of a stack; nothing here knows about parameters, param groups or
processes, so a block's update is the same wherever it is computed."""

from .refresh import (
    decompose,
    due_rows,
    install,
    install_keys,
    refresh,
    refresh_inputs,
    storage_format,
)
from .step import RowGate, stack_step

__all__ = [
    "RowGate",
    "decompose",
    "due_rows",
    "install",
    "install_keys",
    "refresh",
    "refresh_inputs",
    "stack_step",
    "storage_format",
]
