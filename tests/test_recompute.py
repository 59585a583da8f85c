"""Activation recompute (stage inputs kept, forward replayed in backward) equals one-process training."""

from __future__ import annotations

import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc


def recompute_worker(rank: int, world: int, cache: str, schedule: str) -> dict | None:
    model = models.build("skip_tied", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = rannc.RaNNCModule(
        model,
        opt,
        partition_num=2,
        min_pipeline=2,
        max_pipeline=2,
        schedule=schedule,
        recompute="always",
        profile_iterations=1,
        show_progress=False,
        profile_cache_dir=cache,
    )
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
