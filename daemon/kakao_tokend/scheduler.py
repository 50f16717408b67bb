"""APScheduler 3.x wiring: one job for all accounts at the earliest due moment, plus a heartbeat.

An account costs a heap entry here, not a job: :class:`DueQueue` keeps "what is due when" and
arms a single APScheduler ``date`` job at the earliest moment; when it fires, every key whose
moment has passed goes to a callback. :class:`RefreshScheduler` feeds it the accounts' next
wake-ups and runs what is due, a few at a time.

APScheduler waits on the monotonic clock (``loop.call_later``), which stops during a suspend, and
decides what is due from the wall clock; a late one-shot job is dropped unless
``misfire_grace_time`` is None. So the job here runs however late it is, and a heartbeat
hands over what the wall clock says is due at least every ``heartbeat`` seconds: without it a
refresh planned 5 hours ahead would still be hours away after an 8-hour suspend. The heartbeat
is a plain asyncio task on the monotonic clock, not an APScheduler interval job: after the wall
clock steps back, APScheduler finds nothing due until the wall clock has caught up again, and the
safety net must not stop exactly then. All scheduler calls live in this module so a move to
APScheduler 4 touches one file.

The heartbeat does not walk every account: the due queue already knows, by the wall clock,
which accounts are due (a suspend or a clock stepped forward makes them due at once). It checks
one by one only the accounts the due queue cannot answer for: those whose write is pending or
whose retry waits on the monotonic clock, those told of an event or run since the last beat,
those busy (refreshing, writing) when the daemon heard of an outside change (:meth:`look_at`:
checked at every beat until they take it), and, once the wall clock went back behind the
latest beat or plan, every account (a token may now look issued in the future). Tokens
written by other processes reach the daemon through its state-file watch, the CLI's socket
and, in a fleet, the store's notifications and poll.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from .config import REFRESH_HEARTBEAT
from .kakao import CONNECTION_LIMIT
from .refresher import AccountManager, state_changes
from .status import AccountEvent, Health
from .tokens import heartbeat_interval

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

#: What a run of an account does: a periodic tick, or the start-up check.
Work = Literal["tick", "start"]

#: At most this many accounts' ticks and start-up checks run at once. More would only wait for
#: one of the HTTP session's connections (holding memory, and eating into their own request
#: timeouts while they wait); the rest wait here, in due order, and start as others finish.
MAX_RUNNING = CONNECTION_LIMIT


def new_apscheduler() -> AsyncIOScheduler:
    """Return an AsyncIOScheduler whose jobs run however late they are, one at a time."""
    # Imported here: a file-mode daemon makes its scheduler right after READY, and this
    # module's import (its entry-point scans, the pool executor with multiprocessing) cost
    # every start about 88 M instructions before it (docs/benchmarks.md).
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    return AsyncIOScheduler(
        timezone=UTC,
        job_defaults={
            # None: a late run still runs; the default (1 s) silently drops a late date job.
            "misfire_grace_time": None,
            # Runs missed meanwhile (a suspend) collapse into one.
            "coalesce": True,
            "max_instances": 1,
        },
    )


class DueQueue(Generic[K]):
    """What is due when: each key has one due moment; once it passed, ``on_due(key)`` is called.

    A heap keeps the moments, and one APScheduler ``date`` job (id ``job_id``) is armed at the
    earliest: a thousand keys cost a thousand small heap entries, not a thousand jobs. A key is
    handed to ``on_due`` once per planned moment, and leaves the queue then; plan it again with
    :meth:`set`. Re-planning a key replaces its moment (the old heap entry goes stale and is
    skipped). Nothing here knows what a key is: the refresh scheduler uses account names, a
    fleet node can use what its database says is due.
    """

    def __init__(
        self,
        scheduler: AsyncIOScheduler,
        on_due: Callable[[K], None],
        *,
        job_id: str = "due",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._scheduler = scheduler
        self._on_due = on_due
        self._job_id = job_id
        self._clock = clock
        self._due: dict[K, datetime] = {}
        #: (moment, insertion number, key); entries whose moment no longer matches are stale.
        self._heap: list[tuple[datetime, int, K]] = []
        self._order = itertools.count()
        #: The run date of the APScheduler job as we last armed it (None: no job).
        self._armed: datetime | None = None
        self._arm_pending = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def when(self, key: K) -> datetime | None:
        """Return the moment ``key`` is due, or None when it is not planned."""
        return self._due.get(key)

    def next_due(self) -> datetime | None:
        """Return the earliest planned moment (None: nothing planned)."""
        self._drop_stale_head()
        return self._heap[0][0] if self._heap else None

    def set(self, key: K, when: datetime | None) -> None:
        """Plan ``key`` at ``when`` (aware), replacing an earlier plan; None removes it."""
        if when is None:
            self.discard(key)
            return
        if self._due.get(key) == when:
            return
        self._due[key] = when
        heapq.heappush(self._heap, (when, next(self._order), key))
        if len(self._heap) > 2 * len(self._due) + 64:
            # Re-planning leaves stale entries behind; drop them before they add up.
            self._heap = [(w, n, k) for w, n, k in self._heap if self._due.get(k) == w]
            heapq.heapify(self._heap)
        if self._armed is None or when < self._armed:
            self._arm_soon()

    def discard(self, key: K) -> None:
        """Forget ``key``'s plan (its heap entry goes stale; a job armed for it wakes for
        nothing and re-arms)."""
        if self._due.pop(key, None) is not None and not self._due:
            self._arm_soon()

    def pop_due(self, now: datetime) -> list[K]:
        """Remove and return every key due at ``now``, earliest first."""
        keys: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key = heapq.heappop(heap)
            if self._due.get(key) == when:
                del self._due[key]
                keys.append(key)
        return keys

    def run_due(self) -> int:
        """Hand every key due now to ``on_due`` (the job does this; a heartbeat may too).

        Returns how many there were. A callback that raises is logged; the others still run.
        """
        keys = self.pop_due(self._clock())
        for key in keys:
            try:
                self._on_due(key)
            except Exception:
                log.exception("due-queue callback failed for %r", key)
        self._arm_soon()
        return len(keys)

    def check_armed(self) -> None:
        """Re-arm the job if APScheduler lost it (a safety net the heartbeat calls)."""
        if self._armed is not None and self._scheduler.get_job(self._job_id) is None:
            self._armed = None
        self._arm_soon()

    def close(self) -> None:
        """Arm nothing any more (the scheduler is shutting down); the plans are kept."""
        self._closed = True

    async def _fire(self) -> None:
        # A date job leaves APScheduler's store when it is submitted: nothing is armed now.
        # This returns at once (the callbacks only start work); the next job is armed by a
        # later loop callback, after this run ended, so max_instances=1 can never skip it.
        self._armed = None
        self.run_due()

    def _arm_soon(self) -> None:
        """Re-arm the job at the earliest moment, once, on the next loop iteration.

        Planning a thousand accounts at start then moves the job once, not a thousand times.
        """
        if self._arm_pending or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._arm()
            return
        self._arm_pending = True
        loop.call_soon(self._arm)

    def _arm(self) -> None:
        self._arm_pending = False
        if self._closed:
            return
        head = self.next_due()
        if head == self._armed:
            return
        if head is None:
            if self._scheduler.get_job(self._job_id) is not None:
                self._scheduler.remove_job(self._job_id)
        else:
            self._scheduler.add_job(
                self._fire, "date", run_date=head, id=self._job_id, replace_existing=True
            )
        self._armed = head

    def _drop_stale_head(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)


class RefreshScheduler:
    """Runs each account's tick at its planned time and re-checks them all on a heartbeat.

    Every account has at most one run (tick or start-up check) queued or running here; a run
    asked for meanwhile is folded into it, and the account is planned anew when it ends.
    """

    def __init__(self, *, heartbeat: float, max_running: int = MAX_RUNNING) -> None:
        self.heartbeat = heartbeat
        self.max_running = max_running
        self.managers: dict[str, AccountManager] = {}
        #: Bumped by add and remove; with refresher.state_changes, when interval() last
        #: walked the accounts, and what it found (the shortest access lifetime, the first
        #: refresh token to die; None: no tokens).
        self._members = 0
        self._times_seen: tuple[int, int] | None = None
        self._times: tuple[timedelta, datetime] | None = None
        #: time.monotonic() of the last heartbeat; the watchdog stops pinging when it is stale.
        self.last_beat = time.monotonic()
        #: Set by shutdown(): from then on nothing new is planned or started.
        self.stopped = False
        self._scheduler = new_apscheduler()
        self._due: DueQueue[str] = DueQueue(
            self._scheduler, self._on_due, job_id="accounts", clock=self._now
        )
        #: Runs waiting for a free place, in the order they were asked for.
        self._waiting: deque[tuple[AccountManager, Work]] = deque()
        #: Accounts with a run waiting or running (the manager objects: a reload may replace one).
        self._claimed: set[AccountManager] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        #: One listener object for every account (``self._on_event`` makes a new one per use).
        self._listener: Callable[[AccountEvent], None] = self._on_event
        #: Accounts the next heartbeat checks one by one (see the module's docstring).
        self._watch: set[str] = set()
        #: The latest wall-clock moment of a beat or plan: a clock behind it went back.
        self._seen: datetime | None = None
        #: Fleet mode: (name, next wake-up, now) -> True when the store's poll names the
        #: account again before that wake-up, so it needs no due-queue entry until then
        #: (FleetStore.names_in_time). None: every account is queued (file mode).
        self.named_in_time: Callable[[str, datetime, datetime], bool] | None = None

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    def start(self) -> None:
        """Start the scheduler (inside the running loop) and the heartbeat."""
        self._scheduler.start()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        self.last_beat = time.monotonic()

    async def _heartbeat_loop(self) -> None:
        """Beat every ``heartbeat`` seconds of the monotonic clock (read anew after a reload)."""
        while not self.stopped:
            await asyncio.sleep(self.interval())
            try:
                await self._beat()
            except Exception:  # _beat guards each account; this only keeps the loop alive
                log.exception("heartbeat failed")

    def shutdown(self) -> None:
        """Stop scheduling new work, for good (idempotent). Runs already started go on."""
        self.stopped = True
        self._waiting.clear()
        self._due.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._scheduler.running:
            # The job goes now: AsyncIOScheduler's shutdown runs one loop turn later, and a
            # wake-up queued before it would submit the due job and the shutdown then cancel
            # its task, which APScheduler logs as "Error running job accounts" (seen at the
            # end of a `demo` on a busy machine).
            self._scheduler.remove_all_jobs()
            # wait=False: APScheduler cannot wait for coroutine jobs anyway (it cancels them);
            # refreshes survive that because they run shielded in the manager's own task.
            self._scheduler.shutdown(wait=False)

    def interval(self) -> float:
        """Return the beat: ``heartbeat``, or a share of the shortest access token's life when
        it is left at its default (tokens.heartbeat_interval); set by hand or not, never more
        than half of what the first refresh token to die has left (tokens.within_refresh_life):
        after the wall clock went back, the beat is what runs a retry kept on the monotonic
        clock, and a 60 s beat would run it after a refresh token dying in 5 s."""
        # Walked again only when a state or the set of accounts changed: asked twice a beat,
        # and a fleet node's 10,000 idle accounts keep their states packed (token_times reads
        # them without making their objects, still a microsecond each).
        seen = (state_changes(), self._members)
        if seen != self._times_seen:
            times = [t for m in self.managers.values() if (t := m.token_times()) is not None]
            self._times = (
                (min(life for life, _ in times), min(dies for _, dies in times)) if times else None
            )
            self._times_seen = seen
        if self._times is None:
            return heartbeat_interval(self.heartbeat, REFRESH_HEARTBEAT, None)
        shortest, dies = self._times
        return heartbeat_interval(
            self.heartbeat,
            REFRESH_HEARTBEAT,
            shortest,
            (dies - self._now()).total_seconds(),
        )

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
        self._members += 1
        manager.listen(self._listener)
        self.plan(manager)

    def remove(self, name: str) -> AccountManager | None:
        """Stop scheduling an account (removed from the config); a run not started is dropped."""
        manager = self.managers.pop(name, None)
        self._members += 1
        self._due.discard(name)
        self._watch.discard(name)
        if manager is not None:
            manager.unlisten(self._listener)
            if any(waiting is manager for waiting, _ in self._waiting):
                self._waiting = deque((m, w) for m, w in self._waiting if m is not manager)
                self._claimed.discard(manager)
        return manager

    def planned(self, name: str) -> datetime | None:
        """Return when the account's next run is planned (None: nothing planned)."""
        return self._due.when(name)

    def plan(self, manager: AccountManager) -> None:
        """(Re)plan the account's next run at its next wake-up (a no-op when unchanged), and
        have the heartbeat check it while the due queue cannot answer for it."""
        if self.stopped or self.managers.get(manager.name) is not manager:
            return
        when = manager.next_wakeup()
        now = self._now()
        if self._seen is None or now > self._seen:
            self._seen = now
        status = manager.status
        if (
            status.write_pending
            # Its retry (a configuration's slow one too) is kept on the monotonic clock.
            or status.health in (Health.RETRYING, Health.CONFIG)
            or manager.needs_refresh(manager.clock())  # e.g. issued "in the future"
        ):
            self._watch.add(manager.name)
            self._due.set(manager.name, when)
            return
        self._watch.discard(manager.name)
        if (
            when is not None
            and self.named_in_time is not None
            and status.health is Health.OK
            and self.named_in_time(manager.name, when, now)
        ):
            # Fleet mode: a poll names the account again before it is due (then it is planned
            # here); until then it costs no queue entry (10,000 accounts, a few due soon).
            self._due.discard(manager.name)
        else:
            self._due.set(manager.name, when)

    def look_at(self, manager: AccountManager) -> None:
        """Check the account at the next heartbeat: a change it could not take now (it was
        busy refreshing or writing) is picked up then, as every account's was before."""
        if self.managers.get(manager.name) is manager:
            self._watch.add(manager.name)

    def run_soon(self, manager: AccountManager, work: Work = "tick") -> None:
        """Run ``manager.tick()`` (or the start-up check) as soon as a place is free.

        Folded into the account's run already waiting or running, if there is one: that one
        plans the account anew when it ends, and a tick still due then runs right after.
        """
        if self.stopped or manager in self._claimed:
            return
        self._claimed.add(manager)
        if work == "start" and manager.needs_refresh(manager.clock()):
            # An overdue token is refreshed before the others are merely verified.
            self._waiting.appendleft((manager, work))
        else:
            self._waiting.append((manager, work))
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and len(self._tasks) < self.max_running and not self.stopped:
            manager, work = self._waiting.popleft()
            task = asyncio.get_running_loop().create_task(self._guarded(manager, work))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_due(self, name: str) -> None:
        manager = self.managers.get(name)
        if manager is not None:
            self.run_soon(manager)

    def _on_event(self, event: AccountEvent) -> None:
        manager = self.managers.get(event.account)
        if manager is not None:
            self.plan(manager)
            self._watch.add(manager.name)  # once more at the next beat, when it is not busy

    async def _guarded(self, manager: AccountManager, work: Work) -> None:
        try:
            if work == "start":
                await self._start_account(manager)
            else:
                await manager.tick()
        except Exception:
            # One account's trouble never affects another: log and carry on.
            log.exception("account %s: unexpected error during %s", manager.name, work)
        finally:
            # Whatever happened, plan the next run: a run that raised leaves nothing planned
            # otherwise. The place is free again, so the next waiting account may start.
            self._claimed.discard(manager)
            if not self._claimed:
                # A set never shrinks its table: the start-up check claims every account at
                # once (10,000 on a fleet node: a 512 KiB table kept for the process's life).
                self._claimed = set()
            self.plan(manager)
            if self.managers.get(manager.name) is manager:
                self._watch.add(manager.name)  # once more at the next beat, when not busy
            current = asyncio.current_task()
            if current is not None:
                self._tasks.discard(current)
            self._start_waiting()

    async def _start_account(self, manager: AccountManager) -> None:
        """At start: refresh an overdue token at once, otherwise verify it with Kakao."""
        if manager.state is None:
            return
        if manager.needs_refresh(manager.clock()):
            await manager.refresh(reason="overdue at start")
        elif manager.policy.verify_on_start:
            await manager.verify()

    async def _beat(self) -> None:
        self.last_beat = time.monotonic()
        if self.stopped:
            return
        now = self._now()
        if self._seen is not None and now < self._seen:
            # The wall clock went back: a token may look issued in the future now (and every
            # planned moment is that much too far away): check every account.
            log.info("the wall clock went back %s: checking every account", self._seen - now)
            names = list(self.managers)
        else:
            names = list(self._watch)
        self._seen = now
        self._watch = set()
        for name in names:
            manager = self.managers.get(name)
            if manager is None:
                continue
            try:
                busy = manager.busy
                if not busy:
                    # Pick up tokens written by `login` (also clears a re-login mark).
                    manager.notice_outside_changes()
                if manager.needs_refresh(manager.clock()) or manager.status.write_pending:
                    self.run_soon(manager)
                    self._watch.add(name)  # its run plans it anew (and decides) when it ends
                else:
                    self.plan(manager)
                if busy:
                    self._watch.add(name)  # what it could not take yet: once it is not busy
            except Exception:
                log.exception("account %s: heartbeat check failed", manager.name)
                self._watch.add(name)
        # After a suspend the job's timer is late: run what the wall clock says is due now.
        self._due.run_due()
        self._due.check_armed()

    async def drain(self, timeout: float) -> None:
        """Wait for start-up checks and ticks this scheduler started (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
