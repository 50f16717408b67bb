"""/metrics through the real socket: parses as Prometheus text, matches the daemon's state and
passes promtool's lint."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from platform import python_version

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemonproc import config_with, login
from kakao_tokend import __version__
from kakao_tokend.emulator import KakaoEmulator
from served import Served, serving

pytestmark = pytest.mark.timeout(60)


async def scrape(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return {(sample name, sorted labels): value} from /metrics."""
    status, text = await served.text("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """One sample's value."""
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_match_the_state(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """Expiries, counters, generation, last success and health agree with /v1/status."""
    # b's retry after the 503 waits minutes, not 0.2 s: it must not land between the scrape
    # and the status read (nor before the scrape, which expects b still retrying).
    config = config_with(
        tmp_path, emulator, "[accounts.a]\n[accounts.b]\n", retry_initial="10m", retry_max="1h"
    )
    await login(emulator, config, "a")
    await login(emulator, config, "b")
    async with serving(config) as served:
        for _ in range(2):
            status, _ = await served.request("POST", "/v1/accounts/a/refresh")
            assert status == 200
        emulator.inject("token", "http503")
        status, _ = await served.request("POST", "/v1/accounts/b/refresh")
        assert status == 502
        samples = await scrape(served)
        _, body = await served.get("/v1/status")
    accounts = {item["account"]: item for item in body["accounts"]}
    for name in ("a", "b"):
        item = accounts[name]
        access = value(samples, "kakao_tokend_access_token_expires_in_seconds", account=name)
        refresh = value(samples, "kakao_tokend_refresh_token_expires_in_seconds", account=name)
        assert abs(access - item["access_expires_in"]) <= 2
        assert abs(refresh - item["refresh_expires_in"]) <= 2
        assert value(samples, "kakao_tokend_token_generation", account=name) == item["generation"]
        counters = item["counters"]
        for metric, key in (
            ("kakao_tokend_refresh_attempts_total", "attempts"),
            ("kakao_tokend_refresh_successes_total", "successes"),
            ("kakao_tokend_refresh_token_rotations_total", "rotations"),
        ):
            assert value(samples, metric, account=name) == counters[key], (name, metric)
    assert value(samples, "kakao_tokend_refresh_successes_total", account="a") == 2
    assert (
        value(
            samples,
            "kakao_tokend_refresh_failures_total",
            account="b",
            **{"class": accounts["b"]["last_error_class"]},
        )
        == 1
    )
    assert value(samples, "kakao_tokend_account_health", account="b", state="retrying") == 1
    assert value(samples, "kakao_tokend_account_health", account="a", state="ok") == 1
    assert value(samples, "kakao_tokend_last_refresh_success_timestamp_seconds", account="a") > 0
    # b's last success is still its login: older than a's refreshes.
    last_b = value(samples, "kakao_tokend_last_refresh_success_timestamp_seconds", account="b")
    last_a = value(samples, "kakao_tokend_last_refresh_success_timestamp_seconds", account="a")
    assert 0 < last_b <= last_a
    assert value(samples, "kakao_tokend_active_alerts", account="a", severity="critical") == 0


async def test_metrics_are_computed_at_scrape_time(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """Two scrapes a second apart show the access token a second closer to expiry."""
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        first = value(
            await scrape(served), "kakao_tokend_access_token_expires_in_seconds", account="default"
        )
        await asyncio.sleep(1.1)
        second = value(
            await scrape(served), "kakao_tokend_access_token_expires_in_seconds", account="default"
        )
    assert 0.9 <= first - second <= 3


async def test_refresh_durations_build_info_and_process_metrics(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Each refresh call lands in the duration histogram under its outcome: a slow Kakao
    answer (0.6 s) above the 0.5 s bucket, a fast one below it, a 503 as a failure.
    build_info names the version; the standard process and Python metrics are there.
    """
    config = config_with(tmp_path, emulator)
    await login(emulator, config)
    async with serving(config) as served:
        status, _ = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 200
        emulator.inject("token", "slow", delay=0.6)
        status, _ = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 200
        emulator.inject("token", "http503")
        status, _ = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 502
        samples = await scrape(served)
    histogram = "kakao_tokend_refresh_duration_seconds"
    ok = {"account": "default", "outcome": "success"}
    failed = {"account": "default", "outcome": "failure"}
    assert value(samples, f"{histogram}_count", **ok) == 2
    assert value(samples, f"{histogram}_count", **failed) == 1
    assert value(samples, f"{histogram}_bucket", le="0.5", **ok) == 1
    assert value(samples, f"{histogram}_bucket", le="1.0", **ok) == 2
    assert 0.6 <= value(samples, f"{histogram}_sum", **ok) < 2
    assert value(samples, f"{histogram}_bucket", le="+Inf", **failed) == 1
    assert not [name for name, _ in samples if name.endswith("_created")]
    build = value(samples, "kakao_tokend_build_info", version=__version__, python=python_version())
    assert build == 1
    names = {name for name, _ in samples}
    for standard in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert standard in names, standard
    memory = [v for (name, _), v in samples.items() if name == "process_resident_memory_bytes"]
    assert memory[0] > 1_000_000


async def test_a_real_scrape_passes_promtool_check_metrics(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`promtool check metrics` finds nothing to complain about in a real /metrics page with
    two accounts, refreshes, a failure and the histogram (Debian's prometheus package ships
    promtool; .ci/check-prometheus installs it).
    """
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt install prometheus, or .ci/check-prometheus)")
    config = config_with(tmp_path, emulator, "[accounts.a]\n[accounts.b]\n")
    await login(emulator, config, "a")
    await login(emulator, config, "b")
    async with serving(config) as served:
        await served.request("POST", "/v1/accounts/a/refresh")
        emulator.inject("token", "http503")
        await served.request("POST", "/v1/accounts/b/refresh")
        status, text = await served.text("/metrics")
    assert status == 200 and "kakao_tokend_refresh_duration_seconds_bucket" in text
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await asyncio.wait_for(proc.communicate(text.encode()), 60)
    assert (proc.returncode, said.decode()) == (0, "")
