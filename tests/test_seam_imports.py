"""No import circle among proxy/ and pool/ modules.

Why: the centre of proxy/ was once a knot (server, exchange, tunnel and listener importing
each other), so a second client protocol could not be added without touching all four. A
circle also makes import order matter and hides which module owns what. This test reads the
imports with ``ast`` (no module is imported), builds the graph of the two packages' modules
and fails on any cycle, naming it. Imports under ``if TYPE_CHECKING:`` are left out: they
never run. Imports inside functions count: they run, and a circle through one still ties
the modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "pool")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``tree`` imports at run time."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            for alias in node.names:
                found.add(f"{base}.{alias.name}")  # `from proxy import exchange`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {
        _module_name(p, root): p
        for pkg in PACKAGES
        for p in (root / pkg).rglob("*.py")
        if p.is_file()
    }
    known = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        # a package's own __init__ is imported on the way to any of its modules: not an edge
        graph[name] = {m for m in _imports(tree, package, known) if m != name}
        graph[name] -= {p for p in PACKAGES if name != p}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == GREY:
                return [*stack[stack.index(nxt) :], nxt]
            if colour.get(nxt) == WHITE:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_proxy_and_pool() -> None:
    graph = import_graph()
    assert "proxy.exchange" in graph and "pool.origin" in graph  # the walk found the modules
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_check_sees_a_cycle(tmp_path: Path) -> None:
    """The detector itself: a circle through a function-level import is found, one through
    a TYPE_CHECKING import is not."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "proxy" / "a.py").write_text("from proxy import b\n")
    (tmp_path / "proxy" / "b.py").write_text("def f():\n    from proxy.a import x\n")
    (tmp_path / "pool" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pool import d\n"
    )
    (tmp_path / "pool" / "d.py").write_text("import pool.c\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) == ["proxy.a", "proxy.b", "proxy.a"]
    assert graph["pool.c"] == set() and graph["pool.d"] == {"pool.c"}


def test_the_seam_keeps_the_exchange_off_the_connection() -> None:
    """The exchange and the tunnel know the client only through proxy.stream: neither
    imports the HTTP/1.1 connection's module (not even for typing)."""
    for name in ("exchange", "exchange_connect", "exchange_relay", "tunnel"):
        text = (ROOT / "proxy" / f"{name}.py").read_text()
        assert "proxy.server" not in text, name
