"""Send buffers are released once their receivers provably have them, not held for the whole step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_workers
from torch import nn

import rannc
from rannc.schedule import actions_for, backwards_before


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return ((x - y) ** 2).mean()


def two_stage_chain(schedule: str, microbatches: int, cache: str) -> tuple[Chain, Any, rannc.RaNNCModule]:
    """The seeded Chain, its SGD optimizer and its RaNNCModule: 2 stages, `microbatches` microbatches."""
    torch.manual_seed(0)
    model = Chain()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = dict(partition_num=2, min_pipeline=microbatches, max_pipeline=microbatches, schedule=schedule)
    wrapped = rannc.RaNNCModule(
        model, optimizer, profile_iterations=1, show_progress=False, profile_cache_dir=cache, **config
    )
    return model, optimizer, wrapped


def held_sends(rank: int, world: int, schedule: str, cache: str) -> dict[str, Any]:
    """One step of a 2-stage, 8-microbatch pipeline; after every action, the microbatches whose sends this rank
    still holds, by kind. Also the loss and gradients, to compare with one process."""
    from rannc.runtime import transfer as transfer_module

    most = {"act": 0, "grad": 0}
    original = transfer_module.Transfer._start

    def counting_start(self: Any, ops: Any, kind: str, microbatch: int, *rest: Any) -> None:
        original(self, ops, kind, microbatch, *rest)
        for name in most:
            held = {entry[3] for entry in self.pending if entry[2] == name}
            most[name] = max(most[name], len(held))

    transfer_module.Transfer._start = counting_start  # type: ignore[method-assign]
    model, optimizer, wrapped = two_stage_chain(schedule, 8, cache)
    torch.manual_seed(1)
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    lo, hi = rank * 8, rank * 8 + 8
    loss = wrapped(x[lo:hi], y[lo:hi])
    loss.backward()
    stage = wrapped.deployment.plan.stage_of_rank(rank)
    return {
        "most": most,
        "stage": stage,
        "loss": float(loss),
        "grads": [p.grad.clone() for p in model.parameters() if p.grad is not None and p.grad.numel()],
    }


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "fill_drain"])
def test_sends_are_released_when_the_receivers_have_them(schedule: str, tmp_path: Path) -> None:
    results = run_workers(held_sends, 2, schedule, str(tmp_path / "cache"), timeout=300)
    by_stage = {r["stage"]: r for r in results}
    assert set(by_stage) == {0, 1}
    if schedule == "1f1b":
        # Stage 0 holds an output until stage 1 sends its gradient back: at most its 2 microbatches in flight.
        assert 1 <= by_stage[0]["most"]["act"] <= 2
        # Stage 1 holds an input gradient until stage 0's next forward after that backward (its last ones until
        # the step's end): at most its 1 in flight + 1.
        assert 1 <= by_stage[1]["most"]["grad"] <= 2
    else:  # fill-drain: every forward before any backward, so nothing can be released early
        assert by_stage[0]["most"]["act"] == 8 and by_stage[1]["most"]["grad"] == 8
    # One process, same model, same global batch.
    torch.manual_seed(0)
    reference = Chain()
    torch.manual_seed(1)
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    loss = reference(x, y)
    loss.backward()
    assert by_stage[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    expected = {i: p.grad for i, p in enumerate(reference.parameters())}
    held = [g for r in results for g in r["grads"]]
    assert len(held) >= len(expected)  # each rank holds its stage's parameters
    for grad in held:
        assert any(
            g.shape == grad.shape and torch.allclose(g, grad, rtol=1e-5, atol=1e-7) for g in expected.values()
        )


def test_backwards_before_follows_the_schedule() -> None:
    # Stage 0 of 2 with 1F1B and 4 microbatches runs F0 F1 B0 F2 B1 F3 B2 B3.
    assert [str(a) for a in actions_for("1f1b", 0, 2, 4)] == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert [backwards_before("1f1b", 0, 2, 4, j) for j in range(4)] == [set(), set(), {0}, {0, 1}]
    # Fill-drain runs every forward first; the last stage of 1F1B alternates.
    assert all(backwards_before("fill_drain", 0, 2, 4, j) == set() for j in range(4))
    assert backwards_before("1f1b", 1, 2, 4, 3) == {0, 1, 2}


def calls_alive(rank: int, world: int, schedule: str, cache: str) -> int:
    """PipelineCall objects still alive after 4 steps with the cyclic garbage collector off."""
    import gc

    from rannc.runtime.pipeline import PipelineCall

    gc.disable()
    try:
        _, optimizer, wrapped = two_stage_chain(schedule, 4, cache)
        for _ in range(4):
            wrapped(torch.randn(8, 16), torch.randn(8, 16)).backward()
            optimizer.step()
            optimizer.zero_grad()
        return sum(1 for o in gc.get_objects() if isinstance(o, PipelineCall))
    finally:
        gc.enable()


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "fill_drain"])
def test_a_finished_step_frees_its_tensors_without_the_garbage_collector(
    schedule: str, tmp_path: Path
) -> None:
    # A reference cycle through the step's pipeline call would keep its activations and gradients alive until
    # the next collection: peak memory would then depend on when that runs.
    assert run_workers(calls_alive, 2, schedule, str(tmp_path / "cache"), timeout=300) == [0, 0]
