"""Zero bubble vs 1F1B on CPU, 4 gloo ranks, a pipeline whose 1F1B bubble dominates, in ONE run.

Every row trains the same model (same seed, same weights at step 0) on the same global batches with `--ranks` (4)
ranks of one intra-op thread each, as many pipeline stages of one replica, rannc's planner placing the stage
boundaries (one block per layer) and pipelining using the same ones, and `--microbatches` (4 by default: P = S,
where 1F1B idles (S - 1) / (P + S - 1) = 3/7 of the step and ZB-H1 leaves (S - 1)(F + I - W)). Each system runs
in its own local launch, one after the other. With fewer cores than ranks an idle rank lends its core to another,
which hides bubbles: `--ranks 2` on a 2-core machine shows the schedules with a core per stage.

Rows:
  rannc 1F1B               RaNNCModule(partition_num=4, min_pipeline=max_pipeline=P, schedule="1f1b")
  rannc zero bubble        the same with schedule="zero_bubble" (ZB-H1: I passes sent on at once, W deferred)
  pipelining 1F1B          torch.distributed.pipelining: pipeline(model, split_spec at rannc's stage boundaries),
                           Schedule1F1B, loss_fn in the schedule
  pipelining zero bubble   the same stages with ScheduleInterleavedZeroBubble (ZB1P; with one stage per rank, the
                           closest of torch's zero-bubble schedules at this split: ScheduleZBVZeroBubble needs two
                           stages per rank, i.e. another split)

Model: a stack of pre-norm residual MLP blocks x + fc2(gelu(fc1(ln(x)))) (width `--width`, hidden 4 x width) on
float inputs (batch, seq, width), MSE against a target: each block's backward is two matmuls for the input
gradients and two for the weights, so W is about half of the backward. rannc captures the loss in the model;
pipelining computes it in loss_fn.

Besides samples/s and the ratios, for each rannc row: the plan's predicted (simulated) step against the measured
median step, and per rank the predicted peak memory against the measured one (`rannc.profile.memtrack.PeakMemory`
over one step, the model's parameters, gradients and optimizer state included; the batch is made before).

Run:  python benchmarks/zero_bubble_cpu.py            (8 blocks of width 256, global batch 16, 6 timed steps)
      python benchmarks/zero_bubble_cpu.py --quick    (smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rannc.launch import LaunchError, launch_local  # noqa: E402

SEED = 1234


@dataclasses.dataclass(frozen=True)
class BenchArgs:
    ranks: int = 4  # ranks = pipeline stages (one replica each)
    blocks: int = 8
    width: int = 256
    seq_len: int = 32
    global_batch: int = 16
    microbatches: int = 4
    steps: int = 6
    warmup: int = 2
    lr: float = 0.01
    timeout_s: float = 1500.0


# ---- the model (module level: spawned workers build it) -------------------------------------------------------
def _modules() -> dict[str, Any]:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, 4 * width)
            self.fc2 = nn.Linear(4 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))

    class Stack(nn.Module):
        def __init__(self, blocks: int, width: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block(width) for _ in range(blocks))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    class WithLoss(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.inner(x), target)

    return {"Stack": Stack, "WithLoss": WithLoss}


def build_stack(args: BenchArgs) -> Any:
    import torch

    torch.manual_seed(SEED)
    return _modules()["Stack"](args.blocks, args.width)


def make_batches(args: BenchArgs) -> list[tuple[Any, Any]]:
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    shape = (args.global_batch, args.seq_len, args.width)
    return [
        (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
        for _ in range(2 + args.warmup + args.steps)
    ]


def local_rows(rank: int, world_size: int, global_batch: int) -> slice:
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


def _timed(args: BenchArgs, step_fn: Any) -> dict[str, Any]:
    import torch.distributed as dist

    for step in range(1, 1 + args.warmup):
        step_fn(step)
    times, cpu = [], []
    for step in range(1 + args.warmup, 1 + args.warmup + args.steps):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        step_fn(step)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"times": times, "cpu_times": cpu}


# ---- workers ----------------------------------------------------------------------------------------------------
def rannc_worker(rank: int, world_size: int, args: BenchArgs, schedule: str, cache: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import rannc
    from rannc.profile.memtrack import PeakMemory, held_tensors

    torch.set_num_threads(1)
    model = _modules()["WithLoss"](build_stack(args))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    wrapped = rannc.RaNNCModule(
        model,
        optimizer,
        partition_num=args.ranks,
        min_pipeline=args.microbatches,
        max_pipeline=args.microbatches,
        schedule=schedule,
        max_partition_num=args.blocks,  # one block per layer: stages cut at layer boundaries, as pipelining's
        show_progress=False,
        profile_cache_dir=cache,
    )
    rows = local_rows(rank, world_size, args.global_batch)
    batches = [(x[rows].clone(), y[rows].clone()) for x, y in make_batches(args)]
    losses: list[float] = []

    def step_fn(step: int) -> None:
        x, y = batches[step]
        loss = wrapped(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))

    start = time.perf_counter()
    step_fn(0)  # capture, profile, plan, deploy, one step
    setup = time.perf_counter() - start
    result = _timed(args, step_fn)
    dist.barrier()
    step = 1 + args.warmup + args.steps  # a batch of its own, made before the measurement
    with PeakMemory(held_tensors(wrapped.module, optimizer)) as tracker:
        step_fn(step)
    plan = wrapped.deployment.plan
    stage = plan.stage_of_rank(rank)
    result.update(
        rank=rank,
        setup_s=setup,
        losses=losses,
        peak_bytes=float(tracker.peak_bytes),
        predicted_bytes=float(plan.stages[stage].memory_bytes),
        predicted_step_s=plan.predicted_step_time,
        schedule=str(plan.schedule),
        modules=[list(r) for r in wrapped.deployment.stage_module_ranges],
        microbatches=plan.microbatches,
    )
    return result


def pipelining_worker(
    rank: int, world_size: int, args: BenchArgs, schedule_name: str, boundaries: list[int]
) -> dict[str, Any]:
    import torch
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleInterleavedZeroBubble,
        SplitPoint,
        pipeline,
    )

    torch.set_num_threads(1)
    model = build_stack(args)
    batches = make_batches(args)
    rows = args.global_batch // args.microbatches
    pipe = pipeline(
        model,
        mb_args=(batches[0][0][:rows],),
        split_spec={f"layers.{b}": SplitPoint.BEGINNING for b in boundaries},
    )
    stage = pipe.build_stage(rank, torch.device("cpu"))
    optimizer = torch.optim.SGD(stage.submod.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = torch.nn.functional.mse_loss
    if schedule_name == "1f1b":
        schedule = Schedule1F1B(stage, n_microbatches=args.microbatches, loss_fn=loss_fn)
    else:
        schedule = ScheduleInterleavedZeroBubble([stage], n_microbatches=args.microbatches, loss_fn=loss_fn)
    last = rank == world_size - 1
    losses: list[float] = []

    def step_fn(step: int) -> None:
        x, y = batches[step]
        out: list[Any] = []
        if rank == 0:
            schedule.step(x)
        elif last:
            schedule.step(target=y, losses=out)
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad()
        if last:
            losses.append(float(sum(float(v) for v in out) / len(out)))

    start = time.perf_counter()
    step_fn(0)
    setup = time.perf_counter() - start
    result = _timed(args, step_fn)
    result.update(rank=rank, setup_s=setup, losses=losses)
    return result


# ---- driver -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    name: str
    results: list[dict[str, Any]] | None = None
    error: str | None = None
    load: tuple[float, float] = (0.0, 0.0)

    @property
    def step_s(self) -> float | None:
        if not self.results:
            return None
        return statistics.median(max(ts) for ts in zip(*(r["times"] for r in self.results)))

    @property
    def cpu_s(self) -> float | None:
        if not self.results:
            return None
        return statistics.median(sum(ts) for ts in zip(*(r["cpu_times"] for r in self.results)))


def run(name: str, worker: Any, worker_args: tuple[Any, ...], args: BenchArgs) -> Row:
    row = Row(name)
    print(f"[zero_bubble_cpu] running {name} ...", flush=True)
    before = os.getloadavg()[0]
    try:
        row.results = launch_local(worker, args.ranks, (args, *worker_args), timeout=args.timeout_s)
    except LaunchError as exc:
        row.error = str(exc)
    except Exception:
        row.error = traceback.format_exc()
    row.load = (before, os.getloadavg()[0])
    if row.error:
        print(f"[zero_bubble_cpu] {name} FAILED:\n{row.error[-3000:]}", flush=True)
    else:
        print(f"[zero_bubble_cpu] {name}: median step {row.step_s * 1e3:.0f} ms", flush=True)
    return row


def layer_boundaries(modules: list[list[str]]) -> list[int]:
    """The first layer index of every stage after the first, from rannc's stage module ranges (a stage that
    starts inside a layer counts from that layer)."""
    found = []
    for first, _ in modules[1:]:
        parts = first.split(".")
        index = parts.index("layers") + 1 if "layers" in parts else None
        if index is None or index >= len(parts) or not parts[index].isdigit():
            raise ValueError(f"cannot read a layer index from rannc's stage start {first!r}")
        found.append(int(parts[index]))
    return found


def report(rows: list[Row], args: BenchArgs, boundaries: list[int]) -> None:
    print()
    print(
        f"{args.ranks} ranks x 1 thread, {args.blocks} residual MLP blocks of width {args.width}, global batch "
        f"{args.global_batch} x {args.seq_len} tokens, {args.microbatches} microbatches, {args.steps} timed steps "
        f"after {args.warmup} warm-up; stages start at layers 0, {', '.join(map(str, boundaries))}; "
        f"{os.cpu_count()} CPU cores"
    )
    header = f"{'system':<24} {'samples/s':>9} {'median ms':>9} {'CPU ms/step':>11} {'set-up s':>8} {'loss first -> last':>20} {'load avg':>10}"
    print(header)
    rate = {}
    for row in rows:
        load = f"{row.load[0]:.1f}/{row.load[1]:.1f}"
        if row.step_s is None:
            print(f"{row.name:<24} {'FAILED':>9}")
            continue
        rate[row.name] = args.global_batch / row.step_s
        losses = next((r["losses"] for r in reversed(row.results or []) if r["losses"]), [])
        setup = max(r["setup_s"] for r in row.results or [])
        loss_text = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
        print(
            f"{row.name:<24} {rate[row.name]:>9.2f} {row.step_s * 1e3:>9.0f} {row.cpu_s * 1e3:>11.0f} "
            f"{setup:>8.1f} {loss_text:>20} {load:>10}"
        )
    print("\nratios of samples/s (> 1: the first is faster):")
    for a, b in (
        ("rannc zero bubble", "rannc 1F1B"),
        ("rannc zero bubble", "pipelining zero bubble"),
        ("rannc 1F1B", "pipelining 1F1B"),
        ("pipelining zero bubble", "pipelining 1F1B"),
    ):
        if a in rate and b in rate:
            print(f"  {a} / {b} = {rate[a] / rate[b]:.3f}")
    for row in rows:
        if not row.name.startswith("rannc") or not row.results:
            continue
        first = row.results[0]
        predicted, measured = first["predicted_step_s"], row.step_s
        print(
            f"\n{row.name} (plan: {first['schedule']}, {first['microbatches']} microbatches): simulated step "
            f"{predicted * 1e3:.0f} ms, measured {measured * 1e3:.0f} ms (measured / simulated "
            f"{measured / predicted:.2f})"
        )
        for r in sorted(row.results, key=lambda r: r["rank"]):
            ratio = r["peak_bytes"] / r["predicted_bytes"]
            flag = "" if r["peak_bytes"] <= r["predicted_bytes"] else "  <- above the prediction"
            print(
                f"  rank {r['rank']}: peak memory predicted {r['predicted_bytes'] / 2**20:.1f} MiB, measured "
                f"{r['peak_bytes'] / 2**20:.1f} MiB ({ratio:.2f}){flag}"
            )
    loads = [value for row in rows for value in row.load]
    if loads and max(loads) > (os.cpu_count() or 1):
        print(
            f"\nnote: the 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} cores (other work on "
            "the machine): ranks that cannot all compute at once hide pipeline bubbles (an idle rank lends its "
            "core to another), and the profile the plan was made from was measured under that load too; compare "
            "rows of one run, as ratios"
        )


def parse_args(argv: list[str] | None) -> BenchArgs:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 blocks of width 128, 2 timed steps"
    )
    for field in dataclasses.fields(BenchArgs):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    parsed = parser.parse_args(argv)
    args = BenchArgs(blocks=4, width=128, steps=2, warmup=1) if parsed.quick else BenchArgs()
    changes = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(BenchArgs)}
    return dataclasses.replace(args, **{k: v for k, v in changes.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.blocks < args.ranks or args.global_batch % (args.ranks * args.microbatches):
        raise SystemExit(f"need >= {args.ranks} blocks and a global batch divisible by ranks x microbatches")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rannc-zb-bench-") as cache:
        # 1F1B first: its profile fills the cache the zero-bubble row then reads (the same measured blocks).
        rows.append(run("rannc 1F1B", rannc_worker, ("1f1b", cache), args))
        rows.append(run("rannc zero bubble", rannc_worker, ("zero_bubble", cache), args))
    planned = next((row.results for row in rows if row.results), None)
    if planned is not None:
        boundaries = layer_boundaries(planned[0]["modules"])
    else:
        per = args.blocks // args.ranks
        boundaries = [per * k for k in range(1, args.ranks)]
    rows.append(run("pipelining 1F1B", pipelining_worker, ("1f1b", boundaries), args))
    rows.append(run("pipelining zero bubble", pipelining_worker, ("zero_bubble", boundaries), args))
    report(rows, args, boundaries)
    return 0 if all(row.error is None for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
