"""Issue 15's predicted figures: `rannc plan`'s step, bubble and model-FLOPs utilisation before and after.

For the cases of plan_speed.py (GPT-3 175B on 1024 H100 80 GB, Llama 2 70B on 256 H100, T5 11B on 32 A100-40GB;
bf16 compute), each planned by plan_offline as `rannc plan` plans it, twice:

* before: what the planner could choose before issue 15 (1F1B or fill-drain, unsharded stages; GPT-3 with --zero,
  as the issue's baseline run),
* after: every schedule (1F1B, zero bubble, fill-drain, interleaved 1F1B) and shard_stages='auto'; GPT-3 also
  without --zero, in bf16 (the issue requires it to plan).

Printed per plan: schedule, positions x chunks, microbatches, replicas, recompute and shard levels, the simulated
step, bubble fraction, peak memory per rank, the planning time, and the predicted MFU = 6 x parameters x tokens per
step / (step x devices x the profile's dense bf16 peak); for T5 the tokens are the encoder's inputs (its decoder
reads fewer: an approximation).

Run:  python benchmarks/cluster_figures.py [gpt3-175b] [llama2-70b] [t5-11b]   (each case in its own process)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENS = {"gpt3-175b": 2048, "llama2-70b": 4096, "t5-11b": 512}  # per sample
BEFORE = dict(schedules=("1f1b", "fill_drain"), shard="none")
AFTER = dict(schedules=("1f1b", "zero_bubble", "fill_drain", "interleaved_1f1b"), shard="auto")


def plans(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, plan_offline arguments beyond the case's) of the plans printed for case `name`."""
    if name == "gpt3-175b":  # the case itself has --zero
        return [
            ("before (--zero)", BEFORE),
            ("after (--zero)", AFTER),
            ("after, no --zero", AFTER | {"zero": False}),
        ]
    return [("before", BEFORE), ("after", AFTER)]


def run(name: str) -> None:
    import plan_speed

    from rannc.offline import plan_offline
    from rannc.profile.devices import get_device_profile

    case = dict(plan_speed.CASES[name])
    factory = case.pop("factory")
    model = factory()[0]
    params = sum(p.numel() for p in model.parameters())
    del model
    peak = get_device_profile(case["device"]).peak("bfloat16")
    tokens = case["global_batch"] * TOKENS[name]
    print(
        f"{name}: {params / 1e9:.1f} B parameters, {case['world_size']} x {case['device']}, global batch "
        f"{case['global_batch']} ({tokens} tokens), bf16 peak {peak / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    for index, (label, extra) in enumerate(plans(name)):
        started = time.perf_counter()
        result = plan_offline(factory, **(case | extra))
        if index == 0:
            print_ceilings(result.problem, 6 * params * tokens / (case["world_size"] * peak))
        wall = time.perf_counter() - started
        plan, timeline = result.deployment.plan, result.timeline
        step = timeline.step_time
        mfu = 6 * params * tokens / (step * case["world_size"] * peak)
        shards = sorted({str(s.shard) for s in plan.stages})
        recomputed = sum(bool(s.recompute) for s in plan.stages)
        print(
            f"  {label:17} {plan.schedule!s:16} {plan.positions:3} positions x {plan.chunks} chunk(s), "
            f"{plan.microbatches:4} microbatches, replicas {sorted({s.replicas for s in plan.stages})}, recompute "
            f"{recomputed}/{len(plan.stages)}, shard {shards}: step {step:7.3f} s, bubble "
            f"{timeline.bubble_fraction:6.1%}, MFU {mfu:6.1%}, peak memory {max(timeline.peak_memory) / 2**30:.1f} "
            f"GiB (planned in {wall:.0f} s, search {result.timings['search']:.1f} s)",
            flush=True,
        )


def print_ceilings(problem: Any, ideal_step: float) -> None:
    """MFU ceilings of any plan on `problem` (no bubble, no communication, no optimizer step, every block at its
    cheapest profiled microbatch size per sample), without and with every block recomputed, and one sample's
    activations through the whole model against a device's usable memory: what the schedules can approach at
    best (`ideal_step`: the step at 100% MFU)."""
    blocks, sizes = problem.blocks, sorted(problem.blocks[0].fwd_time)
    fwd = sum(min(b.fwd_time[m] / m for m in sizes) for b in blocks)
    bwd = sum(min(b.bwd_time[m] / m for m in sizes) for b in blocks)
    per_device = problem.global_batch / problem.world_size
    activations = sum(b.activation_bytes[1] for b in blocks if 1 in b.activation_bytes)
    print(
        f"  ceilings: MFU {ideal_step / ((fwd + bwd) * per_device):.1%} without recompute, "
        f"{ideal_step / ((2 * fwd + bwd) * per_device):.1%} recomputing every block; one sample's activations "
        f"through the model {activations / 2**30:.1f} GiB, usable memory {problem.memory_limit_bytes / 2**30:.1f} "
        "GiB per device",
        flush=True,
    )


def main(argv: list[str]) -> int:
    names = argv or list(TOKENS)
    if len(names) == 1:
        run(names[0])
        return 0
    print(f"load average {os.getloadavg()}")
    failed = 0
    for name in names:
        failed |= subprocess.run([sys.executable, __file__, name]).returncode
    print(f"load average {os.getloadavg()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
