"""The split backward of zero-bubble stages (rannc.split_backward): I and W together give autograd's gradients,
W runs none of the input path again, and the unusual graphs (a weight used twice, outputs that depend on
parameters only, no input that wants a gradient, an output that is a parameter or an input)."""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from rannc.split_backward import input_grads

Block = Callable[..., list[torch.Tensor]]


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


def check_against_autograd(block: Block, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> None:
    """I's input gradients and W's parameter gradients equal one torch.autograd.grad over both."""
    outputs = [o for o in block(*inputs, *params) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outputs]
    expected = torch.autograd.grad(outputs, inputs + params, grads, allow_unused=True, retain_graph=True)
    found, weights = input_grads(outputs, grads, inputs, params)
    for got, want in zip(found + weights.compute(), expected):
        if want is None:
            assert got is None or not got.any()
        else:
            assert got is not None
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not weights.groups and not weights.caught  # W let the graph go


CASES: dict[str, tuple[Block, list[tuple[int, ...]], list[tuple[int, ...]]]] = {
    "linear-gelu-tanh": (
        lambda x, a, b, c: [F.linear(torch.tanh(F.linear(F.gelu(F.linear(x, a)), b)), c)],
        [(4, 3)],
        [(5, 3), (5, 5), (2, 5)],
    ),
    "weight-used-twice": (lambda x, a: [F.linear(torch.tanh(F.linear(x, a)), a)], [(4, 5)], [(5, 5)]),
    "parameter-only-outputs": (
        lambda x, a, b: [(a * 3).sum(), F.linear(x, b) + a.sum()],
        [(4, 3)],
        [(3,), (5, 3)],
    ),
    "no-input-wants-grad": (
        lambda a, b: [F.linear(torch.ones(2, 3), a).relu() @ b.t()],
        [],
        [(5, 3), (4, 5)],
    ),
    "output-is-a-parameter": (lambda x, a: [a, F.linear(x, a)], [(4, 3)], [(5, 3)]),
    "output-is-the-input": (lambda x, a: [x, F.linear(x, a)], [(4, 3)], [(5, 3)]),
    "unused-parameter": (lambda x, a, b: [F.linear(x, a)], [(4, 3)], [(5, 3), (3, 3)]),
    "layer-norm": (
        lambda x, a, b: [F.layer_norm(x, (3,), a, b).relu()],
        [(4, 3)],
        [(3,), (3,)],
    ),
    "convolution": (lambda x, a, b: [F.conv2d(x, a, b).relu()], [(2, 3, 5, 5)], [(4, 3, 3, 3), (4,)]),
    "two-inputs-skip": (
        lambda x, y, a, b: [F.linear(x, a) + F.linear(y, b), torch.tanh(F.linear(x, a)).sum()],
        [(4, 3), (4, 2)],
        [(6, 3), (6, 2)],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_i_and_w_give_autograd_s_gradients(name: str) -> None:
    torch.manual_seed(0)
    block, input_shapes, param_shapes = CASES[name]
    check_against_autograd(block, [leaf(*s) for s in input_shapes], [leaf(*s) for s in param_shapes])


def test_w_runs_none_of_the_input_path() -> None:
    """In a stack of linear + tanh layers, W runs only the matmuls' weight parts (and their transposes): no
    tanh backward runs again."""
    torch.manual_seed(0)
    x = leaf(4, 3)
    weights = [leaf(5, 3), leaf(5, 5), leaf(5, 5), leaf(2, 5)]
    h = x
    for w in weights:
        h = torch.tanh(F.linear(h, w))
    nodes, todo = set(), [h.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            todo.extend(child for child, _ in node.next_functions)
    runs: collections.Counter[str] = collections.Counter()
    for node in nodes:
        node.register_prehook(lambda grads, node=node: runs.update([node.name()]))
    _, pending = input_grads([h], [torch.ones_like(h)], [x], weights)
    assert runs == {"TanhBackward0": 4, "MmBackward0": 4}
    runs.clear()
    pending.compute()
    assert runs == {"MmBackward0": 4, "TBackward0": 4}


def test_parameter_hooks_fire_in_w() -> None:
    """A parameter's tensor hooks (the overlapped gradient reduce) fire in W, once, with its gradient."""
    x, w = leaf(4, 3), leaf(5, 3)
    seen: list[torch.Tensor] = []
    handle = w.register_hook(seen.append)
    out = torch.tanh(F.linear(x, w))
    _, pending = input_grads([out], [torch.ones_like(out)], [x], [w])
    assert not seen
    (grad,) = pending.compute()
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], grad)


class _Gathered(torch.autograd.Function):
    """A stand-in for ZeRO-3's gather: the weight hangs from an anchor; its backward records the gradient."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, weight: torch.Tensor, seen: list) -> torch.Tensor:  # type: ignore[override]
        ctx.seen = seen
        return weight.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.seen.append(grad.clone())
        return None, None, None


def test_anchors_run_each_use_once_in_w() -> None:
    """Weights reached through an anchor per unit (as ZeRO-3 gathers them): I runs none of their backwards, W
    runs each unit's once, with the gradient autograd gives the weight."""
    torch.manual_seed(0)
    x = leaf(4, 3)
    weights = [torch.randn(5, 3), torch.randn(5, 5), torch.randn(2, 5)]
    anchors = [torch.zeros((), requires_grad=True) for _ in weights]
    seen: list[list[torch.Tensor]] = [[] for _ in weights]
    h = x
    for w, anchor, record in zip(weights, anchors, seen):
        h = torch.tanh(F.linear(h, _Gathered.apply(anchor, w, record)))
    grad = torch.randn_like(h)
    (input_grad,), pending = input_grads([h], [grad], [x], [], anchors)
    assert not any(seen)
    assert pending.compute() == []
    assert [len(s) for s in seen] == [1, 1, 1]
    plain = [w.clone().requires_grad_(True) for w in weights]
    x2 = x.detach().requires_grad_(True)
    h = x2
    for w in plain:
        h = torch.tanh(F.linear(h, w))
    expected = torch.autograd.grad([h], [x2, *plain], [grad])
    torch.testing.assert_close(input_grad, expected[0])
    for got, want in zip(seen, expected[1:]):
        torch.testing.assert_close(got[0], want)
