"""The DDP contract on the loops users write: a backward through the wrapped model's outputs on every rank gives
the average over ranks of each rank's gradient (for equal local batches: one process on the global batch).

Each case trains with rannc and with DDP in the same spawned ranks (SGD with momentum, so a gradient scale
error shows in the parameters), and one process trains the global batches. Compared at rtol 1e-5: the SGD
momentum buffers after the first step (exactly the gradients), the final parameters and buffers, the final
momentum buffers, the per-rank losses and, with clipping, the clipped norms. Buffers written in forward
(BatchNorm's running statistics): a pipeline of one replica per stage equals one process (its microbatches
updating them in order, as sequential accumulation over row chunks would); replicated stages average their
replicas' statistics, which equals the mean of DDP's ranks' statistics.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed_helpers import run_workers
from user_loops import LoopCase, local_sizes, returns_logits, run_loop_cases, train_one_process

RTOL = 1e-5
ATOL = 1e-6

PLAIN = ("ddp", "one_process")
RETURNED = (
    "returned",
    "returned_plus_logits",
)  # the model returns the loss: the global batch's on every rank
INTERLEAVED = "interleaved_1f1b"
GROUPS: dict[str, tuple[int, list[LoopCase]]] = {
    "w2": (
        2,
        [
            LoopCase("mlp-mse-data-parallel", "mlp", "mse", stages=1, microbatches=1),
            LoopCase("mlp-mse-2stages-mb2", "mlp", "mse", stages=2, microbatches=2),
            LoopCase("cnn-cross-entropy-2stages-mb2", "cnn", "cross_entropy", stages=2, microbatches=2),
            LoopCase("mlp-explicit-gradient-2stages", "mlp", "explicit_gradient", stages=2, microbatches=1),
            LoopCase("two-losses-2stages-mb2", "two_heads", "two_losses", stages=2, microbatches=2),
            LoopCase(
                "returned-loss-plus-logits-1f1b", "loss_and_logits", "returned_plus_logits", 2, 2, "1f1b"
            ),
            LoopCase("returned-loss-plus-logits-filldrain", "loss_and_logits", "returned_plus_logits", 2, 2),
            # DDP averages the ranks' gradients whatever their batch sizes (one process would weight by rows)
            LoopCase(
                "mlp-unequal-local-batches", "mlp", "mse", 1, 1, local_batches=(5, 11), references=("ddp",)
            ),
            LoopCase("batchnorm-pipeline-mb1", "batchnorm", "mse", 2, 1, references=("one_process",)),
            LoopCase(
                "batchnorm-pipeline-mb2", "batchnorm", "mse", 2, 2, references=("one_process",), chunks=(8, 8)
            ),
            LoopCase("batchnorm-data-parallel", "batchnorm", "mse", 1, 1, references=("ddp",)),
        ],
    ),
    "w4": (
        4,
        [
            LoopCase("mlp-mse-2x2-mb2", "mlp", "mse", stages=2, microbatches=2),
            LoopCase(
                "two-losses-3stages-unequal-replicas", "two_heads", "two_losses", stages=3, microbatches=2
            ),
            LoopCase("mlp-mse-4stages-mb4", "mlp", "mse", stages=4, microbatches=4),
            LoopCase("mlp-no-sync-accumulation", "mlp", "mse", stages=2, microbatches=2, accumulate=2),
            LoopCase(
                "mlp-delay-grad-allreduce",
                "mlp",
                "mse",
                stages=2,
                microbatches=2,
                accumulate=3,
                delay_allreduce=True,
            ),
            LoopCase("mlp-clip-grad-norm", "mlp", "cross_entropy", stages=2, microbatches=2, clip=True),
            LoopCase("mlp-zero1", "mlp", "mse", stages=2, microbatches=2, zero=True),
            LoopCase(
                "returned-loss-plus-logits-4stages-1f1b",
                "loss_and_logits",
                "returned_plus_logits",
                4,
                4,
                "1f1b",
            ),
            LoopCase("batchnorm-4-replicas", "batchnorm", "mse", 1, 1, references=("ddp",)),
        ],
    ),
    # Zero bubble (I and W passes): the model's own loss (eager, backwards inside the forward call) and the loss
    # plus a term of the logits outside the model (the call replayed), 2, 3 and 4 stages, unequal replicas,
    # recompute, written buffers, no_sync, delayed allreduce, clipping, ZeRO-1.
    "zb-w2": (
        2,
        [
            LoopCase("zb-returned-loss-2stages-mb4", "loss_and_logits", "returned", 2, 4, "zero_bubble"),
            LoopCase(
                "zb-returned-plus-logits-2stages",
                "loss_and_logits",
                "returned_plus_logits",
                2,
                3,
                "zero_bubble",
            ),
            LoopCase(
                "zb-recompute-2stages",
                "loss_and_logits",
                "returned",
                2,
                4,
                "zero_bubble",
                recompute="always",
            ),
            LoopCase(
                "zb-batchnorm-2stages-mb2",
                "batchnorm_loss_logits",
                "returned",
                2,
                2,
                "zero_bubble",
                references=("one_process",),
                chunks=(8, 8),
            ),
        ],
    ),
    "zb-w4": (
        4,
        [
            LoopCase(
                "zb-3stages-unequal-replicas-clip",
                "loss_and_logits",
                "returned",
                3,
                2,
                "zero_bubble",
                clip=True,
            ),
            LoopCase("zb-4stages-mb4", "loss_and_logits", "returned", 4, 4, "zero_bubble"),
            LoopCase(
                "zb-2x2-zero1-no-sync",
                "loss_and_logits",
                "returned",
                2,
                2,
                "zero_bubble",
                accumulate=2,
                zero=True,
            ),
            LoopCase(
                "zb-4stages-delay-allreduce-plus-logits",
                "loss_and_logits",
                "returned_plus_logits",
                4,
                4,
                "zero_bubble",
                accumulate=2,
                delay_allreduce=True,
            ),
        ],
    ),
    # Interleaved 1F1B: `stages` positions x `model_chunks` chunks (virtual stage k on position k % stages).
    "interleaved-w2": (
        2,
        [
            LoopCase("interleaved-2x2", "mlp_loss", "returned", 2, 2, INTERLEAVED, model_chunks=2),
            # the first layer's output feeds every later chunk: other positions' and this position's own
            LoopCase("interleaved-2x3-skips", "skip_loss", "returned", 2, 4, INTERLEAVED, model_chunks=3),
            LoopCase("interleaved-2x2-tied", "tied_loss", "returned", 2, 2, INTERLEAVED, model_chunks=2),
            LoopCase(
                "interleaved-2x2-batchnorm",
                "batchnorm_loss",
                "returned",
                2,
                2,
                INTERLEAVED,
                references=("one_process",),
                chunks=(8, 8),
                model_chunks=2,
            ),
            # other outputs get gradients too: the call's forwards are replayed and backpropagated after it
            LoopCase(
                "interleaved-returned-plus-logits",
                "loss_and_logits",
                "returned_plus_logits",
                2,
                2,
                INTERLEAVED,
                model_chunks=2,
            ),
        ],
    ),
    "interleaved-w4": (
        4,
        [
            LoopCase(
                "interleaved-2x2-2-replicas", "skip_loss", "returned", 2, 2, INTERLEAVED, model_chunks=2
            ),
            LoopCase(
                "interleaved-zero1", "tied_loss", "returned", 2, 2, INTERLEAVED, model_chunks=2, zero=True
            ),
            # shard_stages "zero-1": the plan's positions shard the optimizer state (not the global enable_zero)
            LoopCase(
                "interleaved-shard-zero1",
                "skip_loss",
                "returned",
                2,
                2,
                INTERLEAVED,
                model_chunks=2,
                shard="zero-1",
            ),
            LoopCase(
                "interleaved-clip-no-sync-accumulation",
                "tied_loss",
                "returned",
                2,
                2,
                INTERLEAVED,
                model_chunks=2,
                clip=True,
                accumulate=2,
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
    """Per case, per rank: {"rannc": ..., "ddp": ...} (one spawn per group, shared by its tests)."""
    if group not in _runs:
        world, cases = GROUPS[group]
        per_rank = run_workers(run_loop_cases, world, cases, timeout=420)
        _runs[group] = [[per_rank[r][k] for r in range(world)] for k in range(len(cases))]
    return _runs[group]


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert set(actual) == set(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))}"
    for name, value in expected.items():
        got = actual[name]
        if not value.is_floating_point():
            assert torch.equal(got, value), f"{what}: {name} is {got}, expected {value}"
            continue
        scale = (got.double().norm() / value.double().norm().clamp_min(1e-30)).item()
        assert torch.allclose(got, value, rtol=RTOL, atol=ATOL), (
            f"{what}: {name} differs by {(got - value).abs().max().item():.3g} (norm ratio {scale:.6f})"
        )


@pytest.mark.slow
@pytest.mark.parametrize(("group", "index"), CASES)
def test_matches_ddp_and_one_process(group: str, index: int) -> None:
    world, cases = GROUPS[group]
    case = cases[index]
    runs = group_results(group)[index]
    rannc_run = runs[0]["rannc"]
    assert rannc_run["microbatches"] == case.microbatches and len(rannc_run["stages"]) == case.stages, (
        rannc_run
    )
    assert rannc_run["schedule"] == case.schedule
    assert rannc_run["chunks"] == (case.model_chunks or 1)
    references = {}
    if "ddp" in case.references:
        references["DDP"] = runs[0]["ddp"]
    if "one_process" in case.references:
        references["one process"] = train_one_process(case, world)
    for label, ref in references.items():
        what = f"{case.label} vs {label}"
        assert_close(rannc_run["momentum1"], ref["momentum1"], f"{what}, gradients of step 1")
        assert_close(rannc_run["state"], ref["state"], f"{what}, parameters and buffers after training")
        assert_close(rannc_run["momentum"], ref["momentum"], f"{what}, final momentum")
        if label == "one process":
            # a float input's gradient: one process's, this rank's rows
            _assert_rows(runs, "input_grad", [ref["input_grad"]], case, world, f"{what}, input gradient")
        if label == "one process" and case.loss == "returned" and not returns_logits(case):
            # the model's loss is the global batch's mean on every rank
            for rank in range(world):
                assert_close(dict(enumerate(runs[rank]["rannc"]["eval"])), dict(enumerate(ref["eval"])), what)
        elif label == "one process" and case.loss not in RETURNED:  # (its loss is a global mean)
            _assert_rows(runs, "eval", ref["eval"], case, world, f"{what}, eval outputs")
        if case.clip:
            assert rannc_run["norms"] == pytest.approx(ref["norms"], rel=RTOL), what
    if "ddp" in case.references and case.loss == "returned":
        # the model's own loss is the global batch's: the mean of DDP's ranks' losses (equal local batches)
        mean = [sum(values) / world for values in zip(*(runs[r]["ddp"]["losses"] for r in range(world)))]
        for rank in range(world):
            assert runs[rank]["rannc"]["losses"] == pytest.approx(mean, rel=RTOL)
    elif "ddp" in case.references and case.loss not in RETURNED:
        # the losses each rank computes from its own rows are DDP's
        for rank in range(world):
            assert runs[rank]["rannc"]["losses"] == pytest.approx(runs[rank]["ddp"]["losses"], rel=RTOL)


def _assert_rows(
    runs: list[dict[str, Any]], key: str, expected: list[torch.Tensor], case: LoopCase, world: int, what: str
) -> None:
    """Every rank's `key` tensors are its rows of one process's (eval outputs: running statistics included)."""
    sizes = local_sizes(case, world)
    for rank in range(world):
        lo = sum(sizes[:rank])
        got = runs[rank]["rannc"][key]
        got = got if isinstance(got, list) else [got]
        want = [t[lo : lo + sizes[rank]] for t in expected]
        assert_close(dict(enumerate(got)), dict(enumerate(want)), f"{what} of rank {rank}")


@pytest.mark.slow
def test_interleaved_positions_shard_optimizer_state_at_zero1() -> None:
    """shard_stages "zero-1" with interleaved 1F1B: every virtual stage of the plan is ZeRO-1 and each rank keeps
    optimizer state (SGD momentum) for fewer parameters than its chunks hold; every parameter has its state on
    exactly one rank of its position (training equals DDP and one process: test_matches_ddp_and_one_process)."""
    group = "interleaved-w4"
    world, cases = GROUPS[group]
    index = next(k for k, case in enumerate(cases) if case.label == "interleaved-shard-zero1")
    runs = [run["rannc"] for run in group_results(group)[index]]
    assert runs[0]["chunks"] == 2 and runs[0]["stages"] == [2, 2], runs[0]["stages"]
    assert runs[0]["shards"] == ["zero-1"] * 4
    for rank, run in enumerate(runs):
        assert 0 < run["optimizer_states"] < run["held"], (rank, run["optimizer_states"], run["held"])
    # the two replicas of a position split its parameters' state between them
    for position in (0, 1):
        ranks = [2 * position, 2 * position + 1]
        assert sum(runs[r]["optimizer_states"] for r in ranks) == runs[ranks[0]]["held"], ranks
