"""The least per-device memory with which some plan is feasible (for the planner's error message).

Binary search over the stage memories that occur, each step a reachability check: which rank
totals can the last k stages from block b use with every stage under the threshold (bit sets over
the rank total, as Python ints).
"""

from __future__ import annotations

import math

import numpy as np

from ..schedule import Schedule
from .cost import microbatch_counts, microbatch_rows, replica_counts, sent_bytes
from .tables import StageTables
from .types import PlanProblem


def stage_memories(
    problem: PlanProblem,
    tables: StageTables,
    microbatches: int,
    replicas: list[int],
    inflight: int,
    pending: int = 0,
) -> np.ndarray:
    """[r index][first][last]: least peak bytes per rank of every stage (recomputing when allowed
    and smaller), with `inflight` microbatches in flight (and, with split backwards, `pending` of them keeping
    their deferred gradients); inf below the diagonal."""
    rows = microbatch_rows(problem.global_batch, microbatches)
    num_blocks = len(problem.blocks)
    upper = np.arange(num_blocks)[None, :] >= np.arange(num_blocks)[:, None]
    out = np.empty((len(replicas), num_blocks, num_blocks))
    for ri, r in enumerate(replicas):
        table = tables.compute(-(-rows // r))
        io, ins, outs = table["io"], table["in"], table["out"]
        act, deferred = table["act"], table["dfr"]
        sent = sent_bytes(ins, outs, microbatches, inflight)
        again_sent = sent_bytes(ins, outs, microbatches, inflight, recompute=True)
        least = np.full(upper.shape, np.inf)
        for base, step_end in tables.level_states(r):  # every shard level the stage may use
            if pending:  # cost.split_memory's order
                plain = base + act * inflight + deferred * pending + io + sent
                again = base + ins * inflight + (act + deferred) * pending + io + again_sent
            else:
                plain = base + act * inflight + io + sent  # summed in cost.stage's order
                again = base + ins * inflight + act + io + again_sent
            if problem.allow_recompute:
                plain = np.minimum(plain, again)
            least = np.minimum(least, np.maximum(plain, step_end))
        out[ri] = np.where(upper, least, np.inf)
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
        """Whether some plan has every stage's memory <= threshold."""
        problem, replicas = self.problem, self.replicas
        num_blocks, world = len(problem.blocks), problem.world_size
        mask = (1 << (world + 1)) - 1
        counts = set(self.counts)
        most = max(self.counts)
        below: dict[int, int] = {num_blocks: 1}
        cache: dict[int, tuple[np.ndarray, list[list[int]], list[list[bool]]]] = {}
        for k in range(1, most + 1):
            level = min(k, len(self.levels)) - 1
            if level not in cache:
                ok = self.levels[level] <= threshold  # [r index][first][last]
                first = np.where(ok.any(axis=0), ok.argmax(axis=0), -1)
                tail = ok.sum(axis=0) == len(replicas) - first  # every larger count allowed too
                cache[level] = (ok, first.T.tolist(), tail.T.tolist())
            ok, first_by_last, tail_by_last = cache[level]
            layer: dict[int, int] = {}
            for c, bits in below.items():
                j = c - 1
                firsts, tails = first_by_last[j], tail_by_last[j]
                suffix: list[int] | None = None
                for b in range(j + 1):
                    first = firsts[b]
                    if first < 0:
                        continue
                    if tails[b]:
                        if suffix is None:
                            # suffix[ri]: child totals shifted by every count from index ri on.
                            suffix = [0] * (len(replicas) + 1)
                            for ri in range(len(replicas) - 1, -1, -1):
                                suffix[ri] = suffix[ri + 1] | (bits << replicas[ri])
                        got = suffix[first]
                    else:
                        got = 0
                        for ri in np.flatnonzero(ok[:, b, j]).tolist():
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


def _layer_levels(
    problem: PlanProblem,
    tables: StageTables,
    microbatches: int,
    replicas: list[int],
    schedule: Schedule,
    depth: int | None,
    most: int,
) -> tuple[tuple[tuple[int, int], ...], list[np.ndarray]]:
    """The (in flight, pending) counts of the stages k = 1, 2, ... from the end and their stage memories: layer k
    uses entry min(k, len) - 1 (trailing repeats dropped). 1F1B holds min(P, k); fill-drain P; zero bubble in a
    pipeline of `depth` stages min(P, depth), min(P, depth - k + 1) of them keeping deferred gradients."""
    if depth is None:
        keys = [(schedule.inflight(microbatches, k), 0) for k in range(1, most + 1)]
    else:
        keys = [(min(microbatches, depth), min(microbatches, depth - k + 1)) for k in range(1, depth + 1)]
    while len(keys) > 1 and keys[-1] == keys[-2]:
        keys.pop()
    found: dict[tuple[int, int], np.ndarray] = {}
    for key in keys:
        if key not in found:
            found[key] = stage_memories(problem, tables, microbatches, replicas, *key)
    return tuple(keys), [found[key] for key in keys]


def _depths(schedule: Schedule, stage_counts: list[int]) -> list[tuple[int | None, list[int]]]:
    """(depth, stage counts) of the slices a schedule's plans fall into: one for every count, or (split
    backwards, whose memory depends on the depth) one per count."""
    if schedule.splits_backward:
        return [(count, [count]) for count in stage_counts]
    return [(None, stage_counts)]


def least_memory(
    problem: PlanProblem, tables: StageTables, stage_counts: list[int], schedule: Schedule
) -> float:
    """Least largest-stage memory over every plan with this schedule (inf when there is no plan)."""
    best = math.inf
    done: set[tuple] = set()
    most = max(stage_counts)
    for p in microbatch_counts(problem):
        replicas = replica_counts(problem, p)
        if not replicas:
            continue
        for depth, counts in _depths(schedule, stage_counts):
            keys, levels = _layer_levels(problem, tables, p, replicas, schedule, depth, most)
            key = (microbatch_rows(problem.global_batch, p), tuple(replicas), keys, tuple(counts))
            if key in done:
                continue
            done.add(key)
            reach = _Reach(problem, replicas, levels, counts)
            finite = [level[np.isfinite(level) & (level < best)] for level in levels]
            values = np.unique(np.concatenate(finite))
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


def fits(
    problem: PlanProblem,
    tables: StageTables,
    microbatches: int,
    schedule: Schedule,
    stage_counts: list[int],
    depth: int | None = None,
) -> bool:
    """Whether some plan with this microbatch count and schedule (split backwards: of `depth` stages) fits in
    the memory limit."""
    limit = problem.memory_limit_bytes
    replicas = replica_counts(problem, microbatches)
    if limit is None or not replicas:
        return bool(replicas)
    counts = stage_counts if depth is None else [c for c in stage_counts if c == depth]
    if not counts:
        return False
    _, levels = _layer_levels(problem, tables, microbatches, replicas, schedule, depth, max(counts))
    return _Reach(problem, replicas, levels, counts).feasible(limit)


def split_floor(
    problem: PlanProblem, tables: StageTables, microbatches: int, depth: int
) -> np.ndarray | None:
    """Stage memories that bound those of every stage of a split-backward (zero bubble) pipeline of `depth` stages
    from below: min(P, depth) microbatches in flight, one of them keeping its deferred gradients (every stage keeps
    at least one: `fits` counts min(P, depth - k + 1) at the stage k from the end). None when a table has negative
    activation or deferred bytes (holding more would not be larger)."""
    replicas = replica_counts(problem, microbatches)
    rows = microbatch_rows(problem.global_batch, microbatches)
    for r in replicas:
        table = tables.compute(-(-rows // r))
        if (table["dfr"] < 0).any() or (table["act"] + table["dfr"] < 0).any():
            return None
    return stage_memories(problem, tables, microbatches, replicas, min(microbatches, depth), 1)


def fits_floor(problem: PlanProblem, microbatches: int, depth: int, floor: np.ndarray) -> bool:
    """A necessary condition of `fits` for a split-backward slice of `depth` stages, from `split_floor`'s memories:
    False proves that no plan of it fits (cheap: one table instead of one per stage)."""
    limit = problem.memory_limit_bytes
    replicas = replica_counts(problem, microbatches)
    if limit is None or not replicas:
        return bool(replicas)
    return _Reach(problem, replicas, [floor], [depth]).feasible(limit)
