"""Connect a pipeline call to the user's autograd graph: one node whose backward runs the pipeline's."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import RanncError
from .failures import reported
from .pipeline import PipelineCall
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
        if call.mode == "eager":
            flat = [spec for spec in call.stage.outputs if spec.node is not None]
            scale: torch.Tensor | None = None
            for spec, grad in zip(flat, grads):
                if grad is None:
                    continue
                if (
                    spec.kind == "mean"
                    and scale is None
                    and spec.dtype is not None
                    and spec.dtype.is_floating_point
                ):
                    scale = grad
                    continue
                raise RanncError(
                    f"an output of the rannc-wrapped model ({spec.node}) received a gradient, but the 1F1B "
                    "schedule computes gradients during forward for the loss only. Set the config item "
                    "schedule='fill_drain' (RANNC_SCHEDULE=fill_drain) to backpropagate through other outputs."
                )
            if scale is None:
                return (None, None, *[None] * len(call.grad_leaf_names))
            call.apply_param_grads(scale.to(torch.float64))
            input_grads = call.local_input_grads(scale)
            current_tracer().flush()  # the step's trace ends with its gradient sync
        else:
            input_grads = call.run_backward(list(grads))
        return (None, None, *input_grads)


def run_call(call: PipelineCall, grad_leaves: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Run the call; when autograd is recording, attach its outputs to the user's graph."""
    if call.mode == "inference":
        return call.run_forward()
    call.grad_leaf_names = [name for name, _ in grad_leaves]
    anchor = torch.zeros((), requires_grad=True)
    return list(_PipelineFunction.apply(call, anchor, *[t for _, t in grad_leaves]))
