"""Pipeline schedules as data: the ordered actions one pipeline position runs in a step.

The vocabulary the planner's simulator and the runtime share: `Schedule` names an order of actions, `Action` is
one forward, backward, input-gradient or weight-gradient pass of one microbatch through one model chunk, and
`Schedule.actions` lists what a position runs. A schedule prints as text (``F0 F1 B0 F2 ...``; a chunk other than
the first is written after a ``c``: ``F3c1``) and reads back from it (`Action.parse`).

Positions and chunks: a pipeline of `num_stages` positions (groups of ranks) may give each position `chunks` model
chunks (interleaving, Narayanan et al., SC 2021). The model is then cut into ``num_stages * chunks`` virtual stages
in pipeline order, and virtual stage ``chunk * num_stages + position`` runs on position ``position``. With one
chunk a position is a stage.

Backward passes: ``B`` computes every gradient of a microbatch at once. The zero-bubble schedule (Qi et al., "Zero
Bubble Pipeline Parallelism", ICLR 2024) splits it into ``I`` (the gradients of the chunk's inputs, sent on to the
previous stage at once) and ``W`` (the gradients of its parameters, run later to fill what would be bubbles).
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

__all__ = [
    "Action",
    "ActionKind",
    "Schedule",
    "actions_for",
    "backwards_before",
    "fill_drain",
    "forward_only",
    "held_microbatches",
    "interleaved_one_f_one_b",
    "one_f_one_b",
    "virtual_stage",
    "zero_bubble",
]


class ActionKind(enum.StrEnum):
    """What one action computes for a microbatch."""

    FORWARD = "F"
    BACKWARD = "B"  # every gradient (inputs and parameters) at once
    BACKWARD_INPUT = "I"  # the gradients of the chunk's inputs only (zero bubble)
    BACKWARD_WEIGHT = "W"  # the gradients of its parameters, after its I (zero bubble)

    @property
    def sends_grad(self) -> bool:
        """Whether this action produces the gradients the previous stage waits for (B or I)."""
        return self in (ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT)

    @property
    def releases(self) -> bool:
        """Whether this action ends the microbatch's use of the activations it saved (B or W)."""
        return self in (ActionKind.BACKWARD, ActionKind.BACKWARD_WEIGHT)


_ACTION_TEXT = re.compile(r"([FBIW])(\d+)(?:c(\d+))?")


class Action(NamedTuple):
    """One pass of one microbatch through one chunk; prints as ``F3`` / ``B3`` (chunk 0) or ``I3c1``."""

    kind: ActionKind
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        suffix = f"c{self.chunk}" if self.chunk else ""
        return f"{self.kind}{self.microbatch}{suffix}"

    @staticmethod
    def parse(text: str) -> Action:
        """The action `str(action)` printed, e.g. ``Action.parse("B3") == Action(ActionKind.BACKWARD, 3)``."""
        match = _ACTION_TEXT.fullmatch(text)
        if match is None:
            raise ValueError(f"{text!r} is not a schedule action (e.g. F3, B3, I3, W3, F3c1)")
        kind, microbatch, chunk = match.groups()
        return Action(ActionKind(kind), int(microbatch), int(chunk or 0))


def virtual_stage(position: int, chunk: int, num_stages: int) -> int:
    """The virtual stage (pipeline order) that `chunk` of `position` runs, among ``num_stages * chunks``."""
    return chunk * num_stages + position


def one_f_one_b(stage: int, num_stages: int, microbatches: int) -> list[Action]:
    """1F1B (PipeDream-Flush): warm up with as many forwards as stages behind this one, then alternate, then
    drain. A stage holds at most `num_stages - stage` microbatches' activations at once."""
    return _one_f_one_b_order(stage, num_stages, microbatches, chunks=1, split_backward=False)


def interleaved_one_f_one_b(stage: int, num_stages: int, microbatches: int, chunks: int) -> list[Action]:
    """Interleaved 1F1B (Megatron-LM): each position runs `chunks` model chunks; microbatches go through them in
    rounds of at least `num_stages` microbatches, so the pipeline fills `chunks` times faster and its bubble is
    about ``1 / chunks`` of 1F1B's. Needs ``microbatches >= num_stages`` and microbatches a multiple of the
    number of rounds (``microbatches // num_stages``) when ``chunks > 1``."""
    return _one_f_one_b_order(stage, num_stages, microbatches, chunks, split_backward=False)


def zero_bubble(stage: int, num_stages: int, microbatches: int, chunks: int = 1) -> list[Action]:
    """Zero bubble: 1F1B with each backward split into I (sent on at once) and W; position `stage` defers its
    first `stage` weight passes, which then fill the cool-down (ZB-H1 of Qi et al. with one chunk: the same peak
    activation memory as 1F1B's first stage; ZB1P with several chunks)."""
    return _one_f_one_b_order(stage, num_stages, microbatches, chunks, split_backward=True)


def _rounds(num_stages: int, microbatches: int, chunks: int) -> int:
    """Microbatches per round of an interleaved schedule (all of them with one chunk)."""
    if chunks == 1:
        return microbatches
    if microbatches < num_stages:
        raise ValueError(
            f"an interleaved schedule needs at least as many microbatches as pipeline positions: {microbatches} "
            f"microbatches, {num_stages} positions (use more microbatches or one chunk)"
        )
    rounds = microbatches // num_stages
    if microbatches % rounds:
        raise ValueError(
            f"an interleaved schedule of {num_stages} positions needs the microbatches ({microbatches}) to be a "
            f"multiple of its rounds ({rounds}); use {rounds * (microbatches // rounds)} or "
            f"{rounds * (microbatches // rounds + 1)}"
        )
    return microbatches // rounds


def _one_f_one_b_order(
    stage: int, num_stages: int, microbatches: int, chunks: int, *, split_backward: bool
) -> list[Action]:
    """The 1F1B family: warm-up forwards, then one forward and one backward in turn, then the remaining backwards.

    Forward number k runs chunk ``(k // per_round) % chunks``; backward number k the chunks in reverse order. A
    position warms up with the forwards it can run before the first gradient can come back: one per position
    behind it (two with interleaving: a forward there and a backward back) plus a round per extra chunk. With
    `split_backward`, each backward is an I, and the W of backward k follows the I of backward ``k + stage``."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not one of {num_stages} positions")
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    per_round = _rounds(num_stages, microbatches, chunks)
    total = microbatches * chunks
    behind = num_stages - stage - 1
    hops = 2 if chunks > 1 and not split_backward else 1
    warmup = min((chunks - 1) * per_round + hops * behind, total)
    forwards = _chunk_order(total, per_round, chunks, reverse=False)
    backwards = _chunk_order(total, per_round, chunks, reverse=True)
    input_kind = ActionKind.BACKWARD_INPUT if split_backward else ActionKind.BACKWARD
    actions = [Action(ActionKind.FORWARD, mb, c) for mb, c in forwards[:warmup]]
    weights_done = 0

    def backward(k: int) -> None:
        nonlocal weights_done
        mb, c = backwards[k]
        actions.append(Action(input_kind, mb, c))
        if split_backward and k >= stage:
            wmb, wc = backwards[weights_done]
            actions.append(Action(ActionKind.BACKWARD_WEIGHT, wmb, wc))
            weights_done += 1

    for k in range(total - warmup):
        mb, c = forwards[warmup + k]
        actions.append(Action(ActionKind.FORWARD, mb, c))
        backward(k)
    for k in range(total - warmup, total):
        backward(k)
    if split_backward:
        actions.extend(Action(ActionKind.BACKWARD_WEIGHT, mb, c) for mb, c in backwards[weights_done:])
    return actions


def _chunk_order(total: int, per_round: int, chunks: int, *, reverse: bool) -> list[tuple[int, int]]:
    """(microbatch, chunk) of pass number k = 0..total-1: rounds of `per_round` microbatches through each chunk
    in turn (last chunk first when `reverse`), microbatches numbered per chunk in order."""
    taken = [0] * chunks
    order = []
    for k in range(total):
        chunk = (k // per_round) % chunks
        if reverse:
            chunk = chunks - 1 - chunk
        order.append((taken[chunk], chunk))
        taken[chunk] += 1
    return order


def fill_drain(stage: int, num_stages: int, microbatches: int) -> list[Action]:
    """GPipe: every forward, then every backward (every stage holds all microbatches at once)."""
    return [Action(ActionKind.FORWARD, i) for i in range(microbatches)] + [
        Action(ActionKind.BACKWARD, i) for i in range(microbatches)
    ]


def forward_only(microbatches: int) -> list[Action]:
    """Inference: the forwards alone, in order."""
    return [Action(ActionKind.FORWARD, i) for i in range(microbatches)]


def held_microbatches(actions: list[Action]) -> int:
    """Most (microbatch, chunk) activations held at once while running `actions` in order: from the forward
    until the pass that ends their use (B, or W when the backward is split)."""
    held = peak = 0
    for action in actions:
        if action.kind == ActionKind.FORWARD:
            held += 1
            peak = max(peak, held)
        elif action.kind.releases:
            held -= 1
    return peak


class Schedule(enum.StrEnum):
    """A pipeline schedule. Its value is the name used in configuration and deployment files."""

    # (in the order `rannc plan --schedules` lists them)
    ONE_F_ONE_B = "1f1b"
    ZERO_BUBBLE = "zero_bubble"  # ZB-H1 (one chunk) / ZB1P (several): backward split into I and W
    FILL_DRAIN = "fill_drain"
    INTERLEAVED_1F1B = "interleaved_1f1b"  # v model chunks per position

    @property
    def chunked(self) -> bool:
        """Whether a position may run several model chunks in this schedule."""
        return self in (Schedule.INTERLEAVED_1F1B, Schedule.ZERO_BUBBLE)

    @property
    def eager(self) -> bool:
        """Whether a training call runs its backwards inside the forward call, between its forwards (the loss's
        gradient taken as 1 there and rescaled by the user's backward), as 1F1B-style orders must; such a
        schedule needs a model that returns exactly one scalar loss."""
        return self in (Schedule.ONE_F_ONE_B, Schedule.ZERO_BUBBLE, Schedule.INTERLEAVED_1F1B)

    @property
    def splits_backward(self) -> bool:
        """Whether backwards run as an I pass and a later W pass."""
        return self is Schedule.ZERO_BUBBLE

    def actions(self, stage: int, num_stages: int, microbatches: int, chunks: int = 1) -> list[Action]:
        """The actions position `stage` of `num_stages` runs, in order, for one step of `microbatches` through
        its `chunks` model chunks (1 unless the schedule is `chunked`)."""
        if chunks != 1 and not self.chunked:
            raise ValueError(f"schedule {self.value!r} runs one chunk per position, not {chunks}")
        if self is Schedule.ONE_F_ONE_B:
            return one_f_one_b(stage, num_stages, microbatches)
        if self is Schedule.FILL_DRAIN:
            return fill_drain(stage, num_stages, microbatches)
        if self is Schedule.INTERLEAVED_1F1B:
            return interleaved_one_f_one_b(stage, num_stages, microbatches, chunks)
        return zero_bubble(stage, num_stages, microbatches, chunks)

    def inflight(self, microbatches: int, stages_left: int, num_stages: int | None = None) -> int:
        """Most microbatches whose activations a stage holds at once with one chunk per position (the peak of
        `actions`, in closed form; `held_microbatches` counts it for any chunks). `stages_left` counts this stage
        and the ones after it; zero bubble holds what 1F1B's first stage holds at every stage, so it needs the
        pipeline's depth `num_stages` too."""
        if self is Schedule.ONE_F_ONE_B or self is Schedule.INTERLEAVED_1F1B:
            return min(microbatches, stages_left)
        if self is Schedule.ZERO_BUBBLE:
            if num_stages is None:
                raise ValueError("zero_bubble's in-flight count needs num_stages (the pipeline's depth)")
            return min(microbatches, num_stages)
        return microbatches


# Schedules that run a call's backwards inside its forward (the loss's gradient taken as 1, rescaled by the user's
# backward): they need the model to return one scalar loss.
def actions_for(
    schedule: Schedule | str, stage: int, num_stages: int, microbatches: int, chunks: int = 1
) -> list[Action]:
    """`Schedule(schedule).actions(...)`; ValueError for an unknown schedule name."""
    return Schedule(schedule).actions(stage, num_stages, microbatches, chunks)


def backwards_before(
    schedule: Schedule | str, stage: int, num_stages: int, microbatches: int, forward: int
) -> set[int]:
    """The microbatches whose backward (B or I) `stage` runs before its forward of microbatch `forward`."""
    done: set[int] = set()
    for action in actions_for(schedule, stage, num_stages, microbatches):
        if action.kind == ActionKind.FORWARD and action.microbatch == forward:
            break
        if action.kind.sends_grad:
            done.add(action.microbatch)
    return done
