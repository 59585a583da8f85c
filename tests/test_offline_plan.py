"""Offline planning (`rannc plan`): meta-device models priced with a device profile, and an offline plan that a
real 2-rank job loads and trains with."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import models
import pytest
import torch
import transformers
from distributed_helpers import run_workers
from reference import train_reference
from torch.nn.attention import SDPBackend, sdpa_kernel

import rannc
from rannc.capture import capture
from rannc.cli import main, parse_memory
from rannc.deploy import load_deployment, save_deployment
from rannc.errors import ConfigError, PlanError
from rannc.offline import normalise_dtype, plan_offline
from rannc.plan.types import default_replica_choices
from rannc.problem import SearchSpace
from rannc.profile import load_profile
from rannc.schedule import Schedule

GIB = 2**30
WORLD, MEMORY, BATCH = 16, 40 * GIB, 64
SEQ = 128


def factory() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A GPT-2 (4 layers x 256) on the meta device, called with meta token ids."""
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=SEQ, use_cache=False)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    ids = torch.zeros(3, SEQ, dtype=torch.long, device="meta")
    return model, (), {"input_ids": ids, "labels": ids}


def big_factory() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A meta GPT-2 whose real fp32 parameters would take ~2.1 GB (5 layers x 2560, vocab 50257)."""
    config = transformers.GPT2Config(n_layer=5, n_embd=2560, n_head=20, n_positions=SEQ, use_cache=False)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    ids = torch.zeros(2, SEQ, dtype=torch.long, device="meta")
    return model, (ids,), {"labels": ids}


def _meta_factory(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """tests/models.py's model `name` built on the meta device (what the 2-rank job builds for real)."""
    with torch.device("meta"):
        model = models.build(name, 0)
    batch = models.make_batches(name, 0, 1, 2)[0]
    args = tuple(v.to("meta") for v in batch["args"])
    return model, args, {k: v.to("meta") for k, v in batch["kwargs"].items()}


def skip_tied_factory() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    return _meta_factory("skip_tied")


def gpt2_factory() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    return _meta_factory("gpt2")


def llama_factory() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    return _meta_factory("llama")


def t5_factory() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    return _meta_factory("t5")


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`rannc plan` once for the meta GPT-2 on 16 x 40GiB, with --out, --plot and --trace."""
    base = tmp_path_factory.mktemp("offline")
    paths = {name: base / name for name in ("plan.json", "plan.png", "sim.json")}
    command = ["plan", "test_offline_plan:factory", "--world-size", str(WORLD), "--device-memory", "40GiB"]
    command += ["--batch-size", str(BATCH), "--device", "a100-40gb", "--dtype", "bf16"]
    command += [
        "--out",
        str(paths["plan.json"]),
        "--plot",
        str(paths["plan.png"]),
        "--trace",
        str(paths["sim.json"]),
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "220")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(command)
        show = io.StringIO()
        with contextlib.redirect_stdout(show):
            shown = main(["show", str(paths["plan.json"])])
    return {"status": status, "out": out.getvalue(), "show": show.getvalue(), "shown": shown, **paths}


def test_plan_prints_the_table(planned: dict[str, Any]) -> None:
    assert planned["status"] == 0, planned["out"]
    text = planned["out"]
    assert f"on {WORLD} rank(s)" in text
    for column in ("Modules", "Replicas", "Ranks", "Fwd ms", "Params", "Grads", "Optimizer"):
        assert column in text
    # a zero-bubble plan shows its backward's I and W passes apart
    assert ("I ms" in text and "W ms" in text) if "schedule zero_bubble" in text else "Bwd ms" in text
    for column in ("Activations", "I/O buffers", "Memory / rank (limit)", "/ 36.00 GiB"):
        assert column in text
    assert re.search(
        r"microbatches \d+, schedule (1f1b|zero_bubble|fill_drain|interleaved_1f1b \(\d+ chunks per position\)), "
        r"global batch 64",
        text,
    )
    assert re.search(r"predicted step time [\d.]+ ms, [\d.]+ samples/s", text)
    assert re.search(r"bubble fraction [\d.]+%", text)
    assert "device profile a100-40gb, dtype bfloat16, 40.00 GiB per device" in text
    assert re.search(
        r"planning time [\d.]+ s \(capture [\d.]+ s, profiling [\d.]+ s, search [\d.]+ s"
        r"(, interleaved 1F1B on finer blocks [\d.]+ s)?\)",
        text,
    )
    assert "transformer" in text  # module names (first .. last) of the stages
    assert re.search(r"\b0-\d+\b", text)  # compact rank ranges


def test_plan_json(planned: dict[str, Any]) -> None:
    data = json.loads(planned["plan.json"].read_text())
    for key in ("graph_hash", "world_size", "device_memory_bytes", "microbatches", "schedule"):
        assert key in data
    assert "predicted_step_time_s" in data and data["predicted_step_time_s"] > 0
    # The search's final choice is simulated: the file's prediction is the simulator's step time.
    assert data["predicted_step_time_s"] == pytest.approx(data["report"]["simulated_step_time_s"], rel=1e-12)
    assert data["analytic_step_time_s"] > 0
    assert data["world_size"] == WORLD and data["global_batch"] == BATCH
    assert data["device_memory_bytes"] == pytest.approx(0.9 * MEMORY)
    ranks = sorted(r for stage in data["stages"] for r in stage["ranks"])
    assert ranks == list(range(WORLD))
    for stage in data["stages"]:
        assert 0 < stage["memory_bytes"] <= data["device_memory_bytes"]
        assert {"first_module", "last_module", "nodes", "fwd_time_s", "bwd_time_s"} <= set(stage)
    report = data["report"]
    assert report["device_profile"] == "a100-40gb" and report["dtype"] == "bfloat16"
    assert 0.0 <= report["bubble_fraction"] < 1.0 and report["samples_per_s"] > 0
    assert {"capture", "profile", "search", "total"} <= set(report["planning_time_s"])
    for stage, entry in zip(data["stages"], report["stages"]):
        parts = entry["memory"]
        assert set(parts) == {"parameters", "gradients", "optimizer", "activations", "buffers"}
        assert sum(parts.values()) == pytest.approx(stage["memory_bytes"], rel=1e-9)
        assert parts["optimizer"] == pytest.approx(2 * parts["parameters"])
    # Parameters of GPT-2 4 x 256 (tied head, vocab 50257), in fp32, split over the stages.
    total = sum(e["memory"]["parameters"] for e in report["stages"])
    assert total >= 4 * (50257 * 256 + 4 * 12 * 256 * 256)


def test_plot_and_trace_files(planned: dict[str, Any]) -> None:
    assert planned["plan.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads(planned["sim.json"].read_text())
    names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    backward = {"I0", "W0"} if trace["otherData"]["schedule"] == "zero_bubble" else {"B0"}
    assert {"F0"} | backward <= names
    pids = {e["pid"] for e in trace["traceEvents"]}
    assert pids == set(range(WORLD))  # one trace process per rank
    assert trace["otherData"]["step_time_s"] > 0


def test_show_prints_the_same_table(planned: dict[str, Any]) -> None:
    assert planned["shown"] == 0
    assert planned["show"].strip() and planned["show"] in planned["out"]


def test_too_little_memory_names_the_minimum() -> None:
    with pytest.raises(PlanError, match=r"minimum memory: .*at least ([\d.]+) GiB") as info:
        plan_offline(factory, world_size=4, device_memory_bytes=2**20, global_batch=8, device="a100-40gb")
    message = str(info.value)
    needed = float(re.search(r"at least ([\d.]+) GiB", message).group(1))  # type: ignore[union-attr]
    assert 0 < needed < 4
    # one figure, in the words of rannc plan (not RaNNCModule's config items)
    assert message.count("at least") == 1 and "--device-memory" in message and "mem_limit_gb" not in message
    result = plan_offline(
        factory, world_size=4, device_memory_bytes=needed * GIB, global_batch=8, device="a100-40gb"
    )
    assert max(s.memory_bytes for s in result.deployment.plan.stages) <= needed * GIB * 0.9


def test_one_chunk_leaves_interleaving_out() -> None:
    """`--chunks 1` (one chunk per position) leaves interleaved 1F1B out of the schedules, as the config item
    chunks = 1 does for "auto": no interleaved search, no finer pass; asking for interleaving alone with it is
    refused with the fix."""
    result = plan_offline(
        factory, world_size=4, device_memory_bytes=None, global_batch=16, device="a100-40gb", chunks=1
    )
    assert result.deployment.plan.chunks == 1 and result.problem.chunks is None
    assert Schedule.INTERLEAVED_1F1B not in result.problem.schedules
    assert "interleaved 1F1B on finer blocks" not in result.timings
    with pytest.raises(ConfigError, match="1 chunk per position is plain 1F1B: name 1f1b"):
        plan_offline(
            factory,
            world_size=4,
            device_memory_bytes=None,
            global_batch=16,
            device="a100-40gb",
            schedules=("interleaved_1f1b",),
            chunks=1,
        )


def test_plan_prices_the_optimizer_named(tmp_path: Path) -> None:
    """`--optimizer sgd-momentum`: one buffer per parameter (Adam, the default, keeps two), in the report and in
    every stage's memory split; an unknown name is refused by the parser."""
    command = ["plan", "test_offline_plan:factory", "--world-size", "4", "--batch-size", "16"]
    command += ["--device", "a100-40gb", "--optimizer", "sgd-momentum", "--out", str(tmp_path / "plan.json")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(command) == 0
    report = json.loads((tmp_path / "plan.json").read_text())["report"]
    assert report["opt_param_factor"] == 1.0
    for entry in report["stages"]:
        parts = entry["memory"]
        assert parts["optimizer"] == pytest.approx(parts["parameters"])
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main([*command[:-4], "--optimizer", "lion"])


def test_plan_zero_bubble_prices_i_and_w(capsys: pytest.CaptureFixture[str]) -> None:
    """`rannc plan --schedules zero_bubble`: the estimated blocks carry their W share, the plan splits its
    backwards, and its table shows the I and W passes."""
    command = ["plan", "test_offline_plan:factory", "--world-size", "4", "--batch-size", "16"]
    command += ["--device", "a100-40gb", "--schedules", "zero_bubble", "--max-microbatches", "8"]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "schedule zero_bubble" in out and "I ms" in out and "W ms" in out
    result = plan_offline(
        factory,
        world_size=4,
        global_batch=16,
        device="a100-40gb",
        device_memory_bytes=None,
        max_microbatches=8,
    )
    problem = result.problem
    with_params = [k for k in range(1, len(problem.blocks)) if problem.range_param_bytes[k][k] > 0]
    assert with_params
    for k, block in enumerate(problem.blocks):
        weight, whole = block.bwd_weight_at(1), block.at(block.bwd_time, 1)
        if k in with_params:  # (block 0: the embeddings, whose inputs are token ids: W is the whole backward)
            assert 0 < weight < whole and block.deferred_grad_bytes_at(1) > 0, k
        elif problem.range_param_bytes[k][k] == 0:  # no parameters: nothing for W
            assert weight == 0 and block.deferred_grad_bytes_at(1) == 0, k


@pytest.mark.slow
def test_finer_blocks_are_estimated_at_the_interleaved_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interleaved 1F1B searched again on twice the blocks: those blocks are estimated only at the microbatch sizes
    its slices use, and the plan is the one estimating every size of the search space gives."""
    import rannc.offline as offline
    from rannc.plan.interleave import interleaved_replica_sizes

    settings = dict(world_size=WORLD, device_memory_bytes=8 * GIB, global_batch=BATCH, device="a100-40gb")
    settings.update(schedules=("1f1b", "interleaved_1f1b"))
    result = plan_offline(big_factory, **settings)
    plan, report = result.deployment.plan, result.report
    assert plan.schedule == Schedule.INTERLEAVED_1F1B and report["num_blocks"] == 64  # the coarse search: 32
    sizes = report["profiled_microbatch_sizes"]
    assert sizes == interleaved_replica_sizes(result.problem, 64) and len(sizes) < 7  # of 1, 2, 4, ..., 64
    assert set(result.problem.blocks[0].fwd_time) == set(sizes)
    stage_sizes = {s.microbatch_size for s in plan.stages}
    assert stage_sizes <= set(sizes)

    every_size = [1, 2, 4, 8, 16, 32, 64]  # the search space's profile_sizes for a global batch of 64
    monkeypatch.setattr(offline, "interleaved_replica_sizes", lambda problem, num_blocks: every_size)
    everywhere = plan_offline(big_factory, **settings)
    assert everywhere.report["profiled_microbatch_sizes"] == every_size
    assert everywhere.deployment.plan.stages == plan.stages
    assert everywhere.timeline.step_time == pytest.approx(result.timeline.step_time, rel=1e-12)


def test_plan_refuses_unknown_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "plan",
        "no_such_module:factory",
        "--device",
        "a100-40gb",
        "--world-size",
        "4",
        "--batch-size",
        "8",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--schedules", "1f1b,gpipe"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "argument --schedules" in err
        and "1f1b, zero_bubble, fill_drain" in err
        and "no_such_module" not in err
    )


def test_helpers() -> None:
    assert parse_memory("80GiB") == 80 * GIB and parse_memory("40GB") == 40e9
    assert parse_memory("1.5TiB") == 1.5 * 2**40 and parse_memory("512 MiB") == 512 * 2**20
    with pytest.raises(ConfigError, match="80GiB"):
        parse_memory("80 parsecs")
    assert normalise_dtype("bf16") == "bfloat16" and normalise_dtype(torch.float16) == "float16"
    assert normalise_dtype(None) is None
    # per-replica microbatch sizes 24, 12, 8, 6, 5, 4, 3: both ends and the powers of two between
    space = SearchSpace(1, 24, None, (Schedule.ONE_F_ONE_B,), max_microbatches=8)
    assert space.profile_sizes() == [3, 4, 8, 16, 24]
    assert default_replica_choices(96, 8) == (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96)


def test_calibrate_writes_a_profile(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["calibrate", "--quick", "--out", str(path)]) == 0
    profile = load_profile(path)
    assert profile.name.startswith("calibrated-") and profile.peak("float32") > 0


@pytest.mark.slow
def test_calibrate_with_local_ranks_measures_them_together(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["calibrate", "--quick", "--ranks", "2", "--out", str(path)]) == 0
    profile = load_profile(path)
    assert "per rank with 2 ranks measuring at once" in profile.sources["peak_flops"]
    assert "gloo, 2 ranks" in profile.sources["intra_node"] and profile.gpus_per_node == 2
    assert profile.kind == "cpu" and profile.intra_node_latency > 0
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--quick", "--ranks", "0"])
    assert exit_info.value.code == 2 and "argument --ranks: must be at least 1, got 0" in errors.getvalue()


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
def test_meta_model_allocates_no_parameter_memory() -> None:
    try:  # reset the peak RSS (VmHWM) to the current RSS so that this test's peak is measured
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS on this system")
    before = _vm_kib("VmRSS")
    result = plan_offline(
        big_factory, world_size=8, device_memory_bytes=80 * GIB, global_batch=16, device="h100-80gb"
    )
    growth = (_vm_kib("VmHWM") - before) * 1024
    params = sum(e["memory"]["parameters"] for e in result.report["stages"]) / len(result.report["stages"])
    real = 4 * (50257 * 2560 + 5 * 12 * 2560 * 2560)
    assert real > 2e9 and sum(s.param_bytes for s in result.deployment.plan.stages) >= real * 0.99
    assert params > 0
    assert growth < 0.25 * real, f"peak RSS grew by {growth / GIB:.2f} GiB while planning a meta model"


# ----------------------------------------------------------------------------------------------------------------
# An offline plan deployed on a real job
# ----------------------------------------------------------------------------------------------------------------

STEPS, GLOBAL, LR = 3, 8, 0.05


def offline_deployment(factory_name: str, path: Path) -> str:
    """Plan `factory_name` offline for 2 CPU ranks in 2 stages, save it to `path`; return the graph hash."""
    result = plan_offline(
        f"test_offline_plan:{factory_name}",
        world_size=2,
        device_memory_bytes=None,
        global_batch=GLOBAL,
        device="cpu",
        num_stages=2,
        max_microbatches=4,
    )
    save_deployment(result.deployment, path)
    assert load_deployment(path).report["device_profile"] == "cpu"
    return result.deployment.graph_hash


def train_with_plans(rank: int, world: int, plans: dict[str, str]) -> dict[str, Any]:
    """Worker: each real tests/models.py model under RaNNCModule with its offline plan loaded (made on meta: the
    job's capture must give the same graph on CPU, attention included)."""
    runs = {}
    for name, path in plans.items():
        batches = models.make_batches(name, 0, STEPS, GLOBAL)
        model = models.build(name, 0)
        optimizer = models.make_optimizer("sgd", model.parameters(), LR)
        wrapped = rannc.RaNNCModule(model, optimizer, load_deployment=True, deployment_file=path)
        losses = []
        for step in range(STEPS):
            out = models.call(wrapped, models.local_slice(batches[step], rank, world))
            loss = models.get_loss(name, out)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        stages = [list(stage.ranks) for stage in wrapped.deployment.plan.stages]
        runs[name] = {"losses": losses, "captured_hash": wrapped.captured.graph_hash, "stages": stages}
    return runs


@pytest.mark.slow
def test_offline_plan_loads_and_trains(tmp_path: Path) -> None:
    names = {name: f"{name}_factory" for name in ("skip_tied", "gpt2", "llama", "t5")}
    paths = {name: tmp_path / f"{name}.json" for name in names}
    hashes = {name: offline_deployment(factory_name, paths[name]) for name, factory_name in names.items()}
    runs = run_workers(train_with_plans, 2, {k: str(v) for k, v in paths.items()}, timeout=300)
    for name in names:
        reference = train_reference(name, 0, models.make_batches(name, 0, STEPS, GLOBAL), "sgd", LR, STEPS)
        for rank, by_model in enumerate(runs):
            run = by_model[name]
            assert run["captured_hash"] == hashes[name], f"{name} rank {rank}: meta and real graphs differ"
            assert run["stages"] == [[0], [1]]
            torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-5, atol=1e-5)


def test_meta_and_cpu_capture_of_sdpa_agree() -> None:
    model, args, kwargs = gpt2_factory()
    meta = capture(model, args, kwargs)
    batch = models.make_batches("gpt2", 0, 1, 2)[0]
    real = capture(models.build("gpt2", 0), (), batch["kwargs"])
    with sdpa_kernel(SDPBackend.MATH):
        math = capture(models.build("gpt2", 0), (), batch["kwargs"])
    # Capture traces attention with the math kernel whatever the backend in use: one graph on meta and on CPU.
    assert math.graph_hash == meta.graph_hash
    assert real.graph_hash == meta.graph_hash
