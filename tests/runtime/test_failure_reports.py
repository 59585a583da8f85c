"""What the ranks tell each other about failures, without processes: the job store's notice board and the check
that no rank skipped a backward."""

from __future__ import annotations

import datetime
import random

import pytest
import torch.distributed as dist
from distributed_helpers import find_free_port

from rannc.runtime import failures
from rannc.runtime.job_store import Failure, Status, StoreLink


def _status(rank: int, calls: int, backwards: int, doing: str | None = None) -> Status:
    return Status(rank=rank, beat=0, step=calls, stage=0, calls=calls, backwards=backwards, doing=doing)


def test_ranks_on_one_sequence_are_never_suspected() -> None:
    """Ranks that make the same calls and backwards are at positions of one sequence, however far apart (stale
    statuses included): none is ever taken for one that skipped a backward."""
    generator = random.Random(0)
    for _ in range(200):
        positions, calls, backwards = [(0, 0)], 0, 0
        for _ in range(30):  # training calls (forward then backward), and calls without a backward (eval)
            calls += 1
            positions.append((calls, backwards))
            if generator.random() < 0.8:
                backwards += 1
                positions.append((calls, backwards))
        statuses = {rank: _status(rank, *generator.choice(positions)) for rank in range(4)}
        assert failures._skipped_backward(statuses) == {}, statuses


def test_a_rank_that_skipped_a_backward_is_named() -> None:
    statuses = {
        0: _status(0, calls=3, backwards=3, doing="the backward"),
        1: _status(
            1, calls=4, backwards=2, doing="the forward"
        ),  # caught an exception before step 3's backward
        2: _status(2, calls=4, backwards=3, doing="the forward"),
        3: _status(3, calls=3, backwards=3, doing="the backward"),
    }
    suspects = failures._skipped_backward(statuses)
    assert list(suspects) == [1]
    assert suspects[1].startswith(
        "rank 1 (step 4, stage 0, in the forward) skipped a backward that the others ran"
    )


def test_status_says_where_a_rank_is() -> None:
    assert _status(2, 5, 4, "state_dict()").where() == "step 5, stage 0, in state_dict()"
    assert _status(2, 5, 5).where() == "step 5, stage 0, outside rannc"


def test_store_notice_board(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first failure posted stands; statuses and exits are read back for every rank."""
    port = find_free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    first, second = StoreLink(), StoreLink()
    assert first.failure() is None
    assert first.post_failure(
        Failure("rank 1 (step 3, stage 0, in the forward) was terminated", 1)
    ) == Failure("rank 1 (step 3, stage 0, in the forward) was terminated", 1)
    standing = second.post_failure(Failure("rank 2 (step 3, stage 1, in the forward) stops", 2))
    assert standing is not None and standing.reporter == 1
    assert second.failure() == standing
    first.publish(_status(0, 3, 2, "the backward"))
    second.publish(_status(3, 4, 3))
    statuses = first.statuses(4)
    assert sorted(statuses) == [0, 3] and statuses[0].doing == "the backward" and statuses[3].calls == 4
    second.mark_exit(3)
    assert first.exited(4) == {3}
    del server
