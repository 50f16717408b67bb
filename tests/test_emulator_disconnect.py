"""The emulator and clients that go away: quiet hang-ups, held requests processed anyway."""

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


async def test_a_held_request_is_processed_on_release_even_when_its_client_is_gone(
    emulator: KakaoEmulator,
) -> None:
    """`hold` keeps an arrived refresh until release_held(); Kakao then rotates for a dead client.

    This is the order the fleet's kill -9 test needs (Kakao answers the killed node's request
    only after the survivor refreshed): the request has arrived, so its client's death does not
    stop Kakao from processing it.
    """
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # every refresh rotates
    refresh_token = emulator.issue_tokens()["refresh_token"]
    emulator.inject("token", "hold", delay=30.0)
    form = {
        "grant_type": "refresh_token",
        "client_id": emulator.settings.client_id,
        "refresh_token": refresh_token,
    }
    if emulator.settings.client_secret is not None:
        form["client_secret"] = emulator.settings.client_secret
    session = aiohttp.ClientSession()
    request = asyncio.create_task(session.post(emulator.url + "/oauth/token", data=form))
    for _ in range(100):
        if emulator.held_requests:
            break
        await asyncio.sleep(0.02)
    assert emulator.held_requests == 1
    assert emulator.stats.refreshes_ok == 0
    request.cancel()
    await session.close()  # the client is gone before Kakao answers
    await asyncio.sleep(0.1)
    assert emulator.refresh_token_status(refresh_token) == "live"  # nothing happened yet
    emulator.release_held()
    for _ in range(100):
        if not emulator.held_requests:
            break
        await asyncio.sleep(0.02)
    assert emulator.held_requests == 0
    assert emulator.stats.refreshes_ok == 1
    assert emulator.refresh_token_status(refresh_token) == "retired"


async def test_release_over_the_control_api_answers_a_held_request(
    emulator: KakaoEmulator,
) -> None:
    """POST /_emulator/faults/release lets a held request through and says how many were held."""
    emulator.inject("user_me", "hold", delay=30.0)
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(session.get(emulator.url + "/v2/user/me"))
        for _ in range(100):
            if emulator.held_requests:
                break
            await asyncio.sleep(0.02)
        assert not held.done()
        async with session.post(emulator.url + "/_emulator/faults/release") as resp:
            assert await resp.json() == {"released": 1}
        response = await asyncio.wait_for(held, 5)
        assert response.status == 401  # answered by kapi itself: no token given
        response.release()
