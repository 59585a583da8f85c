"""The least per-device memory with which some plan is feasible (for the planner's error message).

Binary search over the stage memories that occur, each step a reachability check: which rank
totals can the last k stages from block b use with every stage under the threshold (bit sets over
the rank total, as Python ints).
"""

from __future__ import annotations

import math

import numpy as np

from .cost import inflight_microbatches, microbatch_counts, microbatch_rows, replica_counts
from .tables import StageTables
from .types import PlanProblem


def stage_memories(
    problem: PlanProblem, tables: StageTables, microbatches: int, replicas: list[int], inflight: int
) -> np.ndarray:
    """[r index][first][last]: least peak bytes per rank of every stage (recomputing when allowed
    and smaller), with `inflight` microbatches in flight; inf below the diagonal."""
    rows = microbatch_rows(problem.global_batch, microbatches)
    num_blocks = len(problem.blocks)
    upper = np.arange(num_blocks)[None, :] >= np.arange(num_blocks)[:, None]
    out = np.empty((len(replicas), num_blocks, num_blocks))
    for ri, r in enumerate(replicas):
        table = tables.compute(-(-rows // r))
        base = tables.base(r)
        io = 2 * (table["in"] + table["out"])
        plain = base + table["act"] * inflight + io
        if problem.allow_recompute:
            plain = np.minimum(plain, base + table["in"] * inflight + table["act"] + io)
        out[ri] = np.where(upper, plain, np.inf)
    return out


class _Reach:
    """Reachability of rank totals under one memory threshold for one microbatch count."""

    def __init__(
        self, problem: PlanProblem, replicas: list[int], levels: list[np.ndarray], counts: list[int]
    ):
        self.problem = problem
        self.replicas = replicas
        self.levels = levels  # memory array of layer k is levels[min(k, len) - 1]
        self.counts = counts

    def feasible(self, threshold: float) -> bool:
        problem, replicas = self.problem, self.replicas
        num_blocks, world = len(problem.blocks), problem.world_size
        mask = (1 << (world + 1)) - 1
        counts = set(self.counts)
        most = max(self.counts)
        below: dict[int, int] = {num_blocks: 1}
        allowed_cache: dict[int, list[list[tuple[int, list[int] | None]]]] = {}
        for k in range(1, most + 1):
            level = min(k, len(self.levels)) - 1
            allowed = allowed_cache.get(level)
            if allowed is None:
                allowed = allowed_cache[level] = _allowed(self.levels[level] <= threshold)
            layer: dict[int, int] = {}
            for c, bits in below.items():
                # suffix[ri] = OR over allowed counts from index ri of the child totals shifted by r.
                suffix = [0] * (len(replicas) + 1)
                for ri in range(len(replicas) - 1, -1, -1):
                    suffix[ri] = suffix[ri + 1] | (bits << replicas[ri])
                j = c - 1
                for b in range(j + 1):
                    first, explicit = allowed[b][j]
                    if first < 0:
                        continue
                    if explicit is None:
                        got = suffix[first]
                    else:
                        got = 0
                        for ri in explicit:
                            got |= bits << replicas[ri]
                    got &= mask
                    if got:
                        layer[b] = layer.get(b, 0) | got
            if k in counts and (layer.get(0, 0) >> world) & 1:
                return True
            below = {b: bits for b, bits in layer.items() if b > 0}
            if not below:
                return False
        return False


def _allowed(ok: np.ndarray) -> list[list[tuple[int, list[int] | None]]]:
    """[first][last] -> (first allowed r index or -1, None when every later index is allowed too,
    else the explicit allowed indices)."""
    count = ok.shape[0]
    anyok = ok.any(axis=0)
    first = np.where(anyok, ok.argmax(axis=0), -1)
    tail = ok.sum(axis=0) == count - first
    first_l, tail_l = first.tolist(), tail.tolist()
    out: list[list[tuple[int, list[int] | None]]] = []
    for b, row in enumerate(first_l):
        cells: list[tuple[int, list[int] | None]] = []
        for j, f in enumerate(row):
            if f < 0 or tail_l[b][j]:
                cells.append((f, None))
            else:
                cells.append((f, np.flatnonzero(ok[:, b, j]).tolist()))
        out.append(cells)
    return out


def least_memory(problem: PlanProblem, tables: StageTables, stage_counts: list[int], schedule: str) -> float:
    """Least largest-stage memory over every plan with this schedule (inf when there is no plan)."""
    best = math.inf
    done: set[tuple] = set()
    most = max(stage_counts)
    for p in microbatch_counts(problem):
        replicas = replica_counts(problem, p)
        if not replicas:
            continue
        inflights = sorted({inflight_microbatches(schedule, p, k) for k in range(1, most + 1)})
        key = (microbatch_rows(problem.global_batch, p), tuple(replicas), tuple(inflights))
        if key in done:
            continue
        done.add(key)
        # Layer k holds min(p, k) microbatches with 1F1B (levels by k), p with fill-drain.
        levels = [stage_memories(problem, tables, p, replicas, q) for q in inflights]
        if schedule != "1f1b":
            levels = levels[:1]
        reach = _Reach(problem, replicas, levels, stage_counts)
        values = np.unique(np.concatenate([level[np.isfinite(level) & (level < best)] for level in levels]))
        if values.size == 0 or not reach.feasible(float(values[-1])):
            continue
        low, high = 0, values.size - 1  # values[high] is feasible
        while low < high:
            middle = (low + high) // 2
            if reach.feasible(float(values[middle])):
                high = middle
            else:
                low = middle + 1
        best = float(values[high])
    return best
