"""RaNNCModule: wrap a model; on the first call capture, profile, plan and deploy it; then run the pipeline."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import amp, compat, partition
from .capture import CapturedGraph, FlatCall
from .config import Config, load_config
from .deploy import Deployment, save_deployment
from .errors import ConfigError, DeploymentError, RanncError
from .host_memory import keep_freed_host_memory
from .runtime import dist as rdist
from .runtime import failures
from .runtime.checkpoint import check_complete
from .runtime.collect import ModelTensors, agree_on_initial_state, on_rank0, rank0_value
from .runtime.job import Job, Weights, untouched_random_state
from .runtime.optimizer import accept_from_global, check_model_parameters
from .runtime.pipeline import PipelineCall, PipelineMode
from .runtime.stage import LocalStage
from .runtime.trace import current_tracer
from .runtime.weights import InitWeights, is_meta_model
from .verify import Verifier

logger = logging.getLogger(__name__)


class RaNNCModule:
    """Train an unmodified ``nn.Module`` over all ranks of a torch.distributed job.

    Example::

        model = rannc.RaNNCModule(model, optimizer)        # torchrun --nproc-per-node N train.py
        loss = model(input_ids, labels)                    # this rank's local batch
        loss.backward(); optimizer.step(); optimizer.zero_grad()

    The first call captures the model, profiles its blocks, plans stages x replicas x microbatches and
    deploys this rank's stage (a `Job`). Keyword arguments override config items (see ``rannc.config.Config``).
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
        self._weights = Weights(load_weights, init_weights)
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
        self._job: Job | None = None  # the first call deploys the model; `undeploy` gives it back
        self._verifier: Verifier | None = None
        self._delay_allreduce = compat.SETTINGS.delay_grad_allreduce  # pyrannc's delay_grad_allreduce
        self._no_sync_depth = 0
        self._steps = 0
        self._pending_load: str | None = None
        self._last_call: weakref.ref[PipelineCall] | None = None  # whose backward may not have run yet
        self._last_call_in_no_sync = False
        compat.register(self)

    @property
    def deployment(self) -> Deployment | None:
        """The plan this model runs (None before the first call)."""
        return None if self._job is None else self._job.deployment

    @property
    def stage(self) -> LocalStage | None:
        """This rank's stage (None before the first call)."""
        return None if self._job is None else self._job.stage

    @property
    def captured(self) -> CapturedGraph | None:
        """The graph captured at the first call (None before it)."""
        return None if self._job is None else self._job.captured

    # ---- set-up on the first call ------------------------------------------------------------------
    def _deploy(self, args: tuple[Any, ...], kwargs: dict[str, Any], call: FlatCall) -> Job:
        """The first call (collective): agree on the initial weights, partition the model (capture, profile,
        plan) and deploy this rank's part of it."""
        agree_on_initial_state(self.module, self.device, self.world_size, compat.SETTINGS.sync_params_on_init)
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
        if self.config.save_deployment:
            self._save_on_rank0(result.deployment, self.config.deployment_file)
        job = Job.deploy(
            self.module,
            self.optimizer,
            (result.captured, result.analysis, result.deployment),
            call,
            self.config,
            self._weights,
            meta=self._meta,
            pending_load=self._pending_load,
        )
        self._pending_load = None
        logger.info(job.describe())
        return job

    # ---- every call ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        failures.forward_starts(self._steps + 1)
        with failures.in_call("the forward"), failures.reported():
            return self._forward(args, kwargs)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = FlatCall.of(args, kwargs)
        if self._job is None:
            with untouched_random_state(self.device):  # capture and profiling draw random numbers
                self._job = self._deploy(args, kwargs, call)
        job = self._job
        refusal = job.refusal(call)
        current_tracer().flush()  # a traced forward whose backward never ran
        with current_tracer().span("gather_inputs"):  # RANNC_TRACE: part of this step's trace
            batch = job.gather(call, refusal)
        self._steps += 1  # a refused call is no step: every rank refused it
        pipeline = job.pipeline_call(batch, sync_grads=not (self._delay_allreduce or self._no_sync_depth > 0))
        self._last_call, self._last_call_in_no_sync = weakref.ref(pipeline), self._no_sync_depth > 0
        verifier = self._verifier
        verifying = verifier is not None and not verifier.done and pipeline.mode != PipelineMode.INFERENCE
        if verifying:
            verifier.run_reference(batch.leaves, call.spec)
            job.stage.after_sync = lambda: verifier.compare_grads(
                job.placement.gather_to_rank0(lambda t: t.grad)
            )
        flat = job.run(pipeline, call)
        if verifying:
            verifier.compare_outputs(flat, batch.local_rows(self.rank))
        return pytree.tree_unflatten(flat, job.captured.out_spec)

    # ---- user-facing helpers -------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters this rank holds and trains."""
        if self._job is None:
            return list(self.module.parameters())
        return list(self._job.stage.trainable.values())

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
        if self._job is not None:
            self._job.stage.sync_grads()

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip gradients by their global norm over all ranks (replicated and tied parameters counted once).

        Call on every rank after backward (and after `allreduce_grads()` when syncing was delayed).
        """
        if self._job is None:
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm, norm_type)
        return self._job.clip_grad_norm(max_norm, norm_type)

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
        self._save_on_rank0(self.deployment, path)

    def _save_on_rank0(self, deployment: Deployment, path: str) -> None:
        """Rank 0 writes; a refusal (e.g. the path holds a user's file) is raised on every rank."""
        failed = on_rank0(lambda: save_deployment(deployment, path), self.rank, self.world_size)
        if failed is not None:
            kind, message = failed
            raise DeploymentError(f"saving the deployment failed on rank 0 ({kind}): {message}")

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a full state dict (as the unwrapped model's) on every rank; each keeps what it holds."""
        if self._job is None:
            self.module.load_state_dict(state_dict, strict=strict)
        else:
            self._job.load_state_dict(state_dict, strict)

    def save_sharded(self, path: str) -> None:
        """Collective: write a sharded checkpoint (model and optimizer) with torch.distributed.checkpoint.

        Each rank writes what it holds, so nothing is gathered on one rank; replicated tensors are written
        once. Load it with `load_sharded` on any world size or plan. The save is atomic: the checkpoint at `path`
        is replaced only once the new one is complete, so an interrupted save leaves the previous one loadable.
        """
        if self._job is None:
            raise RanncError("save_sharded needs a partitioned model: call the model once before saving")
        with (
            failures.in_call("save_sharded()"),
            failures.reported(),
            failures.explained(lambda: "saving a sharded checkpoint"),
        ):
            self._job.save_sharded(path)

    def load_sharded(self, path: str) -> None:
        """Collective: load a checkpoint written by `save_sharded` (possibly on another world size or plan).

        Before the first call the load is deferred until the model has been partitioned.
        """
        if self._job is None:
            check_complete(path)  # at once, not after capture and profiling
            self._pending_load = path
            return
        with (
            failures.in_call("load_sharded()"),
            failures.reported(),
            failures.explained(lambda: "loading a sharded checkpoint"),
        ):
            self._job.load_sharded(path)

    def state_dict(
        self, *, rank0_only: bool = True, amp_master_params: bool = True
    ) -> dict[str, torch.Tensor]:
        """Call on every rank: rank 0 returns the full state under the original names, others an empty dict
        (with `rank0_only=False` every rank gets it). `amp_master_params` is pyrannc's and changes nothing here
        (as in pyrannc without apex: parameters are the master values)."""
        if self._job is None:
            out = self.module.state_dict() if self.rank == 0 else {}
        else:
            with failures.in_call("state_dict()"), failures.reported():
                out = self._job.state_dict()
        return out if rank0_only else rank0_value(out, self.world_size)

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
            values = self._model_tensors().full_values([name for name, _ in named], lambda t: t)
            return iter([(name, values[name]) for name, _ in named])
        if self._job is None:
            return iter(named)
        return iter([(name, param) for name, param in named if name in self._job.local])

    def get_param(self, name: str, amp_master_param: bool = False) -> torch.Tensor:
        """Collective: the full current value of parameter (or buffer) `name` on every rank, as a CPU copy.

        Like pyrannc's get_param (amp_master_param=False), whichever ranks hold it after partitioning."""
        _refuse_amp_master("get_param", amp_master_param)
        canonical = self._canonical_name(name)
        return self._model_tensors().full_values([canonical], lambda t: t)[canonical]

    def get_param_grad(self, name: str, amp_master_param: bool = False) -> torch.Tensor | None:
        """Collective: the gradient of parameter `name` on every rank (a CPU copy), None while it has none.

        Call it after backward; while gradient all-reduce is delayed it is the holder's unreduced gradient."""
        _refuse_amp_master("get_param_grad", amp_master_param)
        canonical = self._canonical_name(name)
        return self._model_tensors().full_values([canonical], lambda t: t.grad)[canonical]

    def undeploy(self) -> None:
        """Collective: give the wrapped model back whole. Every rank gets every parameter and buffer with its
        current value on its device, the optimizer passed in gets back every parameter with its full state, and
        gradients are dropped; the next call captures and plans again. `rannc.clear()` undeploys every module."""
        if self._job is None:
            return
        self._job.undeploy()
        self._job = None
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
        if self._job is not None:
            return self._job.alias_of.get(name, name)
        first = {id(t): n for n, t in reversed(list(named.items()))}
        return first[id(named[name])]

    def _model_tensors(self) -> ModelTensors:
        """The model's tensors and where their values are: the job's, or (before the first call) every rank's."""
        if self._job is not None:
            return self._job.placement
        return ModelTensors.whole(self.module, self.rank, self.world_size, self.device)

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
