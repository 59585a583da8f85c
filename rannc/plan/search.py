"""Exact stage search: the block ranges, replica counts, recompute flags, microbatch count and schedule
of least predicted step time.

The search space: every split of the blocks into contiguous stages (as many as num_stages, the
blocks and the ranks allow), every replica count per stage from replica_choices with the counts
summing to the world size (ranks contiguous in pipeline order), every microbatch count from
microbatch_choices within [min, max], the allowed schedules and, with allow_recompute, recompute per
stage. plan_stages returns a plan of least step time over exactly this space (checked against brute
force in tests/plan); near-ties go to the fewest stages, then fewer microbatches, the schedule listed
first, the smaller block ranges, the smaller replica counts and no recompute.

With `problem.simulate_candidates` > 0 the analytic optimum and, per schedule, the best candidate the search met
and the others it met within SIMULATE_WINDOW of that one (up to simulate_candidates of each) are simulated
(simulate.py) and the least simulated step time wins: the analytic sum
T = sum t_s + (P-1) max t_s + AR is exact for balanced stages only, and leaves out rendezvous waits and the
allreduce of parameters shared between stages.

How: one Pareto dynamic programme over stage suffixes per (microbatch count, schedule) (pareto.py),
pruned with lower bounds (bounds.py) against the best plan so far. Searches run in the order of their
lower bounds and stop once the bound is above the best plan; the first cutoff comes from uniform plans
(heuristic.py) or, without any, from exact runs of the most promising slices under rising cutoffs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from ..errors import PlanError
from ..schedule import Schedule
from .bounds import split_inflight_limit
from .checks import (
    check_problem,
    memory_error_message,
    no_plan_message,
    only_interleaved,
    searched_schedules,
    stage_counts,
)
from .cost import CostModel, evaluate, microbatch_counts, stage_ranges
from .front import TIE as _TIE
from .front import suffix_key
from .heuristic import uniform_candidates
from .interleave import (
    InterleavedSearch,
    best_interleaved,
    interleaved_configs,
    interleaved_memory_message,
    no_interleaved_message,
)
from .memory import fits, fits_floor, least_memory, split_floor
from .pareto import SuffixSearch, relaxed
from .simulate import simulate_plan
from .slices import SearchSlice
from .tables import StageTables
from .types import Plan, PlanProblem, StagePlan

__all__ = ["Candidate", "minimum_memory_needed", "plan_of_candidate", "plan_stages"]

# The simulator re-ranks the candidates within this fraction of the least analytic step time; one must beat an
# earlier (analytically cheaper) one by more than SIMULATE_TIE (relative) to be chosen instead.
SIMULATE_WINDOW = 0.05
SIMULATE_TIE = 1e-9
# Without a first cutoff, the exact runs of step 3 raise theirs by at most this factor at a time.
ESCALATE_STEP = 1.08


class Candidate(NamedTuple):
    """A plan the search met: its analytic step time and what identifies it."""

    step_time: float
    stages: int
    microbatches: int
    schedule_rank: int  # the schedule's tie-break rank (lower wins)
    lasts: tuple[int, ...]  # last block of every stage
    replicas: tuple[int, ...]  # replica count of every stage
    schedule: Schedule

    @property
    def order(self) -> tuple[int, int, int, tuple[int, ...], tuple[int, ...]]:
        """The documented tie-break order: fewest stages, fewer microbatches, the schedule listed first, the
        smaller block ranges, the smaller replica counts."""
        return self.stages, self.microbatches, self.schedule_rank, self.lasts, self.replicas

    def plan(self, problem: PlanProblem, model: CostModel) -> Plan | None:
        """The Plan of this candidate with the cost model's figures (None when it is not feasible)."""
        ranges = stage_ranges(self.lasts)
        return plan_of_candidate(
            problem, ranges, list(self.replicas), self.microbatches, self.schedule, model
        )


class _Searches:
    """The slices of one problem (one SuffixSearch per microbatch count and schedule), run in the order of their
    lower bounds while a bound is under the best step time found so far.

    Bounds are dropped once used and rebuilt when needed again (a 1024-rank problem has dozens of slices); the
    tables slices share (same replica counts and microbatch sizes: the schedules and zero bubble depths of one
    microbatch count) are kept for the few latest (`StageTables.shared`).
    """

    def __init__(self, problem: PlanProblem, model: CostModel) -> None:
        self.problem = problem
        self.stage_counts = stage_counts(problem)
        self.tables = StageTables(model)
        # Zero bubble's stage memory depends on the pipeline's depth: one slice per stage count that may have a
        # plan (`_split_depths`).
        self.slices = [
            (rank, search)
            for p in microbatch_counts(problem)
            for rank, schedule in searched_schedules(problem)
            for depth in (self._split_depths(model, p, schedule) if schedule.splits_backward else [None])
            for search in [SuffixSearch(problem, model, p, schedule, self.tables, depth)]
            if search.replicas
        ]
        self.best = math.inf  # the least analytic step time found so far
        self.found: list[Candidate] = []
        self._floors: dict[tuple[int, int], np.ndarray | None] = {}  # the latest split_floor (see _fits)

    def _split_depths(self, model: CostModel, p: int, schedule: Schedule) -> list[int]:
        """The stage counts D of which a split-backward slice with `p` microbatches may have a plan: D stages whose
        replica counts can sum to the world, and every block in some stage that fits holding min(p, D) microbatches
        (`split_inflight_limit`). Zero bubble holds min(p, D) at every stage, so on a large model most depths fit
        nowhere, and each would cost a slice's bounds and runs to find nothing."""
        probe = SearchSlice(self.problem, model, p, schedule, self.tables, depth=1)
        if not probe.replicas:
            return []
        world, least, most = self.problem.world_size, probe.replicas[0], probe.replicas[-1]
        limit = split_inflight_limit(probe)
        return [
            depth
            for depth in self.stage_counts
            if depth * least <= world <= depth * most and min(p, depth) <= limit
        ]

    def uniform_cutoff(self) -> None:
        """Step 1: the first cutoff, the best uniform plan (K stages of world / K replicas) of every slice. Its
        value only: the exact runs of step 4 find that plan again (its slice's bound is below it)."""
        for _, search in self.slices:
            for uniform in uniform_candidates(search, search.stage_counts(self.stage_counts), self.best):
                if uniform.step_time < self.best:
                    self.best = uniform.step_time
            search.release()

    def queue(self) -> list[tuple[float, int, int, int]]:
        """Step 2: every slice by its lower bound (bound, -P, schedule rank, index), ascending; equal bounds: more
        microbatches first (less bubble)."""
        queued = []
        for index, (rank, search) in enumerate(self.slices):
            bound = search.lower_bound(search.stage_counts(self.stage_counts), relaxed(self.best))
            queued.append((bound, -search.p, rank, index))
            search.release()
        return sorted(queued)

    def _fits(self, index: int) -> bool:
        """Whether some plan of the slice may fit in memory (False: none does; asked only while no plan is known, so
        that a slice where nothing fits is not run: a run that finds nothing under no cutoff can take long)."""
        search = self.slices[index][1]
        if search.depth is not None and search.depth in self.stage_counts:
            # Zero bubble: a necessary condition from one memory table per (P, min(P, depth)), shared by the deep
            # slices, in place of `fits`' table per stage of every depth (an 80-stage slice: 80 tables).
            key = (search.p, min(search.p, search.depth))
            if key not in self._floors:
                self._floors = {key: split_floor(self.problem, self.tables, search.p, search.depth)}
            floor = self._floors[key]
            if floor is not None:
                return fits_floor(self.problem, search.p, search.depth, floor)
        return fits(self.problem, self.tables, search.p, search.schedule, self.stage_counts, search.depth)

    def exact(self, search: SuffixSearch, rank: int, cutoff: float) -> None:
        """One exact run of a slice: every plan of it under `cutoff` becomes a candidate (and may lower `best`)."""
        for count, entries in search.run(search.stage_counts(self.stage_counts), cutoff).items():
            for entry in entries:
                total = search.entry_time(entry)
                lasts, reps = suffix_key(entry)
                self.found.append(Candidate(total, count, search.p, rank, lasts, reps, search.schedule))
                self.best = min(self.best, total)

    def run(self) -> list[Candidate]:
        """Steps 1-4: every candidate the exact runs of the slices met (feasible, found under the cutoff of their
        time); `best` is the least analytic step time. Empty when nothing fits in memory.

        Step 3 (escalation): the slices run under a common cutoff c rising from their least bound by at most
        ESCALATE_STEP at a time, each slice whose bound is under c once per level. A run under a low cutoff prunes
        nearly everything and, finding nothing, proves that its slice has no plan that fast; the uniform plans'
        cutoff is often far above the optimum (sharded stages), and one run under it keeps many more states than
        all the runs under the levels below the optimum together. Step 4, once c reaches the best plan found
        (relaxed): every slice whose bound is under it and that has not run under it yet, under it."""
        self.uniform_cutoff()
        queued = self.queue()
        # slice index -> the cutoff of its latest exact run (every plan under it found)
        searched: dict[int, float] = {}
        # Zero bubble has a slice per depth, dozens of one microbatch count with one bound: they escalate only when
        # there is nothing else, and otherwise run once, in step 4.
        unsplit = [item for item in queued if self.slices[item[3]][1].depth is None]
        escalating = unsplit or queued
        finite = [bound for bound, *_ in escalating if math.isfinite(bound)]
        level = finite[0] * 1.02 if finite else math.inf
        while True:
            final = relaxed(level) >= relaxed(self.best)
            ran = False
            for bound, _, rank, index in queued if final else escalating:
                cutoff = relaxed(self.best) if final else min(relaxed(level), relaxed(self.best))
                if bound > cutoff or math.isinf(bound):
                    break  # sorted by bound: so are the rest (an infinite bound: no plan at all)
                if searched.get(index, -math.inf) >= cutoff:
                    continue
                search = self.slices[index][1]
                if math.isinf(self.best) and index not in searched and not self._fits(index):
                    searched[index] = math.inf  # nothing fits in memory: no plan at all
                    continue
                self.exact(search, rank, cutoff)
                search.release()
                searched[index] = cutoff
                ran = True
            if final and not ran:
                break
            if not final:
                # at last (no plan yet, far above the least bound): every plan of the slices
                level = level * ESCALATE_STEP if level * ESCALATE_STEP < 9 * finite[0] else math.inf
        return self.found


def _analytic_choice(found: list[Candidate], best: float) -> Candidate:
    """The least analytic step time; near-ties by the documented order (Candidate.order)."""
    near = [f for f in found if f.step_time <= best + _TIE * abs(best)]
    return min(near, key=lambda f: f.order)


def _simulated_choice(
    problem: PlanProblem, model: CostModel, found: list[Candidate], best: float
) -> tuple[Plan, float]:
    """The plan of least simulated step time (ties: the earlier candidate) and its simulated step time, over
    `_simulation_pool`'s candidates."""
    chosen: tuple[Plan, float] | None = None
    for candidate in _simulation_pool(problem, found, best):
        plan = candidate.plan(problem, model)
        if plan is None:  # pragma: no cover - the search only lists feasible candidates
            continue
        step = simulate_plan(problem, plan).step_time
        if chosen is None or step < chosen[1] * (1 - SIMULATE_TIE):
            chosen = (plan, step)
    if chosen is None:  # pragma: no cover
        raise PlanError("internal error: no candidate of the search is feasible")
    return chosen


def _simulation_pool(problem: PlanProblem, found: list[Candidate], best: float) -> list[Candidate]:
    """The distinct candidates to simulate: the analytic choice, then per schedule (the analytic choice's first,
    the others by their best analytic time) the first `problem.simulate_candidates` of its best candidate met and
    its others within SIMULATE_WINDOW of that one, by analytic time.

    Per schedule, so that a search over more schedules simulates every candidate a search over some of them
    would (of the candidates both met): a schedule's formula can be off by more than the window (zero bubble's
    with few microbatches, 1F1B's with unbalanced stages), and the window of a faster schedule's optimum would
    leave out the other schedules' candidates."""
    first = _analytic_choice(found, best)
    by_schedule: dict[Schedule, list[Candidate]] = {first.schedule: []}
    for candidate in sorted(found, key=lambda f: (f.step_time, f.order)):
        by_schedule.setdefault(candidate.schedule, []).append(candidate)
    pool, seen = [first], {_identity(first)}
    for schedule, candidates in by_schedule.items():
        leader = first if schedule == first.schedule else candidates[0]
        limit = leader.step_time + SIMULATE_WINDOW * abs(leader.step_time)
        taken = 1 if leader is first else 0
        for candidate in [leader] + [f for f in candidates if f.step_time <= limit]:
            if taken >= problem.simulate_candidates:
                break
            if _identity(candidate) in seen:
                continue
            seen.add(_identity(candidate))
            pool.append(candidate)
            taken += 1
    return pool


def _identity(candidate: Candidate) -> tuple[int, Schedule, tuple[int, ...], tuple[int, ...]]:
    return candidate.microbatches, candidate.schedule, candidate.lasts, candidate.replicas


def minimum_memory_needed(problem: PlanProblem) -> float:
    """Smallest per-device memory limit (bytes) with which some plan of `problem` is feasible."""
    check_problem(problem)
    tables = StageTables(CostModel(problem))
    counts = stage_counts(problem)
    least = min(
        least_memory(problem, tables, counts, schedule)
        for _, schedule in searched_schedules(problem, memory_only=True)
    )
    if math.isinf(least):
        raise PlanError(no_plan_message(problem))
    return least


def plan_stages(problem: PlanProblem) -> Plan:
    """The plan of least predicted step time; PlanError when no plan satisfies the constraints.

    With interleaved 1F1B among the problem's schedules, its best plan (interleave.py) replaces the other
    schedules' when its simulated step time is shorter (the other plan is simulated for the comparison)."""
    check_problem(problem)
    model = CostModel(problem)
    searches = _Searches(problem, model)
    found = searches.run()
    plan: Plan | None = None
    step = math.inf  # the simulated step time of `plan`
    if found:
        best = searches.best
        if problem.simulate_candidates > 0:
            chosen, step = _simulated_choice(problem, model, found, best)
            plan = dataclasses.replace(
                chosen, predicted_step_time=step, analytic_step_time=chosen.predicted_step_time
            )
        else:
            plan = _analytic_choice(found, best).plan(problem, model)
            if plan is None:  # pragma: no cover - the search only returns feasible candidates
                raise PlanError("internal error: the chosen plan is not feasible")
    interleaved: InterleavedSearch | None = None
    if Schedule.INTERLEAVED_1F1B in problem.schedules:
        if plan is not None and math.isinf(step):
            step = simulate_plan(problem, plan).step_time
        interleaved = best_interleaved(problem, model, step)
        if interleaved.plan is not None:
            plan = interleaved.plan
    if plan is None:
        raise PlanError(_no_plan_reason(problem, interleaved))
    return plan


def _no_plan_reason(problem: PlanProblem, interleaved: InterleavedSearch | None) -> str:
    """Why `plan_stages` found no plan: no interleaved choice at all, interleaved 1F1B alone failing where 1F1B
    would fit (minimum_memory_needed stands 1F1B in for it), or too little memory."""
    alone = only_interleaved(problem)
    if alone and not interleaved_configs(problem):
        return no_interleaved_message(problem)
    needed = minimum_memory_needed(problem)
    limit = problem.memory_limit_bytes
    if alone and interleaved is not None and (limit is None or needed <= limit):
        return interleaved_memory_message(problem, interleaved, needed)
    return memory_error_message(problem, needed)


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
                shard=cost.shard,
                bwd_weight_time=cost.bwd_weight,
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
