"""What ``ShardedShampoo.state_dict()`` returns and ``load_state_dict()`` takes (``StateDicts``).

A rank's state dict holds, per parameter, ``blocks.<id>.<name>`` for the blocks it owns (keys
name blocks of the full parameter, so they do not depend on who owns them), ``blocking`` (its
blocking record, ``record``) and ``step``. When sharded, which blocks the caller must say:
this rank's (``sharded_state``, or torch's ``get_optimizer_state_dict``: what DCP's sharded
save wants), or every block (``full_state``, a consolidation, torch's
``get_optimizer_state_dict(full_state_dict=True)``, Accelerate's ``save_state``:
``consolidation``); unsaid, ``state_dict()`` refuses rather than return this rank's blocks
for one rank to save as if they were all. Loading checks
everything first (``loading``), compares outcomes across ranks, then copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..agreement import on_device, raise_anywhere
from ..diagnostics import ParamNamer
from ..options import GroupOptions
from ..placement import Plan
from ..topology import Topology
from .checksums import add_checksums
from .consolidation import (
    UNSAID,
    FullRequest,
    StateDictRequestError,
    full_state_request,
    gather_blocks,
)
from .groups import GroupState
from .loading import check_state_dict

__all__ = ["StateDicts", "pickled"]


class StateDicts:
    """The state-dict side of one optimizer: ``base`` is torch's ``Optimizer.state_dict`` of it
    (the live state, indexed by parameter); the other arguments are its live structures."""

    def __init__(
        self,
        base: Callable[[], dict[str, Any]],
        param_groups: list[dict[str, Any]],
        live: dict[torch.Tensor, dict[str, Any]],
        groups: list[GroupState],
        plan: Plan,
        topology: Topology,
        name: ParamNamer,
    ) -> None:
        self._base = base
        self._param_groups = param_groups
        self._live = live
        self._groups = groups
        self._plan = plan
        self._topology = topology
        self._name = name
        self._views = False  # inside saving(): views of the live state, no copies
        self._consolidated: dict[str, Any] | None = None  # see consolidate
        self._request: FullRequest | None = None  # see requesting

    # ------------------------------------------------------------ what state_dict() returns

    def state_dict(self) -> dict[str, Any]:
        if self._consolidated is not None:  # consolidate() ran: once, as gathered
            sd, self._consolidated = self._consolidated, None
            return sd
        request = self._request
        sharded = self._plan.world_size > 1
        if request is None:
            request = full_state_request(sharded=sharded)
        if request is None and sharded:
            # This rank's blocks alone, saved by one rank, would be a checkpoint that cannot
            # be resumed: refused until the caller says which blocks it wants.
            raise StateDictRequestError(UNSAID.format(ranks=self._plan.world_size))
        if request is not None and request.full_state_dict:
            # Every block, on every rank, or on rank 0 only with cpu_offload (as torch keeps it).
            rank0 = not dist.is_initialized() or dist.get_rank() == 0
            return self.gathered(keep=not request.cpu_offload or rank0, offload=request.cpu_offload)
        return self.gathered(keep=None)

    def consolidate(self, to: int) -> None:
        """Gathers every block onto global rank ``to``, whose next ``state_dict()`` returns them
        (a collective when sharded)."""
        if not self._topology.distributed or self._plan.world_size == 1:
            self._consolidated = None
            return
        keep = dist.get_rank() == to
        sd = self.gathered(keep=keep)
        self._consolidated = sd if keep else None

    def forget_consolidated(self) -> None:
        """A consolidated dict is stale once the state changes."""
        self._consolidated = None

    def gathered(self, keep: bool | None, offload: bool = False) -> dict[str, Any]:
        """This rank's blocks; with ``keep`` set, the other ranks' blocks are gathered too
        (every rank takes part) and kept where ``keep`` is True, on the CPU with ``offload``
        (``consolidation.gather_blocks``)."""
        sd = self._base()
        if offload and keep:  # this rank's blocks on the CPU too
            copy = lambda v: v.to("cpu", copy=True)  # noqa: E731
        elif not self._views:
            copy = torch.Tensor.clone
        else:
            copy = None
        # New dicts in any case: torch's state_dict hands out the live per-parameter dicts,
        # which the blocks of other ranks and the checksums must not be added to.
        sd["state"] = {
            k: {
                n: copy(v) if copy is not None and isinstance(v, torch.Tensor) else v
                for n, v in s.items()
            }
            for k, s in sd["state"].items()
        }
        if keep is not None and self._plan.world_size > 1:
            others = gather_blocks(
                self._plan,
                self._topology.rank,
                [g.pool for g in self._groups],
                self._topology.mesh().get_group(),
                keep,
                offload,
            )
            index = 0
            for gi, group in enumerate(self._param_groups):
                for pi in range(len(group["params"])):
                    sd["state"][index].update(others.get((gi, pi), {}))
                    index += 1
        for state in sd["state"].values():
            add_checksums(state)
        return sd

    @contextlib.contextmanager
    def requesting(self, request: FullRequest):
        previous, self._request = self._request, request
        try:
            yield
        finally:
            self._request = previous

    @contextlib.contextmanager
    def views(self):
        self._views = True
        try:
            yield
        finally:
            self._views = False

    # ------------------------------------------------------------ load_state_dict()

    def load(self, state_dict: dict[str, Any], agree: bool = True) -> None:
        """Checks ``state_dict`` in full (every rank compares outcomes when sharded, with
        ``agree``), then copies it into the live state and takes its options."""
        try:
            new_options, copies = check_state_dict(
                state_dict, self._param_groups, self._groups, self._live, self._name
            )
            error = None
        except ValueError as e:
            error = e
        if self._topology.distributed and agree:
            with on_device(self._topology.device):
                raise_anywhere(self._topology.agreement_group, error)
        elif error is not None:
            raise error
        for dst, src in copies:
            if dst.data_ptr() != src.data_ptr():  # DCP may have loaded into the live views
                dst.copy_(src)
        for group, options, state in zip(
            self._param_groups, new_options, self._groups, strict=True
        ):
            group.update(options)
            group.update(GroupOptions.from_group(group).stored())
            state.step.fill_(group["step"])


def pickled(opt) -> tuple:
    """``ShardedShampoo.__reduce_ex__``: an optimizer rebuilt over the (copied) parameters with
    the same groups, options and state. torch's ``Optimizer.__getstate__`` keeps only defaults,
    state and param groups, which would leave a copy without its plan."""
    from ..options import OPTION_DEFAULTS

    if opt.plan.world_size > 1 or opt.plan.mesh is not None:
        raise TypeError(
            "ShardedShampoo cannot be pickled or deep-copied while it shards its state over "
            "a process group: each rank holds a part of the state, and a copy made on one "
            "rank would need every rank. Save and load it with state_dict() / "
            "sharded_shampoo.checkpoint instead."
        )
    groups = []
    for g in opt.param_groups:
        params = list(g["params"])
        if g.get("param_names"):
            params = list(zip(g["param_names"], params, strict=True))
        groups.append({"params": params, **{k: g[k] for k in OPTION_DEFAULTS}})
    defaults = {k: opt.defaults[k] for k in OPTION_DEFAULTS}
    return _rebuild, (type(opt), groups, defaults, opt.communication_dtype, opt.state_dict())


def _rebuild(cls, groups, defaults, communication_dtype, state):
    """Unpickles a ShardedShampoo (``cls``: the class pickled, see ``pickled``). It was not
    sharded, and the copy is not either, whatever process group exists where it is
    unpickled."""
    opt = cls(groups, **defaults, communication_dtype=communication_dtype, num_trainers_per_group=1)
    opt.load_state_dict(state)
    return opt
