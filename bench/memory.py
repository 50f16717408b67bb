"""Resident memory (VmRSS now, VmHWM peak) of the daemon with 1 and N accounts vs a bare import.

Baseline: a process that imports aiohttp and apscheduler and then idles in asyncio, i.e. the
floor for any daemon built on these libraries. All processes run at the same time; the daemons
are read after every account's start-up check (so VmHWM includes start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from common import (
    PYTHON,
    emulator_settings,
    memory_kib,
    parse_args,
    print_table,
    result,
    seeded_daemon,
    spawn,
    wait_log,
    workdir,
)

from kakao_tokend.emulator import running_emulator

BASELINE = [
    PYTHON,
    "-c",
    "import asyncio, aiohttp, apscheduler; print('ready', flush=True); "
    "asyncio.run(asyncio.sleep(3600))",
]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accounts", type=int, help="the many-accounts case (default 1000)")


async def main() -> None:
    args = parse_args(__doc__ or "", options=_options)
    many = args.accounts or (20 if args.quick else 1000)
    with workdir(args.keep) as directory:
        async with (
            running_emulator(emulator_settings()) as emulator,
            contextlib.AsyncExitStack() as stack,
        ):
            base = await spawn(BASELINE, directory / "baseline.log")
            stack.push_async_callback(base.stop)
            one = await stack.enter_async_context(
                seeded_daemon(directory, emulator, accounts=1, first_user=1)
            )
            lots = await stack.enter_async_context(
                seeded_daemon(directory, emulator, accounts=many)
            )
            await asyncio.sleep(0.5 if args.quick else 3.0)
            await wait_log(base, "ready")
            readings = {
                "bare import (baseline)": memory_kib(base.pid),
                "daemon, 1 account": memory_kib(one.pid),
                f"daemon, {many} accounts": memory_kib(lots.pid),
            }
    base_rss, _ = readings["bare import (baseline)"]
    print_table(
        "Resident memory (MiB)",
        ["process", "VmRSS", "VmHWM", "RSS / baseline"],
        [
            [k, f"{rss / 1024:.1f}", f"{hwm / 1024:.1f}", f"{rss / base_rss:.2f}x"]
            for k, (rss, hwm) in readings.items()
        ],
    )
    one_rss, one_hwm = readings["daemon, 1 account"]
    many_rss, many_hwm = readings[f"daemon, {many} accounts"]
    per_account = (many_rss - one_rss) / max(many - 1, 1)
    print(f"  per extra account: {per_account:.1f} KiB")
    result(
        "rss_mib_1",
        one_rss / 1024,
        one_rss / base_rss,
        hwm_mib=f"{one_hwm / 1024:.1f}",
        baseline_rss_mib=f"{base_rss / 1024:.1f}",
    )
    result(
        f"rss_mib_{many}",
        many_rss / 1024,
        many_rss / base_rss,
        hwm_mib=f"{many_hwm / 1024:.1f}",
        baseline_rss_mib=f"{base_rss / 1024:.1f}",
        per_account_kib=f"{per_account:.1f}",
    )


if __name__ == "__main__":
    asyncio.run(main())
