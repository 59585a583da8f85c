"""rannc's pipeline schedules against each other and against torch.distributed.pipelining on CPU, in ONE run.

A model where 1F1B's bubble dominates: `--ranks` (4) gloo ranks of one intra-op thread each, as many pipeline
positions of one replica, `--microbatches` = ranks by default (P = S: 1F1B idles (S - 1) / (P + S - 1) = 3/7 of
the step on 4 ranks). Every system trains the same model (a stack of equal residual MLP layers between an input
and an output projection, MSE loss) from the same weights on the same global batches:

  rannc 1F1B                       schedule 1f1b, `ranks` stages
  rannc zero bubble                schedule zero_bubble (ZB-H1: backward split into I, sent on at once, and W)
  rannc interleaved                schedule interleaved_1f1b, `--chunks` (2) model chunks per position: ranks x
                                   chunks virtual stages, virtual stage k on rank k % ranks
  pipelining 1F1B                  torch.distributed.pipelining Schedule1F1B at rannc 1F1B's split
  pipelining zero bubble (ZB1P)    ScheduleInterleavedZeroBubble, one stage per rank, at rannc zero bubble's split
  pipelining interleaved           ScheduleInterleaved1F1B at rannc interleaved's split (the same virtual stages
                                   on the same ranks)
  pipelining zero bubble (ZBV)     ScheduleZBVZeroBubble at rannc interleaved's split (ranks x 2 virtual stages
                                   placed in a V: rank r holds stages r and 2 ranks - 1 - r; needs --chunks 2)

Each rannc schedule is planned twice, one schedule each, with the positions, chunks and microbatches forced, all
under the same memory limit (the profile's memory): offline with `plan_offline` (what `rannc plan` does: roofline
estimates on a device profile of this machine calibrated under `ranks` ranks; `--profile FILE` reuses one, or
calibrates into it), and as a job plans (RaNNCModule: block costs measured on every rank at once, the same profile
for links and the optimizer step). The job's plan is the one run (load_deployment), and pipelining's stages are cut
at the module boundaries it chose (printed). Each system runs in its own local launch, one after the other (with
`--rounds R`, R times, every other round in reverse order, and each system's best round is reported).

Printed: per system samples/s = global batch / median step (every rank waits at a barrier before each step; a step
is its slowest rank's), CPU ms per step summed over the ranks, the last loss, and the 1-minute load average
before/after; the ratios of samples/s (each rannc schedule / rannc 1F1B, rannc interleaved / pipelining
interleaved, rannc zero bubble / pipelining zero bubble); per rannc schedule the simulator's step (of the job's
plan, and of the offline one) against the measured one, and per rank the planned peak memory against the measured
one (rannc.profile.memtrack.PeakMemory over one step). With more ranks than free cores an idle rank lends its core
to another, which hides bubbles (the simulator shares the cores among the ranks computing: rannc.plan.simulate
.CoreSharing): compare the rows of one run, as ratios, and read the load average column.

Run:  python benchmarks/schedules_cpu.py                        (4 ranks; a few minutes on 2 cores)
      python benchmarks/schedules_cpu.py --ranks 2              (a core per stage on a 2-core machine)
      python benchmarks/schedules_cpu.py --quick                (smoke run)
      python benchmarks/schedules_cpu.py --profile cpu.json     (calibrates into cpu.json once, then reuses it)
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
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rannc.deploy import load_deployment  # noqa: E402
from rannc.launch import LaunchError, launch_local  # noqa: E402

SEED = 1234
IN_FEATURES, OUT_FEATURES = 64, 16
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Settings:
    ranks: int = 4  # = pipeline positions (one replica each)
    layers: int = 16
    width: int = 512
    hidden: int = 2048
    global_batch: int = 32
    microbatches: int = 0  # 0: as many as ranks
    chunks: int = 2  # model chunks per position of the interleaved schedules
    steps: int = 8
    warmup: int = 2
    profile: str = ""  # a device profile (rannc calibrate file); calibrated (and written there) when absent
    timeout: float = 900.0
    # run every system this many times (every other round in reverse order); report each's best
    rounds: int = 1
    systems: str = ""  # comma-separated subset of the rows' keys (see SYSTEMS); empty: all

    @property
    def positions(self) -> int:
        return self.ranks

    @property
    def pipeline_microbatches(self) -> int:
        return self.microbatches or self.ranks


# ---- the model and data (module level: spawned workers build them) ---------------------------------------------
def build_stack(settings: Settings) -> Any:
    """input projection, `layers` residual MLP layers, output projection: nn.Sequential of layers + 2 modules."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(settings.width, settings.hidden)
            self.down = nn.Linear(settings.hidden, settings.width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, settings.width),
        *[Layer() for _ in range(settings.layers)],
        nn.Linear(settings.width, OUT_FEATURES),
    )


def with_loss(stack: Any) -> Any:
    """forward(x, y) -> MSE of the stack's output: the loss inside the model (what rannc's 1F1B orders need)."""
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = stack

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.stack(x), y)

    return Model()


def make_batches(settings: Settings) -> list[tuple[Any, Any]]:
    """The global batches of every step: set-up, warm-up, timed and the memory-measuring one."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    return [
        (
            torch.randn(settings.global_batch, IN_FEATURES, generator=generator),
            torch.randn(settings.global_batch, OUT_FEATURES, generator=generator),
        )
        for _ in range(2 + settings.warmup + settings.steps)
    ]


def _timed(step: Any, settings: Settings) -> dict[str, list[float]]:
    """Set-up and warm-up steps, then the timed ones, each after a barrier: wall and process CPU seconds."""
    import torch.distributed as dist

    for k in range(1 + settings.warmup):  # the first call sets up (rannc: capture, plan check, deploy)
        step(k)
    times, cpu = [], []
    for k in range(settings.steps):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(1 + settings.warmup + k)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"times": times, "cpu_times": cpu}


# ---- rannc ------------------------------------------------------------------------------------------------------
def rannc_worker(rank: int, world: int, settings: Settings, plan_path: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import rannc
    from rannc.profile.memtrack import PeakMemory, held_tensors

    torch.set_num_threads(1)
    model = with_loss(build_stack(settings))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    wrapped = rannc.RaNNCModule(
        model, optimizer, load_deployment=True, deployment_file=plan_path, show_progress=False
    )
    per = settings.global_batch // world
    data = [
        (x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
        for x, y in make_batches(settings)
    ]
    losses: list[float] = []

    def step(k: int) -> None:
        loss = wrapped(*data[k])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))

    result: dict[str, Any] = _timed(step, settings)
    dist.barrier()
    with PeakMemory(held_tensors(wrapped.module, optimizer)) as tracker:  # a batch of its own, made before
        step(1 + settings.warmup + settings.steps)
    plan = wrapped.deployment.plan
    result.update(
        rank=rank,
        losses=losses[:-1],
        peak_bytes=float(tracker.peak_bytes),
        planned_bytes=float(plan.stages[plan.stage_of_rank(rank)].memory_bytes),
    )
    return result


def job_plan_worker(
    rank: int, world: int, settings: Settings, schedule: str, profile_path: str, deployment_path: str
) -> dict[str, Any]:
    """Plan as a job does, from block costs measured here on every rank at once (not roofline estimates), forced
    to the offline plan's shape (schedule, positions, chunks, microbatches, layer-boundary blocks, no recompute),
    and save the deployment; returns the plan's simulated step."""
    import torch

    import rannc

    torch.set_num_threads(1)
    model = with_loss(build_stack(settings))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    wrapped = rannc.RaNNCModule(
        model,
        optimizer,
        schedule=schedule,
        chunks=str(settings.chunks) if schedule == "interleaved_1f1b" else "auto",
        partition_num=settings.positions,
        min_pipeline=settings.pipeline_microbatches,
        max_pipeline=settings.pipeline_microbatches,
        max_partition_num=settings.layers + 2,
        device_profile=profile_path,
        save_deployment=True,
        deployment_file=deployment_path,
        show_progress=False,
    )
    per = settings.global_batch // world
    x, y = make_batches(settings)[0]
    wrapped(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]).backward()
    return {"rank": rank, "simulated_s": wrapped.deployment.plan.predicted_step_time}


def calibrate_worker(rank: int, world: int) -> dict[str, Any] | None:
    from rannc.profile.calibrate import calibrate

    profile = calibrate("cpu")
    return profile.to_json() if rank == 0 else None


_SETTINGS = Settings()


def factory() -> tuple[Any, tuple[Any, ...]]:
    """What plan_offline captures: the model and one example call."""
    import torch

    return with_loss(build_stack(_SETTINGS)), (torch.zeros(2, IN_FEATURES), torch.zeros(2, OUT_FEATURES))


def plan(settings: Settings, profile: Any, schedule: str, path: Path) -> Any:
    """The offline plan of `schedule` on `ranks` CPU ranks under the profile's memory, saved to `path`."""
    global _SETTINGS
    from rannc.deploy import save_deployment
    from rannc.offline import plan_offline

    _SETTINGS = settings
    result = plan_offline(
        factory,
        world_size=settings.ranks,
        device_memory_bytes=profile.memory_bytes,
        global_batch=settings.global_batch,
        device=profile,
        min_microbatches=settings.pipeline_microbatches,
        max_microbatches=settings.pipeline_microbatches,
        schedules=(schedule,),
        chunks=settings.chunks if schedule == "interleaved_1f1b" else None,
        num_stages=settings.positions,
        recompute=False,
        max_blocks=settings.layers + 2,
        opt_param_factor=1.0,  # every system steps SGD with momentum (as the job's plan reads from its optimizer)
    )
    save_deployment(result.deployment, path)
    return result


def stage_starts(module_ranges: list[tuple[str, str]]) -> list[int]:
    """The index in the nn.Sequential where every (virtual) stage of a rannc plan begins, from its module ranges
    ("stack.5.up", ...): pipelining's stages are cut at the same places."""
    starts = []
    for first, _ in module_ranges:
        parts = first.split(".")
        if len(parts) < 2 or parts[0] != "stack" or not parts[1].isdigit() or parts[2:] not in ([], ["up"]):
            raise ValueError(
                f"rannc's stage begins at {first!r}, inside a layer: pipelining cannot cut there (use whole "
                "layers: max_blocks = layers + 2 keeps the planner at layer boundaries)"
            )
        starts.append(int(parts[1]))
    return starts


# ---- torch.distributed.pipelining -------------------------------------------------------------------------------
def pipelining_worker(
    rank: int, world: int, settings: Settings, schedule_name: str, starts: list[int]
) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.distributed import pipelining

    torch.set_num_threads(1)
    modules = list(build_stack(settings))
    count = len(starts)
    bounds = [*starts, len(modules)]
    if schedule_name == "zbv":  # a V: rank r holds virtual stages r and 2 * world - 1 - r
        mine = [rank, 2 * world - 1 - rank]
    else:  # round robin: virtual stage k on rank k % world
        mine = [k for k in range(count) if k % world == rank]
    stages = [
        pipelining.PipelineStage(
            nn.Sequential(*modules[bounds[k] : bounds[k + 1]]), k, count, torch.device("cpu")
        )
        for k in mine
    ]
    optimizer = torch.optim.SGD([p for s in stages for p in s.submod.parameters()], lr=1e-3, momentum=0.9)

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(output, target)

    microbatches = settings.pipeline_microbatches
    if schedule_name == "1f1b":
        schedule = pipelining.Schedule1F1B(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
    else:
        kind = {
            "interleaved": pipelining.ScheduleInterleaved1F1B,
            "zb1p": pipelining.ScheduleInterleavedZeroBubble,
            "zbv": pipelining.ScheduleZBVZeroBubble,
        }[schedule_name]
        schedule = kind(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    data = make_batches(settings)
    has_first, has_last = 0 in mine, count - 1 in mine
    losses: list[float] = []

    def step(k: int) -> None:
        x, y = data[k]
        out: list[Any] = []
        if has_first:
            schedule.step(x, target=y, losses=out) if has_last else schedule.step(x)
        elif has_last:
            schedule.step(target=y, losses=out)
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad()
        if out:
            losses.append(float(sum(float(v.detach()) for v in out) / len(out)))

    result: dict[str, Any] = _timed(step, settings)
    result.update(rank=rank, losses=losses)
    return result


# ---- driver -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class System:
    key: str  # for --systems
    name: str
    rannc_schedule: str  # rannc's schedule, or the rannc plan whose split a pipelining schedule uses
    pipelining_schedule: str | None = None  # None: a rannc row


SYSTEMS = (
    System("rannc-1f1b", "rannc 1F1B", "1f1b"),
    System("rannc-zb", "rannc zero bubble", "zero_bubble"),
    System("rannc-interleaved", "rannc interleaved", "interleaved_1f1b"),
    System("torch-1f1b", "pipelining 1F1B", "1f1b", "1f1b"),
    System("torch-zb1p", "pipelining ZB1P", "zero_bubble", "zb1p"),
    System("torch-interleaved", "pipelining interleaved", "interleaved_1f1b", "interleaved"),
    System("torch-zbv", "pipelining ZBV", "interleaved_1f1b", "zbv"),
)

RATIOS = (  # (numerator, denominator) of samples/s
    ("rannc zero bubble", "rannc 1F1B"),
    ("rannc interleaved", "rannc 1F1B"),
    ("rannc interleaved", "pipelining interleaved"),
    ("rannc zero bubble", "pipelining ZB1P"),
    ("rannc zero bubble", "pipelining ZBV"),
    ("rannc 1F1B", "pipelining 1F1B"),
)


@dataclasses.dataclass
class Row:
    name: str
    results: list[dict[str, Any]] | None = None
    error: str | None = None
    load: tuple[float, float] = (0.0, 0.0)

    @property
    def step_s(self) -> float:
        """The median over the timed steps of the slowest rank's step (inf when the row failed)."""
        if not self.results:
            return float("inf")
        return statistics.median(max(ts) for ts in zip(*(r["times"] for r in self.results)))

    @property
    def cpu_s(self) -> float:
        assert self.results
        return statistics.median(sum(ts) for ts in zip(*(r["cpu_times"] for r in self.results)))

    @property
    def last_loss(self) -> float:
        return next((r["losses"][-1] for r in self.results or [] if r["losses"]), float("nan"))


def run(name: str, worker: Any, worker_args: tuple[Any, ...], settings: Settings) -> Row:
    row = Row(name)
    before = os.getloadavg()[0]
    try:
        results = launch_local(worker, settings.ranks, (settings, *worker_args), timeout=settings.timeout)
        row.results = sorted(results, key=lambda r: r["rank"])
    except LaunchError as exc:
        row.error = str(exc)
    except Exception:
        row.error = traceback.format_exc()
    row.load = (before, os.getloadavg()[0])
    return row


class JobPlan(NamedTuple):
    """A plan a job made from measured block costs (`job_plan_worker`)."""

    simulated_s: float  # its simulated step
    ranges: list[tuple[str, str]]  # its (virtual) stages' first and last modules


def job_plan(settings: Settings, profile_path: str, schedule: str, path: Path) -> JobPlan:
    """The plan a job makes from measured block costs (`job_plan_worker`), saved to `path`."""
    started = time.perf_counter()
    results = launch_local(
        job_plan_worker,
        settings.ranks,
        (settings, schedule, profile_path, str(path)),
        timeout=settings.timeout,
    )
    print(
        f"  {schedule}: planned from measured block costs in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return JobPlan(float(results[0]["simulated_s"]), load_deployment(path).stage_module_ranges)


def calibrated_profile(settings: Settings, folder: str) -> tuple[Any, str]:
    from rannc.profile import DeviceProfile, load_profile, save_profile

    if settings.profile and Path(settings.profile).exists():
        print(f"device profile {settings.profile}")
        return load_profile(settings.profile), settings.profile
    started = time.perf_counter()
    profile = DeviceProfile.from_json(launch_local(calibrate_worker, settings.ranks, timeout=600)[0])
    path = settings.profile or str(Path(folder) / "cpu.json")
    save_profile(profile, path)
    print(f"calibrated this CPU under {settings.ranks} ranks in {time.perf_counter() - started:.0f} s")
    return profile, path


def report(
    rows: dict[str, Row], plans: dict[str, Any], job_plans: dict[str, JobPlan], settings: Settings
) -> None:
    base = rows.get("rannc 1F1B")
    print(
        f"\n{'system':24} {'samples/s':>9} {'step ms':>8} {'CPU ms/step':>11} {'vs rannc 1F1B':>13} "
        f"{'load avg':>11}  loss last"
    )
    for row in rows.values():
        if row.error:
            print(f"{row.name:24} {'FAILED':>9}   {row.error.strip().splitlines()[-1][:120]}")
            continue
        versus = f"{base.step_s / row.step_s:13.3f}" if base and not base.error else f"{'-':>13}"
        print(
            f"{row.name:24} {settings.global_batch / row.step_s:9.1f} {row.step_s * 1e3:8.1f} "
            f"{row.cpu_s * 1e3:11.0f} {versus} {row.load[0]:5.2f}/{row.load[1]:5.2f}  {row.last_loss:.6f}"
        )
    print("\nratios of samples/s (> 1: the first is faster):")
    for a, b in RATIOS:
        if a in rows and b in rows and not rows[a].error and not rows[b].error:
            print(f"  {a} / {b} = {rows[b].step_s / rows[a].step_s:.3f}")
    for name, result in plans.items():
        row = rows.get(name)
        deployment = result.deployment
        ranges = [f"{first}..{last}" for first, last in job_plans[name].ranges]
        predicted = result.timeline.step_time
        print(
            f"\n{name}: {deployment.plan.schedule} x {deployment.plan.chunks} chunk(s), "
            f"{deployment.plan.microbatches} microbatches, (virtual) stages {ranges}"
        )
        if row is None or row.error:
            print(
                f"  simulated step {predicted * 1e3:.1f} ms (bubble {result.timeline.bubble_fraction:.0%}), not run"
            )
            continue
        print(f"  measured step {row.step_s * 1e3:.1f} ms; simulated:")
        for source, simulated in (
            ("from the job's measured block costs", job_plans[name].simulated_s),
            ("offline, from roofline estimates", predicted),
        ):
            error = simulated / row.step_s - 1
            print(
                f"    {source:36} {simulated * 1e3:8.1f} ms ({error * 100:+.1f}%, "
                f"{'within' if abs(error) <= 0.1 else 'OUTSIDE'} 10%)"
            )
        for r in row.results or []:
            planned, measured = r["planned_bytes"], r["peak_bytes"]
            print(
                f"  rank {r['rank']}: planned peak {planned / MIB:8.1f} MiB, measured {measured / MIB:8.1f} MiB "
                f"({'ok' if planned >= measured else 'UNDER'}, {(planned / measured - 1) * 100:+.0f}%)"
            )
    loads = [value for row in rows.values() for value in row.load]
    print(
        f"\n1-minute load average over the run: {min(loads):.2f} .. {max(loads):.2f} on {os.cpu_count()} CPUs"
    )


def parse_settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 layers of 256 -> 1024, 2 timed steps"
    )
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    parsed = parser.parse_args(argv)
    settings = Settings(layers=8, width=256, hidden=1024, steps=2, warmup=1) if parsed.quick else Settings()
    changes = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(Settings)}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    virtual = settings.ranks * settings.chunks
    if settings.layers % virtual or settings.global_batch % (settings.ranks * settings.pipeline_microbatches):
        parser.error(
            f"--layers must be a multiple of ranks x chunks ({virtual}) and --global-batch of ranks x microbatches"
        )
    unknown = set(filter(None, settings.systems.split(","))) - {s.key for s in SYSTEMS}
    if unknown:
        parser.error(f"unknown --systems {sorted(unknown)}; choose among {[s.key for s in SYSTEMS]}")
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    chosen = [s for s in SYSTEMS if not settings.systems or s.key in settings.systems.split(",")]
    if settings.chunks != 2:  # ZBV places exactly two virtual stages per rank
        chosen = [s for s in chosen if s.pipelining_schedule != "zbv"]
    print(
        f"{settings.layers} layers {settings.width} -> {settings.hidden} -> {settings.width}, global batch "
        f"{settings.global_batch}, {settings.pipeline_microbatches} microbatches, {settings.ranks} gloo ranks x "
        f"1 thread, {settings.chunks} chunks per rank when interleaved, {settings.steps} timed steps after "
        f"{settings.warmup} warm-up; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="rannc-schedules-bench-") as folder:
        profile, profile_path = calibrated_profile(settings, folder)
        plans, paths, starts, job_plans = {}, {}, {}, {}
        for schedule in dict.fromkeys(s.rannc_schedule for s in chosen):
            name = next(
                s.name for s in SYSTEMS if s.rannc_schedule == schedule and s.pipelining_schedule is None
            )
            plans[name] = plan(settings, profile, schedule, Path(folder) / f"{schedule}-offline.json")
            paths[schedule] = Path(folder) / f"{schedule}.json"
            job_plans[name] = job_plan(settings, profile_path, schedule, paths[schedule])
            starts[schedule] = stage_starts(job_plans[name].ranges)
        jobs = [
            (s.name, rannc_worker, (str(paths[s.rannc_schedule]),))
            if s.pipelining_schedule is None
            else (s.name, pipelining_worker, (s.pipelining_schedule, starts[s.rannc_schedule]))
            for s in chosen
        ]
        for round_ in range(settings.rounds):  # every other round in reverse: the load drifts
            for name, worker, worker_args in jobs if round_ % 2 == 0 else jobs[::-1]:
                row = run(name, worker, worker_args, settings)
                outcome = "FAILED" if row.error else f"{row.step_s * 1e3:.1f} ms"
                print(
                    f"  round {round_ + 1}: {name} {outcome} (load {row.load[0]:.2f}/{row.load[1]:.2f})",
                    flush=True,
                )
                if name not in rows or row.step_s < rows[name].step_s:
                    rows[name] = row
    report({name: rows[name] for name, _, _ in jobs}, plans, job_plans, settings)
    return 0 if all(row.error is None for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
