from .stacks import BlockStack, GroupBlocks, math_dtype, state_bytes

__all__ = ["BlockStack", "GroupBlocks", "math_dtype", "state_bytes"]
