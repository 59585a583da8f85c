"""Run a function in several real processes joined by a gloo process group (the multi-rank test harness).

`run_workers(worker, world_size, *args)` spawns one process per rank, initialises `torch.distributed` in each
(gloo over 127.0.0.1), calls `worker(rank, world_size, *args)` and returns the ranks' return values in rank
order. Any failure (an exception, a child that dies without reporting, a timeout) kills every child and raises an
AssertionError that carries each failing rank's traceback, so a broken collective never hangs the test session.

`launch_script(script, args, world_size)` runs a user's script as a launcher (torchrun) would: one real process
per rank with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, and returns each rank's exit code, output and
exit time, for tests of what happens when a rank fails.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import multiprocessing
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# How long the parent keeps reading reports after the first failure before it kills the remaining ranks (they are
# often blocked in a collective with the failed rank and would otherwise wait for the full timeout).
DEFAULT_FAILURE_GRACE_S = 5.0
_POLL_S = 0.1


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and read what the OS chose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_reference(worker: Callable[..., Any]) -> tuple[str, str]:
    """(module, qualname) of a module-level function; the child imports it only after its environment is set."""
    module = getattr(worker, "__module__", None)
    qualname = getattr(worker, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise TypeError(
            f"run_workers needs a module-level function as worker (it is imported by name in each child "
            f"process), got {worker!r}; move it to the top level of a module"
        )
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not worker:
        raise TypeError(
            f"worker {module}.{qualname} cannot be found again by name; pass a module-level function"
        )
    return module, qualname


def _child_main(
    rank: int,
    world_size: int,
    port: int,
    worker_ref: tuple[str, str],
    args: tuple[Any, ...],
    env: dict[str, str],
    timeout: float,
    results: Any,
) -> None:
    """Entry point of one spawned rank: set up the environment and process group, run the worker, report."""
    initialised = False
    try:
        os.environ.update(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "HF_HUB_OFFLINE": "1",
            }
        )
        if sys.platform.startswith("linux"):
            # Keep gloo on the loopback device even where the host name resolves to an unreachable address.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.update(env)
        torch.set_num_threads(1)
        module_name, qualname = worker_ref
        worker: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            worker = getattr(worker, part)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        initialised = True
        value = worker(rank, world_size, *args)
        # Pickle here with the standard pickler: tensors travel by value, not as shared-memory handles that die
        # with this process.
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        results.put(("ok", rank, payload))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit and KeyboardInterrupt
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if initialised:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the report is already sent; nothing useful to do here
                pass


def _kill_all(processes: list[Any]) -> None:
    started = [process for process in processes if process.pid is not None]
    for process in started:
        if process.is_alive():
            process.kill()
    for process in started:
        process.join(timeout=10)


def run_workers(
    worker: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    failure_grace: float = DEFAULT_FAILURE_GRACE_S,
) -> list[Any]:
    """Run `worker(rank, world_size, *args)` in `world_size` spawned processes; return the values in rank order.

    Each child gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT (a free port),
    HF_HUB_OFFLINE=1 and the entries of `env`, runs with one intra-op thread, and has a gloo process group
    initialised (collective timeout = `timeout`). `args` and the return values must be picklable; `worker` must
    be a module-level function. If any rank raises, exits without reporting, or the ranks do not all finish
    within `timeout` seconds, every child is killed and an AssertionError with each failing rank's traceback
    is raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    worker_ref = _worker_reference(worker)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = find_free_port()
    child_env = dict(env or {})
    processes = [
        context.Process(
            target=_child_main,
            args=(rank, world_size, port, worker_ref, args, child_env, timeout, results),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    started = time.monotonic()
    deadline = started + timeout
    first_failure: float | None = None
    timed_out = False
    try:
        for process in processes:
            process.start()
        while len(values) + len(errors) < world_size:
            now = time.monotonic()
            if first_failure is not None and now - first_failure > failure_grace:
                break
            if now > deadline:
                timed_out = True
                break
            try:
                status, rank, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                # A child that died without reporting (crash, os._exit, killed) will never report.
                for rank, process in enumerate(processes):
                    if rank in values or rank in errors or process.exitcode in (None, 0):
                        continue
                    errors[rank] = f"rank {rank} exited with exit code {process.exitcode} without reporting"
                    first_failure = first_failure or time.monotonic()
                # A child that exited cleanly has flushed its report already; allow one more poll round.
                silent = [
                    rank
                    for rank, process in enumerate(processes)
                    if process.exitcode == 0 and rank not in values and rank not in errors
                ]
                if silent and results.empty():
                    time.sleep(_POLL_S)
                    if results.empty():
                        for rank in silent:
                            errors[rank] = f"rank {rank} exited with exit code 0 without reporting a result"
                        first_failure = first_failure or time.monotonic()
                continue
            if status == "ok":
                try:
                    values[rank] = pickle.loads(payload)
                except Exception:  # noqa: BLE001 - e.g. a class the parent cannot import
                    errors[rank] = (
                        f"the result of rank {rank} could not be unpickled:\n{traceback.format_exc()}"
                    )
                    first_failure = first_failure or time.monotonic()
            else:
                errors[rank] = payload
                first_failure = first_failure or time.monotonic()
    finally:
        if errors or timed_out or len(values) < world_size:
            _kill_all(processes)
        else:
            for process in processes:
                process.join(timeout=30)
            _kill_all(processes)  # only ranks that hang on exit are left
        results.close()
        results.cancel_join_thread()

    if not errors and not timed_out and len(values) == world_size:
        return [values[rank] for rank in range(world_size)]

    elapsed = time.monotonic() - started
    lines = [
        f"run_workers({worker_ref[0]}.{worker_ref[1]}, world_size={world_size}) failed after {elapsed:.1f}s"
    ]
    if timed_out:
        lines.append(f"timed out after {timeout}s; all ranks were killed")
    missing = [r for r in range(world_size) if r not in values and r not in errors]
    if missing:
        lines.append(f"ranks {missing} did not report (killed)")
    for rank in sorted(errors):
        lines.append(f"----- rank {rank} -----\n{errors[rank]}")
    raise AssertionError("\n".join(lines))


REPO = Path(__file__).resolve().parents[1]
HUNG = -999  # RankRun.code of a rank the launcher killed at its deadline


@dataclasses.dataclass
class RankRun:
    """One rank's process of a launched script."""

    rank: int
    code: int  # its exit code (negative: killed by that signal; HUNG: still running at the deadline)
    out: str
    err: str
    ended: float  # time.time() when the process ended

    def event_time(self, marker: str) -> float:
        """The time printed at the end of this rank's line containing `marker` (e.g. 'saving at 1712.3')."""
        for line in self.out.splitlines():
            if marker in line:
                return float(line.rsplit(" ", 1)[-1])
        raise AssertionError(f"rank {self.rank} printed no '{marker}' line:\n{self.out}\n{self.err[-3000:]}")

    def seconds_after(self, marker: str) -> float:
        return self.ended - self.event_time(marker)


def launch_script(
    script: Path,
    args: list[str],
    world_size: int,
    ranks: list[int] | None = None,
    *,
    port: int | None = None,
    deadline_s: float = 240.0,
    env: dict[str, str] | None = None,
) -> list[RankRun]:
    """Run `ranks` (all by default) of a `world_size` job of `python script *args`, as a launcher would, and wait
    for every one: each rank has RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT (`port`, or a
    free one), the repository on PYTHONPATH, one thread, and the entries of `env`. Their output is read as they
    write it and their exit timed when it comes. A rank still running after `deadline_s` is killed and the test
    fails naming it, so a hung job never hangs the session."""
    ranks = list(range(world_size)) if ranks is None else ranks
    port = find_free_port() if port is None else port
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=_launched_environment(rank, world_size, port, env or {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in ranks
    ]
    runs: dict[int, RankRun] = {}

    def wait(rank: int, proc: subprocess.Popen[str]) -> None:
        try:
            out, err = proc.communicate(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            runs[rank] = RankRun(
                rank, HUNG, out, err + f"\n<killed: still running after {deadline_s:.0f}s>", time.time()
            )
            return
        runs[rank] = RankRun(rank, proc.returncode, out, err, time.time())

    waiters = [threading.Thread(target=wait, args=(rank, proc)) for rank, proc in zip(ranks, procs)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    hung = [run for run in runs.values() if run.code == HUNG]
    assert not hung, f"rank(s) {[r.rank for r in hung]} of {script.name} {args} hung:\n{hung[0].err[-3000:]}"
    return [runs[rank] for rank in ranks]


def _launched_environment(rank: int, world_size: int, port: int, extra: dict[str, str]) -> dict[str, str]:
    variables = dict(os.environ)
    variables.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    variables.update(extra)
    return variables
