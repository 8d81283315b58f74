"""torchtitan: ShardedShampoo selected by name from a job's optimizer config.

torchtitan (0.3) builds optimizers in ``OptimizersContainer``, which knows a fixed set of names
(Adam, AdamW, DistMuon). ``ShampooOptimizersContainer`` adds ``"ShardedShampoo"``; everything
else is torchtitan's own: param groups by FQN pattern (their ``param_names``, ``fused`` and
``foreach`` keys are accepted), its LR schedulers, gradient clipping on DTensor gradients, and
its checkpoint manager (DCP, sync or async), which saves the optimizer through torchtitan's
flat FQN-keyed state dict, each rank its own blocks. The optimizer's state exists from
construction and changes only inside ``step()``, as torchtitan's async staging needs.

In a job's config module::

    from sharded_shampoo.integrations.torchtitan import sharded_shampoo_config

    config = ...(optimizer=sharded_shampoo_config(lr=3e-4, precondition_frequency=50), ...)

Options of the whole optimizer (``communication_dtype``) go in ``factory_kwargs``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..optimizer import ShardedShampoo

__all__ = ["NAME", "ShampooOptimizersContainer", "sharded_shampoo_config"]

NAME = "ShardedShampoo"


class ShampooOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also builds ``"ShardedShampoo"`` param
    groups (one ShardedShampoo per model part, with all of them as its param groups)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        # "for-loop": torchtitan's "fused" default means nothing to ShardedShampoo (ignored).
        implementation: str = "for-loop"

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name == NAME:
            return ShardedShampoo
        return OptimizersContainer._resolve_optimizer_factory(name)

    # torchtitan's checkpointer saves and loads the container through DCP on every rank, each
    # its own part: each ShardedShampoo its own blocks (its plain state_dict() asks).
    def state_dict(self) -> dict[str, Any]:
        with self._sharded():
            return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self._sharded():
            super().load_state_dict(state_dict)

    @contextlib.contextmanager
    def _sharded(self):
        with contextlib.ExitStack() as stack:
            for optimizer in self.optimizers:
                if isinstance(optimizer, ShardedShampoo):
                    stack.enter_context(optimizer.sharded_state())
            yield


def sharded_shampoo_config(
    pattern: str = r".*", factory_kwargs: dict[str, Any] | None = None, **options: Any
) -> ShampooOptimizersContainer.Config:
    """A config with one ShardedShampoo param group for the parameters matching ``pattern``
    (its ``options``: ``lr``, ``betas``, ``precondition_frequency``, ...)."""
    return ShampooOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=pattern, optimizer_name=NAME, optimizer_kwargs=options)
        ],
        optimizer_factory_kwargs_by_name={NAME: dict(factory_kwargs or {})},
    )
