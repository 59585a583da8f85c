"""Tests of profile_blocks: the disk cache, corrupt caches, errors, and the task spread over 2 gloo ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from profile_ranks import mlp_runners, profile_twice, run_ranks

import rannc.profile.distributed as profile_distributed
from rannc.config import Config
from rannc.errors import RanncError
from rannc.profile import BlockRunner, profile_blocks
from rannc.profile.measure import usable_cores

SIZES = [1, 4, 16]
CACHE_FORMAT = profile_distributed._CACHE_FORMAT


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[int, ...]]]:
    """Records (block id, sizes) of every measure_block call made by profile_blocks."""
    recorded: list[tuple[int, tuple[int, ...]]] = []
    measure = profile_distributed.measure_block

    def counting_measure(runner: BlockRunner, microbatch_sizes: list[int], *args: Any, **kwargs: Any) -> Any:
        recorded.append((id(runner), tuple(microbatch_sizes)))
        return measure(runner, microbatch_sizes, *args, **kwargs)

    monkeypatch.setattr(profile_distributed, "measure_block", counting_measure)
    return recorded


def make_config(tmp_path: Path, **changes: Any) -> Config:
    return Config(
        profile_cache_dir=str(tmp_path / "cache"), show_progress=False, profile_iterations=1
    ).replace(**changes)


def test_second_call_reads_everything_from_the_cache(tmp_path: Path, calls: list[Any]) -> None:
    runners = mlp_runners(2)
    config = make_config(tmp_path)
    first = profile_blocks(runners, SIZES, cache_key="k1", config=config)
    assert len(calls) == 2 * len(SIZES)
    assert [sorted(p.fwd_time) for p in first] == [SIZES, SIZES]
    path = tmp_path / "cache" / f"k1-1of{usable_cores()}cores-cpu.json"
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind

    calls.clear()
    second = profile_blocks(runners, SIZES, cache_key="k1", config=config)
    assert calls == []
    assert second == first

    calls.clear()
    third = profile_blocks(runners, [*SIZES, 2], cache_key="k1", config=config)
    assert sorted(size for _, size in calls) == [(2,), (2,)]
    assert [p.fwd_time[16] for p in third] == [p.fwd_time[16] for p in first]

    calls.clear()
    profile_blocks(runners, SIZES, cache_key="other", config=config)
    assert len(calls) == 2 * len(SIZES)


def test_progress_bar_and_log(tmp_path: Path, calls: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, show_progress=True)
    with caplog.at_level(logging.INFO, logger=profile_distributed.__name__):
        profile_blocks(mlp_runners(1), SIZES, cache_key="p", config=config)
        profile_blocks(mlp_runners(1), SIZES, cache_key="p", config=config)
    messages = [r.getMessage() for r in caplog.records]
    assert "0 cached, 3 measured" in messages[0]
    assert "3 cached, 0 measured" in messages[1]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"format": "other", "entries": {}}',
        # a file of the current format with a bad entry (an older format is replaced quietly:
        # tests/profile/test_profile_cache_files.py)
        json.dumps({"format": CACHE_FORMAT, "entries": {"0:1": {"fwd": -1}}}),
    ],
)
def test_corrupt_cache_is_ignored_and_replaced(
    tmp_path: Path, calls: list[Any], caplog: pytest.LogCaptureFixture, content: str
) -> None:
    path = tmp_path / "cache" / f"bad-1of{usable_cores()}cores-cpu.json"
    path.parent.mkdir()
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        profiles = profile_blocks(mlp_runners(1), SIZES, cache_key="bad", config=make_config(tmp_path))
    assert len(calls) == len(SIZES)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert sorted(json.loads(path.read_text())["entries"]) == ["0:1", "0:16", "0:4"]
    assert len(profiles) == 1


def test_unwritable_cache_directory_only_warns(
    tmp_path: Path, calls: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("user data")
    config = make_config(tmp_path).replace(profile_cache_dir=str(blocker / "cache"))
    with caplog.at_level(logging.WARNING):
        profiles = profile_blocks(mlp_runners(1), [2], cache_key="x", config=config)
    assert profiles[0].fwd_time[2] > 0
    assert blocker.read_text() == "user data"
    assert any("cannot write" in r.getMessage() for r in caplog.records)


def test_measurement_error_names_the_block(tmp_path: Path) -> None:
    def broken(x: torch.Tensor) -> tuple[torch.Tensor]:
        raise RuntimeError("boom")

    runners = [*mlp_runners(1), BlockRunner(broken, lambda m: [torch.randn(m, 4)], frozenset())]
    with pytest.raises(RanncError, match="block 1 at microbatch size") as info:
        profile_blocks(runners, [2], cache_key="err", config=make_config(tmp_path))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_costs_measured_by_another_number_of_ranks_are_measured_again(
    tmp_path: Path, calls: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPUs the ranks of a host measure at once and share its cores: a cache written by one rank does not
    serve a job of 4 ranks on this host (each then gets half a core or less), nor the other way round."""
    runners, config = mlp_runners(1), make_config(tmp_path)
    alone = profile_blocks(runners, SIZES, cache_key="k", config=config)
    assert len(calls) == len(SIZES)
    calls.clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    profile_blocks(runners, SIZES, cache_key="k", config=config)
    assert len(calls) == len(SIZES)  # measured again, and kept apart
    assert (tmp_path / "cache" / f"k-4of{usable_cores()}cores-cpu.json").exists()
    calls.clear()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert profile_blocks(runners, SIZES, cache_key="k", config=config) == alone and calls == []


def test_no_blocks_and_bad_sizes(tmp_path: Path) -> None:
    assert profile_blocks([], [1], cache_key="e", config=make_config(tmp_path)) == []
    with pytest.raises(ValueError):
        profile_blocks(mlp_runners(1), [], cache_key="e", config=make_config(tmp_path))


@pytest.mark.slow
def test_two_ranks_split_the_tasks_and_agree(tmp_path: Path) -> None:
    num_blocks = 3
    run_ranks(profile_twice, 2, (str(tmp_path), SIZES, num_blocks), timeout_s=90)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    total = num_blocks * len(SIZES)
    first0, first1 = rank0[0], rank1[0]
    assert first0["measured"] + first1["measured"] == total
    assert 0 < first0["measured"] < total and 0 < first1["measured"] < total
    assert json.dumps(first0["profiles"]) == json.dumps(first1["profiles"])
    # Second round: everything comes from the cache rank 0 wrote, on both ranks.
    assert rank0[1]["measured"] == rank1[1]["measured"] == 0
    assert rank0[1]["profiles"] == first0["profiles"] == rank1[1]["profiles"]
    assert (tmp_path / "cache" / f"mlp-2of{usable_cores()}cores-cpu.json").exists()
