"""Token endpoint throughput over the Unix socket vs a bare aiohttp handler (target >= 80 %).

Both servers run as their own process on a Unix socket and are driven by the same client: one
aiohttp ClientSession with keep-alive and C concurrent workers requesting
GET /v1/accounts/default/token for D seconds. Rounds alternate bare, daemon, bare, ... and the
median requests/second of each side is compared. The baseline is a plain aiohttp app whose
handler returns a JSON of the same shape (no middleware, no lookups).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import aiohttp
from common import (
    bare_server,
    emulator_settings,
    median,
    parse_args,
    print_table,
    result,
    seeded_daemon,
    workdir,
)

from kakao_tokend.emulator import running_emulator

PATH = "/v1/accounts/default/token"


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, help="concurrent client workers (default 16)")
    parser.add_argument("--duration", type=float, help="seconds per round (default 5)")
    parser.add_argument("--rounds", type=int, help="rounds per side (default 5)")


async def drive(socket_path: Path, *, concurrency: int, duration: float) -> float:
    """Hammer ``socket_path`` for ``duration`` seconds; return successful requests/second."""
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://localhost{PATH}") as warm:
            if warm.status != 200:
                raise RuntimeError(f"{socket_path}: HTTP {warm.status}: {await warm.text()}")
            await warm.read()
        count = 0
        deadline = time.monotonic() + duration

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                async with session.get(f"http://localhost{PATH}") as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
                count += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.monotonic() - started)


async def main() -> None:
    args = parse_args(__doc__ or "", options=_options)
    concurrency = args.concurrency or (4 if args.quick else 16)
    duration = args.duration or (0.5 if args.quick else 5.0)
    rounds = args.rounds or (1 if args.quick else 5)
    bare: list[float] = []
    daemon_rates: list[float] = []
    with workdir(args.keep) as directory:
        async with running_emulator(emulator_settings()) as emulator:
            server, bare_path = await bare_server(directory)
            try:
                async with seeded_daemon(directory, emulator, accounts=1) as daemon:
                    assert daemon.proc.returncode is None
                    sock = next(directory.glob("daemon-*/run/api.sock"))
                    # Warm both sides (and the client) up; not counted.
                    await drive(bare_path, concurrency=concurrency, duration=duration / 2)
                    await drive(sock, concurrency=concurrency, duration=duration / 2)
                    for _ in range(rounds):
                        bare.append(
                            await drive(bare_path, concurrency=concurrency, duration=duration)
                        )
                        daemon_rates.append(
                            await drive(sock, concurrency=concurrency, duration=duration)
                        )
            finally:
                await server.stop()
    ratio = median(daemon_rates) / median(bare)
    print_table(
        f"Token endpoint throughput, Unix socket, {concurrency} concurrent keep-alive clients,"
        f" {rounds} x {duration:g} s per side",
        ["server", "median req/s", "min", "max"],
        [
            [
                "bare aiohttp handler (baseline)",
                f"{median(bare):.0f}",
                f"{min(bare):.0f}",
                f"{max(bare):.0f}",
            ],
            [
                "kakao-tokend /v1/accounts/default/token",
                f"{median(daemon_rates):.0f}",
                f"{min(daemon_rates):.0f}",
                f"{max(daemon_rates):.0f}",
            ],
        ],
    )
    print(f"  ratio daemon/bare: {ratio:.1%} (target >= 80 %)")
    result(
        "token_rps",
        median(daemon_rates),
        ratio,
        baseline_rps=f"{median(bare):.0f}",
        target=0.8,
        met=ratio >= 0.8,
    )


if __name__ == "__main__":
    asyncio.run(main())
