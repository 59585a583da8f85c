"""One rank of a job that meets a fault or a misuse on purpose (run by tests/test_faults.py).

`python fault_script.py MODE WORKDIR` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by the test, as a
launcher would. The 6-layer MLP trains with SGD (momentum) on 2 forced stages; every line a test reads is printed
with flush=True.

Modes:
  save_interrupted  train 2 steps, save_sharded into WORKDIR/ckpt (unless NO_FIRST_SAVE is set; rank 0 also
                    torch.saves the full state to WORKDIR/reference.pt), train 2 more steps and save again into
                    WORKDIR/ckpt while rank KILL_RANK dies: after writing its shards (KILL_AT=write) or, on
                    rank 0, right after DCP's metadata (KILL_AT=finish)
  load              wrap a model with other weights, load_sharded(WORKDIR/ckpt) and torch.save the state
                    (model and optimizer) to WORKDIR/loaded.pt
  launch            only wrap the model (rannc starts the process group itself)
  foreign_optimizer wrap the model with an optimizer built over a copy of its parameters
  wrong_shape       train a step (saving the deployment to WORKDIR/deployment.json), then load a state dict
                    whose net.2.weight has the wrong shape
  tight_deployment  load WORKDIR/deployment.json under RANNC_MEM_LIMIT_GB
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

import models  # noqa: E402

import rannc  # noqa: E402

LR, MOMENTUM, BATCH = 0.05, 0.9, 8


def wrap(
    seed: int, optimizer_params: str = "model", **config: object
) -> tuple[rannc.RaNNCModule, torch.optim.SGD]:
    model = models.build("mlp", seed)
    params = copy.deepcopy(model).parameters() if optimizer_params == "copy" else model.parameters()
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    stages = 2 if int(os.environ["WORLD_SIZE"]) > 1 else 1
    settings = models.forced_plan(stages, **{"comm_timeout_s": 10.0, **config})
    print(f"rank {os.environ['RANK']} wrapping at {time.time():.3f}", flush=True)
    return rannc.RaNNCModule(model, optimizer, **settings), optimizer


def train(
    wrapped: rannc.RaNNCModule, optimizer: torch.optim.Optimizer, batches: list, step: bool = True
) -> None:
    rank, world = rannc.get_rank(), rannc.get_world_size()
    for batch in batches:
        models.call(wrapped, models.local_slice(batch, rank, world)).backward()
        if step:
            optimizer.step()
        optimizer.zero_grad()


def full_state(wrapped: rannc.RaNNCModule, optimizer: torch.optim.Optimizer) -> dict | None:
    """Model and optimizer state on rank 0 (every rank must call it)."""
    model = wrapped.state_dict()
    optim = optimizer.state_dict(from_global=True)
    return {"model": model, "optimizer": optim} if rannc.get_rank() == 0 else None


def die_while_saving(rank: int, at: str) -> None:
    """Make this rank's next save_sharded end the process at a chosen point of torch.distributed.checkpoint."""
    from torch.distributed.checkpoint import FileSystemWriter

    if at == "write":
        write_data = FileSystemWriter.write_data

        def write_then_die(self, plan, planner):  # type: ignore[no-untyped-def]
            future = write_data(self, plan, planner)
            future.wait()
            print(f"rank {rank} killed after writing its shards at {time.time():.3f}", flush=True)
            os._exit(9)

        FileSystemWriter.write_data = write_then_die  # type: ignore[method-assign]
    elif at == "finish":
        finish = FileSystemWriter.finish

        def finish_then_die(self, metadata, results):  # type: ignore[no-untyped-def]
            finish(self, metadata, results)
            print(f"rank {rank} killed after the checkpoint metadata at {time.time():.3f}", flush=True)
            os._exit(9)

        FileSystemWriter.finish = finish_then_die  # type: ignore[method-assign]
    else:
        raise ValueError(f"KILL_AT must be 'write' or 'finish', not {at!r}")


def main() -> None:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    cache = str(workdir / "profiles")
    batches = models.make_batches("mlp", 0, 4, BATCH)
    if mode == "save_interrupted":
        wrapped, optimizer = wrap(0, profile_cache_dir=cache)
        train(wrapped, optimizer, batches[:2])
        if not os.environ.get("NO_FIRST_SAVE"):
            wrapped.save_sharded(str(workdir / "ckpt"))
            state = full_state(wrapped, optimizer)
            if rank == 0:
                torch.save(state, workdir / "reference.pt")
        train(wrapped, optimizer, batches[2:])
        if rank == int(os.environ["KILL_RANK"]):
            die_while_saving(rank, os.environ["KILL_AT"])
        print(f"rank {rank} saving at {time.time():.3f}", flush=True)
        wrapped.save_sharded(str(workdir / "ckpt"))
        print(f"rank {rank} saved", flush=True)
    elif mode == "load":
        wrapped, optimizer = wrap(
            1, profile_cache_dir=cache
        )  # other weights: all must come from the checkpoint
        print(f"rank {rank} loading at {time.time():.3f}", flush=True)
        wrapped.load_sharded(str(workdir / "ckpt"))
        train(wrapped, optimizer, batches[:1], step=False)  # partitions the model, which loads the checkpoint
        state = full_state(wrapped, optimizer)
        if rank == 0:
            torch.save(state, workdir / "loaded.pt")
    elif mode == "launch":
        wrap(0, profile_cache_dir=cache)
    elif mode == "foreign_optimizer":
        wrap(0, optimizer_params="copy", profile_cache_dir=cache)
    elif mode == "wrong_shape":
        deployment = str(workdir / "deployment.json")
        wrapped, optimizer = wrap(
            0, profile_cache_dir=cache, save_deployment=True, deployment_file=deployment
        )
        train(wrapped, optimizer, batches[:1])
        state = models.build("mlp", 2).state_dict()
        state["net.2.weight"] = torch.zeros(64, 32)  # the model's is 32 x 32
        print(f"rank {rank} loading a state dict at {time.time():.3f}", flush=True)
        wrapped.load_state_dict(state)
    elif mode == "tight_deployment":
        deployment = str(workdir / "deployment.json")
        wrapped, optimizer = wrap(
            0, profile_cache_dir=cache, load_deployment=True, deployment_file=deployment
        )
        print(f"rank {rank} calling at {time.time():.3f}", flush=True)
        train(wrapped, optimizer, batches[:1])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print(f"rank {rank} finished", flush=True)


if __name__ == "__main__":
    main()
