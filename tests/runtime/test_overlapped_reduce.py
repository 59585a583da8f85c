"""OverlappedReduce: buckets launch in their fixed order whatever order the gradients become final in, as soon
as they (and every bucket before them) are complete; `finish` reduces the rest and returns the sums."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from distributed_helpers import run_workers

from rannc.runtime.grad_sync import OverlappedReduce, _buckets

SHAPES = {"a": (3,), "b": (2, 2), "c": (5,), "d": (4,)}
BUCKETS = [["c", "b"], ["a"], ["d"]]  # last parameters first, as a stage's backward produces them


def grad(name: str, rank: int, part: int) -> torch.Tensor:
    """A distinct deterministic value per parameter, rank and part (0: earlier microbatches, 1: last)."""
    numel = torch.Size(SHAPES[name]).numel()
    return torch.arange(numel, dtype=torch.float32).view(SHAPES[name]) * (rank + 1) + 10 * part + ord(name)


def reduce_worker(rank: int, world: int) -> dict[str, Any]:
    params = {name: torch.zeros(shape, requires_grad=True) for name, shape in SHAPES.items()}
    # rank 0 accumulated every parameter in earlier microbatches; rank 1 only a and b
    accumulated = {n: grad(n, rank, 0) for n in (SHAPES if rank == 0 else ("a", "b"))}
    overlap = OverlappedReduce(dist.group.WORLD, BUCKETS, params, accumulated)
    # the last backward reaches a, b and c (never d), in a different order on each rank
    order = ["a", "b", "c"] if rank == 0 else ["c", "b", "a"]
    launched = []
    for name in order:
        overlap.ready(name, grad(name, rank, 1))
        launched.append(len(overlap.launched))
    reduced = overlap.finish()
    return {"launched": launched, "reduced": reduced, "left": sorted(accumulated)}


def expected_sum(name: str, world: int) -> torch.Tensor:
    total = torch.zeros(SHAPES[name])
    for rank in range(world):
        accumulated = rank == 0 or name in ("a", "b")
        if accumulated:
            total += grad(name, rank, 0)
        if name != "d":
            total += grad(name, rank, 1)
    return total


def test_buckets_launch_in_order_and_sum_accumulated_and_last_gradients() -> None:
    runs = run_workers(reduce_worker, 2, timeout=120)
    # rank 0: a is final first, but bucket 0 (c, b) must go first; b then c completes it, and a's bucket follows
    assert runs[0]["launched"] == [0, 0, 2]
    # rank 1: c, b complete bucket 0 at once; a launches bucket 1
    assert runs[1]["launched"] == [0, 1, 2]
    for run in runs:
        assert sorted(run["reduced"]) == sorted(SHAPES)
        for name in SHAPES:
            assert run["reduced"][name].shape == SHAPES[name]
            torch.testing.assert_close(run["reduced"][name], expected_sum(name, 2), rtol=0, atol=0)
        assert run["left"] == []  # every accumulated gradient was taken into the reduce


def test_overlap_buckets_follow_the_given_order_and_split_at_dtype_changes() -> None:
    tensors = {
        "w1": torch.zeros(4),
        "w2": torch.zeros(4),
        "h": torch.zeros(4, dtype=torch.float16),
        "w3": torch.zeros(4),
    }
    assert _buckets(["w3", "h", "w2", "w1"], tensors) == [["w3"], ["h"], ["w2", "w1"]]
