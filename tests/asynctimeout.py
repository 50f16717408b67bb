"""When a test times out, print every asyncio task's await chain (a pytest plugin).

pytest-timeout (the signal method) shows the stacks of the threads; for an async test the
main thread's ends in the event loop's ``select``, which says nothing about what the test
waited for. This wraps its SIGALRM handler: first every task of the running loop, each with
the chain of coroutines it is suspended in (down to the future it waits for), then the
plugin's own report. The text goes to stderr, so it is in the failed test's captured output
under xdist too.
"""

from __future__ import annotations

import asyncio
import linecache
import signal
import sys
import threading
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest

__all__ = ["await_chain", "task_report"]


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """Return one line per coroutine ``task`` is suspended in, outermost first, and what the
    innermost one awaits (Task.get_stack() gives only the outermost frame)."""
    lines: list[str] = []
    awaited: Any = task.get_coro()
    for _ in range(100):  # a cycle cannot happen; a bound costs nothing
        frame: FrameType | None = None
        for name in ("cr_frame", "gi_frame", "ag_frame"):
            frame = getattr(awaited, name, None)
            if frame is not None:
                break
        if frame is None:
            if awaited is not None:
                lines.append(f"  awaiting {awaited!r}"[:500])
            break
        code = frame.f_code
        source = linecache.getline(code.co_filename, frame.f_lineno).strip()
        lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}: {source}")
        for name in ("cr_await", "gi_yieldfrom", "ag_await"):
            inner = getattr(awaited, name, None)
            if inner is not None:
                awaited = inner
                break
        else:
            break
    return lines


def task_report(loop: asyncio.AbstractEventLoop) -> str:
    """Return every task of ``loop`` with its await chain."""
    tasks = sorted(asyncio.all_tasks(loop), key=lambda task: task.get_name())
    parts = [f"{len(tasks)} asyncio task(s) at the timeout:"]
    for task in tasks:
        parts.append(f"{task.get_name()}: {task.get_coro()!r}")
        parts.extend(await_chain(task))
    return "\n".join(parts) + "\n"


@pytest.hookimpl(wrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, Any, Any]:
    """After pytest-timeout armed its SIGALRM handler, put ours in front of it."""
    armed = yield
    if threading.current_thread() is not threading.main_thread():
        return armed  # pytest-timeout falls back to its thread method there
    original = signal.getsignal(signal.SIGALRM)
    if not callable(original):
        return armed

    def handler(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        # The signal interrupts the loop's select in this thread: the loop still runs here.
        loop = asyncio._get_running_loop()
        if loop is not None:
            try:
                sys.stderr.write(task_report(loop))
                sys.stderr.flush()
            except Exception as exc:  # a diagnostic must not hide the timeout itself
                sys.stderr.write(f"cannot list the asyncio tasks: {exc!r}\n")
        original(signum, frame)

    signal.signal(signal.SIGALRM, handler)
    return armed
