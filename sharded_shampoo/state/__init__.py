from .pool import StatePool
from .stacks import (
    BlockStack,
    GroupBlocks,
    Rows,
    RowSelection,
    math_dtype,
    pool_lengths,
    state_spec,
)

__all__ = [
    "BlockStack",
    "GroupBlocks",
    "RowSelection",
    "Rows",
    "StatePool",
    "math_dtype",
    "pool_lengths",
    "state_spec",
]
