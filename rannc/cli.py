"""The `rannc` command: show a deployment file, run the local demo, print the version."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .deploy.deployment import rannc_version
from .errors import RanncError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rannc", description="Automatic hybrid pipeline + data parallel training for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"rannc {rannc_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    show = commands.add_parser("show", help="print the stages of a deployment file")
    show.add_argument("path", metavar="PATH", help="a deployment file written by save_deployment")

    demo = commands.add_parser("demo", help="train a small GPT-2 on local CPU processes with rannc")
    demo.add_argument("--world-size", type=int, default=4, help="number of local processes (default 4)")
    demo.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    demo.add_argument("--batch-size", type=int, default=4, help="local batch per process (default 4)")
    demo.add_argument("--seq-len", type=int, default=64, help="tokens per sample (default 64)")
    demo.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="per-process memory limit (default: small enough that the model must be pipelined)",
    )
    demo.add_argument("--timeout", type=float, default=1800.0, help="seconds before the workers are stopped")
    return parser


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
            )
        )
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
