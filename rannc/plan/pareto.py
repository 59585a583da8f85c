"""Pareto dynamic programme over stage suffixes for one (microbatch count, schedule) pair."""

from __future__ import annotations

import math

from .cost import (
    CostModel,
    allreduce_time,
    inflight_microbatches,
    max_replicas,
    microbatch_rows,
    stage_memory,
    stage_time,
)
from .types import PlanProblem

# Two step times closer than this (relative) count as equal and the tie-break rules decide.
TIE = 1e-12

# A Pareto entry for a suffix of stages: (sum t, max t, max AR, last block of its first stage,
# replicas of its first stage, entry of the remaining stages or None).
Entry = tuple[float, float, float, int, int, "Entry | None"]


class SuffixSearch:
    """Pareto dynamic programme over suffixes for one (microbatch count, schedule)."""

    def __init__(self, problem: PlanProblem, model: CostModel, microbatches: int, schedule: str) -> None:
        self.problem = problem
        self.model = model
        self.p = microbatches
        self.schedule = schedule
        self.weight = float(microbatches - 1)
        batch = problem.global_batch
        self.rmax = min(problem.world_size, max_replicas(batch, microbatches))
        rows = microbatch_rows(batch, microbatches)
        num_blocks = len(problem.blocks)
        # rows_by_r[r][i][j - i] = (fwd, bwd, act, comm, io, base) of range [i, j] with r replicas.
        self.rows_by_r: list[list[list[tuple[float, float, float, float, float, float]]]] = [[]]
        block_floor = [math.inf] * num_blocks
        block_work = [math.inf] * num_blocks
        for r in range(1, self.rmax + 1):
            m = -(-rows // r)
            self.rows_by_r.append([model.row(i, m, r) for i in range(num_blocks)])
            fwd, bwd, _ = model.block_values(m)
            for blk in range(num_blocks):
                block_floor[blk] = min(block_floor[blk], fwd[blk] + bwd[blk])
                block_work[blk] = min(block_work[blk], r * (fwd[blk] + bwd[blk]))
        # Lower bounds over blocks 0..b-1, whatever the plan: prefix_floor[b] on the summed stage
        # time, prefix_work[b] on the summed replicas x stage time (rank-seconds per microbatch).
        self.prefix_floor = [0.0]
        self.prefix_work = [0.0]
        for value, work in zip(block_floor, block_work):
            self.prefix_floor.append(self.prefix_floor[-1] + value)
            self.prefix_work.append(self.prefix_work[-1] + work)
        # prefix_allreduce[b]: least allreduce time of a replicated stage inside blocks 0..b-1.
        self.prefix_allreduce = [math.inf]
        least = math.inf
        for j in range(num_blocks):
            least = min(least, min(problem.range_param_bytes[i][j] for i in range(j + 1)))
            self.prefix_allreduce.append(allreduce_time(problem, least, 2))

    def needed(self, b: int, d: int, k: int, stage_counts: list[int]) -> bool:
        """Whether some allowed plan has a suffix of k stages on blocks b.. and d ranks."""
        world, num_blocks = self.problem.world_size, len(self.problem.blocks)
        if k > num_blocks - b or not k <= d <= k * self.rmax:
            return False
        for total in stage_counts:
            before = total - k
            if before == 0 and b == 0 and d == world:
                return True
            if before >= 1 and before <= b and before <= world - d <= before * self.rmax:
                return True
        return False

    def lower_bound(self, stage_counts: list[int]) -> float:
        """A lower bound on the step time of every candidate with these microbatches."""
        total = self.prefix_floor[-1]
        biggest = max(b - a for a, b in zip(self.prefix_floor, self.prefix_floor[1:]))
        # The largest stage time is at least the mean stage time and the mean rank-time per rank.
        largest = max(total / max(stage_counts), biggest, self.prefix_work[-1] / self.problem.world_size)
        # With more ranks than stages some stage is replicated and pays an allreduce.
        replicated = self.problem.world_size > max(stage_counts)
        return total + self.weight * largest + (self.prefix_allreduce[-1] if replicated else 0.0)

    def run(self, stage_counts: list[int], cutoff: float, beam: int = 0) -> dict[int, list[Entry]]:
        """Pareto entries of every allowed stage count whose step time may be <= cutoff.

        With beam > 0 only the `beam` most promising entries of each state are kept: a quick
        heuristic whose results are real candidates (an upper bound), not the exact optimum.
        """
        problem = self.problem
        num_blocks, world = len(problem.blocks), problem.world_size
        limit = problem.memory_limit_bytes
        weight, rmax = self.weight, self.rmax
        most = max(stage_counts)
        ar_rows = [[]] + [
            [self.model.allreduce_row(i, r) for i in range(num_blocks)] for r in range(1, rmax + 1)
        ]
        layers: list[dict[tuple[int, int], list[Entry]]] = [{(num_blocks, 0): [(0.0, 0.0, 0.0, 0, 0, None)]}]
        for k in range(1, most + 1):
            inflight = inflight_microbatches(self.schedule, self.p, k)
            layer: dict[tuple[int, int], list[Entry]] = {}
            below = layers[k - 1]
            for b in range(num_blocks - k, -1, -1):
                floor = self.prefix_floor[b]
                for d in range(k, world + 1):
                    if not self.needed(b, d, k, stage_counts):
                        continue
                    # The stages before this suffix (at most `before` of them on world - d ranks)
                    # add at least `floor` to the summed time; their largest stage time is at least
                    # their mean and their rank-seconds per rank; with spare ranks one replicates.
                    before = min(b, world - d, most - k)
                    before_max = max(floor / before, self.prefix_work[b] / (world - d)) if before else 0.0
                    before_ar = self.prefix_allreduce[b] if world - d > before else 0.0
                    lasts = range(num_blocks - 1, num_blocks) if k == 1 else range(b, num_blocks - k + 1)
                    low_r, high_r = max(1, d - (k - 1) * rmax), min(rmax, d - (k - 1))
                    candidates: list[Entry] = []
                    for j in lasts:
                        for r in range(low_r, high_r + 1):
                            children = below.get((j + 1, d - r))
                            if not children:
                                continue
                            f_sum, b_sum, a_sum, comm, io, base = self.rows_by_r[r][b][j - b]
                            if limit is not None and stage_memory(base, a_sum, inflight, io) > limit:
                                continue
                            t = stage_time(f_sum, b_sum, comm)
                            ar = ar_rows[r][b][j - b]
                            # Children are sorted by summed time: bound the whole group first.
                            least = children[0][0] + t + floor
                            bound_x = max(t, before_max, least / (k + before))
                            if least + weight * bound_x + max(ar, before_ar) > cutoff:
                                continue
                            for child in children:
                                a, x, y = child[0] + t, child[1], child[2]
                                if t > x:
                                    x = t
                                if ar > y:
                                    y = ar
                                bound_x = max(x, before_max, (a + floor) / (k + before))
                                if a + floor + weight * bound_x + max(y, before_ar) > cutoff:
                                    continue
                                candidates.append((a, x, y, j, r, child if k > 1 else None))
                    if candidates:
                        kept = _pareto(candidates, weight)
                        if beam and len(kept) > beam:
                            best = sorted(kept, key=lambda e: e[0] + weight * e[1] + e[2])[:beam]
                            kept = sorted(best, key=_triple)
                        layer[(b, d)] = kept
            layers.append(layer)
            if k in stage_counts:
                for entry in layer.get((0, world), ()):
                    cutoff = min(cutoff, relaxed(entry[0] + weight * entry[1] + entry[2]))
        return {s: layers[s].get((0, world), []) for s in stage_counts}


def relaxed(total: float) -> float:
    """Cutoff that keeps every candidate within the tie tolerance of `total`."""
    return total + 1e3 * TIE * abs(total)


def suffix_key(entry: Entry | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lasts: list[int] = []
    reps: list[int] = []
    while entry is not None:
        lasts.append(entry[3])
        reps.append(entry[4])
        entry = entry[5]
    return tuple(lasts), tuple(reps)


def _pareto(candidates: list[Entry], weight: float) -> list[Entry]:
    """Drop candidates that another candidate beats whatever the stages before them.

    e beats c when e.sum + w * (e.max_t - c.max_t)^+ + (e.max_ar - c.max_ar)^+ <= c.sum, since then
    any common prefix gives e a step time no larger than c's; near-ties go to the smaller layout.
    """
    candidates.sort(key=_triple)
    kept: list[Entry] = []
    for c in candidates:
        a, x, y = c[0], c[1], c[2]
        eps = TIE * (a + weight * x + y)
        beaten = False
        for e in kept:
            margin = e[0]
            if e[1] > x:
                margin += weight * (e[1] - x)
            if e[2] > y:
                margin += e[2] - y
            if margin <= a + eps and (margin < a - eps or suffix_key(e) < suffix_key(c)):
                beaten = True
                break
        if beaten:
            continue
        # c can beat an earlier (smaller-sum) entry only in a near-tie.
        while kept and kept[-1][0] >= a - eps and _near_beats(c, kept[-1], weight, eps):
            kept.pop()
        kept.append(c)
    return kept


def _triple(entry: Entry) -> tuple[float, float, float]:
    return entry[0], entry[1], entry[2]


def _near_beats(c: Entry, e: Entry, weight: float, eps: float) -> bool:
    margin = c[0] + weight * max(c[1] - e[1], 0.0) + max(c[2] - e[2], 0.0) - e[0]
    return margin <= eps and suffix_key(c) < suffix_key(e)
