"""What the search can be asked: the stage counts, schedules and microbatch sizes of a problem, and the checks (with
their messages) that a problem has any plan at all."""

from __future__ import annotations

import math

from ..errors import PlanError
from ..schedule import Schedule
from .cost import max_replicas, microbatch_counts, microbatch_rows, replica_counts
from .types import PlanProblem

__all__ = [
    "check_problem",
    "memory_error_message",
    "no_plan_message",
    "only_interleaved",
    "required_microbatch_sizes",
    "searched_schedules",
    "stage_counts",
]

_GIB = float(2**30)


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


def stage_counts(problem: PlanProblem) -> list[int]:
    """The stage counts searched: the forced one, or 1 up to the blocks or ranks (the fewer)."""
    most = min(len(problem.blocks), problem.world_size)
    if problem.num_stages is not None:
        return [problem.num_stages]
    return list(range(1, most + 1))


def only_interleaved(problem: PlanProblem) -> bool:
    """Whether interleaved 1F1B is the only schedule the problem allows (the stage search then searches none, and
    `minimum_memory_needed` prices 1F1B in its stead)."""
    return Schedule.INTERLEAVED_1F1B in problem.schedules and not searched_schedules(problem)


def searched_schedules(problem: PlanProblem, memory_only: bool = False) -> list[tuple[int, Schedule]]:
    """Schedules worth searching by the stage search, with their tie-break rank (their place in
    `problem.schedules`, interleaved 1F1B left out; lower wins).

    With the same stages 1F1B and fill-drain have the same step time and fill-drain holds at least the
    memory of 1F1B, so of the two only the one listed first is searched, and 1F1B after fill-drain under a
    memory limit (it may fit where fill-drain does not). Zero bubble (a shorter step, more memory) is always
    searched. For the least memory needed: 1F1B when it is allowed (it holds the least, and stands for
    interleaved 1F1B when that is the only one), otherwise every allowed schedule. Interleaved 1F1B has a
    search of its own (interleave.py): empty when it is the only schedule.
    """
    known = {schedule.value for schedule in Schedule}
    unknown = [name for name in problem.schedules if name not in known]
    if unknown:
        raise PlanError(f"unknown schedule {unknown[0]!r}; use one of {sorted(known)}")
    requested = list(dict.fromkeys(Schedule(name) for name in problem.schedules))
    allowed = [s for s in requested if s != Schedule.INTERLEAVED_1F1B]
    one_f_one_b, fill_drain = Schedule.ONE_F_ONE_B, Schedule.FILL_DRAIN
    if memory_only:
        if one_f_one_b in allowed:
            return [(allowed.index(one_f_one_b), one_f_one_b)]
        return list(enumerate(allowed)) if allowed else [(0, one_f_one_b)]
    both = one_f_one_b in allowed and fill_drain in allowed
    fill_drain_first = both and allowed.index(fill_drain) < allowed.index(one_f_one_b)
    ordered = []
    for rank, schedule in enumerate(allowed):
        if schedule == fill_drain and both and not fill_drain_first:
            continue  # 1F1B: the same step times in less memory, and it wins their ties
        if schedule == one_f_one_b and fill_drain_first and problem.memory_limit_bytes is None:
            continue  # fill-drain: the same step times, and it wins their ties
        ordered.append((rank, schedule))
    return ordered


def check_problem(problem: PlanProblem) -> None:
    """Raise PlanError when no candidate exists whatever the memory (batch, world size, stage count)."""
    num_blocks, world = len(problem.blocks), problem.world_size
    if num_blocks < 1:
        raise PlanError("the model has no blocks to place; nothing to plan")
    if world < 1:
        raise PlanError(f"world size is {world}; need at least one rank")
    if not problem.schedules:
        raise PlanError(
            "no pipeline schedule allowed; allow '1f1b', 'zero_bubble', 'fill_drain' or 'interleaved_1f1b'"
        )
    searched_schedules(problem)
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
    most_stages = max(stage_counts(problem))
    if most_stages * max_replicas(batch, counts[0]) < world:
        needed = counts[0] * -(-world // most_stages)
        raise PlanError(
            f"global batch {batch} is too small for {world} ranks with at most {most_stages} stage(s) "
            f"and at least {counts[0]} microbatch(es): every replica of a stage needs a sample of "
            f"every microbatch; use a global batch of at least {needed} or fewer ranks"
        )
    if not any(_rank_sums_reach(problem, p) for p in counts):
        raise PlanError(no_plan_message(problem))


def _rank_sums_reach(problem: PlanProblem, microbatches: int) -> bool:
    """Whether some allowed stage count of allowed replica counts sums to the world size."""
    world = problem.world_size
    mask = (1 << (world + 1)) - 1
    counts = set(stage_counts(problem))
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


def no_plan_message(problem: PlanProblem) -> str:
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
