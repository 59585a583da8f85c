"""Chrome / Perfetto trace JSON ("traceEvents", complete "X" events in microseconds) of simulated steps."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for hints: rannc.runtime.trace imports this module without the simulator
    from .simulate import Timeline

__all__ = ["complete_event", "merge_traces", "name_event", "timeline_to_trace", "write_trace"]

_CATEGORY = {
    "F": "compute",
    "B": "compute",
    "recv_act": "p2p",
    "recv_grad": "p2p",
    "allreduce": "allreduce",
    "allreduce_shared": "allreduce",
    "update": "optimizer",
}


def complete_event(
    name: str,
    pid: int,
    tid: int,
    start_s: float,
    end_s: float,
    args: dict[str, Any] | None = None,
    cat: str = "",
) -> dict[str, Any]:
    """One "X" (complete) event; times in seconds become ts/dur in microseconds."""
    event: dict[str, Any] = {
        "name": name,
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": start_s * 1e6,
        "dur": max(end_s - start_s, 0.0) * 1e6,
    }
    if cat:
        event["cat"] = cat
    if args:
        event["args"] = args
    return event


def name_event(pid: int, name: str, tid: int | None = None) -> dict[str, Any]:
    """A metadata event naming a process (tid None) or a thread in the trace viewer."""
    if tid is None:
        return {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
    return {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


def timeline_to_trace(timeline: Timeline, stage_ranks: list[list[int]] | None = None) -> dict[str, Any]:
    """A trace of the simulated step: one process per rank (every replica of a stage gets the stage's events)
    when `stage_ranks` is given, else one process per stage; one thread; events named "F3", "B3",
    "recv_act3", "recv_grad3", "allreduce"."""
    if stage_ranks is not None and len(stage_ranks) != timeline.num_stages:
        raise ValueError(f"{len(stage_ranks)} rank lists for {timeline.num_stages} stages")
    events: list[dict[str, Any]] = []
    for s, stage_events in enumerate(timeline.events):
        owners = stage_ranks[s] if stage_ranks is not None else [s]
        for pid in owners:
            label = f"rank {pid} (stage {s})" if stage_ranks is not None else f"stage {s}"
            events.append(name_event(pid, label))
            events.append(name_event(pid, "simulated step", tid=0))
            for event in stage_events:
                args = {"stage": s} if event.microbatch < 0 else {"stage": s, "microbatch": event.microbatch}
                events.append(
                    complete_event(
                        event.name, pid, 0, event.start, event.end, args, _CATEGORY.get(event.kind, "")
                    )
                )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "source": "rannc.plan.simulate",
            "schedule": timeline.schedule,
            "microbatches": timeline.microbatches,
            "step_time_s": timeline.step_time,
            "bubble_fraction": timeline.bubble_fraction,
        },
    }


def write_trace(path: str | os.PathLike[str], events: dict[str, Any] | list[dict[str, Any]]) -> Path:
    """Write a trace (a full trace dict or a list of events) as JSON, atomically; create parent folders."""
    trace = events if isinstance(events, dict) else {"traceEvents": list(events)}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(trace, file)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def merge_traces(paths: Iterable[str | os.PathLike[str]]) -> dict[str, Any]:
    """One trace holding the events of several trace files (e.g. every rank's file of one step)."""
    events: list[dict[str, Any]] = []
    for path in paths:
        events.extend(json.loads(Path(path).read_text())["traceEvents"])
    return {"traceEvents": events, "displayTimeUnit": "ms"}
