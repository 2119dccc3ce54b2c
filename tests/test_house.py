"""The house: pneumojax's modules import each other without cycles, lazy imports included,
and the library never imports the command line or the benchmarks. Read from the source with
``ast`` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pneumojax"
ENTRY_POINTS = {"pneumojax.cli", "pneumojax.__main__"}  # may import anything below them


def entry_point(name: str) -> bool:
    """One of ENTRY_POINTS or, the command line being a package, one of its modules."""
    return name in ENTRY_POINTS or name.startswith("pneumojax.cli.")


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every pneumojax module (or ``benchmarks...``) that ``name`` imports, at any depth of its
    code: top level, inside functions, under ``if TYPE_CHECKING`` alike."""

    def resolve(dotted: str) -> str | None:
        if dotted.split(".")[0] == "benchmarks":
            return dotted
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from pneumojax.x import y`: y is a module of its own, or a name defined in x
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in ("pneumojax", "benchmarks"):
                module = resolve(target)
                if module and module != name:
                    found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_lazy_imports_included():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_command_line_or_the_benchmarks():
    offenders = {
        name: sorted(d for d in deps if entry_point(d) or d.startswith("benchmarks"))
        for name, deps in import_graph().items()
        if not entry_point(name)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_explain_and_inference_stand_on_scoring_not_on_each_other():
    graph = import_graph()
    assert "pneumojax.inference" not in graph["pneumojax.explain"]
    assert "pneumojax.explain" not in graph["pneumojax.inference"]
    assert "pneumojax.scoring" in graph["pneumojax.explain"] & graph["pneumojax.inference"]


def test_the_walk_sees_lazy_imports_and_cycles(tmp_path):
    """The test above can fail: a lazy import inside a function closes a cycle it finds."""
    pkg = tmp_path / "pneumojax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pneumojax.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pneumojax import a  # lazy\n    return a\n")
    (pkg / "c.py").write_text("from . import cli\n")
    (pkg / "cli.py").write_text("import benchmarks.recall\n")
    known = modules(pkg)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["pneumojax.a", "pneumojax.b"]]
    assert graph["pneumojax.c"] == {"pneumojax.cli"}
    assert graph["pneumojax.cli"] == {"benchmarks.recall"}


# Rooms a reader can live in: no module over 450 lines, no function over 70 (decorators not
# counted: a function's node starts at its `def`).
MODULE_LIMIT, FUNCTION_LIMIT = 450, 70


def test_no_module_or_function_grows_past_the_limits():
    too_big = []
    for name, path in modules().items():
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MODULE_LIMIT:
            too_big.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LIMIT:
                    too_big.append(f"{name}.{node.name}: {length} lines")
    assert not too_big, "split these (or shrink them back): " + "; ".join(too_big)
