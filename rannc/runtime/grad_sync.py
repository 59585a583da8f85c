"""Allreduce each parameter's gradient among exactly the ranks that hold it (tied weights included)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .dist import GroupCache
from .failures import guarded, wait_all

# Gradients at least this large are reduced in place; smaller ones are packed into buckets of up to this many
# bytes (one collective each), so syncing never holds more than one bucket of extra memory.
BUCKET_BYTES = 4 * 2**20


class GradSync:
    """`groups` lists (rank set, parameter names) for every rank set; this rank reduces the ones it is in."""

    def __init__(self, groups: list[tuple[tuple[int, ...], list[str]]], cache: GroupCache, rank: int) -> None:
        cache.create_all([ranks for ranks, _ in groups if len(ranks) > 1])
        self.mine = [
            (cache.get(ranks), names) for ranks, names in sorted(groups) if rank in ranks and len(ranks) > 1
        ]

    def allreduce(self, grads: dict[str, torch.Tensor]) -> None:
        """Sum `grads` in place over each parameter's rank set: large contiguous gradients directly, the others
        in buckets of at most BUCKET_BYTES per rank set and dtype (the same order on every rank)."""
        for group, names in self.mine:
            by_dtype: dict[torch.dtype, list[str]] = {}
            for name in names:
                by_dtype.setdefault(grads[name].dtype, []).append(name)
            for dtype in sorted(by_dtype, key=str):
                for members in _buckets(by_dtype[dtype], grads):
                    _reduce(members, grads, group)


def _buckets(names: list[str], grads: dict[str, torch.Tensor]) -> list[list[str]]:
    """Consecutive runs of names whose gradients together stay within BUCKET_BYTES; a large contiguous
    gradient is a bucket of its own (reduced in place)."""
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in names:
        nbytes = grads[name].numel() * grads[name].element_size()
        if nbytes >= BUCKET_BYTES and grads[name].is_contiguous():
            if current:
                buckets.append(current)
                current, size = [], 0
            buckets.append([name])
            continue
        if current and size + nbytes > BUCKET_BYTES:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def _reduce(members: list[str], grads: dict[str, torch.Tensor], group: dist.ProcessGroup) -> None:
    single = len(members) == 1 and grads[members[0]].is_contiguous()
    flat = grads[members[0]] if single else torch.cat([grads[n].reshape(-1) for n in members])
    with guarded(lambda: "all-reducing gradients"):
        work = dist.all_reduce(flat, group=group, async_op=True)
    wait_all([work], lambda: f"all-reducing gradients of {members[0]} and others")
    if single:
        return
    offset = 0
    for name in members:
        size = grads[name].numel()
        grads[name].copy_(flat[offset : offset + size].view_as(grads[name]))
        offset += size
