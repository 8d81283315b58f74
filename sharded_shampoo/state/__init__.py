from .pool import StatePool
from .stacks import BlockStack, GroupBlocks, math_dtype, pool_lengths, state_spec

__all__ = ["BlockStack", "GroupBlocks", "StatePool", "math_dtype", "pool_lengths", "state_spec"]
