"""The suite's own layout and helpers: helpers live in helper modules, ports stay apart."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shlex
import socket
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import testorder
from daemonproc import LOWEST_FREE_PORT, NotifyReceiver, ephemeral_ports_start, free_port
from kakao_tokend import systemd
from kakao_tokend.paths import API_SOCKET_NAME

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


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


class FakeWorker:
    """Stands in for an xdist WorkerController: records what the scheduler sends it."""

    def __init__(self, number: int) -> None:
        self.gateway = SimpleNamespace(id=f"gw{number}")
        self.sent: list[int] = []
        self.shutting_down = False

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


class FakeConfig:
    """The two options xdist's LoadScheduling reads: six workers, --maxschedchunk 1."""

    def getvalue(self, name: str) -> list[str]:
        assert name == "tx"
        return ["6*popen"]

    def getoption(self, name: str) -> int:
        assert name == "maxschedchunk"
        return 1


def test_the_scheduler_starts_long_tests_first_and_few_heavy_ones_at_once(tmp_path: Path) -> None:
    """Long tests start first, each with a quick one queued behind it; no more than
    HEAVY_AT_ONCE heavy tests are running or queued at once while a light test is left; a
    worker is shut down when nothing is left."""
    heavy = {f"heavy{i}": [60.0 - i, 20.0] for i in range(5)}
    light = {f"light{i}": [50.0 - i, 0.5] for i in range(3)}
    quick = [f"quick{i}" for i in range(20)]
    estimates = tmp_path / testorder.ESTIMATES_FILE
    estimates.write_text(json.dumps({**heavy, **light}))
    collection = [*quick, *light, *heavy]
    scheduler = testorder.TimedScheduling(FakeConfig(), None, estimates)
    workers = [FakeWorker(number) for number in range(6)]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()

    def name(index: int) -> str:
        return collection[index]

    first = [[name(i) for i in worker.sent] for worker in workers]
    assert [sent[0] for sent in first] == [
        "heavy0",
        "heavy1",
        "heavy2",
        "light0",
        "light1",
        "light2",
    ]
    assert all(sent[1].startswith("quick") for sent in first)
    # heavy0 ends: its worker runs its quick test, and after it the next longest, heavy3
    # (two heavy tests run elsewhere: room for a third).
    scheduler.mark_test_complete(workers[0], workers[0].sent[0])
    assert name(workers[0].sent[-1]) == "heavy3"
    # light0 ends: heavy4 would be the fourth heavy test at once, so a quick test comes next.
    scheduler.mark_test_complete(workers[3], workers[3].sent[0])
    assert name(workers[3].sent[-1]).startswith("quick")
    assert "heavy4" not in [name(i) for w in workers for i in w.sent]
    while scheduler.pending:
        for worker in workers:
            if scheduler.node2pending[worker]:
                scheduler.mark_test_complete(worker, scheduler.node2pending[worker][0])
    assert sorted(name(i) for w in workers for i in w.sent) == sorted(collection)
    for worker in workers:
        while scheduler.node2pending[worker]:
            scheduler.mark_test_complete(worker, scheduler.node2pending[worker][0])
    assert all(worker.shutting_down for worker in workers)


def test_with_only_long_tests_the_shortest_waits_behind_each_long_one(tmp_path: Path) -> None:
    """No quick test left (.ci/soak-test runs only long ones): the test queued behind a long
    one is the shortest left, not the next longest, which would wait there while another
    worker could run it (the 2-minute soak had the 80-second fleet soak behind it: 202 s)."""
    durations = {"soak": [123.0, 12.0], "fleet": [80.0, 15.0], "bench": [53.0, 13.0]}
    smoke = {f"smoke{i}": [5.0 + i, 1.0] for i in range(4)}
    estimates = tmp_path / testorder.ESTIMATES_FILE
    estimates.write_text(json.dumps({**durations, **smoke}))
    collection = [*smoke, *durations]
    scheduler = testorder.TimedScheduling(FakeConfig(), None, estimates)
    workers = [FakeWorker(number) for number in range(6)]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    sent = [[collection[i] for i in worker.sent] for worker in workers]
    assert sent[:4] == [["soak", "smoke0"], ["fleet", "smoke1"], ["bench", "smoke2"], ["smoke3"]]


def test_with_fewer_tests_than_places_every_worker_is_told_to_finish_at_once(
    tmp_path: Path,
) -> None:
    """Three tests on six workers: each worker that got one (or none) is shut down right away,
    or it would wait for a second test forever (a worker runs a test once it knows the next)."""
    estimates = tmp_path / testorder.ESTIMATES_FILE
    estimates.write_text("{}")
    scheduler = testorder.TimedScheduling(FakeConfig(), None, estimates)
    workers = [FakeWorker(number) for number in range(6)]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, ["a", "b", "c"])
    scheduler.schedule()
    assert sorted(i for worker in workers for i in worker.sent) == [0, 1, 2]
    assert all(worker.shutting_down for worker in workers)


#: The longest name pytest gives a test's tmp_path (30 characters and a number, tmpdir.py).
LONGEST_TMP_NAME = "t" * 30 + "10"
#: Where a fleet test's node keeps its API socket below tmp_path (fleetnodes.py, test_fleet_*).
FLEET_SOCKET = Path("fleet0", "node-1", "run", API_SOCKET_NAME)
#: A Unix socket path fits sun_path: 108 bytes with the terminating NUL.
SUN_PATH_MAX = 107


def test_a_fleet_nodes_socket_below_any_tmp_path_fits_a_unix_socket_address(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The run's temporary directory (conftest.py puts it on a tmpfs) leaves room for the
    deepest socket a test makes: a longer one fails with "AF_UNIX path too long" (it did, with
    /dev/shm/kt-tests/pytest-of-root/pytest-N/popen-gwN as the base)."""
    deepest = tmp_path_factory.getbasetemp() / LONGEST_TMP_NAME / FLEET_SOCKET
    assert len(os.fsencode(deepest)) <= SUN_PATH_MAX, deepest


def test_a_daemon_left_running_by_a_test_is_killed_but_a_reused_pid_is_not(
    tmp_path: Path,
) -> None:
    """kill_leftover_daemons kills a started process that still names its config, and leaves
    alone a process whose command line does not (a reaped daemon's pid given to another)."""
    import subprocess
    import sys

    import daemonproc

    config = str(tmp_path / "config.toml")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    left = subprocess.Popen([*sleeper, config])
    other = subprocess.Popen([*sleeper, "something else"])
    try:
        # Popen can return before /proc/PID/cmdline shows the new command line (it did not
        # name the config once in about 15 runs; likely the exec still under way after vfork).
        # A real leftover daemon has been running for a whole test.
        deadline = time.monotonic() + 10
        for process, marker in ((left, config), (other, "something else")):
            cmdline = Path(f"/proc/{process.pid}/cmdline")
            while marker.encode() not in cmdline.read_bytes():
                assert time.monotonic() < deadline, cmdline.read_bytes()
                time.sleep(0.001)
        daemonproc.STARTED[:] = [(left.pid, config), (other.pid, config)]
        killed = daemonproc.kill_leftover_daemons()
        assert killed == [f"{left.pid} ({config})"]
        assert left.wait(10) == -9
        assert other.poll() is None  # still running: not ours
        assert daemonproc.STARTED == []
    finally:
        for process in (left, other):
            process.kill()
            process.wait()


#: The markers of the tests that run a whole bench/ script (pyproject.toml, .ci/soak-test).
SEPARATE_MARKERS = {"pytest.mark.soak", "pytest.mark.bench"}


def runs_a_bench_script(path: Path) -> dict[str, bool]:
    """Return each test function of ``path``: whether it runs a bench/ script as a process
    (calls benchrun.run_quick, or uses a module-level name bound to a path below bench/)."""
    tree = ast.parse(path.read_text())
    scripts = {"run_quick"}
    for node in tree.body:
        parts = ast.walk(node.value) if isinstance(node, ast.Assign) else ()
        if any(isinstance(part, ast.Constant) and part.value == "bench" for part in parts):
            scripts.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return {
        node.name: any(
            isinstance(name, ast.Name) and name.id in scripts
            for statement in node.body
            for name in ast.walk(statement)
        )
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def separate_marks(path: Path) -> dict[str, set[str]]:
    """Return each test function of ``path`` and its soak/bench marker decorators."""
    return {
        node.name: {ast.unparse(d) for d in node.decorator_list} & SEPARATE_MARKERS
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_the_soaks_and_benchmark_runs_are_marked_and_run_by_ci_after_the_readme_command() -> None:
    """Every test that runs a whole bench/ script (a soak, a benchmark's --quick run) is marked
    soak or bench, and no other test is: the default run leaves exactly those out (pyproject's
    -m), .ci/soak-test runs exactly those, and .ci/run calls it after `pytest` with set -e, so
    every test runs in CI and a failing soak fails CI."""
    marked: dict[str, set[str]] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        marks = separate_marks(path)
        for name, runs in runs_a_bench_script(path).items():
            key = f"{path.name}::{name}"
            assert bool(marks[name]) == runs, f"{key}: runs a bench/ script: {runs}, {marks[name]}"
            if runs:
                marked[key] = marks[name]
    assert len(marked) >= 5, marked  # the soaks and both benchmark smoke files were found
    assert all(len(marks) == 1 for marks in marked.values()), marked

    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    addopts = shlex.split(pytest_options["ini_options"]["addopts"])
    assert addopts[addopts.index("-m") + 1] == "not soak and not bench"
    script = (ROOT / ".ci" / "soak-test").read_text()
    assert re.search(r'pytest"? -m "soak or bench"', script), script
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    readme_command = ci.index("\ntime pytest\n")
    assert ci.index("\ntime .ci/soak-test --short\n") > readme_command


def test_the_controller_caches_each_stale_test_modules_rewrite_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh checkout has no rewritten test modules: the controller writes each one's cache
    before the workers start (so fourteen workers do not all rewrite it), and skips a module
    whose cache is current."""
    import conftest

    name = f"test_rewrite_probe_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("def test_probe() -> None:\n    assert 1 + 1 == 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cached = (
        tmp_path
        / "__pycache__"
        / f"{name}.{sys.implementation.cache_tag}-pytest-{pytest.__version__}.pyc"
    )
    try:
        conftest.rewrite_test_modules_once(tmp_path)
        assert cached.exists(), sorted(p.name for p in tmp_path.rglob("*"))
        assert name in sys.modules
        del sys.modules[name]
        conftest.rewrite_test_modules_once(tmp_path)
        assert name not in sys.modules, "a module whose cache is current was imported again"
    finally:
        sys.modules.pop(name, None)


async def test_the_notify_receiver_keeps_more_datagrams_than_the_kernel_queues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Like systemd, the test's $NOTIFY_SOCKET reads each datagram as it arrives. The kernel
    queues only 10 (net.unix.max_dgram_qlen) and the daemon never waits to send: a receiver
    that read only when asked lost STOPPING=1 behind a 3-second token's STATUS= updates."""
    with NotifyReceiver() as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        for number in range(30):
            assert systemd.notify(f"STATUS={number}"), f"datagram {number} was dropped"
            await asyncio.sleep(0.001)  # the test's loop runs between two of the daemon's sends
        assert notify.drain() == [f"STATUS={number}" for number in range(30)]
