"""The order the suite runs in: the longest tests first, and few CPU-heavy ones at once.

The suite's tests mostly wait (second-long tokens, real processes), so it runs in more
pytest-xdist workers than the machine has cores (conftest.py). Two things then decide how long
a run takes and whether its timing tests hold:

- **The longest tests start first**, each on a worker of its own, and the quick ones fill the
  gaps: the run lasts as long as its busiest worker.
- **At most HEAVY_AT_ONCE CPU-heavy tests run at once** (several real fleet nodes, a benchmark's
  quick run): measured 2026-12-02 on 2 cores, five of them side by side failed two fleet
  tests whose tokens live 5-6 s (a node fell behind its claims); three at a time passed.

How long a test takes and how much CPU it uses (with every process it starts) come from
tests/durations.json, which `pytest --record-durations` writes from a run; a slow(seconds=N)
marker counts too. A test in neither counts as quick and light.

xdist keeps two tests queued on each worker: the one running and the next. The scheduler below
chooses the next one when a test ends; behind a long test it queues the shortest one left (a
quick one while there are any), so no long test waits behind another while a worker is free:
in a run of long tests only (.ci/soak-test's), the 2-minute soak once had the 80-second fleet
soak queued behind it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScheduling

#: Each recorded test's [wall seconds, CPU seconds], setup and teardown included.
DURATIONS = Path(__file__).with_name("durations.json")
#: Tests shorter than this are the quick ones (not recorded; queued behind long ones).
LONG_SECONDS = 0.5
#: A heavy test uses at least this much CPU (its processes included) ...
HEAVY_CPU_SECONDS = 1.5
#: ... at an average of at least this many cores while it runs.
HEAVY_CORES = 0.1
#: How many heavy tests may run (or wait queued on a worker) at once.
HEAVY_AT_ONCE = 3
#: The name of the file, in the run's shared directory, where a worker leaves the estimates
#: for the controller's scheduler (only the workers collect, and only they see the markers).
ESTIMATES_FILE = "test-estimates.json"


@dataclass(frozen=True)
class Estimate:
    """What a test is expected to cost: wall seconds and CPU seconds."""

    seconds: float = 0.0
    cpu: float = 0.0

    @property
    def long(self) -> bool:
        """True for a test worth starting early."""
        return self.seconds >= LONG_SECONDS

    @property
    def heavy(self) -> bool:
        """True for a test that keeps a good part of a core busy for a while."""
        return self.cpu >= HEAVY_CPU_SECONDS and self.cpu >= HEAVY_CORES * self.seconds


def read_durations(path: Path = DURATIONS) -> dict[str, Estimate]:
    """Return the recorded estimates (none when the file is missing)."""
    try:
        raw: dict[str, list[float]] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {nodeid: Estimate(*values) for nodeid, values in raw.items()}


def estimate(item: pytest.Item, recorded: Mapping[str, Estimate]) -> Estimate:
    """Return ``item``'s estimate: the recorded one, with its slow marker's seconds if longer."""
    found = recorded.get(item.nodeid, Estimate())
    marker = item.get_closest_marker("slow")
    if marker is not None:
        marked = float(marker.kwargs.get("seconds", marker.args[0] if marker.args else 0))
        if marked > found.seconds:
            found = Estimate(marked, found.cpu)
    return found


def longest_first(items: list[pytest.Item], estimates: Mapping[str, Estimate]) -> list[pytest.Item]:
    """Order long tests longest first, each followed by a quick one (for runs without the
    scheduler below, e.g. --dist load given by hand: xdist then sends tests in this order)."""
    long = sorted(
        (i for i in items if estimates[i.nodeid].long),
        key=lambda i: estimates[i.nodeid].seconds,
        reverse=True,
    )
    quick = [i for i in items if not estimates[i.nodeid].long]
    ordered: list[pytest.Item] = []
    for item in long:
        ordered.append(item)
        if quick:
            ordered.append(quick.pop())
    return ordered + quick


def write_estimates(path: Path, estimates: Mapping[str, Estimate]) -> None:
    """Leave the estimates for the controller (every worker writes the same; rename is atomic)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(json.dumps({k: [e.seconds, e.cpu] for k, e in estimates.items()}))
    partial.replace(path)


class TimedScheduling(LoadScheduling):  # type: ignore[misc]
    """xdist's load scheduling, choosing each next test by the rules in this module's doc.

    It reuses LoadScheduling's bookkeeping (``pending``, ``node2pending``, ``collection``) and
    replaces only the choice of what to send.
    """

    def __init__(self, config: pytest.Config, log: Any, estimates_path: Path) -> None:
        """Schedule like --dist load, with the estimates the workers leave at estimates_path."""
        super().__init__(config, log)
        self.estimates_path = estimates_path
        self.estimates: list[Estimate] = []

    def schedule(self) -> None:
        """After the collection: read the estimates and give every worker its first two tests."""
        assert self.collection_is_completed
        if self.collection is not None:  # a worker added later: treat like the others
            for node in self.nodes:
                self.check_schedule(node)
            return
        if not self._check_nodes_have_same_collection():
            self.log("**Different tests collected, aborting run**")
            return
        self.collection = next(iter(self.node2collection.values()))
        try:
            raw = json.loads(self.estimates_path.read_text())
            known = {k: Estimate(*v) for k, v in raw.items()}
        except (OSError, ValueError):
            known = read_durations()
        self.estimates = [known.get(nodeid, Estimate()) for nodeid in self.collection]
        # Longest first; the quick ones in collection order.
        self.pending[:] = sorted(
            range(len(self.collection)), key=lambda i: -self.estimates[i].seconds
        )
        if not self.collection:
            return
        for node in self.nodes:
            self.fill(node)
        if not self.pending:  # fewer tests than places: a worker runs its last one once told
            for node in self.nodes:
                node.shutdown()

    def check_schedule(self, node: Any, duration: float = 0) -> None:
        """When a test ended on ``node``: queue its next test, or shut it down when none is left."""
        if node.shutting_down:
            return
        if self.pending:
            self.fill(node)
        else:
            node.shutdown()

    def fill(self, node: Any) -> None:
        """Give ``node`` tests until two wait on it (the worker runs one once it knows the next)."""
        queue: list[int] = self.node2pending[node]
        while len(queue) < 2 and self.pending:
            index = self.choose(queue[-1] if queue else None)
            self.pending.remove(index)
            queue.append(index)
            node.send_runtest_some([index])

    def choose(self, before: int | None) -> int:
        """Return the pending test to run after ``before`` (the last one queued on the worker)."""
        heavy_now = sum(self.estimates[i].heavy for q in self.node2pending.values() for i in q)
        allowed = [
            i for i in self.pending if heavy_now < HEAVY_AT_ONCE or not self.estimates[i].heavy
        ]
        # Only heavy tests left: running one beats leaving a worker idle.
        candidates = allowed or self.pending
        if before is not None and self.estimates[before].long:
            # It waits until the long test ends: the shortest left (a quick one while there
            # are any), so no long test waits behind another while a worker could take it.
            return min(reversed(candidates), key=lambda i: self.estimates[i].seconds)
        long = [i for i in candidates if self.estimates[i].long]  # longest first
        return long[0] if long else candidates[0]


def format_durations(durations: Mapping[str, list[float]]) -> str:
    """Return durations.json's text: one test a line, so a new recording diffs readably."""
    lines = [f"{json.dumps(nodeid)}: [{wall}, {cpu}]" for nodeid, (wall, cpu) in durations.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def recorded_durations(reports: Iterable[tuple[str, float, float]]) -> dict[str, list[float]]:
    """Add up each test's phases (nodeid, seconds, cpu) and keep those worth recording."""
    totals: dict[str, list[float]] = {}
    for nodeid, seconds, cpu in reports:
        wall_cpu = totals.setdefault(nodeid, [0.0, 0.0])
        wall_cpu[0] += seconds
        wall_cpu[1] += cpu
    return {
        nodeid: [round(seconds, 1), round(cpu, 1)]
        for nodeid, (seconds, cpu) in sorted(totals.items())
        if seconds >= LONG_SECONDS
    }
