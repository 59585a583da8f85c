"""The deployment file: a Plan plus what it was made for, stored as strictly validated JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import DeploymentError
from ..plan.types import Plan, ShardLevel, StagePlan

FORMAT = "rannc-deployment"
FORMAT_VERSION = 1

# StagePlan / Plan fields stored under a name that carries their unit.
_STAGE_RENAMES = {
    "fwd_time": "fwd_time_s",
    "bwd_time": "bwd_time_s",
    "comm_time": "comm_time_s",
    "allreduce_time": "allreduce_time_s",
    "bwd_weight_time": "bwd_weight_time_s",
}
_FORMAT_HEAD = re.compile(r'^\s*\{\s*"format"\s*:\s*"' + re.escape(FORMAT) + '"')


def rannc_version() -> str:
    """The installed rannc version, else the one in the source tree's pyproject.toml, else 'unknown'."""
    try:
        return metadata.version("rannc")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def _default_created_by() -> str:
    return f"rannc {rannc_version()}"


@dataclasses.dataclass(frozen=True)
class Deployment:
    """A plan and everything needed to check that it fits the job that loads it."""

    plan: Plan
    graph_hash: str  # hash of the captured graph (identifies the model + input shapes)
    world_size: int
    device_memory_bytes: float | None  # usable memory per device the plan was made for (None = unlimited)
    stage_nodes: list[list[str]]  # per stage, the names of the graph nodes it runs (pipeline order)
    block_names: list[str] = dataclasses.field(default_factory=list)  # per block, may be empty
    stage_module_ranges: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # per stage or empty
    format_version: int = FORMAT_VERSION
    created_by: str = dataclasses.field(default_factory=_default_created_by)
    # Optional extras for people (e.g. `rannc plan`'s memory split, simulated bubble, planning time); never read
    # when the plan is deployed. Files without it load with {}.
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.plan.stages[-1].last_block + 1 if self.plan.stages else 0

    def problems(self) -> list[str]:
        """Inconsistencies inside this deployment (empty when it is well formed)."""
        plan = self.plan
        found: list[str] = []
        if not plan.stages:
            return ["the plan has no stages"]
        if plan.world_size != self.world_size:
            found.append(f"the plan is for world size {plan.world_size} but the file says {self.world_size}")
        if len(self.stage_nodes) != len(plan.stages):
            found.append(f"{len(plan.stages)} stages but {len(self.stage_nodes)} stage node lists")
        if self.stage_module_ranges and len(self.stage_module_ranges) != len(plan.stages):
            found.append(f"{len(plan.stages)} stages but {len(self.stage_module_ranges)} module ranges")
        expected_first = 0
        for index, stage in enumerate(plan.stages):
            if stage.first_block != expected_first or stage.last_block < stage.first_block:
                found.append(
                    f"stage {index} covers blocks {stage.first_block}..{stage.last_block}, "
                    f"expected a range starting at block {expected_first}"
                )
            expected_first = stage.last_block + 1
            if stage.replicas != len(stage.ranks) or stage.replicas < 1:
                found.append(f"stage {index} has {stage.replicas} replicas but ranks {stage.ranks}")
        if self.block_names and len(self.block_names) != self.num_blocks:
            found.append(f"{self.num_blocks} blocks but {len(self.block_names)} block names")
        if plan.chunks < 1 or len(plan.stages) % plan.chunks:
            found.append(f"{len(plan.stages)} stages do not make {plan.chunks} chunks per position")
            return found
        positions = plan.positions
        all_ranks = sorted(rank for stage in plan.stages[:positions] for rank in stage.ranks)
        if all_ranks != list(range(self.world_size)):
            found.append(
                f"the {'positions' if plan.chunks > 1 else 'stages'}' ranks "
                f"{[stage.ranks for stage in plan.stages[:positions]]} do not partition range({self.world_size}) "
                f"(every rank must belong to exactly one {'position' if plan.chunks > 1 else 'stage'})"
            )
        for index, stage in enumerate(plan.stages[positions:], start=positions):
            if stage.ranks != plan.stages[index % positions].ranks:
                found.append(
                    f"virtual stage {index} has ranks {stage.ranks}, but it runs on position {index % positions}, "
                    f"whose ranks are {plan.stages[index % positions].ranks}"
                )
        if plan.microbatches < 1 or plan.global_batch < 1:
            found.append(
                f"microbatches ({plan.microbatches}) and global batch ({plan.global_batch}) must be >= 1"
            )
        return found


# ---------------------------------------------------------------------------------------------- encoding


def _stage_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(StagePlan))


def _type_name(annotation: Any) -> str:
    """'int', 'list[int]', 'float | None', ... whether or not annotations are postponed."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def deployment_to_json(deployment: Deployment) -> dict[str, Any]:
    """The JSON document of a deployment (keys in a fixed, readable order)."""
    plan = deployment.plan
    stages = []
    for index, stage in enumerate(plan.stages):
        entry: dict[str, Any] = {"index": index}
        for field in _stage_fields():
            value = getattr(stage, field.name)
            entry[_STAGE_RENAMES.get(field.name, field.name)] = (
                list(value) if field.name == "ranks" else value
            )
        if deployment.stage_module_ranges:
            first, last = deployment.stage_module_ranges[index]
            entry["first_module"], entry["last_module"] = first, last
        entry["nodes"] = list(deployment.stage_nodes[index])
        stages.append(entry)
    document: dict[str, Any] = {
        "format": FORMAT,
        "format_version": deployment.format_version,
        "created_by": deployment.created_by,
        "graph_hash": deployment.graph_hash,
        "world_size": deployment.world_size,
        "device_memory_bytes": deployment.device_memory_bytes,
        "global_batch": plan.global_batch,
        "microbatches": plan.microbatches,
        "schedule": plan.schedule,
        "chunks": plan.chunks,
        "predicted_step_time_s": plan.predicted_step_time,
        "analytic_step_time_s": plan.analytic_step_time,
        "block_names": list(deployment.block_names),
        "stages": stages,
    }
    if deployment.report:
        document["report"] = deployment.report
    return document


def save_deployment(deployment: Deployment, path: str | Path) -> None:
    """Write `deployment` to `path` atomically; refuses to replace a file that is not a rannc deployment."""
    path = Path(path)
    problems = deployment.problems()
    if problems:
        raise DeploymentError(f"refusing to save an inconsistent deployment to {path}: {'; '.join(problems)}")
    try:
        text = json.dumps(deployment_to_json(deployment), indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise DeploymentError(
            f"cannot save deployment to {path}: it holds a non-finite number ({exc}); re-plan"
        ) from exc
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _check_replaceable(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise DeploymentError(f"deployment path {path} is a directory; choose a file path (deployment_file)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise DeploymentError(
            f"cannot read existing file {path} ({exc}); choose another deployment_file"
        ) from exc
    if not head.strip():
        return  # an empty file holds nothing to lose
    if not _FORMAT_HEAD.match(head.decode("utf-8", errors="replace")):
        raise DeploymentError(
            f"refusing to overwrite {path}: it exists and is not a rannc deployment file; "
            "move it away or choose another deployment_file"
        )


# ---------------------------------------------------------------------------------------------- decoding


class _Reader:
    """Typed access to a JSON object that turns every defect into a DeploymentError naming the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, problem: str) -> DeploymentError:
        return DeploymentError(
            f"deployment file {self.path} is invalid: {problem}; "
            "delete it or re-create it with save_deployment (re-plan)"
        )

    def get(self, data: dict[str, Any], key: str, kind: str, where: str = "") -> Any:
        if key not in data:
            raise self.fail(f"missing key {key!r}{where}")
        return self.check(data[key], kind, f"{key!r}{where}")

    def check(self, value: Any, kind: str, what: str) -> Any:
        kind = kind.replace(" ", "")
        optional = kind.endswith("|None") or kind.startswith("None|")
        kind = kind.removesuffix("|None").removeprefix("None|")
        if value is None and optional:
            return None
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise self.fail(f"{what} is not a finite number")
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "ShardLevel" and isinstance(value, str):
            if value not in tuple(ShardLevel):
                raise self.fail(f"{what} is {value!r}, not one of {[level.value for level in ShardLevel]}")
            return ShardLevel(value)
        if kind.startswith("list[") and isinstance(value, list):
            inner = kind[len("list[") : -1]
            return [self.check(item, inner, f"an item of {what}") for item in value]
        if kind in ("Any", "object"):
            return value
        raise self.fail(f"{what} should be {kind.replace('|', ' or ')}, got {type(value).__name__}")


def deployment_from_json(data: Any, path: str = "<memory>") -> Deployment:
    """Rebuild a Deployment from its JSON document, checking every key and type."""
    reader = _Reader(path)
    if not isinstance(data, dict):
        raise reader.fail(f"the top level is a {type(data).__name__}, not an object")
    if data.get("format") != FORMAT:
        raise DeploymentError(
            f"{path} is not a rannc deployment file (format is {data.get('format')!r}, expected {FORMAT!r}); "
            "give a file written by `rannc plan --out` or save_deployment (RaNNCModule: deployment_file)"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise DeploymentError(
            f"deployment file {path} has format_version {version!r}, this rannc reads {FORMAT_VERSION}; "
            "re-create it with this rannc version (save_deployment)"
        )
    world_size = reader.get(data, "world_size", "int")
    stages_json = reader.get(data, "stages", "list[Any]")
    if not stages_json:
        raise reader.fail("'stages' is empty")
    stages: list[StagePlan] = []
    nodes: list[list[str]] = []
    ranges: list[tuple[str, str]] = []
    for index, entry in enumerate(stages_json):
        where = f" in stage {index}"
        if not isinstance(entry, dict):
            raise reader.fail(f"stage {index} is a {type(entry).__name__}, not an object")
        if reader.get(entry, "index", "int", where) != index:
            raise reader.fail(f"stage {index} has index {entry['index']} (stages must be in pipeline order)")
        values = {}
        for field in _stage_fields():
            key = _STAGE_RENAMES.get(field.name, field.name)
            if key not in entry and field.default is not dataclasses.MISSING:
                continue
            values[field.name] = reader.get(entry, key, _type_name(field.type), where)
        stages.append(StagePlan(**values))
        nodes.append(reader.get(entry, "nodes", "list[str]", where))
        has_first, has_last = "first_module" in entry, "last_module" in entry
        if has_first != has_last:
            raise reader.fail(f"stage {index} has only one of 'first_module' and 'last_module'")
        if has_first:
            first = reader.get(entry, "first_module", "str", where)
            ranges.append((first, reader.get(entry, "last_module", "str", where)))
    if ranges and len(ranges) != len(stages):
        raise reader.fail("only some stages have 'first_module'/'last_module'")
    plan = Plan(
        stages=stages,
        microbatches=reader.get(data, "microbatches", "int"),
        schedule=reader.get(data, "schedule", "str"),
        predicted_step_time=reader.get(data, "predicted_step_time_s", "float"),
        global_batch=reader.get(data, "global_batch", "int"),
        world_size=world_size,
        analytic_step_time=(
            reader.get(data, "analytic_step_time_s", "float | None")
            if "analytic_step_time_s" in data
            else None
        ),
        chunks=reader.get(data, "chunks", "int") if "chunks" in data else 1,
    )
    deployment = Deployment(
        plan=plan,
        graph_hash=reader.get(data, "graph_hash", "str"),
        world_size=world_size,
        device_memory_bytes=reader.get(data, "device_memory_bytes", "float | None"),
        stage_nodes=nodes,
        block_names=reader.get(data, "block_names", "list[str]") if "block_names" in data else [],
        stage_module_ranges=ranges,
        format_version=version,
        created_by=reader.get(data, "created_by", "str") if "created_by" in data else "unknown",
        report=_report(reader, data),
    )
    problems = deployment.problems()
    if problems:
        raise reader.fail("; ".join(problems))
    return deployment


def _report(reader: _Reader, data: dict[str, Any]) -> dict[str, Any]:
    if "report" not in data:
        return {}
    report = data["report"]
    if not isinstance(report, dict):
        raise reader.fail(f"'report' should be an object, got {type(report).__name__}")
    return report


def load_deployment(
    path: str | Path,
    *,
    expected_graph_hash: str | None = None,
    expected_world_size: int | None = None,
    expected_device_memory_bytes: float | None = None,
) -> Deployment:
    """Read and validate a deployment file, and check that it was made for this model and job."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeploymentError(
            f"deployment file {path} does not exist; save one first (`rannc plan --out`, save_deployment or "
            "RANNC_SAVE_DEPLOYMENT=1) or turn off load_deployment"
        ) from None
    except IsADirectoryError:
        raise DeploymentError(
            f"deployment file {path} is a directory; point deployment_file at a file"
        ) from None
    except UnicodeDecodeError as exc:
        raise _corrupted(path, exc) from exc
    except OSError as exc:
        raise DeploymentError(f"cannot read deployment file {path} ({exc}); check its permissions") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _corrupted(path, exc) from exc
    deployment = deployment_from_json(data, str(path))
    if expected_graph_hash is not None and deployment.graph_hash != expected_graph_hash:
        ours = _default_created_by()
        other_version = (
            f" It was made by {deployment.created_by} and this is {ours}, whose captured graphs may differ."
            if deployment.created_by != ours
            else ""
        )
        raise DeploymentError(
            f"deployment file {path} was made for another model or other input shapes "
            f"(graph hash {deployment.graph_hash}, this model has {expected_graph_hash}); "
            f"delete it or point deployment_file elsewhere to re-plan.{other_version}"
        )
    if expected_world_size is not None and deployment.world_size != expected_world_size:
        raise DeploymentError(
            f"deployment file {path} was made for world size {deployment.world_size}, this job has "
            f"{expected_world_size}; launch with {deployment.world_size} processes or re-plan "
            "(delete the file or turn off load_deployment)"
        )
    saved, current = deployment.device_memory_bytes, expected_device_memory_bytes
    # Less memory than planned for may not fit; more is fine (e.g. a plan made offline for a smaller device).
    if saved is not None and current is not None and current < saved * 0.99:
        raise DeploymentError(
            f"deployment file {path} was made for {format_bytes(saved)} of usable memory per device, "
            f"this job has {format_bytes(current)}, less than that; set mem_limit_gb / mem_margin to match or "
            "re-plan (delete the file or turn off load_deployment)"
        )
    # The plan's own prediction, checked too: a file made without a limit (or edited) says nothing above.
    over = [
        (index, stage.memory_bytes)
        for index, stage in enumerate(deployment.plan.stages)
        if current is not None and stage.memory_bytes * 0.99 > current
    ]
    if over:
        stages = ", ".join(f"stage {index} {format_bytes(need)}" for index, need in over)
        raise DeploymentError(
            f"deployment file {path} needs more memory per rank than this job has ({format_bytes(current)} usable; "
            f"{stages} predicted); raise mem_limit_gb / lower mem_margin if the device has the memory, or re-plan "
            "for this limit (delete the file or turn off load_deployment)"
        )
    return deployment


def _corrupted(path: Path, exc: Exception) -> DeploymentError:
    return DeploymentError(
        f"deployment file {path}: file is corrupted or truncated: {exc}; "
        "delete it or re-create it with save_deployment"
    )


def format_bytes(value: float) -> str:
    """Human-readable binary size: 512 B, 3.0 KiB, 12.5 MiB, 1.50 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            digits = 2 if unit == "GiB" else 1
            return f"{value / scale:.{digits}f} {unit}"
    return f"{value:.0f} B"
