"""Send buffers are released once their receivers provably have them, not held for the whole step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_workers
from torch import nn

import rannc
from rannc.plan.cost import SEND_WINDOW, sent_bytes
from rannc.schedule import Action, ActionKind, Schedule, actions_for, backwards_before


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


def held_sends(rank: int, world: int, schedule: str, cache: str, microbatches: int = 8) -> dict[str, Any]:
    """One step of a 2-stage pipeline of `microbatches` microbatches; after every send started, the microbatches
    whose sends this rank still holds, by kind, and the bytes of those sends. Also the loss and gradients, to
    compare with one process."""
    from rannc.runtime import transfer as transfer_module

    most = {"act": 0, "grad": 0}
    most_bytes = {"act": 0, "grad": 0}
    original = transfer_module.Transfer._start

    def counting_start(self: Any, ops: Any, kind: str, microbatch: int, *rest: Any, **options: Any) -> None:
        original(self, ops, kind, microbatch, *rest, **options)
        for name in most:
            entries = [entry for entry in self.pending if entry[2] == name]
            most[name] = max(most[name], len({entry[3] for entry in entries}))
            tensors = {op.tensor.data_ptr(): op.tensor.nbytes for entry in entries for op in entry[1]}
            most_bytes[name] = max(most_bytes[name], sum(tensors.values()))

    transfer_module.Transfer._start = counting_start  # type: ignore[method-assign]
    model, optimizer, wrapped = two_stage_chain(schedule, microbatches, cache)
    torch.manual_seed(1)
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    lo, hi = rank * 8, rank * 8 + 8
    loss = wrapped(x[lo:hi], y[lo:hi])
    loss.backward()
    stage = wrapped.deployment.plan.stage_of_rank(rank)
    return {
        "most": most,
        "most_bytes": most_bytes,
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
    # Stage 0 holds an output until stage 1 has it, stage 1 an input gradient until stage 0 has it: never the
    # sends of more than SEND_WINDOW (2) microbatches, whatever the schedule (fill-drain used to hold all 8).
    assert 1 <= by_stage[0]["most"]["act"] <= SEND_WINDOW
    assert 1 <= by_stage[1]["most"]["grad"] <= SEND_WINDOW
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


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "fill_drain"])
def test_send_memory_does_not_grow_with_the_microbatches(schedule: str, tmp_path: Path) -> None:
    # 16 microbatches of one sample each: the bytes a rank holds in sends stay those of SEND_WINDOW microbatches,
    # within what the planner charges for them (cost.sent_bytes with the stage's boundary bytes).
    results = run_workers(held_sends, 2, schedule, str(tmp_path / "cache"), 16, timeout=300)
    by_stage = {r["stage"]: r for r in results}
    row_bytes = 16 * 4  # one sample of the 16-wide float32 boundary
    assert by_stage[0]["most"]["act"] == SEND_WINDOW and by_stage[1]["most"]["grad"] == SEND_WINDOW
    assert by_stage[0]["most_bytes"]["act"] == SEND_WINDOW * row_bytes
    assert by_stage[1]["most_bytes"]["grad"] == SEND_WINDOW * row_bytes
    inflight = Schedule(schedule).inflight(16, 2)
    # a recomputed stage is charged the window for its outputs; one keeping its graphs, its outputs in flight
    for recompute in (True, False):
        charged = sent_bytes(0.0, row_bytes, 16, inflight, recompute)
        assert by_stage[0]["most_bytes"]["act"] <= charged
        assert by_stage[1]["most_bytes"]["grad"] <= sent_bytes(row_bytes, 0.0, 16, 1, recompute)


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


def _protocol_finishes(
    actions_of: Callable[[int, int, int], list[Action]],
    stages: int,
    microbatches: int,
    window: int,
    deferred: bool = False,
    chunks: int = 1,
) -> bool:
    """Whether one step ends when every position runs `actions_of(position, stages, microbatches)` following the
    runtime's transfer protocol: it posts the receives of its next action before running the current one, a send
    completes once its receiver posted the receive, a position waits for its oldest sends of a kind (activations,
    input gradients) before holding those of more than `window` (microbatch, chunk) pairs, and waits for all its
    sends where a call ends (`deferred`, fill-drain's mode: after the forwards and after the backwards). With
    `chunks` > 1 position s runs virtual stages s, s + stages, ... (rannc.schedule.virtual_stage)."""
    last = stages * chunks - 1  # the last virtual stage
    phases = []
    for s in range(stages):
        actions = actions_of(s, stages, microbatches)
        if deferred:  # the forwards in one call, the backwards in another
            split = [a for a in actions if a.kind == "F"], [a for a in actions if a.kind != "F"]
        else:
            split = (actions,)
        phases.append([list(part) for part in split if part])
    posted: set[tuple[int, str, int]] = set()  # (receiving virtual stage, kind, microbatch)
    sent: dict[int, list[tuple[str, int, int]]] = {
        s: [] for s in range(stages)
    }  # (kind, microbatch, to), oldest first
    done: set[tuple[int, str, int]] = (
        set()
    )  # (virtual stage, "F" | "G" (input gradients made) | "W", microbatch)
    place = [(0, 0)] * stages  # (phase, action index)
    waiting_room: dict[
        int, tuple[str, int, int]
    ] = {}  # position -> the send it has computed but not yet started

    def virtual(s: int, action: Action) -> int:
        return action.chunk * stages + s

    def receive_of(s: int, action: Action) -> tuple[int, str, int] | None:
        v = virtual(s, action)
        if action.kind == "F":
            return (v, "act", action.microbatch) if v > 0 else None
        if action.kind in ("B", "I"):
            return (v, "grad", action.microbatch) if v < last else None
        return None  # W uses what its I kept

    def advance(s: int) -> bool:
        phase, index = place[s]
        if phase == len(phases[s]):
            return False
        actions = phases[s][phase]
        if s in waiting_room:  # make room for the send of the action just computed, then start it
            kind, microbatch, to = waiting_room[s]
            older = sorted({(m, t) for k, m, t in sent[s] if k == kind})
            oldest = set(older[: len(older) - window + 1]) if len(older) >= window else set()
            if not all((t, kind, m) in posted for m, t in oldest):
                return False
            sent[s] = [(k, m, t) for k, m, t in sent[s] if k != kind or (m, t) not in oldest]
            sent[s].append((kind, microbatch, to))
            del waiting_room[s]
            return True
        if index == len(actions):  # the call ends: wait for every send
            if not all((t, k, m) in posted for k, m, t in sent[s]):
                return False
            sent[s] = []
            place[s] = (phase + 1, 0)
            return True
        action = actions[index]
        for upcoming in actions[index : index + 2]:  # the current action's receive and the next one's
            key = receive_of(s, upcoming)
            if key is not None:
                posted.add(key)
        v, i = virtual(s, action), action.microbatch
        if action.kind == "F":
            needs = [(v - 1, "F", i)] if v > 0 else []
        elif action.kind == "W":
            needs = [(v, "G", i)]
        else:
            needs = [(v, "F", i)] + ([(v + 1, "G", i)] if v < last else [])
        if any(need not in done for need in needs):
            return False
        done.add((v, "G" if action.kind in ("B", "I") else action.kind, i))
        place[s] = (phase, index + 1)
        if action.kind == "F" and v < last:
            waiting_room[s] = ("act", i, v + 1)
        elif action.kind in ("B", "I") and v > 0:
            waiting_room[s] = ("grad", i, v - 1)
        return True

    while any(advance(s) for s in range(stages)):
        pass
    return all(place[s][0] == len(phases[s]) for s in range(stages))


@pytest.mark.parametrize(
    "schedule, chunks",
    [
        (Schedule.ONE_F_ONE_B, 1),
        (Schedule.FILL_DRAIN, 1),
        (Schedule.INTERLEAVED_1F1B, 2),
        (Schedule.INTERLEAVED_1F1B, 3),
        (Schedule.ZERO_BUBBLE, 1),
    ],
)
def test_the_send_window_never_deadlocks_the_schedules(schedule: Schedule, chunks: int) -> None:
    deferred = schedule == Schedule.FILL_DRAIN  # the runtime's PipelineMode for it
    for stages in range(1, 7):
        for microbatches in range(1, 11):
            try:
                actions = [schedule.actions(s, stages, microbatches, chunks) for s in range(stages)]
            except ValueError:
                continue  # a shape the schedule does not run
            finished = _protocol_finishes(
                lambda s, *_, lists=actions: lists[s], stages, microbatches, SEND_WINDOW, deferred, chunks
            )
            assert finished, (stages, microbatches)


def test_the_protocol_check_finds_a_window_deadlock() -> None:
    # Stage 1 takes stage 0's forwards in reverse order: stage 0 cannot hold the sends of all three while
    # stage 1 waits for the last one, unless its window allows three.
    def reversed_consumer(stage: int, stages: int, microbatches: int) -> list[Action]:
        order = range(microbatches) if stage == 0 else reversed(range(microbatches))
        return [Action(ActionKind.FORWARD, i) for i in order] + [
            Action(ActionKind.BACKWARD, i) for i in range(microbatches)
        ]

    assert not _protocol_finishes(reversed_consumer, 2, 3, 1)
    assert _protocol_finishes(reversed_consumer, 2, 3, 3)
