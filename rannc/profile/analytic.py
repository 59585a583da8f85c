"""Estimate a block's forward/backward time and saved activations from FLOPs and bytes on meta tensors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from ..capture import CapturedGraph
from ..capture.modes import exact_precision
from ..graph.analysis import GraphAnalysis
from ..graph.stage import InputKind, StageGraph, build_stage
from ..plan.types import BlockProfile
from ..split_backward import input_grads
from .devices import DeviceProfile
from .measure import BlockRunner
from .memtrack import PeakMemory

__all__ = ["BlockEstimate", "OpCost", "analytic_block_profiles", "block_meta_inputs", "block_signature"]
__all__ += ["estimate_block", "estimate_runner"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten
META = torch.device("meta")
_ITEM = {"float32": 4, "tf32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_KEY = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NO_TRAFFIC = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default}
_NO_TRAFFIC |= {aten.new_empty_strided.default, aten.empty_like.default, aten._unsafe_view.default}
_GATHERS = {aten.embedding.default, aten.index_select.default, aten.gather.default, aten.index.Tensor}
# Matmuls priced by the device's shape table (operands: (a, b), or (bias, a, b) for those _WITH_BIAS).
_MATMULS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm}
_WITH_BIAS = {aten.addmm, aten.baddbmm}
_SKIP = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, torch.ops.prim.device.default}
_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One kernel: FLOPs, bytes read + written, and its roofline seconds (overhead included)."""

    op: str
    phase: str  # "fwd" | "bwd"
    flops: float
    bytes: float
    time: float
    shape_factor: float = (
        1.0  # the device's measured fraction of peak for this matmul's shape (1: not a matmul)
    )


@dataclasses.dataclass(frozen=True)
class BlockEstimate:
    """Seconds and saved-activation bytes of one microbatch through a block, with the per-op breakdown."""

    fwd_time: float
    bwd_time: float
    activation_bytes: float
    ops: tuple[OpCost, ...]
    # Most bytes live at once beyond the inputs and the tensors saved for backward: temporaries, incoming and
    # outgoing gradients and this microbatch's parameter gradients (the runtime accumulates them afterwards).
    workspace_bytes: float = 0.0
    # The backward split as a zero-bubble stage runs it: seconds of its parameter-gradient (W) pass, and the
    # gradients its input-gradient (I) pass keeps for W.
    bwd_weight_time: float = 0.0
    deferred_grad_bytes: float = 0.0

    def total(self, field: str, phase: str) -> float:
        """Sum of `field` ("flops", "bytes", "time") over the ops of `phase` ("fwd", "bwd")."""
        return sum(getattr(op, field) for op in self.ops if op.phase == phase)


class _Costs(TorchDispatchMode):
    """Records each aten op's FLOPs (FlopCounterMode's formulas) and bytes moved, and prices it."""

    def __init__(self, profile: DeviceProfile, dtype: str | None) -> None:
        super().__init__()
        self.profile, self.dtype = profile, dtype
        self.phase = "fwd"
        self.ops: list[OpCost] = []

    def item(self, tensor: torch.Tensor) -> float:
        """Bytes per element, floating tensors counted in the dtype override if there is one."""
        if self.dtype is not None and tensor.is_floating_point():
            return float(_ITEM[self.dtype])
        return float(tensor.element_size())

    def nbytes(self, tensor: torch.Tensor) -> float:
        """Bytes a kernel touches: the memory spanned (an expanded tensor is read once)."""
        if tensor.numel() == 0:
            return 0.0
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(tensor.shape, tensor.stride()))
        return min(tensor.numel(), span) * self.item(tensor)

    def record(
        self,
        op: str,
        flops: float,
        nbytes: float,
        like: Sequence[Any],
        elements: float = 0.0,
        shape_factor: float = 1.0,
    ) -> None:
        if flops == 0 and nbytes == 0:
            return
        floating = (t.dtype for t in like if _is_tensor(t) and t.is_floating_point())
        key = self.dtype or _DTYPE_KEY.get(next(floating, torch.float32), "float32")
        seconds = max(flops / (self.profile.flop_rate(key) * shape_factor), nbytes / self.profile.byte_rate())
        rate = self.profile.elementwise_rate.get(op)
        if rate:  # arithmetic-bound elementwise op on this device (measured)
            seconds = max(seconds, elements / rate)
        self.ops.append(
            OpCost(op, self.phase, flops, nbytes, seconds + self.profile.op_overhead, shape_factor)
        )

    def shape_factor(self, packet: Any, args: Any) -> float:
        """The device's measured fraction of peak for a matmul's (rows, reduction, columns); 1 for other ops."""
        if packet not in _MATMULS or not self.profile.matmul_shapes:
            return 1.0
        a, b = (args[1], args[2]) if packet in _WITH_BIAS else (args[0], args[1])
        if not (_is_tensor(a) and _is_tensor(b)) or a.dim() < 2 or b.dim() < 2:
            return 1.0
        rows = a.numel() // a.shape[-1]  # a batched matmul counts as one of all its rows
        return self.profile.matmul_shape_factor(rows, a.shape[-1], b.shape[-1])

    def traffic(self, func: Any, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
        """Bytes read + written: 0 for views and allocations; gathers read only the rows they copy."""
        if func in _NO_TRAFFIC or func.is_view:
            return 0.0
        if func in _GATHERS:
            indices = [t for t in ins if not t.is_floating_point()]
            return sum(map(self.nbytes, indices)) + 2 * sum(map(self.nbytes, outs))
        in_keys = {_storage_key(t) for t in ins}
        fresh = [t for t in outs if func._schema.is_mutable or _storage_key(t) not in in_keys]
        if outs and not fresh:  # returns an alias of an input
            return 0.0
        return sum(map(self.nbytes, ins)) + sum(map(self.nbytes, fresh))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _SKIP:
            return func(*args, **kwargs)
        packet = func._overloadpacket
        if packet not in flop_registry:  # as FlopCounterMode does: count the parts of composite ops
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if _is_tensor(t)]
        outs = [t for t in pytree.tree_leaves(out) if _is_tensor(t)]
        elements = float(sum(t.numel() for t in outs))
        factor = self.shape_factor(packet, args) if flops else 1.0
        self.record(str(packet), flops, self.traffic(func, ins, outs), ins + outs, elements, factor)
        return out


class _FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention priced as one flash-attention kernel each way (no N^2 intermediates)."""

    @staticmethod
    def forward(ctx: Any, costs: _Costs, like: Any, q: Any, k: Any, v: Any, mask: Any) -> Any:  # type: ignore[override]
        out = like if _is_tensor(like) else q.new_empty((*q.shape[:-1], v.shape[-1]))  # allocations are free
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        moved = [q, k, v, out, lse] + ([mask] if _is_tensor(mask) else [])
        costs.record("fused_attention", sdpa_flop_count(*_heads(q, k, v)), sum(map(costs.nbytes, moved)), [q])
        ctx.costs, ctx.mask = costs, mask
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        costs: _Costs = ctx.costs
        grads = [torch.empty_like(t) for t in (q, k, v)]
        moved = [grad_out, q, k, v, out, lse, *grads] + ([ctx.mask] if _is_tensor(ctx.mask) else [])
        q_shape, k_shape, v_shape, grad_shape = _heads(q, k, v, grad_out)
        flops = sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)
        costs.record("fused_attention_backward", flops, sum(map(costs.nbytes, moved)), [q])
        return (None, None, *grads, None)


def _heads(q: torch.Tensor, *others: torch.Tensor) -> list[tuple[int, ...]]:
    """(batch, heads, seq, dim) shapes, all with the query's heads (as grouped-query attention repeats them)."""

    def shape(t: torch.Tensor) -> tuple[int, ...]:
        lead = 1
        for size in q.shape[:-3]:
            lead *= int(size)
        heads = int(q.shape[-3]) if q.dim() >= 3 else 1
        return (lead, heads, int(t.shape[-2]), int(t.shape[-1]))

    return [shape(t) for t in (q, *others)]


class _MetaRunner(fx.Interpreter):
    """Runs a block graph on meta tensors: tensor factories go to meta; attention can be fused."""

    def __init__(self, gm: fx.GraphModule, costs: _Costs, fused_attention: bool) -> None:
        super().__init__(gm)
        self.costs, self.fused = costs, fused_attention
        self.bindings: dict[Any, int] = {}  # size symbol -> value, learnt from the inputs
        self.node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        if n.op == "placeholder":
            value = super().run_node(n)
            _bind(n.meta.get("val"), value, self.bindings)
            return value
        if n.op != "call_function":
            return super().run_node(n)
        try:
            return super().run_node(n)
        except Exception as exc:  # needs data or lacks a meta kernel: take the recorded shape, count nothing
            fallback = _from_val(n.meta.get("val"), self.bindings, unknown=1)
            if fallback is None:
                raise
            if str(n.target) not in _warned:
                _warned.add(str(n.target))
                logger.warning(
                    "analytic profile: %s does not run on meta tensors (%s); counted as free", n.target, exc
                )
            return fallback

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(kwargs.get("device"), torch.device):
            kwargs = {**kwargs, "device": META}
        if self.fused and target is aten.scaled_dot_product_attention.default:
            return self._attention(*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def _attention(self, q: Any, k: Any, v: Any, attn_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        val = self.node.meta.get("val") if self.node is not None else None
        like = _from_val(val, self.bindings)
        if _is_tensor(like) and like.dim() == 4:
            # flash and memory-efficient kernels (CPU and CUDA) lay the output out as (batch, seq, heads, dim):
            # then `transpose(1, 2).contiguous()` copies nothing, and the estimate must not count a copy either
            batch, heads, seq, dim = like.shape
            like = like.new_empty((batch, seq, heads, dim)).transpose(1, 2)
        return _FusedAttention.apply(self.costs, like, q, k, v, attn_mask)


def _bind(val: Any, value: Any, bindings: dict[Any, int]) -> None:
    """Learn symbol -> size from a placeholder's recorded (symbolic) value and the value passed."""
    if isinstance(val, torch.SymInt) and isinstance(value, int) and val.node.expr.is_Symbol:
        bindings[val.node.expr] = value
    elif _is_tensor(val) and _is_tensor(value) and val.dim() == value.dim():
        for size, actual in zip(val.shape, value.shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                bindings[size.node.expr] = int(actual)


def _concrete(x: Any, bindings: dict[Any, int], unknown: int | None) -> int:
    if not isinstance(x, torch.SymInt):
        return int(x)
    expr = x.node.expr.xreplace(bindings)
    if not isinstance(expr, int) and not expr.is_number:
        if unknown is None:
            raise ValueError(f"size {x.node.expr} depends on data")
        expr = expr.xreplace({s: unknown for s in expr.free_symbols})
    return int(expr)


def _from_val(val: Any, bindings: dict[Any, int], unknown: int | None = None) -> Any:
    """Meta tensors (or ints) shaped like a recorded FakeTensor value; None if sizes depend on data."""
    try:
        if _is_tensor(val):
            shape = [_concrete(s, bindings, unknown) for s in val.shape]
            stride = [_concrete(s, bindings, unknown) for s in val.stride()]
            return torch.empty_strided(shape, stride, dtype=val.dtype, device=META)
        if isinstance(val, torch.SymInt):
            return _concrete(val, bindings, unknown)
        if isinstance(val, list | tuple):
            items = [_from_val(v, bindings, unknown) for v in val]
            return None if any(i is None and v is not None for i, v in zip(items, val)) else type(val)(items)
    except ValueError:
        return None
    return None


def estimate_block(
    module: Callable[..., Any],
    inputs: Sequence[Any],
    profile: DeviceProfile,
    dtype: str | torch.dtype | None = None,
    *,
    param_indices: frozenset[int] = frozenset(),
    fused_attention: bool = True,
) -> BlockEstimate:
    """Roofline estimate of one forward and backward of `module(*inputs)` on `profile`, run on meta tensors.

    Inputs at `param_indices` are parameters/buffers/constants (parameters keep requires_grad); other
    floating inputs get gradients, as between stages. An aten op costs max(FLOPs / (peak x matmul eff.),
    bytes / (bandwidth x memory eff.)) + op_overhead (views: 0); backward adds one gradient accumulation
    per parameter. The backward is priced a second time split as a zero-bubble stage runs it
    (`rannc.split_backward`): the ops of its parameter-gradient pass (and the accumulations) are
    `bwd_weight_time` (at most `bwd_time`), the gradients its input-gradient pass keeps for it
    `deferred_grad_bytes`. `dtype` prices all floating ops and tensors in that precision (None: each op's own).
    Activation bytes: distinct storages saved for backward, parameters excluded; workspace: the most bytes live
    at once beyond the inputs and saved tensors, with the parameters' gradients in their own dtype. Attention is
    priced as flash attention when `fused_attention` (every device's scaled_dot_product_attention runs a flash or
    memory-efficient kernel there: O(sequence) memory, no scores).

    Example::

        w = torch.empty(256, 64, device="meta", requires_grad=True)
        est = estimate_block(lambda x, w: (x @ w.t(),), [torch.empty(8, 64, device="meta"), w],
                             get_device_profile("a100-40gb"), param_indices=frozenset({1}))
        est.fwd_time, est.bwd_time, est.activation_bytes, est.total("flops", "fwd")
    """
    costs = _Costs(profile, _dtype_key(dtype))
    args = [_to_meta(x, i in param_indices) for i, x in enumerate(inputs)]
    params = [x for i, x in enumerate(args) if i in param_indices and _is_tensor(x)]
    param_keys = {_storage_key(x) for x in params}
    saved: dict[Any, float] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in param_keys:
            nbytes = tensor.untyped_storage().nbytes() / tensor.element_size() * costs.item(tensor)
            saved[key] = max(saved.get(key, 0.0), nbytes)
        return tensor

    def priced_bytes(tensor: torch.Tensor) -> float:
        return tensor.untyped_storage().nbytes() / tensor.element_size() * costs.item(tensor)

    runner = _MetaRunner(module, costs, fused_attention) if isinstance(module, fx.GraphModule) else None
    # What the forward and backward hold at once beyond the block's inputs (parameters included), on meta.
    existing = [x for x in args if _is_tensor(x)]
    live = PeakMemory(existing, size_of=priced_bytes)
    with torch.enable_grad(), exact_precision(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with live:
            with costs:
                outputs = runner.run(*args) if runner is not None else module(*args)
            outs = [t for t in pytree.tree_leaves(outputs) if _is_tensor(t) and t.requires_grad]
            wrt = [x for x in args if _is_tensor(x) and x.requires_grad]
            grads = [torch.empty_like(t) for t in outs]
            costs.phase = "bwd"
            if outs and wrt:
                with costs:
                    torch.autograd.grad(outs, wrt, grads, allow_unused=True)
                for p in params:
                    if p.requires_grad:  # param.grad += this microbatch's gradient
                        costs.record("grad_accumulate", 0.0, 3 * costs.nbytes(p), [p])
            del outputs, outs, grads
    fwd = sum(op.time for op in costs.ops if op.phase == "fwd")
    bwd = sum(op.time for op in costs.ops if op.phase == "bwd")
    activation = float(sum(saved.values()))
    input_keys = {_storage_key(x) for x in existing}
    saved_inputs = sum(v for key, v in saved.items() if key in input_keys)  # already in start_bytes
    workspace = max(0.0, live.peak_bytes - live.start_bytes - (activation - saved_inputs))
    # The parameters' gradients come in the parameters' own dtype (float32 under autocast), not in the compute dtype
    # `dtype` prices the other tensors in: counted as all live at the peak (the workspace includes them).
    workspace += sum(
        max(0.0, p.numel() * (p.element_size() - costs.item(p))) for p in params if p.requires_grad
    )
    weight, deferred = _split_estimate(
        module, args, params, param_indices, profile, costs.dtype, fused_attention
    )
    return BlockEstimate(fwd, bwd, activation, tuple(costs.ops), workspace, min(weight, bwd), deferred)


def _split_estimate(
    module: Callable[..., Any],
    args: list[Any],
    params: list[Any],
    param_indices: frozenset[int],
    profile: DeviceProfile,
    dtype: str | None,
    fused_attention: bool,
) -> tuple[float, float]:
    """(seconds of the W pass, bytes I keeps for W) of one forward's backward split as zero bubble runs it."""
    costs = _Costs(profile, dtype)
    runner = _MetaRunner(module, costs, fused_attention) if isinstance(module, fx.GraphModule) else None
    inputs = [x for i, x in enumerate(args) if i not in param_indices and _is_tensor(x) and x.requires_grad]
    weights = [p for p in params if p.requires_grad]
    with torch.enable_grad(), exact_precision(), costs:
        outputs = runner.run(*args) if runner is not None else module(*args)
        outs = [t for t in pytree.tree_leaves(outputs) if _is_tensor(t) and t.requires_grad]
        if not outs or not weights:
            return 0.0, 0.0
        costs.phase = "bwd_input"
        _, weight_pass = input_grads(outs, [torch.empty_like(t) for t in outs], inputs, weights)
        caught = {_storage_key(t): costs.nbytes(t) for t in weight_pass.caught_tensors()}
        costs.phase = "bwd_weight"
        weight_pass.compute()
    for p in weights:  # param.grad += this microbatch's gradient (in W)
        costs.record("grad_accumulate", 0.0, 3 * costs.nbytes(p), [p])
    return sum(op.time for op in costs.ops if op.phase == "bwd_weight"), float(sum(caught.values()))


def estimate_runner(
    runner: BlockRunner, m: int, profile: DeviceProfile, dtype: str | torch.dtype | None = None
) -> BlockEstimate:
    """`estimate_block` of a profiler `BlockRunner` at microbatch size m (its inputs are moved to meta)."""
    return estimate_block(
        runner.module, runner.make_inputs(m), profile, dtype, param_indices=runner.param_input_indices
    )


def block_meta_inputs(
    captured: CapturedGraph, graph: StageGraph, m: int, static: dict[str, torch.Tensor] | None = None
) -> list[Any]:
    """Meta inputs of a block at microbatch size m from the captured shapes; `static` caches parameters."""
    static = {} if static is None else static
    leaves = iter(captured.call_constants)  # non-tensor call leaves, in user-input order
    metas = {n.name: n.meta.get("val") for n in captured.gm.graph.nodes}
    constants = {n: next(leaves, None) for n in captured.user_inputs if not _is_tensor(metas[n])}
    bindings = {**captured.planning_sizes(), captured.batch_symbol: m}
    inputs: list[Any] = []
    for item in graph.inputs:
        val = metas[item.name]
        if item.kind == InputKind.CONSTANT:
            value = static.setdefault(item.name, captured.constants[item.name].detach().to(META))
        elif item.kind.is_state:  # a parameter or a buffer
            if item.name not in static:
                tensor = _from_val(val, bindings)
                static[item.name] = tensor.requires_grad_(
                    item.kind == InputKind.PARAM and tensor.is_floating_point()
                )
            value = static[item.name]
        elif _is_tensor(val) or isinstance(val, torch.SymInt):
            value = _from_val(val, bindings)
            if value is None:
                raise ValueError(f"block input {item.name} has a size that depends on data: {val}")
        else:
            value = constants.get(item.name, val)
        inputs.append(value)
    return inputs


def analytic_block_profiles(
    captured: CapturedGraph,
    analysis: GraphAnalysis,
    blocks: list[list[str]],
    microbatch_sizes: Sequence[int],
    profile: DeviceProfile,
    dtype: str | torch.dtype | None = None,
    *,
    graphs: list[StageGraph] | None = None,
    fused_attention: bool = True,
    signatures: Sequence[str] | None = None,
) -> list[BlockProfile]:
    """Estimated `BlockProfile`s of every block at each microbatch size, from shapes alone (no device,
    no parameter memory: works on models built under `torch.device("meta")`). Blocks with the same
    `block_signature` (a model's repeated layers; `signatures` when already computed) are estimated once.

    Example::

        profiles = analytic_block_profiles(captured, analysis, blocks, [1, 2, 4],
                                           get_device_profile("h100-80gb"), "bfloat16")
    """
    sizes = sorted(set(microbatch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"microbatch sizes must be positive integers, got {list(microbatch_sizes)}")
    graphs = graphs if graphs is not None else [build_stage(captured, analysis, b) for b in blocks]
    static: dict[str, torch.Tensor] = {}
    found: dict[str, BlockProfile] = {}
    profiles = []
    keys = signatures if signatures is not None else [block_signature(captured, g) for g in graphs]
    for graph, key in zip(graphs, keys):
        if key not in found:
            found[key] = _estimate_graph(captured, graph, sizes, profile, dtype, static, fused_attention)
        profiles.append(found[key])
    return profiles


def _estimate_graph(
    captured: CapturedGraph,
    graph: StageGraph,
    sizes: list[int],
    profile: DeviceProfile,
    dtype: str | torch.dtype | None,
    static: dict[str, torch.Tensor],
    fused_attention: bool,
) -> BlockProfile:
    indices = frozenset(i for i, x in enumerate(graph.inputs) if x.kind.is_state)
    fwd, bwd, act, workspace, weight, deferred = {}, {}, {}, {}, {}, {}
    for m in sizes:
        inputs = block_meta_inputs(captured, graph, m, static)
        est = estimate_block(
            graph.module, inputs, profile, dtype, param_indices=indices, fused_attention=fused_attention
        )
        fwd[m], bwd[m], act[m], workspace[m] = (
            est.fwd_time,
            est.bwd_time,
            est.activation_bytes,
            est.workspace_bytes,
        )
        weight[m], deferred[m] = est.bwd_weight_time, est.deferred_grad_bytes
    return BlockProfile(
        fwd_time=fwd,
        bwd_time=bwd,
        activation_bytes=act,
        workspace_bytes=workspace,
        bwd_weight=weight,
        deferred_grad_bytes=deferred,
    )


def block_signature(captured: CapturedGraph, graph: StageGraph) -> str:
    """A name-free key of a block (inputs' kind, shape, dtype; ops wired by position): equal keys, equal
    estimates."""
    metas = {n.name: n.meta.get("val") for n in captured.gm.graph.nodes}
    index: dict[str, int] = {}
    parts: list[str] = []

    def describe(value: Any) -> str:
        if isinstance(value, fx.Node):
            return f"%{index[value.name]}"
        if isinstance(value, list | tuple):
            return "(" + ",".join(describe(v) for v in value) + ")"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{describe(v)}" for k, v in value.items()) + "}"
        return repr(value)

    kinds = {item.name: item.kind for item in graph.inputs}
    for node in graph.module.graph.nodes:
        index[node.name] = len(index)
        if node.op == "placeholder":
            val = metas.get(node.name)
            shape = tuple(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else repr(val)
            dtype = val.dtype if isinstance(val, torch.Tensor) else None
            parts.append(f"in {kinds.get(node.name)} {shape} {dtype}")
        else:
            parts.append(f"{node.op} {node.target} {describe(node.args)} {describe(node.kwargs)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _dtype_key(dtype: str | torch.dtype | None) -> str | None:
    key = _DTYPE_KEY.get(dtype, str(dtype)) if isinstance(dtype, torch.dtype) else dtype
    if key is not None and key not in _ITEM:
        raise ValueError(f"unsupported compute dtype {dtype!r}; use one of {sorted(_ITEM)} or None")
    return key


def _to_meta(x: Any, is_param: bool) -> Any:
    """A fresh meta leaf: parameters keep requires_grad, floating activations get it."""
    if not _is_tensor(x):
        return x
    grad = x.requires_grad if is_param else (x.is_floating_point() or x.is_complex())
    return x.detach().to(META).requires_grad_(grad)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata  # the StorageImpl: views share it, meta tensors have one


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)
