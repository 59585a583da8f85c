"""Plan a cluster you don't have: capture a (meta-device) model and price its blocks with a device profile."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .capture import CapturedGraph, FlatCall, capture
from .capture.samples import example_leaves, placeholder_state, record_flops, shape_flops
from .deploy.deployment import Deployment
from .errors import ConfigError
from .graph.analysis import GraphAnalysis, analyse, has_single_loss
from .graph.blocks import BLOCK_STATE_SHARE, StateLimit, block_count, cut_blocks
from .graph.stage import block_graphs
from .host_memory import return_freed_host_memory
from .plan import Plan, PlanProblem
from .plan.cost import CostModel
from .plan.interleave import best_interleaved, interleaved_replica_sizes
from .plan.simulate import Timeline, simulate_plan
from .plan.types import Links
from .problem import (
    AUTO_SCHEDULES,
    PLAN_KNOBS,
    SearchSpace,
    allowed_schedules,
    assemble_problem,
    deployment_of,
    plan_or_explain,
    schedules_for_chunks,
    search_space,
)
from .profile.analytic import analytic_block_profiles, block_signature
from .profile.devices import DeviceProfile, get_device_profile
from .schedule import Schedule

__all__ = ["DTYPE_ALIASES", "OfflinePlan", "load_factory", "normalise_dtype", "plan_offline"]

logger = logging.getLogger(__name__)

DTYPE_ALIASES = dict(fp32="float32", float="float32", bf16="bfloat16", fp16="float16", half="float16")
DTYPE_ALIASES.update({name: name for name in ("float32", "tf32", "bfloat16", "float16")})
CAPTURE_BATCH = 2  # rows the graph is exported with (as RaNNCModule's default capture_batch_size)
MEMORY_PARTS = ("parameters", "gradients", "optimizer", "activations", "buffers")


@dataclasses.dataclass
class OfflinePlan:
    """What `plan_offline` made: the deployment (with its `report`), the problem, the simulated step."""

    deployment: Deployment
    problem: PlanProblem
    timeline: Timeline
    report: dict[str, Any]
    timings: dict[str, float]  # seconds: build, capture, analyse, profile, search, simulate, total


def normalise_dtype(dtype: str | torch.dtype | None) -> str | None:
    """'bf16' / torch.bfloat16 / 'bfloat16' -> 'bfloat16' (the device profile's keys); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    key = DTYPE_ALIASES.get(str(dtype).strip().lower())
    if key is None:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_ALIASES)}")
    return key


def load_factory(factory: str | Callable[[], Any]) -> Callable[[], Any]:
    """The callable named by "package.module:function" (or `factory` itself when it is callable)."""
    if callable(factory):
        return factory
    module_name, _, attr = str(factory).partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"cannot load factory {factory!r} (write it as 'package.module:function'): {exc}"
        ) from exc
    if not callable(found):
        raise ConfigError(f"factory {factory!r} is a {type(found).__name__}, not a function")
    return found


def _call_factory(
    factory: str | Callable[[], Any],
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    made = load_factory(factory)()
    if not isinstance(made, tuple) or len(made) not in (2, 3) or not isinstance(made[0], torch.nn.Module):
        raise ConfigError(
            "the factory must return (model, args) or (model, args, kwargs) with an nn.Module model"
        )
    args = tuple(made[1]) if isinstance(made[1], list | tuple) else (made[1],)
    return made[0], args, dict(made[2] or {}) if len(made) == 3 else {}


def _op_flops(model: torch.nn.Module, captured: CapturedGraph, call: FlatCall) -> dict[str, float]:
    """Forward FLOPs per op at the capture batch: from the recorded shapes of the ops that have FLOPs, or from one
    run of the graph (on meta tensors for a meta model)."""
    try:
        found = shape_flops(captured, CAPTURE_BATCH)
        if found is not None:
            return found
        leaves = example_leaves(model, captured, call, CAPTURE_BATCH)
        return record_flops(captured, placeholder_state(model, captured), leaves)
    except Exception as exc:  # an op without a meta kernel: balance blocks by bytes moved only
        logger.warning("no FLOPs per op (%s: %s); balancing blocks by bytes", type(exc).__name__, exc)
        return {}


def memory_split(timeline: Timeline) -> list[dict[str, float]]:
    """Per position (stage, with one chunk per position), peak bytes per rank: parameters, gradients, optimizer,
    activations, buffers. A position's chunks add up; its activations are what it holds at its peak (zero bubble:
    what a microbatch keeps from its I to its W pass counts as activations)."""
    out = []
    positions = timeline.num_stages
    for s in range(positions):
        own = timeline.stages[s::positions]  # its chunks' virtual stages
        parts: dict[str, float] = {}
        for timing in own:
            for name, value in (timing.memory_parts or {}).items():
                parts[name] = parts.get(name, 0.0) + value
        static = sum(timing.static_bytes for timing in own)
        parts["activations"] = (
            timeline.peak_memory[s]
            - static
            + parts.pop("recompute workspace", 0.0)
            + parts.pop("workspace", 0.0)  # transient forward/backward memory of one block
        )
        parts["buffers"] = parts.get("buffers", 0.0) + parts.pop("inputs", 0.0)  # the step's user inputs
        out.append({k: float(parts.get(k, 0.0)) for k in MEMORY_PARTS})
    return out


@dataclasses.dataclass(frozen=True)
class _Estimated:
    """The model cut into blocks for some usable memory per device, and its problem priced with estimates."""

    blocks: list[list[str]]
    problem: PlanProblem
    distinct_blocks: int  # blocks estimated (the others repeat one of them)
    sizes: list[int]  # the microbatch sizes they were estimated at


def plan_offline(
    factory: str | Callable[[], Any],
    *,
    world_size: int,
    device_memory_bytes: float | None,
    global_batch: int,
    device: str | DeviceProfile,
    gpus_per_node: int | None = None,
    max_microbatches: int | None = None,
    min_microbatches: int = 1,
    dtype: str | torch.dtype | None = None,
    schedules: Sequence[str] = tuple(s.value for s in AUTO_SCHEDULES),
    chunks: int | None = None,
    recompute: bool = True,
    mem_margin: float = 0.1,
    opt_param_factor: float = 2.0,
    max_blocks: int = 32,
    zero: bool = False,
    shard: str = "none",
    num_stages: int | None = None,
    max_seq_len: int = 0,
    opaque_modules: Sequence[str] = (),
) -> OfflinePlan:
    """Plan `world_size` devices described by `device` (a profile name or DeviceProfile) without them.

    `factory` ("package.module:function" or a callable) returns (model, args) or (model, args, kwargs); the
    model may live on torch.device("meta") with meta tensors as arguments (of any batch size: the plan is
    for `global_batch`). Block costs are roofline estimates from the profile (`dtype` prices compute and
    activations in that precision; None: each op's own), links come from the profile with `gpus_per_node`
    (default: the profile's) GPUs per node. `device_memory_bytes` (default: the profile's) is reduced by
    `mem_margin`; the plan's deployment records that usable figure and the graph hash of the model, so a
    real job of the same model and shapes loads it with load_deployment=True. `max_microbatches` (default: the
    global batch) caps the microbatch counts searched; each stage's replicas need a sample of every microbatch,
    so counts up to the samples per replica are tried. `max_seq_len` > 0 plans a job
    whose sequence length (dim 1 of the inputs) varies up to it (the job sets the same config item).
    `opaque_modules`: submodules captured as one operation each (the config item of that name). `shard`:
    the config item shard_stages ("none", "auto", "zero-1", "zero-2", "zero-3"). `schedules`: the pipeline
    schedules to choose among, the first preferred on a tie (default: those of schedule="auto"); `chunks` forces
    the model chunks per position of interleaved 1F1B (None: the planner chooses).

    Example::

        result = plan_offline("my_models:gpt3", world_size=1024, device_memory_bytes=80 * 2**30,
                              global_batch=1536, device="h100-80gb", dtype="bf16")
        save_deployment(result.deployment, "plan.json")
    """
    max_microbatches = global_batch if max_microbatches is None else max_microbatches
    _check_arguments(world_size, global_batch, max_microbatches, mem_margin)
    requested = schedules_for_chunks(schedules, chunks)
    profile = get_device_profile(device)
    gpus = gpus_per_node if gpus_per_node is not None else profile.gpus_per_node
    memory = profile.memory_bytes if device_memory_bytes is None else float(device_memory_bytes)
    usable = memory * (1.0 - mem_margin)
    laps = _Laps()
    model, args, kwargs = _call_factory(factory)
    laps.lap("build")
    captured = _capture(model, args, kwargs, max_seq_len, opaque_modules)
    laps.lap("capture")
    analysis = analyse(captured)
    space = search_space(
        world_size=world_size,
        global_batch=global_batch,
        memory_limit_bytes=usable,
        schedules=allowed_schedules(requested, has_single_loss(captured, analysis)),
        max_microbatches=max_microbatches,
        min_microbatches=min_microbatches,
        num_stages=num_stages,
        allow_recompute=recompute,
        zero_optimizer=zero,
        opt_param_factor=opt_param_factor,
        gpus_per_node=gpus,
        shard_stages=shard,
        chunks=chunks,
    )
    flops = _op_flops(model, captured, FlatCall.of(args, kwargs))
    links = profile.planner_links(gpus)
    pricing = _Pricing(captured, analysis, flops, space, profile, links, normalise_dtype(dtype), max_blocks)
    laps.lap("analyse")
    priced = pricing.estimated(usable)
    laps.lap("profile")
    plan = plan_or_explain(
        priced.problem, mem_margin, PLAN_KNOBS, lambda needed: pricing.estimated(needed).problem
    )
    laps.lap("search")
    timeline = simulate_plan(priced.problem, plan)
    laps.lap("simulate")
    if Schedule.INTERLEAVED_1F1B in space.schedules:
        finer = _finer_interleaved(pricing, priced, usable, timeline.step_time)
        if finer is not None:
            priced, plan, timeline = finer
        laps.lap("interleaved on finer blocks")
    laps.timings["total"] = time.perf_counter() - laps.started
    report: dict[str, Any] = {
        "kind": "offline",
        "device_profile": profile.name,
        "dtype": pricing.dtype or "model",
    }
    report.update(device_memory_bytes=memory, mem_margin=mem_margin, usable_memory_bytes=usable)
    report.update(gpus_per_node=gpus, **_plan_report(priced, space, plan, timeline, laps.timings))
    deployment = deployment_of(plan, captured, priced.blocks, world_size, usable, report)
    return OfflinePlan(deployment, priced.problem, timeline, report, laps.timings)


# Interleaved 1F1B balances its virtual stages (a few per position) only on blocks finer than a stage's of the other
# schedules: it is searched again on this many times the blocks (the other schedules' searches, which grow faster
# with the blocks, are not).
INTERLEAVED_BLOCK_FACTOR = 2


def _finer_interleaved(
    pricing: _Pricing, priced: _Estimated, usable: float, best_step: float
) -> tuple[_Estimated, Plan, Timeline] | None:
    """The interleaved plan on INTERLEAVED_BLOCK_FACTOR times the blocks of `priced`, with its blocks and its
    timeline, when it simulates faster than `best_step`; None otherwise (or when no finer blocks exist)."""
    most = INTERLEAVED_BLOCK_FACTOR * len(priced.blocks)
    # Only the sizes interleaved slices use (GPT-3 on 1024 ranks: 2 of 12), as the finer blocks price nothing else.
    sizes = interleaved_replica_sizes(priced.problem, most)
    if not sizes:
        return None
    finer = dataclasses.replace(pricing, max_blocks=most).estimated(usable, sizes)
    if len(finer.blocks) <= len(priced.blocks):
        return None
    found = best_interleaved(finer.problem, CostModel(finer.problem), cutoff=best_step)
    plan, timeline = found.plan, found.timeline
    if plan is None or timeline is None:
        return None
    logger.info(
        "plan_offline: interleaved 1F1B on %d blocks (%.3f s) beats the best plan on %d blocks (%.3f s)",
        len(finer.blocks),
        timeline.step_time,
        len(priced.blocks),
        best_step,
    )
    return finer, plan, timeline


def _check_arguments(world_size: int, global_batch: int, max_microbatches: int, mem_margin: float) -> None:
    if world_size < 1 or global_batch < 1 or max_microbatches < 1:
        raise ConfigError("world_size, global_batch and max_microbatches must be >= 1")
    if not 0.0 <= mem_margin < 1.0:
        raise ConfigError(f"mem_margin must be in [0, 1), got {mem_margin}")


def _capture(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_seq_len: int,
    opaque_modules: Sequence[str],
) -> CapturedGraph:
    captured = capture(
        model, args, kwargs, batch_size=CAPTURE_BATCH, max_seq_len=max_seq_len, opaque_modules=opaque_modules
    )
    gc.collect()
    return_freed_host_memory()  # export's tracing freed tens of MiB: later phases should not add to them
    return captured


class _Laps:
    """Seconds each phase of plan_offline took (logged as it ends)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.started = self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name], self._clock = now - self._clock, now
        logger.info("plan_offline: %s took %.2f s", name, self.timings[name])


@dataclasses.dataclass(frozen=True)
class _Pricing:
    """How rannc plan prices a captured model: blocks cut for the memory of a device, costs estimated on
    `device` in `dtype` (None: each op's own)."""

    captured: CapturedGraph
    analysis: GraphAnalysis
    flops: dict[str, float]
    space: SearchSpace
    device: DeviceProfile
    links: Links
    dtype: str | None
    max_blocks: int

    def estimated(self, usable_bytes: float, sizes: Sequence[int] | None = None) -> _Estimated:
        """Blocks as many as `usable_bytes` per device calls for and the problem priced with estimates at the
        microbatch `sizes` (default: the search space's `profile_sizes`). The blocks' graphs (one GraphModule
        each) are dropped here, before the search."""
        captured, analysis, space = self.captured, self.analysis, self.space
        count = block_count(captured, usable_bytes, space.opt_param_factor, self.max_blocks)
        limit = StateLimit(captured, 2 + space.opt_param_factor, BLOCK_STATE_SHARE * usable_bytes)
        blocks = cut_blocks(analysis, self.flops, space.global_batch, count, limit)
        graphs = block_graphs(captured, analysis, blocks)
        sizes = space.profile_sizes() if sizes is None else sorted(sizes)
        signatures = [block_signature(captured, g) for g in graphs]
        costs = analytic_block_profiles(
            captured, analysis, blocks, sizes, self.device, self.dtype, graphs=graphs, signatures=signatures
        )
        problem = assemble_problem(captured, analysis, blocks, graphs, costs, space, self.links, self.device)
        return _Estimated(blocks, problem, len(set(signatures)), sizes)


def _plan_report(
    priced: _Estimated, space: SearchSpace, plan: Plan, timeline: Timeline, timings: dict[str, float]
) -> dict[str, Any]:
    """What the deployment's `report` says of the search and the simulated step (after the device's figures)."""
    step = timeline.step_time
    problem = priced.problem
    report: dict[str, Any] = {
        "opt_param_factor": space.opt_param_factor,
        "zero": space.zero_optimizer,
        "shard_levels": [str(level) for level in space.shard_levels],
    }
    report.update(recompute_allowed=space.allow_recompute, num_blocks=len(priced.blocks))
    report.update(distinct_blocks=priced.distinct_blocks, profiled_microbatch_sizes=priced.sizes)
    report.update(replica_choices=problem.replica_choices, microbatch_choices=problem.microbatch_choices)
    report.update(simulated_step_time_s=step, samples_per_s=space.global_batch / step if step > 0 else 0.0)
    report.update(bubble_fraction=timeline.bubble_fraction, planning_time_s=dict(timings))
    report["warnings"] = []  # capture traces attention with the math kernel: one graph on every device
    split, positions = memory_split(timeline), plan.positions
    report["stages"] = []
    for k, stage in enumerate(plan.stages):
        position, chunk = k % positions, k // positions
        entry: dict[str, Any] = {
            "memory": split[position] if chunk == 0 else {},  # a position's memory, on its first chunk
            "total_bytes": sum(split[position].values()) if chunk == 0 else 0.0,
            "peak_inflight": timeline.peak_inflight[position],
            "recompute": stage.recompute,
            "shard": str(stage.shard),
        }
        if plan.chunks > 1:
            entry.update(position=position, chunk=chunk)
        report["stages"].append(entry)
    return report
