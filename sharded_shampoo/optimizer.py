"""ShardedShampoo: the ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch

from .agreement import (
    PlanMismatchError,
    RankFailedError,
    agreement_items,
    check_agreement,
    on_device,
)
from .diagnostics import (
    NonFiniteGradientWarning,
    RootFailureWarning,
    block_name,
    param_name,
)
from .distributors import Distributor, build_distributors
from .memory import MemoryReport, memory_report
from .options import (
    GroupOptions,
    check_dtype_range,
    check_group_keys,
    constructor_options,
    integer,
    optimizer_signature,
    options_doc,
)
from .params import check_distinct, materialize, materialize_group, shardings_of
from .placement import GroupSpec, Plan
from .refreshes import Refreshes
from .state.consolidation import FullRequest
from .state.dicts import StateDicts, pickled
from .state.groups import GroupState
from .status import failure_message, gather_failures, raise_if_failed, read_outcome
from .topology import Topology, peers_of
from .work import begin_step, compute, warn_skipped

__all__ = ["ShardedShampoo", "NonFiniteGradientWarning", "RootFailureWarning"]

COMMUNICATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


COMPILED_STEP = (
    "ShardedShampoo.step() cannot run under torch.compile: each step exchanges gradients and "
    "directions between ranks and reads one status word back to the host, so that a failure "
    "raises on every rank before any parameter changes; Dynamo would break the graph there and "
    "recompile the math for every stack shape. The math is batched per stack already. Call "
    "opt.step() outside the compiled function, and compile the model (torch.compile(model))."
)


def refuse_compiled_caller() -> None:
    """Raises when torch.compile's wrapper is among the callers: Dynamo, told to skip
    ``step``, runs it eagerly from inside compiled code (a graph break per call, and a compile
    of the rest of the step's callers each time)."""
    frame = sys._getframe(2)
    while frame is not None:
        if (
            frame.f_code.co_name == "compile_wrapper"
            and frame.f_globals.get("__name__") == "torch._dynamo.eval_frame"
        ):
            raise RuntimeError(COMPILED_STEP)
        frame = frame.f_back


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
    :mod:`sharded_shampoo.algorithm.eigenbasis`), and grafting is off unless set:

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
    (:mod:`sharded_shampoo.distributors`). Without ``num_trainers_per_group`` plain parameters
    are sharded over as many ranks as leave each about 8 blocks; ``num_trainers_per_group=k``
    shards within groups of k consecutive ranks, replicated across groups. DDP gradients must
    already be averaged and identical on every rank. The result is the single-process one,
    whatever the world size. Each exchange is split into ``exchange_buckets`` collectives over
    groups of stacks, issued asynchronously, so that one group's communication overlaps
    another's math (1: one collective each way).

    Every option may differ per param group; options that shape the state (block size,
    merging, factor dtype, grafting type, whether beta1 and momentum are on) cannot change once
    the optimizer is built. The options (:data:`sharded_shampoo.options.OPTIONS`):

    {options}
    """

    def __init__(
        self,
        params: Any,
        *args: Any,
        mesh: Any = None,
        communication_dtype: torch.dtype = torch.float32,
        num_trainers_per_group: int | None = None,
        exchange_buckets: int = 4,
        **options: Any,
    ) -> None:
        try:
            defaults = constructor_options(args, options)
            # Fail on bad defaults even when every group overrides them. "default" grafting,
            # qr_start and merge_dims stay unresolved here: each group resolves them for its
            # own preconditioner.
            stored = GroupOptions.from_group(defaults).stored()
            for name in ("grafting", "qr_start", "merge_dims", "start_preconditioning_step"):
                stored.pop(name)
            defaults.update(stored)
            if communication_dtype not in COMMUNICATION_DTYPES:
                raise ValueError(
                    "communication_dtype must be one of torch.float32, torch.bfloat16, "
                    f"torch.float16, torch.float64, got {communication_dtype!r}"
                )
            # Python's and NumPy's integers, as the group options.
            exchange_buckets = integer(1)("exchange_buckets", exchange_buckets)
            if num_trainers_per_group is not None:
                num_trainers_per_group = integer(1)(
                    "num_trainers_per_group", num_trainers_per_group
                )
            params = materialize(params)
            self._topology = Topology(
                params,
                mesh,
                num_trainers_per_group,
                defaults,
                communication_dtype,
                exchange_buckets,
            )
            self._plan = Plan(self._topology.shards, self._topology.world_mesh)
            self._communication_dtype = communication_dtype
            self._distributors: list[Distributor] = []
            self._refreshes = Refreshes(self._topology.device)
            self._groups: list[GroupState] = []
            self._built = False
            # Object collectives (the agreement) on this rank's accelerator, not cuda:0.
            with on_device(self._topology.device):
                super().__init__(params, defaults)
                # torch's Optimizer keeps these lists and dicts for the optimizer's life (only
                # its load_state_dict, overridden here, would replace them).
                self._dicts = StateDicts(
                    super().state_dict,
                    self.param_groups,
                    self.state,
                    self._groups,
                    self._plan,
                    self._topology,
                    self._param_name,
                )
                self._built = True
                self._after_plan_change()
        except (PlanMismatchError, RankFailedError):
            raise  # raised on every rank already
        except ValueError as e:
            # Raised here alone (an option only this rank got wrong): the other ranks are in
            # the agreement's collective, which this rank joins with its error.
            group = peers_of(mesh)
            if group is not False:
                topology = getattr(self, "_topology", None)
                with on_device(None if topology is None else topology.device):
                    check_agreement(group, [], "", error=e)
            raise

    # ---------------------------------------------------------------- param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; with a process group, every rank must add the same one.

        Nothing changes if the group is refused (bad options, a parameter twice, ranks that
        disagree): the optimizer stays as it was.
        """
        gi = len(self.param_groups)
        param_group = materialize_group(param_group)
        try:
            check_group_keys(param_group)
            check_distinct(param_group)
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        super().add_param_group(param_group)
        try:
            with on_device(self._topology.device):
                try:
                    self._place_group(gi)
                except ValueError as e:
                    if self._built and self._topology.checks_agreement:  # the others wait in it
                        check_agreement(self._topology.agreement_group, [], "", error=e)
                    raise
                if self._built:
                    self._after_plan_change()
        except BaseException:
            self._discard_group(gi)
            raise

    def _place_group(self, gi: int) -> None:
        """Checks group ``gi``, places its blocks and creates its state."""
        group = self.param_groups[gi]
        params = group["params"]
        try:
            opts = GroupOptions.from_group(group)
            names = [self._param_name(gi, pi) for pi in range(len(params))]
            shardings = shardings_of(params, names, self._topology)
            check_dtype_range(opts, (p.dtype for p in params))
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        group["step"] = 0
        group.update(opts.stored())  # factor_dtype by name, grafting resolved
        spec = GroupSpec(
            tuple(tuple(p.shape) for p in params), tuple(p.dtype for p in params), opts, shardings
        )
        state = GroupState.create(
            self._plan.add_group(spec), self._topology.rank, opts, self._topology.device
        )
        self._groups.append(state)
        for pi, p in enumerate(params):
            self.state[p] = state.param_state(pi, opts)

    def _discard_group(self, gi: int) -> None:
        """Undoes ``add_param_group`` of group ``gi`` (the last one), whatever part of it ran."""
        group = self.param_groups.pop(gi)
        for p in group["params"]:
            self.state.pop(p, None)
        if len(self._plan.groups) > gi:
            self._plan.pop_group()
        del self._groups[gi:]
        if self._built:
            self._build_distributors()

    def _after_plan_change(self) -> None:
        """Checks that every rank built the same optimizer (one collective), then builds the
        distributors."""
        if self._topology.checks_agreement:
            items = agreement_items(self._topology.settings, self._plan, self._param_name)
            check_agreement(self._topology.agreement_group, items, self._plan.owners_fingerprint())
        self._build_distributors()

    def _build_distributors(self) -> None:
        self._distributors = build_distributors(
            [g.blocks for g in self._groups],
            self._plan,
            self._topology,
            self._communication_dtype,
            self._topology.exchange_buckets,
        )

    def _options(self, gi: int) -> GroupOptions:
        """Group ``gi``'s options for this step, checked; its structure cannot have changed."""
        try:
            opts = GroupOptions.from_group(self.param_groups[gi])
            check_dtype_range(opts, self._plan.groups[gi].spec.dtypes)
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        changed = opts.structure_changes(self._groups[gi].structure)
        if changed:
            raise ValueError(
                f"param group {gi}: {changed} cannot change after the optimizer is "
                "built (it decides the blocks and their state); build a new optimizer instead"
            )
        return opts

    def _param_name(self, gi: int, pi: int) -> str:
        return param_name(self.param_groups, gi, pi)

    def _block_name(self, gi: int, pi: int, bid: int) -> str:
        return block_name(self._groups[gi].blocks.blockings[pi], self._param_name(gi, pi), bid)

    # ---------------------------------------------------------------- step

    @torch.compiler.disable  # Dynamo never traces it: a compiled caller is found and refused
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Validate, collect (gradients into stacks), install the refreshes computed in the
        background that are due, compute (per stack: which blocks step, the math; exchanges
        overlap it), exchange (the last directions and status words), read the outcome (the
        step's one host read), raise on every rank if any rank failed or ranks disagree, else
        apply.

        Not for ``torch.compile``: called from compiled code (``torch.compile(opt.step)``, or a
        compiled function that calls it) it raises ``RuntimeError`` before doing anything.
        """
        refuse_compiled_caller()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._topology.warn_if_built_too_early()
        self._dicts.forget_consolidated()
        step, invalid = begin_step(
            self.param_groups,
            self._options,
            any(d.collective for d in self._distributors),
            self._param_name,
        )
        if step is None:
            return loss
        try:
            collected = [(d, d.collect(step)) for d in self._distributors]
            work = [w for _, ws in collected for w in ws]
            steps = [g["step"] for g in self.param_groups]
            # Refreshes computed in the background are installed before the math uses them.
            installed, crash = None, None
            try:
                installed = self._refreshes.install(step.options, steps, self._block_name)
            except Exception as e:  # noqa: BLE001 - raised after the exchange, on every rank
                crash = e
            error, crash = compute(collected, steps, self._block_name, self._refreshes, crash)
            error = error or installed
            # Parameters are not touched until every rank learnt that every rank succeeded and
            # stepped alike: what went wrong rides the status words of each exchange.
            message = failure_message(error, invalid, crash)
            summaries = [d.exchange(step, message is not None) for d in self._distributors]
            skipped = torch.cat([w.keep for w in work]).logical_not().any() if work else None
            any_skipped, statuses = read_outcome(
                skipped, summaries, [d.status for d in self._distributors]
            )
            if any_skipped:
                for w in work:
                    warn_skipped(w, self._block_name, steps[w.group] + 1)
            failures = []
            if any(s.failed for s in statuses):  # the cause, from the ranks that failed
                with on_device(self._topology.device):
                    groups = [d.group for d in self._distributors]
                    failures = gather_failures(groups, statuses, message)
            raise_if_failed(statuses, error, invalid, crash, failures)
            for d in self._distributors:
                d.apply(step)
        finally:
            # A step's directions are not kept between steps.
            for d in self._distributors:
                d.release()
        for gi in step.active:
            self.param_groups[gi]["step"] += 1
            self._groups[gi].step.fill_(self.param_groups[gi]["step"])
        return loss

    # ---------------------------------------------------------------- what it holds

    @property
    def plan(self) -> Plan:
        """The block placement (read-only)."""
        return self._plan

    @property
    def communication_dtype(self) -> torch.dtype:
        """The dtype directions travel in."""
        return self._communication_dtype

    @property
    def group_states(self) -> tuple[GroupState, ...]:
        """Per param group, the state this rank holds (its stacks of blocks; read-only)."""
        return tuple(self._groups)

    @property
    def distributors(self) -> tuple[Distributor, ...]:
        """How this rank's blocks get their gradients and deliver their directions."""
        return tuple(self._distributors)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this process (padding included)."""
        return sum(g.pool.nbytes() for g in self._groups)

    def memory_report(self) -> MemoryReport:
        """What this rank keeps between steps, state and buffers, by kind, and per parameter
        element it holds (:mod:`sharded_shampoo.memory`)."""
        return memory_report(self)

    def owned_blocks(self) -> int:
        """Number of blocks whose state this process keeps and whose direction it computes."""
        return sum(s.num_rows for g in self._groups for s in g.blocks.stacks)

    def bytes_sent_per_step(self) -> int:
        """Bytes this rank sends to other ranks in one step's collectives (AllGather and
        all_to_alls)."""
        return sum(d.bytes_sent_per_step() for d in self._distributors)

    # ---------------------------------------------------------------- state dicts

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (see :mod:`sharded_shampoo.state.dicts` for its keys), as a
        copy.

        When sharded, the caller says which blocks: this rank's inside ``sharded_state()``
        and when torch's ``get_optimizer_state_dict`` asks for a sharded dict (what DCP's
        sharded save wants); every block after ``consolidate_state_dict`` (on that rank),
        inside ``full_state()`` (a collective), when torch asks with
        ``StateDictOptions(full_state_dict=True)`` and under Accelerate's ``save_state``
        (torch's and Accelerate's requests are found in their frames). Unsaid, it raises
        ``StateDictRequestError`` naming these ways: this rank's blocks saved by one rank
        would be a checkpoint that cannot be resumed. So does torch's state-dict code whose
        options cannot be read (see ``state.consolidation``).

        A copy, not views of the live state: ``dcp.load`` reads a checkpoint into the state
        dict it is given before ``set_optimizer_state_dict`` validates it, and into live views
        it would change the optimizer before a refused or failed load. Inside ``saving()`` the
        tensors are views instead, which costs no copy; a save only reads them.
        """
        self._refreshes.wait()  # what is in flight is in the state dict
        return self._dicts.state_dict()

    def full_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every block of every parameter, on every rank: for a framework
        that saves one rank's ``state_dict()`` (the Hugging Face Trainer and Lightning under
        DDP). When sharded it is a collective: every rank must call it."""
        self._refreshes.wait()
        return self._dicts.gathered(keep=True)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """torch's ``ZeroRedundancyOptimizer`` protocol, which Lightning follows under DDP:
        gathers every block onto global rank ``to``, whose next ``state_dict()`` returns them
        all (the others' is unchanged). When sharded it is a collective: every rank must call
        it."""
        self._refreshes.wait()
        self._dicts.consolidate(to)

    @contextlib.contextmanager
    def full_state(self, cpu_offload: bool = False):
        """Within it, ``state_dict()`` returns every block of every parameter: on every rank,
        or with ``cpu_offload`` on rank 0 only, on the CPU (torch's ``StateDictOptions``
        meaning). When sharded, each ``state_dict()`` call inside it is a collective: every
        rank makes it. For a framework that saves one rank's dict (see also
        ``checkpoint.full_optimizer_state_dict``)."""
        with self._dicts.requesting(FullRequest(cpu_offload=cpu_offload)):
            yield self

    @contextlib.contextmanager
    def sharded_state(self):
        """Within it, ``state_dict()`` returns this rank's blocks whoever calls it (DCP's
        sharded save: each block written once, by its owner)."""
        with self._dicts.requesting(FullRequest(full_state_dict=False)):
            yield self

    @contextlib.contextmanager
    def saving(self):
        """Within it, ``state_dict()`` returns views of the live state instead of copies, for a
        save (``get_optimizer_state_dict`` then ``dcp.save``), which only reads them."""
        with self._dicts.views():
            yield self

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads state saved by ``state_dict`` (at any world size, in any mode).

        Everything is checked before anything changes: the number of groups and parameters, each
        parameter's blocking record, the options that shape the state, and the name and shape of
        every state tensor. A mismatch raises ValueError naming the first offending parameter.
        When sharded, every rank must call it (as ``set_optimizer_state_dict`` and the
        frameworks' loaders do): the ranks compare outcomes in one collective, and if any rank
        refuses (a dict that lacks the blocks it owns: one rank's ``state_dict()`` saved alone),
        every rank raises, naming that rank's reason.
        """
        self._load(state_dict, agree=True)

    def load_rank_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a dict that holds at least this rank's blocks, as a peer rank with the same
        plan saved it inside ``sharded_state()`` (torchft's live recovery sends a recovering
        rank what the same rank of a healthy replica group holds), checked as
        ``load_state_dict`` does but on this rank alone: not a collective, so ranks may load at
        different times or not at all, and a refusal raises on this rank only."""
        self._load(state_dict, agree=False)

    def _load(self, state_dict: dict[str, Any], agree: bool) -> None:
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._refreshes.wait()  # nothing in flight may write over what is loaded
        self._dicts.load(state_dict, agree)
        self._refreshes.restore(self._groups)  # what was in flight when it was saved
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """``pickle`` and ``copy.deepcopy``: an optimizer rebuilt over the (copied) parameters
        with the same groups, options and state (``state.dicts.pickled``); not while sharded."""
        return pickled(self)


# The signature and documentation of the options come from the table (options.OPTIONS).
ShardedShampoo.__init__.__signature__ = optimizer_signature(
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
    for name, default in (
        ("mesh", None),
        ("communication_dtype", torch.float32),
        ("num_trainers_per_group", None),
        ("exchange_buckets", 4),
    )
)
ShardedShampoo.__doc__ = ShardedShampoo.__doc__.replace("{options}", options_doc().strip())
