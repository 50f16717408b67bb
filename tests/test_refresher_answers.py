"""Odd but legal token answers, end to end: the in-process refresher against the emulator.

Kakao's docs list the fields of a token answer but not their JSON types, and a rotation's
``refresh_token_expires_in`` is documented next to the token, not promised with it. Each test
here makes the emulator answer one such way and checks what an operator would: the account
keeps refreshing, the new refresh token is saved, and no false alarm is raised.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from daemonproc import login, run_cli, short_tokens, start_daemon, write_config
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.health import Severity, assess
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountEvent, AccountStatus, EventKind, Health
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet, rotation_window, utcnow

# Seconds-long tokens with Kakao's proportions: the refresh token lives ten access lifetimes
# and rotates in the last half of its life (a month of two).
ACCESS = 60.0
REFRESH = 600.0
WINDOW = 300.0
# The alert ladder scaled to that refresh token, as `kakao-tokend emulator` prints it.
ALERTS = '[alerts]\nthresholds = ["140s", "70s", "30s"]\ncritical_below = "30s"\n'


async def virtual_manager(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, **kakao: str
) -> AccountManager:
    """Log in, then build the daemon's manager on the emulator's virtual clock.

    The manager and its client read the emulator's clock, so advancing it ages the tokens on
    both sides at once (hours of a real account in a second of test). ``kakao``: the
    ``[kakao]`` timeouts, when not the tests' hand-set ones (write_config).
    """
    settings = emulator.settings
    settings.access_lifetime, settings.refresh_lifetime = ACCESS, REFRESH
    settings.rotation_window = WINDOW
    config_path = write_config(tmp_path, emulator, extra=ALERTS, **kakao)
    await login(emulator, config_path)
    account = load_config(config_path).accounts["default"]
    clock = emulator.now_datetime
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app, clock=clock),
        policy=load_config(config_path).refresh,
        clock=clock,
    )
    manager.load()
    return manager


async def test_rotation_without_its_expiry_is_neither_unrenewed_nor_a_missed_rotation(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A rotated refresh token that arrives without ``refresh_token_expires_in`` is saved, and
    the account then grades healthy: no "expires and was not renewed" alert, and the next
    refreshes (Kakao does not rotate a fresh token) are not reported as missed rotations."""
    emulator.settings.refresh_expiry_on_rotation = False
    manager = await virtual_manager(emulator, tmp_path, session)
    events: list[AccountEvent] = []
    manager.listeners.append(events.append)
    first = manager.state
    assert first is not None

    emulator.advance_clock(REFRESH - WINDOW + 10)  # 290 s left: inside the window
    await manager.refresh(force=True)
    saved = manager.store.load()
    assert saved is not None and saved.tokens.refresh_token != first.tokens.refresh_token
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"
    assert emulator.refresh_token_status(first.tokens.refresh_token) == "retired"

    # Past the old token's 70 s stage, then a regular refresh that does not rotate.
    emulator.advance_clock(240)
    await manager.refresh(force=True)
    assert manager.status.health is Health.OK
    assert EventKind.NO_ROTATION not in [e.kind for e in events]
    assert manager.status.missed_rotation is False
    grade = manager.health()
    assert grade.names() == [], grade.conditions
    # The estimate is the real life Kakao gave the new token, counted from our request.
    tokens = manager.state.tokens  # type: ignore[union-attr]
    assert tokens.refresh_expiry_estimated is True
    real_left = REFRESH - 240
    assert abs(tokens.refresh_remaining(emulator.now_datetime()).total_seconds() - real_left) < 5


async def test_lifetimes_sent_as_strings_log_in_refresh_and_rotate(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """``"expires_in": "60"`` on the code exchange and on refreshes: the login works, the
    refresh succeeds at once (not retried until the access token dies), and a rotation's
    expiry is exact."""
    emulator.settings.lifetimes_as_strings = True
    manager = await virtual_manager(emulator, tmp_path, session)
    state = manager.state
    assert state is not None
    assert state.tokens.access_lifetime == timedelta(seconds=ACCESS)

    await manager.refresh(force=True)
    assert manager.status.health is Health.OK, manager.status.last_error
    emulator.advance_clock(REFRESH - WINDOW + 10)
    await manager.refresh(force=True)
    assert manager.status.health is Health.OK, manager.status.last_error
    tokens = manager.state.tokens  # type: ignore[union-attr]
    assert tokens.refresh_token != state.tokens.refresh_token
    assert tokens.refresh_expiry_estimated is False
    left = tokens.refresh_remaining(emulator.now_datetime()).total_seconds()
    assert REFRESH - 5 < left <= REFRESH


async def kakao_terms_manager(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> AccountManager:
    """virtual_manager with the configuration a real Kakao account gets: the rotation window
    and the alert ladder left at their defaults (30 days; 14d 7d 3d 1d, critical below 3d)."""
    manager = await virtual_manager(emulator, tmp_path, session)
    config_path = write_config(tmp_path, emulator, rotation_window=30 * 86400.0)
    config = load_config(config_path)
    manager.account = config.accounts["default"]
    manager.set_policy(config.refresh)
    assert manager.account.alerts.thresholds[0] == 14 * 86400.0
    return manager


async def test_kakao_sized_settings_fit_a_short_refresh_token_when_healthy(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A 10-minute refresh token under the default settings, written for Kakao's 60-day one: a
    window of 30 days and alerts from 14 days left would call every refresh a missed rotation
    and every moment critical. Every such rule is a share of the token's life instead, so a
    healthy account through a rotation grades clean."""
    manager = await kakao_terms_manager(emulator, tmp_path, session)
    events: list[AccountEvent] = []
    manager.listeners.append(events.append)
    assert manager.health().names() == []
    await manager.refresh(force=True)  # 600 s left of 600: no rotation, none expected
    assert manager.health().names() == []
    emulator.advance_clock(REFRESH - WINDOW + 10)
    await manager.refresh(force=True)  # rotates
    emulator.advance_clock(ACCESS)
    await manager.refresh(force=True)  # a fresh token: no rotation, none expected
    assert [e.kind for e in events].count(EventKind.ROTATED) == 1
    assert EventKind.NO_ROTATION not in [e.kind for e in events]
    assert manager.health().names() == []


async def test_kakao_sized_settings_still_alert_a_short_refresh_token_that_is_not_renewed(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The same settings still raise the alarms in proportion: a refresh token Kakao never
    renews warns (the 14-day stage is 140 s of 600), turns critical below the 3-day share
    (30 s), and a refresh deep in the window that did not rotate is a missed rotation."""
    manager = await kakao_terms_manager(emulator, tmp_path, session)
    emulator.settings.rotation_window = 0  # this Kakao never rotates
    emulator.advance_clock(REFRESH - 130)
    await manager.refresh(force=True)
    grade = manager.health()
    assert set(grade.names()) == {"refresh_expiry", "missed_rotation"}, grade.names()
    assert grade.severity is Severity.WARNING
    emulator.advance_clock(110)  # 20 s left
    assert manager.health().severity is Severity.CRITICAL


@pytest.mark.slow(seconds=14)
async def test_a_daemon_under_default_settings_keeps_odd_short_tokens_quietly(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`kakao-tokend run` with Kakao's default window and alert ladder against 2-second access
    and 12-second refresh tokens whose lifetimes come as strings and whose rotations come
    without their expiry: it rotates again and again, saves each new refresh token, and says
    nothing alarming — no warning in the log, no alert in KakaoTalk, `status` exits 0."""
    short_tokens(emulator, access=2, refresh=12)
    emulator.settings.refresh_expiry_on_rotation = False
    emulator.settings.lifetimes_as_strings = True
    config = write_config(tmp_path, emulator, rotation_window=30 * 86400.0)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("rotated=yes", count=2, timeout=40)
        code, out, err = await run_cli(config, "status")
        assert code == 0, out + err
    finally:
        assert await daemon.stop() == 0
    log = daemon.log_text()
    loud = [line for line in log.splitlines() if " WARNING " in line or " CRITICAL " in line]
    assert loud == [], "\n".join(loud)
    assert emulator.inbox() == []
    assert emulator.stats.retired_refresh_presented == 0
    saved = AccountStore(load_config(config).accounts["default"]).load()
    assert saved is not None
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


async def test_a_daemon_left_at_the_default_timeout_gets_past_a_hung_kakao_within_the_tokens_life(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`kakao-tokend run` with `[kakao] timeout` left at Kakao's 30 s and 6-second tokens: the
    first refresh hangs (Kakao never answers); the daemon gives up after 4.75 % of the lifetime
    (the default policy's share, tokens.request_timeout_share) and serves a fresh, valid token
    again within about a lifetime — not 30 s later."""
    short_tokens(emulator, access=6, refresh=3600)
    config = write_config(tmp_path, emulator, timeout="30s")  # the default's value
    state = await login(emulator, config)
    emulator.inject("token", "timeout", delay=60.0, count=1)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(
            lambda: emulator.stats.faults_fired["timeout"] == 1, timeout=15, what="the hang"
        )
        hung_at = time.monotonic()
        await daemon.wait_for(
            lambda: (
                daemon.published()["generation"] > state.generation
                and emulator.access_token_valid(daemon.published()["access_token"])
            ),
            timeout=25,
            what="a fresh token after the hang",
        )
        recovered = time.monotonic() - hung_at
    finally:
        assert await daemon.stop() == 0
    assert recovered < 6.0, f"{recovered:.1f}s after the hang (4.75 % of 6 s is 0.29 s)"
    assert "did not answer /oauth/token within" in daemon.log_text()


@pytest.mark.parametrize("kind", ["http429", "http429_retry_after"])
async def test_a_429_on_the_token_endpoint_pauses_within_the_tokens_life(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, kind: str
) -> None:
    """HTTP 429 from a gateway in front of Kakao, without Retry-After or with an hour of it:
    the refresher pauses as for a rate limit (not the quick first step), yet the retry lands
    before the 6-second access token expires, and it succeeds."""
    short_tokens(emulator, access=6, refresh=3600)
    config_path = write_config(tmp_path, emulator, retry_initial="10s", retry_max="5m")
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app),
        policy=config.refresh,
    )
    manager.load()
    emulator.inject("token", kind)
    await manager.refresh(force=True)
    status = manager.status
    assert (status.health, status.last_error_class) == (Health.RETRYING, "http429")
    assert status.next_attempt_at is not None and manager.state is not None
    assert status.failing_since is not None  # the moment the pause was decided (the first failure)
    pause = (status.next_attempt_at - status.failing_since).total_seconds()
    now = utcnow()
    wait = (status.next_attempt_at - now).total_seconds()
    left = manager.state.tokens.access_remaining(now).total_seconds()
    # The longest step of a 6-second life is 0.5 s: a rate limit pauses at least half of it.
    # (Measured from the failure, not from now: the time since, on a loaded machine, is not
    # the refresher's.)
    assert pause >= 0.25 and wait < left, (pause, wait, left)
    await asyncio.sleep(max(wait, 0.0))
    await manager.tick()
    assert manager.status.health is Health.OK, manager.status.last_error


async def test_token_answers_without_expires_in_ask_kakao_how_long_the_token_lives(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A token answer without ``expires_in`` still carries a working access token: its life is
    asked of access_token_info instead of refusing the login, or throwing the token away and
    refreshing again and again until it dies."""
    emulator.settings.omit_token_fields = ["expires_in"]
    manager = await virtual_manager(emulator, tmp_path, session)
    state = manager.state
    assert state is not None
    assert abs(state.tokens.access_lifetime.total_seconds() - ACCESS) < 2
    await manager.refresh(force=True)
    assert manager.status.health is Health.OK, manager.status.last_error
    tokens = manager.state.tokens  # type: ignore[union-attr]
    assert tokens.access_token != state.tokens.access_token
    left = tokens.access_remaining(emulator.now_datetime()).total_seconds()
    assert ACCESS - 2 < left <= ACCESS


def relogged_without_user_id(emulator: KakaoEmulator, state: AccountState) -> AccountState:
    """A new login's state whose /v2/user/me failed (no user id), one generation up."""
    return replace(
        state,
        tokens=TokenSet.from_token_response(emulator.issue_tokens(), requested_at=utcnow()),
        generation=state.generation + 1,
        user_id=None,
    )


async def test_the_first_start_makes_the_user_info_call_a_failed_login_could_not(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A login whose /v2/user/me failed stores no user id; Kakao would unlink that user a day
    later. The daemon's check at start makes the call then, once."""
    manager = await virtual_manager(emulator, tmp_path, session)
    assert manager.state is not None
    unsigned = replace(manager.state, user_id=None)
    manager.store.save(unsigned)
    manager.load()
    emulator.user().personal_info_called = False
    calls = emulator.stats.requests["user_me"]
    await manager.verify()
    assert emulator.user().personal_info_called
    assert emulator.stats.requests["user_me"] == calls + 1
    assert manager.state is not None and manager.state.user_id == emulator.user().id
    await manager.verify()  # the id is known now: no second call
    assert emulator.stats.requests["user_me"] == calls + 1


async def test_a_running_daemon_makes_the_user_info_call_a_login_it_adopted_could_not(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A `login` made while the daemon runs whose /v2/user/me failed saved tokens without a
    user id; the daemon adopts them and makes the call at its next tick, once."""
    manager = await virtual_manager(emulator, tmp_path, session)
    assert manager.state is not None
    relogged = relogged_without_user_id(emulator, manager.state)
    emulator.user().personal_info_called = False
    manager.store.save(relogged)
    calls = emulator.stats.requests["user_me"]
    await manager.tick()
    assert manager.state is not None and manager.state.generation == relogged.generation
    assert emulator.user().personal_info_called
    assert emulator.stats.requests["user_me"] == calls + 1
    await manager.tick()  # this generation had its call: no second one
    assert emulator.stats.requests["user_me"] == calls + 1


def test_a_refresh_token_born_between_the_ladder_and_the_window_is_fitted_whole(
    tmp_path: Path,
) -> None:
    """A 20-day refresh token (longer than the 14-day first alert, shorter than the 30-day
    window): the window and the ladder shrink by the same share, so the alert that would come
    at 14 days, before the fitted 10-day window even opens, does not."""
    config = load_config(write_config(tmp_path, rotation_window=30 * 86400.0))
    account = config.accounts["default"]
    born = datetime(2026, 12, 1, tzinfo=UTC)
    body = {
        "access_token": "a" * 20,
        "expires_in": 21599,
        "refresh_token": "r" * 20,
        "refresh_token_expires_in": 20 * 86400,
    }
    state = AccountState(
        account="default",
        tokens=TokenSet.from_token_response(body, requested_at=born),
        refreshed_at=born,
    )
    status = AccountStatus()
    status.adopted(state)
    at_12_days_left = born + timedelta(days=8)
    assert assess(account, state, status, config.refresh, at_12_days_left).names() == []
    window = rotation_window(state.tokens, config.refresh.rotation_window)
    assert abs(window - timedelta(days=10)) < timedelta(seconds=1)  # 30 of 60 days less 1 s
    # Below the fitted 3-day share (1 day of 20) it is critical, as a 60-day token at 3 days.
    graded = assess(account, state, status, config.refresh, born + timedelta(days=19, hours=1))
    assert graded.names() == ["refresh_expiry"] and graded.severity is Severity.CRITICAL


async def test_a_rotation_without_expires_in_is_saved_before_kakao_is_asked_anything(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A rotating answer without ``expires_in``: the new refresh token (the old one is dead)
    is saved first, with the old access token; only the next refresh asks access_token_info
    how long its access token lives. Asking first left the new refresh token unsaved for as
    long as that question took (a crash then lost the account)."""
    emulator.settings.omit_token_fields = ["expires_in"]
    manager = await virtual_manager(emulator, tmp_path, session)
    first = manager.state
    assert first is not None
    emulator.advance_clock(REFRESH - WINDOW + 10)
    emulator.inject("access_token_info", "hold", delay=30.0)
    refreshing = asyncio.create_task(manager.refresh(force=True))
    while not refreshing.done() and emulator.held_requests == 0:
        await asyncio.sleep(0.01)
    saved = manager.store.load()
    emulator.clear_faults()
    emulator.release_held()
    await refreshing
    assert saved is not None
    assert saved.tokens.refresh_fingerprint != first.tokens.refresh_fingerprint
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"
    await manager.refresh(force=True)  # the retry: a new access token, its life asked of Kakao
    assert manager.status.health is Health.OK, manager.status.last_error
    tokens = manager.state.tokens  # type: ignore[union-attr]
    assert tokens.refresh_token == saved.tokens.refresh_token
    assert abs(tokens.access_lifetime.total_seconds() - ACCESS) < 2


# Kakao's 6-hour access token with a refresh token in its last seconds: every wait the first
# failed refresh starts (the request's timeout, a 429's Retry-After) must end in time for a
# retry that still saves the refresh token.
DYING_REFRESH = 8.0


async def _dying_manager(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    *,
    access: float = 21599,
    refresh: float = DYING_REFRESH,
    **config: str,
) -> AccountManager:
    """Log in with a 6-hour access token and an 8-second refresh token (every refresh rotates);
    return the daemon's manager for it, with ``config`` (write_config's options) applied."""
    emulator.settings.access_lifetime = access
    emulator.settings.refresh_lifetime = refresh
    # Every test here needs its first request to reach the emulator: on a saturated CI
    # machine a 1 s connect timeout once ran out on loopback (the test process itself waited
    # for the CPU). No wait outlasts half of the refresh token's life anyway.
    config.setdefault("connect_timeout", "3s")
    config_path = write_config(tmp_path, emulator, retry_initial="10s", retry_max="5m", **config)
    await login(emulator, config_path)
    loaded = load_config(config_path)
    account = loaded.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app),
        policy=loaded.refresh,
    )
    manager.load()
    return manager


async def _saved_before_death(manager: AccountManager, emulator: KakaoEmulator) -> None:
    """Run the planned retries until the account is healthy; assert the refresh token was
    rotated before the old one died and the new one is live."""
    assert manager.state is not None
    old = manager.state.tokens
    while manager.status.health is not Health.OK:
        assert manager.status.health in (Health.RETRYING, Health.CONFIG), manager.status.last_error
        due = manager.status.next_attempt_at
        assert due is not None
        assert due < old.refresh_expires_at, "the retry is planned after the refresh token dies"
        await asyncio.sleep(max(0.0, (due - utcnow()).total_seconds()))
        await manager.tick()
    assert manager.state is not None
    tokens = manager.state.tokens
    assert tokens.refresh_token != old.refresh_token
    assert emulator.refresh_token_status(tokens.refresh_token) == "live"


async def test_a_hand_set_timeout_gives_up_in_time_for_a_retry_that_saves_the_refresh_token(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """`[kakao] timeout = "60s"` set by hand, 12 s of refresh life left, and Kakao hangs on
    the refresh: the request gives up after half of what is left, and the retry, before the
    refresh token dies, rotates it. Before, the request waited out its 60 s (here the 30 s
    hang): the refresh token died during the wait."""
    manager = await _dying_manager(emulator, tmp_path, session, refresh=12, timeout="60s")
    emulator.inject("token", "timeout", delay=30.0, count=1)
    started = time.monotonic()
    await asyncio.wait_for(manager.refresh(force=True), timeout=10)
    assert time.monotonic() - started < 12 / 2 + 0.5
    assert manager.status.last_error_class == "timeout"
    await _saved_before_death(manager, emulator)


async def test_a_429_retry_after_of_an_hour_does_not_outlast_a_dying_refresh_token(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A gateway's 429 with an hour of Retry-After while the 6-hour access token serves and
    the refresh token has 8 s left (under the 10 s first step): the retry comes at half of
    what is left and rotates it. Before, the pause was the longest step (150-300 s) and the
    refresh token died during it."""
    manager = await _dying_manager(emulator, tmp_path, session)
    emulator.inject("token", "http429_retry_after", count=1)
    await manager.refresh(force=True)
    assert manager.status.last_error_class == "http429"
    await _saved_before_death(manager, emulator)


async def test_a_refused_configuration_is_tried_again_before_the_refresh_token_dies(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """KOE010 (the client secret switched in Kakao's console) with 8 s of refresh life left:
    the configuration's slow pace (the longest step, 5 minutes) comes at half of what is left,
    and once the console is put right that retry saves the refresh token. Before, the retry
    came minutes after its death."""
    manager = await _dying_manager(emulator, tmp_path, session)
    secret = emulator.settings.client_secret
    emulator.settings.client_secret = "regenerated-in-the-console"
    await manager.refresh(force=True)
    assert manager.status.health is Health.CONFIG, manager.status.last_error
    emulator.settings.client_secret = secret
    await _saved_before_death(manager, emulator)


async def test_a_lock_held_elsewhere_is_given_up_in_time_for_a_retry(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Another process holds the account's lock while the refresh token has 6 s left (a
    20-minute access token: the lock wait is its longest, 5 s): the refresh gives up after
    half of what is left, and its retry, once the lock is free, saves the refresh token.
    Before, it waited the full 5 s and the retry no longer fitted before the death."""
    manager = await _dying_manager(emulator, tmp_path, session, access=1200, refresh=6)
    assert manager.state is not None
    other = AccountStore(manager.account)
    with other.lock(timeout=1):
        started = time.monotonic()
        await manager.refresh(force=True)
        waited = time.monotonic() - started
    assert manager.status.last_error_class == "lock_busy", manager.status.last_error
    assert waited < 4.0, waited
    await _saved_before_death(manager, emulator)


async def test_the_user_info_call_is_made_once_not_before_every_refresh(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Once /v2/user/me answered, the account's user id is known: the refreshes after it
    (each a new generation) make no more user-info calls."""
    manager = await virtual_manager(emulator, tmp_path, session)
    assert manager.state is not None
    relogged = relogged_without_user_id(emulator, manager.state)
    manager.store.save(relogged)
    calls = emulator.stats.requests["user_me"]
    await manager.tick()
    assert emulator.stats.requests["user_me"] == calls + 1
    calls += 1
    for _ in range(3):
        await manager.refresh(force=True)
        await manager.tick()
    assert manager.status.health is Health.OK, manager.status.last_error
    assert emulator.stats.requests["user_me"] == calls
    assert manager.state is not None and manager.state.user_id == emulator.user().id


@pytest.mark.parametrize("path", ["start", "tick"])
async def test_a_hung_user_info_call_does_not_hold_up_a_due_refresh(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, path: str
) -> None:
    """A login whose /v2/user/me failed, and Kakao's user-info endpoint hangs: the refresh
    that is due goes first, and the call gives up within a share of the 6-second lifetime
    (not the configured 30 s), so the account never waits on it."""
    short_tokens(emulator, access=6, refresh=3600)
    config_path = write_config(tmp_path, emulator, timeout="30s")
    state = await login(emulator, config_path)
    account = load_config(config_path).accounts["default"]
    store = AccountStore(account)
    store.save(replace(state, user_id=None))
    manager = AccountManager(
        account,
        store=store,
        client=KakaoClient(session, account.app),
        policy=load_config(config_path).refresh,
    )
    manager.load()
    await asyncio.sleep(5.0)  # the refresh is due (75 % of 6 s), the token still valid
    emulator.inject("user_me", "timeout", delay=60.0)
    started = time.monotonic()
    if path == "start":
        await asyncio.wait_for(manager.verify(), 6.0)
    await asyncio.wait_for(manager.tick(), 6.0)
    assert manager.state is not None and manager.state.generation > state.generation
    assert emulator.access_token_valid(manager.state.tokens.access_token)
    assert time.monotonic() - started < 6.0


async def test_a_refresh_token_shorter_than_the_access_token_survives_a_slow_kakao(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Kakao issues 4-second refresh tokens beside 10-second access tokens (rotating in the
    last half) and takes 0.15 s per token answer: every refresh is planned by the dying
    refresh token with room for an answer and a retry, so `kakao-tokend run` keeps rotating
    and never loses the account (at 0.1 s before the death, the timeout was 0.05 s)."""
    short_tokens(emulator, access=10, refresh=4)
    config = write_config(tmp_path, emulator, timeout="30s", connect_timeout="10s")
    await login(emulator, config)
    emulator.inject("token", "slow", rate=1.0, delay=0.15)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(
            lambda: emulator.stats.rotations >= 4, timeout=30, what="four rotations"
        )
    finally:
        assert await daemon.stop() == 0
    assert "needs a new login" not in daemon.log_text()
    assert emulator.stats.retired_refresh_presented == 0
    saved = AccountStore(load_config(config).accounts["default"]).load()
    assert saved is not None
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


async def test_a_kakao_slower_than_the_fitted_timeout_is_waited_for_and_every_rotation_kept(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """10-second access tokens, every refresh rotating, Kakao answering each token request
    in 1 s (a tenth of the life, more than the 0.475 s the default timeout is fitted to)
    and dropping the requests its client gave up on: `kakao-tokend run` with the default
    timeouts waits longer after each timeout (0.95 s, then 1/8 of the life: 1.25 s), so
    refreshes complete, each rotated refresh token is saved, and nobody is asked to log in
    again. Before, every request gave up after 0.475 s and no refresh ever completed."""
    short_tokens(emulator, access=10, refresh=3600)
    emulator.settings.rotation_window = 100_000.0  # Kakao's absolute month: always rotate
    config = write_config(tmp_path, emulator, timeout="30s", connect_timeout="10s")
    await login(emulator, config)
    emulator.inject("token", "slow", rate=1.0, delay=1.0)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(
            lambda: emulator.stats.rotations >= 2, timeout=30, what="two rotating refreshes"
        )
    finally:
        assert await daemon.stop() == 0
    assert "needs a new login" not in daemon.log_text()
    assert emulator.stats.retired_refresh_presented == 0
    saved = AccountStore(load_config(config).accounts["default"]).load()
    assert saved is not None and saved.relogin_reason is None
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


async def test_a_refusal_slower_than_the_fitted_timeout_is_heard_and_asks_for_a_login(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """As above, but the first refresh's answer is lost after Kakao rotated (the
    connection closed: nobody can learn that refresh token), and every later answer (KOE322)
    takes 1 s: with the timeout fixed at 0.475 s the daemon never heard it and retried
    forever with "check that this host reaches Kakao". Now the request is heard (the next
    attempt waits for the open one instead of asking again), and the account asks for a
    new login because the rotation's answer was lost (relogin cause rotated_lost)."""
    short_tokens(emulator, access=10, refresh=3600)
    emulator.settings.rotation_window = 100_000.0
    config = write_config(tmp_path, emulator, timeout="30s", connect_timeout="10s")
    await login(emulator, config)
    emulator.inject("token", "lost_response", count=1)
    emulator.inject("token", "slow", rate=1.0, delay=1.0)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(
            lambda: daemon.state().get("relogin_cause") is not None,
            timeout=20,
            what="the refusal to be heard",
        )
    finally:
        assert await daemon.stop() == 0
    assert daemon.state()["relogin_cause"] == "rotated_lost"
    assert "needs a new login: the refresh response was lost" in daemon.log_text()


async def test_one_tiny_expires_in_does_not_shorten_the_wait_below_how_long_kakao_answers(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """60-second tokens inside the rotation window, a Kakao that rotates at once but whose
    answers take 0.2 s, and one answer saying the new access token lives 1 s: the next
    refresh waits for Kakao's 0.2 s (twice the time its latest answer took), keeps the
    rotated refresh token, and asks Kakao once. Before, every wait was fitted to the 1 s
    life (0.0475 s, growing to 0.125 s) and none heard a 0.2 s answer: each request rotated
    unheard, the next presented a retired token (KOE322, a new login), and outside the
    window the daemon asked again and again until Kakao's rate limit (KOE237)."""
    manager = await virtual_manager(
        emulator, tmp_path, session, timeout="30s", connect_timeout="10s"
    )
    emulator.inject("token", "late", rate=1.0, delay=0.2)
    emulator.settings.access_lifetime = 1  # once: Kakao's answer says the token lives 1 s
    tiny = await manager.refresh(force=True)
    emulator.settings.access_lifetime = ACCESS
    assert tiny is not None and tiny.tokens.access_lifetime == timedelta(seconds=1)

    emulator.advance_clock(REFRESH - WINDOW + 10)  # 290 s left: the next refresh rotates
    sent = emulator.stats.requests["token"]
    for _ in range(4):  # bounded: one attempt is enough now
        await manager.refresh(force=True)
        await manager.wait_idle(manager.request_grace)  # a request given up on, if any
        if manager.status.health is Health.OK:
            break
    assert manager.status.health is Health.OK, manager.status.last_error
    assert emulator.stats.requests["token"] - sent == 1
    assert emulator.stats.retired_refresh_presented == 0
    state = manager.state
    assert state is not None and state.tokens.access_lifetime == timedelta(seconds=ACCESS)
    assert state.tokens.refresh_token != tiny.tokens.refresh_token
    assert emulator.refresh_token_status(state.tokens.refresh_token) == "live"
    saved = manager.store.load()
    assert saved is not None and saved.tokens.refresh_token == state.tokens.refresh_token
    # A 0.2 s answer is well within a 60 s token's own waits: nothing is kept for it.
    assert manager.status.heard_in is None and manager.status._trouble is None


async def test_a_quick_answer_that_shortens_the_tokens_life_does_not_shorten_the_next_wait(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """As above, but the answer saying the token lives 1 s comes at once, and only the
    answers after it take 0.2 s (the audit's repro): nothing slow was heard yet, so the
    next request waits at least what the one that brought the 1 s token could have
    (2.85 s of the 60 s life), hears the 0.2 s answer, and keeps its rotation."""
    manager = await virtual_manager(
        emulator, tmp_path, session, timeout="30s", connect_timeout="10s"
    )
    emulator.settings.access_lifetime = 1
    tiny = await manager.refresh(force=True)
    emulator.settings.access_lifetime = ACCESS
    assert tiny is not None and tiny.tokens.access_lifetime == timedelta(seconds=1)
    emulator.inject("token", "late", rate=1.0, delay=0.2)

    emulator.advance_clock(REFRESH - WINDOW + 10)  # 290 s left: the next refresh rotates
    sent = emulator.stats.requests["token"]
    for _ in range(4):  # bounded: one attempt is enough now
        await manager.refresh(force=True)
        await manager.wait_idle(manager.request_grace)
        if manager.status.health is Health.OK:
            break
    assert manager.status.health is Health.OK, manager.status.last_error
    assert emulator.stats.requests["token"] - sent == 1
    assert emulator.stats.retired_refresh_presented == 0
    state = manager.state
    assert state is not None and state.tokens.refresh_token != tiny.tokens.refresh_token
    assert emulator.refresh_token_status(state.tokens.refresh_token) == "live"
    assert manager.status.heard_in is None
