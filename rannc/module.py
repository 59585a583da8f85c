"""RaNNCModule: wrap a model; on the first call capture, profile, plan and deploy it; then run the pipeline."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from . import amp, compat, partition
from .capture import FlatCall
from .capture.modes import autocast_state
from .config import Config, load_config
from .deploy import Deployment, save_deployment
from .errors import ConfigError, DeploymentError, InputError, RanncError
from .host_memory import keep_freed_host_memory
from .runtime import dist as rdist
from .runtime import failures
from .runtime.build import build_local_stage, shard_stage, stage_layout
from .runtime.checkpoint import check_complete, load_sharded, local_state, save_sharded
from .runtime.clip import clip_global_grad_norm
from .runtime.gather import gather_global_batch
from .runtime.optimizer import OptimizerBinding, accept_from_global, check_model_parameters
from .runtime.pipeline import PipelineCall
from .runtime.sharding import assign_shards, release_unowned
from .runtime.step import run_call
from .runtime.trace import current_tracer
from .runtime.weights import (
    InitWeights,
    init_weights,
    is_meta_model,
    is_sharded_checkpoint,
    load_weights,
    materialise,
)
from .verify import Verifier

logger = logging.getLogger(__name__)


class RaNNCModule:
    """Train an unmodified ``nn.Module`` over all ranks of a torch.distributed job.

    Example::

        model = rannc.RaNNCModule(model, optimizer)        # torchrun --nproc-per-node N train.py
        loss = model(input_ids, labels)                    # this rank's local batch
        loss.backward(); optimizer.step(); optimizer.zero_grad()

    The first call captures the model, profiles its blocks, plans stages x replicas x microbatches and
    deploys this rank's stage. Keyword arguments override config items (see ``rannc.config.Config``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        config: Config | None = None,
        load_weights: str | os.PathLike[str] | None = None,
        init_weights: InitWeights | None = None,
        **config_overrides: Any,
    ) -> None:
        if isinstance(model, RaNNCModule) or isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RanncError(
                f"the model is already wrapped by {type(model).__name__}; pass the plain nn.Module to RaNNCModule"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"RaNNCModule wraps a torch.nn.Module, got {type(model).__name__}")
        config_overrides = compat.translate_options(config_overrides)  # pyrannc's keyword arguments
        self.module = model
        self.optimizer = optimizer
        self._meta = is_meta_model(model)
        if self._meta and load_weights is None and init_weights is None:
            raise ConfigError(
                "the model is on the meta device (no weights): pass load_weights=PATH (a state dict file, "
                ".safetensors, a Hugging Face checkpoint directory or a save_sharded directory) or "
                "init_weights=FN (called on each submodule this rank holds), and each rank materialises only "
                "its own stage"
            )
        self._load_weights = load_weights
        self._init_weights = init_weights
        if optimizer is not None:
            check_model_parameters(optimizer, {id(p) for p in model.parameters()})
            accept_from_global(optimizer)
            amp.install()
        self.config = (
            config.replace(**config_overrides) if config is not None else load_config(**config_overrides)
        )
        rdist.ensure_initialized(self.config.timeout_s)
        self.rank = rdist.get_rank()
        self.world_size = rdist.get_world_size()
        self.device = rdist.local_device()
        if self.device.type == "cpu" and self.config.keep_host_memory:
            keep_freed_host_memory()  # before profiling: measured and real steps reuse memory alike
        self.deployment: Deployment | None = None
        self._ready = False
        self._delay_allreduce = compat.SETTINGS.delay_grad_allreduce  # pyrannc's delay_grad_allreduce
        self._no_sync_depth = 0
        self._steps = 0
        self._verifier: Verifier | None = None
        self._pending_load: str | None = None
        self._last_call: weakref.ref[PipelineCall] | None = None  # whose backward may not have run yet
        self._last_call_in_no_sync = False
        compat.register(self)

    # ---- set-up on the first call ------------------------------------------------------------------
    def _setup(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._agree_on_initial_state()
        if self._meta and self.config.verify:
            raise ConfigError(
                "verify needs the whole model on rank 0; a meta model has no weights to compare with"
            )
        self._verifier = (
            Verifier(self.module, self.rank, self.config.verify_tolerance) if self.config.verify else None
        )
        result = partition.partition(
            self.module, args, kwargs, self.config, self.world_size, self.device, self.optimizer
        )
        self.captured, self.analysis, self.deployment = result.captured, result.analysis, result.deployment
        if self.config.save_deployment:
            _save_on_rank0(self.deployment, self.config.deployment_file, self.world_size)
        plan = self.deployment.plan
        stage_ranks = [list(stage.ranks) for stage in plan.stages]
        self.layout = stage_layout(self.captured, self.analysis, self.deployment.stage_nodes)
        self._tensors = _named_tensors(self.module)
        self._params = {name for name, _ in self.module.named_parameters()}
        self._rank_sets = self.layout.rank_sets(stage_ranks)
        self._alias_of = {alias: name for name, aliases in self.captured.aliases.items() for alias in aliases}
        self._shapes = {name: (t.shape, t.dtype) for name, t in self._tensors.items()}
        my_stage = plan.stage_of_rank(self.rank)
        local = {name for name, stages in self.layout.holders.items() if my_stage in stages}
        self._local = local
        if self._meta:  # this rank's tensors get storage (filled below from the weights given), the rest none
            materialise(self.module, self.optimizer, self._tensors, local, self.device)
        for name, tensor in self._tensors.items():
            if name in local:
                tensor.data = tensor.data.to(self.device)
            elif name in self.layout.holders:
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)  # lives on other ranks
        groups = self._groups = rdist.GroupCache()
        self.stage = build_local_stage(
            self.captured,
            self.analysis,
            self.layout,
            stage_ranks,
            self.rank,
            self._tensors,
            self.device,
            groups,
        )
        self.stage.recompute = plan.stages[my_stage].recompute or self.config.recompute == "always"
        self.stage.overlap_grad_sync = self.config.overlap_grad_sync
        sizes = {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in self._shapes.items()}
        param_sets = {name: ranks for name, ranks in self._rank_sets.items() if name in self._params}
        self._shards = assign_shards([s.shard for s in plan.stages], stage_ranks, param_sets, sizes)
        shard_stage(
            self.stage,
            plan.stages[my_stage],
            self._shards,
            {name: shape for name, (shape, _) in self._shapes.items()},
            groups,
        )
        self._bind_optimizer(groups)
        failures.configure(self.config.comm_timeout_s)
        failures.set_context(stage=my_stage)
        if self.world_size > 1 and self.config.watchdog:
            failures.start_watchdog(self.rank, self.world_size)
        rdist.barrier()  # set-up takes different times per rank; training waits are short (comm_timeout_s)
        self._fill_weights()
        if self._pending_load is not None:
            load_sharded(self._pending_load, self._tensors, self._local, self.optimizer)
            self._pending_load = None
        # ZeRO-3: from here on a parameter of a sharded stage lives on its owner only
        unowned = {n for n in self._shards.gathered & local if self._shards.owner[n] != self.rank}
        release_unowned(self._tensors, sorted(unowned))
        self._local = local - unowned
        self._ready = True
        logger.info(
            "rank %d runs stage %d/%d (replica %d of %d); %d microbatches, %s schedule",
            self.rank,
            my_stage,
            len(plan.stages),
            self.stage.replica,
            len(stage_ranks[my_stage]),
            plan.microbatches,
            plan.schedule,
        )

    def _fill_weights(self) -> None:
        """This rank's tensors from `load_weights` (only the entries it holds are read) and/or `init_weights`."""
        pending = set(self._local) if self._init_weights is not None and self._load_weights is None else set()
        if self._load_weights is not None:
            if is_sharded_checkpoint(self._load_weights):
                load_sharded(self._load_weights, self._tensors, self._local, self.optimizer)
            else:
                aliases = {name: names for name, names in self.captured.aliases.items()}
                missing = load_weights(self._load_weights, self._tensors, self._local, aliases)
                if missing and self._init_weights is None:
                    raise RanncError(
                        f"{self._load_weights} lacks {missing[:5]} ({len(missing)} tensors this rank holds); "
                        "pass init_weights=FN too to compute them (non-persistent buffers, for example), or load "
                        "weights saved from this model"
                    )
                pending = set(missing)
        if self._init_weights is not None:
            seed: list[Any] = [torch.initial_seed()]
            if (
                self.world_size > 1
            ):  # (every rank: a collective) rank 0's seed, so that every rank initialises alike
                dist.broadcast_object_list(seed, src=0)
        if pending:
            canonical = {id(t): name for name, t in self._tensors.items()}
            init_weights(self.module, self._init_weights, pending, canonical, self._shapes, int(seed[0]))

    def _bind_optimizer(self, groups: rdist.GroupCache) -> None:
        """The user's optimizer steps only parameters this rank holds (or owns, with ZeRO-1)."""
        if self.optimizer is None:
            self.optimizer_binding = None
            return
        rank_sets = {name: ranks for name, ranks in self._rank_sets.items() if name in self._params}
        sizes = {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in self._shapes.items()}
        canonical_of = {id(t): name for name, t in self._tensors.items()}
        self.optimizer_binding = OptimizerBinding(
            self.optimizer,
            canonical_of,
            rank_sets,
            sizes,
            self._tensors,
            self.rank,
            self.config.enable_zero,
            groups,
            shards=self._shards,
        )

    # ---- every call ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        failures.forward_starts(self._steps + 1)
        with failures.in_call("the forward"), failures.reported():
            return self._forward(args, kwargs)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = FlatCall.of(args, kwargs)
        if not self._ready:
            with untouched_random_state(self.device):  # capture and profiling draw random numbers
                self._setup(args, kwargs)
            self._first_call = call
        refusal = self._refusal(call)
        current_tracer().flush()  # a traced forward whose backward never ran
        with current_tracer().span("gather_inputs"):  # RANNC_TRACE: part of this step's trace
            batch = self._gather(call, refusal)
        self._steps += 1  # a refused call is no step: every rank refused it
        plan = self.deployment.plan
        mode = (
            "inference"
            if not torch.is_grad_enabled()
            else ("eager" if plan.schedule == "1f1b" else "deferred")
        )
        sync = not (self._delay_allreduce or self._no_sync_depth > 0)
        pipeline = PipelineCall(
            self.stage,
            batch,
            plan.microbatches,
            plan.schedule,
            mode,
            training=self.module.training,
            sync_grads=sync,
        )
        self._last_call, self._last_call_in_no_sync = weakref.ref(pipeline), self._no_sync_depth > 0
        grad_leaves = [
            (name, leaf)
            for name, leaf in zip(self.captured.user_inputs, call.leaves)
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad
        ]
        verifying = self._verifier is not None and not self._verifier.done and mode != "inference"
        if verifying:
            self._verifier.run_reference(batch.leaves, call.spec)
            self.stage.after_sync = self._verify_gradients
        results = run_call(pipeline, grad_leaves)
        self._count_backward(results)
        outputs = iter(results)
        flat = [
            next(outputs)
            if spec.node is not None
            else _returned_input(call.leaves[spec.leaf], self.world_size)
            if spec.kind == "input"
            else spec.constant
            for spec in self.stage.outputs
        ]
        if verifying:
            self._verifier.compare_outputs(flat, batch.local_rows(self.rank))
        return pytree.tree_unflatten(flat, self.captured.out_spec)

    def _gather(self, call: FlatCall, refusal: InputError | None) -> Any:
        """The global batch. Every rank raises when rannc refused any rank's call (this rank its own error)."""
        if refusal is None:
            return gather_global_batch(call.leaves, self.device, self.world_size)
        if self.world_size == 1:
            raise refusal
        placeholders = [_placeholder(leaf) for leaf in self._first_call.leaves]
        try:
            return gather_global_batch(placeholders, self.device, self.world_size, str(refusal))
        except InputError:
            if refusal is not None:
                raise refusal from None
            raise

    def _count_backward(self, results: list[torch.Tensor]) -> None:
        """Count the backward passes that reach this call's outputs: rank 0's watchdog checks that no rank
        skips one that the others run."""
        node = next(
            (t.grad_fn for t in results if isinstance(t, torch.Tensor) and t.grad_fn is not None), None
        )
        if node is not None:
            node.register_prehook(lambda grad_outputs: failures.backward_starts())
            node.register_hook(lambda grad_inputs, grad_outputs: failures.backward_ends())

    def _verify_gradients(self) -> None:
        self._verifier.compare_grads(self._gather_to_rank0(lambda t: t.grad))

    def _refusal(self, call: FlatCall) -> InputError | None:
        try:
            self._check_call(call)
        except InputError as exc:
            return exc
        return None

    def _check_call(self, call: FlatCall) -> None:
        if call.spec != self.captured.call_spec:
            before, now = set(self._first_call.paths), set(call.paths)
            added, removed = sorted(now - before), sorted(before - now)
            raise InputError(
                "the call's arguments differ in structure from the first call "
                f"(added: {', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}); the graph was "
                "captured for the first call's arguments. Pass the same arguments every call, or wrap a new model"
            )
        dynamic = {(d.leaf, d.dim) for d in self.captured.dynamic_dims}
        reshaped = [
            f"{path} has per-sample shape {tuple(new.shape[1:])} and dtype {new.dtype}, captured with "
            f"{captured[0]} and {captured[1]}"
            + (" (dims marked dynamic accept any size up to the captured one)" if dynamic else "")
            for leaf, (path, captured, new) in enumerate(
                zip(call.paths, self.captured.input_shapes, call.leaves)
            )
            if captured is not None
            and isinstance(new, torch.Tensor)
            and (not _fits(tuple(new.shape[1:]), captured[0], leaf, dynamic) or new.dtype != captured[1])
        ]
        if reshaped:
            raise InputError(
                f"input shapes other than the batch dimension changed since the plan was made: {'; '.join(reshaped)}. "
                "The captured graph and plan are specific to those sizes: set the config item max_seq_len to the "
                "longest sequence (dim 1) the job will see, so that one graph and plan serve every length up to it, "
                "or pad inputs to the captured size"
            )
        changed = [
            f"{path} from {old!r} to {new!r}"
            for path, old, new in zip(call.paths, self._first_call.leaves, call.leaves)
            if not isinstance(new, torch.Tensor) and old != new
        ]
        if changed:
            raise InputError(
                f"non-tensor arguments changed: {'; '.join(changed)}. Non-tensor arguments are constants of the "
                "captured graph; keep them fixed or pass the value as a tensor"
            )
        if self.module.training and not self.captured.training:
            raise InputError(
                "the model was first called in eval mode, so its graph was captured without training behaviour "
                "(dropout, batch statistics); call it in train mode first, or wrap a fresh model for training"
            )
        if autocast_state() != self.captured.autocast:
            raise InputError(
                f"autocast settings changed since the first call (captured with {self.captured.autocast}, now "
                f"{autocast_state()}); the casts are part of the captured graph. Call the model under the same "
                "torch.autocast settings every time"
            )

    # ---- user-facing helpers -------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters this rank holds and trains."""
        if not self._ready:
            return list(self.module.parameters())
        return list(self.stage.trainable.values())

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Like DDP's no_sync: backwards of calls made inside accumulate locally; the next synced one reduces all."""
        self._no_sync_depth += 1
        try:
            yield
        finally:
            self._no_sync_depth -= 1

    def delay_grad_allreduce(self, delay: bool) -> None:
        """pyrannc's switch: keep gradients local until `allreduce_grads()` is called (or a backward runs after
        the switch is turned off). It counts when backward runs, so it may be flipped between forward and backward."""
        self._delay_allreduce = bool(delay)
        self._sync_choice_to_last_call()

    def allreduce_grads(self) -> None:
        """All-reduce the gradients accumulated while syncing was delayed (every rank must call it)."""
        if self._ready:
            self.stage.sync_grads()

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip gradients by their global norm over all ranks (replicated and tied parameters counted once).

        Call on every rank after backward (and after `allreduce_grads()` when syncing was delayed).
        """
        if not self._ready:
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm, norm_type)
        # a sharded stage's gradient lives on its parameter's owner: that rank counts it
        counting = {**self._rank_sets, **{name: (rank,) for name, rank in self._shards.owner.items()}}
        return clip_global_grad_norm(self.stage, counting, max_norm, norm_type)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.module.zero_grad(set_to_none=set_to_none)

    def train(self, mode: bool = True) -> RaNNCModule:
        self.module.train(mode)
        return self

    def eval(self) -> RaNNCModule:
        return self.train(False)

    def save_deployment(self, path: str) -> None:
        if self.deployment is None:
            raise RanncError("no deployment yet: call the model once (which plans it) before save_deployment")
        _save_on_rank0(self.deployment, path, self.world_size)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a full state dict (as the unwrapped model's) on every rank; each keeps what it holds."""
        if not self._ready:
            self.module.load_state_dict(state_dict, strict=strict)
            return
        expected = set(self.module.state_dict(keep_vars=True))
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if strict and (missing or unexpected):
            raise RanncError(
                f"state dict keys do not match the model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}; load a state dict saved from the same model (or pass strict=False)"
            )
        mismatched = [
            f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from the state dict, the "
            f"shape in the model is {tuple(self._shapes[name][0])}"
            for key, value in state_dict.items()
            if (name := self._alias_of.get(key, key)) in self._shapes
            and tuple(value.shape) != tuple(self._shapes[name][0])
        ]
        if mismatched:  # checked against the full shapes: most tensors here are empty placeholders
            raise RanncError(
                f"error(s) in loading the state dict: {'; '.join(mismatched)}. Load a state dict saved from the same "
                "model (the same sizes)"
            )
        with torch.no_grad():
            for key, value in state_dict.items():
                name = self._alias_of.get(key, key)
                tensor = self._tensors.get(name)
                if tensor is not None and tensor.numel() > 0:
                    tensor.copy_(value.to(tensor.device))

    def save_sharded(self, path: str) -> None:
        """Collective: write a sharded checkpoint (model and optimizer) with torch.distributed.checkpoint.

        Each rank writes what it holds, so nothing is gathered on one rank; replicated tensors are written
        once. Load it with `load_sharded` on any world size or plan. The save is atomic: the checkpoint at `path`
        is replaced only once the new one is complete, so an interrupted save leaves the previous one loadable.
        """
        if not self._ready:
            raise RanncError("save_sharded needs a partitioned model: call the model once before saving")
        with (
            failures.in_call("save_sharded()"),
            failures.reported(),
            failures.explained(lambda: "saving a sharded checkpoint"),
        ):
            save_sharded(path, local_state(self._tensors, self._local, self.optimizer))

    def load_sharded(self, path: str) -> None:
        """Collective: load a checkpoint written by `save_sharded` (possibly on another world size or plan).

        Before the first call the load is deferred until the model has been partitioned.
        """
        if not self._ready:
            check_complete(path)  # at once, not after capture and profiling
            self._pending_load = path
            return
        with (
            failures.in_call("load_sharded()"),
            failures.reported(),
            failures.explained(lambda: "loading a sharded checkpoint"),
        ):
            load_sharded(path, self._tensors, self._local, self.optimizer)

    def state_dict(
        self, *, rank0_only: bool = True, amp_master_params: bool = True
    ) -> dict[str, torch.Tensor]:
        """Call on every rank: rank 0 returns the full state under the original names, others an empty dict
        (with `rank0_only=False` every rank gets it). `amp_master_params` is pyrannc's and changes nothing here
        (as in pyrannc without apex: parameters are the master values)."""
        if not self._ready:
            out = self.module.state_dict() if self.rank == 0 else {}
        else:
            with failures.in_call("state_dict()"), failures.reported():
                gathered = self._gather_to_rank0(lambda t: t)
            out = OrderedDict()
            if self.rank == 0:
                for key in self.module.state_dict(keep_vars=True):
                    canonical = self._alias_of.get(key, key)
                    out[key] = gathered.get(canonical, gathered.get(key))
        if not rank0_only and self.world_size > 1:
            shared: list[Any] = [out]
            dist.broadcast_object_list(shared, src=0)
            out = shared[0]
        return out

    def _gather_to_rank0(self, select: Any) -> dict[str, torch.Tensor]:
        """`select(tensor)` of every parameter and buffer, from the rank that holds it, collected on rank 0."""
        gathered: dict[str, torch.Tensor] = {}
        plan = self.deployment.plan
        for name in sorted(self._tensors):
            stage = self.layout.owner.get(name)
            owner = 0 if stage is None else self._source_rank(name, plan.stages[stage].ranks[0])
            if self.rank == owner:
                value = select(self._tensors[name])
                present = value is not None
                if owner == 0:
                    if present:
                        gathered[name] = value.detach().cpu().clone()
                    continue
                sends = [torch.tensor([int(present)], device=self.device)]
                sends += [value.detach().contiguous()] if present else []
                for tensor in sends:
                    _p2p(dist.isend, tensor, 0, lambda name=name: f"sending {name} to rank 0")
            elif self.rank == 0:
                flag = torch.zeros(1, dtype=torch.int64, device=self.device)
                _p2p(
                    dist.irecv,
                    flag,
                    owner,
                    lambda name=name, owner=owner: f"receiving {name} from rank {owner}",
                )
                if flag.item():
                    shape, dtype = self._shapes[name]
                    buf = torch.empty(shape, dtype=dtype, device=self.device)
                    _p2p(
                        dist.irecv,
                        buf,
                        owner,
                        lambda name=name, owner=owner: f"receiving {name} from rank {owner}",
                    )
                    gathered[name] = buf.cpu()
        return gathered

    # ---- pyrannc compatibility -----------------------------------------------------------------------
    # A RaNNC script runs unchanged after `import rannc as pyrannc` (see also rannc/compat.py). Methods that
    # return values of the whole model are collectives: every rank calls them, in the same order.

    def named_parameters(self, *, from_global: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's parameters (those its stage uses; all of them before the first call) as (name, Parameter).

        `from_global=True` (collective): every parameter of the whole model under its original name, with its full
        current value on every rank, as CPU copies (changing them does not change the model: load_state_dict does).
        """
        named = list(self.module.named_parameters())
        if from_global:
            values = self._full_values([name for name, _ in named], lambda t: t)
            return iter([(name, values[name]) for name, _ in named])
        if not self._ready:
            return iter(named)
        return iter([(name, param) for name, param in named if name in self._local])

    def get_param(self, name: str, amp_master_param: bool = False) -> torch.Tensor:
        """Collective: the full current value of parameter (or buffer) `name` on every rank, as a CPU copy.

        Like pyrannc's get_param (amp_master_param=False), whichever ranks hold it after partitioning."""
        _refuse_amp_master("get_param", amp_master_param)
        canonical = self._canonical_name(name)
        return self._full_values([canonical], lambda t: t)[canonical]

    def get_param_grad(self, name: str, amp_master_param: bool = False) -> torch.Tensor | None:
        """Collective: the gradient of parameter `name` on every rank (a CPU copy), None while it has none.

        Call it after backward; while gradient all-reduce is delayed it is the holder's unreduced gradient."""
        _refuse_amp_master("get_param_grad", amp_master_param)
        canonical = self._canonical_name(name)
        return self._full_values([canonical], lambda t: t.grad)[canonical]

    def undeploy(self) -> None:
        """Collective: give the wrapped model back whole. Every rank gets every parameter and buffer with its
        current value on its device, the optimizer passed in gets back every parameter with its full state, and
        gradients are dropped; the next call captures and plans again. `rannc.clear()` undeploys every module."""
        if not self._ready:
            return
        full = self._full_values(
            sorted(self._tensors), lambda t: t, device=self.device
        )  # same order everywhere
        for name, value in full.items():
            if name not in self._local:
                self._tensors[name].data = value
        for param in self.module.parameters():
            param.grad = None
        if self.optimizer_binding is not None:
            self.optimizer_binding.unbind()
            self.optimizer_binding = None
        self._groups.destroy()
        self._ready = False
        self.stage = None
        self.deployment = None
        self._last_call = None
        logger.info("rank %d: model undeployed", self.rank)

    def to(self, *args: Any, **kwargs: Any) -> RaNNCModule:
        """Ignored, as in pyrannc: rannc places each stage on its rank's device (cuda:LOCAL_RANK or the CPU)."""
        logger.warning("RaNNCModule.to() is ignored: rannc places each stage on its rank's device")
        return self

    def cuda(self, *args: Any, **kwargs: Any) -> RaNNCModule:
        """Ignored, as in pyrannc: rannc places each stage on its rank's device (cuda:LOCAL_RANK or the CPU)."""
        logger.warning("RaNNCModule.cuda() is ignored: rannc places each stage on its rank's device")
        return self

    def enable_dropout(self, enable: bool) -> None:
        """pyrannc's substitute for train()/eval(), which work here."""
        raise RanncError(
            f"enable_dropout({enable}) is pyrannc's substitute for train()/eval(); call model.train() or "
            "model.eval() instead: they switch dropout (and batch norm) as on the unwrapped model"
        )

    def _canonical_name(self, name: str) -> str:
        """The name rannc keeps a parameter or buffer under (tied weights: the first of their names)."""
        named = dict(self.module.named_parameters(remove_duplicate=False))
        named.update(dict(self.module.named_buffers(remove_duplicate=False)))
        if name not in named:
            examples = ", ".join(list(named)[:3])
            raise RanncError(
                f"the wrapped model has no parameter or buffer named {name!r}; use the unwrapped model's names "
                f"(named_parameters(), named_buffers()), e.g. {examples}"
            )
        first = {id(t): n for n, t in reversed(list(named.items()))}
        return first[id(named[name])] if not self._ready else self._alias_of.get(name, name)

    def _full_values(
        self, names: list[str], select: Any, device: torch.device | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Collective: `select(tensor)` of each named parameter or buffer, from a rank that holds it, on every
        rank (CPU copies, or on `device`); None where it is None (e.g. no gradient yet)."""
        tensors = _named_tensors(self.module) if not self._ready else self._tensors
        out: dict[str, torch.Tensor | None] = {}
        for name in names:
            stage = self.layout.owner.get(name) if self._ready else None
            if stage is None:  # not partitioned (yet), or used by no stage: every rank has the whole tensor
                value = select(tensors[name])
                out[name] = None if value is None else value.detach().to(device or "cpu", copy=True)
                continue
            src = self._source_rank(name, self.deployment.plan.stages[stage].ranks[0])
            value = select(tensors[name]) if self.rank == src else None
            present = torch.tensor([int(value is not None)], device=self.device)
            if self.world_size > 1:
                dist.broadcast(present, src=src)
            if not present.item():
                out[name] = None
                continue
            if self.rank == src:
                buffer = value.detach().to(self.device, copy=True).contiguous()
            else:
                shape, dtype = self._shapes[name]
                buffer = torch.empty(shape, dtype=dtype, device=self.device)
            if self.world_size > 1:
                dist.broadcast(buffer, src=src)
            out[name] = buffer.to(device or "cpu")
        return out

    def _source_rank(self, name: str, first_replica: int) -> int:
        """The rank whose copy of `name` (and of its gradient) is authoritative: a sharded parameter's owner,
        else the first replica of the stage that owns it."""
        return self._shards.owner.get(name, first_replica)

    def _agree_on_initial_state(self) -> None:
        """Every rank starts from the same weights: rank 0's are copied to all with pyrannc's
        sync_params_on_init(True), else they are compared (and differing ones refused)."""
        if not compat.SETTINGS.sync_params_on_init:
            _check_same_model(self.module, self.world_size)
            return
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in _named_tensors(self.module).values():
                if tensor.is_meta:  # its values come from load_weights / init_weights, alike on every rank
                    continue
                buffer = tensor.detach().to(self.device, copy=True)
                dist.broadcast(buffer, src=0)
                tensor.copy_(buffer)

    def _sync_choice_to_last_call(self) -> None:
        """Apply the delay switch to the last call if its backward has not run: pyrannc decides at backward."""
        call = self._last_call() if self._last_call is not None else None
        if call is None:
            return
        sync = not (self._delay_allreduce or self._last_call_in_no_sync)
        if not sync and call.overlapped is not None:
            return  # its reduce started during the 1F1B forward; it completes in backward (the sum is the same)
        call.sync_grads = sync


def _refuse_amp_master(method: str, amp_master_param: bool) -> None:
    if amp_master_param:
        raise ConfigError(
            f"{method}(amp_master_param=True) asks for apex AMP master parameters, which do not exist here: "
            "parameters stay in fp32 under torch.autocast, so drop amp_master_param"
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


def _placeholder(leaf: Any) -> Any:
    """A leaf shaped like the first call's (one sample), standing in for a refused call's in the step exchange."""
    if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
        return torch.zeros((1, *leaf.shape[1:]), dtype=leaf.dtype)
    return leaf


def _p2p(op: Any, tensor: torch.Tensor, peer: int, describe: Any) -> None:
    """One send or receive that waits at most comm_timeout_s and names the rank at fault when it fails."""
    with failures.guarded(describe):
        work = op(tensor, peer)
    failures.wait_all([work], describe)


def _save_on_rank0(deployment: Deployment, path: str, world_size: int) -> None:
    """Rank 0 writes; a refusal (e.g. the path holds a user's file) is raised on every rank."""
    outcome: list[Any] = [None]
    if rdist.get_rank() == 0:
        try:
            save_deployment(deployment, path)
        except Exception as exc:  # reported on every rank below
            outcome[0] = (type(exc).__name__, str(exc))
    if world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        kind, message = outcome[0]
        raise DeploymentError(f"saving the deployment failed on rank 0 ({kind}): {message}")


def _fits(
    shape: tuple[int, ...], captured: tuple[int, ...], leaf: int, dynamic: set[tuple[int, int]]
) -> bool:
    """A per-sample shape the captured graph serves: equal sizes, or at most the maximum on dynamic dims."""
    if len(shape) != len(captured):
        return False
    return all(
        size <= limit if (leaf, dim) in dynamic else size == limit
        for dim, (size, limit) in enumerate(zip(shape, captured), start=1)
    )


class _AveragedGradient(torch.autograd.Function):
    """The identity whose backward divides by the world size: the gradient of the average over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.world_size = world_size
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.world_size, None


def _returned_input(leaf: Any, world_size: int) -> Any:
    """An argument the model returns unchanged: this rank's own value. Its gradient is, like every input's, that of
    the average over ranks of each rank's loss (DDP's contract for parameters); a leaf that needs no gradient is
    returned as it is."""
    if isinstance(leaf, torch.Tensor) and leaf.requires_grad and torch.is_grad_enabled() and world_size > 1:
        return _AveragedGradient.apply(leaf, world_size)
    return leaf


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        out.setdefault(name, tensor)
    return out


def _check_same_model(model: torch.nn.Module, world_size: int) -> None:
    """Every rank must start from the same weights (same seed); compare a hash of all of them."""
    if world_size == 1:
        return
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        if tensor.is_meta:  # no values yet: they come from load_weights / init_weights, alike on every rank
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            continue
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    hashes: list[str | None] = [None] * world_size
    dist.all_gather_object(hashes, digest.hexdigest())
    differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differing:
        raise RanncError(
            f"the wrapped model differs across ranks: ranks {differing} have other parameters or buffers than "
            "rank 0. Build the model identically on every rank (e.g. torch.manual_seed before construction)"
        )
