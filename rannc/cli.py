"""The `rannc` command: plan a cluster offline, show a deployment file, calibrate, run the demo, version."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from .config import SHARD_STAGES
from .deploy.deployment import rannc_version
from .errors import ConfigError, RanncError
from .profile.devices import OPTIMIZER_CHOICES, named_optimizer_state_factor

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(text: str) -> float:
    """Bytes in '80GiB', '40GB', '1.5TiB', '512MiB' or '1000000' (GB/TB: powers of 10, GiB/TiB: of 2)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot read memory size {text!r}; write it like 80GiB, 40GB, 1.5TiB or 512MiB")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"memory size {text!r} must be positive")
    return value


def _memory_arg(text: str) -> float:
    try:
        return parse_memory(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count_arg(text: str) -> int:
    """A whole number >= 1 (ranks, samples, steps, microbatches, blocks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _schedules_arg(text: str) -> tuple[str, ...]:
    """Comma-separated schedule names, the first preferred on a tie; "auto": what schedule="auto" chooses among."""
    from .problem import AUTO_SCHEDULES  # (the command's imports stay light until a command runs)
    from .schedule import Schedule

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["auto"]:
        return tuple(s.value for s in AUTO_SCHEDULES)
    known = [schedule.value for schedule in Schedule]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: name schedules among {', '.join(known)} (comma-separated), or auto"
        )
    return tuple(Schedule(name).value for name in names)


def _margin_arg(text: str) -> float:
    """A fraction in [0, 1): the share of device memory held back."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (a fraction of the memory), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rannc", description="Automatic hybrid pipeline + data parallel training for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"rannc {rannc_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_plan(commands)
    show = commands.add_parser("show", help="print the stages of a deployment file")
    show.add_argument("path", metavar="PATH", help="a deployment file written by save_deployment")

    calibrate = commands.add_parser("calibrate", help="measure this machine as a device profile (JSON)")
    calibrate.add_argument("--out", default=None, help="where to write the profile (default: print it)")
    calibrate.add_argument("--quick", action="store_true", help="tiny sizes: seconds, less accurate")
    calibrate.add_argument(
        "--ranks",
        type=_count_arg,
        default=1,
        help="measure with this many local CPU processes at once (gloo, one thread each), as a job of that many "
        "ranks on this machine will run; also measures their links (default 1). For GPUs start the ranks "
        "yourself: `torchrun --nproc-per-node N -m rannc calibrate --out FILE`",
    )

    demo = commands.add_parser("demo", help="train a small GPT-2 on local CPU processes with rannc")
    demo.add_argument(
        "--world-size", type=_count_arg, default=4, help="number of local processes (default 4)"
    )
    demo.add_argument("--steps", type=_count_arg, default=10, help="training steps (default 10)")
    demo.add_argument("--batch-size", type=_count_arg, default=4, help="local batch per process (default 4)")
    demo.add_argument("--seq-len", type=_count_arg, default=64, help="tokens per sample (default 64)")
    demo.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="per-process memory limit (default: small enough that the model must be pipelined)",
    )
    demo.add_argument("--timeout", type=float, default=1800.0, help="seconds before the workers are stopped")
    demo.add_argument(
        "--meta",
        action="store_true",
        help="build the model on meta; each process loads only its stage from a weights file written first",
    )
    return parser


def _add_plan(commands: Any) -> None:
    plan = commands.add_parser(
        "plan",
        help="plan a cluster you don't have, from a model built on the meta device",
        description="Capture the model a factory returns (it may be built under torch.device('meta')), price "
        "its blocks with a device profile and search the pipeline + data parallel plan for WORLD_SIZE devices.",
    )
    plan.add_argument("factory", metavar="MODULE:FACTORY", help="function returning (model, args[, kwargs])")
    plan.add_argument("--world-size", type=_count_arg, required=True, help="number of devices")
    plan.add_argument(
        "--device-memory",
        type=_memory_arg,
        default=None,
        help="memory per device, e.g. 80GiB (default: the profile's)",
    )
    plan.add_argument("--batch-size", type=_count_arg, required=True, help="global batch (samples per step)")
    plan.add_argument(
        "--device", required=True, help="device profile: a shipped name (h100-80gb, ...) or a JSON file"
    )
    plan.add_argument("--gpus-per-node", type=_count_arg, default=None, help="default: the profile's")
    plan.add_argument(
        "--max-microbatches",
        type=_count_arg,
        default=None,
        help="most microbatches tried (default: the global batch, so any count up to the samples per replica)",
    )
    plan.add_argument(
        "--dtype", default=None, help="compute dtype: fp32, tf32, bf16, fp16 (default: the model's)"
    )
    plan.add_argument(
        "--mem-margin", type=_margin_arg, default=0.1, help="fraction of memory held back (default 0.1)"
    )
    plan.add_argument(
        "--max-blocks", type=_count_arg, default=32, help="blocks the stages are made of (default 32)"
    )
    plan.add_argument("--out", default=None, help="write the deployment JSON here")
    plan.add_argument("--plot", default=None, help="draw the plan as a PNG here (needs matplotlib)")
    plan.add_argument("--trace", default=None, help="write the simulated step as a Chrome trace here")
    plan.add_argument(
        "--schedules",
        type=_schedules_arg,
        default=None,
        help="pipeline schedules to choose among, comma-separated, the first preferred on a tie: 1f1b, "
        "zero_bubble, fill_drain, interleaved_1f1b (default auto: as schedule='auto' does)",
    )
    plan.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZER_CHOICES),
        default="adam",
        help="the optimizer the job will step, for its state's memory and the update's time (default adam; a "
        "job reads it from its optimizer)",
    )
    plan.add_argument("--no-recompute", action="store_true", help="never recompute activations")
    plan.add_argument("--zero", action="store_true", help="ZeRO-1: shard optimizer state over replicas")
    plan.add_argument(
        "--shard",
        choices=SHARD_STAGES,
        default="none",
        help="sharded stages (config shard_stages): 'auto' lets each replicated stage take the least ZeRO level "
        "with which it fits; a level forces it on every replicated stage (default none)",
    )
    plan.add_argument(
        "--chunks",
        type=_count_arg,
        default=None,
        help="interleaved_1f1b: model chunks per pipeline position (default: the planner chooses)",
    )
    plan.add_argument(
        "--max-seq-len",
        type=_count_arg,
        default=None,
        help="sequence length (dim 1 of the inputs) varies up to this; the job sets max_seq_len the same",
    )
    plan.add_argument(
        "--opaque-module",
        action="append",
        default=[],
        metavar="NAME",
        help="capture this submodule as one operation (as the config item opaque_modules); repeatable",
    )


_TRACE_PER_RANK = 64  # larger worlds get one trace process per stage instead of one per rank


def _run_plan(args: argparse.Namespace) -> int:
    from .chrome_trace import write_trace
    from .deploy import save_deployment, show_deployment
    from .offline import plan_offline
    from .plan.trace import timeline_to_trace

    if os.getcwd() not in sys.path and "" not in sys.path:  # MODULE:FACTORY may live in the current directory
        sys.path.insert(0, os.getcwd())
    result = plan_offline(
        args.factory,
        world_size=args.world_size,
        device_memory_bytes=args.device_memory,
        global_batch=args.batch_size,
        device=args.device,
        gpus_per_node=args.gpus_per_node,
        max_microbatches=args.max_microbatches,
        dtype=args.dtype,
        **({"schedules": args.schedules} if args.schedules else {}),
        recompute=not args.no_recompute,
        mem_margin=args.mem_margin,
        max_blocks=args.max_blocks,
        zero=args.zero,
        shard=args.shard,
        max_seq_len=args.max_seq_len or 0,
        opaque_modules=tuple(args.opaque_module),
        chunks=args.chunks,
        opt_param_factor=named_optimizer_state_factor(args.optimizer),
    )
    show_deployment(result.deployment)
    if args.out:
        save_deployment(result.deployment, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        from .deploy.plot import plot_plan

        plot_plan(result.deployment, result.timeline, args.plot)
        print(f"wrote {args.plot}")
    if args.trace:
        plan = result.deployment.plan
        positions = plan.stages[: plan.positions]  # chunked plans: one process per position's rank
        ranks = [s.ranks for s in positions] if args.world_size <= _TRACE_PER_RANK else None
        write_trace(args.trace, timeline_to_trace(result.timeline, ranks))
        print(f"wrote {args.trace}")
    return 0


def _calibrate_rank(rank: int, world_size: int, quick: bool, device: str | None) -> dict[str, Any] | None:
    """One rank of `rannc calibrate`: every rank measures `device` (None: its own) at once; rank 0 returns the
    profile (module level: the processes `--ranks N` spawns import it)."""
    from .profile.calibrate import calibrate

    profile = calibrate(device, quick=quick)
    return profile.to_json() if rank == 0 else None


def _run_calibrate(args: argparse.Namespace) -> int:
    """`rannc calibrate`: in this process, on `--ranks N` local CPU processes it starts, or, under torchrun (RANK
    and WORLD_SIZE set), on the ranks torchrun started (rank 0 writes the profile)."""
    import json

    from .profile.devices import DeviceProfile, save_profile

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from .runtime import dist as rdist

        if args.ranks > 1:
            raise ConfigError("under torchrun the ranks are torchrun's: drop --ranks")
        rdist.ensure_initialized()
        found = _calibrate_rank(rdist.get_rank(), rdist.get_world_size(), args.quick, None)
    elif args.ranks > 1:
        from .launch import launch_local

        found = launch_local(_calibrate_rank, args.ranks, (args.quick, "cpu"), timeout=900)[0]
    else:
        found = _calibrate_rank(0, 1, args.quick, None)
    if found is None:  # a rank other than 0 under torchrun
        return 0
    profile = DeviceProfile.from_json(found)
    if args.out:
        save_profile(profile, args.out)
        print(f"wrote {args.out} ({profile.name}); plan with --device {args.out}")
    else:
        print(json.dumps(profile.to_json(), indent=2, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rannc` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "show":
        from .deploy import show_deployment

        try:
            show_deployment(args.path)
        except RanncError as exc:
            print(f"rannc show: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command in ("plan", "calibrate"):
        try:
            return _run_plan(args) if args.command == "plan" else _run_calibrate(args)
        except RanncError as exc:
            print(f"rannc {args.command}: {exc}", file=sys.stderr)
            return 1
    if args.command == "demo":
        from .demo import DemoArgs, run_demo

        return run_demo(
            DemoArgs(
                world_size=args.world_size,
                steps=args.steps,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                mem_limit_gb=args.mem_limit_gb,
                timeout_s=args.timeout,
                meta=args.meta,
            )
        )
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
