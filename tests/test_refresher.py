"""AccountManager and RefreshScheduler in-process, against the emulator on loopback."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import time_machine
from aiohttp import web
from aiohttp.test_utils import TestServer
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

from daemonproc import config_with, login, short_tokens, write_config
from kakao_tokend.config import AccountConfig, RefreshPolicy, load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.refresher import AccountManager
from kakao_tokend.relogin import login_command
from kakao_tokend.scheduler import RefreshScheduler
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountEvent, AccountStatus, Health
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet, format_time, utcnow


async def make_manager(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    *,
    policy: RefreshPolicy | None = None,
    logged_in: bool = True,
) -> AccountManager:
    """Log the default account in and build its manager the way the daemon does."""
    config_path = write_config(tmp_path, emulator)
    if logged_in:
        await login(emulator, config_path)
    config = load_config(config_path)
    account: AccountConfig = config.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app),
        policy=policy or config.refresh,
    )
    manager.load()
    return manager


async def test_concurrent_callers_share_one_refresh(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Ten simultaneous forced refreshes reach Kakao once and all see the same new state."""
    manager = await make_manager(emulator, tmp_path, session)
    before = emulator.stats.refreshes_ok
    emulator.inject("token", "slow", count=1, delay=0.3)
    results = await asyncio.gather(*(manager.refresh(force=True) for _ in range(10)))
    assert emulator.stats.refreshes_ok == before + 1
    assert len({r.generation for r in results if r is not None}) == 1
    assert manager.store.load().generation == 2  # type: ignore[union-attr]


async def test_a_cancelled_caller_does_not_interrupt_the_refresh(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Cancelling the task that asked for a refresh still lets the answer be persisted."""
    manager = await make_manager(emulator, tmp_path, session)
    emulator.inject("token", "slow", count=1, delay=0.4)
    caller = asyncio.create_task(manager.refresh(force=True))
    await asyncio.sleep(0.1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await manager.wait_idle(5)
    assert manager.store.load().generation == 2  # type: ignore[union-attr]


async def default_timeouts_manager(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, *, access: float
) -> AccountManager:
    """Log in with ``access``-second tokens and build the manager with the Kakao timeouts at
    their defaults (fitted to the lifetime), its client on the refresh policy."""
    short_tokens(emulator, access=access, refresh=3600)
    config_path = write_config(tmp_path, emulator, timeout="30s", connect_timeout="10s")
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app, policy=config.refresh),
        policy=config.refresh,
    )
    manager.load()
    return manager


async def given_up_on_a_late_rotation(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, *, delay: float
) -> tuple[AccountManager, AccountState]:
    """10-second tokens inside Kakao's rotation window (every refresh rotates), the default
    timeouts (0.475 s): one refresh that Kakao rotates at once and answers ``delay`` s later,
    given up on after its wait. Return the manager and the state before it."""
    manager = await default_timeouts_manager(emulator, tmp_path, session, access=10)
    emulator.settings.rotation_window = 7200  # every refresh of the 3600 s token rotates
    before = manager.state
    assert before is not None
    emulator.inject("token", "late", count=1, delay=delay)
    await manager.refresh(force=True)
    assert manager.status.last_error_class == "timeout"
    return manager, before


async def test_a_token_request_after_a_timeout_waits_longer_until_kakao_answers(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """10-second tokens, the default timeouts (fitted to 4.75 % of the life: 0.475 s), Kakao
    taking 0.7 s per token answer: the first request times out and is counted (its answer,
    when it comes, is still taken), and the next one waits twice as long and gets its
    answer. A Kakao that slow stays that slow: the requests after it keep the longer wait
    (no timeout each cycle), until an answer that the usual wait would have heard brings it
    back. Before, every request gave up after 0.475 s."""
    manager = await default_timeouts_manager(emulator, tmp_path, session, access=10)
    emulator.inject("token", "slow", count=1, delay=0.7)
    await manager.refresh(force=True)
    assert manager.status.last_error_class == "timeout"
    assert manager.status.unanswered == 1
    state = await manager.refresh(force=True)  # waits for that answer, sends nothing more
    assert state is not None and state.generation == 2
    assert emulator.stats.refreshes_ok == 1
    emulator.inject("token", "slow", count=1, delay=0.7)
    started = time.monotonic()
    state = await manager.refresh(force=True)
    assert time.monotonic() - started >= 0.7  # it waited for the answer
    assert state is not None and state.generation == 3
    assert manager.status.health is Health.OK and manager.status.unanswered == 1
    emulator.inject("token", "slow", count=1, delay=0.7)
    state = await manager.refresh(force=True)
    assert state is not None and state.generation == 4  # heard at once: no timeout first
    assert manager.status.health is Health.OK and manager.status.unanswered == 1
    await manager.refresh(force=True)  # a quick answer: the usual wait again
    assert manager.status.health is Health.OK and manager.status.unanswered == 0


async def test_a_rotation_whose_answer_comes_after_the_wait_is_still_kept(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """10-second tokens inside Kakao's rotation window (every refresh rotates), the default
    timeouts (0.475 s), and a Kakao that rotates at once but whose answer takes 0.8 s: the
    request is given up after its wait and the retry with the same refresh token gets
    KOE322 — yet the first request's answer is still read when it comes, and its rotated
    refresh token kept: no new login. Before, the rotation was thrown away with the request
    (network delay does not shrink with the token's life: 0.8 s is ordinary)."""
    manager, before = await given_up_on_a_late_rotation(emulator, tmp_path, session, delay=0.8)
    assert emulator.refresh_token_status(before.tokens.refresh_token) == "retired"
    state = await manager.refresh(force=True)  # the same refresh token again: KOE322
    assert manager.status.health is Health.OK, manager.status.last_error
    assert state is not None and state.generation == before.generation + 1
    assert emulator.refresh_token_status(state.tokens.refresh_token) == "live"
    saved = manager.store.load()
    assert saved is not None and saved.generation == state.generation
    assert saved.tokens.refresh_token == state.tokens.refresh_token
    assert emulator.access_token_valid(state.tokens.access_token)


async def test_a_late_answer_is_kept_without_waiting_for_the_next_attempt(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The same late rotation, with no retry asked for: the answer, when it comes, is made
    durable at once (the account's next planned attempt could be a back-off away, and the
    process could die before it)."""
    manager, before = await given_up_on_a_late_rotation(emulator, tmp_path, session, delay=0.8)
    for _ in range(100):  # bounded: the answer comes 0.8 s after the request
        saved = manager.store.load()
        if saved is not None and saved.generation > before.generation:
            break
        await asyncio.sleep(0.05)
    assert saved is not None and saved.generation == before.generation + 1
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"
    assert manager.status.health is Health.OK


async def test_waiting_for_idle_keeps_the_late_answer_of_a_request_still_open(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A stop, a reload or a command that ends waits for the account to be idle
    (wait_idle) before it closes the session: a request given up on but still open counts,
    and its late answer (a rotation) is kept first. Before, the stop closed the session under
    it, and the next start found the refresh token retired (KOE322, a new login)."""
    manager, before = await given_up_on_a_late_rotation(emulator, tmp_path, session, delay=1.0)
    assert await manager.wait_idle(manager.request_grace)
    saved = manager.store.load()
    assert saved is not None and saved.generation == before.generation + 1
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


async def test_a_late_rotation_that_cannot_be_saved_at_once_is_in_the_rescue_file_at_once(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Kakao rotates at once and answers after the request was given up on, while another
    process (a `login`, a command) holds the account: the rotated tokens cannot be saved
    yet, and they are in the rescue file the moment they are heard, as every rotation whose
    saving failed is, not only in memory: a kill -9 before the lock comes free would lose
    the only live refresh token. Before, the late answer waited in memory alone (an outside
    audit: a fleet node killed then, the account needed a new login). Once the lock is free
    the tokens are saved and the rescue file goes."""
    short_tokens(emulator, access=10, refresh=3600)
    emulator.settings.rotation_window = 7200  # every refresh of the 3600 s token rotates
    config_path = write_config(tmp_path, emulator, timeout="30s", connect_timeout="10s")
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account, rescue_dir=config.runtime_dir),  # as the daemon's
        client=KakaoClient(session, account.app, policy=config.refresh),
        policy=config.refresh,
    )
    before = manager.load()
    assert before is not None
    emulator.inject("token", "late", count=1, delay=1.0)
    await manager.refresh(force=True)
    assert manager.status.last_error_class == "timeout"
    other = AccountStore(account)
    async with other.hold(0):  # another process holds the account
        for _ in range(200):
            if not manager.awaiting_kakao:
                break
            await asyncio.sleep(0.01)
        assert not manager.awaiting_kakao  # the late answer came
        rescued = manager.store.load_rescue()
        assert rescued is not None and rescued.generation == before.generation + 1
        assert emulator.refresh_token_status(rescued.tokens.refresh_token) == "live"
    assert await manager.wait_idle(manager.request_grace)
    saved = manager.store.load()
    assert saved is not None and saved.tokens.refresh_token == rescued.tokens.refresh_token
    assert manager.store.load_rescue() is None


async def test_a_late_rotation_with_an_unusable_access_part_is_rescued_and_saved(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The late answer rotated the refresh token but its access part is unusable (a
    PartialRefresh: only the new refresh token can be kept). It is a rotation like any
    other: in the rescue file the moment it is heard while another process holds the
    account, and saved once the lock is free. Before, it counted as a late refusal: in
    memory only until the next attempt, and a stop (wait_idle) did not wait to save it."""
    new_refresh = "N" * 60

    async def token(request: web.Request) -> web.Response:
        await request.post()
        await asyncio.sleep(1.0)  # after the 0.475 s wait of a 10-second token
        return web.json_response(
            {
                "token_type": "bearer",
                "refresh_token": new_refresh,
                "refresh_token_expires_in": 5183999,
            }
        )

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        config = load_config(write_config(tmp_path, url, timeout="30s", connect_timeout="10s"))
        account = config.accounts["default"]
        now = utcnow()
        tokens = TokenSet(
            access_token="A" * 60,
            refresh_token="R" * 60,
            access_expires_at=now + timedelta(seconds=10),
            refresh_expires_at=now + timedelta(seconds=3600),
            access_issued_at=now,
            refresh_issued_at=now,
        )
        store = AccountStore(account, rescue_dir=config.runtime_dir)  # as the daemon's
        async with store.hold(0):
            store.save(AccountState("default", tokens, generation=1))
        manager = AccountManager(
            account,
            store=store,
            client=KakaoClient(session, account.app, policy=config.refresh),
            policy=config.refresh,
        )
        manager.load()
        await manager.refresh(force=True)
        assert manager.status.last_error_class == "timeout"
        async with AccountStore(account).hold(0):  # another process holds the account
            for _ in range(300):
                if not manager.awaiting_kakao:
                    break
                await asyncio.sleep(0.01)
            assert not manager.awaiting_kakao  # the late answer came
            rescued = manager.store.load_rescue()
            assert rescued is not None and rescued.tokens.refresh_token == new_refresh
        assert await manager.wait_idle(manager.request_grace)
        saved = manager.store.load()
        assert saved is not None and saved.tokens.refresh_token == new_refresh
    finally:
        await server.close()


async def test_a_late_answer_after_a_new_login_calls_kakao_for_nothing(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A request given up on answers late, but a `login` wrote newer tokens meanwhile: the
    run that would keep the late answer finds them under the lock and stops there. Before,
    it went on as a forced refresh of the new tokens (one Kakao call for nothing; in a fleet,
    after another node's commit, the same)."""
    manager = await default_timeouts_manager(emulator, tmp_path, session, access=10)
    emulator.inject("token", "late", count=1, delay=1.0)
    await manager.refresh(force=True)
    assert manager.status.last_error_class == "timeout"
    fresh = await login(emulator, tmp_path / "config.toml")
    asked = len(emulator.stats.refresh_log)
    assert await manager.wait_idle(manager.request_grace)
    await asyncio.sleep(0.1)  # the late answer's run, if one was started, has ended too
    assert len(emulator.stats.refresh_log) == asked
    state = manager.store.load()
    assert state is not None and state.tokens.refresh_token == fresh.tokens.refresh_token


async def test_a_long_lived_tokens_rotation_answered_after_the_configured_wait_is_kept(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A token living an hour waits the configured time for Kakao (here 1 s, set by hand,
    standing in for Kakao's 6-hour token and its 30 s), and no growth rule lengthens that:
    a rotation Kakao answers after 1.5 s is still kept, the request staying open for twice
    the configured wait. Before, a request was kept open only past a wait fitted to a short
    life, so from about 10 minutes of life up an answer after the wait was lost with its
    rotation (an outside audit: Kakao's real token, an answer after 31 s, a new login)."""
    short_tokens(emulator, access=3600, refresh=7200)
    emulator.settings.rotation_window = 100_000.0  # every refresh rotates
    config_path = write_config(tmp_path, emulator, timeout="1s", connect_timeout="1s")
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app, policy=config.refresh),
        policy=config.refresh,
    )
    before = manager.load()
    assert before is not None
    emulator.inject("token", "late", count=1, delay=1.5)
    await manager.refresh(force=True)
    assert manager.status.last_error_class == "timeout"
    assert await manager.wait_idle(manager.request_grace)
    saved = manager.store.load()
    assert saved is not None and saved.generation == before.generation + 1
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


async def test_tokens_written_by_login_are_adopted_not_overwritten(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A refresh re-reads the state under the lock and uses the newer refresh token on disk."""
    manager = await make_manager(emulator, tmp_path, session)
    stale_refresh = manager.state.tokens.refresh_token  # type: ignore[union-attr]
    # Another process logs in again: a new token set lands on disk behind the manager's back.
    fresh = await login(emulator, tmp_path / "config.toml")
    await manager.refresh(force=True)
    state = manager.store.load()
    assert state is not None
    assert state.generation == fresh.generation + 1
    presented = [attempt.fingerprint for attempt in emulator.stats.refresh_log]
    assert presented[-1] == fresh.tokens.refresh_fingerprint
    assert state.tokens.refresh_token != stale_refresh


async def test_relogin_needed_is_persisted_and_stops_planning(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """KOE322 marks the account, writes the reason to the state file and plans nothing more."""
    manager = await make_manager(emulator, tmp_path, session)
    emulator.revoke_user_tokens(manager.state.user_id or 0)  # type: ignore[union-attr]
    events: list[AccountEvent] = []
    manager.listeners.append(events.append)
    await manager.refresh(force=True)
    assert manager.status.health is Health.RELOGIN
    assert manager.planned_refresh_at() is None
    stored = manager.store.load()
    assert stored is not None and stored.relogin_reason
    assert login_command(manager.account) in stored.relogin_reason
    # The refused call is timed (for /metrics' histogram), then the relogin is announced.
    assert [e.kind for e in events] == ["refresh_call", "relogin"]
    assert events[0].data["outcome"] == "failure"
    requests = emulator.stats.requests["token"]
    await manager.tick()
    assert emulator.stats.requests["token"] == requests  # no hammering


async def test_a_configuration_fixed_in_kakaos_console_is_picked_up_without_a_reload(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client secret is switched in Kakao's console and back again (nothing in our config
    changes): the refused account is tried again at the back-off ladder's slowest pace (1/12
    of a 6-second lifetime) and refreshes again by itself, with one critical line, not one per
    retry."""
    emulator.settings.access_lifetime = 6
    manager = await make_manager(emulator, tmp_path, session)
    secret = emulator.settings.client_secret
    emulator.regenerate_client_secret()
    await manager.refresh(force=True)
    assert manager.status.health is Health.CONFIG
    planned = manager.planned_refresh_at()
    assert planned is not None and planned <= utcnow() + timedelta(seconds=0.5)
    refused = emulator.stats.requests["token"]
    for _ in range(60):  # a second and a half of heartbeats: the secret is still wrong
        await asyncio.sleep(0.025)
        await manager.tick()
    assert manager.status.health is Health.CONFIG
    assert emulator.stats.requests["token"] > refused  # tried again meanwhile
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1, [r.getMessage() for r in critical]
    assert "tried again in" in critical[0].getMessage()
    emulator.set_client_secret(secret)
    for _ in range(80):
        await asyncio.sleep(0.025)
        await manager.tick()
        if manager.status.health is Health.OK:
            break
    assert manager.status.health is Health.OK
    assert manager.state is not None and manager.state.generation == 2


async def test_wrong_client_secret_is_a_config_error_until_reload(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """KOE010 is a configuration error; clear_config_error (a reload) makes the next tick try
    again at once, not at the slow retry's moment."""
    manager = await make_manager(emulator, tmp_path, session)
    secret = emulator.settings.client_secret
    emulator.regenerate_client_secret()
    await manager.refresh(force=True)
    assert manager.status.health is Health.CONFIG
    assert manager.status.last_error_class == "KOE010"
    planned = manager.planned_refresh_at()
    assert planned is not None and planned > utcnow()  # the slow retry: later
    assert not manager.needs_refresh(utcnow())
    emulator.set_client_secret(secret)
    manager.clear_config_error()
    assert manager.needs_refresh(utcnow())  # a reload: at once
    await manager.tick()
    assert manager.status.health is Health.OK
    assert manager.state is not None and manager.state.generation == 2


async def test_transient_failures_back_off_and_never_wait_past_expiry(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Each 5xx schedules a later retry that still lies before the access token's expiry."""
    emulator.settings.access_lifetime = 60
    manager = await make_manager(emulator, tmp_path, session)
    emulator.inject("token", "http500", count=3)
    expires = manager.state.tokens.access_expires_at  # type: ignore[union-attr]
    retries: list[AccountEvent] = []
    manager.listeners.append(lambda event: event.kind == "retrying" and retries.append(event))
    delays = []
    for attempt in range(1, 4):
        await manager.refresh(force=True)
        assert manager.status.health is Health.RETRYING
        assert manager.status.attempt == attempt
        next_at = manager.status.next_attempt_at
        assert next_at is not None and next_at < expires
        failed_at = retries[-1].at  # the moment the failure was recorded
        delays.append((next_at - failed_at).total_seconds())
    assert delays[0] <= 60 / 200 + 0.01  # first step scaled to the 60 s lifetime
    assert max(delays) <= 60 / 12 + 0.01
    await manager.refresh(force=True)
    assert manager.status.health is Health.OK
    assert manager.status.attempt == 0


async def test_an_unusable_lock_file_backs_off_instead_of_crashing_the_refresh(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A lock file that cannot be opened (here: a directory) is a retried failure, not a crash.

    Before, StoreError escaped the refresh task: the status stayed "ok", no back-off was
    planned, and the scheduler re-ran the overdue one-shot job in a tight loop.
    """
    config_path = config_with(tmp_path, emulator)
    await login(emulator, config_path)
    account = load_config(config_path).accounts["default"]
    account.lock_file.unlink(missing_ok=True)
    account.lock_file.mkdir()
    async with create_session() as session:
        store = AccountStore(account)
        manager = AccountManager(
            account,
            store=store,
            client=KakaoClient(session, account.app),
            policy=load_config(config_path).refresh,
        )
        manager.load()
        calls = 0
        real_try_lock = store.try_lock

        def counting_try_lock() -> bool:
            nonlocal calls
            calls += 1
            return real_try_lock()

        store.try_lock = counting_try_lock  # type: ignore[method-assign]
        await manager.refresh(force=True)
        assert manager.status.health is Health.RETRYING
        assert manager.status.next_attempt_at is not None
        assert "lock" in (manager.status.last_error or "")
        # Under the scheduler an overdue account must not spin on the failing lock.
        manager._planned_refresh_at = manager.clock()
        manager.status.next_attempt_at = manager.clock()
        scheduler = RefreshScheduler(heartbeat=0.2)
        scheduler.start()
        scheduler.add(manager)
        calls = 0
        try:
            await asyncio.sleep(0.6)
        finally:
            scheduler.shutdown()
            await asyncio.sleep(0)
        assert calls <= 8, f"{calls} lock attempts in 0.6 s"


async def test_a_refresh_in_the_rotation_window_that_does_not_rotate_warns(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Our window says 'rotate now' but Kakao kept the old refresh token: a warning, once."""
    emulator.settings.rotation_window = 1  # Kakao rotates late
    # Twice its whole life: the token is well inside our window, where a rotation is certain.
    policy = RefreshPolicy(rotation_window=2 * emulator.settings.refresh_lifetime)
    manager = await make_manager(emulator, tmp_path, session, policy=policy)
    with caplog.at_level(logging.WARNING, logger="kakao_tokend.refresher"):
        await manager.refresh(force=True)
    assert manager.status.missed_rotation
    assert "did not rotate" in caplog.text


async def test_a_refresh_token_kakao_accepts_after_a_forward_clock_step_is_not_expired(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A board without a real-time clock refreshes before NTP has set its clock: it runs 70
    days behind, and Kakao's rotation is stamped by that clock (60 days from a moment 70 days
    ago). NTP then steps the clock forward, past the new refresh token's stamped death.
    Kakao still accepts the token (it has 60 days left) and does not rotate it (more than its
    month is left). That refresh proves our expiry wrong: it is re-based from the refresh's
    own time and Kakao's rule (no rotation: at least the rotation window left), marked
    estimated, and said once. No EXPIRED alert, no missed rotation, no negative duration;
    the refresh token's stamped life (and so the window fitted to it) stays what it was."""
    skew = [-70 * 86400.0]  # the daemon's clock minus Kakao's

    def board_clock() -> datetime:
        return emulator.now_datetime() + timedelta(seconds=skew[0])

    config = load_config(write_config(tmp_path, emulator))
    account = config.accounts["default"]
    body = emulator.issue_tokens(refresh_remaining=20 * 86400)  # inside Kakao's month
    tokens = TokenSet.from_token_response(body, requested_at=board_clock())
    AccountStore(account).save(AccountState(account="default", tokens=tokens))
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app, clock=board_clock),
        policy=config.refresh,
        clock=board_clock,
    )
    manager.load()
    await manager.refresh(force=True)  # Kakao rotates, stamped by the clock 70 days behind
    assert manager.state is not None and manager.state.rotations
    stamped = manager.state.tokens
    life = stamped.refresh_expires_at - stamped.refresh_issued_at  # type: ignore[operator]
    skew[0] = 0.0  # NTP steps the clock forward 70 days: the new token "died" 10 days ago
    emulator.advance_clock(3600)
    assert stamped.refresh_remaining(board_clock()) < timedelta(days=-9)
    with caplog.at_level(logging.INFO, logger="kakao_tokend"):
        await manager.refresh(force=True)
        await manager.refresh(force=True)
    now = board_clock()
    tokens = manager.state.tokens
    assert tokens.refresh_token == stamped.refresh_token  # Kakao kept it: no rotation
    assert emulator.stats.rotations == 1
    window = timedelta(seconds=config.refresh.rotation_window)
    # At least the rotation window is left by Kakao's rule, and it is only an estimate.
    assert window - timedelta(hours=1) <= tokens.refresh_remaining(now) <= window
    assert tokens.refresh_expiry_estimated
    assert tokens.refresh_expires_at - tokens.refresh_issued_at == life  # type: ignore[operator]
    stored = manager.store.load()
    assert stored is not None and stored.tokens.refresh_expires_at > now
    assert not manager.status.missed_rotation
    graded = manager.health()
    assert graded.names() == [], [c.message for c in graded.conditions]
    assert graded.level == 0
    assert "inside the rotation window did not rotate" not in caplog.text
    assert "EXPIRED" not in caplog.text
    assert not re.search(r"-\d+(\.\d+)?[dhms]", caplog.text)  # no negative duration
    said = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    assert len(said) == 1, said  # once, not at every refresh
    assert stamped.refresh_fingerprint in said[0] and "estimated" in said[0]


async def test_rotation_is_recorded_with_time_and_fingerprint(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A rotation lands in the state's rotation list and the new token is on disk at once."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 10
    manager = await make_manager(emulator, tmp_path, session)
    await manager.refresh(force=True)
    state = manager.store.load()
    assert state is not None
    assert len(state.rotations) == 1
    assert state.rotations[0].fingerprint == state.tokens.refresh_fingerprint
    assert emulator.refresh_token_status(state.tokens.refresh_token) == "live"
    assert manager.status.counters["rotations"] == 1


async def test_heartbeat_refreshes_after_a_wall_clock_jump(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A simulated suspend (+5 h wall clock, monotonic unchanged) is caught by one heartbeat.

    APScheduler 3.x computes the wait in wall-clock time but sleeps it with loop.call_later,
    i.e. on CLOCK_MONOTONIC, which stops during a suspend; without the heartbeat the refresh
    planned 4.5 h ahead would still be hours away after the jump.
    """
    emulator.settings.access_lifetime = 21599
    start = datetime.now(UTC)
    with time_machine.travel(start, tick=True) as traveller:
        manager = await make_manager(emulator, tmp_path, session)
        manager.policy = replace(manager.policy, heartbeat=0.2)
        scheduler = RefreshScheduler(heartbeat=0.2)
        missed: list[object] = []
        scheduler._scheduler.add_listener(missed.append, EVENT_JOB_MISSED | EVENT_JOB_ERROR)
        scheduler.start()
        scheduler.add(manager)
        try:
            await asyncio.sleep(0.5)
            assert manager.state is not None and manager.state.generation == 1
            traveller.shift(timedelta(hours=5))
            for _ in range(40):
                await asyncio.sleep(0.05)
                if manager.state.generation == 2:
                    break
            assert manager.state.generation == 2
            assert missed == []
        finally:
            scheduler.shutdown()
            await asyncio.sleep(0)


@pytest.mark.parametrize(
    "kind", ["-1", "-7", "-10", "-10_429", "-603", "-9798", "http500", "reset"]
)
async def test_a_transient_kapi_error_at_start_keeps_the_account_serving(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, kind: str
) -> None:
    """access_token_info failing transiently at start is a warning, not a re-login or refresh."""
    manager = await make_manager(emulator, tmp_path, session)
    emulator.inject("access_token_info", kind, count=2)
    requests = emulator.stats.requests["token"]
    await manager.verify()
    assert manager.status.health is Health.OK
    assert emulator.stats.requests["token"] == requests
    assert emulator.stats.faults_fired[kind] >= 1


async def test_a_rejected_access_token_at_start_gets_one_refresh(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """-401 from access_token_info at start: refresh once; a working refresh token heals it."""
    manager = await make_manager(emulator, tmp_path, session)
    emulator.inject("access_token_info", "-401", count=1)
    await manager.verify()
    assert manager.status.health is Health.OK
    assert manager.state is not None and manager.state.generation == 2


async def test_a_revoked_token_is_found_at_start_not_at_expiry(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Tokens revoked while the daemon was down: verify at start ends in a re-login mark."""
    manager = await make_manager(emulator, tmp_path, session)
    emulator.unlink_user(manager.state.user_id or 0)  # type: ignore[union-attr]
    await manager.verify()
    assert manager.status.health is Health.RELOGIN
    assert manager.status.last_error_class == "KOE322"


async def test_an_unreachable_kakao_is_retried_without_ambiguity(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Connection refused is transient and not ambiguous: a later KOE322 is not 'lost'."""
    manager = await make_manager(emulator, tmp_path, session)
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    dead_url = f"http://127.0.0.1:{port}"
    manager.client = KakaoClient(
        session, replace(manager.account.app, auth_url=dead_url, api_url=dead_url)
    )
    await manager.refresh(force=True)
    assert manager.status.health is Health.RETRYING
    assert manager.status.last_error_class in {"connect", "connect-timeout"}
    assert manager._last_failure_ambiguous is False


async def test_only_the_jittered_plan_triggers_a_refresh(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Between 70 % and the planned moment no heartbeat refreshes: the jitter stays spread."""
    manager = await make_manager(emulator, tmp_path, session)
    tokens = manager.state.tokens  # type: ignore[union-attr]
    life = tokens.access_lifetime
    manager._planned_refresh_at = tokens.access_issued_at + life * 0.79
    assert not manager.needs_refresh(tokens.access_issued_at + life * 0.71)
    assert not manager.needs_refresh(tokens.access_issued_at + life * 0.78)
    assert manager.needs_refresh(tokens.access_issued_at + life * 0.79)


async def test_a_clock_stepped_backwards_triggers_a_refresh(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A token 'issued in the future' means the wall clock went back: refresh, don't wait."""
    manager = await make_manager(emulator, tmp_path, session)
    tokens = manager.state.tokens  # type: ignore[union-attr]
    assert not manager.needs_refresh(tokens.access_issued_at + timedelta(seconds=1))
    assert manager.needs_refresh(tokens.access_issued_at - timedelta(hours=1))


async def test_quick_retries_run_on_their_own_jobs_not_the_heartbeat(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A retry planned while the failing job still ran is not dropped by max_instances=1.

    With a 60 s heartbeat, three quick 5xx retries must all run on their own one-shot jobs.
    """
    emulator.settings.access_lifetime = 4
    manager = await make_manager(emulator, tmp_path, session)
    # Retries due at once: each next job is planned for "now" while the failing one still runs.
    manager.policy = replace(manager.policy, retry_initial=1e-6)
    scheduler = RefreshScheduler(heartbeat=60)
    skipped: list[object] = []
    scheduler._scheduler.add_listener(skipped.append, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
    scheduler.start()
    try:
        emulator.inject("token", "http500", count=3)
        scheduler.add(manager)  # first refresh planned ~3 s after issue
        for _ in range(120):
            await asyncio.sleep(0.05)
            if manager.state is not None and manager.state.generation == 2:
                break
        assert manager.state is not None and manager.state.generation == 2
        assert emulator.stats.faults_fired["http500"] == 3
        assert skipped == []
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_an_earlier_expiry_from_kakao_wins_at_start(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Kakao's clock is 50 minutes ahead of ours: verify plans by Kakao's expiry, not ours."""
    emulator.settings.access_lifetime = 3600
    manager = await make_manager(emulator, tmp_path, session)
    ours = manager.state.tokens.access_expires_at  # type: ignore[union-attr]
    assert not manager.needs_refresh(manager.clock())
    emulator.advance_clock(50 * 60)
    await manager.verify()
    assert manager.state is not None
    kakaos = manager.state.tokens.access_expires_at
    assert timedelta(minutes=49) < ours - kakaos < timedelta(minutes=51)
    assert manager.needs_refresh(manager.clock())  # 50 of 60 minutes gone: past 75 %
    stored = manager.store.load()
    assert stored is not None  # the file keeps whole seconds
    assert abs(stored.tokens.access_expires_at - kakaos) < timedelta(seconds=1)
    assert manager.store.read_published()["expires_at"] == format_time(kakaos)  # type: ignore[index]


async def test_a_later_expiry_from_kakao_is_ignored(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Only an earlier expiry is believed: our own (earlier) plan is never pushed back."""
    manager = await make_manager(emulator, tmp_path, session)
    before = manager.state
    await manager.verify()
    assert manager.state is not None and before is not None
    assert manager.state.tokens.access_expires_at == before.tokens.access_expires_at


def test_accounts_never_tried_share_one_set_of_zero_counters_until_their_first_count() -> None:
    """A node serves thousands of accounts other nodes refresh: their counters are one
    shared read-only zero set, and an account's first count gives it its own."""
    tried, untried = AccountStatus(), AccountStatus()
    assert tried.counters is untried.counters
    tried.attempted()
    tried.succeeded(utcnow(), rotated=True)
    assert dict(tried.counters) == {"attempts": 1, "successes": 1, "failures": 0, "rotations": 1}
    assert dict(untried.counters) == {"attempts": 0, "successes": 0, "failures": 0, "rotations": 0}
    assert AccountStatus().counters is untried.counters


async def test_the_grace_for_a_request_in_flight_follows_the_tokens_lifetime(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """How long an on-demand refresh waits for the account's lock, and a stop or a reload
    for a request in flight, is that request's longest wait (how long a request given up on
    stays open for its late answer: 1/8 of the life) and as much again, at most 1 s more:
    30 + 1 s for Kakao's 6-hour token, a share of a 6-second one (it was the configured 31 s,
    five lifetimes), and never past half of the refresh token's remaining life."""
    manager = await default_timeouts_manager(emulator, tmp_path, session, access=6)
    assert manager.request_grace == pytest.approx(2 * 6 / 8, rel=0.05)
    manager.status.went_unanswered()  # the longest wait does not grow with the count
    assert manager.request_grace == pytest.approx(2 * 6 / 8, rel=0.05)
