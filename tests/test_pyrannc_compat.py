"""pyrannc compatibility: a RaNNC user's script runs after `import rannc as pyrannc`.

tests/pyrannc_script.py (RaNNC's tutorial model, gradient accumulation with pyrannc.delay_grad_allreduce flipped
between forward and backward, get_param / get_param_grad / named_parameters(from_global=True), clip_grad_norm,
optimizer.state_dict(from_global=True), save_deployment, clear) runs under torchrun on 2 ranks without a process
group started by hand; what each rank saves is compared with one process training the global batch (SGD with
momentum, fp32, rtol 1e-5). pyrannc options that mean nothing here are refused with the replacement named.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyrannc_script as script
import pytest
import torch

import rannc
from rannc.compat import translate_options
from rannc.errors import ConfigError, RanncError

RTOL, ATOL = 1e-5, 1e-6
WORLD = 2


def assert_close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def assert_all_close(actual: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    assert set(actual) == set(expected), f"{what}: keys {sorted(actual)} vs {sorted(expected)}"
    for name, value in expected.items():
        assert_close(actual[name], value, f"{what} {name}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str]:
    out = tmp_path_factory.mktemp("pyrannc")
    env = dict(os.environ)
    env.update(
        RANNC_PROFILE_CACHE_DIR=str(out / "cache"),
        RANNC_PROFILE_ITERATIONS="1",
        RANNC_SHOW_PROGRESS="0",
        RANNC_PARTITION_NUM="1",  # data parallel: the delayed gradient allreduce has replicas to reduce over
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(Path(rannc.__file__).parents[1]), env.get("PYTHONPATH", "")]),
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--master-port",
        str(_free_port()),
        str(Path(script.__file__)),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)], done.stdout


def _free_port() -> int:
    from distributed_helpers import find_free_port

    return find_free_port()


def one_process() -> dict[str, Any]:
    """The tutorial model trained on the global batches (the ranks' local batches in rank order)."""
    net = script.build_net()
    opt = torch.optim.SGD(net.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    locals_ = [list(script.loader(WORLD, rank)) for rank in range(WORLD)]
    batches = [[torch.cat(parts) for parts in zip(*pieces)] for pieces in zip(*locals_)]
    losses, update_grads, norms = [], [], []
    for step, (x, tgt) in enumerate(batches):
        loss = net(x, tgt)
        loss.backward()
        if (step + 1) % script.ACCUMULATION == 0:
            update_grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
            norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), script.MAX_NORM)))
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    result = {
        "losses": losses,
        "update_grads": update_grads,
        "norms": norms,
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "opt_state": copy.deepcopy(opt.state_dict()),
    }
    loss = net(*batches[-1])  # the step the script takes after clear()
    loss.backward()
    opt.step()
    result["final"] = {k: v.clone() for k, v in net.state_dict().items()}
    return result


@pytest.mark.slow
def test_pyrannc_script_trains_like_one_process(ranks) -> None:
    results, stdout = ranks
    reference = one_process()
    assert stdout.count("#Parameters=") == 1, "pyrannc.get_rank() is the job's rank before the module exists"
    for rank, result in enumerate(results):
        assert result["world_size"] == WORLD
        assert result["losses"] == pytest.approx(reference["losses"], rel=RTOL), f"rank {rank} losses"
        assert result["norms"] == pytest.approx(reference["norms"], rel=RTOL), f"rank {rank} clip norms"
        for update, (grads, expected) in enumerate(zip(result["update_grads"], reference["update_grads"])):
            assert_all_close(grads, expected, f"rank {rank} get_param_grad at update {update}")
        assert_all_close(result["params"], reference["params"], f"rank {rank} get_param")
        assert_all_close(
            result["global_params"], reference["params"], f"rank {rank} named_parameters(from_global)"
        )
        assert_all_close(result["state"], reference["state"], f"rank {rank} state_dict(rank0_only=False)")
        assert_all_close(result["final"], reference["final"], f"rank {rank} one step after clear()")


@pytest.mark.slow
def test_optimizer_state_from_global_and_after_clear(ranks) -> None:
    results, _ = ranks
    reference = one_process()["opt_state"]
    for what, state in [("rank 0 state_dict(from_global=True)", results[0]["opt_state"])] + [
        (f"rank {rank} optimizer after clear()", result["opt_after_clear"])
        for rank, result in enumerate(results)
    ]:
        assert state["param_groups"] == reference["param_groups"], what
        assert sorted(state["state"]) == sorted(reference["state"]), what
        for index, entry in reference["state"].items():
            assert_close(
                state["state"][index]["momentum_buffer"], entry["momentum_buffer"], f"{what} [{index}]"
            )
    assert results[1]["opt_state"] == {}


@pytest.mark.slow
def test_after_clear_every_rank_has_the_whole_model(ranks) -> None:
    """clear() undeploys: the user's own nn.Module holds every parameter, whole and current, on every rank."""
    results, _ = ranks
    for rank, result in enumerate(results):
        assert_all_close(result["after_clear"], result["params"], f"rank {rank} model after clear()")


@pytest.mark.slow
def test_local_named_parameters_and_deployment(ranks) -> None:
    results, stdout = ranks
    names = [n for n, _ in script.build_net().named_parameters()]
    held = [set(result["local_names"]) for result in results]
    assert set().union(*held) == set(names), "every parameter is held by some rank"
    assert "rannc deployment:" in stdout and f"{script.BATCH_SIZE_PER_PROC * WORLD}" in stdout


@pytest.mark.parametrize(
    ("option", "value", "replacement"),
    [
        ("enable_apex_amp", True, "torch.autocast"),
        ("allreduce_amp_master_params", True, "torch.autocast"),
        ("use_amp_master_params", True, "torch.autocast"),
        ("gather_inputs", False, "DistributedSampler"),
        ("offload_params", True, "enable_zero"),
        ("dist_params", True, "save_sharded"),
        ("check_unused_values", True, "unused"),
    ],
)
def test_pyrannc_options_without_meaning_here_are_refused(option: str, value: Any, replacement: str) -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=replacement) as caught:
        rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), **{option: value})
    assert option in str(caught.value)


def test_pyrannc_options_asking_for_what_rannc_does_are_accepted() -> None:
    pyrannc_defaults = {
        "gather_inputs": True,
        "enable_apex_amp": False,
        "allreduce_amp_master_params": False,
        "check_unused_values": False,
        "offload_params": False,
        "load_deployment": None,
        "enable_zero": True,
    }
    assert translate_options(pyrannc_defaults) == {"enable_zero": True}
    assert translate_options({"load_deployment": "/tmp/plan.json"}) == {
        "load_deployment": True,
        "deployment_file": "/tmp/plan.json",
    }
    assert translate_options({"load_deployment": True}) == {"load_deployment": True}


def test_pyrannc_switches_without_meaning_here_name_the_replacement() -> None:
    rannc.keep_graph(False)
    with pytest.raises(RanncError, match="backward once"):
        rannc.keep_graph(True)
    with pytest.raises(RanncError, match="RANNC_TRACE"):
        rannc.dump_events()


def test_single_process_helpers_without_a_job() -> None:
    assert (rannc.get_rank(), rannc.get_world_size()) == (0, 1)
    rannc.barrier()
