"""The tests' TCP proxy itself: it forwards faithfully and pauses, cuts and refuses on demand."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from pgcluster import PgServer
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """A loopback server that echoes every byte back; yields its port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    received = await reader.readexactly(len(payload))
    writer.close()
    return received


async def test_bytes_pass_unchanged_and_in_order(echo_server: int) -> None:
    """A megabyte of random bytes through the proxy and back comes out identical."""
    payload = os.urandom(1024 * 1024)
    with TcpProxy("127.0.0.1", echo_server) as proxy:
        assert await _roundtrip(proxy.port, payload) == payload
        assert proxy.accepted == 1


async def test_a_pause_holds_bytes_and_a_resume_delivers_them(echo_server: int) -> None:
    """While paused nothing arrives; after resume everything does, nothing lost."""
    payload = os.urandom(200_000)
    with TcpProxy("127.0.0.1", echo_server) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.pause()
        writer.write(payload)
        reading = asyncio.create_task(reader.readexactly(len(payload)))
        await asyncio.sleep(0.5)
        assert not reading.done()
        proxy.resume()
        assert await asyncio.wait_for(reading, 10) == payload
        writer.close()


async def test_latency_delays_each_way_keeps_the_order_and_not_the_throughput(
    echo_server: int,
) -> None:
    """With latency L a round trip takes at least 2 L; many chunks sent at once all arrive,
    in order, about one round trip later (a slow path, not a narrow one); latency 0 again
    makes it quick."""
    latency = 0.25
    with TcpProxy("127.0.0.1", echo_server) as proxy:
        proxy.latency = latency
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.monotonic()
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        assert time.monotonic() - started >= 2 * latency
        chunks = [os.urandom(1000) for _ in range(50)]
        started = time.monotonic()
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.005)  # separate reads at the proxy
        received = await asyncio.wait_for(reader.readexactly(50_000), 10)
        assert received == b"".join(chunks)
        # 50 chunks one after another would take 50 round trips if each waited for the last.
        assert time.monotonic() - started < 50 * 0.005 + 10 * latency
        proxy.latency = 0.0
        started = time.monotonic()
        writer.write(b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"pong"
        assert time.monotonic() - started < 2 * latency  # less than one delayed round trip
        writer.close()


def _dsn(pg_server: PgServer, proxy: TcpProxy) -> str:
    return proxy.dsn(pg_server.admin_dsn) + " connect_timeout=5"


def _server_port(pg_server: PgServer) -> int:
    from psycopg.conninfo import conninfo_to_dict

    return int(str(conninfo_to_dict(pg_server.admin_dsn).get("port", 5432)))


async def test_postgres_works_through_the_proxy_and_a_pause_hangs_it(pg_server: PgServer) -> None:
    """A query sent while paused does not complete; after resume it does, on the same session."""
    with TcpProxy("127.0.0.1", _server_port(pg_server)) as proxy:
        async with await psycopg.AsyncConnection.connect(_dsn(pg_server, proxy)) as conn:
            pid = (await (await conn.execute("SELECT pg_backend_pid()")).fetchall())[0][0]
            proxy.pause()
            query = asyncio.create_task(conn.execute("SELECT pg_backend_pid()"))
            connecting = asyncio.create_task(
                psycopg.AsyncConnection.connect(_dsn(pg_server, proxy))
            )
            await asyncio.sleep(0.7)
            assert not query.done() and not connecting.done()
            proxy.resume()
            assert await (await asyncio.wait_for(query, 10)).fetchone() == (pid,)
            late = await asyncio.wait_for(connecting, 10)
            await late.close()


async def test_cut_resets_every_open_connection(pg_server: PgServer) -> None:
    """After cut() the next statement fails at once; a new connection works."""
    with TcpProxy("127.0.0.1", _server_port(pg_server)) as proxy:
        conn = await psycopg.AsyncConnection.connect(_dsn(pg_server, proxy), autocommit=True)
        other = await psycopg.AsyncConnection.connect(_dsn(pg_server, proxy), autocommit=True)
        assert proxy.connections == 2
        assert proxy.cut() == 2
        started = time.monotonic()
        for victim in (conn, other):
            with pytest.raises(psycopg.OperationalError):
                await victim.execute("SELECT 1")
            await victim.close()
        assert time.monotonic() - started < 5
        async with await psycopg.AsyncConnection.connect(_dsn(pg_server, proxy)) as fresh:
            assert await (await fresh.execute("SELECT 1")).fetchone() == (1,)


async def test_refuse_turns_connects_away_and_accept_lets_them_in(pg_server: PgServer) -> None:
    """refuse(): ECONNREFUSED for new connections, open ones unharmed; accept() undoes it."""
    with TcpProxy("127.0.0.1", _server_port(pg_server)) as proxy:
        async with await psycopg.AsyncConnection.connect(_dsn(pg_server, proxy)) as kept:
            proxy.refuse()
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="refused"):
                await psycopg.AsyncConnection.connect(_dsn(pg_server, proxy))
            assert time.monotonic() - started < 3
            assert await (await kept.execute("SELECT 1")).fetchone() == (1,)
            proxy.accept()
            async with await psycopg.AsyncConnection.connect(_dsn(pg_server, proxy)) as again:
                assert await (await again.execute("SELECT 1")).fetchone() == (1,)


async def test_a_refusing_proxy_keeps_its_port_from_other_programs(echo_server: int) -> None:
    """While refusing with no connection open, the port stays the proxy's: another program
    that binds it (asyncio's servers ask for SO_REUSEADDR) fails, so accept() can listen
    there again. A parallel test run once took the port in that window and accept() failed
    with EADDRINUSE. (With connections left open the port is shared by them, which have
    SO_REUSEADDR, and another program may bind it as before.)"""
    with TcpProxy("127.0.0.1", echo_server) as proxy:
        assert await _roundtrip(proxy.port, b"before") == b"before"
        proxy.cut()
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            with pytest.raises(OSError) as taken:
                other.bind(("127.0.0.1", proxy.port))
            assert taken.value.errno == errno.EADDRINUSE
        finally:
            other.close()
        proxy.accept()
        assert await _roundtrip(proxy.port, b"after") == b"after"


async def test_a_proxy_listens_below_the_ports_the_kernel_hands_out(echo_server: int) -> None:
    """Servers that bind port 0 get ports from the kernel's ephemeral range; a proxy listens
    below it, so none of them is handed a refusing proxy's port (one was, in a CI run, while
    the proxy's open connections still used it: a client reached an HTTP server)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        low = int(ranges.read().split()[0])
    with TcpProxy("127.0.0.1", echo_server) as proxy:
        assert proxy.port < low
        assert await _roundtrip(proxy.port, b"through") == b"through"
        proxy.refuse()
        proxy.accept()
        assert await _roundtrip(proxy.port, b"again") == b"again"


def test_closing_the_proxy_closes_connections_it_has_just_accepted(echo_server: int) -> None:
    """Connections the proxy accepted just before close() (their handlers scheduled, not yet
    started) are closed with it: none is left for the garbage collector to report as an
    unclosed socket in whatever test runs next (a CI run failed on such a ResourceWarning)."""
    import gc
    import warnings

    for _ in range(20):
        proxy = TcpProxy("127.0.0.1", echo_server).start()
        clients = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(5)]
        proxy.close()
        for client in clients:
            client.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del proxy
            gc.collect()
        unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
        assert unclosed == [], [str(w.message) for w in unclosed]
