"""Start to READY: exec of `kakao-tokend run` until READY=1 on NOTIFY_SOCKET, vs a bare import.

Baseline: ``python -c "import aiohttp, apscheduler"`` from exec to exit (the least any daemon
on these libraries can take). The daemon has one account (and, reported separately, 1,000).
Runs alternate (baseline, daemon, baseline, ...) so drift on a shared machine hits both alike;
the medians and their ratio are printed.
"""

from __future__ import annotations

import asyncio
import time

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
    many, many_runs = (20, 1) if args.quick else (1000, 5)
    with workdir(args.keep) as directory:
        async with running_emulator(emulator_settings()) as emulator:
            config = write_config(directory, emulator)
            seed_accounts(emulator, config)
            baseline: list[float] = []
            daemon_times: list[float] = []
            # One warm-up of each so the page cache holds the code for both.
            for index in range(runs + 1):
                base = await spawn(BASELINE, directory / "baseline.log")
                await base.proc.wait()
                elapsed = time.monotonic() - base.started
                daemon, ready = await start_daemon(config)
                await daemon.stop()
                if index:
                    baseline.append(elapsed)
                    daemon_times.append(ready)
            # The same with many accounts (each is loaded and its token file re-published).
            sub = directory / "many"
            sub.mkdir()
            many_config = write_config(sub, emulator, accounts=account_names(many))
            seed_accounts(emulator, many_config, first_user=FIRST_USER_ID + 1)
            many_times: list[float] = []
            for _ in range(many_runs):
                daemon, ready = await start_daemon(many_config)
                await daemon.stop()
                many_times.append(ready)
    base_med, daemon_med = median(baseline), median(daemon_times)
    ratio = daemon_med / base_med
    print_table(
        f"Start to READY (1 account, {runs} runs each, median)",
        ["measure", "median ms", "min ms", "max ms"],
        [
            ["bare import aiohttp+apscheduler", *_ms(baseline)],
            ["kakao-tokend run -> READY=1", *_ms(daemon_times)],
            [f"the same with {many} accounts ({many_runs} runs)", *_ms(many_times)],
        ],
    )
    print(f"  ratio daemon/baseline: {ratio:.2f}x")
    result("startup_ready_ms", daemon_med * 1000, ratio, baseline_ms=f"{base_med * 1000:.1f}")
    many_med = median(many_times)
    result(
        f"startup_ready_ms_{many}",
        many_med * 1000,
        many_med / base_med,
        baseline_ms=f"{base_med * 1000:.1f}",
    )


def _ms(values: list[float]) -> list[str]:
    return [
        f"{median(values) * 1000:.1f}",
        f"{min(values) * 1000:.1f}",
        f"{max(values) * 1000:.1f}",
    ]


if __name__ == "__main__":
    asyncio.run(main())
