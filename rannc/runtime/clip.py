"""Global gradient-norm clipping over all ranks, counting each parameter once."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .stage import LocalStage


def clip_global_grad_norm(
    stage: LocalStage, rank_sets: dict[str, tuple[int, ...]], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ semantics for the whole partitioned model; returns the total norm."""
    rank = stage.rank
    owned = []
    for name, param in stage.trainable.items():
        # A parameter lives on every replica of every stage that uses it; the lowest of those ranks counts it.
        if rank_sets[name][0] == rank and param.grad is not None:
            owned.append(param.grad.detach())
    norm_type = float(norm_type)
    device = stage.device
    if math.isinf(norm_type):
        local = max((g.abs().max().double() for g in owned), default=torch.zeros((), dtype=torch.float64))
        total = local.to(device).clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
    else:
        local = sum(
            (g.double().abs().pow(norm_type).sum() for g in owned), torch.zeros((), dtype=torch.float64)
        )
        total = local.to(device).clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(total)
        total = total.pow(1.0 / norm_type)
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for param in stage.trainable.values():
            if param.grad is not None:
                param.grad.detach().mul_(coef)
    return total.to(torch.float32)
