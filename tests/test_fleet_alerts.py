"""Alerts in a fleet: one delivery per condition fleet-wide, bookkeeping in the store.

Real `kakao-tokend run` nodes share one throwaway PostgreSQL, the Kakao emulator and one
loopback webhook. The emulator's refresh token lives a minute, so the expiry ladder's first
threshold (50 s) is crossed about 10 s after the login; Kakao rotates the refresh token once
less than 30 s is left, which resolves the condition. Every node grades the account (its
status shows the condition); only the account's first claimant among the live nodes
(fleet/turns.py) delivers, and a node that takes over continues from the ``alerts`` table.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from alertkit import Receiver, alerts_toml
from daemonproc import DaemonProcess, start_daemon
from fleetkit import migrated, node_store, write_store_config
from fleetrun import node_config, published, store_login
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.errors import StoreUnavailable
from kakao_tokend.fleet import db
from kakao_tokend.fleet.alertshare import AlertBook
from kakao_tokend.fleet.store import FleetStore
from kakao_tokend.fleet.turns import LIVE_HEARTBEATS, first_claimant
from kakao_tokend.tokens import format_time, parse_time, utcnow
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(150)

NODES = ("web-1", "web-2", "web-3")
#: The account's first claimant among every node above, and among the first two.
OWNER_OF_3 = first_claimant("default", NODES)
OWNER_OF_2 = first_claimant("default", NODES[:2])


def short_refresh_tokens(emulator: KakaoEmulator) -> None:
    """Access tokens of 4 s; refresh tokens of 60 s that Kakao rotates below 30 s left."""
    emulator.settings.access_lifetime = 4
    emulator.settings.refresh_lifetime = 60
    emulator.settings.rotation_window = 30


def fleet_alerts(webhook: Receiver, **keys: str) -> str:
    """The [alerts] section: the webhook, and the expiry ladder's one threshold at 50 s."""
    keys.setdefault("thresholds", '["50s"]')
    keys.setdefault("critical_below", '"5s"')
    return alerts_toml(webhook, None, **keys)


async def start_nodes(
    tmp_path: Path, emulator: KakaoEmulator, dsns: list[str], alerts: str
) -> list[DaemonProcess]:
    """Start one node per DSN (web-1, web-2 ...) with a 0.5 s heartbeat, at the same instant."""
    paths = []
    for name, dsn in zip(NODES, dsns, strict=False):
        path = node_config(tmp_path, emulator, dsn, name, heartbeat="0.5s", extra=alerts)
        path.chmod(0o600)  # an inline webhook URL is a secret: refused in a readable config
        paths.append(path)
    return list(await asyncio.gather(*(start_daemon(path) for path in paths)))


@pytest.fixture
async def running() -> AsyncIterator[list[DaemonProcess]]:
    """The nodes a test started: stopped (SIGCONT first) whatever the test did to them."""
    started: list[DaemonProcess] = []
    yield started
    for node in started:
        if node.proc.returncode is None:
            node.send(signal.SIGCONT)
            await node.stop()


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``check`` (sync or async) every 0.1 s until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def posts(webhook: Receiver, condition: str, state: str) -> list[dict[str, Any]]:
    """The webhook deliveries of ``condition`` in ``state``, in arrival order."""
    return [p for p in webhook.posts if p["condition"] == condition and p["state"] == state]


async def alert_rows(dsn: str) -> dict[str, tuple[str | None, int]]:
    """The ``alerts`` rows of the default account: condition -> (sent_by, sent)."""
    conn = await db.connect(dsn, node="test", purpose="test", autocommit=True)
    async with conn:
        cur = await conn.execute(
            "SELECT condition, sent_by, sent FROM alerts WHERE account = 'default'"
        )
        return {condition: (by, sent) for condition, by, sent in await cur.fetchall()}


async def conditions(node: DaemonProcess) -> list[str]:
    """The conditions the node's /v1/status shows for the default account."""
    code, body = await node.api("GET", "/v1/status")
    assert code == 200
    return [c["condition"] for c in body["accounts"][0]["conditions"]]


@pytest.mark.slow(seconds=34)
async def test_three_nodes_deliver_a_condition_and_its_resolution_once(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path, webhook: Receiver, running: list[Any]
) -> None:
    """Three nodes grade the account alike (each one's status shows refresh_expiry and the
    record of its sending), but the webhook gets the warning once and, after Kakao rotated
    the refresh token, the resolution once; the ``alerts`` table names the account's first
    claimant as the sender and is empty again after the resolution."""
    short_refresh_tokens(emulator)
    running += await start_nodes(tmp_path, emulator, [pg_dsn] * 3, fleet_alerts(webhook))
    await store_login(emulator, load_config(running[0].config_path), pg_dsn)
    await until(lambda: bool(posts(webhook, "refresh_expiry", "firing")), 40, "the warning")
    await asyncio.sleep(2.0)  # four heartbeats: time for any other node to send it too
    assert len(posts(webhook, "refresh_expiry", "firing")) == 1, webhook.posts
    sent_at = set()
    for node in running:
        assert "refresh_expiry" in await conditions(node)
        # Every node shows the fleet's record of it, the one the owner wrote.
        _, body = await node.api("GET", "/v1/status")
        [active] = [a for a in body["accounts"][0]["alerts"] if a["condition"] == "refresh_expiry"]
        sent_at.add(active["last_sent_at"])
    assert sent_at == {posts(webhook, "refresh_expiry", "firing")[0]["at"]}
    assert (await alert_rows(pg_dsn))["refresh_expiry"][0] == OWNER_OF_3
    emulator.settings.refresh_lifetime = 3600  # the rotation below gives a long-lived token
    await until(lambda: bool(posts(webhook, "refresh_expiry", "resolved")), 40, "the resolution")
    await asyncio.sleep(2.5)  # five heartbeats: time for any other node to send it too
    assert len(posts(webhook, "refresh_expiry", "firing")) == 1, webhook.posts
    assert len(posts(webhook, "refresh_expiry", "resolved")) == 1, webhook.posts
    assert await alert_rows(pg_dsn) == {}
    assert emulator.stats.retired_refresh_presented == 0


async def _sent_by(dsn: str, node: str) -> bool:
    rows = await alert_rows(dsn)
    return rows.get("refresh_expiry", (None, 0))[0] == node


@pytest.mark.slow(seconds=37)
async def test_the_next_owner_continues_from_the_table_after_the_owner_is_killed(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path, webhook: Receiver, running: list[Any]
) -> None:
    """The owner sends a critical expiry alert and records it, then is killed (-9). Once it is
    no longer live the other node owns the account: it does not announce the condition as
    new again, sends the repeats on the recorded schedule (``repeat`` after the last one), and
    the resolution once."""
    short_refresh_tokens(emulator)
    alerts = fleet_alerts(webhook, critical_below='"55s"', repeat='"6s"')
    running += await start_nodes(tmp_path, emulator, [pg_dsn] * 2, alerts)
    owner = running[NODES.index(OWNER_OF_2)]
    await store_login(emulator, load_config(running[0].config_path), pg_dsn)
    await until(lambda: bool(posts(webhook, "refresh_expiry", "firing")), 40, "the alert")
    await until(lambda: _sent_by(pg_dsn, OWNER_OF_2), 10, "the owner's record")
    await owner.stop(signal.SIGKILL)
    # The survivor's first repeat, 6 s after the owner's alert (not a new one at takeover).
    await until(lambda: len(posts(webhook, "refresh_expiry", "firing")) >= 2, 30, "a repeat")
    emulator.settings.refresh_lifetime = 3600
    await until(lambda: bool(posts(webhook, "refresh_expiry", "resolved")), 40, "the resolution")
    await asyncio.sleep(2.5)
    firing = posts(webhook, "refresh_expiry", "firing")
    assert [p["repeat"] for p in firing] == [False] + [True] * (len(firing) - 1), firing
    times = [parse_time(p["at"]) for p in firing]
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 6 for gap in gaps), gaps
    assert len(posts(webhook, "refresh_expiry", "resolved")) == 1, webhook.posts
    assert await alert_rows(pg_dsn) == {}


async def test_a_node_cut_off_from_the_database_alerts_store_unavailable_itself(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path, webhook: Receiver, running: list[Any]
) -> None:
    """store_unavailable is about the node that cannot reach the database: that node sends
    it and its resolution, with its bookkeeping on its own disk, even when it is not the
    account's first claimant; the nodes that still reach the database send nothing."""
    emulator.settings.access_lifetime = 8
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    cut_off = next(i for i, name in enumerate(NODES[:2]) if name != OWNER_OF_2)
    with TcpProxy("127.0.0.1", port) as proxy:
        dsns = [pg_dsn, pg_dsn]
        dsns[cut_off] = proxy.dsn(pg_dsn)
        running += await start_nodes(tmp_path, emulator, dsns, alerts_toml(webhook, None))
        await store_login(emulator, load_config(running[0].config_path), pg_dsn)
        await until(lambda: all(published(n) for n in running), 10, "the login published")
        proxy.refuse()
        proxy.cut()
        await until(
            lambda: bool(posts(webhook, "store_unavailable", "firing")), 20, "store_unavailable"
        )
        assert "store_unavailable" in await conditions(running[cut_off])
        assert "store_unavailable" not in await conditions(running[1 - cut_off])
        proxy.accept()
        await until(
            lambda: bool(posts(webhook, "store_unavailable", "resolved")), 20, "the resolution"
        )
        await asyncio.sleep(1.5)
    assert len(posts(webhook, "store_unavailable", "firing")) == 1, webhook.posts
    assert len(posts(webhook, "store_unavailable", "resolved")) == 1, webhook.posts
    assert "store_unavailable" not in await alert_rows(pg_dsn)


# --------------------------------------------------------------------------- the book in-process


def open_book(
    tmp_path: Path, dsn: str, node: str = "web-1", *, heartbeat: float = 0.2
) -> tuple[FleetStore, AlertBook]:
    """A node's FleetStore (not opened yet) on ``dsn`` with a 0.2 s heartbeat, and its book."""
    config = load_config(write_store_config(tmp_path, dsn, node_name=node))
    fleet = node_store(config, dsn, node, heartbeat=heartbeat)
    return fleet, AlertBook(fleet)


def sent_record(at: datetime) -> dict[str, Any]:
    """An alert record as AccountAlerts writes it for a warning sent at ``at``."""
    return {
        "severity": "warning",
        "stage": 50.0,
        "message": "the refresh token expires in 49s and was not renewed",
        "action": "run `kakao-tokend login`",
        "texts": {"message": {"text": "x"}, "brief": {"text": "x"}},
        "since": format_time(at),
        "last_sent_at": format_time(at),
        "sent": 1,
    }


async def test_a_record_the_database_refused_is_kept_and_written_when_it_answers(
    pg_dsn: str, tmp_path: Path
) -> None:
    """With the database cut off, recording a sent alert neither raises nor blocks: the record
    is kept in the node's copy (so the node does not send it again) and retried with
    back-off; once the database answers it is written, with this node as ``sent_by``."""
    await migrated(pg_dsn)
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        fleet, book = open_book(tmp_path, proxy.dsn(pg_dsn))
        await fleet.open()
        try:
            await book.load()
            book.start()
            proxy.refuse()
            proxy.cut()
            record = sent_record(utcnow())
            book.record("default", {"refresh_expiry": record})
            await until(lambda: book.failures >= 2, 20, "two failed writes")
            assert book.records("default") == {"refresh_expiry": record}
            assert book.pending == 1 and not fleet.stats.up
            assert await alert_rows(pg_dsn) == {}
            proxy.accept()
            await until(lambda: book.pending == 0, 20, "the write")
            assert await alert_rows(pg_dsn) == {"refresh_expiry": ("web-1", 1)}
            assert book.records("default") == {"refresh_expiry": record}
        finally:
            await book.close(1.0)
            await fleet.close()


async def test_a_malformed_record_is_left_out_of_the_table_without_blocking_the_others(
    pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record that cannot become a row (no ``since``, as in bookkeeping from an old file) is
    left out with an error naming it; the other accounts' records in the same write, and
    the account's other records, are written; the bad one stays in the node's copy."""
    caplog.set_level(logging.ERROR, logger="kakao_tokend.fleet.alertshare")
    await migrated(pg_dsn)
    fleet, book = open_book(tmp_path, pg_dsn)
    await fleet.open()
    try:
        await book.load()
        good = sent_record(utcnow())
        bad = {k: v for k, v in good.items() if k != "since"}
        book.record("default", {"refresh_expiry": good, "relogin": bad})
        book.record("other", {"no_tokens": good})
        assert await book.flush() == 2
        assert await alert_rows(pg_dsn) == {"refresh_expiry": ("web-1", 1)}
        assert "alert record 'relogin' of account 'default': since" in caplog.text
        assert book.pending == 0 and "relogin" in book.records("default")
        await book.load()  # a re-read keeps what the table has: the bad record is gone
        assert set(book.records("default")) == {"refresh_expiry"}
        assert set(book.records("other")) == {"no_tokens"}
    finally:
        await fleet.close()


async def test_the_first_claimant_of_the_live_nodes_delivers_and_a_silent_node_hands_over(
    tmp_path: Path,
) -> None:
    """Exactly one node delivers an account's alerts: its first claimant among the live nodes
    (none before the table and the nodes were read). A node whose row is older than
    LIVE_HEARTBEATS heartbeats no longer counts, and its accounts go to the next claimant."""
    now = utcnow()
    books = {}
    for name in NODES:
        (tmp_path / name).mkdir()
        fleet, book = open_book(tmp_path / name, "postgresql://unused", node=name)
        fleet.nodes = {other: now for other in NODES}
        books[name] = book
    accounts = [f"acct{i}" for i in range(30)]
    assert not any(book.delivers("acct0") for book in books.values())  # nothing read yet
    for book in books.values():
        book.loaded = True
    for account in accounts:
        assert [n for n, b in books.items() if b.delivers(account)] == [
            first_claimant(account, NODES)
        ]
    gone = first_claimant("acct0", NODES)
    for name, book in books.items():
        book.fleet.nodes[gone] = now - timedelta(seconds=LIVE_HEARTBEATS * 0.2 + 0.1)
        book.fleet.nodes[name] = now
    survivors = [n for n in NODES if n != gone]
    for account in accounts:
        owners = [n for n, b in books.items() if n != gone and b.delivers(account)]
        assert owners == [first_claimant(account, survivors)]


async def test_the_book_names_what_another_node_changed_and_when_the_live_nodes_moved(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A node grades an account's alerts again only when told: the book names the accounts
    whose records another node wrote (found by its re-read), and says "every account"
    (None) when the live nodes changed, since any account may have a new first claimant."""
    await migrated(pg_dsn)
    now = utcnow()
    fleets, books = {}, {}
    # Nothing polls these stores: with 0.2 s heartbeats, a loaded run took the 0.6 s between
    # the open and a check for a node fallen behind (which delivers nothing) and failed.
    heartbeat = 5.0
    for name in NODES[:2]:
        (tmp_path / name).mkdir()
        fleets[name], books[name] = open_book(
            tmp_path / name, pg_dsn, node=name, heartbeat=heartbeat
        )
        await fleets[name].open()
    try:
        mine, theirs = books["web-1"], books["web-2"]
        for name in NODES[:2]:
            fleets[name].nodes = {other: now for other in NODES[:2]}
        assert mine.changed() == set()  # nothing read yet: it delivers nothing either way
        await mine.load()
        assert mine.changed() is None  # now it delivers: every account is graded
        assert mine.changed() == set()
        await theirs.load()
        theirs.changed()
        theirs.record("default", {"refresh_expiry": sent_record(now)})
        assert await theirs.flush() == 1
        await mine.load()
        assert mine.changed() == {"default"}
        await mine.load()
        assert mine.changed() == set()  # read again, unchanged: nothing to grade
        fleets["web-1"].nodes["web-2"] = now - timedelta(seconds=LIVE_HEARTBEATS * heartbeat + 0.1)
        assert mine.changed() is None  # web-2 went silent: its accounts change hands
        assert mine.changed() == set()
    finally:
        for fleet in fleets.values():
            await fleet.close()


async def test_a_node_behind_the_store_delivers_nothing_until_it_has_caught_up(
    tmp_path: Path,
) -> None:
    """A node that heard nothing from the store for LIVE_HEARTBEATS heartbeats (it was
    stopped: its rows and its list of nodes are from before) sends none of its accounts'
    alerts, even as their first claimant: the lock holder woken from SIGSTOP paged
    `access_expiring` for its timed-out call while the others served the new token. Once a
    poll has caught it up it delivers again, and the book says "every account" (None), so
    each is graded again on what the store says."""
    heartbeat = 0.2
    fleet, book = open_book(tmp_path, "postgresql://unused")
    now = utcnow()
    fleet.nodes = {name: now for name in NODES}
    book.loaded = True
    mine = next(
        f"acct{i}" for i in itertools.count() if first_claimant(f"acct{i}", NODES) == "web-1"
    )
    fleet.stats.last_sync = time.monotonic()
    assert book.delivers(mine)
    assert book.changed() is None  # the first look: every account
    await asyncio.sleep(LIVE_HEARTBEATS * heartbeat + 0.1)  # stopped: nothing heard
    assert fleet.behind_since() is not None
    assert not book.delivers(mine)
    assert book.changed() is None  # it stopped delivering: nothing more to send from here
    # Woken, its first commit fails: the server ended the session it held across the stop.
    # That marks the store unavailable, and must not make the stale view current.
    fleet.failed(StoreUnavailable("terminating connection due to idle-in-transaction timeout"))
    assert not book.delivers(mine)
    fleet.ok()
    fleet.note_notification(None)  # the first notifications read do not catch it up
    assert not book.delivers(mine)
    fleet._synced(time.monotonic())  # a poll begun after the silence has read every row
    assert fleet.behind_since() is None
    assert book.delivers(mine)
    assert book.changed() is None
    assert book.changed() == set()
