"""Models and spawned-rank workers for tests/test_training_features.py (training features beyond plain steps).

Each worker runs a list of scenarios one after the other in the same processes (a fresh model, optimizer and
RaNNCModule per scenario) and records, per scenario, the value it produced or the error it raised
(`error_workers.run_scenarios`, which also stops the spawn when a scenario failed on some ranks only). Every value
is picklable; full state dicts are returned by rank 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import models
import torch
import torch.distributed as dist
import torch.nn.functional as F
from error_workers import attempt, run_scenarios
from torch import nn

import rannc
from rannc.runtime.grad_sync import GradSync, OverlappedReduce

SEED = 0
SGD_LR = 0.05
ADAMW_LR = 1e-3
DROPOUT_P = 0.2
DROPOUT_LINEARS = 4
SCHEDULER_STEP, SCHEDULER_GAMMA = 1, 0.5
AUTOCAST_DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class DropoutMLP(nn.Module):
    """4 Linear layers (16 -> 32 -> 32 -> 32 -> 4) with GELU and nn.Dropout(p) after each hidden activation;
    forward(x [B, 16], y [B, 4]) -> scalar MSE loss (the inputs of models.MLP, so models' "mlp" batches fit)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        dims = [models.MLP_IN] + [models.MLP_WIDTH] * (DROPOUT_LINEARS - 1) + [models.MLP_OUT]
        layers: list[nn.Module] = []
        for index in range(DROPOUT_LINEARS):
            layers.append(nn.Linear(dims[index], dims[index + 1]))
            if index < DROPOUT_LINEARS - 1:
                layers.append(nn.GELU())
                layers.append(nn.Dropout(p))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net(x), y)


def dropout_mlp(seed: int, p: float = DROPOUT_P) -> DropoutMLP:
    """Bit-identical weights for the same seed (whatever p is) in any process; in train mode."""
    torch.manual_seed(seed)
    model = DropoutMLP(p)
    model.train()
    return model


def build(name: str, seed: int = SEED) -> nn.Module:
    """ "mlp" / "skip_tied" from tests/models.py, "dropout" (p=0.2) and "dropout0" (p=0) from here."""
    if name == "dropout":
        return dropout_mlp(seed, DROPOUT_P)
    if name == "dropout0":
        return dropout_mlp(seed, 0.0)
    return models.build(name, seed)


def batch_model(name: str) -> str:
    """The tests/models.py model whose batches `name` takes."""
    return "mlp" if name.startswith("dropout") else name


def make_batches(name: str, steps: int, global_batch: int, seed: int = SEED) -> list[models.Batch]:
    return models.make_batches(batch_model(name), seed, steps, global_batch)


def loss_of(name: str, out: Any) -> torch.Tensor:
    return models.get_loss(batch_model(name), out)


def make_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=SGD_LR, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=ADAMW_LR)
    raise ValueError(f"unknown optimizer {kind!r}")


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=SCHEDULER_STEP, gamma=SCHEDULER_GAMMA)


# ----------------------------------------------------------------------------------------------------------------
# Helpers run on every rank
# ----------------------------------------------------------------------------------------------------------------


def config(
    cache: str, partition_num: int, microbatches: int = 2, schedule: str = "1f1b", **extra: Any
) -> dict:
    return {
        "partition_num": partition_num,
        "min_pipeline": microbatches,
        "max_pipeline": microbatches,
        "schedule": schedule,
        "profile_iterations": 1,
        "show_progress": False,
        "profile_cache_dir": cache,
        **extra,
    }


def local(batch: models.Batch) -> models.Batch:
    return models.local_slice(batch, rannc.get_rank(), rannc.get_world_size())


def plan_summary(wrapped: rannc.RaNNCModule) -> dict[str, Any]:
    assert wrapped.deployment is not None
    plan = wrapped.deployment.plan
    stages = [sorted(int(r) for r in stage.ranks) for stage in plan.stages]
    mine = next(s for s, ranks in enumerate(stages) if rannc.get_rank() in ranks)
    return {
        "stages": stages,
        "microbatches": int(plan.microbatches),
        "schedule": str(plan.schedule),
        "my_stage": mine,
        "my_replicas": len(stages[mine]),
    }


def full_state(wrapped: rannc.RaNNCModule) -> dict[str, torch.Tensor] | None:
    """Every rank calls state_dict(); rank 0 returns a detached copy, the others None (after checking theirs
    is empty)."""
    state = wrapped.state_dict()
    if rannc.get_rank() != 0:
        assert state == {}, f"rank {rannc.get_rank()} got a non-empty state dict: {sorted(state)[:5]}"
        return None
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def to_cpu(value: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor detached on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


def same_on_all_ranks(values: list[float]) -> None:
    """Every rank must see the same numbers (losses, norms)."""
    world = rannc.get_world_size()
    if world == 1:
        return
    mine = torch.tensor(values, dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    for other, theirs in enumerate(gathered):
        assert torch.equal(theirs, mine), (
            f"rank {rannc.get_rank()} has {values}, rank {other} has {theirs.tolist()}"
        )


def replicas_agree(wrapped: rannc.RaNNCModule) -> bool:
    """The replicas of this rank's stage hold bit-identical parameters (gathered digests, all ranks call it)."""
    digest = hashlib.sha256()
    for param in wrapped.parameters():
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests: list[str | None] = [None] * rannc.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    stage_ranks = plan_summary(wrapped)["stages"][plan_summary(wrapped)["my_stage"]]
    return len({digests[r] for r in stage_ranks}) == 1


@contextlib.contextmanager
def count_grad_allreduces(counter: list[int]) -> Iterator[None]:
    """Count this rank's GradSync.allreduce calls (the gradient all-reduce among a parameter's replicas)."""
    original = GradSync.allreduce

    original_start = OverlappedReduce.__init__

    def counting(self: GradSync, grads: dict[str, torch.Tensor], **kwargs: Any) -> None:
        if self.mine:  # this rank is in a rank set with more than one rank: a real all-reduce
            counter[0] += 1
        original(self, grads, **kwargs)

    def counting_start(self: OverlappedReduce, *args: Any) -> None:
        counter[0] += 1  # an all-reduce started during a backward
        original_start(self, *args)

    GradSync.allreduce = counting  # type: ignore[method-assign]
    OverlappedReduce.__init__ = counting_start  # type: ignore[method-assign]
    try:
        yield
    finally:
        GradSync.allreduce = original  # type: ignore[method-assign]
        OverlappedReduce.__init__ = original_start  # type: ignore[method-assign]


@contextlib.contextmanager
def watch_overlapped_reduces(records: list[dict[str, Any]]) -> Iterator[None]:
    """Per OverlappedReduce this rank finishes: its buckets, how many were launched before `finish()` (during
    the backward) and the parameters it reduced."""
    original = OverlappedReduce.finish

    def finish(self: OverlappedReduce) -> dict[str, torch.Tensor]:
        launched = len(self.launched)
        reduced = original(self)
        records.append(
            {"buckets": len(self.buckets), "launched_in_backward": launched, "names": sorted(reduced)}
        )
        return reduced

    OverlappedReduce.finish = finish  # type: ignore[method-assign]
    try:
        yield
    finally:
        OverlappedReduce.finish = original  # type: ignore[method-assign]


def wrap(name: str, opt_kind: str, overrides: dict[str, Any]) -> tuple[Any, Any, rannc.RaNNCModule]:
    model = build(name)
    optimizer = make_optimizer(opt_kind, model.parameters())
    return model, optimizer, rannc.RaNNCModule(model, optimizer, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Scenarios (each returns a picklable dict)
# ----------------------------------------------------------------------------------------------------------------


def grad_accumulation(
    cache: str, name: str, style: str, partition_num: int, schedule: str, steps: int, global_batch: int
) -> dict[str, Any]:
    """`steps` optimizer steps, each over two global batches: the first backward inside `no_sync()` (style
    "no_sync") or with `delay_grad_allreduce(True)` and a final `allreduce_grads()` (style "delay").
    Records the losses, the gradient all-reduces of each phase and the final state."""
    _, optimizer, wrapped = wrap(name, "sgd", config(cache, partition_num, schedule=schedule))
    batches = make_batches(name, 2 * steps, global_batch)
    losses: list[float] = []
    counts: dict[str, list[int]] = {"accumulating": [], "synced": [], "allreduce_grads": []}

    def fwd_bwd(batch: models.Batch, phase: str) -> None:
        counter = [0]
        with count_grad_allreduces(counter):
            loss = loss_of(name, models.call(wrapped, local(batch)))
            loss.backward()
        counts[phase].append(counter[0])
        losses.append(float(loss.detach()))

    for step in range(steps):
        first, second = batches[2 * step], batches[2 * step + 1]
        if style == "no_sync":
            with wrapped.no_sync():
                fwd_bwd(first, "accumulating")
            fwd_bwd(second, "synced")
        elif style == "delay":
            wrapped.delay_grad_allreduce(True)
            fwd_bwd(first, "accumulating")
            fwd_bwd(second, "accumulating")
            counter = [0]
            with count_grad_allreduces(counter):
                wrapped.allreduce_grads()
            counts["allreduce_grads"].append(counter[0])
            wrapped.delay_grad_allreduce(False)
        else:
            raise ValueError(style)
        optimizer.step()
        optimizer.zero_grad()
    same_on_all_ranks(losses)
    return {"plan": plan_summary(wrapped), "losses": losses, "counts": counts, "state": full_state(wrapped)}


def overlapped_sync(
    cache: str, name: str, partition_num: int, schedule: str, steps: int, global_batch: int
) -> dict[str, Any]:
    """Plain SGD steps with the default overlap_grad_sync: records, per step, the reduces started during the
    backward (see watch_overlapped_reduces), the losses and the final state."""
    _, optimizer, wrapped = wrap(name, "sgd", config(cache, partition_num, schedule=schedule))
    losses: list[float] = []
    per_step: list[list[dict[str, Any]]] = []
    for batch in make_batches(name, steps, global_batch):
        records: list[dict[str, Any]] = []
        with watch_overlapped_reduces(records):
            loss = loss_of(name, models.call(wrapped, local(batch)))
            loss.backward()
        per_step.append(records)
        losses.append(float(loss.detach()))
        optimizer.step()
        optimizer.zero_grad()
    same_on_all_ranks(losses)
    trainable = sorted(wrapped.stage.trainable)
    return {
        "plan": plan_summary(wrapped),
        "losses": losses,
        "overlapped": per_step,
        "trainable": trainable,
        "state": full_state(wrapped),
    }


def clipping(
    cache: str, name: str, partition_num: int, max_norm: float, steps: int, global_batch: int
) -> dict[str, Any]:
    """SGD steps with `wrapped.clip_grad_norm(max_norm)` between backward and step; records the norms."""
    _, optimizer, wrapped = wrap(name, "sgd", config(cache, partition_num))
    batches = make_batches(name, steps, global_batch)
    losses, norms = [], []
    for step in range(steps):
        loss = loss_of(name, models.call(wrapped, local(batches[step])))
        loss.backward()
        norm = wrapped.clip_grad_norm(max_norm)
        norms.append(float(norm))
        losses.append(float(loss.detach()))
        optimizer.step()
        optimizer.zero_grad()
    same_on_all_ranks(norms)
    return {"plan": plan_summary(wrapped), "losses": losses, "norms": norms, "state": full_state(wrapped)}


def zero(cache: str, name: str, partition_num: int, steps: int, global_batch: int) -> dict[str, Any]:
    """AdamW with enable_zero=True; records how many parameters the local optimizer state covers, the full
    optimizer state dict (from_global, rank 0) and the final state."""
    _, optimizer, wrapped = wrap(name, "adamw", config(cache, partition_num, enable_zero=True))
    batches = make_batches(name, steps, global_batch)
    losses = []
    for step in range(steps):
        loss = loss_of(name, models.call(wrapped, local(batches[step])))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    same_on_all_ranks(losses)
    local_state = len(optimizer.state)
    held = len(list(wrapped.parameters()))
    osd = optimizer.state_dict(from_global=True)
    return {
        "plan": plan_summary(wrapped),
        "losses": losses,
        "local_state": local_state,
        "held": held,
        "replicas_agree": replicas_agree(wrapped),
        "osd": to_cpu(osd) if rannc.get_rank() == 0 else osd,
        "state": full_state(wrapped),
    }


def dropout_modes(cache: str, partition_num: int, global_batch: int) -> dict[str, Any]:
    """DropoutMLP(p=0.2): capture call in train mode (forward + backward, no step, so the weights stay the
    initial ones), then eval + no_grad twice, train + no_grad twice, then train 2 steps."""
    _, optimizer, wrapped = wrap("dropout", "sgd", config(cache, partition_num))
    batches = make_batches("dropout", 4, global_batch)
    probe = local(batches[0])
    result: dict[str, Any] = {}
    loss = models.call(wrapped, probe)
    loss.backward()
    optimizer.zero_grad()
    result["train_first"] = float(loss.detach())
    returned = wrapped.eval()
    result["eval_returns_self"] = returned is wrapped
    result["module_training_after_eval"] = wrapped.module.training
    with torch.no_grad():
        result["eval"] = [float(models.call(wrapped, probe)) for _ in range(2)]
    wrapped.train()
    result["module_training_after_train"] = wrapped.module.training
    with torch.no_grad():
        result["train_no_grad"] = [float(models.call(wrapped, probe)) for _ in range(2)]
    losses = []
    for step in range(1, 3):
        loss = models.call(wrapped, local(batches[step]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    same_on_all_ranks(losses + result["eval"])
    result["train_losses"] = losses
    result["replicas_agree"] = replicas_agree(wrapped)
    result["plan"] = plan_summary(wrapped)
    result["state"] = full_state(wrapped)
    return result


def train_then_eval(cache: str, partition_num: int, steps: int, global_batch: int) -> dict[str, Any]:
    """DropoutMLP(p=0) with SGD and StepLR: `steps` steps (scheduler.step() after each), then eval + no_grad on
    the next batch."""
    _, optimizer, wrapped = wrap("dropout0", "sgd", config(cache, partition_num))
    scheduler = make_scheduler(optimizer)
    batches = make_batches("dropout0", steps + 1, global_batch)
    losses, lrs = [], []
    for step in range(steps):
        loss = models.call(wrapped, local(batches[step]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(float(loss.detach()))
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    state = full_state(wrapped)
    wrapped.eval()
    with torch.no_grad():
        eval_loss = float(models.call(wrapped, local(batches[steps])))
    same_on_all_ranks([*losses, eval_loss])
    return {"plan": plan_summary(wrapped), "losses": losses, "lrs": lrs, "state": state, "eval": eval_loss}


def checkpoint_save(
    cache: str, path: str, partition_num: int, steps: int, global_batch: int
) -> dict[str, Any]:
    """AdamW `steps` steps; model.state_dict() and optimizer.state_dict(from_global=True) on every rank; rank 0
    saves {"model": ..., "optim": ...} to `path`."""
    _, optimizer, wrapped = wrap("mlp", "adamw", config(cache, partition_num))
    batches = make_batches("mlp", steps, global_batch)
    losses = []
    for step in range(steps):
        loss = models.call(wrapped, local(batches[step]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    sd = full_state(wrapped)
    osd = optimizer.state_dict(from_global=True)
    if rannc.get_rank() == 0:
        torch.save({"model": sd, "optim": osd}, path)
    rannc.barrier()
    return {
        "plan": plan_summary(wrapped),
        "losses": losses,
        "state": sd,
        "osd": to_cpu(osd) if rannc.get_rank() == 0 else osd,
    }


def resume(
    cache: str, path: str, when: str, partition_num: int, first_step: int, steps: int, global_batch: int
) -> dict[str, Any]:
    """Load the checkpoint at `path` (every rank, weights_only) into a fresh model and AdamW, either before
    wrapping (`when` = "before": plain load_state_dict) or after wrapping and one no_grad call that partitions
    the model (`when` = "after": RaNNCModule.load_state_dict and optimizer.load_state_dict(from_global=True));
    then train `steps` steps on batches first_step, first_step + 1, ..."""
    saved = torch.load(path, weights_only=True)
    model = build("mlp")
    optimizer = make_optimizer("adamw", model.parameters())
    batches = make_batches("mlp", first_step + steps, global_batch)
    if when == "before":
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optim"])
        wrapped = rannc.RaNNCModule(model, optimizer, **config(cache, partition_num))
    elif when == "after":
        wrapped = rannc.RaNNCModule(model, optimizer, **config(cache, partition_num))
        with torch.no_grad():
            models.call(wrapped, local(batches[first_step]))
        wrapped.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optim"], from_global=True)
    else:
        raise ValueError(when)
    losses = []
    for step in range(first_step, first_step + steps):
        loss = models.call(wrapped, local(batches[step]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    same_on_all_ranks(losses)
    return {"plan": plan_summary(wrapped), "losses": losses, "state": full_state(wrapped)}


def autocast_training(cache: str, partition_num: int, steps: int, global_batch: int) -> dict[str, Any]:
    """SGD steps with every call under torch.autocast("cpu", bfloat16); then one call without autocast."""
    _, optimizer, wrapped = wrap("mlp", "sgd", config(cache, partition_num))
    batches = make_batches("mlp", steps + 1, global_batch)
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
            loss = models.call(wrapped, local(batches[step]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    same_on_all_ranks(losses)
    state = full_state(wrapped)
    without = attempt(lambda: float(models.call(wrapped, local(batches[steps]))))
    without.pop("traceback", None)
    return {"plan": plan_summary(wrapped), "losses": losses, "state": state, "without_autocast": without}


# ----------------------------------------------------------------------------------------------------------------
# Spawns
# ----------------------------------------------------------------------------------------------------------------

ACCUM_STEPS, ACCUM_BATCH = 2, 8
CLIP_STEPS, CLIP_BATCH, CLIP_MAX_NORM = 2, 8, 0.05
ZERO_STEPS, ZERO_BATCH = 3, 8
DROPOUT_BATCH = 8
EVAL_STEPS, EVAL_BATCH = 2, 8
CKPT_STEPS, CKPT_BATCH, CKPT_PARTITIONS = 2, 8, 2
RESUME_WORLD = 2
RESUME_PARTITIONS = {"before": 1, "after": 2}
AUTOCAST_STEPS, AUTOCAST_BATCH, AUTOCAST_PARTITIONS = 2, 8, 2

# label -> (scenario function, keyword arguments) of the 4-rank spawn; the tests refer to the labels
FOUR_RANK_SCENARIOS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "accum-mlp-p2-no_sync": (
        grad_accumulation,
        {"name": "mlp", "style": "no_sync", "partition_num": 2, "schedule": "1f1b"},
    ),
    "accum-mlp-p1-no_sync-filldrain": (
        grad_accumulation,
        {"name": "mlp", "style": "no_sync", "partition_num": 1, "schedule": "fill_drain"},
    ),
    "accum-skip-p4-no_sync": (
        grad_accumulation,
        {"name": "skip_tied", "style": "no_sync", "partition_num": 4, "schedule": "1f1b"},
    ),
    "accum-mlp-p2-delay": (
        grad_accumulation,
        {"name": "mlp", "style": "delay", "partition_num": 2, "schedule": "1f1b"},
    ),
    "overlap-skip-p2": (overlapped_sync, {"name": "skip_tied", "partition_num": 2, "schedule": "1f1b"}),
    "overlap-mlp-p1-filldrain": (
        overlapped_sync,
        {"name": "mlp", "partition_num": 1, "schedule": "fill_drain"},
    ),
    "clip-skip-p2": (clipping, {"name": "skip_tied", "partition_num": 2}),
    "clip-skip-p4": (clipping, {"name": "skip_tied", "partition_num": 4}),
    "clip-skip-p3": (clipping, {"name": "skip_tied", "partition_num": 3}),
    "clip-mlp-p1": (clipping, {"name": "mlp", "partition_num": 1}),
    "zero-mlp-p1": (zero, {"name": "mlp", "partition_num": 1}),
    "zero-mlp-p2": (zero, {"name": "mlp", "partition_num": 2}),
    "zero-mlp-p4": (zero, {"name": "mlp", "partition_num": 4}),
    "zero-skip-p2": (zero, {"name": "skip_tied", "partition_num": 2}),
    "dropout-p2": (dropout_modes, {"partition_num": 2}),
    "eval-p2": (train_then_eval, {"partition_num": 2}),
    "checkpoint": (checkpoint_save, {"partition_num": CKPT_PARTITIONS}),
    "autocast-p2": (autocast_training, {"partition_num": AUTOCAST_PARTITIONS}),
}

SIZES: dict[Callable[..., Any], dict[str, Any]] = {
    grad_accumulation: {"steps": ACCUM_STEPS, "global_batch": ACCUM_BATCH},
    overlapped_sync: {"steps": ACCUM_STEPS, "global_batch": ACCUM_BATCH},
    clipping: {"max_norm": CLIP_MAX_NORM, "steps": CLIP_STEPS, "global_batch": CLIP_BATCH},
    zero: {"steps": ZERO_STEPS, "global_batch": ZERO_BATCH},
    dropout_modes: {"global_batch": DROPOUT_BATCH},
    train_then_eval: {"steps": EVAL_STEPS, "global_batch": EVAL_BATCH},
    checkpoint_save: {"steps": CKPT_STEPS, "global_batch": CKPT_BATCH},
    autocast_training: {"steps": AUTOCAST_STEPS, "global_batch": AUTOCAST_BATCH},
}


def checkpoint_path(base: str) -> str:
    return str(Path(base) / "checkpoint.pt")


def four_rank_worker(rank: int, world: int, base: str, labels: list[str]) -> dict[str, dict[str, Any]]:
    """The 4-rank spawn: the scenarios named in `labels`, in that order."""
    cache = str(Path(base) / "profiles4")
    scenarios: list[tuple[str, Callable[[], Any]]] = []
    for label in labels:
        function, kwargs = FOUR_RANK_SCENARIOS[label]
        extra = {"path": checkpoint_path(base)} if function is checkpoint_save else {}
        arguments = {**kwargs, **SIZES[function], **extra}
        scenarios.append((label, lambda f=function, a=arguments: f(cache, **a)))
    return run_scenarios(rank, world, scenarios)


def resume_worker(rank: int, world: int, base: str) -> dict[str, dict[str, Any]]:
    """The 2-rank spawn: resume the 4-rank checkpoint, loading before and after wrapping."""
    cache = str(Path(base) / "profiles2")
    path = checkpoint_path(base)
    scenarios: list[tuple[str, Callable[[], Any]]] = [
        (
            f"resume-{when}",
            lambda w=when: resume(cache, path, w, RESUME_PARTITIONS[w], CKPT_STEPS, CKPT_STEPS, CKPT_BATCH),
        )
        for when in ("before", "after")
    ]
    return run_scenarios(rank, world, scenarios)
