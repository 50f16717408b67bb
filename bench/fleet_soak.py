"""Fleet soak: 3 real nodes on one PostgreSQL vs the emulator, under node kills and pauses and
database restarts.

Run ``python bench/fleet_soak.py --minutes 5 --seed 1`` (``--accounts``, ``--nodes``, ``--json``;
``--lifetime`` sets the access tokens' life, 15 s by default; ``--defaults`` gives the nodes a
configuration with only the keys an operator must write, every timing at its default fitted
to that life, as in production).
The harness (tests/fleetnodes.py) starts a throwaway PostgreSQL cluster, the emulator inside
this process, and ``--nodes`` real ``python -m kakao_tokend --config X run`` children with
``[store] backend = "postgres"``, each with its own state directory, token files and API
socket. Every refresh rotates the refresh token (the rotation window is the refresh token's
whole life), so a second refresher or an uncommitted rotation shows up as a refresh token
the emulator no longer accepts. Everything stays on 127.0.0.1; every wait is bounded.

Disruptions, one at a time (so at least nodes - 1 nodes are always up), seeded:

* **kill -9** of a random node, restarted after 0.5-2 s;
* **SIGSTOP** of a random node for 0.5-1.5 access lifetimes, at a moment it holds no row lock (a
  node paused while holding one keeps that account locked until the server's
  idle-in-transaction timeout, 90 s: docs/fleet.md §6; that case has its own e2e test);
* **a PostgreSQL restart** (fast or immediate, i.e. a crash).

Readers read every up node's token files all the time. A read counts as *healthy* when the
node it read from is up (not killed, paused or restarting, plus GRACE after it is continued,
RESTART_GRACE after a restarted node serves again), the database is up (plus RECOVERY_SHARE
of the lifetime after a restart) and the account's refresh token was not lost (see below).
A healthy read of an expired access token (by the emulator, or by its ``expires_at`` past by
more than the second it is rounded down to: fleetnodes.published_expired) must not happen: the
count must be 0.

A **lost refresh token** is an account whose stored refresh token the emulator no longer
accepts (checked every 2 s and at the end). The one unavoidable case is a node killed after
Kakao rotated and before its commit: a loss of an account whose row lock the killed node held
(pgrowlocks, read just before the kill), or whose rotation happened within KILL_WINDOW before a
kill, is accounted as ``kill_during_rotation``; any other loss is unexplained and must be 0.
Lost accounts are logged in again (fresh tokens written through the store) so the run goes on.

The exit status is 1 when a count that must be 0 is not (see docs/fleet.md, "Fleet soak").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fleet harness lives with the tests

from fleetnodes import Fleet, FleetTimings, account_names, published_expired  # noqa: E402
from kakao_tokend.emulator import EmulatorSettings, running_emulator  # noqa: E402
from kakao_tokend.fleet import db  # noqa: E402
from kakao_tokend.fleet.accounts import (  # noqa: E402
    RowLock,
    load_account,
    notify_changed,
    save_account,
)
from kakao_tokend.tokens import refresh_due_at  # noqa: E402
from pgcluster import PgCluster, find_pg_bindir  # noqa: E402

#: Seconds, but with room for a loaded machine: a refresh is due with a quarter (3.75 s) left.
#: The default of --lifetime.
ACCESS_LIFETIME = 15.0
REFRESH_LIFETIME = 5183999.0  # Kakao's, and the rotation window: every refresh rotates
#: A node is trusted again this long after it was continued (SIGCONT).
GRACE = 1.0
#: ... and this long after a restarted node logged that it serves. It listens for other
#: nodes' commits and re-reads what changed before READY (it used to do so only after its
#: ready line, and needed 3 s here at load 10), so the same second as after SIGCONT.
RESTART_GRACE = GRACE
#: After a database restart, the nodes need to reconnect, resync and claim what became due:
#: this share of the access lifetime.
RECOVERY_SHARE = 0.5
#: A kill this soon after Kakao rotated may legitimately lose the rotated token (the answer was
#: on the wire or the commit not yet sent).
KILL_WINDOW = 1.0
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)
DISRUPTIONS = {"kill": 4, "pause": 3, "db_restart": 2}


@dataclass
class Window:
    """A disruption: reads inside [start, end] (emulator time) are not held to freshness.

    ``node`` None means every node; ``account`` None means every account.
    """

    start: float
    end: float | None
    reason: str
    node: str | None = None
    account: str | None = None

    def covers(self, start: float, end: float, node: str, account: str) -> bool:
        """True when a read of ``account`` on ``node`` over [start, end] overlaps this window."""
        if self.node not in (None, node) or self.account not in (None, account):
            return False
        return start <= (self.end if self.end is not None else float("inf")) and end >= self.start


@dataclass
class Loss:
    """An account whose stored refresh token Kakao no longer accepted."""

    account: str
    cause: str
    detected_at: float


@dataclass
class Read:
    """One read of a token file: when (emulator time), where, and whether it was expired."""

    start: float
    end: float
    node: str
    account: str
    expired: bool


def count_reads(
    report: FleetReport, reads: list[Read], windows: list[Window], began: float
) -> None:
    """Count ``reads`` into ``report`` against every window of the run, judged at its end.

    Not as each read happens: a lost refresh token is found only after it stayed dead for two
    lifetimes, and its window starts back at the rotation Kakao answered. Reads of that
    account's expired token on healthy nodes in between are the loss's (nothing can refresh
    it), so they must be judged once the window is known; judged at read time they counted as
    a healthy node serving an expired token.
    """
    for read in reads:
        report.reads += 1
        covering = next(
            (w for w in windows if w.covers(read.start, read.end, read.node, read.account)), None
        )
        if covering is None:
            report.reads_healthy += 1
            if read.expired:
                report.expired_healthy += 1
                report.expired_examples.append(
                    f"{read.node} {read.account} at +{read.start - began:.1f}s"
                )
        elif read.expired:
            report.expired_in_windows += 1
            report.expired_by_window[covering.reason] += 1


@dataclass
class FleetReport:
    """Everything the fleet soak counts."""

    seed: int
    minutes: float
    nodes: int
    accounts: int
    #: The access tokens' life (s), and whether the nodes ran with every timing at its default.
    lifetime: float = ACCESS_LIFETIME
    defaults: bool = False
    kills: int = 0
    pauses: int = 0
    db_restarts: int = 0
    reads: int = 0
    reads_healthy: int = 0
    expired_healthy: int = 0
    expired_examples: list[str] = field(default_factory=list)
    expired_in_windows: int = 0
    expired_by_window: Counter[str] = field(default_factory=Counter)
    losses: list[Loss] = field(default_factory=list)
    refresh_cycles: int = 0
    rotations: int = 0
    retired_presented: int = 0
    refreshes_by_node: Counter[str] = field(default_factory=Counter)
    final_exit_codes: dict[str, int | None] = field(default_factory=dict)
    #: Seconds each node took to exit on the final SIGTERM (SIGKILL after 15 s).
    final_stop_seconds: dict[str, float] = field(default_factory=dict)
    #: The end of the log of each node that did not exit 0 on the final SIGTERM.
    final_stop_logs: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def unexplained_losses(self) -> int:
        """Return the losses outside the kill-during-rotation case."""
        return sum(1 for loss in self.losses if loss.cause.startswith("UNEXPLAINED"))

    def failures(self) -> list[str]:
        """Return every must-be-0 count that is not 0, and other hard failures."""
        bad = list(self.problems)
        if self.expired_healthy:
            bad.append(f"reads of an expired token while healthy: {self.expired_healthy}")
        if self.unexplained_losses:
            bad.append(
                f"refresh tokens lost outside the lost-response case: {self.unexplained_losses}"
            )
        if self.refresh_cycles == 0:
            bad.append("no refresh happened at all")
        for node, code in self.final_exit_codes.items():
            if code != 0:
                bad.append(f"{node} exited {code} on the final SIGTERM")
        return bad

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able view."""
        return {
            "seed": self.seed,
            "minutes": self.minutes,
            "nodes": self.nodes,
            "accounts": self.accounts,
            "lifetime": self.lifetime,
            "defaults": self.defaults,
            "refresh_cycles": self.refresh_cycles,
            "rotations": self.rotations,
            "refreshes_by_node": dict(sorted(self.refreshes_by_node.items())),
            "kills": self.kills,
            "pauses": self.pauses,
            "db_restarts": self.db_restarts,
            "reads": self.reads,
            "reads_while_healthy": self.reads_healthy,
            "expired_reads_while_healthy": self.expired_healthy,
            "expired_examples": self.expired_examples[:5],
            "expired_reads_inside_windows": self.expired_in_windows,
            "expired_reads_by_window": dict(sorted(self.expired_by_window.items())),
            "losses": [loss.__dict__ for loss in self.losses],
            "unexplained_losses": self.unexplained_losses,
            "retired_refresh_presented": self.retired_presented,
            "final_exit_codes": self.final_exit_codes,
            "final_stop_seconds": self.final_stop_seconds,
            "final_stop_logs": self.final_stop_logs,
            "failures": self.failures(),
        }

    def table(self) -> str:
        """Return the Markdown table docs/fleet.md shows."""
        accounted = Counter(loss.cause for loss in self.losses if not loss.cause.startswith("UN"))
        rows = [
            ("nodes × accounts", f"{self.nodes} × {self.accounts}", "reported"),
            (
                "access lifetime; the nodes' timings",
                f"{self.lifetime:g} s; {'defaults' if self.defaults else 'set by hand'}",
                "reported",
            ),
            (
                "refresh cycles",
                f"{self.refresh_cycles} ({self.rotations} rotations; by node: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.refreshes_by_node.items()))
                + ")",
                "reported",
            ),
            (
                "node kills (kill -9) / pauses (SIGSTOP)",
                f"{self.kills} / {self.pauses}",
                "reported",
            ),
            ("PostgreSQL restarts", str(self.db_restarts), "reported"),
            ("reads", f"{self.reads} ({self.reads_healthy} while healthy)", "reported"),
            ("reads of an expired token while healthy", str(self.expired_healthy), "0"),
            (
                "reads of an expired token inside disruption windows",
                f"{self.expired_in_windows} ("
                + ", ".join(f"{k} {v}" for k, v in sorted(self.expired_by_window.items()))
                + ")",
                "reported",
            ),
            (
                "refresh tokens lost, accounted (then re-login)",
                f"{len(self.losses) - self.unexplained_losses} "
                f"({', '.join(f'{k} {v}' for k, v in accounted.items()) or 'none'})",
                "reported",
            ),
            (
                "refresh tokens lost outside the lost-response case",
                str(self.unexplained_losses),
                "0",
            ),
            ("retired refresh tokens presented to Kakao", str(self.retired_presented), "reported"),
        ]
        lines = ["| Count | Value | Must be |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        return "\n".join(lines)


class FleetSoak:
    """One run: the fleet, the readers, the loss checker and the disruption schedule."""

    def __init__(self, fleet: Fleet, args: argparse.Namespace) -> None:
        self.fleet = fleet
        self.args = args
        self.lifetime: float = args.lifetime
        self.rng = random.Random(args.seed)
        self.report = FleetReport(
            args.seed,
            args.minutes,
            len(fleet.nodes),
            len(fleet.accounts),
            lifetime=args.lifetime,
        )
        self.windows: list[Window] = []
        #: node name -> emulator times of its kills (for the kill-during-rotation rule).
        self.kill_times: list[float] = []
        self.down: set[str] = set()
        self.stop = asyncio.Event()
        self.began = 0.0
        #: Losses whose re-login has not succeeded yet.
        self.open_losses: dict[str, Window] = {}
        #: Account -> when a node holding its row lock was killed.
        self.held_at_kill: dict[str, float] = {}
        #: Every read, judged at the end (count_reads) when every window is known.
        self.reads: list[Read] = []

    def now(self) -> float:
        """Return the emulator's clock (the clock its refresh log uses)."""
        return self.fleet.emulator.now()

    def say(self, text: str) -> None:
        """Print a progress line unless --quiet."""
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- readers and the loss checker ------------------------------------------------------

    async def reader(self, index: int) -> None:
        """Read random accounts' token files on the node ``index`` until the run ends."""
        node = self.fleet.nodes[index]
        rng = random.Random(self.args.seed * 100 + index)
        while not self.stop.is_set():
            await asyncio.sleep(rng.uniform(0.02, 0.06))
            if node.name in self.down:
                continue
            account = rng.choice(self.fleet.accounts)
            start = self.now()
            document = node.token_file(account)
            now = datetime.now(UTC)
            end = self.now()
            expired = published_expired(self.fleet.emulator, document, now)
            self.reads.append(Read(start, end, node.name, account, expired))

    async def check_losses(self) -> None:
        """Every 2 s: find accounts whose stored refresh token is dead; classify; log in again."""
        while not self.stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 2.0)
            if "db" in self.down:
                continue
            try:
                # A rotation answered while the database was down is committed from the rescue
                # file once it is back: give it two lifetimes before calling it lost.
                lost = await self.fleet.lost_refresh_tokens(settle=2 * self.lifetime)
                for account in lost:
                    await self.account_lost(account)
            except Exception as exc:  # the database went down meanwhile: next round
                self.say(f"loss check interrupted: {type(exc).__name__}")

    async def account_lost(self, account: str) -> None:
        """Record the loss of ``account``'s refresh token, then log it in again."""
        window = self.open_losses.get(account)
        if window is None:  # a new loss (else: the re-login failed last time; try again)
            born = self.rotation_time(account)
            cause = "UNEXPLAINED"
            killed = self.held_at_kill.pop(account, None)
            if (killed is not None and (born is None or born <= killed + KILL_WINDOW)) or (
                born is not None and any(born <= k <= born + KILL_WINDOW for k in self.kill_times)
            ):
                cause = "kill_during_rotation"
            detected = self.now()
            self.report.losses.append(Loss(account, cause, detected))
            since = born if born is not None else detected
            window = Window(since, None, f"lost ({cause})", account=account)
            self.windows.append(window)
            self.open_losses[account] = window
            self.say(f"{account}: refresh token lost ({cause}); logging in again")
        await self.relogin(account)
        window.end = self.now() + GRACE
        del self.open_losses[account]

    def rotation_time(self, account: str) -> float | None:
        """Return when Kakao issued the account's newest refresh token (emulator time)."""
        user = self.fleet.users[account]
        times = [
            attempt.at
            for attempt in self.fleet.emulator.stats.refresh_log
            if attempt.user_id == user and attempt.outcome == "rotated"
        ]
        return max(times) if times else None

    async def relogin(self, account: str) -> None:
        """Write fresh tokens for ``account`` through the store, as a login on a node does."""
        state = self.fleet.fresh_state(account)
        conn = await db.connect(self.fleet.dsn, node="fleet-soak", purpose="login")
        async with conn:
            row = await load_account(conn, self.fleet.keyring, account, lock=RowLock.WAIT)
            assert row is not None
            new = replace(state, generation=row.generation + 1)
            written = await save_account(
                conn,
                self.fleet.keyring,
                row,
                new,
                node="fleet-soak",
                due_at=refresh_due_at(new.tokens),
            )
            assert written
            await notify_changed(conn, account, new.generation)
            await conn.commit()

    # -- disruptions -----------------------------------------------------------------------

    async def kill(self) -> None:
        """kill -9 a random node, restart it after 0.5-2 s."""
        node = self.rng.choice(self.fleet.nodes)
        window = Window(self.now(), None, "node killed", node=node.name)
        self.windows.append(window)
        self.down.add(node.name)
        # What it holds now may be rotated at Kakao and not yet committed: a legitimate loss.
        with contextlib.suppress(Exception):
            held = (await self.fleet.held_by()).get(node.name, [])
            self.held_at_kill.update(dict.fromkeys(held, self.now()))
        self.kill_times.append(self.now())
        await node.kill()
        self.report.kills += 1
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        await node.start(timeout=60)
        self.down.discard(node.name)
        window.end = self.now() + RESTART_GRACE
        self.say(f"killed and restarted {node.name}")

    async def pause(self) -> None:
        """SIGSTOP a random node that holds no row lock for 1-2 access lifetimes."""
        node = self.rng.choice(self.fleet.nodes)
        window = Window(self.now(), None, "node paused", node=node.name)
        self.windows.append(window)
        self.down.add(node.name)
        for _ in range(50):
            node.pause()
            if node.name not in await self.fleet.lock_holders():
                break
            node.resume()
            await asyncio.sleep(0.05)
        else:
            self.down.discard(node.name)
            window.end = self.now()
            return
        self.report.pauses += 1
        await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.lifetime)
        node.resume()
        self.down.discard(node.name)
        window.end = self.now() + GRACE
        self.say(f"paused and continued {node.name}")

    async def db_restart(self) -> None:
        """Restart PostgreSQL: politely (fast) or as a crash (immediate)."""
        mode = self.rng.choice(["fast", "immediate"])
        window = Window(self.now(), None, f"PostgreSQL restart ({mode})")
        self.windows.append(window)
        self.down.add("db")
        await asyncio.to_thread(self.fleet.cluster.restart, mode)
        self.down.discard("db")
        self.report.db_restarts += 1
        window.end = self.now() + RECOVERY_SHARE * self.lifetime
        self.say(f"restarted PostgreSQL ({mode})")

    async def run(self) -> FleetReport:
        """Seed, start, disrupt until the time is up, stop, count."""
        fleet = self.fleet
        await fleet.create_store()
        # The first tokens outlast the nodes' start; once all serve, the first refreshes are
        # spread over one refresh interval, as in a fleet that has been running for a while.
        await fleet.seed(first_lifetime=300.0, due=lambda state: FAR_FUTURE)
        await fleet.start(timeout=120)
        self.report.defaults = all(not timings_set_by_hand(n.config_path) for n in fleet.nodes)
        await fleet.spread_due(0.75 * self.lifetime)
        self.began = self.now()
        self.say(f"{len(fleet.nodes)} nodes serve {len(fleet.accounts)} accounts")
        tasks = [asyncio.create_task(self.reader(i)) for i in range(len(fleet.nodes))]
        tasks.append(asyncio.create_task(self.check_losses()))
        end = time.monotonic() + self.args.minutes * 60
        disruptions = list(DISRUPTIONS)
        weights = list(DISRUPTIONS.values())
        try:
            while time.monotonic() < end:
                await asyncio.sleep(self.rng.uniform(1.0, 4.0))
                fleet.check_alive()
                if time.monotonic() >= end:
                    break
                kind = self.rng.choices(disruptions, weights)[0]
                await getattr(self, kind)()
            await asyncio.sleep(GRACE + RECOVERY_SHARE * self.lifetime)
        finally:
            self.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        for account in await fleet.lost_refresh_tokens(settle=2 * self.lifetime):
            await self.account_lost(account)
        count_reads(self.report, self.reads, self.windows, self.began)
        stats = fleet.emulator.stats
        self.report.refresh_cycles = stats.refreshes_ok
        self.report.rotations = stats.rotations
        self.report.retired_presented = stats.retired_refresh_presented
        for node in fleet.nodes:
            began = time.monotonic()
            self.report.final_exit_codes[node.name] = await node.stop()
            self.report.final_stop_seconds[node.name] = round(time.monotonic() - began, 2)
            if self.report.final_exit_codes[node.name] != 0:  # what it was waiting for
                self.report.final_stop_logs[node.name] = node.log_text()[-2000:]
        self.report.refreshes_by_node.update(await fleet.rotations_by_node())
        return self.report


#: The configuration keys that set a timing by hand ([kakao] and [refresh]).
TIMING_KEYS = {
    "kakao": {"timeout", "connect_timeout"},
    "refresh": {"heartbeat", "retry_initial", "retry_max", "rotation_window"},
}


def timings_set_by_hand(config_path: Path) -> bool:
    """Return True when the node's configuration sets any timing (what the report's
    ``defaults`` says of the nodes as they ran, not of the command line)."""
    config = tomllib.loads(config_path.read_text())
    return any(set(config.get(table, {})) & keys for table, keys in TIMING_KEYS.items())


async def soak(args: argparse.Namespace) -> FleetReport:
    """Run one fleet soak as ``args`` say."""
    if find_pg_bindir() is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    settings = EmulatorSettings(
        access_lifetime=args.lifetime,
        refresh_lifetime=REFRESH_LIFETIME,
        rotation_window=REFRESH_LIFETIME,
        access_rate=(10**9, 1.0),
        refresh_rate=(10**9, 1.0),
        seed=args.seed,
    )
    base = Path(tempfile.mkdtemp(prefix="kakao-tokend-fleet-soak-"))
    cluster = PgCluster()
    try:
        cluster.start()
        async with running_emulator(settings) as emulator:
            fleet = Fleet(
                base / "fleet",
                emulator,
                cluster,
                nodes=args.nodes,
                accounts=account_names(args.accounts),
                timings=FleetTimings(log_level="info"),
                only_required=args.defaults,
            )
            try:
                return await FleetSoak(fleet, args).run()
            finally:
                await fleet.close()
    finally:
        cluster.cleanup()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--accounts", type=int, default=60)
    parser.add_argument(
        "--lifetime",
        type=float,
        default=ACCESS_LIFETIME,
        help=f"the access tokens' life in seconds (default {ACCESS_LIFETIME:g})",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="give the nodes only the required keys: every timing at its default",
    )
    parser.add_argument("--json", type=Path, help="write every count as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep configs, state and logs")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print the table, exit 1 if a must-be-0 count is not 0."""
    args = parse_args(argv)
    report = asyncio.run(soak(args))
    print(report.table())
    failures = report.failures()
    for failure in failures:
        print(f"FAIL: {failure}")
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
