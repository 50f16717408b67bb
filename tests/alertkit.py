"""Alert test kit: loopback webhook and command receivers, and an in-process manager with an
alert center on a shiftable clock."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemonproc import login, write_config
from kakao_tokend.alerts import Alert, AlertCenter
from kakao_tokend.config import load_config
from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.refresher import AccountManager
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import utcnow

# --------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    """A loopback webhook receiver that records every JSON body it gets."""

    posts: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    status: int = 200
    delay: float = 0.0
    url: str = ""

    def conditions(self, state: str = "firing") -> list[str]:
        """Return the conditions of the recorded alerts in ``state``, in order."""
        return [p["condition"] for p in self.posts if p["state"] == state]


@pytest.fixture
async def webhook() -> AsyncIterator[Receiver]:
    """Run a webhook receiver on 127.0.0.1 (status and delay adjustable per test)."""
    receiver = Receiver()

    async def handle(request: web.Request) -> web.Response:
        receiver.attempts += 1
        body = await request.json()
        if receiver.delay:
            await asyncio.sleep(receiver.delay)
        if receiver.status == 200:
            receiver.posts.append(body)
        return web.Response(status=receiver.status, text="ok")

    app = web.Application()
    app.router.add_post("/hook/secret-path", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/hook/secret-path"
    yield receiver
    await runner.cleanup()


@dataclass
class Command:
    """A test alert command: appends its environment as one JSON line to ``out``."""

    script: Path
    out: Path

    def calls(self) -> list[dict[str, str]]:
        """Return the environment of every completed call."""
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def conditions(self, state: str = "firing") -> list[str]:
        """Return the alert conditions the command saw in ``state``."""
        return [
            c["KAKAO_TOKEND_ALERT_CONDITION"]
            for c in self.calls()
            if c["KAKAO_TOKEND_ALERT_STATE"] == state
        ]

    def toml(self, *extra: str) -> str:
        """Return the TOML value for ``command`` (optionally with extra args)."""
        return json.dumps([str(self.script), str(self.out), *extra])


@pytest.fixture
def command(tmp_path: Path) -> Command:
    """Write the test command script (argv: OUT [SLEEP_SECONDS])."""
    script = tmp_path / "alert-command"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        "if len(sys.argv) > 2:\n"
        "    time.sleep(float(sys.argv[2]))\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    f.write(json.dumps(dict(os.environ)) + '\\n')\n"
    )
    script.chmod(0o755)
    return Command(script, tmp_path / "command-calls.jsonl")


def alerts_toml(webhook: Receiver | None, command: Command | None, **keys: str) -> str:
    """Return an [alerts] section for the test config (English, whatever the test's locale)."""
    keys.setdefault("language", '"en"')
    lines = ["[alerts]", 'kakaotalk = "auto"']
    if webhook is not None:
        lines += [f'webhook_url = "{webhook.url}"', 'webhook_timeout = "1s"', "webhook_retries = 1"]
    if command is not None:
        lines += [f"command = {command.toml()}", 'command_timeout = "5s"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- in-process harness


class Harness:
    """An AccountManager and AlertCenter for the default account, on a shiftable clock."""

    def __init__(self, config_path: Path, emulator: KakaoEmulator) -> None:
        self.config_path = config_path
        self.emulator = emulator
        self.offset = 0.0
        self.frozen_at: datetime | None = None
        self.session: aiohttp.ClientSession | None = None
        self.manager: AccountManager | None = None
        self.center: AlertCenter | None = None

    def now(self) -> datetime:
        """Return real time (or the frozen moment) plus the test's offset (what the manager
        and center see)."""
        return (self.frozen_at or utcnow()) + timedelta(seconds=self.offset)

    def freeze(self) -> None:
        """Stop the manager's and center's clock at this moment: from now on only ``offset``
        moves it, so a slow machine cannot add its own seconds between two steps of a test."""
        self.frozen_at = utcnow()

    async def start(self) -> None:
        """Create the manager (loading the state from disk) and attach a fresh center."""
        config = load_config(self.config_path)
        account = config.account()
        if self.session is None:
            self.session = create_session()
        self.manager = AccountManager(
            account,
            store=AccountStore(account),
            client=KakaoClient(self.session, account.app, clock=self.now),
            policy=config.refresh,
            clock=self.now,
        )
        self.manager.load()
        self.center = AlertCenter(
            session=self.session, clock=self.now, host="box", retry_delay=0.05
        )
        self.center.attach(self.manager)

    async def at(self, offset: float) -> list[Alert]:
        """Evaluate with the clock at ``offset`` seconds and wait until delivery finished."""
        self.offset = offset
        assert self.center is not None
        sent = self.center.evaluate()
        assert await self.center.wait_delivered(10)
        return sent

    async def settle(self) -> None:
        """Let scheduled evaluations run and their deliveries finish."""
        assert self.center is not None
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert await self.center.wait_delivered(10)

    async def restart(self) -> None:
        """Stop the center (as at shutdown) and start a new manager and center."""
        assert self.center is not None
        await self.center.close()
        await self.start()

    async def close(self) -> None:
        """Close the center and the HTTP session."""
        if self.center is not None:
            await self.center.close()
        if self.session is not None:
            await self.session.close()


@pytest.fixture
async def make_harness(tmp_path: Path, emulator: KakaoEmulator) -> AsyncIterator[Any]:
    """Return an async factory: write a config with ``extra``, log in, start a Harness."""
    made: list[Harness] = []

    async def make(extra: str, **config: Any) -> Harness:
        path = write_config(tmp_path, emulator, extra=extra, **config)
        path.chmod(0o600)  # an inline webhook URL is a secret: refused in a readable config
        await login(emulator, path)
        harness = Harness(path, emulator)
        await harness.start()
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.close()


def inbox_texts(emulator: KakaoEmulator) -> list[str]:
    """Return the texts of every KakaoTalk "send to me" message delivered so far."""
    return [str(m["text"]) for m in emulator.inbox(DEFAULT_USER_ID)]
