"""Stage search checked against brute force over every candidate, plus errors, sizes and speed."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest
from plan_brute import (
    brute_best,
    brute_force,
    brute_min_memory,
    large_problem,
    linear_problem,
    medium_problem,
    random_problem,
    reference_cost,
)

from rannc.errors import PlanError
from rannc.plan import cost as cost_module
from rannc.plan import (
    evaluate,
    interpolate,
    minimum_memory_needed,
    plan_stages,
    required_microbatch_sizes,
    stage_cost,
)


def check_against_brute(problem, expected, label) -> bool:
    """plan_stages gives brute force's step time and tie-break choice; False when infeasible."""
    if expected is None:
        with pytest.raises(PlanError):
            plan_stages(problem)
        return False
    best, (_, _, (ranges, replicas, p, schedule, recompute), _) = expected
    plan = plan_stages(problem)
    assert plan.predicted_step_time == pytest.approx(best, rel=1e-9), label
    got_ranges = [(s.first_block, s.last_block) for s in plan.stages]
    got_replicas = [s.replicas for s in plan.stages]
    got_recompute = [s.recompute for s in plan.stages]
    assert (got_ranges, got_replicas, plan.microbatches, plan.schedule, got_recompute) == (
        ranges,
        replicas,
        p,
        schedule,
        recompute,
    ), label
    result = evaluate(problem, got_ranges, got_replicas, plan.microbatches, plan.schedule)
    assert result is not None
    assert result[0] == plan.predicted_step_time
    ranks = [rank for s in plan.stages for rank in s.ranks]
    assert ranks == list(range(problem.world_size))
    if problem.memory_limit_bytes is not None:
        assert all(s.memory_bytes <= problem.memory_limit_bytes for s in plan.stages)
    return True


@pytest.mark.parametrize("chunk", range(10))
def test_search_matches_brute_force(chunk: int) -> None:
    feasible = 0
    for seed in range(chunk * 25, chunk * 25 + 25):
        problem = random_problem(seed)
        feasible += check_against_brute(problem, brute_best(problem), seed)
    assert feasible > 0


def test_random_instances_cover_infeasible_cases() -> None:
    outcomes = [brute_best(random_problem(seed)) is None for seed in range(250)]
    assert 10 <= sum(outcomes) <= 200


@pytest.mark.parametrize("seed", range(40))
def test_minimum_memory_matches_brute_force(seed: int) -> None:
    problem = dataclasses.replace(random_problem(1000 + seed), memory_limit_bytes=None)
    try:
        need = minimum_memory_needed(problem)
    except PlanError:
        assert not brute_force(problem)
        return
    assert need == brute_min_memory(problem)
    plan_stages(dataclasses.replace(problem, memory_limit_bytes=need))
    with pytest.raises(PlanError):
        plan_stages(dataclasses.replace(problem, memory_limit_bytes=need * (1 - 1e-9)))


@pytest.mark.parametrize("seed", range(20))
def test_evaluate_matches_reference(seed: int) -> None:
    problem = random_problem(3000 + seed)
    rng = random.Random(seed)
    candidates = brute_force(dataclasses.replace(problem, memory_limit_bytes=None))
    for _, _, (ranges, replicas, p, schedule, _), _ in rng.sample(candidates, min(20, len(candidates))):
        for p_try in (p, p + 1):
            expected = reference_cost(problem, ranges, replicas, p_try, schedule)
            got = evaluate(problem, ranges, replicas, p_try, schedule)
            if expected is None:
                assert got is None
            else:
                assert got is not None and got[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_search_matches_brute_force_medium(seed: int) -> None:
    problem = medium_problem(seed)
    assert check_against_brute(problem, brute_best(problem), seed)


# ---------------------------------------------------------------- hand-made instances


def test_unequal_replicas_when_optimal() -> None:
    problem = linear_problem([2.0, 1.0, 1.0], [0.0, 2**30, 2**30], world=4, batch=16)
    plan = plan_stages(problem)
    assert [(s.first_block, s.last_block) for s in plan.stages] == [(0, 0), (1, 1), (2, 2)]
    assert [s.replicas for s in plan.stages] == [2, 1, 1]
    assert [s.ranks for s in plan.stages] == [[0, 1], [2], [3]]
    assert plan.predicted_step_time == pytest.approx(brute_best(problem)[0], rel=1e-12)


def test_memory_error_names_minimum_memory() -> None:
    problem = linear_problem([1.0] * 4, [2**28] * 4, world=2, batch=8, memory_limit_bytes=2**20)
    need = minimum_memory_needed(problem)
    with pytest.raises(PlanError) as info:
        plan_stages(problem)
    message = str(info.value)
    assert f"{math.ceil(need / 2**30 * 1000) / 1000:.3f} GiB" in message
    assert "mem_limit_gb" in message and "ranks" in message
    plan = plan_stages(dataclasses.replace(problem, memory_limit_bytes=need))
    assert max(s.memory_bytes for s in plan.stages) <= need
    with pytest.raises(PlanError):
        plan_stages(dataclasses.replace(problem, memory_limit_bytes=need * (1 - 1e-12)))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"num_stages": 5}, "world size"),
        ({"num_stages": 3, "world_size": 4}, "blocks"),
        ({"global_batch": 2, "world_size": 8}, "global batch"),
        ({"min_microbatches": 5, "global_batch": 4}, "microbatch"),
        ({"schedules": ("gpipe",)}, "schedule"),
    ],
)
def test_structural_errors(changes: dict, words: str) -> None:
    base = linear_problem([1.0, 1.0], [1.0, 1.0], world=4, batch=8)
    problem = dataclasses.replace(base, **changes)
    with pytest.raises(PlanError, match=words):
        plan_stages(problem)
    with pytest.raises(PlanError):
        minimum_memory_needed(problem)


def test_batch_error_suggests_batch_size() -> None:
    problem = linear_problem([1.0, 1.0], [1.0, 1.0], world=8, batch=3)
    with pytest.raises(PlanError, match="at least 4"):
        plan_stages(problem)
    plan_stages(dataclasses.replace(problem, global_batch=4))


def test_forced_stage_count_and_schedule_order() -> None:
    problem = linear_problem([1.0] * 6, [1e6] * 6, world=6, batch=12, num_stages=3)
    plan = plan_stages(problem)
    assert len(plan.stages) == 3
    assert plan.schedule == "1f1b"
    both = dataclasses.replace(problem, schedules=("fill_drain", "1f1b"))
    assert plan_stages(both).schedule == "fill_drain"
    assert plan_stages(both).predicted_step_time == pytest.approx(plan.predicted_step_time, rel=1e-12)


def test_stage_cost_formula() -> None:
    problem = linear_problem([1.0, 3.0], [1e6, 3e6], world=2, batch=8)
    problem = dataclasses.replace(
        problem,
        range_in_bytes_per_sample=[[0.0, 0.0], [0.0, 1e3]],
        range_out_bytes_per_sample=[[5e2, 0.0], [0.0, 0.0]],
    )
    cost = stage_cost(problem, 1, 1, 1, 4, "1f1b", 1, 2)
    assert cost.microbatch_size == 2
    assert cost.fwd == pytest.approx(6e-3) and cost.bwd == pytest.approx(12e-3)
    comm = 2 * (problem.p2p_latency + 2e3 / problem.p2p_bandwidth)
    assert cost.comm == pytest.approx(comm)
    assert cost.time == pytest.approx(18e-3 + comm)
    assert cost.inflight == 1 and cost.allreduce == 0.0
    # receives: 2; sends still held: min(4 microbatches, 1 in flight + 1)
    assert cost.memory == pytest.approx(3e6 * 4 + 2e6 * 1 + (2 + 2) * 2e3)
    first = stage_cost(problem, 0, 0, 1, 4, "fill_drain", 0, 2)
    assert first.inflight == 4
    total, costs = evaluate(problem, [(0, 0), (1, 1)], [1, 1], 4, "1f1b")
    times = [c.time for c in costs]
    assert total == pytest.approx(sum(times) + 3 * max(times))
    dp = stage_cost(problem, 0, 1, 2, 1, "1f1b", 0, 1)
    assert dp.microbatch_size == 4
    assert dp.allreduce == pytest.approx(problem.allreduce_latency + 4e6 / problem.allreduce_bandwidth)


def test_evaluate_rejects_invalid_candidates() -> None:
    problem = linear_problem([1.0, 1.0], [1.0, 1.0], world=4, batch=4)
    assert evaluate(problem, [(0, 1)], [4], 2, "1f1b") is None  # 4 replicas, 2 rows per microbatch
    assert evaluate(problem, [(0, 1)], [4], 1, "1f1b") is not None
    assert evaluate(problem, [(0, 1)], [4], 5, "1f1b") is None  # more microbatches than samples
    with pytest.raises(ValueError):
        evaluate(problem, [(0, 0)], [4], 1, "1f1b")
    with pytest.raises(ValueError):
        evaluate(problem, [(0, 1)], [3], 1, "1f1b")
    with pytest.raises(ValueError):
        evaluate(problem, [(0, 1)], [4], 1, "gpipe")


# ---------------------------------------------------------------- interpolate and sizes


def test_interpolate() -> None:
    table = {2: 4.0, 4: 8.0, 8: 10.0}
    assert interpolate(table, 4) == 8.0
    assert interpolate(table, 3) == pytest.approx(6.0)
    assert interpolate(table, 6) == pytest.approx(9.0)
    assert interpolate(table, 16) == pytest.approx(14.0)  # extrapolated from 4 and 8
    assert interpolate(table, 1) == pytest.approx(2.0)  # extrapolated from 2 and 4
    assert interpolate({3: 6.0}, 5) == pytest.approx(10.0)  # one point: proportional
    assert interpolate({1: 5.0, 2: 1.0}, 4) == 0.0  # never negative
    with pytest.raises(ValueError):
        interpolate({}, 1)


def test_required_microbatch_sizes_examples() -> None:
    assert required_microbatch_sizes(1, 4, 1, 32) == [1, 2, 4]
    assert required_microbatch_sizes(2, 8, 1, 1) == [4, 8]
    assert required_microbatch_sizes(4, 3, 2, 2) == [2]  # 2 rows per microbatch, 1 replica at most
    assert required_microbatch_sizes(2, 4, 8, 16) == []


@pytest.mark.parametrize("seed", range(30))
def test_required_microbatch_sizes_cover_search(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    problem = random_problem(2000 + seed)
    seen: set[int] = set()
    row, values = cost_module.CostModel.row, cost_module.CostModel.block_values

    def record_row(self, first, m, replicas=1):
        seen.add(m)
        return row(self, first, m, replicas)

    def record_values(self, m):
        seen.add(m)
        return values(self, m)

    monkeypatch.setattr(cost_module.CostModel, "row", record_row)
    monkeypatch.setattr(cost_module.CostModel, "block_values", record_values)
    try:
        plan_stages(problem)
    except PlanError:
        pass
    allowed = required_microbatch_sizes(
        problem.world_size, problem.global_batch, problem.min_microbatches, problem.max_microbatches
    )
    assert seen <= set(allowed)


# ---------------------------------------------------------------- speed


@pytest.mark.parametrize(("world", "limit"), [(8, 5.0), (4, 2.0)])
def test_search_is_fast(world: int, limit: float) -> None:
    """32 blocks, up to 32 microbatches, both schedules (a memory limit makes both worth searching)."""
    for batch in (64, 256):
        problem = large_problem(32, world, batch)
        problem = dataclasses.replace(problem, memory_limit_bytes=1.5 * minimum_memory_needed(problem))
        start = time.perf_counter()
        plan = plan_stages(problem)
        assert time.perf_counter() - start < limit
        assert sum(s.replicas for s in plan.stages) == world
