"""Size and shape of rannc's code: the import graph between its layers, cycles, long files and long functions.

```
python benchmarks/code_metrics.py                 # this checkout's rannc/
python benchmarks/code_metrics.py --root /tmp/old # another checkout (e.g. `git worktree add /tmp/old 14fcd03`)
```

The layers and the import reader are those of this checkout's `tests/test_layers.py` (the one-way rule of
docs/design.md), applied to the tree measured, so two trees are compared under the same rule. A module the rule
gives no layer is counted as "unlayered". Lines are physical lines of the file; a function's lines run from its
`def` to its last line (a method's nested functions are counted on their own too).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parents[1]
FILE_LIMIT = 400
FUNCTION_LIMIT = 80


def layer_rules(package: Path) -> ModuleType:
    """This checkout's tests/test_layers.py, reading the imports of `package` instead of its own."""
    spec = importlib.util.spec_from_file_location("_layer_rules", HERE / "tests" / "test_layers.py")
    assert spec is not None and spec.loader is not None
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    rules.ROOT = package
    return rules


def layer_name(rules: ModuleType, module: str) -> tuple[int, str]:
    try:
        index = rules.layer_of(module)
    except AssertionError:
        return -1, "unlayered"
    return index, rules.LAYERS[index][0]


def import_report(rules: ModuleType) -> list[str]:
    """Arrows between layers (how many imports run from one to another), those running back up, and cycles."""
    files, graph = rules.import_graph()
    arrows: Counter[tuple[str, str, bool]] = Counter()
    upward = []
    for name, targets in sorted(graph.items()):
        source = layer_name(rules, name)
        for target, line in targets:
            to = layer_name(rules, target)
            up = min(source[0], to[0]) >= 0 and to[0] > source[0]
            arrows[(source[1], to[1], up)] += 1
            if up:
                upward.append(f"  {files[name].relative_to(rules.ROOT.parent)}:{line} imports {target}")
    lines = [f"import graph: {sum(arrows.values())} imports between {len(files)} modules"]
    lines += [
        f"  {source} -> {to}: {count}{'   (runs back up)' if up else ''}"
        for (source, to, up), count in sorted(arrows.items())
    ]
    lines.append(f"imports running back up the layers: {len(upward)}")
    lines += upward
    edges = {name: {target for target, _ in targets} for name, targets in graph.items()}
    for name in edges:  # a package's __init__ exporting its own modules is no dependency of theirs on it
        edges[name] = {t for t in edges[name] if not (name.count(".") == 1 and t.startswith(name + "."))}
    found = rules.cycles(edges)
    lines.append(f"cycles: {len(found)}")
    lines += [f"  {' <-> '.join(cycle)}" for cycle in found]
    return lines


def long_functions(path: Path) -> list[tuple[int, str, int]]:
    """(line, qualified name, lines) of each function or method in `path` longer than FUNCTION_LIMIT lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > FUNCTION_LIMIT:
                    found.append((child.lineno, name, length))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return found


def size_report(package: Path) -> list[str]:
    files = sorted(package.rglob("*.py"))
    lengths = {path: len(path.read_text().splitlines()) for path in files}
    total = sum(lengths.values())
    lines = [f"{len(files)} files, {total} lines"]
    long_files = sorted(((n, p) for p, n in lengths.items() if n > FILE_LIMIT), reverse=True)
    lines.append(f"files over {FILE_LIMIT} lines: {len(long_files)}")
    lines += [f"  {n:5d}  {p.relative_to(package.parent)}" for n, p in long_files]
    functions = [
        (length, f"{path.relative_to(package.parent)}:{line} {name}")
        for path in files
        for line, name, length in long_functions(path)
    ]
    lines.append(f"functions over {FUNCTION_LIMIT} lines: {len(functions)}")
    lines += [f"  {length:5d}  {where}" for length, where in sorted(functions, reverse=True)]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE, help="a checkout of rannc (default: this one)")
    args = parser.parse_args(argv)
    package = args.root.resolve() / "rannc"
    if not package.is_dir():
        sys.exit(f"{args.root} has no rannc/ package: pass a checkout of the repository as --root")
    print(f"tree: {package}")
    for line in size_report(package) + import_report(layer_rules(package)):
        print(line)


if __name__ == "__main__":
    main()
