"""Tests of the multi-process harness itself (tests/distributed_helpers.py), with real spawned processes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import find_free_port, run_workers

# ----------------------------------------------------------------------------------------------------------------
# Workers (module level so that the children can import them by name)
# ----------------------------------------------------------------------------------------------------------------


def allreduce_worker(rank: int, world_size: int, scale: float) -> dict[str, Any]:
    value = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(value)
    gathered = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    return {
        "sum": value.item(),
        "gathered": [t.item() for t in gathered],
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "env": {
            key: os.environ.get(key)
            for key in (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                "HF_HUB_OFFLINE",
                "EXTRA",
            )
        },
        "threads": torch.get_num_threads(),
        "tensor": torch.arange(4.0) + rank,  # tensors must come back by value
    }


def failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    time.sleep(1000)  # rank 0 hangs without noticing: the harness must kill it instead of waiting


def failing_collective_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 waits in a collective for a rank that never comes


def crashing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(7)  # dies without reporting anything
    dist.barrier()


def sleeping_worker(rank: int, world_size: int, pid_dir: str) -> None:
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(1000)


def single_worker(rank: int, world_size: int) -> tuple[int, int]:
    value = torch.tensor([5.0])
    dist.all_reduce(value)
    return world_size, int(value.item())


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; look at its state where /proc exists.
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


def test_allreduce_two_ranks() -> None:
    results = run_workers(allreduce_worker, 2, 1.5, timeout=120, env={"EXTRA": "yes"})
    assert len(results) == 2
    for rank, result in enumerate(results):
        assert result["sum"] == pytest.approx(1.5 + 3.0)
        assert result["gathered"] == [0.0, 1.0]
        assert result["rank"] == rank
        assert result["world_size"] == 2
        assert result["backend"] == "gloo"
        env = result["env"]
        assert env["RANK"] == str(rank)
        assert env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["MASTER_PORT"] is not None and int(env["MASTER_PORT"]) > 0
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["EXTRA"] == "yes"
        assert result["threads"] == 1
        torch.testing.assert_close(result["tensor"], torch.arange(4.0) + rank, rtol=0, atol=0)
    assert results[0]["env"]["MASTER_PORT"] == results[1]["env"]["MASTER_PORT"]


def test_single_process() -> None:
    assert run_workers(single_worker, 1, timeout=120) == [(1, 5)]


def test_exception_is_reported_with_traceback_and_does_not_hang() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_workers(failing_worker, 2, timeout=120, failure_grace=2.0)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "----- rank 1 -----" in message
    assert "Traceback (most recent call last)" in message
    assert "ValueError: boom from rank 1" in message
    assert "failing_worker" in message  # the frame that raised is named
    assert "ranks [0] did not report" in message  # rank 0 was stuck in the barrier and got killed
    assert elapsed < 60, (
        f"failure took {elapsed:.1f}s to be reported; the 120s timeout must not be waited out"
    )


def test_exception_while_peer_waits_in_collective() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_workers(failing_collective_worker, 2, timeout=120, failure_grace=2.0)
    message = str(info.value)
    assert "ValueError: boom from rank 1" in message
    # rank 0 either reports gloo's "connection closed" error or is killed after the grace period
    assert "----- rank 0 -----" in message or "ranks [0] did not report" in message
    assert time.monotonic() - start < 60


def test_child_dying_without_report_is_detected() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 exited with exit code 7 without reporting"):
        run_workers(crashing_worker, 2, timeout=120, failure_grace=2.0)
    assert time.monotonic() - start < 60


def test_timeout_kills_all_ranks(tmp_path: Path) -> None:
    start = time.monotonic()
    # 20 s: both children import torch and write their pid first, which takes over 8 s on a loaded 2-core machine
    with pytest.raises(AssertionError, match=r"timed out after 20s") as info:
        run_workers(sleeping_worker, 2, str(tmp_path), timeout=20)
    elapsed = time.monotonic() - start
    assert elapsed < 60
    assert "ranks [0, 1] did not report" in str(info.value)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2, "both ranks should have started within the timeout"
    assert not any(_alive(pid) for pid in pids), "children still alive after the timeout"


def test_rejects_non_module_level_worker() -> None:
    def local_worker(rank: int, world_size: int) -> None:  # pragma: no cover - never runs
        pass

    with pytest.raises(TypeError, match="module-level function"):
        run_workers(local_worker, 2)
    with pytest.raises(TypeError, match="module-level function"):
        run_workers(lambda rank, world_size: None, 2)


def test_find_free_port() -> None:
    port = find_free_port()
    assert 0 < port < 65536
