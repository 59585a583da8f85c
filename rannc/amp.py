"""Mixed precision across ranks: GradScaler inf/NaN checks that every rank agrees on."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_original_unscale = torch.amp.GradScaler._unscale_grads_


def _agree(per_device: dict[Any, torch.Tensor], found_inf: torch.Tensor) -> dict[Any, torch.Tensor]:
    """All-reduce (max) the per-rank inf/NaN findings so the step is skipped on every rank or on none."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return per_device
    agreed = found_inf.detach().clone()
    for value in per_device.values():
        agreed = torch.maximum(agreed, value.to(agreed.device))
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if not per_device:  # a rank without local parameters still takes part in the decision
        per_device[agreed.device] = agreed
    for value in per_device.values():
        value.copy_(agreed.to(value.device))
    return per_device


def _unscale_grads_(
    self: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    inv_scale: torch.Tensor,
    found_inf: torch.Tensor,
    allow_fp16: bool,
) -> dict[Any, torch.Tensor]:
    per_device = _original_unscale(self, optimizer, inv_scale, found_inf, allow_fp16)
    if getattr(optimizer, "_rannc_binding", None) is not None or isinstance(self, GradScaler):
        return _agree(per_device, found_inf)
    return per_device


def install() -> None:
    """Make every ``torch.amp.GradScaler`` agree across ranks for optimizers that rannc manages.

    Each rank only sees its own stage's gradients; without agreement one rank could skip a step that the
    others take. Optimizers not passed to a RaNNCModule keep torch's behaviour (no collective).
    """
    torch.amp.GradScaler._unscale_grads_ = _unscale_grads_  # type: ignore[method-assign]


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that always agrees across ranks (also for optimizers rannc did not bind).

    Example::

        scaler = rannc.GradScaler("cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    """
