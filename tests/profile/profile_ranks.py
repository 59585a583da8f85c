"""Spawn a few gloo ranks on 127.0.0.1 for the profile tests, and the blocks those ranks profile."""

from __future__ import annotations

import datetime
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rannc.profile import BlockRunner


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    fn: Callable[..., None], world_size: int, args: tuple[Any, ...], timeout_s: float = 60.0
) -> None:
    """Run `fn(rank, world_size, port, *args)` in `world_size` spawned processes; fail on error or timeout."""
    port = free_port()
    context = mp.start_processes(
        _rank_main,
        args=(fn, world_size, port, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s} s")


def _rank_main(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        fn(rank, world_size, port, *args)
    finally:
        dist.destroy_process_group()


def mlp_runners(num_blocks: int, width: int = 64) -> list[BlockRunner]:
    """`num_blocks` linear+relu blocks with seeded weights (identical on every rank)."""
    generator = torch.Generator().manual_seed(1234)
    runners = []
    for _ in range(num_blocks):
        weight = torch.randn(width, width, generator=generator).requires_grad_(True)
        bias = torch.randn(width, generator=generator).requires_grad_(True)
        runners.append(
            BlockRunner(
                module=lambda x, w, b: (torch.nn.functional.linear(x, w, b).relu(),),
                make_inputs=lambda m, w=weight, b=bias: [torch.randn(m, width), w, b],
                param_input_indices=frozenset({1, 2}),
            )
        )
    return runners


def profile_twice(
    rank: int, world_size: int, port: int, out_dir: str, sizes: list[int], num_blocks: int
) -> None:
    """Profile with an empty cache, then again with the cache rank 0 wrote; record what each call measured."""
    import rannc.profile.distributed as profile_distributed
    from rannc.config import Config

    calls: list[tuple[int, ...]] = []
    measure = profile_distributed.measure_block

    def counting_measure(runner: BlockRunner, microbatch_sizes: list[int], *args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(microbatch_sizes))
        return measure(runner, microbatch_sizes, *args, **kwargs)

    profile_distributed.measure_block = counting_measure
    config = Config(
        profile_cache_dir=str(Path(out_dir) / "cache"), show_progress=rank == 0, profile_iterations=1
    )
    runners = mlp_runners(num_blocks)
    results = []
    for _ in range(2):
        calls.clear()
        profiles = profile_distributed.profile_blocks(runners, sizes, cache_key="mlp", config=config)
        results.append({"measured": len(calls), "profiles": [p.to_json() for p in profiles]})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
