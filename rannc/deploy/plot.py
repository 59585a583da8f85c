"""Draw a plan as a PNG: per-stage time bars, per-stage memory split with the limit, and a step's Gantt chart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..plan.simulate import EventKind, Timeline
from ..plan.types import Plan
from ..schedule import ActionKind
from .deployment import Deployment

__all__ = ["memory_parts", "plan_figure", "plot_plan"]

_EVENT_COLORS = {
    EventKind.FORWARD: "#4c72b0",
    EventKind.BACKWARD: "#dd8452",
    EventKind.BACKWARD_INPUT: "#c44e52",
    EventKind.BACKWARD_WEIGHT: "#e6b35c",
    EventKind.ALLREDUCE: "#55a868",
    EventKind.ALLREDUCE_SHARED: "#2f7d4a",
    EventKind.UPDATE: "#8c8c3c",
    EventKind.RECV_ACT: "#bbbbbb",
    EventKind.RECV_GRAD: "#999999",
}
# What each timeline event kind is, in the legend.
_EVENT_LABELS = {
    EventKind.FORWARD: "forward",
    EventKind.BACKWARD: "backward",
    EventKind.BACKWARD_INPUT: "input gradients (I)",
    EventKind.BACKWARD_WEIGHT: "weight gradients (W)",
    EventKind.ALLREDUCE: "gradient allreduce",
    EventKind.ALLREDUCE_SHARED: "shared-weight allreduce",
    EventKind.UPDATE: "optimizer update",
    EventKind.RECV_ACT: "receive activations",
    EventKind.RECV_GRAD: "receive gradients",
}
_COMPUTE = (EventKind.FORWARD, EventKind.BACKWARD, EventKind.BACKWARD_INPUT, EventKind.BACKWARD_WEIGHT)
# Legends sit right of their plot: inside, they hid the last stage's bars and the step's last events.
_LEGEND = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
_MEMORY_COLORS = {
    "parameters": "#4c72b0",
    "gradients": "#8172b3",
    "optimizer": "#c44e52",
    "buffers": "#937860",
    "activations": "#dd8452",
    "recompute workspace": "#da8bc3",
    "kept from I to W": "#f0c08a",
    "workspace": "#e6b35c",
    "optimizer + buffers": "#c44e52",
    "total": "#777777",
}
_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def memory_parts(plan: Plan | None, timeline: Timeline | None) -> list[dict[str, float]]:
    """Per stage (per position, when chunked), peak bytes per rank by kind.

    From the timeline's stage `memory_parts` plus activations (what the position holds at its peak) when it has
    them, a position's chunks added up, and with split backwards what the microbatches between their I and W
    passes keep apart; else from the plan (parameters, gradients = parameter bytes, activations, and the rest of
    the predicted memory as "optimizer + buffers"); else the timeline's total peak memory.
    """
    if timeline is not None and all(t.memory_parts for t in timeline.stages):
        out = []
        positions = timeline.num_stages
        for s in range(positions):
            own = timeline.stages[s::positions]
            parts: dict[str, float] = {}
            for timing in own:
                for name, value in (timing.memory_parts or {}).items():
                    parts[name] = parts.get(name, 0.0) + value
            held = timeline.peak_memory[s] - sum(t.static_bytes for t in own)
            if len(own) == 1 and own[0].deferred_bytes:
                parts["activations"] = own[0].activation_bytes * timeline.peak_inflight[s]
                parts["kept from I to W"] = max(held - parts["activations"], 0.0)
            else:
                parts["activations"] = held
            out.append(parts)
        return out
    if plan is not None:
        out = []
        positions = plan.positions
        for s in range(positions):
            own = plan.stages[s::positions]
            params = sum(stage.param_bytes for stage in own)
            activations = sum(stage.activation_bytes for stage in own)
            out.append(
                {
                    "parameters": params,
                    "gradients": params,
                    "optimizer + buffers": max(own[0].memory_bytes - 2 * params - activations, 0.0),
                    "activations": activations,
                }
            )
        return out
    if timeline is not None:
        return [{"total": memory} for memory in timeline.peak_memory]
    raise ValueError("need a plan or a timeline to draw memory")


def _shade(color: str, chunk: int) -> str:
    """`color` for model chunk 0, lighter for each later chunk (interleaved plans: chunks tell apart)."""
    if chunk == 0:
        return color
    red, green, blue = (int(color[k : k + 2], 16) for k in (1, 3, 5))
    mix = min(0.22 * chunk, 0.75)
    return "#" + "".join(f"{round(c + (255 - c) * mix):02x}" for c in (red, green, blue))


def _unit(largest: float) -> tuple[float, str]:
    for scale, name in _UNITS:
        if largest >= scale:
            return float(scale), name
    return 1.0, "B"


def plot_plan(
    deployment_or_plan: Deployment | Plan | None,
    timeline: Timeline,
    path: str | os.PathLike[str],
    memory_limit: float | None = None,
) -> Path:
    """Write a PNG of the plan (see `plan_figure`). Returns the path written."""
    figure = plan_figure(deployment_or_plan, timeline, memory_limit)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=100)
    return target


def plan_figure(
    deployment_or_plan: Deployment | Plan | None, timeline: Timeline, memory_limit: float | None = None
) -> Any:
    """A matplotlib Figure of the plan: (top) fwd/bwd/comm time per microbatch of each stage, (middle) peak
    memory per rank of each stage split by kind with a line at `memory_limit` (default: the deployment's device
    memory), (bottom) the simulated step as a Gantt chart, one row per stage. Uses matplotlib's Agg canvas (no
    pyplot, no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("plot_plan needs matplotlib: pip install matplotlib") from exc

    plan: Plan | None
    if isinstance(deployment_or_plan, Deployment):
        plan = deployment_or_plan.plan
        if memory_limit is None:
            memory_limit = deployment_or_plan.device_memory_bytes
    else:
        plan = deployment_or_plan
    num_stages = timeline.num_stages  # positions: the rows of the Gantt chart and the memory bars
    chunks = timeline.chunks
    if plan is not None and len(plan.stages) != len(timeline.stages):
        raise ValueError(f"the plan has {len(plan.stages)} stages but the timeline {len(timeline.stages)}")

    figure = Figure(figsize=(12.5, 9.5), layout="constrained")
    FigureCanvasAgg(figure)
    time_ax, memory_ax, gantt_ax = figure.subplots(3, 1, height_ratios=[1, 1, 1.3])
    stages = list(range(num_stages))
    labels = [f"stage {s}" for s in stages] if chunks == 1 else [f"position {s}" for s in stages]

    # Top: seconds per microbatch by phase, per (virtual) stage; chunked: by position, its chunks side by side;
    # split backwards: the I and W passes apart.
    order = sorted(range(len(timeline.stages)), key=lambda k: (k % num_stages, k // num_stages))
    slots = list(range(len(order)))
    ordered = [timeline.stages[k] for k in order]
    phases: dict[str, list[float]] = {"forward": [t.fwd * 1e3 for t in ordered]}
    colors = {"forward": _EVENT_COLORS[EventKind.FORWARD], "p2p (fwd+bwd)": "#aaaaaa"}
    if timeline.schedule.splits_backward:
        for kind in (EventKind.BACKWARD_INPUT, EventKind.BACKWARD_WEIGHT):
            name = _EVENT_LABELS[kind]
            phases[name] = [t.duration(ActionKind(kind.value)) * 1e3 for t in ordered]
            colors[name] = _EVENT_COLORS[kind]
    else:
        phases["backward"] = [t.bwd * 1e3 for t in ordered]
        colors["backward"] = _EVENT_COLORS[EventKind.BACKWARD]
    phases["p2p (fwd+bwd)"] = [2 * (t.comm_in + t.comm_out) * 1e3 for t in ordered]
    _stacked_bars(time_ax, slots, phases, colors)
    time_ax.set_ylabel("ms / microbatch")
    layout = f"{num_stages} stage(s)" if chunks == 1 else f"{num_stages} positions x {chunks} chunks"
    time_ax.set_title(
        f"{layout}, {timeline.microbatches} microbatches, {timeline.schedule}: simulated step "
        f"{timeline.step_time * 1e3:.2f} ms, bubble {timeline.bubble_fraction:.0%}"
        + (f" (planner predicted {plan.predicted_step_time * 1e3:.2f} ms)" if plan is not None else "")
    )
    if chunks == 1:
        time_ax.set_xticks(slots, labels)
    else:
        time_ax.set_xticks(slots, [f"p{k % num_stages}.c{k // num_stages}\n(stage {k})" for k in order])

    # Middle: memory per rank by kind.
    parts = memory_parts(plan, timeline)
    kinds: list[str] = []
    for stage_parts in parts:
        kinds.extend(k for k in stage_parts if k not in kinds)
    largest = max([sum(p.values()) for p in parts] + [memory_limit or 0.0])
    scale, unit = _unit(largest)
    series = {k: [p.get(k, 0.0) / scale for p in parts] for k in kinds}
    _stacked_bars(memory_ax, stages, series, {k: _MEMORY_COLORS.get(k, "#cccccc") for k in kinds})
    if memory_limit is not None:
        memory_ax.axhline(memory_limit / scale, color="red", linestyle="--", label="memory limit")
        memory_ax.legend(**_LEGEND)
    memory_ax.set_ylabel(f"peak {unit} / rank")

    memory_ax.set_xticks(stages, labels)

    # Bottom: Gantt chart of the step.
    boxes = sum(1 for events in timeline.events for e in events if e.kind in _COMPUTE)
    for s, events in enumerate(timeline.events):
        for event in events:
            color = _shade(_EVENT_COLORS.get(event.kind, "#cccccc"), event.chunk)
            gantt_ax.broken_barh(
                [(event.start * 1e3, event.duration * 1e3)],
                (s - 0.4, 0.8),
                facecolors=color,
                edgecolor="white",
            )
            if event.kind in _COMPUTE and boxes <= 96 and timeline.step_time > 0:
                if event.duration / timeline.step_time > 0.02:
                    gantt_ax.text(
                        (event.start + event.duration / 2) * 1e3,
                        s,
                        event.name,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white",
                    )
    gantt_ax.set_yticks(stages, labels)
    gantt_ax.set_ylim(num_stages - 0.5, -0.5)
    gantt_ax.set_xlim(0, max(timeline.step_time * 1e3, 1e-9))
    gantt_ax.set_xlabel("ms")
    kinds_seen = [k for k in _EVENT_COLORS if any(e.kind == k for ev in timeline.events for e in ev)]
    handles = [Patch(color=_EVENT_COLORS[k], label=_EVENT_LABELS[k]) for k in kinds_seen]
    for chunk in range(1, chunks):  # later chunks in lighter shades of their pass's colour
        for kind in (EventKind.FORWARD, EventKind.BACKWARD):
            label = f"{_EVENT_LABELS[kind]}, chunk {chunk}"
            handles.append(Patch(color=_shade(_EVENT_COLORS[kind], chunk), label=label))
    gantt_ax.legend(handles=handles, **_LEGEND)
    return figure


def _stacked_bars(ax: Any, stages: list[int], series: dict[str, list[float]], colors: dict[str, str]) -> None:
    bottom = [0.0] * len(stages)
    for name, values in series.items():
        ax.bar(stages, values, bottom=bottom, label=name, color=colors.get(name, "#cccccc"), width=0.6)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.legend(**_LEGEND)
