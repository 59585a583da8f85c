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
from rannc.profile.measure import usable_cores


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def planned_problem(
    rank: int, world: int, profile_path: str, cache: str, optimizer: str = "", items: dict | None = None
) -> dict[str, Any]:
    """Train one step with device_profile set (`optimizer`: "" none, "sgd", "momentum", "adam"; `items`: more
    config items); report the link, update and optimizer-state figures the planner was given."""
    import rannc.partition as partition

    seen: dict[str, Any] = {}
    original = partition._plan_on_rank0

    def spy(problem: Any, world_size: int, config: Any) -> Any:
        seen.update(
            p2p_bandwidth=problem.p2p_bandwidth,
            p2p_latency=problem.p2p_latency,
            allreduce_bandwidth=problem.allreduce_bandwidth,
            update=problem.update_seconds_per_param_byte,
            opt_param_factor=problem.opt_param_factor,
            cores=(problem.host_cores, problem.measured_ranks),
        )
        return original(problem, world_size, config)

    partition._plan_on_rank0 = spy
    torch.manual_seed(0)
    quick = dict(profile_iterations=1, show_progress=False, profile_cache_dir=cache, **(items or {}))
    model = Small()
    chosen = {
        "": None,
        "sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.1),
        "momentum": lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "adam": lambda: torch.optim.Adam(model.parameters()),
    }[optimizer]
    wrapped = rannc.RaNNCModule(model, chosen() if chosen else None, device_profile=profile_path, **quick)
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


@pytest.mark.slow
def test_online_planning_prices_the_optimizer_it_is_given(tmp_path: Path) -> None:
    """A job with SGD and momentum keeps one buffer per parameter, not Adam's two: the planner charges that state
    and the measured momentum update rate (the config item opt_param_factor, when set, overrides it)."""
    profile = dataclasses.replace(
        get_device_profile("cpu"), optimizer_update_rate={"adam": 1e9, "momentum": 4e9, "sgd": 8e9}
    )
    path = tmp_path / "me.json"
    save_profile(profile, path)
    cache = str(tmp_path / "cache")
    seen = {
        name: run_workers(planned_problem, 1, str(path), cache, name, timeout=300)[0]
        for name in ("sgd", "momentum", "adam")
    }
    assert (seen["sgd"]["opt_param_factor"], seen["sgd"]["update"]) == (0.0, pytest.approx(1 / 8e9))
    assert (seen["momentum"]["opt_param_factor"], seen["momentum"]["update"]) == (1.0, pytest.approx(1 / 4e9))
    assert (seen["adam"]["opt_param_factor"], seen["adam"]["update"]) == (2.0, pytest.approx(1 / 1e9))
    (forced,) = run_workers(
        planned_problem, 1, str(path), cache, "momentum", {"opt_param_factor": 2}, timeout=300
    )
    assert (forced["opt_param_factor"], forced["update"]) == (2.0, pytest.approx(1 / 1e9))


def test_a_cpu_job_tells_the_planner_how_its_ranks_share_the_cores(tmp_path: Path) -> None:
    """Ranks on CPUs measure their blocks at once and share the host's cores: the problem a CPU job plans says how
    many cores (this process's affinity) and how many ranks measured at once (the job's ranks on this host), so that
    the simulator can share the cores among them (`plan.simulate.CoreSharing`)."""
    path = tmp_path / "me.json"
    save_profile(get_device_profile("cpu"), path)
    seen = run_workers(planned_problem, 2, str(path), str(tmp_path / "cache"), "momentum", timeout=300)
    assert [s["cores"] for s in seen] == [(usable_cores(), 2)] * 2


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
