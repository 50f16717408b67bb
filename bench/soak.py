"""Soak harness: the real daemon vs the emulator under faults, kills, pauses, jumps, a full disk.

Run ``python bench/soak.py --minutes 5 --seed 1`` (add ``--lost-response`` to include the one fault
that can legitimately cost a refresh token). The emulator runs inside this process; the daemon is
a real ``python -m kakao_tokend --config X run`` child. Everything stays on 127.0.0.1 and every
loop is bounded in time. The exit status is 1 when a count that must be 0 is not (see docs/soak.md).

"Healthy" (the condition under which a read of an expired access token is a failure) means that the
read started and ended outside every *disruption window*. A window opens when the harness starts a
disruption and closes a grace period after the daemon can have recovered from it:

* a fault armed on the emulator: from arming until the emulator has answered with it ``count``
  times (plus the fault's delay), then ``retry_max`` + GRACE;
* kill -9: from the kill until the restarted process logs that it is running, then GRACE;
* SIGSTOP/SIGCONT: from the stop until the continue, then GRACE;
* an emulator clock jump: the daemon cannot see Kakao's clock, so it learns of the jump only at
  its next scheduled refresh: the window is refresh_at+jitter of the access lifetime + GRACE;
* a full disk: for readers of the published *file* only (the file cannot be replaced while the
  disk is full; the token endpoint must stay fresh from memory): from filling until the state
  file is written again, then GRACE;
* a lost refresh token that the harness accounted for (lost_response fault, or a kill -9 inside
  KILL_WINDOW after Kakao rotated): from the rotation until the harness has logged in again.

GRACE is 1 s. Outside these windows every read must return a token the emulator accepts.

The daemon runs with the production retry settings (retry_initial 10 s, retry_max 5 min): the
back-off scales them to the token's lifetime by itself, and a soak that capped them would hide
a pause that does not (a fixed 60 s after KOE237). Where a window above allowed retry_max, it
now allows RECOVERY, a third of the access lifetime: how soon a daemon whose every wait is
relative to the lifetime has a valid token again once Kakao answers normally.

Chaos aimed at the rate-limit back-off (docs/soak.md has why):

* restart_rate_limited: SIGSTOP until the access token is nearly expired, kill -9, arm KOE237 on
  the token endpoint, restart: the start-up refresh is overdue and rate-limited;
* restart_near_expiry: the same without the rate limit (or with another token fault);
* refresh_near_death: the emulator stops rotating until the refresh token has seconds left,
  then faults hit the refresh that must save it;
* clock_back: KOE237 puts the daemon into back-off, then its wall clock steps back to 1-3 s
  before its access token was issued (libfaketime preloaded into the daemon; skipped with the
  reason when it is not installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

from kakao_tokend.config import load_config
from kakao_tokend.emulator import FAULT_KINDS, EmulatorSettings, KakaoEmulator, running_emulator
from kakao_tokend.kakao import KakaoClient, create_session, new_pkce_pair, new_state
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import fingerprint, parse_time, utcnow

ACCESS_LIFETIME = 3.0
REFRESH_LIFETIME = 30.0
ROTATION_WINDOW = 20.0  # every refresh after the token's 10th second rotates it
REFRESH_AT = 0.75
JITTER = 0.05
HEARTBEAT = 0.2
#: The daemon's retry settings: the production defaults (see the module notes).
RETRY_INITIAL = 10.0
RETRY_MAX = 300.0
#: How soon after Kakao answers normally again the daemon must serve a valid token.
RECOVERY = ACCESS_LIFETIME / 3
DAEMON_TIMEOUT = 2.0
GRACE = 1.0
#: refresh_near_death arms its faults when the refresh token has this long left.
NEAR_DEATH = 5.0
NEAR_DEATH_COOLDOWN = 50.0
#: restart_* chaos kills the daemon when the access token has less than this left.
NEAR_EXPIRY = 0.3
#: clock_back steps 1 s to 1 + CLOCK_BACK_BEYOND s further back than the access token's age.
CLOCK_BACK_BEYOND = 2.0
CLOCK_BACK_COOLDOWN = 30.0
#: Where libfaketime is looked for (Debian's "libfaketime" package; $KT_SOAK_LIBFAKETIME wins).
LIBFAKETIME_GLOBS = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1")
#: A kill -9 this soon after Kakao rotated may legitimately lose the rotated token (it was on
#: the wire or not yet fsynced); the daemon writes it within milliseconds.
KILL_WINDOW = 1.0
JUMP_MAX = 6.0  # keep the refresh token's age (10 s + jumps + pauses) below its 30 s life
JUMP_COOLDOWN = 25.0
DISK_FULL_COOLDOWN = 45.0
#: How long the disk stays full: this plus up to as much again (seeded), one to two access
#: lifetimes, so that every --scale fills it for the same share of the token's life.
DISK_FULL_LENGTH = 3.0
#: The quiet time between two disruptions: GAP_MIN plus up to GAP_SPREAD (seeded).
GAP_MIN = 1.0
GAP_SPREAD = 4.0
READERS_FILE = 2
READERS_API = 2
_KAPI_CODES = sorted(kind for kind in FAULT_KINDS if kind.startswith("-"))
# `hold` waits for a test to release it: a timed soak has nobody to do that.
_TRANSPORT = sorted(FAULT_KINDS - {"lost_response", "hold", *_KAPI_CODES})
# Every kind comes up once before any repeats; the kinds that matter most for an endpoint first
# (kauth-style answers on the token endpoint, kapi error codes on access_token_info).
TOKEN_FAULTS = (_TRANSPORT, _KAPI_CODES)
KAPI_FAULTS = (_KAPI_CODES, _TRANSPORT)
# "timeout" keeps the emulator's default 60 s delay: the delayed work then always meets a
# refresh token the daemon has already rotated away (or that expired), so it cannot steal one.
SLOW_DELAY = 1.0
#: The kinds armed with SLOW_DELAY: "slow" answers late, "late" does the work (a rotation) at
#: once and answers late. Below the daemon's timeout, both must lose nothing; "late" with its
#: default 2 s (the daemon's whole timeout) would be a lost answer like lost_response.
DELAYED_KINDS = ("slow", "late")


#: Every disruption the schedule can pick (see next_disruption for the weights and rules).
DISRUPTIONS = (
    "token_fault",
    "kill",
    "pause",
    "jump",
    "disk_full",
    "lost_response",
    "restart_rate_limited",
    "restart_near_expiry",
    "refresh_near_death",
    "clock_back",
)


@dataclass
class Window:
    """A disruption: reads inside [start, end] (emulator time) are not held to freshness."""

    start: float
    end: float | None
    reason: str
    file_only: bool = False


@dataclass
class Loss:
    """A refresh token the daemon had on disk that Kakao no longer accepts."""

    fingerprint: str
    status: str
    cause: str  # "lost_response", "kill_during_rotation" or "UNEXPLAINED ..."
    detected_at: float


def faketime_leftovers(pid: int) -> list[Path]:
    """Return the files libfaketime made in /dev/shm for process ``pid`` that still exist."""
    names = (f"faketime_shm_{pid}", f"sem.faketime_sem_{pid}")
    return [path for name in names if (path := Path("/dev/shm") / name).exists()]


@dataclass
class Report:
    """Everything the harness counts."""

    seed: int
    minutes: float
    lost_response_mode: bool
    faults_injected: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    pauses: int = 0
    clock_jumps: int = 0
    clock_jumped_seconds: float = 0.0
    disk_full_episodes: int = 0
    disk_full_skipped: str | None = None
    restarts_rate_limited: int = 0
    restarts_near_expiry: int = 0
    refresh_near_death: int = 0
    clock_back_steps: int = 0
    clock_back_seconds: float = 0.0
    clock_back_skipped: str | None = None
    reads_file: int = 0
    reads_api: int = 0
    reads_healthy: int = 0
    api_unavailable: int = 0
    torn_reads: int = 0
    torn_examples: list[str] = field(default_factory=list)
    expired_healthy: int = 0
    expired_healthy_examples: list[str] = field(default_factory=list)
    expired_in_windows: int = 0
    expired_by_window: Counter[str] = field(default_factory=Counter)
    losses: list[Loss] = field(default_factory=list)
    relogins: int = 0
    koe237_real: int = 0
    tokens_in_logs: int = 0
    secret_in_logs: bool = False
    #: What libfaketime left in /dev/shm for the daemons this run started (see reap_faketime).
    shm_left: int = 0
    refresh_cycles: int = 0
    rotations: int = 0
    retired_presented: int = 0
    final_exit_code: int | None = None
    final_refresh_status: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def unexplained_losses(self) -> int:
        """Return the refresh tokens lost outside the accounted lost-response cases."""
        return sum(1 for loss in self.losses if loss.cause.startswith("UNEXPLAINED"))

    def failures(self) -> list[str]:
        """Return every must-be-0 count that is not 0 (and other hard failures)."""
        bad = list(self.problems)
        checks = {
            "torn or unparsable reads": self.torn_reads,
            "reads of an expired token while healthy": self.expired_healthy,
            "refresh tokens lost outside the lost-response case": self.unexplained_losses,
            "KOE237 rate-limit answers": self.koe237_real,
            "tokens found in the logs": self.tokens_in_logs + int(self.secret_in_logs),
            "libfaketime files left in /dev/shm": self.shm_left,
        }
        bad += [f"{name}: {value}" for name, value in checks.items() if value]
        if self.refresh_cycles == 0:
            bad.append("no refresh happened at all")
        if self.final_exit_code != 0:
            bad.append(f"the daemon exited {self.final_exit_code} on the final SIGTERM")
        if self.final_refresh_status != "live":
            bad.append(f"the final state's refresh token is {self.final_refresh_status}")
        return bad

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able view."""
        return {
            "seed": self.seed,
            "minutes": self.minutes,
            "lost_response_mode": self.lost_response_mode,
            "refresh_cycles": self.refresh_cycles,
            "rotations": self.rotations,
            "faults_injected": dict(sorted(self.faults_injected.items())),
            "faults_injected_total": sum(self.faults_injected.values()),
            "restarts": self.restarts,
            "pauses": self.pauses,
            "clock_jumps": self.clock_jumps,
            "clock_jumped_seconds": round(self.clock_jumped_seconds, 1),
            "disk_full_episodes": self.disk_full_episodes,
            "disk_full_skipped": self.disk_full_skipped,
            "restarts_rate_limited": self.restarts_rate_limited,
            "restarts_near_expiry": self.restarts_near_expiry,
            "refresh_near_death": self.refresh_near_death,
            "clock_back_steps": self.clock_back_steps,
            "clock_back_seconds": round(self.clock_back_seconds, 1),
            "clock_back_skipped": self.clock_back_skipped,
            "reads_file": self.reads_file,
            "reads_api": self.reads_api,
            "reads_while_healthy": self.reads_healthy,
            "api_unavailable": self.api_unavailable,
            "torn_reads": self.torn_reads,
            "torn_examples": self.torn_examples[:5],
            "expired_reads_while_healthy": self.expired_healthy,
            "expired_healthy_examples": self.expired_healthy_examples[:5],
            "expired_reads_inside_disruption_windows": self.expired_in_windows,
            "expired_reads_by_window": dict(sorted(self.expired_by_window.items())),
            "losses": [loss.__dict__ for loss in self.losses],
            "unexplained_losses": self.unexplained_losses,
            "relogins": self.relogins,
            "koe237_real": self.koe237_real,
            "tokens_in_logs": self.tokens_in_logs,
            "client_secret_in_logs": self.secret_in_logs,
            "shm_left": self.shm_left,
            "retired_refresh_presented": self.retired_presented,
            "final_exit_code": self.final_exit_code,
            "final_refresh_token": self.final_refresh_status,
            "failures": self.failures(),
        }

    def table(self) -> str:
        """Return the results as the Markdown table docs/soak.md shows."""
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_injected.items()))
        explained = Counter(loss.cause for loss in self.losses)
        rows = [
            ("refresh cycles", f"{self.refresh_cycles} ({self.rotations} rotations)", "reported"),
            ("faults injected", f"{sum(self.faults_injected.values())} ({faults})", "reported"),
            ("restarts (kill -9)", str(self.restarts), "reported"),
            ("SIGSTOP/SIGCONT pauses", str(self.pauses), "reported"),
            (
                "emulator clock jumps",
                f"{self.clock_jumps} ({self.clock_jumped_seconds:.1f} s in total)",
                "reported",
            ),
            (
                "disk-full episodes",
                str(self.disk_full_episodes)
                if self.disk_full_skipped is None
                else f"skipped: {self.disk_full_skipped}",
                "reported",
            ),
            (
                "restarts with a nearly expired access token",
                f"{self.restarts_near_expiry + self.restarts_rate_limited} "
                f"({self.restarts_rate_limited} rate-limited at start)",
                "reported",
            ),
            (
                "faults while the refresh token was nearly dead",
                str(self.refresh_near_death),
                "reported",
            ),
            (
                "daemon clock steps back during back-off",
                f"{self.clock_back_steps} ({self.clock_back_seconds:.1f} s in total)"
                if self.clock_back_skipped is None
                else f"skipped: {self.clock_back_skipped}",
                "reported",
            ),
            (
                "reads",
                f"{self.reads_file + self.reads_api} ({self.reads_file} file, {self.reads_api} "
                f"API; {self.reads_healthy} while healthy; {self.api_unavailable} API calls "
                "refused or timed out while the daemon was down or stopped)",
                "reported",
            ),
            ("torn or unparsable reads", str(self.torn_reads), "0"),
            ("reads of an expired token while healthy", str(self.expired_healthy), "0"),
            (
                "reads of an expired token inside disruption windows",
                f"{self.expired_in_windows} ("
                + ", ".join(f"{k} {v}" for k, v in sorted(self.expired_by_window.items()))
                + ")",
                "reported",
            ),
            (
                "refresh tokens lost, accounted (then re-login)",
                f"{len(self.losses) - self.unexplained_losses} "
                f"({', '.join(f'{k} {v}' for k, v in explained.items()) or 'none'}); "
                f"{self.relogins} re-logins",
                "reported",
            ),
            (
                "refresh tokens lost outside the lost-response case",
                str(self.unexplained_losses),
                "0",
            ),
            ("KOE237 rate-limit answers (not injected)", str(self.koe237_real), "0"),
            ("tokens found in the logs", str(self.tokens_in_logs), "0"),
        ]
        lines = ["| Count | Value | Must be |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        return "\n".join(lines)


class Soak:
    """One soak run: the emulator, the daemon child, readers and the disruption schedule."""

    def __init__(self, emulator: KakaoEmulator, workdir: Path, args: argparse.Namespace) -> None:
        self.emu = emulator
        self.workdir = workdir
        self.args = args
        self.rng = random.Random(args.seed)
        self.report = Report(args.seed, args.minutes, args.lost_response)
        self.windows: list[Window] = []
        self.state_dir = workdir / "state"
        self.runtime_dir = workdir / "run"
        self.config_path = workdir / "config.toml"
        self.proc: asyncio.subprocess.Process | None = None
        self.logs: list[Path] = []
        self.stopping = False
        self.tmpfs = False
        self.session: aiohttp.ClientSession | None = None
        self.kapi_cycle: list[str] = []
        self.token_cycle: list[str] = []
        self.last_jump = -1e9
        self.last_disk_full = -1e9
        self.known_losses: set[str] = set()
        self.t_start = 0.0
        self.t0_mono = time.monotonic()
        self.last_near_death = -1e9
        self.last_clock_back = -1e9
        #: libfaketime's control file: the daemon's wall clock offset (seconds, "-2.5").
        self.faketime_file = workdir / "faketime.rc"
        self.faketime_lib: str | None = None
        #: Every daemon process started (reap_faketime, Report.shm_left).
        self.daemon_pids: list[int] = []
        self.clock_offset = 0.0

    # ------------------------------------------------------------------ setup

    def now(self) -> float:
        """Return the harness timeline: the emulator's (virtual) clock."""
        return self.emu.now()

    def log(self, message: str) -> None:
        """Print a progress line unless --quiet."""
        if not self.args.quiet:
            print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def mount_tmpfs(self) -> None:
        """Put the state directory on a 256 KiB tmpfs so it can be filled (root only)."""
        self.state_dir.mkdir(mode=0o750)
        if self.args.no_disk_full:
            self.report.disk_full_skipped = "disabled with --no-disk-full"
            return
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "tmpfs", str(self.state_dir)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            reason = done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
            self.report.disk_full_skipped = f"cannot mount a tmpfs ({reason})"
            return
        self.tmpfs = True

    def unmount(self) -> None:
        """Undo :meth:`mount_tmpfs`."""
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.state_dir)], check=False)
            self.tmpfs = False

    def write_config(self) -> None:
        """Write the daemon's config: second-long timings against the emulator.

        With ``--defaults`` only the keys a config must have (app key and secret, Kakao's
        addresses, the redirect URI, the paths): every timing is the daemon's own default, as
        an operator who copies the minimal config gets it.
        """
        secret = self.workdir / "client_secret"
        secret.write_text(str(self.emu.settings.client_secret))
        secret.chmod(0o600)
        required = [
            "[paths]",
            f'state_dir = "{self.state_dir}"',
            f'runtime_dir = "{self.runtime_dir}"',
            "[kakao]",
            f'rest_api_key = "{self.emu.settings.client_id}"',
            f'client_secret_file = "{secret}"',
            f'auth_url = "{self.emu.url}"',
            f'api_url = "{self.emu.url}"',
            f'redirect_uri = "{self.emu.settings.redirect_uris[0]}"',
        ]
        if getattr(self.args, "defaults", False):
            self.config_path.write_text("\n".join(required) + "\n")
            return
        self.config_path.write_text(
            "\n".join(
                [
                    'log_level = "debug"',
                    "[paths]",
                    f'state_dir = "{self.state_dir}"',
                    f'runtime_dir = "{self.runtime_dir}"',
                    "[kakao]",
                    f'rest_api_key = "{self.emu.settings.client_id}"',
                    f'client_secret_file = "{secret}"',
                    f'auth_url = "{self.emu.url}"',
                    f'api_url = "{self.emu.url}"',
                    f'redirect_uri = "{self.emu.settings.redirect_uris[0]}"',
                    f'timeout = "{DAEMON_TIMEOUT}s"',
                    'connect_timeout = "1s"',
                    "[refresh]",
                    f"refresh_at = {REFRESH_AT}",
                    f"jitter = {JITTER}",
                    f'heartbeat = "{HEARTBEAT}s"',
                    f'retry_initial = "{RETRY_INITIAL}s"',
                    f'retry_max = "{RETRY_MAX}s"',
                    f'rotation_window = "{ROTATION_WINDOW}s"',
                ]
            )
            + "\n"
        )

    def gap(self) -> float:
        """Return the quiet time before the next disruption (seeded; stretched by --scale)."""
        return GAP_MIN + GAP_SPREAD * self.rng.random()

    def daemon_clock(self) -> datetime:
        """Return the time on the daemon's wall clock (the harness's, less its steps back)."""
        return utcnow() + timedelta(seconds=self.clock_offset)

    async def login(self) -> None:
        """Log in like `kakao-tokend login` (auto consent); the file lock is taken in a thread.

        On the daemon's clock: a real `login` runs on the machine's one clock, the daemon's.
        Stamped with the harness's own, the state's expiries lay as far ahead of the daemon's
        clock as the harness had stepped it back (10.7 s once, a third of a 30 s refresh
        token): the daemon planned its last refresh, and refresh_near_death its faults, that
        much after the refresh token's real death (seed 3, docs/soak.md).
        """
        config = load_config(self.config_path)
        account = config.accounts["default"]
        assert self.session is not None
        client = KakaoClient(self.session, account.app, clock=self.daemon_clock)
        verifier, challenge = new_pkce_pair()
        url = client.authorize_url(state=new_state(), code_challenge=challenge)
        async with self.session.get(url, allow_redirects=False) as response:
            location = response.headers["Location"]
        code = parse_qs(urlsplit(location).query)["code"][0]
        tokens = await client.exchange_code(code=code, code_verifier=verifier)
        me = await client.user_me(tokens.access_token)

        def save() -> None:
            store = AccountStore(account)
            with store.lock(timeout=15):
                try:
                    previous = store.load()
                except Exception:
                    previous = None
                state = AccountState(
                    account="default",
                    tokens=tokens,
                    refreshed_at=tokens.access_issued_at,
                    user_id=me["id"],
                    generation=(previous.generation + 1) if previous else 1,
                )
                store.save(state)
                store.publish(state)

        await asyncio.to_thread(save)

    # ------------------------------------------------------------------ the daemon child

    async def start_daemon(self) -> None:
        """Start `kakao-tokend run` and wait until it says it is running."""
        log_path = self.workdir / f"daemon-{len(self.logs):03d}.log"
        self.logs.append(log_path)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        env.update(self.faketime_env())
        with log_path.open("wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kakao_tokend",
                "--config",
                str(self.config_path),
                "run",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
                cwd=str(self.workdir),
            )
        self.daemon_pids.append(self.proc.pid)
        deadline = time.monotonic() + 30
        while "kakao-tokend running" not in log_path.read_text(errors="replace"):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"the daemon did not start (exit {self.proc.returncode}):\n{tail}"
                )
            await asyncio.sleep(0.05)

    def state_doc(self) -> dict[str, Any] | None:
        """Return the state file (private) as JSON, or None while it cannot be read."""
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "default.state.json").read_text())
        except (OSError, ValueError):
            return None
        return data

    # ------------------------------------------------------------------ the daemon's wall clock

    def reap_faketime(self, pid: int) -> None:
        """Remove what libfaketime keeps in /dev/shm for a daemon killed with SIGKILL: its exit
        handler, which SIGKILL never runs, unlinks them (0.9.10 has no switch to not make
        them); every run left a few more behind."""
        for path in faketime_leftovers(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def faketime_env(self) -> dict[str, str]:
        """Environment that lets the harness step the daemon's wall clock (libfaketime)."""
        if self.faketime_lib is None:
            return {}
        return {
            "LD_PRELOAD": self.faketime_lib,
            "FAKETIME_TIMESTAMP_FILE": str(self.faketime_file),
            # The file is read at most once a second: a step lands within a second.
            "FAKETIME_CACHE_DURATION": "1",
            # Only the wall clock moves; asyncio's monotonic clock must stay true.
            "DONT_FAKE_MONOTONIC": "1",
        }

    def setup_faketime(self) -> None:
        """Find libfaketime and prove it steps a Python child's wall clock, or say why not."""
        if self.args.no_clock_back:
            self.report.clock_back_skipped = "disabled with --no-clock-back"
            return
        candidates = [os.environ.get("KT_SOAK_LIBFAKETIME", "")]
        candidates += [path for pattern in LIBFAKETIME_GLOBS for path in glob.glob(pattern)]
        library = next((c for c in candidates if c and Path(c).is_file()), None)
        if library is None:
            self.report.clock_back_skipped = (
                "libfaketime not found (apt-get install libfaketime, or set KT_SOAK_LIBFAKETIME)"
            )
            return
        self.faketime_lib = library
        self.faketime_file.write_text("-100\n")
        probe = subprocess.run(
            [sys.executable, "-c", "import time; print(time.time())"],
            capture_output=True,
            text=True,
            env={**os.environ, **self.faketime_env()},
            check=False,
            timeout=30,
        )
        self.faketime_file.write_text("+0\n")
        try:
            offset = float(probe.stdout.strip()) - time.time()
        except ValueError:
            offset = 0.0
        if not -102 < offset < -98:
            self.faketime_lib = None
            self.report.clock_back_skipped = f"libfaketime at {library} did not move the clock"

    def step_daemon_clock(self, seconds: float) -> None:
        """Move the daemon's wall clock by ``seconds`` (negative: back), from now on."""
        self.clock_offset += seconds
        self.faketime_file.write_text(f"{self.clock_offset:+.3f}\n")

    # ------------------------------------------------------------------ windows and readers

    def open_window(
        self, reason: str, *, file_only: bool = False, start: float | None = None
    ) -> Window:
        """Start a disruption window now (or at ``start``)."""
        window = Window(self.now() if start is None else start, None, reason, file_only)
        self.windows.append(window)
        return window

    def close_window(self, window: Window, extra: float = GRACE) -> None:
        """End a disruption window ``extra`` seconds from now."""
        window.end = self.now() + extra

    def covering(self, t0: float, t1: float, *, file_reader: bool) -> Window | None:
        """Return a disruption window touching the read's span [t0, t1], if any."""
        for window in self.windows:
            if window.file_only and not file_reader:
                continue
            if window.start <= t1 and (window.end is None or window.end >= t0):
                return window
        return None

    def healthy(self, t0: float, t1: float, *, file_reader: bool) -> bool:
        """Return True when no disruption window touches the read's span [t0, t1]."""
        return self.covering(t0, t1, file_reader=file_reader) is None

    def judge(self, token: Any, t0: float, *, file_reader: bool, what: str) -> None:
        """Count a read: valid token, or expired inside/outside a disruption window."""
        if not isinstance(token, str) or not token:
            self.report.torn_reads += 1
            self.report.torn_examples.append(f"{what}: no access_token")
            return
        valid = self.emu.access_token_valid(token)
        t1 = self.now()
        window = self.covering(t0, t1, file_reader=file_reader)
        self.report.reads_healthy += window is None
        if valid:
            return
        if window is None:
            self.report.expired_healthy += 1
            self.report.expired_healthy_examples.append(
                f"{what} at +{t1 - self.t_start:.2f}s: token {fingerprint(token)} not accepted"
            )
        else:
            self.report.expired_in_windows += 1
            reason = window.reason.split(" (")[0]
            self.report.expired_by_window[f"{what} during {reason}"] += 1

    async def file_reader(self, deadline: float) -> None:
        """Poll the published token file: every read must parse and (when healthy) be valid."""
        path = self.state_dir / "default.token.json"
        while time.monotonic() < deadline and not self.stopping:
            t0 = self.now()
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raw = b""
            self.report.reads_file += 1
            try:
                doc = json.loads(raw)
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.report.torn_reads += 1
                self.report.torn_examples.append(f"file: {len(raw)} bytes unparsable")
            else:
                self.judge(doc.get("access_token"), t0, file_reader=True, what="file")
            await asyncio.sleep(0.03 + self.rng.random() * 0.04)

    async def api_reader(self, deadline: float) -> None:
        """Poll GET /v1/accounts/default/token on the daemon's Unix socket."""
        socket_path = self.runtime_dir / "api.sock"
        timeout = aiohttp.ClientTimeout(total=1.0)
        while time.monotonic() < deadline and not self.stopping:
            t0 = self.now()
            try:
                connector = aiohttp.UnixConnector(path=str(socket_path))
                async with (
                    aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                    session.get("http://localhost/v1/accounts/default/token") as response,
                ):
                    status = response.status
                    raw = await response.read()
            except (aiohttp.ClientError, TimeoutError, OSError):
                self.report.api_unavailable += 1
                await asyncio.sleep(0.1)
                continue
            self.report.reads_api += 1
            try:
                doc = json.loads(raw)
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.report.torn_reads += 1
                self.report.torn_examples.append(f"api: HTTP {status}, {len(raw)} bytes unparsable")
            else:
                if status == 200:
                    self.judge(doc.get("access_token"), t0, file_reader=False, what="api")
                elif self.healthy(t0, self.now(), file_reader=False):
                    self.report.expired_healthy += 1
                    self.report.expired_healthy_examples.append(f"api: HTTP {status} {doc}")
            await asyncio.sleep(0.03 + self.rng.random() * 0.04)

    # ------------------------------------------------------------------ losses

    def classify_loss(self, refresh_token: str) -> str:
        """Say why Kakao no longer accepts the refresh token the daemon has on disk."""
        fp = fingerprint(refresh_token)
        status = self.emu.refresh_token_status(refresh_token)
        if status == "live":
            return "live"
        rotated_at = [
            e.at
            for e in self.emu.stats.refresh_log
            if e.fingerprint == fp and e.outcome == "rotated"
        ]
        if status == "retired" and rotated_at:
            at = rotated_at[-1]
            for window in self.windows:
                if window.reason == "fault token:lost_response" and (
                    window.start <= at and (window.end is None or at <= window.end)
                ):
                    return "lost_response"
                if window.reason == "kill -9" and 0 <= window.start - at <= KILL_WINDOW:
                    return "kill_during_rotation"
        return f"UNEXPLAINED (refresh token {status})"

    def stored_refresh_token(self) -> str | None:
        """Return the refresh token in the state file, or None."""
        doc = self.state_doc()
        token = doc.get("tokens", {}).get("refresh_token") if doc else None
        return token if isinstance(token, str) else None

    async def check_loss(self, *, when: str, settle: float = 1.0) -> None:
        """If the state on disk holds a dead refresh token, account for it and log in again.

        A running daemon writes a rotated token milliseconds after Kakao issued it; a dead token
        that is still on disk ``settle`` seconds later is lost (0 when the daemon is dead).
        """
        token = self.stored_refresh_token()
        if token is None or self.classify_loss(token) == "live":
            return
        if settle:
            await asyncio.sleep(settle)
            if self.stored_refresh_token() != token:
                return
        cause = self.classify_loss(token)
        fp = fingerprint(token)
        if fp not in self.known_losses:
            self.known_losses.add(fp)
            self.report.losses.append(
                Loss(fp, self.emu.refresh_token_status(token), cause, self.now())
            )
            self.log(f"refresh token {fp} is dead ({cause}), found {when}; logging in again")
        rotated = [
            e.at
            for e in self.emu.stats.refresh_log
            if e.fingerprint == fp and e.outcome == "rotated"
        ]
        window = self.open_window(
            f"lost refresh token ({cause})", start=rotated[-1] if rotated else None
        )
        await self.login()
        self.report.relogins += 1
        # The daemon adopts the new state at its next heartbeat; give it that long.
        self.close_window(window, HEARTBEAT + GRACE)

    # ------------------------------------------------------------------ disruptions

    async def wait_fired(self, kind: str, before: int, count: int, timeout: float) -> bool:
        """Wait until the emulator answered with fault ``kind`` ``count`` more times."""
        deadline = time.monotonic() + timeout
        while self.emu.stats.faults_fired[kind] < before + count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def next_kind(self, cycle: list[str], groups: tuple[list[str], ...]) -> str:
        """Draw fault kinds so that every kind comes up once before any repeats."""
        if not cycle:
            for group in reversed(groups):  # popped from the end: the first group comes first
                shuffled = list(group)
                self.rng.shuffle(shuffled)
                cycle.extend(shuffled)
        return cycle.pop()

    async def token_fault(self, kind: str | None = None) -> None:
        """Arm a fault on the token endpoint and keep its window open until it has fired."""
        kind = kind or self.next_kind(self.token_cycle, TOKEN_FAULTS)
        count = 1 if kind in ("timeout", "lost_response") else self.rng.randint(1, 3)
        delay = SLOW_DELAY if kind in DELAYED_KINDS else None
        if kind == "lost_response":
            await self.wait_rotation_due()
        before = self.emu.stats.faults_fired[kind]
        window = self.open_window(f"fault token:{kind}")
        self.emu.inject("token", kind, count=count, delay=delay)
        self.report.faults_injected[f"token:{kind}"] += count
        if kind == "lost_response":
            limit = 20 * ACCESS_LIFETIME / 3
            if not await self.wait_fired(kind, before, count, timeout=limit):
                self.emu.clear_faults()
                self.log(f"fault token:lost_response did not fire in {limit:.0f} s; cleared")
        elif not await self.hold_until_fired(window, kind, before, count):
            return
        if kind == "timeout":
            # The daemon gives up after its timeout and retries; the emulator's late work comes
            # 60 s later (see the module notes), by which time that token is long rotated.
            await asyncio.sleep(DAEMON_TIMEOUT)
        if kind == "lost_response":
            await asyncio.sleep(2 * RECOVERY + DAEMON_TIMEOUT)
            await self.check_loss(when="after lost_response")
        self.close_window(window, RECOVERY + GRACE)

    async def hold_until_fired(
        self, window: Window, kind: str, before: int, count: int, *, after: float = 0.0
    ) -> bool:
        """Keep ``window`` open until fault ``kind`` has fired ``count`` more times, within limits.

        A daemon that keeps its waits relative to the lifetime meets an armed token fault at
        its next refresh (within an access lifetime) and each further one within RECOVERY.
        If it has not by then it is not even trying, and that time is not excused: the window
        ends at that limit (set before waiting, since every read is judged as it happens).
        ``after`` adds what must happen first (a restart). Returns True when all fired.
        """
        limit = after + ACCESS_LIFETIME + count * RECOVERY
        if kind == "timeout":
            limit += DAEMON_TIMEOUT
        window.end = self.now() + limit + GRACE
        if await self.wait_fired(kind, before, count, timeout=limit):
            return True
        self.emu.clear_faults()
        self.log(f"fault token:{kind} did not fire {count}x within {limit:.1f} s; not excused")
        return False

    async def wait_rotation_due(self, timeout: float | None = None) -> None:
        """Wait until the daemon's next refresh will rotate (so a lost answer costs the token).

        The daemon's own view of the refresh token's expiry is never earlier than Kakao's (the
        emulator's clock only jumps forward), so "inside the window by the daemon's clock" means
        Kakao rotates too.
        """
        deadline = time.monotonic() + (timeout or REFRESH_LIFETIME / 2)
        while time.monotonic() < deadline:
            doc = self.state_doc()
            expires = doc.get("tokens", {}).get("refresh_expires_at") if doc else None
            if isinstance(expires, str):
                remaining = (parse_time(expires) - utcnow()).total_seconds()
                if remaining < ROTATION_WINDOW - 0.5:
                    return
            await asyncio.sleep(0.1)

    async def kill_restart(self) -> None:
        """kill -9 at a random moment, check what is on disk, arm a kapi fault, restart."""
        assert self.proc is not None
        window = self.open_window("kill -9")
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.reap_faketime(self.proc.pid)
        self.report.restarts += 1
        await self.check_loss(when="right after kill -9", settle=0)
        await asyncio.sleep(self.rng.random())
        kapi_kind = self.next_kind(self.kapi_cycle, KAPI_FAULTS)
        before = self.emu.stats.faults_fired[kapi_kind]
        self.emu.inject(
            "access_token_info",
            kapi_kind,
            count=1,
            delay=SLOW_DELAY if kapi_kind in DELAYED_KINDS else None,
        )
        self.report.faults_injected[f"access_token_info:{kapi_kind}"] += 1
        await self.start_daemon()
        if not await self.wait_fired(kapi_kind, before, 1, timeout=5):
            self.emu.clear_faults()
        self.close_window(window)

    async def pause(self) -> None:
        """SIGSTOP for longer than the access lifetime, then SIGCONT."""
        assert self.proc is not None
        length = ACCESS_LIFETIME * (1.2 + 0.8 * self.rng.random())
        window = self.open_window("SIGSTOP")
        self.proc.send_signal(signal.SIGSTOP)
        self.report.pauses += 1
        try:
            await asyncio.sleep(length)
        finally:
            self.proc.send_signal(signal.SIGCONT)
        self.close_window(window)

    async def clock_jump(self) -> None:
        """Move Kakao's clock forward; the daemon only notices at its next refresh."""
        seconds = 1.0 + (JUMP_MAX - 1.0) * self.rng.random()
        window = self.open_window("clock jump")
        self.emu.advance_clock(seconds)
        self.report.clock_jumps += 1
        self.report.clock_jumped_seconds += seconds
        self.last_jump = time.monotonic()
        self.close_window(window, ACCESS_LIFETIME * (REFRESH_AT + JITTER) + GRACE)
        if self.args.control == "unaccounted-jumps":
            self.windows.remove(window)  # negative control: the harness must now see failures

    async def disk_full(self) -> None:
        """Fill the state directory's tmpfs for one to two access lifetimes, then free it."""
        self.last_disk_full = time.monotonic()
        window = self.open_window("disk full", file_only=True)
        filler = self.state_dir / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        self.report.disk_full_episodes += 1
        await asyncio.sleep(DISK_FULL_LENGTH * (1 + self.rng.random()))
        filler.unlink()
        # Wait until the daemon has written its newest state (no kill may come before that).
        deadline = time.monotonic() + 70
        while time.monotonic() < deadline:
            status = await self.daemon_status()
            doc = self.state_doc()
            if (
                status is not None
                and doc is not None
                and not status.get("write_pending")
                and doc.get("generation") == status.get("generation")
            ):
                break
            await asyncio.sleep(0.2)
        else:
            self.report.problems.append(
                "the state was not written within 70 s after the disk-full episode"
            )
        self.close_window(window)

    def access_left(self) -> float | None:
        """Seconds the stored access token has left by the emulator's (Kakao's) clock."""
        doc = self.state_doc()
        token = doc.get("tokens", {}).get("access_token") if doc else None
        if not isinstance(token, str) or not self.emu.access_token_valid(token):
            return None if token is None else 0.0
        expires = doc.get("tokens", {}).get("access_expires_at") if doc else None
        if not isinstance(expires, str):
            return None
        # The daemon's expiry is its own clock plus expires_in; undo its clock offset.
        return (parse_time(expires) - utcnow()).total_seconds() - self.clock_offset

    async def restart_near_expiry(self, *, rate_limited: bool) -> None:
        """Freeze the daemon until its access token is nearly dead, kill -9, restart it.

        The start-up refresh is then overdue at once; ``rate_limited`` arms KOE237 for it
        (1-2 answers), otherwise one transient token fault half of the time.
        """
        assert self.proc is not None
        window = self.open_window("restart near expiry")
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + ACCESS_LIFETIME + 1
        while time.monotonic() < deadline:
            left = self.access_left()
            if left is not None and left < NEAR_EXPIRY:
                break
            await asyncio.sleep(0.02)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.send_signal(signal.SIGCONT)
        await self.proc.wait()
        self.reap_faketime(self.proc.pid)
        self.report.restarts += 1
        await self.check_loss(when="right after kill -9 near expiry", settle=0)
        kind: str | None = None
        count = 0
        if rate_limited:
            kind, count = "koe237", self.rng.randint(1, 2)
            self.report.restarts_rate_limited += 1
        else:
            self.report.restarts_near_expiry += 1
            if self.rng.random() < 0.5:
                kind = self.next_kind(self.token_cycle, TOKEN_FAULTS)
                while kind in ("timeout", "lost_response"):
                    kind = self.next_kind(self.token_cycle, TOKEN_FAULTS)
                count = 1
        before = self.emu.stats.faults_fired[kind] if kind else 0
        if kind:
            self.emu.inject(
                "token", kind, count=count, delay=SLOW_DELAY if kind in DELAYED_KINDS else None
            )
            self.report.faults_injected[f"token:{kind}"] += count
        await self.start_daemon()
        # The start-up refresh is overdue: it comes at once, so no lifetime to wait for.
        if kind and not await self.hold_until_fired(
            window, kind, before, count, after=-ACCESS_LIFETIME + 1.0
        ):
            return
        self.close_window(window, RECOVERY + GRACE)

    async def refresh_near_death(self) -> None:
        """Stop rotations until the refresh token has seconds left, then fault its refresh.

        Kakao answers the faults at once, so a daemon that keeps every wait inside the refresh
        token's life always saves it; one that sits out a rate-limit pause loses it (counted
        as a refresh token lost outside the lost-response case).
        """
        self.last_near_death = time.monotonic()
        window_setting = self.emu.settings.rotation_window
        self.emu.settings.rotation_window = 0.0
        try:
            deadline = time.monotonic() + REFRESH_LIFETIME + 5
            while time.monotonic() < deadline:
                left = self.refresh_left()
                if left is not None and left < NEAR_DEATH:
                    break
                await asyncio.sleep(0.1)
            else:
                self.log("refresh_near_death: the refresh token never got near its end")
                return
        finally:
            self.emu.settings.rotation_window = window_setting
        kind = "koe237" if self.rng.random() < 0.6 else self.rng.choice(["http500", "reset"])
        count = self.rng.randint(1, 2)
        before = self.emu.stats.faults_fired[kind]
        window = self.open_window(f"fault token:{kind} near refresh-token death")
        self.emu.inject("token", kind, count=count)
        self.report.faults_injected[f"token:{kind}"] += count
        self.report.refresh_near_death += 1
        if await self.hold_until_fired(window, kind, before, count):
            self.close_window(window, RECOVERY + GRACE)
        # Past the refresh token's end: it was saved by a rotation, or it is dead now.
        await asyncio.sleep(NEAR_DEATH + 1.5)
        await self.check_loss(when="after faults near refresh-token death")

    def refresh_left(self) -> float | None:
        """Seconds the stored refresh token has left (the daemon's view, clock offset undone)."""
        doc = self.state_doc()
        expires = doc.get("tokens", {}).get("refresh_expires_at") if doc else None
        if not isinstance(expires, str):
            return None
        return (parse_time(expires) - utcnow()).total_seconds() - self.clock_offset

    async def clock_back(self) -> None:
        """Rate-limit the refresh (KOE237), then step the daemon's wall clock back mid back-off."""
        self.last_clock_back = time.monotonic()
        count = self.rng.randint(2, 3)
        before = self.emu.stats.faults_fired["koe237"]
        window = self.open_window("clock back during back-off")
        self.emu.inject("token", "koe237", count=count)
        self.report.faults_injected["token:koe237"] += count
        if not await self.hold_until_fired(window, "koe237", before, 1):
            return
        # Back past the moment the current access token was issued (plus the second libfaketime
        # may take to apply it): the daemon can then tell, its token was issued "in the
        # future". A smaller step cannot be seen from the token at all; with a 3 s token it
        # would be hours on a 6 h one, beyond any real clock step.
        left = self.access_left()
        age = ACCESS_LIFETIME - (left if left is not None else 0.0)
        seconds = age + 1.0 + CLOCK_BACK_BEYOND * self.rng.random()
        self.step_daemon_clock(-seconds)
        self.report.clock_back_steps += 1
        self.report.clock_back_seconds += seconds
        # libfaketime re-reads its file within a second: the step lands by then.
        if await self.hold_until_fired(
            window, "koe237", before, count, after=1.0 - ACCESS_LIFETIME
        ):
            self.close_window(window, RECOVERY + GRACE)

    async def daemon_status(self) -> dict[str, Any] | None:
        """Return the default account's /v1/status entry, or None."""
        try:
            connector = aiohttp.UnixConnector(path=str(self.runtime_dir / "api.sock"))
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=2)
                ) as session,
                session.get("http://localhost/v1/status") as response,
            ):
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None
        accounts = body.get("accounts") if isinstance(body, dict) else None
        return accounts[0] if accounts else None

    async def next_disruption(self) -> None:
        """Pick and run one disruption (seeded)."""
        now = time.monotonic()
        choices: list[tuple[str, float]] = [("token_fault", 45), ("kill", 15), ("pause", 12)]
        if now - self.last_jump > JUMP_COOLDOWN:
            choices.append(("jump", 10))
        if (
            self.tmpfs
            and now - self.last_disk_full > DISK_FULL_COOLDOWN
            and now - self.t0_mono > 15
        ):
            choices.append(("disk_full", 30 if self.report.disk_full_episodes == 0 else 8))
        if self.args.lost_response:
            choices.append(("lost_response", 6))
        if not self.args.no_backoff_chaos:
            choices += [("restart_rate_limited", 8), ("restart_near_expiry", 5)]
            if (
                now - self.last_near_death > NEAR_DEATH_COOLDOWN
                and now - self.last_jump > REFRESH_LIFETIME
                and now - self.last_clock_back > REFRESH_LIFETIME
            ):
                # A clock jump shortens the refresh token's life at Kakao but not in the
                # daemon's view, and a step of the daemon's clock leaves an expiry written
                # before it in the old time: only without a recent one of either is "seconds
                # left" the same for both.
                choices.append(("refresh_near_death", 12))
            if self.faketime_lib is not None and now - self.last_clock_back > CLOCK_BACK_COOLDOWN:
                choices.append(("clock_back", 10))
        if self.args.only:
            choices = [c for c in choices if c[0] in self.args.only] or [("pause", 1)]
        names = [c[0] for c in choices]
        pick = self.rng.choices(names, weights=[c[1] for c in choices])[0]
        if self.args.control == "unaccounted-jumps":
            pick = "jump"
        self.log(f"disruption: {pick}")
        if pick == "token_fault":
            await self.token_fault()
        elif pick == "kill":
            await self.kill_restart()
        elif pick == "pause":
            await self.pause()
        elif pick == "jump":
            await self.clock_jump()
        elif pick == "disk_full":
            await self.disk_full()
        elif pick == "restart_rate_limited":
            await self.restart_near_expiry(rate_limited=True)
        elif pick == "restart_near_expiry":
            await self.restart_near_expiry(rate_limited=False)
        elif pick == "refresh_near_death":
            await self.refresh_near_death()
        elif pick == "clock_back":
            await self.clock_back()
        else:
            await self.token_fault("lost_response")

    # ------------------------------------------------------------------ the run

    async def run(self) -> Report:
        """Run the soak for --minutes and return the report."""
        self.mount_tmpfs()
        self.setup_faketime()
        self.write_config()
        self.session = create_session()
        try:
            # Like a restart: until the daemon runs, nobody refreshes the login's token (a slow
            # start-up on a busy machine can outlast a 3-second token).
            start = self.open_window("initial start")
            await self.login()
            await self.start_daemon()
            self.close_window(start)
            self.t_start = self.now()
            self.t0_mono = time.monotonic()
            deadline = self.t0_mono + self.args.minutes * 60
            readers = [
                *(asyncio.create_task(self.file_reader(deadline)) for _ in range(READERS_FILE)),
                *(asyncio.create_task(self.api_reader(deadline)) for _ in range(READERS_API)),
            ]
            try:
                while time.monotonic() < deadline - 8:
                    await asyncio.sleep(self.gap())
                    if time.monotonic() >= deadline - 8:
                        break
                    await self.next_disruption()
                    await self.check_loss(when="between disruptions")
                    if self.proc is not None and self.proc.returncode is not None:
                        self.report.problems.append(
                            f"the daemon exited by itself ({self.proc.returncode})"
                        )
                        await self.start_daemon()
                # The last seconds are quiet: everything must be fresh again.
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            finally:
                self.stopping = True
                await asyncio.gather(*readers, return_exceptions=True)
            await self.finish()
        finally:
            await self.shutdown()
        return self.report

    async def finish(self) -> None:
        """Stop the daemon gracefully and collect the end-of-run counts."""
        assert self.proc is not None
        self.emu.clear_faults()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.report.final_exit_code = await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            self.report.final_exit_code = await self.proc.wait()
            self.reap_faketime(self.proc.pid)
        self.report.shm_left = sum(len(faketime_leftovers(pid)) for pid in self.daemon_pids)
        doc = self.state_doc()
        token = doc.get("tokens", {}).get("refresh_token") if doc else None
        self.report.final_refresh_status = (
            self.emu.refresh_token_status(token) if isinstance(token, str) else "missing"
        )
        stats = self.emu.stats
        self.report.refresh_cycles = stats.refreshes_ok
        self.report.rotations = stats.rotations
        self.report.retired_presented = stats.retired_refresh_presented
        self.report.koe237_real = stats.koe237 - stats.faults_fired["koe237"]
        issued = self.emu.issued_tokens()
        secret = str(self.emu.settings.client_secret)
        for path in self.logs:
            text = path.read_text(errors="replace")
            self.report.tokens_in_logs += sum(1 for token in issued if token in text)
            self.report.secret_in_logs |= secret in text

    async def shutdown(self) -> None:
        """Kill a leftover child, close the session, unmount."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            await self.proc.wait()
            self.reap_faketime(self.proc.pid)
        if self.session is not None:
            await self.session.close()
        self.unmount()


async def soak(args: argparse.Namespace) -> Report:
    """Run one soak with the emulator in this process."""
    settings = EmulatorSettings(
        access_lifetime=ACCESS_LIFETIME,
        refresh_lifetime=REFRESH_LIFETIME,
        rotation_window=ROTATION_WINDOW,
        access_rate=(1_000_000, 600),
        refresh_rate=(1_000_000, 3600),
        seed=args.seed,
    )
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kakao-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        async with running_emulator(settings) as emulator:
            return await Soak(emulator, workdir, args).run()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


#: The harness's time constants that --scale multiplies (GRACE and KILL_WINDOW are how long the
#: machine takes to do things, not shares of a token's life, so they stay).
_SCALED = (
    "ACCESS_LIFETIME",
    "REFRESH_LIFETIME",
    "ROTATION_WINDOW",
    "HEARTBEAT",
    "RECOVERY",
    "DAEMON_TIMEOUT",
    "NEAR_DEATH",
    "NEAR_DEATH_COOLDOWN",
    "NEAR_EXPIRY",
    "CLOCK_BACK_BEYOND",
    "CLOCK_BACK_COOLDOWN",
    "JUMP_MAX",
    "JUMP_COOLDOWN",
    "DISK_FULL_COOLDOWN",
    "DISK_FULL_LENGTH",
    "SLOW_DELAY",
    "GAP_MIN",
    "GAP_SPREAD",
)


def apply_scale(factor: float) -> None:
    """Stretch every token lifetime and every wait of the schedule by ``factor``."""
    for name in _SCALED:
        globals()[name] = globals()[name] * factor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the schedule")
    parser.add_argument(
        "--lost-response",
        action="store_true",
        help="also inject lost_response (Kakao rotates, the answer never arrives); each loss it "
        "causes is accounted for and followed by a re-login",
    )
    parser.add_argument("--no-disk-full", action="store_true", help="skip the disk-full episode")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="give the daemon a config with only the required keys: every timing at its default",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the token lifetimes (3 s access, 30 s refresh) and the schedule's waits",
    )
    parser.add_argument(
        "--no-backoff-chaos",
        action="store_true",
        help="skip the chaos aimed at the rate-limit back-off (restarts near expiry, faults "
        "near refresh-token death, clock steps back)",
    )
    parser.add_argument(
        "--no-clock-back", action="store_true", help="never step the daemon's clock back"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=DISRUPTIONS,
        help="only this disruption (repeatable; when none is possible at that moment, a pause)",
    )
    parser.add_argument("--json", type=Path, help="also write the counts as JSON to this file")
    parser.add_argument("--workdir", help="use this directory (kept) instead of a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--control",
        choices=["unaccounted-jumps"],
        help="negative control: only clock jumps, without their disruption windows; the run "
        "must then FAIL (proves the freshness check is not blind)",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0.25:
        parser.error("--minutes must be more than 0.25 (the last 8 s are kept quiet)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print the table, exit 1 when a must-be-0 count is not 0."""
    args = parse_args(argv)
    apply_scale(args.scale)
    report = asyncio.run(soak(args))
    print(report.table())
    failures = report.failures()
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if failures:
        print("SOAK FAILED: " + "; ".join(failures))
        for example in report.expired_healthy_examples[:5] + report.torn_examples[:5]:
            print("  " + example)
        return 1
    print("soak passed: every must-be-0 count is 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
