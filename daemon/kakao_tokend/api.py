"""Local HTTP API: health, status, token, refresh, reload, metrics, and the proxy to Kakao.

Handlers only translate HTTP to the daemon's managers and back; errors are JSON objects with
an ``error`` field that says what went wrong. The Unix socket is guarded by its file mode and
group; the optional TCP listener requires the configured bearer token (except /healthz).
Nothing here ever logs a token or a query string.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import math
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from . import __version__
from .config import AlertsConfig, parse_duration
from .daemon import DAEMON, Daemon
from .errors import StoreError
from .health import moved_thresholds
from .kakao import rejects_the_app
from .metrics import CONTENT_TYPE, Metrics
from .refresher import AccountManager
from .relogin import ReloginCause, login_command
from .state import parse_json, rotations_shown
from .status import Health
from .tokens import (
    default_min_valid,
    fingerprint,
    format_time,
    min_valid_problem,
    no_token_valid_for,
)

log = logging.getLogger(__name__)

METRICS = web.AppKey("metrics", Metrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: RFC 9110 7.6.1 hop-by-hop headers, plus what the proxy sets itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
#: Request headers never forwarded to Kakao.
DROP_REQUEST = HOP_BY_HOP | {"host", "authorization", "x-kakao-account", "content-length"}
#: Response headers never passed back to the client (aiohttp sets its own).
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "server", "date"}
CHUNK = 64 * 1024


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON]


def _error(
    status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def _expired(manager: AccountManager) -> bool:
    """Whether the account has no access token left that Kakao could accept by our clock."""
    state = manager.state
    return state is None or state.tokens.access_remaining(manager.clock()).total_seconds() <= 0


def _none_valid(manager: AccountManager, min_valid: float, reason: str | None) -> web.Response:
    """503: no token valid for ``min_valid`` can be had (the token endpoint and the proxy),
    with ``reason``, the account's health and, while it retries, Retry-After."""
    return _error(
        503,
        no_token_valid_for(manager.name, min_valid),
        headers=_retry_after(manager),
        reason=reason,
        health=manager.status.health.value,
    )


def _retry_after(manager: AccountManager) -> dict[str, str] | None:
    """``Retry-After`` (whole seconds, at least 1) up to the account's next refresh attempt
    while it retries; None when no retry is planned (a login or a fix is needed)."""
    status = manager.status
    if status.health is not Health.RETRYING or status.next_attempt_at is None:
        return None
    seconds = (status.next_attempt_at - manager.clock()).total_seconds()
    return {hdrs.RETRY_AFTER: str(max(1, math.ceil(seconds)))}


def _lookup(daemon: Daemon, name: str) -> AccountManager:
    """Return the account called ``name``; ``default`` is default_account's alias only when no
    account has that name (an account really called "default" must get its own token)."""
    if name == "default" and name not in daemon.managers:
        name = daemon.config.default_account
    manager = daemon.managers.get(name)
    if manager is None:
        known = ", ".join(daemon.managers) or "none"
        raise _json_error(404, f"no account named {name!r} (accounts: {known})")
    return manager


def _manager(request: web.Request) -> AccountManager:
    return _lookup(_daemon(request), request.match_info["name"])


class ApiError(Exception):
    """An answer other than 2xx; the guard middleware turns it into JSON ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_error(status: int, message: str) -> ApiError:
    return ApiError(status, message)


async def _within_timeout(request: web.Request, awaitable: Awaitable[Any]) -> Any:
    """Wait for ``awaitable`` at most api.request_timeout (refreshes go on when it expires)."""
    timeout = _daemon(request).config.api.request_timeout
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise _json_error(
            504,
            f"no answer within {timeout:g}s (api.request_timeout); Kakao may be slow",
        ) from None


async def _refresh_now(
    request: web.Request, manager: AccountManager, reason: str, *, min_valid: float | None = None
) -> None:
    """Refresh on a caller's request (within api.request_timeout), then re-plan the account.

    The re-plan is needed even when nothing was refreshed: a fleet node that found another
    node holding the account looks again soon (the manager moved its plan earlier without an
    event), and the scheduler must wake for that moment rather than the old one.
    """

    async def refreshed() -> None:
        await manager.refresh(force=True, reason=reason, min_valid=min_valid)
        # A request given up on may still bring Kakao's late answer (its tokens are kept):
        # the caller is answered with it, not with the first attempt's timeout.
        await manager.wait_idle(manager.request_grace)

    try:
        await _within_timeout(request, refreshed())
    finally:
        scheduler = _daemon(request).scheduler
        if scheduler is not None:
            scheduler.plan(manager)


def _no_tokens(manager: AccountManager) -> ApiError:
    return _json_error(
        409, f"account {manager.name} has no tokens; run `{login_command(manager.account)}`"
    )


async def healthz(request: web.Request) -> web.Response:
    """200 when every account has a valid, published token; 503 with the reasons otherwise."""
    daemon = _daemon(request)
    now = daemon.clock()
    problems = {}
    for manager in daemon.managers.values():
        problem = manager.health(now).serving_problem
        if problem is not None:
            problems[manager.name] = problem
    if problems:
        return unhealthy_answer(request, problems)
    return web.json_response({"ok": True})


def _alert_settings(request: web.Request, manager: AccountManager) -> AlertsConfig | None:
    """`status --warn/--crit`: the account's expiry thresholds, moved (None: as configured).

    ``warn`` becomes the longest threshold (longer ones are dropped), ``crit`` the
    ``critical_below``; the daemon grades with them exactly as `status` does from the files.
    """
    try:
        warn = parse_duration(request.query["warn"]) if "warn" in request.query else None
        crit = parse_duration(request.query["crit"]) if "crit" in request.query else None
    except ValueError as exc:
        raise _json_error(400, f"warn and crit must be durations: {exc}") from None
    return moved_thresholds(manager.account.alerts, warn=warn, crit=crit)


async def status(request: web.Request) -> web.Response:
    """Every account's grading, expiries, last and next refresh, rotations and errors."""
    daemon = _daemon(request)
    now = daemon.clock()
    accounts = []
    fleet = daemon.fleet
    for manager in daemon.managers.values():
        graded = manager.health(now, alerts=_alert_settings(request, manager))
        entry = {
            **manager.describe(now),
            **graded.to_json(),
            "alerts": daemon.alerts.active(manager.name) if daemon.alerts is not None else [],
        }
        if fleet is not None:
            row = fleet.rows.get(manager.name)
            entry["refreshed_by"] = row.refreshed_by if row is not None else None
        accounts.append(entry)
    await _rotation_logs(daemon, accounts)
    body: dict[str, Any] = {
        "version": __version__,
        "now": format_time(now),
        "default_account": daemon.config.default_account,
        "accounts": accounts,
    }
    if fleet is not None:
        body["fleet"] = daemon.fleet_status()
    return web.json_response(body)


#: How long status waits for the rotation log from the store before it answers without it.
ROTATION_LOG_WAIT = 1.0
#: Reads of the rotation log that status stopped waiting for (each ends by the store's own
#: deadline; held here so that it is not collected meanwhile).
_unwaited: set[asyncio.Task[Any]] = set()


async def _rotation_logs(daemon: Daemon, described: list[dict[str, Any]]) -> None:
    """Fleet mode: put each account's rotation log, read from the store, into its described
    status (a node keeps only the newest rotation in memory). While the store does not
    answer, the newest rotation stays: status must work without the database, and must not
    wait for a database that stopped answering without a word (that takes its deadline)."""
    fleet = daemon.fleet
    if fleet is None or not described or not fleet.stats.up:
        return  # known to be away: status answers at once, with what the node has
    task = asyncio.ensure_future(fleet.rotation_log([entry["account"] for entry in described]))
    done, _ = await asyncio.wait({task}, timeout=ROTATION_LOG_WAIT)
    if not done:
        log.debug("status shows the newest rotations only: the store did not answer in time")
        _unwaited.add(task)
        task.add_done_callback(_forget)
        return
    try:
        logs = task.result()
    except StoreError as exc:
        log.debug("status shows the newest rotations only: %s", exc)
        return
    for entry in described:
        if entry["account"] in logs:
            entry["rotations"] = rotations_shown(logs[entry["account"]])


def _forget(task: asyncio.Task[Any]) -> None:
    _unwaited.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("a rotation log read ended without an answer: %s", task.exception())


async def reload(request: web.Request) -> web.Response:
    """Re-read the configuration and answer once it is applied (for ExecReload)."""
    ok, message = await _daemon(request).reload()
    return web.json_response({"ok": ok, "message": message}, status=200 if ok else 400)


async def refresh(request: web.Request) -> web.Response:
    """Refresh one account now (shares an in-flight refresh) and report the result."""
    manager = _manager(request)
    if manager.state is None:
        raise _no_tokens(manager)
    before = manager.state.generation
    before_refresh = manager.state.tokens.refresh_fingerprint
    await _refresh_now(request, manager, "API request")
    daemon = _daemon(request)
    body = manager.describe()
    await _rotation_logs(daemon, [body])
    body["refreshed"] = manager.state is not None and manager.state.generation != before
    body["rotated"] = body["refreshed"] and body.get("refresh_fingerprint") != before_refresh
    return web.json_response(body, status=200 if body["refreshed"] else 502)


async def reread(request: web.Request) -> web.Response:
    """Re-read the account's state file now (the CLI calls this after login/import/logout).

    A refresh in flight re-reads the file under the account lock itself: wait for it first.
    """
    daemon = _daemon(request)
    manager = _manager(request)
    if manager.refreshing:
        await _within_timeout(request, manager.wait_idle(daemon.config.api.request_timeout))
    changed = daemon.adopt_outside_changes(manager)
    body = manager.describe()
    await _rotation_logs(daemon, [body])
    body["changed"] = changed
    return web.json_response(body)


def _revoked(manager: AccountManager) -> bool:
    """Whether the account awaits a new login because Kakao revoked its tokens (relogin's
    cause "revoked": the refresh token was refused although it should live and nothing was
    ambiguous, and access_token_info rejected the access token too, or could not vouch for
    it). Such a token is never handed out. A new login needed for another cause may leave
    an access token that works: one Kakao still accepts (cause "unknown"), or one that
    outlives its expired or rotated-away refresh token; it is served while it lives.
    """
    status = manager.status
    return status.health is Health.RELOGIN and status.relogin_cause is ReloginCause.REVOKED


async def token(request: web.Request) -> web.Response:
    """Return an access token valid for at least ``min_valid`` seconds, refreshing if needed."""
    manager = _manager(request)
    asked = request.query.get("min_valid", "0")
    try:
        min_valid = None if asked == "auto" else parse_duration(asked)
    except ValueError:
        return _error(400, 'min_valid must be a duration such as "600", "90s" or "10m", or auto')
    state = manager.state
    if state is None:
        raise _no_tokens(manager)
    if min_valid is None:  # auto: what `kakao-tokend token` asks when not told
        min_valid = default_min_valid(state.tokens.access_lifetime)
    if _revoked(manager):
        return _error(
            503,
            f"no token is available for {manager.name}: Kakao revoked its tokens",
            reason=manager.health().refresh_blocked,
            health=manager.status.health.value,
        )
    unmeetable = min_valid_problem(min_valid, state.tokens.access_lifetime)
    if unmeetable is not None:
        return _error(400, unmeetable)
    remaining = state.tokens.access_remaining(manager.clock()).total_seconds()
    if remaining < min_valid:
        blocked = manager.health().refresh_blocked
        if blocked is not None:
            return _none_valid(manager, min_valid, blocked)
        reason = f"token requested with min_valid={min_valid:g}s"
        await _refresh_now(request, manager, reason, min_valid=min_valid)
        state = manager.state
        assert state is not None
        remaining = state.tokens.access_remaining(manager.clock()).total_seconds()
        if remaining < min_valid:
            return _none_valid(manager, min_valid, manager.status.last_error)
    tokens = state.tokens
    return web.json_response(
        {
            "account": manager.name,
            "access_token": tokens.access_token,
            "token_type": tokens.token_type,
            "expires_in": int(remaining),
            "expires_at": format_time(tokens.access_expires_at),
            "generation": state.generation,
        },
        headers={"Cache-Control": "no-store"},
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition, computed now from the managers."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# --------------------------------------------------------------------------- proxy


def _target(manager: AccountManager, request: web.Request) -> URL:
    """Map /kapi/<rest> onto the account's api_url; refuse anything that leaves that host."""
    base = URL(manager.account.app.api_url)
    raw = request.raw_path[len("/kapi") :]
    path, _, query = raw.partition("?")
    if not path.startswith("/") or any(unquote(part) in ("..", ".") for part in path.split("/")):
        raise _json_error(400, "the path after /kapi must be a plain API path")
    target = URL(str(base).rstrip("/") + path + (f"?{query}" if query else ""), encoded=True)
    if (target.scheme, target.host, target.port) != (base.scheme, base.host, base.port):
        raise _json_error(400, "the proxy only talks to the configured api_url")
    return target


def _forward_headers(request: web.Request, token: str) -> dict[str, str]:
    listed = {
        name.strip().lower()
        for value in request.headers.getall(hdrs.CONNECTION, [])
        for name in value.split(",")
    }
    headers = {
        name: value
        for name, value in request.headers.items()
        if name.lower() not in DROP_REQUEST and name.lower() not in listed
    }
    headers["Authorization"] = f"Bearer {token}"
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    return headers


async def _read_upto(request: web.Request, limit: int) -> tuple[bytes, bool]:
    """Read at most ``limit`` bytes of the body; return (data, whole body read)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(min(CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False


async def _rest_of_body(
    request: web.Request, head: bytes, max_body: int, overflow: list[bool]
) -> AsyncIterator[bytes]:
    size = len(head)
    yield head
    async for chunk in request.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > max_body:
            overflow.append(True)  # aiohttp wraps what the body raises into a ClientError
            raise _BodyTooLarge
        yield chunk


class _BodyTooLarge(Exception):
    pass


def _is_token_rejected(status: int, body: bytes, challenge: str) -> bool:
    """Return True when Kakao refused the access token: a 401 with code -401 whose message
    is not about the app (kakao.rejects_the_app: a deactivated key, a mismatched IP, domain
    or key hash, which no refresh can help), or a 401 whose body is not JSON but whose
    ``WWW-Authenticate`` says ``invalid_token`` (RFC 6750; the daemon's own client reads
    Kakao's answers the same way, kakao.py)."""
    if status != 401:
        return False
    try:
        document = parse_json(body)
    except ValueError:
        return "invalid_token" in challenge
    if not isinstance(document, dict) or document.get("code") != -401:
        return False
    message = document.get("msg")
    return not (isinstance(message, str) and rejects_the_app(message))


#: After a brand-new token was refused too (-401 on the retry), the proxy does not refresh on
#: -401 again until that token has lived this share of its lifetime: refreshing cannot help
#: now, and each refresh spends Kakao's token rate limit (KOE237), rewrites the files and
#: runs the hooks. An eighth: 45 minutes of Kakao's 6-hour token.
REJECTED_TOKEN_REST_SHARE = 1 / 8
#: Per account, the fingerprint of the access token Kakao refused on the proxy's retry.
REFUSED_WHEN_NEW = web.AppKey("refused_when_new", dict[str, str])


def _resting(request: web.Request, manager: AccountManager, token: str) -> bool:
    """Whether ``token`` was refused on a retry (brand-new) and is still too young to refresh
    on a -401 again (:data:`REJECTED_TOKEN_REST_SHARE` of its lifetime)."""
    refused = request.app[REFUSED_WHEN_NEW]
    if manager.name not in refused:
        return False
    state = manager.state
    tokens = state.tokens if state is not None else None
    if (
        tokens is not None
        and tokens.access_token == token
        and tokens.access_fingerprint == refused[manager.name]
        and manager.clock() - tokens.access_issued_at
        < tokens.access_lifetime * REJECTED_TOKEN_REST_SHARE
    ):
        return True
    del refused[manager.name]  # another token, or old enough: a -401 may refresh again
    return False


def _refused_when_new(request: web.Request, manager: AccountManager, token: str) -> None:
    """Remember that Kakao refused ``token`` on the retry, right after a refresh."""
    refused = request.app[REFUSED_WHEN_NEW]
    if refused.get(manager.name) != fingerprint(token):  # said once per token
        refused[manager.name] = fingerprint(token)
        log.warning(
            "proxy: Kakao refused %s's new access token too (-401); no refresh on -401 until"
            " it has lived %g %% of its lifetime",
            manager.name,
            REJECTED_TOKEN_REST_SHARE * 100,
        )


async def proxy(request: web.Request) -> web.StreamResponse:
    """Forward /kapi/<path> to Kakao with the account's token; refresh and retry once on -401.

    The account comes from the X-Kakao-Account header, else the default account. Request
    bodies up to api.proxy_retry_body are buffered, so a -401 can be retried; larger bodies
    are streamed (up to api.max_body) and a -401 is passed back as it came. So is a -401
    about the app (no refresh helps), and one for a token that was refused when brand-new
    and has not lived :data:`REJECTED_TOKEN_REST_SHARE` of its lifetime yet.
    """
    daemon = _daemon(request)
    settings = daemon.config.api
    manager = _lookup(daemon, request.headers.get("X-Kakao-Account", daemon.config.default_account))
    target = _target(manager, request)
    if manager.state is None:
        raise _no_tokens(manager)
    if _expired(manager):
        # Kakao would only answer -401 "already expired", which says nothing of why: refresh
        # now unless nothing can (a login or a fix is needed), else answer as the token
        # endpoint does.
        if manager.health().refresh_blocked is None:
            await _refresh_now(request, manager, "the proxy needs a valid token")
        if _expired(manager):
            reason = manager.health().refresh_blocked or manager.status.last_error
            return _none_valid(manager, 0, reason)
    if request.content_length is not None and request.content_length > settings.max_body:
        raise _json_error(
            413,
            f"request body larger than api.max_body ({settings.max_body} bytes)",
        )
    session = daemon.session
    assert session is not None
    body: bytes | None = None
    head = b""
    whole = True
    if request.body_exists:
        head, whole = await _read_upto(request, settings.proxy_retry_body)
        if whole:
            body = head
    timeout = aiohttp.ClientTimeout(total=settings.request_timeout)
    retried = False
    overflow: list[bool] = []
    while True:
        token = manager.state.tokens.access_token if manager.state else ""
        data: Any = (
            io.BytesIO(body)
            if whole and body is not None
            else None
            if whole
            else _rest_of_body(request, head, settings.max_body, overflow)
        )
        try:
            upstream = await session.request(
                request.method,
                target,
                headers=_forward_headers(request, token),
                data=data,
                allow_redirects=False,
                timeout=timeout,
                auto_decompress=False,
            )
        except _BodyTooLarge:
            raise _json_error(
                413,
                f"request body larger than api.max_body ({settings.max_body} bytes)",
            ) from None
        except TimeoutError:
            raise _json_error(
                504,
                f"Kakao did not answer within {settings.request_timeout:g}s",
            ) from None
        except aiohttp.ClientError as exc:
            if overflow:
                raise _json_error(
                    413, f"request body larger than api.max_body ({settings.max_body} bytes)"
                ) from None
            raise _json_error(502, f"cannot reach {target.host}: {type(exc).__name__}") from None
        try:
            if upstream.status == 401 and whole:
                answer = await upstream.read()
                challenge = upstream.headers.get("WWW-Authenticate", "")
                rejected = _is_token_rejected(upstream.status, answer, challenge)
                if rejected and retried:
                    _refused_when_new(request, manager, token)
                elif rejected and not _resting(request, manager, token):
                    retried = True
                    upstream.release()
                    if (
                        manager.state is None or manager.state.tokens.access_token == token
                    ) and manager.health().refresh_blocked is None:
                        await _refresh_now(request, manager, "Kakao rejected the token (-401)")
                    if manager.state is not None and manager.state.tokens.access_token != token:
                        log.info("proxy: %s got -401; retrying with a new token", manager.name)
                        continue
                return web.Response(
                    status=upstream.status, body=answer, headers=_back_headers(upstream)
                )
            response = web.StreamResponse(status=upstream.status, headers=_back_headers(upstream))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()


def _back_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    listed = {
        name.strip().lower()
        for value in upstream.headers.getall(hdrs.CONNECTION, [])
        for name in value.split(",")
    }
    return {
        name: value
        for name, value in upstream.headers.items()
        if name.lower() not in DROP_RESPONSE and name.lower() not in listed
    }


# --------------------------------------------------------------------------- middleware


def _is_tcp(request: web.Request) -> bool:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return isinstance(sockname, tuple)


def _has_bearer(request: web.Request, expected: str | None) -> bool:
    """Whether the request carries the configured bearer token (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return (
        expected is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(given.strip().encode(), expected.encode())
    )


def unhealthy_answer(
    request: web.Request, problems: dict[str, str], extra: dict[str, Any] | None = None
) -> web.Response:
    """/healthz's 503. On TCP /healthz needs no bearer token (load balancers probe it), so
    such a caller learns only how many accounts fail: their names, paths and fix commands
    are for the Unix socket or a caller with the bearer token."""
    if _is_tcp(request) and not _has_bearer(request, _daemon(request).config.api.bearer_token):
        return web.json_response({"ok": False, "failing": len(problems)}, status=503)
    body: dict[str, Any] = {"ok": False, "failing": len(problems), "problems": problems}
    return web.json_response(body | (extra or {}), status=503)


def _shown_path(request: web.Request) -> str:
    """The path as the client sent it, for the log: still percent-encoded (a ``%0A`` stays
    three characters and cannot start a forged line), without the query string, and with any
    character that is not printable escaped (``\\x00``) in case one came through raw."""
    path = request.raw_path.partition("?")[0]
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in path)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer auth on TCP (not /healthz), body size limit, JSON errors, a path-only debug log."""
    daemon = _daemon(request)
    settings = daemon.config.api
    log.debug("api %s %s", request.method, _shown_path(request))
    if (
        _is_tcp(request)
        and request.path != "/healthz"
        and not _has_bearer(request, settings.bearer_token)
    ):
        return web.json_response(
            {"error": "missing or wrong bearer token (see api.bearer_token_file)"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="kakao-tokend"'},
        )
    if (
        request.content_length is not None
        and request.content_length > settings.max_body
        and not request.path.startswith("/kapi/")
    ):
        return _error(413, f"request body larger than api.max_body ({settings.max_body} bytes)")
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        answer = _error(exc.status, exc.reason)
        for name, value in exc.headers.items():  # e.g. the Allow of a 405 (RFC 9110 15.5.6)
            if name.lower() not in ("content-type", "content-length"):
                answer.headers.add(name, value)
        return answer
    except ConnectionResetError as exc:
        # aiohttp raises this into a body read when the caller hangs up: the caller's doing,
        # not a bug. The answer below goes nowhere; aiohttp drops it quietly.
        log.info(
            "api %s %s: the caller hung up before its answer (%s)",
            request.method,
            _shown_path(request),
            exc,
        )
        return _error(400, "the connection was lost before the request was read")
    except Exception as exc:  # a bug: answer JSON like every other error, and log it once
        if request.writer.output_size > 0:
            raise  # the proxy sent part of an answer: only aiohttp can end it (by closing)
        _log_failure(request, exc)
        return _error(500, f"internal error ({type(exc).__name__}); the daemon's log has where")


def _log_failure(request: web.Request, exc: Exception) -> None:
    """Log where a handler failed: the exception's type and its frames (code locations),
    never its text, which may quote anything the handler held, a token included."""
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    log.error(
        "api %s %s failed with %s (a bug; please report it):\n%s",
        request.method,
        _shown_path(request),
        type(exc).__name__,
        frames,
    )


def add_routes(app: web.Application) -> None:
    """Register the API routes, the guard middleware and the metrics registry on the app."""
    app.middlewares.append(guard)
    daemon = app[DAEMON]
    metrics_state = Metrics(daemon)
    app[METRICS] = metrics_state
    app[REFUSED_WHEN_NEW] = {}
    daemon.listeners.append(metrics_state.collector.on_event)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/reload", reload)
    app.router.add_post("/v1/accounts/{name}/refresh", refresh)
    app.router.add_post("/v1/accounts/{name}/reread", reread)
    app.router.add_get("/v1/accounts/{name}/token", token)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/kapi/{path:.*}", proxy)
