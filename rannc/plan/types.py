"""The planner's input (a cost table over blocks) and output (a Plan): plain, JSON-serialisable values."""

from __future__ import annotations

import bisect
import dataclasses
import enum
from typing import Any, NamedTuple

from ..schedule import Schedule


@dataclasses.dataclass(frozen=True)
class BlockProfile:
    """Measured (or estimated) cost of one block at several per-replica microbatch sizes.

    Times are seconds for one microbatch; bytes are per rank. Values between measured sizes are
    interpolated linearly, values outside are extrapolated from the nearest two points.
    """

    fwd_time: dict[int, float]
    bwd_time: dict[int, float]
    activation_bytes: dict[int, float]  # tensors saved for backward by one microbatch
    # Transient bytes beyond the saved tensors while the block runs one microbatch's forward or backward
    # (temporaries, incoming and outgoing gradients; parameter gradients excluded): held once per stage, not
    # per microbatch in flight. Empty: not known (counted as 0).
    workspace_bytes: dict[int, float] = dataclasses.field(default_factory=dict)
    # Split backwards (zero bubble): seconds of bwd_time spent on parameter gradients (the W pass; the I pass
    # takes the rest), and the bytes of the gradients an I pass keeps for its W (caught where the parameters'
    # way meets the inputs' path). Empty: not known (W counted as 0 seconds and 0 bytes).
    bwd_weight: dict[int, float] = dataclasses.field(default_factory=dict)
    deferred_grad_bytes: dict[int, float] = dataclasses.field(default_factory=dict)

    def at(self, table: dict[int, float], m: int) -> float:
        return interpolate(table, m)

    def workspace_at(self, m: int) -> float:
        return interpolate(self.workspace_bytes, m) if self.workspace_bytes else 0.0

    def bwd_weight_at(self, m: int) -> float:
        """Seconds of the W pass at microbatch size m (0 when not known), at most the whole backward's."""
        if not self.bwd_weight:
            return 0.0
        return min(interpolate(self.bwd_weight, m), interpolate(self.bwd_time, m))

    def deferred_grad_bytes_at(self, m: int) -> float:
        return interpolate(self.deferred_grad_bytes, m) if self.deferred_grad_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        data = {
            "fwd_time": {str(k): v for k, v in self.fwd_time.items()},
            "bwd_time": {str(k): v for k, v in self.bwd_time.items()},
            "activation_bytes": {str(k): v for k, v in self.activation_bytes.items()},
        }
        for name in ("workspace_bytes", "bwd_weight", "deferred_grad_bytes"):
            table = getattr(self, name)
            if table:
                data[name] = {str(k): v for k, v in table.items()}
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> BlockProfile:
        return BlockProfile(
            fwd_time={int(k): float(v) for k, v in data["fwd_time"].items()},
            bwd_time={int(k): float(v) for k, v in data["bwd_time"].items()},
            activation_bytes={int(k): float(v) for k, v in data["activation_bytes"].items()},
            workspace_bytes={int(k): float(v) for k, v in data.get("workspace_bytes", {}).items()},
            bwd_weight={int(k): float(v) for k, v in data.get("bwd_weight", {}).items()},
            deferred_grad_bytes={int(k): float(v) for k, v in data.get("deferred_grad_bytes", {}).items()},
        )


def interpolate(table: dict[int, float], m: int) -> float:
    """Piecewise-linear value of `table` at microbatch size m (linear extrapolation, never negative)."""
    if not table:
        raise ValueError("empty cost table")
    if m in table:
        return table[m]
    keys = sorted(table)
    if len(keys) == 1:
        k = keys[0]
        return table[k] * m / k
    pos = bisect.bisect_left(keys, m)
    lo, hi = (
        (keys[0], keys[1])
        if pos == 0
        else (keys[-2], keys[-1])
        if pos == len(keys)
        else (keys[pos - 1], keys[pos])
    )
    value = table[lo] + (table[hi] - table[lo]) * (m - lo) / (hi - lo)
    return max(value, 0.0)


@dataclasses.dataclass(frozen=True)
class Links:
    """The links the cost model charges (bytes/s and seconds, one way per device).

    Transfers between stages use the p2p link, gradient allreduces the allreduce one (a bus bandwidth). With
    `gpus_per_node` set, ranks n*g..n*g+g-1 form node n and what crosses nodes uses the inter-node figures
    (None: the same as inside a node).
    """

    p2p_bandwidth: float = 20 * 2**30
    p2p_latency: float = 20e-6
    allreduce_bandwidth: float = 10 * 2**30
    allreduce_latency: float = 50e-6
    gpus_per_node: int | None = None
    inter_node_bandwidth: float | None = None
    inter_node_latency: float | None = None
    allreduce_inter_bandwidth: float | None = None
    allreduce_inter_latency: float | None = None


_LINK_FIELDS = tuple(f.name for f in dataclasses.fields(Links))


class HostCores(NamedTuple):
    """How the ranks of a node share its CPU cores (`PlanProblem.host_cores`, `measured_ranks`)."""

    cores: int | None  # None: a device per rank (GPUs)
    measured_ranks: int  # ranks of a node computing at once when the block costs were measured


class ShardLevel(enum.StrEnum):
    """How a stage's replicas divide its parameter state (ZeRO stages; each parameter has one owner replica)."""

    NONE = "none"  # every replica holds parameters, gradients and optimizer state whole
    ZERO_1 = "zero-1"  # optimizer state on the owner only (the owner steps and broadcasts the parameter)
    ZERO_2 = "zero-2"  # and gradients: reduced to the owner after the step's last backward
    ZERO_3 = "zero-3"  # and parameters: gathered per unit for each forward and backward, then released

    @property
    def shards_optimizer(self) -> bool:
        return self != ShardLevel.NONE

    @property
    def shards_gradients(self) -> bool:
        return self in (ShardLevel.ZERO_2, ShardLevel.ZERO_3)

    @property
    def shards_parameters(self) -> bool:
        return self == ShardLevel.ZERO_3


@dataclasses.dataclass(frozen=True)
class PlanProblem:
    """Everything the stage search needs. Blocks are in pipeline (topological) order; a stage is a
    contiguous range of blocks [i, j] (inclusive). Range tables are indexed [i][j] with i <= j."""

    blocks: list[BlockProfile]
    range_param_bytes: list[list[float]]  # bytes of the distinct parameters used by blocks i..j
    range_in_bytes_per_sample: list[
        list[float]
    ]  # activations entering blocks i..j from earlier blocks, per sample
    range_out_bytes_per_sample: list[
        list[float]
    ]  # activations leaving blocks i..j to later blocks, per sample
    world_size: int
    global_batch: int
    memory_limit_bytes: float | None = None  # usable bytes per device (margin applied); None = unlimited
    opt_param_factor: float = 2.0
    p2p_bandwidth: float = 20 * 2**30  # bytes/s
    p2p_latency: float = 20e-6  # s
    allreduce_bandwidth: float = 10 * 2**30  # bytes/s
    allreduce_latency: float = 50e-6  # s
    min_microbatches: int = 1
    max_microbatches: int = 32
    schedules: tuple[Schedule, ...] = (Schedule.ONE_F_ONE_B,)
    num_stages: int | None = None  # force the stage count
    zero_optimizer: bool = False  # ZeRO-1: optimizer state sharded over each stage's replicas
    # The ShardLevels a stage with replicas may use, least sharding first; the search gives each stage the
    # first one with which it fits in memory (see plan/sharding.py). (NONE,): no per-stage sharding.
    shard_levels: tuple[ShardLevel, ...] = (ShardLevel.NONE,)
    # The runtime starts a stage's gradient allreduce during its last backward (config overlap_grad_sync); the
    # simulator models that, the analytic cost (an upper bound on it) charges the whole allreduce after.
    overlap_grad_sync: bool = True
    allreduce_overlap: float = 1.0  # fraction of an overlapped allreduce that hides behind compute (device)
    # Bytes of user inputs every rank holds during a step, whatever its stage: the global batch the runtime
    # gathers on every rank plus the rank's own rows (the caller's batch). Part of every stage's memory.
    input_bytes: float = 0.0
    # Seconds the optimizer step takes per byte of parameters a rank updates (after the allreduce; with
    # ZeRO-1 a rank updates its shard). 0 = not modelled.
    update_seconds_per_param_byte: float = 0.0
    # Per-stage activation recompute: a recomputed stage keeps only its boundary inputs per
    # microbatch in flight (plus one microbatch's activations while it runs backward) and pays one
    # more forward in backward. The search recomputes a stage exactly when it does not fit otherwise.
    allow_recompute: bool = False
    # Replica counts a stage may have (None = every count 1..world_size) and microbatch counts the
    # search may use (None = every count; always within [min_microbatches, max_microbatches]). The
    # search is exact over exactly these choices; see default_replica_choices and
    # default_microbatch_choices for compact sets for large clusters.
    replica_choices: tuple[int, ...] | None = None
    microbatch_choices: tuple[int, ...] | None = None
    # Placement: ranks are assigned to stages contiguously in pipeline order (stage 0 gets ranks
    # 0..r0-1, stage 1 the next r1, ...) and node n holds ranks n*g..n*g+g-1. With gpus_per_node
    # set, the transfers between two consecutive stages (a stage's inputs and outputs) use the
    # inter-node link unless both stages lie inside one node (all boundary inputs of a stage count
    # as coming from the stage before it; the pipeline's own inputs and outputs are intra-node),
    # and a stage's gradient allreduce uses the inter-node link when its replicas span nodes.
    # The inter-node values default (None) to the p2p / allreduce ones.
    gpus_per_node: int | None = None
    inter_node_bandwidth: float | None = None  # bytes/s between stages on different nodes
    inter_node_latency: float | None = None  # s
    allreduce_inter_bandwidth: float | None = None  # bytes/s of an allreduce spanning nodes
    allreduce_inter_latency: float | None = None  # s
    # Ranks on CPUs: the cores the ranks of one node (gpus_per_node of them; None: every rank) share, None for a
    # device per rank (GPUs); and how many ranks of a node computed at once when the block costs were measured
    # (a job measures on every rank at once; `rannc calibrate --ranks N` measures on N). While more ranks than
    # cores compute, each runs slower; while fewer do, faster: the simulator shares the cores among the ranks
    # computing at each moment (`CoreSharing`).
    host_cores: int | None = None
    measured_ranks: int = 1
    # The optimizer step's temporaries (after the backward, when activations are gone): bytes =
    # optimizer_transient[0] x parameter bytes the rank updates (its shard with ZeRO-1) + optimizer_transient[1]
    # x the largest parameter tensor of the stage (range_largest_param_bytes; 0 when None). A stage's peak is the
    # larger of its forward/backward peak and parameter state + these temporaries.
    optimizer_transient: tuple[float, float] = (0.0, 0.0)
    range_largest_param_bytes: list[list[float]] | None = None
    # > 0: the optimizer steps a rank's parameters in chunks of at most this many bytes (a larger tensor alone), so
    # the temporaries proportional to the parameters (optimizer_transient[0]) cover the largest chunk only:
    # min(parameter bytes updated, max(optimizer_chunk_bytes, the largest tensor)). 0: all of them at once.
    optimizer_chunk_bytes: float = 0.0
    # Parameters used by several blocks (tied weights): (bytes, blocks). When a plan puts those blocks on
    # different stages, every rank holding the parameter joins one gradient allreduce; the simulator and the
    # report charge it (the search does not).
    shared_params: tuple[tuple[float, tuple[int, ...]], ...] = ()
    # Interleaved 1F1B (a schedule in `schedules`): force the chunks (model chunks per position, >= 2; None: every
    # count from 2 up to the blocks per position, at most max_chunks).
    chunks: int | None = None
    max_chunks: int = 8
    # Final choice by the simulator: the search finds the least analytic step time exactly, then simulates, per
    # schedule, up to this many of the distinct candidates it met within SIMULATE_WINDOW of that schedule's best
    # (cheapest first; the analytic optimum always) and returns the one of least simulated step time (rendezvous
    # waits, unbalanced bubbles, shared-parameter allreduces, which the analytic sum leaves out). 0: the analytic
    # optimum, unsimulated.
    simulate_candidates: int = 0

    @property
    def links(self) -> Links:
        """The link fields of this problem."""
        return Links(*(getattr(self, name) for name in _LINK_FIELDS))

    def with_links(self, links: Links) -> PlanProblem:
        """This problem on other links, e.g. ``problem.with_links(get_device_profile("h100-80gb").planner_links())``."""
        return dataclasses.replace(self, **{name: getattr(links, name) for name in _LINK_FIELDS})


@dataclasses.dataclass(frozen=True)
class StagePlan:
    first_block: int
    last_block: int  # inclusive
    replicas: int
    ranks: list[int]
    microbatch_size: int  # largest per-replica microbatch
    fwd_time: float  # seconds per microbatch, compute only
    bwd_time: float
    comm_time: float  # seconds per microbatch: receive inputs + send outputs, forward and backward
    allreduce_time: float
    param_bytes: float
    activation_bytes: float  # activations held at peak (per microbatch x microbatches in flight)
    memory_bytes: float  # predicted peak per rank (chunked plans: the position's, on each of its chunks)
    recompute: bool = False  # activations recomputed in backward (bwd_time includes the extra forward)
    shard: ShardLevel = ShardLevel.NONE  # how the replicas divide parameter state (1 replica: NONE)
    bwd_weight_time: float = 0.0  # of bwd_time, the seconds of the W passes (zero bubble; 0: whole backwards)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard", ShardLevel(self.shard))  # ValueError for an unknown level


@dataclasses.dataclass(frozen=True)
class Plan:
    stages: list[StagePlan]
    microbatches: int
    schedule: Schedule
    predicted_step_time: float  # the simulator's step time when the search simulated its candidates
    global_batch: int
    world_size: int
    analytic_step_time: float | None = None  # the cost model's sum formula, when the simulator predicted
    # Model chunks per pipeline position (interleaved 1F1B). `stages` are then the virtual stages in pipeline
    # order, positions * chunks of them; virtual stage k runs on the ranks of position k % positions, so every
    # chunk of a position has the same ranks (`rannc.schedule.virtual_stage`).
    chunks: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", Schedule(self.schedule))  # ValueError for an unknown name

    @property
    def positions(self) -> int:
        """Pipeline positions (rank groups): the stages when there is one chunk per position."""
        return len(self.stages) // self.chunks

    def stage_of_rank(self, rank: int) -> int:
        """The first (virtual) stage `rank` runs: its position's chunk 0, whose index is the position's."""
        for index, stage in enumerate(self.stages):
            if rank in stage.ranks:
                return index
        raise KeyError(f"rank {rank} has no stage in this plan")

    def stages_of_rank(self, rank: int) -> list[int]:
        """Every (virtual) stage `rank` runs, in pipeline order: one per chunk of its position."""
        found = [index for index, stage in enumerate(self.stages) if rank in stage.ranks]
        if not found:
            raise KeyError(f"rank {rank} has no stage in this plan")
        return found

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> Plan:
        """Read a plan written by to_json (older files without newer optional fields included)."""
        stage_fields = {f.name for f in dataclasses.fields(StagePlan)}
        stages = [
            StagePlan(**{k: v for k, v in stage.items() if k in stage_fields}) for stage in data["stages"]
        ]
        fields = {f.name for f in dataclasses.fields(Plan)} - {"stages"}
        return Plan(stages=stages, **{k: data[k] for k in fields if k in data})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_replica_choices(world_size: int, gpus_per_node: int | None = None) -> tuple[int, ...]:
    """A compact set of replica counts for large clusters: 1..gpus_per_node, the divisors of the world size,
    the powers of two and three times the powers of two up to the world size (ascending).

    `plan_stages` is exact over the plans whose every stage has a replica count from this set; plans
    with other counts (say 13 replicas on 8-GPU nodes) are not considered.
    """
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    node = gpus_per_node if gpus_per_node is not None and gpus_per_node >= 1 else 1
    counts = set(range(1, min(node, world_size) + 1)) | set(_divisors(world_size))
    counts |= {c for k in range(world_size.bit_length()) for c in (2**k, 3 * 2**k) if c <= world_size}
    return tuple(sorted(counts))


def default_microbatch_choices(
    global_batch: int, min_microbatches: int = 1, max_microbatches: int = 32
) -> tuple[int, ...]:
    """A compact set of microbatch counts for large problems: powers of two, three times powers of
    two and the divisors of the global batch inside [min, max], plus both ends (ascending)."""
    low, high = max(1, min_microbatches), min(global_batch, max_microbatches)
    counts = {p for p in _divisors(global_batch) if low <= p <= high}
    power = 1
    while power <= high:
        counts |= {c for c in (power, 3 * power) if low <= c <= high}
        power *= 2
    if low <= high:
        counts |= {low, high}
    return tuple(sorted(counts))
