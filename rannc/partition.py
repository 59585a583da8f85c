"""RaNNCModule's first call, to a Deployment: capture, check the ranks agree, then load a saved plan or measure the
blocks on the ranks and plan on rank 0 (the problem assembled by `rannc.problem`, as `rannc plan` does)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from .capture import CapturedGraph, FlatCall, capture
from .capture.export import retarget_device
from .capture.samples import example_leaves, placeholder_state, record_values
from .config import Config
from .deploy import Deployment, load_deployment
from .errors import PlanError
from .graph.analysis import GraphAnalysis, analyse, has_single_loss
from .graph.blocks import cut_blocks
from .graph.stage import block_graphs
from .plan import Plan, PlanProblem, StagePlan
from .plan.types import HostCores
from .problem import (
    JOB_KNOBS,
    assemble_problem,
    deployment_of,
    job_schedules,
    job_search_space,
    links_of_config,
    plan_or_explain,
)
from .profile.blocks import measured_block_profiles
from .profile.devices import DeviceProfile, get_device_profile, profile_for_device_name
from .profile.devices import optimizer_state_factor as state_factor_of_class
from .profile.measure import ranks_on_this_host, usable_cores
from .runtime.optimizer import steps_in_chunks
from .runtime.weights import is_meta_model
from .schedule import Schedule

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Partitioned:
    captured: CapturedGraph
    analysis: GraphAnalysis
    deployment: Deployment


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


def coupled_weight_decay(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether `optimizer` is Adam with L2 (coupled) weight decay, whose step makes one more temporary."""
    if not isinstance(optimizer, torch.optim.Adam):
        return False
    return any(
        group.get("weight_decay", 0) and not group.get("decoupled_weight_decay", False)
        for group in optimizer.param_groups
    )


def optimizer_state_factor(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The state bytes per parameter byte that `optimizer` keeps (its largest over the param groups), or None for
    an optimizer of a kind rannc does not know (`profile.devices.optimizer_state_factor`; a subclass of a
    torch.optim optimizer is priced as that optimizer)."""
    if optimizer is None or not optimizer.param_groups:
        return None
    known = next((c.__name__ for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim")), "")
    per_group = [state_factor_of_class(known, group) for group in optimizer.param_groups]
    return None if None in per_group else max(f for f in per_group if f is not None)


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
    global_batch = _global_batch(call.batch_size(), world_size, device)
    limit = memory_limit(config, device)
    # Checked even when loading a plan: a schedule this model cannot run is the configuration's error.
    schedules = job_schedules(config, has_single_loss(captured, analysis))
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
        deployment = data_parallel_deployment(captured, world_size, global_batch, limit, schedules[0])
        retarget_device(captured.gm, device)
        logger.info("the model has no operations on its inputs: data parallel over %d rank(s)", world_size)
        return Partitioned(captured, analysis, deployment)

    values, flops, state = _record_example(model, captured, call, config.capture_batch_size)
    retarget_device(captured.gm, device)
    blocks = cut_blocks(analysis, flops, global_batch, config.max_partition_num)
    graphs = block_graphs(captured, analysis, blocks)
    # Read before the long profiling: a bad device_profile fails at once. The end of a step (optimizer update
    # time, temporaries) and, with config.device_profile, the links are priced with a device profile (calibrated,
    # or the shipped one of this device), not measured here.
    profile = get_device_profile(config.device_profile) if config.device_profile else _shipped_profile(device)
    links = profile.planner_links() if config.device_profile else links_of_config(config)
    factor = config.state_factor(optimizer_state_factor(optimizer))
    space = job_search_space(config, world_size, global_batch, limit, schedules, links.gpus_per_node, factor)
    sizes = space.profile_sizes()
    costs = measured_block_profiles(
        captured, analysis, blocks, graphs, (values, state), sizes, config=config, device=device
    )
    l2 = coupled_weight_decay(optimizer)
    chunked = optimizer is not None and steps_in_chunks(optimizer)
    problem = assemble_problem(
        captured,
        analysis,
        blocks,
        graphs,
        costs,
        space,
        links,
        profile,
        l2_weight_decay=l2,
        chunked_optimizer=chunked,
        # every rank measured its blocks at once: on CPUs the ranks of this host shared its cores
        cores=HostCores(usable_cores(), ranks_on_this_host()) if device.type == "cpu" else HostCores(None, 1),
    )
    plan = _plan_on_rank0(problem, world_size, config)
    deployment = deployment_of(plan, captured, blocks, world_size, limit)
    logger.info(
        "partitioned into %d stage(s), %d microbatches in %.1fs (%d ops, %d blocks)",
        len(plan.stages),
        plan.microbatches,
        time.perf_counter() - started,
        len(analysis.order),
        len(blocks),
    )
    return Partitioned(captured, analysis, deployment)


def data_parallel_deployment(
    captured: CapturedGraph,
    world_size: int,
    global_batch: int,
    device_memory_bytes: float | None,
    schedule: Schedule,
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


def _record_example(
    model: torch.nn.Module, captured: CapturedGraph, call: FlatCall, rows: int
) -> tuple[dict[str, Any], dict[str, float], dict[str, torch.Tensor]]:
    """Every graph value at `rows` samples of the call, each op's forward FLOPs, and the model's tensors by
    placeholder. A model built on meta is recorded on meta (its blocks are then timed on stand-ins)."""
    state = placeholder_state(model, captured)
    leaves = example_leaves(model, captured, call, rows)
    if not is_meta_model(model):
        return *record_values(captured, state, leaves), state
    meta_leaves = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in leaves]
    values, flops = record_values(captured, state, meta_leaves)
    values.update(
        (name, leaf) for name, leaf in zip(captured.user_inputs, leaves) if isinstance(leaf, torch.Tensor)
    )
    return values, flops, state


def _shipped_profile(device: torch.device) -> DeviceProfile:
    """The shipped profile of this device's model (CUDA: by name, else H100), or the generic CPU one."""
    if device.type == "cuda":
        return profile_for_device_name(torch.cuda.get_device_name(device)) or get_device_profile("h100-80gb")
    return get_device_profile("cpu")


def _plan_on_rank0(problem: PlanProblem, world_size: int, config: Config) -> Plan:
    """Rank 0 searches; everyone receives the same plan (or the same error)."""
    rank = dist.get_rank() if world_size > 1 else 0
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload[0] = ("ok", plan_or_explain(problem, config.mem_margin, JOB_KNOBS).to_json())
        except PlanError as exc:
            payload[0] = ("error", str(exc))
        except Exception as exc:  # any failure must reach every rank, not leave them waiting
            payload[0] = ("error", f"planning failed on rank 0: {type(exc).__name__}: {exc}")
    if world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    status, data = payload[0]
    if status == "error":
        raise PlanError(data)
    return Plan.from_json(data)
