"""Process group setup from torchrun's environment, the rank's device, and subgroups per rank set."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import threading
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, LaunchError

_PROBE_TIMEOUT_S = 2.0

logger = logging.getLogger(__name__)


def ensure_initialized(timeout_s: float = 300.0) -> None:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT unless the user did.

    NCCL when CUDA is available, gloo otherwise. Without those variables, run as a single process. Joining the
    job takes at most `timeout_s` (config item timeout_s); otherwise LaunchError names the address and port.
    """
    if dist.is_available() and dist.is_initialized():
        return
    env = os.environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ConfigError(
            f"torch.distributed is not initialised and {', '.join(missing)} is not set; launch with "
            "`torchrun --nproc-per-node N script.py` or call torch.distributed.init_process_group first"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    endpoint = Rendezvous.from_environment(timeout_s)
    store = endpoint.connect()
    try:
        dist.init_process_group(
            backend,
            store=store,
            rank=endpoint.rank,
            world_size=endpoint.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except Exception as exc:
        raise endpoint.group_failed(store, exc) from exc
    logger.info(
        "initialised torch.distributed (%s), rank %d of %d", backend, dist.get_rank(), dist.get_world_size()
    )


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a job meet: the TCP store at MASTER_ADDR:MASTER_PORT, hosted by rank 0.

    torch.distributed's own rendezvous ignores its timeout when the port answers but is not a store (e.g. held
    by another program): the connection is made here in a thread that is abandoned when the time is up.
    """

    address: str
    port: int
    rank: int
    world_size: int
    timeout_s: float
    hosted_here: bool  # rank 0 hosts the store, unless torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE)

    @classmethod
    def from_environment(cls, timeout_s: float) -> Rendezvous:
        env = os.environ
        try:
            port, rank, world_size = int(env["MASTER_PORT"]), int(env["RANK"]), int(env["WORLD_SIZE"])
        except ValueError as exc:
            raise ConfigError(f"RANK, WORLD_SIZE and MASTER_PORT must be integers: {exc}") from None
        agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        return cls(env["MASTER_ADDR"], port, rank, world_size, timeout_s, rank == 0 and not agent_store)

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port} (MASTER_ADDR:MASTER_PORT)"

    def connect(self) -> dist.Store:
        """The job's store within `timeout_s`, or a LaunchError saying what could not be bound or reached."""
        outcome: dict[str, Any] = {}

        def rendezvous() -> None:
            try:
                # As torch.distributed's env:// rendezvous, but rank 0 does not wait for the others here:
                # init_process_group waits for them, and names the ranks that never came when it fails.
                outcome["store"] = dist.TCPStore(
                    self.address,
                    self.port,
                    self.world_size,
                    is_master=self.hosted_here,
                    timeout=datetime.timedelta(seconds=self.timeout_s),
                    wait_for_workers=False,
                    multi_tenant=self.hosted_here,
                )
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=rendezvous, name="rannc-rendezvous", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if "store" in outcome:
            store = outcome["store"]
            store.set(self._joined_key(self.rank), "1")
            return store
        error = outcome.get("error")
        if self.hosted_here and error is not None:
            raise self._bind_failed(error) from error
        raise LaunchError(
            f"rank {self.rank} could not join the job's rendezvous at {self.where} within {self.timeout_s:.0f} s "
            f"(config item timeout_s): {self._probe()}. Check that rank 0 started and is alive (its log), that "
            "MASTER_ADDR and MASTER_PORT name rank 0's host and a free port, and that no firewall blocks it"
        ) from error

    def _bind_failed(self, exc: BaseException) -> LaunchError:
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
            return LaunchError(
                f"rank 0 cannot host the job's rendezvous at {self.where}: the port is already in use (by another "
                "job, or a process of an earlier run still alive). Choose a free MASTER_PORT (torchrun "
                "--master-port) for every rank, or end the process that holds it"
            )
        return LaunchError(
            f"rank 0 cannot host the job's rendezvous at {self.where}: {exc}. MASTER_ADDR must be an address of "
            "rank 0's host and MASTER_PORT a free port"
        )

    def _probe(self) -> str:
        """What is at the rendezvous address, seen from here (one plain TCP connection)."""
        try:
            with socket.create_connection((self.address, self.port), timeout=_PROBE_TIMEOUT_S):
                return (
                    "something accepts connections there but does not answer as a torch.distributed store: "
                    "another program probably holds the port (rank 0 then failed to bind it; see its log)"
                )
        except ConnectionRefusedError:
            return "nothing listens there (connection refused)"
        except OSError as exc:
            return f"no connection could be made ({exc})"

    def group_failed(self, store: dist.Store, exc: BaseException) -> LaunchError:
        """init_process_group failed after the store was reached: name the ranks that never joined."""
        try:
            absent = [r for r in range(self.world_size) if not store.check([self._joined_key(r)])]
        except Exception:  # the store's host is gone: no more detail to give
            absent = []
        if absent:
            return LaunchError(
                f"rank {self.rank} waited {self.timeout_s:.0f} s (config item timeout_s) at {self.where} for "
                f"rank{'s' if len(absent) > 1 else ''} {', '.join(map(str, absent))} of {self.world_size}, which "
                f"never joined: start all {self.world_size} processes (WORLD_SIZE) with the same MASTER_ADDR and "
                "MASTER_PORT, and check the absent ranks' logs"
            )
        return LaunchError(
            f"rank {self.rank} could not set up the process group of {self.world_size} ranks (rendezvous at "
            f"{self.where}, timeout {self.timeout_s:.0f} s, config item timeout_s): {exc}"
        )

    @staticmethod
    def _joined_key(rank: int) -> str:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
        return f"rannc/joined/{attempt}/{rank}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


class GroupCache:
    """One process group per rank set and purpose. Every rank must ask for the same sets in the same order."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, tuple[int, ...]], dist.ProcessGroup | None] = {}

    def create_all(self, rank_sets: list[tuple[int, ...]], purpose: str = "") -> None:
        for ranks in sorted(set(rank_sets)):
            self.get(ranks, purpose)

    def get(self, ranks: tuple[int, ...], purpose: str = "") -> dist.ProcessGroup | None:
        """The group of `ranks` (None: the default group, for the whole world). A `purpose` gets groups of its
        own, the whole world included, so that its collectives never queue behind others' (gradient buckets
        in flight must not delay the loss's allreduce on the default group)."""
        key = (purpose, tuple(sorted(ranks)))
        if key not in self._groups:
            if not purpose and len(key[1]) == get_world_size():
                self._groups[key] = None  # the default group
            else:
                self._groups[key] = dist.new_group(list(key[1]))
        return self._groups[key]

    def destroy(self) -> None:
        """Destroy the groups made here (every rank, e.g. when a module is undeployed); the default one stays."""
        for group in self._groups.values():
            if group is not None:
                dist.destroy_process_group(group)
        self._groups.clear()
