"""Alerts in a fleet: each account's alerts are sent once, by one node, recorded in the store.

Every node grades every account (status, ``/healthz`` and metrics stay per node), but only
the account's first claimant among the live nodes (fleet/turns.py: the rule that already
says who refreshes it first) sends its alerts; the others send nothing for it. What was sent
is recorded in the ``alerts`` table (fleet/alertbook.py, the same records as the file's), so
a node that takes over continues from it: a node counts as gone only after LIVE_HEARTBEATS
heartbeats without its ``nodes`` row moving, and the next owner re-read the table at every
one of them. It sends nothing again as new, the repeats of critical conditions keep their
schedule, and a resolution goes out once. The conditions about the node itself
(health.NODE_LOCAL: it cannot reach the database, its token files, its own config ...) are
not here: each node sends them with bookkeeping on its own disk, as it must while the
database is away.

The alerts are graded synchronously (on events and when due; storage.py's
``load_alerts``/``save_alerts`` are synchronous too) while the database is async and may be
away, so :class:`AlertBook` is a copy in memory, written behind: the whole table read with
one query when the node starts and again every heartbeat (it holds only the conditions
active now, a few rows), and every change kept in the copy at once and written by a
background task, all changed accounts in one transaction, retried with the one back-off
rule until it succeeds. A write that fails loses nothing and holds nothing up: the alert
went out, the record stays in memory and is written when the database answers.

A node grades an account's alerts only when something about it changes or a threshold is
due (alerts.py), so the book says what changed here: the accounts whose records another
node wrote (found by the re-read), and every account when the live nodes changed (any
account may have a new first claimant then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ..errors import StoreError
from ..health import NODE_LOCAL
from ..tokens import backoff_delay
from .alertbook import Records, load_every_record, record_params, replace_records
from .db import end_tasks
from .turns import first_claimant, live_nodes

if TYPE_CHECKING:
    from .store import FleetStore

__all__ = ["AlertBook"]

log = logging.getLogger(__name__)


class AlertBook:
    """The node's copy of the ``alerts`` table, written behind; who delivers each account."""

    def __init__(self, fleet: FleetStore) -> None:
        self.fleet = fleet
        #: account -> condition -> record, for the fleet-wide conditions only.
        self._records: dict[str, Records] = {}
        #: Accounts changed here and not written yet, with the change count they were at.
        self._dirty: dict[str, int] = {}
        self._changes = 0
        #: True once the table was read: until then this node delivers nothing fleet-wide.
        self.loaded = False
        #: Failed writes in a row (for the back-off; 0 while writes succeed).
        self.failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Accounts whose records a re-read changed since :meth:`changed` was last asked.
        self._changed: set[str] = set()
        #: The live nodes (None: delivering nothing yet) as :meth:`changed` last saw them.
        self._live: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ alerts.SharedAlerts

    def delivers(self, account: str) -> bool:
        """True when this node is ``account``'s first claimant among the live nodes, and the
        table and the nodes were read (a node starting up waits for its first heartbeat),
        and it is not behind the store."""
        nodes = self._live_nodes()
        return nodes is not None and first_claimant(account, nodes) == self.fleet.node

    def _live_nodes(self) -> tuple[str, ...] | None:
        """Return the live nodes, or None while this node delivers nothing: not read yet, or
        behind the store (FleetStore.behind_since).

        A node continued after a pause judges its accounts by rows and a node list from
        before it: the lock holder stopped across its Kakao call graded its timed-out call
        against the access token that expired meanwhile and paged `access_expiring`, while
        the others, which had counted it gone, served the token they had refreshed. Its
        accounts' alerts wait for the re-read; the live nodes then "change" (from None), so
        every account is graded again on what the store says.
        """
        fleet = self.fleet
        if not self.loaded or not fleet.nodes or fleet.behind_since() is not None:
            return None
        return tuple(live_nodes(fleet.nodes, me=fleet.node, heartbeat=fleet.heartbeat()))

    def changed(self) -> set[str] | None:
        """Return the accounts whose records another node changed since the last call; None
        when the live nodes changed (every account may have a new first claimant)."""
        live = self._live_nodes()
        moved, self._live = live != self._live, live
        changed, self._changed = self._changed, set()
        return None if moved else changed

    def records(self, account: str) -> Records:
        """Return ``account``'s fleet-wide records as known here."""
        return self._records.get(account, {})

    def record(self, account: str, active: Records) -> None:
        """Keep ``active`` as the account's records now; write it to the table soon."""
        self._records[account] = dict(active)
        self._changes += 1
        self._dirty[account] = self._changes
        self._wake.set()

    @property
    def pending(self) -> int:
        """Return how many accounts have records not written to the table yet."""
        return len(self._dirty)

    # ------------------------------------------------------------------ the table

    async def load(self) -> None:
        """Read the whole table (one query); accounts changed here meanwhile keep theirs."""
        async with self.fleet.connection("read the store's alerts") as conn:
            found = await load_every_record(conn)
            await conn.commit()
        for account in set(self._records) | set(found):
            if account in self._dirty:  # changed here, not written yet: ours is newer
                continue
            records = {k: v for k, v in found.get(account, {}).items() if k not in NODE_LOCAL}
            if records != self._records.get(account, {}):
                self._changed.add(account)  # another node's sending: grade it again here
            if records:
                self._records[account] = records
            else:
                self._records.pop(account, None)
        self.loaded = True

    async def flush(self, *, within: float | None = None) -> int:
        """Write every changed account's records in one transaction; return how many.

        Within the store's deadline, or ``within`` seconds when given (StoreUnavailable).
        """
        batch = dict(self._dirty)
        if not batch:
            return 0
        node = self.fleet.node
        writes = {account: self._writable(account) for account in sorted(batch)}
        action = f"write the alerts of {len(batch)} account(s)"
        async with self.fleet.connection(action, within=within) as conn:
            for account, records in writes.items():
                await replace_records(conn, account, records, node=node)
            await conn.commit()
        for account, change in batch.items():
            if self._dirty.get(account) == change:  # not changed again meanwhile
                del self._dirty[account]
                if not self._records.get(account):
                    self._records.pop(account, None)
        return len(batch)

    def _writable(self, account: str) -> Records:
        """Return the account's records that make a row: a malformed one (bookkeeping from
        an old file) is left out of the table with an error, instead of failing every write
        of every account; it stays in memory, so it is still not sent twice here."""
        records: Records = {}
        for condition, record in self._records.get(account, {}).items():
            try:
                record_params(account, condition, record)
            except StoreError as exc:
                log.error("not written to the store: %s", exc.message)
                continue
            records[condition] = record
        return records

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start the background task: write changes soon, re-read the table every heartbeat."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_load = loop.time() if self.loaded else float("-inf")
        while True:
            heartbeat = self.fleet.heartbeat()
            if self.failures:
                # The one back-off rule, never longer than a heartbeat; changes made
                # meanwhile wait for the next try (they are in memory).
                await asyncio.sleep(backoff_delay(self.failures, initial=0.2, cap=heartbeat))
            else:
                wait = max(0.0, last_load + heartbeat - loop.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                if loop.time() - last_load >= heartbeat:
                    await self.load()
                    last_load = loop.time()
            except StoreError as exc:
                if not self.failures:
                    log.error(
                        "cannot write or read the alert bookkeeping in the store (%d account(s)"
                        " waiting; kept in memory, retried): %s",
                        self.pending,
                        exc.message,
                    )
                self.failures += 1
            except Exception:
                log.exception("the alert bookkeeping task failed; retrying")
                self.failures += 1
            else:
                if self.failures:
                    log.warning("the alert bookkeeping is written to the store again")
                self.failures = 0

    async def close(self, grace: float) -> None:
        """Stop the task; try once more, for up to ``grace`` seconds, to write what waits."""
        task, self._task = self._task, None
        if task is not None:
            await end_tasks([task])  # one mid-query by ending its connection (db.end_tasks)
        if not self._dirty:
            return
        try:
            # Not asyncio.timeout(grace): its cancel would reach psycopg mid-query, whose
            # cancel request waits on a silent network for seconds (fleet/db.py deadline).
            await self.flush(within=grace)
        except StoreError as exc:
            log.warning(
                "the alert bookkeeping of %d account(s) was not written to the store (%s): the"
                " next node may send their alerts again",
                self.pending,
                exc,
            )
