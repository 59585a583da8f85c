"""Process group setup from torchrun's environment, the rank's device, and subgroups per rank set."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def ensure_initialized(timeout_s: float = 300.0) -> None:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT unless the user did.

    NCCL when CUDA is available, gloo otherwise. Without those variables, run as a single process.
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
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info(
        "initialised torch.distributed (%s), rank %d of %d", backend, dist.get_rank(), dist.get_world_size()
    )


def _free_port() -> int:
    import socket

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
