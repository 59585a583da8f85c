"""Sharded stages in the planner: a replicated stage uses the least shard level with which it fits (before any
recompute, unless only ZeRO-3 fits so and recomputing is faster); the search is exact over that space (brute force), sharding makes plans fit that did not, is left out
where it is not needed, and a forced level is used by every replicated stage."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from plan_brute import compositions, held_by_definition, random_problem, step_by_definition

from rannc.deploy.deployment import Deployment, deployment_from_json, deployment_to_json
from rannc.errors import PlanError
from rannc.plan import BlockProfile, PlanProblem, ShardLevel, plan_stages
from rannc.plan import cost as cost_module
from rannc.plan.sharding import sharded_state
from rannc.plan.simulate import simulate_plan

ALL = tuple(ShardLevel)


def brute_by_rule(problem: PlanProblem) -> float | None:
    """Least step time over every candidate, each stage priced as `CostModel.fitting` chooses (the rule)."""
    model = cost_module.CostModel(problem)
    world, blocks = problem.world_size, len(problem.blocks)
    counts = [problem.num_stages] if problem.num_stages else range(1, min(blocks, world) + 1)
    best = None
    for count in counts:
        if count > min(blocks, world):
            continue
        for sizes in compositions(blocks, count):
            ends = list(itertools.accumulate(sizes))
            ranges = [(e - s, e - 1) for s, e in zip(sizes, ends)]
            for replicas in compositions(world, count):
                links = cost_module.stage_links(problem, replicas)
                for p in cost_module.microbatch_counts(problem):
                    if any(r not in cost_module.replica_counts(problem, p) for r in replicas):
                        continue
                    for schedule in problem.schedules:
                        held = [held_by_definition(schedule, p, count, s) for s in range(count)]
                        costs = [
                            model.fitting(i, j, r, p, inflight, link, pending)
                            for ((i, j), r, link, (inflight, pending)) in zip(ranges, replicas, links, held)
                        ]
                        if any(c is None for c in costs):
                            continue
                        total = step_by_definition(
                            schedule,
                            [c.time for c in costs],
                            [c.allreduce for c in costs],
                            [c.bwd_weight for c in costs],
                            p,
                        )
                        best = total if best is None else min(best, total)
    return best


def sharded_problem(seed: int) -> PlanProblem:
    """A random problem of plan_brute with every shard level allowed, a tied parameter across its first and
    last blocks and (mostly) less memory, so that sharding has to help."""
    problem = random_problem(seed)
    blocks = len(problem.blocks)
    shared = ((problem.range_param_bytes[0][0] * 0.3, (0, blocks - 1)),) if blocks > 1 else ()
    problem = dataclasses.replace(problem, shard_levels=ALL, shared_params=shared)
    if problem.memory_limit_bytes is not None:
        problem = dataclasses.replace(
            problem, memory_limit_bytes=problem.memory_limit_bytes * (0.6 + seed % 3 / 5)
        )
    return problem


def test_random_instances_cover_sharded_plans() -> None:
    sharded = 0
    for seed in range(120):
        try:
            plan = plan_stages(sharded_problem(seed))
        except PlanError:
            continue
        sharded += any(s.shard != ShardLevel.NONE for s in plan.stages)
    assert sharded >= 5


@pytest.mark.parametrize("chunk", range(4))
def test_search_matches_brute_force_with_sharding(chunk: int) -> None:
    feasible = 0
    for seed in range(chunk * 30, chunk * 30 + 30):
        problem = sharded_problem(seed)
        expected = brute_by_rule(problem)
        if expected is None:
            with pytest.raises(PlanError):
                plan_stages(problem)
            continue
        plan = plan_stages(problem)
        assert plan.predicted_step_time == pytest.approx(expected, rel=1e-9), seed
        feasible += 1
        for stage in plan.stages:
            assert stage.replicas > 1 or stage.shard == ShardLevel.NONE
    assert feasible > 0


def _two_block_problem(**changes) -> PlanProblem:
    block = BlockProfile(fwd_time={1: 1e-3}, bwd_time={1: 2e-3}, activation_bytes={1: 1e6})
    problem = PlanProblem(
        blocks=[block, block],
        range_param_bytes=[[4e8, 8e8], [0.0, 4e8]],
        range_in_bytes_per_sample=[[0.0, 0.0], [0.0, 1e4]],
        range_out_bytes_per_sample=[[1e4, 0.0], [0.0, 0.0]],
        world_size=4,
        global_batch=8,
        opt_param_factor=2.0,
        num_stages=1,
        min_microbatches=2,
        max_microbatches=2,
        shard_levels=ALL,
    )
    return dataclasses.replace(problem, **changes)


def test_sharding_is_the_only_way_to_fit() -> None:
    free = plan_stages(_two_block_problem(memory_limit_bytes=None))
    assert [s.shard for s in free.stages] == [ShardLevel.NONE]  # not worth it when everything fits
    whole = free.stages[0].memory_bytes
    # 8e8 parameter bytes x (2 + 2) = 3.2e9 held whole; ZeRO-3 on 4 replicas a quarter plus gathered blocks
    limit = whole * 0.55
    with pytest.raises(PlanError):
        plan_stages(_two_block_problem(memory_limit_bytes=limit, shard_levels=(ShardLevel.NONE,)))
    plan = plan_stages(_two_block_problem(memory_limit_bytes=limit))
    assert plan.stages[0].shard == ShardLevel.ZERO_3 and plan.stages[0].memory_bytes <= limit
    # a little more memory: ZeRO-2's optimizer shards fit, and it costs no gathers
    zero2 = cost_module.evaluate(_two_block_problem(), [(0, 1)], [4], 2, "1f1b", shard=[ShardLevel.ZERO_2])
    assert zero2 is not None and limit < zero2[1][0].memory < whole
    roomier = plan_stages(_two_block_problem(memory_limit_bytes=zero2[1][0].memory))
    assert roomier.stages[0].shard in (ShardLevel.ZERO_1, ShardLevel.ZERO_2)
    assert roomier.predicted_step_time < plan.predicted_step_time  # ZeRO-3's gathers cost time


def test_forced_level_and_its_costs() -> None:
    plan = plan_stages(_two_block_problem(shard_levels=(ShardLevel.ZERO_3,)))
    none = plan_stages(_two_block_problem(shard_levels=(ShardLevel.NONE,)))
    assert plan.stages[0].shard == ShardLevel.ZERO_3
    assert plan.stages[0].comm_time > none.stages[0].comm_time  # gathers every microbatch
    assert plan.stages[0].memory_bytes < 0.51 * none.stages[0].memory_bytes
    zero3 = sharded_state(_two_block_problem(), 0, 1, 4, ShardLevel.ZERO_3)
    assert zero3.grads == pytest.approx(8e8 / 4) and zero3.optimizer == pytest.approx(8e8 * 2 / 4)
    one = plan_stages(_two_block_problem(shard_levels=(ShardLevel.ZERO_3,), world_size=1, global_batch=2))
    assert one.stages[0].shard == ShardLevel.NONE  # one replica: nothing to shard


def test_deployment_carries_the_level() -> None:
    plan = plan_stages(_two_block_problem(shard_levels=(ShardLevel.ZERO_2,)))
    deployment = Deployment(plan, "hash", 4, None, [["n"]])
    data = deployment_to_json(deployment)
    assert data["stages"][0]["shard"] == "zero-2"
    assert deployment_from_json(data).plan.stages[0].shard == ShardLevel.ZERO_2
    data["stages"][0]["shard"] = "zero-9"
    with pytest.raises(Exception, match="zero-9"):
        deployment_from_json(data)


def _recompute_or_zero3_problem(**changes) -> PlanProblem:
    """One fill-drain stage of two blocks on 4 replicas whose 2 microbatches of activations (2 GB each) fit
    unsharded only when recomputed and, without recompute, only under ZeRO-3, whose gathers (3 x 0.75 x 0.8 GB
    per microbatch at 10 GiB/s) take far longer than the recomputed forward."""
    block = BlockProfile(fwd_time={1: 1e-3}, bwd_time={1: 2e-3}, activation_bytes={1: 1e9})
    problem = _two_block_problem(
        blocks=[block, block],
        schedules=("fill_drain",),
        allow_recompute=True,
        memory_limit_bytes=5.7e9,
    )
    return dataclasses.replace(problem, **changes)


def test_recompute_wins_over_slower_zero3() -> None:
    """Allowing sharding gives no slower plan than forbidding it: a stage that fits unsharded when recomputed
    recomputes when ZeRO-3's gathers would take longer (analytic and simulated)."""
    for simulated in (0, 4):
        unsharded = plan_stages(
            _recompute_or_zero3_problem(shard_levels=(ShardLevel.NONE,), simulate_candidates=simulated)
        )
        sharded = plan_stages(_recompute_or_zero3_problem(simulate_candidates=simulated))
        assert [(s.shard, s.recompute) for s in unsharded.stages] == [(ShardLevel.NONE, True)]
        assert [(s.shard, s.recompute) for s in sharded.stages] == [(ShardLevel.NONE, True)]
        assert sharded.predicted_step_time == pytest.approx(unsharded.predicted_step_time, rel=1e-12)
    # ZeRO-3 does fit without recompute (its memory is under the limit), at a higher per-microbatch time
    model = cost_module.CostModel(_recompute_or_zero3_problem())
    zero3 = model.stage(0, 1, 4, 2, 2, False, shard=ShardLevel.ZERO_3)
    again = model.stage(0, 1, 4, 2, 2, True)
    assert zero3.memory <= 5.7e9 and again.memory <= 5.7e9
    assert model.stage(0, 1, 4, 2, 2, False, shard=ShardLevel.ZERO_2).memory > 5.7e9
    assert zero3.time > again.time


def test_simulator_charges_zero3_gathers() -> None:
    """One ZeRO-3 stage: its simulated step is the analytic one (P x (fwd + bwd + gathers) + step end), gathers
    included, as the runtime gathers before each forward and backward."""
    problem = _two_block_problem(shard_levels=(ShardLevel.ZERO_3,))
    plan = plan_stages(problem)
    assert plan.stages[0].shard == ShardLevel.ZERO_3 and plan.stages[0].comm_time > 0
    simulated = simulate_plan(problem, plan).step_time
    assert simulated == pytest.approx(plan.predicted_step_time, rel=1e-9)
