"""The store's identity (the ``store_meta`` row) and whether its accounts moved away.

What every node reads at start (FleetStore.open), apart from ``store migrate`` itself
(fleet/migrate.py), so that a node does not import the migration's code (0.2 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import StoreError, StoreMoved
from ..tokens import format_time
from .db import store_errors

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["StoreMeta", "moved_refusal", "read_meta"]


@dataclass(frozen=True)
class StoreMeta:
    """The ``store_meta`` row: which store this is and whether its accounts moved away."""

    store_id: str
    moved_to: str | None
    moved_at: datetime | None
    moved_by: str | None
    moved_note: str | None
    moved_pending: bool


async def read_meta(conn: AsyncConnection[Any]) -> StoreMeta:
    """Return the store's ``store_meta`` row (the schema must be at version 2 or later)."""
    with store_errors("read the store's identity"):
        cur = await conn.execute(
            "SELECT store_id, moved_to, moved_at, moved_by, moved_note, moved_pending"
            " FROM store_meta"
        )
        row = await cur.fetchone()
    if row is None:
        raise StoreError("the store has no store_meta row; it was not created by kakao-tokend")
    store_id, moved_to, moved_at, moved_by, moved_note, pending = row
    return StoreMeta(str(store_id), moved_to, moved_at, moved_by, moved_note, bool(pending))


def moved_refusal(meta: StoreMeta) -> StoreMoved | None:
    """Return why nothing may use this store (its accounts live in files), or None."""
    if meta.moved_to is None:
        return None
    at = format_time(meta.moved_at) if meta.moved_at else "?"
    if meta.moved_pending:
        return StoreMoved(
            f"PostgreSQL store {meta.store_id} is not in use yet: a migration into it from "
            f"the {meta.moved_note}, started at {at}, has not finished (those files are still "
            "the live copy)",
            hint="run `kakao-tokend store migrate --to postgres` there again to finish it",
        )
    return StoreMoved(
        f"the accounts of PostgreSQL store {meta.store_id} were moved to the {meta.moved_note} "
        f"at {at} by `kakao-tokend store migrate --to file`",
        hint='run kakao-tokend there with [store] backend = "file"; to move them back into '
        "this store: kakao-tokend store migrate --to postgres",
    )
