"""The frozen plan: blocks of every parameter, their owners, and each rank's stacks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..blocking import ParamBlocking, make_blocking
from ..options import GroupOptions
from .cost import block_cost, block_state_elements, root_cost, spectral_cost, step_cost
from .layout import StackLayout, group_stacks
from .phases import assign_phases
from .planner import assign_blocks
from .sharding import Sharding, largest_piece
from .world import WorldMesh

__all__ = ["GroupSpec", "GroupPlan", "Plan"]

# Holders of a block's largest piece the planner may prefer as its owner: under HSDP or with
# replicated dims every replica holds it, and considering all of them costs the planner time
# per block in proportion to the replicas for no better balance.
PREFERRED = 8


@dataclass(frozen=True)
class GroupSpec:
    """What the plan needs to know of a param group.

    ``shardings[p]`` is None for a parameter every rank holds whole (plain or DDP), or how it
    is split over the world mesh (a DTensor).
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    opts: GroupOptions
    shardings: tuple[Sharding | None, ...] | None = None

    def sharding(self, p: int) -> Sharding | None:
        return None if self.shardings is None else self.shardings[p]

    def param_fingerprints(self) -> list[str]:
        """Per parameter, what decides its blocks besides the group's options (which ranks
        compare separately): shape, dtype and sharding."""
        return [
            f"{shape}:{dtype}:{self.sharding(pi)}"
            for pi, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes, strict=True))
        ]


@dataclass(frozen=True)
class GroupPlan:
    spec: GroupSpec
    blockings: tuple[ParamBlocking, ...]
    # owners[p][b]: the rank that owns block b of parameter p.
    owners: tuple[tuple[int, ...], ...]
    # owned[r]: {parameter: block ids} of the blocks rank r owns (ranks that own none absent).
    owned: dict[int, dict[int, set[int]]]
    # phases[p][b]: the phase of block b of parameter p (stagger_roots), else None.
    phases: tuple[tuple[int, ...], ...] | None = None
    _layouts: dict[int, tuple[StackLayout, ...]] = field(default_factory=dict, compare=False)

    def layout(self, rank: int) -> tuple[StackLayout, ...]:
        """The stacks of ``rank`` for this group, built on first use: a rank needs its own
        (and, for the AllGather, those of the ranks it shards with), never all of them."""
        if rank not in self._layouts:
            self._layouts[rank] = tuple(
                group_stacks(
                    list(self.blockings),
                    list(self.spec.dtypes),
                    self.owned.get(rank, {}),
                    [self.spec.sharding(pi) is not None for pi in range(len(self.blockings))],
                    self.phases,
                )
            )
        return self._layouts[rank]


class Plan:
    """Blocks of every parameter (from their full shapes), an owner for each, and the stacks
    each rank keeps. Computed identically on every rank from the same inputs; param groups
    added later are placed on top of the existing plan without moving earlier blocks."""

    def __init__(self, world_size: int, mesh: WorldMesh | None = None) -> None:
        """``mesh``: the world mesh of the DTensor parameters (their shardings' ranks)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.mesh = mesh
        self.groups: list[GroupPlan] = []
        self.loads = [0.0] * world_size  # per rank: cost of its blocks
        self.memory = [0.0] * world_size  # per rank: state elements of its blocks
        self.costs: list[float] = []
        # Staggered roots: per frequency, root work per phase; per (frequency, phase), per rank.
        self.phase_loads: dict[int, list[float]] = {}
        self.roots: dict[tuple[int, int], list[float]] = {}
        self._before: list[tuple] = []

    def add_group(self, spec: GroupSpec) -> GroupPlan:
        opts = spec.opts
        blockings = tuple(
            make_blocking(s, opts.max_preconditioner_dim, opts.merge_dims) for s in spec.shapes
        )
        shapes = [b.block_shape(bid) for b in blockings for bid in range(b.num_blocks)]
        # What pop_group restores (a refused add_param_group leaves the plan as it was).
        before = (
            self.loads,
            self.memory,
            {f: list(v) for f, v in self.phase_loads.items()},
            {k: list(v) for k, v in self.roots.items()},
        )
        try:
            return self._place(spec, blockings, shapes, before)
        except BaseException:
            self.loads, self.memory, self.phase_loads, self.roots = before
            raise

    def _place(self, spec: GroupSpec, blockings, shapes, before) -> GroupPlan:
        opts = spec.opts
        keys = root_costs = None
        dims = [opts.preconditioned_dims(s) for s in shapes]
        if opts.stagger_roots:
            # Roots in one step of the period (the block's phase), not amortized: see cost.py.
            f = opts.precondition_frequency
            root_costs = [root_cost(s, d) for s, d in zip(shapes, dims, strict=True)]
            flat, self.phase_loads[f] = assign_phases(root_costs, f, self.phase_loads.get(f))
            keys = [(f, p) for p in flat]
            costs = [step_cost(s, d) for s, d in zip(shapes, dims, strict=True)]
        else:
            costs = [
                block_cost(s, opts.precondition_frequency, d)
                for s, d in zip(shapes, dims, strict=True)
            ]
        if opts.preconditioner == "spectral":
            costs = [
                c + spectral_cost(s, opts.newton_schulz_steps)
                for c, s in zip(costs, shapes, strict=True)
            ]
        preferred = []
        for pi, b in enumerate(blockings):
            sharding = spec.sharding(pi)
            if sharding is None:
                preferred += [()] * b.num_blocks
                continue
            assert self.mesh is not None
            for bid in range(b.num_blocks):
                shard = largest_piece(b, sharding, bid)
                # Any holder saves sending the piece; a few candidates are enough.
                preferred.append(
                    () if shard is None else self.mesh.holders(sharding, shard, PREFERRED)
                )
        vectors = (
            (opts.grafting in ("adam", "rmsprop", "adagrad"))
            + (opts.beta1 > 0)
            + (opts.momentum > 0)
            + opts.eigenvalue_corrected
        )
        memory = [
            block_state_elements(s, vectors, d, opts.symmetric_packing, opts.bases)
            for s, d in zip(shapes, dims, strict=True)
        ]
        assignment = assign_blocks(
            costs,
            self.world_size,
            self.loads,
            preferred,
            memory,
            self.memory,
            keys,
            root_costs,
            self.roots,
        )
        owners, phases, i = [], [], 0
        owned: dict[int, dict[int, set[int]]] = {}
        for pi, b in enumerate(blockings):
            owners.append(tuple(assignment.owner[i : i + b.num_blocks]))
            for bid, r in enumerate(owners[-1]):
                owned.setdefault(r, {}).setdefault(pi, set()).add(bid)
            if keys is not None:
                phases.append(tuple(p for _, p in keys[i : i + b.num_blocks]))
            i += b.num_blocks
        plan = GroupPlan(
            spec, blockings, tuple(owners), owned, tuple(phases) if keys is not None else None
        )
        self._before.append(before)
        self.groups.append(plan)
        self.loads = list(assignment.loads)
        self.memory = list(assignment.memory)
        self.costs.extend(costs)
        return plan

    def pop_group(self) -> None:
        """Removes the last group (a refused ``add_param_group``)."""
        group = self.groups.pop()
        self.loads, self.memory, self.phase_loads, self.roots = self._before.pop()
        del self.costs[len(self.costs) - sum(b.num_blocks for b in group.blockings) :]

    @property
    def num_blocks(self) -> int:
        return len(self.costs)

    def direction_numel(self, rank: int) -> int:
        """Elements of search direction ``rank`` computes per step."""
        return sum(s.num_rows * s.row_numel for g in self.groups for s in g.layout(rank))

    def owners_fingerprint(self) -> str:
        owners = [g.owners for g in self.groups]
        return hashlib.sha1(repr((self.world_size, owners)).encode()).hexdigest()[:16]
