"""Wrapping and planning leave every random generator as they found it: a seeded script draws the same numbers
wrapped or not, and trains the same whether the profile cache is cold or warm."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed_helpers import run_workers
from torch import nn

import rannc


class DropoutMLP(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(8, 32),
            nn.Dropout(p),
            nn.Tanh(),
            nn.Linear(32, 32),
            nn.Dropout(p),
            nn.Tanh(),
            nn.Linear(32, 1),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.layers(x), y)


def seeded_script(rank: int, world: int, cache_dir: str, p: float, wrap: bool) -> dict[str, Any]:
    """A user's script: seeds once at the top, builds and wraps the model, then draws every batch."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = DropoutMLP(p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if wrap:
        model = rannc.RaNNCModule(
            model,
            optimizer,
            partition_num=min(world, 2),
            min_pipeline=2,
            max_pipeline=2,
            profile_cache_dir=cache_dir,
            profile_iterations=1,
            show_progress=False,
        )
    losses, states = [], []
    for _ in range(3):
        x, y = torch.randn(8, 8), torch.randn(8, 1)  # the global batch, drawn after wrapping
        lo, hi = rank * 8 // world, (rank + 1) * 8 // world
        loss = model(x[lo:hi], y[lo:hi])
        states.append(torch.get_rng_state())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return {
        "losses": losses,
        "rng_after_call": states,
        "python": random.random(),
        "numpy": float(np.random.rand()),
    }


@pytest.mark.slow
def test_cold_and_warm_profile_cache_train_alike(tmp_path: Path) -> None:
    cold = run_workers(seeded_script, 2, str(tmp_path), 0.2, True, timeout=300)
    assert any(tmp_path.iterdir()), "the first run should have filled the profile cache"
    warm = run_workers(seeded_script, 2, str(tmp_path), 0.2, True, timeout=300)
    for rank in range(2):
        assert cold[rank]["losses"] == warm[rank]["losses"], (
            f"rank {rank}: cold {cold[rank]} warm {warm[rank]}"
        )


@pytest.mark.slow
def test_wrapping_draws_no_random_numbers(tmp_path: Path) -> None:
    """Without dropout the forward draws nothing: after each call every generator is where the plain script's
    is (the first call captured, profiled and planned in between), and the losses are the plain script's."""
    plain = seeded_script(0, 1, str(tmp_path), 0.0, False)
    wrapped = run_workers(seeded_script, 2, str(tmp_path / "cold"), 0.0, True, timeout=300)
    for rank in range(2):
        for step, (got, want) in enumerate(zip(wrapped[rank]["rng_after_call"], plain["rng_after_call"])):
            assert torch.equal(got, want), f"rank {rank}: torch's generator moved in call {step}"
        assert wrapped[rank]["python"] == plain["python"], "Python's random generator moved"
        assert wrapped[rank]["numpy"] == plain["numpy"], "NumPy's global generator moved"
        assert wrapped[rank]["losses"] == pytest.approx(plain["losses"], rel=1e-5)
