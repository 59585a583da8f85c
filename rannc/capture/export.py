"""Capture an nn.Module as a functional aten graph with torch.export, with a symbolic batch dimension."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim, export
from torch.export.graph_signature import InputKind, OutputKind
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import CaptureError, InputError
from .failure_site import explain as explain_failure_site
from .functional import dropout_as_native, is_functional
from .hugging_face import without_generation_cache
from .inputs import DynamicDim, FlatCall, dynamic_shapes_for, tile_rows
from .modes import autocast_state, make_mode_switchable
from .opaque import opaque_submodules

logger = logging.getLogger(__name__)

# Ops that only check metadata; they have no outputs the graph needs and would pin values to stages.
_ASSERTION_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_async.msg,
}


@dataclasses.dataclass
class CapturedGraph:
    """The exported graph plus what each placeholder and output means for the user's module."""

    gm: fx.GraphModule
    params: dict[str, str]  # placeholder name -> canonical parameter FQN
    buffers: dict[str, str]  # placeholder name -> buffer FQN
    constants: dict[str, torch.Tensor]  # placeholder name -> lifted constant tensor
    user_inputs: list[str]  # placeholder names, one per flattened call leaf (tensor or not)
    call_spec: Any  # pytree spec of the flattened (args, kwargs)
    call_constants: list[Any]  # the non-tensor leaves baked into the graph
    out_spec: Any  # pytree spec of the user output
    user_outputs: list[str | None]  # node name per flat user output (None: a constant output)
    user_output_constants: list[Any]
    buffer_mutations: dict[str, str]  # node name -> buffer FQN to write back
    batch_symbol: Any  # sympy symbol of the batch dimension
    aliases: dict[str, list[str]]  # canonical parameter/buffer FQN -> every FQN of that tensor
    graph_hash: str
    training: bool
    autocast: tuple[tuple[str, bool, str], ...] = ()
    input_shapes: list[tuple[tuple[int, ...], torch.dtype] | None] = dataclasses.field(default_factory=list)
    dynamic_dims: list[DynamicDim] = dataclasses.field(
        default_factory=list
    )  # with max_seq_len: sequence dims

    def planning_sizes(self) -> dict[Any, int]:
        """The size every non-batch symbol is planned (profiled, priced) at: the largest it may take."""
        return {d.symbol: d.max_size for d in self.dynamic_dims}

    def placeholder_nodes(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.gm.graph.nodes if n.op == "placeholder"}


def _canonical_names(model: torch.nn.Module) -> tuple[dict[int, str], dict[str, list[str]]]:
    """Map tensor identity -> first FQN, and first FQN -> all FQNs (tied weights share one tensor)."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        key = id(tensor)
        if key not in first:
            first[key] = name
            aliases[name] = []
        aliases[first[key]].append(name)
    return first, aliases


def capture(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch_size: int = 2,
    max_seq_len: int = 0,
    opaque_modules: Sequence[str] = (),
) -> CapturedGraph:
    """Export `model` on the first `batch_size` samples of a call, with a dynamic batch dimension, and with
    `max_seq_len` > 0 a dynamic dim 1 (sequence) of the tensor inputs wherever the model does not fix it;
    submodules marked opaque or named in `opaque_modules` are captured as one operation each (`opaque.py`)."""
    call = FlatCall.of(args, kwargs)
    local = call.batch_size()
    home = next((t.device for t in model.parameters()), torch.device("cpu"))  # capture where the model lives
    leaves = [
        tile_rows(leaf[: min(local, batch_size)].to(home), batch_size)
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
        else (leaf.to(home) if isinstance(leaf, torch.Tensor) else leaf)
        for leaf in call.leaves
    ]
    small_args, small_kwargs = call.unflatten(leaves)
    sequence = Dim.AUTO if max_seq_len > 0 else None  # the model's code decides which dims stay dynamic
    dynamic_shapes = dynamic_shapes_for(
        small_args, small_kwargs, Dim("batch", min=1), model.forward, sequence
    )
    on_meta = home.type == "meta" or any(isinstance(v, torch.Tensor) and v.is_meta for v in leaves)
    # only meta needs it, and a mode costs every torch call
    indexing = _IndexingAsOnDevices() if on_meta else contextlib.nullcontext()
    started = time.perf_counter()
    try:
        # The math attention backend gives the same graph on every device (fused kernels return other
        # strides, which exported views then depend on); training still runs the fastest kernel.
        with (
            sdpa_kernel([SDPBackend.MATH]),
            _without_stack_traces(),
            indexing,
            without_generation_cache(model),
            warnings.catch_warnings(),
            opaque_submodules(model, opaque_modules),
        ):
            # torch's own export code trips its pytree deprecation (nothing a user can act on)
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning
            )
            program = export(
                model,
                tuple(small_args),
                dict(small_kwargs),
                dynamic_shapes=dynamic_shapes,
                strict=False,
            )
            # autocast acts below the training IR: only the retrace records its casts
            if _autocast_on() or not is_functional(program):
                program = program.run_decompositions({})
    except CaptureError:  # rannc's own (e.g. an opaque function's contract): already says what to do
        raise
    except Exception as exc:  # torch raises many types; all mean "cannot capture"
        raise CaptureError(_explain_export_failure(exc, model)) from exc
    logger.info("captured %s with torch.export in %.2fs", type(model).__name__, time.perf_counter() - started)
    captured = _from_program(model, program, call)
    if max_seq_len > 0:
        captured.dynamic_dims = _sequence_dims(captured, call, max_seq_len)
        for d in captured.dynamic_dims:  # per-sample shapes as planned: the longest sequence
            shape, dtype = captured.input_shapes[d.leaf]
            captured.input_shapes[d.leaf] = (shape[: d.dim - 1] + (d.max_size,) + shape[d.dim :], dtype)
    return captured


@contextlib.contextmanager
def _without_stack_traces() -> Iterator[None]:
    """Trace without recording each node's Python stack (`node.meta["stack_trace"]`, which rannc never reads and
    which neither the generated code nor the graph hash contains): a quarter of the capture of a large model went
    into extracting and symbolising them."""
    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


def _sequence_dims(captured: CapturedGraph, call: FlatCall, max_seq_len: int) -> list[DynamicDim]:
    """The inputs' dims 1 that stayed symbolic (the model did not fix them), each accepting up to max_seq_len."""
    placeholders = captured.placeholder_nodes()
    dims = []
    for leaf, name in enumerate(captured.user_inputs):
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2 or not isinstance(val.shape[1], torch.SymInt):
            continue
        expr = val.shape[1].node.expr
        if expr.is_Symbol and expr != captured.batch_symbol:
            size = call.leaves[leaf].shape[1]
            if size > max_seq_len:
                raise InputError(
                    f"{call.paths[leaf]} has length {size} along dim 1, more than max_seq_len={max_seq_len}; "
                    "raise max_seq_len to the longest sequence the job will see"
                )
            dims.append(DynamicDim(leaf, 1, expr, max_seq_len))
    if not dims:
        logger.warning("max_seq_len is set but the model fixes dim 1 of every input: shapes stay fixed")
    return dims


class _IndexingAsOnDevices(torch.overrides.TorchFunctionMode):
    """Indexing a meta tensor records what it records on CPU and CUDA.

    There torch turns a number assigned into a tensor (`t[i] = 3`) or a list used as an index (`t[..., [-2]]`)
    into a tensor outside the dispatcher: a real constant, lifted into the graph and cloned there. On meta the
    number becomes a traced aten.scalar_tensor and the list a meta constant (not cloned). Without this, models
    that do either (T5's decoder-input shift, Falcon's fused query/key/value split) captured on meta
    (`rannc plan`) get another graph than the real job, which then refuses the plan. Making those constants CPU
    tensors here, as the real devices do, gives the same graph.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].device.type == "meta":
            target, index, *rest = args
            index = _cpu_list_indices(index)
            if rest and isinstance(rest[0], bool | int | float):
                rest[0] = _cpu_constant(rest[0], target.dtype)
            args = (target, index, *rest)
        return func(*args, **kwargs)


def _cpu_list_indices(index: Any) -> Any:
    """`index` with every (nested) list of whole numbers or of booleans (an advanced index) as the CPU int64 or
    bool tensor torch makes of it; lists holding anything else (slices, tensors: torch reads those as a tuple)
    are left alone."""
    if isinstance(index, tuple):
        return tuple(_cpu_list_indices(part) for part in index)
    if isinstance(index, list) and index:
        kinds = _leaf_types(index)
        if kinds in ({int}, {bool}):
            return _cpu_constant(index, torch.long if kinds == {int} else torch.bool)
    return index


def _cpu_constant(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of `value` made as CPU and CUDA indexing make it: outside the trace, then lifted into it
    (torch.tensor inside the trace would record a detach_ as well)."""
    with _disable_current_modes():
        tensor = torch.tensor(value, dtype=dtype, device="cpu")
    return torch.ops.aten.lift_fresh.default(tensor)


def _leaf_types(items: list[Any]) -> set[type]:
    """The exact types of the non-list values in a nested list."""
    found: set[type] = set()
    for item in items:
        found |= _leaf_types(item) if isinstance(item, list) else {type(item)}
    return found


def _explain_export_failure(exc: Exception, model: torch.nn.Module) -> str:
    text = str(exc)
    cache = re.search(r"<class 'transformers\.cache_utils\.(\w+)'> in output", text)
    if cache:  # rannc captures transformers models without their cache unless the call asks for one
        return (
            f"torch.export could not capture the model: it returns a transformers {cache.group(1)} (a key/value "
            "cache for generation), which a training graph cannot return. The call (or the model's code) passes "
            "use_cache=True: drop it (rannc trains Hugging Face models without a cache, as with use_cache=False)."
        )
    hint = (
        "rannc captures the model with torch.export (strict=False). Fix the model so that it exports: "
        "make data-dependent Python control flow a torch.cond or move it out of forward(), return tensors "
        "(or tuples/dicts/ModelOutputs of tensors), and keep dim 0 of every tensor input the batch dimension."
    )
    if "Constraints violated" in text or "specialized" in text:
        hint += (
            " The batch dimension was specialised to a constant: some code depends on the exact batch size."
        )
    site = explain_failure_site(exc, model)  # where, and how to mark that code opaque
    headline = f"torch.export could not capture the model: {type(exc).__name__}: {text}"
    return "\n".join(part for part in (headline, site, hint) if part)


def _from_program(model: torch.nn.Module, program: Any, call: FlatCall) -> CapturedGraph:
    gm: fx.GraphModule = program.graph_module
    signature = program.graph_signature
    identity, aliases = _canonical_names(model)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))

    params: dict[str, str] = {}
    buffers: dict[str, str] = {}
    constants: dict[str, torch.Tensor] = {}
    user_inputs: list[str] = []
    for spec in signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            params[name] = identity[id(state[spec.target])]
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = identity[id(state[spec.target])]
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            constants[name] = program.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind} for {name}")
    if len(user_inputs) != len(call.leaves):
        raise CaptureError(
            f"the exported graph has {len(user_inputs)} user inputs but the call has {len(call.leaves)} leaves"
        )

    user_outputs: list[str | None] = []
    user_output_constants: list[Any] = []
    mutations: dict[str, str] = {}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    for spec, value in zip(signature.output_specs, flat_outputs):
        if spec.kind == OutputKind.USER_OUTPUT and not isinstance(value, fx.Node) and value is not None:
            raise CaptureError(
                f"a model output is not a tensor but a Python {type(value).__name__} ({value!r}); return tensors "
                "only (a tensor, or tuples/lists/dicts/ModelOutputs of tensors): drop it from the outputs or "
                "return it as a tensor"
            )
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(value.name if isinstance(value, fx.Node) else None)
            user_output_constants.append(None if isinstance(value, fx.Node) else value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            mutations[value.name] = identity[id(state[spec.target])]
        else:
            raise CaptureError(
                f"the model's forward mutates {spec.target} in a way rannc cannot replay ({spec.kind}); "
                "avoid in-place updates of inputs or parameters inside forward()"
            )

    _copy_constants_where_used(gm)
    dropout_as_native(gm)
    if model.training:
        make_mode_switchable(gm, recompile=False)
    _drop_assertions(
        gm
    )  # recompiles the graph for all four (one code generation of a large graph takes seconds)
    batch_symbol = _batch_symbol(gm, user_inputs)
    return CapturedGraph(
        gm=gm,
        params=params,
        buffers=buffers,
        constants=constants,
        user_inputs=user_inputs,
        call_spec=call.spec,
        call_constants=call.constants(),
        out_spec=program.call_spec.out_spec,
        user_outputs=user_outputs,
        user_output_constants=user_output_constants,
        buffer_mutations=mutations,
        batch_symbol=batch_symbol,
        aliases=aliases,
        graph_hash=_graph_hash(gm, call),
        training=model.training,
        autocast=autocast_state(),
        input_shapes=[
            (tuple(leaf.shape[1:]), leaf.dtype) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else None
            for leaf in call.leaves
        ],
    )


def _drop_assertions(gm: fx.GraphModule) -> None:
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and node.target in _ASSERTION_OPS and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    _forget_erased_nodes(gm.graph)
    gm.recompile()


def _autocast_on() -> bool:
    return any(enabled for _, enabled, _ in autocast_state())


def _copy_constants_where_used(gm: fx.GraphModule) -> None:
    """Move each copy of a lifted constant to just before its first use.

    Where a constant made by indexing is copied depends on the device: on CPU and CUDA inside the indexing op
    (after its slices), on meta (made as CPU does, see `_IndexingAsOnDevices`) before it. One place for both
    keeps the graphs, and their hashes, the same.
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.lift_fresh_copy.default and node.users:
            min(node.users, key=order.__getitem__).prepend(node)


def _forget_erased_nodes(graph: fx.Graph) -> None:
    """Drop erased nodes from the graph's name table, which fx never prunes.

    run_decompositions traces every symbolic shape computation and erases most of them again (six of every
    seven nodes it made, for GPT-2), and dropping the assertions erases more; the table would keep every one
    alive with its fake tensor and metadata for as long as the captured graph lives (all of training). Their
    names stay reserved, so no later node can take one.
    """
    table = getattr(getattr(graph, "_graph_namespace", None), "_obj_to_name", None)
    if not isinstance(table, dict):
        return
    live = set(graph.nodes)
    for obj in [obj for obj in table if isinstance(obj, fx.Node) and obj not in live]:
        del table[obj]


def _batch_symbol(gm: fx.GraphModule, user_inputs: list[str]) -> Any:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                expr = val.shape[0].node.expr if isinstance(val.shape[0], torch.SymInt) else None
                if expr is not None and expr.is_Symbol:
                    return expr
    raise CaptureError(
        "no tensor input has a symbolic batch dimension after export; rannc needs dim 0 of the inputs to be "
        "the batch (the model may have specialised it, e.g. by asserting a fixed batch size)"
    )


def _graph_hash(gm: fx.GraphModule, call: FlatCall) -> str:
    digest = hashlib.sha256()
    canonical = _canonical_symbols(gm)
    # Device literals differ between a meta-device plan and the real run; the graph is the same.
    code = re.sub(r"device\(type='[a-z]+'(, index=\d+)?\)", "device(*)", gm.code)
    digest.update(canonical(code).encode())
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = tuple(canonical(str(s)) for s in val.shape)
            digest.update(f"{node.name}:{shape}:{val.dtype};".encode())
    digest.update(repr([type(c).__name__ + repr(c) for c in call.constants()]).encode())
    return digest.hexdigest()[:32]


def _canonical_symbols(gm: fx.GraphModule) -> Any:
    """Rename shape symbols in order of first appearance among the inputs: torch names an automatically
    dynamic dimension by a hash that differs between processes (Python's string hashing is salted per process),
    and the ranks, or a plan and its job, must agree on the hash of one graph."""
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        sizes = val.shape if isinstance(val, torch.Tensor) else [val] if isinstance(val, torch.SymInt) else []
        for size in sizes:
            if isinstance(size, torch.SymInt):
                for symbol in sorted(size.node.expr.free_symbols, key=str):
                    names.setdefault(str(symbol), f"S{len(names)}")

    def rename(text: str) -> str:
        return re.sub(r"\b[su]\d+\b", lambda m: names.get(m.group(0), m.group(0)), text)

    return rename


def retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """Make ops that create tensors (arange, zeros, ...) create them on `device`: the capture ran on the CPU
    (or on meta, for a model built there)."""
    changed = False
    for node in gm.graph.nodes:
        target = node.kwargs.get("device")
        if isinstance(target, torch.device) and target.type in ("cpu", "meta") and target != device:
            node.update_kwarg("device", device)
            changed = True
    if changed:
        gm.recompile()
