"""Costs of positions that run several model chunks (interleaved 1F1B): links, held microbatches and memory.

A chunked plan cuts the blocks into ``positions * chunks`` contiguous virtual stages; virtual stage k runs on
position ``k % positions`` (`rannc.schedule.virtual_stage`). Each virtual stage is priced like a stage of the
cost model (`CostModel.row`); what a position holds adds up over its chunks, with the activations of the
(microbatch, chunk) pairs its schedule holds at once weighted by each chunk's bytes (`held_profile`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..schedule import Action, ActionKind
from .cost import CostModel, RangeCost, allreduce_time, replica_microbatch_size, sent_bytes, stepped_bytes
from .types import PlanProblem, ShardLevel

__all__ = [
    "PieceCost",
    "PositionMemory",
    "chunk_links",
    "chunk_peaks",
    "held_profile",
    "peak_activation_bytes",
    "piece_cost",
    "position_memory",
    "position_starts",
]


def peak_activation_bytes(
    actions: Sequence[Action], chunk_bytes: Sequence[float], deferred_bytes: Sequence[float] | None = None
) -> float:
    """Most activation bytes held at once while running `actions`, one microbatch of chunk c holding
    `chunk_bytes[c]` from its forward until the pass that releases it, and `deferred_bytes[c]` more from its I
    pass until its W pass."""
    held = peak = 0.0
    for action in actions:
        if action.kind == ActionKind.FORWARD:
            held += chunk_bytes[action.chunk]
            peak = max(peak, held)
        elif action.kind == ActionKind.BACKWARD_INPUT and deferred_bytes is not None:
            held += deferred_bytes[action.chunk]
            peak = max(peak, held)
        elif action.kind.releases:
            held -= chunk_bytes[action.chunk]
            if action.kind == ActionKind.BACKWARD_WEIGHT and deferred_bytes is not None:
                held -= deferred_bytes[action.chunk]
    return peak


def held_profile(actions: Sequence[Action], chunks: int) -> np.ndarray:
    """[forward number][chunk]: how many microbatches of each chunk are held right after each forward of
    `actions` (the moments a peak can occur). The activation peak for chunk bytes a is ``(profile @ a).max()``."""
    counts = np.zeros(chunks)
    rows = []
    for action in actions:
        if action.kind == ActionKind.FORWARD:
            counts[action.chunk] += 1
            rows.append(counts.copy())
        elif action.kind.releases:
            counts[action.chunk] -= 1
    return np.array(rows) if rows else np.zeros((1, chunks))


def chunk_peaks(actions: Sequence[Action], chunks: int) -> list[int]:
    """Most microbatches of each chunk held at once (forward until release) while running `actions`."""
    return [int(v) for v in held_profile(actions, chunks).max(axis=0)]


def position_problem(problem: PlanProblem, shard: ShardLevel) -> PlanProblem:
    """The problem that prices positions of several chunks sharded at `shard` (none or ZeRO-1): ZeRO-1 is the cost
    model's problem-wide ZeRO-1 (`zero_optimizer`: optimizer state and update over a position's replicas). The
    planner (`interleave.priced_for`) and the simulator (`chunked_stage_timings`) both price with it."""
    if shard == ShardLevel.ZERO_1 and not problem.zero_optimizer:
        return dataclasses.replace(problem, zero_optimizer=True)
    return problem


def position_starts(replicas: Sequence[int]) -> list[int]:
    """First rank of every position (ranks contiguous in position order) and, last, the world size."""
    starts = [0]
    for r in replicas:
        starts.append(starts[-1] + r)
    return starts


def _apart(problem: PlanProblem, starts: list[int], a: int, b: int) -> bool:
    """Whether the ranks of positions a and b do not all lie in one node (so a transfer between them crosses)."""
    g = problem.gpus_per_node
    if g is None:
        return False
    ends = (starts[a], starts[a + 1] - 1, starts[b], starts[b + 1] - 1)
    return len({rank // g for rank in ends}) > 1


def chunk_links(problem: PlanProblem, replicas: Sequence[int], chunks: int) -> list[tuple[bool, bool, bool]]:
    """Per virtual stage (pipeline order): whether its inputs, its outputs and its allreduce use inter-node links.
    Virtual stage k talks to the positions of k - 1 and k + 1 (the last position's chunk c sends to position 0's
    chunk c + 1); the pipeline's own inputs and outputs count as intra-node, as in `stage_links`."""
    positions = len(replicas)
    starts = position_starts(replicas)
    count = positions * chunks
    g = problem.gpus_per_node
    links = []
    for k in range(count):
        s = k % positions
        spans = g is not None and starts[s] // g != (starts[s + 1] - 1) // g
        links.append(
            (
                k > 0 and _apart(problem, starts, (k - 1) % positions, s),
                k + 1 < count and _apart(problem, starts, s, (k + 1) % positions),
                spans,
            )
        )
    return links


class PieceCost(NamedTuple):
    """One virtual stage (blocks first..last) of a chunked plan, per rank of its position."""

    first: int
    last: int
    fwd: float  # seconds per microbatch, compute
    bwd: float  # includes the recomputed forward when recomputing
    comm_in: float  # one-way p2p seconds of the inputs
    comm_out: float  # one-way p2p seconds of the outputs
    time: float  # t_k = fwd + bwd + 2 (comm_in + comm_out)
    params: float  # parameter bytes
    state: float  # parameters, gradients and optimizer state (its shard with ZeRO-1)
    largest: float  # the largest parameter tensor's bytes
    in_bytes: float  # boundary bytes received per microbatch
    out_bytes: float  # boundary bytes sent per microbatch
    workspace: float  # held once while it runs: its largest block's workspace (+ later parameter gradients)
    activation: float  # bytes one held microbatch keeps: its activations, or its inputs when recomputing
    recompute_workspace: float  # one microbatch's activations rebuilt for the backward (recomputing), else 0
    recompute: bool  # its forward runs again in backward (its sends are released once received)


def piece_cost(
    model: CostModel,
    first: int,
    last: int,
    m: int,
    replicas: int,
    recompute: bool,
    links: tuple[bool, bool, bool],
) -> PieceCost:
    """The PieceCost of blocks first..last at per-replica microbatch size `m` on `replicas` ranks."""
    problem = model.problem
    row: RangeCost = model.row(first, m, replicas)[last - first]
    shards = replicas if problem.zero_optimizer else 1
    params = problem.range_param_bytes[first][last]
    largest = problem.range_largest_param_bytes[first][last] if problem.range_largest_param_bytes else 0.0
    comm_in = (row.in_inter if links[0] else row.in_intra) / 2
    comm_out = (row.out_inter if links[1] else row.out_intra) / 2
    bwd = row.bwd + row.fwd if recompute else row.bwd
    return PieceCost(
        first=first,
        last=last,
        fwd=row.fwd,
        bwd=bwd,
        comm_in=comm_in,
        comm_out=comm_out,
        time=row.fwd + bwd + 2 * (comm_in + comm_out),
        params=params,
        state=params * (2 + problem.opt_param_factor / shards),
        largest=largest,
        in_bytes=row.in_bytes,
        out_bytes=row.out_bytes,
        workspace=row.workspace_bytes,
        activation=row.in_bytes if recompute else row.activation_bytes,
        recompute_workspace=row.activation_bytes if recompute else 0.0,
        recompute=recompute,
    )


def piece_allreduce(problem: PlanProblem, params: float, replicas: int, inter: bool) -> float:
    """Seconds of a position's gradient allreduce of `params` bytes (its chunks' together) among its replicas."""
    return allreduce_time(problem, params, replicas, inter)


@dataclasses.dataclass(frozen=True)
class PositionMemory:
    """Peak bytes per rank of one position and what they are made of."""

    parts: dict[str, float]  # static: parameters, gradients, optimizer, buffers, inputs, workspace(s)
    activations: float  # the held (microbatch, chunk) activations at their peak
    step_end: float  # parameter state + the optimizer step's temporaries (after the activations are freed)

    @property
    def static(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        """The larger of the forward/backward phase and the optimizer step."""
        return max(self.static + self.activations, self.step_end)


def position_memory(
    problem: PlanProblem,
    pieces: Sequence[PieceCost],
    actions: Sequence[Action],
    microbatches: int,
    replicas: int,
) -> PositionMemory:
    """Memory of a position running `pieces` (its chunks, chunk order) with the action list `actions`.

    Its chunks' parameter state adds up; the step's user inputs are held once; a chunk holds receive buffers for
    its boundary tensors (the current action's and one posted ahead) and its sends until their receivers have
    them (`sent_bytes`: the send window's microbatches, or its held microbatches + 1 of outputs its graphs keep); the largest workspace (and, recomputing, the
    largest rebuilt microbatch) is held once, since one chunk runs at a time; the held activations are
    `peak_activation_bytes` over the schedule. Tied weights two chunks of one position share count twice (an
    upper bound: the runtime holds one tensor)."""
    chunks = len(pieces)
    held = chunk_peaks(actions, chunks)
    shards = replicas if problem.zero_optimizer else 1
    params = sum(p.params for p in pieces)
    buffers = sum(
        2 * (p.in_bytes + p.out_bytes) + sent_bytes(p.in_bytes, p.out_bytes, microbatches, h, p.recompute)
        for p, h in zip(pieces, held)
    )
    parts = {
        "parameters": params,
        "gradients": params,
        "optimizer": params * problem.opt_param_factor / shards,
        "buffers": buffers,
    }
    if problem.input_bytes:
        parts["inputs"] = problem.input_bytes
    workspace = max(p.workspace for p in pieces)
    if workspace:
        parts["workspace"] = workspace
    rebuilt = max(p.recompute_workspace for p in pieces)
    if rebuilt:
        parts["recompute workspace"] = rebuilt
    activations = peak_activation_bytes(actions, [p.activation for p in pieces])
    per_param, per_largest = problem.optimizer_transient
    state = sum(p.state for p in pieces) + problem.input_bytes
    largest = max(p.largest for p in pieces)
    transient = stepped_bytes(problem, params / shards, largest) * per_param + largest * per_largest
    return PositionMemory(parts, activations, state + transient)


def microbatch_size(problem: PlanProblem, microbatches: int, replicas: int) -> int:
    """Largest per-replica microbatch of a position with `replicas` replicas."""
    return replica_microbatch_size(problem.global_batch, microbatches, replicas)
