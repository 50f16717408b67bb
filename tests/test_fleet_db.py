"""Store connections: timeouts in their order, keepalives, pools, and a node cut off mid-call."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fleetkit import NODE, migrated, node_store, sample_state, write_store_config
from kakao_tokend.config import load_config
from kakao_tokend.errors import StoreError, StoreUnavailable
from kakao_tokend.fleet import accounts, db
from kakao_tokend.fleet.crypto import Keyring, new_key_line
from pgcluster import PgCluster, free_port
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


def test_the_default_timeouts_keep_their_order() -> None:
    """lock < statement, and the idle backstop outlasts a 30 s Kakao call plus local work."""
    defaults = db.DbTimeouts()
    assert defaults.problems(kakao_timeout=30) == []
    assert defaults.lock < defaults.statement
    assert defaults.idle_in_transaction >= 30 + db.LOCAL_WORK_MARGIN
    assert defaults.migration_lock < defaults.migration_statement


@pytest.mark.parametrize(("kakao", "idle"), [(1, 90), (30, 90), (45, 120), (120, 270)])
def test_the_idle_backstop_grows_with_the_kakao_timeout(kakao: float, idle: float) -> None:
    """A longer Kakao timeout moves idle_in_transaction_session_timeout up, never down."""
    timeouts = db.DbTimeouts.for_kakao_timeout(kakao)
    assert timeouts.idle_in_transaction == idle
    assert timeouts.problems(kakao) == []


@pytest.mark.parametrize(
    ("lifetime", "idle"), [(6, 2.5), (60, 25.0), (240, 90.0), (6 * 3600, 90.0), (None, 90.0)]
)
def test_the_idle_backstop_of_a_default_kakao_timeout_is_fitted_to_the_token(
    lifetime: float | None, idle: float
) -> None:
    """With the default Kakao timeout, a hold's backstop is twice the fitted Kakao wait plus a
    sixth of the lifetime: a short token's row is freed within its life, an hours-long one
    keeps the session's 90 s."""
    timeouts = db.DbTimeouts.for_kakao_timeout(30, default=30)
    life = None if lifetime is None else timedelta(seconds=lifetime)
    assert timeouts.idle_for(life) == pytest.approx(idle)


@pytest.mark.parametrize(("heard", "idle"), [(None, 1 / 4 + 1 / 6), (0.2, 1.6 + 1 / 6), (40, 90)])
def test_the_idle_backstop_outlasts_a_kakao_call_waiting_for_a_slow_answer(
    heard: float | None, idle: float
) -> None:
    """After Kakao took ``heard`` seconds to answer a 1-second token's account, its request
    waits twice that and stays open twice as long again (tokens.heard_floor): the hold's
    backstop covers two such calls, so the server does not end a healthy refresh after
    Kakao rotated the token; never past the session's 90 s."""
    timeouts = db.DbTimeouts.for_kakao_timeout(30, default=30)
    assert timeouts.idle_for(timedelta(seconds=1), heard) == pytest.approx(idle)


@pytest.mark.parametrize("kakao", [10.0, 45.0])
def test_a_kakao_timeout_set_by_hand_keeps_the_sessions_idle_backstop(kakao: float) -> None:
    """A Kakao wait written by hand is not fitted (tokens.request_timeout): neither is the
    backstop derived from it, whatever the token's lifetime."""
    timeouts = db.DbTimeouts.for_kakao_timeout(kakao, default=30)
    assert timeouts.idle_for(timedelta(seconds=6)) == timeouts.idle_in_transaction


def test_broken_orderings_are_each_named() -> None:
    """Every violated rule gets its own readable sentence."""
    bad = db.DbTimeouts(lock=5, statement=5, idle_in_transaction=40, migration_lock=60)
    problems = bad.problems(kakao_timeout=30)
    assert len(problems) == 3
    assert "lock timeout (5s) must be shorter than the statement timeout (5s)" in problems[0]
    assert "idle_in_transaction_session_timeout (40s) must exceed" in problems[1]
    assert "migration lock timeout" in problems[2]


def test_the_idle_backstop_must_outlast_a_request_kept_open_for_its_late_answer() -> None:
    """The hold keeps the row while a timed-out request stays open for Kakao's late answer,
    up to twice the Kakao timeout (tokens.longest_open_request): a backstop of 80 s with a
    30 s timeout would end a refresh Kakao answers after 55 s, with the rotation in it."""
    problems = db.DbTimeouts(idle_in_transaction=80).problems(kakao_timeout=30)
    assert len(problems) == 1, problems
    assert "idle_in_transaction_session_timeout (80s)" in problems[0]
    assert "60s" in problems[0]
    assert db.DbTimeouts(idle_in_transaction=90).problems(kakao_timeout=30) == []


def test_psycopgs_repeats_about_a_lost_connection_are_debug_and_its_reasons_stay_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What psycopg says about a connection already lost is DEBUG (shown only to someone who
    turns psycopg's own logger up to DEBUG: psycopg keeps it at WARNING); why it cannot
    connect (a refused login) stays a WARNING."""
    pool_log, connection_log = logging.getLogger("psycopg.pool"), logging.getLogger("psycopg")
    caplog.set_level(logging.INFO)
    pool_log.warning("discarding closed connection: %s", "<conn>")
    connection_log.warning("error ignored in rollback on %s: %s", "<conn>", "EOF")
    pool_log.warning("error connecting in %r: %s", "pool-1", "password authentication failed")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "error connecting in 'pool-1': password authentication failed")
    ]
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="psycopg")
    pool_log.warning("discarding closed connection: %s", "<conn>")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "discarding closed connection: <conn>")
    ]


def test_conninfo_adds_our_settings_and_keeps_the_operators() -> None:
    """Keepalives and timeouts are added; the operator's own client settings and options stay,
    and our server options come after theirs so the ordering always holds."""
    info = conninfo_to_dict(
        db.conninfo(
            "host=db.example dbname=tokend user=tokend password=pw keepalives_idle=7 "
            "options='-c search_path=tokend'",
            node="web-1",
            purpose="pool",
        )
    )
    assert info["keepalives_idle"] == "7"  # theirs
    assert info["keepalives"] == "1"
    assert info["keepalives_interval"] == "10"
    assert info["keepalives_count"] == "3"
    assert info["tcp_user_timeout"] == "60000"
    assert info["connect_timeout"] == "10"
    assert info["application_name"] == "kakao-tokend web-1 pool"
    options = str(info["options"])
    assert options.startswith("-c search_path=tokend ")
    for setting in (
        "lock_timeout=2000ms",
        "statement_timeout=5000ms",
        "idle_in_transaction_session_timeout=90000ms",
        "tcp_keepalives_idle=30",
        "client_connection_check_interval=5000ms",
        "TimeZone=UTC",
    ):
        assert f"-c {setting}" in options
    assert info["password"] == "pw"


def test_conninfo_accepts_a_uri_and_migrations_get_longer_lock_waits() -> None:
    """postgresql:// URIs work too; a migration connection waits longer for table locks."""
    info = conninfo_to_dict(
        db.conninfo("postgresql://tokend@db.example/tokend", node="n", purpose="migrate",
                    migration=True)
    )  # fmt: skip
    assert info["host"] == "db.example" and info["dbname"] == "tokend"
    assert "-c lock_timeout=5000ms" in str(info["options"])
    assert "-c statement_timeout=60000ms" in str(info["options"])


@pytest.mark.parametrize("dsn", ["host=x password=sec ret", "postgresql://u:sec@[bad"])
def test_a_bad_dsn_is_refused_without_echoing_it(dsn: str) -> None:
    """The DSN may hold a password: the error describes the problem, never the value."""
    with pytest.raises(StoreError) as caught:
        db.conninfo(dsn, node="n", purpose="x")
    message = str(caught.value)
    assert "not a valid libpq connection string or postgresql:// URI (value not shown)" in message
    assert "sec" not in message


async def test_a_node_connection_carries_every_server_setting(pg_dsn: str) -> None:
    """What conninfo asks for is what the server applies to the session."""
    conn = await db.connect(pg_dsn, node="web-1", purpose="check", autocommit=True)
    async with conn:
        cur = await conn.execute(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout'),"
            " current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_count'),"
            " current_setting('client_connection_check_interval'),"
            " current_setting('TimeZone'), current_setting('application_name')"
        )
        assert await cur.fetchone() == (
            "2s",
            "5s",
            "90s",
            "30",
            "3",
            "5s",
            "UTC",
            "kakao-tokend web-1 check",
        )


async def test_an_unreachable_database_is_store_unavailable_in_one_line() -> None:
    """Connection refused: StoreUnavailable with libpq's first line, no password."""
    dsn = f"host=127.0.0.1 port={free_port()} user=tokend password=hunter2 dbname=tokend"
    with pytest.raises(StoreUnavailable) as caught:
        await db.connect(dsn, node=NODE, purpose="check")
    message = str(caught.value)
    assert message.startswith("cannot connect to the PostgreSQL store: ")
    assert "Connection refused" in message
    assert "\n" not in message and "hunter2" not in message


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"user": "nobody_here"}, 'role "nobody_here" does not exist'),
        ({"dbname": "no_such_db"}, 'database "no_such_db" does not exist'),
    ],
)
async def test_a_database_that_refuses_the_node_names_the_dsn_not_the_network(
    pg_dsn: str, change: dict[str, str], said: str
) -> None:
    """The server answered and refused the session (wrong role or database): the hint points
    at the DSN and pg_hba.conf, not at "is PostgreSQL up", which would send the operator to
    the wrong place."""
    with pytest.raises(StoreUnavailable) as caught:
        await db.connect(make_conninfo(pg_dsn, **change), node=NODE, purpose="check")
    assert said in str(caught.value)
    assert caught.value.hint is not None
    assert "check the user, password and dbname in the DSN" in caught.value.hint
    assert "reachable" not in caught.value.hint


async def test_opening_a_pool_fails_fast_when_the_database_is_down() -> None:
    """At start-up a node learns within the timeout that it has no database."""
    dsn = f"host=127.0.0.1 port={free_port()} user=tokend dbname=tokend"
    pool = db.create_pool(dsn, node=NODE, max_size=2)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match="open the PostgreSQL store's connection pool"):
            await db.open_pool(pool, timeout=1.0)
    finally:
        await pool.close()
    assert time.monotonic() - started < 5


async def test_the_pool_replaces_connections_the_server_killed(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """After a database restart the node's store lends working connections, not the dead
    ones its pool held: each is checked (under the deadline) before it is lent."""
    await migrated(pg_cluster.dsn())
    config = load_config(write_store_config(tmp_path, pg_cluster.dsn()))
    fleet = node_store(config, pg_cluster.dsn(), NODE)
    await fleet.open(read_rows=False)
    try:
        async with fleet.connection("check the store") as conn:
            await conn.execute("SELECT 1")
        await asyncio.to_thread(pg_cluster.restart)
        async with fleet.connection("check the store again") as conn:
            cur = await conn.execute("SELECT current_setting('lock_timeout')")
            assert await cur.fetchone() == ("2s",)
        assert fleet.stats.up  # a dead connection replaced is not an outage
    finally:
        await fleet.close()


async def test_a_node_cut_off_mid_refresh_loses_its_row_lock(pg_dsn: str) -> None:
    """The holder of a row lock goes silent (a hung path): the server's idle-in-transaction
    timeout ends its session, another node claims the account, and the silent node's
    commit fails instead of writing over the other node's work."""
    await migrated(pg_dsn)
    keyring = Keyring.parse(new_key_line())
    setup = await db.connect(pg_dsn, node=NODE, purpose="test")
    async with setup:
        await accounts.insert_account(
            setup, keyring, sample_state("shop"), node=NODE, due_at=datetime.now(UTC)
        )
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    short = db.DbTimeouts(idle_in_transaction=1.5)
    with TcpProxy("127.0.0.1", port) as proxy:
        holder = await db.connect(proxy.dsn(pg_dsn), node="web-1", purpose="pool", timeouts=short)
        other = await db.connect(pg_dsn, node="web-2", purpose="pool")
        async with other:
            claimed = await accounts.claim_due(holder, keyring)
            assert [r.name for r in claimed] == ["shop"]
            proxy.pause()  # web-1 is now "in the Kakao call" and cut off
            started = time.monotonic()
            assert await accounts.claim_due(other, keyring) == []  # held
            await other.rollback()
            while not (taken := await accounts.claim_due(other, keyring)):
                await other.rollback()
                assert time.monotonic() - started < 15, "the lock was never released"
                await asyncio.sleep(0.1)
            waited = time.monotonic() - started
            assert [r.name for r in taken] == ["shop"]
            assert 1.0 <= waited < 15
            row = taken[0]
            newer = row.state.with_tokens(
                row.state.tokens, refreshed_at=datetime.now(UTC), rotated=False
            )
            later = datetime.now(UTC) + timedelta(hours=1)
            assert await accounts.save_account(
                other, keyring, row, newer, node="web-2", due_at=later
            )
            await other.commit()
            proxy.resume()
            with (
                pytest.raises(StoreUnavailable, match="idle-in-transaction timeout"),
                db.store_errors("commit the refresh"),
            ):
                await holder.commit()
            await holder.close()
            final = await accounts.load_account(other, keyring, "shop")
        assert final is not None and final.refreshed_by == "web-2"
        assert final.generation == claimed[0].generation + 1


@pytest.mark.parametrize("stalled", ["the answer", "nothing"])
async def test_a_deadline_that_ran_out_while_the_process_was_stopped_takes_an_answer_that_is_there(
    pg_dsn: str, stalled: str
) -> None:
    """A node stopped (SIGSTOP, or its loop stalled) while a query was out finds every deadline
    run out when it runs again, though the database answered long ago: the answer waits in the
    socket. Taking that for a silent database shut the connection down: the next statement of
    the block failed, and the store was marked unavailable at every continue. The answer is
    taken and the connection goes on; a query whose answer is not there is still given up at
    its deadline (a moment later).
    """
    conn = await db.connect(pg_dsn, node=NODE, purpose="check", autocommit=True)
    async with conn:
        # Answered during the stop, or long after the deadline.
        sql = f"SELECT 42 FROM pg_sleep({0.1 if stalled == 'the answer' else 3})"

        async def query() -> list[object]:
            async with db.deadline(conn, 0.3):
                first = await (await conn.execute(sql)).fetchone()
                second = await (await conn.execute("SELECT 43")).fetchone()
            return [first, second]

        task = asyncio.create_task(query())
        await asyncio.sleep(0.05)  # sent, waiting for the answer
        time.sleep(0.6)  # the process stopped: no callback runs meanwhile
        if stalled == "the answer":
            assert await asyncio.wait_for(task, 5) == [(42,), (43,)]
            assert await (await conn.execute("SELECT 44")).fetchone() == (44,)
        else:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(task, 5)
