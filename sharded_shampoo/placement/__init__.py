from .cost import block_cost, block_state_elements
from .layout import Part, StackLayout, group_stacks
from .plan import GroupPlan, GroupSpec, Plan
from .planner import Assignment, assign_blocks
from .sharding import Piece, RowSharding, band, band_pieces, pieces_of_block

__all__ = [
    "Assignment",
    "GroupPlan",
    "GroupSpec",
    "Part",
    "Piece",
    "RowSharding",
    "band",
    "band_pieces",
    "pieces_of_block",
    "Plan",
    "StackLayout",
    "assign_blocks",
    "block_cost",
    "block_state_elements",
    "group_stacks",
]
