"""Sharded checkpoints with torch.distributed.checkpoint: each rank writes and reads only what it holds.

A save is atomic: every rank writes into a staging directory `<dir>.tmp-<token>` next to the target, rank 0
writes a completion marker there once every rank's files and DCP's metadata are on disk, and then swaps the
staging directory into place (one atomic exchange where the file system supports it). A save interrupted at any
point leaves the previous checkpoint whole, and loading refuses a directory without the marker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import errno
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..errors import RanncError
from . import failures

logger = logging.getLogger(__name__)

_MODEL = "model/"
_OPTIM = "optim/"
_GROUPS = "optim_param_groups"

COMPLETE_MARKER = ".rannc-complete"  # written last: its presence means every rank's files are complete
_MARKER_FORMAT = "rannc-sharded-checkpoint"
_MARKER_VERSION = 1
_STAGING = ".tmp-"  # <dir>.tmp-<token>: where a save writes before it is moved into place
_REPLACED = ".old-"  # <dir>.old-<token>: the previous checkpoint, where no atomic exchange is available
_DCP_METADATA = ".metadata"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CompletionMarker:
    """The contents of `COMPLETE_MARKER` (JSON), for people reading the directory."""

    world_size: int
    saved_at: str  # ISO 8601, UTC
    created_by: str
    format: str = _MARKER_FORMAT
    version: int = _MARKER_VERSION


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
    """Collective: every rank passes its local state; replicated entries are written once.

    The checkpoint at `path` is replaced only once the new one is complete (see the module docstring).
    """
    target = Path(path)
    token = _on_rank0(lambda: _prepare_target(target), f"preparing to save the sharded checkpoint {target}")
    staging = _sibling(target, _STAGING, token)
    with failures.guarded(lambda: f"saving the sharded checkpoint {target} (in {staging.name})"):
        dcp.save(state, checkpoint_id=str(staging))
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    _on_rank0(
        lambda: _complete(staging, target, token, world_size),
        f"moving the sharded checkpoint {staging} into place at {target}",
    )


def _prepare_target(target: Path) -> str:
    """Refuse a target save_sharded must not replace; the token naming this save's staging directory."""
    if target.exists() and not target.is_dir():
        raise RanncError(
            f"{target} is a file; save_sharded writes a directory there: choose a directory path"
        )
    if target.is_dir() and any(target.iterdir()):
        if not (target / COMPLETE_MARKER).exists() and not (target / _DCP_METADATA).exists():
            raise RanncError(
                f"{target} holds files that are not a sharded checkpoint; save_sharded replaces the directory "
                "as a whole, so choose a new or empty directory (or one written by save_sharded)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    return secrets.token_hex(6)


def _complete(staging: Path, target: Path, token: str, world_size: int) -> None:
    """Rank 0, after every rank's files and DCP's metadata are written: mark complete, swap into place."""
    marker = CompletionMarker(
        world_size=world_size,
        saved_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        created_by=_created_by(),
    )
    with open(staging / COMPLETE_MARKER, "w", encoding="utf-8") as stream:
        json.dump(dataclasses.asdict(marker), stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())
    _fsync_directory(staging)
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # it now holds the previous checkpoint
    else:  # two renames: a crash between them leaves both complete copies beside the target (load names them)
        replaced = _sibling(target, _REPLACED, token)
        os.rename(target, replaced)
        os.rename(staging, target)
        shutil.rmtree(replaced)
    _fsync_directory(target.parent)
    for leftover in _leftovers(target):  # staging directories of earlier interrupted saves
        logger.info("removing %s, left by an interrupted save_sharded", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange (NFS, ...)
        return False
    raise OSError(code, f"cannot swap {first} and {second}: {os.strerror(code)}")


def _fsync_directory(path: Path) -> None:
    """Make a rename or new file in `path` durable (not supported everywhere; best effort)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _sibling(target: Path, kind: str, token: str) -> Path:
    return target.with_name(f"{target.name}{kind}{token}")


def _leftovers(target: Path) -> list[Path]:
    """Staging and replaced directories of `target` left by interrupted saves."""
    if not target.parent.is_dir():
        return []
    prefixes = (target.name + _STAGING, target.name + _REPLACED)
    return sorted(p for p in target.parent.iterdir() if p.is_dir() and p.name.startswith(prefixes))


def _created_by() -> str:
    from ..deploy.deployment import rannc_version

    return f"rannc {rannc_version()}"


def _on_rank0(action: Callable[[], T], doing: str) -> T:
    """Run `action` on rank 0 and give its result to every rank; its failure is raised on every rank."""
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if _rank() == 0:
        try:
            outcome[0] = ("ok", action())
        except Exception as exc:  # raised on every rank below
            error = exc
            outcome[0] = ("error", f"{type(exc).__name__}: {exc}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        with failures.guarded(lambda: doing):
            dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "ok":
        return value
    if isinstance(error, RanncError):
        raise error
    raise RanncError(f"rank 0 failed while {doing}: {value}") from error


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def check_complete(path: str | Path) -> None:
    """Refuse anything but a complete checkpoint written by save_sharded, saying what happened and what to do."""
    target = Path(path)
    if target.is_dir():
        if (target / COMPLETE_MARKER).is_file():
            _read_marker(target)
            return
        staging_of = target.name.rsplit(_STAGING, 1)[0] if _STAGING in target.name else None
        what = (
            f"{target} is the staging directory of a save_sharded to {target.with_name(staging_of)} that did "
            "not finish"
            if staging_of
            else f"the checkpoint {target} is incomplete"
        )
        raise RanncError(
            f"{what}: it lacks the completion marker {COMPLETE_MARKER} that save_sharded writes after every "
            "rank's files, so the save that wrote it was interrupted (a rank failed or was killed before the "
            "end). An interrupted save_sharded leaves the checkpoint it was replacing in place: load that one, "
            "or save again. (A directory written by torch.distributed.checkpoint.save directly, or by an older "
            "rannc, has no marker either.)"
        )
    if target.exists():
        raise RanncError(f"{target} is a file; pass the directory written by save_sharded")
    leftovers = _leftovers(target)
    finished = [p for p in leftovers if (p / COMPLETE_MARKER).is_file()]
    if finished:
        copies = ", ".join(str(p) for p in finished)
        verb = "is a complete checkpoint" if len(finished) == 1 else "are complete checkpoints"
        raise RanncError(
            f"no checkpoint at {target}: a save_sharded stopped while moving its checkpoint into place; {copies} "
            f"{verb} (the marker files say when each was saved): rename the one you want to {target}"
        )
    if leftovers:
        raise RanncError(
            f"no checkpoint at {target}: a save_sharded to it was interrupted before it finished (a rank failed "
            f"or was killed), so the checkpoint is incomplete; its partial files are in "
            f"{', '.join(str(p) for p in leftovers)}. Load an earlier checkpoint, or train and save again"
        )
    raise RanncError(
        f"no checkpoint at {target}: the directory does not exist; pass the directory written by save_sharded"
    )


def _read_marker(target: Path) -> CompletionMarker:
    try:
        data = json.loads((target / COMPLETE_MARKER).read_text(encoding="utf-8"))
        if data.get("format") != _MARKER_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {_MARKER_FORMAT!r}")
        return CompletionMarker(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise RanncError(
            f"the completion marker {target / COMPLETE_MARKER} is unreadable ({exc}); the checkpoint was not "
            "written by save_sharded or has been damaged: load another checkpoint"
        ) from exc


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
    check_complete(path)
    reader = dcp.FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata().state_dict_metadata
    except Exception as exc:
        raise RanncError(
            f"the checkpoint {path} is complete but its metadata is unreadable ({exc}): it has been damaged "
            "since it was saved; load another checkpoint"
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
    with failures.guarded(lambda: f"loading the sharded checkpoint {path}"):
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
