"""The layering of the Python package, read from the sources with `ast` (nothing is imported).

Every import between ktmoe modules counts, those inside functions included: a late import hides a cycle
from the interpreter, not from this test. Importing `ktmoe.a.b` also runs the package `ktmoe.a`, so that is
an edge too (except for the root package, which every import runs first, and for packages the importing
module lives in, which are already running). Imports spelled as strings (importlib) are not seen."""
from __future__ import annotations

import ast
import pathlib
import sys
from graphlib import CycleError, TopologicalSorter
from typing import Dict, Iterator, Tuple

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
ROOT = "ktmoe"


def _modules() -> Dict[str, Tuple[pathlib.Path, bool]]:
    """{dotted name: (path, is a package)} for every .py file of the package."""
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _is_module(name: str) -> bool:
    """A Python module or package, or a native one (`_core`: a .pyx and the built library)."""
    path = SRC.joinpath(*name.split("."))
    return name in MODULES or any(path.parent.glob(path.name + ".*"))


def _imports(name: str) -> Iterator[Tuple[str, int, bool]]:
    """(imported ktmoe module, line, at module level) for every import statement of module `name`."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if _is_module(sub) else base), node.lineno, id(node) in top


def _graph() -> Dict[str, Dict[str, str]]:
    """{module: {module it imports: "file:line"}}, Python modules only."""
    graph: Dict[str, Dict[str, str]] = {}
    for name, (path, _) in MODULES.items():
        edges = graph.setdefault(name, {})
        where = lambda line: f"{path.relative_to(SRC)}:{line}"  # noqa: E731
        for target, line, _ in _imports(name):
            parts = target.split(".")
            for i in range(2, len(parts)):  # the packages that importing `target` runs
                pkg = ".".join(parts[:i])
                if name != pkg and not name.startswith(pkg + "."):
                    edges.setdefault(pkg, where(line))
            if target in MODULES and target != name:
                edges.setdefault(target, where(line))
    return graph


def test_no_import_cycle():
    graph = _graph()
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        cycle = e.args[1][::-1]  # graphlib lists it against the edges' direction
        steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle:\n  " + "\n  ".join(steps))


def test_graph_sees_known_edges():
    """The parser resolves the import forms the package uses (guards the test above against seeing nothing)."""
    graph = _graph()
    assert "ktmoe.experts" in graph["ktmoe"]                 # from .experts import KTMoEWrapper
    assert "ktmoe.sft.base" in graph["ktmoe.bench.runner"]   # from ..sft import base as _sft_base
    assert "ktmoe.sft" in graph["ktmoe.bench.runner"]        # ... which runs ktmoe/sft/__init__.py
    assert "ktmoe.formats" in graph["ktmoe.methods"]         # an import inside a function


def test_methods_is_pure_data():
    """methods.py loads with the standard library alone; its one ktmoe import is the formats registry, inside
    the property that resolves a method's format (the formats never import the methods)."""
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:
        pytest.skip("needs Python 3.10+ (sys.stdlib_module_names)")
    path, _ = MODULES["ktmoe.methods"]
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [("." * node.level) + (node.module or "")]
        else:
            continue
        for n in names:
            assert n.split(".")[0] in stdlib, f"methods.py:{node.lineno} imports {n} at module level"
    reached = {t for t, _, _ in _imports("ktmoe.methods")}
    assert reached <= {"ktmoe.formats"}, f"methods.py imports {sorted(reached - {'ktmoe.formats'})}"
