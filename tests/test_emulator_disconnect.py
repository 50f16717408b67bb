"""The emulator stays quiet when a client gives up on a slow answer (a killed daemon)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from kakao_tokend.emulator import KakaoEmulator


async def test_a_client_that_hangs_up_during_a_slow_fault_is_no_server_error(
    emulator: KakaoEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon killed (or timed out) while a `slow` fault holds its refresh logs no traceback.

    The soak kills the daemon in the middle of slow answers; aiohttp then logged "Error handling
    request" with a ConnectionResetError traceback for every one, burying real errors. The
    emulator still answers the next request normally.
    """
    emulator.inject("token", "slow", delay=0.3)
    caplog.set_level(logging.DEBUG)
    timeout = aiohttp.ClientTimeout(total=0.1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # The body is sent in a second chunk the server reads only after the fault's delay.
        async def body() -> object:
            yield b"grant_type=refresh_token"
            await asyncio.sleep(0.2)
            yield b"&refresh_token=x"

        with pytest.raises(asyncio.TimeoutError):
            await session.post(
                emulator.url + "/oauth/token",
                data=body(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
    await asyncio.sleep(0.5)  # the fault's delay ends; the emulator reads from a closed socket
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    async with (
        aiohttp.ClientSession() as session,
        session.post(emulator.url + "/oauth/token", data={"grant_type": "refresh_token"}) as resp,
    ):
        assert resp.status == 401  # answered normally: Kakao's KOE010 body, not a crash
