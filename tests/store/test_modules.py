"""The store package's modules import each other in one direction only (no import cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

import tracin.store


def _imports_within(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative imports anywhere, functions included)."""
    graph = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module)
                else:
                    found.update(alias.name for alias in node.names)
        graph[path.stem] = found & {p.stem for p in package.glob("*.py")}
    return graph


def test_store_modules_have_no_import_cycle():
    graph = _imports_within(Path(tracin.store.__file__).parent)
    assert {"_store", "_writer", "_format"} <= graph.keys()
    done: set[str] = set()

    def visit(module: str, chain: list[str]) -> None:
        assert module not in chain, f"import cycle: {' -> '.join([*chain, module])}"
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, [*chain, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
