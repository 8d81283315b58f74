"""Where state lives: per-block optimizer state, stacked by (parameter dtype, block shape).

All blocks of a param group that share a parameter dtype and a block shape form one *stack*: a
``TensorDict`` whose batch dimension runs over those blocks. The math then runs once per stack
(batched matrix products, one batched ``eigh``), so kernel launches grow with the number of
distinct block shapes, not with the number of blocks.

Keys of a stack's TensorDict, for a block of order k with shape (m_1, ..., m_k):
    factor_i       (n, m_i, m_i)  Kronecker factor of dim i, in ``factor_dtype``
    root_i         (n, m_i, m_i)  its inverse root, in the math dtype (identity until computed)
    graft_v        (n, *shape)    grafting second moment (adam, rmsprop, adagrad grafting only)
    filtered_grad  (n, *shape)    EMA of gradients (beta1 > 0 only)
    momentum       (n, *shape)    momentum buffer (momentum > 0 only)
    root_failures  (n,)           consecutive failed root computations (int32)

The math dtype is the parameter dtype promoted to at least float32.

State is only ever updated in place, so per-block views into the stacks (``block_views``) stay
valid for the optimizer's lifetime; that is what ``Optimizer.state`` and ``state_dict`` expose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from ..blocking import ParamBlocking, Region, make_blocking
from ..options import GroupOptions

__all__ = ["BlockStack", "GroupBlocks", "math_dtype", "state_bytes"]


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(param_dtype, torch.float32)


@dataclass(frozen=True)
class Member:
    """A region of one parameter, laid out in rows ``[row, row + region.num_blocks)``."""

    param: int
    region: Region
    row: int


@dataclass
class BlockStack:
    param_dtype: torch.dtype
    block_shape: tuple[int, ...]
    members: list[Member]
    state: TensorDict
    # Per row: (index of the parameter in its group, block id within the parameter).
    row_owner: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.row_owner)

    @property
    def order(self) -> int:
        return len(self.block_shape)

    @property
    def dtype(self) -> torch.dtype:
        return math_dtype(self.param_dtype)

    @property
    def params(self) -> tuple[int, ...]:
        """Indices (in the group) of the parameters with blocks in this stack."""
        return tuple(dict.fromkeys(m.param for m in self.members))

    def row_mask(self, active: list[bool]) -> torch.Tensor | None:
        """Rows of the active parameters as a bool mask; None when every row is active."""
        if all(active[p] for p in self.params):
            return None
        mask = torch.zeros(self.num_rows, dtype=torch.bool)
        for m in self.members:
            if active[m.param]:
                mask[m.row : m.row + m.region.num_blocks] = True
        return mask

    def gather(
        self, tensors: list[torch.Tensor | None], blockings: list[ParamBlocking], out: torch.Tensor
    ) -> torch.Tensor:
        """Copies the blocks of ``tensors`` (indexed like the group's params) into ``out``.

        ``out`` is (num_rows, *block_shape); rows of parameters whose tensor is None are left
        as they are. One copy per region.
        """
        for m in self.members:
            t = tensors[m.param]
            if t is None:
                continue
            merged = t.reshape(blockings[m.param].merged)
            src = m.region.view_of(merged)
            out[m.row : m.row + m.region.num_blocks].view(src.shape).copy_(src)
        return out

    def scatter_add_(
        self,
        params: list[torch.Tensor],
        active: list[bool],
        blockings: list[ParamBlocking],
        rows: torch.Tensor,
        alpha: float,
    ) -> None:
        """``param += alpha * rows`` block by block, for the parameters marked active."""
        for m in self.members:
            if not active[m.param]:
                continue
            p = params[m.param]
            src = rows[m.row : m.row + m.region.num_blocks]
            merged = _merged_view(p, blockings[m.param])
            if merged is not None:
                dst = m.region.view_of(merged)
                dst.add_(src.view(dst.shape).to(p.dtype), alpha=alpha)
            else:
                # A parameter whose strides do not allow a merged view (e.g. channels_last):
                # build its update region in a dense buffer and add that.
                buf = torch.zeros(blockings[m.param].merged, dtype=p.dtype, device=p.device)
                dst = m.region.view_of(buf)
                dst.copy_(src.view(dst.shape))
                p.add_(buf.view(p.shape), alpha=alpha)


def _merged_view(p: torch.Tensor, blocking: ParamBlocking) -> torch.Tensor | None:
    try:
        return p.view(blocking.merged)
    except RuntimeError:
        return None


def _new_state(
    n: int, block_shape: tuple[int, ...], dtype: torch.dtype, opts: GroupOptions, device: torch.device
) -> TensorDict:
    tensors: dict[str, torch.Tensor] = {}
    for i, m in enumerate(block_shape):
        tensors[f"factor_{i}"] = torch.zeros(n, m, m, dtype=opts.factor_dtype, device=device)
        eye = torch.eye(m, dtype=dtype, device=device)
        tensors[f"root_{i}"] = eye.expand(n, m, m).contiguous()
    if opts.grafting in ("adam", "rmsprop", "adagrad"):
        tensors["graft_v"] = torch.zeros(n, *block_shape, dtype=dtype, device=device)
    if opts.beta1 > 0:
        tensors["filtered_grad"] = torch.zeros(n, *block_shape, dtype=dtype, device=device)
    if opts.momentum > 0:
        tensors["momentum"] = torch.zeros(n, *block_shape, dtype=dtype, device=device)
    tensors["root_failures"] = torch.zeros(n, dtype=torch.int32, device=device)
    return TensorDict(tensors, batch_size=[n], device=device)


class GroupBlocks:
    """The blocks of one param group, their stacks, and where each block's row is."""

    def __init__(self, params: list[torch.Tensor], opts: GroupOptions) -> None:
        self.blockings = [
            make_blocking(p.shape, opts.max_preconditioner_dim, opts.merge_dims) for p in params
        ]
        # Stack order is deterministic: first appearance in parameter order.
        by_key: dict[tuple, list[Member]] = {}
        rows: dict[tuple, list[tuple[int, int]]] = {}
        for pi, (p, b) in enumerate(zip(params, self.blockings)):
            for region in b.regions:
                key = (p.dtype, region.block_shape, p.device)
                members = by_key.setdefault(key, [])
                owners = rows.setdefault(key, [])
                members.append(Member(pi, region, len(owners)))
                owners.extend((pi, bid) for bid in region.block_ids)
        self.stacks: list[BlockStack] = []
        # (param, block id) -> (stack index, row)
        self.where: dict[tuple[int, int], tuple[int, int]] = {}
        for (dtype, shape, device), members in by_key.items():
            owners = rows[(dtype, shape, device)]
            state = _new_state(len(owners), shape, math_dtype(dtype), opts, device)
            si = len(self.stacks)
            self.stacks.append(BlockStack(dtype, shape, members, state, owners))
            for r, owner in enumerate(owners):
                self.where[owner] = (si, r)

    def block_views(self, param: int) -> dict[str, torch.Tensor]:
        """The state of one parameter's blocks, as views into the stacks.

        Keys are ``blocks.<block id>.<state name>``: they name the block of the full parameter,
        so they do not depend on how blocks are stacked.
        """
        out: dict[str, torch.Tensor] = {}
        for bid in range(self.blockings[param].num_blocks):
            si, r = self.where[(param, bid)]
            for name, t in self.stacks[si].state.items():
                out[f"blocks.{bid}.{name}"] = t[r]
        return out


def state_bytes(groups: list[GroupBlocks]) -> int:
    """Bytes of optimizer state held by this process."""
    return sum(
        t.numel() * t.element_size()
        for g in groups
        for s in g.stacks
        for t in s.state.values()
    )

