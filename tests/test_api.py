"""The local API through real sockets: auth, socket mode, token endpoint, health, reload, CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from daemonproc import (
    config_with,
    free_port,
    issued_tokens,
    login,
    no_verify_on_start,
    run_cli,
)
from kakao_tokend.api import guard
from kakao_tokend.config import load_config
from kakao_tokend.daemon import DAEMON, Daemon
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.tokens import MAX_LIFETIME
from served import serving

pytestmark = pytest.mark.timeout(60)

TOKEN = "/v1/accounts/default/token"


def bearer_file(tmp_path: Path, token: str = "s3cret-bearer-token-0123456789") -> Path:
    """Write a mode-600 bearer token file."""
    path = tmp_path / "api_token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


async def test_socket_mode_is_as_configured(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """The Unix socket gets the configured mode (0600 here), and the default is 0660."""
    config = config_with(tmp_path, emulator, '[api]\nsocket_mode = "0600"\n')
    await login(emulator, config)
    async with serving(config) as served:
        assert stat.S_IMODE(served.socket.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(served.socket.stat().st_mode)
    other = tmp_path / "other"
    other.mkdir()
    config = config_with(other, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        assert stat.S_IMODE(served.socket.stat().st_mode) == 0o660


async def test_tcp_requires_the_bearer_token(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """On TCP a missing or wrong bearer gets 401 JSON; the right one works; /healthz is open."""
    port = free_port()
    token_file = bearer_file(tmp_path)
    config = config_with(
        tmp_path, emulator, f'[api]\ntcp = "127.0.0.1:{port}"\nbearer_token_file = "{token_file}"\n'
    )
    await login(emulator, config)
    async with serving(config), aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
            {"Authorization": "Basic s3cret-bearer-token-0123456789"},
        ):
            async with http.get("/v1/status", headers=headers) as resp:
                assert resp.status == 401
                assert "bearer" in (await resp.json())["error"]
        good = {"Authorization": "Bearer s3cret-bearer-token-0123456789"}
        async with http.get("/v1/status", headers=good) as resp:
            assert resp.status == 200
            assert (await resp.json())["accounts"][0]["account"] == "default"
        async with http.get("/v1/accounts/default/token", headers={}) as resp:
            assert resp.status == 401
        async with http.get("/healthz") as resp:
            assert resp.status == 200


async def test_min_valid_forces_one_refresh_for_many_callers(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A token older than min_valid allows is refreshed first; 20 concurrent callers cause one.

    The emulator counts refreshes; every caller gets the same new token valid long enough.
    """
    # 20 s tokens asked to be valid 16 s more, 4 s after they were issued: the old one has
    # less left, so it must be refreshed, and the new one keeps 4 s of slack for the refresh
    # and the 20 answers (a 10 s token asked for 9 s had 1 s, and a loaded machine took more:
    # a caller got a refusal). The scheduled refresh comes only at 70-80 % of the life.
    emulator.settings.access_lifetime = 20
    config = config_with(tmp_path, emulator)
    text = config.read_text().replace("[refresh]\n", "[refresh]\nverify_on_start = false\n")
    config.write_text(text)
    first = await login(emulator, config)
    async with serving(config) as served:
        status, body = await served.get("/v1/accounts/default/token", params={"min_valid": "5"})
        assert status == 200 and body["access_token"] == first.tokens.access_token
        await asyncio.sleep(4.0)  # now less than 16 s are left
        before = emulator.stats.refreshes_ok
        path = "/v1/accounts/default/token"
        results = await asyncio.gather(
            *(served.get(path, params={"min_valid": "16"}) for _ in range(20))
        )
        assert emulator.stats.refreshes_ok == before + 1
        assert [status for status, _ in results] == [200] * 20, [b.get("error") for _, b in results]
        tokens = {body["access_token"] for _, body in results}
        assert len(tokens) == 1 and first.tokens.access_token not in tokens
        assert all(body["expires_in"] >= 16 for _, body in results)
        assert emulator.access_token_valid(tokens.pop())
        status, body = await served.get("/v1/accounts/default/token", params={"min_valid": "1h"})
        assert status == 400 and "lifetime" in body["error"]
        status, body = await served.get("/v1/accounts/default/token", params={"min_valid": "x"})
        assert status == 400 and "duration" in body["error"]


async def test_a_min_valid_refused_as_too_long_is_told_the_real_limit(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """min_valid must stay below 95 % of the token's lifetime (a fresh token must be able to
    satisfy it); the 400 says that limit, not the lifetime, and just below it is served.

    For a 60 s token the answer to min_valid=57 used to say "below the token lifetime
    (60s)", which 57 is.
    """
    emulator.settings.access_lifetime = 60
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        for min_valid in ("57", "59", "1h"):
            status, body = await served.get(TOKEN, params={"min_valid": min_valid})
            assert status == 400, body
            assert "below 57s" in body["error"], body["error"]
            assert "95 %" in body["error"] and "60s lifetime" in body["error"]
        status, body = await served.get(TOKEN, params={"min_valid": "56.9"})
        assert status == 200 and body["expires_in"] >= 56


async def test_a_503_while_refreshing_fails_says_when_to_ask_again(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The token endpoint cannot meet min_valid because Kakao fails (HTTP 500): its 503 has a
    Retry-After (whole seconds, at least 1) up to the account's next attempt, so a client
    waits as long as the daemon does instead of asking again at once."""
    emulator.settings.access_lifetime = 20
    config = config_with(tmp_path, emulator, retry_initial="3s", retry_max="3s")
    no_verify_on_start(config)
    await login(emulator, config)
    async with serving(config) as served:
        emulator.inject("token", "http500", count=100)
        await asyncio.sleep(1.2)  # now less than 18.9 s are left
        async with (
            served.client() as session,
            session.get(TOKEN, params={"min_valid": "18.9"}) as resp,
        ):
            assert resp.status == 503, await resp.text()
            retry_after = resp.headers.get("Retry-After")
        assert retry_after is not None and retry_after.isdigit(), retry_after
        assert 1 <= int(retry_after) <= 4, retry_after


async def test_token_requests_do_not_hammer_kakao_during_a_koe237_backoff(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A consumer asking for a fresher token while Kakao rate-limits (KOE237) gets 503 at once.

    The first forced refresh meets KOE237 and the account backs off; the next requests must
    not each force another token request to Kakao (that is the hammering which keeps the rate
    limit from ever clearing). The back-off is a share of the token's life: a 20 s token's
    retry came 0.8 s later, within the ten requests on a loaded machine (CI), and counted as
    theirs; a 120 s token's comes seconds later. (``min_valid`` must stay below 95 % of the
    lifetime, so the token must first lose more than 5 % of its life.)
    """
    emulator.settings.access_lifetime = 120
    config = config_with(tmp_path, emulator, retry_max="5m")
    no_verify_on_start(config)
    await login(emulator, config)
    async with serving(config) as served:
        emulator.inject("token", "koe237", count=100)
        await asyncio.sleep(7.0)  # now less than 113.9 s are left
        status, _ = await served.get(TOKEN, params={"min_valid": "113.9"})
        assert status == 503
        sent = emulator.stats.requests["token"]
        assert emulator.stats.koe237 == 1
        results = await asyncio.gather(
            *(served.get(TOKEN, params={"min_valid": "113.9"}) for _ in range(10))
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
    no_verify_on_start(config)
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
            assert status == 503 and f"kakao-tokend --config {config} login" in body["reason"]
        assert emulator.stats.requests["token"] == sent


async def test_an_account_named_default_is_served_even_when_another_is_the_default(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`default` in a path names the account called "default" when there is one; it is an
    alias of default_account only when no account has that name.

    With accounts "second" (the default_account) and "default", the token, refresh and reread
    endpoints for `default` used to act on "second": a consumer asking for one account's
    token got the other's.
    """
    config = config_with(tmp_path, emulator, accounts=("second", "default"))
    await login(emulator, config, "second")
    named_default = await login(emulator, config, "default")
    async with serving(config) as served:
        assert served.config.default_account == "second"
        status, body = await served.get(TOKEN)
        assert status == 200
        assert body["account"] == "default"
        assert body["access_token"] == named_default.tokens.access_token
        status, body = await served.request("POST", "/v1/accounts/default/reread")
        assert status == 200 and body["account"] == "default"
        status, body = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 200 and body["account"] == "default" and body["refreshed"]
    # Without an account of that name, `default` still means default_account.
    other = tmp_path / "alias"
    other.mkdir()
    config = config_with(other, emulator, accounts=("second", "third"))
    second = await login(emulator, config, "second")
    async with serving(config) as served:
        status, body = await served.get(TOKEN)
        assert status == 200 and body["account"] == "second"
        assert body["access_token"] == second.tokens.access_token


async def test_a_token_kakao_revoked_is_never_handed_out(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Once the daemon knows Kakao revoked the tokens (the refresh token was refused and
    access_token_info rejected the access token too), the token endpoint answers 503 with
    the reason and the login command, even for min_valid=0, instead of the dead token.

    It used to check the account's state only when the token had less than min_valid left,
    so a consumer asking for any token got one /healthz already called dead.
    """
    config = config_with(tmp_path, emulator)
    no_verify_on_start(config)
    state = await login(emulator, config)
    async with serving(config) as served:
        assert state.user_id is not None
        emulator.revoke_user_tokens(state.user_id)
        status, body = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 502 and body["health"] == "relogin"
        for min_valid in ("0", "60"):
            status, body = await served.get(TOKEN, params={"min_valid": min_valid})
            assert status == 503, body
            assert "access_token" not in body
            assert "revoked" in body["reason"]
            assert f"kakao-tokend --config {config} login" in body["reason"]


async def test_an_access_token_kakao_still_accepts_is_served_after_the_refresh_token_died(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """When only the refresh token was refused (another program rotated it away) and Kakao
    still accepts the access token, a new login is needed, yet the access token is served
    until it expires: it works, and refusing it would stop the consumers early for nothing."""
    emulator.settings.refresh_lifetime = 3600
    emulator.settings.rotation_window = 7200  # every refresh rotates the refresh token
    config = config_with(tmp_path, emulator)
    no_verify_on_start(config)
    state = await login(emulator, config)
    session = create_session()
    try:  # the other program, with a copy of the refresh token
        await KakaoClient(session, load_config(config).accounts["default"].app).refresh(
            state.tokens
        )
    finally:
        await session.close()
    async with serving(config) as served:
        status, body = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 502 and body["health"] == "relogin"
        _, described = await served.get("/v1/status")
        assert "unknown reason" in described["accounts"][0]["last_error"]
        status, body = await served.get(TOKEN, params={"min_valid": "0"})
        assert status == 200, body
        assert body["access_token"] == state.tokens.access_token
        assert emulator.access_token_valid(body["access_token"])


async def test_a_refused_token_request_says_what_was_asked_for_every_min_valid(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A new login is needed and the access token has expired: the 503 says "no valid token"
    when nothing more was asked (min_valid=0; it used to say "valid for 0s"), and the
    duration as asked otherwise (0.5 s used to read "0s")."""
    emulator.settings.access_lifetime = 3
    emulator.settings.refresh_lifetime = 3600
    emulator.settings.rotation_window = 7200  # every refresh rotates the refresh token
    config = config_with(tmp_path, emulator)
    no_verify_on_start(config)
    state = await login(emulator, config)
    session = create_session()
    try:  # another program rotates the refresh token away: the daemon's copy is dead
        await KakaoClient(session, load_config(config).accounts["default"].app).refresh(
            state.tokens
        )
    finally:
        await session.close()
    async with serving(config) as served:
        await served.request("POST", "/v1/accounts/default/refresh")
        await asyncio.sleep(3.2)  # the access token has expired
        expected = {
            "0": "no valid token is available for default",
            "0.5": "no token valid for at least 0.5s is available for default",
            "1.25": "no token valid for at least 1.25s is available for default",
        }
        for min_valid, error in expected.items():
            status, body = await served.get(TOKEN, params={"min_valid": min_valid})
            assert status == 503 and body["health"] == "relogin", body
            assert body["error"] == error


async def test_errors_are_json(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """Unknown account → 404, unknown path → 404, too large body → 413, all JSON with error."""
    config = config_with(tmp_path, emulator, '[api]\nmax_body = "1k"\nproxy_retry_body = "1k"\n')
    await login(emulator, config)
    async with serving(config) as served:
        status, body = await served.get("/v1/accounts/nobody/token")
        assert status == 404 and "nobody" in body["error"] and "default" in body["error"]
        status, body = await served.get("/etc/passwd")
        assert status == 404 and body["error"]
        status, body = await served.request("POST", "/v1/reload", data=b"x" * 5000)
        assert status == 413 and "max_body" in body["error"]
        status, body = await served.request("DELETE", "/v1/status")
        assert status == 405 and body["error"]


async def test_a_405_says_which_methods_are_allowed(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A method the route does not take gets 405 JSON with the `Allow` header RFC 9110
    requires (15.5.6); the guard used to rebuild the answer and drop it."""
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served, served.client() as http:
        for method, path, allowed in (
            ("POST", TOKEN, {"GET", "HEAD"}),
            ("DELETE", TOKEN, {"GET", "HEAD"}),
            ("GET", "/v1/reload", {"POST"}),
        ):
            async with http.request(method, path) as resp:
                assert resp.status == 405
                assert resp.content_type == "application/json"
                assert (await resp.json())["error"]
                assert {m.strip() for m in resp.headers["Allow"].split(",")} == allowed


async def test_status_refuses_thresholds_longer_than_any_token_lives(
    emulator: KakaoEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`?warn=` and `?crit=` above the longest lifetime a token may have (tokens.MAX_LIFETIME,
    ten years) get 400 JSON naming the limit; up to it they grade as usual.

    warn=1e15 used to overflow the date arithmetic of the grading: HTTP 500 with a plain-text
    body, and a traceback in the log.
    """
    caplog.set_level(logging.ERROR)
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        for query in (
            {"warn": "1e15"},
            {"crit": "1e15"},
            {"warn": "999999999999d"},
            {"crit": f"{MAX_LIFETIME + 1}"},
        ):
            status, body = await served.get("/v1/status", params=query)
            assert status == 400, query
            assert "at most 3660d" in body["error"]
        status, body = await served.get(
            "/v1/status", params={"warn": f"{MAX_LIFETIME}", "crit": f"{MAX_LIFETIME}"}
        )
        assert status == 200
        assert body["accounts"][0]["level"] == "critical"  # less than ten years left
    assert not caplog.records


async def test_an_unexpected_error_is_a_json_500_logged_once_without_a_token(
    emulator: KakaoEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that fails in a way nobody foresaw answers 500 with a JSON error (not
    aiohttp's plain text), and the log has one record of it — where it failed, never the
    exception's text, which may hold anything (here the account's access token)."""
    caplog.set_level(logging.DEBUG)
    config = config_with(tmp_path, emulator)
    state = await login(emulator, config)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(f"cannot handle {state.tokens.access_token}")

    app = web.Application()
    app[DAEMON] = Daemon(config=load_config(config))
    app.middlewares.append(guard)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    socket_path = tmp_path / "broken.sock"
    await web.UnixSite(runner, str(socket_path)).start()
    try:
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get("http://tokend/broken") as resp,
        ):
            assert resp.status == 500
            assert resp.content_type == "application/json"
            assert "RuntimeError" in (await resp.json())["error"]
    finally:
        await runner.cleanup()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert failures[0].name == "kakao_tokend.api"
    assert "RuntimeError" in caplog.text and "in broken" in caplog.text
    assert state.tokens.access_token not in caplog.text


async def test_healthz_turns_503_when_a_login_is_needed(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """/healthz is 200 with a valid token, and 503 naming the account once Kakao kills it."""
    config = config_with(tmp_path, emulator)
    state = await login(emulator, config)
    async with serving(config) as served:
        status, body = await served.get("/healthz")
        assert (status, body) == (200, {"ok": True})
        assert state.user_id is not None
        emulator.revoke_user_tokens(state.user_id)
        status, body = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 502 and body["health"] == "relogin"
        status, body = await served.get("/healthz")
        assert status == 503
        assert f"kakao-tokend --config {config} login" in body["problems"]["default"]


async def test_healthz_over_tcp_without_the_bearer_names_no_account(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """/healthz stays open on TCP for load balancers, but without the bearer token it says only
    how many accounts fail: their names, the config path and the fix are for the Unix socket or
    a caller with the bearer token."""
    port = free_port()
    token_file = bearer_file(tmp_path)
    config = config_with(
        tmp_path, emulator, f'[api]\ntcp = "127.0.0.1:{port}"\nbearer_token_file = "{token_file}"\n'
    )
    state = await login(emulator, config)
    async with serving(config) as served, aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        assert state.user_id is not None
        emulator.revoke_user_tokens(state.user_id)
        status, _ = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 502
        async with http.get("/healthz") as resp:
            assert resp.status == 503
            text = await resp.text()
        assert json.loads(text)["ok"] is False and json.loads(text)["failing"] == 1
        assert "default" not in text and str(config) not in text and "login" not in text
        good = {"Authorization": "Bearer s3cret-bearer-token-0123456789"}
        async with http.get("/healthz", headers=good) as resp:
            assert resp.status == 503
            assert "login" in (await resp.json())["problems"]["default"]
        status, body = await served.get("/healthz")
        assert status == 503 and "login" in body["problems"]["default"]


async def test_a_refresh_asked_over_the_api_answers_with_kakaos_late_answer(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """POST /v1/accounts/NAME/refresh while Kakao rotates at once but answers after the
    request's wait (10-second tokens: 0.475 s; the answer after 1 s): the daemon keeps the
    late answer, and the caller is told so (200, refreshed and rotated), not the first
    attempt's timeout (a 502 for a refresh that then succeeded: `kakao-tokend refresh`
    through the daemon exited 69)."""
    emulator.settings.access_lifetime = 10
    emulator.settings.refresh_lifetime = 3600
    emulator.settings.rotation_window = 100_000.0  # every refresh rotates
    config = config_with(tmp_path, emulator, timeout="30s", connect_timeout="10s")
    await login(emulator, config)
    async with serving(config) as served:
        emulator.inject("token", "late", count=1, delay=1.0)
        status, body = await served.request("POST", "/v1/accounts/default/refresh")
    assert status == 200, body
    assert body["refreshed"] is True and body["rotated"] is True


async def test_reload_answers_after_applying(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """POST /v1/reload returns once the new account set is in effect; a bad config is refused."""
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        config.write_text(config.read_text() + "[accounts.default]\n[accounts.extra]\n")
        status, body = await served.request("POST", "/v1/reload")
        assert status == 200 and body["ok"] and "added extra" in body["message"]
        status, body = await served.get("/v1/status")
        assert [a["account"] for a in body["accounts"]] == ["default", "extra"]
        config.write_text(config.read_text() + "bogus_key = 1\n")
        status, body = await served.request("POST", "/v1/reload")
        assert status == 400 and not body["ok"] and "bogus_key" in body["message"]


async def test_logs_never_show_tokens_or_query_strings(
    emulator: KakaoEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request is logged (path only, at debug); no token or query string ever appears."""
    caplog.set_level(logging.DEBUG)
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        await served.get("/v1/accounts/default/token", params={"min_valid": "60"})
        await served.request("POST", "/v1/accounts/default/refresh")
        await served.text("/metrics")
    text = caplog.text
    assert "api GET /v1/accounts/default/token" in text
    assert "min_valid" not in text.split("api GET /v1/accounts/default/token")[1][:20]
    assert not [t for t in issued_tokens(emulator) if t in text]


async def raw_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """Send one hand-written GET for ``path`` exactly as given; return the answer's status."""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: tokend\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(data.split()[1])


async def test_a_request_path_cannot_forge_a_log_line(
    emulator: KakaoEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A percent-encoded line break or NUL in the path is logged escaped, on the request's own
    line: neither a caller on the socket nor an unauthenticated one on TCP can write a line
    of their own into the daemon's log.

    The debug line used to show the decoded path, before the bearer token was checked.
    """
    caplog.set_level(logging.DEBUG, logger="kakao_tokend.api")
    port = free_port()
    token_file = bearer_file(tmp_path)
    config = config_with(
        tmp_path, emulator, f'[api]\ntcp = "127.0.0.1:{port}"\nbearer_token_file = "{token_file}"\n'
    )
    await login(emulator, config)
    forged = "%0A2026-12-05%2000:00:00%20UTC%20CRITICAL%20FORGED%0D%00LINE"
    async with serving(config) as served:
        status = await raw_get(
            *await asyncio.open_unix_connection(str(served.socket)),
            f"/v1/accounts/x{forged}/token",
        )
        assert status == 404
        status = await raw_get(*await asyncio.open_connection("127.0.0.1", port), f"/x{forged}")
        assert status == 401
    shown = [r.getMessage() for r in caplog.records if "FORGED" in r.getMessage()]
    assert len(shown) == 2, shown
    for message in shown:
        assert message.isprintable(), repr(message)
        assert "%0A2026-12-05" in message and "%00LINE" in message
    assert not [line for line in caplog.text.splitlines() if "FORGED" in line[:40]]


# --------------------------------------------------------------------------- the CLI


async def test_cli_goes_through_the_daemon_when_it_runs(
    emulator: KakaoEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """status/token/refresh ask the daemon (its log shows each request) instead of the files."""
    caplog.set_level(logging.DEBUG, logger="kakao_tokend.api")
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        code, out, err = await run_cli(config, "status", "--json")
        assert code == 0, err
        assert json.loads(out)["source"] == "daemon"
        assert "api GET /v1/status" in caplog.text

        code, out, err = await run_cli(config, "refresh")
        assert code == 0, err
        assert "by the daemon" in out
        assert "api POST /v1/accounts/default/refresh" in caplog.text

        code, out, err = await run_cli(config, "token", "--min-valid", "10m")
        assert code == 0, err
        assert "api GET /v1/accounts/default/token" in caplog.text
        _, body = await served.get("/v1/accounts/default/token")
        assert out.strip() == body["access_token"]

        code, out, err = await run_cli(config, "reload")
        assert code == 0, err
        assert "configuration reloaded" in out
        config.write_text(config.read_text() + "bogus_key = 1\n")
        code, out, err = await run_cli(config, "--account", "default", "reload")
        assert code == 1, (out, err)
        assert "bogus_key" in err and "previous configuration" in err


async def test_reload_of_a_config_that_is_not_toml_asks_no_daemon(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`reload` with a config that no longer parses as TOML cannot know which socket the
    file names: it says what is wrong and that no daemon was asked (exit 78), instead of
    "not running" about the default socket — or reloading another daemon listening there."""
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config):
        config.write_text(config.read_text() + "[broken\n")
        code, out, err = await run_cli(config, "reload")
    assert code == 78, (out, err)
    assert "not valid TOML" in err and "no daemon was asked" in err
    assert "not running" not in err


async def test_reload_needs_no_secrets_in_the_cli(
    emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reload` finds the socket without loading secrets: it works even where the CLI cannot
    read the client secret (ExecReload= on systemd 252 cannot read credentials)."""
    config = config_with(tmp_path, emulator)
    text = config.read_text().replace(
        f'client_secret_file = "{tmp_path / "client_secret"}"',
        'client_secret_env = "H5_SECRET_ONLY_IN_DAEMON"',
    )
    config.write_text(text)
    monkeypatch.setenv("H5_SECRET_ONLY_IN_DAEMON", str(emulator.settings.client_secret))
    await login(emulator, config)
    async with serving(config):
        monkeypatch.delenv("H5_SECRET_ONLY_IN_DAEMON")
        code, _, err = await run_cli(config, "check-config")
        assert code == 78 and "H5_SECRET_ONLY_IN_DAEMON" in err  # the CLI cannot load it
        # ...yet the read-only commands work: they need paths and the socket, never a secret.
        code, out, err = await run_cli(config, "status")
        assert code == 0, err
        assert "default" in out
        code, out, err = await run_cli(config, "token")
        assert code == 0, err
        assert out.strip()
        monkeypatch.setenv("H5_SECRET_ONLY_IN_DAEMON", str(emulator.settings.client_secret))
        env_without = {k: v for k, v in os.environ.items() if k != "H5_SECRET_ONLY_IN_DAEMON"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kakao_tokend",
            "--config",
            str(config),
            "reload",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env_without,
        )
        out, err_bytes = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err_bytes.decode()
        assert "configuration reloaded" in out.decode()


async def test_cli_falls_back_to_files_without_a_daemon(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """With no daemon (a stale socket file even), status/token read the files; reload says so."""
    config = config_with(tmp_path, emulator)
    state = await login(emulator, config)
    loaded = load_config(config)
    socket_path = loaded.api_socket
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(socket_path))  # bound but never listening: connect is refused
    try:
        code, out, err = await run_cli(config, "status", "--json")
        assert code == 0, err
        assert json.loads(out)["source"] == "files"
        code, out, err = await run_cli(config, "token")
        assert code == 0, err
        assert out.strip() == state.tokens.access_token
        code, out, err = await run_cli(config, "reload")
        assert code == 1 and "not running" in err
    finally:
        stale.close()


async def test_reload_waits_for_the_reload(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """`kakao-tokend reload` returns only after the daemon applied the new configuration.

    The reload has to wait for an in-flight refresh, which the emulator delays by 1.5 s; the
    command's exit must come after that, with the new account already in /v1/status.
    """
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        emulator.inject("token", "slow", delay=1.5)
        refresh = asyncio.create_task(served.request("POST", "/v1/accounts/default/refresh"))
        await asyncio.sleep(0.2)
        config.write_text(config.read_text() + "[accounts.default]\n[accounts.second]\n")
        loop = asyncio.get_running_loop()
        assert not refresh.done(), "the delayed refresh must still be in flight"
        started = loop.time()
        code, _, err = await run_cli(config, "reload")
        assert code == 0, err
        assert refresh.done() or loop.time() - started >= 1.0
        # The 'or' above also passes when the refresh ended early (e.g. failed fast); the
        # refresh had ~1.3 s left when the command started, so a reload that waited took >= 1 s.
        assert loop.time() - started >= 1.0
        _, body = await served.get("/v1/status")
        assert [a["account"] for a in body["accounts"]] == ["default", "second"]
        await refresh


async def test_min_valid_auto_asks_a_share_of_a_short_lifetime(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`min_valid=auto` (what `kakao-tokend token` sends) is 60 s of a 6-hour token and
    1/360 of a 6-second one: served at once, where 60 s was refused with a 400."""
    from daemonproc import short_tokens, start_daemon, write_config

    short_tokens(emulator, access=6, refresh=3600)
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        status, body = await daemon.api("GET", "/v1/accounts/default/token?min_valid=auto")
        assert status == 200, body
        assert emulator.access_token_valid(body["access_token"])
        status, body = await daemon.api("GET", "/v1/accounts/default/token?min_valid=60")
        assert status == 400
    finally:
        assert await daemon.stop() == 0
