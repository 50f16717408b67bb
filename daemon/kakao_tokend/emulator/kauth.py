"""kauth.kakao.com: /oauth/authorize (consent, PKCE, codes) and /oauth/token (exchange, refresh)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from kakao_tokend.tokens import fingerprint

from .state import (
    DEFAULT_USER_ID,
    AccessTokenRecord,
    AuthorizationCode,
    EmulatedUser,
    EmulatorState,
    EmulatorStats,
    PendingConsent,
    RefreshAttempt,
    RefreshTokenRecord,
    new_token,
)

logger = logging.getLogger(__name__)


def split_scopes(text: str | None) -> list[str]:
    """Split a scope or prompt list; Kakao's docs use commas, its SDKs spaces: accept both."""
    return [part for part in re.split(r"[,\s]+", text or "") if part]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def html_page(title: str, body: str, status: int = 200) -> web.Response:
    """Return a minimal HTML page (Kakao's error and consent pages are HTML, not JSON)."""
    text = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>{body}</body></html>"
    )
    return web.Response(status=status, text=text, content_type="text/html")


def oauth_error(
    stats: EmulatorStats, error: str, description: str, code: str, status: int = 400
) -> web.Response:
    """Return kauth's JSON error ``{"error","error_description","error_code"}`` and count it."""
    stats.errors[code] += 1
    if code == "KOE237":
        stats.koe237 += 1
    body = {"error": error, "error_description": description, "error_code": code}
    return web.json_response(body, status=status)


def _redirect(uri: str, params: Mapping[str, str | None]) -> web.Response:
    query = urlencode({k: v for k, v in params.items() if v is not None}, quote_via=quote)
    location = uri + ("&" if "?" in uri else "?") + query
    return web.Response(status=302, headers={"Location": location})


class Kauth:
    """The authorization server: consent, codes, token issuing, rotation and rate limits."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register the kauth paths."""
        router.add_get("/oauth/authorize", self.authorize)
        router.add_post("/oauth/authorize/decide", self.decide)
        router.add_post("/oauth/token", self.token)

    # ------------------------------------------------------------------ responses

    def _oauth_error(
        self, error: str, description: str, code: str, status: int = 400
    ) -> web.Response:
        return oauth_error(self.state.stats, error, description, code, status)

    def _koe_page(self, code: str, message: str) -> web.Response:
        self.state.stats.errors[code] += 1
        body = (
            f"<h1>Kakao</h1><p class='error'>Admin settings issue ({html.escape(code)})</p>"
            f"<p>{html.escape(message)}</p>"
        )
        return html_page(f"Error {code}", body, status=400)

    # ------------------------------------------------------------------ token issuing

    def _rate_window(
        self, times: dict[int, deque[float]], user_id: int, span: float
    ) -> deque[float]:
        queue = times.setdefault(user_id, deque())
        floor = self.state.now() - span
        while queue and queue[0] <= floor:
            queue.popleft()
        return queue

    def _rate_allows(self, user_id: int, *, access: bool, refresh: bool) -> bool:
        state = self.state
        a_limit, a_span = state.settings.access_rate
        r_limit, r_span = state.settings.refresh_rate
        if access and len(self._rate_window(state.access_times, user_id, a_span)) >= a_limit:
            return False
        return not (
            refresh and len(self._rate_window(state.refresh_times, user_id, r_span)) >= r_limit
        )

    def _new_access(self, user_id: int, grant_id: str, scopes: tuple[str, ...]) -> str:
        state = self.state
        token = new_token()
        state.issued.append(token)
        now = state.now()
        state.access_tokens[token] = AccessTokenRecord(
            user_id, grant_id, now + state.settings.access_lifetime, scopes
        )
        state.access_times.setdefault(user_id, deque()).append(now)
        state.stats.access_tokens_issued += 1
        return token

    def _new_refresh(
        self,
        user_id: int,
        grant_id: str,
        scopes: tuple[str, ...],
        *,
        with_id_token: bool,
        nonce: str | None,
        lifetime: float | None = None,
    ) -> str:
        state = self.state
        token = new_token()
        state.issued.append(token)
        now = state.now()
        life = state.settings.refresh_lifetime if lifetime is None else lifetime
        state.refresh_tokens[token] = RefreshTokenRecord(
            user_id, grant_id, now + life, scopes, with_id_token, nonce
        )
        state.refresh_times.setdefault(user_id, deque()).append(now)
        state.stats.refresh_tokens_issued += 1
        return token

    def _id_token(self, user_id: int, nonce: str | None) -> str:
        # JWT-shaped with Kakao's claims, but the signature is random bytes: nobody verifies it.
        state = self.state
        now = int(state.now())
        header = {"alg": "RS256", "typ": "JWT", "kid": "kakao-tokend-emulator"}
        claims: dict[str, Any] = {
            "iss": state.url or "https://kauth.kakao.com",
            "aud": state.settings.client_id,
            "sub": str(user_id),
            "iat": now,
            "exp": now + int(state.settings.access_lifetime),
            "auth_time": now,
            "nickname": state.users[user_id].name,
        }
        if nonce:
            claims["nonce"] = nonce
        parts = [json.dumps(header).encode(), json.dumps(claims).encode(), secrets.token_bytes(64)]
        return ".".join(_b64url(part) for part in parts)

    def _seconds(self, lifetime: float) -> int | str:
        """A lifetime as the answer carries it: whole seconds, as a string if so set."""
        seconds = int(lifetime)
        return str(seconds) if self.state.settings.lifetimes_as_strings else seconds

    def _grant(
        self,
        user_id: int,
        scopes: tuple[str, ...],
        *,
        with_id_token: bool,
        nonce: str | None,
        refresh_lifetime: float | None = None,
    ) -> dict[str, Any]:
        settings = self.state.settings
        grant_id = secrets.token_hex(8)
        access = self._new_access(user_id, grant_id, scopes)
        refresh = self._new_refresh(
            user_id,
            grant_id,
            scopes,
            with_id_token=with_id_token,
            nonce=nonce,
            lifetime=refresh_lifetime,
        )
        body: dict[str, Any] = {
            "token_type": "bearer",
            "access_token": access,
            "expires_in": self._seconds(settings.access_lifetime),
            "refresh_token": refresh,
            "refresh_token_expires_in": self._seconds(
                settings.refresh_lifetime if refresh_lifetime is None else refresh_lifetime
            ),
            "scope": " ".join(scopes),
        }
        if with_id_token:
            body["id_token"] = self._id_token(user_id, nonce)
        self.state.stats.code_exchanges += 1
        return self._omit(body)

    def _omit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Leave out the fields ``omit_token_fields`` names."""
        omitted = self.state.settings.omit_token_fields
        return {k: v for k, v in body.items() if k not in omitted} if omitted else body

    def _link(self, user: EmulatedUser, requested: list[str]) -> tuple[str, ...]:
        settings = self.state.settings
        now = self.state.now()
        if not user.linked:
            user.linked = True
            user.connected_at = now
            user.scopes |= set(settings.consent_items)
            if user.first_login is None:
                user.first_login = now
        user.scopes |= set(requested)
        if settings.oidc:
            user.scopes.add("openid")
        return tuple(sorted(user.scopes))

    def issue_tokens(
        self,
        user_id: int = DEFAULT_USER_ID,
        *,
        scopes: list[str] | None = None,
        refresh_remaining: float | None = None,
    ) -> dict[str, Any]:
        """Link the user and return a token response directly, skipping authorize."""
        user = self.state.add_user(user_id)
        granted = self._link(user, scopes or [])
        return self._grant(
            user.id,
            granted,
            with_id_token="openid" in granted,
            nonce=None,
            refresh_lifetime=refresh_remaining,
        )

    # ------------------------------------------------------------------ /oauth/authorize

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        """GET /oauth/authorize: error page, consent page, or a redirect with a code or error."""
        state = self.state
        q = request.query
        settings = state.settings
        if q.get("client_id") != settings.client_id or settings.deactivated:
            return self._koe_page("KOE101", f"Not exist client_id [{q.get('client_id', '')}]")
        redirect_uri = q.get("redirect_uri", "")
        if redirect_uri not in settings.redirect_uris:
            return self._koe_page("KOE006", "redirect_uri is not registered for this app")
        response_type = q.get("response_type")
        if response_type == "token":
            return self._koe_page("KOE202", "implicit grant (response_type=token) is not supported")
        if response_type != "code":
            return self._koe_page("KOE201", f"unsupported response_type {response_type!r}")
        oauth_state = q.get("state")
        challenge = q.get("code_challenge")
        method = q.get("code_challenge_method")
        if (challenge or method) and (method != "S256" or not challenge):
            return _redirect(
                redirect_uri,
                {
                    "error": "invalid_request",
                    "error_description": "code_challenge_method must be S256 with a code_challenge",
                    "state": oauth_state,
                },
            )
        user = self._user_for_hint(q.get("login_hint"))
        requested = split_scopes(q.get("scope"))
        prompts = split_scopes(q.get("prompt"))
        decision = state.next_consent
        state.next_consent = None
        if decision == "deny":
            return self._denied(redirect_uri, oauth_state)
        needs_consent = not user.linked or not set(requested) <= user.scopes
        if "none" in prompts and needs_consent and decision is None:
            return _redirect(
                redirect_uri,
                {
                    "error": "consent_required",
                    "error_description": "user consent required.",
                    "state": oauth_state,
                },
            )
        pending = PendingConsent(
            user_id=user.id,
            client_id=settings.client_id,
            redirect_uri=redirect_uri,
            state=oauth_state,
            challenge=challenge,
            scopes=tuple(requested),
            nonce=q.get("nonce"),
            expires_at=state.now() + settings.code_ttl,
        )
        if settings.consent == "page" and needs_consent and decision is None:
            request_id = secrets.token_urlsafe(16)
            state.pending_consents[request_id] = pending
            return self._consent_page(request_id, user, requested)
        return self._approve(pending)

    def _user_for_hint(self, hint: str | None) -> EmulatedUser:
        # login_hint names a user or a numeric id; an unknown one is created, none = default.
        state = self.state
        if not hint:
            return state.users[DEFAULT_USER_ID]
        try:
            return state.user(hint)
        except KeyError:
            if hint.isdigit():
                return state.add_user(int(hint))
            return state.add_user(name=hint)

    def _consent_page(
        self, request_id: str, user: EmulatedUser, requested: list[str]
    ) -> web.Response:
        items = sorted(set(self.state.settings.consent_items) | set(requested))
        listing = "".join(f"<li>{html.escape(item)}</li>" for item in items)
        body = (
            f"<h1>Kakao (emulator)</h1><p>{html.escape(user.name)}, allow this app access?</p>"
            f"<ul>{listing}</ul>"
            "<form method='post' action='/oauth/authorize/decide'>"
            f"<input type='hidden' name='request_id' value='{html.escape(request_id)}'>"
            "<button type='submit' name='action' value='agree'>Agree</button>"
            "<button type='submit' name='action' value='cancel'>Cancel</button>"
            "</form>"
        )
        return html_page("Consent", body)

    async def decide(self, request: web.Request) -> web.StreamResponse:
        """POST /oauth/authorize/decide: the consent page's Agree or Cancel button."""
        form = await request.post()
        pending = self.state.pending_consents.pop(str(form.get("request_id", "")), None)
        if pending is None or pending.expires_at < self.state.now():
            return self._koe_page("KOE001", "this consent request is unknown or expired")
        if form.get("action") != "agree":
            return self._denied(pending.redirect_uri, pending.state)
        return self._approve(pending)

    def _denied(self, redirect_uri: str, oauth_state: str | None) -> web.Response:
        self.state.stats.errors["access_denied"] += 1
        return _redirect(
            redirect_uri,
            {
                "error": "access_denied",
                "error_description": "User denied access",
                "state": oauth_state,
            },
        )

    def _approve(self, pending: PendingConsent) -> web.Response:
        state = self.state
        user = state.users[pending.user_id]
        granted = self._link(user, list(pending.scopes))
        code = secrets.token_urlsafe(32)
        state.codes[code] = AuthorizationCode(
            user_id=user.id,
            client_id=pending.client_id,
            redirect_uri=pending.redirect_uri,
            challenge=pending.challenge,
            scopes=granted,
            expires_at=state.now() + state.settings.code_ttl,
            nonce=pending.nonce,
            with_id_token="openid" in granted,
        )
        state.stats.codes_issued += 1
        return _redirect(pending.redirect_uri, {"code": code, "state": pending.state})

    # ------------------------------------------------------------------ /oauth/token

    async def token(self, request: web.Request) -> web.StreamResponse:
        """POST /oauth/token: client check, then the authorization_code or refresh_token grant."""
        params: dict[str, str] = dict(request.query)
        if request.body_exists:  # not can_read_body: a `hold` fault has read (cached) it
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        settings = self.state.settings
        if params.get("client_id") != settings.client_id or settings.deactivated:
            return self._oauth_error(
                "invalid_client",
                f"Not exist client_id [{params.get('client_id', '')}]",
                "KOE101",
                settings.invalid_client_status,
            )
        if settings.client_secret is not None and not hmac.compare_digest(
            params.get("client_secret", "").encode(), settings.client_secret.encode()
        ):
            return self._oauth_error(
                "invalid_client", "Bad client credentials", "KOE010", settings.invalid_client_status
            )
        grant_type = params.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange_code(params)
        if grant_type == "refresh_token":
            return self._refresh_grant(params)
        return self._oauth_error(
            "unsupported_grant_type", f"unsupported grant_type {grant_type!r}", "KOE001"
        )

    def _exchange_code(self, params: Mapping[str, str]) -> web.Response:
        state = self.state
        code_text = params.get("code", "")
        code = state.codes.get(code_text)
        if code is None or code.expires_at <= state.now() or code.client_id != params["client_id"]:
            return self._oauth_error(
                "invalid_grant",
                f"authorization code not found for code={fingerprint(code_text)}",
                "KOE320",
            )
        redirect_uri = params.get("redirect_uri")
        if (redirect_uri is None and state.settings.require_redirect_uri) or (
            redirect_uri is not None and redirect_uri != code.redirect_uri
        ):
            return self._oauth_error("invalid_grant", "redirect_uri mismatch", "KOE303")
        if code.challenge is not None:
            verifier = params.get("code_verifier")
            if not verifier or not hmac.compare_digest(_s256(verifier), code.challenge):
                return self._oauth_error(
                    "invalid_grant",
                    "PKCE verification failed (code_verifier)",
                    state.settings.pkce_error_code,
                )
        if not self._rate_allows(code.user_id, access=True, refresh=True):
            return self._oauth_error(
                "invalid_request", "token request rate limit exceeded", "KOE237"
            )
        del state.codes[code_text]
        body = self._grant(
            code.user_id, code.scopes, with_id_token=code.with_id_token, nonce=code.nonce
        )
        return web.json_response(body)

    def _refresh_grant(self, params: Mapping[str, str]) -> web.Response:
        state = self.state
        settings = state.settings
        stats = state.stats
        presented = params.get("refresh_token")
        now = state.now()
        if not presented:
            stats.refresh_log.append(RefreshAttempt(now, "none", "KOE319"))
            return self._oauth_error("invalid_grant", "refresh_token is required", "KOE319")
        fp = fingerprint(presented)
        record = state.refresh_tokens.get(presented)
        retired = record is not None and record.retired_at is not None
        if retired:
            stats.retired_refresh_presented += 1
        usable = (
            record is not None
            and record.expires_at > now
            and (record.retired_at is None or now < record.retired_at + settings.old_refresh_grace)
        )
        if record is None or not usable:
            stats.refresh_log.append(
                RefreshAttempt(now, fp, "KOE322", record.user_id if record else None, None, retired)
            )
            logger.debug("refresh with %s refused: KOE322", fp)
            return self._oauth_error("invalid_grant", "expired_or_invalid_refresh_token", "KOE322")
        # Kakao's rotation rule: a new refresh token only when the presented one has less than
        # the rotation window (one month) left; a retired token in its grace never rotates.
        rotate = not retired and record.expires_at - now < settings.rotation_window
        if not self._rate_allows(record.user_id, access=True, refresh=rotate):
            stats.refresh_log.append(
                RefreshAttempt(now, fp, "KOE237", record.user_id, None, retired)
            )
            return self._oauth_error(
                "invalid_request", "token request rate limit exceeded", "KOE237"
            )
        access = self._new_access(record.user_id, record.grant_id, record.scopes)
        body: dict[str, Any] = {
            "token_type": "bearer",
            "access_token": access,
            "expires_in": self._seconds(settings.access_lifetime),
        }
        new_fp = None
        if rotate:
            fresh = self._new_refresh(
                record.user_id,
                record.grant_id,
                record.scopes,
                with_id_token=record.with_id_token,
                nonce=record.nonce,
            )
            record.retired_at = now  # kept (not deleted) so a later use is logged as retired
            body["refresh_token"] = fresh
            if settings.refresh_expiry_on_rotation:
                body["refresh_token_expires_in"] = self._seconds(settings.refresh_lifetime)
            stats.rotations += 1
            new_fp = fingerprint(fresh)
        if settings.scope_on_refresh:
            body["scope"] = " ".join(record.scopes)
        if record.with_id_token:
            body["id_token"] = self._id_token(record.user_id, record.nonce)
        stats.refreshes_ok += 1
        outcome = "rotated" if rotate else ("grace" if retired else "ok")
        stats.refresh_log.append(RefreshAttempt(now, fp, outcome, record.user_id, new_fp, retired))
        logger.debug("refresh with %s: %s %s", fp, outcome, new_fp or "")
        return web.json_response(self._omit(body))
