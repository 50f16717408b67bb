"""The local API's limits on connections and request heads: no caller starves refreshes.

A listener holds at most so many connections, and a request head has so long to arrive, so
that no caller can use up the open files that refreshing and saving need. aiohttp's server
has neither: every connection was accepted until the process ran out of open files (then
refreshes failed with "Too many open files" and asyncio logged a traceback per accept), and a
connection that never completes its first request head was kept for ever (an hour, its
keep-alive timeout, in its newest releases).

Here each listener serves through :class:`Listener`, a protocol factory around aiohttp's
documented one (``runner.server``, "a protocol factory compatible with create_server()"): it
counts the listener's connections, answers those over the cap 503 and closes them at once,
and gives a connection REQUEST_HEAD_TIMEOUT for its first head. Later heads on a kept-alive
connection get the same time through aiohttp's own keepalive_timeout (RUNNER_OPTIONS).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

#: A connection has this long to send a complete request head, counted from its opening or
#: from the answer to its previous request (like nginx's client_header_timeout, 60 s there).
#: The callers are local programs (or, with allow_non_loopback, machines on the LAN) that
#: send a few hundred bytes at once: 10 s is ample for them, and it bounds how long a caller
#: that sends nothing, a partial head, or a byte now and then holds a connection. The API is
#: not on the refresh path (the daemon refreshes on its own), so a fixed bound is right here.
REQUEST_HEAD_TIMEOUT = 10.0

#: Connections one listener (the Unix socket, the TCP listener) holds at most; more are
#: answered 503 and closed at once. Each is an open file: with the common soft limit of 1,024
#: (systemd's default, when the limit cannot be raised) the two listeners together hold at most
#: a quarter of it, and a flood on the TCP listener leaves the socket's consumers their own.
MAX_CONNECTIONS = 128

#: Open files kept for everything but the API's connections: at most MAX_RUNNING (10)
#: refreshes at once, each with a lock file, a state directory, a temporary file and a
#: connection to Kakao; the token files, sinks and templates they publish; hooks and alert
#: commands (three pipes each); alert deliveries; the state-directory watch; in fleet mode the
#: database pool. A few dozen in all: 512 leaves ample room, and with a soft limit of 1,024
#: it still allows the full MAX_CONNECTIONS on each listener.
RESERVED_FILES = 512

#: The fewest connections a listener takes however low the open-file limit (see listener_cap).
MIN_CONNECTIONS = 8

#: The number of listeners the API may have (the Unix socket and the TCP listener).
LISTENERS = 2

#: Lines about refused connections, failed accepts and requests that are not HTTP come at
#: most this often.
LOG_INTERVAL = 60.0


class _NotHttp(logging.Filter):
    """Turn aiohttp's traceback for a request it cannot parse (the caller's doing, not a bug)
    into one line a minute that does not quote the request; pass every other record.

    aiohttp logs "Error handling request" with the parser's exception, whose text quotes the
    request's bytes (an Authorization header among them), for every such request: a caller
    without the bearer token could fill the log as fast as it can connect.
    """

    def __init__(self) -> None:
        super().__init__()
        self._logged_at: float | None = None
        self._count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self._count += 1
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            return False
        record.msg = (
            "local API: a caller sent a request that is not valid HTTP (%s), answered %d (%d"
            " since this line last came; it comes at most once a minute)"
        )
        record.args = (type(exc).__name__, exc.code, self._count)
        record.exc_info = record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._logged_at = now
        self._count = 0
        return True


#: The logger aiohttp's request handlers report to (RUNNER_OPTIONS), through _NotHttp.
REQUEST_LOG = log.getChild("requests")
REQUEST_LOG.addFilter(_NotHttp())

#: What the API's web.AppRunner gets. aiohttp's keepalive_timeout closes a kept-alive
#: connection whose next head has not come REQUEST_HEAD_TIMEOUT after its previous answer
#: (its default, 3,630 s, kept one for an hour); its logger is REQUEST_LOG.
RUNNER_OPTIONS: Final[dict[str, Any]] = {
    "keepalive_timeout": REQUEST_HEAD_TIMEOUT,
    "logger": REQUEST_LOG,
}

#: The answer to a connection over the cap (it is closed right after).
TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
TOO_MANY_BODY = b'{"error": "the local API has too many open connections; try again in a moment"}'


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (the daemon uses epoll, never select()).

    systemd starts services with a soft limit of 1,024, for programs that still use select(),
    and a hard one of 524,288, and asks programs that need more to raise the soft limit
    themselves (systemd.exec(5), LimitNOFILE=): the shipped units therefore set no
    LimitNOFILE=. Without systemd the same applies to `ulimit -n`. Children (hooks, alert
    commands, template commands) inherit the raised limit, as they would LimitNOFILE=.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # a hard limit the kernel refuses (above nr_open)
        log.debug("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return
    log.debug("open-file limit raised from %d to %d (the hard limit)", soft, hard)


def listener_cap() -> int:
    """Return how many connections each listener takes: MAX_CONNECTIONS, fewer when the
    open-file limit leaves less than that beside RESERVED_FILES (never below MIN_CONNECTIONS)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    share = (soft - RESERVED_FILES) // LISTENERS
    if share >= MAX_CONNECTIONS:
        return MAX_CONNECTIONS
    cap = max(MIN_CONNECTIONS, share)
    log.warning(
        "the open-file limit is only %d: the local API takes at most %d connections on each"
        " listener; raise it (LimitNOFILE= in the unit, `ulimit -n` elsewhere) to at least %d",
        soft,
        cap,
        RESERVED_FILES + LISTENERS * MAX_CONNECTIONS,
    )
    return cap


class Listener:
    """The protocol factory of one API listener: aiohttp's ``server`` behind a cap on open
    connections and a deadline for the first request head (asyncio calls it per accept)."""

    def __init__(self, server: web.Server, name: str, *, cap: int) -> None:
        self.server = server
        self.name = name
        self.cap = cap
        self.open = 0
        self._refused = 0
        self._logged_at: float | None = None
        self._loop = asyncio.get_running_loop()

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.cap:
            self._note_refused()
            return _Refused()
        self.open += 1
        return _Connection(self, self.server())

    def _note_refused(self) -> None:
        self._refused += 1
        now = self._loop.time()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            return
        log.warning(
            "local API on %s: %d connections open, the most it takes; new ones are answered"
            " 503 (%d since this line last came; it comes at most once a minute)",
            self.name,
            self.open,
            self._refused,
        )
        self._logged_at = now
        self._refused = 0


class _Connection(asyncio.Protocol):
    """One API connection: asyncio talks to this, this to aiohttp's handler.

    It counts the connection out when it is lost, and closes it when its first request head
    has not arrived complete REQUEST_HEAD_TIMEOUT after it opened, however slowly bytes
    trickle in. A head that aiohttp accepts ends with an empty line (CRLF CRLF: its parsers
    take no bare LF), so a connection that sent none has no request in progress either.
    """

    __slots__ = ("_deadline", "_handler", "_listener", "_tail", "_transport")

    def __init__(self, listener: Listener, handler: asyncio.Protocol) -> None:
        self._listener = listener
        self._handler = handler
        self._transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(REQUEST_HEAD_TIMEOUT, self._too_slow)
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            if b"\r\n\r\n" in self._tail + data[:3] or b"\r\n\r\n" in data:
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = (self._tail + data)[-3:]
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._listener.open -= 1
        self._handler.connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if self._transport is not None:
            self._transport.close()


class _Refused(asyncio.Protocol):
    """A connection over the cap: answered 503 and closed at once (its descriptor with it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(TOO_MANY % (len(TOO_MANY_BODY), TOO_MANY_BODY))
        transport.close()


#: The errors with which accept() says the process (or system) is out of descriptors or
#: memory; asyncio then logs a traceback and tries again a second later (selector_events.py),
#: about a hundred times a second per listener.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AcceptErrors:
    """An event-loop exception handler that reports failed accepts in one line at most once a
    minute (no traceback), and passes everything else to the previous handler.

    Out of descriptors, asyncio logged a traceback per connection it could not accept: the
    audit's 166 MB of log in 90 s, which under journald's rate limit would crowd out the lines
    that matter. asyncio goes on trying every second by itself.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self._logged_at: float | None = None
        self._failed = 0

    def install(self) -> None:
        self._loop.set_exception_handler(self)

    def uninstall(self) -> None:
        self._loop.set_exception_handler(self._previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (
            isinstance(exc, OSError)
            and exc.errno in _OUT_OF_RESOURCES
            and "socket.accept()" in str(context.get("message", ""))
        ):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self._failed += 1
        now = loop.time()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            return
        log.error(
            "cannot accept connections on the local API: %s (%d times since this line last"
            " came; it comes at most once a minute; asyncio tries again every second)",
            exc.strerror or exc,
            self._failed,
        )
        self._logged_at = now
        self._failed = 0
