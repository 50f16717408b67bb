"""Tests for the Kakao emulator, driven with a plain aiohttp client over real loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from kakao_tokend.emulator import (
    DEFAULT_USER_ID,
    EmulatorSettings,
    KakaoEmulator,
    running_emulator,
)
from kakao_tokend.tokens import fingerprint

REDIRECT = "http://127.0.0.1:8765/callback"


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Kakao:
    """A tiny hand-written client so these tests do not depend on kakao.py."""

    def __init__(self, session: aiohttp.ClientSession, emu: KakaoEmulator) -> None:
        self.session = session
        self.emu = emu

    async def authorize(self, **params: str) -> aiohttp.ClientResponse:
        query = {
            "client_id": self.emu.settings.client_id,
            "redirect_uri": REDIRECT,
            "response_type": "code",
            **params,
        }
        async with self.session.get(
            self.emu.url + "/oauth/authorize", params=query, allow_redirects=False
        ) as resp:
            await resp.read()
            return resp

    async def code(self, **params: str) -> dict[str, list[str]]:
        resp = await self.authorize(**params)
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
        assert location.startswith(REDIRECT + "?")
        return parse_qs(urlsplit(location).query)

    async def token(self, **params: str | None) -> tuple[int, dict[str, Any]]:
        data = {
            "client_id": self.emu.settings.client_id,
            "client_secret": self.emu.settings.client_secret,
            **params,
        }
        form = {k: v for k, v in data.items() if v is not None}
        async with self.session.post(self.emu.url + "/oauth/token", data=form) as resp:
            return resp.status, await resp.json()

    async def refresh(self, refresh_token: str, **extra: str | None) -> tuple[int, dict[str, Any]]:
        return await self.token(grant_type="refresh_token", refresh_token=refresh_token, **extra)

    async def login(self, **params: str) -> dict[str, Any]:
        verifier, challenge = pkce_pair()
        query = await self.code(code_challenge=challenge, code_challenge_method="S256", **params)
        status, body = await self.token(
            grant_type="authorization_code",
            code=query["code"][0],
            redirect_uri=REDIRECT,
            code_verifier=verifier,
        )
        assert status == 200, body
        return body

    async def api(
        self,
        path: str,
        token: str | None,
        *,
        method: str = "GET",
        data: dict[str, str] | None = None,
        auth: str | None = None,
    ) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
        headers = {"Authorization": auth or f"Bearer {token}"}
        async with self.session.request(
            method, self.emu.url + path, headers=headers, data=data
        ) as resp:
            return resp.status, await resp.json(), resp

    async def send(self, token: str, text: str) -> tuple[int, dict[str, Any]]:
        template = {"object_type": "text", "text": text, "link": {}}
        status, body, _ = await self.api(
            "/v2/api/talk/memo/default/send",
            token,
            method="POST",
            data={"template_object": json.dumps(template)},
        )
        return status, body

    async def control(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        async with self.session.request(method, self.emu.url + path, json=body) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def kakao(emulator: KakaoEmulator) -> AsyncIterator[Kakao]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield Kakao(session, emulator)


class TestAuthorize:
    """GET /oauth/authorize and the consent page."""

    async def test_code_flow_with_pkce_and_state(self, kakao: Kakao) -> None:
        """A full code flow returns the state, then a Kakao-shaped token body for the code."""
        verifier, challenge = pkce_pair()
        query = await kakao.code(
            state="xyz", code_challenge=challenge, code_challenge_method="S256"
        )
        assert query["state"] == ["xyz"]
        status, body = await kakao.token(
            grant_type="authorization_code",
            code=query["code"][0],
            redirect_uri=REDIRECT,
            code_verifier=verifier,
        )
        assert status == 200
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 21599
        assert body["refresh_token_expires_in"] == 5183999
        assert body["scope"] == "profile_nickname talk_message"
        assert len(body["access_token"]) == 64 and len(body["refresh_token"]) == 64
        assert "id_token" not in body
        assert kakao.emu.stats.codes_issued == 1 and kakao.emu.stats.tokens_issued == 1

    @pytest.mark.parametrize(
        ("params", "code"),
        [
            ({"client_id": "nope"}, "KOE101"),
            ({"redirect_uri": "http://evil.example/cb"}, "KOE006"),
            ({"response_type": "token"}, "KOE202"),
            ({"response_type": "id_token"}, "KOE201"),
        ],
    )
    async def test_configuration_errors_are_pages_not_redirects(
        self, kakao: Kakao, params: dict[str, str], code: str
    ) -> None:
        """Bad client_id / redirect_uri / response_type show an HTML KOE page, never a 302."""
        query = {
            "client_id": kakao.emu.settings.client_id,
            "redirect_uri": REDIRECT,
            "response_type": "code",
            **params,
        }
        async with kakao.session.get(
            kakao.emu.url + "/oauth/authorize", params=query, allow_redirects=False
        ) as resp:
            assert resp.status == 400
            assert "Location" not in resp.headers
            assert resp.content_type == "text/html"
            assert code in await resp.text()

    async def test_plain_pkce_is_invalid_request(self, kakao: Kakao) -> None:
        """code_challenge_method=plain is refused with an invalid_request redirect."""
        query = await kakao.code(code_challenge="abc", code_challenge_method="plain", state="s")
        assert query["error"] == ["invalid_request"] and query["state"] == ["s"]

    async def test_prompt_none_for_unlinked_user(self, kakao: Kakao) -> None:
        """prompt=none for a never-linked user redirects with consent_required."""
        resp = await kakao.authorize(prompt="none", login_hint="newcomer", state="s")
        location = resp.headers["Location"]
        assert "error=consent_required" in location
        assert "error_description=user%20consent%20required." in location

    async def test_deny_hook(self, kakao: Kakao) -> None:
        """deny_next_authorize makes exactly the next authorize end in access_denied."""
        kakao.emu.deny_next_authorize()
        resp = await kakao.authorize(state="s1")
        assert resp.headers["Location"] == (
            REDIRECT + "?error=access_denied&error_description=User%20denied%20access&state=s1"
        )
        assert "code" in await kakao.code()

    async def test_consent_page_agree_and_cancel(self, kakao: Kakao) -> None:
        """In page mode a new user sees a form; Agree yields a code, Cancel access_denied."""
        kakao.emu.settings.consent = "page"
        for action, user in (("cancel", "alice"), ("agree", "bob")):
            resp = await kakao.authorize(login_hint=user, state="st", scope="talk_message")
            assert resp.status == 200
            async with kakao.session.get(
                kakao.emu.url + "/oauth/authorize",
                params={
                    "client_id": kakao.emu.settings.client_id,
                    "redirect_uri": REDIRECT,
                    "response_type": "code",
                    "login_hint": user,
                    "state": "st",
                },
                allow_redirects=False,
            ) as page_resp:
                page = await page_resp.text()
            assert "Agree" in page and "Cancel" in page
            match = re.search(r"name='request_id' value='([^']+)'", page)
            assert match
            async with kakao.session.post(
                kakao.emu.url + "/oauth/authorize/decide",
                data={"request_id": match.group(1), "action": action},
                allow_redirects=False,
            ) as decided:
                location = decided.headers["Location"]
            query = parse_qs(urlsplit(location).query)
            assert query["state"] == ["st"]
            if action == "cancel":
                assert query["error"] == ["access_denied"]
                assert not kakao.emu.user("alice").linked
            else:
                assert "code" in query
                assert kakao.emu.user("bob").linked

    async def test_login_hint_selects_user(self, kakao: Kakao) -> None:
        """login_hint picks (or creates) the account the tokens belong to."""
        body = await kakao.login(login_hint="carol")
        status, info, _ = await kakao.api("/v1/user/access_token_info", body["access_token"])
        assert status == 200 and info["id"] == kakao.emu.user("carol").id != DEFAULT_USER_ID


class TestCodeExchange:
    """POST /oauth/token with grant_type=authorization_code."""

    async def test_code_reuse_is_koe320(self, kakao: Kakao) -> None:
        """A code works once; the second exchange is KOE320."""
        query = await kakao.code()
        params = {"grant_type": "authorization_code", "code": query["code"][0]}
        assert (await kakao.token(**params))[0] == 200
        status, body = await kakao.token(**params)
        assert (status, body["error"], body["error_code"]) == (400, "invalid_grant", "KOE320")
        assert query["code"][0] not in body["error_description"]

    async def test_code_expires(self, kakao: Kakao) -> None:
        """A code older than code_ttl on the virtual clock is KOE320."""
        query = await kakao.code()
        kakao.emu.advance_clock(601)
        _, body = await kakao.token(grant_type="authorization_code", code=query["code"][0])
        assert body["error_code"] == "KOE320"

    async def test_pkce_mismatch(self, kakao: Kakao) -> None:
        """A wrong or missing code_verifier is 400 invalid_grant with the configured code."""
        _, challenge = pkce_pair()
        query = await kakao.code(code_challenge=challenge, code_challenge_method="S256")
        for verifier in ("wrong", None):
            status, body = await kakao.token(
                grant_type="authorization_code", code=query["code"][0], code_verifier=verifier
            )
            assert (status, body["error"], body["error_code"]) == (400, "invalid_grant", "KOE320")

    async def test_redirect_mismatch_is_koe303(self, kakao: Kakao) -> None:
        """A redirect_uri unlike the authorize one is KOE303; the misspelt key is ignored."""
        query = await kakao.code()
        status, body = await kakao.token(
            grant_type="authorization_code",
            code=query["code"][0],
            redirect_uri="http://localhost:8765/callback",
        )
        assert (status, body["error_code"]) == (400, "KOE303")
        status, body = await kakao.token(
            grant_type="authorization_code", code=query["code"][0], redirect_url="whatever"
        )
        assert status == 200

    async def test_bad_client_credentials(self, kakao: Kakao) -> None:
        """Wrong secret → KOE010 (401 by default); wrong client_id → KOE101."""
        status, body = await kakao.token(grant_type="refresh_token", client_secret="bad")
        assert (status, body["error"], body["error_code"]) == (401, "invalid_client", "KOE010")
        assert body["error_description"] == "Bad client credentials"
        status, body = await kakao.token(grant_type="refresh_token", client_id="other")
        assert body["error_code"] == "KOE101"
        kakao.emu.settings.invalid_client_status = 400
        assert (await kakao.token(grant_type="refresh_token", client_secret=None))[0] == 400

    async def test_query_string_parameters(self, kakao: Kakao) -> None:
        """Parameters sent in the query string (as some scripts do) are accepted."""
        tokens = kakao.emu.issue_tokens()
        params = {
            "grant_type": "refresh_token",
            "client_id": kakao.emu.settings.client_id,
            "client_secret": str(kakao.emu.settings.client_secret),
            "refresh_token": tokens["refresh_token"],
        }
        async with kakao.session.post(kakao.emu.url + "/oauth/token", params=params) as resp:
            assert resp.status == 200

    async def test_oidc_id_token(self, kakao: Kakao) -> None:
        """With OIDC on, the exchange and every refresh of that RT carry a JWT-shaped id_token."""
        kakao.emu.settings.oidc = True
        body = await kakao.login(nonce="n-1")
        _, claims, _ = body["id_token"].split(".")
        payload = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        assert payload["nonce"] == "n-1" and payload["sub"] == str(DEFAULT_USER_ID)
        assert "openid" in body["scope"].split()
        status, refreshed = await kakao.refresh(body["refresh_token"])
        assert status == 200 and "id_token" in refreshed


class TestRefresh:
    """POST /oauth/token with grant_type=refresh_token."""

    async def test_refresh_outside_window_does_not_rotate(self, kakao: Kakao) -> None:
        """A young RT gives a new access token only; RT fields and scope are absent."""
        tokens = kakao.emu.issue_tokens()
        status, body = await kakao.refresh(tokens["refresh_token"])
        assert status == 200
        assert set(body) == {"token_type", "access_token", "expires_in"}
        assert body["access_token"] != tokens["access_token"]
        # the old access token stays valid until its own expiry
        assert (await kakao.api("/v1/user/access_token_info", tokens["access_token"]))[0] == 200
        assert kakao.emu.stats.rotations == 0 and kakao.emu.stats.refreshes_ok == 1

    async def test_rotation_in_window_kills_old_rt(self, kakao: Kakao) -> None:
        """Inside the window a new RT with full life is returned and the old one is KOE322."""
        emu = kakao.emu
        emu.settings.refresh_lifetime = 10
        emu.settings.rotation_window = 4
        tokens = emu.issue_tokens()
        emu.advance_clock(7)
        status, body = await kakao.refresh(tokens["refresh_token"])
        assert status == 200
        assert body["refresh_token_expires_in"] == 10 and body["refresh_token"]
        status, dead = await kakao.refresh(tokens["refresh_token"])
        assert (status, dead["error_code"]) == (400, "KOE322")
        assert dead["error_description"] == "expired_or_invalid_refresh_token"
        assert (await kakao.refresh(body["refresh_token"]))[0] == 200
        log = [(e.fingerprint, e.outcome, e.retired) for e in emu.stats.refresh_log]
        assert log[0] == (fingerprint(tokens["refresh_token"]), "rotated", False)
        assert log[1] == (fingerprint(tokens["refresh_token"]), "KOE322", True)
        assert emu.stats.retired_refresh_presented == 1 and emu.stats.rotations == 1

    async def test_rotation_without_its_expiry_and_lifetimes_as_strings(self, kakao: Kakao) -> None:
        """refresh_expiry_on_rotation=False sends a rotated RT alone; lifetimes_as_strings
        sends every lifetime as a string of digits (login and refresh)."""
        emu = kakao.emu
        emu.settings.refresh_lifetime = 10
        emu.settings.rotation_window = 4
        emu.settings.refresh_expiry_on_rotation = False
        emu.settings.lifetimes_as_strings = True
        tokens = emu.issue_tokens()
        assert (tokens["expires_in"], tokens["refresh_token_expires_in"]) == ("21599", "10")
        emu.advance_clock(7)
        status, body = await kakao.refresh(tokens["refresh_token"])
        assert status == 200 and body["refresh_token"] and body["expires_in"] == "21599"
        assert "refresh_token_expires_in" not in body
        assert emu.refresh_token_status(tokens["refresh_token"]) == "retired"

    async def test_grace_window(self, kakao: Kakao) -> None:
        """With old_refresh_grace, the old RT still refreshes briefly but never rotates again."""
        emu = kakao.emu
        emu.settings.old_refresh_grace = 5
        tokens = emu.issue_tokens(refresh_remaining=60)
        assert "refresh_token" in (await kakao.refresh(tokens["refresh_token"]))[1]
        status, body = await kakao.refresh(tokens["refresh_token"])
        assert status == 200 and "refresh_token" not in body
        emu.advance_clock(6)
        assert (await kakao.refresh(tokens["refresh_token"]))[1]["error_code"] == "KOE322"

    async def test_expired_missing_and_scope_option(self, kakao: Kakao) -> None:
        """Missing RT → KOE319, expired RT → KOE322, scope_on_refresh adds scope."""
        emu = kakao.emu
        assert (await kakao.token(grant_type="refresh_token"))[1]["error_code"] == "KOE319"
        emu.settings.scope_on_refresh = True
        tokens = emu.issue_tokens()
        assert (await kakao.refresh(tokens["refresh_token"]))[1]["scope"] == tokens["scope"]
        emu.advance_clock(emu.settings.refresh_lifetime + 1)
        assert (await kakao.refresh(tokens["refresh_token"]))[1]["error_code"] == "KOE322"
        status, body = await kakao.token(grant_type="password")
        assert (status, body["error"]) == (400, "unsupported_grant_type")

    async def test_rate_limit_koe237(self, kakao: Kakao) -> None:
        """More than access_rate issuances in the window → KOE237; the window slides."""
        emu = kakao.emu
        emu.settings.access_rate = (3, 60)
        tokens = emu.issue_tokens()  # issue_tokens counts as one issuance
        assert [(await kakao.refresh(tokens["refresh_token"]))[0] for _ in range(3)] == [
            200,
            200,
            400,
        ]
        _, body = await kakao.refresh(tokens["refresh_token"])
        assert (body["error"], body["error_code"]) == ("invalid_request", "KOE237")
        assert body["error_description"] == "token request rate limit exceeded"
        assert emu.stats.koe237 == 2
        emu.advance_clock(61)
        assert (await kakao.refresh(tokens["refresh_token"]))[0] == 200

    async def test_refresh_rate_counts_rotations(self, kakao: Kakao) -> None:
        """refresh_rate limits refresh-token issuances (rotations), not plain refreshes."""
        emu = kakao.emu
        emu.settings.refresh_rate = (2, 3600)
        emu.settings.refresh_lifetime = 100
        emu.settings.rotation_window = 1000  # every refresh rotates
        rt = emu.issue_tokens()["refresh_token"]
        status, body = await kakao.refresh(rt)
        assert status == 200
        status, body = await kakao.refresh(body["refresh_token"])
        assert body["error_code"] == "KOE237"


class TestKapi:
    """Bearer checks and the kapi endpoints."""

    async def test_bearer_variants(self, kakao: Kakao) -> None:
        """Unknown/expired tokens are 401 -401 with WWW-Authenticate; a bad header is 400 -2."""
        emu = kakao.emu
        emu.settings.access_lifetime = 2
        tokens = emu.issue_tokens()
        status, body, resp = await kakao.api("/v1/user/access_token_info", "unknown")
        assert (status, body) == (401, {"code": -401, "msg": "this access token does not exist"})
        assert resp.headers["WWW-Authenticate"] == "Bearer error=invalid_token"
        status, body, _ = await kakao.api("/v2/user/me", None, auth="Basic abc")
        assert (status, body["code"]) == (400, -2)
        emu.advance_clock(3)
        status, body, _ = await kakao.api("/v2/user/me", tokens["access_token"])
        assert (status, body["msg"]) == (401, "this access token is already expired")

    async def test_app_deactivated_and_ip(self, kakao: Kakao) -> None:
        """A deactivated key or an unregistered caller IP is -401 with a config message."""
        token = kakao.emu.issue_tokens()["access_token"]
        kakao.emu.settings.allowed_ips = ["10.0.0.1"]
        status, body, _ = await kakao.api("/v2/user/me", token)
        assert status == 401 and body["msg"].startswith("ip mismatched!")
        kakao.emu.settings.allowed_ips = None
        kakao.emu.deactivate_app()
        status, body, _ = await kakao.api("/v2/user/me", token)
        assert body["msg"] == "appKey(emulator-rest-key) is already deactivated"

    async def test_access_token_info_remaining(self, kakao: Kakao) -> None:
        """access_token_info reports remaining seconds on the virtual clock and the app id."""
        token = kakao.emu.issue_tokens()["access_token"]
        kakao.emu.advance_clock(599)
        status, info, _ = await kakao.api("/v1/user/access_token_info", token)
        assert status == 200
        assert info["id"] == DEFAULT_USER_ID and info["app_id"] == 1234
        assert 20990 <= info["expires_in"] <= 21000

    async def test_user_me_marks_signup(self, kakao: Kakao) -> None:
        """/v2/user/me returns id+connected_at and protects the user from auto-unlink."""
        emu = kakao.emu
        emu.settings.auto_unlink_incomplete_signup = True
        quiet = emu.issue_tokens(emu.add_user(name="quiet").id)
        chatty = emu.issue_tokens(emu.add_user(name="chatty").id)
        status, me, _ = await kakao.api("/v2/user/me", chatty["access_token"], method="POST")
        assert status == 200 and me["id"] == emu.user("chatty").id
        assert me["connected_at"].endswith("Z") and me["properties"]["nickname"] == "chatty"
        emu.advance_clock(86401)
        assert not emu.user("quiet").linked and emu.user("chatty").linked
        assert (await kakao.refresh(quiet["refresh_token"]))[1]["error_code"] == "KOE322"

    async def test_logout_and_unlink(self, kakao: Kakao) -> None:
        """logout kills that token set only; unlink kills every token and the link."""
        emu = kakao.emu
        first, second = emu.issue_tokens(), emu.issue_tokens()
        status, body, _ = await kakao.api("/v1/user/logout", first["access_token"], method="POST")
        assert (status, body) == (200, {"id": DEFAULT_USER_ID})
        assert (await kakao.api("/v2/user/me", first["access_token"]))[0] == 401
        assert (await kakao.refresh(first["refresh_token"]))[1]["error_code"] == "KOE322"
        assert (await kakao.refresh(second["refresh_token"]))[0] == 200
        status, body, _ = await kakao.api("/v1/user/unlink", second["access_token"], method="POST")
        assert status == 200 and not emu.user().linked
        assert (await kakao.refresh(second["refresh_token"]))[1]["error_code"] == "KOE322"

    async def test_memo_inbox_and_errors(self, kakao: Kakao) -> None:
        """send-to-me lands in the inbox; bad templates are -2, non-Talk -501, no scope -402."""
        emu = kakao.emu
        token = emu.issue_tokens()["access_token"]
        assert await kakao.send(token, "hello") == (200, {"result_code": 0})
        assert [m["text"] for m in emu.inbox(DEFAULT_USER_ID)] == ["hello"]
        assert (await kakao.send(token, "x" * 201))[1]["code"] == -2
        for raw in ("{not json", '{"text":"a","link":{}}', '{"object_type":"text","text":"a"}'):
            status, body, _ = await kakao.api(
                "/v2/api/talk/memo/default/send",
                token,
                method="POST",
                data={"template_object": raw},
            )
            assert (status, body["code"]) == (400, -2)
        emu.user().talk_user = False
        assert (await kakao.send(token, "hi"))[1]["code"] == -501
        emu.withdraw_scope(DEFAULT_USER_ID, "talk_message")
        status, body = await kakao.send(token, "hi")
        assert (status, body["code"], body["api_type"]) == (403, -402, "TALK_MEMO_DEFAULT_SEND")
        assert body["required_scopes"] == ["talk_message"]
        assert body["allowed_scopes"] == ["profile_nickname"]
        assert len(emu.inbox()) == 1


class TestFaults:
    """Fault injection as a client sees it."""

    @pytest.mark.parametrize(
        ("kind", "status", "content_type"),
        [
            ("http500", 500, "text/plain"),
            ("http502_html", 502, "text/html"),
            ("http503", 503, "text/plain"),
            ("http429", 429, "text/plain"),
            ("http429_retry_after", 429, "text/plain"),
            ("koe003", 500, "application/json"),
            ("koe237", 400, "application/json"),
            ("non_json", 200, "text/plain"),
        ],
    )
    async def test_http_faults(
        self, kakao: Kakao, kind: str, status: int, content_type: str
    ) -> None:
        """One-shot HTTP faults answer once, then the endpoint behaves normally again."""
        tokens = kakao.emu.issue_tokens()
        kakao.emu.inject("token", kind)
        form = {
            "grant_type": "refresh_token",
            "client_id": kakao.emu.settings.client_id,
            "client_secret": str(kakao.emu.settings.client_secret),
            "refresh_token": tokens["refresh_token"],
        }
        async with kakao.session.post(kakao.emu.url + "/oauth/token", data=form) as resp:
            assert (resp.status, resp.content_type) == (status, content_type)
        assert (await kakao.refresh(tokens["refresh_token"]))[0] == 200
        assert kakao.emu.stats.faults_fired[kind] == 1

    async def test_only_the_retry_after_fault_says_when_to_come_back(self, kakao: Kakao) -> None:
        """http429 carries no Retry-After (a gateway's limit); http429_retry_after an hour."""
        tokens = kakao.emu.issue_tokens()
        form = {
            "grant_type": "refresh_token",
            "client_id": kakao.emu.settings.client_id,
            "client_secret": str(kakao.emu.settings.client_secret),
            "refresh_token": tokens["refresh_token"],
        }
        seen = []
        for kind in ("http429", "http429_retry_after"):
            kakao.emu.inject("token", kind)
            async with kakao.session.post(kakao.emu.url + "/oauth/token", data=form) as resp:
                seen.append(resp.headers.get("Retry-After"))
        assert seen == [None, "3600"]

    @pytest.mark.parametrize(
        ("kind", "status", "code"),
        [
            ("-1", 400, -1),
            ("-7", 400, -7),
            ("-9798", 503, -9798),
            ("-10", 400, -10),
            ("-10_429", 429, -10),
            ("-603", 400, -603),
            ("-103", 400, -103),
            ("-4", 403, -4),
        ],
    )
    async def test_kapi_faults(self, kakao: Kakao, kind: str, status: int, code: int) -> None:
        """kapi error faults answer with Kakao's status and code."""
        token = kakao.emu.issue_tokens()["access_token"]
        kakao.emu.inject("access_token_info", kind)
        got_status, body, _ = await kakao.api("/v1/user/access_token_info", token)
        assert (got_status, body["code"]) == (status, code)

    async def test_connection_faults(self, kakao: Kakao) -> None:
        """reset and truncated surface as client connection/payload errors."""
        token = kakao.emu.issue_tokens()["access_token"]
        # POST: aiohttp silently retries an idempotent GET once after a disconnect, which
        # would hide a one-shot reset (aiohttp client.py, retry_persistent_connection).
        kakao.emu.inject("user_me", "reset")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await kakao.api("/v2/user/me", token, method="POST")
        kakao.emu.inject("user_me", "reset", count=2)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await kakao.api("/v2/user/me", token)
        kakao.emu.inject("user_me", "truncated")
        with pytest.raises(aiohttp.ClientPayloadError):
            await kakao.api("/v2/user/me", token)
        assert (await kakao.api("/v2/user/me", token))[0] == 200
        assert kakao.emu.stats.faults_fired["reset"] == 3

    async def test_lost_response_commits_rotation(self, kakao: Kakao) -> None:
        """lost_response rotates server-side then drops the connection: the old RT is dead."""
        tokens = kakao.emu.issue_tokens(refresh_remaining=100)
        kakao.emu.inject("token", "lost_response")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await kakao.refresh(tokens["refresh_token"])
        assert kakao.emu.stats.rotations == 1
        assert (await kakao.refresh(tokens["refresh_token"]))[1]["error_code"] == "KOE322"

    async def test_timeout_and_slow(self, kakao: Kakao) -> None:
        """timeout holds the request past the client's deadline; slow answers late but fine."""
        token = kakao.emu.issue_tokens()["access_token"]
        kakao.emu.inject("access_token_info", "timeout", delay=2)
        with pytest.raises(TimeoutError):
            async with kakao.session.get(
                kakao.emu.url + "/v1/user/access_token_info",
                headers={"Authorization": f"Bearer {token}"},
                timeout=aiohttp.ClientTimeout(total=0.3),
            ):
                pass
        kakao.emu.inject("access_token_info", "slow", delay=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await kakao.api("/v1/user/access_token_info", token))[0] == 200
        assert loop.time() - started >= 0.3

    async def test_rate_and_wildcard(self, kakao: Kakao) -> None:
        """rate=1 faults every call on every endpoint until cleared; rate=0 never fires."""
        token = kakao.emu.issue_tokens()["access_token"]
        kakao.emu.inject("*", "http503", rate=0.0)
        assert (await kakao.api("/v2/user/me", token))[0] == 200
        kakao.emu.clear_faults()
        kakao.emu.inject("*", "-1", rate=1.0)
        for path in ("/v2/user/me", "/v1/user/access_token_info"):
            assert (await kakao.api(path, token))[1]["code"] == -1
        kakao.emu.clear_faults()
        assert (await kakao.api("/v2/user/me", token))[0] == 200

    def test_bad_fault_arguments(self) -> None:
        """Unknown endpoints/kinds and lost_response off the token endpoint are refused."""
        emu = KakaoEmulator()
        for args in (("nope", "http500"), ("token", "boom"), ("user_me", "lost_response")):
            with pytest.raises(ValueError):
                emu.inject(*args)


class TestControlApi:
    """The /_emulator/ HTTP control API used by out-of-process tests."""

    async def test_faults_clock_stats_inbox(self, kakao: Kakao) -> None:
        """Faults, clock, stats and inbox can be driven and read over HTTP."""
        tokens = kakao.emu.issue_tokens()
        status, body = await kakao.control(
            "POST", "/_emulator/faults", {"endpoint": "memo", "kind": "-7", "count": 1}
        )
        assert status == 201 and body["faults"][0]["kind"] == "-7"
        assert (await kakao.control("POST", "/_emulator/faults", {"kind": "nah"}))[0] == 400
        assert (await kakao.send(tokens["access_token"], "x"))[1]["code"] == -7
        assert (await kakao.send(tokens["access_token"], "delivered"))[0] == 200
        status, inbox = await kakao.control("GET", f"/_emulator/inbox?user_id={DEFAULT_USER_ID}")
        assert [m["text"] for m in inbox["messages"]] == ["delivered"]
        await kakao.control("POST", "/_emulator/faults", {"endpoint": "*", "kind": "http500"})
        assert (await kakao.control("DELETE", "/_emulator/faults"))[1] == {"faults": []}
        before = kakao.emu.now()
        status, clock = await kakao.control("POST", "/_emulator/clock", {"advance": 3600})
        assert clock["offset"] == 3600 and kakao.emu.now() - before >= 3600
        status, stats = await kakao.control("GET", "/_emulator/stats")
        assert stats["faults_fired"] == {"-7": 1} and stats["errors"]["-7"] == 1
        assert tokens["access_token"] not in json.dumps(stats)

    async def test_user_and_app_actions(self, kakao: Kakao) -> None:
        """unlink/revoke/withdraw, secret changes and consent hook work over HTTP."""
        emu = kakao.emu
        tokens = emu.issue_tokens()
        status, _ = await kakao.control(
            "POST", f"/_emulator/users/{DEFAULT_USER_ID}/withdraw", {"scope": "talk_message"}
        )
        assert (await kakao.send(tokens["access_token"], "x"))[1]["code"] == -402
        await kakao.control("POST", f"/_emulator/users/{DEFAULT_USER_ID}/revoke")
        assert (await kakao.refresh(tokens["refresh_token"]))[1]["error_code"] == "KOE322"
        assert emu.user().linked
        await kakao.control("POST", f"/_emulator/users/{DEFAULT_USER_ID}/unlink")
        assert not emu.user().linked
        old_secret = emu.settings.client_secret
        status, app = await kakao.control("POST", "/_emulator/app", {"client_secret": "regenerate"})
        assert status == 200 and app["client_secret"] != old_secret
        _, body = await kakao.token(grant_type="refresh_token", client_secret=old_secret)
        assert body["error_code"] == "KOE010"
        await kakao.control("POST", "/_emulator/app", {"client_secret": None})
        tokens = emu.issue_tokens()
        assert (await kakao.refresh(tokens["refresh_token"], client_secret=None))[0] == 200
        await kakao.control("POST", "/_emulator/app", {"redirect_uris": []})
        assert (await kakao.authorize()).status == 400
        await kakao.control("POST", "/_emulator/app", {"redirect_uris": [REDIRECT]})
        await kakao.control("POST", "/_emulator/consent", {"next": "deny"})
        assert "error=access_denied" in (await kakao.authorize()).headers["Location"]
        await kakao.control("POST", "/_emulator/app", {"deactivated": True})
        _, body = await kakao.refresh(tokens["refresh_token"], client_secret=None)
        assert body["error_code"] == "KOE101"

    async def test_settings_endpoint(self, kakao: Kakao) -> None:
        """Lifetimes and rates can be changed over HTTP; unknown keys are refused."""
        status, body = await kakao.control(
            "POST", "/_emulator/settings", {"access_lifetime": 2, "access_rate": [5, 60]}
        )
        assert status == 200 and body["access_lifetime"] == 2
        assert kakao.emu.settings.access_rate == (5, 60.0)
        assert "client_secret" not in body
        assert (await kakao.control("POST", "/_emulator/settings", {"bogus": 1}))[0] == 400
        assert kakao.emu.issue_tokens()["expires_in"] == 2


async def test_running_emulator_custom_settings() -> None:
    """running_emulator serves on a free loopback port and honours settings; stop frees it."""
    settings = EmulatorSettings(client_secret=None, access_lifetime=2.5)
    async with running_emulator(settings) as emu:
        assert emu.url.startswith("http://127.0.0.1:")
        assert "client_secret=(off)" in emu.describe()
        assert emu.issue_tokens()["expires_in"] == 2
        url = emu.url
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(url + "/_emulator/stats")


async def test_account_flags_over_control_api(kakao: Kakao) -> None:
    """Dormant and sanctioned flags set over HTTP turn kapi answers into -103 and -4."""
    token = kakao.emu.issue_tokens()["access_token"]
    path = f"/_emulator/users/{DEFAULT_USER_ID}/flags"
    await kakao.control("POST", path, {"dormant": True})
    assert (await kakao.api("/v2/user/me", token))[1]["code"] == -103
    await kakao.control("POST", path, {"dormant": False, "sanctioned": True})
    status, body, _ = await kakao.api("/v2/user/me", token)
    assert (status, body["code"]) == (403, -4)
    status, users = await kakao.control("POST", "/_emulator/users", {"name": "dave"})
    assert status == 201 and users["name"] == "dave" and not users["linked"]


async def test_serve_emulator_process() -> None:
    """serve_emulator runs in its own process, announces its URL, serves, and exits on SIGTERM."""
    code = (
        "import sys; from kakao_tokend.emulator import serve_emulator; "
        "serve_emulator('127.0.0.1', 0, announce=lambda line: print(line, flush=True))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        # Starting Python on a loaded machine can take many seconds.
        banner = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", banner)
        assert match, banner
        assert "client_id=emulator-rest-key" in banner
        async with (
            aiohttp.ClientSession() as session,
            session.get(match.group(1) + "/_emulator/stats") as resp,
        ):
            assert resp.status == 200
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_token_inspection_helpers(kakao: Kakao) -> None:
    """access_token_valid / refresh_token_status / issued_tokens follow expiry and rotation."""
    emu = kakao.emu
    emu.settings.access_lifetime = 2
    tokens = emu.issue_tokens(refresh_remaining=100)
    assert emu.access_token_valid(tokens["access_token"])
    assert emu.refresh_token_status(tokens["refresh_token"]) == "live"
    _, body = await kakao.refresh(tokens["refresh_token"])
    assert emu.refresh_token_status(tokens["refresh_token"]) == "retired"
    emu.advance_clock(3)
    assert not emu.access_token_valid(tokens["access_token"])
    emu.revoke_user_tokens(DEFAULT_USER_ID)
    assert emu.refresh_token_status(body["refresh_token"]) == "unknown"
    assert set(emu.issued_tokens()) == {
        tokens["access_token"],
        tokens["refresh_token"],
        body["access_token"],
        body["refresh_token"],
    }
