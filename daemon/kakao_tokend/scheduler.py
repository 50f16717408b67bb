"""APScheduler 3.x wiring: one date job per account at its next wake-up, plus a heartbeat.

APScheduler waits on the monotonic clock, which stops during a suspend, and decides what is
due from the wall clock; a late one-shot job is dropped unless ``misfire_grace_time`` is None.
So every job here runs however late it is, and a heartbeat re-checks every account against
the wall clock at least every ``heartbeat`` seconds (pitfalls.md §1.3–1.4). The heartbeat is
a plain asyncio task on the monotonic clock, not an APScheduler interval job: after the wall
clock steps back, APScheduler finds nothing due until the wall clock has caught up again, and
the safety net must not stop exactly then. All scheduler calls live in this module so a move
to APScheduler 4 touches one file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .refresher import AccountManager
from .status import AccountEvent

log = logging.getLogger(__name__)


def _job_id(account: str) -> str:
    return f"account:{account}"


class RefreshScheduler:
    """Runs each account's refresh at its planned time and re-checks them all on a heartbeat."""

    def __init__(self, *, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.managers: dict[str, AccountManager] = {}
        #: time.monotonic() of the last heartbeat; the watchdog stops pinging when it is stale.
        self.last_beat = time.monotonic()
        self._planned: dict[str, datetime | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        #: Set by shutdown(): from then on nothing new is planned or started.
        self.stopped = False
        self._scheduler = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={
                # None: a late refresh runs however late it is, never silently dropped.
                "misfire_grace_time": None,
                "coalesce": True,
                "max_instances": 1,
            },
        )

    def start(self) -> None:
        """Start the scheduler (inside the running loop) and the heartbeat."""
        self._scheduler.start()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        self.last_beat = time.monotonic()

    async def _heartbeat_loop(self) -> None:
        """Beat every ``heartbeat`` seconds of the monotonic clock (read anew after a reload)."""
        while not self.stopped:
            await asyncio.sleep(self.heartbeat)
            try:
                await self._beat()
            except Exception:  # _beat guards each account; this only keeps the loop alive
                log.exception("heartbeat failed")

    def shutdown(self) -> None:
        """Stop scheduling new work, for good (idempotent). In-flight refreshes go on."""
        self.stopped = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._scheduler.running:
            # wait=False: APScheduler cannot wait for coroutine jobs anyway (it cancels them);
            # refreshes survive that because they run shielded in the manager's own task.
            self._scheduler.shutdown(wait=False)

    def is_healthy(self) -> bool:
        """Return True while the heartbeat keeps running (for the systemd watchdog)."""
        return time.monotonic() - self.last_beat < max(3 * self.heartbeat, 5.0)

    def set_heartbeat(self, seconds: float) -> None:
        """Change the heartbeat interval (after a config reload)."""
        if seconds == self.heartbeat:
            return
        self.heartbeat = seconds
        if self._heartbeat is not None:
            # Restart the wait, so a shorter heartbeat takes effect now, not after the old one.
            self._heartbeat.cancel()
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def add(self, manager: AccountManager) -> None:
        """Start scheduling ``manager``'s account."""
        self.managers[manager.name] = manager
        manager.listeners.append(self._on_event)
        self.plan(manager)

    def remove(self, name: str) -> AccountManager | None:
        """Stop scheduling an account (removed from the config)."""
        manager = self.managers.pop(name, None)
        self._planned.pop(name, None)
        job = self._scheduler.get_job(_job_id(name))
        if job is not None:
            job.remove()
        if manager is not None and self._on_event in manager.listeners:
            manager.listeners.remove(self._on_event)
        return manager

    def plan(self, manager: AccountManager) -> None:
        """(Re)schedule the account's one-shot job at its next wake-up, if that changed."""
        if self.stopped:
            return
        when = manager.next_wakeup()
        if self._planned.get(manager.name, "unset") == when:
            return
        self._planned[manager.name] = when
        job_id = _job_id(manager.name)
        if when is None:
            job = self._scheduler.get_job(job_id)
            if job is not None:
                job.remove()
            return
        self._scheduler.add_job(
            self._run_account,
            "date",
            run_date=when,
            args=[manager.name],
            id=job_id,
            replace_existing=True,
        )

    def plan_all(self, managers: Iterable[AccountManager] | None = None) -> None:
        """Re-plan every account (cheap: only changed wake-ups touch the scheduler)."""
        for manager in list(managers if managers is not None else self.managers.values()):
            self.plan(manager)

    def run_soon(self, manager: AccountManager, coro_name: str = "tick") -> None:
        """Run ``manager.tick()`` (or ``verify``) in a task this scheduler keeps track of."""
        if self.stopped:
            return
        task = asyncio.create_task(self._guarded(manager, coro_name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_event(self, event: AccountEvent) -> None:
        manager = self.managers.get(event.account)
        if manager is not None:
            self.plan(manager)

    async def _guarded(self, manager: AccountManager, what: str) -> None:
        try:
            if what == "verify":
                await manager.verify()
            elif what == "start":
                await self._start_account(manager)
            else:
                await manager.tick()
        except Exception:
            # One account's trouble never affects another: log and carry on.
            log.exception("account %s: unexpected error during %s", manager.name, what)
        finally:
            if manager.name in self.managers:
                self.plan(manager)

    async def _start_account(self, manager: AccountManager) -> None:
        """At start: refresh an overdue token at once, otherwise verify it with Kakao."""
        if manager.state is None:
            return
        if manager.needs_refresh(manager.clock()):
            await manager.refresh(reason="overdue at start")
        elif manager.policy.verify_on_start:
            await manager.verify()

    async def _run_account(self, name: str) -> None:
        manager = self.managers.get(name)
        if manager is None:
            return
        # The date job was removed from the store when it fired; plan the next one whatever
        # happens (pitfalls.md §1.3: a one-shot job that raises leaves nothing scheduled).
        # The work runs in our own task so this job ends at once: a next job planned while it
        # still ran would be due "now" and skipped by max_instances=1, then dropped.
        self._planned.pop(name, None)
        self.run_soon(manager)

    async def _beat(self) -> None:
        self.last_beat = time.monotonic()
        if self.stopped:
            return
        for manager in list(self.managers.values()):
            try:
                if not manager.busy:
                    # Pick up tokens written by `login` (also clears a re-login mark).
                    manager.notice_outside_changes()
                if manager.needs_refresh(manager.clock()) or manager.status.write_pending:
                    self.run_soon(manager)
                else:
                    self.plan(manager)
            except Exception:
                log.exception("account %s: heartbeat check failed", manager.name)

    async def drain(self, timeout: float) -> None:
        """Wait for start-up checks and ticks this scheduler started (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
