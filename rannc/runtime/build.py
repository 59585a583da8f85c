"""Build this rank's LocalStage from a deployment: stage graphs, routes, outputs and gradient groups."""

from __future__ import annotations

import dataclasses

import torch

from ..capture import CapturedGraph
from ..errors import CaptureError, RanncError
from ..graph.analysis import GraphAnalysis, ValueKind
from ..graph.stage import InputKind, StageGraph, build_stage
from ..plan.types import StagePlan
from .dist import GroupCache
from .grad_sync import GRADIENTS, GradSync
from .routes import OutputSpec, Route
from .sharding import (
    ShardAssignment,
    StageSharding,
    first_use_order,
    sharded_graph_module,
    stage_units,
)
from .stage import LocalStage, StageChunk

BUFFERS = "buffers"  # process groups of replicated stages that average written buffers (GroupCache purpose)


@dataclasses.dataclass
class Layout:
    """Which stage runs which node, and which stage owns each parameter and buffer (for state_dict)."""

    graphs: list[StageGraph]
    stage_of_node: dict[str, int]
    holders: dict[str, list[int]]  # canonical tensor name -> stages that hold it
    owner: dict[str, int]  # canonical tensor name -> the stage whose copy is authoritative

    def rank_sets(self, stage_ranks: list[list[int]]) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> the sorted ranks holding it (every replica of every stage using it; a rank
        running several chunks that use it counts once)."""
        return {
            name: tuple(sorted({r for s in stages for r in stage_ranks[s]}))
            for name, stages in self.holders.items()
        }


def output_specs(
    captured: CapturedGraph, analysis: GraphAnalysis, stage_of_node: dict[str, int], last: int
) -> list[OutputSpec]:
    specs = []
    for node, constant in zip(captured.user_outputs, captured.user_output_constants):
        if node is None:
            specs.append(OutputSpec(None, "constant", None, constant=constant))
            continue
        if node in captured.user_inputs:
            specs.append(OutputSpec(None, "input", None, leaf=captured.user_inputs.index(node)))
            continue
        held = captured.params.get(node) or captured.buffers.get(node)
        if held is not None:
            raise CaptureError(
                f"the model returns its parameter or buffer {held} itself; after partitioning it lives on the "
                f"ranks of one stage only. Read it with RaNNCModule.get_param({held!r}) or state_dict() instead "
                "of returning it from forward (returning a value computed from it works)"
            )
        info = analysis.values[node]
        if info.kind != ValueKind.TENSOR:
            raise CaptureError(
                f"model output {node} is not a tensor; return tensors (or containers of tensors)"
            )
        if not analysis.is_batch[node]:
            specs.append(OutputSpec(node, "whole", last, None, info.shape, info.dtype))
        elif info.batch_dim is not None:
            specs.append(
                OutputSpec(node, "rows", stage_of_node[node], info.batch_dim, info.shape, info.dtype)
            )
        elif len(info.shape) == 0:
            specs.append(OutputSpec(node, "mean", stage_of_node[node], None, (), info.dtype))
        else:
            raise CaptureError(
                f"model output {node} depends on the batch but has no batch dimension (shape {info.shape}); "
                "outputs must be batch-shaped (samples along one dim) or a scalar mean such as a loss"
            )
    return specs


def stage_layout(captured: CapturedGraph, analysis: GraphAnalysis, stage_nodes: list[list[str]]) -> Layout:
    stage_of_node = {name: s for s, nodes in enumerate(stage_nodes) for name in nodes}
    last = len(stage_nodes) - 1
    roots: list[list[str]] = [[] for _ in stage_nodes]
    for node in captured.buffer_mutations:
        if not analysis.is_batch[node]:
            roots[0].append(node)
    for node in captured.user_outputs:
        if node is not None and node not in captured.user_inputs and not analysis.is_batch.get(node, True):
            roots[last].append(node)
    graphs = [
        build_stage(captured, analysis, nodes, extra_roots=roots[s]) for s, nodes in enumerate(stage_nodes)
    ]
    holders: dict[str, list[int]] = {}
    for s, graph in enumerate(graphs):
        for item in graph.inputs:
            canonical = captured.params.get(item.name) or captured.buffers.get(item.name)
            if canonical is not None and s not in holders.setdefault(canonical, []):
                holders[canonical].append(s)
    owner = {name: stages[0] for name, stages in holders.items()}
    for s, graph in enumerate(graphs):
        for node in graph.outputs:
            if node in captured.buffer_mutations:
                owner[captured.buffer_mutations[node]] = s
    return Layout(graphs, stage_of_node, holders, owner)


def build_local_stage(
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    layout: Layout,
    stage_ranks: list[list[int]],
    rank: int,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    groups: GroupCache,
) -> LocalStage:
    """`tensors` maps canonical names to the user's parameters and buffers (already on `device`). `stage_ranks`
    lists the ranks of every (virtual) stage; the rank builds every stage it is in (with interleaved 1F1B, one per
    model chunk of its position, whose stages all have the same ranks)."""
    mine = [s for s, ranks in enumerate(stage_ranks) if rank in ranks]
    index = mine[0]
    graphs = layout.graphs
    consumers: dict[str, list[int]] = {}
    for s, graph in enumerate(graphs):
        for name in graph.input_names(InputKind.BOUNDARY):
            consumers.setdefault(name, []).append(s)
    position = {n.name: k for k, n in enumerate(captured.gm.graph.nodes)}
    routes = []
    for k, name in enumerate(sorted(consumers, key=lambda n: position[n])):
        info = analysis.values[name]
        assert info.batch_dim is not None and info.dtype is not None
        routes.append(
            Route(
                value=name,
                index=k,
                producer=layout.stage_of_node[name],
                consumers=tuple(sorted(consumers[name])),
                batch_dim=info.batch_dim,
                shape=info.shape,
                dtype=info.dtype,
                carries_grad=info.carries_grad,
                dim_order=info.dim_order,
            )
        )
    chunks = [_chunk(captured, graphs[s], s, routes, tensors, device) for s in mine]
    params = set(captured.params.values())
    rank_sets: dict[tuple[int, ...], list[str]] = {}
    for name, ranks in layout.rank_sets(stage_ranks).items():
        if name in params:
            rank_sets.setdefault(ranks, []).append(name)
    grad_groups = [(ranks, sorted(names)) for ranks, names in rank_sets.items()]
    # Replicas write buffers from their own rows; a group per replicated stage averages them (created by every
    # rank in the same order, as new_group requires).
    replicated = list(dict.fromkeys(tuple(ranks) for ranks in stage_ranks if len(ranks) > 1))
    if captured.buffer_mutations:
        groups.create_all(replicated, BUFFERS)
    buffer_group = (
        groups.get(tuple(stage_ranks[index]), BUFFERS)
        if any(chunk.mutations for chunk in chunks) and tuple(stage_ranks[index]) in replicated
        else None
    )
    return LocalStage(
        chunks=chunks,
        replica=stage_ranks[index].index(rank),
        stage_ranks=stage_ranks,
        routes=routes,
        outputs=output_specs(captured, analysis, layout.stage_of_node, len(stage_ranks) - 1),
        user_inputs=captured.user_inputs,
        batch_symbol=captured.batch_symbol,
        grad_sync=GradSync(grad_groups, groups, rank),
        device=device,
        buffer_group=buffer_group,
        dynamic_dims=captured.dynamic_dims,
    )


def _chunk(
    captured: CapturedGraph,
    graph: StageGraph,
    index: int,
    routes: list[Route],
    tensors: dict[str, torch.Tensor],
    device: torch.device,
) -> StageChunk:
    """(Virtual) stage `index` on this rank: its graph's parameters, buffers and constants bound to tensors."""
    state: dict[str, torch.Tensor] = {}
    param_names: dict[str, str] = {}
    for item in graph.inputs:
        if item.kind == InputKind.PARAM:
            param_names[item.name] = captured.params[item.name]
            state[item.name] = tensors[captured.params[item.name]]
        elif item.kind == InputKind.BUFFER:
            state[item.name] = tensors[captured.buffers[item.name]]
        elif item.kind == InputKind.CONSTANT:
            state[item.name] = captured.constants[item.name].to(device)
    mutations = {
        node: tensors[fqn] for node, fqn in captured.buffer_mutations.items() if node in graph.outputs
    }
    symints = {
        item.name: _meta(captured, item.name) for item in graph.inputs if item.kind == InputKind.SYMINT
    }
    return StageChunk(
        index=index,
        graph=graph,
        routes=routes,
        state=state,
        param_names=param_names,
        mutations=mutations,
        symints=symints,
    )


def shard_stage(
    stage: LocalStage,
    plan: StagePlan,
    shards: ShardAssignment,
    shapes: dict[str, torch.Size],
    groups: GroupCache,
) -> None:
    """Make this rank's stage a ZeRO-2/3 stage when its plan says so (and it has parameters of its own)."""
    names = {n for n in stage.trainable if n in shards.levels}
    if not plan.shard.shards_gradients or not names:
        return
    if len(stage.chunks) != 1:
        raise RanncError(
            f"a sharded stage (ZeRO-2/3) cannot run {len(stage.chunks)} model chunks on one rank; plan interleaved "
            "1F1B without sharding (shard_stages 'none' or 'zero-1') or shard a plan of one chunk per rank"
        )
    chunk = stage.chunks[0]
    placeholders: dict[str, list[str]] = {}
    for placeholder, name in chunk.param_names.items():
        if name in names:
            placeholders.setdefault(name, []).append(placeholder)
    order = first_use_order(chunk.graph.module, placeholders)
    params = {name: stage.trainable[name] for name in order}
    total = sum(shapes[n].numel() * params[n].dtype.itemsize for n in order)
    ranks = stage.stage_ranks[stage.index]
    units = stage_units(
        order, params, shapes, shards.owner, ranks, total / (plan.last_block - plan.first_block + 1)
    )
    group = groups.get(tuple(sorted(ranks)), GRADIENTS)
    sharding = StageSharding(plan.shard, units, ranks, stage.rank, group, params, shapes, stage.device)
    module = sharded_graph_module(chunk.graph.module, placeholders, sharding) if sharding.gathers else None
    stage.shard(sharding, module)


def _meta(captured: CapturedGraph, name: str) -> object:
    return next(n for n in captured.gm.graph.nodes if n.name == name).meta["val"]
