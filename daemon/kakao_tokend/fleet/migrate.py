"""`kakao-tokend store migrate`: move every account between the files and PostgreSQL.

Two live copies of a refresh token kill each other at the first rotation, so a migration
keeps this rule at every instant, crashes included: **at most one side is live**. Each side
has a marker that makes it inert, checked by every entry point of that side:

- the files: ``MOVED`` in each directory that holds the accounts' state files
  (:func:`kakao_tokend.store.check_not_moved`; JSON naming the store, mode 0644, no secret);
- PostgreSQL: ``store_meta.moved_to = 'file'`` (:func:`moved_refusal`), with
  ``moved_pending`` while a migration into the store has not finished.

Both directions take the same three durable steps, each of which a re-run recognises:

1. make the destination inert (if it is not) and write every account into it, durably;
2. mark the source moved, durably;
3. make the destination live.

Between 2 and 3 both sides are inert (nothing is served, nothing is lost); a crash anywhere
leaves a state from which running the same command again finishes the job. Per account a
re-run compares generations: the same state at the destination is skipped, an older one is
updated, a newer one (or the same generation with another refresh token) is refused.

While it works, the migration holds the state directory's instance lock (so no file daemon
runs or starts), every account's file lock, a session advisory lock on the store (one
migration per store) and the rows' locks; it refuses to start while another kakao-tokend
is connected to the store. docs/fleet.md §12 describes it for operators.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import pwd
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import StateCorrupt, StoreError, StoreLocked, StoreMoved, StoreUnavailable
from ..relogin import command_line, config_command
from ..state import AccountState, parse_json
from ..store import (
    MOVED_NAME,
    AccountStore,
    FileLock,
    atomic_write,
    read_file,
    unlink_durably,
)
from ..tokens import format_time, refresh_due_at, utcnow
from . import alertbook, missing_extra
from .accounts import (
    RowLock,
    delete_account,
    deleted_generations,
    insert_account,
    list_account_names,
    load_account,
    record_deleted_generation,
    save_account,
)
from .admin import db_timeouts, require_dsn, require_keyring
from .db import connect, store_errors
from .meta import StoreMeta, moved_refusal, read_meta
from .schema import migrate as migrate_schema

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from ..config import Config
    from .crypto import Keyring

#: Session advisory lock held for a whole migration ("tokdmove"): one migration per store.
#: Distinct from the schema migrator's lock, which is held only for a transaction.
MIGRATE_LOCK = 0x746F6B646D6F7665
MARKER_VERSION = 1
MARKER_MODE = 0o644
#: Account file locks are held while every account is written; a CLI command may be busy.
DEFAULT_LOCK_TIMEOUT = 10.0
#: The file writes of a migration to files run inside the transaction that holds the rows'
#: locks; the node default (90 s) is sized for one Kakao call, not for thousands of fsyncs.
FILE_WRITE_BUDGET = "30min"
#: How long the migration waits for a row or table lock (lock_timeout of its session). Nodes
#: are refused before it starts, so a lock can only belong to a store command about to
#: finish (`store rotate-key`): worth waiting for, within the migration statement timeout.
LOCK_WAIT = "30s"

Target = Literal["postgres", "file"]


class MigrationRefused(StoreError):
    """The migration cannot go ahead without losing something; the message says what to do."""


class Step(enum.Enum):
    """What a migration does with one account."""

    COPY = "copied"  # not at the destination yet
    UPDATE = "updated"  # older at the destination (or the same tokens, older bookkeeping)
    SAME = "unchanged"  # already there, identical
    REMOVE = "removed"  # gone at the source (logged out since), stale at the inert destination
    KEEP = "kept"  # only at the live destination: not ours to touch
    NONE = "none"  # on neither side


@dataclass
class MigrationReport:
    """What a migration found and did (the CLI prints it)."""

    target: Target
    store_id: str
    database: str
    files: str
    steps: dict[str, Step] = field(default_factory=dict)
    alerts: int = 0
    #: Accounts in a live store that this configuration does not name (left alone).
    others: list[str] = field(default_factory=list)
    #: Files kept aside (a damaged or superseded copy at the destination).
    set_aside: list[Path] = field(default_factory=list)
    markers: list[Path] = field(default_factory=list)
    #: Set when the accounts already were where they were asked to go.
    nothing_to_do: str | None = None

    def names(self, *steps: Step) -> list[str]:
        """Return the accounts that got one of ``steps``, sorted."""
        return sorted(name for name, step in self.steps.items() if step in steps)


# ---------------------------------------------------------------------------------------------
# The PostgreSQL side's marker


def migrate_command(config: Config, target: str) -> str:
    """Return `kakao-tokend [--config FILE] store migrate --to TARGET` for ``config``."""
    words = ("store", "migrate", "--to", target)
    account = next(iter(config.accounts.values()), None)
    return config_command(account, *words) if account else command_line((), *words)


async def moved_away(config: Config) -> StoreMoved | None:
    """Return the refusal for a node started on a moved store; None when it is in use, or
    cannot be asked (no database, no schema yet: the caller's own checks report that)."""
    if config.store.dsn is None:
        return None
    try:
        conn = await connect(
            config.store.dsn,
            node=config.store.node_name,
            purpose="start",
            timeouts=db_timeouts(config),
            autocommit=True,
        )
        async with conn:
            with store_errors("read the store's identity"):
                cur = await conn.execute("SELECT to_regclass('store_meta') IS NOT NULL")
                row = await cur.fetchone()
            if row is None or not row[0]:
                return None
            return moved_refusal(await read_meta(conn))
    except StoreError:
        return None


async def _set_meta_moved(conn: AsyncConnection[Any], *, note: str, by: str, pending: bool) -> None:
    with store_errors("mark the store"):
        await conn.execute(
            "UPDATE store_meta SET moved_to = 'file', moved_at = now(), moved_by = %s,"
            " moved_note = %s, moved_pending = %s",
            (by, note, pending),
        )


async def _set_meta_live(conn: AsyncConnection[Any]) -> None:
    with store_errors("mark the store in use"):
        await conn.execute(
            "UPDATE store_meta SET moved_to = NULL, moved_at = NULL, moved_by = NULL,"
            " moved_note = NULL, moved_pending = false"
        )


# ---------------------------------------------------------------------------------------------
# The file side


class _MigratingFiles(AccountStore):
    """An account's files as a migration sees them: readable and writable while moved."""

    honour_moved_marker = False


class FileSide:
    """The configuration's account files, locked for a migration (a context manager)."""

    def __init__(self, config: Config, *, lock_timeout: float) -> None:
        self.config = config
        self.lock_timeout = lock_timeout
        self.stores = {
            name: _MigratingFiles(account, rescue_dir=config.runtime_dir)
            for name, account in sorted(config.accounts.items())
        }
        #: Every directory that holds state files of these accounts, and the state directory.
        self.directories = sorted(
            {config.state_dir, *(store.state_path.parent for store in self.stores.values())}
        )
        #: How the store names these files (store_meta.moved_note).
        self.location = f"files in {config.state_dir} on {config.store.node_name}"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FileSide:
        try:
            self._stack.enter_context(self._instance_lock())
            for store in self.stores.values():
                self._stack.enter_context(store.lock(timeout=self.lock_timeout))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def _instance_lock(self) -> Iterator[None]:
        """Hold the lock `kakao-tokend run` holds: no daemon runs or starts meanwhile."""
        from ..store import INSTANCE_LOCK_NAME

        state_dir = self.config.state_dir
        lock = FileLock(
            state_dir / INSTANCE_LOCK_NAME, directory_what="state directory", what="instance lock"
        )
        if not lock.try_acquire():
            pid = lock.holder()
            holder = f" (pid {pid})" if pid is not None else ""
            raise StoreLocked(
                f"kakao-tokend is running on {state_dir}{holder}: the daemon (or another "
                "`store migrate`) uses these accounts, so they cannot move now",
                hint="stop it first (systemctl stop kakao-tokend), then run the migration "
                "again; start it afterwards with the new [store] backend",
            )
        try:
            yield
        finally:
            lock.release()

    def markers(self) -> dict[Path, dict[str, Any] | None]:
        """Return each directory's MOVED marker (None: not marked; {}: unreadable)."""
        found: dict[Path, dict[str, Any] | None] = {}
        for directory in self.directories:
            path = directory / MOVED_NAME
            try:
                raw = read_file(path, what="migration marker")
            except FileNotFoundError:
                found[directory] = None
                continue
            except (OSError, StoreError):
                found[directory] = {}
                continue
            try:
                document = parse_json(raw)
            except ValueError:
                document = None
            found[directory] = document if isinstance(document, dict) else {}
        return found

    def write_markers(self, document: Mapping[str, Any]) -> list[Path]:
        """Mark every directory moved (atomic and durable); return the marker files."""
        data = json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n"
        written = []
        for directory in self.directories:
            path = directory / MOVED_NAME
            atomic_write(path, data, mode=MARKER_MODE)
            written.append(path)
        return written

    def remove_markers(self) -> list[Path]:
        """Remove every directory's marker durably; return those that were there."""
        removed = []
        for directory in self.directories:
            path = directory / MOVED_NAME
            try:
                if not unlink_durably(path):
                    continue
            except OSError as exc:
                raise StoreError(
                    f"cannot remove {path}: {exc.strerror or exc}; the accounts are in these "
                    "files, but kakao-tokend refuses them while it exists",
                    hint="fix the permissions and run "
                    f"`{migrate_command(self.config, 'file')}` again",
                ) from None
            removed.append(path)
        return removed


# ---------------------------------------------------------------------------------------------
# Deciding per account


def plan_account(
    name: str,
    source: AccountState | None,
    dest: AccountState | None,
    *,
    dest_inert: bool,
    source_where: str,
    dest_where: str,
    other_way: Target,
) -> Step:
    """Decide what to do with one account; MigrationRefused when that would lose tokens.

    The generation orders the copies: each change of the token set bumps it. A destination
    that is newer, or at the same generation with another refresh token, has been used on its
    own since: copying over it would bring back a token Kakao may have killed.
    """
    if source is None:
        if dest is None:
            return Step.NONE
        return Step.REMOVE if dest_inert else Step.KEEP
    if dest is None:
        return Step.COPY
    if dest.generation > source.generation:
        raise MigrationRefused(
            f"account {name!r} is at generation {dest.generation} in {dest_where}, newer than "
            f"generation {source.generation} in {source_where}: the copy there was used after "
            "this one, and moving would go back to older tokens",
            hint=f"if {dest_where} holds the copy in use, move the other way "
            f"(kakao-tokend store migrate --to {other_way}); nothing was changed",
        )
    source_token = source.tokens.refresh_fingerprint
    dest_token = dest.tokens.refresh_fingerprint
    if dest.generation == source.generation:
        if source_token != dest_token:
            raise MigrationRefused(
                f"account {name!r} is at generation {source.generation} in both "
                f"{source_where} and {dest_where}, with different refresh tokens ({source_token}"
                f" and {dest_token}): both copies were used on their own, and at most one of "
                "them still works",
                hint=f"log the account in again (kakao-tokend --account {name} login) where it "
                "should live, then migrate; nothing was changed",
            )
        return Step.SAME if source.to_dict() == dest.to_dict() else Step.UPDATE
    return Step.UPDATE


def _alerts_stay(step: Step, *, have_source: bool, dest_inert: bool) -> bool:
    """Whether the destination's alert records stay as they are (else the source's replace
    them): for an account only the live destination has, or one neither side has tokens for
    and only the live destination has records of."""
    return step is Step.KEEP or (step is Step.NONE and not have_source and not dest_inert)


def _who() -> str:
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def describe_database(dsn: str) -> str:
    """Return ``user@host:port/dbname`` from a DSN: where, never the password."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError as exc:
        raise missing_extra(exc) from None
    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:  # fails at connect with its own message, never the DSN's text
        return "the configured database"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{host}{port}/{params.get('dbname') or params.get('user') or '?'}"


def _marker_document(
    meta: StoreMeta, database: str, accounts: Mapping[str, AccountState], *, pending: bool
) -> dict[str, Any]:
    return {
        "version": MARKER_VERSION,
        "moved_to": "postgres",
        "store_id": meta.store_id,
        "database": database,
        "moved_at": format_time(utcnow()),
        "moved_by": _who(),
        # True while `store migrate --to file` is filling these files (not yet in use).
        "pending": pending,
        "accounts": {
            name: {
                "generation": state.generation,
                "refresh_token": state.tokens.refresh_fingerprint,
            }
            for name, state in sorted(accounts.items())
        },
        "note": "kakao-tokend refuses the account files in this directory while this file "
        "exists: the accounts live in the PostgreSQL store named above. Do not delete it by "
        "hand; `kakao-tokend store migrate --to file` brings them back.",
    }


def _refuse_foreign(
    meta: StoreMeta,
    markers: Mapping[Path, Mapping[str, Any] | None],
    files: FileSide,
    database: str,
) -> None:
    """Refuse a migration between files and a store that do not belong together."""
    for directory, marker in markers.items():
        if marker is None:
            continue
        if not marker:
            raise StoreMoved(
                f"{directory / MOVED_NAME} exists but cannot be read: the accounts in "
                f"{directory} were moved by `kakao-tokend store migrate`, and this command "
                "cannot tell where",
                hint="read that file and point [store] at the store it names",
            )
        if marker.get("store_id") != meta.store_id:
            raise StoreMoved(
                f"the accounts in {directory} were moved to PostgreSQL store "
                f"{marker.get('store_id')} ({marker.get('database')}), not to the store at "
                f"{database} (store {meta.store_id})",
                hint="point [store] dsn at the database they were moved to",
            )
    if meta.moved_to is not None and meta.moved_note != files.location:
        raise StoreMoved(
            f"the accounts of PostgreSQL store {meta.store_id} live in the {meta.moved_note}, "
            f"not in the {files.location} of this configuration",
            hint="run the migration with the configuration of that host (same state_dir and "
            "[store] node_name)",
        )


# ---------------------------------------------------------------------------------------------
# Connecting


@contextlib.asynccontextmanager
async def _store_connection(config: Config) -> AsyncIterator[AsyncConnection[Any]]:
    """Connect, bring the schema up to date, take the migration lock, refuse live nodes."""
    dsn = require_dsn(config.store)
    conn = await connect(
        dsn,
        node=config.store.node_name,
        purpose="migrate",
        timeouts=db_timeouts(config),
        migration=True,  # waits a little longer for locks than a node's pool does
    )
    async with conn:
        # The schema on this same connection: a connection of our own closed just before
        # the look at pg_stat_activity below can still be listed there while its backend
        # exits, and the migration then refused itself as "a store command is connected"
        # (seen once in CI, exit 75).
        await migrate_schema(conn, node=config.store.node_name)
        with store_errors("take the store's migration lock"):
            await conn.execute("SELECT set_config('lock_timeout', %s, false)", (LOCK_WAIT,))
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATE_LOCK,))
            row = await cur.fetchone()
        if row is None or not row[0]:
            raise StoreLocked(
                "another `kakao-tokend store migrate` is running on this store",
                hint="wait for it to finish; running the migration again afterwards is safe",
            )
        with store_errors("look for kakao-tokend nodes connected to the store"):
            cur = await conn.execute(
                "SELECT DISTINCT application_name FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name LIKE %s ORDER BY 1",
                ("kakao-tokend %",),
            )
            others = [name for (name,) in await cur.fetchall()]
            await conn.commit()
        if others:
            raise StoreLocked(
                f"kakao-tokend is connected to this store ({', '.join(others)}): a node or a "
                "store command is using the accounts, so they cannot move now",
                hint="stop every node (systemctl stop kakao-tokend) and wait for running store "
                "commands, then run the migration again",
            )
        yield conn


@dataclass
class _Sides:
    """Both sides of a migration, opened, locked and checked, and the report it fills."""

    files: FileSide
    conn: AsyncConnection[Any]
    keyring: Keyring
    database: str
    meta: StoreMeta
    markers: dict[Path, dict[str, Any] | None]
    report: MigrationReport


@contextlib.asynccontextmanager
async def _both_sides(config: Config, target: Target, lock_timeout: float) -> AsyncIterator[_Sides]:
    """Lock the files and the store, read the store's identity and the files' markers, and
    refuse a pair that belongs to different stores: what both directions start with."""
    keyring = require_keyring(config.store)
    database = describe_database(require_dsn(config.store))
    with FileSide(config, lock_timeout=lock_timeout) as files:
        async with _store_connection(config) as conn:
            with store_errors("read the store's identity"):
                meta = await read_meta(conn)
                await conn.commit()
            markers = files.markers()
            _refuse_foreign(meta, markers, files, database)
            report = MigrationReport(target, meta.store_id, database, files.location)
            yield _Sides(files, conn, keyring, database, meta, markers, report)


# ---------------------------------------------------------------------------------------------
# Files -> PostgreSQL


async def migrate_to_postgres(
    config: Config, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> MigrationReport:
    """Move every configured account (and its alert bookkeeping) from the files into the store."""
    async with _both_sides(config, "postgres", lock_timeout) as sides:
        conn, keyring, database = sides.conn, sides.keyring, sides.database
        files, meta, markers, report = sides.files, sides.meta, sides.markers, sides.report
        if meta.moved_to is None and all(markers.values()):
            if any(marker and marker.get("pending") for marker in markers.values()):
                # `migrate --to file` never reached its commit: the store stayed the live
                # copy. Say so in the markers instead of "a migration has not finished".
                again = {**next(m for m in markers.values() if m), "pending": False}
                report.markers = files.write_markers(again)
            at = next(m for m in markers.values() if m).get("moved_at")
            report.nothing_to_do = (
                f"the accounts in {config.state_dir} already live in PostgreSQL store "
                f"{meta.store_id} ({database}), moved there at {at}"
            )
            return report
        sources = _read_sources(files)
        async with conn.transaction():
            await _write_rows(conn, keyring, config, files, sources, meta, report)
            # Inert until the files are marked: then the files are no longer live.
            await _set_meta_moved(
                conn,
                note=files.location,
                by=f"kakao-tokend store migrate --to postgres ({_who()})",
                pending=True,
            )
        states = {name: state for name, (state, _) in sources.items() if state is not None}
        report.markers = files.write_markers(
            _marker_document(meta, database, states, pending=False)
        )
        try:
            async with conn.transaction():
                await _set_meta_live(conn)
        except StoreError as exc:
            kind = StoreUnavailable if isinstance(exc, StoreUnavailable) else StoreError
            raise kind(
                f"the accounts are in PostgreSQL store {meta.store_id} and the files are "
                f"marked moved, but the store could not be put in use: {exc.message}",
                hint=f"run `{migrate_command(config, 'postgres')}` again to finish",
            ) from None
    return report


def _handle_rescue_files(files: FileSide, *, stale: set[Path]) -> list[Path]:
    """Refuse while a live account has a rescue file (tokens its state file could not take,
    maybe newer than it); set aside those of accounts in ``stale`` (moved) directories."""
    kept = []
    for name, store in files.stores.items():
        if store.rescue_path is None or not store.rescue_path.exists():
            continue
        if store.state_path.parent not in stale:
            raise MigrationRefused(
                f"account {name!r} has tokens in the rescue file {store.rescue_path} that its "
                "state file could not take: they may be newer than the state file",
                hint="start kakao-tokend once (it writes them into the state file at start), "
                "stop it, then run the migration again",
            )
        # Older than the move into the store (the files were refused since): never adopt it.
        aside = store.set_aside_rescue("superseded")
        if aside is not None:
            kept.append(aside)
    return kept


def _read_sources(
    files: FileSide,
) -> dict[str, tuple[AccountState | None, dict[str, Any] | None]]:
    """Read every account's state and alert records (the account locks are held)."""
    _handle_rescue_files(files, stale=set())
    sources: dict[str, tuple[AccountState | None, dict[str, Any] | None]] = {}
    for name, store in files.stores.items():
        state = store.load()
        document = store.load_alerts()
        active = document.get("active") if document else None
        sources[name] = (state, dict(active) if isinstance(active, dict) else None)
    return sources


async def _write_rows(
    conn: AsyncConnection[Any],
    keyring: Keyring,
    config: Config,
    files: FileSide,
    sources: Mapping[str, tuple[AccountState | None, dict[str, Any] | None]],
    meta: StoreMeta,
    report: MigrationReport,
) -> None:
    node = config.store.node_name
    where = f"PostgreSQL store {meta.store_id}"
    known = set(await list_account_names(conn)) | set(await alertbook.accounts_with_alerts(conn))
    others = sorted(known - set(sources))
    if others and meta.moved_to is not None:
        raise MigrationRefused(
            f"PostgreSQL store {meta.store_id} holds accounts this configuration does not name "
            f"({', '.join(others)}); moving the files in would bring them back into use",
            hint="add them to the configuration ([accounts.NAME]) so that they move too",
        )
    report.others = others
    for name, (state, active) in sources.items():
        row = await load_account(conn, keyring, name, lock=RowLock.WAIT)
        step = plan_account(
            name,
            state,
            row.state if row else None,
            dest_inert=meta.moved_to is not None,
            source_where=f"the files ({files.stores[name].state_path})",
            dest_where=where,
            other_way="file",
        )
        report.steps[name] = step
        due_at = None
        if state is not None and not state.relogin_reason:
            policy = config.refresh
            due_at = refresh_due_at(state.tokens, share=policy.refresh_at, jitter=policy.jitter)
        if step is Step.COPY:
            assert state is not None
            if await insert_account(conn, keyring, state, node=node, due_at=due_at) is None:
                raise MigrationRefused(f"account {name!r} appeared in {where} meanwhile")
        elif step is Step.UPDATE:
            assert state is not None and row is not None
            if not await save_account(conn, keyring, row, state, node=node, due_at=due_at):
                raise MigrationRefused(f"account {name!r} changed in {where} meanwhile")
        elif step is Step.REMOVE:
            await delete_account(conn, name)  # the store's trigger records its generation
        # What the files would continue from at the next login (their logout record, a token
        # file left without its state), when the row does not hold it: the store's next login
        # continues above it (deleted_accounts).
        carried = files.stores[name].last_generation()
        if carried > (state.generation if state is not None else 0):
            await record_deleted_generation(conn, name, carried)
        if _alerts_stay(step, have_source=active is not None, dest_inert=meta.moved_to is not None):
            continue
        report.alerts += await alertbook.replace_records(conn, name, active or {}, node=None)


# ---------------------------------------------------------------------------------------------
# PostgreSQL -> files


async def migrate_to_file(
    config: Config, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> MigrationReport:
    """Move every account (and its alert bookkeeping) from the store into the files."""
    async with _both_sides(config, "file", lock_timeout) as sides:
        conn, keyring, database = sides.conn, sides.keyring, sides.database
        files, meta, markers, report = sides.files, sides.meta, sides.markers, sides.report
        if meta.moved_to is not None and not any(markers.values()):
            if meta.moved_pending:
                # `migrate --to postgres` committed the rows but never marked the files:
                # they stayed the live copy. Record that the store's copy is abandoned.
                async with conn.transaction():
                    await _set_meta_moved(
                        conn, note=files.location, by=meta.moved_by or _who(), pending=False
                    )
            at = format_time(meta.moved_at) if meta.moved_at else "?"
            report.nothing_to_do = (
                f"the accounts of PostgreSQL store {meta.store_id} ({database}) already "
                f"live in the {files.location}, moved there at {at}"
            )
            return report
        inert = {directory for directory, marker in markers.items() if marker}
        async with conn.transaction():
            with store_errors("allow time for the file writes"):
                await conn.execute(
                    "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
                    (FILE_WRITE_BUDGET,),
                )
            rows = await _lock_rows(conn, keyring, config, meta)
            deleted = await deleted_generations(conn, files.stores)
            plans = _plan_files(files, rows, inert, report)
            report.set_aside += _handle_rescue_files(files, stale=inert)
            # The files are made inert before they are filled: until the store is
            # marked below, it stays the live copy.
            states = {name: state for name, state in rows.items() if state is not None}
            files.write_markers(_marker_document(meta, database, states, pending=True))
            for name, plan in plans.items():
                await _write_account_files(conn, name, plan, report, deleted.get(name, 0))
            await _set_meta_moved(
                conn,
                note=files.location,
                by=f"kakao-tokend store migrate --to file ({_who()})",
                pending=False,
            )
        report.markers = files.remove_markers()
    return report


async def _lock_rows(
    conn: AsyncConnection[Any], keyring: Keyring, config: Config, meta: StoreMeta
) -> dict[str, AccountState | None]:
    """Lock and read every account row; refuse rows the configuration cannot hold."""
    names = await list_account_names(conn)
    with_alerts = await alertbook.accounts_with_alerts(conn)
    unknown = sorted((set(names) | set(with_alerts)) - set(config.accounts))
    if unknown:
        raise MigrationRefused(
            f"PostgreSQL store {meta.store_id} holds accounts this configuration does not name "
            f"({', '.join(unknown)}): the files would have no place for them",
            hint="add them to the configuration ([accounts.NAME]) and run the migration again",
        )
    rows: dict[str, AccountState | None] = {name: None for name in config.accounts}
    for name in names:
        row = await load_account(conn, keyring, name, lock=RowLock.WAIT)
        rows[name] = row.state if row else None
    return rows


@dataclass(frozen=True)
class _FilePlan:
    """One account's way into the files, decided before anything is written."""

    store: AccountStore
    step: Step
    state: AccountState | None
    dest_inert: bool


def _plan_files(
    files: FileSide,
    rows: Mapping[str, AccountState | None],
    inert: set[Path],
    report: MigrationReport,
) -> dict[str, _FilePlan]:
    """Compare every account's files with its row; refuse before anything is written."""
    plans = {}
    for name, store in files.stores.items():
        try:
            current = store.load()
        except StateCorrupt as exc:
            # load() moved the damaged file aside (kept); the store's copy replaces it.
            current = None
            if exc.quarantined is not None:
                report.set_aside.append(exc.quarantined)
        dest_inert = store.state_path.parent in inert
        step = plan_account(
            name,
            rows.get(name),
            current,
            dest_inert=dest_inert,
            source_where="the PostgreSQL store",
            dest_where=f"the files ({store.state_path})",
            other_way="postgres",
        )
        plans[name] = _FilePlan(store, step, rows.get(name), dest_inert)
    return plans


async def _write_account_files(
    conn: AsyncConnection[Any], name: str, plan: _FilePlan, report: MigrationReport, deleted: int
) -> None:
    """Bring one account's files to the store's state (the files are marked moved); write
    the generation a deleted row of the account had (``deleted``) as the files' logout
    record when its row does not hold it: the next login in file mode continues above it."""
    store, step = plan.store, plan.step
    report.steps[name] = step
    if step in (Step.COPY, Step.UPDATE):
        assert plan.state is not None
        store.save(plan.state)
    elif step is Step.REMOVE:
        kept = store.set_aside_state("logged-out")
        if kept is not None:
            report.set_aside.append(kept)
    if deleted > (plan.state.generation if plan.state is not None else 0):
        store.record_logout(deleted)
    from ..alerts import BOOKKEEPING_VERSION

    records = await alertbook.load_records(conn, name)
    if _alerts_stay(step, have_source=bool(records), dest_inert=plan.dest_inert):
        return
    if records or store.alerts_path.exists():
        store.save_alerts({"version": BOOKKEEPING_VERSION, "account": name, "active": records})
        report.alerts += len(records)


async def migrate(
    config: Config, target: Target, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> MigrationReport:
    """Move every account to ``target`` ("postgres" or "file"); safe to run again."""
    if target == "postgres":
        return await migrate_to_postgres(config, lock_timeout=lock_timeout)
    return await migrate_to_file(config, lock_timeout=lock_timeout)
