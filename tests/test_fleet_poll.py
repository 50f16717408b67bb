"""The heartbeat poll against a real PostgreSQL: only the rows written since, none missed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleetkit import migrated, sample_state
from kakao_tokend.errors import StoreError
from kakao_tokend.fleet import accounts, db, schema
from kakao_tokend.fleet.accounts import AccountRow, RefreshStatus, RowLock
from kakao_tokend.fleet.crypto import Keyring, new_key_line
from kakao_tokend.fleet.store import FleetStore, PollMark
from kakao_tokend.fleet.turns import LIVE_HEARTBEATS
from pgcluster import PgCluster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keyring() -> Keyring:
    """One fresh key."""
    return Keyring.parse(new_key_line())


@pytest.fixture
async def open_fleet(keyring: Keyring, tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    """Open a node's FleetStore on a DSN when called (the rows written so far are read)."""
    opened: list[FleetStore] = []

    async def open_(dsn: str, heartbeat: float = 60.0) -> FleetStore:
        fleet = FleetStore(
            dsn=dsn,
            keyring=keyring,
            node="poller",
            timeouts=db.DbTimeouts(),
            state_dir=tmp_path / "state",
            heartbeat=lambda: heartbeat,
        )
        await fleet.open()
        opened.append(fleet)
        return fleet

    yield open_
    for fleet in opened:
        await fleet.close()


async def writer(dsn: str) -> psycopg.AsyncConnection[Any]:
    """Another node's connection (not autocommit: it holds row locks in transactions)."""
    return await db.connect(dsn, node="writer", purpose="test")


async def add(dsn: str, keyring: Keyring, name: str) -> AccountRow:
    """Insert one account, committed, without a notification (as if it were lost)."""
    conn = await writer(dsn)
    async with conn:
        row = await accounts.insert_account(
            conn, keyring, sample_state(name), node="writer", due_at=None
        )
    assert row is not None
    return row


async def refresh(dsn: str, keyring: Keyring, name: str) -> None:
    """Another node's refresh, committed without a notification: the next generation."""
    conn = await writer(dsn)
    async with conn:
        row = await accounts.load_account(conn, keyring, name, lock=RowLock.WAIT)
        assert row is not None
        state = sample_state(name, generation=row.generation + 1)
        assert await accounts.save_account(conn, keyring, row, state, node="writer", due_at=None)


async def execute(dsn: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement in its own transaction, committed; return its rows (if any)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, params or None)  # type: ignore[arg-type]
        return list(await cur.fetchall()) if cur.description else []


async def test_a_change_committed_after_a_poll_by_a_transaction_begun_before_it_is_caught(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[[str], Any]
) -> None:
    """A refresh locks its row, the poll runs, the refresh commits: the next poll reads it.

    The refresh's updated_at is its transaction's start, older than the poll, so a poll for
    "updated_at later than the last poll" would never see this change.
    """
    await migrated(pg_dsn)
    await add(pg_dsn, keyring, "shop")
    fleet: FleetStore = await open_fleet(pg_dsn)
    assert await fleet.poll() == ([], [])
    conn = await writer(pg_dsn)
    async with conn:
        row = await accounts.load_account(conn, keyring, "shop", lock=RowLock.WAIT)
        assert row is not None  # the row lock is held across the Kakao call
        [(polled_at,)] = await execute(pg_dsn, "SELECT now()")
        assert await fleet.poll() == ([], [])  # uncommitted: nothing to see yet
        state = sample_state("shop", generation=row.generation + 1)
        assert await accounts.save_account(conn, keyring, row, state, node="writer", due_at=None)
        await conn.commit()
    naive = await execute(pg_dsn, "SELECT name FROM accounts WHERE updated_at > %s", polled_at)
    assert naive == []  # the hole: the committed change looks older than the poll
    assert await fleet.poll() == (["shop"], [])
    assert fleet.rows["shop"].generation == row.generation + 1


async def test_a_poll_reads_only_the_rows_written_since_the_last_one(
    pg_cluster: PgCluster, keyring: Keyring, open_fleet: Callable[[str], Any]
) -> None:
    """Idle polls read no row; after two writes the poll reads those two, not all 40.

    On a cluster of its own: another test's transaction open in the shared server would hold
    the horizon back and make these polls re-read rows (safe, but not countable).
    """
    pg_dsn = pg_cluster.dsn()
    await migrated(pg_dsn)
    for i in range(40):
        await add(pg_dsn, keyring, f"acct{i:02d}")
    fleet: FleetStore = await open_fleet(pg_dsn)
    assert await fleet.poll(full=True) == ([], [])  # compares all 40, re-reads none
    assert (fleet.stats.full_polls, fleet.stats.poll_rows) == (1, 0)
    for _ in range(3):
        assert await fleet.poll() == ([], [])
    assert (fleet.stats.full_polls, fleet.stats.poll_rows) == (1, 0)
    await refresh(pg_dsn, keyring, "acct07")
    conn = await writer(pg_dsn)
    async with conn:  # a status update: no new generation, but the due moment moves
        row = await accounts.load_account(conn, keyring, "acct31")
        assert row is not None
        due = datetime.now(UTC) - timedelta(seconds=1)
        assert await accounts.save_status(conn, row, due_at=due, status=RefreshStatus())
    assert await fleet.poll() == (["acct07", "acct31"], ["acct31"])
    assert (fleet.stats.full_polls, fleet.stats.poll_rows) == (1, 2)
    assert fleet.rows["acct07"].generation == 2
    assert fleet.rows["acct31"].due_at == due
    assert await fleet.poll() == ([], ["acct31"])  # still due; nothing written since
    assert fleet.stats.poll_rows == 2


async def test_inserts_deletes_and_a_write_by_hand_are_caught(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[[str], Any]
) -> None:
    """No notification for any of them: the poll alone brings the cache up to date, and the
    names are listed only after a deletion."""
    await migrated(pg_dsn)
    for name in ("alice", "bob", "carol"):
        await add(pg_dsn, keyring, name)
    fleet: FleetStore = await open_fleet(pg_dsn)
    await add(pg_dsn, keyring, "dave")
    await execute(pg_dsn, "DELETE FROM accounts WHERE name = 'alice'")
    # An operator's UPDATE that touches neither generation nor updated_at.
    await execute(pg_dsn, "UPDATE accounts SET due_at = now() - interval '1 s' WHERE name = 'bob'")
    assert await fleet.poll() == (["alice", "bob", "dave"], ["bob"])
    assert sorted(fleet.rows) == ["bob", "carol", "dave"]
    assert fleet.rows["bob"].due_at is not None
    # A row that does not decrypt, then deleted: gone from the unreadable ones too.
    await execute(
        pg_dsn,
        "UPDATE accounts SET refresh_token ="
        " (SELECT refresh_token FROM accounts WHERE name = 'bob') WHERE name = 'carol'",
    )
    assert await fleet.poll() == (["carol"], ["bob"])
    assert "carol" in fleet.unreadable and "carol" not in fleet.rows
    await execute(pg_dsn, "DELETE FROM accounts WHERE name = 'carol'")
    await fleet.poll()
    assert fleet.unreadable == {} and sorted(fleet.rows) == ["bob", "dave"]
    reads = fleet.stats.poll_rows
    await execute(pg_dsn, "TRUNCATE accounts CASCADE")
    assert await fleet.poll() == (["bob", "dave"], [])
    assert fleet.rows == {} and fleet.stats.poll_rows == reads + 2


async def test_a_version_2_store_is_upgraded_and_its_rows_are_then_polled_incrementally(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store of version 2, with rows, takes migration 3 (and the later ones) when a node starts;
    writes by a node of the previous version (which knows nothing of writer_xid) are caught."""
    shipped = schema.shipped_migrations()
    with monkeypatch.context() as patched:
        patched.setattr(schema, "shipped_migrations", lambda: shipped[:2])
        await migrated(pg_dsn)
    for name in ("alice", "bob"):
        await add(pg_dsn, keyring, name)
    fleet: FleetStore = await open_fleet(pg_dsn)
    assert fleet.schema_version == schema.code_version() >= 3
    applied = await execute(pg_dsn, "SELECT version, applied_by FROM schema_migrations")
    assert [version for version, _ in applied] == list(range(1, schema.code_version() + 1))
    stamped = await execute(pg_dsn, "SELECT count(*) FROM accounts WHERE writer_xid IS NOT NULL")
    assert stamped == [(2,)]
    assert sorted(fleet.rows) == ["alice", "bob"]
    # The previous version's UPDATE and DELETE statements name no new column.
    await refresh(pg_dsn, keyring, "bob")
    await execute(pg_dsn, "DELETE FROM accounts WHERE name = 'alice'")
    assert await fleet.poll() == (["alice", "bob"], [])
    assert sorted(fleet.rows) == ["bob"] and fleet.rows["bob"].generation == 2
    assert fleet.stats.poll_rows == 2


async def test_a_failed_poll_makes_the_next_one_compare_every_row(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[[str], Any]
) -> None:
    """Whatever a poll that failed half-way had seen, the next one starts from scratch."""
    await migrated(pg_dsn)
    await add(pg_dsn, keyring, "shop")
    fleet: FleetStore = await open_fleet(pg_dsn)
    await execute(pg_dsn, "ALTER TABLE account_deletions RENAME TO hidden")
    with pytest.raises(StoreError):
        await fleet.poll()
    await execute(pg_dsn, "ALTER TABLE hidden RENAME TO account_deletions")
    await refresh(pg_dsn, keyring, "shop")
    assert await fleet.poll() == (["shop"], [])
    assert fleet.stats.full_polls == 1


async def test_transaction_ids_going_backwards_make_the_poll_compare_every_row(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[[str], Any]
) -> None:
    """A mark from ahead of the cluster's ids (a store restored into a younger cluster) would
    hide every later write: the poll notices and compares every row instead."""
    await migrated(pg_dsn)
    await add(pg_dsn, keyring, "shop")
    fleet: FleetStore = await open_fleet(pg_dsn)
    assert fleet._mark is not None
    fleet._mark = PollMark(fleet._mark.xmin + 1_000_000, fleet._mark.deletions)
    await refresh(pg_dsn, keyring, "shop")
    assert await fleet.poll() == (["shop"], [])
    assert fleet.stats.full_polls == 1
    assert fleet._mark is not None and fleet._mark.xmin < 1_000_000


async def test_a_node_that_names_ahead_is_told_of_the_rows_coming_due_within_its_window(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[[str], Any]
) -> None:
    """A node whose scheduler leaves far accounts to the poll (names_ahead) hears of every
    row due within its window, by the incremental poll and by the full one alike, and not
    of one due later; names_in_time lets an account out of the due queue only when a poll
    will name it before its moment, and never while the store does not answer."""
    await migrated(pg_dsn)
    for name in ("soon", "later", "never"):
        await add(pg_dsn, keyring, name)
    now = datetime.now(UTC)
    window = 60.0
    await execute(
        pg_dsn,
        "UPDATE accounts SET due_at = %s WHERE name = 'soon'",
        now + timedelta(seconds=window / 2),
    )
    await execute(
        pg_dsn,
        "UPDATE accounts SET due_at = %s WHERE name = 'later'",
        now + timedelta(seconds=3 * window),
    )
    fleet: FleetStore = await open_fleet(pg_dsn)
    fleet.heartbeat = lambda: 1.0
    assert fleet.due_window() == 0.0  # a plain store names only what is due now
    assert (await fleet.poll(full=True))[1] == []
    fleet.names_ahead = True
    assert fleet.due_window() == window
    assert (await fleet.poll(full=True))[1] == ["soon"]
    assert (await fleet.poll())[1] == ["soon"]

    later = fleet.rows["later"].due_at
    assert later is not None
    assert fleet.names_in_time("later", later, now)  # named again 60 s before its moment
    assert fleet.names_in_time("later", later + timedelta(seconds=30), now)  # a claim delay
    assert not fleet.names_in_time("later", later - timedelta(seconds=1), now)  # before due_at
    assert not fleet.names_in_time("soon", later, later - timedelta(seconds=window - 1))
    assert not fleet.names_in_time("never", later, now)  # no due_at: no poll names it
    fleet.stats.unavailable_since = now  # no poll answers: every account keeps its place
    assert not fleet.names_in_time("later", later, now)


async def test_only_a_poll_says_the_cache_has_caught_up_not_a_notifications_reread(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[..., Any]
) -> None:
    """A node that heard nothing for three heartbeats (paused) is behind until a poll has read
    every changed row. Re-reading the rows of the first notifications does not make it
    current: after a pause the rest still wait in the listener's socket, and the claims of
    those accounts went ahead of the poll (row locks taken for nothing)."""
    await migrated(pg_dsn)
    await add(pg_dsn, keyring, "shop")
    # Not 0.1 s: the last poll and the check after it must end within LIVE_HEARTBEATS
    # heartbeats of the poll's start (a longer poll counts from its start), and on two
    # saturated cores a poll took over 0.3 s (a full run, 2026-12-03). The silence's length is
    # not what this test checks.
    heartbeat = 0.5
    fleet: FleetStore = await open_fleet(pg_dsn, heartbeat)
    await fleet.poll()
    assert fleet.behind_since() is None
    await asyncio.sleep(LIVE_HEARTBEATS * heartbeat * 1.5)  # paused: nothing heard
    assert fleet.behind_since() is not None
    await refresh(pg_dsn, keyring, "shop")
    rows = await fleet.reload_many({"shop"})  # what the notification applier does
    fleet.note_notification(rows["shop"])
    assert fleet.behind_since() is not None
    await fleet.poll()
    assert fleet.behind_since() is None


async def test_a_poll_the_node_was_stopped_during_leaves_it_behind(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[..., Any]
) -> None:
    """A poll under way when the node was stopped (SIGSTOP, a stalled loop) ends after the
    pause with the rows as they were before it: it does not make the node current. Counted
    from its end, the claims dispatched at the SIGCONT found the node "not behind", skipped
    the re-read and locked rows the other node had refreshed meanwhile."""
    await migrated(pg_dsn)
    await add(pg_dsn, keyring, "shop")
    heartbeat = 0.5  # not 0.1: as in the test above, the last poll must end within 3 of them
    fleet: FleetStore = await open_fleet(pg_dsn, heartbeat)
    await fleet.poll()
    polling = asyncio.create_task(fleet.poll())
    await asyncio.sleep(0)  # the poll has begun: it waits for the database
    time.sleep(LIVE_HEARTBEATS * heartbeat * 2)  # the whole process stopped meanwhile
    await polling
    assert fleet.behind_since() is not None
    await fleet.poll()  # one begun after the pause
    assert fleet.behind_since() is None


async def test_a_read_older_than_the_cached_row_leaves_the_newer_one_cached(
    pg_dsn: str, keyring: Keyring, open_fleet: Callable[..., Any]
) -> None:
    """A poll whose snapshot predates a commit (this node's own, made while the poll waited
    for its answer) reads the row's older generation after the commit put the newer one in
    the cache. Kept, it made the account's manager see the store go backwards and write a
    rescue file that nothing removed (a CI run of the PostgreSQL-restart e2e test). The cache
    keeps the newer row; a row made anew (a new id: a logout, then a login) replaces it
    whatever its generation."""
    await migrated(pg_dsn)
    await add(pg_dsn, keyring, "shop")
    fleet: FleetStore = await open_fleet(pg_dsn)
    older = await fleet.reload("shop")
    await refresh(pg_dsn, keyring, "shop")
    newer = await fleet.reload("shop")
    assert older is not None and newer is not None
    assert newer.generation == older.generation + 1
    assert fleet.keep_row(older) == newer
    assert fleet.rows["shop"] == newer
    await execute(pg_dsn, "DELETE FROM accounts WHERE name = %s", "shop")
    again = await add(pg_dsn, keyring, "shop")
    assert again.uid != newer.uid and again.generation <= newer.generation
    made_anew = await fleet.reload("shop")  # read by this node's store (kept as read)
    assert made_anew is not None and made_anew.uid == again.uid
    assert fleet.rows["shop"] == made_anew
