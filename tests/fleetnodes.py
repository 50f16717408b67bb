"""A whole fleet for end-to-end tests: one PostgreSQL cluster, the emulator, N real nodes.

Each node is a real ``python -m kakao_tokend --config X run`` child with its own state and
runtime directories (so its own token files and API socket), its own ``node_name``, and
optionally its own :class:`~tcpproxy.TcpProxy` between it and the database, which the test can
pause or cut. Every node shares the store's DSN (through its proxy, if any) and key file.

The emulator runs in the caller's event loop, so a test (or a benchmark) keeps that loop
running while it waits: every wait here is async and bounded. The emulator is the referee:
it knows which refresh tokens are live (a stored refresh token that is not live is a lost
one) and logs every token call with the Kakao user it was for (each account is its own user,
so calls per account can be counted).

Teardown (:meth:`Fleet.close`) stops every node (SIGCONT first, SIGTERM, SIGKILL after a
bound), closes the proxies and leaves the cluster to its owner (the ``pg_cluster`` fixture or
the benchmark), so nothing outlives the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemonproc import DaemonProcess, start_daemon
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.fleet import db, schema
from kakao_tokend.fleet.accounts import AccountRow, insert_account, load_account
from kakao_tokend.fleet.crypto import Keyring, new_key_line
from kakao_tokend.state import AccountState
from kakao_tokend.tokens import TokenSet, refresh_due_at, utcnow
from pgcluster import PgCluster
from tcpproxy import TcpProxy

#: Kakao user ids of the fleet's accounts start here (account i is user FIRST_USER_ID + i).
FIRST_USER_ID = 70_000
#: The log line a node writes once it serves (the same as a file-mode daemon).
READY_LINE = "kakao-tokend running"
#: What `run` with backend = "postgres" exits with while the fleet runtime is missing.
EXIT_CONFIG = 78
#: The application_name every store connection of a node carries: "kakao-tokend <node> <purpose>".
APP_PREFIX = "kakao-tokend "
#: The database the fleet's store lives in (a fresh one per Fleet).
DATABASE = "tokend"
#: A token file's ``expires_at`` is to the second, rounded down (published_expired).
WRITTEN_EXPIRY_ROUNDING = timedelta(seconds=1)


def account_names(count: int) -> list[str]:
    """Return ``count`` account names, sortable: acct0000, acct0001, ..."""
    return [f"acct{i:04d}" for i in range(count)]


@dataclass(frozen=True)
class FleetTimings:
    """The node configuration's timings, short so that a test lasts seconds."""

    heartbeat: str = "0.2s"
    kakao_timeout: str = "2s"
    retry_initial: str = "0.2s"
    retry_max: str = "1s"
    log_level: str = "debug"


class FleetNodeError(AssertionError):
    """A node did not start or exited; the message says why, with the end of its log."""


@dataclass
class FleetNode:
    """One node: its directory, config, optional database proxy, and its running process."""

    name: str
    directory: Path
    config_path: Path
    proxy: TcpProxy | None = None
    process: DaemonProcess | None = None
    #: Every process this node has run (restarts append), for the logs on failure.
    history: list[DaemonProcess] = field(default_factory=list)
    paused: bool = False

    @property
    def state_dir(self) -> Path:
        """Return where this node publishes token files."""
        return self.directory / "state"

    @property
    def running(self) -> bool:
        """Return True while the node's process has not exited."""
        return self.process is not None and self.process.proc.returncode is None

    async def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> DaemonProcess:
        """Start the node's `kakao-tokend run`; with ``wait_ready``, wait until it serves."""
        if self.running:
            raise RuntimeError(f"node {self.name} is already running")
        self.process = await start_daemon(self.config_path, wait_ready=False)
        self.history.append(self.process)
        self.paused = False
        if wait_ready:
            await self.wait_ready(timeout=timeout)
        return self.process

    async def wait_ready(self, *, timeout: float = 30.0) -> None:
        """Wait until the node logs that it serves; a node that exits fails with its reason."""
        process = self._process()
        deadline = time.monotonic() + timeout
        while READY_LINE not in process.log_text():
            code = process.proc.returncode
            if code is not None:
                raise FleetNodeError(self._exit_message(code))
            if time.monotonic() > deadline:
                raise FleetNodeError(
                    f"node {self.name} did not log {READY_LINE!r} within {timeout:g}s:\n"
                    + process.log_text()[-3000:]
                )
            await asyncio.sleep(0.05)

    def _exit_message(self, code: int) -> str:
        tail = self._process().log_text()[-3000:]
        why = ""
        if code == EXIT_CONFIG and "cannot run a fleet node" in tail:
            why = " (this kakao-tokend has no fleet runtime: `run` refuses backend = postgres)"
        return f"node {self.name} exited with {code}{why}:\n{tail}"

    def _process(self) -> DaemonProcess:
        if self.process is None:
            raise RuntimeError(f"node {self.name} was never started")
        return self.process

    def check_alive(self) -> None:
        """Raise FleetNodeError if the node's process exited on its own."""
        process = self._process()
        if process.proc.returncode is not None:
            raise FleetNodeError(self._exit_message(process.proc.returncode))

    async def kill(self) -> None:
        """kill -9 the node and reap it (a paused node dies too)."""
        process = self._process()
        if process.proc.returncode is None:
            process.send(signal.SIGKILL)
        await asyncio.wait_for(process.proc.wait(), 15)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP the node: it keeps its connections (and any row lock) but does nothing."""
        self._process().send(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused node."""
        self._process().send(signal.SIGCONT)
        self.paused = False

    async def stop(self, timeout: float = 15.0) -> int | None:
        """Stop the node (SIGTERM, then SIGKILL after ``timeout``); return its exit code."""
        process = self.process
        if process is None or process.proc.returncode is not None:
            return None if process is None else process.proc.returncode
        if self.paused:
            self.resume()
        process.send(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.proc.wait(), timeout)
        except TimeoutError:
            process.send(signal.SIGKILL)
            return await asyncio.wait_for(process.proc.wait(), 15)

    def token_file(self, account: str) -> dict[str, Any] | None:
        """Return the account's published token file on this node (None if not there yet)."""
        try:
            document: dict[str, Any] = json.loads(
                (self.state_dir / f"{account}.token.json").read_text()
            )
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return document

    async def api_token(self, account: str, min_valid: str = "0") -> tuple[int, Any]:
        """GET /v1/accounts/NAME/token?min_valid=... on this node's socket."""
        return await asyncio.wait_for(
            self._process().api("GET", f"/v1/accounts/{account}/token?min_valid={min_valid}"),
            15,
        )

    async def status(self) -> dict[str, Any]:
        """GET /v1/status on this node's socket (its ``fleet`` block has the store counters)."""
        code, body = await asyncio.wait_for(self._process().api("GET", "/v1/status"), 15)
        if code != 200:
            raise AssertionError(f"{self.name}: /v1/status answered {code}: {body}")
        return dict(body)

    def log_text(self) -> str:
        """Return the logs of every process this node ran, oldest first."""
        return "\n".join(process.log_text() for process in self.history)


class Fleet:
    """A PostgreSQL store, the emulator and ``nodes`` configured nodes (started on demand)."""

    def __init__(
        self,
        base: Path,
        emulator: KakaoEmulator,
        cluster: PgCluster,
        *,
        nodes: int = 3,
        accounts: Sequence[str] = ("acct0000",),
        proxied: bool = False,
        timings: FleetTimings | None = None,
        extra_config: str = "",
        database: str = DATABASE,
        only_required: bool = False,
    ) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.emulator = emulator
        self.cluster = cluster
        self.accounts = list(accounts)
        self.users = {name: FIRST_USER_ID + index for index, name in enumerate(self.accounts)}
        self.timings = timings or FleetTimings()
        #: Write only the keys a node needs (every timing at its default): see _configure.
        self.only_required = only_required
        self.database = database
        self.dsn = cluster.dsn(database)
        key_line = new_key_line()
        self.keyring = Keyring.parse(key_line + "\n")
        self.key_file = base / "store.key"
        self.key_file.write_text(key_line + "\n")
        self.key_file.chmod(0o600)
        self.nodes = [
            self._configure(f"node-{index + 1}", proxied=proxied, extra=extra_config)
            for index in range(nodes)
        ]

    # -- set-up ------------------------------------------------------------------------------

    def _configure(self, name: str, *, proxied: bool, extra: str) -> FleetNode:
        directory = self.base / name
        directory.mkdir(parents=True)
        proxy = TcpProxy("127.0.0.1", self.cluster.port).start() if proxied else None
        dsn_file = directory / "dsn"
        dsn_file.write_text((proxy.dsn(self.dsn) if proxy else self.dsn) + "\n")
        dsn_file.chmod(0o600)
        secret = directory / "client_secret"
        secret.write_text(str(self.emulator.settings.client_secret))
        secret.chmod(0o600)
        timings = self.timings
        # With only_required, what an operator must write (the app, the store, this node's
        # paths and name) and nothing else: every timing keeps its default (heartbeat 60 s,
        # Kakao timeout 30 s, the retry ladder, the store's timeouts), as in production.
        # log_level is no timing; debug says why in a failure's log.
        lines = [
            f'log_level = "{timings.log_level}"',
            f'default_account = "{self.accounts[0]}"',
            "[paths]",
            f'state_dir = "{directory / "state"}"',
            f'runtime_dir = "{directory / "run"}"',
            "[kakao]",
            f'rest_api_key = "{self.emulator.settings.client_id}"',
            f'client_secret_file = "{secret}"',
            f'auth_url = "{self.emulator.url}"',
            f'api_url = "{self.emulator.url}"',
            f'redirect_uri = "{self.emulator.settings.redirect_uris[0]}"',
        ]
        if not self.only_required:
            lines += [
                f'timeout = "{timings.kakao_timeout}"',
                'connect_timeout = "1s"',
                "[refresh]",
                f'heartbeat = "{timings.heartbeat}"',
                f'retry_initial = "{timings.retry_initial}"',
                f'retry_max = "{timings.retry_max}"',
                f'rotation_window = "{self.emulator.settings.rotation_window}s"',
            ]
        lines += [
            "[store]",
            'backend = "postgres"',
            f'dsn_file = "{dsn_file}"',
            f'key_file = "{self.key_file}"',
            f'node_name = "{name}"',
        ]
        lines.extend(f"[accounts.{account}]" for account in self.accounts)
        config_path = directory / "config.toml"
        config_path.write_text("\n".join(lines) + "\n" + extra)
        config_path.chmod(0o600)
        return FleetNode(name, directory, config_path, proxy=proxy)

    async def create_store(self) -> None:
        """Create the store's database and apply the schema (as `store init` would)."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(
            self.cluster.dsn(), autocommit=True
        ) as conn:
            await conn.execute(f'CREATE DATABASE "{self.database}" TEMPLATE template0')
        conn2 = await db.connect(
            self.dsn, node="fleet-harness", purpose="migrate", autocommit=True, migration=True
        )
        async with conn2:
            await schema.migrate(conn2, node="fleet-harness")
            # pgrowlocks (contrib) tells which node holds which row: see held_by().
            await conn2.execute("CREATE EXTENSION IF NOT EXISTS pgrowlocks")

    def fresh_state(self, account: str, *, due_in: float | None = None) -> AccountState:
        """Log ``account``'s user in at the emulator (no browser) and return its state."""
        now = utcnow()
        body = self.emulator.issue_tokens(self.users[account])
        tokens = TokenSet.from_token_response(body, requested_at=now)
        return AccountState(
            account=account, tokens=tokens, refreshed_at=now, user_id=self.users[account]
        )

    async def seed(
        self,
        accounts: Iterable[str] | None = None,
        *,
        due: Callable[[AccountState], datetime] | None = None,
        first_lifetime: float | Callable[[str], float] | None = None,
    ) -> None:
        """Give each account fresh tokens and insert its row.

        ``due`` picks each row's ``due_at`` (the claim time); by default the refresh time a
        node would compute (75 % ± 5 % of the access token's life), as after a migration.
        ``first_lifetime`` (seconds, or a function of the account's name) issues these first
        access tokens with another lifetime than the emulator's (e.g. long enough to outlast
        the nodes' start, or chosen so that the first refreshes fall at planned moments).
        """
        normal = self.emulator.settings.access_lifetime
        try:
            conn = await db.connect(self.dsn, node="fleet-harness", purpose="seed")
            async with conn:
                for name in accounts if accounts is not None else self.accounts:
                    if first_lifetime is not None:
                        self.emulator.settings.access_lifetime = (
                            first_lifetime(name) if callable(first_lifetime) else first_lifetime
                        )
                    state = self.fresh_state(name)
                    due_at = due(state) if due else refresh_due_at(state.tokens)
                    row = await insert_account(
                        conn, self.keyring, state, node="fleet-harness", due_at=due_at
                    )
                    if row is None:
                        raise RuntimeError(f"account {name} is in the store already")
                await conn.commit()
        finally:
            self.emulator.settings.access_lifetime = normal

    async def spread_due(self, span: float, *, lead: float = 0.0) -> None:
        """Make the accounts due evenly over [now + lead, now + lead + span], in random order
        (by the database's clock), as in a fleet that has run for a while. The nodes learn of
        it from their heartbeat poll."""
        conn = await db.connect(self.dsn, node="fleet-harness", purpose="seed", autocommit=True)
        async with conn:
            await conn.execute(
                "UPDATE accounts SET due_at = now() + make_interval(secs => %(lead)s)"
                " + make_interval(secs => %(span)s * (o.n - 1) / %(count)s)"
                " FROM (SELECT id AS rid, row_number() OVER (ORDER BY random()) AS n"
                "       FROM accounts) o WHERE id = o.rid",
                {"lead": lead, "span": span, "count": len(self.accounts)},
            )

    # -- running -----------------------------------------------------------------------------

    async def start(
        self, nodes: Iterable[FleetNode] | None = None, *, timeout: float = 30.0
    ) -> None:
        """Start the nodes at the same instant (one gather) and wait until all serve."""
        chosen = list(nodes) if nodes is not None else self.nodes
        await asyncio.gather(*(node.start(wait_ready=False) for node in chosen))
        await asyncio.gather(*(node.wait_ready(timeout=timeout) for node in chosen))

    def check_alive(self) -> None:
        """Fail if a node that should run has exited on its own."""
        for node in self.nodes:
            # A node the test killed has a negative exit code; only an own exit is a failure.
            code = None if node.process is None else node.process.proc.returncode
            if code is not None and code >= 0:
                node.check_alive()

    async def close(self) -> None:
        """Stop every node and close the proxies (the cluster is its owner's)."""
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)
        for node in self.nodes:
            if node.proxy is not None:
                node.proxy.close()

    def node(self, name: str) -> FleetNode:
        """Return the node called ``name``."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    # -- the referee: the database and the emulator --------------------------------------------

    async def rows(self) -> dict[str, AccountRow]:
        """Return every account row, tokens decrypted (a fresh connection each call)."""
        found: dict[str, AccountRow] = {}
        conn = await db.connect(self.dsn, node="fleet-harness", purpose="check", autocommit=True)
        async with conn:
            for name in self.accounts:
                row = await load_account(conn, self.keyring, name)
                if row is not None:
                    found[name] = row
        return found

    async def dead_stored_tokens(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Return account -> stored refresh token, for those Kakao no longer accepts."""
        rows = await self.rows()
        dead = {}
        for name in names if names is not None else self.accounts:
            token = rows[name].state.tokens.refresh_token if name in rows else ""
            if not token or self.emulator.refresh_token_status(token) != "live":
                dead[name] = token
        return dead

    async def lost_refresh_tokens(self, *, settle: float = 2.0) -> list[str]:
        """Return the accounts whose stored refresh token Kakao no longer accepts.

        A read can race a refresh: the row is read, a node rotates the token at Kakao and
        commits a moment later. So a dead stored token counts as lost only if the same token
        is still stored after ``settle`` seconds (a rotation waiting for its commit, e.g. in a
        rescue file while the database restarts, needs longer: pass a larger ``settle``).
        """
        suspects = await self.dead_stored_tokens()
        deadline = time.monotonic() + settle
        while suspects and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            again = await self.dead_stored_tokens(suspects)
            suspects = {name: token for name, token in again.items() if suspects[name] == token}
        return sorted(suspects)

    def token_calls(self, *, since: float = 0.0) -> Counter[str]:
        """Count refresh calls Kakao answered per account (any outcome), at or after ``since``
        (emulator time)."""
        by_user = {user: name for name, user in self.users.items()}
        calls: Counter[str] = Counter()
        for attempt in self.emulator.stats.refresh_log:
            name = by_user.get(attempt.user_id) if attempt.user_id is not None else None
            if name is not None and attempt.at >= since:
                calls[name] += 1
        return calls

    def successful_refreshes(self, *, since: float = 0.0) -> Counter[str]:
        """Count refreshes that gave a new token ("ok", "rotated", "grace") per account."""
        by_user = {user: name for name, user in self.users.items()}
        done: Counter[str] = Counter()
        for attempt in self.emulator.stats.refresh_log:
            if attempt.at < since or attempt.outcome not in ("ok", "rotated", "grace"):
                continue
            name = by_user.get(attempt.user_id) if attempt.user_id is not None else None
            if name is not None:
                done[name] += 1
        return done

    async def pause_holding_no_row_lock(self, node: FleetNode, *, tries: int = 50) -> None:
        """SIGSTOP ``node`` at a moment it holds no row lock (else continue it and try again).

        A node paused while it holds one keeps that account locked until the server's
        idle-in-transaction timeout: that case has its own test (docs/fleet.md §6).
        """
        for _ in range(tries):
            node.pause()
            if node.name not in await self.lock_holders():
                return
            node.resume()
            await asyncio.sleep(0.05)
        raise AssertionError(f"{node.name} always held a row lock")

    async def node_rows(self) -> list[str]:
        """Return the names in the store's ``nodes`` table (the nodes the others count)."""
        conn = await db.connect(self.dsn, node="fleet-harness", purpose="check", autocommit=True)
        async with conn:
            cur = await conn.execute("SELECT name FROM nodes ORDER BY name")
            return [str(name) for (name,) in await cur.fetchall()]

    async def rotation_log(self) -> list[tuple[str, str]]:
        """Return (account, node) for every rotation a node committed, oldest first."""
        conn = await db.connect(self.dsn, node="fleet-harness", purpose="check", autocommit=True)
        async with conn:
            cur = await conn.execute(
                "SELECT a.name, r.node FROM rotations r JOIN accounts a ON a.id = r.account_id"
                " WHERE r.node LIKE 'node-%%' ORDER BY r.rotated_at"
            )
            return [(str(name), str(node)) for name, node in await cur.fetchall()]

    async def rotations_by_node(self) -> Counter[str]:
        """Count the rotations each node committed (the store's rotation log names the node)."""
        counts: Counter[str] = Counter()
        conn = await db.connect(self.dsn, node="fleet-harness", purpose="check", autocommit=True)
        async with conn:
            cur = await conn.execute(
                "SELECT node, count(*) FROM rotations WHERE node LIKE 'node-%%' GROUP BY node"
            )
            for node, count in await cur.fetchall():
                counts[str(node)] = int(count)
        return counts

    async def sessions(self) -> list[dict[str, Any]]:
        """Return the nodes' database sessions: node, purpose, state, seconds in transaction."""
        import psycopg
        from psycopg.rows import dict_row

        async with await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, row_factory=dict_row
        ) as conn:
            cur = await conn.execute(
                "SELECT application_name, state, pid,"
                " extract(epoch FROM now() - xact_start)::float8 AS in_xact"
                " FROM pg_stat_activity WHERE application_name LIKE %s AND datname = %s",
                (APP_PREFIX + "node-%", self.database),
            )
            found = []
            for row in await cur.fetchall():
                parts = str(row["application_name"]).split(" ")
                found.append(
                    {
                        "node": parts[1] if len(parts) > 1 else "",
                        "purpose": parts[2] if len(parts) > 2 else "",
                        "state": row["state"],
                        "pid": row["pid"],
                        "in_xact": row["in_xact"],
                    }
                )
            return found

    async def held_by(self) -> dict[str, list[str]]:
        """Return node -> the accounts whose row lock it holds right now (pgrowlocks)."""
        conn = await db.connect(self.dsn, node="fleet-harness", purpose="check", autocommit=True)
        async with conn:
            cur = await conn.execute(
                "SELECT split_part(s.application_name, ' ', 2), a.name FROM accounts a"
                " JOIN pgrowlocks('accounts') l ON l.locked_row = a.ctid"
                " JOIN pg_stat_activity s ON s.pid = ANY(l.pids)"
                " WHERE s.application_name LIKE %s",
                (APP_PREFIX + "node-%",),
            )
            held: dict[str, list[str]] = {}
            for node, name in await cur.fetchall():
                held.setdefault(str(node), []).append(str(name))
        return {node: sorted(names) for node, names in held.items()}

    async def lock_holders(self, *, longer_than: float = 0.0) -> list[str]:
        """Return the nodes with a session idle inside a transaction for over ``longer_than``
        seconds: the ones holding a row lock across a Kakao call."""
        return sorted(
            {
                session["node"]
                for session in await self.sessions()
                if session["state"] == "idle in transaction"
                and (session["in_xact"] or 0.0) > longer_than
            }
        )

    def expired_published(self, node: FleetNode, *, now: datetime | None = None) -> list[str]:
        """Return the accounts whose token file on ``node`` holds an expired access token."""
        now = now or datetime.now(UTC)
        return [
            account
            for account in self.accounts
            if published_expired(self.emulator, node.token_file(account), now)
        ]

    def logs(self) -> str:
        """Return every node's logs (for an assertion message)."""
        return "\n".join(f"===== {node.name}\n{node.log_text()[-4000:]}" for node in self.nodes)


def published_expired(
    emulator: KakaoEmulator, document: dict[str, Any] | None, now: datetime
) -> bool:
    """True when a token file (``document``, None when there is none) holds an access token
    that is expired at ``now``: Kakao (``emulator``) no longer accepts it.

    The file's ``expires_at`` is written to the second, rounded down (tokens.format_time),
    so the token it names lives up to a second longer than it says; a refresh planned at
    75 % ± 5 % of a 6-second token's life comes 1.2 s before the true expiry, as little as
    0.2 s before the written one, and a CI run once caught a healthy node's file in that gap,
    between the refreshing node's commit and its own publish of the new token. A file whose
    ``expires_at`` passed by more than that second counts as expired as well.
    """
    if document is None:
        return True
    expires = datetime.fromisoformat(str(document["expires_at"]).replace("Z", "+00:00"))
    if expires + WRITTEN_EXPIRY_ROUNDING <= now:
        return True
    return not emulator.access_token_valid(str(document["access_token"]))


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float,
    what: str,
    fleet: Fleet | None = None,
    interval: float = 0.05,
) -> float:
    """Poll ``check`` (sync or async) until true; return the seconds it took.

    With ``fleet``, a node that exits on its own fails the wait at once with its log, and a
    timeout message carries every node's log.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return time.monotonic() - start
        if fleet is not None:
            fleet.check_alive()
        if time.monotonic() > deadline:
            logs = ("\n" + fleet.logs()) if fleet is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{logs}")
        await asyncio.sleep(interval)


def due_now(state: AccountState) -> datetime:
    """A ``due`` choice for :meth:`Fleet.seed`: every account is due at once."""
    return state.refreshed_at or utcnow()


def due_spread(span: float) -> Callable[[AccountState], datetime]:
    """A ``due`` choice: due times spread evenly over the next ``span`` seconds, in order."""
    counter = iter(range(10**9))
    start = utcnow()

    def pick(state: AccountState) -> datetime:
        index = next(counter)
        return start + timedelta(seconds=span * ((index * 0.618034) % 1.0))

    return pick


def write_seed_file(path: Path, body: dict[str, Any]) -> Path:
    """Write a blog-style kakao_token.json (Kakao's raw token response) for `import`."""
    path.write_text(json.dumps(body))
    path.chmod(0o600)
    return path


def cpu_seconds(pid: int) -> float:
    """Return the user+system CPU seconds a process used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@contextlib.asynccontextmanager
async def running_fleet(fleet: Fleet) -> AsyncIterator[Fleet]:
    """Close the fleet whatever happens in the block."""
    try:
        yield fleet
    finally:
        await fleet.close()


#: Builds a Fleet: ``make(access_lifetime=…, nodes=3, accounts=1, **Fleet options)``.
FleetFactory = Callable[..., Awaitable[Fleet]]


@contextlib.asynccontextmanager
async def fleets(
    directory: Path,
    emulator: KakaoEmulator,
    cluster: PgCluster,
    *,
    refresh_lifetime: float,
    **defaults: Any,
) -> AsyncIterator[FleetFactory]:
    """Build fleets on one cluster and emulator, with second-long access tokens whose every
    refresh rotates (the rotation window is the refresh token's whole life); every node is
    stopped afterwards. ``defaults``: Fleet options for every fleet, a call's own win."""
    made: list[Fleet] = []

    async def make(
        *, access_lifetime: float, nodes: int = 3, accounts: int = 1, **options: Any
    ) -> Fleet:
        emulator.settings.access_lifetime = access_lifetime
        emulator.settings.refresh_lifetime = refresh_lifetime
        emulator.settings.rotation_window = refresh_lifetime
        fleet = Fleet(
            directory / f"fleet{len(made)}",
            emulator,
            cluster,
            nodes=nodes,
            accounts=[f"acct{i:04d}" for i in range(accounts)],
            **{**defaults, **options},
        )
        made.append(fleet)
        await fleet.create_store()
        return fleet

    try:
        yield make
    finally:
        for fleet in made:
            await fleet.close()
