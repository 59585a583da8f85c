"""Configuration: defaults, a TOML file and RANNC_* environment variables, merged into one frozen Config."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob rannc reads. Names follow pyrannc's config items."""

    mem_limit_gb: float = 0.0  # cap on per-device memory; 0 = the CUDA total (no limit on CPU)
    mem_margin: float = 0.1  # fraction of device memory held back
    partition_num: int = 0  # force the number of pipeline stages (0 = search)
    min_pipeline: int = 1  # smallest number of microbatches tried
    max_pipeline: int = 32  # largest number of microbatches tried
    # Optimizer state bytes per parameter byte: "auto" reads it from the optimizer given to RaNNCModule (SGD 0,
    # with momentum 1, Adam/AdamW 2, AMSGrad 3, ...; 2, Adam's, without one or for an optimizer rannc does not
    # know), or a number >= 0. It prices the optimizer state's memory and the update's time.
    opt_param_factor: str = "auto"
    schedule: str = "auto"  # "auto" | "1f1b" | "fill_drain" | "zero_bubble" | "interleaved_1f1b"
    # Interleaved 1F1B: model chunks per pipeline position ("auto": the planner chooses; an integer >= 2 forces it;
    # 1: no interleaving, so "auto" leaves interleaved_1f1b out).
    chunks: str = "auto"
    recompute: str = "never"  # activation recompute: "never", "auto" (planner decides), "always"
    enable_zero: bool = False  # ZeRO-1: shard optimizer state over each parameter's replicas
    # Sharded stages: "none", "auto" (each replicated stage takes the least of zero-1, zero-2, zero-3 with which it
    # fits in memory), or one of "zero-1", "zero-2", "zero-3" for every replicated stage.
    shard_stages: str = "none"
    save_deployment: bool = False
    load_deployment: bool = False
    deployment_file: str = "/tmp/rannc_deployment.json"
    max_partition_num: int = 32  # number of blocks the planner chooses stage boundaries from
    # timed repetitions per measurement (after one warm-up); a run under 20 ms is timed at least twice
    profile_iterations: int = 3
    profile_cache_dir: str = str(Path.home() / ".cache" / "rannc" / "profiles")
    capture_batch_size: int = 2  # samples used to export the graph and record example values
    # > 0: dim 1 of the tensor inputs (the sequence) may change from call to call, up to this length; one graph
    # and one plan serve every length, planned for this maximum. 0: non-batch sizes are fixed by the first call.
    max_seq_len: int = 0
    p2p_bandwidth_gbps: float = 20.0  # GiB/s assumed between stages
    p2p_latency_us: float = 20.0
    allreduce_bandwidth_gbps: float = 10.0  # GiB/s bus bandwidth assumed for gradient allreduce
    allreduce_latency_us: float = 50.0
    show_progress: bool = True
    timeout_s: float = 300.0  # process-group timeout (set-up: capture, profiling, planning)
    comm_timeout_s: float = 30.0  # a transfer or collective during training waits this long before failing
    verify: bool = False  # first step: compare with the unpartitioned model on rank 0 (RANNC_VERIFY=1)
    verify_tolerance: float = 1e-4  # largest relative difference verify accepts
    watchdog: bool = True  # exit promptly (non-zero) when another rank reports a failure
    keep_host_memory: bool = True  # on CPU: glibc malloc keeps freed memory (no page faults every step)
    # Start the allreduce of the gradients a stage shares with its replicas during its last backward (DDP-style
    # buckets); off: reduce everything after the backward.
    overlap_grad_sync: bool = True
    # A device profile (a shipped name or a `rannc calibrate` JSON file) for what measuring the blocks does not
    # give: link bandwidth and latency (replacing p2p_*/allreduce_* above), optimizer update rate and temporaries.
    # Empty: the config's link figures and the shipped profile of this device.
    device_profile: str = ""
    # Qualified names of submodules (as model.named_modules() gives them) captured as one operation each
    # without tracing into them, for code torch.export cannot capture (see rannc.opaque). In TOML a list of
    # strings; in RANNC_OPAQUE_MODULES a comma-separated list.
    opaque_modules: tuple[str, ...] = ()

    def device_memory_limit(self, device_total_bytes: int | None) -> float | None:
        """Usable bytes per device after the margin, or None when nothing limits memory."""
        limit: float | None = None
        if self.mem_limit_gb > 0:
            limit = self.mem_limit_gb * 2**30
        if device_total_bytes is not None:
            limit = device_total_bytes if limit is None else min(limit, device_total_bytes)
        return None if limit is None else limit * (1.0 - self.mem_margin)

    def state_factor(self, of_optimizer: float | None) -> float:
        """The `opt_param_factor` item as a number: `of_optimizer` (what the optimizer keeps, None: unknown, 2)
        when "auto"."""
        if self.opt_param_factor != "auto":
            return float(self.opt_param_factor)
        return 2.0 if of_optimizer is None else of_optimizer

    @property
    def forced_chunks(self) -> int | None:
        """The `chunks` item as a number (None: "auto")."""
        return None if self.chunks == "auto" else int(self.chunks)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
SHARD_STAGES = ("auto", "none", "zero-1", "zero-2", "zero-3")


def _coerce(name: str, raw: Any, source: str) -> Any:
    default = _FIELDS[name].default
    kind = type(default)
    try:
        if kind is tuple:
            return _string_tuple(raw)
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"config item {name!r} from {source} is {raw!r}, which is not a "
            f"{'list of strings' if kind is tuple else kind.__name__}; "
            f"fix the value (default is {default!r})"
        ) from exc


def _string_tuple(raw: Any) -> tuple[str, ...]:
    """A list of names: a list/tuple of strings, or one string of comma-separated names (environment)."""
    if isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
        return tuple(raw)
    raise ValueError(raw)


def config_file_path() -> Path:
    """`$RANNC_CONF_DIR/rannc_conf.toml`, else `~/.pyrannc/rannc_conf.toml` (as in pyrannc)."""
    base = os.environ.get("RANNC_CONF_DIR") or str(Path.home() / ".pyrannc")
    return Path(base) / "rannc_conf.toml"


def load_config(
    path: str | Path | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> Config:
    """Defaults, then the TOML file, then RANNC_<NAME> environment variables, then keyword overrides."""
    values: dict[str, Any] = {}
    file_path = Path(path) if path is not None else config_file_path()
    if file_path.exists():
        try:
            data = tomllib.loads(file_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file_path} is not valid TOML: {exc}; fix or remove it") from exc
        for key, raw in data.items():
            if key not in _FIELDS:
                logger.warning("unknown config item %r in %s is ignored", key, file_path)
                continue
            values[key] = _coerce(key, raw, str(file_path))
    elif path is not None:
        raise ConfigError(f"config file {file_path} does not exist")
    env = os.environ if env is None else env
    for name in _FIELDS:
        key = f"RANNC_{name.upper()}"
        if key in env:
            values[name] = _coerce(name, env[key], f"environment variable {key}")
    for name, raw in overrides.items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown config item {name!r}; known items: {', '.join(sorted(_FIELDS))}")
        values[name] = _coerce(name, raw, "keyword argument")
    config = Config(**values)
    _validate(config)
    return config


# The schedule item's values: "auto" (the planner chooses) or a schedule the runtime runs.
_SCHEDULES = ("auto", "1f1b", "fill_drain", "zero_bubble", "interleaved_1f1b")


def _validate(config: Config) -> None:
    if not 0.0 <= config.mem_margin < 1.0:
        raise ConfigError(f"mem_margin must be in [0, 1), got {config.mem_margin}")
    if config.min_pipeline < 1 or config.max_pipeline < config.min_pipeline:
        raise ConfigError(
            f"need 1 <= min_pipeline <= max_pipeline, got {config.min_pipeline} and {config.max_pipeline}"
        )
    if config.schedule not in _SCHEDULES:
        raise ConfigError(
            f"schedule must be one of {', '.join(repr(s) for s in _SCHEDULES)}, got {config.schedule!r}"
        )
    if config.chunks != "auto" and not (config.chunks.isdigit() and int(config.chunks) >= 1):
        raise ConfigError(
            f"chunks must be 'auto' or an integer >= 1 (model chunks per position), got {config.chunks!r}"
        )
    if config.schedule == "interleaved_1f1b" and config.chunks == "1":
        raise ConfigError(
            "schedule 'interleaved_1f1b' with chunks = 1 is plain 1F1B: use schedule '1f1b', or chunks 'auto' or >= 2"
        )
    if config.opt_param_factor != "auto" and not _non_negative_number(config.opt_param_factor):
        raise ConfigError(
            "opt_param_factor must be 'auto' (from the optimizer) or a number >= 0 (optimizer state bytes per "
            f"parameter byte: 0 for SGD, 1 with momentum, 2 for Adam), got {config.opt_param_factor!r}"
        )
    if config.recompute not in ("never", "auto", "always"):
        raise ConfigError(f"recompute must be 'never', 'auto' or 'always', got {config.recompute!r}")
    if config.shard_stages not in SHARD_STAGES:
        raise ConfigError(
            f"shard_stages must be one of {', '.join(repr(v) for v in SHARD_STAGES)}, got {config.shard_stages!r}"
        )
    if config.max_seq_len < 0:
        raise ConfigError(f"max_seq_len must be >= 0 (0: fixed shapes), got {config.max_seq_len}")
    if config.partition_num < 0:
        raise ConfigError(f"partition_num must be >= 0, got {config.partition_num}")


def _non_negative_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value >= 0
