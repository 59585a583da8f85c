"""`rannc plan`'s predicted step, bubble and model-FLOPs utilisation without and with interleaved 1F1B.

For the cases of plan_speed.py (GPT-3 175B on 1024 H100 with --zero, Llama 2 70B on 256 H100, T5 11B on 32
A100-40GB): one plan with the schedules of schedule="auto" (1F1B, fill-drain) and one that may also interleave
(--schedules 1f1b,fill_drain,interleaved_1f1b), each by plan_offline as `rannc plan` makes it. Printed per plan:
the schedule, positions x chunks, microbatches, replicas, simulated step, bubble fraction, and the predicted MFU
= 6 x parameters x tokens per step / (step x devices x the profile's dense bf16 peak); for T5 the tokens are the
encoder's inputs (an approximation: its decoder reads fewer). Also why no interleaved plan was chosen, when none
was: the least memory an interleaved slice would need is over the limit, or its simulated step is longer.

Run:  python benchmarks/interleave_figures.py [gpt3-175b] [llama2-70b] [t5-11b]   (each case in its own process)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENS = {"gpt3-175b": 2048, "llama2-70b": 4096, "t5-11b": 512}  # per sample
BASE = ("1f1b", "fill_drain")
WITH = ("1f1b", "fill_drain", "interleaved_1f1b")


def run(name: str) -> None:
    import plan_speed

    from rannc.offline import plan_offline
    from rannc.profile.devices import get_device_profile

    case = dict(plan_speed.CASES[name])
    factory = case.pop("factory")
    model = factory()[0]
    params = sum(p.numel() for p in model.parameters())
    del model
    profile = get_device_profile(case["device"])
    peak = profile.peak("bfloat16")
    tokens = case["global_batch"] * TOKENS[name]
    print(
        f"{name}: {params / 1e9:.1f} B parameters, {case['world_size']} x {case['device']}, global batch "
        f"{case['global_batch']} ({tokens} tokens), bf16 peak {peak / 1e12:.1f} TFLOP/s"
    )
    for label, schedules in (("before", BASE), ("after", WITH)):
        started = time.perf_counter()
        result = plan_offline(factory, schedules=schedules, **case)
        wall = time.perf_counter() - started
        plan, timeline = result.deployment.plan, result.timeline
        step = timeline.step_time
        mfu = 6 * params * tokens / (step * case["world_size"] * peak)
        print(
            f"  {label:6} {plan.schedule!s:16} {plan.positions:3} positions x {plan.chunks} chunk(s), "
            f"{plan.microbatches:3} microbatches, replicas {sorted({s.replicas for s in plan.stages})}, "
            f"recompute {any(s.recompute for s in plan.stages)}: step {step:8.3f} s, bubble "
            f"{timeline.bubble_fraction:6.1%}, MFU {mfu:6.1%}, peak memory "
            f"{max(s.memory_bytes for s in plan.stages) / 2**30:.1f} GiB (rannc plan {wall:.0f} s, search "
            f"{result.timings['search']:.1f} s)"
        )
        if label == "after" and plan.chunks == 1:
            print(f"         no interleaved plan: {why_not(result.problem)}")


def why_not(problem: object) -> str:
    """Why the search kept a plan of one chunk per position: the best interleaved plan on its own, or that none
    fits in memory."""
    import dataclasses
    import math

    from rannc.plan.cost import CostModel
    from rannc.plan.interleave import best_interleaved, interleaved_configs

    alone = dataclasses.replace(problem, schedules=("interleaved_1f1b",))
    best = best_interleaved(alone, CostModel(alone), math.inf)
    if best is None:
        return f"none of its {len(interleaved_configs(alone))} slices has a cut that fits in memory"
    return (
        f"the best, {best.positions} positions x {best.chunks} chunks, {best.microbatches} microbatches, has a "
        f"simulated step of {best.predicted_step_time:.3f} s"
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
