"""Sharded stages (ZeRO-2 and ZeRO-3, config shard_stages): training equals DDP and one process on the global batch
(the user loops of tests/user_loops.py, SGD with momentum, rtol 1e-5), checkpoints (full state dicts and
save_sharded / load_sharded) resume exactly on a sharded or an unsharded plan, and a ZeRO-3 rank holds 1/replicas
of its stage's parameters, gradients and optimizer state."""

from __future__ import annotations

from typing import Any

import pytest
import sharded_workers as workers
from distributed_helpers import run_workers
from test_user_loops import RETURNED, _assert_rows, assert_close
from user_loops import LoopCase, run_loop_cases, train_one_process

GROUPS: dict[str, tuple[int, list[LoopCase]]] = {
    "w2": (
        2,
        [
            LoopCase("zero2-data-parallel", "mlp", "mse", stages=1, microbatches=2, shard="zero-2"),
            LoopCase("zero3-data-parallel", "mlp", "mse", stages=1, microbatches=2, shard="zero-3"),
            LoopCase("zero3-cnn", "cnn", "cross_entropy", stages=1, microbatches=2, shard="zero-3"),
            LoopCase(
                "zero3-loss-plus-logits-1f1b",
                "loss_and_logits",
                "returned_plus_logits",
                1,
                2,
                "1f1b",
                shard="zero-3",
            ),
        ],
    ),
    "w4": (
        4,
        [
            LoopCase(
                "zero2-2stages-unequal-replicas", "mlp", "mse", stages=2, microbatches=2, shard="zero-2"
            ),
            LoopCase(
                "zero3-2stages-unequal-replicas", "mlp", "mse", stages=2, microbatches=2, shard="zero-3"
            ),
            LoopCase(
                "zero3-two-losses-clip",
                "two_heads",
                "two_losses",
                stages=2,
                microbatches=2,
                clip=True,
                shard="zero-3",
            ),
            LoopCase(
                "zero3-no-sync-accumulation",
                "mlp",
                "mse",
                stages=2,
                microbatches=2,
                accumulate=2,
                shard="zero-3",
            ),
            LoopCase(
                "zero2-delay-grad-allreduce",
                "mlp",
                "mse",
                stages=2,
                microbatches=2,
                accumulate=2,
                delay_allreduce=True,
                shard="zero-2",
            ),
        ],
    ),
    # zero bubble: W passes reduce ZeRO-3's units (their gathers' backwards) and feed ZeRO-2's owner reduce
    "zb-w4": (
        4,
        [
            LoopCase("zb-zero2-2stages", "loss_and_logits", "returned", 2, 4, "zero_bubble", shard="zero-2"),
            LoopCase("zb-zero3-2stages", "loss_and_logits", "returned", 2, 4, "zero_bubble", shard="zero-3"),
            LoopCase(
                "zb-zero3-plus-logits",
                "loss_and_logits",
                "returned_plus_logits",
                2,
                2,
                "zero_bubble",
                shard="zero-3",
            ),
        ],
    ),
}
CASES = [
    pytest.param(group, k, id=case.label)
    for group, (_, cases) in GROUPS.items()
    for k, case in enumerate(cases)
]
_runs: dict[str, list[list[dict[str, Any]]]] = {}


def group_results(group: str) -> list[list[dict[str, Any]]]:
    if group not in _runs:
        world, cases = GROUPS[group]
        per_rank = run_workers(run_loop_cases, world, cases, timeout=420)
        _runs[group] = [[per_rank[r][k] for r in range(world)] for k in range(len(cases))]
    return _runs[group]


@pytest.mark.slow
@pytest.mark.parametrize(("group", "index"), CASES)
def test_sharded_stage_matches_ddp_and_one_process(group: str, index: int) -> None:
    world, cases = GROUPS[group]
    case = cases[index]
    runs = group_results(group)[index]
    rannc_run = runs[0]["rannc"]
    assert len(rannc_run["stages"]) == case.stages, rannc_run["stages"]
    # every replicated stage runs sharded at the forced level
    assert rannc_run["shards"] == [case.shard if r > 1 else "none" for r in rannc_run["stages"]]
    assert any(r > 1 for r in rannc_run["stages"])
    references = {"DDP": runs[0]["ddp"], "one process": train_one_process(case, world)}
    for label, ref in references.items():
        what = f"{case.label} vs {label}"
        assert_close(rannc_run["momentum1"], ref["momentum1"], f"{what}, gradients of step 1")
        assert_close(rannc_run["state"], ref["state"], f"{what}, parameters after training")
        assert_close(rannc_run["momentum"], ref["momentum"], f"{what}, final momentum")
        if label == "one process":
            _assert_rows(runs, "input_grad", [ref["input_grad"]], case, world, f"{what}, input gradient")
            if case.loss not in RETURNED:
                _assert_rows(runs, "eval", ref["eval"], case, world, f"{what}, eval outputs")
        if case.clip:
            assert rannc_run["norms"] == pytest.approx(ref["norms"], rel=1e-5), what


@pytest.mark.slow
@pytest.mark.parametrize("level", ["zero-2", "zero-3"])
def test_checkpoints_of_a_sharded_stage_resume_exactly(tmp_path, level: str) -> None:
    """2 ranks, one stage of 2 replicas sharded at `level`: train, save (sharded and full), train on; resume from
    either checkpoint on the same level and on an unsharded plan: every run ends where one process does."""
    path = str(tmp_path / "ckpt")
    cache = str(tmp_path / "cache")
    saved = run_workers(workers.save_worker, 2, cache, path, level, timeout=300)
    assert saved[0]["shards"] == [level]
    reference = workers.one_process()
    assert_close(saved[0]["final"], reference, f"{level}: uninterrupted training vs one process")
    full = (saved[0]["full"], saved[0]["full_optimizer"])
    for shard in (level, "none"):
        resumed = run_workers(workers.resume_worker, 2, cache, path, shard, timeout=300)[0]
        assert_close(resumed, reference, f"{level} sharded checkpoint resumed on {shard}")
        # handed to the ranks in shared memory: on "none" both replicas step every parameter from its state
        resumed = run_workers(workers.resume_worker, 2, cache, None, shard, full, timeout=300)[0]
        assert_close(resumed, reference, f"{level} full state dicts resumed on {shard}")
    total = saved[0]["total"]
    for rank, run in enumerate(saved):
        held = run["held"]
        # gradients and optimizer state of the stage's parameters: each replica keeps its owned half
        assert held["grads"] == total // 2, (rank, held, total)
        assert held["optimizer"] == total // 2, (rank, held, total)
        # ZeRO-3: parameters too (between steps a rank holds only what it owns)
        assert held["params"] == (total // 2 if level == "zero-3" else total), (rank, held, total)
