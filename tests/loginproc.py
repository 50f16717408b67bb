"""The real `kakao-tokend login --no-browser` process, and a browser's side of its flow."""

from __future__ import annotations

import asyncio
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
    config: Path, *extra: str, timeout: str = "30s"
) -> asyncio.subprocess.Process:
    """Start the real `kakao-tokend login --no-browser` on ``config``, its three pipes open.

    KAKAO_TOKEND_* variables of the test's own environment are left out, so only ``config``
    and ``extra`` decide what the process does.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAKAO_TOKEND")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kakao_tokend",
        "--config",
        str(config),
        "login",
        "--no-browser",
        "--timeout",
        timeout,
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def read_authorize_url(proc: asyncio.subprocess.Process) -> tuple[str, list[str]]:
    """Read a login process's stderr up to its paste prompt; return the URL it printed and
    every line read (they are part of what the test later checks)."""
    assert proc.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(20):
        while True:
            line = (await proc.stderr.readline()).decode()
            seen.append(line)
            if not line:
                raise AssertionError("login exited early: " + "".join(seen))
            if "paste here" in line:
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

    async def start(*extra: str) -> LoginProcess:
        proc = await spawn_login(config, *extra)
        procs.append(proc)
        url, seen = await read_authorize_url(proc)
        return LoginProcess(proc, url, seen)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


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
