"""Values of the whole model across the ranks: gathered on rank 0, shared with every rank, agreed at the start.

After partitioning each parameter and buffer lives on the ranks of the stages that use it; `ModelTensors` knows
which rank's copy is authoritative and brings `select(tensor)` (the value, its gradient) of each to rank 0 or to
every rank. Every function here is a collective: every rank calls it, in the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import RanncError
from . import failures

T = TypeVar("T")
Select = Callable[[torch.Tensor], torch.Tensor | None]  # a tensor's value, its gradient, ...


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name (the first of a tied tensor's names) -> every parameter and buffer of `model`."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        out.setdefault(name, tensor)
    return out


def rank0_value(value: T, world_size: int) -> T:
    """Rank 0's `value`, on every rank."""
    if world_size == 1:
        return value
    shared: list[Any] = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


@dataclasses.dataclass(frozen=True)
class ModelTensors:
    """The model's parameters and buffers as this rank holds them, and which rank holds each one's values."""

    tensors: dict[str, torch.Tensor]  # canonical name -> this rank's tensor (empty where other ranks hold it)
    source: dict[str, int]  # canonical name -> the rank whose copy counts (absent: every rank has the values)
    shapes: dict[str, tuple[torch.Size, torch.dtype]]  # canonical name -> full shape and dtype
    rank: int
    world_size: int
    device: torch.device  # this rank's: where tensors travel

    @classmethod
    def whole(cls, model: torch.nn.Module, rank: int, world_size: int, device: torch.device) -> ModelTensors:
        """Before partitioning: every rank holds every tensor."""
        tensors = named_tensors(model)
        shapes = {name: (t.shape, t.dtype) for name, t in tensors.items()}
        return cls(tensors, {}, shapes, rank, world_size, device)

    def full_values(
        self, names: list[str], select: Select, device: torch.device | None = None
    ) -> dict[str, torch.Tensor | None]:
        """`select(tensor)` of each named tensor, from the rank that holds it, on every rank (CPU copies, or on
        `device`); None where it is None (e.g. no gradient yet)."""
        return {name: self._full_value(name, select, device) for name in names}

    def _full_value(self, name: str, select: Select, device: torch.device | None) -> torch.Tensor | None:
        src = self.source.get(name)
        if src is None:  # not partitioned (yet), or used by no stage: every rank has the whole tensor
            value = select(self.tensors[name])
            return None if value is None else value.detach().to(device or "cpu", copy=True)
        value = select(self.tensors[name]) if self.rank == src else None
        present = torch.tensor([int(value is not None)], device=self.device)
        if self.world_size > 1:
            dist.broadcast(present, src=src)
        if not present.item():
            return None
        if value is not None:
            buffer = value.detach().to(self.device, copy=True).contiguous()
        else:
            shape, dtype = self.shapes[name]
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
        if self.world_size > 1:
            dist.broadcast(buffer, src=src)
        return buffer.to(device or "cpu")

    def gather_to_rank0(self, select: Select) -> dict[str, torch.Tensor]:
        """`select(tensor)` of every parameter and buffer, from the rank that holds it, collected on rank 0 (CPU
        copies; other ranks get an empty dict). Point-to-point, so ranks that hold nothing wait for nothing."""
        gathered: dict[str, torch.Tensor] = {}
        for name in sorted(self.tensors):
            owner = self.source.get(name, 0)
            if self.rank == owner:
                value = select(self.tensors[name])
                if owner == 0:
                    if value is not None:
                        gathered[name] = value.detach().cpu().clone()
                    continue
                self._send_to_rank0(name, value)
            elif self.rank == 0:
                value = self._receive(name, owner)
                if value is not None:
                    gathered[name] = value
        return gathered

    def _send_to_rank0(self, name: str, value: torch.Tensor | None) -> None:
        sends = [torch.tensor([int(value is not None)], device=self.device)]
        sends += [value.detach().contiguous()] if value is not None else []
        for tensor in sends:
            p2p(dist.isend, tensor, 0, lambda: f"sending {name} to rank 0")

    def _receive(self, name: str, owner: int) -> torch.Tensor | None:
        def describe() -> str:
            return f"receiving {name} from rank {owner}"

        flag = torch.zeros(1, dtype=torch.int64, device=self.device)
        p2p(dist.irecv, flag, owner, describe)
        if not flag.item():
            return None
        shape, dtype = self.shapes[name]
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        p2p(dist.irecv, buffer, owner, describe)
        return buffer.cpu()


def p2p(op: Callable[..., Any], tensor: torch.Tensor, peer: int, describe: Callable[[], str]) -> None:
    """One send or receive that waits at most comm_timeout_s and names the rank at fault when it fails."""
    with failures.guarded(describe):
        work = op(tensor, peer)
    failures.wait_all([work], describe)


def on_rank0(action: Callable[[], None], rank: int, world_size: int) -> tuple[str, str] | None:
    """Rank 0 runs `action`; on every rank, what it raised (the exception's type name and message) or None."""
    outcome: tuple[str, str] | None = None
    if rank == 0:
        try:
            action()
        except Exception as exc:  # reported on every rank
            outcome = (type(exc).__name__, str(exc))
    return rank0_value(outcome, world_size)


def agree_on_initial_state(
    model: torch.nn.Module, device: torch.device, world_size: int, copy_rank0: bool
) -> None:
    """Every rank starts from the same weights: rank 0's are copied to all (`copy_rank0`, pyrannc's
    sync_params_on_init(True)), else they are compared (and differing ones refused)."""
    if not copy_rank0:
        _check_same_model(model, world_size)
        return
    if world_size == 1:
        return
    with torch.no_grad():
        for tensor in named_tensors(model).values():
            if tensor.is_meta:  # its values come from load_weights / init_weights, alike on every rank
                continue
            buffer = tensor.detach().to(device, copy=True)
            dist.broadcast(buffer, src=0)
            tensor.copy_(buffer)


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
