"""The planner's cost model: time and memory of one stage and step time of a whole candidate plan."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, TypeVar

import numpy as np

from ..schedule import Schedule
from .sharding import ShardedState, sharded_state, stage_levels
from .types import PlanProblem, ShardLevel, interpolate


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Predicted cost of one stage (blocks first..last on `replicas` ranks) in a candidate plan."""

    first_block: int
    last_block: int  # inclusive
    replicas: int
    microbatch_size: int  # largest per-replica microbatch (m_s)
    inflight: int  # microbatches whose activations are held at the peak
    fwd: float  # seconds per microbatch, compute only
    bwd: float  # includes the recomputed forward when `recompute`
    comm: float  # seconds per microbatch: inputs and outputs, forward and backward
    time: float  # fwd + bwd + comm (t_s)
    allreduce: float  # seconds per step after the last backward: gradient allreduce + optimizer update
    param_bytes: float
    activation_bytes: float  # saved activations of one microbatch (without recompute)
    in_bytes: float  # boundary bytes received per microbatch (forward)
    out_bytes: float  # boundary bytes sent per microbatch (forward)
    memory: float  # predicted peak bytes per rank
    recompute: bool = False
    workspace_bytes: float = 0.0  # held once: max over its blocks of workspace + later blocks' gradients
    update: float = 0.0  # the optimizer update's part of `allreduce`
    shard: ShardLevel = ShardLevel.NONE  # how the replicas divide parameter state (plan/sharding.py)
    # Split backwards (zero bubble): the W pass's seconds within bwd, the gradients one microbatch keeps from
    # its I to its W, and how many microbatches keep them at the peak (0: the stage runs whole backwards).
    bwd_weight: float = 0.0
    deferred_bytes: float = 0.0
    pending: int = 0

    @property
    def peak_activation_bytes(self) -> float:
        """Activation bytes held at the peak: per microbatch x in flight, or with recompute the
        boundary inputs of the microbatches in flight plus one microbatch's activations; with split backwards
        also what the microbatches between their I and W keep (with recompute: their rebuilt activations)."""
        if self.pending:
            if self.recompute:
                return (
                    self.in_bytes * self.inflight
                    + (self.activation_bytes + self.deferred_bytes) * self.pending
                )
            return self.activation_bytes * self.inflight + self.deferred_bytes * self.pending
        if self.recompute:
            return self.in_bytes * self.inflight + self.activation_bytes
        return self.activation_bytes * self.inflight

    @property
    def path_time(self) -> float:
        """The stage's term of the step's summed part (see `step_time`): t_s, or with split backwards
        max(t_s - 2 W_s, 0) (zero bubble: each W fills a bubble of the fill and of the drain)."""
        return split_path(self.time, self.bwd_weight) if self.pending else self.time

    @property
    def tail_time(self) -> float:
        """The stage's term of the step's end: AR_s, or with split backwards AR_s + 2 W_s."""
        return split_tail(self.allreduce, self.bwd_weight) if self.pending else self.allreduce


def microbatch_rows(global_batch: int, microbatches: int) -> int:
    """Rows of the largest microbatch when the batch is split near-equally: ceil(B / P)."""
    return -(-global_batch // microbatches)


def replica_microbatch_size(global_batch: int, microbatches: int, replicas: int) -> int:
    """Largest per-replica microbatch m = ceil(ceil(B / P) / r)."""
    return -(-microbatch_rows(global_batch, microbatches) // replicas)


def max_replicas(global_batch: int, microbatches: int) -> int:
    """Most replicas a stage may have: every replica needs a sample of every microbatch."""
    return global_batch // microbatches


def microbatch_counts(problem: PlanProblem) -> list[int]:
    """Every microbatch count P the problem allows, ascending (possibly none)."""
    low = max(1, problem.min_microbatches)
    high = min(problem.global_batch, problem.max_microbatches)
    if problem.microbatch_choices is None:
        return list(range(low, high + 1))
    return sorted({p for p in problem.microbatch_choices if low <= p <= high})


def replica_counts(problem: PlanProblem, microbatches: int) -> list[int]:
    """Every replica count a stage may have with P microbatches, ascending."""
    high = min(problem.world_size, max_replicas(problem.global_batch, microbatches))
    if problem.replica_choices is None:
        return list(range(1, high + 1))
    return sorted({r for r in problem.replica_choices if 1 <= r <= high})


def p2p_link(problem: PlanProblem, inter: bool) -> tuple[float, float]:
    """(latency, bandwidth) of a transfer between stages, within a node or (`inter`) across nodes."""
    if not inter:
        return problem.p2p_latency, problem.p2p_bandwidth
    return (
        problem.p2p_latency if problem.inter_node_latency is None else problem.inter_node_latency,
        problem.p2p_bandwidth if problem.inter_node_bandwidth is None else problem.inter_node_bandwidth,
    )


def allreduce_link(problem: PlanProblem, inter: bool) -> tuple[float, float]:
    """(latency, bus bandwidth) of an allreduce within a node or (`inter`) spanning nodes."""
    if not inter:
        return problem.allreduce_latency, problem.allreduce_bandwidth
    return (
        problem.allreduce_latency
        if problem.allreduce_inter_latency is None
        else problem.allreduce_inter_latency,
        problem.allreduce_bandwidth
        if problem.allreduce_inter_bandwidth is None
        else problem.allreduce_inter_bandwidth,
    )


def p2p_time(problem: PlanProblem, nbytes: float, inter: bool = False) -> float:
    """Seconds to send `nbytes` between two stages (0 when nothing is sent); `inter`: across nodes."""
    if nbytes == 0:
        return 0.0
    latency, bandwidth = p2p_link(problem, inter)
    return latency + nbytes / bandwidth


def allreduce_time(problem: PlanProblem, param_bytes: float, replicas: int, inter: bool = False) -> float:
    """Seconds of the ring allreduce of a stage's gradients among its replicas (`inter`: spanning nodes)."""
    if replicas == 1:
        return 0.0
    latency, bandwidth = allreduce_link(problem, inter)
    return latency + 2 * (replicas - 1) / replicas * param_bytes / bandwidth


def optimizer_transient_bytes(problem: PlanProblem, first: int, last: int, replicas: int) -> float:
    """Temporaries of the optimizer step on one of `replicas` ranks holding blocks [first, last]."""
    per_param, per_largest = problem.optimizer_transient
    if not per_param and not per_largest:
        return 0.0
    shards = replicas if problem.zero_optimizer else 1
    largest = problem.range_largest_param_bytes[first][last] if problem.range_largest_param_bytes else 0.0
    updated = stepped_bytes(problem, problem.range_param_bytes[first][last] / shards, largest)
    return updated * per_param + largest * per_largest


Bytes = TypeVar("Bytes", float, np.ndarray)


def stepped_bytes(problem: PlanProblem, updated: Bytes, largest: Bytes) -> Bytes:
    """Parameter bytes one optimizer step call updates at once on a rank updating `updated` bytes whose largest
    tensor has `largest`: all of them, or a chunk (of at most optimizer_chunk_bytes, or one tensor) when the
    optimizer is stepped a chunk at a time (element-wise for arrays: many ranks' holdings priced at once)."""
    if problem.optimizer_chunk_bytes > 0:
        if isinstance(updated, np.ndarray):
            return np.minimum(updated, np.maximum(problem.optimizer_chunk_bytes, largest))
        return min(updated, max(problem.optimizer_chunk_bytes, largest))
    return updated


def sharded_transient_bytes(problem: PlanProblem, first: int, last: int, updated: float) -> float:
    """Temporaries of the optimizer step of a rank that updates `updated` parameter bytes of blocks first..last."""
    per_param, per_largest = problem.optimizer_transient
    if not per_param and not per_largest:
        return 0.0
    largest = problem.range_largest_param_bytes[first][last] if problem.range_largest_param_bytes else 0.0
    return stepped_bytes(problem, updated, largest) * per_param + largest * per_largest


def update_seconds_per_byte(problem: PlanProblem, replicas: int) -> float:
    """Optimizer update seconds per parameter byte of a stage on `replicas` ranks (ZeRO-1: a shard each)."""
    shards = replicas if problem.zero_optimizer else 1
    return problem.update_seconds_per_param_byte / shards


def spans_nodes(problem: PlanProblem, first_rank: int, replicas: int) -> bool:
    """Whether ranks first_rank..first_rank+replicas-1 lie on more than one node."""
    g = problem.gpus_per_node
    return g is not None and first_rank // g != (first_rank + replicas - 1) // g


def crosses_nodes(problem: PlanProblem, first_rank: int, end_rank: int) -> bool:
    """Whether the transfer between two consecutive stages on ranks first_rank..end_rank-1 (both
    stages together) uses the inter-node link: unless both stages lie inside one node."""
    g = problem.gpus_per_node
    return g is not None and first_rank // g != (end_rank - 1) // g


class RangeCost(NamedTuple):
    """The cost of one block range [first, j] at one microbatch size, per rank (seconds per microbatch, bytes)."""

    fwd: float  # forward compute, the blocks' sum
    bwd: float  # backward compute
    activation_bytes: float  # saved for backward by one microbatch
    in_bytes: float  # boundary tensors received per microbatch
    out_bytes: float  # boundary tensors sent per microbatch
    state_bytes: float  # parameters, gradients and optimizer state (and the step's user inputs)
    in_intra: float  # p2p seconds of the inputs, forward and backward, inside a node
    in_inter: float  # the same across nodes
    out_intra: float  # p2p seconds of the outputs, forward and backward, inside a node
    out_inter: float  # the same across nodes
    workspace_bytes: float  # the largest block workspace plus the parameter gradients of the blocks after it
    held_bytes: float  # held once per stage beyond parameter state: send/receive buffers + workspace
    bwd_weight: float = 0.0  # seconds of bwd spent on parameter gradients (a split backward's W pass)
    deferred_bytes: float = 0.0  # gradients one microbatch keeps from its I pass to its W pass


class CostModel:
    """Cached stage costs of one problem; every search path and `evaluate` use the same arithmetic."""

    def __init__(self, problem: PlanProblem) -> None:
        self.problem = problem
        self.num_blocks = len(problem.blocks)
        self._block_values: dict[int, tuple[list[float], list[float], list[float]]] = {}
        self._workspace: dict[int, list[float]] = {}
        self._split: dict[int, tuple[list[float], list[float]]] = {}
        # Without any workspace figures (older profiles, synthetic problems) the stage workspace is not modelled.
        self.has_workspace = any(block.workspace_bytes for block in problem.blocks)
        self._rows: dict[tuple[int, int, int], list[RangeCost]] = {}
        self._allreduce: dict[tuple[int, int, bool], list[float]] = {}
        self._tables: dict[tuple[int, int], dict[str, np.ndarray]] = {}

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

    def split_values(self, m: int) -> tuple[list[float], list[float]]:
        """W-pass seconds and deferred gradient bytes of every block at microbatch size m (0 where unknown)."""
        values = self._split.get(m)
        if values is None:
            blocks = self.problem.blocks
            values = self._split[m] = (
                [b.bwd_weight_at(m) for b in blocks],
                [b.deferred_grad_bytes_at(m) for b in blocks],
            )
        return values

    def workspace_values(self, m: int) -> list[float]:
        """Workspace bytes of every block at microbatch size m (0 where unknown)."""
        values = self._workspace.get(m)
        if values is None:
            values = self._workspace[m] = [b.workspace_at(m) for b in self.problem.blocks]
        return values

    def row(self, first: int, m: int, replicas: int = 1) -> list[RangeCost]:
        """For every last block j >= first: the RangeCost of range [first, j] at microbatch size m.

        Sums run block by block from `first`, so every caller gets bit-identical values.
        """
        shards = replicas if self.problem.zero_optimizer else 1
        key = (first, m, shards)
        row = self._rows.get(key)
        if row is not None:
            return row
        problem = self.problem
        fwd, bwd, act = self.block_values(m)
        weight, deferred = self.split_values(m)
        workspace = self.workspace_values(m)
        in_table = problem.range_in_bytes_per_sample[first]
        out_table = problem.range_out_bytes_per_sample[first]
        param_table = problem.range_param_bytes[first]
        state_factor = 2 + problem.opt_param_factor / shards  # ZeRO-1 divides optimizer state by replicas
        row = []
        f_sum = b_sum = a_sum = w_sum = d_sum = 0.0
        reach = -math.inf
        for j in range(first, self.num_blocks):
            f_sum += fwd[j]
            b_sum += bwd[j]
            a_sum += act[j]
            w_sum += weight[j]
            d_sum += deferred[j]
            # While block k runs its backward, the parameter gradients of blocks k+1..j (this microbatch's,
            # not yet accumulated) are live too, and this microbatch's activations of blocks k+1..j are freed
            # already: max over k of workspace_k + params(k+1..j) - act(k+1..j), on top of the activations.
            offset = param_table[j] - a_sum
            reach = max(reach, workspace[j] - offset)
            ws_max = reach + offset if self.has_workspace else 0.0
            in_bytes = in_table[j] * m
            out_bytes = out_table[j] * m
            row.append(
                RangeCost(
                    fwd=f_sum,
                    bwd=b_sum,
                    activation_bytes=a_sum,
                    in_bytes=in_bytes,
                    out_bytes=out_bytes,
                    state_bytes=param_table[j] * state_factor + problem.input_bytes,
                    in_intra=2 * p2p_time(problem, in_bytes),
                    in_inter=2 * p2p_time(problem, in_bytes, True),
                    out_intra=2 * p2p_time(problem, out_bytes),
                    out_inter=2 * p2p_time(problem, out_bytes, True),
                    workspace_bytes=ws_max,
                    held_bytes=held_bytes(in_bytes, out_bytes, ws_max),
                    bwd_weight=w_sum,
                    deferred_bytes=d_sum,
                )
            )
        self._rows[key] = row
        return row

    def range_table(self, m: int, replicas: int = 1) -> dict[str, np.ndarray]:
        """RangeCost field name -> [first][last]: that field of every range at microbatch size m, the values of
        `row` (inf below the diagonal); built once per (m, optimizer shards), read-only."""
        shards = replicas if self.problem.zero_optimizer else 1
        key = (m, shards)
        table = self._tables.get(key)
        if table is None:
            n = self.num_blocks
            values = np.full((len(RangeCost._fields), n, n), math.inf)
            for first in range(n):
                values[:, first, first:] = np.array(self.row(first, m, replicas)).T
            values.setflags(write=False)
            table = self._tables[key] = dict(zip(RangeCost._fields, values))
        return table

    def allreduce_row(self, first: int, replicas: int, inter: bool = False) -> list[float]:
        """End-of-step seconds of range [first, j] on `replicas` ranks, for every j >= first: the gradient
        allreduce plus the optimizer update of the rank's parameters (its shard with ZeRO-1)."""
        key = (first, replicas, inter)
        row = self._allreduce.get(key)
        if row is None:
            params = self.problem.range_param_bytes[first]
            per_byte = update_seconds_per_byte(self.problem, replicas)
            row = [
                allreduce_time(self.problem, params[j], replicas, inter) + params[j] * per_byte
                for j in range(first, self.num_blocks)
            ]
            self._allreduce[key] = row
        return row

    def update(self, first: int, last: int, replicas: int) -> float:
        """Seconds of the optimizer update of range [first, last] on one of `replicas` ranks."""
        return self.problem.range_param_bytes[first][last] * update_seconds_per_byte(self.problem, replicas)

    def allreduce(self, first: int, last: int, replicas: int, inter: bool = False) -> float:
        return self.allreduce_row(first, replicas, inter)[last - first]

    def stage(
        self,
        first: int,
        last: int,
        replicas: int,
        microbatches: int,
        inflight: int,
        recompute: bool = False,
        links: tuple[bool, bool, bool] = (False, False, False),
        shard: ShardLevel = ShardLevel.NONE,
        pending: int = 0,
    ) -> StageCost:
        """Full cost breakdown of one stage; links: (inputs, outputs, allreduce) cross nodes; `shard`: how its
        replicas divide parameter state (ignored with one replica); `pending` > 0: it runs split backwards and
        that many microbatches keep their deferred gradients at its peak."""
        problem = self.problem
        m, row = self._range(first, last, replicas, microbatches)
        f_sum, b_sum, a_sum = row.fwd, row.bwd, row.activation_bytes
        in_bytes, out_bytes = row.in_bytes, row.out_bytes
        comm = (row.in_inter if links[0] else row.in_intra) + (row.out_inter if links[1] else row.out_intra)
        bwd = b_sum + f_sum if recompute else b_sum
        shard = shard if replicas > 1 else ShardLevel.NONE
        state = self._sharded(first, last, replicas, shard, recompute, links[2])
        if state is not None:
            comm += state.gather_seconds
        memory = self._peak(row, first, last, replicas, microbatches, inflight, recompute, state, pending)
        if state is None:
            allreduce = self.allreduce(first, last, replicas, links[2])
            update = self.update(first, last, replicas)
        else:
            update = state.updated * problem.update_seconds_per_param_byte
            allreduce = allreduce_time(problem, state.reduced, replicas, links[2]) + update
        return StageCost(
            first_block=first,
            last_block=last,
            replicas=replicas,
            microbatch_size=m,
            inflight=inflight,
            fwd=f_sum,
            bwd=bwd,
            comm=comm,
            time=stage_time(f_sum, bwd, comm),
            allreduce=allreduce,
            param_bytes=problem.range_param_bytes[first][last],
            activation_bytes=a_sum,
            in_bytes=in_bytes,
            out_bytes=out_bytes,
            memory=memory,
            recompute=recompute,
            workspace_bytes=row.workspace_bytes,
            update=update,
            shard=shard,
            bwd_weight=row.bwd_weight if pending else 0.0,
            deferred_bytes=row.deferred_bytes if pending else 0.0,
            pending=pending,
        )

    def memory(
        self,
        first: int,
        last: int,
        replicas: int,
        microbatches: int,
        inflight: int,
        recompute: bool = False,
        shard: ShardLevel = ShardLevel.NONE,
        pending: int = 0,
    ) -> float:
        """`stage(...).memory` alone (the same arithmetic; links do not change it)."""
        _, row = self._range(first, last, replicas, microbatches)
        state = self._sharded(first, last, replicas, shard, recompute)
        return self._peak(row, first, last, replicas, microbatches, inflight, recompute, state, pending)

    def _range(self, first: int, last: int, replicas: int, microbatches: int) -> tuple[int, RangeCost]:
        """The per-replica microbatch size of a stage of blocks first..last and its range's costs at that size."""
        m = replica_microbatch_size(self.problem.global_batch, microbatches, replicas)
        return m, self.row(first, m, replicas)[last - first]

    def _sharded(
        self, first: int, last: int, replicas: int, shard: ShardLevel, recompute: bool, inter: bool = False
    ) -> ShardedState | None:
        """The sharded state of a stage of blocks first..last at `shard` (None: unsharded, or one replica)."""
        if replicas <= 1 or shard == ShardLevel.NONE:
            return None
        return sharded_state(self.problem, first, last, replicas, shard, recompute, inter)

    def _peak(
        self,
        row: RangeCost,
        first: int,
        last: int,
        replicas: int,
        microbatches: int,
        inflight: int,
        recompute: bool,
        state: ShardedState | None,
        pending: int,
    ) -> float:
        """Peak bytes per rank of a stage of `row`'s range (`state`: its sharded state, None unsharded)."""
        problem = self.problem
        a_sum, in_bytes, out_bytes, io = row.activation_bytes, row.in_bytes, row.out_bytes, row.held_bytes
        base = row.state_bytes if state is None else state.bytes + problem.input_bytes
        if pending:
            memory = split_memory(base, a_sum, row.deferred_bytes, in_bytes, inflight, pending, io, recompute)
        elif recompute:
            memory = recompute_memory(base, a_sum, in_bytes, inflight, io)
        else:
            memory = stage_memory(base, a_sum, inflight, io)
        memory += sent_bytes(in_bytes, out_bytes, microbatches, inflight, recompute)
        # The optimizer step runs after the activations are freed: the peak is the larger of the two phases.
        if state is None:
            return max(memory, base + optimizer_transient_bytes(problem, first, last, replicas))
        step = state.step_bytes + problem.input_bytes
        return max(memory, step + sharded_transient_bytes(problem, first, last, state.updated))

    def fitting(
        self,
        first: int,
        last: int,
        replicas: int,
        microbatches: int,
        inflight: int,
        links: tuple[bool, bool, bool] = (False, False, False),
        pending: int = 0,
    ) -> StageCost | None:
        """The stage as the search runs it: without recompute if some level fits, the first of the problem's
        shard levels (least sharding first) with which it fits in memory; else recomputing (when allowed) at the
        first level that fits so; None when nothing fits. Without a memory limit: the first level.

        One exception: when only ZeRO-3 fits without recompute, recomputing at the first level that fits so wins
        if its seconds per microbatch (on intra-node links) are fewer: ZeRO-3 gathers every microbatch, and
        otherwise allowing sharding would drop the unsharded recomputed stage a search without sharding has."""
        limit = self.problem.memory_limit_bytes
        local = (False, False, False)
        found: list[StageCost] = []  # the first level that fits, without recompute then with it
        for recompute in (False, True) if self.problem.allow_recompute else (False,):
            for shard in stage_levels(self.problem, replicas):
                if limit is None or (
                    self.memory(first, last, replicas, microbatches, inflight, recompute, shard, pending)
                    <= limit
                ):
                    found.append(
                        self.stage(
                            first, last, replicas, microbatches, inflight, recompute, local, shard, pending
                        )
                    )
                    break
            if found and found[0].shard != ShardLevel.ZERO_3:
                break
        if not found:
            return None
        chosen = min(found, key=lambda cost: cost.time)  # ties: the first, without recompute
        if links == local:
            return chosen
        return self.stage(
            first, last, replicas, microbatches, inflight, chosen.recompute, links, chosen.shard, pending
        )


def stage_time(fwd: float, bwd: float, comm: float) -> float:
    """t_s: seconds one stage spends on one microbatch (bwd includes a recomputed forward)."""
    return fwd + bwd + comm


def held_bytes(in_bytes: float, out_bytes: float, workspace: float) -> float:
    """Bytes a stage holds once per step beyond parameter state and sends: receive buffers of its boundary
    tensors (forward and backward: the current action's and the one the runtime posts ahead for the next) and
    the largest workspace of its blocks."""
    return 2 * (in_bytes + out_bytes) + workspace


# The runtime holds the sends of at most this many microbatches per kind (outputs, input gradients): before it sends
# a newer one it waits for the older ones to be received (runtime/transfer.py).
SEND_WINDOW = 2


def sent_bytes(
    in_bytes: float, out_bytes: float, microbatches: int, inflight: int, recompute: bool = False
) -> float:
    """Send buffers the runtime still holds: the input gradients of at most SEND_WINDOW microbatches, and the outputs
    of as many (a recomputed stage frees an output once its send is received) or, for a stage that keeps its
    autograd graphs, of every microbatch in flight (the graph's outputs live until their backward; the sends are
    views of them)."""
    window = min(microbatches, SEND_WINDOW)
    outputs = window if recompute else min(microbatches, inflight + 1)
    return window * in_bytes + outputs * out_bytes


def stage_memory(base: float, activation: float, inflight: int, io: float) -> float:
    """Peak bytes per rank: parameter state + held activations + `io` (held_bytes: buffers, workspace)."""
    return base + activation * inflight + io


def recompute_memory(base: float, activation: float, in_bytes: float, inflight: int, io: float) -> float:
    """Peak bytes per rank of a recomputed stage: parameter state + the boundary inputs of the
    microbatches in flight + one microbatch's activations (rebuilt for its backward) + `io` (held_bytes)."""
    return base + in_bytes * inflight + activation + io


def split_memory(
    base: float,
    activation: float,
    deferred: float,
    in_bytes: float,
    inflight: int,
    pending: int,
    io: float,
    recompute: bool,
) -> float:
    """Peak bytes per rank of a stage running split backwards: parameter state + the activations of the
    microbatches in flight (recomputed: their boundary inputs) + what the `pending` microbatches between their
    I and W passes keep: their deferred gradients (recomputed: and their activations, rebuilt in I for W) +
    `io`. Each part is counted at its own peak (an upper bound on their sum's)."""
    if recompute:
        return base + in_bytes * inflight + (activation + deferred) * pending + io
    return base + activation * inflight + deferred * pending + io


def split_path(time: float, bwd_weight: float) -> float:
    """A zero-bubble stage's term of the step's summed part: max(t_s - 2 W_s, 0) (ZB-H1: the W passes fill
    (S - 1)(F + I - W) of what 1F1B leaves as the bubble (S - 1)(F + B))."""
    return max(time - 2.0 * bwd_weight, 0.0)


def split_tail(allreduce: float, bwd_weight: float) -> float:
    """A zero-bubble stage's term of the step's end: AR_s + 2 W_s."""
    return allreduce + 2.0 * bwd_weight


def held_counts(schedule: Schedule, microbatches: int, num_stages: int, stage: int) -> tuple[int, int]:
    """(microbatches whose activations stage `stage` of `num_stages` holds at its peak, microbatches that keep
    their deferred gradients there: with split backwards position s defers s W passes, so at most
    min(P, s + 1) lie between their I and W; 0 with whole backwards)."""
    inflight = schedule.inflight(microbatches, num_stages - stage, num_stages)
    return inflight, min(microbatches, stage + 1) if schedule.splits_backward else 0


def step_time(
    times: list[float], allreduces: list[float], microbatches: int, paths: list[float] | None = None
) -> float:
    """T = sum t_s + (P - 1) * max t_s + max AR_s.

    With split backwards (zero bubble, ZB-H1) the summed part uses `paths` (max(t_s - 2 W_s, 0)) and
    `allreduces` are AR_s + 2 W_s: for S equal stages P (F + B) + (S - 1)(F + I - W) + AR, the closed form of
    Qi et al., against 1F1B's P (F + B) + (S - 1)(F + B) + AR."""
    return sum(times if paths is None else paths) + (microbatches - 1) * max(times) + max(allreduces)


def plan_step_time(costs: list[StageCost], microbatches: int) -> float:
    """`step_time` of a candidate's stage costs (zero bubble when its stages run split backwards)."""
    if any(c.pending for c in costs):
        return step_time(
            [c.time for c in costs], [c.tail_time for c in costs], microbatches, [c.path_time for c in costs]
        )
    return step_time([c.time for c in costs], [c.allreduce for c in costs], microbatches)


def stage_cost(
    problem: PlanProblem,
    first_block: int,
    last_block: int,
    replicas: int,
    microbatches: int,
    schedule: Schedule | str,
    stage_index: int,
    num_stages: int,
    recompute: bool = False,
) -> StageCost:
    """Cost of stage `stage_index` (of `num_stages`) covering blocks first..last on `replicas` ranks.

    Transfers are charged at the intra-node rate; `evaluate` applies the placement rules."""
    if not 0 <= first_block <= last_block < len(problem.blocks):
        raise ValueError(f"bad block range [{first_block}, {last_block}]")
    if replicas < 1 or microbatches < 1 or not 0 <= stage_index < num_stages:
        raise ValueError("replicas, microbatches must be >= 1 and 0 <= stage_index < num_stages")
    inflight, pending = held_counts(Schedule(schedule), microbatches, num_stages, stage_index)
    return CostModel(problem).stage(
        first_block, last_block, replicas, microbatches, inflight, recompute, pending=pending
    )


def stage_ranges(lasts: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """[(first block, last block)] of stages in pipeline order, from their last blocks."""
    ranges, first = [], 0
    for last in lasts:
        ranges.append((first, last))
        first = last + 1
    return ranges


def stage_links(problem: PlanProblem, replicas: list[int]) -> list[tuple[bool, bool, bool]]:
    """Per stage: whether its inputs, its outputs and its allreduce use inter-node links, with ranks
    assigned contiguously in pipeline order. The first stage's inputs and the last stage's outputs
    (to and from the user) count as intra-node."""
    starts = [0]
    for r in replicas:
        starts.append(starts[-1] + r)
    count = len(replicas)
    return [
        (
            s > 0 and crosses_nodes(problem, starts[s - 1], starts[s + 1]),
            s + 1 < count and crosses_nodes(problem, starts[s], starts[s + 2]),
            spans_nodes(problem, starts[s], replicas[s]),
        )
        for s in range(count)
    ]


def evaluate(
    problem: PlanProblem,
    ranges: list[tuple[int, int]],
    replicas: list[int],
    microbatches: int,
    schedule: Schedule | str,
    model: CostModel | None = None,
    recompute: list[bool] | None = None,
    shard: list[ShardLevel] | None = None,
) -> tuple[float, list[StageCost]] | None:
    """Step time and stage costs of one candidate, or None when it is not feasible.

    Infeasible: microbatch count outside the problem's range or choices or above the batch, a
    replica count outside the choices or above the samples per microbatch, recompute asked for when
    the problem does not allow it, or a stage over the memory limit. recompute=None lets each stage
    recompute exactly when it must to fit in memory (and the problem allows it), which is what the
    search does. A malformed candidate (ranges that do not cover the blocks in order, replicas not
    summing to the world size, an unknown schedule) raises ValueError. `problem.num_stages` and
    `problem.schedules` are not checked.
    """
    num_blocks = len(problem.blocks)
    schedule = Schedule(schedule)  # ValueError for an unknown name
    if not ranges or len(ranges) != len(replicas):
        raise ValueError("need one replica count per stage and at least one stage")
    if recompute is not None and len(recompute) != len(ranges):
        raise ValueError("need one recompute flag per stage")
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
    allowed = set(replica_counts(problem, microbatches))
    if any(r not in allowed for r in replicas):
        return None
    if recompute is not None and any(recompute) and not problem.allow_recompute:
        return None
    if shard is not None and len(shard) != len(ranges):
        raise ValueError("need one shard level per stage")
    if shard is not None and any(level not in stage_levels(problem, r) for level, r in zip(shard, replicas)):
        return None
    model = model if model is not None else CostModel(problem)
    limit = problem.memory_limit_bytes
    num_stages = len(ranges)
    costs = []
    for s, ((first, last), r, links) in enumerate(zip(ranges, replicas, stage_links(problem, replicas))):
        inflight, pending = held_counts(schedule, microbatches, num_stages, s)
        levels = stage_levels(problem, r) if shard is None else (shard[s],)
        if recompute is not None:
            found = [
                model.stage(first, last, r, microbatches, inflight, recompute[s], links, q, pending)
                for q in levels
            ]
            fit = [c for c in found if limit is None or c.memory <= limit]
            cost = (fit or found)[0]
        elif shard is None:
            cost = model.fitting(first, last, r, microbatches, inflight, links, pending) or model.stage(
                first, last, r, microbatches, inflight, problem.allow_recompute, links, levels[-1], pending
            )
        else:
            cost = model.stage(first, last, r, microbatches, inflight, False, links, levels[0], pending)
            if limit is not None and cost.memory > limit and problem.allow_recompute:
                cost = model.stage(first, last, r, microbatches, inflight, True, links, levels[0], pending)
        if limit is not None and cost.memory > limit:
            return None
        costs.append(cost)
    return plan_step_time(costs, microbatches), costs
