"""From a model and its first call to a Deployment: capture, blocks, profiles, and the plan (or a saved one)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from .capture import CapturedGraph, FlatCall, capture, tile_rows
from .capture.export import retarget_device
from .capture.modes import exact_precision
from .capture.samples import record_values
from .config import Config
from .deploy import Deployment, load_deployment
from .errors import PlanError
from .graph.analysis import GraphAnalysis, analyse, atomic_units, has_single_loss
from .graph.blocks import coarsen, estimate_op_costs
from .plan import Plan, minimum_memory_needed, plan_stages, required_microbatch_sizes
from .plan.from_graph import (
    block_graphs,
    block_runners,
    deployment_of,
    input_bytes,
    make_problem,
    range_tables,
    step_end_fields,
)
from .plan.types import StagePlan
from .profile import profile_blocks
from .profile.devices import DeviceProfile, get_device_profile, profile_for_device_name
from .runtime.weights import is_meta_model

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Partitioned:
    captured: CapturedGraph
    analysis: GraphAnalysis
    deployment: Deployment


def _placeholder_state(model: torch.nn.Module, captured: CapturedGraph) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    state = {ph: named[fqn] for ph, fqn in captured.params.items()}
    state.update({ph: named[fqn] for ph, fqn in captured.buffers.items()})
    return state


def _global_batch(local: int, world_size: int, device: torch.device) -> int:
    if world_size == 1:
        return local
    size = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(size)
    return int(size.item())


def _check_same_graph(graph_hash: str, world_size: int) -> None:
    if world_size == 1:
        return
    hashes: list[str | None] = [None] * world_size
    dist.all_gather_object(hashes, graph_hash)
    if len(set(hashes)) != 1:
        raise PlanError(
            f"ranks captured different graphs ({hashes}); every rank must wrap the same model and call it with "
            "arguments of the same structure, dtypes and non-batch shapes"
        )


def memory_limit(config: Config, device: torch.device) -> float | None:
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return config.device_memory_limit(total)


def resolve_schedule(config: Config, captured: CapturedGraph, analysis: GraphAnalysis) -> str:
    """1F1B needs a single scalar loss (its gradient is known in forward); otherwise fill-drain."""
    eager = has_single_loss(captured, analysis)
    if config.schedule == "auto":
        return "1f1b" if eager else "fill_drain"
    if config.schedule == "1f1b" and not eager:
        raise PlanError(
            "schedule='1f1b' needs the model to return exactly one scalar loss (computed inside forward); "
            "this model does not, so use schedule='fill_drain' or 'auto'"
        )
    return config.schedule


def coupled_weight_decay(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether `optimizer` is Adam with L2 (coupled) weight decay, whose step makes one more temporary."""
    if not isinstance(optimizer, torch.optim.Adam):
        return False
    return any(
        group.get("weight_decay", 0) and not group.get("decoupled_weight_decay", False)
        for group in optimizer.param_groups
    )


def partition(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    config: Config,
    world_size: int,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
) -> Partitioned:
    started = time.perf_counter()
    call = FlatCall.of(args, kwargs)
    local_batch = call.batch_size()
    captured = capture(
        model,
        args,
        kwargs,
        batch_size=config.capture_batch_size,
        max_seq_len=config.max_seq_len,
        opaque_modules=config.opaque_modules,
    )
    _check_same_graph(captured.graph_hash, world_size)
    analysis = analyse(captured)
    global_batch = _global_batch(local_batch, world_size, device)
    limit = memory_limit(config, device)
    schedule = resolve_schedule(config, captured, analysis)
    if config.load_deployment:
        deployment = load_deployment(
            config.deployment_file,
            expected_graph_hash=captured.graph_hash,
            expected_world_size=world_size,
            expected_device_memory_bytes=limit,
        )
        logger.info("loaded deployment %s", config.deployment_file)
        retarget_device(captured.gm, device)
        return Partitioned(captured, analysis, deployment)

    if not analysis.order:
        # Nothing depends on the batch (e.g. forward(x): return x): there is nothing to cut or to profile,
        # and every rank runs the whole (empty) graph on its own rows, as DDP would.
        deployment = data_parallel_deployment(captured, world_size, global_batch, limit, schedule)
        retarget_device(captured.gm, device)
        logger.info("the model has no operations on its inputs: data parallel over %d rank(s)", world_size)
        return Partitioned(captured, analysis, deployment)
    units = atomic_units(analysis)
    state = _placeholder_state(model, captured)
    home = next((t.device for t in model.parameters()), torch.device("cpu"))
    sample_leaves = [
        leaf[: config.capture_batch_size].to(home) if isinstance(leaf, torch.Tensor) else leaf
        for leaf in call.leaves
    ]
    sample_leaves = [
        tile_rows(leaf, config.capture_batch_size)
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
        else leaf
        for leaf in sample_leaves
    ]
    for d in captured.dynamic_dims:  # profile and plan the longest sequence (values cycled along it)
        sample_leaves[d.leaf] = tile_rows(sample_leaves[d.leaf], d.max_size, d.dim)
    if is_meta_model(
        model
    ):  # record on meta; blocks are then timed on stand-ins made for each (one at a time)
        meta_leaves = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in sample_leaves]
        values, flops = record_values(captured, state, meta_leaves)
        values.update(
            (name, leaf)
            for name, leaf in zip(captured.user_inputs, sample_leaves)
            if isinstance(leaf, torch.Tensor)
        )
    else:
        values, flops = record_values(captured, state, sample_leaves)
    retarget_device(captured.gm, device)
    op_costs = estimate_op_costs(analysis, flops, global_batch)
    unit_costs = [sum(op_costs[n] for n in unit) for unit in units]
    unit_cuts = [analysis.cut_bytes_per_sample[analysis.position[unit[-1]]] for unit in units]
    blocks = coarsen(units, unit_costs, unit_cuts, config.max_partition_num)
    graphs = block_graphs(captured, analysis, blocks)
    # Read before the long profiling: a bad device_profile fails at once.
    profile = get_device_profile(config.device_profile) if config.device_profile else _shipped_profile(device)
    runners = block_runners(captured, analysis, graphs, values, state, device)
    sizes = _profile_sizes(world_size, global_batch, config)
    key = hashlib.sha256(
        f"{captured.graph_hash}|{[len(b) for b in blocks]}|{config.profile_iterations}|{torch.__version__}".encode()
    ).hexdigest()[:24]
    with exact_precision():
        profiles = profile_blocks(runners, sizes, cache_key=key, config=config, device=device)
    tables = range_tables(captured, analysis, blocks, graphs)
    problem = make_problem(tables, profiles, world_size, global_batch, limit, config, schedule)
    # The end of a step (optimizer update time, temporaries) and, with config.device_profile, the links are
    # priced with a device profile (calibrated, or the shipped one of this device), not measured here.
    links = profile.planner_links() if config.device_profile else {}
    problem = dataclasses.replace(
        problem,
        **links,
        **step_end_fields(
            captured, graphs, profile, config.opt_param_factor, coupled_weight_decay(optimizer)
        ),
        input_bytes=input_bytes(captured, global_batch, world_size),
    )
    plan = _plan_on_rank0(problem, world_size, config)
    deployment = deployment_of(plan, captured, blocks, world_size, limit)
    logger.info(
        "partitioned into %d stage(s), %d microbatches in %.1fs (%d ops, %d units, %d blocks)",
        len(plan.stages),
        plan.microbatches,
        time.perf_counter() - started,
        len(analysis.order),
        len(units),
        len(blocks),
    )
    return Partitioned(captured, analysis, deployment)


def data_parallel_deployment(
    captured: CapturedGraph,
    world_size: int,
    global_batch: int,
    device_memory_bytes: float | None,
    schedule: str,
) -> Deployment:
    """One stage of one (empty) block replicated on every rank, one microbatch: the plan of a model with no
    operations on its inputs, made without profiling (there is nothing to measure or to choose)."""
    placeholders = captured.placeholder_nodes()
    state_bytes = float(
        sum(
            placeholders[name].meta["val"].numel() * placeholders[name].meta["val"].element_size()
            for name in {**captured.params, **captured.buffers}
        )
    )
    stage = StagePlan(
        first_block=0,
        last_block=0,
        replicas=world_size,
        ranks=list(range(world_size)),
        microbatch_size=-(-global_batch // world_size),
        fwd_time=0.0,
        bwd_time=0.0,
        comm_time=0.0,
        allreduce_time=0.0,
        param_bytes=state_bytes,
        activation_bytes=0.0,
        memory_bytes=state_bytes,
    )
    plan = Plan(
        stages=[stage],
        microbatches=1,
        schedule=schedule,
        predicted_step_time=0.0,
        global_batch=global_batch,
        world_size=world_size,
    )
    return Deployment(
        plan=plan,
        graph_hash=captured.graph_hash,
        world_size=world_size,
        device_memory_bytes=device_memory_bytes,
        stage_nodes=[[]],
        block_names=["(no operations)"],
        stage_module_ranges=[("", "")],
    )


def _shipped_profile(device: torch.device) -> DeviceProfile:
    """The shipped profile of this device's model (CUDA: by name, else H100), or the generic CPU one."""
    if device.type == "cuda":
        return profile_for_device_name(torch.cuda.get_device_name(device)) or get_device_profile("h100-80gb")
    return get_device_profile("cpu")


def _profile_sizes(world_size: int, global_batch: int, config: Config) -> list[int]:
    """Measure at powers of two plus the extremes; the planner interpolates between them."""
    needed = required_microbatch_sizes(world_size, global_batch, config.min_pipeline, config.max_pipeline)
    if not needed:
        raise PlanError(
            f"no microbatch count in [min_pipeline={config.min_pipeline}, max_pipeline={config.max_pipeline}] "
            f"is possible for a global batch of {global_batch} on {world_size} rank(s); lower min_pipeline or "
            "use a larger batch"
        )
    lo, hi = needed[0], needed[-1]
    sizes = {lo, hi}
    m = 1
    while m < hi:
        if m > lo:
            sizes.add(m)
        m *= 2
    return sorted(sizes)


def _plan_on_rank0(problem: Any, world_size: int, config: Config) -> Plan:
    """Rank 0 searches; everyone receives the same plan (or the same error)."""
    rank = dist.get_rank() if world_size > 1 else 0
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload[0] = ("ok", plan_stages(problem).to_json())
        except PlanError as exc:
            payload[0] = ("error", _with_limit_hint(str(exc), problem, config))
        except Exception as exc:  # any failure must reach every rank, not leave them waiting
            payload[0] = ("error", f"planning failed on rank 0: {type(exc).__name__}: {exc}")
    if world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    status, data = payload[0]
    if status == "error":
        raise PlanError(data)
    return Plan.from_json(data)


def _with_limit_hint(message: str, problem: Any, config: Config) -> str:
    """Add the mem_limit_gb value (before the margin) that would fit, rounded up so that it does fit."""
    if problem.memory_limit_bytes is None:
        return message
    try:
        needed = minimum_memory_needed(problem) / 2**30 / (1.0 - config.mem_margin)
    except PlanError:
        return message
    digits = max(3, 3 - math.floor(math.log10(needed))) if needed > 0 else 3
    scale = 10**digits
    suggestion = math.ceil(needed * scale * (1 + 1e-9)) / scale
    return f"{message} (with mem_margin={config.mem_margin}, that is mem_limit_gb >= {suggestion:.{digits}f})"
