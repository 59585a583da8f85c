"""Training loops as users write them, run three ways: rannc, DDP and one process on the global batch.

Each `LoopCase` names a plain-torch model, the loss the user's loop computes from its outputs (outside the model,
inside it, or both), the rannc plan to force, and extras of the loop (gradient accumulation, clipping, ZeRO-1).
`run_loop_cases` runs in spawned ranks: for every case it trains the model wrapped by rannc and then the same
model under DDP on the same local batches, and returns what the tests compare (rank 0's parameters, buffers and
SGD momentum buffers, which after the first step are exactly the gradients). `train_one_process` trains the
unwrapped model on the global batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import rannc

LR = 0.05
MOMENTUM = 0.9
CLIP = 0.05  # small enough that every step clips


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(8, 16),
            nn.Tanh(),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Linear(16, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(torch.relu(self.conv1(images)), 2)
        h = torch.relu(self.conv2(h)) + h  # a skip connection
        return self.head(h.flatten(1))


class TwoHeads(nn.Module):
    """A regression head and a classification head on a shared trunk: two outputs, two losses."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.regress = nn.Linear(16, 2)
        self.classify = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.regress(h), self.classify(h)


class LossAndLogits(nn.Module):
    """Returns its own loss and its logits, as Hugging Face models do."""

    def __init__(self, body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = MLP() if body is None else body

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return F.cross_entropy(logits, labels), logits


class BatchNormNet(nn.Module):
    """BatchNorm with and without affine parameters: running statistics updated in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16)
        self.bn2 = nn.BatchNorm1d(16, affine=False, track_running_stats=True)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.fc1(x)))
        h = torch.relu(self.bn2(self.fc2(h)))
        return self.fc3(h)


class WithLoss(nn.Module):
    """A body whose loss is computed inside forward (what the eager schedules, 1F1B and interleaved 1F1B, need)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.body(x), target)


class SkipNet(nn.Module):
    """Every layer adds the first layer's output (skip connections into every later stage or chunk)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(5))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.first(x))
        h = h0
        for layer in self.layers:
            h = torch.tanh(layer(h)) + h0
        return self.head(h)


class TiedNet(nn.Module):
    """Weights used at both ends and in the middle (tied across chunks: `square` in layers 1, 3 and 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.square = nn.Linear(16, 16)
        self.other = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.square(h))
        h = torch.tanh(self.other[0](h))
        h = torch.tanh(self.square(h))
        h = torch.tanh(self.other[1](h))
        h = torch.tanh(self.square(h))
        return self.out(h) + F.linear(x, self.out.weight @ self.inp.weight)  # both ends' weights again


MODELS = {
    "mlp": MLP,
    "mlp_loss": lambda: WithLoss(MLP()),
    "skip_loss": lambda: WithLoss(SkipNet()),
    "tied_loss": lambda: WithLoss(TiedNet()),
    "batchnorm_loss": lambda: WithLoss(BatchNormNet()),
    "cnn": SmallCNN,
    "two_heads": TwoHeads,
    "loss_and_logits": LossAndLogits,  # (loss, logits), as Hugging Face models return
    "batchnorm": BatchNormNet,
    # running statistics and a loss inside, returned with the logits
    "batchnorm_loss_logits": lambda: LossAndLogits(BatchNormNet()),
}


@dataclasses.dataclass(frozen=True)
class LoopCase:
    label: str
    model: str
    # "mse", "cross_entropy", "two_losses", "explicit_gradient" (outside the model), "returned" (the model's
    # own loss), "returned_plus_logits" (the model's loss and a term of its logits)
    loss: str
    stages: int
    microbatches: int
    schedule: str = "fill_drain"
    steps: int = 3
    local_batches: tuple[int, ...] = ()  # per rank; () = GLOBAL_BATCH split equally
    accumulate: int = 1  # calls per optimizer step (all but the last under no_sync)
    delay_allreduce: bool = False  # accumulate pyrannc's way: delay_grad_allreduce(True) + allreduce_grads()
    clip: bool = False
    zero: bool = False
    shard: str = "none"  # config shard_stages: the level of every replicated stage ("auto": the planner's)
    references: tuple[str, ...] = ("ddp", "one_process")  # what the run must equal
    chunks: tuple[int, ...] = ()  # one process runs each global batch as these row chunks
    recompute: str = "never"
    model_chunks: int = 0  # interleaved 1F1B: model chunks per position (`stages` positions)

    def overrides(self) -> dict[str, Any]:
        return {
            "partition_num": self.stages,
            "min_pipeline": self.microbatches,
            "max_pipeline": self.microbatches,
            "schedule": self.schedule,
            "enable_zero": self.zero,
            "shard_stages": self.shard,
            "recompute": self.recompute,
            "profile_iterations": 1,
            "show_progress": False,
            **({"chunks": self.model_chunks} if self.model_chunks else {}),
        }


GLOBAL_BATCH = 16


def local_sizes(case: LoopCase, world: int) -> list[int]:
    if case.local_batches:
        assert len(case.local_batches) == world
        return list(case.local_batches)
    return [GLOBAL_BATCH // world] * world


def make_batch(case: LoopCase, call: int, rows: int) -> dict[str, torch.Tensor]:
    """The global batch of one call (inputs, targets, and an output gradient for `explicit_gradient`)."""
    g = torch.Generator().manual_seed(1000 + call)  # call -1: the evaluation batch
    if case.model == "cnn":
        x = torch.randn(rows, 3, 8, 8, generator=g)
    else:
        x = torch.randn(rows, 8, generator=g)
    return {
        "x": x,
        "target": torch.randn(rows, 4, generator=g),
        "target2": torch.randn(rows, 2, generator=g),
        "labels": torch.randint(0, 5 if case.model == "cnn" else 3, (rows,), generator=g),
        "out_grad": torch.randn(rows, 4, generator=g),
    }


def slice_batch(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in batch.items()}


def returns_logits(case: LoopCase) -> bool:
    """Whether the case's model returns (its loss, its logits) and takes labels, rather than only its loss."""
    return case.model in ("loss_and_logits", "batchnorm_loss_logits")


def backward_through(
    case: LoopCase, model: Any, batch: dict[str, torch.Tensor], weight: float = 1.0, world: int = 1
) -> float:
    """The user's loop body: forward, the loss the user writes (times `weight`), backward. An explicit output
    gradient is divided by `world`: one process given the global batch's gradient gets the sum of the ranks'
    gradients, which DDP averages."""
    if case.loss == "explicit_gradient":
        out = model(batch["x"])
        out.backward(batch["out_grad"] / world)
        return float(out.detach().square().sum())
    if case.loss in ("returned", "returned_plus_logits") and returns_logits(case):
        loss, logits = model(batch["x"], batch["labels"])
        total = loss + 0.1 * logits.square().mean() if case.loss == "returned_plus_logits" else loss
    elif case.loss == "returned":  # the model's own loss
        total = model(batch["x"], batch["target"])
    else:
        out = model(batch["x"])
        if case.loss == "mse":
            total = F.mse_loss(out, batch["target"])
        elif case.loss == "cross_entropy":
            total = F.cross_entropy(out, batch["labels"])
        elif case.loss == "two_losses":
            regression, logits = out
            total = F.mse_loss(regression, batch["target2"]) + F.cross_entropy(logits, batch["labels"])
        else:
            raise ValueError(f"unknown loss {case.loss!r}")
    (total * weight if weight != 1.0 else total).backward()
    return float(total.detach()) * weight


def eval_outputs(case: LoopCase, model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The model's outputs in eval mode, flattened to a list of tensors."""
    if case.loss in ("returned", "returned_plus_logits") and returns_logits(case):
        return [t.detach().clone() for t in model(batch["x"], batch["labels"])]
    if case.loss == "returned":
        return [model(batch["x"], batch["target"]).detach().clone()]
    out = model(batch["x"])
    return [t.detach().clone() for t in (out if isinstance(out, tuple) else (out,))]


def build(case: LoopCase) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[case.model]()


def make_sgd(params: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def _snapshot(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model_state.items()}


def _momentum(optimizer_state: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
    """Momentum buffers by parameter name from a plain optimizer's state dict (params in `names` order)."""
    return {
        names[index]: entry["momentum_buffer"].clone()
        for index, entry in optimizer_state["state"].items()
        if entry.get("momentum_buffer") is not None
    }


def train_loop(case: LoopCase, model: Any, optimizer: Any, rank: int, world: int) -> dict[str, Any]:
    """Train `case` on this rank's rows; returns losses, momentum after step 1 and the clip norms."""
    sizes = local_sizes(case, world)
    lo = sum(sizes[:rank])
    losses, norms = [], []
    momentum1: Any = None
    input_grad = None
    for step in range(case.steps):
        for k in range(case.accumulate):
            call = step * case.accumulate + k
            batch = slice_batch(make_batch(case, call, sum(sizes)), lo, lo + sizes[rank])
            if call == 0:
                batch["x"].requires_grad_(True)
            last = k == case.accumulate - 1
            with contextlib.nullcontext() if last or case.delay_allreduce else model.no_sync():
                losses.append(backward_through(case, model, batch))
            if call == 0:
                input_grad = batch["x"].grad.clone()
        if case.delay_allreduce:
            model.allreduce_grads()
        if case.clip:
            norms.append(float(model.clip_grad_norm(CLIP)))
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            momentum1 = optimizer.state_dict(from_global=True)  # every rank calls it
    return {"losses": losses, "norms": norms, "momentum1": momentum1, "input_grad": input_grad}


def run_rannc(case: LoopCase, rank: int, world: int) -> dict[str, Any]:
    model = build(case)
    names = [name for name, _ in model.named_parameters()]
    optimizer = make_sgd(model.parameters())
    wrapped = rannc.RaNNCModule(model, optimizer, **case.overrides())
    if case.delay_allreduce:
        wrapped.delay_grad_allreduce(True)
    result = train_loop(case, wrapped, optimizer, rank, world)
    wrapped.eval()  # eval reads the trained buffers (running statistics)
    with torch.no_grad():
        sizes = local_sizes(case, world)
        lo = sum(sizes[:rank])
        eval_out = eval_outputs(
            case, wrapped, slice_batch(make_batch(case, -1, sum(sizes)), lo, lo + sizes[rank])
        )
    plan = wrapped.deployment.plan
    state = wrapped.state_dict()
    final_momentum = optimizer.state_dict(from_global=True)
    out = {
        "losses": result["losses"],
        "norms": result["norms"],
        "stages": [len(stage.ranks) for stage in plan.stages[: plan.positions]],  # replicas per position
        "shards": [str(stage.shard) for stage in plan.stages],
        "optimizer_states": len(optimizer.state),  # parameters whose state this rank keeps
        "held": len(list(wrapped.parameters())),
        "chunks": plan.chunks,
        "holders": {name: stages for name, stages in wrapped._job.layout.holders.items()},
        "microbatches": plan.microbatches,
        "schedule": str(plan.schedule),
        "state": _snapshot(state) if rank == 0 else None,
        "momentum1": _momentum(result["momentum1"], names) if rank == 0 else None,
        "momentum": _momentum(final_momentum, names) if rank == 0 else None,
        "eval": eval_out,
        "input_grad": result["input_grad"],  # of the first call, this rank's rows
    }
    del wrapped, optimizer, model
    gc.collect()
    rannc.barrier()
    return out


def run_ddp(case: LoopCase, rank: int, world: int) -> dict[str, Any]:
    model = build(case)
    names = [name for name, _ in model.named_parameters()]
    # broadcast_buffers=False: each rank keeps the running statistics of its own rows (rannc averages them
    # over replicas; their mean is compared)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = make_sgd(ddp.parameters())
    sizes = local_sizes(case, world)
    lo = sum(sizes[:rank])
    losses, norms = [], []
    momentum1: dict[str, torch.Tensor] = {}
    for step in range(case.steps):
        for k in range(case.accumulate):
            call = step * case.accumulate + k
            batch = slice_batch(make_batch(case, call, sum(sizes)), lo, lo + sizes[rank])
            last = k == case.accumulate - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                losses.append(backward_through(case, ddp, batch))
        if case.clip:
            norms.append(float(nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            momentum1 = _momentum(optimizer.state_dict(), names)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    for value in buffers.values():
        if value.is_floating_point():
            dist.all_reduce(value)
            value /= world
    state = _snapshot(model.state_dict())
    state.update(buffers)
    return {
        "losses": losses,
        "norms": norms,
        "state": state,
        "momentum1": momentum1,
        "momentum": _momentum(optimizer.state_dict(), names),
    }


def run_loop_cases(rank: int, world: int, cases: list[LoopCase]) -> list[dict[str, Any]]:
    """Worker: every case with rannc, then with DDP, in this process group."""
    return [{"rannc": run_rannc(case, rank, world), "ddp": run_ddp(case, rank, world)} for case in cases]


def train_one_process(case: LoopCase, world: int) -> dict[str, Any]:
    """The unwrapped model on each global batch. With `case.chunks`, each global batch runs as consecutive row
    chunks weighted by rows / batch (sequential gradient accumulation, buffers updated in order): what a
    pipeline of one replica per stage and len(chunks) microbatches computes."""
    model = build(case)
    names = [name for name, _ in model.named_parameters()]
    optimizer = make_sgd(model.parameters())
    rows = sum(local_sizes(case, world))
    losses, norms = [], []
    momentum1: dict[str, torch.Tensor] = {}
    for step in range(case.steps):
        for k in range(case.accumulate):
            batch = make_batch(case, step * case.accumulate + k, rows)
            if step == 0 and k == 0:
                leaf = batch["x"].requires_grad_(True)
                batch = {**batch, "x": leaf}  # chunks are slices of one leaf: its grad has every row
            # accumulated calls add up (as under DDP's no_sync); row chunks are weighted by their share of rows
            start, total = 0, 0.0
            for size in case.chunks or (rows,):
                piece = slice_batch(batch, start, start + size)
                start += size
                weight = 1.0 if case.loss == "explicit_gradient" else size / rows
                total += backward_through(case, model, piece, weight, world)
            losses.append(total)
        if case.clip:
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            momentum1 = _momentum(optimizer.state_dict(), names)
    model.eval()
    with torch.no_grad():
        eval_out = eval_outputs(case, model, make_batch(case, -1, rows))
    return {
        "losses": losses,
        "norms": norms,
        "eval": eval_out,
        "input_grad": leaf.grad.clone(),
        "state": _snapshot(model.state_dict()),
        "momentum1": momentum1,
        "momentum": _momentum(optimizer.state_dict(), names),
    }
