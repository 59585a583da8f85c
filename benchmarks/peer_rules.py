"""The rannc planner vs the stage-splitting rules of other pipeline systems, on one cost model.

Every model is built under torch.device("meta") (no weights are allocated), captured by rannc
(torch.export), cut into blocks and priced with rannc's analytic cost model
(`rannc.profile.analytic.analytic_block_profiles`: FLOPs / bytes roofline on a device profile), and the
`PlanProblem` is assembled by `rannc.problem.assemble_problem`, as `rannc plan` assembles its own (optimizer
step time and temporaries, the step's inputs and the device's links included). It is then solved

  * by rannc: `plan_stages(problem)`, its own choice of stage count, block ranges, per-stage replica
    counts and microbatch count (1F1B);
  * by the splitting rules of peers, each given a stage count S with equal replicas world / S (near
    equal when S does not divide the world size), the best microbatch count for that split (every
    allowed count is tried) and 1F1B:
      layers  equal transformer layers per stage, embedding with the first stage and the head with the
              last (torch.distributed.pipelining split points at layer boundaries, Megatron style)
      uniform equal block count per stage, every block counted, embedding and head included
              (DeepSpeed PipelineModule partition_method="uniform")
      params  contiguous ranges balancing parameter bytes (DeepSpeed partition_method="parameters":
              least possible largest part, parts filled greedily from the left)
      time    contiguous ranges balancing the per-block forward + backward time at the microbatch size
              in use (torchgpipe balance_by_time / balance_cost: least possible largest part)
    Every candidate is priced with `rannc.plan.evaluate` (the planner's own cost model), infeasible
    (over the memory limit) when no microbatch count fits.

Blocks: one per transformer layer, plus the non-layer code before, between (T5: encoder final norm +
decoder embedding) and after the layers (final norm, LM head and loss): the granularity the peers split
at, so every system chooses from the same block boundaries.

Columns, per rule: `@rannc S` the rule at rannc's stage count S with equal replicas (near equal, the first
stages one more, when S does not divide the world size W); `@S+reps` the rule's split at rannc's S with
rannc's own (unequal) replica counts, which separates the effect of the split from that of the replica
counts; `best S|W` the rule at its best stage count among the divisors of W (DeepSpeed and
torch.distributed.pipelining need W = stages x data-parallel degree); `any S` the best over every S
(near-equal replicas). Ratios are rannc / rule: below 1 rannc is faster. A rule can never beat rannc
(its candidates are in the planner's search space); the script warns if one does.

Memory scenarios (`--min-stages`, default 1,2,4): 1 = the device limit (16 GiB V100 less a 10% margin);
k > 1 = per model, a limit under which no plan with fewer than k stages fits (0.97 x the least memory any such
plan needs, or halfway down to the least memory of deeper plans when that is within 3%), i.e. the model is made
too large for fewer stages; when deeper pipelines need no less memory (a single huge block), the deepest stage
count that memory can force is used. Scenarios whose limit an earlier one already has are not repeated.

T5 11B (the issue's `rannc plan` case: 24 + 24 layers, d_ff 65536, 128 heads of 128) runs on its own cluster,
32 x A100 40 GiB (bfloat16), where the device limit already forces ~10 stages.

mT5-large is T5 with the multilingual 250k vocabulary (untied LM head, gated-GELU feed-forward): T5's encoder /
decoder asymmetry plus a head that takes about a tenth of the step's compute.

T5-3B (24 + 24 layers, d_ff 16384, 32 heads of 128) runs on the default cluster, whose device limit alone forces
about 5 stages: a heterogeneous model at its real size, with no synthetic memory limit.

Run:  python benchmarks/peer_rules.py           (GPT-2 250k vocab, T5-large, mT5-large, T5-3B, GPT-2 small, T5 11B;
                                                 ~2.5 min)
      python benchmarks/peer_rules.py --quick   (smaller models, ~30 s)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from rannc.capture import capture  # noqa: E402
from rannc.errors import PlanError  # noqa: E402
from rannc.graph.analysis import analyse, atomic_units  # noqa: E402
from rannc.graph.stage import block_graphs  # noqa: E402
from rannc.plan import PlanProblem, evaluate, minimum_memory_needed, plan_stages  # noqa: E402
from rannc.plan.cost import CostModel, microbatch_counts, replica_microbatch_size  # noqa: E402
from rannc.problem import assemble_problem, search_space  # noqa: E402
from rannc.profile.analytic import analytic_block_profiles  # noqa: E402
from rannc.profile.devices import DeviceProfile, get_device_profile  # noqa: E402
from rannc.schedule import Schedule  # noqa: E402

GIB = 2**30
RULES = ("layers", "uniform", "params", "time")
GOAL = 0.8  # the issue's target: rannc's predicted step <= 0.8 x the best peer rule's on heterogeneous models
Ranges = list[tuple[int, int]]


# ---- models ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "gpt2" | "t5"
    config: dict[str, Any]
    seq: int
    dec_seq: int = 0  # T5 decoder length
    global_batch: int = 64
    heterogeneous: bool = True
    cluster: tuple[str, float, int] | None = None  # (device profile, GiB, world) when not the command line's

    def describe(self) -> str:
        c = self.config
        if self.kind == "gpt2":
            return f"GPT-2 {c['n_layer']} x {c['n_embd']}, vocab {c['vocab_size']}, seq {self.seq}"
        return (
            f"T5 d_model {c['d_model']}, d_ff {c['d_ff']}, {c['num_layers']}+{c['num_decoder_layers']} layers, "
            f"vocab {c['vocab_size']}, seq {self.seq} enc / {self.dec_seq} dec"
        )


def gpt2_spec(name: str, layers: int, width: int, heads: int, vocab: int, seq: int, batch: int, het: bool):
    config = {"n_layer": layers, "n_embd": width, "n_head": heads, "vocab_size": vocab, "n_positions": seq}
    return ModelSpec(name, "gpt2", config, seq, global_batch=batch, heterogeneous=het)


def t5_spec(
    name: str,
    d_model: int,
    d_ff: int,
    heads: int,
    layers: int,
    seq: int,
    dec_seq: int,
    batch: int,
    d_kv: int = 0,
    cluster: tuple[str, float, int] | None = None,
    vocab: int = 32128,
    **extra: Any,
):
    config = {
        "d_model": d_model,
        "d_ff": d_ff,
        "d_kv": d_kv or d_model // heads,
        "num_heads": heads,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "vocab_size": vocab,
        **extra,
    }
    return ModelSpec(name, "t5", config, seq, dec_seq, global_batch=batch, cluster=cluster)


def full_models() -> list[ModelSpec]:
    return [
        gpt2_spec("gpt2-250k", 12, 768, 12, 250_000, 1024, 64, True),
        t5_spec("t5-large", 1024, 4096, 16, 24, 512, 128, 64),
        # mT5-large: the multilingual T5, 250k vocabulary with an untied head, gated-GELU feed-forward
        t5_spec(
            "mt5-large",
            1024,
            2816,
            16,
            24,
            512,
            128,
            64,
            vocab=250_112,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        ),
        # T5-3B (24 + 24 layers, d_ff 16384, 32 heads of 128) on the default cluster: its device limit alone
        # forces a pipeline, no synthetic limit needed
        t5_spec("t5-3b", 1024, 16384, 32, 24, 512, 128, 128, d_kv=128),
        gpt2_spec("gpt2-small", 12, 768, 12, 50_257, 1024, 64, False),
        # the issue's T5 case: 11B parameters on 32 x A100 40 GiB
        t5_spec("t5-11b", 1024, 65536, 128, 24, 512, 128, 128, d_kv=128, cluster=("a100-40gb", 40.0, 32)),
    ]


def quick_models() -> list[ModelSpec]:
    return [
        gpt2_spec("gpt2-128k-q", 6, 512, 8, 128_000, 512, 32, True),
        t5_spec("t5-small-q", 512, 2048, 8, 6, 256, 64, 32),
        gpt2_spec("gpt2-q", 6, 512, 8, 32_000, 512, 32, False),
    ]


def build(spec: ModelSpec) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    import transformers

    meta = torch.device("meta")
    if spec.kind == "gpt2":
        config = transformers.GPT2Config(**spec.config, use_cache=False)
        with meta:
            model = transformers.GPT2LMHeadModel(config)
        ids = torch.zeros(2, spec.seq, dtype=torch.long, device=meta)
        return model, {"input_ids": ids, "labels": ids}
    config = transformers.T5Config(**spec.config, use_cache=False, decoder_start_token_id=0, pad_token_id=0)
    with meta:
        model = transformers.T5ForConditionalGeneration(config)
    ids = torch.zeros(2, spec.seq, dtype=torch.long, device=meta)
    labels = torch.zeros(2, spec.dec_seq, dtype=torch.long, device=meta)
    return model, {"input_ids": ids, "labels": labels}


# ---- blocks: one per transformer layer + the code around the layers ----------------------------------------
_LAYER = re.compile(r"^(.*?\.(?:h|block|layers|layer)\.\d+)(?:\.|$)")


def _module_path(node: Any) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path and not path.startswith("_")]
    return paths[-1] if paths else ""


def layer_blocks(captured: Any, analysis: Any) -> tuple[list[list[str]], list[str]]:
    """Atomic units grouped by the transformer layer they belong to; the code outside layers between two
    groups of layers (or before / after all layers) forms its own block. Returns (blocks, labels)."""
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    keyed: list[tuple[str | None, list[str]]] = []
    for unit in atomic_units(analysis):
        key = None
        for name in unit:
            match = _LAYER.match(_module_path(nodes[name]))
            if match:
                key = match.group(1)
                break
        if keyed and keyed[-1][0] == key:
            keyed[-1][1].extend(unit)
        else:
            keyed.append((key, list(unit)))
    # code outside layers squeezed between two layers of the same stack belongs to the layer before it
    merged: list[tuple[str | None, list[str]]] = []
    for index, (key, unit) in enumerate(keyed):
        if key is None and merged and merged[-1][0] is not None and index + 1 < len(keyed):
            after = keyed[index + 1][0]
            if after is not None and after.rsplit(".", 1)[0] == merged[-1][0].rsplit(".", 1)[0]:
                merged[-1][1].extend(unit)
                continue
        if merged and merged[-1][0] == key:
            merged[-1][1].extend(unit)
        else:
            merged.append((key, unit))
    labels = []
    for index, (key, _) in enumerate(merged):
        if key is not None:
            labels.append(key)
        else:
            labels.append("pre" if index == 0 else "post" if index == len(merged) - 1 else "mid")
    return [unit for _, unit in merged], labels


# ---- the planning problem ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    device: DeviceProfile
    dtype: str
    world: int
    memory_limit: float  # usable bytes per device
    max_microbatches: int
    recompute: bool
    scenarios: tuple[int, ...]  # per scenario: the fewest stages the memory limit forces (1 = device limit)

    def describe(self) -> str:
        d = self.device
        return (
            f"device {d.name} ({self.dtype} compute at {d.flop_rate(self.dtype) / 1e12:.0f} TFLOP/s achievable, "
            f"{d.byte_rate() / 1e9:.0f} GB/s), {self.world} ranks on {d.gpus_per_node}-GPU nodes "
            f"(p2p {d.intra_node_bandwidth / 1e9:.0f} GB/s in a node, {d.inter_node_bandwidth / 1e9:.2f} GB/s across), "
            f"device memory {d.memory_bytes / GIB:.0f} GiB -> limit {self.memory_limit / GIB:.2f} GiB, fp32 weights + grads + Adam "
            f"(16 B/param, no ZeRO; boundary tensors at their fp32 captured size), microbatches 1..{self.max_microbatches}, schedule 1F1B, activation "
            f"recompute {'allowed' if self.recompute else 'off'}"
        )


@dataclasses.dataclass
class Built:
    spec: ModelSpec
    problem: PlanProblem
    labels: list[str]
    block_params: list[float]  # parameter bytes per block
    seconds: float
    need: dict[int, float]  # least memory per device of a plan with exactly S stages (no limit)


def make_problem(spec: ModelSpec, settings: Settings) -> Built:
    started = time.perf_counter()
    model, kwargs = build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture(model, (), kwargs)
    analysis = analyse(captured)
    blocks, labels = layer_blocks(captured, analysis)
    graphs = block_graphs(captured, analysis, blocks)
    batch, world = spec.global_batch, settings.world
    space = search_space(
        world_size=world,
        global_batch=batch,
        memory_limit_bytes=settings.memory_limit,
        schedules=(Schedule.ONE_F_ONE_B,),
        max_microbatches=settings.max_microbatches,
        allow_recompute=settings.recompute,
        gpus_per_node=settings.device.gpus_per_node,
    )
    profiles = analytic_block_profiles(
        captured, analysis, blocks, space.profile_sizes(), settings.device, settings.dtype, graphs=graphs
    )
    links = settings.device.planner_links()
    problem = assemble_problem(captured, analysis, blocks, graphs, profiles, space, links, settings.device)
    # Ranked on the cost model's step time, as every rule's candidates are (not re-ranked by the simulator).
    problem = dataclasses.replace(problem, simulate_candidates=0)
    block_params = [problem.range_param_bytes[i][i] for i in range(len(blocks))]
    free = dataclasses.replace(problem, memory_limit_bytes=None)
    need = {}  # least memory per device of any plan with exactly S stages
    for count in range(1, min(world, len(blocks)) + 1):
        try:
            need[count] = minimum_memory_needed(dataclasses.replace(free, num_stages=count))
        except PlanError:
            pass
    return Built(spec, problem, labels, block_params, time.perf_counter() - started, need)


def scenario_limit(built: Built, settings: Settings, min_stages: int) -> tuple[float, str]:
    """The device limit, lowered (if needed) to a limit under which no plan with fewer than `min_stages` stages
    fits but one with more does: 0.97 x the least memory of any plan with fewer stages, or halfway down to the
    least memory with more when those are within 3% of each other. When deeper pipelines do not need less
    memory at all, the largest stage count that memory can force is used instead."""
    device = settings.memory_limit
    if min_stages <= 1:
        return device, "device limit"
    need = built.need
    for forced in range(min_stages, 1, -1):
        fewer = [v for k, v in need.items() if k < forced]
        more = [v for k, v in need.items() if k >= forced]
        if fewer and more and min(more) < min(fewer):
            limit = max(0.97 * min(fewer), (min(more) + min(fewer)) / 2)
            if limit >= device:
                return device, f"device limit, which already forces >= {forced} stages"
            note = "" if forced == min_stages else f" ({min_stages} cannot be forced)"
            return limit, f"forces >= {forced} stages{note}"
    return device, "device limit (no stage count can be forced)"


# ---- splitting rules ---------------------------------------------------------------------------------------
def sizes_to_ranges(sizes: list[int]) -> Ranges:
    ranges, first = [], 0
    for size in sizes:
        ranges.append((first, first + size - 1))
        first += size
    return ranges


def equal_counts(count: int, parts: int) -> list[int]:
    """`count` items in `parts` near-equal contiguous parts, the first ones larger (DeepSpeed uniform)."""
    return [count // parts + (1 if p < count % parts else 0) for p in range(parts)]


def split_uniform(weights: list[float], parts: int) -> Ranges | None:
    if parts > len(weights):
        return None
    return sizes_to_ranges(equal_counts(len(weights), parts))


def split_layers(labels: list[str], parts: int) -> Ranges | None:
    """Equal transformer layers per stage; code before the first layer goes with it, code after a layer
    (between stacks, or the final norm / head / loss) with the layer before it."""
    layer_at = [i for i, label in enumerate(labels) if label not in ("pre", "mid", "post")]
    if parts > len(layer_at):
        return None
    groups: list[int] = []  # blocks per layer, with the non-layer blocks attached to it
    for k, start in enumerate(layer_at):
        end = layer_at[k + 1] if k + 1 < len(layer_at) else len(labels)
        groups.append(end - (0 if k == 0 else start))
    sizes = []
    index = 0
    for count in equal_counts(len(layer_at), parts):
        sizes.append(sum(groups[index : index + count]))
        index += count
    return sizes_to_ranges(sizes)


def least_max_part(weights: list[float], parts: int) -> float:
    """Smallest possible largest part sum over contiguous splits into `parts` non-empty parts (exact DP)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    best = [prefix[e] for e in range(n + 1)]  # one part covering items 0..e-1
    best[0] = math.inf
    for k in range(2, parts + 1):
        new = [math.inf] * (n + 1)
        for e in range(k, n + 1):
            new[e] = min(max(best[s], prefix[e] - prefix[s]) for s in range(k - 1, e))
        best = new
    return best[n]


def split_balanced(weights: list[float], parts: int) -> Ranges | None:
    """Contiguous split whose largest part is as small as possible; parts filled greedily from the left
    (each takes as many items as fit under that bound, leaving one item for every later part)."""
    n = len(weights)
    if parts > n:
        return None
    bound = least_max_part(weights, parts) * (1 + 1e-12)
    sizes, index = [], 0
    for p in range(parts):
        left = parts - p - 1
        total, size = 0.0, 0
        while index + size < n - left and (size == 0 or total + weights[index + size] <= bound):
            total += weights[index + size]
            size += 1
        if p == parts - 1:
            size = n - index
        sizes.append(size)
        index += size
    return sizes_to_ranges(sizes)


def equal_replicas(world: int, parts: int) -> list[int]:
    return equal_counts(world, parts)


@dataclasses.dataclass(frozen=True)
class Candidate:
    time: float
    stages: int
    ranges: Ranges
    replicas: list[int]
    microbatches: int


def best_for_split(
    problem: PlanProblem,
    model: CostModel,
    splitter: Callable[[int], Ranges | None],
    replicas: list[int],
) -> Candidate | None:
    """Best microbatch count for one rule and replica vector; `splitter(m)` gives the ranges for
    per-replica microbatch size m (only the time rule depends on it)."""
    best: Candidate | None = None
    for p in microbatch_counts(problem):
        ranges = splitter(replica_microbatch_size(problem.global_batch, p, max(replicas)))
        if ranges is None or len(ranges) != len(replicas):
            continue
        result = evaluate(problem, ranges, replicas, p, "1f1b", model)
        if result is not None and (best is None or result[0] < best.time):
            best = Candidate(result[0], len(ranges), ranges, list(replicas), p)
    return best


def rule_splitter(
    rule: str, built: Built, problem: PlanProblem, parts: int
) -> Callable[[int], Ranges | None]:
    if rule == "layers":
        fixed = split_layers(built.labels, parts)
        return lambda m: fixed
    if rule == "uniform":
        fixed = split_uniform(built.block_params, parts)
        return lambda m: fixed
    if rule == "params":
        fixed = split_balanced(built.block_params, parts)
        return lambda m: fixed
    cache: dict[int, Ranges | None] = {}

    def by_time(m: int) -> Ranges | None:
        if m not in cache:
            weights = [b.at(b.fwd_time, m) + b.at(b.bwd_time, m) for b in problem.blocks]
            cache[m] = split_balanced(weights, parts)
        return cache[m]

    return by_time


# ---- comparison and report --------------------------------------------------------------------------------
@dataclasses.dataclass
class Comparison:
    limit: float
    note: str
    rannc: Candidate | None
    plan_s: float
    recomputed: int
    # per rule: at rannc's S, at rannc's S with rannc's replicas, best S | world, best S (any)
    rules: dict[str, tuple[Candidate | None, ...]]
    unlimited: float  # step time of the best plan with no memory limit: no plan under this limit is faster
    work: float  # every rank busy all step (no bubble, no communication): no schedule at all is faster

    def floor_ratio(self, index: int) -> float | None:
        """The least ratio any plan in the search space could reach against the best peer (`index` as in
        best_peer): the memory-free optimum over that peer's time."""
        peer = self.best_peer(index)
        return None if peer is None else self.unlimited / peer[1].time

    def best_peer(self, index: int) -> tuple[str, Candidate] | None:
        found = [(r, v[index]) for r, v in self.rules.items() if v[index] is not None]
        return min(found, key=lambda x: x[1].time) if found else None


def work_bound(problem: PlanProblem) -> float:
    """Least step time of any plan with any schedule: each sample's forward and backward through every block
    done once, at that block's cheapest per-sample cost over the profiled microbatch sizes, spread evenly over
    all ranks with no bubble, no communication and no optimizer update."""
    per_sample = sum(min((b.fwd_time[m] + b.bwd_time[m]) / m for m in b.fwd_time) for b in problem.blocks)
    return per_sample * problem.global_batch / problem.world_size


def compare(built: Built, settings: Settings, min_stages: int) -> Comparison:
    limit, note = scenario_limit(built, settings, min_stages)
    problem = dataclasses.replace(built.problem, memory_limit_bytes=limit)
    model = CostModel(problem)
    started = time.perf_counter()
    try:
        plan = plan_stages(problem)
    except PlanError:
        plan = None
    plan_s = time.perf_counter() - started
    ranc = (
        None
        if plan is None
        else Candidate(
            plan.predicted_step_time,
            len(plan.stages),
            [(s.first_block, s.last_block) for s in plan.stages],
            [s.replicas for s in plan.stages],
            plan.microbatches,
        )
    )
    recomputed = 0 if plan is None else sum(getattr(s, "recompute", False) for s in plan.stages)
    world = settings.world
    divisors = [k for k in range(1, min(world, len(problem.blocks)) + 1) if world % k == 0]
    rules: dict[str, tuple[Candidate | None, ...]] = {}
    for rule in RULES:
        at_s = with_reps = None
        if ranc is not None:
            split = rule_splitter(rule, built, problem, ranc.stages)
            at_s = best_for_split(problem, model, split, equal_replicas(world, ranc.stages))
            with_reps = best_for_split(problem, model, split, ranc.replicas)
        best: Candidate | None = None
        best_any: Candidate | None = None
        for count in range(1, min(world, len(problem.blocks)) + 1):
            split = rule_splitter(rule, built, problem, count)
            found = best_for_split(problem, model, split, equal_replicas(world, count))
            if found is None:
                continue
            if count in divisors and (best is None or found.time < best.time):
                best = found
            if best_any is None or found.time < best_any.time:
                best_any = found
        rules[rule] = (at_s, with_reps, best, best_any)
    # a tighter limit only removes plans, so the memory-free optimum bounds every plan under this one
    unlimited = plan_stages(dataclasses.replace(problem, memory_limit_bytes=None)).predicted_step_time
    return Comparison(limit, note, ranc, plan_s, recomputed, rules, unlimited, work_bound(problem))


def fmt_ms(c: Candidate | None) -> str:
    return "infeasible" if c is None else f"{1e3 * c.time:.1f} ms"


def fmt_plan(c: Candidate | None) -> str:
    if c is None:
        return ""
    ranges = " ".join(f"{i}-{j}" for i, j in c.ranges)
    return f"S={c.stages} reps={c.replicas} P={c.microbatches} blocks {ranges}"


def fmt_ratio(ranc: Candidate | None, c: Candidate | None) -> str:
    return "-" if ranc is None or c is None else f"{ranc.time / c.time:.3f}"


def print_model(built: Built, settings: Settings, comparisons: list[Comparison]) -> None:
    spec, problem = built.spec, built.problem
    params = problem.range_param_bytes[0][-1] / 4
    m = max(problem.blocks[0].fwd_time)
    work = [b.fwd_time[m] + b.bwd_time[m] for b in problem.blocks]
    heavy = sorted(range(len(work)), key=lambda i: -work[i])[:3]
    print(f"\n== {spec.name}: {spec.describe()}, global batch {spec.global_batch}")
    print(
        f"   {len(problem.blocks)} blocks ({built.labels[0]}, {built.labels[1]}, ..., {built.labels[-1]}), "
        f"{params / 1e6:.0f}M params, built in {built.seconds:.0f}s; largest shares of fwd+bwd time: "
        + ", ".join(f"{built.labels[i]} {work[i] / sum(work):.0%}" for i in heavy)
    )
    print(
        "   least memory per device by stage count (GiB): "
        + ", ".join(f"S={k}: {v / GIB:.2f}" for k, v in sorted(built.need.items())[:8])
        + (" ..." if len(built.need) > 8 else "")
    )
    for comp in comparisons:
        print(f"   -- memory limit {comp.limit / GIB:.2f} GiB ({comp.note})")
        if comp.rannc is None:
            print("      rannc: no plan fits")
        else:
            print(
                f"      rannc   {fmt_ms(comp.rannc):>10}  {fmt_plan(comp.rannc)}  (plan_stages {comp.plan_s:.1f}s"
                + (f", {comp.recomputed} stage(s) recompute)" if comp.recomputed else ")")
            )
        print(
            f"      {'rule':<7} {'@rannc S':>10} {'ratio':>6} {'@S+reps':>10} {'best S|W':>10} {'ratio':>6} "
            f"{'any S':>10} {'ratio':>6}  plan of best S|W"
        )
        for rule, (at_s, with_reps, best, best_any) in comp.rules.items():
            print(
                f"      {rule:<7} {fmt_ms(at_s):>10} {fmt_ratio(comp.rannc, at_s):>6} {fmt_ms(with_reps):>10} "
                f"{fmt_ms(best):>10} {fmt_ratio(comp.rannc, best):>6} {fmt_ms(best_any):>10} "
                f"{fmt_ratio(comp.rannc, best_any):>6}  {fmt_plan(best)}"
            )
        for label, index in (("at rannc's S", 0), ("at each rule's best S | W", 2), ("at any S", 3)):
            peer = comp.best_peer(index)
            if peer is None:
                print(f"      rannc / best peer {label}: every rule infeasible")
            else:
                print(
                    f"      rannc / best peer {label}: {fmt_ratio(comp.rannc, peer[1])} "
                    f"({peer[0]}, {fmt_ms(peer[1])})"
                )
        print(
            f"      floors: best plan with no memory limit {1e3 * comp.unlimited:.1f} ms (any split, replicas, "
            f"microbatches, schedule); all ranks busy all step {1e3 * comp.work:.1f} ms (any schedule)"
        )
        for label, index in (("at rannc's S", 0), ("at each rule's best S | W", 2)):
            peer = comp.best_peer(index)
            if peer is None:
                continue
            target = GOAL * peer[1].time
            reach = (
                "within reach"
                if comp.unlimited <= target
                else "out of reach for every plan in the search space"
                if comp.work <= target
                else "out of reach for every plan and schedule"
            )
            print(
                f"      {GOAL} x best peer {label} = {1e3 * target:.1f} ms: {reach} "
                f"(least possible ratio {comp.floor_ratio(index):.3f})"
            )
        if comp.rannc is not None:
            beaten = [
                r
                for r, v in comp.rules.items()
                for c in v
                if c is not None and c.time < comp.rannc.time * (1 - 1e-9)
            ]
            if beaten:
                print(
                    f"      WARNING: rule(s) {sorted(set(beaten))} beat the planner: it is not optimal here"
                )


def cluster_settings(settings: Settings, device: str, memory_gib: float, world: int) -> Settings:
    """`settings` on another cluster: device profile, memory per device (same margin) and world size."""
    profile = dataclasses.replace(get_device_profile(device), memory_bytes=memory_gib * GIB)
    usable = settings.memory_limit / settings.device.memory_bytes
    return dataclasses.replace(
        settings,
        device=profile,
        dtype=default_dtype(profile),
        world=world,
        memory_limit=memory_gib * GIB * usable,
    )


def default_dtype(profile: DeviceProfile) -> str:
    """float16 on V100s (no bfloat16 tensor cores), else bfloat16."""
    return "float16" if profile.name.startswith("v100") else "bfloat16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models (well under a minute)")
    parser.add_argument("--device", default="v100-32gb", help="device profile (default v100-32gb)")
    parser.add_argument("--memory-gib", type=float, default=16.0, help="device memory in GiB (default 16)")
    parser.add_argument(
        "--margin", type=float, default=0.1, help="fraction of memory held back (default 0.1)"
    )
    parser.add_argument(
        "--dtype", default=None, help="compute dtype (default: float16 on V100, else bfloat16)"
    )
    parser.add_argument("--world", type=int, default=16, help="ranks (default 16)")
    parser.add_argument("--max-microbatches", type=int, default=32)
    parser.add_argument("--recompute", action="store_true", help="allow activation recompute (for everyone)")
    parser.add_argument(
        "--min-stages",
        default="1,2,4",
        help="memory scenarios, comma-separated: per model, lower the memory limit until no plan with fewer "
        "stages than this fits (1 = the device limit; default 1,2,4)",
    )
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names")
    args = parser.parse_args(argv)
    device = dataclasses.replace(get_device_profile(args.device), memory_bytes=args.memory_gib * GIB)
    dtype = args.dtype or default_dtype(device)
    scenarios = tuple(int(x) for x in args.min_stages.split(","))
    settings = Settings(
        device,
        dtype,
        args.world,
        args.memory_gib * GIB * (1 - args.margin),
        args.max_microbatches,
        args.recompute,
        scenarios,
    )
    specs = quick_models() if args.quick else full_models()
    if args.models:
        specs = [s for s in specs if s.name in set(args.models.split(","))]
    print("settings: " + settings.describe())
    print(
        "every time below is the planner's predicted step time (rannc.plan.evaluate) of one candidate; ratio ="
        " rannc / rule (< 1: rannc faster)"
    )
    started = time.perf_counter()
    rows = []
    for spec in specs:
        own = settings if spec.cluster is None else cluster_settings(settings, *spec.cluster)
        if own is not settings:
            print(f"\n{spec.name} runs on its own cluster: " + own.describe())
        built = make_problem(spec, own)
        # scenarios whose limit an earlier one already has (e.g. the device limit forces enough stages) are dropped
        kept: dict[float, int] = {}
        for k in scenarios:
            kept.setdefault(scenario_limit(built, own, k)[0], k)
        comparisons = [compare(built, own, k) for k in kept.values()]
        print_model(built, own, comparisons)
        rows.extend((spec, k, c) for k, c in zip(kept.values(), comparisons))
    print("\n== summary: rannc vs the best peer rule (ratio = rannc / peer; < 1: rannc faster)")
    print(
        f"   {'model':<12} {'kind':<5} {'limit':>8} {'rannc':>9} {'rannc plan':<24} "
        f"{'peer @S':>10} {'rule':<7} {'ratio':>6} {'best S|W':>10} {'rule':<7} {'S':>2} {'ratio':>6} "
        f"{'any S':>10} {'rule':<7} {'S':>2} {'ratio':>6} {'floor':>6}"
    )
    for spec, _, comp in rows:
        ranc = comp.rannc
        plan = (
            "-"
            if ranc is None
            else f"S={ranc.stages} P={ranc.microbatches} r={','.join(map(str, ranc.replicas))}"
        )
        line = (
            f"   {spec.name:<12} {'het' if spec.heterogeneous else 'homog':<5} {comp.limit / GIB:>5.2f}GiB "
            f"{fmt_ms(ranc):>9} {plan[:24]:<24}"
        )
        for index in (0, 2, 3):
            peer = comp.best_peer(index)
            rule, c = peer if peer is not None else ("-", None)
            stages = "" if index == 0 else f" {'-' if c is None else c.stages:>2}"
            line += f" {fmt_ms(c):>10} {rule:<7}{stages} {fmt_ratio(ranc, c):>6}"
        floor = comp.floor_ratio(2)
        print(line + f" {'-' if floor is None else f'{floor:.3f}':>6}")
    print(
        "   floor: the least ratio any plan could reach against the best peer at its best S | W (the best plan with"
        " no memory limit, over that peer's time): above "
        f"{GOAL}, the goal is out of reach on this cost model whatever the planner does"
    )
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
