from .cost import block_cost, block_state_elements
from .layout import Part, StackLayout, group_stacks
from .plan import GroupPlan, GroupSpec, Plan
from .planner import Assignment, assign_blocks
from .sharding import Piece, Sharding, pieces_of_block, shard_pieces
from .world import WorldMesh

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
