"""Where blocks are placed: a deterministic block-to-rank assignment balancing compute and memory.

Blocks are taken in order of decreasing cost (ties: canonical order). Each goes to the rank that
keeps the job most even: the one minimizing ``max(load / mean load, memory / mean memory)``
after taking it, where the means are those of the final assignment (known in advance: the sums
divided by the world size). Compute and memory do not follow each other across block shapes
(a 1-D block of 1024 holds a 1024 x 1024 factor but costs almost no matrix products), so
balancing compute alone leaves the ranks that end a little short on compute with many such
blocks, and 1.2x the mean memory (Llama-8B shapes at 512 ranks); balancing both keeps memory
within a few percent. Without memory figures this is longest-processing-time list scheduling:
each block to the least loaded rank (ties: the lowest rank).

The bound: a rank only takes a block if its load stays at most ``mean + largest block``; the
least loaded rank always qualifies (its load is at most the mean), so there is always a
candidate, and no rank ends above ``mean + largest block`` (hence at most ``1.05 x mean``
whenever the largest block costs at most 5% of the mean).

Candidates per block, so that planning stays O(blocks x log(world)): the least loaded rank, the
``CANDIDATES`` ranks holding the least memory, and the block's preferred ranks (DTensor
parameters: ranks already holding its largest piece, which then send less of it). A preferred
rank wins whenever taking the block leaves both its load and its memory at most the mean.

The plan depends only on the sequences given, which every rank derives in the same canonical
order (param groups, parameters, block ids) from the same shapes: no dict or set iteration order
enters it, so every rank and every run computes the same plan.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Assignment", "assign_blocks"]


@dataclass(frozen=True)
class Assignment:
    """``owner[i]`` is the rank of block ``i`` (canonical order); ``loads[r]`` its total cost
    and ``memory[r]`` its total state elements."""

    world_size: int
    owner: tuple[int, ...]
    loads: tuple[float, ...]
    memory: tuple[float, ...]


# How many of the ranks holding the least memory compete for each block.
CANDIDATES = 4


class _Heap:
    """Ranks by one of their figures, lowest first; entries made stale by an update are
    skipped when they surface."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.heap = [(v, r) for r, v in enumerate(values)]
        heapq.heapify(self.heap)

    def lowest(self, n: int) -> list[int]:
        """Up to ``n`` ranks with the lowest values, lowest first (left in the heap)."""
        out: list[tuple[float, int]] = []
        while self.heap and len(out) < n:
            v, r = heapq.heappop(self.heap)
            if v == self.values[r]:
                out.append((v, r))
        for entry in out:
            heapq.heappush(self.heap, entry)
        return [r for _, r in out]

    def changed(self, r: int) -> None:
        heapq.heappush(self.heap, (self.values[r], r))


def assign_blocks(
    costs: Sequence[float],
    world_size: int,
    initial_loads: Sequence[float] | None = None,
    preferred: Sequence[Sequence[int]] | None = None,
    memory: Sequence[float] | None = None,
    initial_memory: Sequence[float] | None = None,
    phases: Sequence | None = None,
    root_costs: Sequence[float] | None = None,
    roots: dict | None = None,
) -> Assignment:
    """Gives each block (by its cost, in canonical order) an owner among ``world_size`` ranks.

    ``initial_loads`` and ``initial_memory`` continue an earlier assignment (a param group added
    later): earlier blocks keep their owners, and the balance is that of all blocks together.
    ``memory[i]`` is block i's state elements; ``preferred[i]`` lists ranks that already hold
    block i's data (see the module docstring).

    Staggered roots: ``phases[i]`` (a key, or None) is the step of the period in which block i
    computes its roots, at cost ``root_costs[i]``; each rank's root work per phase is a third
    figure balanced like the other two. ``roots[key]`` (per rank) holds the earlier groups'
    root work per phase and is updated in place.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = list(initial_loads) if initial_loads is not None else [0.0] * world_size
    mem = list(initial_memory) if initial_memory is not None else [0.0] * world_size
    memory = memory if memory is not None else [0.0] * len(costs)
    mean_load = (sum(loads) + sum(costs)) / world_size
    mean_mem = (sum(mem) + sum(memory)) / world_size
    # Relative slack: sums of floats in another order must not exclude the least loaded rank.
    cap = (mean_load + max(costs, default=0.0)) * (1 + 1e-12)
    by_load, by_memory = _Heap(loads), _Heap(mem)
    roots = roots if roots is not None else {}
    phases = phases if phases is not None else [None] * len(costs)
    mean_root: dict = {}
    for i, key in enumerate(phases):
        if key is not None:
            mean_root[key] = mean_root.get(key, 0.0) + root_costs[i] / world_size
    for key in mean_root:
        mean_root[key] += sum(roots.setdefault(key, [0.0] * world_size)) / world_size
    by_root = {key: _Heap(roots[key]) for key in mean_root}

    def score(r: int, i: int) -> tuple[float, float, int]:
        a = (loads[r] + costs[i]) / mean_load if mean_load > 0 else 0.0
        b = (mem[r] + memory[i]) / mean_mem if mean_mem > 0 else 0.0
        key = phases[i]
        c = 0.0
        if key is not None and mean_root[key] > 0:
            c = (roots[key][r] + root_costs[i]) / mean_root[key]
        return max(a, b, c), loads[r], r

    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    owner = [0] * len(costs)
    for i in order:
        candidates = by_load.lowest(1)
        if mean_mem > 0:
            candidates += by_memory.lowest(CANDIDATES)
        key = phases[i]
        if key is not None:
            candidates += by_root[key].lowest(CANDIDATES)
        fits = [r for r in candidates if loads[r] + costs[i] <= cap]
        r = min(fits, key=lambda q: score(q, i))
        if preferred is not None and preferred[i]:
            own = min(preferred[i], key=lambda q: score(q, i))
            if score(own, i)[0] <= max(1.0, score(r, i)[0]) and loads[own] + costs[i] <= cap:
                r = own
        owner[i] = r
        loads[r] += costs[i]
        mem[r] += memory[i]
        by_load.changed(r)
        by_memory.changed(r)
        if key is not None:
            roots[key][r] += root_costs[i]
            by_root[key].changed(r)
    return Assignment(world_size, tuple(owner), tuple(loads), tuple(mem))
