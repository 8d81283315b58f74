from .cost import block_cost, block_state_elements
from .layout import Part, StackLayout, group_stacks
from .plan import GroupPlan, GroupSpec, Plan
from .planner import Assignment, assign_blocks
from .sharding import Piece, Sharding, WorldMesh, pieces_of_block, shard_pieces

__all__ = [
    "Assignment",
    "GroupPlan",
    "GroupSpec",
    "Part",
    "Piece",
    "Plan",
    "Sharding",
    "StackLayout",
    "WorldMesh",
    "assign_blocks",
    "block_cost",
    "block_state_elements",
    "group_stacks",
    "pieces_of_block",
    "shard_pieces",
]
