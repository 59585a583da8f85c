"""Recompute, replica / microbatch choices and node placement: brute force, the definition, scale."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import numpy as np
import pytest
from plan_brute import brute_best, brute_force, cluster_problem, linear_problem, reference_cost
from plan_cases import medium_extended_problem, random_extended_problem
from test_search import check_against_brute

from rannc.errors import PlanError
from rannc.plan import Plan, evaluate, minimum_memory_needed, plan_stages
from rannc.plan import checks as checks_module
from rannc.plan import cost as cost_module
from rannc.plan.bounds import PrefixBounds
from rannc.plan.front import suffix_key
from rannc.plan.pareto import SuffixSearch
from rannc.plan.tables import FIELDS, StageTables
from rannc.plan.types import default_microbatch_choices, default_replica_choices


@pytest.mark.parametrize("chunk", range(10))
def test_search_matches_brute_force_extended(chunk: int) -> None:
    feasible = 0
    for seed in range(chunk * 25, chunk * 25 + 25):
        problem, candidates = random_extended_problem(seed)
        feasible += check_against_brute(problem, brute_best(problem, candidates), seed)
    assert feasible > 0


def test_extended_instances_cover_the_features() -> None:
    """The random instances really exercise recompute, placement, zero bubble and infeasibility."""
    recompute = multinode = infeasible = zero_bubble = 0
    for seed in range(250):
        problem, candidates = random_extended_problem(seed)
        expected = brute_best(problem, candidates)
        if expected is None:
            infeasible += 1
            continue
        _, (_, _, (ranges, replicas, _, schedule, flags), _) = expected
        recompute += any(flags)
        zero_bubble += schedule == "zero_bubble" and len(ranges) > 1
        node = problem.gpus_per_node
        multinode += node is not None and len(ranges) > 1 and any(r % node or node > 1 for r in replicas)
    assert recompute >= 20 and multinode >= 40 and 20 <= infeasible <= 150 and zero_bubble >= 20


@pytest.mark.parametrize("seed", range(16))
def test_search_matches_brute_force_medium_extended(seed: int) -> None:
    problem, candidates = medium_extended_problem(seed)
    assert check_against_brute(problem, brute_best(problem, candidates), seed)


@pytest.mark.parametrize("seed", range(40))
def test_minimum_memory_matches_brute_force_extended(seed: int) -> None:
    problem, candidates = random_extended_problem(seed)
    problem = dataclasses.replace(problem, memory_limit_bytes=None)
    if not candidates:
        with pytest.raises(PlanError):
            minimum_memory_needed(problem)
        return
    need = minimum_memory_needed(problem)
    assert need == min(f[3] for f in candidates)
    plan_stages(dataclasses.replace(problem, memory_limit_bytes=need))
    with pytest.raises(PlanError):
        plan_stages(dataclasses.replace(problem, memory_limit_bytes=need * (1 - 1e-9)))


@pytest.mark.parametrize("seed", range(25))
def test_evaluate_matches_reference_extended(seed: int) -> None:
    problem, candidates = random_extended_problem(seed)
    rng = random.Random(seed)
    for _, _, (ranges, replicas, p, schedule, flags), _ in rng.sample(candidates, min(15, len(candidates))):
        for recompute in (flags, None, [rng.random() < 0.5 for _ in flags]):
            for p_try in (p, p + 1):
                expected = reference_cost(problem, ranges, replicas, p_try, schedule, recompute)
                got = evaluate(problem, ranges, replicas, p_try, schedule, recompute=recompute)
                if expected is None:
                    assert got is None
                else:
                    assert got is not None and got[0] == pytest.approx(expected, rel=1e-12)


def test_tables_are_bit_identical_to_the_cost_model() -> None:
    for seed in range(20):
        problem, _ = random_extended_problem(seed)
        model = cost_module.CostModel(problem)
        tables = StageTables(model)
        num_blocks = len(problem.blocks)
        for m in (1, 3, 7):
            table = tables.compute(m)
            for r in (1, 2, 5):
                base = tables.base(r)
                for first in range(num_blocks):
                    for offset, row in enumerate(model.row(first, m, r)):
                        last = first + offset
                        values = [table[name][first, last] for name in FIELDS]
                        assert values == [row[i] for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13)]
                        assert base[first, last] == row[5]
                        for inter in (False, True):
                            assert tables.allreduce(r, inter)[first, last] == model.allreduce(
                                first, last, r, inter
                            )


def test_unpruned_search_agrees_at_moderate_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond brute force: the bounds and the first cutoff lose nothing against the plain DP."""
    problem = cluster_problem(10, 32, 128, gpus_per_node=4, max_microbatches=16)
    problem = dataclasses.replace(problem, memory_limit_bytes=3.2e10)
    plan = plan_stages(problem)
    model = cost_module.CostModel(problem)
    counts = checks_module.stage_counts(problem)

    def no_bounds(self: PrefixBounds, cutoff: float) -> None:
        zeros = np.zeros((self.num_blocks + 1, self.world + 1))
        self.pre_max = [list(row) for row in zeros]
        self._level_tables = {}
        self.level_tables = lambda inflight: (self.pre_max, self.pre_max)  # type: ignore[method-assign]

    monkeypatch.setattr(PrefixBounds, "prepare", no_bounds)
    found = []
    for p in cost_module.microbatch_counts(problem):
        for rank, schedule in checks_module.searched_schedules(problem):
            for count, entries in SuffixSearch(problem, model, p, schedule).run(counts, math.inf).items():
                for entry in entries:
                    total = entry[0] + (p - 1) * entry[1] + entry[2]
                    found.append((total, count, p, rank, *suffix_key(entry)))
    best = min(f[0] for f in found)
    _, count, p, _, lasts, reps = min((f for f in found if f[0] <= best * (1 + 1e-12)), key=lambda f: f[1:])
    assert plan.predicted_step_time == pytest.approx(best, rel=1e-9)
    assert ([s.last_block for s in plan.stages], [s.replicas for s in plan.stages]) == (
        list(lasts),
        list(reps),
    )
    assert plan.microbatches == p and len(plan.stages) == count


# ---------------------------------------------------------------- hand-made instances


def test_recompute_is_chosen_only_when_needed() -> None:
    # One block on one rank, 2 microbatches of 4 rows, fill-drain: plain 4e6 + 2 * 4e6 bytes,
    # recomputed 4e6 + 4e6 (no boundary inputs), one more forward (4 ms) in backward.
    base = linear_problem([1.0], [1e6], world=1, batch=8, microbatch_choices=(2,), schedules=("fill_drain",))
    plan = plan_stages(dataclasses.replace(base, memory_limit_bytes=12e6, allow_recompute=True))
    assert not plan.stages[0].recompute and plan.predicted_step_time == pytest.approx(2 * 12e-3)
    with pytest.raises(PlanError):
        plan_stages(dataclasses.replace(base, memory_limit_bytes=1e7))
    plan = plan_stages(dataclasses.replace(base, memory_limit_bytes=1e7, allow_recompute=True))
    stage = plan.stages[0]
    assert (
        stage.recompute and stage.bwd_time == pytest.approx(12e-3) and stage.fwd_time == pytest.approx(4e-3)
    )
    assert stage.activation_bytes == pytest.approx(4e6) and stage.memory_bytes == pytest.approx(8e6)
    assert plan.predicted_step_time == pytest.approx(2 * 16e-3)
    need = minimum_memory_needed(dataclasses.replace(base, allow_recompute=True))
    assert need == pytest.approx(8e6)


def test_recompute_stage_costs() -> None:
    problem = linear_problem([1.0, 3.0], [1e6, 3e6], world=2, batch=8, allow_recompute=True)
    problem = dataclasses.replace(problem, range_in_bytes_per_sample=[[0.0, 0.0], [0.0, 1e3]])
    plain = cost_module.stage_cost(problem, 1, 1, 1, 4, "fill_drain", 1, 2)
    again = cost_module.stage_cost(problem, 1, 1, 1, 4, "fill_drain", 1, 2, recompute=True)
    assert again.bwd == pytest.approx(plain.bwd + plain.fwd)
    assert again.time == pytest.approx(plain.time + plain.fwd)
    assert again.memory == pytest.approx(
        plain.memory - plain.activation_bytes * 4 + 2e3 * 4 + plain.activation_bytes
    )
    assert again.peak_activation_bytes == pytest.approx(2e3 * 4 + plain.activation_bytes)


def test_placement_links() -> None:
    problem = dataclasses.replace(linear_problem([1.0] * 4, [1.0] * 4, world=12, batch=48), gpus_per_node=4)
    # Ranks [0,2) [2,4) [4,12) [12,...): stage 0-1 share node 0; stage 2 spans nodes 1 and 2.
    links = cost_module.stage_links(problem, [2, 2, 8])
    assert links == [(False, False, False), (False, True, False), (True, False, True)]
    assert cost_module.stage_links(problem, [3, 1, 4, 4]) == [
        (False, False, False),
        (False, True, False),
        (True, True, False),
        (True, False, False),
    ]
    assert (
        cost_module.stage_links(dataclasses.replace(problem, gpus_per_node=None), [2, 2, 8])
        == [(False, False, False)] * 3
    )


def test_inter_node_links_are_charged() -> None:
    problem = linear_problem([1.0, 1.0], [1e8, 1e8], world=4, batch=16)
    problem = dataclasses.replace(
        problem,
        range_in_bytes_per_sample=[[0.0, 0.0], [0.0, 1e5]],
        range_out_bytes_per_sample=[[1e5, 0.0], [0.0, 0.0]],
        gpus_per_node=2,
        inter_node_bandwidth=1e8,
        allreduce_inter_bandwidth=1e8,
    )
    _, same = evaluate(problem, [(0, 0), (1, 1)], [1, 3], 4, "1f1b")  # stage 1 spans nodes
    _, split = evaluate(problem, [(0, 0), (1, 1)], [2, 2], 4, "1f1b")  # one node each
    assert same[0].comm == pytest.approx(
        2 * (problem.inter_node_latency or problem.p2p_latency) + 2 * 1e5 * 4 / 1e8
    )
    assert split[0].comm == pytest.approx(2 * problem.p2p_latency + 2 * 1e5 * 2 / 1e8)
    assert same[1].allreduce == pytest.approx(problem.allreduce_latency + 2 * 2 / 3 * 1e8 / 1e8)
    assert split[1].allreduce == pytest.approx(
        problem.allreduce_latency + 2 * 1 / 2 * 1e8 / problem.allreduce_bandwidth
    )


def test_choices_restrict_the_plan() -> None:
    problem = linear_problem([2.0, 1.0, 1.0], [0.0, 2**30, 2**30], world=4, batch=16)
    assert [s.replicas for s in plan_stages(problem).stages] == [2, 1, 1]
    only = plan_stages(dataclasses.replace(problem, replica_choices=(2, 4)))
    assert all(s.replicas in (2, 4) for s in only.stages)
    assert plan_stages(dataclasses.replace(problem, microbatch_choices=(3,))).microbatches == 3
    with pytest.raises(PlanError, match="replica counts"):
        plan_stages(dataclasses.replace(problem, replica_choices=(3,)))
    with pytest.raises(PlanError, match="replica counts"):
        minimum_memory_needed(dataclasses.replace(problem, replica_choices=(3,)))
    assert evaluate(problem, [(0, 2)], [4], 2, "1f1b") is not None
    assert evaluate(dataclasses.replace(problem, replica_choices=(2,)), [(0, 2)], [4], 2, "1f1b") is None
    assert evaluate(dataclasses.replace(problem, microbatch_choices=(4,)), [(0, 2)], [4], 2, "1f1b") is None
    assert evaluate(problem, [(0, 2)], [4], 2, "1f1b", recompute=[True]) is None  # not allowed


def test_default_choices() -> None:
    choices = default_replica_choices(1024, 8)  # 1..8, the divisors, 2^k and 3 x 2^k
    assert choices[:10] == (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
    assert (
        set(choices) >= {32, 64, 128, 256, 512, 1024, 384, 768} and 9 not in choices and 1016 not in choices
    )
    assert len(choices) == 22
    assert default_replica_choices(12, 8) == (1, 2, 3, 4, 5, 6, 7, 8, 12)
    assert default_replica_choices(6) == (1, 2, 3, 4, 6)
    assert default_replica_choices(96, 8) == (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96)
    assert default_microbatch_choices(2048, 1, 64) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert default_microbatch_choices(30, 5, 40) == (5, 6, 8, 10, 12, 15, 16, 24, 30)


def test_plan_json_round_trip_and_old_files() -> None:
    problem = dataclasses.replace(
        linear_problem([1.0, 1.0], [1.0, 1.0], world=2, batch=8), allow_recompute=True
    )
    plan = plan_stages(problem)
    assert Plan.from_json(plan.to_json()) == plan
    old = plan.to_json()
    for stage in old["stages"]:
        del stage["recompute"]
    assert Plan.from_json(old) == plan


# ---------------------------------------------------------------- scale


def test_cluster_plan_is_fast() -> None:
    """48 blocks of a 100B+ model on 1024 GPUs (8 per node), up to 64 microbatches, both schedules,
    recompute allowed, default replica choices."""
    problem = cluster_problem(48, 1024, 2048)
    start = time.process_time()
    plan = plan_stages(problem)
    elapsed = time.process_time() - start
    assert elapsed < 60, elapsed
    assert sum(s.replicas for s in plan.stages) == 1024
    assert all(s.replicas in problem.replica_choices for s in plan.stages)
    assert any(s.recompute for s in plan.stages)
    assert all(s.memory_bytes <= problem.memory_limit_bytes for s in plan.stages)
    # Every uniform plan the planner could have picked is no faster.
    for count in (8, 16):
        r = 1024 // count
        size = 48 // count
        ranges = [(i * size, i * size + size - 1) for i in range(count)]
        for p in (16, 32, 64):
            result = evaluate(problem, ranges, [r] * count, p, "1f1b")
            assert result is None or result[0] >= plan.predicted_step_time * (1 - 1e-12)


def test_brute_force_enumerates_recompute_vectors() -> None:
    problem = dataclasses.replace(
        linear_problem([1.0, 1.0], [1.0, 1.0], world=2, batch=4), allow_recompute=True
    )
    flags = {tuple(f[2][4]) for f in brute_force(problem) if len(f[2][0]) == 2}
    assert flags == {(False, False), (False, True), (True, False), (True, True)}


def test_the_escalated_first_cutoff_keeps_the_search_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without any uniform plan the first cutoff comes from exact runs under rising cutoffs (search._Searches.run's
    # escalation): the instances where that happened match brute force, and there are some.
    from rannc.plan import search as search_module

    escalated = []
    original = search_module._Searches.exact

    def counting(self, search, rank, cutoff):  # type: ignore[no-untyped-def]
        if math.isinf(self.best) and math.isfinite(cutoff):
            escalated.append(cutoff)
        return original(self, search, rank, cutoff)

    monkeypatch.setattr(search_module._Searches, "exact", counting)
    feasible = checked = 0
    for seed in range(250):
        problem, candidates = random_extended_problem(seed)
        before = len(escalated)
        expected = brute_best(problem, candidates)
        try:
            plan_stages(problem)
        except PlanError:
            assert expected is None
            continue
        if len(escalated) > before:
            checked += 1
            feasible += check_against_brute(problem, expected, seed)
    assert checked >= 10 and feasible >= 10
