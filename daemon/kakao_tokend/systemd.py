"""systemd integration by hand: sd_notify, the watchdog loop, the unit we run as (logs: logs.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .logs import setup_logging, stderr_is_journal
from .supervisor import Supervisor, unit_from_cgroup

__all__ = [
    "extend_timeout",
    "monotonic_usec",
    "notify",
    "ready",
    "reloading",
    "setup_logging",
    "status",
    "stderr_is_journal",
    "stopping",
    "supervisor",
    "watchdog_interval",
    "watchdog_loop",
]

log = logging.getLogger(__name__)

# The protocol (sd_notify(3)) is one AF_UNIX datagram of newline-separated KEY=VALUE lines sent to
# $NOTIFY_SOCKET; a leading "@" names a socket in the abstract namespace. systemd documents the
# protocol, not libsystemd, as the interface, so no library is needed: the `sdnotify` package
# (last released 2017) hides every failure behind a bare except, and systemd-python needs a C
# compiler and libsystemd's headers.

_warned = False


def _warn_once(message: str, *args: object) -> None:
    """Log a notify problem once per process: it repeats on every ping and would flood the log."""
    global _warned
    if not _warned:
        _warned = True
        log.warning(message, *args)


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``) to systemd; ``False`` when not running under systemd.

    Never raises: a failure is logged as a warning once per process and reported as ``False``.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        # e.g. "vsock:..." (newer systemd inside VMs): not something this daemon is run under.
        _warn_once(
            "NOTIFY_SOCKET=%r is not a Unix socket path; systemd notifications are off", address
        )
        return False
    try:
        payload = "\n".join(lines).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait: a receiver that does not read (its queue holds 10 datagrams by
            # default) blocked the send, and with it the daemon's whole event loop.
            sock.setblocking(False)
            sock.connect(target)
            sock.sendall(payload)
    except (OSError, ValueError) as exc:
        _warn_once("cannot notify systemd via NOTIFY_SOCKET=%s: %s", address, exc)
        return False
    return True


def _one_line(text: str) -> str:
    """STATUS= is a single line: a newline would start a new (bogus) assignment."""
    return " ".join(text.split())


def supervisor(
    environ: Mapping[str, str] | None = None,
    *,
    cgroup: Path = Path("/proc/self/cgroup"),
    fd: int = 2,
) -> Supervisor:
    """Return how this process runs: the unit (systemd sets ``INVOCATION_ID`` for a service
    only; the cgroup names the unit and its manager), and the file its log goes to when
    ``fd`` (stderr) is a regular file rather than the journal. Never raises."""
    env = os.environ if environ is None else environ
    found = None
    if env.get("INVOCATION_ID"):
        try:
            found = unit_from_cgroup(cgroup.read_text())
        except (OSError, UnicodeDecodeError):
            found = None
    log_file = None if stderr_is_journal(env, fd=fd) else _regular_file(fd)
    if found is None:
        return Supervisor(None, log_file=log_file)
    manager, unit = found
    return Supervisor(manager, unit, log_file=log_file)


def _regular_file(fd: int) -> str | None:
    """Return the path of the regular file open as ``fd``, or None (a terminal, a pipe)."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC=`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def ready(status_text: str | None = None) -> bool:
    """Tell systemd that startup (or a reload) is complete: state loaded, sockets listening."""
    lines = ["READY=1"]
    if status_text is not None:
        lines.append("STATUS=" + _one_line(status_text))
    return notify(*lines)


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return notify("STATUS=" + _one_line(text))


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd that a graceful shutdown has begun."""
    lines = ["STOPPING=1"]
    if status_text is not None:
        lines.append("STATUS=" + _one_line(status_text))
    return notify(*lines)


def reloading(status_text: str | None = None) -> bool:
    """Tell systemd a reload has begun; send :func:`ready` when it is done.

    ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd >= 253) and ignored by 252.
    """
    lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
    if status_text is not None:
        lines.append("STATUS=" + _one_line(status_text))
    return notify(*lines)


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start/stop timeout fires (``EXTEND_TIMEOUT_USEC``)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or ``None`` if disabled.

    The watchdog is ours only if ``WATCHDOG_PID`` is unset or names this process (a child that
    inherited the environment must not ping on the parent's behalf), as in sd_watchdog_enabled(3).
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(is_healthy: Callable[[], bool]) -> None:
    """Ping the systemd watchdog from the event loop while ``is_healthy()`` says so.

    Returns at once when the watchdog is not enabled; otherwise runs until cancelled. Because the
    pings come from this task, a blocked event loop stops them, and ``is_healthy`` (e.g. "the
    scheduler heartbeat ran recently") lets a stuck-but-not-blocked daemon stop them too; systemd
    then kills it with SIGABRT (faulthandler prints the stack) and restarts it.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    log.debug("watchdog enabled: pinging every %.1f s", interval)
    healthy = True
    while True:
        try:
            now_healthy = is_healthy()
        except Exception:
            log.exception("watchdog health check raised; treating the daemon as unhealthy")
            now_healthy = False
        if now_healthy:
            if not healthy:
                log.warning("daemon healthy again; resuming watchdog pings")
            notify("WATCHDOG=1")
        elif healthy:
            log.error("daemon unhealthy; withholding watchdog pings so systemd restarts it")
        healthy = now_healthy
        await asyncio.sleep(interval)
