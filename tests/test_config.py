"""Tests of rannc.config: defaults, the TOML file, RANNC_* variables, keyword overrides and validation."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from rannc.config import Config, config_file_path, load_config
from rannc.errors import ConfigError


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point RANNC_CONF_DIR at an empty folder and drop every RANNC_* variable of the caller."""
    import os

    for key in list(os.environ):
        if key.startswith("RANNC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RANNC_CONF_DIR", str(tmp_path))
    return tmp_path


def write_conf(folder: Path, text: str) -> Path:
    path = folder / "rannc_conf.toml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    assert load_config() == Config()


def test_file_location_follows_rannc_conf_dir(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_file_path() == isolated / "rannc_conf.toml"
    monkeypatch.delenv("RANNC_CONF_DIR")
    assert config_file_path() == Path.home() / ".pyrannc" / "rannc_conf.toml"


def test_toml_file_is_read(isolated: Path) -> None:
    write_conf(
        isolated, 'mem_limit_gb = 12.5\npartition_num = 2\nschedule = "fill_drain"\nsave_deployment = true\n'
    )
    config = load_config()
    assert config.mem_limit_gb == 12.5
    assert config.partition_num == 2
    assert config.schedule == "fill_drain"
    assert config.save_deployment is True


def test_toml_int_is_coerced_to_float(isolated: Path) -> None:
    write_conf(isolated, "mem_limit_gb = 3\n")
    config = load_config()
    assert config.mem_limit_gb == 3.0 and isinstance(config.mem_limit_gb, float)


def test_env_overrides_file(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_conf(isolated, "max_pipeline = 8\nmem_margin = 0.2\n")
    monkeypatch.setenv("RANNC_MAX_PIPELINE", "16")
    monkeypatch.setenv("RANNC_SHOW_PROGRESS", "off")
    config = load_config()
    assert config.max_pipeline == 16
    assert config.mem_margin == 0.2
    assert config.show_progress is False


def test_explicit_env_mapping_and_keyword_overrides() -> None:
    config = load_config(env={"RANNC_MIN_PIPELINE": "2", "RANNC_LOAD_DEPLOYMENT": "yes"}, min_pipeline=3)
    assert config.min_pipeline == 3
    assert config.load_deployment is True


def test_explicit_path(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('deployment_file = "/tmp/x.json"\n')
    assert load_config(other).deployment_file == "/tmp/x.json"


def test_explicit_path_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_bad_toml(isolated: Path) -> None:
    write_conf(isolated, "mem_limit_gb = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML.*fix or remove it"):
        load_config()


def test_bad_value_in_file(isolated: Path) -> None:
    write_conf(isolated, 'partition_num = "two"\n')
    with pytest.raises(ConfigError, match="'partition_num'.*not a int.*fix the value"):
        load_config()


def test_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANNC_MEM_LIMIT_GB", "lots")
    with pytest.raises(ConfigError, match="RANNC_MEM_LIMIT_GB.*not a float"):
        load_config()


def test_bad_bool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANNC_SAVE_DEPLOYMENT", "maybe")
    with pytest.raises(ConfigError, match="save_deployment"):
        load_config()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mem_margin": 1.0}, "mem_margin must be in"),
        ({"mem_margin": -0.1}, "mem_margin must be in"),
        ({"min_pipeline": 0}, "min_pipeline <= max_pipeline"),
        ({"min_pipeline": 8, "max_pipeline": 4}, "min_pipeline <= max_pipeline"),
        ({"schedule": "gpipe"}, "schedule must be"),
        ({"partition_num": -1}, "partition_num must be >= 0"),
        ({"chunks": "two"}, "chunks must be 'auto' or an integer >= 1"),
        ({"chunks": 0}, "chunks must be 'auto' or an integer >= 1"),
        ({"schedule": "interleaved_1f1b", "chunks": 1}, "chunks = 1 is plain 1F1B"),
        ({"opt_param_factor": -1}, "opt_param_factor must be 'auto'"),
        ({"opt_param_factor": "adam"}, "opt_param_factor must be 'auto'"),
        ({"opt_param_factor": "nan"}, "opt_param_factor must be 'auto'"),
    ],
)
def test_contradictory_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(**changes)


def test_unknown_keyword() -> None:
    with pytest.raises(ConfigError, match="unknown config item 'mem_limit'"):
        load_config(mem_limit=3)


def test_unknown_file_key_warns(isolated: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_conf(isolated, "mem_limt_gb = 3\nmin_pipeline = 2\n")
    with caplog.at_level(logging.WARNING, logger="rannc.config"):
        config = load_config()
    assert config.min_pipeline == 2 and config.mem_limit_gb == 0.0
    assert "unknown config item 'mem_limt_gb'" in caplog.text


def test_device_memory_limit() -> None:
    assert Config().device_memory_limit(None) is None
    assert Config().device_memory_limit(1000) == pytest.approx(900)
    assert Config(mem_limit_gb=1.0).device_memory_limit(None) == pytest.approx(0.9 * 2**30)
    assert Config(mem_limit_gb=1.0, mem_margin=0.0).device_memory_limit(2**29) == 2**29


def test_config_is_frozen_and_replace_works() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mem_limit_gb = 1.0  # type: ignore[misc]
    assert config.replace(mem_limit_gb=2.0).mem_limit_gb == 2.0


def test_chunks_and_the_interleaved_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config().forced_chunks is None
    monkeypatch.setenv("RANNC_CHUNKS", "3")
    config = load_config(schedule="interleaved_1f1b")
    assert config.chunks == "3" and config.forced_chunks == 3 and config.schedule == "interleaved_1f1b"
    assert load_config(chunks=2).forced_chunks == 2


def test_optimizer_state_follows_the_optimizer() -> None:
    """opt_param_factor 'auto' (the default) reads the optimizer's state bytes per parameter byte; a number set
    by the user stands."""
    import torch

    from rannc.partition import optimizer_state_factor

    params = [torch.nn.Parameter(torch.zeros(3))]
    cases = {
        0.0: torch.optim.SGD(params, lr=0.1),
        1.0: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        2.0: torch.optim.AdamW(params),
        3.0: torch.optim.Adam(params, amsgrad=True),
    }
    for expected, optimizer in cases.items():
        assert optimizer_state_factor(optimizer) == expected
    rms = torch.optim.RMSprop(params, momentum=0.9, centered=True)
    assert optimizer_state_factor(rms) == 3.0  # square average, momentum buffer, mean gradient
    mixed = torch.optim.SGD(
        [{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(2))], "momentum": 0.5}]
    )
    assert optimizer_state_factor(mixed) == 1.0  # the largest over the groups
    assert optimizer_state_factor(torch.optim.LBFGS(params)) is None and optimizer_state_factor(None) is None
    assert load_config().opt_param_factor == "auto"
    assert load_config().state_factor(1.0) == 1.0 and load_config().state_factor(None) == 2.0
    assert load_config(opt_param_factor=0.5).state_factor(1.0) == 0.5


def test_every_named_optimizer_is_priced_by_the_state_it_keeps() -> None:
    """`rannc plan --optimizer NAME` and a job stepping that optimizer price the same state: its factor is the
    state tensors torch.optim really keeps after a step, per parameter byte; a subclass is priced as its base."""
    import torch

    from rannc.partition import optimizer_state_factor
    from rannc.profile.devices import OPTIMIZER_CHOICES, named_optimizer_state_factor

    for name, (class_name, options) in OPTIMIZER_CHOICES.items():
        param = torch.nn.Parameter(torch.zeros(64))
        param.grad = torch.ones(64)
        optimizer = getattr(torch.optim, class_name)([param], lr=0.01, **options)
        optimizer.step()
        kept = sum(
            value.nbytes
            for value in optimizer.state[param].values()
            if isinstance(value, torch.Tensor) and value.numel() == param.numel()
        )
        assert kept / param.nbytes == named_optimizer_state_factor(name), name
        assert optimizer_state_factor(optimizer) == named_optimizer_state_factor(name), name

    class Tuned(torch.optim.AdamW):
        pass

    assert optimizer_state_factor(Tuned([torch.nn.Parameter(torch.zeros(2))])) == 2.0
