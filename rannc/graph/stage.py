"""Cut a piece of the captured graph (a block or a stage) out as its own runnable GraphModule."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

import torch
import torch.fx as fx

from ..capture import CapturedGraph
from .analysis import GraphAnalysis, ValueKind


class InputKind(enum.StrEnum):
    """Where a stage's (or block's) input comes from."""

    PARAM = "param"  # a parameter of the model (trained)
    BUFFER = "buffer"  # a buffer of the model
    CONSTANT = "constant"  # a tensor constant the export lifted
    USER = "user"  # an argument of the user's call
    BOUNDARY = "boundary"  # a batch value an earlier stage sends
    SYMINT = "symint"  # a size recomputed locally from the rows the stage runs

    @property
    def is_state(self) -> bool:
        """Held by the stage across microbatches (parameters, buffers, constants), not a per-microbatch value."""
        return self in _STATE


_STATE = frozenset({InputKind.PARAM, InputKind.BUFFER, InputKind.CONSTANT})
# Order of a stage's placeholders: its state, then the user's arguments, then what other stages provide.
_INPUT_ORDER = {
    InputKind.PARAM: 0,
    InputKind.BUFFER: 0,
    InputKind.CONSTANT: 0,
    InputKind.USER: 1,
    InputKind.BOUNDARY: 2,
    InputKind.SYMINT: 2,
}


@dataclasses.dataclass(frozen=True)
class StageInput:
    name: str  # node name in the captured graph
    kind: InputKind


@dataclasses.dataclass
class StageGraph:
    """A runnable piece: `module(*inputs)` returns a tuple with one value per name in `outputs`."""

    module: fx.GraphModule
    inputs: list[StageInput]
    outputs: list[str]
    batch_nodes: list[str]

    def input_names(self, kind: InputKind) -> list[str]:
        return [i.name for i in self.inputs if i.kind == kind]


def _closure(nodes: dict[str, fx.Node], analysis: GraphAnalysis, roots: Iterable[str]) -> set[str]:
    """The roots plus every non-batch op they depend on (replicated here, never communicated)."""
    members: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in members:
            continue
        members.add(name)
        for arg in nodes[name].all_input_nodes:
            if arg.op == "call_function" and not analysis.is_batch[arg.name]:
                stack.append(arg.name)
    return members


def build_stage(
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    batch_nodes: list[str],
    extra_roots: Iterable[str] = (),
    extra_outputs: Iterable[str] = (),
) -> StageGraph:
    """Build the GraphModule running `batch_nodes` (and their non-batch helpers).

    Its outputs are the values that ops outside it, the user or buffer write-back need, plus `extra_outputs`.
    """
    return _build_stage(_GraphIndex.of(captured), captured, analysis, batch_nodes, extra_roots, extra_outputs)


@dataclasses.dataclass(frozen=True)
class _GraphIndex:
    """The captured graph's nodes by name and their positions (made once for many stages)."""

    nodes: dict[str, fx.Node]
    position: dict[str, int]
    output: fx.Node

    @staticmethod
    def of(captured: CapturedGraph) -> _GraphIndex:
        graph = captured.gm.graph
        nodes = {n.name: n for n in graph.nodes}
        position = {name: i for i, name in enumerate(nodes)}
        return _GraphIndex(nodes, position, next(n for n in graph.nodes if n.op == "output"))


def _build_stage(
    index: _GraphIndex,
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    batch_nodes: list[str],
    extra_roots: Iterable[str] = (),
    extra_outputs: Iterable[str] = (),
) -> StageGraph:
    extra_roots = list(extra_roots)
    nodes, position, output_node = index.nodes, index.position, index.output
    batch_set = set(batch_nodes)
    members = _closure(nodes, analysis, list(batch_nodes) + list(extra_roots))
    in_order = [nodes[name] for name in sorted(members, key=position.__getitem__)]

    inputs: list[StageInput] = []
    seen: set[str] = set()
    for node in in_order:
        for arg in node.all_input_nodes:
            if arg.name in members or arg.name in seen:
                continue
            seen.add(arg.name)
            inputs.append(StageInput(arg.name, _input_kind(captured, analysis, arg)))
    inputs.sort(key=lambda i: (_INPUT_ORDER[i.kind], position[i.name]))

    outputs: list[str] = []
    wanted = set(extra_outputs)
    for node in in_order:
        used_outside = any(
            (user is output_node) or (user.name not in members and analysis.is_batch.get(user.name, False))
            for user in node.users
        )
        if node.name in wanted or (used_outside and (node.name in batch_set or node.name in extra_roots)):
            outputs.append(node.name)

    new_graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for item in inputs:
        placeholder = new_graph.placeholder(item.name)
        placeholder.meta = dict(nodes[item.name].meta)
        env[item.name] = placeholder
    for node in in_order:
        env[node.name] = new_graph.node_copy(node, lambda n: env[n.name])
    new_graph.output(tuple(env[name] for name in outputs))
    module = fx.GraphModule(torch.nn.Module(), new_graph)
    ordered_batch = [n for n in analysis.order if n in batch_set]
    return StageGraph(module, inputs, outputs, ordered_batch)


def block_graphs(
    captured: CapturedGraph, analysis: GraphAnalysis, blocks: list[list[str]]
) -> list[StageGraph]:
    """One runnable piece per block (to measure or estimate it alone)."""
    index = _GraphIndex.of(captured)
    return [_build_stage(index, captured, analysis, nodes) for nodes in blocks]


def _input_kind(captured: CapturedGraph, analysis: GraphAnalysis, node: fx.Node) -> InputKind:
    if node.op == "placeholder":
        if node.name in captured.params:
            return InputKind.PARAM
        if node.name in captured.buffers:
            return InputKind.BUFFER
        if node.name in captured.constants:
            return InputKind.CONSTANT
        return InputKind.USER
    info = analysis.values[node.name]
    if info.kind == ValueKind.SYMINT:
        return InputKind.SYMINT
    if not info.communicable:
        raise AssertionError(f"value {node.name} cannot cross a stage boundary; the cut is illegal")
    return InputKind.BOUNDARY
