"""Failures reach every rank: timed waits that name the peer, and a watchdog that spreads a rank's error."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch.distributed as dist

from ..errors import RanncError, RemoteError

logger = logging.getLogger(__name__)

_ERROR_KEY = "rannc/failed"
_LINGER_S = 3.5  # > watchdog poll + grace
_settings = {"timeout_s": 30.0}
_context: dict[str, Any] = {"step": 0, "stage": None}


def configure(timeout_s: float) -> None:
    """Seconds a point-to-point transfer or collective may take during training before the rank gives up."""
    _settings["timeout_s"] = float(timeout_s)


def set_context(**values: Any) -> None:
    _context.update(values)


def where() -> str:
    stage = _context.get("stage")
    return f"step {_context.get('step')}" + (f", stage {stage}" if stage is not None else "")


def wait_all(works: Iterable[Any], describe: Callable[[], str]) -> None:
    """Wait for every work; on failure or timeout raise RemoteError saying what this rank was waiting for."""
    timeout = datetime.timedelta(seconds=_settings["timeout_s"])
    with guarded(describe):
        for work in works:
            work.wait(timeout=timeout)


@contextlib.contextmanager
def guarded(describe: Callable[[], str]) -> Iterator[None]:
    """Turn a communication failure (posting or waiting) into a RemoteError naming the peer or the cause."""
    try:
        yield
    except RemoteError:
        raise
    except Exception as exc:  # gloo/NCCL raise RuntimeError for timeouts and dead peers alike
        posted = posted_failure()
        rank = dist.get_rank() if dist.is_initialized() else 0
        if posted is None:
            time.sleep(0.5)  # the failing rank posts before it exits; give its message a moment to land
            posted = posted_failure()
        if posted:
            raise RemoteError(f"rank {rank} stopped because {posted}") from exc
        raise RemoteError(
            f"rank {rank} ({where()}) failed while {describe()}{_laggards()}: {exc}. The peer may have "
            f"failed, been killed or stopped answering (timeout {_settings['timeout_s']:.0f}s, config item "
            "comm_timeout_s)"
        ) from exc


def mark_progress(step: int) -> None:
    """Record the step this rank has reached, so a rank that times out can say who it is waiting for."""
    store = _store()
    if store is None or not dist.is_initialized():
        return
    try:
        store.set(f"rannc/progress/{dist.get_rank()}", str(step))
    except Exception:  # progress is a diagnostic only
        pass


def _laggards() -> str:
    store = _store()
    step = _context.get("step")
    if store is None or not dist.is_initialized() or not isinstance(step, int):
        return ""
    behind = []
    try:
        for other in range(dist.get_world_size()):
            key = f"rannc/progress/{other}"
            reached = int(store.get(key).decode()) if store.check([key]) else 0
            if reached < step:
                behind.append(f"rank {other} (still at step {reached})")
    except Exception:
        return ""
    return f", waiting for {', '.join(behind)}" if behind else ""


class _StoreLink:
    """A private TCPStore client (the default store is not shared across threads)."""

    def __init__(self) -> None:
        self.store: Any = None
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            try:
                self.store = dist.TCPStore(
                    addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=10)
                )
            except Exception:  # no reachable store (e.g. file:// init): failures still surface by timeout
                self.store = None


_link: _StoreLink | None = None


def _store() -> Any:
    global _link
    if _link is None:
        _link = _StoreLink()
    return _link.store


def post_failure(message: str) -> None:
    """Tell the other ranks that this one failed, so they stop instead of waiting for it."""
    store = _store()
    if store is None:
        return
    try:
        if not store.check([_ERROR_KEY]):
            store.set(_ERROR_KEY, message)
    except Exception:  # reporting is best effort; the failing rank raises its own error anyway
        pass


def posted_failure() -> str | None:
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_ERROR_KEY]):
            return store.get(_ERROR_KEY).decode()
    except Exception:
        return None
    return None


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Post unexpected failures (not deliberate RanncErrors, which every rank raises alike) for the others."""
    try:
        yield
    except RanncError as exc:
        if isinstance(exc, RemoteError):
            post_failure(f"rank {_rank()} ({where()}) failed: {exc}")
        raise
    except BaseException as exc:
        post_failure(f"rank {_rank()} ({where()}) failed: {type(exc).__name__}: {exc}")
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Rank 0 hosts the TCP store: stay long enough for the others' watchdogs to read the message.
            time.sleep(_LINGER_S)
        exc.add_note(f"rannc: raised on rank {_rank()} ({where()}); the other ranks were told and stop")
        raise


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def start_watchdog(rank: int, grace_s: float = 2.0, poll_s: float = 0.5) -> None:
    """A daemon thread: when another rank posts a failure, print it and exit this process non-zero.

    A rank blocked inside a transfer cannot raise by itself until its timeout; this ends it within about
    `grace_s` seconds of the failure instead, leaving the original error in the log of every rank.
    """
    link = _StoreLink()
    if link.store is None:
        return

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                if not link.store.check([_ERROR_KEY]):
                    continue
                message = link.store.get(_ERROR_KEY).decode()
            except Exception:
                return  # the store is gone: the job is ending
            if message.startswith(f"rank {rank} "):
                return
            time.sleep(grace_s)  # let this rank raise through its own call path first if it can
            print(f"rannc: rank {rank} ({where()}) stops because {message}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(1)

    threading.Thread(target=watch, name="rannc-watchdog", daemon=True).start()
