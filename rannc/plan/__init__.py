"""The planner: turn a cost table over blocks into a pipeline + data-parallel Plan."""

from .cost import StageCost, evaluate, stage_cost
from .search import minimum_memory_needed, plan_stages, required_microbatch_sizes
from .types import SCHEDULES, BlockProfile, Plan, PlanProblem, StagePlan, interpolate

__all__ = [
    "SCHEDULES",
    "BlockProfile",
    "Plan",
    "PlanProblem",
    "StageCost",
    "StagePlan",
    "evaluate",
    "interpolate",
    "minimum_memory_needed",
    "plan_stages",
    "required_microbatch_sizes",
    "stage_cost",
]
