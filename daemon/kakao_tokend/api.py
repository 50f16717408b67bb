"""Local HTTP API on the daemon's Unix socket: health, status, reload, refresh, token.

Handlers only translate HTTP to the daemon's managers and back; errors are JSON objects with
an ``error`` field that says what went wrong.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import __version__
from .config import parse_duration
from .refresher import AccountManager, Health
from .tokens import format_time


def _daemon(request: web.Request) -> Any:
    from .service import DAEMON

    return request.app[DAEMON]


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _manager(request: web.Request) -> AccountManager:
    daemon = _daemon(request)
    name = request.match_info["name"]
    if name == "default":
        name = daemon.config.default_account
    manager = daemon.managers.get(name)
    if manager is None:
        raise web.HTTPNotFound(
            text=f'{{"error": "no account named {name!r}"}}', content_type="application/json"
        )
    return manager


def is_serving(manager: AccountManager) -> bool:
    """Return True when the account holds an access token that is valid right now."""
    state = manager.state
    if state is None or manager.status.health in (Health.RELOGIN, Health.CONFIG, Health.NO_STATE):
        return False
    return state.tokens.access_expires_at > manager.clock()


async def healthz(request: web.Request) -> web.Response:
    """200 when every account has a valid token, 503 with the reasons otherwise."""
    daemon = _daemon(request)
    problems = {
        m.name: m.status.last_error or m.status.health.value
        for m in daemon.managers.values()
        if not is_serving(m)
    }
    if problems:
        return web.json_response({"ok": False, "problems": problems}, status=503)
    return web.json_response({"ok": True})


async def status(request: web.Request) -> web.Response:
    """Every account's expiries, last and next refresh, rotations and errors."""
    daemon = _daemon(request)
    now = daemon.clock()
    return web.json_response(
        {
            "version": __version__,
            "now": format_time(now),
            "default_account": daemon.config.default_account,
            "accounts": [m.describe(now) for m in daemon.managers.values()],
        }
    )


async def reload(request: web.Request) -> web.Response:
    """Re-read the configuration and answer once it is applied (for ExecReload)."""
    ok, message = await _daemon(request).reload()
    return web.json_response({"ok": ok, "message": message}, status=200 if ok else 400)


async def refresh(request: web.Request) -> web.Response:
    """Refresh one account now (shares an in-flight refresh) and report the result."""
    manager = _manager(request)
    if manager.state is None:
        return _error(409, f"account {manager.name} has no tokens; run kakao-tokend login")
    before = manager.state.generation
    await manager.refresh(force=True, reason="API request")
    daemon = _daemon(request)
    if daemon.scheduler is not None:
        daemon.scheduler.plan(manager)
    body = manager.describe()
    body["refreshed"] = manager.state is not None and manager.state.generation != before
    return web.json_response(body, status=200 if body["refreshed"] else 502)


async def token(request: web.Request) -> web.Response:
    """Return an access token valid for at least ``min_valid`` seconds, refreshing if needed."""
    manager = _manager(request)
    try:
        min_valid = parse_duration(request.query.get("min_valid", "0"))
    except ValueError:
        return _error(400, 'min_valid must be a duration such as "600", "90s" or "10m"')
    state = manager.state
    if state is None:
        return _error(409, f"account {manager.name} has no tokens; run kakao-tokend login")
    lifetime = state.tokens.access_lifetime.total_seconds()
    if min_valid >= lifetime * 0.95:
        return _error(400, f"min_valid must be below the token lifetime ({int(lifetime)}s)")
    remaining = state.tokens.access_remaining(manager.clock()).total_seconds()
    if remaining < min_valid:
        await manager.refresh(force=True, reason=f"token requested with min_valid={min_valid}")
        daemon = _daemon(request)
        if daemon.scheduler is not None:
            daemon.scheduler.plan(manager)
        state = manager.state
        assert state is not None
        remaining = state.tokens.access_remaining(manager.clock()).total_seconds()
        if remaining < min_valid:
            return _error(
                503,
                f"no token valid for {int(min_valid)}s is available for {manager.name}",
                reason=manager.status.last_error,
            )
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


def add_routes(app: web.Application) -> None:
    """Register the API routes on the daemon's Application."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/reload", reload)
    app.router.add_post("/v1/accounts/{name}/refresh", refresh)
    app.router.add_get("/v1/accounts/{name}/token", token)
