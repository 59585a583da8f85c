"""A made-up device profile for cost-model tests: round figures so expected times can be written by hand."""

from __future__ import annotations

from typing import Any

from rannc.profile.devices import DeviceProfile


def fake_device(**changes: Any) -> DeviceProfile:
    """1 TFLOP/s fp32, 1e11 B/s at 80% efficiency (8e10 achievable), 10 GB/s links in 4-GPU nodes."""
    settings: dict[str, Any] = dict(
        name="fake",
        peak_flops={"float32": 1e12},
        memory_bandwidth=1e11,
        memory_bytes=2**34,
        intra_node_bandwidth=1e10,
        intra_node_latency=1e-5,
        inter_node_bandwidth=1e9,
        inter_node_latency=2e-5,
        gpus_per_node=4,
        memory_efficiency=0.8,
    )
    settings.update(changes)
    return DeviceProfile(**settings)
