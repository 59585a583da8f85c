"""Mixed precision across ranks: a GradScaler whose inf/NaN check every rank agrees on."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` for partitioned models: a step is skipped on every rank or on none.

    Each rank only sees the gradients of its own stage, so a plain scaler could skip a step on the rank
    whose gradients overflowed and take it on the others. Here the per-rank findings are all-reduced (max)
    before the step decision. Use it exactly like ``torch.amp.GradScaler``::

        scaler = rannc.GradScaler("cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    """

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        per_device: dict[Any, torch.Tensor] = super()._unscale_grads_(
            optimizer, inv_scale, found_inf, allow_fp16
        )
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
