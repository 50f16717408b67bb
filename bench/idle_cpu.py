"""Idle CPU: CPU-seconds per hour of the daemon between refreshes, 1 and N accounts, vs idle Python.

Tokens are long-lived (6 h, the emulator's default like Kakao's), so nothing is due during the
window: what remains is the heartbeat (re-checks every account: one stat() of its state file and
a due-time comparison), the status/alert timers and the event loop itself. The daemon uses the
configured heartbeat (default 60 s; ``--heartbeat`` to change it). The baseline is
``python -c "import asyncio; asyncio.run(asyncio.sleep(3600))"``. All three processes are
measured over the SAME window, from /proc/PID/schedstat (ns resolution; /proc/PID/stat
utime+stime, 10 ms ticks, is printed alongside), after every account's start-up check is done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from common import (
    PYTHON,
    cpu_seconds,
    cpu_ticks_seconds,
    emulator_settings,
    parse_args,
    print_table,
    result,
    seeded_daemon,
    spawn,
    workdir,
)

from kakao_tokend.emulator import running_emulator

BASELINE = [PYTHON, "-c", "import asyncio; asyncio.run(asyncio.sleep(3600))"]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accounts", type=int, help="the many-accounts case (default 1000)")
    parser.add_argument(
        "--heartbeat", help='daemon heartbeat, e.g. "60s" (default: the config default)'
    )
    parser.add_argument("--window", type=float, help="measuring window in seconds (default 120)")


async def main() -> None:
    args = parse_args(__doc__ or "", options=_options)
    many = args.accounts or (20 if args.quick else 1000)
    heartbeat = args.heartbeat or ("1s" if args.quick else None)
    window = args.window or (3.0 if args.quick else 120.0)
    with workdir(args.keep) as directory:
        async with (
            running_emulator(emulator_settings()) as emulator,
            contextlib.AsyncExitStack() as stack,
        ):
            one = await stack.enter_async_context(
                seeded_daemon(directory, emulator, accounts=1, heartbeat=heartbeat, first_user=1)
            )
            lots = await stack.enter_async_context(
                seeded_daemon(directory, emulator, accounts=many, heartbeat=heartbeat)
            )
            base = await spawn(BASELINE, directory / "baseline.log")
            stack.push_async_callback(base.stop)
            await asyncio.sleep(1.0)  # let the baseline finish importing
            processes = {
                "idle python (baseline)": base,
                "daemon, 1 account": one,
                f"daemon, {many} accounts": lots,
            }
            before = {
                k: (cpu_seconds(p.pid), cpu_ticks_seconds(p.pid)) for k, p in processes.items()
            }
            await asyncio.sleep(window)
            after = {
                k: (cpu_seconds(p.pid), cpu_ticks_seconds(p.pid)) for k, p in processes.items()
            }
    per_hour = {k: (after[k][0] - before[k][0]) * 3600 / window for k in processes}
    ticks_hour = {k: (after[k][1] - before[k][1]) * 3600 / window for k in processes}
    beat = heartbeat or "60s (default)"
    print_table(
        f"Idle CPU over a {window:g} s window, heartbeat {beat}, extrapolated to one hour",
        ["process", "CPU s/hour (schedstat)", "CPU s/hour (stat ticks)", "share of a core"],
        [
            [k, f"{per_hour[k]:.3f}", f"{ticks_hour[k]:.2f}", f"{per_hour[k] / 3600:.5%}"]
            for k in processes
        ],
    )
    baseline = per_hour["idle python (baseline)"]
    for label, key in (("1", "daemon, 1 account"), (str(many), f"daemon, {many} accounts")):
        ratio = per_hour[key] / baseline if baseline > 0 else float("inf")
        result(
            f"idle_cpu_s_per_hour_{label}",
            per_hour[key],
            ratio,
            baseline_s_per_hour=f"{baseline:.4f}",
            heartbeat=beat.split()[0],
            window_s=f"{window:g}",
        )


if __name__ == "__main__":
    asyncio.run(main())
