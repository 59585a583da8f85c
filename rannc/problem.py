"""The one assembly of the planning problem: a captured model cut into blocks, the blocks' costs, the links and the
search space become the planner's `PlanProblem`; the plan it returns becomes a `Deployment` of the graph.

Both front doors use it and differ only in where the block costs come from: `RaNNCModule`'s first call
(`rannc.partition`) measures them on the ranks (`rannc.profile.blocks`), `rannc plan` (`rannc.offline`) estimates
them from a device profile (`rannc.profile.analytic`). Because estimates are cheap, `rannc plan` may also cut the
model into more blocks when a block would hold too much of a device (`rannc.graph.blocks.block_count`).

Example (the shape of both front doors; `flops` from `rannc.capture.samples.record_flops`)::

    blocks = cut_blocks(analysis, flops, global_batch, max_blocks)
    graphs = block_graphs(captured, analysis, blocks)
    space = search_space(world_size=8, global_batch=64, memory_limit_bytes=usable, schedules=schedules)
    costs = analytic_block_profiles(captured, analysis, blocks, space.profile_sizes(), device, graphs=graphs)
    problem = assemble_problem(captured, analysis, blocks, graphs, costs, space, device.planner_links(), device)
    plan = plan_or_explain(problem, mem_margin=0.1, knobs=PLAN_KNOBS)
    deployment = deployment_of(plan, captured, blocks, world_size=8, device_memory_bytes=usable)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from .capture import CapturedGraph
from .config import Config
from .deploy.deployment import Deployment, format_bytes
from .errors import ConfigError, PlanError
from .graph.analysis import GraphAnalysis, module_range
from .graph.stage import StageGraph
from .graph.tables import input_bytes, parameter_facts, range_tables
from .plan import Plan, PlanProblem, minimum_memory_needed, plan_stages, required_microbatch_sizes
from .plan.checks import only_interleaved
from .plan.types import (
    BlockProfile,
    HostCores,
    Links,
    ShardLevel,
    default_microbatch_choices,
    default_replica_choices,
)
from .profile.devices import OPTIMIZER_CHUNK_BYTES, DeviceProfile, optimizer_transient
from .schedule import Schedule

__all__ = [
    "AUTO_SCHEDULES",
    "JOB_KNOBS",
    "PLAN_KNOBS",
    "Knobs",
    "SearchSpace",
    "allowed_schedules",
    "assemble_problem",
    "deployment_of",
    "job_schedules",
    "job_search_space",
    "links_of_config",
    "plan_or_explain",
    "schedules_for_chunks",
    "search_space",
]

# How many near-optimal candidates the search simulates to make its final choice (PlanProblem.simulate_candidates).
SIMULATE_CANDIDATES = 16
# Larger worlds search the compact replica counts of default_replica_choices; more microbatch counts than
# COMPACT_MICROBATCHES, the compact ones of default_microbatch_choices (exact search over every value otherwise).
COMPACT_WORLD = 64
COMPACT_MICROBATCHES = 32
_GIB = 2**30
# What schedule = "auto" lets the planner choose among (the first preferred on a tie). Zero bubble takes more
# memory than 1F1B for a shorter step; fill-drain runs models that return more than one scalar loss; interleaved
# 1F1B replaces the others' best plan when it simulates faster (its cut searches share a node budget,
# `interleave.SEARCH_NODE_BUDGET`, so planning where memory binds stays seconds).
AUTO_SCHEDULES = (Schedule.ONE_F_ONE_B, Schedule.ZERO_BUBBLE, Schedule.FILL_DRAIN, Schedule.INTERLEAVED_1F1B)


# ---- the search space and the links -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The plans searched for one job: its ranks, global batch and usable memory per device, the choices the
    search may make, and how the job trains (what the cost model charges for it)."""

    world_size: int
    global_batch: int
    memory_limit_bytes: float | None  # usable bytes per device (margin applied); None: unlimited
    schedules: tuple[Schedule, ...]
    min_microbatches: int = 1
    max_microbatches: int = 32
    num_stages: int | None = None  # None: any count
    allow_recompute: bool = False
    replica_choices: tuple[int, ...] | None = None  # None: every count
    microbatch_choices: tuple[int, ...] | None = None
    zero_optimizer: bool = False
    opt_param_factor: float = 2.0
    overlap_grad_sync: bool = True
    shard_levels: tuple[ShardLevel, ...] = (ShardLevel.NONE,)  # see PlanProblem.shard_levels
    chunks: int | None = None  # interleaved 1F1B: force the chunks per position (None: the planner chooses)

    def microbatch_sizes(self) -> list[int]:
        """Every per-replica microbatch size the search may ask a block's cost at, ascending."""
        return required_microbatch_sizes(
            self.world_size,
            self.global_batch,
            self.min_microbatches,
            self.max_microbatches,
            self.replica_choices,
            self.microbatch_choices,
        )

    def profile_sizes(self) -> list[int]:
        """The sizes to measure or estimate: both ends of `microbatch_sizes` and the powers of two between (the
        planner interpolates); PlanError when the search has no microbatch count at all."""
        needed = self.microbatch_sizes()
        if not needed:
            raise PlanError(
                f"no microbatch count in [{self.min_microbatches}, {self.max_microbatches}] is possible for a "
                f"global batch of {self.global_batch} on {self.world_size} rank(s); lower min_pipeline or use a "
                "larger batch"
            )
        lo, hi = needed[0], needed[-1]
        return sorted({lo, hi} | {2**k for k in range(hi.bit_length()) if lo < 2**k < hi})


def search_space(
    *,
    world_size: int,
    global_batch: int,
    memory_limit_bytes: float | None,
    schedules: tuple[Schedule, ...],
    min_microbatches: int = 1,
    max_microbatches: int = 32,
    num_stages: int | None = None,
    allow_recompute: bool = False,
    zero_optimizer: bool = False,
    opt_param_factor: float = 2.0,
    overlap_grad_sync: bool = True,
    gpus_per_node: int | None = None,
    shard_stages: str = "none",
    chunks: int | None = None,
) -> SearchSpace:
    """The SearchSpace of a job: every replica and microbatch count on small problems, the compact sets of
    `default_replica_choices` (worlds of more than COMPACT_WORLD ranks) and `default_microbatch_choices` (more than
    COMPACT_MICROBATCHES microbatch counts) on large ones."""
    most = min(max_microbatches, global_batch)
    replicas = default_replica_choices(world_size, gpus_per_node) if world_size > COMPACT_WORLD else None
    counts = None
    if most > COMPACT_MICROBATCHES:
        counts = default_microbatch_choices(global_batch, min_microbatches, max_microbatches)
    return SearchSpace(
        world_size=world_size,
        global_batch=global_batch,
        memory_limit_bytes=memory_limit_bytes,
        schedules=schedules,
        min_microbatches=min_microbatches,
        max_microbatches=most,
        num_stages=num_stages,
        allow_recompute=allow_recompute,
        replica_choices=replicas,
        microbatch_choices=counts,
        zero_optimizer=zero_optimizer,
        opt_param_factor=opt_param_factor,
        overlap_grad_sync=overlap_grad_sync,
        shard_levels=shard_levels_of(shard_stages),
        chunks=chunks if chunks != 1 else None,  # one chunk per position: no interleaving to force
    )


def shard_levels_of(shard_stages: str) -> tuple[ShardLevel, ...]:
    """The shard levels a replicated stage may use for the config item `shard_stages` (`rannc plan --shard`):
    "auto" every level (the planner chooses, least sharding first), "none" none, a level that level."""
    if shard_stages == "auto":
        return tuple(ShardLevel)
    return (ShardLevel(shard_stages),)


def job_schedules(config: Config, single_loss: bool) -> tuple[Schedule, ...]:
    """The schedules a RaNNCModule job's configuration allows for its model (`single_loss`: the model returns
    exactly one scalar loss, which 1F1B and interleaved 1F1B need); "auto" prefers 1F1B, and leaves interleaving
    out when the config item `chunks` is 1."""
    requested = AUTO_SCHEDULES if config.schedule == "auto" else (Schedule(config.schedule),)
    return allowed_schedules(schedules_for_chunks(requested, config.forced_chunks), single_loss)


def schedules_for_chunks(requested: Sequence[Schedule | str], chunks: int | None) -> tuple[Schedule, ...]:
    """`requested` without interleaved 1F1B when `chunks` (forced model chunks per position) is 1: one chunk per
    position is no interleaving. ConfigError when nothing else was requested."""
    schedules = tuple(Schedule(name) for name in requested)
    if chunks != 1:
        return schedules
    kept = tuple(s for s in schedules if s != Schedule.INTERLEAVED_1F1B)
    if not kept:
        raise ConfigError(
            "interleaved 1F1B with 1 chunk per position is plain 1F1B: name 1f1b, or --chunks 2 or more, or leave "
            "the chunks to the planner"
        )
    return kept


def job_search_space(
    config: Config,
    world_size: int,
    global_batch: int,
    memory_limit_bytes: float | None,
    schedules: tuple[Schedule, ...],
    gpus_per_node: int | None,
    opt_param_factor: float,
) -> SearchSpace:
    """The SearchSpace of a RaNNCModule job from its configuration (`schedules`: `job_schedules`;
    `opt_param_factor`: the optimizer's state bytes per parameter byte, `Config.state_factor`)."""
    return search_space(
        world_size=world_size,
        global_batch=global_batch,
        memory_limit_bytes=memory_limit_bytes,
        schedules=schedules,
        min_microbatches=config.min_pipeline,
        max_microbatches=config.max_pipeline,
        num_stages=config.partition_num or None,
        allow_recompute=config.recompute == "auto",
        zero_optimizer=config.enable_zero,
        opt_param_factor=opt_param_factor,
        overlap_grad_sync=config.overlap_grad_sync,
        gpus_per_node=gpus_per_node,
        shard_stages=config.shard_stages,
        chunks=config.forced_chunks,
    )


def allowed_schedules(requested: Sequence[Schedule | str], single_loss: bool) -> tuple[Schedule, ...]:
    """The requested schedules this model can run, in the order given (the first is preferred): 1F1B, zero bubble
    and interleaved 1F1B compute the loss's gradient inside forward (Schedule.eager), so they need a model
    returning exactly one scalar loss."""
    schedules = tuple(dict.fromkeys(Schedule(name) for name in requested))
    allowed = tuple(s for s in schedules if not s.eager or single_loss)
    if not allowed:
        raise PlanError(
            f"no schedule of {[s.value for s in schedules]} fits this model: 1F1B, zero bubble and interleaved "
            "1F1B need the model to return exactly one scalar loss (computed inside forward) and this model does "
            "not; allow fill_drain (RaNNCModule: schedule='fill_drain' or 'auto'; plan_offline: "
            "schedules=('fill_drain',))"
        )
    return allowed


def links_of_config(config: Config) -> Links:
    """The links RaNNCModule's configuration assumes (p2p_* and allreduce_* items; no node structure)."""
    return Links(
        p2p_bandwidth=config.p2p_bandwidth_gbps * _GIB,
        p2p_latency=config.p2p_latency_us * 1e-6,
        allreduce_bandwidth=config.allreduce_bandwidth_gbps * _GIB,
        allreduce_latency=config.allreduce_latency_us * 1e-6,
    )


# ---- the problem ----------------------------------------------------------------------------------------------


def assemble_problem(
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    blocks: list[list[str]],
    graphs: list[StageGraph],
    costs: list[BlockProfile],
    space: SearchSpace,
    links: Links,
    device: DeviceProfile,
    *,
    l2_weight_decay: bool = False,
    chunked_optimizer: bool = True,
    cores: HostCores | None = None,
) -> PlanProblem:
    """The planner's problem: per block its `costs` (measured or estimated at `space.profile_sizes()`), per range
    of blocks the parameter and boundary bytes of the graph (`graphs`: one per block), the step's inputs, the
    search space and the links.

    The end of a step is priced with `device`: the optimizer update time and its temporaries (one more with
    Adam's L2 weight decay, `l2_weight_decay`; those of one chunk of OPTIMIZER_CHUNK_BYTES when the runtime steps
    the optimizer a chunk at a time, `chunked_optimizer`: `runtime.optimizer.steps_in_chunks`), and the share of a
    gradient allreduce that hides behind compute. `cores` says how CPU ranks share their cores and how many
    measured `costs` at once (default: the device's `host_cores` and `measured_ranks`).
    """
    if len(costs) != len(blocks) or len(graphs) != len(blocks):
        raise ValueError(f"{len(costs)} block costs and {len(graphs)} graphs for {len(blocks)} blocks")
    tables = range_tables(captured, analysis, blocks, graphs)
    largest, shared = parameter_facts(captured, graphs)
    if cores is None:
        cores = HostCores(device.host_cores, device.measured_ranks)
    return PlanProblem(
        blocks=costs,
        range_param_bytes=tables.param_bytes,
        range_in_bytes_per_sample=tables.in_bytes_per_sample,
        range_out_bytes_per_sample=tables.out_bytes_per_sample,
        world_size=space.world_size,
        global_batch=space.global_batch,
        memory_limit_bytes=space.memory_limit_bytes,
        opt_param_factor=space.opt_param_factor,
        p2p_bandwidth=links.p2p_bandwidth,
        p2p_latency=links.p2p_latency,
        allreduce_bandwidth=links.allreduce_bandwidth,
        allreduce_latency=links.allreduce_latency,
        min_microbatches=space.min_microbatches,
        max_microbatches=space.max_microbatches,
        schedules=space.schedules,
        num_stages=space.num_stages,
        zero_optimizer=space.zero_optimizer,
        shard_levels=space.shard_levels,
        overlap_grad_sync=space.overlap_grad_sync,
        allreduce_overlap=device.allreduce_overlap,
        input_bytes=input_bytes(captured, space.global_batch, space.world_size),
        update_seconds_per_param_byte=device.update_seconds_per_byte(space.opt_param_factor),
        allow_recompute=space.allow_recompute,
        replica_choices=space.replica_choices,
        microbatch_choices=space.microbatch_choices,
        gpus_per_node=links.gpus_per_node,
        inter_node_bandwidth=links.inter_node_bandwidth,
        inter_node_latency=links.inter_node_latency,
        allreduce_inter_bandwidth=links.allreduce_inter_bandwidth,
        allreduce_inter_latency=links.allreduce_inter_latency,
        optimizer_transient=optimizer_transient(device.kind, space.opt_param_factor, l2_weight_decay),
        range_largest_param_bytes=largest,
        optimizer_chunk_bytes=OPTIMIZER_CHUNK_BYTES if chunked_optimizer else 0.0,
        shared_params=shared,
        chunks=space.chunks,
        simulate_candidates=SIMULATE_CANDIDATES,
        host_cores=cores.cores,
        measured_ranks=cores.measured_ranks,
    )


# ---- planning and why it failed -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Knobs:
    """How the users of a front door set what a failed plan's message suggests; `memory` holds {gib}, the device
    memory that fits."""

    memory: str
    blocks: str
    zero: str
    schedules: str


JOB_KNOBS = Knobs(
    memory="mem_limit_gb >= {gib}",
    blocks="max_partition_num",
    zero="enable_zero",
    schedules="schedule='auto'",
)
PLAN_KNOBS = Knobs(
    memory="--device-memory {gib}GiB, plan_offline's device_memory_bytes",
    blocks="--max-blocks",
    zero="--zero",
    schedules="--schedules 1f1b,interleaved_1f1b",
)


def plan_or_explain(
    problem: PlanProblem,
    mem_margin: float,
    knobs: Knobs,
    reblocked: Callable[[float], PlanProblem] | None = None,
) -> Plan:
    """`plan_stages(problem)`; when no plan fits in memory, a PlanError naming the least device memory that
    would, in the words of the front door (`knobs`).

    `reblocked(usable bytes)` is the problem the front door would make for that much memory per device (it may
    cut the model into other blocks, which can need less): the figure given is checked with it and raised
    until a plan fits."""
    try:
        return plan_stages(problem)
    except PlanError as exc:
        raise memory_hint(exc, problem, mem_margin, knobs, reblocked) from exc


def memory_hint(
    exc: PlanError,
    problem: PlanProblem,
    mem_margin: float,
    knobs: Knobs,
    reblocked: Callable[[float], PlanProblem] | None = None,
) -> PlanError:
    """`exc` with the least device memory that fits (see `plan_or_explain`); `exc` itself when memory is not
    what failed."""
    try:
        needed = minimum_memory_needed(problem)
    except PlanError:
        return exc
    limit = problem.memory_limit_bytes
    if limit is None or needed <= limit:
        return exc
    for _ in range(4 if reblocked is not None else 0):
        usable = float(_round_up(needed / (1.0 - mem_margin) / _GIB)) * _GIB * (1.0 - mem_margin)
        try:
            coarser = reblocked(usable)  # type: ignore[misc]
            again = minimum_memory_needed(coarser)
        except PlanError:
            break
        problem = coarser
        if again <= usable:
            break
        needed = again
    device = _round_up(needed / (1.0 - mem_margin) / _GIB)
    text = (
        f"no plan fits in {format_bytes(limit)} usable per device (the device memory less mem_margin={mem_margin}) "
        f"for {problem.world_size} rank(s) and global batch {problem.global_batch}; minimum memory: the smallest "
        f"per-device memory that would fit is {_round_up(needed / _GIB)} GiB usable, a device memory of at least "
        f"{device} GiB. Give each device more memory ({knobs.memory.format(gib=device)}), use more ranks or a "
        "smaller batch"
    )
    if only_interleaved(problem):  # minimum_memory_needed priced 1F1B for it
        text += (
            "; that is what a 1F1B plan needs, and interleaved 1F1B (the only schedule allowed) holds more "
            f"activations per position than a 1F1B stage: allow 1F1B too ({knobs.schedules})"
        )
    factor, ranges = 2 + problem.opt_param_factor, problem.range_param_bytes
    block = max(ranges[i][i] for i in range(len(ranges))) * factor
    if block > 0.5 * needed:
        text += f"; the largest block holds {format_bytes(block)} of parameter state (more blocks, "
        text += f"{knobs.blocks}, cut layers finer; {knobs.zero} shards optimizer state)"
    return PlanError(text)


def _round_up(gib: float) -> str:
    """`gib` rounded up to three significant digits (at least two decimals), as text: a memory that does fit."""
    digits = max(2, 2 - math.floor(math.log10(gib))) if gib > 0 else 2
    scale = 10**digits
    return f"{math.ceil(gib * scale * (1 + 1e-9)) / scale:.{digits}f}"


# ---- the plan, back to the graph -------------------------------------------------------------------------------


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
