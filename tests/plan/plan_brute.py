"""Brute-force reference for the stage search: every candidate, the cost model from its definition, instances."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

from rannc.plan import BlockProfile, PlanProblem, evaluate, interpolate
from rannc.plan import cost as cost_module


def compositions(total: int, parts: int):
    """Every way to write `total` as an ordered sum of `parts` positive integers."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force(problem: PlanProblem, ignore_memory: bool = False):
    """Every feasible candidate as (step time, key, (ranges, replicas, P, schedule), max memory)."""
    if ignore_memory:
        problem = dataclasses.replace(problem, memory_limit_bytes=None)
    num_blocks, world = len(problem.blocks), problem.world_size
    if problem.num_stages is not None:
        stage_counts = [problem.num_stages] if problem.num_stages <= min(num_blocks, world) else []
    else:
        stage_counts = range(1, min(num_blocks, world) + 1)
    low = max(1, problem.min_microbatches)
    high = min(problem.global_batch, problem.max_microbatches)
    model = cost_module.CostModel(problem)  # only a cache; the reference test checks evaluate itself
    out = []
    for count in stage_counts:
        for sizes in compositions(num_blocks, count):
            ranges, first = [], 0
            for size in sizes:
                ranges.append((first, first + size - 1))
                first += size
            for replicas in compositions(world, count):
                for p in range(low, high + 1):
                    for rank, schedule in enumerate(problem.schedules):
                        result = evaluate(problem, ranges, replicas, p, schedule, model)
                        if result is None:
                            continue
                        total, costs = result
                        key = (count, p, rank, ranges, replicas)
                        memory = max(c.memory for c in costs)
                        out.append((total, key, (ranges, replicas, p, schedule), memory))
    return out


def brute_best(problem: PlanProblem):
    found = brute_force(problem)
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
    if rng.random() < 0.7:
        candidates = brute_force(problem, ignore_memory=True)
        if candidates:
            memories = sorted(f[3] for f in candidates)
            limit = rng.choice(memories) * rng.choice([0.9, 1.0, 1.0, 1.1])
            problem = dataclasses.replace(problem, memory_limit_bytes=limit)
    return problem


def reference_cost(problem: PlanProblem, ranges, replicas, p: int, schedule: str):
    """The cost model written out from its definition, independently of rannc.plan.cost."""
    batch, stages = problem.global_batch, len(ranges)
    if not (1 <= p <= batch and problem.min_microbatches <= p <= problem.max_microbatches):
        return None
    if any(r > batch // p for r in replicas):
        return None
    times, allreduces, memories = [], [], []
    for s, ((i, j), r) in enumerate(zip(ranges, replicas)):
        m = math.ceil(math.ceil(batch / p) / r)
        blocks = problem.blocks[i : j + 1]
        fwd = sum(interpolate(b.fwd_time, m) for b in blocks)
        bwd = sum(interpolate(b.bwd_time, m) for b in blocks)
        act = sum(interpolate(b.activation_bytes, m) for b in blocks)
        ins = problem.range_in_bytes_per_sample[i][j] * m
        outs = problem.range_out_bytes_per_sample[i][j] * m

        def send(n: float) -> float:
            return 0.0 if n == 0 else problem.p2p_latency + n / problem.p2p_bandwidth

        times.append(fwd + bwd + 2 * (send(ins) + send(outs)))
        params = problem.range_param_bytes[i][j]
        allreduces.append(
            0.0
            if r == 1
            else problem.allreduce_latency + 2 * (r - 1) / r * params / problem.allreduce_bandwidth
        )
        inflight = min(p, stages - s) if schedule == "1f1b" else p
        shards = r if problem.zero_optimizer else 1
        memories.append(params * (2 + problem.opt_param_factor / shards) + act * inflight + 2 * (ins + outs))
    limit = problem.memory_limit_bytes
    if limit is not None and max(memories) > limit:
        return None
    return sum(times) + (p - 1) * max(times) + max(allreduces)


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
