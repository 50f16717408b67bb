"""Hostile neighbours: another local user, or an operator's honest mistake, never reaches a token.

Every test here proves one defence listed in docs/security.md. Where permissions decide, a
second, unprivileged user (``nobody``) really tries the attack from its own process; those tests
need root to switch users and skip with that reason otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import html
import http.client
import json
import os
import posixpath
import re
import resource
import shutil
import socket
import stat
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemonproc import (
    NOWHERE,
    DaemonProcess,
    daemon_command,
    free_port,
    login,
    run_cli,
    short_tokens,
    write_config,
)
from kakao_tokend import config as config_module
from kakao_tokend.alerts import PASSED_ENV
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.errors import ConfigError, UnsafePath
from kakao_tokend.store import check_directory
from loginproc import (
    LoginProcess,
    browser_argv,
    fake_browser,
    follow_authorize,
    get_page,
    with_query,
)

pytestmark = pytest.mark.timeout(120)


IS_ROOT = os.geteuid() == 0
NOBODY = 65534
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root to act as a second, unprivileged user (nobody)"
)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory ``nobody`` can traverse (pytest's tmp_path is private to its owner)."""
    directory = Path(tempfile.mkdtemp(prefix="kakao-sec-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


#: The attacker: drops to nobody, then tries to connect to a socket and to read files.
ATTACKER = """
import json, os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
job = json.loads(sys.argv[1])
result = {"reads": {}}
if job.get("socket"):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(job["socket"])
            sock.sendall(b"GET /v1/accounts/default/token HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        result["socket"] = b"".join(chunks).decode(errors="replace")
    except OSError as exc:
        result["socket"] = f"refused: {type(exc).__name__}"
for path in job.get("read", []):
    try:
        with open(path, "rb") as handle:
            result["reads"][path] = handle.read().decode(errors="replace")
    except OSError as exc:
        result["reads"][path] = f"refused: {type(exc).__name__}"
print(json.dumps(result))
"""


async def as_nobody(
    *, socket_path: Path | None = None, read: Sequence[Path] = ()
) -> dict[str, Any]:
    """Run the attacker as ``nobody`` (our loop keeps serving meanwhile); return its report."""
    job = {"socket": str(socket_path) if socket_path else None, "read": [str(p) for p in read]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ATTACKER,
        json.dumps(job),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out)
    return report


def leaked(text: str, emulator: KakaoEmulator) -> list[str]:
    """Every token the emulator ever issued that appears in ``text``."""
    return [token for token in emulator.issued_tokens() if token in text]


async def spawn_daemon(
    config_path: Path,
    *,
    umask: int = 0o022,
    wrapper: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> DaemonProcess:
    """Start `kakao-tokend run` under ``umask`` (optionally through a wrapper like unshare)."""
    config = load_config(config_path)
    log_path = config_path.parent / f"daemon-{time.monotonic_ns()}.log"
    child_env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    child_env.update(env or {})
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *wrapper,
            *daemon_command(config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=child_env,
            cwd=str(config_path.parent),
            preexec_fn=lambda: os.umask(umask),
        )
    daemon = DaemonProcess(proc, config_path, log_path, config.state_dir, config.runtime_dir)
    if wait_ready:
        await daemon.wait_log("kakao-tokend running", timeout=30)
    return daemon


async def exit_of(daemon: DaemonProcess) -> int:
    """Wait for a daemon that is expected to stop by itself; return its exit code."""
    return await asyncio.wait_for(daemon.proc.wait(), 30)


def lines_naming(text: str, needle: str) -> list[str]:
    """The lines of ``text`` that contain ``needle``."""
    return [line for line in text.splitlines() if needle in line]


def snapshot(directory: Path) -> dict[str, bytes | str]:
    """Every entry of ``directory``: file contents, or where a symlink points."""
    result: dict[str, bytes | str] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            result[entry.name] = f"-> {os.readlink(entry)}"
        elif entry.is_file():
            result[entry.name] = entry.read_bytes()
    return result


# --------------------------------------------------------------------------- 1. directories


@pytest.mark.parametrize(
    ("which", "mode"),
    [("state", 0o777), ("state", 0o770), ("run", 0o757), ("run", 0o1777)],
)
async def test_run_refuses_a_directory_others_can_write(
    emulator: KakaoEmulator, tmp_path: Path, which: str, mode: int
) -> None:
    """A state or runtime directory writable by group or others stops `run` with exit 78 and
    one line naming the directory, its mode and the chmod that fixes it."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    directory = tmp_path / which
    directory.mkdir(exist_ok=True)
    directory.chmod(mode)
    daemon = await spawn_daemon(config, wait_ready=False)
    code = await exit_of(daemon)
    log = daemon.log_text()
    assert code == 78, log
    named = lines_naming(log, str(directory))
    assert len(named) == 1, log
    assert f"{mode:04o}" in named[0] and f"chmod go-w {directory}" in named[0]
    assert "Traceback" not in log and "kakao-tokend running" not in log


@needs_root
async def test_run_refuses_a_state_directory_owned_by_another_user(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A state directory owned by someone other than the daemon's user or root: exit 78."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    os.chown(tmp_path / "state", NOBODY, -1)
    daemon = await spawn_daemon(config, wait_ready=False)
    code = await exit_of(daemon)
    log = daemon.log_text()
    assert code == 78, log
    named = lines_naming(log, str(tmp_path / "state"))
    assert len(named) == 1 and "owned by" in named[0], log


async def test_directories_like_systemds_are_accepted(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The shipped units' directories (StateDirectoryMode=0750, RuntimeDirectoryMode=0750, or
    0700) owned by the daemon's user pass the check, and the daemon runs."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    (tmp_path / "state").chmod(0o750)
    (tmp_path / "run").mkdir(mode=0o700)
    daemon = await spawn_daemon(config)
    try:
        status, body = await daemon.api("GET", "/healthz")
        assert status == 200, body
    finally:
        assert await daemon.stop() == 0


def test_directory_check_follows_a_symlinked_directory(tmp_path: Path) -> None:
    """systemd's DynamicUser= state directory is a symlink (/var/lib/x -> private/x): the check
    judges the directory it points to, so a safe target passes and an unsafe one does not."""
    target = tmp_path / "private" / "x"
    target.mkdir(parents=True, mode=0o700)
    link = tmp_path / "x"
    link.symlink_to(target)
    check_directory(link, what="state directory")
    target.chmod(0o777)
    with pytest.raises(UnsafePath, match="writable by group and others"):
        check_directory(link, what="state directory")


WRITING_COMMANDS = {
    "login": ("login", "--no-browser", "--timeout", "5s"),
    "import": ("import", "{seed}"),
    "refresh": ("refresh",),
    "token": ("token",),
    "logout": ("logout",),
}


@pytest.mark.parametrize("command", sorted(WRITING_COMMANDS))
async def test_writing_commands_refuse_an_unsafe_state_directory(
    emulator: KakaoEmulator, tmp_path: Path, command: str
) -> None:
    """login, import, refresh, token and logout (the commands that write the account's files)
    refuse a world-writable state directory with exit 78 and one line, and change nothing."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    seed.chmod(0o600)
    state_dir = tmp_path / "state"
    state_dir.chmod(0o777)
    before = snapshot(state_dir)
    args = [arg.format(seed=seed) for arg in WRITING_COMMANDS[command]]
    code, _, err = await run_cli(config, *args)
    assert code == 78, err
    assert err.strip().count("\n") == 0, err
    assert str(state_dir) in err and "chmod go-w" in err
    assert snapshot(state_dir) == before


# --------------------------------------------------------------------------- 1. runtime directory


@pytest.mark.parametrize("command", sorted(WRITING_COMMANDS))
async def test_writing_commands_refuse_an_unsafe_runtime_directory(
    emulator: KakaoEmulator, tmp_path: Path, command: str
) -> None:
    """The audit's attack: the runtime directory, where the rescue files and in-flight
    markers live, writable by everyone. Each writing command exits 78 with one line naming it
    and changes nothing in the state directory (a planted rescue file would replace the
    account's tokens)."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    seed.chmod(0o600)
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir()
    runtime_dir.chmod(0o777)
    before = snapshot(tmp_path / "state")
    args = [arg.format(seed=seed) for arg in WRITING_COMMANDS[command]]
    code, _, err = await run_cli(config, *args)
    assert code == 78, err
    assert err.strip().count("\n") == 0, err
    assert f"runtime directory {runtime_dir}" in err and f"chmod go-w {runtime_dir}" in err
    assert snapshot(tmp_path / "state") == before


async def test_run_refuses_an_unsafe_runtime_directory_that_holds_no_socket(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """With [api] socket elsewhere, the runtime directory still holds the rescue files: `run`
    judges it like the state directory (exit 78, one line), whatever holds the socket."""
    (tmp_path / "sock").mkdir(mode=0o700)
    config = write_config(
        tmp_path, emulator, extra=f'[api]\nsocket = "{tmp_path / "sock" / "api.sock"}"\n'
    )
    await login(emulator, config)
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir()
    runtime_dir.chmod(0o1777)
    daemon = await spawn_daemon(config, wait_ready=False)
    code = await exit_of(daemon)
    log = daemon.log_text()
    assert code == 78, log
    named = lines_naming(log, str(runtime_dir))
    assert len(named) == 1 and f"chmod go-w {runtime_dir}" in named[0], log
    assert "Traceback" not in log and "kakao-tokend running" not in log


def plant_rescue_file(emulator: KakaoEmulator, config: Path) -> tuple[Path, dict[str, Any]]:
    """The audit's planted rescue file: another Kakao user's tokens (user 666) at generation
    100000, issued a minute after the victim's (so that it wins over the state file), naming
    the victim's state file; return its path and the state it holds."""
    loaded = load_config(config)
    account = loaded.account()
    victim = json.loads(account.state_file.read_text())
    theirs = emulator.issue_tokens(666)
    issued = datetime.strptime(victim["tokens"]["access_issued_at"], "%Y-%m-%dT%H:%M:%SZ")
    planted = {**victim, "generation": 100000, "user_id": 666}
    planted["tokens"] = {
        **victim["tokens"],
        "access_token": theirs["access_token"],
        "refresh_token": theirs["refresh_token"],
        "access_issued_at": (issued + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    document = {"version": 1, "state_file": str(account.state_file), "state": planted}
    loaded.runtime_dir.mkdir(parents=True, exist_ok=True)
    path = loaded.runtime_dir / "default.rescue.json"
    path.write_text(json.dumps(document))
    return path, planted


@pytest.mark.parametrize(
    "planted_by",
    [
        "group and others may write it",
        pytest.param("owned by another user", marks=needs_root),
    ],
)
async def test_a_rescue_file_another_user_could_have_written_is_refused(
    emulator: KakaoEmulator, tmp_path: Path, planted_by: str
) -> None:
    """A rescue file kakao-tokend did not write as itself (0600, its own user) is never
    recovered: the account keeps its own tokens, the file is kept aside as .refused-<time>
    (never deleted: a person decides), and one log line says why and what to do."""
    config = write_config(tmp_path, emulator)
    ours = await login(emulator, config)
    rescue, _ = plant_rescue_file(emulator, config)
    if planted_by == "owned by another user":
        os.chown(rescue, NOBODY, NOBODY)
        rescue.chmod(0o600)
    else:
        rescue.chmod(0o666)
    daemon = await spawn_daemon(config)
    try:
        state = daemon.state()
        assert state["user_id"] == ours.user_id and state["generation"] < 100000
        assert state["tokens"]["refresh_token"] == ours.tokens.refresh_token
    finally:
        assert await daemon.stop() == 0
    log = daemon.log_text()
    named = lines_naming(log, str(rescue))
    assert len(named) == 1, log
    assert "refused" in named[0] and ("rm " in named[0] or "chmod" in named[0]), named
    assert "recovered" not in log
    assert not rescue.exists()
    assert len(list(rescue.parent.glob(rescue.name + ".refused-*"))) == 1


async def test_the_in_flight_marker_never_follows_a_symlink(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The audit's second step: the in-flight marker made a symlink to the state directory's
    MOVED. A refresh creates nothing through it, so the account is not taken for migrated and
    the next refresh works too."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o700)
    moved = tmp_path / "state" / "MOVED"
    (runtime_dir / "default.in-flight").symlink_to(moved)
    code, _, err = await run_cli(config, "refresh")
    assert code == 0, err
    assert not moved.exists() and not moved.is_symlink()
    code, _, err = await run_cli(config, "refresh")
    assert code == 0, err


# --------------------------------------------------------------------------- 1. symlinks


async def test_a_symlinked_lock_file_is_never_truncated(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The account lock reached through a symlink is refused: the file it points to (here a
    stand-in for a root-owned file) keeps every byte, and `refresh` says why (exit 78)."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    lock = tmp_path / "state" / "default.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    code, _, err = await run_cli(config, "refresh")
    assert victim.read_text() == "precious\n"
    assert code == 78, err
    assert "symbolic link" in err and str(lock) in err


async def test_a_symlinked_instance_lock_is_never_truncated(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`run`'s instance lock reached through a symlink is refused (exit 78), target intact."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    (tmp_path / "state" / "kakao-tokend.run.lock").symlink_to(victim)
    daemon = await spawn_daemon(config, wait_ready=False)
    code = await exit_of(daemon)
    assert victim.read_text() == "precious\n"
    assert code == 78, daemon.log_text()
    assert len(lines_naming(daemon.log_text(), "symbolic link")) == 1


async def test_a_symlinked_state_file_is_neither_read_nor_written(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A state file that is a symlink is refused with a line naming it; the file it points to
    is left exactly as it was (no refresh written through the link)."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    state_file = tmp_path / "state" / "default.state.json"
    elsewhere = tmp_path / "elsewhere.json"
    state_file.rename(elsewhere)
    state_file.symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    code, _, err = await run_cli(config, "refresh")
    assert elsewhere.read_bytes() == before
    assert code == 78, err
    assert "symbolic link" in err and str(state_file) in err


@needs_root
async def test_a_token_file_symlinked_into_a_setgid_directory_leaks_nothing(
    emulator: KakaoEmulator, tmp_path: Path, shared: Path
) -> None:
    """The review's attack: default.token.json pointed into the attacker's own setgid
    directory. Nothing is written there, and the attacker reads no token."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    drop = shared / "drop"
    drop.mkdir()
    os.chown(drop, NOBODY, NOBODY)
    drop.chmod(0o2770)
    token_file = tmp_path / "state" / "default.token.json"
    token_file.unlink()
    token_file.symlink_to(drop / "loot.json")
    code, _, err = await run_cli(config, "refresh")
    assert not (drop / "loot.json").exists()
    assert code == 78 and "symbolic link" in err, err
    report = await as_nobody(read=[drop / "loot.json"])
    assert not leaked(json.dumps(report), emulator)


# --------------------------------------------------------------------------- 1. consumers' dirs


def outputs_in(directory: Path, tmp_path: Path, output: str) -> str:
    """TOML for the default account publishing one file (a template or an extra token file)
    into ``directory``, another user's or a shared one."""
    if output != "template":
        return f'[accounts.default]\n{output} = "{directory / "kakao"}"\n'
    source = tmp_path / "bot.conf.tmpl"
    source.write_text("token={access_token}\n")
    return (
        "[accounts.default]\n[[accounts.default.templates]]\n"
        f'source = "{source}"\ndestination = "{directory / "bot.conf"}"\n'
    )


@pytest.mark.parametrize("planted", ["fifo", "symlink to a fifo"])
async def test_a_fifo_at_a_template_destination_cannot_hang_the_daemon(
    emulator: KakaoEmulator, tmp_path: Path, planted: str
) -> None:
    """The audit's attack: a FIFO (or a symlink to one) where a template is rendered. The
    daemon never waits for a writer: it starts, replaces the path with the rendered file
    (never writing through the link), and stops on SIGTERM."""
    directory = tmp_path / "bot"
    directory.mkdir(mode=0o755)
    config = write_config(tmp_path, emulator, extra=outputs_in(directory, tmp_path, "template"))
    await login(emulator, config)
    destination = directory / "bot.conf"
    pipe = tmp_path / "pipe"
    if planted == "fifo":
        os.mkfifo(destination)
    else:
        os.mkfifo(pipe)
        destination.symlink_to(pipe)
    daemon = await spawn_daemon(config, wait_ready=False)
    try:
        await daemon.wait_log("kakao-tokend running", timeout=20)
        await daemon.wait_for(lambda: stat.S_ISREG(destination.lstat().st_mode))
        assert destination.read_text().startswith("token=")
    finally:
        code = await daemon.stop(timeout=10)
    assert code == 0, daemon.log_text()
    if planted != "fifo":
        assert stat.S_ISFIFO(pipe.lstat().st_mode)  # what the link named is left alone


@pytest.mark.parametrize("output", ["template", "access_token_file", "env_file"])
async def test_an_output_directory_every_user_may_write_is_refused(
    emulator: KakaoEmulator, tmp_path: Path, output: str
) -> None:
    """A template destination or an extra token file in a directory every local user may
    write (1777, like /tmp): anyone could plant what the consumers read, or block its
    update. check-config and run refuse it with exit 78 and one line naming the directory
    and the chmod that fixes it."""
    directory = tmp_path / "shared"
    config = write_config(tmp_path, emulator, extra=outputs_in(directory, tmp_path, output))
    await login(emulator, config)  # (writing an extra token file there now is refused too)
    directory.mkdir(exist_ok=True)
    directory.chmod(0o1777)
    code, out, err = await run_cli(config, "check-config")
    assert code == 78, out + err
    named = lines_naming(err, str(directory))
    assert len(named) == 1 and f"chmod o-w {directory}" in named[0], err
    assert "config OK" not in out
    daemon = await spawn_daemon(config, wait_ready=False)
    code = await exit_of(daemon)
    log = daemon.log_text()
    assert code == 78, log
    named = lines_naming(log, str(directory))
    assert len(named) == 1 and f"chmod o-w {directory}" in named[0], log
    assert "Traceback" not in log and "kakao-tokend running" not in log


async def test_an_output_directory_its_group_may_write_is_a_warning(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A consumer's own directory that the daemon may write through its group (0770): its
    members could swap the rendered file, which check-config and the daemon's start name in
    one warning each; the daemon runs (reading there never waits, nor follows a link)."""
    directory = tmp_path / "bot"
    directory.mkdir()
    directory.chmod(0o770)
    config = write_config(tmp_path, emulator, extra=outputs_in(directory, tmp_path, "template"))
    await login(emulator, config)
    code, out, err = await run_cli(config, "check-config")
    assert code == 0, out + err
    named = lines_naming(err, str(directory))
    assert len(named) == 1 and named[0].startswith("warning:") and "group" in named[0], err
    daemon = await spawn_daemon(config)
    try:
        await daemon.wait_for(lambda: (directory / "bot.conf").is_file())
    finally:
        assert await daemon.stop() == 0
    warned = [line for line in lines_naming(daemon.log_text(), str(directory)) if "group" in line]
    assert len(warned) == 1, daemon.log_text()


# --------------------------------------------------------------------------- 1. group, modes


def short_refresh_life(emulator: KakaoEmulator) -> None:
    """Log in with a 10-day refresh token, below sinks_and_alerts' 20-day threshold, so the
    expiry alert fires and is bookkept."""
    emulator.settings.refresh_lifetime = 10 * 86400


def tokend_files(*directories: Path) -> list[Path]:
    """Every file, socket and directory below ``directories`` (the directories included)."""
    found: list[Path] = []
    for top in directories:
        found.append(top)
        for root, dirs, files in os.walk(top):
            found += [Path(root) / name for name in dirs + files]
    return found


def sinks_and_alerts(directory: Path) -> str:
    """TOML for an account that writes both extra sinks (alerts fire: see short_refresh_life)."""
    return (
        '[alerts]\nkakaotalk = false\nthresholds = ["20d"]\n'
        "[accounts.default]\n"
        f'access_token_file = "{directory / "sinks" / "token"}"\n'
        f'env_file = "{directory / "sinks" / "kakao.env"}"\n'
    )


@needs_root
async def test_files_take_the_daemons_group_not_a_setgid_directorys(
    emulator: KakaoEmulator, shared: Path
) -> None:
    """In a setgid state directory of another group, every file and directory the daemon
    creates (state, token file, locks, reserve, alert bookkeeping, extra sinks) gets the
    daemon's own group, and a member of that other group reads no token."""
    state_dir = shared / "state"
    state_dir.mkdir()
    os.chown(state_dir, -1, NOBODY)
    state_dir.chmod(0o2750)  # not group-writable: the directory check rightly accepts it
    config = write_config(shared, emulator, extra=sinks_and_alerts(state_dir))
    short_refresh_life(emulator)
    await login(emulator, config)
    daemon = await spawn_daemon(config)
    try:
        status, body = await daemon.api("POST", "/v1/accounts/default/refresh")
        assert status == 200, body
        await daemon.wait_for(lambda: (state_dir / "sinks" / "kakao.env").exists())
        await daemon.wait_for(lambda: (state_dir / "default.alerts.json").exists())
    finally:
        assert await daemon.stop() == 0
    created = tokend_files(state_dir)[1:]
    assert {p.name for p in created} >= {
        "default.state.json",
        "default.token.json",
        "default.lock",
        "kakao-tokend.run.lock",
        ".kakao-tokend.reserve",
        "default.alerts.json",
        "sinks",
        "token",
        "kakao.env",
    }
    wrong = {str(p): p.lstat().st_gid for p in created if p.lstat().st_gid != os.getegid()}
    assert wrong == {}
    assert not (state_dir / "sinks").stat().st_mode & stat.S_ISGID
    files = [p for p in created if p.is_file()]
    report = await as_nobody(read=files)
    assert all(value.startswith("refused") for value in report["reads"].values()), report
    assert not leaked(json.dumps(report), emulator)


async def test_no_file_the_daemon_creates_is_open_to_others_under_umask_000(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Run under umask 000, the daemon creates nothing that others may read, write or enter:
    state and runtime directories, state, token and lock files, socket, reserve, alert
    bookkeeping and extra sinks all have no permission bit for others, and no group-write."""
    state_dir = tmp_path / "state"
    config = write_config(tmp_path, emulator, extra=sinks_and_alerts(state_dir))
    short_refresh_life(emulator)
    await login(emulator, config)
    daemon = await spawn_daemon(config, umask=0o000)
    try:
        status, body = await daemon.api("POST", "/v1/accounts/default/refresh")
        assert status == 200, body
        await daemon.wait_for(lambda: (state_dir / "sinks" / "kakao.env").exists())
        await daemon.wait_for(lambda: (state_dir / "default.alerts.json").exists())
        created = {p: p.lstat().st_mode for p in tokend_files(state_dir, tmp_path / "run")}
    finally:
        assert await daemon.stop() == 0
    sockets = [p for p, mode in created.items() if stat.S_ISSOCK(mode)]
    assert sockets == [tmp_path / "run" / "api.sock"]
    assert stat.S_IMODE(created[sockets[0]]) == 0o660  # the configured mode, group may connect
    assert {str(p) for p, mode in created.items() if mode & 0o007} == set()
    assert {str(p) for p, mode in created.items() if mode & 0o020 and p not in sockets} == set()
    assert {p.name for p in created} >= {"default.alerts.json", "kakao.env", "token", "run"}


async def test_a_token_file_with_the_wrong_mode_or_group_is_corrected_at_start(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The token file made 0644 (and, as root, given another group) while the daemon was
    stopped: the start rewrites it with [publish]'s mode and group at once, and says so in
    one line, instead of leaving it open until the next refresh (hours with real tokens)."""
    group = grp.getgrgid(NOBODY).gr_name if IS_ROOT else None
    extra = '[publish]\nmode = "0640"\n' + (f'group = "{group}"\n' if group else "")
    config = write_config(tmp_path, emulator, extra=extra)
    await login(emulator, config)
    token_file = tmp_path / "state" / "default.token.json"
    before = json.loads(token_file.read_text())
    token_file.chmod(0o644)
    if IS_ROOT:
        os.chown(token_file, -1, 0)
    daemon = await spawn_daemon(config)
    try:
        info = token_file.stat()
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert info.st_gid == (NOBODY if IS_ROOT else os.getegid())
        assert json.loads(token_file.read_text())["generation"] == before["generation"]
    finally:
        assert await daemon.stop() == 0
    named = lines_naming(daemon.log_text(), str(token_file))
    assert len(named) == 1 and "0644" in named[0], daemon.log_text()


# --------------------------------------------------------------------------- 2. the socket


def socket_config(directory: Path, emulator: KakaoEmulator, *, group: str | None) -> Path:
    """A config in ``directory`` whose runtime directory others may enter (0755): then only
    the socket's own mode and group keep another user out."""
    (directory / "run").mkdir(mode=0o755)
    (directory / "run").chmod(0o755)
    extra = f'[api]\nsocket_group = "{group}"\n' if group else ""
    return write_config(directory, emulator, extra=extra)


@needs_root
async def test_another_user_can_neither_connect_nor_read_tokens_under_umask_000(
    emulator: KakaoEmulator, shared: Path
) -> None:
    """With umask 000 and a runtime directory anyone may enter, nobody can neither connect to
    the API socket nor read the token or state file."""
    config = socket_config(shared, emulator, group=None)
    await login(emulator, config)
    daemon = await spawn_daemon(config, umask=0o000)
    try:
        report = await as_nobody(
            socket_path=daemon.runtime_dir / "api.sock",
            read=[shared / "state" / "default.token.json", shared / "state" / "default.state.json"],
        )
    finally:
        assert await daemon.stop() == 0
    assert report["socket"].startswith("refused"), report
    assert all(value.startswith("refused") for value in report["reads"].values()), report
    assert not leaked(json.dumps(report), emulator)


@needs_root
async def test_socket_group_members_may_connect(emulator: KakaoEmulator, shared: Path) -> None:
    """The control for the test above: with api.socket_group = nobody's group, the same
    attacker process does get a token, so "refused" there really means the mode kept it out."""
    config = socket_config(shared, emulator, group="nogroup")
    await login(emulator, config)
    daemon = await spawn_daemon(config, umask=0o000)
    try:
        report = await as_nobody(socket_path=daemon.runtime_dir / "api.sock")
        info = (daemon.runtime_dir / "api.sock").stat()
    finally:
        assert await daemon.stop() == 0
    assert re.match(r"HTTP/1\.\d 200 ", report["socket"]), report
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOBODY)


def _userns_works() -> bool:
    if not IS_ROOT or shutil.which("unshare") is None:
        return False
    try:
        result = subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.mark.skipif(
    not _userns_works(), reason="needs root and `unshare --user` (a user namespace)"
)
async def test_a_socket_group_that_cannot_be_applied_keeps_the_socket_closed(
    emulator: KakaoEmulator, shared: Path
) -> None:
    """In a user namespace, as under the unit's PrivateUsers=yes, socket_group cannot be
    applied (chown fails). Under umask 000 the socket must then not listen at all: nobody
    cannot connect, and the log says exactly that the socket is off."""
    config = socket_config(shared, emulator, group="nogroup")
    await login(emulator, config)
    wrapper = ("unshare", "--user", "--map-root-user")
    daemon = await spawn_daemon(config, umask=0o000, wrapper=wrapper)
    try:
        report = await as_nobody(socket_path=daemon.runtime_dir / "api.sock")
        log = daemon.log_text()
    finally:
        assert await daemon.stop() == 0
    assert report["socket"].startswith("refused"), report
    assert not leaked(json.dumps(report), emulator)
    socket_lines = lines_naming(log, str(daemon.runtime_dir / "api.sock"))
    assert len(socket_lines) == 1, log
    assert "nogroup" in socket_lines[0] and "is off" in socket_lines[0]
    assert not (daemon.runtime_dir / "api.sock").exists()


# --------------------------------------------------------------------------- 3. hooks


RECORD_ENV = """
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(dict(os.environ)) + "\\n")
"""


async def test_hooks_get_only_the_short_environment(
    emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook sees the same short allow-list as alert commands plus its KAKAO_TOKEND_* facts:
    not KAKAO_CLIENT_SECRET (client_secret_env), nor anything else from the daemon."""
    script = tmp_path / "record_env.py"
    script.write_text(RECORD_ENV)
    out = tmp_path / "hook-env.jsonl"
    secret = str(emulator.settings.client_secret)
    extra = (
        "[accounts.default]\n"
        f'hooks = [["{sys.executable}", "{script}", "{out}"]]\n'
        "[accounts.default.kakao]\n"
        'client_secret_env = "KAKAO_CLIENT_SECRET"\n'
    )
    config = write_config(tmp_path, emulator, extra=extra)
    monkeypatch.setenv("KAKAO_CLIENT_SECRET", secret)  # for the test's own config loading
    await login(emulator, config)
    env = {"KAKAO_CLIENT_SECRET": secret, "DATABASE_PASSWORD": "hunter2-hunter2"}
    daemon = await spawn_daemon(config, env=env)
    try:
        status, body = await daemon.api("POST", "/v1/accounts/default/refresh")
        assert status == 200, body
        await daemon.wait_for(lambda: out.exists() and out.read_text().endswith("\n"))
    finally:
        assert await daemon.stop() == 0
    seen = json.loads(out.read_text().splitlines()[0])
    facts = {"KAKAO_TOKEND_ACCOUNT", "KAKAO_TOKEND_TOKEN_FILE", "KAKAO_TOKEND_GENERATION"}
    assert set(seen) - set(PASSED_ENV) == facts, sorted(seen)
    assert secret not in json.dumps(seen) and "hunter2" not in json.dumps(seen)


# --------------------------------------------------------------------------- 3. secrets


WEBHOOK = "https://hooks.example.com/services/T000/B000/secret-part-0123"


def base_config(tmp_path: Path, body: str, *, mode: int = 0o600) -> Path:
    """A minimal config file of ``mode`` with ``body`` appended."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
        '[kakao]\nrest_api_key = "0123456789abcdef0123456789abcdef"\n' + body
    )
    path.chmod(mode)
    return path


def secret_file(tmp_path: Path, value: str, *, mode: int = 0o600) -> Path:
    """A file holding ``value`` (plus a newline) with ``mode``."""
    path = tmp_path / f"secret-{time.monotonic_ns()}"
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


#: Where each registered secret ends up in the loaded Config.
SECRET_VALUE: dict[tuple[str, str], Callable[[config_module.Config], str | None]] = {
    ("kakao", "rest_api_key"): lambda c: c.account().app.rest_api_key,
    ("kakao", "client_secret"): lambda c: c.account().app.client_secret,
    ("alerts", "webhook_url"): lambda c: c.alerts.webhook_url,
    ("api", "bearer_token"): lambda c: c.api.bearer_token,
    ("store", "dsn"): lambda c: c.store.dsn,
    ("store", "key"): lambda c: (
        base64.b64encode(c.store.keyring.newest.secret).decode() if c.store.keyring else None
    ),
}
#: What each secret is set to in these tests (a store key must be a real key).
STORE_KEY = base64.b64encode(bytes(range(32))).decode()
SECRET_SAMPLE: dict[tuple[str, str], str] = {("store", "key"): STORE_KEY}


def test_every_registered_secret_is_checked_here() -> None:
    """The registry of secrets and this test's table agree, so a new secret gets tested."""
    registered = {(table, s.name) for table, specs in config_module.SECRETS.items() for s in specs}
    assert registered == set(SECRET_VALUE)


@pytest.mark.parametrize(("table", "name"), sorted(SECRET_VALUE))
@pytest.mark.parametrize("source", ["file", "env", "credential", "inline"])
def test_every_secret_comes_from_any_of_the_four_sources(
    tmp_path: Path, table: str, name: str, source: str
) -> None:
    """Each secret (REST API key, client secret, webhook URL, API bearer token) may be given as
    NAME_file, NAME_env, NAME_credential or inline, with the same result."""
    sample = SECRET_SAMPLE.get((table, name), WEBHOOK)
    spec = next(spec for spec in config_module.SECRETS[table] if spec.name == name)
    if source == "inline" and not spec.inline:
        pytest.skip(f"{name} has no inline form (never written into the config file)")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    if source == "file":
        setting = f'{name}_file = "{secret_file(tmp_path, sample)}"'
    elif source == "env":
        environ["SOME_VARIABLE"] = sample
        setting = f'{name}_env = "SOME_VARIABLE"'
    elif source == "credential":
        (credentials / "some-id").write_text(sample)
        setting = f'{name}_credential = "some-id"'
    else:
        setting = f'{name} = "{sample}"'
    body = f"[{table}]\n{setting}\n" if table != "kakao" else ""
    path = base_config(tmp_path, body)
    if table == "kakao":
        text = path.read_text()
        if name == "rest_api_key":
            text = text.replace('rest_api_key = "0123456789abcdef0123456789abcdef"', setting)
        else:
            text = text.replace("[kakao]\n", f"[kakao]\n{setting}\n")
        path.write_text(text)
    config = load_config(path, environ=environ)
    assert SECRET_VALUE[(table, name)](config) == sample


@pytest.mark.parametrize(
    ("table", "name"),
    [("alerts", "webhook_url"), ("api", "bearer_token"), ("kakao", "client_secret")],
)
def test_an_inline_secret_needs_a_private_config_file(
    tmp_path: Path, table: str, name: str
) -> None:
    """An inline webhook URL or bearer token, like an inline client secret, is refused in a
    config file others may read, with the chmod or the _file key that fixes it."""
    body = f'[{table}]\n{name} = "{WEBHOOK}"\n'
    if table == "kakao":
        body = f'[accounts.default.kakao]\n{name} = "{WEBHOOK}"\n'
    path = base_config(tmp_path, body, mode=0o644)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert "readable by group/others (mode 0644)" in message
    assert f"{name}_file" in message and f"chmod 600 {path}" in message
    assert WEBHOOK not in message
    path.chmod(0o600)
    load_config(path, environ={})


@pytest.mark.parametrize(("table", "name"), [("alerts", "webhook_url"), ("api", "bearer_token")])
def test_a_secret_file_others_can_read_is_refused(tmp_path: Path, table: str, name: str) -> None:
    """A webhook URL or bearer token file readable by others is refused (chmod 600)."""
    file = secret_file(tmp_path, WEBHOOK, mode=0o644)
    path = base_config(tmp_path, f'[{table}]\n{name}_file = "{file}"\n', mode=0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {file}"):
        load_config(path, environ={})


def test_an_account_may_take_its_webhook_from_another_source(tmp_path: Path) -> None:
    """Naming any source of the webhook URL in [accounts.NAME.alerts] replaces the global
    source, like the Kakao secrets."""
    other = "https://hooks.example.com/other-0123456789"
    body = (
        f'[alerts]\nwebhook_url_file = "{secret_file(tmp_path, WEBHOOK)}"\n'
        "[accounts.a]\n[accounts.b.alerts]\nwebhook_url_env = 'B_HOOK'\n"
    )
    config = load_config(base_config(tmp_path, body), environ={"B_HOOK": other})
    assert config.accounts["a"].alerts.webhook_url == WEBHOOK
    assert config.accounts["b"].alerts.webhook_url == other


def test_a_webhook_url_from_a_file_is_still_checked(tmp_path: Path) -> None:
    """A webhook URL read from a file must still be an http(s) URL; the error shows no value."""
    file = secret_file(tmp_path, "ftp://secret-host/secret-path")
    path = base_config(tmp_path, f'[alerts]\nwebhook_url_file = "{file}"\n')
    with pytest.raises(ConfigError, match="expected an http") as caught:
        load_config(path, environ={})
    assert "secret-path" not in str(caught.value)


def test_the_example_config_documents_every_secret_source() -> None:
    """config.example.toml names every source of every registered secret."""
    example = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    for specs in config_module.SECRETS.values():
        for spec in specs:
            for key in spec.sources():
                assert key in example, key


# --------------------------------------------------------------------------- 4. login listener


class TestLoginListener:
    """Only Kakao's redirect for this attempt (the right ``state``) can end a login."""

    @pytest.mark.parametrize(
        "query",
        [
            {"error": "access_denied"},
            {"error": "access_denied", "state": "wrong"},
            {"code": "forged", "state": "wrong"},
            {"code": "forged"},
        ],
    )
    async def test_forged_redirects_are_ignored_and_the_login_goes_on(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
        tmp_path: Path,
        query: dict[str, str],
    ) -> None:
        """A request without this attempt's state gets a neutral 400 page, is never sent to
        Kakao, and does not end the login: the real redirect afterwards still succeeds."""
        login_process = await start_login()
        location = await follow_authorize(login_process.url)
        base = location.split("?", 1)[0]
        forged = base + "?" + "&".join(f"{k}={v}" for k, v in query.items())
        exchanges = emulator.stats.requests["token"]
        status, page = await get_page(forged)
        assert status == 400
        assert "cancelled" not in page.lower() and "failed" not in page.lower()
        assert emulator.stats.requests["token"] == exchanges
        assert login_process.proc.returncode is None
        status, page = await get_page(location)
        code, _, err = await login_process.finish()
        assert status == 200 and code == 0, err
        assert (tmp_path / "state" / "default.state.json").exists()

    async def test_the_browser_gets_no_secret_on_its_command_line(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """Every local user sees every process's command line (`ps`). The audit read the
        authorize URL, state included, off the browser's and then ended or hijacked the login
        with it. The browser must get only a private file (0600 in a 0700 directory of ours)
        that sends it on to that URL; the file is gone when the login ends."""
        program, record = fake_browser(tmp_path)
        login_process = await start_login(browser=program)
        state = parse_qs(urlsplit(login_process.url).query)["state"][0]
        argv = await browser_argv(record)
        assert not [arg for arg in argv if state in arg or "/oauth/authorize" in arg]
        assert argv[-1].startswith("file:///"), argv
        page = Path(unquote(urlsplit(argv[-1]).path))
        for path, wanted in ((page, 0o600), (page.parent, 0o700)):
            info = path.lstat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (wanted, os.geteuid()), path
        with open(page, encoding="utf-8") as handle:
            assert html.escape(login_process.url, quote=True) in handle.read()
        if IS_ROOT:
            report = await as_nobody(read=[page])
            assert report["reads"][str(page)].startswith("refused"), report
        # The page's target is the printed URL: following it completes the login.
        status, _ = await get_page(await follow_authorize(login_process.url))
        code, _, err = await login_process.finish()
        assert status == 200 and code == 0, err
        assert not page.parent.exists()

    @pytest.mark.parametrize(
        "forged",
        [
            {"error": "access_denied", "error_description": "User denied access"},
            {"error": "server_error"},
            {"code": "forged-code-that-kakao-never-issued"},
        ],
        ids=["cancel", "error", "unknown-code"],
    )
    async def test_a_stolen_state_cannot_end_the_login(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
        tmp_path: Path,
        forged: dict[str, str],
    ) -> None:
        """Should the state leak anyway (the audit read it off `ps`), an answer that fails —
        a forged cancel, error or code — is shown as such, but only success ends a login
        early: the person's own answer afterwards still logs in."""
        login_process = await start_login()
        location = await follow_authorize(login_process.url)
        state = parse_qs(urlsplit(location).query)["state"][0]
        status, page = await get_page(with_query(location.split("?", 1)[0], **forged, state=state))
        assert status == 400 and "still waiting" in page, page
        status, page = await get_page(location)
        code, _, err = await login_process.finish()
        assert status == 200 and code == 0, err
        assert "still waits" in err and "Traceback" not in err
        assert (tmp_path / "state" / "default.state.json").exists()

    async def test_a_code_with_a_stolen_state_cannot_switch_the_kakao_user(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
        tmp_path: Path,
    ) -> None:
        """The audit's hijack: with a re-login's stolen state, another user sent an
        authorization code of their own Kakao account, got WITHOUT a code_challenge (the
        emulator, like many servers, then skips the PKCE check), and the account held their
        Kakao user. Now that answer is refused, the account keeps its user and tokens, and
        the person's own answer afterwards completes the login."""
        first = await start_login()
        await get_page(await follow_authorize(first.url))
        assert (await first.finish())[0] == 0
        state_file = tmp_path / "state" / "default.state.json"
        before = state_file.read_bytes()
        login_process = await start_login()
        query = parse_qs(urlsplit(login_process.url).query)
        stolen = query["state"][0]
        emulator.add_user(name="mallory")
        their_login = {
            "client_id": query["client_id"][0],
            "redirect_uri": query["redirect_uri"][0],
            "response_type": "code",
            "login_hint": "mallory",
        }
        answer = await follow_authorize(f"{emulator.url}/oauth/authorize?{urlencode(their_login)}")
        theirs = parse_qs(urlsplit(answer).query)["code"][0]
        callback = answer.split("?", 1)[0]
        status, page = await get_page(with_query(callback, code=theirs, state=stolen))
        assert status == 400 and "mallory" not in page
        assert f"Kakao user {emulator.user('mallory').id}" in page
        assert state_file.read_bytes() == before
        status, _ = await get_page(await follow_authorize(login_process.url))
        code, out, err = await login_process.finish()
        assert status == 200 and code == 0, err
        assert "as Kakao user 1234567890" in out
        assert json.loads(state_file.read_text())["user_id"] == 1234567890

    async def test_a_tampered_state_on_the_real_code_is_ignored(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """The real code with a wrong state is not exchanged; the untampered one then works."""
        login_process = await start_login()
        location = await follow_authorize(login_process.url)
        status, _ = await get_page(with_query(location, state="forged"))
        assert status == 400 and login_process.proc.returncode is None
        status, _ = await get_page(location)
        code, _, err = await login_process.finish()
        assert status == 200 and code == 0, err


# --------------------------------------------------------------------------- 5. API fuzz

BEARER = "fuzz-bearer-token-0123456789abcdef"
TOKEN_ROUTE = re.compile(r"/v1/accounts/[^/]+/token")
KNOWN_PATHS = [
    "/healthz",
    "/v1/status",
    "/v1/reload",
    "/metrics",
    "/v1/accounts/default/token",
    "/v1/accounts/default/token?min_valid=10m",
    "/v1/accounts/default/refresh",
    "/v1/accounts/nobody/token",
    "/v1/accounts/%64efault/token",
    "/v1/accounts/default/token/",
    "//v1/accounts/default/token",
    "/v1/accounts/../accounts/default/token",
    "/kapi/v2/user/me",
    "/kapi/v1/user/access_token_info",
    "/kapi/oauth/token",
    "/kapi/../v1/accounts/default/token",
    "/kapi/%2e%2e/oauth/token",
    "/",
    "*",
]
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
).filter(lambda s: s == s.strip())


@st.composite
def api_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A raw HTTP request: method, target, headers and body, mostly near the real routes."""
    method = draw(
        st.sampled_from(["GET", "GET", "GET", "POST", "POST", "HEAD", "PUT", "DELETE", "PATCH"])
        if draw(st.integers(0, 9))
        else st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=7)
    )
    segment = st.text(alphabet=string.ascii_letters + string.digits + "%._-~", max_size=10)
    path = draw(
        st.sampled_from(KNOWN_PATHS)
        | st.lists(segment, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))
        | st.sampled_from(["/v1/accounts/", "/kapi/"]).flatmap(
            lambda prefix: segment.map(lambda rest: prefix + rest + "/token")
        )
    )
    auth = draw(
        st.sampled_from(
            [None, f"Bearer {BEARER}", f"bearer {BEARER}", f"Basic {BEARER}", "Bearer wrong"]
        )
        | header_text
    )
    names = ["X-Kakao-Account", "Content-Type", "Connection", "Cookie", "Accept", "X-Forwarded-For"]
    token_chars = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
    header_name = st.sampled_from(names) | st.text(alphabet=token_chars, min_size=1, max_size=12)
    headers = draw(st.lists(st.tuples(header_name, header_text), max_size=4))
    headers = [(name, value) for name, value in headers if name and ":" not in name]
    if auth is not None:
        headers.append(("Authorization", auth))
    body = draw(st.binary(max_size=300))
    transport = draw(st.sampled_from(["tcp", "unix"]))
    return {"method": method, "path": path, "headers": headers, "body": body, "via": transport}


def send_raw(request: dict[str, Any], *, tcp: tuple[str, int], unix: Path) -> bytes:
    """Send one raw HTTP/1.1 request; return the answer (status line, headers, body)."""
    lines = [f"{request['method']} {request['path']} HTTP/1.1", "Host: localhost"]
    lines += [f"{name}: {value}" for name, value in request["headers"]]
    lines += [f"Content-Length: {len(request['body'])}", "Connection: close", "", ""]
    data = "\r\n".join(lines).encode() + request["body"]
    family = socket.AF_INET if request["via"] == "tcp" else socket.AF_UNIX
    address: Any = tcp if request["via"] == "tcp" else str(unix)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(address)
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=request["method"])
        try:
            response.begin()
            body = response.read()
        except (http.client.HTTPException, ConnectionResetError):
            return b""  # closed without an answer (e.g. a request line it cannot parse)
    head = f"HTTP/1.1 {response.status} {response.reason}\r\n{response.headers}"
    return head.encode(errors="replace") + body


def asked_for_a_token(request: dict[str, Any]) -> bool:
    """Whether the request, as authorised as it is, asked the token endpoint for a token."""
    if request["method"] != "GET":
        return False
    path = posixpath.normpath(unquote(request["path"].split("?", 1)[0]))
    if not TOKEN_ROUTE.fullmatch(path):
        return False
    if request["via"] == "unix":
        return True  # the socket's mode and group are the authorisation
    return any(
        name.lower() == "authorization" and BEARER in value for name, value in request["headers"]
    )


async def test_fuzzed_api_requests_never_leak_a_token(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Random methods, paths, headers and bodies on the TCP listener and the Unix socket: no
    answer ever holds a refresh token, the bearer token or the client secret, and an access
    token only when the request was authorised and asked the token endpoint for one."""
    port = free_port()
    bearer = tmp_path / "api_token"
    bearer.write_text(BEARER)
    bearer.chmod(0o600)
    extra = f'[api]\ntcp = "127.0.0.1:{port}"\nbearer_token_file = "{bearer}"\n'
    config = write_config(tmp_path, emulator, extra=extra)
    await login(emulator, config)
    daemon = await spawn_daemon(config)
    secrets = [BEARER, str(emulator.settings.client_secret)]
    failures: list[str] = []

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(request=api_requests())
    def check(request: dict[str, Any]) -> None:
        answer = send_raw(request, tcp=("127.0.0.1", port), unix=daemon.runtime_dir / "api.sock")
        text = answer.decode(errors="replace")
        issued = emulator.issued_tokens()
        found = [token for token in issued if token in text]
        assert not [s for s in secrets if s in text], (request, text[:300])
        if found and not asked_for_a_token(request):
            failures.append(f"{request!r} -> {text[:300]}")
        assert not found or asked_for_a_token(request), (request, text[:300])

    try:
        await asyncio.to_thread(check)
        # The control: the oracle is not vacuous, an authorised token request does get one.
        good = {"method": "GET", "path": "/v1/accounts/default/token", "body": b"", "via": "tcp"}
        answer = await asyncio.to_thread(
            send_raw,
            {**good, "headers": [("Authorization", f"Bearer {BEARER}")]},
            tcp=("127.0.0.1", port),
            unix=daemon.runtime_dir / "api.sock",
        )
        assert leaked(answer.decode(errors="replace"), emulator)
    finally:
        assert await daemon.stop() == 0
    assert failures == []


# --------------------------------------------------------------------------- 5. API connections


def open_connections(
    address: tuple[str, int] | Path,
    count: int,
    *,
    send: bytes = b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    within: float = 30.0,
) -> list[socket.socket]:
    """Open up to ``count`` connections to ``address`` (TCP, or a Unix socket's path) and
    send ``send`` on each, a request head that never ends (the audit's hold.py); stop early
    after ``within`` seconds. Return the sockets, open as far as this side knows."""
    deadline = time.monotonic() + within
    opened: list[socket.socket] = []
    family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
    target: Any = str(address) if isinstance(address, Path) else address
    while len(opened) < count and time.monotonic() < deadline:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(target)
            if send:
                sock.sendall(send)
        except OSError:
            sock.close()
            continue
        opened.append(sock)
    return opened


def close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def peek(sock: socket.socket) -> bytes | None:
    """What the other end sent on ``sock`` so far, without waiting or consuming it: None
    while it is open and silent, b"" once it closed (or reset) the connection."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return b""  # reset
    finally:
        sock.settimeout(timeout)


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end has closed ``sock`` without answering."""
    return peek(sock) == b""


def tcp_api_config(directory: Path, emulator: KakaoEmulator | str, *, tcp: str) -> Path:
    """A config with the TCP listener on ``tcp`` and the fuzz test's bearer token."""
    bearer = directory / "api_token"
    bearer.write_text(BEARER)
    bearer.chmod(0o600)
    extra = f'[api]\ntcp = "{tcp}"\nbearer_token_file = "{bearer}"\n'
    if not tcp.startswith("127."):
        extra += "allow_non_loopback = true\n"
    return write_config(directory, emulator, extra=extra)


def token_over_tcp(port: int) -> bytes:
    """GET the default account's token from the TCP listener with the bearer token."""
    request = {
        "method": "GET",
        "path": "/v1/accounts/default/token",
        "headers": [("Authorization", f"Bearer {BEARER}")],
        "body": b"",
        "via": "tcp",
    }
    return send_raw(request, tcp=("127.0.0.1", port), unix=Path("/nonexistent"))


def raise_own_file_limit(needed: int) -> None:
    """Let this test process open ``needed`` descriptors more, or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed + 200:
        pytest.skip(f"the test needs an open-file limit of {needed + 200}, the hard one is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit(1)")


async def token_from(daemon: DaemonProcess, via: str, port: int) -> int:
    """The status of a token request to ``daemon`` over ``via`` ("tcp", with the bearer)."""
    if via == "tcp":
        answer = await asyncio.to_thread(token_over_tcp, port)
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    status, _ = await asyncio.wait_for(daemon.api("GET", "/v1/accounts/default/token"), 10)
    return status


@needs_prlimit
@pytest.mark.parametrize("flooded", ["tcp", "socket"])
async def test_a_connection_flood_stops_neither_refreshes_nor_the_other_listener(
    emulator: KakaoEmulator, tmp_path: Path, flooded: str
) -> None:
    """The audit's attack: 1,100 connections to one listener, each with a request head that
    never ends (any local user can reach the TCP listener; the socket group the socket),
    against a daemon whose open-file limit is 1,024 and cannot be raised. Before the defence
    every refresh failed with "Too many open files" and the log gained a traceback per accept.
    Now the listener holds MAX_CONNECTIONS and answers the rest 503: refreshes go on, the
    other listener serves a token, the log gains one line about it, and the flooded listener
    serves again once the attacker lets go."""
    from kakao_tokend.apilimits import MAX_CONNECTIONS

    raise_own_file_limit(1100)
    short_tokens(emulator, access=3, refresh=3600)
    port = free_port()
    config = tcp_api_config(tmp_path, emulator, tcp=f"127.0.0.1:{port}")
    await login(emulator, config)
    daemon = await spawn_daemon(config, wrapper=("prlimit", "--nofile=1024:1024", "--"))
    target = ("127.0.0.1", port) if flooded == "tcp" else daemon.runtime_dir / "api.sock"
    other = "socket" if flooded == "tcp" else "tcp"
    flood: list[socket.socket] = []
    try:
        before = len(daemon.log_text().splitlines())
        generation = daemon.state()["generation"]
        flood = await asyncio.to_thread(open_connections, target, 1100)
        assert len(flood) > 1024
        await daemon.wait_for(
            lambda: daemon.state()["generation"] >= generation + 2,
            timeout=15,
            what="two refreshes during the flood",
        )
        assert await token_from(daemon, other, port) == 200
        assert emulator.access_token_valid(daemon.published()["access_token"])
        answers = [peek(sock) for sock in flood]
        refused = sum(1 for a in answers if a is not None and a.startswith(b"HTTP/1.1 503 "))
        assert refused >= len(flood) - MAX_CONNECTIONS
        flood_log = daemon.log_text().splitlines()[before:]
        await asyncio.to_thread(close_all, flood)
        flood = []
        statuses = []
        for _ in range(50):  # the daemon sees the connections close within moments
            statuses.append(await token_from(daemon, flooded, port))
            if statuses[-1] == 200:
                break
            await asyncio.sleep(0.1)
        assert statuses[-1] == 200, statuses
    finally:
        await asyncio.to_thread(close_all, flood)
        assert await daemon.stop() == 0
    text = "\n".join(flood_log)
    assert "Too many open files" not in text
    assert "Traceback" not in text
    assert len(lines_naming(text, "connections open")) == 1, text[-3000:]
    assert len(flood_log) < 300, text[-3000:]


@pytest.mark.slow(seconds=12)  # waits out REQUEST_HEAD_TIMEOUT
async def test_a_connection_without_a_complete_request_head_is_closed(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A caller that connects and sends nothing, sends a head that never ends (a byte now
    and then: slowloris), or after one answer starts a next head it never finishes, is
    closed REQUEST_HEAD_TIMEOUT later, on the TCP listener and on the Unix socket alike.
    Before the defence aiohttp waited an hour (its keep-alive timeout) or for ever."""
    from kakao_tokend.apilimits import REQUEST_HEAD_TIMEOUT

    port = free_port()
    config = tcp_api_config(tmp_path, emulator, tcp=f"127.0.0.1:{port}")
    await login(emulator, config)
    daemon = await spawn_daemon(config)
    unix = daemon.runtime_dir / "api.sock"
    tcp = ("127.0.0.1", port)
    callers: dict[str, socket.socket] = {}
    try:
        callers["tcp, nothing"] = open_connections(tcp, 1, send=b"")[0]
        callers["tcp, partial"] = open_connections(tcp, 1)[0]
        callers["socket, nothing"] = open_connections(unix, 1, send=b"")[0]
        callers["socket, partial"] = open_connections(unix, 1)[0]
        second = open_connections(unix, 1, send=b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0]
        assert second.recv(65536).startswith(b"HTTP/1.1 200 ")
        second.sendall(b"GET /healthz HTTP/1.1\r\n")
        callers["socket, second head"] = second
        opened = time.monotonic()
        closed: dict[str, float] = {}
        while len(closed) < len(callers) and time.monotonic() < opened + REQUEST_HEAD_TIMEOUT + 5:
            for name, sock in callers.items():
                if name.endswith("partial") and name not in closed:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")  # a byte now and then does not reset the clock
                if name not in closed and closed_by_peer(sock):
                    closed[name] = time.monotonic() - opened
            await asyncio.sleep(0.5)
        status, _ = await daemon.api("GET", "/healthz")
        log = daemon.log_text()
    finally:
        close_all(callers.values())
        assert await daemon.stop() == 0
    assert set(closed) == set(callers), closed
    assert all(
        REQUEST_HEAD_TIMEOUT - 1 <= t <= REQUEST_HEAD_TIMEOUT + 2 for t in closed.values()
    ), closed
    assert status == 200
    assert "Traceback" not in log


@needs_prlimit
async def test_the_daemon_raises_its_open_file_limit(tmp_path: Path) -> None:
    """systemd starts services with a soft open-file limit of 1,024 (for programs that still
    use select()) and a hard one of 524,288, and asks programs that need more to raise the
    soft limit themselves: the daemon (epoll only) raises it to the hard limit at start."""
    config = write_config(tmp_path)
    daemon = await spawn_daemon(config, wrapper=("prlimit", "--nofile=1024:4096", "--"))
    try:
        limits = await asyncio.to_thread(Path(f"/proc/{daemon.pid}/limits").read_text)
    finally:
        assert await daemon.stop() == 0
    assert re.search(r"Max open files\s+4096\s+4096", limits), limits


async def test_accept_errors_are_logged_once_in_a_while(tmp_path: Path) -> None:
    """Out of descriptors, asyncio logs a traceback for each connection it cannot accept,
    about a hundred a second per listener: the audit's 166 MB of log in 90 s, which under
    journald's rate limit would crowd out the lines that matter. The daemon says it once
    (a line, no traceback) and accepts again when descriptors are free."""
    port = free_port()
    config = tcp_api_config(tmp_path, NOWHERE, tcp=f"127.0.0.1:{port}")
    daemon = await spawn_daemon(config)
    waiting: list[socket.socket] = []
    try:
        before = len(daemon.log_text().splitlines())
        in_use = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (in_use, hard))
        waiting = await asyncio.to_thread(open_connections, ("127.0.0.1", port), 5, send=b"")
        await asyncio.sleep(3.5)
        starved = daemon.log_text().splitlines()[before:]
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
        status, _ = await asyncio.wait_for(daemon.api("GET", "/healthz"), 10)
    finally:
        close_all(waiting)
        assert await daemon.stop() == 0
    text = "\n".join(starved)
    assert "Traceback" not in text
    assert len(lines_naming(text, "cannot accept")) == 1, text[-3000:]
    assert status in (200, 503)  # answered (no account is logged in: 503)


async def test_requests_that_are_not_http_do_not_flood_the_log(tmp_path: Path) -> None:
    """aiohttp logs a traceback for each request it cannot parse, and its text quotes the
    request's bytes: 300 of them from a caller without the bearer token were 300 tracebacks.
    The daemon says it in one line a minute and never quotes the request (it may hold the
    caller's Authorization header)."""
    port = free_port()
    config = tcp_api_config(tmp_path, NOWHERE, tcp=f"127.0.0.1:{port}")
    daemon = await spawn_daemon(config)
    garbage = b"GET /healthz HTTP/1.1\nAuthorization: Bearer " + BEARER.encode() + b"\n\n"

    def send_garbage() -> list[bytes]:
        answers = []
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(garbage)
                answers.append(sock.recv(65536)[:13])
        return answers

    try:
        before = len(daemon.log_text().splitlines())
        answers = await asyncio.to_thread(send_garbage)
        assert set(answers) <= {b"HTTP/1.0 400 ", b"HTTP/1.1 400 "}, set(answers)
        status, _ = await daemon.api("GET", "/healthz")
        after = daemon.log_text().splitlines()[before:]
    finally:
        assert await daemon.stop() == 0
    text = "\n".join(after)
    assert "Traceback" not in text
    assert len(lines_naming(text, "not valid HTTP")) == 1, text[-3000:]
    assert BEARER not in text
    assert status in (200, 503)


def _netns_works() -> bool:
    if not IS_ROOT or shutil.which("unshare") is None:
        return False
    try:
        result = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


async def test_plain_http_to_other_machines_is_warned_about(tmp_path: Path) -> None:
    """api.allow_non_loopback serves the bearer token and the access tokens over plain HTTP:
    check-config still says OK (it is allowed), but adds one warning line saying so and what
    to do instead; a loopback listener gets no such line."""
    config = tcp_api_config(tmp_path, NOWHERE, tcp="0.0.0.0:8766")
    code, out, err = await run_cli(config, "check-config")
    assert code == 0 and out.startswith("config OK"), (out, err)
    warnings = lines_naming(err, "plain HTTP")
    assert len(warnings) == 1, err
    assert warnings[0].startswith("warning: api.tcp") and "0.0.0.0:8766" in warnings[0]
    assert BEARER not in out + err
    loopback = tcp_api_config(tmp_path, NOWHERE, tcp="127.0.0.1:8766")
    code, out, err = await run_cli(loopback, "check-config")
    assert code == 0 and "plain HTTP" not in out + err, (out, err)


async def test_doctor_warns_when_the_api_serves_plain_http_to_other_machines(
    tmp_path: Path,
) -> None:
    """`doctor` reports what `run` and `check-config` warn about: a TCP listener other
    machines reach speaks plain HTTP — a warning (not critical) with the way out as its fix;
    a loopback listener passes."""
    config = tcp_api_config(tmp_path, NOWHERE, tcp="0.0.0.0:8766")
    _, out, err = await run_cli(config, "doctor", "--json")
    checks = {check["check"]: check for check in json.loads(out)["checks"]}
    listener = checks.get("TCP listener")
    assert listener is not None, out + err
    assert listener["level"] == "warning" and listener["result"] == "failed", listener
    assert "plain HTTP" in listener["detail"] and "0.0.0.0:8766" in listener["detail"]
    assert "SSH tunnel" in listener["fix"] and "TLS" in listener["fix"]
    assert BEARER not in out + err
    loopback = tcp_api_config(tmp_path, NOWHERE, tcp="127.0.0.1:8766")
    _, out, err = await run_cli(loopback, "doctor", "--json")
    checks = {check["check"]: check for check in json.loads(out)["checks"]}
    assert checks["TCP listener"]["level"] == "ok", out + err
    assert "plain HTTP" not in out + err


@pytest.mark.skipif(not _netns_works(), reason="needs root and `unshare --net`")
async def test_run_warns_when_it_serves_plain_http_to_other_machines(tmp_path: Path) -> None:
    """The daemon logs the same warning when its TCP listener starts (run here in a network
    namespace of its own: listening on 0.0.0.0 there exposes nothing to the network)."""
    port = free_port()
    config = tcp_api_config(tmp_path, NOWHERE, tcp=f"0.0.0.0:{port}")
    daemon = await spawn_daemon(config, wrapper=("unshare", "--net"))
    try:
        log = daemon.log_text()
    finally:
        assert await daemon.stop() == 0
    warnings = lines_naming(log, "plain HTTP")
    assert len(warnings) == 1, log
    assert f"0.0.0.0:{port}" in warnings[0] and "WARNING" in warnings[0]
    assert BEARER not in log


# --------------------------------------------------------------------------- 6. the document


def test_every_test_docs_security_names_exists() -> None:
    """docs/security.md proves each defence by naming a test; every one of them exists, so
    the document cannot keep citing a test that was renamed or removed."""
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "security.md").read_text()
    cited = re.findall(r"`(?:tests/(test_\w+\.py)::)?((?:Test\w+::)?test_\w+)", text)
    assert len(cited) >= 25
    missing = []
    for module, name in cited:
        source = (repo / "tests" / (module or "test_security.py")).read_text()
        *classes, function = name.split("::")
        if not all(f"class {c}" in source for c in classes) or f"def {function}(" not in source:
            missing.append(f"{module or 'test_security.py'}::{name}")
    assert missing == []
