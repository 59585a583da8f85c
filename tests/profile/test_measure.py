"""Tests of measure_block: times, saved-activation bytes, parameters excluded, odd blocks."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from rannc.plan.types import BlockProfile
from rannc.profile import BlockRunner, measure_block
from rannc.profile.measure import SHORT_RUN_SAMPLES, sample_count, typical_run

WIDTH = 512
SIZES = [1, 4, 16]


def linear_relu_runner(width: int = WIDTH) -> tuple[BlockRunner, torch.Tensor]:
    weight = torch.randn(width, width, requires_grad=True)
    bias = torch.randn(width, requires_grad=True)
    runner = BlockRunner(
        module=lambda x, w, b: (F.linear(x, w, b).relu(),),
        make_inputs=lambda m: [torch.randn(m, width), weight, bias],
        param_input_indices=frozenset({1, 2}),
    )
    return runner, weight


def test_linear_relu_times_and_activation_bytes() -> None:
    runner, weight = linear_relu_runner()
    profile = measure_block(runner, SIZES, iterations=3)
    assert isinstance(profile, BlockProfile)
    for table in (profile.fwd_time, profile.bwd_time, profile.activation_bytes):
        assert sorted(table) == SIZES
    assert all(profile.fwd_time[m] > 0 and profile.bwd_time[m] > 0 for m in SIZES)
    # linear saves its input x, relu saves its output: 2 * m * WIDTH float32 values.
    for m in SIZES:
        analytic = 2 * m * WIDTH * 4
        assert analytic / 2 <= profile.activation_bytes[m] <= analytic * 2
    assert profile.activation_bytes[1] < profile.activation_bytes[4] < profile.activation_bytes[16]
    # The 1 MiB weight (saved by linear as a view) is not an activation.
    weight_bytes = weight.numel() * weight.element_size()
    assert profile.activation_bytes[1] < weight_bytes / 50


def test_parameter_grads_are_left_as_they_were() -> None:
    runner, weight = linear_relu_runner(width=32)
    marker = torch.full_like(weight, 7.0)
    weight.grad = marker
    measure_block(runner, [2], iterations=1)
    assert weight.grad is marker
    assert torch.equal(weight.grad, torch.full_like(weight, 7.0))


def test_activation_inputs_get_gradients_and_views_of_params_are_excluded() -> None:
    weight = torch.randn(64, 64, requires_grad=True)
    seen: list[torch.Tensor] = []

    def block(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
        seen.append(x)
        return (x @ w.t()[:, :32],)  # saves x and a view of the weight

    runner = BlockRunner(block, lambda m: [torch.randn(m, 64), weight], frozenset({1}))
    profile = measure_block(runner, [8], iterations=3)
    assert all(x.requires_grad for x in seen)
    # the warm-up's and the three timed whole backwards' inputs (the W passes' I pass returns its input gradients)
    input_grads = [x.grad for x in seen if x.grad is not None]
    assert len(input_grads) == 1 + 3 and all(g.shape == (8, 64) for g in input_grads)
    assert profile.activation_bytes[8] == 8 * 64 * 4
    assert profile.bwd_time[8] > 0


def test_block_without_gradients() -> None:
    runner = BlockRunner(
        module=lambda idx: (idx * 2, "tag", 3),
        make_inputs=lambda m: [torch.arange(m)],
        param_input_indices=frozenset(),
    )
    profile = measure_block(runner, [1, 8], iterations=2, device=torch.device("cpu"))
    assert profile.bwd_time == {1: 0.0, 8: 0.0}
    assert profile.activation_bytes == {1: 0.0, 8: 0.0}
    assert all(t > 0 for t in profile.fwd_time.values())


def test_float_input_with_non_differentiable_output() -> None:
    runner = BlockRunner(
        module=lambda x: (x.argmax(-1), x.sum().item()),
        make_inputs=lambda m: [torch.randn(m, 16)],
        param_input_indices=frozenset(),
    )
    profile = measure_block(runner, [4], iterations=1)
    assert profile.bwd_time[4] == 0.0


def test_only_differentiable_outputs_get_gradients() -> None:
    grads: list[torch.Tensor] = []

    def block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        y = x.sin()
        y.register_hook(grads.append)
        return y, x.detach().long(), 5

    runner = BlockRunner(block, lambda m: [torch.randn(m, 8)], frozenset())
    measure_block(runner, [3], iterations=3)
    assert len(grads) == 4  # warm-up + 3 repetitions
    assert all(torch.equal(g, grads[0]) for g in grads)  # fixed-seed output gradients


@pytest.mark.parametrize(("sizes", "iterations"), [([], 1), ([0], 1), ([2], 0)])
def test_rejects_bad_arguments(sizes: list[int], iterations: int) -> None:
    runner, _ = linear_relu_runner(width=8)
    with pytest.raises(ValueError):
        measure_block(runner, sizes, iterations=iterations)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_path() -> None:
    device = torch.device("cuda")
    width = 1024
    weight = torch.randn(width, width, device=device, requires_grad=True)
    runner = BlockRunner(
        module=lambda x, w: (F.linear(x, w).relu(),),
        make_inputs=lambda m: [torch.randn(m, width, device=device), weight],
        param_input_indices=frozenset({1}),
    )
    profile = measure_block(runner, [1, 64, 256], iterations=3, device=device)
    weight_bytes = weight.numel() * weight.element_size()
    for m in (1, 64, 256):
        saved = 2 * m * width * 4
        assert profile.fwd_time[m] > 0 and profile.bwd_time[m] > 0
        # The peak adds output and input gradients to the saved tensors, never a weight-sized block.
        assert saved <= profile.activation_bytes[m] < saved * 4 + weight_bytes / 2
    assert weight.grad is None


def test_one_stall_of_a_short_run_is_outvoted() -> None:
    """With iterations=1, the first timed forward of a sub-millisecond block stalls for 50 ms (as when the OS
    runs another rank's process on the core): the block is timed again and the stall is not its time."""
    weight = torch.randn(8, 8, requires_grad=True)
    calls = {"forward": 0}

    def module(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
        calls["forward"] += 1
        if calls["forward"] == 2:  # call 1 is the warm-up, call 2 the first timed run
            time.sleep(0.05)
        return (F.linear(x, w),)

    runner = BlockRunner(
        module=module, make_inputs=lambda m: [torch.randn(m, 8), weight], param_input_indices=frozenset({1})
    )
    profile = measure_block(runner, [2], iterations=1)
    assert profile.fwd_time[2] < 0.01, f"the stalled run was taken: {profile.fwd_time[2]:.4f} s"


def test_long_runs_keep_the_iterations_asked_for() -> None:
    assert sample_count(1, [0.5], [0.9]) == 1
    assert sample_count(1, [0.5], [0.001]) == SHORT_RUN_SAMPLES  # any pass short: the lesser of two runs
    assert typical_run([0.001, 0.05]) == 0.001 and typical_run([0.003, 0.001, 0.002]) == 0.002
    assert sample_count(1, [], []) == 1
    assert sample_count(5, [0.001]) == 5
