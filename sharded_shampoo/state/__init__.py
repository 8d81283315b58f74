from .pool import StatePool
from .stacks import (
    BlockStack,
    GroupBlocks,
    RowSelection,
    math_dtype,
    pool_lengths,
    state_spec,
)

__all__ = [
    "BlockStack", "GroupBlocks", "RowSelection", "StatePool", "math_dtype", "pool_lengths",
    "state_spec",
]
