"""A rank that raises, is killed or hangs: every other rank exits non-zero soon, saying what happened."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_helpers import find_free_port

SCRIPT = Path(__file__).with_name("failure_script.py")


def _launch(mode: str, tmp_path: Path, timeout_s: float = 8.0) -> list[dict]:
    port = find_free_port()
    procs = []
    for rank in range(4):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE="4",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            TEST_COMM_TIMEOUT=str(timeout_s),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), mode, str(tmp_path / "cache")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    deadline = time.time() + 240
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} hung: it did not exit within the deadline ({mode})")
        results.append({"rank": rank, "code": proc.returncode, "out": out, "err": err, "end": time.time()})
    return results


def _failure_time(results: list[dict], marker: str) -> float:
    for r in results:
        for line in r["out"].splitlines():
            if marker in line:
                return float(line.rsplit(" ", 1)[-1])
    raise AssertionError(f"no '{marker}' line in any rank's output")


@pytest.mark.slow
def test_exception_in_a_stage_surfaces_on_every_rank(tmp_path: Path) -> None:
    results = _launch("raise", tmp_path)
    origin = [r for r in results if "rannc: raised on rank" in r["err"]]
    assert len(origin) == 1, "exactly one rank should raise the original error"
    failed = origin[0]["rank"]
    assert f"rank {failed} (step 3, stage" in origin[0]["err"]
    for r in results:
        assert r["code"] != 0, f"rank {r['rank']} exited 0 although rank {failed} failed:\n{r['err'][-2000:]}"
        text = r["err"]
        assert f"rank {failed} (step 3, stage" in text, (
            f"rank {r['rank']} does not name the failing rank and stage"
        )
        assert "IndexError: index out of range" in text, (
            f"rank {r['rank']} lacks the original error:\n{text[-2000:]}"
        )


@pytest.mark.slow
def test_killed_rank_ends_the_job(tmp_path: Path) -> None:
    started = time.time()
    results = _launch("kill", tmp_path, timeout_s=8.0)
    killed_at = _failure_time(results, "killing itself")
    for r in results[:3]:
        assert r["code"] != 0, f"rank {r['rank']} exited 0 after rank 3 was killed"
        assert "rank" in r["err"] and ("stops because" in r["err"] or "failed while" in r["err"]), r["err"][
            -2000:
        ]
    latest = max(r["end"] for r in results[:3])
    print(
        f"other ranks ended {latest - killed_at:.1f}s after rank 3 was killed (run took {latest - started:.0f}s)"
    )
    assert latest - killed_at < 30


@pytest.mark.slow
def test_hanging_rank_is_named(tmp_path: Path) -> None:
    results = _launch("hang", tmp_path, timeout_s=5.0)
    hung_at = _failure_time(results, "hanging at")
    for r in results[:3]:
        assert r["code"] != 0
    assert all("rank 3" in r["err"] for r in results[:3]), (
        "every rank should name rank 3, the one that stopped"
    )
    latest = max(r["end"] for r in results[:3])
    print(f"other ranks ended {latest - hung_at:.1f}s after rank 3 stopped answering")
    assert latest - hung_at < 30
