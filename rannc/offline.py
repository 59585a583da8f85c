"""Plan a cluster you don't have: capture a (meta-device) model and price its blocks with a device profile."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .capture import CapturedGraph, FlatCall, capture, tile_rows
from .capture.samples import record_flops
from .deploy.deployment import Deployment, format_bytes
from .errors import ConfigError, PlanError
from .graph.analysis import GraphAnalysis, analyse, atomic_units, has_single_loss
from .graph.blocks import coarsen, estimate_op_costs
from .graph.stage import StageGraph
from .host_memory import return_freed_host_memory
from .plan import PlanProblem, minimum_memory_needed, plan_stages, required_microbatch_sizes
from .plan import types as plan_types
from .plan.from_graph import block_graphs, deployment_of, input_bytes, range_tables, step_end_fields
from .plan.simulate import Timeline, simulate_plan
from .plan.types import BlockProfile
from .profile.analytic import analytic_block_profiles
from .profile.devices import DeviceProfile, get_device_profile

__all__ = ["DTYPE_ALIASES", "OfflinePlan", "load_factory", "normalise_dtype", "plan_offline"]

logger = logging.getLogger(__name__)

DTYPE_ALIASES = dict(fp32="float32", float="float32", bf16="bfloat16", fp16="float16", half="float16")
DTYPE_ALIASES.update({name: name for name in ("float32", "tf32", "bfloat16", "float16")})
CAPTURE_BATCH = 2  # rows the graph is exported with (as RaNNCModule's default capture_batch_size)
EXACT_REPLICA_WORLD = 64  # larger worlds search compact replica counts (and > 32 counts of microbatches)
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
    """Forward FLOPs per op from one run at the capture batch (on meta tensors for a meta model)."""
    home = next((t.device for t in model.parameters()), torch.device("cpu"))
    leaves = [
        (tile_rows(x[:CAPTURE_BATCH].to(home), CAPTURE_BATCH) if x.dim() > 0 else x.to(home))
        if isinstance(x, torch.Tensor)
        else x
        for x in call.leaves
    ]
    for d in captured.dynamic_dims:  # the longest sequence, as planned
        leaves[d.leaf] = tile_rows(leaves[d.leaf], d.max_size, d.dim)
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    state = {ph: named[fqn] for ph, fqn in (captured.params | captured.buffers).items()}
    try:
        return record_flops(captured, state, leaves)
    except Exception as exc:  # an op without a meta kernel: balance blocks by bytes moved only
        logger.warning("no FLOPs per op (%s: %s); balancing blocks by bytes", type(exc).__name__, exc)
        return {}


def block_count(captured: CapturedGraph, usable: float, opt_param_factor: float, max_blocks: int) -> int:
    """max_blocks, raised so that an average block holds at most half a device of parameter state."""
    vals = {fqn: n.meta["val"] for n in captured.gm.graph.nodes if (fqn := captured.params.get(n.name))}
    vals |= {fqn: n.meta["val"] for n in captured.gm.graph.nodes if (fqn := captured.buffers.get(n.name))}
    state = sum(v.numel() * v.element_size() for v in vals.values()) * (2 + opt_param_factor)
    return max(max_blocks, math.ceil(2 * state / usable))


def profile_sizes(needed: Sequence[int]) -> list[int]:
    """The sizes to estimate: both ends and the powers of two between (the planner interpolates)."""
    if not needed:
        return []
    lo, hi = min(needed), max(needed)
    return sorted({lo, hi} | {2**k for k in range(hi.bit_length()) if lo < 2**k < hi})


def _signature(captured: CapturedGraph, graph: StageGraph) -> str:
    """A name-free key of a block (inputs' kind, shape, dtype; ops wired by position): equal keys, equal costs."""
    metas = {n.name: n.meta.get("val") for n in captured.gm.graph.nodes}
    index: dict[str, int] = {}
    parts: list[str] = []

    def describe(value: Any) -> str:
        if isinstance(value, fx.Node):
            return f"%{index[value.name]}"
        if isinstance(value, list | tuple):
            return "(" + ",".join(describe(v) for v in value) + ")"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{describe(v)}" for k, v in value.items()) + "}"
        return repr(value)

    kinds = {item.name: item.kind for item in graph.inputs}
    for node in graph.module.graph.nodes:
        index[node.name] = len(index)
        if node.op == "placeholder":
            val = metas.get(node.name)
            shape = tuple(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else repr(val)
            dtype = val.dtype if isinstance(val, torch.Tensor) else None
            parts.append(f"in {kinds.get(node.name)} {shape} {dtype}")
        else:
            parts.append(f"{node.op} {node.target} {describe(node.args)} {describe(node.kwargs)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _estimate_blocks(
    captured: CapturedGraph, analysis: GraphAnalysis, graphs: list[StageGraph], sizes: list[int], *how: Any
) -> tuple[list[BlockProfile], int]:
    """Analytic profiles of every block (`how`: device profile, dtype), each distinct block estimated once."""
    keys = [_signature(captured, g) for g in graphs]
    unique = {key: graphs[b] for b, key in reversed(list(enumerate(keys)))}
    todo = list(unique.values())
    found = dict(zip(unique, analytic_block_profiles(captured, analysis, [], sizes, *how, graphs=todo)))
    return [found[key] for key in keys], len(unique)


def _problem_kwargs(**wanted: Any) -> dict[str, Any]:
    """The PlanProblem keyword arguments this version of rannc knows (newer fields are skipped if absent)."""
    fields = {f.name for f in dataclasses.fields(PlanProblem)}
    for name in sorted(k for k, v in wanted.items() if k not in fields and v not in (None, False)):
        logger.warning("this planner has no %s; planning without it", name)
    return {k: v for k, v in wanted.items() if k in fields}


def replica_choices(world_size: int, gpus: int) -> tuple[int, ...]:
    """Replica counts searched on large worlds: 1..gpus_per_node, the world's divisors, 2^k and 3 x 2^k."""
    counts = {r for r in range(1, world_size + 1) if r <= gpus or world_size % r == 0}
    counts |= {c for k in range(world_size.bit_length()) for c in (2**k, 3 * 2**k) if c <= world_size}
    return tuple(sorted(counts))


def _choices(world_size: int, global_batch: int, max_microbatches: int, gpus: int) -> dict[str, Any]:
    """Compact replica / microbatch choices for large problems (exact search over every value otherwise)."""
    out: dict[str, Any] = {}
    if world_size > EXACT_REPLICA_WORLD:
        out["replica_choices"] = replica_choices(world_size, gpus)
    if hasattr(plan_types, "default_microbatch_choices") and min(global_batch, max_microbatches) > 32:
        out["microbatch_choices"] = plan_types.default_microbatch_choices(global_batch, 1, max_microbatches)
    return out


def _needed_sizes(p: PlanProblem) -> list[int]:
    accepted = inspect.signature(required_microbatch_sizes).parameters
    extra = {k: getattr(p, k, None) for k in ("replica_choices", "microbatch_choices") if k in accepted}
    args = (p.world_size, p.global_batch, p.min_microbatches, p.max_microbatches)
    return required_microbatch_sizes(*args, **extra)


def memory_split(timeline: Timeline) -> list[dict[str, float]]:
    """Per stage, peak bytes per rank: parameters, gradients, optimizer, activations, buffers."""
    out = []
    for timing, inflight in zip(timeline.stages, timeline.peak_inflight):
        parts = dict(timing.memory_parts or {})
        parts["activations"] = (
            timing.activation_bytes * inflight
            + parts.pop("recompute workspace", 0.0)
            + parts.pop("workspace", 0.0)  # transient forward/backward memory of one block
        )
        parts["buffers"] = parts.get("buffers", 0.0) + parts.pop("inputs", 0.0)  # the step's user inputs
        out.append({k: float(parts.get(k, 0.0)) for k in MEMORY_PARTS})
    return out


def _memory_hint(
    exc: PlanError, problem: PlanProblem, mem_margin: float, reblocked: Callable[[float], PlanProblem]
) -> PlanError:
    """Add the least device memory that fits, and whether finer blocks (max_blocks) would help.

    Less memory cuts the model into more blocks (block_count), and finer blocks can need less memory: the
    figure given is checked with the blocks that much memory gets (`reblocked(usable bytes)`), raised until a
    plan fits in it."""
    try:
        needed = minimum_memory_needed(problem)
    except PlanError:
        return exc
    limit = problem.memory_limit_bytes
    if limit is None or needed <= limit:  # not a memory failure
        return exc

    def device_gib(usable: float) -> float:
        return math.ceil(usable / (1.0 - mem_margin) / 2**30 * 100) / 100

    for _ in range(4):
        usable = device_gib(needed) * 2**30 * (1.0 - mem_margin)
        try:
            coarser = reblocked(usable)
            again = minimum_memory_needed(coarser)
        except PlanError:
            break
        problem = coarser
        if again <= usable:
            break
        needed = again
    # one message with one figure (the search's own names its figure for the blocks of the smaller limit)
    text = (
        f"no plan fits in {format_bytes(limit)} usable per device (the device memory less mem_margin={mem_margin}) "
        f"for {problem.world_size} rank(s) and global batch {problem.global_batch}; minimum memory: a device "
        f"memory of at least {device_gib(needed):.2f} GiB ({format_bytes(needed)} usable). Give each device "
        "more memory (--device-memory; plan_offline's device_memory_bytes), use more ranks or a smaller batch"
    )
    factor, ranges = 2 + problem.opt_param_factor, problem.range_param_bytes
    block = max(ranges[i][i] for i in range(len(ranges))) * factor
    if block > 0.5 * needed:
        text += f"; the largest block holds {format_bytes(block)} of parameter state (more blocks, "
        text += "--max-blocks, cut layers finer; --zero shards optimizer state)"
    return PlanError(text)


def plan_offline(
    factory: str | Callable[[], Any],
    *,
    world_size: int,
    device_memory_bytes: float | None,
    global_batch: int,
    device: str | DeviceProfile,
    gpus_per_node: int | None = None,
    max_microbatches: int = 64,
    dtype: str | torch.dtype | None = None,
    schedules: Sequence[str] = ("1f1b", "fill_drain"),
    recompute: bool = True,
    mem_margin: float = 0.1,
    opt_param_factor: float = 2.0,
    max_blocks: int = 32,
    zero: bool = False,
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
    real job of the same model and shapes loads it with load_deployment=True. `max_seq_len` > 0 plans a job
    whose sequence length (dim 1 of the inputs) varies up to it (the job sets the same config item).
    `opaque_modules`: submodules captured as one operation each (the config item of that name).

    Example::

        result = plan_offline("my_models:gpt3", world_size=1024, device_memory_bytes=80 * 2**30,
                              global_batch=1536, device="h100-80gb", dtype="bf16")
        save_deployment(result.deployment, "plan.json")
    """
    if world_size < 1 or global_batch < 1 or max_microbatches < 1:
        raise ConfigError("world_size, global_batch and max_microbatches must be >= 1")
    if not 0.0 <= mem_margin < 1.0:
        raise ConfigError(f"mem_margin must be in [0, 1), got {mem_margin}")
    profile = get_device_profile(device)
    compute = normalise_dtype(dtype)
    gpus = gpus_per_node if gpus_per_node is not None else profile.gpus_per_node
    memory = profile.memory_bytes if device_memory_bytes is None else float(device_memory_bytes)
    usable = memory * (1.0 - mem_margin)
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = now - clock, now
        logger.info("plan_offline: %s took %.2f s", name, timings[name])

    model, args, kwargs = _call_factory(factory)
    lap("build")
    captured = capture(
        model, args, kwargs, batch_size=CAPTURE_BATCH, max_seq_len=max_seq_len, opaque_modules=opaque_modules
    )
    gc.collect()
    return_freed_host_memory()  # export's tracing freed tens of MiB: later phases should not add to them
    lap("capture")
    analysis = analyse(captured)
    units = atomic_units(analysis)
    flops = _op_flops(model, captured, FlatCall.of(args, kwargs))
    op_costs = estimate_op_costs(analysis, flops, global_batch)
    unit_costs = [sum(op_costs[n] for n in unit) for unit in units]
    unit_cuts = [analysis.cut_bytes_per_sample[analysis.position[unit[-1]]] for unit in units]
    allowed = [s for s in dict.fromkeys(schedules) if s != "1f1b" or has_single_loss(captured, analysis)]
    if not allowed:
        raise PlanError(
            f"no schedule of {tuple(schedules)} fits this model: 1F1B needs exactly one scalar loss output; "
            "allow 'fill_drain'"
        )
    links = {**profile.planner_links(), "gpus_per_node": gpus}
    if gpus != profile.gpus_per_node and profile.allreduce_inter_bandwidth is None:
        links["allreduce_inter_bandwidth"] = min(
            profile.intra_node_bandwidth, profile.inter_node_bandwidth * gpus
        )
    fixed: dict[str, Any] = dict(world_size=world_size, global_batch=global_batch, min_microbatches=1)
    fixed.update(memory_limit_bytes=usable)
    fixed.update(max_microbatches=min(max_microbatches, global_batch), schedules=tuple(allowed))
    fixed.update(opt_param_factor=opt_param_factor, num_stages=num_stages, zero_optimizer=zero)

    def blocked(usable_bytes: float) -> tuple[list[list[str]], PlanProblem, int]:
        """Blocks as many as `usable_bytes` per device calls for, the priced problem and how many distinct
        blocks were estimated. The blocks' graphs (one GraphModule each) are dropped here, before the search."""
        count = block_count(captured, usable_bytes, opt_param_factor, max_blocks)
        blocks = coarsen(units, unit_costs, unit_cuts, count)
        graphs = block_graphs(captured, analysis, blocks)
        tables = range_tables(captured, analysis, blocks, graphs)
        newer = _problem_kwargs(
            allow_recompute=recompute,
            **step_end_fields(captured, graphs, profile, opt_param_factor),
            input_bytes=input_bytes(captured, global_batch, world_size),
            **links,
            **_choices(world_size, global_batch, max_microbatches, gpus),
        )

        def make(profiles: list[BlockProfile]) -> PlanProblem:
            ranges = dict(
                zip(("range_param_bytes", "range_in_bytes_per_sample", "range_out_bytes_per_sample"), tables)
            )
            return PlanProblem(blocks=profiles, **ranges, **fixed, **newer)

        placeholder = BlockProfile({1: 0.0}, {1: 0.0}, {1: 0.0})
        sizes = profile_sizes(_needed_sizes(make([placeholder] * len(blocks))))
        if not sizes:
            raise PlanError(
                f"no microbatch count fits a global batch of {global_batch} on {world_size} rank(s)"
            )
        profiles, distinct = _estimate_blocks(captured, analysis, graphs, sizes, profile, compute)
        return blocks, make(profiles), distinct

    lap("analyse")
    blocks, problem, distinct = blocked(usable)
    sizes = sorted(problem.blocks[0].fwd_time) if problem.blocks else []
    lap("profile")
    try:
        plan = plan_stages(problem)
    except PlanError as exc:
        raise _memory_hint(exc, problem, mem_margin, lambda needed: blocked(needed)[1]) from exc
    lap("search")
    timeline = simulate_plan(problem, plan)
    lap("simulate")
    timings["total"] = time.perf_counter() - started

    step = timeline.step_time
    report: dict[str, Any] = {"kind": "offline", "device_profile": profile.name, "dtype": compute or "model"}
    report.update(device_memory_bytes=memory, mem_margin=mem_margin, usable_memory_bytes=usable)
    report.update(
        gpus_per_node=gpus, opt_param_factor=opt_param_factor, zero=zero, recompute_allowed=recompute
    )
    report.update(num_blocks=len(blocks), distinct_blocks=distinct, profiled_microbatch_sizes=sizes)
    report.update(replica_choices=getattr(problem, "replica_choices", None))
    report.update(microbatch_choices=getattr(problem, "microbatch_choices", None))
    report.update(simulated_step_time_s=step, samples_per_s=global_batch / step if step > 0 else 0.0)
    report.update(bubble_fraction=timeline.bubble_fraction, planning_time_s=dict(timings))
    report["warnings"] = []  # capture traces attention with the math kernel: one graph on every device
    report["stages"] = [
        {
            "memory": parts,
            "total_bytes": sum(parts.values()),
            "peak_inflight": inflight,
            "recompute": bool(getattr(stage, "recompute", False)),
        }
        for parts, inflight, stage in zip(memory_split(timeline), timeline.peak_inflight, plan.stages)
    ]
    deployment = deployment_of(plan, captured, blocks, world_size, usable, report)
    return OfflinePlan(deployment, problem, timeline, report, timings)
