"""Run one call of the partitioned model on this rank: the schedule's forwards and backwards."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..capture.inputs import concrete_shape, sequence_sizes, symint_value
from ..capture.modes import exact_precision, training_mode
from ..graph.stage import InputKind
from ..schedule import Action, ActionKind, Schedule, actions_for
from ..split_backward import WeightGrads, input_grads
from .failures import guarded, wait_all
from .gather import GlobalBatch
from .grad_sync import OverlappedReduce, exclusive_item
from .layout import SampleLayout
from .stage import LocalStage
from .trace import current_tracer
from .transfer import Progress, Transfer


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _restored_rng(device: torch.device, state: Any) -> Iterator[None]:
    """Replay a forward with the random state it first ran with (dropout masks match), then restore."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


@dataclasses.dataclass(frozen=True)
class OutputGrads:
    """The output gradients of an eager call as all ranks agreed on them."""

    loss_scale: float | None  # the loss's gradient, averaged over the ranks; None: no rank sent one
    others: bool  # some rank backpropagated through an output other than the loss


@dataclasses.dataclass
class CallStart:
    """What a call's forwards started from: the random state and the buffers they write."""

    rng: tuple[torch.Tensor, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]

    @classmethod
    def take(cls, stage: LocalStage) -> CallStart:
        buffers = {node: buffer.detach().clone() for node, buffer in stage.mutations.items()}
        return cls(_rng_state(stage.device), buffers)

    @contextlib.contextmanager
    def restored(self, stage: LocalStage) -> Iterator[None]:
        """Run with this start's random state and buffers; afterwards both are as they were on entry."""
        now = {node: buffer.detach().clone() for node, buffer in stage.mutations.items()}
        with torch.no_grad():
            for node, buffer in stage.mutations.items():
                buffer.copy_(self.buffers[node])
        try:
            with _restored_rng(stage.device, self.rng):
                yield
        finally:
            with torch.no_grad():
                for node, buffer in stage.mutations.items():
                    buffer.copy_(now[node])


# Graph inputs not received from a stage.
_LOCAL_INPUTS = (InputKind.PARAM, InputKind.BUFFER, InputKind.CONSTANT, InputKind.USER, InputKind.SYMINT)


class PipelineMode(enum.StrEnum):
    """When one call runs its backwards."""

    EAGER = "eager"  # inside the forward call (1F1B; the loss gradient assumed 1, rescaled by the user's backward)
    DEFERRED = "deferred"  # when autograd calls `run_backward` (fill-drain)
    INFERENCE = "inference"  # none: forwards only, no graphs kept


class PipelineCall:
    """State of one forward (and its backward): stashed activations, accumulated outputs and gradients.

    `mode` (a PipelineMode or its name) says when the backwards run; `schedule` (a Schedule or its name) their order.
    """

    def __init__(
        self,
        stage: LocalStage,
        batch: GlobalBatch,
        microbatches: int,
        schedule: Schedule | str,
        mode: PipelineMode | str,
        *,
        training: bool = True,
        sync_grads: bool = True,
        replay: bool = False,
    ) -> None:
        self.stage = stage
        self.training = training  # the module's train/eval mode for this call
        self.sync_grads = sync_grads  # all-reduce gradients after this call's backward
        self.batch = batch
        self.mode = PipelineMode(mode)
        self.schedule = Schedule(schedule)
        self.world = len({r for ranks in stage.stage_ranks for r in ranks})
        replicas = tuple(len(r) for r in stage.stage_ranks)
        self.layout = SampleLayout(batch.size, microbatches, replicas)
        self.microbatches = microbatches
        self.sizes = sequence_sizes(batch.leaves, stage.dynamic_dims)  # this call's sequence lengths
        # What every position runs in this call, in order: the other positions' progress frees our sends.
        lists = [self._ordered(position) for position in range(stage.positions)]
        self.transfer = Transfer(
            self.layout,
            stage.stage_ranks,
            len(stage.routes),
            stage.batch_symbol,
            stage.device,
            self.sizes,
            rank=stage.rank,
            progress=Progress(lists, stage.positions),
        )
        self.inputs = dict(zip(stage.user_inputs, batch.leaves))
        self.wants_grad = dict(zip(stage.user_inputs, batch.requires_grad))
        self.stash: dict[tuple[int, int], Any] = {}  # (microbatch, chunk) -> what its backward needs
        self.out_acc: dict[int, torch.Tensor] = {}
        self.out_grads: dict[int, torch.Tensor] = {}
        self.param_grads: dict[str, torch.Tensor] = {}
        self.input_grads: dict[str, torch.Tensor] = {}
        self.grad_leaf_names: list[str] = []  # leaves that require grad on this rank, set by the caller
        # Per chunk: routes whose values it receives (graph input order) and whose gradients it receives back.
        self.received_routes = [
            [stage.route_of[i.name] for i in chunk.graph.inputs if i.kind not in _LOCAL_INPUTS]
            for chunk in stage.chunks
        ]
        self.grad_routes = [
            [route for route in chunk.produced if route.carries_grad] for chunk in stage.chunks
        ]
        # The (microbatch, chunk) of the step's last parameter-gradient pass (B, or W of a split backward).
        passes = [(a.microbatch, a.chunk) for a in self._schedule_actions(stage.index) if a.kind.releases]
        self.last_backward = passes[-1] if passes else None
        # Split backwards: what each I leaves for its W, by (microbatch, chunk).
        self.weights: dict[tuple[int, int], WeightGrads | None] = {}
        self.overlapped: OverlappedReduce | None = None  # the gradient reduce started in the last backward
        self.replay = replay  # a second pass over an eager call's microbatches (see `replay_backward`)
        # An eager call keeps what its forwards started from, to replay them if other outputs get gradients.
        self.start = CallStart.take(stage) if self.mode == PipelineMode.EAGER else None

    # ---- schedule ----------------------------------------------------------------------------------
    def _schedule_actions(self, position: int) -> list[Action]:
        """The schedule's actions of `position` (every chunk of it)."""
        s = self.stage
        return actions_for(self.schedule, position, s.positions, self.microbatches, len(s.chunks))

    def _ordered(self, position: int) -> list[Action]:
        """What `position` runs in this call, in order: the schedule's actions, or its forwards and then (when
        autograd asks) its backwards."""
        acts = self._schedule_actions(position)
        if self.mode == PipelineMode.EAGER:
            return acts
        forwards = [a for a in acts if a.kind == ActionKind.FORWARD]
        if self.mode == PipelineMode.INFERENCE:
            return forwards
        return forwards + [a for a in acts if a.kind != ActionKind.FORWARD]

    def actions(self) -> list[Action]:
        """The actions of this call's forward: every action (eager), or the forwards."""
        acts = self._schedule_actions(self.stage.index)
        if self.mode == PipelineMode.EAGER:
            return acts
        return [a for a in acts if a.kind == ActionKind.FORWARD]

    def _chunk_args(self, action: Action) -> dict[str, int]:
        """Trace span args of an action of a rank running several chunks: the chunk and its (virtual) stage."""
        if len(self.stage.chunks) == 1:
            return {}
        return {"chunk": action.chunk, "stage": self.stage.chunks[action.chunk].index}

    def run_forward(self) -> list[torch.Tensor]:
        tracer = current_tracer()  # RANNC_TRACE: one trace file per rank per step (no-op when unset)
        actions = self.actions()
        for k, action in enumerate(actions):
            self._post_receives(actions[k + 1 :])
            with tracer.span(str(action), **self._chunk_args(action)):
                self._run(action)
        with tracer.span("wait_sends"):
            self.transfer.wait_sends()
        if self.training and not self.replay:
            with tracer.span("average_buffers"):
                self.stage.average_written_buffers()
        if self.replay:
            return []
        if self.mode == PipelineMode.EAGER:
            with tracer.span("finish_backward"):
                self._finish_backward()
        with tracer.span("assemble_outputs"):
            outputs = self._assemble_outputs()
        if self.mode == PipelineMode.EAGER:  # the step ends after its gradient sync, in the loss's backward
            tracer.hold_open(self.stage.rank)
        elif self.mode == PipelineMode.INFERENCE:  # a deferred step ends in run_backward
            tracer.dump(rank=self.stage.rank)
        return outputs

    def run_backward(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Deferred mode: spread the users' output gradients, run every backward, sync gradients."""
        tracer = current_tracer()
        with tracer.span("spread_output_grads"):
            self._spread_output_grads(grads)
        actions = [a for a in self._schedule_actions(self.stage.index) if a.kind != ActionKind.FORWARD]
        for k, action in enumerate(actions):
            self._post_receives(actions[k + 1 :])
            with tracer.span(str(action), **self._chunk_args(action)):
                self._run(action)
        with tracer.span("wait_sends"):
            self.transfer.wait_sends()
        with tracer.span("finish_backward"):
            self._finish_backward()
        self.apply_param_grads(1.0)
        tracer.dump(rank=self.stage.rank)
        return self.local_input_grads(1.0)

    def agree_output_grads(self, grads: list[torch.Tensor | None]) -> OutputGrads:
        """Eager mode: what the ranks' backwards brought, agreed by all ranks (one small all-reduce).

        The loss's gradient becomes its mean over the ranks (DDP's average of the ranks' gradients), and every
        rank learns whether any rank backpropagated through another output."""
        flat = [spec for spec in self.stage.outputs if spec.node is not None]
        loss: torch.Tensor | None = None
        others = False
        for spec, grad in zip(flat, grads):
            if grad is None or spec.dtype is None or not spec.dtype.is_floating_point:
                continue
            if spec.kind == "mean" and loss is None:
                loss = grad.detach().to(torch.float64).reshape(())
            else:
                others = True
        local = torch.tensor(
            [0.0 if loss is None else 1.0, 0.0, float(others)], dtype=torch.float64, device=self.stage.device
        )
        if loss is not None:
            local[1] = loss
        total = self._allreduce(local).tolist()  # read here: what the call does next depends on it
        scale = total[1] / self.world if total[0] > 0 else None
        return OutputGrads(scale, total[2] > 0)

    def replay_backward(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Eager mode, when outputs other than the loss received gradients: run the call's forwards again
        (same random numbers, same buffer values, no outputs) and backpropagate those gradients fill-drain.

        The first pass's graphs are gone by the time the user's backward arrives; replaying costs a second
        forward and backward, only for calls that need it. Returns the input gradients of the second pass."""
        assert self.start is not None
        flat = [spec for spec in self.stage.outputs if spec.node is not None]
        rest = [None if spec.kind == "mean" else grad for spec, grad in zip(flat, grads)]
        replay = PipelineCall(
            self.stage,
            self.batch,
            self.microbatches,
            self.schedule,
            PipelineMode.DEFERRED,
            training=self.training,
            sync_grads=self.sync_grads,
            replay=True,
        )
        replay.grad_leaf_names = self.grad_leaf_names
        with self.start.restored(self.stage):
            replay.run_forward()
        return replay.run_backward(rest)

    def discard_param_grads(self) -> None:
        """Drop this call's parameter gradients; a reduce started during backward is still completed (every
        replica started it)."""
        overlapped, self.overlapped = self.overlapped, None
        if overlapped is not None:
            overlapped.finish()
        self.param_grads = {}

    def apply_param_grads(self, scale: float) -> None:
        """Add this call's parameter gradients (times the output gradient) and sync them unless deferred."""
        overlapped, self.overlapped = self.overlapped, None
        # without the overlapped ones (they left param_grads); the stage takes them over
        grads, self.param_grads = self.param_grads, {}
        self.stage.add_pending(grads, scale)
        if self.sync_grads:
            with current_tracer().span("grad_sync"):
                self.stage.sync_grads(overlapped, scale)

    def _run(self, action: Action) -> None:
        if action.kind == ActionKind.FORWARD:
            self._forward(action.microbatch, action.chunk)
        elif action.kind == ActionKind.BACKWARD_WEIGHT:
            self._backward_weight(action.microbatch, action.chunk)
        else:
            self._backward(action)

    def _post_receives(self, upcoming: list[Action]) -> None:
        """Post the receives of the next action that receives anything (a W pass receives nothing) before
        running this one, so that its inputs (or output gradients) arrive while this rank computes instead of
        when it asks for them."""
        s = self.stage
        for action in upcoming:
            index = s.chunks[action.chunk].index
            if action.kind == ActionKind.FORWARD:
                routes = self.received_routes[action.chunk]
                self.transfer.post_activations(routes, index, s.replica, action.microbatch)
                return
            if action.kind.sends_grad:
                if self.mode != PipelineMode.INFERENCE:
                    routes = self.grad_routes[action.chunk]
                    self.transfer.post_grads(routes, s.replica, action.microbatch, index)
                return

    # ---- one microbatch ----------------------------------------------------------------------------
    def _forward(self, i: int, c: int = 0) -> None:
        s, chunk = self.stage, self.stage.chunks[c]
        lo, hi = self.layout.rows(chunk.index, i, s.replica)
        grad = self.mode != PipelineMode.INFERENCE
        args: list[Any] = []
        grad_inputs: list[tuple[InputKind, str, torch.Tensor]] = []
        received = iter(self.transfer.recv_activations(self.received_routes[c], chunk.index, s.replica, i))
        for item in chunk.graph.inputs:
            if item.kind.is_state:
                value = chunk.state[item.name]
                if grad and item.name in chunk.mutated_state:
                    # autograd (and a recompute) keeps what this forward read; the write-back below must not
                    # change it
                    value = value.clone()
                args.append(value)
            elif item.kind == InputKind.USER:
                value = self.inputs[item.name]
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    value = value.narrow(0, lo, hi - lo)
                    if grad and self.wants_grad[item.name] and value.is_floating_point():
                        value = value.detach().requires_grad_(True)
                        grad_inputs.append((InputKind.USER, item.name, value))
                args.append(value)
            elif item.kind == InputKind.SYMINT:
                args.append(symint_value(chunk.symints[item.name], s.batch_symbol, hi - lo, self.sizes))
            else:
                route = s.route_of[item.name]
                value = next(received)
                if grad and route.carries_grad:
                    value.requires_grad_(True)
                    grad_inputs.append((InputKind.BOUNDARY, item.name, value))
                args.append(value)
        recompute = grad and chunk.recompute
        rng = _rng_state(s.device) if recompute else None
        # A recomputed stage keeps only its inputs now and runs the forward again in backward.
        with torch.set_grad_enabled(grad and not recompute), training_mode(self.training), exact_precision():
            outs = dict(zip(chunk.graph.outputs, s.run_graph(chunk, args)))
        for route in chunk.produced:
            self.transfer.send_activation(route, outs[route.value], s.replica, i)
        if self.training:
            with torch.no_grad():
                for node, buffer in chunk.mutations.items():
                    buffer.copy_(outs[node])
        self._contribute_outputs(outs, chunk.index, i, lo, hi)
        if grad:
            self.stash[i, c] = (
                grad_inputs,
                None if recompute else outs,
                hi - lo,
                args if recompute else None,
                rng,
            )

    def _backward(self, action: Action) -> None:
        """B: every gradient of microbatch `action.microbatch` through its chunk; I: only those of its inputs
        (sent on at once), leaving its parameter gradients to its W (`_backward_weight`), which reuses this
        pass's graph."""
        i, c = action.microbatch, action.chunk
        s, chunk = self.stage, self.stage.chunks[c]
        grad_inputs, outs, rows, args, rng = self.stash.pop((i, c))
        if outs is None:  # recompute: the same forward again, with the same random numbers, keeping graphs
            # enable_grad: deferred backwards run inside autograd's backward, where grad mode is off
            with (
                _restored_rng(s.device, rng),
                torch.enable_grad(),
                training_mode(self.training),
                exact_precision(),
            ):
                outs = dict(zip(chunk.graph.outputs, s.run_graph(chunk, args)))
        lo, hi = self.layout.rows(chunk.index, i, s.replica)
        seeds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def seed(tensor: torch.Tensor, grad: torch.Tensor) -> None:
            if not tensor.requires_grad:
                return
            key = id(tensor)
            seeds[key] = (tensor, grad if key not in seeds else seeds[key][1] + grad)

        routes = self.grad_routes[c]
        for route, grad in zip(routes, self.transfer.recv_grads(routes, s.replica, i, chunk.index)):
            seed(outs[route.value], grad)
        for k, spec in enumerate(s.outputs):
            if spec.producer != chunk.index or spec.node is None:
                continue
            tensor = outs[spec.node]
            if spec.kind == "mean" and tensor.is_floating_point():
                scale = (
                    self.out_grads.get(k, torch.ones((), device=s.device))
                    if self.mode == PipelineMode.DEFERRED
                    else 1.0
                )
                seed(tensor, (torch.ones_like(tensor) * scale * (rows / self.batch.size)).to(tensor.dtype))
            elif spec.kind == "rows" and self.mode == PipelineMode.DEFERRED and k in self.out_grads:
                seed(tensor, self.out_grads[k].narrow(spec.batch_dim, lo, hi - lo))
        # (ZeRO-3: its parameters are reached through s.grad_anchors)
        params = list(chunk.grad_params.items())
        inputs = [t for _, _, t in grad_inputs]
        targets = [t for t, _ in seeds.values()]
        grads = [g for _, g in seeds.values()]
        if action.kind == ActionKind.BACKWARD_INPUT:
            if targets:
                found, weights = input_grads(targets, grads, inputs, [p for _, p in params], s.grad_anchors)
            else:
                found, weights = [None] * len(inputs), None
            self.weights[i, c] = weights
            self._deliver_input_grads(grad_inputs, found, action, lo, hi)
            return
        wrt = [p for _, p in params] + inputs + s.grad_anchors

        def whole_backward() -> Sequence[torch.Tensor | None]:
            if targets and wrt:
                return torch.autograd.grad(targets, wrt, grads, allow_unused=True)
            return [None] * len(wrt)

        results = self._parameter_pass(action, params, whole_backward)
        self._deliver_input_grads(grad_inputs, results[len(params) :], action, lo, hi)

    def _backward_weight(self, i: int, c: int = 0) -> None:
        """W: the parameter gradients of microbatch `i` through chunk `c` from what its I pass caught (and then
        its graph goes)."""
        weights = self.weights.pop((i, c))
        params = list(self.stage.chunks[c].grad_params.items())

        def weight_pass() -> Sequence[torch.Tensor | None]:
            return weights.compute() if weights is not None else [None] * len(params)

        self._parameter_pass(Action(ActionKind.BACKWARD_WEIGHT, i, c), params, weight_pass)

    def _parameter_pass(
        self,
        action: Action,
        params: list[tuple[str, torch.Tensor]],
        backward: Callable[[], Sequence[torch.Tensor | None]],
    ) -> Sequence[torch.Tensor | None]:
        """Run `backward` (a B or W pass), whose results begin with the gradients of `params`, and add those to
        the call's; the step's last such pass feeds the overlapped gradient reduce as it goes. Returns all of
        `backward`'s results."""
        with self._reducing(action, params) as reduced:
            # a list of our own: what `backward` returned is dropped, so a fresh gradient is held here only
            results = list(backward())
        self.stage.backward_done(self.param_grads)  # (ZeRO-3: the units this pass reached were reduced in it)
        self._add_param_grads(params, results, reduced)
        return results

    @contextlib.contextmanager
    def _reducing(self, action: Action, params: list[tuple[str, torch.Tensor]]) -> Iterator[frozenset[str]]:
        """Around the step's last parameter-gradient pass: start the reduce of the gradients this stage shares
        with its replicas, fed by hooks as that pass makes each final. Yields the names it reduces."""
        hooks = []
        last = (action.microbatch, action.chunk) == self.last_backward and action.kind.releases
        if last and self.sync_grads and self.mode != PipelineMode.INFERENCE:
            # the gradients are final as this pass produces them: reduce them while it goes on
            self.overlapped = self.stage.start_overlapped_reduce(self.param_grads)
            if self.overlapped is not None:
                # the other chunks ran their last backwards already: their gradients are final now
                for name in self.overlapped.names - self.stage.chunks[action.chunk].trainable.keys():
                    self.overlapped.final(name)
                hooks = [
                    param.register_hook(functools.partial(self.overlapped.ready, name))
                    for name, param in params
                    if name in self.overlapped.names
                ]
        try:
            yield self.overlapped.names if hooks and self.overlapped is not None else frozenset()
        finally:
            for hook in hooks:
                hook.remove()

    def _add_param_grads(
        self,
        params: list[tuple[str, torch.Tensor]],
        results: list[torch.Tensor | None],
        reduced: frozenset[str],
    ) -> None:
        """Add one microbatch's parameter gradients (the first len(params) of a pass's `results`) to the call's
        (those being reduced went to the reduce). The call keeps a first gradient itself when nothing else holds
        it, as autograd's AccumulateGrad does, and a copy otherwise: later microbatches and the loss scale are
        added to it in place."""
        for k, (name, _param) in enumerate(params):
            if results[k] is None or name in reduced:
                continue
            if name in self.param_grads:
                self.param_grads[name].add_(results[k])
            elif exclusive_item(results, k):
                self.param_grads[name] = results[k]
            else:
                self.param_grads[name] = results[k].detach().clone()

    def _deliver_input_grads(
        self,
        grad_inputs: list[tuple[InputKind, str, torch.Tensor]],
        results: Sequence[torch.Tensor | None],
        action: Action,
        lo: int,
        hi: int,
    ) -> None:
        """Send the gradients of received inputs back to their producers; add those of the user's inputs up."""
        s, i = self.stage, action.microbatch
        for (kind, name, tensor), g in zip(grad_inputs, results):
            g = torch.zeros_like(tensor) if g is None else g
            if kind == InputKind.BOUNDARY:
                self.transfer.send_grad(s.route_of[name], g, s.chunks[action.chunk].index, s.replica, i)
            else:
                total = self.input_grads.setdefault(name, torch.zeros_like(self.inputs[name]))
                total.narrow(0, lo, hi - lo).add_(g)

    # ---- outputs -------------------------------------------------------------------------------------
    def _contribute_outputs(
        self, outs: dict[str, torch.Tensor], producer: int, i: int, lo: int, hi: int
    ) -> None:
        s = self.stage
        for k, spec in enumerate(s.outputs):
            if spec.producer != producer or spec.node is None:
                continue
            value = outs[spec.node].detach()
            if spec.kind == "rows":
                if k not in self.out_acc:
                    shape = concrete_shape(spec.shape, s.batch_symbol, self.batch.size, self.sizes)
                    self.out_acc[k] = torch.zeros(shape, dtype=value.dtype, device=s.device)
                self.out_acc[k].narrow(spec.batch_dim, lo, hi - lo).copy_(value)
            elif spec.kind == "mean":
                weighted = value.to(torch.float64) * ((hi - lo) / self.batch.size)
                self.out_acc[k] = (
                    self.out_acc.get(k, torch.zeros((), dtype=torch.float64, device=s.device)) + weighted
                )
            elif spec.kind == "whole" and i == 0 and s.replica == 0:
                self.out_acc[k] = value.clone()

    def _assemble_outputs(self) -> list[torch.Tensor]:
        s = self.stage
        lo, hi = self.batch.local_rows(s.rank)
        results = []
        for k, spec in enumerate(s.outputs):
            if spec.node is None:
                continue
            if spec.kind == "mean":
                total = self.out_acc.get(k, torch.zeros((), dtype=torch.float64, device=s.device))
                total = self._allreduce(total).to(spec.dtype)
                results.append(total)
                continue
            rows = self.batch.size if spec.kind == "rows" else 1
            shape = concrete_shape(spec.shape, s.batch_symbol, rows, self.sizes)
            total = self.out_acc.get(k)
            if total is None:
                total = torch.zeros(shape, dtype=spec.dtype, device=s.device)
            total = self._allreduce(total)
            if spec.kind == "rows":
                total = total.narrow(spec.batch_dim, lo, hi - lo).clone()
            results.append(total)
        return results

    def _allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return tensor
        if tensor.dtype == torch.bool:
            return self._allreduce(tensor.to(torch.uint8)).to(torch.bool)
        with guarded(lambda: "all-reducing the model outputs"):
            work = dist.all_reduce(tensor, async_op=True)
        wait_all([work], lambda: "all-reducing the model outputs")
        return tensor

    def _spread_output_grads(self, grads: list[torch.Tensor | None]) -> None:
        s = self.stage
        lo, hi = self.batch.local_rows(s.rank)
        flat_specs = [(k, spec) for k, spec in enumerate(s.outputs) if spec.node is not None]
        for (k, spec), grad in zip(flat_specs, grads):
            if spec.dtype is None or not spec.dtype.is_floating_point:
                continue
            if spec.kind == "mean":
                value = (
                    torch.zeros((), dtype=torch.float64, device=s.device) if grad is None else grad.double()
                )
                self.out_grads[k] = self._allreduce(value.clone()) / self.world
            elif spec.kind == "rows":
                shape = concrete_shape(spec.shape, s.batch_symbol, self.batch.size, self.sizes)
                total = torch.zeros(shape, dtype=spec.dtype, device=s.device)
                if grad is not None:
                    total.narrow(spec.batch_dim, lo, hi - lo).copy_(grad)
                # Each rank's rows carry the gradient of that rank's own loss; the mean over ranks is DDP's
                # contract (and, for equal local batches, one process on the global batch).
                self.out_grads[k] = self._allreduce(total).div_(self.world)

    # ---- gradients -----------------------------------------------------------------------------------
    def _finish_backward(self) -> None:
        for name, flag in self.wants_grad.items():
            value = self.inputs[name]
            if flag and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                total = self.input_grads.get(name)
                if total is None:
                    total = torch.zeros_like(value)
                self.input_grads[name] = self._allreduce(total)

    def local_input_grads(self, scale: float) -> list[torch.Tensor | None]:
        """Gradients of the call's leaves that require grad on this rank (in leaf order), its own rows."""
        lo, hi = self.batch.local_rows(self.stage.rank)
        out: list[torch.Tensor | None] = []
        for name in self.grad_leaf_names:
            grad = self.input_grads.get(name)
            out.append(None if grad is None else grad.narrow(0, lo, hi - lo) * scale)
        return out
