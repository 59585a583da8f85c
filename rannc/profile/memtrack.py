"""Peak tensor memory of a region of code on any device: live storages counted through the dispatcher.

CPU allocators keep no statistics, and `torch.distributed._tools.mem_tracker.MemTracker` cannot follow a
pipeline stage (it refuses modules called once per microbatch and hooks that clash with autograd.grad), so
this tracker counts what it needs only: every storage an op returns while the region runs, released when
its last reference dies, plus the storages of tensors that exist before (parameters, gradients, optimizer
state) that the caller names.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakMemory", "held_tensors"]


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory(existing) as peak: step()`; then `peak.peak_bytes` is the most bytes live at once.

    `existing`: tensors alive before the region (counted from the start, and until they die). Storages are
    counted once however many views share them; meta tensors count their logical bytes, so the same code
    sizes a model that was never allocated. `size_of(tensor)` may price a storage otherwise (e.g. in another
    dtype). Ops on other threads are not seen (CPU autograd runs the backward on the calling thread, so a
    training step is).
    """

    def __init__(
        self, existing: Iterable[torch.Tensor] = (), size_of: Callable[[torch.Tensor], float] | None = None
    ) -> None:
        super().__init__()
        self._size_of = size_of
        self._live: dict[int, float] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.current_bytes = 0.0
        self.peak_bytes = 0.0
        for tensor in existing:
            self._track(tensor)
        self.start_bytes = self.current_bytes

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = float(storage.nbytes()) if self._size_of is None else float(self._size_of(tensor))
        self._live[key] = nbytes
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._release(key))
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _release(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


def held_tensors(*owners: torch.nn.Module | torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters, their gradients and buffers of modules, and the state tensors of optimizers."""
    tensors: list[torch.Tensor] = []
    for owner in owners:
        if isinstance(owner, torch.nn.Module):
            for param in owner.parameters():
                tensors.append(param)
                if param.grad is not None:
                    tensors.append(param.grad)
            tensors.extend(owner.buffers())
        else:
            for state in owner.state.values():
                tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors
