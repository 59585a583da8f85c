"""Equivalence of rannc training with single-process training on the global batch.

Each multi-process group (one spawn of 1, 2 or 4 ranks) runs several cases one after the other; every case builds a
fresh model and RaNNCModule with a forced stage count, microbatch count and schedule, trains a few steps on its
rank's rows of each global batch, and is compared with `reference.train_reference` on the whole batch:

* the plan has the forced number of stages / microbatches / schedule and places every rank exactly once;
* the loss is identical on every rank and equals the reference loss of the global batch at every step;
* the output has the wrapped model's structure, and its batch-shaped tensors are the rank's own rows (step 0);
* the gradient of a float input that requires grad is the rank's rows of the reference input gradient;
* after the last step every entry of the state dict (rank 0) equals the reference's.

One tolerance is used for everything: rtol=1e-5, atol=1e-6. `test_tolerance_survives_reordered_reduction` checks,
without rannc, that a mere change of summation order (accumulating over the case's microbatch/replica pieces in one
process) stays within it, so a failure of the multi-process tests is not rounding noise. AdamW on BERT/GPT-2 uses
lr=1e-4 for that reason: some of their parameters have a gradient that is zero in exact arithmetic (e.g. the key
bias, under the softmax's shift invariance), Adam turns its rounding noise into an update of about lr * noise /
(|noise| + eps) of either sign, and at lr=1e-3 reordering alone moves such parameters by ~3e-6.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import traceback
from pathlib import Path
from typing import Any

import models
import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_workers
from reference import chunk_sizes, train_reference

import rannc

RTOL = 1e-5
ATOL = 1e-6
GROUP_TIMEOUT_S = 480.0  # below pytest's 600 s per test, which also covers the fixture that runs the group


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    model: str
    optimizer: str
    lr: float
    steps: int
    global_batch: int
    partition_num: int
    microbatches: int
    schedule: str = "1f1b"
    input_grad: bool = False  # the model's float input requires grad at step 0; its grad is compared
    seed: int = 0

    def overrides(self) -> dict[str, Any]:
        return {
            "partition_num": self.partition_num,
            "min_pipeline": self.microbatches,
            "max_pipeline": self.microbatches,
            "schedule": self.schedule,
            "profile_iterations": 1,
            "show_progress": False,
        }


SGD_LR = 0.05
ADAMW_LR = 1e-3
ADAMW_HF_LR = 1e-4  # see the module docstring

# group name -> (world size, cases run one after the other in one spawn)
GROUPS: dict[str, tuple[int, list[Case]]] = {
    "mlp4": (
        4,
        [
            Case("mlp-w4-p1-sgd-mb2", "mlp", "sgd", SGD_LR, 3, 16, 1, 2),
            Case("mlp-w4-p2-sgd-mb3", "mlp", "sgd", SGD_LR, 3, 16, 2, 3),  # microbatches of 6, 5, 5 rows
            Case("mlp-w4-p4-sgd-mb4-filldrain", "mlp", "sgd", SGD_LR, 3, 16, 4, 4, "fill_drain"),
            Case("mlp-w4-p1-adamw-mb4-filldrain", "mlp", "adamw", ADAMW_LR, 3, 16, 1, 4, "fill_drain"),
            Case("mlp-w4-p2-adamw-mb2-filldrain", "mlp", "adamw", ADAMW_LR, 3, 16, 2, 2, "fill_drain"),
            Case("mlp-w4-p4-adamw-mb3", "mlp", "adamw", ADAMW_LR, 3, 16, 4, 3),
        ],
    ),
    "skip4": (
        4,
        [
            Case("skip-w4-p2-sgd-mb2", "skip_tied", "sgd", SGD_LR, 3, 16, 2, 2),
            Case("skip-w4-p4-adamw-mb4", "skip_tied", "adamw", ADAMW_LR, 3, 16, 4, 4),
            # 3 stages on 4 ranks: replicas 2+1+1 in some order; 3 microbatches of 6, 5, 5 rows split 3+3, 3+2
            Case("skip-w4-p3-sgd-mb3-unequal", "skip_tied", "sgd", SGD_LR, 3, 16, 3, 3),
            Case("skip-w4-p2-sgd-mb2-inputgrad", "skip_tied", "sgd", SGD_LR, 2, 16, 2, 2, input_grad=True),
        ],
    ),
    "hf4": (
        4,
        [
            Case("bert-w4-p2-adamw-mb2", "bert", "adamw", ADAMW_HF_LR, 2, 8, 2, 2),
            Case("gpt2-w4-p2-adamw-mb2-filldrain", "gpt2", "adamw", ADAMW_HF_LR, 2, 8, 2, 2, "fill_drain"),
            Case("gpt2-w4-p4-adamw-mb2", "gpt2", "adamw", ADAMW_HF_LR, 2, 8, 4, 2),
            # the encoder's output crosses stage boundaries to reach every decoder layer's cross-attention
            Case("t5-w4-p4-adamw-mb2", "t5", "adamw", ADAMW_HF_LR, 2, 8, 4, 2),
        ],
    ),
    "models2": (  # the small MLP and the Hugging Face models, 2 ranks
        2,
        [
            Case("mlp-w2-p2-adamw-mb2", "mlp", "adamw", ADAMW_LR, 3, 8, 2, 2),
            Case("llama-w2-p2-adamw-mb2", "llama", "adamw", ADAMW_HF_LR, 2, 8, 2, 2),
            Case("t5-w2-p2-adamw-mb2", "t5", "adamw", ADAMW_HF_LR, 2, 8, 2, 2),
            Case("falcon-w2-p2-adamw-mb2", "falcon", "adamw", ADAMW_HF_LR, 2, 8, 2, 2),
            Case("bloom-w2-p2-adamw-mb2", "bloom", "adamw", ADAMW_HF_LR, 2, 8, 2, 2),
            Case("bart-w2-p2-adamw-mb2", "bart", "adamw", ADAMW_HF_LR, 2, 8, 2, 2),
            # a float input whose gradient is compared too; SGD: under AdamW the key bias (zero gradient in exact
            # arithmetic) moves by rounding noise beyond the tolerance even without rannc
            Case("vit-w2-p2-sgd-mb2", "vit", "sgd", SGD_LR, 2, 8, 2, 2, input_grad=True),
            # SGD for the same reason as ViT (a rarely used embedding row's rounding noise, amplified by AdamW)
            Case("mixtral-w2-p2-sgd-mb2", "mixtral", "sgd", SGD_LR, 2, 8, 2, 2),
        ],
    ),
    "mlp1": (1, [Case("mlp-w1-p1-sgd-mb2", "mlp", "sgd", SGD_LR, 3, 8, 1, 2)]),
}

ALL_CASES: list[tuple[str, Case]] = [(group, case) for group, (_, cases) in GROUPS.items() for case in cases]
CASE_PARAMS = [pytest.param(group, case, id=case.label) for group, case in ALL_CASES]
WORLD_SIZE = {group: world for group, (world, _) in GROUPS.items()}


def max_replicas(case: Case, world_size: int) -> int:
    return math.ceil(world_size / case.partition_num)


# ----------------------------------------------------------------------------------------------------------------
# Comparison helpers (one tolerance for everything)
# ----------------------------------------------------------------------------------------------------------------


def assert_tensors_close(actual: dict[str, Any], expected: dict[str, torch.Tensor], what: str) -> None:
    """Every expected entry is present (no extra ones) and close; lists every mismatch, not just the first."""
    problems: list[str] = []
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"missing entries: {missing}")
    if extra:
        problems.append(f"unexpected entries: {extra}")
    for name in sorted(set(expected) & set(actual)):
        try:
            torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL)
        except AssertionError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise AssertionError(f"{what}: {len(problems)} problem(s)\n" + "\n\n".join(problems))


def assert_losses_close(actual: list[float], expected: list[float], what: str) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"{what}: losses per step {actual} vs reference {expected}\n{m}",
    )


# ----------------------------------------------------------------------------------------------------------------
# Reference (single process, cached per configuration)
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def reference_for(
    model_name: str,
    seed: int,
    steps: int,
    global_batch: int,
    optimizer: str,
    lr: float,
    input_grad: bool,
    chunks: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    batches = models.make_batches(model_name, seed, steps, global_batch)
    return train_reference(
        model_name,
        seed,
        batches,
        optimizer,
        lr,
        steps,
        chunk_rows=None if chunks is None else list(chunks),
        input_grad=input_grad,
    )


def case_reference(case: Case, chunks: tuple[int, ...] | None = None) -> dict[str, Any]:
    return reference_for(
        case.model, case.seed, case.steps, case.global_batch, case.optimizer, case.lr, case.input_grad, chunks
    )


# ----------------------------------------------------------------------------------------------------------------
# Workers (run in the spawned ranks)
# ----------------------------------------------------------------------------------------------------------------


def train_rannc(
    rank: int,
    world: int,
    model_name: str,
    seed: int,
    steps: int,
    global_batch: int,
    optimizer_name: str,
    lr: float,
    overrides: dict[str, Any],
    input_grad: bool = False,
) -> dict[str, Any]:
    """Train one configuration with rannc on this rank's rows of each global batch.

    Returns {"losses": [float per step] (asserted identical on all ranks), "plan": {"stages": [(ranks, replicas)],
    "microbatches", "schedule"}, "state_dict": full state on rank 0 / None elsewhere, "outputs0": this rank's
    batch-shaped outputs at step 0, "structure0": the step-0 output's container structure, "input_grad0": the
    gradient of this rank's float input at step 0 (input_grad=True) or None, "rows": this rank's global rows}.
    """
    assert rannc.get_rank() == rank, f"rannc.get_rank() is {rannc.get_rank()}, the process is rank {rank}"
    assert rannc.get_world_size() == world, (
        f"rannc.get_world_size() is {rannc.get_world_size()}, expected {world}"
    )
    batches = models.make_batches(model_name, seed, steps, global_batch)
    model = models.build(model_name, seed)
    optimizer = models.make_optimizer(optimizer_name, model.parameters(), lr)
    wrapped = rannc.RaNNCModule(model, optimizer, **overrides)

    losses: list[float] = []
    outputs0: dict[str, torch.Tensor] = {}
    structure0: Any = None
    input_grad0: torch.Tensor | None = None
    for step in range(steps):
        local = models.local_slice(batches[step], rank, world)
        leaf: torch.Tensor | None = None
        if input_grad and step == 0:
            leaf = models.batch_input(local, models.INPUT_GRAD_LOCATION[model_name]).requires_grad_(True)
        out = models.call(wrapped, local)
        loss = models.get_loss(model_name, out)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, f"loss is not a 0-dim tensor: {loss!r}"
        if step == 0:
            structure0 = models.output_structure(out)
            outputs0 = {k: v.detach().clone() for k, v in models.batch_outputs(model_name, out).items()}
        loss.backward()
        losses.append(float(loss))
        if leaf is not None:
            assert leaf.grad is not None, "the input requires grad but got no .grad after backward"
            input_grad0 = leaf.grad.detach().clone()
        optimizer.step()
        optimizer.zero_grad()

    # The loss of the global batch must be the same number on every rank.
    mine = torch.tensor(losses, dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    for other, theirs in enumerate(gathered):
        assert torch.equal(theirs, mine), (
            f"losses differ: rank {rank} has {losses}, rank {other} has {theirs.tolist()}"
        )

    plan = wrapped.deployment.plan
    summary = {
        "stages": [(sorted(int(r) for r in stage.ranks), int(stage.replicas)) for stage in plan.stages],
        "microbatches": int(plan.microbatches),
        "schedule": str(plan.schedule),
    }
    state = wrapped.state_dict()  # every rank calls it; only rank 0 gets the full state
    state_dict = {k: v.detach().clone() for k, v in state.items()} if rank == 0 else None
    result = {
        "losses": losses,
        "plan": summary,
        "state_dict": state_dict,
        "outputs0": outputs0,
        "structure0": structure0,
        "input_grad0": input_grad0,
        "rows": models.row_range(global_batch, rank, world),
    }
    del wrapped, optimizer, model, state
    gc.collect()
    rannc.barrier()
    return result


def run_group(
    rank: int, world: int, cases: list[Case], extra_overrides: dict[str, Any]
) -> list[dict[str, Any]]:
    """Run the cases one after the other (fresh model + RaNNCModule each) in the same processes.

    A case that fails on every rank (rannc raises on all ranks when one fails) is recorded as {"error": traceback}
    and the group goes on with the next case; a case that fails on only some ranks aborts the group, since the
    ranks would no longer agree on what they run next.
    """
    results: list[dict[str, Any]] = []
    for case in cases:
        error: str | None = None
        try:
            result = train_rannc(
                rank,
                world,
                case.model,
                case.seed,
                case.steps,
                case.global_batch,
                case.optimizer,
                case.lr,
                {**case.overrides(), **extra_overrides},
                input_grad=case.input_grad,
            )
        except Exception:
            error = traceback.format_exc()
            result = {"error": f"case {case.label} failed on rank {rank}:\n{error}"}
        failed = torch.tensor([0 if error is None else 1])
        flags = [torch.zeros_like(failed) for _ in range(world)]
        dist.all_gather(flags, failed)
        failed_ranks = [r for r, flag in enumerate(flags) if int(flag.item())]
        if failed_ranks and len(failed_ranks) < world:
            raise RuntimeError(
                f"case {case.label} failed on ranks {failed_ranks} only; the group cannot go on"
                + ("" if error is None else f"; this rank's error:\n{error}")
            )
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Running the groups (once per module; a failure is reported in full at the first test that meets it)
# ----------------------------------------------------------------------------------------------------------------


class GroupRuns:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.done: dict[str, dict[str, list[dict[str, Any]]]] = {}  # group -> case label -> per-rank results
        self.failed: dict[str, str] = {}  # group or case label -> failure report
        self.reported: set[str] = set()

    def _fail(self, key: str) -> None:
        report = self.failed[key]
        if key in self.reported:
            pytest.fail(f"{key} failed (full report at the first test of it):\n{report[:3000]}")
        self.reported.add(key)
        pytest.fail(report)

    def get(self, group: str, case: Case) -> list[dict[str, Any]]:
        if group not in self.done and group not in self.failed:
            world, cases = GROUPS[group]
            extra = {"profile_cache_dir": str(self.base / group / "profiles")}
            try:
                per_rank = run_workers(run_group, world, cases, extra, timeout=GROUP_TIMEOUT_S)
            except AssertionError as exc:
                self.failed[group] = f"group {group} failed:\n{exc}"
            else:
                self.done[group] = {
                    c.label: [per_rank[r][i] for r in range(world)] for i, c in enumerate(cases)
                }
        if group in self.failed:
            self._fail(group)
        runs = self.done[group][case.label]
        errors = [run["error"] for run in runs if "error" in run]
        if errors:
            self.failed.setdefault(case.label, "\n".join(errors))
            self._fail(case.label)
        return runs


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory: pytest.TempPathFactory) -> GroupRuns:
    return GroupRuns(tmp_path_factory.mktemp("rannc_equivalence"))


# ----------------------------------------------------------------------------------------------------------------
# Multi-process equivalence tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("group", "case"), CASE_PARAMS)
def test_plan_has_forced_shape(group: str, case: Case, group_runs: GroupRuns) -> None:
    world = WORLD_SIZE[group]
    runs = group_runs.get(group, case)
    for rank, run in enumerate(runs):
        assert run["plan"] == runs[0]["plan"], f"rank {rank} has another plan than rank 0"
    plan = runs[0]["plan"]
    stages = plan["stages"]
    assert len(stages) == case.partition_num, (
        f"partition_num={case.partition_num} gave {len(stages)} stages: {plan}"
    )
    placed = [r for ranks, _ in stages for r in ranks]
    assert sorted(placed) == list(range(world)), f"every rank must be in exactly one stage: {stages}"
    for ranks, replicas in stages:
        assert len(ranks) == replicas, f"stage ranks {ranks} vs replicas {replicas}"
    assert plan["microbatches"] == case.microbatches, plan
    assert plan["schedule"] == case.schedule, plan
    if case.partition_num == 3 and world == 4:
        replicas = [replicas for _, replicas in stages]
        assert len(set(replicas)) > 1 and sorted(replicas) == [1, 1, 2], f"expected replicas 2+1+1: {stages}"


@pytest.mark.slow
@pytest.mark.parametrize(("group", "case"), CASE_PARAMS)
def test_losses_match_reference(group: str, case: Case, group_runs: GroupRuns) -> None:
    runs = group_runs.get(group, case)
    expected = case_reference(case)["losses"]
    for rank, run in enumerate(runs):
        assert len(run["losses"]) == case.steps
        assert_losses_close(run["losses"], expected, f"{case.label} rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize(("group", "case"), CASE_PARAMS)
def test_outputs_are_local_rows(group: str, case: Case, group_runs: GroupRuns) -> None:
    world = WORLD_SIZE[group]
    runs = group_runs.get(group, case)
    reference = case_reference(case)
    for rank, run in enumerate(runs):
        assert run["structure0"] == reference["structure0"], (
            f"rank {rank}: output structure {run['structure0']} differs from the model's {reference['structure0']}"
        )
        start, end = models.row_range(case.global_batch, rank, world)
        assert tuple(run["rows"]) == (start, end)
        expected = {name: value[start:end] for name, value in reference["outputs0"].items()}
        assert_tensors_close(run["outputs0"], expected, f"{case.label} rank {rank} batch-shaped outputs")
        if case.input_grad:
            assert reference["input_grad0"] is not None
            assert run["input_grad0"] is not None, f"rank {rank}: the input's .grad is None"
            assert_tensors_close(
                {"input_grad": run["input_grad0"]},
                {"input_grad": reference["input_grad0"][start:end]},
                f"{case.label} rank {rank} input gradient",
            )


@pytest.mark.slow
@pytest.mark.parametrize(("group", "case"), CASE_PARAMS)
def test_parameters_match_reference(group: str, case: Case, group_runs: GroupRuns) -> None:
    runs = group_runs.get(group, case)
    assert runs[0]["state_dict"] is not None, "rank 0 got no state dict"
    assert all(run["state_dict"] is None for run in runs[1:])  # the worker only ships rank 0's
    assert_tensors_close(
        runs[0]["state_dict"], case_reference(case)["state_dict"], f"{case.label} state_dict"
    )


# ----------------------------------------------------------------------------------------------------------------
# Fast tests of the models, batches and reference (no rannc, one process)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "case"), CASE_PARAMS)
def test_tolerance_survives_reordered_reduction(group: str, case: Case) -> None:
    """Accumulating the case's microbatch x replica pieces in one process (what rannc computes, summed in another
    order) matches the full-batch reference within the tolerance the multi-process tests use."""
    chunks = tuple(chunk_sizes(case.global_batch, case.microbatches, max_replicas(case, WORLD_SIZE[group])))
    assert len(chunks) > 1
    full = case_reference(case)
    chunked = case_reference(case, chunks)
    assert_losses_close(chunked["losses"], full["losses"], f"{case.label} chunked {chunks}")
    assert_tensors_close(
        chunked["state_dict"], full["state_dict"], f"{case.label} chunked {chunks} state_dict"
    )
    assert_tensors_close(chunked["outputs0"], full["outputs0"], f"{case.label} chunked {chunks} outputs")
    if case.input_grad:
        assert_tensors_close(
            {"g": chunked["input_grad0"]}, {"g": full["input_grad0"]}, f"{case.label} chunked input grad"
        )


def test_skip_tied_outputs_depend_on_their_rows_only() -> None:
    """Row-wise independence, which "each rank gets its own rows" relies on: logits of rows computed in a smaller
    batch equal the full batch's."""
    model = models.build("skip_tied", 0)
    batch = models.make_batches("skip_tied", 0, 1, 16)[0]
    with torch.no_grad():
        full = models.call(model, batch)[1]
        part = models.call(model, models.local_slice(batch, 1, 4))[1]
    torch.testing.assert_close(part, full[4:8], rtol=RTOL, atol=ATOL)


def test_case_matrix_covers_the_brief() -> None:
    shapes = {(c.model, WORLD_SIZE[g], c.partition_num, c.optimizer) for g, c in ALL_CASES}
    for p in (1, 2, 4):
        for opt in ("sgd", "adamw"):
            assert ("mlp", 4, p, opt) in shapes
    for p in (2, 3, 4):
        assert any(s[:3] == ("skip_tied", 4, p) for s in shapes)
    assert ("bert", 4, 2, "adamw") in shapes
    assert ("gpt2", 4, 2, "adamw") in shapes and ("gpt2", 4, 4, "adamw") in shapes
    assert any(s[:2] == ("mlp", 2) for s in shapes) and any(s[:2] == ("mlp", 1) for s in shapes)
    assert any(c.input_grad for _, c in ALL_CASES)
    for group, case in ALL_CASES:
        world = WORLD_SIZE[group]
        assert case.global_batch % world == 0, f"{case.label}: local batches must be equal"
        per_microbatch = case.global_batch // case.microbatches
        assert per_microbatch >= max_replicas(case, world), f"{case.label}: a replica would get no rows"
        assert case.partition_num <= world


@pytest.mark.parametrize(
    ("rows", "world", "sizes"),
    [(16, 4, [4, 4, 4, 4]), (8, 2, [4, 4]), (8, 1, [8]), (10, 4, [3, 3, 2, 2]), (3, 4, [1, 1, 1, 0])],
)
def test_local_slice_partitions_the_global_batch(rows: int, world: int, sizes: list[int]) -> None:
    batch = models.make_batches("bert", 3, 1, rows)[0]
    parts = [models.local_slice(batch, rank, world) for rank in range(world)]
    assert [models.batch_rows(p) if sizes[i] else 0 for i, p in enumerate(parts)] == sizes
    for key, value in batch["kwargs"].items():
        torch.testing.assert_close(torch.cat([p["kwargs"][key] for p in parts]), value, rtol=0, atol=0)
    mlp_batch = models.make_batches("mlp", 3, 1, rows)[0]
    mlp_parts = [models.local_slice(mlp_batch, rank, world) for rank in range(world)]
    for index, value in enumerate(mlp_batch["args"]):
        torch.testing.assert_close(torch.cat([p["args"][index] for p in mlp_parts]), value, rtol=0, atol=0)
    # slices are independent copies (a worker may set requires_grad on them)
    assert mlp_parts[0]["args"][0].data_ptr() != mlp_batch["args"][0].data_ptr()


def test_chunk_sizes() -> None:
    assert chunk_sizes(16, 3, 2) == [3, 3, 3, 2, 3, 2]
    assert chunk_sizes(8, 2, 2) == [2, 2, 2, 2]
    assert chunk_sizes(16, 4) == [4, 4, 4, 4]
    assert sum(chunk_sizes(13, 3, 3)) == 13


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_models_and_batches_are_deterministic(name: str) -> None:
    first, second, other = models.build(name, 7), models.build(name, 7), models.build(name, 8)
    assert_tensors_close(
        dict(second.state_dict()), dict(first.state_dict()), f"{name} rebuilt with the same seed"
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values())
    ), "another seed should give other weights"
    for a, b in zip(models.make_batches(name, 7, 2, 4), models.make_batches(name, 7, 2, 4)):
        for x, y in zip(a["args"] + list(a["kwargs"].values()), b["args"] + list(b["kwargs"].values())):
            assert torch.equal(x, y)


def test_skip_tied_model_shape() -> None:
    model = models.skip_tied(0)
    assert model.head.weight is model.embed.weight
    assert "pos_table" in dict(model.named_buffers()) and "pos_table" in model.state_dict()
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) >= 8
    batch = models.make_batches("skip_tied", 0, 1, 4)[0]
    loss, logits = models.call(model, batch)
    assert loss.dim() == 0 and logits.shape == (4, models.SKIP_SEQ, models.SKIP_VOCAB)
    # the skip connection matters: zeroing its projection changes the output
    with torch.no_grad():
        model.skip_proj.weight.zero_()
        model.skip_proj.bias.zero_()
    assert not torch.allclose(models.call(model, batch)[1], logits)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_reference_training_runs(name: str) -> None:
    batches = models.make_batches(name, 0, 2, 4)
    result = train_reference(
        name, 0, batches, "adamw" if name not in ("mlp", "skip_tied") else "sgd", 1e-3, 2
    )
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    initial = models.build(name, 0).state_dict()
    assert set(result["state_dict"]) == set(initial)
    unchanged = [
        k
        for k, _ in models.build(name, 0).named_parameters()
        if torch.equal(initial[k], result["state_dict"][k])
    ]
    assert not unchanged, f"training left parameters unchanged: {unchanged}"
