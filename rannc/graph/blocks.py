"""Coarsen atomic units into a few dozen blocks of balanced estimated cost, keeping cheap cuts."""

from __future__ import annotations

import numpy as np

from .analysis import GraphAnalysis

# Nominal device used only to balance blocks before they are measured: the planner sees measured costs.
_NOMINAL_FLOPS = 1e11
_NOMINAL_BYTES_PER_S = 2e10
_OP_OVERHEAD_S = 5e-6


def estimate_op_costs(analysis: GraphAnalysis, flops: dict[str, float], batch: int) -> dict[str, float]:
    """Rough seconds per batch op (FLOPs + bytes written + dispatch overhead); deterministic on every rank."""
    costs: dict[str, float] = {}
    for name in analysis.order:
        info = analysis.values[name]
        written = info.bytes_per_sample * batch + info.fixed_bytes
        costs[name] = flops.get(name, 0.0) / _NOMINAL_FLOPS + written / _NOMINAL_BYTES_PER_S + _OP_OVERHEAD_S
    return costs


def coarsen(
    units: list[list[str]],
    unit_costs: list[float],
    cut_bytes: list[float],
    max_blocks: int,
    comm_weight: float = 0.5,
) -> list[list[str]]:
    """Merge neighbouring units until at most `max_blocks` remain.

    Each round merges the adjacent pair whose combined cost is smallest relative to the mean block cost,
    discounted by how much data their shared boundary carries: balanced blocks, and expensive cuts removed
    first. `cut_bytes[k]` is the traffic across the boundary after unit k. Neighbours in a topological
    order never form a cycle, so every block is a convex piece of the graph.
    """
    if max_blocks < 1:
        raise ValueError("max_blocks must be >= 1")
    members = [list(u) for u in units]
    costs = np.asarray(unit_costs, dtype=np.float64)
    cuts = np.asarray(cut_bytes[: len(units) - 1], dtype=np.float64)
    while len(members) > max_blocks:
        mean_cost = max(float(costs.mean()), 1e-12)
        top_cut = max(float(cuts.max()), 1e-12) if cuts.size else 1.0
        scores = (costs[:-1] + costs[1:]) / mean_cost - comm_weight * cuts / top_cut
        k = int(np.argmin(scores))
        members[k] = members[k] + members[k + 1]
        del members[k + 1]
        costs = np.concatenate([costs[:k], [costs[k] + costs[k + 1]], costs[k + 2 :]])
        cuts = np.concatenate([cuts[:k], cuts[k + 1 :]])
    return members
