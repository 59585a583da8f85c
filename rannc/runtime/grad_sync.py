"""Allreduce each parameter's gradient among exactly the ranks that hold it (tied weights included).

The gradients a stage shares with its own replicas only (every rank of the set runs the same graph) can be
reduced while the step's last backward still runs (`OverlappedReduce`, like DDP's buckets); the rest (tied
weights held by several stages) are reduced after the backward (`GradSync.allreduce`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from .dist import GroupCache
from .failures import guarded, wait_all

# Gradients at least this large are reduced in place; smaller ones are packed into buckets of up to this many
# bytes (one collective each), so syncing never holds more than one bucket of extra memory (an overlapped
# bucket's gradients are freed once copied into it, and the results are views of it).
BUCKET_BYTES = 4 * 2**20
GRADIENTS = "gradients"  # gradients have process groups of their own (GroupCache purpose)


def exclusive_item(items: list[Any], k: int) -> bool:
    """Whether `items[k]` is a tensor that nothing but the list holds: no other Python reference, no other tensor
    on its storage, or, for a view (a Linear's weight gradient is the transpose of a matmul's output), a view of
    all of a base that nothing else holds either. A fresh gradient from `torch.autograd.grad` usually is; one
    handed on unchanged (the output gradient itself, or one shared with another result) or kept by a user's hook
    is not. Autograd's AccumulateGrad makes the same check before keeping a gradient instead of copying it."""
    # (no local name for items[k] here: _holders counts the references as its baselines were counted)
    if not isinstance(items[k], torch.Tensor) or items[k].layout != torch.strided or items[k].requires_grad:
        return False
    if not items[k]._is_view():
        return _holders(items, k) == _SOLE_HOLDERS
    return _whole_storage(items[k]) and _holders(items, k) == _SOLE_VIEW_HOLDERS


def _whole_storage(tensor: torch.Tensor) -> bool:
    return tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()


def _holders(items: list[Any], k: int) -> tuple[int, int, int]:
    """References to the Python object `items[k]`, to its storage and to the Python object of its base (0 for
    a tensor that is not a view), as counted from here."""
    item = items[k]
    base = sys.getrefcount(item._base) if item._is_view() else 0
    return sys.getrefcount(item), torch._C._storage_Use_Count(item.untyped_storage()._cdata), base


# _holders of a tensor, and of a view of all of a base, held by one list only, on this interpreter and torch
# (measured, not assumed)
_SOLE_HOLDERS = _holders([torch.empty(1)], 0)
_SOLE_VIEW_HOLDERS = _holders([torch.empty(2, 1).t()], 0)


class GradSync:
    """`groups` lists (rank set, parameter names) for every rank set; this rank reduces the ones it is in."""

    def __init__(self, groups: list[tuple[tuple[int, ...], list[str]]], cache: GroupCache, rank: int) -> None:
        cache.create_all([ranks for ranks, _ in groups if len(ranks) > 1], GRADIENTS)
        self.ranks_of = {ranks: names for ranks, names in sorted(groups) if rank in ranks and len(ranks) > 1}
        self.mine = [(cache.get(ranks, GRADIENTS), names) for ranks, names in self.ranks_of.items()]
        self.cache = cache

    def allreduce(self, grads: dict[str, torch.Tensor], skip: frozenset[str] = frozenset()) -> None:
        """Sum `grads` in place over each parameter's rank set: large contiguous gradients directly, the others
        in buckets of at most BUCKET_BYTES per rank set and dtype (the same order on every rank). Names in
        `skip` (reduced already, by an OverlappedReduce) are left out."""
        for group, names in self.mine:
            by_dtype: dict[torch.dtype, list[str]] = {}
            for name in names:
                if name not in skip:
                    by_dtype.setdefault(grads[name].dtype, []).append(name)
            for dtype in sorted(by_dtype, key=str):
                for members in _buckets(by_dtype[dtype], grads):
                    _reduce(members, grads, group)

    def overlapped(
        self, replica_ranks: tuple[int, ...], params: dict[str, torch.Tensor]
    ) -> tuple[dist.ProcessGroup, list[list[str]]] | None:
        """The process group of exactly `replica_ranks` (a stage's replicas) and its parameters in buckets,
        last parameters first (backward produces their gradients first); None when that set holds nothing."""
        ranks = tuple(sorted(replica_ranks))
        names = set(self.ranks_of.get(ranks, ()))
        if not names:
            return None
        ordered = [name for name in reversed(params) if name in names]
        return self.cache.get(ranks, GRADIENTS), _buckets(ordered, params)


class OverlappedReduce:
    """One step's allreduce of a stage's replica-shared gradients, started during its last backward.

    `ready(name, grad)` is called (from a gradient hook) when the last backward has produced `name`'s
    gradient; added to the earlier microbatches' sum in `accumulated`, the gradient is final. A bucket is
    launched once all its gradients are final and every bucket before it has been launched, so every replica
    issues the same collectives in the same order whatever order its hooks fire in. `finish()` launches the
    rest (parameters the backward did not reach: their accumulated sum, or zeros), waits and returns the
    summed gradients (views into the bucket buffers). The output gradient's scale is applied after the sum,
    so it must be the same on every replica (it is when every rank calls backward on the loss).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        buckets: list[list[str]],
        params: dict[str, torch.Tensor],
        accumulated: dict[str, torch.Tensor],
    ) -> None:
        self.group = group
        self.buckets = buckets
        self.params = params
        self.accumulated = accumulated
        self.names = frozenset(name for bucket in buckets for name in bucket)
        self.bucket_of = {name: k for k, bucket in enumerate(buckets) for name in bucket}
        self.missing = [len(bucket) for bucket in buckets]
        self.finals: dict[str, torch.Tensor] = {}
        self.launched: list[tuple[torch.Tensor, Any]] = []  # (flat buffer, work) per bucket, in bucket order

    def ready(self, name: str, grad: torch.Tensor) -> None:
        if name in self.finals:  # a hook fires once per backward; a second backward pass is not ours
            return
        total = self.accumulated.pop(name, None)  # owned by the call: safe to add to in place
        self._done(name, grad.detach().clone() if total is None else total.add_(grad))

    def final(self, name: str) -> None:
        """`name` gets no more gradient in this step (a model chunk whose backwards are over): its accumulated
        sum (or zeros) is final."""
        if name in self.finals:
            return
        total = self.accumulated.pop(name, None)
        self._done(name, torch.zeros_like(self.params[name]) if total is None else total)

    def _done(self, name: str, grad: torch.Tensor) -> None:
        self.finals[name] = grad
        k = self.bucket_of[name]
        self.missing[k] -= 1
        while len(self.launched) < len(self.buckets) and self.missing[len(self.launched)] == 0:
            self._launch(len(self.launched))

    def finish(self) -> dict[str, torch.Tensor]:
        for k in range(len(self.launched), len(self.buckets)):
            for name in self.buckets[k]:
                if name not in self.finals:
                    total = self.accumulated.pop(name, None)
                    self.finals[name] = torch.zeros_like(self.params[name]) if total is None else total
            self._launch(k)
        wait_all([work for _, work in self.launched], lambda: "all-reducing gradients during backward")
        reduced: dict[str, torch.Tensor] = {}
        for bucket, (flat, _) in zip(self.buckets, self.launched):
            offset = 0
            for name in bucket:
                size = self.params[name].numel()
                reduced[name] = flat[offset : offset + size].view(self.params[name].shape)
                offset += size
        return reduced

    def _launch(self, k: int) -> None:
        members = self.buckets[k]
        grads = [self.finals.pop(name) for name in members]
        flat = grads[0].reshape(-1) if len(grads) == 1 else torch.cat([g.reshape(-1) for g in grads])
        with guarded(lambda: "all-reducing gradients during backward"):
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.launched.append((flat, work))


def _buckets(names: list[str], grads: dict[str, torch.Tensor]) -> list[list[str]]:
    """Consecutive runs of names of one dtype whose gradients together stay within BUCKET_BYTES; a large
    contiguous gradient is a bucket of its own (reduced in place)."""
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
        if current and (size + nbytes > BUCKET_BYTES or grads[current[0]].dtype != grads[name].dtype):
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
