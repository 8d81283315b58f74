"""sharded_shampoo: the Distributed Shampoo optimizer, built on DTensor, FSDP2 and DCP."""

from .agreement import PlanMismatchError, RankFailedError
from .optimizer import NonFiniteGradientWarning, RootFailureWarning, ShardedShampoo
from .param_groups import hidden_matrix_groups
from .state.consolidation import StateDictRequestError

__all__ = [
    "ShardedShampoo",
    "NonFiniteGradientWarning",
    "PlanMismatchError",
    "RankFailedError",
    "RootFailureWarning",
    "StateDictRequestError",
    "hidden_matrix_groups",
]
__version__ = "0.1.0"
