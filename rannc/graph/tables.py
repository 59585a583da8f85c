"""Facts of a graph cut into blocks, per range of blocks: parameter bytes, boundary bytes, the largest parameter.

What the planner's cost table needs from the graph besides the blocks' own costs; plain lists of floats indexed
[first block][last block] (entries below the diagonal unused).
"""

from __future__ import annotations

import dataclasses
import math

from ..capture import CapturedGraph
from .analysis import GraphAnalysis
from .stage import InputKind, StageGraph

__all__ = ["RangeTables", "input_bytes", "parameter_facts", "range_tables"]

Table = list[list[float]]


@dataclasses.dataclass(frozen=True)
class RangeTables:
    """Per range of blocks [i, j]: bytes of its distinct parameters and buffers, and the bytes per sample of the
    boundary values entering it from earlier blocks and leaving it for later ones."""

    param_bytes: Table
    in_bytes_per_sample: Table
    out_bytes_per_sample: Table


def range_tables(
    captured: CapturedGraph, analysis: GraphAnalysis, blocks: list[list[str]], graphs: list[StageGraph]
) -> RangeTables:
    """Per range of blocks [i, j]: distinct parameter bytes, boundary bytes in and out per sample."""
    count = len(blocks)
    placeholders = captured.placeholder_nodes()
    param_sets: list[dict[str, float]] = []
    for graph in graphs:
        owned: dict[str, float] = {}
        for item in graph.inputs:
            if item.kind in (InputKind.PARAM, InputKind.BUFFER):
                val = placeholders[item.name].meta["val"]
                canonical = captured.params.get(item.name) or captured.buffers[item.name]
                owned[canonical] = float(val.numel() * val.element_size())
        param_sets.append(owned)
    param_bytes = [[0.0] * count for _ in range(count)]
    for i in range(count):
        union: dict[str, float] = {}
        for j in range(i, count):
            union.update(param_sets[j])
            param_bytes[i][j] = sum(union.values())

    block_of = {name: b for b, nodes in enumerate(blocks) for name in nodes}
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    inbound = [[0.0] * (count + 1) for _ in range(count)]  # difference rows over j
    outbound = [[0.0] * (count + 1) for _ in range(count)]
    for name in analysis.order:
        info = analysis.values[name]
        if info.bytes_per_sample == 0:
            continue
        producer = block_of[name]
        consumers = sorted({block_of[u.name] for u in nodes[name].users if u.name in block_of} - {producer})
        if not consumers:
            continue
        for i in range(producer + 1, count):
            first = next((c for c in consumers if c >= i), None)
            if first is None:
                break
            inbound[i][first] += info.bytes_per_sample
        last = consumers[-1]
        for i in range(0, producer + 1):
            outbound[i][producer] += info.bytes_per_sample
            outbound[i][last] -= info.bytes_per_sample
    in_table = [[0.0] * count for _ in range(count)]
    out_table = [[0.0] * count for _ in range(count)]
    for i in range(count):
        running_in = running_out = 0.0
        for j in range(count):
            running_in += inbound[i][j]
            running_out += outbound[i][j]
            if j >= i:
                in_table[i][j] = running_in
                out_table[i][j] = max(running_out, 0.0)
    return RangeTables(param_bytes, in_table, out_table)


def parameter_facts(
    captured: CapturedGraph, graphs: list[StageGraph]
) -> tuple[Table, tuple[tuple[float, tuple[int, ...]], ...]]:
    """Per range of blocks [i, j] the bytes of its largest parameter tensor, and the parameters several blocks
    use (tied weights, or one weight used in two places) as (bytes, blocks)."""
    placeholders = captured.placeholder_nodes()
    users: dict[str, list[int]] = {}
    sizes: dict[str, float] = {}
    largest_of_block = []
    for b, graph in enumerate(graphs):
        largest = 0.0
        for item in graph.inputs:
            if item.kind == InputKind.PARAM:
                val = placeholders[item.name].meta["val"]
                canonical = captured.params[item.name]
                sizes[canonical] = nbytes = float(val.numel() * val.element_size())
                users.setdefault(canonical, []).append(b)
                largest = max(largest, nbytes)
        largest_of_block.append(largest)
    count = len(graphs)
    table = [[0.0] * count for _ in range(count)]
    for i in range(count):
        running = 0.0
        for j in range(i, count):
            running = max(running, largest_of_block[j])
            table[i][j] = running
    shared = tuple(
        (sizes[name], tuple(sorted(set(blocks)))) for name, blocks in users.items() if len(set(blocks)) > 1
    )
    return table, shared


def input_bytes(captured: CapturedGraph, global_batch: int, world_size: int) -> float:
    """Bytes of user inputs on every rank during a step: the gathered global batch and the rank's own rows."""
    per_sample = sum(
        math.prod(shape) * dtype.itemsize
        for shape, dtype in (s for s in captured.input_shapes if s is not None)
    )
    return float(per_sample * (global_batch + -(-global_batch // world_size)))
