"""Zero bubble in the planner: the cost model's ZB-H1 step against the simulator, the choice between 1F1B and zero
bubble by time and memory, and what `rannc show`, `--plot` and `--trace` draw of a zero-bubble plan."""

from __future__ import annotations

import dataclasses
import io

import pytest
from plan_brute import linear_problem
from rich.console import Console

from rannc.deploy import Deployment, show_deployment
from rannc.deploy.plot import memory_parts, plan_figure
from rannc.plan import plan_stages
from rannc.plan.cost import step_time
from rannc.plan.simulate import StageTiming, analytic_step_time, simulate, simulate_plan
from rannc.plan.trace import timeline_to_trace
from rannc.schedule import Schedule


def split_problem(weight_share: float = 0.5, **changes) -> object:
    """Four equal blocks on four ranks (no replicas pay: a pipeline), half of each backward on weights."""
    problem = linear_problem([1.0, 1.0, 1.0, 1.0], [1e6] * 4, world=4, batch=16, **changes)
    blocks = [
        dataclasses.replace(
            b,
            bwd_weight={m: t * weight_share for m, t in b.bwd_time.items()},
            deferred_grad_bytes={m: a / 2 for m, a in b.activation_bytes.items()},
        )
        for b in problem.blocks
    ]
    return dataclasses.replace(
        problem, blocks=blocks, allreduce_bandwidth=1e6, min_microbatches=8, max_microbatches=8
    )


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_cost_formula_is_the_simulated_zb_h1_step(num_stages: int) -> None:
    """Equal stages, no communication: sum max(t - 2W, 0) + (P - 1) max t + max (AR + 2W) is
    P (F + B) + (S - 1)(F + I - W), the simulated step, against 1F1B's P (F + B) + (S - 1)(F + B)."""
    f, i, w, p = 1.0, 1.2, 0.9, 8
    timing = StageTiming(fwd=f, bwd=i + w, bwd_weight=w)
    stages = [timing] * num_stages
    closed = p * (f + i + w) + (num_stages - 1) * (f + i - w)
    assert simulate(stages, p, Schedule.ZERO_BUBBLE).step_time == pytest.approx(closed)
    assert analytic_step_time(stages, p, split=True) == pytest.approx(closed)
    t = f + i + w
    paths = [max(t - 2 * w, 0.0)] * num_stages
    assert step_time([t] * num_stages, [2 * w] * num_stages, p, paths) == pytest.approx(closed)
    assert analytic_step_time(stages, p) == pytest.approx(p * t + (num_stages - 1) * t)


def test_planner_chooses_zero_bubble_when_it_fits_and_1f1b_when_not() -> None:
    schedules = (Schedule.ONE_F_ONE_B, Schedule.ZERO_BUBBLE)
    roomy = dataclasses.replace(split_problem(), schedules=schedules, num_stages=4)
    chosen = plan_stages(roomy)
    one_f_one_b = plan_stages(dataclasses.replace(roomy, schedules=(Schedule.ONE_F_ONE_B,)))
    assert chosen.schedule == Schedule.ZERO_BUBBLE and len(chosen.stages) == 4
    assert chosen.predicted_step_time < one_f_one_b.predicted_step_time
    assert all(stage.bwd_weight_time > 0 for stage in chosen.stages)
    # Zero bubble holds min(P, S) microbatches at every stage (and deferred gradients): the last stage needs
    # more than 1F1B's, so a limit between the two peaks leaves 1F1B.
    limit = (max(s.memory_bytes for s in one_f_one_b.stages) + max(s.memory_bytes for s in chosen.stages)) / 2
    tight = plan_stages(dataclasses.replace(roomy, memory_limit_bytes=limit))
    assert tight.schedule == Schedule.ONE_F_ONE_B


def test_the_simulated_memory_is_never_above_the_predicted() -> None:
    """The cost model counts activations and deferred gradients each at its own peak; the simulator follows
    every action: its peak is at most the prediction, and equal at the position that defers the most."""
    problem = dataclasses.replace(split_problem(), schedules=(Schedule.ZERO_BUBBLE,), num_stages=4)
    plan = plan_stages(problem)
    timeline = simulate_plan(problem, plan)
    for simulated, stage in zip(timeline.peak_memory, plan.stages):
        assert simulated <= stage.memory_bytes * (1 + 1e-12)
    assert timeline.peak_memory[-1] == pytest.approx(plan.stages[-1].memory_bytes, rel=1e-12)


def _zero_bubble_plan():
    problem = dataclasses.replace(split_problem(), schedules=(Schedule.ZERO_BUBBLE,), num_stages=4)
    plan = plan_stages(problem)
    return problem, plan, simulate_plan(problem, plan)


def test_trace_names_and_colours_i_and_w() -> None:
    _, plan, timeline = _zero_bubble_plan()
    events = [e for e in timeline_to_trace(timeline)["traceEvents"] if e["ph"] == "X"]
    names = {e["name"][0] for e in events if e.get("cat") == "compute"}
    assert names == {"F", "I", "W"}
    colours = {e["name"][0]: e["cname"] for e in events if e.get("cat") == "compute"}
    assert len(set(colours.values())) == 3


def test_plot_draws_i_and_w_and_what_they_keep() -> None:
    _, plan, timeline = _zero_bubble_plan()
    figure = plan_figure(plan, timeline, memory_limit=max(timeline.peak_memory) * 1.1)
    time_ax, memory_ax, gantt_ax = figure.axes[:3]
    bars = [t.get_text() for t in time_ax.get_legend().get_texts()]
    assert bars == ["forward", "input gradients (I)", "weight gradients (W)", "p2p (fwd+bwd)"]
    gantt = [t.get_text() for t in gantt_ax.get_legend().get_texts()]
    assert "input gradients (I)" in gantt and "weight gradients (W)" in gantt and "backward" not in gantt
    parts = memory_parts(plan, timeline)
    assert all(p["kept from I to W"] > 0 for p in parts)
    for stage_parts, peak in zip(parts, timeline.peak_memory):
        assert sum(stage_parts.values()) == pytest.approx(peak, rel=1e-12)


def test_show_has_i_and_w_columns() -> None:
    _, plan, _ = _zero_bubble_plan()
    deployment = Deployment(plan, "0" * 64, plan.world_size, None, [[] for _ in plan.stages])
    out = io.StringIO()
    show_deployment(deployment, console=Console(file=out, width=200))
    text = out.getvalue()
    assert "I ms" in text and "W ms" in text and "Bwd ms" not in text
    assert "schedule zero_bubble" in text and "zero bubble: each backward is an I pass" in text
