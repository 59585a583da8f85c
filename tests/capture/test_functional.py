"""Capture keeps torch.export's training IR when it is functional and retraces it only when it must."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rannc.capture import capture
from rannc.capture.modes import training_mode

aten = torch.ops.aten


def _targets(model: nn.Module, *args: torch.Tensor) -> set[object]:
    captured = capture(model, args, {})
    return {n.target for n in captured.gm.graph.nodes if n.op == "call_function"}


def _mutates(targets: set[object]) -> bool:
    return any(isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable for t in targets)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).sum()


class InPlace(Mlp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h[:, 0] = 1.0  # an in-place write: the training IR is not functional
        return self.fc2(h).sum()


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)).sum()


class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.plain, self.none, self.alpha = nn.Dropout(0.5), nn.Dropout(0.0), nn.AlphaDropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha(self.none(self.plain(self.fc(x))))


def test_functional_training_ir_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain model keeps the graph export traced; only the in-place model is retraced."""
    retraced: list[bool] = []
    original = torch.export.ExportedProgram.run_decompositions

    def counted(program: torch.export.ExportedProgram, *args: object, **kwargs: object) -> object:
        retraced.append(True)
        return original(program, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counted)
    targets = _targets(Mlp(), torch.randn(4, 8))
    assert not retraced and aten.linear.default in targets and not _mutates(targets)
    _targets(InPlace(), torch.randn(4, 8))
    assert retraced == [True]


def test_in_place_writes_are_retraced_into_a_functional_graph() -> None:
    """The retrace functionalises the write (a scatter into a copy)."""
    targets = _targets(InPlace(), torch.randn(4, 8))
    assert not _mutates(targets) and aten.select_scatter.default in targets


def test_batch_norm_is_retraced_and_its_running_statistics_are_outputs() -> None:
    """aten.batch_norm updates its running statistics without saying so in its schema: it must be retraced."""
    captured = capture(Norm().train(), (torch.randn(4, 8),), {})
    targets = {n.target for n in captured.gm.graph.nodes if n.op == "call_function"}
    assert aten.batch_norm.default not in targets and not _mutates(targets)
    assert sorted(captured.buffer_mutations.values()) == [
        "norm.num_batches_tracked",
        "norm.running_mean",
        "norm.running_var",
    ]


def test_autocast_casts_are_recorded() -> None:
    """autocast acts below the training IR: a capture under autocast is retraced, so its casts are in the graph."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        captured = capture(Mlp(), (torch.randn(4, 8),), {})
    dtypes = {
        n.meta["val"].dtype
        for n in captured.gm.graph.nodes
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
    }
    assert torch.bfloat16 in dtypes


def test_dropouts_switch_with_the_mode() -> None:
    """aten.dropout becomes native_dropout (p = 0: a copy, no mask); every dropout is the identity in eval mode and
    active in train mode."""
    torch.manual_seed(0)
    model = Dropouts().train()
    x = torch.randn(64, 8)
    captured = capture(model, (x,), {})
    targets = {
        getattr(n.target, "__name__", str(n.target))
        for n in captured.gm.graph.nodes
        if n.op == "call_function"
    }
    assert "dropout" not in targets and {"native_dropout", "alpha_dropout"} <= targets
    state = dict(model.named_parameters())
    inputs = [
        state[captured.params[name]] if name in captured.params else x
        for name in captured.placeholder_nodes()
    ]
    expected = model.fc(x)
    with training_mode(False):
        (out,) = captured.gm(*inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (out,) = captured.gm(*inputs)
    assert not torch.allclose(out, expected)
