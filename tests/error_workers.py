"""Models and spawned-rank workers for tests/test_errors.py (user mistakes must give clear errors on every rank).

Every worker runs a list of scenarios one after the other in the same processes and records, per scenario, either
the value it produced or the error it raised (`Outcome`), so that one spawn covers many tests. A scenario that is
expected to fail on every rank leaves the ranks in step; the workers check that after each scenario (all ranks must
agree on whether it failed) and stop the spawn otherwise, so that no rank is left waiting in a collective.
"""

from __future__ import annotations

import gc
import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import rannc

IN, WIDTH, OUT = 16, 32, 4
WIDE = 1024  # WideMLP: ~4 MiB of parameters, so that its memory need is well above 0.001 GiB
SGD_LR = 0.05


# ----------------------------------------------------------------------------------------------------------------
# Models (built on CPU in fp32; the same seed gives bit-identical weights in any process)
# ----------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """forward(x [B, 16], y [B, 4]) -> scalar MSE loss (a per-sample mean)."""

    def __init__(self, width: int = WIDTH, layers: int = 4) -> None:
        super().__init__()
        dims = [IN] + [width] * (layers - 1) + [OUT]
        self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(layers))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for index, linear in enumerate(self.linears):
            x = linear(x)
            if index < len(self.linears) - 1:
                x = F.gelu(x)
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.features(x), y)


class OtherMLP(MLP):
    """Another architecture with the same inputs and output (other widths and depth)."""

    def __init__(self) -> None:
        super().__init__(width=24, layers=3)


class WideMLP(MLP):
    def __init__(self) -> None:
        super().__init__(width=WIDE, layers=3)


class ArgsMLP(MLP):
    """forward(x, y, scale=1.0, shift=0.0): two non-tensor keyword arguments."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0, shift: float = 0.0
    ) -> torch.Tensor:
        return F.mse_loss(self.features(x) * scale + shift, y)


class ControlFlowMLP(MLP):
    """Data-dependent Python control flow in forward: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return F.mse_loss(self.features(x), y)
        return F.mse_loss(self.features(-x), y)


class FloatOutputMLP(MLP):
    """Returns a Python float alongside the loss."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:  # type: ignore[override]
        return F.mse_loss(self.features(x), y), 1.5


class StringOutputMLP(MLP):
    """Returns a string alongside the loss."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, str]:  # type: ignore[override]
        return F.mse_loss(self.features(x), y), "tag"


class ItemOutputMLP(MLP):
    """Returns the loss as a Python number (data-dependent) alongside the loss tensor."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:  # type: ignore[override]
        loss = F.mse_loss(self.features(x), y)
        return loss, loss.item()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "other": OtherMLP,
    "wide": WideMLP,
    "args": ArgsMLP,
    "control_flow": ControlFlowMLP,
    "float_output": FloatOutputMLP,
    "string_output": StringOutputMLP,
    "item_output": ItemOutputMLP,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def make_batches(seed: int, steps: int, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + seed)
    return [
        (
            torch.randn(global_batch, IN, generator=generator),
            torch.randn(global_batch, OUT, generator=generator),
        )
        for _ in range(steps)
    ]


def local_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s part of `rows` global rows (near-equal, first ranks get the extra rows)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_batch(
    batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    start, end = local_rows(batch[0].shape[0], rank, world)
    return batch[0][start:end].clone(), batch[1][start:end].clone()


# ----------------------------------------------------------------------------------------------------------------
# Recording outcomes
# ----------------------------------------------------------------------------------------------------------------


def error_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def attempt(action: Callable[[], Any]) -> dict[str, Any]:
    """{"value": what `action` returned} or {"error": "module.Class", "message": str, "traceback": str}."""
    try:
        return {"value": action()}
    except Exception as exc:  # noqa: BLE001 - the test decides which errors are right
        return {"error": error_name(exc), "message": str(exc), "traceback": traceback.format_exc()}


def config(cache_dir: str, **overrides: Any) -> dict[str, Any]:
    return {
        "profile_iterations": 1,
        "show_progress": False,
        "profile_cache_dir": cache_dir,
        **overrides,
    }


def plan_summary(wrapped: rannc.RaNNCModule) -> dict[str, Any]:
    assert wrapped.deployment is not None
    plan = wrapped.deployment.plan
    return {
        "stages": [sorted(int(r) for r in stage.ranks) for stage in plan.stages],
        "microbatches": int(plan.microbatches),
        "schedule": str(plan.schedule),
    }


def train(
    wrapped: rannc.RaNNCModule,
    optimizer: torch.optim.Optimizer | None,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    world: int,
) -> list[float]:
    losses = []
    for batch in batches:
        loss = wrapped(*local_batch(batch, rank, world))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach().item())
    return losses


def _in_step(world: int, label: str, outcome: dict[str, Any]) -> None:
    """Stop the spawn when a scenario failed on some ranks only: they no longer agree on what comes next."""
    if world == 1:
        return
    failed = torch.tensor([1 if "error" in outcome else 0])
    flags = [torch.zeros_like(failed) for _ in range(world)]
    dist.all_gather(flags, failed)
    bad = [r for r, flag in enumerate(flags) if int(flag.item())]
    if bad and len(bad) < world:
        raise RuntimeError(
            f"scenario {label!r} failed on ranks {bad} only (this rank: {outcome}); the spawn cannot go on"
        )


def run_scenarios(
    rank: int, world: int, scenarios: list[tuple[str, Callable[[], Any]]]
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for label, action in scenarios:
        outcome = attempt(action)
        results[label] = outcome
        gc.collect()
        _in_step(world, label, outcome)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------------------------


def first_call(name: str, cache_dir: str, global_batch: int = 8, seed: int = 0, **overrides: Any) -> Any:
    """Wrap model `name` and call it once on this rank's rows (which captures, profiles and plans)."""
    rank, world = rannc.get_rank(), rannc.get_world_size()
    model = build(name, seed)
    wrapped = rannc.RaNNCModule(model, None, **config(cache_dir, **overrides))
    batch = make_batches(seed, 1, global_batch)[0]
    out = wrapped(*local_batch(batch, rank, world))
    return {"plan": plan_summary(wrapped), "output": _describe(out)}


def _describe(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return ("Tensor", tuple(out.shape))
    if isinstance(out, tuple | list):
        return tuple(_describe(item) for item in out)
    return out


def different_seed_per_rank(cache_dir: str) -> Any:
    return first_call("mlp", cache_dir, seed=rannc.get_rank())


def train_and_save(cache_dir: str, path: str, steps: int) -> Any:
    """Plan with a forced shape (2 stages x 2 microbatches, 1F1B), save the deployment, and train."""
    rank, world = rannc.get_rank(), rannc.get_world_size()
    model = build("mlp", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    overrides = {
        "partition_num": world,
        "min_pipeline": 2,
        "max_pipeline": 2,
        "schedule": "1f1b",  # schedule="auto" may choose zero bubble from the measured timings
        "save_deployment": True,
        "deployment_file": path,
    }
    wrapped = rannc.RaNNCModule(model, optimizer, **config(cache_dir, **overrides))
    losses = train(wrapped, optimizer, make_batches(0, steps, 8), rank, world)
    return {"plan": plan_summary(wrapped), "losses": losses}


def load_and_train(cache_dir: str, path: str, steps: int) -> Any:
    """Train with the saved deployment; the config asks for 1 stage, which only planning would obey."""
    rank, world = rannc.get_rank(), rannc.get_world_size()
    model = build("mlp", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    overrides = {"load_deployment": True, "deployment_file": path, "partition_num": 1}
    wrapped = rannc.RaNNCModule(model, optimizer, **config(cache_dir, **overrides))
    losses = train(wrapped, optimizer, make_batches(0, steps, 8), rank, world)
    return {"plan": plan_summary(wrapped), "losses": losses}


def changed_arguments(cache_dir: str) -> Any:
    """First call with scale=1.0; then add a keyword, then change the non-tensor one; then the first call again."""
    rank, world = rannc.get_rank(), rannc.get_world_size()
    model = build("args", 0)
    wrapped = rannc.RaNNCModule(model, None, **config(cache_dir))
    x, y = local_batch(make_batches(0, 1, 8)[0], rank, world)
    first = wrapped(x, y, scale=1.0).detach().item()
    added = attempt(lambda: wrapped(x, y, scale=1.0, shift=0.5))
    changed = attempt(lambda: wrapped(x, y, scale=2.0))
    again = attempt(lambda: wrapped(x, y, scale=1.0).detach().item())
    return {"first": first, "added_keyword": added, "changed_constant": changed, "again": again}


def batch_too_small(cache_dir: str) -> Any:
    """Plan for a global batch of 16 with 1 stage x all ranks x 4 microbatches; then call with a global batch of
    one sample per rank (which cannot be split), then with the minimum the error names and with one less."""
    rank, world = rannc.get_rank(), rannc.get_world_size()
    model = build("mlp", 0)
    overrides = {"partition_num": 1, "min_pipeline": 4, "max_pipeline": 4}
    wrapped = rannc.RaNNCModule(model, None, **config(cache_dir, **overrides))

    def call_with(rows: int, seed: int) -> float:
        return wrapped(*local_batch(make_batches(seed, 1, rows)[0], rank, world)).detach().item()

    call_with(16, 0)
    result: dict[str, Any] = {
        "plan": plan_summary(wrapped),
        "too_small": attempt(lambda: call_with(world, 1)),
    }
    found = re.search(r"at least (\d+)", result["too_small"].get("message", ""))
    if found:
        minimum = int(found.group(1))
        result["minimum"] = minimum
        result["with_minimum"] = attempt(lambda: call_with(minimum, 2))
        result["with_one_less"] = attempt(lambda: call_with(minimum - 1, 3))
    return result


def wrap_twice() -> Any:
    model = build("mlp", 0)
    inner = rannc.RaNNCModule(model, None)
    return rannc.RaNNCModule(inner, None)


def wrap_ddp() -> Any:
    model = build("mlp", 0)
    return rannc.RaNNCModule(nn.parallel.DistributedDataParallel(model), None)


def backward_twice(cache_dir: str) -> Any:
    model = build("mlp", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    wrapped = rannc.RaNNCModule(model, optimizer, **config(cache_dir))
    loss = wrapped(*make_batches(0, 1, 8)[0])
    loss.backward()
    return attempt(loss.backward)


def save_then_load(
    cache_dir: str, path: str, save_name: str, load_name: str, mangle: Callable[[Path], None] | None = None
) -> Any:
    """Save a deployment for model `save_name`, optionally damage the file, then load it for model `load_name`.
    Returns the load's outcome and whether the file is byte-for-byte what it was before the load."""
    first_call(save_name, cache_dir, save_deployment=True, deployment_file=path)
    if mangle is not None:
        mangle(Path(path))
    before = Path(path).read_bytes()
    outcome = attempt(lambda: first_call(load_name, cache_dir, load_deployment=True, deployment_file=path))
    return {"load": outcome, "file_intact": Path(path).read_bytes() == before}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def load_only(cache_dir: str, path: str) -> Any:
    """Load `path` (made elsewhere); report the outcome and whether the file is unchanged."""
    before = Path(path).read_bytes()
    outcome = attempt(lambda: first_call("mlp", cache_dir, load_deployment=True, deployment_file=path))
    return {"load": outcome, "file_intact": Path(path).read_bytes() == before}


FOREIGN_TEXT = "precious user data, not a rannc deployment\n"


def put_foreign_file(path: str) -> None:
    """A user's file (not a rannc deployment) at `path`, written by rank 0 and visible to all ranks after this."""
    if rannc.get_rank() == 0:
        Path(path).write_text(FOREIGN_TEXT)
    rannc.barrier()


def save_over_foreign_file(cache_dir: str, path: str) -> Any:
    """RaNNCModule.save_deployment(path) where `path` holds a user's file: refused, on every rank, file intact."""
    rank, world = rannc.get_rank(), rannc.get_world_size()
    put_foreign_file(path)
    model = build("mlp", 0)
    wrapped = rannc.RaNNCModule(model, None, **config(cache_dir))
    wrapped(*local_batch(make_batches(0, 1, 8)[0], rank, world))
    outcome = attempt(lambda: wrapped.save_deployment(path))
    return {"save": outcome, "file_intact": Path(path).read_text() == FOREIGN_TEXT}


def configured_save_over_foreign_file(cache_dir: str, path: str) -> Any:
    """save_deployment=True with deployment_file pointing at a user's file: the first call must fail on every rank
    (not only on rank 0, which writes the file) and leave the file alone."""
    put_foreign_file(path)
    outcome = attempt(lambda: first_call("mlp", cache_dir, save_deployment=True, deployment_file=path))
    return {"call": outcome, "file_intact": Path(path).read_text() == FOREIGN_TEXT}


def memory_error_then_retry(cache_dir: str, name: str) -> Any:
    """Plan with mem_limit_gb=1e-5 (cannot fit); return the error and, when the message suggests a mem_limit_gb,
    the outcome of planning again with exactly that value."""
    failed = attempt(lambda: first_call(name, cache_dir, mem_limit_gb=1e-5))
    result: dict[str, Any] = {"failed": failed}
    found = re.search(r"mem_limit_gb >= ([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)", failed.get("message", ""))
    if found:
        suggested = float(found.group(1))
        result["suggested"] = suggested
        if suggested > 0:  # mem_limit_gb=0 means "no limit": retrying with it would prove nothing
            result["retry"] = attempt(lambda: first_call(name, cache_dir, mem_limit_gb=suggested))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Workers (one spawn each)
# ----------------------------------------------------------------------------------------------------------------


def pair_worker(rank: int, world: int, base: str) -> dict[str, dict[str, Any]]:
    """2 ranks: model differing across ranks, PlanError on every rank, save a deployment (3d, first half), changed
    call arguments, and a global batch too small for the plan."""
    cache = str(Path(base) / "profiles")
    dep = str(Path(base) / "dep.json")
    scenarios: list[tuple[str, Callable[[], Any]]] = [
        ("different_seed", lambda: different_seed_per_rank(cache)),
        ("memory", lambda: first_call("mlp", cache, mem_limit_gb=1e-5)),
        ("save", lambda: train_and_save(cache, dep, steps=3)),
        ("changed_arguments", lambda: changed_arguments(cache)),
        ("batch_too_small", lambda: batch_too_small(cache)),
    ]
    return run_scenarios(rank, world, scenarios)


def load_pair_worker(rank: int, world: int, base: str) -> dict[str, dict[str, Any]]:
    """2 fresh ranks: train with the deployment the pair worker saved (3d, second half)."""
    cache = str(Path(base) / "profiles")
    dep = str(Path(base) / "dep.json")
    return run_scenarios(rank, world, [("load", lambda: load_and_train(cache, dep, steps=3))])


def save_errors_worker(rank: int, world: int, base: str, which: str) -> dict[str, dict[str, Any]]:
    """2 ranks, one save error (`which`: "method" or "config"), alone in its spawn: a rank left waiting in a
    collective cannot go on with anything else."""
    cache = str(Path(base) / "profiles")
    path = str(Path(base) / f"user_{which}.txt")
    action = save_over_foreign_file if which == "method" else configured_save_over_foreign_file
    return {which: attempt(lambda: action(cache, path))}


def solo_worker(rank: int, world: int, base: str, pair_deployment: str | None) -> dict[str, dict[str, Any]]:
    """1 process: every mistake that does not need several ranks."""
    cache = str(Path(base) / "profiles")
    scenarios: list[tuple[str, Callable[[], Any]]] = [
        ("memory_small_model", lambda: memory_error_then_retry(cache, "mlp")),
        ("memory_wide_model", lambda: memory_error_then_retry(cache, "wide")),
        ("another_model", lambda: save_then_load(cache, f"{base}/other.json", "other", "mlp")),
        ("truncated", lambda: save_then_load(cache, f"{base}/trunc.json", "mlp", "mlp", truncate)),
        ("save_over_foreign_file", lambda: save_over_foreign_file(cache, f"{base}/user_solo.txt")),
        ("wrap_twice", wrap_twice),
        ("wrap_ddp", wrap_ddp),
        ("control_flow", lambda: first_call("control_flow", cache)),
        ("float_output", lambda: first_call("float_output", cache)),
        ("string_output", lambda: first_call("string_output", cache)),
        ("item_output", lambda: first_call("item_output", cache)),
        ("backward_twice", lambda: backward_twice(cache)),
    ]
    if pair_deployment is not None:
        scenarios.append(("world_size_mismatch", lambda: load_only(cache, pair_deployment)))
    return run_scenarios(rank, world, scenarios)


def load_only_worker(rank: int, world: int, base: str, path: str) -> dict[str, dict[str, Any]]:
    """1 process: load a deployment made elsewhere."""
    cache = str(Path(base) / "profiles")
    return run_scenarios(rank, world, [("world_size_mismatch", lambda: load_only(cache, path))])
