"""Stopping: no new refresh after SIGTERM, systemd's stop timeout extended while one finishes,
and the shipped units' TimeoutStopSec covering the daemon's own stop budget."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from daemonproc import (
    REPO,
    NotifyReceiver,
    config_with,
    login,
    no_verify_on_start,
    start_daemon,
    write_config,
)
from kakao_tokend import daemon as daemon_module
from kakao_tokend import service
from kakao_tokend.config import KakaoApp, load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.refresher import FILE_LOCK_WAIT
from kakao_tokend.store import AccountStore
from served import serving

UNITS = sorted((REPO / "systemd").glob("**/*.service"))


def _seconds(text: str) -> float:
    """Parse a systemd time span as the units write it ("45s", "1min 30s", "2min", "90")."""
    total = 0.0
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip()):
        total += float(number) * units[unit]
    return total


def _stop_timeout(unit: Path) -> float:
    values = [
        line.partition("=")[2]
        for line in unit.read_text().splitlines()
        if line.startswith("TimeoutStopSec=")
    ]
    assert len(values) == 1, f"{unit.name}: expected one TimeoutStopSec= line, found {values}"
    return _seconds(values[0])


def test_every_unit_gives_the_daemon_its_whole_stop_budget() -> None:
    """TimeoutStopSec of the system, template and user unit covers the daemon's stop budget.

    The budget comes from the code (service.stop_budget with the default Kakao timeout), so a
    longer grace in the code fails this test until the units follow. It also covers the wait
    for an in-flight refresh alone (Kakao timeout + 1 s), which the units once cut short.
    """
    assert len(UNITS) == 3, UNITS
    default_timeout = KakaoApp(rest_api_key="x", client_secret=None).timeout
    refresh_grace = max(service.STOP_GRACE, default_timeout + 1.0)
    for unit in UNITS:
        assert _stop_timeout(unit) > refresh_grace, f"{unit.name}: not above the refresh grace"
    budget = service.stop_budget([default_timeout])
    assert budget >= refresh_grace
    for unit in UNITS:
        timeout = _stop_timeout(unit)
        assert timeout >= budget, f"{unit.name}: TimeoutStopSec {timeout}s < stop budget {budget}s"


def test_a_fleet_nodes_stop_waits_for_a_commit_after_kakaos_last_answer(tmp_path: Path) -> None:
    """In fleet mode a refresh that Kakao answers at the end of its timeout then commits,
    and on a silent database that commit gives up only after one store deadline (and the
    backstop's share): only then are the tokens in the rescue file. The stop waits that long
    for an in-flight refresh (else the process could end with a rotated refresh token in
    memory only), and the units' TimeoutStopSec still covers the whole fleet stop budget with
    the default timeouts: that wait plus the node's row, the alert bookkeeping and the pool.
    """
    from fleetkit import node_store, write_store_config
    from kakao_tokend.fleet.db import DEADLINE_BACKSTOP_SHARE

    config = load_config(write_store_config(tmp_path, "postgresql://127.0.0.1:1/none"))
    fleet = node_store(config, "postgresql://127.0.0.1:1/none", "web-1")
    timeout = config.account().app.timeout
    waits = service.store_waits(fleet)
    assert waits.commit >= fleet.deadline * (1 + DEADLINE_BACKSTOP_SHARE)
    grace = service.refresh_grace([timeout], store_commit=waits.commit)
    assert grace >= FILE_LOCK_WAIT + timeout + waits.commit
    assert grace > service.refresh_grace([timeout])  # the file store has no commit to wait for
    budget = service.stop_budget([timeout], store=waits)
    assert budget >= service.API_SHUTDOWN_TIMEOUT + grace + waits.stop
    for unit in UNITS:
        assert _stop_timeout(unit) >= budget, f"{unit.name}: below the fleet stop budget {budget}s"


async def test_no_refresh_starts_after_sigterm_while_api_requests_drain(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """After SIGTERM the scheduler starts nothing, even while a slow API request still drains.

    A proxied request that Kakao answers only after 4 s keeps the HTTP side of the stop busy;
    the 10-second token falls due (75 % ± 5 %) in the middle of that time, while the token the
    request carries stays valid. Kakao must see no refresh grant that arrived after the signal.
    """
    emulator.settings.access_lifetime = 10
    config = write_config(tmp_path, emulator)
    state = await login(emulator, config)
    daemon = await start_daemon(config)
    issued = state.tokens.access_issued_at.timestamp()
    await asyncio.sleep(max(0.0, issued + 5.0 - time.time()))
    assert emulator.stats.refreshes_ok == 0
    emulator.inject("user_me", "slow", count=1, delay=4.0)
    connector = aiohttp.UnixConnector(path=str(daemon.runtime_dir / "api.sock"))
    async with aiohttp.ClientSession(connector=connector) as session:
        slow = asyncio.create_task(session.get("http://localhost/kapi/v2/user/me"))
        await daemon.wait_for(lambda: emulator.stats.faults_fired["slow"] == 1, what="slow call")
        stopped_at = emulator.now()
        daemon.send(signal.SIGTERM)
        code = await asyncio.wait_for(daemon.proc.wait(), 30)
        response = await slow
        response.release()
    assert code == 0, daemon.log_text()[-3000:]
    assert response.status == 200
    late = [e for e in emulator.stats.refresh_log if e.at > stopped_at + 0.05]
    assert late == [], f"refreshes started after SIGTERM: {late}"


async def test_stop_extends_the_systemd_timeout_while_a_refresh_is_in_flight(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """SIGTERM during a slow refresh sends EXTEND_TIMEOUT_USEC until the answer is saved.

    systemd would otherwise kill the process at TimeoutStopSec, and a rotated refresh token
    that Kakao already issued would die with it.
    """
    emulator.settings.access_lifetime = 3
    config = write_config(tmp_path, emulator, timeout="6s")
    await login(emulator, config)
    emulator.inject("token", "slow", count=1, delay=3.0)
    with NotifyReceiver() as notify:
        daemon = await start_daemon(config, env=notify.env)
        await daemon.wait_for(
            lambda: emulator.stats.faults_fired["slow"] == 1, timeout=10, what="refresh in flight"
        )
        daemon.send(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(daemon.proc.wait(), 30)
        except TimeoutError:
            raise AssertionError(
                f"no exit 30 s after SIGTERM; notify: {notify.drain()}; "
                f"log:\n{daemon.log_text()[-4000:]}"
            ) from None
        messages = notify.drain()
    assert code == 0
    text = "\n".join(messages)
    assert "STOPPING=1" in text
    extensions = [int(v) for v in re.findall(r"EXTEND_TIMEOUT_USEC=(\d+)", text)]
    assert extensions, f"no EXTEND_TIMEOUT_USEC among {messages}"
    assert text.index("STOPPING=1") < text.index("EXTEND_TIMEOUT_USEC=")
    # Each extension covers at least the time until the next one (sent every few seconds).
    assert min(extensions) >= 2 * daemon_module.EXTEND_EVERY * 1_000_000
    # The slow answer was saved before the process exited.
    assert daemon.state()["generation"] == 2


async def test_a_stop_that_takes_long_says_in_the_log_what_it_waits_for(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A stop still under way after REPORT_STOP_EVERY names its step and the await it is in.

    An operator whose `systemctl stop` takes long (or a test whose daemon did not exit)
    learns from the journal which of the stop's deadlines is running out.
    """
    emulator.settings.access_lifetime = 3
    config = write_config(tmp_path, emulator, timeout="9s")
    await login(emulator, config)
    # Long enough to be reported once however late the signal lands after the request began
    # (a loaded machine), short enough not to be reported twice.
    delay = daemon_module.REPORT_STOP_EVERY + 2.5
    emulator.inject("token", "slow", count=1, delay=delay)
    daemon = await start_daemon(config)
    await daemon.wait_for(
        lambda: emulator.stats.faults_fired["slow"] == 1, timeout=10, what="refresh in flight"
    )
    daemon.send(signal.SIGTERM)
    code = await asyncio.wait_for(daemon.proc.wait(), 30)
    log = daemon.log_text()
    assert code == 0, log[-3000:]
    reports = [line for line in log.splitlines() if "the stop is still under way" in line]
    assert len(reports) == 1, log[-3000:]
    assert "under way after 5s:" in reports[0]
    # The refresh in flight at the signal is the scheduler's running job: the stop's step,
    # and the main task's chain through aiohttp's cleanup and our context to the wait.
    assert "waiting for the scheduler's running jobs" in reports[0]
    assert ": serve (service.py:" in reports[0]
    assert "_scheduler_ctx (service.py:" in reports[0]
    assert "drain (scheduler.py:" in reports[0]
    assert "tasks.py" not in reports[0]
    assert daemon.state()["generation"] == 2  # the slow answer was still saved


async def test_stop_waits_for_a_slow_refresh_as_long_as_its_request_may_take(
    emulator: KakaoEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during a slow refresh waits for Kakao's answer (up to the request timeout).

    Stopping after STOP_GRACE while the request may still be answered closes the session
    under it: a Kakao that already processed the request rotates the refresh token, the
    answer is lost, and the state on disk keeps the retired one (a new login is needed after
    the restart). Here the refresh must complete and be saved before the process ends.
    """
    monkeypatch.setattr(service, "STOP_GRACE", 0.3)
    emulator.settings.access_lifetime = 2
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    config = config_with(tmp_path, emulator, timeout="5s")
    no_verify_on_start(config)
    await login(emulator, config)
    await asyncio.sleep(1.7)  # overdue: the refresh starts at once
    emulator.inject("token", "slow", count=1, delay=1.2)
    async with serving(config):
        pass  # stop right away, with the start-up refresh in flight
    assert emulator.stats.rotations == 1 and emulator.stats.refreshes_ok == 1
    saved = AccountStore(load_config(config).accounts["default"]).load()
    assert saved is not None and saved.generation == 2
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


async def test_the_heartbeat_keeps_beating_when_the_wall_clock_steps_back() -> None:
    """The heartbeat is the safety net against wall-clock trouble: it runs on the monotonic
    clock, so a wall clock stepped back a minute does not pause it for that minute (a
    wall-clock interval job would wait until the wall clock caught up again)."""
    import time_machine

    from kakao_tokend.scheduler import RefreshScheduler
    from kakao_tokend.tokens import utcnow

    scheduler = RefreshScheduler(heartbeat=0.1)
    beats: list[float] = []
    original = scheduler._beat

    async def counting_beat() -> None:
        beats.append(time.monotonic())
        await original()

    scheduler._beat = counting_beat  # type: ignore[method-assign]
    scheduler.start()
    try:
        await asyncio.sleep(0.35)
        assert len(beats) >= 2
        with time_machine.travel(utcnow() - timedelta(seconds=60), tick=True):
            before = len(beats)
            await asyncio.sleep(1.0)
            assert len(beats) - before >= 5, "the heartbeat stopped when the clock stepped back"
            assert scheduler.is_healthy()
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)
