"""How close is `plan_stages` to the true optimum of its own cost model? A brute-force check on random instances.

For N random synthetic `PlanProblem`s small enough to enumerate, the brute force
(`tests/plan/plan_brute.py::brute_force`) evaluates EVERY candidate (every contiguous block split, every
replica composition summing to the world size, every microbatch count, every allowed schedule) with
`rannc.plan.evaluate`, i.e. the very cost model the planner optimises. The table reports, per instance
family, the ratio planner step time / brute-force optimum (min / median / max; an exact search gives
1.000000 everywhere), whether both agree on infeasible instances (no candidate fits in memory: the planner
must raise PlanError), and the planner's and the brute force's wall time per instance.

Families (instance i uses family i % 4):
  small     tests/plan/plan_brute.random_problem: 1-6 blocks, 1-5 ranks, random piecewise-linear costs,
            memory limits at a random candidate's memory (some infeasible), ZeRO-1, forced stage
            counts, 1F1B and/or fill-drain.
  small+    the same instances, plus (where `PlanProblem` has the fields) per-stage activation
            recompute, restricted replica / microbatch choices, and gpus_per_node with slower
            inter-node links; the memory limit is sometimes lowered so that recompute matters.
  medium    plan_brute.medium_problem: 5-9 blocks, 3-6 ranks, batch 8-64, realistic shapes (plus the
            same extensions on half of them).
  large     heterogeneous 7-10 blocks on 4-7 ranks (embedding-like first block, encoder/decoder-like
            middle blocks, head-like last block), batch 16-64, up to 8-12 microbatches, the extensions
            at random, memory limit 1-2.5x the least memory any plan needs (so nearly all feasible).

Run:  python benchmarks/optimality.py            (300 instances, about 1-3 minutes on 2 cores)
      python benchmarks/optimality.py -n 60      (quicker)
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests" / "plan"))  # the brute-force reference and instance generators

from plan_brute import brute_force, medium_problem, random_problem  # noqa: E402

from rannc.errors import PlanError  # noqa: E402
from rannc.plan import BlockProfile, PlanProblem, minimum_memory_needed, plan_stages  # noqa: E402

FAMILIES = ("small", "small+", "medium", "large")
REL_TOL = 1e-9  # "equal" step times: relative difference at most this (float summation order)
_FIELDS = {f.name for f in dataclasses.fields(PlanProblem)}


def _extend(problem: PlanProblem, rng: random.Random) -> PlanProblem:
    """Turn on the newer planner features (only those `PlanProblem` has) at random."""
    changes: dict[str, object] = {}
    world, batch = problem.world_size, problem.global_batch
    if "allow_recompute" in _FIELDS and rng.random() < 0.6:
        changes["allow_recompute"] = True
        if problem.memory_limit_bytes is not None and rng.random() < 0.5:
            changes["memory_limit_bytes"] = problem.memory_limit_bytes * rng.choice([0.5, 0.7, 0.85])
    if "replica_choices" in _FIELDS and world > 1 and rng.random() < 0.4:
        counts = list(range(2, world + 1))
        keep = rng.sample(counts, rng.randint(0, len(counts)))
        changes["replica_choices"] = tuple(sorted({1, *keep}))
    if "microbatch_choices" in _FIELDS and batch > 1 and rng.random() < 0.3:
        counts = list(range(1, min(batch, problem.max_microbatches) + 1))
        changes["microbatch_choices"] = tuple(sorted(rng.sample(counts, rng.randint(1, len(counts)))))
    if "gpus_per_node" in _FIELDS and world > 1 and rng.random() < 0.5:
        changes["gpus_per_node"] = rng.randint(1, world - 1)
        for name, slower in (
            ("inter_node_bandwidth", problem.p2p_bandwidth),
            ("allreduce_inter_bandwidth", problem.allreduce_bandwidth),
        ):
            if name in _FIELDS:
                changes[name] = slower * rng.uniform(0.05, 0.5)
        for name in ("inter_node_latency", "allreduce_inter_latency"):
            if name in _FIELDS:
                changes[name] = rng.uniform(1e-5, 3e-4)
    return dataclasses.replace(problem, **changes)


def large_problem(seed: int) -> PlanProblem:
    """7-10 heterogeneous blocks on 4-7 ranks: an embedding-like first block (many parameters, little
    compute), transformer-like middle blocks of two kinds (encoder / decoder), a head-like last block
    (much compute and activation memory); a memory limit 1-2.5x the least memory any plan needs."""
    rng = random.Random(seed)
    num_blocks, world = rng.randint(7, 10), rng.randint(4, 7)
    blocks, per_block = [], []
    for index in range(num_blocks):
        if index == 0:
            f, act, params = rng.uniform(0.05e-3, 0.2e-3), 2e5, rng.uniform(5e8, 3e9)
        elif index == num_blocks - 1:
            f, act, params = rng.uniform(2e-3, 12e-3), 8e6, rng.uniform(1e6, 3e9)
        else:
            kind = 1.0 if index < num_blocks // 2 else rng.choice([0.3, 0.5, 1.0])
            f, act, params = kind * rng.uniform(0.8e-3, 1.2e-3), kind * 2e6, rng.uniform(1e8, 4e8)
        curve = rng.choice([1.0, 0.8])
        blocks.append(
            BlockProfile(
                fwd_time={m: f * m**curve for m in (1, 2, 4, 8, 16)},
                bwd_time={m: 2 * f * m**curve for m in (1, 2, 4, 8, 16)},
                activation_bytes={1: act, 16: 16 * act},
            )
        )
        per_block.append(params)
    boundary = [rng.uniform(1e4, 2e5) for _ in range(num_blocks + 1)]
    params = [[sum(per_block[i : j + 1]) for j in range(num_blocks)] for i in range(num_blocks)]
    ins = [[0.0 if i == 0 else boundary[i] for _ in range(num_blocks)] for i in range(num_blocks)]
    outs = [
        [0.0 if j == num_blocks - 1 else boundary[j + 1] for j in range(num_blocks)]
        for _ in range(num_blocks)
    ]
    problem = PlanProblem(
        blocks,
        params,
        ins,
        outs,
        world_size=world,
        global_batch=rng.choice([16, 24, 32, 64]),
        p2p_bandwidth=rng.choice([1e10, 5e10]),
        allreduce_bandwidth=rng.choice([2e9, 1e10, 5e10]),
        max_microbatches=rng.choice([8, 12]),
        schedules=rng.choice([("1f1b",), ("fill_drain", "1f1b")]),
        zero_optimizer=rng.random() < 0.3,
    )
    problem = _extend(problem, rng)
    try:
        least = minimum_memory_needed(problem)
    except PlanError:
        return problem
    return dataclasses.replace(problem, memory_limit_bytes=least * rng.uniform(1.0, 2.5))


def instance(index: int, seed: int) -> tuple[str, PlanProblem]:
    family = FAMILIES[index % len(FAMILIES)]
    base = seed + index
    if family == "small":
        return family, random_problem(base)
    rng = random.Random(10_000_019 * (base + 1))
    if family == "small+":
        return family, _extend(random_problem(base), rng)
    if family == "large":
        return family, large_problem(base)
    problem = medium_problem(base)
    return family, (_extend(problem, rng) if rng.random() < 0.5 else problem)


@dataclasses.dataclass
class Outcome:
    family: str
    ratio: float | None  # planner / optimum (feasible instances)
    infeasible_agree: bool  # brute force: nothing fits; planner: PlanError
    mismatch: str | None  # what went wrong, if anything
    plan_s: float
    brute_s: float
    candidates: int


def check(family: str, problem: PlanProblem) -> Outcome:
    started = time.perf_counter()
    found = brute_force(problem)
    brute_s = time.perf_counter() - started
    best = min((f[0] for f in found), default=None)
    started = time.perf_counter()
    try:
        plan = plan_stages(problem)
        error = None
    except PlanError as exc:
        plan, error = None, str(exc)
    plan_s = time.perf_counter() - started
    if best is None:
        ok = plan is None
        return Outcome(
            family, None, ok, None if ok else "planner found a plan, brute force none", plan_s, brute_s, 0
        )
    if plan is None:
        return Outcome(family, None, False, f"planner: PlanError ({error[:80]})", plan_s, brute_s, len(found))
    ratio = plan.predicted_step_time / best if best > 0 else (1.0 if plan.predicted_step_time == 0 else 0.0)
    mismatch = None if abs(ratio - 1.0) <= REL_TOL else f"ratio {ratio:.9f}"
    return Outcome(family, ratio, False, mismatch, plan_s, brute_s, len(found))


def _ms(values: list[float], how) -> str:
    return f"{1e3 * how(values):.2f}" if values else "-"


def report(outcomes: list[Outcome]) -> list[str]:
    header = (
        f"{'family':<8} {'inst':>5} {'feas':>5} {'infeas':>6} {'agree':>5} {'ratio min':>10} "
        f"{'ratio med':>10} {'ratio max':>10} {'exact':>7} {'miss':>4} {'plan ms med':>11} {'plan ms max':>11} "
        f"{'brute ms med':>12} {'cands med':>9}"
    )
    lines = [header, "-" * len(header)]
    for family in (*FAMILIES, "all"):
        rows = [o for o in outcomes if family in ("all", o.family)]
        if not rows:
            continue
        ratios = [o.ratio for o in rows if o.ratio is not None]
        infeasible = [o for o in rows if o.candidates == 0]
        exact = sum(1 for r in ratios if abs(r - 1.0) <= REL_TOL)
        fmt = (lambda v: f"{v:.6f}") if ratios else (lambda v: "-")
        lines.append(
            f"{family:<8} {len(rows):>5} {len(rows) - len(infeasible):>5} "
            f"{len(infeasible):>6} {sum(o.infeasible_agree for o in infeasible):>5} "
            f"{fmt(min(ratios)) if ratios else '-':>10} {fmt(statistics.median(ratios)) if ratios else '-':>10} "
            f"{fmt(max(ratios)) if ratios else '-':>10} {f'{exact}/{len(ratios)}':>7} {sum(o.mismatch is not None for o in rows):>4} "
            f"{_ms([o.plan_s for o in rows], statistics.median):>11} {_ms([o.plan_s for o in rows], max):>11} "
            f"{_ms([o.brute_s for o in rows], statistics.median):>12} "
            f"{int(statistics.median([o.candidates for o in rows])):>9}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--instances", type=int, default=300, help="random instances (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="first instance seed (default 0)")
    args = parser.parse_args(argv)
    extended = sorted({"allow_recompute", "replica_choices", "microbatch_choices", "gpus_per_node"} & _FIELDS)
    print(
        f"plan_stages vs brute force on {args.instances} random instances (seeds {args.seed}..."
        f"{args.seed + args.instances - 1}); families small / small+ / medium / large in turn; small+, large and half "
        f"of medium also use: {', '.join(extended) or 'nothing (PlanProblem has none of the newer fields)'}"
    )
    started = time.perf_counter()
    outcomes = [check(*instance(i, args.seed)) for i in range(args.instances)]
    for line in report(outcomes):
        print(line)
    print(
        "columns: feas = instances where the brute force found a feasible candidate; infeas = none fits; agree ="
        " of those, the planner raised PlanError too; ratio = planner step time / brute-force optimum; exact ="
        f" ratios within {REL_TOL:g} of 1; miss = instances where the planner is not optimal, errs"
        " on a feasible instance or plans an infeasible one; plan ms = plan_stages wall time per instance; cands = feasible"
        " candidates the brute force evaluated"
    )
    bad = [(i, o) for i, o in enumerate(outcomes) if o.mismatch is not None]
    for i, o in bad[:20]:
        print(f"MISMATCH instance {i} ({o.family}, seed {args.seed + i}): {o.mismatch}")
    print(
        f"total {time.perf_counter() - started:.1f}s; {len(bad)} mismatch(es); "
        + ("planner optimal on every instance" if not bad else "planner NOT optimal everywhere")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
