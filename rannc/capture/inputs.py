"""Flatten a call's (args, kwargs) into tensor leaves and constants, and slice/tile them along the batch dim."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import InputError


@dataclasses.dataclass(frozen=True)
class FlatCall:
    """A call's leaves in pytree order; tensors are the batch inputs, the rest are capture constants."""

    leaves: list[Any]
    spec: pytree.TreeSpec
    paths: list[str]  # where each leaf sits, e.g. "args[0]" or "kwargs['labels']"

    @staticmethod
    def of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> FlatCall:
        pairs, spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
        paths = [_describe(path) for path, _ in pairs]
        return FlatCall([leaf for _, leaf in pairs], spec, paths)

    def batch_size(self) -> int:
        sizes = {leaf.shape[0] for leaf in self.leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0}
        if not sizes:
            raise InputError(
                "the model was called without any tensor input with a batch dimension; "
                "pass the batch as tensors whose dim 0 is the sample index"
            )
        if len(sizes) > 1:
            raise InputError(
                f"tensor inputs disagree on the batch size (dim 0 sizes {sorted(sizes)}); "
                "every tensor argument must have the samples along dim 0"
            )
        return sizes.pop()

    def constants(self) -> list[Any]:
        """The non-tensor leaves, which the capture bakes into the graph."""
        return [leaf for leaf in self.leaves if not isinstance(leaf, torch.Tensor)]

    def unflatten(self, leaves: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return args, kwargs


def _describe(path: tuple[Any, ...]) -> str:
    text = pytree.keystr(path)
    if text.startswith("[0]"):
        return "args" + text[3:]
    if text.startswith("[1]"):
        return "kwargs" + text[3:]
    return text


def batch_rows(tensor: torch.Tensor, lo: int, hi: int, dim: int = 0) -> torch.Tensor:
    return tensor.narrow(dim, lo, hi - lo)


def sequence_sizes(leaves: list[Any], dims: list[DynamicDim]) -> dict[Any, int]:
    """The value of each dynamic dimension's symbol in a call with these leaves."""
    return {d.symbol: int(leaves[d.leaf].shape[d.dim]) for d in dims}


def concrete_shape(
    shape: tuple[Any, ...], symbol: Any, rows: int, sizes: Mapping[Any, int] | None = None
) -> list[int]:
    """Sizes of a value for `rows` samples (the batch symbol replaced by `rows`, other symbols such as a
    sequence length by their `sizes`)."""
    bindings = {**(sizes or {}), symbol: rows}
    out = []
    for size in shape:
        if isinstance(size, torch.SymInt):
            out.append(int(size.node.expr.subs(bindings)))
        else:
            out.append(int(size))
    return out


def symint_value(node_meta_val: Any, symbol: Any, rows: int, sizes: Mapping[Any, int] | None = None) -> int:
    """The value of a captured SymInt for `rows` samples (other symbols bound by `sizes`)."""
    return int(node_meta_val.node.expr.subs({**(sizes or {}), symbol: rows}))


@dataclasses.dataclass(frozen=True)
class DynamicDim:
    """A non-batch dimension of a call leaf that may change from call to call (a sequence length)."""

    leaf: int  # position in the flat call leaves
    dim: int
    symbol: Any  # its sympy symbol in the captured graph
    max_size: int  # the largest size accepted; plans are made for it


def tile_rows(tensor: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """`rows` samples made by cycling the samples of `tensor` along `dim` (real values, any batch size)."""
    have = tensor.shape[dim]
    if have == rows:
        return tensor
    index = torch.arange(rows, device=tensor.device) % have
    return tensor.index_select(dim, index)


def with_memory_order(tensor: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The same values laid out so that dims go outermost-to-innermost in `order` (as the producer had them)."""
    if not order or list(order) == list(range(tensor.dim())):
        return tensor.contiguous()
    inverse = [order.index(d) for d in range(len(order))]
    return tensor.permute(*order).contiguous().permute(*inverse)


def dynamic_shapes_for(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: Any,
    forward: Callable[..., Any] | None = None,
    sequence: Any = None,
) -> tuple[Any, ...] | dict[str, Any]:
    """torch.export dynamic_shapes marking dim 0 of every tensor input (of rank >= 1) as the batch, and with
    `sequence` (e.g. Dim.AUTO) dim 1 of every tensor input of rank >= 2.

    With `forward` (the model's bound forward), the specs are keyed by its parameter names, which is what
    torch.export needs when forward takes ``*args`` or ``**kwargs`` (their specs nest under that name).
    """

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 and sequence is not None:
                return {0: batch, 1: sequence}
            return {0: batch} if value.dim() > 0 else None
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value) if not hasattr(value, "_fields") else None
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    if forward is not None:
        try:
            parameters = inspect.signature(forward).parameters
            bound = inspect.signature(forward).bind(*args, **kwargs)
        except (TypeError, ValueError):  # no signature, or one the call does not fit: export will say so
            pass
        else:
            specs: dict[str, Any] = {}
            for name, value in bound.arguments.items():
                kind = parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    specs[name] = tuple(spec(v) for v in value)
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    # torch.export (2.13) cannot take dynamic shapes of tensors passed through **kwargs
                    # ("Must provide a tree_name"); say how to fix the model instead of its assertion.
                    raise InputError(
                        f"forward() receives {sorted(value)} through **{name}; torch.export cannot mark the batch "
                        f"dimension of tensors passed that way. Give forward() named parameters "
                        f"(def forward(self, {', '.join(value)}): ...) and call it with those names"
                    )
                else:
                    specs[name] = spec(value)
            return specs
    return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())
