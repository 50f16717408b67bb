"""A loopback TCP proxy that a test controls: forward, pause, cut every connection, refuse.

Put it between a node and PostgreSQL (or anything else) to cut the node off::

    with TcpProxy("127.0.0.1", cluster.port) as proxy:
        dsn = proxy.dsn(cluster.dsn())      # the same DSN, through the proxy
        ...
        proxy.pause()     # hang: no byte passes either way; new connections hang too
        proxy.resume()    # held bytes are delivered in order, nothing lost
        proxy.cut()       # reset (RST) every open connection, both sides
        proxy.refuse()    # stop listening: new connections get ECONNREFUSED
        proxy.accept()    # listen again on the same port
        proxy.latency = 0.01  # every byte arrives 10 ms later, each way (a slow network)

What each one looks like to the two ends:

- ``cut()``: both ends see a reset at once, like a server or middlebox that died and said so.
- ``refuse()``: a host that is up with nothing listening; open connections are untouched.
- ``pause()``: a path that silently stops delivering. Unlike a real partition, the proxy's
  kernel still acknowledges TCP packets, so TCP keepalives and ``tcp_user_timeout`` do NOT
  fire: only the server's own timeouts (``idle_in_transaction_session_timeout``,
  ``statement_timeout``) and the client's own deadlines (``asyncio.timeout``) notice. This is
  what a hung PgBouncer or load balancer does, and it is the case a client cannot rely on
  TCP for.
- ``latency``: seconds each chunk is held before it is passed on, each way, in order (a round
  trip costs twice that): a database far away, or a machine so busy that every round trip is
  slow, made repeatable.

The proxy runs its own event loop in a thread, so it keeps working while the test's loop is
blocked or busy, and it serves synchronous tests and child processes alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from daemonproc import free_port

T = TypeVar("T")

_CHUNK = 64 * 1024
_CONTROL_TIMEOUT = 10.0
#: How many free ports (daemonproc.free_port) a proxy asked for any port tries to listen on.
_OWN_PORT_TRIES = 20
#: Loop iterations an accepted connection takes to get its transport (and protocol).
_ARRIVAL_ROUNDS = 3


class _Link:
    """One proxied connection: the client side and the upstream side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.handler = asyncio.current_task()

    def reset(self) -> None:
        """Close both sides with a TCP reset (SO_LINGER 0), not a polite FIN."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()
        if self.handler is not None:
            self.handler.cancel()


class _Delayed:
    """Chunks on their way through a proxy with latency: each is written at its time, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        #: Chunks put and not written yet (while any is, a new one must queue behind it).
        self.pending = 0

    def put(self, due: float, data: bytes) -> None:
        """Queue ``data`` to be written at ``due`` (the loop's clock); b"" ends delivery."""
        self.pending += 1
        self.queue.put_nowait((due, data))

    async def deliver(self, sink: asyncio.StreamWriter) -> None:
        """Write each chunk at its time until the empty one (or the sink is gone)."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            self.pending -= 1
            if not data:
                return
            try:
                sink.write(data)
                await sink.drain()
            except (ConnectionError, OSError):
                return  # the other side is gone; the pump ends on its own read


class _TrackedProtocol(asyncio.StreamReaderProtocol):
    """asyncio.start_server's protocol, noting its transport in ``accepted`` while it lives."""

    def __init__(
        self,
        accepted: set[asyncio.BaseTransport],
        reader: asyncio.StreamReader,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        super().__init__(reader, handler)
        self._accepted = accepted
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._accepted.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._accepted.discard(self._transport)
        super().connection_lost(exc)


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``upstream_host:upstream_port`` until told otherwise."""

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self.port = port
        #: Connections accepted so far (whether or not they reached the upstream).
        self.accepted = 0
        #: Seconds every chunk waits before it is passed on, each way (read at each chunk).
        self.latency = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._started = False
        #: While refusing: a socket bound to the port, not listening (connects are refused),
        #: so that no other program takes the port before accept() listens there again.
        self._placeholder: socket.socket | None = None
        #: Every accepted connection's transport until it is lost (closed by either side).
        self._accepted: set[asyncio.BaseTransport] = set()

    # -- control (called from the test's thread) ------------------------------------------------

    def start(self) -> TcpProxy:
        """Start listening; returns self."""
        if not self._started:
            self._thread.start()
            self._started = True
            self._call(self._setup())
        return self

    def close(self) -> None:
        """Reset every connection, stop listening and end the proxy's thread."""
        if not self._started:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CONTROL_TIMEOUT)
        self._loop.close()
        self._started = False

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def pause(self) -> None:
        """Stop passing bytes both ways; new connections are accepted but hang."""
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        """Pass bytes again, including those held while paused."""
        self._call(self._set_flowing(True))

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        return self._call(self._cut())

    def refuse(self) -> None:
        """Stop listening (connects get ECONNREFUSED); open connections stay as they are."""
        self._call(self._stop_listening())

    def accept(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        self._call(self._listen())

    @property
    def connections(self) -> int:
        """Return the number of open proxied connections."""
        return self._call(self._count())

    def dsn(self, dsn: str) -> str:
        """Return ``dsn`` (a libpq DSN or URI) pointed at this proxy instead of the server."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
        params.update(host=self.host, port=str(self.port))
        params.pop("hostaddr", None)
        return make_conninfo(**params)  # type: ignore[arg-type]

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CONTROL_TIMEOUT)

    # -- the proxy (runs in the proxy's thread) ------------------------------------------------

    async def _setup(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        if self.port == 0:
            self.port = await self._listen_outside_the_ephemeral_range()
        await self._listen()

    async def _listen_outside_the_ephemeral_range(self) -> int:
        """Listen on a free port below the kernel's ephemeral range (daemonproc.free_port);
        return it (0: none found, the kernel then picks one).

        Servers that bind port 0 (emulators, test apps) get ports from that range, and one
        was handed a refusing proxy's port while the proxy's open connections still used it
        (a CI run: psycopg met an HTTP server there, and accept() failed with EADDRINUSE).
        """
        for _ in range(_OWN_PORT_TRIES):
            port = free_port()
            try:
                self._server = await self._serve(port)
            except OSError:
                continue
            return port
        return 0

    async def _serve(self, port: int) -> asyncio.Server:
        """Listen on ``port``: asyncio.start_server's streams, with every accepted transport
        kept (self._accepted) from the moment it is made, before its handler runs."""

        def protocol() -> asyncio.StreamReaderProtocol:
            return _TrackedProtocol(self._accepted, asyncio.StreamReader(), self._handle)

        return await asyncio.get_running_loop().create_server(
            protocol, self.host, port, reuse_address=True
        )

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._release_port()
        self._server = await self._serve(self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # Accept nothing more, then let the connections accepted already arrive (a task
            # makes each one's transport) while the server is open: on Python 3.11 one whose
            # transport is made after close() trips an assertion (Server._attach) and leaks
            # its socket, which the garbage collector reported (ResourceWarning) in whatever
            # test ran then (a CI run's failure).
            loop = asyncio.get_running_loop()
            for listening in server.sockets:
                loop.remove_reader(listening.fileno())
            for _ in range(_ARRIVAL_ROUNDS):
                await asyncio.sleep(0)
            server.close()  # not wait_closed(): since 3.12 it waits for every connection
            self._hold_port()

    def _hold_port(self) -> None:
        """Bind a socket to the port without listening: connects are refused, and a parallel
        test's server that asks for the port (SO_REUSEADDR, as asyncio's do) cannot bind it.
        Only when no connection uses the port: the accepted ones have SO_REUSEADDR, and a
        socket without it cannot join them (the port is then as open as before)."""
        placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            placeholder.bind((self.host, self.port))
        except OSError:
            placeholder.close()
            return
        self._placeholder = placeholder

    def _release_port(self) -> None:
        placeholder, self._placeholder = self._placeholder, None
        if placeholder is not None:
            placeholder.close()

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        return len(links)

    async def _count(self) -> int:
        return len(self._links)

    async def _shutdown(self) -> None:
        await self._stop_listening()
        self._release_port()
        handlers = [link.handler for link in self._links if link.handler is not None]
        await self._cut()
        for transport in list(self._accepted):  # arrived, its handler not started yet
            transport.close()
        # Let the cancelled handlers finish before the loop stops: a task destroyed while
        # pending is reported (with a formatted traceback) when it is garbage-collected.
        await asyncio.gather(*handlers, return_exceptions=True)
        await asyncio.sleep(0)  # a closed transport's socket is closed in the next iteration

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        assert self._flowing is not None
        try:
            await self._flowing.wait()  # paused: the upstream must not see this connection yet
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                writer.transport.abort()  # the upstream refused: so do we
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            self._links.discard(link)
            for side in (writer, link.upstream):
                if side is not None:
                    side.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        # With latency, a second task delivers each chunk when its time comes, so reading
        # goes on meanwhile (a slow network, not a narrow one) and the order is kept. Without
        # it (and nothing still on its way) a chunk is written at once, as it always was.
        delayed = _Delayed()
        deliverer = asyncio.create_task(delayed.deliver(sink))
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(_CHUNK)
                await self._flowing.wait()  # a read that was under way when paused is held
                if not data:
                    break
                if self.latency > 0 or delayed.pending:
                    delayed.put(loop.time() + self.latency, data)
                    continue
                sink.write(data)
                await sink.drain()
            delayed.put(loop.time(), b"")  # the end, after what is on its way
            await deliverer
        except (ConnectionError, OSError):
            pass
        finally:
            deliverer.cancel()
            # One side ended: end the other too, so both ends see the close.
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()
