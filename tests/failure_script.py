"""One rank of a 4-rank training job that breaks on purpose at step 2 (run by tests/test_failures.py)."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import models  # noqa: E402

import rannc  # noqa: E402


def main() -> None:
    mode, cache = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    model = models.build("skip_tied", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = rannc.RaNNCModule(
        model,
        opt,
        partition_num=4,
        min_pipeline=2,
        max_pipeline=2,
        profile_iterations=1,
        show_progress=False,
        profile_cache_dir=cache,
        comm_timeout_s=float(os.environ.get("TEST_COMM_TIMEOUT", "20")),
    )
    batches = models.make_batches("skip_tied", 0, 4, 8)
    for step, batch in enumerate(batches):
        local = models.local_slice(batch, rank, 4)
        if step == 2 and rank == 0 and mode == "raise":
            local["args"][0] = local["args"][0] + 10_000  # token ids out of range: the embedding stage fails
        if step == 2 and rank == 3 and mode == "kill":
            print(f"rank {rank} killing itself at {time.time():.3f}", flush=True)
            os._exit(9)
        if step == 2 and rank == 3 and mode == "hang":
            print(f"rank {rank} hanging at {time.time():.3f}", flush=True)
            time.sleep(600)
        out = models.call(wrapped, local)
        models.get_loss("skip_tied", out).backward()
        opt.step()
        opt.zero_grad()
    print(f"rank {rank} finished", flush=True)


if __name__ == "__main__":
    main()
