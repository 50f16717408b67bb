"""A fleet node started while PostgreSQL cannot be reached: say so, alert, and wait for it.

Exiting before READY left every node of a fleet silent when the database did not come back
(a power cut): systemd restarted them every few seconds, and tokens expired without an alert.
Instead the node reports READY, answers its local API (the store is unavailable, and why;
503 for every token), sends the node-local ``store_unavailable`` alert after the same share of
the access lifetime as a running node, through the channels that work without the database,
and retries opening the store with the store's back-off. When the store opens, the ordinary
start-up goes on (schema, the moved marker, the first sync, rescue files), and the alert is
resolved. docs/fleet.md §10 explains why nothing is served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from ..alerts import CLOSE_GRACE, RETRY_DELAY, AccountAlerts
from ..api import guard, unhealthy_answer
from ..config import AccountConfig
from ..daemon import DAEMON, Daemon
from ..errors import StoreError, StoreUnavailable
from ..health import AccountHealth, Condition, store_unavailable_condition
from ..importer import DEFAULT_ACCESS_LIFETIME
from ..status import AccountStatus, Health
from ..store import AccountStore
from ..tokens import format_time, parse_time, utcnow
from .db import end_tasks
from .store import FleetStore

if TYPE_CHECKING:
    from ..refresher import AccountManager

__all__ = ["StoreWait"]

log = logging.getLogger(__name__)

#: The one condition a waiting node knows about: its bookkeeping is the running node's.
CONDITION = "store_unavailable"


class _OneRecord:
    """An account's node-local alert bookkeeping, narrowed to ``store_unavailable``.

    The other records in the file (a ``write_failed`` of the previous run, say) are about
    things a waiting node cannot judge: they are kept as they are, never resolved here.
    """

    def __init__(self, files: AccountStore) -> None:
        self.files = files

    def load_alerts(self) -> dict[str, Any] | None:
        """Return the bookkeeping with the ``store_unavailable`` record only."""
        document = self.files.load_alerts() or {}
        active = document.get("active")
        record = active.get(CONDITION) if isinstance(active, dict) else None
        return {**document, "active": {CONDITION: record} if isinstance(record, dict) else {}}

    def save_alerts(self, document: dict[str, Any]) -> None:
        """Write the ``store_unavailable`` record back beside the others in the file."""
        stored = self.files.load_alerts() or {}
        active = stored.get("active")
        others = {k: v for k, v in active.items() if k != CONDITION} if active else {}
        mine = document.get("active", {}).get(CONDITION)
        merged = {**others, **({CONDITION: mine} if mine is not None else {})}
        self.files.save_alerts({**document, "active": merged})


class _NoFleetAlerts:
    """The fleet-wide bookkeeping is in the database: a waiting node delivers none of it."""

    def delivers(self, account: str) -> bool:
        """Never: the account's first claimant is unknown without the database."""
        return False

    def records(self, account: str) -> dict[str, dict[str, Any]]:
        """None known."""
        return {}

    def record(self, account: str, active: dict[str, dict[str, Any]]) -> None:
        """Never called (see :meth:`delivers`)."""

    def changed(self) -> set[str] | None:
        """Nothing: no other node's writes can reach a node without its database."""
        return set()


@dataclass
class _Waiting:
    """What AccountAlerts reads of an account manager, for an account the node cannot load.

    Its only condition is ``store_unavailable``, graded by health.py's own rule, with the
    lifetime of the token this node last published (the threshold of a running node).
    """

    account: AccountConfig
    store: _OneRecord
    wait: StoreWait
    lifetime: float
    status: AccountStatus = field(default_factory=lambda: AccountStatus(health=Health.NO_STATE))
    state: None = None
    listeners: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The account's name."""
        return self.account.name

    @property
    def client(self) -> Any:
        """Never asked for: the KakaoTalk channel is left out while waiting."""
        raise RuntimeError("no Kakao client while waiting for the store")

    def health(self, now: datetime | None = None, *, host: str | None = None) -> AccountHealth:
        """Grade ``store_unavailable`` only (health.py's rule and threshold)."""
        now = now or utcnow()
        self.status.store_unavailable_since = self.wait.fleet.stats.unavailable_since
        self.status.store_error = self.wait.fleet.stats.last_error
        found: Condition | None = store_unavailable_condition(
            self.status, now, self.account.alerts, self.lifetime
        )
        return AccountHealth(
            account=self.name,
            conditions=(found,) if found is not None else (),
            serving_problem=self.wait.reason(),
            refresh_blocked=self.wait.reason(),
        )


def _published_lifetime(files: AccountStore) -> float | None:
    """The access lifetime of the token this node last published for the account."""
    try:
        document = files.read_published()
    except StoreError:
        return None
    if not document:
        return None
    try:
        issued = parse_time(str(document["refreshed_at"]))
        expires = parse_time(str(document["expires_at"]))
    except (KeyError, ValueError):
        return None
    lifetime = (expires - issued).total_seconds()
    return lifetime if lifetime > 0 else None


async def _first_of(
    stopping: Coroutine[Any, Any, Any],
    *,
    timeout: float | None = None,
    against: asyncio.Future[Any] | None = None,
) -> bool:
    """Wait for ``stopping`` until ``timeout`` passed or ``against`` is done; return True
    when ``stopping`` came first (``against`` is left running for the caller)."""
    stopped = asyncio.ensure_future(stopping)
    waited = {stopped} if against is None else {stopped, against}
    try:
        done, _ = await asyncio.wait(waited, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    return stopped in done and (against is None or against not in done)


class StoreWait:
    """The waiting start of a fleet node: its API, its alerts and the retries to open."""

    def __init__(self, daemon: Daemon, fleet: FleetStore, first: StoreUnavailable) -> None:
        self.daemon = daemon
        self.fleet = fleet
        fleet.failed(first)
        self.attempts = 1
        accounts = list(daemon.config.accounts.values())
        books = {a.name: AccountStore(a) for a in accounts}
        lifetimes = {name: _published_lifetime(files) for name, files in books.items()}
        known = [life for life in lifetimes.values() if life is not None]
        # Without a published token (never logged in here, or not published by this node):
        # the shortest one this node published, else Kakao's own access lifetime.
        fallback = min(known) if known else float(DEFAULT_ACCESS_LIFETIME)
        # The store's timers (its reconnect back-off among them) fit to these tokens before
        # it has read a row: a 6-second token's start must not retry once a minute.
        fleet.lifetime_hint = timedelta(seconds=fallback)
        if any(a.alerts.kakaotalk for a in accounts):
            log.warning(
                "KakaoTalk alerts need the account's access token, which comes from the store:"
                " while waiting for it, alerts go to the webhook and the command only"
            )
        self.alerts: dict[str, AccountAlerts] = {}
        assert daemon.session is not None
        for account in accounts:
            waiting = _Waiting(
                # No KakaoTalk: it sends with the account's token, read from the store.
                account=replace(account, alerts=replace(account.alerts, kakaotalk=False)),
                store=_OneRecord(books[account.name]),
                wait=self,
                lifetime=lifetimes[account.name] or fallback,
            )
            self.alerts[account.name] = AccountAlerts(
                cast("AccountManager", waiting),
                session=daemon.session,
                clock=daemon.clock,
                host=socket.gethostname(),
                retry_delay=RETRY_DELAY,
                shared=_NoFleetAlerts(),
            )

    def reason(self) -> str:
        """One line: what the node waits for, and why."""
        error = self.fleet.stats.last_error or "no answer"
        return f"waiting for the PostgreSQL store ({error})"

    def summary(self) -> str:
        """The systemd STATUS= line while waiting."""
        return f"fleet node {self.fleet.node}: {self.reason()}; attempt {self.attempts}"

    def evaluate(self) -> None:
        """Grade and send ``store_unavailable`` (or its resolution) for every account."""
        now = self.daemon.clock()
        for alerts in self.alerts.values():
            try:
                alerts.evaluate(now)
            except Exception:
                log.exception("account %s: evaluating alerts failed", alerts.name)

    async def run(self, stop: asyncio.Event) -> bool:
        """Try to open the store until it opens (True) or a stop is asked for (False).

        Only an unreachable database is waited for: what ``open()`` raises otherwise (the
        server refused this node, the store was moved, a newer schema) ends the start.
        """
        from ..systemd import status as systemd_status
        from .db import StoreRefused

        while True:
            self.evaluate()
            if await _first_of(stop.wait(), timeout=self.fleet.reconnect_delay(self.attempts)):
                return False
            self.attempts += 1
            opening = asyncio.ensure_future(self.fleet.open())
            if await _first_of(stop.wait(), against=opening):
                # A stop must not wait for an attempt on a host that does not answer (up to
                # libpq's connect_timeout, 10 s): the attempt is abandoned, one mid-query
                # (the migration) by ending its connection (db.end_tasks).
                with contextlib.suppress(BaseException):
                    await end_tasks([opening])
                await self.fleet.close()
                return False
            try:
                opening.result()
            except StoreRefused:
                await self.fleet.close()
                raise
            except StoreUnavailable as exc:
                await self.fleet.close()
                self.fleet.failed(exc)
                log.debug("the PostgreSQL store is still unavailable: %s", exc.message)
                systemd_status(self.summary())
                continue
            except BaseException:
                await self.fleet.close()
                raise
            log.warning("the PostgreSQL store answers after %d attempt(s): starting", self.attempts)
            return True

    async def close(self) -> None:
        """Deliver what is queued and stop the workers.

        The resolution is not decided here: without the account's tokens the bookkeeping
        drops a token condition silently (alerts._TOKEN_CONDITIONS). The record stays in the
        node-local file, and the running node's alert center, which has read the tokens,
        announces the resolution at its first evaluation.
        """
        await asyncio.gather(*(a.drain(CLOSE_GRACE) for a in self.alerts.values()))

    # ---------------------------------------------------------------- the local API

    def app(self) -> web.Application:
        """The local API while waiting: the same guard (TCP bearer token), every answer 503."""
        app = web.Application()
        app[DAEMON] = self.daemon
        app.middlewares.append(guard)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/accounts/{name}/token", self._token)
        app.router.add_route("*", "/{path:.*}", self._other)
        return app

    def _fleet_json(self) -> dict[str, Any]:
        stats = self.fleet.stats
        since = stats.unavailable_since
        return {
            "node": self.fleet.node,
            "store_up": False,
            "store_unavailable_since": format_time(since) if since else None,
            "store_error": stats.last_error,
            "waiting": True,
            "attempts": self.attempts,
        }

    async def _healthz(self, request: web.Request) -> web.Response:
        problems = {name: self.reason() for name in self.daemon.config.accounts}
        return unhealthy_answer(request, problems, {"fleet": self._fleet_json()})

    async def _token(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.json_response(
            {
                "error": f"no token for {name}: this node has not read the store yet",
                "reason": self.reason(),
                "fleet": self._fleet_json(),
            },
            status=503,
        )

    async def _other(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": f"starting: {self.reason()}", "fleet": self._fleet_json()}, status=503
        )
