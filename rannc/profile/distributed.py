"""Profile every block at every microbatch size: tasks spread over the ranks, gathered, cached on disk."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress

from ..config import Config
from ..errors import RanncError
from ..host_memory import release_free_host_pages
from ..plan.types import BlockProfile
from .measure import BlockRunner, cache_flusher, measure_block, ranks_on_this_host, usable_cores

__all__ = ["profile_blocks"]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "rannc-block-profiles/3"  # 2: with workspace bytes; 3: with the split backward's W pass
_FIELDS = ("fwd", "bwd", "activation", "workspace", "bwd_weight", "deferred")

Task = tuple[int, int]  # (block index, microbatch size)
# {"fwd": s, "bwd": s, "activation": bytes, "workspace": bytes, "bwd_weight": s, "deferred": bytes}
Entry = dict[str, float]


def profile_blocks(
    runners: Sequence[BlockRunner],
    microbatch_sizes: Sequence[int],
    *,
    cache_key: str,
    config: Config,
    device: torch.device | None = None,
) -> list[BlockProfile]:
    """One BlockProfile per runner (in order) with values at every size in `microbatch_sizes`.

    Call it on every rank with the same runners, sizes and key. Values found in the cache file
    `<config.profile_cache_dir>/<cache_key>-<device type>.json` are reused (the device defaults to that
    of the first block's inputs); the missing (block, size) tasks are split over the ranks, measured and
    exchanged, so every rank returns identical profiles. Rank 0 writes the merged cache.

    Example::

        profiles = profile_blocks(runners, [1, 2, 4, 8], cache_key=graph_hash, config=load_config())
    """
    sizes = sorted(set(microbatch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"microbatch sizes must be positive integers, got {list(microbatch_sizes)}")
    if not runners:
        return []
    started = time.perf_counter()
    rank, world_size = _rank_and_world_size()
    device = _measurement_device(runners[0], device)
    path = _cache_path(config.profile_cache_dir, cache_key, device)
    tasks = [(block, m) for block in range(len(runners)) for m in sizes]

    signature = [cache_key, device.type, len(runners), sizes]
    cache = _agree_on_cache(_read_cache(path), signature, world_size)
    missing = [task for task in tasks if _task_key(task) not in cache]
    mine = _assign(missing, world_size)[rank]

    measured, error = _measure_tasks(runners, mine, config, device, show=config.show_progress and rank == 0)
    release_free_host_pages()  # the cache flusher's buffer: what is deployed next need not land beside it
    entries = _gather_measurements(measured, error, world_size)
    merged = {**cache, **entries}
    if rank == 0 and missing:
        _write_cache(path, merged)
    logger.info(
        "profiled %d block tasks: %d cached, %d measured (%d on this rank of %d) in %.2f s",
        len(tasks),
        len(tasks) - len(missing),
        len(missing),
        len(mine),
        world_size,
        time.perf_counter() - started,
    )
    return [_profile_of(merged, block, sizes) for block in range(len(runners))]


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _measurement_device(runner: BlockRunner, device: torch.device | None) -> torch.device:
    """The given device, else the device of the first tensor input the block is given (else the CPU)."""
    if device is not None:
        return torch.device(device)
    for value in runner.make_inputs(1):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _cache_path(directory: str, cache_key: str, device: torch.device) -> Path:
    """Where block costs measured on `device` are kept. On CPUs the ranks of a host measure at once and share its
    cores (each gets cores / ranks of them at most): costs measured by another number of ranks do not hold (the
    file is per rank count and core count)."""
    safe_key = re.sub(r"[^A-Za-z0-9._-]", "_", cache_key)
    if device.type == "cpu":
        safe_key += f"-{ranks_on_this_host()}of{usable_cores()}cores"
    return Path(directory).expanduser() / f"{safe_key}-{device.type}.json"


def _task_key(task: Task) -> str:
    return f"{task[0]}:{task[1]}"


def _assign(tasks: list[Task], world_size: int) -> list[list[Task]]:
    """Round-robin over the tasks ordered by size (largest first), then block: near-equal work per rank."""
    ordered = sorted(tasks, key=lambda task: (-task[1], task[0]))
    return [ordered[rank::world_size] for rank in range(world_size)]


def _read_cache(path: Path) -> dict[str, Entry]:
    """Entries of a valid cache file; an absent file is empty, a corrupt one is reported and ignored."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        logger.warning("cannot read profile cache %s (%s); profiling without it", path, exc)
        return {}
    try:
        data = json.loads(text)
        found = data.get("format") if isinstance(data, dict) else None
        if isinstance(found, str) and found.startswith("rannc-block-profiles/") and found != _CACHE_FORMAT:
            logger.info(
                "profile cache %s is of an older rannc (%s, now %s); it will be replaced by fresh measurements",
                path,
                found,
                _CACHE_FORMAT,
            )
            return {}
        if found != _CACHE_FORMAT:
            raise ValueError(f"not a {_CACHE_FORMAT} file")
        return {key: _valid_entry(key, value) for key, value in data["entries"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning(
            "profile cache %s is corrupt (%s); ignoring it, it will be replaced by fresh measurements",
            path,
            exc,
        )
        return {}


def _valid_entry(key: str, value: Any) -> Entry:
    block, m = key.split(":")
    if int(block) < 0 or int(m) < 1:
        raise ValueError(f"bad task key {key!r}")
    entry = {field: float(value[field]) for field in _FIELDS}
    if not all(math.isfinite(v) and v >= 0 for v in entry.values()):
        raise ValueError(f"bad values for task {key!r}: {value!r}")
    return entry


def _write_cache(path: Path, entries: dict[str, Entry]) -> None:
    """Atomically replace our cache file (temporary file in the same directory + os.replace)."""
    payload = {"format": _CACHE_FORMAT, "entries": dict(sorted(entries.items()))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(payload, handle, indent=1)
            os.replace(tmp_name, path)
        except BaseException:
            os.unlink(tmp_name)
            raise
    except OSError as exc:
        logger.warning("cannot write profile cache %s (%s); results are not cached", path, exc)


def _agree_on_cache(cache: dict[str, Entry], signature: list[Any], world_size: int) -> dict[str, Entry]:
    """Union of every rank's cache (lower ranks win), after checking all ranks ask for the same tasks."""
    if world_size == 1:
        return cache
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (signature, cache))
    signatures = [item[0] for item in gathered]
    if any(other != signatures[0] for other in signatures):
        raise RanncError(
            f"ranks disagree on what to profile (cache key, device type, block count, sizes): {signatures}; "
            "call profile_blocks with the same graph and sizes on every rank"
        )
    merged: dict[str, Entry] = {}
    for _, rank_cache in gathered:
        for key, entry in rank_cache.items():
            merged.setdefault(key, entry)
    return merged


def _measure_tasks(
    runners: Sequence[BlockRunner],
    tasks: list[Task],
    config: Config,
    device: torch.device | None,
    *,
    show: bool,
) -> tuple[dict[str, Entry], Exception | None]:
    """This rank's measurements; an exception is returned, not raised, so that no rank is left waiting."""
    measured: dict[str, Entry] = {}
    flush = cache_flusher(device) if device is not None else None  # one eviction buffer for every task
    with Progress(transient=True, disable=not show) as progress:
        bar = progress.add_task("profiling blocks", total=len(tasks))
        for block, m in tasks:
            try:
                profile = measure_block(runners[block], [m], config.profile_iterations, device, flush=flush)
            except Exception as exc:
                logger.exception("profiling block %d at microbatch size %d failed", block, m)
                exc.add_note(f"while profiling block {block} at microbatch size {m}")
                return measured, exc
            measured[_task_key((block, m))] = {
                "fwd": float(profile.fwd_time[m]),
                "bwd": float(profile.bwd_time[m]),
                "activation": float(profile.activation_bytes[m]),
                "workspace": float(profile.workspace_bytes.get(m, 0.0)),
                "bwd_weight": float(profile.bwd_weight.get(m, 0.0)),
                "deferred": float(profile.deferred_grad_bytes.get(m, 0.0)),
            }
            progress.advance(bar)
    return measured, None


def _gather_measurements(
    measured: dict[str, Entry], error: Exception | None, world_size: int
) -> dict[str, Entry]:
    """Every rank's measurements, identical on all ranks; a failure on any rank is raised on all of them."""
    text = None if error is None else f"{type(error).__name__}: {error} ({'; '.join(error.__notes__)})"
    if world_size == 1:
        gathered: list[Any] = [(measured, text)]
    else:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (measured, text))
    failures = [f"rank {rank}: {err}" for rank, (_, err) in enumerate(gathered) if err is not None]
    if failures:
        raise RanncError(
            "profiling failed on " + "; ".join(failures) + "; fix the block or run it alone to debug it"
        ) from error
    entries: dict[str, Entry] = {}
    for rank_entries, _ in gathered:
        entries.update(rank_entries)
    return entries


def _profile_of(entries: dict[str, Entry], block: int, sizes: list[int]) -> BlockProfile:
    rows = {m: entries[_task_key((block, m))] for m in sizes}
    return BlockProfile(
        fwd_time={m: row["fwd"] for m, row in rows.items()},
        bwd_time={m: row["bwd"] for m, row in rows.items()},
        activation_bytes={m: row["activation"] for m, row in rows.items()},
        workspace_bytes={m: row["workspace"] for m, row in rows.items()},
        bwd_weight={m: row["bwd_weight"] for m, row in rows.items()},
        deferred_grad_bytes={m: row["deferred"] for m, row in rows.items()},
    )
