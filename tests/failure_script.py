"""One rank of a 4-rank training job that breaks on purpose (run by tests/test_failures.py).

`python failure_script.py MODE PROFILE_CACHE [WORKDIR]`, with RANK/WORLD_SIZE/MASTER_* set. Modes on the
4-stage skip_tied model: "raise" (rank 0 fails in its stage at step 2), "kill" (rank 3 exits at step 2), "hang"
(rank 3 sleeps at step 2). Modes on the 6-layer MLP with 2 stages x 2 replicas, written as a user's training script would be:

* "skip": rank 1's own code raises between forward and backward at step 2; the script catches it and goes on
  with the next step (TEST_OVERLAP=0|1 sets overlap_grad_sync);
* "sigkill" / "sigterm": rank 1 gets the signal at step 2 while it waits for the other ranks (rank 3 is late);
* "kill_in_save": rank 1 is killed while `save_sharded` writes its files;
* "input_error": rank 1 alone passes an input of the wrong shape at step 2 (rannc raises InputError there);
* "state_dict_rank0": the DDP idiom `if rank == 0: sd = model.state_dict()` then `dist.barrier()`;
* "late_rank": nothing fails; rank 1 stays 1.5 s longer in its script than the others (rank 0's process hosts
  the job's store, which rank 1's watchdog still watches).

Lines starting with "event" carry the time of the failure (`time.time()`), which the test measures from.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import models  # noqa: E402

import rannc  # noqa: E402

FAILING_STEP = 2


def event(text: str) -> None:
    print(f"event rank {os.environ['RANK']} {text} at {time.time():.3f}", flush=True)


def _job_items(cache: str) -> dict[str, object]:
    """The config items every job here shares: the test's profile cache and comm_timeout_s."""
    return {"profile_cache_dir": cache, "comm_timeout_s": float(os.environ.get("TEST_COMM_TIMEOUT", "20"))}


def skip_tied_job(mode: str, cache: str, rank: int) -> None:
    model = models.build("skip_tied", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = rannc.RaNNCModule(model, opt, **models.forced_plan(4, **_job_items(cache)))
    batches = models.make_batches("skip_tied", 0, 4, 8)
    for step, batch in enumerate(batches):
        local = models.local_slice(batch, rank, 4)
        if step == FAILING_STEP and rank == 0 and mode == "raise":
            event("passes token ids out of range")
            local["args"][0] = local["args"][0] + 10_000  # token ids out of range: the embedding stage fails
        if step == FAILING_STEP and rank == 3 and mode == "kill":
            event("killing itself")
            os._exit(9)
        if step == FAILING_STEP and rank == 3 and mode == "hang":
            event("hanging")
            time.sleep(600)
        out = models.call(wrapped, local)
        models.get_loss("skip_tied", out).backward()
        opt.step()
        opt.zero_grad()


def _signal_self_soon(signum: int, delay_s: float) -> None:
    def send() -> None:
        event(f"sends itself signal {signum}")
        os.kill(os.getpid(), signum)

    threading.Timer(delay_s, send).start()


def _die_while_writing() -> None:
    """Rank 1's checkpoint writer kills the process (as an OOM killer or a node failure would)."""
    from torch.distributed.checkpoint import FileSystemWriter

    def write_data(self, plan, planner):  # noqa: ANN001, ANN202 (FileSystemWriter.write_data's signature)
        event("killed while writing its checkpoint files")
        os.kill(os.getpid(), signal.SIGKILL)

    FileSystemWriter.write_data = write_data


def mlp_job(mode: str, cache: str, rank: int, workdir: str) -> None:
    model = models.build("mlp", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    overlap = os.environ.get("TEST_OVERLAP", "1") == "1"
    items = _job_items(cache)
    stages = 2
    if mode == "state_dict_rank0":
        # rank 0's stage must lack parameters, or its state_dict needs no other rank: 4 stages of one rank, with
        # transfers priced free, spread this tiny model's layers (2 stages of 2 replicas sometimes left them all
        # on rank 0's stage, the measured costs of its few microseconds being noisy)
        stages = 4
        items.update(p2p_latency_us=0.001, p2p_bandwidth_gbps=1e6)
    wrapped = rannc.RaNNCModule(model, opt, **models.forced_plan(stages, overlap_grad_sync=overlap, **items))
    for step, batch in enumerate(models.make_batches("mlp", 0, 5, 16)):
        x, y = models.local_slice(batch, rank, 4)["args"]
        if step == FAILING_STEP and rank == 1 and mode == "input_error":
            event("passes a wrongly shaped input")
            x = torch.cat([x, x[:, :1]], dim=1)
        if step == FAILING_STEP and rank == 1 and mode in ("sigkill", "sigterm"):
            _signal_self_soon(signal.SIGKILL if mode == "sigkill" else signal.SIGTERM, 1.0)
        if step == FAILING_STEP and rank == 3 and mode in ("sigkill", "sigterm"):
            time.sleep(4.0)  # rank 1 is blocked in the step's first collective when the signal comes
        try:
            loss = wrapped(x, y)
            if step == FAILING_STEP and rank == 1 and mode == "skip":
                raise ValueError("a bad batch (raised by the user's own code)")
            loss.backward()
            opt.step()
            opt.zero_grad()
        except ValueError as exc:  # the user's script skips a batch it cannot handle
            event(f"skips step {step}: {exc}")
            opt.zero_grad()
            continue
        if step == 1 and mode == "kill_in_save":
            if rank == 1:
                _die_while_writing()
            wrapped.save_sharded(os.path.join(workdir, "checkpoint"))
        if step == 1 and mode == "state_dict_rank0":
            if rank == 0:
                event("calls state_dict alone")
                torch.save(wrapped.state_dict(), os.path.join(workdir, "model.pt"))
            dist.barrier()
    # a sum over no tensors on a rank that holds no parameter (the plan may leave a stage only the loss)
    weights = sum((p.detach().double().sum().item() for p in wrapped.parameters()), 0.0)
    print(f"rank {rank} weights {weights:.12e}", flush=True)


def main() -> None:
    mode, cache = sys.argv[1], sys.argv[2]
    workdir = sys.argv[3] if len(sys.argv) > 3 else os.path.dirname(cache)
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if mode in ("raise", "kill", "hang"):
        skip_tied_job(mode, cache, rank)
    else:
        mlp_job(mode, cache, rank, workdir)
    if mode == "late_rank" and rank == 1:
        time.sleep(1.5)
    print(f"rank {rank} finished", flush=True)


if __name__ == "__main__":
    main()
