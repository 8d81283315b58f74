"""What an optimizer step does that would cost on an accelerator, observed on any device.

On the CPU a host read and a device mix cost nothing and raise nothing, so they are found by
what the code asks for instead:

- ``HostReads``: calls made from this package that read a tensor's value back to the host (on
  CUDA each waits for the device): ``item``/``bool``/``int``/``float``
  (``aten._local_scalar_dense``),
  ``tolist``, ``numpy``, ``cpu``/``to("cpu")``, and ops whose output size depends on the data
  (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``equal``).
- ``Creations``: tensors this package creates without naming a device (they land on the CPU
  whatever the parameters' device, the bug class that mixes devices), and ``.to(device)``
  copies (host-to-device on an accelerator).
- ``held_tensors``: every tensor the optimizer and its distributors hold, with where it is
  held, to compare with the parameters' device (host-side bookkeeping excepted by name).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import sharded_shampoo

PACKAGE = os.path.dirname(sharded_shampoo.__file__)
TORCH = os.path.dirname(torch.__file__)


def _package_caller() -> str | None:
    """``file:line`` of the innermost frame of this package that led here, if the first
    frame outside torch (and this module) is in it."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE):
            return f"{os.path.relpath(name, PACKAGE)}:{frame.f_lineno}"
        if not name.startswith(TORCH) and name != __file__:
            return None
        frame = frame.f_back
    return None


_DATA_DEPENDENT = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.equal",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
}
_TO_HOST = {"tolist", "numpy", "cpu"}


def _is_cpu(x) -> bool:
    return isinstance(x, (str, torch.device)) and torch.device(x).type == "cpu"


class _Dispatch(TorchDispatchMode):
    def __init__(self, reads: list) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if name in _DATA_DEPENDENT or bool_index:
            where = _package_caller()
            if where is not None:
                self.reads.append((name, where))
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    """Counts host reads made from this package while active: ``reads`` lists (what, where)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []
        self._dispatch = _Dispatch(self.reads)

    def __enter__(self):
        self._dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._dispatch.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name in _TO_HOST or (
            name == "to" and any(_is_cpu(a) for a in (*args[1:], kwargs.get("device")))
        )
        if to_host:
            where = _package_caller()
            if where is not None:
                self.reads.append((name, where))
        return func(*args, **kwargs)


# Factory functions: a tensor they create lands on the default device unless told otherwise.
_FACTORIES = {
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "eye",
    "linspace",
    "logspace",
    "rand",
    "randn",
    "randint",
    "randperm",
    "empty_strided",
    "scalar_tensor",
}


class Creations(TorchFunctionMode):
    """Records, from this package while active: ``unplaced`` (factory calls without a device)
    and ``copies`` (``.to(<device>)``/``.cuda()`` calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.unplaced: list[tuple[str, str]] = []
        self.copies: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _FACTORIES and "device" not in kwargs:
            where = _package_caller()
            if where is not None:
                self.unplaced.append((name, where))
        moves = name == "cuda" or (
            name == "to"
            and any(isinstance(a, (str, torch.device)) for a in (*args[1:], kwargs.get("device")))
        )
        if moves:
            where = _package_caller()
            if where is not None:
                self.copies.append((name, where))
        return func(*args, **kwargs)


# Held on the host by design (read there only): the group's step, the blocking records, the
# staggered phases, a row selection's host copy, the status words' pinned staging buffer.
# Refreshes in flight: which rows are busy until when, and which failed (read by the worker).
HOST_HELD = {"step", "blocking", "phases", "host", "_busy", "failed"}


def held_tensors(opt) -> list[tuple[str, torch.device]]:
    """(path, device) of every tensor reachable from the optimizer's state, pools,
    distributors and refreshes in flight, except the host-side bookkeeping named in
    ``HOST_HELD`` and what the plan (host-side planning data) and device meshes hold."""
    from torch.distributed.device_mesh import DeviceMesh

    from sharded_shampoo.placement import Plan

    out: list[tuple[str, torch.device]] = []
    seen: set[int] = set()

    def visit(x, path: str, depth: int) -> None:
        if id(x) in seen or depth > 12:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            out.append((path, x.device))
            return
        if isinstance(x, (Plan, DeviceMesh, torch.nn.Module, str, bytes, int, float)) or x is None:
            return
        if isinstance(x, dict):
            items = x.items()
        elif isinstance(x, (list, tuple, set)):
            items = enumerate(x)
        elif dataclasses.is_dataclass(x):
            items = ((f.name, getattr(x, f.name)) for f in dataclasses.fields(x))
        elif hasattr(x, "__dict__") and type(x).__module__.startswith(
            ("sharded_shampoo", "tensordict")
        ):
            items = vars(x).items()
        else:
            return
        for key, value in items:
            if key in HOST_HELD:
                continue
            visit(value, f"{path}.{key}", depth + 1)

    visit(dict(opt.state), "state", 0)
    visit([g.pool for g in opt.group_states], "pools", 0)
    visit(list(opt.distributors), "distributors", 0)
    visit(opt._refreshes, "refreshes", 0)
    return out
