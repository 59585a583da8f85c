"""One slice of the search space: a microbatch count and a schedule, with the replica counts a stage may have."""

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
    """

    def __init__(
        self,
        problem: PlanProblem,
        model: CostModel,
        microbatches: int,
        schedule: Schedule | str,
        tables: StageTables | None = None,
    ) -> None:
        self.problem = problem
        self.model = model
        self.tables = tables if tables is not None else StageTables(model)
        self.p = microbatches
        self.schedule = Schedule(schedule)
        self.weight = float(microbatches - 1)
        self.replicas = replica_counts(problem, microbatches)
        rows = microbatch_rows(problem.global_batch, microbatches)
        self.sizes = [-(-rows // r) for r in self.replicas]

    @property
    def shared_key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Key of the bound tables this slice shares with others (same replica counts and microbatch sizes)."""
        return tuple(self.replicas), tuple(self.sizes)

    def step_time(self, time_sum: float, time_max: float, allreduce_max: float) -> float:
        """T of a plan whose stages sum to `time_sum`, the slowest takes `time_max` and the longest step end
        `allreduce_max`."""
        return time_sum + self.weight * time_max + allreduce_max
