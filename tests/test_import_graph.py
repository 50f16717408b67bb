"""The package's imports run one way: no module of kakao_tokend imports itself round a cycle,
and the layers point the intended way (the rules at the bottom, the commands on top).

Every import counts, wherever it stands: at the top of a module, inside a function (a lazy
import is still a dependency) and under ``if TYPE_CHECKING:`` (a type is one too). The graph
is read from the source with :mod:`ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import tempfile
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


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Return module -> the package's modules it imports (itself left out).

    Parsing the package costs about 0.4 CPU-s, and the suite's parallel workers each run some
    of these tests: the first leaves the graph in the run's temporary directory, named after
    every module's name, size and modification time, and the others read it from there.
    """
    known = modules()
    stamps = sorted((m, p.stat().st_size, p.stat().st_mtime_ns) for m, p in known.items())
    key = hashlib.sha256(repr(stamps).encode()).hexdigest()[:16]
    saved = Path(tempfile.gettempdir()) / f"kakao-tokend-import-graph-{key}.json"
    try:
        return {module: set(targets) for module, targets in json.loads(saved.read_text()).items()}
    except (OSError, ValueError):
        pass
    graph = {
        module: {target for target in imported(module, path, known) if target != module}
        for module, path in known.items()
    }
    partial = saved.with_name(f"{saved.name}.{os.getpid()}")
    partial.write_text(json.dumps({module: sorted(targets) for module, targets in graph.items()}))
    partial.replace(saved)  # atomic: a reader sees the whole graph or none
    return graph


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


# --------------------------------------------------------------------------- the direction

#: The rules and values at the bottom: no I/O of their own, so every layer above can use them.
PURE = {
    f"{NAME}.{name}"
    for name in (
        "tokens",
        "errors",
        "exitcodes",
        "i18n",
        "paths",
        "relogin",
        "state",
        "status",
        "sidefields",
        "health",
        "storage",
        "supervisor",
        "templates",
    )
}


def importers_of(graph: dict[str, set[str]], target: str) -> set[str]:
    """Return the modules that import ``target``."""
    return {module for module, targets in graph.items() if target in targets}


def test_the_pure_rules_import_only_each_other_and_the_config() -> None:
    """tokens, errors, state, status, relogin, health and the other rule modules reach no
    module that does I/O (Kakao, the files, the scheduler, the daemon): the grading and the
    timing rules stay testable with plain values. The config's dataclasses are what health
    grades against; the config itself reads the rules and, for the key file, fleet.crypto."""
    graph = import_graph()
    for module in sorted(PURE):
        outside = graph[module] - PURE - {f"{NAME}.config"}
        assert outside == set(), f"{module} imports {sorted(outside)}"
    config_reaches = graph[f"{NAME}.config"] - PURE - {f"{NAME}.fleet.crypto"}
    assert config_reaches == set(), f"config imports {sorted(config_reaches)}"


def test_the_daemon_object_does_not_know_what_serves_it() -> None:
    """daemon.py is what the API, hooks, templates and metrics reach; it imports none of them,
    nor the lifecycle or the commands above it."""
    graph = import_graph()
    above = {
        f"{NAME}.{name}"
        for name in ("api", "hooks", "metrics", "template_runner", "service", "cli", "demo")
    }
    assert graph[f"{NAME}.daemon"] & above == set()
    for capability in ("api", "hooks", "metrics", "template_runner"):
        assert f"{NAME}.daemon" in graph[f"{NAME}.{capability}"], capability


def test_one_account_knows_nothing_of_the_daemon_around_it() -> None:
    """refresher.py (one account's cycle) is written against storage.py's seam, not the file
    store, and imports nothing that schedules, serves or alerts."""
    graph = import_graph()
    forbidden = {
        f"{NAME}.{name}"
        for name in (
            "store",
            "scheduler",
            "daemon",
            "service",
            "api",
            "alerts",
            "hooks",
            "metrics",
            "template_runner",
            "cli",
        )
    }
    assert f"{NAME}.storage" in graph[f"{NAME}.refresher"]
    assert graph[f"{NAME}.refresher"] & forbidden == set()


def test_only_the_entry_point_imports_the_command_line() -> None:
    """cli.py is the top: nothing but ``python -m kakao_tokend`` imports it."""
    assert importers_of(import_graph(), f"{NAME}.cli") == {f"{NAME}.__main__"}


def test_the_emulator_stands_apart_from_the_daemon() -> None:
    """The emulator plays Kakao: it shares only the token helpers with the daemon, and only
    the commands that start it (`emulator`, `demo`) import it."""
    graph = import_graph()
    emulator = {module for module in graph if module.startswith(f"{NAME}.emulator")}
    assert len(emulator) > 3, emulator
    for module in sorted(emulator):
        outside = graph[module] - emulator - {f"{NAME}.tokens"}
        assert outside == set(), f"{module} imports {sorted(outside)}"
    users = set().union(*(importers_of(graph, module) for module in emulator)) - emulator
    assert users == {f"{NAME}.cli", f"{NAME}.demo"}


def test_the_direction_checks_can_fail() -> None:
    """The helpers find an importer and an edge that breaks a rule when there is one."""
    graph = {f"{NAME}.tokens": {f"{NAME}.store"}, f"{NAME}.store": set()}
    assert importers_of(graph, f"{NAME}.store") == {f"{NAME}.tokens"}
    assert graph[f"{NAME}.tokens"] - PURE == {f"{NAME}.store"}
