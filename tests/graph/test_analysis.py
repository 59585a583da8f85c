"""Graph analysis of captured models: batch labelling, batch dims, memory order, legal cuts, bytes per cut, units."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from graph_checks import check_analysis_invariants, live_across
from torch import nn

from rannc.capture import CapturedGraph, capture
from rannc.errors import RanncError
from rannc.graph.analysis import GraphAnalysis, analyse, atomic_units, memory_order

WIDTH = 32  # fp32 hidden width: 128 bytes per sample
SEQ, DIM = 5, 8


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, WIDTH)
        self.l2 = nn.Linear(WIDTH, WIDTH)
        self.l3 = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        h = torch.relu(self.l2(h))
        return F.mse_loss(self.l3(h), y)


class Skip(nn.Module):
    """h1 is used again after two more layers: every cut in between carries two hidden activations."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, WIDTH)
        self.l2 = nn.Linear(WIDTH, WIDTH)
        self.l3 = nn.Linear(WIDTH, WIDTH)
        self.l4 = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h1 = torch.relu(self.l1(x))
        h3 = torch.relu(self.l3(torch.relu(self.l2(h1))))
        return F.mse_loss(self.l4(h3 + h1), y)


class Shapes(nn.Module):
    """Parameter-only ops, a transpose (batch dim moves to 1), a reshape that folds the batch into another dim,
    a 0-dim batch-dependent intermediate and a non-tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(DIM, DIM)
        self.b = nn.Linear(DIM, DIM)
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, DIM * DIM).reshape(DIM, DIM))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        w2 = self.w.t() * 2 + torch.arange(DIM, dtype=torch.float32)  # parameter-only
        h = self.a(x)  # [B, T, D]
        u = h.transpose(0, 1) * 3  # [T, B, D]
        folded = h.reshape(-1, DIM)  # [B*T, D]: batch folded into dim 0
        back = (torch.relu(folded) @ w2).reshape(x.shape[0], SEQ, DIM)
        energy = back.pow(2).mean()  # 0-dim, depends on every sample
        out = self.b(back * energy) + u.transpose(0, 1)
        return out.sum() * scale


def _capture(model: nn.Module, *args: object, **kwargs: object) -> tuple[CapturedGraph, GraphAnalysis]:
    captured = capture(model, tuple(args), dict(kwargs))
    return captured, analyse(captured)


@pytest.fixture(scope="module")
def mlp() -> tuple[CapturedGraph, GraphAnalysis]:
    torch.manual_seed(0)
    return _capture(MLP(), torch.randn(4, 16), torch.randn(4, 4))


@pytest.fixture(scope="module")
def skip() -> tuple[CapturedGraph, GraphAnalysis]:
    torch.manual_seed(0)
    return _capture(Skip(), torch.randn(4, 16), torch.randn(4, 4))


@pytest.fixture(scope="module")
def shapes() -> tuple[CapturedGraph, GraphAnalysis]:
    torch.manual_seed(0)
    return _capture(Shapes(), torch.randn(4, SEQ, DIM), scale=3.0)


def nodes_by_target(captured: CapturedGraph, target: object) -> list[fx.Node]:
    return [n for n in captured.gm.graph.nodes if n.op == "call_function" and n.target == target]


def node_by_target(captured: CapturedGraph, target: object, index: int = 0) -> str:
    return nodes_by_target(captured, target)[index].name


def unit_of(analysis: GraphAnalysis) -> dict[str, int]:
    return {name: k for k, unit in enumerate(atomic_units(analysis)) for name in unit}


@pytest.mark.parametrize("name", ["mlp", "skip", "shapes"])
def test_analysis_matches_brute_force(name: str, request: pytest.FixtureRequest) -> None:
    check_analysis_invariants(*request.getfixturevalue(name))


def test_batch_labelling(shapes: tuple[CapturedGraph, GraphAnalysis]) -> None:
    captured, analysis = shapes
    aten = torch.ops.aten
    assert analysis.is_batch["x"]
    assert not analysis.is_batch["scale"]  # a float argument is a capture constant
    for param in captured.params:
        assert not analysis.is_batch[param]
    ops = [n for n in captured.gm.graph.nodes if n.op == "call_function"]
    # Only `self.w.t() * 2 + torch.arange(DIM)` does not see x (arange has no inputs at all) ...
    assert [n.target for n in ops if not analysis.is_batch[n.name]] == [
        aten.t.default,
        aten.mul.Tensor,
        aten.arange.default,
        aten.add.Tensor,
    ]
    # ... every other op is downstream of x, and the order holds exactly the batch ops, in graph order.
    batch_ops = [n.name for n in ops if analysis.is_batch[n.name]]
    assert analysis.order == batch_ops and len(batch_ops) == len(ops) - 4
    for target in (
        aten.sym_size.int,
        aten.linear.default,
        aten.transpose.int,
        aten.mean.default,
        aten.sum.default,
    ):
        assert analysis.is_batch[node_by_target(captured, target)]


def test_mlp_values_and_cut_bytes(mlp: tuple[CapturedGraph, GraphAnalysis]) -> None:
    captured, analysis = mlp
    linears = [n.name for n in captured.gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    relus = [n.name for n in captured.gm.graph.nodes if n.target == torch.ops.aten.relu.default]
    assert len(linears) == 3 and len(relus) == 2
    for name in linears[:2] + relus:
        info = analysis.values[name]
        assert (info.kind, info.batch_dim, info.dtype) == ("tensor", 0, torch.float32)
        assert info.bytes_per_sample == WIDTH * 4 == 128
        assert info.fixed_bytes == 0.0
        k = analysis.position[name]
        assert analysis.legal_cut[k]
        assert analysis.cut_bytes_per_sample[k] == 128  # one hidden activation crosses
    assert analysis.values[linears[2]].bytes_per_sample == 16
    assert analysis.cut_bytes_per_sample[analysis.position[linears[2]]] == 16
    loss = captured.user_outputs[0]
    assert loss is not None and analysis.values[loss].shape == ()
    assert analysis.legal_cut[-1] and analysis.cut_bytes_per_sample[-1] == 0.0
    for param in captured.params:  # parameters are placeholders, not batch values
        info = analysis.values[param]
        assert info.batch_dim is None and info.bytes_per_sample == 0.0
        assert info.fixed_bytes == math.prod(info.shape) * 4


def test_skip_connection_cut_bytes(skip: tuple[CapturedGraph, GraphAnalysis]) -> None:
    captured, analysis = skip
    linears = nodes_by_target(captured, torch.ops.aten.linear.default)
    h1 = next(iter(linears[0].users)).name  # relu(l1(x))
    linears = [n.name for n in linears]
    add = node_by_target(captured, torch.ops.aten.add.Tensor)
    inside = range(analysis.position[linears[1]], analysis.position[add])
    assert len(inside) == 4  # linear_1, relu_1, linear_2, relu_2
    for k in inside:
        assert h1 in live_across(captured, analysis, k)
        assert analysis.cut_bytes_per_sample[k] == 2 * 128
    assert analysis.cut_bytes_per_sample[analysis.position[h1]] == 128  # h1 alone, before the branch starts
    assert analysis.cut_bytes_per_sample[analysis.position[add]] == 128


def test_transpose_moves_the_batch_dim(shapes: tuple[CapturedGraph, GraphAnalysis]) -> None:
    captured, analysis = shapes
    first, second = (node_by_target(captured, torch.ops.aten.transpose.int, k) for k in range(2))
    info = analysis.values[first]
    assert info.batch_dim == 1 and info.communicable
    assert info.shape[0] == SEQ and info.shape[2] == DIM
    assert info.bytes_per_sample == SEQ * DIM * 4
    assert info.dim_order == (1, 0, 2)  # a view: memory still goes batch, seq, feature
    assert analysis.values[second].batch_dim == 0
    assert analysis.legal_cut[analysis.position[first]]


def test_memory_order() -> None:
    base = torch.empty(2, 3, 4)
    assert memory_order(base, None) == (0, 1, 2)
    assert memory_order(base.transpose(0, 1), None) == (1, 0, 2)
    assert memory_order(base.permute(2, 0, 1), None) == (1, 2, 0)
    assert memory_order(base.permute(2, 0, 1).contiguous(), None) == (0, 1, 2)
    assert memory_order(torch.empty(()), None) == ()


def test_folded_batch_is_never_cut(shapes: tuple[CapturedGraph, GraphAnalysis]) -> None:
    """x.reshape(-1, d) folds the batch into dim 0: from the reshape to the reshape back is one unit."""
    captured, analysis = shapes
    # the graph keeps the model's reshapes (export's graph is functional here, so it is not retraced into views)
    fold = node_by_target(captured, torch.ops.aten.reshape.default, 0)
    unfold = node_by_target(captured, torch.ops.aten.reshape.default, 1)
    info = analysis.values[fold]
    assert info.kind == "tensor" and info.batch_dim is None and not info.communicable
    assert info.shape[1] == DIM and str(info.shape[0]) == f"{SEQ}*{captured.batch_symbol}"
    start, end = analysis.position[fold], analysis.position[unfold]
    assert not any(analysis.legal_cut[start:end])
    units = unit_of(analysis)
    assert {units[analysis.order[k]] for k in range(start, end + 1)} == {units[fold]}
    assert analysis.values[unfold].batch_dim == 0


def test_zero_dim_intermediate_is_never_cut(shapes: tuple[CapturedGraph, GraphAnalysis]) -> None:
    captured, analysis = shapes
    mean = node_by_target(captured, torch.ops.aten.mean.default)
    info = analysis.values[mean]
    assert info.shape == () and info.batch_dim is None and not info.communicable
    assert not analysis.legal_cut[analysis.position[mean]]
    units = unit_of(analysis)
    users = [u.name for u in nodes_by_target(captured, torch.ops.aten.mean.default)[0].users]
    assert users and all(units[user] == units[mean] for user in users)


def test_symint_is_communicable_and_recomputed(shapes: tuple[CapturedGraph, GraphAnalysis]) -> None:
    captured, analysis = shapes
    size = node_by_target(captured, torch.ops.aten.sym_size.int)
    info = analysis.values[size]
    assert info.kind == "symint" and info.communicable and info.bytes_per_sample == 0.0
    assert analysis.is_batch[size]


def test_units_partition_the_order(mlp: tuple[CapturedGraph, GraphAnalysis]) -> None:
    captured, analysis = mlp
    units = atomic_units(analysis)
    assert sum(units, []) == analysis.order
    # The loss's broadcast pair (a tuple and its getitems) stays together.
    tuple_nodes = [name for name in analysis.order if analysis.values[name].kind == "other"]
    assert tuple_nodes
    positions = unit_of(analysis)
    for name in tuple_nodes:
        node = next(n for n in captured.gm.graph.nodes if n.name == name)
        assert all(positions[u.name] == positions[name] for u in node.users)


class DataDependent(nn.Module):
    """h[h > 0] has a data-dependent (unbacked) size: torch.export captures it fine."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        return h[h > 0].sum() + h.sum()


def test_data_dependent_size_is_analysed_or_rejected_cleanly() -> None:
    torch.manual_seed(0)
    captured = capture(DataDependent(), (torch.randn(3, 4),), {})
    try:
        analysis = analyse(captured)
    except RanncError:
        return  # rejecting the model with an explained error is acceptable too
    masked = next(n for n in captured.gm.graph.nodes if n.target == torch.ops.aten.index.Tensor)
    assert not analysis.values[masked.name].communicable
    units = unit_of(analysis)
    assert all(units[user.name] == units[masked.name] for user in masked.users)
