"""Regression tests for bugs found in the runtime review (one test per fix)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemonproc import config_with, login, no_verify_on_start
from kakao_tokend.emulator import KakaoEmulator
from served import serving

pytestmark = pytest.mark.timeout(60)

TOKEN = "/v1/accounts/default/token"


async def test_an_unusable_lock_file_backs_off_instead_of_crashing_the_refresh(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A lock file that cannot be opened (here: a directory) is a retried failure, not a crash.

    Before, StoreError escaped the refresh task: the status stayed "ok", no back-off was
    planned, and the scheduler re-ran the overdue one-shot job in a tight loop.
    """
    from kakao_tokend.config import load_config
    from kakao_tokend.kakao import KakaoClient, create_session
    from kakao_tokend.refresher import AccountManager, Health
    from kakao_tokend.scheduler import RefreshScheduler
    from kakao_tokend.store import AccountStore

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


async def test_stop_waits_for_a_slow_refresh_as_long_as_its_request_may_take(
    emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during a slow refresh waits for Kakao's answer (up to the request timeout).

    Stopping after STOP_GRACE while the request may still be answered closes the session
    under it: a Kakao that already processed the request rotates the refresh token, the
    answer is lost, and the state on disk keeps the retired one (a new login is needed after
    the restart). Here the refresh must complete and be saved before the process ends.
    """
    from kakao_tokend import service
    from kakao_tokend.store import AccountStore

    monkeypatch.setattr(service, "STOP_GRACE", 0.3)
    emulator.settings.access_lifetime = 2
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    config = config_with(tmp_path, emulator, timeout="5s")
    no_verify_on_start(config)
    await login(emulator, config)
    await asyncio.sleep(1.7)  # overdue: the refresh starts at once
    emulator.inject("token", "slow", count=1, delay=1.2)
    async with serving(config):
        pass  # stop right away, with the start-up refresh in flight
    assert emulator.stats.rotations == 1 and emulator.stats.refreshes_ok == 1
    from kakao_tokend.config import load_config

    saved = AccountStore(load_config(config).accounts["default"]).load()
    assert saved is not None and saved.generation == 2
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"
