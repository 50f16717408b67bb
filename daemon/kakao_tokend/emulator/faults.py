"""Fault injection: the fault kinds, the armed faults, and what each answers instead of Kakao."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from .kapi import api_error
from .kauth import html_page, oauth_error
from .state import EmulatorStats, new_token

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The names faults (and the request counters in the stats) use for Kakao's endpoints.
ENDPOINT_BY_PATH = {
    "/oauth/token": "token",
    "/oauth/authorize": "authorize",
    "/v1/user/access_token_info": "access_token_info",
    "/v2/user/me": "user_me",
    "/v2/api/talk/memo/default/send": "memo",
    "/v1/user/logout": "logout",
    "/v1/user/unlink": "unlink",
}
ENDPOINTS = frozenset({*ENDPOINT_BY_PATH.values(), "*"})
# kapi error faults: kind -> (HTTP status, code, msg), as Kakao answers them.
KAPI_FAULTS: dict[str, tuple[int, int, str]] = {
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
        "http429",
        "http429_retry_after",
        "koe003",
        "koe237",
        "timeout",
        "slow",
        "late",
        "hold",
        "reset",
        "truncated",
        "non_json",
        "lost_response",
        *KAPI_FAULTS,
    }
)
_DEFAULT_DELAY = {"timeout": 60.0, "slow": 2.0, "late": 2.0, "hold": 60.0}
#: The Retry-After (seconds) of the ``http429_retry_after`` fault.
RETRY_AFTER = 3600


@dataclass
class Fault:
    """One armed fault: fires ``count`` more times, or on each request with probability ``rate``."""

    endpoint: str
    kind: str
    count: int | None
    rate: float | None
    delay: float

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able view for the control API."""
        return asdict(self)


class FaultPlan:
    """The armed faults, and the code that answers with one instead of the endpoint."""

    def __init__(self, stats: EmulatorStats, seed: int | None = None) -> None:
        self.stats = stats
        self.armed: list[Fault] = []
        self._random = random.Random(seed)
        #: Set by :meth:`release_held`: every request a ``hold`` fault keeps goes on to Kakao.
        self._released = asyncio.Event()
        #: How many requests a ``hold`` fault keeps right now.
        self.held = 0

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
        if kind == "hold":
            self._released = asyncio.Event()
        self.armed.append(Fault(endpoint, kind, count, rate, resolved))

    def clear(self) -> None:
        """Disarm every fault."""
        self.armed.clear()

    def release_held(self) -> None:
        """Let every request a ``hold`` fault keeps (and any it catches later) reach Kakao."""
        self._released.set()

    def _take(self, endpoint: str) -> Fault | None:
        for fault in list(self.armed):
            if fault.endpoint not in (endpoint, "*"):
                continue
            # A wildcard lost_response fires on the token endpoint only (nothing to lose elsewhere).
            if fault.kind == "lost_response" and endpoint != "token":
                continue
            if fault.rate is not None:
                if self._random.random() < fault.rate:
                    return fault
                continue
            assert fault.count is not None
            fault.count -= 1
            if fault.count <= 0:
                self.armed.remove(fault)
            return fault
        return None

    async def handle(
        self, endpoint: str, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Answer a request to ``endpoint``: with an armed fault if one fires, else normally."""
        fault = self._take(endpoint)
        if fault is None:
            return await handler(request)
        self.stats.faults_fired[fault.kind] += 1
        logger.debug("fault %s fired on %s", fault.kind, endpoint)
        return await self._apply(fault, request, handler)

    async def _apply(
        self, fault: Fault, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        kind = fault.kind
        if kind in ("timeout", "slow"):
            await asyncio.sleep(fault.delay)
            return await handler(request)
        if kind == "late":
            # Kakao does the work (a refresh, a rotation) at once; its answer travels slowly.
            answer = await handler(request)
            await asyncio.sleep(fault.delay)
            return answer
        if kind == "hold":
            return await self._hold(fault, request, handler)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if kind == "http500":
            return web.Response(status=500, text="Internal Server Error")
        if kind == "http502_html":
            page = "<h1>502 Bad Gateway</h1><p>The upstream server is unavailable.</p>"
            return html_page("502 Bad Gateway", page, status=502)
        if kind == "http503":
            return web.Response(status=503, text="Service Unavailable")
        if kind == "http429":
            return web.Response(status=429, text="Too Many Requests")
        if kind == "http429_retry_after":
            # An hour: longer than any test token lives, so a client must cap the pause.
            headers = {"Retry-After": str(RETRY_AFTER)}
            return web.Response(status=429, text="Too Many Requests", headers=headers)
        if kind == "koe003":
            return oauth_error(self.stats, "server_error", "temporary server error", "KOE003", 500)
        if kind == "koe237":
            return oauth_error(
                self.stats, "invalid_request", "token request rate limit exceeded", "KOE237"
            )
        if kind == "non_json":
            return web.Response(status=200, text="hello from a captive portal")
        if kind == "reset":
            return await _abort(request)
        if kind == "truncated":
            payload = json.dumps(
                {"token_type": "bearer", "access_token": new_token(), "expires_in": 21599}
            ).encode()
            response = web.StreamResponse(status=200)
            response.content_type = "application/json"
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            return await _abort(request)
        if kind == "lost_response":
            await handler(request)  # the server commits (refresh, rotation) ...
            return await _abort(request)  # ... and the client never hears about it
        status, code, msg = KAPI_FAULTS[kind]
        return api_error(self.stats, status, code, msg)

    async def _hold(
        self, fault: Fault, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Answer ``request`` once :meth:`release_held` is called, or after the fault's delay.

        A test can so order "Kakao processes this request after that event" without betting on
        how long a loaded machine takes to reach the event. The body is read first: the request
        has arrived, so Kakao processes it even when its client is gone by then.
        """
        await request.read()  # cached: the endpoint's request.post() parses these bytes
        self.held += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), fault.delay)
            return await handler(request)
        finally:
            self.held -= 1


async def _abort(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is not None:
        transport.abort()
    # Nothing can be sent any more; aiohttp drops the write to the closed transport.
    raise asyncio.CancelledError
