"""Render a deployment as a table of stages and a one-line summary."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..plan.types import ShardLevel
from .deployment import Deployment, format_bytes, load_deployment


def format_ranks(ranks: list[int]) -> str:
    """'0-3', '0,2', '4-5,7': consecutive runs collapsed."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _modules(deployment: Deployment, index: int) -> str:
    """'first .. last' user module of a stage, from its module range or else from its blocks' names."""
    first = last = ""
    if deployment.stage_module_ranges:
        first, last = deployment.stage_module_ranges[index]
        if not first and not last:
            # ops of the wrapped model's own forward, outside every submodule (T5's decoder-input shift)
            return "(top-level code)"
    elif deployment.block_names:
        stage = deployment.plan.stages[index]
        first, last = deployment.block_names[stage.first_block], deployment.block_names[stage.last_block]
    if not first and not last:
        return "-"
    return first if first == last else f"{first or '?'} .. {last or '?'}"


_PART_COLUMNS = (
    ("parameters", "Params"),
    ("gradients", "Grads"),
    ("optimizer", "Optimizer"),
    ("activations", "Activations"),
    ("buffers", "I/O buffers"),  # boundary send/receive buffers and the step's user inputs
)


def _report_stages(deployment: Deployment) -> list[dict[str, Any]] | None:
    """The report's per-stage entries when it has a memory split for every stage."""
    stages = deployment.report.get("stages") if isinstance(deployment.report, dict) else None
    if not isinstance(stages, list) or len(stages) != len(deployment.plan.stages):
        return None
    if not all(isinstance(s, dict) and isinstance(s.get("memory"), dict) for s in stages):
        return None
    return stages


def _seconds(value: Any) -> str:
    return f"{float(value):.2f} s" if isinstance(value, int | float) else "?"


def _report_lines(deployment: Deployment) -> list[str]:
    """Simulated step, bubble, device and planning time from an offline plan's report."""
    report = deployment.report
    lines: list[str] = []
    if "simulated_step_time_s" in report:
        lines.append(
            f"simulated step time {float(report['simulated_step_time_s']) * 1e3:.2f} ms, "
            f"{float(report.get('samples_per_s', 0.0)):.1f} samples/s, "
            f"bubble fraction {float(report.get('bubble_fraction', 0.0)):.1%}"
        )
    if "device_profile" in report:
        memory = report.get("device_memory_bytes")
        text = f"device profile {report['device_profile']}, dtype {report.get('dtype', 'model')}"
        if isinstance(memory, int | float):
            text += f", {format_bytes(memory)} per device (mem_margin {report.get('mem_margin', 0)})"
        if report.get("gpus_per_node"):
            text += f", {report['gpus_per_node']} GPUs per node"
        lines.append(text)
    timings = report.get("planning_time_s")
    if isinstance(timings, dict) and "total" in timings:
        parts = ", ".join(
            f"{name} {_seconds(timings[key])}"
            for name, key in (
                ("capture", "capture"),
                ("profiling", "profile"),
                ("search", "search"),
                ("interleaved 1F1B on finer blocks", "interleaved on finer blocks"),
            )
            if key in timings
        )
        lines.append(f"planning time {_seconds(timings['total'])} ({parts})")
    lines.extend(f"warning: {text}" for text in report.get("warnings") or [] if isinstance(text, str))
    return lines


def _fit_figures(table: Table) -> None:
    """Give every no-wrap column the width of its widest header or cell, so that it cannot be cut."""
    for column in table.columns:
        if column.no_wrap:
            cells = [
                str(column.header),
                *(cell.plain if isinstance(cell, Text) else str(cell) for cell in column.cells),
            ]
            column.min_width = max(len(line) for cell in cells for line in cell.splitlines() or [""])


def _render_width(console: Console, table: Table) -> int:
    """Output width: a terminal's own width, widened when even the folded table needs more (figures are never
    cut); a file or pipe gets the table at its natural width, one line per row."""
    measured = console.measure(table, options=console.options.update(width=10_000))
    if console.is_terminal:
        return max(console.width, measured.minimum)
    return max(console.width, measured.maximum)


def _table_and_summary(deployment: Deployment) -> tuple[Table, Text]:
    plan = deployment.plan
    limit = deployment.device_memory_bytes
    split = _report_stages(deployment)
    chunked = plan.chunks > 1
    what = (
        f"{plan.positions} position(s) x {plan.chunks} chunks = {len(plan.stages)} virtual stages"
        if chunked
        else f"{len(plan.stages)} stage(s)"
    )
    table = Table(
        title=f"rannc deployment: {what} on {deployment.world_size} rank(s), graph {deployment.graph_hash[:12]}",
        title_justify="left",
    )
    # Figures never wrap or shrink to an ellipsis; only module names and rank lists fold when space is short.
    table.add_column("Stage", justify="right", no_wrap=True)
    if chunked:
        table.add_column("Position.chunk", justify="right", no_wrap=True)
    table.add_column("Blocks", no_wrap=True)
    table.add_column("Modules", overflow="fold", min_width=12)
    table.add_column("Replicas", justify="right", no_wrap=True)
    sharded = any(stage.shard != ShardLevel.NONE for stage in plan.stages)
    if sharded:
        table.add_column("Shard", no_wrap=True)
    table.add_column("Ranks", overflow="fold", min_width=7)
    table.add_column("Fwd ms", justify="right", no_wrap=True)
    split_backward = plan.schedule.splits_backward
    if split_backward:  # zero bubble: the backward's I and W passes apart
        table.add_column("I ms", justify="right", no_wrap=True)
        table.add_column("W ms", justify="right", no_wrap=True)
    else:
        table.add_column("Bwd ms", justify="right", no_wrap=True)
    if split is not None:
        for _, title in _PART_COLUMNS:
            table.add_column(title, justify="right", no_wrap=True)
    table.add_column("Memory / rank (limit)", justify="right", no_wrap=True)
    # A chunked plan's rows go by position, its chunks in order; a position's memory shows on its first chunk.
    order = sorted(range(len(plan.stages)), key=lambda k: (k % plan.positions, k // plan.positions))
    for index in order:
        stage = plan.stages[index]
        first_chunk = index < plan.positions
        memory = Text(format_bytes(stage.memory_bytes))
        if limit is not None and stage.memory_bytes > limit:
            memory.stylize("bold red")
        memory.append(f" / {format_bytes(limit) if limit is not None else 'unlimited'}")
        if not first_chunk:
            memory = Text(f"(position {index % plan.positions})")
        recompute = bool(getattr(stage, "recompute", False))
        parts = (
            [
                format_bytes(float(split[index]["memory"].get(key, 0.0))) if first_chunk else ""
                for key, _ in _PART_COLUMNS
            ]
            if split is not None
            else []
        )
        table.add_row(
            f"{index}*" if recompute else str(index),
            *([f"{index % plan.positions}.{index // plan.positions}"] if chunked else []),
            str(stage.first_block)
            if stage.first_block == stage.last_block
            else f"{stage.first_block}-{stage.last_block}",
            _modules(deployment, index),
            str(stage.replicas),
            *([str(stage.shard)] if sharded else []),
            format_ranks(stage.ranks),
            f"{stage.fwd_time * 1e3:.2f}",
            *(
                [
                    f"{(stage.bwd_time - stage.bwd_weight_time) * 1e3:.2f}",
                    f"{stage.bwd_weight_time * 1e3:.2f}",
                ]
                if split_backward
                else [f"{stage.bwd_time * 1e3:.2f}"]
            ),
            *parts,
            memory,
        )
    _fit_figures(table)
    step = plan.predicted_step_time
    rate = f"{plan.global_batch / step:.1f} samples/s" if step > 0 else "n/a samples/s"
    schedule = f"{plan.schedule} ({plan.chunks} chunks per position)" if chunked else str(plan.schedule)
    lines = [
        f"microbatches {plan.microbatches}, schedule {schedule}, global batch {plan.global_batch}, "
        f"predicted step time {step * 1e3:.2f} ms, {rate}"
        + (
            f" (simulated; the cost model's sum formula gives {plan.analytic_step_time * 1e3:.2f} ms)"
            if plan.analytic_step_time is not None
            else ""
        )
    ]
    if split_backward:
        lines.append(
            "zero bubble: each backward is an I pass (input gradients, sent on at once) and a later W pass "
            "(parameter gradients) that fills the pipeline's bubbles"
        )
    if chunked:
        lines.append(
            f"virtual stage k runs on position k % {plan.positions}; rows by position, then chunk "
            "(Position.chunk); a position's memory is on its first chunk's row"
        )
    if any(getattr(stage, "recompute", False) for stage in plan.stages):
        column = "I ms" if split_backward else "Bwd ms"
        lines.append(f"* activations recomputed in backward ({column} includes the extra forward)")
    if sharded:
        lines.append(
            "Shard: how a stage's replicas divide its parameter state (zero-1 optimizer state, zero-2 and "
            "gradients, zero-3 and parameters, gathered per block)"
        )
    lines.extend(_report_lines(deployment))
    return table, Text("\n".join(lines))


def show_deployment(
    path_or_deployment: str | Path | Deployment, batch_size: int | None = None, console: Console | None = None
) -> str:
    """Print the stage table and summary of a deployment (or deployment file); return the text printed.

    `batch_size` (pyrannc's second argument): a global batch to show the microbatch size for, when it is not the
    one the plan was made for (the same stages and microbatch count run any global batch)."""
    deployment = (
        path_or_deployment
        if isinstance(path_or_deployment, Deployment)
        else load_deployment(path_or_deployment)
    )
    console = console if console is not None else Console()
    table, summary = _table_and_summary(deployment)
    plan = deployment.plan
    if batch_size is not None and batch_size != plan.global_batch:
        summary.append(
            f"\nwith a global batch of {batch_size}: {plan.microbatches} microbatches of up to "
            f"{-(-batch_size // plan.microbatches)} samples (planned for {plan.global_batch})"
        )
    renderable = Group(table, summary)
    width = _render_width(console, table)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(renderable)
    # Console.print caps its width at the console's, so widen the console itself for this table.
    previous = console.width
    console.width = width
    try:
        console.print(renderable)
    finally:
        console.width = previous
    return buffer.getvalue()
