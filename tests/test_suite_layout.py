"""The suite's own layout and helpers: helpers live in helper modules, ports stay apart."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

from daemonproc import LOWEST_FREE_PORT, ephemeral_ports_start, free_port

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Return the top-level names of every module ``path`` imports (anywhere in it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_test_module_imports_another_test_module() -> None:
    """Shared helpers and fixtures live in helper modules (daemonproc, served, alertkit, ...)
    and conftest.py. A test module that imports another one ties the two together: moving or
    renaming a test breaks the other, and nobody looks for a shared helper there."""
    offenders = {
        path.name: sorted(name for name in imported_modules(path) if name.startswith("test_"))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_free_port_picks_a_bindable_port_below_the_ephemeral_range() -> None:
    """free_port()'s ports lie where no outgoing connection takes its source port (below the
    kernel's ephemeral range), can be bound, and differ between calls (parallel workers)."""
    start = ephemeral_ports_start()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 10
    for port in ports:
        assert LOWEST_FREE_PORT <= port < start
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
