"""Run the captured graph once on an example of the call (the capture batch) and record every value and each op's
FLOPs."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .export import CapturedGraph
from .inputs import FlatCall, tile_rows
from .modes import exact_precision


def placeholder_state(model: torch.nn.Module, captured: CapturedGraph) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by the captured graph's placeholder names."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return {ph: named[fqn] for ph, fqn in (captured.params | captured.buffers).items()}


def example_leaves(model: torch.nn.Module, captured: CapturedGraph, call: FlatCall, rows: int) -> list[Any]:
    """The call's leaves cut (or cycled) to `rows` samples on the model's device, sequences at their longest (as
    planned): what the graph runs once to record its values and FLOPs."""
    home = next((t.device for t in model.parameters()), torch.device("cpu"))
    leaves = [
        (tile_rows(x[:rows].to(home), rows) if x.dim() > 0 else x.to(home))
        if isinstance(x, torch.Tensor)
        else x
        for x in call.leaves
    ]
    for d in captured.dynamic_dims:  # values cycled along the sequence up to its longest
        leaves[d.leaf] = tile_rows(leaves[d.leaf], d.max_size, d.dim)
    return leaves


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, count_flops: bool, keep_values: bool = True) -> None:
        # Without keep_values each value is freed after its last use (a 96-layer graph's values, even as meta
        # tensors, take tens of MiB).
        super().__init__(gm, garbage_collect_values=not keep_values)
        self.values: dict[str, Any] = {}
        self.flops: dict[str, float] = {}
        self.count_flops = count_flops
        self.keep_values = keep_values

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "call_function" and self.count_flops:
            counter = FlopCounterMode(display=False)
            with counter:
                result = super().run_node(node)
            self.flops[node.name] = float(counter.get_total_flops())
        else:
            result = super().run_node(node)
        if node.op != "output" and self.keep_values:
            self.values[node.name] = result
        return result


def record_values(
    captured: CapturedGraph, state: dict[str, torch.Tensor], user_leaves: list[Any], count_flops: bool = True
) -> tuple[dict[str, Any], dict[str, float]]:
    """Values of every node at the capture batch, and forward FLOPs per op (deterministic cost hints)."""
    recorder = _Recorder(captured.gm, count_flops)
    _run(recorder, captured, state, user_leaves)
    return recorder.values, recorder.flops


def record_flops(
    captured: CapturedGraph, state: dict[str, torch.Tensor], user_leaves: list[Any]
) -> dict[str, float]:
    """Forward FLOPs per op at the capture batch, holding each value only until its last use."""
    recorder = _Recorder(captured.gm, count_flops=True, keep_values=False)
    _run(recorder, captured, state, user_leaves)
    return recorder.flops


def _run(
    recorder: _Recorder, captured: CapturedGraph, state: dict[str, torch.Tensor], user_leaves: list[Any]
) -> None:
    inputs: list[Any] = []
    leaf_of = dict(zip(captured.user_inputs, user_leaves))
    for node in captured.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in state:
            inputs.append(state[node.name])
        elif node.name in captured.constants:
            inputs.append(captured.constants[node.name])
        else:
            inputs.append(leaf_of[node.name])
    with torch.no_grad(), exact_precision():
        recorder.run(*inputs)


def shape_flops(captured: CapturedGraph, rows: int) -> dict[str, float] | None:
    """Forward FLOPs per op at a batch of `rows` (sequences at their longest), as `record_flops` counts them, from
    the shapes the capture recorded: only the ops FlopCounterMode can count (those it has a formula for and the
    composite ones it decomposes into them) run, each alone on meta tensors of its inputs' shapes, instead of the
    whole graph. None when the graph holds an op this cannot treat alike (a higher-order op): use record_flops."""
    bindings = {**captured.planning_sizes(), captured.batch_symbol: rows}
    flops: dict[str, float] = {}
    known: dict[
        Any, float
    ] = {}  # (op, its inputs' shapes and other arguments) -> FLOPs: repeated layers run once
    with torch.no_grad(), exact_precision():
        for node in captured.gm.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if not isinstance(target, torch._ops.OpOverload):
                if target is operator.getitem or getattr(target, "__module__", "").startswith("rannc."):
                    flops[node.name] = 0.0  # indexing a result, rannc's own wrappers of aten ops (dropout)
                    continue
                return None
            counted = (
                target._overloadpacket in flop_registry
                or torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd")
            )
            if not counted:
                flops[node.name] = 0.0
                continue
            args, kwargs = pytree.tree_map(lambda a: _example_of(a, bindings), (node.args, node.kwargs))
            key = (target, repr(pytree.tree_map(_describe, (args, kwargs))))
            if key not in known:
                counter = FlopCounterMode(display=False)
                with counter:
                    target(*args, **kwargs)
                known[key] = float(counter.get_total_flops())
            flops[node.name] = known[key]
    return flops


def _describe(value: Any) -> Any:
    """What an op's FLOPs may depend on in an argument: a tensor's shape, strides and dtype, any other value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype)
    return value


def _example_of(value: Any, bindings: dict[Any, int]) -> Any:
    """A node argument as a value: a meta tensor of its recorded shape, strides and dtype at `bindings`, a size
    as an int; anything else as it is."""
    if not isinstance(value, fx.Node):
        return value
    val = value.meta.get("val")
    if isinstance(val, torch.SymInt):
        return int(val.node.expr.xreplace(bindings))
    if isinstance(val, torch.Tensor):

        def concrete(size: Any) -> int:
            return int(size.node.expr.xreplace(bindings)) if isinstance(size, torch.SymInt) else int(size)

        shape = [concrete(x) for x in val.shape]
        stride = [concrete(x) for x in val.stride()]
        return torch.empty_strided(shape, stride, dtype=val.dtype, device="meta")
    raise ValueError(f"{value.name} has no recorded value")
