"""The timeout diagnostic (asynctimeout.py): what it prints about the loop's tasks."""

from __future__ import annotations

import asyncio

from asynctimeout import task_report


async def test_the_report_names_each_task_and_the_coroutines_it_is_suspended_in() -> None:
    """Every task is listed with its whole await chain, down to the innermost coroutine: a
    hung test's report says where it waits (Task.get_stack shows only the outermost frame)."""
    gate = asyncio.Event()

    async def waits_for_the_gate() -> None:
        await gate.wait()

    async def outer() -> None:
        await waits_for_the_gate()

    task = asyncio.create_task(outer(), name="the-waiter")
    await asyncio.sleep(0)
    try:
        report = task_report(asyncio.get_running_loop())
    finally:
        gate.set()
        await task
    section = report.split("the-waiter: ", 1)[1]
    lines = section.splitlines()
    assert "in outer: await waits_for_the_gate()" in lines[1]
    assert "in waits_for_the_gate: await gate.wait()" in lines[2]
    assert "locks.py" in lines[3] and "in wait:" in lines[3]
    assert "asyncio task(s) at the timeout" in report.splitlines()[0]
