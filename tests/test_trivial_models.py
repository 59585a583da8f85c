"""Models with nothing to cut (identity, no parameters, one operation, one Linear) run data parallel on 2 ranks.

One spawn (tests/trivial_workers.py) trains every model with rannc, and the two Linear models with DDP too; each
test compares one model with one process on the global batch (and DDP where it accepts the model), under rannc's
gradient contract (DDP's average over ranks; an input's gradient is one process's on the rank's rows). SGD with
momentum, fp32, rtol 1e-5.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import trivial_workers as tw
from distributed_helpers import run_workers
from rich.console import Console

from rannc.deploy import load_deployment, show_deployment

RTOL, ATOL = 1e-5, 1e-6
WORLD = 2
NOTHING_TO_CUT = ("identity", "pass_through")  # no operation depends on the inputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, dict]], Path]:
    base = tmp_path_factory.mktemp("trivial")
    results = run_workers(tw.trivial_worker, WORLD, str(base / "cache"), str(base), timeout=240)
    return results, base


def one_process(name: str) -> dict[str, Any]:
    """The unwrapped model trained on the whole global batches."""
    model = tw.build(name)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=tw.LR, momentum=tw.MOMENTUM) if params else None
    result = tw.train(model, name, optimizer, 0, 1)
    result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return result


def rows_of(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tw.local_rows(tensor, rank, WORLD) if tensor.dim() > 0 else tensor


def assert_close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


ALL = ["identity", "pass_through", "squared_error", "relu", "linear_loss", "linear"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_outputs_equal_one_process(runs, name: str) -> None:
    """Every rank gets its rows of the outputs (a loss: the global batch's) at every step."""
    results, base = runs
    reference = one_process(name)
    for rank, result in enumerate(results):
        run = result[name]
        if name in NOTHING_TO_CUT:  # the others are planned as usual (one stage or two, as measured)
            assert run["stages"] == [[0, 1]], (
                f"{name}: one stage replicated on both ranks, got {run['stages']}"
            )
        assert len(run["outputs"]) == tw.STEPS
        for step, (outs, ref_outs) in enumerate(zip(run["outputs"], reference["outputs"])):
            for k, (out, ref) in enumerate(zip(outs, ref_outs)):
                assert_close(out, rows_of(ref, rank), f"{name} rank {rank} step {step} output {k}")
    deployment = load_deployment(base / f"{name}.json")  # saved, readable and shown like any plan
    assert [stage.ranks for stage in deployment.plan.stages] == run["stages"]
    text = show_deployment(deployment, console=Console(file=io.StringIO(), width=200))
    assert f"{len(run['stages'])} stage(s) on {WORLD} rank(s)" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_input_gradients_equal_one_process(runs, name: str) -> None:
    """Each rank's input gradient is one process's on its rows: that of the average over ranks of each rank's
    per-sample-mean loss (inputs returned unchanged included), or of the global loss the model returns."""
    results, _ = runs
    reference = one_process(name)
    for rank, result in enumerate(results):
        for step, (grads, ref_grads) in enumerate(zip(result[name]["input_grads"], reference["input_grads"])):
            for k, (grad, ref) in enumerate(zip(grads, ref_grads)):
                assert_close(grad, rows_of(ref, rank), f"{name} rank {rank} step {step} input gradient {k}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear_loss", "linear"])
def test_linear_trains_like_one_process_and_ddp(runs, name: str) -> None:
    """A single Linear, returning its loss or its output (the user computing a mean loss from it on each rank):
    losses and parameters after every step are one process's and DDP's (equal local batches)."""
    results, _ = runs
    reference = one_process(name)
    for rank, result in enumerate(results):
        run = result[name]
        if name == "linear":  # the loss each rank computes from its rows is DDP's
            assert run["losses"] == pytest.approx(run["ddp"]["losses"], rel=RTOL), (
                f"rank {rank} losses vs DDP"
            )
        else:  # a returned loss is the global batch's
            assert run["losses"] == pytest.approx(reference["losses"], rel=RTOL), f"rank {rank} losses"
    run = results[0][name]
    for key, value in reference["state"].items():
        assert_close(run["ddp_state"][key], value, f"DDP's {key} equals one process (equal local batches)")
        assert_close(run["state"][key], value, f"{name} {key} after {tw.STEPS} steps")


@pytest.mark.slow
def test_unused_parameters_stay_as_they_were(runs) -> None:
    results, _ = runs
    initial = tw.build("pass_through").state_dict()
    for key, value in initial.items():
        torch.testing.assert_close(results[0]["pass_through"]["state"][key], value, rtol=0, atol=0)


def test_a_clean_job_ends_without_store_warnings(tmp_path: Path) -> None:
    """rank 0's process group hosts the job's store (rannc's watchdog polls it): a rank that stays in its script
    after rank 0 is done must not poll a store that is gone (torch then prints 'sendBytes failed ... Broken
    pipe' with a C++ stack). rannc.launch stops every watchdog, then meets at a barrier, before the groups go."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import trivial_workers as tw\n"
        "from rannc.launch import launch_local\n"
        "if __name__ == '__main__':\n"
        "    print(launch_local(tw.late_rank_worker, 2, (sys.argv[2], 1.5), timeout=240))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert len(losses) == 2 and losses[0] == losses[1]  # both ranks trained (the loss is the global batch's)
    for marker in ("Broken pipe", "sendBytes failed", "TCPStore"):
        assert marker not in done.stderr, done.stderr[-3000:]
