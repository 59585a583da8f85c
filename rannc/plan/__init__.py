"""The planner: a pure solver from a cost table over blocks, links and a search space to a Plan (and a timeline).

It imports nothing from capture, graph, profile, deploy or runtime: its inputs and outputs are plain values
(`PlanProblem` in, `Plan` and the simulated `Timeline` out). `rannc.problem` builds the `PlanProblem` of a
captured model.
"""

from .checks import required_microbatch_sizes
from .cost import StageCost, evaluate, stage_cost
from .search import minimum_memory_needed, plan_stages
from .types import BlockProfile, Plan, PlanProblem, ShardLevel, StagePlan, interpolate

__all__ = [
    "BlockProfile",
    "Plan",
    "PlanProblem",
    "StageCost",
    "ShardLevel",
    "StagePlan",
    "evaluate",
    "interpolate",
    "minimum_memory_needed",
    "plan_stages",
    "required_microbatch_sizes",
    "stage_cost",
]
