"""Proxy overhead: median latency through the daemon's /kapi/ proxy vs straight to the emulator.

The same client sends one request at a time, alternating a direct
GET <emulator>/v1/user/access_token_info (with the account's access token, keep-alive TCP) and
GET /kapi/v1/user/access_token_info on the daemon's Unix socket (no token: the daemon injects
it and forwards over its own keep-alive session). Target: at most 1 ms added to the median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
from common import (
    emulator_settings,
    median,
    parse_args,
    print_table,
    result,
    seeded_daemon,
    workdir,
)

from kakao_tokend.emulator import running_emulator

API_PATH = "/v1/user/access_token_info"


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, help="requests per side (default 3000)")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    args = parse_args(__doc__ or "", options=_options)
    count = args.requests or (100 if args.quick else 3000)
    direct: list[float] = []
    proxied: list[float] = []
    with workdir(args.keep) as directory:
        async with (
            running_emulator(emulator_settings()) as emulator,
            seeded_daemon(directory, emulator, accounts=1),
        ):
            state_dir = next(directory.glob("daemon-*/state"))
            token = json.loads((state_dir / "default.token.json").read_text())["access_token"]
            sock = next(directory.glob("daemon-*/run/api.sock"))
            async with (
                aiohttp.ClientSession() as tcp,
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as unix,
            ):
                direct_url = f"{emulator.url}{API_PATH}"
                proxy_url = f"http://localhost/kapi{API_PATH}"
                headers = {"Authorization": f"Bearer {token}"}
                async with unix.get(proxy_url) as probe:
                    body = await probe.read()
                    if probe.status == 404 and b'"id"' not in body:
                        print("skipped: proxy not available")
                        result("proxy_added_median_ms", float("nan"), None, skipped=True)
                        return
                    if probe.status != 200:
                        raise RuntimeError(f"proxy probe: HTTP {probe.status}: {body[:200]!r}")
                for index in range(count + 20):  # the first 20 of each side warm up
                    for side, session, url, hdrs in (
                        (direct, tcp, direct_url, headers),
                        (proxied, unix, proxy_url, {}),
                    ):
                        started = time.perf_counter()
                        async with session.get(url, headers=hdrs) as response:
                            await response.read()
                        elapsed = time.perf_counter() - started
                        if response.status != 200:
                            raise RuntimeError(f"{url}: HTTP {response.status}")
                        if index >= 20:
                            side.append(elapsed)
    d_med, p_med = median(direct) * 1000, median(proxied) * 1000
    added = p_med - d_med
    print_table(
        f"Latency of GET {API_PATH}, {count} sequential requests per side (ms)",
        ["path", "median", "p90", "p99"],
        [
            [
                "direct to the emulator (baseline)",
                f"{d_med:.3f}",
                f"{_quantile(direct, 0.9) * 1000:.3f}",
                f"{_quantile(direct, 0.99) * 1000:.3f}",
            ],
            [
                "through the daemon's /kapi proxy",
                f"{p_med:.3f}",
                f"{_quantile(proxied, 0.9) * 1000:.3f}",
                f"{_quantile(proxied, 0.99) * 1000:.3f}",
            ],
        ],
    )
    print(f"  added median latency: {added:.3f} ms (target <= 1 ms)")
    result(
        "proxy_added_median_ms",
        added,
        p_med / d_med,
        direct_median_ms=f"{d_med:.3f}",
        proxy_median_ms=f"{p_med:.3f}",
        target_ms=1,
        met=added <= 1.0,
    )


if __name__ == "__main__":
    asyncio.run(main())
