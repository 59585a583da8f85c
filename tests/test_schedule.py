"""Pipeline schedules as action lists: complete, ordered, deadlock-free together, and with the expected memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rannc.schedule import (
    Action,
    ActionKind,
    Schedule,
    actions_for,
    fill_drain,
    forward_only,
    held_microbatches,
    interleaved_one_f_one_b,
    one_f_one_b,
    virtual_stage,
    zero_bubble,
)

ScheduleFunction = Callable[[int, int, int], list[Action]]
STAGES = range(1, 6)
MICROBATCHES = range(1, 9)
BOTH = pytest.mark.parametrize("schedule", [one_f_one_b, fill_drain], ids=["1f1b", "fill_drain"])


@BOTH
def test_each_stage_runs_every_microbatch_forward_then_backward_once(schedule: ScheduleFunction) -> None:
    for num_stages in STAGES:
        for microbatches in MICROBATCHES:
            for stage in range(num_stages):
                actions = schedule(stage, num_stages, microbatches)
                forwards = [a.microbatch for a in actions if a.kind == "F"]
                backwards = [a.microbatch for a in actions if a.kind == "B"]
                assert {a.kind for a in actions} <= {"F", "B"}
                assert forwards == list(range(microbatches))  # exactly P, in microbatch order
                assert backwards == list(range(microbatches))
                where = {(a.kind, a.microbatch): k for k, a in enumerate(actions)}
                assert len(where) == len(actions) == 2 * microbatches
                assert all(where["B", i] > where["F", i] for i in range(microbatches))


def simulate(schedule: ScheduleFunction, num_stages: int, microbatches: int) -> list[list[Action]]:
    """Run every stage's action list concurrently, one action per stage per tick when it is ready.

    F(i) at stage s waits for F(i) at every earlier stage (any of them may send it a value; sends do not block);
    B(i) at stage s waits for B(i) at every later stage (gradients of everything it sent) and its own F(i).
    Returns what ran at each tick; fails if the stages deadlock.
    """
    lists = [schedule(s, num_stages, microbatches) for s in range(num_stages)]
    cursor = [0] * num_stages
    done: set[tuple[str, int, int]] = set()
    ticks: list[list[Action]] = []
    while any(cursor[s] < len(lists[s]) for s in range(num_stages)):
        ready = []
        for s in range(num_stages):
            if cursor[s] == len(lists[s]):
                continue
            action = lists[s][cursor[s]]
            if action.kind == "F":
                needed = [("F", action.microbatch, t) for t in range(s)]
            else:
                needed = [("B", action.microbatch, t) for t in range(s + 1, num_stages)]
                needed.append(("F", action.microbatch, s))
            if all(item in done for item in needed):
                ready.append((s, action))
        if not ready:
            blocked = {s: str(lists[s][cursor[s]]) for s in range(num_stages) if cursor[s] < len(lists[s])}
            raise AssertionError(f"deadlock with S={num_stages}, P={microbatches}: stages wait at {blocked}")
        for s, action in ready:  # a tick's actions only see what finished in earlier ticks
            cursor[s] += 1
            done.add((action.kind, action.microbatch, s))
        ticks.append([action for _, action in ready])
    return ticks


@BOTH
def test_all_stages_together_never_deadlock(schedule: ScheduleFunction) -> None:
    for num_stages in STAGES:
        for microbatches in MICROBATCHES:
            ticks = simulate(schedule, num_stages, microbatches)
            assert sum(len(t) for t in ticks) == 2 * num_stages * microbatches


def test_simulation_detects_a_deadlock() -> None:
    """The checker itself: a last stage that wants B0 before F0 can never start."""

    def broken(stage: int, num_stages: int, microbatches: int) -> list[Action]:
        actions = fill_drain(stage, num_stages, microbatches)
        if stage == num_stages - 1:
            actions = [Action("B", 0)] + [a for a in actions if str(a) != "B0"]
        return actions

    with pytest.raises(AssertionError, match="deadlock"):
        simulate(broken, 3, 2)


def test_one_f_one_b_is_no_slower_than_fill_drain() -> None:
    """With unit-time actions, 1F1B takes as many ticks as fill-drain (2 * (S + P - 1))."""
    for num_stages in STAGES:
        for microbatches in MICROBATCHES:
            expected = 2 * (num_stages + microbatches - 1)
            assert len(simulate(fill_drain, num_stages, microbatches)) == expected
            assert len(simulate(one_f_one_b, num_stages, microbatches)) == expected


def peak_in_flight(actions: list[Action]) -> int:
    """Most microbatches whose forward ran and whose backward has not (activations held) at any point."""
    live = peak = 0
    for action in actions:
        live += 1 if action.kind == "F" else -1
        peak = max(peak, live)
    return peak


def test_peak_in_flight_microbatches() -> None:
    for num_stages in STAGES:
        for microbatches in MICROBATCHES:
            for stage in range(num_stages):
                assert peak_in_flight(one_f_one_b(stage, num_stages, microbatches)) == min(
                    microbatches, num_stages - stage
                )
                assert peak_in_flight(fill_drain(stage, num_stages, microbatches)) == microbatches


def test_one_f_one_b_example() -> None:
    render = [" ".join(map(str, one_f_one_b(s, 3, 4))) for s in range(3)]
    assert render == [
        "F0 F1 F2 B0 F3 B1 B2 B3",
        "F0 F1 B0 F2 B1 F3 B2 B3",
        "F0 B0 F1 B1 F2 B2 F3 B3",
    ]


def test_forward_only_and_lookup() -> None:
    assert [str(a) for a in forward_only(3)] == ["F0", "F1", "F2"]
    assert {s.value for s in Schedule} == {"1f1b", "fill_drain", "interleaved_1f1b", "zero_bubble"}
    assert actions_for("1f1b", 1, 3, 4) == one_f_one_b(1, 3, 4)
    assert actions_for("fill_drain", 0, 2, 3) == fill_drain(0, 2, 3)


def test_actions_print_and_parse_back() -> None:
    text = " ".join(map(str, Schedule.ONE_F_ONE_B.actions(0, 2, 3)))
    assert text == "F0 F1 B0 F2 B1 B2"
    assert [Action.parse(word) for word in text.split()] == Schedule("1f1b").actions(0, 2, 3)
    assert Action.parse("B3") == Action(ActionKind.BACKWARD, 3) and Action.parse("B3").kind == "B"
    with pytest.raises(ValueError):
        Action.parse("X1")
    with pytest.raises(ValueError):
        actions_for("gpipe", 0, 1, 1)


@pytest.mark.parametrize("schedule", list(Schedule))
def test_inflight_is_the_peak_of_the_action_list(schedule: Schedule) -> None:
    for num_stages in STAGES:
        for microbatches in MICROBATCHES:
            for stage in range(num_stages):
                actions = schedule.actions(stage, num_stages, microbatches)
                inflight = schedule.inflight(microbatches, num_stages - stage, num_stages)
                assert held_microbatches(actions) == inflight


# ---- chunks and split backwards ----------------------------------------------------------------------------

CHUNKED = [(Schedule.INTERLEAVED_1F1B, chunks) for chunks in (1, 2, 3)] + [
    (Schedule.ZERO_BUBBLE, chunks) for chunks in (1, 2, 3)
]


def chunked_cases(chunks: int) -> list[tuple[int, int]]:
    """(positions, microbatches) an interleaved schedule accepts (every count with one chunk)."""
    cases = []
    for num_stages in STAGES:
        for microbatches in range(1, 13):
            if chunks > 1 and (microbatches < num_stages or microbatches % (microbatches // num_stages)):
                continue
            cases.append((num_stages, microbatches))
    return cases


def run_virtual_pipeline(schedule: Schedule, num_stages: int, microbatches: int, chunks: int) -> int:
    """Run every position's list at once over the virtual stages, one action per position per tick when ready.

    F(i) at virtual stage k waits for F(i) at k-1; B or I(i) at k waits for the input-gradient pass (B or I) of
    i at k+1 and its own F(i); W(i) waits for its own I(i). Returns the ticks taken; fails on a deadlock."""
    lists = [schedule.actions(s, num_stages, microbatches, chunks) for s in range(num_stages)]
    last = num_stages * chunks - 1
    cursor = [0] * num_stages
    done: set[tuple[str, int, int]] = set()
    ticks = 0
    while any(cursor[s] < len(lists[s]) for s in range(num_stages)):
        ready = []
        for s in range(num_stages):
            if cursor[s] == len(lists[s]):
                continue
            action = lists[s][cursor[s]]
            k = virtual_stage(s, action.chunk, num_stages)
            if action.kind == ActionKind.FORWARD:
                needed = [("F", action.microbatch, k - 1)] if k > 0 else []
            elif action.kind == ActionKind.BACKWARD_WEIGHT:
                needed = [("I", action.microbatch, k)]
            else:
                needed = [("F", action.microbatch, k)]
                if k < last:
                    needed.append(("G", action.microbatch, k + 1))
            if all(item in done for item in needed):
                ready.append((s, action, k))
        if not ready:
            blocked = {s: str(lists[s][cursor[s]]) for s in range(num_stages) if cursor[s] < len(lists[s])}
            raise AssertionError(
                f"deadlock with {num_stages} positions, {microbatches} mb: waiting at {blocked}"
            )
        for s, action, k in ready:
            cursor[s] += 1
            done.add((str(action.kind), action.microbatch, k))
            if action.kind.sends_grad:
                done.add(("G", action.microbatch, k))
        ticks += 1
    return ticks


@pytest.mark.parametrize(("schedule", "chunks"), CHUNKED)
def test_chunked_schedules_run_every_pass_once_in_order(schedule: Schedule, chunks: int) -> None:
    for num_stages, microbatches in chunked_cases(chunks):
        for stage in range(num_stages):
            actions = schedule.actions(stage, num_stages, microbatches, chunks)
            where = {(a.kind.value, a.microbatch, a.chunk): k for k, a in enumerate(actions)}
            assert len(where) == len(actions)
            backward = "I" if schedule.splits_backward else "B"
            passes = ("F", backward, "W") if schedule.splits_backward else ("F", backward)
            assert len(actions) == len(passes) * microbatches * chunks
            for chunk in range(chunks):
                forwards = [a.microbatch for a in actions if a.kind == "F" and a.chunk == chunk]
                assert forwards == list(range(microbatches))  # microbatch order within a chunk
                for i in range(microbatches):
                    order = [where[kind, i, chunk] for kind in passes]
                    assert order == sorted(order)


@pytest.mark.parametrize(("schedule", "chunks"), CHUNKED)
def test_chunked_schedules_never_deadlock(schedule: Schedule, chunks: int) -> None:
    for num_stages, microbatches in chunked_cases(chunks):
        run_virtual_pipeline(schedule, num_stages, microbatches, chunks)


def test_one_chunk_interleaved_is_one_f_one_b() -> None:
    for num_stages in STAGES:
        for microbatches in MICROBATCHES:
            for stage in range(num_stages):
                assert interleaved_one_f_one_b(stage, num_stages, microbatches, 1) == one_f_one_b(
                    stage, num_stages, microbatches
                )


def test_interleaving_shortens_the_step_with_unit_time_chunks() -> None:
    """Chunks of 1/v of a stage: ticks count chunk passes, so 1F1B's step is v times its tick count. With 4
    positions and 8 microbatches, 2 chunks bring the fill and drain (bubble) down by about half."""
    one_chunk = 2 * run_virtual_pipeline(
        Schedule.ONE_F_ONE_B, 4, 8, 1
    )  # 2 (S + P - 1) ticks of a whole stage
    two_chunks = run_virtual_pipeline(Schedule.INTERLEAVED_1F1B, 4, 8, 2)
    work = 2 * 2 * 8  # forward and backward of 8 microbatches through 2 chunks
    assert one_chunk == 2 * 2 * (4 + 8 - 1)
    assert two_chunks - work < (one_chunk - work) * 0.6


def test_zero_bubble_holds_what_one_f_one_b_holds_at_its_first_stage() -> None:
    for num_stages in STAGES:
        for microbatches in range(1, 13):
            first = held_microbatches(one_f_one_b(0, num_stages, microbatches))
            for stage in range(num_stages):
                assert held_microbatches(zero_bubble(stage, num_stages, microbatches)) == first


def test_zero_bubble_example() -> None:
    """ZB-H1 with 3 stages: each position defers as many weight passes as positions before it."""
    render = [" ".join(map(str, zero_bubble(s, 3, 4))) for s in range(3)]
    assert render == [
        "F0 F1 F2 I0 W0 F3 I1 W1 I2 W2 I3 W3",
        "F0 F1 I0 F2 I1 W0 F3 I2 W1 I3 W2 W3",
        "F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3",
    ]


def test_chunked_actions_print_and_parse_back() -> None:
    actions = interleaved_one_f_one_b(0, 2, 4, 2) + zero_bubble(1, 2, 4, 2)
    assert [Action.parse(str(a)) for a in actions] == actions
    assert str(Action(ActionKind.BACKWARD_WEIGHT, 3, 1)) == "W3c1"


def test_schedules_refuse_what_they_cannot_run() -> None:
    with pytest.raises(ValueError, match="one chunk per position"):
        Schedule.ONE_F_ONE_B.actions(0, 2, 4, chunks=2)
    with pytest.raises(ValueError, match="at least as many microbatches"):
        interleaved_one_f_one_b(0, 4, 3, 2)
    with pytest.raises(ValueError, match="multiple of its rounds"):
        interleaved_one_f_one_b(0, 4, 9, 2)
    with pytest.raises(ValueError, match="needs num_stages"):
        Schedule.ZERO_BUBBLE.inflight(4, 2)
