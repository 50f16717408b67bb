"""KakaoEmulator: the state served over HTTP (kauth, kapi, faults, control API); start and stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from .control import ControlApi
from .faults import ENDPOINT_BY_PATH, FaultPlan, Handler
from .kapi import Kapi
from .kauth import Kauth
from .state import DEFAULT_USER_ID, EmulatorSettings, EmulatorState

logger = logging.getLogger(__name__)


class KakaoEmulator(EmulatorState):
    """An in-memory Kakao (kauth + kapi) with a virtual clock, fault injection and stats."""

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        super().__init__(settings)
        self._faults = FaultPlan(self.stats, self.settings.seed)
        self._kauth = Kauth(self)
        self._kapi = Kapi(self)
        self._control = ControlApi(self, self._faults)
        self._runner: web.AppRunner | None = None

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
        self._faults.inject(endpoint, kind, count=count, rate=rate, delay=delay)

    def clear_faults(self) -> None:
        """Disarm every fault."""
        self._faults.clear()

    def release_held(self) -> None:
        """Let the requests a ``hold`` fault keeps go on to be answered."""
        self._faults.release_held()

    @property
    def held_requests(self) -> int:
        """How many requests a ``hold`` fault keeps right now."""
        return self._faults.held

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
        return self._kauth.issue_tokens(user_id, scopes=scopes, refresh_remaining=refresh_remaining)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Every Kakao endpoint (not /_emulator/) is counted, runs the auto-unlink rule, and
        # may be answered by an armed fault instead.
        endpoint = ENDPOINT_BY_PATH.get(request.path)
        if endpoint is None:
            return await handler(request)
        self.stats.requests[endpoint] += 1
        self._auto_unlink_incomplete_signups()
        try:
            return await self._faults.handle(endpoint, request, handler)
        except ConnectionResetError:
            # The client hung up before its body was read (a daemon killed or timed out while a
            # `slow` fault held the request). Nobody is left to answer; without this, aiohttp
            # logs a traceback for each one, and soak logs bury real errors under them.
            logger.debug("the client of %s hung up before its request was read", endpoint)
            return web.Response(status=400, text="client closed the request")

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving kauth, kapi and /_emulator/ paths."""
        app = web.Application(middlewares=[self._middleware])
        self._kauth.add_routes(app.router)
        self._kapi.add_routes(app.router)
        self._control.add_routes(app.router)
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
