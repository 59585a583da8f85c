"""The search's shortcuts on large problems stay exact: zero bubble depths dropped before they are built (no stage
can hold their microbatches, or their replica counts cannot sum to the world) and the escalation of every slice
under a common cutoff below the uniform plans' one; each on random instances against brute force, with zero bubble
and sharding."""

from __future__ import annotations

import dataclasses

import pytest
from plan_brute import brute_best, with_zero_bubble
from plan_cases import random_extended_problem
from test_search import check_against_brute
from test_sharding import brute_by_rule, sharded_problem

from rannc.errors import PlanError
from rannc.plan import plan_stages
from rannc.plan import search as search_module
from rannc.plan.checks import searched_schedules
from rannc.plan.cost import CostModel, microbatch_counts, replica_counts
from rannc.plan.pareto import relaxed
from rannc.schedule import Schedule


def _dropped_depths(problem) -> int:  # type: ignore[no-untyped-def]
    """Zero bubble slices (microbatch count, depth) with replica counts that the search leaves out."""
    if Schedule.ZERO_BUBBLE not in [s for _, s in searched_schedules(problem)]:
        return 0
    searches = search_module._Searches(problem, CostModel(problem))
    kept = sum(search.depth is not None for _, search in searches.slices)
    counts = searches.stage_counts
    every = sum(len(counts) for p in microbatch_counts(problem) if replica_counts(problem, p))
    return every - kept


def test_dropped_zero_bubble_depths_keep_the_search_exact() -> None:
    dropped = feasible = 0
    for seed in range(120):
        problem, candidates = random_extended_problem(seed)
        if not _dropped_depths(problem):
            continue
        dropped += 1
        feasible += check_against_brute(problem, brute_best(problem, candidates), seed)
    assert dropped >= 15 and feasible >= 5


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(2))
def test_sharded_zero_bubble_matches_brute_force(chunk: int) -> None:
    """Sharding (the cost model's first fitting level) and zero bubble together, the depth filter included."""
    feasible = dropped = 0
    for seed in range(chunk * 40, chunk * 40 + 40):
        problem = with_zero_bubble(sharded_problem(seed), 5_000 + seed)
        if Schedule.ZERO_BUBBLE not in problem.schedules:
            continue
        dropped += _dropped_depths(problem) > 0
        expected = brute_by_rule(problem)
        if expected is None:
            with pytest.raises(PlanError):
                plan_stages(problem)
            continue
        plan = plan_stages(problem)
        assert plan.predicted_step_time == pytest.approx(expected, rel=1e-9), seed
        feasible += 1
    assert feasible >= 5 and dropped >= 1


def test_escalation_below_the_uniform_cutoff_keeps_the_search_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs under a cutoff below the best plan known (a uniform plan's) find nothing or the slice's best: the
    instances where that happened match brute force, and there are some."""
    below: list[float] = []
    original = search_module._Searches.exact

    def counting(self, search, rank, cutoff):  # type: ignore[no-untyped-def]
        if cutoff < relaxed(self.best) < float("inf"):
            below.append(cutoff)
        return original(self, search, rank, cutoff)

    monkeypatch.setattr(search_module._Searches, "exact", counting)
    checked = 0
    for seed in range(120):
        problem, candidates = random_extended_problem(seed)
        problem = dataclasses.replace(problem, simulate_candidates=0)
        before = len(below)
        expected = brute_best(problem, candidates)
        try:
            plan_stages(problem)
        except PlanError:
            assert expected is None
            continue
        if len(below) > before:
            checked += check_against_brute(problem, expected, seed)
    assert checked >= 10
