"""The store's schema against a real PostgreSQL: fresh, idempotent, concurrent, refusals."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import psycopg
import pytest

from fleetkit import NODE, migrated, sample_state
from kakao_tokend.errors import StoreError, StoreSchemaMismatch
from kakao_tokend.fleet import accounts, db, schema
from kakao_tokend.fleet.crypto import Keyring, new_key_line

pytestmark = pytest.mark.timeout(60)

#: Released migrations never change (nodes refuse a database whose record differs). Pinning
#: their hashes here makes an accidental edit fail in CI instead of in production. Before
#: the first release of fleet mode, a deliberate change updates the hash here too.
RELEASED = {
    1: ("0001_initial", "bedd9587b81da121453168fc1079e2e77a4aae45f97b061226a2d32f81644ea4"),
    2: (
        "0002_full_state_and_migration",
        "e4cb2724db826c3ecc00340c04c59a468fea15f7646a2eae2f2e6a8f23ce1d81",
    ),
    3: (
        "0003_incremental_poll",
        "144dc860a29201fe641dc067cb227b6d98c63c306eb4a10ab66c4a491eacdea8",
    ),
    4: (
        "0004_generation_after_logout",
        "b7cb13610bc33458e1cc6940365e11df409c1b6693e00ad00993961f11b7e122",
    ),
}


async def _tables(dsn: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        return {name for (name,) in await cur.fetchall()}


async def _migrate(
    dsn: str, node: str = NODE, timeouts: db.DbTimeouts | None = None
) -> schema.MigrationResult:
    conn = await db.connect(
        dsn, node=node, purpose="migrate", autocommit=True, migration=True, timeouts=timeouts
    )
    async with conn:
        return await schema.migrate(conn, node=node, retries=3)


def test_shipped_migrations_number_from_one_without_gaps_and_never_change() -> None:
    """The package ships its SQL files, numbered 1..N; released ones are byte for byte the same."""
    shipped = schema.shipped_migrations()
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))
    assert schema.code_version() == len(shipped) >= 1
    for version, (label, checksum) in RELEASED.items():
        assert (shipped[version - 1].label, shipped[version - 1].checksum) == (label, checksum)


def test_the_sql_files_are_package_data_in_the_wheel() -> None:
    """pyproject ships fleet/sql/*.sql: without them an installed node could not migrate."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["kakao_tokend"]
    package = root / "daemon" / "kakao_tokend"
    shipped = {p for pattern in globs for p in package.glob(pattern)}
    assert {package / "fleet" / "sql" / f"{m.label}.sql" for m in schema.shipped_migrations()} <= (
        shipped
    )


async def test_a_fresh_database_gets_every_table_and_its_version(pg_dsn: str) -> None:
    """First start: all migrations apply in order, recorded with their checksums."""
    result = await _migrate(pg_dsn)
    assert result.before == 0
    assert result.after == schema.code_version()
    assert result.applied == tuple(m.label for m in schema.shipped_migrations())
    assert {"accounts", "rotations", "alerts", "nodes", "store_meta", "schema_migrations"} <= (
        await _tables(pg_dsn)
    )
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT version, checksum, applied_by FROM schema_migrations")
        rows = await cur.fetchall()
        cur = await conn.execute(
            "SELECT count(*), count(store_id), count(moved_to) FROM store_meta"
        )
        meta = await cur.fetchone()
    assert [(v, c) for v, c, _ in rows] == [
        (m.version, m.checksum) for m in schema.shipped_migrations()
    ]
    assert all(by.startswith(f"{NODE} (kakao-tokend ") for _, _, by in rows)
    assert meta == (1, 1, 0)  # one store_meta row, with an id, not moved


async def test_migrating_again_changes_nothing(pg_dsn: str) -> None:
    """Every node migrates at start: the second and later runs are no-ops."""
    await _migrate(pg_dsn)
    again = await _migrate(pg_dsn)
    assert again.before == again.after == schema.code_version()
    assert again.applied == ()
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM schema_migrations")
        assert await cur.fetchone() == (schema.code_version(),)
        cur = await conn.execute("SELECT count(*) FROM store_meta")
        assert await cur.fetchone() == (1,)


async def test_three_nodes_starting_at_once_apply_the_schema_once(pg_dsn: str) -> None:
    """Concurrent migrators serialise on the advisory lock: one applies, two find it done."""
    results = await asyncio.gather(*(_migrate(pg_dsn, node=f"node-{i}") for i in range(3)))
    applied = [r for r in results if r.applied]
    assert len(applied) == 1
    assert all(r.after == schema.code_version() for r in results)
    assert sorted(r.before for r in results) == [0, schema.code_version(), schema.code_version()]
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM schema_migrations")
        assert await cur.fetchone() == (schema.code_version(),)


async def test_a_database_newer_than_the_code_is_refused(pg_dsn: str) -> None:
    """A node with older code must not write rows a newer schema does not expect."""
    await migrated(pg_dsn)
    newer = schema.code_version() + 1
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum, applied_by)"
            " VALUES (%s, 'from_the_future', 'x', 'web-9 (kakao-tokend 9.9)')",
            (newer,),
        )
    with pytest.raises(StoreSchemaMismatch) as caught:
        await _migrate(pg_dsn)
    message = str(caught.value)
    assert f"schema is at version {newer}, newer than this kakao-tokend" in message
    assert f"knows (up to {schema.code_version()})" in message
    assert "upgrade kakao-tokend on this node" in message
    conn = await db.connect(pg_dsn, node=NODE, purpose="check")
    async with conn:
        with pytest.raises(StoreSchemaMismatch):
            await schema.schema_version(conn)


async def test_an_applied_migration_that_changed_is_refused(pg_dsn: str) -> None:
    """A record whose checksum differs from the shipped file: the code does not match."""
    await migrated(pg_dsn)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await conn.execute(
            "UPDATE schema_migrations SET checksum = %s WHERE version = 1",
            (hashlib.sha256(b"edited").hexdigest(),),
        )
    with pytest.raises(StoreSchemaMismatch, match="0001_initial differs from the one applied"):
        await _migrate(pg_dsn)


async def test_a_database_with_foreign_tables_gets_a_clear_error(pg_dsn: str) -> None:
    """Tables of the same name from another program: say so, leave them untouched."""
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    with pytest.raises(StoreError, match="already holds tables of another program") as caught:
        await _migrate(pg_dsn)
    assert "give kakao-tokend a database (or schema) of its own" in str(caught.value)
    # Nothing was half-applied: the whole migration rolled back.
    assert await _tables(pg_dsn) == {"accounts"}


async def test_a_migration_waiting_for_a_lock_is_retried_until_it_gets_it(pg_dsn: str) -> None:
    """Past the lock timeout the migration is tried again (a long refresh ends meanwhile)."""
    holder = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    await holder.execute("SELECT pg_advisory_lock(%s)", (schema.MIGRATION_LOCK,))

    async def release_later() -> None:
        await asyncio.sleep(0.8)
        await holder.execute("SELECT pg_advisory_unlock(%s)", (schema.MIGRATION_LOCK,))

    try:
        release = asyncio.create_task(release_later())
        result = await _migrate(
            pg_dsn, timeouts=db.DbTimeouts(migration_lock=0.3, migration_statement=5)
        )
        await release
    finally:
        await holder.close()
    assert result.applied  # it waited through at least one lock timeout, then applied


async def test_a_migration_locked_out_for_good_gives_up_with_a_hint(pg_dsn: str) -> None:
    """A lock that never goes: a readable error after the retries, not a hang."""
    holder = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    await holder.execute("SELECT pg_advisory_lock(%s)", (schema.MIGRATION_LOCK,))
    try:
        with pytest.raises(StoreError, match="stayed locked through 3 tries") as caught:
            await _migrate(
                pg_dsn, timeouts=db.DbTimeouts(migration_lock=0.2, migration_statement=5)
            )
    finally:
        await holder.close()
    assert "pg_stat_activity" in str(caught.value)
    assert await _tables(pg_dsn) == set()


async def test_migrate_refuses_a_connection_inside_a_transaction(pg_dsn: str) -> None:
    """The advisory lock and the DDL must commit when migrate() returns, not later."""
    conn = await db.connect(pg_dsn, node=NODE, purpose="migrate")
    async with conn:
        await conn.execute("SELECT 1")  # opens a transaction (not autocommit)
        with pytest.raises(RuntimeError, match="without an open transaction"):
            await schema.migrate(conn, node=NODE)


async def test_every_deleted_row_leaves_its_highest_generation(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema version 4 (0004_generation_after_logout): a store the previous version made,
    with rows, takes it at a node's start; then every way a row goes — a DELETE as the
    previous version's logout sends it, a rename, a TRUNCATE — records the generation it had,
    and a lower one deleted later (a previous version's login that started at 1 again) does
    not lower the record. A new row of the name leaves the record alone."""
    keyring = Keyring.parse(new_key_line())
    shipped = schema.shipped_migrations()
    with monkeypatch.context() as patched:
        patched.setattr(schema, "shipped_migrations", lambda: shipped[:3])
        await migrated(pg_dsn)
    conn = await db.connect(pg_dsn, node=NODE, purpose="test", autocommit=True)
    async with conn:
        for name, generation in (("alice", 5), ("bob", 3), ("carol", 7)):
            state = sample_state(name, generation=generation)
            await accounts.insert_account(conn, keyring, state, node=NODE, due_at=None)
        assert (await _migrate(pg_dsn)).applied == ("0004_generation_after_logout",)

        async def recorded() -> dict[str, int]:
            cur = await conn.execute("SELECT name, generation FROM deleted_accounts")
            return dict(await cur.fetchall())

        assert await recorded() == {}
        await conn.execute("DELETE FROM accounts WHERE name = 'alice'")
        assert await recorded() == {"alice": 5}
        again = sample_state("alice", generation=2)
        await accounts.insert_account(conn, keyring, again, node=NODE, due_at=None)
        assert await recorded() == {"alice": 5}
        await conn.execute("UPDATE accounts SET generation = 3 WHERE name = 'alice'")
        await conn.execute("DELETE FROM accounts WHERE name = 'alice'")
        await conn.execute("UPDATE accounts SET name = 'robert' WHERE name = 'bob'")
        assert await recorded() == {"alice": 5, "bob": 3}
        await conn.execute("TRUNCATE accounts CASCADE")
        assert await recorded() == {"alice": 5, "bob": 3, "carol": 7, "robert": 3}
        assert await accounts.deleted_generation(conn, "carol") == 7
        assert await accounts.deleted_generation(conn, "dave") == 0
        assert await accounts.deleted_generations(conn, ["alice", "dave"]) == {"alice": 5}
