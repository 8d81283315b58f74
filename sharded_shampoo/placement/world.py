"""The world mesh every DTensor parameter's mesh is read onto, by which ranks its dims span.

A DeviceMesh may be made in many ways: ``init_device_mesh``, a slice of one by dim names,
``_unflatten`` of a 1-D world (torchtitan), ``_flatten`` of several dims into one (FSDP over
``dp_shard`` x ``cp``), a slice of a flattened dim. Dim names say nothing reliable about how
such meshes relate; the ranks do. Put the world's ranks in one order (the root mesh's); each
rank then has a *position* 0..W-1, and every mesh dim torch can build walks those positions as
a *layout*: one or more *modes* (size, stride), outermost first, the dim's index being
row-major over them. A 1-D world unflattened into (2, 2, 2) has dims of one mode each, (2, 4),
(2, 2) and (2, 1); flattening the last two gives one dim of one mode, (4, 1); flattening the
first and last gives one dim of two modes, (2, 4) then (2, 1).

The world mesh is the coarsest mixed radix that every mode of every parameter's mesh is a run
of digits of: its *digits* (its dims) cut the positions at every mode's stride and end. Each
mesh dim is then an *axis*: the digits of its modes, outermost first; a tensor dim sharded on
it is chunked once over the axis's size, its coordinate being row-major over those digits. So
nothing depends on names, and parameters on meshes of different shapes (an FSDP dim that is
``dp_shard`` x ``cp`` beside one that is ``dp_shard`` alone) share one world. Meshes that cut
the ranks in ways no one mixed radix holds (a dim of 2 and a dim of 3 both at stride 1) are
refused, naming the meshes.

Pure integer arithmetic on rank lists: reading them off DeviceMeshes is ``topology``'s.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sharding import Sharding

__all__ = ["Axis", "Mode", "WorldMesh", "modes_of", "world_of"]

Mode = tuple[int, int]  # (size, stride) over positions
Axis = tuple[int, ...]  # world dims (digits), outermost first, flattened into one mesh dim


def modes_of(seq: Sequence[int]) -> list[Mode] | None:
    """The coalesced modes, outermost first, whose row-major walk is ``seq`` (the positions a
    mesh dim visits, relative to the first), or None when ``seq`` walks no such layout with
    positive strides."""
    n = len(seq)
    if n <= 1:
        return []
    stride = seq[1]
    if stride <= 0:
        return None
    # The innermost mode is the longest run of that stride (a run that carries on is the next
    # mode coalesced into it); it must tile the sequence.
    size = 1
    while size < n and seq[size] == size * stride:
        size += 1
    if n % size or any(seq[i] != seq[i - i % size] + (i % size) * stride for i in range(n)):
        return None
    outer = modes_of(seq[::size])
    return None if outer is None else [*outer, (size, stride)]


class WorldMesh:
    """The mesh every DTensor parameter lives on a slice of: ``ranks`` in row-major order over
    ``shape`` (its digits, outermost first). Ranks are found by coordinates and back."""

    def __init__(self, ranks: list[int], shape: tuple[int, ...]) -> None:
        if math.prod(shape) != len(ranks):
            raise ValueError(f"a world mesh of shape {shape} holds {len(ranks)} ranks")
        self.shape = shape
        self._ranks = ranks
        self._at = {r: i for i, r in enumerate(self._ranks)}
        self._strides = [math.prod(self.shape[m + 1 :]) for m in range(len(self.shape))]

    def rank(self, coord: tuple[int, ...]) -> int:
        return self._ranks[sum(c * s for c, s in zip(coord, self._strides, strict=True))]

    def coord(self, rank: int) -> tuple[int, ...]:
        i = self._at[rank]
        return tuple((i // s) % n for s, n in zip(self._strides, self.shape, strict=True))

    def position(self, rank: int) -> int | None:
        """Where ``rank`` is in the world's rank order (None: not in the world)."""
        return self._at.get(rank)

    def axes(self, layout: list[list[Mode]], name: str) -> tuple[Axis, ...]:
        """The axis of each dim of a mesh whose dims walk ``layout`` (per dim, its modes);
        ValueError naming ``name`` when a mode is no run of this world's dims, or two dims
        share one."""
        digit = {s: m for m, s in enumerate(self._strides)}
        ends = {*self._strides, math.prod(self.shape)}
        out = []
        for modes in layout:
            axis: list[int] = []
            for size, stride in modes:  # outermost mode first, its dims outermost first
                if stride not in digit or size * stride not in ends:
                    raise ValueError(
                        f"{name}: its dims (as (size, stride) over the ranks in the root mesh's "
                        f"order: {layout}) do not fit the world mesh {self.shape} that the "
                        "parameters given first were placed on"
                    )
                axis += [digit[s] for s in self._strides if stride <= s < size * stride]
            out.append(tuple(axis))
        used = [m for a in out for m in a]
        if len(used) != len(set(used)):
            raise ValueError(f"{name}: two of its dims span the same ranks ({layout})")
        return tuple(out)

    def holders(
        self, sharding: Sharding, shard: tuple[int, ...], limit: int | None = None
    ) -> list[int]:
        """The ranks holding shard ``shard`` of ``sharding`` (coordinates on its
        ``shard_dims``): every coordinate on the other mesh dims, in mesh order (the first
        ``limit`` of them)."""
        coord = [0] * len(self.shape)
        for m, c in zip(sharding.shard_dims, shard, strict=True):
            coord[m] = c
        free = sharding.replica_dims()
        out = []
        for values in itertools.product(*(range(self.shape[m]) for m in free)):
            for m, c in zip(free, values, strict=True):
                coord[m] = c
            out.append(self.rank(tuple(coord)))
            if len(out) == limit:
                break
        return out

    def source(self, sharding: Sharding, shard: tuple[int, ...], owner: int) -> int:
        """The holder of ``shard`` that sends its gradient to ``owner``: the one whose
        coordinates on the replicating mesh dims are the owner's (under HSDP, the holder in the
        owner's replica group), so that gradients never cross those dims."""
        coord = list(self.coord(owner))
        for m, c in zip(sharding.shard_dims, shard, strict=True):
            coord[m] = c
        return self.rank(tuple(coord))


def world_of(ranks: list[int], layouts: dict[str, list[list[Mode]]]) -> WorldMesh:
    """The world mesh over ``ranks`` (in position order) that holds every mesh of
    ``layouts`` (by a name for messages: per mesh dim, its modes): the coarsest one whose dims
    every mode is a run of. Raises ValueError naming the meshes when no one mixed radix holds
    them all."""
    world = len(ranks)
    cuts = {1, world}
    for layout in layouts.values():
        for size, stride in itertools.chain.from_iterable(layout):
            cuts.update((stride, size * stride))
    order = sorted(cuts)
    if order[-1] != world or any(b % a for a, b in zip(order, order[1:], strict=False)):
        described = "; ".join(f"{name}: {layout}" for name, layout in layouts.items())
        raise ValueError(
            f"the DTensor parameters' meshes cut the {world} ranks in ways no one mesh holds: "
            "every dim's stride and end must divide one another's (dims as (size, stride) "
            f"over the ranks in the root mesh's order): {described}"
        )
    return WorldMesh(ranks, tuple(b // a for a, b in reversed(list(itertools.pairwise(order)))))
