"""Many accounts kept fresh: peak refreshes per second vs the ideal uniform rate; no expiry.

N accounts (default 1,000) get short access lifetimes (default 40 s) from the emulator. They are
seeded so that their first refreshes fall uniformly over one refresh interval starting a little
after the daemon is ready (as in a daemon that has run for a while; none is overdue at start).
The daemon refreshes each at 75 % ± 5 % of its lifetime, so the ideal load is
N / (0.75 x lifetime) refreshes per second. The emulator's refresh log is counted in 1 s
buckets; the peak bucket after the first refresh interval (the steady state) is compared with
the ideal rate; the peak of the first interval is reported too. Meanwhile every published token
file is checked every few seconds: it must parse, its expires_at must be in the future, and the
emulator must accept its access token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from pathlib import Path

from common import (
    cpu_seconds,
    emulator_settings,
    median,
    parse_args,
    print_table,
    result,
    seeded_daemon,
    workdir,
)

from kakao_tokend.config import parse_duration
from kakao_tokend.emulator import KakaoEmulator, running_emulator
from kakao_tokend.tokens import parse_time, utcnow

REFRESH_AT = 0.75


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accounts", type=int, help="accounts (default 1000)")
    parser.add_argument("--lifetime", type=float, help="access token lifetime, s (default 40)")
    parser.add_argument("--heartbeat", help='daemon heartbeat (default "10s")')
    parser.add_argument(
        "--lead", type=float, help="seconds before the first planned refresh (default 2 + N/125)"
    )
    parser.add_argument("--duration", type=float, help="measuring time, s (default 100)")


def check_published(
    emulator: KakaoEmulator, state_dir: Path, names: list[str]
) -> tuple[int, list[str], float]:
    """Read every published file; return (reads, problems, smallest remaining seconds)."""
    problems: list[str] = []
    smallest = math.inf
    for name in names:
        try:
            document = json.loads((state_dir / f"{name}.token.json").read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: unreadable token file ({type(exc).__name__})")
            continue
        remaining = (parse_time(document["expires_at"]) - utcnow()).total_seconds()
        smallest = min(smallest, remaining)
        if remaining <= 0:
            problems.append(f"{name}: published token expired {-remaining:.1f}s ago")
        elif not emulator.access_token_valid(document["access_token"]):
            problems.append(f"{name}: the emulator rejects the published token")
    return len(names), problems, smallest


async def main() -> None:
    args = parse_args(__doc__ or "", options=_options)
    accounts = args.accounts or (20 if args.quick else 1000)
    lifetime = args.lifetime or (6.0 if args.quick else 40.0)
    duration = args.duration or (10.0 if args.quick else 100.0)
    interval = REFRESH_AT * lifetime
    # Seeding and start-up take a few seconds with 1,000 accounts (about 5.5 s measured);
    # first refreshes are planned from this lead on, so none is overdue at start.
    lead = args.lead or 2.0 + 0.008 * accounts
    ideal = accounts / interval
    heartbeat = args.heartbeat or ("1s" if args.quick else "10s")
    settings = emulator_settings(access_lifetime=lifetime)
    reads = 0
    problems: list[str] = []
    smallest = math.inf
    with workdir(args.keep) as directory:
        async with (
            running_emulator(settings) as emulator,
            seeded_daemon(
                directory,
                emulator,
                accounts=accounts,
                heartbeat=heartbeat,
                spread=(lead, interval),
                settle=False,
            ) as daemon,
        ):
            state_dir = next(directory.glob("daemon-*/state"))
            names = sorted(
                p.name.removesuffix(".state.json") for p in state_dir.glob("*.state.json")
            )
            start = emulator.now()
            cpu_before = cpu_seconds(daemon.pid)
            deadline = time.monotonic() + duration
            check_every = 1.0 if args.quick else 5.0
            while time.monotonic() < deadline:
                await asyncio.sleep(min(check_every, max(0.0, deadline - time.monotonic())))
                n, found, low = check_published(emulator, state_dir, names)
                reads += n
                problems.extend(found)
                smallest = min(smallest, low)
            end = emulator.now()
            cpu_used = cpu_seconds(daemon.pid) - cpu_before
            log = [e for e in emulator.stats.refresh_log if start <= e.at < end]
            koe237 = emulator.stats.koe237
    ok = [e for e in log if e.outcome in ("ok", "rotated", "grace")]
    failed = Counter(e.outcome for e in log if e not in ok)
    buckets = Counter(int(e.at - start) for e in ok)
    per_second = [buckets.get(i, 0) for i in range(int(end - start))]
    steady = per_second[math.ceil(interval) :]
    peak = max(steady, default=0)
    startup_peak = max(per_second[: math.ceil(interval)], default=0)
    refreshed_users = {e.user_id for e in ok}
    # Time between consecutive refreshes of the same account, as a fraction of the lifetime:
    # with the plan alone it spreads over refresh_at ± jitter (0.70..0.80).
    last: dict[int | None, float] = {}
    gaps: list[float] = []
    for entry in sorted(ok, key=lambda e: e.at):
        if entry.user_id in last:
            gaps.append((entry.at - last[entry.user_id]) / lifetime)
        last[entry.user_id] = entry.at
    # Share of the steady-state refreshes in the busiest 1 s phase of the heartbeat period
    # (1/heartbeat if refreshes ignore the heartbeat; near 1 if the heartbeat triggers them).
    beat = parse_duration(heartbeat)
    phases = Counter(int((e.at - start) % beat) for e in ok if e.at - start >= interval)
    phase_share = (
        max(phases.values(), default=0) / max(sum(phases.values()), 1) if beat >= 2 else math.nan
    )
    mean = len(ok) / (end - start)
    print_table(
        f"{accounts} accounts, access lifetime {lifetime:g} s, refresh at 75 % ± 5 %,"
        f" heartbeat {heartbeat}, {end - start:.0f} s measured",
        ["measure", "value"],
        [
            ["ideal uniform rate N/(0.75 x lifetime) (baseline)", f"{ideal:.1f} /s"],
            ["mean refresh rate", f"{mean:.1f} /s"],
            ["median 1 s bucket (steady state)", f"{median(steady) if steady else 0:.0f} /s"],
            ["peak 1 s bucket (steady state)", f"{peak} /s"],
            ["peak / ideal (steady state)", f"{peak / ideal:.2f}"],
            ["peak 1 s bucket in the first interval (start-up)", f"{startup_peak} /s"],
            ["refreshes (ok)", len(ok)],
            [
                "interval between an account's refreshes, min/median/max",
                " / ".join(f"{q:.3f}" for q in _spread(gaps)) + " of lifetime",
            ],
            [
                f"steady-state refreshes in the busiest 1 s of the {heartbeat} heartbeat",
                f"{phase_share:.0%} (uniform: {1 / beat:.0%})" if beat >= 2 else "n/a (< 2 s)",
            ],
            ["refresh errors", dict(failed) or 0],
            ["KOE237 answers", koe237],
            ["accounts refreshed at least once", f"{len(refreshed_users)} / {accounts}"],
            ["published files read", reads],
            ["expired / rejected / unreadable reads", len(problems)],
            ["smallest remaining lifetime seen", f"{smallest:.1f} s"],
            ["daemon CPU per refresh", f"{cpu_used / max(len(ok), 1) * 1000:.2f} ms"],
            ["daemon CPU share during the run", f"{cpu_used / (end - start):.1%} of a core"],
        ],
    )
    for problem in problems[:10]:
        print(f"  PROBLEM: {problem}")
    result(
        "peak_refreshes_per_s",
        peak,
        peak / ideal,
        ideal_per_s=f"{ideal:.2f}",
        mean_per_s=f"{mean:.2f}",
        accounts=accounts,
        expired_reads=len(problems),
        refresh_errors=sum(failed.values()),
        startup_peak_per_s=startup_peak,
        heartbeat_phase_share=f"{phase_share:.3f}",
        median_interval=f"{_spread(gaps)[1]:.3f}",
        cpu_ms_per_refresh=f"{cpu_used / max(len(ok), 1) * 1000:.2f}",
    )


def _spread(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (math.nan, math.nan, math.nan)
    return min(values), median(values), max(values)


if __name__ == "__main__":
    asyncio.run(main())
