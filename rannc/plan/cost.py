"""The planner's cost model: time and memory of one stage and step time of a whole candidate plan."""

from __future__ import annotations

import dataclasses

from .types import SCHEDULES, PlanProblem, interpolate


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Predicted cost of one stage (blocks first..last on `replicas` ranks) in a candidate plan."""

    first_block: int
    last_block: int  # inclusive
    replicas: int
    microbatch_size: int  # largest per-replica microbatch (m_s)
    inflight: int  # microbatches whose activations are held at the peak
    fwd: float  # seconds per microbatch, compute only
    bwd: float
    comm: float  # seconds per microbatch: inputs and outputs, forward and backward
    time: float  # fwd + bwd + comm (t_s)
    allreduce: float  # seconds per step for the gradient allreduce among the replicas
    param_bytes: float
    activation_bytes: float  # saved activations of one microbatch
    in_bytes: float  # boundary bytes received per microbatch (forward)
    out_bytes: float  # boundary bytes sent per microbatch (forward)
    memory: float  # predicted peak bytes per rank

    @property
    def peak_activation_bytes(self) -> float:
        return self.activation_bytes * self.inflight


def microbatch_rows(global_batch: int, microbatches: int) -> int:
    """Rows of the largest microbatch when the batch is split near-equally: ceil(B / P)."""
    return -(-global_batch // microbatches)


def replica_microbatch_size(global_batch: int, microbatches: int, replicas: int) -> int:
    """Largest per-replica microbatch m = ceil(ceil(B / P) / r)."""
    return -(-microbatch_rows(global_batch, microbatches) // replicas)


def max_replicas(global_batch: int, microbatches: int) -> int:
    """Most replicas a stage may have: every replica needs a sample of every microbatch."""
    return global_batch // microbatches


def inflight_microbatches(schedule: str, microbatches: int, stages_left: int) -> int:
    """Microbatches whose activations a stage holds at once; stages_left counts this stage too."""
    if schedule == "1f1b":
        return min(microbatches, stages_left)
    if schedule == "fill_drain":
        return microbatches
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def microbatch_counts(problem: PlanProblem) -> range:
    """Every microbatch count P the problem allows (possibly empty)."""
    low = max(1, problem.min_microbatches)
    high = min(problem.global_batch, problem.max_microbatches)
    return range(low, high + 1)


def p2p_time(problem: PlanProblem, nbytes: float) -> float:
    """Seconds to send `nbytes` between two stages (0 when nothing is sent)."""
    if nbytes == 0:
        return 0.0
    return problem.p2p_latency + nbytes / problem.p2p_bandwidth


def allreduce_time(problem: PlanProblem, param_bytes: float, replicas: int) -> float:
    """Seconds of the ring allreduce of a stage's gradients among its replicas."""
    if replicas == 1:
        return 0.0
    return (
        problem.allreduce_latency + 2 * (replicas - 1) / replicas * param_bytes / problem.allreduce_bandwidth
    )


class CostModel:
    """Cached stage costs of one problem; every search path and `evaluate` use the same arithmetic."""

    def __init__(self, problem: PlanProblem) -> None:
        self.problem = problem
        self.num_blocks = len(problem.blocks)
        self._block_values: dict[int, tuple[list[float], list[float], list[float]]] = {}
        self._rows: dict[tuple[int, int], list[tuple[float, float, float, float, float, float]]] = {}
        self._allreduce: dict[tuple[int, int], list[float]] = {}

    def block_values(self, m: int) -> tuple[list[float], list[float], list[float]]:
        """Forward time, backward time and activation bytes of every block at microbatch size m."""
        values = self._block_values.get(m)
        if values is None:
            blocks = self.problem.blocks
            values = (
                [interpolate(b.fwd_time, m) for b in blocks],
                [interpolate(b.bwd_time, m) for b in blocks],
                [interpolate(b.activation_bytes, m) for b in blocks],
            )
            self._block_values[m] = values
        return values

    def row(
        self, first: int, m: int, replicas: int = 1
    ) -> list[tuple[float, float, float, float, float, float]]:
        """For every last block j >= first: (fwd, bwd, act, comm, io, base) of range [first, j] at m.

        io = 2 * (in + out) bytes of boundary buffers, base = parameter, gradient and optimizer bytes.
        Sums run block by block from `first`, so every caller gets bit-identical values.
        """
        shards = replicas if self.problem.zero_optimizer else 1
        key = (first, m, shards)
        row = self._rows.get(key)
        if row is not None:
            return row
        problem = self.problem
        fwd, bwd, act = self.block_values(m)
        in_table = problem.range_in_bytes_per_sample[first]
        out_table = problem.range_out_bytes_per_sample[first]
        param_table = problem.range_param_bytes[first]
        state_factor = 2 + problem.opt_param_factor / shards  # ZeRO-1 divides optimizer state by replicas
        row = []
        f_sum = b_sum = a_sum = 0.0
        for j in range(first, self.num_blocks):
            f_sum += fwd[j]
            b_sum += bwd[j]
            a_sum += act[j]
            in_bytes = in_table[j] * m
            out_bytes = out_table[j] * m
            comm = 2 * (p2p_time(problem, in_bytes) + p2p_time(problem, out_bytes))
            io = 2 * (in_bytes + out_bytes)
            base = param_table[j] * state_factor
            row.append((f_sum, b_sum, a_sum, comm, io, base))
        self._rows[key] = row
        return row

    def allreduce_row(self, first: int, replicas: int) -> list[float]:
        """Allreduce time of range [first, j] on `replicas` ranks, for every j >= first."""
        key = (first, replicas)
        row = self._allreduce.get(key)
        if row is None:
            params = self.problem.range_param_bytes[first]
            row = [allreduce_time(self.problem, params[j], replicas) for j in range(first, self.num_blocks)]
            self._allreduce[key] = row
        return row

    def allreduce(self, first: int, last: int, replicas: int) -> float:
        return self.allreduce_row(first, replicas)[last - first]

    def stage(self, first: int, last: int, replicas: int, microbatches: int, inflight: int) -> StageCost:
        """Full cost breakdown of one stage."""
        problem = self.problem
        m = replica_microbatch_size(problem.global_batch, microbatches, replicas)
        f_sum, b_sum, a_sum, comm, io, base = self.row(first, m, replicas)[last - first]
        return StageCost(
            first_block=first,
            last_block=last,
            replicas=replicas,
            microbatch_size=m,
            inflight=inflight,
            fwd=f_sum,
            bwd=b_sum,
            comm=comm,
            time=stage_time(f_sum, b_sum, comm),
            allreduce=self.allreduce(first, last, replicas),
            param_bytes=problem.range_param_bytes[first][last],
            activation_bytes=a_sum,
            in_bytes=problem.range_in_bytes_per_sample[first][last] * m,
            out_bytes=problem.range_out_bytes_per_sample[first][last] * m,
            memory=stage_memory(base, a_sum, inflight, io),
        )


def stage_time(fwd: float, bwd: float, comm: float) -> float:
    """t_s: seconds one stage spends on one microbatch."""
    return fwd + bwd + comm


def stage_memory(base: float, activation: float, inflight: int, io: float) -> float:
    """Peak bytes per rank: parameter state + held activations + boundary buffers."""
    return base + activation * inflight + io


def step_time(times: list[float], allreduces: list[float], microbatches: int) -> float:
    """T = sum t_s + (P - 1) * max t_s + max AR_s."""
    return sum(times) + (microbatches - 1) * max(times) + max(allreduces)


def stage_cost(
    problem: PlanProblem,
    first_block: int,
    last_block: int,
    replicas: int,
    microbatches: int,
    schedule: str,
    stage_index: int,
    num_stages: int,
) -> StageCost:
    """Cost of stage `stage_index` (of `num_stages`) covering blocks first..last on `replicas` ranks."""
    if not 0 <= first_block <= last_block < len(problem.blocks):
        raise ValueError(f"bad block range [{first_block}, {last_block}]")
    if replicas < 1 or microbatches < 1 or not 0 <= stage_index < num_stages:
        raise ValueError("replicas, microbatches must be >= 1 and 0 <= stage_index < num_stages")
    inflight = inflight_microbatches(schedule, microbatches, num_stages - stage_index)
    return CostModel(problem).stage(first_block, last_block, replicas, microbatches, inflight)


def evaluate(
    problem: PlanProblem,
    ranges: list[tuple[int, int]],
    replicas: list[int],
    microbatches: int,
    schedule: str,
    model: CostModel | None = None,
) -> tuple[float, list[StageCost]] | None:
    """Step time and stage costs of one candidate, or None when it is not feasible.

    Infeasible: microbatch count outside the problem's range or above the batch, a stage with more
    replicas than samples per microbatch, or a stage over the memory limit. A malformed candidate
    (ranges that do not cover the blocks in order, replicas not summing to the world size, an
    unknown schedule) raises ValueError. `problem.num_stages` and `problem.schedules` are not checked.
    """
    num_blocks = len(problem.blocks)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if not ranges or len(ranges) != len(replicas):
        raise ValueError("need one replica count per stage and at least one stage")
    expected_first = 0
    for first, last in ranges:
        if first != expected_first or last < first:
            raise ValueError(f"stage ranges {ranges} do not cover blocks 0..{num_blocks - 1} in order")
        expected_first = last + 1
    if expected_first != num_blocks:
        raise ValueError(f"stage ranges {ranges} do not cover blocks 0..{num_blocks - 1} in order")
    if any(r < 1 for r in replicas) or sum(replicas) != problem.world_size:
        raise ValueError(f"replicas {replicas} must be >= 1 and sum to world size {problem.world_size}")
    if microbatches not in microbatch_counts(problem):
        return None
    if max(replicas) > max_replicas(problem.global_batch, microbatches):
        return None
    model = model if model is not None else CostModel(problem)
    num_stages = len(ranges)
    costs = [
        model.stage(
            first, last, r, microbatches, inflight_microbatches(schedule, microbatches, num_stages - s)
        )
        for s, ((first, last), r) in enumerate(zip(ranges, replicas, strict=True))
    ]
    limit = problem.memory_limit_bytes
    if limit is not None and any(cost.memory > limit for cost in costs):
        return None
    total = step_time([c.time for c in costs], [c.allreduce for c in costs], microbatches)
    return total, costs
