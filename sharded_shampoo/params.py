"""What the optimizer is given: param lists and groups read once, and parameters checked before
any state exists (dtype, device, DTensor sharding)."""

from __future__ import annotations

from typing import Any

import torch

from .placement.sharding import Sharding
from .topology import Topology, is_dtensor

__all__ = ["PARAM_DTYPES", "check_distinct", "materialize", "materialize_group", "shardings_of"]

# The math runs in the parameter dtype promoted to float32: float8 and integer or complex
# parameters have no such promotion.
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def materialize(params: Any) -> list:
    """``params`` as a list, each group's ``params`` a list too: an iterator (``filter(...)``,
    ``model.parameters()`` inside a dict) is read once here, before anything else iterates it."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of Tensors or dicts, but got " + torch.typename(params)
        )
    return [materialize_group(g) if isinstance(g, dict) else g for g in params]


def materialize_group(group: dict[str, Any]) -> dict[str, Any]:
    ps = group.get("params")
    if ps is None or isinstance(ps, (torch.Tensor, set, list)):
        return group  # torch.optim checks these (a set is refused: its order is arbitrary)
    return {**group, "params": list(ps)}


def check_distinct(group: dict[str, Any]) -> None:
    """A tensor twice in a group would be updated twice per step."""
    ps = group.get("params")
    if not isinstance(ps, list):
        return
    seen: dict[int, int] = {}
    for i, item in enumerate(ps):
        t = item[1] if isinstance(item, tuple) else item
        if id(t) in seen:
            what = f"{item[0]!r}" if isinstance(item, tuple) else f"params[{i}]"
            raise ValueError(
                f"parameter {what} {tuple(t.shape)} appears more than once in the group "
                f"(also as params[{seen[id(t)]}]); it would be updated twice per step"
            )
        seen[id(t)] = i


def shardings_of(
    params: list[torch.Tensor], names: list[str], topology: Topology
) -> tuple[Sharding | None, ...]:
    """Checks a group's parameters (dtype, device) and reads how each is split over the world
    mesh (None: held whole); raises ValueError naming the first that does not fit."""
    out = []
    for p, name in zip(params, names, strict=True):
        if p.dtype not in PARAM_DTYPES:
            raise ValueError(
                f"{name}: ShardedShampoo supports float16, bfloat16, float32 and float64 "
                f"parameters, got {p.dtype}"
            )
        out.append(topology.sharding(p, name) if is_dtensor(p) else None)
    devices = {p.device for p in params}
    if devices - {topology.device}:
        raise ValueError(
            f"all parameters must be on one device: this group has {sorted(map(str, devices))}, "
            f"the optimizer's are on {topology.device}"
        )
    return tuple(out)
