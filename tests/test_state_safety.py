"""No path writes an older state over a newer one, and no reload wedges an account.

Each test reproduces one data-loss path against the emulator: the start-up check, a pending
write retried after another process wrote, a reload during a slow refresh, and an old backup
copied over the live state file of a running daemon (refused unless the operator forces it
with `kakao-tokend restore`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import aiohttp
import pytest

from daemonproc import login, run_cli, write_config
from diskfull import fill_up
from kakao_tokend.alerts import Severity
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountEvent, Health
from kakao_tokend.store import AccountStore
from served import serving

pytestmark = pytest.mark.timeout(60)


async def running_manager(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> tuple[AccountManager, Path, list[AccountEvent]]:
    """Log in and build the account's manager like the daemon does (rescue directory too)."""
    config_path = write_config(tmp_path, emulator)
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account, rescue_dir=config.runtime_dir),
        client=KakaoClient(session, account.app),
        policy=config.refresh,
    )
    manager.load()
    events: list[AccountEvent] = []
    manager.listeners.append(events.append)
    return manager, config_path, events


# --------------------------------------------------------------------------- 3.1 start-up check


async def test_the_start_up_check_never_overwrites_a_login_made_meanwhile(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Kakao's clock runs ahead, so verify() corrects the access expiry; a login lands on disk
    while access_token_info is on the wire. The correction must not write the state it loaded
    before the call over the new login (whose refresh token is the only live one)."""
    emulator.settings.access_lifetime = 3600
    manager, config_path, _ = await running_manager(emulator, tmp_path, session)
    emulator.advance_clock(50 * 60)
    emulator.inject("access_token_info", "slow", count=1, delay=0.6)
    check = asyncio.create_task(manager.verify())
    await asyncio.sleep(0.1)
    fresh = await login(emulator, config_path)  # `kakao-tokend login` in that window
    await check
    saved = manager.store.load()
    assert saved is not None
    assert saved.tokens.refresh_token == fresh.tokens.refresh_token
    assert saved.generation == fresh.generation
    assert manager.state is not None
    assert manager.state.tokens.refresh_token == fresh.tokens.refresh_token


async def test_a_state_written_right_after_the_start_read_it_is_adopted_later(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A login that replaces the state file just after the manager read it at start: the
    manager remembers the file it read (not the one on disk a moment later), so the next look
    at the file sees the change and takes the new tokens."""
    config_path = write_config(tmp_path, emulator)
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.accounts["default"]
    fresh: list[AccountState] = []

    class LoginRightAfterTheRead(AccountStore):
        """The file store, with `kakao-tokend login` landing right after its load."""

        def load(self) -> AccountState | None:
            state = super().load()
            if not fresh:
                time.sleep(0.01)  # a new mtime even on a coarse file system clock
                fresh.append(asyncio.run_coroutine_threadsafe(login_now(), loop).result())
            return state

    async def login_now() -> AccountState:
        return await login(emulator, config_path)

    loop = asyncio.get_running_loop()
    manager = AccountManager(
        account,
        store=LoginRightAfterTheRead(account, rescue_dir=config.runtime_dir),
        client=KakaoClient(session, account.app),
        policy=config.refresh,
    )
    loaded = await asyncio.to_thread(manager.load)
    assert loaded is not None and fresh
    assert loaded.tokens.refresh_token != fresh[0].tokens.refresh_token
    assert manager.notice_outside_changes()
    assert manager.state is not None
    assert manager.state.tokens.refresh_token == fresh[0].tokens.refresh_token


# --------------------------------------------------------------------------- 3.2 pending write


async def test_a_pending_write_never_overwrites_a_state_written_meanwhile(
    emulator: KakaoEmulator,
    tmp_path: Path,
    tiny_state_fs: Path,
    session: aiohttp.ClientSession,
) -> None:
    """A rotation cannot be saved (the disk is full); meanwhile the disk frees up and the
    operator logs in. The retry runs under the lock, sees the file changed since our last
    write, and stops: the login stays, an alert says so, and the tokens we held are kept in
    the rescue file."""
    emulator.settings.access_lifetime = 20
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    manager, config_path, events = await running_manager(emulator, tmp_path, session)
    filler = fill_up(tiny_state_fs)
    await manager.refresh(force=True)
    assert manager.status.write_pending
    ours = manager.state
    assert ours is not None
    filler.unlink()
    fresh = await login(emulator, config_path)
    wakeup = manager.next_wakeup()
    assert wakeup is not None
    await asyncio.sleep(max(0.0, (wakeup - manager.clock()).total_seconds()) + 0.05)
    await manager.tick()
    saved = manager.store.load()
    assert saved is not None
    assert saved.tokens.refresh_token == fresh.tokens.refresh_token, "written over the login"
    assert not manager.status.write_pending
    assert manager.status.state_conflict
    assert "conflict" in [e.kind for e in events]
    assert manager.state is not None
    assert manager.state.tokens.refresh_token == fresh.tokens.refresh_token
    kept = [json.loads(p.read_text()) for p in (tmp_path / "run").glob("default.rescue*")]
    assert any(k["state"]["tokens"]["refresh_token"] == ours.tokens.refresh_token for k in kept)


async def tick_at_next_wakeup(manager: AccountManager) -> None:
    """Sleep until the manager's next wakeup (a retry, a refresh) and do what is due then."""
    wakeup = manager.next_wakeup()
    assert wakeup is not None
    await asyncio.sleep(max(0.0, (wakeup - manager.clock()).total_seconds()) + 0.05)
    await manager.tick()


async def test_a_pending_write_waits_for_the_account_lock(
    emulator: KakaoEmulator,
    tmp_path: Path,
    tiny_state_fs: Path,
    session: aiohttp.ClientSession,
) -> None:
    """The disk is full, so a rotation waits in memory; the disk frees up while another
    process holds the account lock (a CLI refresh or login in progress). The pending write is
    not retried then — it waits for the lock instead of racing the other writer — and lands
    once the lock is free."""
    emulator.settings.access_lifetime = 20
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    manager, _, _ = await running_manager(emulator, tmp_path, session)
    state_path = manager.store.state_path
    before = state_path.read_bytes()
    filler = fill_up(tiny_state_fs)
    await manager.refresh(force=True)
    assert manager.status.write_pending
    filler.unlink()
    other = AccountStore(manager.account)  # another process's view of the files
    # The token file's write failed too, so two retries are planned, each on its own back-off
    # (jittered): a wakeup may be the publish's. Two ticks at wakeups reach the write's retry
    # whichever comes first; a third may be a later one of its own.
    with other.lock():
        for _ in range(3):
            await tick_at_next_wakeup(manager)
            assert state_path.read_bytes() == before, "written while another held the lock"
            assert manager.status.write_pending
    for _ in range(3):
        await tick_at_next_wakeup(manager)
        if not manager.status.write_pending:
            break
    assert not manager.status.write_pending
    saved = manager.store.load()
    assert saved is not None and manager.state is not None
    assert saved.generation == manager.state.generation
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


# --------------------------------------------------------------------------- 3.3 reload


async def test_a_store_replaced_during_a_refresh_is_unlocked_through_the_locked_one(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A reload swaps the manager's store while a slow refresh holds the old one's lock: the
    refresh releases the lock it took (no RuntimeError, no file descriptor left locked), and
    the next refresh is not refused as lock_busy."""
    manager, _, _ = await running_manager(emulator, tmp_path, session)
    emulator.inject("token", "slow", count=1, delay=0.5)
    refreshing = asyncio.create_task(manager.refresh(force=True))
    await asyncio.sleep(0.2)
    locked = manager.store
    assert locked.locked
    manager.store = AccountStore(manager.account)  # what a reload does
    await refreshing
    assert not locked.locked
    assert manager.status.health is Health.OK
    await manager.refresh(force=True)
    assert manager.status.health is Health.OK, manager.status.last_error
    assert manager.state is not None and manager.state.generation == 3


async def test_a_reload_waits_for_a_slow_refresh_before_swapping(
    emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload during a refresh that takes longer than the stop grace waits up to the Kakao
    timeout plus one second, so it answers only after the refresh did; later refreshes work."""
    from kakao_tokend import daemon

    monkeypatch.setattr(daemon, "STOP_GRACE", 0.3)  # what a reload waits at least
    config = write_config(tmp_path, emulator, timeout="3s")
    await login(emulator, config)
    async with serving(config) as served:
        emulator.inject("token", "slow", count=1, delay=1.2)
        finished: dict[str, float] = {}

        async def call(name: str, method: str, path: str) -> int:
            status, _ = await served.request(method, path)
            finished[name] = time.monotonic()
            return status

        refresh = asyncio.create_task(call("refresh", "POST", "/v1/accounts/default/refresh"))
        await asyncio.sleep(0.2)
        reload_status = await call("reload", "POST", "/v1/reload")
        assert reload_status == 200
        assert await refresh == 200
        assert finished["reload"] >= finished["refresh"] - 0.05
        status, body = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 200, body
        assert body["health"] == "ok"


# --------------------------------------------------------------------------- 3.8 old backups


async def test_a_running_daemon_refuses_an_older_state_file(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """An old backup copied over the live state file: the daemon keeps its newer tokens (the
    backup's refresh token was retired by a rotation), puts them back on disk, keeps the backup
    aside, and alerts. The alert's commands work exactly as shown: its fix (`status`), and
    its hint's `restore` of the refused file, which takes the backup back."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    manager, config_path, events = await running_manager(emulator, tmp_path, session)
    state_path = manager.store.state_path
    backup = tmp_path / "backup.state.json"
    shutil.copy(state_path, backup)
    await manager.refresh(force=True)
    await manager.refresh(force=True)
    newest = manager.state
    assert newest is not None and newest.generation == 3
    shutil.copy(backup, state_path)  # the mistake
    assert manager.notice_outside_changes() is False
    assert manager.state is newest
    assert manager.status.state_conflict
    assert "conflict" in [e.kind for e in events]
    conditions = manager.health().conditions
    assert [c.severity for c in conditions if c.name == "state_conflict"] == [Severity.CRITICAL]
    saved = manager.store.load()
    assert saved is not None
    assert saved.generation == newest.generation
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"
    aside = list(state_path.parent.glob("default.state.json.refused-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == backup.read_bytes()
    await manager.refresh(force=True)
    assert manager.status.health is Health.OK

    [conflict] = [c for c in conditions if c.name == "state_conflict"]
    assert conflict.hint is not None
    [fix] = re.findall(r"`([^`]*)`", conflict.fix.render("en"))
    [restore] = re.findall(r"`([^`]*)`", conflict.hint.render("en"))
    prefix = ["kakao-tokend", "--config", str(config_path)]
    assert shlex.split(fix) == [*prefix, "status"]
    assert shlex.split(restore) == [*prefix, "restore", str(aside[0])]
    code, _, err = await run_cli(config_path, *shlex.split(restore)[3:])
    assert code == 0, err
    assert manager.notice_outside_changes() is True
    assert manager.state is not None
    assert (
        manager.state.tokens.refresh_token
        == json.loads(backup.read_text())["tokens"]["refresh_token"]
    )
    assert not manager.status.state_conflict


async def test_restore_forces_an_older_state_on_a_running_daemon(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """`kakao-tokend restore BACKUP` is how the operator really means it: the running daemon
    adopts the backup although it is older."""
    manager, config_path, events = await running_manager(emulator, tmp_path, session)
    backup = tmp_path / "backup.state.json"
    shutil.copy(manager.store.state_path, backup)
    restored = json.loads(backup.read_text())
    await manager.refresh(force=True)
    await manager.refresh(force=True)
    code, out, err = await run_cli(config_path, "restore", str(backup))
    assert code == 0, err
    assert "restored" in out
    assert manager.notice_outside_changes() is True
    assert manager.state is not None
    assert manager.state.tokens.refresh_token == restored["tokens"]["refresh_token"]
    assert manager.state.generation > 3
    assert not manager.status.state_conflict
    assert "adopted" in [e.kind for e in events]


async def test_restore_on_a_full_disk_leaves_the_live_state_file_in_place(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """A `restore` whose write fails (the disk is full) changes nothing: the live state file
    stays where the daemon and every command look for it, and no copy of it is left over."""
    config_path = write_config(tmp_path, emulator)
    await login(emulator, config_path)
    live = tiny_state_fs / "default.state.json"
    backup = tmp_path / "backup.state.json"
    shutil.copy(live, backup)
    before = live.read_bytes()
    (tiny_state_fs / ".kakao-tokend.reserve").unlink(missing_ok=True)
    filler = fill_up(tiny_state_fs)
    try:
        code, _, err = await run_cli(config_path, "restore", str(backup))
    finally:
        filler.unlink()
    assert code != 0
    assert "No space left on device" in err
    assert "kept in memory" not in err  # a command that exits keeps nothing
    assert live.read_bytes() == before
    names = [entry.name for entry in os.scandir(tiny_state_fs)]
    assert [name for name in names if name.startswith(live.name)] == [live.name]
