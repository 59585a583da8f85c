"""Small instances with recompute, replica / microbatch choices and node placement for brute force,
each with every candidate of the problem ignoring its memory limit."""

from __future__ import annotations

import dataclasses
import functools
import random

from plan_brute import brute_force, random_table, with_zero_bubble

from rannc.plan import BlockProfile, PlanProblem


@functools.cache
def random_extended_problem(seed: int) -> tuple[PlanProblem, list]:
    """Small instances with recompute, replica / microbatch choices and node placement rules, with
    every candidate of the problem ignoring its memory limit (see brute_best)."""
    rng = random.Random(10_000 + seed)
    num_blocks, world = rng.randint(2, 7), rng.randint(2, 7)
    batch = rng.choice([rng.randint(1, 12), rng.randint(8, 48), rng.randint(8, 48)])
    blocks = []
    for _ in range(num_blocks):
        fwd = {1: 0.0} if rng.random() < 0.1 else random_table(rng, 1e-3)  # free recompute: a tie
        blocks.append(
            BlockProfile(
                fwd_time=fwd, bwd_time=random_table(rng, 2e-3), activation_bytes=random_table(rng, 1e7)
            )
        )
    if rng.random() < 0.5:  # transient workspace, held once per stage (largest block)
        blocks = [dataclasses.replace(b, workspace_bytes=random_table(rng, 2e7)) for b in blocks]
    per_block = [rng.uniform(0, rng.choice([1e5, 1e6, 1e7])) for _ in range(num_blocks)]
    boundary = [rng.choice([0.0, rng.uniform(0, 1e5), rng.uniform(0, 1e6)]) for _ in range(num_blocks + 1)]
    params = [[0.0] * num_blocks for _ in range(num_blocks)]
    ins = [[0.0] * num_blocks for _ in range(num_blocks)]
    outs = [[0.0] * num_blocks for _ in range(num_blocks)]
    for i in range(num_blocks):
        for j in range(i, num_blocks):
            params[i][j] = sum(per_block[i : j + 1]) * rng.uniform(0.8, 1.0)
            ins[i][j] = 0.0 if i == 0 else boundary[i] + rng.choice([0.0, 100.0])
            outs[i][j] = 0.0 if j == num_blocks - 1 else boundary[j + 1]
    replica_choices = None
    if rng.random() < 0.6:
        replica_choices = tuple(sorted({1} | set(rng.sample(range(1, world + 1), rng.randint(1, world)))))
        if rng.random() < 0.2:
            replica_choices = tuple(sorted(set(rng.sample(range(1, world + 1), rng.randint(1, world)))))
    microbatch_choices = None
    if rng.random() < 0.5:
        microbatch_choices = tuple(sorted(rng.sample(range(1, 9), rng.randint(1, 4))))
    problem = PlanProblem(
        blocks=blocks,
        range_param_bytes=params,
        range_in_bytes_per_sample=ins,
        range_out_bytes_per_sample=outs,
        world_size=world,
        global_batch=batch,
        opt_param_factor=rng.choice([0.0, 2.0, 6.0]),
        zero_optimizer=rng.random() < 0.3,
        p2p_bandwidth=rng.uniform(1e9, 2e10),
        p2p_latency=rng.uniform(0, 1e-4),
        allreduce_bandwidth=rng.uniform(1e9, 2e10),
        allreduce_latency=rng.uniform(0, 1e-4),
        min_microbatches=rng.choice([1, 1, 1, 2]),
        max_microbatches=rng.choice([2, 4, 4, 8]),
        schedules=rng.choice([("1f1b",), ("fill_drain",), ("1f1b", "fill_drain"), ("fill_drain", "1f1b")]),
        num_stages=rng.choice([None, None, None, rng.randint(1, 4)]),
        allow_recompute=rng.random() < 0.7,
        replica_choices=replica_choices,
        microbatch_choices=microbatch_choices,
        gpus_per_node=rng.choice([None, 1, 2, 2, 3, 4]),
        inter_node_bandwidth=rng.choice([None, rng.uniform(1e8, 2e10)]),
        inter_node_latency=rng.choice([None, rng.uniform(0, 3e-4)]),
        allreduce_inter_bandwidth=rng.choice([None, rng.uniform(1e8, 2e10)]),
        allreduce_inter_latency=rng.choice([None, rng.uniform(0, 3e-4)]),
        update_seconds_per_param_byte=rng.choice([0.0, rng.uniform(0, 1e-10), rng.uniform(0, 1e-9)]),
        optimizer_transient=rng.choice(
            [(0.0, 0.0), (1.0, 0.0), (0.0, 3.0), (rng.uniform(0, 2), rng.uniform(0, 4))]
        ),
        range_largest_param_bytes=[
            [max(per_block[i : j + 1]) * rng.uniform(0.3, 1.0) if j >= i else 0.0 for j in range(num_blocks)]
            for i in range(num_blocks)
        ],
        # its own generator: the other draws (and so every instance's other fields) stay as they were
        input_bytes=random.Random(seed).choice([0.0, 0.0, 1e5, 3e6]),
        # the optimizer stepped in chunks (its temporaries cover one chunk)
        optimizer_chunk_bytes=random.Random(30_000 + seed).choice([0.0, 0.0, 1e5, 1e6, 5e6]),
    )
    if random.Random(40_000 + seed).random() < 0.25:  # every microbatch count up to the batch (sends held)
        problem = dataclasses.replace(problem, max_microbatches=batch)
    problem = with_zero_bubble(problem, 10_000 + seed)
    candidates = brute_force(problem)
    if candidates and rng.random() < 0.8:
        # Half the time a limit that some recomputing candidate meets (recompute often needed).
        recomputing = [f for f in candidates if any(f[2][4])] if rng.random() < 0.5 else []
        memories = sorted(f[3] for f in recomputing or candidates)
        limit = memories[int(len(memories) * rng.random() ** 2)] * rng.choice([0.95, 1.0, 1.0, 1.05])
        problem = dataclasses.replace(problem, memory_limit_bytes=limit)
    return problem, candidates


@functools.cache
def medium_extended_problem(seed: int) -> tuple[PlanProblem, list]:
    """6-7 realistic blocks on up to 6 ranks with recompute, choices and 2-3 GPUs per node, where
    the search's pruning matters; with every candidate ignoring the memory limit."""
    rng = random.Random(20_000 + seed)
    num_blocks, world = rng.randint(6, 7), rng.randint(4, 6)
    blocks = []
    for _ in range(num_blocks):
        f = rng.uniform(0.5e-3, 2e-3)
        curve = rng.choice([1.0, 0.7])
        blocks.append(
            BlockProfile(
                fwd_time={1: f, 4: f * 4**curve, 16: f * 16**curve},
                bwd_time={1: 2 * f, 4: 2 * f * 4**curve, 16: 2 * f * 16**curve},
                activation_bytes={1: 4e6, 16: 6.4e7},
            )
        )
    per_block = [rng.uniform(1e6, rng.choice([1e7, 3e7])) for _ in range(num_blocks)]
    params = [[sum(per_block[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    ins = [[0.0 if i == 0 else 4e5 for _ in range(num_blocks)] for i in range(num_blocks)]
    outs = [[0.0 if j == num_blocks - 1 else 4e5 for j in range(num_blocks)] for _ in range(num_blocks)]
    problem = PlanProblem(
        blocks,
        params,
        ins,
        outs,
        world_size=world,
        global_batch=rng.choice([16, 32, 64]),
        allreduce_bandwidth=rng.choice([1e9, 1e10]),
        max_microbatches=16,
        microbatch_choices=tuple(sorted(rng.sample([1, 2, 4, 8, 16], 3))),
        schedules=rng.choice([("1f1b",), ("fill_drain", "1f1b")]),
        allow_recompute=True,
        gpus_per_node=rng.choice([2, 3]),
        inter_node_bandwidth=rng.choice([2e8, 1e9]),
        allreduce_inter_bandwidth=rng.choice([None, 2e8]),
    )
    problem = with_zero_bubble(problem, 20_000 + seed)
    candidates = brute_force(problem)
    memories = sorted(f[3] for f in candidates)
    limit = memories[int(len(memories) * rng.choice([0.01, 0.03, 0.1, 0.3]))]
    return dataclasses.replace(problem, memory_limit_bytes=limit), candidates
