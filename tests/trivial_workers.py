"""Trivial models (nothing to cut) trained by rannc on each rank, and by DDP beside it (run by test_trivial_models).

Each scenario builds the model from a seed, wraps it as a user would, trains STEPS steps of SGD with momentum on
this rank's rows of the global batches and returns what the test compares with one process on the global batch
and with DistributedDataParallel on the same rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import rannc

IN, OUT = 4, 3
GLOBAL_BATCH, STEPS, LR, MOMENTUM = 8, 3, 0.1, 0.9
SEED = 7


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PassThrough(nn.Module):
    """Two inputs returned unchanged (swapped), and a parameter forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y, x


class SquaredError(nn.Module):
    """No parameters; returns a loss (a per-sample mean)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x - y) ** 2).mean()


class Relu(nn.Module):
    """A single operation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class LinearLoss(nn.Module):
    """A single Linear whose forward returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.linear(x), y)


MODELS = {
    "identity": Identity,
    "pass_through": PassThrough,
    "squared_error": SquaredError,
    "relu": Relu,
    "linear_loss": LinearLoss,
    "linear": lambda: nn.Linear(IN, OUT),  # a bare nn.Linear; the user computes the loss
}


def build(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    return MODELS[name]()


TAKES_TARGET = ("pass_through", "squared_error", "linear_loss")  # forward(x, y); the others forward(x)


def global_batches(name: str) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """STEPS global batches: (the inputs of forward, the target y)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    width = IN if name in ("pass_through", "squared_error") else OUT
    batches = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, IN, generator=generator)
        y = torch.randn(GLOBAL_BATCH, width, generator=generator)
        batches.append(([x, y] if name in TAKES_TARGET else [x], y))
    return batches


def user_loss(name: str, out: Any, y: torch.Tensor) -> torch.Tensor:
    """The loss a user computes from the outputs: the output itself where forward returns the loss, a mean
    squared error for the bare Linear, and a weighted sum of per-sample means over pass-through outputs."""
    if name in ("squared_error", "linear_loss"):
        return out
    if name == "linear":
        return F.mse_loss(out, y)
    flat = out if isinstance(out, tuple) else (out,)
    return sum((t * t * (k + 1)).mean() for k, t in enumerate(flat))


def local_rows(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    rows = tensor.shape[0] // world
    return tensor[rank * rows : (rank + 1) * rows].clone()


def train(model: Any, name: str, optimizer: torch.optim.Optimizer | None, rank: int, world: int) -> dict:
    """STEPS steps on this rank's rows: the outputs and input gradients of every step, and the losses."""
    outputs, input_grads, losses = [], [], []
    for inputs, target in global_batches(name):
        inputs = [local_rows(t, rank, world).requires_grad_(True) for t in inputs]
        out = model(*inputs)
        if name == "identity":
            assert torch.equal(out, inputs[0]) and out.data_ptr() == inputs[0].data_ptr(), "the caller's own"
        loss = user_loss(name, out, local_rows(target, rank, world))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        flat = out if isinstance(out, tuple) else (out,)
        outputs.append([t.detach().clone() for t in flat])
        input_grads.append([t.grad.clone() for t in inputs])
        losses.append(float(loss.detach()))
    return {"outputs": outputs, "input_grads": input_grads, "losses": losses}


def trivial_worker(rank: int, world: int, cache: str, deployment_dir: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in MODELS:
        model = build(name)
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM) if params else None
        wrapped = rannc.RaNNCModule(
            model,
            optimizer,
            show_progress=False,
            profile_cache_dir=cache,
            profile_iterations=1,
            save_deployment=True,
            deployment_file=f"{deployment_dir}/{name}.json",
        )
        result = train(wrapped, name, optimizer, rank, world)
        plan = wrapped.deployment.plan
        result["stages"] = [list(stage.ranks) for stage in plan.stages]
        result["state"] = wrapped.state_dict()
        if name in ("linear", "linear_loss"):  # DDP refuses models without parameters used in forward
            reference = build(name)
            ddp = torch.nn.parallel.DistributedDataParallel(reference)
            ddp_optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM)
            result["ddp"] = train(ddp, name, ddp_optimizer, rank, world)
            result["ddp_state"] = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        results[name] = result
    return results


def late_rank_worker(rank: int, world: int, cache: str, late_s: float) -> float:
    """Trains the one-Linear model a step, then every rank but 0 stays `late_s` seconds longer in its script
    (as a rank that writes its own files does) before the launcher ends the job."""
    import time

    model = build("linear_loss")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    wrapped = rannc.RaNNCModule(
        model, optimizer, show_progress=False, profile_cache_dir=cache, profile_iterations=1
    )
    inputs, _ = global_batches("linear_loss")[0]
    loss = wrapped(*[local_rows(t, rank, world) for t in inputs])
    loss.backward()
    optimizer.step()
    if rank:
        time.sleep(late_s)
    return float(loss.detach())
