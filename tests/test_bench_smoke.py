"""Smoke test of the benchmarks: each runs in its tiny --quick mode and prints its RESULT lines.

This proves the scripts still run against the current daemon (they cannot rot); it asserts
nothing about performance — the numbers come from full runs, see docs/benchmarks.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from benchrun import run_quick

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULT = re.compile(r"^RESULT (\w+)=(\S+) ratio=(\S+)(?: \w+=\S+)*$", re.MULTILINE)

#: script -> the RESULT names its quick run must print.
EXPECTED = {
    "startup.py": {"startup_ready_ms", "startup_ready_ms_20"},
    "idle_cpu.py": {"idle_cpu_s_per_hour_1", "idle_cpu_s_per_hour_20"},
    "memory.py": {"rss_mib_1", "rss_mib_20"},
    "token_throughput.py": {"token_rps"},
    "proxy_latency.py": {"proxy_added_median_ms"},
    "refresh_spread.py": {"peak_refreshes_per_s"},
}


@pytest.mark.bench
@pytest.mark.slow(seconds=15)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_quick_run_prints_its_results(script: str, tmp_path: Path) -> None:
    """The benchmark exits 0 in --quick mode and prints one parsable RESULT line per measure."""
    # A quick run takes 10-20 s alone; beside parallel test workers on a busy machine a
    # start-up benchmark (dozens of daemon starts) has taken more than 80 s.
    completed = run_quick(BENCH / script, tmp_path, timeout=240)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    found = {name: (value, ratio) for name, value, ratio in RESULT.findall(completed.stdout)}
    assert set(found) == EXPECTED[script], completed.stdout
    for name, (value, ratio) in found.items():
        # Numbers, not necessarily finite (an idle baseline may use exactly 0 CPU -> ratio inf).
        assert not math.isnan(float(value)), f"{name}: {completed.stdout}"
        assert float(ratio) >= 0, f"{name}: {completed.stdout}"
    assert "skipped" not in completed.stdout, completed.stdout
