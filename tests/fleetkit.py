"""Helpers for fleet-mode tests: store configs, a migrated store, sample account states."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kakao_tokend.config import Config
from kakao_tokend.fleet import accounts, db, schema
from kakao_tokend.fleet.admin import db_timeouts
from kakao_tokend.fleet.crypto import Keyring, new_key_line
from kakao_tokend.fleet.store import FleetStore
from kakao_tokend.state import AccountState, Rotation
from kakao_tokend.tokens import TokenSet, fingerprint

NODE = "test-node"


def write_key_file(path: Path, lines: Sequence[str]) -> Keyring:
    """Write a key file (mode 600) with ``lines`` (newest last); return its keyring."""
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return Keyring.parse(path.read_text())


def node_store(config: Config, dsn: str, node: str, *, heartbeat: float = 60.0) -> FleetStore:
    """A node's FleetStore for ``config`` (not opened yet): its keyring, timeouts, state dir."""
    assert config.store.keyring is not None
    return FleetStore(
        dsn=dsn,
        keyring=config.store.keyring,
        node=node,
        timeouts=db_timeouts(config),
        state_dir=config.state_dir,
        heartbeat=lambda: heartbeat,
    )


def write_store_config(
    directory: Path,
    dsn: str,
    *,
    keys: Sequence[str] | None = None,
    backend: str = "postgres",
    node_name: str = NODE,
    extra: str = "",
) -> Path:
    """Write a config for the PostgreSQL store (DSN and key in 0600 files); return its path.

    ``keys=None`` writes one fresh key; ``keys=[]`` leaves the key out of the config.
    """
    dsn_file = directory / "dsn"
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    key_file = directory / "store.key"
    lines = [
        "[paths]",
        f'state_dir = "{directory / "state"}"',
        f'runtime_dir = "{directory / "run"}"',
        "[kakao]",
        'rest_api_key = "test-rest-api-key"',
        "[store]",
        f'backend = "{backend}"',
        f'dsn_file = "{dsn_file}"',
        f'node_name = "{node_name}"',
    ]
    key_lines = [new_key_line()] if keys is None else list(keys)
    if key_lines:
        write_key_file(key_file, key_lines)
        lines.append(f'key_file = "{key_file}"')
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


async def until_migration_waits_for_its_lock(dsn: str, node: str = NODE) -> None:
    """Wait until ``node``'s migration waits for a lock (the advisory lock another holds).

    Asked on a connection of its own in autocommit: within one transaction,
    pg_stat_activity keeps showing what it showed first.
    """
    conn = await db.connect(dsn, node="observer", purpose="test", autocommit=True)
    async with conn, asyncio.timeout(20):
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND wait_event_type = 'Lock'",
                (f"kakao-tokend {node} migrate",),
            )
            found = await cur.fetchone()
            if found is not None and found[0] > 0:
                return
            await asyncio.sleep(0.05)


async def migrated(dsn: str) -> None:
    """Apply the schema to the database at ``dsn``."""
    conn = await db.connect(dsn, node=NODE, purpose="migrate", autocommit=True, migration=True)
    async with conn:
        await schema.migrate(conn, node=NODE)


def sample_state(
    name: str = "default",
    *,
    now: datetime | None = None,
    generation: int = 1,
    refresh_token: str | None = None,
    rotations: int = 2,
    **changes: Any,
) -> AccountState:
    """An account state with every field set (optional ones too), as after a few rotations."""
    now = (now or datetime.now(UTC)).replace(microsecond=123456)
    refresh = refresh_token or f"RT-{name}-{generation}-secret"
    tokens = TokenSet(
        access_token=f"AT-{name}-{generation}-secret",
        refresh_token=refresh,
        access_expires_at=now + timedelta(hours=6),
        refresh_expires_at=now + timedelta(days=59),
        access_issued_at=now,
        refresh_issued_at=now - timedelta(days=1),
        refresh_expiry_estimated=False,
        token_type="bearer",
        scope="talk_message profile_nickname",
        id_token=f"IDT-{name}-secret",
        extra={"future_field": {"n": 1}},
    )
    history = tuple(
        Rotation(now - timedelta(days=30 * (rotations - i)), fingerprint(f"old-{name}-{i}"))
        for i in range(rotations)
    )
    values: dict[str, Any] = {
        "account": name,
        "tokens": tokens,
        "generation": generation,
        "refreshed_at": now,
        "rotations": history,
        "relogin_reason": None,
        "user_id": 4242424242,
        "extras": {"imported": {"at": "2025-01-01T00:00:00Z"}},
    }
    values.update(changes)
    return AccountState(**values)


async def store_rows(dsn: str, keyring: Keyring) -> dict[str, accounts.AccountRow]:
    """Every account row, decrypted."""
    conn = await db.connect(dsn, node=NODE, purpose="test")
    async with conn:
        rows = {}
        for name in await accounts.list_account_names(conn):
            row = await accounts.load_account(conn, keyring, name)
            assert row is not None
            rows[name] = row
        return rows
