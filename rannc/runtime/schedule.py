"""Pipeline schedules as data: the ordered forward/backward actions one stage runs in a step."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def one_f_one_b(stage: int, num_stages: int, microbatches: int) -> list[Action]:
    """1F1B: warm up with as many forwards as stages behind this one, then alternate, then drain."""
    warmup = min(num_stages - stage - 1, microbatches)
    actions = [Action("F", i) for i in range(warmup)]
    for k in range(microbatches - warmup):
        actions.append(Action("F", warmup + k))
        actions.append(Action("B", k))
    actions.extend(Action("B", i) for i in range(microbatches - warmup, microbatches))
    return actions


def fill_drain(stage: int, num_stages: int, microbatches: int) -> list[Action]:
    """GPipe: every forward, then every backward."""
    return [Action("F", i) for i in range(microbatches)] + [Action("B", i) for i in range(microbatches)]


def forward_only(microbatches: int) -> list[Action]:
    return [Action("F", i) for i in range(microbatches)]


SCHEDULES = {"1f1b": one_f_one_b, "fill_drain": fill_drain}


def actions_for(schedule: str, stage: int, num_stages: int, microbatches: int) -> list[Action]:
    return SCHEDULES[schedule](stage, num_stages, microbatches)


def backwards_before(schedule: str, stage: int, num_stages: int, microbatches: int, forward: int) -> set[int]:
    """The microbatches whose backward `stage` runs before its forward of microbatch `forward`."""
    done: set[int] = set()
    for action in actions_for(schedule, stage, num_stages, microbatches):
        if action.kind == "F" and action.microbatch == forward:
            break
        if action.kind == "B":
            done.add(action.microbatch)
    return done
