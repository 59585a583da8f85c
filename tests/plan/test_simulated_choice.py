"""The search's final choice by the simulator (PlanProblem.simulate_candidates)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from plan_brute import brute_best, random_problem

from rannc.errors import PlanError
from rannc.plan import ShardLevel, plan_stages
from rannc.plan.cost import evaluate
from rannc.plan.search import SIMULATE_WINDOW
from rannc.plan.simulate import simulate_plan


def with_shared_parameter(seed: int):
    """random_problem(seed), half of them with a parameter tied between the first and the last block."""
    problem = random_problem(seed)
    rng = random.Random(seed)
    blocks = len(problem.blocks)
    if blocks >= 2 and rng.random() < 0.5:
        problem = dataclasses.replace(problem, shared_params=((rng.uniform(0, 5e7), (0, blocks - 1)),))
    return problem


def solvable(seeds: range):
    """(problem, its analytic plan) for every seed whose problem has a plan."""
    for seed in seeds:
        problem = with_shared_parameter(seed)
        try:
            yield problem, plan_stages(problem)
        except PlanError:
            continue


def test_simulated_choice_is_never_worse_than_the_analytic_optimum() -> None:
    improved = checked = 0
    for problem, analytic in solvable(range(160)):
        checked += 1
        chosen = plan_stages(dataclasses.replace(problem, simulate_candidates=16))
        ranges = [(s.first_block, s.last_block) for s in chosen.stages]
        replicas = [s.replicas for s in chosen.stages]
        # predicted = the simulator's step time of the returned plan; analytic = the cost model's sum formula
        assert chosen.predicted_step_time == pytest.approx(
            simulate_plan(problem, chosen).step_time, rel=1e-12
        )
        result = evaluate(problem, ranges, replicas, chosen.microbatches, chosen.schedule)
        assert result is not None and chosen.analytic_step_time == pytest.approx(result[0], rel=1e-12)
        best, _ = brute_best(problem)
        assert analytic.predicted_step_time == pytest.approx(best, rel=1e-9)
        # within the window of its schedule's analytic optimum (the pool per schedule)
        schedule_best, _ = brute_best(dataclasses.replace(problem, schedules=(chosen.schedule,)))
        assert chosen.analytic_step_time <= schedule_best * (1 + SIMULATE_WINDOW) * (1 + 1e-12)
        # The analytic optimum is simulated first, so the choice is at least as fast in simulation.
        simulated_analytic = simulate_plan(problem, analytic).step_time
        assert chosen.predicted_step_time <= simulated_analytic * (1 + 1e-9)
        improved += chosen.predicted_step_time < simulated_analytic * (1 - 1e-6)
        if memory := problem.memory_limit_bytes:
            assert max(s.memory_bytes for s in chosen.stages) <= memory
    assert checked > 100
    assert improved >= 3  # the simulator does change choices (schedules, replicas, microbatches)


def test_one_simulated_candidate_is_the_analytic_optimum_with_its_simulated_time() -> None:
    """One candidate per schedule: with one schedule, the analytic optimum (simulated); with several, the best of
    each schedule is simulated and the fastest in simulation wins (never slower than the analytic optimum)."""
    single = multiple = 0
    for problem, analytic in solvable(range(40)):
        one = plan_stages(dataclasses.replace(problem, simulate_candidates=1))
        assert analytic.analytic_step_time is None  # not simulated
        simulated_analytic = simulate_plan(problem, analytic).step_time
        if len(set(problem.schedules)) == 1:
            single += 1
            assert one.stages == analytic.stages and one.microbatches == analytic.microbatches
            assert one.schedule == analytic.schedule
            assert one.analytic_step_time == analytic.predicted_step_time
            assert one.predicted_step_time == simulated_analytic
            continue
        multiple += 1
        assert one.predicted_step_time <= simulated_analytic
        schedule_best, _ = brute_best(dataclasses.replace(problem, schedules=(one.schedule,)))
        assert one.analytic_step_time == pytest.approx(schedule_best, rel=1e-9)
    assert single > 5 and multiple > 5


def test_more_schedules_never_simulate_slower() -> None:
    """A search over more schedules, sharding allowed, returns no plan slower in simulation than one over some of
    them without sharding (its candidates are simulated per schedule, and a stage recomputes where ZeRO-3 would
    be slower). Seeds 11 and 110 are cases the simulation of only the fastest schedule's window got wrong."""
    subsets = [("1f1b",), ("fill_drain",), ("1f1b", "fill_drain"), ("zero_bubble",)]
    checked = 0
    for seed in range(120):
        full = dataclasses.replace(
            random_problem(seed),
            schedules=("1f1b", "zero_bubble", "fill_drain"),
            shard_levels=tuple(ShardLevel),
            simulate_candidates=4,
        )
        try:
            larger = plan_stages(full).predicted_step_time
        except PlanError:
            continue
        for schedules in subsets:
            try:
                smaller = plan_stages(
                    dataclasses.replace(full, schedules=schedules, shard_levels=(ShardLevel.NONE,))
                ).predicted_step_time
            except PlanError:
                continue
            assert larger <= smaller * (1 + 1e-9), (seed, schedules)
            checked += 1
    assert checked > 300
