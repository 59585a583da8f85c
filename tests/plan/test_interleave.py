"""Interleaved 1F1B plans: the cut search against brute force, the memory model against its definition, the
closed form of the interleaved step, the choice against the other schedules, and how plans are drawn."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from typing import Any

import numpy as np
import pytest
from plan_brute import compositions, random_table

from rannc.deploy.plot import memory_parts, plan_figure, plot_plan
from rannc.errors import PlanError
from rannc.plan import BlockProfile, Plan, PlanProblem, interpolate, minimum_memory_needed, plan_stages
from rannc.plan import interleave as il
from rannc.plan.cost import CostModel, replica_microbatch_size
from rannc.plan.simulate import simulate, simulate_plan, stage_timings
from rannc.plan.trace import timeline_to_trace
from rannc.plan.types import ShardLevel
from rannc.problem import AUTO_SCHEDULES, JOB_KNOBS, plan_or_explain
from rannc.schedule import ActionKind, Schedule

INTERLEAVED = Schedule.INTERLEAVED_1F1B


def chunked_problem(seed: int) -> PlanProblem:
    """Up to 8 blocks and 4 ranks, node placement, workspace, ZeRO-1, recompute, a chunked optimizer step and a
    memory limit that binds."""
    rng = random.Random(20_000 + seed)
    num_blocks, world = rng.randint(4, 8), rng.choice([2, 2, 4, 4, 3])
    batch = rng.choice([8, 12, 16, 24])
    blocks = []
    for _ in range(num_blocks):
        blocks.append(
            BlockProfile(
                fwd_time=random_table(rng, 1e-3),
                bwd_time=random_table(rng, 2e-3),
                activation_bytes=random_table(rng, 1e7),
                workspace_bytes=random_table(rng, 2e7) if rng.random() < 0.5 else {},
            )
        )
    per_block = [rng.uniform(0, rng.choice([1e6, 1e7])) for _ in range(num_blocks)]
    boundary = [rng.choice([0.0, rng.uniform(0, 1e5), rng.uniform(0, 1e6)]) for _ in range(num_blocks + 1)]
    params = [[0.0] * num_blocks for _ in range(num_blocks)]
    largest = [[0.0] * num_blocks for _ in range(num_blocks)]
    ins = [[0.0] * num_blocks for _ in range(num_blocks)]
    outs = [[0.0] * num_blocks for _ in range(num_blocks)]
    for i in range(num_blocks):
        for j in range(i, num_blocks):
            params[i][j] = sum(per_block[i : j + 1]) * rng.uniform(0.8, 1.0)
            largest[i][j] = max(per_block[i : j + 1]) * 0.5
            ins[i][j] = 0.0 if i == 0 else boundary[i] + rng.choice([0.0, 100.0])
            outs[i][j] = 0.0 if j == num_blocks - 1 else boundary[j + 1]
    problem = PlanProblem(
        blocks=blocks,
        range_param_bytes=params,
        range_in_bytes_per_sample=ins,
        range_out_bytes_per_sample=outs,
        world_size=world,
        global_batch=batch,
        opt_param_factor=rng.choice([0.0, 2.0]),
        zero_optimizer=rng.random() < 0.3,
        p2p_bandwidth=rng.uniform(1e9, 2e10),
        p2p_latency=rng.uniform(0, 1e-4),
        allreduce_bandwidth=rng.uniform(1e9, 2e10),
        max_microbatches=rng.choice([4, 8, 12]),
        schedules=(Schedule.ONE_F_ONE_B, INTERLEAVED),
        input_bytes=rng.choice([0.0, 1e5]),
        allow_recompute=rng.random() < 0.5,
        gpus_per_node=rng.choice([None, 1, 2]),
        inter_node_bandwidth=rng.uniform(1e8, 1e9),
        optimizer_transient=rng.choice([(0.0, 0.0), (1.0, 2.0)]),
        range_largest_param_bytes=largest,
        update_seconds_per_param_byte=rng.choice([0.0, 1e-10]),
        simulate_candidates=8,
        # the optimizer stepped in chunks (its own generator: the other draws stay as they were)
        optimizer_chunk_bytes=random.Random(30_000 + seed).choice([0.0, 0.0, 1e5, 1e6]),
    )
    if rng.random() < 0.8:  # a limit somewhere among the memories cuts need
        memories = sorted(
            m for config in il.interleaved_configs(problem) for _, m in brute_cuts(problem, config)
        )
        if memories:
            # (slightly above one cut's memory: summation orders differ in the last bits)
            problem = dataclasses.replace(
                problem, memory_limit_bytes=memories[len(memories) // 3] * (1 + 1e-9)
            )
    return problem


def brute_cuts(problem: PlanProblem, config: il.ChunkedConfig) -> list[tuple[float, float]]:
    """(t_max, largest position memory) of every cut of `config`, from the definitions (not CutSearch)."""
    out = []
    for sizes in compositions(len(problem.blocks), config.positions * config.chunks):
        ranges, first = [], 0
        for size in sizes:
            ranges.append((first, first + size - 1))
            first += size
        out.append(reference_cut(problem, config, ranges))
    return out


def reference_cut(problem: PlanProblem, config: il.ChunkedConfig, ranges: list[tuple[int, int]]):
    """t_max and the largest position memory of one cut, written out from the definitions."""
    s_count, v, p, r = config.positions, config.chunks, config.microbatches, config.replicas
    m = math.ceil(math.ceil(problem.global_batch / p) / r)
    shards = r if problem.zero_optimizer else 1
    g = problem.gpus_per_node

    def nodes(position: int) -> set[int]:
        ranks = range(position * r, (position + 1) * r)
        return {0} if g is None else {rank // g for rank in ranks}

    def send(nbytes: float, inter: bool) -> float:
        if nbytes == 0:
            return 0.0
        if inter:
            return problem.p2p_latency + nbytes / problem.inter_node_bandwidth
        return problem.p2p_latency + nbytes / problem.p2p_bandwidth

    times, memory = [], []
    count = s_count * v
    for k, (i, j) in enumerate(ranges):
        blocks = problem.blocks[i : j + 1]
        fwd = sum(interpolate(b.fwd_time, m) for b in blocks)
        bwd = sum(interpolate(b.bwd_time, m) for b in blocks) + (fwd if config.recompute else 0.0)
        s = k % s_count
        in_inter = k > 0 and len(nodes(s) | nodes((k - 1) % s_count)) > 1
        out_inter = k < count - 1 and len(nodes(s) | nodes((k + 1) % s_count)) > 1
        ins = problem.range_in_bytes_per_sample[i][j] * m
        outs = problem.range_out_bytes_per_sample[i][j] * m
        times.append(fwd + bwd + 2 * (send(ins, in_inter) + send(outs, out_inter)))
    for s in range(s_count):
        actions = INTERLEAVED.actions(s, s_count, p, v)
        own = ranges[s::s_count]
        # what each chunk keeps per held microbatch, and the most it holds at once
        acts, rebuilt, work = [], [], []
        state = params = buffers = 0.0
        held_most = [0] * v
        held_now = [0] * v
        for action in actions:
            if action.kind == ActionKind.FORWARD:
                held_now[action.chunk] += 1
                held_most[action.chunk] = max(held_most[action.chunk], held_now[action.chunk])
            elif action.kind.releases:
                held_now[action.chunk] -= 1
        for c, (i, j) in enumerate(own):
            cost = CostModel(problem).row(i, m, r)[j - i]  # workspace figures of the range (tested elsewhere)
            a = sum(interpolate(b.activation_bytes, m) for b in problem.blocks[i : j + 1])
            ins = problem.range_in_bytes_per_sample[i][j] * m
            outs = problem.range_out_bytes_per_sample[i][j] * m
            acts.append(ins if config.recompute else a)
            rebuilt.append(a if config.recompute else 0.0)
            work.append(cost.workspace_bytes)
            params += problem.range_param_bytes[i][j]
            state += problem.range_param_bytes[i][j] * (2 + problem.opt_param_factor / shards)
            # sends: the input gradients of at most 2 microbatches (the runtime's window), the outputs of as many
            # when recomputing, else of every microbatch the chunk holds (and one more), whose graphs keep them
            window = min(p, 2)
            kept = window if config.recompute else min(p, held_most[c] + 1)
            buffers += 2 * (ins + outs) + (window * ins + kept * outs)
        peak = held = 0.0
        for action in actions:
            if action.kind == ActionKind.FORWARD:
                held += acts[action.chunk]
                peak = max(peak, held)
            elif action.kind.releases:
                held -= acts[action.chunk]
        forward = problem.input_bytes + state + buffers + max(work) + max(rebuilt) + peak
        largest = max(problem.range_largest_param_bytes[i][j] for i, j in own)
        per_param, per_largest = problem.optimizer_transient
        # stepped a chunk (of at most optimizer_chunk_bytes, or one tensor) at a time
        updated = params / shards
        if problem.optimizer_chunk_bytes > 0:
            updated = min(updated, max(problem.optimizer_chunk_bytes, largest))
        step_end = problem.input_bytes + state + updated * per_param + largest * per_largest
        memory.append(max(forward, step_end))
    return max(times), max(memory)


@pytest.mark.parametrize("seed", range(40))
def test_cut_search_is_exact(seed: int) -> None:
    """For every (positions, chunks, microbatches, recompute) of the choice set: the cut CutSearch returns fits
    and has the least t_max of all cuts that fit (brute force over every cut), or none fits."""
    problem = chunked_problem(seed)
    limit = problem.memory_limit_bytes
    model = CostModel(problem)
    configs = il.interleaved_configs(problem)
    for config in configs:
        search = il.CutSearch(problem, model, config)
        found = search.run()
        assert search.exact
        fitting = [t for t, m in brute_cuts(problem, config) if limit is None or m <= limit]
        if not fitting:
            assert found is None, config
            continue
        assert found is not None, config
        t_max, memory = reference_cut(problem, config, found)
        assert limit is None or memory <= limit * (1 + 1e-12)
        assert t_max == pytest.approx(min(fitting), rel=1e-12), config


@pytest.mark.parametrize("seed", range(20))
def test_cut_search_is_exact_with_additive_parameters(seed: int) -> None:
    """As above with every range's parameters the sum of its blocks' (no shared weights: the bound that counts
    the whole blocks a position has room for applies) and a limit among the cuts' memories again."""
    problem = chunked_problem(seed)
    n = len(problem.blocks)
    own = [problem.range_param_bytes[b][b] for b in range(n)]
    params = [[sum(own[i : j + 1]) if j >= i else 0.0 for j in range(n)] for i in range(n)]
    problem = dataclasses.replace(problem, range_param_bytes=params, memory_limit_bytes=None)
    configs = il.interleaved_configs(problem)
    memories = sorted(m for config in configs for _, m in brute_cuts(problem, config))
    if not memories:
        return
    for share in (0.2, 0.5):
        limit = memories[int(len(memories) * share)] * (1 + 1e-9)
        limited = dataclasses.replace(problem, memory_limit_bytes=limit)
        model = CostModel(limited)
        for config in configs:
            search = il.CutSearch(limited, model, config)
            found = search.run()
            assert search.exact
            fitting = [t for t, m in brute_cuts(limited, config) if m <= limit]
            if not fitting:
                assert found is None, config
                continue
            assert found is not None, config
            t_max, memory = reference_cut(limited, config, found)
            assert memory <= limit * (1 + 1e-12)
            assert t_max == pytest.approx(min(fitting), rel=1e-12), config


@pytest.mark.parametrize("seed", range(12))
def test_plan_memory_and_timings_match_the_definitions(seed: int) -> None:
    """The plan of a cut: every virtual stage's memory is its position's peak from the definitions, the
    simulator's positions hold the same (without the optimizer step's temporaries), and the chosen plan beats
    every other interleaved slice's cut and the other schedules' plan in simulated step time."""
    problem = chunked_problem(seed)
    model = CostModel(problem)
    for config in il.interleaved_configs(problem)[:6]:
        found = il.CutSearch(problem, model, config).run()
        if found is None:
            continue
        plan = il.interleaved_plan(problem, model, config, found)
        assert plan.chunks == config.chunks and plan.positions == config.positions
        _, memory = reference_cut(problem, config, found)
        assert max(stage.memory_bytes for stage in plan.stages) == pytest.approx(memory, rel=1e-9)
        timeline = simulate_plan(problem, plan)
        assert timeline.num_stages == config.positions and timeline.chunks == config.chunks
        for s, peak in enumerate(timeline.peak_memory):
            assert peak <= plan.stages[s].memory_bytes * (1 + 1e-9)
        for k, stage in enumerate(plan.stages):
            assert stage.ranks == plan.stages[k % config.positions].ranks
    try:
        chosen = plan_stages(problem)
    except PlanError:
        return
    step = simulate_plan(problem, chosen).step_time
    assert chosen.predicted_step_time == pytest.approx(step)
    others = dataclasses.replace(problem, schedules=(Schedule.ONE_F_ONE_B,))
    try:
        plain = plan_stages(others)
        assert step <= simulate_plan(others, plain).step_time * (1 + 1e-9)
    except PlanError:
        assert chosen.schedule == INTERLEAVED
    for config in il.interleaved_configs(problem):
        found = il.CutSearch(problem, CostModel(problem), config).run()
        if found is not None:
            other = il.interleaved_plan(problem, CostModel(problem), config, found)
            assert step <= simulate_plan(problem, other).step_time * (1 + 1e-9), config


def uniform_problem(num_blocks: int, world: int, batch: int, **kwargs) -> PlanProblem:
    blocks = [
        BlockProfile(fwd_time={1: 1e-3, 8: 8e-3}, bwd_time={1: 2e-3, 8: 16e-3}, activation_bytes={1: 1e6})
        for _ in range(num_blocks)
    ]
    params = [[1e6 * (j - i + 1) for j in range(num_blocks)] for i in range(num_blocks)]
    zeros = [[0.0] * num_blocks for _ in range(num_blocks)]
    settings = dict(schedules=(Schedule.ONE_F_ONE_B, INTERLEAVED), simulate_candidates=8)
    settings.update(kwargs)
    return PlanProblem(blocks, params, zeros, zeros, world_size=world, global_batch=batch, **settings)


def test_interleaving_equal_blocks_meets_the_closed_form() -> None:
    """Equal blocks, no transfers: S positions x v chunks of one block each run P microbatches in
    (P v + S - 1) t (Megatron-LM's bubble (S - 1) t, 1 / v of 1F1B's); the planner takes it over 1F1B's
    (P + S - 1) v t."""
    problem = uniform_problem(16, 4, 32, num_stages=4, max_microbatches=8, min_microbatches=8)
    plan = plan_stages(problem)
    assert plan.schedule == INTERLEAVED and plan.chunks == 4 and plan.microbatches == 8
    t = 3e-3 * 4  # forward + backward of one block at 4 samples
    assert plan.predicted_step_time == pytest.approx((8 * 4 + 4 - 1) * t)
    plain = plan_stages(dataclasses.replace(problem, schedules=(Schedule.ONE_F_ONE_B,)))
    assert plain.predicted_step_time == pytest.approx((8 + 4 - 1) * 4 * t)
    assert [(s.first_block, s.last_block) for s in plan.stages] == [(b, b) for b in range(16)]
    timeline = simulate_plan(problem, plan)
    assert timeline.bubble_fraction == pytest.approx((4 - 1) / (8 * 4 + 4 - 1))
    # schedule "auto" chooses it too
    assert plan_stages(dataclasses.replace(problem, schedules=AUTO_SCHEDULES)) == plan


def test_forced_chunks_and_positions() -> None:
    problem = uniform_problem(12, 4, 32, num_stages=2, chunks=3, max_microbatches=4, min_microbatches=4)
    plan = plan_stages(dataclasses.replace(problem, schedules=(INTERLEAVED,)))
    assert plan.chunks == 3 and plan.positions == 2 and len(plan.stages) == 6
    assert [s.ranks for s in plan.stages] == [[0, 1], [2, 3]] * 3
    assert plan.stages_of_rank(3) == [1, 3, 5] and plan.stage_of_rank(3) == 1


def test_microbatches_follow_the_schedules_rule() -> None:
    """Interleaving needs P >= positions and P a multiple of its rounds (P // positions)."""
    problem = uniform_problem(12, 4, 48, max_microbatches=12)
    for s in il.position_counts(problem):
        for p in il.interleaved_microbatch_counts(problem, s):
            assert p >= s and p % (p // s) == 0
            INTERLEAVED.actions(0, s, p, 2)  # accepted
    counts = il.interleaved_microbatch_counts(problem, 4)
    assert 3 not in counts and {4, 5, 6, 7, 8, 10, 12} <= set(counts)  # one round of 4..7, two of 8, 10, 12
    assert 9 not in counts and 11 not in counts  # 2 rounds do not divide 9 or 11


def test_replica_sizes_are_those_of_the_slices() -> None:
    """`rannc plan` estimates finer blocks only at these sizes: every slice of the finer cut must find its own."""
    problem = uniform_problem(8, 8, 96, max_microbatches=24)
    for num_blocks in (4, 8, 16):
        cut = uniform_problem(num_blocks, 8, 96, max_microbatches=24)
        used = {
            replica_microbatch_size(cut.global_batch, c.microbatches, c.replicas)
            for c in il.interleaved_configs(cut)
        }
        assert il.interleaved_replica_sizes(problem, num_blocks) == sorted(used)
    # 16 blocks also allow 8 positions of one replica (sizes 9 and 11: 96 samples in 11 or 9 microbatches)
    assert il.interleaved_replica_sizes(problem, 16) == list(range(1, 13))
    assert il.interleaved_replica_sizes(problem, 4) == [1, 2, 3, 4, 6, 8, 12]


def test_only_interleaved_without_a_cut_says_so() -> None:
    problem = uniform_problem(3, 4, 32, schedules=(INTERLEAVED,))  # 3 blocks: no 2 x 2 cut
    with pytest.raises(
        PlanError, match="no interleaved 1F1B plan exists for 4 rank.* and 3 blocks.*max_partition"
    ):
        plan_stages(problem)


def test_no_memory_for_interleaving_keeps_1f1b() -> None:
    """A limit that only 1F1B's fewer held microbatches meet: the plan stays 1F1B."""
    problem = uniform_problem(8, 2, 16, num_stages=2, max_microbatches=8, min_microbatches=8)
    plain = plan_stages(dataclasses.replace(problem, schedules=(Schedule.ONE_F_ONE_B,)))
    limit = max(stage.memory_bytes for stage in plain.stages)
    plan = plan_stages(dataclasses.replace(problem, memory_limit_bytes=limit))
    assert plan.schedule == Schedule.ONE_F_ONE_B


def test_interleaved_alone_where_only_1f1b_fits_says_so() -> None:
    """Interleaved 1F1B the only schedule, at a limit 1F1B meets and interleaving does not: the error names the
    schedule choice (how many slices were searched, 1F1B's least memory within the limit) instead of claiming
    that memory the device already has would fit."""
    problem = uniform_problem(8, 2, 16, num_stages=2, max_microbatches=8, min_microbatches=8)
    limit = minimum_memory_needed(dataclasses.replace(problem, schedules=(Schedule.ONE_F_ONE_B,)))
    alone = dataclasses.replace(problem, memory_limit_bytes=limit, schedules=(INTERLEAVED,))
    with pytest.raises(PlanError) as info:
        plan_stages(alone)
    message = str(info.value)
    assert re.search(r"no interleaved 1F1B plan fits in [\d.]+ GiB per device .*\(\d+ choice", message), (
        message
    )
    assert "although a 1F1B plan of the same blocks fits" in message and "would fit" not in message
    searched = il.best_interleaved(alone, CostModel(alone))
    assert searched.plan is None and searched.searched == len(il.interleaved_configs(alone)) > 0
    assert f"({searched.searched} choice(s)" in message
    # below 1F1B's least too: the front door's hint names 1F1B's figure as 1F1B's, and how to allow it
    short = dataclasses.replace(alone, memory_limit_bytes=limit / 2)
    with pytest.raises(PlanError, match="minimum memory") as info:
        plan_or_explain(short, 0.1, JOB_KNOBS)
    assert "that is what a 1F1B plan needs" in str(info.value) and "schedule='auto'" in str(info.value)


def test_chunks_with_room_keep_their_activations() -> None:
    """A recomputing slice's cut: the chunks whose positions have room stop recomputing (the runtime recomputes
    per chunk). Here position 0 holds 4 microbatches of chunk 0 and 2 of chunk 2, position 1 3 and 1 of chunks 1
    and 3; at the limit only chunk 0 must recompute. Brute force over all 16 choices: within the limit, none
    simulates faster, and none of the chunks still recomputing could stop."""
    limit = 28e6
    problem = uniform_problem(
        8,
        2,
        16,
        num_stages=2,
        chunks=2,
        max_microbatches=8,
        min_microbatches=8,
        allow_recompute=True,
        schedules=(INTERLEAVED,),
        memory_limit_bytes=limit,
    )
    config, ranges = il.ChunkedConfig(2, 2, 8, 1, True), [(0, 1), (2, 3), (4, 5), (6, 7)]
    model = CostModel(problem)
    flags = il.recompute_where_needed(problem, model, config, ranges)
    assert flags == [True, False, False, False]
    chosen = il.interleaved_plan(problem, model, config, ranges, recomputed=flags)
    assert [s.recompute for s in chosen.stages] == flags
    assert max(s.memory_bytes for s in chosen.stages) <= limit
    everywhere = il.interleaved_plan(problem, model, config, ranges)
    assert all(s.recompute for s in everywhere.stages)
    step = simulate_plan(problem, chosen).step_time
    assert step < simulate_plan(problem, everywhere).step_time
    assert chosen.predicted_step_time < everywhere.predicted_step_time
    fitting = []
    for choice in itertools.product([True, False], repeat=4):
        plan = il.interleaved_plan(problem, model, config, ranges, recomputed=list(choice))
        if max(s.memory_bytes for s in plan.stages) <= limit:
            fitting.append((simulate_plan(problem, plan).step_time, choice))
    assert min(fitting)[0] == pytest.approx(step)
    fits = {choice for _, choice in fitting}
    assert not any(tuple(f and j != k for j, f in enumerate(flags)) in fits for k in range(4) if flags[k])
    # without a memory limit no chunk recomputes; a slice that does not recompute is left as it is
    free = dataclasses.replace(problem, memory_limit_bytes=None)
    assert il.recompute_where_needed(free, CostModel(free), config, ranges) == [False] * 4
    plain = config._replace(recompute=False)
    assert il.recompute_where_needed(problem, model, plain, ranges) == [False] * 4


def test_simulated_memory_counts_every_chunk() -> None:
    """The timeline of a chunked plan: per position, the static bytes of its chunks and its held activations."""
    problem = uniform_problem(8, 2, 16, num_stages=2, chunks=2, max_microbatches=4, min_microbatches=4)
    plan = plan_stages(dataclasses.replace(problem, schedules=(INTERLEAVED,)))
    timings = stage_timings(problem, plan)
    assert len(timings) == 4
    timeline = simulate(timings, plan.microbatches, plan.schedule, chunks=plan.chunks)
    for s in range(2):
        static = sum(t.static_bytes for t in timings[s::2])
        assert timeline.peak_memory[s] > static
    assert list(itertools.chain.from_iterable(e for e in timeline.events))  # events per position


def _chunked_plan() -> tuple[PlanProblem, Plan]:
    problem = uniform_problem(8, 4, 16, num_stages=2, chunks=2, max_microbatches=4, min_microbatches=4)
    problem = dataclasses.replace(problem, schedules=(INTERLEAVED,))
    return problem, plan_stages(problem)


def test_plot_draws_positions_as_rows_and_chunks_apart(tmp_path) -> None:
    problem, plan = _chunked_plan()
    timeline = simulate_plan(problem, plan)
    parts = memory_parts(plan, timeline)
    assert len(parts) == 2  # per position
    assert [sum(p.values()) for p in parts] == pytest.approx(timeline.peak_memory, rel=1e-12)
    figure = plan_figure(plan, timeline, memory_limit=max(timeline.peak_memory) * 1.1)
    time_ax, memory_ax, gantt_ax = figure.get_axes()
    assert [t.get_text() for t in time_ax.get_xticklabels()] == [
        "p0.c0\n(stage 0)",
        "p0.c1\n(stage 2)",
        "p1.c0\n(stage 1)",
        "p1.c1\n(stage 3)",
    ]
    assert [t.get_text() for t in gantt_ax.get_yticklabels()] == ["position 0", "position 1"]
    legend = [t.get_text() for t in gantt_ax.get_legend().get_texts()]
    assert "forward, chunk 1" in legend and "backward, chunk 1" in legend
    # chunk 1's boxes are lighter than chunk 0's
    colors = {tuple(c.get_facecolor()[0]) for c in gantt_ax.collections}
    assert len(colors) > len({k for k in legend if "chunk" not in k})
    assert plot_plan(plan, timeline, tmp_path / "plan.png").stat().st_size > 10_000


def test_simulated_trace_names_chunks() -> None:
    problem, plan = _chunked_plan()
    timeline = simulate_plan(problem, plan)
    trace = timeline_to_trace(timeline, [s.ranks for s in plan.stages[: plan.positions]])
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    rank2 = [e for e in events if e["pid"] == 2 and e["name"][0] in "FB"]
    assert [e["name"] for e in rank2] == [str(a) for a in INTERLEAVED.actions(1, 2, 4, 2)]
    assert {e["args"]["chunk"] for e in rank2} == {0, 1}
    assert {e["args"]["stage"] for e in rank2} == {1, 3}
    assert {e["cat"] for e in rank2} == {"compute chunk 0", "compute chunk 1"}
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    assert names[2] == "rank 2 (position 1): stages 1, 3"
    assert trace["otherData"]["chunks"] == 2


def stacked_problem(
    shapes: list[tuple[float, float, float, float]], boundary: float, **fields: Any
) -> PlanProblem:
    """Interleaved-only blocks of (forward seconds, activation bytes, workspace bytes, parameter bytes) in a row,
    each cut between them carrying `boundary` bytes a sample; `fields`: the rest of the PlanProblem."""
    blocks = [
        BlockProfile(
            fwd_time={1: fwd, 8: 8 * fwd},
            bwd_time={1: 2 * fwd, 8: 16 * fwd},
            activation_bytes={1: act},
            workspace_bytes={1: work},
        )
        for fwd, act, work, _ in shapes
    ]
    per_block = [params for *_, params in shapes]
    n = len(blocks)
    params = [[sum(per_block[i : j + 1]) if j >= i else 0.0 for j in range(n)] for i in range(n)]
    largest = [[max(per_block[i : j + 1]) / 4 if j >= i else 0.0 for j in range(n)] for i in range(n)]
    ins = [[0.0 if i == 0 else boundary for _ in range(n)] for i in range(n)]
    outs = [[0.0 if j == n - 1 else boundary for j in range(n)] for _ in range(n)]
    return PlanProblem(
        blocks,
        params,
        ins,
        outs,
        schedules=(INTERLEAVED,),
        p2p_bandwidth=1e10,
        allreduce_bandwidth=1e10,
        range_largest_param_bytes=largest,
        allow_recompute=True,
        **fields,
    )


def gpt_like_problem(layers: int, positions: int) -> PlanProblem:
    """An embedding, `layers` equal transformer-like blocks and a heavier head on 2 ranks per position: large
    enough that the cut search cannot enumerate its cuts (16 virtual stages over 48 blocks for 8 positions)."""
    shapes = [(2e-4, 1e6, 4e6, 2e7)] + [(1e-3, 8e6, 6e6, 3e7)] * layers + [(8e-4, 1.2e7, 8e6, 3.3e7)]
    return stacked_problem(
        shapes,
        1e5,
        world_size=2 * positions,
        global_batch=8 * positions,
        opt_param_factor=6.0,
        max_microbatches=2 * positions,
    )


def balanced_ranges(num_blocks: int, count: int) -> list[tuple[int, int]]:
    size = num_blocks // count
    return [(k * size, (k + 1) * size - 1) for k in range(count)]


@pytest.mark.parametrize("recompute", [False, True])
def test_large_slice_takes_the_balanced_cut_or_proves_none_fits(recompute: bool) -> None:
    """8 positions x 2 chunks over 48 blocks: with the memory the balanced cut needs, the search returns a cut
    of its t_max (none is less: every virtual stage has 3 blocks); 5% less memory than that, it proves in a few
    nodes that no cut fits (every position needs 6 of the 48 blocks, which only the count of whole blocks shows;
    the search gave up after its node budget before that bound)."""
    problem = gpt_like_problem(46, 8)
    config = il.ChunkedConfig(8, 2, 16, 2, recompute)
    t_max, memory = reference_cut(problem, config, balanced_ranges(48, 16))
    fitting = dataclasses.replace(problem, memory_limit_bytes=memory * (1 + 1e-9))
    search = il.CutSearch(fitting, CostModel(fitting), config)
    found = search.run()
    assert search.exact and found is not None
    assert reference_cut(fitting, config, found)[0] == pytest.approx(t_max, rel=1e-12)
    if recompute:
        tight = dataclasses.replace(problem, memory_limit_bytes=memory * 0.95)
        search = il.CutSearch(tight, CostModel(tight), config)
        assert search.run() is None
        assert search.exact and search.nodes < 100


@pytest.mark.parametrize("layers", [46, 94])
def test_balanced_cut_that_fits_is_taken_without_a_search(layers: int) -> None:
    """When the cut of least t_max regardless of memory fits, it is the answer: no depth-first node is visited (on
    48 x 2 chunks over 96 blocks, the search ran out of nodes before finding one)."""
    positions = (layers + 2) // 6
    problem = gpt_like_problem(layers, positions)
    config = il.ChunkedConfig(positions, 2, 2 * positions, 2, True)
    t_max, memory = reference_cut(problem, config, balanced_ranges(layers + 2, 2 * positions))
    fitting = dataclasses.replace(problem, memory_limit_bytes=memory * 1.01)
    search = il.CutSearch(fitting, CostModel(fitting), config)
    found = search.run()
    assert search.exact and search.nodes == 0 and found is not None
    assert reference_cut(fitting, config, found)[0] == pytest.approx(t_max, rel=1e-12)
    assert search.t_max_bounds == (pytest.approx(t_max, rel=1e-12), pytest.approx(t_max, rel=1e-12))


def test_positions_short_of_state_room_prove_no_cut_fits() -> None:
    """8 positions x 2 chunks over 48 equal blocks, recomputing, 1% under the memory of the balanced cut: the
    parameter state the positions have room for between them, each with chunks it can take, is short of the
    model's (the first and last positions, holding the embedding and the head, have room for less than 6
    blocks' worth), so no cut fits; the search proves it before it descends (it ran out of nodes trying)."""
    problem = gpt_like_problem(46, 8)
    config = il.ChunkedConfig(8, 2, 16, 2, True)
    memory = reference_cut(problem, config, balanced_ranges(48, 16))[1]
    tight = dataclasses.replace(problem, memory_limit_bytes=memory * 0.99)
    search = il.CutSearch(tight, CostModel(tight), config)
    assert search.run() is None
    assert search.exact and search.nodes == 0


def alternating_problem(layers: int, positions: int) -> PlanProblem:
    """`layers` pairs of a light block (attention-like) and a heavy one (twice its parameters), one rank per
    position, with boundary inputs large enough that the positions early in the pipeline (holding more
    microbatches) have room for less parameter state than the late ones."""
    shapes = [(3.5e-4, 1e6, 6e6, 1e7), (6.5e-4, 1e6, 8e6, 2e7)] * layers
    return stacked_problem(
        shapes,
        4e6,
        world_size=positions,
        global_batch=4 * positions,
        opt_param_factor=2.0,
        max_microbatches=2 * positions,
    )


def test_light_and_heavy_blocks_prove_no_cut_fits_just_under_the_least_memory() -> None:
    """3 positions x 2 chunks over 6 light and 6 heavy blocks: just under the least memory of every cut (brute
    force), no cut fits, which the positions' room for parameter state shows before the search descends: in
    light blocks' worth the positions have room for 6, 5 and 6 of the model's 18 (neither counting whole
    blocks nor the aggregate bound proves it); at that memory the search finds a cut that fits."""
    problem = alternating_problem(6, 3)
    config = il.ChunkedConfig(3, 2, 6, 1, True)
    least = min(memory for _, memory in brute_cuts(problem, config))
    under = dataclasses.replace(problem, memory_limit_bytes=least * 0.999)
    search = il.CutSearch(under, CostModel(under), config)
    empty = np.zeros((3, il.CutSearch._FIELDS + 2))
    assert not search._too_few(0, 0, search._with_floor(empty, search.floor[0])) and not search._over(
        0, 0, empty
    )
    assert search.run() is None
    assert search.exact and search.nodes == 0
    at = dataclasses.replace(problem, memory_limit_bytes=least * (1 + 1e-9))
    search = il.CutSearch(at, CostModel(at), config)
    found = search.run()
    assert search.exact and found is not None
    assert reference_cut(at, config, found)[1] <= least * (1 + 1e-9)


def test_cut_search_out_of_nodes_keeps_a_fitting_cut(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A node budget that runs out while bisecting: the search returns the least cut it found (it fits), marked
    inexact, with bounds around the least t_max; best_interleaved plans it and says so."""
    problem = gpt_like_problem(46, 8)
    config = il.ChunkedConfig(8, 2, 16, 2, False)
    memory = reference_cut(problem, config, balanced_ranges(48, 16))[1]
    problem = dataclasses.replace(problem, memory_limit_bytes=memory * 0.95)
    model = CostModel(problem)
    search = il.CutSearch(problem, model, config)
    least = reference_cut(problem, config, search.run())[0]
    assert search.exact and search.t_max_bounds == pytest.approx((least, least))
    monkeypatch.setattr(il, "NODE_BUDGET", 60)
    search = il.CutSearch(problem, model, config)
    found = search.run()
    assert not search.exact and found is not None
    t_max, fits = reference_cut(problem, config, found)
    assert fits <= problem.memory_limit_bytes * (1 + 1e-12)
    low, high = search.t_max_bounds
    assert high == pytest.approx(t_max, rel=1e-12) and low <= least * (1 + 1e-12) and least <= t_max
    only = dataclasses.replace(problem, chunks=2, num_stages=8, min_microbatches=16)
    with caplog.at_level("INFO", logger="rannc.plan.interleave"):
        found = il.best_interleaved(only, CostModel(only))
    assert found.plan is not None and found.plan.chunks == 2 and found.inexact >= 1
    assert "keeping the cut that fits" in caplog.text


def test_cut_searches_share_a_node_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cut searches of one best_interleaved visit at most SEARCH_NODE_BUDGET nodes together: once spent, the
    slices left that could still beat the best plan are counted as skipped, not searched, and the best plan found
    so far stands."""
    problem = gpt_like_problem(46, 8)
    config = il.ChunkedConfig(8, 2, 16, 2, False)
    memory = reference_cut(problem, config, balanced_ranges(48, 16))[1]
    problem = dataclasses.replace(problem, memory_limit_bytes=memory * 0.95)
    model = CostModel(problem)
    visited: list[tuple[il.ChunkedConfig, int]] = []
    real = il._least_sharded_cut

    def recording(priced: Any, config: il.ChunkedConfig, nodes_left: int) -> il.ShardedCut:
        cut = real(priced, config, nodes_left)
        visited.append((config, cut.nodes))
        return cut

    monkeypatch.setattr(il, "_least_sharded_cut", recording)
    full = il.best_interleaved(problem, model)
    assert full.plan is not None and full.skipped == 0 and full.inexact == 0
    searching = [k for k, (_, nodes) in enumerate(visited) if nodes > 0]
    assert len(searching) >= 2  # the budget below stops the search after the first of them
    first = searching[0]
    monkeypatch.setattr(il, "SEARCH_NODE_BUDGET", visited[first][1])
    visited.clear()
    budgeted = il.best_interleaved(problem, model)
    assert budgeted.searched == len(visited) == first + 1 and budgeted.inexact == 0
    assert budgeted.skipped > 0 and budgeted.searched + budgeted.skipped <= len(
        il.interleaved_configs(problem)
    )
    plan = budgeted.plan
    assert plan is not None and plan.predicted_step_time >= full.plan.predicted_step_time
    chosen = visited[first][0]
    assert (plan.positions, plan.chunks, plan.microbatches) == (
        chosen.positions,
        chosen.chunks,
        chosen.microbatches,
    )


def test_positions_take_zero1_when_unsharded_does_not_fit() -> None:
    """shard_stages "auto" (every level allowed): a slice is cut unsharded when that fits and with ZeRO-1 (the
    optimizer state and its update over a position's replicas) when only that fits; ZeRO-2/3 alone is refused
    with the reason (a rank of several chunks cannot gather them per unit)."""
    problem = uniform_problem(
        8, 4, 16, num_stages=2, chunks=2, max_microbatches=4, min_microbatches=4, schedules=(INTERLEAVED,)
    )
    problem = dataclasses.replace(problem, opt_param_factor=6.0)
    unsharded = plan_stages(dataclasses.replace(problem, shard_levels=(ShardLevel.NONE,)))
    zero1 = plan_stages(dataclasses.replace(problem, shard_levels=(ShardLevel.ZERO_1,)))
    assert {s.shard for s in unsharded.stages} == {ShardLevel.NONE}
    assert {s.shard for s in zero1.stages} == {ShardLevel.ZERO_1}
    assert zero1.chunks == 2 and zero1.positions == 2 and all(s.replicas == 2 for s in zero1.stages)
    # 4 of the 8 blocks' parameters (1e6 bytes each) per position: optimizer state 6 x 4e6 bytes, halved
    saved = 6.0 * 4e6 / 2
    assert max(s.memory_bytes for s in unsharded.stages) - max(s.memory_bytes for s in zero1.stages) == (
        pytest.approx(saved)
    )
    timeline = simulate_plan(problem, zero1)  # the simulator prices the plan's ZeRO-1 as the planner did
    assert max(timeline.peak_memory) == pytest.approx(max(s.memory_bytes for s in zero1.stages))
    everything = dataclasses.replace(problem, shard_levels=tuple(ShardLevel))
    assert {s.shard for s in plan_stages(everything).stages} == {ShardLevel.NONE}  # fits unsharded
    limit = max(s.memory_bytes for s in zero1.stages) * (1 + 1e-9)
    tight = plan_stages(dataclasses.replace(everything, memory_limit_bytes=limit))
    assert {s.shard for s in tight.stages} == {ShardLevel.ZERO_1} and tight.schedule == INTERLEAVED
    with pytest.raises(PlanError, match="no plan fits"):
        plan_stages(dataclasses.replace(problem, shard_levels=(ShardLevel.NONE,), memory_limit_bytes=limit))
    with pytest.raises(PlanError, match="interleaved 1F1B cannot run sharded stages at zero-3"):
        plan_stages(dataclasses.replace(problem, shard_levels=(ShardLevel.ZERO_3,)))
