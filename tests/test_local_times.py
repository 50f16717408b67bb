"""Human-readable times are local with the zone (TZ=Asia/Seoul reads as KST); JSON stays UTC."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from daemonproc import login, start_daemon, write_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.tokens import format_local_time

pytestmark = pytest.mark.timeout(60)

SEOUL = {"TZ": "Asia/Seoul"}
KST_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d KST")
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def seoul(utc_text: str) -> str:
    """The KST reading of an RFC 3339 UTC time, as status should print it."""
    moment = datetime.fromisoformat(utc_text.replace("Z", "+00:00"))
    return (moment + timedelta(hours=9)).strftime("%Y-%m-%d %H:%M:%S KST")


async def run_seoul(config: Path, *args: str) -> tuple[int, str, str]:
    """Run the real CLI with TZ=Asia/Seoul."""
    proc = await asyncio.create_subprocess_exec(
        *cli_command(config, *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **SEOUL},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_command(config: Path, *args: str) -> list[str]:
    """The real CLI's command line for ``config``."""
    return [sys.executable, "-m", "kakao_tokend", "--config", str(config), *args]


def test_format_local_time_names_the_zone() -> None:
    """The one formatter: local wall-clock time to the second, then the zone's name."""
    text = format_local_time(datetime.now().astimezone())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+", text), text
    with pytest.raises(ValueError):
        format_local_time(datetime(2026, 1, 1))  # naive: which zone would it be?


async def test_status_from_the_files_reads_in_korean_time(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`status` without a daemon prints every time in KST; `status --json` keeps UTC."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    code, out, err = await run_seoul(config, "status", "--json")
    assert code == 0, out + err
    document = json.loads(out)
    account = document["accounts"][0]
    assert UTC_TIME.fullmatch(account["access_expires_at"]) and "KST" not in out
    code, out, err = await run_seoul(config, "status")
    assert code == 0, out + err
    assert f"expires {seoul(account['access_expires_at'])}" in out, out
    assert f"expires {seoul(account['refresh_expires_at'])}" in out, out
    assert f"last refresh:  {seoul(account['refreshed_at'])}" in out, out
    assert not UTC_TIME.search(out), out


async def test_daemon_log_prefixes_and_status_via_the_daemon_read_in_korean_time(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The daemon's terminal log lines start with the local time and zone, the times inside
    its messages are local too, and `status` answered by the daemon prints KST."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config, env=SEOUL)
    try:
        status, _ = await daemon.api("POST", "/v1/accounts/default/refresh")
        assert status == 200
        await daemon.wait_log("refreshed default")
        code, out, err = await run_seoul(config, "status")
        code_json, out_json, _ = await run_seoul(config, "status", "--json")
    finally:
        assert await daemon.stop() == 0
    lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    assert all(KST_TIME.match(line) for line in lines), "\n".join(lines[:5])
    refreshed = next(line for line in lines if "refreshed default" in line)
    assert len(KST_TIME.findall(refreshed)) >= 3 and not UTC_TIME.search(refreshed), refreshed
    assert code == 0 and "daemon:        running" in out, out + err
    account = json.loads(out_json)["accounts"][0]
    assert code_json == 0 and UTC_TIME.fullmatch(account["next_refresh_at"])
    assert f"next refresh:  {seoul(account['next_refresh_at'])}" in out, out
    assert f"expires {seoul(account['access_expires_at'])}" in out, out
    assert not UTC_TIME.search(out), out
