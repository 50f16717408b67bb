"""What a stop that takes long is still waiting for, put into words for the journal.

A clean stop drains the local API, lets in-flight refreshes finish and persist, delivers
queued alerts and, in fleet mode, makes the node's last writes: each step has a deadline of
its own, and together they may take a while (``service.stop_budget``). An operator whose
``systemctl stop`` hangs, and a test whose daemon did not exit, need to know which step and
which await it is in. :func:`pending_awaits` follows each pending task's chain of awaits
(coroutines, generators, and the async generators aiohttp's cleanup contexts are) down to
the innermost frame.
"""

from __future__ import annotations

import asyncio
import gc
import os
from types import FrameType
from typing import Any

__all__ = ["pending_awaits"]

#: Tasks named in one report at most (a stop has a handful; a fleet node may have a refresh
#: in flight for many accounts, and one line must stay readable).
MOST_TASKS = 6
#: Frames named per task: the outermost (what the task is) and the innermost ones (where
#: it waits); the frames between are the plumbing.
INNERMOST = 3


def pending_awaits(*, skip: asyncio.Task[Any] | None = None) -> str:
    """Return where each pending task of the running loop waits, on one line.

    Each task reads ``name: outer > … > inner`` (function, file and line of each frame);
    ``skip`` is left out (the task that reports).
    """
    tasks = [task for task in asyncio.all_tasks() if task is not skip and not task.done()]
    tasks.sort(key=lambda task: task.get_name())
    described = [f"{task.get_name()}: {_chain(task)}" for task in tasks[:MOST_TASKS]]
    if len(tasks) > MOST_TASKS:
        described.append(f"and {len(tasks) - MOST_TASKS} more")
    return "; ".join(described) or "no pending task"


def _chain(task: asyncio.Task[Any]) -> str:
    # asyncio's own frames (wait_for, gather, sleep) say less than the code that called them.
    frames = [f for f in _await_frames(task.get_coro()) if not _in_asyncio(f)]
    if len(frames) > INNERMOST + 1:
        shown = [_where(frames[0]), "…", *(_where(f) for f in frames[-INNERMOST:])]
    else:
        shown = [_where(f) for f in frames]
    return " > ".join(shown) or "(no frame)"


def _await_frames(awaitable: object) -> list[FrameType]:
    """The frames along ``awaitable``'s chain of awaits, outermost first."""
    frames: list[FrameType] = []
    current: object = awaitable
    for _ in range(64):  # a bound: a chain is a few dozen deep at most
        if current is None:
            break
        frame = _frame_of(current)
        if frame is None:
            if type(current).__name__ not in _ASYNC_GENERATOR_STEPS:
                break  # a future (a sleep, a lock, a socket read): the end of the chain
            # `await agen.__anext__()` (aiohttp's cleanup contexts) awaits an object that
            # exposes nothing; the generator is among its referents.
            owners = [o for o in gc.get_referents(current) if _frame_of(o) is not None]
            if not owners:
                break
            current = owners[0]
            continue
        frames.append(frame)
        current = _awaited_by(current)
    return frames


#: The objects ``agen.__anext__()``, ``asend()`` and ``athrow()`` return.
_ASYNC_GENERATOR_STEPS = frozenset({"async_generator_asend", "async_generator_athrow"})


def _frame_of(obj: object) -> FrameType | None:
    for attribute in ("cr_frame", "gi_frame", "ag_frame"):
        frame = getattr(obj, attribute, None)
        if isinstance(frame, FrameType):
            return frame
    return None


def _awaited_by(obj: object) -> object:
    for attribute in ("cr_await", "gi_yieldfrom", "ag_await"):
        if hasattr(obj, attribute):
            return getattr(obj, attribute)
    return None


_ASYNCIO_DIRECTORY = os.path.dirname(asyncio.__file__)


def _in_asyncio(frame: FrameType) -> bool:
    return os.path.dirname(frame.f_code.co_filename) == _ASYNCIO_DIRECTORY


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"
