"""The import graph of ``leverlm`` is acyclic, between files and between subpackages.

Every import counts, also those inside functions or under ``TYPE_CHECKING``: a lazy import
still ties two modules together. Relative imports and ``from pkg import name`` (where
``name`` is a submodule) are resolved to the module they load.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import leverlm

ROOT = Path(leverlm.__file__).resolve().parent


@functools.cache
def module_names() -> dict[str, Path]:
    """``leverlm.x.y`` -> its file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["leverlm", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` loads: itself, or the nearest enclosing package that exists."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``leverlm`` modules ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` loads pkg.sub when sub is a module; else it is a name in pkg
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "leverlm" or target.startswith("leverlm."):
                resolved = _resolve(target, modules)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


def file_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def node_of(module: str) -> str:
    """A module's subpackage node: ``leverlm.gt.beam`` -> ``leverlm.gt``; top-level modules
    (``leverlm.utils``) and the package itself are nodes of their own."""
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / parts[1] / "__init__.py").exists():
        return ".".join(parts[:2])
    return module


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in file_graph().items():
        node = node_of(module)
        edges = graph.setdefault(node, set())
        edges |= {node_of(t) for t in targets} - {node}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative DFS, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_graph_sees_lazy_relative_and_from_imports(tmp_path) -> None:
    modules = {"leverlm": ROOT, "leverlm.a": ROOT, "leverlm.a.b": ROOT, "leverlm.c": ROOT}
    src = tmp_path / "b.py"
    src.write_text(
        "def f():\n    from leverlm.c import thing\n"
        "from . import b\nfrom .. import c\nimport leverlm.a.b.missing\n",
        encoding="utf-8",
    )
    assert imports_of("leverlm.a.x", src, modules) == {"leverlm.a.b", "leverlm.c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_cycle_between_files() -> None:
    cycle = find_cycle(file_graph())
    assert cycle is None, "import cycle between files: " + " -> ".join(cycle)


def test_no_cycle_between_subpackages() -> None:
    graph = package_graph()
    assert {"leverlm.utils", "leverlm.gt", "leverlm.lever"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle)
