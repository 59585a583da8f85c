"""Stages cut out of a captured graph: chained at legal unit boundaries they reproduce the eager model exactly
(loss, outputs and parameter gradients), replicate parameter-only ops, and the planner's per-range byte tables
match a hand count."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from graph_checks import check_analysis_invariants
from torch import nn

from rannc.capture import CapturedGraph, FlatCall, capture
from rannc.capture.inputs import symint_value, with_memory_order
from rannc.graph.analysis import GraphAnalysis, analyse, atomic_units
from rannc.graph.stage import StageGraph, build_stage
from rannc.graph.tables import range_tables

transformers.logging.set_verbosity_error()

BATCH = 3  # differs from the capture batch (2): the stages must really be symbolic in the batch


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

VOCAB, DIM, SEQ, LAYERS = 32, 16, 6, 4


class SkipTied(nn.Module):
    """Embedding tied to the output projection, a skip connection over the middle layers, a buffer, and a
    parameter-only op (`gain.exp()`) whose result is used at both ends of the network."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.register_buffer("pos", torch.linspace(-1.0, 1.0, SEQ * DIM).reshape(SEQ, DIM))
        self.gain = nn.Parameter(torch.linspace(-0.2, 0.2, DIM))
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(LAYERS))
        self.skip_proj = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gain.exp()
        h = self.embed(ids) * g + self.pos
        skip = h
        for index, layer in enumerate(self.layers):
            h = h + F.gelu(layer(h))
            if index == 0:
                skip = h
        h = h + self.skip_proj(skip)
        logits = self.head(self.norm(h) * g)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return loss, logits


@dataclasses.dataclass
class Case:
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    captured: CapturedGraph
    analysis: GraphAnalysis
    units: list[list[str]]
    loss_node: str


def _case(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], loss_index: int) -> Case:
    model.train()
    captured = capture(model, args, kwargs)
    analysis = analyse(captured)
    loss_node = captured.user_outputs[loss_index]
    assert loss_node is not None
    return Case(model, args, kwargs, captured, analysis, atomic_units(analysis), loss_node)


@pytest.fixture(scope="module")
def gpt2() -> Case:
    config = transformers.GPT2Config(
        vocab_size=128,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (BATCH, 8), generator=torch.Generator().manual_seed(1))
    return _case(model, (), {"input_ids": ids, "labels": ids.clone()}, loss_index=0)


@pytest.fixture(scope="module")
def skip_tied() -> Case:
    torch.manual_seed(0)
    model = SkipTied()
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return _case(model, (ids, labels), {}, loss_index=0)


@pytest.fixture(params=["gpt2", "skip_tied"])
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------------------------------------------
# Running a chain of stages by hand (one replica, whole batch)
# ----------------------------------------------------------------------------------------------------------------


def split_units(units: list[list[str]], stages: int) -> list[list[str]]:
    """`stages` contiguous groups of units of near-equal unit count (every cut at a legal unit boundary)."""
    count = len(units)
    edges = [round(k * count / stages) for k in range(stages + 1)]
    return [sum(units[edges[k] : edges[k + 1]], []) for k in range(stages)]


def build_chain(case: Case, stage_nodes: list[list[str]]) -> list[StageGraph]:
    return [build_stage(case.captured, case.analysis, nodes) for nodes in stage_nodes]


def _tensors_by_placeholder(case: Case) -> dict[str, torch.Tensor]:
    named = dict(case.model.named_parameters(remove_duplicate=False))
    named.update(dict(case.model.named_buffers(remove_duplicate=False)))
    out = {name: named[fqn] for name, fqn in case.captured.params.items()}
    out.update({name: named[fqn] for name, fqn in case.captured.buffers.items()})
    return out


@dataclasses.dataclass
class StageRun:
    graph: StageGraph
    outs: dict[str, Any]
    boundary_inputs: dict[str, torch.Tensor]


def run_forward(case: Case, graphs: list[StageGraph]) -> tuple[dict[str, Any], list[StageRun]]:
    """Run the stages in order, feeding each the values earlier stages produced (detached, as if received)."""
    tensors = _tensors_by_placeholder(case)
    metas = {n.name: n.meta.get("val") for n in case.captured.gm.graph.nodes}
    user = dict(zip(case.captured.user_inputs, FlatCall.of(case.args, case.kwargs).leaves))
    produced: dict[str, Any] = {}
    runs = []
    for graph in graphs:
        args: list[Any] = []
        boundary: dict[str, torch.Tensor] = {}
        for item in graph.inputs:
            if item.kind in ("param", "buffer"):
                args.append(tensors[item.name])
            elif item.kind == "constant":
                args.append(case.captured.constants[item.name])
            elif item.kind == "user":
                args.append(user[item.name])
            elif item.kind == "symint":
                args.append(symint_value(metas[item.name], case.captured.batch_symbol, BATCH))
            else:
                assert item.kind == "boundary", item
                # As the runtime delivers it: a fresh tensor in the producer's memory order (row split omitted).
                value = with_memory_order(
                    produced[item.name].detach(), case.analysis.values[item.name].dim_order
                )
                if value.is_floating_point():
                    value.requires_grad_(True)
                boundary[item.name] = value
                args.append(value)
        outs = dict(zip(graph.outputs, graph.module(*args)))
        produced.update(outs)
        runs.append(StageRun(graph, outs, boundary))
    return produced, runs


def run_backward(case: Case, runs: list[StageRun]) -> None:
    """Backward stage by stage, last first: seed the loss with 1 and each produced value with the sum of the
    gradients its consumers computed for their copies. Parameter gradients accumulate in `.grad`."""
    grads: dict[str, torch.Tensor] = {}
    for run in reversed(runs):
        targets, seeds = [], []
        for name in run.graph.outputs:
            if name == case.loss_node:
                targets.append(run.outs[name])
                seeds.append(torch.ones_like(run.outs[name]))
            elif name in grads:
                targets.append(run.outs[name])
                seeds.append(grads.pop(name))
        if targets:
            torch.autograd.backward(targets, seeds)
        for name, value in run.boundary_inputs.items():
            if value.grad is not None:
                grads[name] = grads[name] + value.grad if name in grads else value.grad
    assert not grads, f"gradients for values no stage produced: {sorted(grads)}"


def eager_loss_and_grads(case: Case) -> tuple[Any, dict[str, torch.Tensor]]:
    out = case.model(*case.args, **case.kwargs)
    loss = out[0] if isinstance(out, tuple) else out.loss
    params = dict(case.model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    return out, dict(zip(params, grads))


def check_chain_matches_eager(case: Case, graphs: list[StageGraph]) -> None:
    out, expected_grads = eager_loss_and_grads(case)
    expected_loss = out[0] if isinstance(out, tuple) else out.loss
    expected_logits = out[1] if isinstance(out, tuple) else out.logits

    case.model.zero_grad(set_to_none=True)
    try:
        produced, runs = run_forward(case, graphs)
        loss = produced[case.loss_node]
        assert loss.dim() == 0
        assert torch.equal(loss, expected_loss), (loss.item(), expected_loss.item())
        logits_node = case.captured.user_outputs[1]
        assert logits_node is not None
        assert torch.equal(produced[logits_node], expected_logits)

        run_backward(case, runs)
        for name, param in case.model.named_parameters():
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    finally:
        case.model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_analysis_of_the_models_matches_brute_force(case: Case) -> None:
    check_analysis_invariants(case.captured, case.analysis)


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_chained_stages_match_eager_loss_and_grads(case: Case, num_stages: int) -> None:
    stage_nodes = split_units(case.units, num_stages)
    assert all(stage_nodes) and sum(stage_nodes, []) == case.analysis.order
    check_chain_matches_eager(case, build_chain(case, stage_nodes))


@pytest.mark.parametrize(("name", "stride"), [("skip_tied", 1), ("gpt2", 6)])
def test_two_stages_at_many_legal_cuts_give_the_exact_loss(
    name: str, stride: int, request: pytest.FixtureRequest
) -> None:
    """Forward only, cutting after unit k for every k (every `stride`-th one for GPT-2, to stay fast)."""
    case: Case = request.getfixturevalue(name)
    out = case.model(*case.args, **case.kwargs)
    expected = out[0] if isinstance(out, tuple) else out.loss
    with torch.no_grad():
        for k in range(1, len(case.units), stride):
            graphs = build_chain(case, [sum(case.units[:k], []), sum(case.units[k:], [])])
            produced, _ = run_forward(case, graphs)
            assert torch.equal(produced[case.loss_node], expected), (k, case.units[k - 1])


def test_every_stage_input_is_produced_earlier_or_is_state(case: Case) -> None:
    graphs = build_chain(case, split_units(case.units, 4))
    stage_of = {name: s for s, graph in enumerate(graphs) for name in graph.batch_nodes}
    for s, graph in enumerate(graphs):
        for name in graph.input_names("boundary"):
            assert stage_of[name] < s
            assert name in graphs[stage_of[name]].outputs
            assert case.analysis.values[name].communicable
        for name in graph.input_names("symint"):
            assert case.analysis.values[name].kind == "symint"


def test_skip_value_goes_straight_to_a_stage_two_ahead(skip_tied: Case) -> None:
    """Cut so that the skip value leaves stage 1 and is consumed in stage 3: it goes there directly (stage 2
    neither receives nor re-emits it), and the chain still matches eager exactly."""
    weight = next(name for name, fqn in skip_tied.captured.params.items() if fqn == "skip_proj.weight")
    skip_proj = next(
        n for n in skip_tied.captured.gm.graph.nodes if n.op == "call_function" and weight in map(str, n.args)
    )
    skip = skip_proj.args[0]
    unit_of = {name: k for k, unit in enumerate(skip_tied.units) for name in unit}
    # Stage 1 runs from the skip value's producer to its last residual use, stage 2 up to the skip projection.
    residual_end = max(unit_of[user.name] for user in skip.users if user is not skip_proj) + 1
    edges = [0, unit_of[skip.name], residual_end, unit_of[skip_proj.name], len(skip_tied.units)]
    assert edges == sorted(set(edges)), edges
    stage_nodes = [sum(skip_tied.units[edges[k] : edges[k + 1]], []) for k in range(4)]
    graphs = build_chain(skip_tied, stage_nodes)
    assert skip.name in graphs[1].outputs
    assert skip.name in graphs[3].input_names("boundary")
    assert skip.name not in graphs[2].input_names("boundary") and skip.name not in graphs[2].outputs
    check_chain_matches_eager(skip_tied, graphs)


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_tied_weight_is_an_input_of_first_and_last_stage(case: Case, num_stages: int) -> None:
    graphs = build_chain(case, split_units(case.units, num_stages))
    tied = next(fqn for fqn, names in case.captured.aliases.items() if len(names) > 1)

    def holds(graph: StageGraph) -> bool:
        return any(case.captured.params.get(name) == tied for name in graph.input_names("param"))

    assert holds(graphs[0]) and holds(graphs[-1])
    assert not any(holds(graph) for graph in graphs[1:-1])


def test_parameter_only_ops_are_replicated(skip_tied: Case) -> None:
    """`gain.exp()` does not depend on the batch: both stages that use it recompute it from the parameter."""
    graphs = build_chain(skip_tied, split_units(skip_tied.units, 3))
    gain = next(name for name, fqn in skip_tied.captured.params.items() if fqn == "gain")
    exp = next(
        n.name
        for n in skip_tied.captured.gm.graph.nodes
        if n.op == "call_function" and n.target == torch.ops.aten.exp.default
    )
    assert not skip_tied.analysis.is_batch[exp]
    for graph in (graphs[0], graphs[-1]):
        assert gain in graph.input_names("param")
        assert exp in {n.name for n in graph.module.graph.nodes}
        assert exp not in graph.input_names("boundary") and exp not in graph.outputs
    assert all(
        item.kind != "boundary" or not item.name.startswith("exp") for g in graphs for item in g.inputs
    )


# ----------------------------------------------------------------------------------------------------------------
# range_tables on a chain
# ----------------------------------------------------------------------------------------------------------------

CHAIN_VOCAB, CHAIN_DIM = 16, 8


class TiedChain(nn.Module):
    """ids [B] -> embedding -> linear -> relu -> linear -> relu -> tied projection -> cross entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(CHAIN_VOCAB, CHAIN_DIM)
        self.l1 = nn.Linear(CHAIN_DIM, CHAIN_DIM)
        self.l2 = nn.Linear(CHAIN_DIM, CHAIN_DIM)
        self.head = nn.Linear(CHAIN_DIM, CHAIN_VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(self.embed(ids)))
        h = torch.relu(self.l2(h))
        return F.cross_entropy(self.head(h), labels)


def test_range_tables_on_a_tied_chain() -> None:
    torch.manual_seed(0)
    model = TiedChain()
    ids = torch.randint(0, CHAIN_VOCAB, (4,))
    captured = capture(model, (ids, ids.clone()), {})
    analysis = analyse(captured)
    units = atomic_units(analysis)
    # One unit per op: embedding, linear, relu, linear, relu, linear (tied head), cross entropy.
    assert [len(u) for u in units] == [1] * 7, units
    blocks = units
    graphs = [build_stage(captured, analysis, b) for b in blocks]
    tables = range_tables(captured, analysis, blocks, graphs)
    param_bytes, in_table, out_table = (
        tables.param_bytes,
        tables.in_bytes_per_sample,
        tables.out_bytes_per_sample,
    )

    fp32 = 4
    hidden = CHAIN_DIM * fp32  # 32 bytes per sample
    logits = CHAIN_VOCAB * fp32  # 64 bytes per sample
    produced = [hidden, hidden, hidden, hidden, hidden, logits, 0.0]  # what block k hands to block k+1
    count = len(blocks)
    for i in range(count):
        for j in range(i, count):
            assert in_table[i][j] == (produced[i - 1] if i > 0 else 0.0), (i, j)
            assert out_table[i][j] == (produced[j] if j < count - 1 else 0.0), (i, j)

    embed = CHAIN_VOCAB * CHAIN_DIM * fp32
    linear = (CHAIN_DIM * CHAIN_DIM + CHAIN_DIM) * fp32
    block_params = [embed, linear, 0.0, linear, 0.0, embed, 0.0]
    assert param_bytes[0][0] == embed
    assert param_bytes[5][5] == embed  # the head block holds the tied weight
    assert param_bytes[0][count - 1] == embed + 2 * linear  # ... counted once across the whole chain
    assert param_bytes[1][5] == embed + 2 * linear
    assert param_bytes[1][4] == 2 * linear
    for i in range(count):
        for j in range(i, count):
            distinct = sum(block_params[i : j + 1]) - (embed if i == 0 and j >= 5 else 0.0)
            assert param_bytes[i][j] == distinct, (i, j)


def test_range_tables_count_a_skip_value_once_per_range(skip_tied: Case) -> None:
    """In/out bytes of every range equal a brute-force count over the values crossing its edges."""
    blocks = skip_tied.units
    graphs = [build_stage(skip_tied.captured, skip_tied.analysis, b) for b in blocks]
    tables = range_tables(skip_tied.captured, skip_tied.analysis, blocks, graphs)
    in_table, out_table = tables.in_bytes_per_sample, tables.out_bytes_per_sample
    block_of = {name: b for b, nodes in enumerate(blocks) for name in nodes}
    nodes = {n.name: n for n in skip_tied.captured.gm.graph.nodes}
    count = len(blocks)
    for i in range(count):
        for j in range(i, count):
            inside = set(range(i, j + 1))
            expected_in = expected_out = 0.0
            for name in skip_tied.analysis.order:
                consumers = {block_of[u.name] for u in nodes[name].users if u.name in block_of}
                size = skip_tied.analysis.values[name].bytes_per_sample
                if block_of[name] < i and consumers & inside:
                    expected_in += size
                if block_of[name] in inside and any(c > j for c in consumers):
                    expected_out += size
            assert in_table[i][j] == pytest.approx(expected_in), (i, j)
            assert out_table[i][j] == pytest.approx(expected_out), (i, j)
