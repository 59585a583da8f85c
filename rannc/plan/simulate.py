"""Discrete-event simulation of one training step: per-stage event timeline, bubbles and peak memory."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..schedule import Action, ActionKind, Schedule, held_microbatches, virtual_stage
from .chunked import (
    chunk_links,
    chunk_peaks,
    peak_activation_bytes,
    piece_cost,
    position_memory,
    position_problem,
)
from .cost import (
    CostModel,
    allreduce_time,
    held_counts,
    p2p_time,
    replica_microbatch_size,
    sent_bytes,
    split_path,
    split_tail,
    stage_links,
    step_time,
    update_seconds_per_byte,
)
from .sharding import gather_passes, sharded_state
from .types import Plan, PlanProblem, ShardLevel

__all__ = [
    "CoreSharing",
    "core_sharing",
    "Event",
    "EventKind",
    "StageTiming",
    "Timeline",
    "analytic_step_time",
    "bubble_bound",
    "peak_activation_bytes",
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
    bwd: float  # the whole backward; with a split backward, I takes bwd - bwd_weight and W bwd_weight
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
    bwd_weight: float = 0.0  # seconds of the backward spent on parameter gradients (a W pass)
    # Bytes one microbatch keeps from its I pass to its W pass beyond activation_bytes (the deferred gradients;
    # with recompute also the activations I rebuilt).
    deferred_bytes: float = 0.0

    def duration(self, kind: ActionKind) -> float:
        """Seconds of compute of one microbatch's `kind` pass through this stage."""
        if kind == ActionKind.FORWARD:
            return self.fwd
        if kind == ActionKind.BACKWARD_INPUT:
            return self.bwd - self.bwd_weight
        if kind == ActionKind.BACKWARD_WEIGHT:
            return self.bwd_weight
        return self.bwd

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
        return max(end - self.allreduce, backward_start), end  # (max: not an ulp before it, by rounding)

    @property
    def exposed_tail(self) -> float:
        """Seconds after the last backward at least (allreduce, overlapped or not, then update)."""
        return self.allreduce_span(-self.bwd, 0.0)[1] + self.update

    @property
    def analytic_time(self) -> float:
        """t_s of the cost model: compute plus inputs and outputs moved forward and backward."""
        return self.fwd + self.bwd + 2 * (self.comm_in + self.comm_out)


@dataclasses.dataclass(frozen=True)
class CoreSharing:
    """Ranks that share the cores of their host (CPUs): a rank computes at full speed while at most `cores` ranks
    of its host compute, and at cores / k of it while k > cores do (processor sharing). Stage costs were measured
    with `measured_ranks` ranks of a host computing at once, so a measured duration d is d / max(1, measured_ranks
    / cores) of work at full speed. `hosts[s]`: position s's ranks by host, as (host, ranks there)."""

    cores: int
    measured_ranks: int
    hosts: tuple[tuple[tuple[int, int], ...], ...]

    def __post_init__(self) -> None:
        if self.cores < 1 or self.measured_ranks < 1:
            raise ValueError(
                f"cores and measured_ranks must be >= 1, got {self.cores}, {self.measured_ranks}"
            )

    @property
    def measured_slowdown(self) -> float:
        """How much slower than at full speed the measured durations ran."""
        return max(1.0, self.measured_ranks / self.cores)

    def load(self, positions: Iterable[int]) -> Counter[int]:
        """The ranks of `positions` on each host."""
        load: Counter[int] = Counter()
        for s in positions:
            load.update(dict(self.hosts[s]))
        return load

    def rates(self, running: Sequence[int]) -> dict[int, float]:
        """Speed (1 = full) of each position in `running` while exactly those compute: a position's replicas run
        in step, as fast as its most crowded host lets them."""
        load = self.load(running)
        return {s: min(min(1.0, self.cores / load[host]) for host, _ in self.hosts[s]) for s in running}

    @property
    def matters(self) -> bool:
        """Whether any rate differs from the measured one: measured under contention, or a host with more ranks
        than cores."""
        crowded = max(self.load(range(len(self.hosts))).values(), default=0)
        return self.measured_ranks > self.cores or crowded > self.cores


class EventKind(enum.StrEnum):
    """What a stage does during one interval of the simulated step."""

    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"
    RECV_ACT = "recv_act"  # blocking receive of a forward's inputs
    RECV_GRAD = "recv_grad"  # blocking receive of a backward's output gradients
    ALLREDUCE = "allreduce"  # the stage's gradient allreduce among its replicas
    ALLREDUCE_SHARED = "allreduce_shared"  # a parameter several stages hold (tied weights)
    UPDATE = "update"  # the optimizer step


_COMPUTE = (EventKind.FORWARD, EventKind.BACKWARD, EventKind.BACKWARD_INPUT, EventKind.BACKWARD_WEIGHT)


@dataclasses.dataclass(frozen=True)
class Event:
    """One interval of a stage's step; named like "F3", "recv_grad3" or "allreduce"."""

    kind: EventKind
    microbatch: int  # -1 for the allreduces and the update
    start: float
    end: float
    chunk: int = 0  # the position's model chunk the event belongs to

    @property
    def name(self) -> str:
        if self.microbatch < 0:
            return str(self.kind)
        return f"{self.kind}{self.microbatch}" + (f"c{self.chunk}" if self.chunk else "")

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The simulated step: events per position (in time order), step time, in-flight microbatches and memory.

    With one chunk per position a position is a stage; with `chunks` > 1, `stages` lists the virtual stages in
    pipeline order and position s runs virtual stages s, s + num_stages, ... (`rannc.schedule.virtual_stage`)."""

    schedule: Schedule
    microbatches: int
    stages: list[StageTiming]  # per virtual stage
    events: list[list[Event]]  # per position
    step_time: float  # end of the last event of any stage, allreduces included
    peak_inflight: list[int]  # per position: most (microbatch, chunk) activations held at once
    peak_memory: list[
        float
    ]  # per position: static bytes of its chunks + the activations it holds at its peak
    rendezvous: bool
    chunks: int = 1

    @property
    def num_stages(self) -> int:
        """Pipeline positions (stages when there is one chunk per position)."""
        return len(self.events)

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
    """Most microbatches forwarded but not yet released (B, or W after a split backward) at once while running
    `actions` in order."""
    return held_microbatches(actions)


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
    """Seconds to receive what F (activations from stage-1) or B/I (gradients from stage+1) needs at `stage`."""
    if kind == ActionKind.FORWARD:
        return stage_times[stage].comm_in if stage > 0 else 0.0
    return stage_times[stage].comm_out if stage < len(stage_times) - 1 else 0.0


def simulate(
    stage_times: list[StageTiming],
    microbatches: int,
    schedule: Schedule | str,
    *,
    chunks: int = 1,
    rendezvous: bool = True,
    shared: Sequence[tuple[float, tuple[int, ...]]] = (),
    post_ahead: bool = False,
    sharing: CoreSharing | None = None,
) -> Timeline:
    """Simulate one step: every position runs `schedule.actions(s, S, P, chunks)` in order, one at a time.

    `stage_times` lists the virtual stages in pipeline order (S = len(stage_times) / chunks positions). F(i) at
    virtual stage k needs F(i) at k-1 and a transfer of comm_in[k]; B(i) or I(i) at k needs the input gradients
    of i at k+1 (its B or I) and its own F(i), and a transfer of comm_out[k]; W(i) needs its own I(i). With
    `rendezvous` (the runtime: sends are asynchronous, the consumer posts a blocking receive when it starts the
    action and the data moves once both sides are there) the transfer starts at max(position free, producer
    done) and the consumer waits for it, so compute starts at max(free, producer done) + transfer; with
    `post_ahead` too (what the runtime does: a position posts the receive of its next F or B/I as it reaches the
    one before, `Pipeline._post_receives`) the transfer starts at max(posted, producer done) and overlaps the
    action between, so compute starts at max(free, that + transfer). Without `rendezvous`
    the data travels on its own as soon as it is produced: compute starts at max(free, producer done +
    transfer). After its last action each position runs its gradient allreduce (its chunks' together); then
    each `shared` (seconds, virtual stages) allreduce (a parameter held by several stages) starts when all its
    positions are there; then each position's optimizer update. Compute durations are
    `StageTiming.duration`; with `sharing` (ranks on CPUs sharing their hosts' cores) each runs at the speed the
    ranks computing at the same time leave it (`CoreSharing`).
    """
    _check(stage_times, microbatches)
    schedule = Schedule(schedule)  # ValueError for an unknown name
    if chunks < 1 or len(stage_times) % chunks:
        raise ValueError(f"{len(stage_times)} virtual stages do not make {chunks} chunks per position")
    positions = len(stage_times) // chunks
    lists = [schedule.actions(s, positions, microbatches, chunks) for s in range(positions)]
    if sharing is not None and sharing.matters:
        events = _run_actions_sharing(stage_times, lists, rendezvous, post_ahead, sharing)
    else:
        events = _run_actions(stage_times, lists, rendezvous, post_ahead)
    if events is None:
        raise RuntimeError(
            f"schedule {schedule!r} deadlocks with {positions} positions, {chunks} chunks, {microbatches} mb"
        )
    per_position = [_position_timing(stage_times, s, positions, chunks) for s in range(positions)]
    shared_positions = [
        (seconds, tuple(sorted({k % positions for k in holders}))) for seconds, holders in shared
    ]
    ends = _end_step(per_position, events, shared_positions)
    peaks = [peak_inflight(actions) for actions in lists]
    memory = []
    for s, (timing, actions) in enumerate(zip(per_position, lists)):
        own = [stage_times[virtual_stage(s, c, positions)] for c in range(chunks)]
        memory.append(
            timing.static_bytes
            + peak_activation_bytes(
                actions, [t.activation_bytes for t in own], [t.deferred_bytes for t in own]
            )
        )
    return Timeline(
        schedule=schedule,
        microbatches=microbatches,
        stages=list(stage_times),
        events=events,
        step_time=max(ends),
        peak_inflight=peaks,
        peak_memory=memory,
        rendezvous=rendezvous,
        chunks=chunks,
    )


def _position_timing(
    stage_times: list[StageTiming], position: int, positions: int, chunks: int
) -> StageTiming:
    """What one position's chunks add up to after their compute: allreduce, update and static memory (its last
    backward is its first chunk's, so the overlapped allreduce's exposed part is that chunk's)."""
    own = [stage_times[virtual_stage(position, c, positions)] for c in range(chunks)]
    if chunks == 1:
        return own[0]
    exposed = own[0].allreduce_exposed
    parts: dict[str, float] | None = None
    if all(t.memory_parts for t in own):
        parts = {}
        for timing in own:
            for name, value in (timing.memory_parts or {}).items():
                parts[name] = parts.get(name, 0.0) + value
    return dataclasses.replace(
        own[0],
        allreduce=sum(t.allreduce for t in own),
        update=sum(t.update for t in own),
        allreduce_exposed=exposed if exposed is None else exposed + sum(t.allreduce for t in own[1:]),
        static_bytes=sum(t.static_bytes for t in own),
        memory_parts=parts,
    )


_RECEIVE = {
    ActionKind.FORWARD: EventKind.RECV_ACT,
    ActionKind.BACKWARD: EventKind.RECV_GRAD,
    ActionKind.BACKWARD_INPUT: EventKind.RECV_GRAD,
}


def _needs(kind: ActionKind, microbatch: int, stage: int, last: int) -> tuple[tuple | None, tuple | None]:
    """(the other stage's pass this action receives from, or None; this stage's own earlier pass, or None),
    as keys of the simulator's `done` table: (kind, microbatch, virtual stage), "G" for input gradients."""
    if kind == ActionKind.FORWARD:
        return ((ActionKind.FORWARD, microbatch, stage - 1) if stage > 0 else None), None
    if kind == ActionKind.BACKWARD_WEIGHT:
        return None, (ActionKind.BACKWARD_INPUT, microbatch, stage)
    producer = ("G", microbatch, stage + 1) if stage < last else None
    return producer, (ActionKind.FORWARD, microbatch, stage)


class _Start(NamedTuple):
    """When a position's next action can start (seconds) and the receive wait before it, if any."""

    start: float
    waited: float  # from when it waits for the transfer (== start: no wait)


class _Runner:
    """The state of every position running its action list: what is done, when each position is free, and the
    receives it posted ahead. `ready` prices an action's start exactly as the runtime orders it (see `simulate`)."""

    def __init__(
        self, stage_times: list[StageTiming], lists: list[list[Action]], rendezvous: bool, post_ahead: bool
    ) -> None:
        self.stage_times, self.lists = stage_times, lists
        self.rendezvous, self.post_ahead = rendezvous, post_ahead
        self.positions, self.last = len(lists), len(stage_times) - 1
        self.done: dict[tuple, float] = {}  # (kind or "G", microbatch, virtual stage) -> compute end
        self.free = [0.0] * self.positions
        # post_ahead: when the position posted the receive of its next F or B/I (the runtime posts it as it
        # reaches the F or B/I before it, `Pipeline._post_receives`; None: it posts it on reaching it, as for the
        # first)
        self.posted_next: list[float | None] = [None] * self.positions
        self.cursor = [0] * self.positions
        self.events: list[list[Event]] = [[] for _ in range(self.positions)]
        self.remaining = sum(len(actions) for actions in lists)

    def next_action(self, s: int) -> tuple[Action, int] | None:
        """Position s's next action and its virtual stage (None: it has run them all)."""
        if self.cursor[s] >= len(self.lists[s]):
            return None
        action = self.lists[s][self.cursor[s]]
        return action, virtual_stage(s, action.chunk, self.positions)

    def ready(self, s: int, action: Action, k: int) -> _Start | None:
        """When position s can start `action` (at virtual stage k), None while what it needs is not done."""
        kind, i = action.kind, action.microbatch
        producer, own = _needs(kind, i, k, self.last)
        done = self.done
        if (producer is not None and producer not in done) or (own is not None and own not in done):
            return None
        produced = done[producer] if producer is not None else 0.0
        floor = max(self.free[s], done[own]) if own is not None else self.free[s]
        transfer = _receive_time(self.stage_times, k, kind) if producer is not None else 0.0
        if not self.rendezvous:
            start = max(floor, produced + transfer)
            return _Start(start, start)
        posted = self.posted_next[s]  # (always None without post_ahead: posted on reaching it)
        moving = max(floor if posted is None else posted, produced)  # the data moves from then on
        start = max(floor, moving + transfer)
        waited = max(floor, moving)
        return _Start(start, waited if transfer > 0 else start)

    def begin(self, s: int, action: Action, at: _Start) -> None:
        """Position s starts `action` at `at` (its receive wait recorded)."""
        if at.start > at.waited:  # the part of the transfer this position waits for
            self.events[s].append(
                Event(_RECEIVE[action.kind], action.microbatch, at.waited, at.start, action.chunk)
            )
        if (
            self.rendezvous
            and self.post_ahead
            and (action.kind == ActionKind.FORWARD or action.kind.sends_grad)
        ):
            self.posted_next[s] = self.free[s]  # reaching this action, it posts the next one's receive

    def finish(self, s: int, action: Action, k: int, start: float, end: float) -> None:
        """Position s ran `action` over [start, end]."""
        kind, i = action.kind, action.microbatch
        self.events[s].append(Event(EventKind(kind), i, start, end, action.chunk))
        self.done[kind, i, k] = end
        if kind.sends_grad:
            self.done["G", i, k] = end
        self.free[s] = end
        self.cursor[s] += 1
        self.remaining -= 1


def _run_actions(
    stage_times: list[StageTiming], lists: list[list[Action]], rendezvous: bool, post_ahead: bool = False
) -> list[list[Event]] | None:
    """The compute and receive events of every position running its action list (None: deadlock).

    Sweeps the positions over and over, each running its next actions while what they need is done."""
    runner = _Runner(stage_times, lists, rendezvous, post_ahead)
    while runner.remaining:
        progressed = False
        for s in range(runner.positions):
            while (following := runner.next_action(s)) is not None:
                action, k = following
                at = runner.ready(s, action, k)
                if at is None:
                    break
                runner.begin(s, action, at)
                runner.finish(s, action, k, at.start, at.start + stage_times[k].duration(action.kind))
                progressed = True
        if not progressed:
            return None
    return runner.events


def _run_actions_sharing(
    stage_times: list[StageTiming],
    lists: list[list[Action]],
    rendezvous: bool,
    post_ahead: bool,
    sharing: CoreSharing,
) -> list[list[Event]] | None:
    """`_run_actions` on ranks that share their hosts' cores (`CoreSharing`): time advances from event to event
    (an action ends, or a position's next one can start), and between two events every position computing runs
    at the rate its host's load gives it. An action's work is its measured duration at full speed."""
    runner = _Runner(stage_times, lists, rendezvous, post_ahead)
    # position -> (action, virtual stage, start, seconds of work at full speed left)
    running: dict[int, tuple[Action, int, float, float]] = {}
    now = 0.0
    while runner.remaining:
        wake = math.inf  # the next moment an idle position's next action can start
        for s in range(runner.positions):
            following = runner.next_action(s)
            if s in running or following is None:
                continue
            action, k = following
            at = runner.ready(s, action, k)
            if at is None:
                continue
            if _reached(at.start, now):
                runner.begin(s, action, at)
                work = stage_times[k].duration(action.kind) / sharing.measured_slowdown
                running[s] = (action, k, at.start, work)
            else:
                wake = min(wake, at.start)
        if not running:
            if math.isinf(wake):
                return None  # nothing runs and nothing can start: a deadlock
            now = wake
            continue
        rates = sharing.rates(list(running))
        ends = {s: now + left / rates[s] for s, (_, _, _, left) in running.items()}
        moment = min(min(ends.values()), wake)
        for s, (action, k, start, left) in list(running.items()):
            if _reached(ends[s], moment):
                del running[s]
                runner.finish(s, action, k, start, moment)
            else:
                running[s] = (action, k, start, left - (moment - now) * rates[s])
        now = moment
    return runner.events


# Moments this close (relative, and absolute seconds) count as one in `_run_actions_sharing` (rounding).
_SAME_MOMENT = 1e-12


def _reached(moment: float, now: float) -> bool:
    """Whether `moment` has come at `now` (up to rounding)."""
    return moment <= now * (1 + _SAME_MOMENT) + _SAME_MOMENT


def _end_step(
    stage_times: list[StageTiming], events: list[list[Event]], shared: Sequence[tuple[float, tuple[int, ...]]]
) -> list[float]:
    """Add each position's gradient allreduce, the shared parameters' allreduces and the optimizer updates after
    the positions' last actions; returns when each position's step ends."""
    free = [max((e.end for e in stage_events), default=0.0) for stage_events in events]
    ends = list(free)
    for s, timing in enumerate(stage_times):
        if timing.allreduce > 0:
            last = next((e for e in reversed(events[s]) if e.kind in _GRADIENT_PASSES), None)
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


_GRADIENT_PASSES = (EventKind.BACKWARD, EventKind.BACKWARD_WEIGHT)


def bubble_bound(
    stage_times: list[StageTiming],
    microbatches: int,
    *,
    rendezvous: bool = True,
    split: bool = False,
    post_ahead: bool = False,
) -> float:
    """A lower bound on `simulate(...).step_time` (a device per rank: not under `CoreSharing`, whose ranks compute
    faster than measured while others wait) for any one-chunk schedule with whole backwards (each stage runs
    every F and B once), or with `split` backwards (a W pass can end a stage after its gradients left, so the
    drain through earlier stages below is not counted then).

    For each stage s: its first forward cannot compute before microbatch 0 went through the stages before it
    (head_s = sum_{k<s} fwd_k + sum_{0<k<=s} comm_in_k); from then on it computes P forwards and P backwards
    (plus, with rendezvous and receives not posted ahead, waits for P-1 more input receives and P gradient
    receives; posted ahead, a transfer can overlap the action before it); after its last backward
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
        if rendezvous and not post_ahead:
            work += (p - 1) * recv_in + p * recv_grad
        tail, drain = t.exposed_tail, 0.0
        for k in range(s - 1, -1, -1) if not split else ():
            drain += _receive_time(stage_times, k, ActionKind.BACKWARD) + stage_times[k].bwd
            tail = max(tail, drain + stage_times[k].exposed_tail)
        best = max(best, head + work + tail)
        head += t.fwd
    return best


def analytic_step_time(stage_times: list[StageTiming], microbatches: int, *, split: bool = False) -> float:
    """The cost model's T = sum t_s + (P-1) max t_s + max AR_s with t_s = fwd + bwd + 2 (comm_in + comm_out);
    with `split` backwards (zero bubble) sum max(t_s - 2 W_s, 0) + (P-1) max t_s + max (AR_s + 2 W_s)."""
    times = [t.analytic_time for t in stage_times]
    if not split:
        return step_time(times, [t.tail for t in stage_times], microbatches)
    paths = [split_path(t.analytic_time, t.bwd_weight) for t in stage_times]
    return step_time(times, [split_tail(t.tail, t.bwd_weight) for t in stage_times], microbatches, paths)


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
    if plan.chunks > 1:
        return chunked_stage_timings(problem, plan)
    num_stages = len(plan.stages)
    model = CostModel(problem)
    links = stage_links(problem, [stage.replicas for stage in plan.stages])
    timings = []
    for s, stage in enumerate(plan.stages):
        recompute = bool(getattr(stage, "recompute", False))
        inflight, pending = held_counts(plan.schedule, plan.microbatches, num_stages, s)
        cost = model.stage(
            stage.first_block,
            stage.last_block,
            stage.replicas,
            plan.microbatches,
            inflight,
            recompute,
            links[s],
            stage.shard,
            pending=pending,
        )
        state = sharded_state(
            problem, stage.first_block, stage.last_block, stage.replicas, cost.shard, recompute, links[s][2]
        )
        parts = {
            "parameters": state.params,
            "gradients": state.grads,
            "optimizer": state.optimizer,
            "buffers": 2 * (cost.in_bytes + cost.out_bytes)
            + sent_bytes(cost.in_bytes, cost.out_bytes, plan.microbatches, cost.inflight, recompute),
        }
        if problem.input_bytes:
            parts["inputs"] = problem.input_bytes
        if cost.workspace_bytes:
            parts["workspace"] = cost.workspace_bytes
        if recompute and not pending:  # (split backwards: counted in deferred_bytes, per pending microbatch)
            parts["recompute workspace"] = cost.activation_bytes
        # ZeRO-3 gathers the stage's parameters in every forward and backward (again in a recomputed forward) and
        # reduces their gradients in backward, one pass each of `state.gather_seconds`, before the compute that
        # needs them (runtime/sharding.py)
        passes = gather_passes(recompute)
        gathers = state.gather_seconds
        timings.append(
            StageTiming(
                fwd=cost.fwd + gathers / passes,
                bwd=cost.bwd + gathers * (passes - 1) / passes,
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
                bwd_weight=cost.bwd_weight,
                deferred_bytes=cost.deferred_bytes
                + (cost.activation_bytes if recompute and pending else 0.0),
            )
        )
    return timings


def chunked_stage_timings(problem: PlanProblem, plan: Plan) -> list[StageTiming]:
    """StageTimings of the virtual stages of a chunked `plan` (`rannc.plan.chunked`'s pricing).

    What a position holds or does once is put on its chunk 0 (the simulator adds a position's chunks up): its
    gradient allreduce (one, over its chunks' parameters together, as the runtime reduces them), the step's user
    inputs, the largest workspace of its chunks and, recomputing, the largest rebuilt microbatch; the rest is per
    chunk (parameter state, receive buffers and held sends)."""
    positions, chunks, p = plan.positions, plan.chunks, plan.microbatches
    if any(stage.shard == ShardLevel.ZERO_1 for stage in plan.stages):
        problem = position_problem(problem, ShardLevel.ZERO_1)
    model = CostModel(problem)
    replicas = [stage.replicas for stage in plan.stages[:positions]]
    links = chunk_links(problem, replicas, chunks)
    pieces = []
    for k, stage in enumerate(plan.stages):
        m = replica_microbatch_size(problem.global_batch, p, stage.replicas)
        pieces.append(
            piece_cost(
                model, stage.first_block, stage.last_block, m, stage.replicas, stage.recompute, links[k]
            )
        )
    timings: list[StageTiming | None] = [None] * len(pieces)
    for s in range(positions):
        own = list(range(s, len(pieces), positions))  # the position's virtual stages, chunk order
        r = replicas[s]
        actions = plan.schedule.actions(s, positions, p, chunks)
        memory = position_memory(problem, [pieces[k] for k in own], actions, p, r)
        held = chunk_peaks(actions, chunks)
        params = sum(pieces[k].params for k in own)
        inter = links[s][2]
        first = plan.stages[s]
        for c, k in enumerate(own):
            piece = pieces[k]
            io = piece.in_bytes + piece.out_bytes
            parts = {
                "parameters": piece.params,
                "gradients": piece.params,
                "optimizer": piece.params * problem.opt_param_factor / (r if problem.zero_optimizer else 1),
                "buffers": 2 * io + sent_bytes(piece.in_bytes, piece.out_bytes, p, held[c], piece.recompute),
            }
            if c == 0:
                once = ("inputs", "workspace", "recompute workspace")
                parts.update({name: value for name, value in memory.parts.items() if name in once})
            timings[k] = StageTiming(
                fwd=piece.fwd,
                bwd=piece.bwd,
                comm_in=piece.comm_in,
                comm_out=piece.comm_out,
                allreduce=allreduce_time(problem, params, r, inter) if c == 0 else 0.0,
                update=piece.params * update_seconds_per_byte(problem, r),
                allreduce_exposed=(
                    allreduce_time(
                        problem, problem.range_param_bytes[first.first_block][first.first_block], r, inter
                    )
                    if problem.overlap_grad_sync and c == 0
                    else None
                ),
                overlap=problem.allreduce_overlap,
                activation_bytes=piece.activation,
                static_bytes=sum(parts.values()),
                memory_parts=parts,
            )
    return [t for t in timings if t is not None]


def shared_allreduces(problem: PlanProblem, plan: Plan) -> list[tuple[float, tuple[int, ...]]]:
    """(seconds, stages) of the gradient allreduce of every parameter the plan puts on several stages (of several
    positions, when chunked): over every rank of those stages, beyond what each stage's own allreduce among its replicas already moved."""
    stage_of_block = {
        b: s for s, st in enumerate(plan.stages) for b in range(st.first_block, st.last_block + 1)
    }
    found = []
    for nbytes, blocks in problem.shared_params:
        holders = tuple(sorted({stage_of_block[b] for b in blocks}))
        if len({s % plan.positions for s in holders}) < 2:  # one position's chunks: its own allreduce
            continue
        ranks = sorted({rank for s in holders for rank in plan.stages[s].ranks})
        g = problem.gpus_per_node
        inter = g is not None and len({rank // g for rank in ranks}) > 1
        seconds = allreduce_time(problem, nbytes, len(ranks), inter)
        seconds -= min(allreduce_time(problem, nbytes, plan.stages[s].replicas) for s in holders)
        found.append((max(seconds, 0.0), holders))
    return found


def simulate_plan(
    problem: PlanProblem, plan: Plan, *, rendezvous: bool = True, post_ahead: bool = True
) -> Timeline:
    """Simulate one step of `plan` with the stage costs the planner used for it (and the allreduce of
    parameters shared between its stages, which the planner's own cost leaves out), its receives posted one
    action ahead as the runtime posts them (`simulate`'s `post_ahead`)."""
    return simulate(
        stage_timings(problem, plan),
        plan.microbatches,
        plan.schedule,
        chunks=plan.chunks,
        rendezvous=rendezvous,
        shared=shared_allreduces(problem, plan),
        post_ahead=post_ahead,
        sharing=core_sharing(problem, plan),
    )


def core_sharing(problem: PlanProblem, plan: Plan) -> CoreSharing | None:
    """How the positions of `plan` share their hosts' cores (None: a device per rank): node n holds ranks
    n * gpus_per_node .. (n + 1) * gpus_per_node - 1 (every rank one node without gpus_per_node)."""
    if problem.host_cores is None:
        return None
    per_node = problem.gpus_per_node or problem.world_size
    hosts = tuple(
        tuple(sorted(Counter(rank // per_node for rank in stage.ranks).items()))
        for stage in plan.stages[: plan.positions]
    )
    return CoreSharing(problem.host_cores, problem.measured_ranks, hosts)
