"""The job's TCP store as the ranks' notice board: the job's first failure, and each rank's status and heartbeat.

Every rank reaches the store torch.distributed was set up with (MASTER_ADDR:MASTER_PORT) over a client of its
own, so a rank blocked inside a collective can still be read by the others: what it is doing, and whether its
watchdog thread is still beating.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any

import torch.distributed as dist

FAILED_KEY = "rannc/failed"
STATUS_PREFIX = "rannc/status/"
EXITED_PREFIX = "rannc/exited/"


class StoreLost(Exception):
    """The store stopped answering: the process hosting it has ended."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """The job's first failure: the one every rank reports."""

    message: (
        str  # who failed and how, e.g. "rank 1 (step 3, stage 0, in the forward) was terminated (SIGTERM)"
    )
    reporter: int  # the rank that posted it


@dataclasses.dataclass(frozen=True)
class Status:
    """What a rank is doing, as far as rannc knows."""

    rank: int
    beat: int  # its watchdog thread's heartbeats so far (one per poll)
    step: int  # the wrapped model's step: its calls so far, the current one included
    stage: int | None
    calls: int  # calls of rannc-wrapped models so far (all of the process's), the current one included
    backwards: int  # backward passes through their outputs so far (all of the process's)
    doing: str | None  # the rannc call it is in ("the forward", "state_dict()"); None: outside rannc
    time: float = 0.0  # time.time() when published (by the rank's clock)

    def where(self) -> str:
        """e.g. "step 3, stage 0, in the forward" or "step 2, stage 1, outside rannc"."""
        parts = [f"step {self.step}"]
        if self.stage is not None:
            parts.append(f"stage {self.stage}")
        parts.append(f"in {self.doing}" if self.doing else "outside rannc")
        return ", ".join(parts)


def store_host() -> str:
    """Who hosts the store: torchrun's agent when it says so, else rank 0 (torch.distributed's env:// default)."""
    return "torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"


def endpoint() -> tuple[str | None, str | None]:
    """Where the job's store listens (a process may set up a later job on another port)."""
    return os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")


def hosts_store(rank: int) -> bool:
    return rank == 0 and store_host() == "rank 0"


class StoreLink:
    """A private client of the job's store (a client must not be shared across threads); `store` is None when
    the job was not set up from MASTER_ADDR/MASTER_PORT (e.g. a file:// init), and every method is then a no-op."""

    def __init__(self) -> None:
        self.store: Any = None
        self.endpoint = endpoint()
        addr, port = self.endpoint
        if addr and port:
            try:
                self.store = dist.TCPStore(
                    addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=10)
                )
            except Exception:  # no reachable store: failures still surface by timeout
                self.store = None

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.store, method)(*args)
        except Exception as exc:
            raise StoreLost(str(exc)) from exc

    def post_failure(self, failure: Failure) -> Failure | None:
        """Post `failure` unless one is posted already; return the one that stands (the first)."""
        if self.store is None:
            return None
        value = json.dumps(dataclasses.asdict(failure))
        return _failure(self._call("compare_set", FAILED_KEY, "", value))

    def failure(self) -> Failure | None:
        if self.store is None or not self._call("check", [FAILED_KEY]):
            return None
        return _failure(self._call("get", FAILED_KEY))

    def publish(self, status: Status) -> None:
        if self.store is not None:
            self._call("set", f"{STATUS_PREFIX}{status.rank}", json.dumps(dataclasses.asdict(status)))

    def statuses(self, world_size: int) -> dict[int, Status]:
        """The last status every rank published (ranks that published none are left out)."""
        if self.store is None:
            return {}
        keys = [f"{STATUS_PREFIX}{rank}" for rank in range(world_size)]
        present = keys if self._call("check", keys) else [key for key in keys if self._call("check", [key])]
        values = self._call("multi_get", present) if present else []
        return {status.rank: status for status in (Status(**json.loads(v)) for v in values)}

    def mark_exit(self, rank: int) -> None:
        """`rank` no longer uses the store: its process is ending (after a failure), or its part of the job is
        over."""
        if self.store is not None:
            self._call("set", f"{EXITED_PREFIX}{rank}", "1")

    def exited(self, world_size: int) -> set[int]:
        if self.store is None:
            return set()
        return {rank for rank in range(world_size) if self._call("check", [f"{EXITED_PREFIX}{rank}"])}


def _failure(raw: bytes) -> Failure:
    return Failure(**json.loads(raw.decode()))
