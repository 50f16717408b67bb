"""Alerts that time alone brings are sent at their moment, not up to a heartbeat later.

The heartbeat is at most 1/8 of a short token's life and 60 s (1/360) of a 6-hour one's: an
alert center that graded only at heartbeats sent a short token's `access_expiring` page up to
an eighth of its life late — after the expiry — where a 6-hour token's comes within a
minute. The moments the grading names (health's ``changes_at``) are waited for themselves,
also those planned while the center sleeps, and a daemon's center takes the beat fitted to
the tokens from its first minute on.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from alertkit import Receiver, alerts_toml
from daemonproc import login, short_tokens, start_daemon, write_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.tokens import utcnow


async def test_an_alert_time_alone_brings_is_sent_at_its_moment_not_at_the_next_heartbeat(
    make_harness: Any, emulator: KakaoEmulator, webhook: Receiver
) -> None:
    """A 6-second refresh token that nothing refreshes, and a heartbeat longer than its whole
    life (30 s): the ladder's warning, its critical rung and "expired" still come each at its
    moment (2 s apart), as the grading named them."""
    emulator.settings.refresh_lifetime = 6
    extra = alerts_toml(webhook, None, thresholds='["4s", "2s"]', critical_below='"2s"')
    harness = await make_harness(extra)
    center = harness.center
    assert harness.manager.state is not None
    expires = harness.manager.state.tokens.refresh_expires_at
    center.evaluate()  # what a starting daemon does; from then on, time alone
    periodic = asyncio.create_task(center.run_periodic(lambda: 30.0))
    try:
        deadline = asyncio.get_running_loop().time() + 12
        while len(webhook.posts) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        periodic.cancel()
    assert [(p["condition"], p["severity"]) for p in webhook.posts] == [
        ("refresh_expiry", "warning"),
        ("refresh_expiry", "critical"),
        ("refresh_expiry", "critical"),
    ], webhook.posts
    for post, left in zip(webhook.posts, (4.0, 2.0, 0.0), strict=True):
        late = (datetime.fromisoformat(post["at"]) - expires).total_seconds() + left
        assert -0.1 < late < 1.0, (post["condition"], post["severity"], late)


async def wait_posts(webhook: Receiver, count: int, timeout: float) -> list[float]:
    """Wait until the webhook has ``count`` posts; return when each was seen (loop time)."""
    loop = asyncio.get_running_loop()
    deadline, seen = loop.time() + timeout, []
    while len(seen) < count and loop.time() < deadline:
        seen += [loop.time()] * (len(webhook.posts) - len(seen))
        await asyncio.sleep(0.01)
    return seen


async def test_a_moment_planned_while_the_loop_sleeps_wakes_it_at_that_moment(
    make_harness: Any, emulator: KakaoEmulator, webhook: Receiver
) -> None:
    """The loop fell asleep for a whole beat (30 s, with nothing planned yet); an event's
    grading then plans the warning 2 s ahead (a 6-second refresh token, 4 s left): the loop
    wakes for it and sends it at that moment, not at the end of its sleep."""
    emulator.settings.refresh_lifetime = 6
    extra = alerts_toml(webhook, None, thresholds='["4s", "2s"]', critical_below='"2s"')
    harness = await make_harness(extra)
    center = harness.center
    assert harness.manager.state is not None
    expires = harness.manager.state.tokens.refresh_expires_at
    loop = asyncio.get_running_loop()
    periodic = asyncio.create_task(center.run_periodic(lambda: 30.0))
    try:
        await asyncio.sleep(0.1)  # asleep for the whole beat
        assert center.evaluate() == []  # an event's grading: the warning is planned
        due = loop.time() + (expires - harness.now()).total_seconds() - 4
        seen = await wait_posts(webhook, 1, 5)
    finally:
        periodic.cancel()
    assert [(p["condition"], p["severity"]) for p in webhook.posts] == [
        ("refresh_expiry", "warning")
    ], webhook.posts
    assert 0 <= seen[0] - due < 0.3, seen[0] - due


async def test_a_beat_that_got_shorter_while_the_loop_sleeps_is_taken_at_once(
    make_harness: Any, emulator: KakaoEmulator, webhook: Receiver
) -> None:
    """The loop fell asleep with a long beat (30 s: a daemon's before its scheduler fitted
    it to the tokens); told the beat is shorter now (0.2 s), it grades the account attached
    meanwhile (its warning long crossed) at that beat, not after the 30 s. A wake that brings
    nothing sooner grades nothing, and a center whose loop does not run ignores it."""
    emulator.settings.refresh_lifetime = 100
    extra = alerts_toml(webhook, None, thresholds='["200s"]', critical_below='"10s"')
    harness = await make_harness(extra)
    center = harness.center
    center.wake()  # no loop: nothing to do
    beats = [30.0]
    graded: list[float] = []
    beat = center.beat

    def counting() -> Any:
        graded.append(asyncio.get_running_loop().time())
        return beat()

    center.beat = counting  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    periodic = asyncio.create_task(center.run_periodic(lambda: beats[-1]))
    try:
        await asyncio.sleep(0.1)  # asleep for the whole beat
        center.wake()  # the same beat: slept again, nothing graded
        await asyncio.sleep(0.1)
        assert graded == [] and webhook.posts == []
        beats.append(0.2)
        center.wake()
        woken = loop.time()
        seen = await wait_posts(webhook, 1, 5)
    finally:
        periodic.cancel()
    assert [(p["condition"], p["severity"]) for p in webhook.posts] == [
        ("refresh_expiry", "warning")
    ], webhook.posts
    assert graded and graded[0] - woken < 0.3, (graded, woken)
    assert seen[0] - woken < 0.5, seen[0] - woken


@pytest.mark.slow(seconds=32)
async def test_a_daemon_with_default_timings_alerts_each_stage_at_its_moment_from_its_start(
    tmp_path: Path, emulator: KakaoEmulator, webhook: Receiver
) -> None:
    """A real `kakao-tokend run` with every timing at its default (heartbeat 60 s), 6-second
    access tokens and a 30-second refresh token that this Kakao never rotates: the warning
    (20 s left), the critical rung (10 s left) and "expired" each come at their moment, all
    within the daemon's first minute.

    The alert loop used to start before the accounts (and the scheduler whose beat is fitted
    to their lifetime) were taken up, sleep the unfitted 60 s in one go, and miss every
    moment planned meanwhile: until then only a refresh graded, and the stages came seconds
    late (the warning with 10 s of 14 s left, the critical one with 1 s of 3 s left).
    """
    life = 6.0
    short_tokens(emulator, access=life, refresh=30)
    emulator.settings.rotation_window = 0  # this Kakao never rotates
    extra = alerts_toml(webhook, None, thresholds='["20s", "10s"]', critical_below='"10s"')
    path = write_config(tmp_path, emulator, extra=extra)
    # Every [refresh] timing at its default, as a user leaves them.
    path.write_text(
        re.sub(
            r"(?m)^(heartbeat|retry_initial|retry_max|rotation_window) = .*\n", "", path.read_text()
        )
    )
    path.chmod(0o600)  # an inline webhook URL is a secret
    await login(emulator, path)
    stages = [("warning", 20.0), ("critical", 10.0), ("critical", 0.0)]
    daemon = await start_daemon(path)
    # The expiry as the daemon knows it: its state file keeps whole seconds.
    expires = datetime.fromisoformat(daemon.state()["tokens"]["refresh_expires_at"])
    try:
        arrived: list[datetime] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (expires - utcnow()).total_seconds() + 10
        while loop.time() < deadline:
            posts = [p for p in webhook.posts if p["condition"] == "refresh_expiry"]
            arrived += [utcnow()] * (len(posts) - len(arrived))
            if len(posts) >= len(stages):
                break
            await asyncio.sleep(0.02)
    finally:
        await daemon.stop()
    posts = [p for p in webhook.posts if p["condition"] == "refresh_expiry"]
    assert [(p["severity"], p["state"]) for p in posts] == [
        (severity, "firing") for severity, _ in stages
    ], webhook.posts
    # Delivered within a small share of the access token's life (a tenth: 0.6 s) of its
    # moment, at every stage, and not before it. (Seen by the receiver: the alert's own "at"
    # has whole seconds only.)
    late = [
        (severity, left, (seen - (expires - timedelta(seconds=left))).total_seconds())
        for seen, (severity, left) in zip(arrived, stages, strict=True)
    ]
    assert all(0 <= seconds < life / 10 for *_, seconds in late), late
