"""Resuming from full state dicts (`model.state_dict()` and `optimizer.state_dict(from_global=True)`, saved by
rank 0) in a new job, on one stage of 2 replicas and on 2 stages of 1 replica: training goes on exactly as if it
had never stopped (SGD with momentum, rtol 1e-5), whether every rank reads the file (`torch.load(weights_only=True)`)
or the ranks are handed the state dicts in memory (shared memory, as torch.multiprocessing.spawn passes them)."""

from __future__ import annotations

import pytest
import resume_workers as workers
import torch
from distributed_helpers import run_workers
from test_user_loops import assert_close

PLANS = {"1stage-x-2replicas": (1, [[0, 1]]), "2stages-x-1replica": (2, [[0], [1]])}


@pytest.mark.slow
@pytest.mark.parametrize("plan", list(PLANS))
def test_full_state_dicts_resume_exactly(tmp_path, plan: str) -> None:
    partition_num, expected_stages = PLANS[plan]
    cache, path = str(tmp_path / "cache"), str(tmp_path / "checkpoint.pt")
    straight = run_workers(workers.train_and_save, 2, cache, partition_num, path, timeout=300)
    assert straight[0]["stages"] == expected_stages
    reference = workers.one_process()
    assert_close(
        straight[0]["final"], reference, f"{plan}: {workers.STEPS} steps straight through vs one process"
    )
    # the in-memory handover: read in this process, passed to the spawned ranks (moved to shared memory)
    in_memory = torch.load(path, weights_only=True)
    for how, checkpoint in [("from the file", path), ("in memory", in_memory)]:
        resumed = run_workers(workers.resume, 2, cache, partition_num, checkpoint, timeout=300)
        assert resumed[0]["stages"] == expected_stages
        what = f"{plan}: resumed {how} after {workers.SAVED_AT} steps"
        assert_close(resumed[0]["final"], straight[0]["final"], f"{what} vs straight through")
        assert_close(resumed[0]["final"], reference, f"{what} vs one process")
