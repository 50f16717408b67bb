"""A database that goes silent: every store operation returns by its deadline.

When the path to PostgreSQL stops delivering (packets swallowed, not refused: the paused
TcpProxy, whose kernel still acknowledges, as a hung middlebox does), TCP says nothing.
Cancelling a psycopg operation then makes psycopg send a cancel request over that same silent
path and wait for it, and for the cancelled query, five seconds each: the operation returned
about ten seconds after its deadline. A refresh that holds a row lock across the Kakao call
and then commits must learn within its deadline that the commit did not happen: the rescue
file and the alert depend on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from daemonproc import start_daemon
from fleetkit import (
    NODE,
    migrated,
    node_store,
    sample_state,
    until_migration_waits_for_its_lock,
    write_store_config,
)
from fleetrun import login_published, node_config
from kakao_tokend import service
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.errors import StoreUnavailable, StoreWriteError
from kakao_tokend.fleet import db
from kakao_tokend.fleet.alertshare import AlertBook
from kakao_tokend.fleet.db import DbTimeouts
from kakao_tokend.fleet.schema import MIGRATION_LOCK
from kakao_tokend.fleet.store import POOL_CLOSE_WAIT, FleetStore
from kakao_tokend.tokens import format_time, utcnow
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(90)

#: Short server-side timeouts so that the client deadline (statement + 2 s) is 3 s.
TIMEOUTS = DbTimeouts(lock=0.5, statement=1.0)
#: "The deadline plus a small share": what the slowest acceptable return may take.
SHARE = 0.25
#: A wait this many times its limit is cut short (TimeoutError): the old code's waits on a
#: silent database never ended, and the test must fail, not hang until pytest's timeout.
GUARD = 3


def store_through(
    proxy: TcpProxy, dsn: str, tmp_path: Path, timeouts: DbTimeouts, **options: Any
) -> FleetStore:
    """A node store (not opened) whose every connection goes through ``proxy``, with a
    config written in ``tmp_path`` (its key and state directory) and the given timeouts."""
    config = load_config(write_store_config(tmp_path, proxy.dsn(dsn)))
    assert config.store.keyring is not None
    return FleetStore(
        dsn=proxy.dsn(dsn),
        keyring=config.store.keyring,
        node=NODE,
        timeouts=timeouts,
        state_dir=config.state_dir,
        **options,
    )


@pytest.fixture
async def proxied(pg_dsn: str, tmp_path: Path) -> AsyncIterator[tuple[FleetStore, TcpProxy]]:
    """An opened node store whose every connection goes through a TcpProxy."""
    await migrated(pg_dsn)
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        fleet = store_through(proxy, pg_dsn, tmp_path, TIMEOUTS, pool_size=2)
        await fleet.open()
        try:
            yield fleet, proxy
        finally:
            proxy.resume()
            await fleet.close()


def within_deadline(fleet: FleetStore, elapsed: float) -> None:
    """Assert that an operation that started ``elapsed`` seconds ago kept its deadline."""
    within(fleet.deadline, elapsed)


def within(limit: float, elapsed: float) -> None:
    """Assert that an operation given ``limit`` seconds returned within it plus a share."""
    assert elapsed <= limit * (1 + SHARE), f"returned after {elapsed:.1f}s, limit {limit:g}s"


async def test_a_commit_on_a_silent_database_fails_within_its_deadline(
    proxied: tuple[FleetStore, TcpProxy], tmp_path: Path
) -> None:
    """The hold's commit (compare-and-swap, NOTIFY, COMMIT) on a database that went silent
    after the row was locked: StoreWriteError within the deadline plus a small share, and
    the connection is not handed out again."""
    fleet, proxy = proxied
    config = load_config(tmp_path / "config.toml")
    store = fleet.account_store(config.account())
    state = sample_state("default")
    started = 0.0
    with pytest.raises(StoreWriteError) as raised:
        async with store.hold(1.0):
            store.save(state)
            proxy.pause()  # the row is locked; from now on nothing is delivered
            started = time.monotonic()
    within_deadline(fleet, time.monotonic() - started)
    assert not fleet.stats.up
    # One line that says what failed, for the error and for the store's health alike.
    said = (
        "cannot commit account 'default' to the store: "
        f"the database did not answer within {fleet.deadline:g}s"
    )
    assert str(raised.value) == said
    assert fleet.stats.last_error == said
    proxy.resume()
    # The pool lends a working connection afterwards, not the one that missed its deadline.
    async with fleet.connection("check the pool") as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_a_commit_cut_off_by_its_deadline_is_reported_without_psycopgs_repeats(
    proxied: tuple[FleetStore, TcpProxy], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store says that the commit failed (StoreWriteError, the account's own alert); the
    rollback and the pool's return of the connection whose socket the deadline shut down then
    fail too, and psycopg's WARNINGs about that ("discarding closed connection", "error
    ignored in rollback") only repeated it in the journal, on every outage."""
    fleet, proxy = proxied
    caplog.set_level(logging.INFO)
    store = fleet.account_store(load_config(tmp_path / "config.toml").account())
    with pytest.raises(StoreWriteError):
        async with store.hold(1.0):
            store.save(sample_state("default"))
            proxy.pause()
    psycopg_warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("psycopg") and r.levelno >= logging.WARNING
    ]
    assert psycopg_warnings == []


async def test_a_read_on_a_silent_database_fails_within_its_deadline(
    proxied: tuple[FleetStore, TcpProxy],
) -> None:
    """A query through the node's connection helper (the poll, a re-read, the node's row) on
    a database that went silent once the connection was lent: StoreUnavailable within the
    deadline plus a small share."""
    fleet, proxy = proxied
    started = 0.0
    with pytest.raises(StoreUnavailable, match="did not answer within"):
        async with fleet.connection("read the store's accounts") as conn:
            proxy.pause()
            started = time.monotonic()
            await conn.execute("SELECT count(*) FROM accounts")
    within_deadline(fleet, time.monotonic() - started)


async def test_a_pooled_connection_on_a_silent_database_is_given_up_within_the_deadline(
    proxied: tuple[FleetStore, TcpProxy],
) -> None:
    """The pool checks an idle connection before lending it (one the server killed must not
    be handed out); on a database that went silent while it sat in the pool, that check is
    what waits: StoreUnavailable within the deadline plus a small share, not never. The next
    operation, with the store known to be down, tries a new connection to renew the pool
    (on a silent path libpq waits its connect_timeout, 10 s): within the deadline too."""
    fleet, proxy = proxied
    assert fleet.pool_stats()["pool_available"] >= 1  # the check has a connection to test
    proxy.pause()
    for attempt in ("checking the idle connection", "renewing the pool"):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(GUARD * fleet.deadline):
                async with fleet.connection("read the store's accounts") as conn:
                    await conn.execute("SELECT count(*) FROM accounts")
        assert not fleet.stats.up, attempt
        within_deadline(fleet, time.monotonic() - started)


async def test_a_connection_given_less_time_than_the_deadline_keeps_it(
    proxied: tuple[FleetStore, TcpProxy],
) -> None:
    """``within`` bounds borrowing the connection and the work on it together: on a silent
    database the block ends within that time (a stop's last writes have less time than a
    round trip's deadline). Asked again, with the store known to be down, borrowing tries a
    new connection to renew the pool (libpq would wait its connect_timeout on a silent
    path): that too ends within the time given."""
    fleet, proxy = proxied
    budget = fleet.deadline / 3
    proxy.pause()
    for attempt in ("first", "renewing"):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(GUARD * budget):
                async with fleet.connection("write the alerts", within=budget) as conn:
                    await conn.execute("SELECT count(*) FROM accounts")
        assert not fleet.stats.up, attempt
        within(budget, time.monotonic() - started)


async def test_closing_the_alert_book_on_a_silent_database_keeps_its_grace(
    proxied: tuple[FleetStore, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """A stop's last write of the alert bookkeeping on a database that went silent gives up
    after the grace it was given (the stop goes on); the record stays unwritten, and the log
    says the next node may send those alerts again."""
    caplog.set_level(logging.WARNING, logger="kakao_tokend.fleet.alertshare")
    fleet, proxy = proxied
    book = AlertBook(fleet)
    await book.load()
    at = format_time(utcnow())
    book.record("default", {"refresh_expiry": {"severity": "warning", "since": at, "sent": 1}})
    grace = 1.0
    proxy.pause()
    started = time.monotonic()
    async with asyncio.timeout(GUARD * fleet.deadline):
        await book.close(grace)
    within(grace, time.monotonic() - started)
    assert book.pending == 1
    assert "the next node may send their alerts again" in caplog.text


async def test_closing_the_alert_book_while_its_write_waits_on_a_silent_database(
    proxied: tuple[FleetStore, TcpProxy],
) -> None:
    """The book's background task is in the middle of a write when the database goes silent
    and the node stops: the task is stopped by ending its connection, not by a cancel into
    psycopg (whose cancel request waits on the silent path), so the close still keeps its
    grace."""
    fleet, proxy = proxied
    book = AlertBook(fleet)
    await book.load()
    book.start()
    proxy.pause()
    idle = fleet.pool_stats()["pool_available"]  # 1, or 2 if the pool has grown (max_size 2)
    assert idle >= 1
    at = format_time(utcnow())
    book.record("default", {"refresh_expiry": {"severity": "warning", "since": at, "sent": 1}})
    async with asyncio.timeout(fleet.deadline):  # the task borrowed an idle connection
        while fleet.pool_stats()["pool_available"] >= idle:
            await asyncio.sleep(0.01)
    grace = 1.0
    started = time.monotonic()
    async with asyncio.timeout(GUARD * fleet.deadline):
        await book.close(grace)
    within(grace, time.monotonic() - started)
    assert book.pending == 1


async def test_a_migration_on_a_silent_database_is_given_up_within_its_deadline(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Opening the store applies the schema on a direct connection: when the database goes
    silent while the migration waits for its advisory lock (another node migrating), the
    server's lock timeout is an answer the node never gets. StoreUnavailable within the
    migration's deadline (its lock wait, its statement, the margin), not never."""
    await migrated(pg_dsn)
    timeouts = DbTimeouts(lock=0.5, statement=1.0, migration_lock=1.5, migration_statement=2.0)
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    holder = await db.connect(pg_dsn, node="other-node", purpose="migrate")
    async with holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        with TcpProxy("127.0.0.1", port) as proxy:
            fleet = store_through(proxy, pg_dsn, tmp_path, timeouts)
            opening = asyncio.create_task(fleet.open())
            try:
                await until_migration_waits_for_its_lock(pg_dsn)
                proxy.pause()
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="did not answer within"):
                    async with asyncio.timeout(GUARD * fleet.migration_deadline):
                        await opening
                within(fleet.migration_deadline, time.monotonic() - started)
            finally:
                opening.cancel()
                proxy.resume()
                await fleet.close()


@pytest.mark.slow(seconds=12)
async def test_a_node_stopped_while_its_database_is_silent_exits_within_its_stop_budget(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """SIGTERM to a running node whose database went silent (the listener connected, idle
    connections in the pool, the account served): the stop's last writes to the store (its
    ``nodes`` row, the alert bookkeeping) give up by their deadlines, and the node exits 0
    within the stop budget the unit's TimeoutStopSec is sized for (service.stop_budget).
    With nothing in flight and nothing to deliver, what the database adds is the row's one
    deadline and the pool's close; the old code took about 25 s here (a cancel into psycopg
    after two deadlines), and 10 s more for a task stopped mid-query."""
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        path = node_config(tmp_path, emulator, proxy.dsn(pg_dsn), "web-1", heartbeat="60s")
        config = load_config(path)
        fleet = node_store(config, pg_dsn, "web-1")
        budget = service.stop_budget(
            [config.account().app.timeout], store=service.store_waits(fleet)
        )
        store_waits = fleet.deadline + POOL_CLOSE_WAIT
        node = await start_daemon(path)
        try:
            await login_published(emulator, path, pg_dsn, node)
            proxy.pause()
            started = time.monotonic()
            code = await node.stop(timeout=GUARD * budget)
            took = time.monotonic() - started
        finally:
            proxy.resume()
            await node.stop()
    assert code == 0, node.log_text()[-3000:]
    assert took <= budget, f"stopped after {took:.1f}s, budget {budget:g}s"
    within(store_waits, took)


@pytest.mark.parametrize("given_back", [True, False], ids=["given back", "kept"])
async def test_a_pool_wait_that_ran_out_while_the_process_was_stopped_takes_a_connection_given_back(
    proxied: tuple[FleetStore, TcpProxy], given_back: bool
) -> None:
    """A node stopped (SIGSTOP, or its loop stalled) while every pooled connection was out
    and a claim waited for one finds that wait run out when it runs again, though the
    queries ended long ago and their connections come back at once. Taking that for a
    database that does not answer failed the claim and marked the store unavailable at the
    continue; the waiter takes the first connection given back instead. Connections that
    stay out still end the wait, a share of it later."""
    fleet, _proxy = proxied  # a pool of 2
    keep = asyncio.Event()
    borrowed: list[object] = []

    async def borrowed_for_a_query() -> None:
        async with fleet.connection("run a short query") as conn:
            borrowed.append(conn)
            await conn.execute("SELECT pg_sleep(0.2)")
            if not given_back:
                await keep.wait()

    holders = [asyncio.create_task(borrowed_for_a_query()) for _ in range(2)]
    await until_true(lambda: len(borrowed) == 2)  # both connections out
    await asyncio.sleep(0.05)  # their queries sent
    waiter = asyncio.create_task(fleet.getconn("wait for a connection"))
    await until_true(lambda: fleet.pool_stats()["requests_waiting"] == 1)
    time.sleep(fleet.deadline + 0.5)  # the process stopped: no callback runs meanwhile
    continued = time.monotonic()
    if given_back:
        conn = await asyncio.wait_for(waiter, fleet.deadline)
        await fleet.putconn(conn)
        await asyncio.gather(*holders)
        assert fleet.stats.up, fleet.stats.last_error
        return
    with pytest.raises(StoreUnavailable, match="no database connection"):
        await asyncio.wait_for(waiter, fleet.deadline)
    # A share of the wait (10 %), not a whole new one; loose, for a loaded machine.
    assert time.monotonic() - continued < fleet.deadline / 2
    keep.set()
    await asyncio.gather(*holders)


async def until_true(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (polling the loop) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_once_a_refused_database_is_back_the_next_borrowing_renews_the_pool_at_once(
    proxied: tuple[FleetStore, TcpProxy],
) -> None:
    """During an outage psycopg_pool retries on its own, its pauses growing from 1 s towards
    minutes. The first borrowing after the database is back must not wait on that pool: the
    store, known to be down, tries a connection of its own and renews the pool at once. It
    waited a fixed second on the dead pool first, so a commit reached a node more than a
    second late after an outage, and a 6 s token lost a sixth of its life to it."""
    fleet, proxy = proxied
    proxy.refuse()
    proxy.cut()
    # psycopg_pool's own tries come 1, 2, 4 s apart (10 % jitter): after 4 s down its next
    # one is about 3 s away, so only the store's own renewal can be quick.
    down_for = 4.0
    outage_ends = time.monotonic() + down_for
    while time.monotonic() < outage_ends:
        with pytest.raises(StoreUnavailable):
            async with fleet.connection("read the store's accounts") as conn:
                await conn.execute("SELECT 1")
        await asyncio.sleep(0.1)
    assert not fleet.stats.up
    proxy.accept()
    started = time.monotonic()
    async with fleet.connection("read the store's accounts") as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    took = time.monotonic() - started
    print(f"the first borrowing after the outage took {took:.3f}s")
    # A connect, the pool's first connection and its check on loopback: a few tens of ms;
    # the old code's wait on the dead pool alone was 1 s.
    assert took < 0.6, f"the first borrowing after the outage took {took:.2f}s"


async def test_a_database_that_refuses_connections_is_reported_at_the_first_borrowing(
    proxied: tuple[FleetStore, TcpProxy],
) -> None:
    """The database goes away (its connections end, new ones are refused) while the node
    thinks it is up: the first borrowing finds each pooled connection dead, and the pool has
    nothing left but its own reconnect tries, seconds apart. It waited the whole deadline on
    them (6.7 s with the default timeouts: a cut-off node's 8 s token expired before
    store_unavailable showed). A connection of the store's own, refused at once, says so."""
    fleet, proxy = proxied
    async with fleet.connection("read the store's accounts") as conn:
        await conn.execute("SELECT 1")
    assert fleet.stats.up
    proxy.refuse()
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        async with asyncio.timeout(fleet.deadline * GUARD):
            async with fleet.connection("read the store's accounts") as conn:
                await conn.execute("SELECT 1")
    took = time.monotonic() - started
    print(f"the borrowing on a refusing database failed after {took:.3f}s: {caught.value}")
    assert not fleet.stats.up
    # Two dead connections found and a refused connect on loopback: milliseconds; the old
    # code's wait was the whole deadline (3 s here).
    assert took < fleet.deadline / 3, f"the refusal was reported after {took:.2f}s"


async def test_a_database_that_ended_its_connections_but_answers_is_not_reported_down(
    proxied: tuple[FleetStore, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of the rule above: the database ended every connection (a restart) but
    takes new ones. The first borrowing finds the pooled connections dead and gets a fresh
    one at once (the pool's, or a renewed pool's): the store is never reported unavailable."""
    fleet, proxy = proxied
    async with fleet.connection("read the store's accounts") as conn:
        await conn.execute("SELECT 1")
    proxy.cut()
    started = time.monotonic()
    async with asyncio.timeout(fleet.deadline * GUARD):
        async with fleet.connection("read the store's accounts") as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
    took = time.monotonic() - started
    assert fleet.stats.up
    assert "unavailable" not in caplog.text
    assert took < fleet.deadline / 3, f"the borrowing after the restart took {took:.2f}s"


async def test_a_borrowing_waiting_on_a_pool_that_was_renewed_meanwhile_takes_the_new_one(
    proxied: tuple[FleetStore, TcpProxy],
) -> None:
    """Another borrowing renews the pool (its connections were dead, none idle) while this one
    waits on the old pool for a free connection: the old pool, closed, answers PoolClosed.
    With the store up, that was reported as the store unavailable (an ERROR line, a failed
    claim); the waiting borrowing now takes a connection from the new pool."""
    fleet, _ = proxied
    pool = fleet._pool
    assert pool is not None
    lent: list[Any] = []
    for _ in range(2):  # the pool's max: nothing is left to lend
        lent.append(await fleet.getconn("hold a connection"))
    try:
        waiting = asyncio.create_task(fleet.getconn("read the store's accounts"))
        async with asyncio.timeout(fleet.deadline):
            while not fleet.pool_stats()["requests_waiting"]:
                await asyncio.sleep(0.01)
        renewed = await fleet._renewed(
            pool, "renew the pool", asyncio.get_running_loop().time() + 5
        )
        assert renewed is not pool
        conn = await asyncio.wait_for(waiting, fleet.deadline)
        try:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        finally:
            await fleet.putconn(conn)
        assert fleet.stats.up
    finally:
        for conn in lent:
            await fleet.putconn(conn)


async def test_borrowings_waiting_together_after_an_outage_renew_the_pool_once(
    proxied: tuple[FleetStore, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    """Several claims find the store down and the pool empty at once: the first renews the
    pool, the others, which waited for that renewal, borrow from the new pool instead of
    replacing it again (each replacement closes the pool the others just got)."""
    fleet, proxy = proxied
    proxy.refuse()
    proxy.cut()
    with pytest.raises(StoreUnavailable):
        async with fleet.connection("read the store's accounts") as conn:
            await conn.execute("SELECT 1")
    assert not fleet.stats.up
    proxy.accept()
    caplog.set_level(logging.INFO, logger="kakao_tokend.fleet.store")

    async def borrow() -> None:
        async with fleet.connection("read the store's accounts") as conn:
            await conn.execute("SELECT 1")

    await asyncio.gather(borrow(), borrow())
    renewals = [r for r in caplog.records if "pool renewed" in r.getMessage()]
    assert len(renewals) == 1, [r.getMessage() for r in renewals]


async def test_an_abandoned_task_waiting_elsewhere_inside_a_deadline_is_cancelled_soon(
    pg_dsn: str,
) -> None:
    """abandon() stops a task working inside a deadline() block by shutting its connection
    down, not by cancelling it (no cancel request on a silent path). A task inside such a
    block that waits on something else (not the connection) does not notice; the stop
    (db.end_tasks) cancels it a moment later (db.ABANDON_GRACE), well before the block's own
    backstop."""
    conn = await db.connect(pg_dsn, node="test", purpose="check", autocommit=True)
    never = asyncio.Event()

    async def waits_inside_a_deadline() -> None:
        async with db.deadline(conn, 30.0):
            await never.wait()

    try:
        task = asyncio.create_task(waits_inside_a_deadline())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.wait_for(db.end_tasks([task]), timeout=db.ABANDON_GRACE + 3.0)
        assert task.cancelled()
        within(db.ABANDON_GRACE + 1.0, time.monotonic() - started)
    finally:
        await conn.close()


async def test_ending_tasks_cancels_again_a_task_that_lost_its_cancel() -> None:
    """db.end_tasks, what a node's listener and the alert book are stopped with: a task whose
    first cancel was lost (Python 3.11's asyncio.wait_for can return a result instead) and
    that went back to waiting is cancelled again, so the stop ends."""
    lost = asyncio.Event()

    async def loses_its_first_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            lost.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(loses_its_first_cancel())
    await asyncio.sleep(0)
    started = time.monotonic()
    await asyncio.wait_for(db.end_tasks([task]), timeout=10)
    within(db.ABANDON_GRACE + 1.0, time.monotonic() - started)
    assert lost.is_set() and task.cancelled()
