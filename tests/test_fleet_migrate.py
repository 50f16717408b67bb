"""`kakao-tokend store migrate` both ways against a real PostgreSQL: nothing lost, never two
live copies, idempotent, crash-safe, and the moved side refused by every entry point."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daemonproc import login, run_cli, start_daemon, write_config
from fleetkit import (
    NODE,
    migrated,
    sample_state,
    store_rows,
    write_key_file,
    write_store_config,
)
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.errors import StoreMoved, StoreWriteError
from kakao_tokend.fleet import accounts, alertbook, db
from kakao_tokend.fleet.commands import logout_account, save_login
from kakao_tokend.fleet.crypto import Keyring, new_key_line
from kakao_tokend.fleet.migrate import (
    MigrationRefused,
    Step,
    migrate_to_postgres,
    moved_away,
)
from kakao_tokend.state import AccountState
from kakao_tokend.store import MOVED_NAME, AccountStore, check_not_moved
from kakao_tokend.tokens import fingerprint
from pgcluster import PgServer

pytestmark = pytest.mark.timeout(120)

NAMES = ("default", "quiet", "shop")


# ---------------------------------------------------------------------------------------------
# Helpers


def store_config(
    directory: Path,
    dsn: str,
    key_lines: list[str],
    *,
    backend: str = "file",
    names: tuple[str, ...] = NAMES,
    tables: dict[str, str] | None = None,
) -> Path:
    """Write a config with ``names`` as accounts (state in directory/state, unless
    ``tables`` gives an account's table more lines) and [store]."""
    directory.mkdir(parents=True, exist_ok=True)
    tables = tables or {}
    account_tables = "".join(f"[accounts.{name}]\n{tables.get(name, '')}\n" for name in names)
    return write_store_config(directory, dsn, keys=key_lines, backend=backend, extra=account_tables)


def full_state(
    name: str, generation: int, *, refresh_token: str | None = None, **changes: Any
) -> AccountState:
    """A state with every field a state file can hold set, the retired tokens included."""
    base = sample_state(name, generation=generation, rotations=3, refresh_token=refresh_token)
    history = tuple(
        dataclasses.replace(r, replaced=fingerprint(f"retired-{name}-{i}"))
        for i, r in enumerate(base.rotations)
    )
    tokens = dataclasses.replace(base.tokens, refresh_expiry_estimated=True)
    return dataclasses.replace(base, rotations=history, tokens=tokens, **changes)


def alert_document(name: str) -> dict[str, Any]:
    """Alert bookkeeping as the daemon writes it, with translatable texts and a future field."""
    return {
        "version": 1,
        "account": name,
        "active": {
            "refresh_expiry": {
                "severity": "warning",
                "stage": 1209600.0,
                "message": f"{name}: refresh token expires in 13d",
                "action": f"kakao-tokend --account {name} login",
                "texts": {"message": {"id": "expires {left}", "args": {"left": "13d"}}},
                "since": "2025-01-01T00:00:00Z",
                "last_sent_at": "2025-01-02T03:04:05Z",
                "sent": 2,
                "future_field": [1, 2],
            },
            "failing": {
                "severity": "critical",
                "stage": None,
                "message": "refresh failing",
                "action": "",
                "since": "2025-01-03T00:00:00Z",
                "last_sent_at": "2025-01-03T00:00:00Z",
                "sent": 1,
            },
        },
    }


def seed_files(config_path: Path) -> dict[str, AccountState]:
    """Give default and shop full states (shop needs a re-login), alerts to all three; quiet
    has no tokens, only alerts. Return the states as the files hold them."""
    config = load_config(config_path)
    states = {
        "default": full_state("default", 5),
        "shop": full_state(
            "shop",
            9,
            relogin_reason="Kakao refused the refresh token (KOE322)",
            relogin_cause="rotated_lost",
        ),
    }
    held = {}
    for name in NAMES:
        store = AccountStore(config.accounts[name])
        if name in states:
            store.save(states[name])
            store.publish(states[name])
            loaded = store.load()
            assert loaded is not None
            held[name] = loaded
        store.save_alerts(alert_document(name))
    return held


def file_states(config_path: Path) -> dict[str, dict[str, Any] | None]:
    """Every account's state file, as written (None: no file)."""
    config = load_config(config_path)
    found: dict[str, dict[str, Any] | None] = {}
    for name, account in config.accounts.items():
        path = account.state_file
        found[name] = json.loads(path.read_text()) if path.exists() else None
    return found


async def store_alerts(dsn: str) -> dict[str, dict[str, Any]]:
    """Every account's alert records in the store."""
    conn = await db.connect(dsn, node=NODE, purpose="test")
    async with conn:
        return {
            name: await alertbook.load_records(conn, name)
            for name in await alertbook.accounts_with_alerts(conn)
        }


async def store_meta(dsn: str) -> dict[str, Any]:
    """The store_meta row."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT store_id::text, moved_to, moved_by, moved_note, moved_pending FROM store_meta"
        )
        row = await cur.fetchone()
    assert row is not None
    return dict(
        zip(("store_id", "moved_to", "moved_by", "moved_note", "pending"), row, strict=True)
    )


async def scalar(dsn: str, query: str) -> Any:
    """Run one query (no parameters) and return the first column of its first row."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query.encode())
        row = await cur.fetchone()
    return None if row is None else row[0]


def marker(directory: Path) -> dict[str, Any]:
    """The MOVED marker in ``directory``."""
    document: dict[str, Any] = json.loads((directory / MOVED_NAME).read_text())
    return document


def one_error_line(err: str, needle: str) -> str:
    """The single stderr line that contains ``needle`` (there must be exactly one)."""
    lines = [line for line in err.splitlines() if needle in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


async def wait_until(check: Callable[[], Any], *, timeout: float = 20.0, what: str = "it") -> None:
    """Poll an async or sync ``check`` until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def migrate_ok(config: Path, target: str) -> None:
    """Run `store migrate --to TARGET` as a real CLI process; it must exit 0 (its output is
    shown when not: an exit 75 once seen in CI said only "75")."""
    code, out, err = await run_cli(config, "store", "migrate", "--to", target)
    assert code == 0, f"exit {code}: {out}{err}"


async def migrate_process(config: Path, target: str) -> asyncio.subprocess.Process:
    """Start `kakao-tokend store migrate --to TARGET` without waiting for it."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kakao_tokend",
        "--config",
        str(config),
        "store",
        "migrate",
        "--to",
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def waiting_for_lock(dsn: str) -> bool:
    """True while a migration's session waits for a lock (the test holds store_meta's).

    Only this test's database counts: the server is shared by every xdist worker, and another
    test's migration waiting on its own lock would otherwise end this wait too early.
    """
    found = await scalar(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'kakao-tokend % migrate'"
        " AND wait_event_type = 'Lock' AND datname = current_database()",
    )
    return bool(found)


# ---------------------------------------------------------------------------------------------
# Moving everything, both ways


async def test_every_field_survives_files_to_postgres_to_other_files(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Files → PostgreSQL → a second set of files: every account's state (tokens, generation,
    expiries, estimated flag, rotation log with the retired tokens, re-login reason and
    cause, user id, extras) and alert record arrives unchanged — decrypted and compared in
    the store too. The token files are not touched, the first files are marked moved (0644),
    and the store ends up marked moved to the second files."""
    key = new_key_line()
    keyring = Keyring.parse(key)
    first = store_config(tmp_path / "a", pg_dsn, [key])
    originals = seed_files(first)
    state_dir = tmp_path / "a" / "state"
    published = {
        name: (state_dir / f"{name}.token.json").read_bytes() for name in ("default", "shop")
    }
    inodes = {name: (state_dir / f"{name}.token.json").stat().st_ino for name in published}

    code, out, err = await run_cli(first, "store", "migrate", "--to", "postgres")
    assert (code, err) == (0, ""), out
    meta = await store_meta(pg_dsn)
    assert out.startswith(
        f"moved 2 account(s) from files in {state_dir} on {NODE} to PostgreSQL store "
        f"{meta['store_id']} (postgres@127.0.0.1:"
    )
    assert "  copied: default, shop\n  alert records: 6\n" in out
    assert 'next: set [store] backend = "postgres"' in out
    assert "to move back: kakao-tokend store migrate --to file" in out

    rows = await store_rows(pg_dsn, keyring)
    assert {n: r.state.to_dict() for n, r in rows.items()} == {
        n: s.to_dict() for n, s in originals.items()
    }
    assert rows["shop"].due_at is None and rows["default"].due_at is not None
    expected_alerts = {name: alert_document(name)["active"] for name in NAMES}
    assert await store_alerts(pg_dsn) == expected_alerts
    assert meta["moved_to"] is None and meta["pending"] is False

    written = marker(state_dir)
    assert written["store_id"] == meta["store_id"] and written["pending"] is False
    assert written["accounts"] == {
        "default": {
            "generation": 5,
            "refresh_token": originals["default"].tokens.refresh_fingerprint,
        },
        "shop": {"generation": 9, "refresh_token": originals["shop"].tokens.refresh_fingerprint},
    }
    assert stat.S_IMODE((state_dir / MOVED_NAME).stat().st_mode) == 0o644
    assert "RT-" not in (state_dir / MOVED_NAME).read_text()  # no token in the marker
    for name, data in published.items():
        path = state_dir / f"{name}.token.json"
        assert (path.read_bytes(), path.stat().st_ino) == (data, inodes[name])

    second = store_config(tmp_path / "b", pg_dsn, [key])
    code, out, err = await run_cli(second, "store", "migrate", "--to", "file")
    assert (code, err) == (0, ""), out
    assert "  copied: default, shop\n  alert records: 6\n" in out
    assert file_states(second) == {
        "default": originals["default"].to_dict(),
        "quiet": None,
        "shop": originals["shop"].to_dict(),
    }
    other_dir = tmp_path / "b" / "state"
    for name in NAMES:
        assert json.loads((other_dir / f"{name}.alerts.json").read_text()) == alert_document(name)
    assert not (other_dir / MOVED_NAME).exists()
    meta = await store_meta(pg_dsn)
    assert meta["moved_to"] == "file" and meta["pending"] is False
    assert meta["moved_note"] == f"files in {other_dir} on {NODE}"
    assert "kakao-tokend store migrate --to file" in meta["moved_by"]


async def test_running_a_finished_migration_again_changes_nothing(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Both directions are idempotent: a second run says so and writes nothing, and the way
    back to the same files finds them identical (generations equal) and only unmarks them."""
    key = new_key_line()
    config = store_config(tmp_path, pg_dsn, [key])
    originals = seed_files(config)
    state_dir = tmp_path / "state"
    await migrate_ok(config, "postgres")
    updated = await scalar(pg_dsn, "SELECT max(updated_at) FROM accounts")
    rotations = await scalar(pg_dsn, "SELECT count(*) FROM rotations")
    marked = (state_dir / MOVED_NAME).read_bytes()

    code, out, err = await run_cli(config, "store", "migrate", "--to", "postgres")
    assert (code, err) == (0, "")
    assert out.startswith(f"nothing to do: the accounts in {state_dir} already live in PostgreSQL")
    assert await scalar(pg_dsn, "SELECT max(updated_at) FROM accounts") == updated
    assert await scalar(pg_dsn, "SELECT count(*) FROM rotations") == rotations
    assert (state_dir / MOVED_NAME).read_bytes() == marked

    before = {name: (state_dir / f"{name}.state.json").stat().st_mtime_ns for name in originals}
    code, out, err = await run_cli(config, "store", "migrate", "--to", "file")
    assert (code, err) == (0, ""), out
    assert "  unchanged: default, shop\n" in out
    assert {n: (state_dir / f"{n}.state.json").stat().st_mtime_ns for n in originals} == before
    assert not (state_dir / MOVED_NAME).exists()

    code, out, err = await run_cli(config, "store", "migrate", "--to", "file")
    assert (code, err) == (0, "")
    assert out.startswith("nothing to do: the accounts of PostgreSQL store")
    assert f"already live in the files in {state_dir} on {NODE}" in out
    assert file_states(config) == {
        "default": originals["default"].to_dict(),
        "quiet": None,
        "shop": originals["shop"].to_dict(),
    }


async def test_the_destination_copy_decides_per_account_by_generation(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Both sides in use (the store was filled elsewhere): the same state is skipped, an older
    one updated; a newer one, or the same generation with another refresh token, refuses the
    whole migration with a clear reason — and nothing is written anywhere."""
    key = new_key_line()
    keyring = Keyring.parse(key)
    config_path = store_config(tmp_path, pg_dsn, [key], names=("same", "older", "newer"))
    config = load_config(config_path)
    on_files = {
        "same": full_state("same", 3),
        "older": full_state("older", 4, refresh_token="RT-older-4"),
        "newer": full_state("newer", 5, refresh_token="RT-newer-5"),
    }
    for name, state in on_files.items():
        AccountStore(config.accounts[name]).save(state)
    held = {name: AccountStore(config.accounts[name]).load() for name in on_files}
    await migrated(pg_dsn)
    conn = await db.connect(pg_dsn, node="web-1", purpose="test")
    async with conn:
        for state in (
            held["same"],
            full_state("older", 2, refresh_token="RT-older-2"),
            full_state("newer", 7, refresh_token="RT-newer-7"),
        ):
            assert state is not None
            await accounts.insert_account(conn, keyring, state, node="web-1", due_at=None)
    before = {n: r.state.to_dict() for n, r in (await store_rows(pg_dsn, keyring)).items()}

    with pytest.raises(MigrationRefused) as refused:
        await migrate_to_postgres(config)
    message = str(refused.value)
    store_id = (await store_meta(pg_dsn))["store_id"]
    assert message.startswith(
        f"account 'newer' is at generation 7 in PostgreSQL store {store_id}, newer than"
        f" generation 5 in the files ({tmp_path / 'state' / 'newer.state.json'})"
    )
    assert "kakao-tokend store migrate --to file" in message
    assert {n: r.state.to_dict() for n, r in (await store_rows(pg_dsn, keyring)).items()} == before
    assert not (tmp_path / "state" / MOVED_NAME).exists()
    assert (await store_meta(pg_dsn))["moved_to"] is None

    # The same generation with another refresh token: two copies used on their own.
    AccountStore(config.accounts["newer"]).save(full_state("newer", 7, refresh_token="RT-other"))
    with pytest.raises(MigrationRefused, match=r"at generation 7 in both .* different refresh"):
        await migrate_to_postgres(config)

    AccountStore(config.accounts["newer"]).save(full_state("newer", 8, refresh_token="RT-8"))
    same_updated = await scalar(pg_dsn, "SELECT updated_at FROM accounts WHERE name = 'same'")
    report = await migrate_to_postgres(config)
    assert report.steps == {"same": Step.SAME, "older": Step.UPDATE, "newer": Step.UPDATE}
    rows = await store_rows(pg_dsn, keyring)
    assert rows["older"].state.generation == 4 and rows["newer"].state.generation == 8
    assert rows["older"].state.tokens.refresh_token == "RT-older-4"
    assert await scalar(pg_dsn, "SELECT updated_at FROM accounts WHERE name = 'same'") == (
        same_updated
    )


async def test_the_generation_an_account_was_logged_out_at_moves_both_ways(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A login after a migration continues above the generation the other side logged out.
    Files → PostgreSQL carries what the file store would continue from for an account
    without a state file — its logout record (NAME.logged-out.json), a token file left
    behind — and nothing for an account whose row holds it; PostgreSQL → files writes the
    store's record of a deleted row into the files' logout record."""
    key = new_key_line()
    first = store_config(tmp_path / "a", pg_dsn, [key])
    files = load_config(first).accounts
    for name, generation in (("default", 5), ("quiet", 7), ("shop", 9)):
        store = AccountStore(files[name])
        store.save(full_state(name, generation))
        store.publish(full_state(name, generation))
    AccountStore(files["quiet"]).remove(generation=7)  # `logout`
    files["shop"].state_file.unlink()  # by hand: the token file (generation 9) stays
    await migrate_ok(first, "postgres")

    async def recorded() -> dict[str, int]:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            cur = await conn.execute("SELECT name, generation FROM deleted_accounts")
            return dict(await cur.fetchall())

    assert await recorded() == {"quiet": 7, "shop": 9}
    fleet_config = load_config(store_config(tmp_path / "a", pg_dsn, [key], backend="postgres"))
    now = datetime.now(UTC)
    for name, expected in (("quiet", 8), ("shop", 10)):
        tokens = full_state(name, 1).tokens
        account = fleet_config.accounts[name]
        state = await save_login(fleet_config, account, tokens, None, now)
        assert state.generation == expected
    assert await logout_account(fleet_config, fleet_config.accounts["default"]) is not None
    assert await recorded() == {"default": 5, "quiet": 7, "shop": 9}

    second = store_config(tmp_path / "b", pg_dsn, [key])
    await migrate_ok(second, "file")
    moved = load_config(second).accounts
    record = json.loads((tmp_path / "b" / "state" / "default.logged-out.json").read_text())
    assert (record["account"], record["generation"]) == ("default", 5)
    assert AccountStore(moved["default"]).next_generation(None) == 6
    assert file_states(second)["quiet"]["generation"] == 8  # type: ignore[index]
    assert not (tmp_path / "b" / "state" / "quiet.logged-out.json").exists()


async def test_a_refused_migration_to_files_leaves_them_in_use(tmp_path: Path, pg_dsn: str) -> None:
    """Files in use that are newer than the store: `--to file` refuses before it marks or
    writes anything, so those files stay the live copy."""
    key = new_key_line()
    config = store_config(tmp_path / "a", pg_dsn, [key])
    seed_files(config)
    await migrate_ok(config, "postgres")
    other = store_config(tmp_path / "b", pg_dsn, [key])
    AccountStore(load_config(other).accounts["default"]).save(full_state("default", 99))
    before = file_states(other)
    code, out, err = await run_cli(other, "store", "migrate", "--to", "file")
    assert (code, out) == (1, "")
    line = one_error_line(err, "account 'default' is at generation 99 in the files")
    assert "newer than generation 5 in the PostgreSQL store" in line
    assert "kakao-tokend store migrate --to postgres" in line
    assert not (tmp_path / "b" / "state" / MOVED_NAME).exists()
    assert file_states(other) == before
    assert (await store_meta(pg_dsn))["moved_to"] is None


async def test_a_crash_between_the_store_commit_and_the_marker_is_finished_by_a_rerun(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses the MOVED marker after the rows were committed (what a crash at that
    moment leaves): the files stay the live copy and the store stays refused as an
    unfinished migration — never both in use. Running the command again completes it,
    with nothing written twice."""
    key = new_key_line()
    config_path = store_config(tmp_path, pg_dsn, [key])
    originals = seed_files(config_path)
    config = load_config(config_path)
    real_replace = os.replace

    def full_disk(src: Any, dst: Any, **kwargs: Any) -> None:
        if str(dst).endswith(MOVED_NAME):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        await migrate_to_postgres(config)
    monkeypatch.setattr(os, "replace", real_replace)

    meta = await store_meta(pg_dsn)
    assert (meta["moved_to"], meta["pending"]) == ("file", True)
    assert await scalar(pg_dsn, "SELECT count(*) FROM accounts") == 2
    rotations = await scalar(pg_dsn, "SELECT count(*) FROM rotations")
    assert not (tmp_path / "state" / MOVED_NAME).exists()
    check_not_moved(tmp_path / "state")  # the files are still in use
    store = AccountStore(config.accounts["default"])
    with store.lock(timeout=1):
        assert store.load() == originals["default"]
    refusal = await moved_away(config)
    assert refusal is not None
    assert "is not in use yet: a migration into it from the files in" in str(refusal)
    assert "run `kakao-tokend store migrate --to postgres` there again" in str(refusal)

    report = await migrate_to_postgres(config)
    assert report.nothing_to_do is None
    assert report.names(Step.SAME) == ["default", "shop"]
    meta = await store_meta(pg_dsn)
    assert (meta["moved_to"], meta["pending"]) == (None, False)
    assert marker(tmp_path / "state")["store_id"] == meta["store_id"]
    assert await scalar(pg_dsn, "SELECT count(*) FROM accounts") == 2
    assert await scalar(pg_dsn, "SELECT count(*) FROM rotations") == rotations
    assert await moved_away(config) is None
    with pytest.raises(StoreMoved):
        check_not_moved(tmp_path / "state")


async def test_kill_9_between_writing_the_files_and_marking_the_store_is_safe(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A real `store migrate --to file` killed with SIGKILL after it wrote the files and
    while it waits to mark the store: the store stays the live copy, the files stay marked
    (as an unfinished migration back) and are refused, and a rerun finishes the move."""
    key = new_key_line()
    keyring = Keyring.parse(key)
    config = store_config(tmp_path, pg_dsn, [key])
    seed_files(config)
    await migrate_ok(config, "postgres")
    # A node refreshed meanwhile: the store is ahead of the files now.
    conn = await db.connect(pg_dsn, node="web-1", purpose="test")
    async with conn:
        row = await accounts.load_account(conn, keyring, "default", lock=accounts.RowLock.WAIT)
        assert row is not None
        newer = dataclasses.replace(row.state, generation=6)
        assert await accounts.save_account(conn, keyring, row, newer, node="web-1", due_at=None)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as holder:
        await holder.execute("SELECT * FROM store_meta FOR UPDATE")
        proc = await migrate_process(config, "file")
        await wait_until(lambda: waiting_for_lock(pg_dsn), what="the migration to wait")
        assert proc.returncode is None
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
        await holder.rollback()

    assert file_states(config)["default"] == newer.to_dict()  # written, durably, before
    left = marker(tmp_path / "state")
    assert left["pending"] is True
    assert (await store_meta(pg_dsn))["moved_to"] is None  # the store is still the live copy
    code, out, err = await run_cli(config, "refresh")
    assert (code, out) == (78, "")
    line = one_error_line(err, "a migration back to these files")
    assert "has not finished" in line and "store migrate --to file` again" in line
    # The command to run is the one for this configuration, not the default one.
    assert f"kakao-tokend --config {config} store migrate --to file" in line

    code, out, err = await run_cli(config, "store", "migrate", "--to", "file")
    assert (code, err) == (0, ""), out
    assert "  unchanged: default, shop\n" in out
    assert not (tmp_path / "state" / MOVED_NAME).exists()
    assert (await store_meta(pg_dsn))["moved_to"] == "file"


# ---------------------------------------------------------------------------------------------
# The moved side is refused


async def test_the_moved_files_are_refused_by_run_and_every_writing_command(
    tmp_path: Path, pg_dsn: str
) -> None:
    """After `--to postgres`, `run` and login, import, refresh, logout and restore on the
    files exit 78 with one line naming the store and the way back; nothing is changed."""
    key = new_key_line()
    elsewhere = tmp_path / "elsewhere"
    shop = {"shop": f'state_file = "{elsewhere / "shop.state.json"}"'}
    config = store_config(tmp_path, pg_dsn, [key], tables=shop)
    seed_files(config)
    backup = tmp_path / "backup.state.json"
    backup.write_bytes((tmp_path / "state" / "default.state.json").read_bytes())
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps({"access_token": "a" * 40, "refresh_token": "r" * 40}))
    await migrate_ok(config, "postgres")
    store_id = (await store_meta(pg_dsn))["store_id"]
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "state").iterdir())
    assert marker(elsewhere)["store_id"] == store_id

    for command in (
        ("run",),
        ("login", "--no-browser", "--timeout", "1s"),
        ("import", str(seed), "--no-verify"),
        ("refresh",),
        ("logout",),
        ("restore", str(backup)),
        ("--account", "shop", "refresh"),
    ):
        code, out, err = await run_cli(config, *command)
        assert code == 78, (command, out, err)
        line = one_error_line(err, "were moved to the PostgreSQL store")
        where = elsewhere if "shop" in command else tmp_path / "state"
        assert f"the accounts in {where} were moved to the PostgreSQL store {store_id}" in line
        assert 'set [store] backend = "postgres"' in line
        assert f"kakao-tokend --config {config} store migrate --to file" in line
    after = sorted((p.name, p.read_bytes()) for p in (tmp_path / "state").iterdir())
    assert [name for name, _ in after] == [name for name, _ in before]
    assert dict(after) | {"kakao-tokend.run.lock": b""} == dict(before) | {
        "kakao-tokend.run.lock": b""
    }


async def test_a_node_on_a_store_moved_to_files_refuses_to_run(tmp_path: Path, pg_dsn: str) -> None:
    """After `--to file`, `run` with backend = "postgres" exits 78 naming the files it went
    to and the way back."""
    key = new_key_line()
    config = store_config(tmp_path / "files", pg_dsn, [key])
    seed_files(config)
    node = store_config(tmp_path / "node", pg_dsn, [key], backend="postgres")
    await migrate_ok(config, "postgres")
    await migrate_ok(config, "file")
    code, _, err = await run_cli(node, "run")
    assert code == 78
    line = one_error_line(err, "were moved to the files in")
    assert f"were moved to the files in {tmp_path / 'files' / 'state'} on {NODE}" in line
    assert 'with [store] backend = "file"' in line
    assert "kakao-tokend store migrate --to postgres" in line


def test_the_marker_is_checked_again_once_the_account_lock_is_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration marks the files while it holds every account lock. A command that checked
    just before and gets the lock just after must refuse too, and let go of the lock."""
    state_file = tmp_path / "default.state.json"
    store = AccountStore.from_paths("default", state_file=state_file)
    real_flock = fcntl.flock

    def marked_meanwhile(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX:  # the migration got in between the check and the lock
            (tmp_path / MOVED_NAME).write_text(
                json.dumps({"store_id": "s-1", "database": "u@h/db", "moved_at": "now"})
            )
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", marked_meanwhile)
    with pytest.raises(StoreMoved, match=r"moved to the PostgreSQL store s-1 \(u@h/db\)"):
        store.try_lock()
    monkeypatch.undo()
    assert not store.locked
    (tmp_path / MOVED_NAME).unlink()
    other = AccountStore.from_paths("default", state_file=state_file)
    assert other.try_lock()  # the refused command did not keep the lock
    other.unlock()


def test_an_unreadable_marker_still_refuses(tmp_path: Path) -> None:
    """What counts is that the marker exists: a damaged one refuses too, pointing at it."""
    (tmp_path / MOVED_NAME).write_text("{not json")
    with pytest.raises(StoreMoved, match="MOVED exists but cannot be read"):
        AccountStore.from_paths("x", state_file=tmp_path / "x.state.json").load()
    check_not_moved(tmp_path / "elsewhere")  # no directory, no marker: fine


# ---------------------------------------------------------------------------------------------
# Refusals before anything moves


async def test_concurrent_migrations_are_refused(tmp_path: Path, pg_dsn: str) -> None:
    """While one migration runs, a second one on the same files is refused by the state
    directory's lock, and one from other files by the store's migration lock (exit 75);
    the first one then finishes normally."""
    key = new_key_line()
    config = store_config(tmp_path / "a", pg_dsn, [key])
    seed_files(config)
    other = store_config(tmp_path / "b", pg_dsn, [key])
    await migrated(pg_dsn)
    first: asyncio.subprocess.Process | None = None
    try:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as holder:
            await holder.execute("SELECT * FROM store_meta FOR UPDATE")
            first = await migrate_process(config, "postgres")
            running = first

            async def first_is_waiting() -> bool:
                assert running.returncode is None, "the first migration ended early"
                return await waiting_for_lock(pg_dsn)

            # A loaded machine may take many seconds to start the process and connect.
            await wait_until(first_is_waiting, timeout=60, what="the first migration")
            code, out, err = await run_cli(config, "store", "migrate", "--to", "file")
            assert (code, out) == (75, "")
            line = one_error_line(err, "kakao-tokend is running on")
            assert f"running on {tmp_path / 'a' / 'state'} (pid {first.pid})" in line
            code, out, err = await run_cli(other, "store", "migrate", "--to", "postgres")
            assert (code, out) == (75, "")
            one_error_line(err, "another `kakao-tokend store migrate` is running on this store")
            await holder.rollback()
        out_bytes, err_bytes = await asyncio.wait_for(first.communicate(), 30)
    finally:
        if first is not None and first.returncode is None:  # failed: leave no process behind
            first.kill()
            await first.communicate()
    assert first.returncode == 0, err_bytes.decode()
    assert b"copied: default, shop" in out_bytes


async def test_a_node_connected_to_the_store_refuses_the_migration(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Another kakao-tokend session on the database (a node's pool) means the accounts are in
    use: exit 75 naming it, and nothing is written."""
    key = new_key_line()
    config = store_config(tmp_path, pg_dsn, [key])
    seed_files(config)
    await migrated(pg_dsn)
    node = await db.connect(pg_dsn, node="web-2", purpose="pool")
    async with node:
        code, out, err = await run_cli(config, "store", "migrate", "--to", "postgres")
    assert (code, out) == (75, "")
    line = one_error_line(err, "kakao-tokend is connected to this store")
    assert "(kakao-tokend web-2 pool)" in line and "stop every node" in line
    assert await scalar(pg_dsn, "SELECT count(*) FROM accounts") == 0
    assert not (tmp_path / "state" / MOVED_NAME).exists()


async def test_a_missing_or_wrong_key_is_refused_before_anything_moves(
    tmp_path: Path, pg_dsn: str
) -> None:
    """No key: exit 78 naming the setting. The wrong key for rows in the store: exit 78
    naming the key, with the store and the marked files left exactly as they were."""
    key = new_key_line()
    keyless = store_config(tmp_path / "keyless", pg_dsn, [])
    seed_files(keyless)
    code, _, err = await run_cli(keyless, "store", "migrate", "--to", "postgres")
    assert code == 78 and "no key configured for the store" in err
    assert not (tmp_path / "keyless" / "state" / MOVED_NAME).exists()

    config = store_config(tmp_path / "a", pg_dsn, [key])
    seed_files(config)
    await migrate_ok(config, "postgres")
    marked = (tmp_path / "a" / "state" / MOVED_NAME).read_bytes()
    wrong = store_config(tmp_path / "a", pg_dsn, [new_key_line()])
    assert wrong == config  # the same files, only the key differs
    code, out, err = await run_cli(config, "store", "migrate", "--to", "file")
    assert (code, out) == (78, "")
    line = one_error_line(err, "cannot decrypt")
    assert f"encrypted with key {Keyring.parse(key).newest.key_id}, which is not in" in line
    assert (tmp_path / "a" / "state" / MOVED_NAME).read_bytes() == marked
    assert (await store_meta(pg_dsn))["moved_to"] is None


async def test_files_moved_to_another_store_are_refused(
    tmp_path: Path, pg_dsn: str, pg_server: PgServer
) -> None:
    """Files marked as moved to one store, with [store] pointing at another database: the
    migration refuses (exit 78) naming both, instead of making a second live copy."""
    key = new_key_line()
    config = store_config(tmp_path, pg_dsn, [key])
    seed_files(config)
    await migrate_ok(config, "postgres")
    store_id = (await store_meta(pg_dsn))["store_id"]
    name, other_dsn = pg_server.create_database()
    try:
        store_config(tmp_path, other_dsn, [key])
        for target in ("postgres", "file"):
            code, out, err = await run_cli(config, "store", "migrate", "--to", target)
            assert (code, out) == (78, "")
            line = one_error_line(err, "were moved to PostgreSQL store")
            assert f"were moved to PostgreSQL store {store_id}" in line
            assert "point [store] dsn at the database they were moved to" in line
        assert await scalar(other_dsn, "SELECT count(*) FROM accounts") == 0
    finally:
        pg_server.drop_database(name)


# ---------------------------------------------------------------------------------------------
# Under a real daemon


async def test_migration_both_ways_around_a_running_daemon(
    tmp_path: Path, pg_dsn: str, emulator: KakaoEmulator
) -> None:
    """A real `kakao-tokend run` refreshing against the emulator: the migration refuses while
    it runs (and the daemon keeps serving); once stopped, the accounts move to PostgreSQL and
    the daemon refuses to start on the moved files (exit 78, one line). Moved back, the
    daemon starts and refreshes with the refresh token that went through the store."""
    emulator.settings.access_lifetime = 4.0
    await migrated(pg_dsn)
    key = new_key_line()
    write_key_file(tmp_path / "store.key", [key])
    (tmp_path / "dsn").write_text(pg_dsn)
    (tmp_path / "dsn").chmod(0o600)
    config = write_config(
        tmp_path,
        emulator,
        extra=f'[store]\ndsn_file = "{tmp_path / "dsn"}"\nkey_file = "{tmp_path / "store.key"}"\n'
        f'node_name = "{NODE}"\n',
    )
    first = await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(
            lambda: daemon.state()["generation"] > first.generation, what="a refresh"
        )
        code, out, err = await run_cli(config, "store", "migrate", "--to", "postgres")
        assert (code, out) == (75, "")
        line = one_error_line(err, "kakao-tokend is running on")
        assert f"(pid {daemon.pid})" in line and "systemctl stop kakao-tokend" in line
        status, body = await daemon.api("GET", "/v1/accounts/default/token")
        assert status == 200 and emulator.access_token_valid(body["access_token"])
        assert await scalar(pg_dsn, "SELECT count(*) FROM accounts") == 0
    finally:
        assert await daemon.stop() == 0

    on_files = daemon.state()
    code, out, err = await run_cli(config, "store", "migrate", "--to", "postgres")
    assert (code, err) == (0, ""), out
    rows = await store_rows(pg_dsn, Keyring.parse(key))
    assert rows["default"].state.to_dict() == on_files

    refused = await start_daemon(config, wait_ready=False)
    assert await asyncio.wait_for(refused.proc.wait(), 20) == 78
    line = one_error_line(refused.log_text(), "were moved to the PostgreSQL store")
    assert "cannot start:" in line and "store migrate --to file" in line
    assert daemon.state() == on_files  # nothing was refreshed on the moved files

    code, out, err = await run_cli(config, "store", "migrate", "--to", "file")
    assert (code, err) == (0, ""), out
    restarted = await start_daemon(config)
    try:
        await restarted.wait_for(
            lambda: restarted.state()["generation"] > on_files["generation"],
            what="a refresh after the way back",
        )
        assert restarted.state()["tokens"]["refresh_token"] in emulator.issued_tokens()
        status, body = await restarted.api("GET", "/v1/accounts/default/token")
        assert status == 200 and emulator.access_token_valid(body["access_token"])
    finally:
        assert await restarted.stop() == 0
    assert "Traceback" not in restarted.log_text()
