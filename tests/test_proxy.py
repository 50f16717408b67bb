"""The /kapi proxy through real sockets: token injection, streaming, -401 retry, no open proxy."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from daemonproc import config_with, login, no_verify_on_start
from kakao_tokend.emulator import KakaoEmulator
from served import serving

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback upstream that records what it got and can send a large streamed answer."""
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        seen.append({"path": request.path_qs, "headers": dict(request.headers), "size": size})
        if request.path == "/big":
            count = int(request.query["n"])
            response = web.StreamResponse(headers={"X-Upstream": "yes", "Connection": "close"})
            response.content_length = count
            await response.prepare(request)
            block = bytes(range(256)) * 256
            sent = 0
            while sent < count:
                part = block[: count - sent]
                await response.write(part)
                sent += len(part)
            await response.write_eof()
            return response
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async with loopback_server(handle, client_max_size=64 * 1024 * 1024) as url:
        yield url, seen


@asynccontextmanager
async def loopback_server(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]], **options: Any
) -> AsyncIterator[str]:
    """Serve ``handle`` for every path on 127.0.0.1 (a stand-in for Kakao's API host) while
    the block runs; yield its base URL. ``options`` go to web.Application."""
    app = web.Application(**options)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def with_talk_scope(config: Path) -> None:
    """Ask for talk_message at login so "send to me" works."""
    config.write_text(
        config.read_text().replace("[kakao]\n", '[kakao]\nscopes = ["talk_message"]\n')
    )


def pointing_api_at(config: Path, emulator: KakaoEmulator, url: str) -> None:
    """Send API calls (not OAuth) to ``url``; skip the start-up verify that would go there too."""
    text = config.read_text().replace(f'api_url = "{emulator.url}"', f'api_url = "{url}"')
    config.write_text(text.replace("[refresh]\n", "[refresh]\nverify_on_start = false\n"))


async def test_send_to_me_through_the_proxy(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """A caller with no token at all sends a KakaoTalk memo; the daemon adds the Authorization."""
    config = config_with(tmp_path, emulator)
    with_talk_scope(config)
    state = await login(emulator, config)
    template = {"object_type": "text", "text": "hello from curl", "link": {}}
    async with serving(config) as served:
        status, body = await served.request(
            "POST",
            "/kapi/v2/api/talk/memo/default/send",
            data={"template_object": json.dumps(template)},
        )
        assert (status, body) == (200, {"result_code": 0})
        status, me = await served.get("/kapi/v2/user/me")
        assert status == 200 and me["id"] == state.user_id
    assert [m["text"] for m in emulator.inbox()] == ["hello from curl"]


async def test_retries_once_after_minus_401(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """When Kakao says -401 (token expired on its clock) the proxy refreshes once and retries."""
    config = config_with(tmp_path, emulator)
    first = await login(emulator, config)
    async with serving(config) as served:
        before = emulator.stats.refreshes_ok
        emulator.advance_clock(emulator.settings.access_lifetime + 5)
        assert not emulator.access_token_valid(first.tokens.access_token)
        status, me = await served.get("/kapi/v2/user/me")
        assert status == 200 and me["id"] == first.user_id
        assert emulator.stats.refreshes_ok == before + 1
        # The next call uses the new token directly: no further refresh.
        status, _ = await served.get("/kapi/v2/user/me")
        assert status == 200 and emulator.stats.refreshes_ok == before + 1


async def test_retries_once_after_a_401_that_says_invalid_token_only_in_its_header(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A 401 whose body is a gateway's page, not Kakao's JSON, but whose WWW-Authenticate says
    invalid_token (RFC 6750, as Kakao sends it): the proxy refreshes once and retries with the
    new token, as for a -401 (the daemon's own client reads that header the same way)."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        if len(seen) == 1:
            return web.Response(
                status=401,
                body=b"<html>401 Unauthorized</html>",
                content_type="text/html",
                headers={"WWW-Authenticate": 'Bearer realm="kakao", error="invalid_token"'},
            )
        return web.json_response({"id": 1})

    async with loopback_server(handle) as url:
        config = config_with(tmp_path, emulator)
        await login(emulator, config)
        pointing_api_at(config, emulator, url)
        async with serving(config) as served:
            before = emulator.stats.refreshes_ok
            status, me = await served.get("/kapi/v2/user/me")
            assert (status, me) == (200, {"id": 1})
            assert emulator.stats.refreshes_ok == before + 1
    assert len(seen) == 2 and seen[0] != seen[1]  # retried once, with the refreshed token


async def test_an_expired_token_is_not_sent_to_kakao_while_refreshing_fails(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The access token has expired and Kakao keeps failing the refresh (HTTP 500): the
    proxy does not send the dead token to Kakao for its -401 "already expired", which says
    nothing of why; it answers as the token endpoint does — 503 "no valid token", the reason,
    the account's health and a Retry-After (an outside consumer audit)."""
    emulator.settings.access_lifetime = 2
    config = config_with(tmp_path, emulator)
    no_verify_on_start(config)
    await login(emulator, config)
    async with serving(config) as served:
        emulator.inject("token", "http500", count=10_000)
        await asyncio.sleep(2.3)  # expired; every refresh since has failed
        calls = emulator.stats.requests["user_me"]
        async with served.client() as session, session.get("/kapi/v2/user/me") as resp:
            status, body = resp.status, await resp.json(content_type=None)
            retry_after = resp.headers.get("Retry-After")
        assert status == 503, body
        assert "no valid token" in body["error"] and body["health"] == "retrying", body
        assert retry_after is not None and retry_after.isdigit(), retry_after
        assert emulator.stats.requests["user_me"] == calls  # nothing dead sent to Kakao


async def test_minus_401_is_passed_back_when_the_refresh_cannot_help(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """If the refresh fails too (grant revoked), the caller gets Kakao's -401 once, not a loop."""
    config = config_with(tmp_path, emulator)
    state = await login(emulator, config)
    async with serving(config) as served:
        assert state.user_id is not None
        emulator.revoke_user_tokens(state.user_id)
        calls = emulator.stats.requests["user_me"]
        status, body = await served.get("/kapi/v2/user/me")
        assert status == 401 and body["code"] == -401
        assert emulator.stats.requests["user_me"] == calls + 1


async def test_a_minus_401_about_the_app_never_refreshes_the_token(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Kakao's -401 "ip mismatched!" (the app allows other IPs) or "appKey ... deactivated"
    is about the app, not the token: it is passed back at once, with no refresh and no retry.

    The proxy used to refresh on every such request: each consumer call cost one of Kakao's
    token requests (20 per 10 minutes, then KOE237), rewrote the files and ran the hooks.
    """
    config = config_with(tmp_path, emulator)
    no_verify_on_start(config)
    await login(emulator, config)
    async with serving(config) as served:
        refreshes = emulator.stats.requests["token"]
        calls = emulator.stats.requests["user_me"]
        emulator.settings.allowed_ips = ["10.9.9.9"]
        for _ in range(5):
            status, body = await served.get("/kapi/v2/user/me")
            assert status == 401 and body["code"] == -401 and "ip mismatched" in body["msg"]
        emulator.settings.allowed_ips = None
        emulator.settings.deactivated = True
        status, body = await served.get("/kapi/v2/user/me")
        assert status == 401 and "deactivated" in body["msg"]
        assert emulator.stats.requests["user_me"] == calls + 6, "retried"
        assert emulator.stats.requests["token"] == refreshes, "refreshed for a -401 of the app"
        assert not served.events_of("refreshed")


@asynccontextmanager
async def rejecting_upstream() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback API server that answers every call -401 "this access token does not exist"
    (Kakao's answer for an unknown token), whatever the token; yields its URL and the
    Authorization headers it got."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response(
            {"code": -401, "msg": "this access token does not exist"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="kakao", error="invalid_token"'},
        )

    async with loopback_server(handle) as url:
        yield url, seen


async def test_a_new_token_rejected_too_is_not_refreshed_again_until_it_has_aged(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """When the retry with a brand-new token gets -401 as well, refreshing cannot help now:
    later -401s are passed back without a refresh until that token has lived a share of its
    lifetime, and then one refresh and retry is tried again.

    The proxy used to refresh on every request while Kakao kept answering -401, burning
    Kakao's token rate limit for nothing.
    """
    emulator.settings.access_lifetime = 8
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with rejecting_upstream() as (url, seen):
        pointing_api_at(config, emulator, url)
        async with serving(config) as served:
            refreshes = emulator.stats.refreshes_ok
            status, body = await served.get("/kapi/v2/user/me")
            assert status == 401 and body["code"] == -401
            assert emulator.stats.refreshes_ok == refreshes + 1
            assert len(seen) == 2 and seen[0] != seen[1]  # refreshed and retried once
            for _ in range(5):
                status, _ = await served.get("/kapi/v2/user/me")
                assert status == 401
            assert emulator.stats.refreshes_ok == refreshes + 1, "refreshed for a new token"
            assert len(seen) == 7 and set(seen[1:]) == {seen[1]}  # no retries either
            # The rule is a share of the lifetime (an eighth: 1 s of an 8 s token), well
            # before the scheduled refresh at 75 %.
            await asyncio.sleep(1.5)
            status, _ = await served.get("/kapi/v2/user/me")
            assert status == 401
            assert emulator.stats.refreshes_ok == refreshes + 2
            assert len(seen) == 9 and seen[8] not in seen[:8]


async def test_streams_large_bodies_and_never_leaks_client_headers(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A 3 MiB upload and a 5 MiB download pass intact; the client's Authorization, the account
    header and hop-by-hop headers never reach Kakao, the daemon's bearer token does."""
    config = config_with(tmp_path, emulator, "[accounts.default]\n[accounts.other]\n")
    async with echo_server() as (url, seen):
        default = await login(emulator, config, "default")
        other = await login(emulator, config, "other")
        pointing_api_at(config, emulator, url)
        payload = os.urandom(3 * 1024 * 1024)
        async with serving(config) as served, served.client() as http:
            headers = {
                "Authorization": "Bearer client-secret-token",
                "X-Kakao-Account": "other",
                "Connection": "keep-alive, X-Private",
                "X-Private": "hop",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "X-Custom": "kept",
            }
            upload = io.BytesIO(payload)
            async with http.post("/kapi/v1/upload?x=1", data=upload, headers=headers) as resp:
                assert resp.status == 200
                answer = await resp.json()
            assert answer == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
            got = {k.lower(): v for k, v in seen[-1]["headers"].items()}
            assert seen[-1]["path"] == "/v1/upload?x=1"
            assert got["authorization"] == f"Bearer {other.tokens.access_token}"
            assert "x-kakao-account" not in got and "x-private" not in got
            assert "proxy-authorization" not in got
            assert got["x-custom"] == "kept"
            async with http.get("/kapi/big", params={"n": str(5 * 1024 * 1024)}) as resp:
                assert resp.status == 200 and resp.headers["X-Upstream"] == "yes"
                received = 0
                async for chunk in resp.content.iter_chunked(65536):
                    received += len(chunk)
            assert received == 5 * 1024 * 1024
            # No X-Kakao-Account: the default account's token.
            assert seen[-1]["headers"]["Authorization"] == f"Bearer {default.tokens.access_token}"


async def test_x_kakao_account_default_names_the_account_called_default(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """With accounts "second" (the default_account) and "default", `X-Kakao-Account: default`
    sends the token of the account called "default", and no header sends default_account's.

    The proxy used to read `default` as the alias of default_account even when an account
    had that name: the request went to Kakao with the other account's token.
    """
    config = config_with(tmp_path, emulator, accounts=("second", "default"))
    async with echo_server() as (url, seen):
        second = await login(emulator, config, "second")
        named_default = await login(emulator, config, "default")
        pointing_api_at(config, emulator, url)
        async with serving(config) as served:
            status, _ = await served.get("/kapi/v2/user/me", headers={"X-Kakao-Account": "default"})
            assert status == 200
            assert seen[-1]["headers"]["Authorization"] == (
                f"Bearer {named_default.tokens.access_token}"
            )
            status, _ = await served.get("/kapi/v2/user/me")
            assert status == 200
            assert seen[-1]["headers"]["Authorization"] == f"Bearer {second.tokens.access_token}"


async def test_an_answer_that_breaks_off_midway_ends_the_callers_connection(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """When Kakao's answer breaks off after its head and part of its body went out to the
    caller, the caller's connection is closed: it sees the answer cut short, never a second
    answer (a JSON 500) inside the first one's body, and never waits for bytes that will not
    come."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Upstream": "yes"})
        response.content_length = 1_000_000
        await response.prepare(request)
        await response.write(b"x" * 100_000)
        assert request.transport is not None
        request.transport.close()
        return response

    async with loopback_server(handle) as url:
        config = config_with(tmp_path, emulator)
        await login(emulator, config)
        pointing_api_at(config, emulator, url)
        async with serving(config) as served:
            reader, writer = await asyncio.open_unix_connection(str(served.socket))
            try:
                writer.write(b"GET /kapi/big HTTP/1.1\r\nHost: tokend\r\n\r\n")
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"X-Upstream: yes" in head
    assert 0 < len(body) < 1_000_000
    assert b"HTTP/1.1" not in body and b"error" not in body


async def raw_request(socket_path: Path, request_line: str) -> tuple[int, bytes]:
    """Send one hand-written HTTP/1.1 request (no client-side path normalisation)."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        writer.write(f"{request_line}\r\nHost: tokend\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_no_open_proxy(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """Only /kapi/<path> on the configured api_url is reachable: no host, no dot-dot, no bypass."""
    config = config_with(tmp_path, emulator)
    no_verify_on_start(config)  # the start's own check would race the snapshot below
    await login(emulator, config)
    async with serving(config) as served:
        before = dict(emulator.stats.requests)
        for line in (
            "GET /kapi/v2/%2e%2e/%2E%2E/oauth/token HTTP/1.1",
            "GET /kapi/./v2/user/me HTTP/1.1",
        ):
            status, body = await raw_request(served.socket, line)
            assert status == 400, line
            assert "path" in json.loads(body)["error"]
        assert dict(emulator.stats.requests) == before
        # Another host in the path or in absolute form is just a path on the configured server.
        for line in (
            "GET /kapi//127.0.0.2:1/v2/user/me HTTP/1.1",
            "GET http://127.0.0.2:1/kapi/v2/user/me HTTP/1.1",
        ):
            status, _ = await raw_request(served.socket, line)
            assert status in (200, 404), line
        status, body = await served.get("/kapi/v2/user/me", headers={"X-Kakao-Account": "nope"})
        assert status == 404 and "nope" in body["error"]
        status, body = await served.get("/v2/user/me")
        assert status == 404 and body["error"]


async def test_proxy_body_limit(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """A proxied body over api.max_body gets 413 JSON before anything is sent to Kakao."""
    config = config_with(tmp_path, emulator, '[api]\nmax_body = "64k"\nproxy_retry_body = "16k"\n')
    await login(emulator, config)
    async with serving(config) as served:
        # What the request could cause at Kakao: the send itself, or a refresh for it. (The
        # daemon's own start-up check of the token, access_token_info, may land meanwhile.)
        caused = ("memo", "token")
        before = [emulator.stats.requests[endpoint] for endpoint in caused]
        status, body = await served.request(
            "POST", "/kapi/v2/api/talk/memo/default/send", data=b"x" * 100_000
        )
        assert status == 413 and "max_body" in body["error"]
        assert [emulator.stats.requests[endpoint] for endpoint in caused] == before


async def test_unreachable_upstream_is_502(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """When Kakao cannot be reached the caller gets 502 with a reason, not a hang."""
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    pointing_api_at(config, emulator, "http://127.0.0.1:9")
    async with serving(config) as served:
        status, body = await served.get("/kapi/v2/user/me")
        assert status == 502 and "127.0.0.1" in body["error"]


async def test_chunked_body_over_the_limit_is_cut_off(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A chunked upload (no Content-Length) that grows past api.max_body is refused with 413."""
    config = config_with(tmp_path, emulator, '[api]\nmax_body = "64k"\nproxy_retry_body = "16k"\n')
    await login(emulator, config)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 10_000

    path = "/kapi/v2/api/talk/memo/default/send"
    async with (
        serving(config) as served,
        served.client() as http,
        http.post(path, data=chunks()) as resp,
    ):
        assert resp.status == 413
        assert "max_body" in (await resp.json())["error"]


async def test_a_caller_hanging_up_mid_body_is_not_logged_as_a_bug(
    emulator: KakaoEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that announces a body, sends part of it and hangs up is the caller's doing:
    the daemon notes it quietly and asks nobody to report a bug, and keeps serving."""
    caplog.set_level(logging.INFO, logger="kakao_tokend")
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        _reader, writer = await asyncio.open_unix_connection(str(served.socket))
        writer.write(
            b"POST /kapi/v2/api/talk/memo/default/send HTTP/1.1\r\nHost: tokend\r\n"
            b"Content-Length: 5000\r\n\r\n" + b"t" * 100
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the proxy is now reading the body
        writer.transport.abort()
        for _ in range(50):  # until the daemon has seen the hang-up (bounded)
            await asyncio.sleep(0.05)
            if any(
                "ConnectionReset" in r.getMessage() or "hung up" in r.getMessage()
                for r in caplog.records
            ):
                break
        status, _ = await served.get("/healthz")
        assert status in (200, 503)
    bugs = [r for r in caplog.records if "a bug" in r.getMessage()]
    assert not bugs, [r.getMessage() for r in bugs]
    assert any("hung up" in r.getMessage() for r in caplog.records)
