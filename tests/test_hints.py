"""Each fix is said once: no line tells a person to run `kakao-tokend login` twice."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from daemonproc import login, run_cli, start_daemon, write_config
from diskfull import read_only
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.i18n import Message
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.refresher import AccountManager
from kakao_tokend.store import AccountStore, _write_error, ensure_reserve
from kakao_tokend.tokens import utcnow

pytestmark = pytest.mark.timeout(90)

LOGIN = re.compile(r"kakao-tokend (?:--config \S+ )?(?:--account \S+ )?login")


def check_lines(text: str, *, command: str) -> list[str]:
    """Return the lines that name the login fix; assert each names it once, as ``command``."""
    found = []
    for line in text.splitlines():
        count = len(LOGIN.findall(line))
        assert count <= 1, f"the fix is said {count} times: {line}"
        assert ") (" not in line, f"two hints in a row: {line}"
        if count:
            assert command in line, f"not the account's command ({command}) in: {line}"
            found.append(line)
    return found


async def test_a_dead_refresh_token_is_explained_with_one_fix_everywhere(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """After Kakao revokes the tokens (KOE322), the daemon's log, `status` (from the daemon
    and from the files) and `refresh` (through the daemon and alone) each say what happened
    and give the exact login command for the account exactly once per line: with the config
    file (not the one found by default) and the account (not the default one) named."""
    config = write_config(tmp_path, emulator, accounts=["default", "bot"])
    command = f"kakao-tokend --config {config} --account bot login"
    state = await login(emulator, config, "bot")
    daemon = await start_daemon(config)
    outputs: dict[str, str] = {}
    try:
        emulator.revoke_user_tokens(state.user_id or 0)
        status, body = await daemon.api("POST", "/v1/accounts/bot/refresh")
        assert status == 502 and body["health"] == "relogin", body
        await daemon.wait_log("needs a new login")
        for name, args in {
            "status via the daemon": ("status",),
            "refresh via the daemon": ("refresh",),
        }.items():
            code, out, err = await run_cli(config, "--account", "bot", *args)
            assert code in (2, 77), (name, code, out, err)
            outputs[name] = out + err
    finally:
        assert await daemon.stop() == 0
    # The log's lines about bot (the default account, never logged in, has its own).
    outputs["daemon log"] = "\n".join(
        line for line in daemon.log_text().splitlines() if "account default" not in line
    )
    for name, args in {
        "status from the files": ("status",),
        "refresh from the files": ("refresh",),
    }.items():
        code, out, err = await run_cli(config, "--account", "bot", *args)
        assert code in (2, 77), (name, code, out, err)
        outputs[name] = out + err
    for name, text in outputs.items():
        said = check_lines(text, command=command)
        assert said, f"{name} never says how to fix it:\n{text}"
    critical = [line for line in outputs["daemon log"].splitlines() if "needs a new login" in line]
    assert critical and all("KOE322" in line for line in critical), critical
    assert re.search(r"error: .*KOE322", outputs["refresh via the daemon"])


async def test_a_state_that_cannot_be_saved_names_its_fix_once(
    emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the disk is full, the write_failed alert says what failed and its fix once (the
    store's own hint is not repeated inside the alert's message)."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    account = load_config(config).account()
    store = AccountStore(account)
    full = _write_error(store.state_path, OSError(errno.ENOSPC, "No space left on device"))

    def disk_full(state: object) -> None:  # the OS edge: ENOSPC, exactly as the store reports it
        raise full

    async with create_session() as session:
        manager = AccountManager(
            account,
            store=store,
            client=KakaoClient(session, account.app),
            policy=load_config(config).refresh,
        )
        manager.load()
        monkeypatch.setattr(store, "save", disk_full)
        await manager.refresh(force=True, reason="test")
    assert manager.status.write_pending
    (condition,) = [c for c in manager.health(utcnow()).conditions if c.name == "write_failed"]
    text = f"{condition.message}. Fix: {condition.action}"
    assert "No space left on device" in text
    assert text.count("free") == 1, text


@contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """Set the immutable flag on ``directory`` while the block runs (`chattr +i`: even root
    gets EPERM creating a file in it); skip when the file system has no such flag."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is not installed")
    made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot set the immutable flag here: {made.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


async def _write_failed_fix(
    emulator: KakaoEmulator, tmp_path: Path, refuse: Callable[[Path], AbstractContextManager[None]]
) -> Message:
    """Log in, then refresh while ``refuse`` makes the state directory refuse writes; return
    the fix of the write_failed alert that follows."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    account = load_config(config).account()
    store = AccountStore(account)
    async with create_session() as session:
        manager = AccountManager(
            account,
            store=store,
            client=KakaoClient(session, account.app),
            policy=load_config(config).refresh,
        )
        manager.load()
        with refuse(account.state_file.parent):
            await manager.refresh(force=True, reason="test")
    assert manager.status.write_pending
    (condition,) = [c for c in manager.health(utcnow()).conditions if c.name == "write_failed"]
    return condition.fix


async def test_the_write_failed_alert_says_to_remount_a_read_only_state_directory(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The state directory is on a read-only mount (EROFS): the alert's fix says to remount
    it read-write, in English and in Korean; freeing disk space would not help. It said
    "free disk space or fix permissions" whatever the cause."""
    fix = await _write_failed_fix(emulator, tmp_path, read_only)
    english = fix.render("en")
    assert "remount" in english and "read-write" in english, english
    assert "disk space" not in english, english
    assert "do not stop kakao-tokend" in english, english
    korean = fix.render("ko")
    assert "읽기 전용" in korean and "remount" not in korean, korean


async def test_the_write_failed_alert_names_the_immutable_flag_when_permission_is_denied(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The state directory is immutable (`chattr +i`: EPERM, even for root): the fix says to
    check its permissions and the immutable flag (`chattr -i`), not to free disk space."""
    fix = await _write_failed_fix(emulator, tmp_path, immutable)
    english = fix.render("en")
    assert "chattr -i" in english and "permissions" in english, english
    assert "disk space" not in english, english
    assert "chattr -i" in fix.render("ko")


async def test_refresh_that_cannot_save_on_a_read_only_state_directory_says_remount(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`kakao-tokend refresh` whose rotated tokens the read-only state directory refuses:
    the error's fix says to remount it read-write (the errno's fix), not "free disk space or
    fix permissions", then to run the refresh again (the rescue file keeps the tokens)."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    assert ensure_reserve(tmp_path / "state")  # as a daemon run leaves it: Kakao is asked
    with read_only(tmp_path / "state"):
        code, _, err = await run_cli(config, "refresh")
    assert code != 0
    assert "remount it read-write, then run" in err, err
    assert "disk space" not in err, err


async def test_import_that_cannot_save_on_a_read_only_state_directory_says_remount(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`kakao-tokend import --force` whose checked tokens the read-only state directory
    refuses: the error's fix follows the errno (remount read-write), not "free disk space /
    fix permissions"."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    assert ensure_reserve(tmp_path / "state")  # as a daemon run leaves it: Kakao is asked
    with read_only(tmp_path / "state"):
        code, _, err = await run_cli(config, "import", "--force", str(seed))
    assert code != 0
    assert "remount it read-write, then run" in err, err
    assert "disk space" not in err, err
