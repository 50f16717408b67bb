"""Test helpers that run the real `kakao-tokend run` process against the in-test emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import aiohttp

from kakao_tokend.config import load_config
from kakao_tokend.demo import auto_login
from kakao_tokend.emulator import EmulatorSettings, KakaoEmulator
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore

REPO = Path(__file__).resolve().parents[1]


#: free_port() picks from here up to the kernel's ephemeral range (ports 0-19999 are left to
#: the machine's own services).
LOWEST_FREE_PORT = 20000


def ephemeral_ports_start() -> int:
    """Return the first port of the kernel's ephemeral range (where bind(0) and connect pick)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """Return a loopback TCP port that is free now, for a server a test starts soon after.

    Not one from bind(port 0): that lies in the kernel's ephemeral range, where every outgoing
    connection (of every parallel test worker and every daemon they run) takes its source port,
    so one of them could take the port before the server binds it. Below that range only an
    explicit bind takes a port, and a random pick keeps the parallel workers apart.
    """
    pick = random.SystemRandom()  # hypothesis reseeds the module-level random generator
    end = ephemeral_ports_start()
    for _ in range(200 if end - LOWEST_FREE_PORT >= 1000 else 0):
        port = pick.randrange(LOWEST_FREE_PORT, end)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a machine without room below its ephemeral range
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found


def write_login_config(tmp_path: Path, emulator: KakaoEmulator, *, redirect_port: int) -> Path:
    """Write a minimal login config for the emulator with its own redirect URI (registered)."""
    redirect_uri = f"http://127.0.0.1:{redirect_port}/callback"
    emulator.settings.redirect_uris.append(redirect_uri)
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[paths]
state_dir = "{tmp_path / "state"}"
runtime_dir = "{tmp_path / "run"}"

[kakao]
rest_api_key = "{emulator.settings.client_id}"
client_secret = "{emulator.settings.client_secret}"
auth_url = "{emulator.url}"
api_url = "{emulator.url}"
redirect_uri = "{redirect_uri}"
"""
    )
    path.chmod(0o600)
    return path


async def run_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """Run the real CLI in a child process (the test's loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kakao_tokend",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # a command that hangs must not outlive its test
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def release_into_a_rotation(emulator: KakaoEmulator) -> None:
    """Let the refresh a ``hold`` fault keeps reach Kakao, and wait until Kakao rotated."""
    rotations = emulator.stats.rotations
    emulator.release_held()
    for _ in range(100):
        if emulator.stats.rotations > rotations:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("Kakao never rotated the held refresh")


def short_tokens(emulator: KakaoEmulator, *, access: float = 2, refresh: float = 3600) -> None:
    """Make the emulator issue second-long tokens (rotation window at most half the refresh
    token's life)."""
    emulator.settings.access_lifetime = access
    emulator.settings.refresh_lifetime = refresh
    emulator.settings.rotation_window = min(emulator.settings.rotation_window, refresh / 2)


#: A loopback URL where nothing listens, for configs of tests that never reach Kakao.
NOWHERE = "http://127.0.0.1:9"


def write_config(
    directory: Path,
    emulator: KakaoEmulator | str = NOWHERE,
    *,
    accounts: Iterable[str] = ("default",),
    heartbeat: str = "0.2s",
    retry_initial: str = "0.2s",
    retry_max: str = "1s",
    rotation_window: float | None = None,
    extra: str = "",
    timeout: str = "2s",
    connect_timeout: str = "1s",
) -> Path:
    """Write a config pointing at ``emulator`` with test-friendly timings; return its path.

    ``emulator`` may also be just a URL: the config then has the emulator's default app (key,
    secret, redirect URI), for tests that never reach Kakao or start an emulator of their own.
    ``extra`` is appended at the end (after [refresh], or the last [accounts.NAME]).
    """
    if isinstance(emulator, KakaoEmulator):
        settings, url = emulator.settings, emulator.url
    else:
        settings, url = EmulatorSettings(), emulator
    names = list(accounts)
    window = rotation_window if rotation_window is not None else settings.rotation_window
    lines = [
        'log_level = "debug"',
        "[paths]",
        f'state_dir = "{directory / "state"}"',
        f'runtime_dir = "{directory / "run"}"',
        "[kakao]",
        f'rest_api_key = "{settings.client_id}"',
        f'client_secret_file = "{directory / "client_secret"}"',
        f'auth_url = "{url}"',
        f'api_url = "{url}"',
        f'redirect_uri = "{settings.redirect_uris[0]}"',
        f'timeout = "{timeout}"',
        f'connect_timeout = "{connect_timeout}"',
        "[refresh]",
        f'heartbeat = "{heartbeat}"',
        f'retry_initial = "{retry_initial}"',
        f'retry_max = "{retry_max}"',
        f'rotation_window = "{window}s"',
    ]
    if names != ["default"]:
        lines.insert(0, f'default_account = "{names[0]}"')
        for name in names:
            lines.append(f"[accounts.{name}]")
    secret = directory / "client_secret"
    secret.write_text(str(settings.client_secret))
    secret.chmod(0o600)
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def config_with(tmp_path: Path, emulator: KakaoEmulator, extra: str = "", **kwargs: Any) -> Path:
    """write_config plus extra TOML (e.g. an [api] table)."""
    return write_config(tmp_path, emulator, extra=extra, **kwargs)


def no_verify_on_start(config: Path) -> None:
    """Turn off the start-up access_token_info check so request counts are exact."""
    config.write_text(
        config.read_text().replace("[refresh]\n", "[refresh]\nverify_on_start = false\n")
    )


async def login(
    emulator: KakaoEmulator, config_path: Path, account: str = "default"
) -> AccountState:
    """Log ``account`` in against the emulator (auto consent) and write its files like `login`."""
    config = load_config(config_path)
    settings = config.accounts[account]
    session = create_session()
    try:
        fresh = await auto_login(KakaoClient(session, settings.app), session, account)
    finally:
        await session.close()
    store = AccountStore(settings)
    with store.lock():
        previous = store.load()
        state = replace(fresh, generation=(previous.generation + 1) if previous else 1)
        store.save(state)
        store.publish(state)
    return state


def access_token_valid(emulator: KakaoEmulator, token: str) -> bool:
    """Ask the emulator whether it would accept ``token`` right now."""
    return emulator.access_token_valid(token)


def issued_tokens(emulator: KakaoEmulator) -> list[str]:
    """Every access and refresh token the emulator ever issued (to scan logs for leaks)."""
    return list(emulator.issued_tokens())


@dataclass
class DaemonProcess:
    """A running `kakao-tokend run` child process and the files it works on."""

    proc: asyncio.subprocess.Process
    config_path: Path
    log_path: Path
    state_dir: Path
    runtime_dir: Path
    _log_offset: int = field(default=0)

    @property
    def pid(self) -> int:
        """Return the child's pid."""
        return self.proc.pid

    def log_text(self) -> str:
        """Return everything the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def state(self, account: str = "default") -> dict[str, Any]:
        """Return the account's private state file as JSON."""
        document: dict[str, Any] = json.loads(
            (self.state_dir / f"{account}.state.json").read_text()
        )
        return document

    def published(self, account: str = "default") -> dict[str, Any]:
        """Return the account's published token file as JSON."""
        document: dict[str, Any] = json.loads(
            (self.state_dir / f"{account}.token.json").read_text()
        )
        return document

    async def api(self, method: str, path: str) -> tuple[int, Any]:
        """Call the daemon's local API on its Unix socket."""
        connector = aiohttp.UnixConnector(path=str(self.runtime_dir / "api.sock"))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, f"http://localhost{path}") as response,
        ):
            return response.status, await response.json(content_type=None)

    def send(self, signum: int) -> None:
        """Send a signal to the daemon."""
        os.kill(self.proc.pid, signum)

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop the daemon with ``signum`` and return its exit code."""
        if self.proc.returncode is None:
            self.send(signum)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            # SIGABRT: faulthandler (logs.py) writes the stack into the log; then kill it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGABRT)
            await asyncio.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise AssertionError(
                f"the daemon did not exit {timeout:g}s after signal {signum}:\n"
                + self.log_text()[-6000:]
            ) from None

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = 10.0,
        what: str = "condition",
        interval: float = 0.05,
    ) -> None:
        """Poll ``predicate`` (keeping the test's event loop, and so the emulator, running)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    return
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            if self.proc.returncode is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) while waiting for {what}:\n"
                    + self.log_text()[-4000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n" + self.log_text()[-4000:])
            await asyncio.sleep(interval)

    async def wait_log(self, text: str, *, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until ``text`` appears ``count`` times in the daemon's log."""
        await self.wait_for(
            lambda: self.log_text().count(text) >= count, timeout=timeout, what=repr(text)
        )


def daemon_command(config_path: Path, *args: str) -> list[str]:
    """Return the command line that runs the real CLI on ``config_path``."""
    return [sys.executable, "-m", "kakao_tokend", "--config", str(config_path), "run", *args]


async def start_daemon(
    config_path: Path,
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    args: Iterable[str] = (),
) -> DaemonProcess:
    """Start `kakao-tokend run` and wait until it logs that it is running."""
    config = load_config(config_path)
    log_path = config_path.parent / f"daemon-{time.monotonic_ns()}.log"
    log_file = log_path.open("wb")
    child_env = {**os.environ, **(env or {})}
    child_env.pop("NOTIFY_SOCKET", None) if env is None or "NOTIFY_SOCKET" not in env else None
    proc = await asyncio.create_subprocess_exec(
        *daemon_command(config_path, *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
        env=child_env,
        cwd=str(config_path.parent),
    )
    log_file.close()
    STARTED.append((proc.pid, str(config_path)))
    daemon = DaemonProcess(proc, config_path, log_path, config.state_dir, config.runtime_dir)
    if wait_ready:
        try:
            await daemon.wait_log("kakao-tokend running", timeout=20)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # the test fails here; its daemon must not run on for the rest
            raise
    return daemon


#: (pid, config path) of every daemon start_daemon started in this worker: a test that fails
#: before its own clean-up (a start that timed out under load, a fixture that raised) would
#: otherwise leave its daemons running for the rest of the run, loading every later test.
STARTED: list[tuple[int, str]] = []


def kill_leftover_daemons() -> list[str]:
    """SIGKILL the daemons start_daemon started that still run; return what was killed.

    A pid is only killed while its command line still names the daemon's config (not a
    reaped daemon's pid reused by another process), and not when it is a zombie.
    """
    killed = []
    for pid, config in STARTED:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            zombie = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if config in cmdline and not zombie:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{pid} ({config})")
    STARTED.clear()
    return killed


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll an async ``check`` until it is true."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class NotifyReceiver:
    """The receiving end of $NOTIFY_SOCKET, like systemd's: the datagrams a daemon sends.

    The socket lives in a short temporary directory (a Unix socket path is limited to 107
    bytes, which a deep pytest tmp_path can exceed). Entered inside a running event loop, it
    reads every datagram as it arrives, as systemd does: the kernel queues only 10
    (net.unix.max_dgram_qlen) and the daemon, which never waits to send, drops the rest. A
    test that read only at the end lost STOPPING=1 behind a short token's STATUS= updates.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="kt-")
        self.path = os.path.join(self._dir.name, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        #: Every datagram received so far, in order.
        self.messages: list[str] = []

    def __enter__(self) -> Self:
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # no loop: drain() reads what has arrived when asked
        if self._loop is not None:
            self._loop.add_reader(self.sock, self.drain)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock)
        self.sock.close()
        self._dir.cleanup()

    @property
    def env(self) -> dict[str, str]:
        """The environment that points a daemon at this socket."""
        return {"NOTIFY_SOCKET": self.path}

    def drain(self) -> list[str]:
        """Receive what has arrived; return every message so far."""
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.messages

    def seen(self, line: str) -> bool:
        """Whether a message so far has ``line`` as one of its lines (after a drain)."""
        return any(line in message.split("\n") for message in self.drain())

    def text(self) -> str:
        """Every message so far, one after another (after a drain)."""
        return "\n".join(self.drain())

    async def wait_for_line(
        self, line: str, process: DaemonProcess, *, timeout: float = 30
    ) -> list[str]:
        """Wait for the message that has ``line`` as one of its lines; return its lines.

        Fails at once, with the daemon's log, when the daemon exits first.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.drain():
                if line in (lines := message.split("\n")):
                    return lines
            if process.proc.returncode is not None:
                raise AssertionError(f"the daemon exited:\n{process.log_text()[-3000:]}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {line} within {timeout:g}s:\n{process.log_text()[-3000:]}")


@contextlib.contextmanager
def frozen_daemon_socket(config: Path) -> Iterator[Path]:
    """A stand-in for a daemon that is stopped (SIGSTOP) or frozen, on the config's API socket:
    the kernel accepts connections into the backlog, and nobody ever answers."""
    from kakao_tokend.config import load_config

    path = load_config(config).api_socket
    path.parent.mkdir(mode=0o700, exist_ok=True)
    frozen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        frozen.bind(str(path))
        frozen.listen(8)
        yield path
    finally:
        frozen.close()
