"""Trace files: simulated steps as Chrome/Perfetto JSON, the step tracer, and RANNC_TRACE on a real 1-rank run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_workers
from torch import nn

import rannc
from rannc.chrome_trace import merge_traces, write_trace
from rannc.plan.simulate import StageTiming, simulate
from rannc.plan.trace import timeline_to_trace
from rannc.runtime import trace as runtime_trace
from rannc.runtime.trace import StepTracer, current_tracer, trace_file
from rannc.schedule import actions_for


def complete(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def test_timeline_to_trace_has_one_process_per_rank(tmp_path: Path) -> None:
    times = [StageTiming(1e-3, 2e-3, comm_out=1e-4, allreduce=5e-4), StageTiming(1e-3, 2e-3, comm_in=1e-4)]
    timeline = simulate(times, 3, "1f1b")
    trace = timeline_to_trace(timeline, [[0, 2], [1]])
    events = complete(trace)
    for rank, stage in ((0, 0), (2, 0), (1, 1)):
        mine = [e for e in events if e["pid"] == rank]
        names = [e["name"] for e in mine if e["name"][0] in "FB"]
        assert names == [str(a) for a in actions_for("1f1b", stage, 2, 3)]
        expected = [e for e in timeline.events[stage]]
        assert [e["name"] for e in mine] == [e.name for e in expected]
        for got, want in zip(mine, expected):
            assert got["ts"] == pytest.approx(want.start * 1e6) and got["dur"] == pytest.approx(
                want.duration * 1e6
            )
    assert any(e["name"] == "allreduce" for e in events)
    assert any(e["name"].startswith("recv_grad") for e in events)
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    assert names == {0: "rank 0 (stage 0)", 2: "rank 2 (stage 0)", 1: "rank 1 (stage 1)"}
    assert {e["pid"] for e in complete(timeline_to_trace(timeline))} == {0, 1}  # pid = stage
    path = write_trace(tmp_path / "sub" / "sim.json", trace)
    assert json.loads(path.read_text()) == trace
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    other = write_trace(tmp_path / "list.json", events[:2])
    merged = merge_traces([path, other])
    assert len(merged["traceEvents"]) == len(trace["traceEvents"]) + 2
    with pytest.raises(ValueError):
        timeline_to_trace(timeline, [[0]])


def test_step_tracer_records_and_dumps_steps(tmp_path: Path) -> None:
    tracer = StepTracer(tmp_path)
    with tracer.span("F0", microbatch=0):
        with tracer.span("inner"):
            pass
    with tracer.span("B0"):
        pass
    with pytest.raises(RuntimeError), tracer.span("fails"):
        raise RuntimeError("boom")
    first = tracer.dump(rank=3)
    assert first == tmp_path / "rank3_step0.json"
    data = json.loads(first.read_text())
    events = complete(data)
    assert [e["name"] for e in events] == ["F0", "inner", "B0", "fails"]
    assert events[0]["args"] == {"microbatch": 0} and all(e["pid"] == 3 for e in events)
    assert events[0]["ts"] == 0.0 and all(e["dur"] >= 0 for e in events)
    assert events[0]["ts"] + events[0]["dur"] >= events[1]["ts"] + events[1]["dur"]  # nesting kept
    assert data["otherData"]["step"] == 0 and data["otherData"]["rank"] == 3
    with tracer.span("F1"):
        pass
    assert tracer.dump(rank=3) == tmp_path / "rank3_step1.json"
    with tracer.span("x"):
        pass
    templated = tracer.dump(tmp_path / "t" / "r{rank}-s{step}.json", rank=1)
    assert templated == tmp_path / "t" / "r1-s2.json" and templated.exists()
    assert trace_file("/a/b.json", 0, 5) == Path("/a/b.json")


def test_step_held_open_is_written_by_flush_or_by_its_backward(tmp_path: Path) -> None:
    tracer = StepTracer(tmp_path)
    with tracer.span("F0"):
        pass
    tracer.hold_open(rank=2)  # forward over; its backward may still add spans
    assert list(tmp_path.iterdir()) == []
    with tracer.span("grad_sync"):
        pass
    tracer.flush()
    data = json.loads((tmp_path / "rank2_step0.json").read_text())
    assert [e["name"] for e in complete(data)] == ["F0", "grad_sync"]
    tracer.flush()  # nothing open: writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank2_step0.json"]
    with tracer.span("F0"):
        pass
    tracer.hold_open(rank=2)
    tracer.flush()  # the next step starts without a backward
    assert (tmp_path / "rank2_step1.json").exists() and tracer.open_rank is None
    disabled = StepTracer(None)
    disabled.hold_open(rank=0)
    assert disabled.open_rank is None


def test_disabled_tracer_is_a_shared_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RANNC_TRACE", raising=False)
    tracer = current_tracer()
    assert not tracer.enabled and tracer is current_tracer()
    assert tracer.span("F0") is tracer.span("B1", microbatch=1)
    with tracer.span("F0"):
        pass
    assert tracer.spans == [] and tracer.dump(rank=0) is None
    monkeypatch.setenv("RANNC_TRACE", str(tmp_path))
    enabled = current_tracer()
    assert enabled.enabled and enabled is current_tracer() and enabled.target == str(tmp_path)
    assert current_tracer(tmp_path / "other") is not enabled
    runtime_trace._TRACERS.clear()


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return ((self.c(h) - y) ** 2).mean()


def traced_training(rank: int, world: int, trace_dir: str, cache_dir: str) -> dict[str, Any]:
    """Train a tiny model for one step per schedule: first without RANNC_TRACE, then with it."""
    os.environ.pop("RANNC_TRACE", None)
    listings: dict[str, Any] = {}
    for label, schedule in (("untraced", "1f1b"), ("fill_drain", "fill_drain"), ("1f1b", "1f1b")):
        if label != "untraced":
            os.environ["RANNC_TRACE"] = trace_dir
        torch.manual_seed(0)
        model = TinyMLP()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped = rannc.RaNNCModule(
            model,
            optimizer,
            profile_iterations=1,
            show_progress=False,
            min_pipeline=2,
            max_pipeline=2,
            schedule=schedule,
            profile_cache_dir=cache_dir,
        )
        x, y = torch.randn(4, 4), torch.randn(4, 1)
        wrapped(x, y).backward()
        optimizer.step()
        plan = wrapped.deployment.plan
        listings[label] = {
            "files": sorted(p.name for p in Path(trace_dir).iterdir()),
            "schedule": plan.schedule,
            "microbatches": plan.microbatches,
        }
    return listings


@pytest.mark.slow
def test_rannc_trace_writes_one_file_per_rank_and_step(tmp_path: Path) -> None:
    trace_dir = tmp_path / "traces"
    trace_dir.mkdir()
    (result,) = run_workers(traced_training, 1, str(trace_dir), str(tmp_path / "cache"), timeout=300)
    assert result["untraced"]["files"] == []
    assert result["fill_drain"]["files"] == ["rank0_step0.json"]
    assert result["1f1b"]["files"] == ["rank0_step0.json", "rank0_step1.json"]
    for step, schedule in ((0, "fill_drain"), (1, "1f1b")):
        assert result[schedule]["schedule"] == schedule and result[schedule]["microbatches"] == 2
        data = json.loads((trace_dir / f"rank0_step{step}.json").read_text())
        events = complete(data)
        actions = [e["name"] for e in events if e["name"][0] in "FB" and e["name"][1:].isdigit()]
        assert actions == [str(a) for a in actions_for(schedule, 0, 1, 2)]
        assert actions == (["F0", "F1", "B0", "B1"] if schedule == "fill_drain" else ["F0", "B0", "F1", "B1"])
        names = [e["name"] for e in events]
        assert "wait_sends" in names and "finish_backward" in names
        # Both schedules' steps end with the gradient sync (1F1B: in the loss's backward, after the forward).
        assert names[-1] == "grad_sync"
        if schedule == "1f1b":
            assert "assemble_outputs" in names and names.index("assemble_outputs") < names.index("grad_sync")
        starts = [e["ts"] for e in events]
        assert starts == sorted(starts) and all(e["pid"] == 0 and e["dur"] >= 0 for e in events)
