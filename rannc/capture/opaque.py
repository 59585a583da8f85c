"""Opaque functions and submodules: code torch.export cannot trace, captured as one custom operator each.

A function with data-dependent Python control flow (`if x.sum() > 0:`, a loop over `t.tolist()`, a
`torch.jit.script` function looping over tokens) cannot be exported. Marked opaque it becomes one node of the
captured graph, a `torch.library` custom op `rannc_opaque::<name>` whose implementation calls the function, so
capture (on real devices and meta), profiling, the runtime's stage graphs, autograd and the graph hash all treat
it as a single operation and the rest of the model is still partitioned.

    @rannc.opaque
    @torch.jit.script
    def zero_pads(h: torch.Tensor, ids: torch.Tensor, pad: int) -> torch.Tensor: ...

The contract of an opaque function (checked where it can be):

* It takes tensors and Python constants (numbers, strings, None, dtypes, lists/tuples/dicts of them) and
  returns a tensor or a tuple/list/dict of tensors. Tensors it reads from globals or closures are constants to
  it and get no gradient.
* It runs on copies of its tensor arguments: what it changes in place reaches the caller only through what it
  returns (a function that changes an argument in place and does not return it is refused).
* Its backward recomputes it under autograd (as activation checkpointing does): it must be deterministic and
  draw no random numbers (refused when it does).
* Its output shapes are learnt by running it on zero tensors (`opaque_shapes.py`); `fake=` gives them instead.

An opaque submodule is the same with its parameters and buffers as extra tensor inputs (they get gradients; its
buffers must not change in forward). The op is called in eager code too (an opaque function is always an op),
so the unwrapped model computes exactly what rannc's stages compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.nn.utils.stateless import _reparametrize_module

from ..errors import CaptureError
from .opaque_shapes import ShapeLearner, no_gradient_message, other_leaves

logger = logging.getLogger(__name__)

NAMESPACE = "rannc_opaque"
# One schema for every opaque op: the call's tensors, its symbolic sizes (e.g. x.shape[0] under export) and a
# JSON description of everything else (constants, where each tensor and size goes, the autocast state).
_SCHEMA = "(Tensor[] tensors, SymInt[] sizes, str call) -> Tensor[]"


@dataclasses.dataclass
class _OpaqueOp:
    """One registered custom op and the Python callable it runs (looked up at call time: see `_register`)."""

    name: str
    run: Callable[..., Any]  # the user's function, or a `_ModuleForward`
    fake: Callable[..., Any] | None
    label: str  # how messages name it
    shapes: ShapeLearner
    # the output structure of each call (unflattened by the caller)
    out_specs: dict[str, pytree.TreeSpec] = dataclasses.field(default_factory=dict)
    gradients_checked: bool = False  # its first backward looked for parameters it cannot give gradients to

    @property
    def overload(self) -> Any:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default


_OPS: dict[str, _OpaqueOp] = {}


def op_name(qualified: str) -> str:
    """A valid operator name from a qualified Python name (the same in every process: no ids, no counters)."""
    name = re.sub(r"\W+", "_", qualified.replace("<locals>", "locals")).strip("_")
    return name if name and not name[0].isdigit() else f"f_{name}"


def _register(name: str, run: Callable[..., Any], fake: Callable[..., Any] | None, label: str) -> _OpaqueOp:
    """The op `rannc_opaque::<name>`, calling `run`. torch defines an op once per process: registering the name
    again (a module reloaded, a notebook cell run twice, a model captured again) makes the op call the new one."""
    entry = _OPS.get(name)
    if entry is not None:
        entry.run, entry.fake, entry.label, entry.shapes = run, fake, label, ShapeLearner(label)
        entry.gradients_checked = False
        return entry
    entry = _OpaqueOp(name, run, fake, label, ShapeLearner(label))
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=_SCHEMA)(
        functools.partial(_run_real, name)
    )
    op.register_fake(functools.partial(_run_fake, name))
    op.register_autograd(functools.partial(_backward, name), setup_context=_setup_context)
    _OPS[name] = entry
    return entry


# ---- a call as (tensors, sizes, JSON) -------------------------------------------------------------------------


def _encode(value: Any, tensors: list[torch.Tensor], sizes: list[Any], where: str) -> Any:
    """JSON for one argument; tensors and symbolic sizes go to their lists and are referred to by index."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"tensor": len(tensors) - 1}
    if isinstance(value, torch.SymInt):
        sizes.append(value)
        return {"size": len(sizes) - 1}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}  # keeps nan and inf, and 1.0 apart from 1
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple | list):
        items = [_encode(item, tensors, sizes, f"{where}[{i}]") for i, item in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": [[k, _encode(v, tensors, sizes, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise CaptureError(
        f"{where} of an opaque call is a {type(value).__name__} ({value!r:.60}); opaque functions take tensors "
        "and Python constants (numbers, strings, None, dtypes, and lists, tuples or dicts of them): pass it as "
        "one of those, or use it inside the function"
    )


def _decode(value: Any, tensors: Sequence[torch.Tensor], sizes: Sequence[Any]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, sizes) for item in value]
    if not isinstance(value, dict):
        return value
    ((kind, item),) = value.items()
    if kind == "tensor":
        return tensors[item]
    if kind == "size":
        return sizes[item]
    if kind == "float":
        return float(item)
    if kind == "dtype":
        return getattr(torch, item)
    if kind == "tuple":
        return tuple(_decode(part, tensors, sizes) for part in item)
    return {key: _decode(part, tensors, sizes) for key, part in item}


def encode_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], state: int = 0
) -> tuple[list[torch.Tensor], list[Any], str]:
    """(tensors, symbolic sizes, call text) of a call. The first `state` tensors are a module's parameters and
    buffers (passed to it as they are, not copied). The caller's autocast state is part of the call: captured
    graphs run with autocast off, so the op enters it again."""
    tensors: list[torch.Tensor] = []
    sizes: list[Any] = []
    description = {
        "args": [_encode(a, tensors, sizes, f"argument {i}") for i, a in enumerate(args)],
        "kwargs": [[k, _encode(v, tensors, sizes, f"argument {k!r}")] for k, v in kwargs.items()],
        "autocast": [
            [device, str(torch.get_autocast_dtype(device)).removeprefix("torch.")]
            for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)
        ],
        "state": state,
    }
    return tensors, sizes, json.dumps(description, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def _parse(call: str) -> dict[str, Any]:
    return json.loads(call)


def _arguments(
    call: str, tensors: Sequence[torch.Tensor], sizes: Sequence[Any]
) -> tuple[list[Any], dict[str, Any]]:
    description = _parse(call)
    args = _decode(description["args"], tensors, sizes)
    kwargs = {key: _decode(value, tensors, sizes) for key, value in description["kwargs"]}
    return args, kwargs


# ---- the op's implementation, fake and autograd formula -----------------------------------------------------


def _invoke(
    entry: _OpaqueOp, tensors: Sequence[torch.Tensor], sizes: Sequence[Any], call: str
) -> list[torch.Tensor]:
    """Run the function on copies of its tensor arguments (a module's state as it is) and return its flat outputs
    as fresh contiguous tensors: no output aliases an input or another output, as custom ops must."""
    state = _parse(call)["state"]
    copies = [t if i < state else t.clone() for i, t in enumerate(tensors)]
    versions = [t._version for t in copies]
    args, kwargs = _arguments(call, copies, sizes)
    with contextlib.ExitStack() as stack:
        for device, dtype in _parse(call)["autocast"]:
            stack.enter_context(torch.autocast(device, dtype=getattr(torch, dtype)))
        result = entry.run(*args, **kwargs)
    flat, spec = pytree.tree_flatten(result)
    for index, leaf in enumerate(flat):
        if not isinstance(leaf, torch.Tensor):
            raise CaptureError(
                f"opaque {entry.label} returned a {type(leaf).__name__} as output {index}; an opaque function "
                "returns a tensor or a tuple, list or dict of tensors"
            )
    _check_changes(entry, copies, versions, flat, state)
    _remember(entry, call, spec)
    outputs: list[torch.Tensor] = []
    for leaf in flat:
        fresh = leaf.contiguous()  # the fake outputs are contiguous: later views rely on the strides
        if any(fresh is seen for seen in outputs) or any(fresh is t for t in tensors[:state]):
            fresh = fresh.clone()
        outputs.append(fresh)
    return outputs


def _check_changes(
    entry: _OpaqueOp,
    copies: Sequence[torch.Tensor],
    versions: Sequence[int],
    outputs: Sequence[torch.Tensor],
    state: int,
) -> None:
    returned = {id(t) for t in outputs} | {id(t._base) for t in outputs if t._base is not None}
    for index, (copy, version) in enumerate(zip(copies, versions)):
        if copy._version == version:
            continue
        if index < state:
            raise CaptureError(
                f"opaque {entry.label} changes its parameter or buffer {index} in place; the state of an opaque "
                "module must not change in forward (its backward recomputes the forward): update it outside"
            )
        if id(copy) not in returned:
            raise CaptureError(
                f"opaque {entry.label} changes its tensor argument {index - state} in place and does not return "
                "it; an opaque function runs on a copy of its arguments: return the changed tensor and use the "
                "returned value"
            )


_MAX_SPECS = 1024  # output structures remembered per op (a call with ever-new constants must not grow them)


def _remember(entry: _OpaqueOp, call: str, spec: pytree.TreeSpec) -> None:
    entry.out_specs.pop(call, None)
    entry.out_specs[call] = spec
    while len(entry.out_specs) > _MAX_SPECS:
        entry.out_specs.pop(next(iter(entry.out_specs)))


def _run_real(name: str, tensors: list[torch.Tensor], sizes: list[int], call: str) -> list[torch.Tensor]:
    return _invoke(_OPS[name], tensors, sizes, call)


def _run_fake(name: str, tensors: list[torch.Tensor], sizes: list[Any], call: str) -> list[torch.Tensor]:
    entry = _OPS[name]
    if entry.fake is None:
        return entry.shapes.fake_outputs(lambda ts, ss: _invoke(entry, ts, ss, call), call, tensors, sizes)
    args, kwargs = _arguments(call, tensors, sizes)
    flat, spec = pytree.tree_flatten(entry.fake(*args, **kwargs))
    if not all(isinstance(leaf, torch.Tensor) for leaf in flat):
        raise CaptureError(f"the fake of opaque {entry.label} must return tensors, as the function does")
    _remember(entry, call, spec)
    return [leaf.new_empty(leaf.shape) if any(leaf is t for t in tensors) else leaf for leaf in flat]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    tensors, sizes, call = inputs
    ctx.save_for_backward(*tensors)  # the inputs only: backward recomputes the rest
    ctx.sizes, ctx.call = list(sizes), call
    ctx.wants = [t.requires_grad for t in tensors]


def _backward(name: str, ctx: Any, grads: list[torch.Tensor | None]) -> tuple[Any, Any, None]:
    """Recompute the function under autograd on detached inputs and backpropagate `grads` through it."""
    no_sizes: list[None] | None = [] if not ctx.sizes else None  # torch.library wants [] back for []
    if any(t.is_meta for t in ctx.saved_tensors):  # a meta run (the offline planner) only needs the shapes
        return (
            [t.new_empty(t.shape) if w else None for t, w in zip(ctx.saved_tensors, ctx.wants)],
            no_sizes,
            None,
        )
    leaves = [t.detach().requires_grad_(wants) for t, wants in zip(ctx.saved_tensors, ctx.wants)]
    entry = _OPS[name]
    with torch.enable_grad():
        outputs = _invoke(entry, leaves, ctx.sizes, ctx.call)
    if not entry.gradients_checked:  # once per op: capture checked on zeros, this is the real data
        entry.gradients_checked = True
        foreign = other_leaves(outputs, leaves)
        if foreign:
            raise CaptureError(no_gradient_message(entry.label, foreign))
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None and out.requires_grad]
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    found: Sequence[torch.Tensor | None] = [None] * len(wanted)
    if pairs and wanted:
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    per_leaf = iter(found)
    return [next(per_leaf) if leaf.requires_grad else None for leaf in leaves], no_sizes, None


def _call_op(entry: _OpaqueOp, args: tuple[Any, ...], kwargs: dict[str, Any], state: int = 0) -> Any:
    tensors, sizes, call = encode_call(args, kwargs, state)
    flat = entry.overload(tensors, sizes, call)
    return pytree.tree_unflatten(list(flat), entry.out_specs[call])


# ---- functions -------------------------------------------------------------------------------------------------


class OpaqueFunction:
    """A function marked with `rannc.opaque`: each call is one `rannc_opaque::<name>` custom op."""

    def __init__(self, fn: Callable[..., Any], name: str | None, fake: Callable[..., Any] | None) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        qualified = _qualified_name(fn)
        self.op_name = op_name(name or qualified)
        self._entry = _register(self.op_name, fn, fake, f"function {qualified}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _call_op(self._entry, args, kwargs)

    def __repr__(self) -> str:
        return f"rannc.opaque({self.fn!r})"


def _qualified_name(fn: Callable[..., Any]) -> str:
    """module.qualname of a function (a torch.jit.script function's, not torch.jit's)."""
    if isinstance(fn, torch.jit.ScriptFunction):
        return fn.qualified_name.removeprefix("__torch__.")
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', None) or getattr(fn, '__name__', type(fn).__name__)}"


# ---- submodules ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ModuleMark:
    """Set on a module instance or class marked with `rannc.opaque`."""

    fake: Callable[..., Any] | None  # fake(module, *args, **kwargs)


_MARK = "_rannc_opaque"


class _ModuleForward:
    """An opaque submodule's forward, run with the op's tensors as its parameters and buffers."""

    def __init__(self, module: torch.nn.Module, state_names: list[str]) -> None:
        self.module = weakref.ref(module)  # the model owns its modules; the op must not keep them alive
        self.state_names = state_names

    def __call__(self, state: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        if module is None:
            raise CaptureError("the submodule of an opaque op no longer exists; capture the model again")
        with _reparametrize_module(module, dict(zip(self.state_names, state)), tie_weights=True):
            return type(module).forward(module, *args, **kwargs)  # the class's: the instance's calls the op


def opaque(target: Any = None, *, name: str | None = None, fake: Callable[..., Any] | None = None) -> Any:
    """Mark a function, an nn.Module class or a submodule opaque: rannc captures each call as one operation
    instead of tracing into it, for code torch.export cannot capture (data-dependent Python control flow).

        @rannc.opaque                              # a function (above @torch.jit.script if it has one)
        def route(h, ids): ...

        @rannc.opaque                              # every instance of a module class
        class Router(nn.Module): ...

        rannc.opaque(model.encoder.router)         # one submodule (or the config item opaque_modules)

    `fake`: a function of the same arguments (for a module: the module, then forward's arguments) returning
    empty tensors of the output shapes (`torch.empty_like(x)`, `x.new_empty(...)`), for functions whose output
    shapes cannot be learnt by running them on zero tensors. `name`: the op's name (default: the function's
    module and qualified name). See `rannc.capture.opaque` for the contract.
    """
    if target is None:
        return functools.partial(opaque, name=name, fake=fake)
    if isinstance(target, OpaqueFunction):
        return target
    if isinstance(target, torch.nn.Module) or (
        isinstance(target, type) and issubclass(target, torch.nn.Module)
    ):
        if name is not None:
            raise TypeError(
                "name= is for functions: an opaque module's op is named after its place in the model"
            )
        setattr(target, _MARK, _ModuleMark(fake))
        return target
    if not callable(target):
        raise TypeError(f"rannc.opaque marks a function or an nn.Module, got a {type(target).__name__}")
    return OpaqueFunction(target, name, fake)


@contextlib.contextmanager
def opaque_submodules(model: torch.nn.Module, names: Sequence[str] = ()) -> Iterator[list[str]]:
    """While capturing, every opaque submodule (marked with `rannc.opaque` or named in `names`) is called as its
    op. Yields their qualified names; one inside another opaque module runs inside that module's op."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        raise CaptureError(
            f"opaque_modules names {unknown}, which are not submodules of {type(model).__name__}; give qualified "
            f"names as model.named_modules() lists them, e.g. {[n for n in modules if n][:3]}"
        )
    if isinstance(getattr(model, _MARK, None), _ModuleMark):
        raise CaptureError(
            f"the whole model ({type(model).__name__}) is marked opaque; mark the submodules or functions that "
            "torch.export cannot capture instead"
        )
    chosen: list[str] = []
    for qualified, module in modules.items():
        marked = qualified in names or isinstance(getattr(module, _MARK, None), _ModuleMark)
        if qualified and marked and not any(qualified.startswith(parent + ".") for parent in chosen):
            chosen.append(qualified)
    patched: list[torch.nn.Module] = []
    try:
        for qualified in chosen:
            module = modules[qualified]
            module.forward = _opaque_forward(module, qualified)  # type: ignore[method-assign]
            patched.append(module)
        yield chosen
    finally:
        for module in patched:
            del module.forward


def _opaque_forward(module: torch.nn.Module, qualified: str) -> Callable[..., Any]:
    params = [n for n, _ in module.named_parameters()]
    buffers = [n for n, _ in module.named_buffers()]
    mark = getattr(module, _MARK, None)
    fake = mark.fake if isinstance(mark, _ModuleMark) else None
    module_fake = None if fake is None else lambda state, *args, **kwargs: fake(module, *args, **kwargs)
    label = f"module {qualified} ({type(module).__name__})"
    entry = _register(
        op_name(f"module_{type(module).__name__}_{qualified}"),
        _ModuleForward(module, params + buffers),
        module_fake,
        label,
    )

    def forward(*args: Any, **kwargs: Any) -> Any:
        state = [module.get_parameter(n) for n in params] + [module.get_buffer(n) for n in buffers]
        return _call_op(entry, (state, *args), kwargs, state=len(state))

    return forward


__all__ = ["NAMESPACE", "OpaqueFunction", "encode_call", "op_name", "opaque", "opaque_submodules"]
