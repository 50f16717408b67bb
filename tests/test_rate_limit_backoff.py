"""A rate limit (KOE237) at the worst moment never outlives the tokens, at two time scales.

The worst moment: just after a restart, the access token about to expire and the refresh token
nearly dead. Every wait — Kakao's rate-limit pause included — scales with the token's lifetime
and ends before the refresh token dies, so a valid token is back as soon as Kakao answers.
The same rules are proved with second-long tokens in the real process and with 6-hour/60-day
tokens on the emulator's virtual clock.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import time_machine

from daemonproc import access_token_valid, login, start_daemon, write_config
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.status import Health
from kakao_tokend.store import AccountStore
from virtualclock import SIX_HOURS, SIXTY_DAYS, restarted_on_virtual_clock

pytestmark = pytest.mark.timeout(120)


async def test_koe237_right_after_a_restart_ends_as_soon_as_kakao_answers(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """kill -9, then a restart with the access token about to expire and the refresh token
    nearly dead; the first refresh meets KOE237. With the default retry settings (10 s / 5 m)
    the daemon retries at the 6-second token's own pace and serves a valid token again well
    before the refresh token dies — not after a fixed minute, when the account is dead."""
    emulator.settings.access_lifetime = 6
    emulator.settings.refresh_lifetime = 14
    config = write_config(tmp_path, emulator, retry_initial="10s", retry_max="5m")
    await login(emulator, config)
    spawned = time.monotonic()
    daemon = await start_daemon(config)
    start_up = time.monotonic() - spawned  # what a start takes on this machine right now
    daemon.send(signal.SIGKILL)
    await daemon.proc.wait()
    # The restart finds tokens issued after the first start (which can take seconds on a
    # loaded machine: it must not use up their life), and starts so that its start-up check
    # comes when about 1.5 s of the access token are left.
    state = await login(emulator, config)
    refresh_dies = state.tokens.refresh_expires_at.timestamp()
    restart_at = state.tokens.access_issued_at.timestamp() + 4.5 - start_up
    await asyncio.sleep(max(0.0, restart_at - time.time()))
    emulator.inject("token", "koe237", count=1)
    daemon = await start_daemon(config, wait_ready=False)
    try:
        await daemon.wait_for(
            lambda: emulator.stats.koe237 == 1, timeout=15, what="KOE237", interval=0.01
        )
        limited_at = time.time()
        await daemon.wait_for(
            lambda: (
                emulator.stats.refreshes_ok >= 1
                # the daemon's own token, not the login's (valid until its last second)
                and daemon.published()["generation"] > state.generation
                and access_token_valid(emulator, daemon.published()["access_token"])
            ),
            timeout=6,
            what="a valid token once Kakao answers again",
        )
        answered = [a.at for a in emulator.stats.refresh_log if a.outcome in ("ok", "rotated")]
        # The pause is the longest regular step of a 6-second token (0.5 s), plus slack for a
        # loaded machine: nowhere near Kakao's 10-minute windows or a fixed minute.
        assert answered[0] - limited_at < 2.0
        assert answered[0] < refresh_dies - 4  # well before the refresh token dies
        saved = daemon.state()
        assert emulator.refresh_token_status(saved["tokens"]["refresh_token"]) == "live"
        assert "account default needs a new login" not in daemon.log_text()
    finally:
        await daemon.stop()


def _seconds_until(moment: datetime | None, now: datetime) -> float:
    assert moment is not None
    return (moment - now).total_seconds()


async def test_six_hour_token_koe237_at_the_worst_moment_waits_within_the_tokens_life(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """6-hour/60-day tokens on a virtual clock: 40 s of access and 50 s of refresh left, KOE237.

    The retry is planned before the access token expires (so before the refresh token dies),
    not a fixed 60 s later; at that moment Kakao answers and the account is fine again.
    """
    emulator.settings.access_lifetime = SIX_HOURS
    emulator.settings.refresh_lifetime = SIXTY_DAYS
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=40, refresh_left=50
    )
    emulator.inject("token", "koe237", count=1)
    await manager.tick()
    assert emulator.stats.koe237 == 1
    assert manager.status.health is Health.RETRYING
    now = manager.clock()
    tokens = manager.state.tokens  # type: ignore[union-attr]
    wait = _seconds_until(manager.status.next_attempt_at, now)
    assert 0 < wait < (tokens.access_expires_at - now).total_seconds()
    assert wait < (tokens.refresh_expires_at - now).total_seconds()
    emulator.advance_clock(wait)
    await manager.tick()
    assert manager.status.health is Health.OK
    assert manager.state is not None
    assert emulator.access_token_valid(manager.state.tokens.access_token)
    assert emulator.refresh_token_status(manager.state.tokens.refresh_token) == "live"


async def test_six_hour_token_already_expired_retries_at_the_lifetime_pace(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The access token expired while kakao-tokend was down; three KOE237 in a row.

    Nobody has a valid token, so the retries keep the regular back-off pace of a 6-hour token
    (10 s, 20 s, 40 s at most), never a fixed minute, and never past the refresh token's death
    (10 minutes away); the fourth attempt gets a valid token.
    """
    emulator.settings.access_lifetime = SIX_HOURS
    emulator.settings.refresh_lifetime = SIXTY_DAYS
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=-120, refresh_left=600
    )
    emulator.inject("token", "koe237", count=3)
    await manager.tick()
    for attempt, ceiling in enumerate((10.0, 20.0, 40.0), start=1):
        assert manager.status.attempt == attempt
        now = manager.clock()
        wait = _seconds_until(manager.status.next_attempt_at, now)
        assert 0 < wait <= ceiling + 0.01, (attempt, wait)
        refresh_left = manager.state.tokens.refresh_remaining(now).total_seconds()  # type: ignore[union-attr]
        assert wait < refresh_left
        emulator.advance_clock(wait)
        await manager.tick()
    assert emulator.stats.koe237 == 3
    assert manager.status.health is Health.OK
    assert emulator.access_token_valid(manager.state.tokens.access_token)  # type: ignore[union-attr]


async def test_a_refresh_token_dying_before_the_planned_refresh_is_refreshed_in_time(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A fresh 6-hour access token but a refresh token with 20 minutes left: the refresh is
    planned before the refresh token dies, not at 75 % of the access token's life."""
    emulator.settings.access_lifetime = SIX_HOURS
    emulator.settings.refresh_lifetime = SIXTY_DAYS
    manager = await restarted_on_virtual_clock(
        emulator, tmp_path, session, access_left=SIX_HOURS - 60, refresh_left=1200
    )
    planned = manager.planned_refresh_at()
    assert planned is not None
    tokens = manager.state.tokens  # type: ignore[union-attr]
    assert planned < tokens.refresh_expires_at
    emulator.advance_clock(_seconds_until(planned, manager.clock()))
    await manager.tick()
    assert manager.status.health is Health.OK
    assert emulator.refresh_token_status(manager.state.tokens.refresh_token) == "live"  # type: ignore[union-attr]


async def test_the_clock_step_rule_waits_for_the_planned_retry(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The wall clock steps back an hour during a KOE237 back-off: every token now looks
    "issued in the future", but no tick sends a request before the planned retry time has
    passed (measured on the clock that does not step); then the retry runs and succeeds."""
    emulator.settings.access_lifetime = 60
    config_path = write_config(tmp_path, emulator, retry_initial="10s", retry_max="5m")
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.accounts["default"]
    with time_machine.travel(time.time(), tick=True) as traveller:
        manager = AccountManager(
            account,
            store=AccountStore(account),
            client=KakaoClient(session, account.app),
            policy=replace(config.refresh, retry_max=1.0),
        )
        manager.load()
        emulator.inject("token", "koe237", count=1)
        await manager.refresh(force=True)
        assert manager.status.health is Health.RETRYING
        pause = _seconds_until(manager.status.next_attempt_at, manager.clock())
        assert pause > 0.2
        sent = emulator.stats.requests["token"]
        traveller.shift(timedelta(hours=-1))
        started = time.monotonic()
        while time.monotonic() - started < pause - 0.1:
            assert not manager.needs_refresh(manager.clock())
            await manager.tick()
            await asyncio.sleep(0.02)
        assert emulator.stats.requests["token"] == sent, "requests during the back-off"
        await asyncio.sleep(0.2)
        assert manager.needs_refresh(manager.clock())
        await manager.tick()
        assert manager.status.health is Health.OK
        assert emulator.stats.requests["token"] == sent + 1
