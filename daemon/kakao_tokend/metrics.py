"""Prometheus metrics computed at scrape time from the account managers (a per-app registry).

prometheus_client is imported at the first scrape, not with this module: the daemon builds
its metrics (and starts counting failures and refresh durations) before it is READY, and
importing the client and its exposition server (wsgiref, http.server) cost every start
about 10 ms, a daemon that is never scraped included. What is counted between scrapes is
plain data here (:class:`DaemonCollector`); the metric families are made from it when asked.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import platform
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import __version__
from .daemon import Daemon
from .health import Severity
from .status import FAILURES, AccountEvent, EventKind, Health

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Upper bounds (seconds) for Kakao's answer to a refresh: normally well under a second; the
#: default [kakao] timeout is 30 s.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


class DaemonCollector:
    """Reads every number from the daemon when scraped; only failure classes and refresh
    durations are counted here (a prometheus_client Collector).

    The managers count attempts, successes, failures and rotations themselves; failures by
    class come from the managers' events (``retrying``, ``relogin``, ``config``), durations
    from their ``refresh_call`` events.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.failures: Counter[tuple[str, str]] = Counter()
        #: (account, outcome) -> refresh calls per DURATION_BUCKETS bucket (the last one:
        #: above every bound), and the sum of their seconds.
        self.durations: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def on_event(self, event: AccountEvent) -> None:
        """Manager listener: count a failure under its class; time each refresh call."""
        if event.kind in FAILURES:
            label = str(event.data.get("error_class") or event.kind)
            self.failures[(event.account, label)] += 1
        elif event.kind is EventKind.REFRESH_CALL:
            outcome = str(event.data.get("outcome", "failure"))
            seconds = max(0.0, float(event.data.get("seconds", 0.0)))
            key = (event.account, outcome)
            if key not in self.durations:
                self.durations[key] = ([0] * (len(DURATION_BUCKETS) + 1), [0.0])
            counts, total = self.durations[key]
            # A bucket counts the calls that took at most its bound (Prometheus' "le").
            counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            total[0] += seconds

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from the current state."""
        from prometheus_client.core import (  # at the first scrape: see the module docstring
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        daemon = self.daemon
        now = daemon.clock()
        access = GaugeMetricFamily(
            "kakao_tokend_access_token_expires_in_seconds",
            "Seconds until the access token expires (negative: expired).",
            labels=["account"],
        )
        refresh = GaugeMetricFamily(
            "kakao_tokend_refresh_token_expires_in_seconds",
            "Seconds until the refresh token expires (negative: expired).",
            labels=["account"],
        )
        last_success = GaugeMetricFamily(
            "kakao_tokend_last_refresh_success_timestamp_seconds",
            "Unix time of the last successful refresh or login (0: never).",
            labels=["account"],
        )
        generation = GaugeMetricFamily(
            "kakao_tokend_token_generation",
            "Generation of the current token set (grows by one per refresh or login).",
            labels=["account"],
        )
        healthy = GaugeMetricFamily(
            "kakao_tokend_account_health",
            "1 for the account's current health state, 0 for the others.",
            labels=["account", "state"],
        )
        level = GaugeMetricFamily(
            "kakao_tokend_account_level",
            "The account's grade, as `kakao-tokend status` exits: 0 ok, 1 warning, 2 critical.",
            labels=["account"],
        )
        conditions = GaugeMetricFamily(
            "kakao_tokend_account_conditions",
            "Conditions that need a person right now, by severity (what alerts are about).",
            labels=["account", "severity"],
        )
        serving = GaugeMetricFamily(
            "kakao_tokend_account_serving",
            "1 while consumers get a valid, published token (what /healthz checks).",
            labels=["account"],
        )
        attempts = CounterMetricFamily(
            "kakao_tokend_refresh_attempts",
            "Refresh calls to Kakao since the daemon started.",
            labels=["account"],
        )
        successes = CounterMetricFamily(
            "kakao_tokend_refresh_successes",
            "Successful refreshes since the daemon started.",
            labels=["account"],
        )
        failures = CounterMetricFamily(
            "kakao_tokend_refresh_failures",
            "Failed refreshes since the daemon started, by error class.",
            labels=["account", "class"],
        )
        rotations = CounterMetricFamily(
            "kakao_tokend_refresh_token_rotations",
            "Refresh-token rotations seen since the daemon started.",
            labels=["account"],
        )
        for name, manager in daemon.managers.items():
            state = manager.state
            counters = manager.status.counters
            if state is not None:
                tokens = state.tokens
                access.add_metric([name], tokens.access_remaining(now).total_seconds())
                refresh.add_metric([name], tokens.refresh_remaining(now).total_seconds())
                generation.add_metric([name], state.generation)
            success_at = manager.status.last_success_at
            last_success.add_metric([name], success_at.timestamp() if success_at else 0.0)
            for state_name in Health:
                healthy.add_metric(
                    [name, state_name.value], 1.0 if manager.status.health is state_name else 0.0
                )
            graded = manager.health(now)
            level.add_metric([name], graded.level)
            serving.add_metric([name], 1.0 if graded.serving_problem is None else 0.0)
            by_severity = Counter(c.severity for c in graded.conditions)
            for severity in (Severity.WARNING, Severity.CRITICAL):
                conditions.add_metric([name, severity.label], by_severity[severity])
            attempts.add_metric([name], counters.get("attempts", 0))
            successes.add_metric([name], counters.get("successes", 0))
            rotations.add_metric([name], counters.get("rotations", 0))
        for (name, label), count in sorted(self.failures.items()):
            if name in daemon.managers:
                failures.add_metric([name, label], count)
        yield from (access, refresh, last_success, generation, healthy, level, conditions, serving)
        yield from (attempts, successes, failures, rotations)
        durations = HistogramMetricFamily(
            "kakao_tokend_refresh_duration_seconds",
            "How long Kakao took to answer a refresh call, by outcome (success or failure).",
            labels=["account", "outcome"],
        )
        bounds = [*map(floatToGoString, DURATION_BUCKETS), "+Inf"]
        for (name, outcome), (counts, total) in self.durations.items():
            if name in daemon.managers:  # accounts removed by a reload go
                cumulative = [float(n) for n in itertools.accumulate(counts)]
                buckets = list(zip(bounds, cumulative, strict=True))
                durations.add_metric([name, outcome], buckets, total[0])
        yield durations
        alerts = self._alerts()
        if alerts is not None:
            yield alerts
        yield from self._fleet()
        yield InfoMetricFamily(
            "kakao_tokend_build",
            "The running kakao-tokend's version and Python version (always 1).",
            value={"version": __version__, "python": platform.python_version()},
        )

    def _fleet(self) -> Iterator[Metric]:
        """Fleet mode: the node, the store's health, claims, notifications, who refreshed."""
        from prometheus_client.core import (  # see collect
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        daemon = self.daemon
        fleet = daemon.fleet
        if fleet is None:
            return
        stats = fleet.stats
        node = fleet.node
        yield InfoMetricFamily(
            "kakao_tokend_node",
            "This fleet node and the PostgreSQL store it belongs to (always 1).",
            value={"node": node, "store_id": fleet.store_id},
        )
        up = GaugeMetricFamily(
            "kakao_tokend_store_up", "1 while the PostgreSQL store answers this node, else 0."
        )
        up.add_metric([], 1.0 if stats.up else 0.0)
        yield up
        if stats.last_ok is not None:
            since = GaugeMetricFamily(
                "kakao_tokend_store_last_ok_age_seconds",
                "Seconds since the store last answered this node.",
            )
            since.add_metric([], max(0.0, time.monotonic() - stats.last_ok))
            yield since
        if stats.last_sync is not None:
            synced = GaugeMetricFamily(
                "kakao_tokend_store_last_sync_age_seconds",
                "Seconds since the last notification or poll brought this node up to date.",
            )
            synced.add_metric([], max(0.0, time.monotonic() - stats.last_sync))
            yield synced
        for metric, value, text in (
            ("claim_conflicts", stats.claim_conflicts, "Rows another node held when wanted."),
            ("commits", stats.commits, "New token sets this node committed."),
            ("idle_holds", stats.idle_holds, "Row locks that ended with nothing to commit."),
            ("failed_commits", stats.failed_commits, "Commits that failed (rescue files)."),
            ("notifications", stats.notifications, "Change notifications received."),
            ("row_reads", stats.row_reads, "Queries re-reading rows after notifications/polls."),
            ("poll_rows", stats.poll_rows, "Rows the heartbeat polls re-read (changed ones)."),
            ("full_polls", stats.full_polls, "Heartbeat polls that compared every row."),
        ):
            family = CounterMetricFamily(f"kakao_tokend_store_{metric}", text)
            family.add_metric([], value)
            yield family
        if stats.last_notify_lag is not None:
            lag = GaugeMetricFamily(
                "kakao_tokend_store_notify_lag_seconds",
                "Time from a row's commit to its notification's arrival here (the last one).",
            )
            lag.add_metric([], stats.last_notify_lag)
            yield lag
        pool = GaugeMetricFamily(
            "kakao_tokend_store_pool_connections",
            "The store connection pool: its connections, the idle ones, requests waiting.",
            labels=["kind"],
        )
        for kind, value in fleet.pool_stats().items():
            pool.add_metric([kind], value)
        yield pool
        rescues = GaugeMetricFamily(
            "kakao_tokend_store_rescue_pending",
            "Accounts whose newest tokens wait in a rescue file to be committed to the store.",
        )
        rescues.add_metric([], sum(1 for m in daemon.managers.values() if m.status.write_pending))
        yield rescues
        refreshed_by = GaugeMetricFamily(
            "kakao_tokend_account_refreshed_by",
            "The node that produced the account's current tokens (always 1).",
            labels=["account", "node"],
        )
        for name in daemon.managers:
            row = fleet.rows.get(name)
            if row is not None and row.refreshed_by:
                refreshed_by.add_metric([name, row.refreshed_by], 1.0)
        yield refreshed_by

    def _alerts(self) -> GaugeMetricFamily | None:
        """Active alerts by account and severity (when the daemon runs the alerts capability)."""
        from prometheus_client.core import GaugeMetricFamily  # see collect

        center = self.daemon.alerts
        if center is None:
            return None
        family = GaugeMetricFamily(
            "kakao_tokend_active_alerts",
            "Alerts currently active, by account and severity.",
            labels=["account", "severity"],
        )
        for name in self.daemon.managers:
            try:
                counts = Counter(str(alert.get("severity")) for alert in center.active(name))
            except Exception:  # alerts are another module's business; never break a scrape
                log.exception("cannot read the active alerts of %s for /metrics", name)
                continue
            for severity in dict.fromkeys(("info", "warning", "critical", *sorted(counts))):
                family.add_metric([name, severity], counts.get(severity, 0))
        return family


class Metrics:
    """The per-application registry: the daemon's collector plus the standard process,
    Python platform and garbage-collector metrics every Prometheus client exposes."""

    def __init__(self, daemon: Daemon) -> None:
        self.collector = DaemonCollector(daemon)
        self._registry: CollectorRegistry | None = None  # made at the first scrape

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        from prometheus_client import generate_latest  # see the module docstring

        return generate_latest(self.registry)

    @property
    def registry(self) -> CollectorRegistry:
        """The registry: the daemon's collector and the standard ones (made when first used)."""
        if self._registry is None:
            from prometheus_client import (  # see the module docstring
                GC_COLLECTOR,
                PLATFORM_COLLECTOR,
                PROCESS_COLLECTOR,
                CollectorRegistry,
            )

            registry = CollectorRegistry(auto_describe=False)
            registry.register(self.collector)
            for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(standard)
            self._registry = registry
        return self._registry
