"""Start to READY: exec of `kakao-tokend run` until READY=1 on NOTIFY_SOCKET, vs a bare import.

Baseline: ``python -c "import aiohttp, apscheduler"`` from exec to exit (the least any daemon
on these libraries can take). The daemon has one account (and, reported separately, 1,000).
A baseline run precedes every daemon run (baseline, daemon, baseline, daemon with 1,000, ...)
so drift on a shared machine hits both alike; the medians and their ratios are printed. All
children run from compiled bytecode (see common.workdir).

On a loaded machine the wall-clock times of one process swing by 3x from run to run, so two
more ratios are printed: the median of each round's own ratio (the daemon run against the
baseline run just before it), and the same for CPU time (the daemon's until READY, from
/proc/PID/schedstat; the baseline's whole run, from getrusage), which waiting for a core does
not inflate.

``--before DIR`` starts a second daemon from another copy of the package in the same rounds
(each after its own baseline run), so a change is measured before and after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    FIRST_USER_ID,
    PYTHON,
    account_names,
    cpu_seconds,
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


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="also start the daemon from the kakao_tokend package in DIR (e.g. the daemon/"
        " directory of a checkout of the code before a change), in the same rounds: a"
        " before/after comparison in one run",
    )


@dataclass
class Variant:
    """One daemon code base and what its runs measured (each run next to its own baseline)."""

    label: str
    env: dict[str, str] | None
    baseline: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    #: Per round: (daemon / its baseline) in wall-clock time and in CPU time.
    paired: list[tuple[float, float]] = field(default_factory=list)

    async def round(self, directory: Path, config: Path, *, keep: bool) -> None:
        """Run the baseline, then this daemon; keep the numbers unless it is a warm-up."""
        elapsed, base_cpu = await _baseline(directory)
        ready, cpu = await _daemon(config, self.env)
        if keep:
            self.baseline.append(elapsed)
            self.ready.append(ready)
            self.paired.append((ready / elapsed, cpu / base_cpu))


async def main() -> None:
    args = parse_args(__doc__ or "", options=_options)
    runs = 1 if args.quick else 15  # --quick proves the script runs: one round after the warm-up
    many, many_runs = (20, 1) if args.quick else (1000, 7)
    sources = [("", None)]
    if args.before is not None:
        sources.append((" (before)", {"PYTHONPATH": str(args.before.resolve())}))
    one = [Variant(f"1 account{label}", env) for label, env in sources]
    lots = [Variant(f"{many} accounts{label}", env) for label, env in sources]
    with workdir(args.keep) as directory:
        async with running_emulator(emulator_settings()) as emulator:
            config = write_config(directory, emulator)
            seed_accounts(emulator, config)
            # The same with many accounts (each is loaded and its token file checked).
            sub = directory / "many"
            sub.mkdir()
            many_config = write_config(sub, emulator, accounts=account_names(many))
            seed_accounts(emulator, many_config, first_user=FIRST_USER_ID + 1)
            # Round 0 is a warm-up (page cache, bytecode). Every round runs the baseline
            # before each daemon, so drift on a shared machine hits both alike.
            for index in range(runs + 1):
                for variant in one:
                    await variant.round(directory, config, keep=index > 0)
                if index <= many_runs:
                    for variant in lots:
                        await variant.round(directory, many_config, keep=index > 0)
    rows = []
    for variant in [*one, *lots]:
        rows.append([f"bare import, the runs before {variant.label}", *_ms(variant.baseline)])
        rows.append([f"kakao-tokend run -> READY=1, {variant.label}", *_ms(variant.ready)])
    print_table(
        f"Start to READY ({runs} runs each with 1 account, {many_runs} with {many}; median)",
        ["measure", "median ms", "min ms", "max ms"],
        rows,
    )
    for variant in [*one, *lots]:
        ratio = median(variant.ready) / median(variant.baseline)
        print(
            f"  {variant.label}: ratio daemon/baseline {ratio:.2f}x; per round: wall"
            f" {_spread([wall for wall, _ in variant.paired])},"
            f" CPU {_spread([cpu for _, cpu in variant.paired])}"
        )
    for variant, name in (
        *((v, "startup_ready_ms") for v in one),
        *((v, f"startup_ready_ms_{many}") for v in lots),
    ):
        result(
            name + ("_before" if variant.env else ""),
            median(variant.ready) * 1000,
            median(variant.ready) / median(variant.baseline),
            baseline_ms=f"{median(variant.baseline) * 1000:.1f}",
            paired_ratio=f"{median([wall for wall, _ in variant.paired]):.3f}",
            cpu_ratio=f"{median([cpu for _, cpu in variant.paired]):.3f}",
        )


async def _baseline(directory: Path) -> tuple[float, float]:
    """Run the bare import once; return its exec-to-exit time and its CPU time, in seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    base = await spawn(BASELINE, directory / "baseline.log")
    await base.proc.wait()
    elapsed = time.monotonic() - base.started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu


async def _daemon(config: Path, env: dict[str, str] | None) -> tuple[float, float]:
    """Start the daemon once; return its exec-to-READY time and its CPU time until READY."""
    daemon, ready = await start_daemon(config, env=env)
    cpu = cpu_seconds(daemon.pid)
    await daemon.stop()
    return ready, cpu


def _spread(ratios: list[float]) -> str:
    """ "1.42x (1.30-1.61x)": the median and the range of per-round ratios."""
    return f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"


def _ms(values: list[float]) -> list[str]:
    return [
        f"{median(values) * 1000:.1f}",
        f"{min(values) * 1000:.1f}",
        f"{max(values) * 1000:.1f}",
    ]


if __name__ == "__main__":
    asyncio.run(main())
