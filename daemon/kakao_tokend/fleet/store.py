"""The PostgreSQL store on a node: a cache of the rows, the row lock as the account's hold.

:class:`FleetStore` is the node's side of the database: the connection pool, the keys, and a
decrypted copy of every account row that LISTEN/NOTIFY and the heartbeat's poll keep current
(fleet/node.py). :class:`PgAccountStore` fills storage.AccountStorage for one account with it,
so the refresher runs unchanged (docs/fleet.md, "The refresh transaction"):

- ``hold(wait)`` takes a pooled connection, ``BEGIN``, and the row's lock with
  ``SELECT … FOR UPDATE SKIP LOCKED``; a row another node holds is tried again until ``wait``
  ran out, then :class:`~kakao_tokend.errors.StoreClaimed`. The lock is held across the Kakao
  call; the session's idle_in_transaction_session_timeout (fleet/db.py) outlasts that call.
- ``load`` inside the hold is the row read under the lock; ``save`` stages the new state;
  when the block ends the compare-and-swap ``UPDATE … WHERE generation = g`` (or an ``INSERT``
  for a new account), the ``NOTIFY`` and the ``COMMIT`` run, and only then does the refresher
  publish. A commit that fails raises StoreWriteError: the refresher keeps the state in memory
  and in the **encrypted** rescue file, and commits it later with the same compare-and-swap.
- Outside a hold ``load`` is the cached row: serving never waits for the database.
- Published token files stay local files on each node, and so does the bookkeeping of the
  alerts about the node itself (health.NODE_LOCAL); the account's alerts are recorded in the
  ``alerts`` table (fleet/alertshare.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, LiteralString, Protocol

from ..config import REFRESH_HEARTBEAT
from ..errors import (
    DATABASE_WRITE,
    StoreClaimed,
    StoreError,
    StoreOvertaken,
    StoreUnavailable,
    StoreWriteError,
    TokenDecryptError,
)
from ..state import AccountState, Rotation, parse_json
from ..store import (
    ALERTS_SUFFIX,
    STATE_FILE_MODE,
    AccountFiles,
    AccountStore,
    atomic_write,
    directory_text,
    make_dirs,
    read_file,
    rescue_not_written,
    rescue_written,
    unlink_durably,
)
from ..tokens import backoff_delay, format_time, heartbeat_interval, utcnow
from .accounts import (
    AccountRow,
    Named,
    RefreshStatus,
    RowLock,
    delete_account,
    deleted_generation,
    insert_account,
    load_account,
    load_every_account,
    load_rotations,
    notify_changed,
    save_account,
    save_status,
)
from .crypto import Keyring
from .db import (
    DEADLINE_BACKSTOP_SHARE,
    DbTimeouts,
    check,
    connect,
    create_pool,
    deadline,
    no_answer,
    open_pool,
    store_errors,
)
from .packed import PackedState
from .turns import LIVE_HEARTBEATS, claim_delay, live_nodes

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

__all__ = ["FleetStats", "FleetStore", "PgAccountStore", "PlanSource", "StorePlan", "plan_of"]

log = logging.getLogger(__name__)

#: The rescue files of the PostgreSQL store: ``<state_dir>/rescue/NAME.<store id>.json``.
RESCUE_DIR = "rescue"
RESCUE_VERSION = 1
#: A database call is given up client-side this long after its statement timeout: behind a
#: middlebox that still acknowledges packets, nothing else would end the wait.
CLIENT_DEADLINE_MARGIN = 2.0
#: How long closing a pool waits for its workers: only one still connecting (to a database
#: that does not answer) is still busy, and nothing is lost by leaving it; a stop must not
#: wait its connect_timeout.
POOL_CLOSE_WAIT = 1.0
#: The first wait before connecting again after a failure (growing up to a heartbeat).
RECONNECT_INITIAL = 0.2
#: How often a row another node holds is tried again while a hold waits for it.
LOCK_POLL = 0.05
#: The rotations a cached row holds: the newest (what an adopted state is checked against).
#: The whole log stays in the ``rotations`` table, read where it is shown (rotation_log);
#: fifty entries kept for each of 10,000 accounts were most of a node's memory.
CACHED_ROTATIONS = 1
#: Rows read per query at start: every row at once held all of them twice in memory
#: (the raw result and the decrypted rows), and the freed half stayed in the process. A
#: page's raw rows and decrypted bytes are freed among the rows kept, so a smaller page
#: leaves fewer holes in the heap (500 a page: 1.3 MiB more at 10,000 accounts); 100 is
#: 100 queries for 10,000 rows, a few milliseconds each.
LOAD_PAGE = 100

#: How far ahead a node's poll names the rows coming due (FleetStore.due_window): this many
#: heartbeats, and at least DUE_WINDOW_MIN seconds. A node keeps no due-queue entry for an
#: account planned further ahead (FleetStore.names_in_time), so a poll must name it again
#: before its moment: the margin covers late polls and a node's clock ahead of the database's.
#: Each poll names every row in the window (a fleet refreshing 40 accounts a second: 2,400
#: names), so it is not made longer than that needs.
DUE_WINDOW_HEARTBEATS = 3
DUE_WINDOW_MIN = 60.0

#: How long one listing of a state directory answers whether an account's alert bookkeeping
#: file exists (seconds of the monotonic clock; FleetStore.may_hold_alerts). Long enough for a
#: node's accounts to attach their alerts at start with one listing, short enough that a
#: file put there by hand later is seen by the next attachment (a reload) as before.
LISTING_FRESH = 5.0

#: What a hold writes besides the state: (due_at, the shared failure bookkeeping).
StorePlan = tuple[datetime | None, RefreshStatus]


def database_write_error(message: str) -> StoreWriteError:
    """A commit the database did not take: its fix is the database's (errors.DATABASE_WRITE
    in place of an OS errno), not the disk's."""
    error = StoreWriteError(message)
    error.errno = DATABASE_WRITE
    return error


class Failures(Protocol):
    """The failure bookkeeping of an account's status (status.AccountStatus), and how long
    Kakao took to answer its latest token request when that lengthens the waits."""

    @property
    def attempt(self) -> int: ...
    @property
    def failing_since(self) -> datetime | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def last_error_class(self) -> str | None: ...
    @property
    def heard_in(self) -> float | None: ...


class PlanSource(Protocol):
    """An account's manager as a hold's end asks it what to write besides the state
    (refresher.AccountManager; fleet/node.py's ``plan_for``)."""

    @property
    def status(self) -> Failures: ...
    def planned_refresh_at(self) -> datetime | None: ...
    def repack_state(self) -> None: ...


#: What a store asks as a hold ends: the manager itself (a node's 10,000 accounts: no
#: object per account in between), or a function (a command's plan).
Planner = PlanSource | Callable[[], StorePlan]


def plan_of(manager: PlanSource) -> StorePlan:
    """Return what the account's hold writes besides its state: the next due moment (the
    manager's plan, every rule relative to the lifetime) and the failure bookkeeping."""
    status = manager.status
    due = manager.planned_refresh_at()
    return due, RefreshStatus(
        attempts=status.attempt,
        failing_since=status.failing_since,
        last_attempt_at=utcnow() if status.attempt else None,
        last_attempt_by=None,
        last_error=status.last_error if status.attempt else None,
        last_error_class=status.last_error_class if status.attempt else None,
    )


#: The poll's snapshot: its xmin (every transaction below it had ended; any change it could
#: not see was made by a transaction at or above it) and the deletions counted so far.
_MARK = "pg_snapshot_xmin(pg_current_snapshot())::text, (SELECT deletions FROM account_deletions)"
#: What changed since the last poll, in one statement and so in one snapshot (the function
#: reads the statement's snapshot). ``writer_xid`` is stamped by a trigger on every write.
_POLL_CHANGES: LiteralString = f"""
SELECT {_MARK},
       ARRAY(SELECT name FROM accounts WHERE writer_xid >= %(since)s::xid8),
       ARRAY(SELECT name FROM accounts
             WHERE due_at <= now() + make_interval(secs => %(window)s))
"""


@dataclass(frozen=True)
class PollMark:
    """Where the last poll left off: the next one reads what was written from here on."""

    xmin: int
    deletions: int


async def _poll_mark(conn: AsyncConnection[Any]) -> PollMark:
    """Return the mark of a snapshot taken now (before the rows it marks are read)."""
    with store_errors("read the store's transaction horizon"):
        cur = await conn.execute(f"SELECT {_MARK}")
        found = await cur.fetchone()
    assert found is not None
    return PollMark(int(found[0]), int(found[1]))


@dataclass
class FleetStats:
    """What the node counts about the store, for /metrics and status."""

    #: Rows another node held when this one wanted them (a claim it lost, an on-demand wait).
    claim_conflicts: int = 0
    #: Holds that ended with a commit of new tokens (refreshes, logins, imports).
    commits: int = 0
    #: Holds that ended with no new tokens to commit: the row was current when locked (another
    #: node had refreshed it, or a min_valid request found it valid). Each is a row lock and a
    #: few round trips spent for nothing; a node that keeps up with the store makes few.
    idle_holds: int = 0
    #: Commits that failed after the state was staged (rescue files written).
    failed_commits: int = 0
    #: Change notifications received (several for one account are re-read once).
    notifications: int = 0
    #: Queries that re-read account rows after notifications or polls (each may read many).
    row_reads: int = 0
    #: Rows the heartbeat's polls re-read: those written since the previous poll, not all.
    poll_rows: int = 0
    #: Polls that compared every row (the first, after a listener (re)connect or an error).
    full_polls: int = 0
    #: Seconds between a row's commit (updated_at) and its notification arriving here.
    last_notify_lag: float | None = None
    #: time.monotonic() of the last notification or poll (None: never).
    last_sync: float | None = None
    #: time.monotonic() from which the cache is behind (FleetStore.behind_since), noted when a
    #: notification ends a silence of LIVE_HEARTBEATS heartbeats (a pause); a poll begun
    #: after it clears it. None: not known to be behind.
    behind_from: float | None = None
    #: When the database stopped answering (None: it answers).
    unavailable_since: datetime | None = None
    #: The same on the monotonic clock (FleetStore.behind_since compares it with a silence).
    down_from: float | None = None
    last_error: str | None = None
    #: time.monotonic() of the last successful round trip (None: none yet).
    last_ok: float | None = None

    @property
    def up(self) -> bool:
        """Return True while the database answers."""
        return self.unavailable_since is None


class _PoolEmptied(StoreUnavailable):
    """The pooled connections a borrowing tried were dead and the pool has no other idle:
    the database went away, or restarted. The pool's own reconnect tries come seconds
    apart; only a connection of the store's own settles at once which it was."""


@dataclass
class _Held:
    """One open hold: the connection whose transaction holds the row's lock."""

    conn: AsyncConnection[Any]
    row: AccountRow | None
    staged: AccountState | None = None
    delete: bool = False
    #: Remove the rescue file once the commit has succeeded (PgAccountStore.discard_rescue).
    discard_rescue: bool = False


class FleetStore:
    """The node's connection to the PostgreSQL store: pool, keys and the cached rows."""

    def __init__(
        self,
        *,
        dsn: str,
        keyring: Keyring,
        node: str,
        timeouts: DbTimeouts,
        state_dir: Path,
        pool_size: int = 8,
        publish_accounts: Collection[str] | None = None,
        heartbeat: Callable[[], float] = lambda: REFRESH_HEARTBEAT,
        accounts: Callable[[], Mapping[str, Named]] | None = None,
    ) -> None:
        self.dsn = dsn
        #: Why an account's rescue file could not be written, while it cannot (logged once per
        #: episode: store.rescue_not_written); kept here, not in each of 10,000 account stores.
        self.rescue_failing: dict[str, str] = {}
        #: ``[refresh] heartbeat`` as configured (seconds, read each time: a reload may
        #: change it); :meth:`heartbeat` fits it to the tokens.
        self.configured_heartbeat = heartbeat
        #: The shortest access lifetime among the cached rows (None: to be found again).
        self._shortest_life: timedelta | None = None
        #: The shortest access lifetime known before any row was read: the tokens this node
        #: last published, set by a start that waits for the database (fleet/startwait.py).
        self.lifetime_hint: timedelta | None = None
        #: The configured accounts (read each time: a reload replaces them): a row read for
        #: one of them is named with its configuration's string object from the start.
        #: Renaming it when first served made a second AccountRow and AccountState per
        #: account and freed the first among the rows kept: 1.9 MiB of holes in the heap
        #: at 10,000 accounts (docs/benchmarks.md).
        self.accounts = accounts
        self.keyring = keyring
        self.node = node
        self.timeouts = timeouts
        self.state_dir = state_dir
        self.pool_size = pool_size
        #: The accounts whose files this node publishes (None: all).
        self.publish_accounts = None if publish_accounts is None else frozenset(publish_accounts)
        self.store_id = ""
        self.schema_version = 0
        self.rows: dict[str, AccountRow] = {}
        #: Rows that could not be decrypted, with the reason (never a token).
        self.unreadable: dict[str, str] = {}
        self.stats = FleetStats()
        #: Set by a node whose scheduler leaves far accounts to the poll (due_window).
        self.names_ahead = False
        #: Where the last poll left off (None: the next poll compares every row).
        self._mark: PollMark | None = None
        #: Every node of the store and when it was last seen (read each heartbeat).
        self.nodes: dict[str, datetime] = {}
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        #: The pool each lent connection came from (a renewed pool replaces the old one).
        self._lent: dict[int, AsyncConnectionPool[AsyncConnection[Any]]] = {}
        self._renewing = asyncio.Lock()
        #: Set by the node while it runs (fleet/node.py, FleetNode.resync): one re-read of
        #: what changed, begun after the moment given (its own, or the listener's under
        #: way), and the daemon told of it; True when done.
        self.resync: Callable[[float], asyncio.Task[bool]] | None = None
        #: The re-read claims wait for (catch_up), until it ends.
        self._catching_up: asyncio.Task[bool] | None = None
        #: Directory text -> (when listed, the alert bookkeeping files in it; None: no such
        #: directory), see may_hold_alerts.
        self._listings: dict[str, tuple[float, frozenset[str] | None]] = {}

    def pool_stats(self) -> dict[str, int]:
        """Return the pool's size, idle connections and waiting requests (empty: no pool)."""
        pool = self._pool
        if pool is None:
            return {}
        stats = pool.get_stats()
        return {
            key: int(stats.get(key, 0))
            for key in ("pool_size", "pool_available", "requests_waiting")
        }

    def heartbeat(self) -> float:
        """Return the node's heartbeat: the configured one, fitted to the shortest access
        lifetime among the rows when left at its default (tokens.heartbeat_interval, the
        scheduler's rule).

        Every fleet timer counts in it: the poll, the liveness of nodes (alerts, first
        claims), when this node counts itself behind, the wait for another node's unsaved
        rotation, the reconnect back-off. At the configured 60 s a node stopped for two
        6-second lifetimes still counted itself current (180 s), and a dead node kept its
        accounts' alerts for 30 lifetimes; Kakao's 6-hour tokens keep the 60 s.
        """
        return heartbeat_interval(
            self.configured_heartbeat(), REFRESH_HEARTBEAT, self.shortest_lifetime()
        )

    def shortest_lifetime(self) -> timedelta | None:
        """Return the shortest access lifetime among the cached rows (the hint before any
        was read; None: none known). Kept as rows change: asked for every account a node
        plans, it must not walk all of them."""
        if self._shortest_life is None and self.rows:
            self._shortest_life = min(r.packed.access_lifetime for r in self.rows.values())
        return self._shortest_life if self.rows else self.lifetime_hint

    def _row_changed(self, old: AccountRow | None, new: AccountRow | None) -> None:
        """Keep :meth:`shortest_lifetime` current as a cached row is replaced or dropped."""
        shortest = self._shortest_life
        if shortest is None:
            return  # found again when asked
        life = new.packed.access_lifetime if new is not None else None
        if life is not None and life <= shortest:
            self._shortest_life = life
        elif old is not None and old.packed.access_lifetime <= shortest:
            self._shortest_life = None  # the shortest one grew or went: look again

    def drop_row(self, name: str) -> None:
        """Forget the account's cached row (gone from the store, or unreadable)."""
        self._row_changed(self.rows.pop(name, None), None)

    def due_window(self) -> float:
        """Return how far ahead (seconds) the poll names rows as due: 0 (only those due now)
        unless :attr:`names_ahead`, see DUE_WINDOW_HEARTBEATS."""
        if not self.names_ahead:
            return 0.0
        return max(DUE_WINDOW_HEARTBEATS * self.heartbeat(), DUE_WINDOW_MIN)

    def names_in_time(self, name: str, when: datetime, now: datetime) -> bool:
        """Return True when the account, next due at ``when``, needs no due-queue entry now:
        a later poll names it (its row's ``due_at`` is no later than ``when``) before ``when``
        comes (it lies beyond the due window), and the database answers those polls.

        What lets a node with 10,000 accounts keep queue entries only for those coming due
        (RefreshScheduler.plan asks this): the database already says what is due.
        """
        if not self.names_ahead or not self.stats.up:
            return False
        row = self.rows.get(name)
        return (
            row is not None
            and row.due_at is not None
            and row.due_at <= when
            and (when - now).total_seconds() > self.due_window()
        )

    def reconnect_delay(self, attempt: int) -> float:
        """Return how long to wait before connection attempt ``attempt + 1`` after a failure:
        the one back-off rule, from a fifth of a second up to a heartbeat (a start waiting
        for the database and the listener's reconnects alike)."""
        return backoff_delay(attempt, initial=RECONNECT_INITIAL, cap=self.heartbeat())

    @property
    def deadline(self) -> float:
        """Return how long one database round trip may take before it is given up."""
        return self.timeouts.statement + CLIENT_DEADLINE_MARGIN

    @property
    def commit_wait(self) -> float:
        """Return the longest a hold's commit takes before it is given up (and the tokens go
        to the rescue file): one deadline, and the backstop's share after it (db.deadline)."""
        return self.deadline * (1 + DEADLINE_BACKSTOP_SHARE)

    @property
    def stop_wait(self) -> float:
        """Return what this store adds to a stop besides the alert bookkeeping: the node's
        row removed within one deadline (FleetNode.stop), the pool's close."""
        return self.deadline + POOL_CLOSE_WAIT

    @property
    def migration_deadline(self) -> float:
        """Return how long one try of the schema migration may take before it is given up:
        its wait for the advisory lock (another node migrating), then its work, each bounded
        by the server's migration timeouts, and the margin."""
        timeouts = self.timeouts
        return timeouts.migration_lock + timeouts.migration_statement + CLIENT_DEADLINE_MARGIN

    # ------------------------------------------------------------------ opening

    async def open(self, *, pool_wait: float | None = None, read_rows: bool = True) -> None:
        """Apply the schema (under its advisory lock), check the store is in use, open the pool,
        read every row. StoreMoved when `store migrate --to file` moved the accounts away."""
        from .meta import moved_refusal, read_meta
        from .schema import migrate

        conn = await connect(
            self.dsn,
            node=self.node,
            purpose="migrate",
            timeouts=self.timeouts,
            autocommit=True,
            migration=True,
        )
        async with conn:
            result = await migrate(conn, node=self.node, within=self.migration_deadline)
            try:
                async with deadline(conn, self.deadline):
                    meta = await read_meta(conn)
            except TimeoutError:
                raise no_answer("read the store's identity", self.deadline) from None
        refusal = moved_refusal(meta)
        if refusal is not None:
            raise refusal
        self.store_id = meta.store_id
        self.schema_version = result.after
        if result.applied:
            log.info("store schema migrated to version %d: %s", result.after, result.applied)
        self._pool = await self._new_pool(pool_wait if pool_wait is not None else self.deadline)
        if read_rows:
            await self.load_all()

    async def _new_pool(self, wait: float) -> AsyncConnectionPool[AsyncConnection[Any]]:
        pool = create_pool(
            self.dsn, node=self.node, max_size=self.pool_size, timeouts=self.timeouts
        )
        try:
            await open_pool(pool, timeout=wait)
        except BaseException:
            await pool.close(timeout=POOL_CLOSE_WAIT)
            raise
        return pool

    async def _renewed(
        self, failed: AsyncConnectionPool[AsyncConnection[Any]], action: str, end: float
    ) -> AsyncConnectionPool[AsyncConnection[Any]]:
        """After an outage: when the database answers a direct connection again, replace the
        pool at once and return the new one (or the one another caller made since ``failed``
        was found wanting); StoreUnavailable that says why not.

        psycopg_pool retries a lost server on its own, its pauses growing from 1 s towards
        minutes; a node must not wait on that schedule once the database is back.

        Given up at ``end`` (the loop's clock): a probe on a silent network would wait
        libpq's connect_timeout. The cancel that ends it reaches no query: connecting and
        opening a pool send none.
        """
        budget = max(0.0, end - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout_at(end), self._renewing:
                current = self._pool
                if current is not failed and current is not None:
                    return current  # another caller renewed it meanwhile
                try:
                    probe = await connect(
                        self.dsn, node=self.node, purpose="probe", timeouts=self.timeouts
                    )
                except StoreError as exc:
                    raise StoreUnavailable(
                        f"cannot {action}: {exc.message}", hint=exc.hint
                    ) from None
                await probe.close()
                pool = await self._new_pool(self.deadline)
        except TimeoutError:
            raise no_answer(action, budget) from None
        self._pool = pool
        if current is not None:
            # Connections still lent from it are closed as they come back.
            await current.close(timeout=POOL_CLOSE_WAIT)
        log.info("store connection pool renewed: the database answers again")
        return pool

    async def close(self) -> None:
        """Close the pool (open holds were ended by their owners)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=POOL_CLOSE_WAIT)

    def account_store(self, account: AccountFiles) -> PgAccountStore:
        """Return the store of one configured account."""
        return PgAccountStore(account, self)

    def may_hold_alerts(self, directory: str, name: str) -> bool:
        """Return False when ``directory`` (its text) surely has no alert bookkeeping file
        ``name``: one listing of it answers for LISTING_FRESH seconds.

        What spares each of a node's 10,000 accounts, attaching its alerts at start, the
        pathlib objects of its bookkeeping file's path and the failed open: pathlib interns
        every name it parses, and the interpreter's table of interned strings, grown for
        them, never shrinks (docs/benchmarks.md). The listing keeps only the names of
        bookkeeping files (the directory also holds every account's token file). Only this
        process writes a node's bookkeeping files (the instance lock), and it notes each one
        it writes (:meth:`note_alerts`).
        """
        now = time.monotonic()
        listed = self._listings.get(directory)
        if listed is None or now - listed[0] > LISTING_FRESH:
            try:
                with os.scandir(directory) as entries:
                    names: frozenset[str] | None = frozenset(
                        entry.name for entry in entries if entry.name.endswith(ALERTS_SUFFIX)
                    )
            except FileNotFoundError:
                names = None
            except OSError:
                return True  # unknown: the caller looks for itself
            listed = self._listings[directory] = (now, names)
        return listed[1] is not None and name in listed[1]

    def note_alerts(self, directory: str, name: str) -> None:
        """Note that this process wrote ``name`` into ``directory`` (see may_hold_alerts)."""
        listed = self._listings.get(directory)
        if listed is not None:
            self._listings[directory] = (listed[0], (listed[1] or frozenset()) | {name})

    def names(self) -> Mapping[str, Named]:
        """Return where a row read from the database takes its name object: the configured
        accounts (see :attr:`accounts`), else the cached rows."""
        return self.accounts() if self.accounts is not None else self.rows

    def share_name(self, row: AccountRow, name: str) -> AccountRow:
        """Keep ``row`` under the name object ``name`` (equal to its own) and return it.

        One name object per account, the configuration's: a row read from the database
        brings an equal copy (57 bytes of each of 10,000 accounts). Re-reads take the cached
        row's (load_every_account's ``names``).
        """
        if self.rows.get(name) is row:
            del self.rows[name]  # the key object is the old one until it is removed
        row = row.with_state(row.packed.renamed(name))
        self.rows[name] = row
        return row

    # ------------------------------------------------------------------ connections

    def ok(self) -> None:
        """Record that the database answered."""
        stats = self.stats
        stats.last_ok = time.monotonic()
        if stats.unavailable_since is not None:
            log.warning("the PostgreSQL store answers again")
        stats.unavailable_since = None
        stats.down_from = None
        stats.last_error = None

    def failed(self, exc: StoreError) -> None:
        """Record that the database did not answer (for store_unavailable and metrics)."""
        stats = self.stats
        if stats.unavailable_since is None:
            stats.unavailable_since = utcnow()
            stats.down_from = time.monotonic()
            log.error("the PostgreSQL store is unavailable: %s", exc.message)
        stats.last_error = exc.message

    async def getconn(self, action: str, *, within: float | None = None) -> AsyncConnection[Any]:
        """Borrow a pooled connection that answered a round trip just now; StoreUnavailable
        when none does within the deadline, or within ``within`` seconds when given (the
        whole borrowing, renewing the pool after an outage included)."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"cannot {action}: the store is not open")
        loop = asyncio.get_running_loop()
        budget = self.deadline if within is None else within
        end = loop.time() + budget
        wait = min(budget, self.deadline)
        conn: AsyncConnection[Any] | None = None
        try:
            # A known outage with nothing idle in the pool: it has nothing to lend before its
            # own next try, seconds or minutes away, so the store tries a connection of its
            # own at once (the one back-off rule paces these attempts).
            if self.stats.up is not False or pool.get_stats().get("pool_available", 0) > 0:
                try:
                    conn = await self._checked(pool, action, loop.time() + wait, wait)
                except _PoolEmptied:
                    pass  # dead connections and none idle: the pool is no better off
                except StoreUnavailable:
                    # A pool renewed by another borrowing while this one waited on it answers
                    # PoolClosed: the renewal below returns the new one.
                    if (
                        self._pool is pool
                        and self.stats.up is not False
                        and pool.get_stats().get("pool_size", 0) > 0
                    ):
                        raise  # the pool is there, only busy (or its connection did not answer)
            if conn is None:
                pool = await self._renewed(pool, action, end)
                again = max(0.0, end - loop.time())
                conn = await self._checked(pool, action, loop.time() + again, again)
        except StoreError as exc:
            self.failed(exc)
            raise
        self._lent[id(conn)] = pool
        return conn

    async def _checked(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        action: str,
        until: float,
        wait: float,
    ) -> AsyncConnection[Any]:
        """Borrow a connection from ``pool`` and check that it answers, both by ``until`` (the
        loop's clock; ``wait`` is what it was given, for the message).

        The check the pool would make runs without a deadline: on a database that went
        silent while the connection sat idle it never returned, and a cancel of it reaches
        psycopg, whose cancel request waits on the same silent path (db.deadline). A
        connection that fails its check otherwise (the server restarted, ended the session)
        is closed and the next one tried, as the pool does.

        A wait for a free connection that ended far later than it was set to (the process was
        stopped or its loop stalled while every connection was out) gets a share more, once:
        the connections come back as soon as their tasks run again, their answers waiting in
        the sockets (db.deadline). A pool that is only busy fails at ``until`` as before.

        _PoolEmptied when a connection failed its check and the pool has no other idle one
        (the caller tries a connection of its own rather than wait on the pool's reconnects).
        """
        loop = asyncio.get_running_loop()
        stalled = False
        while True:
            try:
                with store_errors(action):
                    conn = await pool.getconn(timeout=until - loop.time())
            except StoreUnavailable:
                grace = wait * DEADLINE_BACKSTOP_SHARE
                if stalled or loop.time() - until < grace:
                    raise
                stalled = True
                until = loop.time() + grace
                continue
            try:
                await check(conn, max(0.0, until - loop.time()))
            except TimeoutError:
                await self._discard(pool, conn)
                raise no_answer(action, wait) from None
            except Exception as exc:
                await self._discard(pool, conn)
                if pool.get_stats().get("pool_available", 0) == 0:
                    raise _PoolEmptied(
                        f"cannot {action}: the database ended its connection ({type(exc).__name__})"
                    ) from None
                continue
            except BaseException:
                await self._discard(pool, conn)
                raise
            return conn

    @staticmethod
    async def _discard(
        pool: AsyncConnectionPool[AsyncConnection[Any]], conn: AsyncConnection[Any]
    ) -> None:
        """Close a borrowed connection and give it back: the pool replaces it."""
        with suppress(Exception):
            await conn.close()
        with suppress(Exception):
            await pool.putconn(conn)

    async def putconn(
        self, conn: AsyncConnection[Any], *, broken: bool = False, within: float | None = None
    ) -> None:
        """Give a connection back, rolled back (within the deadline, or ``within`` seconds);
        one in doubt is closed (the pool replaces it)."""
        pool = self._lent.pop(id(conn), None)
        if pool is None or pool.closed:
            with suppress(Exception):
                await conn.close()
            if pool is not None:
                with suppress(Exception):
                    await pool.putconn(conn)
            return
        if not broken and not conn.closed:
            try:
                async with deadline(conn, self.deadline if within is None else within):
                    await conn.rollback()
            except (Exception, TimeoutError):
                broken = True
        if broken and not conn.closed:
            with suppress(Exception):
                await conn.close()
        await pool.putconn(conn)

    @asynccontextmanager
    async def connection(
        self, action: str, *, within: float | None = None
    ) -> AsyncIterator[AsyncConnection[Any]]:
        """Borrow a connection for one short transaction, with the client-side deadline.

        ``within`` bounds borrowing and the block together (a stop's last write has less time
        than a round trip's deadline); without it each gets the deadline. Committed by the
        caller; rolled back when the block ends. Errors become StoreUnavailable/StoreError
        (fleet/db.py) and are recorded for store_unavailable.
        """
        loop = asyncio.get_running_loop()
        end = None if within is None else loop.time() + within
        conn = await self.getconn(action, within=within)
        limit = self.deadline if end is None else max(0.0, end - loop.time())
        broken = False
        try:
            async with deadline(conn, limit):
                with store_errors(action):
                    yield conn
        except TimeoutError:
            broken = True
            given = self.deadline if within is None else within
            exc = no_answer(action, given)
            self.failed(exc)
            raise exc from None
        except StoreUnavailable as exc:
            broken = True
            self.failed(exc)
            raise
        else:
            self.ok()
        finally:
            left = None if end is None else max(0.0, end - loop.time())
            await self.putconn(conn, broken=broken, within=left)

    # ------------------------------------------------------------------ the cache

    def _decrypt_failed(self, name: str, exc: TokenDecryptError) -> None:
        if self.unreadable.get(name) != exc.message:
            log.error("account %s: %s (%s)", name, exc.message, exc.hint or "")
        self.unreadable[name] = exc.message
        self.drop_row(name)

    async def load_all(self) -> None:
        """Read every row into the cache (at start), LOAD_PAGE rows per query in name order;
        the next poll reads what was written since the first page.

        Pages need not be one snapshot: the poll's mark is taken before the first, so the
        next poll re-reads whatever changed meanwhile (the listener's first poll compares
        every row anyway).
        """
        began = time.monotonic()
        async with self.connection("read the store's transaction horizon") as conn:
            mark = await _poll_mark(conn)
            await conn.commit()
        after: str | None = None
        while True:
            async with self.connection("read the store's accounts") as conn:
                rows, unreadable = await load_every_account(
                    conn,
                    self.keyring,
                    after=after,
                    limit=LOAD_PAGE,
                    rotations=CACHED_ROTATIONS,
                    names=self.names(),
                )
                await conn.commit()
            for row in rows.values():
                self.keep_row(row)
            for name, exc in unreadable.items():
                self._decrypt_failed(name, exc)
            if len(rows) + len(unreadable) < LOAD_PAGE:
                break
            after = max(rows.keys() | unreadable.keys())
        self._mark = mark
        self._synced(began)
        give_back_free_heap()

    def keep_row(self, row: AccountRow) -> AccountRow:
        """Keep ``row`` as the account's cached row; return what is kept.

        A re-read of the state this node wrote itself (its own commit's notification) keeps
        the state object the account's manager holds: two decrypted copies of the same
        tokens for every account the node refreshed otherwise. An older generation of the
        cached row is not kept: the cached row is returned.
        """
        cached = self.rows.get(row.name)
        if cached is not None and cached.uid == row.uid and row.generation < cached.generation:
            # A read whose snapshot predates a commit the cache holds already: a poll that
            # waited for its answer while this node committed. Kept, the account's manager saw
            # the store go backwards and wrote a rescue file nothing removed. The same row
            # (its id) only moves forward; one made anew (a logout, a login) has another id.
            return cached
        if (
            cached is not None
            and cached.packed is not row.packed
            and cached.packed.same_as(row.packed)
        ):
            # The packed state itself: an account's manager holding it (an idle account)
            # keeps no second copy alive.
            row = row.with_state(cached.packed)
        elif row.packed.rotation_count > CACHED_ROTATIONS:
            state = row.state
            row = row.with_state(replace(state, rotations=state.rotations[-CACHED_ROTATIONS:]))
        self._row_changed(cached, row)
        self.rows[row.name] = row
        self.unreadable.pop(row.name, None)
        return row

    async def rotation_log(self, names: Collection[str]) -> dict[str, tuple[Rotation, ...]]:
        """Read the rotation log of these accounts (newest MAX_ROTATIONS_KEPT each) with one
        query: what status shows, which the cached rows keep only the newest of."""
        async with self.connection(f"read the rotations of {len(names)} account(s)") as conn:
            found = await load_rotations(conn, names)
            await conn.commit()
        return found

    async def reload(self, name: str) -> AccountRow | None:
        """Read one row again; update the cache; return it (None: gone or unreadable)."""
        return (await self.reload_many([name]))[name]

    async def reload_many(self, names: Collection[str]) -> dict[str, AccountRow | None]:
        """Read these rows again with one query (notifications and polls coalesced); update
        the cache; return name -> row (None: the row is gone or does not decrypt)."""
        if not names:
            return {}
        async with self.connection(f"read {len(names)} account(s)") as conn:
            read = await self._read_rows(conn, names)
            await conn.commit()
        return self._keep_read(names, *read)

    async def _read_rows(
        self, conn: AsyncConnection[Any], names: Collection[str]
    ) -> tuple[dict[str, AccountRow], dict[str, TokenDecryptError]]:
        """Read these rows (one query); :meth:`_keep_read` puts them in the cache."""
        self.stats.row_reads += 1
        return await load_every_account(
            conn, self.keyring, only=names, rotations=CACHED_ROTATIONS, names=self.names()
        )

    def _keep_read(
        self,
        names: Collection[str],
        rows: dict[str, AccountRow],
        unreadable: dict[str, TokenDecryptError],
    ) -> dict[str, AccountRow | None]:
        """Update the cache with rows read by :meth:`_read_rows`; return name -> row."""
        found: dict[str, AccountRow | None] = {}
        for name in names:
            row = rows.get(name)
            if row is not None:
                found[name] = self.keep_row(row)
                continue
            found[name] = None
            if name in unreadable:
                self._decrypt_failed(name, unreadable[name])
            else:
                self.drop_row(name)
                self.unreadable.pop(name, None)
        return found

    async def poll(self, *, full: bool = False) -> tuple[list[str], list[str]]:
        """The backstop for lost notifications: re-read rows that changed; return (changed
        names, names due by the database's clock, or within :meth:`due_window` of it).

        Reads only the rows written since the last poll (their ``writer_xid``, see
        sql/0003_incremental_poll.sql), and lists the names only when a row was deleted
        since. Every row is compared when ``full`` (the listener's (re)connect), at the first
        poll and after a poll that failed.
        """
        began = time.monotonic()
        mark, self._mark = (None if full else self._mark), None  # a failure leaves None
        async with self.connection("poll the store's accounts") as conn:
            polled = None if mark is None else await self._poll_changes(conn, mark)
            compared_all = polled is None
            if polled is None:
                polled = await self._poll_everything(conn)
                self.stats.full_polls += 1
            new_mark, suspects, due = polled
            # On the same connection: two round trips fewer (a borrow's check, a commit),
            # and a node continued after a pause has many rows to read here at once.
            read = await self._read_rows(conn, suspects) if suspects else ({}, {})
            await conn.commit()
        before = {name: self.rows.get(name) for name in suspects}
        self.stats.poll_rows += len(suspects)
        found = self._keep_read(suspects, *read)
        changed = [name for name in sorted(suspects) if found[name] != before[name]]
        self._mark = new_mark
        self._synced(began)
        if compared_all:
            give_back_free_heap()  # a row of every account was read and compared
        else:
            give_back_if_grown()
        return changed, due

    async def _poll_changes(
        self, conn: AsyncConnection[Any], mark: PollMark
    ) -> tuple[PollMark, set[str], list[str]] | None:
        """One statement, so one snapshot: its xmin, the deletions, the rows written since
        ``mark``, the rows due (None: every row must be compared instead)."""
        with store_errors("poll the store's accounts"):
            cur = await conn.execute(
                _POLL_CHANGES, {"since": str(mark.xmin), "window": self.due_window()}
            )
            found = await cur.fetchone()
        assert found is not None  # a SELECT without FROM returns one row
        xmin, deletions, written, due = found
        new_mark = PollMark(int(xmin), int(deletions))
        if new_mark.xmin < mark.xmin:
            # Transaction ids never go backwards in one cluster: this is another one (a
            # restore, a failover to a copy made otherwise). Compare every row.
            log.warning("the store's transaction ids went backwards; comparing every row")
            return None
        suspects = set(written)
        if new_mark.deletions != mark.deletions:
            with store_errors("list the store's accounts"):
                cur = await conn.execute("SELECT name FROM accounts")
                listed = {name for (name,) in await cur.fetchall()}
            suspects |= self._cached_names() ^ listed
        return new_mark, suspects, list(due)

    async def _poll_everything(
        self, conn: AsyncConnection[Any]
    ) -> tuple[PollMark, set[str], list[str]]:
        """Compare every row's generation and updated_at with the cache."""
        # Taken before the rows are listed: an earlier snapshot's mark is never too new.
        mark = await _poll_mark(conn)
        with store_errors("poll the store's accounts"):
            cur = await conn.execute(
                "SELECT name, generation, updated_at,"
                " coalesce(due_at <= now() + make_interval(secs => %s), false) FROM accounts",
                (self.due_window(),),
            )
            listed = await cur.fetchall()
        suspects: set[str] = set()
        due: list[str] = []
        for name, generation, updated_at, is_due in listed:
            cached = self.rows.get(name)
            if cached is None or (cached.generation, cached.updated_at) != (generation, updated_at):
                suspects.add(name)
            if is_due:
                due.append(name)
        suspects |= self._cached_names() - {name for name, *_ in listed}
        return mark, suspects, due

    def _cached_names(self) -> set[str]:
        """Return the name of every row in the cache, readable or not."""
        return self.rows.keys() | self.unreadable.keys()

    def behind_since(self) -> float | None:
        """Return since when (``time.monotonic()``) the cached rows may be behind the store;
        None while they are not.

        They are once nothing was heard from the store (a poll, a notification) for as long
        as the other nodes take to count this node gone (LIVE_HEARTBEATS, fleet/turns.py):
        the node was paused or its loop stalled, other nodes committed meanwhile, and their
        notifications wait unread on the listener. They stay behind until a poll begun
        after that has read every changed row: after a pause the first notifications are
        read while the rest still wait in the socket, and when their re-read counted, the
        claims of the other accounts went ahead of the poll (10 row locks of 48 taken for
        nothing in a loaded run). Not while the database does not answer, if it went away
        before the silence began: a claim then fails at once and is retried, and the
        listener's reconnect compares every row. A failure noticed only after the silence
        (the first commit of a node woken from SIGSTOP, whose session the server had ended)
        does not make a stopped node current: it still judged its accounts, and sent their
        alerts, by rows from before the stop.
        """
        stats = self.stats
        last = stats.last_sync
        if last is None:
            return None
        since = stats.behind_from
        if since is None:
            since = last + LIVE_HEARTBEATS * self.heartbeat()
            if time.monotonic() <= since:
                return None
        if not stats.up and (stats.down_from is None or stats.down_from <= since):
            return None
        return since

    def _synced(self, began: float) -> None:
        """Note a poll (or full read) begun at ``began`` that read every changed row.

        It vouches for the rows as they were when it began. One that lasted longer than the
        silence that makes a node behind (:meth:`behind_since`) was under way when the node
        was stopped or its loop stalled: ended after the SIGCONT, it made the node look
        current although what others committed during the pause was not in it, and the
        claims dispatched at the SIGCONT skipped the re-read (tests/test_fleet_poll.py; the
        likely cause of 10 idle holds of 48 in one loaded run). Such a poll counts from its
        beginning.
        """
        stats = self.stats
        now = time.monotonic()
        stalled = now - began > LIVE_HEARTBEATS * self.heartbeat()
        stats.last_sync = began if stalled else now
        if stats.behind_from is not None and began > stats.behind_from:
            stats.behind_from = None

    async def catch_up(self) -> bool:
        """When the cache fell behind (:meth:`behind_since`), wait for one re-read of what
        changed (the node's, shared by every caller) for at most a deadline; return True
        when it was done.

        A node continued after a pause found every account it had planned overdue: each
        claim took a pooled connection and a few round trips to learn that another node had
        refreshed the row, and the one poll that re-reads all of them waited behind them
        (docs/fleet.md, "A node continued after a pause": 3.4-3.9 s behind the store with
        144 accounts and 0.2 s round trips, 1.2-1.6 s now). The
        claims wait here instead, so the re-read has the pool to itself; it never decides
        anything (the row lock does), so a re-read that fails or takes too long only means
        the claims go ahead as before.
        """
        task = self._catching_up
        if task is None or task.done():
            since = self.behind_since()
            if self.resync is None or since is None:
                return False
            task = self._catching_up = self.resync(since)
        # Once begun, every claim waits for this one re-read (behind_since stays set until a
        # poll begun after the silence has ended; it is such a poll).
        # asyncio.wait: a caller that gives up (or is cancelled) leaves the shared re-read
        # running, and one the node's stop cancels is only a re-read not done.
        await asyncio.wait({task}, timeout=self.deadline)
        return task.done() and not task.cancelled() and task.exception() is None and task.result()

    def note_notification(self, row: AccountRow | None) -> None:
        """Note that a notified row was re-read, and how long after its commit; one that ends
        a silence long enough to be behind (a pause) leaves the node behind until a poll."""
        stats = self.stats
        if stats.behind_from is None:
            stats.behind_from = self.behind_since()
        stats.last_sync = time.monotonic()
        if row is not None and row.updated_at is not None:
            stats.last_notify_lag = max(0.0, (utcnow() - row.updated_at).total_seconds())


class PgAccountStore:
    """One account in the PostgreSQL store (storage.AccountStorage): hold = the row lock."""

    # One per account, 10,000 on a node: slots instead of an instance dictionary.
    # The name and whether this node publishes are read from the account and the node: two
    # slots fewer in each of a node's 10,000 (the name is the configuration's object).
    __slots__ = ("_held", "_shared_due", "_shared_plan", "account", "fleet", "planner")

    def __init__(self, account: AccountFiles, fleet: FleetStore) -> None:
        self.account = account
        self.fleet = fleet
        self._held: _Held | None = None
        #: What shared_due_at last answered and the row's due_at it came from: a plan taken
        #: from the row is written back without this node's claim delay (see _commit). Two
        #: references to moments that exist anyway, not a tuple per account.
        self._shared_plan: datetime | None = None
        self._shared_due: datetime | None = None
        #: Asked as a hold ends: when the account is next due and its failure bookkeeping
        #: (set by whoever owns the account manager; None: leave them as they are).
        self.planner: Planner | None = None

    @property
    def name(self) -> str:
        """Return the account's name (the configuration's string object)."""
        return self.account.name

    @property
    def publishes(self) -> bool:
        """Whether this node writes the account's token files (``[store] publish_accounts``)."""
        only = self.fleet.publish_accounts
        return only is None or self.account.name in only

    @property
    def _files(self) -> AccountStore:
        """The published files and the node-local alert bookkeeping, as the file store has them.

        Made for each use, not kept: one per account was 170 bytes of each of a node's 10,000
        accounts, for a token file written every few hours. (What it would cache, the token
        file's group id, is looked up again per publish; only with ``[publish] group`` set.)
        """
        return AccountStore(self.account)

    def __repr__(self) -> str:
        return f"PgAccountStore({self.name!r}, node={self.fleet.node!r})"

    @property
    def lock_path(self) -> Path:
        """Where the account's lock lives, for messages: its row in the store."""
        return Path(f"postgresql:accounts/{self.name}")

    @property
    def shared(self) -> bool:
        """A row every node refreshes in turn: adopting another node's commit is routine."""
        return True

    @property
    def peer_grace(self) -> float:
        """As long as a live node may take to commit a rescued rotation: the liveness window
        (fleet/turns.py); such a node retries as soon as the database answers it again."""
        return LIVE_HEARTBEATS * self.fleet.heartbeat()

    @property
    def rotations_kept(self) -> int:
        """The newest rotation only: the log is in the ``rotations`` table (rotation_log)."""
        return CACHED_ROTATIONS

    @property
    def rescue_path(self) -> Path | None:
        """The encrypted local rescue file of this account in this store."""
        store_id = self.fleet.store_id or "unknown"
        return self.fleet.state_dir / RESCUE_DIR / f"{self.name}.{store_id}.json"

    @property
    def held(self) -> bool:
        """Return True while this object holds the account's row lock."""
        return self._held is not None

    # ------------------------------------------------------------------ reading

    def row(self) -> AccountRow | None:
        """Return the row as last read (under the hold: as read under the lock)."""
        if self._held is not None:
            return self._held.row
        return self.fleet.rows.get(self.name)

    def load(self) -> AccountState | None:
        """Return the state: the one staged or read under the lock, else the cached row's."""
        held = self._held
        if held is not None:
            if held.delete:
                return None
            if held.staged is not None:
                return held.staged
            return held.row.state if held.row is not None else None
        row = self.fleet.rows.get(self.name)
        if row is None:
            return None
        if row.name is not self.name:  # the first load, or a row that came after the start
            row = self.fleet.share_name(row, self.name)
        return row.state

    def packed_state(self, state: AccountState) -> AccountState | PackedState:
        """Return how the account's manager keeps ``state``: the cached row's packed state
        when ``state`` is that row's (an idle account: its objects are made when asked, see
        fleet/packed.py), else ``state`` itself (a change not committed yet, a rescue)."""
        row = self.fleet.rows.get(self.name)
        if row is not None and row.packed.holds(state):
            return row.packed
        return state

    def state_signature(self) -> int | None:
        """Return the row's generation (None: no row), the compare-and-swap value.

        Under a hold it is the generation read under the lock, even after :meth:`save`:
        what a pending write compares with before it retries its compare-and-swap.
        """
        row = self.row()
        return row.generation if row is not None else None

    def loaded_signature(self) -> int | None:
        """Return the signature now: the row read last is kept in memory."""
        return self.state_signature()

    def shared_due_at(self, state: AccountState) -> datetime | None:
        """Return when this node should claim ``state`` (None: plan it locally): the row's
        ``due_at``, later by a share of the lifetime unless this node is the account's first
        claimant (fleet/turns.py), so the refreshes spread evenly over the live nodes."""
        fleet = self.fleet
        row = fleet.rows.get(self.name)
        if row is None or row.generation != state.generation or row.due_at is None:
            return None
        heartbeat = fleet.heartbeat()
        delay = claim_delay(
            self.name,
            me=fleet.node,
            nodes=live_nodes(fleet.nodes, me=fleet.node, heartbeat=heartbeat),
            lifetime=state.tokens.access_lifetime.total_seconds(),
            heartbeat=heartbeat,
            retrying=row.status.attempts > 0,
        )
        # The first claimant's plan is the row's own moment: no second datetime to keep.
        planned = row.due_at + timedelta(seconds=delay) if delay else row.due_at
        self._shared_plan, self._shared_due = planned, row.due_at
        return planned

    async def catch_up(self) -> bool:
        """Re-read what changed when the node fell behind (FleetStore.catch_up); True when
        it did."""
        return await self.fleet.catch_up()

    # ------------------------------------------------------------------ holding

    def try_lock(self) -> bool:
        """Return True only inside this account's open :meth:`hold` (re-entrant, as the file
        store's lock): a row lock cannot be taken from synchronous code (see storage.py)."""
        return self._held is not None

    def unlock(self) -> None:
        """Nothing to release: the hold that :meth:`try_lock` found open releases the row."""

    @asynccontextmanager
    async def hold(self, wait: float, *, decided_on: int | None = None) -> AsyncIterator[None]:
        """Hold the account's row lock in a transaction; commit the staged change at the end.

        A row another node holds is tried again (``SKIP LOCKED`` in a fresh transaction each
        time) until ``wait`` ran out, then StoreClaimed. StoreUnavailable when the database
        does not answer: nothing is done without the lock. StoreOvertaken, before each try,
        when the cached row is newer than ``decided_on`` (:meth:`_overtaken`).
        """
        if self._held is not None:
            raise RuntimeError(f"account {self.name!r} is already held")
        fleet = self.fleet
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        self._overtaken(decided_on)
        conn = await fleet.getconn(f"lock account {self.name!r}")
        if decided_on is not None and fleet.behind_since() is not None:
            # The node fell behind while this claim waited for its connection (it was
            # stopped, its loop stalled): what other nodes committed meanwhile waits unread,
            # and the row would only be found current (6 of 7 idle holds in a CI run of the
            # e2e pause test). Wait for the re-read first, as a claim decided now does
            # (AccountManager._no_longer_due), without the connection: the re-read needs one.
            await fleet.putconn(conn)
            await fleet.catch_up()
            self._overtaken(decided_on)
            conn = await fleet.getconn(f"lock account {self.name!r}")
        try:
            while True:
                self._overtaken(decided_on)
                row, exists = await self._lock_row(conn)
                if row is not None or not exists:
                    break
                await conn.rollback()
                if loop.time() >= deadline:
                    fleet.stats.claim_conflicts += 1
                    raise StoreClaimed(
                        f"account {self.name!r} is busy: another node holds its row in the "
                        "store (it is refreshing it)",
                        hint="it is done when that node's refresh is; nothing to do",
                    )
                await asyncio.sleep(min(LOCK_POLL, max(wait / 10, 0.001)))
        except BaseException as exc:
            await fleet.putconn(conn, broken=isinstance(exc, StoreUnavailable | TimeoutError))
            raise
        held = _Held(conn, row)
        self._held = held
        try:
            yield
        except BaseException:
            self._held = None
            await fleet.putconn(conn)  # rolled back: nothing staged is written
            raise
        self._held = None
        broken = False
        try:
            await self._commit(held)
            if held.discard_rescue:
                self._discard_rescue_now()
        except StoreWriteError as exc:
            broken = True
            fleet.stats.failed_commits += 1
            if held.staged is not None or held.delete:
                raise
            # Only the plan and the failure bookkeeping were to be written: no token that only
            # this node holds is at stake, so no write_failed (critical, "cannot save the new
            # tokens"). A node stopped while it held the row wakes to this once the server
            # ended its transaction (the fitted backstop, DbTimeouts.idle_for), while another
            # node has the account; the row stays as that node wrote it.
            log.warning("account %s: its status was not saved to the store: %s", self.name, exc)
        finally:
            await fleet.putconn(conn, broken=broken)

    def _overtaken(self, decided_on: int | None) -> None:
        """Raise StoreOvertaken when the cached row is newer than the generation a claim was
        decided on: another node committed while the claim waited, and the notification's
        re-read left the busy account to its claim (Daemon.on_store_changed). Locking the row
        would only find it current (an idle hold): a node continued after a pause took up to
        10 of 48 such locks with the claims that had waited across the pause for a pooled
        connection. The generation decides, not whether the row looks due: that is for the
        claim's owner to plan again from the adopted row."""
        row = self.fleet.rows.get(self.name)
        if decided_on is not None and row is not None and row.generation > decided_on:
            raise StoreOvertaken(
                f"account {self.name!r} was refreshed by another node meanwhile (generation"
                f" {row.generation}, this claim was decided on {decided_on})",
                hint="nothing to do: its tokens are adopted",
            )

    @asynccontextmanager
    async def _answered(self, conn: AsyncConnection[Any], action: str) -> AsyncIterator[None]:
        """Run statements on a connection this store holds within the store's deadline; a
        database that does not answer, or went away, is recorded (store_unavailable)."""
        fleet = self.fleet
        try:
            async with deadline(conn, fleet.deadline):
                yield
        except TimeoutError:
            exc = no_answer(action, fleet.deadline)
            fleet.failed(exc)
            raise exc from None
        except StoreUnavailable as exc:
            fleet.failed(exc)
            raise
        fleet.ok()

    async def _lock_row(self, conn: AsyncConnection[Any]) -> tuple[AccountRow | None, bool]:
        """Lock the row (SKIP LOCKED); return (row, whether a row of that name exists)."""
        fleet = self.fleet
        async with self._answered(conn, f"lock account {self.name!r}"):
            row = await load_account(
                conn,
                fleet.keyring,
                self.name,
                lock=RowLock.SKIP,
                rotations=CACHED_ROTATIONS,
                names=fleet.names(),
            )
            if row is not None:
                await self._fit_backstop(conn, row)
                exists = True
            else:
                with store_errors(f"read account {self.name!r}"):
                    cur = await conn.execute("SELECT 1 FROM accounts WHERE name = %s", (self.name,))
                    exists = await cur.fetchone() is not None
        return row, exists

    async def _fit_backstop(self, conn: AsyncConnection[Any], row: AccountRow) -> None:
        """Shorten this transaction's idle-in-transaction backstop to the token's share
        (DbTimeouts.idle_for): a node stopped while it holds the row frees it within a share
        of a short token's life, not the session's 90 s. Nothing is sent for a token whose
        share is the session's own (Kakao's hours-long tokens, a Kakao timeout set by hand).
        A Kakao slower than that share (the manager's status.heard_in) lengthens it."""
        timeouts = self.fleet.timeouts
        planner = self.planner
        heard = None if planner is None or callable(planner) else planner.status.heard_in
        idle = timeouts.idle_for(row.state.tokens.access_lifetime, heard)
        if idle < timeouts.idle_in_transaction:
            with store_errors(f"lock account {self.name!r}"):
                await conn.execute(
                    "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
                    (f"{max(1, round(idle * 1000))}ms",),
                )

    async def _commit(self, held: _Held) -> None:
        """Write what the hold staged (compare-and-swap), notify, commit; StoreWriteError."""
        fleet = self.fleet
        conn = held.conn
        planner = self.planner
        if planner is None:
            due_at, status = None, None
        elif callable(planner):
            due_at, status = planner()
        else:
            due_at, status = plan_of(planner)
        if self._shared_plan is not None and due_at == self._shared_plan:
            # The plan came from the row: keep the row's moment. Writing it back with this
            # node's claim delay would move the account later at every such hold.
            due_at = self._shared_due
        row = held.row
        written: AccountRow | None = None
        try:
            async with deadline(conn, fleet.deadline):
                if held.delete:
                    if row is not None:
                        await delete_account(conn, self.name)
                        await notify_changed(conn, self.name, row.generation + 1)
                elif held.staged is not None:
                    written = await self._write(conn, row, held.staged, due_at, status)
                elif row is not None and self.planner is not None:
                    assert status is not None
                    if _status_key(due_at, status) != _status_key(row.due_at, row.status):
                        await save_status(conn, row, due_at=due_at, status=status)
                        await notify_changed(conn, self.name, row.generation)
                        written = AccountRow(
                            uid=row.uid,
                            state=row.packed,
                            key_id=row.key_id,
                            due_at=due_at,
                            refreshed_by=row.refreshed_by,
                            status=status,
                            updated_at=row.updated_at,
                        )
                with store_errors(f"commit account {self.name!r}"):
                    await conn.commit()
        except TimeoutError:
            exc = no_answer(f"commit account {self.name!r} to the store", fleet.deadline)
            fleet.failed(exc)
            raise database_write_error(exc.message) from None
        except StoreWriteError:
            raise
        except StoreError as exc:
            if isinstance(exc, StoreUnavailable):
                fleet.failed(exc)
            raise database_write_error(
                f"cannot commit account {self.name!r} to the store: {exc.message}"
            ) from None
        fleet.ok()
        if held.staged is None and not held.delete:
            fleet.stats.idle_holds += 1
            # Named in the log (debug: rare, and harmless) so that a run counting more of
            # them than it expects shows which accounts and when (tests/test_fleet_e2e.py).
            log.debug(
                "account %r: held its row and had nothing to write (generation %s)",
                self.name,
                row.state.generation if row is not None else None,
            )
        if held.delete:
            fleet.drop_row(self.name)
        elif written is not None:
            fleet.keep_row(written)
            if held.staged is not None:
                fleet.stats.commits += 1
            if planner is not None and not callable(planner):
                planner.repack_state()  # the manager's state is the committed row's now

    async def _write(
        self,
        conn: AsyncConnection[Any],
        row: AccountRow | None,
        state: AccountState,
        due_at: datetime | None,
        status: RefreshStatus | None,
    ) -> AccountRow:
        fleet = self.fleet
        node = fleet.node
        if row is None:
            inserted = await insert_account(
                conn, fleet.keyring, state, node=node, due_at=due_at, status=status
            )
            if inserted is None:
                raise StoreWriteError(
                    f"account {self.name!r} was added to the store by someone else meanwhile;"
                    " not written over",
                )
            written = inserted
        else:
            ok = await save_account(
                conn, fleet.keyring, row, state, node=node, due_at=due_at, status=status
            )
            if not ok:
                fleet.stats.claim_conflicts += 1
                raise StoreWriteError(
                    f"account {self.name!r} changed in the store meanwhile (compare-and-swap on "
                    f"generation {row.generation} lost); not written over",
                )
            refreshed_by = (
                node if state.refreshed_at != row.state.refreshed_at else row.refreshed_by
            )
            written = AccountRow(
                uid=row.uid,
                state=state,
                key_id=fleet.keyring.newest.key_id,
                due_at=due_at,
                refreshed_by=refreshed_by,
                status=status or RefreshStatus(),
                updated_at=None,
            )
        await notify_changed(conn, self.name, state.generation)
        return written

    async def next_generation(self, old: AccountState | None) -> int:
        """Return the generation of a new token set that replaces ``old`` (a login, an import),
        read under the hold: one above ``old``'s and above every row of this name that was
        deleted (a logout; sql/0004_generation_after_logout.sql), so the generation never goes
        backwards. Consumers, hooks and templates take a generation that is not above the last
        one for tokens they had. AccountStore.next_generation is the file store's."""
        held = self._held
        if held is None:
            raise RuntimeError(f"account {self.name!r}: the next generation is read under the hold")
        async with self._answered(held.conn, f"read account {self.name!r}"):
            deleted = await deleted_generation(held.conn, self.name)
        return max(old.generation if old is not None else 0, deleted) + 1

    # ------------------------------------------------------------------ changing

    def save(self, state: AccountState) -> None:
        """Stage ``state``; it is written when the hold ends. Outside a hold: StoreWriteError."""
        if self._held is None:
            raise StoreWriteError(
                f"account {self.name!r}: not in the store yet (it is written under the "
                "account's row lock, which is taken for the next try)"
            )
        self._held.staged = state
        self._held.delete = False

    def stage_delete(self) -> None:
        """Delete the account's row when the hold ends (logout)."""
        if self._held is None:
            raise StoreWriteError(f"account {self.name!r}: a logout needs the row lock")
        self._held.staged = None
        self._held.delete = True

    def set_aside_state(self, label: str, *, keep: bool = False) -> Path | None:
        """The store never goes backwards (compare-and-swap): nothing to keep aside."""
        return None

    def restore_reserve(self) -> bool:
        """No disk reserve for the database: nothing to restore."""
        return True

    # ------------------------------------------------------------------ the rescue file

    def ready_rescue_dir(self) -> None:
        """Create ``<state_dir>/rescue/`` (0700) when it is missing."""
        path = self.rescue_path
        if path is not None:
            make_dirs(path.parent, mode=0o700)

    def save_rescue(self, state: AccountState) -> bool:
        """Write ``state`` to the encrypted rescue file (0600, atomic, fsynced).

        Sealed with the store's newest key; the associated data binds it to this store, this
        account and the generation, so it cannot be replayed elsewhere.
        """
        path = self.rescue_path
        if path is None:
            return False
        keyring = self.fleet.keyring
        plain = json.dumps(state.to_dict(), ensure_ascii=False).encode()
        sealed = keyring.seal(
            plain,
            account=self.name,
            row_id=self._rescue_id(),
            column=f"rescue:{state.generation}",
        )
        document = {
            "version": RESCUE_VERSION,
            "store_id": self.fleet.store_id,
            "account": self.name,
            "generation": state.generation,
            "saved_at": format_time(utcnow()),
            "sealed": base64.b64encode(sealed).decode(),
        }
        try:
            make_dirs(path.parent, mode=0o700)
            atomic_write(
                path, json.dumps(document, indent=2).encode() + b"\n", mode=STATE_FILE_MODE
            )
        except StoreError as exc:
            failing = self.fleet.rescue_failing
            failing[self.name] = rescue_not_written(self.name, exc, failing.get(self.name))
            return False
        rescue_written(self.name, path, self.fleet.rescue_failing.pop(self.name, None))
        return True

    def _rescue_id(self) -> uuid.UUID:
        try:
            return uuid.UUID(self.fleet.store_id)
        except ValueError:
            return uuid.UUID(int=0)

    def load_rescue(self) -> AccountState | None:
        """Return the state in the rescue file (None: none, damaged, or another store's)."""
        path = self.rescue_path
        if path is None:
            return None
        try:
            raw = read_file(path, what="rescue file")
        except FileNotFoundError:
            return None
        except (OSError, StoreError) as exc:
            log.error("account %s: cannot read the rescue file %s: %s", self.name, path, exc)
            return None
        try:
            document = parse_json(raw)
            if document.get("version") != RESCUE_VERSION or document.get("account") != self.name:
                raise ValueError("not a rescue file of this version and account")
            generation = int(document["generation"])
            plain = self.fleet.keyring.unseal(
                base64.b64decode(document["sealed"]),
                account=self.name,
                row_id=self._rescue_id(),
                column=f"rescue:{generation}",
            )
            state = AccountState.from_dict(parse_json(plain))
        except TokenDecryptError as exc:
            log.critical(
                "account %s: the rescue file %s cannot be decrypted: %s (kept; %s)",
                self.name,
                path,
                exc.message,
                exc.hint or "",
            )
            return None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            kept = self.set_aside_rescue("corrupt")
            log.error(
                "account %s: rescue file %s is damaged (%s); kept as %s",
                self.name,
                path,
                type(exc).__name__,
                kept,
            )
            return None
        if state.account != self.name or state.generation != generation:
            log.error("account %s: rescue file %s does not match its header", self.name, path)
            return None
        return state

    def discard_rescue(self) -> None:
        """Delete the rescue file once the store holds its state (missing is fine).

        Under a hold the state is only staged: the file goes once the commit has succeeded.
        Removed before (as the file store may, whose save is durable when it returns), a node
        killed while its commit waited on the database lost the rescued refresh token.
        """
        if self._held is not None:
            self._held.discard_rescue = True
            return
        self._discard_rescue_now()

    def _discard_rescue_now(self) -> None:
        """Delete the rescue file now (missing is fine)."""
        # The store took the tokens: an episode of unwritable rescue files is over.
        self.fleet.rescue_failing.pop(self.name, None)
        path = self.rescue_path
        if path is None:
            return
        try:
            removed = unlink_durably(path)
        except OSError as exc:
            log.warning("account %s: cannot remove %s: %s", self.name, path, exc)
            return
        if removed:
            log.info(
                "account %s: rescue file %s removed (the store holds its tokens)", self.name, path
            )

    def set_aside_rescue(self, label: str) -> Path | None:
        """Keep the rescue file under ``<file>.<label>-<stamp>``: never recovered, never lost."""
        path = self.rescue_path
        if path is None:
            return None
        try:  # the file store's way: never clobbering an earlier copy, durable
            return self._files.set_aside_file(path, label)
        except StoreError as exc:
            log.warning("account %s: %s", self.name, exc)
            return None

    # ------------------------------------------------------------------ alerts and publishing

    def _alerts_file(self) -> tuple[str, str]:
        """The directory (text) and name of the account's local alert bookkeeping file: next
        to its state file, as the file store keeps it (no Path made)."""
        return directory_text(self.account.file_text("state_file")), self.name + ALERTS_SUFFIX

    def load_alerts(self) -> dict[str, Any] | None:
        """Return the bookkeeping of this node's own alerts for the account (a local file:
        it must work while the database is away); the account's are in fleet/alertshare.py.

        Most accounts have none: the state directory's listing says so without a Path.
        """
        if not self.fleet.may_hold_alerts(*self._alerts_file()):
            return None
        return self._files.load_alerts()

    def save_alerts(self, document: dict[str, Any]) -> None:
        """Record the bookkeeping of this node's own alerts for the account (a local file)."""
        self._files.save_alerts(document)
        self.fleet.note_alerts(*self._alerts_file())

    def publish(self, state: AccountState, *, now: datetime | None = None) -> None:
        """Write the token file on this node (unless ``publish_accounts`` leaves it out)."""
        if self.publishes:
            self._files.publish(state, now=now)

    def publish_sinks(self, state: AccountState) -> list[str]:
        """Write the extra token files on this node; return what failed."""
        return self._files.publish_sinks(state) if self.publishes else []

    def unpublish(self) -> None:
        """Remove this node's token file after a logout (consumers must not read a dead token).

        Only the token file: the state file next to it, if any, is the inert copy `store
        migrate` left behind, and stays.
        """
        if not self.publishes:
            return
        path = self._files.token_path
        try:
            removed = unlink_durably(path)
        except OSError as exc:
            log.error("account %s: cannot remove %s after a logout: %s", self.name, path, exc)
            return
        if removed:
            log.info("account %s: logged out; removed %s", self.name, path)

    def read_published(self) -> dict[str, Any] | None:
        """Return this node's published token document (None: none)."""
        return self._files.read_published()

    def published_current(self, generation: int) -> bool:
        """True when this node's token file is current (or it publishes none)."""
        return not self.publishes or self._files.published_current(generation)


_trim: Callable[[int], int] | None = None
#: Resident memory (KiB) right after the heap was last given back (None: not yet).
_trimmed_at: int | None = None
#: How much a node may grow (KiB of resident memory) before a heartbeat gives the heap's
#: free pages back again (give_back_if_grown).
TRIM_AFTER_GROWTH = 1024


def give_back_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``) after a
    read of every row: its transient objects (raw results, decrypted bytes, the comparison's
    sets) are freed among the rows kept, and glibc returns only the top of the heap by
    itself (1.3 MiB of a 10,000-account node, docs/benchmarks.md). Nothing elsewhere (musl):
    the call is skipped. ctypes is loaded by psycopg already.
    """
    global _trim, _trimmed_at
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _trim = lambda pad: 0  # noqa: E731 - not glibc: nothing to give back this way
    _trim(0)
    _trimmed_at = _resident_kib()


def give_back_if_grown() -> bool:
    """Give the heap's free pages back when the process grew by TRIM_AFTER_GROWTH since the
    last time; return True when it did (asked every heartbeat poll).

    What the start leaves after its read of every row (each account's first plan, grading
    and start-up check, their transient objects freed among the ones kept: 1.6 MiB of a
    10,000-account node) is given back at the next heartbeat, and an idle node, whose size
    does not change, is not trimmed again (a trim walks the whole heap).
    """
    now = _resident_kib()
    if now is None or (_trimmed_at is not None and now - _trimmed_at < TRIM_AFTER_GROWTH):
        return False
    give_back_free_heap()
    return True


def _resident_kib() -> int | None:
    """Return this process's resident memory in KiB (None: no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _status_key(due_at: datetime | None, status: RefreshStatus) -> tuple[Any, ...]:
    """What makes a status worth writing: the plan and the failure, not who looked when."""
    return (due_at, status.attempts, status.failing_since, status.last_error_class)
