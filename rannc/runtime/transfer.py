"""Point-to-point movement of row ranges of boundary values (activations forward, gradients backward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..capture.inputs import concrete_shape
from ..plan.cost import SEND_WINDOW
from ..schedule import Action, ActionKind
from .failures import guarded, wait_all
from .layout import SampleLayout
from .routes import Route
from .trace import current_tracer


def _tag(route: Route, microbatch: int, num_routes: int, backward: bool) -> int:
    return ((microbatch * num_routes + route.index) * 2 + int(backward)) % (2**31 - 1)


# (tag, first global row, receiving stage) of a piece handed over on one rank
_LocalKey = tuple[int, int, int]


class _Send(NamedTuple):
    """Sends started together, whose buffers stay referenced until released."""

    works: list[Any]
    ops: list[dist.P2POp]
    kind: str  # "act" | "grad"
    microbatch: int
    needs: list[tuple[int, int]]  # (peer, index of the action that consumes the send in the peer's list)
    stage: int  # the (virtual) stage that sent them
    windowed: bool  # to the neighbouring stage: counted in the send window


class Progress:
    """How far each position's ranks have provably got in their action lists, from the messages received.

    A rank runs its list in order and waits for an action's inputs before computing it, so a message it sent
    from action X means that it has received everything its actions up to X consumed. `lists[p]` is position
    p's actions in the order they run in this call (the forwards, then the backwards, when the backwards run
    later); a forward is known by ("F", microbatch, chunk) and the backward pass that sends input gradients (B
    or I) by ("G", microbatch, chunk)."""

    def __init__(self, lists: list[list[Action]], positions: int) -> None:
        self.positions = positions
        self.index: list[dict[tuple[str, int, int], int]] = []
        for actions in lists:
            found: dict[tuple[str, int, int], int] = {}
            for k, action in enumerate(actions):
                if action.kind == ActionKind.FORWARD:
                    found[("F", action.microbatch, action.chunk)] = k
                elif action.kind.sends_grad:
                    found[("G", action.microbatch, action.chunk)] = k
            self.index.append(found)
        self.done: dict[int, int] = {}  # rank -> index of its last action known done

    def at(self, pass_: str, microbatch: int, stage: int) -> tuple[int, int]:
        """(position, index in its list) of the pass ("F" or "G") of `microbatch` through (virtual) `stage`;
        index -1 when the position does not run it in this call (e.g. no backwards in inference)."""
        position, chunk = stage % self.positions, stage // self.positions
        return position, self.index[position].get((pass_, microbatch, chunk), -1)

    def heard(self, rank: int, pass_: str, microbatch: int, stage: int) -> None:
        """`rank` sent what its pass through `stage` of `microbatch` produced."""
        _, index = self.at(pass_, microbatch, stage)
        self.done[rank] = max(self.done.get(rank, -1), index)

    def has(self, rank: int, index: int) -> bool:
        """Whether `rank` has provably finished the action at `index` of its list."""
        return index >= 0 and self.done.get(rank, -1) >= index


class Transfer:
    """Sends and receives the pieces of each route; pieces are the overlaps of replicas' row ranges.

    Stages are the plan's (virtual) stages. A piece whose sender and receiver are this rank (two chunks of one
    position, interleaved 1F1B) is handed over in memory instead of being sent."""

    def __init__(
        self,
        layout: SampleLayout,
        stage_ranks: list[list[int]],
        num_routes: int,
        symbol: Any,
        device: torch.device,
        sizes: dict[Any, int] | None = None,
        rank: int = -1,
        progress: Progress | None = None,
    ) -> None:
        self.layout = layout
        self.stage_ranks = stage_ranks
        self.num_routes = num_routes
        self.symbol = symbol
        self.sizes = sizes or {}  # this call's sequence lengths (symbols other than the batch)
        self.device = device
        self.rank = rank
        # Which other ranks have provably received what (None: sends are kept until wait_sends).
        self.progress = progress
        # Sends in flight; their buffers stay referenced until they complete (release_completed), the progress
        # shows that every peer has them, a newer send needs the room (at most SEND_WINDOW (microbatch, stage)
        # pairs of each kind are held) or wait_sends at the step's end.
        self.pending: list[_Send] = []
        # Receives posted ahead of need: ("act" | "grad", microbatch, stage) -> (works, buffers, describe, heard)
        self.posted: dict[tuple[str, int, int], Any] = {}
        # Pieces handed over on this rank: (tag, first global row, receiving stage) -> tensor (a value two chunks of
        # this rank read, or whose gradients two chunks send back, is one piece per receiving stage)
        self.local: dict[_LocalKey, torch.Tensor] = {}

    def _empty(self, route: Route, rows: int) -> torch.Tensor:
        shape = concrete_shape(route.shape, self.symbol, rows, self.sizes)
        return torch.empty(shape, dtype=route.dtype, device=self.device)

    def post_activations(self, routes: list[Route], stage: int, replica: int, microbatch: int) -> None:
        """Post the receives of this replica's rows of every route's value for `microbatch` now (all at once, so
        a sender serves them together); `recv_activations` waits for them. Posting ahead of need lets the data
        arrive while this rank still computes."""
        key = ("act", microbatch, stage)
        if key in self.posted or not routes:
            return
        ops: list[dist.P2POp] = []
        parts: list[tuple[Route, list[torch.Tensor | _LocalKey]]] = []
        heard: list[tuple[int, str, int, int]] = []  # (peer, pass, microbatch, stage) the data proves done
        for route in routes:
            pieces = [p for p in self.layout.pieces(route.producer, stage, microbatch) if p[1] == replica]
            tag = _tag(route, microbatch, self.num_routes, False)
            buffers: list[torch.Tensor | _LocalKey] = []
            for jp, _, (a, b) in pieces:
                peer = self.stage_ranks[route.producer][jp]
                if peer == self.rank:
                    buffers.append((tag, a, stage))  # handed over by this rank's own send_activation
                    continue
                shape = route.packed_shape(concrete_shape(route.shape, self.symbol, b - a, self.sizes))
                buf = torch.empty(shape, dtype=route.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
                heard.append((peer, "F", microbatch, route.producer))
                buffers.append(buf)
            parts.append((route, buffers))
        producers = sorted({op.peer for op in ops})

        def describe() -> str:
            names = ", ".join(r.value for r in routes)
            return f"receiving {names} for microbatch {microbatch} from rank(s) {producers}"

        self.posted[key] = (_post(ops, describe), parts, describe, heard)

    def recv_activations(
        self, routes: list[Route], stage: int, replica: int, microbatch: int
    ) -> list[torch.Tensor]:
        """This replica's rows of every route's value for `microbatch` (posting the receives unless done)."""
        if not routes:
            return []
        self.post_activations(routes, stage, replica, microbatch)
        works, parts, describe, heard = self.posted.pop(("act", microbatch, stage))
        _wait(works, f"recv_act{microbatch}", describe)
        self._heard(heard)
        lo, hi = self.layout.rows(stage, microbatch, replica)
        results = []
        while parts:  # popped: a received buffer that unpacking copied is freed at once
            route, buffers = parts.pop(0)
            pieces = [self.local.pop(b) if isinstance(b, tuple) else b for b in buffers]
            del buffers
            packed = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=route.packed_batch_dim)
            del pieces
            result = route.unpack(packed)  # the producer's memory layout: exported views depend on strides
            del packed
            assert result.shape[route.batch_dim] == hi - lo
            results.append(result)
        return results

    def _consumer_pieces(
        self, route: Route, replica: int, microbatch: int
    ) -> list[tuple[int, int, int, int]]:
        """(consumer rank, first row, end row, consumer stage) of every piece of this producer replica's rows of
        `route`."""
        return [
            (self.stage_ranks[consumer][jc], a, b, consumer)
            for consumer in route.consumers
            for jp, jc, (a, b) in self.layout.pieces(route.producer, consumer, microbatch)
            if jp == replica
        ]

    def send_activation(self, route: Route, value: torch.Tensor, replica: int, microbatch: int) -> None:
        lo, _ = self.layout.rows(route.producer, microbatch, replica)
        tag = _tag(route, microbatch, self.num_routes, False)
        # Pieces for the next stage count in the send window; those skipping stages do not (see `_make_room`).
        ops: dict[bool, list[dist.P2POp]] = {True: [], False: []}
        needs: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        for peer, a, b, consumer in self._consumer_pieces(route, replica, microbatch):
            piece = route.pack(value.detach().narrow(route.batch_dim, a - lo, b - a))
            if peer == self.rank:
                self.local[tag, a, consumer] = piece.clone()  # its own tensor, as a received one would be
                continue
            adjacent = consumer == route.producer + 1
            ops[adjacent].append(dist.P2POp(dist.isend, piece, peer, tag=tag))
            needs[adjacent].append((peer, self._consumer_index("F", microbatch, consumer)))
        for adjacent in (True, False):
            self._start(ops[adjacent], "act", microbatch, needs[adjacent], route.producer, adjacent)

    def send_grad(self, route: Route, grad: torch.Tensor, stage: int, replica: int, microbatch: int) -> None:
        lo, _ = self.layout.rows(stage, microbatch, replica)
        tag = _tag(route, microbatch, self.num_routes, True)
        ops, needs = [], []
        for jp, jc, (a, b) in self.layout.pieces(route.producer, stage, microbatch):
            if jc == replica:
                piece = grad.narrow(route.batch_dim, a - lo, b - a).contiguous()
                peer = self.stage_ranks[route.producer][jp]
                if peer == self.rank:
                    self.local[tag, a, stage] = piece.clone()
                    continue
                ops.append(dist.P2POp(dist.isend, piece, peer, tag=tag))
                needs.append((peer, self._consumer_index("G", microbatch, route.producer)))
        self._start(ops, "grad", microbatch, needs, stage, windowed=route.producer == stage - 1)

    def _consumer_index(self, pass_: str, microbatch: int, stage: int) -> int:
        """Index of the action consuming a send in its receiver's list (-1: unknown, kept until wait_sends)."""
        return self.progress.at(pass_, microbatch, stage)[1] if self.progress is not None else -1

    def post_grads(self, routes: list[Route], replica: int, microbatch: int, stage: int) -> None:
        """Post the receives of the gradients every consumer sends back for this replica's rows of each route's
        value for `microbatch` (all at once; `stage` produced the routes); `recv_grads` waits for them and
        sums."""
        key = ("grad", microbatch, stage)
        if key in self.posted or not routes:
            return
        ops: list[dist.P2POp] = []
        parts: list[tuple[Route, list[tuple[torch.Tensor | _LocalKey, int]]]] = []
        heard: list[tuple[int, str, int, int]] = []
        for route in routes:
            lo, _ = self.layout.rows(route.producer, microbatch, replica)
            tag = _tag(route, microbatch, self.num_routes, True)
            received: list[tuple[torch.Tensor | _LocalKey, int]] = []
            for peer, a, b, consumer in self._consumer_pieces(route, replica, microbatch):
                if peer == self.rank:
                    received.append(((tag, a, consumer), a - lo))
                    continue
                buf = self._empty(route, b - a)
                ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
                heard.append((peer, "G", microbatch, consumer))
                received.append((buf, a - lo))
            parts.append((route, received))

        def describe() -> str:
            names = ", ".join(r.value for r in routes)
            consumers = sorted({c for r in routes for c in r.consumers})
            return f"receiving the gradients of {names} for microbatch {microbatch} from stage(s) {consumers}"

        self.posted[key] = (_post(ops, describe), parts, describe, heard)

    def recv_grads(
        self, routes: list[Route], replica: int, microbatch: int, stage: int
    ) -> list[torch.Tensor]:
        """For each route: the sum of the gradients every consumer sends back for this replica's rows of the
        value (posting the receives unless done)."""
        if not routes:
            return []
        self.post_grads(routes, replica, microbatch, stage)
        works, parts, describe, heard = self.posted.pop(("grad", microbatch, stage))
        _wait(works, f"recv_grad{microbatch}", describe)
        self._heard(heard)
        totals = []
        for route, received in parts:
            lo, hi = self.layout.rows(route.producer, microbatch, replica)
            total = torch.zeros(
                concrete_shape(route.shape, self.symbol, hi - lo, self.sizes),
                dtype=route.dtype,
                device=self.device,
            )
            for buf, offset in received:
                piece = self.local.pop(buf) if isinstance(buf, tuple) else buf
                total.narrow(route.batch_dim, offset, piece.shape[route.batch_dim]).add_(piece)
            totals.append(total)
        return totals

    def _heard(self, heard: list[tuple[int, str, int, int]]) -> None:
        """Received data proves how far its senders got: release the sends they have consumed."""
        if self.progress is None or not heard:
            return
        for peer, pass_, microbatch, stage in heard:
            self.progress.heard(peer, pass_, microbatch, stage)
        progress = self.progress
        self._wait_for([s for s in self.pending if all(progress.has(peer, index) for peer, index in s.needs)])

    def _start(
        self,
        ops: list[dist.P2POp],
        kind: str,
        microbatch: int,
        needs: list[tuple[int, int]],
        stage: int,
        windowed: bool = True,
    ) -> None:
        if ops:
            self.release_completed()
            if windowed:
                self._make_room(kind, microbatch, stage)
            with guarded(lambda: _sending(ops)):
                works = dist.batch_isend_irecv(ops)
            self.pending.append(_Send(works, ops, kind, microbatch, needs, stage, windowed))

    def _make_room(self, kind: str, microbatch: int, stage: int) -> None:
        """Before sending `kind` for a new (microbatch, stage), wait for the oldest sends of that kind until those
        of fewer than SEND_WINDOW (microbatch, stage) pairs are held, so that what a rank holds in sends is bounded
        whatever the number of microbatches (the planner charges SEND_WINDOW microbatches: plan.cost.sent_bytes).
        The receivers post their receives one action ahead, so in the pipelined schedules the wait is for a
        receive already posted (tests/runtime/test_send_release.py checks the protocol for every schedule).

        Only sends to the neighbouring (virtual) stage count (`_Send.windowed`): a skip connection's receiver takes
        it at a later action, possibly after it needs what this rank is about to send, so waiting for it here
        could deadlock (a stage 0 output read by stages 1 and 3 of two positions, interleaved). Skip sends are
        released by the receivers' progress or at the step's end."""
        held = sorted(
            {(s.microbatch, s.stage) for s in self.pending if s.kind == kind and s.windowed}
            - {(microbatch, stage)}
        )
        if len(held) < SEND_WINDOW:
            return
        oldest = set(held[: len(held) - SEND_WINDOW + 1])
        with current_tracer().span(f"wait_send_{kind}"):
            self._wait_for(
                [
                    s
                    for s in self.pending
                    if s.kind == kind and s.windowed and (s.microbatch, s.stage) in oldest
                ]
            )

    def _wait_for(self, sends: list[_Send]) -> None:
        """Wait for `sends` (their receivers have them or will at once) and drop their buffers."""
        if not sends:
            return
        for send in sends:
            wait_all(send.works, lambda ops=send.ops: _sending(ops))
        dropped = {id(s) for s in sends}
        self.pending = [s for s in self.pending if id(s) not in dropped]

    def release_completed(self) -> None:
        """Drop the sends that have completed (the backend says so without waiting: NCCL does, gloo's sends report
        completion only once waited for)."""
        if any(all(work.is_completed() for work in s.works) for s in self.pending):
            self.pending = [s for s in self.pending if not all(w.is_completed() for w in s.works)]

    def wait_sends(self) -> None:
        for send in self.pending:
            wait_all(send.works, lambda ops=send.ops: _sending(ops))
        self.pending.clear()
        self.local.clear()


def _sending(ops: list[dist.P2POp]) -> str:
    """What a rank failing on these sends was doing (for RemoteError)."""
    return f"sending to rank(s) {sorted({op.peer for op in ops})}"


def _post(ops: list[dist.P2POp], describe: Callable[[], str]) -> list[Any]:
    with guarded(describe):
        return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list[Any], span: str, describe: Callable[[], str]) -> None:
    """Wait for posted receives (a RANNC_TRACE span named `span`, as the simulator names its receive events)."""
    if works:
        with current_tracer().span(span):
            wait_all(works, describe)
