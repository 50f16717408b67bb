"""The real `kakao-tokend login --no-browser` process, and a browser's side of its flow."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from daemonproc import free_port, write_login_config
from kakao_tokend.emulator import KakaoEmulator


async def spawn_login(
    config: Path, *extra: str, timeout: str = "30s", browser: Path | None = None
) -> asyncio.subprocess.Process:
    """Start the real `kakao-tokend login --no-browser` on ``config``, its three pipes open.

    With ``browser`` (a program, see :func:`fake_browser`) the login opens that browser
    instead: no --no-browser, a DISPLAY, and BROWSER naming it (Python's webbrowser honours it).
    KAKAO_TOKEND_* variables of the test's own environment are left out, so only ``config``
    and ``extra`` decide what the process does.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAKAO_TOKEND")}
    if browser is not None:
        env.update(DISPLAY=":0", BROWSER=str(browser))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kakao_tokend",
        "--config",
        str(config),
        "login",
        *(() if browser is not None else ("--no-browser",)),
        "--timeout",
        timeout,
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def read_authorize_url(
    proc: asyncio.subprocess.Process, *, until: str = "paste here"
) -> tuple[str, list[str]]:
    """Read a login process's stderr up to its paste prompt (or the line holding ``until``);
    return the URL it printed and every line read (they are part of what the test later
    checks)."""
    assert proc.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(20):
        while True:
            line = (await proc.stderr.readline()).decode()
            seen.append(line)
            if not line:
                raise AssertionError("login exited early: " + "".join(seen))
            if until in line:
                break
    urls = [s.strip() for s in seen if s.strip().startswith("http")]
    assert urls, "".join(seen)
    return urls[0], seen


@dataclass
class LoginProcess:
    """A running `kakao-tokend login --no-browser` and the URL it printed."""

    proc: asyncio.subprocess.Process
    url: str
    seen: list[str]

    async def finish(self, timeout: float = 20) -> tuple[int, str, str]:
        """Wait for the exit; return (code, stdout, all of stderr)."""
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        code = self.proc.returncode
        assert code is not None
        return code, out.decode(), "".join(self.seen) + err.decode()


@pytest.fixture
async def start_login(
    tmp_path: Path, emulator: KakaoEmulator
) -> AsyncIterator[Callable[..., Awaitable[LoginProcess]]]:
    """Start login processes against the emulator; kill leftovers at the end."""
    config = write_login_config(tmp_path, emulator, redirect_port=free_port())
    procs: list[asyncio.subprocess.Process] = []

    async def start(*extra: str, browser: Path | None = None) -> LoginProcess:
        proc = await spawn_login(config, *extra, browser=browser)
        procs.append(proc)
        # With a browser nothing is read from stdin: no paste prompt, the waiting line instead.
        url, seen = await read_authorize_url(
            proc, until="paste here" if browser is None else "Waiting for Kakao"
        )
        return LoginProcess(proc, url, seen)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


#: A stand-in for a web browser: records its arguments (JSON, one line per start) in a file
#: next to it, then exits at once as xdg-open does.
FAKE_BROWSER = """#!{python}
import json, sys
with open({record!r}, "a") as record:
    record.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def fake_browser(directory: Path) -> tuple[Path, Path]:
    """Write a fake browser program into ``directory``; return it and the file it records
    each command line in (what `ps` shows every local user while a browser starts)."""
    program = directory / "fake-browser"
    record = directory / "browser-argv.jsonl"
    program.write_text(FAKE_BROWSER.format(python=sys.executable, record=str(record)))
    program.chmod(0o755)
    return program, record


def _first_start(record: Path) -> list[str] | None:
    try:
        lines = record.read_text().splitlines()
    except FileNotFoundError:
        return None
    return json.loads(lines[0]) if lines else None


async def browser_argv(record: Path) -> list[str]:
    """Wait for the fake browser's first start; return its arguments."""
    async with asyncio.timeout(10):
        while (arguments := _first_start(record)) is None:
            await asyncio.sleep(0.05)
    return arguments


async def follow_authorize(url: str) -> str:
    """GET the authorize URL like a browser would, and return the redirect's Location."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, allow_redirects=False) as response,
    ):
        assert response.status == 302, await response.text()
        return response.headers["Location"]


async def get_page(url: str) -> tuple[int, str]:
    """GET a page (the CLI's loopback callback) and return (status, body)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def with_query(url: str, **changes: str) -> str:
    """Return ``url`` with some query parameters replaced."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))
