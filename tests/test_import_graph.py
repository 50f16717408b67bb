"""The package's imports run one way: no module of kakao_tokend imports itself round a cycle.

Every import counts, wherever it stands: at the top of a module, inside a function (a lazy
import is still a dependency) and under ``if TYPE_CHECKING:`` (a type is one too). The graph
is read from the source with :mod:`ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import kakao_tokend

PACKAGE = Path(kakao_tokend.__file__).parent
NAME = "kakao_tokend"


def modules() -> dict[str, Path]:
    """Return every module of the package by its dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = (NAME, *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Yield the package's modules that ``module`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == NAME:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != NAME:
                continue
            for alias in node.names:
                # `from . import x` names a submodule when there is one, else a name in it.
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in known else target


def import_graph() -> dict[str, set[str]]:
    """Return module -> the package's modules it imports (itself left out)."""
    known = modules()
    return {
        module: {target for target in imported(module, path, known) if target != module}
        for module, path in known.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle (its modules, the first repeated at the end), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            if child in on_path:
                return [*path[path.index(child) :], child]
            if child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
                on_path.add(child)
    return None


def test_the_package_has_no_import_cycle() -> None:
    """No module reaches itself through the imports of the modules it imports."""
    graph = import_graph()
    assert len(graph) > 40, sorted(graph)  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check can fail: a graph with a loop is reported with the loop's modules."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_kind_of_import_is_an_edge() -> None:
    """Top-level, lazy (inside a function) and TYPE_CHECKING imports all count."""
    graph = import_graph()
    assert "kakao_tokend.apiclient" in graph["kakao_tokend.cli"]  # lazy, inside commands
    assert "kakao_tokend.fleet.crypto" in graph["kakao_tokend.config"]  # TYPE_CHECKING and lazy
    assert "kakao_tokend.daemon" in graph["kakao_tokend.api"]  # at the top


def test_the_lifecycle_is_on_top() -> None:
    """Only the command line (and the demo, which runs the service) import service.py: the
    capabilities reach the running daemon through daemon.py, never through its lifecycle."""
    graph = import_graph()
    importers = {module for module, targets in graph.items() if "kakao_tokend.service" in targets}
    assert importers == {"kakao_tokend.cli", "kakao_tokend.demo"}
