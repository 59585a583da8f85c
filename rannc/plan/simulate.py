"""Discrete-event simulation of one training step: per-stage event timeline, bubbles and peak memory."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from ..schedule import Action, ActionKind, Schedule
from .cost import (
    CostModel,
    allreduce_time,
    p2p_time,
    sent_bytes,
    stage_links,
    step_time,
)
from .types import Plan, PlanProblem

__all__ = [
    "Event",
    "EventKind",
    "StageTiming",
    "Timeline",
    "analytic_step_time",
    "bubble_bound",
    "peak_inflight",
    "simulate",
    "simulate_plan",
    "stage_timings",
]


@dataclasses.dataclass(frozen=True)
class StageTiming:
    """Per-microbatch costs of one stage (seconds, bytes per rank).

    comm_in: seconds to receive one microbatch's inputs from earlier stages; the gradients of those inputs go
    back in the same time. comm_out: seconds to move one microbatch's outputs to later stages, and so to receive
    their gradients back. The first stage's comm_in and the last stage's comm_out are ignored (no neighbour).
    static_bytes: everything that does not scale with the microbatches in flight (parameters, gradients,
    optimizer state, boundary buffers, the largest block workspace); memory_parts optionally splits it by name.
    """

    fwd: float
    bwd: float
    comm_in: float = 0.0
    comm_out: float = 0.0
    allreduce: float = 0.0  # seconds of the stage's gradient allreduce, once per step
    activation_bytes: float = 0.0  # saved for backward by one microbatch
    static_bytes: float = 0.0
    memory_parts: dict[str, float] | None = (
        None  # e.g. parameters/gradients/optimizer/buffers; sums to static
    )
    update: float = 0.0  # seconds of the optimizer step on the stage's parameters, after the allreduce
    # The allreduce overlapped with the last backward (the runtime's overlap_grad_sync): the seconds of it that
    # cannot start before that backward ends (the gradients of the stage's first block, final only then).
    # None: the whole allreduce runs after the last backward.
    allreduce_exposed: float | None = None
    # Fraction of the rest that hides behind the backward (the device's allreduce_overlap).
    overlap: float = 1.0

    @property
    def tail(self) -> float:
        """Seconds after the stage's last backward in the cost model: gradient allreduce, then optimizer update."""
        return self.allreduce + self.update

    def allreduce_span(self, backward_start: float, backward_end: float) -> tuple[float, float]:
        """(start, end) of the allreduce after a last backward over [backward_start, backward_end]: overlapped,
        it starts with that backward but its exposed part runs only once the backward ends."""
        if self.allreduce_exposed is None:
            return backward_end, backward_end + self.allreduce
        hidden = self.overlap * min(
            self.allreduce - min(self.allreduce_exposed, self.allreduce), backward_end - backward_start
        )
        end = backward_end + self.allreduce - hidden
        return end - self.allreduce, end

    @property
    def exposed_tail(self) -> float:
        """Seconds after the last backward at least (allreduce, overlapped or not, then update)."""
        return self.allreduce_span(-self.bwd, 0.0)[1] + self.update

    @property
    def analytic_time(self) -> float:
        """t_s of the cost model: compute plus inputs and outputs moved forward and backward."""
        return self.fwd + self.bwd + 2 * (self.comm_in + self.comm_out)


class EventKind(enum.StrEnum):
    """What a stage does during one interval of the simulated step."""

    FORWARD = "F"
    BACKWARD = "B"
    RECV_ACT = "recv_act"  # blocking receive of a forward's inputs
    RECV_GRAD = "recv_grad"  # blocking receive of a backward's output gradients
    ALLREDUCE = "allreduce"  # the stage's gradient allreduce among its replicas
    ALLREDUCE_SHARED = "allreduce_shared"  # a parameter several stages hold (tied weights)
    UPDATE = "update"  # the optimizer step


_COMPUTE = (EventKind.FORWARD, EventKind.BACKWARD)
_RECEIVE = {ActionKind.FORWARD: EventKind.RECV_ACT, ActionKind.BACKWARD: EventKind.RECV_GRAD}


@dataclasses.dataclass(frozen=True)
class Event:
    """One interval of a stage's step; named like "F3", "recv_grad3" or "allreduce"."""

    kind: EventKind
    microbatch: int  # -1 for the allreduces and the update
    start: float
    end: float

    @property
    def name(self) -> str:
        return str(self.kind) if self.microbatch < 0 else f"{self.kind}{self.microbatch}"

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The simulated step: events per stage (in time order), step time, in-flight microbatches and memory."""

    schedule: Schedule
    microbatches: int
    stages: list[StageTiming]
    events: list[list[Event]]
    step_time: float  # end of the last event of any stage, allreduces included
    peak_inflight: list[int]  # per stage: most microbatches whose activations are held at once
    peak_memory: list[float]  # per stage: static_bytes + activation_bytes * peak_inflight
    rendezvous: bool

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def busy_time(self, stage: int) -> float:
        """Seconds stage `stage` spends computing forwards and backwards (receives and allreduce excluded)."""
        return sum(e.duration for e in self.events[stage] if e.kind in _COMPUTE)

    @property
    def bubble_fraction(self) -> float:
        """1 - (sum over stages of F and B compute seconds) / (num_stages * step_time).

        The fraction of the stages' step time not spent on forward/backward compute: pipeline fill and drain,
        waiting for neighbours, blocking receives and the gradient allreduce all count as bubble. 0 when the
        step takes no time.
        """
        if self.step_time <= 0:
            return 0.0
        busy = sum(self.busy_time(s) for s in range(self.num_stages))
        return 1.0 - busy / (self.num_stages * self.step_time)

    def stage_end(self, stage: int) -> float:
        """When the stage's last event (its allreduce, if any) ends."""
        return max((e.end for e in self.events[stage]), default=0.0)


def peak_inflight(actions: list[Action]) -> int:
    """Most microbatches forwarded but not yet backwarded at once while running `actions` in order."""
    held = peak = 0
    for action in actions:
        held += 1 if action.kind == ActionKind.FORWARD else -1
        peak = max(peak, held)
    return peak


def _check(stage_times: list[StageTiming], microbatches: int) -> None:
    if not stage_times:
        raise ValueError("need at least one stage")
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    for s, t in enumerate(stage_times):
        values = (
            t.fwd,
            t.bwd,
            t.comm_in,
            t.comm_out,
            t.allreduce,
            t.update,
            t.activation_bytes,
            t.static_bytes,
        )
        if min(values) < 0:
            raise ValueError(f"stage {s} has a negative time or size: {t}")


def _receive_time(stage_times: list[StageTiming], stage: int, kind: ActionKind) -> float:
    """Seconds to receive what F (activations from stage-1) or B (gradients from stage+1) needs at `stage`."""
    if kind == ActionKind.FORWARD:
        return stage_times[stage].comm_in if stage > 0 else 0.0
    return stage_times[stage].comm_out if stage < len(stage_times) - 1 else 0.0


def simulate(
    stage_times: list[StageTiming],
    microbatches: int,
    schedule: Schedule | str,
    *,
    rendezvous: bool = True,
    shared: Sequence[tuple[float, tuple[int, ...]]] = (),
) -> Timeline:
    """Simulate one step: every stage runs `schedule.actions(s, S, P)` in order, one action at a time.

    F(i) at stage s needs F(i) at s-1 and a transfer of comm_in[s]; B(i) at s needs B(i) at s+1 (and its
    own F(i)) and a transfer of comm_out[s]. With `rendezvous` (the runtime: sends are asynchronous, the
    consumer posts a blocking receive when it starts the action and the data moves once both sides are
    there) the transfer starts at max(stage free, producer done) and the consumer waits for it, so compute
    starts at max(free, producer done) + transfer. Without it the data travels on its own as soon as it is
    produced: compute starts at max(free, producer done + transfer). After its last action each stage runs
    its gradient allreduce; then each `shared` (seconds, stages) allreduce (a parameter held by several
    stages) starts when all its stages are there; then each stage's optimizer update. Compute durations are
    fwd and bwd.
    """
    _check(stage_times, microbatches)
    schedule = Schedule(schedule)  # ValueError for an unknown name
    num_stages = len(stage_times)
    lists = [schedule.actions(s, num_stages, microbatches) for s in range(num_stages)]
    events = _run_actions(stage_times, lists, rendezvous)
    if events is None:
        raise RuntimeError(f"schedule {schedule!r} deadlocks with {num_stages} stages, {microbatches} mb")
    ends = _end_step(stage_times, events, shared)
    peaks = [peak_inflight(actions) for actions in lists]
    return Timeline(
        schedule=schedule,
        microbatches=microbatches,
        stages=list(stage_times),
        events=events,
        step_time=max(ends),
        peak_inflight=peaks,
        peak_memory=[t.static_bytes + t.activation_bytes * p for t, p in zip(stage_times, peaks)],
        rendezvous=rendezvous,
    )


def _run_actions(
    stage_times: list[StageTiming], lists: list[list[Action]], rendezvous: bool
) -> list[list[Event]] | None:
    """The forward, backward and receive events of every stage running its action list (None: deadlock).

    Sweeps the stages over and over, each running its next actions while what they need is done."""
    num_stages = len(stage_times)
    done: dict[tuple[ActionKind, int, int], float] = {}  # (kind, microbatch, stage) -> compute end
    free = [0.0] * num_stages
    cursor = [0] * num_stages
    events: list[list[Event]] = [[] for _ in range(num_stages)]
    remaining = sum(len(actions) for actions in lists)
    while remaining:
        progressed = False
        for s in range(num_stages):
            while cursor[s] < len(lists[s]):
                kind, i = lists[s][cursor[s]][:2]
                if kind == ActionKind.FORWARD:
                    producer = (ActionKind.FORWARD, i, s - 1) if s > 0 else None
                    own = None
                else:
                    producer = (ActionKind.BACKWARD, i, s + 1) if s < num_stages - 1 else None
                    own = (ActionKind.FORWARD, i, s)
                if (producer is not None and producer not in done) or (own is not None and own not in done):
                    break
                produced = done[producer] if producer is not None else 0.0
                floor = max(free[s], done[own]) if own is not None else free[s]
                transfer = _receive_time(stage_times, s, kind) if producer is not None else 0.0
                if rendezvous:
                    posted = max(floor, produced)
                    start = posted + transfer
                    if transfer > 0:
                        events[s].append(Event(_RECEIVE[kind], i, posted, start))
                else:
                    start = max(floor, produced + transfer)
                timing = stage_times[s]
                end = start + (timing.fwd if kind == ActionKind.FORWARD else timing.bwd)
                events[s].append(Event(EventKind(kind), i, start, end))
                done[kind, i, s] = end
                free[s] = end
                cursor[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            return None
    return events


def _end_step(
    stage_times: list[StageTiming], events: list[list[Event]], shared: Sequence[tuple[float, tuple[int, ...]]]
) -> list[float]:
    """Add each stage's gradient allreduce, the shared parameters' allreduces and the optimizer updates after
    the stages' last actions; returns when each stage's step ends."""
    free = [max((e.end for e in stage_events), default=0.0) for stage_events in events]
    ends = list(free)
    for s, timing in enumerate(stage_times):
        if timing.allreduce > 0:
            last = next((e for e in reversed(events[s]) if e.kind == EventKind.BACKWARD), None)
            start, ends[s] = timing.allreduce_span(free[s] if last is None else last.start, free[s])
            events[s].append(Event(EventKind.ALLREDUCE, -1, start, ends[s]))
    for seconds, holders in shared:
        start = max(ends[s] for s in holders)
        for s in holders:
            events[s].append(Event(EventKind.ALLREDUCE_SHARED, -1, start, start + seconds))
            ends[s] = start + seconds
    for s, timing in enumerate(stage_times):
        if timing.update > 0:
            events[s].append(Event(EventKind.UPDATE, -1, ends[s], ends[s] + timing.update))
    return [end + timing.update for end, timing in zip(ends, stage_times)]


def bubble_bound(stage_times: list[StageTiming], microbatches: int, *, rendezvous: bool = True) -> float:
    """A lower bound on `simulate(...).step_time` for any schedule (each stage runs every F and B once).

    For each stage s: its first forward cannot compute before microbatch 0 went through the stages before it
    (head_s = sum_{k<s} fwd_k + sum_{0<k<=s} comm_in_k); from then on it computes P forwards and P backwards
    (plus, with rendezvous, waits for P-1 more input receives and P gradient receives); after its last backward
    that gradient still has to reach every earlier stage k and k run its allreduce
    (tail_s = max(AR_s, max_{k<s} sum_{k<=j<s} (comm_out_j + bwd_j) + AR_k)). The bound is
    max_s head_s + work_s + tail_s; with balanced stages and no communication it equals the analytic
    sum t_s + (P-1) max t_s + AR = (P + S - 1)(f + b) + AR.
    """
    _check(stage_times, microbatches)
    p = microbatches
    best = 0.0
    head = 0.0
    for s, t in enumerate(stage_times):
        recv_in = _receive_time(stage_times, s, ActionKind.FORWARD)
        recv_grad = _receive_time(stage_times, s, ActionKind.BACKWARD)
        head += recv_in
        work = p * (t.fwd + t.bwd)
        if rendezvous:
            work += (p - 1) * recv_in + p * recv_grad
        tail, drain = t.exposed_tail, 0.0
        for k in range(s - 1, -1, -1):
            drain += _receive_time(stage_times, k, ActionKind.BACKWARD) + stage_times[k].bwd
            tail = max(tail, drain + stage_times[k].exposed_tail)
        best = max(best, head + work + tail)
        head += t.fwd
    return best


def analytic_step_time(stage_times: list[StageTiming], microbatches: int) -> float:
    """The cost model's T = sum t_s + (P-1) max t_s + max AR_s with t_s = fwd + bwd + 2 (comm_in + comm_out)."""
    return step_time([t.analytic_time for t in stage_times], [t.tail for t in stage_times], microbatches)


def stage_timings(problem: PlanProblem, plan: Plan) -> list[StageTiming]:
    """StageTimings of every stage of `plan`, with the cost model's arithmetic for each stage.

    Costs come from `rannc.plan.cost` exactly as `evaluate` computes them for this candidate (the stage's
    recompute flag, the placement's intra-/inter-node links), without its feasibility checks. comm_in and
    comm_out are the one-way p2p times of the stage's input and output bytes (the cost model charges
    2 (comm_in + comm_out) per microbatch). static_bytes is split into parameters, gradients, optimizer
    state (divided over the replicas with ZeRO-1), buffers (boundary send/receive buffers) and, for a
    recomputed stage, the one microbatch of activations rebuilt for its backward; what scales with the
    microbatches in flight is activation_bytes (the stashed boundary inputs when recomputing).
    """
    num_stages = len(plan.stages)
    model = CostModel(problem)
    links = stage_links(problem, [stage.replicas for stage in plan.stages])
    timings = []
    for s, stage in enumerate(plan.stages):
        recompute = bool(getattr(stage, "recompute", False))
        inflight = plan.schedule.inflight(plan.microbatches, num_stages - s)
        cost = model.stage(
            stage.first_block,
            stage.last_block,
            stage.replicas,
            plan.microbatches,
            inflight,
            recompute,
            links[s],
        )
        shards = stage.replicas if problem.zero_optimizer else 1
        parts = {
            "parameters": cost.param_bytes,
            "gradients": cost.param_bytes,
            "optimizer": cost.param_bytes * problem.opt_param_factor / shards,
            "buffers": 2 * (cost.in_bytes + cost.out_bytes)
            + sent_bytes(cost.in_bytes, cost.out_bytes, plan.microbatches, cost.inflight),
        }
        if problem.input_bytes:
            parts["inputs"] = problem.input_bytes
        if cost.workspace_bytes:
            parts["workspace"] = cost.workspace_bytes
        if recompute:
            parts["recompute workspace"] = cost.activation_bytes
        timings.append(
            StageTiming(
                fwd=cost.fwd,
                bwd=cost.bwd,
                comm_in=p2p_time(problem, cost.in_bytes, links[s][0]),
                comm_out=p2p_time(problem, cost.out_bytes, links[s][1]),
                allreduce=cost.allreduce - cost.update,
                update=cost.update,
                allreduce_exposed=allreduce_time(
                    problem,
                    problem.range_param_bytes[stage.first_block][stage.first_block],
                    stage.replicas,
                    links[s][2],
                )
                if problem.overlap_grad_sync
                else None,
                overlap=problem.allreduce_overlap,
                activation_bytes=cost.in_bytes if recompute else cost.activation_bytes,
                static_bytes=sum(parts.values()),
                memory_parts=parts,
            )
        )
    return timings


def shared_allreduces(problem: PlanProblem, plan: Plan) -> list[tuple[float, tuple[int, ...]]]:
    """(seconds, stages) of the gradient allreduce of every parameter the plan puts on several stages: over
    every rank of those stages, beyond what each stage's own allreduce among its replicas already moved."""
    stage_of_block = {
        b: s for s, st in enumerate(plan.stages) for b in range(st.first_block, st.last_block + 1)
    }
    found = []
    for nbytes, blocks in problem.shared_params:
        holders = tuple(sorted({stage_of_block[b] for b in blocks}))
        if len(holders) < 2:
            continue
        ranks = [rank for s in holders for rank in plan.stages[s].ranks]
        g = problem.gpus_per_node
        inter = g is not None and len({rank // g for rank in ranks}) > 1
        seconds = allreduce_time(problem, nbytes, len(ranks), inter)
        seconds -= min(allreduce_time(problem, nbytes, plan.stages[s].replicas) for s in holders)
        found.append((max(seconds, 0.0), holders))
    return found


def simulate_plan(problem: PlanProblem, plan: Plan, *, rendezvous: bool = True) -> Timeline:
    """Simulate one step of `plan` with the stage costs the planner used for it (and the allreduce of
    parameters shared between its stages, which the planner's own cost leaves out)."""
    return simulate(
        stage_timings(problem, plan),
        plan.microbatches,
        plan.schedule,
        rendezvous=rendezvous,
        shared=shared_allreduces(problem, plan),
    )
