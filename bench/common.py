"""Shared set-up for the benchmarks: config, seeded accounts, the daemon process, /proc readings.

Every benchmark runs the real ``python -m kakao_tokend --config X run`` child against an
in-process emulator (127.0.0.1 only) and compares it with a baseline measured in the same run.
Accounts are seeded with the emulator's ``issue_tokens`` shortcut and written through
``AccountStore``, so 1,000 accounts take a second, not 1,000 logins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from kakao_tokend.config import load_config
from kakao_tokend.emulator import EmulatorSettings, KakaoEmulator
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet, utcnow

PYTHON = sys.executable
#: Kakao user ids of seeded accounts start here (account i is user FIRST_USER_ID + i).
FIRST_USER_ID = 50_000
#: Kakao's own rate limits would stop a benchmark that hammers one user; lift them.
NO_RATE_LIMIT = (10**9, 1.0)


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse the options every benchmark takes (``--quick``, ``--keep``) plus ``options``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if options is not None:
        options(parser)
    parser.add_argument(
        "--quick", action="store_true", help="tiny run (seconds) that only proves the script works"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (config, logs, state)"
    )
    return parser.parse_args(argv)


def emulator_settings(**overrides: object) -> EmulatorSettings:
    """Return emulator settings with rate limits lifted, plus ``overrides``."""
    settings = EmulatorSettings(access_rate=NO_RATE_LIMIT, refresh_rate=NO_RATE_LIMIT)
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


def account_names(count: int) -> list[str]:
    """Return ``count`` account names; a single account is called ``default``."""
    return ["default"] if count == 1 else [f"acct{i:04d}" for i in range(count)]


#: The modules a daemon and the baselines import, compiled once (see workdir()).
WARM_IMPORTS = (
    "import asyncio, aiohttp, apscheduler, kakao_tokend.__main__, kakao_tokend.service,"
    " kakao_tokend.api, kakao_tokend.hooks, kakao_tokend.templates, kakao_tokend.scheduler"
)
#: Where the children keep their bytecode (set by workdir(); None: beside the sources).
_pycache: Path | None = None


def bytecode_beside_sources() -> bool:
    """Whether the children can keep their bytecode in the usual ``__pycache__`` directories:
    those of the daemon's package and of the libraries it imports are writable (pip compiled
    the libraries at install time; a checkout's own package is compiled once, then read)."""
    for name in ("kakao_tokend", "aiohttp", "apscheduler"):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return False
        package = Path(spec.origin).parent
        cache = package / "__pycache__"
        if not os.access(cache if cache.is_dir() else package, os.W_OK):
            return False
    return True


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    """Create a private temporary directory for one benchmark run and remove it afterwards.

    Every child runs from compiled bytecode, as an installed package does (pip compiles at
    install time). Without it, a shell with PYTHONDONTWRITEBYTECODE=1 makes every daemon start
    compile the daemon's own modules (~0.1 s) while the baseline's aiohttp comes precompiled
    from site-packages. So the children may write bytecode (child_environment()), and one
    import of everything they use writes what is missing before the first child is measured:
    beside the sources where they are writable (then only once: a later run reads it), else
    in ``pycache/`` in this directory (each run compiles everything again, 1.5 CPU-s).
    """
    global _pycache
    path = Path(tempfile.mkdtemp(prefix="kakao-tokend-bench-"))
    _pycache = None if bytecode_beside_sources() else path / "pycache"
    try:
        subprocess.run([PYTHON, "-c", WARM_IMPORTS], env=child_environment(), check=True)
        yield path
    finally:
        _pycache = None
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a child: ours, bytecode cached (see workdir()), ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    }
    if _pycache is not None:
        env["PYTHONPYCACHEPREFIX"] = str(_pycache)
    env.update(extra or {})
    return env


def write_config(
    directory: Path,
    emulator: KakaoEmulator,
    *,
    accounts: Sequence[str] = ("default",),
    heartbeat: str | None = None,
    log_level: str = "info",
    extra: str = "",
) -> Path:
    """Write a config for ``accounts`` on ``emulator``; ``heartbeat`` None keeps the default."""
    secret = directory / "client_secret"
    secret.write_text(str(emulator.settings.client_secret))
    secret.chmod(0o600)
    lines = [
        f'log_level = "{log_level}"',
        "[paths]",
        f'state_dir = "{directory / "state"}"',
        f'runtime_dir = "{directory / "run"}"',
        "[kakao]",
        f'rest_api_key = "{emulator.settings.client_id}"',
        f'client_secret_file = "{secret}"',
        f'auth_url = "{emulator.url}"',
        f'api_url = "{emulator.url}"',
        f'redirect_uri = "{emulator.settings.redirect_uris[0]}"',
        "[refresh]",
    ]
    if heartbeat is not None:
        lines.append(f'heartbeat = "{heartbeat}"')
    names = list(accounts)
    if names != ["default"]:
        lines.insert(0, f'default_account = "{names[0]}"')
        lines.extend(f"[accounts.{name}]" for name in names)
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def seed_accounts(
    emulator: KakaoEmulator,
    config_path: Path,
    *,
    first_user: int = FIRST_USER_ID,
    spread: tuple[float, float] | None = None,
    refresh_at: float = 0.75,
    rng: random.Random | None = None,
) -> dict[str, int]:
    """Give every configured account fresh tokens and write its state and token files.

    ``spread=(lead, span)`` plans each account's FIRST refresh (at ``refresh_at`` of its first
    token's lifetime) at a uniform random moment in [now + lead, now + lead + span], as if the
    daemon had been running for a while: the emulator issues that first token with the matching
    (shorter) lifetime, and the recorded issue time is moved back by under a second to undo the
    whole-second rounding of ``expires_in``. Later tokens get the emulator's normal lifetime.
    Returns account -> Kakao user id.
    """
    rng = rng or random.Random(1)
    config = load_config(config_path)
    users: dict[str, int] = {}
    normal_lifetime = emulator.settings.access_lifetime
    begin = time.time()
    try:
        for index, (name, account) in enumerate(config.accounts.items()):
            user_id = first_user + index
            shift = 0.0
            if spread is not None:
                due = begin + spread[0] + rng.uniform(0.0, spread[1])
                lifetime = max(1, math.ceil((due - time.time()) / refresh_at))
                emulator.settings.access_lifetime = lifetime
                shift = max(0.0, time.time() + refresh_at * lifetime - due)
            now = utcnow()
            tokens = TokenSet.from_token_response(emulator.issue_tokens(user_id), requested_at=now)
            if shift:
                delta = timedelta(seconds=shift)
                tokens = replace(
                    tokens,
                    access_issued_at=tokens.access_issued_at - delta,
                    access_expires_at=tokens.access_expires_at - delta,
                )
            state = AccountState(
                account=name, tokens=tokens, refreshed_at=tokens.access_issued_at, user_id=user_id
            )
            store = AccountStore(account)
            store.save(state)
            store.publish(state)
            users[name] = user_id
    finally:
        emulator.settings.access_lifetime = normal_lifetime
    return users


# --------------------------------------------------------------------------- processes


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def wait_for(self, line: str, timeout: float) -> float:
        """Wait for a datagram containing ``line``; return time.monotonic() at its arrival."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {line} on {self.path} within {timeout:g}s")
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            if line in data.decode(errors="replace").splitlines():
                return time.monotonic()

    def close(self) -> None:
        """Close and remove the socket."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Process:
    """A child process of a benchmark (the daemon or a baseline) and where its output goes."""

    proc: asyncio.subprocess.Process
    log_path: Path
    started: float  # time.monotonic() just before exec

    @property
    def pid(self) -> int:
        """Return the child's pid."""
        return self.proc.pid

    def log_text(self) -> str:
        """Return what the child wrote to stdout/stderr so far."""
        return self.log_path.read_text(errors="replace")

    async def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM (SIGKILL after ``timeout``) and return the exit status."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                return await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
        return await self.proc.wait()


async def spawn(
    argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None
) -> Process:
    """Start ``argv`` with stdout+stderr to ``log_path``."""
    child_env = child_environment(env)
    with log_path.open("wb") as log_file:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=child_env,
        )
    return Process(proc, log_path, started)


def daemon_argv(config_path: Path) -> list[str]:
    """Return the command line of `kakao-tokend run` on ``config_path``."""
    return [PYTHON, "-m", "kakao_tokend", "--config", str(config_path), "run"]


async def start_daemon(
    config_path: Path, *, timeout: float = 120.0, env: dict[str, str] | None = None
) -> tuple[Process, float]:
    """Start the daemon, wait for READY=1 on a private NOTIFY_SOCKET; return (process, seconds).

    ``env`` is added to the child's environment (e.g. PYTHONPATH to run another checkout).
    """
    directory = config_path.parent
    notify = NotifySocket(directory / f"notify-{time.monotonic_ns()}.sock")
    try:
        daemon = await spawn(
            daemon_argv(config_path),
            directory / f"daemon-{time.monotonic_ns()}.log",
            env={**(env or {}), "NOTIFY_SOCKET": str(notify.path)},
        )
        try:
            ready_at = await notify.wait_for("READY=1", timeout)
        except TimeoutError:
            await daemon.stop(5)
            raise RuntimeError(
                f"the daemon did not become ready:\n{daemon.log_text()[-3000:]}"
            ) from None
    finally:
        notify.close()
    return daemon, ready_at - daemon.started


@contextlib.asynccontextmanager
async def running_daemon(config_path: Path) -> AsyncIterator[Process]:
    """Run the daemon for the block (ready on entry, stopped on exit)."""
    daemon, _ = await start_daemon(config_path)
    try:
        yield daemon
    finally:
        status = await daemon.stop()
        if status != 0:
            print(f"warning: the daemon exited with {status}", file=sys.stderr)


@contextlib.asynccontextmanager
async def seeded_daemon(
    directory: Path,
    emulator: KakaoEmulator,
    *,
    accounts: int,
    heartbeat: str | None = None,
    first_user: int = FIRST_USER_ID,
    spread: tuple[float, float] | None = None,
    extra: str = "",
    settle: bool = True,
) -> AsyncIterator[Process]:
    """Seed ``accounts`` accounts in their own directory and run a daemon on them.

    With ``settle`` the block starts only after the start-up check of every account (one
    access_token_info call each) is logged, so what follows measures the steady state.
    """
    sub = directory / f"daemon-{accounts}-{first_user}"
    sub.mkdir()
    config = write_config(
        sub, emulator, accounts=account_names(accounts), heartbeat=heartbeat, extra=extra
    )
    seed_accounts(emulator, config, first_user=first_user, spread=spread)
    async with running_daemon(config) as daemon:
        if settle:
            await wait_log(daemon, "access token verified", count=accounts, timeout=300)
        yield daemon


async def wait_log(process: Process, text: str, *, count: int = 1, timeout: float = 60.0) -> None:
    """Wait until ``text`` appears ``count`` times in the process's log."""
    deadline = time.monotonic() + timeout
    while process.log_text().count(text) < count:
        if process.proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"waiting for {text!r} failed:\n{process.log_text()[-3000:]}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- /proc readings


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` in seconds, nanosecond resolution (schedstat)."""
    with open(f"/proc/{pid}/schedstat") as handle:
        return int(handle.read().split()[0]) / 1e9


def cpu_ticks_seconds(pid: int) -> float:
    """CPU time of ``pid`` from /proc/PID/stat utime+stime (clock-tick resolution, 10 ms)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # After the ")" the state is field 3, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """Return (VmRSS, VmHWM) of ``pid`` in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


# --------------------------------------------------------------------------- output


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``."""
    return statistics.median(values)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain aligned table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))


def result(name: str, value: float, ratio: float | None, **extra: object) -> None:
    """Print the machine-readable line ``RESULT name=value ratio=value [key=value ...]``."""
    parts = [
        f"RESULT {name}={value:.6g}",
        f"ratio={ratio:.4g}" if ratio is not None else "ratio=nan",
    ]
    parts.extend(f"{key}={val}" for key, val in extra.items())
    print(" ".join(parts), flush=True)


#: A bare aiohttp app on a Unix socket answering a token-shaped JSON (throughput baseline).
BARE_SERVER = """
import sys
from aiohttp import web

BODY = {
    "account": "default",
    "access_token": "x" * 70,
    "token_type": "bearer",
    "expires_in": 21000,
    "expires_at": "2030-01-01T00:00:00Z",
    "generation": 1,
}

async def token(request):
    return web.json_response(BODY, headers={"Cache-Control": "no-store"})

app = web.Application()
app.router.add_get("/v1/accounts/{name}/token", token)
print("listening", flush=True)
web.run_app(app, path=sys.argv[1], access_log=None, print=None)
"""


async def bare_server(directory: Path) -> tuple[Process, Path]:
    """Start the bare aiohttp baseline server; return it and its socket path once it listens."""
    path = directory / "bare.sock"
    server = await spawn([PYTHON, "-c", BARE_SERVER, str(path)], directory / "bare.log")
    deadline = time.monotonic() + 30
    while not path.exists():
        if server.proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bare server did not start:\n{server.log_text()}")
        await asyncio.sleep(0.05)
    return server, path
