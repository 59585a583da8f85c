"""Exact stage search: the block ranges, replica counts, microbatch count and schedule of least step time."""

from __future__ import annotations

import math

from ..errors import PlanError
from .cost import (
    CostModel,
    StageCost,
    evaluate,
    inflight_microbatches,
    max_replicas,
    microbatch_counts,
    microbatch_rows,
    stage_cost,
    stage_memory,
)
from .pareto import TIE as _TIE
from .pareto import SuffixSearch, relaxed, suffix_key
from .types import SCHEDULES, Plan, PlanProblem, StagePlan

__all__ = [
    "StageCost",
    "evaluate",
    "minimum_memory_needed",
    "plan_stages",
    "required_microbatch_sizes",
    "stage_cost",
]

_GIB = float(2**30)


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


def _schedules(problem: PlanProblem, memory_only: bool = False) -> list[tuple[int, str]]:
    """Schedules worth searching, with their tie-break rank (lower wins).

    With the same stages both schedules have the same step time and fill-drain holds at least the
    memory of 1F1B, so a later schedule only loses tie-breaks to the first one, except 1F1B after
    fill-drain under a memory limit (it may fit where fill-drain does not). For the least memory
    needed only 1F1B matters when it is allowed.
    """
    names: list[str] = []
    for name in problem.schedules:
        if name not in SCHEDULES:
            raise PlanError(f"unknown schedule {name!r}; use one of {SCHEDULES}")
        if name not in names:
            names.append(name)
    if memory_only:
        return [(0, "1f1b" if "1f1b" in names else names[0])]
    ordered = [(0, names[0])]
    if names[0] == "fill_drain" and "1f1b" in names and problem.memory_limit_bytes is not None:
        ordered.append((1, "1f1b"))
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


def _search(problem: PlanProblem, model: CostModel) -> tuple[int, str, list[int], list[int]] | None:
    """Best (microbatches, schedule, last blocks, replicas), or None when nothing fits in memory."""
    stage_counts = _stage_counts(problem)
    found: list[tuple[float, int, int, int, tuple[int, ...], tuple[int, ...], str]] = []
    best = math.inf
    searches = [
        (search.lower_bound(stage_counts), p, sched_rank, search)
        for p in microbatch_counts(problem)
        for sched_rank, schedule in _schedules(problem)
        for search in [SuffixSearch(problem, model, p, schedule)]
    ]
    # Most promising first, so that the cutoff prunes the rest early; a quick beam search of the
    # most promising ones gives a first cutoff. Equal bounds: more microbatches first (less bubble).
    searches.sort(key=lambda item: (item[0], -item[1], item[2]))
    for _, p, _, search in searches[:2]:
        for entries in search.run(stage_counts, relaxed(best), beam=2).values():
            for entry in entries:
                best = min(best, entry[0] + (p - 1) * entry[1] + entry[2])
    for bound, p, sched_rank, search in searches:
        cutoff = relaxed(best)
        if bound > cutoff:
            continue
        for count, entries in search.run(stage_counts, cutoff).items():
            for entry in entries:
                total = entry[0] + (p - 1) * entry[1] + entry[2]
                lasts, reps = suffix_key(entry)
                found.append((total, count, p, sched_rank, lasts, reps, search.schedule))
                best = min(best, total)
    if not found:
        return None
    near = [f for f in found if f[0] <= best + _TIE * abs(best)]
    _, _, p, _, lasts, reps, schedule = min(near, key=lambda f: f[1:6])
    return p, schedule, list(lasts), list(reps)


def _memory_floor(search: SuffixSearch, stage_counts: list[int], cap: float) -> float:
    """Least largest-stage memory over the candidates of one search (cap when none is below cap)."""
    problem = search.problem
    num_blocks, world = len(problem.blocks), problem.world_size
    layers: list[dict[tuple[int, int], float]] = [{(num_blocks, 0): -math.inf}]
    for k in range(1, max(stage_counts) + 1):
        inflight = inflight_microbatches(search.schedule, search.p, k)
        layer: dict[tuple[int, int], float] = {}
        for b in range(num_blocks - k, -1, -1):
            for d in range(k, world + 1):
                if not search.needed(b, d, k, stage_counts):
                    continue
                best = cap
                lasts = range(num_blocks - 1, num_blocks) if k == 1 else range(b, num_blocks - k + 1)
                for j in lasts:
                    for r in range(1, min(search.rmax, d - (k - 1)) + 1):
                        rest = layers[k - 1].get((j + 1, d - r), math.inf)
                        if rest >= best:
                            continue
                        _, _, a_sum, _, io, base = search.rows_by_r[r][b][j - b]
                        best = min(best, max(rest, stage_memory(base, a_sum, inflight, io)))
                if best < cap:
                    layer[(b, d)] = best
        layers.append(layer)
    return min([cap] + [layers[s].get((0, world), math.inf) for s in stage_counts])


def minimum_memory_needed(problem: PlanProblem) -> float:
    """Smallest per-device memory limit (bytes) with which some plan of `problem` is feasible."""
    _check_problem(problem)
    model = CostModel(problem)
    stage_counts = _stage_counts(problem)
    least = math.inf
    done: set[tuple[int, int, str]] = set()
    for p in microbatch_counts(problem):
        for _, schedule in _schedules(problem, memory_only=True):
            # Memory depends on p only through the microbatch rows, the replica cap and the
            # activations in flight (which for 1F1B stop depending on p once p >= the stages).
            key = (
                microbatch_rows(problem.global_batch, p),
                max_replicas(problem.global_batch, p),
                schedule if schedule == "1f1b" and p >= max(stage_counts) else f"{schedule}{p}",
            )
            if key in done:
                continue
            done.add(key)
            least = _memory_floor(SuffixSearch(problem, model, p, schedule), stage_counts, least)
    return least


def memory_error_message(problem: PlanProblem, need: float) -> str:
    """What to tell the user when no plan fits: the least memory that would (GiB, rounded up)."""
    limit = problem.memory_limit_bytes or 0.0
    need_gib = math.ceil(need / _GIB * 1000) / 1000
    return (
        f"no plan fits in {limit / _GIB:.3f} GiB per device for {problem.world_size} rank(s) and "
        f"global batch {problem.global_batch}; the smallest per-device memory that would fit is "
        f"{need_gib:.3f} GiB (after the margin). Set mem_limit_gb higher (it is reduced by "
        "mem_margin), use more ranks, or use a smaller batch"
    )


def plan_stages(problem: PlanProblem) -> Plan:
    """The plan of least predicted step time; PlanError when no plan satisfies the constraints."""
    _check_problem(problem)
    model = CostModel(problem)
    best = _search(problem, model)
    if best is None:
        raise PlanError(memory_error_message(problem, minimum_memory_needed(problem)))
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
