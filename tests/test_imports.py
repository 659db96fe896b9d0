"""The package's import structure, read statically from the source (nothing is imported).

* No import cycles between ``prism_spec`` modules. Every ``import`` counts, at module level
  or inside a function (a function-level import only hides a cycle until that function runs).
  An import is an edge to the module it names: ``from pkg import sub`` to ``pkg.sub`` when
  that is a module, ``from pkg import name`` to ``pkg`` (its ``__init__``); the parent
  packages that Python also initialises are not edges.
* No module reaches into another prism_spec module for a name starting with ``_``
  (``from .x import _helper`` or ``x._helper``); dunder names such as ``__version__`` are
  fine. A private helper that another module needs is made public where it belongs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "prism_spec"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        """The package that relative imports in this module start from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _load() -> dict[str, Module]:
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        name = _module_name(path)
        modules[name] = Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


MODULES = _load()


@dataclass
class Import:
    module: str  # the prism_spec module imported from
    name: str | None  # the name taken from it (``from module import name``), or None
    line: int


def _from_base(mod: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` in ``mod``."""
    if not node.level:
        return node.module or ""
    parts = mod.package.split(".")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _imports(mod: Module) -> list[Import]:
    """Every import of a prism_spec module in ``mod``, at any depth (functions included)."""
    out = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    out.append(Import(alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(mod, node)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # ``from package import submodule``
                    out.append(Import(sub, None, node.lineno))
                else:
                    out.append(Import(base, alias.name, node.lineno))
    return out


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, mod in MODULES.items():
        edges = graph.setdefault(name, {})
        for imp in _imports(mod):
            assert imp.module in MODULES, f"{mod.path}:{imp.line}: imports {imp.module}, which does not exist"
            if imp.module != name:
                edges.setdefault(imp.module, imp.line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # breadth-first from start, inside the component, back to start: a shortest cycle
        parent: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in graph[v]:
                    if w == start:
                        end = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        parent[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "prism_spec.cli" in graph and "prism_spec.bench.runner" in graph
    # a relative import, a function-level import and a ``from package import submodule``
    assert "prism_spec.runtime.decode" in graph["prism_spec.bench.runner"]
    assert "prism_spec.bench.runner" in graph["prism_spec.bench.cli"]  # only inside functions
    assert "prism_spec.bench.metrics" in graph["prism_spec.bench.report"]  # from . import metrics


def test_cycle_finder():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}  # a self-import is no cycle
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles in prism_spec:\n" + "\n".join(_describe(c, graph) for c in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything that is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _module_aliases(mod: Module) -> dict[str, str]:
    """Names that this module binds to prism_spec modules (anywhere in the file)."""
    names = {}
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    if alias.asname:
                        names[alias.asname] = alias.name
                    else:
                        names[alias.name.split(".")[0]] = PACKAGE
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(mod, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def _private_uses(mod: Module) -> list[str]:
    found = []
    for imp in _imports(mod):
        if imp.name is not None and _private(imp.name) and imp.module != mod.name:
            found.append(f"{mod.path.relative_to(SRC.parent)}:{imp.line}: imports {imp.name} from {imp.module}")
    aliases = _module_aliases(mod)
    for node in ast.walk(mod.tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        parts = _dotted(node.value)
        if not parts or parts[0] not in aliases:
            continue
        owner = aliases[parts[0]]
        for part in parts[1:]:  # prism_spec.bench.runner._x: walk down while it names a module
            if f"{owner}.{part}" not in MODULES:
                owner = None
                break
            owner = f"{owner}.{part}"
        if owner and owner != mod.name:
            found.append(f"{mod.path.relative_to(SRC.parent)}:{node.lineno}: uses {owner}.{node.attr}")
    return found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_from_other_modules(name):
    found = _private_uses(MODULES[name])
    assert not found, "private names used across modules (make them public where they belong):\n" + "\n".join(found)


def test_private_name_finder(tmp_path):
    code = (
        "from .features import _example_pair, public\n"
        "from . import features\n"
        "from .. import __version__\n"
        "import prism_spec.bench.runner\n"
        "def f():\n"
        "    from ..runtime.autotune import _timed\n"
        "    return features._helper(), prism_spec.bench.runner._x, features.__name__\n"
    )
    mod = Module("prism_spec.train.vocab", SRC / "train" / "vocab.py", ast.parse(code))
    found = sorted(line.split(": ", 1)[1] for line in _private_uses(mod))
    assert found == [
        "imports _example_pair from prism_spec.train.features",
        "imports _timed from prism_spec.runtime.autotune",
        "uses prism_spec.bench.runner._x",
        "uses prism_spec.train.features._helper",
    ]
