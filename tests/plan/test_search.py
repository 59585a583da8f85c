"""Stage search checked against brute force over every candidate, plus errors, sizes and speed."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time

import pytest

from rannc.errors import PlanError
from rannc.plan import (
    BlockProfile,
    PlanProblem,
    evaluate,
    interpolate,
    minimum_memory_needed,
    plan_stages,
    required_microbatch_sizes,
    stage_cost,
)
from rannc.plan import cost as cost_module

# ---------------------------------------------------------------- brute force


def compositions(total: int, parts: int):
    """Every way to write `total` as an ordered sum of `parts` positive integers."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force(problem: PlanProblem, ignore_memory: bool = False):
    """Every feasible candidate as (step time, key, (ranges, replicas, P, schedule), max memory)."""
    if ignore_memory:
        problem = dataclasses.replace(problem, memory_limit_bytes=None)
    num_blocks, world = len(problem.blocks), problem.world_size
    if problem.num_stages is not None:
        stage_counts = [problem.num_stages] if problem.num_stages <= min(num_blocks, world) else []
    else:
        stage_counts = range(1, min(num_blocks, world) + 1)
    low = max(1, problem.min_microbatches)
    high = min(problem.global_batch, problem.max_microbatches)
    out = []
    for count in stage_counts:
        for sizes in compositions(num_blocks, count):
            ranges, first = [], 0
            for size in sizes:
                ranges.append((first, first + size - 1))
                first += size
            for replicas in compositions(world, count):
                for p in range(low, high + 1):
                    for rank, schedule in enumerate(problem.schedules):
                        result = evaluate(problem, ranges, replicas, p, schedule)
                        if result is None:
                            continue
                        total, costs = result
                        key = (count, p, rank, ranges, replicas)
                        memory = max(c.memory for c in costs)
                        out.append((total, key, (ranges, replicas, p, schedule), memory))
    return out


def brute_best(problem: PlanProblem):
    found = brute_force(problem)
    if not found:
        return None
    best = min(f[0] for f in found)
    near = [f for f in found if f[0] <= best * (1 + 1e-11)]
    return best, min(near, key=lambda f: f[1])


def brute_min_memory(problem: PlanProblem) -> float:
    return min(f[3] for f in brute_force(problem, ignore_memory=True))


# ---------------------------------------------------------------- random instances


def random_table(rng: random.Random, scale: float) -> dict[int, float]:
    points = rng.sample(range(1, 17), rng.randint(1, 3))
    return {m: rng.uniform(0.0, scale) * (m if rng.random() < 0.5 else 1 + m**0.5) for m in points}


def random_problem(seed: int) -> PlanProblem:
    rng = random.Random(seed)
    num_blocks, world, batch = rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 16)
    blocks = [
        BlockProfile(
            fwd_time=random_table(rng, 1e-3),
            bwd_time=random_table(rng, 2e-3),
            activation_bytes=random_table(rng, 1e6),
        )
        for _ in range(num_blocks)
    ]
    per_block = [rng.uniform(0, 1e8) for _ in range(num_blocks)]
    boundary = [rng.choice([0.0, rng.uniform(0, 1e5)]) for _ in range(num_blocks + 1)]
    params = [[0.0] * num_blocks for _ in range(num_blocks)]
    ins = [[0.0] * num_blocks for _ in range(num_blocks)]
    outs = [[0.0] * num_blocks for _ in range(num_blocks)]
    for i in range(num_blocks):
        for j in range(i, num_blocks):
            params[i][j] = sum(per_block[i : j + 1]) * rng.uniform(0.8, 1.0)
            ins[i][j] = 0.0 if i == 0 else boundary[i] + rng.choice([0.0, 100.0])
            outs[i][j] = 0.0 if j == num_blocks - 1 else boundary[j + 1]
    schedules = rng.choice([("1f1b",), ("fill_drain",), ("1f1b", "fill_drain"), ("fill_drain", "1f1b")])
    problem = PlanProblem(
        blocks=blocks,
        range_param_bytes=params,
        range_in_bytes_per_sample=ins,
        range_out_bytes_per_sample=outs,
        world_size=world,
        global_batch=batch,
        opt_param_factor=rng.choice([0.0, 2.0]),
        p2p_bandwidth=rng.uniform(1e9, 2e10),
        p2p_latency=rng.uniform(0, 1e-4),
        allreduce_bandwidth=rng.uniform(1e9, 2e10),
        allreduce_latency=rng.uniform(0, 1e-4),
        min_microbatches=rng.choice([1, 1, 1, 2, 3]),
        max_microbatches=rng.choice([1, 4, 8, 32]),
        schedules=schedules,
        num_stages=rng.choice([None, None, None, rng.randint(1, 5)]),
    )
    if rng.random() < 0.7:
        candidates = brute_force(problem, ignore_memory=True)
        if candidates:
            memories = sorted(f[3] for f in candidates)
            limit = rng.choice(memories) * rng.choice([0.9, 1.0, 1.0, 1.1])
            problem = dataclasses.replace(problem, memory_limit_bytes=limit)
    return problem


@pytest.mark.parametrize("chunk", range(10))
def test_search_matches_brute_force(chunk: int) -> None:
    feasible = infeasible = 0
    for seed in range(chunk * 25, chunk * 25 + 25):
        problem = random_problem(seed)
        expected = brute_best(problem)
        if expected is None:
            infeasible += 1
            with pytest.raises(PlanError):
                plan_stages(problem)
            continue
        feasible += 1
        best, (_, key, (ranges, replicas, p, schedule), _) = expected
        plan = plan_stages(problem)
        assert plan.predicted_step_time == pytest.approx(best, rel=1e-9), seed
        got_ranges = [(s.first_block, s.last_block) for s in plan.stages]
        got_replicas = [s.replicas for s in plan.stages]
        assert (got_ranges, got_replicas, plan.microbatches, plan.schedule) == (
            ranges,
            replicas,
            p,
            schedule,
        ), seed
        result = evaluate(problem, got_ranges, got_replicas, plan.microbatches, plan.schedule)
        assert result is not None
        assert result[0] == plan.predicted_step_time
        ranks = [rank for s in plan.stages for rank in s.ranks]
        assert ranks == list(range(problem.world_size))
        if problem.memory_limit_bytes is not None:
            assert all(s.memory_bytes <= problem.memory_limit_bytes for s in plan.stages)
    assert feasible > 0 and infeasible >= 0


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


# ---------------------------------------------------------------- hand-made instances


def linear_problem(
    weights: list[float], params: list[float], world: int, batch: int, **kwargs
) -> PlanProblem:
    num_blocks = len(weights)
    blocks = [
        BlockProfile(
            fwd_time={1: w * 1e-3, 2: w * 2e-3},
            bwd_time={1: w * 2e-3, 2: w * 4e-3},
            activation_bytes={1: 1e6, 2: 2e6},
        )
        for w in weights
    ]
    zeros = [[0.0] * num_blocks for _ in range(num_blocks)]
    ranges = [[sum(params[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    return PlanProblem(blocks, ranges, zeros, zeros, world_size=world, global_batch=batch, **kwargs)


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
    assert f"{need / 2**30:.3f} GiB" in message
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
    assert cost.memory == pytest.approx(3e6 * 4 + 2e6 * 1 + 2 * 2e3)
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

    def record_row(self, first, m):
        seen.add(m)
        return row(self, first, m)

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


def large_problem(num_blocks: int, world: int, batch: int, seed: int = 0) -> PlanProblem:
    rng = random.Random(seed)
    blocks = []
    for _ in range(num_blocks):
        f = rng.uniform(0.5e-3, 2e-3)
        blocks.append(
            BlockProfile(
                fwd_time={1: 0.3 * f, 4: 1.5 * f, 16: 5 * f},
                bwd_time={1: 0.6 * f, 4: 3 * f, 16: 10 * f},
                activation_bytes={1: 1e6, 16: 1.6e7},
            )
        )
    per_block = [rng.uniform(1e6, 5e7) for _ in range(num_blocks)]
    params = [[math.fsum(per_block[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    ins = [[0.0 if i == 0 else 8192.0 for _ in range(num_blocks)] for i in range(num_blocks)]
    outs = [[0.0 if j == num_blocks - 1 else 8192.0 for j in range(num_blocks)] for _ in range(num_blocks)]
    return PlanProblem(
        blocks, params, ins, outs, world_size=world, global_batch=batch, schedules=("fill_drain", "1f1b")
    )


@pytest.mark.parametrize(("world", "limit"), [(8, 5.0), (4, 2.0)])
def test_search_is_fast(world: int, limit: float) -> None:
    problem = large_problem(32, world, 256)
    start = time.perf_counter()
    plan = plan_stages(problem)
    assert time.perf_counter() - start < limit
    assert sum(s.replicas for s in plan.stages) == world
