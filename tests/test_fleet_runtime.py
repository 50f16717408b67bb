"""The fleet node runtime in-process: the refresher on the PostgreSQL store's seam.

Real PostgreSQL (a throwaway cluster), the Kakao emulator, the real AccountManager; two
"nodes" are two FleetStore objects with their own pools, as two processes would have.
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from daemonproc import short_tokens, write_config
from fleetkit import migrated, node_store
from fleetrun import kakao_holds_the_refresh, node_config, store_login
from kakao_tokend.config import Config, load_config
from kakao_tokend.daemon import DAEMON, Daemon
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.errors import StoreUnavailable
from kakao_tokend.fleet import accounts
from kakao_tokend.fleet import store as fleet_store
from kakao_tokend.fleet.crypto import new_key_line
from kakao_tokend.fleet.db import ABANDON_GRACE
from kakao_tokend.fleet.node import FleetNode, plan_for
from kakao_tokend.fleet.store import FleetStore, PgAccountStore
from kakao_tokend.fleet.turns import LIVE_HEARTBEATS
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.refresher import AccountManager
from kakao_tokend.service import build_app
from kakao_tokend.state import AccountState
from kakao_tokend.status import Health
from kakao_tokend.storage import in_flight_path
from kakao_tokend.store import AccountStore
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session per test, closed afterwards."""
    http = create_session()
    yield http
    await http.close()


def fleet_config(
    tmp_path: Path, emulator: KakaoEmulator, dsn: str, node: str = "web-1", **timeouts: str
) -> Config:
    """A config for the emulator with a [store] section for ``dsn`` (one shared key file);
    ``timeouts``: write_config's ``timeout`` and ``connect_timeout``."""
    key_file = tmp_path / "store.key"
    if not key_file.exists():
        key_file.write_text(new_key_line() + "\n")
        key_file.chmod(0o600)
    dsn_file = tmp_path / f"dsn-{node}"
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    directory = tmp_path / node
    directory.mkdir(exist_ok=True)
    path = write_config(
        directory,
        emulator,
        **timeouts,
        extra=(
            f'[store]\nbackend = "postgres"\ndsn_file = "{dsn_file}"\n'
            f'key_file = "{key_file}"\nnode_name = "{node}"\n'
        ),
    )
    return load_config(path)


@dataclass
class Node:
    """One fleet node in this process: its store, and the account's manager on it."""

    config: Config
    fleet: FleetStore
    store: PgAccountStore
    manager: AccountManager


async def open_node(
    tmp_path: Path,
    emulator: KakaoEmulator,
    dsn: str,
    session: aiohttp.ClientSession,
    node: str,
    *,
    heartbeat: float = 60.0,
    **timeouts: str,
) -> Node:
    """Open a FleetStore as a node does at start and build the default account's manager."""
    config = fleet_config(tmp_path, emulator, dsn, node, **timeouts)
    fleet = node_store(config, dsn, node, heartbeat=heartbeat)
    await fleet.open()
    account = config.account()
    store = fleet.account_store(account)
    manager = AccountManager(
        account, store=store, client=KakaoClient(session, account.app), policy=config.refresh
    )
    store.planner = plan_for(manager)
    manager.load()
    return Node(config, fleet, store, manager)


@pytest.fixture
async def store_dsn(pg_dsn: str) -> str:
    """A migrated, empty store."""
    await migrated(pg_dsn)
    return pg_dsn


@asynccontextmanager
async def two_logged_in_nodes(
    tmp_path: Path,
    emulator: KakaoEmulator,
    dsn: str,
    session: aiohttp.ClientSession,
    *,
    heartbeat: float = 60.0,
) -> AsyncIterator[tuple[Node, Node]]:
    """web-1 and web-2 on one store, the default account logged in and loaded on both."""
    one = await open_node(tmp_path, emulator, dsn, session, "web-1", heartbeat=heartbeat)
    two = await open_node(tmp_path, emulator, dsn, session, "web-2", heartbeat=heartbeat)
    try:
        await login_on(one, emulator, dsn)
        await two.fleet.reload("default")
        two.manager.load()
        yield one, two
    finally:
        await one.fleet.close()
        await two.fleet.close()


async def login_on(node: Node, emulator: KakaoEmulator, dsn: str) -> AccountState:
    """Log the default account in through the store (as `login`) and load it on ``node``."""
    state = await store_login(emulator, node.config, dsn)
    await node.fleet.reload("default")
    node.manager.load()
    return state


async def refresh_while_the_database_goes(
    node: Node, emulator: KakaoEmulator, proxy: TcpProxy
) -> AccountState | None:
    """Refresh on ``node``, cutting its database while Kakao holds the answer: Kakao rotates,
    the commit cannot happen. Return what the refresh returned."""
    emulator.inject("token", "hold", delay=30.0)
    task = asyncio.create_task(node.manager.refresh(force=True, reason="due"))
    await kakao_holds_the_refresh(emulator)  # holding the row, waiting for Kakao
    proxy.refuse()
    proxy.cut()
    emulator.release_held()
    return await task


@asynccontextmanager
async def proxied_rotating_node(
    tmp_path: Path, emulator: KakaoEmulator, dsn: str, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[Node, TcpProxy]]:
    """Node web-1, its database connections through a TcpProxy the test controls, Kakao
    rotating the refresh token at every refresh; its store closed at the end."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1  # always rotate
    port = int(str(conninfo_to_dict(dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        node = await open_node(tmp_path, emulator, proxy.dsn(dsn), session, "web-1")
        try:
            yield node, proxy
        finally:
            await node.fleet.close()


async def put_rows_back(db: psycopg.AsyncConnection[Any], copy: str) -> None:
    """Put the one account's row back to the table ``copy`` (made with ``CREATE TABLE copy AS
    SELECT * FROM accounts``), keeping its id: as a replica promoted without the last commits
    would hold it."""
    cur = await db.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = 'accounts' AND column_name <> 'id'"
    )
    columns = ", ".join(str(name) for (name,) in await cur.fetchall())
    await db.execute(
        f"UPDATE accounts SET ({columns}) = (SELECT {columns} FROM {copy})"  # type: ignore[arg-type]
    )


async def test_a_refresh_commits_to_the_store_before_it_publishes(
    store_dsn: str,
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh on a node writes the new generation to the row (CAS, refreshed_by = the
    node), and the token file appears only once the row holds it."""
    first = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        state = await login_on(first, emulator, store_dsn)
        assert first.manager.state == state
        seen_at_publish: list[tuple[int, int | None]] = []
        original = AccountStore.publish

        def spy(files: AccountStore, published: AccountState, **kwargs: Any) -> None:
            # The generation published, and the one the node's copy of the row has by then
            # (set once the commit succeeded).
            committed = first.fleet.rows.get("default")
            seen_at_publish.append(
                (published.generation, committed.generation if committed else None)
            )
            original(files, published, **kwargs)

        # The node's file store is made for each publish: the class is what it goes through.
        monkeypatch.setattr(AccountStore, "publish", spy)
        new = await first.manager.refresh(force=True, reason="test")
        assert new is not None and new.generation == state.generation + 1
        row = await first.fleet.reload("default")
        assert row is not None
        assert row.generation == new.generation
        assert row.state.tokens.refresh_token == new.tokens.refresh_token
        assert row.refreshed_by == "web-1"
        assert row.due_at is not None and row.due_at == first.manager.planned_refresh_at()
        assert seen_at_publish == [(new.generation, new.generation)]
        published = json.loads(first.config.account().token_file.read_text())
        assert published["access_token"] == new.tokens.access_token
    finally:
        await first.fleet.close()


async def test_adopting_another_nodes_refresh_is_routine_and_not_logged_at_info(
    store_dsn: str,
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a fleet every node adopts every other node's refresh: a DEBUG line, not INFO.

    At INFO, three nodes with 3,000 accounts wrote about 80 "adopted tokens" lines a second
    into the journal (bench/fleet_bench.py), burying the lines a person needs.
    """
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session) as (one, two):
        new = await one.manager.refresh(force=True, reason="test")
        assert new is not None
        await two.fleet.reload("default")
        caplog.set_level(logging.DEBUG, logger="kakao_tokend")
        assert two.manager.notice_outside_changes()
        assert two.manager.state == new
        adopted = [r for r in caplog.records if "adopted tokens" in r.getMessage()]
        assert [r.levelno for r in adopted] == [logging.DEBUG]


async def test_concurrent_on_demand_refreshes_on_two_nodes_make_one_kakao_call(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Two nodes asked at once for a token valid longer than the held one take the same row
    lock: one calls Kakao, the other waits, re-reads the committed row and calls nobody."""
    emulator.settings.access_lifetime = 10
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session) as (one, two):
        await asyncio.sleep(3)  # 7 s left: both callers want 8
        emulator.inject("token", "slow", delay=0.8)
        before = emulator.stats.refreshes_ok
        results = await asyncio.gather(
            one.manager.refresh(force=True, reason="api", min_valid=8),
            two.manager.refresh(force=True, reason="api", min_valid=8),
        )
        assert emulator.stats.refreshes_ok - before == 1
        assert results[0] is not None and results[1] is not None
        assert results[0].tokens.access_token == results[1].tokens.access_token
        assert results[0].generation == results[1].generation
        assert one.fleet.stats.claim_conflicts + two.fleet.stats.claim_conflicts == 0


async def test_a_scheduled_refresh_another_node_holds_is_not_a_failure(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """When both nodes find the account due, the second finds the row claimed (SKIP LOCKED),
    counts a claim conflict, stays healthy and makes no Kakao call; once it hears of the
    commit it plans the next refresh at the moment the row says (the same on every node)."""
    emulator.settings.access_lifetime = 4
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session) as (one, two):
        # Both find it due (each node's plan has its own jitter): a refresh asked for while
        # its own plan says not yet is one no longer needed, and claims nothing.
        while not all(n.manager.needs_refresh(n.manager.clock()) for n in (one, two)):
            await asyncio.sleep(0.05)
        emulator.inject("token", "hold", delay=30.0)
        before = emulator.stats.refreshes_ok
        first = asyncio.create_task(one.manager.refresh(reason="due"))
        await kakao_holds_the_refresh(emulator)  # web-1 holds the row, waiting for Kakao
        second = await two.manager.refresh(reason="due")
        emulator.release_held()
        committed = await first
        assert emulator.stats.refreshes_ok - before == 1
        assert two.fleet.stats.claim_conflicts == 1
        assert two.manager.status.health is Health.OK
        assert second is not None and second.generation == 1  # it did not refresh
        planned = two.manager.planned_refresh_at()
        assert planned is not None
        # It looks again soon (a share of the lifetime), in case web-1 dies on the way.
        assert (planned - two.manager.clock()).total_seconds() <= 4 * 0.02 + 0.01
        # The notification (here: its re-read) brings the committed row and its plan.
        row = await two.fleet.reload("default")
        assert row is not None and committed is not None
        assert two.manager.notice_outside_changes()
        assert two.manager.state == committed
        assert two.manager.planned_refresh_at() == row.due_at == one.manager.planned_refresh_at()


async def test_a_claim_adopts_a_row_refreshed_while_it_waited_for_a_connection_without_locking_it(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A scheduled claim decided on the generation its node held, then waited for a pooled
    connection (every one lent: a node continued after a pause finds its claims queued).
    Meanwhile another node refreshed the account and this node re-read the row (the
    notification's re-read, which leaves a busy account to its claim: Daemon.on_store_changed).
    The claim adopts that row and locks nothing: the old code locked it, found it current
    and ended with nothing to commit (an idle hold; up to 10 of 48 in the e2e pause test)."""
    emulator.settings.access_lifetime = 3
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session) as (one, two):
        while not two.manager.needs_refresh(two.manager.clock()):
            await asyncio.sleep(0.05)
        lent = [await two.fleet.getconn("keep busy") for _ in range(two.fleet.pool_size)]
        claim = asyncio.create_task(two.manager.refresh(reason="due"))
        while not two.fleet.pool_stats().get("requests_waiting"):
            assert not claim.done(), claim
            await asyncio.sleep(0.01)
        new = await one.manager.refresh(force=True, reason="the first claimant")
        assert new is not None
        calls = emulator.stats.refreshes_ok
        # The notification's re-read (on a connection already lent: the claim waits for one).
        row = await accounts.load_account(lent[0], two.fleet.keyring, "default", rotations=1)
        await lent[0].commit()
        assert row is not None and row.generation == new.generation
        two.fleet.keep_row(row)
        for conn in lent:
            await two.fleet.putconn(conn)
        adopted = await claim
        assert two.fleet.stats.idle_holds == 0
        assert adopted == new == two.manager.state
        assert emulator.stats.refreshes_ok == calls
        published = json.loads(two.config.account().token_file.read_text())
        assert published["access_token"] == new.tokens.access_token
        assert two.manager.planned_refresh_at() == one.manager.planned_refresh_at()


async def test_a_claim_for_an_account_adopted_current_since_it_was_decided_locks_nothing(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The scheduler found the account due; before its refresh ran, another node refreshed
    the account and this node adopted the row (the notification's re-read: the node was not
    behind, so there was nothing to catch up). The refresh, asked for "if still needed",
    sees the adopted tokens are current and locks nothing. The old code claimed the row on
    the adopted generation, found it current and committed nothing: an idle hold, ten of
    them in the e2e pause test's load failure, each after its account's adoption."""
    emulator.settings.access_lifetime = 3
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session) as (one, two):
        while not two.manager.needs_refresh(two.manager.clock()):
            await asyncio.sleep(0.05)
        new = await one.manager.refresh(force=True, reason="the first claimant")
        assert new is not None
        assert await two.fleet.reload("default") is not None
        assert two.manager.notice_outside_changes()
        calls = emulator.stats.refreshes_ok
        kept = await two.manager.refresh(reason="due")
        assert two.fleet.stats.idle_holds == 0
        assert kept == new == two.manager.state
        assert emulator.stats.refreshes_ok == calls
        assert two.manager.planned_refresh_at() == one.manager.planned_refresh_at()


async def test_a_claim_that_waited_for_a_connection_while_its_node_fell_behind_catches_up_first(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A claim decided while the node was current waits for a pooled connection; meanwhile
    the node falls behind (it was stopped: SIGSTOP, a stalled loop) and another node
    refreshes the account. Once it has a connection, the claim waits for the re-read of what
    changed, finds the account refreshed and locks nothing. The old code locked the row and
    found it current: 6 of 7 idle holds in a CI run of the e2e pause test, each a claim of
    the round that was under way when the node was stopped."""
    emulator.settings.access_lifetime = 3
    heartbeat = 0.2
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session, heartbeat=heartbeat) as (
        one,
        two,
    ):
        fleet = two.fleet
        rereads = 0

        async def reread() -> bool:  # what the node's listener does (FleetNode.resync)
            nonlocal rereads
            rereads += 1
            await fleet.poll()
            return True

        fleet.resync = lambda since: asyncio.get_running_loop().create_task(reread())
        while not two.manager.needs_refresh(two.manager.clock()):
            await asyncio.sleep(0.05)
        await fleet.poll()  # current: the claim has nothing to catch up with when it begins
        taken = [await fleet.getconn("fill the pool") for _ in range(fleet.pool_size)]
        claim = asyncio.create_task(two.manager.refresh(reason="due"))
        await asyncio.sleep(0.1)
        assert not claim.done(), "the claim should wait for a connection"
        new = await one.manager.refresh(force=True, reason="the first claimant")
        assert new is not None
        await asyncio.sleep(LIVE_HEARTBEATS * heartbeat * 1.5)  # nothing heard: behind
        assert fleet.behind_since() is not None
        calls = emulator.stats.refreshes_ok
        for conn in taken:
            await fleet.putconn(conn)
        kept = await claim
        assert fleet.stats.idle_holds == 0
        assert rereads == 1
        assert kept == new == two.manager.state
        assert emulator.stats.refreshes_ok == calls


@asynccontextmanager
async def serving_node(config_path: Path) -> AsyncIterator[Daemon]:
    """The daemon's real Application for ``config_path`` on its Unix socket, in-process, so
    that a test can look at its scheduler; stopped and cleaned up at the end."""
    app = build_app(load_config(config_path), config_path=config_path)
    runner = aiohttp.web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    daemon = app[DAEMON]
    try:
        await aiohttp.web.UnixSite(runner, str(daemon.config.api_socket)).start()
        yield daemon
    finally:
        daemon.begin_stop()
        try:
            await runner.cleanup()
        finally:
            await daemon.end_stop()


async def test_a_proxy_refresh_another_node_holds_makes_the_scheduler_look_again_soon(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Kakao answers -401 through the proxy while another node holds the row: the refresh
    finds the row claimed and the account plans a look a share of the lifetime later (in case
    that node dies on the way). The scheduler must wake then, not at the old moment: when
    the holder goes without committing, this node refreshes within that share, not at the
    access token's 75 % mark (the heartbeat, 60 s here, is no backstop for a short token)."""
    emulator.settings.access_lifetime = 20
    config_path = node_config(tmp_path, emulator, store_dsn, "web-1", heartbeat="60s")
    config = load_config(config_path)
    state = await store_login(emulator, config, store_dsn)
    other = node_store(
        load_config(node_config(tmp_path, emulator, store_dsn, "web-2")), store_dsn, "web-2"
    )
    await other.open()
    try:
        async with serving_node(config_path) as daemon:
            assert daemon.scheduler is not None
            manager = daemon.managers["default"]
            old_plan = daemon.scheduler.planned("default")
            assert old_plan is not None and old_plan - manager.clock() > timedelta(seconds=10)
            before = emulator.stats.refreshes_ok
            connector = aiohttp.UnixConnector(path=str(config.api_socket))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with other.account_store(config.account()).hold(0):
                    emulator.advance_clock(25)  # the access token is dead on Kakao's clock
                    async with http.get("http://tokend/kapi/v2/user/me") as response:
                        assert response.status == 401  # no new token: the row was held
                    planned = daemon.scheduler.planned("default")
                    assert planned is not None
                    assert planned == manager.next_wakeup()
                    assert planned - manager.clock() <= timedelta(seconds=20 * 0.02 + 0.1)
                # web-2 let the row go without committing: web-1 refreshes at its next look,
                # well before the old plan (waiting is bounded by it, not by a fixed time: a
                # loaded machine may take seconds, the old code would not refresh before it).
                # Kakao counts the refresh when it answers; the node commits and adopts it a
                # moment later (a loaded run saw the old generation in between).
                while emulator.stats.refreshes_ok == before or (
                    manager.state is not None and manager.state.generation == state.generation
                ):
                    assert manager.clock() < old_plan - timedelta(seconds=1), "no refresh"
                    await asyncio.sleep(0.05)
                assert emulator.stats.refreshes_ok == before + 1
                assert manager.state is not None
                assert manager.state.generation == state.generation + 1
    finally:
        await other.close()


async def test_no_kakao_call_without_the_row_lock_when_the_database_is_gone(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """With the database unreachable, a due refresh fails as a transient store error, calls
    no token endpoint, keeps the held token served, and marks the store unavailable."""
    port = int(str(conninfo_to_dict(store_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        node = await open_node(tmp_path, emulator, proxy.dsn(store_dsn), session, "web-1")
        try:
            state = await login_on(node, emulator, store_dsn)
            proxy.refuse()
            proxy.cut()
            before = emulator.stats.requests["token"]
            kept = await node.manager.refresh(force=True, reason="due")
            assert emulator.stats.requests["token"] == before
            assert kept == state
            assert node.manager.status.health is Health.RETRYING
            assert not node.fleet.stats.up
            proxy.accept()
            new = await node.manager.refresh(force=True, reason="due")
            assert new is not None and new.generation == state.generation + 1
            assert node.fleet.stats.up
        finally:
            await node.fleet.close()


async def test_a_rotated_token_whose_commit_failed_is_rescued_encrypted_and_committed_later(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The connection dies while Kakao answers: the rotated tokens stay in memory and in an
    encrypted 0600 rescue file; once the database is back the retry commits them with CAS on
    the claimed generation and removes the rescue file."""
    async with proxied_rotating_node(tmp_path, emulator, store_dsn, session) as (node, proxy):
        state = await login_on(node, emulator, store_dsn)
        new = await refresh_while_the_database_goes(node, emulator, proxy)
        assert new is not None and new.generation == state.generation + 1
        assert new.tokens.refresh_token != state.tokens.refresh_token  # rotated
        assert node.manager.status.write_pending
        rescue = node.store.rescue_path
        assert rescue is not None and rescue.exists()
        assert stat.S_IMODE(rescue.stat().st_mode) == 0o600
        raw = rescue.read_text()
        assert new.tokens.refresh_token not in raw and new.tokens.access_token not in raw
        rescued = node.store.load_rescue()
        assert rescued is not None and rescued.generation == new.generation
        assert rescued.tokens.refresh_token == new.tokens.refresh_token
        # This node serves the new access token (it is valid; the refresh token is safe in
        # the rescue file); the row still holds the old generation for the other nodes.
        published = json.loads(node.config.account().token_file.read_text())
        assert published["generation"] == new.generation
        assert node.fleet.rows["default"].generation == state.generation
        proxy.accept()
        await node.manager.flush()
        assert not node.manager.status.write_pending
        assert not rescue.exists()
        row = await node.fleet.reload("default")
        assert row is not None and row.generation == new.generation
        assert row.state.tokens.refresh_token == new.tokens.refresh_token
        published = json.loads(node.config.account().token_file.read_text())
        assert published["generation"] == new.generation


async def test_the_rescue_file_stays_until_the_commit_of_its_tokens_has_succeeded(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The retry of a rescued rotation removes the rescue file only once its commit is done.
    It removed it when the tokens were staged under the row lock, before the commit was sent:
    a node killed during that commit (a database slow to answer: up to the deadline) lost the
    rotated refresh token, which was then only in memory. Here a deferred trigger makes the
    commit take a second; at every moment the rescue file is there or the row holds it."""
    async with proxied_rotating_node(tmp_path, emulator, store_dsn, session) as (node, proxy):
        await login_on(node, emulator, store_dsn)
        new = await refresh_while_the_database_goes(node, emulator, proxy)
        assert new is not None and node.manager.status.write_pending
        rescue = node.store.rescue_path
        assert rescue is not None and rescue.exists()
        proxy.accept()
        async with await psycopg.AsyncConnection.connect(store_dsn, autocommit=True) as watch:
            await watch.execute(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"
            )
            await watch.execute(
                "CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON accounts"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
            )

            async def committed_generation() -> int:
                cur = await watch.execute("SELECT generation FROM accounts WHERE name = 'default'")
                found = await cur.fetchone()
                assert found is not None
                return int(found[0])

            flush = asyncio.create_task(node.manager.flush())
            looks = 0
            while not flush.done():
                if not rescue.exists():
                    assert await committed_generation() == new.generation, (
                        "the rescue file was removed before its tokens were committed"
                    )
                looks += 1
                await asyncio.sleep(0.02)
            await flush
            assert looks >= 10  # the commit took its second: the looks covered it
            assert not node.manager.status.write_pending
            assert not rescue.exists()
            assert await committed_generation() == new.generation


async def test_a_row_gone_back_to_a_retired_token_is_written_over_by_the_node_holding_the_new(
    store_dsn: str,
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica promoted without the last commits (or a restore under running nodes) puts a
    row back to a refresh token Kakao has retired. The node that holds the rotated one writes
    it back at its next claim: under the row lock it refuses the older row (a critical line
    and a state conflict; it did so silently, its store had no lock to offer the refusal),
    refreshes with its own tokens and commits over it (compare-and-swap on the row it
    locked); no rescue file is left (docs/fleet.md §18)."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1  # always rotate
    node = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        old = await login_on(node, emulator, store_dsn)
        async with await psycopg.AsyncConnection.connect(store_dsn, autocommit=True) as db:
            await db.execute("CREATE TABLE before_rotation AS SELECT * FROM accounts")
            new = await node.manager.refresh(force=True, reason="due")
            assert new is not None and new.generation == old.generation + 1
            assert emulator.refresh_token_status(old.tokens.refresh_token) == "retired"
            await node.fleet.reload("default")
            node.manager.notice_outside_changes()  # its own commit's notification
            await put_rows_back(db, "before_rotation")
            newer = await node.manager.refresh(force=True, reason="due")
            assert newer is not None and newer.generation > new.generation
            assert emulator.refresh_token_status(new.tokens.refresh_token) == "retired"
            assert emulator.refresh_token_status(newer.tokens.refresh_token) == "live"
            row = await node.fleet.reload("default")
            assert row is not None and row.generation == newer.generation
            assert row.state.tokens.refresh_token == newer.tokens.refresh_token
            assert node.manager.status.health is Health.OK
            assert node.store.rescue_path is not None and not node.store.rescue_path.exists()
            refusals = [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.CRITICAL and "went back to an older state" in r.getMessage()
            ]
            assert len(refusals) == 1, refusals
            assert "was retired by a rotation since" in refusals[0]
            assert "restore" not in refusals[0].replace("restored", "")  # a file-mode command
    finally:
        await node.fleet.close()


async def test_a_rescued_rotation_that_meets_a_row_gone_back_is_still_committed(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A rotation waits in the rescue file for the database; the database comes back older
    than the node last saw it (a replica promoted without its last commits). The retry finds
    the row changed, refuses it as older and commits the rescued tokens over it. It dropped
    the write instead: the rotated refresh token was then only in memory and the rescue file,
    and the row kept a retired one."""
    async with proxied_rotating_node(tmp_path, emulator, store_dsn, session) as (node, proxy):
        await login_on(node, emulator, store_dsn)
        # A later second: a state whose tokens were issued in the same second as ours may
        # be a new login (state.goes_backwards), and the row is to be plainly older.
        await asyncio.sleep(1.1)
        async with await psycopg.AsyncConnection.connect(store_dsn, autocommit=True) as db:
            await db.execute("CREATE TABLE at_login AS SELECT * FROM accounts")
            committed = await node.manager.refresh(force=True, reason="due")
            assert committed is not None
            await node.fleet.reload("default")
            node.manager.notice_outside_changes()  # its own commit's notification
            rescued = await refresh_while_the_database_goes(node, emulator, proxy)
            assert rescued is not None and node.manager.status.write_pending
            await put_rows_back(db, "at_login")
        proxy.accept()
        await node.manager.flush()
        assert not node.manager.status.write_pending
        async with await psycopg.AsyncConnection.connect(store_dsn) as db:
            cur = await db.execute("SELECT generation FROM accounts WHERE name = 'default'")
            assert await cur.fetchone() == (rescued.generation,)  # not the node's cache
        row = await node.fleet.reload("default")
        assert row is not None and row.generation == rescued.generation
        assert row.state.tokens.refresh_token == rescued.tokens.refresh_token
        assert emulator.refresh_token_status(rescued.tokens.refresh_token) == "live"
        assert node.store.rescue_path is not None and not node.store.rescue_path.exists()


async def test_a_restarted_node_commits_the_rescue_file_it_finds(
    store_dsn: str,
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rescue file left by a node that died before committing is read at the next start
    (it is newer than the row), committed with CAS, and removed. Until then it waits for the
    row lock, which is no failure: no CRITICAL "cannot save the new tokens (… not in the
    store yet …)" as the start tried to write outside the lock, and no write_failed alert."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1
    port = int(str(conninfo_to_dict(store_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        node = await open_node(tmp_path, emulator, proxy.dsn(store_dsn), session, "web-1")
        state = await login_on(node, emulator, store_dsn)
        new = await refresh_while_the_database_goes(node, emulator, proxy)
        assert new is not None and node.manager.status.write_pending
        await node.fleet.close()  # the node "dies" with its rescue file on disk
    caplog.clear()
    again = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        recovered = again.manager.state  # from the rescue file
        assert recovered is not None and recovered.generation == new.generation
        assert recovered.tokens.refresh_token == new.tokens.refresh_token
        assert again.manager.status.write_pending  # not committed yet: needs the row lock
        critical = [r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL]
        assert critical == [], critical
        graded = again.manager.health()
        assert "write_failed" not in graded.names(), graded.names()
        await again.manager.flush()
        row = await again.fleet.reload("default")
        assert row is not None and row.generation == new.generation
        assert row.state.tokens.refresh_token == new.tokens.refresh_token
        assert again.store.rescue_path is not None and not again.store.rescue_path.exists()
        assert state.generation + 1 == new.generation
    finally:
        await again.fleet.close()


async def test_a_restarted_node_publishes_rescued_tokens_only_once_they_are_committed(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A node's start finds a rescue file newer than the row: those tokens wait for the row
    lock, and like every fleet state they are published when they are committed, not at
    start (nothing is published before its commit: storage.StateStore.hold; the store may
    still refuse them, e.g. after another node's login). Before, the daemon's start
    published every loaded state whose file was stale, the rescued one included."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1
    port = int(str(conninfo_to_dict(store_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        node = await open_node(tmp_path, emulator, proxy.dsn(store_dsn), session, "web-1")
        await login_on(node, emulator, store_dsn)
        new = await refresh_while_the_database_goes(node, emulator, proxy)
        assert new is not None and node.manager.status.write_pending
        await node.fleet.close()  # the node "dies" with its rescue file on disk
    again = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        token_file = again.config.account().token_file
        token_file.unlink(missing_ok=True)
        daemon = Daemon(config=again.config, session=session)
        daemon.fleet = again.fleet
        manager = daemon.managers["default"] = daemon.make_manager(again.config.account())
        assert manager.state is not None and manager.state.generation == new.generation
        assert manager.status.write_pending
        assert not token_file.exists()  # not before the commit
        await manager.tick()  # the first tick commits under the row lock, then publishes
        assert not manager.status.write_pending
        published = json.loads(token_file.read_text())
        assert published["generation"] == new.generation
    finally:
        await again.fleet.close()


async def test_a_fleet_rescue_file_that_cannot_be_written_is_critical_once_per_episode(
    store_dsn: str,
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fleet mode, the encrypted rescue file's directory refuses writes while the commit is
    retried (3 times a second with 6-second tokens): "cannot write the rescue file either" is
    CRITICAL the first time only, and again only once a rescue file was written meanwhile (a
    new episode), as in the file store. It was CRITICAL at every retry, forever."""
    node = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        state = await login_on(node, emulator, store_dsn)
        rescue = node.store.rescue_path
        assert rescue is not None
        rescue.parent.mkdir(parents=True, exist_ok=True)
        rescue.parent.rmdir()
        rescue.parent.write_text("a file where the rescue directory should be")

        def critical() -> int:
            return sum(
                "cannot write the rescue file" in r.getMessage()
                for r in caplog.records
                if r.levelname == "CRITICAL"
            )

        for _ in range(5):
            assert node.store.save_rescue(state) is False
        assert critical() == 1
        rescue.parent.unlink()  # room again: the rescue file is written, the episode is over
        assert node.store.save_rescue(state) is True
        assert "written again" in caplog.text
        rescue.unlink()
        rescue.parent.rmdir()
        rescue.parent.write_text("refused again")
        assert node.store.save_rescue(state) is False
        assert node.store.save_rescue(state) is False
        assert critical() == 2
        rescue.parent.unlink()
    finally:
        await node.fleet.close()


async def test_a_rescue_file_older_than_the_row_is_kept_aside_and_never_used(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A rescue file at a generation the row has already passed (its tokens were committed
    another way) is not adopted at start: it is kept aside as ``.superseded-<stamp>``."""
    node = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        old = await login_on(node, emulator, store_dsn)
        new = await node.manager.refresh(force=True, reason="test")
        assert new is not None and new.generation == old.generation + 1
        assert node.store.save_rescue(old)
        rescue = node.store.rescue_path
        assert rescue is not None and rescue.exists()
    finally:
        await node.fleet.close()
    again = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        assert again.manager.state is not None
        assert again.manager.state.generation == new.generation
        assert not again.manager.status.write_pending
        assert not rescue.exists()
        kept = list(rescue.parent.glob(rescue.name + ".superseded-*"))
        assert len(kept) == 1
        assert stat.S_IMODE(kept[0].stat().st_mode) == 0o600
    finally:
        await again.fleet.close()


async def test_a_rotation_another_node_has_not_committed_yet_is_not_a_relogin(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """web-1's database goes while Kakao rotates: the new refresh token waits in its rescue
    file. web-2 claims the row meanwhile and presents the retired token: KOE322, while Kakao
    still accepts the access token. That is another holder's rotation, not a revoked grant:
    web-2 does not say "log in again"; once web-1 commits, both nodes serve the new tokens."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1  # always rotate
    port = int(str(conninfo_to_dict(store_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        one = await open_node(tmp_path, emulator, proxy.dsn(store_dsn), session, "web-1")
        two = await open_node(tmp_path, emulator, store_dsn, session, "web-2")
        events: list[str] = []
        two.manager.listeners.append(lambda event: events.append(str(event.kind)))
        one.manager.listeners.append(lambda event: events.append(f"web-1 {event.kind}"))
        try:
            state = await login_on(one, emulator, store_dsn)
            await two.fleet.reload("default")
            two.manager.load()
            rescued = await refresh_while_the_database_goes(one, emulator, proxy)
            assert rescued is not None and one.manager.status.write_pending
            refused_before = emulator.stats.requests["token"]
            await two.manager.refresh(force=True, reason="due")
            assert emulator.stats.requests["token"] == refused_before + 1  # KOE322
            assert two.manager.status.health is not Health.RELOGIN, two.manager.status
            proxy.accept()
            await one.manager.flush()
            assert not one.manager.status.write_pending
            row = await two.fleet.reload("default")
            assert row is not None
            assert row.state.tokens.refresh_token == rescued.tokens.refresh_token
            assert two.manager.notice_outside_changes()
            assert two.manager.status.health is Health.OK
            assert two.manager.state is not None
            assert two.manager.state.tokens.refresh_token == rescued.tokens.refresh_token
            assert "relogin" not in events and "web-1 conflict" not in events, events
            assert state.generation + 1 == rescued.generation
        finally:
            await one.fleet.close()
            await two.fleet.close()


async def test_a_rotation_not_committed_yet_is_not_a_relogin_once_the_access_token_expired(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """As above, but the database stays away from web-1 until the access token has expired
    (a PostgreSQL restart longer than what was left of it): web-2's KOE322 can no longer be
    told from a revoked grant by asking Kakao about the access token. A store outage is no
    reason to page for a login: web-2 waits the fleet's grace (three heartbeats fitted to
    the token, from the first refusal), and adopts web-1's rotation when it commits. It
    raised a `relogin` critical at once before."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1  # always rotate
    lifetime = 3
    emulator.settings.access_lifetime = lifetime
    port = int(str(conninfo_to_dict(store_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        one = await open_node(tmp_path, emulator, proxy.dsn(store_dsn), session, "web-1")
        two = await open_node(tmp_path, emulator, store_dsn, session, "web-2")
        events: list[str] = []
        two.manager.listeners.append(lambda event: events.append(str(event.kind)))
        try:
            state = await login_on(one, emulator, store_dsn)
            await two.fleet.reload("default")
            two.manager.load()
            rescued = await refresh_while_the_database_goes(one, emulator, proxy)
            assert rescued is not None and one.manager.status.write_pending
            left = state.tokens.access_remaining(two.manager.clock()).total_seconds()
            await asyncio.sleep(max(0.0, left) + 0.1)
            refused_before = emulator.stats.requests["token"]
            await two.manager.refresh(force=True, reason="due")
            assert emulator.stats.requests["token"] == refused_before + 1  # KOE322
            status = two.manager.status
            assert status.health is Health.RETRYING, status
            assert status.last_error_class == "superseded", status
            # The grace is the fleet's (three heartbeats, fitted to the 3-second token), not
            # three configured minutes, and not cut to nothing by the expired access token.
            grace = two.store.peer_grace
            assert grace == pytest.approx(3 * lifetime / 8)
            assert status.next_attempt_at is not None and status.failing_since is not None
            # From the refusal (failing_since: the moment the pause was decided), not from a
            # clock read after refresh() returned: on a loaded machine the time since is not
            # the node's (0.44 s of a 1.125 s grace were left once in a full run).
            pause = (status.next_attempt_at - status.failing_since).total_seconds()
            assert 0.5 * grace < pause <= grace + 0.05, (pause, grace)
            proxy.accept()
            await one.manager.flush()
            assert not one.manager.status.write_pending
            await two.fleet.reload("default")
            assert two.manager.notice_outside_changes()
            assert two.manager.status.health is Health.OK
            assert two.manager.state is not None
            assert two.manager.state.tokens.refresh_token == rescued.tokens.refresh_token
            assert "relogin" not in events, events
        finally:
            await one.fleet.close()
            await two.fleet.close()


async def test_a_refusal_no_node_answers_within_the_grace_asks_for_a_login_once(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Another program rotated the refresh token (its successor reaches no node): the node
    waits the grace — the liveness window, three heartbeats fitted to the token — without
    presenting the refused token again, then asks for a login."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1
    emulator.settings.access_lifetime = 4
    node = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        state = await login_on(node, emulator, store_dsn)
        await node.manager.client.refresh(state.tokens)  # someone else rotates; never saved
        calls = emulator.stats.requests["token"]
        asked = node.manager.clock()
        await node.manager.refresh(force=True, reason="due")
        answered = node.manager.clock()
        status = node.manager.status
        assert status.health is Health.RETRYING and status.last_error_class == "superseded"
        assert emulator.stats.requests["token"] == calls + 1
        # The wait is the grace from the refusal, which came between the ask and the answer
        # (measured so, not from a moment after it, a late test cannot make it look right).
        grace = timedelta(seconds=node.store.peer_grace)
        assert status.next_attempt_at is not None
        assert asked + grace <= status.next_attempt_at <= answered + grace
        await node.manager.tick()  # not due yet: nobody presents the refused token again
        assert emulator.stats.requests["token"] == calls + 1
        await asyncio.sleep(
            max(0.0, (status.next_attempt_at - node.manager.clock()).total_seconds())
        )
        await node.manager.tick()
        assert status.health is Health.RELOGIN
        assert emulator.stats.requests["token"] == calls + 2
        row = await node.fleet.reload("default")
        assert row is not None and row.state.relogin_reason
    finally:
        await node.fleet.close()


async def test_a_waiting_write_is_tried_at_once_when_the_store_answers_again(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Rescued tokens whose next write try lies far ahead (the back-off of a long outage)
    are written at the next tick once a poll finds the store answering (the daemon's
    on_store_health, as the node runtime calls it after every poll): other nodes may wait
    for them. While the store is away the back-off stands."""
    async with proxied_rotating_node(tmp_path, emulator, store_dsn, session) as (node, proxy):
        daemon = Daemon(config=node.config, managers={"default": node.manager})
        daemon.fleet = node.fleet
        await login_on(node, emulator, store_dsn)
        new = await refresh_while_the_database_goes(node, emulator, proxy)
        assert new is not None and node.manager.status.write_pending
        node.manager._next_write_at = node.manager.clock() + timedelta(hours=1)
        daemon.on_store_health()  # the store is away (the commit failed): nothing to try
        proxy.accept()
        await node.manager.tick()
        assert node.manager.status.write_pending  # the back-off holds it back
        await node.fleet.poll()  # the heartbeat's poll: the store answers again
        daemon.on_store_health()
        await node.manager.tick()
        assert not node.manager.status.write_pending
        row = await node.fleet.reload("default")
        assert row is not None and row.generation == new.generation
        assert not node.manager.write_again_now()  # nothing waits any more


async def test_an_account_added_while_the_store_is_away_carries_the_outage_at_once(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The daemon hands the store's health to the accounts only when it changes (it runs
    after every poll, and an idle node must not walk thousands of accounts each time), so an
    account made meanwhile (a reload adding it) takes the outage when it is made; otherwise
    its store_unavailable alert would wait for the next change of the store's health."""
    node = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        daemon = Daemon(config=node.config, session=session)
        daemon.fleet = node.fleet
        node.fleet.failed(StoreUnavailable("connection refused"))
        daemon.on_store_health()
        manager = daemon.managers["default"] = daemon.make_manager(node.config.account())
        assert manager.status.store_unavailable_since == node.fleet.stats.unavailable_since
        assert manager.status.store_unavailable_since is not None
        assert manager.status.store_error == "connection refused"
        node.fleet.ok()
        daemon.on_store_health()  # the store answers again: every account hears of it
        assert manager.status.store_unavailable_since is None
    finally:
        await node.fleet.close()


async def test_a_node_keeps_the_newest_rotation_in_memory_and_the_log_in_the_store(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Three rotations: the state the node holds keeps only the newest (fifty of them for
    each of 10,000 accounts were most of a node's memory), the store's log keeps all three
    for status, and the cached row re-read after the node's own commit is the manager's
    state itself, not a second decrypted copy."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1  # always rotate
    node = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        await login_on(node, emulator, store_dsn)
        fingerprints = []
        for _ in range(3):
            new = await node.manager.refresh(force=True, reason="test")
            assert new is not None
            fingerprints.append(new.tokens.refresh_fingerprint)
            await node.fleet.reload("default")  # as its own commit's notification does
        state = node.manager.state
        assert state is not None
        assert [r.fingerprint for r in state.rotations] == fingerprints[-1:]
        assert node.fleet.rows["default"].state is state
        log = (await node.fleet.rotation_log(["default", "nobody"]))["default"]
        assert [r.fingerprint for r in log] == fingerprints
        assert [r.replaced for r in log[1:]] == fingerprints[:-1]
    finally:
        await node.fleet.close()


async def test_a_node_holds_one_name_object_per_account_across_re_reads(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The cached row and the state the manager holds name the account with the
    configuration's string, not a copy from each database read (57 bytes of each of 10,000
    accounts), also after another node's refresh is re-read and adopted."""
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session) as (one, two):
        name = two.manager.account.name
        for _ in range(2):
            state = two.manager.state
            assert state is not None and state.account is name
            row = two.fleet.rows[name]
            assert row.name is name and next(k for k in two.fleet.rows if k == name) is name
            new = await one.manager.refresh(force=True, reason="test")
            assert new is not None
            await two.fleet.reload(name)
            assert two.manager.notice_outside_changes()
            assert two.manager.state == new


async def test_a_re_read_row_holds_the_moment_of_its_newest_rotation_once(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Another node's rotation, re-read: the newest rotation's moment and the state's
    ``refreshed_at`` are one object (they are the same moment: 48 bytes an account)."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime + 1  # always rotate
    async with two_logged_in_nodes(tmp_path, emulator, store_dsn, session) as (one, two):
        new = await one.manager.refresh(force=True, reason="test")
        assert new is not None and new.rotations
        await two.fleet.reload("default")
        state = two.fleet.rows["default"].state
        assert state == new and state is not new
        assert state.rotations[-1].at == new.refreshed_at
        assert state.rotations[-1].at is state.refreshed_at


async def test_an_account_due_beyond_the_window_waits_for_the_poll_to_name_it_then_refreshes(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node keeps no due-queue entry for an account due beyond the poll's window (3 s
    here: 3 heartbeats of 1 s); the heartbeat's poll names it once its row comes within the
    window, with nothing written meanwhile, and the node refreshes it at its moment, not
    before; the new tokens' plan lies beyond the window again, and leaves the queue."""
    monkeypatch.setattr(fleet_store, "DUE_WINDOW_MIN", 0.0)
    emulator.settings.access_lifetime = 3600
    config_path = node_config(tmp_path, emulator, store_dsn, "web-1", heartbeat="1s")
    config = load_config(config_path)
    state = await store_login(emulator, config, store_dsn)
    async with await psycopg.AsyncConnection.connect(store_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "UPDATE accounts SET due_at = now() + interval '8 seconds' RETURNING due_at"
        )
        found = await cur.fetchone()
    assert found is not None
    due_at = found[0]
    async with serving_node(config_path) as daemon:
        assert daemon.scheduler is not None and daemon.fleet is not None
        manager = daemon.managers["default"]
        assert manager.next_wakeup() is not None
        assert manager.next_wakeup() - manager.clock() > timedelta(seconds=4)
        assert daemon.scheduler.planned("default") is None  # the poll's to name
        before = emulator.stats.refreshes_ok
        while emulator.stats.refreshes_ok == before:
            assert manager.clock() < due_at + timedelta(seconds=10), "not refreshed"
            await asyncio.sleep(0.05)
        assert manager.clock() >= due_at
        # Kakao has answered; the commit (and the manager's new state) follows a moment
        # later, which on a loaded machine is more than nothing.
        while manager.state is None or manager.state.generation == state.generation:
            assert manager.clock() < due_at + timedelta(seconds=10), "not committed"
            await asyncio.sleep(0.05)
        assert manager.state.generation == state.generation + 1
        while daemon.scheduler.planned("default") is not None:  # planned anew: far again
            assert manager.clock() < due_at + timedelta(seconds=20), "still queued"
            await asyncio.sleep(0.05)
        assert manager.next_wakeup() - manager.clock() > timedelta(minutes=30)


async def test_a_node_stops_even_when_a_task_of_its_listener_lost_its_cancel(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A cancel can be lost (Python 3.11's asyncio.wait_for, which psycopg_pool's getconn
    uses, returns a result that came with it): the notification task went back to waiting
    for the next notification, and the node's stop waited for it for over 70 s in two test
    runs. The stop cancels again until every task of the node has ended."""
    config = fleet_config(tmp_path, emulator, store_dsn, "web-1")
    fleet = node_store(config, store_dsn, "web-1", heartbeat=0.2)
    await fleet.open()
    node = FleetNode(fleet, on_change=lambda name: None, on_due=lambda name: None)
    try:
        await node.start(wait=5)
        lost = asyncio.Event()

        async def loses_its_first_cancel() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                lost.set()  # swallowed, as that wait_for does
            await asyncio.Event().wait()

        stubborn = asyncio.create_task(loses_its_first_cancel())
        node._tasks.append(stubborn)  # the task the lost cancel leaves running
        await asyncio.sleep(0)
        started = time.monotonic()
        # (Not wait_for's timeout alone: cancelling the stop cancelled the awaited task too.)
        await asyncio.wait_for(node.stop(), timeout=10)
        assert time.monotonic() - started < ABANDON_GRACE + 3.0
        assert lost.is_set() and stubborn.cancelled()
    finally:
        await fleet.close()


async def test_a_fleet_refresh_marks_its_request_in_flight_before_any_rescue_file_exists(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The in-flight marker lives beside the rescue file, in <state_dir>/rescue/, which a
    fleet node made only when it saved a rescue file: a node that never had one sent every
    token request unmarked (the marker's open failed with ENOENT, silently), so a restart
    after a lost answer could not tell a lost rotation from an unknown KOE322. The directory
    is made when a request is marked (an outside audit: no run ever had it)."""
    node = await open_node(tmp_path, emulator, store_dsn, session, "web-1")
    try:
        await login_on(node, emulator, store_dsn)
        marker = in_flight_path(node.store.rescue_path, "default")
        assert marker is not None and not marker.parent.exists()
        emulator.inject("token", "hold", delay=30.0)
        refresh = asyncio.ensure_future(node.manager.refresh(force=True))
        await kakao_holds_the_refresh(emulator)
        assert marker.exists()
        assert stat.S_IMODE(marker.parent.stat().st_mode) == 0o700
        emulator.release_held()
        state = await refresh
        assert state is not None and state.generation == 2
        assert not marker.exists()  # answered and committed
    finally:
        await node.fleet.close()


@asynccontextmanager
async def two_nodes_with_late_rotations(
    tmp_path: Path, emulator: KakaoEmulator, dsn: str, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[Node, Node, AccountState]]:
    """web-1 and web-2 with 10-second tokens, every refresh rotating, the Kakao timeouts at
    their defaults (fitted: a request waits 0.475 s and stays open 1.25 s for its late
    answer); yield them and the logged-in state."""
    short_tokens(emulator, access=10, refresh=3600)
    emulator.settings.rotation_window = 7200  # every refresh of the 3600 s token rotates
    fitted = {"timeout": "30s", "connect_timeout": "10s"}
    one = await open_node(tmp_path, emulator, dsn, session, "web-1", **fitted)
    two = await open_node(tmp_path, emulator, dsn, session, "web-2", **fitted)
    try:
        state = await login_on(one, emulator, dsn)
        await two.fleet.reload("default")
        two.manager.load()
        yield one, two, state
    finally:
        await one.fleet.close()
        await two.fleet.close()


async def test_a_refresh_kakao_answers_late_keeps_the_row_so_no_node_presents_its_retired_token(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Kakao rotates at once and answers after 1 s; web-1 gave up waiting after 0.475 s but
    keeps the request open for the answer, and keeps the row lock with it: web-2, asked to
    refresh meanwhile, finds the row held and presents nothing. web-1 commits the late
    answer in the same transaction. Before, the hold ended with the timeout and web-2 sent
    the refresh token Kakao had just retired (an outside audit: 10 of 88 requests), whose
    KOE322 could then page a false relogin."""
    async with two_nodes_with_late_rotations(tmp_path, emulator, store_dsn, session) as (
        one,
        two,
        before,
    ):
        emulator.inject("token", "late", count=1, delay=1.0)
        first = asyncio.ensure_future(one.manager.refresh(force=True))
        await asyncio.sleep(0.7)  # web-1 gave up waiting; its request is open
        await two.manager.refresh(force=True)
        state = await first
        assert emulator.stats.retired_refresh_presented == 0
        assert state is not None and state.generation == before.generation + 1
        assert emulator.refresh_token_status(state.tokens.refresh_token) == "live"
        await two.fleet.reload("default")
        assert two.store.load() == state
        assert two.manager.status.health is Health.OK


async def test_a_refusal_after_this_nodes_unanswered_request_waits_for_a_peers_unsaved_rotation(
    store_dsn: str, emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """web-1's request goes unanswered (so a rotation of its own may have been lost); then
    web-2 rotates and its database goes before the commit. web-1's next attempt presents the
    row's refresh token, which Kakao retired for web-2: KOE322. Its own lost rotation is one
    explanation, the peer's unsaved one another, so web-1 waits for the peer as for any
    refusal in a fleet (the store's peer grace) and adopts web-2's commit when it comes.
    Before, the refusal after an unanswered request counted as this node's lost rotation
    and paged a critical `relogin` with every node healthy (an outside audit)."""
    short_tokens(emulator, access=10, refresh=3600)
    emulator.settings.rotation_window = 7200  # every refresh of the 3600 s token rotates
    fitted = {"timeout": "30s", "connect_timeout": "10s"}
    port = int(str(conninfo_to_dict(store_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        one = await open_node(tmp_path, emulator, store_dsn, session, "web-1", **fitted)
        two = await open_node(tmp_path, emulator, proxy.dsn(store_dsn), session, "web-2", **fitted)
        try:
            await login_on(one, emulator, store_dsn)
            await two.fleet.reload("default")
            two.manager.load()
            emulator.inject("token", "timeout", count=1, delay=5.0)  # never in time
            await one.manager.refresh(force=True)
            assert one.manager.status.last_error_class == "timeout"
            rotated = await refresh_while_the_database_goes(two, emulator, proxy)
            assert rotated is not None and two.manager.status.write_pending
            await one.manager.refresh(force=True)
            assert one.manager.status.health is not Health.RELOGIN
            assert one.manager.status.last_error_class == "superseded"
            proxy.accept()
            assert await two.manager.flush()
            await one.fleet.reload("default")
            one.manager.notice_outside_changes()
            assert one.manager.state is not None
            assert one.manager.state.tokens.refresh_token == rotated.tokens.refresh_token
            assert one.manager.status.health is Health.OK
        finally:
            await one.fleet.close()
            await two.fleet.close()
