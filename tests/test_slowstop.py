"""A slow stop says what it waits for: each pending task's chain of awaits, in words."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from kakao_tokend.slowstop import MOST_TASKS, pending_awaits


async def _wait_for_refreshes(release: asyncio.Event) -> None:
    await release.wait()


async def _accounts_ctx(release: asyncio.Event) -> AsyncIterator[None]:
    yield
    await _wait_for_refreshes(release)


async def _cleanup(release: asyncio.Event) -> None:
    """As aiohttp runs a cleanup context: the second step of an async generator."""
    context = _accounts_ctx(release)
    await context.__anext__()
    with contextlib.suppress(StopAsyncIteration):
        await context.__anext__()


async def test_the_report_follows_a_cleanup_context_down_to_the_await_it_waits_in() -> None:
    release = asyncio.Event()
    stopping = asyncio.create_task(_cleanup(release), name="stop")
    await asyncio.sleep(0.01)
    try:
        report = pending_awaits(skip=asyncio.current_task())
    finally:
        release.set()
        await stopping
    assert report.startswith("stop: _cleanup (test_slowstop.py:")
    # Through the async generator (whose step object exposes no frame) to the innermost wait.
    assert "_accounts_ctx (test_slowstop.py:" in report
    assert "_wait_for_refreshes (test_slowstop.py:" in report
    # asyncio's own frames (Event.wait here) are left out: the caller says more.
    assert report.endswith(")") and "locks.py" not in report, report


async def test_the_report_leaves_out_the_reporter_and_names_at_most_a_few_tasks() -> None:
    release = asyncio.Event()
    waiting = [
        asyncio.create_task(_wait_for_refreshes(release), name=f"refresh-{i}")
        for i in range(MOST_TASKS + 2)
    ]
    await asyncio.sleep(0)
    try:
        report = pending_awaits(skip=asyncio.current_task())
    finally:
        release.set()
        await asyncio.gather(*waiting)
    assert report.count("_wait_for_refreshes") == MOST_TASKS
    assert report.endswith("and 2 more")
    assert "test_the_report_leaves_out" not in report
    assert pending_awaits(skip=asyncio.current_task()) == "no pending task"
