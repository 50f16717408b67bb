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

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from fleetkit import NODE, migrated, sample_state, write_store_config
from kakao_tokend.config import load_config
from kakao_tokend.errors import StoreUnavailable, StoreWriteError
from kakao_tokend.fleet.db import DbTimeouts
from kakao_tokend.fleet.store import FleetStore
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(90)

#: Short server-side timeouts so that the client deadline (statement + 2 s) is 3 s.
TIMEOUTS = DbTimeouts(lock=0.5, statement=1.0)
#: "The deadline plus a small share": what the slowest acceptable return may take.
SHARE = 0.25


@pytest.fixture
async def proxied(pg_dsn: str, tmp_path: Path) -> AsyncIterator[tuple[FleetStore, TcpProxy]]:
    """An opened node store whose every connection goes through a TcpProxy."""
    await migrated(pg_dsn)
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        config = load_config(write_store_config(tmp_path, proxy.dsn(pg_dsn)))
        assert config.store.keyring is not None
        fleet = FleetStore(
            dsn=proxy.dsn(pg_dsn),
            keyring=config.store.keyring,
            node=NODE,
            timeouts=TIMEOUTS,
            state_dir=config.state_dir,
            pool_size=2,
        )
        await fleet.open()
        try:
            yield fleet, proxy
        finally:
            proxy.resume()
            await fleet.close()


def within_deadline(fleet: FleetStore, elapsed: float) -> None:
    """Assert that an operation that started ``elapsed`` seconds ago kept its deadline."""
    limit = fleet.deadline * (1 + SHARE)
    assert elapsed <= limit, f"returned after {elapsed:.1f}s, deadline {fleet.deadline:g}s"


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
    with pytest.raises(StoreWriteError, match="did not answer within"):
        async with store.hold(1.0):
            store.save(state)
            proxy.pause()  # the row is locked; from now on nothing is delivered
            started = time.monotonic()
    within_deadline(fleet, time.monotonic() - started)
    assert not fleet.stats.up
    proxy.resume()
    # The pool lends a working connection afterwards, not the one that missed its deadline.
    async with fleet.connection("check the pool") as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


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
