"""Interleaved 1F1B on CPU, in ONE run: rannc interleaved vs rannc 1F1B vs torch.distributed.pipelining.

A model where 1F1B's bubble dominates: 4 gloo ranks (one intra-op thread each), 4 pipeline positions of one
replica, 4 microbatches: 1F1B idles (S - 1) / (P + S - 1) = 3/7 of the step, interleaving 2 chunks per
position about half of that. Every system trains the same model (a stack of equal residual MLP layers between
an input and an output projection, MSE loss) from the same weights on the same global batches, with the same
layers per rank:

  rannc 1F1B          4 stages of L/4 layers
  rannc interleaved   2 chunks per position: 8 virtual stages of L/8 layers, virtual stage k on rank k % 4
  pipelining 1F1B / interleaved   torch.distributed.pipelining's Schedule1F1B over the same 4 stages and
                      ScheduleInterleaved1F1B over the same 8 virtual stages (rank r holds stages r and r + 4)

rannc's plans are made with `plan_offline` (rannc plan) on a device profile of this machine calibrated under 4
ranks (`--profile FILE` reuses one): the estimates of equal layers are equal, so the planner cuts evenly (the
run prints each plan's module ranges), and the plans run with load_deployment. Each system runs in its own
local launch, one after the other.

Per system: samples/s = global batch / median step time (every rank waits at a barrier before each step; the
step is the slowest rank's; with --rounds R the best of R runs, every other round in reverse order); for rannc, the simulator's step (the plan's) against the measured one, and per rank
the planned peak memory against the measured one (rannc.profile.memtrack.PeakMemory over one step, as
benchmarks/accuracy.py). The load average (1 minute) before and after each system is printed: this machine is
shared, and ratios of one run are what to compare. With more ranks than cores a rank's bubble is another rank's
CPU time, so the bubble interleaving removes is worth less here than on one device per rank.

Run:  python benchmarks/interleave_cpu.py                      (defaults below; a few minutes)
      python benchmarks/interleave_cpu.py --profile cpu.json   (calibrates into cpu.json once, then reuses it)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rannc.launch import launch_local  # noqa: E402

WORLD = 4
SEED = 1234
GIB, MIB = 2**30, 2**20


@dataclasses.dataclass(frozen=True)
class Settings:
    layers: int = 16
    width: int = 512
    hidden: int = 2048
    global_batch: int = 32
    microbatches: int = 4
    chunks: int = 2
    steps: int = 8
    warmup: int = 2
    profile: str = ""  # a device profile (rannc calibrate file); calibrated (and written there) when absent
    timeout: float = 900.0
    rounds: int = (
        1  # run every system this many times (every other round in reverse order); report each's best
    )


def build_model(settings: Settings) -> Any:
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
        nn.Linear(64, settings.width),
        *[Layer() for _ in range(settings.layers)],
        nn.Linear(settings.width, 16),
    )


class WithLoss:
    """forward(x, y) -> MSE of the stack's output: the loss inside the model (what rannc's 1F1B needs)."""

    @staticmethod
    def wrap(stack: Any) -> Any:
        import torch
        from torch import nn

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stack = stack

            def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.mse_loss(self.stack(x), y)

        return Model()


def batches(settings: Settings, count: int) -> list[tuple[Any, Any]]:
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    return [
        (
            torch.randn(settings.global_batch, 64, generator=generator),
            torch.randn(settings.global_batch, 16, generator=generator),
        )
        for _ in range(count)
    ]


def _timed(step: Any, settings: Settings) -> list[float]:
    import torch.distributed as dist

    for k in range(1 + settings.warmup):  # the first call sets up (rannc: capture, profile, plan, deploy)
        step(k)
    times = []
    for k in range(settings.steps):
        dist.barrier()
        start = time.perf_counter()
        step(1 + settings.warmup + k)
        times.append(time.perf_counter() - start)
    return times


def rannc_worker(rank: int, world: int, settings: Settings, plan_path: str) -> dict[str, Any]:
    import torch

    import rannc
    from rannc.profile.memtrack import PeakMemory, held_tensors

    torch.set_num_threads(1)
    model = WithLoss.wrap(build_model(settings))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    wrapped = rannc.RaNNCModule(
        model, optimizer, load_deployment=True, deployment_file=plan_path, show_progress=False
    )
    data = batches(settings, 2 + settings.warmup + settings.steps)
    rows = settings.global_batch // world
    losses: list[float] = []

    def step(k: int) -> None:
        x, y = data[k]
        loss = wrapped(x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))

    times = _timed(step, settings)
    k = 1 + settings.warmup + settings.steps
    with PeakMemory(held_tensors(wrapped.module, optimizer)) as tracker:
        step(k)
    plan = wrapped.deployment.plan
    return {
        "rank": rank,
        "times": times,
        "losses": losses[:-1],
        "peak_bytes": float(tracker.peak_bytes),
        "planned_bytes": plan.stages[plan.stage_of_rank(rank)].memory_bytes,
    }


def calibrate_worker(rank: int, world: int) -> dict[str, Any] | None:
    from rannc.profile.calibrate import calibrate

    profile = calibrate("cpu")
    return profile.to_json() if rank == 0 else None


_SETTINGS = Settings()


def factory() -> tuple[Any, tuple[Any, ...]]:
    """What plan_offline captures: the model and one example call."""
    import torch

    return WithLoss.wrap(build_model(_SETTINGS)), (torch.zeros(2, 64), torch.zeros(2, 16))


def plan(settings: Settings, profile: Any, schedule: str, path: Path) -> Any:
    """The offline plan of `schedule` on 4 CPU ranks, saved to `path`."""
    global _SETTINGS
    from rannc.deploy import save_deployment
    from rannc.offline import plan_offline

    _SETTINGS = settings
    result = plan_offline(
        factory,
        world_size=WORLD,
        device_memory_bytes=profile.memory_bytes,
        global_batch=settings.global_batch,
        device=profile,
        max_microbatches=settings.microbatches,
        min_microbatches=settings.microbatches,
        schedules=(schedule,),
        chunks=settings.chunks if schedule == "interleaved_1f1b" else None,
        num_stages=WORLD,
        recompute=False,
        max_blocks=settings.layers + 2,
    )
    save_deployment(result.deployment, path)
    return result


def pipelining_worker(rank: int, world: int, settings: Settings, interleaved: bool) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    torch.set_num_threads(1)
    stack = build_model(settings)
    modules = list(stack)
    chunks = settings.chunks if interleaved else 1
    count = world * chunks
    per = settings.layers // count
    # virtual stage k: layers k*per .. (k+1)*per - 1, the input projection on the first, the output on the last
    pieces = [modules[1 + k * per : 1 + (k + 1) * per] for k in range(count)]
    pieces[0] = [modules[0], *pieces[0]]
    pieces[-1] = [*pieces[-1], modules[-1]]
    mine = [k for k in range(count) if k % world == rank]
    stages = [PipelineStage(nn.Sequential(*pieces[k]), k, count, torch.device("cpu")) for k in mine]
    params = [p for stage in stages for p in stage.submod.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(output, target)

    if interleaved:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=settings.microbatches, loss_fn=loss_fn)
    else:
        schedule = Schedule1F1B(stages[0], n_microbatches=settings.microbatches, loss_fn=loss_fn)
    data = batches(settings, 1 + settings.warmup + settings.steps)
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
            losses.append(float(sum(float(v) for v in out) / len(out)))

    times = _timed(step, settings)
    return {"rank": rank, "times": times, "losses": losses}


@dataclasses.dataclass
class Row:
    name: str
    step_s: float
    load: tuple[float, float]
    result: list[dict[str, Any]]


def run(name: str, worker: Any, args: tuple[Any, ...], settings: Settings) -> Row:
    before = os.getloadavg()[0]
    results = sorted(launch_local(worker, WORLD, args, timeout=settings.timeout), key=lambda r: r["rank"])
    after = os.getloadavg()[0]
    steps = [max(r["times"][i] for r in results) for i in range(settings.steps)]
    return Row(name, statistics.median(steps), (before, after), results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(Settings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    settings = Settings(**vars(parser.parse_args(argv)))
    if settings.layers % (WORLD * settings.chunks):
        parser.error(f"--layers must be a multiple of {WORLD * settings.chunks} (ranks x chunks)")
    print(
        f"{settings.layers} layers {settings.width} -> {settings.hidden} -> {settings.width}, global batch "
        f"{settings.global_batch}, {settings.microbatches} microbatches, {WORLD} gloo ranks x 1 thread, "
        f"{settings.steps} timed steps after {settings.warmup} warm-up; {os.cpu_count()} CPUs"
    )
    from rannc.profile import DeviceProfile, load_profile, save_profile

    with tempfile.TemporaryDirectory() as folder:
        if settings.profile and Path(settings.profile).exists():
            profile = load_profile(settings.profile)
            print(f"device profile {settings.profile}")
        else:
            started = time.perf_counter()
            profile = DeviceProfile.from_json(launch_local(calibrate_worker, WORLD, timeout=600)[0])
            save_profile(profile, settings.profile or Path(folder) / "cpu.json")
            print(f"calibrated this CPU under {WORLD} ranks in {time.perf_counter() - started:.0f} s")
        plans, paths = {}, {}
        for name, schedule in (("rannc 1F1B", "1f1b"), ("rannc interleaved", "interleaved_1f1b")):
            paths[name] = Path(folder) / f"{schedule}.json"
            plans[name] = plan(settings, profile, schedule, paths[name])
        systems = [
            ("rannc 1F1B", rannc_worker, (settings, str(paths["rannc 1F1B"]))),
            ("rannc interleaved", rannc_worker, (settings, str(paths["rannc interleaved"]))),
            ("pipelining 1F1B", pipelining_worker, (settings, False)),
            ("pipelining interleaved", pipelining_worker, (settings, True)),
        ]
        best: dict[str, Row] = {}
        for round_ in range(settings.rounds):  # every other round in reverse: the load drifts
            for name, worker, args in systems if round_ % 2 == 0 else systems[::-1]:
                row = run(name, worker, args, settings)
                print(
                    f"  round {round_ + 1}: {name} {row.step_s * 1e3:.1f} ms (load {row.load[0]:.2f}/{row.load[1]:.2f})"
                )
                if name not in best or row.step_s < best[name].step_s:
                    best[name] = row
        rows = [best[name] for name, _, _ in systems]
    base = rows[0].step_s
    print(
        f"\n{'system':24} {'step ms':>9} {'samples/s':>10} {'vs rannc 1F1B':>14} {'load avg':>12}  loss last"
    )
    for row in rows:
        losses = [loss for r in row.result for loss in r["losses"][-1:]]
        print(
            f"{row.name:24} {row.step_s * 1e3:9.1f} {settings.global_batch / row.step_s:10.1f} "
            f"{base / row.step_s:14.3f} {row.load[0]:5.2f}/{row.load[1]:5.2f}  {losses[0] if losses else float('nan'):.6f}"
        )
    by_name = {row.name: row for row in rows}
    print(
        f"\nrannc interleaved / rannc 1F1B = {by_name['rannc 1F1B'].step_s / by_name['rannc interleaved'].step_s:.3f}"
        f", rannc interleaved / pipelining interleaved = "
        f"{by_name['pipelining interleaved'].step_s / by_name['rannc interleaved'].step_s:.3f} (samples/s)"
    )
    for name in ("rannc 1F1B", "rannc interleaved"):
        row, result = by_name[name], plans[name]
        deployment = result.deployment
        plan_ = deployment.plan
        predicted = result.timeline.step_time
        ranges = [f"{first}..{last}" for first, last in deployment.stage_module_ranges]
        print(
            f"\n{name}: {plan_.schedule} x {plan_.chunks} chunk(s), {plan_.microbatches} microbatches, "
            f"(virtual) stages {ranges}\n"
            f"  simulated step {predicted * 1e3:.1f} ms (bubble {result.timeline.bubble_fraction:.0%}) vs measured "
            f"{row.step_s * 1e3:.1f} ms ({(predicted / row.step_s - 1) * 100:+.1f}%)"
        )
        for r in row.result:
            planned, measured = r["planned_bytes"], r["peak_bytes"]
            verdict = "ok" if planned >= measured else "UNDER"
            print(
                f"  rank {r['rank']}: planned peak {planned / MIB:8.1f} MiB, measured {measured / MIB:8.1f} MiB "
                f"({verdict}, {(planned / measured - 1) * 100:+.0f}%)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
