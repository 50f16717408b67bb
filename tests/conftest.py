"""Shared pytest fixtures, and what makes the suite run in parallel (pytest-xdist)."""

from __future__ import annotations

import compileall
import importlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import kakao_tokend
import testorder
from alertkit import command, make_harness, webhook
from diskfull import tiny_state_fs
from kakao_tokend.emulator import EmulatorSettings, KakaoEmulator, running_emulator
from kakao_tokend.kakao import create_session
from loginproc import start_login
from pgcluster import (
    SHARED_DIR_INPUT,
    SHARED_DIR_KEY,
    TEMPLATE_ENV,
    pg_cluster,
    pg_dsn,
    pg_server,
    stop_shared_server,
)

# A test that times out prints its asyncio tasks' await chains too (asynctimeout.py).
pytest_plugins = ("asynctimeout",)

# Fixtures that live in helper modules: PostgreSQL (pgcluster.py), a full disk (diskfull.py),
# alert receivers and the alert harness (alertkit.py), login processes (loginproc.py).
__all__ = [
    "command",
    "make_harness",
    "pg_cluster",
    "pg_dsn",
    "pg_server",
    "start_login",
    "tiny_state_fs",
    "webhook",
]

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def emulator() -> AsyncIterator[KakaoEmulator]:
    """Run a Kakao emulator on 127.0.0.1:0 with rate limits high enough for fast tests.

    Change ``emulator.settings`` (lifetimes, window, rates, consent ...) inside a test as needed;
    the emulator reads them on every request.
    """
    settings = EmulatorSettings(access_rate=(10_000, 600), refresh_rate=(10_000, 3600))
    async with running_emulator(settings) as emu:
        yield emu


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session from the production factory (kakao.create_session), closed afterwards."""
    http = create_session()
    try:
        yield http
    finally:
        await http.close()


# --------------------------------------------------------------------------- parallel runs
#
# pyproject.toml runs the suite with pytest-xdist: `-n auto` (the number comes from
# pytest_xdist_auto_num_workers below), `--dist load`, which pytest_xdist_make_scheduler below
# replaces with tests/testorder.py's scheduler (longest first, few CPU-heavy tests at once).
# The tests mostly wait for real processes and second-long tokens, so more workers than cores
# pay off. Their temporary files live on a tmpfs when there is a roomy one (below).
#
# What each worker must not share: every test writes below its own tmp_path (per worker), binds
# port 0 or asks free_port(), and names its sockets after tmp_path. The PostgreSQL server is
# the one thing all workers share on purpose (pgcluster.py: one cluster, a database per test).


#: The directory of the run's PostgreSQL template (pgcluster.py), when this run made it.
TEMPLATE_KEY = pytest.StashKey[Path]()


def is_xdist_worker(config: pytest.Config) -> bool:
    """Return True inside a pytest-xdist worker (False in the controller or a plain run)."""
    return hasattr(config, "workerinput")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Seven workers per core, four to fourteen: the tests mostly wait, they rarely compute.

    Measured on 2 cores (2026-12-02): the tests' wall times add up to about 1,400 s and their
    CPU time (with every process they start) to about 250 s, one second in six, so five
    waiting workers keep a core busy. What made more workers fail timing tests before was
    several fleet tests side by side: tests/testorder.py now runs at most three CPU-heavy
    tests at once. By 2026-12-03 the recorded wall times (tests/durations.json plus about
    0.1 s for each quick test) added up to 2,000-2,100 s, so ten workers could not finish in
    under about 205 s whatever the CPU did (a replay of those times with the scheduler's
    rules: 10 workers 205-218 s, 12 172-182 s, 14 158-163 s), while the run's CPU (about
    310 CPU-s) is 155 s of two busy cores. Twelve brought the two limits together.

    Since the soaks and the benchmarks' quick runs left the default run for .ci/soak-test
    (2026-12-03: 324 s of recorded wall time, about 60 CPU-s), the same replay gives 12
    workers 165 s and 14 145 s, while the CPU left (about 265 CPU-s) is some 135 s of two
    cores: the workers' share is the limit again, and fourteen bring the two together. More
    only add contention and each worker's own start and collection (about 2.3 CPU-s).
    """
    return max(4, min(14, 7 * len(os.sched_getaffinity(0))))


#: A memory file system for the run's temporary files, when the machine has a roomy one.
MEMORY_FS = Path("/dev/shm")
#: Below this much free room the disk is used (a container's /dev/shm is often 64 MiB; a run
#: keeps a few hundred MiB there at its peak: PostgreSQL clusters of 40 MiB each).
MEMORY_FS_ROOM = 4 << 30
#: The run's directory on the memory file system, when it uses one.
MEMORY_RUN_KEY = pytest.StashKey[Path]()
#: Whether every test passed (then the run's directory on the memory file system goes).
PASSED_KEY = pytest.StashKey[bool]()


def use_memory_for_temporary_files(config: pytest.Config) -> None:
    """Put tmp_path, the PostgreSQL clusters and every temporary file of the run on a tmpfs.

    The code under test is the same; what changes is what the disk costs. On the 2-core
    development machine's ext4 a copy of a PostgreSQL data directory (966 files) took 0.35
    CPU-seconds of system time and 0.07 on tmpfs, and every state save's fsync waits for the
    disk; the suite's system CPU went from 45-49 s to 31 s.

    One directory per run (TMPDIR, inherited by the workers and every process they start), and
    in it pytest's base directory "t": tmp_path is then <run>/t/popen-gwN/<test>, shorter than
    /tmp/pytest-of-USER/pytest-N/popen-gwN/<test> (Unix socket paths below tmp_path must stay
    under 108 bytes). A run that passed removes its directory; one that failed keeps it for a
    look. TMPDIR or --basetemp given by the caller wins.
    """
    if "TMPDIR" in os.environ or config.option.basetemp:
        return
    try:
        room = os.statvfs(MEMORY_FS)
        if room.f_bavail * room.f_frsize < MEMORY_FS_ROOM:
            return
        run = Path(tempfile.mkdtemp(prefix="kt-", dir=MEMORY_FS))
    except OSError:
        return
    # Like /tmp: the tests run as root hand directories to other users (postgres, nobody).
    run.chmod(0o1777)
    config.stash[MEMORY_RUN_KEY] = run
    os.environ["TMPDIR"] = str(run)
    tempfile.tempdir = None  # computed again from TMPDIR at the next use
    config.option.basetemp = str(run / "t")  # read by pytest's tmp_path factory after this


def skip_loading_the_ca_bundle() -> None:
    """Let the run's processes skip reading the system's CA bundle: no test speaks TLS.

    Importing aiohttp builds two TLS contexts, and each reads the whole CA bundle
    (SSL_CERT_FILE, else OpenSSL's default file; 144 certificates here): 0.02-0.03 CPU-s each,
    about 0.05 of the 0.2 CPU-s an `import aiohttp` costs. Every `kakao-tokend run`, most CLI
    commands, the emulator, each benchmark's children and every worker import it: some 400
    processes per run, about 20 CPU-s. The tests talk plain HTTP over loopback, so the bundle
    is never used; /dev/null as the file makes both contexts empty. The hashed certificate
    directory (SSL_CERT_DIR, or OpenSSL's default one) stays, read only when a certificate is
    looked up, so a TLS connection would still be verified where the system keeps one.
    """
    os.environ["SSL_CERT_FILE"] = os.devnull


def rewrite_test_modules_once(tests: Path) -> None:
    """Before the workers start: import each test module whose assert-rewritten bytecode is
    missing or older than its source, so that pytest rewrites and caches it once.

    In a fresh checkout (CI's clean clone) there is no such cache, and every worker rewrote
    every test module at the same moment: 14 × about 85 modules, some 60 CPU-s of a run that
    has about 250 (measured 2026-12-03: a fresh clone's run took 218 s and 330 user CPU-s,
    the same clone's second run 173 s and 254). Importing them here costs about 2 s once;
    a checkout whose caches are current skips it. A module that fails to import is left to
    the workers, which report it as the collection error it is.
    """
    # pytest's name for a rewritten module's cache (if it ever changes, every module looks
    # stale and is imported here at each run: slower by about 2 s, still correct).
    tag = f"{sys.implementation.cache_tag}-pytest-{pytest.__version__}"
    for source in sorted(tests.glob("test_*.py")):
        cached = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
        try:
            if cached.stat().st_mtime >= source.stat().st_mtime:
                continue
        except OSError:
            pass
        try:
            importlib.import_module(source.stem)
        except Exception:  # the worker that collects it says what is wrong
            continue


def pytest_configure(config: pytest.Config) -> None:
    """Keep bytecode caches; in the controller (or a plain run) also compile the package once
    and make the directory the workers share.

    Some environments set PYTHONDONTWRITEBYTECODE=1. Then every worker would rewrite the
    asserts of every test module again, and every `python -m kakao_tokend` child would compile
    the package from source: together about a minute of CPU per run. So this process writes
    the caches (into the ignored __pycache__ directories), and the children read them.

    The controller also starts the workers and every other process of the run without
    PYTHONDONTWRITEBYTECODE: pytest imports its plugins, and rewrites their asserts, before
    this hook runs, so a worker started with it rewrote some 35 plugin modules (xdist,
    pytest-asyncio, pytest-aiohttp, hypothesis's ...) from source at every start, about
    0.1 CPU-s each time, all workers at once while the run begins.
    """
    sys.dont_write_bytecode = False
    if is_xdist_worker(config):
        return
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(Path(kakao_tokend.__file__).parent, quiet=1)
    if config.getoption("dist", "no") != "no" and config.getoption("numprocesses", 0):
        rewrite_test_modules_once(Path(__file__).parent)
    use_memory_for_temporary_files(config)
    skip_loading_the_ca_bundle()
    config.stash[SHARED_DIR_KEY] = Path(tempfile.mkdtemp(prefix="tokend-pytest-"))
    # One initdb per run: the workers and the processes they start inherit this (pgcluster.py).
    # Its own directory in /tmp, not in the shared one: as root, initdb runs as 'postgres',
    # which cannot enter the shared (0700 root) directory.
    if TEMPLATE_ENV not in os.environ:
        config.stash[TEMPLATE_KEY] = Path(tempfile.mkdtemp(prefix="tokend-pg-template-"))
        os.environ[TEMPLATE_ENV] = str(config.stash[TEMPLATE_KEY])


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Tell each pytest-xdist worker where the directory shared by all workers is."""
    node.workerinput[SHARED_DIR_INPUT] = str(node.config.stash[SHARED_DIR_KEY])


def pytest_unconfigure(config: pytest.Config) -> None:
    """After the last worker ended: stop the shared PostgreSQL server, remove the directory."""
    if is_xdist_worker(config) or SHARED_DIR_KEY not in config.stash:
        return
    shared = config.stash[SHARED_DIR_KEY]
    stop_shared_server(shared)
    shutil.rmtree(shared, ignore_errors=True)
    if TEMPLATE_KEY in config.stash:
        shutil.rmtree(config.stash[TEMPLATE_KEY], ignore_errors=True)
        os.environ.pop(TEMPLATE_ENV, None)
    if MEMORY_RUN_KEY in config.stash and config.stash.get(PASSED_KEY, False):
        shutil.rmtree(config.stash[MEMORY_RUN_KEY], ignore_errors=True)


#: While --record-durations is on: each test's phases as (nodeid, seconds, CPU seconds), in the
#: controller or a plain run (pytest_runtest_logreport is given no config to keep them in).
RECORDED: dict[str, list[tuple[str, float, float]]] = {}
#: In a worker, the CPU time (its own and its reaped children's) when a test began.
CPU_AT_START = pytest.StashKey[float]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """--record-durations: rewrite tests/durations.json from this run's times; --timeline FILE:
    write when and where each test ran."""
    parser.addoption(
        "--record-durations",
        action="store_true",
        help="write each test's wall and CPU time (>= 0.5 s) to tests/durations.json, which"
        " orders the run (tests/testorder.py)",
    )
    parser.addoption(
        "--timeline",
        metavar="FILE",
        help="append one JSON line per test (worker, start and end wall-clock time, CPU"
        " seconds) and per worker start to FILE: where a run's wall time goes. Write it"
        " --timeline=FILE: xdist's workers parse the arguments before they know the option,"
        " and a separate FILE would read as a test path",
    )


def timeline(config: pytest.Config, **record: Any) -> None:
    """With --timeline: append one record (a line, written at once: workers share the file)."""
    path = config.getoption("timeline")
    if path:
        record["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(Path(config.rootpath, path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests longest first and, in a worker, leave the estimates for the scheduler."""
    recorded = testorder.read_durations()
    estimates = {item.nodeid: testorder.estimate(item, recorded) for item in items}
    items[:] = testorder.longest_first(items, estimates)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        shared = Path(workerinput[SHARED_DIR_INPUT])
        testorder.write_estimates(shared / testorder.ESTIMATES_FILE, estimates)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With --dist load (pyproject.toml's): the scheduler of tests/testorder.py."""
    if config.getvalue("dist") != "load":
        return None
    shared = config.stash[SHARED_DIR_KEY]
    return testorder.TimedScheduling(config, log, shared / testorder.ESTIMATES_FILE)


def cpu_seconds() -> float:
    """Return this process's CPU time plus that of the children it has reaped."""
    mine, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """With --record-durations: note the CPU time when the test begins; with --timeline: write
    when and where it ran."""
    if item.config.getoption("record_durations"):
        item.stash[CPU_AT_START] = cpu_seconds()
    start, cpu = time.time(), cpu_seconds()
    result = yield
    timeline(item.config, test=item.nodeid, start=start, end=time.time(), cpu=cpu_seconds() - cpu)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """With --record-durations: the teardown report carries the test's CPU time."""
    report: pytest.TestReport = yield
    if call.when == "teardown" and CPU_AT_START in item.stash:
        report.user_properties.append(("cpu", cpu_seconds() - item.stash[CPU_AT_START]))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With --record-durations: keep each phase's time (in the controller, or a plain run)."""
    recorded = RECORDED.get("reports")
    if recorded is not None:
        cpu = sum(float(value) for name, value in report.user_properties if name == "cpu")
        recorded.append((report.nodeid, report.duration, cpu if report.when == "teardown" else 0))


def pytest_sessionstart(session: pytest.Session) -> None:
    """With --record-durations, start recording (not in xdist workers: the controller does);
    with --timeline, note when this process got here (a worker: when its start is over)."""
    timeline(session.config, event="sessionstart", at=time.time())
    if session.config.getoption("record_durations") and not is_xdist_worker(session.config):
        RECORDED["reports"] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Note whether the run passed; with --record-durations, write the times of the tests that
    took long enough (a test that ran shorter is taken out)."""
    session.config.stash[PASSED_KEY] = exitstatus == 0
    timeline(session.config, event="sessionfinish", at=time.time(), cpu=cpu_seconds())
    reports = RECORDED.pop("reports", None)
    if reports is None:
        return
    # A run of some files updates their tests and keeps the others' times.
    ran = {nodeid for nodeid, _, _ in reports}
    known = {k: [e.seconds, e.cpu] for k, e in testorder.read_durations().items() if k not in ran}
    merged = dict(sorted({**known, **testorder.recorded_durations(reports)}.items()))
    testorder.DURATIONS.write_text(testorder.format_durations(merged))


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Any:
    """Put the root logger's level and handlers back after each test.

    The CLI run in-process sets the root level above CRITICAL (a quiet command line), and
    `run` installs its own handler: without this, a later test in the same worker finds its
    log records dropped before caplog sees them, and fails only in some orders.
    """
    import logging

    from kakao_tokend.logs import _HANDLER_MARK

    root = logging.getLogger()
    level, handlers = root.level, set(root.handlers)
    yield
    root.setLevel(level)
    for added in set(root.handlers) - handlers:
        if getattr(added, _HANDLER_MARK, False):  # ours; pytest removes its own
            root.removeHandler(added)


@pytest.fixture(autouse=True)
def _supervisor_restored() -> Any:
    """Put this process's supervisor (supervisor.current: which unit's log and restart the
    texts name) back after each test: the CLI run in-process sets it from its config, and
    a later test's texts would otherwise depend on the order."""
    from kakao_tokend import supervisor

    before = supervisor.current()
    yield
    supervisor.use(before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """After a test's fixtures are torn down, kill any daemon it left running (and say so)."""
    result = yield
    import warnings

    from daemonproc import kill_leftover_daemons

    killed = kill_leftover_daemons()
    if killed:
        warnings.warn(
            f"{item.nodeid} left daemons running; killed {', '.join(killed)}", stacklevel=1
        )
    return result
