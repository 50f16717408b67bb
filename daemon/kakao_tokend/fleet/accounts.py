"""One account row of the PostgreSQL store: read, claim, write with compare-and-swap, re-key.

These are the building blocks of the fleet runtime (docs/fleet.md): every function takes an
open connection and runs inside the caller's transaction, so the caller decides how long a
row lock is held. Tokens are sealed with :class:`~kakao_tokend.fleet.crypto.Keyring` on the
way in and unsealed on the way out; nothing outside this module sees a ciphertext.

Writes are compare-and-swap on ``generation``: they name the generation they were computed
from and change nothing (returning False) when another writer got there first.
"""

from __future__ import annotations

import enum
import json
import sys
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, LiteralString, Protocol

from ..errors import TokenDecryptError
from ..state import MAX_ROTATIONS_KEPT, AccountState, Rotation
from . import missing_extra
from .crypto import Keyring
from .db import store_errors
from .packed import EMPTY, PackedState

if TYPE_CHECKING:
    from psycopg import AsyncConnection

#: The LISTEN/NOTIFY channel on which every change of an account is announced.
CHANNEL = "kakao_tokend_accounts"
#: The sealed columns, by the names used in the associated data.
SEALED_COLUMNS = ("access_token", "refresh_token", "id_token", "token_extra")


class Named(Protocol):
    """What gives a row its name object: a cached row, or the account's configuration."""

    @property
    def name(self) -> str: ...


class RowLock(enum.Enum):
    """How :func:`load_account` locks the row (FOR UPDATE variants; none outside a tx)."""

    NONE = ""
    WAIT = " FOR UPDATE OF a"
    NOWAIT = " FOR UPDATE OF a NOWAIT"
    SKIP = " FOR UPDATE OF a SKIP LOCKED"


@dataclass(frozen=True, slots=True)
class RefreshStatus:
    """Failure bookkeeping the nodes share, so status and alerts agree everywhere."""

    #: Consecutive failed attempts since the last success (0 when healthy).
    attempts: int = 0
    failing_since: datetime | None = None
    last_attempt_at: datetime | None = None
    last_attempt_by: str | None = None
    #: A readable message and its class label (KOE322, timeout ...); never a token.
    last_error: str | None = None
    last_error_class: str | None = None
    #: The last refresh inside the rotation window that did not rotate (None after a rotation).
    rotation_missed_at: datetime | None = None


class AccountRow:
    """An account as the store holds it, tokens decrypted (a node caches one per account).

    Immutable. The state is kept packed (fleet/packed.py): :attr:`state` makes its objects
    when asked, the same object while anyone holds it. A node's 10,000 cached rows sit idle
    for hours, and their states as objects were most of its memory (docs/benchmarks.md).
    """

    __slots__ = ("due_at", "key_id", "packed", "refreshed_by", "status", "uid", "updated_at")

    #: The row's id (a UUID) as its 128-bit number: a ``uuid.UUID`` is an object more,
    #: 56 bytes of each of a node's 10,000 cached rows (:attr:`id` makes one when asked).
    uid: int
    #: The account's state, packed.
    packed: PackedState
    #: The key that sealed this row's tokens.
    key_id: str
    #: When a node should claim the account (database clock); None: never (re-login needed).
    due_at: datetime | None
    #: The node that produced the current token set (None: not known, e.g. after an import).
    refreshed_by: str | None
    status: RefreshStatus
    updated_at: datetime | None

    def __init__(
        self,
        uid: int,
        state: AccountState | PackedState,
        key_id: str,
        due_at: datetime | None,
        refreshed_by: str | None = None,
        status: RefreshStatus | None = None,
        updated_at: datetime | None = None,
    ) -> None:
        put = object.__setattr__
        put(self, "uid", uid)
        put(self, "packed", state if isinstance(state, PackedState) else PackedState.of(state))
        put(self, "key_id", key_id)
        put(self, "due_at", due_at)
        put(self, "refreshed_by", refreshed_by)
        put(self, "status", _HEALTHY if status is None else status)
        put(self, "updated_at", updated_at)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    @property
    def state(self) -> AccountState:
        """Return the account's state (made from the packed values when nobody holds it)."""
        return self.packed.state

    def with_state(self, state: AccountState | PackedState) -> AccountRow:
        """Return this row holding ``state`` (or that packed state, shared) instead."""
        return AccountRow(
            self.uid,
            state,
            self.key_id,
            self.due_at,
            self.refreshed_by,
            self.status,
            self.updated_at,
        )

    @property
    def id(self) -> uuid.UUID:
        """Return the row's id (bound into every sealed value's associated data)."""
        return uuid.UUID(int=self.uid)

    @property
    def name(self) -> str:
        """Return the account's name."""
        return self.packed.account

    @property
    def generation(self) -> int:
        """Return the generation the row is at (the compare-and-swap value)."""
        return self.packed.generation

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccountRow):
            return NotImplemented
        return (
            self.uid == other.uid
            and self.key_id == other.key_id
            and self.due_at == other.due_at
            and self.refreshed_by == other.refreshed_by
            and self.status == other.status
            and self.updated_at == other.updated_at
            and self.packed.same_as(other.packed)
        )

    def __hash__(self) -> int:
        return hash((self.uid, self.generation))

    def __repr__(self) -> str:
        return (
            f"AccountRow(uid={self.uid!r}, state={self.state!r}, key_id={self.key_id!r},"
            f" due_at={self.due_at!r}, refreshed_by={self.refreshed_by!r},"
            f" status={self.status!r}, updated_at={self.updated_at!r})"
        )


@dataclass(frozen=True)
class RekeyResult:
    """What :func:`rekey_accounts` did."""

    #: Rows re-encrypted under the newest key now.
    rekeyed: int
    #: Every row's key id afterwards, with its count.
    by_key: Mapping[str, int]
    newest: str

    @property
    def remaining(self) -> int:
        """Return how many rows are still sealed with an older key."""
        return sum(count for key_id, count in self.by_key.items() if key_id != self.newest)


# ---------------------------------------------------------------------------------------------
# SQL. The rotation log rides along in the same statement: one round trip per read or write.

_SELECT: LiteralString = """
SELECT a.id, a.name, a.generation, a.key_id,
       a.access_token, a.refresh_token, a.id_token, a.token_extra,
       a.token_type, a.scope, a.access_issued_at, a.access_expires_at,
       a.refresh_issued_at, a.refresh_expires_at, a.refresh_expiry_estimated,
       a.user_id, a.relogin_reason, a.relogin_cause, a.extras, a.due_at, a.refreshed_at,
       a.refreshed_by,
       a.attempts, a.failing_since, a.last_attempt_at, a.last_attempt_by,
       a.last_error, a.last_error_class, a.rotation_missed_at, a.updated_at,
       r.rotation_times, r.rotation_fingerprints, r.rotation_replaced
FROM accounts a
LEFT JOIN LATERAL (
    SELECT array_agg(k.rotated_at ORDER BY k.rotated_at) AS rotation_times,
           array_agg(k.fingerprint ORDER BY k.rotated_at) AS rotation_fingerprints,
           array_agg(k.replaced ORDER BY k.rotated_at) AS rotation_replaced
    FROM (SELECT rotated_at, fingerprint, replaced FROM rotations WHERE account_id = a.id
          ORDER BY rotated_at DESC LIMIT %(rotations_kept)s) k
) r ON true
"""

_LOG_ROTATIONS: LiteralString = """
logged AS (
    INSERT INTO rotations (account_id, rotated_at, fingerprint, replaced, generation, node)
    SELECT w.id, r.rotated_at, r.fingerprint, r.replaced, %(generation)s, %(node)s
    FROM written w,
         unnest(%(rotation_times)s::timestamptz[], %(rotation_fingerprints)s::text[],
                %(rotation_replaced)s::text[])
             AS r(rotated_at, fingerprint, replaced)
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM written
"""

_INSERT: LiteralString = (
    """
WITH written AS (
    INSERT INTO accounts (
        id, name, generation, key_id, access_token, refresh_token, id_token, token_extra,
        token_type, scope, access_issued_at, access_expires_at, refresh_issued_at,
        refresh_expires_at, refresh_expiry_estimated, user_id, relogin_reason, relogin_cause,
        extras, due_at, refreshed_at, refreshed_by, attempts, failing_since, last_attempt_at,
        last_attempt_by, last_error, last_error_class, rotation_missed_at)
    VALUES (
        %(id)s, %(name)s, %(generation)s, %(key_id)s, %(access_token)s, %(refresh_token)s,
        %(id_token)s, %(token_extra)s, %(token_type)s, %(scope)s, %(access_issued_at)s,
        %(access_expires_at)s, %(refresh_issued_at)s, %(refresh_expires_at)s,
        %(refresh_expiry_estimated)s, %(user_id)s, %(relogin_reason)s, %(relogin_cause)s,
        %(extras)s, %(due_at)s, %(refreshed_at)s, %(refreshed_by)s, %(attempts)s, %(failing_since)s,
        %(last_attempt_at)s, %(last_attempt_by)s, %(last_error)s, %(last_error_class)s,
        %(rotation_missed_at)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING id
),"""
    + _LOG_ROTATIONS
)

_UPDATE: LiteralString = (
    """
WITH written AS (
    UPDATE accounts SET
        generation = %(generation)s, key_id = %(key_id)s,
        access_token = %(access_token)s, refresh_token = %(refresh_token)s,
        id_token = %(id_token)s, token_extra = %(token_extra)s,
        token_type = %(token_type)s, scope = %(scope)s,
        access_issued_at = %(access_issued_at)s, access_expires_at = %(access_expires_at)s,
        refresh_issued_at = %(refresh_issued_at)s, refresh_expires_at = %(refresh_expires_at)s,
        refresh_expiry_estimated = %(refresh_expiry_estimated)s, user_id = %(user_id)s,
        relogin_reason = %(relogin_reason)s, relogin_cause = %(relogin_cause)s,
        extras = %(extras)s, due_at = %(due_at)s,
        -- refreshed_by names the node that produced the tokens: it changes with refreshed_at.
        refreshed_by = CASE WHEN refreshed_at IS DISTINCT FROM %(refreshed_at)s::timestamptz
                            THEN %(refreshed_by)s ELSE refreshed_by END,
        refreshed_at = %(refreshed_at)s,
        attempts = %(attempts)s, failing_since = %(failing_since)s,
        last_attempt_at = %(last_attempt_at)s, last_attempt_by = %(last_attempt_by)s,
        last_error = %(last_error)s, last_error_class = %(last_error_class)s,
        rotation_missed_at = %(rotation_missed_at)s, updated_at = now()
    WHERE id = %(id)s AND generation = %(expected)s
    RETURNING id
),"""
    + _LOG_ROTATIONS
)

_UPDATE_STATUS: LiteralString = """
UPDATE accounts SET
    due_at = %(due_at)s, attempts = %(attempts)s, failing_since = %(failing_since)s,
    last_attempt_at = %(last_attempt_at)s, last_attempt_by = %(last_attempt_by)s,
    last_error = %(last_error)s, last_error_class = %(last_error_class)s,
    rotation_missed_at = %(rotation_missed_at)s, updated_at = now()
WHERE id = %(id)s AND generation = %(expected)s
"""


# ---------------------------------------------------------------------------------------------
# Reading


async def load_account(
    conn: AsyncConnection[Any],
    keyring: Keyring,
    name: str,
    *,
    lock: RowLock = RowLock.NONE,
    rotations: int = MAX_ROTATIONS_KEPT,
    names: Mapping[str, Named] | None = None,
) -> AccountRow | None:
    """Return the account named ``name`` (None if there is none), optionally locking its row.

    With ``RowLock.SKIP`` a row another session holds reads as None, like a missing one; with
    ``RowLock.NOWAIT`` it raises StoreUnavailable. A lock lasts until the caller's
    transaction ends, so locking needs a connection that is not in autocommit mode. The
    state holds the newest ``rotations`` entries of the rotation log.
    """
    _needs_transaction(conn, lock)
    with store_errors(f"read account {name!r} from the store"):
        rows = await _select(
            conn,
            _SELECT + " WHERE a.name = %(name)s" + lock.value,
            name=name,
            rotations_kept=rotations,
        )
    return _row(rows[0], keyring, names) if rows else None


async def load_every_account(
    conn: AsyncConnection[Any],
    keyring: Keyring,
    *,
    only: Collection[str] | None = None,
    after: str | None = None,
    limit: int | None = None,
    rotations: int = MAX_ROTATIONS_KEPT,
    names: Mapping[str, Named] | None = None,
) -> tuple[dict[str, AccountRow], dict[str, TokenDecryptError]]:
    """Return every account row (or those named in ``only``), read with one query, unlocked.

    One round trip whatever the number of accounts: a query per account made a node with a
    few thousand accounts miss its start-up deadline, and a node continued after a pause
    catch up one notification at a time. A row that does not decrypt (wrong key, a
    ciphertext moved between rows) is returned by name in the second mapping, so one bad row
    never hides the others. A name in ``only`` without a row is in neither mapping.

    ``after`` and ``limit`` read one page in the names' code point order (the rows named
    after ``after``): a node reads its thousands of rows page by page (FleetStore.load_all).
    Each state holds the newest ``rotations`` entries of its rotation log. A row named in
    ``names`` (the configured accounts, or the caller's cached rows) gives each row the
    name object found there (see _row).
    """
    where = []
    if only is not None:
        where.append("a.name = ANY(%(names)s)")
    if after is not None:
        where.append('a.name COLLATE "C" > %(after)s')
    query = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
    if after is not None or limit is not None:
        # Pages follow code point order, as Python compares the names that say where the
        # next page starts; a locale's collation would skip or repeat rows between pages.
        query += ' ORDER BY a.name COLLATE "C" LIMIT %(limit)s'
    else:
        query += " ORDER BY a.name"
    with store_errors("read the store's accounts"):
        raws = await _select(
            conn,
            query,  # built from literals only
            names=sorted(only) if only is not None else None,
            after=after,
            limit=limit,
            rotations_kept=rotations,
        )
    rows: dict[str, AccountRow] = {}
    unreadable: dict[str, TokenDecryptError] = {}
    for raw in raws:
        try:
            row = _row(raw, keyring, names)
            rows[row.name] = row
        except TokenDecryptError as exc:
            unreadable[raw["name"]] = exc
    return rows, unreadable


async def load_rotations(
    conn: AsyncConnection[Any], names: Collection[str]
) -> dict[str, tuple[Rotation, ...]]:
    """Return the rotation log (the newest MAX_ROTATIONS_KEPT entries, oldest first) of each
    account named in ``names`` that has a row, with one query: what ``status`` lists, while
    a node's cached rows keep only the newest rotation."""
    with store_errors("read the store's rotation log"):
        cur = await conn.execute(
            "SELECT a.name, k.rotated_at, k.fingerprint, k.replaced FROM accounts a"
            " LEFT JOIN LATERAL (SELECT rotated_at, fingerprint, replaced FROM rotations"
            "   WHERE account_id = a.id ORDER BY rotated_at DESC LIMIT %(kept)s) k ON true"
            " WHERE a.name = ANY(%(names)s) ORDER BY a.name, k.rotated_at",
            {"kept": MAX_ROTATIONS_KEPT, "names": sorted(names)},
        )
        listed = await cur.fetchall()
    found: dict[str, list[Rotation]] = {}
    for name, at, fingerprint, replaced in listed:
        entries = found.setdefault(name, [])
        if at is not None:
            entries.append(Rotation(at.astimezone(UTC), fingerprint, replaced=replaced))
    return {name: tuple(entries) for name, entries in found.items()}


async def claim_due(
    conn: AsyncConnection[Any], keyring: Keyring, *, limit: int = 1
) -> list[AccountRow]:
    """Lock and return up to ``limit`` accounts that are due, skipping rows others hold.

    Due means ``due_at <= now()`` by the database's clock, so the nodes' clocks need not
    agree. Earliest first. The locks last until the caller's transaction ends: hold it across
    the Kakao call and commit the new state in it (docs/fleet.md, "The refresh transaction").
    """
    _needs_transaction(conn, RowLock.SKIP)
    query = (
        _SELECT + " WHERE a.due_at <= now() ORDER BY a.due_at LIMIT %(limit)s" + RowLock.SKIP.value
    )
    with store_errors("claim due accounts"):
        rows = await _select(conn, query, limit=limit)
    return [_row(row, keyring) for row in rows]


async def list_account_names(conn: AsyncConnection[Any]) -> list[str]:
    """Return the name of every account in the store, sorted."""
    with store_errors("list the store's accounts"):
        cur = await conn.execute("SELECT name FROM accounts ORDER BY name")
        return [name for (name,) in await cur.fetchall()]


# ---------------------------------------------------------------------------------------------
# Writing


async def insert_account(
    conn: AsyncConnection[Any],
    keyring: Keyring,
    state: AccountState,
    *,
    node: str,
    due_at: datetime | None,
    status: RefreshStatus | None = None,
    row_id: uuid.UUID | None = None,
) -> AccountRow | None:
    """Add a new account row; return it, or None when the name exists already.

    The row id is made here (uuid4) before anything is sealed, because the id is part of
    the associated data. ``state``'s rotations are logged too (an import or a migration
    brings its history along).
    """
    row_id = row_id or uuid.uuid4()
    params = _write_params(keyring, row_id, state, node=node, due_at=due_at, status=status)
    params["refreshed_by"] = node if state.refreshed_at is not None else None
    with store_errors(f"add account {state.account!r} to the store"):
        cur = await conn.execute(_INSERT, params)
        row = await cur.fetchone()
    if row is None or row[0] != 1:
        return None
    return AccountRow(
        uid=row_id.int,
        state=_kept_rotations(state),
        key_id=keyring.newest.key_id,
        due_at=due_at,
        refreshed_by=node if state.refreshed_at is not None else None,
        status=status or RefreshStatus(),
    )


async def save_account(
    conn: AsyncConnection[Any],
    keyring: Keyring,
    row: AccountRow,
    state: AccountState,
    *,
    node: str,
    due_at: datetime | None,
    status: RefreshStatus | None = None,
) -> bool:
    """Write ``state`` over ``row`` if the row is still at ``row.generation``; True if written.

    False means another writer changed the row since ``row`` was read: re-read it and decide
    again (under READ COMMITTED the UPDATE first waits for that writer's commit). ``state``
    must not go back in generation. New rotations are logged with this node's name, and
    ``refreshed_by`` becomes ``node`` when ``refreshed_at`` changes. Everything is re-sealed
    with the newest key.
    """
    if state.account != row.name:
        raise ValueError(f"cannot write account {state.account!r} over row of {row.name!r}")
    if state.generation < row.generation:
        raise ValueError(
            f"account {row.name!r}: generation {state.generation} is older than the row's "
            f"{row.generation}"
        )
    params = _write_params(keyring, row.id, state, node=node, due_at=due_at, status=status)
    params["expected"] = row.generation
    with store_errors(f"save account {row.name!r} to the store"):
        cur = await conn.execute(_UPDATE, params)
        result = await cur.fetchone()
    return result is not None and result[0] == 1


async def save_status(
    conn: AsyncConnection[Any],
    row: AccountRow,
    *,
    due_at: datetime | None,
    status: RefreshStatus,
) -> bool:
    """Update only the scheduling and failure bookkeeping, if the row is still at
    ``row.generation`` (no token changes, nothing re-sealed); True if written."""
    params = {"id": row.id, "expected": row.generation, "due_at": due_at, **_status(status)}
    with store_errors(f"save the status of account {row.name!r}"):
        cur = await conn.execute(_UPDATE_STATUS, params)
    return cur.rowcount == 1


async def delete_account(conn: AsyncConnection[Any], name: str) -> bool:
    """Delete the account's row and its rotation log (logout); True if there was one."""
    with store_errors(f"delete account {name!r} from the store"):
        cur = await conn.execute("DELETE FROM accounts WHERE name = %s", (name,))
    return cur.rowcount == 1


async def deleted_generation(conn: AsyncConnection[Any], name: str) -> int:
    """Return the highest generation a deleted row of ``name`` had (0: none was deleted).

    Recorded by a trigger on every deletion (sql/0004_generation_after_logout.sql): a new row
    of that name (a login, an import after a logout) continues above it.
    """
    with store_errors(f"read the generation account {name!r} was logged out at"):
        cur = await conn.execute("SELECT generation FROM deleted_accounts WHERE name = %s", (name,))
        row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


async def deleted_generations(conn: AsyncConnection[Any], names: Collection[str]) -> dict[str, int]:
    """Return :func:`deleted_generation` of each of ``names`` that has one, with one query."""
    with store_errors("read the generations accounts were logged out at"):
        cur = await conn.execute(
            "SELECT name, generation FROM deleted_accounts WHERE name = ANY(%s)", (sorted(names),)
        )
        return {name: int(generation) for name, generation in await cur.fetchall()}


async def record_deleted_generation(conn: AsyncConnection[Any], name: str, generation: int) -> None:
    """Record that account ``name`` had ``generation`` before it lost its tokens, unless a
    higher one is recorded: what the file store's logout record brings along in a migration
    (the trigger records the store's own deletions)."""
    with store_errors(f"record the generation account {name!r} was logged out at"):
        await conn.execute(
            "INSERT INTO deleted_accounts AS d (name, generation) VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET generation = EXCLUDED.generation,"
            " deleted_at = EXCLUDED.deleted_at WHERE d.generation < EXCLUDED.generation",
            (name, generation),
        )


async def notify_changed(conn: AsyncConnection[Any], name: str, generation: int) -> None:
    """Announce a change of ``name`` to every listening node, delivered at commit.

    The payload is ``name:generation``: ids only, never tokens (payloads are limited to
    8000 bytes, and every session of the database may LISTEN).
    """
    with store_errors("notify the other nodes"):
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{name}:{generation}"))


def parse_notification(payload: str) -> tuple[str, int] | None:
    """Return (account, generation) from a :func:`notify_changed` payload, None if foreign."""
    name, sep, generation = payload.rpartition(":")
    if not sep or not name or not generation.isdigit():
        return None
    return name, int(generation)


# ---------------------------------------------------------------------------------------------
# Re-keying


async def rekey_accounts(
    conn: AsyncConnection[Any], keyring: Keyring, *, batch: int = 100, busy_wait: float = 120.0
) -> RekeyResult:
    """Re-seal every row not under the newest key, ``batch`` rows per transaction.

    Each batch locks its rows (FOR UPDATE SKIP LOCKED, so running refreshes are not held
    up), unseals with whichever key sealed them and seals again with the newest; the
    generation does not change, because the tokens do not. Rows that refreshes held are
    then done one by one, waiting up to ``busy_wait`` seconds for each lock. Running it again
    finds nothing to do. ``conn`` must not be in autocommit mode or inside a transaction.
    """
    newest = keyring.newest.key_id
    rekeyed = 0
    while True:
        async with conn.transaction():
            with store_errors("re-encrypt the store"):
                rows = await _select(
                    conn,
                    _SELECT
                    + " WHERE a.key_id <> %(newest)s ORDER BY a.id LIMIT %(batch)s"
                    + RowLock.SKIP.value,
                    newest=newest,
                    batch=batch,
                )
            for raw in rows:
                rekeyed += await _rekey_row(conn, keyring, raw)
        if len(rows) < batch:
            break
    # What is left was locked by running refreshes: wait for each in turn.
    with store_errors("re-encrypt the store"):
        cur = await conn.execute(
            "SELECT id FROM accounts WHERE key_id <> %s ORDER BY id", (newest,)
        )
        busy = [row_id for (row_id,) in await cur.fetchall()]
        await conn.commit()
    for row_id in busy:
        async with conn.transaction():
            with store_errors("re-encrypt the store (waiting for a refresh to finish)"):
                await conn.execute(
                    "SELECT set_config('lock_timeout', %s, true),"
                    " set_config('statement_timeout', %s, true)",
                    (f"{int(busy_wait * 1000)}ms", f"{int(busy_wait * 1000) + 1000}ms"),
                )
                rows = await _select(
                    conn,
                    _SELECT
                    + " WHERE a.id = %(id)s AND a.key_id <> %(newest)s"
                    + RowLock.WAIT.value,
                    id=row_id,
                    newest=newest,
                )
            for raw in rows:
                rekeyed += await _rekey_row(conn, keyring, raw)
    with store_errors("count the store's keys"):
        cur = await conn.execute("SELECT key_id, count(*) FROM accounts GROUP BY key_id")
        by_key = {key_id: count for key_id, count in await cur.fetchall()}
        await conn.commit()
    return RekeyResult(rekeyed=rekeyed, by_key=by_key, newest=newest)


async def _rekey_row(conn: AsyncConnection[Any], keyring: Keyring, raw: Mapping[str, Any]) -> int:
    row_id: uuid.UUID = raw["id"]
    name: str = raw["name"]
    params: dict[str, Any] = {"id": row_id, "key_id": keyring.newest.key_id}
    for column in SEALED_COLUMNS:
        blob = raw[column]
        if blob is None:
            params[column] = None
            continue
        plain = keyring.unseal(bytes(blob), account=name, row_id=row_id, column=column)
        params[column] = keyring.seal(plain, account=name, row_id=row_id, column=column)
    with store_errors(f"re-encrypt account {name!r}"):
        cur = await conn.execute(
            "UPDATE accounts SET key_id = %(key_id)s, access_token = %(access_token)s,"
            " refresh_token = %(refresh_token)s, id_token = %(id_token)s,"
            " token_extra = %(token_extra)s, updated_at = now() WHERE id = %(id)s",
            params,
        )
    return cur.rowcount


# ---------------------------------------------------------------------------------------------
# Row <-> AccountState


def _needs_transaction(conn: AsyncConnection[Any], lock: RowLock) -> None:
    if lock is not RowLock.NONE and conn.autocommit:
        # In autocommit the lock would end with the statement: a silent no-op lock.
        raise RuntimeError("row locks need a connection that is not in autocommit mode")


async def _select(conn: AsyncConnection[Any], query: LiteralString, **params: Any) -> list[Any]:
    try:
        from psycopg.rows import dict_row
    except ImportError as exc:
        raise missing_extra(exc) from None
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, {"rotations_kept": MAX_ROTATIONS_KEPT, **params})
        return await cur.fetchall()


#: Values that repeat across thousands of rows (token_type, scope, key and node names, error
#: classes): one string each instead of one per row. Bounded: only strings this short.
_INTERN_UP_TO = 200
#: The shared empty ``extra``/``extras``: most rows have none, and an empty dict is 64 bytes.
_EMPTY = EMPTY


#: The status of every row that never failed: one object for all of them.
_HEALTHY = RefreshStatus()


def _shared(text: str | None) -> str | None:
    return sys.intern(text) if text is not None and len(text) <= _INTERN_UP_TO else text


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


def _row(
    raw: Mapping[str, Any], keyring: Keyring, names: Mapping[str, Named] | None = None
) -> AccountRow:
    row_id: uuid.UUID = raw["id"]
    name: str = raw["name"]
    known = names.get(name) if names is not None else None
    if known is not None:
        # The name object the node holds already (the configuration's, see
        # FleetStore.account_store): each read would otherwise keep one more copy.
        name = known.name

    def unseal(column: str) -> str | None:
        blob = raw[column]
        if blob is None:
            return None
        return keyring.unseal(bytes(blob), account=name, row_id=row_id, column=column).decode()

    access_token = unseal("access_token")
    refresh_token = unseal("refresh_token")
    assert access_token is not None and refresh_token is not None  # NOT NULL columns
    extra_text = unseal("token_extra")
    refreshed_at = raw["refreshed_at"]
    times = raw["rotation_times"] or ()
    # Packed at once: no AccountState or TokenSet is made for a row nobody uses yet.
    state = PackedState.pack(
        name,
        generation=raw["generation"],
        user_id=raw["user_id"],
        access_token=access_token,
        refresh_token=refresh_token,
        id_token=unseal("id_token"),
        access_expires_at=raw["access_expires_at"],
        refresh_expires_at=raw["refresh_expires_at"],
        access_issued_at=raw["access_issued_at"],
        refresh_issued_at=raw["refresh_issued_at"],
        refresh_expiry_estimated=raw["refresh_expiry_estimated"],
        refreshed_at=refreshed_at,
        rotations=[
            Rotation(at.astimezone(UTC), fingerprint, replaced)
            for at, fingerprint, replaced in zip(
                times,
                raw["rotation_fingerprints"] or (),
                raw["rotation_replaced"] or (None,) * len(times),
                strict=True,
            )
        ],
        refs=(
            sys.intern(raw["token_type"]),
            _shared(raw["scope"]),
            raw["relogin_reason"],
            _shared(raw["relogin_cause"]),
            raw["extras"] or _EMPTY,
            json.loads(extra_text) if extra_text else _EMPTY,
        ),
    )
    status = RefreshStatus(
        attempts=raw["attempts"],
        failing_since=_utc(raw["failing_since"]),
        last_attempt_at=_utc(raw["last_attempt_at"]),
        last_attempt_by=_shared(raw["last_attempt_by"]),
        last_error=_shared(raw["last_error"]),
        last_error_class=_shared(raw["last_error_class"]),
        rotation_missed_at=_utc(raw["rotation_missed_at"]),
    )
    return AccountRow(
        uid=row_id.int,
        state=state,
        key_id=sys.intern(raw["key_id"]),
        due_at=_utc(raw["due_at"]),
        refreshed_by=_shared(raw["refreshed_by"]),
        status=_HEALTHY if status == _HEALTHY else status,
        updated_at=_utc(raw["updated_at"]),
    )


def _status(status: RefreshStatus) -> dict[str, Any]:
    return {
        "attempts": status.attempts,
        "failing_since": status.failing_since,
        "last_attempt_at": status.last_attempt_at,
        "last_attempt_by": status.last_attempt_by,
        "last_error": status.last_error,
        "last_error_class": status.last_error_class,
        "rotation_missed_at": status.rotation_missed_at,
    }


def _kept_rotations(state: AccountState) -> AccountState:
    if len(state.rotations) <= MAX_ROTATIONS_KEPT:
        return state
    return replace(state, rotations=state.rotations[-MAX_ROTATIONS_KEPT:])


def _write_params(
    keyring: Keyring,
    row_id: uuid.UUID,
    state: AccountState,
    *,
    node: str,
    due_at: datetime | None,
    status: RefreshStatus | None,
) -> dict[str, Any]:
    try:
        from psycopg.types.json import Jsonb
    except ImportError as exc:
        raise missing_extra(exc) from None
    tokens = state.tokens
    name = state.account

    def seal(column: str, text: str | None) -> bytes | None:
        if text is None:
            return None
        return keyring.seal(text.encode(), account=name, row_id=row_id, column=column)

    extra = json.dumps(dict(tokens.extra), ensure_ascii=False) if tokens.extra else None
    rotations: Sequence[Rotation] = state.rotations
    return {
        "id": row_id,
        "name": name,
        "generation": state.generation,
        "key_id": keyring.newest.key_id,
        "access_token": seal("access_token", tokens.access_token),
        "refresh_token": seal("refresh_token", tokens.refresh_token),
        "id_token": seal("id_token", tokens.id_token),
        "token_extra": seal("token_extra", extra),
        "token_type": tokens.token_type,
        "scope": tokens.scope,
        "access_issued_at": tokens.access_issued_at,
        "access_expires_at": tokens.access_expires_at,
        "refresh_issued_at": tokens.refresh_issued_at,
        "refresh_expires_at": tokens.refresh_expires_at,
        "refresh_expiry_estimated": tokens.refresh_expiry_estimated,
        "user_id": state.user_id,
        "relogin_reason": state.relogin_reason,
        "relogin_cause": state.relogin_cause,
        "extras": Jsonb(dict(state.extras)),
        "due_at": due_at,
        "refreshed_at": state.refreshed_at,
        "refreshed_by": node,
        "node": node,
        "rotation_times": [r.at for r in rotations],
        "rotation_fingerprints": [r.fingerprint for r in rotations],
        "rotation_replaced": [r.replaced for r in rotations],
        **_status(status or RefreshStatus()),
    }
