"""Output shapes of an opaque operation, learnt by running it on zero tensors instead of tracing it.

torch.export asks an opaque op (see `opaque.py`) for its outputs' shapes and dtypes with fake inputs whose dim 0
is the symbolic batch size. The op's function is run on CPU zero tensors of the input shapes at three batch
sizes; each output dimension is fitted as `a * batch + c` from the first two and checked against the third, and
fake outputs of those sizes (in terms of the input's batch SymInt) are returned. Concrete input shapes (a meta
device run of the captured graph) reuse what capture learnt, or run the function once at those shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import CaptureError

logger = logging.getLogger(__name__)

# Batch sizes the function runs at: the first two fit `a * batch + c` per output dimension, the third checks the
# fit. Not 1, at which broadcasting and squeezing change shapes.
PROBE_BATCHES = (2, 3, 5)

Runner = Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]]  # (tensors, sizes) -> flat outputs
Affine = tuple[int, int]  # (a, c): a size of a * batch + c


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    """One call site's input and output sizes as affine functions of the batch size, and the output dtypes."""

    inputs: list[list[Affine]]
    outputs: list[tuple[list[Affine], torch.dtype]]

    def batch_of(self, shapes: list[list[int]]) -> int | None:
        """The batch size at which these concrete input shapes are this rule's, or None."""
        if [len(s) for s in shapes] != [len(s) for s in self.inputs]:
            return None
        batch: int | None = None
        for dims, sizes in zip(self.inputs, shapes):
            for (a, c), size in zip(dims, sizes):
                if a == 0:
                    if c != size:
                        return None
                    continue
                found, remainder = divmod(size - c, a)
                if remainder or found < 1 or batch not in (None, found):
                    return None
                batch = found
        return batch


def _expr(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


class ShapeLearner:
    """Fake outputs for one opaque op; remembers a rule per call site (export calls the fake several times)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.rules: dict[tuple[Any, ...], ShapeRule] = {}

    def fake_outputs(
        self, run: Runner, call: str, tensors: list[torch.Tensor], sizes: list[Any]
    ) -> list[torch.Tensor]:
        shapes = [[_expr(s) for s in t.shape] for t in tensors]
        size_exprs = [_expr(s) for s in sizes]
        exprs = [e for shape in shapes for e in shape] + size_exprs
        symbols = set().union(*(e.free_symbols for e in exprs))
        device = tensors[0].device if tensors else torch.device("cpu")
        if not symbols:
            return self._concrete(
                run, call, tensors, [[int(e) for e in s] for s in shapes], size_exprs, device
            )
        unbacked = set().union(*(free_unbacked_symbols(e) for e in exprs))
        if unbacked:
            raise CaptureError(
                f"cannot learn the output shapes of opaque {self.label}: its input sizes {shapes} depend on the "
                f"data ({sorted(map(str, unbacked))}); pass fake= to rannc.opaque (a function of the same "
                "arguments returning empty tensors of the output shapes)"
            )
        # Every symbol is the batch: rannc makes dim 0 of each input dynamic with one Dim, which export may
        # still trace as several symbols (equal at the end).
        batch = _batch_symint(tensors, sizes)
        key = (call, tuple(tuple(map(str, s)) for s in shapes), tuple(map(str, size_exprs)), _dtypes(tensors))
        rule = self.rules.get(key)
        if rule is None:
            rule = self._learn(run, tensors, shapes, size_exprs, symbols)
            self.rules[key] = rule
        return [
            torch.empty([a * batch + c if a else c for a, c in dims], dtype=dtype, device=device)
            for dims, dtype in rule.outputs
        ]

    def _concrete(
        self,
        run: Runner,
        call: str,
        tensors: list[torch.Tensor],
        shapes: list[list[int]],
        size_exprs: list[Any],
        device: torch.device,
    ) -> list[torch.Tensor]:
        for (rule_call, *_), rule in self.rules.items():
            batch = rule.batch_of(shapes) if rule_call == call else None
            if batch is not None:  # learnt at capture: no run at these (possibly large) shapes
                return [
                    torch.empty([a * batch + c for a, c in dims], dtype=dtype, device=device)
                    for dims, dtype in rule.outputs
                ]
        outputs = probe(self.label, run, tensors, shapes, [int(e) for e in size_exprs], check_gradients=True)
        return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in outputs]

    def _learn(
        self,
        run: Runner,
        tensors: list[torch.Tensor],
        shapes: list[list[Any]],
        size_exprs: list[Any],
        symbols: set[Any],
    ) -> ShapeRule:
        runs = []
        for batch in PROBE_BATCHES:
            values = {symbol: batch for symbol in symbols}
            concrete = [[int(e.subs(values)) for e in shape] for shape in shapes]
            concrete_sizes = [int(e.subs(values)) for e in size_exprs]
            runs.append(probe(self.label, run, tensors, concrete, concrete_sizes, check_gradients=not runs))
        layout = [[(len(shape), dtype) for shape, dtype in outputs] for outputs in runs]
        if layout[1] != layout[0] or layout[2] != layout[0]:
            raise CaptureError(
                f"opaque {self.label} returns a different number, rank or dtype of outputs at batch sizes "
                f"{PROBE_BATCHES}: {layout}; pass fake= to rannc.opaque"
            )
        outputs = []
        for index, per_batch in enumerate(zip(*runs)):
            (first, dtype), (second, _), (third, _) = per_batch
            dims = [_fit(sizes) for sizes in zip(first, second, third)]
            if any(dim is None for dim in dims):
                raise CaptureError(
                    f"output {index} of opaque {self.label} has shapes {first}, {second}, {third} at batch sizes "
                    f"{PROBE_BATCHES}: they do not follow the batch size as a * batch + c; pass fake= to "
                    "rannc.opaque"
                )
            outputs.append(([dim for dim in dims if dim is not None], dtype))
        symbol = next(iter(symbols))
        inputs = [
            [_affine(e.subs(dict.fromkeys(symbols, symbol)), symbol) for e in shape] for shape in shapes
        ]
        logger.info("opaque %s: output shapes %s", self.label, [describe(dims) for dims, _ in outputs])
        return ShapeRule(inputs, outputs)


def _fit(sizes: tuple[int, int, int]) -> Affine | None:
    """(a, c) with size == a * batch + c at every probe batch, or None."""
    step = PROBE_BATCHES[1] - PROBE_BATCHES[0]
    a, remainder = divmod(sizes[1] - sizes[0], step)
    c = sizes[0] - a * PROBE_BATCHES[0]
    if remainder or a * PROBE_BATCHES[2] + c != sizes[2]:
        return None
    return a, c


def _affine(expr: Any, symbol: Any) -> Affine:
    """(a, c) with expr == a * symbol + c; (0, -1) for a size that is not affine (matches no concrete size)."""
    if not expr.free_symbols:
        return 0, int(expr)
    poly = sympy.Poly(expr, symbol)
    if poly.degree() != 1:
        return 0, -1
    a, c = (int(x) for x in poly.all_coeffs())
    return a, c


def describe(dims: Sequence[Affine]) -> str:
    """A shape in terms of the batch size B, e.g. (B, 16, 2B+1)."""
    parts = [
        str(c) if not a else ("B" if a == 1 else f"{a}B") + (f"+{c}" if c > 0 else f"{c}" if c else "")
        for a, c in dims
    ]
    return "(" + ", ".join(parts) + ")"


def _dtypes(tensors: Sequence[torch.Tensor]) -> tuple[str, ...]:
    return tuple(str(t.dtype) for t in tensors)


def _batch_symint(tensors: Sequence[torch.Tensor], sizes: Sequence[Any]) -> torch.SymInt:
    """The first input size that is a batch symbol itself (outputs are expressed in it)."""
    for size in [s for t in tensors for s in t.shape] + list(sizes):
        if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
            return size
    raise CaptureError(
        "no input size of an opaque call is the batch size itself (only expressions of it); pass fake= to "
        "rannc.opaque"
    )


def probe(
    label: str,
    run: Runner,
    like: Sequence[torch.Tensor],
    shapes: list[list[int]],
    sizes: list[int],
    check_gradients: bool = False,
) -> list[tuple[list[int], torch.dtype]]:
    """Shapes and dtypes of the outputs of `run` on CPU zeros of the given input shapes, run outside every trace
    (fake tensors, export's modes) with the random generators restored. With `check_gradients` it runs under
    autograd, its floating inputs requiring grad, and refuses outputs that depend on other tensors requiring
    grad (the op could not give them gradients)."""
    with untraced(), torch.set_grad_enabled(check_gradients), torch.random.fork_rng(devices=[]):
        zeros = [
            torch.zeros(shape, dtype=t.dtype, requires_grad=check_gradients and t.dtype.is_floating_point)
            for shape, t in zip(shapes, like)
        ]
        before = torch.get_rng_state()
        try:
            outputs = run(zeros, sizes)
        except CaptureError:
            raise
        except Exception as exc:  # whatever the user's function raises on zeros
            raise CaptureError(
                f"rannc learns the output shapes of opaque {label} by running it on zero tensors of its input "
                f"shapes {shapes} on the CPU, which failed: {type(exc).__name__}: {exc}. Pass fake= to "
                "rannc.opaque: a function of the same arguments that returns empty tensors of the output shapes"
            ) from exc
        if not torch.equal(before, torch.get_rng_state()):
            raise CaptureError(
                f"opaque {label} draws random numbers (dropout?); its backward recomputes it and would draw "
                "other ones: keep randomness outside opaque functions"
            )
        foreign = other_leaves(outputs, zeros) if check_gradients else []
        if foreign:
            raise CaptureError(no_gradient_message(label, foreign))
    return [(list(out.shape), out.dtype) for out in outputs]


def no_gradient_message(label: str, foreign: Sequence[torch.Tensor]) -> str:
    return (
        f"opaque {label} computes with {len(foreign)} tensor(s) that require grad but are not its arguments "
        f"(shapes {[tuple(t.shape) for t in foreign][:4]}: parameters reached through self, a closure or a "
        "global?); they would get no gradient. Pass them as arguments, or make the module that owns them opaque "
        "(rannc.opaque(module) or the config item opaque_modules)"
    )


def other_leaves(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that the outputs depend on, other than `inputs`."""
    found: list[torch.Tensor] = []
    mine = {id(t) for t in inputs}
    pending = []
    for out in outputs:
        if out.grad_fn is not None:
            pending.append(out.grad_fn)
        elif out.requires_grad and id(out) not in mine:
            found.append(out)
    seen: set[Any] = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf's gradient
        if isinstance(variable, torch.Tensor) and id(variable) not in mine:
            found.append(variable)
        pending.extend(parent for parent, _ in node.next_functions if parent is not None)
    return found


# The dispatcher's thread-local key sets of eager code (this module is imported outside any trace).
_EAGER_DISPATCH = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Run real tensor code inside a trace as eager code runs: no dispatch modes (fake tensors, proxies), no
    torch-function modes (export's non-strict handlers), and the eager dispatch keys (a fake kernel runs with
    the in-place version counters and autocast switched off)."""
    with (
        _disable_current_modes(),
        torch._C.DisableTorchFunction(),
        torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH),
    ):
        yield
