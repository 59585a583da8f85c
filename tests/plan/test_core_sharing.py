"""The simulator on CPU ranks that share their host's cores (`CoreSharing`: processor sharing)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from plan_brute import linear_problem

from rannc.plan import plan_stages
from rannc.plan.simulate import (
    CoreSharing,
    StageTiming,
    _run_actions,
    _run_actions_sharing,
    core_sharing,
    simulate,
    simulate_plan,
)
from rannc.schedule import Schedule


def _one_host(positions: int, cores: int, measured: int) -> CoreSharing:
    return CoreSharing(cores, measured, tuple(((0, 1),) for _ in range(positions)))


@pytest.mark.parametrize(
    ("schedule", "chunks"),
    [("1f1b", 1), ("fill_drain", 1), ("zero_bubble", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)],
)
@pytest.mark.parametrize("post_ahead", [False, True])
def test_with_a_core_per_rank_the_event_loop_is_the_sweep(
    schedule: str, chunks: int, post_ahead: bool
) -> None:
    """Uncrowded (a core per rank, measured alone), the event-driven loop gives the sweep's events exactly: the
    same starts, ends and receive waits, whatever the stage costs and transfers."""
    rng = random.Random(7)
    positions, microbatches = 4, 8
    stages = [
        StageTiming(
            fwd=rng.uniform(1, 3),
            bwd=rng.uniform(2, 6),
            comm_in=rng.uniform(0, 0.5),
            comm_out=rng.uniform(0, 0.5),
            bwd_weight=rng.uniform(0.5, 1.5),
        )
        for _ in range(positions * chunks)
    ]
    lists = [Schedule(schedule).actions(s, positions, microbatches, chunks) for s in range(positions)]
    sweep = _run_actions(stages, lists, True, post_ahead)
    loop = _run_actions_sharing(stages, lists, True, post_ahead, _one_host(positions, positions, 1))
    assert sweep is not None and loop is not None
    for swept, looped in zip(sweep, loop):
        assert [(e.kind, e.microbatch, e.chunk) for e in swept] == [
            (e.kind, e.microbatch, e.chunk) for e in looped
        ]
        for a, b in zip(swept, looped):
            assert a.start == pytest.approx(b.start, rel=1e-12, abs=1e-12)
            assert a.end == pytest.approx(b.end, rel=1e-12, abs=1e-12)


def test_two_ranks_on_one_core_by_hand() -> None:
    """2 stages, 2 microbatches, 1F1B on one core, costs measured with both ranks computing (F 2 s, B 4 s: 1 and
    2 s of work at full speed). Worked by hand: F0 alone [0, 1]; F1 at stage 0 and F0 at stage 1 together at half
    speed [1, 3]; B0 at stage 1 alone [3, 5]; B0 at stage 0 and F1 at stage 1 together: F1 ends at 7, B0 has 1 s
    left; with B1 at stage 1 it ends at 9; B1 at stage 1 alone to 10; B1 at stage 0 [10, 12]. The step is the 12
    s of work on the one core; each rank alone on a device of its own would take 18 s."""
    stages = [StageTiming(fwd=2.0, bwd=4.0), StageTiming(fwd=2.0, bwd=4.0)]
    shared = simulate(stages, 2, "1f1b", sharing=_one_host(2, 1, 2))
    assert shared.step_time == pytest.approx(12.0)
    ends = {(e.kind.value, e.microbatch, s): e.end for s, row in enumerate(shared.events) for e in row}
    assert ends["F", 1, 0] == pytest.approx(3.0) and ends["F", 0, 1] == pytest.approx(3.0)
    assert ends["B", 0, 1] == pytest.approx(5.0) and ends["F", 1, 1] == pytest.approx(7.0)
    assert ends["B", 0, 0] == pytest.approx(9.0) and ends["B", 1, 1] == pytest.approx(10.0)
    assert simulate(stages, 2, "1f1b").step_time == pytest.approx(18.0)  # measured durations, a device each


def test_ranks_on_other_hosts_do_not_slow_each_other() -> None:
    """The same job with each rank on a host of its own core runs at full speed: half the measured durations
    when they were measured two to a core; a host holding both ranks shares its one core."""
    stages = [StageTiming(fwd=2.0, bwd=4.0), StageTiming(fwd=2.0, bwd=4.0)]
    apart = CoreSharing(1, 2, (((0, 1),), ((1, 1),)))
    assert simulate(stages, 2, "1f1b", sharing=apart).step_time == pytest.approx(9.0)  # 18 s at full speed
    together = CoreSharing(1, 2, (((0, 1),), ((0, 1),)))
    assert simulate(stages, 2, "1f1b", sharing=together).step_time == pytest.approx(12.0)


def test_never_faster_than_the_host_cores_can_compute() -> None:
    """However the bubbles fall, a host's ranks cannot finish their work sooner than its cores can do it, nor
    later than one rank after another would; with a core per rank measured alone, nothing changes."""
    rng = random.Random(3)
    for schedule in ("1f1b", "zero_bubble", "fill_drain"):
        stages = [StageTiming(fwd=rng.uniform(1, 2), bwd=rng.uniform(2, 4), bwd_weight=0.5) for _ in range(4)]
        work = sum(8 * (s.fwd + s.bwd) for s in stages)  # 8 microbatches, measured with 4 ranks on 2 cores
        step = simulate(stages, 8, schedule, sharing=_one_host(4, 2, 4)).step_time
        assert work / 2 / 2 * (1 - 1e-9) <= step <= work / 2 * (1 + 1e-9)
        alone = simulate(stages, 8, schedule, sharing=_one_host(4, 4, 1)).step_time
        assert alone == pytest.approx(simulate(stages, 8, schedule).step_time, rel=1e-12)


def test_a_plan_on_cpu_ranks_shares_its_hosts_cores() -> None:
    """`simulate_plan` shares the cores of the problem's hosts (`host_cores`; nodes of gpus_per_node ranks) among
    the plan's positions, and only on CPUs (no host_cores: a device per rank)."""
    problem = linear_problem(
        [1.0] * 8, [1e6] * 8, 4, 8, num_stages=4, max_microbatches=4, schedules=(Schedule.ONE_F_ONE_B,)
    )
    plan = plan_stages(problem)
    assert core_sharing(problem, plan) is None
    own = simulate_plan(problem, plan).step_time
    crowded = dataclasses.replace(problem, host_cores=2, measured_ranks=4)
    sharing = core_sharing(crowded, plan)
    assert sharing is not None and sharing.hosts == (((0, 1),),) * 4 and sharing.matters
    shared = simulate_plan(crowded, plan).step_time
    assert shared < own  # measured with every rank computing, the bubbles give the others cores
    two_nodes = dataclasses.replace(crowded, gpus_per_node=2)
    assert core_sharing(two_nodes, plan).hosts == (((0, 1),), ((0, 1),), ((1, 1),), ((1, 1),))
