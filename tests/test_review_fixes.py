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
