"""One slice of the search space: a microbatch count and a schedule (and, for zero bubble, a stage count), with the
replica counts a stage may have."""

from __future__ import annotations

from ..schedule import Schedule
from .cost import CostModel, microbatch_rows, replica_counts
from .tables import StageTables
from .types import PlanProblem


class SearchSlice:
    """The plans of `problem` with `microbatches` microbatches run by `schedule`.

    Every stage has one of `replicas` replica counts (ascending), and with r of them each replica runs
    microbatches of `sizes[i]` rows (r = replicas[i]). The step time of such a plan is
    T = sum t_s + `weight` x max t_s + max AR_s (weight = P - 1).

    With split backwards (zero bubble) a stage's memory depends on the pipeline's depth (it holds min(P, S)
    microbatches) and on its position (min(P, s + 1) of them keep their deferred gradients), which a suffix of
    the pipeline does not know: such a slice holds the plans of exactly `depth` stages. Their step time is
    T = sum max(t_s - 2 W_s, 0) + weight x max t_s + max (AR_s + 2 W_s) (`cost.step_time`).
    """

    def __init__(
        self,
        problem: PlanProblem,
        model: CostModel,
        microbatches: int,
        schedule: Schedule | str,
        tables: StageTables | None = None,
        depth: int | None = None,
    ) -> None:
        self.problem = problem
        self.model = model
        self.tables = tables if tables is not None else StageTables(model)
        self.p = microbatches
        self.schedule = Schedule(schedule)
        self.split = self.schedule.splits_backward
        if self.split != (depth is not None):
            raise ValueError(f"a {self.schedule.value} slice needs a depth exactly when it splits backwards")
        self.depth = depth
        self.weight = float(microbatches - 1)
        self.replicas = replica_counts(problem, microbatches)
        rows = microbatch_rows(problem.global_batch, microbatches)
        self.sizes = [-(-rows // r) for r in self.replicas]

    def stage_counts(self, allowed: list[int]) -> list[int]:
        """The stage counts of `allowed` this slice's plans have."""
        if self.depth is None:
            return list(allowed)
        return [self.depth] if self.depth in allowed else []

    def inflight(self, stages_left: int) -> int:
        """Microbatches whose activations a stage holds at its peak, `stages_left` stages from the end."""
        return self.schedule.inflight(self.p, stages_left, self.depth)

    def pending(self, stages_left: int) -> int:
        """Microbatches that keep their deferred gradients at the peak of that stage (0: whole backwards)."""
        if self.depth is None:
            return 0
        return min(self.p, self.depth - stages_left + 1)

    @property
    def shared_key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Key of the bound tables this slice shares with others (same replica counts and microbatch sizes)."""
        return tuple(self.replicas), tuple(self.sizes)

    def step_time(self, time_sum: float, time_max: float, allreduce_max: float) -> float:
        """T of a plan whose stages sum to `time_sum`, the slowest takes `time_max` and the longest step end
        `allreduce_max`."""
        return time_sum + self.weight * time_max + allreduce_max
