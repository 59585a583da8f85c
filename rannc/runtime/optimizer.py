"""The user's optimizer on a partitioned model: local parameter groups, ZeRO-1 shards, global state dicts."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..errors import RanncError
from ..profile.devices import OPTIMIZER_CHUNK_BYTES
from .dist import GroupCache
from .grad_sync import GRADIENTS
from .sharding import ShardAssignment


class OptimizerBinding:
    """Restricts the user's optimizer to this rank's parameters and gives it global `state_dict` modes.

    Every parameter lives on a rank set (the replicas of every stage that uses it). Without ZeRO each of
    those ranks steps it; with ZeRO-1 one rank of the set owns its optimizer state, steps it and broadcasts
    the new values after `optimizer.step()`. When the rank steps more than `chunk_bytes` of parameters with a
    torch.optim optimizer (`steps_in_chunks`), `optimizer.step()` updates them a chunk at a time (`_chunked_step`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        canonical_of: dict[int, str],  # id(parameter) -> canonical name
        rank_sets: dict[
            str, tuple[int, ...]
        ],  # canonical name -> ranks holding it (absent: unused everywhere)
        sizes: dict[str, int],  # canonical name -> bytes
        tensors: dict[str, torch.Tensor],
        rank: int,
        zero: bool,
        groups: GroupCache,
        shards: ShardAssignment | None = None,  # sharded stages' parameters and owners (their ZeRO level)
        chunk_bytes: float | None = None,  # None: OPTIMIZER_CHUNK_BYTES (what the planner charges); 0: never
    ) -> None:
        self.optimizer = optimizer
        self.rank = rank
        self.zero = zero
        self.tensors = tensors
        self.groups = groups
        self.rank_sets = rank_sets
        check_model_parameters(optimizer, set(canonical_of))  # e.g. a param group added after wrapping
        self.group_names = [[canonical_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        flat = [name for names in self.group_names for name in names]
        self.index_of = {name: k for k, name in enumerate(flat)}
        levels = shards.levels if shards is not None else {}
        self.owner = _owners(flat, rank_sets, sizes, zero)
        self.owner.update({n: r for n, r in (shards.owner if shards else {}).items() if n in self.owner})
        sharded = {name for name in flat if zero or name in levels}  # optimizer state on the owner only
        self.keep = {
            name
            for name in flat
            if name not in rank_sets
            or (rank in rank_sets[name] and (name not in sharded or self.owner[name] == rank))
        }
        by_set: dict[tuple[int, ...], list[str]] = {}
        for name, ranks in rank_sets.items():
            # the owner broadcasts what it stepped; a ZeRO-3 parameter lives on its owner only
            if len(ranks) > 1 and rank in ranks and name in sharded and name not in shards_gathered(shards):
                by_set.setdefault(ranks, []).append(name)
        # Grouped once, in the same order on every rank: broadcasts run after every optimizer step.
        self.broadcast_sets = [(ranks, sorted(by_set[ranks])) for ranks in sorted(by_set)]
        self._restrict()
        self._original_state_dict = type(optimizer).state_dict.__get__(optimizer)
        self._original_load_state_dict = type(optimizer).load_state_dict.__get__(optimizer)
        optimizer.state_dict = types.MethodType(_state_dict, self)  # type: ignore[method-assign]
        optimizer.load_state_dict = types.MethodType(_load_state_dict, self)  # type: ignore[method-assign]
        optimizer._rannc_binding = self  # type: ignore[attr-defined]  # GradScalers agree across ranks
        self.away = {id(tensors[n]): n for n in rank_sets if n in tensors and rank not in rank_sets[n]}
        self._hooks = [optimizer.register_step_pre_hook(lambda *_: self.check_local())]
        if self.broadcast_sets:
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.broadcast_owned()))
        # optimizer.step() steps the rank's parameters a chunk at a time when they are more than a chunk
        self._step_before = optimizer.__dict__.get("step")  # an LR scheduler's wrapper, made before wrapping
        chunk_bytes = OPTIMIZER_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        local = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
        self.chunked = chunk_bytes > 0 and local > chunk_bytes and steps_in_chunks(optimizer)
        if self.chunked:
            tracked = getattr(self._step_before, "_wrapped_by_lr_sched", False)
            step = _chunked_step(chunk_bytes, tracked)
            optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]

    def _restrict(self) -> None:
        by_id = {id(self.tensors[n]): n for n in self.index_of if n in self.tensors}
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if by_id.get(id(p)) in self.keep]
        kept = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        for param in list(self.optimizer.state):
            if id(param) not in kept:
                del self.optimizer.state[param]
            else:  # a state loaded before wrapping follows its parameter to the device
                state = self.optimizer.state[param]
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        state[key] = value.to(param.device)

    def check_local(self) -> None:
        """Refuse to step parameters that live on other ranks (their local copy is an empty placeholder)."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if id(param) in self.away:
                    raise RanncError(
                        f"the optimizer steps parameter {self.away[id(param)]}, which rannc moved to ranks "
                        f"{list(self.rank_sets[self.away[id(param)]])}; this rank holds an empty placeholder. Build "
                        "optimizers from RaNNCModule.parameters() (this rank's parameters) or pass the optimizer "
                        "to RaNNCModule, which restricts it for you"
                    )

    def broadcast_owned(self) -> None:
        """ZeRO-1: each parameter's owner sends its updated value to the other ranks of its set."""
        for ranks, names in self.broadcast_sets:
            group = self.groups.get(ranks, GRADIENTS)  # created (on every rank) with the gradient groups
            for name in names:
                dist.broadcast(self.tensors[name].data, src=self.owner[name], group=group)

    def unbind(self) -> None:
        """Collective: give the optimizer back every parameter with its full state on every rank (after the
        parameters themselves are whole again), as the optimizer of the unwrapped model would have it."""
        full: list[Any] = [_state_dict(self, from_global=True)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(full, src=0)
        for hook in self._hooks:
            hook.remove()
        for group, names in zip(self.optimizer.param_groups, self.group_names):
            group["params"] = [self.tensors[name] for name in names]
        self.optimizer.state.clear()
        for attribute in ("state_dict", "load_state_dict", "_rannc_binding"):
            self.optimizer.__dict__.pop(attribute, None)
        if self.chunked:
            self.optimizer.__dict__.pop("step", None)
            if self._step_before is not None:
                self.optimizer.step = self._step_before  # type: ignore[method-assign]
        type(self.optimizer).load_state_dict(self.optimizer, full[0])
        accept_from_global(self.optimizer)

    def local_names(self) -> list[list[str]]:
        return [[n for n in names if n in self.keep] for names in self.group_names]


def shards_gathered(shards: ShardAssignment | None) -> frozenset[str]:
    return frozenset() if shards is None else shards.gathered


def check_model_parameters(optimizer: torch.optim.Optimizer, model_parameter_ids: set[int]) -> None:
    """Refuse an optimizer that steps tensors other than the model's (e.g. built over a copy of the model)."""
    held = [
        (g, k, p) for g, group in enumerate(optimizer.param_groups) for k, p in enumerate(group["params"])
    ]
    foreign = [(g, k, p) for g, k, p in held if id(p) not in model_parameter_ids]
    if not foreign:
        return
    group, index, first = foreign[0]
    raise RanncError(
        f"the optimizer's parameters are not the wrapped model's: {len(foreign)} of its {len(held)} parameters "
        f"(the first: param group {group}, index {index}, shape {tuple(first.shape)}) are not parameters of the "
        "model passed to RaNNCModule, so rannc could neither place nor step them. This happens when the "
        "optimizer was built over a copy of the model (copy.deepcopy, a model loaded again) or over another "
        "model: build it from the wrapped model's own parameters, e.g. "
        f"torch.optim.{type(optimizer).__name__}(model.parameters(), ...), and pass that model to RaNNCModule"
    )


def accept_from_global(optimizer: torch.optim.Optimizer) -> None:
    """Before the model is partitioned the optimizer still holds every parameter: `from_global` is a no-op."""
    state_dict = type(optimizer).state_dict.__get__(optimizer)
    load_state_dict = type(optimizer).load_state_dict.__get__(optimizer)

    def global_state_dict(from_global: bool = False) -> dict[str, Any]:
        return state_dict()

    def global_load_state_dict(state: dict[str, Any], from_global: bool = False) -> None:
        load_state_dict(_own_copy(state) if from_global else state)

    optimizer.state_dict = global_state_dict  # type: ignore[method-assign]
    optimizer.load_state_dict = global_load_state_dict  # type: ignore[method-assign]


def _owners(
    names: list[str], rank_sets: dict[str, tuple[int, ...]], sizes: dict[str, int], zero: bool
) -> dict[str, int]:
    """Who reports (and, with ZeRO, steps) each parameter's optimizer state: balanced by bytes for ZeRO."""
    owner: dict[str, int] = {}
    load: dict[int, int] = {}
    for name in sorted(names, key=lambda n: (-sizes.get(n, 0), n)):
        ranks = rank_sets.get(name)
        if not ranks:
            owner[name] = 0
        elif zero:
            chosen = min(ranks, key=lambda r: (load.get(r, 0), r))
            load[chosen] = load.get(chosen, 0) + sizes.get(name, 0)
            owner[name] = chosen
        else:
            owner[name] = min(ranks)
    return owner


def _state_dict(self: OptimizerBinding, from_global: bool = False) -> dict[str, Any]:
    """`from_global=True` (call on every rank): rank 0 gets the state dict the optimizer would have on the
    unwrapped model (indices in the original parameter order); other ranks get an empty dict."""
    if not from_global:
        return self._original_state_dict()
    local = self._original_state_dict()
    local_state = local["state"]
    mine: dict[int, dict[str, Any]] = {}
    for g, names in enumerate(self.local_names()):
        for k, name in zip(local["param_groups"][g]["params"], names):
            if self.owner[name] == self.rank and k in local_state:
                mine[self.index_of[name]] = {
                    key: value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
                    for key, value in local_state[k].items()
                }
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered: list[Any] = [None] * world if self.rank == 0 else []
    if world > 1:
        dist.gather_object(mine, gathered if self.rank == 0 else None, dst=0)
    else:
        gathered = [mine]
    if self.rank != 0:
        return {}
    state: dict[int, Any] = {}
    for part in gathered:
        state.update(part)
    groups = []
    for g, names in enumerate(self.group_names):
        hyper = {k: v for k, v in local["param_groups"][g].items() if k != "params"}
        groups.append({**hyper, "params": [self.index_of[n] for n in names]})
    return {"state": {k: state[k] for k in sorted(state)}, "param_groups": groups}


def _load_state_dict(self: OptimizerBinding, state_dict: dict[str, Any], from_global: bool = False) -> None:
    """`from_global=True`: load a full state dict (as the unwrapped optimizer would save it) on every rank."""
    if not from_global:
        self._original_load_state_dict(state_dict)
        return
    if len(state_dict["param_groups"]) != len(self.group_names):
        raise ValueError(
            f"the state dict has {len(state_dict['param_groups'])} parameter groups, the optimizer "
            f"{len(self.group_names)}; load a state dict saved from the same optimizer setup"
        )
    local_state: dict[int, Any] = {}
    groups = []
    counter = 0
    for g, names in enumerate(self.local_names()):
        indices = []
        for name in names:
            saved = state_dict["state"].get(
                self.index_of[name], state_dict["state"].get(str(self.index_of[name]))
            )
            if saved is not None:
                local_state[counter] = saved  # copied below, with the rest
            indices.append(counter)
            counter += 1
        hyper = {k: v for k, v in state_dict["param_groups"][g].items() if k != "params"}
        groups.append({**hyper, "params": indices})
    self._original_load_state_dict(_own_copy({"state": local_state, "param_groups": groups}))


def _own_copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` with copies of its state tensors, for a `from_global` load to keep.

    torch's Optimizer.load_state_dict keeps the given tensor itself as the state (e.g. the momentum buffer) when
    its dtype and device are the parameter's already, and steps it in place. A global state dict is the same
    for every rank and may be one tensor in memory shared by all of them: torch.multiprocessing (and
    multiprocessing with torch imported) moves the tensors of a spawned process's arguments to shared memory.
    Replicas that step the same parameter would then update one buffer, each once per step, and the resumed
    training would drift from the uninterrupted one (by ~1e-3 after two SGD-momentum steps on 2 replicas).
    """
    copied = {
        index: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for index, entry in state_dict["state"].items()
    }
    return {**state_dict, "state": copied}


def steps_in_chunks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether rannc steps this optimizer a chunk of parameters at a time when they are many: torch.optim's
    optimizers update each parameter from its own gradient and state alone (LBFGS, which needs them all, and
    other optimizers, which may couple parameters, are stepped whole)."""
    cls = type(optimizer)
    step = getattr(cls, "step", None)
    return (
        cls.__module__.startswith("torch.optim.")
        and not isinstance(optimizer, torch.optim.LBFGS)
        and getattr(step, "__wrapped__", None) is not None  # torch's hooked step: its body can run per chunk
    )


def parameter_chunks(groups: list[list[torch.Tensor]], limit: float) -> list[list[list[torch.Tensor]]]:
    """`groups` (the parameters of each param group, in order) cut into chunks of at most `limit` bytes (a larger
    tensor alone): per chunk, the parameters of each group it holds (in order; empty for the others)."""
    chunks: list[list[list[torch.Tensor]]] = []
    current: list[list[torch.Tensor]] = [[] for _ in groups]
    held = 0
    for g, params in enumerate(groups):
        for param in params:
            size = param.numel() * param.element_size()
            if held and held + size > limit:
                chunks.append(current)
                current, held = [[] for _ in groups], 0
            current[g].append(param)
            held += size
    if held or not chunks:
        chunks.append(current)
    return chunks


def _chunked_step(limit: float, lr_scheduler_tracked: bool = False) -> Callable[..., Any]:
    """An optimizer's `step` that runs its class's update once per chunk of at most `limit` bytes of parameters
    (`parameter_chunks`), inside one call of torch's step wrapper (its pre- and post-hooks run once).

    torch.optim's updates are elementwise per parameter: a chunk at a time gives bit for bit the values of one
    step over all parameters (the foreach forms only group the same kernels otherwise), while their temporaries
    (foreach: a list of them for every parameter stepped at once) cover one chunk. A step with a closure (which
    must run once) steps everything at once. `lr_scheduler_tracked`: an LR scheduler made before wrapping had
    wrapped `step` to learn that it ran; this step tells it too."""

    def chunked(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        body = type(self).step.__wrapped__  # type: ignore[attr-defined]
        if kwargs.get("closure", args[0] if args else None) is not None:
            return body(self, *args, **kwargs)
        saved = [group["params"] for group in self.param_groups]
        try:
            for chunk in parameter_chunks(saved, limit):
                for group, params in zip(self.param_groups, chunk):
                    group["params"] = params
                body(self, *args, **kwargs)
        finally:
            for group, params in zip(self.param_groups, saved):
                group["params"] = params
        return None

    step = torch.optim.Optimizer.profile_hook_step(chunked)
    if lr_scheduler_tracked:
        hooked = step

        @functools.wraps(hooked)
        def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            self._opt_called = True  # type: ignore[attr-defined]  # as the LR scheduler's own wrapper does
            return hooked(self, *args, **kwargs)

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return step
