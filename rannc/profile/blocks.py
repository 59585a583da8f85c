"""The captured graph's blocks, measured: runners that feed each block the example values recorded at capture
(stand-ins for a model built on meta), profiled at the microbatch sizes the planner asks for over all ranks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ..capture import CapturedGraph, tile_rows
from ..capture.inputs import symint_value, with_memory_order
from ..capture.modes import exact_precision
from ..config import Config
from ..graph.analysis import GraphAnalysis
from ..graph.stage import InputKind, StageGraph
from ..plan.types import BlockProfile
from .distributed import profile_blocks
from .measure import BlockRunner

__all__ = ["block_runners", "measured_block_profiles", "stand_in"]


def stand_in(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A real tensor to time and measure a block with: `tensor` itself on `device`, or for a meta tensor one of
    its shape and dtype (small random floats; zeros for integers and booleans, which are always valid indices)."""
    if not tensor.is_meta:
        return tensor.detach().to(device)
    if tensor.is_floating_point() or tensor.is_complex():
        return torch.randn(tensor.shape, device=device).mul_(0.02).to(tensor.dtype)
    return torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)


def block_runners(
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    graphs: list[StageGraph],
    values: dict[str, Any],
    state: dict[str, torch.Tensor],
    device: torch.device,
) -> list[BlockRunner]:
    """Runners that feed each block real example values (`values`: recorded at capture; `state`: the model's
    parameters and buffers by placeholder), tiled to the microbatch size asked for."""
    runners = []
    metas = {n.name: n.meta.get("val") for n in captured.gm.graph.nodes}
    planned = captured.planning_sizes()  # sequence lengths: the values were recorded at their maximum

    def _input(name: str, kind: InputKind, m: int) -> Any:
        if kind in (InputKind.PARAM, InputKind.BUFFER):
            tensor = state[name]
            return stand_in(tensor, device).requires_grad_(tensor.requires_grad)
        if kind == InputKind.CONSTANT:
            return captured.constants[name].to(device)
        if kind == InputKind.SYMINT:
            return symint_value(metas[name], captured.batch_symbol, m, planned)
        value = values[name]
        if not isinstance(value, torch.Tensor):
            return value
        value = stand_in(value, device)  # a meta model's values were recorded on meta
        dim = analysis.values[name].batch_dim if kind == InputKind.BOUNDARY else 0
        if dim is not None and value.dim() > 0:
            value = tile_rows(value, m, dim)
        if kind == InputKind.BOUNDARY:
            value = with_memory_order(value, analysis.values[name].dim_order)
        return value.to(device)

    for graph in graphs:
        params = frozenset(i for i, item in enumerate(graph.inputs) if item.kind.is_state)

        def make_inputs(m: int, graph: StageGraph = graph) -> list[Any]:
            return [_input(item.name, item.kind, m) for item in graph.inputs]

        runners.append(BlockRunner(graph.module, make_inputs, params))

    return runners


def measured_block_profiles(
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    blocks: list[list[str]],
    graphs: list[StageGraph],
    example: tuple[dict[str, Any], dict[str, torch.Tensor]],
    sizes: Sequence[int],
    *,
    config: Config,
    device: torch.device,
) -> list[BlockProfile]:
    """Every block measured at every microbatch size in `sizes` on `device`, the work spread over all ranks
    (every rank must call it) and cached on disk by graph, blocks, iterations and torch version.

    `example`: the values recorded at capture and the model's tensors by placeholder (`block_runners`)."""
    values, state = example
    runners = block_runners(captured, analysis, graphs, values, state, device)
    key = hashlib.sha256(
        f"{captured.graph_hash}|{[len(b) for b in blocks]}|{config.profile_iterations}|{torch.__version__}".encode()
    ).hexdigest()[:24]
    with exact_precision():
        return profile_blocks(runners, sizes, cache_key=key, config=config, device=device)
