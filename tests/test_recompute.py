"""Activation recompute (stage inputs kept, forward replayed in backward) equals one-process training."""

from __future__ import annotations

import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc


def two_stages(model: torch.nn.Module, cache: str, recompute: str, schedule: str = "auto") -> tuple:
    """`model` wrapped on 2 stages x 2 microbatches with SGD; returns (wrapped, optimizer)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plan = models.forced_plan(2, schedule=schedule, recompute=recompute, profile_cache_dir=cache)
    wrapped = rannc.RaNNCModule(model, opt, **plan)
    return wrapped, opt


def recompute_worker(rank: int, world: int, cache: str, schedule: str) -> dict | None:
    wrapped, opt = two_stages(models.build("skip_tied", 0), cache, "always", schedule)
    for batch in models.make_batches("skip_tied", 0, 2, 8):
        models.get_loss("skip_tied", models.call(wrapped, models.local_slice(batch, rank, world))).backward()
        opt.step()
        opt.zero_grad()
    assert wrapped.stage.recompute
    state = wrapped.state_dict()
    return state if rank == 0 else None


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "fill_drain"])
def test_recompute_matches_one_process(tmp_path, schedule: str) -> None:
    state = run_workers(recompute_worker, 2, str(tmp_path), schedule, timeout=240)[0]
    reference = models.build("skip_tied", 0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for batch in models.make_batches("skip_tied", 0, 2, 8):
        models.get_loss("skip_tied", models.call(reference, batch)).backward()
        opt.step()
        opt.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6)


def dropout_recompute_worker(rank: int, world: int, cache: str) -> list[dict[str, object]]:
    """The dropout MLP (p = 0.2) on 2 stages, 3 SGD steps, with recompute off, on, off, from the same seed.

    The first run fills the profile cache: profiling runs the model (drawing dropout masks) during the first call,
    after the seed, so only runs that all find the cache draw the same masks."""
    import feature_workers as fw

    runs: list[dict[str, object]] = []
    for recompute in ("never", "always", "never"):
        wrapped, opt = two_stages(fw.build("dropout"), cache, recompute)
        torch.manual_seed(1234 + rank)
        losses = []
        for batch in fw.make_batches("dropout", 3, 8):
            loss = fw.loss_of("dropout", models.call(wrapped, models.local_slice(batch, rank, world)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert wrapped.stage.recompute == (recompute == "always")
        runs.append({"losses": losses, "state": wrapped.state_dict()})
    return runs


@pytest.mark.slow
def test_recompute_replays_the_dropout_masks(tmp_path) -> None:
    """Recompute replays each microbatch's forward with the random state it first ran with: with dropout active,
    training with recompute gives the same losses and weights as without."""
    for rank, (_, with_recompute, without) in enumerate(
        run_workers(dropout_recompute_worker, 2, str(tmp_path), timeout=240)
    ):
        assert with_recompute["losses"] == pytest.approx(without["losses"], rel=1e-6), f"rank {rank} losses"
        for name, value in without["state"].items():
            torch.testing.assert_close(with_recompute["state"][name], value, rtol=1e-6, atol=1e-7)
