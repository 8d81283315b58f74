"""Where blocks are placed: a load-balanced, deterministic block-to-rank assignment.

Longest-processing-time list scheduling: blocks in order of decreasing cost (ties: canonical
order), each to the currently least-loaded rank (ties: the lowest rank). Whenever a block lands
on a rank, that rank was the least loaded, so its load was at most the mean of the blocks placed
so far; hence the most loaded rank ends at most ``mean + largest block`` (the list-scheduling
bound), and at most ``1.05 x mean`` whenever the largest block costs at most 5% of the mean.

The plan depends only on the sequence of block costs given, which every rank derives in the same
canonical order (param groups, parameters, block ids) from the same shapes: no dict or set
iteration order enters it, so every rank and every run computes the same plan.
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


# How many of the least loaded ranks (all loaded no more than the mean) compete for a block on
# memory: enough to even out memory across block shapes, few enough to keep planning fast.
CANDIDATES = 8


def assign_blocks(
    costs: Sequence[float],
    world_size: int,
    initial_loads: Sequence[float] | None = None,
    preferred: Sequence[Sequence[int]] | None = None,
    memory: Sequence[float] | None = None,
    initial_memory: Sequence[float] | None = None,
) -> Assignment:
    """Gives each block (by its cost, in canonical order) an owner among ``world_size`` ranks.

    ``initial_loads`` (and ``initial_memory``) continue an earlier assignment (a param group
    added later): earlier blocks keep their owners. ``preferred[i]`` lists ranks that already
    hold block i's data (FSDP2 shards); the least loaded of them gets the block if its load is
    at most the mean load so far. Otherwise, of the ``CANDIDATES`` least loaded ranks whose load
    is at most that mean, the one holding the least state (``memory[i]`` is block i's) gets it:
    blocks of different shapes cost compute and memory in different proportions, and this
    evens out both. Either way the bound holds: it only needs each block to land on a rank
    loaded no more than the mean of what was placed before it (the least loaded rank always
    is, so there is always a candidate).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = list(initial_loads) if initial_loads is not None else [0.0] * world_size
    mem = list(initial_memory) if initial_memory is not None else [0.0] * world_size
    memory = memory if memory is not None else [0.0] * len(costs)
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    # A heap of (load, rank) with stale entries skipped: loads also change outside the heap
    # when a preferred rank is chosen.
    heap = [(load, r) for r, load in enumerate(loads)]
    heapq.heapify(heap)
    placed = sum(loads)
    owner = [0] * len(costs)
    for i in order:
        r = -1
        bound = placed * (1 + 1e-12)
        if preferred is not None and preferred[i]:
            c = min(preferred[i], key=lambda q: (loads[q], q))
            if loads[c] * world_size <= bound:
                r = c
        if r < 0:
            candidates: list[int] = []
            while heap and len(candidates) < CANDIDATES:
                load, q = heap[0]
                if load != loads[q]:
                    heapq.heappop(heap)  # stale
                    continue
                if candidates and load * world_size > bound:
                    break
                heapq.heappop(heap)
                candidates.append(q)
            r = min(candidates, key=lambda q: (mem[q], loads[q], q))
            for q in candidates:
                if q != r:
                    heapq.heappush(heap, (loads[q], q))
        owner[i] = r
        loads[r] += costs[i]
        mem[r] += memory[i]
        placed += costs[i]
        heapq.heappush(heap, (loads[r], r))
    return Assignment(world_size, tuple(owner), tuple(loads), tuple(mem))
