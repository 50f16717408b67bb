"""Every fleet timer counts in one heartbeat, fitted to the tokens (tokens.heartbeat_interval).

The node's poll, the liveness of nodes (first claims, alert ownership), when a node counts
itself behind, the wait for another node's unsaved rotation and the reconnect back-off are
LIVE_HEARTBEATS or a share of FleetStore.heartbeat(). Left at its default (60 s) it is fitted
to the shortest access lifetime among the rows, as the scheduler's beat is; set by hand it is
kept; Kakao's own 6-hour tokens keep the 60 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from fleetkit import migrated, node_store, sample_state, write_store_config
from kakao_tokend.config import REFRESH_HEARTBEAT, Config, load_config
from kakao_tokend.errors import StoreUnavailable
from kakao_tokend.fleet import db
from kakao_tokend.fleet.accounts import AccountRow, insert_account
from kakao_tokend.fleet.store import FleetStore
from kakao_tokend.fleet.turns import LIVE_HEARTBEATS
from kakao_tokend.tokens import HEARTBEAT_SHARE

SIX_HOURS = timedelta(hours=6)


def store(
    tmp_path: Path, heartbeat: float = REFRESH_HEARTBEAT, dsn: str = "postgresql://unused"
) -> tuple[Config, FleetStore]:
    """A node's config and FleetStore (not opened) whose configured heartbeat is ``heartbeat``."""
    config = load_config(write_store_config(tmp_path, dsn))
    return config, node_store(config, dsn, "web-1", heartbeat=heartbeat)


def row(name: str, lifetime: timedelta) -> AccountRow:
    """A cached row whose access token lives ``lifetime``."""
    state = sample_state(name)
    tokens = replace(state.tokens, access_expires_at=state.tokens.access_issued_at + lifetime)
    return AccountRow(
        uid=uuid.uuid4().int, state=replace(state, tokens=tokens), key_id="k1", due_at=None
    )


def test_the_default_heartbeat_is_fitted_to_the_shortest_access_lifetime(tmp_path: Path) -> None:
    """Six-hour tokens keep the 60 s; one 6-second token among them makes it 1/8 of 6 s, and
    every timer follows: the peer grace, the silence that makes the node behind, the longest
    reconnect wait. The shortest lifetime is kept as rows change: replaced by a longer one
    or dropped, the beat grows back."""
    config, fleet = store(tmp_path)
    assert fleet.heartbeat() == REFRESH_HEARTBEAT  # nothing known: the configured beat
    fleet.keep_row(row("shop", SIX_HOURS))
    fleet.keep_row(row("bot", SIX_HOURS))
    assert fleet.heartbeat() == REFRESH_HEARTBEAT
    fleet.keep_row(row("demo", timedelta(seconds=6)))
    beat = 6 * HEARTBEAT_SHARE
    assert fleet.heartbeat() == pytest.approx(beat)
    account = fleet.account_store(config.account())
    assert account.peer_grace == pytest.approx(LIVE_HEARTBEATS * beat)
    waits = [fleet.reconnect_delay(attempt) for attempt in range(1, 40) for _ in range(3)]
    assert max(waits) <= beat
    fleet.stats.last_sync = time.monotonic() - LIVE_HEARTBEATS * beat - 0.1
    assert fleet.behind_since() is not None  # 2.25 s of silence, not three minutes
    fleet.keep_row(row("demo", SIX_HOURS))  # the short one logged in again with Kakao's
    assert fleet.heartbeat() == REFRESH_HEARTBEAT
    fleet.keep_row(row("demo", timedelta(seconds=6)))
    fleet.drop_row("demo")  # logged out
    assert fleet.heartbeat() == REFRESH_HEARTBEAT
    fleet.drop_row("shop")
    fleet.drop_row("bot")
    fleet.lifetime_hint = timedelta(seconds=8)  # a start waiting for the database knows these
    assert fleet.heartbeat() == pytest.approx(8 * HEARTBEAT_SHARE)


def test_a_heartbeat_set_by_hand_is_kept_as_written(tmp_path: Path) -> None:
    """A configured heartbeat is never fitted, however short the tokens."""
    _, fleet = store(tmp_path, heartbeat=30.0)
    fleet.keep_row(row("demo", timedelta(seconds=6)))
    assert fleet.heartbeat() == 30.0


async def test_a_node_at_the_default_fits_its_heartbeat_to_the_rows_it_read(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Opened on a real store, the node reads the rows and fits its beat to them."""
    await migrated(pg_dsn)
    config, fleet = store(tmp_path, dsn=pg_dsn)
    assert config.store.keyring is not None
    conn = await db.connect(pg_dsn, node="web-1", purpose="test")
    async with conn:
        short = row("demo", timedelta(seconds=4)).state
        await insert_account(conn, config.store.keyring, short, node="web-1", due_at=None)
        await conn.commit()
    await fleet.open()
    try:
        assert fleet.heartbeat() == pytest.approx(4 * HEARTBEAT_SHARE)
    finally:
        await fleet.close()


async def test_a_silence_makes_the_node_behind_unless_the_database_went_away_first(
    tmp_path: Path,
) -> None:
    """Three heartbeats without a poll or a notification make a node behind (it was stopped,
    or its loop stalled), and a failure it notices only after that (its woken commit) does
    not undo it. A database that went away before the silence began explains the silence:
    the node is not behind then (its claims fail at once; the reconnect compares every row)."""
    _, fleet = store(tmp_path, heartbeat=0.2)
    silence = LIVE_HEARTBEATS * 0.2
    fleet.stats.last_sync = time.monotonic() - silence - 0.1
    behind = fleet.behind_since()
    assert behind is not None
    fleet.failed(StoreUnavailable("terminating connection due to idle-in-transaction timeout"))
    assert fleet.behind_since() == behind
    fleet.ok()
    fleet.stats.last_sync = time.monotonic()
    fleet.failed(StoreUnavailable("connection refused"))  # the outage comes first
    await asyncio.sleep(silence + 0.1)  # ... and nothing could be heard since
    assert fleet.behind_since() is None
    fleet.ok()
    assert fleet.behind_since() is not None  # it answers again: re-read before claiming
