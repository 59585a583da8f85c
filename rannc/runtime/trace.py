"""Record spans of real pipeline steps; with RANNC_TRACE set, write a Chrome trace per rank per step."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..chrome_trace import complete_event, name_event, write_trace

__all__ = ["ENV_VAR", "StepTracer", "current_tracer", "forget_tracers", "trace_file"]

ENV_VAR = "RANNC_TRACE"
_NO_OP = contextlib.nullcontext()


def trace_file(target: str | os.PathLike[str], rank: int, step: int) -> Path:
    """target/rank{rank}_step{step}.json, or `target` formatted with rank and step when it is a file name
    template (contains "{" or ends in ".json")."""
    text = os.fspath(target)
    if "{" in text or text.endswith(".json"):
        return Path(text.format(rank=rank, step=step))
    return Path(text) / f"rank{rank}_step{step}.json"


class StepTracer:
    """Spans (name, start, end, args) of one rank's current step, times in seconds from the step's first span.

    `span(name, **args)` is a context manager; when the tracer has no target it returns a shared no-op
    context manager and records nothing. `dump(path, rank)` writes the step's spans and starts the next step.
    """

    def __init__(self, trace: str | os.PathLike[str] | None = None) -> None:
        self.target = os.fspath(trace) if trace else None
        self.step = 0  # number of the step being recorded
        self.spans: list[tuple[str, float, float, dict[str, Any]]] = []
        self._origin: float | None = None
        self._origin_unix = 0.0
        self.open_rank: int | None = None  # a step whose forward ended and whose backward may still add spans

    @property
    def enabled(self) -> bool:
        return self.target is not None

    def span(self, name: str, **args: Any) -> contextlib.AbstractContextManager[None]:
        if self.target is None:
            return _NO_OP
        return self._record(name, args)

    @contextlib.contextmanager
    def _record(self, name: str, args: dict[str, Any]) -> Iterator[None]:
        start = time.perf_counter()
        if self._origin is None:
            self._origin, self._origin_unix = start, time.time()
        try:
            yield
        finally:
            self.spans.append((name, start - self._origin, time.perf_counter() - self._origin, args))

    def hold_open(self, rank: int) -> None:
        """The step's forward is over but its backward (gradient sync) belongs to it too: `dump` it later, or
        `flush` before the next step starts when no backward comes."""
        if self.target is not None:
            self.open_rank = rank

    def flush(self) -> None:
        """Write a step left open by `hold_open` (a forward whose backward never ran)."""
        if self.open_rank is not None:
            self.dump(rank=self.open_rank)

    def events(self, rank: int) -> list[dict[str, Any]]:
        """The recorded spans as trace events of process `rank`, thread 0, in the order they started."""
        ordered = sorted(self.spans, key=lambda span: span[1])
        return [name_event(rank, f"rank {rank}"), name_event(rank, "pipeline", tid=0)] + [
            complete_event(name, rank, 0, start, end, args or None, "runtime")
            for name, start, end, args in ordered
        ]

    def dump(self, path: str | os.PathLike[str] | None = None, rank: int = 0) -> Path | None:
        """Write this step's trace for `rank` to `trace_file(path, rank, step)` (path: a folder or a file name
        that may contain "{rank}" and "{step}"; default: the tracer's target), then clear the spans and
        advance the step. Returns the file written, or None when disabled and no path is given."""
        target = path if path is not None else self.target
        if target is None:
            return None
        file = trace_file(target, rank, self.step)
        trace = {
            "traceEvents": self.events(rank),
            "displayTimeUnit": "ms",
            "otherData": {
                "source": "rannc.runtime.trace",
                "rank": rank,
                "step": self.step,
                "step_start_unix_s": self._origin_unix,
            },
        }
        written = write_trace(file, trace)
        self.spans = []
        self._origin = None
        self.open_rank = None
        self.step += 1
        return written


_DISABLED = StepTracer(None)
_TRACERS: dict[str, StepTracer] = {}


def current_tracer(trace: str | os.PathLike[str] | None = None) -> StepTracer:
    """This process's tracer for `trace` (default: $RANNC_TRACE); the shared disabled tracer when neither is set.

    ``RANNC_TRACE=<dir>`` makes every rank write ``<dir>/rank{rank}_step{step}.json`` after each step (step =
    this process's count of traced steps, from 0; a deferred fill-drain step ends after its backward). A value
    containing ``{`` or ending in ``.json`` is a file name template instead, formatted with ``rank`` and
    ``step`` (e.g. ``RANNC_TRACE=/tmp/t/{rank}-{step}.json``). Unset or empty: spans are a shared no-op.
    One tracer per target per process, so its step counter runs across calls.
    """
    target = os.fspath(trace) if trace else os.environ.get(ENV_VAR)
    if not target:
        return _DISABLED
    tracer = _TRACERS.get(target)
    if tracer is None:
        tracer = _TRACERS[target] = StepTracer(target)
    return tracer


def forget_tracers() -> None:
    """Drop this process's tracers (rannc.clear()): a later step starts a new trace count."""
    _TRACERS.clear()
