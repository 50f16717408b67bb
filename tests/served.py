"""The daemon served in-process by service.serve(): the real Application on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kakao_tokend.config import Config, load_config
from kakao_tokend.service import serve
from kakao_tokend.status import AccountEvent


@dataclass
class Served:
    """A daemon served in-process by service.serve() on real sockets."""

    config: Config
    config_path: Path
    socket: Path
    events: list[AccountEvent] = field(default_factory=list)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[aiohttp.ClientSession]:
        """A client session speaking to the Unix socket."""
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with aiohttp.ClientSession(connector=connector, base_url="http://tokend") as session:
            yield session

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        """GET over the Unix socket; return (status, JSON)."""
        return await self.request("GET", path, **kwargs)

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Any request over the Unix socket; return (status, JSON)."""
        async with self.client() as session, session.request(method, path, **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)

    async def text(self, path: str, **kwargs: Any) -> tuple[int, str]:
        """GET over the Unix socket; return (status, body text)."""
        async with self.client() as session, session.get(path, **kwargs) as resp:
            return resp.status, await resp.text()

    def events_of(self, kind: str) -> list[AccountEvent]:
        """Events of one kind seen so far."""
        return [e for e in self.events if e.kind == kind]


@asynccontextmanager
async def serving(config_path: Path) -> AsyncIterator[Served]:
    """Run service.serve() (the real Application, sockets and all) until the block ends."""
    config = load_config(config_path)
    served = Served(config, config_path, config.api_socket)
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(config, config_path=config_path, stop=stop, listeners=[served.events.append])
    )
    for _ in range(400):
        if task.done():
            raise AssertionError(f"serve() ended early with {task.result()}")
        if served.socket.exists():
            break
        await asyncio.sleep(0.025)
    await asyncio.sleep(0.05)
    try:
        yield served
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
