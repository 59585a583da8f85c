"""Training features beyond a plain step, each compared with single-process training of the unwrapped model.

Two spawns run every multi-process scenario (tests/feature_workers.py; a fresh model, optimizer and RaNNCModule
per scenario, forced stage counts, 2 microbatches):

* 4 ranks: gradient accumulation (`no_sync()` and pyrannc's `delay_grad_allreduce` / `allreduce_grads`),
  global `clip_grad_norm`, ZeRO-1 (`enable_zero=True`), train/eval switching with dropout, eval after training
  with an LR scheduler, a checkpoint (model and `from_global` optimizer state dicts, saved by rank 0), and bf16
  autocast;
* 2 ranks (another world size and plan): resuming that checkpoint, loaded before wrapping and after the model
  is partitioned.

Tolerance for fp32 comparisons: rtol=1e-5, atol=1e-6 (as in test_equivalence.py; optimizer state tensors use
atol=1e-7 since Adam's second moments are ~1e-6). bf16 autocast has its own tolerance (see its tests).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import feature_workers as fw
import models
import pytest
import torch
from distributed_helpers import run_workers

import rannc

RTOL, ATOL = 1e-5, 1e-6
STATE_RTOL, STATE_ATOL = 1e-5, 1e-7
FOUR_RANK_TIMEOUT_S = (
    420.0  # well under pytest's 600 s per test (the spawn runs inside the first test using it)
)
TWO_RANK_TIMEOUT_S = 180.0

ACCUM = [
    "accum-mlp-p2-no_sync",
    "accum-mlp-p1-no_sync-filldrain",
    "accum-skip-p4-no_sync",
    "accum-mlp-p2-delay",
]
OVERLAP = ["overlap-skip-p2", "overlap-mlp-p1-filldrain"]
CLIP = ["clip-skip-p2", "clip-skip-p3", "clip-skip-p4", "clip-mlp-p1"]
ZERO = ["zero-mlp-p1", "zero-mlp-p2", "zero-mlp-p4", "zero-skip-p2"]


# ----------------------------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------------------------


def assert_tensors_close(
    actual: dict[str, Any],
    expected: dict[str, torch.Tensor],
    what: str,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> None:
    """Same keys, every entry close; lists every mismatch."""
    problems: list[str] = []
    if set(actual) != set(expected):
        problems.append(
            f"keys differ: missing {sorted(set(expected) - set(actual))}, extra {sorted(set(actual) - set(expected))}"
        )
    for name in sorted(set(expected) & set(actual)):
        try:
            torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol)
        except AssertionError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise AssertionError(f"{what}: {len(problems)} problem(s)\n" + "\n\n".join(problems))


def assert_numbers_close(actual: list[float], expected: list[float], what: str, rtol: float = RTOL) -> None:
    assert len(actual) == len(expected), f"{what}: {actual} vs reference {expected}"
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=ATOL,
        msg=lambda m: f"{what}: {actual} vs reference {expected}\n{m}",
    )


def assert_optimizer_state_close(actual: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    """Same structure (param_groups with their indices and hyperparameters, state keys per index) and state
    tensors close."""
    assert set(actual) == {"state", "param_groups"}, f"{what}: top-level keys {sorted(actual)}"
    assert actual["param_groups"] == expected["param_groups"], (
        f"{what}: param_groups differ\nrannc:     {actual['param_groups']}\nreference: {expected['param_groups']}"
    )
    assert sorted(actual["state"]) == sorted(expected["state"]), (
        f"{what}: state indices {sorted(actual['state'])} vs reference {sorted(expected['state'])}"
    )
    for index, entry in expected["state"].items():
        got = actual["state"][index]
        assert set(got) == set(entry), f"{what}: state[{index}] keys {sorted(got)} vs {sorted(entry)}"
        assert_tensors_close(got, entry, f"{what} state[{index}]", rtol=STATE_RTOL, atol=STATE_ATOL)


# ----------------------------------------------------------------------------------------------------------------
# Single-process references
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def reference(
    name: str,
    opt_kind: str,
    steps: int,
    global_batch: int,
    *,
    calls_per_step: int = 1,
    max_norm: float | None = None,
    scheduler: bool = False,
    autocast: bool = False,
    eval_after: bool = False,
    opt_state_after: int | None = None,
) -> dict[str, Any]:
    """Train the unwrapped model `steps` steps on whole global batches (batch k of make_batches); each step
    backpropagates `calls_per_step` batches, then optionally clips, steps and steps the scheduler. With
    eval_after, the eval-mode loss on the next batch is computed under no_grad after the last step."""
    model = fw.build(name)
    optimizer = fw.make_optimizer(opt_kind, model.parameters())
    sched = fw.make_scheduler(optimizer) if scheduler else None
    batches = fw.make_batches(name, steps * calls_per_step + 1, global_batch)
    tied = [p for n, p in model.named_parameters(remove_duplicate=False) if n == "head.weight"]
    out: dict[str, Any] = {
        "losses": [],
        "norms": [],
        "double_counted_norms": [],
        "lrs": [],
        "opt_state": None,
    }
    for step in range(steps):
        for call in range(calls_per_step):
            with torch.autocast("cpu", dtype=fw.AUTOCAST_DTYPE, enabled=autocast):
                loss = fw.loss_of(name, models.call(model, batches[step * calls_per_step + call]))
            loss.backward()
            out["losses"].append(float(loss.detach()))
        if max_norm is not None:
            grads = [p.grad for p in model.parameters()]
            twice = torch.stack([g.norm() for g in grads + [t.grad for t in tied]]).norm()
            out["double_counted_norms"].append(float(twice))
            out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        optimizer.step()
        optimizer.zero_grad()
        if sched is not None:
            sched.step()
        out["lrs"].append(float(optimizer.param_groups[0]["lr"]))
        if opt_state_after == step + 1:
            out["opt_state"] = fw.to_cpu(optimizer.state_dict())
    out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if eval_after:
        model.eval()
        with torch.no_grad():
            out["eval"] = float(fw.loss_of(name, models.call(model, batches[steps * calls_per_step])))
    return out


def initial_eval_loss(name: str, global_batch: int) -> float:
    model = fw.build(name)
    model.eval()
    with torch.no_grad():
        return float(models.call(model, fw.make_batches(name, 1, global_batch)[0]))


# ----------------------------------------------------------------------------------------------------------------
# Spawns (each runs once per module, when a test first needs it)
# ----------------------------------------------------------------------------------------------------------------


class Spawns:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.results: dict[str, list[dict[str, dict[str, Any]]]] = {}
        self.failures: dict[str, str] = {}

    def _run(self, key: str, worker: Any, world: int, timeout: float, *args: Any) -> list[dict[str, Any]]:
        if key not in self.results and key not in self.failures:
            try:
                self.results[key] = run_workers(worker, world, *args, timeout=timeout)
            except AssertionError as exc:
                self.failures[key] = str(exc)
        if key in self.failures:
            pytest.fail(f"the {key} spawn failed:\n{self.failures[key][:6000]}")
        return self.results[key]

    def four(self) -> list[dict[str, Any]]:
        labels = list(fw.FOUR_RANK_SCENARIOS)
        return self._run("4-rank", fw.four_rank_worker, 4, FOUR_RANK_TIMEOUT_S, str(self.base), labels)

    def two(self) -> list[dict[str, Any]]:
        self.four()  # writes the checkpoint
        return self._run("2-rank", fw.resume_worker, fw.RESUME_WORLD, TWO_RANK_TIMEOUT_S, str(self.base))

    def values(self, label: str) -> list[dict[str, Any]]:
        """Per rank, what scenario `label` returned; fails the test with every rank's error otherwise."""
        runs = self.two() if label.startswith("resume") else self.four()
        errors = [
            f"rank {r}: {run[label].get('traceback')}"
            for r, run in enumerate(runs)
            if "value" not in run[label]
        ]
        if errors:
            pytest.fail(f"scenario {label} raised:\n" + "\n".join(errors)[:6000])
        return [run[label]["value"] for run in runs]


@pytest.fixture(scope="module")
def spawns(tmp_path_factory: pytest.TempPathFactory) -> Spawns:
    return Spawns(tmp_path_factory.mktemp("rannc_features"))


def check_plan(runs: list[dict[str, Any]], partition_num: int, world: int) -> list[list[int]]:
    plan = runs[0]["plan"]
    for rank, run in enumerate(runs):
        assert {k: v for k, v in run["plan"].items() if not k.startswith("my_")} == {
            k: v for k, v in plan.items() if not k.startswith("my_")
        }, f"rank {rank} has another plan than rank 0"
    assert len(plan["stages"]) == partition_num, plan
    assert sorted(r for ranks in plan["stages"] for r in ranks) == list(range(world)), plan
    return plan["stages"]


def scenario_args(label: str) -> dict[str, Any]:
    function, kwargs = fw.FOUR_RANK_SCENARIOS[label]
    return {**kwargs, **fw.SIZES[function]}


# ----------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("label", ACCUM)
def test_gradient_accumulation_matches_reference(label: str, spawns: Spawns) -> None:
    """Two forward/backwards per step (no_sync or delay_grad_allreduce + allreduce_grads), then one step: equal
    to one process backpropagating both global batches' mean losses before stepping (SGD with momentum, which,
    unlike Adam, shows any wrong gradient scale)."""
    args = scenario_args(label)
    runs = spawns.values(label)
    check_plan(runs, args["partition_num"], 4)
    ref = reference(args["name"], "sgd", args["steps"], args["global_batch"], calls_per_step=2)
    for rank, run in enumerate(runs):
        assert_numbers_close(run["losses"], ref["losses"], f"{label} rank {rank} losses")
    assert_tensors_close(runs[0]["state"], ref["state"], f"{label} state_dict")


@pytest.mark.slow
@pytest.mark.parametrize(
    "label", ["accum-mlp-p2-no_sync", "accum-mlp-p1-no_sync-filldrain", "accum-mlp-p2-delay"]
)
def test_accumulating_backward_skips_gradient_allreduce(label: str, spawns: Spawns) -> None:
    """Inside no_sync() / with delay_grad_allreduce(True) a backward must not all-reduce gradients (counted by
    wrapping GradSync.allreduce on every rank). The synced backward (or allreduce_grads) all-reduces exactly once
    on ranks whose stage has replicas; a rank alone in its stage has nothing to all-reduce."""
    runs = spawns.values(label)
    replicated = 0
    for rank, run in enumerate(runs):
        counts = run["counts"]
        assert all(c == 0 for c in counts["accumulating"]), (
            f"rank {rank}: gradient all-reduces during accumulating backwards: {counts['accumulating']}"
        )
        synced = counts["synced"] or counts["allreduce_grads"]
        expected = 1 if run["plan"]["my_replicas"] > 1 else 0
        replicated += expected
        assert synced and all(c == expected for c in synced), f"rank {rank}: synced all-reduces {counts}"
    assert replicated > 0, "no rank is in a replicated stage: the test would not see any all-reduce"


# ----------------------------------------------------------------------------------------------------------------
# Gradient allreduce overlapped with the last backward (overlap_grad_sync, on by default)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("label", OVERLAP)
def test_overlapped_gradient_sync_matches_reference(label: str, spawns: Spawns) -> None:
    """Every step of a stage with replicas starts its gradient allreduce during its last backward (at least one
    bucket launched before the backward returned), and training still equals the single-process reference
    (1F1B, where the loss gradient arrives after the allreduce started, and fill-drain)."""
    args = scenario_args(label)
    runs = spawns.values(label)
    check_plan(runs, args["partition_num"], 4)
    ref = reference(args["name"], "sgd", args["steps"], args["global_batch"])
    for rank, run in enumerate(runs):
        assert_numbers_close(run["losses"], ref["losses"], f"{label} rank {rank} losses")
        assert len(run["overlapped"]) == args["steps"]
        for step, records in enumerate(run["overlapped"]):
            if run["plan"]["my_replicas"] == 1:
                assert records == [], f"rank {rank} step {step}: no replicas, nothing to overlap: {records}"
                continue
            assert len(records) == 1, f"rank {rank} step {step}: {records}"
            record = records[0]
            assert record["launched_in_backward"] >= 1, (
                f"rank {rank} step {step}: nothing overlapped {record}"
            )
            assert record["names"] and set(record["names"]) <= set(run["trainable"]), record
    assert_tensors_close(runs[0]["state"], ref["state"], f"{label} state_dict")


# ----------------------------------------------------------------------------------------------------------------
# Global gradient clipping
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("label", CLIP)
def test_clip_grad_norm_matches_reference(label: str, spawns: Spawns) -> None:
    """model.clip_grad_norm(max_norm) on every rank returns torch.nn.utils.clip_grad_norm_'s total norm of the
    unwrapped model (tied and replicated parameters counted once), clips, and the SGD steps match."""
    args = scenario_args(label)
    runs = spawns.values(label)
    stages = check_plan(runs, args["partition_num"], 4)
    ref = reference(args["name"], "sgd", args["steps"], args["global_batch"], max_norm=args["max_norm"])
    assert all(n > 2 * args["max_norm"] for n in ref["norms"]), f"max_norm too large to clip: {ref['norms']}"
    if args["name"] == "skip_tied":
        # the tied weight lives on the first and the last stage; counting it twice would be visibly wrong
        assert stages[0] != stages[-1]
        for once, twice in zip(ref["norms"], ref["double_counted_norms"]):
            assert abs(twice - once) > 100 * RTOL * once, (once, twice)
    for rank, run in enumerate(runs):
        assert_numbers_close(run["norms"], ref["norms"], f"{label} rank {rank} norms")
        assert_numbers_close(run["losses"], ref["losses"], f"{label} rank {rank} losses")
    assert_tensors_close(runs[0]["state"], ref["state"], f"{label} state_dict")


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-1
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("label", ZERO)
def test_zero_matches_reference(label: str, spawns: Spawns) -> None:
    args = scenario_args(label)
    runs = spawns.values(label)
    check_plan(runs, args["partition_num"], 4)
    ref = reference(args["name"], "adamw", args["steps"], args["global_batch"], opt_state_after=args["steps"])
    for rank, run in enumerate(runs):
        assert_numbers_close(run["losses"], ref["losses"], f"{label} rank {rank} losses")
        assert run["replicas_agree"], f"rank {rank}: the replicas of its stage hold different parameters"
    assert_tensors_close(runs[0]["state"], ref["state"], f"{label} state_dict")


@pytest.mark.slow
@pytest.mark.parametrize("label", ZERO)
def test_zero_shards_optimizer_state(label: str, spawns: Spawns) -> None:
    """A rank whose stage has several replicas keeps optimizer state for fewer parameters than it holds, and
    every parameter of the model has its state on exactly one rank."""
    args = scenario_args(label)
    runs = spawns.values(label)
    stages = check_plan(runs, args["partition_num"], 4)
    unique = len(list(fw.build(args["name"]).parameters()))
    assert sum(run["local_state"] for run in runs) == unique, [(r["local_state"], r["held"]) for r in runs]
    for rank, run in enumerate(runs):
        replicas = len(next(ranks for ranks in stages if rank in ranks))
        assert run["plan"]["my_replicas"] == replicas, (rank, run["plan"])
        if replicas > 1:
            assert run["local_state"] < run["held"], (
                f"rank {rank} (stage replicas {replicas}) keeps state for {run['local_state']} of its "
                f"{run['held']} parameters: not sharded"
            )
        elif args["partition_num"] == 4 and args["name"] == "mlp":  # nothing shared with another rank
            assert run["local_state"] == run["held"], (rank, run["local_state"], run["held"])


@pytest.mark.slow
@pytest.mark.parametrize("label", ZERO)
def test_zero_global_optimizer_state_dict(label: str, spawns: Spawns) -> None:
    """optimizer.state_dict(from_global=True) gathers the sharded state into the unwrapped optimizer's."""
    args = scenario_args(label)
    runs = spawns.values(label)
    ref = reference(args["name"], "adamw", args["steps"], args["global_batch"], opt_state_after=args["steps"])
    assert all(run["osd"] == {} for run in runs[1:]), "ranks other than 0 must get an empty dict"
    assert_optimizer_state_close(runs[0]["osd"], ref["opt_state"], f"{label} optimizer state")


# ----------------------------------------------------------------------------------------------------------------
# train / eval / no_grad with dropout
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_no_grad_matches_reference_eval(spawns: Spawns) -> None:
    """Before any step: model.eval() under no_grad gives the unwrapped model's eval loss, every time."""
    (run, *_) = runs = spawns.values("dropout-p2")
    assert run["eval_returns_self"] and run["module_training_after_eval"] is False
    expected = initial_eval_loss("dropout", fw.DROPOUT_BATCH)
    for rank, r in enumerate(runs):
        assert_numbers_close(r["eval"], [expected, expected], f"rank {rank} eval losses")


@pytest.mark.slow
def test_train_mode_keeps_dropout_active(spawns: Spawns) -> None:
    """In train mode (with or without grad) dropout is active: the loss is not the eval loss and changes from
    call to call on the same rows."""
    runs = spawns.values("dropout-p2")
    expected = initial_eval_loss("dropout", fw.DROPOUT_BATCH)
    run = runs[0]
    assert run["module_training_after_train"] is True
    # Without dropout the losses would agree to fp32 rounding (~1e-7 relative, microbatched sums); with p=0.2 a
    # random mask lands within 1e-4 of the eval loss 0.9% of the time and within 1e-6 in none of 20000 seeds.
    for value in [run["train_first"], *run["train_no_grad"]]:
        assert abs(value - expected) > 1e-6 * expected, (
            f"train-mode loss {value} equals the eval loss {expected}"
        )
    assert abs(run["train_no_grad"][0] - run["train_no_grad"][1]) > 1e-6, run["train_no_grad"]


@pytest.mark.slow
def test_training_after_eval_works(spawns: Spawns) -> None:
    """Back in train mode after eval calls, two steps run, the loss is the same on every rank and finite, the
    replicas of each stage agree, and every parameter moved."""
    runs = spawns.values("dropout-p2")
    check_plan(runs, 2, 4)
    for rank, run in enumerate(runs):
        assert all(math.isfinite(x) for x in run["train_losses"]), run["train_losses"]
        assert run["replicas_agree"], f"rank {rank}: the replicas of its stage disagree"
    initial = fw.build("dropout").state_dict()
    state = runs[0]["state"]
    assert set(state) == set(initial)
    for name, value in state.items():
        assert torch.isfinite(value).all(), name
        assert not torch.equal(value, initial[name]), f"{name} did not change"


@pytest.mark.slow
def test_eval_after_training_matches_reference(spawns: Spawns) -> None:
    """Dropout p=0 (equivalent training): 2 SGD steps with StepLR, then eval + no_grad on the next batch, equal
    the unwrapped model doing the same."""
    args = scenario_args("eval-p2")
    runs = spawns.values("eval-p2")
    ref = reference("dropout0", "sgd", args["steps"], args["global_batch"], scheduler=True, eval_after=True)
    for rank, run in enumerate(runs):
        assert_numbers_close([run["eval"]], [ref["eval"]], f"rank {rank} eval loss after training")


@pytest.mark.slow
def test_lr_scheduler_works_unchanged(spawns: Spawns) -> None:
    """torch.optim.lr_scheduler.StepLR on the user's optimizer: same learning rates and parameters as the
    reference with the same scheduler."""
    args = scenario_args("eval-p2")
    runs = spawns.values("eval-p2")
    check_plan(runs, 2, 4)
    ref = reference("dropout0", "sgd", args["steps"], args["global_batch"], scheduler=True, eval_after=True)
    assert ref["lrs"] == [fw.SGD_LR * fw.SCHEDULER_GAMMA ** (k + 1) for k in range(args["steps"])]
    for rank, run in enumerate(runs):
        assert run["lrs"] == ref["lrs"], f"rank {rank}: lrs {run['lrs']} vs {ref['lrs']}"
        assert_numbers_close(run["losses"], ref["losses"], f"rank {rank} losses")
    assert_tensors_close(runs[0]["state"], ref["state"], "StepLR state_dict")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint and resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_state_dicts_match_reference(spawns: Spawns) -> None:
    """After 2 AdamW steps on 4 ranks x 2 stages: model.state_dict() and optimizer.state_dict(from_global=True)
    on rank 0 are the unwrapped model's and optimizer's (same keys, indices, hyperparameters, state)."""
    runs = spawns.values("checkpoint")
    check_plan(runs, fw.CKPT_PARTITIONS, 4)
    ref = reference("mlp", "adamw", fw.CKPT_STEPS, fw.CKPT_BATCH, opt_state_after=fw.CKPT_STEPS)
    assert all(run["state"] is None and run["osd"] == {} for run in runs[1:])
    assert list(runs[0]["state"]) == list(ref["state"]), "state dict keys (or their order) differ"
    assert_tensors_close(runs[0]["state"], ref["state"], "checkpoint model state")
    assert_optimizer_state_close(runs[0]["osd"], ref["opt_state"], "checkpoint optimizer state")


@pytest.mark.slow
def test_checkpoint_file_loads_with_weights_only(spawns: Spawns) -> None:
    runs = spawns.values("checkpoint")
    saved = torch.load(fw.checkpoint_path(str(spawns.base)), weights_only=True)
    assert set(saved) == {"model", "optim"}
    assert_tensors_close(saved["model"], runs[0]["state"], "saved model state", rtol=0, atol=0)
    assert_optimizer_state_close(saved["optim"], runs[0]["osd"], "saved optimizer state")


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_resume_matches_uninterrupted_training(when: str, spawns: Spawns) -> None:
    """2 fresh ranks load the 4-rank checkpoint (before wrapping: plain load_state_dicts, 1 stage x 2 replicas;
    after partitioning: RaNNCModule.load_state_dict + optimizer.load_state_dict(from_global=True), 2 stages)
    and train 2 more steps: equal to 4 uninterrupted reference steps."""
    runs = spawns.values(f"resume-{when}")
    check_plan(runs, fw.RESUME_PARTITIONS[when], fw.RESUME_WORLD)
    ref = reference("mlp", "adamw", 2 * fw.CKPT_STEPS, fw.CKPT_BATCH)
    for rank, run in enumerate(runs):
        assert_numbers_close(
            run["losses"], ref["losses"][fw.CKPT_STEPS :], f"resume-{when} rank {rank} losses"
        )
    assert_tensors_close(runs[0]["state"], ref["state"], f"resume-{when} state_dict")


# ----------------------------------------------------------------------------------------------------------------
# bf16 autocast
# ----------------------------------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3). Under autocast the Linear weight gradients are
# bf16 matmul results, so summing them per microbatch/replica rounds differently from one full-batch matmul: the
# parameter updates differ from the single-process bf16 run by ~0.3% here (the fp32 run's differ by ~0.3-0.9%),
# so updates are compared at 2% of their norm and parameters at rtol=1e-2, atol=1e-4. The loss of step 0 has no
# such reduction and must be much closer to the bf16 run's than the fp32 run's is.
BF16_UPDATE_RTOL = 2e-2
BF16_PARAM_RTOL, BF16_PARAM_ATOL = 1e-2, 1e-4
BF16_LOSS_RTOL = 1e-3


@pytest.mark.slow
def test_autocast_bf16_matches_bf16_reference(spawns: Spawns) -> None:
    runs = spawns.values("autocast-p2")
    check_plan(runs, fw.AUTOCAST_PARTITIONS, 4)
    bf16 = reference("mlp", "sgd", fw.AUTOCAST_STEPS, fw.AUTOCAST_BATCH, autocast=True)
    fp32 = reference("mlp", "sgd", fw.AUTOCAST_STEPS, fw.AUTOCAST_BATCH)
    fp32_gap = abs(fp32["losses"][0] - bf16["losses"][0])
    assert fp32_gap > 1e-6, (
        "autocast changes nothing in the reference: the test would not tell bf16 from fp32"
    )
    for rank, run in enumerate(runs):
        assert_numbers_close(run["losses"], bf16["losses"], f"rank {rank} bf16 losses", rtol=BF16_LOSS_RTOL)
        gap = abs(run["losses"][0] - bf16["losses"][0])
        assert gap <= 0.1 * fp32_gap, (
            f"rank {rank}: step-0 loss {run['losses'][0]} is {gap:.3g} from the bf16 reference "
            f"{bf16['losses'][0]}, not much closer than the fp32 run ({fp32_gap:.3g}): autocast not applied?"
        )
    state = runs[0]["state"]
    assert_tensors_close(state, bf16["state"], "bf16 state_dict", rtol=BF16_PARAM_RTOL, atol=BF16_PARAM_ATOL)
    initial = fw.build("mlp").state_dict()
    for name, value in bf16["state"].items():
        expected = value - initial[name]
        error = float((state[name] - initial[name] - expected).norm())
        assert error <= BF16_UPDATE_RTOL * float(expected.norm()), (
            f"{name}: update differs from the bf16 reference's by {error:.3g} (norm {float(expected.norm()):.3g})"
        )


@pytest.mark.slow
def test_call_without_autocast_after_autocast_capture_raises(spawns: Spawns) -> None:
    runs = spawns.values("autocast-p2")
    for rank, run in enumerate(runs):
        outcome = run["without_autocast"]
        expected = f"{rannc.errors.InputError.__module__}.{rannc.errors.InputError.__qualname__}"
        assert outcome.get("error") == expected, f"rank {rank}: {outcome}"
        assert "autocast" in outcome["message"], outcome["message"]


# ----------------------------------------------------------------------------------------------------------------
# Fast checks of the helpers (one process, no rannc)
# ----------------------------------------------------------------------------------------------------------------


def test_dropout_mlp_is_deterministic_and_drops_only_in_train_mode() -> None:
    first, second, zero_p = fw.build("dropout"), fw.build("dropout"), fw.build("dropout0")
    for a, b, c in zip(
        first.state_dict().values(), second.state_dict().values(), zero_p.state_dict().values()
    ):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == fw.DROPOUT_P for m in first.modules()) == 3
    batch = fw.make_batches("dropout", 1, 8)[0]
    with torch.no_grad():
        train = [float(models.call(first, batch)) for _ in range(2)]
        first.eval()
        evals = [float(models.call(first, batch)) for _ in range(2)]
    assert train[0] != train[1] and evals[0] == evals[1] and evals[0] != train[0]
    assert evals[0] == initial_eval_loss("dropout", 8)


def test_scenarios_cover_the_brief() -> None:
    shapes = {label: scenario_args(label) for label in fw.FOUR_RANK_SCENARIOS}
    assert {shapes[k]["partition_num"] for k in ACCUM} >= {1, 2, 4}
    assert {shapes[k]["style"] for k in ACCUM} == {"no_sync", "delay"}
    assert {shapes[k]["partition_num"] for k in CLIP if shapes[k]["name"] == "skip_tied"} >= {2, 4}
    assert {shapes[k]["partition_num"] for k in ZERO} >= {1, 2}
    assert set(ACCUM + CLIP + ZERO) <= set(fw.FOUR_RANK_SCENARIOS)
    assert fw.CKPT_PARTITIONS == 2 and fw.RESUME_WORLD == 2 and fw.RESUME_WORLD != 4
    for label, args in shapes.items():
        if "global_batch" in args:
            assert args["global_batch"] % 4 == 0 and args["global_batch"] % fw.RESUME_WORLD == 0, label


def test_clip_max_norm_clips_in_the_reference() -> None:
    ref = reference("skip_tied", "sgd", fw.CLIP_STEPS, fw.CLIP_BATCH, max_norm=fw.CLIP_MAX_NORM)
    unclipped = reference("skip_tied", "sgd", fw.CLIP_STEPS, fw.CLIP_BATCH)
    assert all(n > fw.CLIP_MAX_NORM for n in ref["norms"])
    assert any(not torch.allclose(ref["state"][k], unclipped["state"][k]) for k in ref["state"])
