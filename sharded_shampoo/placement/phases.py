"""When each block computes its roots, with ``stagger_roots``: a phase in ``[0, frequency)``.

Phases are given before owners and from the blocks' shapes alone (canonical order, their root
costs), so they are the same whatever the world size or mode: a block's update does not
depend on who computes it. Longest-processing-time scheduling over the phases: blocks in order
of decreasing root cost (ties: canonical order), each to the phase with the least root work so
far (ties: the lowest phase). Later param groups continue from the earlier groups' phase loads
of the same frequency.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["assign_phases"]


def assign_phases(
    root_costs: Sequence[float], frequency: int, initial: Sequence[float] | None = None
) -> tuple[list[int], list[float]]:
    """``(phase of each block, root work per phase)``; ``initial`` continues earlier loads."""
    loads = list(initial) if initial is not None else [0.0] * frequency
    heap = [(load, p) for p, load in enumerate(loads)]
    heapq.heapify(heap)
    phases = [0] * len(root_costs)
    for i in sorted(range(len(root_costs)), key=lambda i: (-root_costs[i], i)):
        load, p = heapq.heappop(heap)
        phases[i] = p
        loads[p] = load + root_costs[i]
        heapq.heappush(heap, (loads[p], p))
    return phases, loads
