"""Zero bubble in real processes beyond the user-loop equivalences (tests/test_user_loops.py): dropout masks as
1F1B draws them (with and without recompute), GradScaler's skipped steps, and the trace of I and W passes."""

from __future__ import annotations

import json
import os

import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc


def _wrap(model: torch.nn.Module, cache: str, schedule: str, recompute: str = "never", **overrides):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapped = rannc.RaNNCModule(
        model,
        opt,
        partition_num=2,
        min_pipeline=4,
        max_pipeline=4,
        schedule=schedule,
        recompute=recompute,
        profile_iterations=1,
        show_progress=False,
        profile_cache_dir=cache,
        **overrides,
    )
    return wrapped, opt


def dropout_worker(rank: int, world: int, cache: str) -> list[dict[str, object]]:
    """The dropout MLP (p = 0.2) on 2 stages x 4 microbatches, 3 SGD steps from the same seed: 1F1B (its first
    run fills the profile cache, whose profiling draws masks too), 1F1B again, zero bubble, zero bubble with
    recompute. Each stage draws a microbatch's masks in its forward, in the same order under both schedules."""
    import feature_workers as fw

    runs: list[dict[str, object]] = []
    runs_of = (("1f1b", "never"), ("1f1b", "never"), ("zero_bubble", "never"), ("zero_bubble", "always"))
    for schedule, recompute in runs_of:
        wrapped, opt = _wrap(fw.build("dropout"), cache, schedule, recompute)
        torch.manual_seed(1234 + rank)
        losses = []
        for batch in fw.make_batches("dropout", 3, 8):
            loss = fw.loss_of("dropout", models.call(wrapped, models.local_slice(batch, rank, world)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert str(wrapped.deployment.plan.schedule) == schedule
        assert wrapped.stage.recompute == (recompute == "always")
        runs.append({"losses": losses, "state": wrapped.state_dict()})
    return runs


@pytest.mark.slow
def test_dropout_masks_are_those_of_one_f_one_b(tmp_path) -> None:
    for rank, (_, one_f_one_b, zero, zero_recompute) in enumerate(
        run_workers(dropout_worker, 2, str(tmp_path), timeout=300)
    ):
        for label, run in (("zero bubble", zero), ("zero bubble with recompute", zero_recompute)):
            assert run["losses"] == pytest.approx(one_f_one_b["losses"], rel=1e-6), f"rank {rank}: {label}"
            for name, value in one_f_one_b["state"].items():
                torch.testing.assert_close(
                    run["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"{label} {name}"
                )


def scaler_worker(rank: int, world: int, cache: str) -> dict:
    """Zero bubble under rannc.GradScaler: rank 0 plants an inf, every rank skips that step; a scaled clean step
    equals an unscaled one."""
    wrapped, opt = _wrap(models.build("mlp", 0), cache, "zero_bubble")
    scaler = rannc.GradScaler("cpu", init_scale=1024.0)
    batch = models.local_slice(models.make_batches("mlp", 0, 1, 8)[0], rank, world)
    scaler.scale(models.call(wrapped, batch)).backward()
    before = [p.detach().clone() for p in wrapped.parameters()]
    if rank == 0:
        next(iter(wrapped.parameters())).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, wrapped.parameters()))
    opt.zero_grad()
    scaler.scale(models.call(wrapped, batch)).backward()
    scaler.unscale_(opt)
    scaled = [p.grad.clone() for p in wrapped.parameters()]
    opt.zero_grad()
    models.call(wrapped, batch).backward()
    plain = [p.grad.clone() for p in wrapped.parameters()]
    return {
        "unchanged_after_inf": unchanged,
        "scale": float(scaler.get_scale()),
        "schedule": str(wrapped.deployment.plan.schedule),
        "same_gradients": all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(scaled, plain)),
    }


@pytest.mark.slow
def test_grad_scaler_with_zero_bubble(tmp_path) -> None:
    results = run_workers(scaler_worker, 2, str(tmp_path), timeout=240)
    for rank, result in enumerate(results):
        assert result["schedule"] == "zero_bubble"
        assert result["unchanged_after_inf"], f"rank {rank} stepped although rank 0 found an inf"
        assert result["same_gradients"], f"rank {rank}: unscaled gradients differ from an unscaled backward"
    assert results[0]["scale"] == results[1]["scale"] == 512.0


def trace_worker(rank: int, world: int, cache: str, trace_dir: str) -> list[str]:
    os.environ["RANNC_TRACE"] = trace_dir
    wrapped, opt = _wrap(models.build("mlp", 0), cache, "zero_bubble")
    for batch in models.make_batches("mlp", 0, 2, 8):
        models.call(wrapped, models.local_slice(batch, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    return []


@pytest.mark.slow
def test_trace_has_i_and_w_spans(tmp_path) -> None:
    """RANNC_TRACE: each rank's step trace has one I and one W span per microbatch, each W after its I, and no
    whole backward."""
    trace_dir = tmp_path / "trace"
    run_workers(trace_worker, 2, str(tmp_path / "cache"), str(trace_dir), timeout=240)
    files = sorted(trace_dir.rglob("*.json"))
    assert files, f"no trace written under {trace_dir}"
    for path in files:
        events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
        starts = {e["name"]: e["ts"] for e in events}
        for i in range(4):
            assert starts[f"W{i}"] > starts[f"I{i}"], path
        assert not any(e["name"].startswith("B") for e in events), path
