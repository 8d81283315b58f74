"""Where state lives: per-block optimizer state, stacked by (parameter dtype, block shape).

All blocks a rank owns in a param group that share a parameter dtype and a block shape form one
*stack*: a ``TensorDict`` whose batch dimension runs over those blocks (see
``placement.layout.StackLayout`` for which blocks and in which order). The math then runs once
per stack (batched matrix products, one batched ``eigh``), so kernel launches grow with the
number of distinct block shapes, not with the number of blocks.

Keys of a stack's TensorDict, for blocks of order k with shape (m_1, ..., m_k):
    factor_i       (n, m_i, m_i)  Kronecker factor of dim i, in ``factor_dtype``; with
                                  ``symmetric_packing`` (n, m_i (m_i + 1) / 2), its upper
                                  triangle (``algorithm.packing``), as root_i
    root_i         (n, m_i, m_i)  its inverse root, in ``root_dtype`` or the math dtype
                                  (identity until computed); ``root_dtype="int8"``: codes,
                                  with root_i_scale (n, runs) beside them (``quantize``)
    eigenvectors_i (n, m_i, m_i)  instead of root_i with the eigenvalue-corrected preconditioner,
                                  beside it with ``eigenbasis="qr"``: the factor's eigenbasis
                                  (identity until computed), as root_i is stored but unpacked
    corrected_eigenvalues (n, *shape)  with it: second moment of the rotated gradient; and
                                  filtered_grad is then kept in the eigenbasis
    graft_v        (n, *shape)    grafting second moment (adam, rmsprop, adagrad grafting only)
    filtered_grad  (n, *shape)    EMA of gradients (beta1 > 0 only)
    momentum       (n, *shape)    momentum buffer (momentum > 0 only)
    root_failures  (n, 1)         consecutive failed root computations (int32); (1,) per block,
                                  not 0-d: torch's full state-dict loading mishandles 0-d
                                  tensors a rank does not own (it adds them without their key)
    pending_*                     with ``refresh_delay``: a refresh in flight (``refreshes``):
                                  pending_root_i or pending_eigenvectors_i (and _scale) as
                                  stored, pending_permutation_i (n, m_i) with soap QR,
                                  pending_ok (n, 1) bool, pending_step (n, 1) int64: the step
                                  it is installed at (0: none)

The math dtype is the parameter dtype promoted to at least float32. The tensors are views into
the rank's ``StatePool``; state is only ever updated in place, so per-block views
(``block_views``) stay valid for the optimizer's lifetime: that is what ``Optimizer.state`` and
``state_dict`` expose.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from ..algorithm.packing import packed_size
from ..algorithm.quantize import scale_shape
from ..algorithm.rounding import row_seeds
from ..algorithm.storage import write_where
from ..blocking import ParamBlocking
from ..options import GroupOptions
from ..placement.layout import StackLayout
from .pool import StatePool, pooled_sizes

__all__ = [
    "PENDING",
    "BlockStack",
    "GroupBlocks",
    "RowSelection",
    "Rows",
    "block_state_spec",
    "math_dtype",
    "state_spec",
]


# The prefix of the state of a refresh in flight.
PENDING = "pending_"


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(param_dtype, torch.float32)


def block_state_spec(
    block_shape: tuple[int, ...], param_dtype: torch.dtype, opts: GroupOptions
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every state tensor of one block."""
    dtype = math_dtype(param_dtype)
    spec = []
    for i in opts.preconditioned_dims(block_shape):
        m = block_shape[i]
        symmetric = (packed_size(m),) if opts.symmetric_packing else (m, m)
        spec.append((f"factor_{i}", symmetric, opts.factor_dtype))
        for name in opts.bases:
            # Roots are symmetric; eigenvectors are not.
            basis_shape = symmetric if name == "root" else (m, m)
            spec.append((f"{name}_{i}", basis_shape, opts.root_dtype or dtype))
            if opts.root_dtype == torch.int8:  # quantized: a scale per run of entries
                spec.append((f"{name}_{i}_scale", scale_shape(basis_shape), torch.float32))
    if opts.eigenvalue_corrected:
        spec.append(("corrected_eigenvalues", block_shape, dtype))
    if opts.grafting in ("adam", "rmsprop", "adagrad"):
        spec.append(("graft_v", block_shape, opts.grafting_dtype or dtype))
    if opts.beta1 > 0:
        spec.append(("filtered_grad", block_shape, opts.first_moment_dtype or dtype))
    if opts.momentum > 0:
        spec.append(("momentum", block_shape, dtype))
    spec.append(("root_failures", (1,), torch.int32))
    if opts.refresh_delay > 0:
        # A refresh in flight (``refreshes``): what it computed, and the step it is installed
        # at (0: none), so that a checkpoint taken meanwhile resumes it.
        for key, shape, dtype in list(spec):
            if key.startswith(opts.bases):
                spec.append((f"{PENDING}{key}", shape, dtype))
        soap_qr = opts.eigenbasis == "qr" and opts.eigenbasis_convention == "soap"
        if opts.eigenvalue_corrected and soap_qr:
            for i in opts.preconditioned_dims(block_shape):
                spec.append((f"{PENDING}permutation_{i}", (block_shape[i],), torch.int64))
        spec.append((f"{PENDING}ok", (1,), torch.bool))
        spec.append((f"{PENDING}step", (1,), torch.int64))
    return spec


def state_spec(
    layout: StackLayout, opts: GroupOptions
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every state tensor of a stack: its blocks' (``block_state_spec``)
    stacked along a first dim."""
    return [
        (key, (layout.num_rows, *shape), dtype)
        for key, shape, dtype in block_state_spec(layout.block_shape, layout.param_dtype, opts)
    ]


@dataclass(frozen=True)
class Rows:
    """Some rows of a stack: indices on its device, and the same on the host (to name blocks
    and look up host-side data, such as phases, without reading the device)."""

    index: torch.Tensor  # (k,) int64 on the stack's device
    host: torch.Tensor  # (k,) int64 on the CPU


@dataclass(frozen=True)
class RowSelection(Rows):
    """The rows of a stack that step when some of its parameters have no gradient."""

    key: tuple  # which of the stack's parameters are active
    mask: torch.Tensor  # (num_rows,) bool on the stack's device


# Distinct row selections and due-row sets a stack keeps on its device; a workload cycles
# through a few (frozen layers, phases of staggered roots), so the bound is never reached in
# practice, but an unusual one must not grow memory without end.
_INDEX_CACHE = 1024


@dataclass
class BlockStack:
    """A stack's layout and state, with the device-side indices its steps need, each copied to
    the device once."""

    layout: StackLayout
    state: TensorDict
    _indices: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def phases(self) -> torch.Tensor | None:
        """Each row's phase with ``stagger_roots`` (a host tensor: read on the host), else
        None."""
        if self.layout.row_phases is None:
            return None
        return torch.tensor(self.layout.row_phases, dtype=torch.long, device="cpu")

    @functools.cached_property
    def seeds(self) -> torch.Tensor:
        """Each row's rounding seed, from its block (``algorithm.rounding``), on the device."""
        return row_seeds(self.layout.row_owner, self.device)

    @functools.cached_property
    def working(self) -> TensorDict:
        """The state a step reads and writes (``state`` less the refreshes in flight, which
        ``refreshes`` writes in the background)."""
        return self.state.exclude(*self._pending_keys)

    @functools.cached_property
    def pending(self) -> TensorDict:
        """The refreshes in flight (``refresh_delay``), named without their prefix: what
        ``algorithm.decompose`` computed, ``step`` (n, 1) the step they are installed at (0:
        none). Views of ``state``."""
        return TensorDict(
            {k.removeprefix(PENDING): self.state[k] for k in self._pending_keys},
            batch_size=self.state.batch_size,
            device=self.state.device,
        )

    @property
    def _pending_keys(self) -> list[str]:
        return [k for k in self.state.keys() if k.startswith(PENDING)]

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def block_shape(self) -> tuple[int, ...]:
        return self.layout.block_shape

    @property
    def dtype(self) -> torch.dtype:
        return math_dtype(self.layout.param_dtype)

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def row_owner(self) -> list[tuple[int, int]]:
        return self.layout.row_owner

    def select(self, active: list[bool]) -> RowSelection | None:
        """The rows of the parameters marked active (indexed like the group's parameters);
        None when every row is."""
        key = tuple(active[p] for p in self.layout.params)
        if all(key):
            return None

        def make() -> RowSelection:
            mask = torch.zeros(self.num_rows, dtype=torch.bool, device="cpu")
            for part in self.layout.parts:
                if active[part.param]:
                    mask[part.row : part.row + part.count] = True
            host = mask.nonzero().flatten()
            return RowSelection(host.to(self.device), host, key, mask.to(self.device))

        return self.cached(("select", key), make)

    def cached(self, key: tuple, make):
        """``make()``, computed once per ``key`` (indices the steps need on the device)."""
        value = self._indices.get(key)
        if value is None:
            if len(self._indices) >= _INDEX_CACHE:
                self._indices.clear()
            value = self._indices[key] = make()
        return value


class GroupBlocks:
    """The blocks of one param group this rank owns: their stacks and where each row is."""

    def __init__(
        self,
        blockings: tuple[ParamBlocking, ...],
        layouts: tuple[StackLayout, ...],
        opts: GroupOptions,
        pool: StatePool,
    ) -> None:
        self.blockings = blockings
        self.stacks: list[BlockStack] = []
        # (param, block id) -> (stack index, row), for the blocks this rank owns.
        self.where: dict[tuple[int, int], tuple[int, int]] = {}
        for layout in layouts:
            tensors = {
                key: pool.take(shape, dtype) for key, shape, dtype in state_spec(layout, opts)
            }
            # Roots and eigenvectors start as the identity: stored once as the stack stores
            # it (packed, narrow or quantized), then copied to every row.
            for i in opts.preconditioned_dims(layout.block_shape):
                for base in opts.bases:
                    m, key = layout.block_shape[i], f"{base}_{i}"
                    names = [k for k in tensors if k in (key, f"{key}_scale")]
                    one = TensorDict(
                        {k: torch.empty_like(tensors[k][:1]) for k in names}, batch_size=[1]
                    )
                    eye = torch.eye(m, dtype=torch.float32, device=pool.device).unsqueeze(0)
                    yes = torch.ones(1, dtype=torch.bool, device=pool.device)
                    write_where(one, key, eye, yes)
                    for k in names:
                        tensors[k].copy_(one[k].expand_as(tensors[k]))
            td = TensorDict(tensors, batch_size=[layout.num_rows], device=pool.device)
            si = len(self.stacks)
            self.stacks.append(BlockStack(layout, td))
            for r, owner in enumerate(layout.row_owner):
                self.where[owner] = (si, r)

    def block_views(self, param: int) -> dict[str, torch.Tensor]:
        """The state of the parameter's blocks that this rank owns, as views into the stacks.

        Keys are ``blocks.<block id>.<state name>``: they name the block of the full parameter,
        so they do not depend on how blocks are stacked or who owns them.
        """
        out: dict[str, torch.Tensor] = {}
        for bid in range(self.blockings[param].num_blocks):
            if (param, bid) not in self.where:
                continue
            si, r = self.where[(param, bid)]
            for name, t in self.stacks[si].state.items():
                out[f"blocks.{bid}.{name}"] = t[r]
        return out


def pool_lengths(layouts: tuple[StackLayout, ...], opts: GroupOptions) -> dict[torch.dtype, int]:
    """Per dtype, the elements of state the stacks ``layouts`` (one rank's) take."""
    return pooled_sizes(
        (shape, dtype) for lay in layouts for _, shape, dtype in state_spec(lay, opts)
    )
