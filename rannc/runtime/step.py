"""Connect a pipeline call to the user's autograd graph: one node whose backward runs the pipeline's."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RanncError
from .failures import reported
from .pipeline import PipelineCall, PipelineMode
from .trace import current_tracer


class _PipelineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: PipelineCall, anchor: torch.Tensor, *grad_leaves: torch.Tensor) -> Any:
        ctx.set_materialize_grads(False)
        ctx.call = call
        with torch.enable_grad():
            outputs = call.run_forward()
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        with reported():
            return _PipelineFunction._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        call: PipelineCall = ctx.call
        if ctx.call is None:
            raise RanncError(
                "backward() was called twice through the same rannc output; the pipeline keeps no graph for a "
                "second pass. Run the forward again (or pass retain_graph only for code outside rannc)."
            )
        ctx.call = None
        if call.mode == PipelineMode.EAGER:
            input_grads = _eager_backward(call, list(grads))
        else:
            input_grads = call.run_backward(list(grads))
        return (None, None, *input_grads)


def _eager_backward(call: PipelineCall, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The loss's gradient scales what the forward pass computed; gradients that other outputs received
    (a loss built from the logits too) are backpropagated by a replay of the call."""
    agreed = call.agree_output_grads(grads)
    input_grads: list[torch.Tensor | None] = [None] * len(call.grad_leaf_names)
    if agreed.loss_scale is not None:
        call.apply_param_grads(agreed.loss_scale)
        input_grads = call.local_input_grads(agreed.loss_scale)
    else:
        call.discard_param_grads()  # no rank backpropagated the loss
    if agreed.others:
        replayed = call.replay_backward(grads)
        input_grads = [_add(a, b) for a, b in zip(input_grads, replayed)]
    current_tracer().flush()  # the step's trace ends with its gradient sync
    return input_grads


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def run_call(call: PipelineCall, grad_leaves: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Run the call; when autograd is recording, attach its outputs to the user's graph."""
    if call.mode == PipelineMode.INFERENCE:
        return call.run_forward()
    call.grad_leaf_names = [name for name, _ in grad_leaves]
    anchor = torch.zeros((), requires_grad=True)
    return list(_PipelineFunction.apply(call, anchor, *[t for _, t in grad_leaves]))
