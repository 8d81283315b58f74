"""ShardedShampoo: the ``torch.optim.Optimizer``."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .functional import stack_step
from .options import DEFAULTS, STRUCTURAL, GroupOptions
from .state import BlockStack, GroupBlocks, state_bytes

__all__ = ["ShardedShampoo", "NonFiniteGradientWarning", "RootFailureWarning"]


class NonFiniteGradientWarning(UserWarning):
    """A block's gradient had a NaN or Inf; the block was skipped for that step."""


class RootFailureWarning(UserWarning):
    """A block's inverse roots could not be computed; it kept its previous roots."""


def _warn(message: str, category: type[Warning]) -> None:
    """Warns at the user's call to ``step()``, past this package's and torch's wrappers."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


_INTERNAL_DIRS = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


@dataclass
class _StackWork:
    """One stack's part in one step."""

    group: int
    opts: GroupOptions
    stack: BlockStack
    grad: torch.Tensor
    param: torch.Tensor | None
    rows: torch.Tensor | None  # bool mask of the rows to update; None: all
    finite: torch.Tensor
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
    :mod:`sharded_shampoo.state.stacks`). Every option may differ per param group; options that
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
        self._blocks: list[GroupBlocks] = []
        self._structure: list[tuple] = []
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            opts = GroupOptions.from_group(group)
            for p in group["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise ValueError(
                        f"ShardedShampoo supports real floating-point parameters, got {p.dtype}"
                    )
        except ValueError as e:
            self.param_groups.pop()
            raise ValueError(f"param group {len(self.param_groups)}: {e}") from None
        group["step"] = 0
        blocks = GroupBlocks(group["params"], opts)
        self._blocks.append(blocks)
        self._structure.append(opts.structure())
        for i, p in enumerate(group["params"]):
            self.state[p] = blocks.block_views(i)

    def _options(self, gi: int) -> GroupOptions:
        group = self.param_groups[gi]
        try:
            opts = GroupOptions.from_group(group)
        except ValueError as e:
            raise ValueError(f"param group {gi}: {e}") from None
        if opts.structure() != self._structure[gi]:
            changed = [
                name
                for name, old, new in zip(STRUCTURAL, self._structure[gi], opts.structure())
                if old != new
            ]
            raise ValueError(
                f"param group {gi}: {', '.join(changed)} cannot change after the optimizer is "
                "built (it decides the blocks and their state); build a new optimizer instead"
            )
        return opts

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

        # Phase 1: validate options, gather gradients into stacks, flag non-finite blocks.
        work: list[_StackWork] = []
        for gi, group in enumerate(self.param_groups):
            opts = self._options(gi)
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
            for si, stack in enumerate(blocks.stacks):
                rows = stack.row_mask(active)
                if rows is not None and not rows.any():
                    continue
                shape = (stack.num_rows, *stack.block_shape)
                device = stack.state.device
                g = self._buffer((gi, si, "grad"), shape, stack.dtype, device)
                stack.gather(grads, blocks.blockings, g)
                w = None
                if opts.weight_decay > 0:
                    w = self._buffer((gi, si, "param"), shape, stack.dtype, device)
                    stack.gather(list(params), blocks.blockings, w)
                finite = torch.isfinite(torch.linalg.vector_norm(g.flatten(1), dim=1))
                work.append(_StackWork(gi, opts, stack, g, w, rows, finite, active))
        if not work:
            return loss

        # One host sync per step, to learn whether any block must be skipped.
        all_finite = torch.stack(
            [(w.finite if w.rows is None else w.finite | ~w.rows.to(w.finite.device)).all() for w in work]
        ).all()
        if not bool(all_finite):
            for w in work:
                self._skip_nonfinite(w)

        # Phase 2: the math, stack by stack. Parameters are not touched until it all succeeded.
        for w in work:
            t = self.param_groups[w.group]["step"] + 1
            if w.rows is None:
                w.direction, ok = stack_step(w.stack.state, w.grad, w.param, w.opts, t)
                ok_rows = None if ok is None else torch.arange(w.stack.num_rows)
            else:
                idx = w.rows.nonzero().flatten().to(w.grad.device)
                if idx.numel() == 0:
                    continue
                sub = w.stack.state[idx]
                d_sub, ok = stack_step(
                    sub, w.grad[idx], None if w.param is None else w.param[idx], w.opts, t
                )
                w.stack.state[idx] = sub
                w.direction = torch.zeros_like(w.grad)
                w.direction[idx] = d_sub
                ok_rows = idx.cpu()
            if ok is not None:
                self._check_roots(w.group, w.opts, w.stack, ok, ok_rows)

        # Phase 3: apply the directions.
        for w in work:
            if w.direction is not None:
                group = self.param_groups[w.group]
                w.stack.scatter_add_(
                    group["params"], w.active, self._blocks[w.group].blockings, w.direction, -w.opts.lr
                )
        for gi in sorted({w.group for w in work}):
            self.param_groups[gi]["step"] += 1
        return loss

    def _skip_nonfinite(self, w: "_StackWork") -> None:
        """Warns about, and drops from ``w.rows``, the blocks whose gradient is not finite."""
        bad = ~w.finite.cpu()
        if w.rows is not None:
            bad &= w.rows
        for r in bad.nonzero().flatten().tolist():
            pi, bid = w.stack.row_owner[r]
            _warn(
                f"non-finite gradient in {self._block_name(w.group, pi, bid)} at step "
                f"{self.param_groups[w.group]['step'] + 1}: the block is skipped",
                NonFiniteGradientWarning,
            )
        if bad.any():
            base = torch.ones(w.stack.num_rows, dtype=torch.bool) if w.rows is None else w.rows
            w.rows = base & ~bad

    def _check_roots(
        self, gi: int, opts: GroupOptions, stack: BlockStack, ok: torch.Tensor, rows: torch.Tensor
    ) -> None:
        if bool(ok.all()):
            return
        failures = stack.state["root_failures"]
        for j in (~ok).nonzero().flatten().tolist():
            r = int(rows[j])
            pi, bid = stack.row_owner[r]
            count = int(failures[r])
            name = self._block_name(gi, pi, bid)
            if count >= opts.max_consecutive_root_failures:
                raise RuntimeError(
                    f"the inverse roots of {name} failed {count} times in a row (also in "
                    "float64); its factors are likely non-finite or badly scaled. Parameters "
                    "were not updated in this step."
                )
            _warn(
                f"inverse roots of {name} could not be computed (failure {count} of "
                f"{opts.max_consecutive_root_failures} allowed); keeping its previous roots",
                RootFailureWarning,
            )

    # ---------------------------------------------------------------- state

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this process."""
        return state_bytes(self._blocks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads state saved by :meth:`state_dict`.

        Everything is checked before anything changes: the number of groups and parameters, the
        structural options, and the name and shape of every state tensor. A mismatch raises
        ValueError naming the first offending parameter.
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
            if "step" not in saved:
                raise ValueError(f"param group {gi}: the state dict has no 'step'")
            options = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            candidate = {**group, **options}
            try:
                opts = GroupOptions.from_group(candidate)
            except (KeyError, ValueError) as e:
                raise ValueError(f"param group {gi} of the state dict: {e}") from None
            if opts.structure() != self._structure[gi]:
                changed = [
                    name
                    for name, old, new in zip(STRUCTURAL, self._structure[gi], opts.structure())
                    if old != new
                ]
                raise ValueError(
                    f"param group {gi}: the state dict was saved with a different "
                    f"{', '.join(changed)}; its state does not fit this optimizer's blocks"
                )
            new_options.append(options)
            for pi, (p, pid) in enumerate(zip(group["params"], saved["params"])):
                mine = self.state[p]
                theirs = saved_state.get(pid, {})
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
            dst.copy_(src)
        for group, options in zip(self.param_groups, new_options):
            group.update(options)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
