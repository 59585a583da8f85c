"""Config item device_profile: online planning takes links and the end-of-step costs from a device profile."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_workers
from torch import nn

import rannc
from rannc.errors import ConfigError
from rannc.profile.devices import get_device_profile, save_profile


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def planned_problem(rank: int, world: int, profile_path: str, cache: str) -> dict[str, Any]:
    """Train one step with device_profile set; report the link and update figures the planner was given."""
    import rannc.partition as partition

    seen: dict[str, Any] = {}
    original = partition._plan_on_rank0

    def spy(problem: Any, world_size: int, config: Any) -> Any:
        seen.update(
            p2p_bandwidth=problem.p2p_bandwidth,
            p2p_latency=problem.p2p_latency,
            allreduce_bandwidth=problem.allreduce_bandwidth,
            update=problem.update_seconds_per_param_byte,
        )
        return original(problem, world_size, config)

    partition._plan_on_rank0 = spy
    torch.manual_seed(0)
    quick = dict(profile_iterations=1, show_progress=False, profile_cache_dir=cache)
    wrapped = rannc.RaNNCModule(Small(), device_profile=profile_path, **quick)
    wrapped(torch.randn(4, 8)).backward()
    return seen


@pytest.mark.slow
def test_online_planning_uses_the_profile_links(tmp_path: Path) -> None:
    profile = dataclasses.replace(
        get_device_profile("cpu"),
        name="measured-here",
        intra_node_bandwidth=1.25e9,
        intra_node_latency=3e-3,
        allreduce_bandwidth=7e8,
        optimizer_update_rate={"adam": 1e9},
    )
    path = tmp_path / "me.json"
    save_profile(profile, path)
    (seen,) = run_workers(planned_problem, 1, str(path), str(tmp_path / "cache"), timeout=300)
    assert seen["p2p_bandwidth"] == 1.25e9 and seen["p2p_latency"] == 3e-3
    assert seen["allreduce_bandwidth"] == 7e8
    assert seen["update"] == pytest.approx(
        1e-9
    )  # opt_param_factor 2 (Adam by default): the measured adam rate


def bad_profile(rank: int, world: int, path: str) -> str:
    try:
        rannc.RaNNCModule(Small(), device_profile=path, show_progress=False)(torch.randn(4, 8))
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_a_missing_profile_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    (message,) = run_workers(bad_profile, 1, missing, timeout=300)
    assert "nope.json" in message
