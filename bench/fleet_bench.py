"""Fleet mode: spread, peak rate, cost per refresh, node memory, idle cost, failover, throughput.

Each part runs real ``kakao-tokend run`` nodes (tests/fleetnodes.py) on a throwaway
PostgreSQL cluster and the emulator in this process, and compares with a baseline measured in
the same run:

* **spread / peak / cost / memory** — 3 nodes share N accounts (default 10,000) whose first
  refreshes are spread evenly over one refresh interval once every node serves (an UPDATE of
  ``due_at``), with a lifetime chosen so the fleet refreshes ``--rate`` accounts per second.
  Over one interval: each node's share of the rotations (goal: a third ± 15 %), the peak rate
  in 1 s and 5 s buckets of the emulator's log against the ideal N / interval (goal ≤ 1.5×),
  0 expired tokens in the store and in every node's token files, database statements and
  transactions per refresh (pg_stat_statements, xact_commit) and node CPU per refresh, each
  with the same measure over an idle stretch before (the baseline) subtracted, and each
  node's resident memory against a bare process (goal ≤ 2×).
* **memory** — two idle nodes, one with 1 account and one with N (default 10,000), each
  account's row carrying ROTATIONS_SEEDED rotations, tokens that outlive the measurement:
  each node's resident memory against the bare processes (goal ≤ 2×), and the KiB each
  account adds (the difference of the two nodes over N − 1 accounts). ``--before CHECKOUT``
  runs the same two nodes with another checkout's code too (e.g. ``git archive main daemon``
  unpacked somewhere): before and after measured in one run, on the same loaded machine.
* **idle** — 3 nodes with N accounts (default 10,000) of which none is due for hours, a 1 s
  heartbeat: the CPU the nodes spend and the statements and transactions they send per
  second while nothing happens, i.e. what the heartbeat (its poll, its ``nodes`` row) costs.
* **poll** — one node's heartbeat poll over N accounts (default 10,000) with nothing written:
  client and server CPU per poll, the full comparison of every row (the listener's
  (re)connect; every poll before schema version 3) against the incremental poll.
* **failover** — 3 nodes, Kakao answering every refresh after 1 s so that nodes hold row
  locks; a node holding some is killed; the time until every account it held is committed by
  another node (goal ≤ heartbeat + Kakao timeout), repeated and the median/max reported.
* **throughput** — GET /v1/accounts/NAME/token on a postgres-mode node against a file-mode
  daemon with the same account, alternating rounds (goal ≥ 0.9×).

``--quick`` runs everything tiny (seconds) to prove the script works.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fleet harness lives with the tests

from common import (  # noqa: E402
    FIRST_USER_ID,
    PYTHON,
    Process,
    cpu_seconds,
    cpu_ticks_seconds,
    emulator_settings,
    memory_kib,
    parse_args,
    print_table,
    result,
    seeded_daemon,
    spawn,
    wait_log,
    workdir,
)

from fleetnodes import Fleet, FleetTimings, account_names, wait_until  # noqa: E402
from kakao_tokend.emulator import RefreshAttempt, running_emulator  # noqa: E402
from kakao_tokend.fleet import db  # noqa: E402
from kakao_tokend.fleet.accounts import insert_account  # noqa: E402
from kakao_tokend.fleet.store import FleetStore  # noqa: E402
from kakao_tokend.state import AccountState, Rotation  # noqa: E402
from kakao_tokend.tokens import fingerprint, utcnow  # noqa: E402
from pgcluster import PgCluster, find_pg_bindir  # noqa: E402

#: Loaded into the test cluster so that statements can be counted per refresh.
PRELOAD = "shared_preload_libraries = 'pg_stat_statements'\n"
#: The floor for a fleet node: the libraries it cannot do without, idling in asyncio.
BASELINES = {
    "bare (aiohttp, apscheduler)": "import asyncio, aiohttp, apscheduler",
    "bare + psycopg, psycopg_pool, cryptography": (
        "import asyncio, aiohttp, apscheduler, psycopg, psycopg_pool;"
        " from cryptography.hazmat.primitives.ciphers.aead import AESGCM"
    ),
}


#: The rotations each account's row has in the memory part (a node keeps only the newest).
ROTATIONS_SEEDED = 3


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accounts", type=int, help="accounts for the spread and memory parts (default 10000)"
    )
    parser.add_argument("--rate", type=float, help="fleet refreshes per second (default 40)")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="CHECKOUT",
        help="memory part: also run nodes of the kakao-tokend in CHECKOUT (its daemon/ first on"
        " PYTHONPATH, e.g. an export of main), measured in the same run",
    )
    parser.add_argument("--failovers", type=int, help="kills in the failover part (default 5)")
    parser.add_argument(
        "--only",
        action="append",
        choices=["spread", "memory", "idle", "poll", "failover", "throughput"],
        help="one part",
    )


async def bare_processes(directory: Path, label: str) -> list[Process]:
    """Start one process per BASELINES entry, idling in asyncio; return them once ready."""
    processes = [await spawn([PYTHON, "-c", code + "; print('ready', flush=True);"
                              " asyncio.run(asyncio.sleep(3600))"],
                             directory / f"{label}{i}.log")
                 for i, code in enumerate(BASELINES.values())]  # fmt: skip
    for process in processes:
        await wait_log(process, "ready")
    return processes


async def query(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on its own connection; return its rows (if any)."""
    conn = await db.connect(dsn, node="fleet-bench", purpose="measure", autocommit=True)
    async with conn:
        cur = await conn.execute(sql, params or None)  # type: ignore[arg-type]
        return list(await cur.fetchall()) if cur.description else []


async def counters(fleet: Fleet) -> tuple[int, int]:
    """Return (statements executed by the nodes, transactions committed) in the store."""
    rows = await query(
        fleet.dsn,
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s"
        " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
        fleet.database,
    )
    commits = await query(
        fleet.dsn,
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
        fleet.database,
    )
    return int(rows[0][0]), int(commits[0][0])  # type: ignore[call-overload]


def order(n: int) -> list[str]:
    """The account names in a seeded random order (the order of their first refreshes)."""
    names = account_names(n)
    random.Random(n).shuffle(names)
    return names


def node_cpu(fleet: Fleet) -> float:
    """Return the CPU seconds all running nodes used so far."""
    return sum(
        cpu_seconds(node.process.pid) for node in fleet.nodes if node.process and node.running
    )


def server_cpu(cluster: PgCluster) -> dict[int, float]:
    """Return the CPU seconds of the PostgreSQL server's processes so far, by pid."""
    postmaster = cluster.postmaster_pid()
    if postmaster is None:
        return {}
    with open(f"/proc/{postmaster}/task/{postmaster}/children") as handle:
        pids = [postmaster, *map(int, handle.read().split())]
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # a backend that ended meanwhile
            found[pid] = cpu_ticks_seconds(pid)
    return found


def server_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the server spent between two samples (processes that lived through both)."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def first_refreshes(log: Iterable[RefreshAttempt], start: float, end: float) -> list[float]:
    """When each account was first refreshed in [start, end]: the one interval's refreshes.

    The interval holds one refresh of every account, evenly seeded. An account refreshed
    early in it is due again one lifetime share later with the daemon's jitter (± 5 % of
    the lifetime), so its *second* refresh can fall before the interval's end: near the end
    those land on top of the seeded first ones (about 1.5 × the rate in the last tens of
    seconds at 10,000 accounts), an artefact of seeding every account in one wave that the
    jitter then smooths out, not of how the nodes share the refreshes. They are counted in
    the cost per refresh, not in the peak.
    """
    first: dict[int | None, float] = {}
    for attempt in log:
        counted = attempt.outcome in ("ok", "rotated") and start <= attempt.at <= end
        if counted and attempt.at < first.get(attempt.user_id, float("inf")):
            first[attempt.user_id] = attempt.at
    return sorted(first.values())


def buckets(times: list[float], start: float, end: float, width: float) -> list[int]:
    """Count ``times`` in consecutive buckets of ``width`` seconds over [start, end)."""
    count = max(1, int((end - start) // width))
    found = [0] * count
    for moment in times:
        index = int((moment - start) // width)
        if 0 <= index < count:
            found[index] += 1
    return found


async def spread(directory: Path, cluster: PgCluster, args: argparse.Namespace) -> None:
    """3 nodes, N accounts spread over one interval: shares, peak, cost, memory."""
    n = args.accounts or (60 if args.quick else 10_000)
    rate = args.rate or (10.0 if args.quick else 40.0)
    interval = n / rate  # one refresh of every account
    lifetime = interval / 0.75
    lead = 3.0
    async with running_emulator(
        emulator_settings(
            access_lifetime=lifetime,
            refresh_lifetime=5183999,  # Kakao's; and every refresh rotates: one rotation row each
            rotation_window=5183999,
        )
    ) as emulator:
        fleet = Fleet(
            directory / "spread",
            emulator,
            cluster,
            nodes=3,
            accounts=account_names(n),
            timings=FleetTimings(heartbeat="1s", kakao_timeout="5s", log_level="info"),
            database="spread",
        )
        try:
            await fleet.create_store()
            await query(fleet.dsn, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            # Each account's first token gets the lifetime that puts its first refresh (at 75 %)
            # at its place in one evenly spread interval, which starts once the nodes can serve
            # (start-up reads every row; allow for it), as in a fleet running for a while.
            began = time.monotonic()
            # 3,000 accounts: every node served within 15 s. --quick (60 accounts) needs a few
            # seconds, and its idle baseline only has to exist (nothing checks its numbers).
            lead = (15.0 if args.quick else 30.0) + 0.015 * n
            first = {name: began + lead + interval * i / n for i, name in enumerate(order(n))}

            def first_lifetime(name: str) -> float:
                return (first[name] - time.monotonic()) / 0.75

            def first_due(state: AccountState) -> datetime:
                return utcnow() + timedelta(seconds=first[state.account] - time.monotonic())

            await fleet.seed(due=first_due, first_lifetime=first_lifetime)
            print(f"seeded {n} accounts in {time.monotonic() - began:.1f}s", flush=True)
            await fleet.start(timeout=lead)
            print(f"every node serves after {time.monotonic() - began:.1f}s", flush=True)
            baselines = await bare_processes(directory, "baseline")
            # Idle baseline: the same nodes with nothing due yet, until just before the first
            # refreshes (at most a minute).
            idle = min(60.0, began + lead - time.monotonic() - 1.0)
            if idle < 1.0:
                raise SystemExit("the nodes took too long to start: no idle baseline")
            stmts0, xacts0 = await counters(fleet)
            cpu0 = node_cpu(fleet)
            await asyncio.sleep(idle)
            stmts1, xacts1 = await counters(fleet)
            cpu1 = node_cpu(fleet)
            idle_rate = ((stmts1 - stmts0) / idle, (xacts1 - xacts0) / idle, (cpu1 - cpu0) / idle)
            start = emulator.now() + (began + lead - time.monotonic())
            end = start + interval
            stmts2, xacts2 = await counters(fleet)
            cpu2 = node_cpu(fleet)
            # The interval may begin minutes from now (the idle baseline lasts at most a
            # minute of a lead that grows with N): wait for its end, not for its length.
            await wait_until(
                lambda: emulator.now() >= end + 2.0, timeout=end + 2.0 - emulator.now() + 60,
                what="one interval", fleet=fleet, interval=0.5,
            )  # fmt: skip
            stmts3, xacts3 = await counters(fleet)
            cpu3 = node_cpu(fleet)
            memory = {
                node.name: memory_kib(node.process.pid) for node in fleet.nodes if node.process
            }
            bare = {name: memory_kib(p.pid) for name, p in zip(BASELINES, baselines, strict=True)}
            for process in baselines:
                await process.stop()
            times = [a.at for a in emulator.stats.refresh_log if a.outcome in ("ok", "rotated")]
            refreshed = [t for t in times if start - 1 <= t <= end + 2]
            firsts = first_refreshes(emulator.stats.refresh_log, start - 1, end + 2)
            shares = await rotations_between(fleet, start - 1, end + 2)
            expired_rows = await query(
                fleet.dsn, "SELECT count(*) FROM accounts WHERE access_expires_at <= now()"
            )
            expired_files = sum(len(fleet.expired_published(node)) for node in fleet.nodes)
        finally:
            await fleet.close()
    total = sum(shares.values())
    ideal = n / interval
    peak1 = max(buckets(firsts, start, end, 1.0))
    peak5 = max(buckets(firsts, start, end, 5.0)) / 5.0
    elapsed = end + 2 - start + 1
    refreshes = max(1, len(refreshed))
    stmt_per = ((stmts3 - stmts2) - idle_rate[0] * elapsed) / refreshes
    xact_per = ((xacts3 - xacts2) - idle_rate[1] * elapsed) / refreshes
    cpu_per = ((cpu3 - cpu2) - idle_rate[2] * elapsed) / refreshes
    print_table(
        f"Spread: 3 nodes, {n} accounts, {lifetime:.0f}s tokens, one interval of {interval:.0f}s",
        ["node", "rotations", "share", "vs a third"],
        [
            [name, count, f"{count / max(total, 1):.3f}", f"{(count / max(total, 1)) * 3 - 1:+.1%}"]
            for name, count in sorted(shares.items())
        ],
    )
    worst = max((abs(c / max(total, 1) * 3 - 1) for c in shares.values()), default=1.0)
    result("fleet_spread_worst_deviation", worst, None, accounts=n, refreshes=total)
    result(
        "fleet_peak_rate_1s",
        peak1,
        peak1 / ideal,
        ideal=f"{ideal:.1f}",
        first_refreshes=len(firsts),
        second_refreshes=len(refreshed) - len(firsts),
    )
    result("fleet_peak_rate_5s", peak5, peak5 / ideal, ideal=f"{ideal:.1f}")
    result("fleet_expired", expired_rows[0][0], None, token_files=expired_files)  # type: ignore[arg-type]
    result("fleet_statements_per_refresh", stmt_per, None, idle_per_s=f"{idle_rate[0]:.1f}")
    result("fleet_transactions_per_refresh", xact_per, None, idle_per_s=f"{idle_rate[1]:.1f}")
    result(
        "fleet_cpu_ms_per_refresh", cpu_per * 1000, None, idle_ms_per_s=f"{idle_rate[2] * 1000:.1f}"
    )
    base_rss = bare[next(iter(BASELINES))][0]
    rows = [[name, f"{rss / 1024:.1f}", f"{hwm / 1024:.1f}", f"{rss / base_rss:.2f}x"]
            for name, (rss, hwm) in {**bare, **memory}.items()]  # fmt: skip
    print_table(
        f"Resident memory (MiB), {n} accounts per node",
        ["process", "VmRSS", "VmHWM", "/ bare"],
        rows,
    )
    worst_node = max(rss for rss, _ in memory.values())
    result(
        "fleet_node_rss_mib",
        worst_node / 1024,
        worst_node / base_rss,
        accounts=n,
        vs_bare_with_psycopg=f"{worst_node / list(bare.values())[1][0]:.2f}",
    )


async def memory(directory: Path, cluster: PgCluster, args: argparse.Namespace) -> None:
    """Idle nodes with 1 and N accounts: resident memory, and what one account adds.

    With ``--before CHECKOUT`` the same two nodes run that checkout's code too (started first,
    with its ``daemon/`` first on PYTHONPATH), so a change is measured against its base on the
    same machine at the same moment.
    """
    n = args.accounts or (60 if args.quick else 10_000)
    settle = 2.0 if args.quick else 10.0  # a few heartbeats after READY: polls, alert reads
    variants = {"": None} if args.before is None else {"before, ": args.before, "": None}
    async with running_emulator(
        emulator_settings(access_lifetime=3600.0, refresh_lifetime=5183999, rotation_window=60)
    ) as emulator:
        fleets = {
            (label, count): Fleet(
                directory / f"memory-{'before-' if label else ''}{count}",
                emulator,
                cluster,
                nodes=1,
                accounts=account_names(count),
                timings=FleetTimings(heartbeat="1s", log_level="info"),
                database=f"memory{'before' if label else ''}{count}",
            )
            for label in variants
            for count in (1, n)
        }
        baselines = []
        try:
            for fleet in fleets.values():
                await fleet.create_store()
                await seed_with_rotations(fleet, ROTATIONS_SEEDED)
            for checkout in variants.values():
                compile_daemon(checkout)
            began = time.monotonic()
            lead = 30.0 + 0.015 * n  # as the spread part allows for start-up
            for label, checkout in variants.items():
                with python_path(checkout):  # the nodes inherit this process's environment
                    await asyncio.gather(
                        *(f.start(timeout=lead) for (v, _), f in fleets.items() if v == label)
                    )
            print(f"the nodes serve after {time.monotonic() - began:.1f}s", flush=True)
            baselines = await bare_processes(directory, "memory-baseline")
            await asyncio.sleep(settle)
            readings = {
                (label, count): memory_kib(fleet.nodes[0].process.pid)
                for (label, count), fleet in fleets.items()
                if fleet.nodes[0].process is not None
            }
            bare = {name: memory_kib(p.pid) for name, p in zip(BASELINES, baselines, strict=True)}
            makeup = {name: rss_makeup(p.pid) for name, p in zip(BASELINES, baselines, strict=True)}
            for (label, count), fleet in fleets.items():
                if fleet.nodes[0].process is not None:
                    makeup[node_label(label, count)] = rss_makeup(fleet.nodes[0].process.pid)
        finally:
            for process in baselines:
                await process.stop()
            for fleet in fleets.values():
                await fleet.close()
    base_rss = bare[next(iter(BASELINES))][0]
    nodes = {node_label(label, count): reading for (label, count), reading in readings.items()}
    print_table(
        f"Resident memory (MiB) of idle nodes, {ROTATIONS_SEEDED} rotations per account"
        " (RssFile: pages of mapped files, mostly shared libraries; RssAnon: the heap)",
        ["process", "VmRSS", "VmHWM", "/ bare", "RssAnon", "RssFile", "threads"],
        [[name, f"{rss / 1024:.1f}", f"{hwm / 1024:.1f}", f"{rss / base_rss:.2f}x",
          *(f"{makeup[name][part] / 1024:.1f}" for part in ("RssAnon", "RssFile")),
          str(makeup[name]["Threads"])]
         for name, (rss, hwm) in {**bare, **nodes}.items()],
    )  # fmt: skip
    for label in variants:
        one, many = readings[label, 1][0], readings[label, n][0]
        per_account = (many - one) / max(n - 1, 1)
        print(f"  {label}per extra account: {per_account:.2f} KiB", flush=True)
        if label:
            continue  # the results are the code under test's
        result(
            "fleet_idle_node_rss_mib",
            many / 1024,
            many / base_rss,
            accounts=n,
            one_account_mib=f"{one / 1024:.1f}",
            vs_bare_with_psycopg=f"{many / list(bare.values())[1][0]:.2f}",
        )
        result("fleet_node_kib_per_account", per_account, None, accounts=n)


def node_label(label: str, count: int) -> str:
    """Return how the memory table names a node (``label`` is "" or "before, ")."""
    return f"{label}node, {count} account{'s' if count > 1 else ''}"


def rss_makeup(pid: int) -> dict[str, int]:
    """Return ``RssAnon`` and ``RssFile`` (KiB) and ``Threads`` of ``pid``: what the
    resident memory is made of (docs/benchmarks.md: the libraries' pages are file pages)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "Threads"):
                found[key] = int(rest.split()[0])
    return found


def compile_daemon(checkout: Path | None) -> None:
    """Compile the daemon/ of ``checkout`` (None: the code under test) next to its sources.

    The nodes inherit this process's environment (often PYTHONDONTWRITEBYTECODE=1): a node
    of a checkout without current bytecode compiles its modules in-process, about 1.3 MiB
    of heap that the node with N accounts then partly reuses, which understated the
    per-account figure of that checkout by 0.45 KiB at 3,000 accounts.
    """
    source = (checkout.resolve() if checkout is not None else REPO) / "daemon"
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(source)], check=True)


@contextlib.contextmanager
def python_path(checkout: Path | None) -> Iterator[None]:
    """Put ``checkout``'s daemon/ first on PYTHONPATH for the processes started meanwhile."""
    if checkout is None:
        yield
        return
    source = checkout.resolve() / "daemon"
    if not (source / "kakao_tokend").is_dir():
        raise SystemExit(f"--before {checkout}: no daemon/kakao_tokend in it")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), saved]))
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


async def seed_with_rotations(fleet: Fleet, rotations: int) -> None:
    """Insert every account's row with fresh tokens and ``rotations`` past rotations (one a
    month, as Kakao's refresh tokens rotate), due in an hour."""
    conn = await db.connect(fleet.dsn, node="fleet-bench", purpose="seed")
    async with conn:
        for name in fleet.accounts:
            state = fleet.fresh_state(name)
            now = state.tokens.access_issued_at
            chain = [f"{name}-{i}" for i in range(rotations + 1)]
            history = tuple(
                Rotation(
                    now - timedelta(days=30 * (rotations - i)),
                    fingerprint(chain[i + 1]),
                    replaced=fingerprint(chain[i]),
                )
                for i in range(rotations)
            )
            row = await insert_account(
                conn,
                fleet.keyring,
                replace(state, rotations=history),
                node="fleet-bench",
                due_at=now + timedelta(hours=1),
            )
            if row is None:
                raise RuntimeError(f"account {name} is in the store already")
        await conn.commit()


async def idle(directory: Path, cluster: PgCluster, args: argparse.Namespace) -> None:
    """3 nodes, N accounts, nothing due: what the heartbeat alone costs per second."""
    n = args.accounts or (60 if args.quick else 10_000)
    seconds = 5.0 if args.quick else 60.0
    async with running_emulator(emulator_settings()) as emulator:  # 6 h tokens: none due
        fleet = Fleet(
            directory / "idle",
            emulator,
            cluster,
            nodes=3,
            accounts=account_names(n),
            timings=FleetTimings(heartbeat="1s", log_level="info"),
            database="idle",
        )
        try:
            await fleet.create_store()
            await query(fleet.dsn, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await fleet.seed()
            await fleet.start(timeout=30.0 + 0.015 * n)
            await asyncio.sleep(5.0)  # past the start's full reads
            stmts0, xacts0 = await counters(fleet)
            cpu0, server0 = node_cpu(fleet), server_cpu(cluster)
            await asyncio.sleep(seconds)
            stmts1, xacts1 = await counters(fleet)
            cpu1, server1 = node_cpu(fleet), server_cpu(cluster)
        finally:
            await fleet.close()
    nodes_ms = (cpu1 - cpu0) / seconds * 1000
    server_ms = server_cpu_between(server0, server1) / seconds * 1000
    print_table(
        f"Idle: 3 nodes, {n} accounts, nothing due, 1 s heartbeat, {seconds:g}s",
        ["node CPU", "PostgreSQL CPU", "statements", "transactions"],
        [[f"{nodes_ms:.1f} ms/s", f"{server_ms:.1f} ms/s", f"{(stmts1 - stmts0) / seconds:.1f} /s",
          f"{(xacts1 - xacts0) / seconds:.1f} /s"]],
    )  # fmt: skip
    result(
        "fleet_idle_cpu_ms_per_s",
        nodes_ms,
        None,
        accounts=n,
        server_ms_per_s=f"{server_ms:.1f}",
        statements_per_s=f"{(stmts1 - stmts0) / seconds:.1f}",
        transactions_per_s=f"{(xacts1 - xacts0) / seconds:.1f}",
    )


async def poll(directory: Path, cluster: PgCluster, args: argparse.Namespace) -> None:
    """One FleetStore over N rows: CPU of a full poll against an incremental one (the node's
    process and its server backend; autovacuum and the like are left out)."""
    n = args.accounts or (60 if args.quick else 10_000)
    rounds = 5 if args.quick else 50
    async with running_emulator(emulator_settings()) as emulator:
        fleet = Fleet(directory / "poll", emulator, cluster, nodes=0, accounts=account_names(n),
                      database="poll")  # fmt: skip
        await fleet.create_store()
        await fleet.seed()
    store = FleetStore(
        dsn=fleet.dsn,
        keyring=fleet.keyring,
        node="poller",
        timeouts=db.DbTimeouts(),
        state_dir=directory / "poll" / "state",
        pool_size=1,
    )
    await store.open()
    measured: dict[str, tuple[float, float]] = {}
    try:
        async with store.connection("find the backend") as conn:  # the pool's one connection
            cur = await conn.execute("SELECT pg_backend_pid()")
            backend = int((await cur.fetchall())[0][0])
        for label, full in (("full", True), ("incremental", False)) * 2:  # each twice, warm
            await store.poll(full=full)
            client0, server0 = time.process_time(), cpu_seconds(backend)
            for _ in range(rounds):
                changed, due = await store.poll(full=full)
                assert changed == [] and due == [], "nothing was written or due"
            client = (time.process_time() - client0) / rounds
            server = (cpu_seconds(backend) - server0) / rounds
            measured[label] = (client, server)  # the second round (warm) is kept
    finally:
        await store.close()
    print_table(
        f"Heartbeat poll, one node, {n} accounts, nothing written ({rounds} polls each)",
        ["poll", "client CPU", "server CPU", "3 nodes, 1 s heartbeat"],
        [[label, f"{client * 1000:.2f} ms", f"{server * 1000:.2f} ms",
          f"{3 * (client + server) * 1000:.1f} ms/s"]
         for label, (client, server) in measured.items()],
    )  # fmt: skip
    full_cost, incremental_cost = (sum(measured[label]) for label in ("full", "incremental"))
    result(
        "fleet_poll_ms",
        incremental_cost * 1000,
        incremental_cost / full_cost,
        accounts=n,
        full_ms=f"{full_cost * 1000:.2f}",
    )


async def rotations_between(fleet: Fleet, start: float, end: float) -> Counter[str]:
    """Count the rotations each node committed between two emulator times (wall clock)."""
    offset = fleet.emulator.clock_offset
    rows = await query(
        fleet.dsn,
        "SELECT node, count(*) FROM rotations WHERE node LIKE 'node-%%'"
        " AND rotated_at BETWEEN to_timestamp(%s) AND to_timestamp(%s) GROUP BY node",
        start - offset,
        end - offset,
    )
    return Counter({str(node): int(count) for node, count in rows})  # type: ignore[call-overload]


async def failover(directory: Path, cluster: PgCluster, args: argparse.Namespace) -> None:
    """Kill a node holding row locks; time until another node committed each of them."""
    kills = args.failovers or (1 if args.quick else 5)
    heartbeat, kakao_timeout, kakao_delay = 1.0, 3.0, 1.0
    async with running_emulator(
        emulator_settings(access_lifetime=8.0, refresh_lifetime=5183999, rotation_window=5183999)
    ) as emulator:
        fleet = Fleet(
            directory / "failover",
            emulator,
            cluster,
            nodes=3,
            accounts=account_names(30),
            timings=FleetTimings(
                heartbeat=f"{heartbeat:g}s", kakao_timeout=f"{kakao_timeout:g}s", log_level="info"
            ),
            database="failover",
        )
        times: list[float] = []
        try:
            await fleet.create_store()
            await query(fleet.dsn, "CREATE EXTENSION IF NOT EXISTS pgrowlocks")
            await fleet.seed()
            await fleet.start(timeout=60)
            emulator.inject("token", "slow", rate=1.0, delay=kakao_delay)
            rng = random.Random(1)
            for _ in range(kills):
                victim, held = await held_rows(fleet, rng)
                generations = {name: row.generation for name, row in (await fleet.rows()).items()}
                killed = time.monotonic()
                await victim.kill()

                async def committed(
                    held: list[str] = held, before: dict[str, int] = generations
                ) -> bool:
                    # Taken over: refreshed by another node, or (when the killed node had
                    # already had the token rotated: the lost-response case) a KOE322 recorded.
                    rows = await fleet.rows()
                    return all(
                        rows[name].generation > before[name] or rows[name].state.relogin_reason
                        for name in held
                    )

                await wait_until(committed, timeout=60, what="failover", fleet=fleet, interval=0.02)
                times.append(time.monotonic() - killed)
                print(f"killed {victim.name} holding {held}: {times[-1]:.2f}s", flush=True)
                await victim.start(timeout=60)
        finally:
            emulator.clear_faults()
            await fleet.close()
    goal = heartbeat + kakao_timeout
    print_table(
        "Failover: kill a node holding row locks → all its accounts committed elsewhere",
        ["kills", "median", "max", "goal (heartbeat + Kakao timeout)"],
        [[len(times), f"{statistics.median(times):.2f}s", f"{max(times):.2f}s", f"{goal:g}s"]],
    )
    result(
        "fleet_failover_s", max(times), max(times) / goal, median=f"{statistics.median(times):.2f}"
    )


async def held_rows(fleet: Fleet, rng: random.Random) -> tuple[object, list[str]]:
    """Wait for a node that holds row locks; return it and the accounts it holds."""
    found: list[tuple[object, list[str]]] = []

    async def someone() -> bool:
        rows = await query(
            fleet.dsn,
            "SELECT split_part(s.application_name, ' ', 2), a.name FROM accounts a"
            " JOIN pgrowlocks('accounts') l ON l.locked_row = a.ctid"
            " JOIN pg_stat_activity s ON s.pid = ANY(l.pids)"
            " WHERE s.application_name LIKE 'kakao-tokend node-%%'",
        )
        by_node: dict[str, list[str]] = {}
        for node, name in rows:
            by_node.setdefault(str(node), []).append(str(name))
        if by_node:
            name = rng.choice(sorted(by_node))
            found[:] = [(fleet.node(name), sorted(by_node[name]))]
        return bool(by_node)

    await wait_until(someone, timeout=30, what="a node holding row locks", fleet=fleet)
    return found[0]


async def throughput(directory: Path, cluster: PgCluster, args: argparse.Namespace) -> None:
    """The token endpoint of a postgres-mode node against a file-mode daemon, alternating."""
    # --quick proves the part runs (a number comes out); each round keeps two processes at
    # full speed, so it stays short.
    rounds, duration, concurrency = (1, 0.5, 4) if args.quick else (5, 5.0, 16)
    async with running_emulator(emulator_settings()) as emulator:
        fleet = Fleet(
            directory / "throughput",
            emulator,
            cluster,
            nodes=1,
            accounts=["default"],
            timings=FleetTimings(heartbeat="60s", log_level="info"),
            database="throughput",
        )
        try:
            await fleet.create_store()
            await fleet.seed()
            await fleet.start(timeout=60)
            node = fleet.nodes[0]
            node_socket = node.directory / "run" / "api.sock"
            async with seeded_daemon(directory, emulator, accounts=1):
                file_socket = directory / f"daemon-1-{FIRST_USER_ID}" / "run" / "api.sock"
                pg_rates, file_rates = [], []
                for _ in range(rounds):
                    file_rates.append(await drive(file_socket, concurrency, duration))
                    pg_rates.append(await drive(node_socket, concurrency, duration))
        finally:
            await fleet.close()
    ratio = statistics.median(p / f for p, f in zip(pg_rates, file_rates, strict=True))
    print_table(
        "Token endpoint throughput (req/s)",
        ["mode", "median"],
        [["file daemon", f"{statistics.median(file_rates):.0f}"],
         ["postgres node", f"{statistics.median(pg_rates):.0f}"]],
    )  # fmt: skip
    result("fleet_token_throughput", statistics.median(pg_rates), ratio)


async def drive(socket_path: Path, concurrency: int, duration: float) -> float:
    """Request the default account's token for ``duration`` seconds; return requests/s."""
    url = "http://localhost/v1/accounts/default/token"
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        count = 0
        deadline = time.monotonic() + duration

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{socket_path}: HTTP {response.status}")
                count += 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.monotonic() - began)


async def main() -> None:
    """Run the parts ``--only`` names (default: all) on one throwaway cluster."""
    args = parse_args(__doc__ or "", options=_options)
    if find_pg_bindir() is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    parts = args.only or ["spread", "memory", "idle", "poll", "failover", "throughput"]
    with workdir(args.keep) as directory:
        cluster = PgCluster()
        try:
            conf = cluster.data / "postgresql.conf"
            conf.write_text(conf.read_text() + PRELOAD)
            cluster.start()
            for part in parts:
                await {
                    "spread": spread,
                    "memory": memory,
                    "idle": idle,
                    "poll": poll,
                    "failover": failover,
                    "throughput": throughput,
                }[part](directory, cluster, args)
        finally:
            cluster.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
