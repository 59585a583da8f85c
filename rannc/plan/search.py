"""Exact stage search: the block ranges, replica counts, recompute flags, microbatch count and schedule
of least predicted step time.

The search space: every split of the blocks into contiguous stages (as many as num_stages, the
blocks and the ranks allow), every replica count per stage from replica_choices with the counts
summing to the world size (ranks contiguous in pipeline order), every microbatch count from
microbatch_choices within [min, max], the allowed schedules and, with allow_recompute, recompute per
stage. plan_stages returns a plan of least step time over exactly this space (checked against brute
force in tests/plan); near-ties go to the fewest stages, then fewer microbatches, the schedule listed
first, the smaller block ranges, the smaller replica counts and no recompute.

With `problem.simulate_candidates` > 0 the analytic optimum and the other candidates the search met within
SIMULATE_WINDOW of it are simulated (simulate.py) and the least simulated step time wins: the analytic sum
T = sum t_s + (P-1) max t_s + AR is exact for balanced stages only, and leaves out rendezvous waits and the
allreduce of parameters shared between stages.

How: one Pareto dynamic programme over stage suffixes per (microbatch count, schedule) (pareto.py),
pruned with lower bounds (bounds.py) against the best plan so far. Searches run in the order of their
lower bounds and stop once the bound is above the best plan; the first cutoff comes from uniform plans
(heuristic.py).
"""

from __future__ import annotations

import dataclasses
import heapq
import math

from ..errors import PlanError
from ..schedule import Schedule
from .cost import (
    CostModel,
    StageCost,
    evaluate,
    max_replicas,
    microbatch_counts,
    microbatch_rows,
    replica_counts,
    stage_cost,
)
from .heuristic import uniform_candidates
from .memory import fits, least_memory
from .pareto import TIE as _TIE
from .pareto import SuffixSearch, relaxed, suffix_key
from .tables import StageTables
from .types import (
    Plan,
    PlanProblem,
    StagePlan,
    default_microbatch_choices,
    default_replica_choices,
)

__all__ = [
    "StageCost",
    "default_microbatch_choices",
    "default_replica_choices",
    "evaluate",
    "minimum_memory_needed",
    "plan_stages",
    "required_microbatch_sizes",
    "stage_cost",
]

_GIB = float(2**30)
# The simulator re-ranks the candidates within this fraction of the least analytic step time; one must beat an
# earlier (analytically cheaper) one by more than SIMULATE_TIE (relative) to be chosen instead.
SIMULATE_WINDOW = 0.05
SIMULATE_TIE = 1e-9


def required_microbatch_sizes(
    problem_world_size: int,
    global_batch: int,
    min_microbatches: int,
    max_microbatches: int,
    replica_choices: tuple[int, ...] | None = None,
    microbatch_choices: tuple[int, ...] | None = None,
) -> list[int]:
    """Every per-replica microbatch size m the search may ask costs for, ascending."""
    sizes: set[int] = set()
    for p in range(max(1, min_microbatches), min(global_batch, max_microbatches) + 1):
        if microbatch_choices is not None and p not in microbatch_choices:
            continue
        rows = microbatch_rows(global_batch, p)
        for r in range(1, min(problem_world_size, max_replicas(global_batch, p)) + 1):
            if replica_choices is None or r in replica_choices:
                sizes.add(-(-rows // r))
    return sorted(sizes)


def _stage_counts(problem: PlanProblem) -> list[int]:
    most = min(len(problem.blocks), problem.world_size)
    if problem.num_stages is not None:
        return [problem.num_stages]
    return list(range(1, most + 1))


def _schedules(problem: PlanProblem, memory_only: bool = False) -> list[tuple[int, Schedule]]:
    """Schedules worth searching, with their tie-break rank (lower wins).

    With the same stages both schedules have the same step time and fill-drain holds at least the
    memory of 1F1B, so a later schedule only loses tie-breaks to the first one, except 1F1B after
    fill-drain under a memory limit (it may fit where fill-drain does not). For the least memory
    needed only 1F1B matters when it is allowed.
    """
    known = {schedule.value for schedule in Schedule}
    unknown = [name for name in problem.schedules if name not in known]
    if unknown:
        raise PlanError(f"unknown schedule {unknown[0]!r}; use one of {sorted(known)}")
    allowed = list(dict.fromkeys(Schedule(name) for name in problem.schedules))
    one_f_one_b = Schedule.ONE_F_ONE_B
    if memory_only:
        return [(0, one_f_one_b if one_f_one_b in allowed else allowed[0])]
    ordered = [(0, allowed[0])]
    if (
        allowed[0] == Schedule.FILL_DRAIN
        and one_f_one_b in allowed
        and problem.memory_limit_bytes is not None
    ):
        ordered.append((1, one_f_one_b))
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
        among = "" if problem.microbatch_choices is None else f" among {problem.microbatch_choices}"
        raise PlanError(
            f"no microbatch count{among} in [{problem.min_microbatches}, {problem.max_microbatches}] "
            f"is between 1 and the global batch {batch}; lower min_pipeline or raise the batch size"
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
    if problem.gpus_per_node is not None and problem.gpus_per_node < 1:
        raise PlanError(f"gpus_per_node is {problem.gpus_per_node}; need at least 1 (or None)")
    most_stages = max(_stage_counts(problem))
    if most_stages * max_replicas(batch, counts[0]) < world:
        needed = counts[0] * -(-world // most_stages)
        raise PlanError(
            f"global batch {batch} is too small for {world} ranks with at most {most_stages} stage(s) "
            f"and at least {counts[0]} microbatch(es): every replica of a stage needs a sample of "
            f"every microbatch; use a global batch of at least {needed} or fewer ranks"
        )
    if not any(_rank_sums_reach(problem, p) for p in counts):
        raise PlanError(_no_plan_message(problem))


def _rank_sums_reach(problem: PlanProblem, microbatches: int) -> bool:
    """Whether some allowed stage count of allowed replica counts sums to the world size."""
    world = problem.world_size
    mask = (1 << (world + 1)) - 1
    counts = set(_stage_counts(problem))
    replicas = replica_counts(problem, microbatches)
    bits = 1
    for n in range(1, max(counts) + 1):
        shifted = 0
        for r in replicas:
            shifted |= bits << r
        bits = shifted & mask
        if n in counts and (bits >> world) & 1:
            return True
    return False


# (analytic step time, stage count, microbatches, schedule tie rank, last blocks, replicas, schedule)
_Found = tuple[float, int, int, int, tuple[int, ...], tuple[int, ...], str]


def _search(problem: PlanProblem, model: CostModel) -> tuple[list[_Found], float]:
    """Every candidate the search met (feasible, found under its cutoff at the time) and the least analytic
    step time; an empty list when nothing fits in memory."""
    stage_counts = _stage_counts(problem)
    tables = StageTables(model)
    found: list[_Found] = []
    best = math.inf
    searches = [
        (sched_rank, search)
        for p in microbatch_counts(problem)
        for sched_rank, schedule in _schedules(problem)
        for search in [SuffixSearch(problem, model, p, schedule, tables)]
        if search.replicas
    ]

    # Bounds are dropped once used and rebuilt when needed again, so that one set of bound tables is alive at a
    # time (a 1024-rank problem has dozens of searches); consecutive searches often share tables (same replica
    # counts and microbatch sizes: the schedules of one microbatch count), which are then kept for the next.
    def release(index: int) -> None:
        search = searches[index][1]
        following = searches[index + 1][1] if index + 1 < len(searches) else None
        search.release(keep_shared=following is not None and following.shared_key == search.shared_key)

    # First cutoff: the best uniform plan (K stages of world / K replicas) of every search.
    first: list[tuple[float, int, SuffixSearch]] = []
    for index, (sched_rank, search) in enumerate(searches):
        for total, _, _ in uniform_candidates(search, stage_counts, best):
            if total < best:
                best, first = total, [(0.0, sched_rank, search)]
        release(index)
    # Searches by lower bound; equal bounds: more microbatches first (less bubble).
    heap = []
    for index, (sched_rank, search) in enumerate(searches):
        heap.append((search.lower_bound(stage_counts, relaxed(best)), -search.p, sched_rank, index))
        release(index)
    heapq.heapify(heap)
    if first:
        first = [(first[0][2].lower_bound(stage_counts), first[0][1], first[0][2])]

    def next_search() -> tuple[float, int, SuffixSearch] | None:
        while heap:
            bound, _, sched_rank, index = heapq.heappop(heap)
            if bound > relaxed(best):
                return None
            search = searches[index][1]
            if first and search is first[0][2]:
                continue
            # Without any plan yet, first make sure one fits in memory (a search that finds
            # nothing under no cutoff can take long).
            if math.isinf(best) and not fits(problem, tables, search.p, search.schedule, stage_counts):
                continue
            return bound, sched_rank, search
        return None

    pending = list(first)
    if not pending:
        # No uniform plan: a quick beam search of the most promising searches, tight cutoffs first
        # (a failed search under a low cutoff prunes nearly everything).
        pending = [item for item in (next_search(), next_search()) if item is not None]
        for bound, _, search in pending:
            slack = 0.02
            while bound * (1 + slack) < best:
                cutoff = bound * (1 + slack) if slack < 8 else math.inf
                for entries in search.run(stage_counts, relaxed(min(best, cutoff)), beam=2).values():
                    for entry in entries:
                        best = min(best, entry[0] + search.weight * entry[1] + entry[2])
                if cutoff == math.inf:
                    break
                slack *= 2
    while True:
        item = pending.pop(0) if pending else next_search()
        if item is None:
            break
        bound, sched_rank, search = item
        cutoff = relaxed(best)
        if bound <= cutoff:
            for count, entries in search.run(stage_counts, cutoff).items():
                for entry in entries:
                    total = entry[0] + search.weight * entry[1] + entry[2]
                    lasts, reps = suffix_key(entry)
                    found.append((total, count, search.p, sched_rank, lasts, reps, search.schedule))
                    best = min(best, total)
        search.release()  # each search runs once here
    return found, best


def _analytic_choice(found: list[_Found], best: float) -> _Found:
    """The least analytic step time; near-ties by the documented order (key f[1:6])."""
    near = [f for f in found if f[0] <= best + _TIE * abs(best)]
    return min(near, key=lambda f: f[1:6])


def _ranges(lasts: tuple[int, ...]) -> list[tuple[int, int]]:
    ranges, first = [], 0
    for last in lasts:
        ranges.append((first, last))
        first = last + 1
    return ranges


def _simulated_choice(
    problem: PlanProblem, model: CostModel, found: list[_Found], best: float
) -> tuple[Plan, float]:
    """Of the distinct candidates within SIMULATE_WINDOW of the analytic optimum (the analytic choice first,
    then by analytic time), the first `problem.simulate_candidates` simulated: the plan of least simulated
    step time (ties: the earlier candidate) and its simulated step time."""
    from .simulate import simulate_plan  # the simulator imports the cost model this module builds on

    first = _analytic_choice(found, best)
    limit = best + SIMULATE_WINDOW * abs(best)
    ordered = [first] + sorted((f for f in found if f[0] <= limit), key=lambda f: (f[0], f[1:6]))
    seen: set[tuple[int, str, tuple[int, ...], tuple[int, ...]]] = set()
    chosen: tuple[Plan, float] | None = None
    for _, _, p, _, lasts, reps, schedule in ordered:
        identity = (p, schedule, lasts, reps)
        if identity in seen:
            continue
        seen.add(identity)
        plan = plan_of_candidate(problem, _ranges(lasts), list(reps), p, schedule, model)
        if plan is None:  # pragma: no cover - the search only lists feasible candidates
            continue
        step = simulate_plan(problem, plan).step_time
        if chosen is None or step < chosen[1] * (1 - SIMULATE_TIE):
            chosen = (plan, step)
        if len(seen) >= problem.simulate_candidates:
            break
    if chosen is None:  # pragma: no cover
        raise PlanError("internal error: no candidate of the search is feasible")
    return chosen


def minimum_memory_needed(problem: PlanProblem) -> float:
    """Smallest per-device memory limit (bytes) with which some plan of `problem` is feasible."""
    _check_problem(problem)
    tables = StageTables(CostModel(problem))
    _, schedule = _schedules(problem, memory_only=True)[0]
    least = least_memory(problem, tables, _stage_counts(problem), schedule)
    if math.isinf(least):
        raise PlanError(_no_plan_message(problem))
    return least


def _no_plan_message(problem: PlanProblem) -> str:
    return (
        f"no plan exists for {problem.world_size} rank(s), whatever the memory: no allowed stage count "
        f"with replica counts from {problem.replica_choices} (each at most the samples per microbatch) "
        "sums to the world size; allow more replica counts or stage counts"
    )


def memory_error_message(problem: PlanProblem, need: float) -> str:
    """What to tell the user when no plan fits: the least memory that would (GiB, rounded up)."""
    limit = problem.memory_limit_bytes or 0.0
    need_gib = math.ceil(need / _GIB * 1000) / 1000
    return (
        f"no plan fits in {limit / _GIB:.3f} GiB per device for {problem.world_size} rank(s) and "
        f"global batch {problem.global_batch}; the smallest per-device memory that would fit is "
        f"{need_gib:.3f} GiB (after the margin). Give each device more memory (RaNNCModule: mem_limit_gb; "
        "rannc plan: --device-memory; both are reduced by the margin), use more ranks, or use a smaller batch"
    )


def plan_stages(problem: PlanProblem) -> Plan:
    """The plan of least predicted step time; PlanError when no plan satisfies the constraints."""
    _check_problem(problem)
    model = CostModel(problem)
    found, best = _search(problem, model)
    if not found:
        raise PlanError(memory_error_message(problem, minimum_memory_needed(problem)))
    if problem.simulate_candidates > 0:
        plan, step = _simulated_choice(problem, model, found, best)
        return dataclasses.replace(
            plan, predicted_step_time=step, analytic_step_time=plan.predicted_step_time
        )
    _, _, p, _, lasts, reps, schedule = _analytic_choice(found, best)
    plan = plan_of_candidate(problem, _ranges(lasts), list(reps), p, schedule, model)
    if plan is None:  # pragma: no cover - the search only returns feasible candidates
        raise PlanError("internal error: the chosen plan is not feasible")
    return plan


def plan_of_candidate(
    problem: PlanProblem,
    ranges: list[tuple[int, int]],
    replicas: list[int],
    microbatches: int,
    schedule: str,
    model: CostModel | None = None,
) -> Plan | None:
    """The Plan of one candidate (stage block ranges, replicas, microbatches, schedule) with the cost model's
    figures, ranks assigned contiguously in pipeline order; None when the candidate is not feasible."""
    result = evaluate(problem, ranges, replicas, microbatches, schedule, model)
    if result is None:
        return None
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
                recompute=cost.recompute,
            )
        )
        rank += cost.replicas
    return Plan(
        stages=stages,
        microbatches=microbatches,
        schedule=schedule,
        predicted_step_time=total,
        global_batch=problem.global_batch,
        world_size=problem.world_size,
    )
