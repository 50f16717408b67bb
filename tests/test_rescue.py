"""Never drop a refresh token we were given: half-broken answers and a disk that stays full.

A refresh answer with a valid new refresh token but a broken access part is salvaged. When
the state file cannot be written even with the emergency reserve given up, the tokens go to a
second, independent place — a 0600 rescue file in the runtime directory (a tmpfs that
survives a restart of the service, not a reboot) — and are recovered at start: the newest
generation wins, an older one never does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemonproc import DaemonProcess, login, short_tokens, start_daemon, write_config
from diskfull import fill_up, read_only, tiny_tmpfs
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.state import AccountState
from kakao_tokend.status import Health
from kakao_tokend.store import AccountStore
from samples import make_state

pytestmark = pytest.mark.timeout(120)


class ManglingProxy:
    """A loopback HTTP proxy in front of the emulator that can break one token answer.

    ``break_next`` names a field of the next *rotating* refresh answer (one carrying a
    ``refresh_token``) to garble; everything else passes through unchanged.
    """

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.break_next: str | None = None
        self.broken = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward one request; garble the chosen field of a rotating token answer."""
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
            content_type = upstream.content_type
        if request.path == "/oauth/token" and status == 200 and self.break_next:
            document: dict[str, Any] = json.loads(payload)
            if "refresh_token" in document:
                document[self.break_next] = "garbage" if self.break_next == "expires_in" else ""
                self.break_next = None
                self.broken += 1
                payload = json.dumps(document).encode()
        return web.Response(status=status, body=payload, content_type=content_type)

    async def start(self) -> str:
        """Listen on 127.0.0.1 and return the base URL."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.mark.parametrize("broken_field", ["access_token", "expires_in"])
async def test_a_half_broken_answer_keeps_the_new_refresh_token(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, broken_field: str
) -> None:
    """Kakao rotates, but the access part of its answer is unusable: the new refresh token is
    saved at once (the old one is dead), and the retry gets the access token with it."""
    emulator.settings.access_lifetime = 60
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    proxy = ManglingProxy(emulator.url, session)
    url = await proxy.start()
    try:
        config_path = write_config(tmp_path, emulator)
        first = await login(emulator, config_path)
        config = load_config(config_path)
        account = config.accounts["default"]
        from dataclasses import replace

        app = replace(account.app, auth_url=url, api_url=url)
        manager = AccountManager(
            account,
            store=AccountStore(account, rescue_dir=config.runtime_dir),
            client=KakaoClient(session, app),
            policy=config.refresh,
        )
        manager.load()
        proxy.break_next = broken_field
        await manager.refresh(force=True)
        assert proxy.broken == 1
        assert emulator.refresh_token_status(first.tokens.refresh_token) == "retired"
        saved = manager.store.load()
        assert saved is not None
        assert saved.tokens.refresh_token != first.tokens.refresh_token
        assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"
        assert manager.status.health is Health.RETRYING  # the access token is still wanted
        assert manager.status.counters["rotations"] == 1
        await manager.refresh(force=True)
        assert manager.status.health is Health.OK
        assert manager.state is not None
        assert emulator.access_token_valid(manager.state.tokens.access_token)
        assert emulator.stats.retired_refresh_presented == 0
    finally:
        await proxy.stop()


def write_rescue(runtime_dir: Path, state_file: Path, state: AccountState) -> Path:
    """Write a rescue file the way the daemon does (0600, the state plus where it belongs)."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = runtime_dir / f"{state.account}.rescue.json"
    document = {"version": 1, "state_file": str(state_file), "state": state.to_dict()}
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return path


async def fresh_manager(config_path: Path, session: aiohttp.ClientSession) -> AccountManager:
    """Build and load the default account's manager as the daemon does at start."""
    config = load_config(config_path)
    account = config.accounts["default"]
    manager = AccountManager(
        account,
        store=AccountStore(account, rescue_dir=config.runtime_dir),
        client=KakaoClient(session, account.app),
        policy=config.refresh,
    )
    manager.load()
    return manager


async def test_a_newer_rescue_file_wins_at_start(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The state file holds generation 1, the rescue file generation 3 (written when the disk
    was full, then the process died): the start recovers generation 3 and saves it, keeping
    the state file it replaces as .replaced-<time>."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime
    config_path = write_config(tmp_path, emulator)
    await login(emulator, config_path)
    manager = await fresh_manager(config_path, session)
    on_disk = manager.store.state_path.read_bytes()
    await manager.refresh(force=True)
    await manager.refresh(force=True)
    newest = manager.state
    assert newest is not None and newest.generation == 3
    manager.store.state_path.write_bytes(on_disk)  # the newer saves never happened
    rescue = write_rescue(tmp_path / "run", manager.store.state_path, newest)
    again = await fresh_manager(config_path, session)
    assert again.state is not None
    assert again.state.generation == 3
    assert again.state.tokens.refresh_token == newest.tokens.refresh_token
    saved = again.store.load()
    assert saved is not None and saved.generation == 3
    assert not rescue.exists()  # saved for real, so no longer needed
    # Nothing lost: the state file the rescue replaced is kept as .replaced-<time>.
    kept = list(manager.store.state_path.parent.glob("default.state.json.replaced-*"))
    assert [path.read_bytes() for path in kept] == [on_disk]
    await again.refresh(force=True)
    assert again.status.health is Health.OK


async def test_an_older_rescue_file_never_wins(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A rescue file older than the state file (the state was saved later) is not used."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime
    config_path = write_config(tmp_path, emulator)
    await login(emulator, config_path)
    manager = await fresh_manager(config_path, session)
    old = manager.state
    assert old is not None
    await manager.refresh(force=True)
    rescue = write_rescue(tmp_path / "run", manager.store.state_path, old)
    again = await fresh_manager(config_path, session)
    assert again.state is not None and again.state.generation == 2
    assert emulator.refresh_token_status(again.state.tokens.refresh_token) == "live"
    # Kept aside, never deleted: it is not used, and a person may still want to look at it.
    assert not rescue.exists()
    kept = list(rescue.parent.glob(rescue.name + ".superseded-*"))
    assert len(kept) == 1
    assert json.loads(kept[0].read_text())["state"] == old.to_dict()


async def test_disk_full_beyond_the_reserve_then_kill_9_loses_nothing(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """The state disk is full and the emergency reserve already used up; rotations go on in
    memory. kill -9 then. The rotated refresh token is in the 0600 rescue file in the runtime
    directory, and the restarted daemon recovers it (nothing presented to Kakao is retired)."""
    short_tokens(emulator, access=2, refresh=3600)
    emulator.settings.rotation_window = 4000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=4000)
    await login(emulator, config)
    daemon = await start_daemon(config)
    fillers: list[Path] = []
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 2, what="first refresh")
        fillers.append(fill_up(tiny_state_fs))
        await daemon.wait_log("gave up the emergency reserve", timeout=10)
        fillers.append(fill_up(tiny_state_fs, name="filler2"))
        await daemon.wait_log("cannot save the new tokens", timeout=10)
        stuck = daemon.state()["generation"]
        await daemon.wait_for(
            lambda: emulator.stats.rotations >= stuck + 1, what="a rotation held in memory only"
        )
        await asyncio.sleep(0.3)
    finally:
        daemon.send(signal.SIGKILL)
        await daemon.proc.wait()
    on_disk = daemon.state()["tokens"]["refresh_token"]
    assert emulator.refresh_token_status(on_disk) == "retired"  # the disk alone would lose it
    rescue = tmp_path / "run" / "default.rescue.json"
    assert stat.S_IMODE(rescue.stat().st_mode) == 0o600
    kept = json.loads(rescue.read_text())["state"]["tokens"]["refresh_token"]
    assert emulator.refresh_token_status(kept) == "live"
    for filler in fillers:
        filler.unlink()
    os.sync()
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("recovered", timeout=10)
        await daemon.wait_for(
            lambda: (
                emulator.refresh_token_status(daemon.state()["tokens"]["refresh_token"]) == "live"
                and daemon.state()["generation"] > stuck
            ),
            what="the rescued tokens saved to the state file",
        )
        await daemon.wait_for(lambda: not rescue.exists(), what="the rescue file removed")
        rotations = emulator.stats.rotations
        await daemon.wait_for(lambda: emulator.stats.rotations > rotations, what="more refreshes")
        assert emulator.stats.retired_refresh_presented == 0
        assert "needs a new login" not in daemon.log_text()
    finally:
        assert await daemon.stop() == 0


def test_the_rescue_file_is_private_and_names_its_state_file(tmp_path: Path) -> None:
    """save_rescue writes 0600 whatever the umask, and load_rescue reads it back only for the
    state file it belongs to (two configurations sharing a runtime directory never mix)."""
    store = AccountStore.from_paths("default", state_file=tmp_path / "state" / "default.state.json")
    rescue_dir = tmp_path / "run"
    ours = AccountStore(store.account, rescue_dir=rescue_dir)
    state = make_state()
    old_mask = os.umask(0)
    try:
        assert ours.save_rescue(state)
    finally:
        os.umask(old_mask)
    path = rescue_dir / "default.rescue.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = ours.load_rescue()
    assert loaded is not None and loaded.tokens == state.tokens
    other = AccountStore.from_paths("default", state_file=tmp_path / "elsewhere.state.json")
    assert AccountStore(other.account, rescue_dir=rescue_dir).load_rescue() is None
    ours.discard_rescue()
    assert not path.exists()


@pytest.mark.parametrize(
    "text",
    ['{"version": 1, "state": {"acc', "[" * 20000 + "]" * 20000],
    ids=["torn", "nested deeper than the parser recurses"],
)
def test_a_damaged_rescue_file_is_kept_aside_and_never_used(tmp_path: Path, text: str) -> None:
    """A torn rescue file is moved to .corrupt-<stamp> (kept for a person), and ignored."""
    base = AccountStore.from_paths("default", state_file=tmp_path / "default.state.json")
    store = AccountStore(base.account, rescue_dir=tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "default.rescue.json").write_text(text)
    assert store.load_rescue() is None
    kept = list((tmp_path / "run").glob("default.rescue.json.corrupt-*"))
    assert len(kept) == 1
    assert not (tmp_path / "run" / "default.rescue.json").exists()


async def test_logout_removes_the_rescue_file_too(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """`kakao-tokend logout` deletes a rescue file left by a crashed daemon, so the next start
    cannot bring the logged-out tokens back."""
    from daemonproc import run_cli

    config_path = write_config(tmp_path, emulator)
    state = await login(emulator, config_path)
    rescue = write_rescue(tmp_path / "run", tmp_path / "state" / "default.state.json", state)
    code, _, err = await run_cli(config_path, "logout")
    assert code == 0, err
    assert not rescue.exists()
    assert not (tmp_path / "state" / "default.state.json").exists()


async def test_cli_refresh_on_a_full_disk_does_not_ask_kakao(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """`kakao-tokend refresh` with no room left for the state file (and no emergency reserve
    to give up) refuses before calling Kakao: a rotation it could not save would retire the
    only refresh token on disk. The fix it names is the one for a full disk (the same table
    as every refused write), not a list of every possible cause."""
    from daemonproc import run_cli

    short_tokens(emulator, access=600, refresh=3600)
    emulator.settings.rotation_window = 4000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=4000)
    await login(emulator, config)
    (tiny_state_fs / ".kakao-tokend.reserve").unlink(missing_ok=True)
    filler = fill_up(tiny_state_fs)
    asked = len(emulator.stats.refresh_log)
    code, _, err = await run_cli(config, "refresh")
    assert code != 0
    assert "Kakao was not asked" in err
    assert "free some disk space" in err, err  # the fix follows the errno (ENOSPC)
    assert len(emulator.stats.refresh_log) == asked
    on_disk = json.loads((tiny_state_fs / "default.state.json").read_text())
    assert emulator.refresh_token_status(on_disk["tokens"]["refresh_token"]) == "live"
    filler.unlink()
    code, _, err = await run_cli(config, "refresh")
    assert code == 0, err
    assert emulator.stats.retired_refresh_presented == 0


async def test_cli_refresh_keeps_tokens_the_disk_refused_in_the_rescue_file(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """The disk fills up (reserve and all) while Kakao answers a `kakao-tokend refresh`: the
    rotated tokens go to the rescue file, the error names it, and the next command picks
    them up — the live refresh token is never lost."""
    from daemonproc import run_cli

    short_tokens(emulator, access=600, refresh=3600)
    emulator.settings.rotation_window = 4000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=4000)
    await login(emulator, config)
    emulator.inject("token", "hold", count=1, delay=30.0)
    command = asyncio.create_task(run_cli(config, "refresh"))
    for _ in range(300):
        if emulator.held_requests:
            break
        await asyncio.sleep(0.05)
    assert emulator.held_requests == 1, "the refresh never reached Kakao"
    fillers = [fill_up(tiny_state_fs)]
    (tiny_state_fs / ".kakao-tokend.reserve").unlink(missing_ok=True)
    fillers.append(fill_up(tiny_state_fs, name="filler2"))
    emulator.release_held()
    code, _, err = await command
    rescue = tmp_path / "run" / "default.rescue.json"
    assert code != 0
    assert str(rescue) in err
    kept = json.loads(rescue.read_text())["state"]["tokens"]["refresh_token"]
    assert emulator.refresh_token_status(kept) == "live"
    for filler in fillers:
        filler.unlink()
    code, _, err = await run_cli(config, "refresh")
    assert code == 0, err
    on_disk = json.loads((tiny_state_fs / "default.state.json").read_text())
    assert emulator.refresh_token_status(on_disk["tokens"]["refresh_token"]) == "live"
    assert not rescue.exists()
    assert emulator.stats.retired_refresh_presented == 0


async def test_a_state_directory_turned_read_only_keeps_refreshing_into_the_rescue_file(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """The state file system turns read-only under a running daemon: refreshes go on
    (the lock file is locked through a read-only descriptor), the new tokens are served and
    kept in memory and the rescue file, and they are saved once it is writable again. It
    stopped refreshing at all ('cannot open lock file: Read-only file system') until the
    access token expired, with the advice to check that the host reaches Kakao."""
    short_tokens(emulator, access=4, refresh=3600)
    emulator.settings.rotation_window = 4000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=4000)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 2, what="first refresh")
        with read_only(tiny_state_fs):
            stuck = daemon.state()["generation"]
            await daemon.wait_log("cannot save the new tokens", timeout=15)
            rotations = emulator.stats.rotations
            await daemon.wait_for(
                lambda: emulator.stats.rotations > rotations, what="refreshes on a read-only disk"
            )
            status, body = await daemon.api("GET", "/v1/accounts/default/token")
            assert status == 200 and emulator.access_token_valid(body["access_token"])
            rescue = tmp_path / "run" / "default.rescue.json"

            def rescued_live() -> bool:  # (read again each time: a rotation may come between)
                kept = json.loads(rescue.read_text())["state"]["tokens"]["refresh_token"]
                return emulator.refresh_token_status(kept) == "live"

            await daemon.wait_for(rescued_live, what="the live refresh token in the rescue file")
            assert daemon.state()["generation"] == stuck  # nothing could be written there
        await daemon.wait_for(
            lambda: (
                daemon.state()["generation"] > stuck
                and emulator.refresh_token_status(daemon.state()["tokens"]["refresh_token"])
                == "live"
            ),
            what="the tokens saved once the disk is writable",
        )
        assert emulator.stats.retired_refresh_presented == 0
        assert "needs a new login" not in daemon.log_text()
    finally:
        assert await daemon.stop() == 0


async def test_import_keeps_the_new_refresh_token_of_a_half_broken_answer(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """`import` tests the file's refresh token with one refresh; Kakao rotates, but the
    access part of its answer is unusable. The new refresh token is the only live one now:
    it is imported (the access token comes with the daemon's next refresh), not thrown away
    with "could not ask Kakao" (exit 69), which left the user a dead file."""
    from daemonproc import run_cli

    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    proxy = ManglingProxy(emulator.url, session)
    url = await proxy.start()
    try:
        config = write_config(tmp_path, emulator)
        text = config.read_text().replace(emulator.url, url)
        config.write_text(text)
        body = emulator.issue_tokens()
        seed = tmp_path / "kakao_token.json"
        seed.write_text(json.dumps(body))
        proxy.break_next = "access_token"
        code, _, err = await run_cli(config, "import", str(seed))
    finally:
        await proxy.stop()
    assert proxy.broken == 1
    assert code == 0, err
    assert emulator.refresh_token_status(body["refresh_token"]) == "retired"
    saved = json.loads((tmp_path / "state" / "default.state.json").read_text())
    assert emulator.refresh_token_status(saved["tokens"]["refresh_token"]) == "live"


async def test_a_forced_import_whose_check_rotates_is_saved_when_no_copy_can_be_made(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`import --force` on a state file system out of inodes: the old state's copy (a hard
    link) cannot be made, but Kakao has already rotated the file's refresh token during the
    check, so the new tokens are saved anyway (the reserve gives way). It stopped at the
    copy with "could not be moved aside", and the rotated refresh token was nowhere."""
    from daemonproc import run_cli
    from diskfull import tiny_tmpfs, use_up_inodes

    with tiny_tmpfs(tmp_path / "state", inodes=16) as state_dir:
        config = write_config(tmp_path, emulator)
        first = tmp_path / "first.json"
        first.write_text(json.dumps(emulator.issue_tokens()))
        code, _, err = await run_cli(config, "import", str(first))
        assert code == 0, err
        body = emulator.issue_tokens(refresh_remaining=10 * 86400)  # the check rotates it
        seed = tmp_path / "kakao_token.json"
        seed.write_text(json.dumps(body))
        fillers = use_up_inodes(state_dir)
        code, _, err = await run_cli(config, "import", "--force", str(seed))
        for filler in fillers:
            filler.unlink()
        assert code == 0, err
        assert emulator.refresh_token_status(body["refresh_token"]) == "retired"
        saved = json.loads((state_dir / "default.state.json").read_text())
        assert emulator.refresh_token_status(saved["tokens"]["refresh_token"]) == "live"
        assert saved["tokens"]["refresh_token"] != body["refresh_token"]


async def _stop_with_a_save_pending(
    emulator: KakaoEmulator, tmp_path: Path, state_fs: Path
) -> tuple[DaemonProcess, int]:
    """Run a daemon whose state disk is full beyond the reserve until a rotation waits in
    memory, then SIGTERM it; return the daemon and its generation on disk."""
    short_tokens(emulator, access=2, refresh=3600)
    emulator.settings.rotation_window = 4000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=4000)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 2, what="first refresh")
        fill_up(state_fs)
        await daemon.wait_log("gave up the emergency reserve", timeout=10)
        fill_up(state_fs, name="filler2")
        await daemon.wait_log("cannot save the new tokens", timeout=10)
        stuck = daemon.state()["generation"]
        await daemon.wait_for(
            lambda: emulator.stats.rotations >= stuck + 1, what="a rotation held in memory only"
        )
    finally:
        await daemon.stop()
    return daemon, stuck


async def test_a_stop_with_a_save_pending_says_the_rescue_file_keeps_the_tokens(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """SIGTERM while the state disk refuses the newest tokens: they are in the rescue file,
    and the stop says so (and that the next start recovers them) instead of the false
    CRITICAL 'they are lost with this process'. The next start does recover them."""
    daemon, stuck = await _stop_with_a_save_pending(emulator, tmp_path, tiny_state_fs)
    rescue = tmp_path / "run" / "default.rescue.json"
    log = daemon.log_text()
    assert "lost with this process" not in log
    assert f"they are kept in the rescue file {rescue}" in log
    assert "the next start recovers them" in log
    kept = json.loads(rescue.read_text())["state"]["tokens"]["refresh_token"]
    assert emulator.refresh_token_status(kept) == "live"
    for name in ("filler", "filler2"):
        (tiny_state_fs / name).unlink()
    os.sync()
    daemon = await start_daemon(daemon.config_path)
    try:
        await daemon.wait_log("recovered the tokens from the rescue file", timeout=10)
        await daemon.wait_for(
            lambda: daemon.state()["generation"] > stuck, what="the rescued tokens saved"
        )
    finally:
        assert await daemon.stop() == 0


async def test_a_stop_with_the_tokens_in_no_file_says_they_are_lost(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """The state disk and the runtime directory (where the rescue file goes) are both full:
    the stop still says, at CRITICAL, that the newest tokens are lost with the process."""
    with tiny_tmpfs(tmp_path / "run"):
        fill_up(tmp_path / "run")
        daemon, _ = await _stop_with_a_save_pending(emulator, tmp_path, tiny_state_fs)
        log = daemon.log_text()
        assert "cannot write the rescue file either" in log
        assert "CRITICAL" in log and "they are in no file and are lost with this process" in log
        assert "kept in the rescue file" not in log


def test_a_rescue_file_that_cannot_be_written_is_critical_once_per_episode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the state and the runtime directory both refusing writes, the daemon retries the
    save (3 times a second with 6-second tokens): "cannot write the rescue file either" is
    CRITICAL the first time only, again once a rescue file was written or the state saved
    meanwhile (a new episode). Before, every retry logged it at CRITICAL, forever."""
    base = AccountStore.from_paths("default", state_file=tmp_path / "default.state.json")
    runtime = tmp_path / "run"
    runtime.write_text("a file where the runtime directory should be")  # ENOTDIR, like EROFS
    store = AccountStore(base.account, rescue_dir=runtime)
    state = make_state()

    def critical() -> int:
        return sum(
            "cannot write the rescue file" in r.getMessage()
            for r in caplog.records
            if r.levelname == "CRITICAL"
        )

    for _ in range(5):
        assert store.save_rescue(state) is False
    assert critical() == 1
    runtime.unlink()  # room again: the rescue file is written, the episode is over
    assert store.save_rescue(state) is True
    runtime.joinpath("default.rescue.json").unlink()
    runtime.rmdir()
    runtime.write_text("full again")
    assert store.save_rescue(state) is False
    assert store.save_rescue(state) is False
    assert critical() == 2


def test_keeping_the_same_replaced_state_again_makes_no_second_copy(tmp_path: Path) -> None:
    """Each start that recovers from the rescue file while the disk is still full keeps the
    unchanged state file as .replaced-<stamp> before the rescued state replaces it: the same
    file again and again. One copy of it is kept, not one more hard link per restart."""
    store = AccountStore.from_paths("default", state_file=tmp_path / "default.state.json")
    store.save(make_state())
    with store.lock():
        first = store.set_aside_state("replaced", keep=True)
        again = [store.set_aside_state("replaced", keep=True) for _ in range(3)]
    assert first is not None and again == [first, first, first]
    assert list(tmp_path.glob("default.state.json.replaced-*")) == [first]
    assert store.state_path.stat().st_nlink == 2


def test_a_copy_refused_by_a_read_only_state_dir_says_remount_not_login(tmp_path: Path) -> None:
    """The state directory went read-only: keeping the old state aside fails, and the advice
    follows the errno (remount read-write), not "move it away, then run login" — the recovery
    that asked for the copy goes on, and no new login is needed."""
    from kakao_tokend.errors import StoreError

    store = AccountStore.from_paths("default", state_file=tmp_path / "state" / "default.state.json")
    store.save(make_state())
    with store.lock(), read_only(tmp_path / "state"), pytest.raises(StoreError) as caught:
        store.set_aside_state("replaced", keep=True)
    hint = str(caught.value.hint)
    assert "remount" in hint
    assert "login" not in hint
