"""Regression tests for bugs found in the runtime review (one test per fix)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemonproc import login
from kakao_tokend.emulator import KakaoEmulator
from test_api import config_with, serving

pytestmark = pytest.mark.timeout(60)

TOKEN = "/v1/accounts/default/token"


def _no_verify(config: Path) -> None:
    """Turn off the start-up access_token_info check so request counts are exact."""
    config.write_text(
        config.read_text().replace("[refresh]\n", "[refresh]\nverify_on_start = false\n")
    )


async def test_token_requests_do_not_hammer_kakao_during_a_koe237_backoff(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A consumer asking for a fresher token while Kakao rate-limits (KOE237) gets 503 at once.

    The first forced refresh meets KOE237 and the account backs off (>= 60 s); the next
    requests must not each force another token request to Kakao (that is the hammering which
    keeps the rate limit from ever clearing).
    """
    emulator.settings.access_lifetime = 20
    config = config_with(tmp_path, emulator, retry_max="5m")
    _no_verify(config)
    await login(emulator, config)
    async with serving(config) as served:
        emulator.inject("token", "koe237", count=100)
        await asyncio.sleep(2.2)  # now less than 18 s are left
        status, _ = await served.get(TOKEN, params={"min_valid": "18"})
        assert status == 503
        sent = emulator.stats.requests["token"]
        assert emulator.stats.koe237 == 1
        results = await asyncio.gather(
            *(served.get(TOKEN, params={"min_valid": "18"}) for _ in range(10))
        )
        assert [s for s, _ in results] == [503] * 10
        assert all("KOE237" in (body.get("reason") or "") for _, body in results)
        assert emulator.stats.requests["token"] == sent, "token requests during the backoff"
        # A token that is still good enough is served without any refresh.
        status, body = await served.get(TOKEN, params={"min_valid": "1"})
        assert status == 200 and body["access_token"]


async def test_token_requests_do_not_resend_a_dead_refresh_token(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Once Kakao answered KOE322 (re-login needed), token requests never call Kakao again.

    Each would present the same dead refresh token; they get 503 naming the login command.
    """
    emulator.settings.access_lifetime = 20
    config = config_with(tmp_path, emulator)
    _no_verify(config)
    state = await login(emulator, config)
    async with serving(config) as served:
        assert state.user_id is not None
        emulator.revoke_user_tokens(state.user_id)
        await asyncio.sleep(2.2)  # now less than 18 s are left
        status, _ = await served.get(TOKEN, params={"min_valid": "18"})
        assert status == 503
        sent = emulator.stats.requests["token"]
        for _ in range(5):
            status, body = await served.get(TOKEN, params={"min_valid": "18"})
            assert status == 503 and "kakao-tokend login" in body["reason"]
        assert emulator.stats.requests["token"] == sent
