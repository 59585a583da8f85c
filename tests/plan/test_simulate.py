"""The step simulator against closed forms, a lower bound, an independent longest-path computation and the plan."""

from __future__ import annotations

import dataclasses
import random

import pytest
from plan_brute import cluster_problem, medium_problem, random_problem

from rannc.deploy.plot import memory_parts, plan_figure, plot_plan
from rannc.errors import PlanError
from rannc.plan import evaluate, plan_stages
from rannc.plan.simulate import (
    StageTiming,
    Timeline,
    analytic_step_time,
    bubble_bound,
    simulate,
    simulate_plan,
)
from rannc.schedule import Schedule, actions_for

SCHEDULES = ("1f1b", "fill_drain")
MODES = pytest.mark.parametrize("rendezvous", [True, False], ids=["rendezvous", "async"])


def random_timings(rng: random.Random, num_stages: int, comm: bool = True) -> list[StageTiming]:
    return [
        StageTiming(
            fwd=rng.choice([0.0, rng.uniform(0, 3)]),
            bwd=rng.uniform(0, 5),
            comm_in=rng.choice([0.0, rng.uniform(0, 1)]) if comm else 0.0,
            comm_out=rng.choice([0.0, rng.uniform(0, 1)]) if comm else 0.0,
            allreduce=rng.choice([0.0, rng.uniform(0, 4)]),
            activation_bytes=rng.uniform(0, 100),
            static_bytes=rng.uniform(0, 1000),
        )
        for _ in range(num_stages)
    ]


def longest_path(stage_times: list[StageTiming], p: int, schedule: str, rendezvous: bool):
    """Compute end times as the longest path through the DAG of actions (Kahn's order), from scratch.

    Node (s, k) = k-th action of stage s. Edges: (s, k-1) -> (s, k); producer -> consumer (F(i)@s-1 -> F(i)@s,
    B(i)@s+1 -> B(i)@s) and F(i)@s -> B(i)@s. An edge carries the consumer's receive time c (comm_in for an F
    with a producer, comm_out for a B with one): every edge with rendezvous, only the producer edge without.
    end(n) = max over edges (end(pred) + weight) + duration(n).
    """
    num = len(stage_times)
    lists = [actions_for(schedule, s, num, p) for s in range(num)]
    index = {(a.kind, a.microbatch, s): (s, k) for s in range(num) for k, a in enumerate(lists[s])}
    preds: dict[tuple[int, int], list[tuple[tuple[int, int], float]]] = {}
    for s in range(num):
        for k, action in enumerate(lists[s]):
            i = action.microbatch
            producer, c = None, 0.0
            if action.kind == "F" and s > 0:
                producer, c = index["F", i, s - 1], stage_times[s].comm_in
            elif action.kind == "B" and s < num - 1:
                producer, c = index["B", i, s + 1], stage_times[s].comm_out
            edges = []
            if k > 0:
                edges.append(((s, k - 1), c if rendezvous else 0.0))
            if producer is not None:
                edges.append((producer, c))
            if action.kind == "B":
                edges.append((index["F", i, s], c if rendezvous else 0.0))
            preds[s, k] = edges
    succs: dict[tuple[int, int], list[tuple[int, int]]] = {node: [] for node in preds}
    waiting = {node: len(edges) for node, edges in preds.items()}
    for node, edges in preds.items():
        for pred, _ in edges:
            succs[pred].append(node)
    queue = [node for node, count in waiting.items() if count == 0]
    end: dict[tuple[int, int], float] = {}
    while queue:
        node = queue.pop()
        s, k = node
        start = max([end[pred] + w for pred, w in preds[node]], default=0.0)
        action = lists[s][k]
        end[node] = start + (stage_times[s].fwd if action.kind == "F" else stage_times[s].bwd)
        for nxt in succs[node]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                queue.append(nxt)
    assert len(end) == len(preds), "the schedule's dependency graph has a cycle"
    ends = {(lists[s][k].kind, lists[s][k].microbatch, s): value for (s, k), value in end.items()}
    step = max(end[s, len(lists[s]) - 1] + stage_times[s].allreduce for s in range(num))
    return ends, step


def compute_ends(timeline: Timeline) -> dict[tuple[str, int, int], float]:
    return {
        (e.kind, e.microbatch, s): e.end
        for s, events in enumerate(timeline.events)
        for e in events
        if e.kind in ("F", "B")
    }


@pytest.mark.parametrize("schedule", SCHEDULES)
@MODES
def test_balanced_stages_without_comm_take_p_plus_s_minus_1_slots(schedule: str, rendezvous: bool) -> None:
    for num_stages in range(1, 6):
        for p in range(1, 9):
            for allreduce in (0.0, 0.7):
                times = [StageTiming(fwd=1.25, bwd=2.5, allreduce=allreduce)] * num_stages
                timeline = simulate(times, p, schedule, rendezvous=rendezvous)
                expected = (p + num_stages - 1) * 3.75 + allreduce
                assert timeline.step_time == pytest.approx(expected, rel=1e-12)
                assert analytic_step_time(times, p) == pytest.approx(expected, rel=1e-12)
                assert bubble_bound(times, p, rendezvous=rendezvous) == pytest.approx(expected, rel=1e-12)
                busy = num_stages * p * 3.75
                assert timeline.bubble_fraction == pytest.approx(1 - busy / (num_stages * expected))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_peak_inflight_and_memory(schedule: str) -> None:
    for num_stages in range(1, 6):
        for p in range(1, 9):
            times = [
                StageTiming(1.0, 2.0, activation_bytes=10.0 * (s + 1), static_bytes=7.0)
                for s in range(num_stages)
            ]
            timeline = simulate(times, p, schedule)
            expected = [min(p, num_stages - s) if schedule == "1f1b" else p for s in range(num_stages)]
            assert timeline.peak_inflight == expected
            assert timeline.peak_memory == [7.0 + 10.0 * (s + 1) * expected[s] for s in range(num_stages)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@MODES
@pytest.mark.parametrize("chunk", range(4))
def test_random_stages_match_longest_path_and_respect_the_bound(
    schedule: str, rendezvous: bool, chunk: int
) -> None:
    for seed in range(chunk * 50, chunk * 50 + 50):
        rng = random.Random(seed)
        num_stages, p = rng.randint(1, 6), rng.randint(1, 9)
        times = random_timings(rng, num_stages)
        timeline = simulate(times, p, schedule, rendezvous=rendezvous)
        ends, step = longest_path(times, p, schedule, rendezvous)
        got = compute_ends(timeline)
        assert got.keys() == ends.keys()
        for key, value in ends.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (seed, key)
        assert timeline.step_time == pytest.approx(step, rel=1e-12, abs=1e-12), seed
        assert timeline.step_time >= bubble_bound(times, p, rendezvous=rendezvous) * (1 - 1e-12), seed
        for s, events in enumerate(timeline.events):  # one thing at a time per stage, in time order
            assert all(a.end <= b.start + 1e-12 for a, b in zip(events, events[1:])), (seed, s)
        assert 0.0 <= timeline.bubble_fraction < 1.0 or timeline.step_time == 0.0


@MODES
def test_fill_drain_without_comm_is_two_flow_shops(rendezvous: bool) -> None:
    """GPipe with no transfers: sum f + (P-1) max f + sum b + (P-1) max b, never below the analytic formula."""
    rng = random.Random(7)
    for _ in range(200):
        num_stages, p = rng.randint(1, 6), rng.randint(1, 9)
        times = [dataclasses.replace(t, allreduce=0.0) for t in random_timings(rng, num_stages, comm=False)]
        fwd, bwd = [t.fwd for t in times], [t.bwd for t in times]
        expected = sum(fwd) + (p - 1) * max(fwd) + sum(bwd) + (p - 1) * max(bwd)
        step = simulate(times, p, "fill_drain", rendezvous=rendezvous).step_time
        assert step == pytest.approx(expected, rel=1e-12)
        assert step >= analytic_step_time(times, p) * (1 - 1e-12)


def test_rendezvous_receivers_wait_for_transfers() -> None:
    times = [StageTiming(1.0, 2.0, comm_out=0.5), StageTiming(1.0, 2.0, comm_in=0.5)]
    rendezvous = simulate(times, 1, "1f1b")
    names = [[e.name for e in events] for events in rendezvous.events]
    assert names == [["F0", "recv_grad0", "B0"], ["recv_act0", "F0", "B0"]]
    assert rendezvous.step_time == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)
    assert simulate(times, 1, "1f1b", rendezvous=False).step_time == pytest.approx(7.0)
    # In steady state a rendezvous receiver pays every transfer; an asynchronous one only during the fill.
    many = simulate(times, 6, "1f1b")
    assert many.step_time > simulate(times, 6, "1f1b", rendezvous=False).step_time


def test_receives_posted_ahead_overlap_the_action_before() -> None:
    """The runtime posts the receive of a position's next F or B as it starts the one before
    (`Pipeline._post_receives`): fill-drain on 2 stages (F = 1, B = 2, transfers 0.5), stage 1's second input
    arrives while it computes its first forward, so that forward starts at 2.5 (posted on arrival: 3.0)."""
    times = [StageTiming(1.0, 2.0, comm_out=0.5), StageTiming(1.0, 2.0, comm_in=0.5)]
    on_arrival = simulate(times, 2, "fill_drain")
    ahead = simulate(times, 2, "fill_drain", post_ahead=True)

    def second_forward(timeline):
        return next(e for e in timeline.events[1] if e.name == "F1")

    assert second_forward(on_arrival).start == pytest.approx(1.5 + 1.0 + 0.5)
    assert second_forward(ahead).start == pytest.approx(2.5)  # stage 0's F1 ends at 2, + 0.5 in flight
    # only the first transfer is waited for
    assert [e.name for e in ahead.events[1]][:3] == ["recv_act0", "F0", "F1"]
    assert ahead.step_time < on_arrival.step_time
    assert ahead.step_time >= simulate(times, 2, "fill_drain", rendezvous=False).step_time


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError):
        simulate([], 2, "1f1b")
    with pytest.raises(ValueError):
        simulate([StageTiming(1, 1)], 0, "1f1b")
    with pytest.raises(ValueError):
        simulate([StageTiming(1, 1)], 2, "zigzag")
    with pytest.raises(ValueError):
        simulate([StageTiming(-1, 1)], 2, "1f1b")


def _plans(count: int):
    for seed in range(count):
        for problem in (random_problem(seed), medium_problem(seed)):
            try:
                yield problem, plan_stages(problem)
            except PlanError:
                continue


def test_simulate_plan_uses_the_planner_costs() -> None:
    seen = 0
    for problem, plan in _plans(40):
        seen += 1
        timeline = simulate_plan(problem, plan)
        num_stages = len(plan.stages)
        assert timeline.num_stages == num_stages and timeline.microbatches == plan.microbatches
        ranges = [(stage.first_block, stage.last_block) for stage in plan.stages]
        result = evaluate(
            problem, ranges, [stage.replicas for stage in plan.stages], plan.microbatches, plan.schedule
        )
        assert result is not None and result[0] == pytest.approx(plan.predicted_step_time, rel=1e-12)
        for s, (timing, cost, stage) in enumerate(zip(timeline.stages, result[1], plan.stages)):
            assert (timing.fwd, timing.bwd, timing.allreduce) == (cost.fwd, cost.bwd, cost.allreduce)
            assert 2 * (timing.comm_in + timing.comm_out) == pytest.approx(cost.comm, rel=1e-12)
            assert timeline.peak_inflight[s] == cost.inflight
            assert timeline.peak_memory[s] == pytest.approx(stage.memory_bytes, rel=1e-12)
        split = plan.schedule.splits_backward
        assert analytic_step_time(timeline.stages, plan.microbatches, split=split) == pytest.approx(
            plan.predicted_step_time, rel=1e-12
        )
        steps = {}
        for rendezvous, ahead in ((True, True), (True, False), (False, False)):
            got = simulate_plan(problem, plan, rendezvous=rendezvous, post_ahead=ahead)
            bound = bubble_bound(
                got.stages, plan.microbatches, rendezvous=rendezvous, split=split, post_ahead=ahead
            )
            assert got.step_time >= bound * (1 - 1e-12)
            steps[rendezvous, ahead] = got.step_time
        # receives posted ahead (the runtime's) wait no longer than posted on arrival, and no shorter than data
        # that moves as soon as it is produced
        assert steps[False, False] * (1 - 1e-12) <= steps[True, True] <= steps[True, False] * (1 + 1e-12)
        assert timeline.step_time == steps[True, True]
        # the overlapped allreduce can only shorten the step
        apart = simulate_plan(dataclasses.replace(problem, overlap_grad_sync=False), plan)
        assert timeline.step_time <= apart.step_time * (1 + 1e-12)
        if num_stages == 1:  # one stage: no pipeline, no transfers; the formula is exact without overlap
            assert apart.step_time == pytest.approx(plan.predicted_step_time, rel=1e-12)
    assert seen > 20


def test_simulate_plan_with_recompute_and_inter_node_links() -> None:
    problem = cluster_problem(8, 8, 32, memory_limit_bytes=45e9, gpus_per_node=4)
    plan = plan_stages(problem)
    assert any(stage.recompute for stage in plan.stages)
    timeline = simulate_plan(problem, plan)
    ranges = [(stage.first_block, stage.last_block) for stage in plan.stages]
    replicas = [stage.replicas for stage in plan.stages]
    flags = [stage.recompute for stage in plan.stages]
    result = evaluate(problem, ranges, replicas, plan.microbatches, plan.schedule, recompute=flags)
    assert result is not None
    for timing, cost, stage in zip(timeline.stages, result[1], plan.stages):
        assert (timing.fwd, timing.bwd, timing.allreduce) == (cost.fwd, cost.bwd, cost.allreduce)
        assert 2 * (timing.comm_in + timing.comm_out) == pytest.approx(cost.comm, rel=1e-12)
        assert timing.memory_parts is not None
        assert ("recompute workspace" in timing.memory_parts) == stage.recompute
    assert timeline.peak_memory == pytest.approx([s.memory_bytes for s in plan.stages], rel=1e-12)
    assert analytic_step_time(timeline.stages, plan.microbatches) == pytest.approx(plan.predicted_step_time)
    bound = bubble_bound(timeline.stages, plan.microbatches, post_ahead=True)
    assert bound <= timeline.step_time <= plan.predicted_step_time


def test_plot_plan_writes_a_png(tmp_path) -> None:
    problem = medium_problem(3)
    plan = plan_stages(problem)
    timeline = simulate_plan(problem, plan)
    path = plot_plan(
        plan, timeline, tmp_path / "plots" / "plan.png", memory_limit=max(timeline.peak_memory) * 1.1
    )
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    parts = memory_parts(plan, timeline)
    assert [sum(p.values()) for p in parts] == pytest.approx(timeline.peak_memory, rel=1e-12)
    assert set(parts[0]) == {"parameters", "gradients", "optimizer", "buffers", "activations"}
    plain = simulate([StageTiming(1e-3, 2e-3, static_bytes=5.0)] * 2, 3, "fill_drain")
    assert memory_parts(None, plain) == [{"total": 5.0}, {"total": 5.0}]
    assert plot_plan(None, plain, tmp_path / "plain.png").stat().st_size > 0


def test_plot_legends_leave_the_bars_and_timeline_visible() -> None:
    """Every legend is drawn beside its plot, never over it (inside, the timeline's legend hid the last
    stage's final events), and the timeline names its event kinds in words."""
    problem = medium_problem(3)
    plan = plan_stages(problem)
    timeline = simulate_plan(problem, plan)
    figure = plan_figure(plan, timeline, memory_limit=max(timeline.peak_memory) * 1.1)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.get_axes()
    assert len(axes) == 3
    for ax in axes:
        legend = ax.get_legend()
        assert legend is not None
        box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.x0 >= area.x1, f"legend of {ax.get_ylabel() or ax.get_xlabel()!r} overlaps its plot"
    names = [t.get_text() for t in axes[2].get_legend().get_texts()]
    assert names == ["forward", "backward", "receive activations", "receive gradients"]


# ---- chunks and split backwards ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_stages", [2, 4, 6])
def test_split_and_chunked_schedules_meet_their_closed_forms(num_stages: int) -> None:
    """Balanced stages, no communication, F = I = W (B = 2F): over P microbatches 1F1B takes
    (P + S - 1)(F + B); ZB-H1 leaves a bubble of (S - 1)(F + I - W) (Qi et al.); interleaving v chunks of
    1/v of a stage divides 1F1B's bubble by v (Narayanan et al.)."""
    f, p = 1.0, 2 * num_stages
    whole = StageTiming(fwd=f, bwd=2 * f)
    split = StageTiming(fwd=f, bwd=2 * f, bwd_weight=f)
    work = p * 3 * f
    assert simulate([whole] * num_stages, p, "1f1b").step_time == pytest.approx(
        work + (num_stages - 1) * 3 * f
    )
    assert simulate([split] * num_stages, p, "zero_bubble").step_time == pytest.approx(
        work + (num_stages - 1) * f
    )
    for chunks in (2, 3):
        part = StageTiming(fwd=f / chunks, bwd=2 * f / chunks)
        timeline = simulate([part] * (num_stages * chunks), p, "interleaved_1f1b", chunks=chunks)
        assert timeline.step_time == pytest.approx(work + (num_stages - 1) * 3 * f / chunks)
        assert timeline.num_stages == num_stages and len(timeline.stages) == num_stages * chunks


def test_chunked_memory_counts_each_chunk_s_activations() -> None:
    """A position's peak holds its chunks' static bytes and, per held (microbatch, chunk), that chunk's
    activations; ZB-H1 holds 1F1B's first-stage count at every stage."""
    stages = [
        StageTiming(fwd=1, bwd=2, activation_bytes=10.0 * (k + 1), static_bytes=100.0 * (k + 1))
        for k in range(4)
    ]
    timeline = simulate(stages, 4, "interleaved_1f1b", chunks=2)  # position 0 runs stages 0 and 2
    actions = Schedule.INTERLEAVED_1F1B.actions(0, 2, 4, 2)
    held = peak = 0.0
    for action in actions:
        size = stages[0 if action.chunk == 0 else 2].activation_bytes
        held += size if action.kind == "F" else -size if action.kind == "B" else 0.0
        peak = max(peak, held)
    assert timeline.peak_memory[0] == pytest.approx(100.0 + 300.0 + peak)
    zero = simulate([StageTiming(fwd=1, bwd=2, bwd_weight=1, activation_bytes=1.0)] * 3, 6, "zero_bubble")
    assert zero.peak_inflight == [3, 3, 3] and zero.peak_memory == [3.0, 3.0, 3.0]


def test_weight_passes_fill_what_one_f_one_b_leaves_idle() -> None:
    """Every stage's W events lie after its I of the same microbatch, and the last stage's I events follow
    each other without waiting for its W's."""
    split = StageTiming(fwd=1, bwd=2, bwd_weight=1, comm_in=0.1, comm_out=0.1)
    timeline = simulate([split] * 3, 6, "zero_bubble")
    for events in timeline.events:
        ends = {(e.kind, e.microbatch): e for e in events}
        for i in range(6):
            assert ends["W", i].start >= ends["I", i].end
    assert {e.kind for events in timeline.events for e in events} >= {"F", "I", "W"}
