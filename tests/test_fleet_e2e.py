"""Fleet mode end to end: real `kakao-tokend run` nodes, one real PostgreSQL, the emulator.

Every test starts its own cluster (so it may restart it), two or three nodes and the Kakao
emulator with lifetimes of seconds, disrupts the fleet the way production would (kill -9,
SIGSTOP, a database restart, a cut network, a simultaneous start, an import on one node),
and asks the referees: the emulator (which refresh tokens are live, how many token calls
each account caused) and the database (what was committed, by which node).

Every refresh rotates the refresh token here (the rotation window is the refresh token's
whole life), so any second refresher, or any rotation that was not committed, shows up as a
refresh token the emulator no longer accepts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemonproc import run_cli
from fleetnodes import (
    Fleet,
    FleetFactory,
    FleetNode,
    FleetTimings,
    due_now,
    fleets,
    wait_until,
    write_seed_file,
)
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.fleet.accounts import AccountRow
from kakao_tokend.fleet.turns import first_claimant
from kakao_tokend.tokens import parse_time
from pgcluster import PgCluster

pytestmark = [pytest.mark.slow(seconds=8), pytest.mark.timeout(150)]

#: Kakao's own refresh lifetime (about 60 days), so no refresh-expiry alert fires; the rotation
#: window is as long, so every refresh rotates.
REFRESH_LIFETIME = 5183999.0


@pytest.fixture
async def make_fleet(
    tmp_path: Path, emulator: KakaoEmulator, pg_cluster: PgCluster
) -> AsyncIterator[FleetFactory]:
    """Build fleets on this test's cluster and emulator; every node is stopped afterwards."""
    async with fleets(tmp_path, emulator, pg_cluster, refresh_lifetime=REFRESH_LIFETIME) as make:
        yield make


async def all_refreshed(fleet: Fleet, *, since: float = 0.0, times: int = 1) -> bool:
    """True when every account got a new token from Kakao at least ``times`` times."""
    done = fleet.successful_refreshes(since=since)
    return all(done[name] >= times for name in fleet.accounts)


async def refreshed_once(make_fleet: FleetFactory, **options: Any) -> Fleet:
    """Make a fleet (``options`` as make_fleet's), seed it, start every node and wait until
    each account was refreshed once: the first round, which a node that started first races
    before it has seen the others' rows."""
    fleet = await make_fleet(**options)
    await fleet.seed()
    await fleet.start()
    await wait_until(lambda: all_refreshed(fleet), timeout=20, what="first refreshes", fleet=fleet)
    return fleet


def fresh_everywhere(fleet: Fleet, nodes: list[FleetNode]) -> bool:
    """True when every account's token file on every node in ``nodes`` is valid now."""
    return all(not fleet.expired_published(node) for node in nodes)


async def test_nodes_started_at_the_same_instant_refresh_each_account_exactly_once(
    make_fleet: FleetFactory,
) -> None:
    """Three nodes start together with every account due: each account gets one Kakao call.

    SKIP LOCKED hands each due row to one node; a second refresher would show up as a second
    token call for that account (and, since every refresh rotates, as a dead refresh token).
    """
    fleet = await make_fleet(access_lifetime=60.0, nodes=3, accounts=9)
    await fleet.seed(due=due_now)
    await fleet.start()
    await wait_until(
        lambda: all_refreshed(fleet), timeout=20, what="every account refreshed", fleet=fleet
    )
    await asyncio.sleep(1.0)  # a second refresher would have called by now
    calls = fleet.token_calls()
    assert calls == dict.fromkeys(fleet.accounts, 1), calls
    assert fleet.emulator.stats.retired_refresh_presented == 0
    assert await fleet.lost_refresh_tokens() == []
    rows = await fleet.rows()
    assert {row.refreshed_by for row in rows.values()} <= {node.name for node in fleet.nodes}
    await wait_until(
        lambda: fresh_everywhere(fleet, fleet.nodes),
        timeout=3,
        what="every node publishing every account",
        fleet=fleet,
    )
    for node in fleet.nodes:
        for name, row in rows.items():
            document = node.token_file(name)
            assert document is not None
            assert document["access_token"] == row.state.tokens.access_token, (node.name, name)


@pytest.mark.slow(seconds=14)
async def test_each_account_is_refreshed_by_its_first_claimant_so_the_nodes_share_evenly(
    make_fleet: FleetFactory,
) -> None:
    """Three healthy nodes: nearly every refresh is made by the account's first claimant.

    Without the rule (fleet/turns.py) whichever node's timer fired first took the account,
    and under uneven load one node made 46 % of the refreshes. With it each node is first for
    about a third of the accounts and the others wait a share of the lifetime, so the
    refreshes follow the hash, not the load.
    """
    # 10 s tokens: the others' wait is 2 % of the lifetime, 0.2 s. With 5 s tokens (0.1 s) a
    # first claimant lagging more than that under the full suite's load lost 33 of 60.
    fleet = await refreshed_once(make_fleet, access_lifetime=10.0, nodes=3, accounts=30)
    warmed = len(await fleet.rotation_log())
    since = fleet.emulator.now()
    await wait_until(
        lambda: all_refreshed(fleet, since=since, times=2),
        timeout=45,
        what="every account refreshed twice more",
        fleet=fleet,
    )

    # Kakao counts a refresh when it answers, the store's log when the node commits: a moment
    # later, longer on a loaded machine. A refresh never committed still times this out.
    async def committed() -> bool:
        return len(await fleet.rotation_log()) - warmed >= 2 * len(fleet.accounts)

    await wait_until(committed, timeout=5, what="those refreshes committed", fleet=fleet)
    names = [node.name for node in fleet.nodes]
    log = (await fleet.rotation_log())[warmed:]
    by_first = sum(1 for account, node in log if node == first_claimant(account, names))
    assert len(log) >= 2 * len(fleet.accounts)
    # Without the rule about a third (34 % measured; 16 of one round of 30 once, so two
    # rounds); with it 90 %+ on a quiet machine. On a machine so loaded that the first
    # claimant lags more than the others' wait, they take over by design (74 % seen under a
    # load of 6 on 2 cores). 60 % still tells the rule from chance.
    assert by_first >= 0.6 * len(log), (by_first, len(log), Counter(node for _, node in log))
    assert await fleet.lost_refresh_tokens() == []


async def test_killing_the_node_that_holds_the_row_lock_mid_refresh_loses_no_refresh_token(
    make_fleet: FleetFactory,
) -> None:
    """kill -9 the node waiting on Kakao with the row locked: the other node refreshes.

    The emulator holds the first token request until the survivor has refreshed; the node that
    sent it holds the row lock meanwhile and is killed. Its session ends, the lock goes, the
    other node claims the account and refreshes it. Only then does Kakao process the killed
    node's request (the worst order: it arrived, so Kakao will answer it): it presents a refresh
    token that was rotated meanwhile and changes nothing, so the stored token stays live.
    (Holding it for a fixed 5 s instead made this a race that a loaded CI machine lost: Kakao
    rotated for a dead node before the survivor's turn, which is the inherent lost-response
    case, not what this test is about.)
    """
    fleet = await make_fleet(access_lifetime=30.0, nodes=2, accounts=1)
    (account,) = fleet.accounts
    await fleet.seed(due=due_now)
    fleet.emulator.inject("token", "hold", count=1, delay=120.0)
    await fleet.start()
    holders: list[str] = []

    async def someone_holds_the_lock() -> bool:
        holders[:] = await fleet.lock_holders(longer_than=0.3)
        return bool(holders)

    await wait_until(
        someone_holds_the_lock, timeout=15, what="a node holding the row lock", fleet=fleet
    )
    assert len(holders) == 1, holders
    assert fleet.emulator.held_requests == 1
    victim = fleet.node(holders[0])
    survivor = next(node for node in fleet.nodes if node is not victim)
    await victim.kill()

    async def committed() -> bool:
        # Kakao's answer comes before the commit: wait for the row, not the emulator's log.
        return (await fleet.rows())[account].generation > 1

    await wait_until(committed, timeout=15, what="the survivor's refresh committed", fleet=fleet)
    assert await all_refreshed(fleet)
    rows = await fleet.rows()
    assert rows[account].refreshed_by == survivor.name
    assert rows[account].generation == 2
    # Kakao now processes the killed node's request: KOE322 for its rotated-out refresh token
    # (its client is gone, so nobody reads the answer). It must not cost the stored token.
    retired_before = fleet.emulator.stats.retired_refresh_presented
    fleet.emulator.release_held()

    async def held_request_answered() -> bool:
        return fleet.emulator.held_requests == 0

    await wait_until(held_request_answered, timeout=5, what="Kakao answers the held request")
    assert fleet.emulator.stats.retired_refresh_presented == retired_before + 1
    assert await fleet.lost_refresh_tokens() == []
    assert fleet.emulator.refresh_token_status(rows[account].state.tokens.refresh_token) == "live"
    await wait_until(
        lambda: fresh_everywhere(fleet, [survivor]), timeout=3, what="survivor publishes"
    )


@pytest.mark.slow(seconds=17)
async def test_a_node_paused_longer_than_the_access_lifetime_neither_stalls_nor_loses_anything(
    make_fleet: FleetFactory,
) -> None:
    """SIGSTOP one of three nodes for twice the access lifetime.

    The other two keep every account fresh meanwhile (the paused node held no row lock: a
    node paused while holding one is the idle-in-transaction case, docs/fleet.md §6). Once
    continued, the paused node publishes current tokens within a few heartbeats and has
    overwritten nothing.
    """
    lifetime = 6.0
    fleet = await refreshed_once(make_fleet, access_lifetime=lifetime, nodes=3, accounts=3)
    sleeper = fleet.nodes[0]
    others = fleet.nodes[1:]
    await fleet.pause_holding_no_row_lock(sleeper)
    paused_at = fleet.emulator.now()
    stale: list[tuple[str, list[str]]] = []
    deadline = time.monotonic() + 2 * lifetime
    while time.monotonic() < deadline:
        for node in others:
            expired = fleet.expired_published(node)
            if expired:
                stale.append((node.name, expired))
        fleet.check_alive()
        await asyncio.sleep(0.1)
    assert stale == [], f"{stale[:5]}\n{fleet.logs()}"
    assert await all_refreshed(fleet, since=paused_at, times=2)
    sleeper.resume()
    await wait_until(
        lambda: fresh_everywhere(fleet, fleet.nodes),
        timeout=3,
        what="the woken node publishing current tokens",
        fleet=fleet,
    )
    assert await fleet.lost_refresh_tokens() == []
    assert fleet.emulator.stats.retired_refresh_presented == 0


async def fleet_counters(node: FleetNode) -> dict[str, Any]:
    """Return the ``fleet`` block of the node's /v1/status (its store counters)."""
    return dict((await node.status())["fleet"])


@pytest.mark.slow(seconds=14)
async def test_a_node_continued_after_a_pause_rereads_what_changed_in_a_few_queries(
    make_fleet: FleetFactory,
) -> None:
    """A node paused while the others refreshed 24 accounts twice each catches up in bulk.

    Dozens of notifications wait for it when it is continued; it re-reads the changed rows
    with a few queries (one per batch of notifications, one per poll), not one per
    notification, which kept a woken node serving expired token files for seconds.
    """
    lifetime = 5.0
    fleet = await refreshed_once(make_fleet, access_lifetime=lifetime, nodes=2, accounts=24)
    sleeper = fleet.nodes[0]
    before = await fleet_counters(sleeper)
    await fleet.pause_holding_no_row_lock(sleeper)
    paused_at = fleet.emulator.now()
    await wait_until(
        lambda: all_refreshed(fleet, since=paused_at, times=2),
        timeout=6 * lifetime,
        what="the other node refreshing every account twice",
        fleet=fleet,
    )
    sleeper.resume()
    await wait_until(
        lambda: fresh_everywhere(fleet, [sleeper]),
        timeout=5,
        what="the woken node publishing current tokens",
        fleet=fleet,
    )
    after: dict[str, Any] = {}

    async def heard_every_refresh() -> bool:
        after.update(await fleet_counters(sleeper))
        return bool(after["notifications"] - before["notifications"] >= 2 * len(fleet.accounts))

    await wait_until(heard_every_refresh, timeout=10, what="the queued notifications", fleet=fleet)
    heard = after["notifications"] - before["notifications"]
    reads = after["row_reads"] - before["row_reads"]
    # The backlog (two refreshes of every account) is read in a few queries. The other node
    # keeps refreshing meanwhile: what it commits after the backlog arrives one notification
    # at a time, each read on its own, and on a loaded machine the sleeper takes seconds to
    # hear the backlog (25 reads were seen in a full suite run). Those are allowed.
    backlog = 2 * len(fleet.accounts)
    assert reads <= len(fleet.accounts) // 3 + (heard - backlog), (heard, reads)
    assert await fleet.lost_refresh_tokens() == []


def published_before(node: FleetNode, committed: dict[str, datetime]) -> list[str]:
    """Return the accounts whose token file on ``node`` holds an access token older than the
    one ``committed`` names (by its expiry, to the second, as the file writes it)."""
    older = []
    for name, expires in committed.items():
        document = node.token_file(name)
        if document is None or parse_time(str(document["expires_at"])) < expires:
            older.append(name)
    return older


HELD_FOR_NOTHING = re.compile(
    r"account '(?P<name>[^']+)': held its row and had nothing to write \(generation (?P<gen>\d+)\)"
)


def held_generation(line: str) -> tuple[str, int] | None:
    """Return (account, generation) from a node's "held its row and had nothing to write"
    line: the generation the row had when the node found nothing to do."""
    found = HELD_FOR_NOTHING.search(line)
    return None if found is None else (found["name"], int(found["gen"]))


def expiries(rows: dict[str, AccountRow]) -> dict[str, datetime]:
    """Return each row's access token expiry, to the second (as token files write it)."""
    return {
        name: row.state.tokens.access_expires_at.replace(microsecond=0)
        for name, row in rows.items()
    }


#: The continued node's database path is this slow each way (TcpProxy.latency): a round trip
#: costs twice that, as a database far away or a machine busy with other work make it.
SLOW_PATH = 0.1


@pytest.mark.slow(seconds=18)
async def test_a_node_continued_after_a_pause_catches_up_before_it_claims_anything(
    make_fleet: FleetFactory,
) -> None:
    """A node paused while the other refreshed all of its 48 accounts (6 times its pool's
    connections) and each token it published expired, is continued on a slow database path.

    Every account it had planned is overdue by then. It used to claim them first, ten at a
    time, each claim a pooled connection and a few round trips under the row lock to learn
    that the other node had refreshed the row, while the one poll that re-reads every changed
    row waited behind them: its token files lagged the store by about 4 s here (and the
    45-second fleet soak, on a loaded machine, counted expired reads after its one-second
    grace). It must catch up with the store before it claims: no row locked for nothing
    (counted by the node: `idle_holds`), whatever the machine's load; how long the files lag
    is measured, not bounded here (1.2 s quiet, 4.7 s seen in a full suite run on 2 cores;
    docs/fleet.md §8).
    """
    lifetime = 6.0
    fleet = await refreshed_once(
        make_fleet, access_lifetime=lifetime, nodes=2, accounts=48, proxied=True
    )
    sleeper = fleet.nodes[0]
    assert sleeper.proxy is not None
    # The first round's claims end on the sleeper too (all 48 accounts came due at once, and
    # a loaded machine runs its claims late): what it counts from here on is the pause's.
    first_round = await fleet.rows()
    await wait_until(
        lambda: not published_before(sleeper, expiries(first_round)),
        timeout=2 * lifetime,
        what="the sleeper publishing the first round",
        fleet=fleet,
    )
    counted_from = datetime.now(UTC)
    before = await fleet_counters(sleeper)
    await fleet.pause_holding_no_row_lock(sleeper)
    sleeper.proxy.latency = SLOW_PATH  # from now on: pausing waits for no slow claim to end
    paused_at = fleet.emulator.now()
    await wait_until(
        lambda: (
            len(fleet.expired_published(sleeper)) == len(fleet.accounts)
            and all_refreshed(fleet, since=paused_at)
        ),
        timeout=4 * lifetime,
        what="every token file on the paused node expired, every account refreshed",
        fleet=fleet,
    )
    # What it must catch up with: every row as committed before it runs again (the other
    # node goes on refreshing meanwhile; those later commits reach it as notifications).
    committed_rows = await fleet.rows()
    committed = expiries(committed_rows)
    sleeper.resume()
    continued = time.monotonic()
    continued_at = datetime.now(UTC).strftime("%H:%M:%S.%f")  # to read the holds' log times by
    while behind := published_before(sleeper, committed):
        fleet.check_alive()
        assert time.monotonic() - continued < 2 * lifetime, (behind, fleet.logs())
        await asyncio.sleep(0.01)
    # Row locks that found the row current already: 10 of the 48 overdue accounts before
    # (claimed until the poll caught up; 23 of 144), none since; a race or two is allowed.
    # The pause's are those that found the generation committed while it slept: a hold that
    # found a later one raced the other node's next refresh, which the node's own plan made
    # due as well (five at once in a CI run, on the slow path, a few seconds after the
    # continue); the counter counts both, the log line names the generation.
    idle_holds = (await fleet_counters(sleeper))["idle_holds"] - before["idle_holds"]
    since = (counted_from - timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S")
    lines = [line for line in sleeper.log_text().splitlines() if line[:19] >= since]
    holds = [line for line in lines if "had nothing to write" in line]
    generations = {name: row.state.generation for name, row in committed_rows.items()}
    pause_holds = [
        line
        for line in holds
        if (held := held_generation(line)) is not None and generations.get(held[0]) == held[1]
    ]
    # The sleeper's whole log since the holds are counted (claims, re-reads, adoptions: which
    # came first, before the pause and after the SIGCONT), not the tail fleet.logs() keeps. A
    # string, not a tuple: pytest shortens a tuple's repr and cut the node logs before.
    assert len(pause_holds) <= 4, "\n".join(
        [
            f"{len(pause_holds)} holds found the generation committed during the pause"
            f" ({idle_holds} idle holds in all); continued at {continued_at}; holds logged"
            " from a second before the count:",
            *holds,
            "===== the sleeper's log from the second before counting",
            *lines,
        ]
    )
    # Every counted hold is in the log, and each line names its generation: a changed log
    # line cannot make the count above zero by itself.
    assert len(holds) >= idle_holds, (idle_holds, holds)
    assert all(held_generation(line) is not None for line in holds), holds
    assert await fleet.lost_refresh_tokens() == []
    assert fleet.emulator.stats.retired_refresh_presented == 0


@pytest.mark.slow(seconds=33)
async def test_a_postgres_restart_during_refreshes_loses_no_refresh_token(
    make_fleet: FleetFactory,
) -> None:
    """Stop PostgreSQL three times (fast, immediate, fast) while a refresh waits on Kakao.

    Kakao's answer, a rotated refresh token, arrives while the database is down, so the
    refresh cannot commit: the node keeps the rotated token (memory, rescue file) and commits
    it once the database is back. The nodes survive and reconnect; every account is refreshed
    again afterwards with its refresh token still live, and no rescue file is left.
    """
    lifetime = 6.0
    fleet = await refreshed_once(make_fleet, access_lifetime=lifetime, nodes=2, accounts=4)
    emulator = fleet.emulator
    outages: list[tuple[float, float]] = []
    for mode in ("fast", "immediate", "fast"):
        # Kakao answers the next refreshes after 0.5 s; the database goes down (for 1 s)
        # while one of them waits, so Kakao's answer (a rotation) arrives with no database.
        emulator.inject("token", "slow", count=2, delay=0.5)
        await wait_until(
            lambda: fleet.lock_holders(longer_than=0.1),
            timeout=10,
            what="a refresh in flight",
            fleet=fleet,
        )
        down = emulator.now()
        # In a thread: the emulator answers on this loop meanwhile.
        await asyncio.to_thread(fleet.cluster.stop, mode)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fleet.cluster.start)
        outages.append((down, emulator.now()))
        fleet.check_alive()
        await asyncio.sleep(lifetime / 2)
    rotated_while_down = [
        attempt
        for attempt in emulator.stats.refresh_log
        if attempt.outcome == "rotated" and any(a <= attempt.at <= b for a, b in outages)
    ]
    assert rotated_while_down, "no rotation was answered while the database was down"
    back = fleet.emulator.now()
    await wait_until(
        lambda: all_refreshed(fleet, since=back, times=2),
        timeout=20,
        what="every account refreshed twice after the restarts",
        fleet=fleet,
    )
    assert await fleet.lost_refresh_tokens() == []
    await wait_until(
        lambda: fresh_everywhere(fleet, fleet.nodes), timeout=3, what="fresh files", fleet=fleet
    )
    for node in fleet.nodes:  # every rotation that waited for the database got committed
        assert not list((node.state_dir / "rescue").glob("*")), f"{node.name}: rescue file left"


@pytest.mark.slow(seconds=19)
async def test_a_node_cut_off_from_the_database_is_covered_by_the_others_and_catches_up(
    make_fleet: FleetFactory,
) -> None:
    """Cut one node's database connections (reset, then refused) for two lifetimes, at a
    moment it holds no row lock.

    The others refresh every account meanwhile; the cut-off node raises store_unavailable
    and refreshes nothing. When the network returns it reconnects and publishes the current
    tokens. (Cut between Kakao's answer and its commit, as the first round's last refresh
    sometimes was under load, its rotation waits in its rescue file until it reconnects,
    and the others cannot refresh that account meanwhile: the lost-response case of
    docs/fleet.md §11, which asks for a login once the peers' grace ran out.)
    """
    lifetime = 6.0
    fleet = await refreshed_once(
        make_fleet, access_lifetime=lifetime, nodes=3, accounts=3, proxied=True
    )
    island = fleet.nodes[0]
    assert island.proxy is not None
    await fleet.pause_holding_no_row_lock(island)  # stopped: it takes none before the cut
    island.proxy.refuse()
    island.proxy.cut()
    island.resume()
    cut_at = fleet.emulator.now()
    await asyncio.sleep(2 * lifetime)
    fleet.check_alive()
    done = fleet.successful_refreshes(since=cut_at)
    assert await all_refreshed(fleet, since=cut_at, times=2), (done, fleet.logs())
    rows = await fleet.rows()
    assert island.name not in {row.refreshed_by for row in rows.values()}
    for node in fleet.nodes[1:]:
        assert fleet.expired_published(node) == [], node.name
    assert "store_unavailable" in island.log_text(), "no store_unavailable alert on the node"
    island.proxy.accept()
    await wait_until(
        lambda: fresh_everywhere(fleet, [island]),
        timeout=10,
        what="the reconnected node publishing current tokens",
        fleet=fleet,
    )
    assert await fleet.lost_refresh_tokens() == []
    assert fleet.emulator.stats.retired_refresh_presented == 0


async def test_a_node_stopped_cleanly_hands_its_accounts_over_at_once(
    make_fleet: FleetFactory,
) -> None:
    """SIGTERM one of two nodes: it removes its ``nodes`` row, so the other becomes every
    account's first claimant at its next heartbeat and refreshes them all without a claim
    delay, instead of counting the stopped node as live for three more heartbeats."""
    fleet = await refreshed_once(make_fleet, access_lifetime=5.0, nodes=2, accounts=6)
    leaving, staying = fleet.nodes

    async def both_listed() -> bool:
        # A node writes its row after its first sync, which a loaded machine may delay past
        # READY (the start waits one database deadline at most).
        return await fleet.node_rows() == sorted([leaving.name, staying.name])

    await wait_until(both_listed, timeout=10, what="both nodes in the nodes table", fleet=fleet)
    assert await leaving.stop() == 0
    assert await fleet.node_rows() == [staying.name]
    since = fleet.emulator.now()
    await wait_until(
        lambda: all_refreshed(fleet, since=since),
        timeout=15,
        what="the staying node refreshing every account",
    )

    async def committed_by_staying() -> bool:
        # Kakao's answer comes before the commit: the last row may still be on its way.
        rows = await fleet.rows()
        return {row.refreshed_by for row in rows.values()} == {staying.name}

    await wait_until(
        committed_by_staying, timeout=5, what="every row committed by the staying node"
    )
    assert await fleet.lost_refresh_tokens() == []


async def test_an_import_on_one_node_reaches_every_node_within_a_second(
    make_fleet: FleetFactory, tmp_path: Path
) -> None:
    """`kakao-tokend import` on node-1 while all three serve: every token file follows at once.

    The heartbeat (the polling backstop) is 30 s here, so only LISTEN/NOTIFY can bring the
    change to the other nodes within the second the issue asks for.
    """
    fleet = await make_fleet(
        access_lifetime=600.0, nodes=3, accounts=1, timings=FleetTimings(heartbeat="30s")
    )
    (account,) = fleet.accounts
    await fleet.seed()
    await fleet.start()
    before = (await fleet.rows())[account]
    body = fleet.emulator.issue_tokens(fleet.users[account])
    seed = write_seed_file(tmp_path / "kakao_token.json", body)
    code, out, err = await run_cli(
        fleet.nodes[0].config_path, "--account", account, "import", str(seed), "--force"
    )
    assert code == 0, out + err
    imported_at = time.monotonic()
    row = (await fleet.rows())[account]
    # The import may verify the tokens with one refresh (which rotates here): the store then
    # holds that refresh's answer. Either way, a new generation whose refresh token is live.
    assert row.generation > before.generation, "`kakao-tokend import` did not reach the store"
    assert fleet.emulator.refresh_token_status(row.state.tokens.refresh_token) == "live"
    assert row.state.tokens.refresh_token != before.state.tokens.refresh_token
    imported = row.state.tokens.access_token

    def everywhere() -> bool:
        return all(
            (node.token_file(account) or {}).get("access_token") == imported for node in fleet.nodes
        )

    await wait_until(everywhere, timeout=10, what="every node publishing the import", fleet=fleet)
    took = time.monotonic() - imported_at
    assert took < 1.5, f"the import reached every node's token file after {took:.2f}s"
    for node in fleet.nodes:
        status, answer = await node.api_token(account)
        assert status == 200 and answer["access_token"] == imported, node.name
