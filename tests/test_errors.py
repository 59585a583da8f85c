"""User mistakes get a clear rannc error (its type from rannc.errors, a message naming the problem and the fix),
on every rank, without any rank hanging, and without losing anything the user saved.

The scenarios run in real spawned processes (tests/error_workers.py), several per spawn:

* `pair` (2 ranks): a model that differs across ranks, memory that cannot fit, saving a deployment while training,
  changed call arguments, a global batch too small for the plan;
* `loaded` (2 fresh ranks): training with the deployment `pair` saved;
* `solo` (1 process): memory errors and their suggested limit, deployment files for another model / truncated /
  for another world size, saving over a user's file, double wrapping, uncapturable models, non-tensor outputs,
  backward twice;
* one 2-rank spawn per save error that must reach every rank, and a plain subprocess for a script that starts
  without any process group or RANK/WORLD_SIZE.

Every spawn has a timeout, so a rank left waiting in a collective fails the test instead of hanging it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import error_workers as ew
import pytest
import torch
from distributed_helpers import run_workers

import rannc
from rannc.errors import CaptureError, DeploymentError, InputError, PlanError, RanncError

SPAWN_TIMEOUT_S = 240.0
SAVE_ERROR_TIMEOUT_S = 60.0  # these spawns are expected to strand a rank; keep the wait short
Results = dict[str, dict[str, Any]]  # scenario label -> outcome ({"value": ...} or {"error", "message", ...})


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _error_class(name: str) -> type | None:
    module, _, qualname = name.rpartition(".")
    try:
        found: Any = importlib.import_module(module)
    except ImportError:
        return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def assert_raised(outcome: dict[str, Any], expected: type[Exception], *patterns: str, where: str = "") -> str:
    """`outcome` is an error of type `expected` (or a subclass) whose message matches every regex in `patterns`
    (case-insensitive); returns the message."""
    where = where or "the call"
    assert "error" in outcome, (
        f"{where}: expected {expected.__name__}, but it succeeded and returned {outcome.get('value')!r}"
    )
    raised, message = outcome["error"], outcome["message"]
    found = _error_class(raised)
    assert found is not None and issubclass(found, expected), (
        f"{where}: expected {expected.__name__}, got {raised}: {message}\n{outcome.get('traceback', '')}"
    )
    for pattern in patterns:
        assert re.search(pattern, message, re.IGNORECASE | re.DOTALL), (
            f"{where}: the {raised} message does not match {pattern!r}:\n{message}"
        )
    return message


def value(outcome: dict[str, Any], where: str) -> Any:
    assert "value" in outcome, (
        f"{where} failed: {outcome.get('error')}: {outcome.get('message')}\n{outcome.get('traceback', '')}"
    )
    return outcome["value"]


class Spawns:
    """Runs each spawn once per module, when a test first needs it; a failed spawn fails every test using it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.results: dict[str, list[Results]] = {}
        self.failures: dict[str, str] = {}

    def _run(self, key: str, worker: Any, world: int, *args: Any) -> list[Results]:
        if key not in self.results and key not in self.failures:
            try:
                self.results[key] = run_workers(worker, world, *args, timeout=SPAWN_TIMEOUT_S)
            except AssertionError as exc:
                self.failures[key] = str(exc)
        if key in self.failures:
            pytest.fail(f"the {key} spawn failed:\n{self.failures[key]}")
        return self.results[key]

    @property
    def deployment_path(self) -> Path:
        return self.base / "dep.json"

    def pair(self) -> list[Results]:
        return self._run("pair", ew.pair_worker, 2, str(self.base))

    def loaded(self) -> list[Results]:
        self.pair()  # writes the deployment file
        return self._run("loaded", ew.load_pair_worker, 2, str(self.base))

    def solo(self) -> Results:
        # When the pair spawn has run, its deployment (world size 2) is also loaded in this one process.
        made = "pair" in self.results and self.deployment_path.exists()
        pair_deployment = str(self.deployment_path) if made else None
        return self._run("solo", ew.solo_worker, 1, str(self.base), pair_deployment)[0]

    def world_size_mismatch(self) -> dict[str, Any]:
        """The pair spawn's deployment loaded in one process (by the solo spawn, or by its own when the solo spawn
        ran before the pair spawn)."""
        self.pair()
        solo = self.solo()
        if "world_size_mismatch" in solo:
            return solo["world_size_mismatch"]
        args = (str(self.base), str(self.deployment_path))
        return self._run("world_size_mismatch", ew.load_only_worker, 1, *args)[0]["world_size_mismatch"]


@pytest.fixture(scope="module")
def spawns(tmp_path_factory: pytest.TempPathFactory) -> Spawns:
    return Spawns(tmp_path_factory.mktemp("rannc_errors"))


def every_rank(runs: list[Results], label: str) -> list[tuple[int, dict[str, Any]]]:
    return [(rank, run[label]) for rank, run in enumerate(runs)]


# ----------------------------------------------------------------------------------------------------------------
# 1. A model that differs across ranks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_model_differing_across_ranks_fails_on_every_rank(spawns: Spawns) -> None:
    messages = set()
    for rank, outcome in every_rank(spawns.pair(), "different_seed"):
        messages.add(
            assert_raised(
                outcome,
                RanncError,
                r"differs across ranks",
                r"ranks \[1\]",
                r"identically on every rank|manual_seed",
                where=f"rank {rank}",
            )
        )
    assert len(messages) == 1, f"the ranks report different errors: {messages}"


# ----------------------------------------------------------------------------------------------------------------
# 2. Memory that cannot fit
# ----------------------------------------------------------------------------------------------------------------

NEED = r"smallest per-device memory that would fit is [0-9.]+ GiB"


@pytest.mark.slow
def test_memory_error_on_every_rank(spawns: Spawns) -> None:
    messages = set()
    for rank, outcome in every_rank(spawns.pair(), "memory"):
        messages.add(
            assert_raised(outcome, PlanError, NEED, r"mem_limit_gb >= [0-9.]+", where=f"rank {rank}")
        )
    assert len(messages) == 1, f"the ranks report different errors: {messages}"


def test_memory_error_suggests_a_limit_that_plans(spawns: Spawns) -> None:
    """The message names the memory needed and a mem_limit_gb; planning with that value succeeds."""
    result = value(spawns.solo()["memory_wide_model"], "memory_error_then_retry(wide)")
    assert_raised(result["failed"], PlanError, NEED, r"mem_limit_gb >= [0-9.]+", r"mem_margin")
    assert result.get("suggested", 0) > 0, f"no usable mem_limit_gb suggested: {result['failed']['message']}"
    plan = value(result["retry"], f"planning with the suggested mem_limit_gb={result['suggested']}")["plan"]
    assert plan["stages"] == [[0]]


def test_memory_error_suggestion_is_usable_for_a_small_model(spawns: Spawns) -> None:
    result = value(spawns.solo()["memory_small_model"], "memory_error_then_retry(mlp)")
    assert_raised(result["failed"], PlanError, NEED, r"mem_limit_gb >= [0-9.]+")
    assert result.get("suggested", 0) > 0, (
        f"the suggested mem_limit_gb is not a positive limit: {result['failed']['message']}"
    )
    value(result["retry"], f"planning with the suggested mem_limit_gb={result['suggested']}")


# ----------------------------------------------------------------------------------------------------------------
# 3. Deployment files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deployment_for_another_world_size(spawns: Spawns) -> None:
    result = value(spawns.world_size_mismatch(), "loading the 2-rank deployment in 1 process")
    assert_raised(
        result["load"],
        DeploymentError,
        r"world size 2, this job has 1",
        r"launch with 2 processes|re-plan",
    )
    assert result["file_intact"], "loading changed the deployment file"


def test_deployment_for_another_model(spawns: Spawns) -> None:
    result = value(spawns.solo()["another_model"], "save_then_load(other -> mlp)")
    assert_raised(result["load"], DeploymentError, r"another model", r"delete it|point deployment_file")
    assert result["file_intact"], "loading changed the deployment file"


def test_truncated_deployment(spawns: Spawns) -> None:
    result = value(spawns.solo()["truncated"], "save_then_load(truncated)")
    assert_raised(result["load"], DeploymentError, r"corrupted or truncated", r"delete it|re-create")
    assert result["file_intact"], "loading changed the deployment file"


@pytest.mark.slow
def test_deployment_round_trip(spawns: Spawns) -> None:
    """Save while training on 2 ranks; 2 fresh ranks loading it (with a config that would plan 1 stage) get the
    same plan and the same losses; the file is still the one saved."""
    saved_runs, loaded_runs = spawns.pair(), spawns.loaded()
    saved = [value(outcome, f"rank {rank} saving") for rank, outcome in every_rank(saved_runs, "save")]
    loaded = [value(outcome, f"rank {rank} loading") for rank, outcome in every_rank(loaded_runs, "load")]
    on_disk = rannc.load_deployment(spawns.deployment_path)
    assert on_disk.world_size == 2
    assert [sorted(stage.ranks) for stage in on_disk.plan.stages] == [[0], [1]]
    assert on_disk.plan.microbatches == 2
    for rank in range(2):
        assert saved[rank]["plan"] == {"stages": [[0], [1]], "microbatches": 2, "schedule": "1f1b"}
        assert loaded[rank]["plan"] == saved[rank]["plan"], f"rank {rank}: the loaded plan differs"
        assert loaded[rank]["losses"] == saved[rank]["losses"], (
            f"rank {rank}: losses {loaded[rank]['losses']} with the loaded plan, {saved[rank]['losses']} saved"
        )
    losses = saved[0]["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_save_deployment_refuses_a_user_file(spawns: Spawns) -> None:
    result = value(spawns.solo()["save_over_foreign_file"], "save_over_foreign_file")
    assert_raised(result["save"], DeploymentError, r"not a rannc deployment", r"move it away|choose another")
    assert result["file_intact"], "the user's file was changed"


def _save_error_on_every_rank(spawns: Spawns, which: str, key: str) -> None:
    runs = run_workers(ew.save_errors_worker, 2, str(spawns.base), which, timeout=SAVE_ERROR_TIMEOUT_S)
    for rank, outcome in every_rank(runs, which):
        result = value(outcome, f"rank {rank}")
        assert result["file_intact"], f"rank {rank}: the user's file was changed"
        assert_raised(result[key], DeploymentError, r"not a rannc deployment", where=f"rank {rank}")


@pytest.mark.slow
def test_save_deployment_refusal_reaches_every_rank(spawns: Spawns) -> None:
    _save_error_on_every_rank(spawns, "method", "save")


@pytest.mark.slow
def test_configured_save_refusal_reaches_every_rank(spawns: Spawns) -> None:
    _save_error_on_every_rank(spawns, "config", "call")


# ----------------------------------------------------------------------------------------------------------------
# 4. Call structure changed after the first call
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_added_keyword_argument(spawns: Spawns) -> None:
    for rank, outcome in every_rank(spawns.pair(), "changed_arguments"):
        result = value(outcome, f"rank {rank}")
        assert_raised(
            result["added_keyword"],
            InputError,
            r"differ in structure from the first call",
            r"shift",
            r"pass the same arguments every call",
            where=f"rank {rank}",
        )
        again = value(result["again"], f"rank {rank}: the first call's arguments after the errors")
        assert again == result["first"], f"rank {rank}: the model changed after the rejected calls"


@pytest.mark.slow
def test_changed_non_tensor_argument(spawns: Spawns) -> None:
    for rank, outcome in every_rank(spawns.pair(), "changed_arguments"):
        result = value(outcome, f"rank {rank}")
        assert_raised(
            result["changed_constant"],
            InputError,
            r"non-tensor arguments changed",
            r"1\.0\]? to \[?2\.0",
            r"keep them fixed|pass them as tensors",
            where=f"rank {rank}",
        )


@pytest.mark.slow
def test_changed_non_tensor_argument_is_named(spawns: Spawns) -> None:
    result = value(spawns.pair()[0]["changed_arguments"], "rank 0")
    assert_raised(result["changed_constant"], InputError, r"\bscale\b")


# ----------------------------------------------------------------------------------------------------------------
# 5. A global batch too small for the plan
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_global_batch_too_small(spawns: Spawns) -> None:
    """Planned for 16 samples as 1 stage x 2 replicas x 4 microbatches: 2 samples cannot be split; the error names
    the minimum (8), which works, and one less does not."""
    for rank, outcome in every_rank(spawns.pair(), "batch_too_small"):
        result = value(outcome, f"rank {rank}")
        assert result["plan"] == {"stages": [[0, 1]], "microbatches": 4, "schedule": "1f1b"}
        assert_raised(
            result["too_small"],
            InputError,
            r"global batch 2 is too small",
            r"at least 8",
            where=f"rank {rank}",
        )
        assert result["minimum"] == 8
        loss = value(result["with_minimum"], f"rank {rank}: a call with the named minimum global batch")
        assert math.isfinite(loss)
        assert_raised(result["with_one_less"], InputError, r"at least 8", where=f"rank {rank}, one less")


# ----------------------------------------------------------------------------------------------------------------
# 6. Wrapping a wrapped model
# ----------------------------------------------------------------------------------------------------------------


def test_wrapping_a_rannc_module(spawns: Spawns) -> None:
    assert_raised(
        spawns.solo()["wrap_twice"],
        RanncError,
        r"already wrapped by RaNNCModule",
        r"pass the plain nn\.Module",
    )


def test_wrapping_a_ddp_module(spawns: Spawns) -> None:
    assert_raised(
        spawns.solo()["wrap_ddp"],
        RanncError,
        r"already wrapped by DistributedDataParallel",
        r"pass the plain nn\.Module",
    )


# ----------------------------------------------------------------------------------------------------------------
# 7-8. Models rannc cannot capture, and non-tensor outputs
# ----------------------------------------------------------------------------------------------------------------


def test_data_dependent_control_flow(spawns: Spawns) -> None:
    assert_raised(spawns.solo()["control_flow"], CaptureError, r"torch\.export", r"torch\.cond")


def test_data_dependent_python_number_output(spawns: Spawns) -> None:
    """forward returns loss.item() alongside the loss: a value torch.export cannot carry."""
    assert_raised(spawns.solo()["item_output"], CaptureError, r"not a tensor", r"return tensors")


def test_float_output(spawns: Spawns) -> None:
    outcome = spawns.solo()["float_output"]
    assert "error" in outcome, f"no error; the wrapped model returned {outcome.get('value')}"
    assert_raised(outcome, RanncError, r"not a tensor|non-tensor", r"return tensors")


def test_string_output(spawns: Spawns) -> None:
    outcome = spawns.solo()["string_output"]
    assert "error" in outcome, f"no error; the wrapped model returned {outcome.get('value')}"
    assert_raised(outcome, RanncError, r"not a tensor|non-tensor", r"return tensors")


# ----------------------------------------------------------------------------------------------------------------
# 9. backward twice
# ----------------------------------------------------------------------------------------------------------------


def test_backward_twice(spawns: Spawns) -> None:
    outcome = value(spawns.solo()["backward_twice"], "the first forward and backward")
    assert_raised(outcome, RanncError, r"backward\(\) was called twice", r"run the forward again")


# ----------------------------------------------------------------------------------------------------------------
# 10. No process group and no RANK/WORLD_SIZE
# ----------------------------------------------------------------------------------------------------------------

NO_LAUNCHER_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
import rannc
import error_workers as ew

torch.set_num_threads(1)
assert not dist.is_initialized()
model = ew.build("mlp", 0)
optimizer = torch.optim.SGD(model.parameters(), lr=ew.SGD_LR)
wrapped = rannc.RaNNCModule(model, optimizer, **ew.config(sys.argv[1]))
x, y = ew.make_batches(0, 1, 8)[0]
losses = []
for _ in range(4):
    loss = wrapped(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.detach().item())
print(json.dumps({
    "initialized": dist.is_initialized(),
    "backend": dist.get_backend(),
    "rank": rannc.get_rank(),
    "world_size": rannc.get_world_size(),
    "stages": len(wrapped.deployment.plan.stages),
    "rannc": rannc.__file__,
    "losses": losses,
}))
"""

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_runs_without_a_process_group_or_launcher(tmp_path: Path) -> None:
    """A plain `python train.py`: RaNNCModule initialises a 1-process group itself and trains like the model."""
    repo = Path(rannc.__file__).resolve().parents[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(repo), str(Path(ew.__file__).resolve().parent)])
    done = subprocess.run(
        [sys.executable, "-c", NO_LAUNCHER_SCRIPT, str(tmp_path / "profiles")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"the script failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["rannc"]).resolve() == Path(rannc.__file__).resolve()
    assert report["initialized"] and report["backend"] == "gloo"
    assert (report["rank"], report["world_size"], report["stages"]) == (0, 1, 1)

    model = ew.build("mlp", 0)  # the same training without rannc
    optimizer = torch.optim.SGD(model.parameters(), lr=ew.SGD_LR)
    x, y = ew.make_batches(0, 1, 8)[0]
    expected = []
    for _ in range(4):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    torch.testing.assert_close(
        torch.tensor(report["losses"], dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-6,
    )
    assert expected[-1] < expected[0]
