"""`demo` and `emulator`: no false alarms, and configs that fit the emulator."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from daemonproc import free_port, start_daemon
from kakao_tokend.config import config_from_toml_text, load_config
from kakao_tokend.demo import auto_login, emulator_config
from kakao_tokend.emulator import EmulatorSettings
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.store import AccountStore

ALARM = re.compile(r"\b(CRITICAL|WARNING|ERROR)\b")


@pytest.mark.slow(seconds=65)
@pytest.mark.timeout(150)
def test_a_60s_demo_shows_no_alarm_except_the_labelled_demonstration(tmp_path: Path) -> None:
    """`demo --duration 60s` (the real process, as the README tells a newcomer to run it)
    prints no CRITICAL, WARNING or ERROR line except exactly one alert that is labelled as a
    demonstration, and still shows refreshes and at least one rotation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAKAO_TOKEND", "JOURNAL"))}
    done = subprocess.run(
        [sys.executable, "-m", "kakao_tokend", "demo", "--duration", "60s"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    alarms = [line for line in output.splitlines() if ALARM.search(line)]
    assert len(alarms) == 1, "\n".join(alarms)
    assert "DEMONSTRATION" in alarms[0] and "nothing is wrong" in alarms[0], alarms[0]
    # It shows the real thing: the exact fix (with the demo's own config file).
    assert re.search(r"`kakao-tokend --config \S+/config\.toml login`", alarms[0]), alarms[0]
    summary = re.search(r"demo over: (\d+) refreshes, (\d+) rotations", output)
    assert summary is not None, output
    assert int(summary.group(1)) >= 5 and int(summary.group(2)) >= 1, output
    assert "↻ rotation" in output


@pytest.mark.parametrize(
    ("access", "refresh", "window"),
    [(8.0, 40.0, 20.0), (60.0, 600.0, 300.0), (21599.0, 5183999.0, 30 * 86400.0)],
)
def test_the_printed_config_scales_alerts_and_rotation_to_the_emulator(
    access: float, refresh: float, window: float
) -> None:
    """The config printed for an emulator has its rotation window, and expiry alerts that
    can only fire once a rotation is really overdue (below the window minus one access
    lifetime) — the real defaults for Kakao's real lifetimes."""
    settings = EmulatorSettings(
        access_lifetime=access, refresh_lifetime=refresh, rotation_window=window
    )
    text = emulator_config(settings, "http://127.0.0.1:8790")
    config = config_from_toml_text(
        text, environ={"STATE_DIRECTORY": "/s", "RUNTIME_DIRECTORY": "/r"}
    )
    assert config.refresh.rotation_window == window
    alerts = config.account().alerts
    assert alerts.thresholds and max(alerts.thresholds) < window - access
    assert alerts.critical_below < max(alerts.thresholds)
    assert config.account().app.auth_url == "http://127.0.0.1:8790"
    if refresh > 86400 * 59:
        assert alerts.thresholds == (14 * 86400.0, 7 * 86400.0, 3 * 86400.0, 86400.0)


@pytest.mark.parametrize("access", [2.0, 6.0, 60.0, 21599.0])
def test_the_printed_config_leaves_request_timeouts_and_retries_to_the_lifetime_rules(
    access: float,
) -> None:
    """The printed config sets no timeout, heartbeat or retry of its own: values in a config
    count as set by hand and are used as written, so a 6-second token got a 3.75-second wait
    (one hung request let it expire and paged), where the lifetime rules give 0.29 s. The
    printed config's waits are exactly those of a config that leaves them out."""
    settings = EmulatorSettings(
        access_lifetime=access, refresh_lifetime=access * 20, rotation_window=access * 10
    )
    environ = {"STATE_DIRECTORY": "/s", "RUNTIME_DIRECTORY": "/r"}
    printed = config_from_toml_text(
        emulator_config(settings, "http://127.0.0.1:8790"), environ=environ
    )
    plain = config_from_toml_text(
        f'[kakao]\nrest_api_key = "{settings.client_id}"\n'
        'auth_url = "http://127.0.0.1:8790"\napi_url = "http://127.0.0.1:8790"\n',
        environ=environ,
    )
    life = timedelta(seconds=access)
    for config in (printed, plain):
        assert config.account().app.request_timeouts(config.refresh, life, access * 20) == (
            plain.account().app.request_timeouts(plain.refresh, life, access * 20)
        )
    assert printed.account().app.request_timeouts(printed.refresh, life, access * 20)[0] < (
        access * 0.05
    )
    assert (
        printed.refresh.heartbeat,
        printed.refresh.retry_initial,
        printed.refresh.retry_max,
    ) == (
        plain.refresh.heartbeat,
        plain.refresh.retry_initial,
        plain.refresh.retry_max,
    )


@pytest.mark.timeout(60)
@pytest.mark.slow(seconds=10)
async def test_the_emulator_command_prints_a_config_that_runs_without_false_alarms(
    tmp_path: Path,
) -> None:
    """`kakao-tokend emulator` with short tokens prints a config; a daemon run with exactly
    that config (plus paths) through several refreshes and a rotation logs no warning."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kakao_tokend",
        "emulator",
        "--port",
        str(port),
        "--access-lifetime",
        "2s",
        "--refresh-lifetime",
        "12s",
        "--rotation-window",
        "6s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        printed: list[str] = []
        async with asyncio.timeout(20):
            while not printed or printed[-1].strip() != "# end of config":
                line = (await proc.stdout.readline()).decode()
                assert line, "".join(printed)
                printed.append(line)
        text = "".join(printed)
        assert f"http://127.0.0.1:{port}" in text
        start = next(i for i, line in enumerate(printed) if line.startswith("# kakao-tokend"))
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            f'log_level = "debug"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
            f'runtime_dir = "{tmp_path / "run"}"\n' + "".join(printed[start:])
        )
        config_path.chmod(0o600)
        await log_in(config_path)
        daemon = await start_daemon(config_path)
        try:
            await daemon.wait_for(
                lambda: len(daemon.state()["rotations"]) >= 1, timeout=20, what="a rotation"
            )
            await asyncio.sleep(3)
        finally:
            assert await daemon.stop() == 0
        log = daemon.log_text()
        assert "refresh token rotated" in log or "rotated=yes" in log, log
        warnings = [line for line in log.splitlines() if ALARM.search(line)]
        assert warnings == [], "\n".join(warnings)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)


async def log_in(config_path: Path) -> None:
    """Log the default account in against whatever emulator the config names."""
    account = load_config(config_path).account()
    async with create_session() as session:
        state = await auto_login(KakaoClient(session, account.app), session)
    store = AccountStore(account)
    with store.lock():
        store.save(state)
        store.publish(state)
