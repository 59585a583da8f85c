"""Tests of PeakMemory (live storages counted through the dispatcher) and held_tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from rannc.profile.memtrack import PeakMemory, held_tensors

MIB = 2**20


def _mlp_step(
    foreach: bool, keep_grads: bool
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """A small MLP with AdamW after one warm-up step (optimizer state exists) and its training step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
    x = torch.randn(16, 64)

    def step() -> None:
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not keep_grads)

    step()
    return model, optimizer, step


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("keep_grads", [False, True])
def test_peak_agrees_with_torch_mem_tracker(foreach: bool, keep_grads: bool) -> None:
    model, optimizer, step = _mlp_step(foreach, keep_grads)
    reference = MemTracker()
    reference.track_external(model, optimizer)
    with reference:
        step()
    expected = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    with PeakMemory(held_tensors(model, optimizer)) as tracker:
        step()
    assert tracker.peak_bytes == expected

    params = sum(p.numel() * 4 for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    held = params + state + (params if keep_grads else 0)  # zero_grad(set_to_none=False) keeps .grad
    assert tracker.start_bytes == held
    assert tracker.current_bytes == held  # every temporary of the step was released
    # the step's gradients (when not kept) and temporaries come on top
    assert tracker.peak_bytes > held + (0 if keep_grads else params)


def test_hand_counted_allocations_views_and_frees() -> None:
    with PeakMemory() as tracker:
        a = torch.empty(MIB // 4)  # float32: 1 MiB
        b = torch.ones(MIB // 4)
        assert tracker.current_bytes == 2 * MIB
        views = [a.view(512, -1), a[:10], a.t(), b.view(-1), b[1:]]  # share storages: not counted again
        assert tracker.current_bytes == 2 * MIB
        del b
        assert tracker.current_bytes == 2 * MIB  # a view still holds b's storage
        views = views[:3]
        assert tracker.current_bytes == MIB
        c = torch.empty(MIB // 8)  # 512 KiB, below the peak
    assert tracker.start_bytes == 0
    assert tracker.peak_bytes == 2 * MIB
    assert tracker.current_bytes == MIB + MIB // 2
    del c
    assert tracker.current_bytes == MIB  # releases are still followed after the region
    del a, views
    assert tracker.current_bytes == 0 and tracker.peak_bytes == 2 * MIB


def test_existing_tensors_count_once_from_the_start_and_until_they_die() -> None:
    weight = torch.zeros(256, 1024)  # 1 MiB
    other = torch.zeros(128, 1024)  # 512 KiB
    existing = [weight, weight.t(), weight[0], other]
    tracker = PeakMemory(existing)
    assert tracker.start_bytes == tracker.current_bytes == tracker.peak_bytes == MIB + MIB // 2
    del existing
    with tracker:
        y = torch.mm(other, weight.t())  # 128 x 256 float32 = 128 KiB; the view of weight is not new
        del other
    assert tracker.peak_bytes == MIB + MIB // 2 + 128 * 1024
    assert tracker.current_bytes == MIB + 128 * 1024
    del y


def test_meta_tensors_count_their_logical_bytes() -> None:
    existing = torch.empty(1024, 1024, device="meta")  # 4 MiB that were never allocated
    with PeakMemory([existing]) as tracker:
        a = torch.empty(1024, 512, device="meta", dtype=torch.bfloat16)  # 1 MiB
        b = (a + 1).view(-1)  # another 1 MiB; the view adds nothing
        del a
        c = b.sum()  # 2 bytes
    assert tracker.start_bytes == 4 * MIB
    assert tracker.peak_bytes == 6 * MIB  # existing, a and a + 1 at once
    assert tracker.current_bytes == 5 * MIB + 2
    del b, c


def test_size_of_prices_each_storage_once() -> None:
    calls: list[tuple[int, ...]] = []

    def as_bfloat16(tensor: torch.Tensor) -> float:
        calls.append(tuple(tensor.shape))
        return tensor.untyped_storage().nbytes() / tensor.element_size() * 2

    param = torch.empty(512, 1024, device="meta")  # 2 MiB as float32, priced 1 MiB
    with PeakMemory([param], size_of=as_bfloat16) as tracker:
        x = torch.empty(256, 1024, device="meta")  # priced 512 KiB
        y = (x @ param.t()).relu()  # mm output priced 256 KiB, relu output too (mm's dies after)
        del x
    assert tracker.start_bytes == MIB
    assert tracker.peak_bytes == MIB + MIB // 2 + MIB // 2  # param, x, mm output, relu output
    assert tracker.current_bytes == MIB + MIB // 4
    # one call per new storage: param, x, mm output, relu output (the t() view shares param's storage)
    assert calls == [(512, 1024), (256, 1024), (256, 512), (256, 512)]
    del y


def test_held_tensors_lists_parameters_grads_buffers_and_optimizer_state() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    params = list(model.parameters())
    buffers = list(model.buffers())
    assert len(params) == 4 and len(buffers) == 3  # running mean, var, num_batches_tracked
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def ids(tensors: list[torch.Tensor]) -> list[int]:
        return sorted(id(t) for t in tensors)

    assert ids(held_tensors(model, optimizer)) == ids(params + buffers)  # no grads, no state yet
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    grads = [p.grad for p in params]
    state = [v for p in params for v in optimizer.state[p].values()]
    assert len(state) == 3 * len(params)  # step, exp_avg, exp_avg_sq
    held = held_tensors(model, optimizer)
    assert ids(held) == ids(params + grads + buffers + state)
    assert ids(held_tensors(optimizer)) == ids(state)

    momentum = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    momentum.step()
    assert ids(held_tensors(momentum)) == ids([momentum.state[p]["momentum_buffer"] for p in params])
