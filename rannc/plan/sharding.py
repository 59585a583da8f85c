"""What sharding a stage's parameter state over its replicas (ZeRO-1/2/3, `ShardLevel`) costs: bytes per rank,
the end of the step and, for ZeRO-3, the gathers of every microbatch.

Only parameters used by this stage alone are sharded (the runtime's rule); a parameter shared with another
stage (a tied weight, `PlanProblem.shared_params`) stays whole, with the problem-wide ZeRO-1 setting.

Per rank, with S the stage's shardable parameter bytes, U the rest, f the optimizer factor and r replicas:

* ZeRO-1: optimizer state S f / r (the owner steps, then broadcasts; priced as the problem-wide ZeRO-1).
* ZeRO-2: gradients accumulate whole during the step (the pipeline sums them over microbatches) and are
  reduced to their owners at its end: the forward/backward phase holds 2 S + S f / r, the optimizer step
  S + S / r + S f / r. The reduce plus the broadcast after the step move what an allreduce moves.
* ZeRO-3: S (2 + f) / r, plus the gathered units: GATHERED_UNITS x the largest block's parameter bytes (two
  gathered units held by backward, two units' gradients in flight). Every microbatch gathers S in forward and
  again in backward and reduces S's gradients (once more when the stage recomputes): 3 (or 4) x (r - 1) / r x S
  over the allreduce link, plus a latency per unit (about one per block). The step's end reduces only U.
"""

from __future__ import annotations

from typing import NamedTuple

from .types import PlanProblem, ShardLevel

GATHERED_UNITS = 4  # largest-block parameter sets a ZeRO-3 stage holds at once beyond its shards


class ShardedState(NamedTuple):
    """Parameter state of one stage on one of its ranks under a ShardLevel (bytes, seconds)."""

    params: float  # parameter bytes held (ZeRO-3: the owned shard plus the gathered units)
    grads: float  # gradient bytes held during the forward/backward phase
    optimizer: float  # optimizer state bytes
    step_bytes: float  # params + gradients + optimizer state while the optimizer steps
    updated: float  # parameter bytes this rank's optimizer updates
    reduced: float  # parameter bytes reduced at the step's end (an allreduce's worth of traffic)
    gather_seconds: float  # ZeRO-3: per microbatch, gathers and gradient reduces (forward and backward)

    @property
    def bytes(self) -> float:
        """Held during the forward/backward phase."""
        return self.params + self.grads + self.optimizer


def unshardable_bytes(problem: PlanProblem, first: int, last: int) -> float:
    """Bytes of the parameters blocks first..last share with blocks outside the range (stay whole)."""
    return sum(
        nbytes
        for nbytes, blocks in problem.shared_params
        if any(first <= b <= last for b in blocks) and any(not first <= b <= last for b in blocks)
    )


def largest_block_bytes(problem: PlanProblem, first: int, last: int) -> float:
    """The largest parameter bytes of one block of first..last."""
    return max(problem.range_param_bytes[b][b] for b in range(first, last + 1))


def sharded_state(
    problem: PlanProblem,
    first: int,
    last: int,
    replicas: int,
    level: ShardLevel,
    recompute: bool = False,
    inter: bool = False,
) -> ShardedState:
    """The parameter state of blocks first..last on one of `replicas` ranks at `level` (see the module)."""
    total = problem.range_param_bytes[first][last]
    f = problem.opt_param_factor
    whole = replicas if problem.zero_optimizer else 1  # how the problem-wide ZeRO-1 divides optimizer state
    if level == ShardLevel.NONE or replicas == 1:
        return ShardedState(
            total, total, total * f / whole, total * (2 + f / whole), total / whole, total, 0.0
        )
    unshared = unshardable_bytes(problem, first, last)
    shard = max(total - unshared, 0.0)
    optimizer = shard * f / replicas + unshared * f / whole
    updated = shard / replicas + unshared / whole
    if level == ShardLevel.ZERO_1:
        return ShardedState(total, total, optimizer, total * 2 + optimizer, updated, total, 0.0)
    if level == ShardLevel.ZERO_2:
        step = total + shard / replicas + unshared + optimizer
        return ShardedState(total, total, optimizer, step, updated, total, 0.0)
    gathered = min(GATHERED_UNITS * largest_block_bytes(problem, first, last), shard)
    params = shard / replicas + unshared
    grads = shard / replicas + unshared
    latency, bandwidth = _allreduce_link(problem, inter)
    passes = gather_passes(recompute)
    blocks = last - first + 1
    gather = passes * (blocks * latency + (replicas - 1) / replicas * shard / bandwidth)
    step = params + grads + optimizer
    return ShardedState(params + gathered, grads, optimizer, step, updated, unshared, gather)


def gather_passes(recompute: bool) -> int:
    """ZeRO-3's passes over a stage's parameters per microbatch: gathers for forward and backward (and the
    recomputed forward), and the reduce of their gradients."""
    return 4 if recompute else 3


def _allreduce_link(problem: PlanProblem, inter: bool) -> tuple[float, float]:
    if not inter:
        return problem.allreduce_latency, problem.allreduce_bandwidth
    latency = problem.allreduce_inter_latency
    bandwidth = problem.allreduce_inter_bandwidth
    return (
        problem.allreduce_latency if latency is None else latency,
        problem.allreduce_bandwidth if bandwidth is None else bandwidth,
    )


def stage_levels(problem: PlanProblem, replicas: int) -> tuple[ShardLevel, ...]:
    """The levels a stage of `replicas` ranks may use, least sharding first (one replica: NONE only)."""
    if replicas == 1:
        return (ShardLevel.NONE,)
    return problem.shard_levels
