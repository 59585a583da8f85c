"""Brute-force restatements of the graph analysis contract, checked against `analyse` / `atomic_units`."""

from __future__ import annotations

import math

import torch

from rannc.capture import CapturedGraph
from rannc.graph.analysis import GraphAnalysis, atomic_units


def reference_batch_nodes(captured: CapturedGraph) -> set[str]:
    """Nodes reachable by data flow from a user tensor input with a batch dim (the inputs included)."""
    batch: set[str] = set()
    for node in captured.gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if node.name in captured.user_inputs and isinstance(val, torch.Tensor) and val.dim() > 0:
                batch.add(node.name)
        elif node.op == "call_function" and any(arg.name in batch for arg in node.all_input_nodes):
            batch.add(node.name)
    return batch


def live_across(captured: CapturedGraph, analysis: GraphAnalysis, k: int) -> list[str]:
    """Batch values produced at or before order[k] and consumed by a batch op after it."""
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    out = []
    for name in analysis.order[: k + 1]:
        if any(analysis.position.get(user.name, -1) > k for user in nodes[name].users):
            out.append(name)
    return out


def check_analysis_invariants(captured: CapturedGraph, analysis: GraphAnalysis) -> None:
    graph = captured.gm.graph
    symbol = captured.batch_symbol
    batch = reference_batch_nodes(captured)

    # Batch labelling and order.
    for node in graph.nodes:
        if node.op in ("placeholder", "call_function"):
            assert analysis.is_batch[node.name] == (node.name in batch), node.name
    assert analysis.order == [n.name for n in graph.nodes if n.op == "call_function" and n.name in batch]
    assert analysis.position == {name: k for k, name in enumerate(analysis.order)}

    # Value descriptions.
    for node in graph.nodes:
        if node.name not in analysis.values:
            continue
        info = analysis.values[node.name]
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert info.kind == "tensor" and info.dtype == val.dtype
            assert len(info.dim_order) == val.dim() and sorted(info.dim_order) == list(range(val.dim()))
            if info.batch_dim is not None:
                size = val.shape[info.batch_dim]
                assert isinstance(size, torch.SymInt) and size.node.expr == symbol
                others = [s for d, s in enumerate(val.shape) if d != info.batch_dim]
                assert all(isinstance(s, int) for s in others), (
                    node.name,
                    val.shape,
                )  # true of the test models
                assert info.bytes_per_sample == math.prod(others) * val.element_size(), node.name
            else:
                assert info.bytes_per_sample == 0.0
                assert all(not (isinstance(s, torch.SymInt) and s.node.expr == symbol) for s in val.shape), (
                    node.name
                )
        elif isinstance(val, torch.SymInt):
            assert info.kind == "symint" and info.communicable
        else:
            assert info.kind == "other" and not info.communicable

    # Legal cuts and bytes crossing them, by brute force over every boundary.
    n = len(analysis.order)
    assert len(analysis.legal_cut) == len(analysis.cut_bytes_per_sample) == n
    for k in range(n):
        crossing = live_across(captured, analysis, k)
        legal = all(analysis.values[name].communicable for name in crossing)
        assert analysis.legal_cut[k] == (legal or k == n - 1), (k, analysis.order[k], crossing)
        expected = sum(analysis.values[name].bytes_per_sample for name in crossing)
        assert analysis.cut_bytes_per_sample[k] == expected, (k, analysis.order[k], crossing)

    # Units: the order cut exactly at the legal cuts.
    units = atomic_units(analysis)
    assert all(units) and sum(units, []) == analysis.order
    ends = {analysis.position[unit[-1]] for unit in units}
    assert ends == {k for k in range(n) if analysis.legal_cut[k]}

    # A value that cannot cross a boundary shares a unit with every batch op that uses it.
    unit_of = {name: u for u, unit in enumerate(units) for name in unit}
    for node in graph.nodes:
        if node.name in unit_of and not analysis.values[node.name].communicable:
            for user in node.users:
                if user.name in unit_of:
                    assert unit_of[user.name] == unit_of[node.name], (node.name, user.name)
