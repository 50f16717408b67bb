"""Tests for kakao.py: the HTTP client against the Kakao emulator and a scripted loopback server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kakao_tokend import __version__
from kakao_tokend.config import KakaoApp
from kakao_tokend.emulator import EmulatorSettings, KakaoEmulator, running_emulator
from kakao_tokend.errors import (
    KakaoConfigError,
    KakaoError,
    KakaoRequestRejected,
    KakaoUnavailable,
    ReloginRequired,
)
from kakao_tokend.kakao import (
    MEMO_TEXT_LIMIT,
    AccessTokenInfo,
    AccessTokenRejected,
    KakaoClient,
    new_pkce_pair,
    new_state,
)
from kakao_tokend.tokens import TokenSet, utcnow

REDIRECT = "http://127.0.0.1:8765/callback"

# --------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def emu() -> AsyncIterator[KakaoEmulator]:
    """A running emulator with default settings."""
    async with running_emulator(EmulatorSettings(seed=1)) as emulator:
        yield emulator


def app_for(url: str, **overrides: Any) -> KakaoApp:
    """A KakaoApp pointing both hosts at ``url`` with the emulator's credentials."""
    fields: dict[str, Any] = {
        "rest_api_key": "emulator-rest-key",
        "client_secret": "emulator-client-secret",
        "auth_url": url,
        "api_url": url,
        "redirect_uri": REDIRECT,
        # The production session's limits: a loaded machine can stall a loopback connection
        # for seconds, and only tests about timeouts set short ones.
        "timeout": 30.0,
        "connect_timeout": 10.0,
    }
    fields.update(overrides)
    return KakaoApp(**fields)


def tokens_from(body: dict[str, Any], *, at: datetime | None = None) -> TokenSet:
    """Turn an emulator token response into a TokenSet issued ``at`` (default now)."""
    return TokenSet.from_token_response(body, requested_at=at or utcnow())


@dataclass
class Secrets:
    """Every secret value a test saw; none may appear in an error's text."""

    values: list[str]

    def add(self, *more: str | None) -> None:
        self.values.extend(v for v in more if v)

    def assert_absent(self, exc: BaseException) -> None:
        texts = [str(exc), repr(exc), repr(exc.args)]
        if isinstance(exc, KakaoError):
            texts += [exc.message, exc.hint or "", exc.code or "", exc.endpoint]
        for secret in self.values:
            for text in texts:
                assert secret not in text, f"a secret leaked into {type(exc).__name__}: {text}"


async def login(client: KakaoClient, session: aiohttp.ClientSession) -> tuple[str, str, str]:
    """Run authorize against the emulator; return (code, verifier, state)."""
    verifier, challenge = new_pkce_pair()
    state = new_state()
    url = client.authorize_url(state=state, code_challenge=challenge, scopes=["talk_message"])
    async with session.get(url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    return query["code"][0], verifier, state


def closed_port() -> int:
    """Return a loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------------- pure helpers


class TestHelpers:
    """PKCE, state and the authorize URL."""

    def test_pkce_pair_is_s256_of_verifier(self) -> None:
        """The challenge is unpadded base64url(SHA-256(verifier)); the verifier fits RFC 7636."""
        verifier, challenge = new_pkce_pair()
        digest = hashlib.sha256(verifier.encode()).digest()
        assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert 43 <= len(verifier) <= 128
        assert set(verifier) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
        )
        assert new_pkce_pair()[0] != verifier

    def test_state_is_random(self) -> None:
        """Two states differ and are long enough to be unguessable."""
        assert new_state() != new_state()
        assert len(new_state()) >= 24

    async def test_authorize_url_has_every_parameter(self, session: aiohttp.ClientSession) -> None:
        """authorize_url carries client_id, redirect_uri, code, state, S256, scope and prompt."""
        client = KakaoClient(session, app_for("https://kauth.example/", scopes=("a", "b")))
        url = client.authorize_url(state="st", code_challenge="ch", prompt="login")
        parts = urlsplit(url)
        assert (
            f"{parts.scheme}://{parts.netloc}{parts.path}"
            == "https://kauth.example/oauth/authorize"
        )
        query = parse_qs(parts.query)
        assert query == {
            "client_id": ["emulator-rest-key"],
            "redirect_uri": [REDIRECT],
            "response_type": ["code"],
            "state": ["st"],
            "code_challenge": ["ch"],
            "code_challenge_method": ["S256"],
            "scope": ["a,b"],
            "prompt": ["login"],
        }

    async def test_authorize_url_omits_empty_scope_and_prompt(
        self, session: aiohttp.ClientSession
    ) -> None:
        """Explicit scopes override the app's; no scopes and no prompt send neither parameter."""
        client = KakaoClient(session, app_for("https://k", scopes=("x",)))
        query = parse_qs(
            urlsplit(
                client.authorize_url(
                    state="s", code_challenge="c", scopes=[], redirect_uri="http://localhost:1/cb"
                )
            ).query
        )
        assert "scope" not in query and "prompt" not in query
        assert query["redirect_uri"] == ["http://localhost:1/cb"]
        query = parse_qs(
            urlsplit(client.authorize_url(state="s", code_challenge="c", scopes=["p", "q"])).query
        )
        assert query["scope"] == ["p,q"]


# --------------------------------------------------------------------------------- happy paths


class TestFlows:
    """The full code flow, refresh with and without rotation, and the kapi calls."""

    async def test_full_code_flow_and_kapi_calls(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """authorize → code → exchange gives a token set that kapi accepts; logout revokes it."""
        client = KakaoClient(session, app_for(emu.url))
        code, verifier, _ = await login(client, session)
        before = utcnow()
        tokens = await client.exchange_code(code=code, code_verifier=verifier)
        assert tokens.access_token and tokens.refresh_token
        assert "talk_message" in (tokens.scope or "")
        assert before <= tokens.access_issued_at <= utcnow()
        assert tokens.access_expires_at - tokens.access_issued_at == timedelta(seconds=21599)
        assert tokens.refresh_expires_at - tokens.access_issued_at == timedelta(seconds=5183999)

        info = await client.access_token_info(tokens.access_token)
        assert info == AccessTokenInfo(user_id=1234567890, expires_in=info.expires_in, app_id=1234)
        assert 21590 <= info.expires_in <= 21599
        me = await client.user_me(tokens.access_token)
        assert me["id"] == 1234567890 and "connected_at" in me
        assert emu.user(1234567890).personal_info_called

        await client.send_to_me(tokens.access_token, "hello", link_url="https://example.com/x")
        (message,) = emu.inbox()
        assert message["text"] == "hello"
        assert message["template"]["link"] == {
            "web_url": "https://example.com/x",
            "mobile_web_url": "https://example.com/x",
        }

        assert await client.logout(tokens.access_token) == 1234567890
        with pytest.raises(AccessTokenRejected):
            await client.access_token_info(tokens.access_token)

    async def test_exchange_without_client_secret_when_secret_is_off(
        self, session: aiohttp.ClientSession
    ) -> None:
        """With Client Secret OFF, client_secret=None works (no secret field is needed)."""
        async with running_emulator(EmulatorSettings(client_secret=None)) as emu:
            client = KakaoClient(session, app_for(emu.url, client_secret=None))
            code, verifier, _ = await login(client, session)
            tokens = await client.exchange_code(code=code, code_verifier=verifier)
            assert tokens.refresh_token

    async def test_refresh_without_rotation_keeps_refresh_token(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """Outside the rotation window: new access token, same refresh token and expiry."""
        client = KakaoClient(session, app_for(emu.url))
        old = tokens_from(emu.issue_tokens(), at=utcnow() - timedelta(hours=5))
        new, rotated = await client.refresh(old)
        assert not rotated
        assert new.access_token != old.access_token
        assert new.refresh_token == old.refresh_token
        assert new.refresh_expires_at == old.refresh_expires_at
        assert new.access_issued_at > old.access_issued_at
        assert (await client.access_token_info(new.access_token)).user_id == 1234567890
        assert emu.stats.rotations == 0

    async def test_refresh_with_rotation_returns_new_refresh_token(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """Inside the last month the refresh token rotates; the old one then gets KOE322."""
        client = KakaoClient(session, app_for(emu.url))
        old = tokens_from(emu.issue_tokens(refresh_remaining=10 * 86400))
        new, rotated = await client.refresh(old)
        assert rotated
        assert new.refresh_token != old.refresh_token
        assert new.refresh_expires_at - new.access_issued_at == timedelta(seconds=5183999)
        assert emu.stats.rotations == 1
        with pytest.raises(ReloginRequired) as caught:
            await client.refresh(old)
        assert caught.value.code == "KOE322"
        again, rotated_again = await client.refresh(new)
        assert not rotated_again and again.refresh_token == new.refresh_token

    async def test_send_to_me_truncates_long_text_and_sends_empty_link(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """Text over 200 characters is cut to 200 with an ellipsis; no link_url sends link {}."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens(scopes=["talk_message"]))
        await client.send_to_me(tokens.access_token, "가" * 500)
        (message,) = emu.inbox()
        assert len(message["text"]) == MEMO_TEXT_LIMIT
        assert message["text"].endswith("…")
        assert message["template"] == {"object_type": "text", "text": message["text"], "link": {}}

    async def test_unlink_revokes_everything(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """unlink returns the user id; the refresh token is then dead (KOE322 → relogin)."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        assert await client.unlink(tokens.access_token) == 1234567890
        with pytest.raises(ReloginRequired):
            await client.refresh(tokens)

    async def test_expiry_counts_from_send_time_of_slow_answer(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """A token answer that takes 0.6 s still dates the expiry from when the request was sent."""
        client = KakaoClient(session, app_for(emu.url))
        old = tokens_from(emu.issue_tokens(), at=utcnow() - timedelta(hours=5))
        emu.inject("token", "slow", delay=0.6)
        sent = utcnow()
        new, _ = await client.refresh(old)
        answered = utcnow()
        assert answered - sent >= timedelta(seconds=0.6)
        assert new.access_issued_at - sent < timedelta(seconds=0.3)
        assert new.access_expires_at == new.access_issued_at + timedelta(seconds=21599)

    async def test_injected_clock_dates_the_tokens(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """The clock is read once, before sending; its value is the issue time of the set."""
        fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        readings: list[datetime] = []

        def clock() -> datetime:
            readings.append(fixed)
            return fixed

        client = KakaoClient(session, app_for(emu.url), clock=clock)
        code, verifier, _ = await login(client, session)
        tokens = await client.exchange_code(code=code, code_verifier=verifier)
        assert readings == [fixed]
        assert tokens.access_issued_at == fixed
        assert tokens.access_expires_at == fixed + timedelta(seconds=21599)

    async def test_debug_log_has_path_and_status_but_no_query_or_tokens(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
    ) -> None:
        """DEBUG logs one line per request (method, path, status, time) and never a token."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        with caplog.at_level(logging.DEBUG, logger="kakao_tokend.kakao"):
            new, _ = await client.refresh(tokens)
            await client.access_token_info(new.access_token)
            emu.inject("token", "reset")
            with pytest.raises(KakaoUnavailable):
                await client.refresh(new)
        lines = [r.getMessage() for r in caplog.records if r.name == "kakao_tokend.kakao"]
        assert len(lines) == 3
        assert lines[0].startswith("POST /oauth/token -> 200 in ")
        assert lines[1].startswith("GET /v1/user/access_token_info -> 200 in ")
        assert lines[2].startswith("POST /oauth/token failed after ")
        for line in lines:
            for secret in (tokens.access_token, tokens.refresh_token, new.access_token):
                assert secret not in line
            assert "?" not in line


# --------------------------------------------------------------------------------- emulator errors


Call = Callable[[KakaoClient, TokenSet], Awaitable[Any]]


async def _refresh(client: KakaoClient, tokens: TokenSet) -> Any:
    return await client.refresh(tokens)


async def _info(client: KakaoClient, tokens: TokenSet) -> Any:
    return await client.access_token_info(tokens.access_token)


async def _memo(client: KakaoClient, tokens: TokenSet) -> Any:
    return await client.send_to_me(tokens.access_token, "hi")


async def _me(client: KakaoClient, tokens: TokenSet) -> Any:
    return await client.user_me(tokens.access_token)


# (endpoint, fault kind, call, expected class, code, HTTP status, ambiguous or None)
FAULTS: list[tuple[str, str, Call, type[KakaoError], str | None, int | None, bool | None]] = [
    ("token", "http500", _refresh, KakaoUnavailable, None, 500, True),
    ("token", "http502_html", _refresh, KakaoUnavailable, None, 502, True),
    ("token", "http503", _refresh, KakaoUnavailable, None, 503, True),
    ("token", "koe003", _refresh, KakaoUnavailable, "KOE003", 500, True),
    ("token", "koe237", _refresh, KakaoUnavailable, "KOE237", 400, False),
    ("token", "reset", _refresh, KakaoUnavailable, "disconnected", None, True),
    ("token", "truncated", _refresh, KakaoUnavailable, "truncated", None, True),
    ("token", "non_json", _refresh, KakaoUnavailable, "bad-body", 200, True),
    ("token", "lost_response", _refresh, KakaoUnavailable, "disconnected", None, True),
    ("access_token_info", "http502_html", _info, KakaoUnavailable, None, 502, True),
    ("access_token_info", "non_json", _info, KakaoUnavailable, "bad-body", 200, True),
    ("access_token_info", "-1", _info, KakaoUnavailable, "-1", 400, False),
    ("access_token_info", "-7", _info, KakaoUnavailable, "-7", 400, False),
    ("access_token_info", "-10", _info, KakaoUnavailable, "-10", 400, False),
    ("access_token_info", "-10_429", _info, KakaoUnavailable, "-10", 429, False),
    ("access_token_info", "-603", _info, KakaoUnavailable, "-603", 400, False),
    ("access_token_info", "-9798", _info, KakaoUnavailable, "-9798", 503, True),
    ("access_token_info", "-401", _info, AccessTokenRejected, "-401", 401, None),
    ("access_token_info", "-103", _info, ReloginRequired, "-103", 400, None),
    ("user_me", "-4", _me, KakaoRequestRejected, "-4", 403, None),
    ("memo", "-501", _memo, KakaoRequestRejected, "-501", 400, None),
    ("memo", "-532", _memo, KakaoRequestRejected, "-532", 400, None),
    ("memo", "-533", _memo, KakaoRequestRejected, "-533", 400, None),
    ("memo", "-536", _memo, KakaoRequestRejected, "-536", 400, None),
    ("memo", "truncated", _memo, KakaoUnavailable, "truncated", None, True),
    ("memo", "reset", _memo, KakaoUnavailable, "disconnected", None, True),
]


class TestEmulatorFaults:
    """Every fault the emulator can inject maps onto the documented error class."""

    @pytest.mark.parametrize(
        ("endpoint", "kind", "call", "cls", "code", "status", "ambiguous"),
        FAULTS,
        ids=[f"{row[0]}-{row[1]}" for row in FAULTS],
    )
    async def test_fault_maps_to_error_class(
        self,
        emu: KakaoEmulator,
        session: aiohttp.ClientSession,
        endpoint: str,
        kind: str,
        call: Call,
        cls: type[KakaoError],
        code: str | None,
        status: int | None,
        ambiguous: bool | None,
    ) -> None:
        """The injected fault raises ``cls`` with code/status/ambiguity and no secret in it."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens(scopes=["talk_message"]))
        emu.inject(endpoint, kind)
        with pytest.raises(KakaoError) as caught:
            await call(client, tokens)
        exc = caught.value
        assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
        assert exc.code == code
        assert exc.status == status
        path = {"token": "/oauth/token", "access_token_info": "/v1/user/access_token_info"}
        assert exc.endpoint == path.get(endpoint, exc.endpoint)
        if ambiguous is not None:
            assert isinstance(exc, KakaoUnavailable)
            assert exc.ambiguous is ambiguous
        Secrets(
            [tokens.access_token, tokens.refresh_token, "emulator-client-secret"]
        ).assert_absent(exc)
        assert str(exc).strip() and "\n" not in str(exc)

    async def test_koe237_is_a_rate_limit_without_an_invented_pause(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """The token rate limit (KOE237) is marked rate_limited; the client invents no fixed
        pause (a 60 s floor once outlived second-long tokens): the refresher's lifetime-relative
        back-off decides how long to wait."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        emu.inject("token", "koe237")
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(tokens)
        assert caught.value.rate_limited is True
        assert caught.value.retry_after is None  # Kakao sent no Retry-After
        assert caught.value.ambiguous is False

    async def test_lost_response_was_processed_by_the_server(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """lost_response: Kakao rotated the token but we only see an ambiguous failure."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens(refresh_remaining=86400))
        emu.inject("token", "lost_response")
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(tokens)
        assert caught.value.ambiguous
        assert emu.stats.rotations == 1
        with pytest.raises(ReloginRequired):  # the rotated-out token is dead now
            await client.refresh(tokens)

    async def test_timeout_is_ambiguous(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """A token answer slower than the app timeout → KakaoUnavailable(timeout, ambiguous)."""
        client = KakaoClient(session, app_for(emu.url, timeout=0.3, connect_timeout=0.3))
        tokens = tokens_from(emu.issue_tokens())
        emu.inject("token", "timeout", delay=1.0)
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(tokens)
        assert caught.value.code == "timeout"
        assert caught.value.ambiguous
        assert caught.value.status is None
        Secrets([tokens.refresh_token]).assert_absent(caught.value)

    async def test_a_timeout_says_its_wait_as_the_other_messages_do(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """The wait is said through format_duration, as "1s" (never "1.0s", where the
        connect timeout and the API say "1s")."""
        client = KakaoClient(session, app_for(emu.url, timeout=1.0, connect_timeout=1.0))
        tokens = tokens_from(emu.issue_tokens())
        emu.inject("token", "timeout", delay=5.0)
        with pytest.raises(KakaoUnavailable) as caught:
            await asyncio.wait_for(client.refresh(tokens), timeout=10)
        assert caught.value.code == "timeout"
        assert "did not answer /oauth/token within 1s" in str(caught.value), caught.value

    async def test_a_default_timeout_is_fitted_to_a_short_lived_token(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """Left at its default (30 s), the wait for a 6-second token's refresh is 4.75 % of its
        life under the default refresh policy (tokens.request_timeout_share): a hung Kakao
        leaves a retry before access_expiring may page, not five lifetimes later."""
        emu.settings.access_lifetime = 6
        client = KakaoClient(session, app_for(emu.url))  # the production defaults, 30 s / 10 s
        tokens = tokens_from(emu.issue_tokens())
        emu.inject("token", "timeout", delay=20.0)
        started = time.monotonic()
        with pytest.raises(KakaoUnavailable) as caught:
            await asyncio.wait_for(client.refresh(tokens), timeout=10)
        waited = time.monotonic() - started
        assert caught.value.code == "timeout" and caught.value.ambiguous
        assert 0.28 <= waited < 2.5, waited  # 0.285 s and the machine's own delays

    async def test_a_timeout_set_by_hand_is_kept_for_a_short_lived_token(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """A timeout the operator wrote is used as written, whatever the token's life."""
        emu.settings.access_lifetime = 6
        client = KakaoClient(session, app_for(emu.url, timeout=2.5, connect_timeout=1.0))
        tokens = tokens_from(emu.issue_tokens())
        emu.inject("token", "timeout", delay=20.0)
        started = time.monotonic()
        with pytest.raises(KakaoUnavailable) as caught:
            await asyncio.wait_for(client.refresh(tokens), timeout=10)
        assert caught.value.code == "timeout"
        assert time.monotonic() - started >= 2.4

    async def test_a_timeout_set_by_hand_never_outlasts_half_the_refresh_tokens_life(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """60 s set by hand, 4 s of refresh life left, Kakao hangs: the request gives up after
        2 s, leaving the other half for a retry (before, it waited out the hang)."""
        client = KakaoClient(session, app_for(emu.url, timeout=60.0, connect_timeout=10.0))
        tokens = tokens_from(emu.issue_tokens(refresh_remaining=4))
        emu.inject("token", "timeout", delay=20.0)
        started = time.monotonic()
        with pytest.raises(KakaoUnavailable) as caught:
            await asyncio.wait_for(client.refresh(tokens), timeout=10)
        waited = time.monotonic() - started
        assert caught.value.code == "timeout" and caught.value.ambiguous
        assert 1.5 <= waited < 3.5, waited  # 2 s and the machine's own delays

    async def test_connection_refused_is_not_ambiguous(
        self, session: aiohttp.ClientSession
    ) -> None:
        """Nothing listening → KakaoUnavailable(connect, ambiguous=False); no aiohttp exception."""
        now = utcnow()
        tokens = TokenSet(
            access_token="a" * 40,
            refresh_token="r" * 40,
            access_expires_at=now,
            refresh_expires_at=now,
            access_issued_at=now,
        )
        client = KakaoClient(session, app_for(f"http://127.0.0.1:{closed_port()}"))
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(tokens)
        assert caught.value.code == "connect"
        assert caught.value.ambiguous is False
        assert not isinstance(caught.value, aiohttp.ClientError)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        Secrets(["a" * 40, "r" * 40]).assert_absent(caught.value)
        with pytest.raises(KakaoUnavailable):
            await client.access_token_info("a" * 40)

    async def test_dns_failure_is_not_ambiguous(self, session: aiohttp.ClientSession) -> None:
        """An unresolvable host → KakaoUnavailable(dns, ambiguous=False)."""
        client = KakaoClient(session, app_for("http://kakao-tokend-test.invalid"))
        with pytest.raises(KakaoUnavailable) as caught:
            await client.access_token_info("token-value")
        assert caught.value.code == "dns"
        assert caught.value.ambiguous is False


class TestEmulatorRefusals:
    """Kakao's own refusals (KOE codes, kapi codes) produced by emulator state, not faults."""

    async def test_koe320_reused_code_is_relogin_and_hides_the_code(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """A used authorization code → ReloginRequired(KOE320); the code never appears."""
        client = KakaoClient(session, app_for(emu.url))
        code, verifier, _ = await login(client, session)
        tokens = await client.exchange_code(code=code, code_verifier=verifier)
        with pytest.raises(ReloginRequired) as caught:
            await client.exchange_code(code=code, code_verifier=verifier)
        assert caught.value.code == "KOE320"
        Secrets([code, verifier, tokens.access_token, tokens.refresh_token]).assert_absent(
            caught.value
        )

    async def test_wrong_pkce_verifier_is_relogin(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """A wrong code_verifier fails the exchange with ReloginRequired (start again)."""
        client = KakaoClient(session, app_for(emu.url))
        code, _, _ = await login(client, session)
        wrong, _ = new_pkce_pair()
        with pytest.raises(ReloginRequired):
            await client.exchange_code(code=code, code_verifier=wrong)

    async def test_unknown_invalid_grant_code_is_relogin(
        self, session: aiohttp.ClientSession
    ) -> None:
        """An invalid_grant with an unknown KOE code is still a relogin, with the code shown."""
        settings = EmulatorSettings(pkce_error_code="KOE999")
        async with running_emulator(settings) as emu:
            client = KakaoClient(session, app_for(emu.url))
            code, _, _ = await login(client, session)
            with pytest.raises(ReloginRequired) as caught:
                await client.exchange_code(code=code, code_verifier=new_pkce_pair()[0])
        assert caught.value.code == "KOE999"
        assert "KOE999" in str(caught.value)

    async def test_koe303_redirect_mismatch_is_config(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """A different redirect_uri at the token step → KakaoConfigError(KOE303) with a hint."""
        client = KakaoClient(session, app_for(emu.url))
        code, verifier, _ = await login(client, session)
        with pytest.raises(KakaoConfigError) as caught:
            await client.exchange_code(
                code=code, code_verifier=verifier, redirect_uri="http://localhost:8765/callback"
            )
        assert caught.value.code == "KOE303"
        assert caught.value.hint and "redirect URI" in caught.value.hint

    @pytest.mark.parametrize("status", [400, 401])
    async def test_koe010_wrong_secret_is_config(
        self, session: aiohttp.ClientSession, status: int
    ) -> None:
        """A wrong client secret → KakaoConfigError(KOE010), hint about Client Secret ON/OFF."""
        async with running_emulator(EmulatorSettings(invalid_client_status=status)) as emu:
            tokens = tokens_from(emu.issue_tokens())
            client = KakaoClient(session, app_for(emu.url, client_secret="wrong-secret-value"))
            with pytest.raises(KakaoConfigError) as caught:
                await client.refresh(tokens)
        exc = caught.value
        assert (exc.code, exc.status) == ("KOE010", status)
        assert exc.hint and "Client Secret" in exc.hint
        Secrets(["wrong-secret-value", tokens.refresh_token]).assert_absent(exc)

    async def test_koe010_missing_secret_is_config(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """Client Secret ON but none configured → KakaoConfigError(KOE010)."""
        client = KakaoClient(session, app_for(emu.url, client_secret=None))
        with pytest.raises(KakaoConfigError) as caught:
            await client.refresh(tokens_from(emu.issue_tokens()))
        assert caught.value.code == "KOE010"

    async def test_koe101_unknown_key_is_config(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """An unknown REST API key → KakaoConfigError(KOE101) naming rest_api_key in the hint."""
        client = KakaoClient(session, app_for(emu.url, rest_api_key="not-the-key"))
        with pytest.raises(KakaoConfigError) as caught:
            await client.refresh(tokens_from(emu.issue_tokens()))
        assert caught.value.code == "KOE101"
        assert caught.value.hint and "rest_api_key" in caught.value.hint
        assert "not-the-key" not in str(caught.value)

    async def test_koe319_empty_refresh_token_is_config_bug(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """A refresh without a refresh token → KakaoConfigError(KOE319) flagged as a bug."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = replace(tokens_from(emu.issue_tokens()), refresh_token="")
        with pytest.raises(KakaoConfigError) as caught:
            await client.refresh(tokens)
        assert caught.value.code == "KOE319"
        assert "bug" in str(caught.value)

    async def test_koe237_from_real_rate_limit(self, session: aiohttp.ClientSession) -> None:
        """Exceeding the emulator's access-token rate → KakaoUnavailable(KOE237, not ambiguous)."""
        async with running_emulator(EmulatorSettings(access_rate=(2, 600))) as emu:
            client = KakaoClient(session, app_for(emu.url))
            tokens = tokens_from(emu.issue_tokens())  # counts as one issuance
            tokens, _ = await client.refresh(tokens)
            with pytest.raises(KakaoUnavailable) as caught:
                await client.refresh(tokens)
        assert caught.value.code == "KOE237" and not caught.value.ambiguous
        # No invented 60 s floor: the refresher's lifetime-relative back-off decides the pause.
        assert caught.value.rate_limited and caught.value.retry_after is None

    async def test_expired_access_token_is_access_token_rejected(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """An expired access token → AccessTokenRejected (a ReloginRequired) with a refresh hint."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        emu.advance_clock(21600)
        with pytest.raises(AccessTokenRejected) as caught:
            await client.user_me(tokens.access_token)
        assert isinstance(caught.value, ReloginRequired)
        assert "already expired" in str(caught.value)
        assert caught.value.hint and "refresh" in caught.value.hint

    async def test_deactivated_app_401_is_config_not_expiry(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """-401 "appKey(...) is already deactivated" → KakaoConfigError; no key in the message."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        emu.deactivate_app()
        with pytest.raises(KakaoConfigError) as caught:
            await client.access_token_info(tokens.access_token)
        assert caught.value.code == "-401"
        assert "emulator-rest-key" not in str(caught.value)
        with pytest.raises(KakaoConfigError) as caught_token:  # kauth says KOE101
            await client.refresh(tokens)
        assert caught_token.value.code == "KOE101"

    async def test_ip_mismatch_401_is_config(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """-401 "ip mismatched!" → KakaoConfigError, since refreshing would not help."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        emu.settings.allowed_ips = ["10.9.9.9"]
        with pytest.raises(KakaoConfigError) as caught:
            await client.access_token_info(tokens.access_token)
        assert "ip mismatched" in str(caught.value)

    async def test_missing_consent_402_hints_at_login_scope(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """Consent withdrawn → KakaoRequestRejected(-402) hinting `login --scope talk_message`."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        emu.withdraw_scope(1234567890, "talk_message")
        with pytest.raises(KakaoRequestRejected) as caught:
            await client.send_to_me(tokens.access_token, "hi")
        assert (caught.value.code, caught.value.status) == ("-402", 403)
        assert caught.value.hint and "kakao-tokend login --scope talk_message" in caught.value.hint

    async def test_dormant_user_is_relogin_with_reactivation_hint(
        self, emu: KakaoEmulator, session: aiohttp.ClientSession
    ) -> None:
        """-103 (dormant account) → ReloginRequired whose hint says to reactivate the account."""
        client = KakaoClient(session, app_for(emu.url))
        tokens = tokens_from(emu.issue_tokens())
        emu.user(1234567890).dormant = True
        with pytest.raises(ReloginRequired) as caught:
            await client.user_me(tokens.access_token)
        assert caught.value.code == "-103"
        assert caught.value.hint and "reactivate" in caught.value.hint


# --------------------------------------------------------------------------------- scripted server


class Scripted:
    """A loopback HTTP server answering every request with the next scripted response."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b"{}"
        self.content_type = "application/json"
        self.headers: dict[str, str] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.user_agents: list[str] = []

    def answer(
        self,
        status: int,
        body: Any,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.content_type = content_type
        self.headers = headers or {}

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.user_agents.append(request.headers.get("User-Agent", ""))
        self.requests.append((request.method, request.path, {k: str(v) for k, v in form.items()}))
        return web.Response(
            status=self.status,
            body=self.body,
            content_type=self.content_type,
            headers=self.headers,
        )


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    """A running Scripted server and its base URL."""
    script = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield script, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def _koe(code: str, error: str = "invalid_request", description: str = "x") -> dict[str, str]:
    return {"error": error, "error_description": description, "error_code": code}


# (status, body, expected class, expected code)
TOKEN_TABLE: list[tuple[int, Any, type[KakaoError], str | None]] = [
    (400, _koe("KOE004"), KakaoConfigError, "KOE004"),
    (400, _koe("KOE005"), KakaoConfigError, "KOE005"),
    (400, _koe("KOE006"), KakaoConfigError, "KOE006"),
    (400, _koe("KOE009", "misconfigured"), KakaoConfigError, "KOE009"),
    (400, _koe("KOE201"), KakaoConfigError, "KOE201"),
    (400, _koe("KOE202"), KakaoConfigError, "KOE202"),
    (401, {"error": "invalid_client", "error_description": "Bad client"}, KakaoConfigError, None),
    (400, _koe("KOE322", "invalid_grant"), ReloginRequired, "KOE322"),
    (400, {"error": "invalid_grant"}, ReloginRequired, None),
    (400, _koe("KOE777"), KakaoUnavailable, "KOE777"),
    (418, {"unexpected": True}, KakaoUnavailable, None),
    (500, _koe("KOE123", "server_error"), KakaoUnavailable, "KOE123"),
    (502, b"<html>bad gateway</html>", KakaoUnavailable, None),
    (400, b'{"error":"invalid_gr', KakaoUnavailable, "bad-body"),
    # Kakao does not document the HTTP status of its KOE errors: the body decides, a 200 too.
    (200, _koe("KOE322", "invalid_grant"), ReloginRequired, "KOE322"),
    (200, _koe("KOE010", "invalid_client"), KakaoConfigError, "KOE010"),
    (200, _koe("KOE237"), KakaoUnavailable, "KOE237"),
    (200, {"error": "invalid_grant"}, ReloginRequired, None),
]


KAPI_TABLE: list[tuple[int, dict[str, Any], type[KakaoError], str]] = [
    (401, {"code": -401, "msg": "ip mismatched! callerIp=1.2.3.4."}, KakaoConfigError, "-401"),
    (401, {"code": -401, "msg": "domain mismatched! https://x"}, KakaoConfigError, "-401"),
    (401, {"code": -401, "msg": "android keyhash mismatched!"}, KakaoConfigError, "-401"),
    (401, {"code": -401, "msg": "this access token does not exist"}, AccessTokenRejected, "-401"),
    (400, {"code": -101, "msg": "not registered user"}, ReloginRequired, "-101"),
    (400, {"code": -103, "msg": "dormant"}, ReloginRequired, "-103"),
    (403, {"code": -3, "msg": "x"}, KakaoConfigError, "-3"),
    (403, {"code": -5, "msg": "x"}, KakaoConfigError, "-5"),
    (400, {"code": -9, "msg": "x"}, KakaoConfigError, "-9"),
    (400, {"code": -11, "msg": "x"}, KakaoConfigError, "-11"),
    (403, {"code": -12, "msg": "x"}, KakaoConfigError, "-12"),
    (400, {"code": -903, "msg": "x"}, KakaoConfigError, "-903"),
    (400, {"code": -2, "msg": "x"}, KakaoRequestRejected, "-2"),
    (403, {"code": -4, "msg": "x"}, KakaoRequestRejected, "-4"),
    (401, {"code": -406, "msg": "x"}, KakaoRequestRejected, "-406"),
    (403, {"code": -402, "msg": "insufficient scopes."}, KakaoRequestRejected, "-402"),
    (400, {"code": -531, "msg": "x"}, KakaoRequestRejected, "-531"),
    (400, {"code": -534, "msg": "x"}, KakaoRequestRejected, "-534"),
    (400, {"code": -535, "msg": "x"}, KakaoRequestRejected, "-535"),
    (400, {"code": -1, "msg": "x"}, KakaoUnavailable, "-1"),
    (400, {"code": -999, "msg": "x"}, KakaoUnavailable, "-999"),
    (200, {"code": -401, "msg": "this access token does not exist"}, AccessTokenRejected, "-401"),
    (200, {"code": -101, "msg": "not registered user"}, ReloginRequired, "-101"),
]


def _dummy_tokens() -> TokenSet:
    now = utcnow()
    return TokenSet(
        access_token="ACCESS-" + "a" * 40,
        refresh_token="REFRESH-" + "r" * 40,
        access_expires_at=now + timedelta(hours=1),
        refresh_expires_at=now + timedelta(days=50),
        access_issued_at=now,
    )


class TestScriptedAnswers:
    """Answers the emulator cannot produce, from a scripted loopback server."""

    @pytest.mark.parametrize(
        ("status", "body", "cls", "code"),
        TOKEN_TABLE,
        ids=[f"{row[0]}-{row[3] or 'nocode'}-{i}" for i, row in enumerate(TOKEN_TABLE)],
    )
    async def test_token_endpoint_table(
        self,
        scripted: tuple[Scripted, str],
        session: aiohttp.ClientSession,
        status: int,
        body: Any,
        cls: type[KakaoError],
        code: str | None,
    ) -> None:
        """Each token-endpoint error answer maps onto its documented class and code."""
        script, url = scripted
        script.answer(status, body)
        client = KakaoClient(session, app_for(url))
        tokens = _dummy_tokens()
        with pytest.raises(KakaoError) as caught:
            await client.refresh(tokens)
        exc = caught.value
        assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
        assert exc.status == status
        if code is not None:
            assert exc.code == code
        if code and code.startswith("KOE"):
            assert code in str(exc)
        if isinstance(exc, KakaoUnavailable) and status >= 500:
            assert exc.ambiguous
        if isinstance(exc, KakaoUnavailable) and status < 500 and code and code[:3] == "KOE":
            assert not exc.ambiguous  # an unknown code is a clear refusal, not a lost answer
        Secrets([tokens.refresh_token, "emulator-client-secret"]).assert_absent(exc)

    @pytest.mark.parametrize(
        ("status", "body", "cls", "code"),
        KAPI_TABLE,
        ids=[f"{row[0]}{row[3]}-{i}" for i, row in enumerate(KAPI_TABLE)],
    )
    async def test_kapi_table(
        self,
        scripted: tuple[Scripted, str],
        session: aiohttp.ClientSession,
        status: int,
        body: dict[str, Any],
        cls: type[KakaoError],
        code: str,
    ) -> None:
        """Each kapi error answer maps onto its documented class and code."""
        script, url = scripted
        script.answer(status, body)
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoError) as caught:
            await client.access_token_info("ACCESS-" + "a" * 40)
        exc = caught.value
        assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
        assert (exc.code, exc.status) == (code, status)
        assert code in str(exc)
        Secrets(["ACCESS-" + "a" * 40]).assert_absent(exc)

    @pytest.mark.parametrize("status", [200, 400, 500])
    async def test_a_body_nested_too_deep_is_an_unusable_answer_not_a_crash(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession, status: int
    ) -> None:
        """40 kB of ``[`` from the token endpoint (a broken proxy, a hostile middlebox) is an
        answer the client cannot use, like any other non-JSON body: KakaoUnavailable, retried
        by the one back-off rule. Python's parser raised RecursionError through the refresh,
        which nothing expects (the refresh task died with an internal error)."""
        script, url = scripted
        script.answer(status, b"[" * 20000 + b"]" * 20000, content_type="application/json")
        client = KakaoClient(session, app_for(url))
        tokens = _dummy_tokens()
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(tokens)
        assert caught.value.status == status
        Secrets([tokens.refresh_token, "emulator-client-secret"]).assert_absent(caught.value)

    async def test_memo_unknown_400_is_request_rejected(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """An unknown 400 from the memo endpoint refuses that message only."""
        script, url = scripted
        script.answer(400, {"code": -777, "msg": "template domain not registered"})
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoRequestRejected) as caught:
            await client.send_to_me("tok", "hi")
        assert caught.value.code == "-777"

    async def test_memo_nonzero_result_code_is_rejected(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """A 200 with result_code != 0 is not treated as delivered."""
        script, url = scripted
        script.answer(200, {"result_code": 5})
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoRequestRejected):
            await client.send_to_me("tok", "hi")

    async def test_429_honours_retry_after(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """HTTP 429 with Retry-After: 7 → KakaoUnavailable(retry_after=7, not ambiguous)."""
        script, url = scripted
        script.answer(429, {"code": -10, "msg": "API limit"}, headers={"Retry-After": "7"})
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoUnavailable) as caught:
            await client.user_me("tok")
        assert caught.value.retry_after == 7
        assert caught.value.ambiguous is False
        script.answer(429, b"slow down", content_type="text/plain", headers={"Retry-After": "3"})
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(_dummy_tokens())
        assert (caught.value.retry_after, caught.value.status) == (3, 429)

    @pytest.mark.parametrize(
        "error", ["misconfigured", "unauthorized_client", "unsupported_grant_type", "invalid_scope"]
    )
    async def test_oauth_errors_naming_the_setup_are_config_without_a_code(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession, error: str
    ) -> None:
        """Kakao's OAuth ``error`` values that blame the app's setup (its SDKs list them) are a
        configuration error even without a KOE code: retrying them forever fixes nothing."""
        script, url = scripted
        script.answer(400, {"error": error, "error_description": "app setting"})
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoConfigError) as caught:
            await client.refresh(_dummy_tokens())
        assert caught.value.code == error and error in str(caught.value)

    async def test_a_401_saying_invalid_token_in_its_header_is_a_rejected_token(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """kapi's 401 carries ``WWW-Authenticate: Bearer error=invalid_token`` (RFC 6750): that
        header says the access token was refused even when the body is not Kakao's JSON (a
        gateway's page), so the caller refreshes instead of retrying the dead token."""
        script, url = scripted
        header = {"WWW-Authenticate": 'Bearer realm="kakao", error="invalid_token"'}
        script.answer(401, b"<html>401</html>", content_type="text/html", headers=header)
        client = KakaoClient(session, app_for(url))
        with pytest.raises(AccessTokenRejected) as caught:
            await client.access_token_info("tok")
        assert caught.value.status == 401
        script.answer(401, b"<html>401</html>", content_type="text/html")
        with pytest.raises(KakaoUnavailable):  # no such header: nothing says why
            await client.access_token_info("tok")

    async def test_a_server_error_without_a_code_is_retried(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """``server_error`` on a 400 without a KOE code stays transient."""
        script, url = scripted
        script.answer(400, {"error": "server_error", "error_description": "try later"})
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoUnavailable):
            await client.refresh(_dummy_tokens())

    async def test_koe237_respects_a_longer_retry_after(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """KOE237 with Retry-After 120 keeps 120 (the back-off honours it within its bounds)."""
        script, url = scripted
        script.answer(400, _koe("KOE237"), headers={"Retry-After": "120"})
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(_dummy_tokens())
        assert caught.value.retry_after == 120

    async def test_a_rate_limit_answer_without_its_code_is_still_a_rate_limit(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """Kakao's KOE237 answer without error_code (a proxy or an older API may drop it):
        invalid_request with "rate limit" in the description is the rate limit, so the
        refresher pauses as for KOE237 instead of retrying at the ladder's quick pace."""
        script, url = scripted
        script.answer(
            400,
            {"error": "invalid_request", "error_description": "token request rate limit exceeded"},
        )
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(_dummy_tokens())
        assert caught.value.rate_limited is True
        assert caught.value.code == "KOE237"

    async def test_descriptions_are_redacted(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """Kakao text echoing a code, token or secret is never copied into the message."""
        script, url = scripted
        client = KakaoClient(session, app_for(url))
        script.answer(
            400,
            _koe("KOE320", "invalid_grant", "authorization code not found for code=SECRETCODE123"),
        )
        with pytest.raises(ReloginRequired) as caught:
            await client.exchange_code(code="SECRETCODE123", code_verifier="VERIFIER456")
        Secrets(["SECRETCODE123", "VERIFIER456"]).assert_absent(caught.value)
        tokens = _dummy_tokens()
        script.answer(
            400,
            _koe(
                "KOE888", "invalid_request", f"bad token {tokens.refresh_token} client_secret=zzz"
            ),
        )
        with pytest.raises(KakaoUnavailable) as caught_other:
            await client.refresh(tokens)
        Secrets([tokens.refresh_token, "zzz"]).assert_absent(caught_other.value)
        assert "KOE888" in str(caught_other.value)

    async def test_user_agent_names_the_daemon(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """Every request from create_session() carries User-Agent kakao-tokend/<version>."""
        script, url = scripted
        script.answer(200, {"id": 7})
        client = KakaoClient(session, app_for(url))
        assert await client.logout("tok") == 7
        assert await client.unlink("tok") == 7
        assert script.user_agents == [f"kakao-tokend/{__version__}"] * 2
        assert [r[1] for r in script.requests] == ["/v1/user/logout", "/v1/user/unlink"]

    async def test_token_form_fields(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession
    ) -> None:
        """exchange_code and refresh send exactly the documented form fields."""
        script, url = scripted
        script.answer(200, {"access_token": "A1", "expires_in": 60})
        client = KakaoClient(session, app_for(url))
        tokens = _dummy_tokens()
        await client.refresh(tokens)
        assert script.requests[-1] == (
            "POST",
            "/oauth/token",
            {
                "grant_type": "refresh_token",
                "client_id": "emulator-rest-key",
                "refresh_token": tokens.refresh_token,
                "client_secret": "emulator-client-secret",
            },
        )
        script.answer(
            200,
            {
                "access_token": "A2",
                "expires_in": 60,
                "refresh_token": "R2",
                "refresh_token_expires_in": 600,
            },
        )
        await KakaoClient(session, app_for(url, client_secret=None)).exchange_code(
            code="C", code_verifier="V"
        )
        assert script.requests[-1][2] == {
            "grant_type": "authorization_code",
            "client_id": "emulator-rest-key",
            "redirect_uri": REDIRECT,
            "code": "C",
            "code_verifier": "V",
        }

    @pytest.mark.parametrize(
        "body",
        [
            {"token_type": "bearer"},
            {"access_token": "A", "expires_in": "soon"},
            [1, 2, 3],
        ],
    )
    async def test_token_answer_missing_fields_is_ambiguous(
        self, scripted: tuple[Scripted, str], session: aiohttp.ClientSession, body: Any
    ) -> None:
        """A 200 token answer without usable fields → KakaoUnavailable(bad-body, ambiguous)."""
        script, url = scripted
        script.answer(200, body)
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoUnavailable) as caught:
            await client.refresh(_dummy_tokens())
        assert caught.value.code == "bad-body" and caught.value.ambiguous

    @pytest.mark.parametrize(
        ("method", "body"),
        [("access_token_info", {"id": 1}), ("user_me", {"x": 1}), ("logout", {"id": "x"})],
    )
    async def test_kapi_answer_missing_fields_is_unavailable(
        self,
        scripted: tuple[Scripted, str],
        session: aiohttp.ClientSession,
        method: str,
        body: dict[str, Any],
    ) -> None:
        """A 200 kapi answer lacking id/expires_in → KakaoUnavailable(bad-body)."""
        script, url = scripted
        script.answer(200, body)
        client = KakaoClient(session, app_for(url))
        with pytest.raises(KakaoUnavailable) as caught:
            await getattr(client, method)("tok")
        assert caught.value.code == "bad-body"

    async def test_sock_read_timeout_during_body(self, session: aiohttp.ClientSession) -> None:
        """A server that sends headers then stalls → KakaoUnavailable(timeout, ambiguous)."""

        async def stall(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(status=200, headers={"Content-Length": "100"})
            await response.prepare(request)
            await response.write(b'{"access')
            await asyncio.sleep(2)
            return response

        app = web.Application()
        app.router.add_post("/oauth/token", stall)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            url = str(server.make_url("")).rstrip("/")
            client = KakaoClient(session, app_for(url, timeout=0.3))
            with pytest.raises(KakaoUnavailable) as caught:
                await client.refresh(_dummy_tokens())
        finally:
            await server.close()
        assert caught.value.code == "timeout" and caught.value.ambiguous


def test_no_aiohttp_names_leak_from_module() -> None:
    """The public API of kakao.py exposes only our own types (the contract's names)."""
    import kakao_tokend.kakao as kakao

    assert set(kakao.__all__) == {
        "AccessTokenInfo",
        "AccessTokenRejected",
        "KakaoClient",
        "create_session",
        "new_pkce_pair",
        "new_state",
    }
