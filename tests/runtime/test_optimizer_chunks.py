"""The optimizer stepped a chunk of parameters at a time (bounded temporaries) equals one step over all of them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from rannc.runtime.dist import GroupCache
from rannc.runtime.optimizer import OptimizerBinding, parameter_chunks, steps_in_chunks


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8))


def bind(optimizer: torch.optim.Optimizer, net: nn.Module, chunk_bytes: float) -> OptimizerBinding:
    """The optimizer bound as RaNNCModule binds it on a one-rank job holding every parameter."""
    tensors = dict(net.named_parameters())
    return OptimizerBinding(
        optimizer,
        {id(t): name for name, t in tensors.items()},
        {name: (0,) for name in tensors},
        {name: t.numel() * t.element_size() for name, t in tensors.items()},
        tensors,
        rank=0,
        zero=False,
        groups=GroupCache(),
        chunk_bytes=chunk_bytes,
    )


def train(make: Callable[[Any], torch.optim.Optimizer], chunk_bytes: float | None) -> nn.Module:
    """Five steps of the seeded model with the optimizer `make(param_groups)` makes; chunked unless None."""
    net = model()
    # two param groups, so that a chunk holds parameters of both
    groups = [
        {"params": list(net[0].parameters()) + [net[2].weight]},
        {"params": [net[2].bias, *net[4].parameters()]},
    ]
    optimizer = make(groups)
    if chunk_bytes is not None:
        binding = bind(optimizer, net, chunk_bytes)
        assert binding.chunked
    torch.manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 32)
        net(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return net


OPTIMIZERS = {
    "sgd momentum": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
    "sgd momentum foreach": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, foreach=True),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "adam foreach": lambda g: torch.optim.Adam(g, lr=1e-2, foreach=True),
    "adamw foreach L2": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1, foreach=True),
    "adam coupled decay foreach": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1, foreach=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_chunked_step_equals_one_step_bit_for_bit(name: str) -> None:
    whole = train(OPTIMIZERS[name], None)
    # 4 KiB chunks: net[0].weight (8 KiB) alone, then a few tensors each
    chunked = train(OPTIMIZERS[name], 4096)
    for (key, a), (_, b) in zip(whole.state_dict().items(), chunked.state_dict().items()):
        assert torch.equal(a, b), key


def test_chunks_hold_whole_tensors_of_at_most_the_limit() -> None:
    a, b, c, d = (
        torch.zeros(100),
        torch.zeros(300),
        torch.zeros(50),
        torch.zeros(20),
    )  # 400, 1200, 200, 80 bytes
    chunks = parameter_chunks([[a, b], [c, d]], 500)
    assert [[[t.numel() for t in group] for group in chunk] for chunk in chunks] == [
        [[100], []],
        [[300], []],  # larger than the limit: alone
        [[], [50, 20]],
    ]
    assert parameter_chunks([[a], []], 1e9) == [[[a], []]]


def test_a_chunked_step_runs_the_hooks_once_and_keeps_the_optimizer_whole() -> None:
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # wraps optimizer.step
    binding = bind(optimizer, net, 4096)
    assert binding.chunked
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    net(torch.randn(4, 32)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler learns that the optimizer stepped
        optimizer.step()
        scheduler.step()
    assert calls == ["pre", "post"]
    assert len(optimizer.param_groups[0]["params"]) == 6 and len(optimizer.state) == 6
    assert optimizer.param_groups[0]["lr"] == 5e-4
    # A closure runs once: that step is not chunked.
    evaluations = []

    def closure() -> torch.Tensor:
        evaluations.append(1)
        return torch.zeros(())

    optimizer.step(closure)
    assert evaluations == [1]
    # Unbinding gives back the optimizer's own step.
    binding.unbind()
    assert "step" not in optimizer.__dict__ or getattr(optimizer.step, "_wrapped_by_lr_sched", False)


def test_which_optimizers_are_chunked() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    assert steps_in_chunks(torch.optim.AdamW(params))
    assert steps_in_chunks(torch.optim.SGD(params, lr=0.1))
    assert not steps_in_chunks(torch.optim.LBFGS(params))

    class Custom(torch.optim.SGD):  # a user's subclass may couple parameters: stepped whole
        pass

    assert not steps_in_chunks(Custom(params, lr=0.1))
    # Parameters of a chunk or less: stepped as before, no step of rannc's.
    net = model()
    small = torch.optim.Adam(net.parameters())
    assert not bind(small, net, 1e9).chunked and "step" not in small.__dict__


def chunked_training(rank: int, world: int, cache: str) -> dict[str, Any]:
    """Three steps of a 2-stage, 2-rank RaNNCModule job with foreach SGD with momentum stepped in chunks of 1 KiB
    (Adam's update would magnify the pipeline's other order of gradient sums past the tolerance)."""
    import rannc
    from rannc.runtime import optimizer as optimizer_module

    optimizer_module.OPTIMIZER_CHUNK_BYTES = 1024.0
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=True)
    wrapped = rannc.RaNNCModule(
        net,
        optimizer,
        partition_num=2,
        profile_iterations=1,
        show_progress=False,
        profile_cache_dir=cache,
        comm_timeout_s=120.0,  # a loaded machine may stall a rank for long
    )
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 32)
        wrapped(x[rank * 4 : rank * 4 + 4]).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = wrapped.state_dict()  # a collective: every rank calls it, rank 0 gets the state
    binding = wrapped._job.optimizer_binding  # type: ignore[union-attr]
    return {"chunked": binding is not None and binding.chunked, "state": state if rank == 0 else None}


@pytest.mark.slow
def test_a_job_steps_in_chunks_as_one_process_steps(tmp_path: Any) -> None:
    from distributed_helpers import run_workers

    results = run_workers(chunked_training, 2, str(tmp_path / "cache"), timeout=300)
    assert all(r["chunked"] for r in results)
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=True)
    torch.manual_seed(1)
    for _ in range(3):
        net(torch.randn(8, 32)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(results[0]["state"][key], value, rtol=1e-5, atol=1e-7)
