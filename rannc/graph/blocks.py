"""Coarsen atomic units into a few dozen blocks of balanced estimated cost, keeping cheap cuts."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.fx as fx

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


# The share of a device's usable memory the parameter state of one block may take (rannc plan cuts that fine).
BLOCK_STATE_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class StateLimit:
    """Most parameter state a block may hold: `limit` bytes, counting `state_per_byte` bytes of state (parameter,
    gradient, optimizer state) per byte of the parameters and buffers its ops read. A block of a single atomic unit
    (which cannot be cut) may hold more."""

    captured: CapturedGraph
    state_per_byte: float
    limit: float


def cut_blocks(
    analysis: GraphAnalysis,
    flops: dict[str, float],
    global_batch: int,
    max_blocks: int,
    state_limit: StateLimit | None = None,
) -> list[list[str]]:
    """The graph's atomic units merged into at most `max_blocks` blocks of balanced estimated cost (`flops`: forward
    FLOPs per op, from one run of the graph; {} balances by bytes moved alone); with `state_limit`, into as many
    more as it takes for no block to hold more parameter state than it allows."""
    units = atomic_units(analysis)
    op_costs = estimate_op_costs(analysis, flops, global_batch)
    unit_costs = [sum(op_costs[n] for n in unit) for unit in units]
    unit_cuts = [analysis.cut_bytes_per_sample[analysis.position[unit[-1]]] for unit in units]
    if state_limit is None:
        return coarsen(units, unit_costs, unit_cuts, max_blocks)
    held = [b * state_limit.state_per_byte for b in unit_parameter_bytes(state_limit.captured, units)]
    return coarsen(units, unit_costs, unit_cuts, max_blocks, weights=held, cap=state_limit.limit)


def unit_parameter_bytes(captured: CapturedGraph, units: list[list[str]]) -> list[float]:
    """Bytes of the distinct parameters and buffers each unit reads, directly or through the parameter-only ops
    before it (e.g. a transposed weight), which every stage using them recomputes."""
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    sizes: dict[str, tuple[str, float]] = {}  # placeholder -> (canonical name, bytes)
    for name, fqn in (*captured.params.items(), *captured.buffers.items()):
        val = nodes[name].meta.get("val")
        if isinstance(val, torch.Tensor):
            sizes[name] = (fqn, float(val.numel() * val.element_size()))
    member = {name for unit in units for name in unit}
    reads: dict[str, frozenset[str]] = {}  # non-unit node -> the parameter placeholders it reads

    def read_by(node: fx.Node) -> frozenset[str]:
        found = reads.get(node.name)
        if found is None:
            if node.name in sizes:
                found = frozenset((node.name,))
            elif node.op == "placeholder" or node.name in member:
                found = frozenset()
            else:
                found = frozenset().union(*(read_by(arg) for arg in node.all_input_nodes))
            reads[node.name] = found
        return found

    out = []
    for unit in units:
        used: set[str] = set()
        for name in unit:
            for arg in nodes[name].all_input_nodes:
                used |= read_by(arg)
        out.append(sum(dict(sizes[p] for p in used).values()))
    return out


def block_count(captured: CapturedGraph, usable: float, opt_param_factor: float, max_blocks: int) -> int:
    """max_blocks, raised so that an average block holds at most BLOCK_STATE_SHARE of a device of parameter state
    (`cut_blocks` with a StateLimit makes sure no block holds more)."""
    vals = {fqn: n.meta["val"] for n in captured.gm.graph.nodes if (fqn := captured.params.get(n.name))}
    vals |= {fqn: n.meta["val"] for n in captured.gm.graph.nodes if (fqn := captured.buffers.get(n.name))}
    state = sum(v.numel() * v.element_size() for v in vals.values()) * (2 + opt_param_factor)
    return max(max_blocks, math.ceil(state / (BLOCK_STATE_SHARE * usable)))


def coarsen(
    units: list[list[str]],
    unit_costs: list[float],
    cut_bytes: list[float],
    max_blocks: int,
    comm_weight: float = 1.0,
    weights: list[float] | None = None,
    cap: float = math.inf,
) -> list[list[str]]:
    """Group neighbouring units into at most `max_blocks` contiguous blocks, or, when the summed `weights` of a
    block of several units may not exceed `cap`, as many more as that takes.

    A dynamic program over contiguous partitions minimises sum((block cost / ideal cost)^2), which balances
    the blocks, plus `comm_weight` x (bytes of each boundary / the largest boundary), which keeps expensive
    cuts inside blocks. `cut_bytes[k]` is the traffic across the boundary after unit k. Neighbours in a
    topological order never form a cycle, so every block is a convex piece of the graph.
    """
    if max_blocks < 1:
        raise ValueError("max_blocks must be >= 1")
    capped = weights is not None and math.isfinite(cap)
    if capped:
        max_blocks = max(max_blocks, _fewest_blocks(weights, cap))  # type: ignore[arg-type]
    if len(units) <= max_blocks:
        return [list(u) for u in units]
    # The pairwise pre-merge loses cheap cuts (merging the small ops at a layer's end moves its boundaries onto
    # the costlier cuts beside them): it is skipped when the banded programme takes every unit at a small cost.
    banded = capped and _banded_fits(weights, cap, len(units))  # type: ignore[arg-type]
    limit = _BANDED_LIMIT if banded else _DP_LIMIT
    members, costs, cuts, held = _premerge(units, unit_costs, cut_bytes, limit, weights, cap)
    n, k_blocks = len(members), min(max_blocks, len(members))
    if capped:
        k_blocks = max(k_blocks, _fewest_blocks(list(held), cap))
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    ideal = max(prefix[-1] / k_blocks, 1e-30)
    top = max(float(cuts.max()), 1e-30) if cuts.size else 1.0
    cut_at = np.zeros(n + 1)
    cut_at[1:n] = comm_weight * cuts[: n - 1] / top  # penalty of a boundary before unit s
    if capped:
        # A block of several units over the cap is not allowed: block ends e start at units s >= first[e] only.
        first = _first_starts(held, cap)
        width = int((np.arange(n + 1) - first).max())
        if _BANDED and _banded_pays(width, n):  # the same programme over the allowed starts only
            bounds = _banded_partition(prefix, cut_at, ideal, first, width, k_blocks)
            return [sum(members[a:b], []) for a, b in zip(bounds, bounds[1:])]
    span = ((prefix[None, :] - prefix[:, None]) / ideal) ** 2  # span[s, e]: cost of a block of units s..e-1
    if capped:
        span[np.arange(n + 1)[:, None] < first[None, :]] = np.inf
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


def _banded_partition(
    prefix: np.ndarray, cut_at: np.ndarray, ideal: float, first: np.ndarray, width: int, k_blocks: int
) -> list[int]:
    """`coarsen`'s dynamic programme when a block ending before unit e may start at units first[e]..e-1 only, at
    most `width` of them: the same sums and the same choices (ties: the smallest start), over width x units
    candidates instead of units^2. Returns the block bounds 0 = b0 < b1 < ... < n."""
    n = len(prefix) - 1
    ends = np.arange(n + 1)
    starts = (
        ends[None, :] - np.arange(width, 0, -1)[:, None]
    )  # [row][e]: starts ascending, e - width .. e - 1
    valid = (starts >= first[None, :]) & (starts >= 0)
    safe = np.maximum(starts, 0)
    span = np.where(valid, ((prefix[None, :] - prefix[safe]) / ideal) ** 2, np.inf)
    # one block covering units 0..e-1 (as the whole programme's span[0])
    best = np.where((first == 0) & (ends >= 1), ((prefix - prefix[0]) / ideal) ** 2, np.inf)
    columns = np.arange(n + 1)
    choices = []
    for _ in range(1, k_blocks):
        before = best + cut_at
        total = before[safe] + span
        picked = np.argmin(total, axis=0)
        best = total[picked, columns]
        choices.append(starts[picked, columns])
    bounds, end = [n], n
    for choice in reversed(choices):
        end = int(choice[end])
        bounds.append(end)
    bounds.append(0)
    return sorted(set(bounds))


_BANDED = True  # capped blocks: the programme over the allowed starts only (tests compare both)
_DP_LIMIT = 1500  # units handled exactly; larger graphs are first merged pairwise down to this
_BANDED_LIMIT = 20_000  # the same when the banded programme runs (its work grows with units x band width)
_DP_COLUMNS = 128  # block ends evaluated at once by the dynamic program


def _banded_pays(width: int, units: int) -> bool:
    """Whether the banded programme (blocks of at most `width` units) is worth running over `units` units."""
    return 4 * width < units


def _banded_fits(weights: list[float], cap: float, units: int) -> bool:
    """Whether `coarsen` runs the banded programme over these `units` un-merged units (weights capped at `cap`)."""
    if not _BANDED or units > _BANDED_LIMIT:
        return False
    first = _first_starts(np.asarray(weights, dtype=np.float64), cap)
    return _banded_pays(int((np.arange(units + 1) - first).max()), units)


def _first_starts(weights: np.ndarray, cap: float) -> np.ndarray:
    """[e]: the first unit a block ending before unit e may start at (a block of several units holds at most
    `cap` of the weights; one unit alone may hold more)."""
    mass = np.concatenate([[0.0], np.cumsum(weights)])
    ends = np.arange(len(weights) + 1)
    first = np.searchsorted(mass, mass - cap * (1 + 1e-12), side="left")
    return np.minimum(first, np.maximum(ends - 1, 0))


def _fewest_blocks(weights: list[float], cap: float) -> int:
    """Fewest contiguous blocks with no block of several units above `cap` (greedy: fill each block)."""
    count, held, empty = 1, 0.0, True
    for w in weights:
        if not empty and held + w > cap * (1 + 1e-12):
            count, held = count + 1, 0.0
        held, empty = held + w, False
    return count


def _premerge(
    units: list[list[str]],
    unit_costs: list[float],
    cut_bytes: list[float],
    limit: int,
    weights: list[float] | None = None,
    cap: float = math.inf,
) -> tuple[list[list[str]], np.ndarray, np.ndarray, np.ndarray]:
    """Merge the cheapest neighbouring pairs (cheap cuts last) until at most `limit` units remain, never making a
    unit whose `weights` add up to more than `cap`."""
    members = [list(u) for u in units]
    costs = np.asarray(unit_costs, dtype=np.float64)
    cuts = np.asarray(cut_bytes[: len(units) - 1], dtype=np.float64)
    held = np.asarray(weights if weights is not None else [0.0] * len(units), dtype=np.float64)
    while len(members) > limit:
        top = max(float(cuts.max()), 1e-30)
        scores = (costs[:-1] + costs[1:]) / max(float(costs.mean()), 1e-30) - 0.5 * cuts / top
        scores[held[:-1] + held[1:] > cap * (1 + 1e-12)] = np.inf
        k = int(np.argmin(scores))
        if not np.isfinite(scores[k]):
            break  # every pair is over the cap: the dynamic programme takes the rest
        members[k] = members[k] + members[k + 1]
        del members[k + 1]
        costs = np.concatenate([costs[:k], [costs[k] + costs[k + 1]], costs[k + 2 :]])
        held = np.concatenate([held[:k], [held[k] + held[k + 1]], held[k + 2 :]])
        cuts = np.concatenate([cuts[:k], cuts[k + 1 :]])
    return members, costs, cuts, held
