"""ShardedShampoo: the ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

import torch.distributed as dist

from .communication import DirectionExchange, RowShardedExchange, check_agreement
from .functional import stack_step
from .options import DEFAULTS, STRUCTURAL, GroupOptions, check_dtype_range, check_group_keys
from .parallelism import (
    check_fsdp_param,
    device_type,
    fsdp_layout,
    is_dtensor,
    iter_tensors,
    shard_layout,
    shard_mesh,
    weight_decay_place,
)
from .blocking import make_blocking
from .placement import GroupSpec, Plan, RowSharding
from .state import BlockStack, GroupBlocks, StatePool, pool_lengths
from .state.record import encode_layout, layout_difference

__all__ = ["ShardedShampoo", "NonFiniteGradientWarning", "RootFailureWarning"]


class NonFiniteGradientWarning(UserWarning):
    """A block's gradient had a NaN or Inf, or was too large for its squared norm to be
    represented; the block was skipped for that step. ``step`` is the param group's step."""

    step: int | None = None


class RootFailureWarning(UserWarning):
    """A block's inverse roots could not be computed; it kept its previous roots. ``step`` is
    the param group's step."""

    step: int | None = None


def _warn(warning: Warning, step: int | None = None) -> None:
    """Warns at the user's call to ``step()``, past this package's and torch's wrappers.

    The step is an attribute, not part of the text: Python's warning registry keeps one entry
    per distinct text, so a text with the step in it would grow the registry by one entry per
    step while a block keeps failing.
    """
    warning.step = step
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level, frame = level + 1, frame.f_back
    warnings.warn(warning, stacklevel=level)


_INTERNAL_DIRS = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def _materialize(params: Any) -> list:
    """``params`` as a list, each group's ``params`` a list too: an iterator (``filter(...)``,
    ``model.parameters()`` inside a dict) is read once here, before anything else iterates it."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of Tensors or dicts, but got " + torch.typename(params)
        )
    return [_materialize_group(g) if isinstance(g, dict) else g for g in params]


def _materialize_group(group: dict[str, Any]) -> dict[str, Any]:
    ps = group.get("params")
    if ps is None or isinstance(ps, (torch.Tensor, set, list)):
        return group  # torch.optim checks these (a set is refused: its order is arbitrary)
    return {**group, "params": list(ps)}


def _count_blocks(params: list, defaults: dict[str, Any]) -> int:
    """Blocks of all parameters given at construction (what the automatic sharding width
    depends on). Options not yet validated count as the defaults; validation follows."""
    total = 0
    for item in params:
        options = {**defaults, **item} if isinstance(item, dict) else defaults
        md, merge = options["max_preconditioner_dim"], options["merge_dims"]
        if isinstance(md, bool) or not isinstance(md, int) or md < 1:
            md = defaults["max_preconditioner_dim"]
        for t in iter_tensors([item]):
            total += make_blocking(tuple(t.shape), md, bool(merge)).num_blocks
    return total


def _check_distinct(group: dict[str, Any]) -> None:
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


@dataclass
class _StackWork:
    """One stack's part in one step."""

    group: int
    stack_index: int
    opts: GroupOptions
    stack: BlockStack
    grad: torch.Tensor
    param: torch.Tensor | None
    rows: torch.Tensor | None  # bool mask of the rows to update; None: all
    finite: torch.Tensor | None  # per row: gradient finite (set once gradients are in)
    active: list[bool]  # per parameter of the group: has a gradient
    direction: torch.Tensor | None = None


class ShardedShampoo(torch.optim.Optimizer):
    r"""Distributed Shampoo (Shi et al., 2023, arXiv 2309.06497).

    Each parameter is reshaped (``merge_dims``) and cut into blocks of at most
    ``max_preconditioner_dim`` per dim; each block of order k has one Kronecker factor per dim.
    For a gradient ``G`` of a block, with step ``t`` of the param group:

    .. code-block:: text

        G   <- G + wd W                                    (weight decay, if not decoupled)
        F_i <- beta2 F_i + (1 - beta2) G_(i) G_(i)^T       (beta2 = 1: F_i <- F_i + G_(i) G_(i)^T)
        v   <- grafting second moment of G                 (adam, rmsprop: EMA; adagrad: sum)
        every precondition_frequency steps from start_preconditioning_step:
            P_i <- (F_i / c + epsilon I)^(-e),  c = 1 - beta2^t (bias correction), e = 1 / (2k)
        M   <- beta1 M + (1 - beta1) G,  divided by 1 - beta1^t (bias correction)
        D   <- grafting direction of M                     (t < start_preconditioning_step)
        D   <- M x_1 P_1 ... x_k P_k, rescaled to the grafting direction's norm   (otherwise)
        D   <- D + wd W                                    (decoupled weight decay)
        B   <- momentum B + (1 - dampening) D;  D <- D + momentum B (nesterov) or B
        W   <- W - lr D

    ``t`` counts the steps in which at least one parameter of the group had a gradient. A
    parameter without a gradient is skipped and its state untouched. A block whose gradient
    holds a NaN or Inf is skipped the same way (its part of the parameter is not changed) and a
    :class:`NonFiniteGradientWarning` names it. If the roots of a block cannot be computed, even
    in float64, the block keeps its previous roots with a :class:`RootFailureWarning`; after
    ``max_consecutive_root_failures`` failures in a row the step raises RuntimeError before any
    parameter is changed.

    Blocks of the same dtype and shape are stacked and computed together (see
    :mod:`sharded_shampoo.state.stacks`).

    Data parallelism: with a process group of more than one rank (or ``mesh``, a 1-D
    DeviceMesh), every block gets one owner rank (:mod:`sharded_shampoo.placement`); only the
    owner keeps its state and computes its direction, and one AllGather per step (in
    ``communication_dtype``) gives every rank all directions (:mod:`sharded_shampoo.communication`).
    ``num_trainers_per_group=k`` shards within groups of k consecutive ranks instead, replicated
    across groups. Gradients must already be averaged (DDP) and identical on every rank; the
    result is the single-process one, whatever the world size. Every option may differ per param group; options that
    shape the state (block size, merging, factor dtype, grafting type, whether beta1 and momentum
    are on) cannot change once the optimizer is built.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULTS["lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        epsilon: float = DEFAULTS["epsilon"],
        weight_decay: float = DEFAULTS["weight_decay"],
        decoupled_weight_decay: bool = DEFAULTS["decoupled_weight_decay"],
        momentum: float = DEFAULTS["momentum"],
        dampening: float = DEFAULTS["dampening"],
        nesterov: bool = DEFAULTS["nesterov"],
        max_preconditioner_dim: int = DEFAULTS["max_preconditioner_dim"],
        merge_dims: bool = DEFAULTS["merge_dims"],
        precondition_frequency: int = DEFAULTS["precondition_frequency"],
        start_preconditioning_step: int | None = DEFAULTS["start_preconditioning_step"],
        grafting: str | None = DEFAULTS["grafting"],
        grafting_beta2: float = DEFAULTS["grafting_beta2"],
        grafting_epsilon: float = DEFAULTS["grafting_epsilon"],
        use_bias_correction: bool = DEFAULTS["use_bias_correction"],
        inverse_exponent_override: dict[int, float] | None = DEFAULTS["inverse_exponent_override"],
        factor_dtype: torch.dtype = DEFAULTS["factor_dtype"],
        max_consecutive_root_failures: int = DEFAULTS["max_consecutive_root_failures"],
        *,
        mesh: Any = None,
        communication_dtype: torch.dtype = torch.float32,
        num_trainers_per_group: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            epsilon=epsilon,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            max_preconditioner_dim=max_preconditioner_dim,
            merge_dims=merge_dims,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            grafting=grafting,
            grafting_beta2=grafting_beta2,
            grafting_epsilon=grafting_epsilon,
            use_bias_correction=use_bias_correction,
            inverse_exponent_override=inverse_exponent_override,
            factor_dtype=factor_dtype,
            max_consecutive_root_failures=max_consecutive_root_failures,
        )
        # Fail on bad defaults even when every group overrides them.
        GroupOptions.from_group(defaults)
        if communication_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(
                "communication_dtype must be one of torch.float32, torch.bfloat16, "
                f"torch.float16, torch.float64, got {communication_dtype!r}"
            )
        params = _materialize(params)
        self._fsdp = fsdp_layout(params)
        if self._fsdp is not None and (mesh is not None or num_trainers_per_group is not None):
            raise ValueError(
                "with FSDP2/HSDP (DTensor) parameters the optimizer shards over the whole "
                "world: mesh and num_trainers_per_group must be left at None"
            )
        # The mesh is created only once the ranks agreed on the settings (_after_plan_change).
        blocks = None if self._fsdp is not None else _count_blocks(params, defaults)
        shards, self._rank = shard_layout(mesh, num_trainers_per_group, blocks)
        self._mesh = mesh if shards > 1 else None
        self._agreement_group = mesh.get_group() if self._mesh is not None else None
        self._distributed = shards > 1 or self._fsdp is not None
        # Ranks check that they built the same optimizer whenever there are several, sharded
        # or not (a replicated optimizer whose ranks disagree diverges silently).
        self._check_agreement = self._distributed or (
            mesh is None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        self._device_type = device_type(params)
        self._settings = [
            ("setting", "the number of ranks blocks are sharded over", shards),
            ("setting", "communication_dtype", str(communication_dtype)),
            ("setting", "the FSDP2/HSDP mesh",
             None if self._fsdp is None else tuple(self._fsdp.mesh.mesh.shape)),
        ]
        # Built before torch.distributed was initialized (the optimizer is then not sharded):
        # worth a warning at the first step if a process group exists by then.
        self._check_late_process_group = (
            mesh is None and num_trainers_per_group is None and self._fsdp is None
            and not (dist.is_available() and dist.is_initialized())
        )
        self._plan = Plan(shards, self._fsdp.holders if self._fsdp is not None else None)
        self._row_exchange: RowShardedExchange | None = None
        self._communication_dtype = communication_dtype
        self._exchange: DirectionExchange | None = None
        self._blocks: list[GroupBlocks] = []
        self._pools: list[StatePool] = []
        self._step_tensors: list[torch.Tensor] = []
        self._structure: list[tuple] = []
        self._buffers: dict[tuple[int, int, str], torch.Tensor] = {}
        self._views_for_saving = False
        self._built = False
        super().__init__(params, defaults)
        self._built = True
        self._after_plan_change()

    # ---------------------------------------------------------------- param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; with a process group, every rank must add the same one.

        Nothing changes if the group is refused (bad options, a parameter twice, ranks that
        disagree): the optimizer stays as it was.
        """
        gi = len(self.param_groups)
        param_group = _materialize_group(param_group)
        try:
            check_group_keys(param_group)
            _check_distinct(param_group)
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        super().add_param_group(param_group)
        try:
            self._place_group(gi)
            if self._built:
                self._after_plan_change()
        except BaseException:
            self._discard_group(gi)
            raise

    def _place_group(self, gi: int) -> None:
        """Validates group ``gi``, places its blocks and creates its state."""
        group = self.param_groups[gi]
        params = group["params"]
        try:
            opts = GroupOptions.from_group(group)
            devices = {p.device for p in params}
            for p in params:
                if not p.is_floating_point() or p.is_complex():
                    raise ValueError(
                        f"ShardedShampoo supports real floating-point parameters, got {p.dtype}"
                    )
                if is_dtensor(p):
                    check_fsdp_param(p, self._fsdp)
            if len(devices) > 1:
                raise ValueError(f"all parameters of a group must be on one device, got {devices}")
            check_dtype_range(opts, (p.dtype for p in params))
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        group["step"] = 0
        shardings = tuple(
            RowSharding(self._fsdp.num_shards) if is_dtensor(p) else None for p in params
        )
        spec = GroupSpec(
            tuple(tuple(p.shape) for p in params), tuple(p.dtype for p in params), opts, shardings
        )
        plan = self._plan.add_group(spec)
        device = params[0].device if params else torch.device("cpu")
        # Each rank allocates exactly its own blocks' state: nothing is padded.
        pool = StatePool(pool_lengths(plan.layout(self._rank), opts), device)
        blocks = GroupBlocks(plan.blockings, plan.layout(self._rank), opts, pool)
        self._pools.append(pool)
        self._blocks.append(blocks)
        self._structure.append(opts.structure())
        # Besides the views of the blocks this rank owns, every parameter's state holds its
        # layout record and the group's step (one tensor shared by the group), on every rank:
        # checkpoints then record both whoever owned what, and a regrouped load finds the step.
        step = torch.zeros((), dtype=torch.int64)
        self._step_tensors.append(step)
        for i, p in enumerate(params):
            self.state[p] = {
                **blocks.block_views(i),
                "layout": encode_layout(blocks.blockings[i], opts),
                "step": step,
            }

    def _discard_group(self, gi: int) -> None:
        """Undoes ``add_param_group`` of group ``gi`` (the last one), whatever part of it ran."""
        group = self.param_groups.pop(gi)
        for p in group["params"]:
            self.state.pop(p, None)
        if len(self._plan.groups) > gi:
            self._plan.pop_group()
        for per_group in (self._pools, self._blocks, self._structure, self._step_tensors):
            del per_group[gi:]
        for key in [k for k in self._buffers if k[0] >= gi]:
            del self._buffers[key]
        if self._built:
            self._size_exchanges()

    def _after_plan_change(self) -> None:
        """Checks that every rank built the same optimizer (one collective), creates the mesh
        on first use, and sizes the exchanges."""
        if self._check_agreement:
            items: list[tuple[str, str, Any]] = list(self._settings)
            for gi, g in enumerate(self._plan.groups):
                items.append(("group", f"param group {gi}", g.spec.opts.fields_text()))
                for pi, fingerprint in enumerate(g.spec.param_fingerprints()):
                    name = self._param_name(gi, pi)
                    items.append(("param", name, f"{fingerprint}:{name}"))
            check_agreement(self._agreement_group, items, self._plan.owners_fingerprint())
        if self._plan.world_size > 1 and self._mesh is None:
            self._mesh = shard_mesh(self._plan.world_size, self._device_type)
        self._size_exchanges()

    def _size_exchanges(self) -> None:
        """(Re)builds the exchanges for the current plan.

        FSDP2 on a single rank still goes through the row exchange (with nothing to send): its
        parameters are DTensors, which only that path reads and writes.
        """
        device = self._device()
        self._exchange = None
        if self._mesh is not None:
            self._exchange = DirectionExchange(
                self._plan, self._rank, self._mesh, self._communication_dtype, device
            )
            if self._exchange.status_index == 0:  # no replicated parameter anywhere
                self._exchange = None
        if self._fsdp is not None:
            grad_dtype = torch.float32
            for g in self._plan.groups:
                for pi, dtype in enumerate(g.spec.dtypes):
                    if g.spec.sharding(pi) is not None:
                        grad_dtype = torch.promote_types(grad_dtype, dtype)
            # Whether weight rows travel with gradient rows (decoupled weight decay fed into
            # momentum needs them at the owner). Sized from what cannot change after
            # construction, so that every rank sends the same amount even in a step in which
            # ranks disagree on the options (which the status words then report).
            self._row_weights = any(
                g.spec.opts.momentum > 0
                for g in self._plan.groups
                if any(g.spec.sharding(pi) is not None for pi in range(len(g.spec.shapes)))
            )
            mesh = self._fsdp.mesh
            self._row_exchange = RowShardedExchange(
                self._plan, self._rank, self._fsdp.coords,
                mesh.get_group(mesh.ndim - 1), mesh.get_group(0) if mesh.ndim == 2 else None,
                self._communication_dtype, grad_dtype, device, self._row_weights,
            )

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _options(self, gi: int) -> GroupOptions:
        group = self.param_groups[gi]
        try:
            opts = GroupOptions.from_group(group)
            check_dtype_range(opts, self._plan.groups[gi].spec.dtypes)
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        changed = self._structure_changes(gi, opts)
        if changed:
            raise ValueError(
                f"param group {gi}: {changed} cannot change after the optimizer is "
                "built (it decides the blocks and their state); build a new optimizer instead"
            )
        return opts

    def _structure_changes(self, gi: int, opts: GroupOptions) -> str:
        """Names of the state-shaping options in which ``opts`` differs from group ``gi``."""
        pairs = zip(STRUCTURAL, self._structure[gi], opts.structure())
        return ", ".join(name for name, old, new in pairs if old != new)

    def _param_name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        shape = tuple(group["params"][pi].shape)
        if names:
            return f"{names[pi]} {shape}"
        return f"param_groups[{gi}]['params'][{pi}] {shape}"

    def _block_name(self, gi: int, pi: int, bid: int) -> str:
        blocking = self._blocks[gi].blockings[pi]
        where = ", ".join(f"{s.start}:{s.stop}" for s in blocking.block_slices(bid))
        return (
            f"block {bid} [{where}] of parameter {self._param_name(gi, pi)} "
            f"(merged shape {blocking.merged})"
        )

    # ---------------------------------------------------------------- step

    def _buffer(self, key: tuple[int, int, str], like: tuple[int, ...], dtype, device):
        # Gradients and weights are gathered into persistent buffers: a fresh allocation of this
        # size each step costs page faults on CPU and allocator churn on GPU.
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(like, dtype=dtype, device=device)
        return buf

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if self._check_late_process_group:
            self._check_late_process_group = False
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                _warn(UserWarning(
                    "ShardedShampoo was built before torch.distributed was initialized, so it "
                    "does not shard: every rank keeps the state of every block and computes "
                    "it. Build the optimizer after init_process_group (under the Hugging Face "
                    "Trainer: after TrainingArguments)."
                ))
        # With a process group every rank takes this step's collectives, whatever happens on
        # it (bad options, no gradients): a rank that raised or returned alone would leave the
        # others waiting. What went wrong rides in the status words and every rank raises.
        collective = self._exchange is not None or self._row_exchange is not None
        invalid: ValueError | None = None
        try:
            options = {gi: self._options(gi) for gi in range(len(self.param_groups))}
        except ValueError as e:
            if not collective:
                raise
            invalid, options = e, {}

        # Phase 1: gather the owned blocks' gradients, flag non-finite ones.
        work: list[_StackWork] = []
        stepping: dict[int, list[bool]] = {}
        for gi, opts in options.items():
            group = self.param_groups[gi]
            blocks = self._blocks[gi]
            params = group["params"]
            grads = [p.grad for p in params]
            for pi, g in enumerate(grads):
                if g is not None and g.is_sparse:
                    raise RuntimeError(
                        f"ShardedShampoo does not support sparse gradients "
                        f"({self._param_name(gi, pi)})"
                    )
            active = [g is not None for g in grads]
            if not any(active):
                continue
            stepping[gi] = active
            for si, stack in enumerate(blocks.stacks):
                rows = stack.layout.row_mask(active)
                if rows is not None and not rows.any():
                    continue
                shape = (stack.num_rows, *stack.block_shape)
                device = stack.state.device
                g = self._buffer((gi, si, "grad"), shape, stack.dtype, device)
                stack_opts = opts
                if stack.layout.row_sharded and weight_decay_place(opts) in (
                    "holder-grad", "holder-step"
                ):
                    # The rows' holders apply weight decay (see _weight_decay_place).
                    stack_opts = dataclasses.replace(opts, weight_decay=0.0)
                w = None
                if stack_opts.weight_decay > 0:
                    w = self._buffer((gi, si, "param"), shape, stack.dtype, device)
                if not stack.layout.row_sharded:  # row-sharded blocks arrive by all_to_all
                    stack.layout.gather(grads, blocks.blockings, g)
                    if w is not None:
                        stack.layout.gather(list(params), blocks.blockings, w)
                work.append(_StackWork(gi, si, stack_opts, stack, g, w, rows, None, active))
        if not stepping and not collective:
            return loss
        if self._row_exchange is not None:
            self._collect_row_sharded(stepping, options)
        for w in work:
            w.finite = torch.isfinite(torch.linalg.vector_norm(w.grad.flatten(1), dim=1))

        # One host sync per step, to learn whether any block must be skipped.
        if work:
            all_finite = torch.stack(
                [(w.finite if w.rows is None else w.finite | ~w.rows.to(w.finite.device)).all()
                 for w in work]
            ).all()
            if not bool(all_finite):
                for w in work:
                    self._skip_nonfinite(w)

        # Phase 2: the math, stack by stack. Parameters are not touched until it all succeeded.
        error = None
        for w in work:
            t = self.param_groups[w.group]["step"] + 1
            if w.rows is None:
                w.direction, ok = stack_step(w.stack.state, w.grad, w.param, w.opts, t)
                ok_rows = None if ok is None else torch.arange(w.stack.num_rows)
            else:
                idx = w.rows.nonzero().flatten().to(w.grad.device)
                w.direction = torch.zeros_like(w.grad)
                if idx.numel() == 0:
                    continue
                sub = w.stack.state[idx]
                d_sub, ok = stack_step(
                    sub, w.grad[idx], None if w.param is None else w.param[idx], w.opts, t
                )
                w.stack.state[idx] = sub
                w.direction[idx] = d_sub
                ok_rows = idx.cpu()
            if ok is not None:
                error = self._check_roots(w.group, w.opts, w.stack, ok, ok_rows) or error

        # Phase 3: share the directions and apply them. An error anywhere, or ranks stepping
        # with different options, is learnt by every rank from the first collective's status
        # words, and all raise before any update.
        gathered = None
        failed = error is not None or invalid is not None
        digest = self._step_digest(stepping, options) if collective else 0
        if self._exchange is not None:
            for w in work:
                if not w.stack.layout.row_sharded:
                    self._exchange.slot(w.group, w.stack_index).copy_(w.direction)
            gathered, failed_ranks, disagreeing = self._exchange.exchange(failed, digest)
            self._raise_if_failed(failed_ranks, disagreeing, error, invalid)
        if self._row_exchange is not None:
            by_stack = {(w.group, w.stack_index): w for w in work}
            anyone_failed, disagreed = self._row_exchange.distribute(
                lambda gi, pi, bid, piece: self._direction_rows(by_stack, stepping, gi, pi, bid, piece),
                lambda gi, pi, bid, piece, rows: self._apply_rows(
                    stepping, options, gi, pi, bid, piece, rows
                ),
                failed,
                digest,
            )
            self._raise_if_failed(anyone_failed, disagreed, error, invalid)
        if error is not None:  # one process: no collective carried it
            raise RuntimeError(error)
        if gathered is not None:
            for r in range(len(self._exchange.segments)):
                for gi, layout, rows in self._exchange.rows_of(gathered, r):
                    if gi in stepping:
                        group = self.param_groups[gi]
                        layout.scatter_add_(
                            group["params"], stepping[gi], self._blocks[gi].blockings, rows,
                            -group["lr"],
                        )
        else:  # every block is computed here
            for w in work:
                if not w.stack.layout.row_sharded:
                    w.stack.layout.scatter_add_(
                        self.param_groups[w.group]["params"], w.active,
                        self._blocks[w.group].blockings, w.direction, -w.opts.lr,
                    )
        for gi in stepping:
            self.param_groups[gi]["step"] += 1
            self._step_tensors[gi].fill_(self.param_groups[gi]["step"])
        return loss

    def _step_digest(self, stepping: dict[int, list[bool]], options: dict[int, GroupOptions]) -> int:
        """32 bits of everything that must be equal on every rank in this step: each stepping
        group's options and step, and which of its parameters have a gradient."""
        text = repr([
            (gi, options[gi].fields_text(), self.param_groups[gi]["step"], tuple(active))
            for gi, active in sorted(stepping.items())
        ])
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")

    def _raise_if_failed(
        self,
        failed: list[int] | bool,
        disagreeing: list[int] | bool,
        error: str | None,
        invalid: ValueError | None,
    ) -> None:
        """Raises on every rank once a collective's status words reported a problem: this
        rank's own error first, then a disagreement between ranks, then another rank's error."""
        if invalid is not None:
            raise invalid
        if disagreeing:
            who = (
                f"rank(s) {disagreeing} differ from rank 0"
                if isinstance(disagreeing, list)
                else "some ranks differ from others"
            )
            raise RuntimeError(
                f"ranks stepped with different options or gradients: {who} in the options "
                "of a param group (lr, betas, weight_decay, ...), its step, or which "
                "parameters have a gradient. Schedulers must give every rank the same values "
                "(ReduceLROnPlateau fed each rank's own loss does not). Parameters were not "
                "updated in this step."
            )
        if error is not None:
            raise RuntimeError(error)
        if failed:
            who = f"rank(s) {failed}" if isinstance(failed, list) else "another rank"
            raise RuntimeError(
                f"{who} raised an error in this step (a block whose inverse roots failed "
                "several times in a row, or invalid options; its error names the cause); "
                "parameters were not updated in this step"
            )

    def _band(self, gi: int, pi: int, t: torch.Tensor, bid: int, piece) -> torch.Tensor:
        """The rows ``piece`` of block ``bid`` in this rank's shard of ``t`` (a DTensor)."""
        blocking = self._blocks[gi].blockings[pi]
        local = t.to_local()
        band = local.view(-1, *blocking.merged[1:]) if local.numel() else local.reshape(0, *blocking.merged[1:])
        cols = blocking.block_slices(bid)[1:]
        return band[(slice(piece.band_lo, piece.band_hi), *cols)]

    def _collect_row_sharded(
        self, stepping: dict[int, list[bool]], options: dict[int, GroupOptions]
    ) -> None:
        """Gradient (and weight) rows of row-sharded parameters to their blocks' owners."""

        def fetch(gi, pi, bid, piece, weights):
            if gi not in stepping or not stepping[gi][pi]:
                return None
            p = self.param_groups[gi]["params"][pi]
            opts = options[gi]
            if weights:
                if weight_decay_place(opts) != "owner":
                    return None
                return self._band(gi, pi, p, bid, piece)
            rows = self._band(gi, pi, p.grad, bid, piece)
            if weight_decay_place(opts) == "holder-grad":  # L2: G + wd W, elementwise
                rows = rows + opts.weight_decay * self._band(gi, pi, p, bid, piece)
            return rows

        def store(gi, pi, bid, piece, rows, weights):
            if gi not in stepping or not stepping[gi][pi]:
                return
            si, r = self._blocks[gi].where[(pi, bid)]
            buf = self._buffers.get((gi, si, "param" if weights else "grad"))
            if buf is not None:
                target = buf[r, piece.block_lo : piece.block_hi]
                target.copy_(rows.view(target.shape))

        self._row_exchange.collect(fetch, store)

    def _direction_rows(self, work_by_stack, stepping, gi, pi, bid, piece):
        """(rows of the block's direction, whether the block was updated), or None."""
        if gi not in stepping or not stepping[gi][pi]:
            return None
        si, r = self._blocks[gi].where[(pi, bid)]
        w = work_by_stack.get((gi, si))
        if w is None or w.direction is None:
            return None
        updated = w.rows is None or bool(w.rows[r])  # rows is a CPU mask: no device sync
        return w.direction[r, piece.block_lo : piece.block_hi], updated

    def _apply_rows(self, stepping, options, gi, pi, bid, piece, rows) -> None:
        if gi not in stepping or not stepping[gi][pi]:
            return
        group = self.param_groups[gi]
        dst = self._band(gi, pi, group["params"][pi], bid, piece)
        d = rows.reshape(dst.shape).to(dst.dtype)
        opts = options[gi]
        if weight_decay_place(opts) == "holder-step":  # W <- W - lr (D + wd W)
            d = d + opts.weight_decay * dst
        dst.add_(d, alpha=-group["lr"])

    def _skip_nonfinite(self, w: "_StackWork") -> None:
        """Warns about, and drops from ``w.rows``, the blocks whose gradient is not finite."""
        bad = ~w.finite.cpu()
        if w.rows is not None:
            bad &= w.rows
        for r in bad.nonzero().flatten().tolist():
            pi, bid = w.stack.row_owner[r]
            g = w.grad[r]
            if bool(torch.isfinite(g).all()):
                # The squared norm overflowed: the block's factor would become infinite.
                what = (
                    f"too large a gradient (largest |g| {float(g.abs().max()):.3g}; its squared "
                    f"norm overflows {g.dtype})"
                )
            else:
                what = "a non-finite gradient (NaN or Inf)"
            _warn(
                NonFiniteGradientWarning(
                    f"{what} in {self._block_name(w.group, pi, bid)}: the block is skipped in "
                    "this step"
                ),
                self.param_groups[w.group]["step"] + 1,
            )
        if bad.any():
            base = torch.ones(w.stack.num_rows, dtype=torch.bool) if w.rows is None else w.rows
            w.rows = base & ~bad

    def _check_roots(
        self, gi: int, opts: GroupOptions, stack: BlockStack, ok: torch.Tensor, rows: torch.Tensor
    ) -> str | None:
        """Warns about blocks whose roots failed; returns the error to raise, if any."""
        if bool(ok.all()):
            return None
        failures = stack.state["root_failures"]
        error = None
        for j in (~ok).nonzero().flatten().tolist():
            r = int(rows[j])
            pi, bid = stack.row_owner[r]
            count = int(failures[r])
            name = self._block_name(gi, pi, bid)
            if count >= opts.max_consecutive_root_failures:
                error = error or (
                    f"the inverse roots of {name} failed {count} times in a row (also in "
                    "float64); its factors are likely non-finite or badly scaled, or epsilon "
                    "is too small for the roots to fit the parameter dtype. Parameters were "
                    "not updated in this step."
                )
                continue
            _warn(
                RootFailureWarning(
                    f"inverse roots of {name} could not be computed (failure {count} of "
                    f"{opts.max_consecutive_root_failures} allowed); keeping its previous roots"
                ),
                self.param_groups[gi]["step"] + 1,
            )
        return error

    # ---------------------------------------------------------------- state

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """``pickle`` and ``copy.deepcopy``: an optimizer rebuilt over the (copied) parameters
        with the same groups, options and state. torch's ``Optimizer.__getstate__`` keeps only
        defaults, state and param groups, which would leave a copy without its plan."""
        if self._distributed:
            raise TypeError(
                "ShardedShampoo cannot be pickled or deep-copied while it shards its state over "
                "a process group: each rank holds a part of the state, and a copy made on one "
                "rank would need every rank. Save and load it with state_dict() / "
                "sharded_shampoo.checkpoint instead."
            )
        groups = []
        for g in self.param_groups:
            params = list(g["params"])
            if g.get("param_names"):
                params = list(zip(g["param_names"], params))
            groups.append({"params": params, **{k: g[k] for k in DEFAULTS}})
        defaults = {k: self.defaults[k] for k in DEFAULTS}
        return _rebuild, (groups, defaults, self._communication_dtype, self.state_dict())

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this process (padding included)."""
        return sum(pool.nbytes() for pool in self._pools)

    def owned_blocks(self) -> int:
        """Number of blocks whose state this process keeps and whose direction it computes."""
        return sum(s.num_rows for blocks in self._blocks for s in blocks.stacks)

    @property
    def plan(self) -> Plan:
        """The block placement (read-only)."""
        return self._plan

    @property
    def direction_exchange(self) -> DirectionExchange | None:
        return self._exchange

    def bytes_sent_per_step(self) -> int:
        """Bytes this rank sends in one step's collectives (AllGather and all_to_alls), padding
        included."""
        total = self._exchange.bytes_sent_per_step if self._exchange is not None else 0
        if self._row_exchange is not None:
            total += self._row_exchange.bytes_sent_per_step()
        return total

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (see ``load_state_dict`` for its keys), as a copy.

        A copy, not views of the live state: ``dcp.load`` reads a checkpoint into the state
        dict it is given before ``set_optimizer_state_dict`` validates it, and into live views
        it would change the optimizer before a refused or failed load. Inside ``saving()`` the
        tensors are views instead, which costs no copy; a save only reads them.
        """
        sd = super().state_dict()
        if not self._views_for_saving:
            sd["state"] = {
                k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                for k, s in sd["state"].items()
            }
        return sd

    @contextlib.contextmanager
    def saving(self):
        """Within it, ``state_dict()`` returns views of the live state instead of copies, for a
        save (``get_optimizer_state_dict`` then ``dcp.save``), which only reads them."""
        self._views_for_saving = True
        try:
            yield self
        finally:
            self._views_for_saving = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads state saved by ``state_dict`` (at any world size, in any mode).

        Per parameter the state holds ``blocks.<id>.<name>`` for the blocks this rank owns
        (views of the live state: ``state_dict`` copies nothing), ``layout`` (what the blocks
        depend on, see ``state.record``) and ``step``.

        Everything is checked before anything changes: the number of groups and parameters, each
        parameter's layout record, the options that shape the state, and the name and shape of
        every state tensor. A mismatch raises ValueError naming the first offending parameter;
        every rank holds every parameter's record, so every rank raises.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        new_options, copies = [], []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi}: the state dict has {len(saved['params'])} parameters, "
                    f"this optimizer has {len(group['params'])}"
                )
            options = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            current = GroupOptions.from_group(group)
            steps = set()
            for pi, (p, pid) in enumerate(zip(group["params"], saved["params"])):
                theirs = saved_state.get(pid, {})
                name = self._param_name(gi, pi)
                if "layout" not in theirs or "step" not in theirs:
                    raise ValueError(
                        f"the state dict has no layout record for {name}: it was not saved by "
                        "ShardedShampoo (or by an older version)"
                    )
                diff = layout_difference(
                    theirs["layout"], encode_layout(self._blocks[gi].blockings[pi], current)
                )
                if diff is not None:
                    raise ValueError(
                        f"the state of {name} does not fit this optimizer: {diff}. Load it into "
                        "an optimizer built with the same model and options."
                    )
                steps.add(int(theirs["step"]))
            # Each parameter's own step decides: a flattened state dict gives a group the
            # options (and step) of its first parameter only, and a regrouped load none.
            if len(steps) > 1:
                raise ValueError(
                    f"param group {gi}: its parameters were saved at different steps "
                    f"{sorted(steps)} (they were in different param groups then); load the "
                    "state into an optimizer with the same grouping"
                )
            if steps:
                options["step"] = steps.pop()
            candidate = {**group, **options}
            try:
                opts = GroupOptions.from_group(candidate)
            except (KeyError, ValueError) as e:
                raise ValueError(f"param group {gi} of the state dict: {e}") from None
            changed = self._structure_changes(gi, opts)
            if changed:
                raise ValueError(
                    f"param group {gi}: the state dict was saved with a different "
                    f"{changed}; its state does not fit this optimizer's blocks"
                )
            new_options.append(options)
            for pi, (p, pid) in enumerate(zip(group["params"], saved["params"])):
                mine = {k: v for k, v in self.state[p].items() if k not in ("layout", "step")}
                theirs = {k: v for k, v in saved_state[pid].items() if k not in ("layout", "step")}
                name = self._param_name(gi, pi)
                if set(mine) != set(theirs):
                    missing = sorted(set(mine) - set(theirs))[:3]
                    extra = sorted(set(theirs) - set(mine))[:3]
                    raise ValueError(
                        f"state of {name} does not fit this optimizer's blocks "
                        f"(missing {missing}, unexpected {extra})"
                    )
                for key, t in mine.items():
                    src = theirs[key]
                    if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(t.shape):
                        got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src)
                        raise ValueError(
                            f"state {key!r} of {name} has shape {got}, expected {tuple(t.shape)}"
                        )
                    copies.append((t, src))
        for dst, src in copies:
            if dst.data_ptr() != src.data_ptr():  # DCP may have loaded into the live views
                dst.copy_(src)
        for gi, (group, options) in enumerate(zip(self.param_groups, new_options)):
            group.update(options)
            self._step_tensors[gi].fill_(group["step"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _rebuild(groups, defaults, communication_dtype, state) -> ShardedShampoo:
    """Unpickles a ShardedShampoo (see ``ShardedShampoo.__reduce_ex__``). It was not sharded,
    and the copy is not either, whatever process group exists where it is unpickled."""
    opt = ShardedShampoo(
        groups, **defaults, communication_dtype=communication_dtype, num_trainers_per_group=1
    )
    opt.load_state_dict(state)
    return opt
