"""GPT-3 175B on 1024 H100 80 GiB (global batch 1536): the plan `rannc plan` finds, and the least device memory any
plan needs, in bf16 and fp32, with and without ZeRO-1, all in one run.

Each case is one `plan_offline` call, timed end to end (wall and this process's CPU seconds, which other work on the
machine hardly changes). Per case it prints the least usable memory per device with which some plan fits (the
planner's `minimum_memory_needed`, or what the "no plan fits" message says), and the plan: stages x replicas,
microbatches, simulated step, bubble and the predicted model-FLOPs utilisation, 6 x parameters x tokens per step /
(step x devices x the device's dense peak in the compute dtype: 989.5 TFLOP/s bf16, 67 TFLOP/s fp32 on H100).

    python benchmarks/gpt3_memory.py                       # the four cases
    python benchmarks/gpt3_memory.py --cases bf16          # bf16 with and without --zero
    PYTHONPATH=/path/to/other/checkout python benchmarks/gpt3_memory.py   # another version of rannc, same cases

Runs with this checkout's rannc or, with PYTHONPATH, another one's (it uses only plan_offline and the planner's
minimum_memory_needed, which every version has), so two versions compare side by side on one machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rannc  # noqa: E402
from rannc.errors import PlanError  # noqa: E402
from rannc.offline import plan_offline  # noqa: E402
from rannc.plan import minimum_memory_needed  # noqa: E402
from rannc.profile.devices import get_device_profile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_speed import gpt3_175b  # noqa: E402

GIB = 2**30
WORLD, BATCH, DEVICE, MEMORY = 1024, 1536, "h100-80gb", 80 * GIB
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def parameter_count() -> int:
    model, _, _ = gpt3_175b()
    return sum(p.numel() for p in model.parameters())  # tied weights once


def run_case(dtype: str, zero: bool, extra: dict[str, Any], params: int) -> dict[str, Any]:
    """One plan_offline call: its times, the least memory and the plan's figures (or why it failed)."""
    wall, cpu = time.perf_counter(), time.process_time()
    row: dict[str, Any] = {"case": f"{dtype}{' --zero' if zero else ''}"}
    try:
        result = plan_offline(
            gpt3_175b,
            world_size=WORLD,
            device_memory_bytes=MEMORY,
            global_batch=BATCH,
            device=DEVICE,
            gpus_per_node=8,
            dtype=dtype,
            zero=zero,
            **extra,
        )
    except PlanError as exc:
        row.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
        found = re.search(r"smallest per-device memory that would fit is ([\d.]+) GiB usable", str(exc))
        row["least"] = float(found.group(1)) if found else float("nan")
        row["plan"] = "no plan fits in 72.00 GiB usable"
        block = re.search(r"largest block holds ([\d.]+ [GM]iB)", str(exc))
        row["note"] = f"largest block {block.group(1)}" if block else ""
        return row
    row.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
    plan, timeline = result.deployment.plan, result.timeline
    row["least"] = minimum_memory_needed(result.problem) / GIB
    counts = collections.Counter(stage.replicas for stage in plan.stages)
    replicas = " + ".join(f"{n} x {r}" for r, n in sorted(counts.items(), reverse=True))
    step = timeline.step_time
    tokens = BATCH * 2048
    peak = get_device_profile(DEVICE).peak(DTYPES[dtype])
    row["plan"] = (
        f"{len(plan.stages)} stages ({replicas} replicas), {plan.microbatches} microbatches, {plan.schedule}, "
        f"step {step:.2f} s, bubble {timeline.bubble_fraction:.1%}, MFU {6 * params * tokens / (step * WORLD * peak):.1%}"
    )
    row["note"] = (
        f"{result.report['num_blocks']} blocks, most memory {max(s.memory_bytes for s in plan.stages) / GIB:.2f} GiB, "
        f"capture {result.timings['capture']:.1f} s, search {result.timings['search']:.1f} s (wall)"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="bf16,fp32", help="compute dtypes, comma-separated (bf16, fp32)")
    parser.add_argument("--zero", default="off,on", help="ZeRO-1 settings to run, comma-separated (off, on)")
    parser.add_argument(
        "--max-blocks", type=int, default=None, help="plan_offline's max_blocks (default: its own)"
    )
    parser.add_argument(
        "--max-microbatches", type=int, default=None, help="plan_offline's (default: its own)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the measured CPU seconds are one core's; planning uses one
    extra: dict[str, Any] = {}
    if args.max_blocks is not None:
        extra["max_blocks"] = args.max_blocks
    if args.max_microbatches is not None:
        extra["max_microbatches"] = args.max_microbatches
    params = parameter_count()
    load = os.getloadavg()[0]
    print(
        f"rannc from {os.path.dirname(rannc.__file__)}; {params / 1e9:.1f}B parameters; load average {load:.1f}"
    )
    rows = [
        run_case(dtype, zero == "on", extra, params)
        for dtype in args.cases.split(",")
        for zero in args.zero.split(",")
    ]
    print(f"\n{'case':<12} {'least GiB':>9} {'wall s':>7} {'cpu s':>6}  plan")
    for row in rows:
        print(f"{row['case']:<12} {row['least']:>9.2f} {row['wall']:>7.1f} {row['cpu']:>6.1f}  {row['plan']}")
        if row["note"]:
            print(f"{'':<38}{row['note']}")
    print(
        f"load average after: {os.getloadavg()[0]:.1f} (2-core machine shared with other work: compare cpu s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
