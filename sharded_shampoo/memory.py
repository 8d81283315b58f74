"""What an optimizer keeps between steps, on this rank: ``ShardedShampoo.memory_report()``.

Counted once per storage (views of one buffer are one buffer), parameters and gradients
excluded, the way a user would count AdamW's 8 bytes per parameter:

- ``state``, per kind: the blocks' state this rank owns (factors, roots or eigenvectors,
  corrected eigenvalues, grafting, first moment, momentum, failure counters, refreshes in
  flight with ``refresh_delay``), from the stacks.
- ``buffers``, per name: what the step keeps allocated between steps (each distributor's
  ``buffers()``: gradient and weight stacks, exchange buffers), the index tensors cached for
  ``symmetric_packing`` (shared by every optimizer of the process on that device, counted in
  full), the rounding patterns of moving averages kept in bfloat16 (likewise), and everything
  else the optimizer's objects hold (``bookkeeping``: row indices, status words, checkpoint
  records, step counters), found by walking them.

Temporaries a step allocates and frees (an unpacked factor, a decomposition's workspace) are
not kept between steps and are not counted here.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from .algorithm.packing import index_bytes
from .algorithm.rounding import pattern_bytes
from .state.stacks import PENDING
from .topology import is_dtensor

__all__ = ["MemoryReport", "memory_report"]

# State names (``state.stacks``) by kind; a name is matched by its part before ``_<dim>``.
_KINDS = {
    "factor": "factors",
    "root": "roots",
    "eigenvectors": "eigenvectors",
    "corrected_eigenvalues": "corrected eigenvalues",
    "graft_v": "grafting",
    "filtered_grad": "first moment",
    "momentum": "momentum",
    "root_failures": "failure counters",
}


def _kind(key: str) -> str:
    if key.startswith(PENDING):  # ``refresh_delay``
        return "refreshes in flight"
    key = key.removesuffix("_scale")  # a quantized matrix's scales count with its codes
    base = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].isdigit() else key
    return _KINDS.get(base, key)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes this rank keeps between steps, by kind (see the module docstring)."""

    state: dict[str, int]
    buffers: dict[str, int]
    params: int  # elements of the parameters this rank holds (its shards)

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def buffer_bytes(self) -> int:
        return sum(self.buffers.values())

    @property
    def total(self) -> int:
        return self.state_bytes + self.buffer_bytes

    def per_param(self, what: str = "total") -> float:
        """Bytes per parameter element this rank holds: of ``total``, ``state`` or
        ``buffers``."""
        value = {"total": self.total, "state": self.state_bytes, "buffers": self.buffer_bytes}
        return value[what] / max(self.params, 1)

    def __str__(self) -> str:
        mib = 2**20
        lines = [
            f"optimizer memory on this rank: {self.total / mib:.1f} MiB, "
            f"{self.per_param():.1f} B per parameter ({self.params} elements)"
        ]
        for title, part in (("state", self.state), ("buffers", self.buffers)):
            for name, n in part.items():
                lines.append(
                    f"  {title:8s} {name:24s} {n / mib:10.2f} MiB "
                    f"{n / max(self.params, 1):7.2f} B/param"
                )
        return "\n".join(lines)


def _storage(t: torch.Tensor) -> tuple[int, str, int]:
    s = t.untyped_storage()
    return s.data_ptr(), str(t.device), s.nbytes()


def _walk_tensors(roots: Iterable[object]) -> Iterable[torch.Tensor]:
    """Every tensor reachable from ``roots`` through containers, TensorDicts and this package's
    objects (not through other libraries' objects: a device mesh, a user's hook)."""
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (dict, list, tuple, set, frozenset)):
            todo.extend(obj.values() if isinstance(obj, dict) else obj)
            if isinstance(obj, dict):
                todo.extend(k for k in obj if isinstance(k, torch.Tensor))
        elif isinstance(obj, TensorDict):
            todo.extend(obj.values())
        elif type(obj).__module__.startswith("sharded_shampoo"):
            todo.extend(gc.get_referents(obj))


def memory_report(optimizer) -> MemoryReport:
    """``optimizer.memory_report()``: see the module docstring."""
    groups = optimizer.group_states
    counted: set[tuple[int, str]] = set()
    state: dict[str, int] = {}
    for g in groups:
        for stack in g.blocks.stacks:
            for key, t in stack.state.items():
                kind = _kind(key)
                state[kind] = state.get(kind, 0) + t.numel() * t.element_size()
        counted.update((ptr, dev) for ptr, dev, _ in map(_storage, g.pool.buffers.values()))
    buffers: dict[str, int] = {}
    for d in optimizer.distributors:
        for name, tensors in d.buffers().items():
            for t in tensors:
                ptr, dev, n = _storage(t)
                if (ptr, dev) not in counted:
                    counted.add((ptr, dev))
                    buffers[name] = buffers.get(name, 0) + n
    sizes = {
        m
        for g in groups
        if g.plan.spec.opts.symmetric_packing
        for s in g.blocks.stacks
        for m in s.block_shape
    }
    if sizes:
        buffers["packing indices"] = sum(index_bytes(m) for m in sizes)
    rounded = {
        s.layout.row_numel
        for g in groups
        for s in g.blocks.stacks
        for key in ("graft_v", "filtered_grad")
        if key in s.state.keys() and s.state[key].dtype == torch.bfloat16
    }
    if rounded:
        buffers["rounding patterns"] = sum(pattern_bytes(n) for n in rounded)
    excluded = {
        (ptr, dev)
        for group in optimizer.param_groups
        for p in group["params"]
        for x in (p, p.grad)
        if x is not None
        for ptr, dev, _ in [_storage(_local(x))]
    }
    rest = 0
    for t in _walk_tensors([optimizer.__dict__, optimizer.state]):
        t = _local(t)
        if t.device.type == "meta":
            continue
        ptr, dev, n = _storage(t)
        if (ptr, dev) in counted or (ptr, dev) in excluded:
            continue
        counted.add((ptr, dev))
        rest += n
    buffers["bookkeeping"] = rest
    params = sum(_local(p).numel() for group in optimizer.param_groups for p in group["params"])
    return MemoryReport(state, buffers, params)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t
