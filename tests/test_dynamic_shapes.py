"""Sequence lengths that change from batch to batch (dynamic padding): with `max_seq_len`, one capture and one
plan serve every length up to it, and training equals one process on the same batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from distributed_helpers import run_workers
from models import forced_plan

import rannc
import rannc.partition
from rannc.errors import InputError
from rannc.plan import Plan

MAX_LEN = 128
LENGTHS = [9, 128, 37, 8, 77]  # each global batch padded to its own longest sample (8 to 128)
GLOBAL_BATCH = 4


def build_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    # the default GPT-2 config at a small size (dropout off: one process must draw the same masks otherwise)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).train()


def batch_of(step: int, length: int) -> torch.Tensor:
    return torch.randint(0, 128, (GLOBAL_BATCH, length), generator=torch.Generator().manual_seed(step))


def dynamic_worker(rank: int, world: int) -> dict[str, Any]:
    captures = []
    real_capture = rannc.partition.capture

    def counting_capture(*args: Any, **kwargs: Any) -> Any:
        captures.append(kwargs.get("max_seq_len"))
        return real_capture(*args, **kwargs)

    rannc.partition.capture = counting_capture
    model = build_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model = rannc.RaNNCModule(model, optimizer, **forced_plan(2, max_seq_len=MAX_LEN))
    losses = []
    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    for step, length in enumerate(LENGTHS):
        ids = batch_of(step, length)[lo:hi]
        mask = torch.ones_like(ids)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    errors = {}
    try:  # longer than declared
        ids = batch_of(99, MAX_LEN + 8)[lo:hi]
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    except InputError as exc:
        errors["too_long"] = str(exc)
    try:  # the ranks disagree on the length of this call
        ids = batch_of(98, 8 + 4 * rank)[lo:hi]
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    except InputError as exc:
        errors["ranks_disagree"] = str(exc)
    state = model.state_dict()
    return {
        "losses": losses,
        "captures": captures,
        "errors": errors,
        "state": {k: v.clone() for k, v in state.items()} if rank == 0 else None,
        "plan": model.deployment.plan.to_json(),
    }


def one_process() -> dict[str, Any]:
    model = build_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step, length in enumerate(LENGTHS):
        ids = batch_of(step, length)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return {"losses": losses, "state": model.state_dict()}


@pytest.mark.slow
def test_dynamic_padding_trains_as_one_process_with_one_capture() -> None:
    runs = run_workers(dynamic_worker, 2, timeout=400)
    reference = one_process()
    for rank, run in enumerate(runs):
        assert run["captures"] == [MAX_LEN], f"rank {rank} captured {len(run['captures'])} times"
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-5), rank
        assert "max_seq_len" in run["errors"]["too_long"], run["errors"]
        assert "pad every rank's batch to the same length" in run["errors"]["ranks_disagree"], run["errors"]
    plan = Plan.from_json(runs[0]["plan"])
    assert plan.positions == 2  # a pipeline over both ranks (of one or more model chunks each)
    state = runs[0]["state"]
    for name, expected in reference["state"].items():
        assert torch.allclose(state[name], expected, rtol=1e-5, atol=1e-6), name


def meta_gpt2_at_max() -> tuple[torch.nn.Module, tuple[()], dict[str, torch.Tensor]]:
    with torch.device("meta"):
        model = build_gpt2()
    ids = torch.zeros(1, MAX_LEN, dtype=torch.long, device="meta")
    return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.slow
def test_offline_plan_with_max_seq_len_matches_the_job() -> None:
    """`rannc plan --max-seq-len` (plan_offline) makes the graph a job with max_seq_len captures, whatever
    length the job's first call has, so the job loads the plan."""
    from rannc.capture import capture
    from rannc.offline import plan_offline

    offline = plan_offline(
        meta_gpt2_at_max,
        world_size=2,
        device_memory_bytes=None,
        global_batch=4,
        device="cpu",
        max_seq_len=MAX_LEN,
    )
    ids = batch_of(0, 9)
    job = capture(build_gpt2(), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                  max_seq_len=MAX_LEN)  # fmt: skip
    assert [d.max_size for d in job.dynamic_dims] == [MAX_LEN] * 3
    assert offline.deployment.graph_hash == job.graph_hash
    fixed = capture(
        build_gpt2(), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    )
    assert fixed.graph_hash != job.graph_hash  # a fixed-length job refuses the plan
