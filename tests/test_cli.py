"""Tests of the `rannc` command line, the local launcher and the demo's model and memory limit."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rannc.cli import main
from rannc.deploy import Deployment, save_deployment
from rannc.launch import LaunchError, free_port, launch_local
from rannc.plan.types import Plan, StagePlan
from rannc.profile.devices import DeviceProfile

REPO = Path(__file__).resolve().parents[1]


def _deployment() -> Deployment:
    stages = [
        StagePlan(0, 2, 1, [0], 4, 0.01, 0.02, 0.001, 0.0, 1e6, 2e6, 5e6),
        StagePlan(3, 4, 1, [1], 4, 0.011, 0.021, 0.001, 0.0, 1e6, 2e6, 6e6),
    ]
    plan = Plan(
        stages=stages,
        microbatches=2,
        schedule="fill_drain",
        predicted_step_time=0.1,
        global_batch=8,
        world_size=2,
    )
    return Deployment(
        plan=plan,
        graph_hash="deadbeef",
        world_size=2,
        device_memory_bytes=None,
        stage_nodes=[["a", "b"], ["c"]],
        block_names=[],
        stage_module_ranges=[("embed", "layers.0"), ("layers.1", "head")],
    )


def test_show(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "d.json"
    save_deployment(_deployment(), path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "embed .. layers.0" in out and "layers.1 .. head" in out
    assert "schedule fill_drain" in out and "80.0 samples/s" in out


def test_show_names_a_stage_of_top_level_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage whose ops all come from the wrapped model's own forward (no submodule) is named as such."""
    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "d.json"
    save_deployment(
        dataclasses.replace(_deployment(), stage_module_ranges=[("", ""), ("layers.1", "head")]), path
    )
    assert main(["show", str(path)]) == 0
    assert "(top-level code)" in capsys.readouterr().out


def test_show_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(tmp_path / "missing.json")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("rannc ")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "show" in capsys.readouterr().out


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--world-size", "1"]) == 2
    assert "--world-size >= 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--world-size", "0", "must be at least 1, got 0"),
        ("--batch-size", "8.5", "'8.5' is not a whole number"),
        ("--mem-margin", "10", "must be in [0, 1) (a fraction of the memory), got 10.0"),
    ],
)
def test_plan_rejects_bad_counts_by_flag(
    flag: str, value: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad count is refused before any model is built, naming the command-line flag (not a Python name)."""
    counts = {"--world-size": "4", "--batch-size": "8"} | {flag: value}
    argv = ["plan", "no_such_module:factory", "--device", "v100-32gb"]
    argv += [item for pair in counts.items() for item in pair]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {said}" in err and "no_such_module" not in err


# ------------------------------------------------------------------------------------ local launcher


def allreduce_worker(rank: int, world_size: int, scale: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(value)
    return {
        "sum": float(value.item()),
        "env": {
            key: os.environ[key]
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "HF_HUB_OFFLINE")
        },
        "threads": torch.get_num_threads(),
    }


def failing_worker(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait here forever without the launcher stopping it


def sleeping_worker(rank: int, world_size: int) -> None:
    import time

    time.sleep(60)


@pytest.mark.timeout(120)
def test_calibrate_under_a_launcher_is_the_same_command(tmp_path: Path) -> None:
    """`python -m rannc calibrate` in a process a launcher started (RANK, WORLD_SIZE, MASTER_* set, as torchrun
    does) joins that job and writes the profile from rank 0."""
    path = tmp_path / "launched.json"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env.update(
        MASTER_PORT=str(free_port()), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-m", "rannc", "calibrate", "--quick", "--out", str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert DeviceProfile.from_json(json.loads(path.read_text())).peak("float32") > 0
    refused = subprocess.run([*command, "--ranks", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "drop --ranks" in refused.stderr


def test_launch_local_all_reduce() -> None:
    results = launch_local(allreduce_worker, 2, (10,), timeout=90)
    assert [r["sum"] for r in results] == [30.0, 30.0]
    for rank, result in enumerate(results):
        assert result["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "HF_HUB_OFFLINE": "1",
        }
        assert result["threads"] == 1
    assert "RANK" not in os.environ or os.environ["RANK"] != "1"  # the parent's environment is restored


@pytest.mark.timeout(120)
def test_launch_local_reports_a_failing_worker() -> None:
    with pytest.raises(LaunchError, match=r"rank 1 of 2 failed(.|\n)*ValueError: rank one is broken"):
        launch_local(failing_worker, 2, timeout=90)


@pytest.mark.timeout(120)
def test_launch_local_timeout() -> None:
    with pytest.raises(LaunchError, match="did not finish within 3 s"):
        launch_local(sleeping_worker, 2, timeout=3, init_process_group=False)


def test_free_port() -> None:
    assert 0 < free_port() < 65536


# ------------------------------------------------------------------------------------------- demo


def test_demo_memory_limit_forces_a_pipeline() -> None:
    from rannc.demo import build_model, choose_mem_limit_gb, param_bytes

    model = build_model()
    margin = 0.1
    usable = choose_mem_limit_gb(model, margin) * 2**30 * (1 - margin)
    state = 4 * param_bytes(model)  # params + grads + AdamW moments
    assert state > usable  # the whole model does not fit one rank
    assert state / 2 < usable  # half of it does
    embedding = 4 * model.transformer.wte.weight.numel() * 4
    assert state / 2 + embedding < usable  # even a half that holds the tied embedding


def test_demo_model_is_deterministic() -> None:
    from rannc.demo import build_model, make_batch

    a, b = build_model(), build_model()
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    assert (make_batch(0, 4, 64, 2048) == make_batch(0, 4, 64, 2048)).all()
    assert not (make_batch(0, 4, 64, 2048) == make_batch(1, 4, 64, 2048)).all()


def test_demo_model_is_hugging_face_gpt2() -> None:
    """The demo's plain-torch GPT-2 computes Hugging Face GPT2LMHeadModel's loss from the same weights (its
    Conv1D weights transposed into nn.Linear's), so the demo needs no transformers."""
    transformers = pytest.importorskip("transformers")
    import torch

    from rannc.demo_model import GPT2LMHeadModel, GPT2Shape

    shape = GPT2Shape(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    config = transformers.GPT2Config(
        **{k: getattr(shape, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")},
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config)
    model = GPT2LMHeadModel(shape)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    model.load_state_dict({k: v.t() if k.endswith(conv1d) else v for k, v in reference.state_dict().items()})
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    ids = torch.randint(
        0, shape.vocab_size, (3, shape.n_positions), generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(
        model(ids, ids), reference(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_demo_meta_trains_as_the_demo(tmp_path: Path) -> None:
    """`rannc demo --meta` builds the GPT-2 on meta and each rank loads its stage from the file the demo wrote:
    the same losses as the demo that builds it whole on every rank."""
    from rannc.demo import DemoArgs, demo_worker, write_demo_weights

    args = DemoArgs(world_size=2, steps=2, batch_size=2, seq_len=16, timeout_s=300)
    whole = launch_local(demo_worker, 2, (args,), timeout=300)
    meta_args = dataclasses.replace(args, meta=True, weights_file=write_demo_weights(tmp_path))
    meta = launch_local(demo_worker, 2, (meta_args,), timeout=300)
    assert meta[0]["losses"] == pytest.approx(whole[0]["losses"], rel=1e-5)
