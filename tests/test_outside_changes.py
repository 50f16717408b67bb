"""`login`, `import`, `logout` and `refresh` run by the CLI take effect in a running daemon at once.

Real processes throughout: the daemon (`kakao-tokend run`) and the CLI run as children of the
test against the in-test Kakao emulator. The daemon's heartbeat is a minute, so anything that
happens within a second or two comes from the CLI's call on the socket or from the state
directory watch, never from the periodic re-check.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from alertkit import Receiver
from daemonproc import DaemonProcess, free_port, login, run_cli, start_daemon, write_config
from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator
from loginproc import spawn_login

pytestmark = pytest.mark.timeout(120)

#: Bound for "at once" where no command's return marks the moment (the watch): it takes
#: milliseconds, and anything far below the 60 s heartbeat proves the mechanism; the slack
#: is for a machine busy with other test runs.
PROMPT = 5.0


def _config(tmp_path: Path, emulator: KakaoEmulator, extra: str = "") -> Path:
    """A config whose heartbeat (60 s) is far longer than anything these tests wait for.

    The login redirect gets its own free port, so parallel test runs never collide.
    """
    emulator.settings.redirect_uris.insert(0, f"http://127.0.0.1:{free_port()}/callback")
    path = write_config(tmp_path, emulator, heartbeat="60s", extra=extra)
    path.chmod(0o600)  # an inline webhook URL is a secret: refused in a readable config
    return path


async def cli_login(config: Path) -> tuple[int, str, str]:
    """Run the real `kakao-tokend login --no-browser` and finish it as a browser would."""
    proc = await spawn_login(config)
    assert proc.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(20):
        while "paste here" not in (seen[-1] if seen else ""):
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError("login exited early: " + "".join(seen))
            seen.append(line)
    url = next(s.strip() for s in seen if s.strip().startswith("http"))
    async with aiohttp.ClientSession() as session:
        async with session.get(url, allow_redirects=False) as response:
            location = response.headers["Location"]
        async with session.get(location) as page:
            assert page.status == 200, await page.text()
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), "".join(seen) + err.decode()


async def token_answer(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    """GET the daemon's token endpoint (no refresh asked for)."""
    status, body = await daemon.api("GET", "/v1/accounts/default/token")
    return status, body


def bookkeeping(tmp_path: Path) -> dict[str, Any]:
    """Return the active alerts the daemon recorded for the default account."""
    path = tmp_path / "state" / "default.alerts.json"
    if not path.exists():
        return {}
    active: dict[str, Any] = json.loads(path.read_text()).get("active") or {}
    return active


async def test_cli_login_is_served_by_a_running_daemon_at_once(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A daemon started without tokens serves a `kakao-tokend login` right after it returns.

    Before: `token` exited 77 and `status` said "no tokens" for up to one heartbeat.
    """
    config = _config(tmp_path, emulator)
    daemon = await start_daemon(config)
    try:
        code, _, err = await run_cli(config, "token")
        assert code == 77, err  # nothing to serve yet
        code, out, err = await cli_login(config)
        assert code == 0, out + err
        # Taken over before `login` returned (the heartbeat is a minute away).
        assert "adopted tokens written by another process" in daemon.log_text()
        code, out, err = await run_cli(config, "token")
        assert code == 0, err
        assert emulator.access_token_valid(out.strip())
        code, out, err = await run_cli(config, "status")
        assert code == 0, out + err
        assert "daemon:        running, health ok" in out
    finally:
        assert await daemon.stop() == 0


async def test_login_resolves_the_alerts_raised_for_the_old_tokens(
    emulator: KakaoEmulator,
    tmp_path: Path,
    webhook: Receiver,
) -> None:
    """Tokens Kakao revoked raise a critical `relogin` alert; a CLI login resolves it at once.

    The webhook gets the resolution within about a second of the login, the bookkeeping that
    `status` reads has no active alert left, and `status` shows no stale critical alert next
    to its OK.
    """
    extra = (
        f'[alerts]\nkakaotalk = false\nwebhook_url = "{webhook.url}"\n'
        'webhook_timeout = "2s"\nwebhook_retries = 0\n'
    )
    config = _config(tmp_path, emulator, extra)
    await login(emulator, config)
    emulator.revoke_user_tokens(DEFAULT_USER_ID)  # found by the start-up check
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: "relogin" in webhook.conditions(), timeout=15, what="alert")
        assert "relogin" in bookkeeping(tmp_path)
        code, out, err = await cli_login(config)
        assert code == 0, out + err
        await daemon.wait_for(
            lambda: "relogin" in webhook.conditions("resolved"), timeout=PROMPT, what="resolved"
        )
        assert "relogin" not in bookkeeping(tmp_path)
        code, out, err = await run_cli(config, "status")
        assert code == 0, out + err
        assert "alert: critical" not in out
    finally:
        assert await daemon.stop() == 0


async def test_cli_logout_never_lets_the_daemon_serve_a_revoked_token(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """While `kakao-tokend logout` runs, the daemon hands out no token Kakao already revoked.

    A reader polls the daemon's token endpoint throughout; each token it gets is checked with
    Kakao (the emulator) right away. One that Kakao no longer accepts is the daemon's fault
    when the reader asked for it after Kakao revoked it (the emulator's logout moment): the
    command takes the files away and has the daemon re-read them before it asks Kakao. An
    answer the daemon gave before that, still on its way when Kakao revoked the token, is
    not (on a loaded machine the reader's check comes late enough). After the logout the
    daemon has no token to serve.
    """
    config = _config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config)
    revoked_served: list[str] = []
    served = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal served
        while not stop.is_set():
            asked_at = emulator.now()
            status, body = await token_answer(daemon)
            if status == 200:
                served += 1
                revoked = emulator.stats.logout_log
                if revoked and revoked[0] < asked_at:  # the daemon had dropped it by then
                    revoked_served.append(body["access_token"][:4])
            await asyncio.sleep(0.01)

    task = asyncio.create_task(reader())
    try:
        await asyncio.sleep(0.3)
        code, out, err = await run_cli(config, "logout")
        assert code == 0, out + err
        assert "logged out at Kakao" in out
        await asyncio.sleep(0.3)
        stop.set()
        await task
        assert served > 0
        assert revoked_served == [], f"{len(revoked_served)} revoked tokens served"
        status, body = await token_answer(daemon)
        assert status == 409, body
    finally:
        stop.set()
        assert await daemon.stop() == 0


async def test_a_state_written_without_the_socket_is_adopted_within_a_second(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """When the CLI cannot reach the socket, the daemon still sees the new state file at once.

    The state is written straight to the state directory (what `login` does for a user that
    may not open the socket); the daemon watches that directory. Removing the files (a
    `logout --keep-files` undone by hand, or an operator's `rm`) stops the serving as fast.
    """
    config = _config(tmp_path, emulator)
    daemon = await start_daemon(config)
    try:
        status, _ = await token_answer(daemon)
        assert status == 409
        written = await login(emulator, config)
        started = time.monotonic()

        async def serving() -> bool:
            return (await token_answer(daemon))[0] == 200

        while not await serving():
            assert time.monotonic() - started < PROMPT, "the new state was not adopted"
            await asyncio.sleep(0.05)
        status, body = await token_answer(daemon)
        assert body["access_token"] == written.tokens.access_token
        (tmp_path / "state" / "default.state.json").unlink()
        started = time.monotonic()
        while await serving():
            assert time.monotonic() - started < PROMPT, "the removed state is still served"
            await asyncio.sleep(0.05)
    finally:
        assert await daemon.stop() == 0


async def test_a_state_written_while_the_daemon_starts_is_adopted_at_once(
    emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state file written after the daemon loaded its accounts and before its state watch
    began (here at READY: the watch starts right after it) is adopted at once, not at the next
    heartbeat a minute later: the watch compares every state file once when it starts."""
    from datetime import UTC, datetime

    from kakao_tokend import systemd
    from kakao_tokend.config import load_config
    from kakao_tokend.emulator import DEFAULT_USER_ID
    from kakao_tokend.state import AccountState
    from kakao_tokend.store import AccountStore
    from kakao_tokend.tokens import TokenSet
    from served import serving

    config = _config(tmp_path, emulator)
    written: list[AccountState] = []
    ready = systemd.ready

    def write_at_ready(text: str) -> bool:
        now = datetime.now(UTC)
        tokens = TokenSet.from_token_response(
            emulator.issue_tokens(DEFAULT_USER_ID), requested_at=now
        )
        state = AccountState(account="default", tokens=tokens, refreshed_at=now, generation=1)
        AccountStore(load_config(config).accounts["default"]).save(state)
        written.append(state)
        return ready(text)

    monkeypatch.setattr(systemd, "ready", write_at_ready)
    async with serving(config) as served:
        started = time.monotonic()
        while (answer := await served.get("/v1/accounts/default/token"))[0] != 200:
            assert time.monotonic() - started < PROMPT, "the state written at READY was not adopted"
            await asyncio.sleep(0.05)
        assert answer[1]["access_token"] == written[0].tokens.access_token


async def test_status_without_a_daemon_hides_alerts_about_replaced_tokens(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """No daemon, bookkeeping still lists a critical `relogin` from before a new login:
    `status` says OK and shows no stale critical alert next to it (a current one stays)."""
    config = _config(tmp_path, emulator)
    await login(emulator, config)
    record = {
        "severity": "critical",
        "stage": None,
        "message": "Kakao no longer accepts the tokens (KOE322); a new login is needed",
        "action": "run `kakao-tokend login`",
        "since": "2026-01-01T00:00:00Z",
        "last_sent_at": "2026-01-01T00:00:00Z",
        "sent": 1,
    }
    path = tmp_path / "state" / "default.alerts.json"
    document = {"version": 1, "account": "default", "active": {"relogin": record}}
    path.write_text(json.dumps(document))
    code, out, err = await run_cli(config, "status")
    assert code == 0, out + err
    assert "default: OK" in out
    assert "alert: critical" not in out
    # An alert the current state does not contradict is still shown.
    document["active"] = {"write_failed": {**record, "message": "cannot save the new tokens"}}
    path.write_text(json.dumps(document))
    code, out, err = await run_cli(config, "status")
    assert "alert: critical write_failed" in out


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "poll"])
async def test_the_state_watch_reports_renames_and_removals_of_watched_files_only(
    tmp_path: Path, use_inotify: bool
) -> None:
    """A file renamed over a watched state file, or removed, is reported once; other files in
    the directory (the published token file, temporary files) are not. Both the inotify watch
    and its fallback (a directory mtime poll) behave the same."""
    from kakao_tokend.watch import POLL_INTERVAL, StateWatcher

    state = tmp_path / "default.state.json"
    state.write_text("{}")
    seen: list[Path] = []
    watcher = StateWatcher(seen.append, use_inotify=use_inotify)
    assert watcher.mode == ("inotify" if use_inotify else "poll")
    watcher.watch([state])
    watcher.start()
    limit = 0.5 if use_inotify else POLL_INTERVAL + 1.0
    try:
        await asyncio.sleep(0.1)
        (tmp_path / "default.token.json").write_text("{}")
        await asyncio.sleep(limit)
        assert seen == []
        temporary = tmp_path / ".default.state.json.tmp"
        temporary.write_text('{"new": 1}')
        os.replace(temporary, state)
        started = time.monotonic()
        while not seen:
            assert time.monotonic() - started < limit, "the rename was not reported"
            await asyncio.sleep(0.02)
        assert seen == [state]
        await asyncio.sleep(0.1)
        assert seen == [state]  # one save, one report
        state.unlink()
        started = time.monotonic()
        while len(seen) < 2:
            assert time.monotonic() - started < limit, "the removal was not reported"
            await asyncio.sleep(0.02)
    finally:
        await watcher.close()


async def test_cli_import_is_served_by_a_running_daemon_at_once(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`kakao-tokend import kakao_token.json` into a running daemon without tokens: the daemon
    has taken the tokens over before the command returns, and `token` serves them."""
    config = _config(tmp_path, emulator)
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    daemon = await start_daemon(config)
    try:
        code, out, err = await run_cli(config, "import", str(seed))
        assert code == 0, out + err
        assert "adopted tokens written by another process" in daemon.log_text()
        code, out, err = await run_cli(config, "token")
        assert code == 0, err
        assert emulator.access_token_valid(out.strip())
    finally:
        assert await daemon.stop() == 0
