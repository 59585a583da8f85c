"""A stage without parameters (only activations, reshapes and the loss): its rank holds nothing to train, yet
state_dict(), checkpoints (state dict files and save_sharded) and training work on it as on any other rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_workers
from models import forced_plan
from torch import nn

import rannc

STEPS = 3


class FrontWeights(nn.Module):
    """Every parameter in the first operation: any cut into 2 stages leaves the last one none."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        for _ in range(4):
            h = torch.tanh(h) + 0.5 * h.roll(1, dims=1)
        return nn.functional.mse_loss(h.reshape(-1, 4, 4).sum(1), y)


class BackWeights(nn.Module):
    """Every parameter in the last operation before the loss: a cut before it leaves the first stage none, a cut
    after it leaves the last stage only the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.repeat(1, 2)
        for _ in range(4):
            h = torch.tanh(h) + 0.5 * h.roll(1, dims=1)
        return nn.functional.mse_loss(self.fc(h), y)


MODELS = {"front": FrontWeights, "back": BackWeights}


def batches(rows: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(rows, 8, generator=g), torch.randn(rows, 4, generator=g)) for _ in range(STEPS)]


def build(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MODELS[kind]()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def step(
    model: Any, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...], rank: int, world: int
) -> float:
    x, y = batch
    lo, hi = rank * len(x) // world, (rank + 1) * len(x) // world
    loss = model(x[lo:hi], y[lo:hi])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def worker(rank: int, world: int, kind: str, directory: str) -> dict[str, Any]:
    """2 steps, a full state dict file and a sharded checkpoint, a 3rd step; then the 3rd step again from the
    sharded checkpoint (momentum included), and the state dict file loaded back."""
    model, optimizer = build(kind)
    wrapped = rannc.RaNNCModule(model, optimizer, **forced_plan(2, profile_cache_dir=f"{directory}/profiles"))
    data = batches()
    losses = [step(wrapped, optimizer, batch, rank, world) for batch in data[:2]]
    saved = wrapped.state_dict()  # every rank calls it; rank 0 gets the full state
    if rank == 0:
        torch.save(saved, f"{directory}/model.pt")
    wrapped.save_sharded(f"{directory}/ckpt")
    losses.append(step(wrapped, optimizer, data[2], rank, world))
    final = wrapped.state_dict(rank0_only=False)
    wrapped.load_sharded(f"{directory}/ckpt")
    resumed = step(wrapped, optimizer, data[2], rank, world)
    resumed_state = wrapped.state_dict(rank0_only=False)
    wrapped.load_state_dict(torch.load(f"{directory}/model.pt", weights_only=True))
    return {
        "held": [name for name, _ in wrapped.named_parameters()],
        "losses": losses,
        "saved": saved,
        "final": final,
        "resumed_loss": resumed,
        "resumed_state": resumed_state,
        "reloaded": wrapped.state_dict(),
    }


def one_process(kind: str) -> dict[str, Any]:
    model, optimizer = build(kind)
    losses, states = [], []
    for batch in batches():
        losses.append(step(model, optimizer, batch, 0, 1))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return {"losses": losses, "states": states}


def assert_same(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(state) == set(expected), what
    for name, value in expected.items():
        assert torch.allclose(state[name], value, rtol=1e-5, atol=1e-7), f"{what}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_rank_without_parameters_saves_loads_and_trains(kind: str, tmp_path: Path) -> None:
    runs = run_workers(worker, 2, kind, str(tmp_path), timeout=300)
    assert sorted(len(run["held"]) for run in runs) == [0, 2], [run["held"] for run in runs]
    reference = one_process(kind)
    for rank, run in enumerate(runs):
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-5), rank
        assert run["resumed_loss"] == run["losses"][2], rank  # the same step from the same state and momentum
        assert_same(run["final"], reference["states"][2], f"rank {rank}: after {STEPS} steps")
        assert_same(
            run["resumed_state"], run["final"], f"rank {rank}: the last step again after load_sharded"
        )
    assert runs[1]["saved"] == {} and runs[1]["reloaded"] == {}
    assert_same(runs[0]["saved"], reference["states"][1], "state_dict() after 2 steps")
    assert_same(runs[0]["reloaded"], runs[0]["saved"], "the state dict file loaded back")
