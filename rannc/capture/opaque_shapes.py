"""Output shapes of an opaque operation, learnt by running it on zero tensors instead of tracing it.

torch.export asks an opaque op (see `opaque.py`) for the shapes and dtypes of its outputs, given fake inputs whose
sizes may be symbols: the batch (dim 0 of every input) and, with `max_seq_len`, the sequence. The op's function
is run on CPU zero tensors of the input shapes with every symbol at 2, then with each symbol in turn at 3, then
with all at other values to check: each output dimension is fitted as `c + a_1 * s_1 + ...` (exactly, on
integers), and fake outputs of those sizes in terms of the inputs' SymInts are returned. Concrete input shapes (a
meta-device run of the captured graph) reuse what capture learnt, or run the function once at those shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import CaptureError

logger = logging.getLogger(__name__)

# Every symbol is first set to BASE, then each in turn to BASE + 1 (the differences are the coefficients), then
# all to CHECKS (distinct primes) to check the fit. Not 1, at which broadcasting and squeezing change shapes.
BASE = 2
CHECKS = (5, 7, 11, 13, 17)

Runner = Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]]  # (tensors, sizes) -> flat outputs
Affine = tuple[int, tuple[int, ...]]  # (c, (a_1, ...)): a size of c + sum a_i * symbol_i


def _evaluate(affine: Affine, values: Sequence[Any]) -> Any:
    constant, coefficients = affine
    total: Any = constant
    for a, value in zip(coefficients, values):
        if a:
            total = total + a * value
    return total


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    """One call site's input and output sizes as affine functions of its symbols, and the output dtypes."""

    symbols: int  # how many (the coefficients of each Affine)
    inputs: list[list[Affine | None]]  # None: an input size that is not affine in the symbols
    outputs: list[tuple[list[Affine], torch.dtype]]

    def values_for(self, shapes: list[list[int]]) -> list[int] | None:
        """The symbols' values at which these concrete input shapes are this rule's, or None."""
        if [len(s) for s in shapes] != [len(s) for s in self.inputs]:
            return None
        values: list[int | None] = [None] * self.symbols
        pairs = [
            (affine, size) for dims, sizes in zip(self.inputs, shapes) for affine, size in zip(dims, sizes)
        ]
        for affine, size in pairs:
            if affine is None:
                return None
            constant, coefficients = affine
            used = [i for i, a in enumerate(coefficients) if a]
            if len(used) == 1:
                (i,) = used
                value, remainder = divmod(size - constant, coefficients[i])
                if remainder or value < 1 or values[i] not in (None, value):
                    return None
                values[i] = value
        if any(value is None for value in values):
            return None
        known = [int(value) for value in values if value is not None]
        if any(_evaluate(affine, known) != size for affine, size in pairs if affine is not None):
            return None
        return known


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
        device = tensors[0].device if tensors else torch.device("cpu")
        found = sorted(set().union(*(e.free_symbols for e in exprs)), key=str)
        if not found:
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
        # One symbol per size: export traces inputs sharing rannc's batch Dim with a symbol each (equal only at
        # the end), so symbols of the same input dim and example value vary together.
        symbols = _representatives(found, tensors, sizes)
        shapes = [[e.subs(symbols) for e in shape] for shape in shapes]
        size_exprs = [e.subs(symbols) for e in size_exprs]
        unique = sorted(set(symbols.values()), key=str)
        key = (call, tuple(tuple(map(str, s)) for s in shapes), tuple(map(str, size_exprs)), _dtypes(tensors))
        rule = self.rules.get(key)
        if rule is None:
            rule = self._learn(run, tensors, shapes, size_exprs, unique)
            self.rules[key] = rule
        symints = _symints(unique, symbols, tensors, sizes)
        used = {
            i for dims, _ in rule.outputs for _, coefficients in dims for i, a in enumerate(coefficients) if a
        }
        missing = [str(unique[i]) for i in sorted(used) if symints[i] is None]
        if missing:
            raise CaptureError(
                f"the outputs of opaque {self.label} depend on {missing}, which is no input size itself (only "
                "part of expressions); pass fake= to rannc.opaque"
            )
        return [
            torch.empty([_evaluate(d, symints) for d in dims], dtype=dtype, device=device)
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
            values = rule.values_for(shapes) if rule_call == call else None
            if values is not None:  # learnt at capture: no run at these (possibly large) shapes
                return [
                    torch.empty([_evaluate(d, values) for d in dims], dtype=dtype, device=device)
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
        symbols: list[Any],
    ) -> ShapeRule:
        if len(symbols) > len(CHECKS):
            raise CaptureError(
                f"the input sizes of opaque {self.label} depend on {len(symbols)} symbols; pass fake= to rannc.opaque"
            )
        settings = [[BASE] * len(symbols)]
        settings += [[BASE + (i == j) for j in range(len(symbols))] for i in range(len(symbols))]
        settings.append(list(CHECKS[: len(symbols)]))
        runs = []
        for setting in settings:
            values = dict(zip(symbols, setting))
            concrete = [[int(e.subs(values)) for e in shape] for shape in shapes]
            concrete_sizes = [int(e.subs(values)) for e in size_exprs]
            runs.append(probe(self.label, run, tensors, concrete, concrete_sizes, check_gradients=not runs))
        layout = [[(len(shape), dtype) for shape, dtype in outputs] for outputs in runs]
        if any(other != layout[0] for other in layout):
            raise CaptureError(
                f"opaque {self.label} returns a different number, rank or dtype of outputs when its input sizes "
                f"change ({layout}); pass fake= to rannc.opaque"
            )
        outputs = []
        for index, per_run in enumerate(zip(*runs)):
            measured = [shape for shape, _ in per_run]
            dims = [_fit([shape[d] for shape in measured], settings) for d in range(len(measured[0]))]
            if any(dim is None for dim in dims):
                raise CaptureError(
                    f"output {index} of opaque {self.label} has shapes {measured} for sizes "
                    f"{dict(zip(map(str, symbols), zip(*settings)))}: they do not follow the input sizes as "
                    "c + a * size; pass fake= to rannc.opaque"
                )
            outputs.append(([dim for dim in dims if dim is not None], per_run[0][1]))
        inputs = [[_affine(e, symbols) for e in shape] for shape in shapes]
        logger.info(
            "opaque %s: output shapes %s", self.label, [describe(dims, symbols) for dims, _ in outputs]
        )
        return ShapeRule(len(symbols), inputs, outputs)


def _fit(sizes: list[int], settings: list[list[int]]) -> Affine | None:
    """(c, a) with size == c + sum a_i * value_i in every setting (base, one per symbol raised by 1, check)."""
    count = len(settings[0])
    coefficients = tuple(sizes[1 + i] - sizes[0] for i in range(count))
    constant = sizes[0] - BASE * sum(coefficients)
    affine = (constant, coefficients)
    if _evaluate(affine, settings[-1]) != sizes[-1]:
        return None
    return affine


def _affine(expr: Any, symbols: list[Any]) -> Affine | None:
    """expr as (c, (a_1, ...)) over `symbols`, or None when it is not affine in them."""
    poly = sympy.Poly(expr, *symbols)
    if poly.total_degree() > 1:
        return None
    coefficients = tuple(int(poly.coeff_monomial(symbol)) for symbol in symbols)
    return int(poly.coeff_monomial(1)), coefficients


def describe(dims: Sequence[Affine], symbols: Sequence[Any]) -> str:
    """A shape in terms of the input symbols, e.g. (s0, 16, 2*s1 + 1)."""
    return str(
        tuple(
            sympy.Integer(c) + sum(a * s for a, s in zip(coefficients, symbols)) for c, coefficients in dims
        )
    )


def _dtypes(tensors: Sequence[torch.Tensor]) -> tuple[str, ...]:
    return tuple(str(t.dtype) for t in tensors)


def _representatives(
    symbols: list[Any], tensors: Sequence[torch.Tensor], sizes: Sequence[Any]
) -> dict[Any, Any]:
    """Each symbol's representative: the first (by name) of those with the same example value and the same
    input dims as sources (`L['ids'].size()[0]` and `L['labels'].size()[0]`: both the batch)."""
    env = next(
        size.node.shape_env
        for size in [s for t in tensors for s in t.shape] + list(sizes)
        if isinstance(size, torch.SymInt)
    )

    def kind(symbol: Any) -> tuple[Any, ...]:
        dims = {
            re.search(r"\.size\(\)\[(\d+)\]$", source.name) for source in env.var_to_sources.get(symbol, [])
        }
        if not dims or None in dims:
            return (symbol,)  # no input dim to go by: a symbol of its own
        return (frozenset(match.group(1) for match in dims if match), env.backed_var_to_val.get(symbol))

    first: dict[tuple[Any, ...], Any] = {}
    return {symbol: first.setdefault(kind(symbol), symbol) for symbol in symbols}


def _symints(
    unique: list[Any], representative: dict[Any, Any], tensors: Sequence[torch.Tensor], sizes: Sequence[Any]
) -> list[Any]:
    """Per representative symbol, an input size that is one of its symbols (outputs are expressed in them)."""
    found: dict[Any, torch.SymInt] = {}
    for size in [s for t in tensors for s in t.shape] + list(sizes):
        if isinstance(size, torch.SymInt) and size.node.expr in representative:
            found.setdefault(representative[size.node.expr], size)
    return [found.get(symbol) for symbol in unique]


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
