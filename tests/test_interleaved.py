"""Interleaved 1F1B as a user meets it: checkpoints that move to and from other plans, the config items, a Hugging
Face GPT-2 (tied embeddings, residual connections across chunks) against one process, and the schedule choice."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc
from rannc.config import load_config
from rannc.errors import PlanError
from rannc.problem import AUTO_SCHEDULES, allowed_schedules, job_schedules
from rannc.schedule import Schedule, actions_for

STEPS, BATCH, LR = 4, 8, 1e-2
INTERLEAVED = dict(partition_num=2, chunks=2, schedule="interleaved_1f1b", min_pipeline=2, max_pipeline=2)
ONE_F_ONE_B = dict(partition_num=2, schedule="1f1b", min_pipeline=2, max_pipeline=2)


def _wrap(seed: int, cache: str, plan: dict[str, Any], name: str = "skip_tied", sgd: bool = False):
    model = models.build(name, seed)
    opt = _optimizer(model, sgd)
    wrapped = rannc.RaNNCModule(
        model, opt, profile_iterations=1, show_progress=False, profile_cache_dir=cache, **plan
    )
    return opt, wrapped


def _optimizer(model: torch.nn.Module, sgd: bool) -> torch.optim.Optimizer:
    """AdamW (state to checkpoint), or SGD with momentum for exact comparisons (AdamW divides a near-zero
    gradient by its near-zero second moment, turning rounding differences into whole updates)."""
    if sgd:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=LR)


def _train(opt: Any, model: Any, batches: list[Any], rank: int, world: int, name: str = "skip_tied") -> None:
    for batch in batches:
        out = models.call(model, models.local_slice(batch, rank, world))
        models.get_loss(name, out).backward()
        opt.step()
        opt.zero_grad()


def save_worker(rank: int, world: int, cache: str, path: str) -> dict[str, Any]:
    """Two steps interleaved (2 positions x 2 chunks), then a sharded checkpoint and the full state on rank 0."""
    opt, wrapped = _wrap(0, cache, INTERLEAVED, sgd=True)
    _train(opt, wrapped, models.make_batches("skip_tied", 0, STEPS, BATCH)[: STEPS // 2], rank, world)
    plan = wrapped.deployment.plan
    wrapped.save_sharded(path)
    state = wrapped.state_dict()
    optimizer_state = opt.state_dict(from_global=True)
    return {
        "schedule": str(plan.schedule),
        "chunks": plan.chunks,
        "state": {k: v.clone() for k, v in state.items()} if rank == 0 else None,
        "optimizer": optimizer_state if rank == 0 else None,
    }


def resume_worker(rank: int, world: int, cache: str, path: str) -> dict[str, Any]:
    """Resume the sharded checkpoint under a plain 1F1B plan of 2 stages and train the last two steps."""
    opt, wrapped = _wrap(
        123, cache, ONE_F_ONE_B, sgd=True
    )  # other weights: all must come from the checkpoint
    wrapped.load_sharded(path)  # deferred until the first call partitions the model
    _train(opt, wrapped, models.make_batches("skip_tied", 0, STEPS, BATCH)[STEPS // 2 :], rank, world)
    plan = wrapped.deployment.plan
    state = wrapped.state_dict()
    return {
        "schedule": str(plan.schedule),
        "chunks": plan.chunks,
        "state": {k: v.clone() for k, v in state.items()} if rank == 0 else None,
    }


def _reference(steps: int) -> torch.nn.Module:
    reference = models.build("skip_tied", 0)
    opt = _optimizer(reference, sgd=True)
    for batch in models.make_batches("skip_tied", 0, STEPS, BATCH)[:steps]:
        models.get_loss("skip_tied", models.call(reference, batch)).backward()
        opt.step()
        opt.zero_grad()
    return reference


def _assert_state(got: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_checkpoints_of_an_interleaved_plan_resume_on_other_plans(tmp_path: Path) -> None:
    """An interleaved job's sharded checkpoint resumes under 1F1B, and its full state dicts (model and optimizer:
    SGD's momentum buffers) under one plain process; both continue exactly as one process that never stopped."""
    path = str(tmp_path / "ckpt")
    saved = run_workers(save_worker, 2, str(tmp_path / "c1"), path, timeout=300)[0]
    assert saved["schedule"] == "interleaved_1f1b" and saved["chunks"] == 2
    _assert_state(saved["state"], _reference(STEPS // 2))
    resumed = run_workers(resume_worker, 2, str(tmp_path / "c2"), path, timeout=300)[0]
    assert resumed["schedule"] == "1f1b" and resumed["chunks"] == 1
    _assert_state(resumed["state"], _reference(STEPS))
    plain = models.build("skip_tied", 7)
    plain.load_state_dict(saved["state"])
    opt = _optimizer(plain, sgd=True)
    opt.load_state_dict(saved["optimizer"])
    _train(opt, plain, models.make_batches("skip_tied", 0, STEPS, BATCH)[STEPS // 2 :], 0, 1)
    _assert_state(plain.state_dict(), _reference(STEPS))


def gpt2_worker(rank: int, world: int, cache: str) -> dict[str, Any]:
    opt, wrapped = _wrap(0, cache, dict(INTERLEAVED, chunks=3, max_pipeline=4, min_pipeline=4), "gpt2", True)
    losses = []
    for batch in models.make_batches("gpt2", 0, 2, BATCH):
        out = models.call(wrapped, models.local_slice(batch, rank, world))
        loss = models.get_loss("gpt2", out)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    plan = wrapped.deployment.plan
    state = wrapped.state_dict()
    return {
        "chunks": plan.chunks,
        "positions": plan.positions,
        "losses": losses,
        "state": {k: v.clone() for k, v in state.items()} if rank == 0 else None,
    }


@pytest.mark.slow
def test_gpt2_interleaved_matches_one_process(tmp_path: Path) -> None:
    """A Hugging Face GPT-2 (tied wte / lm_head, residual connections) in 2 positions x 3 chunks on 2 ranks."""
    got = run_workers(gpt2_worker, 2, str(tmp_path / "c"), timeout=400)[0]
    assert got["chunks"] == 3 and got["positions"] == 2
    reference = models.build("gpt2", 0)
    opt = _optimizer(reference, sgd=True)
    losses = []
    for batch in models.make_batches("gpt2", 0, 2, BATCH):
        loss = models.get_loss("gpt2", models.call(reference, batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    for name, value in reference.state_dict().items():
        if name in got["state"]:
            torch.testing.assert_close(
                got["state"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_schedules_a_job_allows() -> None:
    assert Schedule.INTERLEAVED_1F1B in job_schedules(load_config(schedule="interleaved_1f1b"), True)
    assert job_schedules(load_config(), True)[-1] == Schedule.INTERLEAVED_1F1B  # "auto": the last on a tie
    # chunks = 1 leaves interleaving out of "auto"
    assert Schedule.INTERLEAVED_1F1B not in job_schedules(load_config(chunks=1), True)
    with pytest.raises(PlanError, match="interleaved 1F1B need"):
        allowed_schedules([Schedule.INTERLEAVED_1F1B], single_loss=False)
    assert allowed_schedules(AUTO_SCHEDULES, single_loss=False) == (Schedule.FILL_DRAIN,)


def traced_worker(rank: int, world: int, cache: str, trace_dir: str) -> dict[str, Any]:
    os.environ["RANNC_TRACE"] = trace_dir
    try:
        opt, wrapped = _wrap(0, cache, INTERLEAVED, "mlp", sgd=True)
        batch = models.make_batches("mlp", 0, 1, BATCH)[0]
        models.call(wrapped, models.local_slice(batch, rank, world)).backward()
        opt.step()
        return {"position": wrapped.deployment.plan.stage_of_rank(rank)}
    finally:
        os.environ.pop("RANNC_TRACE", None)


@pytest.mark.slow
def test_runtime_trace_names_each_chunk(tmp_path: Path) -> None:
    """RANNC_TRACE on an interleaved job: each rank's step lists its position's actions, chunk by chunk."""
    trace_dir = tmp_path / "traces"
    results = run_workers(traced_worker, 2, str(tmp_path / "c"), str(trace_dir), timeout=300)
    for rank, result in enumerate(results):
        data = json.loads((trace_dir / f"rank{rank}_step0.json").read_text())
        actions = [e for e in data["traceEvents"] if e["ph"] == "X" and e["name"][0] in "FB"]
        position = result["position"]
        assert [e["name"] for e in actions] == [
            str(a) for a in actions_for("interleaved_1f1b", position, 2, 2, 2)
        ]
        assert {(e["args"]["chunk"], e["args"]["stage"]) for e in actions} == {
            (0, position),
            (1, position + 2),
        }


def skip_tied_factory() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """tests/models.py's skip_tied model on the meta device (what the job builds for real)."""
    with torch.device("meta"):
        model = models.build("skip_tied", 0)
    batch = models.make_batches("skip_tied", 0, 1, 2)[0]
    return model, tuple(v.to("meta") for v in batch["args"]), {}


def unequal_worker(rank: int, world: int, path: str) -> dict[str, Any]:
    model = models.build("skip_tied", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrapped = rannc.RaNNCModule(
        model, optimizer, load_deployment=True, deployment_file=path, show_progress=False
    )
    _train(optimizer, wrapped, models.make_batches("skip_tied", 0, 2, 12), rank, world)
    plan = wrapped.deployment.plan
    state = wrapped.state_dict()
    return {
        "replicas": [s.replicas for s in plan.stages],
        "state": {k: v.clone() for k, v in state.items()} if rank == 0 else None,
    }


@pytest.mark.slow
def test_unequal_replicas_across_positions(tmp_path: Path) -> None:
    """The runtime runs any chunked layout, not only the planner's uniform one: an interleaved plan (2 positions
    x 2 chunks, from rannc plan) given 1 replica on position 0 and 2 on position 1 trains 3 ranks exactly as one
    process."""
    from rannc.deploy import load_deployment, save_deployment
    from rannc.offline import plan_offline

    result = plan_offline(
        f"{__name__}:skip_tied_factory",
        world_size=4,
        device_memory_bytes=None,
        global_batch=12,
        device="cpu",
        num_stages=2,
        schedules=("interleaved_1f1b",),
        chunks=2,
        max_microbatches=2,
        min_microbatches=2,
    )
    deployment = result.deployment
    ranks = [[0], [1, 2]]
    stages = [
        dataclasses.replace(stage, ranks=ranks[k % 2], replicas=len(ranks[k % 2]))
        for k, stage in enumerate(deployment.plan.stages)
    ]
    plan = dataclasses.replace(deployment.plan, stages=stages, world_size=3)
    path = tmp_path / "unequal.json"
    save_deployment(dataclasses.replace(deployment, plan=plan, world_size=3), path)
    assert load_deployment(path).plan.chunks == 2
    got = run_workers(unequal_worker, 3, str(path), timeout=300)
    assert got[0]["replicas"] == [1, 2, 1, 2]
    reference = models.build("skip_tied", 0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    _train(opt, reference, models.make_batches("skip_tied", 0, 2, 12), 0, 1)
    _assert_state(got[0]["state"], reference)


def mixed_recompute_worker(rank: int, world: int, cache: str) -> dict[str, Any]:
    """An interleaved plan whose chunks recompute or not one by one (what `recompute_where_needed` plans where only
    some chunks of a position have room for their activations): each position recomputes one of its two chunks."""
    import rannc.problem

    planned = rannc.problem.plan_stages

    def mixed(problem: Any) -> Any:
        plan = planned(problem)
        flags = [
            True,
            False,
            False,
            True,
        ]  # virtual stages 0..3: position 0 runs 0 and 2, position 1 runs 1 and 3
        return dataclasses.replace(
            plan,
            stages=[dataclasses.replace(s, recompute=f) for s, f in zip(plan.stages, flags, strict=True)],
        )

    rannc.problem.plan_stages = mixed
    opt, wrapped = _wrap(0, cache, dict(INTERLEAVED, recompute="auto"), sgd=True)
    _train(opt, wrapped, models.make_batches("skip_tied", 0, STEPS, BATCH), rank, world)
    state = wrapped.state_dict()
    return {
        "chunks": [chunk.recompute for chunk in wrapped.stage.chunks],
        "state": {k: v.clone() for k, v in state.items()} if rank == 0 else None,
    }


@pytest.mark.slow
def test_chunks_of_a_position_recompute_independently(tmp_path: Path) -> None:
    """A position that recomputes one chunk and keeps the other's activations trains exactly as one process."""
    results = run_workers(mixed_recompute_worker, 2, str(tmp_path / "c"), timeout=300)
    assert [r["chunks"] for r in results] == [[True, False], [False, True]]
    _assert_state(results[0]["state"], _reference(STEPS))
