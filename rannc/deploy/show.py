"""Render a deployment as a table of stages and a one-line summary."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

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
    elif deployment.block_names:
        stage = deployment.plan.stages[index]
        first, last = deployment.block_names[stage.first_block], deployment.block_names[stage.last_block]
    if not first and not last:
        return "-"
    return first if first == last else f"{first or '?'} .. {last or '?'}"


def _renderable(deployment: Deployment) -> Group:
    plan = deployment.plan
    limit = deployment.device_memory_bytes
    table = Table(
        title=(
            f"rannc deployment: {len(plan.stages)} stage(s) on {deployment.world_size} rank(s), "
            f"graph {deployment.graph_hash[:12]}"
        ),
        title_justify="left",
    )
    table.add_column("Stage", justify="right")
    table.add_column("Blocks")
    table.add_column("Modules", overflow="fold")
    table.add_column("Replicas", justify="right")
    table.add_column("Ranks")
    table.add_column("Fwd ms", justify="right")
    table.add_column("Bwd ms", justify="right")
    table.add_column("Memory / rank (limit)", justify="right")
    for index, stage in enumerate(plan.stages):
        memory = Text(format_bytes(stage.memory_bytes))
        if limit is not None and stage.memory_bytes > limit:
            memory.stylize("bold red")
        memory.append(f" / {format_bytes(limit) if limit is not None else 'unlimited'}")
        table.add_row(
            str(index),
            str(stage.first_block)
            if stage.first_block == stage.last_block
            else f"{stage.first_block}-{stage.last_block}",
            _modules(deployment, index),
            str(stage.replicas),
            format_ranks(stage.ranks),
            f"{stage.fwd_time * 1e3:.2f}",
            f"{stage.bwd_time * 1e3:.2f}",
            memory,
        )
    step = plan.predicted_step_time
    rate = f"{plan.global_batch / step:.1f} samples/s" if step > 0 else "n/a samples/s"
    summary = Text(
        f"microbatches {plan.microbatches}, schedule {plan.schedule}, global batch {plan.global_batch}, "
        f"predicted step time {step * 1e3:.2f} ms, {rate}"
    )
    return Group(table, summary)


def show_deployment(path_or_deployment: str | Path | Deployment, console: Console | None = None) -> str:
    """Print the stage table and summary of a deployment (or deployment file); return the text printed."""
    deployment = (
        path_or_deployment
        if isinstance(path_or_deployment, Deployment)
        else load_deployment(path_or_deployment)
    )
    console = console if console is not None else Console()
    renderable = _renderable(deployment)
    buffer = io.StringIO()
    Console(file=buffer, width=console.width, color_system=None, force_terminal=False).print(renderable)
    console.print(renderable)
    return buffer.getvalue()
