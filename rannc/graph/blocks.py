"""Coarsen atomic units into a few dozen blocks of balanced estimated cost, keeping cheap cuts."""

from __future__ import annotations

import math

import numpy as np

from ..capture import CapturedGraph
from .analysis import GraphAnalysis, atomic_units

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


def cut_blocks(
    analysis: GraphAnalysis, flops: dict[str, float], global_batch: int, max_blocks: int
) -> list[list[str]]:
    """The graph's atomic units merged into at most `max_blocks` blocks of balanced estimated cost (`flops`: forward
    FLOPs per op, from one run of the graph; {} balances by bytes moved alone)."""
    units = atomic_units(analysis)
    op_costs = estimate_op_costs(analysis, flops, global_batch)
    unit_costs = [sum(op_costs[n] for n in unit) for unit in units]
    unit_cuts = [analysis.cut_bytes_per_sample[analysis.position[unit[-1]]] for unit in units]
    return coarsen(units, unit_costs, unit_cuts, max_blocks)


def block_count(captured: CapturedGraph, usable: float, opt_param_factor: float, max_blocks: int) -> int:
    """max_blocks, raised so that an average block holds at most half a device of parameter state."""
    vals = {fqn: n.meta["val"] for n in captured.gm.graph.nodes if (fqn := captured.params.get(n.name))}
    vals |= {fqn: n.meta["val"] for n in captured.gm.graph.nodes if (fqn := captured.buffers.get(n.name))}
    state = sum(v.numel() * v.element_size() for v in vals.values()) * (2 + opt_param_factor)
    return max(max_blocks, math.ceil(2 * state / usable))


def coarsen(
    units: list[list[str]],
    unit_costs: list[float],
    cut_bytes: list[float],
    max_blocks: int,
    comm_weight: float = 1.0,
) -> list[list[str]]:
    """Group neighbouring units into at most `max_blocks` contiguous blocks.

    A dynamic program over contiguous partitions minimises sum((block cost / ideal cost)^2), which balances
    the blocks, plus `comm_weight` x (bytes of each boundary / the largest boundary), which keeps expensive
    cuts inside blocks. `cut_bytes[k]` is the traffic across the boundary after unit k. Neighbours in a
    topological order never form a cycle, so every block is a convex piece of the graph.
    """
    if max_blocks < 1:
        raise ValueError("max_blocks must be >= 1")
    if len(units) <= max_blocks:
        return [list(u) for u in units]
    members, costs, cuts = _premerge(units, unit_costs, cut_bytes, _DP_LIMIT)
    n, k_blocks = len(members), min(max_blocks, len(members))
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    ideal = max(prefix[-1] / k_blocks, 1e-30)
    top = max(float(cuts.max()), 1e-30) if cuts.size else 1.0
    cut_at = np.zeros(n + 1)
    cut_at[1:n] = comm_weight * cuts[: n - 1] / top  # penalty of a boundary before unit s
    span = ((prefix[None, :] - prefix[:, None]) / ideal) ** 2  # span[s, e]: cost of a block of units s..e-1
    span[np.tril_indices(n + 1)] = np.inf  # need s < e
    best = span[0].copy()  # one block covering units 0..e-1
    choices = []
    for _ in range(1, k_blocks):
        # best over s of best[s] + cut_at[s] + span[s, e], a slice of columns at a time: the whole (n+1)^2 sum
        # at once held tens of MiB more while planning large models
        before = best + cut_at
        choice = np.empty(n + 1, dtype=np.intp)
        reached = np.empty(n + 1)
        for first in range(0, n + 1, _DP_COLUMNS):
            total = before[:, None] + span[:, first : first + _DP_COLUMNS]
            picked = np.argmin(total, axis=0)
            choice[first : first + _DP_COLUMNS] = picked
            reached[first : first + _DP_COLUMNS] = total[picked, np.arange(total.shape[1])]
        best = reached
        choices.append(choice)
    bounds, end = [n], n
    for choice in reversed(choices):
        end = int(choice[end])
        bounds.append(end)
    bounds.append(0)
    bounds = sorted(set(bounds))
    return [sum(members[a:b], []) for a, b in zip(bounds, bounds[1:])]


_DP_LIMIT = 1500  # units handled exactly; larger graphs are first merged pairwise down to this
_DP_COLUMNS = 128  # block ends evaluated at once by the dynamic program


def _premerge(
    units: list[list[str]], unit_costs: list[float], cut_bytes: list[float], limit: int
) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Merge the cheapest neighbouring pairs (cheap cuts last) until at most `limit` units remain."""
    members = [list(u) for u in units]
    costs = np.asarray(unit_costs, dtype=np.float64)
    cuts = np.asarray(cut_bytes[: len(units) - 1], dtype=np.float64)
    while len(members) > limit:
        top = max(float(cuts.max()), 1e-30)
        scores = (costs[:-1] + costs[1:]) / max(float(costs.mean()), 1e-30) - 0.5 * cuts / top
        k = int(np.argmin(scores))
        members[k] = members[k] + members[k + 1]
        del members[k + 1]
        costs = np.concatenate([costs[:k], [costs[k] + costs[k + 1]], costs[k + 2 :]])
        cuts = np.concatenate([cuts[:k], cuts[k + 1 :]])
    return members, costs, cuts
