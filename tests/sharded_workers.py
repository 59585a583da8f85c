"""Workers of tests/test_sharded_stages.py: a user's loop on a model whose stage is sharded over its replicas."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import rannc

LR, MOMENTUM, GLOBAL_BATCH, STEPS = 0.05, 0.9, 8, 4


class EqualLayers(nn.Module):
    """Four equal Linear layers: parameter-granular owners split them exactly in half over two replicas."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.Tanh())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build(seed: int = 0) -> EqualLayers:
    torch.manual_seed(seed)
    return EqualLayers()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 16, generator=g)


def train(model: Any, optimizer: torch.optim.Optimizer, steps: range, rank: int, world: int) -> None:
    rows = GLOBAL_BATCH // world
    for step in steps:
        x, y = batch(step)
        x, y = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def wrap(seed: int, cache: str, shard: str) -> tuple[torch.optim.Optimizer, rannc.RaNNCModule]:
    model = build(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    wrapped = rannc.RaNNCModule(
        model,
        optimizer,
        partition_num=1,
        min_pipeline=2,
        max_pipeline=2,
        shard_stages=shard,
        profile_iterations=1,
        show_progress=False,
        profile_cache_dir=cache,
    )
    return optimizer, wrapped


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def save_worker(rank: int, world: int, cache: str, path: str, shard: str) -> dict[str, Any]:
    """Two steps, a sharded save and the full state dicts, two more steps; what each rank held between steps."""
    optimizer, wrapped = wrap(0, cache, shard)
    train(wrapped, optimizer, range(1), rank, world)
    x, y = batch(1)
    rows = GLOBAL_BATCH // world
    F.mse_loss(wrapped(x[rank * rows : (rank + 1) * rows]), y[rank * rows : (rank + 1) * rows]).backward()
    held = {  # after a backward, before the step: parameters, gradients, optimizer state on this rank
        "params": _bytes(p for p in wrapped.parameters()),
        "grads": _bytes(p.grad for p in wrapped.parameters() if p.grad is not None),
        "optimizer": _bytes(
            v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
        ),
    }
    optimizer.step()
    optimizer.zero_grad()
    wrapped.save_sharded(path)
    full = wrapped.state_dict()
    full_optimizer = optimizer.state_dict(from_global=True)
    train(wrapped, optimizer, range(2, STEPS), rank, world)
    final = wrapped.state_dict()
    return {
        "shards": [str(s.shard) for s in wrapped.deployment.plan.stages],
        "held": held,
        "total": _bytes(build().parameters()),
        "full": full if rank == 0 else None,
        "full_optimizer": full_optimizer if rank == 0 else None,
        "final": final if rank == 0 else None,
    }


def resume_worker(
    rank: int, world: int, cache: str, path: str | None, shard: str, full: Any = None
) -> dict[str, torch.Tensor] | None:
    """Resume from the sharded checkpoint at `path` (or the full state dicts `full`) on a plan sharded at `shard`;
    the last two steps; the final state."""
    optimizer, wrapped = wrap(123, cache, shard)  # other weights: everything comes from the checkpoint
    if path is not None:
        wrapped.load_sharded(path)  # deferred until the first call partitions the model
    else:  # after a call that partitions the model (as tests/feature_workers.py `resume` "after")
        x, _ = batch(2)
        rows = GLOBAL_BATCH // world
        with torch.no_grad():
            wrapped(x[rank * rows : (rank + 1) * rows])
        model_state, optimizer_state = full
        wrapped.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state, from_global=True)
    train(wrapped, optimizer, range(2, STEPS), rank, world)
    assert [str(s.shard) for s in wrapped.deployment.plan.stages] == [shard if world > 1 else "none"]
    final = wrapped.state_dict()
    return final if rank == 0 else None


def one_process() -> dict[str, torch.Tensor]:
    model = build(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    train(model, optimizer, range(STEPS), 0, 1)
    return model.state_dict()
