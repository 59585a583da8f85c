"""Sharded checkpoints with torch.distributed.checkpoint: each rank writes and reads only what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..errors import RanncError

_MODEL = "model/"
_OPTIM = "optim/"
_GROUPS = "optim_param_groups"


def local_state(
    tensors: dict[str, torch.Tensor], local: set[str], optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """This rank's part of the checkpoint: its parameters and buffers, and their optimizer state."""
    state: dict[str, Any] = {_MODEL + name: tensors[name] for name in sorted(local) if name in tensors}
    if optimizer is not None:
        names = {id(t): n for n, t in tensors.items()}
        for param, values in optimizer.state.items():
            name = names.get(id(param))
            for key, value in values.items():
                if name is not None:
                    state[f"{_OPTIM}{name}/{key}"] = value
        state[_GROUPS] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return state


def save_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Collective: every rank passes its local state; replicated entries are written once."""
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    local: set[str],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Collective: fill this rank's parameters, buffers and optimizer state from a sharded checkpoint.

    The checkpoint may come from another world size or plan: every entry is stored whole, so each rank
    reads the ones it holds now.
    """
    reader = dcp.FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata().state_dict_metadata
    except Exception as exc:
        raise RanncError(
            f"{path} is not a readable sharded rannc checkpoint ({exc}); pass the directory "
            "written by save_sharded"
        ) from exc
    state: dict[str, Any] = {}
    missing = [name for name in sorted(local) if _MODEL + name not in metadata]
    if missing:
        raise RanncError(
            f"the checkpoint {path} lacks {missing[:5]}: it was saved from another model; load a checkpoint "
            "of this model"
        )
    for name in sorted(local):
        state[_MODEL + name] = tensors[name]
    optimizer_slots: list[tuple[torch.Tensor, str, str]] = []
    if optimizer is not None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name in sorted(local):
            tensor = tensors[name]
            if id(tensor) not in held:
                continue
            prefix = f"{_OPTIM}{name}/"
            for key, meta in metadata.items():
                if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
                    state[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=tensor.device)
                    optimizer_slots.append((tensor, key[len(prefix) :], key))
        if _GROUPS in metadata:
            state[_GROUPS] = None
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        for param, slot, key in optimizer_slots:
            value = state[key]
            optimizer.state[param][slot] = value if value.dim() > 0 else value.cpu()
        groups = state.get(_GROUPS)
        if groups:
            for group, saved in zip(optimizer.param_groups, groups):
                group.update(saved)
    if dist.is_initialized():
        dist.barrier()
