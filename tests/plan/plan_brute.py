"""Brute-force reference for the stage search: every candidate, the cost model from its definition, instances."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

from rannc.plan import BlockProfile, PlanProblem, interpolate
from rannc.plan import cost as cost_module
from rannc.plan.types import default_replica_choices
from rannc.schedule import Schedule


def compositions(total: int, parts: int):
    """Every way to write `total` as an ordered sum of `parts` positive integers."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def _stage_counts(problem: PlanProblem) -> list[int]:
    num_blocks, world = len(problem.blocks), problem.world_size
    if problem.num_stages is not None:
        return [problem.num_stages] if problem.num_stages <= min(num_blocks, world) else []
    return list(range(1, min(num_blocks, world) + 1))


def brute_force(problem: PlanProblem, ignore_memory: bool = False):
    """Every feasible candidate as (step time, key, (ranges, replicas, P, schedule, recompute), max memory).

    Every stage count, block split, replica split, microbatch count, schedule and (when allowed)
    every vector of per-stage recompute flags. Costs come from `evaluate`'s stage costs (checked
    against the definition by test_evaluate_matches_reference), cached per stage.
    """
    if ignore_memory:
        problem = dataclasses.replace(problem, memory_limit_bytes=None)
    num_blocks, world = len(problem.blocks), problem.world_size
    counts = cost_module.microbatch_counts(problem)
    model = cost_module.CostModel(problem)
    limit = problem.memory_limit_bytes
    cache: dict = {}

    def stage(first, last, r, p, inflight, recompute, links, pending):
        key = (first, last, r, p, inflight, recompute, links, pending)
        cost = cache.get(key)
        if cost is None:
            cost = cache[key] = model.stage(first, last, r, p, inflight, recompute, links, pending=pending)
        return cost

    flags = [False, True] if problem.allow_recompute else [False]
    out = []
    for count in _stage_counts(problem):
        for sizes in compositions(num_blocks, count):
            ranges, first = [], 0
            for size in sizes:
                ranges.append((first, first + size - 1))
                first += size
            for replicas in compositions(world, count):
                links = cost_module.stage_links(problem, replicas)
                for p in counts:
                    allowed = set(cost_module.replica_counts(problem, p))
                    if any(r not in allowed for r in replicas):
                        continue
                    for rank, schedule in enumerate(problem.schedules):
                        held = [held_by_definition(schedule, p, count, s) for s in range(count)]
                        for recompute in itertools.product(flags, repeat=count):
                            costs = [
                                stage(i, j, r, p, q, c, link, pending)
                                for (i, j), r, (q, pending), c, link in zip(
                                    ranges, replicas, held, recompute, links
                                )
                            ]
                            memory = max(c.memory for c in costs)
                            if limit is not None and memory > limit:
                                continue
                            total = step_by_definition(
                                schedule,
                                [c.time for c in costs],
                                [c.allreduce for c in costs],
                                [c.bwd_weight for c in costs],
                                p,
                            )
                            key = (count, p, rank, ranges, replicas, recompute)
                            out.append((total, key, (ranges, replicas, p, schedule, list(recompute)), memory))
    return out


def held_by_definition(schedule: str, p: int, stages: int, s: int) -> tuple[int, int]:
    """(microbatches in flight at stage s's peak, microbatches keeping deferred gradients there): 1F1B holds
    those of the stages from s on, fill-drain all, zero bubble (ZB-H1) 1F1B's first stage's at every stage and
    defers s W passes at stage s."""
    if schedule == "1f1b":
        return min(p, stages - s), 0
    if schedule == "zero_bubble":
        return min(p, stages), min(p, s + 1)
    return p, 0


def step_by_definition(
    schedule: str, times: list[float], allreduces: list[float], weights: list[float], p: int
) -> float:
    """T = sum t_s + (P - 1) max t_s + max AR_s; zero bubble: sum max(t_s - 2 W_s, 0) + (P - 1) max t_s +
    max (AR_s + 2 W_s)."""
    if schedule != "zero_bubble":
        return sum(times) + (p - 1) * max(times) + max(allreduces)
    paths = [max(t - 2.0 * w, 0.0) for t, w in zip(times, weights)]
    return sum(paths) + (p - 1) * max(times) + max(a + 2.0 * w for a, w in zip(allreduces, weights))


def with_zero_bubble(problem: PlanProblem, seed: int) -> PlanProblem:
    """Half the time: `problem` with zero bubble among its schedules (at a random place) and W-pass seconds and
    deferred gradient bytes on its blocks. Its own generator: the instance's other draws stay as they were."""
    rng = random.Random(777_000 + seed)
    if rng.random() < 0.5:
        return problem
    blocks = [
        dataclasses.replace(
            b,
            bwd_weight={m: t * rng.choice([0.0, 0.3, rng.uniform(0, 1)]) for m, t in b.bwd_time.items()},
            deferred_grad_bytes=random_table(rng, 5e6) if rng.random() < 0.7 else {},
        )
        for b in problem.blocks
    ]
    schedules = list(problem.schedules)
    schedules.insert(rng.randint(0, len(schedules)), Schedule.ZERO_BUBBLE)
    return dataclasses.replace(problem, blocks=blocks, schedules=tuple(schedules))


def brute_best(problem: PlanProblem, candidates: list | None = None):
    """Least step time and the candidate the tie-break rules pick among the near-ties (fewest
    stages, then microbatches, schedule order, block ranges, replicas, recompute flags).
    `candidates`: brute_force of the problem without its memory limit, when at hand."""
    if candidates is None:
        found = brute_force(problem)
    else:
        limit = problem.memory_limit_bytes
        found = [f for f in candidates if limit is None or f[3] <= limit]
    if not found:
        return None
    best = min(f[0] for f in found)
    near = [f for f in found if f[0] <= best * (1 + 1e-11)]
    return best, min(near, key=lambda f: f[1])


def brute_min_memory(problem: PlanProblem) -> float:
    return min(f[3] for f in brute_force(problem, ignore_memory=True))


def random_table(rng: random.Random, scale: float) -> dict[int, float]:
    points = rng.sample(range(1, 17), rng.randint(1, 3))
    return {m: rng.uniform(0.0, scale) * (m if rng.random() < 0.5 else 1 + m**0.5) for m in points}


def random_problem(seed: int) -> PlanProblem:
    rng = random.Random(seed)
    num_blocks, world, batch = rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 16)
    blocks = [
        BlockProfile(
            fwd_time=random_table(rng, 1e-3),
            bwd_time=random_table(rng, 2e-3),
            activation_bytes=random_table(rng, 1e6),
        )
        for _ in range(num_blocks)
    ]
    if rng.random() < 0.5:  # transient workspace, held once per stage (largest block)
        blocks = [dataclasses.replace(b, workspace_bytes=random_table(rng, 3e6)) for b in blocks]
    per_block = [rng.uniform(0, 1e8) for _ in range(num_blocks)]
    boundary = [rng.choice([0.0, rng.uniform(0, 1e5)]) for _ in range(num_blocks + 1)]
    params = [[0.0] * num_blocks for _ in range(num_blocks)]
    ins = [[0.0] * num_blocks for _ in range(num_blocks)]
    outs = [[0.0] * num_blocks for _ in range(num_blocks)]
    for i in range(num_blocks):
        for j in range(i, num_blocks):
            params[i][j] = sum(per_block[i : j + 1]) * rng.uniform(0.8, 1.0)
            ins[i][j] = 0.0 if i == 0 else boundary[i] + rng.choice([0.0, 100.0])
            outs[i][j] = 0.0 if j == num_blocks - 1 else boundary[j + 1]
    schedules = rng.choice([("1f1b",), ("fill_drain",), ("1f1b", "fill_drain"), ("fill_drain", "1f1b")])
    problem = PlanProblem(
        blocks=blocks,
        range_param_bytes=params,
        range_in_bytes_per_sample=ins,
        range_out_bytes_per_sample=outs,
        world_size=world,
        global_batch=batch,
        opt_param_factor=rng.choice([0.0, 2.0]),
        zero_optimizer=rng.random() < 0.3,
        p2p_bandwidth=rng.uniform(1e9, 2e10),
        p2p_latency=rng.uniform(0, 1e-4),
        allreduce_bandwidth=rng.uniform(1e9, 2e10),
        allreduce_latency=rng.uniform(0, 1e-4),
        min_microbatches=rng.choice([1, 1, 1, 2, 3]),
        max_microbatches=rng.choice([1, 4, 8, 32]),
        schedules=schedules,
        num_stages=rng.choice([None, None, None, rng.randint(1, 5)]),
    )
    problem = with_zero_bubble(problem, seed)
    if rng.random() < 0.7:
        candidates = brute_force(problem, ignore_memory=True)
        if candidates:
            memories = sorted(f[3] for f in candidates)
            limit = rng.choice(memories) * rng.choice([0.9, 1.0, 1.0, 1.1])
            problem = dataclasses.replace(problem, memory_limit_bytes=limit)
    return problem


def reference_cost(problem: PlanProblem, ranges, replicas, p: int, schedule: str, recompute=None):
    """The cost model written out from its definition, independently of rannc.plan.cost.

    recompute=None: each stage recomputes exactly when it must to fit (and recompute is allowed)."""
    batch, stages, world = problem.global_batch, len(ranges), problem.world_size
    if not (1 <= p <= batch and problem.min_microbatches <= p <= problem.max_microbatches):
        return None
    if problem.microbatch_choices is not None and p not in problem.microbatch_choices:
        return None
    if any(r > batch // p or r > world for r in replicas):
        return None
    if problem.replica_choices is not None and any(r not in problem.replica_choices for r in replicas):
        return None
    if recompute is not None and any(recompute) and not problem.allow_recompute:
        return None
    g = problem.gpus_per_node
    starts = [sum(replicas[:s]) for s in range(stages + 1)]

    def node(rank: int) -> int:
        return 0 if g is None else rank // g

    def send(n: float, inter: bool) -> float:
        if n == 0:
            return 0.0
        if inter:
            lat = problem.p2p_latency if problem.inter_node_latency is None else problem.inter_node_latency
            bw = (
                problem.p2p_bandwidth
                if problem.inter_node_bandwidth is None
                else problem.inter_node_bandwidth
            )
            return lat + n / bw
        return problem.p2p_latency + n / problem.p2p_bandwidth

    limit = problem.memory_limit_bytes
    times, allreduces, weights = [], [], []
    for s, ((i, j), r) in enumerate(zip(ranges, replicas)):
        m = math.ceil(math.ceil(batch / p) / r)
        blocks = problem.blocks[i : j + 1]
        fwd = sum(interpolate(b.fwd_time, m) for b in blocks)
        bwd = sum(interpolate(b.bwd_time, m) for b in blocks)
        act = sum(interpolate(b.activation_bytes, m) for b in blocks)
        weight = sum(
            min(interpolate(b.bwd_weight, m), interpolate(b.bwd_time, m)) if b.bwd_weight else 0.0
            for b in blocks
        )
        deferred = sum(
            interpolate(b.deferred_grad_bytes, m) if b.deferred_grad_bytes else 0.0 for b in blocks
        )
        # Block k's workspace, plus the parameter gradients of the stage's blocks after k (alive until the
        # stage's backward of the microbatch ends), less the microbatch's activations of those blocks (freed by
        # their backward); not modelled when no block has workspace figures.
        workspace = 0.0
        if any(b.workspace_bytes for b in problem.blocks):
            prefix = problem.range_param_bytes[i]
            acts = [interpolate(b.activation_bytes, m) for b in blocks]
            # params(k+1..j) - act(k+1..j) = offset(j) - offset(k), offset(k) = params(i..k) - act(i..k)
            offset = [prefix[k] - sum(acts[: k - i + 1]) for k in range(i, j + 1)]
            workspace = (
                max(
                    (interpolate(b.workspace_bytes, m) if b.workspace_bytes else 0.0) - offset[k - i]
                    for k, b in zip(range(i, j + 1), blocks)
                )
                + offset[-1]
            )
        ins = problem.range_in_bytes_per_sample[i][j] * m
        outs = problem.range_out_bytes_per_sample[i][j] * m
        # Consecutive stages s-1, s (and s, s+1) talk intra-node only when both lie in one node.
        in_inter = s > 0 and node(starts[s - 1]) != node(starts[s + 1] - 1)
        out_inter = s < stages - 1 and node(starts[s]) != node(starts[s + 2] - 1)
        params = problem.range_param_bytes[i][j]
        inflight, pending = held_by_definition(schedule, p, stages, s)
        shards = r if problem.zero_optimizer else 1
        # Receive buffers (the current action's and one posted ahead) and workspace, plus the sends still held: the
        # input gradients of at most 2 microbatches (the runtime's send window), the outputs of as many when
        # recomputing, else of every microbatch in flight (and one more), whose graphs hold them.
        window = min(p, 2)
        base, io = (
            params * (2 + problem.opt_param_factor / shards) + problem.input_bytes,
            2 * (ins + outs) + workspace,
        )
        sent = window * ins + min(p, inflight + 1) * outs
        again_sent = window * ins + window * outs
        if pending:  # zero bubble: the microbatches between their I and W keep their deferred gradients
            plain = base + act * inflight + deferred * pending + io + sent
            # and I's rebuilt activations
            again = base + ins * inflight + (act + deferred) * pending + io + again_sent
        else:
            plain = base + act * inflight + io + sent
            again = base + ins * inflight + act + io + again_sent
        # The optimizer step's temporaries come after the activations are freed: the larger phase counts.
        largest = problem.range_largest_param_bytes[i][j] if problem.range_largest_param_bytes else 0.0
        updated = (
            params / shards
        )  # the optimizer's chunks: a chunk of at most optimizer_chunk_bytes (or one tensor)
        if problem.optimizer_chunk_bytes > 0:
            updated = min(updated, max(problem.optimizer_chunk_bytes, largest))
        step_end = base + updated * problem.optimizer_transient[0] + largest * problem.optimizer_transient[1]
        plain, again = max(plain, step_end), max(again, step_end)
        if recompute is not None:
            redo = recompute[s]
        else:
            redo = limit is not None and plain > limit and problem.allow_recompute
        memory = again if redo else plain
        if limit is not None and memory > limit:
            return None
        times.append(fwd + bwd + (fwd if redo else 0.0) + 2 * (send(ins, in_inter) + send(outs, out_inter)))
        weights.append(weight)
        update = params * (problem.update_seconds_per_param_byte / shards)
        if r == 1:
            allreduces.append(0.0 + update)
        else:
            spans = node(starts[s]) != node(starts[s] + r - 1)
            lat, bw = problem.allreduce_latency, problem.allreduce_bandwidth
            if spans and problem.allreduce_inter_latency is not None:
                lat = problem.allreduce_inter_latency
            if spans and problem.allreduce_inter_bandwidth is not None:
                bw = problem.allreduce_inter_bandwidth
            allreduces.append(lat + 2 * (r - 1) / r * params / bw + update)
    return step_by_definition(schedule, times, allreduces, weights, p)


def medium_problem(seed: int) -> PlanProblem:
    """Up to 9 blocks and 6 ranks with realistic shapes, so that the search's pruning matters."""
    rng = random.Random(seed)
    num_blocks, world = rng.randint(5, 9), rng.randint(3, 6)
    blocks = []
    for _ in range(num_blocks):
        f = rng.uniform(0.5e-3, 2e-3)
        curve = rng.choice([1.0, 0.7])  # sub-linear cost at small microbatches
        blocks.append(
            BlockProfile(
                fwd_time={1: f, 4: f * 4**curve, 16: f * 16**curve},
                bwd_time={1: 2 * f, 4: 2 * f * 4**curve, 16: 2 * f * 16**curve},
                activation_bytes={1: 1e6, 16: 1.6e7},
            )
        )
    per_block = [rng.uniform(1e6, rng.choice([1e7, 1e9])) for _ in range(num_blocks)]
    params = [[sum(per_block[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    ins = [[0.0 if i == 0 else 4096.0 for _ in range(num_blocks)] for i in range(num_blocks)]
    outs = [[0.0 if j == num_blocks - 1 else 4096.0 for j in range(num_blocks)] for _ in range(num_blocks)]
    problem = PlanProblem(
        blocks,
        params,
        ins,
        outs,
        world_size=world,
        global_batch=rng.choice([8, 16, 32, 64]),
        allreduce_bandwidth=rng.choice([1e8, 1e9, 1e10]),
        max_microbatches=16,
        schedules=rng.choice([("1f1b",), ("fill_drain", "1f1b")]),
    )
    if rng.random() < 0.5:
        memories = sorted(f[3] for f in brute_force(problem, ignore_memory=True))
        problem = dataclasses.replace(problem, memory_limit_bytes=memories[len(memories) // 3])
    return problem


def linear_problem(
    weights: list[float], params: list[float], world: int, batch: int, **kwargs
) -> PlanProblem:
    num_blocks = len(weights)
    blocks = [
        BlockProfile(
            fwd_time={1: w * 1e-3, 2: w * 2e-3},
            bwd_time={1: w * 2e-3, 2: w * 4e-3},
            activation_bytes={1: 1e6, 2: 2e6},
        )
        for w in weights
    ]
    zeros = [[0.0] * num_blocks for _ in range(num_blocks)]
    ranges = [[sum(params[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    return PlanProblem(blocks, ranges, zeros, zeros, world_size=world, global_batch=batch, **kwargs)


def large_problem(num_blocks: int, world: int, batch: int, seed: int = 0) -> PlanProblem:
    rng = random.Random(seed)
    blocks = []
    for _ in range(num_blocks):
        f = rng.uniform(0.5e-3, 2e-3)
        blocks.append(
            BlockProfile(
                fwd_time={1: 0.3 * f, 4: 1.5 * f, 16: 5 * f},
                bwd_time={1: 0.6 * f, 4: 3 * f, 16: 10 * f},
                activation_bytes={1: 1e6, 16: 1.6e7},
            )
        )
    per_block = [rng.uniform(1e6, 5e7) for _ in range(num_blocks)]
    params = [[math.fsum(per_block[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    ins = [[0.0 if i == 0 else 8192.0 for _ in range(num_blocks)] for i in range(num_blocks)]
    outs = [[0.0 if j == num_blocks - 1 else 8192.0 for j in range(num_blocks)] for _ in range(num_blocks)]
    return PlanProblem(
        blocks, params, ins, outs, world_size=world, global_batch=batch, schedules=("fill_drain", "1f1b")
    )


def cluster_problem(
    num_blocks: int,
    world: int,
    batch: int,
    gpus_per_node: int = 8,
    max_microbatches: int = 64,
    seed: int = 0,
    **kwargs,
) -> PlanProblem:
    """A ~2B-parameter-per-block transformer (100B+ at 48 blocks) on H100-like nodes: memory forces
    many stages and recompute, replica counts from default_replica_choices, both schedules."""
    rng = random.Random(seed)
    blocks, per_block = [], []
    for index in range(num_blocks):
        scale = rng.uniform(0.95, 1.05) * (1.4 if index == num_blocks - 1 else 1.0)
        fwd = {1: 0.025 * scale, 2: 0.045 * scale, 4: 0.085 * scale, 8: 0.165 * scale}
        blocks.append(
            BlockProfile(
                fwd_time=fwd,
                bwd_time={m: 2 * t for m, t in fwd.items()},
                activation_bytes={1: 2.6e9 * scale, 8: 2.07e10 * scale},  # no flash attention
            )
        )
        per_block.append(3.6e9 * (1.3 if index in (0, num_blocks - 1) else 1.0))
    params = [[math.fsum(per_block[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    boundary = 5.0e7
    ins = [[0.0 if i == 0 else boundary for _ in range(num_blocks)] for i in range(num_blocks)]
    outs = [[0.0 if j == num_blocks - 1 else boundary for j in range(num_blocks)] for _ in range(num_blocks)]
    settings = {
        "memory_limit_bytes": 72e9,
        "opt_param_factor": 6.0,
        "zero_optimizer": True,
        "p2p_bandwidth": 150e9,
        "p2p_latency": 10e-6,
        "inter_node_bandwidth": 25e9,
        "inter_node_latency": 30e-6,
        "allreduce_bandwidth": 100e9,
        "allreduce_latency": 30e-6,
        "allreduce_inter_bandwidth": 20e9,
        "allreduce_inter_latency": 100e-6,
        "max_microbatches": max_microbatches,
        "schedules": ("fill_drain", "1f1b"),
        "allow_recompute": True,
        "gpus_per_node": gpus_per_node,
        "replica_choices": default_replica_choices(world, gpus_per_node),
    }
    settings.update(kwargs)
    return PlanProblem(blocks, params, ins, outs, world_size=world, global_batch=batch, **settings)
