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
    cpu_seconds,
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


async def drive(socket_path: Path, *, concurrency: int, duration: float) -> tuple[int, float]:
    """Hammer ``socket_path`` for ``duration`` seconds; return (successful requests, seconds)."""
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
        return count, time.monotonic() - started


async def measure(
    socket_path: Path, pid: int, *, concurrency: int, duration: float
) -> tuple[float, float]:
    """Return (requests/second, server CPU microseconds per request) for one round."""
    before = cpu_seconds(pid)
    count, elapsed = await drive(socket_path, concurrency=concurrency, duration=duration)
    return count / elapsed, (cpu_seconds(pid) - before) * 1e6 / max(count, 1)


async def main() -> None:
    args = parse_args(__doc__ or "", options=_options)
    concurrency = args.concurrency or (4 if args.quick else 16)
    # --quick proves the script runs; each second of it keeps two processes at full speed.
    duration = args.duration or (0.2 if args.quick else 5.0)
    rounds = args.rounds or (1 if args.quick else 5)
    bare: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    with workdir(args.keep) as directory:
        async with running_emulator(emulator_settings()) as emulator:
            server, bare_path = await bare_server(directory)
            try:
                async with seeded_daemon(directory, emulator, accounts=1) as daemon:
                    sock = next(directory.glob("daemon-*/run/api.sock"))
                    sides = ((bare, bare_path, server.pid), (ours, sock, daemon.pid))
                    # Warm both sides (and the client) up; not counted.
                    for _, path, pid in sides:
                        await measure(path, pid, concurrency=concurrency, duration=duration / 2)
                    for _ in range(rounds):
                        for values, path, pid in sides:
                            values.append(
                                await measure(path, pid, concurrency=concurrency, duration=duration)
                            )
            finally:
                await server.stop()
    pair_ratios = [o[0] / b[0] for b, o in zip(bare, ours, strict=True)]
    ratio = median(pair_ratios)
    cpu_ratio = median([b[1] for b in bare]) / median([o[1] for o in ours])

    def row(label: str, values: list[tuple[float, float]]) -> list[str]:
        rates = [v[0] for v in values]
        return [
            label,
            f"{median(rates):.0f}",
            f"{min(rates):.0f}",
            f"{max(rates):.0f}",
            f"{median([v[1] for v in values]):.0f}",
        ]

    print_table(
        f"Token endpoint throughput, Unix socket, {concurrency} concurrent keep-alive clients,"
        f" {rounds} x {duration:g} s per side, alternating",
        ["server", "median req/s", "min", "max", "server CPU us/req"],
        [
            row("bare aiohttp handler (baseline)", bare),
            row("kakao-tokend /v1/accounts/default/token", ours),
        ],
    )
    print(
        f"  throughput daemon/bare (median of paired rounds): {ratio:.1%} (target >= 80 %)\n"
        f"  server capacity daemon/bare (inverse CPU per request, robust to a busy client and"
        f" machine): {cpu_ratio:.1%}"
    )
    result(
        "token_rps",
        median([o[0] for o in ours]),
        ratio,
        baseline_rps=f"{median([b[0] for b in bare]):.0f}",
        cpu_capacity_ratio=f"{cpu_ratio:.3f}",
        target=0.8,
        met=ratio >= 0.8,
    )


if __name__ == "__main__":
    asyncio.run(main())
