"""ShardedShampoo: the ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

import torch.distributed as dist

from .blocking import make_blocking
from .communication import (
    PlanMismatchError,
    RankFailedError,
    check_agreement,
    on_device,
    raise_anywhere,
)
from .diagnostics import (
    NonFiniteGradientWarning,
    RootFailureWarning,
    block_name,
    check_roots,
    warn,
    warn_skipped,
)
from .distributors import (
    Distributor,
    LocalDistributor,
    ReplicatedDistributor,
    ShardedDistributor,
    StackWork,
    Status,
    Step,
)
from .functional import due_rows, stack_step
from .options import (
    DEFAULTS,
    STRUCTURAL,
    GroupOptions,
    check_dtype_range,
    check_group_keys,
    factor_dtype_name,
    parse_factor_dtype,
)
from .parallelism import (
    check_backend,
    dtensor_mesh,
    dtensor_sharding,
    is_dtensor,
    iter_tensors,
    param_device,
    shard_width,
    shard_mesh,
)
from .placement import GroupSpec, Plan
from .state import GroupBlocks, Rows, StatePool, pool_lengths
from .state.consolidation import FullRequest, full_state_request, gather_blocks
from .state.loading import check_state_dict
from .state.record import blocking_record

__all__ = ["ShardedShampoo", "NonFiniteGradientWarning", "RootFailureWarning"]

# The math runs in the parameter dtype promoted to float32: float8 and integer or complex
# parameters have no such promotion.
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _peers(mesh: Any) -> Any:
    """The group whose ranks check that they built the same optimizer (None: the default
    group), or False when there is none: ``mesh``'s ranks when it has several, or every rank
    of an initialized process group of more than one. Derived from the arguments alone, so that
    a rank whose construction failed early still finds the group the others check in."""
    if mesh is not None:
        size = getattr(mesh, "size", None)
        if callable(size) and getattr(mesh, "ndim", None) == 1 and size() > 1:
            return mesh.get_group()
        return False
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return None
    return False


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


class ShardedShampoo(torch.optim.Optimizer):
    r"""Distributed Shampoo (Shi et al., 2023, arXiv 2309.06497).

    Each parameter is reshaped (``merge_dims``) and cut into blocks of at most
    ``max_preconditioner_dim`` per dim; each block of order k has one Kronecker factor per dim.
    For a gradient ``G`` of a block, with step ``t`` of the param group:

    .. code-block:: text

        G   <- G + wd W                                    (weight decay, if not decoupled)
        F_i <- beta2 F_i + (1 - beta2) G_(i) G_(i)^T       (beta2 = 1: F_i <- F_i + G_(i) G_(i)^T)
        v   <- grafting second moment of G                 (adam, rmsprop: EMA; adagrad: sum)
        at start_preconditioning_step, then every precondition_frequency steps
        (stagger_roots: then at the steps t with t % precondition_frequency == the block's phase):
            P_i <- (F_i / c + epsilon I)^(-e),  c = 1 - beta2^t (bias correction), e = 1 / (2k)
        M   <- beta1 M + (1 - beta1) G,  divided by 1 - beta1^t (bias correction)
        D   <- grafting direction of M                     (t < start_preconditioning_step)
        D   <- M x_1 P_1 ... x_k P_k, rescaled to the grafting direction's norm   (otherwise)
        D   <- D + wd W                                    (decoupled weight decay)
        B   <- momentum B + (1 - dampening) D;  D <- D + momentum B (nesterov) or B
        W   <- W - lr D

    With ``preconditioner="eigenvalue_corrected"`` (SOAP: Adam in the factors' eigenbasis) the
    roots are replaced by each factor's eigenvectors ``Q_i`` (``eigenbasis="eigh"``: an
    eigendecomposition; ``"qr"``: up to ``qr_iterations`` QR steps warm-started from the
    previous ``Q_i``), refreshed on the same schedule, in the reference implementation's
    conventions or the SOAP paper's (``eigenbasis_convention``: see
    :mod:`sharded_shampoo.eigenbasis`), and grafting is off unless set:

    .. code-block:: text

        V   <- beta2 V + (1 - beta2) (G x_1 Q_1^T ... x_k Q_k^T)^2   (beta2 = 1: a sum)
        D   <- ((M x_1 Q_1^T ...) / ((V / c)^(1/2) + epsilon)) x_1 Q_1 ... x_k Q_k

    then weight decay, momentum and the update as above; without grafting this direction is
    used from step 1 (with ``Q_i = I`` until the first refresh).

    ``t`` counts the steps in which at least one parameter of the group had a gradient. A
    parameter without a gradient is skipped and its state untouched. A block whose gradient
    holds a NaN or Inf (or is too large for its squared norm) is skipped the same way (its part
    of the parameter is not changed; decided on the device, not by reading it back) and a
    :class:`NonFiniteGradientWarning` names it. If the roots of a block cannot be computed, even
    in float64, the block keeps its previous roots with a :class:`RootFailureWarning`; after
    ``max_consecutive_root_failures`` failures in a row the step raises RuntimeError before any
    parameter is changed.

    Blocks of the same dtype and shape are stacked and computed together (see
    :mod:`sharded_shampoo.state.stacks`). Every parameter must be on one device; everything the
    optimizer keeps or creates per step is on it (host bookkeeping aside: the step count,
    blocking records), and a step that refreshes no roots reads from it once (its status).

    Data parallelism: with a process group of more than one rank (or ``mesh``, a 1-D
    DeviceMesh), every block gets one owner rank (:mod:`sharded_shampoo.placement`); only the
    owner keeps its state and computes its direction. Plain (DDP) parameters share directions
    by one AllGather per step (in ``communication_dtype``); DTensor parameters (FSDP2, HSDP,
    tensor parallel and their combinations: ``Shard``, ``_StridedShard`` and ``Replicate``
    placements on meshes of any dims) send each piece of a gradient from a rank holding it to
    the block's owner and the direction back to every rank holding it, by ``all_to_all``
    (:mod:`sharded_shampoo.distributors`). Without ``num_trainers_per_group`` plain parameters are sharded over as many
    ranks as leave each about 8 blocks; ``num_trainers_per_group=k`` shards within groups of k
    consecutive ranks, replicated across groups. DDP gradients must already be averaged and
    identical on every rank. The result is the single-process one, whatever the world size.

    Every option may differ per param group; options that shape the state (block size,
    merging, factor dtype, grafting type, whether beta1 and momentum are on) cannot change once
    the optimizer is built.
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
        stagger_roots: bool = DEFAULTS["stagger_roots"],
        preconditioner: str = DEFAULTS["preconditioner"],
        eigenbasis: str = DEFAULTS["eigenbasis"],
        qr_iterations: int = DEFAULTS["qr_iterations"],
        eigenbasis_convention: str = DEFAULTS["eigenbasis_convention"],
        eigenbasis_tolerance: float = DEFAULTS["eigenbasis_tolerance"],
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
            stagger_roots=stagger_roots,
            preconditioner=preconditioner,
            eigenbasis=eigenbasis,
            qr_iterations=qr_iterations,
            eigenbasis_convention=eigenbasis_convention,
            eigenbasis_tolerance=eigenbasis_tolerance,
        )
        try:
            # Fail on bad defaults even when every group overrides them.
            GroupOptions.from_group(defaults)
            defaults["factor_dtype"] = factor_dtype_name(parse_factor_dtype(factor_dtype))
            if communication_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                raise ValueError(
                    "communication_dtype must be one of torch.float32, torch.bfloat16, "
                    f"torch.float16, torch.float64, got {communication_dtype!r}"
                )
            params = _materialize(params)
            self._world_mesh = dtensor_mesh(params)
            if self._world_mesh is not None and (
                mesh is not None or num_trainers_per_group is not None
            ):
                raise ValueError(
                    "with DTensor parameters the optimizer shards over the whole "
                    "world: mesh and num_trainers_per_group must be left at None"
                )
            # The mesh is created only once the ranks agreed on the settings (_after_plan_change).
            blocks = None if self._world_mesh is not None else _count_blocks(params, defaults)
            shards, self._rank = shard_width(mesh, num_trainers_per_group, blocks)
            self._mesh = mesh if shards > 1 else None
            self._distributed = shards > 1 or self._world_mesh is not None
            # Ranks check that they built the same optimizer whenever there are several, sharded
            # or not (a replicated optimizer whose ranks disagree diverges silently).
            peers = _peers(mesh)
            self._check_agreement = peers is not False
            self._agreement_group = peers if peers is not False else None
            self._param_device = param_device(params)
            if self._distributed:
                check_backend(self._param_device)
            self._settings = [
                ("setting", "the number of ranks blocks are sharded over", shards),
                ("setting", "communication_dtype", str(communication_dtype)),
                ("setting", "the DTensor parameters' world mesh",
                 None if self._world_mesh is None else self._world_mesh.shape),
            ]
            # Built before torch.distributed was initialized (the optimizer is then not sharded):
            # worth a warning at the first step if a process group exists by then.
            self._check_late_process_group = (
                mesh is None and num_trainers_per_group is None and self._world_mesh is None
                and not (dist.is_available() and dist.is_initialized())
            )
            self._plan = Plan(shards, self._world_mesh)
            self._communication_dtype = communication_dtype
            self._distributors: list[Distributor] = []
            self._blocks: list[GroupBlocks] = []
            self._pools: list[StatePool] = []
            self._step_tensors: list[torch.Tensor] = []
            self._structure: list[tuple] = []
            self._views_for_saving = False
            self._consolidated: dict[str, Any] | None = None  # see consolidate_state_dict
            self._request: FullRequest | None = None  # see full_state, sharded_state
            self._built = False
            # Object collectives (the agreement) on this rank's accelerator, not cuda:0.
            with on_device(self._param_device):
                super().__init__(params, defaults)
                self._built = True
                self._after_plan_change()
        except (PlanMismatchError, RankFailedError):
            raise  # raised on every rank already
        except ValueError as e:
            # Raised here alone (an option only this rank got wrong): the other ranks are in
            # the agreement's collective, which this rank joins with its error.
            group = _peers(mesh)
            if group is not False:
                with on_device(getattr(self, "_param_device", None)):
                    check_agreement(group, [], "", error=e)
            raise

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
            with on_device(self._param_device):
                try:
                    self._place_group(gi)
                except ValueError as e:
                    if self._built and self._check_agreement:  # the others are in the agreement
                        check_agreement(self._agreement_group, [], "", error=e)
                    raise
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
            shardings = []
            for pi, p in enumerate(params):
                if p.dtype not in PARAM_DTYPES:
                    raise ValueError(
                        f"{self._param_name(gi, pi)}: ShardedShampoo supports float16, bfloat16, "
                        f"float32 and float64 parameters, got {p.dtype}"
                    )
                shardings.append(
                    dtensor_sharding(p, self._world_mesh, self._param_name(gi, pi))
                    if is_dtensor(p) else None
                )
            if devices - {self._param_device}:
                raise ValueError(
                    f"all parameters must be on one device: this group has {sorted(map(str, devices))}, "
                    f"the optimizer's are on {self._param_device}"
                )
            check_dtype_range(opts, (p.dtype for p in params))
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        group["step"] = 0
        # By name: torch's state-dict utilities do not traverse a torch.dtype.
        group["factor_dtype"] = factor_dtype_name(opts.factor_dtype)
        group["grafting"] = opts.grafting  # "default" resolved for this preconditioner
        spec = GroupSpec(
            tuple(tuple(p.shape) for p in params), tuple(p.dtype for p in params), opts,
            tuple(shardings),
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
        # blocking record and the group's step (one tensor shared by the group), on every rank:
        # checkpoints then record both whoever owned what, and a regrouped load finds the step.
        step = torch.zeros((), dtype=torch.int64, device="cpu")  # host metadata, as torch keeps it
        self._step_tensors.append(step)
        for i, p in enumerate(params):
            self.state[p] = {
                **blocks.block_views(i),
                "blocking": blocking_record(
                    blocks.blockings[i], opts, None if plan.phases is None else plan.phases[i]
                ),
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
        if self._built:
            self._build_distributors()

    def _after_plan_change(self) -> None:
        """Checks that every rank built the same optimizer (one collective), creates the mesh
        on first use, and builds the distributors."""
        if self._check_agreement:
            items: list[tuple[str, str, Any]] = list(self._settings)
            for gi, g in enumerate(self._plan.groups):
                items.append(("group", f"param group {gi}", g.spec.opts.fields_text()))
                for pi, fingerprint in enumerate(g.spec.param_fingerprints()):
                    name = self._param_name(gi, pi)
                    items.append(("param", name, f"{fingerprint}:{name}"))
            check_agreement(self._agreement_group, items, self._plan.owners_fingerprint())
        if self._plan.world_size > 1 and self._mesh is None:
            self._mesh = shard_mesh(self._plan.world_size, self._param_device.type)
        self._build_distributors()

    def _build_distributors(self) -> None:
        """One distributor per way the parameters are held (see ``distributors``).

        FSDP2 on a single rank still goes through the DTensor one (with nothing to send):
        its parameters are DTensors, which only it reads and writes.
        """
        device, dtype = self._param_device, self._communication_dtype
        self._distributors = []
        if self._mesh is None:
            self._distributors.append(LocalDistributor(self._blocks))
        else:
            replicated = ReplicatedDistributor(
                self._blocks, self._plan, self._rank, self._mesh, dtype, device
            )
            if replicated.status_index > 0:  # some rank has blocks of plain parameters
                self._distributors.append(replicated)
        if self._world_mesh is not None:
            self._distributors.append(
                ShardedDistributor(self._blocks, self._plan, self._rank, dtype, device)
            )

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
        return block_name(self._blocks[gi].blockings[pi], self._param_name(gi, pi), bid)

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._warn_late_process_group()
        self._consolidated = None  # a consolidated state dict is stale once the state changes
        step, invalid = self._begin_step()
        if step is None:
            return loss
        work = [w for d in self._distributors for w in d.collect(step)]
        self._gate(work)
        error = self._compute(work)
        # Parameters are not touched until every rank learnt that every rank succeeded and
        # stepped alike: what went wrong rides the status words of each exchange.
        failed = error is not None or invalid is not None
        summaries = [d.exchange(step, failed) for d in self._distributors]
        statuses = self._read_outcome(work, summaries)
        self._raise_if_failed(statuses, error, invalid)
        for d in self._distributors:
            d.apply(step)
        for gi in step.active:
            self.param_groups[gi]["step"] += 1
            self._step_tensors[gi].fill_(self.param_groups[gi]["step"])
        return loss

    def _begin_step(self) -> tuple[Step | None, ValueError | None]:
        """This step's options and active parameters, validated; None when there is nothing to
        do and no collective to take.

        With collectives every rank takes this step's, whatever happens on it (bad options,
        no gradients): a rank that raised or returned alone would leave the others waiting.
        Its error is returned instead, rides the status words, and every rank raises.
        """
        collective = any(d.collective for d in self._distributors)
        options: dict[int, GroupOptions] = {}
        active: dict[int, list[bool]] = {}
        invalid = None
        try:
            for gi, group in enumerate(self.param_groups):
                opts = self._options(gi)
                grads = [p.grad for p in group["params"]]
                for pi, g in enumerate(grads):
                    if g is not None and g.is_sparse:
                        raise ValueError(
                            f"ShardedShampoo does not support sparse gradients "
                            f"({self._param_name(gi, pi)})"
                        )
                if any(g is not None for g in grads):
                    options[gi], active[gi] = opts, [g is not None for g in grads]
        except ValueError as e:
            if not collective:
                raise
            invalid, options, active = e, {}, {}
        if not active and not collective:
            return None, None
        digest = self._step_digest(active, options) if collective else 0
        return Step([g["params"] for g in self.param_groups], options, active, digest), invalid

    def _warn_late_process_group(self) -> None:
        if not self._check_late_process_group:
            return
        self._check_late_process_group = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warn(UserWarning(
                "ShardedShampoo was built before torch.distributed was initialized, so it "
                "does not shard: every rank keeps the state of every block and computes "
                "it. Build the optimizer after init_process_group (under the Hugging Face "
                "Trainer: after TrainingArguments)."
            ))

    def _gate(self, work: list[StackWork]) -> None:
        """Which rows of each stack step (``StackWork.keep``, on the device): those whose
        gradient's norm is finite (no NaN or Inf, and a square that does not overflow its
        dtype); rows of parameters without a gradient count as kept (they are not computed at
        all). Nothing is read back here."""
        for w in work:
            w.norms = torch.linalg.vector_norm(w.grad.flatten(1), dim=1)
            finite = torch.isfinite(w.norms)
            w.keep = finite if w.rows is None else finite | ~w.rows.mask

    def _compute(self, work: list[StackWork]) -> str | None:
        """The math, stack by stack; returns the error to raise (roots that kept failing).
        Reads nothing back from the device, except in steps that refresh roots."""
        error = None
        for w in work:
            t = self.param_groups[w.group]["step"] + 1
            stack, rows = w.stack, w.rows
            due = self._due(w, t)
            index = due.index if isinstance(due, Rows) else due
            if rows is None:
                w.direction, ok = stack_step(stack.state, w.grad, w.param, w.opts, t, w.keep, index)
            else:
                w.direction = torch.zeros_like(w.grad)
                sub = stack.state[rows.index]
                w.direction[rows.index], ok = stack_step(
                    sub, w.grad[rows.index], None if w.param is None else w.param[rows.index],
                    w.opts, t, w.keep[rows.index], index,
                )
                stack.state[rows.index] = sub
            if ok is not None:
                if isinstance(due, Rows):
                    named = due.host
                else:
                    named = torch.arange(stack.num_rows, device="cpu") if rows is None else rows.host
                error = check_roots(w.group, w.opts, stack, ok, named, self._block_name, t) or error
        return error

    @staticmethod
    def _due(w: StackWork, t: int) -> Rows | bool:
        """The rows of ``w`` (of its selected rows) whose roots are refreshed at step ``t``:
        True or False for all or none (``functional.due_rows``), or ``Rows``. Staggered
        roots' due rows are computed once per (active rows, phase)."""
        stack, rows, opts = w.stack, w.rows, w.opts
        phases = stack.layout.row_phases
        if phases is None or t <= opts.start_preconditioning_step:
            return due_rows(opts, t, phases)

        def make():
            due = due_rows(opts, t, phases if rows is None else phases[rows.host])
            if due is False:
                return False
            return Rows(due.to(stack.device), due if rows is None else rows.host[due])

        key = ("due", None if rows is None else rows.key, t % opts.precondition_frequency)
        return stack.cached(key, make)

    def _read_outcome(
        self, work: list[StackWork], summaries: list[torch.Tensor | None]
    ) -> list[Status]:
        """The step's one host read: whether this rank skipped a block, and what each
        exchange's status words said. Warnings about skipped blocks follow it."""
        parts = [s for s in summaries if s is not None]
        if work:
            parts.insert(0, torch.cat([w.keep for w in work]).logical_not().any().view(1))
        flags = torch.cat(parts).tolist() if parts else []
        if work and flags.pop(0):
            for w in work:
                warn_skipped(w, self._block_name, self.param_groups[w.group]["step"] + 1)
        statuses, at = [], 0
        for s, d in zip(summaries, self._distributors, strict=True):
            if s is None:
                statuses.append(d.status([]))
            else:
                statuses.append(d.status(flags[at : at + s.numel()]))
                at += s.numel()
        return statuses

    def _step_digest(self, active: dict[int, list[bool]], options: dict[int, GroupOptions]) -> int:
        """32 bits of everything that must be equal on every rank in this step: each stepping
        group's options and step, and which of its parameters have a gradient."""
        text = repr([
            (gi, options[gi].fields_text(), self.param_groups[gi]["step"], tuple(flags))
            for gi, flags in sorted(active.items())
        ])
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")

    def _raise_if_failed(
        self, statuses: list[Status], error: str | None, invalid: ValueError | None
    ) -> None:
        """Raises on every rank once a collective's status words reported a problem: this
        rank's own error first, then a disagreement between ranks, then another rank's error."""
        failed, disagreeing = (
            sorted({r for v in values if isinstance(v, list) for r in v})
            or any(v is True for v in values)
            for values in ([s.failed for s in statuses], [s.disagreeing for s in statuses])
        )
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
    def distributors(self) -> tuple[Distributor, ...]:
        """How this rank's blocks get their gradients and deliver their directions."""
        return tuple(self._distributors)

    def bytes_sent_per_step(self) -> int:
        """Bytes this rank sends to other ranks in one step's collectives (AllGather and
        all_to_alls)."""
        return sum(d.bytes_sent_per_step() for d in self._distributors)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (see ``load_state_dict`` for its keys), as a copy.

        When sharded, which blocks: this rank's (what DCP's sharded save wants), or every
        block inside ``full_state()`` (a collective) and when torch's
        ``get_optimizer_state_dict(..., StateDictOptions(full_state_dict=True))`` asks (found
        in its frames; if torch's state-dict code is there but its options cannot be read,
        this raises rather than guess: see ``state.consolidation``).

        A copy, not views of the live state: ``dcp.load`` reads a checkpoint into the state
        dict it is given before ``set_optimizer_state_dict`` validates it, and into live views
        it would change the optimizer before a refused or failed load. Inside ``saving()`` the
        tensors are views instead, which costs no copy; a save only reads them.
        """
        if self._consolidated is not None:  # consolidate_state_dict() ran: once, as gathered
            sd, self._consolidated = self._consolidated, None
            return sd
        request = self._request
        if request is None:
            request = full_state_request(sharded=self._plan.world_size > 1)
        if request is not None and request.full_state_dict:
            # torch's get_optimizer_state_dict(full_state_dict=True): every block, on every
            # rank, or on rank 0 only with cpu_offload (as torch keeps it).
            rank0 = not dist.is_initialized() or dist.get_rank() == 0
            return self._state_dict(
                keep=not request.cpu_offload or rank0, offload=request.cpu_offload
            )
        return self._state_dict(keep=None)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """torch's ``ZeroRedundancyOptimizer`` protocol, which Lightning follows under DDP:
        gathers every block onto global rank ``to``, whose next ``state_dict()`` returns them
        all (the others' is unchanged). When sharded it is a collective: every rank must call
        it."""
        if not self._distributed or self._plan.world_size == 1:
            self._consolidated = None
            return
        keep = dist.get_rank() == to
        sd = self._state_dict(keep=keep)
        self._consolidated = sd if keep else None

    def full_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every block of every parameter, on every rank: for a framework
        that saves one rank's ``state_dict()`` (the Hugging Face Trainer and Lightning under
        DDP). When sharded it is a collective: every rank must call it."""
        return self._state_dict(keep=True)

    def _state_dict(self, keep: bool | None, offload: bool = False) -> dict[str, Any]:
        """This rank's blocks; with ``keep`` set, the other ranks' blocks are gathered too
        (every rank takes part) and kept where ``keep`` is True, on the CPU with ``offload``
        (see ``state.consolidation.gather_blocks``)."""
        sd = super().state_dict()
        if offload and keep:  # this rank's blocks on the CPU too
            copy = lambda v: v.to("cpu", copy=True)  # noqa: E731
        elif not self._views_for_saving:
            copy = torch.Tensor.clone
        else:
            copy = None
        if copy is not None:
            sd["state"] = {
                k: {n: copy(v) if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                for k, s in sd["state"].items()
            }
        if keep is not None and self._plan.world_size > 1:
            others = gather_blocks(
                self._plan, self._rank, self._pools, self._mesh.get_group(), keep, offload
            )
            index = 0
            for gi, group in enumerate(self.param_groups):
                for pi in range(len(group["params"])):
                    sd["state"][index].update(others.get((gi, pi), {}))
                    index += 1
        return sd

    @contextlib.contextmanager
    def full_state(self, cpu_offload: bool = False):
        """Within it, ``state_dict()`` returns every block of every parameter: on every rank,
        or with ``cpu_offload`` on rank 0 only, on the CPU (torch's ``StateDictOptions``
        meaning). When sharded, each ``state_dict()`` call inside it is a collective: every
        rank makes it. For a framework that saves one rank's dict (see also
        ``checkpoint.full_optimizer_state_dict``)."""
        with self._requesting(FullRequest(cpu_offload=cpu_offload)):
            yield self

    @contextlib.contextmanager
    def sharded_state(self):
        """Within it, ``state_dict()`` returns this rank's blocks whoever calls it (DCP's
        sharded save: each block written once, by its owner)."""
        with self._requesting(FullRequest(full_state_dict=False)):
            yield self

    @contextlib.contextmanager
    def _requesting(self, request: FullRequest):
        previous, self._request = self._request, request
        try:
            yield
        finally:
            self._request = previous

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
        (see ``state_dict``), ``blocking`` (what the blocks depend on, see ``state.record``) and
        ``step``.

        Everything is checked before anything changes: the number of groups and parameters, each
        parameter's blocking record, the options that shape the state, and the name and shape of
        every state tensor. A mismatch raises ValueError naming the first offending parameter.
        When sharded, every rank must call it (as ``set_optimizer_state_dict`` and the
        frameworks' loaders do): the ranks compare outcomes in one collective, and if any rank
        refuses (a dict that lacks the blocks it owns: one rank's ``state_dict()`` saved alone),
        every rank raises, naming that rank's reason.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        try:
            new_options, copies = check_state_dict(self, state_dict)
            error = None
        except ValueError as e:
            error = e
        if self._distributed:
            with on_device(self._param_device):
                raise_anywhere(self._agreement_group, error)
        elif error is not None:
            raise error
        for dst, src in copies:
            if dst.data_ptr() != src.data_ptr():  # DCP may have loaded into the live views
                dst.copy_(src)
        for gi, (group, options) in enumerate(zip(self.param_groups, new_options)):
            group.update(options)
            group["factor_dtype"] = factor_dtype_name(parse_factor_dtype(group["factor_dtype"]))
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
