"""Failures reach every rank: timed waits that name the culprit, a watchdog that spreads the job's first failure,
and exits that no pending collective can hold up.

With the `watchdog` config item on (the default), once rannc reports a failure that ends the job (an exception
inside a step, a failed or timed-out transfer, ranks out of step, an uncaught exception, SIGTERM):

* it is posted to the job's store (the first one stands) and every other rank prints it and exits non-zero
  within WATCH_GRACE_S + POLL_S, even while blocked in a collective;
* the rank that raised it exits as soon as the error leaves the script, or within EXIT_GRACE_S where the script
  catches it: a gloo collective that never completes would otherwise hold the process at exit until the
  process-group timeout;
* a rank that dies without a word (SIGKILL, a crash) is told from the live ones by its heartbeat, so the ranks
  that notice name it, and what it was last doing, instead of the peer that saw the connection drop first.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import torch.distributed as dist

from ..errors import RanncError, RemoteError
from .job_store import Failure, Status, StoreLink, StoreLost, endpoint, hosts_store, store_host

logger = logging.getLogger(__name__)

POLL_S = 0.5  # the watchdog's period: heartbeat, status, the job's failure
WATCH_GRACE_S = 2.0  # another rank failed: let this rank raise through its own call path first
EXIT_GRACE_S = 3.0  # this rank reported a failure that its script caught: the most it lives on
LINGER_S = 3.5  # the store's host, exiting after a failure: the most it waits for the others to read it
SILENCE_S = 6.0  # the most a rank waits to tell a dead peer (no heartbeat) from live ones

_settings = {"timeout_s": 30.0}
_context: dict[str, Any] = {"step": 0, "stage": None, "calls": 0, "backwards": 0, "doing": None}


@dataclasses.dataclass
class _Process:
    """This process's view of the job's health."""

    rank: int = 0
    world_size: int = 1
    watching: bool = False  # the watchdog runs: this process ends itself once the job has failed
    failed: Failure | None = None  # the job's failure, once this process knows of one
    exit_at: float | None = None  # time.monotonic() by which the watchdog ends this process
    beat: int = 0  # heartbeats so far
    publish_fd: int | None = None  # the main thread writes here to have the watchdog publish the status now
    watchdog: threading.Thread | None = None
    signals: int | None = None  # the watchdog reads SIGTERM from here (see _catch_sigterm)
    requests: int | None = None  # the watchdog's end of publish_fd
    ended: bool = False  # this rank's part of the job is over: the watchdog stops (see end_watch)


_process = _Process()
_exit_lock = threading.Lock()


def configure(timeout_s: float) -> None:
    """Seconds a point-to-point transfer or collective may take during training before the rank gives up."""
    _settings["timeout_s"] = float(timeout_s)


def set_context(**values: Any) -> None:
    """What this rank is doing: step (of the model being called), stage, doing (the rannc call it is in)."""
    _context.update(values)


def forward_starts(step: int) -> None:
    """A call of a wrapped model starts (its `step`); counted, with the backwards, for the check that every
    rank makes the same calls and backwards."""
    _context["step"] = step
    _context["calls"] += 1


def backward_starts() -> None:
    _context["backwards"] += 1
    _context["doing"] = "the backward"
    _publish()


def backward_ends() -> None:
    _context["doing"] = None
    _publish()


def _status() -> Status:
    return Status(
        rank=_rank(),
        beat=_process.beat,
        step=int(_context["step"]),
        stage=_context["stage"],
        calls=int(_context["calls"]),
        backwards=int(_context["backwards"]),
        doing=_context["doing"],
        time=time.time(),
    )


def where() -> str:
    """e.g. "step 3, stage 0, in the forward"."""
    return _status().where()


@contextlib.contextmanager
def in_call(what: str) -> Iterator[None]:
    """This rank is inside `what`, a call every rank must make: published at once, so that a rank that waits
    for this one in vain can say what it was doing."""
    raise_if_failed()
    outer = _context["doing"]
    _context["doing"] = what
    _publish()
    try:
        yield
    finally:
        _context["doing"] = outer
        _publish()


def raise_if_failed() -> None:
    """Refuse to start anything once the job has failed (the process is about to end)."""
    if _process.failed is not None:
        raise RemoteError(f"rank {_rank()} cannot go on: the job has failed ({_process.failed.message})")


# ---- waits ---------------------------------------------------------------------------------------------------
def wait_all(works: Iterable[Any], describe: Callable[[], str]) -> None:
    """Wait for every work; on failure or timeout raise RemoteError saying what this rank was waiting for."""
    timeout_s = _settings["timeout_s"]
    started = time.monotonic()
    try:
        for work in works:
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RemoteError:
        raise
    except Exception as exc:  # a timeout, or a peer that died (gloo/NCCL raise RuntimeError for both)
        timed_out = time.monotonic() - started >= 0.9 * timeout_s
        raise _remote_error(describe(), exc, timed_out=timed_out) from exc


@contextlib.contextmanager
def guarded(describe: Callable[[], str]) -> Iterator[None]:
    """Turn a communication failure (posting or waiting) into a RemoteError naming the rank at fault."""
    try:
        yield
    except RemoteError:
        raise
    except Exception as exc:  # gloo/NCCL raise RuntimeError for timeouts and dead peers alike
        raise _remote_error(describe(), exc) from exc


@contextlib.contextmanager
def explained(describe: Callable[[], str]) -> Iterator[None]:
    """Like `guarded`, for code whose own errors reach every rank already (torch.distributed.checkpoint): an
    exception becomes a RemoteError only when a rank has failed, died or lost the store; others pass unchanged."""
    try:
        yield
    except RanncError:
        raise
    except Exception as exc:
        error = _remote_error(describe(), exc, only_with_culprit=True)
        if error is None:
            raise
        raise error from exc


def _remote_error(
    doing: str, exc: BaseException, only_with_culprit: bool = False, timed_out: bool = False
) -> RemoteError | None:
    """The RemoteError for `exc`, posted as the job's failure unless one stands already (then it repeats that
    one). A rank whose wait timed out reports at once (its timeout may close connections, and the peers that see
    them close look for its report); otherwise it first watches for a report or a rank whose heartbeat stops."""
    me = _rank()
    link = _store()
    try:
        failure, silent, statuses = _find_culprit(link, watch=not timed_out)
    except StoreLost:
        host = store_host()
        message = (
            f"rank {me} ({where()}) lost contact with {host}: the job's TCP store, which {host} hosts, stopped "
            f"answering, so {host} has died or been killed (this rank noticed while {doing}: {exc})"
        )
        _fail(Failure(message, me), post=False)
        return RemoteError(message)
    if failure is None and silent:
        gone = "; ".join(
            f"rank {rank} (last seen at {statuses[rank].where()}) stopped responding: it exited, was killed or "
            "is frozen (its heartbeat stopped)"
            for rank in silent
        )
        failure = Failure(gone, me)
    if failure is not None:
        failure = _fail(failure)
        revealed = (
            f": {exc}" if failure.reporter == me else ""
        )  # this rank's error, where it found the failure
        return RemoteError(
            f"rank {me} ({where()}) stops because {failure.message} (this rank was {doing}{revealed})"
        )
    if only_with_culprit:
        return None
    message = (
        f"rank {me} ({where()}) failed while {doing}: {_sentence(exc)} No rank has reported an error"
        f"{_elsewhere(statuses)}. A transfer or collective fails when a peer stays away from it for "
        f"comm_timeout_s ({_settings['timeout_s']:.0f}s, config item): a slow peer, or ranks that called "
        "different things"
    )
    _fail(Failure(message, me))
    return RemoteError(message)


def _find_culprit(link: StoreLink, watch: bool = True) -> tuple[Failure | None, list[int], dict[int, Status]]:
    """The job's failure if one is posted (with `watch`, waiting briefly for one), else the ranks whose heartbeat
    stopped while every other rank's went on, and every rank's status."""
    if link.store is None:
        return None, [], {}
    failure = link.failure()
    if failure is not None:
        return failure, [], {}
    first = link.statuses(_process.world_size)
    others = [rank for rank in first if rank != _rank()] if watch else []
    started = time.monotonic()
    statuses = first
    while others:
        time.sleep(POLL_S / 2)
        failure = link.failure()
        statuses = link.statuses(_process.world_size)
        if failure is not None:
            return failure, [], statuses
        moved = {rank: statuses[rank].beat - first[rank].beat for rank in others}
        silent = sorted(rank for rank, beats in moved.items() if beats == 0)
        waited = time.monotonic() - started
        # Dead ranks are those still silent once every other rank has beaten twice (robust to a loaded host).
        if (
            waited >= 2 * POLL_S and all(beats >= 2 for beats in moved.values() if beats)
        ) or waited > SILENCE_S:
            return None, silent, statuses
    return None, [], statuses


def _skipped_backward(statuses: dict[int, Status]) -> dict[int, str]:
    """Ranks that started a later call than another rank yet ran fewer backward passes: they skipped one.

    Ranks that make the same calls and backwards pass through the same sequence of (calls, backwards) counts,
    both non-decreasing, so however stale a published status is, a rank further on in calls is never behind in
    backwards: this never accuses a rank that did not skip."""
    skippers = {}
    for status in statuses.values():
        ahead = [
            other
            for other in statuses.values()
            if status.calls > other.calls and status.backwards < other.backwards
        ]
        if ahead:
            other = max(ahead, key=lambda o: o.backwards)
            skippers[status.rank] = (
                f"rank {status.rank} ({status.where()}) skipped a backward that the others ran: it has run "
                f"{status.backwards} backward passes by its call {status.calls} of the model, rank {other.rank} "
                f"{other.backwards} by its call {other.calls}"
            )
    return skippers


def _sentence(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _elsewhere(statuses: dict[int, Status]) -> str:
    """The ranks not where this one is (another step, call or number of backward passes), and those whose
    heartbeat is old."""
    mine = _status()
    now = time.time()

    def stale(status: Status) -> bool:  # by that rank's clock: a hint, where the clocks agree
        return now - status.time > 4 * POLL_S

    skipped = "; ".join(_skipped_backward({**statuses, mine.rank: mine}).values())
    away = [
        status
        for rank, status in sorted(statuses.items())
        if rank != mine.rank
        and (
            (status.step, status.doing, status.backwards) != (mine.step, mine.doing, mine.backwards)
            or stale(status)
        )
    ]
    if not away and not skipped:
        return ""
    parts = [skipped] if skipped else []
    for status in away:
        text = f"rank {status.rank} is at {status.where()}"
        if status.backwards != mine.backwards:
            text += f", after {status.backwards} backward passes (this rank: {mine.backwards})"
        if stale(status):
            text += f" (no heartbeat for {now - status.time:.0f}s: it may have died)"
        parts.append(text)
    hint = ""
    if mine.doing is not None and any(status.doing is None for status in away):
        hint = (
            ". A rank outside rannc may be in a collective of its own (such as dist.barrier()): every rank must "
            "make the same rannc calls in the same order (the model's forward and backward, state_dict(), "
            "save_sharded(), load_sharded())"
        )
    return "; " + "; ".join(parts) + hint


# ---- reporting -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Post failures that end the job for the others: any exception but a RanncError (rannc raises those on
    every rank alike), and RemoteErrors (which say who failed)."""
    try:
        yield
    except RemoteError as exc:
        _fail(Failure(str(exc), _rank()))
        raise
    except RanncError:
        raise
    except BaseException as exc:
        _fail(Failure(f"rank {_rank()} ({where()}) failed: {type(exc).__name__}: {exc}", _rank()))
        exc.add_note(f"rannc: raised on rank {_rank()} ({where()}); the other ranks were told and stop")
        raise


def _fail(failure: Failure, post: bool = True) -> Failure:
    """Record that the job failed (posting `failure` unless one stands already) and arm this process's exit;
    return the failure that stands."""
    standing = failure
    if post:
        try:
            standing = _store().post_failure(failure) or failure
        except StoreLost:  # the store's host is gone: this rank can only report for itself
            pass
    if _process.failed is None:
        _process.failed = standing
    if _process.exit_at is None:
        _process.exit_at = time.monotonic() + EXIT_GRACE_S
    return standing


def post_failure(message: str) -> None:
    """Tell the other ranks that this one failed, so they stop instead of waiting for it."""
    _fail(Failure(message, _rank()))


def posted_failure() -> str | None:
    try:
        failure = _store().failure()
    except StoreLost:
        return None
    return None if failure is None else failure.message


def _publish() -> None:
    """Publish this rank's status: the watchdog thread does it at once when told (the main thread never waits
    for the store); without a watchdog, the main thread does it itself."""
    if _process.publish_fd is not None:
        with contextlib.suppress(BlockingIOError):  # a full pipe has a request pending already
            os.write(_process.publish_fd, b"p")
        return
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    try:
        _store().publish(_status())
    except StoreLost:  # the status is a diagnostic only
        pass


def _rank() -> int:
    if _process.watching:
        return _process.rank
    return dist.get_rank() if dist.is_initialized() else 0


_link: StoreLink | None = None


def _store() -> StoreLink:
    """The main thread's store client."""
    global _link
    if _link is None or _link.endpoint != endpoint():
        _link = StoreLink()
    return _link


# ---- the watchdog and the exit -------------------------------------------------------------------------------
def start_watchdog(rank: int, world_size: int | None = None) -> None:
    """From the main thread after torch.distributed is set up: a daemon thread that beats, publishes this rank's
    status and ends the process when the job has failed; SIGTERM and uncaught exceptions are reported, and a
    process exiting after a failure exits at once (see the module's docstring). The process-wide hooks are set
    once; the thread runs until this rank's part of the job ends (`end_watch`), and a later job starts another."""
    _process.rank = rank
    _process.world_size = world_size if world_size is not None else dist.get_world_size()
    if not _process.watching:
        _process.watching = True
        _store()  # connect now: after a failure the store's host may be gone
        _process.signals = _catch_sigterm()
        sys.excepthook = _reporting_excepthook(sys.excepthook)
        atexit.register(_at_exit)
        _process.requests, _process.publish_fd = _pipe()
    running = _process.watchdog
    if running is not None and running.is_alive():
        if not _process.ended:
            return
        running.join(2 * POLL_S)  # an ended job's, still finishing its poll
    _process.ended = False
    _process.watchdog = threading.Thread(
        target=_watch,
        args=(StoreLink(), _process.signals, _process.requests),
        name="rannc-watchdog",
        daemon=True,
    )
    _process.watchdog.start()


def end_watch(timeout_s: float = 2 * POLL_S) -> None:
    """This rank's part of the job is over: stop the watchdog's polls of the job's store (waiting at most
    `timeout_s` for a poll under way). The store lives in rank 0's process group and goes with it, and a poll
    of a store that is gone makes torch print a broken-pipe warning: a launcher calls this on every rank, then a
    barrier, before destroying the group. The watchdog also stops by itself once this rank's group is gone, and
    at exit (rank 0 waiting for the others' watchdogs to stop while its group still stands)."""
    _process.ended = True
    if _process.publish_fd is not None:
        with contextlib.suppress(OSError):
            os.write(_process.publish_fd, b"x")  # wake it now
    if _process.watchdog is not None and _process.watchdog is not threading.current_thread():
        _process.watchdog.join(timeout_s)  # on its way out it tells the store's host (see _at_exit)


def _pipe() -> tuple[int, int]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    return read, write


def _watch(link: StoreLink, signals: int | None, requests: int | None) -> None:
    """Every POLL_S: beat, publish the status, read the job's failure (rank 0: check the backwards); between
    polls, publish the status when the main thread asks and report SIGTERM when it comes."""
    seen_at: float | None = None
    suspects: set[int] = set()
    next_poll = time.monotonic() + POLL_S
    while True:
        ready, _, _ = select.select(
            [fd for fd in (signals, requests) if fd is not None],
            [],
            [],
            max(0.0, next_poll - time.monotonic()),
        )
        if signals in ready and _drained(signals, int(signal.SIGTERM)):
            _terminated(link)
        if _process.ended or not dist.is_initialized():  # the job is over here (see end_watch)
            with contextlib.suppress(StoreLost):
                link.mark_exit(_process.rank)
            return
        if link.endpoint != endpoint():  # this process set up another job
            link = StoreLink()
        if requests in ready:
            _drained(requests)
            with contextlib.suppress(StoreLost):
                link.publish(_status())
        now = time.monotonic()
        if now < next_poll:
            continue
        next_poll = now + POLL_S
        _process.beat += 1
        if _process.exit_at is not None and now >= _process.exit_at:
            _exit_now(link, 1, "")
        try:
            link.publish(_status())
            failure = link.failure()
            if failure is None and _process.rank == 0:  # one rank checks that no rank skipped a backward
                suspects = _check_backwards(link, suspects)
        except StoreLost:
            continue  # the store's host has ended: the job is over, or the waits will name it
        if failure is None or failure.reporter == _process.rank:
            continue
        if _process.failed is None:
            _process.failed = failure
        seen_at = now if seen_at is None else seen_at
        if now - seen_at >= WATCH_GRACE_S:
            _exit_now(link, 1, f"rannc: {_stops_because(failure)}")


def _check_backwards(link: StoreLink, suspects: set[int]) -> set[int]:
    """End the job when a rank skipped a backward (seen on two polls in a row): the ranks still waiting in the
    step's collectives would otherwise wait comm_timeout_s for it. Returns the ranks suspected this poll."""
    skipped = _skipped_backward(link.statuses(_process.world_size))
    if not skipped or not set(skipped) & suspects:
        return set(skipped)
    message = (
        "; ".join(skipped.values())
        + ". The replicas of its stage no longer hold the same weights, so the job "
        "cannot go on: every rank must make the same calls and backwards (to skip a batch, skip it on every rank)"
    )
    standing = link.post_failure(Failure(message, _process.rank)) or Failure(message, _process.rank)
    _process.failed = _process.failed or standing
    _exit_now(link, 1, f"rannc: {_stops_because(standing)}")
    return set()


def _stops_because(failure: Failure) -> str:
    if failure.message.startswith(f"rank {_process.rank} ("):  # about this very rank: it says enough
        return failure.message
    return f"rank {_process.rank} ({where()}) stops because {failure.message}"


def _exit_now(link: StoreLink, code: int, message: str) -> None:
    """End the process now, whatever collective is pending; the store's host first waits (at most LINGER_S) for
    the other ranks to read the failure and exit."""
    with _exit_lock:
        if message:
            print(message, file=sys.stderr, flush=True)
        flusher = threading.Thread(target=logging.shutdown, daemon=True)  # never block on a held handler lock
        flusher.start()
        flusher.join(0.5)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(StoreLost):
            link.mark_exit(_process.rank)
            if hosts_store(_process.rank):
                _linger(link)
        os._exit(code)


def _linger(link: StoreLink) -> None:
    """Keep the store up (at most LINGER_S) while another rank may still need it: until every other rank has
    stopped using it (`StoreLink.mark_exit`) or gone silent (no heartbeat for a second)."""
    started = time.monotonic()
    last_beat: dict[int, tuple[int, float]] = {}
    while time.monotonic() - started < LINGER_S:
        now = time.monotonic()
        for rank, status in link.statuses(_process.world_size).items():
            if rank not in last_beat or last_beat[rank][0] != status.beat:
                last_beat[rank] = (status.beat, now)
        gone = link.exited(_process.world_size)
        waiting = [
            rank
            for rank in range(_process.world_size)
            if rank != _process.rank
            and rank not in gone
            and (now - started < 1.0 or now - last_beat.get(rank, (0, started))[1] < 1.0)
        ]
        if not waiting:
            return
        time.sleep(0.1)


def _at_exit() -> None:
    """atexit: a process leaving after the job failed exits at once (a pending collective would hold it);
    otherwise its watchdog stops, and rank 0, whose process group hosts the job's store, first waits (at most
    LINGER_S) for the ranks still watching it to finish, so that none polls a store that is gone."""
    if _process.failed is not None:
        _exit_now(_store(), 1, "")
    end_watch()
    if hosts_store(_process.rank) and dist.is_initialized():  # (a destroyed group took the store with it)
        with contextlib.suppress(StoreLost):
            _linger(_store())


def _reporting_excepthook(previous: Any) -> Any:
    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        explanation = None
        if isinstance(value, RuntimeError) and not isinstance(value, RanncError):
            # e.g. the user's dist.barrier() failing because a rank's rannc wait timed out: say why
            explanation = _remote_error("running code outside rannc", value, only_with_culprit=True)
        if explanation is None:
            message = f"rank {_rank()} ({where()}) exited with an uncaught {kind.__name__}: {value}"
            _fail(Failure(message, _rank()))
        previous(kind, value, tb)
        if explanation is not None:
            print(f"rannc: {explanation}", file=sys.stderr, flush=True)

    return hook


def _terminated(link: StoreLink) -> None:
    """SIGTERM: report it, then end the process."""
    me = _process.rank
    message = f"rank {me} ({where()}) was terminated (SIGTERM)"
    try:
        standing = link.post_failure(Failure(message, me))
    except StoreLost:
        standing = None
    text = f"rannc: {message}"
    if standing is not None and standing.reporter != me:
        text += f"; the job had already failed: {standing.message}"
    _exit_now(link, 128 + signal.SIGTERM, text)


def _catch_sigterm() -> int | None:
    """Report SIGTERM where its action is the default (ending the process). The Python handler runs only when the
    main thread returns to Python, which a blocked collective delays: the watchdog thread also reads the signal
    from a wakeup pipe (returned here; None when another wakeup fd is set, e.g. by asyncio)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    signal.signal(signal.SIGTERM, lambda signum, frame: _terminated(_store()))
    read, write = _pipe()
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # another listener (an asyncio loop): keep it
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return None
    return read


def _drained(fd: int, wanted: int | None = None) -> bool:
    """Read what the pipe holds; True when it held the byte `wanted`."""
    found = False
    with contextlib.suppress(BlockingIOError):
        while data := os.read(fd, 512):
            found = found or (wanted is not None and wanted in data)
    return found
