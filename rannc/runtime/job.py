"""The deployed job of one RaNNCModule: everything its first call builds, held by one object.

`Job.deploy` takes a model's deployment (its capture, graph analysis and plan) and makes this rank's part of it:
the model's tensors placed (only the stage's own get storage), the local stage built, the user's optimizer bound
to the parameters this rank steps, the watchdog started and the weights filled. The Job then runs each call
(`pipeline_call`, `outputs`) and answers for the whole model (`state_dict`, `load_state_dict`, `undeploy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..capture import CapturedGraph, FlatCall
from ..config import Config
from ..deploy import Deployment
from ..errors import InputError, RanncError
from ..graph.analysis import GraphAnalysis
from ..plan import Plan
from . import calls, failures
from . import dist as rdist
from .build import Layout, build_local_stage, shard_stage, stage_layout
from .checkpoint import load_sharded, local_state, save_sharded
from .clip import clip_global_grad_norm
from .collect import ModelTensors, named_tensors, rank0_value
from .gather import GlobalBatch, gather_global_batch
from .optimizer import OptimizerBinding
from .pipeline import PipelineCall, PipelineMode
from .sharding import ShardAssignment, assign_shards, release_unowned
from .stage import LocalStage
from .step import run_call
from .weights import InitWeights, init_weights, is_sharded_checkpoint, load_weights, materialise

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Weights:
    """Where the weights of a model built on the meta device come from (see README: A model larger than a host)."""

    path: str | os.PathLike[str] | None = None  # load_weights: a file or directory
    init: InitWeights | None = None  # init_weights: called on each submodule this rank holds


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """This rank's part of a deployed model. Built whole by `deploy`; nothing in it is filled in later."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    captured: CapturedGraph
    analysis: GraphAnalysis
    deployment: Deployment
    layout: Layout  # which stage runs which node and holds which tensor
    first_call: FlatCall  # the call the graph was captured for
    placement: ModelTensors  # the parameters and buffers, and which rank holds each one's values
    local: set[str]  # canonical names of the tensors this rank's stage holds
    rank_sets: dict[str, tuple[int, ...]]  # canonical name -> the ranks holding it
    alias_of: dict[str, str]  # every name of a tied tensor -> its canonical name
    groups: rdist.GroupCache
    stage: LocalStage
    shards: ShardAssignment  # the parameters of sharded stages (ZeRO) and their owners
    optimizer_binding: OptimizerBinding | None

    @classmethod
    def deploy(
        cls,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        partitioned: tuple[CapturedGraph, GraphAnalysis, Deployment],
        first_call: FlatCall,
        config: Config,
        weights: Weights,
        meta: bool,
        pending_load: str | os.PathLike[str] | None = None,
    ) -> Job:
        """This rank's part of `partitioned` (collective), its tensors filled from `weights` where given, then from
        the sharded checkpoint `pending_load` (`load_sharded` before the first call). A `meta` model's tensors get
        storage here, this rank's only."""
        captured, analysis, deployment = partitioned
        rank, world_size, device = rdist.get_rank(), rdist.get_world_size(), rdist.local_device()
        plan = deployment.plan
        stage_ranks = [list(stage.ranks) for stage in plan.stages]
        layout = stage_layout(captured, analysis, deployment.stage_nodes)
        model = ModelTensors.whole(module, rank, world_size, device)
        my_stage = plan.stage_of_rank(rank)
        mine = set(plan.stages_of_rank(rank))  # one per model chunk of its position (interleaved 1F1B)
        local = {name for name, stages in layout.holders.items() if mine & set(stages)}
        if meta:  # this rank's tensors get storage (filled below from the weights given), the rest none
            materialise(module, optimizer, model.tensors, local, device)
        _place(model.tensors, local, layout, device)
        groups = rdist.GroupCache()
        stage = build_local_stage(
            captured, analysis, layout, stage_ranks, rank, model.tensors, device, groups
        )
        for chunk in stage.chunks:
            chunk.recompute = plan.stages[chunk.index].recompute or config.recompute == "always"
        stage.overlap_grad_sync = config.overlap_grad_sync
        rank_sets = layout.rank_sets(stage_ranks)
        params = {name for name, _ in module.named_parameters()}
        param_sets = {name: ranks for name, ranks in rank_sets.items() if name in params}
        shards = _shard(stage, plan, my_stage, param_sets, model.shapes, groups)
        job = cls(
            module=module,
            optimizer=optimizer,
            captured=captured,
            analysis=analysis,
            deployment=deployment,
            layout=layout,
            first_call=first_call,
            placement=dataclasses.replace(model, source=_sources(layout, stage_ranks, shards)),
            local=local,
            rank_sets=rank_sets,
            alias_of={alias: name for name, aliases in captured.aliases.items() for alias in aliases},
            groups=groups,
            stage=stage,
            shards=shards,
            optimizer_binding=_bind(optimizer, model, param_sets, config.enable_zero, groups, shards),
        )
        failures.configure(config.comm_timeout_s)
        failures.set_context(stage=my_stage)
        if world_size > 1 and config.watchdog:
            failures.start_watchdog(rank, world_size)
        rdist.barrier()  # set-up takes different times per rank; training waits are short (comm_timeout_s)
        job._fill_weights(weights)
        if pending_load is not None:
            job.load_sharded(pending_load)
        return job._without_unowned()

    @property
    def rank(self) -> int:
        return self.placement.rank

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.placement.tensors

    def describe(self) -> str:
        """Where this rank stands in the plan, for the log."""
        plan = self.deployment.plan
        my_stage = plan.stage_of_rank(self.rank)
        return (
            f"rank {self.rank} runs stage {my_stage}/{len(plan.stages)} (replica {self.stage.replica} of "
            f"{len(plan.stages[my_stage].ranks)}); {plan.microbatches} microbatches, {plan.schedule} schedule"
        )

    def _fill_weights(self, weights: Weights) -> None:
        """This rank's tensors from `weights.path` (only the entries it holds are read) and/or `weights.init`."""
        pending = set(self.local) if weights.init is not None and weights.path is None else set()
        if weights.path is not None:
            if is_sharded_checkpoint(weights.path):
                self.load_sharded(weights.path)
            else:
                aliases = dict(self.captured.aliases)
                missing = load_weights(weights.path, self.tensors, self.local, aliases)
                if missing and weights.init is None:
                    raise RanncError(
                        f"{weights.path} lacks {missing[:5]} ({len(missing)} tensors this rank holds); "
                        "pass init_weights=FN too to compute them (non-persistent buffers, for example), or load "
                        "weights saved from this model"
                    )
                pending = set(missing)
        if weights.init is not None:
            # (every rank: a collective) rank 0's seed, so that every rank initialises alike
            seed = rank0_value(torch.initial_seed(), self.world_size)
            if pending:
                canonical = {id(t): name for name, t in self.tensors.items()}
                init_weights(self.module, weights.init, pending, canonical, self.placement.shapes, int(seed))

    def _without_unowned(self) -> Job:
        """ZeRO-3: from here on a parameter of a sharded stage lives on its owner only."""
        unowned = {n for n in self.shards.gathered & self.local if self.shards.owner[n] != self.rank}
        release_unowned(self.tensors, sorted(unowned))
        return dataclasses.replace(self, local=self.local - unowned)

    # ---- one call ----------------------------------------------------------------------------------------
    def refusal(self, call: FlatCall) -> InputError | None:
        """Why the captured graph cannot serve `call` (None: it can)."""
        return calls.refusal(self.captured, self.first_call, call, self.module.training)

    def gather(self, call: FlatCall, refusal: InputError | None) -> GlobalBatch:
        """The global batch. Every rank raises when rannc refused any rank's call (this rank its own error)."""
        if refusal is None:
            return gather_global_batch(call.leaves, self.placement.device, self.world_size)
        if self.world_size == 1:
            raise refusal
        placeholders = [calls.placeholder(leaf) for leaf in self.first_call.leaves]
        try:
            return gather_global_batch(placeholders, self.placement.device, self.world_size, str(refusal))
        except InputError:
            raise refusal from None

    def pipeline_call(self, batch: GlobalBatch, sync_grads: bool) -> PipelineCall:
        """The call's pipeline: 1F1B runs its backwards inside the forward call, fill-drain when autograd asks."""
        plan = self.deployment.plan
        if not torch.is_grad_enabled():
            mode = PipelineMode.INFERENCE
        else:
            mode = PipelineMode.EAGER if plan.schedule.eager else PipelineMode.DEFERRED
        return PipelineCall(
            self.stage,
            batch,
            plan.microbatches,
            plan.schedule,
            mode,
            training=self.module.training,
            sync_grads=sync_grads,
        )

    def run(self, pipeline: PipelineCall, call: FlatCall) -> list[Any]:
        """Run `pipeline` (attached to autograd) and return the call's flat outputs, as the model returns them."""
        grad_leaves = [
            (name, leaf)
            for name, leaf in zip(self.captured.user_inputs, call.leaves)
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad
        ]
        results = run_call(pipeline, grad_leaves)
        calls.count_backward(results)
        outputs = iter(results)
        return [
            next(outputs)
            if spec.node is not None
            else calls.returned_input(call.leaves[spec.leaf], self.world_size)
            if spec.kind == "input"
            else spec.constant
            for spec in self.stage.outputs
        ]

    # ---- the whole model ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: rank 0 gets the full state under the original names, others an empty dict."""
        gathered = self.placement.gather_to_rank0(lambda t: t)
        out: dict[str, torch.Tensor] = OrderedDict()
        if self.rank == 0:
            for key in self.module.state_dict(keep_vars=True):
                out[key] = gathered.get(self.alias_of.get(key, key), gathered.get(key))
        return out

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool) -> None:
        """A full state dict (as the unwrapped model's): this rank keeps what it holds."""
        expected = set(self.module.state_dict(keep_vars=True))
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if strict and (missing or unexpected):
            raise RanncError(
                f"state dict keys do not match the model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}; load a state dict saved from the same model (or pass strict=False)"
            )
        shapes = self.placement.shapes
        mismatched = [
            f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from the state dict, the "
            f"shape in the model is {tuple(shapes[name][0])}"
            for key, value in state_dict.items()
            if (name := self.alias_of.get(key, key)) in shapes
            and tuple(value.shape) != tuple(shapes[name][0])
        ]
        if mismatched:  # checked against the full shapes: most tensors here are empty placeholders
            raise RanncError(
                f"error(s) in loading the state dict: {'; '.join(mismatched)}. Load a state dict saved from the same "
                "model (the same sizes)"
            )
        with torch.no_grad():
            for key, value in state_dict.items():
                tensor = self.tensors.get(self.alias_of.get(key, key))
                if tensor is not None and tensor.numel() > 0:
                    tensor.copy_(value.to(tensor.device))

    def clip_grad_norm(self, max_norm: float, norm_type: float) -> torch.Tensor:
        """Clip gradients by their global norm over all ranks (see RaNNCModule.clip_grad_norm)."""
        # a sharded stage's gradient lives on its parameter's owner: that rank counts it
        counting = {**self.rank_sets, **{name: (rank,) for name, rank in self.shards.owner.items()}}
        return clip_global_grad_norm(self.stage, counting, max_norm, norm_type)

    def save_sharded(self, path: str | os.PathLike[str]) -> None:
        """Collective: each rank writes what it holds (see RaNNCModule.save_sharded)."""
        save_sharded(path, local_state(self.tensors, self.local, self.optimizer))

    def load_sharded(self, path: str | os.PathLike[str]) -> None:
        """Collective: each rank reads what it holds now, whatever the plan that wrote the checkpoint."""
        load_sharded(path, self.tensors, self.local, self.optimizer)

    def undeploy(self) -> None:
        """Collective: every rank gets every parameter and buffer back whole on its device, the optimizer every
        parameter with its full state; gradients are dropped and the job's process groups destroyed."""
        full = self.placement.full_values(sorted(self.tensors), lambda t: t, device=self.placement.device)
        for name, value in full.items():  # (the same order everywhere)
            if name not in self.local:
                self.tensors[name].data = value
        for param in self.module.parameters():
            param.grad = None
        if self.optimizer_binding is not None:
            self.optimizer_binding.unbind()
        self.groups.destroy()


def _place(tensors: dict[str, torch.Tensor], local: set[str], layout: Layout, device: torch.device) -> None:
    """This rank's tensors move to its device; those only other ranks hold keep no storage here."""
    for name, tensor in tensors.items():
        if name in local:
            tensor.data = tensor.data.to(device)
        elif name in layout.holders:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)  # lives on other ranks


def _sources(layout: Layout, stage_ranks: list[list[int]], shards: ShardAssignment) -> dict[str, int]:
    """Canonical name -> the rank whose copy (and gradient) counts: a sharded parameter's owner, else the first
    replica of the stage that owns it."""
    return {name: shards.owner.get(name, stage_ranks[stage][0]) for name, stage in layout.owner.items()}


def _shard(
    stage: LocalStage,
    plan: Plan,
    my_stage: int,
    param_sets: dict[str, tuple[int, ...]],
    shapes: dict[str, tuple[torch.Size, torch.dtype]],
    groups: rdist.GroupCache,
) -> ShardAssignment:
    """The owners of every sharded stage's parameters; this rank's stage made a ZeRO-2/3 stage if it is one."""
    sizes = {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in shapes.items()}
    shards = assign_shards(
        [s.shard for s in plan.stages], [list(s.ranks) for s in plan.stages], param_sets, sizes
    )
    full_shapes = {name: shape for name, (shape, _) in shapes.items()}
    shard_stage(stage, plan.stages[my_stage], shards, full_shapes, groups)
    return shards


def _bind(
    optimizer: torch.optim.Optimizer | None,
    model: ModelTensors,
    param_sets: dict[str, tuple[int, ...]],
    zero: bool,
    groups: rdist.GroupCache,
    shards: ShardAssignment,
) -> OptimizerBinding | None:
    """The user's optimizer steps only parameters this rank holds (or owns, with ZeRO)."""
    if optimizer is None:
        return None
    sizes = {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in model.shapes.items()}
    return OptimizerBinding(
        optimizer,
        {id(t): name for name, t in model.tensors.items()},
        param_sets,
        sizes,
        model.tensors,
        model.rank,
        zero,
        groups,
        shards=shards,
    )


@contextlib.contextmanager
def untouched_random_state(device: torch.device) -> Iterator[None]:
    """Leave every random generator of the process as it was: torch's CPU and CUDA generators, Python's
    `random` and NumPy's global one, so that a seeded script draws the same numbers wrapped or not."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


__all__ = ["Job", "Weights", "named_tensors", "untouched_random_state"]
