"""Changed per-sample shapes, parameters moved away from the optimizer's rank, and unequal local batches."""

from __future__ import annotations

import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc


def _wrap(cache: str, partition_num: int = 2):
    model = models.build("skip_tied", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = rannc.RaNNCModule(
        model,
        opt,
        partition_num=partition_num,
        min_pipeline=2,
        max_pipeline=2,
        profile_iterations=1,
        show_progress=False,
        profile_cache_dir=cache,
    )
    return model, opt, wrapped


def checks_worker(rank: int, world: int, cache: str) -> dict:
    model, opt, wrapped = _wrap(cache)
    batch = models.local_slice(models.make_batches("skip_tied", 0, 1, 8)[0], rank, world)
    models.get_loss("skip_tied", models.call(wrapped, batch)).backward()
    result: dict = {}
    longer = {
        "args": [t.repeat(1, 2) if t.dim() == 2 else torch.cat([t, t], dim=1) for t in batch["args"]],
        "kwargs": batch["kwargs"],
    }
    try:
        models.call(wrapped, longer)
    except rannc.InputError as exc:
        result["shape_error"] = str(exc)
    away = [p for p in model.parameters() if p.numel() == 0]
    result["has_away"] = bool(away)
    if away:
        opt.add_param_group({"params": away[:1]})
    try:
        opt.step()
    except rannc.RanncError as exc:
        result["away_error"] = str(exc)
    return result


@pytest.mark.slow
def test_shape_change_and_moved_parameters(tmp_path) -> None:
    results = run_workers(checks_worker, 2, str(tmp_path), timeout=240)
    for result in results:
        assert "captured with" in result["shape_error"] and "max_seq_len" in result["shape_error"]
        if result["has_away"]:
            assert (
                "moved to ranks" in result["away_error"]
                and "RaNNCModule.parameters()" in result["away_error"]
            )
    assert any(r["has_away"] for r in results)


def uneven_worker(rank: int, world: int, cache: str) -> dict:
    _, opt, wrapped = _wrap(cache)
    batches = models.make_batches("skip_tied", 0, 2, 8)
    sizes = [3, 5]
    losses = []
    for batch in batches:
        lo = sum(sizes[:rank])
        local = models.slice_rows(batch, lo, lo + sizes[rank])
        out = models.call(wrapped, local)
        loss = models.get_loss("skip_tied", out)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        rows = models.batch_outputs("skip_tied", out)
    state = wrapped.state_dict()
    return {
        "losses": losses,
        "rows": {k: v.shape[0] for k, v in rows.items()},
        "state": state if rank == 0 else None,
    }


@pytest.mark.slow
def test_unequal_local_batches_equal_one_process(tmp_path) -> None:
    results = run_workers(uneven_worker, 2, str(tmp_path), timeout=240)
    reference = models.build("skip_tied", 0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    ref_losses = []
    for batch in models.make_batches("skip_tied", 0, 2, 8):
        loss = models.get_loss("skip_tied", models.call(reference, batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(float(loss.detach()))
    for rank, result in enumerate(results):
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6
        )
        assert all(n == [3, 5][rank] for n in result["rows"].values()), (
            f"rank {rank} got rows {result['rows']}"
        )
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(results[0]["state"][name], value, rtol=1e-5, atol=1e-6)
