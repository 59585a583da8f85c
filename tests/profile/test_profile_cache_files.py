"""Profile cache files: another rannc's format is replaced quietly; a damaged file is reported, never trusted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rannc.profile import distributed


def test_a_cache_of_an_older_format_is_replaced_without_calling_it_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"format": "rannc-block-profiles/2", "entries": {"0:1": {}}}))
    with caplog.at_level(logging.INFO, logger=distributed.logger.name):
        assert distributed._read_cache(path) == {}
    assert "of an older rannc (rannc-block-profiles/2" in caplog.text
    assert "corrupt" not in caplog.text


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "something else"}), json.dumps([1, 2])])
def test_a_damaged_cache_is_reported_and_ignored(
    text: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger=distributed.logger.name):
        assert distributed._read_cache(path) == {}
    assert "is corrupt" in caplog.text
