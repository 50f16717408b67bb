"""A fleet node started while PostgreSQL is down: READY, says so, alerts, waits, then serves.

Real processes (`kakao-tokend run`), a real throwaway PostgreSQL cluster the test stops and
starts, the Kakao emulator, a loopback webhook and a $NOTIFY_SOCKET like systemd's. Before
this, such a node exited 1 before READY and systemd restarted it every 5 s: when the database
did not come back, no node of the fleet ever sent an alert.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from alertkit import Receiver, alerts_toml
from alertkit import webhook as webhook  # the fixture
from daemonproc import DaemonProcess, NotifyReceiver, free_port, run_cli, start_daemon
from fleetkit import until_migration_waits_for_its_lock, write_store_config
from fleetnodes import READY_LINE, Fleet, FleetNode, FleetTimings, running_fleet, wait_until
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.fleet.schema import MIGRATION_LOCK
from pgcluster import PgCluster, PgServer
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

#: The access lifetime of the test's tokens: store_unavailable fires after 10 % of it (2 s).
LIFETIME = 20
#: What a waiting node says, in /healthz and its log.
WAITING = "waiting for the PostgreSQL store"


async def start_waiting(node: FleetNode, notify: NotifyReceiver) -> DaemonProcess:
    """Start the node's `run` with $NOTIFY_SOCKET set (the harness leaves it unset)."""
    process = await start_daemon(node.config_path, wait_ready=False, env=notify.env)
    node.process = process
    node.history.append(process)
    return process


async def published_then_database_down(fleet: Fleet, cluster: PgCluster) -> FleetNode:
    """Seed the store, let the node publish its token file, stop it, then stop PostgreSQL:
    the state of every host after a power cut that the database did not come back from."""
    await fleet.create_store()
    await fleet.seed()
    node = fleet.nodes[0]
    await node.start()
    account = fleet.accounts[0]
    await wait_until(lambda: node.token_file(account) is not None, timeout=15, what="publish")
    assert await node.stop() == 0
    await asyncio.to_thread(cluster.stop)
    return node


async def test_a_node_started_without_its_database_is_ready_alerts_and_starts_when_it_returns(
    tmp_path: Path, emulator: KakaoEmulator, pg_cluster: PgCluster, webhook: Receiver
) -> None:
    """READY at once; /healthz and the token endpoint answer 503 naming the store; the
    store_unavailable alert reaches the webhook after 10 % of the access lifetime; when the
    database starts, the node opens the store, syncs, serves a token and resolves the alert."""
    emulator.settings.access_lifetime = LIFETIME
    fleet = Fleet(
        tmp_path / "fleet",
        emulator,
        pg_cluster,
        nodes=1,
        timings=FleetTimings(heartbeat="1s"),
        extra_config=alerts_toml(webhook, None),
    )
    async with running_fleet(fleet):
        node = await published_then_database_down(fleet, pg_cluster)
        account = fleet.accounts[0]
        before = node.token_file(account)
        with NotifyReceiver() as notify:
            process = await start_waiting(node, notify)
            lines = await notify.wait_for_line("READY=1", process)
        assert any(WAITING in line for line in lines if line.startswith("STATUS="))
        code, body = await process.api("GET", "/healthz")
        assert code == 503 and WAITING in body["problems"][account]
        assert body["fleet"]["store_up"] is False and "Connection refused" in str(body)
        code, body = await node.api_token(account)
        assert code == 503 and WAITING in body["reason"]
        await wait_until(
            lambda: "store_unavailable" in webhook.conditions("firing"),
            timeout=30,
            what="the store_unavailable alert",
        )
        assert READY_LINE not in process.log_text()
        assert node.token_file(account) == before  # left as it was: consumers keep reading it

        await asyncio.to_thread(pg_cluster.start)
        await node.wait_ready(timeout=30)
        await wait_until(
            lambda: "store_unavailable" in webhook.conditions("resolved"),
            timeout=15,
            what="the resolution",
            fleet=fleet,
        )
        code, body = await node.api_token(account)
        assert code == 200, body
        assert (await node.status())["fleet"]["store_up"] is True
        assert webhook.conditions("firing").count("store_unavailable") == 1


@pytest.mark.slow(seconds=25)
async def test_a_waiting_node_at_the_default_heartbeat_retries_at_the_pace_of_its_tokens(
    tmp_path: Path, emulator: KakaoEmulator, pg_cluster: PgCluster
) -> None:
    """Only the required keys (heartbeat 60 s), 6-second tokens published: the node waits
    for its database with the store's back-off, which grows to one heartbeat fitted to the
    tokens it last published (0.75 s), not to the configured minute. After 12 s away the
    database starts, and the node runs within a small share of the lifetime; with the 60 s
    cap its next attempt lay up to 13 s ahead by then."""
    lifetime = 6.0
    emulator.settings.access_lifetime = lifetime
    fleet = Fleet(tmp_path / "fleet", emulator, pg_cluster, nodes=1, only_required=True)
    async with running_fleet(fleet):
        node = await published_then_database_down(fleet, pg_cluster)
        with NotifyReceiver() as notify:
            process = await start_waiting(node, notify)
            await notify.wait_for_line("READY=1", process)
            away = time.monotonic() + 12.0
            while time.monotonic() < away:  # systemd reads what the node sends meanwhile
                notify.drain()
                await asyncio.sleep(0.2)
            await asyncio.to_thread(pg_cluster.start)
            back = time.monotonic()
            await node.wait_ready(timeout=30)
        took = time.monotonic() - back
        print(f"running {took:.2f}s after the database started")
        assert took < lifetime / 3, process.log_text()[-3000:]


async def test_a_node_whose_database_never_returns_refreshes_nothing_and_stops_cleanly(
    tmp_path: Path, emulator: KakaoEmulator, pg_cluster: PgCluster
) -> None:
    """Waiting past the access token's expiry: no call to Kakao's token endpoint (no refresh
    without the row lock), the published file untouched; SIGTERM ends it with exit 0."""
    emulator.settings.access_lifetime = 4
    fleet = Fleet(tmp_path / "fleet", emulator, pg_cluster, nodes=1)
    async with running_fleet(fleet):
        node = await published_then_database_down(fleet, pg_cluster)
        account = fleet.accounts[0]
        before = node.token_file(account)
        calls = emulator.stats.requests["token"]
        with NotifyReceiver() as notify:
            process = await start_waiting(node, notify)
            await notify.wait_for_line("READY=1", process)
        await asyncio.sleep(5)  # past the access token's expiry (4 s)
        assert process.proc.returncode is None
        assert emulator.stats.requests["token"] == calls
        assert node.token_file(account) == before
        assert await node.stop() == 0
        assert "stopped while waiting for the PostgreSQL store" in process.log_text()


async def test_a_database_that_refuses_the_node_is_a_mistake_exit_78_at_once(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """The server answers "FATAL: database … does not exist" (as for a wrong user or
    password): nothing to wait for; `run` exits 78 (EX_CONFIG: systemd does not restart
    it) with one line that names the DSN, no traceback."""
    params = conninfo_to_dict(pg_server.admin_dsn)
    params["dbname"] = "no_such_database"
    dsn = make_conninfo(**params)  # type: ignore[arg-type]
    config = write_store_config(tmp_path, dsn)
    code, _, err = await run_cli(config, "run")
    assert code == 78, err
    assert "cannot start: cannot connect to the PostgreSQL store" in err and "FATAL" in err
    assert "user, password and dbname" in err
    assert "Traceback" not in err and WAITING not in err


async def test_a_wrong_key_exits_at_once_even_while_the_database_is_down(
    tmp_path: Path,
) -> None:
    """A key file that does not parse is the operator's to fix: exit 78 before any wait."""
    config = write_store_config(tmp_path, f"host=127.0.0.1 port={free_port()} dbname=x")
    (tmp_path / "store.key").write_text("not a key line\n")
    code, _, err = await asyncio.wait_for(run_cli(config, "run"), 30)
    assert code == 78, err
    assert "Traceback" not in err and WAITING not in err


async def test_a_store_moved_while_the_node_waited_still_refuses_it_with_exit_78(
    tmp_path: Path, emulator: KakaoEmulator, pg_cluster: PgCluster
) -> None:
    """The database comes back marked moved (`store migrate --to file` ran meanwhile): the
    waiting node refuses to run exactly as at an ordinary start, exit 78 and the same line."""
    fleet = Fleet(tmp_path / "fleet", emulator, pg_cluster, nodes=1, proxied=True)
    async with running_fleet(fleet):
        node = await published_then_database_down(fleet, pg_cluster)
        assert node.proxy is not None
        with NotifyReceiver() as notify:
            process = await start_waiting(node, notify)
            await notify.wait_for_line("READY=1", process)
        node.proxy.refuse()  # the database is back, but not for this node yet
        await asyncio.to_thread(pg_cluster.start)
        async with await psycopg.AsyncConnection.connect(fleet.dsn, autocommit=True) as conn:
            await conn.execute(
                "UPDATE store_meta SET moved_to = 'file', moved_at = now(), moved_by = 'test',"
                " moved_note = 'files on another host', moved_pending = false"
            )
        node.proxy.accept()
        code = await asyncio.wait_for(process.proc.wait(), 30)
        log = process.log_text()
        assert code == 78, log[-3000:]
        assert "cannot start: the accounts of PostgreSQL store" in log
        assert "by `kakao-tokend store migrate --to file`" in log
        assert READY_LINE not in log and "Traceback" not in log


async def test_a_stop_while_an_attempt_hangs_ends_the_waiting_node_at_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """SIGTERM while an attempt to open the store hangs (the path swallows packets: libpq
    would wait its connect_timeout, 10 s): the attempt is abandoned and the node exits 0 at
    once, well inside the unit's stop timeout."""
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    with TcpProxy("127.0.0.1", port) as proxy:
        proxy.refuse()
        config = write_store_config(tmp_path, proxy.dsn(pg_dsn))
        process = await start_daemon(config, wait_ready=False)
        await process.wait_log(WAITING, timeout=20)
        proxy.pause()
        proxy.accept()
        await process.wait_for(lambda: proxy.accepted > 0, timeout=20, what="a hanging attempt")
        started = time.monotonic()
        assert await process.stop(timeout=15) == 0
        assert time.monotonic() - started < 5, process.log_text()[-2000:]
        assert "stopped while waiting for the PostgreSQL store" in process.log_text()


async def test_a_stop_while_the_migration_waits_on_a_silent_database_ends_the_node_at_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """SIGTERM while an attempt to open the store is inside its schema migration (waiting for
    the advisory lock another node holds) and the path went silent: the attempt is abandoned
    by ending its connection, not by a cancel into psycopg, whose cancel request waits on the
    silent path (5 s, then 5 s for the query): exit 0 at once."""
    port = int(str(conninfo_to_dict(pg_dsn)["port"]))
    holder = await psycopg.AsyncConnection.connect(pg_dsn)  # another node, migrating
    async with holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        with TcpProxy("127.0.0.1", port) as proxy:
            proxy.refuse()
            config = write_store_config(tmp_path, proxy.dsn(pg_dsn))
            process = await start_daemon(config, wait_ready=False)
            await process.wait_log(WAITING, timeout=20)
            proxy.accept()
            await until_migration_waits_for_its_lock(pg_dsn)
            proxy.pause()
            started = time.monotonic()
            assert await process.stop(timeout=15) == 0
            assert time.monotonic() - started < 5, process.log_text()[-2000:]
            assert "stopped while waiting for the PostgreSQL store" in process.log_text()


async def test_a_server_out_of_connection_slots_is_an_outage_waited_out(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """ "FATAL: sorry, too many clients already" is the server answering, but an outage, not
    a mistake: the node reports READY and waits (no exit 78), and starts once slots free up."""
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_connections = 4")
        conn.execute("ALTER SYSTEM SET superuser_reserved_connections = 0")
    await asyncio.to_thread(pg_cluster.restart)
    hogs = [psycopg.connect(pg_cluster.dsn(), autocommit=True) for _ in range(4)]
    try:
        config = write_store_config(tmp_path, pg_cluster.dsn())
        with NotifyReceiver() as notify:
            process = await start_daemon(config, wait_ready=False, env=notify.env)
            await notify.wait_for_line("READY=1", process)
        assert "too many clients already" in process.log_text()
        assert WAITING in process.log_text()
    finally:
        for hog in hogs:
            hog.close()
    await process.wait_log(READY_LINE, timeout=30)
    assert await process.stop() == 0
