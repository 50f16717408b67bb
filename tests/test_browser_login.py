"""A real headless Chromium logs in through `kakao-tokend login` and the emulator's consent page."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemonproc import free_port, write_login_config
from kakao_tokend.emulator import EmulatorSettings, KakaoEmulator, running_emulator
from loginproc import browser_argv, fake_browser, read_authorize_url, spawn_login

pytestmark = pytest.mark.timeout(120)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_path() -> str:
    """Return the Chromium binary, or skip the test saying how to get one."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed; run .ci/install-browser (apt-get install chromium)")


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page target (aiohttp WebSocket)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        ident = next(self._ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(15):
            while True:
                message = await self.ws.receive_json()
                if message.get("id") != ident:
                    continue
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its JSON value."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_page(self, url_prefix: str, *, timeout: float = 15) -> str:
        """Wait until the page at ``url_prefix...`` has loaded; return its full URL."""
        deadline = time.monotonic() + timeout
        href, ready = "(navigating)", "loading"
        while True:
            try:
                href, ready = await self.evaluate("[location.href, document.readyState]")
            except AssertionError as exc:
                # The page navigated while being asked (a click's form post on a loaded
                # machine): the next poll asks the new page.
                if "navigated or closed" not in str(exc) and "context" not in str(exc):
                    raise
            if href.startswith(url_prefix) and ready == "complete":
                return str(href)
            if time.monotonic() > deadline:
                raise AssertionError(f"browser is at {href} ({ready}), expected {url_prefix}")
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        """Click the element's centre with real mouse events (it must be visible)."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2,"
            " r.width, r.height]; })()"
        )
        x, y, width, height = box
        assert width > 0 and height > 0, f"{selector} is not visible"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )


@dataclass
class Browser:
    """A headless Chromium process and a DevTools connection to its first tab."""

    proc: asyncio.subprocess.Process
    page: DevTools


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    """Start headless Chromium with a fresh profile, connected over the DevTools protocol."""
    binary = chromium_path()
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with (tmp_path / "chromium.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if proc.returncode is not None or time.monotonic() > deadline:
                text = (tmp_path / "chromium.log").read_text(errors="replace")[-2000:]
                pytest.skip(f"chromium did not start here (exit {proc.returncode}): {text}")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json(content_type=None)
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_ws, max_msg_size=0) as ws:
                yield Browser(proc, DevTools(ws))
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def page_emulator() -> AsyncIterator[KakaoEmulator]:
    """An emulator that shows its HTML consent page (Agree / Cancel) instead of auto-consent."""
    settings = EmulatorSettings(consent="page")
    async with running_emulator(settings) as emulator:
        yield emulator


def browser_login_config(tmp_path: Path, emulator: KakaoEmulator) -> tuple[Path, str]:
    """Write a login config with a fresh loopback redirect URI; return it and the URI."""
    port = free_port()
    return write_login_config(tmp_path, emulator, redirect_port=port), (
        f"http://127.0.0.1:{port}/callback"
    )


async def start_login(config: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Run `kakao-tokend login --no-browser` and return it with the authorize URL it printed."""
    proc = await spawn_login(config, timeout="60s")
    url, _ = await read_authorize_url(proc)
    return proc, url


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Wait for the login process; return its exit code and all of its output."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def consent(browser: Browser, url: str, emulator: KakaoEmulator, button: str) -> None:
    """Open the authorize URL and press ``button`` on the consent page.

    The caller waits for the page it expects next (wait_page): right after the click the
    browser is between documents, and reading the page then failed on a loaded machine
    (``document.body`` was null).
    """
    page = browser.page
    await page.call("Page.navigate", url=url)
    await page.wait_page(f"{emulator.url}/oauth/authorize")
    assert "allow this app access?" in await page.evaluate("document.body.innerText")
    await page.click(f"button[value={button}]")


async def test_agree_in_a_real_browser_lands_on_the_success_page_and_stores_tokens(
    browser: Browser, page_emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Chromium opens the printed URL, clicks Agree, and the loopback page says login succeeded.

    Proves the whole interactive path a person takes: the authorize URL the CLI prints works in
    a real browser, the consent form posts back, Kakao's 302 reaches the CLI's loopback server,
    and the tokens are written (private state 0600 + published token file).
    """
    config, redirect_uri = browser_login_config(tmp_path, page_emulator)
    proc, url = await start_login(config)
    try:
        await consent(browser, url, page_emulator, "agree")
        await browser.page.wait_page(redirect_uri)
        text = await browser.page.evaluate("document.title + '\\n' + document.body.innerText")
    finally:
        code, output = await finish(proc)
    assert "Login succeeded" in text
    assert "stored the tokens for account 'default'" in text
    assert code == 0, output
    state_file = tmp_path / "state" / "default.state.json"
    token_file = tmp_path / "state" / "default.token.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    published = json.loads(token_file.read_text())
    assert page_emulator.access_token_valid(published["access_token"])
    assert page_emulator.stats.codes_issued == 1
    assert published["access_token"] not in output


async def test_the_page_the_login_opens_a_browser_on_leads_a_real_browser_to_kakao(
    browser: Browser, page_emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`login` on a desktop starts the browser on a private local file, not on the authorize
    URL (whose state `ps` would show everyone): Chromium opened on that file ends up on
    Kakao's consent page, and Agree completes the login."""
    config, redirect_uri = browser_login_config(tmp_path, page_emulator)
    program, record = fake_browser(tmp_path)
    proc = await spawn_login(config, timeout="60s", browser=program)
    try:
        await read_authorize_url(proc, until="Waiting for Kakao")
        (page,) = await browser_argv(record)
        assert page.startswith("file:///")
        await consent(browser, page, page_emulator, "agree")
        await browser.page.wait_page(redirect_uri)
        text = await browser.page.evaluate("document.title + '\\n' + document.body.innerText")
    finally:
        code, output = await finish(proc)
    assert "Login succeeded" in text
    assert code == 0, output


async def test_cancel_in_a_real_browser_says_cancelled_and_stores_nothing(
    browser: Browser, page_emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Clicking Cancel lands on the loopback page saying the login was cancelled; no files.

    Proves the deny path: Kakao's access_denied redirect is shown to the person as a cancel
    (not a crash or a generic error), the terminal says the login still waits and how to
    stop it, Ctrl-C then ends it (exit 130), and no token file is created.
    """
    config, redirect_uri = browser_login_config(tmp_path, page_emulator)
    proc, url = await start_login(config)
    try:
        await consent(browser, url, page_emulator, "cancel")
        await browser.page.wait_page(redirect_uri)
        text = await browser.page.evaluate("document.title + '\\n' + document.body.innerText")
        proc.send_signal(signal.SIGINT)
    finally:
        code, output = await finish(proc)
    assert "Login cancelled" in text
    assert "no tokens were stored" in text
    assert code == 130, output
    assert "cancelled" in output and "press Ctrl-C to stop" in output
    assert "Traceback" not in output
    assert not (tmp_path / "state" / "default.state.json").exists()
    assert not (tmp_path / "state" / "default.token.json").exists()
    assert page_emulator.stats.codes_issued == 0
