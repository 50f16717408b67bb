"""`kakao-tokend store new-key | init | rotate-key` as real processes against real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

import psycopg
import pytest

from daemonproc import REPO, run_cli, start_daemon
from fleetkit import NODE, migrated, sample_state, store_rows, write_store_config
from fleetrun import node_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.fleet import accounts, db
from kakao_tokend.fleet.crypto import Keyring, key_id_of, new_key_line
from loginproc import spawn_login
from pgcluster import free_port

pytestmark = pytest.mark.timeout(90)


async def shell(command: str, cwd: Path) -> tuple[int, str, str]:
    """Run a shell command line (for real redirections) with the venv's kakao-tokend."""
    proc = await asyncio.create_subprocess_shell(
        command,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_new_key_prints_one_key_and_appends_newest_last(tmp_path: Path) -> None:
    """`new-key >> store.key` twice: a key file of two keys whose newest is the second."""
    ids = []
    for _ in range(2):
        code, out, err = await shell("kakao-tokend store new-key >> store.key", tmp_path)
        assert code == 0, err
        assert out == ""
        ids.append(err.split()[2].rstrip(":"))
    lines = (tmp_path / "store.key").read_text().splitlines()
    assert len(lines) == 2 and lines[0] != lines[1]
    assert all(len(base64.b64decode(line, validate=True)) == 32 for line in lines)
    ring = Keyring.parse((tmp_path / "store.key").read_text())
    assert list(ring.ids) == ids
    assert ring.newest.key_id == key_id_of(base64.b64decode(lines[1]))
    assert "kakao-tokend store rotate-key" in err


async def test_new_key_needs_no_config(tmp_path: Path) -> None:
    """A key can be made on any machine, before anything is configured."""
    code, out, err = await shell(
        "KAKAO_TOKEND_CONFIG=/nonexistent kakao-tokend store new-key", tmp_path
    )
    assert code == 0, err
    assert len(base64.b64decode(out.strip(), validate=True)) == 32


async def test_store_init_creates_the_schema_once(tmp_path: Path, pg_dsn: str) -> None:
    """init applies the schema and says so; the second run has nothing to do; no DSN shown."""
    config = write_store_config(tmp_path, pg_dsn + " password=hunter2")
    code, out, err = await run_cli(config, "store", "init")
    assert (code, err) == (0, "")
    assert out == (
        f"store schema (file {tmp_path / 'dsn'}): version 0 -> 4"
        " (applied 0001_initial, 0002_full_state_and_migration, 0003_incremental_poll,"
        " 0004_generation_after_logout)\n"
    )
    code, out, err = await run_cli(config, "store", "init")
    assert code == 0, err
    assert "already at version 4; nothing to do" in out
    assert "hunter2" not in out + err


async def test_store_init_without_a_database_is_exit_69_in_one_line(tmp_path: Path) -> None:
    """An unreachable database: EX_UNAVAILABLE and one line, no traceback."""
    config = write_store_config(tmp_path, f"host=127.0.0.1 port={free_port()} user=x dbname=y")
    code, out, err = await run_cli(config, "store", "init")
    assert code == 69
    assert out == ""
    assert err.startswith("error: cannot connect to the PostgreSQL store: ")
    assert "Connection refused" in err and "Traceback" not in err
    assert err.count("\n") == 1


async def _seed(dsn: str, keyring: Keyring, names: list[str]) -> None:
    await migrated(dsn)
    conn = await db.connect(dsn, node=NODE, purpose="test")
    async with conn:
        for name in names:
            await accounts.insert_account(conn, keyring, sample_state(name), node=NODE, due_at=None)


async def test_rotate_key_reencrypts_every_account_and_is_idempotent(
    tmp_path: Path, pg_dsn: str
) -> None:
    """After a new key is appended, rotate-key moves every row to it (in batches); the old
    key can then be dropped from the file, and a second run has nothing to do."""
    old = new_key_line()
    config = write_store_config(tmp_path, pg_dsn, keys=[old])
    names = ["alpha", "bravo", "charlie", "delta", "echo"]
    await _seed(pg_dsn, Keyring.parse(old), names)
    before = await store_rows(pg_dsn, Keyring.parse(old))
    code, _, err = await shell("kakao-tokend store new-key >> store.key", tmp_path)
    assert code == 0, err
    new = (tmp_path / "store.key").read_text().splitlines()[-1]
    new_id = Keyring.parse(new).newest.key_id

    code, out, err = await run_cli(config, "store", "rotate-key", "--batch", "2")
    assert (code, err) == (0, ""), out
    assert out == (
        f"re-encrypted 5 account(s) under key {new_id}\n"
        f"all 5 account(s) are under key {new_id}; older keys are unused\n"
    )
    after = await store_rows(pg_dsn, Keyring.parse(new))  # the new key alone decrypts all
    assert {n: r.state for n, r in after.items()} == {n: r.state for n, r in before.items()}
    assert {r.key_id for r in after.values()} == {new_id}
    assert {n: r.generation for n, r in after.items()} == {n: 1 for n in names}

    code, out, err = await run_cli(config, "store", "rotate-key")
    assert code == 0, err
    assert out.startswith(f"re-encrypted 0 account(s) under key {new_id}\n")


async def test_rotate_key_waits_for_an_account_being_refreshed(tmp_path: Path, pg_dsn: str) -> None:
    """A row locked by a refresh in flight is not skipped: rotate-key waits, then re-keys it."""
    old, new = new_key_line(), new_key_line()
    config = write_store_config(tmp_path, pg_dsn, keys=[old, new])
    await _seed(pg_dsn, Keyring.parse(old), ["busy", "idle"])
    holder = await db.connect(pg_dsn, node="web-1", purpose="pool")
    async with holder:
        row = await accounts.load_account(
            holder, Keyring.parse(old), "busy", lock=accounts.RowLock.WAIT
        )
        assert row is not None
        started = time.monotonic()
        cli = asyncio.create_task(run_cli(config, "store", "rotate-key"))
        await asyncio.sleep(2.0)
        assert not cli.done()
        await holder.commit()  # the "refresh" ends
        code, out, err = await cli
    assert code == 0, err
    assert time.monotonic() - started >= 2.0
    assert "re-encrypted 2 account(s)" in out
    rows = await store_rows(pg_dsn, Keyring.parse(new))
    assert set(rows) == {"busy", "idle"}


async def test_rotate_key_without_the_old_key_fails_clearly(tmp_path: Path, pg_dsn: str) -> None:
    """Rows sealed with a key missing from the file: exit 78, account and key named."""
    lost = Keyring.parse(new_key_line())
    config = write_store_config(tmp_path, pg_dsn, keys=[new_key_line()])
    await _seed(pg_dsn, lost, ["shop"])
    code, out, err = await run_cli(config, "store", "rotate-key")
    assert (code, out) == (78, "")
    assert err.startswith(
        f"error: cannot decrypt the access_token of account 'shop': it was encrypted with key "
        f"{lost.newest.key_id}, which is not in {tmp_path / 'store.key'}"
    )
    assert "Traceback" not in err
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute("SELECT key_id FROM accounts")
        assert await cur.fetchall() == [(lost.newest.key_id,)]  # untouched


async def test_refresh_and_status_with_a_key_the_store_was_not_sealed_with_name_the_key(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A host whose key file lacks the store's key: `refresh` said "account has no tokens
    yet (run login)" (exit 77) and `status` told to log in, which would seal the shared row
    with a key the rest of the fleet does not have. Both name the key and the key file."""
    lost = Keyring.parse(new_key_line())
    config = write_store_config(tmp_path, pg_dsn, keys=[new_key_line()])
    config.write_text(config.read_text() + "[accounts.shop]\n")
    await _seed(pg_dsn, lost, ["shop"])
    code, out, err = await run_cli(config, "--account", "shop", "refresh")
    assert code == 78, (out, err)
    assert "cannot decrypt the access_token of account 'shop'" in err
    assert "key file" in err and "login" not in err
    code, out, err = await run_cli(config, "--account", "shop", "status")
    assert code == 2, (out, err)
    assert "cannot decrypt" in out and lost.newest.key_id in out
    fix = out.split("fix:", 1)[1]
    assert "key file" in fix and "login" not in fix


async def test_login_and_import_with_a_key_the_store_was_not_sealed_with_are_refused(
    tmp_path: Path, pg_dsn: str, emulator: KakaoEmulator
) -> None:
    """A host whose key file lacks the key the account's row was sealed with: `login` and
    `import` (with --force too) are refused before Kakao is asked, exit 78 and one line that
    names the key and the key file, not a login; the shared row keeps its key and tokens
    (sealing it with this host's key would lock every other node out of it)."""
    lost = Keyring.parse(new_key_line())
    config = node_config(tmp_path, emulator, pg_dsn, "ops-1")
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    emulator.settings.redirect_uris.append(redirect)
    text = config.read_text()
    config.write_text(
        text.replace(
            f'redirect_uri = "{emulator.settings.redirect_uris[0]}"', f'redirect_uri = "{redirect}"'
        )
    )
    await _seed(pg_dsn, lost, ["default"])
    before = await _raw_row(pg_dsn)
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    asked = sum(emulator.stats.requests.values())

    def refused(code: int, out: str, err: str) -> None:
        assert (code, out) == (78, ""), (code, out, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert (
            "cannot decrypt the access_token of account 'default': it was encrypted with key"
            f" {lost.newest.key_id}"
        ) in err
        fix = err.split(") (", 1)[1]  # the hint: after "(it holds KEY)", which ends the message
        assert "key file" in fix and "log in" not in fix and "login" not in fix
        assert "Traceback" not in err and "secret" not in err

    proc = await spawn_login(config, timeout="4s")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    refused(proc.returncode, out.decode(), err.decode())
    for extra in ((), ("--force",)):
        refused(*await run_cli(config, "import", str(seed), *extra))
    assert sum(emulator.stats.requests.values()) == asked  # Kakao was not asked
    assert await _raw_row(pg_dsn) == before


async def test_logout_of_a_row_no_key_here_can_open_removes_it_and_says_kakao_was_not_told(
    tmp_path: Path, pg_dsn: str, emulator: KakaoEmulator
) -> None:
    """When the key an account's row was sealed with is lost, `logout` is the way out: it
    deletes the row (that seals nothing), says that Kakao could not be told (the tokens stay
    valid there until they expire, and no one can read them), and exits 0; a login after it
    starts a fresh row."""
    lost = Keyring.parse(new_key_line())
    config = node_config(tmp_path, emulator, pg_dsn, "ops-1")
    await _seed(pg_dsn, lost, ["default"])
    asked = sum(emulator.stats.requests.values())
    code, out, err = await run_cli(config, "logout")
    assert code == 0, (code, out, err)
    assert "removed account 'default' from the PostgreSQL store" in out
    assert "could not be told" in err and "Traceback" not in err
    assert await _raw_row(pg_dsn) is None
    assert sum(emulator.stats.requests.values()) == asked  # nothing to send Kakao


async def _raw_row(dsn: str) -> tuple[object, ...] | None:
    """The default account's row as stored: key id, generation and the sealed tokens."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT key_id, generation, access_token, refresh_token FROM accounts"
            " WHERE name = 'default'"
        )
        return await cur.fetchone()


async def test_rotate_key_before_init_says_to_run_init(tmp_path: Path, pg_dsn: str) -> None:
    """An empty database: rotate-key does not create the schema behind the operator's back."""
    config = write_store_config(tmp_path, pg_dsn)
    code, _, err = await run_cli(config, "store", "rotate-key")
    assert code == 78
    assert "schema is at version 0" in err and "run `kakao-tokend store init` first" in err


async def test_postgres_mode_without_a_key_refuses_to_run(tmp_path: Path) -> None:
    """`run` and `check-config` with backend = "postgres" and no key: exit 78, the fix named."""
    config = write_store_config(tmp_path, "host=127.0.0.1 dbname=x", keys=[])
    for command in (("check-config",), ("run",)):
        code, _, err = await run_cli(config, *command)
        assert code == 78, err
        assert "store.key_file" in err and "kakao-tokend store new-key" in err


async def test_a_database_address_libpq_cannot_read_is_a_config_error(tmp_path: Path) -> None:
    """A DSN that does not parse passed check-config, then `run` exited 1 (systemd restarted
    it forever) and every command too: exit 78 naming the key, in postgres mode and for
    `store migrate --to postgres` from the files; the value (a password) never shown."""
    (tmp_path / "pg").mkdir()
    (tmp_path / "file").mkdir()
    postgres = write_store_config(tmp_path / "pg", "===bad password=hunter2")
    for command in (("check-config",), ("run",), ("status",)):
        code, _, err = await run_cli(postgres, *command)
        assert code == 78, (command, err)
        assert "store.dsn_file" in err and "not a valid libpq connection string" in err
        assert "hunter2" not in err
    files = write_store_config(tmp_path / "file", "===bad password=hunter2", backend="file")
    code, _, err = await run_cli(files, "store", "migrate", "--to", "postgres")
    assert code == 78, err
    assert "store.dsn_file" in err and "hunter2" not in err


async def test_a_postgres_node_without_its_database_waits_and_never_uses_the_files(
    tmp_path: Path,
) -> None:
    """With a complete [store] but no database answering, `run` reports READY and waits for
    it (docs/fleet.md §10) with one line naming the problem, never falls back to the files
    (a second live copy of the refresh token), and stops cleanly."""
    config = write_store_config(tmp_path, f"host=127.0.0.1 port={free_port()} dbname=x")
    process = await start_daemon(config, wait_ready=False)
    await process.wait_log("waiting for the PostgreSQL store", timeout=20)
    assert "cannot connect to the PostgreSQL store" in process.log_text()
    assert await process.stop() == 0
    assert "Traceback" not in process.log_text()
    assert not list((tmp_path / "state").glob("*.state.json"))


def test_the_readme_test_command_installs_the_postgres_extra() -> None:
    """One install runs every test: the test extra pulls in the postgres extra."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "kakao-tokend[postgres]" in project["optional-dependencies"]["test"]
    assert any(
        d.startswith("psycopg[binary]>=3.2.4") for d in project["optional-dependencies"]["postgres"]
    )
