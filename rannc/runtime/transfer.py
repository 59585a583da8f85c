"""Point-to-point movement of row ranges of boundary values (activations forward, gradients backward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..capture.inputs import concrete_shape
from ..plan.cost import SEND_WINDOW
from .failures import guarded, wait_all
from .layout import SampleLayout
from .routes import Route
from .trace import current_tracer


def _tag(route: Route, microbatch: int, num_routes: int, backward: bool) -> int:
    return ((microbatch * num_routes + route.index) * 2 + int(backward)) % (2**31 - 1)


class Transfer:
    """Sends and receives the pieces of each route; pieces are the overlaps of replicas' row ranges."""

    def __init__(
        self,
        layout: SampleLayout,
        stage_ranks: list[list[int]],
        num_routes: int,
        symbol: Any,
        device: torch.device,
        sizes: dict[Any, int] | None = None,
    ) -> None:
        self.layout = layout
        self.stage_ranks = stage_ranks
        self.num_routes = num_routes
        self.symbol = symbol
        self.sizes = sizes or {}  # this call's sequence lengths (symbols other than the batch)
        self.device = device
        # Sends in flight: (works, ops, "act" | "grad", microbatch, peer ranks); their buffers stay referenced
        # until they complete (release_completed), `release` learns that the peers have them, a newer send needs
        # the room (at most SEND_WINDOW microbatches of each kind are held) or wait_sends at the step's end.
        self.pending: list[tuple[list[Any], list[dist.P2POp], str, int, frozenset[int]]] = []
        # Receives posted ahead of need: ("act" | "grad", microbatch) -> (works, buffers, describe, peers)
        self.posted: dict[tuple[str, int], Any] = {}
        # (producer stage, microbatch j) -> which microbatches' backwards that stage ran before its forward of j
        # (set by the pipeline from its schedule; None: gradient sends are kept until wait_sends).
        self.backwards_before: Callable[[int, int], Callable[[int], bool]] | None = None

    def _empty(self, route: Route, rows: int) -> torch.Tensor:
        shape = concrete_shape(route.shape, self.symbol, rows, self.sizes)
        return torch.empty(shape, dtype=route.dtype, device=self.device)

    def post_activations(self, routes: list[Route], stage: int, replica: int, microbatch: int) -> None:
        """Post the receives of this replica's rows of every route's value for `microbatch` now (all at once, so
        a sender serves them together); `recv_activations` waits for them. Posting ahead of need lets the data
        arrive while this rank still computes."""
        key = ("act", microbatch)
        if key in self.posted or not routes:
            return
        ops: list[dist.P2POp] = []
        parts: list[tuple[Route, list[torch.Tensor]]] = []
        producers: set[int] = set()
        for route in routes:
            pieces = [p for p in self.layout.pieces(route.producer, stage, microbatch) if p[1] == replica]
            tag = _tag(route, microbatch, self.num_routes, False)
            buffers = []
            for jp, _, (a, b) in pieces:
                shape = route.packed_shape(concrete_shape(route.shape, self.symbol, b - a, self.sizes))
                buf = torch.empty(shape, dtype=route.dtype, device=self.device)
                peer = self.stage_ranks[route.producer][jp]
                ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
                producers.add(peer)
                buffers.append(buf)
            parts.append((route, buffers))

        def describe() -> str:
            names = ", ".join(r.value for r in routes)
            return f"receiving {names} for microbatch {microbatch} from rank(s) {sorted(producers)}"

        self.posted[key] = (_post(ops, describe), parts, describe, frozenset(op.peer for op in ops))

    def recv_activations(
        self, routes: list[Route], stage: int, replica: int, microbatch: int
    ) -> list[torch.Tensor]:
        """This replica's rows of every route's value for `microbatch` (posting the receives unless done)."""
        if not routes:
            return []
        self.post_activations(routes, stage, replica, microbatch)
        works, parts, describe, peers = self.posted.pop(("act", microbatch))
        _wait(works, f"recv_act{microbatch}", describe)
        if self.backwards_before is not None:  # the producers ran those backwards: our gradients reached them
            for producer in {route.producer for route in routes}:
                ranks = set(peers) & set(self.stage_ranks[producer])
                self.release("grad", ranks, self.backwards_before(producer, microbatch))
        lo, hi = self.layout.rows(stage, microbatch, replica)
        results = []
        while parts:  # popped: a received buffer that unpacking copied is freed at once
            route, buffers = parts.pop(0)
            packed = buffers[0] if len(buffers) == 1 else torch.cat(buffers, dim=route.packed_batch_dim)
            del buffers
            result = route.unpack(packed)  # the producer's memory layout: exported views depend on strides
            del packed
            assert result.shape[route.batch_dim] == hi - lo
            results.append(result)
        return results

    def _consumer_pieces(self, route: Route, replica: int, microbatch: int) -> list[tuple[int, int, int]]:
        """(consumer rank, first row, end row) of every piece of this producer replica's rows of `route`."""
        return [
            (self.stage_ranks[consumer][jc], a, b)
            for consumer in route.consumers
            for jp, jc, (a, b) in self.layout.pieces(route.producer, consumer, microbatch)
            if jp == replica
        ]

    def send_activation(self, route: Route, value: torch.Tensor, replica: int, microbatch: int) -> None:
        lo, _ = self.layout.rows(route.producer, microbatch, replica)
        tag = _tag(route, microbatch, self.num_routes, False)
        ops = []
        for peer, a, b in self._consumer_pieces(route, replica, microbatch):
            piece = route.pack(value.detach().narrow(route.batch_dim, a - lo, b - a))
            ops.append(dist.P2POp(dist.isend, piece, peer, tag=tag))
        self._start(ops, "act", microbatch)

    def send_grad(self, route: Route, grad: torch.Tensor, stage: int, replica: int, microbatch: int) -> None:
        lo, _ = self.layout.rows(stage, microbatch, replica)
        tag = _tag(route, microbatch, self.num_routes, True)
        ops = []
        for jp, jc, (a, b) in self.layout.pieces(route.producer, stage, microbatch):
            if jc == replica:
                piece = grad.narrow(route.batch_dim, a - lo, b - a).contiguous()
                ops.append(dist.P2POp(dist.isend, piece, self.stage_ranks[route.producer][jp], tag=tag))
        self._start(ops, "grad", microbatch)

    def post_grads(self, routes: list[Route], replica: int, microbatch: int) -> None:
        """Post the receives of the gradients every consumer sends back for this replica's rows of each route's
        value for `microbatch` (all at once); `recv_grads` waits for them and sums."""
        key = ("grad", microbatch)
        if key in self.posted or not routes:
            return
        ops: list[dist.P2POp] = []
        parts: list[tuple[Route, list[tuple[torch.Tensor, int]]]] = []
        for route in routes:
            lo, _ = self.layout.rows(route.producer, microbatch, replica)
            tag = _tag(route, microbatch, self.num_routes, True)
            received = []
            for peer, a, b in self._consumer_pieces(route, replica, microbatch):
                buf = self._empty(route, b - a)
                ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
                received.append((buf, a - lo))
            parts.append((route, received))

        def describe() -> str:
            names = ", ".join(r.value for r in routes)
            consumers = sorted({c for r in routes for c in r.consumers})
            return f"receiving the gradients of {names} for microbatch {microbatch} from stage(s) {consumers}"

        self.posted[key] = (_post(ops, describe), parts, describe, frozenset(op.peer for op in ops))

    def recv_grads(self, routes: list[Route], replica: int, microbatch: int) -> list[torch.Tensor]:
        """For each route: the sum of the gradients every consumer sends back for this replica's rows of the
        value (posting the receives unless done)."""
        if not routes:
            return []
        self.post_grads(routes, replica, microbatch)
        works, parts, describe, peers = self.posted.pop(("grad", microbatch))
        _wait(works, f"recv_grad{microbatch}", describe)
        # Those consumers ran this microbatch's forward (and every earlier one): they have our activations.
        self.release("act", set(peers), lambda sent: sent <= microbatch)
        totals = []
        for route, received in parts:
            lo, hi = self.layout.rows(route.producer, microbatch, replica)
            total = torch.zeros(
                concrete_shape(route.shape, self.symbol, hi - lo, self.sizes),
                dtype=route.dtype,
                device=self.device,
            )
            for buf, offset in received:
                total.narrow(route.batch_dim, offset, buf.shape[route.batch_dim]).add_(buf)
            totals.append(total)
        return totals

    def _start(self, ops: list[dist.P2POp], kind: str, microbatch: int) -> None:
        if ops:
            self.release_completed()
            self._make_room(kind, microbatch)
            with guarded(lambda: _sending(ops)):
                works = dist.batch_isend_irecv(ops)
            self.pending.append((works, ops, kind, microbatch, frozenset(op.peer for op in ops)))

    def _make_room(self, kind: str, microbatch: int) -> None:
        """Before sending `kind` for a new microbatch, wait for the oldest sends of that kind until those of fewer
        than SEND_WINDOW microbatches are held, so that what a rank holds in sends is bounded whatever the number
        of microbatches (the planner charges SEND_WINDOW microbatches: plan.cost.sent_bytes). The receivers post
        their receives one action ahead, so in the pipelined schedules the wait is for a receive already posted."""
        held = sorted({m for _, _, k, m, _ in self.pending if k == kind and m != microbatch})
        if len(held) < SEND_WINDOW:
            return
        oldest = set(held[: len(held) - SEND_WINDOW + 1])
        kept = []
        with current_tracer().span(f"wait_send_{kind}"):
            for entry in self.pending:
                works, ops, sent_kind, sent, _ = entry
                if sent_kind == kind and sent in oldest:
                    wait_all(works, lambda ops=ops: _sending(ops))
                else:
                    kept.append(entry)
        self.pending = kept

    def release_completed(self) -> None:
        """Drop the sends that have completed (the backend says so without waiting: NCCL does, gloo's sends report
        completion only once waited for)."""
        if any(all(work.is_completed() for work in entry[0]) for entry in self.pending):
            self.pending = [entry for entry in self.pending if not all(w.is_completed() for w in entry[0])]

    def release(self, kind: str, peers: set[int], microbatches: Callable[[int], bool]) -> None:
        """Drop the sends of `kind` whose microbatch satisfies `microbatches` and whose every peer is in `peers`:
        the caller knows those peers have received them (so waiting returns at once) and their buffers can go.
        Call it only with that knowledge: a send still waiting for its receiver would block here."""
        kept = []
        for entry in self.pending:
            works, ops, sent_kind, microbatch, to = entry
            if sent_kind == kind and to <= peers and microbatches(microbatch):
                wait_all(works, lambda ops=ops: _sending(ops))
            else:
                kept.append(entry)
        self.pending = kept

    def wait_sends(self) -> None:
        for works, ops, *_ in self.pending:
            wait_all(works, lambda ops=ops: _sending(ops))
        self.pending.clear()


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
