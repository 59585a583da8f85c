"""Static description of what moves between stages and back to the user: routes and output specs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Route:
    """A batch tensor produced by one stage and consumed by later ones (maybe skipping stages)."""

    value: str
    index: int  # position in the global route list, used for message tags
    producer: int
    consumers: tuple[int, ...]
    batch_dim: int
    shape: tuple[Any, ...]
    dtype: torch.dtype
    carries_grad: bool
    dim_order: tuple[int, ...] = ()

    def packed_shape(self, shape: list[int]) -> list[int]:
        """Shape of the wire buffer: the value's dims in memory order."""
        return [shape[d] for d in self.dim_order] if self.dim_order else shape

    def pack(self, piece: torch.Tensor) -> torch.Tensor:
        return piece.permute(*self.dim_order).contiguous() if self.dim_order else piece.contiguous()

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if not self.dim_order:
            return packed
        return packed.permute(*[self.dim_order.index(d) for d in range(len(self.dim_order))])

    @property
    def packed_batch_dim(self) -> int:
        return self.dim_order.index(self.batch_dim) if self.dim_order else self.batch_dim


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """How one flat user output is assembled on every rank.

    kind: "rows" (batch-shaped, each rank gets its rows), "mean" (0-dim, weighted by samples),
    "whole" (does not depend on the batch; taken from one rank), "constant", "input" (the call's leaf
    number `leaf` returned unchanged: each rank returns its own argument, as the unwrapped model does).
    Only specs with a `node` come out of the pipeline.
    """

    node: str | None
    kind: str
    producer: int | None
    batch_dim: int | None = None
    shape: tuple[Any, ...] = ()
    dtype: torch.dtype | None = None
    constant: Any = None
    leaf: int | None = None
