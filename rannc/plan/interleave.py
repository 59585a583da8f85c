"""Interleaved 1F1B plans (Narayanan et al., SC 2021): the blocks cut into positions x chunks virtual stages.

The choice set, for a problem whose `schedules` include interleaved_1f1b:

* positions S >= 2 that divide the world, each with world / S replicas (uniform: a position's chunks share its
  ranks, and an interleaved pipeline runs at the pace of its slowest position, so the replicas that would speed
  up one stage of a plain pipeline would idle here; it also keeps the search to one replica vector per S);
* chunks v >= 2 per position (`problem.chunks` forces one), S * v <= blocks, v <= `problem.max_chunks`;
* microbatch counts P the schedule accepts (P >= S and a multiple of its rounds, `rannc.schedule`) among the
  problem's, each replica getting a sample of every microbatch;
* every cut of the blocks into S * v contiguous virtual stages (virtual stage k on position k % S);
* activation recompute for every virtual stage or none (when the problem allows recompute) in the cut search;
  a recomputing slice's cut then keeps the activations of the chunks whose positions have room for them
  (`recompute_where_needed`: the last chunks of the last positions hold few microbatches);
* the positions unsharded or ZeRO-1 (optimizer state over a position's replicas), the least of the problem's
  `shard_levels` with which the slice fits (`interleaved_shard_levels`): a rank running several model chunks
  cannot gather them unit by unit, so ZeRO-2/3 is not offered.

For each (S, v, P, recompute) `CutSearch` finds exactly the cut of least t_max, the largest virtual stage time
(compute, recompute and p2p both ways), among the cuts whose every position fits in memory (`position_memory`:
its chunks' parameter state plus the (microbatch, chunk) activations interleaved 1F1B holds at once, weighted by
chunk). The interleaved step is then at most (P v + S - 1) t_max + the allreduce: P v t_max of work and the
bubble (S - 1) t_max, 1 / v of 1F1B's. Candidates are taken in the order of a lower bound (every position
computes P microbatches of 1 / S of the model at least) and simulated (`simulate_plan`); the least simulated step
is compared with the other schedules' best plan by `plan_stages`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..schedule import Action, Schedule
from .chunked import (
    PieceCost,
    chunk_links,
    chunk_peaks,
    held_profile,
    piece_allreduce,
    piece_cost,
    position_memory,
    position_problem,
)
from .cost import (
    CostModel,
    microbatch_counts,
    replica_counts,
    replica_microbatch_size,
    sent_bytes,
    stepped_bytes,
    update_seconds_per_byte,
)
from .simulate import Timeline, simulate_plan
from .types import Plan, PlanProblem, ShardLevel, StagePlan

__all__ = [
    "ChunkedConfig",
    "InterleavedSearch",
    "best_interleaved",
    "CutSearch",
    "chunk_counts",
    "interleaved_configs",
    "interleaved_microbatch_counts",
    "interleaved_plan",
    "interleaved_replica_sizes",
    "interleaved_shard_levels",
    "interleaved_step_time",
    "no_interleaved_message",
    "position_counts",
    "recompute_where_needed",
]

logger = logging.getLogger(__name__)

SCHEDULE = Schedule.INTERLEAVED_1F1B
# Depth-first nodes one CutSearch may visit over all its thresholds. A threshold whose search runs out is counted
# as infeasible and the result marked inexact (`CutSearch.exact`): proving that no cut fits can take exponentially
# many nodes when memory binds everywhere (T5 11B without recompute on 32 x 40 GiB; where the positions' room for
# parameter state is short, `CutSearch._state_short` proves it before searching: GPT-3 175B on 32 positions of
# 80 GB); a cut that fits is found in a few nodes per virtual stage.
NODE_BUDGET = 5_000
# Depth-first nodes all the cut searches of one `best_interleaved` may visit together. Where memory binds on every
# slice (a small model planned at its least memory), each of a hundred slices would spend NODE_BUDGET failing to
# find a cut (measured: a 4 x 256 GPT-2 on 4 ranks at 0.321 GiB, 70 slices, 173k nodes, 17 s); the slices left
# when it runs out are not searched (`InterleavedSearch.skipped`) and the best plan found so far stands. The
# searches of GPT-3 175B on 1024 ranks visit 14k nodes in all.
SEARCH_NODE_BUDGET = 20_000
# Choices of chunk ranges `CutSearch._state_short` weighs for a slice's positions together before it gives up (proves
# nothing).
COMPOSITION_BUDGET = 5_000
# A plan must beat the best one before it by more than this (relative) to replace it.
TIE = 1e-9


class RangeTables(NamedTuple):
    """[first][last] of every range of blocks at a slice's microbatch size (inf below the diagonal)."""

    io: np.ndarray  # boundary bytes in and out
    work: np.ndarray  # workspace
    rebuilt: np.ndarray  # activations recompute rebuilds (0 without recompute)
    act: np.ndarray  # what a chunk keeps per held microbatch (recomputing: its inputs)
    params: np.ndarray
    largest: np.ndarray  # largest parameter


class InterleavedSearch(NamedTuple):
    """What `best_interleaved` found: the plan (None: no slice beat the cutoff), how many slices it cut, of
    those how many cut searches ran out of nodes (their slices' cuts may not be the least, or a slice counted as
    not fitting may have a cut that fits), and how many slices that could still have beaten the best plan were
    not searched because SEARCH_NODE_BUDGET ran out."""

    plan: Plan | None
    searched: int
    inexact: int
    timeline: Timeline | None = None  # the plan's simulated step
    skipped: int = 0


class ChunkedConfig(NamedTuple):
    """One slice of the interleaved choice set."""

    positions: int
    chunks: int
    microbatches: int
    replicas: int  # per position
    recompute: bool


def position_counts(problem: PlanProblem, num_blocks: int | None = None) -> list[int]:
    """Positions S searched: the forced stage count, or every S >= 2 dividing the world with 2 S <= blocks (the
    problem's, or `num_blocks` for the same model cut into that many)."""
    num_blocks = len(problem.blocks) if num_blocks is None else num_blocks
    world = problem.world_size
    if problem.num_stages is not None:
        forced = problem.num_stages
        return [forced] if forced >= 2 and world % forced == 0 and 2 * forced <= num_blocks else []
    return [s for s in range(2, min(world, num_blocks // 2) + 1) if world % s == 0]


def chunk_counts(problem: PlanProblem, positions: int) -> list[int]:
    """Chunks v searched for S positions: the forced count, or 2 .. min(max_chunks, blocks / S)."""
    most = len(problem.blocks) // positions
    if problem.chunks is not None:
        return [problem.chunks] if 2 <= problem.chunks <= most else []
    return list(range(2, min(problem.max_chunks, most) + 1))


def interleaved_microbatch_counts(problem: PlanProblem, positions: int) -> list[int]:
    """Microbatch counts P of the problem the interleaved schedule accepts for S positions, replicas world / S."""
    replicas = problem.world_size // positions
    return [
        p
        for p in microbatch_counts(problem)
        if p >= positions and p % (p // positions) == 0 and replicas in replica_counts(problem, p)
    ]


def interleaved_replica_sizes(problem: PlanProblem, num_blocks: int) -> list[int]:
    """The per-replica microbatch sizes of every slice of `problem`'s choice set were its model cut into at most
    `num_blocks` blocks: the sizes a search on such blocks prices (and so the only ones worth estimating)."""
    return sorted(
        {
            replica_microbatch_size(problem.global_batch, p, problem.world_size // s)
            for s in position_counts(problem, num_blocks)
            for p in interleaved_microbatch_counts(problem, s)
        }
    )


def interleaved_shard_levels(problem: PlanProblem) -> tuple[ShardLevel, ...]:
    """The levels an interleaved plan's positions may take, least sharding first: none and ZeRO-1, those of the
    problem's `shard_levels` (the runtime runs ZeRO-2/3 on ranks of one chunk only, `build.shard_stage`). With the
    problem-wide ZeRO-1 (`zero_optimizer`) every stage is priced as ZeRO-1 already: unsharded here."""
    if problem.zero_optimizer:
        return (ShardLevel.NONE,)
    return tuple(level for level in (ShardLevel.NONE, ShardLevel.ZERO_1) if level in problem.shard_levels)


def interleaved_configs(problem: PlanProblem) -> list[ChunkedConfig]:
    """Every slice of the choice set (see the module's docstring)."""
    if not interleaved_shard_levels(problem):
        return []
    flags = [False, True] if problem.allow_recompute else [False]
    return [
        ChunkedConfig(s, v, p, problem.world_size // s, recompute)
        for s in position_counts(problem)
        for v in chunk_counts(problem, s)
        for p in interleaved_microbatch_counts(problem, s)
        for recompute in flags
    ]


def no_interleaved_message(problem: PlanProblem) -> str:
    """Why the choice set of interleaved plans is empty (for a problem that allows no other schedule)."""
    if not interleaved_shard_levels(problem):
        levels = ", ".join(str(level) for level in problem.shard_levels)
        return (
            f"interleaved 1F1B cannot run sharded stages at {levels}: a rank running several model chunks keeps "
            "its parameters and gradients whole (ZeRO-2/3 need one chunk per rank); use shard_stages 'none', "
            "'zero-1' or 'auto' (rannc plan --shard), or another schedule"
        )
    forced = f" (forced: {problem.num_stages} positions)" if problem.num_stages is not None else ""
    chunks = f", {problem.chunks} chunks forced" if problem.chunks is not None else ""
    return (
        f"no interleaved 1F1B plan exists for {problem.world_size} rank(s) and {len(problem.blocks)} blocks{forced}"
        f"{chunks}: it needs at least 2 positions that divide the world size, 2 (or the forced) chunks per "
        "position with positions x chunks <= blocks, and a microbatch count >= positions that is a multiple of "
        "its rounds (microbatches // positions) with every replica given a sample; allow '1f1b', cut the model "
        "into more blocks (max_partition_num, rannc plan --max-blocks) or change the positions or chunks"
    )


def interleaved_step_time(
    pieces: list[PieceCost], positions: int, microbatches: int, tails: list[float]
) -> float:
    """The interleaved cost model: P max_s W_s + (S - 1) t_max + max tail, W_s the summed t_k of position s's
    chunks (its work per microbatch) and `tails` the positions' allreduce + update. With equal t_k this is
    (P v + S - 1) t: the bubble (S - 1) t is 1 / v of 1F1B's (S - 1) v t."""
    work = [sum(p.time for p in pieces[s::positions]) for s in range(positions)]
    return microbatches * max(work) + (positions - 1) * max(p.time for p in pieces) + max(tails)


@functools.lru_cache(maxsize=16)
def position_actions(positions: int, microbatches: int, chunks: int) -> tuple[tuple[Action, ...], ...]:
    """Every position's actions of one interleaved step, built once per slice shape (the cut search's held
    profiles, `recompute_where_needed` and `interleaved_plan` all read them)."""
    return tuple(tuple(SCHEDULE.actions(q, positions, microbatches, chunks)) for q in range(positions))


@functools.lru_cache(maxsize=16)
def held_profiles(positions: int, microbatches: int, chunks: int) -> list[np.ndarray]:
    """Every position's `held_profile` of the interleaved schedule (shared by the slices of both recompute
    choices)."""
    profiles = [
        held_profile(actions, chunks) for actions in position_actions(positions, microbatches, chunks)
    ]
    for profile in profiles:
        profile.setflags(write=False)
    return profiles


class CutSearch:
    """The exact least-t_max cut of one ChunkedConfig (see the module's docstring); `run()` returns it."""

    def __init__(
        self, problem: PlanProblem, model: CostModel, config: ChunkedConfig, budget: int | None = None
    ) -> None:
        self.problem, self.model, self.config = problem, model, config
        self.budget = NODE_BUDGET if budget is None else budget  # depth-first nodes it may visit
        s, v, p, r = config.positions, config.chunks, config.microbatches, config.replicas
        self.n = len(problem.blocks)
        self.count = s * v
        self.m = replica_microbatch_size(problem.global_batch, p, r)
        self.links = chunk_links(problem, [r] * s, v)
        self.profiles = held_profiles(s, p, v)
        self.profile_stack = np.stack(self.profiles).astype(float)  # [position][moment][chunk]
        self.held = [[int(h) for h in profile.max(axis=0)] for profile in self.profiles]
        self.limit = problem.memory_limit_bytes
        self._aggregate_tables()
        self._floor_tables()
        self.exact = True  # False once a threshold's search ran out of its node budget
        # (least t_max any fitting cut can have, t_max of the cut returned): equal when exact, set by run()
        self.t_max_bounds: tuple[float, float] | None = None
        self.nodes = 0  # depth-first nodes visited so far
        self._pieces: dict[tuple[int, int, int], PieceCost] = {}
        self._times = self._time_tables()

    # ---- tables ------------------------------------------------------------------------------------------
    def piece(self, k: int, first: int, last: int) -> PieceCost:
        """Virtual stage k covering blocks first..last."""
        key = (k, first, last)
        cost = self._pieces.get(key)
        if cost is None:
            cost = self._pieces[key] = piece_cost(
                self.model, first, last, self.m, self.config.replicas, self.config.recompute, self.links[k]
            )
        return cost

    def _time_tables(self) -> dict[tuple[bool, bool], np.ndarray]:
        """[i][j] -> t of blocks i..j for each (inputs inter-node, outputs inter-node) link pair used (inf below
        the diagonal). First and last virtual stages see no transfer in or out (their rows carry zero bytes)."""
        ranges = self.model.range_table(self.m, self.config.replicas)
        fwd = ranges["fwd"]
        bwd = ranges["bwd"] + fwd if self.config.recompute else ranges["bwd"]
        tables = {}
        for in_link, out_link, _ in set(self.links):
            comm = (
                ranges["in_inter" if in_link else "in_intra"]
                + ranges["out_inter" if out_link else "out_intra"]
            )
            tables[in_link, out_link] = fwd + bwd + comm
        return tables

    def times(self, k: int) -> np.ndarray:
        link = self.links[k]
        return self._times[link[0], link[1]]

    def thresholds(self) -> np.ndarray:
        values = np.concatenate([t[np.isfinite(t)] for t in self._times.values()])
        return np.unique(values)

    def coverable(self, tau: float) -> np.ndarray:
        """[q][b]: whether blocks b.. can be the last q virtual stages with every t_k <= tau."""
        can = np.zeros((self.count + 1, self.n + 1), dtype=bool)
        can[0, self.n] = True
        for q in range(1, self.count + 1):
            ok = self.times(self.count - q) <= tau  # [b][j]
            can[q, : self.n] = (ok & can[q - 1, 1:][None, :]).any(axis=1)
        return can

    # ---- memory ------------------------------------------------------------------------------------------
    _FIELDS = (
        6  # state, buffers, workspace max, recompute workspace max, params, largest max; then a per chunk
    )

    def _added(self, vector: np.ndarray, k: int, cost: PieceCost) -> np.ndarray:
        s, c = k % self.config.positions, k // self.config.positions
        held = self.held[s][c]
        io = cost.in_bytes + cost.out_bytes
        out = vector.copy()
        out[0] += cost.state
        sent = sent_bytes(
            cost.in_bytes, cost.out_bytes, self.config.microbatches, held, self.config.recompute
        )
        out[1] += 2 * io + sent
        out[2] = max(out[2], cost.workspace)
        out[3] = max(out[3], cost.recompute_workspace)
        out[4] += cost.params
        out[5] = max(out[5], cost.largest)
        out[self._FIELDS + c] = cost.activation
        return out

    def _memory(self, s: int, vector: np.ndarray) -> float:
        """Position s's peak with the chunks in `vector` (absent ones zero): exact when all are there, a lower
        bound otherwise (every term grows with more chunks)."""
        return float(self._memories(np.array([s]), vector[None, :])[0])

    def _memories(self, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """`_memory` of position positions[i] holding rows[i], for every i at once (one arithmetic for both: the
        search compares them with the same limit)."""
        problem = self.problem
        shards = self.config.replicas if problem.zero_optimizer else 1
        peak = np.matmul(self.profile_stack[positions], rows[:, self._FIELDS :, None])[:, :, 0].max(axis=1)
        forward = problem.input_bytes + rows[:, 0] + rows[:, 1] + rows[:, 2] + rows[:, 3] + peak
        per_param, per_largest = problem.optimizer_transient
        updated = stepped_bytes(problem, rows[:, 4] / shards, rows[:, 5])
        step_end = problem.input_bytes + rows[:, 0] + updated * per_param + rows[:, 5] * per_largest
        return np.maximum(forward, step_end)

    def _aggregate_tables(self) -> None:
        """What the aggregate bound (`_over`) needs: every block's state and activation bytes, and a weight per
        (position, chunk) slot: its held count at the position's fullest moment (a position's activation peak is
        at least that row of `held_profile` times its chunks' bytes); per virtual stage k, the positions with
        chunks from k on and those slots."""
        problem, r = self.problem, self.config.replicas
        s_count, v = self.config.positions, self.config.chunks
        shards = r if problem.zero_optimizer else 1
        factor = 2 + problem.opt_param_factor / shards
        state = np.array([problem.range_param_bytes[b][b] * factor for b in range(self.n)])
        whole = np.array([problem.range_param_bytes[b][-1] * factor for b in range(self.n)])
        suffix = np.cumsum(state[::-1])[::-1]
        # the range's state is at most the blocks' summed state (shared weights): scale them down to it
        self.block_state = [
            state[b:] * (whole[b] / suffix[b] if suffix[b] > 0 else 0.0) for b in range(self.n)
        ]
        # recomputing, a chunk keeps its inputs per held microbatch: bounded below by 0 here
        acts = np.zeros(self.n) if self.config.recompute else np.array(self.model.block_values(self.m)[2])
        self.block_act = [acts[b:] for b in range(self.n)]
        self.weights = np.array([profile[int(profile.sum(axis=1).argmax())] for profile in self.profiles])
        # the least state one more block adds to a chunk starting at block b or later (extending i..j to
        # i..j+1, or i+1..j to i..j: the last virtual stage's floor is a range ending at the last block); at most
        # 0 where ranges share weights, and then the count bound in `_over` does nothing
        params = np.array(problem.range_param_bytes, dtype=float)
        grow = np.full(self.n + 1, math.inf)
        for i in range(self.n - 1, -1, -1):
            right = params[i, i + 1 :] - params[i, i : self.n - 1]
            left = params[i, i + 1 :] - params[i + 1, i + 1 :] if i + 1 < self.n else right
            least = min(float(right.min()), float(left.min())) if right.size else math.inf
            grow[i] = min(grow[i + 1], least)
        self.grown_state = grow * factor
        # the least parameter state the virtual stages of any cut hold together (the whole model's when ranges
        # share no weights; a weight two ranges share is counted by both)
        total = np.zeros(self.n + 1)  # [b]: of the last q virtual stages covering blocks b..
        total[: self.n] = math.inf
        upper = np.triu(np.ones((self.n, self.n), dtype=bool))
        ranges = np.where(upper, params, math.inf)
        for _ in range(self.count):
            total = np.append((ranges + total[None, 1:]).min(axis=1), math.inf)
        self.least_total_state = float(total[0]) * factor
        self.to_come = [
            np.array([sum(1 for j in range(k, self.count) if j % s_count == q) for q in live])
            for k, live in enumerate(self.live_positions(s_count, v))
        ]
        self.live, self.slot_index, self.slot_weight, self.lightest = [], [], [], []
        for k in range(self.count):
            live = [q for q in range(s_count) if (v - 1) * s_count + q >= k]
            slots = range(k, self.count)
            self.live.append(np.array(live))
            self.slot_index.append(np.array([live.index(j % s_count) for j in slots]))
            self.slot_weight.append(np.array([self.weights[j % s_count, j // s_count] for j in slots]))
            self.lightest.append(
                np.array(
                    [min(self.weights[q, j // s_count] for j in slots if j % s_count == q) for q in live]
                )
            )

    # the fields of a holding vector that take the largest chunk's value rather than the sum (workspace,
    # recompute workspace, largest parameter)
    _MAXED = [2, 3, 5]

    def _with_floor(self, vector: np.ndarray, floor: np.ndarray) -> np.ndarray:
        """A holding `vector` with the least its chunks to come add (`floor`): summed fields add, maxed ones
        take the larger."""
        out = vector + floor
        out[..., self._MAXED] = np.maximum(vector[..., self._MAXED], floor[..., self._MAXED])
        return out

    def live_positions(self, s_count: int, v: int) -> list[list[int]]:
        """Per virtual stage k, the positions with chunks from k on."""
        return [[q for q in range(s_count) if (v - 1) * s_count + q >= k] for k in range(self.count)]

    def _floor_tables(self) -> None:
        """floor[k][s]: the least that position s's chunks from virtual stage k on add to its holding whatever
        their ranges. Virtual stage j starts at block j or later and ends early enough for the ones after it;
        over those ranges each chunk holds at least the least state, parameters and buffers, and its position
        at least the largest of its chunks' least workspace, rebuilt microbatch and largest parameter; each
        chunk keeps at least its least activation (recomputing: its least inputs) per held microbatch. (The first
        virtual stage's ranges start at block 0, the last one's end at the last block.)"""
        problem, config = self.problem, self.config
        s_count, v, p = config.positions, config.chunks, config.microbatches
        factor = 2 + problem.opt_param_factor / (config.replicas if problem.zero_optimizer else 1)
        shape = (self.n, self.n)
        ranges = self.model.range_table(self.m, config.replicas)  # [first][last], inf below the diagonal
        io = ranges["in_bytes"] + ranges["out_bytes"]
        work = ranges["workspace_bytes"]
        activation = ranges["activation_bytes"]
        rebuilt = activation if config.recompute else np.where(np.isfinite(activation), 0.0, math.inf)
        act = ranges["in_bytes"] if config.recompute else activation
        params = np.array(problem.range_param_bytes, dtype=float)
        largest = (
            np.array(problem.range_largest_param_bytes, dtype=float)
            if problem.range_largest_param_bytes
            else np.zeros(shape)
        )
        below = np.tril(np.ones(shape, dtype=bool), -1)
        params[below] = math.inf
        largest[below] = math.inf

        def least(table: np.ndarray, k: int) -> float:
            end = self.n - self.count + k + 1
            region = table[k:end, :end]
            if k == 0:  # the first virtual stage starts at block 0, the last ends at the last block
                region = region[:1]
            if k == self.count - 1:
                region = region[:, -1:]
            finite = region[np.isfinite(region)]
            return float(finite.min()) if finite.size else 0.0

        slots = np.zeros((self.count, self._FIELDS + v))
        for k in range(self.count):
            s, c = k % s_count, k // s_count
            least_state, least_io = least(params, k), least(io, k)
            slots[k, 0] = least_state * factor
            slots[k, 1] = 2 * least_io + sent_bytes(least_io, 0.0, p, self.held[s][c])
            slots[k, 2] = least(work, k)
            slots[k, 3] = least(rebuilt, k)
            slots[k, 4] = least_state
            slots[k, 5] = least(largest, k)
            slots[k, self._FIELDS + c] = least(act, k)
        # the least workspace and rebuilt microbatch of a chunk of 2 blocks or more starting at block b or later
        # (a position taking more blocks than it has chunks holds one)
        self.longer = np.zeros((self.n + 1, 2))
        for b in range(self.n - 1, -1, -1):
            self.longer[b] = [
                min(
                    float(work[b, b + 1 :].min(initial=math.inf)),
                    self.longer[b + 1, 0] if b + 1 < self.n else math.inf,
                ),
                min(
                    float(rebuilt[b, b + 1 :].min(initial=math.inf)),
                    self.longer[b + 1, 1] if b + 1 < self.n else math.inf,
                ),
            ]
        # for `_state_short`, which builds its tables only for a slice the cheaper bounds let through
        self._slot_rows, self._range_tables = slots, RangeTables(io, work, rebuilt, act, params, largest)
        self._state_factor = factor  # a range's parameter state per parameter byte
        self.floor = np.zeros((self.count + 1, s_count, self._FIELDS + v))
        for k in range(self.count - 1, -1, -1):
            self.floor[k] = self.floor[k + 1]
            self.floor[k, k % s_count] = self._with_floor(self.floor[k, k % s_count], slots[k])

    def _size_tables(self) -> list[list[tuple[float, list[np.ndarray]]]]:
        """Per virtual stage k, for each count of blocks it can take (ascending): the least parameter state of
        its ranges of that many blocks, and per parameter state those ranges hold the least holding they add (a
        `slots` row with that state and every other field at its least over them)."""
        io, work, rebuilt, act, params, largest = self._range_tables
        slots, factor = self._slot_rows, self._state_factor
        p, s_count = self.config.microbatches, self.config.positions
        by_size: list[list[tuple[float, list[np.ndarray]]]] = []
        for k in range(self.count):
            s, c = k % s_count, k // s_count
            last_end = self.n - self.count + k  # the last block virtual stage k can end at
            sizes = []
            for z in range(1, last_end - k + 2):
                firsts = np.arange(k, last_end - z + 2)
                if k == 0:
                    firsts = firsts[:1]
                if k == self.count - 1:
                    firsts = firsts[firsts == self.n - z]
                if firsts.size == 0:
                    continue
                lasts = firsts + z - 1
                ios = io[firsts, lasts]
                rows = np.tile(slots[k], (firsts.size, 1))
                rows[:, 0] = params[firsts, lasts] * factor
                rows[:, 1] = 2 * ios + sent_bytes(ios, 0.0, p, self.held[s][c])
                rows[:, 2], rows[:, 3] = work[firsts, lasts], rebuilt[firsts, lasts]
                rows[:, 4], rows[:, 5] = params[firsts, lasts], largest[firsts, lasts]
                rows[:, self._FIELDS + c] = act[firsts, lasts]
                states, kind = np.unique(rows[:, 0], return_inverse=True)
                kinds = np.full((states.size, rows.shape[1]), math.inf)
                np.minimum.at(kinds, kind, rows)
                sizes.append((float(states[0]), list(kinds)))
            by_size.append(sizes)
        return by_size

    def _state_short(self) -> bool:
        """Whether the positions cannot hold the model's parameter state between them (then no cut fits).

        Every cut's chunks hold `least_total_state` at least together. A position's capacity is the most state
        its chunks can hold within the limit, each chunk a range it can take: over every choice, per chunk, of a
        count of blocks and a parameter state ranges of that many blocks have, the position's memory is at
        least its memory with that state and every other field at its least over those ranges
        (`_size_tables`). Past COMPOSITION_BUDGET choices for the slice's positions together the bound gives up
        (proves nothing)."""
        by_size = self._size_tables()
        total, budget = 0.0, [COMPOSITION_BUDGET]
        for q in range(self.config.positions):
            capacity = self._position_capacity(q, by_size, budget)
            if capacity is None:
                return False
            total += capacity
        return total < self.least_total_state * (1 - 1e-12)

    def _position_capacity(
        self, q: int, by_size: list[list[tuple[float, list[np.ndarray]]]], budget: list[int]
    ) -> float | None:
        """Position q's capacity in parameter state (see `_state_short`; -inf: nothing fits, None: the slice's
        `budget` of choices, shared by its positions and counted down here, ran out)."""
        slots = list(range(q, self.count, self.config.positions))
        best = -math.inf
        stack = [(0, np.zeros(self._FIELDS + self.config.chunks))]  # (chunks chosen, their least holding)
        while stack:
            depth, low = stack.pop()
            if depth == len(slots):
                best = max(best, float(low[0]))
                continue
            for least_state, kinds in by_size[slots[depth]]:
                if self.problem.input_bytes + low[0] + least_state > self.limit:
                    continue
                budget[0] -= len(kinds)
                if budget[0] < 0:
                    return None
                holdings = self._with_floor(low, np.array(kinds))
                floored = self._with_floor(holdings, self.floor[slots[depth] + 1, q])
                within = self._memories(np.full(len(kinds), q), floored) <= self.limit
                stack.extend((depth + 1, holding) for holding, fits in zip(holdings, within) if fits)
        return best

    def fits_at_all(self) -> bool:
        """Whether every position could hold even the lightest chunks (False: no cut of this slice fits)."""
        if self.limit is None:
            return True
        empty = np.zeros((self.config.positions, self._FIELDS + self.config.chunks))
        low = self.floor[0]
        return (
            all(self._memory(q, low[q]) <= self.limit for q in range(self.config.positions))
            and not self._over(0, 0, empty)
            and not self._state_short()
        )

    def _over(self, k: int, b: int, states: np.ndarray) -> bool:
        """Whether no completion of the first k virtual stages (ending before block b) fits in memory.

        For any weights lam_s >= 0 of the positions with chunks to come, sum_s lam_s memory_s <= limit sum_s
        lam_s if they all fit; and sum_s lam_s memory_s is at least what they hold now (state, buffers, weighted
        activations) plus, for every block from b on, its state and activation in the slot still to come where
        that costs least. Two choices of lam: equal, and the inverse of an average block's cost in each
        position's lightest slot (so the bound counts how many blocks each position can still take)."""
        if self.limit is None or b >= self.n:
            return False
        live = self.live[k]
        rows = states[live]
        low = self._with_floor(rows, self.floor[k, live])  # with their chunks to come at the least
        # the blocks' state and (not recomputing) activations are counted by slot below; the least buffers,
        # workspaces and (recomputing) held inputs of the chunks to come are not
        acts = low[:, self._FIELDS :] if self.config.recompute else rows[:, self._FIELDS :]
        held = (
            self.problem.input_bytes
            + rows[:, 0]
            + low[:, 1]
            + low[:, 2]
            + low[:, 3]
            + (acts * self.weights[live]).sum(axis=1)
        )
        if self._too_few(k, b, low):
            return True
        state, act = self.block_state[b], self.block_act[b]
        index, weights = self.slot_index[k], self.slot_weight[k]
        average = float(state.mean()) + self.lightest[k] * float(act.mean())
        for lam in (np.ones(len(live)), 1.0 / np.maximum(average, 1e-30)):
            slot_lam = lam[index]
            cost = np.outer(state, slot_lam) + np.outer(act, slot_lam * weights)  # [block][slot]
            if float(lam @ held) + float(cost.min(axis=1).sum()) > self.limit * float(lam.sum()):
                return True
        return False

    def _too_few(self, k: int, b: int, low: np.ndarray) -> bool:
        """Whether the positions with chunks from k on cannot take blocks b.. between them, counted in whole
        blocks: each chunk to come takes one block with its least holding (`low`, the live positions' rows with
        their floors); a position taking more has a chunk of 2 blocks or more (its workspace and rebuilt
        microbatch at least `longer`'s), and every block more adds at least `grown_state` to it, which must stay
        in the memory left to it."""
        grow = self.grown_state[b]
        if not grow > 0 or not math.isfinite(grow):
            return False
        live = self.live[k]
        if bool((self._memories(live, low) > self.limit).any()):
            return True
        longer = low.copy()
        longer[:, 2:4] = np.maximum(longer[:, 2:4], self.longer[b])
        slack = self.limit - self._memories(live, longer)
        more = np.where(slack >= 0, np.floor(np.maximum(slack, 0.0) / grow * (1 + 1e-12)), 0.0)
        return float((self.to_come[k] + more).sum()) < self.n - b

    # ---- search ------------------------------------------------------------------------------------------
    def run(self) -> list[tuple[int, int]] | None:
        """Block ranges of the virtual stages of the least-t_max cut that fits in memory (None: none fits)."""
        balanced = self._balanced_cut()
        if balanced is not None and self._cut_fits(balanced):  # the least t_max of any cut, and it fits
            least = max(self.piece(k, first, last).time for k, (first, last) in enumerate(balanced))
            self.t_max_bounds = (least, least)
            return balanced
        if not self.fits_at_all():
            return None
        values = self.thresholds()
        low, high = 0, len(values) - 1
        best = self._cut(float(values[high]))
        if best is None:
            return None
        proven = 0  # no threshold below values[proven] has a cut (proved: its search did not run out)
        while low < high:  # values[high] has a cut; find the least that does
            middle = (low + high) // 2
            found = self._cut(float(values[middle]))
            if found is None:
                low = middle + 1
                if self.nodes <= self.budget:
                    proven = low
            else:
                best, high = found, middle
        kept = max(self.piece(k, first, last).time for k, (first, last) in enumerate(best))
        self.t_max_bounds = (min(float(values[proven]), kept), kept)
        return best

    def _balanced_cut(self) -> list[tuple[int, int]] | None:
        """The cut of least t_max, memory aside (a dynamic programme over the virtual stages in pipeline order:
        the least largest t_k covering blocks 0..b-1 with k virtual stages), or None when no cut covers the
        blocks."""
        least = np.full(self.n + 1, math.inf)  # [b]: with the virtual stages so far, blocks 0..b-1 covered
        least[0] = 0.0
        starts = []
        for k in range(self.count):
            reach = np.maximum(least[: self.n, None], self.times(k))  # [first][last]
            starts.append(reach.argmin(axis=0))
            least = np.concatenate([[math.inf], reach.min(axis=0)])
        if not math.isfinite(least[self.n]):
            return None
        ranges, end = [], self.n
        for k in range(self.count - 1, -1, -1):
            first = int(starts[k][end - 1])
            ranges.append((first, end - 1))
            end = first
        return ranges[::-1]

    def _cut_fits(self, ranges: list[tuple[int, int]]) -> bool:
        """Whether every position holds its chunks of the cut `ranges` within the memory limit."""
        if self.limit is None:
            return True
        states = np.zeros((self.config.positions, self._FIELDS + self.config.chunks))
        for k, (first, last) in enumerate(ranges):
            s = k % self.config.positions
            states[s] = self._added(states[s], k, self.piece(k, first, last))
        return all(self._memory(s, row) <= self.limit for s, row in enumerate(states))

    def _cut(self, tau: float) -> list[tuple[int, int]] | None:
        """A cut with every t_k <= tau and every position in memory, or None.

        Depth-first over the virtual stages in pipeline order, pruned by memory (each position's lower bound, and
        `_over`) and by failures met before: a node (virtual stage k from block b) that failed with the
        positions holding at most what they hold now fails again; when every range of virtual stage k was over
        its own position's memory, that position's holding alone decides it (a local failure)."""
        can = self.coverable(tau)
        if not can[self.count, 0]:
            return None
        s_count, v = self.config.positions, self.config.chunks
        states = np.zeros((s_count, self._FIELDS + v))
        # (k, b) -> the holdings (one row each) with which that node failed: per position (`local`) or all
        failed: dict[tuple[int, int], np.ndarray] = {}
        local: dict[tuple[int, int], np.ndarray] = {}
        lasts: list[int] = []

        def dominated(memo: dict[tuple[int, int], np.ndarray], key: tuple[int, int], now: np.ndarray) -> bool:
            seen = memo.get(key)
            return seen is not None and bool((seen <= now.reshape(-1)).all(axis=1).any())

        def remember(memo: dict[tuple[int, int], np.ndarray], key: tuple[int, int], now: np.ndarray) -> None:
            row = now.reshape(1, -1)
            memo[key] = row if key not in memo else np.vstack([memo[key], row])

        def search(k: int, b: int, states: np.ndarray) -> bool:
            if k == self.count:
                return b == self.n
            self.nodes += 1
            if self.nodes > self.budget:
                self.exact = False
                return False
            key, s = (k, b), k % s_count
            if self.limit is not None and (
                dominated(local, key, states[s]) or dominated(failed, key, states) or self._over(k, b, states)
            ):
                return False
            remaining = self.count - k
            ok = np.flatnonzero((self.times(k)[b] <= tau) & can[remaining - 1, 1:])
            ideal = b + (self.n - b) / remaining - 1
            tried = False
            order = sorted(ok.tolist(), key=lambda j: (abs(j - ideal), j))
            vectors = [self._added(states[s], k, self.piece(k, b, j)) for j in order]
            if self.limit is not None and vectors:  # over even if its later chunks take the lightest ranges
                floored = self._with_floor(np.array(vectors), self.floor[k + 1, s])
                within = self._memories(np.full(len(vectors), s), floored) <= self.limit
            else:
                within = np.ones(len(vectors), dtype=bool)
            for j, vector, fits in zip(order, vectors, within.tolist()):
                if not fits:
                    continue
                tried = True
                after = states.copy()
                after[s] = vector
                if search(k + 1, j + 1, after):
                    lasts.append(j)
                    return True
                if self.nodes > self.budget:
                    return False
            if self.limit is not None:
                if not tried:  # every range was over position s's memory: only its holding matters
                    remember(local, key, states[s])
                else:  # positions without chunks to come cannot change what follows: compare the others
                    live = states.copy()
                    live[[q for q in range(s_count) if (v - 1) * s_count + q < k]] = 0.0
                    remember(failed, key, live)
            return False

        if not search(0, 0, states):
            return None
        lasts.reverse()
        firsts = [0] + [j + 1 for j in lasts[:-1]]
        return list(zip(firsts, lasts))


def interleaved_plan(
    problem: PlanProblem,
    model: CostModel,
    config: ChunkedConfig,
    ranges: list[tuple[int, int]],
    shard: ShardLevel = ShardLevel.NONE,
    recomputed: Sequence[bool] | None = None,
) -> Plan:
    """The Plan of `config` cut at `ranges` (the virtual stages' block ranges, pipeline order), its positions
    sharded at `shard` (none or ZeRO-1; `problem` and `model` price it: `priced_for`), with the cost model's
    figures; predicted_step_time is the interleaved cost model's (`interleaved_step_time`). `recomputed`: per
    virtual stage whether it recomputes (default: config.recompute for all; `recompute_where_needed`)."""
    s_count, v, p, r = config.positions, config.chunks, config.microbatches, config.replicas
    m = replica_microbatch_size(problem.global_batch, p, r)
    links = chunk_links(problem, [r] * s_count, v)
    if recomputed is None:
        recomputed = [config.recompute] * len(ranges)
    pieces = [
        piece_cost(model, first, last, m, r, recomputed[k], links[k])
        for k, (first, last) in enumerate(ranges)
    ]
    actions = position_actions(s_count, p, v)
    memories = [position_memory(problem, pieces[q::s_count], actions[q], p, r).peak for q in range(s_count)]
    tails = []
    for q in range(s_count):
        params = sum(piece.params for piece in pieces[q::s_count])
        tails.append(
            piece_allreduce(problem, params, r, links[q][2]) + params * update_seconds_per_byte(problem, r)
        )
    stages = []
    for k, piece in enumerate(pieces):
        q, c = k % s_count, k // s_count
        held = int(held_profile(actions[q], v)[:, c].max())
        stages.append(
            StagePlan(
                first_block=piece.first,
                last_block=piece.last,
                replicas=r,
                ranks=list(range(q * r, (q + 1) * r)),
                microbatch_size=m,
                fwd_time=piece.fwd,
                bwd_time=piece.bwd,
                comm_time=2 * (piece.comm_in + piece.comm_out),
                allreduce_time=piece_allreduce(problem, piece.params, r, links[k][2]),
                param_bytes=piece.params,
                activation_bytes=piece.activation * held + piece.recompute_workspace,
                memory_bytes=memories[q],
                recompute=piece.recompute,
                shard=shard if r > 1 else ShardLevel.NONE,
            )
        )
    return Plan(
        stages=stages,
        microbatches=p,
        schedule=SCHEDULE,
        predicted_step_time=interleaved_step_time(pieces, s_count, p, tails),
        global_batch=problem.global_batch,
        world_size=problem.world_size,
        chunks=v,
    )


def recompute_where_needed(
    problem: PlanProblem, model: CostModel, config: ChunkedConfig, ranges: list[tuple[int, int]]
) -> list[bool]:
    """Per virtual stage of a recomputing slice cut at `ranges` (which fits with every chunk recomputing), whether
    it still recomputes: each position stops recomputing its chunks, the one whose forward takes longest first
    (the seconds it saves per microbatch; of equal ones, the one holding fewer microbatches), as long as the
    position stays within the memory limit, in passes until none more can stop (a position's memory is not
    monotone in its chunks' choices: the rebuilt microbatch is held once, for the largest recomputing chunk).
    A chunk's held microbatches differ (the last chunks of the last positions hold few: interleaved 1F1B runs
    their backward soon after their forward), so some chunks can keep their activations where the slice's others
    cannot; the runtime recomputes per chunk. No chunk's time grows, so neither does any step."""
    count = len(ranges)
    if not config.recompute:
        return [False] * count
    s_count, v, p, r = config.positions, config.chunks, config.microbatches, config.replicas
    m = replica_microbatch_size(problem.global_batch, p, r)
    links = chunk_links(problem, [r] * s_count, v)
    recomputed = [True] * count
    limit = problem.memory_limit_bytes
    for q in range(s_count):
        own = list(range(q, count, s_count))  # the position's virtual stages, chunk order
        pieces = {k: piece_cost(model, *ranges[k], m, r, True, links[k]) for k in own}
        kept = {k: piece_cost(model, *ranges[k], m, r, False, links[k]) for k in own}
        actions = position_actions(s_count, p, v)[q]
        held = chunk_peaks(actions, v)
        order = sorted(own, key=lambda k: (-pieces[k].fwd, held[k // s_count], k))
        changed = True
        while changed:
            changed = False
            for k in (k for k in order if recomputed[k]):
                trial = [kept[j] if j == k or not recomputed[j] else pieces[j] for j in own]
                if limit is None or position_memory(problem, trial, actions, p, r).peak <= limit:
                    recomputed[k], changed = False, True
    return recomputed


def work_lower_bound(problem: PlanProblem, model: CostModel, config: ChunkedConfig) -> float:
    """No step of `config` is shorter: every position computes P microbatches through its chunks, which hold
    1 / S of the model's forward and backward work on average (recomputing: one more forward)."""
    m = replica_microbatch_size(problem.global_batch, config.microbatches, config.replicas)
    whole = model.row(0, m, config.replicas)[-1]
    work = whole.fwd * (2 if config.recompute else 1) + whole.bwd
    return config.microbatches * work / config.positions


def state_lower_bound(problem: PlanProblem, config: ChunkedConfig) -> float:
    """No position of `config` holds less: its share of the model's parameter state (positions hold it all)."""
    shards = config.replicas if problem.zero_optimizer else 1
    params = problem.range_param_bytes[0][-1]
    return params * (2 + problem.opt_param_factor / shards) / config.positions + problem.input_bytes


def priced_for(problem: PlanProblem, model: CostModel, shard: ShardLevel) -> tuple[PlanProblem, CostModel]:
    """The problem and cost model that price interleaved positions sharded at `shard`: ZeRO-1 is the cost
    model's problem-wide ZeRO-1 (`zero_optimizer`: optimizer state and update over a position's replicas)."""
    priced = position_problem(problem, shard)
    return (problem, model) if priced is problem else (priced, CostModel(priced))


def best_interleaved(problem: PlanProblem, model: CostModel, cutoff: float = math.inf) -> InterleavedSearch:
    """The interleaved plan of least simulated step time under `cutoff` (seconds; the other schedules' best), if
    any. Its predicted_step_time is the simulated one, analytic_step_time the interleaved cost model's.

    Slices are taken in the order of `work_lower_bound` and the rest skipped once the bound is above the best
    step found or the searches have visited SEARCH_NODE_BUDGET nodes; each is cut at the first of
    `interleaved_shard_levels` with which a cut fits (a level at which the slice's share of the parameter state
    alone is over the memory limit is skipped)."""
    priced = {level: priced_for(problem, model, level) for level in interleaved_shard_levels(problem)}
    ranked = sorted(
        (
            (work_lower_bound(problem, model, config), index, config)
            for index, config in enumerate(interleaved_configs(problem))
        ),
    )
    best: Plan | None = None
    best_timeline: Timeline | None = None
    best_step = cutoff
    searched = inexact = 0
    nodes_left = SEARCH_NODE_BUDGET
    for index, (bound, _, config) in enumerate(ranked):
        if bound >= best_step:
            break
        if nodes_left <= 0:
            skipped = sum(1 for later, _, _ in ranked[index:] if later < best_step)
            logger.info(
                "interleaved 1F1B: the cut searches visited SEARCH_NODE_BUDGET (%d) nodes; %d slice(s) whose "
                "bound is under the best step (%.4g s) not searched",
                SEARCH_NODE_BUDGET,
                skipped,
                best_step,
            )
            return InterleavedSearch(best, searched, inexact, best_timeline, skipped)
        cut = _least_sharded_cut(priced, config, nodes_left)
        nodes_left -= cut.nodes
        searched += 1
        inexact += not cut.exact
        if cut.ranges is None:
            continue
        level, ranges = cut.level, cut.ranges
        recomputed = recompute_where_needed(*priced[level], config, ranges)
        plan = interleaved_plan(*priced[level], config, ranges, level, recomputed)
        timeline = simulate_plan(problem, plan)
        if timeline.step_time < best_step * (1 - TIE):
            best_step, best_timeline = timeline.step_time, timeline
            best = dataclasses.replace(
                plan, predicted_step_time=best_step, analytic_step_time=plan.predicted_step_time
            )
    return InterleavedSearch(best, searched, inexact, best_timeline)


def interleaved_memory_message(
    problem: PlanProblem, search: InterleavedSearch, one_f_one_b_bytes: float
) -> str:
    """Why no interleaved plan was found when interleaved 1F1B is the only schedule allowed and a 1F1B plan of
    the same blocks would fit (`one_f_one_b_bytes`, its least memory, is within the limit): the user's choice of
    schedule is what fails, not the memory alone."""
    limit = problem.memory_limit_bytes or math.inf
    ran_out = (
        f"; {search.inexact} of them ran out of the cut search's node budget and counted as not fitting"
        if search.inexact
        else ""
    )
    if search.skipped:
        ran_out += f"; {search.skipped} more not searched once the searches' node budget was spent"
    return (
        f"no interleaved 1F1B plan fits in {limit / 2**30:.3f} GiB per device for {problem.world_size} rank(s) and "
        f"global batch {problem.global_batch} ({search.searched} choice(s) of positions x chunks x microbatches "
        f"searched{ran_out}), although a 1F1B plan of the same blocks fits from {one_f_one_b_bytes / 2**30:.3f} "
        "GiB: a position holds its chunks' parameter state whole (ZeRO-1 at most) and more microbatches in flight "
        "than a 1F1B stage. Allow 1F1B too (RaNNCModule: schedule='auto'; rannc plan: --schedules "
        "1f1b,interleaved_1f1b), give each device more memory, allow recompute, or use more ranks"
    )


class ShardedCut(NamedTuple):
    """A slice's cut at the least sharding with which one fits (`ranges` None: none fits at any level)."""

    level: ShardLevel
    ranges: list[tuple[int, int]] | None
    exact: bool  # every cut search it ran was exact (none ran out of nodes)
    nodes: int  # depth-first nodes its cut searches visited


def _least_sharded_cut(
    priced: dict[ShardLevel, tuple[PlanProblem, CostModel]], config: ChunkedConfig, nodes_left: int
) -> ShardedCut:
    """The first level of `priced` (least sharding first) at which a cut of `config` fits, and that cut; its
    cut searches visit at most NODE_BUDGET nodes each and `nodes_left` together."""
    exact, nodes = True, 0
    for level, (problem, model) in priced.items():
        if level != ShardLevel.NONE and config.replicas == 1:
            continue  # nothing to shard over
        limit = problem.memory_limit_bytes
        if limit is not None and state_lower_bound(problem, config) > limit:
            continue
        search = CutSearch(problem, model, config, min(NODE_BUDGET, nodes_left - nodes))
        ranges = search.run()
        exact, nodes = exact and search.exact, nodes + search.nodes
        if not search.exact and ranges is None:
            logger.info(
                "interleaved slice %s (%s): the cut search ran out of nodes before finding a cut that fits; "
                "counted as not fitting",
                config,
                level,
            )
        elif not search.exact:
            least, kept = search.t_max_bounds
            logger.info(
                "interleaved slice %s (%s): the cut search ran out of nodes; keeping the cut that fits of t_max "
                "%.4g s (the least is at least %.4g s)",
                config,
                level,
                kept,
                least,
            )
        if ranges is not None:
            return ShardedCut(level, ranges, exact, nodes)
    return ShardedCut(ShardLevel.NONE, None, exact, nodes)
