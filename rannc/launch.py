"""Start N local worker processes wired up like torchrun (gloo on 127.0.0.1) and collect their results."""

from __future__ import annotations

import contextlib
import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import RanncError

_POLL_S = 0.1
_EXIT_GRACE_S = 5.0  # how long a worker that exited cleanly may take to deliver its result


class LaunchError(RanncError):
    """A local worker failed, died or did not finish in time; the other workers were stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and ask the kernel which one it chose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def worker_environ(rank: int, world_size: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The variables torchrun would set for `rank`, plus offline / single-thread settings for CPU workers."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@contextlib.contextmanager
def _environ(changes: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (spawned children inherit them from the moment they exec)."""
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker_main(
    rank: int,
    world_size: int,
    environ: dict[str, str],
    worker_fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    init_process_group: bool,
    timeout_s: float,
) -> None:
    os.environ.update(environ)
    import torch
    import torch.distributed as dist

    from .runtime.failures import end_watch

    torch.set_num_threads(1)
    status = 0
    try:
        if init_process_group:
            dist.init_process_group(
                "gloo",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        value = worker_fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report everything, including SystemExit and KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))
        status = 1
    finally:
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                if not status:  # rank 0's group holds the job's store: no rank polls it once it is gone
                    end_watch()
                    dist.barrier()
                dist.destroy_process_group()
    if status:
        raise SystemExit(status)


def launch_local(
    worker_fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float | None = None,
    *,
    init_process_group: bool = True,
    master_addr: str = "127.0.0.1",
) -> list[Any]:
    """Run `worker_fn(rank, world_size, *args)` in `world_size` spawned processes; return their results.

    Each worker gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, HF_HUB_OFFLINE=1 and one
    intra-op thread, and (unless `init_process_group` is False) a gloo process group. `worker_fn`
    must be picklable (a module-level function) and so must `args` and its return value. If a worker
    raises, dies or `timeout` seconds pass, the others are terminated and LaunchError is raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port(master_addr)
    collective_timeout = float(timeout) if timeout is not None else 1800.0
    processes = []
    try:
        for rank in range(world_size):
            environ = worker_environ(rank, world_size, master_addr, port)
            process = ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    world_size,
                    environ,
                    worker_fn,
                    tuple(args),
                    results,
                    init_process_group,
                    collective_timeout,
                ),
                name=f"rannc-worker-{rank}",
                daemon=False,
            )
            with _environ(environ):
                process.start()
            processes.append(process)
        return _collect(processes, results, timeout)
    finally:
        _stop(processes)
        results.close()
        results.join_thread()


def _receive(results: Any, values: dict[int, Any], world_size: int, wait: float) -> bool:
    """Take one message off the queue (waiting up to `wait` s); raise on a failure report."""
    try:
        rank, ok, value = results.get(timeout=wait)
    except queue_module.Empty:
        return False
    if not ok:
        raise LaunchError(f"worker rank {rank} of {world_size} failed; the others were stopped:\n{value}")
    values[rank] = value
    return True


def _collect(processes: list[Any], results: Any, timeout: float | None) -> list[Any]:
    world_size = len(processes)
    deadline = None if timeout is None else time.monotonic() + timeout
    values: dict[int, Any] = {}
    exited_at: dict[int, float] = {}
    while len(values) < world_size:
        if _receive(results, values, world_size, _POLL_S):
            continue
        now = time.monotonic()
        for rank, process in enumerate(processes):
            if rank in values or process.exitcode is None:
                continue
            if process.exitcode != 0:
                # its failure report may still be in the pipe: prefer it to a bare exit code
                while _receive(results, values, world_size, 1.0):
                    pass
                raise LaunchError(
                    f"worker rank {rank} of {world_size} died with exit code {process.exitcode} "
                    "before reporting a result; the others were stopped"
                )
            if now - exited_at.setdefault(rank, now) > _EXIT_GRACE_S:
                raise LaunchError(f"worker rank {rank} of {world_size} exited without reporting a result")
        if deadline is not None and now > deadline:
            running = [rank for rank in range(world_size) if rank not in values]
            raise LaunchError(
                f"local workers did not finish within {timeout:.0f} s (ranks still running: {running}); "
                "they were stopped. Raise the timeout or look for a hang (e.g. a collective one rank skipped)"
            )
    for process in processes:
        process.join(timeout=_EXIT_GRACE_S)
    return [values[rank] for rank in range(world_size)]


def _stop(processes: list[Any]) -> None:
    """Terminate (then kill) every worker still running, and reap them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=_EXIT_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join(timeout=_EXIT_GRACE_S)
