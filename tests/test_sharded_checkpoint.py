"""Sharded save on 4 ranks with torch.distributed.checkpoint, resume on 2 ranks with another plan.

SGD with momentum (its momentum buffers are the optimizer state saved and resumed): AdamW divides a near-zero
gradient by its near-zero second moment, so the rounding of another summation order (microbatches, ranks) became
a 5e-5 relative difference in one weight on an AVX2 CPU, while a wrong resume changes every weight by ~LR."""

from __future__ import annotations

import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc

STEPS, BATCH, LR = 4, 8, 1e-2


def _wrap(seed: int, cache: str, partition_num: int):
    model = models.build("skip_tied", seed)
    opt = models.make_optimizer("sgd", model.parameters(), LR)
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
    return opt, wrapped


def _train(opt, wrapped, batches, rank: int, world: int) -> None:
    for batch in batches:
        out = models.call(wrapped, models.local_slice(batch, rank, world))
        models.get_loss("skip_tied", out).backward()
        opt.step()
        opt.zero_grad()


def save_worker(rank: int, world: int, cache: str, path: str) -> None:
    opt, wrapped = _wrap(0, cache, 4)
    _train(opt, wrapped, models.make_batches("skip_tied", 0, STEPS, BATCH)[: STEPS // 2], rank, world)
    wrapped.save_sharded(path)


def resume_worker(rank: int, world: int, cache: str, path: str) -> dict | None:
    opt, wrapped = _wrap(123, cache, 1)  # other weights: everything must come from the checkpoint
    wrapped.load_sharded(path)  # deferred until the first call partitions the model
    _train(opt, wrapped, models.make_batches("skip_tied", 0, STEPS, BATCH)[STEPS // 2 :], rank, world)
    state = wrapped.state_dict()
    return {k: v.clone() for k, v in state.items()} if rank == 0 else None


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_another_world_size(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    run_workers(save_worker, 4, str(tmp_path / "c4"), path, timeout=300)
    resumed = run_workers(resume_worker, 2, str(tmp_path / "c2"), path, timeout=300)[0]
    reference = models.build("skip_tied", 0)
    opt = models.make_optimizer("sgd", reference.parameters(), LR)
    for batch in models.make_batches("skip_tied", 0, STEPS, BATCH):
        models.get_loss("skip_tied", models.call(reference, batch)).backward()
        opt.step()
        opt.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(
            resumed[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
