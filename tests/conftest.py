"""Shared test setup: importable helper modules, offline Hugging Face, and a rannc config isolated from the host."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    # The helper modules (distributed_helpers, models, reference) are imported by plain name, here and in the
    # spawned worker processes (which inherit this sys.path).
    sys.path.insert(0, str(TESTS_DIR))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_rannc_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No RANNC_* variable or ~/.pyrannc/rannc_conf.toml of the host leaks into any test (or its workers)."""
    patch = pytest.MonkeyPatch()
    for key in list(os.environ):
        if key.startswith("RANNC_"):
            patch.delenv(key)
    conf_dir = tmp_path_factory.mktemp("rannc_conf")
    patch.setenv("RANNC_CONF_DIR", str(conf_dir))
    try:
        yield conf_dir
    finally:
        patch.undo()
