"""sharded_shampoo: the Distributed Shampoo optimizer, built on DTensor, FSDP2 and DCP."""

from .agreement import PlanMismatchError
from .optimizer import NonFiniteGradientWarning, RootFailureWarning, ShardedShampoo

__all__ = ["ShardedShampoo", "NonFiniteGradientWarning", "PlanMismatchError", "RootFailureWarning"]
__version__ = "0.1.0"
