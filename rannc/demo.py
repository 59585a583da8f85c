"""`rannc demo`: train a small random GPT-2 on local CPU workers with a memory limit that forces a pipeline."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .launch import LaunchError, launch_local

SEED = 1234
VOCAB_SIZE = 2048
MAX_SEQ_LEN = 128


@dataclasses.dataclass(frozen=True)
class DemoArgs:
    world_size: int = 4
    steps: int = 10
    batch_size: int = 4  # local batch per rank
    seq_len: int = 64
    mem_limit_gb: float | None = None  # None = chosen so that the whole model does not fit one rank
    lr: float = 1e-3
    timeout_s: float = 1800.0
    meta: bool = False  # build on meta; each rank loads its stage from a weights file written first
    weights_file: str = ""  # set by run_demo with meta


def build_model(seed: int = SEED, shape: Any = None) -> Any:
    """A small GPT-2 LM with random weights (the same on every rank for the same seed), in plain torch:
    `model(input_ids, labels)` returns the mean next-token cross-entropy (see rannc.demo_model)."""
    import torch

    from .demo_model import GPT2LMHeadModel, GPT2Shape

    torch.manual_seed(seed)
    return GPT2LMHeadModel(shape if shape is not None else GPT2Shape(VOCAB_SIZE, MAX_SEQ_LEN))


def param_bytes(model: Any) -> int:
    """Bytes of the model's distinct parameters (tied weights counted once)."""
    distinct = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in distinct.values())


def choose_mem_limit_gb(model: Any, mem_margin: float = 0.1, fraction: float = 0.9) -> float:
    """A per-rank limit whose usable part (after `mem_margin`) holds `fraction` of the training state.

    Training state = parameters + gradients + AdamW's two moments = 4x the parameter bytes. With
    fraction < 1 the whole model cannot run on one rank, while half of it (plus activations) can,
    so the planner has to split the model into pipeline stages.
    """
    state = 4 * param_bytes(model)
    return fraction * state / (1.0 - mem_margin) / 2**30


def make_batch(rank: int, batch_size: int, seq_len: int, vocab_size: int) -> Any:
    """This rank's own random token ids (a fixed batch, so the loss visibly drops as the model memorises it)."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 1 + rank)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)


def demo_worker(rank: int, world_size: int, args: DemoArgs) -> dict[str, Any]:
    """One rank of the demo: wrap the model with RaNNCModule and train `args.steps` steps."""
    import torch
    from rich.console import Console

    import rannc

    from .config import load_config
    from .deploy import show_deployment

    console = Console(width=140) if rank == 0 else None
    if args.meta:  # the large-model path: no rank builds the whole model; each reads its own stage
        with torch.device("meta"):
            model = build_model()
        weights: dict[str, Any] = {"load_weights": args.weights_file}
    else:
        model = build_model()
        weights = {}
    limit_gb = args.mem_limit_gb
    if limit_gb is None:
        limit_gb = choose_mem_limit_gb(model, load_config().mem_margin)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if console is not None:
        console.print(
            f"model: GPT-2, {param_bytes(model) / 2**20:.1f} MiB of fp32 parameters "
            f"({4 * param_bytes(model) / 2**20:.1f} MiB with gradients and AdamW state); "
            f"mem_limit_gb={limit_gb:.4f} per rank"
        )
    model = rannc.RaNNCModule(model, optimizer, mem_limit_gb=limit_gb, **weights)
    ids = make_batch(rank, args.batch_size, args.seq_len, VOCAB_SIZE)
    global_batch = args.batch_size * world_size
    losses: list[float] = []
    times: list[float] = []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        losses.append(float(loss.detach()))
        times.append(elapsed)
        if console is None:
            continue
        if step == 1:
            deployment = getattr(model, "deployment", None)
            if deployment is not None:
                show_deployment(deployment, console=console)
            note = " (includes capture, profiling and planning)"
        else:
            note = ""
        console.print(
            f"step {step:3d}  loss {losses[-1]:.4f}  {global_batch / elapsed:8.1f} samples/s  "
            f"({elapsed * 1e3:.0f} ms){note}"
        )
    return {"losses": losses, "step_times": times, "global_batch": global_batch}


def write_demo_weights(directory: Path) -> str:
    """The demo model's weights as a state dict file (what a user's checkpoint would be)."""
    import torch

    path = directory / "gpt2-demo.pt"
    torch.save(build_model().state_dict(), path)
    print(
        f"wrote the model's weights to {path}; every rank builds it on meta and loads its own stage",
        flush=True,
    )
    return str(path)


def run_demo(args: DemoArgs) -> int:
    """Launch the demo's local workers; print a summary. Returns the process exit status."""
    if args.world_size < 2 or args.steps < 1 or args.batch_size < 1 or not 1 <= args.seq_len <= MAX_SEQ_LEN:
        print(
            f"rannc demo: need --world-size >= 2, --steps >= 1, --batch-size >= 1 and "
            f"1 <= --seq-len <= {MAX_SEQ_LEN}",
            file=sys.stderr,
        )
        return 2
    print(
        f"rannc demo: {args.world_size} local CPU workers (gloo), local batch {args.batch_size}, "
        f"sequence length {args.seq_len}, {args.steps} steps",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="rannc-demo-") as scratch:
        if args.meta:
            args = dataclasses.replace(args, weights_file=write_demo_weights(Path(scratch)))
        try:
            results = launch_local(demo_worker, args.world_size, (args,), timeout=args.timeout_s)
        except LaunchError as exc:
            print(f"rannc demo failed: {exc}", file=sys.stderr)
            return 1
    first = results[0]
    losses, times = first["losses"], first["step_times"]
    steady = times[1:] or times
    print(
        f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
        f"median {first['global_batch'] / statistics.median(steady):.1f} samples/s after the first step"
    )
    return 0
