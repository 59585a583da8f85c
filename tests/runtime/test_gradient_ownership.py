"""A microbatch's parameter gradient is kept as it is (no copy) only when nothing else holds it: later microbatches
and the loss scale are added to it in place, which must never write into a tensor someone else reads."""

from __future__ import annotations

import torch

from rannc.runtime.grad_sync import exclusive_item


def _grads(*outputs: torch.Tensor, wrt: list[torch.Tensor], seeds: list[torch.Tensor]) -> list:
    return list(torch.autograd.grad(outputs, wrt, seeds, allow_unused=True))


def test_a_fresh_gradient_is_kept_and_shared_ones_are_not() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 4, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)
    seed = torch.randn(2, 3)
    out = torch.nn.functional.linear(x, weight) + bias
    grads = _grads(out, wrt=[weight, bias, x], seeds=[seed])
    # (one check per assert: pytest keeps what an assert's other terms evaluate to, a reference more)
    views = [g._is_view() for g in grads]
    assert views == [True, True, False]
    assert exclusive_item(grads, 0)  # the transpose of a matmul's fresh output
    assert exclusive_item(grads, 1)  # all of a fresh sum, reshaped to the bias's shape
    assert exclusive_item(grads, 2)


def test_gradients_on_one_base_are_copied() -> None:
    first = torch.randn(2, requires_grad=True)
    second = torch.randn(3, requires_grad=True)
    grads = _grads(torch.cat([first, second]) * 2, wrt=[first, second], seeds=[torch.randn(5)])
    assert grads[0]._base is grads[1]._base  # cat's backward: slices of one fresh tensor
    assert not exclusive_item(grads, 0)
    assert not exclusive_item(grads, 1)
    del grads[1]
    assert not exclusive_item(grads, 0)  # alone now, but a part of its base: a copy frees the rest


def test_a_gradient_passed_through_unchanged_is_copied() -> None:
    shift = torch.randn(2, 3, requires_grad=True)
    x = torch.randn(2, 3, requires_grad=True)
    seed = torch.randn(2, 3)
    grads = _grads(x + shift, wrt=[shift, x], seeds=[seed])
    assert grads[0] is seed  # add's backward hands the output gradient on as it is
    assert not exclusive_item(grads, 0)
    assert not exclusive_item(grads, 1)


def test_a_gradient_someone_else_holds_is_copied() -> None:
    weight = torch.randn(3, 4, requires_grad=True)
    kept: list[torch.Tensor] = []
    weight.register_hook(kept.append)  # a user's hook that keeps the gradient
    x = torch.randn(2, 4)
    grads = _grads(x @ weight.t(), wrt=[weight], seeds=[torch.randn(2, 3)])
    assert kept[0] is grads[0]
    assert not exclusive_item(grads, 0)
    kept.clear()
    assert exclusive_item(grads, 0)
    other = grads[0].detach()  # another tensor on the same storage
    assert not exclusive_item(grads, 0)
    del other
    assert exclusive_item(grads, 0)
    assert not exclusive_item([None], 0)
