"""Pipeline schedules as data: the ordered forward/backward actions one stage runs in a step.

The vocabulary the planner's simulator and the runtime share: `Schedule` names an order of actions, `Action` is
one forward or backward of one microbatch, and `Schedule.actions` lists what a stage runs. A schedule prints as
text (``F0 F1 B0 F2 ...``) and reads back from it (`Action.parse`).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = [
    "Action",
    "ActionKind",
    "Schedule",
    "actions_for",
    "backwards_before",
    "fill_drain",
    "forward_only",
]
__all__ += ["one_f_one_b"]


class ActionKind(enum.StrEnum):
    """What one action computes: a microbatch's forward or its backward."""

    FORWARD = "F"
    BACKWARD = "B"


class Action(NamedTuple):
    """One forward or backward of one microbatch; prints as ``F3`` / ``B3``."""

    kind: ActionKind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"

    @staticmethod
    def parse(text: str) -> Action:
        """The action `str(action)` printed, e.g. ``Action.parse("B3") == Action(ActionKind.BACKWARD, 3)``."""
        return Action(ActionKind(text[:1]), int(text[1:]))


def one_f_one_b(stage: int, num_stages: int, microbatches: int) -> list[Action]:
    """1F1B (PipeDream-Flush): warm up with as many forwards as stages behind this one, then alternate, then
    drain. A stage holds at most `num_stages - stage` microbatches' activations at once."""
    warmup = min(num_stages - stage - 1, microbatches)
    actions = [Action(ActionKind.FORWARD, i) for i in range(warmup)]
    for k in range(microbatches - warmup):
        actions.append(Action(ActionKind.FORWARD, warmup + k))
        actions.append(Action(ActionKind.BACKWARD, k))
    actions.extend(Action(ActionKind.BACKWARD, i) for i in range(microbatches - warmup, microbatches))
    return actions


def fill_drain(stage: int, num_stages: int, microbatches: int) -> list[Action]:
    """GPipe: every forward, then every backward (every stage holds all microbatches at once)."""
    return [Action(ActionKind.FORWARD, i) for i in range(microbatches)] + [
        Action(ActionKind.BACKWARD, i) for i in range(microbatches)
    ]


def forward_only(microbatches: int) -> list[Action]:
    """Inference: the forwards alone, in order."""
    return [Action(ActionKind.FORWARD, i) for i in range(microbatches)]


class Schedule(enum.StrEnum):
    """A pipeline schedule. Its value is the name used in configuration and deployment files."""

    ONE_F_ONE_B = "1f1b"
    FILL_DRAIN = "fill_drain"

    def actions(self, stage: int, num_stages: int, microbatches: int) -> list[Action]:
        """The actions stage `stage` of `num_stages` runs, in order, for one step of `microbatches`."""
        return _ACTIONS[self](stage, num_stages, microbatches)

    def inflight(self, microbatches: int, stages_left: int) -> int:
        """Most microbatches whose activations a stage holds at once; `stages_left` counts this stage and the
        ones after it (the peak of `actions`, in closed form)."""
        return min(microbatches, stages_left) if self is Schedule.ONE_F_ONE_B else microbatches


_ACTIONS = {Schedule.ONE_F_ONE_B: one_f_one_b, Schedule.FILL_DRAIN: fill_drain}


def actions_for(schedule: Schedule | str, stage: int, num_stages: int, microbatches: int) -> list[Action]:
    """`Schedule(schedule).actions(...)`; ValueError for an unknown schedule name."""
    return Schedule(schedule).actions(stage, num_stages, microbatches)


def backwards_before(
    schedule: Schedule | str, stage: int, num_stages: int, microbatches: int, forward: int
) -> set[int]:
    """The microbatches whose backward `stage` runs before its forward of microbatch `forward`."""
    done: set[int] = set()
    for action in actions_for(schedule, stage, num_stages, microbatches):
        if action.kind == ActionKind.FORWARD and action.microbatch == forward:
            break
        if action.kind == ActionKind.BACKWARD:
            done.add(action.microbatch)
    return done
