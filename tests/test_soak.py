"""A short soak (bench/soak.py) of the real daemon under random faults, kills, pauses and jumps."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchrun import load_bench
from kakao_tokend.emulator import KakaoEmulator

REPO = Path(__file__).resolve().parents[1]
SOAK = REPO / "bench" / "soak.py"


def test_disruption_windows_decide_what_counts_as_healthy(tmp_path: Path) -> None:
    """A read is only held to freshness outside every window; disk-full spares API reads.

    Guards the definition the soak's main number rests on: if windows leaked (too wide) the
    soak would excuse stale reads, if they were ignored it would blame the daemon for kills.
    """
    soak = load_bench("soak")
    args = argparse.Namespace(seed=1, minutes=1.0, lost_response=False, quiet=True)
    run = soak.Soak(KakaoEmulator(), tmp_path, args)
    run.windows = [
        soak.Window(100.0, 103.0, "kill -9"),
        soak.Window(200.0, 205.0, "disk full", file_only=True),
        soak.Window(300.0, None, "SIGSTOP"),
    ]
    assert run.healthy(98.0, 99.9, file_reader=True)
    assert not run.healthy(99.0, 100.5, file_reader=True)  # the read overlaps the kill
    assert not run.healthy(102.9, 103.5, file_reader=False)
    assert run.healthy(103.1, 104.0, file_reader=False)
    assert not run.healthy(201.0, 201.1, file_reader=True)
    assert run.healthy(201.0, 201.1, file_reader=False)  # memory keeps the API fresh
    assert not run.healthy(1000.0, 1000.1, file_reader=False)  # still stopped


def test_a_nonzero_must_be_zero_count_fails_the_run() -> None:
    """Every must-be-0 count, when not 0, is listed as a failure (so the exit status is 1)."""
    soak = load_bench("soak")
    report = soak.Report(seed=1, minutes=1.0, lost_response_mode=True)
    report.refresh_cycles = 10
    report.final_exit_code = 0
    report.final_refresh_status = "live"
    assert report.failures() == []
    report.losses.append(soak.Loss("fp1", "retired", "lost_response", 0.0))
    assert report.failures() == []  # accounted for
    report.losses.append(soak.Loss("fp2", "retired", "UNEXPLAINED (refresh token retired)", 0.0))
    report.torn_reads = 1
    report.expired_healthy = 2
    report.koe237_real = 1
    report.tokens_in_logs = 1
    report.shm_left = 2
    failures = "; ".join(report.failures())
    for name in (
        "torn",
        "expired token while healthy",
        "lost outside",
        "KOE237",
        "in the logs",
        "left in /dev/shm",
    ):
        assert name in failures
    assert "| torn or unparsable reads | 1 | 0 |" in report.table()


@pytest.mark.soak
@pytest.mark.slow(seconds=130)
@pytest.mark.timeout(420)
def test_two_minute_soak_keeps_every_must_be_zero_count_at_zero(tmp_path: Path) -> None:
    """Two minutes of the real daemon under every fault kind, kill -9, SIGSTOP, clock jumps,
    a full disk and lost responses: no torn read, no expired token while healthy, no refresh
    token lost outside the lost-response case, no KOE237, no token in any log.
    """
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "2",
            "--seed",
            "7",
            "--lost-response",
            "--quiet",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["failures"] == []
    assert result["torn_reads"] == 0
    assert result["expired_reads_while_healthy"] == 0
    assert result["unexplained_losses"] == 0
    assert result["koe237_real"] == 0
    assert result["tokens_in_logs"] == 0
    assert result["shm_left"] == 0  # libfaketime's files of the daemons killed with -9
    # The run really exercised the daemon.
    assert result["refresh_cycles"] >= 20
    assert result["reads_file"] + result["reads_api"] >= 2000
    assert result["faults_injected_total"] >= 5


@pytest.mark.soak
@pytest.mark.slow(seconds=40)
@pytest.mark.timeout(240)
def test_negative_control_the_soak_fails_when_stale_tokens_go_unexcused(tmp_path: Path) -> None:
    """With clock jumps but no disruption windows for them, the soak must report failures.

    Proves the freshness check is not blind: the daemon cannot see Kakao's clock jump, so its
    published token is dead until the next refresh; a harness that still said "0" would be
    measuring nothing.
    """
    out = tmp_path / "control.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "0.6",
            "--seed",
            "2",
            "--control",
            "unaccounted-jumps",
            "--no-disk-full",
            "--quiet",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 1, done.stdout + done.stderr[-4000:]
    assert "SOAK FAILED" in done.stdout
    result = json.loads(out.read_text())
    assert result["expired_reads_while_healthy"] > 0
    assert result["clock_jumps"] >= 3


def test_the_soak_runs_the_daemon_with_the_production_retry_settings(tmp_path: Path) -> None:
    """The daemon under soak keeps retry_initial/retry_max at their defaults, and a recovery
    allowance after a fault is a fraction of the access lifetime, not retry_max.

    A soak that capped retry_max at 1 s hid a fixed 60 s rate-limit pause after KOE237
    (docs/soak.md tells how); a
    window of retry_max after each fault would excuse one again.
    """
    from kakao_tokend.config import RefreshPolicy, load_config

    soak = load_bench("soak")
    args = argparse.Namespace(seed=1, minutes=1.0, lost_response=False, quiet=True)
    emulator = KakaoEmulator()
    emulator.url = "http://127.0.0.1:9"  # never contacted: only the config is written
    run = soak.Soak(emulator, tmp_path, args)
    run.write_config()
    policy = load_config(run.config_path).refresh
    defaults = RefreshPolicy()
    assert (policy.retry_initial, policy.retry_max) == (defaults.retry_initial, defaults.retry_max)
    assert soak.RECOVERY <= soak.ACCESS_LIFETIME / 2
    assert {"restart_rate_limited", "refresh_near_death", "clock_back"} <= set(soak.DISRUPTIONS)


def test_the_soak_with_defaults_writes_only_the_required_keys(tmp_path: Path) -> None:
    """`--defaults` leaves every timing at the daemon's default: the config has no [refresh]
    table, no timeouts, no log level — only the app, Kakao's addresses and the paths."""
    from kakao_tokend.config import RefreshPolicy, load_config

    soak = load_bench("soak")
    args = soak.parse_args(["--defaults", "--quiet"])
    emulator = KakaoEmulator()
    emulator.url = "http://127.0.0.1:9"  # never contacted: only the config is written
    run = soak.Soak(emulator, tmp_path, args)
    run.write_config()
    text = run.config_path.read_text()
    assert "[refresh]" not in text and "timeout" not in text and "log_level" not in text
    config = load_config(run.config_path)
    assert config.refresh == RefreshPolicy()
    assert config.accounts["default"].app.timeout == 30.0


async def test_the_harness_logs_in_on_the_daemons_clock(tmp_path: Path) -> None:
    """The soak's re-login stamps the state with the daemon's (stepped back) wall clock, as a
    real `kakao-tokend login` on the daemon's machine does: the expiries the daemon reads, and
    the refresh token's life the harness computes, are Kakao's, not 10 s too far away.

    Stamped with the harness's own clock, a state written after the daemon's clock was stepped
    back 10.7 s made both plan 10.7 s past the refresh token's death (seed 3, docs/soak.md).
    """
    from datetime import timedelta

    from kakao_tokend.emulator import EmulatorSettings, running_emulator
    from kakao_tokend.kakao import create_session
    from kakao_tokend.tokens import parse_time, utcnow

    soak = load_bench("soak")
    args = soak.parse_args(["--quiet"])
    settings = EmulatorSettings(access_lifetime=3.0, refresh_lifetime=30.0, seed=1)
    async with running_emulator(settings) as emulator:
        run = soak.Soak(emulator, tmp_path, args)
        run.write_config()
        run.clock_offset = -10.0  # the daemon's clock, stepped back 10 s in all
        run.session = create_session()
        try:
            asked = utcnow()
            await run.login()
        finally:
            await run.session.close()
        tokens = run.state_doc()["tokens"]  # type: ignore[index]
        issued = parse_time(tokens["access_issued_at"])
        assert abs((issued - (asked - timedelta(seconds=10))).total_seconds()) < 1.0
        left = run.refresh_left()
        assert left is not None and 28.0 < left <= 30.0  # Kakao's view, 30 s from the login
        assert emulator.refresh_token_status(tokens["refresh_token"]) == "live"


def test_scale_stretches_the_gaps_between_disruptions(tmp_path: Path) -> None:
    """`--scale 20` waits 20-100 s between disruptions (1-5 s at 3 s tokens): a 60 s token
    meets as many disruptions per lifetime as a 3 s one, not twenty times as many."""
    import random

    soak = load_bench("soak")
    soak.apply_scale(20.0)
    args = soak.parse_args(["--quiet", "--scale", "20"])
    run = soak.Soak(KakaoEmulator(), tmp_path, args)
    run.rng = random.Random(3)
    gaps = [run.gap() for _ in range(200)]
    assert min(gaps) >= 20.0 and max(gaps) <= 100.0
    assert max(gaps) > 80.0
