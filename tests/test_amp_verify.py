"""GradScaler agreement across ranks and the verification mode (real processes, gloo)."""

from __future__ import annotations

import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc
from rannc.verify import Verifier


def _wrap(cache: str, **overrides):
    model = models.build("mlp", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = rannc.RaNNCModule(model, opt, **models.forced_plan(2, profile_cache_dir=cache, **overrides))
    return model, opt, wrapped


def scaler_worker(rank: int, world: int, cache: str, plain: bool) -> dict:
    """Rank 0 plants an inf in one of its gradients: every rank must skip the step and lower the scale."""
    _, opt, wrapped = _wrap(cache)
    scaler = (torch.amp.GradScaler if plain else rannc.GradScaler)("cpu", init_scale=1024.0)
    batch = models.local_slice(models.make_batches("mlp", 0, 1, 8)[0], rank, world)
    loss = models.get_loss("mlp", models.call(wrapped, batch))
    scaler.scale(loss).backward()
    before = [p.detach().clone() for p in wrapped.parameters()]
    if rank == 0:
        next(iter(wrapped.parameters())).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, wrapped.parameters()))
    # a clean step afterwards is taken everywhere
    opt.zero_grad()
    loss = models.get_loss("mlp", models.call(wrapped, batch))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    # None on a rank that holds no parameter (the planner may leave the last stage only the loss)
    moved = not all(torch.equal(a, b) for a, b in zip(before, wrapped.parameters())) if before else None
    return {"unchanged_after_inf": unchanged, "scale": float(scaler.get_scale()), "moved_after_clean": moved}


@pytest.mark.slow
@pytest.mark.parametrize("plain", [True, False], ids=["torch.amp.GradScaler", "rannc.GradScaler"])
def test_grad_scaler_skips_the_same_step_on_every_rank(tmp_path, plain: bool) -> None:
    results = run_workers(scaler_worker, 2, str(tmp_path), plain, timeout=240)
    for rank, result in enumerate(results):
        assert result["unchanged_after_inf"], f"rank {rank} stepped although rank 0 found an inf"
        assert result["moved_after_clean"] is not False, f"rank {rank} did not step on the clean step"
    assert results[0]["moved_after_clean"], "rank 0 (the first stage, which holds parameters) did not step"
    assert results[0]["scale"] == results[1]["scale"] == 512.0


def verify_worker(rank: int, world: int, cache: str, corrupt: bool) -> dict:
    _, opt, wrapped = _wrap(cache, verify=True, verify_tolerance=1e-4)
    # A wrong gradient on one stage must be caught, and every rank told. The first stage holds parameters (the
    # input layer; the planner may leave the last stage only the loss, whose gradients no hook would change).
    if corrupt and rank == 0:
        for param in wrapped.parameters():
            param.register_hook(lambda grad: grad * 1.5)
    batch = models.local_slice(models.make_batches("mlp", 0, 1, 8)[0], rank, world)
    loss = models.get_loss("mlp", models.call(wrapped, batch))
    try:
        loss.backward()
    except rannc.RanncError as exc:
        return {"error": str(exc)}
    return {"report": wrapped._verifier.report if rank == 0 else None}


@pytest.mark.slow
def test_verify_reports_agreement(tmp_path) -> None:
    results = run_workers(verify_worker, 2, str(tmp_path), False, timeout=240)
    assert "error" not in results[0] and "error" not in results[1]
    report = results[0]["report"]
    assert report["gradients"] < 1e-5 and report["outputs"] < 1e-5


@pytest.mark.slow
def test_verify_fails_loudly_on_every_rank(tmp_path) -> None:
    results = run_workers(verify_worker, 2, str(tmp_path), True, timeout=240)
    for result in results:
        assert "error" in result, "verification missed a 1.5x gradient error"
        assert "does not reproduce the unpartitioned" in result["error"]


def _verifier_with(reference: dict[str, torch.Tensor]) -> Verifier:
    verifier = Verifier(torch.nn.Linear(1, 1), rank=0, tolerance=1e-4)
    verifier.reference_grads = reference
    return verifier


def test_verify_compares_a_zero_gradient_at_the_models_gradient_scale() -> None:
    """An attention key's bias has a zero gradient in exact arithmetic: two summation orders give rounding noise
    that differs by 100% of itself, which is agreement; a gradient that is small but wrong is still caught."""
    weight = torch.randn(64, 64)
    noise = torch.full((64,), 3e-9)
    _verifier_with({"w": weight, "key.bias": noise}).compare_grads({"w": weight.clone(), "key.bias": -noise})
    small = weight * 1e-3  # 1/1000 of the model's gradients, off by 2%
    with pytest.raises(rannc.RanncError, match="does not reproduce"):
        _verifier_with({"w": weight, "small": small}).compare_grads({"w": weight, "small": small * 1.02})
