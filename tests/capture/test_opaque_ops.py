"""`rannc.opaque` in one process: the op against the plain function, capture on CPU and meta (shapes learnt
without tracing), the offline planner, the checks of the contract, the CaptureError of code export cannot capture,
and the config item."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import opaque_models as om
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rannc
from rannc.capture import capture
from rannc.capture.opaque import opaque_submodules
from rannc.config import load_config
from rannc.errors import CaptureError, ConfigError
from rannc.offline import plan_offline

OP_NODES = ("opaque_models_zero_pad_tokens", "opaque_models_flip_negative_samples")


def test_opaque_function_equals_the_function_and_its_gradient() -> None:
    torch.manual_seed(0)
    h = torch.randn(4, om.SEQ, om.DIM, requires_grad=True)
    ids = torch.tensor([[0, 1, 2, 0, 3, 4]] * 4)
    marked = om.opaque_flip_negative_samples(torch.tanh(om.opaque_zero_pad_tokens(h * 3, ids, om.PAD)))
    plain = om.flip_negative_samples(torch.tanh(om.zero_pad_tokens(h * 3, ids, om.PAD)))
    assert torch.equal(marked, plain)
    weights = torch.randn_like(plain)
    (grad_marked,) = torch.autograd.grad((marked * weights).sum(), h)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), h)
    torch.testing.assert_close(grad_marked, grad_plain, rtol=0, atol=0)
    assert (grad_marked[:, 0] == 0).all() and (grad_marked[:, 1] != 0).any()  # zeroed tokens get no gradient
    # it ran on a copy: the caller's tensor is unchanged, the result is returned
    x = torch.ones(1, 2, 3)
    out = om.opaque_zero_pad_tokens(x, torch.tensor([[0, 1]]), om.PAD)
    assert torch.equal(x, torch.ones(1, 2, 3)) and out[0, 0].abs().sum() == 0


def test_capture_makes_each_call_one_op_with_a_batch_shaped_output() -> None:
    model = om.build("token", marked=True)
    ids, labels = om.batches()[0]
    captured = capture(model, (ids, labels), {})
    ops = [n for n in captured.gm.graph.nodes if n.op == "call_function" and "rannc_opaque" in str(n.target)]
    assert [n.name for n in ops] == list(OP_NODES)
    for node in ops:
        (getitem,) = node.users
        assert getitem.meta["val"].shape[0].node.expr == captured.batch_symbol
        assert tuple(getitem.meta["val"].shape[1:]) == (om.SEQ, om.DIM)
    with torch.device("meta"):
        on_meta = om.build("token", marked=True)
    meta = capture(on_meta, (ids.to("meta"), labels.to("meta")), {})
    assert meta.graph_hash == captured.graph_hash  # the op's name and call are the same on every device


@rannc.opaque
def weigh_odd_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([1.0 if label % 2 else 0.5 for label in labels.tolist()])
    return F.cross_entropy(logits, labels, reduction="none") * weights


class LossOfTwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(om.VOCAB, om.DIM), nn.Linear(om.DIM, om.CLASSES)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return weigh_odd_labels(self.head(self.embed(ids).mean(dim=1)), labels).mean()


def test_shapes_in_the_batch_and_the_sequence() -> None:
    ids, labels = om.batches()[0]
    # the inputs' batch dims are traced as one symbol each (equal only at the end): they vary together
    captured = capture(LossOfTwoInputs(), (ids, labels), {})
    (getitem,) = [n for n in captured.gm.graph.nodes if n.name == "getitem"]
    assert [s.node.expr for s in getitem.meta["val"].shape] == [captured.batch_symbol]
    # with max_seq_len the sequence is a symbol too: outputs follow both
    captured = capture(om.build("token", marked=True), (ids, labels), {}, max_seq_len=16)
    (sequence,) = {d.symbol for d in captured.dynamic_dims}
    for node in [n for n in captured.gm.graph.nodes if n.name.startswith("getitem")]:
        batch, length, width = node.meta["val"].shape
        assert (batch.node.expr, length.node.expr, width) == (captured.batch_symbol, sequence, om.DIM)


def test_meta_plan_of_an_opaque_model() -> None:
    result = plan_offline(
        _meta_router_model,
        world_size=2,
        device_memory_bytes=None,
        global_batch=8,
        device="cpu",
        num_stages=2,
        opaque_modules=("router",),
    )
    assert len(result.deployment.plan.stages) == 2
    assert any(name.startswith("module_router") for nodes in result.deployment.stage_nodes for name in nodes)


def _meta_router_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    with torch.device("meta"):
        model = om.build("router", marked=True)
    ids = torch.zeros(1, om.SEQ, dtype=torch.long, device="meta")
    return model, (ids, torch.zeros(1, dtype=torch.long, device="meta"))


@pytest.mark.parametrize(
    ("flip", "where"),
    [(om.flip_negative_samples, "flip_negative_samples"), (om.zero_pad_tokens, "zero_pad_tokens")],
)
def test_capture_error_names_the_function_and_the_decorator(flip: Any, where: str) -> None:
    model = om.build("token", marked=True)
    model.flip = flip if where == "flip_negative_samples" else om.opaque_flip_negative_samples
    model.zero_pads = flip if where == "zero_pad_tokens" else om.opaque_zero_pad_tokens
    with pytest.raises(CaptureError) as info:
        capture(model, om.batches()[0], {})
    message = str(info.value)
    assert f"Capture failed in {where} (" in message and "opaque_models.py:" in message
    assert "decorate it with @rannc.opaque" in message and "torch.cond" in message


def test_opaque_submodule_by_instance_and_by_class() -> None:
    ids, labels = om.batches()[0]
    model = om.build("router", marked=True)
    with opaque_submodules(model, ()) as chosen:
        assert chosen == []
    rannc.opaque(model.router)
    try:
        captured = capture(model, (ids, labels), {})
    finally:
        del model.router._rannc_opaque
    assert any(n.name.startswith("module_router") for n in captured.gm.graph.nodes)
    marked_class = rannc.opaque(type("MarkedRouter", (om.Router,), {}))
    model.router = marked_class()
    captured = capture(model, (ids, labels), {})
    assert any("module_MarkedRouter_router" in str(n.target) for n in captured.gm.graph.nodes)
    assert "forward" not in vars(model.router)  # the capture left the module as it was
    with pytest.raises(CaptureError, match=r"not submodules of RouterModel.*'before'"):
        capture(model, (ids, labels), {}, opaque_modules=["rooter"])


# ---- the contract ------------------------------------------------------------------------------------------


class Calls(nn.Module):
    """Linear -> fn -> Linear -> loss."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn, self.a, self.b = fn, nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn(self.a(x))).square().mean()


def capture_calls(fn: Any) -> Any:
    return capture(Calls(fn), (torch.randn(3, 4),), {})


@rannc.opaque
def changes_its_argument(h: torch.Tensor) -> torch.Tensor:
    h.mul_(2)
    return h.sum(dim=1, keepdim=True) * torch.ones_like(h)


@rannc.opaque
def draws_random_numbers(h: torch.Tensor) -> torch.Tensor:
    return F.dropout(h, 0.5)


@rannc.opaque
def fails_on_zeros(h: torch.Tensor) -> torch.Tensor:
    if not bool(h.any()):
        raise ValueError("all zero")
    return h * 2


@rannc.opaque(fake=lambda h: torch.empty_like(h))
def fails_on_zeros_with_fake(h: torch.Tensor) -> torch.Tensor:
    if not bool(h.any()):
        raise ValueError("all zero")
    return h * 2


@rannc.opaque
def squares_the_batch(h: torch.Tensor) -> torch.Tensor:
    return h.new_zeros(h.shape[0] ** 2, 4)


@rannc.opaque
def scales(h: torch.Tensor, factor: float, rows: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (h * factor).to(dtype)[:rows].to(h.dtype)


def test_an_argument_changed_in_place_and_not_returned_is_refused() -> None:
    with pytest.raises(CaptureError, match=r"changes its tensor argument 0 in place and does not return it"):
        capture_calls(changes_its_argument)


def test_random_numbers_are_refused() -> None:
    model, x = Calls(draws_random_numbers), torch.randn(3, 4)
    state = torch.get_rng_state()
    with pytest.raises(CaptureError, match=r"draws random numbers"):
        capture(model, (x,), {})
    assert torch.equal(
        state, torch.get_rng_state()
    )  # learning the shapes drew nothing from the user's generator


def test_shapes_that_cannot_be_learnt_ask_for_a_fake() -> None:
    with pytest.raises(CaptureError, match=r"which failed: ValueError: all zero. Pass fake= to rannc.opaque"):
        capture_calls(fails_on_zeros)
    with pytest.raises(CaptureError, match=r"do not follow the input sizes as c \+ a \* size; pass fake="):
        capture_calls(squares_the_batch)
    model = Calls(fails_on_zeros_with_fake)
    captured = capture(model, (torch.randn(3, 4),), {})
    x = torch.randn(5, 4)
    assert torch.equal(run_captured(captured, model, x), model(x))


def run_captured(captured: Any, model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The captured graph run eagerly, as the runtime's stage graphs are."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    feed = iter(inputs)
    args = [
        state[captured.params[name]]
        if name in captured.params
        else captured.constants[name]
        if name in captured.constants
        else next(feed)
        for name in captured.placeholder_nodes()
    ]
    (loss,) = captured.gm(*args)
    return loss


def test_constants_and_sizes_reach_the_function() -> None:
    h = torch.randn(3, 4)
    assert torch.equal(scales(h, 0.5, 2, dtype=torch.float16), (h * 0.5).half()[:2].float())
    model = Calls(lambda x: scales(x, 0.5, x.shape[0]))
    captured = capture(model, (torch.randn(3, 4),), {})
    (node,) = [n for n in captured.gm.graph.nodes if "rannc_opaque" in str(n.target)]
    assert node.args[1] and "sym_size" in str(node.args[1][0])  # the batch size, symbolic, as an argument


def test_config_item_opaque_modules(tmp_path: Path) -> None:
    assert load_config().opaque_modules == ()
    assert load_config(env={"RANNC_OPAQUE_MODULES": "router, layers.1.moe"}).opaque_modules == (
        "router",
        "layers.1.moe",
    )
    path = tmp_path / "rannc_conf.toml"
    path.write_text('opaque_modules = ["router"]\n')
    assert load_config(path, env={}).opaque_modules == ("router",)
    with pytest.raises(ConfigError, match=r"opaque_modules.*not a list of strings"):
        load_config(env={}, opaque_modules=[1, 2])


class UsesAnotherParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.helper = rannc.opaque(self.multiply_when_nonzero)

    def multiply_when_nonzero(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.b.weight if bool(h.any()) else h  # zeros take the other branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.helper(self.a(x)).sum()


def test_a_parameter_that_is_not_an_argument_is_refused() -> None:
    other = nn.Linear(4, 4)
    with pytest.raises(CaptureError, match=r"1 tensor\(s\) that require grad but are not its arguments"):
        capture_calls(rannc.opaque(lambda h: h @ other.weight))
    model = UsesAnotherParameter()  # zeros do not reach the parameter: its first backward tells
    with pytest.raises(CaptureError, match=r"would get no gradient. Pass them as arguments"):
        model(torch.randn(2, 4)).backward()


@rannc.opaque
def project(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return h @ weight if bool((h.sum(dim=1) > -1e9).all()) else h


def test_autocast_at_the_call_is_kept_in_the_graph() -> None:
    weight = torch.randn(4, 4)
    model = Calls(lambda h: project(h, weight))
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        captured = capture(model, (x,), {})
        expected = model(x)
    (node,) = [n for n in captured.gm.graph.nodes if "rannc_opaque" in str(n.target)]
    (getitem,) = node.users
    assert getitem.meta["val"].dtype == torch.bfloat16  # learnt under the call's autocast
    got = run_captured(captured, model, x)  # graphs run with autocast off: the op enters it again
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_an_opaque_module_with_a_fake() -> None:
    model = om.build("router", marked=True)
    calls = []

    def fake(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        calls.append(type(module).__name__)
        return torch.empty_like(h)

    rannc.opaque(model.router, fake=fake)
    captured = capture(model, om.batches()[0], {})
    assert calls and set(calls) == {"Router"}
    assert any("module_Router_router" in str(n.target) for n in captured.gm.graph.nodes)


class BranchesInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x).sum()
        return self.a(-x).sum()


def test_a_branch_in_the_models_own_forward_is_named() -> None:
    with pytest.raises(
        CaptureError,
        match=r"Capture failed in BranchesInForward.forward \(.*test_opaque_ops.py:\d+: `if x.sum\(\) > 0:`\).*move it into a function and decorate that with @rannc.opaque",
    ):
        capture(BranchesInForward(), (torch.randn(2, 4),), {})
