"""KOE322 says only "this refresh token is no good": kakao-tokend tells the true reason.

Expired (per our clock), rotated and lost (an earlier ambiguous attempt while Kakao would
rotate), revoked (unlinked, logged out, account changed: the tokens should still be alive and
Kakao rejects the access token too) and unknown each get their own log line, persisted reason,
alert text and fix — the exact `kakao-tokend login` command, with ``--account`` when needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator
from kakao_tokend.refresher import AccountManager
from kakao_tokend.relogin import ReloginCause, login_command, render
from kakao_tokend.status import Health
from virtualclock import SIX_HOURS, SIXTY_DAYS, restarted_on_virtual_clock

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def real_lifetimes(emulator: KakaoEmulator) -> None:
    """Kakao's real lifetimes: 6-hour access and 60-day refresh tokens (rotation: last 30 d)."""
    emulator.settings.access_lifetime = SIX_HOURS
    emulator.settings.refresh_lifetime = SIXTY_DAYS


def critical_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The critical log lines of the refresher so far."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.CRITICAL and r.name == "kakao_tokend.refresher"
    ]


def relogin_alert(manager: AccountManager) -> tuple[str, str]:
    """Return the (message, fix) of the account's relogin alert."""
    conditions = manager.health(host="box").conditions
    (condition,) = [c for c in conditions if c.name == "relogin"]
    assert condition.action is not None
    return condition.message.render("en"), condition.action.render("en")


def saved_reason(manager: AccountManager) -> str:
    """The account is marked for re-login, on disk too; return the persisted reason."""
    assert manager.status.health is Health.RELOGIN
    assert manager.status.last_error_class == "KOE322"
    saved = manager.store.load()
    assert saved is not None and saved.relogin_reason is not None
    assert f"run `{login_command(manager.account)}`" in saved.relogin_reason
    return saved.relogin_reason


def assert_cause(manager: AccountManager, cause: str) -> None:
    """The cause (a ReloginCause value) is in the status and in the state file."""
    assert manager.status.relogin_cause == cause
    saved = manager.store.load()
    assert saved is not None and saved.relogin_cause == cause


async def test_a_refresh_token_that_expired_while_the_daemon_was_down_says_expired(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Down for 61 days: the refresh token expired by our own clock; nothing was lost or
    revoked, and every text says so, with the moment it expired."""
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=-SIXTY_DAYS, refresh_left=-86400
    )
    with caplog.at_level(logging.INFO):
        await manager.tick()
    reason = saved_reason(manager)
    assert "expired" in reason
    (line,) = critical_lines(caplog)
    assert "refresh token" in line and "expired at" in line
    assert "lost" not in line and "revoked" not in line
    message, fix = relogin_alert(manager)
    assert "expired" in message and "lost" not in message
    assert login_command(manager.account) in fix
    assert_cause(manager, "expired")


async def test_expiry_during_a_back_off_is_not_mistaken_for_a_lost_response(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ambiguous 5xx, then the refresh token runs out while kakao-tokend waits: the KOE322
    that follows is an expiry, not "the refresh response was lost after a rotation"."""
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=-60, refresh_left=30
    )
    emulator.inject("token", "http500", count=1)
    await manager.tick()
    assert manager.status.health is Health.RETRYING
    emulator.advance_clock(120)  # e.g. the host was suspended during the back-off
    with caplog.at_level(logging.INFO):
        await manager.tick()
    reason = saved_reason(manager)
    assert "lost" not in reason
    assert not any("lost" in line for line in critical_lines(caplog))
    assert_cause(manager, "expired")


async def test_a_lost_answer_to_a_rotating_refresh_says_rotated_and_lost(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kakao rotated the refresh token but its answer was cut off: the next KOE322 is the
    lost rotation (the one case nothing can recover), reported as such."""
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=-60, refresh_left=10 * 86400
    )
    emulator.inject("token", "lost_response", count=1)
    await manager.tick()
    assert manager.status.health is Health.RETRYING
    emulator.advance_clock(30)
    with caplog.at_level(logging.INFO):
        await manager.tick()
    reason = saved_reason(manager)
    assert reason.startswith("refresh response lost after rotation")
    (line,) = critical_lines(caplog)
    assert "refresh response was lost after Kakao rotated the refresh token" in line
    message, _ = relogin_alert(manager)
    assert "lost" in message
    assert_cause(manager, "rotated_lost")


async def test_an_unlinked_user_says_revoked(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The user removed the app in Kakao's "Connected services": the tokens should still be
    valid for weeks and Kakao rejects the access token too, so they were revoked."""
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=600, refresh_left=40 * 86400
    )
    emulator.unlink_user(DEFAULT_USER_ID)
    with caplog.at_level(logging.INFO):
        await manager.refresh(force=True)
    reason = saved_reason(manager)
    assert "revoked" in reason
    (line,) = critical_lines(caplog)
    assert "revoked" in line and "unlinked" in line
    assert "lost" not in line and "expired at" not in line
    message, _ = relogin_alert(manager)
    assert "revoked" in message
    assert_cause(manager, "revoked")


async def test_a_refresh_token_rotated_by_someone_else_says_unknown(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another program refreshed with a copy of our refresh token and Kakao rotated it: our
    access token is still accepted, nothing of ours was ambiguous or expired — we cannot tell
    why, and say so (naming the likely suspects) instead of guessing."""
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=600, refresh_left=10 * 86400
    )
    assert manager.state is not None
    await manager.client.refresh(manager.state.tokens)  # the other program
    with caplog.at_level(logging.INFO):
        await manager.refresh(force=True)
    reason = saved_reason(manager)
    assert "unknown" in reason
    (line,) = critical_lines(caplog)
    assert "unknown" in line and "another program" in line
    message, _ = relogin_alert(manager)
    assert "unknown" in message
    assert_cause(manager, "unknown")


async def test_the_fix_names_a_non_default_account(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """For account "bot" (not the default account, in a config named with --config) the
    reason, the log and the alert's fix say `--config FILE --account bot`, before `login`."""
    manager = await restarted_on_virtual_clock(
        emulator,
        tmp_path,
        session,
        access_left=-60,
        refresh_left=-60,
        account_name="bot",
        others=("default",),
    )
    await manager.tick()
    saved = manager.store.load()
    assert saved is not None and saved.relogin_reason is not None
    command = f"kakao-tokend --config {tmp_path / 'config.toml'} --account bot login"
    assert f"`{command}`" in saved.relogin_reason
    _, fix = relogin_alert(manager)
    assert command in fix
    assert_cause(manager, "expired")


async def test_the_cause_survives_a_restart(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A restarted daemon reads the cause back from the state file: status and alert agree."""
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=-60, refresh_left=-60
    )
    await manager.tick()
    again = AccountManager(
        manager.account,
        store=manager.store,
        client=manager.client,
        policy=manager.policy,
        clock=manager.clock,
    )
    again.load()
    assert again.status.health is Health.RELOGIN
    message, _ = relogin_alert(again)
    assert "expired" in message
    assert_cause(again, "expired")


async def test_a_lost_rotation_of_a_short_refresh_token_says_rotated_and_lost(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kakao rotates whenever less than its month is left (an absolute rule), so a refresh
    token born with an hour rotates at every refresh, though the daemon's window fitted to it
    is only half an hour: a lost answer, then KOE322, is still the lost rotation."""
    from daemonproc import login, write_config
    from kakao_tokend.config import load_config
    from kakao_tokend.kakao import KakaoClient
    from kakao_tokend.store import AccountStore

    emulator.settings.access_lifetime = 10
    emulator.settings.refresh_lifetime = 3600
    emulator.settings.rotation_window = 30 * 86400  # Kakao's documented month
    config_path = write_config(tmp_path, emulator)
    await login(emulator, config_path)
    account = load_config(config_path).accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app),
        policy=load_config(config_path).refresh,
    )
    manager.load()
    emulator.inject("token", "lost_response", count=1)
    await manager.refresh(force=True)
    assert manager.status.health is Health.RETRYING
    assert emulator.stats.rotations == 1
    with caplog.at_level(logging.INFO):
        await manager.refresh(force=True)
    reason = saved_reason(manager)
    assert reason.startswith("refresh response lost after rotation")
    assert_cause(manager, "rotated_lost")


async def test_a_rotation_lost_to_a_crash_says_rotated_and_lost_after_the_restart(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """kill -9 while Kakao is answering a rotating refresh: Kakao rotates, nobody hears it.
    The restarted daemon's KOE322 is that lost rotation (the unavoidable case), not "an
    unknown reason (another program? an old state file restored?)": that an attempt was in
    flight is kept in the runtime directory, which a crash does not empty."""
    import signal

    from daemonproc import login, release_into_a_rotation, start_daemon, write_config

    emulator.settings.access_lifetime = 4  # refreshed within seconds of the start
    emulator.settings.refresh_lifetime = 7200
    emulator.settings.rotation_window = 8000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=8000)
    await login(emulator, config)
    emulator.inject("token", "hold", count=1, delay=60.0)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: emulator.held_requests == 1, what="a refresh at Kakao")
    finally:
        daemon.send(signal.SIGKILL)
        await daemon.proc.wait()
    await release_into_a_rotation(emulator)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("needs a new login", timeout=15)
    finally:
        assert await daemon.stop() == 0
    assert daemon.state()["relogin_cause"] == "rotated_lost"
    assert "unknown reason" not in daemon.log_text()


@pytest.mark.parametrize("cause", list(ReloginCause))
def test_an_unknown_expiry_is_said_in_the_alert_language(cause: ReloginCause) -> None:
    """Without a known expiry (no tokens to read it from) the texts say so in their own
    language: no English words inside the Korean alert; the log line stays English."""
    rendered = render(cause, account="shop", login="kakao-tokend --account shop login")
    korean = rendered.alert.render("ko") + rendered.fix.render("ko") + rendered.brief.render("ko")
    assert "unknown time" not in korean
    if "{expiry}" in rendered.alert.msgid:
        assert "알 수 없는 시각" in rendered.alert.render("ko")
        assert "an unknown time" in rendered.alert.render("en")
    assert "{expiry}" not in rendered.log and "{expiry}" not in rendered.reason
