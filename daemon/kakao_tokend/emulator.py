"""The Kakao emulator: kauth + kapi on one port, with a virtual clock, faults and a control API.

What it implements (paths do not collide, so one port serves both hosts):

====================================  ==========================================================
``GET  /oauth/authorize``             KOE101/KOE006/KOE201/KOE202 HTML error pages (never a
                                      redirect); consent "auto" (302 with code+state) or "page"
                                      (HTML form → ``POST /oauth/authorize/decide``); cancel →
                                      ``access_denied``; ``prompt=none`` + unlinked →
                                      ``consent_required``; PKCE S256 only (else
                                      ``invalid_request`` redirect); ``login_hint`` picks the user
``POST /oauth/token``                 authorization_code + refresh_token grants, every KOE of
                                      kakao-api.md §5, rotation inside the window, per-user KOE237
``GET  /v1/user/access_token_info``   ``{"id","expires_in","app_id"}`` (remaining seconds)
``POST /v1/user/logout`` / ``unlink`` revoke the token set / every token of the user (+ unlink)
``GET|POST /v2/user/me``              ``{"id","connected_at",...}``; marks the signup complete
``POST /v2/api/talk/memo/default/send`` -402 without ``talk_message``, -501 non-Talk user, -2 bad
                                      template; per-user inbox
``/_emulator/...``                    control API for out-of-process tests (faults, clock, inbox,
                                      stats, user and app actions, consent hook, settings)
====================================  ==========================================================

Choices for the open questions of kakao-api.md (all configurable in :class:`EmulatorSettings`):

* PKCE failure (verifier missing or wrong): 400 ``invalid_grant`` with ``error_code``
  ``pkce_error_code`` (default ``"KOE320"``, i.e. "the code is unusable, start again").
* KOE010 (bad/missing client_secret) and KOE101 (bad client_id): ``invalid_client`` with status
  ``invalid_client_status`` (default 401).
* Old refresh token after rotation: dead immediately (``old_refresh_grace = 0``). Inside a grace
  window the old token still yields a new access token, but never another refresh token.
* ``scope`` is omitted from refresh responses (``scope_on_refresh = False``).
* A missing ``redirect_uri`` on the code exchange is tolerated (``require_redirect_uri = False``);
  a different one is KOE303.
* Authorization code TTL 600 s; a code is consumed only by a successful exchange.
* Old access tokens stay valid until their own expiry after a refresh.
* Rate limits: ``access_rate`` counts access tokens issued (code exchanges + refreshes),
  ``refresh_rate`` counts refresh tokens issued (code exchanges + rotations), per user, rolling.
* KOE003 is answered with HTTP 500; unsupported grant types with 400
  ``unsupported_grant_type`` / ``KOE001``.
* Memo text over 200 characters is rejected with 400 -2 (not truncated).
* id_token is JWT-shaped (RS256 header, claims of §9) but its signature is random bytes.
* Faults "http5xx", "truncated", "non_json", "reset" never touch server state; "timeout" and
  "slow" answer normally after the delay (so the work IS done); "lost_response" does the work
  and then resets the connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import html
import json
import logging
import random
import re
import secrets
import signal
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, urlencode

from aiohttp import web

from kakao_tokend.tokens import fingerprint

logger = logging.getLogger(__name__)

DEFAULT_USER_ID = 1234567890
ConsentMode = Literal["auto", "page"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENDPOINTS = frozenset(
    {"token", "authorize", "access_token_info", "user_me", "memo", "logout", "unlink", "*"}
)
_ENDPOINT_BY_PATH = {
    "/oauth/token": "token",
    "/oauth/authorize": "authorize",
    "/v1/user/access_token_info": "access_token_info",
    "/v2/user/me": "user_me",
    "/v2/api/talk/memo/default/send": "memo",
    "/v1/user/logout": "logout",
    "/v1/user/unlink": "unlink",
}
# kapi error faults: kind -> (HTTP status, code, msg)
_KAPI_FAULTS: dict[str, tuple[int, int, str]] = {
    "-1": (400, -1, "internal error"),
    "-4": (403, -4, "account is sanctioned"),
    "-7": (400, -7, "service check"),
    "-10": (400, -10, "API limit has been exceeded."),
    "-10_429": (429, -10, "API limit has been exceeded."),
    "-103": (400, -103, "dormant or nonexistent kakao account"),
    "-401": (401, -401, "this access token does not exist"),
    "-501": (400, -501, "not a kakao talk user"),
    "-532": (400, -532, "daily message limit per sender exceeded"),
    "-533": (400, -533, "daily message limit per recipient exceeded"),
    "-536": (400, -536, "daily message limit between sender and recipient exceeded"),
    "-603": (400, -603, "internal timeout"),
    "-9798": (503, -9798, "service under maintenance"),
}
FAULT_KINDS = frozenset(
    {
        "http500",
        "http502_html",
        "http503",
        "koe003",
        "koe237",
        "timeout",
        "slow",
        "reset",
        "truncated",
        "non_json",
        "lost_response",
        *_KAPI_FAULTS,
    }
)
_DEFAULT_DELAY = {"timeout": 60.0, "slow": 2.0}


def _default_redirect_uris() -> list[str]:
    return ["http://127.0.0.1:8765/callback", "http://localhost:8765/callback"]


@dataclass
class EmulatorSettings:
    """Tunable behaviour of the emulator; every duration is in (virtual) seconds, floats allowed.

    The emulator reads these on every request, so a test may change them on a running instance.
    """

    access_lifetime: float = 21599
    refresh_lifetime: float = 5183999
    rotation_window: float = 30 * 86400
    code_ttl: float = 600
    client_id: str = "emulator-rest-key"
    client_secret: str | None = field(default="emulator-client-secret", repr=False)
    app_id: int = 1234
    redirect_uris: list[str] = field(default_factory=_default_redirect_uris)
    consent: ConsentMode = "auto"
    consent_items: list[str] = field(default_factory=lambda: ["profile_nickname", "talk_message"])
    oidc: bool = False
    deactivated: bool = False
    allowed_ips: list[str] | None = None
    old_refresh_grace: float = 0
    access_rate: tuple[int, float] = (20, 600)
    refresh_rate: tuple[int, float] = (30, 3600)
    pkce_error_code: str = "KOE320"
    invalid_client_status: int = 401
    require_redirect_uri: bool = False
    scope_on_refresh: bool = False
    auto_unlink_incomplete_signup: bool = False
    incomplete_signup_window: float = 86400
    memo_text_limit: int = 200
    seed: int | None = None


@dataclass
class EmulatedUser:
    """One Kakao account as the emulator sees it."""

    id: int
    name: str
    linked: bool = False
    dormant: bool = False
    sanctioned: bool = False
    talk_user: bool = True
    deleted: bool = False
    scopes: set[str] = field(default_factory=set)
    first_login: float | None = None
    connected_at: float | None = None
    personal_info_called: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able view for the control API."""
        data = asdict(self)
        data["scopes"] = sorted(self.scopes)
        return data


@dataclass
class RefreshAttempt:
    """One presented refresh token (by fingerprint only) and what the emulator answered."""

    at: float
    fingerprint: str
    outcome: str  # "ok", "rotated", "grace", or an error code such as "KOE322"
    user_id: int | None = None
    new_fingerprint: str | None = None
    retired: bool = False  # the presented token had been rotated out before

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able view."""
        return asdict(self)


@dataclass
class EmulatorStats:
    """Counters tests assert on."""

    codes_issued: int = 0
    code_exchanges: int = 0
    access_tokens_issued: int = 0
    refresh_tokens_issued: int = 0
    refreshes_ok: int = 0
    rotations: int = 0
    koe237: int = 0
    retired_refresh_presented: int = 0
    faults_fired: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    refresh_log: list[RefreshAttempt] = field(default_factory=list)

    @property
    def tokens_issued(self) -> int:
        """Return the number of successful token responses (code exchanges + refreshes)."""
        return self.code_exchanges + self.refreshes_ok

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able snapshot."""
        return {
            "codes_issued": self.codes_issued,
            "code_exchanges": self.code_exchanges,
            "tokens_issued": self.tokens_issued,
            "access_tokens_issued": self.access_tokens_issued,
            "refresh_tokens_issued": self.refresh_tokens_issued,
            "refreshes_ok": self.refreshes_ok,
            "rotations": self.rotations,
            "koe237": self.koe237,
            "retired_refresh_presented": self.retired_refresh_presented,
            "faults_fired": dict(self.faults_fired),
            "errors": dict(self.errors),
            "requests": dict(self.requests),
            "refresh_log": [entry.to_dict() for entry in self.refresh_log],
        }


@dataclass
class _Fault:
    endpoint: str
    kind: str
    count: int | None
    rate: float | None
    delay: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Code:
    user_id: int
    client_id: str
    redirect_uri: str
    challenge: str | None
    scopes: tuple[str, ...]
    expires_at: float
    nonce: str | None
    with_id_token: bool


@dataclass
class _AccessToken:
    user_id: int
    grant_id: str
    expires_at: float
    scopes: tuple[str, ...]


@dataclass
class _RefreshToken:
    user_id: int
    grant_id: str
    expires_at: float
    scopes: tuple[str, ...]
    with_id_token: bool
    nonce: str | None
    retired_at: float | None = None


@dataclass
class _PendingConsent:
    user_id: int
    client_id: str
    redirect_uri: str
    state: str | None
    challenge: str | None
    scopes: tuple[str, ...]
    nonce: str | None
    expires_at: float


def _split_scopes(text: str | None) -> list[str]:
    return [part for part in re.split(r"[,\s]+", text or "") if part]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def _new_token() -> str:
    return secrets.token_urlsafe(48)  # 64 url-safe characters, opaque like Kakao's


def _html_page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>{body}</body></html>"
    )
    return web.Response(status=status, text=text, content_type="text/html")


class KakaoEmulator:
    """An in-memory Kakao (kauth + kapi) with a virtual clock, fault injection and stats."""

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings if settings is not None else EmulatorSettings()
        self.stats = EmulatorStats()
        self.url = ""
        self._offset = 0.0
        self._random = random.Random(self.settings.seed)
        self._users: dict[int, EmulatedUser] = {}
        self._codes: dict[str, _Code] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._pending: dict[str, _PendingConsent] = {}
        self._faults: list[_Fault] = []
        self._inbox: list[dict[str, Any]] = []
        self._issued: list[str] = []  # every token ever issued, for leak scans in tests
        self._access_times: dict[int, deque[float]] = {}
        self._refresh_times: dict[int, deque[float]] = {}
        self._next_consent: Literal["agree", "deny"] | None = None
        self._runner: web.AppRunner | None = None
        self.add_user(DEFAULT_USER_ID, name="default")

    # ------------------------------------------------------------------ clock

    def now(self) -> float:
        """Return the virtual time as a POSIX timestamp (real time plus the advanced offset)."""
        return time.time() + self._offset

    def now_datetime(self) -> datetime:
        """Return the virtual time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.now(), UTC)

    def advance_clock(self, seconds: float) -> None:
        """Move the virtual clock forward (tokens age, codes expire, rate windows slide)."""
        if seconds < 0:
            raise ValueError(f"the emulator clock only moves forward, got {seconds} seconds")
        self._offset += seconds
        self._auto_unlink()

    # ------------------------------------------------------------------ users and app

    def add_user(
        self,
        user_id: int | None = None,
        *,
        name: str | None = None,
        talk_user: bool = True,
        dormant: bool = False,
        sanctioned: bool = False,
    ) -> EmulatedUser:
        """Create (or return the existing) user; ids default to the next free one."""
        if user_id is None:
            user_id = max(self._users, default=DEFAULT_USER_ID) + 1
        if user_id in self._users:
            return self._users[user_id]
        user = EmulatedUser(
            id=user_id,
            name=name or f"user{user_id}",
            talk_user=talk_user,
            dormant=dormant,
            sanctioned=sanctioned,
        )
        self._users[user_id] = user
        return user

    def user(self, key: int | str = DEFAULT_USER_ID) -> EmulatedUser:
        """Return a user by numeric id or name; raise KeyError if unknown."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            return self._users[int(key)]
        for user in self._users.values():
            if user.name == key:
                return user
        raise KeyError(key)

    def _user_for_hint(self, hint: str | None) -> EmulatedUser:
        if not hint:
            return self._users[DEFAULT_USER_ID]
        try:
            return self.user(hint)
        except KeyError:
            if hint.isdigit():
                return self.add_user(int(hint))
            return self.add_user(name=hint)

    def revoke_user_tokens(self, user_id: int) -> int:
        """Drop every access and refresh token of a user (account-state change); return count."""
        doomed_a = [t for t, rec in self._access.items() if rec.user_id == user_id]
        doomed_r = [t for t, rec in self._refresh.items() if rec.user_id == user_id]
        for token in doomed_a:
            del self._access[token]
        for token in doomed_r:
            del self._refresh[token]
        return len(doomed_a) + len(doomed_r)

    def unlink_user(self, user_id: int) -> None:
        """Unlink the user from the app (as via "Connected services"): tokens and consent go."""
        user = self._users[user_id]
        self.revoke_user_tokens(user_id)
        user.linked = False
        user.scopes.clear()

    def delete_user(self, user_id: int) -> None:
        """Delete the Kakao account: unlinked and unusable for new logins."""
        self.unlink_user(user_id)
        self._users[user_id].deleted = True

    def withdraw_scope(self, user_id: int, scope: str = "talk_message") -> None:
        """Withdraw consent for one item; tokens stay valid, the API needing it answers -402."""
        self._users[user_id].scopes.discard(scope)
        for rec in self._access.values():
            if rec.user_id == user_id:
                rec.scopes = tuple(s for s in rec.scopes if s != scope)

    def set_client_secret(self, secret: str | None) -> None:
        """Turn Client Secret off (None) or set it to a new value."""
        self.settings.client_secret = secret

    def regenerate_client_secret(self) -> str:
        """Issue a new client secret (the old one gets KOE010) and return it."""
        secret = secrets.token_urlsafe(24)
        self.settings.client_secret = secret
        return secret

    def remove_redirect_uri(self, uri: str) -> None:
        """Unregister a redirect URI (later authorizes show KOE006)."""
        with contextlib.suppress(ValueError):
            self.settings.redirect_uris.remove(uri)

    def deactivate_app(self, deactivated: bool = True) -> None:
        """Deactivate (or reactivate) the app key: KOE101 on kauth, -401 on kapi."""
        self.settings.deactivated = deactivated

    def set_next_consent(self, decision: Literal["agree", "deny"] | None) -> None:
        """Decide what the user does at the next authorize (overrides the consent mode once)."""
        self._next_consent = decision

    def deny_next_authorize(self) -> None:
        """Make the next authorize end with error=access_denied (the user pressed Cancel)."""
        self.set_next_consent("deny")

    def _auto_unlink(self) -> None:
        if not self.settings.auto_unlink_incomplete_signup:
            return
        deadline = self.now() - self.settings.incomplete_signup_window
        for user in self._users.values():
            if (
                user.linked
                and not user.personal_info_called
                and user.first_login is not None
                and user.first_login < deadline
            ):
                logger.debug("auto-unlinking user %s (no personal-info call in time)", user.id)
                self.unlink_user(user.id)

    # ------------------------------------------------------------------ faults

    def inject(
        self,
        endpoint: str,
        kind: str,
        *,
        count: int | None = 1,
        rate: float | None = None,
        delay: float | None = None,
    ) -> None:
        """Arm a fault on an endpoint ("*" = all): ``count`` times, or with probability ``rate``."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; use one of {sorted(ENDPOINTS)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {sorted(FAULT_KINDS)}")
        if kind == "lost_response" and endpoint not in ("token", "*"):
            raise ValueError("lost_response only makes sense on the token endpoint")
        if rate is not None:
            if not 0 <= rate <= 1:
                raise ValueError(f"rate must be a probability between 0 and 1, got {rate}")
            count = None
        elif count is None or count < 1:
            raise ValueError("give a positive count or a rate")
        resolved = delay if delay is not None else _DEFAULT_DELAY.get(kind, 0.0)
        self._faults.append(_Fault(endpoint, kind, count, rate, resolved))

    def clear_faults(self) -> None:
        """Disarm every fault."""
        self._faults.clear()

    def _take_fault(self, endpoint: str) -> _Fault | None:
        for fault in list(self._faults):
            if fault.endpoint not in (endpoint, "*"):
                continue
            if fault.kind == "lost_response" and endpoint != "token":
                continue
            if fault.rate is not None:
                if self._random.random() < fault.rate:
                    return fault
                continue
            assert fault.count is not None
            fault.count -= 1
            if fault.count <= 0:
                self._faults.remove(fault)
            return fault
        return None

    # ------------------------------------------------------------------ token inspection

    def access_token_valid(self, token: str) -> bool:
        """Return whether kapi would accept this access token right now."""
        record = self._access.get(token)
        return record is not None and record.expires_at > self.now()

    def refresh_token_status(self, token: str) -> Literal["live", "retired", "expired", "unknown"]:
        """Say what the token endpoint thinks of a refresh token (unknown = revoked or never)."""
        record = self._refresh.get(token)
        if record is None:
            return "unknown"
        if record.retired_at is not None:
            return "retired"
        return "live" if record.expires_at > self.now() else "expired"

    def issued_tokens(self) -> list[str]:
        """Return every access and refresh token ever issued, revoked ones included."""
        return list(self._issued)

    # ------------------------------------------------------------------ inbox

    def inbox(self, user_id: int | None = None) -> list[dict[str, Any]]:
        """Return delivered "send to me" messages, optionally of one user, oldest first."""
        return [m for m in self._inbox if user_id is None or m["user_id"] == user_id]

    # ------------------------------------------------------------------ token issuing

    def _rate_window(
        self, times: dict[int, deque[float]], user_id: int, span: float
    ) -> deque[float]:
        queue = times.setdefault(user_id, deque())
        floor = self.now() - span
        while queue and queue[0] <= floor:
            queue.popleft()
        return queue

    def _rate_allows(self, user_id: int, *, access: bool, refresh: bool) -> bool:
        a_limit, a_span = self.settings.access_rate
        r_limit, r_span = self.settings.refresh_rate
        if access and len(self._rate_window(self._access_times, user_id, a_span)) >= a_limit:
            return False
        return not (
            refresh and len(self._rate_window(self._refresh_times, user_id, r_span)) >= r_limit
        )

    def _new_access(self, user_id: int, grant_id: str, scopes: tuple[str, ...]) -> str:
        token = _new_token()
        self._issued.append(token)
        now = self.now()
        self._access[token] = _AccessToken(
            user_id, grant_id, now + self.settings.access_lifetime, scopes
        )
        self._access_times.setdefault(user_id, deque()).append(now)
        self.stats.access_tokens_issued += 1
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
        token = _new_token()
        self._issued.append(token)
        now = self.now()
        life = self.settings.refresh_lifetime if lifetime is None else lifetime
        self._refresh[token] = _RefreshToken(
            user_id, grant_id, now + life, scopes, with_id_token, nonce
        )
        self._refresh_times.setdefault(user_id, deque()).append(now)
        self.stats.refresh_tokens_issued += 1
        return token

    def _id_token(self, user_id: int, nonce: str | None) -> str:
        now = int(self.now())
        header = {"alg": "RS256", "typ": "JWT", "kid": "kakao-tokend-emulator"}
        claims: dict[str, Any] = {
            "iss": self.url or "https://kauth.kakao.com",
            "aud": self.settings.client_id,
            "sub": str(user_id),
            "iat": now,
            "exp": now + int(self.settings.access_lifetime),
            "auth_time": now,
            "nickname": self._users[user_id].name,
        }
        if nonce:
            claims["nonce"] = nonce
        parts = [json.dumps(header).encode(), json.dumps(claims).encode(), secrets.token_bytes(64)]
        return ".".join(_b64url(part) for part in parts)

    def _grant(
        self,
        user_id: int,
        scopes: tuple[str, ...],
        *,
        with_id_token: bool,
        nonce: str | None,
        refresh_lifetime: float | None = None,
    ) -> dict[str, Any]:
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
            "expires_in": int(self.settings.access_lifetime),
            "refresh_token": refresh,
            "refresh_token_expires_in": int(
                self.settings.refresh_lifetime if refresh_lifetime is None else refresh_lifetime
            ),
            "scope": " ".join(scopes),
        }
        if with_id_token:
            body["id_token"] = self._id_token(user_id, nonce)
        self.stats.code_exchanges += 1
        return body

    def _link(self, user: EmulatedUser, requested: list[str]) -> tuple[str, ...]:
        now = self.now()
        if not user.linked:
            user.linked = True
            user.connected_at = now
            user.scopes |= set(self.settings.consent_items)
            if user.first_login is None:
                user.first_login = now
        user.scopes |= set(requested)
        if self.settings.oidc:
            user.scopes.add("openid")
        return tuple(sorted(user.scopes))

    def issue_tokens(
        self,
        user_id: int = DEFAULT_USER_ID,
        *,
        scopes: list[str] | None = None,
        refresh_remaining: float | None = None,
    ) -> dict[str, Any]:
        """Link the user and return a token response directly, skipping authorize (test shortcut).

        ``refresh_remaining`` gives the refresh token a shorter life, e.g. to start inside the
        rotation window. Rate limits are not applied.
        """
        user = self.add_user(user_id)
        granted = self._link(user, scopes or [])
        return self._grant(
            user.id,
            granted,
            with_id_token="openid" in granted,
            nonce=None,
            refresh_lifetime=refresh_remaining,
        )

    # ------------------------------------------------------------------ responses

    def _oauth_error(
        self, error: str, description: str, code: str, status: int = 400
    ) -> web.Response:
        self.stats.errors[code] += 1
        if code == "KOE237":
            self.stats.koe237 += 1
        body = {"error": error, "error_description": description, "error_code": code}
        return web.json_response(body, status=status)

    def _api_error(self, status: int, code: int, msg: str, **extra: Any) -> web.Response:
        self.stats.errors[str(code)] += 1
        headers = {"WWW-Authenticate": "Bearer error=invalid_token"} if status == 401 else None
        return web.json_response(
            {"msg": msg, "code": code, **extra}, status=status, headers=headers
        )

    def _koe_page(self, code: str, message: str) -> web.Response:
        self.stats.errors[code] += 1
        body = (
            f"<h1>Kakao</h1><p class='error'>Admin settings issue ({html.escape(code)})</p>"
            f"<p>{html.escape(message)}</p>"
        )
        return _html_page(f"Error {code}", body, status=400)

    @staticmethod
    def _redirect(uri: str, params: Mapping[str, str | None]) -> web.Response:
        query = urlencode({k: v for k, v in params.items() if v is not None}, quote_via=quote)
        location = uri + ("&" if "?" in uri else "?") + query
        return web.Response(status=302, headers={"Location": location})

    # ------------------------------------------------------------------ kauth handlers

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        settings = self.settings
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
        state = q.get("state")
        challenge = q.get("code_challenge")
        method = q.get("code_challenge_method")
        if (challenge or method) and (method != "S256" or not challenge):
            return self._redirect(
                redirect_uri,
                {
                    "error": "invalid_request",
                    "error_description": "code_challenge_method must be S256 with a code_challenge",
                    "state": state,
                },
            )
        user = self._user_for_hint(q.get("login_hint"))
        requested = _split_scopes(q.get("scope"))
        prompts = _split_scopes(q.get("prompt"))
        decision = self._next_consent
        self._next_consent = None
        if decision == "deny":
            return self._denied(redirect_uri, state)
        needs_consent = not user.linked or not set(requested) <= user.scopes
        if "none" in prompts and needs_consent and decision is None:
            return self._redirect(
                redirect_uri,
                {
                    "error": "consent_required",
                    "error_description": "user consent required.",
                    "state": state,
                },
            )
        pending = _PendingConsent(
            user_id=user.id,
            client_id=settings.client_id,
            redirect_uri=redirect_uri,
            state=state,
            challenge=challenge,
            scopes=tuple(requested),
            nonce=q.get("nonce"),
            expires_at=self.now() + settings.code_ttl,
        )
        if settings.consent == "page" and needs_consent and decision is None:
            request_id = secrets.token_urlsafe(16)
            self._pending[request_id] = pending
            return self._consent_page(request_id, user, requested)
        return self._approve(pending)

    def _consent_page(
        self, request_id: str, user: EmulatedUser, requested: list[str]
    ) -> web.Response:
        items = sorted(set(self.settings.consent_items) | set(requested))
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
        return _html_page("Consent", body)

    async def _decide(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        pending = self._pending.pop(str(form.get("request_id", "")), None)
        if pending is None or pending.expires_at < self.now():
            return self._koe_page("KOE001", "this consent request is unknown or expired")
        if form.get("action") != "agree":
            return self._denied(pending.redirect_uri, pending.state)
        return self._approve(pending)

    def _denied(self, redirect_uri: str, state: str | None) -> web.Response:
        self.stats.errors["access_denied"] += 1
        return self._redirect(
            redirect_uri,
            {"error": "access_denied", "error_description": "User denied access", "state": state},
        )

    def _approve(self, pending: _PendingConsent) -> web.Response:
        user = self._users[pending.user_id]
        granted = self._link(user, list(pending.scopes))
        code = secrets.token_urlsafe(32)
        self._codes[code] = _Code(
            user_id=user.id,
            client_id=pending.client_id,
            redirect_uri=pending.redirect_uri,
            challenge=pending.challenge,
            scopes=granted,
            expires_at=self.now() + self.settings.code_ttl,
            nonce=pending.nonce,
            with_id_token="openid" in granted,
        )
        self.stats.codes_issued += 1
        return self._redirect(pending.redirect_uri, {"code": code, "state": pending.state})

    async def _token(self, request: web.Request) -> web.StreamResponse:
        params: dict[str, str] = dict(request.query)
        if request.can_read_body:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        settings = self.settings
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
        code_text = params.get("code", "")
        code = self._codes.get(code_text)
        if code is None or code.expires_at <= self.now() or code.client_id != params["client_id"]:
            return self._oauth_error(
                "invalid_grant",
                f"authorization code not found for code={fingerprint(code_text)}",
                "KOE320",
            )
        redirect_uri = params.get("redirect_uri")
        if (redirect_uri is None and self.settings.require_redirect_uri) or (
            redirect_uri is not None and redirect_uri != code.redirect_uri
        ):
            return self._oauth_error("invalid_grant", "redirect_uri mismatch", "KOE303")
        if code.challenge is not None:
            verifier = params.get("code_verifier")
            if not verifier or not hmac.compare_digest(_s256(verifier), code.challenge):
                return self._oauth_error(
                    "invalid_grant",
                    "PKCE verification failed (code_verifier)",
                    self.settings.pkce_error_code,
                )
        if not self._rate_allows(code.user_id, access=True, refresh=True):
            return self._oauth_error(
                "invalid_request", "token request rate limit exceeded", "KOE237"
            )
        del self._codes[code_text]
        body = self._grant(
            code.user_id, code.scopes, with_id_token=code.with_id_token, nonce=code.nonce
        )
        return web.json_response(body)

    def _refresh_grant(self, params: Mapping[str, str]) -> web.Response:
        presented = params.get("refresh_token")
        now = self.now()
        if not presented:
            self.stats.refresh_log.append(RefreshAttempt(now, "none", "KOE319"))
            return self._oauth_error("invalid_grant", "refresh_token is required", "KOE319")
        fp = fingerprint(presented)
        record = self._refresh.get(presented)
        retired = record is not None and record.retired_at is not None
        if retired:
            self.stats.retired_refresh_presented += 1
        usable = (
            record is not None
            and record.expires_at > now
            and (
                record.retired_at is None
                or now < record.retired_at + self.settings.old_refresh_grace
            )
        )
        if record is None or not usable:
            self.stats.refresh_log.append(
                RefreshAttempt(now, fp, "KOE322", record.user_id if record else None, None, retired)
            )
            logger.debug("refresh with %s refused: KOE322", fp)
            return self._oauth_error("invalid_grant", "expired_or_invalid_refresh_token", "KOE322")
        rotate = not retired and record.expires_at - now < self.settings.rotation_window
        if not self._rate_allows(record.user_id, access=True, refresh=rotate):
            self.stats.refresh_log.append(
                RefreshAttempt(now, fp, "KOE237", record.user_id, None, retired)
            )
            return self._oauth_error(
                "invalid_request", "token request rate limit exceeded", "KOE237"
            )
        access = self._new_access(record.user_id, record.grant_id, record.scopes)
        body: dict[str, Any] = {
            "token_type": "bearer",
            "access_token": access,
            "expires_in": int(self.settings.access_lifetime),
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
            body["refresh_token_expires_in"] = int(self.settings.refresh_lifetime)
            self.stats.rotations += 1
            new_fp = fingerprint(fresh)
        if self.settings.scope_on_refresh:
            body["scope"] = " ".join(record.scopes)
        if record.with_id_token:
            body["id_token"] = self._id_token(record.user_id, record.nonce)
        self.stats.refreshes_ok += 1
        outcome = "rotated" if rotate else ("grace" if retired else "ok")
        self.stats.refresh_log.append(
            RefreshAttempt(now, fp, outcome, record.user_id, new_fp, retired)
        )
        logger.debug("refresh with %s: %s %s", fp, outcome, new_fp or "")
        return web.json_response(body)

    # ------------------------------------------------------------------ kapi handlers

    def _bearer(self, request: web.Request) -> tuple[str, _AccessToken] | web.Response:
        settings = self.settings
        header = request.headers.get("Authorization")
        if header is None:
            return self._api_error(401, -401, "this access token does not exist")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
            return self._api_error(400, -2, "invalid authorization header; expected Bearer token")
        if settings.deactivated:
            return self._api_error(
                401, -401, f"appKey({settings.client_id}) is already deactivated"
            )
        if settings.allowed_ips is not None and request.remote not in settings.allowed_ips:
            return self._api_error(
                401, -401, f"ip mismatched! callerIp={request.remote}. check out registered ips."
            )
        record = self._access.get(token)
        if record is None:
            return self._api_error(401, -401, "this access token does not exist")
        if record.expires_at <= self.now():
            return self._api_error(401, -401, "this access token is already expired")
        user = self._users[record.user_id]
        if user.dormant:
            return self._api_error(400, -103, "dormant or nonexistent kakao account")
        if user.sanctioned:
            return self._api_error(403, -4, "account is sanctioned")
        return token, record

    async def _access_token_info(self, request: web.Request) -> web.StreamResponse:
        checked = self._bearer(request)
        if isinstance(checked, web.Response):
            return checked
        _, record = checked
        remaining = max(0, int(record.expires_at - self.now()))
        return web.json_response(
            {"id": record.user_id, "expires_in": remaining, "app_id": self.settings.app_id}
        )

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        checked = self._bearer(request)
        if isinstance(checked, web.Response):
            return checked
        _, record = checked
        for table in (self._access, self._refresh):
            doomed = [t for t, rec in table.items() if rec.grant_id == record.grant_id]
            for token in doomed:
                del table[token]
        return web.json_response({"id": record.user_id})

    async def _unlink(self, request: web.Request) -> web.StreamResponse:
        checked = self._bearer(request)
        if isinstance(checked, web.Response):
            return checked
        _, record = checked
        self.unlink_user(record.user_id)
        return web.json_response({"id": record.user_id})

    async def _user_me(self, request: web.Request) -> web.StreamResponse:
        checked = self._bearer(request)
        if isinstance(checked, web.Response):
            return checked
        _, record = checked
        user = self._users[record.user_id]
        user.personal_info_called = True
        connected = datetime.fromtimestamp(user.connected_at or self.now(), UTC)
        body: dict[str, Any] = {
            "id": user.id,
            "connected_at": connected.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        }
        if user.scopes & {"profile", "profile_nickname"}:
            body["properties"] = {"nickname": user.name}
            body["kakao_account"] = {
                "profile_nickname_needs_agreement": False,
                "profile": {"nickname": user.name, "is_default_nickname": False},
            }
        return web.json_response(body)

    async def _memo(self, request: web.Request) -> web.StreamResponse:
        checked = self._bearer(request)
        if isinstance(checked, web.Response):
            return checked
        _, record = checked
        user = self._users[record.user_id]
        if "talk_message" not in user.scopes:
            return self._api_error(
                403,
                -402,
                "insufficient scopes.",
                api_type="TALK_MEMO_DEFAULT_SEND",
                required_scopes=["talk_message"],
                allowed_scopes=sorted(user.scopes),
            )
        form = await request.post()
        raw = form.get("template_object")
        if not isinstance(raw, str):
            return self._api_error(400, -2, "template_object is required")
        try:
            template = json.loads(raw)
        except ValueError:
            return self._api_error(400, -2, "template_object is not valid JSON")
        problem = self._template_problem(template)
        if problem:
            return self._api_error(400, -2, problem)
        if not user.talk_user:
            return self._api_error(400, -501, "not a kakao talk user")
        self._inbox.append(
            {
                "user_id": user.id,
                "at": self.now(),
                "text": template.get("text"),
                "template": template,
            }
        )
        return web.json_response({"result_code": 0})

    def _template_problem(self, template: Any) -> str | None:
        if not isinstance(template, dict):
            return "template_object must be a JSON object"
        if "object_type" not in template:
            return "template_object.object_type is required"
        if template["object_type"] != "text":
            return None  # other template types are accepted without inspection
        text = template.get("text")
        if not isinstance(text, str) or not text:
            return "template_object.text is required"
        if len(text) > self.settings.memo_text_limit:
            return f"template_object.text is longer than {self.settings.memo_text_limit} characters"
        if not isinstance(template.get("link"), dict):
            return "template_object.link is required"
        return None

    # ------------------------------------------------------------------ fault middleware

    @web.middleware
    async def _fault_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = _ENDPOINT_BY_PATH.get(request.path)
        if endpoint is None:
            return await handler(request)
        self.stats.requests[endpoint] += 1
        self._auto_unlink()
        fault = self._take_fault(endpoint)
        if fault is None:
            return await handler(request)
        self.stats.faults_fired[fault.kind] += 1
        logger.debug("fault %s fired on %s", fault.kind, endpoint)
        return await self._apply_fault(fault, endpoint, request, handler)

    async def _apply_fault(
        self, fault: _Fault, endpoint: str, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        kind = fault.kind
        if kind in ("timeout", "slow"):
            await asyncio.sleep(fault.delay)
            return await handler(request)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if kind == "http500":
            return web.Response(status=500, text="Internal Server Error")
        if kind == "http502_html":
            page = "<h1>502 Bad Gateway</h1><p>The upstream server is unavailable.</p>"
            return _html_page("502 Bad Gateway", page, status=502)
        if kind == "http503":
            return web.Response(status=503, text="Service Unavailable")
        if kind == "koe003":
            return self._oauth_error("server_error", "temporary server error", "KOE003", 500)
        if kind == "koe237":
            return self._oauth_error(
                "invalid_request", "token request rate limit exceeded", "KOE237"
            )
        if kind == "non_json":
            return web.Response(status=200, text="hello from a captive portal")
        if kind == "reset":
            return await self._abort(request)
        if kind == "truncated":
            payload = json.dumps(
                {"token_type": "bearer", "access_token": _new_token(), "expires_in": 21599}
            ).encode()
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            return await self._abort(request)
        if kind == "lost_response":
            await handler(request)  # the server commits (refresh, rotation) ...
            return await self._abort(request)  # ... and the client never hears about it
        status, code, msg = _KAPI_FAULTS[kind]
        return self._api_error(status, code, msg)

    @staticmethod
    async def _abort(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Nothing can be sent any more; aiohttp drops the write to the closed transport.
        raise asyncio.CancelledError

    # ------------------------------------------------------------------ control API

    async def _ctl_faults(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            self.clear_faults()
            return web.json_response({"faults": []})
        if request.method == "GET":
            return web.json_response({"faults": [f.to_dict() for f in self._faults]})
        data = await self._json_body(request)
        try:
            self.inject(
                str(data.get("endpoint", "*")),
                str(data.get("kind", "")),
                count=int(data["count"]) if data.get("count") is not None else 1,
                rate=float(data["rate"]) if data.get("rate") is not None else None,
                delay=float(data["delay"]) if data.get("delay") is not None else None,
            )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"faults": [f.to_dict() for f in self._faults]}, status=201)

    async def _ctl_clock(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            data = await self._json_body(request)
            try:
                self.advance_clock(float(data.get("advance", 0)))
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(
            {"now": self.now(), "iso": self.now_datetime().isoformat(), "offset": self._offset}
        )

    async def _ctl_inbox(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("user_id")
        user_id = int(raw) if raw and raw.isdigit() else None
        return web.json_response({"messages": self.inbox(user_id)})

    async def _ctl_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats.to_dict())

    async def _ctl_users(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            data = await self._json_body(request)
            user = self.add_user(
                int(data["id"]) if data.get("id") is not None else None,
                name=data.get("name"),
                talk_user=bool(data.get("talk_user", True)),
                dormant=bool(data.get("dormant", False)),
                sanctioned=bool(data.get("sanctioned", False)),
            )
            return web.json_response(user.to_dict(), status=201)
        return web.json_response({"users": [u.to_dict() for u in self._users.values()]})

    async def _ctl_user_action(self, request: web.Request) -> web.StreamResponse:
        try:
            user = self.user(int(request.match_info["user_id"]))
        except (KeyError, ValueError):
            return web.json_response({"error": "unknown user id"}, status=404)
        action = request.match_info["action"]
        data = await self._json_body(request)
        if action == "unlink":
            self.unlink_user(user.id)
        elif action == "revoke":
            self.revoke_user_tokens(user.id)
        elif action == "withdraw":
            self.withdraw_scope(user.id, str(data.get("scope", "talk_message")))
        elif action == "delete":
            self.delete_user(user.id)
        elif action == "flags":
            for name in ("dormant", "sanctioned", "talk_user"):
                if name in data:
                    setattr(user, name, bool(data[name]))
        else:
            return web.json_response(
                {"error": "action must be unlink, revoke, withdraw, delete or flags"}, status=404
            )
        return web.json_response(user.to_dict())

    async def _ctl_app(self, request: web.Request) -> web.StreamResponse:
        settings = self.settings
        if request.method == "POST":
            data = await self._json_body(request)
            if "client_secret" in data:
                secret = data["client_secret"]
                if secret == "regenerate":
                    self.regenerate_client_secret()
                else:
                    self.set_client_secret(None if secret is None else str(secret))
            if "deactivated" in data:
                self.deactivate_app(bool(data["deactivated"]))
            if "redirect_uris" in data:
                settings.redirect_uris = [str(uri) for uri in data["redirect_uris"]]
            if "oidc" in data:
                settings.oidc = bool(data["oidc"])
            if "allowed_ips" in data:
                ips = data["allowed_ips"]
                settings.allowed_ips = None if ips is None else [str(ip) for ip in ips]
            if "auto_unlink_incomplete_signup" in data:
                settings.auto_unlink_incomplete_signup = bool(data["auto_unlink_incomplete_signup"])
        return web.json_response(
            {
                "client_id": settings.client_id,
                "client_secret": settings.client_secret,
                "app_id": settings.app_id,
                "redirect_uris": settings.redirect_uris,
                "oidc": settings.oidc,
                "deactivated": settings.deactivated,
                "allowed_ips": settings.allowed_ips,
                "auto_unlink_incomplete_signup": settings.auto_unlink_incomplete_signup,
            }
        )

    async def _ctl_settings(self, request: web.Request) -> web.StreamResponse:
        """Change numeric/boolean settings at runtime (lifetimes, window, rates, grace ...)."""
        settings = self.settings
        if request.method == "POST":
            data = await self._json_body(request)
            known = {f.name for f in fields(settings)}
            for key, value in data.items():
                if key not in known or key in ("client_secret", "seed"):
                    return web.json_response({"error": f"unknown setting {key!r}"}, status=400)
                current = getattr(settings, key)
                if isinstance(current, tuple):
                    value = (int(value[0]), float(value[1]))
                elif isinstance(current, bool):
                    value = bool(value)
                elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
                    return web.json_response({"error": f"{key} must be a number"}, status=400)
                setattr(settings, key, value)
        snapshot = asdict(settings)
        snapshot.pop("client_secret")
        return web.json_response(snapshot)

    async def _ctl_consent(self, request: web.Request) -> web.StreamResponse:
        data = await self._json_body(request)
        decision = data.get("next")
        if decision not in ("agree", "deny", None):
            return web.json_response({"error": "next must be 'agree', 'deny' or null"}, status=400)
        self.set_next_consent(decision)
        return web.json_response({"next": decision})

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    # ------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving kauth, kapi and /_emulator/ paths."""
        app = web.Application(middlewares=[self._fault_middleware])
        app.router.add_get("/oauth/authorize", self._authorize)
        app.router.add_post("/oauth/authorize/decide", self._decide)
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/v1/user/access_token_info", self._access_token_info)
        app.router.add_post("/v1/user/logout", self._logout)
        app.router.add_post("/v1/user/unlink", self._unlink)
        app.router.add_get("/v2/user/me", self._user_me)
        app.router.add_post("/v2/user/me", self._user_me)
        app.router.add_post("/v2/api/talk/memo/default/send", self._memo)
        app.router.add_route("*", "/_emulator/faults", self._ctl_faults)
        app.router.add_route("*", "/_emulator/clock", self._ctl_clock)
        app.router.add_get("/_emulator/inbox", self._ctl_inbox)
        app.router.add_get("/_emulator/stats", self._ctl_stats)
        app.router.add_route("*", "/_emulator/users", self._ctl_users)
        app.router.add_post("/_emulator/users/{user_id}/{action}", self._ctl_user_action)
        app.router.add_route("*", "/_emulator/app", self._ctl_app)
        app.router.add_route("*", "/_emulator/settings", self._ctl_settings)
        app.router.add_post("/_emulator/consent", self._ctl_consent)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 = any free port) and return the base URL."""
        # A short shutdown_timeout so a request held by a "timeout" fault cannot stall stop().
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = int(self._runner.addresses[0][1])
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        """Stop serving (in-flight requests get 0.5 s)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def describe(self) -> str:
        """Return one line saying where the emulator listens and which credentials it accepts."""
        secret = self.settings.client_secret
        return (
            f"Kakao emulator listening on {self.url} — client_id={self.settings.client_id} "
            f"client_secret={secret if secret is not None else '(off)'} "
            f"redirect_uris={','.join(self.settings.redirect_uris)}"
        )


@asynccontextmanager
async def running_emulator(
    settings: EmulatorSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[KakaoEmulator]:
    """Run an emulator for the duration of the block; ``emu.url`` is its base URL."""
    emulator = KakaoEmulator(settings)
    await emulator.start(host, port)
    try:
        yield emulator
    finally:
        await emulator.stop()


def serve_emulator(
    host: str = "127.0.0.1",
    port: int = 8700,
    settings: EmulatorSettings | None = None,
    *,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve the emulator until SIGINT/SIGTERM (blocking); ``announce`` gets the one-line banner."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with running_emulator(settings, host=host, port=port) as emulator:
            (announce or logger.info)(emulator.describe())
            await stop.wait()

    asyncio.run(main())
