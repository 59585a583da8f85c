"""Side-by-side CPU throughput: one process vs DDP vs torch.distributed.pipelining vs rannc, in ONE run.

Every system trains the same model (same seed, same weights at step 0) on the same sequence of global
batches, under the same constraints: 2 ranks with one intra-op thread each (torch.set_num_threads(1)),
the same global batch and, for the pipelines, the same number of microbatches. Each system runs in its own
local launch (its own processes and gloo process group), one after the other, so they do not interfere.

Rows:
  eager 1 thread / eager 2 threads   one process trains the whole global batch (the reference is 1 thread)
  DDP                                 2 ranks, each its half of the global batch, gloo gradient allreduce
  pipelining GPipe / 1F1B             torch.distributed.pipelining: pipeline(model, mb_args, split_spec=
                                      {<middle layer>: SplitPoint.BEGINNING}), 2 stages, loss_fn in the schedule
  rannc forced                        RaNNCModule(partition_num=2, min_pipeline=max_pipeline=<microbatches>)
  rannc free                          RaNNCModule with the planner's free choice (stages, replicas, microbatches)

Model: HF GPT2LMHeadModel (random weights, dropout 0) wrapped to return logits; the loss is cross entropy of
the logits against the next tokens. pipelining computes that loss in the schedule's loss_fn on the last stage;
eager, DDP and rannc run a wrapper whose forward computes the same cross entropy (so rannc captures the loss
inside its graph and every system does the same arithmetic). If pipeline() cannot split the HF model, every
system uses a plain torch transformer instead (the comparison always uses one model for all rows).

Timing: `--warmup` untimed steps, then `--steps` timed steps; for the 2-rank systems every rank waits at a
barrier before each step and the step time is the slowest rank's; samples/s = global batch / median step
time. rannc's first call (capture, profiling, planning, deployment, plus that first training step) is timed
separately as its set-up, with a fresh (empty) profile cache. The peak RSS column is getrusage's ru_maxrss:
the maximum since the process started (imports, model build and, for rannc, its set-up included).

Run:  python benchmarks/compare_cpu.py            (full: GPT-2 8 x 256, seq 64, global batch 32, 10 steps)
      python benchmarks/compare_cpu.py --quick    (smoke run: smaller model, fewer steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rannc.host_memory import keep_freed_host_memory  # noqa: E402
from rannc.launch import LaunchError, launch_local  # noqa: E402

SEED = 1234
WORLD_SIZE = 2


# ---- configuration ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchArgs:
    model: str = "auto"  # "auto" (GPT-2, else plain), "gpt2" or "plain"
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 16384  # GPT-2 small's head/layer cost ratio (50257 x 768 vs 12 x 768^2 per token)
    seq_len: int = 64
    global_batch: int = 32
    microbatches: int = 4
    steps: int = 10
    warmup: int = 2
    lr: float = 1e-3
    timeout_s: float = 1200.0
    profile_iterations: int = 0  # 0 = rannc's default
    rounds: int = 1  # run every system this many times (sequentially) and report each one's best round
    cprofile: bool = False  # cProfile rank 0's timed steps (rannc and pipelining rows) and print hotspots
    cprofile_top: int = 25


# ---- models (module level so spawned workers can build them) -------------------------------------------------
def _torch() -> Any:
    import torch

    return torch


def _make_modules() -> dict[str, Any]:
    """Module classes, defined lazily so that the launcher process does not need torch at import."""
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class GPT2Logits(nn.Module):
        """HF GPT-2 LM returning only its logits."""

        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: Any) -> Any:
            return self.lm(input_ids=input_ids).logits

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.ln_1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln_2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)

        def forward(self, x: Any) -> Any:
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
            q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.out(F.gelu(self.fc(self.ln_2(x))))

    class PlainLM(nn.Module):
        """A GPT-like decoder in plain torch (fallback when pipelining cannot split the HF model)."""

        def __init__(self, vocab: int, positions: int, d: int, layers: int, heads: int) -> None:
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(positions, d)
            self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

        def forward(self, input_ids: Any) -> Any:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.wte(input_ids) + self.wpe(pos)
            for layer in self.layers:
                x = layer(x)
            return self.head(self.ln_f(x))

    class WithLoss(nn.Module):
        """forward(input_ids, labels) -> cross entropy of the wrapped model's logits (same math as loss_fn)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, labels: Any) -> Any:
            return lm_loss(self.inner(input_ids), labels)

    return {"GPT2Logits": GPT2Logits, "PlainLM": PlainLM, "WithLoss": WithLoss}


def lm_loss(logits: Any, labels: Any) -> Any:
    """Mean cross entropy over every token (the loss_fn given to the pipelining schedules)."""
    F = _torch().nn.functional
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def build_logits_model(args: BenchArgs, kind: str) -> Any:
    """The model returning logits, with the same weights in every process (seeded)."""
    torch = _torch()
    modules = _make_modules()
    torch.manual_seed(SEED)
    if kind == "gpt2":
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        config = GPT2Config(
            vocab_size=args.vocab_size,
            n_positions=max(128, args.seq_len),
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        return modules["GPT2Logits"](GPT2LMHeadModel(config))
    return modules["PlainLM"](args.vocab_size, max(128, args.seq_len), args.n_embd, args.n_layer, args.n_head)


def build_loss_model(args: BenchArgs, kind: str) -> Any:
    return _make_modules()["WithLoss"](build_logits_model(args, kind))


def split_point(args: BenchArgs, kind: str) -> str:
    """FQN of the first layer of the second stage (equal layers per stage) in the logits model."""
    half = args.n_layer // 2
    return f"lm.transformer.h.{half}" if kind == "gpt2" else f"layers.{half}"


def make_batches(args: BenchArgs) -> list[tuple[Any, Any]]:
    """The same global batches (input ids, next-token labels) for every system, one per step."""
    torch = _torch()
    generator = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for _ in range(1 + args.warmup + args.steps):
        ids = torch.randint(0, args.vocab_size, (args.global_batch, args.seq_len + 1), generator=generator)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return batches


def local_rows(rank: int, world_size: int, global_batch: int) -> slice:
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


# ---- shared worker helpers --------------------------------------------------------------------------------------
def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.distributed.pipelining").setLevel(logging.ERROR)


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class _Profiler:
    """cProfile around the timed steps of rank 0 when asked; `report()` gives the top functions."""

    def __init__(self, enabled: bool, top: int) -> None:
        import cProfile

        self.top = top
        self.profile = cProfile.Profile() if enabled else None

    def __enter__(self) -> _Profiler:
        if self.profile is not None:
            self.profile.enable()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.profile is not None:
            self.profile.disable()

    def report(self) -> str | None:
        if self.profile is None:
            return None
        import io
        import pstats

        out = io.StringIO()
        stats = pstats.Stats(self.profile, stream=out).strip_dirs()
        stats.sort_stats("tottime").print_stats(self.top)
        stats.sort_stats("cumulative").print_stats(self.top)
        return out.getvalue()


def _timed_loop(
    args: BenchArgs, step_fn: Any, distributed: bool, profile_rank0: bool = False, rank: int = 0
) -> dict[str, Any]:
    """Run warm-up then timed steps of `step_fn(step_index) -> loss float or None`; per-step times."""
    import torch.distributed as dist

    losses: list[float | None] = []
    for step in range(1, 1 + args.warmup):
        losses.append(step_fn(step))
    times: list[float] = []
    cpu_times: list[float] = []
    profiler = _Profiler(profile_rank0 and rank == 0, args.cprofile_top)
    for step in range(1 + args.warmup, 1 + args.warmup + args.steps):
        if distributed:
            dist.barrier()
        with profiler:
            cpu_start = time.process_time()
            start = time.perf_counter()
            losses.append(step_fn(step))
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "times": times,
        "cpu_times": cpu_times,
        "losses": losses,
        "rss_mib": _max_rss_mib(),
        "profile": profiler.report(),
    }


# ---- workers -----------------------------------------------------------------------------------------------------
def training_step(model: Any, optimizer: Any, batches: list[Any]) -> Any:
    """step_fn(step): one forward (the wrapper computes the loss), backward, optimizer step; the loss."""

    def step_fn(step: int) -> float:
        ids, labels = batches[step]
        loss = model(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    return step_fn


def eager_worker(rank: int, world_size: int, args: BenchArgs, kind: str, threads: int) -> dict[str, Any]:
    torch = _torch()
    _quiet()
    torch.set_num_threads(threads)
    keep_freed_host_memory()  # as RaNNCModule does on CPUs: every row runs with the same allocator
    model = build_loss_model(args, kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = make_batches(args)

    step_fn = training_step(model, optimizer, batches)

    start = time.perf_counter()
    first = step_fn(0)
    setup = time.perf_counter() - start
    result = _timed_loop(args, step_fn, distributed=False)
    result.update(losses=[first, *result["losses"]], setup_s=setup, threads=torch.get_num_threads())
    return result


def ddp_worker(rank: int, world_size: int, args: BenchArgs, kind: str) -> dict[str, Any]:
    torch = _torch()
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _quiet()
    torch.set_num_threads(1)
    keep_freed_host_memory()  # as RaNNCModule does on CPUs: every row runs with the same allocator
    start = time.perf_counter()
    model = DistributedDataParallel(build_loss_model(args, kind))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rows = local_rows(rank, world_size, args.global_batch)
    batches = [(ids[rows], labels[rows]) for ids, labels in make_batches(args)]

    def step_fn(step: int) -> float:
        ids, labels = batches[step]
        loss = model(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        dist.all_reduce(value)  # for the report only: the global mean loss (not timed separately, 1 float)
        return float(value) / world_size

    first = step_fn(0)
    setup = time.perf_counter() - start
    result = _timed_loop(args, step_fn, distributed=True)
    result.update(losses=[first, *result["losses"]], setup_s=setup)
    return result


def pipelining_worker(
    rank: int, world_size: int, args: BenchArgs, kind: str, schedule_name: str
) -> dict[str, Any]:
    torch = _torch()
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    _quiet()
    torch.set_num_threads(1)
    keep_freed_host_memory()  # as RaNNCModule does on CPUs: every row runs with the same allocator
    start = time.perf_counter()
    model = build_logits_model(args, kind)
    batches = make_batches(args)
    mb_rows = args.global_batch // args.microbatches
    pipe = pipeline(
        model,
        mb_args=(batches[0][0][:mb_rows],),
        split_spec={split_point(args, kind): SplitPoint.BEGINNING},
    )
    if pipe.num_stages != world_size:
        raise RuntimeError(f"pipeline() made {pipe.num_stages} stages, expected {world_size}")
    stage = pipe.build_stage(rank, torch.device("cpu"))
    optimizer = torch.optim.AdamW(stage.submod.parameters(), lr=args.lr)
    schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = schedule_cls(stage, n_microbatches=args.microbatches, loss_fn=lm_loss)
    last = rank == world_size - 1

    def step_fn(step: int) -> float | None:
        ids, labels = batches[step]
        losses: list[Any] = []
        if rank == 0:
            schedule.step(ids)
        elif last:
            schedule.step(target=labels, losses=losses)
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad()
        return float(sum(float(x) for x in losses) / len(losses)) if last else None

    first = step_fn(0)
    setup = time.perf_counter() - start
    result = _timed_loop(args, step_fn, distributed=True, profile_rank0=args.cprofile, rank=rank)
    result.update(
        losses=[first, *result["losses"]],
        setup_s=setup,
        stage_params=sum(p.numel() for p in stage.submod.parameters()),
    )
    return result


def rannc_worker(
    rank: int, world_size: int, args: BenchArgs, kind: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    torch = _torch()
    _quiet()
    torch.set_num_threads(1)
    import rannc

    model = build_loss_model(args, kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rows = local_rows(rank, world_size, args.global_batch)
    batches = [(ids[rows], labels[rows]) for ids, labels in make_batches(args)]
    start = time.perf_counter()
    wrapped = rannc.RaNNCModule(model, optimizer, show_progress=False, **overrides)

    step_fn = training_step(wrapped, optimizer, batches)

    first = step_fn(0)  # capture, profile, plan, deploy, then one training step
    setup = time.perf_counter() - start
    result = _timed_loop(args, step_fn, distributed=True, profile_rank0=args.cprofile, rank=rank)
    plan = wrapped.deployment.plan
    result.update(
        losses=[first, *result["losses"]],
        setup_s=setup,
        plan={
            "stages": [
                {"blocks": (s.first_block, s.last_block), "replicas": s.replicas, "ranks": list(s.ranks)}
                for s in plan.stages
            ],
            "microbatches": plan.microbatches,
            "schedule": plan.schedule,
            "predicted_step_s": plan.predicted_step_time,
        },
    )
    return result


def probe_worker(rank: int, world_size: int, args: BenchArgs) -> str:
    """Can pipeline() split the HF GPT-2 (at the same point the benchmark uses)? '' if yes, else the error."""
    _quiet()
    from torch.distributed.pipelining import SplitPoint, pipeline

    try:
        model = build_logits_model(args, "gpt2")
        ids = make_batches(args)[0][0][: args.global_batch // args.microbatches]
        pipe = pipeline(model, mb_args=(ids,), split_spec={split_point(args, "gpt2"): SplitPoint.BEGINNING})
        if pipe.num_stages != 2:
            return f"pipeline() made {pipe.num_stages} stages instead of 2"
        return ""
    except Exception:
        return traceback.format_exc()


# ---- driver ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    name: str
    ranks: int
    result: dict[str, Any] | None = None  # per-rank results combined
    error: str | None = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-min load average before / after
    wall_s: float = 0.0

    @property
    def step_s(self) -> float | None:
        return statistics.median(self.result["step_times"]) if self.result else None


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step time = the slowest rank's; losses from the rank that has them; RSS per rank."""
    step_times = [max(times) for times in zip(*(r["times"] for r in results))]
    cpu_times = [sum(times) for times in zip(*(r["cpu_times"] for r in results))]
    losses = next(
        (r["losses"] for r in reversed(results) if all(x is not None for x in r["losses"])),
        results[0]["losses"],
    )
    combined = {
        "step_times": step_times,
        "cpu_step_s": statistics.median(cpu_times),
        "cpu_rank_s": [statistics.median(r["cpu_times"]) for r in results],
        "losses": losses,
        "rss_mib": [r["rss_mib"] for r in results],
        "setup_s": max(r["setup_s"] for r in results),
    }
    for key in ("plan", "threads", "stage_params"):
        if key in results[0]:
            combined[key] = results[0][key]
    combined["profile"] = results[0].get("profile")
    return combined


def run_system(name: str, ranks: int, worker: Any, worker_args: tuple[Any, ...], args: BenchArgs) -> Row:
    row = Row(name, ranks)
    print(f"[compare_cpu] running {name} ({ranks} process{'es' if ranks > 1 else ''}) ...", flush=True)
    before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        results = launch_local(
            worker,
            ranks,
            (args, *worker_args),
            timeout=args.timeout_s,
            init_process_group=ranks > 1,
        )
        row.result = combine(results)
    except LaunchError as exc:
        row.error = str(exc)
    except Exception:
        row.error = traceback.format_exc()
    row.wall_s = time.perf_counter() - start
    row.load = (before, os.getloadavg()[0])
    if row.error is not None:
        print(f"[compare_cpu] {name} FAILED:\n{_tail(row.error, 25)}", flush=True)
    else:
        print(
            f"[compare_cpu] {name}: median step {row.step_s * 1e3:.0f} ms "
            f"({args.global_batch / row.step_s:.1f} samples/s), {row.wall_s:.0f} s wall",
            flush=True,
        )
    return row


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _short_error(text: str) -> str:
    """The last meaningful line of a traceback (the exception message)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(" ") and ("Error" in line or "Exception" in line):
            return line[:300]
    return lines[0][:300] if lines else "unknown error"


def describe_plan(plan: dict[str, Any]) -> str:
    stages = "; ".join(
        f"stage {i}: blocks {s['blocks'][0]}-{s['blocks'][1]}, {s['replicas']} replica(s) on ranks {s['ranks']}"
        for i, s in enumerate(plan["stages"])
    )
    return (
        f"{len(plan['stages'])} stage(s) [{stages}], {plan['microbatches']} microbatches, {plan['schedule']}, "
        f"predicted step {plan['predicted_step_s'] * 1e3:.0f} ms"
    )


def print_report(rows: list[Row], args: BenchArgs, kind: str, model_note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170, highlight=False)
    by_name = {row.name: row for row in rows}
    reference = by_name.get("eager 1 thread")
    ref_rate = args.global_batch / reference.step_s if reference and reference.step_s else None

    def rate(row: Row | None) -> float | None:
        return args.global_batch / row.step_s if row is not None and row.step_s else None

    table = Table(
        title=(
            f"CPU throughput, {kind} model ({model_note}), global batch {args.global_batch}, seq {args.seq_len}, "
            f"{args.microbatches} microbatches for the pipelines, {args.steps} timed steps after {args.warmup} "
            f"warm-up{f', best of {args.rounds} rounds' if args.rounds > 1 else ''}, {os.cpu_count()} CPU cores"
        ),
        title_justify="left",
    )
    for column, justify in (
        ("system", "left"),
        ("procs x threads", "right"),
        ("samples/s", "right"),
        ("median step ms", "right"),
        ("min-max ms", "right"),
        ("CPU ms/step (ranks)", "right"),
        ("vs eager 1t", "right"),
        ("set-up s", "right"),
        ("max RSS MiB/rank", "right"),
        ("loss first -> last", "right"),
        ("load avg", "right"),
    ):
        table.add_column(column, justify=justify)
    for row in rows:
        threads = row.result.get("threads", 1) if row.result else (2 if "2 threads" in row.name else 1)
        shape = f"{row.ranks} x {threads}"
        load = f"{row.load[0]:.1f}/{row.load[1]:.1f}"
        if row.result is None:
            table.add_row(row.name, shape, "FAILED", "-", "-", "-", "-", "-", "-", "see below", load)
            continue
        r = row.result
        value = rate(row)
        losses = [x for x in r["losses"] if x is not None]
        table.add_row(
            row.name,
            shape,
            f"{value:.1f}",
            f"{row.step_s * 1e3:.0f}",
            f"{min(r['step_times']) * 1e3:.0f}-{max(r['step_times']) * 1e3:.0f}",
            f"{r['cpu_step_s'] * 1e3:.0f}"
            + (
                f" ({'+'.join(f'{c * 1e3:.0f}' for c in r['cpu_rank_s'])})"
                if len(r["cpu_rank_s"]) > 1
                else ""
            ),
            f"{value / ref_rate:.2f}x" if ref_rate else "-",
            f"{r['setup_s']:.1f}",
            "/".join(f"{m:.0f}" for m in r["rss_mib"]),
            f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-",
            load,
        )
    console.print(table)
    for row in rows:
        if row.error is not None:
            console.print(f"FAILED {row.name}: {_short_error(row.error)}")

    pipelining = [
        by_name[n] for n in ("pipelining GPipe", "pipelining 1F1B") if n in by_name and rate(by_name[n])
    ]
    best_pp = max(pipelining, key=rate) if pipelining else None
    ddp = by_name.get("DDP")
    console.print("Ratios (samples/s over samples/s; > 1 means rannc is faster):")
    for name in ("rannc forced 2 stages", "rannc free", "rannc data parallel"):
        row = by_name.get(name)
        if row is None:
            continue
        if not rate(row):
            console.print(f"  {name}: FAILED")
            continue
        parts = []
        if best_pp is not None:
            parts.append(f"/ pipelining best ({best_pp.name}) = {rate(row) / rate(best_pp):.2f}")
        else:
            ran = any(n in by_name for n in ("pipelining GPipe", "pipelining 1F1B"))
            parts.append(f"/ pipelining: n/a ({'failed' if ran else 'not run'})")
        if rate(ddp):
            parts.append(f"/ DDP = {rate(row) / rate(ddp):.2f}")
        else:
            parts.append(f"/ DDP: n/a ({'failed' if ddp is not None else 'not run'})")
        console.print(f"  {name} " + ", ".join(parts))
    console.print(
        "CPU work per step (CPU ms/step over CPU ms/step, summed over ranks; < 1 means rannc does less work; "
        "unlike samples/s it hardly depends on other load, but it does not see pipeline bubbles):"
    )
    for name in ("rannc forced 2 stages", "rannc free", "rannc data parallel"):
        row = by_name.get(name)
        if row is None or row.result is None:
            continue
        cpu = row.result["cpu_step_s"]
        parts = [
            f"/ {other.name} = {cpu / other.result['cpu_step_s']:.2f}"
            for other in (*pipelining, ddp, reference)
            if other is not None and other.result is not None
        ]
        console.print(
            f"  {name} " + (", ".join(parts) if parts else f"{cpu * 1e3:.0f} ms (nothing to compare)")
        )
    for name in ("rannc forced 2 stages", "rannc free", "rannc data parallel"):
        row = by_name.get(name)
        if row is not None and row.result is not None:
            console.print(f"  {name} plan: {describe_plan(row.result['plan'])}")
    console.print(
        "Notes: step time = slowest rank, barrier before each step; CPU ms/step = process CPU time of one step "
        "summed over the ranks, per rank in brackets (medians; insensitive to other processes' load, shows work rather than waiting); set-up = building the system and its first "
        "step (rannc: capture + profile (cold cache) + plan + deploy + step 1; pipelining: pipeline() + "
        "build_stage + step 1); max RSS = ru_maxrss since process start (includes imports and set-up). "
        "pipelining's pipeline() gives each stage its own copy of a weight used by both stages (GPT-2's tied "
        "wte/lm_head) and does not synchronise their gradients, so its losses drift from the others after step 1."
    )
    loads = [row.load[0] for row in rows] + [row.load[1] for row in rows]
    if loads and max(loads) > 1.5 * (os.cpu_count() or 1):
        console.print(
            f"[bold]Warning:[/bold] the 1-minute load average reached {max(loads):.1f} on {os.cpu_count()} cores: "
            "other processes shared the CPUs, so the numbers are noisy; rerun on a quiet machine."
        )
    for row in rows:
        if row.result is not None and row.result.get("profile"):
            console.print(f"\ncProfile of rank 0's timed steps, {row.name}:")
            print(row.result["profile"], flush=True)


def parse_args(argv: list[str] | None = None) -> tuple[BenchArgs, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 x 128 model, seq 32, batch 16, 3 steps"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="vocabulary size (default 16384: the LM head then costs about 5 layers, as in GPT-2 small)",
    )
    parser.add_argument("--model", choices=("auto", "gpt2", "plain"), default="auto")
    parser.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds per system before it is stopped"
    )
    parser.add_argument(
        "--profile-iterations", type=int, default=0, help="rannc profile_iterations (0 = rannc's default)"
    )
    parser.add_argument(
        "--systems",
        default="all",
        help="comma-separated subset of: eager1,eager2,ddp,gpipe,1f1b,rannc-forced,rannc-free,rannc-dp",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole sequence this many times and report each system's best round (noisy machines)",
    )
    parser.add_argument(
        "--cprofile", action="store_true", help="cProfile rank 0 of the pipelining and rannc runs"
    )
    ns = parser.parse_args(argv)
    if ns.quick:
        base = BenchArgs(n_layer=4, n_embd=128, n_head=4, seq_len=32, global_batch=16, steps=3, warmup=1)
    else:
        base = BenchArgs()
    args = dataclasses.replace(
        base,
        model=ns.model,
        microbatches=ns.microbatches,
        steps=ns.steps if ns.steps is not None else base.steps,
        warmup=ns.warmup if ns.warmup is not None else base.warmup,
        global_batch=ns.global_batch if ns.global_batch is not None else base.global_batch,
        seq_len=ns.seq_len if ns.seq_len is not None else base.seq_len,
        vocab_size=ns.vocab if ns.vocab is not None else base.vocab_size,
        timeout_s=ns.timeout,
        profile_iterations=ns.profile_iterations,
        cprofile=ns.cprofile,
        rounds=ns.rounds,
    )
    if args.steps < 1 or args.warmup < 0 or args.microbatches < WORLD_SIZE or args.rounds < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --microbatches >= 2 and --rounds >= 1")
    if args.global_batch % (WORLD_SIZE * args.microbatches):
        parser.error("--global-batch must be divisible by 2 x --microbatches")
    systems = [s.strip() for s in ns.systems.split(",") if s.strip()]
    known = {"eager1", "eager2", "ddp", "gpipe", "1f1b", "rannc-forced", "rannc-free", "rannc-dp"}
    if systems == ["all"]:
        systems = sorted(known)
    if unknown := set(systems) - known:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {sorted(known)}")
    return args, systems


def main(argv: list[str] | None = None) -> int:
    args, systems = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kind, model_note = args.model, "chosen with --model"
    if args.model == "auto":
        print("[compare_cpu] checking that pipeline() can split HF GPT-2 ...", flush=True)
        try:
            error = launch_local(probe_worker, 1, (args,), timeout=args.timeout_s, init_process_group=False)[
                0
            ]
        except Exception as exc:  # the probe itself died
            error = str(exc)
        if error:
            kind, model_note = "plain", "fallback: pipeline() could not split HF GPT-2"
            print(
                f"[compare_cpu] pipeline() failed on GPT-2, using the plain torch model for ALL systems:\n"
                f"{_tail(error, 5)}",
                flush=True,
            )
        else:
            kind, model_note = "gpt2", "HF GPT2LMHeadModel"
    model_note += (
        f", {args.n_layer} layers x {args.n_embd}, vocab {args.vocab_size}; loss = cross entropy of logits: "
        "pipelining in loss_fn, eager/DDP/rannc inside a wrapper's forward (rannc captures it)"
    )
    print(f"[compare_cpu] model: {kind}; {model_note}", flush=True)

    rannc_common: dict[str, Any] = {}
    if args.profile_iterations > 0:
        rannc_common["profile_iterations"] = args.profile_iterations
    cache_root = Path(tempfile.mkdtemp(prefix="rannc-bench-profiles-"))
    plan = [
        ("eager1", "eager 1 thread", 1, eager_worker, (kind, 1)),
        ("eager2", "eager 2 threads", 1, eager_worker, (kind, 2)),
        ("ddp", "DDP", 2, ddp_worker, (kind,)),
        ("gpipe", "pipelining GPipe", 2, pipelining_worker, (kind, "gpipe")),
        ("1f1b", "pipelining 1F1B", 2, pipelining_worker, (kind, "1f1b")),
        (
            "rannc-forced",
            "rannc forced 2 stages",
            2,
            rannc_worker,
            (
                kind,
                {
                    **rannc_common,
                    "partition_num": 2,
                    "min_pipeline": args.microbatches,
                    "max_pipeline": args.microbatches,
                },
            ),
        ),
        (
            "rannc-free",
            "rannc free",
            2,
            rannc_worker,
            (kind, dict(rannc_common)),
        ),
        (
            "rannc-dp",
            "rannc data parallel",
            2,
            rannc_worker,
            (kind, {**rannc_common, "partition_num": 1, "min_pipeline": 1, "max_pipeline": 1}),
        ),
    ]
    by_round: dict[str, list[Row]] = {}
    try:
        for round_index in range(args.rounds):
            if args.rounds > 1:
                print(f"[compare_cpu] round {round_index + 1} of {args.rounds}", flush=True)
            for key, name, ranks, worker, worker_args in plan:
                if key not in systems:
                    continue
                if worker is rannc_worker:  # a fresh, empty profile cache for every rannc run
                    worker_args = (
                        worker_args[0],
                        {**worker_args[1], "profile_cache_dir": str(cache_root / f"{key}-{round_index}")},
                    )
                by_round.setdefault(name, []).append(run_system(name, ranks, worker, worker_args, args))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    rows = [best_round(runs) for runs in by_round.values()]
    print_report(rows, args, kind, model_note)
    return 0 if all(row.error is None for row in rows) else 1


def best_round(runs: list[Row]) -> Row:
    """The round with the shortest median step (the least disturbed by other load); a failure if all failed."""
    ok = [row for row in runs if row.error is None]
    return min(ok, key=lambda row: row.step_s) if ok else runs[-1]


if __name__ == "__main__":
    sys.exit(main())
