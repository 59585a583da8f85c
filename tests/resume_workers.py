"""Workers of tests/test_resume_full_state.py: a user's script that saves full state dicts, and a new job that
resumes from them."""

from __future__ import annotations

from typing import Any

import torch
from sharded_workers import build, train

import rannc

SAVED_AT, STEPS = 2, 4
LR, MOMENTUM = 0.05, 0.9


def wrap(seed: int, cache: str, partition_num: int) -> tuple[torch.optim.Optimizer, rannc.RaNNCModule]:
    model = build(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    wrapped = rannc.RaNNCModule(
        model,
        optimizer,
        partition_num=partition_num,
        min_pipeline=2,
        max_pipeline=2,
        profile_iterations=1,
        show_progress=False,
        profile_cache_dir=cache,
    )
    return optimizer, wrapped


def stages(wrapped: rannc.RaNNCModule) -> list[list[int]]:
    assert wrapped.deployment is not None
    return [sorted(int(r) for r in stage.ranks) for stage in wrapped.deployment.plan.stages]


def train_and_save(rank: int, world: int, cache: str, partition_num: int, path: str) -> dict[str, Any]:
    """SAVED_AT steps, the full state dicts written by rank 0 to `path`, then on to STEPS; the final state."""
    optimizer, wrapped = wrap(0, cache, partition_num)
    train(wrapped, optimizer, range(SAVED_AT), rank, world)
    model_state = wrapped.state_dict()  # every rank calls both (collectives); rank 0 gets the state
    optimizer_state = optimizer.state_dict(from_global=True)
    if rank == 0:
        torch.save({"model": model_state, "optimizer": optimizer_state}, path)
    train(wrapped, optimizer, range(SAVED_AT, STEPS), rank, world)
    final = wrapped.state_dict()
    return {"stages": stages(wrapped), "final": final if rank == 0 else None}


def resume(
    rank: int, world: int, cache: str, partition_num: int, checkpoint: str | dict[str, Any]
) -> dict[str, Any]:
    """A new job (other initial weights): the checkpoint read from the file `checkpoint` on every rank and loaded
    before the first call, or, given in memory (a dict passed to the spawned ranks, as torch.multiprocessing.spawn
    passes arguments: in shared memory), loaded after a first call; then on from SAVED_AT to STEPS."""
    optimizer, wrapped = wrap(123, cache, partition_num)
    if isinstance(checkpoint, str):
        saved = torch.load(checkpoint, weights_only=True)
    else:
        saved = checkpoint
        momentum = next(iter(saved["optimizer"]["state"].values()))["momentum_buffer"]
        assert momentum.is_shared(), "the in-memory checkpoint should reach the ranks in shared memory"
        with torch.no_grad():  # the first call partitions the model
            wrapped(torch.zeros(2, 16))
    wrapped.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"], from_global=True)
    train(wrapped, optimizer, range(SAVED_AT, STEPS), rank, world)
    final = wrapped.state_dict()
    return {"stages": stages(wrapped), "final": final if rank == 0 else None}


def one_process() -> dict[str, torch.Tensor]:
    model = build(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    train(model, optimizer, range(STEPS), 0, 1)
    return model.state_dict()
