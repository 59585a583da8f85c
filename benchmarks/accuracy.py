"""Are rannc's offline predictions right? Plan with a calibrated CPU profile, run the plan, compare.

For each model (HF BERT and GPT-2, random weights) and world size (2 and 4 local gloo ranks, one intra-op
thread each), in ONE run:

1. calibrate: `rannc.profile.calibrate` under a launch of that many ranks (each rank measures while the
   others do the same, so the figures are what a rank gets while all of them compute; ranks 0-1 measure
   point-to-point and everyone an allreduce through gloo);
2. plan offline: `rannc.offline.plan_offline` on the model built under torch.device("meta"), priced with that
   profile (no real parameters, no measured profiling), `--stages` pipeline stages;
3. run the plan: RaNNCModule(load_deployment=True) on real processes, AdamW, `--warmup` untimed steps then
   `--steps` timed steps (every rank waits at a barrier before each step; a step's time is the slowest
   rank's; forward + backward + optimizer step + zero_grad); then one step under
   `rannc.profile.memtrack.PeakMemory` (the most bytes of tensor storage live at once on the rank:
   parameters, gradients, optimizer state and every tensor the step allocates, but not the rank's input
   batch, made before the step as a data loader would; it agrees exactly with
   torch's MemTracker, which cannot follow a pipeline stage) and one step with RANNC_TRACE set;
4. print predicted vs measured step time (goal: within 10%) and per-rank peak memory (goal: within 15% and
   never below the measurement), and write, per case, one Chrome trace with the measured step of every
   rank next to the simulator's timeline of the same plan (open it in https://ui.perfetto.dev).

Run:  python benchmarks/accuracy.py                 (both models, 2 and 4 ranks; a few minutes on 2 cores)
      python benchmarks/accuracy.py --models gpt2 --worlds 2 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rannc.launch import launch_local  # noqa: E402

SEED = 1234


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # "gpt2" or "bert"
    world_size: int
    global_batch: int
    seq_len: int
    layers: int
    hidden: int
    vocab: int
    stages: int


# ---- models (module level: spawned workers and plan_offline import them) -----------------------------------
def _config(case: Case) -> Any:
    import transformers

    if case.model == "gpt2":
        return transformers.GPT2Config(
            vocab_size=case.vocab,
            n_positions=case.seq_len,
            n_embd=case.hidden,
            n_layer=case.layers,
            n_head=max(1, case.hidden // 64),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
        )
    return transformers.BertConfig(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        num_hidden_layers=case.layers,
        num_attention_heads=max(1, case.hidden // 64),
        intermediate_size=4 * case.hidden,
        max_position_embeddings=case.seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_model(case: Case) -> Any:
    """The model of `case` (a loss-only wrapper around the HF model) on the current default device."""
    import torch
    import transformers

    class GPT2Loss(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, labels=labels).loss

    class BertLoss(GPT2Loss):
        def forward(  # type: ignore[override]
            self, input_ids: torch.Tensor, labels: torch.Tensor, next_sentence_label: torch.Tensor
        ) -> torch.Tensor:
            return self.inner(
                input_ids=input_ids, labels=labels, next_sentence_label=next_sentence_label
            ).loss

    torch.manual_seed(SEED)
    cls = transformers.GPT2LMHeadModel if case.model == "gpt2" else transformers.BertForPreTraining
    return (GPT2Loss if case.model == "gpt2" else BertLoss)(cls(_config(case)))


def make_batch(case: Case, rows: int, step: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(SEED + step)
    ids = torch.randint(0, case.vocab, (rows, case.seq_len), generator=generator)
    if case.model == "gpt2":
        batch = {"input_ids": ids, "labels": ids.clone()}
    else:
        labels = torch.randint(0, case.vocab, (rows, case.seq_len), generator=generator)
        nsp = torch.randint(0, 2, (rows,), generator=generator)
        batch = {"input_ids": ids, "labels": labels, "next_sentence_label": nsp}
    return {k: v.to(device) for k, v in batch.items()}


_CASE: Case | None = None  # set before plan_offline calls `meta_factory` in this process


def meta_factory() -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    import torch

    assert _CASE is not None
    with torch.device("meta"):
        model = build_model(_CASE)
    return model, (), make_batch(_CASE, 2, 0, device="meta")


# ---- workers ---------------------------------------------------------------------------------------------
def calibrate_worker(rank: int, world_size: int) -> dict[str, Any] | None:
    from rannc.profile.calibrate import calibrate

    profile = calibrate("cpu")
    return profile.to_json() if rank == 0 else None


def _peak_bytes(module: Any, optimizer: Any, step: Any) -> float:
    from rannc.profile.memtrack import PeakMemory, held_tensors

    with PeakMemory(held_tensors(module, optimizer)) as tracker:
        step()
    return float(tracker.peak_bytes)


def run_worker(
    rank: int, world_size: int, case: Case, plan_path: str, warmup: int, steps: int, trace_dir: str
) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import rannc

    model = build_model(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wrapped = rannc.RaNNCModule(
        model, optimizer, load_deployment=True, deployment_file=plan_path, show_progress=False
    )
    rows = case.global_batch // world_size
    counter = iter(range(10**6))

    phases: list[tuple[float, float]] = []  # per step: (forward + backward, optimizer step + zero_grad)

    def next_batch() -> dict[str, Any]:
        """This rank's rows of the next global batch: what a data loader hands the training loop."""
        batch = make_batch(case, case.global_batch, next(counter))
        return {k: v[rank * rows : (rank + 1) * rows].clone() for k, v in batch.items()}

    def step(local: dict[str, Any] | None = None) -> float:
        local = next_batch() if local is None else local
        start = time.perf_counter()
        loss = wrapped(**local)
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        phases.append((middle - start, time.perf_counter() - middle))
        return float(loss.detach())

    for _ in range(1 + warmup):  # the first call loads the plan and deploys the stages
        step()
    times = []
    del phases[:]
    for _ in range(steps):
        local = next_batch()
        dist.barrier()
        start = time.perf_counter()
        step(local)
        times.append(time.perf_counter() - start)
    dist.barrier()
    # the input batch is made before measuring: it is the data loader's, not part of the planned memory
    local = next_batch()
    peak = _peak_bytes(wrapped.module, optimizer, lambda: step(local))
    dist.barrier()
    os.environ["RANNC_TRACE"] = os.path.join(trace_dir, "rank{rank}.json")
    step()
    del os.environ["RANNC_TRACE"]
    return {"rank": rank, "times": times, "phases": phases[:steps], "peak_bytes": peak}


# ---- one case ----------------------------------------------------------------------------------------------
def run_case(case: Case, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    global _CASE
    from rannc.chrome_trace import name_event
    from rannc.deploy import save_deployment
    from rannc.offline import plan_offline
    from rannc.plan.trace import timeline_to_trace
    from rannc.profile import DeviceProfile, save_profile

    name = f"{case.model}-{case.world_size}ranks"
    started = time.perf_counter()
    profile = DeviceProfile.from_json(launch_local(calibrate_worker, case.world_size, timeout=600)[0])
    calibrate_s = time.perf_counter() - started
    save_profile(profile, out_dir / f"{name}-profile.json")
    _CASE = case
    result = plan_offline(
        meta_factory,
        world_size=case.world_size,
        device_memory_bytes=profile.memory_bytes,
        global_batch=case.global_batch,
        device=profile,
        max_microbatches=args.max_microbatches,
        num_stages=case.stages,
        recompute=False,
    )
    plan_path = out_dir / f"{name}-plan.json"
    save_deployment(result.deployment, plan_path)
    trace_dir = out_dir / f"{name}-measured"
    trace_dir.mkdir(exist_ok=True)
    worker_args = (case, str(plan_path), args.warmup, args.steps, str(trace_dir))
    ranks = launch_local(run_worker, case.world_size, worker_args, timeout=args.timeout)
    ranks.sort(key=lambda r: r["rank"])
    step_times = [max(r["times"][i] for r in ranks) for i in range(args.steps)]
    plan = result.deployment.plan
    stage_of = {rank: s for s, stage in enumerate(plan.stages) for rank in stage.ranks}

    # One Chrome trace: measured ranks (pid = rank) above the simulated ones (pid = 1000 + rank).
    measured = [json.loads((trace_dir / f"rank{r}.json").read_text()) for r in range(case.world_size)]
    origin = min(t["otherData"]["step_start_unix_s"] for t in measured)
    events: list[dict[str, Any]] = []
    for r, trace in enumerate(measured):
        shift = (trace["otherData"]["step_start_unix_s"] - origin) * 1e6
        for event in trace["traceEvents"]:
            if event.get("ph") == "M" and event.get("name") == "process_name":
                event = {**event, "args": {"name": f"measured rank {r} (stage {stage_of[r]})"}}
            elif "ts" in event:
                event = {**event, "ts": event["ts"] + shift}
            events.append(event)
    simulated = timeline_to_trace(result.timeline, [list(s.ranks) for s in plan.stages])
    for event in simulated["traceEvents"]:
        event = {**event, "pid": 1000 + event["pid"]}
        if event.get("ph") == "M" and event.get("name") == "process_name":
            event = name_event(event["pid"], f"simulated rank {event['pid'] - 1000}")
        events.append(event)
    trace_path = out_dir / f"{name}-trace.json"
    trace_path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    png_path = out_dir / f"{name}-trace.png"
    plot_traces(events, png_path, f"{name}: measured step (top) vs simulated step (bottom)")

    # Compute alone (F and B spans less the receive waits inside them) vs the simulator's compute per stage.
    compute = {}
    for r, trace in enumerate(measured):
        spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
        busy = sum(e["dur"] for e in spans if e["name"][:1] in "FB" and e["name"][1:].isdigit())
        waits = sum(e["dur"] for e in spans if e["name"].startswith(("recv_", "wait_send_")))
        timing = result.timeline.stages[stage_of[r]]
        compute[r] = ((busy - waits) / 1e6, plan.microbatches * (timing.fwd + timing.bwd), waits / 1e6)

    predicted_step = float(result.report["simulated_step_time_s"])
    measured_step = statistics.median(step_times)
    memory = [
        (r["rank"], float(plan.stages[stage_of[r["rank"]]].memory_bytes), r["peak_bytes"]) for r in ranks
    ]
    return {
        "name": name,
        "case": case,
        "plan": plan,
        "calibrate_s": calibrate_s,
        "profile": profile,
        "predicted_step": predicted_step,
        "measured_step": measured_step,
        "step_times": step_times,
        "phases": [
            (
                r["rank"],
                statistics.median(f for f, _ in r["phases"]),
                statistics.median(o for _, o in r["phases"]),
            )
            for r in ranks
        ],
        "predicted_update": [t.update for t in result.timeline.stages],
        "predicted_pipeline": [
            max(e.end for e in events if e.kind in ("F", "B")) for events in result.timeline.events
        ],
        "memory": memory,
        "trace": trace_path,
        "png": png_path,
        "compute": compute,
        "plan_path": plan_path,
    }


def plot_traces(events: list[dict[str, Any]], path: Path, title: str) -> None:
    """Draw Chrome trace events as one row per process (a Gantt chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"
    }
    pids = sorted({e["pid"] for e in events if e.get("ph") == "X"}, reverse=True)
    colors = {"F": "#4c72b0", "B": "#dd8452", "recv": "#bbbbbb", "update": "#8c8c3c", "allreduce": "#55a868"}
    fig, ax = plt.subplots(figsize=(14, 1.5 + 0.45 * len(pids)))
    for row, pid in enumerate(pids):
        for e in (e for e in events if e.get("ph") == "X" and e["pid"] == pid):
            name = e["name"]
            kind = (
                "recv" if name.startswith("recv") else "allreduce" if name.startswith("allreduce") else name
            )
            kind = kind[0] if kind[:1] in "FB" and kind[1:].isdigit() else kind
            low = name.startswith("recv")
            ax.broken_barh(
                [(e["ts"] / 1e3, e["dur"] / 1e3)],
                (row - 0.45 if low else row - 0.3, 0.25 if low else 0.6),
                facecolors=colors.get(kind, "#dddddd"),
                edgecolors="black",
                linewidth=0.3,
            )
    ax.set_yticks(range(len(pids)), [names.get(p, str(p)) for p in pids])
    ax.set_xlabel("ms from the step's start")
    ax.set_title(title + "; blue F, orange B, grey receive waits, green allreduce, olive optimizer update")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def stage_of(plan: Any, rank: int) -> int:
    return next(s for s, stage in enumerate(plan.stages) if rank in stage.ranks)


def describe_plan(plan: Any) -> str:
    stages = " | ".join(f"{len(s.ranks)}x[{min(s.ranks)}-{max(s.ranks)}]" for s in plan.stages)
    return f"{len(plan.stages)} stages ({stages}), {plan.microbatches} microbatches, {plan.schedule}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="bert,gpt2")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages of every plan")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--max-microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default=None, help="folder for plans and traces (default: a temporary one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="rannc-accuracy-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    results = []
    for model in args.models.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            case = Case(
                model,
                world,
                args.global_batch,
                args.seq_len,
                args.layers,
                args.hidden,
                args.vocab,
                args.stages,
            )
            result = run_case(case, args, out_dir)
            results.append(result)
            print(f"{result['name']}: {describe_plan(result['plan'])}", flush=True)

    mib = 2**20
    print()
    print(
        f"{'case':<14} {'pred ms':>9} {'meas ms':>9} {'meas/pred':>9}   per-rank memory MiB: predicted / measured"
    )
    ok = True
    for r in results:
        ratio = r["measured_step"] / r["predicted_step"]
        ok &= abs(ratio - 1) <= 0.10
        mem = []
        for rank, predicted, measured in r["memory"]:
            over = predicted / measured - 1
            ok &= 0 <= over <= 0.15
            close = "" if abs(predicted - measured) >= mib else f", {predicted - measured:+,.0f} B"
            mem.append(f"r{rank} {predicted / mib:.1f}/{measured / mib:.1f} ({over:+.0%}{close})")
        print(
            f"{r['name']:<14} {r['predicted_step'] * 1e3:9.1f} {r['measured_step'] * 1e3:9.1f} {ratio:9.3f}   "
            + ", ".join(mem)
        )
    print()
    for r in results:
        print(f"{r['name']}: {describe_plan(r['plan'])}; trace {r['trace']} (drawn: {r['png']})")
        for rank, (real, simulated, waits) in sorted(r["compute"].items()):
            print(
                f"  rank {rank}: traced step's compute {real * 1e3:.1f} ms vs simulated {simulated * 1e3:.1f} "
                f"({real / simulated:.3f}x); receive waits {waits * 1e3:.1f} ms"
            )
        print(f"  step times ms: {', '.join(f'{t * 1e3:.0f}' for t in r['step_times'])}")
        for (rank, fb, opt), stage in zip(r["phases"], [stage_of(r["plan"], k) for k, _, _ in r["phases"]]):
            print(
                f"  rank {rank}: forward+backward {fb * 1e3:.1f} ms (simulated pipeline end "
                f"{r['predicted_pipeline'][stage] * 1e3:.1f}), optimizer step + zero_grad {opt * 1e3:.1f} ms "
                f"(predicted update {r['predicted_update'][stage] * 1e3:.1f})"
            )
    print(f"\ngoals (time within 10%, memory within +0..15%): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
