"""The one-way rule of docs/design.md: every import of rannc's own modules goes to a lower layer (or stays in its
layer), and no modules import each other in a cycle. Every import counts: at the top of a module, inside a
function, and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rannc"

# Lowest first; a module may import from its own layer and the layers below (docs/design.md draws them).
LAYERS: list[tuple[str, set[str]]] = [
    ("errors", {"errors"}),
    ("foundation", {"config", "schedule", "chrome_trace", "host_memory", "split_backward"}),
    ("planner (a pure solver over plain values)", {"plan"}),
    ("capture", {"capture"}),
    ("graph", {"graph"}),
    ("profile", {"profile"}),
    ("deploy", {"deploy"}),
    ("assembly and runtime", {"problem", "runtime"}),
    (
        "front doors",
        {"partition", "offline", "module", "compat", "verify", "amp", "demo", "demo_model", "launch", "cli"},
    ),
    ("package", {"__init__", "__main__"}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def layer_of(module: str) -> int:
    """The layer of rannc.X or rannc.X.y (rannc/__init__.py and __main__.py: the package's own)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} has no layer: add it to LAYERS here and to the drawing in docs/design.md")


def imports_in(source: str, name: str, is_package: bool, modules: set[str]) -> list[tuple[str, int]]:
    """(rannc module imported, line) for every import in the `source` of module `name`."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("rannc") and target != name and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    return files, {
        name: imports_in(path.read_text(), name, path.name == "__init__.py", modules)
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_runs_down_the_layers() -> None:
    files, graph = import_graph()
    upward = [
        f"{files[name].relative_to(ROOT.parent)}:{line} imports {target} "
        f"({LAYERS[layer_of(name)][0]} -> {LAYERS[layer_of(target)][0]})"
        for name, targets in sorted(graph.items())
        for target, line in targets
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    _, graph = import_graph()
    edges = {name: {target for target, _ in targets} for name, targets in graph.items()}
    # A package's __init__ naming its own modules is how it exports them, not a dependency of theirs on it.
    for name in edges:
        edges[name] = {t for t in edges[name] if not (name.count(".") == 1 and t.startswith(name + "."))}
    assert not cycles(edges), f"modules importing each other: {cycles(edges)}"


def test_the_planner_is_a_pure_solver() -> None:
    """rannc.plan imports nothing from capture, graph, profile, deploy or runtime (nor the assembly)."""
    _, graph = import_graph()
    solver = {name: targets for name, targets in graph.items() if name.startswith("rannc.plan")}
    allowed = ("rannc.plan", "rannc.errors", "rannc.schedule", "rannc.chrome_trace")
    outside = sorted({t for targets in solver.values() for t, _ in targets if not t.startswith(allowed)})
    assert not outside, f"rannc.plan imports {outside}"


def test_the_checker_sees_a_violation() -> None:
    """The rules above read real imports: a planner module importing the runtime inside a function is seen, and
    so is a cycle."""
    files, _ = import_graph()
    source = "import math\n\n\ndef f():\n    from ..runtime import stage\n"
    found = imports_in(source, "rannc.plan.cost", False, set(files))
    assert found == [("rannc.runtime.stage", 5)]
    assert layer_of("rannc.runtime.stage") > layer_of("rannc.plan.cost")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
