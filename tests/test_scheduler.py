"""The due-queue (one APScheduler job for every key) and the refresh scheduler on top of it.

DueQueue runs on a real AsyncIOScheduler in the test's event loop; RefreshScheduler runs real
account managers against the emulator on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import time_machine
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from daemonproc import write_config
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.scheduler import DueQueue, RefreshScheduler, new_apscheduler
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet, utcnow


def now() -> datetime:
    return datetime.now(UTC)


def later(seconds: float) -> datetime:
    return now() + timedelta(seconds=seconds)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (a slow shared machine gets time, a bug still fails)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def aps() -> AsyncIterator[AsyncIOScheduler]:
    """A running AsyncIOScheduler with the daemon's job defaults, shut down afterwards."""
    scheduler = new_apscheduler()
    scheduler.start()
    yield scheduler
    scheduler.shutdown(wait=False)
    await asyncio.sleep(0)


def queue_on(aps: AsyncIOScheduler) -> tuple[DueQueue[str], list[str]]:
    """Return a DueQueue on ``aps`` and the list its callback appends the due keys to."""
    fired: list[str] = []
    return DueQueue(aps, fired.append), fired


# --------------------------------------------------------------------------- DueQueue


async def test_keys_come_due_in_the_order_of_their_moments_from_one_job(
    aps: AsyncIOScheduler,
) -> None:
    """Three keys planned out of order are handed over earliest first, each once, while
    APScheduler holds one job (armed at the earliest moment), not one per key."""
    queue, fired = queue_on(aps)
    queue.set("c", later(0.45))
    queue.set("a", later(0.15))
    queue.set("b", later(0.3))
    await asyncio.sleep(0)  # the job is armed on the next loop iteration
    jobs = aps.get_jobs()
    assert len(jobs) == 1
    assert jobs[0].next_run_time == queue.when("a")
    await wait_for(lambda: len(fired) == 3)
    assert fired == ["a", "b", "c"]
    await asyncio.sleep(0.1)
    assert fired == ["a", "b", "c"]
    assert len(queue) == 0
    assert aps.get_jobs() == []


async def test_re_planning_a_key_replaces_its_moment(aps: AsyncIOScheduler) -> None:
    """A key moved earlier fires at its new moment; a key moved later does not fire at its
    old one (the stale heap entry is skipped), and the job is re-armed for the later one."""
    queue, fired = queue_on(aps)
    queue.set("sooner", later(60))
    queue.set("sooner", later(0.1))
    queue.set("postponed", later(0.1))
    queue.set("postponed", later(60))
    await wait_for(lambda: fired == ["sooner"])
    await asyncio.sleep(0.2)
    assert fired == ["sooner"]
    assert queue.when("postponed") is not None
    job = aps.get_jobs()[0]
    assert job.next_run_time == queue.when("postponed")


async def test_a_removed_key_never_comes_due(aps: AsyncIOScheduler) -> None:
    """discard() and set(key, None) both forget a key; with nothing left the job goes too."""
    queue, fired = queue_on(aps)
    queue.set("gone", later(0.1))
    queue.set("also-gone", later(0.1))
    queue.set("kept", later(0.2))
    queue.discard("gone")
    queue.set("also-gone", None)
    await wait_for(lambda: fired == ["kept"])
    await asyncio.sleep(0.1)
    assert fired == ["kept"]
    queue.set("last", later(60))
    await asyncio.sleep(0)
    assert len(aps.get_jobs()) == 1
    queue.discard("last")
    await asyncio.sleep(0)
    assert aps.get_jobs() == []
    assert "last" not in queue


async def test_a_late_wake_up_still_runs(aps: AsyncIOScheduler) -> None:
    """A moment long past fires at once, and a job that wakes more than APScheduler's default
    grace (1 s) late because the loop was blocked still runs: nothing is dropped as missed."""
    queue, fired = queue_on(aps)
    missed: list[object] = []
    aps.add_listener(missed.append, EVENT_JOB_MISSED | EVENT_JOB_ERROR)
    queue.set("yesterday", now() - timedelta(days=1))
    await wait_for(lambda: fired == ["yesterday"])
    queue.set("blocked", later(0.05))
    await asyncio.sleep(0)
    time.sleep(1.5)  # the loop cannot wake the job: it runs 1.45 s late
    await wait_for(lambda: fired == ["yesterday", "blocked"])
    assert missed == []


async def test_run_due_hands_over_what_the_wall_clock_says_is_due_after_a_suspend(
    aps: AsyncIOScheduler,
) -> None:
    """After a simulated suspend (+5 h wall clock, monotonic clock unchanged) APScheduler's timer
    still waits; run_due() (the heartbeat's call) hands over every key due by the wall clock."""
    with time_machine.travel(now(), tick=True) as traveller:
        queue, fired = queue_on(aps)
        queue.set("in-an-hour", later(3600))
        queue.set("in-a-day", later(86400))
        await asyncio.sleep(0.05)
        assert queue.run_due() == 0
        traveller.shift(timedelta(hours=5))
        assert queue.run_due() == 1
        assert fired == ["in-an-hour"]
        await asyncio.sleep(0)
        assert aps.get_jobs()[0].next_run_time == queue.when("in-a-day")


async def test_many_keys_due_at_once_are_all_handed_over_in_one_wake(
    aps: AsyncIOScheduler,
) -> None:
    """A thousand keys due at the same moment (say, after a suspend) come due together: one
    run of the job, every key exactly once."""
    queue, fired = queue_on(aps)
    runs: list[object] = []
    aps.add_listener(runs.append, EVENT_JOB_EXECUTED)
    moment = later(0.2)
    keys = [f"acct{i:04d}" for i in range(1000)]
    for key in keys:
        queue.set(key, moment)
    await wait_for(lambda: len(fired) == 1000)
    await asyncio.sleep(0.05)
    assert sorted(fired) == keys
    assert len(runs) == 1
    assert len(queue) == 0


async def test_a_key_planned_again_by_its_own_callback_is_not_skipped(
    aps: AsyncIOScheduler,
) -> None:
    """The callback plans the key again, due at once, while the job is still running: the
    next job is armed after this run ended, so max_instances=1 never skips it (a quick retry)."""
    fired: list[str] = []
    skipped: list[object] = []
    aps.add_listener(skipped.append, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)

    def again(key: str) -> None:
        fired.append(key)
        if len(fired) < 3:
            queue.set(key, now())

    queue: DueQueue[str] = DueQueue(aps, again)
    queue.set("retry", now())
    await wait_for(lambda: len(fired) == 3)
    assert skipped == []


async def test_a_failing_callback_does_not_stop_the_others(
    aps: AsyncIOScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    """One key's callback raising is logged; the other keys due with it are still handed over
    and the queue keeps working."""
    caplog.set_level(logging.ERROR)  # whatever level an earlier test left the root at
    fired: list[str] = []

    def callback(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        fired.append(key)

    queue: DueQueue[str] = DueQueue(aps, callback)
    moment = later(0.05)
    for key in ("a", "bad", "b"):
        queue.set(key, moment)
    await wait_for(lambda: fired == ["a", "b"])
    assert "due-queue callback failed for 'bad'" in caplog.text
    queue.set("c", later(0.05))
    await wait_for(lambda: fired == ["a", "b", "c"])


async def test_re_planning_does_not_pile_up_stale_entries(aps: AsyncIOScheduler) -> None:
    """Ten thousand re-plans of ten keys leave a heap of bounded size (memory stays per key)."""
    queue, _ = queue_on(aps)
    base = later(3600)
    for step in range(10_000):
        queue.set(f"k{step % 10}", base + timedelta(seconds=step))
    assert len(queue) == 10
    assert len(queue._heap) <= 2 * len(queue) + 64


async def test_a_lost_job_is_armed_again(aps: AsyncIOScheduler) -> None:
    """If APScheduler loses the job (removed behind our back), check_armed() — called on every
    heartbeat — arms it again."""
    queue, fired = queue_on(aps)
    queue.set("k", later(0.3))
    await asyncio.sleep(0)
    aps.remove_all_jobs()
    queue.check_armed()
    await wait_for(lambda: fired == ["k"])


# --------------------------------------------------------------------------- RefreshScheduler


def seeded_managers(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession, count: int
) -> list[AccountManager]:
    """Give ``count`` accounts fresh tokens on disk and build their managers like the daemon."""
    names = [f"acct{i}" for i in range(count)]
    config = load_config(write_config(tmp_path, emulator, accounts=names))
    managers = []
    for index, name in enumerate(names):
        account = config.accounts[name]
        tokens = TokenSet.from_token_response(
            emulator.issue_tokens(70_000 + index), requested_at=utcnow()
        )
        store = AccountStore(account)
        store.save(AccountState(account=name, tokens=tokens, refreshed_at=utcnow()))
        manager = AccountManager(
            account, store=store, client=KakaoClient(session, account.app), policy=config.refresh
        )
        manager.load()
        managers.append(manager)
    return managers


def make_overdue(manager: AccountManager) -> None:
    """Plan the account's refresh a second ago (as after a suspend)."""
    manager._planned_refresh_at = manager.clock() - timedelta(seconds=1)


async def test_all_accounts_share_one_apscheduler_job(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Fifty accounts are fifty due-queue entries and ONE APScheduler job, armed at the
    earliest planned refresh."""
    managers = seeded_managers(emulator, tmp_path, session, 50)
    scheduler = RefreshScheduler(heartbeat=60)
    scheduler.start()
    try:
        for manager in managers:
            scheduler.add(manager)
        await asyncio.sleep(0)
        jobs = scheduler._scheduler.get_jobs()
        assert len(jobs) == 1
        earliest = min(m.next_wakeup() for m in managers)  # type: ignore[type-var]
        assert jobs[0].next_run_time == earliest
        assert all(scheduler.planned(m.name) == m.next_wakeup() for m in managers)
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_many_due_accounts_run_a_few_at_a_time_and_all_get_refreshed(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Six overdue accounts with max_running=2: never more than two refreshes in flight, and
    all six are refreshed (in due order, the rest waiting for a free place)."""
    managers = seeded_managers(emulator, tmp_path, session, 6)
    emulator.inject("token", "slow", count=6, delay=0.3)
    scheduler = RefreshScheduler(heartbeat=60, max_running=2)
    most = 0
    scheduler.start()
    try:
        for manager in managers:
            make_overdue(manager)
            scheduler.add(manager)
        deadline = time.monotonic() + 10
        while not all(m.state is not None and m.state.generation == 2 for m in managers):
            assert time.monotonic() < deadline, "not every account was refreshed"
            most = max(most, sum(m.refreshing for m in managers))
            await asyncio.sleep(0.01)
        assert most == 2
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_a_burst_of_start_checks_leaves_no_large_table_behind(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Every account's start check claims it at once; once all are done, the scheduler keeps
    no set sized for all of them (a set never shrinks: 512 KiB for 10,000 accounts)."""
    managers = seeded_managers(emulator, tmp_path, session, 40)
    scheduler = RefreshScheduler(heartbeat=60, max_running=4)
    scheduler.start()
    try:
        for manager in managers:
            scheduler.add(manager)
            scheduler.run_soon(manager, "start")
        deadline = time.monotonic() + 10
        while scheduler._tasks or scheduler._waiting:
            assert time.monotonic() < deadline, "the start checks did not end"
            await asyncio.sleep(0.01)
        assert all(m.status.last_success_at is not None for m in managers)
        assert sys.getsizeof(scheduler._claimed) == sys.getsizeof(set())
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_waiting_runs_do_not_start_after_a_stop_began(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """With one place and three overdue accounts, a stop during the first refresh lets that
    one finish (drain waits for it) and starts neither of the two waiting ones."""
    managers = seeded_managers(emulator, tmp_path, session, 3)
    emulator.inject("token", "slow", count=3, delay=0.4)
    before = emulator.stats.refreshes_ok
    scheduler = RefreshScheduler(heartbeat=60, max_running=1)
    scheduler.start()
    for manager in managers:
        make_overdue(manager)
        scheduler.add(manager)
    await wait_for(lambda: any(m.refreshing for m in managers))
    scheduler.shutdown()
    await scheduler.drain(5)
    await asyncio.sleep(0.6)
    assert emulator.stats.refreshes_ok == before + 1
    assert sorted(m.state.generation for m in managers) == [1, 1, 2]  # type: ignore[union-attr]


async def test_runs_asked_for_while_one_is_under_way_fold_into_it(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """One in-flight run per account: run_soon() three times during a slow refresh starts no
    second tick, and the account is planned anew (hours ahead) when the run ends."""
    (manager,) = seeded_managers(emulator, tmp_path, session, 1)
    emulator.inject("token", "slow", count=1, delay=0.3)
    ticks = 0
    real_tick = manager.tick

    async def counting_tick() -> None:
        nonlocal ticks
        ticks += 1
        await real_tick()

    manager.tick = counting_tick  # type: ignore[method-assign]
    scheduler = RefreshScheduler(heartbeat=60)
    scheduler.start()
    try:
        make_overdue(manager)
        scheduler.add(manager)
        await wait_for(lambda: manager.refreshing)
        for _ in range(3):
            scheduler.run_soon(manager)
        await wait_for(lambda: manager.state is not None and manager.state.generation == 2)
        await asyncio.sleep(0.2)
        assert ticks == 1
        planned = scheduler.planned(manager.name)
        assert planned is not None and planned > manager.clock() + timedelta(minutes=30)
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_a_removed_account_is_neither_planned_nor_run(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """remove() drops the account's plan and a run still waiting for a place; the other
    account is refreshed as usual."""
    kept, removed = seeded_managers(emulator, tmp_path, session, 2)
    scheduler = RefreshScheduler(heartbeat=60, max_running=1)
    emulator.inject("token", "slow", count=1, delay=0.3)
    scheduler.start()
    try:
        for manager in (kept, removed):
            make_overdue(manager)
            scheduler.add(manager)
        await wait_for(lambda: kept.refreshing)
        assert scheduler.remove(removed.name) is removed
        assert scheduler.planned(removed.name) is None
        await wait_for(lambda: kept.state is not None and kept.state.generation == 2)
        await asyncio.sleep(0.3)
        assert removed.state is not None and removed.state.generation == 1
        scheduler.plan(removed)  # a stale caller cannot plan it back in
        assert scheduler.planned(removed.name) is None
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_the_job_fires_the_refresh_at_its_jittered_moment(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """With a 60 s heartbeat (so only the job can do it), a refresh planned 0.4 s ahead runs
    at that moment and not before; the next one is planned from the new token."""
    (manager,) = seeded_managers(emulator, tmp_path, session, 1)
    ran: list[datetime] = []
    manager.listeners.append(
        lambda event: ran.append(event.at) if event.kind == "refreshed" else None
    )
    scheduler = RefreshScheduler(heartbeat=60)
    scheduler.start()
    try:
        planned = manager.clock() + timedelta(seconds=0.4)
        manager._planned_refresh_at = planned
        scheduler.add(manager)
        await wait_for(lambda: bool(ran))
        assert ran[0] >= planned
        assert manager.state is not None and manager.state.generation == 2
        assert scheduler.planned(manager.name) == manager.next_wakeup()
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_an_overdue_account_is_refreshed_before_the_others_are_verified_at_start(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Start-up checks wait for a place in the order asked for, except that an overdue
    token's (its refresh) goes first: with one place, the last account asked for but
    overdue is refreshed right after the first check, before the others are verified."""
    managers = seeded_managers(emulator, tmp_path, session, 4)
    order: list[str] = []
    for manager in managers:
        real_verify, real_refresh = manager.verify, manager.refresh

        async def verify(name: str = manager.name, real: Any = real_verify) -> None:
            order.append(f"{name} verify")
            await real()

        async def refresh(
            name: str = manager.name, real: Any = real_refresh, **kwargs: Any
        ) -> AccountState | None:
            order.append(f"{name} refresh")
            return await real(**kwargs)  # type: ignore[no-any-return]

        manager.verify = verify  # type: ignore[method-assign]
        manager.refresh = refresh  # type: ignore[method-assign]
    make_overdue(managers[3])
    scheduler = RefreshScheduler(heartbeat=60, max_running=1)
    scheduler.start()
    try:
        for manager in managers:
            scheduler.add(manager)
            scheduler.run_soon(manager, "start")
        await wait_for(lambda: len(order) == 4)
        assert order == ["acct0 verify", "acct3 refresh", "acct1 verify", "acct2 verify"]
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_an_idle_heartbeat_checks_no_account_but_a_clock_stepped_back_checks_all(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Twenty idle accounts: after the first beats (start-up runs) a heartbeat checks none
    of them one by one (the due queue knows when each is due). The wall clock stepped back
    an hour makes every 6-hour token look issued in the future: the next beat checks every
    account, and each is refreshed (kubelet's rule) without waiting for its planned time."""
    emulator.settings.access_lifetime = 21599
    managers = seeded_managers(emulator, tmp_path, session, 20)
    checked: list[str] = []
    for manager in managers:
        real = manager.notice_outside_changes

        def counting(name: str = manager.name, real: Any = real) -> bool:
            checked.append(name)
            return bool(real())

        manager.notice_outside_changes = counting  # type: ignore[method-assign]
    with time_machine.travel(datetime.now(UTC), tick=True) as traveller:
        scheduler = RefreshScheduler(heartbeat=0.1)
        scheduler.start()
        try:
            for manager in managers:
                scheduler.add(manager)
            await asyncio.sleep(0.35)  # a few beats: nothing is watched any more
            checked.clear()
            await asyncio.sleep(0.3)
            assert checked == [], "an idle heartbeat checked accounts one by one"
            generations = [m.state.generation for m in managers]  # type: ignore[union-attr]
            traveller.shift(timedelta(hours=-1))
            await wait_for(lambda: len(set(checked)) == len(managers))
            await wait_for(
                lambda: all(
                    m.state.generation > g  # type: ignore[union-attr]
                    for m, g in zip(managers, generations, strict=True)
                ),
                timeout=10,
            )
        finally:
            scheduler.shutdown()
            await asyncio.sleep(0)


async def test_a_state_written_while_the_account_was_busy_is_adopted_once_it_is_not(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A change the daemon could not take because the account was busy (a refresh in flight)
    is handed to the heartbeat (look_at): checked at every beat while the account stays busy,
    adopted at the first beat after."""
    [manager] = seeded_managers(emulator, tmp_path, session, 1)
    scheduler = RefreshScheduler(heartbeat=0.1)
    scheduler.start()
    try:
        scheduler.add(manager)
        await asyncio.sleep(0.3)
        assert manager.state is not None
        manager._inflight = asyncio.get_running_loop().create_future()  # busy refreshing
        tokens = TokenSet.from_token_response(emulator.issue_tokens(71_000), requested_at=utcnow())
        written = replace(manager.state, tokens=tokens, generation=manager.state.generation + 1)
        AccountStore(manager.account).save(written)  # as `login` would
        scheduler.look_at(manager)
        await asyncio.sleep(0.35)  # beats while it is busy: nothing is taken over yet
        assert manager.state.tokens.refresh_token != tokens.refresh_token
        manager._inflight = None
        await wait_for(lambda: manager.state.tokens.refresh_token == tokens.refresh_token)
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_an_account_the_store_names_again_in_time_takes_no_place_until_near(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Fleet mode's hook (named_in_time, FleetStore.names_in_time): a healthy account whose
    next run the store's poll names again in time has no due-queue entry; planned again
    once the hook says no (the poll named it, its moment is near), it has its entry and is
    refreshed then; a retrying account keeps its entry whatever the hook says."""
    far, near = seeded_managers(emulator, tmp_path, session, 2)
    asked: list[tuple[str, datetime]] = []
    answer = {far.name: True, near.name: False}

    def named_in_time(name: str, when: datetime, now: datetime) -> bool:
        asked.append((name, when))
        return answer[name]

    refreshed: list[str] = []
    for manager in (far, near):
        manager.listeners.append(
            lambda event: refreshed.append(event.account) if event.kind == "refreshed" else None
        )
    scheduler = RefreshScheduler(heartbeat=60)
    scheduler.named_in_time = named_in_time
    scheduler.start()
    try:
        far._planned_refresh_at = moment = far.clock() + timedelta(seconds=0.3)
        near._planned_refresh_at = near.clock() + timedelta(hours=1)
        scheduler.add(far)
        scheduler.add(near)
        assert (far.name, moment) in asked
        assert scheduler.planned(far.name) is None  # left to the store's poll
        assert scheduler.planned(near.name) == near.next_wakeup()
        await asyncio.sleep(0.5)
        assert refreshed == []  # nothing woke it at its moment: that is the poll's to name
        answer[far.name] = False  # the poll names it: planned (overdue now), and run
        scheduler.plan(far)
        await wait_for(lambda: refreshed == [far.name])

        near.status.failed_transient("timeout", "timeout", now=near.clock(), retry_at=later(3600))
        answer[near.name] = True
        scheduler.plan(near)
        assert scheduler.planned(near.name) == near.next_wakeup()  # retrying: queued anyway
    finally:
        scheduler.shutdown()
        await asyncio.sleep(0)


async def test_an_idle_manager_holds_no_busy_fields_a_refresh_holds_them_while_it_runs(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The manager's fields of a refresh in flight, a pending write or publish and a
    planned retry are one object while any is set: none on an idle account (10,000 on a
    fleet node), one during a refresh, none again once it is done."""
    [manager] = seeded_managers(emulator, tmp_path, session, 1)
    assert manager._busy is None and not manager.refreshing and manager._write_attempt == 0
    emulator.inject("token", "slow", count=1, delay=0.3)
    refresh = asyncio.create_task(manager.refresh(force=True, reason="test"))
    await wait_for(lambda: manager.refreshing)
    assert manager._busy is not None and manager._inflight is not None
    new = await refresh
    assert new is not None and new.generation == 2 and manager.state == new
    assert manager._busy is None and not manager.refreshing


async def test_a_stop_in_the_turn_the_due_job_wakes_up_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop asked for in the same loop turn as APScheduler's wake-up for a due key (the end of
    a busy `demo`) is no error: the job only hands the due keys over, and nothing starts after
    a stop. Found in a full test run: `demo` printed "ERROR Error running job accounts", the
    job's task cancelled by the executor's shutdown before it ran."""
    scheduler = RefreshScheduler(heartbeat=60)
    scheduler.start()
    aps = scheduler._scheduler
    scheduler._due.set("nobody", now())
    await asyncio.sleep(0)  # the due-queue arms its job, and APScheduler queues its wake-up
    job = aps.get_job("accounts")
    assert job is not None and job.next_run_time <= now()
    scheduler.shutdown()  # APScheduler's part runs a turn later, behind that wake-up
    await wait_for(lambda: not aps.running)
    for _ in range(3):  # a job task submitted meanwhile ends (or is cancelled) and is logged
        await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]
