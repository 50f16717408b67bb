"""sd_notify, watchdog and unit-file checks against real sockets and the real systemd-analyze."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kakao_tokend import systemd

REPO = Path(__file__).resolve().parent.parent
CHECK_UNITS = REPO / ".ci" / "check-units"


class NotifyListener:
    """The receiving end of $NOTIFY_SOCKET, like systemd's /run/systemd/notify."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self, timeout: float = 2.0) -> list[str]:
        """One datagram, split into its lines."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().split("\n")

    def pending(self) -> list[list[str]]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may run under systemd themselves: start from an environment without its variables."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(systemd, "_warned", False)


@pytest.fixture
def fs_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """A filesystem AF_UNIX datagram socket (short path: sun_path is limited to 108 bytes)."""
    with (
        tempfile.TemporaryDirectory(prefix="kt-") as tmp,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(tmp, "notify")
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield NotifyListener(sock)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """An abstract-namespace socket, which systemd advertises as '@name'."""
    name = f"kakao-tokend-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield NotifyListener(sock)


def test_ready_with_status_reaches_a_filesystem_socket(fs_listener: NotifyListener) -> None:
    """READY=1 and STATUS= travel together in one datagram to a path socket."""
    assert systemd.ready("serving 1 account") is True
    assert fs_listener.receive() == ["READY=1", "STATUS=serving 1 account"]


def test_notify_reaches_an_abstract_socket(abstract_listener: NotifyListener) -> None:
    """A leading '@' in NOTIFY_SOCKET is the abstract namespace (a NUL byte on the wire)."""
    assert systemd.notify("READY=1") is True
    assert abstract_listener.receive() == ["READY=1"]


def test_status_is_flattened_to_one_line(fs_listener: NotifyListener) -> None:
    """A newline in a status would start a bogus KEY=VALUE assignment, so it becomes a space."""
    assert systemd.status("refresh failing:\nKOE322\n re-login needed")
    assert fs_listener.receive() == ["STATUS=refresh failing: KOE322 re-login needed"]


def test_stopping_and_watchdog_messages(fs_listener: NotifyListener) -> None:
    """STOPPING=1 (with an optional status) and a raw WATCHDOG=1 are sent as given."""
    assert systemd.stopping("shutting down")
    assert fs_listener.receive() == ["STOPPING=1", "STATUS=shutting down"]
    assert systemd.notify("WATCHDOG=1")
    assert fs_listener.receive() == ["WATCHDOG=1"]


def test_reloading_carries_monotonic_usec(fs_listener: NotifyListener) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC=<CLOCK_MONOTONIC now>, as notify-reload requires."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading("reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = fs_listener.receive()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2] == "STATUS=reloading config"


def test_extend_timeout_in_microseconds(fs_listener: NotifyListener) -> None:
    """EXTEND_TIMEOUT_USEC is the requested extension in microseconds."""
    assert systemd.extend_timeout(1.5)
    assert fs_listener.receive() == ["EXTEND_TIMEOUT_USEC=1500000"]


def test_notify_without_notify_socket_is_a_quiet_no_op(caplog: pytest.LogCaptureFixture) -> None:
    """Outside systemd every helper returns False and logs nothing."""
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.reloading() is False
    assert caplog.records == []


def test_notify_failure_never_raises_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead notify socket yields False and one warning, not an exception or a warning flood."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="kakao_tokend.systemd"):
        assert systemd.notify("WATCHDOG=1") is False
        assert systemd.notify("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens" in warnings[0].getMessage()


def test_notify_to_a_receiver_that_does_not_read_never_blocks(
    fs_listener: NotifyListener,
) -> None:
    """A receiver whose queue is full (it stopped reading: 10 datagrams by default) makes a
    notification fail, not wait: the send blocked the daemon's event loop for as long as
    nobody read (a fleet node waiting for its database sends a STATUS= at every attempt)."""
    results: list[bool] = []
    sender = threading.Thread(
        target=lambda: results.extend(systemd.status(f"attempt {i}") for i in range(100)),
        daemon=True,
    )
    sender.start()
    sender.join(5.0)
    assert not sender.is_alive(), "a notification blocked on the full queue"
    assert results[0] is True and results[-1] is False
    assert len(fs_listener.pending()) < 100


def test_unsupported_notify_address_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-Unix address (vsock:, used by newer systemd in VMs) is reported as not sent."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "parent", None),
        ("soon", None, None),
        ("0", None, None),
        ("30000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """Half of WATCHDOG_USEC, but only if WATCHDOG_PID is unset or this process; else None."""
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "parent":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval() == expected


async def test_watchdog_loop_returns_when_watchdog_disabled() -> None:
    """Without WATCHDOG_USEC there is nothing to ping: the loop ends at once."""
    await asyncio.wait_for(systemd.watchdog_loop(lambda: True), timeout=1)


async def test_watchdog_loop_pings_at_half_interval_only_while_healthy(
    fs_listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCHDOG=1 about every WATCHDOG_USEC/2 while healthy; none while unhealthy; resumes."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s -> ping every 0.1 s
    healthy = True
    task = asyncio.create_task(systemd.watchdog_loop(lambda: healthy))
    try:
        await asyncio.sleep(0.55)
        pings = fs_listener.pending()
        assert all(p == ["WATCHDOG=1"] for p in pings)
        # 0 s, 0.1, ..., 0.5: six on an idle machine; a busy one may lose one or two, never gain
        assert 4 <= len(pings) <= 7, pings

        healthy = False
        await asyncio.sleep(0.15)  # let a ping that was already due go out
        fs_listener.pending()
        await asyncio.sleep(0.35)
        assert fs_listener.pending() == []

        healthy = True
        await asyncio.sleep(0.25)
        assert len(fs_listener.pending()) >= 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_treats_a_failing_health_check_as_unhealthy(
    fs_listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A health check that raises stops the pings but does not kill the watchdog task."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")

    def broken() -> bool:
        raise RuntimeError("heartbeat state unreadable")

    task = asyncio.create_task(systemd.watchdog_loop(broken))
    try:
        await asyncio.sleep(0.2)
        assert not task.done()
        assert fs_listener.pending() == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- unit files ----------------------------------------------------------------------------------

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@needs_analyze
def test_shipped_units_pass_check_units() -> None:
    """All shipped units verify without a single warning and the system units score <= 1.5
    (the exposure docs/security.md promises)."""
    result = subprocess.run(
        [str(CHECK_UNITS)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   verify   system/kakao-tokend.service" in result.stdout
    assert "ok   security system/kakao-tokend.service" in result.stdout
    assert "ok   security system/kakao-tokend@.service" in result.stdout
    assert result.stdout.count("(limit 1.5)") == 2
    assert "ok   verify   user/kakao-tokend.service" in result.stdout
    assert "ok   sysusers kakao-tokend.sysusers.conf" in result.stdout


@needs_analyze
def test_check_units_fails_on_warnings_and_weak_sandboxing(tmp_path: Path) -> None:
    """An unknown key (verify exits 0 but warns) and a 9.6 exposure both fail the gate."""
    unit = tmp_path / "sloppy.service"
    unit.write_text("[Service]\nType=notify\nExecStart=/opt/nowhere/bin/x run\nFooBar=1\n")
    result = subprocess.run(
        [str(CHECK_UNITS), str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "FAIL verify   system/sloppy.service" in result.stdout
    assert "Unknown key 'FooBar'" in result.stdout
    assert "FAIL security system/sloppy.service: exposure 9.6 > 1.5" in result.stdout
    # the missing ExecStart binary was rewritten, so it is not what failed verify
    assert "is not executable" not in result.stdout


def test_check_units_skips_cleanly_without_systemd_analyze(tmp_path: Path) -> None:
    """Where systemd-analyze is missing the check says so and passes instead of crashing."""
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, str(CHECK_UNITS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": str(tmp_path)},
    )
    assert result.returncode == 0
    assert "skipped: systemd-analyze not available" in result.stdout


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys are kept."""
    section = ""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def test_system_unit_has_the_operational_contract() -> None:
    """The settings the daemon relies on: notify + watchdog, no restart on 78, static user, 0027."""
    settings = unit_settings(REPO / "systemd" / "kakao-tokend.service")
    service = {key: value for section, key, value in settings if section == "Service"}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "User": "kakao-tokend",
        "Group": "kakao-tokend",
        "StateDirectoryMode": "0750",
        "UMask": "0027",
        "SyslogIdentifier": "kakao-tokend",
        "ExecStart": "/opt/kakao-tokend/bin/kakao-tokend run",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert "DynamicUser" not in service
    credentials = [v for s, k, v in settings if k == "LoadCredential"]
    assert [c.split(":")[0] for c in credentials] == ["rest_api_key", "client_secret"]


def test_template_unit_differs_from_the_system_unit_only_per_instance() -> None:
    """kakao-tokend@.service keeps the same sandbox; only the instance-specific lines differ."""
    main = unit_settings(REPO / "systemd" / "kakao-tokend.service")
    template = unit_settings(REPO / "systemd" / "kakao-tokend@.service")
    per_instance = {
        "Description",
        "ExecStart",
        "ExecReload",
        "SyslogIdentifier",
        "StateDirectory",
        "RuntimeDirectory",
    }
    assert [s for s in main if s[1] not in per_instance] == [
        s for s in template if s[1] not in per_instance
    ]
    assert ("Service", "ExecStart", "/opt/kakao-tokend/bin/kakao-tokend --account %i run") in (
        template
    )
    # `run` holds an instance lock per state directory, so instances cannot share one
    assert ("Service", "StateDirectory", "kakao-tokend/%i") in template
    assert ("Service", "RuntimeDirectory", "kakao-tokend/%i") in template
