"""Exact stage search: the block ranges, replica counts, microbatch count and schedule of least step time."""

from __future__ import annotations

import math

from ..errors import PlanError
from .cost import (
    CostModel,
    StageCost,
    allreduce_time,
    evaluate,
    inflight_microbatches,
    max_replicas,
    microbatch_counts,
    microbatch_rows,
    stage_cost,
    stage_memory,
    stage_time,
)
from .types import SCHEDULES, Plan, PlanProblem, StagePlan

__all__ = [
    "StageCost",
    "evaluate",
    "minimum_memory_needed",
    "plan_stages",
    "required_microbatch_sizes",
    "stage_cost",
]

# Two step times closer than this (relative) count as equal and the tie-break rules decide.
_TIE = 1e-12
_GIB = float(2**30)

# A Pareto entry for a suffix of stages: (sum t, max t, max AR, last block of its first stage,
# replicas of its first stage, entry of the remaining stages or None).
Entry = tuple[float, float, float, int, int, "Entry | None"]


def required_microbatch_sizes(
    problem_world_size: int, global_batch: int, min_microbatches: int, max_microbatches: int
) -> list[int]:
    """Every per-replica microbatch size m the search may ask costs for, ascending."""
    sizes: set[int] = set()
    for p in range(max(1, min_microbatches), min(global_batch, max_microbatches) + 1):
        rows = microbatch_rows(global_batch, p)
        for r in range(1, min(problem_world_size, max_replicas(global_batch, p)) + 1):
            sizes.add(-(-rows // r))
    return sorted(sizes)


def _stage_counts(problem: PlanProblem) -> list[int]:
    most = min(len(problem.blocks), problem.world_size)
    if problem.num_stages is not None:
        return [problem.num_stages]
    return list(range(1, most + 1))


def _schedules(problem: PlanProblem) -> list[tuple[int, str]]:
    """Schedules worth searching, with their tie-break rank.

    With equal stages, fill-drain has the same step time as 1F1B and at least its memory, so it can
    only win a tie-break, which it loses when 1F1B comes first in `problem.schedules`.
    """
    ordered: list[tuple[int, str]] = []
    for rank, name in enumerate(problem.schedules):
        if name not in SCHEDULES:
            raise PlanError(f"unknown schedule {name!r}; use one of {SCHEDULES}")
        if name == "fill_drain" and "1f1b" in problem.schedules[:rank]:
            continue
        if all(name != seen for _, seen in ordered):
            ordered.append((rank, name))
    return ordered


def _check_problem(problem: PlanProblem) -> None:
    """Raise PlanError when no candidate exists whatever the memory (batch, world size, stage count)."""
    num_blocks, world = len(problem.blocks), problem.world_size
    if num_blocks < 1:
        raise PlanError("the model has no blocks to place; nothing to plan")
    if world < 1:
        raise PlanError(f"world size is {world}; need at least one rank")
    if not problem.schedules:
        raise PlanError("no pipeline schedule allowed; allow '1f1b' or 'fill_drain'")
    _schedules(problem)
    batch = problem.global_batch
    if batch < 1:
        raise PlanError(f"global batch is {batch}; need at least one sample")
    counts = microbatch_counts(problem)
    if not counts:
        raise PlanError(
            f"no microbatch count in [{problem.min_microbatches}, {problem.max_microbatches}] is "
            f"between 1 and the global batch {batch}; lower min_pipeline or raise the batch size"
        )
    forced = problem.num_stages
    if forced is not None:
        if forced < 1:
            raise PlanError(f"forced stage count {forced} must be at least 1")
        if forced > world:
            raise PlanError(
                f"forced stage count {forced} exceeds the world size {world}; every stage needs a "
                "rank: lower partition_num or use more ranks"
            )
        if forced > num_blocks:
            raise PlanError(
                f"forced stage count {forced} exceeds the {num_blocks} blocks the model was cut into; "
                "lower partition_num or raise max_partition_num"
            )
    most_stages = max(_stage_counts(problem))
    if most_stages * max_replicas(batch, counts[0]) < world:
        needed = counts[0] * -(-world // most_stages)
        raise PlanError(
            f"global batch {batch} is too small for {world} ranks with at most {most_stages} stage(s) "
            f"and at least {counts[0]} microbatch(es): every replica of a stage needs a sample of "
            f"every microbatch; use a global batch of at least {needed} or fewer ranks"
        )


class _Search:
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
            self.rows_by_r.append([model.row(i, m) for i in range(num_blocks)])
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

    def _needed(self, b: int, d: int, k: int, stage_counts: list[int]) -> bool:
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
        ar_rows = [[]] + [[self.model.allreduce_row(i, r) for i in range(num_blocks)] for r in range(1, rmax + 1)]
        layers: list[dict[tuple[int, int], list[Entry]]] = [{(num_blocks, 0): [(0.0, 0.0, 0.0, 0, 0, None)]}]
        for k in range(1, most + 1):
            inflight = inflight_microbatches(self.schedule, self.p, k)
            layer: dict[tuple[int, int], list[Entry]] = {}
            below = layers[k - 1]
            for b in range(num_blocks - k, -1, -1):
                floor = self.prefix_floor[b]
                for d in range(k, world + 1):
                    if not self._needed(b, d, k, stage_counts):
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
                    cutoff = min(cutoff, _relaxed(entry[0] + weight * entry[1] + entry[2]))
        return {s: layers[s].get((0, world), []) for s in stage_counts}


def _relaxed(total: float) -> float:
    """Cutoff that keeps every candidate within the tie tolerance of `total`."""
    return total + 1e3 * _TIE * abs(total)


def _suffix_key(entry: Entry | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
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
        eps = _TIE * (a + weight * x + y)
        beaten = False
        for e in kept:
            margin = e[0]
            if e[1] > x:
                margin += weight * (e[1] - x)
            if e[2] > y:
                margin += e[2] - y
            if margin <= a + eps and (margin < a - eps or _suffix_key(e) < _suffix_key(c)):
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
    return margin <= eps and _suffix_key(c) < _suffix_key(e)


def _search(problem: PlanProblem, model: CostModel) -> tuple[int, str, list[int], list[int]] | None:
    """Best (microbatches, schedule, last blocks, replicas), or None when nothing fits in memory."""
    stage_counts = _stage_counts(problem)
    found: list[tuple[float, int, int, int, tuple[int, ...], tuple[int, ...], str]] = []
    best = math.inf
    searches = [
        (search.lower_bound(stage_counts), p, sched_rank, search)
        for p in microbatch_counts(problem)
        for sched_rank, schedule in _schedules(problem)
        for search in [_Search(problem, model, p, schedule)]
    ]
    # Most promising first, so that the cutoff prunes the rest early; a quick beam search of the
    # most promising ones gives a first cutoff.
    searches.sort(key=lambda item: item[:3])
    for _, p, sched_rank, search in searches[:2]:
        for count, entries in search.run(stage_counts, _relaxed(best), beam=2).items():
            for entry in entries:
                best = min(best, entry[0] + (p - 1) * entry[1] + entry[2])
    for bound, p, sched_rank, search in searches:
        cutoff = _relaxed(best)
        if bound > cutoff:
            continue
        for count, entries in search.run(stage_counts, cutoff).items():
            for entry in entries:
                total = entry[0] + (p - 1) * entry[1] + entry[2]
                lasts, reps = _suffix_key(entry)
                found.append((total, count, p, sched_rank, lasts, reps, search.schedule))
                best = min(best, total)
    if not found:
        return None
    near = [f for f in found if f[0] <= best + _TIE * abs(best)]
    _, _, p, _, lasts, reps, schedule = min(near, key=lambda f: f[1:6])
    return p, schedule, list(lasts), list(reps)


def _memory_floor(problem: PlanProblem, model: CostModel, p: int, schedule: str) -> float:
    """Least, over candidates with p microbatches and this schedule, of the largest stage memory."""
    num_blocks, world = len(problem.blocks), problem.world_size
    search = _Search(problem, model, p, schedule)
    stage_counts = _stage_counts(problem)
    layers: list[dict[tuple[int, int], float]] = [{(num_blocks, 0): -math.inf}]
    for k in range(1, max(stage_counts) + 1):
        inflight = inflight_microbatches(schedule, p, k)
        layer: dict[tuple[int, int], float] = {}
        for b in range(num_blocks - k, -1, -1):
            for d in range(k, world + 1):
                if not search._needed(b, d, k, stage_counts):
                    continue
                best = math.inf
                lasts = range(num_blocks - 1, num_blocks) if k == 1 else range(b, num_blocks - k + 1)
                for j in lasts:
                    for r in range(1, min(search.rmax, d - (k - 1)) + 1):
                        rest = layers[k - 1].get((j + 1, d - r), math.inf)
                        if rest >= best:
                            continue
                        _, _, a_sum, _, io, base = search.rows_by_r[r][b][j - b]
                        best = min(best, max(rest, stage_memory(base, a_sum, inflight, io)))
                if best < math.inf:
                    layer[(b, d)] = best
        layers.append(layer)
    return min((layers[s].get((0, world), math.inf) for s in stage_counts), default=math.inf)


def minimum_memory_needed(problem: PlanProblem) -> float:
    """Smallest per-device memory limit (bytes) with which some plan of `problem` is feasible."""
    _check_problem(problem)
    model = CostModel(problem)
    return min(
        _memory_floor(problem, model, p, schedule)
        for p in microbatch_counts(problem)
        for _, schedule in _schedules(problem)
    )


def plan_stages(problem: PlanProblem) -> Plan:
    """The plan of least predicted step time; PlanError when no plan satisfies the constraints."""
    _check_problem(problem)
    model = CostModel(problem)
    best = _search(problem, model)
    if best is None:
        need = minimum_memory_needed(problem)
        limit = problem.memory_limit_bytes or 0.0
        raise PlanError(
            f"no plan fits in {limit / _GIB:.3f} GiB per device for {problem.world_size} rank(s) and "
            f"global batch {problem.global_batch}; the smallest per-device memory that would fit is "
            f"{need / _GIB:.3f} GiB (after the margin). Set mem_limit_gb higher (it is reduced by "
            "mem_margin), use more ranks, or use a smaller batch"
        )
    p, schedule, lasts, reps = best
    ranges, first = [], 0
    for last in lasts:
        ranges.append((first, last))
        first = last + 1
    result = evaluate(problem, ranges, reps, p, schedule, model)
    if result is None:  # pragma: no cover - the search only returns feasible candidates
        raise PlanError("internal error: the chosen plan is not feasible")
    total, costs = result
    stages, rank = [], 0
    for cost in costs:
        stages.append(
            StagePlan(
                first_block=cost.first_block,
                last_block=cost.last_block,
                replicas=cost.replicas,
                ranks=list(range(rank, rank + cost.replicas)),
                microbatch_size=cost.microbatch_size,
                fwd_time=cost.fwd,
                bwd_time=cost.bwd,
                comm_time=cost.comm,
                allreduce_time=cost.allreduce,
                param_bytes=cost.param_bytes,
                activation_bytes=cost.peak_activation_bytes,
                memory_bytes=cost.memory,
            )
        )
        rank += cost.replicas
    return Plan(
        stages=stages,
        microbatches=p,
        schedule=schedule,
        predicted_step_time=total,
        global_batch=problem.global_batch,
        world_size=problem.world_size,
    )
