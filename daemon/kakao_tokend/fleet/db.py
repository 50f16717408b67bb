"""Connections to the PostgreSQL store: conninfo, pools, errors, deadlines on silent networks.

Every connection carries the same settings, so that a node that dies, hangs or is cut off
cannot hold an account's row lock for long, and a node whose database vanished notices:

- client side (libpq): ``connect_timeout``, TCP keepalives and ``tcp_user_timeout``;
- server side (``options=-c ...``): ``lock_timeout`` < ``statement_timeout``, and
  ``idle_in_transaction_session_timeout`` longer than the Kakao call made under a row lock,
  server TCP keepalives and ``client_connection_check_interval``; ``TimeZone=UTC``.

docs/fleet.md explains the ordering. psycopg and psycopg_pool are imported inside the
functions: file mode never loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import select
import socket
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import KakaoTokendError, StoreError, StoreUnavailable
from ..tokens import answer_patience, longest_open_request
from . import missing_extra

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

#: How much later than a :func:`deadline` its backstop cancels the block (a share of the
#: deadline): only for a wait the closed socket did not end (one not on the connection).
DEADLINE_BACKSTOP_SHARE = 0.1

#: Room for the local work done while a row lock is held besides the Kakao call itself
#: (sealing, the compare-and-swap, a rescue-file write with fsync, a slow event loop).
LOCAL_WORK_MARGIN = 30.0
#: The same room for a short-lived token, as a share of its lifetime (never more than
#: LOCAL_WORK_MARGIN): see DbTimeouts.idle_for.
LOCAL_WORK_SHARE = 1 / 6


#: The start of psycopg's WARNINGs about a connection that is already lost: when the store
#: gives up on a connection (a deadline shut its socket down, the database went away), its
#: transaction's rollback and the pool's return of it fail too, and psycopg says so. The store
#: has already reported the failure in its own words (store_unavailable, a failed commit), so
#: these are repeats: DEBUG, not WARNING, and psycopg keeps its own logger at WARNING, so they
#: show only to someone who turns it up. "error connecting" stays: it says *why* (a wrong
#: password, a refused connection).
LOST_CONNECTION_NOISE = (
    "error ignored in rollback",
    "discarding closed connection",
    "discarding broken connection",
    "rollback failed",
    "rolling back returned connection",
    "closing returned connection",
)


class LostConnectionNoise(logging.Filter):
    """Demote psycopg's repeats about a lost connection (LOST_CONNECTION_NOISE) to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(LOST_CONNECTION_NOISE)):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_LOST_CONNECTION_NOISE = LostConnectionNoise()
# A logger's filters see only its own records, not its children's: each psycopg logger that
# says these things (the connection, the transaction, the pool) gets the filter.
for _name in ("psycopg", "psycopg.transaction", "psycopg.pool"):
    logging.getLogger(_name).addFilter(_LOST_CONNECTION_NOISE)


@dataclass(frozen=True)
class DbTimeouts:
    """Timeouts and keepalives for store connections, in seconds.

    The defaults fit the default Kakao timeout of 30 s: see :meth:`for_kakao_timeout` and
    :meth:`problems` for the ordering they must keep.
    """

    connect: float = 10.0
    #: SKIP LOCKED never waits for row locks, but does wait for table locks (an ALTER TABLE).
    lock: float = 2.0
    #: Must exceed ``lock``: otherwise the statement timeout fires first with a vaguer error.
    statement: float = 5.0
    #: Backstop for a holder that hangs or is cut off mid-refresh: the server ends its session
    #: and the row lock goes. Must exceed the Kakao call plus the local work.
    idle_in_transaction: float = 90.0
    #: Server and client TCP keepalives: a vanished peer is found in idle + interval × count.
    keepalives_idle: int = 30
    keepalives_interval: int = 10
    keepalives_count: int = 3
    #: Client: give up on a connection whose sent data stays unacknowledged this long.
    tcp_user_timeout: float = 60.0
    #: Server: while a statement runs, check this often whether the client is still there.
    client_check_interval: float = 5.0
    #: Migrations wait longer for table locks (a refresh may hold a row lock meanwhile).
    migration_lock: float = 5.0
    migration_statement: float = 60.0
    #: The Kakao timeout the backstop is derived from, when it is the default (None: set by
    #: hand, so the backstop stays as derived): a default Kakao wait is fitted to a short
    #: token's lifetime (tokens.request_timeout), and so is the backstop (idle_for).
    fitted_kakao_timeout: float | None = None

    @classmethod
    def for_kakao_timeout(cls, kakao_timeout: float, *, default: float | None = None) -> DbTimeouts:
        """Return the defaults, with the idle-in-transaction backstop long enough for
        ``kakao_timeout`` (the total time one Kakao token request may take); ``default``
        is the Kakao timeout's default: when they agree, the backstop is fitted per token."""
        needed = math.ceil(longest_open_request(kakao_timeout) + LOCAL_WORK_MARGIN)
        return cls(
            idle_in_transaction=max(cls.idle_in_transaction, float(needed)),
            fitted_kakao_timeout=kakao_timeout if kakao_timeout == default else None,
        )

    def idle_for(self, lifetime: timedelta | None, heard: float | None = None) -> float:
        """Return the idle-in-transaction backstop for a hold of a token living ``lifetime``.

        The session's backstop (90 s) is sized for Kakao's hours-long tokens. A node stopped
        (SIGSTOP, a frozen VM) while it holds a row lock keeps the account from every other
        node that long: fifteen lifetimes of a 6-second token. With the default Kakao timeout
        the call under the lock stays open at most its fitted share of the lifetime (1/8,
        tokens.answer_patience), so the backstop is twice that plus a sixth of the lifetime
        for the local work (capped as before): 2.5 s for a 6-second token. After Kakao took
        ``heard`` seconds to answer the account's latest token request, the call waits at
        least twice that and stays open twice as long again (tokens.heard_floor), and the
        backstop grows with it: network delay does not shrink with the token's life.
        Hours-long tokens, and a Kakao timeout set by hand, keep the session's backstop.
        """
        default = self.fitted_kakao_timeout
        if default is None or lifetime is None or lifetime.total_seconds() <= 0:
            return self.idle_in_transaction
        kakao = answer_patience(default, default, lifetime, heard=heard)
        local = min(LOCAL_WORK_MARGIN, lifetime.total_seconds() * LOCAL_WORK_SHARE)
        return min(self.idle_in_transaction, 2 * kakao + local)

    def problems(self, kakao_timeout: float) -> list[str]:
        """Return every broken ordering rule as a readable sentence (empty when all hold)."""
        found = []
        if not 0 < self.lock < self.statement:
            found.append(
                f"lock timeout ({self.lock:g}s) must be shorter than the statement timeout "
                f"({self.statement:g}s), or a lock wait is reported as a cancelled statement"
            )
        open_for = longest_open_request(kakao_timeout)
        if self.idle_in_transaction < open_for + LOCAL_WORK_MARGIN:
            found.append(
                f"idle_in_transaction_session_timeout ({self.idle_in_transaction:g}s) must "
                f"exceed the longest a Kakao request stays open ({open_for:g}s: twice the"
                f" Kakao timeout, for a late answer) plus {LOCAL_WORK_MARGIN:g}s, or the server"
                " ends a healthy refresh after Kakao rotated the token"
            )
        if self.migration_lock >= self.migration_statement:
            found.append("the migration lock timeout must be shorter than its statement timeout")
        return found

    def server_options(self, *, migration: bool = False) -> str:
        """Return the ``options`` value that sets the server-side settings per session."""
        lock = self.migration_lock if migration else self.lock
        statement = self.migration_statement if migration else self.statement
        settings = {
            "lock_timeout": _ms(lock),
            "statement_timeout": _ms(statement),
            "idle_in_transaction_session_timeout": _ms(self.idle_in_transaction),
            "tcp_keepalives_idle": str(self.keepalives_idle),
            "tcp_keepalives_interval": str(self.keepalives_interval),
            "tcp_keepalives_count": str(self.keepalives_count),
            "client_connection_check_interval": _ms(self.client_check_interval),
            "TimeZone": "UTC",
        }
        return " ".join(f"-c {name}={value}" for name, value in settings.items())

    def libpq_params(self) -> dict[str, str]:
        """Return the client-side connection parameters (libpq names)."""
        return {
            "connect_timeout": str(max(2, math.ceil(self.connect))),  # libpq's minimum is 2
            "keepalives": "1",
            "keepalives_idle": str(self.keepalives_idle),
            "keepalives_interval": str(self.keepalives_interval),
            "keepalives_count": str(self.keepalives_count),
            "tcp_user_timeout": str(int(self.tcp_user_timeout * 1000)),
        }


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def conninfo(
    dsn: str,
    *,
    node: str,
    purpose: str,
    timeouts: DbTimeouts | None = None,
    migration: bool = False,
) -> str:
    """Return ``dsn`` (libpq key=value or a postgresql:// URI) with our settings added.

    Client parameters the operator set in the DSN win (they know their network); our
    server-side ``options`` are appended after theirs, so the timeout ordering always holds.
    ``application_name`` shows the node and the connection's purpose in pg_stat_activity.
    A DSN that does not parse raises :class:`StoreError` without echoing it (it may hold a
    password).
    """
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
    except ImportError as exc:
        raise missing_extra(exc) from None
    timeouts = timeouts or DbTimeouts()
    try:
        params: dict[str, Any] = conninfo_to_dict(dsn)
    except ProgrammingError:
        raise StoreError(
            "the store's DSN is not a valid libpq connection string or postgresql:// URI "
            "(value not shown)",
            hint='e.g. "host=db.example port=5432 dbname=tokend user=tokend" in [store] dsn_file',
        ) from None
    for name, value in timeouts.libpq_params().items():
        params.setdefault(name, value)
    params.setdefault("application_name", f"kakao-tokend {node} {purpose}"[:63])
    ours = timeouts.server_options(migration=migration)
    theirs = params.get("options")
    params["options"] = f"{theirs} {ours}" if theirs else ours
    return make_conninfo("", **params)


@contextlib.contextmanager
def store_errors(action: str) -> Iterator[None]:
    """Turn psycopg's errors inside the block into ours, with one readable line.

    Connection problems, timeouts and lock waits become :class:`StoreUnavailable` (try
    again later); anything else the server refused becomes :class:`StoreError`. Server
    messages name hosts, users and SQL states, never the DSN's password.
    """
    try:
        import psycopg
        from psycopg import errors as pg_errors
        from psycopg_pool import PoolTimeout
    except ImportError as exc:
        raise missing_extra(exc) from None
    try:
        yield
    except KakaoTokendError:
        raise
    except PoolTimeout as exc:
        raise StoreUnavailable(
            f"cannot {action}: no database connection within the pool timeout ({_first(exc)})",
            hint="check that PostgreSQL is up and reachable from this node",
        ) from None
    except (
        psycopg.OperationalError,
        # 25P03 is an InternalError to psycopg, but it only means the server ended a session
        # that sat in a transaction too long (idle_in_transaction_session_timeout).
        pg_errors.IdleInTransactionSessionTimeout,
        pg_errors.QueryCanceled,
        pg_errors.LockNotAvailable,
        pg_errors.SerializationFailure,
        pg_errors.DeadlockDetected,
    ) as exc:
        unavailable = StoreRefused if refused(exc) else StoreUnavailable
        raise unavailable(f"cannot {action}: {_first(exc)}", hint=_connect_hint(exc)) from None
    except psycopg.Error as exc:
        state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        raise StoreError(f"cannot {action}: {_first(exc)}{state}") from None


#: What libpq writes when the server answered and refused the session (a wrong role,
#: password or database, or no pg_hba.conf line): no SQLSTATE comes with it, only the text.
_REFUSED_BY_THE_SERVER = "FATAL:"
#: FATAL answers that are an outage, not a mistake: a server starting, stopping or
#: recovering (57P03), or out of connection slots (53300). Waited out like no answer.
_SERVER_BUSY = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "too many clients already",
    "remaining connection slots are reserved",
)


class StoreRefused(StoreUnavailable):
    """The server answered and refused this node (a wrong user, password or database, no
    pg_hba.conf line): a mistake to fix, not an outage to wait out. A node starts only
    after it is fixed; a running node treats it as the store being unavailable."""


def refused(exc: BaseException) -> bool:
    """Return True when a connection failure is the server's refusal, not an outage."""
    text = str(exc)
    return _REFUSED_BY_THE_SERVER in text and not any(busy in text for busy in _SERVER_BUSY)


def _connect_hint(exc: BaseException) -> str:
    """The fix for a connection problem: the server refused us, or we did not reach it."""
    if refused(exc):
        return (
            "the server answered but refused this node: check the user, password and dbname"
            " in the DSN ([store] dsn_*) and the server's pg_hba.conf"
        )
    return "check that PostgreSQL is up and reachable from this node"


def _first(exc: BaseException) -> str:
    """The first line of an error message (libpq adds indented detail lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def connect(
    dsn: str,
    *,
    node: str,
    purpose: str,
    timeouts: DbTimeouts | None = None,
    autocommit: bool = False,
    migration: bool = False,
) -> AsyncConnection[Any]:
    """Open one direct connection (migrator, listener, CLI); StoreUnavailable on failure.

    The listener and the migrator need a direct connection, not a pooled one: LISTEN and
    advisory locks belong to the session (and break behind PgBouncer in transaction mode).
    """
    try:
        from psycopg import AsyncConnection
    except ImportError as exc:
        raise missing_extra(exc) from None
    info = conninfo(dsn, node=node, purpose=purpose, timeouts=timeouts, migration=migration)
    with store_errors("connect to the PostgreSQL store"):
        return await AsyncConnection.connect(info, autocommit=autocommit)


def create_pool(
    dsn: str,
    *,
    node: str,
    max_size: int,
    min_size: int = 1,
    timeouts: DbTimeouts | None = None,
    timeout: float = 10.0,
    max_idle: float = 300.0,
) -> AsyncConnectionPool[AsyncConnection[Any]]:
    """Return an unopened pool of store connections; open it with :func:`open_pool`.

    The pool has no ``check``: its check of a connection before lending it runs without a
    deadline, and on a database that went silent while the connection sat idle it waited for
    ever. The borrower checks instead, under :func:`deadline` (FleetStore.getconn), so one
    the server killed (a restart, idle_in_transaction_session_timeout) is still replaced
    instead of handed out. Each in-flight refresh pins one connection for as long as its
    Kakao call takes: size the pool for the refreshes that may run at once, plus one.
    """
    try:
        from psycopg_pool import AsyncConnectionPool
    except ImportError as exc:
        raise missing_extra(exc) from None
    info = conninfo(dsn, node=node, purpose="pool", timeouts=timeouts)
    return AsyncConnectionPool(
        info,
        open=False,  # opening in the constructor needs a running loop and warns
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        max_idle=max_idle,
        name=f"kakao-tokend {node}",
    )


async def check(conn: AsyncConnection[Any], seconds: float) -> None:
    """A round trip on ``conn`` (an empty query) within ``seconds``; TimeoutError after that,
    the connection's socket shut down (see :func:`deadline`). Other errors: it is broken."""
    from psycopg_pool import AsyncConnectionPool

    async with deadline(conn, seconds):
        await AsyncConnectionPool.check_connection(conn)


async def open_pool(pool: AsyncConnectionPool[AsyncConnection[Any]], timeout: float) -> None:
    """Open ``pool`` and wait for its first connection: StoreUnavailable after ``timeout``."""
    with store_errors("open the PostgreSQL store's connection pool"):
        await pool.open(wait=True, timeout=timeout)


@dataclass
class _Working:
    """A connection a task works on inside a :func:`deadline` block."""

    conn: AsyncConnection[Any]
    #: Set by :func:`abandon`: the block ends with CancelledError, whatever it raised.
    abandoned: bool = False


#: The connections each task works on inside deadline() blocks, innermost last.
_working: weakref.WeakKeyDictionary[asyncio.Task[Any], list[_Working]] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def deadline(conn: AsyncConnection[Any], seconds: float) -> AsyncIterator[None]:
    """Give the work on ``conn`` inside the block ``seconds``; TimeoutError after that.

    Not ``asyncio.timeout()`` alone: psycopg answers a cancelled query by sending a cancel
    request on a new connection and waiting for it, then for the query, up to five seconds
    each, over the same network that went silent (a hung middlebox, a partition whose packets
    are dropped): the operation returned about ten seconds after its deadline. Instead, at the
    deadline the connection's socket is shut down here: psycopg's wait sees the end of the
    stream at once, the connection is broken (closed and discarded when it is given back, see
    FleetStore.putconn) and nothing is sent on the silent path. A cancel after a share more
    is the backstop for a wait that is not on the connection. A task stopped inside the block
    is stopped the same way (:func:`abandon`). A deadline that runs out while the answer
    waits in the socket (the process was stopped or its loop stalled, not the database) is
    given a share more, once, to read it.
    """
    loop = asyncio.get_running_loop()
    fired = False
    extended = False
    working = _Working(conn)
    task = asyncio.current_task()
    if task is not None:
        _working.setdefault(task, []).append(working)
    backstop = asyncio.timeout(seconds * (1 + DEADLINE_BACKSTOP_SHARE))
    handle: asyncio.TimerHandle

    def expire() -> None:
        nonlocal fired, extended, handle
        if not extended and _answered(conn):
            # The database answered; this process was late to read it (it was stopped, or
            # its loop stalled: every deadline ran out at once when it ran again). A share
            # more, once, lets psycopg take the answer instead of ending a working session.
            extended = True
            grace = seconds * DEADLINE_BACKSTOP_SHARE
            handle = loop.call_later(grace, expire)
            backstop.reschedule(loop.time() + 2 * grace)
            return
        fired = True
        shut_down(conn)

    handle = loop.call_later(seconds, expire)
    try:
        async with backstop:
            yield
    except Exception as exc:
        if working.abandoned:
            raise asyncio.CancelledError from None
        if fired and not isinstance(exc, TimeoutError):
            raise TimeoutError(f"no answer within {seconds:g}s") from None
        raise
    else:
        if working.abandoned:  # the answer came before the end of the stream did
            raise asyncio.CancelledError
    finally:
        handle.cancel()
        if task is not None:
            entries = _working.get(task, [])
            if working in entries:
                entries.remove(working)
            if not entries:
                _working.pop(task, None)


def _answered(conn: AsyncConnection[Any]) -> bool:
    """Return True when the connection's socket has something to read now (an answer)."""
    try:  # a closed connection has no descriptor: nothing to read
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except Exception:
        return False
    return bool(readable)


def no_answer(action: str, seconds: float) -> StoreUnavailable:
    """The error for a store operation whose :func:`deadline` ran out: one wording for all."""
    return StoreUnavailable(f"cannot {action}: the database did not answer within {seconds:g}s")


#: How long :func:`end_tasks` waits for a stopped task before it cancels it again.
ABANDON_GRACE = 0.5


def abandon(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` without a cancel request into psycopg.

    A task cancelled while psycopg waits for a query's answer makes psycopg send a cancel
    request on a new connection and wait for it (see :func:`deadline`): on a silent network a
    stop waited ten seconds for each such task. A task working inside a deadline() block has
    the connection's socket shut down instead and leaves the block with CancelledError; the
    others (sleeping, connecting, idle in LISTEN) are cancelled as usual. A stop waits with
    :func:`end_tasks`, which also ends a task that did not.
    """
    for task in tasks:
        entries = _working.get(task) if isinstance(task, asyncio.Task) else None
        if not entries:
            task.cancel()
            continue
        for working in entries:
            working.abandoned = True
            shut_down(working.conn)


async def end_tasks(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Stop ``tasks`` (:func:`abandon`) and wait until each has ended.

    A cancel can be lost: Python 3.11's asyncio.wait_for, which psycopg_pool's getconn uses,
    returns a result that came together with it, and a task's loop goes on. A fleet node's
    notification task went back to waiting for the next notification, and its stop waited
    for it for over 70 s in two test runs. A task stopped inside a deadline() block while it
    waits on something else than the connection does not notice the shutdown either. So
    each task still running ABANDON_GRACE later is cancelled (again), until it has ended.
    """
    abandon(tasks)
    for task in tasks:
        while not task.done():
            await asyncio.wait({task}, timeout=ABANDON_GRACE)
            if not task.done():
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def shut_down(conn: AsyncConnection[Any]) -> None:
    """Shut the connection's socket down (both ways) without closing its descriptor.

    Closing the descriptor under psycopg's pending wait would leave the event loop watching a
    number the next socket may get; ``shutdown()`` on a duplicate ends the TCP session for
    every descriptor of it, and the wait on the original one returns with the end of the
    stream.
    """
    with contextlib.suppress(Exception):  # already closed: nothing to end
        fd = conn.fileno()
        with socket.socket(fileno=socket.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
