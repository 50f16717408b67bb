"""Alert channels against real loopback servers: hosts that refuse or never answer, and
reloads of a running daemon that add, remove and reconfigure channels."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from alertkit import Command, Receiver, alerts_toml
from daemonproc import login, run_cli, start_daemon, write_config
from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def refused_url() -> str:
    """A loopback URL whose port nobody listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook/secret-path"


class Silent:
    """A TCP server that accepts connections, reads the request and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.url = ""
        self._writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        await reader.read(65536)
        await asyncio.Event().wait()  # hold the connection open, say nothing


@pytest.fixture
async def silent() -> AsyncIterator[Silent]:
    """Run a Silent server on 127.0.0.1."""
    server_state = Silent()
    server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server_state.url = f"http://127.0.0.1:{port}/hook/secret-path"
    yield server_state
    server.close()
    for writer in server_state._writers:
        writer.close()


async def test_a_webhook_host_that_refuses_connections_is_retried_then_given_up(
    make_harness: Any,
    emulator: KakaoEmulator,
    command: Command,
    refused_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connection refused: each try fails at once, 1 + webhook_retries tries are logged with
    the reason, then it gives up; the command channel and the refresh are not held up."""
    caplog.set_level(logging.WARNING, logger="kakao_tokend.alerts")
    extra = alerts_toml(None, command) + f'webhook_url = "{refused_url}"\nwebhook_retries = 2\n'
    emulator.settings.refresh_lifetime = 100
    harness = await make_harness(extra + 'thresholds = ["60s"]\n')
    started = time.monotonic()
    harness.offset = 45
    assert [a.condition for a in harness.center.evaluate()] == ["refresh_expiry"]
    before = harness.manager.state.generation
    await asyncio.wait_for(harness.manager.refresh(force=True, reason="test"), 2)
    assert harness.manager.state.generation == before + 1
    assert await harness.center.wait_delivered(10)
    assert time.monotonic() - started < 5  # bounded: refused connections fail fast
    # The expiry alert and its resolution (the refresh rotated the token), each 3 tries.
    attempts = [r.getMessage() for r in caplog.records if "via webhook" in r.getMessage()]
    assert len(attempts) == 6, attempts
    assert all("ClientConnectorError" in line for line in attempts)
    assert sum("attempt 3/3" in line and "giving up" in line for line in attempts) == 2
    assert sum("retrying" in line for line in attempts) == 4
    assert "secret-path" not in caplog.text
    assert command.conditions() == ["refresh_expiry"]
    assert command.conditions("resolved") == ["refresh_expiry"]


async def test_a_webhook_that_never_answers_times_out_each_try_and_never_blocks_a_stop(
    make_harness: Any,
    emulator: KakaoEmulator,
    silent: Silent,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host that accepts and then says nothing: every try ends at webhook_timeout, the
    retries are made and logged, and closing the alert center does not wait for it."""
    caplog.set_level(logging.WARNING, logger="kakao_tokend.alerts")
    extra = (
        '[alerts]\nkakaotalk = false\nthresholds = ["60s"]\n'
        f'webhook_url = "{silent.url}"\nwebhook_timeout = "0.5s"\nwebhook_retries = 1\n'
    )
    emulator.settings.refresh_lifetime = 100
    harness = await make_harness(extra)
    started = time.monotonic()
    harness.offset = 45
    assert [a.condition for a in harness.center.evaluate()] == ["refresh_expiry"]
    assert await harness.center.wait_delivered(10)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 4, elapsed  # two tries of 0.5 s plus the retry pause, no more
    assert silent.connections == 2
    lines = [r.getMessage() for r in caplog.records if "via webhook" in r.getMessage()]
    assert len(lines) == 2 and all("no answer within 0.5s" in line for line in lines)
    assert "attempt 2/2" in lines[1] and "giving up" in lines[1]
    # A delivery that hangs when the daemon stops is abandoned after the close grace.
    harness.offset = 101  # expired: escalates to a new critical alert
    assert [a.condition for a in harness.center.evaluate()] == ["refresh_expiry"]
    await asyncio.sleep(0.1)
    assert silent.connections == 3
    started = time.monotonic()
    await harness.center.close(grace=0.2)
    assert time.monotonic() - started < 1.5
    harness.center = None


def _alerts(*lines: str) -> str:
    return "\n".join(["[alerts]", "kakaotalk = false", *lines]) + "\n"


async def test_reload_adds_removes_and_reconfigures_alert_channels(
    emulator: KakaoEmulator,
    tmp_path: Path,
    command: Command,
) -> None:
    """A running daemon: webhook A; reload to webhook B plus a command; reload to B for
    critical alerts only and no command. Each alert goes exactly where the configuration of
    the moment says, A gets nothing after it was removed, and the daemon never restarts."""
    receivers = {"A": Receiver(), "B": Receiver()}
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        receivers[request.match_info["who"]].posts.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{who}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = {who: f"http://127.0.0.1:{port}/{who}" for who in receivers}
    a, b = receivers["A"], receivers["B"]

    emulator.settings.access_lifetime = 3

    def configure(section: str) -> Path:
        path = write_config(tmp_path, emulator, extra=section)
        path.chmod(0o600)  # an inline webhook URL is a secret: refused in a readable config
        return path

    config = configure(_alerts(f'webhook_url = "{url["A"]}"'))
    await login(emulator, config)
    emulator.revoke_user_tokens(DEFAULT_USER_ID)  # the start-up check finds it: relogin
    daemon = await start_daemon(config)
    try:
        pid = daemon.pid
        await daemon.wait_for(lambda: a.conditions() == ["relogin"], what="relogin on A")

        # 2. A removed, B and a command added.
        configure(_alerts(f'webhook_url = "{url["B"]}"', f"command = {command.toml()}"))
        code, out, err = await run_cli(config, "reload")
        assert code == 0, out + err
        await login(emulator, config)  # a new login resolves the relogin alert
        await daemon.wait_for(
            lambda: (
                b.conditions("resolved") == ["relogin"]
                and command.conditions("resolved") == ["relogin"]
            ),
            what="resolution on B and the command",
        )
        assert a.conditions("resolved") == [] and len(a.posts) == 1

        # 3. B only for critical alerts, the command removed. An expiry ladder whose one
        # threshold lies beyond the token's life warns at once (critical only when expired).
        calls = len(command.calls())
        configure(
            _alerts(
                f'webhook_url = "{url["B"]}"',
                'webhook_min_severity = "critical"',
                'thresholds = ["1000d"]',
                'critical_below = "1s"',
            )
        )
        code, out, err = await run_cli(config, "reload")
        assert code == 0, out + err
        await daemon.wait_log("ALERT warning: account default: refresh_expiry")
        await asyncio.sleep(0.5)
        assert "refresh_expiry" not in b.conditions()
        await login(emulator, config)
        emulator.revoke_user_tokens(DEFAULT_USER_ID)  # the next refresh (3 s tokens) fails
        await daemon.wait_for(
            lambda: b.conditions() == ["relogin"], timeout=15, what="critical on B"
        )
        assert len(command.calls()) == calls
        assert len(a.posts) == 1
        assert daemon.pid == pid and daemon.proc.returncode is None
    finally:
        assert await daemon.stop() == 0
        await runner.cleanup()
