"""Start to READY: exec of `kakao-tokend run` until READY=1 on NOTIFY_SOCKET, vs a bare import.

Baseline: ``python -c "import aiohttp, apscheduler"`` from exec to exit (the least any daemon
on these libraries can take). The daemon has one account (and, reported separately, 1,000).
A baseline run precedes every daemon run (baseline, daemon, baseline, daemon with 1,000, ...)
so drift on a shared machine hits both alike; the medians and their ratios are printed. All
children run from compiled bytecode (see common.workdir).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from common import (
    FIRST_USER_ID,
    PYTHON,
    account_names,
    emulator_settings,
    median,
    parse_args,
    print_table,
    result,
    seed_accounts,
    spawn,
    start_daemon,
    workdir,
    write_config,
)

from kakao_tokend.emulator import running_emulator

BASELINE = [PYTHON, "-c", "import aiohttp, apscheduler"]


async def main() -> None:
    args = parse_args(__doc__ or "")
    runs = 3 if args.quick else 15
    many, many_runs = (20, 1) if args.quick else (1000, 7)
    with workdir(args.keep) as directory:
        async with running_emulator(emulator_settings()) as emulator:
            config = write_config(directory, emulator)
            seed_accounts(emulator, config)
            # The same with many accounts (each is loaded and its token file checked).
            sub = directory / "many"
            sub.mkdir()
            many_config = write_config(sub, emulator, accounts=account_names(many))
            seed_accounts(emulator, many_config, first_user=FIRST_USER_ID + 1)
            baseline: list[float] = []
            daemon_times: list[float] = []
            #: The baseline run just before each many-accounts run, and that run.
            many_baseline: list[float] = []
            many_times: list[float] = []
            # Round 0 is a warm-up (page cache, bytecode). Every round runs the baseline
            # before each daemon, so drift on a shared machine hits both alike.
            for index in range(runs + 1):
                elapsed = await _baseline(directory)
                daemon, ready = await start_daemon(config)
                await daemon.stop()
                if index:
                    baseline.append(elapsed)
                    daemon_times.append(ready)
                if index <= many_runs:
                    elapsed = await _baseline(directory)
                    daemon, ready = await start_daemon(many_config)
                    await daemon.stop()
                    if index:
                        many_baseline.append(elapsed)
                        many_times.append(ready)
    base_med, daemon_med = median(baseline), median(daemon_times)
    ratio = daemon_med / base_med
    many_base_med, many_med = median(many_baseline), median(many_times)
    many_ratio = many_med / many_base_med
    print_table(
        f"Start to READY ({runs} runs each with 1 account, {many_runs} with {many}; median)",
        ["measure", "median ms", "min ms", "max ms"],
        [
            ["bare import aiohttp+apscheduler", *_ms(baseline)],
            ["kakao-tokend run -> READY=1", *_ms(daemon_times)],
            [f"bare import, the runs before the {many}-account ones", *_ms(many_baseline)],
            [f"kakao-tokend run -> READY=1, {many} accounts", *_ms(many_times)],
        ],
    )
    print(f"  ratio daemon/baseline: {ratio:.2f}x; with {many} accounts {many_ratio:.2f}x")
    result("startup_ready_ms", daemon_med * 1000, ratio, baseline_ms=f"{base_med * 1000:.1f}")
    result(
        f"startup_ready_ms_{many}",
        many_med * 1000,
        many_ratio,
        baseline_ms=f"{many_base_med * 1000:.1f}",
    )


async def _baseline(directory: Path) -> float:
    """Run the bare import once; return its exec-to-exit time in seconds."""
    base = await spawn(BASELINE, directory / "baseline.log")
    await base.proc.wait()
    return time.monotonic() - base.started


def _ms(values: list[float]) -> list[str]:
    return [
        f"{median(values) * 1000:.1f}",
        f"{min(values) * 1000:.1f}",
        f"{max(values) * 1000:.1f}",
    ]


if __name__ == "__main__":
    asyncio.run(main())
