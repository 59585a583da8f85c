"""Turn blocks of the captured graph into the planner's cost table (and the profiler's block runners)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..capture import CapturedGraph, tile_rows
from ..capture.inputs import symint_value, with_memory_order
from ..deploy import Deployment
from ..graph.analysis import GraphAnalysis, module_range
from ..graph.stage import StageGraph, build_stage
from ..profile import BlockRunner
from ..profile.devices import DeviceProfile, optimizer_transient
from ..runtime.weights import stand_in
from .types import BlockProfile, Plan, PlanProblem

# How many near-optimal candidates the search simulates to make its final choice (PlanProblem.simulate_candidates).
SIMULATE_CANDIDATES = 16


def block_graphs(
    captured: CapturedGraph, analysis: GraphAnalysis, blocks: list[list[str]]
) -> list[StageGraph]:
    return [build_stage(captured, analysis, nodes) for nodes in blocks]


def block_runners(
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    graphs: list[StageGraph],
    values: dict[str, Any],
    state: dict[str, torch.Tensor],
    device: torch.device,
) -> list[BlockRunner]:
    """Runners that feed each block real example values, tiled to the microbatch size asked for."""
    runners = []
    metas = {n.name: n.meta.get("val") for n in captured.gm.graph.nodes}
    planned = captured.planning_sizes()  # sequence lengths: the values were recorded at their maximum
    for graph in graphs:
        params = frozenset(
            i for i, item in enumerate(graph.inputs) if item.kind in ("param", "buffer", "constant")
        )

        def make_inputs(m: int, graph: StageGraph = graph) -> list[Any]:
            args: list[Any] = []
            for item in graph.inputs:
                if item.kind in ("param", "buffer"):
                    tensor = state[item.name]
                    args.append(stand_in(tensor, device).requires_grad_(tensor.requires_grad))
                elif item.kind == "constant":
                    args.append(captured.constants[item.name].to(device))
                elif item.kind == "symint":
                    args.append(symint_value(metas[item.name], captured.batch_symbol, m, planned))
                else:
                    value = values[item.name]
                    if isinstance(value, torch.Tensor):
                        value = stand_in(value, device)  # a meta model's values were recorded on meta
                        dim = analysis.values[item.name].batch_dim if item.kind == "boundary" else 0
                        if dim is not None and value.dim() > 0:
                            value = tile_rows(value, m, dim)
                        if item.kind == "boundary":
                            value = with_memory_order(value, analysis.values[item.name].dim_order)
                        value = value.to(device)
                    args.append(value)
            return args

        runners.append(BlockRunner(graph.module, make_inputs, params))
    return runners


def _block_of_positions(analysis: GraphAnalysis, blocks: list[list[str]]) -> dict[str, int]:
    return {name: b for b, nodes in enumerate(blocks) for name in nodes}


def range_tables(
    captured: CapturedGraph, analysis: GraphAnalysis, blocks: list[list[str]], graphs: list[StageGraph]
) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """Per range of blocks [i, j]: distinct parameter bytes, boundary bytes in and out per sample."""
    count = len(blocks)
    placeholders = captured.placeholder_nodes()
    param_sets: list[dict[str, float]] = []
    for graph in graphs:
        owned: dict[str, float] = {}
        for item in graph.inputs:
            if item.kind in ("param", "buffer"):
                val = placeholders[item.name].meta["val"]
                canonical = captured.params.get(item.name) or captured.buffers[item.name]
                owned[canonical] = float(val.numel() * val.element_size())
        param_sets.append(owned)
    param_bytes = [[0.0] * count for _ in range(count)]
    for i in range(count):
        union: dict[str, float] = {}
        for j in range(i, count):
            union.update(param_sets[j])
            param_bytes[i][j] = sum(union.values())

    block_of = _block_of_positions(analysis, blocks)
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    inbound = [[0.0] * (count + 1) for _ in range(count)]  # difference rows over j
    outbound = [[0.0] * (count + 1) for _ in range(count)]
    for name in analysis.order:
        info = analysis.values[name]
        if info.bytes_per_sample == 0:
            continue
        producer = block_of[name]
        consumers = sorted({block_of[u.name] for u in nodes[name].users if u.name in block_of} - {producer})
        if not consumers:
            continue
        for i in range(producer + 1, count):
            first = next((c for c in consumers if c >= i), None)
            if first is None:
                break
            inbound[i][first] += info.bytes_per_sample
        last = consumers[-1]
        for i in range(0, producer + 1):
            outbound[i][producer] += info.bytes_per_sample
            outbound[i][last] -= info.bytes_per_sample
    in_table = [[0.0] * count for _ in range(count)]
    out_table = [[0.0] * count for _ in range(count)]
    for i in range(count):
        running_in = running_out = 0.0
        for j in range(count):
            running_in += inbound[i][j]
            running_out += outbound[i][j]
            if j >= i:
                in_table[i][j] = running_in
                out_table[i][j] = max(running_out, 0.0)
    return param_bytes, in_table, out_table


def parameter_facts(
    captured: CapturedGraph, graphs: list[StageGraph]
) -> tuple[list[list[float]], tuple[tuple[float, tuple[int, ...]], ...]]:
    """Per range of blocks [i, j] the bytes of its largest parameter tensor, and the parameters several blocks
    use (tied weights, or one weight used in two places) as (bytes, blocks)."""
    placeholders = captured.placeholder_nodes()
    users: dict[str, list[int]] = {}
    sizes: dict[str, float] = {}
    largest_of_block = []
    for b, graph in enumerate(graphs):
        largest = 0.0
        for item in graph.inputs:
            if item.kind == "param":
                val = placeholders[item.name].meta["val"]
                canonical = captured.params[item.name]
                sizes[canonical] = nbytes = float(val.numel() * val.element_size())
                users.setdefault(canonical, []).append(b)
                largest = max(largest, nbytes)
        largest_of_block.append(largest)
    count = len(graphs)
    table = [[0.0] * count for _ in range(count)]
    for i in range(count):
        running = 0.0
        for j in range(i, count):
            running = max(running, largest_of_block[j])
            table[i][j] = running
    shared = tuple(
        (sizes[name], tuple(sorted(set(blocks)))) for name, blocks in users.items() if len(set(blocks)) > 1
    )
    return table, shared


def step_end_fields(
    captured: CapturedGraph,
    graphs: list[StageGraph],
    profile: DeviceProfile,
    opt_param_factor: float,
    l2_weight_decay: bool = False,
) -> dict[str, Any]:
    """The PlanProblem fields about the end of a step on `profile`'s device: optimizer update time, optimizer
    temporaries, the largest parameter of each block range and the parameters shared between blocks (whose
    allreduce only the simulator charges, so the search's final choice is simulated)."""
    largest, shared = parameter_facts(captured, graphs)
    return {
        "update_seconds_per_param_byte": profile.update_seconds_per_byte(opt_param_factor),
        "optimizer_transient": optimizer_transient(profile.kind, opt_param_factor, l2_weight_decay),
        "range_largest_param_bytes": largest,
        "shared_params": shared,
        "simulate_candidates": SIMULATE_CANDIDATES,
        "allreduce_overlap": profile.allreduce_overlap,
    }


def input_bytes(captured: CapturedGraph, global_batch: int, world_size: int) -> float:
    """Bytes of user inputs on every rank during a step: the gathered global batch and the rank's own rows."""
    per_sample = sum(
        math.prod(shape) * dtype.itemsize
        for shape, dtype in (s for s in captured.input_shapes if s is not None)
    )
    return float(per_sample * (global_batch + -(-global_batch // world_size)))


def deployment_of(
    plan: Plan,
    captured: CapturedGraph,
    blocks: list[list[str]],
    world_size: int,
    device_memory_bytes: float | None,
    report: dict[str, Any] | None = None,
) -> Deployment:
    """The Deployment of `plan`: each stage's graph nodes and module range, each block's name."""
    stage_nodes = [sum(blocks[s.first_block : s.last_block + 1], []) for s in plan.stages]
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    return Deployment(
        plan=plan,
        graph_hash=captured.graph_hash,
        world_size=world_size,
        device_memory_bytes=device_memory_bytes,
        stage_nodes=stage_nodes,
        block_names=["..".join(module_range(nodes, b)) for b in blocks],
        stage_module_ranges=[module_range(nodes, ns) for ns in stage_nodes],
        report=report if report is not None else {},
    )


def make_problem(
    tables: tuple[list[list[float]], list[list[float]], list[list[float]]],
    profiles: list[BlockProfile],
    world_size: int,
    global_batch: int,
    memory_limit: float | None,
    config: Any,
    schedule: str,
) -> PlanProblem:
    param_bytes, in_table, out_table = tables
    return PlanProblem(
        blocks=profiles,
        range_param_bytes=param_bytes,
        range_in_bytes_per_sample=in_table,
        range_out_bytes_per_sample=out_table,
        world_size=world_size,
        global_batch=global_batch,
        memory_limit_bytes=memory_limit,
        opt_param_factor=config.opt_param_factor,
        p2p_bandwidth=config.p2p_bandwidth_gbps * 2**30,
        p2p_latency=config.p2p_latency_us * 1e-6,
        allreduce_bandwidth=config.allreduce_bandwidth_gbps * 2**30,
        allreduce_latency=config.allreduce_latency_us * 1e-6,
        min_microbatches=config.min_pipeline,
        max_microbatches=min(config.max_pipeline, global_batch),
        schedules=(schedule,),
        num_stages=config.partition_num or None,
        zero_optimizer=config.enable_zero,
        overlap_grad_sync=config.overlap_grad_sync,
        allow_recompute=config.recompute == "auto",
    )
