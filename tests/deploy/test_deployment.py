"""Tests of the deployment file: round trip, every load error, atomic saving and the stage table."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from rannc.deploy import Deployment, load_deployment, save_deployment, show_deployment
from rannc.deploy.deployment import deployment_from_json, format_bytes
from rannc.deploy.show import format_ranks
from rannc.errors import DeploymentError
from rannc.plan.types import Plan, StagePlan

MiB = 2**20


def make_stage(first: int, last: int, ranks: list[int], memory: float = 300 * MiB) -> StagePlan:
    return StagePlan(
        first_block=first,
        last_block=last,
        replicas=len(ranks),
        ranks=ranks,
        microbatch_size=2,
        fwd_time=0.0125,
        bwd_time=0.025,
        comm_time=0.001,
        allreduce_time=0.002,
        param_bytes=100 * MiB,
        activation_bytes=50 * MiB,
        memory_bytes=memory,
    )


def make_deployment(**changes: Any) -> Deployment:
    plan = Plan(
        stages=[make_stage(0, 1, [0, 1]), make_stage(2, 3, [2, 3], memory=1.5 * 2**30)],
        microbatches=4,
        schedule="1f1b",
        predicted_step_time=0.5,
        global_batch=16,
        world_size=4,
    )
    values: dict[str, Any] = dict(
        plan=plan,
        graph_hash="abc123def4567890",
        world_size=4,
        device_memory_bytes=2.0 * 2**30,
        stage_nodes=[["embedding", "layer_0"], ["layer_1", "lm_head", "loss"]],
        block_names=["transformer.wte", "transformer.h.0", "transformer.h.1", "lm_head"],
        stage_module_ranges=[("transformer.wte", "transformer.h.0"), ("transformer.h.1", "lm_head")],
    )
    values.update(changes)
    return Deployment(**values)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "deployment.json"
    save_deployment(make_deployment(), path)
    return path


def edit(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_round_trip(saved: Path) -> None:
    assert load_deployment(saved) == make_deployment()


def test_round_trip_keeps_the_analytic_step_time_of_a_simulated_choice(tmp_path: Path) -> None:
    original = make_deployment()
    simulated = dataclasses.replace(
        original, plan=dataclasses.replace(original.plan, analytic_step_time=0.45)
    )
    path = tmp_path / "d.json"
    save_deployment(simulated, path)
    assert json.loads(path.read_text())["analytic_step_time_s"] == 0.45
    assert load_deployment(path) == simulated
    edit(path, lambda data: data.pop("analytic_step_time_s"))  # files from before the field
    assert load_deployment(path).plan.analytic_step_time is None


def test_round_trip_without_optional_names_and_unlimited_memory(tmp_path: Path) -> None:
    original = make_deployment(block_names=[], stage_module_ranges=[], device_memory_bytes=None)
    path = tmp_path / "d.json"
    save_deployment(original, path)
    loaded = load_deployment(path, expected_device_memory_bytes=1.5 * 2**30)  # the largest stage fits
    assert loaded == original
    assert loaded.stage_module_ranges == [] and loaded.device_memory_bytes is None


def test_json_layout(saved: Path) -> None:
    data = json.loads(saved.read_text())
    for key in (
        "format",
        "format_version",
        "graph_hash",
        "world_size",
        "device_memory_bytes",
        "microbatches",
        "schedule",
        "predicted_step_time_s",
        "stages",
        "global_batch",
    ):
        assert key in data
    stage = data["stages"][1]
    assert stage["index"] == 1 and stage["ranks"] == [2, 3] and stage["replicas"] == 2
    assert stage["first_block"] == 2 and stage["last_block"] == 3
    assert stage["nodes"] == ["layer_1", "lm_head", "loss"]
    assert stage["fwd_time_s"] == 0.0125 and stage["bwd_time_s"] == 0.025
    assert stage["memory_bytes"] == 1.5 * 2**30


def test_expected_values_that_match_are_accepted(saved: Path) -> None:
    loaded = load_deployment(
        saved,
        expected_graph_hash="abc123def4567890",
        expected_world_size=4,
        expected_device_memory_bytes=2.0 * 2**30 * 1.005,  # within 1%
    )
    assert loaded.world_size == 4


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="does not exist.*save one first"):
        load_deployment(tmp_path / "nope.json")


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("hello, world")
    with pytest.raises(
        DeploymentError, match="corrupted or truncated.*delete it or re-create it with save_deployment"
    ):
        load_deployment(path)


def test_truncated(saved: Path) -> None:
    text = saved.read_text()
    saved.write_text(text[: len(text) // 2])
    with pytest.raises(
        DeploymentError, match="file is corrupted or truncated: .*re-create it with save_deployment"
    ):
        load_deployment(saved)


def test_wrong_format(saved: Path) -> None:
    edit(saved, lambda d: d.update(format="something-else"))
    with pytest.raises(
        DeploymentError, match="not a rannc deployment file.*written by `rannc plan --out` or save_deployment"
    ):
        load_deployment(saved)


def test_wrong_version(saved: Path) -> None:
    edit(saved, lambda d: d.update(format_version=99))
    with pytest.raises(DeploymentError, match="format_version 99.*re-create it"):
        load_deployment(saved)


def test_missing_key(saved: Path) -> None:
    edit(saved, lambda d: d.pop("microbatches"))
    with pytest.raises(
        DeploymentError, match="missing key 'microbatches'.*re-create it with save_deployment"
    ):
        load_deployment(saved)


def test_missing_stage_key(saved: Path) -> None:
    edit(saved, lambda d: d["stages"][1].pop("memory_bytes"))
    with pytest.raises(DeploymentError, match="missing key 'memory_bytes' in stage 1.*re-create"):
        load_deployment(saved)


def test_wrong_type(saved: Path) -> None:
    edit(saved, lambda d: d.update(world_size="4"))
    with pytest.raises(DeploymentError, match="'world_size' should be int, got str.*re-create"):
        load_deployment(saved)


def test_wrong_type_in_list(saved: Path) -> None:
    edit(saved, lambda d: d["stages"][0].update(ranks=[0, "1"]))
    with pytest.raises(DeploymentError, match="an item of 'ranks' in stage 0 should be int.*re-create"):
        load_deployment(saved)


def test_bool_is_not_a_number(saved: Path) -> None:
    edit(saved, lambda d: d["stages"][0].update(fwd_time_s=True))
    with pytest.raises(DeploymentError, match="'fwd_time_s' in stage 0 should be float"):
        load_deployment(saved)


def test_graph_hash_mismatch(saved: Path) -> None:
    with pytest.raises(
        DeploymentError, match="made for another model or other input shapes.*re-plan"
    ) as raised:
        load_deployment(saved, expected_graph_hash="ffff")
    assert "made by" not in str(raised.value)  # same rannc: nothing about versions


def test_graph_hash_mismatch_names_another_rannc_version(saved: Path) -> None:
    """A file from another rannc version may hold the graph hash of another capture: the error says so."""
    edit(saved, lambda d: d.update(created_by="rannc 0.0.1"))
    with pytest.raises(DeploymentError, match=r"re-plan\. It was made by rannc 0\.0\.1 and this is rannc "):
        load_deployment(saved, expected_graph_hash="ffff")


def test_world_size_mismatch(saved: Path) -> None:
    with pytest.raises(
        DeploymentError, match="made for world size 4, this job has 8; launch with 4 processes or re-plan"
    ):
        load_deployment(saved, expected_world_size=8)


def test_device_memory_mismatch(saved: Path) -> None:
    with pytest.raises(
        DeploymentError, match="2.00 GiB of usable memory.*this job has 1.00 GiB.*mem_limit_gb"
    ):
        load_deployment(saved, expected_device_memory_bytes=1.0 * 2**30)


def test_stage_memory_above_the_job_limit_is_refused(tmp_path: Path) -> None:
    """A file made without a memory limit says nothing about the device: its stages' memory is checked."""
    path = tmp_path / "unlimited.json"
    save_deployment(make_deployment(device_memory_bytes=None), path)
    with pytest.raises(
        DeploymentError,
        match=r"needs more memory per rank than this job has \(1.00 GiB usable; stage 1 1.50 GiB predicted\)"
        r".*mem_limit_gb.*re-plan",
    ):
        load_deployment(path, expected_device_memory_bytes=1.0 * 2**30)


def test_stage_memory_above_the_file_limit_is_refused(saved: Path) -> None:
    """A hand-edited stage that no longer fits the memory the file (and the job) has."""
    edit(saved, lambda d: d["stages"][0].update(memory_bytes=3 * 2**30))
    with pytest.raises(DeploymentError, match=r"stage 0 3.00 GiB predicted"):
        load_deployment(saved, expected_device_memory_bytes=2.0 * 2**30)


def test_device_memory_unknown_on_either_side_is_not_checked(saved: Path) -> None:
    assert load_deployment(saved, expected_device_memory_bytes=None).device_memory_bytes == 2.0 * 2**30


def test_ranks_must_partition_world(saved: Path) -> None:
    edit(saved, lambda d: d["stages"][1].update(ranks=[1, 3]))
    with pytest.raises(DeploymentError, match=r"do not partition range\(4\).*re-create"):
        load_deployment(saved)


def test_rank_missing_from_every_stage(saved: Path) -> None:
    def drop(data: dict[str, Any]) -> None:
        data["stages"][1].update(ranks=[2], replicas=1)

    edit(saved, drop)
    with pytest.raises(DeploymentError, match=r"do not partition range\(4\)"):
        load_deployment(saved)


def test_stages_must_be_contiguous(saved: Path) -> None:
    edit(saved, lambda d: d["stages"][1].update(first_block=3))
    with pytest.raises(DeploymentError, match="expected a range starting at block 2"):
        load_deployment(saved)


def test_stage_index_out_of_order(saved: Path) -> None:
    edit(saved, lambda d: d["stages"].reverse())
    with pytest.raises(DeploymentError, match="pipeline order"):
        load_deployment(saved)


def test_non_object_top_level() -> None:
    with pytest.raises(DeploymentError, match="not an object"):
        deployment_from_json([1, 2, 3])


def test_save_rejects_inconsistent_deployment(tmp_path: Path) -> None:
    bad = make_deployment(stage_nodes=[["a"]])
    with pytest.raises(DeploymentError, match="2 stages but 1 stage node lists"):
        save_deployment(bad, tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_save_does_not_clobber_other_files(tmp_path: Path) -> None:
    path = tmp_path / "precious.json"
    path.write_text('{"my": "data"}')
    with pytest.raises(
        DeploymentError, match="refusing to overwrite .*precious.json.*not a rannc deployment"
    ):
        save_deployment(make_deployment(), path)
    assert path.read_text() == '{"my": "data"}'
    assert sorted(os.listdir(tmp_path)) == ["precious.json"]  # no temporary file left behind


def test_save_replaces_an_existing_deployment(saved: Path) -> None:
    changed = make_deployment(graph_hash="0000")
    save_deployment(changed, saved)
    assert load_deployment(saved) == changed
    assert sorted(os.listdir(saved.parent)) == ["deployment.json"]


def test_save_replaces_a_truncated_deployment(saved: Path) -> None:
    saved.write_text(saved.read_text()[:100])
    save_deployment(make_deployment(), saved)
    assert load_deployment(saved) == make_deployment()


def test_save_is_atomic(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = saved.read_text()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        save_deployment(make_deployment(graph_hash="0000"), saved)
    assert saved.read_text() == before
    assert sorted(os.listdir(saved.parent)) == ["deployment.json"]


def test_save_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "d.json"
    save_deployment(make_deployment(), path)
    assert load_deployment(path) == make_deployment()


def test_show_deployment_table(saved: Path) -> None:
    buffer = io.StringIO()
    text = show_deployment(saved, console=Console(file=buffer, width=200, color_system=None))
    assert buffer.getvalue() == text
    lines = text.splitlines()
    row0 = next(line for line in lines if "transformer.wte .. transformer.h.0" in line)
    assert "0-1" in row0 and "12.50" in row0 and "25.00" in row0 and "300.0 MiB / 2.00 GiB" in row0
    row1 = next(line for line in lines if "transformer.h.1 .. lm_head" in line)
    assert "2-3" in row1 and "1.50 GiB / 2.00 GiB" in row1
    assert "microbatches 4, schedule 1f1b, global batch 16" in text
    assert "predicted step time 500.00 ms, 32.0 samples/s" in text


def test_show_deployment_accepts_a_deployment_without_names() -> None:
    deployment = make_deployment(block_names=[], stage_module_ranges=[], device_memory_bytes=None)
    text = show_deployment(deployment, console=Console(file=io.StringIO(), width=200))
    assert "unlimited" in text and "300.0 MiB" in text


def test_deployment_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_deployment().world_size = 2  # type: ignore[misc]


def test_helpers() -> None:
    assert format_ranks([3, 0, 1, 2]) == "0-3"
    assert format_ranks([0, 2, 4, 5, 7]) == "0,2,4-5,7"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**10) == "3.0 KiB"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"


def test_show_deployment_falls_back_to_block_names() -> None:
    deployment = make_deployment(stage_module_ranges=[])
    text = show_deployment(deployment, console=Console(file=io.StringIO(), width=200))
    assert "transformer.wte .. transformer.h.0" in text and "transformer.h.1 .. lm_head" in text


def _with_memory_split() -> Deployment:
    """A deployment whose report splits each stage's memory (the 13-column table of `rannc plan`)."""
    split = {"parameters": 100 * MiB, "gradients": 100 * MiB, "optimizer": 200 * MiB}
    split |= {"activations": 75.25 * MiB, "buffers": 12 * 2**10}
    return make_deployment(report={"stages": [{"memory": split}, {"memory": split}]})


@pytest.mark.parametrize("terminal", [False, True])
def test_show_deployment_never_cuts_a_figure(terminal: bool) -> None:
    """Piped to a file at 80 columns, or on a 60-column terminal, every figure is printed whole; a file gets
    one line per stage, and the caller's console keeps its width."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=60 if terminal else 80, color_system=None, force_terminal=terminal)
    text = show_deployment(_with_memory_split(), console=console)
    assert console.width == (60 if terminal else 80)
    assert "…" not in text
    for figure in ("12.50", "25.00", "100.0 MiB", "200.0 MiB", "75.2 MiB", "12.0 KiB", "1.50 GiB / 2.00 GiB"):
        assert figure in text, figure
    if not terminal:
        row0 = next(line for line in text.splitlines() if "transformer.wte .. transformer.h.0" in line)
        assert "300.0 MiB / 2.00 GiB" in row0 and "0-1" in row0


def chunked_deployment() -> Deployment:
    """2 positions x 2 chunks: virtual stages 0 and 2 on ranks 0-1, 1 and 3 on ranks 2-3."""
    stages = [
        make_stage(0, 0, [0, 1]),
        make_stage(1, 1, [2, 3]),
        make_stage(2, 2, [0, 1]),
        make_stage(3, 3, [2, 3]),
    ]
    plan = Plan(
        stages=stages,
        microbatches=4,
        schedule="interleaved_1f1b",
        predicted_step_time=0.5,
        global_batch=16,
        world_size=4,
        chunks=2,
    )
    return make_deployment(
        plan=plan,
        stage_nodes=[["embedding"], ["layer_0"], ["layer_1"], ["lm_head", "loss"]],
        stage_module_ranges=[],
    )


def test_chunked_round_trip(tmp_path: Path) -> None:
    original = chunked_deployment()
    assert original.problems() == []
    path = tmp_path / "d.json"
    save_deployment(original, path)
    assert json.loads(path.read_text())["chunks"] == 2
    loaded = load_deployment(path)
    assert loaded == original
    assert loaded.plan.positions == 2 and loaded.plan.stages_of_rank(2) == [1, 3]
    edit(path, lambda data: data.pop("chunks"))  # without the key: one chunk per stage, so ranks repeat
    with pytest.raises(DeploymentError, match="do not partition"):
        load_deployment(path)


def test_chunked_stage_on_other_ranks_is_refused() -> None:
    deployment = chunked_deployment()
    stages = list(deployment.plan.stages)
    stages[3] = make_stage(3, 3, [0, 1])
    bad = dataclasses.replace(deployment, plan=dataclasses.replace(deployment.plan, stages=stages))
    assert any("virtual stage 3 has ranks [0, 1], but it runs on position 1" in p for p in bad.problems())
    odd = dataclasses.replace(deployment, plan=dataclasses.replace(deployment.plan, chunks=3))
    assert odd.problems() == ["4 stages do not make 3 chunks per position"]


def test_show_lists_positions_and_chunks() -> None:
    console = Console(file=io.StringIO(), width=200)
    text = show_deployment(chunked_deployment(), console=console)
    assert "2 position(s) x 2 chunks = 4 virtual stages on 4 rank(s)" in text
    assert "Position.chunk" in text and "interleaved_1f1b (2 chunks per position)" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    # by position, then chunk: virtual stages 0, 2 (position 0) and 1, 3 (position 1)
    assert [row.split("│")[1].strip() for row in rows] == ["0", "2", "1", "3"]
    assert "(position 0)" in rows[1] and "(position 1)" in rows[3]
