"""Block workspace bytes: the analytic estimate on meta, the measured value on the CPU, and their JSON form."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rannc.capture import capture
from rannc.graph.analysis import analyse
from rannc.plan.types import BlockProfile
from rannc.profile.analytic import BlockEstimate, analytic_block_profiles, estimate_block
from rannc.profile.devices import get_device_profile
from rannc.profile.measure import BlockRunner, measure_block

CPU = get_device_profile("cpu")
K, N = 64, 256  # x: (m, K), w: (N, K)


def block(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (F.linear(x, w).relu().square(),)


def estimate(m: int) -> BlockEstimate:
    x = torch.empty(m, K, device="meta")
    w = torch.empty(N, K, device="meta", requires_grad=True)
    return estimate_block(block, [x, w], CPU, param_indices=frozenset({1}))


def hidden_bytes(m: int) -> int:
    return 4 * m * N


def test_estimate_has_hand_counted_activations_and_a_plausible_workspace() -> None:
    for m in (4, 16, 64):
        est = estimate(m)
        # saved for backward: x (for the weight gradient) and relu's output (for relu and square)
        assert est.activation_bytes == 4 * m * K + hidden_bytes(m)
        # at least the block's output and its incoming gradient are live at once beyond the saved tensors
        assert est.workspace_bytes >= 2 * hidden_bytes(m)


@pytest.mark.parametrize("m", [4, 16, 1024])
def test_estimate_workspace_matches_the_hand_count(m: int) -> None:
    """Beyond the inputs (x, w) and the saved relu output, square's backward holds the output s, its gradient g
    and three (m, N) temporaries (pow(r, 1), its product with 2, the product with g): 5 h. Linear's backward
    later creates the weight gradient (N x K, part of the workspace: the runtime accumulates it only after the
    microbatch's backward) next to s, g and at most two (m, N) gradients and the (m, K) input gradient."""
    h, x_grad, w_grad = hidden_bytes(m), 4 * m * K, 4 * N * K
    workspace = estimate(m).workspace_bytes
    assert max(5 * h, 2 * h + w_grad) <= workspace <= 5 * h + x_grad + w_grad


def test_workspace_counts_the_weight_gradient_not_the_weight() -> None:
    """One sample through a large weight: the output, its gradient, the input gradient and the weight gradient
    are the workspace; the weight itself (parameter state in the cost model) is not counted again."""
    m, fan_in, fan_out = 1, 64, 4096
    x = torch.empty(m, fan_in, device="meta")
    w = torch.empty(fan_out, fan_in, device="meta", requires_grad=True)
    est = estimate_block(lambda x, w: (F.linear(x, w),), [x, w], CPU, param_indices=frozenset({1}))
    assert est.activation_bytes == 4 * m * fan_in
    gradient = 4 * fan_out * fan_in
    assert (
        gradient + 2 * 4 * m * fan_out
        <= est.workspace_bytes
        <= gradient + 2 * 4 * m * fan_out + 4 * m * fan_in
    )


def captured_linear() -> BlockProfile:
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU())
    captured = capture(model, (torch.empty(4, 1024, device="meta"),), {})
    analysis = analyse(captured)
    return analytic_block_profiles(captured, analysis, [analysis.order], [1, 2, 16], CPU)[0]


def test_analytic_block_profiles_fill_workspace_bytes() -> None:
    profile = captured_linear()
    assert sorted(profile.workspace_bytes) == [1, 2, 16]
    for m in (1, 2, 16):
        # output and its gradient at least (the relu output, saved, is the block's output)
        assert profile.workspace_bytes[m] >= 4 * m * 1024
    assert profile.workspace_bytes[1] < profile.workspace_bytes[2] < profile.workspace_bytes[16]


def test_analytic_block_profiles_workspace_holds_the_weight_gradient_once() -> None:
    """A 4 MiB weight and 4 KiB per sample: its gradient (not the weight again) dominates the workspace."""
    profile = captured_linear()
    weight_bytes = 1024 * 1024 * 4
    for m in (1, 2, 16):
        assert weight_bytes <= profile.workspace_bytes[m] < weight_bytes + 8 * 4 * m * 1024


@pytest.mark.parametrize("m", [4, 16, 64])
def test_measured_workspace_equals_the_analytic_one(m: int) -> None:
    """Tolerance: none. Both count the storages that the same aten ops (F.linear decomposes to t + mm before
    the dispatcher on both devices) return through the dispatcher, and CPU and meta kernels return outputs
    of the same sizes; scratch memory inside CPU kernels is invisible to both. Any difference is a
    difference in what the two count, not noise."""
    weight = torch.randn(N, K, requires_grad=True)
    runner = BlockRunner(block, lambda m: [torch.randn(m, K), weight], frozenset({1}))
    measured = measure_block(runner, [m], iterations=1)
    analytic = estimate(m)
    assert measured.activation_bytes[m] == analytic.activation_bytes
    assert measured.workspace_bytes[m] == analytic.workspace_bytes
    assert weight.grad is None


def test_measure_block_fills_workspace_for_every_size() -> None:
    weight = torch.randn(N, K, requires_grad=True)
    runner = BlockRunner(block, lambda m: [torch.randn(m, K), weight], frozenset({1}))
    profile = measure_block(runner, [2, 8, 32], iterations=1)
    assert sorted(profile.workspace_bytes) == [2, 8, 32]
    for m in (2, 8, 32):
        assert profile.workspace_bytes[m] >= 2 * hidden_bytes(m)  # output and its gradient at least
    assert profile.workspace_at(8) == profile.workspace_bytes[8]


def test_block_profile_json_round_trip_with_workspace() -> None:
    profile = BlockProfile(
        fwd_time={1: 1e-3, 4: 3e-3},
        bwd_time={1: 2e-3, 4: 6e-3},
        activation_bytes={1: 1e6, 4: 4e6},
        workspace_bytes={1: 5e5, 4: 2e6},
    )
    data = json.loads(json.dumps(profile.to_json()))
    assert data["workspace_bytes"] == {"1": 5e5, "4": 2e6}
    loaded = BlockProfile.from_json(data)
    assert loaded == profile
    assert loaded.workspace_at(4) == 2e6
    assert loaded.workspace_at(2) == pytest.approx(5e5 + (2e6 - 5e5) / 3)  # linear between sizes
    assert loaded.workspace_at(8) == pytest.approx(2e6 + 4 * (2e6 - 5e5) / 3)  # extrapolated


def test_block_profile_json_without_workspace() -> None:
    profile = BlockProfile(fwd_time={2: 1e-3}, bwd_time={2: 2e-3}, activation_bytes={2: 1e6})
    data = profile.to_json()
    assert set(data) == {"fwd_time", "bwd_time", "activation_bytes"}  # files stay as before
    old = {"fwd_time": {"2": 1e-3}, "bwd_time": {"2": 2e-3}, "activation_bytes": {"2": 1e6}}
    assert data == old
    loaded = BlockProfile.from_json(json.loads(json.dumps(old)))
    assert loaded == profile
    assert loaded.workspace_bytes == {}
    assert loaded.workspace_at(2) == 0.0 and loaded.workspace_at(7) == 0.0
