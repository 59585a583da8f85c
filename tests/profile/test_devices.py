"""Tests of device profiles (shipped figures, JSON round trip and validation) and of calibrate."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from rannc.errors import ConfigError
from rannc.plan.types import PlanProblem
from rannc.profile.calibrate import calibrate
from rannc.profile.devices import (
    DeviceProfile,
    get_device_profile,
    list_profiles,
    load_profile,
    profile_for_device_name,
    save_profile,
)

SHIPPED = ["a100-40gb", "a100-80gb", "cpu", "h100-80gb", "h200", "v100-32gb"]


def test_shipped_profiles_have_figures_and_sources() -> None:
    assert list_profiles() == SHIPPED
    for name in SHIPPED:
        profile = get_device_profile(name)
        assert profile.name == name
        assert set(profile.peak_flops) == {"float32", "tf32", "bfloat16", "float16"}
        for key in ("intra_node", "inter_node", "efficiency"):
            assert profile.sources.get(key), (name, key)
        if name != "cpu":
            for key in ("peak_flops", "memory_bandwidth", "latency", "memory_bytes"):
                assert profile.sources.get(key), (name, key)
            assert profile.gpus_per_node == 8


def test_datasheet_figures() -> None:
    a100 = get_device_profile("a100-40gb")
    assert a100.peak("float32") == 19.5e12 and a100.peak("bfloat16") == 312e12 and a100.peak("tf32") == 156e12
    assert a100.memory_bandwidth == 1555e9 and a100.memory_bytes == 40 * 2**30
    assert get_device_profile("a100-80gb").memory_bandwidth == 2039e9
    h100 = get_device_profile("h100-80gb")
    assert h100.peak("bfloat16") == 989.5e12 and h100.memory_bandwidth == 3.35e12
    assert h100.intra_node_bandwidth == 450e9 and h100.inter_node_bandwidth == 50e9
    h200 = get_device_profile("h200")
    assert h200.memory_bytes == 141 * 2**30 and h200.memory_bandwidth == 4.8e12
    assert get_device_profile("v100-32gb").peak("float16") == 125e12
    assert "calibrate" in get_device_profile("cpu").sources["all"]


def test_rates_and_planner_links() -> None:
    a100 = get_device_profile("A100")  # alias, any case
    assert a100.name == "a100-40gb"
    assert a100.flop_rate("bfloat16") == pytest.approx(312e12 * 0.6)
    assert a100.byte_rate() == pytest.approx(1555e9 * 0.7)
    links = a100.planner_links()
    assert links.p2p_bandwidth == links.allreduce_bandwidth == 300e9
    assert links.p2p_latency == links.allreduce_latency == a100.intra_node_latency
    assert links.gpus_per_node == 8 and links.inter_node_bandwidth == 25e9
    assert links.allreduce_inter_bandwidth == 200e9  # ring bound: 8 NICs of 25 GB/s per node
    assert links.allreduce_inter_latency == links.inter_node_latency == a100.inter_node_latency
    measured = dataclasses.replace(a100, allreduce_bandwidth=123e9, allreduce_inter_latency=0.0)
    assert measured.planner_links().allreduce_bandwidth == 123e9
    assert measured.planner_links().allreduce_inter_latency == 0.0
    four = a100.planner_links(gpus_per_node=4)  # nodes of 4: 4 NICs per ring
    assert four.gpus_per_node == 4 and four.allreduce_inter_bandwidth == 100e9
    assert measured.planner_links(4).allreduce_bandwidth == 123e9
    problem_fields = {f.name for f in dataclasses.fields(PlanProblem)}
    assert {f.name for f in dataclasses.fields(links)} <= problem_fields
    problem = PlanProblem([], [], [], [], world_size=8, global_batch=8).with_links(four)
    assert problem.links == four and problem.p2p_bandwidth == 300e9


def test_profile_for_device_name() -> None:
    assert profile_for_device_name("NVIDIA A100-SXM4-80GB").name == "a100-80gb"
    assert profile_for_device_name("NVIDIA A100-SXM4-40GB").name == "a100-40gb"
    assert profile_for_device_name("NVIDIA H100 80GB HBM3").name == "h100-80gb"
    assert profile_for_device_name("NVIDIA H200").name == "h200"
    assert profile_for_device_name("Tesla V100-SXM2-32GB").name == "v100-32gb"
    assert profile_for_device_name("NVIDIA H100 PCIe") is None
    assert profile_for_device_name("NVIDIA GeForce RTX 4090") is None


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "h100.json"
    save_profile(get_device_profile("h100-80gb"), path)
    assert load_profile(path) == get_device_profile("h100-80gb")
    assert get_device_profile(str(path)) == get_device_profile("h100-80gb")
    assert json.loads(path.read_text())["format"] == "rannc-device-profile"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"memory_bandwidth": -1}, "memory_bandwidth must be a finite number > 0, got -1"),
        ({"peak_flops": {"float32": 1e12, "fp8": 1e15}}, "unknown dtype 'fp8'"),
        ({"peak_flops": {"bfloat16": 1e12}}, "at least 'float32'"),
        ({"gpus_per_node": 0}, "gpus_per_node must be an integer >= 1"),
        ({"allreduce_latency": -1.0}, "allreduce_latency (or null) must be a finite number >= 0"),
        ({"matmul_efficiency": 1.5}, "matmul_efficiency must be a finite number in (0, 1]"),
        ({"inter_node_latency": "fast"}, "inter_node_latency must be a finite number >= 0"),
        ({"colour": "green"}, "unknown field(s) ['colour']"),
        ({"format": "something else"}, "not a rannc device profile"),
    ],
)
def test_load_rejects_bad_profiles(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = get_device_profile("a100-40gb").to_json()
    data.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    data = get_device_profile("a100-40gb").to_json()
    del data["memory_bytes"]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['memory_bytes'\]"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_profile(path)
    with pytest.raises(ConfigError, match="cannot read device profile"):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="unknown device profile 'tpu-v9'.*a100-40gb"):
        get_device_profile("tpu-v9")
    base = get_device_profile("cpu")
    for field, value in (
        ("host_cores", 0),
        ("host_cores", 1.5),
        ("measured_ranks", 0),
        ("measured_ranks", None),
    ):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(base, **{field: value})


def test_calibrate_quick_single_process(tmp_path: Path) -> None:
    started = time.perf_counter()
    profile = calibrate(quick=True)
    assert time.perf_counter() - started < 20
    assert isinstance(profile, DeviceProfile) and profile.name.startswith("calibrated-cpu")
    assert profile.peak("float32") > 1e6 and profile.peak("tf32") == profile.peak(
        "float32"
    )  # loaded CI: low bar
    assert profile.memory_bandwidth > 1e6 and profile.memory_bytes > 2**30 and profile.op_overhead > 0
    assert "not measured (single process)" in profile.sources["intra_node"]
    assert "measured by rannc.profile.calibrate" in profile.sources["peak_flops"]
    assert profile.intra_node_bandwidth == get_device_profile("cpu").intra_node_bandwidth
    # the cores this process may use, measured by one rank (the simulator shares the cores among the ranks)
    assert profile.host_cores == len(os.sched_getaffinity(0)) and profile.measured_ranks == 1
    save_profile(profile, tmp_path / "me.json")
    assert load_profile(tmp_path / "me.json") == profile


def calibrate_worker(rank: int, world_size: int) -> DeviceProfile:
    assert dist.is_initialized()
    return calibrate(quick=True)


@pytest.mark.slow
def test_calibrate_measures_links_between_ranks() -> None:
    from distributed_helpers import run_workers

    profiles = run_workers(calibrate_worker, 2, timeout=120)
    first, second = profiles
    assert first.intra_node_bandwidth == second.intra_node_bandwidth  # everyone gets rank 0's figures
    assert first.intra_node_bandwidth != get_device_profile("cpu").intra_node_bandwidth
    assert 0 < first.intra_node_latency < 0.1 and first.intra_node_bandwidth > 1e6
    assert first.allreduce_bandwidth and first.allreduce_latency and first.gpus_per_node == 2
    assert first.measured_ranks == 2 and first.host_cores == len(os.sched_getaffinity(0))
    assert "ping-pong" in first.sources["intra_node"] and "allreduce" in first.sources["allreduce"]
    # The latency is the larger of an idle ping-pong and a message from a rank that computes after sending.
    assert "computes right after sending" in first.sources["intra_node"]
    # Every figure is the ranks' average, the shape table entry by entry.
    assert first.matmul_shapes == second.matmul_shapes and len(first.matmul_shapes["factor"]) == 8


def test_efficiency_fit_recovers_known_efficiencies(monkeypatch: pytest.MonkeyPatch) -> None:
    import rannc.profile.calibrate as calibrate_module
    from rannc.profile.calibrate import _efficiency_and_scale, _solve_efficiencies

    base = get_device_profile("cpu")  # 0.6 / 0.7
    # Workloads whose compute / memory parts (seconds at 100%) and overhead are known, timed as if the device
    # ran matmuls at 85% and memory-bound ops at 40% of the peaks.
    parts = [(0.10, 0.01, 0.002), (0.20, 0.03, 0.004), (0.02, 0.05, 0.001)]
    rows = [(c / 0.85 + m / 0.40 + o, c, m, o) for c, m, o in parts]
    compute, memory, how = _solve_efficiencies(rows, base)
    assert "least squares" in how
    # The weak pull towards the assumed 0.6 / 0.7 moves a well-constrained fit by a few percent at most.
    assert 1 / compute == pytest.approx(0.85, rel=0.03) and 1 / memory == pytest.approx(0.40, rel=0.05)
    assert 0.6 <= 1 / compute <= 0.85 and 0.40 <= 1 / memory <= 0.7
    # Without it the least squares are exact.
    monkeypatch.setattr(calibrate_module, "_PRIOR_WEIGHT", 0.0)
    compute, memory, how = _solve_efficiencies(rows, base)
    assert compute == pytest.approx(1 / 0.85, rel=1e-9) and memory == pytest.approx(1 / 0.40, rel=1e-9)
    assert _efficiency_and_scale(compute) == (pytest.approx(0.85), 1.0)
    # Work that cannot tell the two apart (proportional parts): one factor on the assumed efficiencies.
    same = [
        (2 * (c / base.matmul_efficiency + m / base.memory_efficiency) + o, c, m, o) for c, m, o in [parts[0]]
    ]
    compute, memory, how = _solve_efficiencies(same, base)
    assert "one factor" in how
    c, m, o = parts[0]
    factor = same[0][0] / (c / base.matmul_efficiency + m / base.memory_efficiency + o)  # ~2
    assert compute == pytest.approx(factor / base.matmul_efficiency)
    assert memory == pytest.approx(factor / base.memory_efficiency)
    # Work that ran twice as fast as the measured peaks allow: efficiency 1 and the peaks raised x2.
    faster = [(0.5 * (c + m) + o, c, m, o) for c, m, o in parts]
    compute, memory, how = _solve_efficiencies(faster, base)
    assert "least squares" in how
    assert _efficiency_and_scale(compute) == (1.0, pytest.approx(2.0))
    assert _efficiency_and_scale(memory) == (1.0, pytest.approx(2.0))


def test_calibrate_fits_efficiencies_to_reference_work() -> None:
    profile = calibrate(quick=True)
    assert 0 < profile.matmul_efficiency <= 1 and 0 < profile.memory_efficiency <= 1
    assert "reference workloads" in profile.sources["efficiency"]
    assert profile.kind == "cpu" and set(profile.optimizer_update_rate) == {"adam", "momentum", "sgd"}
    shapes = profile.matmul_shapes  # measured matmul shape table (quick: a 2 x 2 x 2 grid)
    assert shapes is not None and len(shapes["factor"]) == 8 and "matmul_shapes" in profile.sources


def test_elementwise_rates_price_arithmetic_bound_ops() -> None:
    from rannc.profile.analytic import estimate_block

    base = get_device_profile("cpu")
    x = torch.empty(256, 4096, device="meta")
    plain = estimate_block(lambda x: (x.tanh(),), [x], base)
    slow = dataclasses.replace(base, elementwise_rate={"aten.tanh": 1e8})
    priced = estimate_block(lambda x: (x.tanh(),), [x], slow)
    tanh = [op for op in priced.ops if op.op == "aten.tanh"]
    assert tanh and tanh[0].time == pytest.approx(256 * 4096 / 1e8 + base.op_overhead, rel=1e-9)
    assert priced.fwd_time > plain.fwd_time
    with pytest.raises(ConfigError, match="aten op names"):
        dataclasses.replace(base, elementwise_rate={"tanh": 1e8})
    with pytest.raises(ConfigError, match="elementwise_rate"):
        dataclasses.replace(base, elementwise_rate={"aten.tanh": 0.0})
