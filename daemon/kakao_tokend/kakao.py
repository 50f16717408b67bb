"""KakaoClient: the only code that talks HTTP to Kakao; maps every failure onto errors.py.

The client is a thin facade over one shared :class:`aiohttp.ClientSession`. Every request gets
an explicit :class:`aiohttp.ClientTimeout`, the body is always read *before* the outcome is
classified (Kakao's ``error_code`` decides whether a failure is permanent), and nothing that
leaves this module is an aiohttp exception.

Failure classification (first matching row wins; U = KakaoUnavailable, amb = ambiguous)::

    where        condition                                          raised as
    -----------  -------------------------------------------------  ----------------------------
    transport    connection refused, DNS failure, connect timeout   U(amb=False)
    transport    TLS/certificate failure                            U(amb=False)
    transport    invalid URL                                        KakaoConfigError
    transport    read/total timeout, reset, disconnect, truncated   U(amb=True)
    kauth token  200 without expires_in, no new refresh token       asked of access_token_info
    kauth token  200, new refresh token, broken access part         PartialRefresh (a U carrying
                                                                    the salvaged token set)
    any          HTTP 200, body not JSON / expected fields missing  U(amb=True)
    kauth token  KOE322, KOE320                                     ReloginRequired
    kauth        KOE010 (client secret), KOE101 (REST API key),     KakaoConfigError (+ hint)
                 KOE303/KOE006 (redirect URI), KOE001/002/004/005/
                 007/008/009, KOE201/202, KOE319 (bug)
    kauth        KOE003 (temporary), KOE237 (rate limit:            U(amb only for 5xx)
                 rate_limited; the pause is the refresher's)
    kauth        no known code, error == invalid_client,            KakaoConfigError
                 misconfigured, unauthorized_client,
                 unsupported_grant_type, invalid_scope
    kauth        no known code, error == invalid_grant (4xx)        ReloginRequired
    kapi         -401 "mismatched" / "deactivated"                  KakaoConfigError
    kapi         -401 otherwise (token unknown or expired), or a    AccessTokenRejected, a
                 non-JSON 401 whose WWW-Authenticate says           ReloginRequired: refresh
                 invalid_token                                      once, then it really is one
    kapi         -101 (not linked), -103 (dormant)                  ReloginRequired
    kapi         -3 -5 -9 -11 -12 -903                              KakaoConfigError
    kapi         -1 -7 -10 -603 -9798                               U(amb only for 5xx;
                                                                    -10 rate_limited)
    kapi         -402 (consent), -501, -530..-536 (quotas),         KakaoRequestRejected
                 -2 -4 -6 -8 -201 -406
    memo send    any other 400                                      KakaoRequestRejected
    any          HTTP 5xx without a better code                     U(amb=True)
    any          HTTP 429 (Retry-After kept)                        U(amb=False, rate_limited)
    any          error answer whose body is not JSON                U(amb=True)
    any          any other error (unknown code)                     U(amb=False), raw code in
                                                                    the message

``ambiguous`` means the request may have been processed by Kakao (for a refresh: the refresh
token may have rotated). Messages never contain a token, the client secret, the authorization
code or the PKCE verifier; Kakao's ``error_description`` is only quoted after those are
redacted, and never for KOE320 (whose description echoes the code). What each code means at
Kakao, and where that is documented: docs/kakao.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from . import __version__
from .config import KakaoApp, RefreshPolicy
from .errors import (
    KAKAO_CONFIG_CODES,
    KakaoConfigError,
    KakaoError,
    KakaoRequestRejected,
    KakaoUnavailable,
    PartialRefresh,
    ReloginRequired,
)
from .state import parse_json
from .tokens import (
    Clock,
    PartialTokenResponse,
    TokenResponseError,
    TokenSet,
    fingerprint,
    format_duration,
    utcnow,
)

__all__ = [
    "AccessTokenInfo",
    "AccessTokenRejected",
    "KakaoClient",
    "create_session",
    "new_pkce_pair",
    "new_state",
]

log = logging.getLogger(__name__)

USER_AGENT = f"kakao-tokend/{__version__}"

TOKEN_PATH = "/oauth/token"
AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_INFO_PATH = "/v1/user/access_token_info"
USER_ME_PATH = "/v2/user/me"
LOGOUT_PATH = "/v1/user/logout"
UNLINK_PATH = "/v1/user/unlink"
MEMO_PATH = "/v2/api/talk/memo/default/send"

#: Kakao's limit for the text of a text template.
MEMO_TEXT_LIMIT = 200
#: Longest piece of Kakao's own error text we quote.
_QUOTE_LIMIT = 160

# A ReloginRequired carries no "run `kakao-tokend login`" hint: this client does not know the
# account, so the command is added once, with the right --account, by whoever reports the error
# (refresher.login_command). Hints here only add what a login alone does not fix.


class AccessTokenRejected(ReloginRequired):
    """kapi answered -401 for an unknown or expired access token.

    Callers holding a refresh token should refresh once and retry; if the fresh access token
    is rejected too, treat it as the :class:`ReloginRequired` it derives from.
    """


def new_pkce_pair() -> tuple[str, str]:
    """Return a fresh PKCE (code_verifier, S256 code_challenge) pair (RFC 7636)."""
    verifier = secrets.token_urlsafe(64)  # 86 characters from the unreserved set
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


def new_state() -> str:
    """Return a fresh, unguessable OAuth ``state`` value."""
    return secrets.token_urlsafe(24)


#: Connections the process-wide HTTP session keeps open at most (aiohttp queues the rest).
CONNECTION_LIMIT = 10


def create_session() -> aiohttp.ClientSession:
    """Create the process-wide HTTP session; call inside a running event loop.

    The connector uses the threaded (getaddrinfo) resolver on purpose, even if aiodns happens
    to be installed, so /etc/hosts and systemd-resolved are honoured and no c-ares cache can
    serve stale addresses. There is no session-level ``raise_for_status``: the body decides.
    """
    connector = aiohttp.TCPConnector(
        resolver=aiohttp.ThreadedResolver(),
        limit=CONNECTION_LIMIT,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=30, connect=10),
        raise_for_status=False,
    )


@dataclass(frozen=True)
class AccessTokenInfo:
    """What ``/v1/user/access_token_info`` says about an access token."""

    user_id: int
    #: Seconds the access token remains valid, counted from the answer.
    expires_in: int
    app_id: int | None


# --- classification tables ----------------------------------------------------------------

_KOE_RELOGIN: dict[str, str] = {
    "KOE320": "the authorization code is unknown, already used or expired",
    "KOE322": "the refresh token is expired, revoked or was replaced by a rotation",
}

_REDIRECT_HINT = (
    "the redirect URI must exactly match one registered for the REST API key in the Kakao "
    "developer console (App > Platform keys > REST API key > Redirect URI), and the same value "
    "must be used for authorize and token requests"
)

#: The hint for each configuration code (what it means: errors.KAKAO_CONFIG_CODES).
_KOE_HINTS: dict[str, str] = {
    "KOE004": "turn Kakao Login on in the Kakao developer console",
    "KOE005": "add the user as a team member or publish the app",
    "KOE006": _REDIRECT_HINT,
    "KOE008": "use the app's REST API key as rest_api_key",
    "KOE009": "check the platform settings of the app in the Kakao developer console",
    "KOE010": "check client_secret, and whether Client Secret is ON or OFF for the REST API key in"
    " the Kakao developer console (a regenerated secret must be copied again)",
    "KOE101": "check rest_api_key: it must be the app's REST API key from the Kakao developer"
    " console",
    "KOE201": "this is a bug in kakao-tokend; please report it",
    "KOE202": "this is a bug in kakao-tokend; please report it",
    "KOE303": _REDIRECT_HINT,
    "KOE319": "this is a bug in kakao-tokend; please report it",
}
#: The KOE codes that blame the app's configuration: (meaning, hint).
_KOE_CONFIG: dict[str, tuple[str, str | None]] = {
    code: (meaning.render("en"), _KOE_HINTS.get(code))
    for code, meaning in KAKAO_CONFIG_CODES.items()
    if code.startswith("KOE")
}

# OAuth ``error`` values (as Kakao's SDKs list them) that blame the app's setup: without a
# known KOE code they are still a configuration error, which no retry fixes.
_OAUTH_CONFIG: dict[str, str] = {
    "misconfigured": "the app's platform or key settings do not fit this request",
    "unauthorized_client": "this app may not use this grant",
    "unsupported_grant_type": "the grant type is not supported",
    "invalid_scope": "a requested scope is not available to this app",
}

_KOE_UNAVAILABLE: dict[str, str] = {
    "KOE003": "temporary Kakao authorization server error",
    "KOE237": "token issuance rate limit exceeded",
}

_KAPI_RELOGIN: dict[int, tuple[str, str | None]] = {
    -101: ("the user is not linked to this app (unlinked)", None),
    -103: (
        "the Kakao account is dormant or no longer exists",
        "the user must reactivate the Kakao account first",
    ),
}

_KAPI_CONFIG: dict[int, str] = {
    -3: "a required feature or setting is not enabled for this app",
    -5: "the app has no permission for this API",
    -9: "this API has been discontinued",
    -11: "the paid-API spending limit has been reached",
    -12: "the app or its developer is sanctioned",
    -903: "the app key belongs to an unregistered developer",
}

_KAPI_UNAVAILABLE: dict[int, str] = {
    -1: "temporary Kakao internal error",
    -7: "Kakao service maintenance or internal problem",
    -10: "API call quota exceeded",
    -603: "Kakao internal timeout",
    -9798: "Kakao service maintenance",
}

_CONSENT_HINT = (
    "log in again granting the Kakao Talk message consent: "
    "`kakao-tokend login --scope talk_message`"
)

_KAPI_REJECTED: dict[int, tuple[str, str | None]] = {
    -2: ("bad or missing request parameter", None),
    -4: ("the Kakao account is restricted from this action", None),
    -6: ("the action is not allowed", None),
    -8: ("invalid request header", None),
    -201: ("unknown user property key", None),
    -402: ("the user has not consented to this API", _CONSENT_HINT),
    -406: ("the app does not allow users under 14", None),
    -501: ("the user is not a Kakao Talk user", None),
    -530: ("the recipient refuses messages", None),
    -531: ("monthly message quota exceeded", None),
    -532: ("daily sender message quota exceeded", None),
    -533: ("daily recipient message quota exceeded", None),
    -534: ("message quota exceeded", None),
    -535: ("message quota exceeded", None),
    -536: ("daily sender/recipient message quota exceeded", None),
}

_CONFIG_401_MARKERS = ("mismatched", "deactivated")


def rejects_the_app(msg: str) -> bool:
    """Whether a kapi -401's ``msg`` is about the app, not the access token: its key is
    deactivated, or a domain, key hash, bundle id or the caller's IP is not the registered
    one. No refresh can help (the proxy, api.py, reads Kakao's answers with this too)."""
    lowered = msg.lower()
    return any(marker in lowered for marker in _CONFIG_401_MARKERS)


#: A request's deadline found running this much of its wait late did not see Kakao hang: the
#: process was stopped (SIGSTOP, a frozen VM) or its loop stalled (answer_within).
LATE_DEADLINE_SHARE = 0.25
#: How many more turns of the event loop such a deadline gives the request: enough to take
#: an answer already read from the socket (the loop runs the socket's callback before the
#: late timer's, then the request's task), and no time for anything new to happen.
LATE_DEADLINE_TURNS = 5


@contextlib.asynccontextmanager
async def answer_within(seconds: float) -> AsyncIterator[None]:
    """Like ``asyncio.timeout(seconds)``, except for a deadline that runs out late.

    A process stopped while Kakao answered finds, when it runs again, the answer in its
    socket and the deadline past, both at once; the deadline's callback ran first, and a
    rotated refresh token that had arrived was thrown away as a hang (then KOE322). A
    deadline that fires more than :data:`LATE_DEADLINE_SHARE` of the wait late therefore
    lets the loop turn :data:`LATE_DEADLINE_TURNS` more times before it ends the request:
    what had arrived is taken, and a request with no answer still ends at once (a fleet
    node woken from a stop must record that failure before it re-reads the store, which
    keeps its alerts for the tokens from before the stop quiet, fleet/alertshare.py).
    """
    loop = asyncio.get_running_loop()
    due = loop.time() + seconds
    turns = 0
    handle: asyncio.Handle
    async with asyncio.timeout(None) as limit:

        def expire() -> None:
            nonlocal turns, handle
            late = turns > 0 or loop.time() - due > seconds * LATE_DEADLINE_SHARE
            if late and turns < LATE_DEADLINE_TURNS:
                turns += 1
                handle = loop.call_soon(expire)
                return
            limit.reschedule(loop.time())

        handle = loop.call_at(due, expire)
        try:
            yield
        finally:
            handle.cancel()


def _kauth_error_body(body: Mapping[str, Any] | None) -> bool:
    """Whether a token endpoint's JSON is Kakao's error shape (``error``/``error_code``, no
    access token). Kakao does not document the HTTP status of its KOE errors, so the body
    decides: a 200 carrying KOE322 is a dead refresh token, not a broken answer."""
    if body is None or "access_token" in body:
        return False
    return isinstance(body.get("error_code"), str) or isinstance(body.get("error"), str)


def _kapi_error_body(body: Mapping[str, Any] | None) -> bool:
    """Whether a kapi JSON is its error shape: a negative ``code`` with a ``msg`` (what the
    status says is not what decides, as for kauth)."""
    if body is None:
        return False
    code = body.get("code")
    return (
        isinstance(code, int)
        and not isinstance(code, bool)
        and code < 0
        and isinstance(body.get("msg"), str)
    )


_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(code|token|access_token|refresh_token|client_secret|secret|code_verifier|verifier)"
    r"(\s*[=:]\s*)\S+"
)


def _redact(text: str, secrets_: Sequence[str]) -> str:
    """Remove every sent secret and ``name=value`` secret from Kakao's text; shorten it."""
    for secret in secrets_:
        if secret:
            text = text.replace(secret, fingerprint(secret))
    text = _SECRET_ASSIGNMENT.sub(r"\1\2<redacted>", text)
    text = " ".join(text.split())
    if len(text) > _QUOTE_LIMIT:
        text = text[: _QUOTE_LIMIT - 1] + "…"
    return text


def _parse_retry_after(value: str | None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP date) into seconds, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _as_int(value: Any) -> int | None:
    """Return ``value`` as an int if it is an int or an integral string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class _Response:
    """A fully read HTTP answer."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str]

    def json_object(self) -> dict[str, Any] | None:
        """Return the body as a JSON object, or None if it is not one (nested too deep for
        Python's parser too: state.parse_json)."""
        try:
            value = parse_json(self.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def describe_body(self) -> str:
        """Describe a body we could not use, without quoting it."""
        kind = self.content_type or "no content type"
        return f"{kind}, {len(self.body)} bytes"


class KakaoClient:
    """Calls Kakao's OAuth (kauth) and resource (kapi) endpoints for one app."""

    # One per account: slots keep a thousand of them small.
    __slots__ = ("_app", "_clock", "_policy", "_session")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        app: KakaoApp,
        *,
        clock: Clock = utcnow,
        policy: RefreshPolicy | None = None,
    ) -> None:
        """``policy``: the refresh policy the default timeouts are fitted to (tokens.
        request_timeout_share; None: the default policy)."""
        self._session = session
        self._app = app
        self._clock = clock
        self._policy = policy or RefreshPolicy()

    @property
    def app(self) -> KakaoApp:
        """Return the app configuration this client uses."""
        return self._app

    # --- kauth ------------------------------------------------------------------------------

    def authorize_url(
        self,
        *,
        state: str,
        code_challenge: str,
        redirect_uri: str | None = None,
        scopes: Sequence[str] | None = None,
        prompt: str | None = None,
    ) -> str:
        """Return the URL a person opens to log in and consent (authorization code + PKCE).

        ``scopes`` defaults to the app's configured scopes; ``None`` or empty sends no
        ``scope`` parameter (Kakao then asks for the consent items set in the console).
        """
        params: dict[str, str] = {
            "client_id": self._app.rest_api_key,
            "redirect_uri": redirect_uri or self._app.redirect_uri,
            "response_type": "code",
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        wanted = self._app.scopes if scopes is None else scopes
        if wanted:
            params["scope"] = ",".join(wanted)
        if prompt:
            params["prompt"] = prompt
        return f"{self._base(self._app.auth_url)}{AUTHORIZE_PATH}?{urlencode(params)}"

    async def exchange_code(
        self, *, code: str, code_verifier: str, redirect_uri: str | None = None
    ) -> TokenSet:
        """Exchange an authorization code for a token set (expiries count from the send time)."""
        form = {
            "grant_type": "authorization_code",
            "client_id": self._app.rest_api_key,
            "redirect_uri": redirect_uri or self._app.redirect_uri,
            "code": code,
            "code_verifier": code_verifier,
        }
        if self._app.client_secret:
            form["client_secret"] = self._app.client_secret
        requested_at = self._clock()
        body = await self._token_request(form, secrets_=(code, code_verifier))
        body = await self._with_expires_in(body)
        try:
            tokens = TokenSet.from_token_response(body, requested_at=requested_at)
        except TokenResponseError as exc:
            raise self._bad_token_body(exc) from None
        if tokens.refresh_expiry_estimated:
            log.warning(
                "Kakao's login answer did not say how long refresh token %s lives (no usable"
                " refresh_token_expires_in); assuming Kakao's documented %s, marked estimated"
                " until a rotation brings Kakao's own expiry",
                tokens.refresh_fingerprint,
                format_duration((tokens.refresh_expires_at - requested_at).total_seconds()),
            )
        return tokens

    async def refresh(
        self,
        tokens: TokenSet,
        *,
        unanswered: int = 0,
        heard: float | None = None,
        late: Callable[[asyncio.Future[tuple[TokenSet, bool]]], None] | None = None,
        rotation_window: timedelta | None = None,
    ) -> tuple[TokenSet, bool]:
        """Refresh the access token; return (merged token set, whether the refresh rotated).

        ``unanswered``: the account's token requests in a row that Kakao left unanswered in
        time; the request waits longer after them (tokens.request_timeout). ``heard``: how long
        Kakao took to answer the account's latest token request; the request waits at least
        twice that (tokens.heard_floor).

        ``late``: when Kakao has not answered within the wait, the caller gets its timeout as
        always, but the request is not abandoned: it stays open for the longest wait the
        rule allows (tokens.answer_patience), and ``late`` is handed the future of its result.
        Kakao may have rotated the refresh token already (it kills the old one at once), and
        network delay does not shrink with a token's life: an answer 0.8 s late for a
        10-second token is ordinary, and it may hold the only live refresh token.

        ``rotation_window``: Kakao's rotation window fitted to the refresh token; an answer
        without a rotation then corrects an expiry it proves wrong (TokenSet.merge_refresh)."""
        if late is None:
            return await self._refresh(
                tokens, unanswered=unanswered, heard=heard, rotation_window=rotation_window
            )
        lifetime, dies = tokens.access_lifetime, tokens.refresh_expires_at
        wait = self._timeout(lifetime, dies, unanswered, heard).total
        assert wait is not None
        patience = self._app.answer_patience(
            self._policy, lifetime, (dies - self._clock()).total_seconds(), heard=heard
        )
        if patience <= wait:
            return await self._refresh(
                tokens, unanswered=unanswered, heard=heard, rotation_window=rotation_window
            )
        started = time.monotonic()
        call = asyncio.ensure_future(
            self._refresh(
                tokens,
                unanswered=unanswered,
                heard=heard,
                patience=patience,
                rotation_window=rotation_window,
            )
        )
        try:
            async with answer_within(wait):
                return await asyncio.shield(call)
        except TimeoutError:
            late(call)
            elapsed = time.monotonic() - started
            log.debug(
                "POST %s unanswered after %.3fs; its answer is still awaited", TOKEN_PATH, elapsed
            )
            raise KakaoUnavailable(
                f"Kakao did not answer {TOKEN_PATH} within {format_duration(elapsed)}",
                endpoint=TOKEN_PATH,
                code="timeout",
                ambiguous=True,
            ) from None
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def _refresh(
        self,
        tokens: TokenSet,
        *,
        unanswered: int,
        heard: float | None = None,
        patience: float | None = None,
        rotation_window: timedelta | None = None,
    ) -> tuple[TokenSet, bool]:
        """The refresh itself (see :meth:`refresh`); ``patience`` replaces the wait when set."""
        form = {
            "grant_type": "refresh_token",
            "client_id": self._app.rest_api_key,
            "refresh_token": tokens.refresh_token,
        }
        if self._app.client_secret:
            form["client_secret"] = self._app.client_secret
        requested_at = self._clock()
        lifetime = tokens.access_lifetime
        dies = tokens.refresh_expires_at
        body = await self._token_request(
            form,
            secrets_=(tokens.refresh_token, tokens.access_token),
            lifetime=lifetime,
            refresh_expires_at=dies,
            unanswered=unanswered,
            heard=heard,
            patience=patience,
        )
        if body.get("refresh_token") in (None, "", tokens.refresh_token):
            # Not after a rotation: the old refresh token is dead, and the new one must be
            # saved before anything else (merge_refresh salvages it; the next refresh asks).
            body = await self._with_expires_in(body, lifetime, dies)
        try:
            return tokens.merge_refresh(
                body, requested_at=requested_at, rotation_window=rotation_window
            )
        except PartialTokenResponse as exc:
            raise PartialRefresh(
                f"Kakao's token response carried a new refresh token but no usable access"
                f" token: {exc}",
                salvaged=exc.salvaged,
                endpoint=TOKEN_PATH,
            ) from None
        except TokenResponseError as exc:
            raise self._bad_token_body(exc) from None

    async def _with_expires_in(
        self,
        body: dict[str, Any],
        lifetime: timedelta | None = None,
        refresh_expires_at: datetime | None = None,
    ) -> dict[str, Any]:
        """Complete a token answer that has an access token but no ``expires_in``.

        Kakao always sends it, but without it the access token still works: ask
        access_token_info how long it lives rather than throw it away (and, for a refresh,
        ask Kakao for another one until this one dies). The seconds it gives count from
        before the question, so the expiry, counted from the token request, is never late.
        When Kakao cannot say, the answer stays as it was and is refused as unusable. Never
        called for a rotating answer: its new refresh token is saved first (PartialRefresh).
        """
        access = body.get("access_token")
        if (
            body.get("expires_in") is not None
            or not isinstance(access, str)
            or not (access.isascii() and access.isprintable())  # a header must carry it
            or any(c.isspace() for c in access)
            or not access
        ):
            return body
        try:
            info = await self.access_token_info(
                access, lifetime=lifetime, refresh_expires_at=refresh_expires_at
            )
        except KakaoError as exc:
            log.debug("token answer without expires_in; access_token_info failed: %s", exc.label)
            return body
        log.debug("token answer without expires_in; access_token_info says %ds", info.expires_in)
        return {**body, "expires_in": info.expires_in}

    # --- kapi -------------------------------------------------------------------------------

    async def access_token_info(
        self,
        access_token: str,
        *,
        lifetime: timedelta | None = None,
        refresh_expires_at: datetime | None = None,
    ) -> AccessTokenInfo:
        """Ask Kakao whether an access token is valid and for how long (``lifetime`` and
        ``refresh_expires_at``: the token set's, when known, for the request's limits)."""
        body = await self._kapi(
            "GET",
            TOKEN_INFO_PATH,
            access_token,
            lifetime=lifetime,
            refresh_expires_at=refresh_expires_at,
        )
        user_id = _as_int(body.get("id"))
        expires_in = _as_int(body.get("expires_in"))
        if user_id is None or expires_in is None:
            raise self._missing_fields(TOKEN_INFO_PATH, "id, expires_in")
        return AccessTokenInfo(
            user_id=user_id, expires_in=expires_in, app_id=_as_int(body.get("app_id"))
        )

    async def user_me(
        self,
        access_token: str,
        *,
        lifetime: timedelta | None = None,
        refresh_expires_at: datetime | None = None,
    ) -> dict[str, Any]:
        """Return the user's ``/v2/user/me`` document (at least ``id``); ``lifetime`` and
        ``refresh_expires_at`` as for :meth:`access_token_info`."""
        body = await self._kapi(
            "GET",
            USER_ME_PATH,
            access_token,
            lifetime=lifetime,
            refresh_expires_at=refresh_expires_at,
        )
        if _as_int(body.get("id")) is None:
            raise self._missing_fields(USER_ME_PATH, "id")
        return body

    async def logout(self, access_token: str) -> int:
        """Expire this token set at Kakao; return the user id."""
        return await self._id_call(LOGOUT_PATH, access_token)

    async def unlink(self, access_token: str) -> int:
        """Unlink the user from the app (revokes every token); return the user id."""
        return await self._id_call(UNLINK_PATH, access_token)

    async def send_to_me(
        self, access_token: str, text: str, *, link_url: str | None = None
    ) -> None:
        """Send a text message to the user's own Kakao Talk chat ("send to me")."""
        if len(text) > MEMO_TEXT_LIMIT:
            text = text[: MEMO_TEXT_LIMIT - 1] + "…"
        link: dict[str, str] = {}
        if link_url:
            link = {"web_url": link_url, "mobile_web_url": link_url}
        await self.send_template(access_token, {"object_type": "text", "text": text, "link": link})

    async def send_template(self, access_token: str, template: Mapping[str, Any]) -> None:
        """Send a "send to me" message built from a Kakao message template object."""
        form = {"template_object": json.dumps(template, ensure_ascii=False)}
        body = await self._kapi("POST", MEMO_PATH, access_token, data=form)
        result = _as_int(body.get("result_code"))
        if result not in (None, 0):
            raise KakaoRequestRejected(
                f"Kakao did not deliver the message ({MEMO_PATH} result_code {result})",
                endpoint=MEMO_PATH,
                status=200,
                code=str(result),
            )

    async def server_clock(self) -> tuple[datetime, datetime]:
        """Return (Kakao's ``Date``, our clock halfway through the request), for a skew check.

        An unauthenticated access_token_info call: Kakao answers -401, but every answer
        carries a ``Date`` header (one-second resolution).
        """
        before = self._clock()
        answer = await self._send("GET", self._app.api_url, TOKEN_INFO_PATH)
        after = self._clock()
        date = next((v for k, v in answer.headers.items() if k.lower() == "date"), "")
        try:
            kakao_time = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            raise KakaoUnavailable(
                f"Kakao's answer to {TOKEN_INFO_PATH} has no usable Date header",
                endpoint=TOKEN_INFO_PATH,
                status=answer.status,
            ) from None
        if kakao_time.tzinfo is None:
            kakao_time = kakao_time.replace(tzinfo=UTC)
        return kakao_time, before + (after - before) / 2

    # --- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _base(url: str) -> str:
        return url.rstrip("/")

    def _timeout(
        self,
        lifetime: timedelta | None = None,
        refresh_expires_at: datetime | None = None,
        unanswered: int = 0,
        heard: float | None = None,
    ) -> aiohttp.ClientTimeout:
        """Return the request's limits: the configured ones, fitted to a short-lived token's
        ``lifetime`` and the refresh policy when left at their defaults (longer after
        ``unanswered`` token requests Kakao did not answer in time, and at least twice the
        ``heard`` seconds its latest answer took), and never past half of
        the refresh token's remaining life, set by hand or not (tokens.request_timeout)."""
        left = None
        if refresh_expires_at is not None:
            left = (refresh_expires_at - self._clock()).total_seconds()
        total, connect = self._app.request_timeouts(
            self._policy, lifetime, left, unanswered=unanswered, heard=heard
        )
        return aiohttp.ClientTimeout(total=total, connect=connect, sock_read=total)

    async def _id_call(self, path: str, access_token: str) -> int:
        body = await self._kapi("POST", path, access_token)
        user_id = _as_int(body.get("id"))
        if user_id is None:
            raise self._missing_fields(path, "id")
        return user_id

    async def _send(
        self,
        method: str,
        base: str,
        path: str,
        *,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        lifetime: timedelta | None = None,
        refresh_expires_at: datetime | None = None,
        unanswered: int = 0,
        heard: float | None = None,
        patience: float | None = None,
    ) -> _Response:
        """Send one request and read the whole answer; map transport failures.

        ``lifetime`` is that of the token the request is for (None: a login),
        ``refresh_expires_at`` when its refresh token dies, and ``unanswered`` how many of
        its token requests in a row went unanswered, ``heard`` how long the latest answer
        took, see _timeout(). ``patience``, when
        longer, replaces the wait for the answer (a request kept open for a late answer).
        """
        url = URL(self._base(base) + path)
        started = time.monotonic()
        timeout = self._timeout(lifetime, refresh_expires_at, unanswered, heard)
        assert timeout.total is not None
        wait = timeout.total
        if patience is not None and patience > wait:
            wait = patience
            timeout = aiohttp.ClientTimeout(total=wait, connect=timeout.connect)
        try:
            # The wait for the answer is answer_within's (a deadline found late gets a share
            # more); aiohttp keeps only the connection's own limit.
            async with (
                answer_within(wait),
                self._session.request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(connect=timeout.connect),
                    allow_redirects=False,
                ) as resp,
            ):
                body = await resp.read()
                answer = _Response(
                    status=resp.status,
                    content_type=resp.content_type if resp.content_type else "",
                    body=body,
                    headers={k: v for k, v in resp.headers.items()},
                )
        except (aiohttp.ClientError, OSError) as exc:  # OSError includes builtin TimeoutError
            elapsed = time.monotonic() - started
            log.debug("%s %s failed after %.3fs: %s", method, path, elapsed, type(exc).__name__)
            raise self._transport_error(exc, path, elapsed, timeout) from None
        log.debug("%s %s -> %d in %.3fs", method, path, answer.status, time.monotonic() - started)
        return answer

    def _transport_error(
        self, exc: BaseException, path: str, elapsed: float, timeout: aiohttp.ClientTimeout
    ) -> KakaoError:
        """Map an aiohttp/OS exception to our error types (never quoting the URL's query)."""
        name = type(exc).__name__
        if isinstance(exc, aiohttp.InvalidURL):
            return KakaoConfigError(
                f"invalid Kakao URL for {path}",
                endpoint=path,
                hint="check auth_url / api_url in the configuration",
            )
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return KakaoUnavailable(
                f"could not connect to Kakao for {path} within {timeout.connect:g}s",
                endpoint=path,
                code="connect-timeout",
                ambiguous=False,
            )
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return KakaoUnavailable(
                f"could not resolve Kakao's host name for {path} ({name})",
                endpoint=path,
                code="dns",
                ambiguous=False,
                hint="check DNS and network connectivity",
            )
        if isinstance(exc, aiohttp.ClientSSLError):
            return KakaoUnavailable(
                f"TLS handshake with Kakao failed for {path} ({name})",
                endpoint=path,
                code="tls",
                ambiguous=False,
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            return KakaoUnavailable(
                f"could not connect to Kakao for {path}: {reason}",
                endpoint=path,
                code="connect",
                ambiguous=False,
            )
        if isinstance(exc, TimeoutError):  # total or sock_read timeout: the request was out
            return KakaoUnavailable(
                f"Kakao did not answer {path} within {format_duration(elapsed)}",
                endpoint=path,
                code="timeout",
                ambiguous=True,
            )
        if isinstance(exc, aiohttp.ClientPayloadError):
            return KakaoUnavailable(
                f"Kakao's answer to {path} was cut off ({name})",
                endpoint=path,
                code="truncated",
                ambiguous=True,
            )
        return KakaoUnavailable(
            f"connection to Kakao lost during {path} ({name})",
            endpoint=path,
            code="disconnected",
            ambiguous=True,
        )

    async def _token_request(
        self,
        form: Mapping[str, str],
        *,
        secrets_: Sequence[str],
        lifetime: timedelta | None = None,
        refresh_expires_at: datetime | None = None,
        unanswered: int = 0,
        heard: float | None = None,
        patience: float | None = None,
    ) -> dict[str, Any]:
        """POST to the token endpoint; return the JSON object of a 200 answer."""
        answer = await self._send(
            "POST",
            self._app.auth_url,
            TOKEN_PATH,
            data=form,
            lifetime=lifetime,
            refresh_expires_at=refresh_expires_at,
            unanswered=unanswered,
            heard=heard,
            patience=patience,
        )
        body = answer.json_object()
        if answer.status == 200 and not _kauth_error_body(body):
            if body is None:
                raise self._bad_body(TOKEN_PATH, answer)
            return body
        self._raise_kauth_error(answer, body, secrets_=secrets_)

    async def _kapi(
        self,
        method: str,
        path: str,
        access_token: str,
        *,
        data: Mapping[str, str] | None = None,
        lifetime: timedelta | None = None,
        refresh_expires_at: datetime | None = None,
    ) -> dict[str, Any]:
        """Call a kapi endpoint with a bearer token; return the JSON object of a 200 answer."""
        answer = await self._send(
            method,
            self._app.api_url,
            path,
            data=data,
            headers={"Authorization": f"Bearer {access_token}"},
            lifetime=lifetime,
            refresh_expires_at=refresh_expires_at,
        )
        body = answer.json_object()
        if answer.status == 200 and not _kapi_error_body(body):
            if body is None:
                raise self._bad_body(path, answer)
            return body
        self._raise_kapi_error(path, answer, body, secrets_=(access_token,))

    # --- error construction -----------------------------------------------------------------

    def _secrets(self, extra: Sequence[str]) -> tuple[str, ...]:
        return (*extra, self._app.client_secret or "", self._app.rest_api_key)

    @staticmethod
    def _bad_body(path: str, answer: _Response) -> KakaoUnavailable:
        return KakaoUnavailable(
            f"Kakao answered {path} with HTTP {answer.status} but an unusable body "
            f"({answer.describe_body()})",
            endpoint=path,
            status=answer.status,
            code="bad-body",
            ambiguous=True,
        )

    @staticmethod
    def _missing_fields(path: str, fields: str) -> KakaoUnavailable:
        return KakaoUnavailable(
            f"Kakao's answer to {path} lacks expected fields ({fields})",
            endpoint=path,
            status=200,
            code="bad-body",
            ambiguous=True,
        )

    @staticmethod
    def _bad_token_body(exc: TokenResponseError) -> KakaoUnavailable:
        return KakaoUnavailable(
            f"Kakao's token response is unusable: {exc}",
            endpoint=TOKEN_PATH,
            status=200,
            code="bad-body",
            ambiguous=True,
        )

    def _status_fallback(
        self, path: str, answer: _Response, what: str, code: str | None
    ) -> KakaoError:
        """Classify an error answer that no known code explains, by its HTTP status."""
        status = answer.status
        if status >= 500:
            return KakaoUnavailable(
                f"Kakao server error on {path}: HTTP {status}{what}",
                endpoint=path,
                status=status,
                code=code,
                ambiguous=True,
            )
        if status == 429:
            return KakaoUnavailable(
                f"Kakao rate-limited {path}: HTTP 429{what}",
                endpoint=path,
                status=status,
                code=code,
                retry_after=_parse_retry_after(answer.headers.get("Retry-After")),
                rate_limited=True,
            )
        return KakaoUnavailable(
            f"unexpected Kakao error on {path}: HTTP {status}{what}",
            endpoint=path,
            status=status,
            code=code,
            ambiguous=False,
        )

    def _raise_kauth_error(
        self, answer: _Response, body: dict[str, Any] | None, *, secrets_: Sequence[str]
    ) -> NoReturn:
        path = TOKEN_PATH
        status = answer.status
        if body is None:
            if status < 500 and status != 429:
                raise KakaoUnavailable(
                    f"Kakao answered {path} with HTTP {status} and a non-JSON body "
                    f"({answer.describe_body()})",
                    endpoint=path,
                    status=status,
                    code="bad-body",
                    ambiguous=True,
                )
            raise self._status_fallback(path, answer, f" ({answer.describe_body()})", None)
        code = body.get("error_code") if isinstance(body.get("error_code"), str) else None
        error = body.get("error") if isinstance(body.get("error"), str) else None
        raw_description = body.get("error_description")
        if (
            code is None
            and error == "invalid_request"
            and isinstance(raw_description, str)
            and "rate limit" in raw_description.lower()
        ):
            code = "KOE237"  # its documented text ("token request rate limit exceeded")
        description = ""
        if isinstance(raw_description, str) and raw_description and code not in _KOE_RELOGIN:
            # KOE320's description echoes the authorization code; ours says it better anyway.
            description = _redact(raw_description, self._secrets(secrets_))
        quoted = f': "{description}"' if description else ""
        label = code or error or f"http{status}"

        if code in _KOE_RELOGIN:
            raise ReloginRequired(
                f"Kakao refused the token request ({code}): {_KOE_RELOGIN[code]}",
                endpoint=path,
                status=status,
                code=code,
            )
        if code in _KOE_CONFIG:
            meaning, hint = _KOE_CONFIG[code]
            raise KakaoConfigError(
                f"Kakao refused the token request ({code}): {meaning}",
                endpoint=path,
                status=status,
                code=code,
                hint=hint,
            )
        if code in _KOE_UNAVAILABLE:
            # KOE237: Kakao's issuance windows are 10 and 60 minutes, but how long to pause is
            # the refresher's decision (tokens.backoff_delay): it scales with the lifetime and
            # never outlives the refresh token. Here we only say what happened.
            raise KakaoUnavailable(
                f"Kakao could not issue tokens now ({code}): {_KOE_UNAVAILABLE[code]}",
                endpoint=path,
                status=status,
                code=code,
                ambiguous=status >= 500,
                retry_after=_parse_retry_after(answer.headers.get("Retry-After")),
                rate_limited=code == "KOE237",
            )
        if status >= 500 or status == 429:
            raise self._status_fallback(path, answer, f" ({label}){quoted}", code)
        if error == "invalid_client":
            raise KakaoConfigError(
                f"Kakao rejected the client credentials ({label}){quoted}",
                endpoint=path,
                status=status,
                code=code or error,
                hint=_KOE_CONFIG["KOE010"][1],
            )
        if error in _OAUTH_CONFIG:
            raise KakaoConfigError(
                f"Kakao refused the token request ({label}): {_OAUTH_CONFIG[error]}{quoted}",
                endpoint=path,
                status=status,
                code=code or error,
                hint="check the app's Kakao Login settings in the Kakao developer console",
            )
        if error == "invalid_grant":
            raise ReloginRequired(
                f"Kakao refused the grant ({label}){quoted}",
                endpoint=path,
                status=status,
                code=code or error,
            )
        raise self._status_fallback(path, answer, f" ({label}){quoted}", code or error)

    def _raise_kapi_error(
        self,
        path: str,
        answer: _Response,
        body: dict[str, Any] | None,
        *,
        secrets_: Sequence[str],
    ) -> NoReturn:
        status = answer.status
        if body is None:
            challenge = next(
                (v for k, v in answer.headers.items() if k.lower() == "www-authenticate"), ""
            )
            if status == 401 and "invalid_token" in challenge:
                # RFC 6750's answer for a refused bearer token, whatever the body.
                raise AccessTokenRejected(
                    f"Kakao rejected the access token for {path} (HTTP 401, invalid_token)",
                    endpoint=path,
                    status=status,
                    code="-401",
                    hint="refresh the access token once; if that fails too, log in again",
                )
            if status < 500 and status != 429:
                raise KakaoUnavailable(
                    f"Kakao answered {path} with HTTP {status} and a non-JSON body "
                    f"({answer.describe_body()})",
                    endpoint=path,
                    status=status,
                    code="bad-body",
                    ambiguous=True,
                )
            raise self._status_fallback(path, answer, f" ({answer.describe_body()})", None)
        number = _as_int(body.get("code"))
        raw_msg = body.get("msg")
        msg = _redact(raw_msg, self._secrets(secrets_)) if isinstance(raw_msg, str) else ""
        quoted = f': "{msg}"' if msg else ""
        code = str(number) if number is not None else None

        if number == -401:
            if rejects_the_app(msg):
                raise KakaoConfigError(
                    f"Kakao rejected the app for {path} (-401){quoted}",
                    endpoint=path,
                    status=status,
                    code=code,
                    hint="check the app key, allowed IPs and platform settings in the Kakao "
                    "developer console; refreshing tokens will not help",
                )
            raise AccessTokenRejected(
                f"Kakao rejected the access token for {path} (-401){quoted}",
                endpoint=path,
                status=status,
                code=code,
                hint="refresh the access token once; if that fails too, log in again",
            )
        if number in _KAPI_RELOGIN:
            meaning, hint = _KAPI_RELOGIN[number]
            raise ReloginRequired(
                f"Kakao refused {path} ({number}): {meaning}",
                endpoint=path,
                status=status,
                code=code,
                hint=hint,
            )
        if number in _KAPI_CONFIG:
            raise KakaoConfigError(
                f"Kakao refused {path} ({number}): {_KAPI_CONFIG[number]}{quoted}",
                endpoint=path,
                status=status,
                code=code,
                hint="check the app's settings in the Kakao developer console",
            )
        if number in _KAPI_UNAVAILABLE:
            raise KakaoUnavailable(
                f"Kakao could not serve {path} now ({number}): {_KAPI_UNAVAILABLE[number]}",
                endpoint=path,
                status=status,
                code=code,
                ambiguous=status >= 500,
                retry_after=_parse_retry_after(answer.headers.get("Retry-After")),
                rate_limited=number == -10,
            )
        if number in _KAPI_REJECTED:
            reason, advice = _KAPI_REJECTED[number]
            raise KakaoRequestRejected(
                f"Kakao refused {path} ({number}): {reason}{quoted}",
                endpoint=path,
                status=status,
                code=code,
                hint=advice,
            )
        if status >= 500 or status == 429:
            raise self._status_fallback(path, answer, f" ({code or 'no code'}){quoted}", code)
        if path == MEMO_PATH and status == 400:
            raise KakaoRequestRejected(
                f"Kakao refused the message ({code or 'no code'}){quoted}",
                endpoint=path,
                status=status,
                code=code,
            )
        raise self._status_fallback(path, answer, f" ({code or 'no code'}){quoted}", code)
