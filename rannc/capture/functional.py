"""torch.export's first graph is used as it is when it is already functional; only other graphs are retraced.

`export()` returns the training IR: aten ops before autograd's decompositions (`aten.linear`, `aten.dropout`),
functional for most models. `run_decompositions` retraces it into the functional aten IR rannc splits and runs,
and costs more than the export itself (14 of GPT-3 175B's 23 s of capture, and a tenth of a GiB of the
planning process). It is needed only where the training IR is not functional: in-place ops (T5's decoder-input
shift, a buffer update), batch norm (updates its running statistics in place without saying so in its schema),
higher-order ops (autocast and no_grad regions, checkpointed code) and mutated buffers or inputs.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind

aten = torch.ops.aten

# Ops whose schemas declare no mutation although they update running statistics in place.
_HIDDEN_MUTATIONS = {
    aten.batch_norm,
    aten.native_batch_norm,
    aten.instance_norm,
    aten._batch_norm_impl_index,
    aten.cudnn_batch_norm,
    aten.miopen_batch_norm,
}
# Python-level callables export records for symbolic shape arithmetic and tuple outputs.
_PYTHON_MODULES = {"_operator", "operator", "math", "builtins"}


def is_functional(program: ExportedProgram) -> bool:
    """Whether the exported program's graph is functional aten: no mutation, hidden or declared, and no
    higher-order op, with only user outputs."""
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in program.graph_signature.output_specs):
        return False
    for node in program.graph_module.graph.nodes:
        if node.op == "get_attr" and isinstance(
            getattr(program.graph_module, node.target, None), fx.GraphModule
        ):
            return False
        if node.op == "call_function" and not _functional_call(node.target):
            return False
    return True


def _functional_call(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and target.overloadpacket not in _HIDDEN_MUTATIONS
    if isinstance(target, torch._ops.HigherOrderOperator):
        return False
    return (
        getattr(target, "__module__", None) in _PYTHON_MODULES
        or target is operator.getitem
        or (getattr(target, "__name__", "").startswith("sym_"))
    )


def dropout_as_native(gm: fx.GraphModule) -> None:
    """Write each `aten.dropout` as `aten.native_dropout(...)[0]` (a clone where p = 0 or not training), as the
    retrace does; the caller recompiles `gm`.

    The same kernel then runs on every device (the composite dropout takes another path off CUDA), the cost
    model prices that kernel and its boolean mask, and train/eval switching (`modes`) finds one op to switch.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.dropout.default:
            continue
        x, p, train = node.args
        with gm.graph.inserting_before(node):
            if p == 0 or not train:  # at::dropout is then the identity: no mask to make or keep
                replacement = gm.graph.call_function(aten.clone.default, (x,))
            else:
                native = gm.graph.call_function(aten.native_dropout.default, (x, p, train))
                replacement = gm.graph.call_function(operator.getitem, (native, 0))
                value = node.meta["val"]
                with value.fake_mode:
                    mask = torch.empty_like(value, dtype=torch.bool)
                native.meta = {**node.meta, "val": (value, mask)}
                native.meta.pop("tensor_meta", None)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
