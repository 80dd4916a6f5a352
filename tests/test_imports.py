"""The package's modules import each other without a cycle (issue 31): each module sits above those it imports.

The graph is read from the source with ``ast``, not by importing: every intra-package import counts, at module
level or inside a function (a cycle closed by a function-level import still makes the two modules one unit to
read and to change), except those under ``if TYPE_CHECKING:``, which exist for annotations only and never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sinkcache"


def module_name(path: Path) -> str:
    """``sinkcache.cache.layers`` for ``src/sinkcache/cache/layers.py``; a package is named by its ``__init__``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` tests ``TYPE_CHECKING`` (or ``typing.TYPE_CHECKING``): true for type checkers only."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports.

    ``from .x import name`` imports the module ``x.name`` where there is one (a submodule), else the module ``x``
    (a name it defines, ``__init__``'s included).
    """
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in paths}
                continue
            if node.level:
                parent = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)])
                source = f"{parent}.{node.module}" if node.module else parent
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in paths:
                    graph[name].add(target)
                elif source in paths:
                    graph[name].add(source)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as the list of its modules (the first one repeated at the end), or ``None``."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    """Negative controls: the walker finds imports at module level, inside functions, of submodules and of names,
    from the package above, but not those for type checkers; and it finds a cycle when there is one."""
    graph = import_graph()
    assert "sinkcache.compat" in graph["sinkcache.patch"]  # from . import compat (a submodule)
    assert "sinkcache.inputs" in graph["sinkcache.recall"]  # from .inputs import ..., inside recall.main
    assert "sinkcache.cache" in graph["sinkcache"]  # from .cache import SinkCache (a name)
    assert "sinkcache.compat" in graph["sinkcache.cache.sink_cache"]  # from .. import compat
    assert "sinkcache.cache.group" not in graph["sinkcache.cache.layers"]  # under TYPE_CHECKING only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
