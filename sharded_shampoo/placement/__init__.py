from .cost import block_cost, block_state_elements
from .layout import Part, StackLayout, group_stacks
from .plan import GroupPlan, GroupSpec, Plan
from .planner import Assignment, assign_blocks
from .sharding import Piece, RowSharding, band, block_pieces

__all__ = [
    "Assignment",
    "GroupPlan",
    "GroupSpec",
    "Part",
    "Piece",
    "RowSharding",
    "band",
    "block_pieces",
    "Plan",
    "StackLayout",
    "assign_blocks",
    "block_cost",
    "block_state_elements",
    "group_stacks",
]
