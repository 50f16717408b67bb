"""What the emulated Kakao knows: settings, users, codes, tokens, inbox, stats, virtual clock."""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

logger = logging.getLogger(__name__)

DEFAULT_USER_ID = 1234567890
ConsentMode = Literal["auto", "page"]
ConsentDecision = Literal["agree", "deny"]


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
    #: Answer a rotation's new refresh token with its ``refresh_token_expires_in`` (Kakao's
    #: docs list both; False tests a client that must keep a new token without its expiry).
    refresh_expiry_on_rotation: bool = True
    #: Send ``expires_in`` and ``refresh_token_expires_in`` as JSON strings (``"21599"``),
    #: as some proxies and gateways re-encode numbers.
    lifetimes_as_strings: bool = False
    #: Fields left out of every token answer, login and refresh (e.g. ``["expires_in"]``).
    omit_token_fields: list[str] = field(default_factory=list)
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
    #: When (the emulator's clock) each successful /v1/user/logout revoked its token set.
    logout_log: list[float] = field(default_factory=list)

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
            "logout_log": list(self.logout_log),
        }


@dataclass
class AuthorizationCode:
    """A code handed out by authorize, waiting for its one exchange."""

    user_id: int
    client_id: str
    redirect_uri: str
    challenge: str | None
    scopes: tuple[str, ...]
    expires_at: float
    nonce: str | None
    with_id_token: bool


@dataclass
class AccessTokenRecord:
    """What kapi knows about one access token; ``grant_id`` ties it to its login."""

    user_id: int
    grant_id: str
    expires_at: float
    scopes: tuple[str, ...]


@dataclass
class RefreshTokenRecord:
    """What the token endpoint knows about one refresh token (kept after rotation, retired)."""

    user_id: int
    grant_id: str
    expires_at: float
    scopes: tuple[str, ...]
    with_id_token: bool
    nonce: str | None
    retired_at: float | None = None


@dataclass
class PendingConsent:
    """An authorize request shown the consent page, waiting for Agree or Cancel."""

    user_id: int
    client_id: str
    redirect_uri: str
    state: str | None
    challenge: str | None
    scopes: tuple[str, ...]
    nonce: str | None
    expires_at: float


def new_token() -> str:
    """Return a fresh opaque token: 64 url-safe characters, like Kakao's."""
    return secrets.token_urlsafe(48)


class EmulatorState:
    """The emulated Kakao's memory and clock, with the actions users and app admins take on it.

    The kauth and kapi modules read and change the tables (``users``, ``codes``,
    ``access_tokens``, ``refresh_tokens`` ...); tests use the methods.
    """

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self.settings = settings if settings is not None else EmulatorSettings()
        self.stats = EmulatorStats()
        self.url = ""
        self.users: dict[int, EmulatedUser] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.access_tokens: dict[str, AccessTokenRecord] = {}
        self.refresh_tokens: dict[str, RefreshTokenRecord] = {}
        self.pending_consents: dict[str, PendingConsent] = {}
        self.messages: list[dict[str, Any]] = []
        self.issued: list[str] = []  # every token ever issued, for leak scans in tests
        # Issue times per user, for the rolling rate limits of the token endpoint.
        self.access_times: dict[int, deque[float]] = {}
        self.refresh_times: dict[int, deque[float]] = {}
        self.next_consent: ConsentDecision | None = None
        self._offset = 0.0
        self.add_user(DEFAULT_USER_ID, name="default")

    # ------------------------------------------------------------------ clock

    def now(self) -> float:
        """Return the virtual time as a POSIX timestamp (real time plus the advanced offset)."""
        return time.time() + self._offset

    def now_datetime(self) -> datetime:
        """Return the virtual time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.now(), UTC)

    @property
    def clock_offset(self) -> float:
        """Return how many seconds the virtual clock has been advanced in total."""
        return self._offset

    def advance_clock(self, seconds: float) -> None:
        """Move the virtual clock forward (tokens age, codes expire, rate windows slide)."""
        if seconds < 0:
            raise ValueError(f"the emulator clock only moves forward, got {seconds} seconds")
        self._offset += seconds
        self._auto_unlink_incomplete_signups()

    # ------------------------------------------------------------------ users

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
            user_id = max(self.users, default=DEFAULT_USER_ID) + 1
        if user_id in self.users:
            return self.users[user_id]
        user = EmulatedUser(
            id=user_id,
            name=name or f"user{user_id}",
            talk_user=talk_user,
            dormant=dormant,
            sanctioned=sanctioned,
        )
        self.users[user_id] = user
        return user

    def user(self, key: int | str = DEFAULT_USER_ID) -> EmulatedUser:
        """Return a user by numeric id or name; raise KeyError if unknown."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            return self.users[int(key)]
        for user in self.users.values():
            if user.name == key:
                return user
        raise KeyError(key)

    def revoke_user_tokens(self, user_id: int) -> int:
        """Drop every access and refresh token of a user (account-state change); return count."""
        doomed_a = [t for t, rec in self.access_tokens.items() if rec.user_id == user_id]
        doomed_r = [t for t, rec in self.refresh_tokens.items() if rec.user_id == user_id]
        for token in doomed_a:
            del self.access_tokens[token]
        for token in doomed_r:
            del self.refresh_tokens[token]
        return len(doomed_a) + len(doomed_r)

    def unlink_user(self, user_id: int) -> None:
        """Unlink the user from the app (as via "Connected services"): tokens and consent go."""
        user = self.users[user_id]
        self.revoke_user_tokens(user_id)
        user.linked = False
        user.scopes.clear()

    def delete_user(self, user_id: int) -> None:
        """Delete the Kakao account: unlink it and mark it ``deleted``.

        The mark is informational: a later authorize with this user's ``login_hint`` still
        links it again.
        """
        self.unlink_user(user_id)
        self.users[user_id].deleted = True

    def withdraw_scope(self, user_id: int, scope: str = "talk_message") -> None:
        """Withdraw consent for one item; tokens stay valid, the API needing it answers -402."""
        self.users[user_id].scopes.discard(scope)
        for rec in self.access_tokens.values():
            if rec.user_id == user_id:
                rec.scopes = tuple(s for s in rec.scopes if s != scope)

    def _auto_unlink_incomplete_signups(self) -> None:
        """Unlink users who made no personal-info call in time (when that rule is switched on).

        Kakao unlinks, daily, users who did not call a personal-info API such as /v2/user/me
        within 24 hours of their first login; the emulator checks at each request and clock move.
        """
        if not self.settings.auto_unlink_incomplete_signup:
            return
        deadline = self.now() - self.settings.incomplete_signup_window
        for user in self.users.values():
            if (
                user.linked
                and not user.personal_info_called
                and user.first_login is not None
                and user.first_login < deadline
            ):
                logger.debug("auto-unlinking user %s (no personal-info call in time)", user.id)
                self.unlink_user(user.id)

    # ------------------------------------------------------------------ app (admin console)

    def set_client_secret(self, secret: str | None) -> None:
        """Turn Client Secret off (None) or set it to a new value."""
        self.settings.client_secret = secret

    def regenerate_client_secret(self) -> str:
        """Issue a new client secret (the old one gets KOE010) and return it."""
        secret = secrets.token_urlsafe(24)
        self.settings.client_secret = secret
        return secret

    def deactivate_app(self, deactivated: bool = True) -> None:
        """Deactivate (or reactivate) the app key: KOE101 on kauth, -401 on kapi."""
        self.settings.deactivated = deactivated

    def set_next_consent(self, decision: ConsentDecision | None) -> None:
        """Decide what the user does at the next authorize (overrides the consent mode once)."""
        self.next_consent = decision

    def deny_next_authorize(self) -> None:
        """Make the next authorize end with error=access_denied (the user pressed Cancel)."""
        self.set_next_consent("deny")

    # ------------------------------------------------------------------ inspection

    def access_token_valid(self, token: str) -> bool:
        """Return whether kapi would accept this access token right now."""
        record = self.access_tokens.get(token)
        return record is not None and record.expires_at > self.now()

    def refresh_token_status(self, token: str) -> Literal["live", "retired", "expired", "unknown"]:
        """Say what the token endpoint thinks of a refresh token (unknown = revoked or never)."""
        record = self.refresh_tokens.get(token)
        if record is None:
            return "unknown"
        if record.retired_at is not None:
            return "retired"
        return "live" if record.expires_at > self.now() else "expired"

    def issued_tokens(self) -> list[str]:
        """Return every access and refresh token ever issued, revoked ones included."""
        return list(self.issued)

    def inbox(self, user_id: int | None = None) -> list[dict[str, Any]]:
        """Return delivered "send to me" messages, optionally of one user, oldest first."""
        return [m for m in self.messages if user_id is None or m["user_id"] == user_id]
