"""Alerts graded when due: no alert or resolution the every-heartbeat pass sent goes missing.

The heartbeat grades only the accounts whose moment came (a threshold of the grading, a
critical alert's repeat) or that changed; these tests hold it to what grading every account
at every heartbeat sends: with a real clock and seconds-long tokens (the time scale does not
matter: every rule is relative), with an injected clock that jumps and steps back, and as a
hypothesis race between the two ways over random histories.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from alertkit import Receiver, alerts_toml
from kakao_tokend import alerts as alerts_module
from kakao_tokend.alerts import Alert, AlertCenter
from kakao_tokend.config import config_from_toml_text
from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator
from kakao_tokend.refresher import AccountManager
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountEvent, EventKind, Health
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet

# --------------------------------------------------------------------------- a real clock


async def test_the_ladder_and_expiry_are_alerted_with_no_event_at_all(
    make_harness: Any, emulator: KakaoEmulator, webhook: Receiver
) -> None:
    """A 6-second refresh token that nothing refreshes: the heartbeat alone (0.2 s) sends
    the warning, then the critical rung, then "expired", each once, on the real clock."""
    emulator.settings.refresh_lifetime = 6
    extra = alerts_toml(webhook, None, thresholds='["4s", "2s"]', critical_below='"2s"')
    harness = await make_harness(extra)
    center = harness.center
    periodic = asyncio.create_task(center.run_periodic(lambda: 0.2))
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while len(webhook.posts) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)  # three more heartbeats: nothing more may come
    finally:
        periodic.cancel()
    assert [(p["condition"], p["severity"]) for p in webhook.posts] == [
        ("refresh_expiry", "warning"),
        ("refresh_expiry", "critical"),
        ("refresh_expiry", "critical"),
    ], webhook.posts
    assert "EXPIRED" in webhook.posts[2]["message"]


async def test_a_critical_alert_repeats_on_the_heartbeat_with_no_event(
    make_harness: Any, emulator: KakaoEmulator, webhook: Receiver
) -> None:
    """A re-login alert, sent once by its event, is repeated every `repeat` (1 s) by the
    heartbeat alone, and not in between."""
    harness = await make_harness(alerts_toml(webhook, None, repeat='"1s"'))
    emulator.unlink_user(DEFAULT_USER_ID)
    await harness.manager.refresh(force=True, reason="test")
    await harness.settle()
    assert [p["repeat"] for p in webhook.posts] == [False]
    periodic = asyncio.create_task(harness.center.run_periodic(lambda: 0.1))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while len(webhook.posts) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        periodic.cancel()
    await harness.settle()
    repeats = [p for p in webhook.posts if p["repeat"]]
    assert len(repeats) >= 2, webhook.posts
    times = [datetime.fromisoformat(p["at"]) for p in webhook.posts]
    assert all((b - a).total_seconds() >= 1 for a, b in itertools.pairwise(times))


# --------------------------------------------------------------------------- an injected clock

LIFE = 60.0  # the access token's lifetime; the refresh token lives ten of them
ALERTS = (
    '[alerts]\nkakaotalk = false\nlanguage = "en"\n'
    'thresholds = ["550s", "500s", "450s", "400s", "300s", "200s", "120s", "30s"]\n'
    'critical_below = "60s"\nrepeat = "45s"\nfailing_after = "10%"\n'
)


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def world(directory: Path, clock: Clock, names: tuple[str, ...]) -> AlertCenter:
    """Accounts with tokens issued now (no Kakao: nothing here refreshes) and a center."""
    text = (
        f'[paths]\nstate_dir = "{directory}"\nruntime_dir = "{directory}/run"\n'
        '[kakao]\nrest_api_key = "k"\n' + ALERTS + "".join(f"[accounts.{name}]\n" for name in names)
    )
    config = config_from_toml_text(text, source=None, environ={})
    center = AlertCenter(session=None, clock=clock, host="box")  # type: ignore[arg-type]
    for name in names:
        account = config.accounts[name]
        manager = AccountManager(
            account,
            store=AccountStore(account),
            client=None,  # type: ignore[arg-type]  # grading never calls Kakao
            policy=config.refresh,
            clock=clock,
        )
        adopt(manager, clock.now)
        center.attach(manager)
    return center


def adopt(manager: AccountManager, now: datetime) -> None:
    """Give ``manager`` fresh tokens issued at ``now`` (as a refresh by another node)."""
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=now + timedelta(seconds=LIFE),
        refresh_expires_at=now + timedelta(seconds=10 * LIFE),
        access_issued_at=now,
    )
    manager.state = AccountState(manager.name, tokens)
    manager.status.adopted(manager.state)


def said(alerts: list[Alert]) -> list[tuple[str, str, str, str, bool]]:
    """What an alert says that the two ways must agree on (the time is the same clock)."""
    return sorted((a.account, a.condition, a.state, a.severity.label, a.repeat) for a in alerts)


def test_a_wall_clock_stepped_back_resolves_what_it_undid(tmp_path: Path) -> None:
    """A warning crossed by time alone is resolved when the wall clock steps back before
    its threshold, as grading every account would, and comes back when time crosses it
    again; in between the heartbeat grades nothing."""
    clock = Clock()
    center = world(tmp_path, clock, ("default",))
    graded: list[str] = []
    alerts = center.accounts["default"]
    real_grade = alerts.grade

    def counting(now: datetime) -> Any:
        graded.append(str(now))
        return real_grade(now)

    alerts.grade = counting  # type: ignore[method-assign]
    assert center.beat() == []  # the first heartbeat grades the new account
    clock.now += timedelta(seconds=40)
    graded.clear()
    assert center.beat() == [] and graded == []  # nothing due: not graded at all
    clock.now += timedelta(seconds=10)  # 550 s left: the 550 s rung is one tick away
    assert center.beat() == []
    clock.now += timedelta(seconds=1)
    assert said(center.beat()) == [("default", "refresh_expiry", "firing", "warning", False)]
    clock.now -= timedelta(seconds=10)
    assert said(center.beat()) == [("default", "refresh_expiry", "resolved", "warning", False)]
    clock.now += timedelta(seconds=20)
    assert said(center.beat()) == [("default", "refresh_expiry", "firing", "warning", False)]


TRANSITIONS = (
    "transient",
    "succeeded",
    "relogin",
    "adopted",
    "write_failed",
    "saved",
    "publish_failed",
    "published",
    "conflict",
    "missed_rotation",
    "store_down",
    "store_up",
)


def apply(manager: AccountManager, step: str, now: datetime) -> None:
    """Change ``manager``'s state or status the way the daemon does, then tell the
    listeners (the store's health is evaluated by the daemon directly; an event does too)."""
    status = manager.status
    if step == "transient" and manager.state is not None:
        status.failed_transient(
            "Kakao server error", "http503", now=now, retry_at=now + timedelta(seconds=7)
        )
    elif step == "succeeded" and manager.state is not None:
        status.succeeded(now, rotated=False)
    elif step == "relogin":
        status.failed_permanent(Health.RELOGIN, "refused", "KOE322", now=now)
    elif step == "adopted":
        adopt(manager, now)
    elif step == "write_failed":
        status.write_failed("No space left on device")
    elif step == "saved":
        status.saved()
    elif step == "publish_failed":
        status.publish_failed("token file: cannot write")
    elif step == "published":
        status.published()
    elif step == "conflict":
        status.conflicted("an old backup was copied over the state file")
    elif step == "missed_rotation":
        status.rotation_missed()
    elif step == "store_down":
        status.store_unavailable_since = status.store_unavailable_since or now
        status.store_error = "no answer within 2s"
    elif step == "store_up":
        status.store_unavailable_since = None
        status.store_error = None
    event = AccountEvent(EventKind.RETRYING, manager.name, step, now)
    for listener in list(manager.listeners):
        listener(event)


NAMES = ("default", "bot", "third")
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("time"),
            st.floats(min_value=0, max_value=3 * LIFE)
            | st.sampled_from([-20.0, -5.0, 5.0, 15.0, 30.0, 45.0, 60.0]),
        ),
        st.tuples(st.sampled_from(NAMES), st.sampled_from(TRANSITIONS)),
    ),
    max_size=40,
)


def books(center: AlertCenter) -> dict[str, dict[str, tuple[object, ...]]]:
    """Each account's bookkeeping, less the texts (they name each world's own directory)."""
    keys = ("severity", "stage", "since", "last_sent_at", "sent")
    return {
        name: {c: tuple(r.get(k) for k in keys) for c, r in alerts.active.items()}
        for name, alerts in center.accounts.items()
    }


async def race(directory: Path, history: list[tuple[str, Any]]) -> None:
    """Run ``history`` on two worlds: one graded when due, one fully at every heartbeat."""
    clock = Clock()
    due = world(directory / "due", clock, NAMES)
    every = world(directory / "every", clock, NAMES)
    try:
        assert said(due.beat()) == said(every.evaluate())
        for what, value in history:
            if what == "time":
                clock.now += timedelta(seconds=value)
                assert said(due.beat()) == said(every.evaluate()), (clock.now, history)
            else:
                for center in (due, every):
                    apply(center.accounts[what].manager, value, clock.now)
                await asyncio.sleep(0)  # the events' evaluations run
            assert books(due) == books(every), (clock.now, history)
        # Then a long quiet stretch, heartbeat by heartbeat (every 15 s for 20 minutes).
        for _ in range(80):
            clock.now += timedelta(seconds=15)
            assert said(due.beat()) == said(every.evaluate()), (clock.now, history)
    finally:
        await due.close()
        await every.close()


@settings(max_examples=50, deadline=None)
@given(history=steps)
@example(history=[("time", 60.0), ("time", -20.0)])  # a rung crossed, then the clock back
@example(history=[("bot", "relogin"), ("time", 44.0), ("time", 1.0)])  # a repeat's moment
def test_grading_when_due_sends_what_grading_everything_every_heartbeat_sends(
    history: list[tuple[str, Any]],
) -> None:
    """For any history of status changes (each told to the listeners, as the daemon does),
    clock moves (forward, by jumps, and back) and heartbeats, the center that grades only
    the due and changed accounts sends exactly the alerts, repeats and resolutions of one
    that grades every account at every heartbeat, and keeps the same bookkeeping."""
    # The bookkeeping is saved (with fsync) at every change: on tmpfs where there is one.
    memory = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=memory) as directory:
        asyncio.run(race(Path(directory), history))


def test_the_race_can_tell_a_missed_moment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race above fails when the grading forgets a moment (the repeat, here)."""
    history: list[tuple[str, Any]] = [("default", "relogin"), ("time", 50.0)]
    asyncio.run(race(tmp_path / "ok", history))
    original = AlertCenter._plan

    def forgetful(self: AlertCenter, alerts: Any, due: datetime | None) -> None:
        original(self, alerts, None)

    monkeypatch.setattr(AlertCenter, "_plan", forgetful)
    with pytest.raises(AssertionError):
        asyncio.run(race(tmp_path / "broken", history))


def test_every_accounts_alerts_share_the_centers_setup(tmp_path: Path) -> None:
    """Session, clock, host, retry delay and fleet bookkeeping are one object for all of a
    center's accounts (five slots in each of 10,000 trackers otherwise); a center whose
    clock was replaced gives the accounts attached after that the new one."""
    clock = Clock()
    center = world(tmp_path, clock, ("a", "b", "c"))
    setups = {id(alerts.setup) for alerts in center.accounts.values()}
    assert len(setups) == 1
    assert all(
        alerts.clock is clock and alerts.host == "box" for alerts in center.accounts.values()
    )
    later = Clock()
    center.clock = later
    moved = center.attach(center.accounts["c"].manager)
    assert moved.clock is later and center.accounts["a"].clock is clock


@settings(max_examples=50, deadline=None)
@given(history=steps)
@example(history=[("time", 60.0), ("time", -20.0)])
@example(history=[("time", 170.0)])  # a jump over moments that were beyond the horizon
def test_moments_beyond_a_short_horizon_are_graded_as_when_every_one_is_on_the_heap(
    history: list[tuple[str, Any]],
) -> None:
    """The race above with the center's heap holding only the moments within 20 s (a
    fifth of the token's life, the heartbeat 15 s): the later ones, kept on their account
    until the horizon reaches them, are graded at the same heartbeats, with the same alerts
    and bookkeeping, as by the center grading every account at every heartbeat."""
    memory = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alerts_module, "MOMENT_HORIZON", timedelta(seconds=20))
        with tempfile.TemporaryDirectory(dir=memory) as directory:
            asyncio.run(race(Path(directory), history))


def test_a_moment_beyond_the_horizon_costs_no_heap_entry_until_the_horizon_nears_it(
    tmp_path: Path,
) -> None:
    """Healthy accounts next graded beyond the horizon (the access token's expiry, 60 s
    ahead; the horizon 20 s) have no heap entry; each one gets it once the horizon moves
    past its moment, and is graded then."""
    clock = Clock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alerts_module, "MOMENT_HORIZON", timedelta(seconds=20))
        center = world(tmp_path, clock, ("a", "b", "c"))
        center.beat()
        dues = {name: alerts.due for name, alerts in center.accounts.items()}
        assert all(
            due is not None and due > clock.now + timedelta(seconds=20) for due in dues.values()
        )
        assert center._moments == []
        first = min(due for due in dues.values() if due is not None)
        while clock.now + timedelta(seconds=20) <= first:
            clock.now += timedelta(seconds=5)
            center.beat()
        assert sorted(name for _, name in center._moments) == sorted(
            name
            for name, due in dues.items()
            if due is not None and due < center._horizon  # type: ignore[operator]
        )
        clock.now = first
        center.beat()
        assert all(alerts.due != first for alerts in center.accounts.values())
