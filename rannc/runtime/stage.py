"""One rank's part of a deployment: its stage graph, local tensors, and what it exchanges with others."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from ..capture.inputs import DynamicDim
from ..graph.stage import StageGraph
from .failures import guarded, wait_all
from .grad_sync import GradSync, OverlappedReduce
from .routes import OutputSpec, Route
from .sharding import StageSharding


@dataclasses.dataclass
class StageChunk:
    """One (virtual) stage this rank runs: its graph and local tensors. A rank runs one per model chunk of its
    position (interleaved 1F1B), one in every other plan."""

    index: int  # the (virtual) stage, in pipeline order
    graph: StageGraph
    routes: list[Route]  # every route of the deployment (producers and consumers are virtual stages)
    state: dict[str, torch.Tensor]  # placeholder name -> local tensor (parameters are the user's objects)
    param_names: dict[str, str]  # parameter placeholder -> canonical name
    mutations: dict[str, torch.Tensor]  # node name -> buffer it is written back into
    symints: dict[str, Any]  # node name -> SymInt meta value (recomputed from the local row count)
    recompute: bool = False  # keep only stage inputs per microbatch; run the forward again in backward

    def __post_init__(self) -> None:
        self.route_of = {r.value: r for r in self.routes}
        self.produced = [r for r in self.routes if r.producer == self.index]
        unique: dict[str, torch.Tensor] = {}
        for placeholder, canonical in self.param_names.items():  # parameter inputs of this stage only
            tensor = self.state[placeholder]
            if tensor.requires_grad:
                unique.setdefault(canonical, tensor)
        self.trainable = unique  # canonical -> Parameter, deduplicated (tied weights appear once)
        self.grad_params = unique  # the parameters backward differentiates (all but ZeRO-3's, see `shard`)
        self.sharded_module: Any = None  # ZeRO-3: the graph that gathers its parameters unit by unit
        written = [id(buffer) for buffer in self.mutations.values()]
        # buffer placeholders the forward writes back into (BatchNorm's running statistics, counters)
        self.mutated_state = frozenset(name for name, tensor in self.state.items() if id(tensor) in written)


@dataclasses.dataclass
class LocalStage:
    """Everything the runtime needs on this rank; built once from the plan, read on every step.

    The rank runs `chunks` (one stage, or with interleaved 1F1B one virtual stage per model chunk of its
    position); what it shares with its replicas (gradients, written buffers) is synced for all chunks at once."""

    chunks: list[StageChunk]  # chunk order (pipeline order)
    replica: int
    stage_ranks: list[list[int]]  # per (virtual) stage
    routes: list[Route]  # every route of the deployment, same order on all ranks
    outputs: list[OutputSpec]  # every flat user output, same order on all ranks
    user_inputs: list[str]  # placeholder per flat call leaf
    batch_symbol: Any
    grad_sync: GradSync
    device: torch.device
    dynamic_dims: list[DynamicDim] = dataclasses.field(default_factory=list)  # sequence dims of the inputs
    buffer_group: Any = None  # process group of this stage's replicas, to average written buffers (or None)
    overlap_grad_sync: bool = True  # reduce replica-shared gradients during the step's last backward
    sharding: StageSharding | None = None  # ZeRO-2/3: this stage's parameters and gradients divided (`shard`)

    def __post_init__(self) -> None:
        self.route_of = {r.value: r for r in self.routes}
        self.grad_anchors: list[torch.Tensor] = []  # more leaves backward differentiates (ZeRO-3's gathers)
        unique: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            for name, param in chunk.trainable.items():
                unique.setdefault(name, param)
        self.trainable = unique  # canonical -> Parameter over every chunk (tied weights appear once)
        self.mutations = {node: buffer for chunk in self.chunks for node, buffer in chunk.mutations.items()}
        self.pending: dict[str, torch.Tensor] = {}  # gradients computed here and not yet all-reduced
        self.after_sync: Any = None  # called once after the next gradient sync (verification mode)
        # (group, buckets) of the gradients shared with exactly this position's replicas; None: there are none
        self._overlap_plan = self.grad_sync.overlapped(tuple(self.stage_ranks[self.index]), self.trainable)

    @property
    def index(self) -> int:
        """The rank's first (virtual) stage, whose index is its position's."""
        return self.chunks[0].index

    @property
    def num_stages(self) -> int:
        """(Virtual) stages of the pipeline."""
        return len(self.stage_ranks)

    @property
    def positions(self) -> int:
        """Pipeline positions (rank groups): the stages, with one chunk per position."""
        return self.num_stages // len(self.chunks)

    @property
    def recompute(self) -> bool:
        return any(chunk.recompute for chunk in self.chunks)

    @recompute.setter
    def recompute(self, value: bool) -> None:
        for chunk in self.chunks:
            chunk.recompute = value

    def start_overlapped_reduce(self, accumulated: dict[str, torch.Tensor]) -> OverlappedReduce | None:
        """A reduce of the gradients this stage shares with its replicas only, to be fed by gradient hooks
        during the last backward; None when nothing is shared that way, overlapping is off, or gradients of
        earlier unsynced calls are pending (they are reduced together after the backward)."""
        if not self.overlap_grad_sync or self.pending or self._overlap_plan is None:
            return None
        if self.sharding is not None:  # ZeRO-3 reduced every microbatch's already
            return None if self.sharding.gathers else self.sharding.owner_reduce(accumulated)
        group, buckets = self._overlap_plan
        return OverlappedReduce(group, buckets, self.trainable, accumulated)

    def shard(self, sharding: StageSharding, module: Any) -> None:
        """Run as a ZeRO-2/3 stage (`module`: the graph that gathers parameters, for ZeRO-3; else None); only a
        rank of one chunk (`build.shard_stage` refuses the others)."""
        (chunk,) = self.chunks
        self.sharding = sharding
        chunk.sharded_module = module
        gathered = sharding.names if sharding.gathers else frozenset()
        # parameters autograd differentiates directly (ZeRO-3's reach their owners through the gathers)
        chunk.grad_params = {n: p for n, p in chunk.trainable.items() if n not in gathered}
        self.grad_anchors = list(sharding.anchors) if sharding.gathers else []

    def run_graph(self, chunk: StageChunk, args: list[Any]) -> Any:
        """`chunk`'s graph on one microbatch's arguments (ZeRO-3: gathering its parameters unit by unit)."""
        if self.sharding is None or not self.sharding.gathers:
            return chunk.graph.module(*args)
        if not torch.is_grad_enabled():
            return chunk.sharded_module(*args)
        with self.sharding.saving():
            return chunk.sharded_module(*args)

    def backward_done(self, param_grads: dict[str, torch.Tensor]) -> None:
        """After one microbatch's backward: add ZeRO-3's reduced gradients (this rank's owned) to `param_grads`."""
        if self.sharding is None or not self.sharding.gathers:
            return
        for name, grad in self.sharding.backward_done().items():
            if name in param_grads:
                param_grads[name].add_(grad)
            else:
                param_grads[name] = grad.clone()

    def add_pending(self, grads: dict[str, torch.Tensor], scale: float) -> None:
        """Take over one call's parameter gradients (its own tensors), times the output gradient `scale`."""
        for name, grad in grads.items():
            if scale != 1.0:
                grad.mul_(scale)
            if name in self.pending:
                self.pending[name].add_(grad)
            else:
                self.pending[name] = grad

    def sync_grads(self, overlapped: OverlappedReduce | None = None, scale: float = 1.0) -> None:
        """All-reduce the pending gradients over each parameter's rank set and add them to `.grad`;
        `overlapped` holds the (unscaled) gradients whose reduce started during backward.

        Every rank that holds a parameter must call this the same number of times.
        """
        reduced = {} if overlapped is None else overlapped.finish()
        sharded: frozenset[str] = frozenset()
        owned: dict[str, torch.Tensor] = {}
        if self.sharding is not None:  # only the owners keep (reduced) gradients of sharded parameters
            sharded = self.sharding.names
            owned = self.sharding.settle(self.pending, overlapped is not None)
        for name, param in self.trainable.items():
            if name not in self.pending and name not in reduced and name not in sharded:
                self.pending[name] = torch.zeros_like(param)
        self.grad_sync.allreduce(self.pending, skip=frozenset(reduced) | sharded)
        for name, grad in reduced.items():
            self.pending[name] = grad if scale == 1.0 else grad.mul_(scale)
        self.pending.update(owned)
        for name, param in self.trainable.items():
            if name not in self.pending:  # a sharded parameter another replica owns
                continue
            grad = self.pending[name].to(param.dtype)
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        self.pending = {}
        if self.after_sync is not None:
            callback, self.after_sync = self.after_sync, None
            callback()

    def average_written_buffers(self) -> None:
        """Make the replicas' written buffers equal again: floating ones (running statistics) become their mean
        over the replicas, which for BatchNorm's momentum updates is the update by the mean of the replicas'
        batch statistics; integer ones (counters) advance alike on every replica and are left as they are."""
        if self.buffer_group is None:
            return
        floating = [b for b in self.mutations.values() if b.is_floating_point()]
        if not floating:
            return
        flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in floating])
        what = f"averaging the written buffers of stage {self.index} over its replicas"  # every chunk's
        with guarded(lambda: what):
            work = dist.all_reduce(flat, group=self.buffer_group, async_op=True)
        wait_all([work], lambda: what)
        flat /= len(self.stage_ranks[self.index])
        offset = 0
        with torch.no_grad():
            for buffer in floating:
                buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
                offset += buffer.numel()

    @property
    def rank(self) -> int:
        return self.stage_ranks[self.index][self.replica]
