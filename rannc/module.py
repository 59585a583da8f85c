"""RaNNCModule: wrap a model; on the first call capture, profile, plan and deploy it; then run the pipeline."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from . import partition
from .capture import FlatCall
from .config import Config, load_config
from .deploy import Deployment, save_deployment
from .errors import InputError, RanncError
from .runtime import dist as rdist
from .runtime.build import build_local_stage, stage_layout
from .runtime.gather import gather_global_batch
from .runtime.pipeline import PipelineCall
from .runtime.step import run_call

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
        **config_overrides: Any,
    ) -> None:
        if isinstance(model, RaNNCModule) or isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RanncError(
                f"the model is already wrapped by {type(model).__name__}; pass the plain nn.Module to RaNNCModule"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"RaNNCModule wraps a torch.nn.Module, got {type(model).__name__}")
        self.module = model
        self.optimizer = optimizer
        self.config = (
            config.replace(**config_overrides) if config is not None else load_config(**config_overrides)
        )
        rdist.ensure_initialized(self.config.timeout_s)
        self.rank = rdist.get_rank()
        self.world_size = rdist.get_world_size()
        self.device = rdist.local_device()
        self.deployment: Deployment | None = None
        self._ready = False
        self._training = model.training

    # ---- set-up on the first call ------------------------------------------------------------------
    def _setup(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        _check_same_model(self.module, self.world_size)
        result = partition.partition(self.module, args, kwargs, self.config, self.world_size, self.device)
        self.captured, self.analysis, self.deployment = result.captured, result.analysis, result.deployment
        if self.config.save_deployment and self.rank == 0:
            save_deployment(self.deployment, self.config.deployment_file)
        plan = self.deployment.plan
        stage_ranks = [list(stage.ranks) for stage in plan.stages]
        self.layout = stage_layout(self.captured, self.analysis, self.deployment.stage_nodes)
        self._tensors = _named_tensors(self.module)
        self._shapes = {name: (t.shape, t.dtype) for name, t in self._tensors.items()}
        my_stage = plan.stage_of_rank(self.rank)
        local = {name for name, stages in self.layout.holders.items() if my_stage in stages}
        self._local = local
        for name, tensor in self._tensors.items():
            if name in local:
                tensor.data = tensor.data.to(self.device)
            elif name in self.layout.holders:
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)  # lives on other ranks
        self.stage = build_local_stage(
            self.captured,
            self.analysis,
            self.layout,
            stage_ranks,
            self.rank,
            self._tensors,
            self.device,
            rdist.GroupCache(),
        )
        self._restrict_optimizer()
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

    def _restrict_optimizer(self) -> None:
        """The user's optimizer steps only parameters this rank holds (others were moved away)."""
        if self.optimizer is None:
            return
        away = {
            id(t)
            for name, t in self._tensors.items()
            if name in self.layout.holders and name not in self._local
        }
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in away]
        for param in list(self.optimizer.state):
            if id(param) in away:
                del self.optimizer.state[param]

    # ---- every call ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._ready:
            self._setup(args, kwargs)
        call = FlatCall.of(args, kwargs)
        self._check_call(call)
        batch = gather_global_batch(call.leaves, self.device, self.world_size)
        plan = self.deployment.plan
        mode = (
            "inference"
            if not torch.is_grad_enabled()
            else ("eager" if plan.schedule == "1f1b" else "deferred")
        )
        pipeline = PipelineCall(self.stage, batch, plan.microbatches, plan.schedule, mode)
        grad_leaves = [
            (name, leaf)
            for name, leaf in zip(self.captured.user_inputs, call.leaves)
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad
        ]
        outputs = iter(run_call(pipeline, grad_leaves))
        flat = [next(outputs) if spec.node is not None else spec.constant for spec in self.stage.outputs]
        return pytree.tree_unflatten(flat, self.captured.out_spec)

    def _check_call(self, call: FlatCall) -> None:
        if call.spec != self.captured.call_spec:
            raise InputError(
                "the call's arguments differ in structure from the first call (positional/keyword names or "
                f"nesting): the model was captured for {self.captured.call_spec}, got {call.spec}. Pass the same "
                "arguments every call, or create a new RaNNCModule"
            )
        if call.constants() != self.captured.call_constants:
            raise InputError(
                f"non-tensor arguments changed from {self.captured.call_constants} to {call.constants()}; they are "
                "constants of the captured graph. Keep them fixed or pass them as tensors"
            )
        if self.module.training != self._training:
            logger.warning("train()/eval() changed after capture; the captured mode is used")

    # ---- user-facing helpers -------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters this rank holds and trains."""
        if not self._ready:
            return list(self.module.parameters())
        return list(self.stage.trainable.values())

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
        if self.rank == 0:
            save_deployment(self.deployment, path)
        rdist.barrier()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Call on every rank: rank 0 returns the full state under the original names, others an empty dict."""
        if not self._ready:
            return self.module.state_dict() if self.rank == 0 else {}
        gathered: dict[str, torch.Tensor] = {}
        plan = self.deployment.plan
        for name in sorted(self._tensors):
            tensor = self._tensors[name]
            stage = self.layout.owner.get(name)
            owner = 0 if stage is None else plan.stages[stage].ranks[0]
            if owner == 0:
                if self.rank == 0:
                    gathered[name] = tensor.detach().cpu().clone()
                continue
            if self.rank == owner:
                dist.send(tensor.detach().contiguous(), dst=0)
            elif self.rank == 0:
                shape, dtype = self._shapes[name]
                buf = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(buf, src=owner)
                gathered[name] = buf.cpu()
        if self.rank != 0:
            return {}
        out: dict[str, torch.Tensor] = OrderedDict()
        for key in self.module.state_dict(keep_vars=True):
            canonical = self.captured.aliases and _canonical(self.captured.aliases, key)
            out[key] = gathered.get(canonical, gathered.get(key))
        return out


def _canonical(aliases: dict[str, list[str]], key: str) -> str:
    for canonical, names in aliases.items():
        if key in names:
            return canonical
    return key


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
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    hashes: list[str | None] = [None] * world_size
    dist.all_gather_object(hashes, digest.hexdigest())
    differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differing:
        raise RanncError(
            f"the wrapped model differs across ranks: ranks {differing} have other parameters or buffers than "
            "rank 0. Build the model identically on every rank (e.g. torch.manual_seed before construction)"
        )
