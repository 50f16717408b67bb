"""The CLI with backend = "postgres": refresh, status, logout and import through the store.

Real commands (`python -m kakao_tokend ...`) against a throwaway PostgreSQL and the Kakao
emulator; one test runs a real node next to them and watches it follow the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemonproc import run_cli, start_daemon
from fleetkit import migrated
from fleetrun import login_published, node_config, store_login
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.fleet import accounts, db
from loginproc import LoginProcess, follow_authorize, get_page, read_authorize_url, spawn_login
from pgcluster import free_port

pytestmark = pytest.mark.timeout(120)


async def row_of(dsn: str) -> tuple[int, str | None] | None:
    """(generation, refreshed_by) of the default account's row, or None."""
    conn = await db.connect(dsn, node="test", purpose="test", autocommit=True)
    async with conn:
        cur = await conn.execute(
            "SELECT generation, refreshed_by FROM accounts WHERE name = 'default'"
        )
        row = await cur.fetchone()
    return None if row is None else (row[0], row[1])


async def test_refresh_and_status_go_through_the_store(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Without a running node, `refresh` takes the row lock, calls Kakao once and commits the
    next generation (refreshed_by = this node); `status` grades the row, not the files."""
    await migrated(pg_dsn)
    path = node_config(tmp_path, emulator, pg_dsn, "ops-1")
    state = await store_login(emulator, load_config(path), pg_dsn)
    before = emulator.stats.refreshes_ok
    code, out, err = await run_cli(path, "refresh")
    assert code == 0, err
    assert f"generation {state.generation + 1}" in out
    assert emulator.stats.refreshes_ok == before + 1
    assert await row_of(pg_dsn) == (state.generation + 1, "ops-1")
    assert not (tmp_path / "ops-1" / "state" / "default.state.json").exists()
    code, out, err = await run_cli(path, "status", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["source"] == "store"
    assert document["accounts"][0]["generation"] == state.generation + 1


async def test_import_writes_a_checked_seed_file_into_the_store(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`import` checks the blog recipe's file with Kakao as in file mode, then inserts the
    account's row (generation 1, its refresh token tested with one refresh); a second import
    without --force is refused, nothing written; inside the rotation window the verifying
    refresh runs under the row lock and the rotated token is what the row holds."""
    await migrated(pg_dsn)
    path = node_config(tmp_path, emulator, pg_dsn, "ops-1")
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    code, out, err = await run_cli(path, "import", str(seed))
    assert code == 0, err
    assert "stored in the PostgreSQL store as generation 1" in out
    assert await row_of(pg_dsn) == (1, "ops-1")  # the check's refresh, made by this host
    code, _, err = await run_cli(path, "import", str(seed))
    assert code != 0 and "already has tokens in the PostgreSQL store" in err
    assert "Traceback" not in err
    body = emulator.issue_tokens(refresh_remaining=5 * 86400)  # inside the rotation window
    seed.write_text(json.dumps(body))
    code, out, err = await run_cli(path, "import", str(seed), "--force")
    assert code == 0, err
    assert "ROTATED" in out
    conn = await db.connect(pg_dsn, node="test", purpose="test")
    async with conn:
        row = await accounts.load_account(conn, load_config(path).store.keyring, "default")  # type: ignore[arg-type]
    assert row is not None and row.generation == 2
    assert row.state.tokens.refresh_token != body["refresh_token"]  # the rotated one


async def test_a_logout_on_any_host_empties_every_nodes_token_file(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A running node publishes the account; `logout` from another host's config deletes the
    row under its lock, and the node removes its token file within about a second."""
    node_path = node_config(tmp_path, emulator, pg_dsn, "web-1")
    node = await start_daemon(node_path)
    try:
        await login_published(emulator, node_path, pg_dsn, node)
        ops = node_config(tmp_path, emulator, pg_dsn, "ops-1")
        code, out, err = await run_cli(ops, "logout")
        assert code == 0, err
        assert "removed account 'default' from the PostgreSQL store" in out
        assert await row_of(pg_dsn) is None
        await node.wait_for(
            lambda: not (node.state_dir / "default.token.json").exists(),
            timeout=3,
            what="the token file removed",
        )
    finally:
        await node.stop()


async def test_a_login_is_written_as_the_next_generation_with_its_refresh_planned(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`login`'s store step (fleet.commands.save_login): a new row at generation 1, then a
    compare-and-swap to generation 2 over it, each with due_at planned by the lifetime rule."""
    from datetime import UTC, datetime

    from kakao_tokend.demo import auto_login
    from kakao_tokend.fleet.commands import save_login
    from kakao_tokend.kakao import KakaoClient, create_session

    await migrated(pg_dsn)
    config = load_config(node_config(tmp_path, emulator, pg_dsn, "ops-1"))
    account = config.account()
    session = create_session()
    try:
        for expected in (1, 2):
            fresh = await auto_login(KakaoClient(session, account.app), session, account.name)
            now = datetime.now(UTC)
            state = await save_login(config, account, fresh.tokens, fresh.user_id, now)
            assert state.generation == expected
            assert await row_of(pg_dsn) == (expected, "ops-1")
            conn = await db.connect(pg_dsn, node="test", purpose="test", autocommit=True)
            async with conn:
                cur = await conn.execute("SELECT due_at FROM accounts")
                row = await cur.fetchone()
            assert row is not None
            life = fresh.tokens.access_lifetime.total_seconds()
            offset = (row[0] - fresh.tokens.access_issued_at).total_seconds()
            assert 0.70 * life <= offset <= 0.80 * life
    finally:
        await session.close()


async def test_a_login_or_import_after_a_logout_continues_the_generation_in_the_store(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`generation` grows by one with every new token set, across a logout in fleet mode too:
    `logout` deleted the row and the next `login` or `import` started at 1 again (consumers,
    hooks and templates comparing generations took the new tokens for old ones). A login
    after a logout, an import after the next one and a login after an operator's DELETE each
    continue above the generation removed (the first of them by the real `login` command)."""
    from datetime import UTC, datetime

    from kakao_tokend.demo import auto_login
    from kakao_tokend.fleet.commands import save_login
    from kakao_tokend.kakao import KakaoClient, create_session

    await migrated(pg_dsn)
    path = node_config(tmp_path, emulator, pg_dsn, "ops-1")
    config = load_config(path)
    account = config.account()
    session = create_session()

    async def log_in() -> int:
        fresh = await auto_login(KakaoClient(session, account.app), session, account.name)
        state = await save_login(config, account, fresh.tokens, fresh.user_id, datetime.now(UTC))
        row = await row_of(pg_dsn)
        assert row is not None and row[0] == state.generation
        return state.generation

    try:
        assert [await log_in(), await log_in()] == [1, 2]
        code, out, err = await run_cli(path, "logout")
        assert code == 0, out + err
        assert await row_of(pg_dsn) is None
        # The real `login` command (its check of the row, then the store step).
        redirect = f"http://127.0.0.1:{free_port()}/callback"
        emulator.settings.redirect_uris.append(redirect)
        text = path.read_text().replace(emulator.settings.redirect_uris[0], redirect)
        path.write_text(text)
        proc = await spawn_login(path)
        try:
            url, seen = await read_authorize_url(proc)
            await get_page(await follow_authorize(url))
            code, out, err = await LoginProcess(proc, url, seen).finish()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert code == 0, out + err
        assert "stored in the PostgreSQL store as generation 3" in out
        assert (await row_of(pg_dsn) or (0,))[0] == 3

        code, out, err = await run_cli(path, "logout")
        assert code == 0, out + err
        seed = tmp_path / "kakao_token.json"
        seed.write_text(json.dumps(emulator.issue_tokens()))
        code, out, err = await run_cli(path, "import", "--no-verify", str(seed))
        assert code == 0, out + err
        assert "stored in the PostgreSQL store as generation 4" in out
        assert await row_of(pg_dsn) == (4, None)

        conn = await db.connect(pg_dsn, node="test", purpose="test", autocommit=True)
        async with conn:
            await conn.execute("DELETE FROM accounts WHERE name = 'default'")  # by hand
        assert await log_in() == 5
    finally:
        await session.close()


async def test_a_login_as_another_kakao_user_leaves_the_row_alone(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """In fleet mode too, a re-login that comes back as another Kakao user is refused before
    the shared row changes (the check runs under the row's lock in save_login), with one
    line naming --switch-user; with --switch-user the row becomes the other user's."""
    from datetime import UTC, datetime

    from kakao_tokend.demo import auto_login
    from kakao_tokend.fleet.commands import save_login
    from kakao_tokend.kakao import KakaoClient, create_session

    await migrated(pg_dsn)
    path = node_config(tmp_path, emulator, pg_dsn, "ops-1")
    config = load_config(path)
    account = config.account()
    session = create_session()
    try:
        fresh = await auto_login(KakaoClient(session, account.app), session, account.name)
        await save_login(config, account, fresh.tokens, fresh.user_id, datetime.now(UTC))
    finally:
        await session.close()
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    emulator.settings.redirect_uris.append(redirect)
    path.write_text(path.read_text().replace(emulator.settings.redirect_uris[0], redirect))
    other = emulator.add_user(name="second").id
    before = await row_of(pg_dsn)
    assert before is not None and before[0] == 1

    async def log_in_as_second(*extra: str) -> tuple[int, str, str]:
        proc = await spawn_login(path, *extra, timeout="3s")
        try:
            url, seen = await read_authorize_url(proc)
            await get_page(await follow_authorize(url + "&login_hint=second"))
            return await LoginProcess(proc, url, seen).finish()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    code, out, err = await log_in_as_second()
    assert code == 1, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--switch-user" in errors[0], err
    assert f"Kakao user {other}" in errors[0] and "Kakao user 1234567890" in errors[0]
    assert await row_of(pg_dsn) == before

    code, out, err = await log_in_as_second("--switch-user")
    assert code == 0, out + err
    assert f"as Kakao user {other}" in out
    assert (await row_of(pg_dsn) or (0,))[0] == 2
