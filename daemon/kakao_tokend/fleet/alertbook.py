"""The alert bookkeeping in the PostgreSQL store: the file's records as ``alerts`` rows.

In file mode ``NAME.alerts.json`` holds ``{"active": {condition: record}}``, where a record
says what was sent and when (kakao_tokend.alerts.AccountAlerts._save). Here each record is one
row keyed by (account, condition); fields without a column of their own (the translatable
``texts`` ...) ride in ``extras``, so a record reads back exactly as it was written.
The functions run inside the caller's transaction, like those of :mod:`.accounts`; a
running node's copy of the table and the rule of who sends is :mod:`.alertshare`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from ..tokens import format_time, parse_time
from . import missing_extra
from .db import store_errors

if TYPE_CHECKING:
    from psycopg import AsyncConnection

#: One account's alert records by condition.
Records = dict[str, dict[str, Any]]

SEVERITIES = ("info", "warning", "critical")
#: Record fields that have a column; everything else goes into ``extras``.
_COLUMNS = ("severity", "stage", "message", "action", "since", "last_sent_at", "sent")


def record_params(account: str, condition: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Return the row for one record; StoreError naming it when it is malformed."""
    try:
        from psycopg.types.json import Jsonb
    except ImportError as exc:
        raise missing_extra(exc) from None
    where = f"alert record {condition!r} of account {account!r}"
    severity = record.get("severity")
    if severity not in SEVERITIES:
        raise StoreError(f"{where}: severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    stage = record.get("stage")
    sent = record.get("sent", 1)
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int | float)):
        raise StoreError(f"{where}: stage must be a number")
    if isinstance(sent, bool) or not isinstance(sent, int) or sent < 0:
        raise StoreError(f"{where}: sent must be a non-negative integer")
    times: dict[str, datetime] = {}
    for name in ("since", "last_sent_at"):
        try:
            times[name] = parse_time(str(record.get(name)))
        except ValueError:
            raise StoreError(f"{where}: {name} is not an RFC 3339 time") from None
    return {
        "account": account,
        "condition": condition,
        "severity": severity,
        "stage": stage,
        "message": str(record.get("message", "")),
        "action": str(record.get("action", "")),
        "since": times["since"],
        "last_sent_at": times["last_sent_at"],
        "sent": sent,
        "extras": Jsonb({k: v for k, v in record.items() if k not in _COLUMNS}),
    }


def row_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """Return the file's record for one ``alerts`` row (the inverse of :func:`record_params`)."""
    record: dict[str, Any] = {
        "severity": row["severity"],
        "stage": row["stage"],
        "message": row["message"],
        "action": row["action"],
        "since": format_time(row["since"]),
        "last_sent_at": format_time(row["last_sent_at"]),
        "sent": row["sent"],
    }
    record.update(row["extras"] or {})
    return record


async def load_records(conn: AsyncConnection[Any], account: str) -> dict[str, dict[str, Any]]:
    """Return ``account``'s active alert records by condition (empty when there are none)."""
    try:
        from psycopg.rows import dict_row
    except ImportError as exc:
        raise missing_extra(exc) from None
    with store_errors(f"read the alerts of account {account!r}"):
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT condition, severity, stage, message, action, since, last_sent_at, sent,"
                " extras FROM alerts WHERE account = %s ORDER BY condition",
                (account,),
            )
            rows = await cur.fetchall()
    return {row["condition"]: row_record(row) for row in rows}


async def load_every_record(conn: AsyncConnection[Any]) -> dict[str, Records]:
    """Return every account's active alert records: account -> condition -> record."""
    try:
        from psycopg.rows import dict_row
    except ImportError as exc:
        raise missing_extra(exc) from None
    found: dict[str, Records] = {}
    with store_errors("read the store's alerts"):
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT account, condition, severity, stage, message, action, since,"
                " last_sent_at, sent, extras FROM alerts"
            )
            for row in await cur.fetchall():
                found.setdefault(row["account"], {})[row["condition"]] = row_record(row)
    return found


async def replace_records(
    conn: AsyncConnection[Any],
    account: str,
    active: Mapping[str, Mapping[str, Any]],
    *,
    node: str | None,
) -> int:
    """Make ``active`` the account's whole alert bookkeeping; return how many records it has.

    ``node`` becomes ``sent_by`` (None: not known, e.g. records brought from the files).
    """
    rows = [record_params(account, condition, record) for condition, record in active.items()]
    with store_errors(f"write the alerts of account {account!r}"):
        await conn.execute("DELETE FROM alerts WHERE account = %s", (account,))
        for params in rows:
            await conn.execute(
                "INSERT INTO alerts (account, condition, severity, stage, message, action, since,"
                " last_sent_at, sent, sent_by, extras) VALUES (%(account)s, %(condition)s,"
                " %(severity)s, %(stage)s, %(message)s, %(action)s, %(since)s, %(last_sent_at)s,"
                " %(sent)s, %(sent_by)s, %(extras)s)",
                {**params, "sent_by": node},
            )
    return len(rows)


async def accounts_with_alerts(conn: AsyncConnection[Any]) -> list[str]:
    """Return every account name that has alert records, sorted."""
    with store_errors("list the store's alerts"):
        cur = await conn.execute("SELECT DISTINCT account FROM alerts ORDER BY account")
        return [name for (name,) in await cur.fetchall()]
