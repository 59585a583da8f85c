"""Chrome / Perfetto trace of a simulated step (one process per rank or per stage)."""

from __future__ import annotations

from typing import Any

from ..chrome_trace import complete_event, name_event
from .simulate import EventKind, Timeline

__all__ = ["timeline_to_trace"]

_CATEGORY = {
    EventKind.FORWARD: "compute",
    EventKind.BACKWARD: "compute",
    EventKind.BACKWARD_INPUT: "compute",
    EventKind.BACKWARD_WEIGHT: "compute",
    EventKind.RECV_ACT: "p2p",
    EventKind.RECV_GRAD: "p2p",
    EventKind.ALLREDUCE: "allreduce",
    EventKind.ALLREDUCE_SHARED: "allreduce",
    EventKind.UPDATE: "optimizer",
}


def timeline_to_trace(timeline: Timeline, stage_ranks: list[list[int]] | None = None) -> dict[str, Any]:
    """A trace of the simulated step: one process per rank (every replica of a stage gets the stage's events)
    when `stage_ranks` is given, else one process per stage; one thread; events named "F3", "B3" (zero bubble:
    "I3" and "W3"), "recv_act3", "recv_grad3", "allreduce". A chunked (interleaved) timeline has one process per
    position (its ranks: `stage_ranks` lists positions then), and its events name their chunk ("F3c1") and carry
    it in their args and category ("compute chunk 1")."""
    if stage_ranks is not None and len(stage_ranks) != timeline.num_stages:
        raise ValueError(f"{len(stage_ranks)} rank lists for {timeline.num_stages} stages")
    chunked = timeline.chunks > 1
    where = "position" if chunked else "stage"
    events: list[dict[str, Any]] = []
    for s, stage_events in enumerate(timeline.events):
        owners = stage_ranks[s] if stage_ranks is not None else [s]
        for pid in owners:
            label = f"rank {pid} ({where} {s})" if stage_ranks is not None else f"{where} {s}"
            if chunked:
                label += (
                    f": stages {', '.join(str(c * timeline.num_stages + s) for c in range(timeline.chunks))}"
                )
            events.append(name_event(pid, label))
            events.append(name_event(pid, "simulated step", tid=0))
            for event in stage_events:
                args: dict[str, Any] = {where: s}
                if event.microbatch >= 0:
                    args["microbatch"] = event.microbatch
                category = _CATEGORY.get(event.kind, "")
                if chunked and event.microbatch >= 0:
                    args["chunk"] = event.chunk
                    args["stage"] = event.chunk * timeline.num_stages + s
                    category = f"{category} chunk {event.chunk}"
                events.append(complete_event(event.name, pid, 0, event.start, event.end, args, category))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "source": "rannc.plan.simulate",
            "schedule": timeline.schedule,
            "chunks": timeline.chunks,
            "microbatches": timeline.microbatches,
            "step_time_s": timeline.step_time,
            "bubble_fraction": timeline.bubble_fraction,
        },
    }
