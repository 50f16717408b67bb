"""Shared pytest fixtures, and what makes the suite run in parallel (pytest-xdist)."""

from __future__ import annotations

import compileall
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import kakao_tokend
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
# pytest_xdist_auto_num_workers below), `--dist load --maxschedchunk 1`. The tests mostly wait
# for real processes and second-long tokens, so more workers than cores pay off.
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
    """Two workers per core, at least four: the tests mostly wait, they rarely compute.

    Measured on 2 cores (2026-12-02): the tests' wall times add up to about 1,400 s and their
    CPU time (with every process they start) to about 270 s. On a quiet machine 8 workers
    took 3 m 07 s - 3 m 12 s but a timing test failed in four runs out of five (a fleet test
    whose tokens live 5-6 s, or a daemon that did not stop in time); 6 took 3 m 34 s and
    passed twice, then a clean-checkout CI run failed a fleet test whose covering nodes fell
    behind. With the cores that busy the tests' second-long waits compete for the CPU, so two
    per core (about 5 minutes), which CI has passed with.
    """
    return max(4, 2 * len(os.sched_getaffinity(0)))


def pytest_configure(config: pytest.Config) -> None:
    """Keep bytecode caches; in the controller (or a plain run) also compile the package once
    and make the directory the workers share.

    Some environments set PYTHONDONTWRITEBYTECODE=1. Then every worker would rewrite the
    asserts of every test module again, and every `python -m kakao_tokend` child would compile
    the package from source: together about a minute of CPU per run. So this process writes
    the caches (into the ignored __pycache__ directories), and the children read them.
    """
    sys.dont_write_bytecode = False
    if is_xdist_worker(config):
        return
    compileall.compile_dir(Path(kakao_tokend.__file__).parent, quiet=1)
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the slow tests first, longest first, each on its own worker.

    A 2-minute soak that started last would end the run alone two minutes after everything
    else. xdist (--dist load --maxschedchunk 1) hands each worker two tests at first and then
    one test whenever it finishes one; a quick test after each slow one keeps two slow tests
    off the same worker at the start.
    """

    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        assert marker is not None
        return float(marker.kwargs.get("seconds", marker.args[0] if marker.args else 0))

    slow = sorted((i for i in items if i.get_closest_marker("slow")), key=seconds, reverse=True)
    quick = [i for i in items if not i.get_closest_marker("slow")]
    ordered: list[pytest.Item] = []
    for item in slow:
        ordered.append(item)
        if quick:
            ordered.append(quick.pop(0))
    items[:] = ordered + quick
