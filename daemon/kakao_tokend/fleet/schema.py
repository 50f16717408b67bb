"""The store's schema: versioned SQL files shipped in the package, applied under a lock.

Migrations are plain SQL files, ``sql/NNNN_what.sql``, numbered from 1 without gaps and never
edited once released. :func:`migrate` applies the missing ones in a single transaction that
first takes a transaction-level advisory lock, so nodes starting at the same instant apply
them once: the first does the work, the others wait, then find nothing to do. Each applied
file is recorded with its SHA-256 in ``schema_migrations``.

A node refuses to run (:class:`StoreSchemaMismatch`) on a database whose version is newer
than the newest file it ships, or whose record of an applied file differs from the file it
ships: either means this node's code does not match the rows it would write.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import StoreError, StoreSchemaMismatch
from ..tokens import backoff_delay
from . import missing_extra
from .db import deadline, no_answer, store_errors

if TYPE_CHECKING:
    from psycopg import AsyncConnection

#: pg_advisory_xact_lock key for migrations ("kakaotkd" in ASCII). Advisory locks are per
#: database, so two stores in two databases of one cluster do not block each other.
MIGRATION_LOCK = 0x6B616B616F746B64
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: How often a migration that ran into a lock timeout (a long refresh holding a row lock
#: that an ALTER TABLE waits for) is tried again before giving up.
LOCK_RETRIES = 5

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text NOT NULL
)
"""


@dataclass(frozen=True)
class Migration:
    """One shipped SQL file."""

    version: int
    name: str
    sql: str
    checksum: str

    @property
    def label(self) -> str:
        """Return the file's stem, e.g. ``0001_initial``."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class AppliedMigration:
    """One row of ``schema_migrations``."""

    version: int
    name: str
    checksum: str
    applied_at: datetime
    applied_by: str


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`migrate` found and did."""

    before: int
    after: int
    applied: tuple[str, ...]


@cache
def shipped_migrations() -> tuple[Migration, ...]:
    """Return the SQL files shipped in the package, in order; they must number 1..N."""
    found: list[Migration] = []
    for entry in (resources.files(__package__) / "sql").iterdir():
        match = _FILE_RE.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise StoreError(f"migration file {entry.name} is not named NNNN_name.sql")
            continue
        data = entry.read_bytes()
        found.append(
            Migration(
                version=int(match.group(1)),
                name=match.group(2),
                sql=data.decode("utf-8"),
                checksum=hashlib.sha256(data).hexdigest(),
            )
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"migration files must be numbered 1..N without gaps, got {versions}")
    return tuple(found)


def code_version() -> int:
    """Return the newest schema version this code knows."""
    return len(shipped_migrations())


async def applied_migrations(conn: AsyncConnection[Any]) -> list[AppliedMigration]:
    """Return the database's ``schema_migrations`` rows (empty for a fresh database)."""
    with store_errors("read the store's schema version"):
        cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = await cur.fetchone()
        if row is None or not row[0]:
            return []
        cur = await conn.execute(
            "SELECT version, name, checksum, applied_at, applied_by"
            " FROM schema_migrations ORDER BY version"
        )
        return [AppliedMigration(*r) for r in await cur.fetchall()]


def check_applied(applied: list[AppliedMigration]) -> int:
    """Return the database's version; StoreSchemaMismatch if this code must not use it."""
    shipped = {m.version: m for m in shipped_migrations()}
    newest = code_version()
    version = max((a.version for a in applied), default=0)
    if version > newest:
        raise StoreSchemaMismatch(
            f"the store's schema is at version {version}, newer than this kakao-tokend "
            f"{__version__} knows (up to {newest}); refusing to touch it",
            hint="upgrade kakao-tokend on this node to the version the other nodes run",
        )
    for row in applied:
        mine = shipped[row.version]
        if row.checksum != mine.checksum:
            raise StoreSchemaMismatch(
                f"schema migration {mine.label} differs from the one applied to the store on "
                f"{row.applied_at:%Y-%m-%d} by {row.applied_by}; released migration files must "
                "never change",
                hint="reinstall an unmodified kakao-tokend (same version as the other nodes)",
            )
    return version


async def schema_version(conn: AsyncConnection[Any]) -> int:
    """Return the database's schema version (0: not initialised), checked against the code."""
    return check_applied(await applied_migrations(conn))


async def migrate(
    conn: AsyncConnection[Any],
    *,
    node: str,
    retries: int = LOCK_RETRIES,
    within: float | None = None,
) -> MigrationResult:
    """Bring the store's schema up to :func:`code_version`; safe to run from every node.

    ``conn`` should be a direct connection made with ``migration=True`` (see
    :func:`kakao_tokend.fleet.db.connect`): the longer lock timeout lets it wait out a
    refresh that holds a row lock, and a lock timeout is retried ``retries`` times.
    ``within`` gives each try that many seconds on the client's side too
    (StoreUnavailable, the connection shut down: db.deadline): the server's timeouts are
    answers that a database gone silent never delivers.
    """
    try:
        from psycopg import errors as pg_errors
        from psycopg.pq import TransactionStatus
    except ImportError as exc:
        raise missing_extra(exc) from None
    if conn.info.transaction_status != TransactionStatus.IDLE:
        # The advisory lock and the DDL must commit when the migration ends, not later.
        raise RuntimeError("migrate() needs a connection without an open transaction")
    for attempt in range(1, retries + 1):
        with store_errors("migrate the store's schema"):
            try:
                async with deadline(conn, within) if within is not None else nullcontext():
                    return await _migrate_once(conn, node=node)
            except TimeoutError:
                assert within is not None  # only the deadline raises it
                raise no_answer("migrate the store's schema", within) from None
            except pg_errors.LockNotAvailable:
                if attempt == retries:
                    raise StoreError(
                        "cannot migrate the store's schema: a table stayed locked through "
                        f"{retries} tries (a long transaction holds it)",
                        hint="find it in pg_stat_activity (state, xact_start) and try again",
                    ) from None
        # Each try already waited lock_timeout for the table; the pause between is the one
        # back-off rule's ladder (half a second first).
        await asyncio.sleep(backoff_delay(attempt, initial=0.5, cap=5.0))
    raise AssertionError("unreachable")  # pragma: no cover


async def _migrate_once(conn: AsyncConnection[Any], *, node: str) -> MigrationResult:
    from psycopg import errors as pg_errors

    migrations = shipped_migrations()
    try:
        async with conn.transaction():
            # Held until this transaction ends: a concurrent migrator waits here, then sees
            # the versions this one recorded and has nothing left to do.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(_BOOTSTRAP)
            before = check_applied(await applied_migrations(conn))
            applied: list[str] = []
            for migration in migrations[before:]:
                # bytes: a file's text is no literal; without parameters psycopg sends it
                # as one simple query, so a file may hold several statements.
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_by)"
                    " VALUES (%s, %s, %s, %s)",
                    (
                        migration.version,
                        migration.name,
                        migration.checksum,
                        f"{node} (kakao-tokend {__version__})",
                    ),
                )
                applied.append(migration.label)
    except pg_errors.DuplicateTable as exc:
        raise StoreError(
            f"cannot create the store's tables: {exc.diag.message_primary or exc}; the "
            "database already holds tables of another program",
            hint="give kakao-tokend a database (or schema) of its own",
        ) from None
    return MigrationResult(before=before, after=len(migrations), applied=tuple(applied))
