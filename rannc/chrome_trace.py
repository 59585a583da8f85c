"""Chrome / Perfetto trace files ("traceEvents", complete "X" events in microseconds): events, write, merge.

The format both the planner's simulated steps (`rannc.plan.trace`) and the runtime's recorded steps
(`rannc.runtime.trace`) are written in; open the files in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .schedule import Action, ActionKind

__all__ = ["PASS_COLORS", "complete_event", "merge_traces", "name_event", "write_trace"]

# chrome://tracing's reserved colour names ("cname") for the schedule's passes: forwards, whole backwards, and a
# split backward's input-gradient (I) and weight-gradient (W) passes each in their own colour.
PASS_COLORS = {
    ActionKind.FORWARD: "rail_load",
    ActionKind.BACKWARD: "rail_response",
    ActionKind.BACKWARD_INPUT: "terrible",
    ActionKind.BACKWARD_WEIGHT: "yellow",
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
    """One "X" (complete) event; times in seconds become ts/dur in microseconds. An event named as a schedule
    action ("F3", "I3", "W3c1", ...) gets its pass's colour (`PASS_COLORS`)."""
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
    try:
        event["cname"] = PASS_COLORS[Action.parse(name).kind]
    except ValueError:
        pass
    if args:
        event["args"] = args
    return event


def name_event(pid: int, name: str, tid: int | None = None) -> dict[str, Any]:
    """A metadata event naming a process (tid None) or a thread in the trace viewer."""
    if tid is None:
        return {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}
    return {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


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
