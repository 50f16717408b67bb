"""Fleet mode under the DEFAULT configuration: real nodes that set only the required keys.

tests/test_fleet_e2e.py runs its nodes with hand-tuned timings (a 0.2 s heartbeat, a 2 s
Kakao timeout), which hides any rule that is absolute at its default (a 60 s heartbeat, a
90 s idle-in-transaction backstop). Here every timing is the default, the emulator's access
tokens live 6 seconds, and a watcher samples every node's published token and the store's
rows: each commit must reach every node within about a second (LISTEN/NOTIFY), and no node
may publish an expired token beyond what the disruption itself explains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemonproc import run_cli
from fleetnodes import (
    Fleet,
    FleetFactory,
    FleetNode,
    due_now,
    fleets,
    wait_until,
    write_seed_file,
)
from kakao_tokend.emulator import KakaoEmulator
from pgcluster import PgCluster

pytestmark = [pytest.mark.slow(seconds=20), pytest.mark.timeout(150)]


#: Every refresh rotates (the rotation window is the refresh token's whole life, Kakao's
#: default 30 days, which the nodes' default rotation_window agrees with).
REFRESH_LIFETIME = 30 * 86400.0
#: How long a commit may take to reach every node's token file (the issue's second).
PUBLISH_LAG = 1.0


@pytest.fixture
async def make_fleet(
    tmp_path: Path, emulator: KakaoEmulator, pg_cluster: PgCluster
) -> AsyncIterator[FleetFactory]:
    """Build fleets whose nodes set only the required keys; every node is stopped after."""
    async with fleets(
        tmp_path, emulator, pg_cluster, refresh_lifetime=REFRESH_LIFETIME, only_required=True
    ) as make:
        yield make


@dataclass
class Watch:
    """Samples the store and every node's token files: publish lags and expired tokens."""

    fleet: Fleet
    #: The nodes expected to serve (a killed or paused node is taken out by the test).
    serving: set[str] = field(default_factory=set)
    #: access token -> when the watcher first saw it committed (monotonic).
    committed: dict[str, float] = field(default_factory=dict)
    #: (node, access token) -> when the node's file first held it.
    published: dict[tuple[str, str], float] = field(default_factory=dict)
    #: (node, account, monotonic time) for every sample of a serving node with an expired token.
    expired: list[tuple[str, str, float]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.serving = {node.name for node in self.fleet.nodes}
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            try:
                rows = await self.fleet.rows()
            except Exception:  # the database is down: only the files are sampled
                rows = {}
            for row in rows.values():
                self.committed.setdefault(row.state.tokens.access_token, now)
            for node in self.fleet.nodes:
                if node.name not in self.serving:
                    continue
                for account in self.fleet.accounts:
                    document = node.token_file(account)
                    if document is not None:
                        self.published.setdefault((node.name, document["access_token"]), now)
                for account in self.fleet.expired_published(node, now=datetime.now(UTC)):
                    self.expired.append((node.name, account, now))
            await asyncio.sleep(0.1)

    def lags(self, since: float = 0.0, nodes: set[str] | None = None) -> dict[str, float]:
        """Return token -> seconds from its commit until the last of ``nodes`` (default: the
        serving ones) published it (a token one of them never published: infinite)."""
        names = self.serving if nodes is None else nodes
        found = {}
        for token, at in self.committed.items():
            if at < since:
                continue
            times = [self.published.get((name, token)) for name in names]
            found[token[:6]] = max((t - at if t is not None else float("inf")) for t in times)
        return found

    def committed_at(self, prefix: str) -> float:
        """Return when the token starting with ``prefix`` (a key of :meth:`lags`) was seen."""
        return next(at for token, at in self.committed.items() if token.startswith(prefix))

    def expired_after(self, since: float) -> list[tuple[str, str, float]]:
        return [entry for entry in self.expired if entry[2] >= since]


async def started(make_fleet: FleetFactory, **options: int | float) -> tuple[Fleet, Watch]:
    fleet = await make_fleet(**options)  # type: ignore[arg-type]
    await fleet.seed(due=due_now)
    await fleet.start()
    watch = Watch(fleet)
    watch.start()
    return fleet, watch


async def one_node_holding_the_lock(
    make_fleet: FleetFactory, lifetime: float, *, longer_than: float, **options: int | bool
) -> tuple[Fleet, FleetNode, int]:
    """Start a fleet with one account on `lifetime`-second tokens, make Kakao hold the next
    token request, and wait until a node holds the account's row lock over it. Return the
    fleet, that node and the generation it is refreshing: an earlier refresh (one a loaded
    machine can finish before the fault is armed) must not count as a failover."""
    fleet = await make_fleet(access_lifetime=lifetime, accounts=1, **options)  # type: ignore[arg-type]
    (account,) = fleet.accounts
    await fleet.seed(first_lifetime=lifetime)
    await fleet.start()
    fleet.emulator.inject("token", "hold", count=1, delay=120.0)
    holders: list[str] = []

    async def someone_holds_the_lock() -> bool:
        holders[:] = await fleet.lock_holders(longer_than=longer_than)
        return bool(holders)

    await wait_until(
        someone_holds_the_lock, timeout=max(15.0, lifetime), what="a lock holder", fleet=fleet
    )
    return fleet, fleet.node(holders[0]), (await fleet.rows())[account].generation


def report(watch: Watch, since: float) -> str:
    lags = watch.lags(since)
    worst = max(lags.values(), default=0.0)
    return f"commits={len(lags)} worst_lag={worst:.2f}s expired_samples={len(watch.expired)}"


@pytest.mark.slow(seconds=30)
async def test_defaults_nodes_started_at_once_stay_fresh_and_a_paused_one_catches_up(
    make_fleet: FleetFactory,
) -> None:
    """Three default nodes started together with every account due, 6-second tokens: each
    commit reaches every node within a second, none publishes an expired token. One node is
    then stopped (holding no row lock) for two lifetimes: the other two stay fresh, and the
    woken one publishes current tokens within a second of its SIGCONT."""
    lifetime = 6.0
    fleet, watch = await started(make_fleet, access_lifetime=lifetime, nodes=3, accounts=3)
    begun = time.monotonic()
    await asyncio.sleep(1.5 * lifetime)
    sleeper = fleet.nodes[0]
    others = {node.name for node in fleet.nodes[1:]}
    await fleet.pause_holding_no_row_lock(sleeper)
    watch.serving.discard(sleeper.name)
    paused = time.monotonic()
    await asyncio.sleep(2 * lifetime)
    sleeper.resume()
    woke = await wait_until(
        lambda: not fleet.expired_published(sleeper),
        timeout=lifetime,
        what="the woken node publishing current tokens",
        fleet=fleet,
    )
    watch.serving.add(sleeper.name)
    await asyncio.sleep(lifetime)
    # The commits seen until now are judged, each after a full second of sampling: a watcher
    # stopped at once left a round committed in its last tenths "never published" (a full
    # run, 2026-12-03: all three accounts refreshed and adopted in the same second, the
    # watcher gone before its next sample of one file).
    judged_until = time.monotonic()
    await asyncio.sleep(PUBLISH_LAG)
    await watch.stop()
    fleet.check_alive()
    print(report(watch, begun), f"woken node current after {woke:.2f}s")
    # Every commit reached the two nodes that kept serving within the second.
    late = {
        t: lag
        for t, lag in watch.lags(begun + 1, others).items()
        if lag > PUBLISH_LAG and watch.committed_at(t) <= judged_until
    }
    assert late == {}, f"{report(watch, begun)} {late}\n{fleet.logs()}"
    # ... and the third node as well, before its pause and after its SIGCONT.
    woken = judged_until - lifetime
    for window in ((begun + 1, paused - PUBLISH_LAG), (woken, judged_until)):
        lags = {
            token: lag
            for token, lag in watch.lags(window[0], {sleeper.name}).items()
            if watch.committed_at(token) <= window[1]
        }
        assert all(lag <= PUBLISH_LAG for lag in lags.values()), (window, lags)
    assert woke < PUBLISH_LAG, f"the woken node was behind for {woke:.2f}s"
    assert watch.expired_after(begun + 2) == [], f"{watch.expired[:5]}\n{fleet.logs()}"
    assert await fleet.lost_refresh_tokens() == []
    assert fleet.emulator.stats.retired_refresh_presented == 0


@pytest.mark.slow(seconds=12)
async def test_defaults_kill_of_the_lock_holder_fails_over_in_a_share_of_the_lifetime(
    make_fleet: FleetFactory,
) -> None:
    """kill -9 the node that holds the row lock while Kakao holds its request."""
    lifetime = 6.0
    fleet, victim, held_at = await one_node_holding_the_lock(
        make_fleet, lifetime, longer_than=0.2, nodes=3
    )
    (account,) = fleet.accounts
    await victim.kill()

    async def committed() -> bool:
        return (await fleet.rows())[account].generation > held_at

    took = await wait_until(committed, timeout=lifetime * 3, what="failover", fleet=fleet)
    print(f"failover after kill -9: {took:.2f}s")
    assert took < lifetime / 4, f"failover took {took:.2f}s\n{fleet.logs()}"
    fleet.emulator.release_held()
    # A rotation whose commit a loaded machine delays past the default 2 s settle is not a
    # loss; a lost token stays dead however long one waits (fleetnodes.lost_refresh_tokens).
    lost = await fleet.lost_refresh_tokens(settle=lifetime)
    assert lost == [], f"{fleet.emulator.stats.refresh_log[-6:]}\n{fleet.logs()}"


@pytest.mark.slow(seconds=18)
@pytest.mark.parametrize("kakao_answers", ["before_the_sigcont", "never"])
async def test_defaults_pause_of_the_lock_holder_frees_the_row_in_a_share_of_the_lifetime(
    make_fleet: FleetFactory, kakao_answers: str
) -> None:
    """SIGSTOP the node that holds the row lock, for two lifetimes: another node refreshes.

    Kakao holds the stopped node's request (it arrived, but the answer would come too late:
    the order in which nothing is lost). The server ends the stopped node's transaction at the
    idle-in-transaction backstop, which at the default was 90 s: fifteen 6-second lifetimes.
    Fitted to the token, another node refreshes within a share of the lifetime.

    Woken, the node either meets Kakao's answer (a rotated-out token) or, when Kakao never
    answers, its own request timing out across the stop. Neither pages anyone: the node is
    behind the store (three heartbeats fitted to the token, not three configured minutes)
    and the others serve the new token; its timed-out call paged `access_expiring` before.
    """
    lifetime = 6.0
    fleet, sleeper, held_at = await one_node_holding_the_lock(
        make_fleet, lifetime, longer_than=0.1, nodes=3
    )
    (account,) = fleet.accounts
    sleeper.pause()

    async def committed() -> bool:
        return (await fleet.rows())[account].generation > held_at

    took = await wait_until(committed, timeout=4 * lifetime, what="a takeover", fleet=fleet)
    print(f"takeover from a stopped lock holder: {took:.2f}s")
    row = (await fleet.rows())[account]
    assert row.refreshed_by != sleeper.name
    assert took < lifetime / 2, f"the row was free after {took:.2f}s\n{fleet.logs()}"
    await asyncio.sleep(max(0.0, 2 * lifetime - took))
    if kakao_answers == "before_the_sigcont":
        fleet.emulator.release_held()  # Kakao answers the stopped node: a rotated-out token
    sleeper.resume()
    await wait_until(
        lambda: all(not fleet.expired_published(node) for node in fleet.nodes),
        timeout=3,
        what="every node, the woken one too, publishing a current token",
        fleet=fleet,
    )
    # Past the woken node's request timeout (at most 1/8 of the lifetime) and a few heartbeats.
    await asyncio.sleep(lifetime / 2)
    fleet.emulator.release_held()
    assert await fleet.lost_refresh_tokens(settle=3.0) == []
    # The status the woken node could not commit any more is nothing to page about (it was
    # a critical write_failed, "cannot save the new tokens", before): the other node has the
    # account; nor is its view from before the stop (access_expiring, relogin).
    assert critical_alerts(fleet) == [], fleet.logs()


@pytest.mark.slow(seconds=20)
async def test_defaults_a_rotation_waiting_for_the_database_is_waited_for_not_a_relogin(
    make_fleet: FleetFactory,
) -> None:
    """The lock holder's path to PostgreSQL is cut while Kakao rotates for it: its new tokens
    wait in its memory and rescue file. The other node claims the row and presents the
    retired refresh token (KOE322, the access token still accepted). A database blip is no
    reason to ask a person to log in: it waits for the successor as long as the fleet counts
    a silent node live (three heartbeats, fitted to the token: 4.5 s here), and once the
    path is back (after 2.2 s) both nodes serve the rescued rotation. The wait used to end at
    half the access token's remaining life (about 1.5 s here; for a 6-hour token never before
    the grace), and the node paged `relogin` ("needs a new login")."""
    lifetime = 12.0
    fleet, holder, held_at = await one_node_holding_the_lock(
        make_fleet, lifetime, longer_than=0.1, nodes=2, proxied=True
    )
    (account,) = fleet.accounts
    assert holder.proxy is not None
    holder.proxy.refuse()
    holder.proxy.cut()
    fleet.emulator.release_held()  # Kakao rotates for the holder, which cannot commit
    await wait_until(
        lambda: fleet.emulator.stats.retired_refresh_presented >= 1,
        timeout=lifetime,
        what="the other node presenting the retired refresh token",
        fleet=fleet,
    )
    refused = time.monotonic()
    await asyncio.sleep(2.2)
    holder.proxy.accept()

    async def rescued() -> bool:
        return (await fleet.rows())[account].generation > held_at

    await wait_until(rescued, timeout=lifetime, what="the rescued rotation committed", fleet=fleet)
    committed = time.monotonic() - refused
    await wait_until(
        lambda: all(not fleet.expired_published(node) for node in fleet.nodes),
        timeout=lifetime,
        what="every node publishing a current token",
        fleet=fleet,
    )
    print(f"rescue committed {committed:.2f}s after the first refusal")
    logs = fleet.logs()
    assert "needs a new login" not in logs, logs
    assert [line for line in critical_alerts(fleet) if explained_by(line, ("relogin",))] == []
    assert await fleet.lost_refresh_tokens(settle=3.0) == []


def critical_alerts(fleet: Fleet) -> list[str]:
    """Return every CRITICAL alert line the nodes logged."""
    return [line for line in fleet.logs().splitlines() if "alert critical" in line.lower()]


@pytest.mark.slow(seconds=25)
async def test_defaults_an_import_reaches_every_node_and_a_postgres_restart_loses_nothing(
    make_fleet: FleetFactory, tmp_path: Path
) -> None:
    """Two default nodes, 6-second tokens: `import` (a login's write) on one node reaches the
    other's token file within a second (the default heartbeat poll is 60 s: only NOTIFY can);
    then PostgreSQL restarts while a refresh waits on Kakao, and the fleet is fresh again
    within a share of the lifetime, nothing lost, no critical alert."""
    lifetime = 6.0
    fleet, watch = await started(make_fleet, access_lifetime=lifetime, nodes=2, accounts=2)
    await asyncio.sleep(lifetime)
    account = fleet.accounts[0]
    seed = write_seed_file(
        tmp_path / "kakao_token.json", fleet.emulator.issue_tokens(fleet.users[account])
    )
    code, out, err = await run_cli(
        fleet.nodes[0].config_path, "--account", account, "import", str(seed), "--force"
    )
    assert code == 0, out + err
    imported = (await fleet.rows())[account].state.tokens.access_token
    took = await wait_until(
        lambda: all(
            (node.token_file(account) or {}).get("access_token") == imported for node in fleet.nodes
        ),
        timeout=lifetime / 2,
        what="every node publishing the import",
        fleet=fleet,
    )
    print(f"import on every node after {took:.2f}s")
    assert took < PUBLISH_LAG + 0.5, f"the import reached every node after {took:.2f}s"

    fleet.emulator.inject("token", "slow", count=1, delay=0.5)
    await wait_until(
        lambda: fleet.lock_holders(longer_than=0.1),
        timeout=2 * lifetime,
        what="a refresh in flight",
        fleet=fleet,
    )
    await asyncio.to_thread(fleet.cluster.stop, "fast")
    await asyncio.sleep(1.0)
    await asyncio.to_thread(fleet.cluster.start)
    back = time.monotonic()
    since = fleet.emulator.now()
    await wait_until(
        lambda: all_refreshed(fleet, since),
        timeout=3 * lifetime,
        what="every account refreshed after the restart",
        fleet=fleet,
    )
    fresh = await wait_until(
        lambda: all(not fleet.expired_published(node) for node in fleet.nodes),
        timeout=lifetime,
        what="every node fresh after the restart",
        fleet=fleet,
    )
    recovered = time.monotonic() - back
    await asyncio.sleep(lifetime)
    await watch.stop()
    print(f"restart: every account refreshed and every node fresh {recovered:.2f}s after it")
    stale_until = max((at - back for _, _, at in watch.expired), default=0.0)
    print(report(watch, back), f"(fresh wait {fresh:.2f}s; expired until {stale_until:+.2f}s)")
    assert recovered < lifetime, fleet.logs()
    assert watch.expired_after(back + lifetime / 2) == [], f"{watch.expired[-5:]}"
    assert await fleet.lost_refresh_tokens(settle=3.0) == []
    for node in fleet.nodes:
        assert not list((node.state_dir / "rescue").glob("*")), f"{node.name}: rescue file left"
    # A rotation only one node holds while the database is away is critical by design
    # (write_failed), and so is a token that expired meanwhile; nothing else may page anyone.
    # The other node's KOE322 for the rotated-out token, once the access token had expired,
    # was reported as a needed login for the second the rescue took (docs/fleet.md §15):
    # a false page, not one about timings, left open and tolerated here.
    explained = ("write_failed", "access_expiring")
    assert [line for line in critical_alerts(fleet) if not explained_by(line, explained)] == []


async def all_refreshed(fleet: Fleet, since: float) -> bool:
    """True when every account got a new token from Kakao after ``since`` (emulator time)."""
    done = fleet.successful_refreshes(since=since)
    return all(done[name] >= 1 for name in fleet.accounts)


def explained_by(line: str, conditions: tuple[str, ...]) -> bool:
    """True when the alert line is about one of ``conditions``."""
    return any(f": {condition}: " in line for condition in conditions)


@pytest.mark.slow(seconds=26)
async def test_defaults_after_a_database_outage_longer_than_the_lifetime_nodes_are_back_at_once(
    make_fleet: FleetFactory,
) -> None:
    """PostgreSQL is away for one and a half 6-second lifetimes (every token expires meanwhile: the
    outage explains that). Once it answers again, every node publishes a current token within
    a small share of the lifetime, not after a reconnect back-off grown towards the 60 s
    heartbeat."""
    lifetime = 6.0
    fleet, watch = await started(make_fleet, access_lifetime=lifetime, nodes=2, accounts=2)
    await asyncio.sleep(lifetime)
    await asyncio.to_thread(fleet.cluster.stop, "fast")
    await asyncio.sleep(1.5 * lifetime)
    await asyncio.to_thread(fleet.cluster.start)
    back = time.monotonic()
    took = await wait_until(
        lambda: all(not fleet.expired_published(node) for node in fleet.nodes),
        timeout=6 * lifetime,
        what="every node fresh after the outage",
        fleet=fleet,
    )
    await asyncio.sleep(lifetime)
    await watch.stop()
    lags = watch.lags(back)
    print(f"every node fresh {took:.2f}s after the database came back;", report(watch, back))
    late = {token: lag for token, lag in lags.items() if lag > PUBLISH_LAG}
    assert late == {}, f"commits reached a node late after the outage: {late}\n{fleet.logs()}"
    assert took < lifetime / 3, f"fresh again only after {took:.2f}s\n{fleet.logs()}"
    assert await fleet.lost_refresh_tokens(settle=3.0) == []
