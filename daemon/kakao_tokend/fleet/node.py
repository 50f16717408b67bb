"""A fleet node's view of the store kept current: LISTEN/NOTIFY, the heartbeat poll, its row.

Every change of an account (a refresh by any node, a login, an import, a logout) sends a
notification inside the writing transaction (fleet/accounts.py ``notify_changed``). The node
listens on a direct connection of its own in autocommit mode (a pooled one would hand the
LISTEN to the next borrower), re-reads the account and tells the daemon, which adopts and
publishes it: every node is current within about a second of the commit. Notifications sent
while the listener is disconnected are lost, so after every (re)connect it first LISTENs and
then re-reads what changed; and every heartbeat it polls ``accounts`` anyway (the backstop:
only the rows written since the last poll), upserts its ``nodes`` row and names the accounts
the database says are due. A node that heard nothing for a few heartbeats (it was paused, its
loop stalled) re-reads what changed before it claims anything (:meth:`FleetNode.resync`,
FleetStore.catch_up): the rows other nodes refreshed meanwhile are published at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import StoreError
from ..tokens import utcnow
from .accounts import CHANNEL, parse_notification
from .db import connect, deadline, end_tasks, no_answer, store_errors
from .store import FleetStore, Planner
from .turns import LIVE_HEARTBEATS

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from ..refresher import AccountManager

__all__ = ["FleetNode", "plan_for"]

log = logging.getLogger(__name__)


def plan_for(manager: AccountManager) -> Planner:
    """Return what the account's store asks as a hold ends (store.plan_of): the manager
    itself. A planner object per account, 40 bytes, was one more for each of a node's
    10,000 accounts."""
    return manager


class FleetNode:
    """Listens for changes, polls as the backstop and keeps the node's ``nodes`` row."""

    def __init__(
        self,
        fleet: FleetStore,
        *,
        on_change: Callable[[str], None],
        on_due: Callable[[str], None],
        on_health: Callable[[], None] = lambda: None,
    ) -> None:
        self.fleet = fleet
        self.on_change = on_change
        self.on_due = on_due
        #: Called after every poll and every failed (re)connect: the store's health may differ.
        self.on_health = on_health
        self.started_at = utcnow()
        #: The (host, pid) of other live nodes found writing this node's row (said once each).
        self._named_twice: set[tuple[str, int]] = set()
        self.listening = False
        #: Accounts notified but not re-read yet: the listener only collects, the applier
        #: re-reads all of them with one query (see _apply_notified).
        self._notified_names: set[str] = set()
        self._notified_event = asyncio.Event()
        #: Set once the first LISTEN and sync are done (or failed): start() waits for it.
        self._first_sync = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: One sync at a time; the number begun so far lets a caller skip its own when one
        #: begun after it asked has ended meanwhile (see _reread).
        self._sync_lock = asyncio.Lock()
        self._syncs_begun = 0
        #: When (time.monotonic()) the re-read under way, or the last one, began.
        self._reread_began = 0.0
        #: The re-read claims wait for when the node fell behind (see resync).
        self._resyncing: asyncio.Task[bool] | None = None

    async def start(self, *, wait: float | None = None) -> None:
        """Start listening; wait up to ``wait`` seconds for the first LISTEN and sync.

        Waiting lets a (re)started node re-read every row committed while it was down and
        publish it before it says it is ready, instead of serving its old files for one
        listener connect after READY. A database that does not answer in time does not hold
        the start up: the listener keeps trying in the background.
        """
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()), loop.create_task(self._apply_notified())]
        self.fleet.resync = self.resync
        if wait:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._first_sync.wait()

    async def stop(self) -> None:
        """Stop listening, and leave the ``nodes`` table.

        Without its row the others stop counting this node as live at their next heartbeat:
        its accounts (their first claims, their alerts) move to them at once instead of
        after three heartbeats of silence (fleet/turns.py). A node that dies keeps its row
        and is judged by its age. Bounded by one database deadline; a database that does not
        answer only means the others wait those three heartbeats.
        """
        self.fleet.resync = None
        tasks: list[asyncio.Task[Any]] = [*self._tasks]
        self._tasks = []
        if self._resyncing is not None and not self._resyncing.done():
            tasks.append(self._resyncing)
        await end_tasks(tasks)  # one mid-query by ending its connection; cancels may be lost
        try:
            # Borrowing and the statement within one deadline (connection() shuts a silent
            # connection down): an outer cancel would reach psycopg mid-query, whose cancel
            # request waits on the silent network (db.deadline).
            async with self.fleet.connection(
                "remove this node's row", within=self.fleet.deadline
            ) as conn:
                with store_errors("remove this node's row"):
                    await conn.execute("DELETE FROM nodes WHERE name = %s", (self.fleet.node,))
                    await conn.commit()
        except StoreError as exc:
            log.debug("cannot remove this node's row: %s", exc)

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._listen()
                attempt = 0
            except StoreError as exc:
                self.fleet.failed(exc)
            except Exception:
                log.exception("the store's listener failed")
            self.listening = False
            self._first_sync.set()  # failed: start() need not wait any longer
            self.on_health()
            attempt += 1
            # The one back-off rule, never longer than a heartbeat: the poll after the
            # reconnect is what brings the node up to date again.
            await asyncio.sleep(self.fleet.reconnect_delay(attempt))

    async def _listen(self) -> None:
        fleet = self.fleet
        conn = await connect(
            fleet.dsn, node=fleet.node, purpose="listen", timeouts=fleet.timeouts, autocommit=True
        )
        async with conn:
            try:
                async with deadline(conn, fleet.deadline):
                    with store_errors("listen for the store's changes"):
                        await conn.execute(f"LISTEN {CHANNEL}")
            except TimeoutError:
                raise no_answer("listen for the store's changes", fleet.deadline) from None
            self.listening = True
            log.debug("listening for the store's changes")
            # After LISTEN: nothing committed from now on is missed. Every row is compared: the
            # database that answers after an outage may be another one (a restore).
            await self.sync(full=True)
            self._first_sync.set()
            while True:
                with store_errors("wait for the store's notifications"):
                    async for note in conn.notifies(timeout=self.fleet.heartbeat()):
                        await self._notified(note.payload)
                await self._probe(conn)
                await self.sync()

    async def _probe(self, conn: AsyncConnection[Any]) -> None:
        """A round trip on the listener's connection: a silent one is given up on."""
        try:
            async with deadline(conn, self.fleet.deadline):
                with store_errors("check the listener's connection"):
                    await conn.execute("SELECT 1")
        except TimeoutError:
            raise no_answer("check the listener's connection", self.fleet.deadline) from None

    async def _notified(self, payload: str) -> None:
        """Note the account for the applier; never a round trip here.

        A node continued after a pause finds hundreds of notifications queued; re-reading
        the account for each one in turn kept it serving its old token files for seconds.
        Collected, they cost one query per batch, whatever the number of accounts.
        """
        parsed = parse_notification(payload)
        if parsed is None:
            return
        self.fleet.stats.notifications += 1
        self._notified_names.add(parsed[0])
        self._notified_event.set()

    async def _apply_notified(self) -> None:
        """Re-read the notified accounts, all of them in one query, and tell the daemon."""
        while True:
            await self._notified_event.wait()
            self._notified_event.clear()
            names, self._notified_names = self._notified_names, set()
            try:
                rows = await self.fleet.reload_many(names)
            except StoreError as exc:
                # The heartbeat's poll re-reads whatever changed; nothing is lost by waiting.
                log.warning("cannot re-read %d notified account(s): %s", len(names), exc)
                continue
            for name in sorted(names):
                self.fleet.note_notification(rows[name])
                self.on_change(name)

    def resync(self, since: float) -> asyncio.Task[bool]:
        """Return a re-read of what changed that begins after ``since`` (``time.monotonic()``:
        when the node fell behind), for FleetStore.catch_up; True when it succeeded. The
        listener's poll under way counts when it began after ``since``."""
        task = self._resyncing
        if task is None or task.done():
            task = self._resyncing = asyncio.get_running_loop().create_task(self._resync(since))
        return task

    async def _resync(self, since: float) -> bool:
        try:
            await self._reread(since=since)
        except StoreError:
            return False  # logged by _reread; the listener's next poll tries again
        return True

    async def sync(self, *, full: bool = False) -> None:
        """Poll: re-read changed rows, tell the daemon, claim what is due, upsert our row.

        ``full`` compares every row instead of reading only those written since the last poll.
        """
        await self._reread(full=full)
        try:
            await self._seen()
        except StoreError as exc:
            log.debug("cannot update this node's row: %s", exc)

    async def _reread(self, *, full: bool = False, since: float | None = None) -> None:
        """Re-read the changed rows and tell the daemon (and what is due).

        One at a time: asked for while another runs, it waits for that one, and is not
        repeated when one begun after it was asked for (or after ``since``, the monotonic
        clock) has ended meanwhile: the listener's poll after a pause and the claims'
        re-read are then one.
        """
        asked = self._syncs_begun
        if since is not None and self._sync_lock.locked() and self._reread_began > since:
            asked -= 1  # the one under way began late enough
        async with self._sync_lock:
            if not full and self._syncs_begun > asked:
                return
            self._syncs_begun += 1
            self._reread_began = time.monotonic()
            try:
                changed, due = await self.fleet.poll(full=full)
            except StoreError as exc:
                log.warning("cannot poll the store: %s", exc)
                self.on_health()
                raise
        self.on_health()
        for name in changed:
            self.on_change(name)
        for name in due:
            self.on_due(name)

    def _check_name_is_ours(self, row: tuple[Any, ...] | None) -> None:
        """Say (once per other process) when another live node writes this node's row.

        Two nodes with one ``node_name`` (cloned containers keep the host name that is the
        default) share a row: each counts as the other, so the turns and the alerts sent
        once per fleet by an account's first claimant go out twice. The row is another live
        node's when it was written by another process, for another start, within the
        heartbeats that keep a node live — not by this node's own previous run on this host
        (its pid is gone)."""
        if row is None:
            return
        host, pid, started_at, age = row
        me = (socket.gethostname(), os.getpid())
        if (host, pid) == me or started_at == self.started_at or pid is None:
            return
        window = timedelta(seconds=LIVE_HEARTBEATS * self.fleet.heartbeat())
        if age is None or age > window or (host == me[0] and not _pid_alive(pid)):
            return
        if (host, pid) in self._named_twice:
            return
        self._named_twice.add((host, pid))
        log.error(
            "another node named %r is running (host %s, pid %s): both write one nodes row, so"
            " accounts' alerts may go out twice; give each node its own [store] node_name",
            self.fleet.node,
            host,
            pid,
        )

    async def _seen(self) -> None:
        from psycopg.types.json import Jsonb

        fleet = self.fleet
        stats = fleet.stats
        counters = {
            "claim_conflicts": stats.claim_conflicts,
            "commits": stats.commits,
            "failed_commits": stats.failed_commits,
            "notifications": stats.notifications,
            "notify_lag": stats.last_notify_lag,
        }
        async with fleet.connection("update this node's row") as conn:
            cur = await conn.execute(
                "SELECT host, pid, started_at, now() - last_seen_at FROM nodes WHERE name = %s",
                (fleet.node,),
            )
            self._check_name_is_ours(await cur.fetchone())
            await conn.execute(
                "INSERT INTO nodes (name, started_at, last_seen_at, version, schema_version,"
                " host, pid, stats) VALUES (%s, %s, now(), %s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at,"
                " last_seen_at = now(), version = excluded.version,"
                " schema_version = excluded.schema_version, host = excluded.host,"
                " pid = excluded.pid, stats = excluded.stats",
                (
                    fleet.node,
                    self.started_at,
                    __version__,
                    fleet.schema_version,
                    socket.gethostname(),
                    os.getpid(),
                    Jsonb(counters),
                ),
            )
            cur = await conn.execute("SELECT name, last_seen_at FROM nodes ORDER BY name")
            fleet.nodes = {name: seen for name, seen in await cur.fetchall()}
            await conn.commit()


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
