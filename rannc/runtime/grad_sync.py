"""Allreduce each parameter's gradient among exactly the ranks that hold it (tied weights included)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dist import GroupCache
from .failures import guarded, wait_all


class GradSync:
    """`groups` lists (rank set, parameter names) for every rank set; this rank reduces the ones it is in."""

    def __init__(self, groups: list[tuple[tuple[int, ...], list[str]]], cache: GroupCache, rank: int) -> None:
        cache.create_all([ranks for ranks, _ in groups if len(ranks) > 1])
        self.mine = [
            (cache.get(ranks), names) for ranks, names in sorted(groups) if rank in ranks and len(ranks) > 1
        ]

    def allreduce(self, grads: dict[str, torch.Tensor]) -> None:
        """Sum `grads` in place over each parameter's rank set (bucketed per set and dtype)."""
        for group, names in self.mine:
            by_dtype: dict[torch.dtype, list[str]] = {}
            for name in names:
                by_dtype.setdefault(grads[name].dtype, []).append(name)
            for dtype in sorted(by_dtype, key=str):
                members = by_dtype[dtype]
                flat = torch.cat([grads[n].reshape(-1) for n in members])
                with guarded(lambda: "all-reducing gradients"):
                    work = dist.all_reduce(flat, group=group, async_op=True)
                wait_all([work], lambda names=members: f"all-reducing gradients of {names[0]} and others")
                offset = 0
                for name in members:
                    size = grads[name].numel()
                    grads[name].copy_(flat[offset : offset + size].view_as(grads[name]))
                    offset += size
