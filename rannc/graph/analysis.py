"""Which values depend on the batch, where the batch dim is, and where a pipeline may cut the graph."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
import torch.fx as fx

from ..capture import CapturedGraph


class ValueKind(enum.StrEnum):
    """What a graph value is."""

    TENSOR = "tensor"
    SYMINT = "symint"  # a size (symbolic in the batch or a sequence length)
    OTHER = "other"  # anything else (None, tuples, Python numbers)


@dataclasses.dataclass(frozen=True)
class ValueInfo:
    """What the runtime must know about a value to move it between stages."""

    name: str
    kind: ValueKind
    batch_dim: int | None  # dim whose size is the batch symbol (tensors only)
    dtype: torch.dtype | None
    shape: tuple[Any, ...]  # sizes; symbolic where they depend on the batch
    bytes_per_sample: float  # bytes of this value per sample (0 for non-batch values)
    fixed_bytes: float  # bytes of a non-batch tensor
    dim_order: tuple[int, ...] = ()  # dims from outermost to innermost in memory (exported views rely on it)

    @property
    def communicable(self) -> bool:
        """Can cross a stage boundary: a batch tensor split along its batch dim, or a SymInt recomputed locally."""
        return self.kind == ValueKind.SYMINT or (self.kind == ValueKind.TENSOR and self.batch_dim is not None)

    @property
    def carries_grad(self) -> bool:
        return self.kind == ValueKind.TENSOR and self.dtype is not None and self.dtype.is_floating_point


@dataclasses.dataclass(frozen=True)
class GraphAnalysis:
    """Batch-dependent nodes in topological order, plus where cuts between them are legal."""

    order: list[str]  # batch-dependent call_function nodes, topological
    position: dict[str, int]
    is_batch: dict[str, bool]  # every node
    values: dict[str, ValueInfo]  # every node with a value
    legal_cut: list[bool]  # legal_cut[k]: a boundary after order[k] is allowed (last entry is always True)
    cut_bytes_per_sample: list[float]  # bytes per sample crossing the boundary after order[k]


def _value_info(node: fx.Node, symbol: Any, is_batch: bool, sizes: dict[Any, int]) -> ValueInfo:
    """`sizes`: what symbols other than the batch (sequence lengths) are planned at."""
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        return ValueInfo(node.name, ValueKind.SYMINT, None, None, (), 0.0, 0.0)
    if not isinstance(val, torch.Tensor):
        return ValueInfo(node.name, ValueKind.OTHER, None, None, (), 0.0, 0.0)
    shape = tuple(val.shape)
    batch_dim = None
    per_sample = 1
    for dim, size in enumerate(shape):
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            if batch_dim is None and expr == symbol:
                batch_dim = dim
                continue
            fixed = expr.subs({**sizes, symbol: 1})
            if not fixed.is_number:  # a size that depends on the data (e.g. boolean masking): cannot be split
                return ValueInfo(node.name, ValueKind.TENSOR, None, val.dtype, tuple(val.shape), 0.0, 0.0)
            per_sample = per_sample * int(fixed)
        else:
            per_sample *= int(size)
    item = val.element_size()
    order = memory_order(val, symbol, sizes=sizes)
    if batch_dim is not None:
        return ValueInfo(
            node.name, ValueKind.TENSOR, batch_dim, val.dtype, shape, float(per_sample * item), 0.0, order
        )
    fixed = 0.0 if is_batch else float(per_sample * item)
    return ValueInfo(node.name, ValueKind.TENSOR, None, val.dtype, shape, 0.0, fixed, order)


def memory_order(
    val: torch.Tensor, symbol: Any, probe: int = 97, sizes: dict[Any, int] | None = None
) -> tuple[int, ...]:
    """Dims sorted from largest to smallest stride (ties keep dim order), evaluated at a probe batch size."""
    bindings = {**(sizes or {}), symbol: probe}

    def concrete(x: Any) -> int:
        return int(x.node.expr.subs(bindings)) if isinstance(x, torch.SymInt) else int(x)

    try:
        strides = [concrete(st) for st in val.stride()]
    except (RuntimeError, TypeError, ValueError):
        return tuple(range(val.dim()))
    return tuple(sorted(range(val.dim()), key=lambda d: (-strides[d], d)))


def analyse(captured: CapturedGraph) -> GraphAnalysis:
    """Label batch dependence by data flow from the user's tensor inputs and find the legal cut points."""
    graph = captured.gm.graph
    symbol = captured.batch_symbol
    sizes = captured.planning_sizes()
    is_batch: dict[str, bool] = {}
    values: dict[str, ValueInfo] = {}
    order: list[str] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            is_batch[node.name] = (
                node.name in captured.user_inputs and isinstance(val, torch.Tensor) and val.dim() > 0
            )
        elif node.op == "call_function":
            is_batch[node.name] = any(is_batch.get(arg.name, False) for arg in node.all_input_nodes)
            if is_batch[node.name]:
                order.append(node.name)
        else:
            continue
        values[node.name] = _value_info(node, symbol, is_batch[node.name], sizes)

    position = {name: k for k, name in enumerate(order)}
    nodes = {n.name: n for n in graph.nodes}
    n = len(order)
    # Difference arrays over boundaries: boundary k sits after order[k].
    blocked = [0] * (n + 1)
    crossing = [0.0] * (n + 1)
    for name in order:
        start = position[name]
        consumers = [position[u.name] for u in nodes[name].users if u.name in position]
        if not consumers:
            continue
        last = max(consumers)
        if last <= start:
            continue
        info = values[name]
        if not info.communicable:
            blocked[start] += 1
            blocked[last] -= 1
        crossing[start] += info.bytes_per_sample
        crossing[last] -= info.bytes_per_sample
    legal, cut_bytes = [], []
    running_block, running_bytes = 0, 0.0
    for k in range(n):
        running_block += blocked[k]
        running_bytes += crossing[k]
        legal.append(running_block == 0)
        cut_bytes.append(max(running_bytes, 0.0))
    if legal:
        legal[-1] = True
    return GraphAnalysis(order, position, is_batch, values, legal, cut_bytes)


def atomic_units(analysis: GraphAnalysis) -> list[list[str]]:
    """Runs of batch nodes between legal cuts: the smallest pieces a stage can be made of."""
    units: list[list[str]] = []
    current: list[str] = []
    for k, name in enumerate(analysis.order):
        current.append(name)
        if analysis.legal_cut[k]:
            units.append(current)
            current = []
    if current:
        units.append(current)
    return units


def has_single_loss(captured: CapturedGraph, analysis: GraphAnalysis) -> bool:
    """Exactly one scalar, batch-dependent, differentiable output (the loss): what 1F1B needs."""
    losses = [
        n
        for n in captured.user_outputs
        if n is not None
        and analysis.values[n].kind == ValueKind.TENSOR
        and len(analysis.values[n].shape) == 0
        and analysis.is_batch.get(n, False)
        and analysis.values[n].carries_grad
    ]
    return len(losses) == 1


def module_range(nodes: dict[str, fx.Node], names: list[str]) -> tuple[str, str]:
    """The first and last user module (innermost, from export's nn_module_stack) the ops came from."""
    stacks = [(nodes[n].meta.get("nn_module_stack") or {}).values() for n in names]
    paths = [[p for p, _ in stack if p and not p.startswith("_")] for stack in stacks]
    inner = [ps[-1] for ps in paths if ps]
    return (inner[0], inner[-1]) if inner else ("", "")
