"""Smoke test of bench/fleet_bench.py: its tiny --quick run prints every RESULT line.

It proves the script runs against the current fleet runtime (it cannot rot); it asserts
nothing about performance: the numbers come from full runs, see docs/benchmarks.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchrun import load_bench, run_quick
from kakao_tokend.emulator import RefreshAttempt
from pgcluster import find_pg_bindir, skip_or_fail

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fleet_bench.py"
RESULT = re.compile(r"^RESULT (\w+)=(\S+) ratio=(\S+)", re.MULTILINE)
EXPECTED = {
    "fleet_spread_worst_deviation",
    "fleet_peak_rate_1s",
    "fleet_peak_rate_5s",
    "fleet_expired",
    "fleet_statements_per_refresh",
    "fleet_transactions_per_refresh",
    "fleet_cpu_ms_per_refresh",
    "fleet_node_rss_mib",
    "fleet_idle_node_rss_mib",
    "fleet_node_kib_per_account",
    "fleet_idle_cpu_ms_per_s",
    "fleet_poll_ms",
    "fleet_failover_s",
    "fleet_token_throughput",
}


@pytest.mark.bench
@pytest.mark.slow(seconds=45)
@pytest.mark.timeout(200)
def test_fleet_benchmark_quick_run_prints_its_results(tmp_path: Path) -> None:
    """The fleet benchmark exits 0 in --quick mode and prints each measure as a number, with
    0 expired tokens (the spread part checks the store and every node's token files)."""
    if find_pg_bindir() is None:
        skip_or_fail("PostgreSQL is not installed (apt-get install postgresql)")
    # In a session of its own, killed afterwards with everything it started: a run that
    # failed left its two baseline processes (an hour's sleep each) behind (seen 2026-12-02).
    completed = run_quick(BENCH, tmp_path, timeout=190)
    output = completed.stdout + completed.stderr[-4000:]
    assert completed.returncode == 0, output
    found = {name: float(value) for name, value, _ in RESULT.findall(completed.stdout)}
    assert set(found) == EXPECTED, output
    assert found["fleet_expired"] == 0, output


def test_the_peak_counts_each_accounts_first_refresh_in_the_interval_only() -> None:
    """The spread's interval holds one refresh of every account: an account refreshed again
    before its end (its next refresh, jittered earlier) or refused is not counted in the
    peak; each account's earliest successful refresh inside the interval is."""
    bench = load_bench("fleet_bench")
    log = [
        RefreshAttempt(10.0, "a", "ok", user_id=1),
        RefreshAttempt(11.0, "b", "rotated", user_id=2),
        RefreshAttempt(12.0, "c", "KOE322", user_id=3),
        RefreshAttempt(13.0, "c", "ok", user_id=3),
        RefreshAttempt(99.0, "a2", "ok", user_id=1),  # account 1 again, inside the interval
        RefreshAttempt(5.0, "d", "ok", user_id=4),  # before the interval
        RefreshAttempt(101.0, "e", "ok", user_id=5),  # after it
    ]
    assert bench.first_refreshes(reversed(log), 9.0, 100.0) == [10.0, 11.0, 13.0]
