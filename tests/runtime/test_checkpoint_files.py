"""The files of a sharded checkpoint in one process: atomic replacement, the completion marker, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rannc.errors import RanncError
from rannc.runtime import checkpoint
from rannc.runtime.checkpoint import COMPLETE_MARKER, check_complete, load_sharded, save_sharded

# No process group: torch.distributed.checkpoint saves and loads as one process (and says so).
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.full((3,), value)}


def save(path: Path, value: float) -> None:
    save_sharded(path, checkpoint.local_state(weights(value), {"w", "b"}, None))


def load(path: Path) -> dict[str, torch.Tensor]:
    tensors = weights(-1.0)
    load_sharded(path, tensors, {"w", "b"}, None)
    return tensors


def test_save_writes_a_marked_checkpoint_and_no_staging_directory(tmp_path: Path) -> None:
    save(tmp_path / "ckpt", 2.0)
    marker = json.loads((tmp_path / "ckpt" / COMPLETE_MARKER).read_text())
    assert marker["format"] == "rannc-sharded-checkpoint" and marker["world_size"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(load(tmp_path / "ckpt")["w"], torch.full((4, 3), 2.0))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_save_replaces_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # a file system without RENAME_EXCHANGE
        monkeypatch.setattr(checkpoint, "_exchange", lambda first, second: False)
    save(tmp_path / "ckpt", 2.0)
    (tmp_path / "ckpt.tmp-deadbeef").mkdir()  # left by an earlier interrupted save
    save(tmp_path / "ckpt", 4.0)
    assert torch.equal(load(tmp_path / "ckpt")["b"], torch.full((3,), 4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_a_directory_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(
        RanncError, match="holds files that are not a sharded checkpoint.*new or empty directory"
    ):
        save(tmp_path / "data", 1.0)
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_directory_without_marker_is_incomplete(tmp_path: Path) -> None:
    save(tmp_path / "ckpt", 2.0)
    (tmp_path / "ckpt" / COMPLETE_MARKER).unlink()  # as a checkpoint written in place and interrupted
    with pytest.raises(RanncError, match=r"ckpt is incomplete: it lacks the completion marker.*interrupted"):
        load(tmp_path / "ckpt")


def test_staging_directory_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "ckpt.tmp-0123").mkdir()
    with pytest.raises(
        RanncError, match=r"staging directory of a save_sharded to .*ckpt that did not finish"
    ):
        check_complete(tmp_path / "ckpt.tmp-0123")
    with pytest.raises(
        RanncError, match=r"no checkpoint at .*ckpt: a save_sharded to it was interrupted.*tmp-0123"
    ):
        check_complete(tmp_path / "ckpt")


def test_complete_copies_beside_a_missing_target_are_named(tmp_path: Path) -> None:
    """A crash between the two renames (file systems without an atomic exchange) leaves both copies whole."""
    save(tmp_path / "ckpt", 2.0)
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old-77")
    with pytest.raises(
        RanncError, match=r"ckpt\.old-77 is a complete checkpoint.*rename the one you want to"
    ):
        check_complete(tmp_path / "ckpt")


def test_missing_and_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(RanncError, match="does not exist; pass the directory written by save_sharded"):
        check_complete(tmp_path / "nothing")
    save(tmp_path / "ckpt", 2.0)
    (tmp_path / "ckpt" / COMPLETE_MARKER).write_text("{")
    with pytest.raises(RanncError, match="completion marker .* is unreadable"):
        check_complete(tmp_path / "ckpt")
