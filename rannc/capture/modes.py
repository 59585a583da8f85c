"""Train/eval switching without a new capture: dropout and batch norm consult a mode flag at run time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

_state = threading.local()


def is_training() -> bool:
    return getattr(_state, "training", True)


@contextlib.contextmanager
def training_mode(training: bool) -> Iterator[None]:
    """Run captured graphs as in `model.train(training)`."""
    previous = is_training()
    _state.training = training
    try:
        yield
    finally:
        _state.training = previous


def autocast_state() -> tuple[tuple[str, bool, str], ...]:
    """The caller's autocast settings; the capture bakes them into the graph as explicit casts."""
    state = []
    for device_type in ("cpu", "cuda"):
        enabled = torch.is_autocast_enabled(device_type)
        dtype = str(torch.get_autocast_dtype(device_type)) if enabled else ""
        state.append((device_type, enabled, dtype))
    return tuple(state)


def exact_precision() -> contextlib.ExitStack:
    """Turn autocast off: captured graphs already carry their casts, so they must run exactly as captured."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def native_dropout(x: torch.Tensor, p: float, train: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """aten.native_dropout that is the identity in eval mode."""
    if train and is_training():
        return torch.ops.aten.native_dropout.default(x, p, train)
    return x.clone(), torch.ones_like(x, dtype=torch.bool)


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """Functional batch norm; in eval mode it normalises with the running statistics and leaves them as they are."""
    if training and is_training():
        return torch.ops.aten._native_batch_norm_legit_functional.default(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
    out, save_mean, save_rstd = torch.ops.aten._native_batch_norm_legit_no_training.default(
        x, weight, bias, running_mean, running_var, momentum, eps
    )
    return out, save_mean, save_rstd, running_mean.clone(), running_var.clone()


def _switchable_dropout(op: Any) -> Any:
    """`op` (a dropout variant taking (x, p, train)) that is the identity in eval mode."""

    def dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        return op(x, p, True) if train and is_training() else x.clone()

    dropout.__name__ = op.overloadpacket.__name__
    return dropout


_SWITCHABLE: dict[Any, Any] = {
    torch.ops.aten.native_dropout.default: native_dropout,
    torch.ops.aten._native_batch_norm_legit_functional.default: batch_norm,
}
# kept whole in an unretraced graph (see capture.functional); aten.dropout itself becomes native_dropout there
for _op in (
    torch.ops.aten.feature_dropout,
    torch.ops.aten.alpha_dropout,
    torch.ops.aten.feature_alpha_dropout,
):
    _SWITCHABLE[_op.default] = _switchable_dropout(_op.default)


def make_mode_switchable(gm: fx.GraphModule, recompile: bool = True) -> int:
    """Point training-only ops at mode-aware versions; returns how many were rewritten. `recompile=False`: the
    caller recompiles `gm`."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SWITCHABLE:
            node.target = _SWITCHABLE[node.target]
            count += 1
    if count and recompile:
        gm.recompile()
    return count
