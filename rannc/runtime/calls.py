"""One call of a deployed model: whether the captured graph serves it, and the outputs handed back to the user."""

from __future__ import annotations

from typing import Any

import torch

from ..capture import CapturedGraph, FlatCall
from ..capture.modes import autocast_state
from ..errors import InputError
from . import failures


def refusal(captured: CapturedGraph, first: FlatCall, call: FlatCall, training: bool) -> InputError | None:
    """Why the graph captured at the `first` call cannot serve `call` (None: it can)."""
    try:
        _check_structure(captured, first, call)
        _check_shapes(captured, call)
        _check_constants(first, call)
        _check_modes(captured, training)
    except InputError as exc:
        return exc
    return None


def _check_structure(captured: CapturedGraph, first: FlatCall, call: FlatCall) -> None:
    if call.spec != captured.call_spec:
        before, now = set(first.paths), set(call.paths)
        added, removed = sorted(now - before), sorted(before - now)
        raise InputError(
            "the call's arguments differ in structure from the first call "
            f"(added: {', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}); the graph was "
            "captured for the first call's arguments. Pass the same arguments every call, or wrap a new model"
        )


def _check_shapes(captured: CapturedGraph, call: FlatCall) -> None:
    dynamic = {(d.leaf, d.dim) for d in captured.dynamic_dims}
    reshaped = [
        f"{path} has per-sample shape {tuple(new.shape[1:])} and dtype {new.dtype}, captured with "
        f"{shape[0]} and {shape[1]}"
        + (" (dims marked dynamic accept any size up to the captured one)" if dynamic else "")
        for leaf, (path, shape, new) in enumerate(zip(call.paths, captured.input_shapes, call.leaves))
        if shape is not None
        and isinstance(new, torch.Tensor)
        and (not _fits(tuple(new.shape[1:]), shape[0], leaf, dynamic) or new.dtype != shape[1])
    ]
    if reshaped:
        raise InputError(
            f"input shapes other than the batch dimension changed since the plan was made: {'; '.join(reshaped)}. "
            "The captured graph and plan are specific to those sizes: set the config item max_seq_len to the "
            "longest sequence (dim 1) the job will see, so that one graph and plan serve every length up to it, "
            "or pad inputs to the captured size"
        )


def _fits(
    shape: tuple[int, ...], captured: tuple[int, ...], leaf: int, dynamic: set[tuple[int, int]]
) -> bool:
    """A per-sample shape the captured graph serves: equal sizes, or at most the maximum on dynamic dims."""
    if len(shape) != len(captured):
        return False
    return all(
        size <= limit if (leaf, dim) in dynamic else size == limit
        for dim, (size, limit) in enumerate(zip(shape, captured), start=1)
    )


def _check_constants(first: FlatCall, call: FlatCall) -> None:
    changed = [
        f"{path} from {old!r} to {new!r}"
        for path, old, new in zip(call.paths, first.leaves, call.leaves)
        if not isinstance(new, torch.Tensor) and old != new
    ]
    if changed:
        raise InputError(
            f"non-tensor arguments changed: {'; '.join(changed)}. Non-tensor arguments are constants of the "
            "captured graph; keep them fixed or pass the value as a tensor"
        )


def _check_modes(captured: CapturedGraph, training: bool) -> None:
    if training and not captured.training:
        raise InputError(
            "the model was first called in eval mode, so its graph was captured without training behaviour "
            "(dropout, batch statistics); call it in train mode first, or wrap a fresh model for training"
        )
    if autocast_state() != captured.autocast:
        raise InputError(
            f"autocast settings changed since the first call (captured with {captured.autocast}, now "
            f"{autocast_state()}); the casts are part of the captured graph. Call the model under the same "
            "torch.autocast settings every time"
        )


def placeholder(leaf: Any) -> Any:
    """A leaf shaped like the first call's (one sample), standing in for a refused call's in the step exchange."""
    if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
        return torch.zeros((1, *leaf.shape[1:]), dtype=leaf.dtype)
    return leaf


def count_backward(results: list[torch.Tensor]) -> None:
    """Count the backward passes that reach a call's outputs: rank 0's watchdog checks that no rank skips one
    that the others run."""
    node = next((t.grad_fn for t in results if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)
    if node is not None:
        node.register_prehook(lambda grad_outputs: failures.backward_starts())
        node.register_hook(lambda grad_inputs, grad_outputs: failures.backward_ends())


class _AveragedGradient(torch.autograd.Function):
    """The identity whose backward divides by the world size: the gradient of the average over ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.world_size = world_size
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.world_size, None


def returned_input(leaf: Any, world_size: int) -> Any:
    """An argument the model returns unchanged: this rank's own value. Its gradient is, like every input's, that of
    the average over ranks of each rank's loss (DDP's contract for parameters); a leaf that needs no gradient is
    returned as it is."""
    if isinstance(leaf, torch.Tensor) and leaf.requires_grad and torch.is_grad_enabled() and world_size > 1:
        return _AveragedGradient.apply(leaf, world_size)
    return leaf
