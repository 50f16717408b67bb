"""Alerts that time alone brings are sent at their moment, not up to a heartbeat later.

The heartbeat is at most 1/8 of a short token's life and 60 s (1/360) of a 6-hour one's: an
alert center that graded only at heartbeats sent a short token's `access_expiring` page up to
an eighth of its life late — after the expiry — where a 6-hour token's comes within a
minute. The moments the grading names (health's ``changes_at``) are waited for themselves.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from alertkit import Receiver, alerts_toml
from kakao_tokend.emulator import KakaoEmulator


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
