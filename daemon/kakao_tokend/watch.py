"""Notice state files that other processes write (login, import, logout, refresh) within moments.

The CLI tells a running daemon over its socket after it wrote a state; this watch covers the
rest (a CLI run by a user who may not open the socket, an operator's `rm`, a restored backup).
It uses inotify on each state directory: the kernel wakes the event loop only when a file in
it changes, so an idle daemon stays idle. Where inotify is unavailable (not Linux, or the
per-user instance limit reached) it falls back to one stat() of each directory per
POLL_INTERVAL: a rename into or a removal from a directory changes its mtime, and only then
are the state files in it compared with what was seen before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncinotify import Inotify, Mask

log = logging.getLogger(__name__)

#: Seconds between directory checks when inotify is not available.
POLL_INTERVAL = 1.0
#: Events within this many seconds for one file are handled once (a save is several events).
SETTLE = 0.05

#: asyncinotify once loaded, or why it cannot be (see _asyncinotify).
_loaded: ModuleType | str | None = None


def _asyncinotify() -> ModuleType | str:
    """Return the asyncinotify module, or why it cannot be loaded (a reason to log).

    Loaded by the first watcher, not with this module: a fleet node keeps no state files and
    never watches, and the import costs every start that does (ctypes, and an `ldconfig -p`
    child process to find libc: docs/benchmarks.md). Linux only; the import itself fails
    elsewhere (it binds libc's inotify functions).
    """
    global _loaded
    if _loaded is None:
        try:
            import asyncinotify

            _loaded = asyncinotify
        except (ImportError, AttributeError, OSError) as exc:  # pragma: no cover - non-Linux
            _loaded = f"{type(exc).__name__}: {exc}"
    return _loaded


class StateWatcher:
    """Calls ``on_change(path)`` soon after a watched file is written, renamed over or removed."""

    def __init__(self, on_change: Callable[[Path], None], *, use_inotify: bool = True) -> None:
        self._on_change = on_change
        self._files: set[Path] = set()
        self._dirs: dict[Path, int] = {}  # directory -> mtime_ns seen by the poll fallback
        self._pending: set[Path] = set()
        self._task: asyncio.Task[None] | None = None
        self._inotify: Inotify | None = None
        self._watched: set[Path] = set()
        self._signatures: dict[Path, tuple[int, int, int] | None] = {}
        inotify = _asyncinotify() if use_inotify else None
        #: asyncinotify's Mask (None in poll mode).
        self._mask: type[Mask] | None = None
        if isinstance(inotify, ModuleType):
            try:
                self._inotify = inotify.Inotify()
                self._mask = inotify.Mask
            except OSError as exc:  # EMFILE: fs.inotify.max_user_instances reached
                log.warning(
                    "inotify unavailable (%s); checking state directories every %ss",
                    exc,
                    POLL_INTERVAL,
                )
        elif inotify is not None:
            log.info(
                "inotify unavailable (%s); checking state directories every %ss",
                inotify,
                POLL_INTERVAL,
            )

    @property
    def mode(self) -> str:
        """Return "inotify" or "poll"."""
        return "inotify" if self._inotify is not None else "poll"

    def watch(self, files: Iterable[Path]) -> None:
        """Watch exactly ``files`` (state files; their directories get the watch)."""
        self._files = set(files)
        if self._inotify is None:
            self._signatures = {path: _signature(path) for path in self._files}
        # Each directory once, found by its text: a thousand state files usually share one,
        # and a Path's parent (and its hash) for each would cost more than the watch.
        by_text: dict[str, Path] = {}
        for path in self._files:
            text = str(path).rpartition("/")[0]  # only a key: "/x" and "x" need not be exact
            if text not in by_text:
                by_text[text] = path.parent
        directories = set(by_text.values())
        for directory in directories - set(self._dirs):
            self._dirs[directory] = _mtime(directory)
            if self._inotify is not None and directory not in self._watched:
                assert self._mask is not None
                mask = self._mask
                try:
                    self._inotify.add_watch(
                        directory,
                        mask.MOVED_TO | mask.CLOSE_WRITE | mask.DELETE | mask.MOVED_FROM,
                    )
                    self._watched.add(directory)
                except OSError as exc:  # ENOSPC: fs.inotify.max_user_watches reached
                    log.warning(
                        "cannot watch %s (%s); the heartbeat will notice changes there",
                        directory,
                        exc,
                    )
        for directory in set(self._dirs) - directories:
            del self._dirs[directory]  # an inotify watch stays; its events are ignored

    def start(self) -> None:
        """Start watching (inside the running loop)."""
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._read() if self._inotify else self._poll())

    async def close(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    async def _read(self) -> None:
        assert self._inotify is not None and self._mask is not None
        overflow = self._mask.Q_OVERFLOW
        async for event in self._inotify:
            if overflow in event.mask:  # events were dropped: look at every file
                for path in self._files:
                    self._changed(path)
            elif event.path is not None:
                self._changed(event.path)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            for directory, seen in list(self._dirs.items()):
                now = _mtime(directory)
                if now != seen:
                    self._dirs[directory] = now
                    for path in self._files:
                        if path.parent == directory and self._signature_changed(path):
                            self._changed(path)

    def _signature_changed(self, path: Path) -> bool:
        """Poll mode: did this file change (another file in its directory may have)?"""
        signature = _signature(path)
        changed = self._signatures.get(path) != signature
        self._signatures[path] = signature
        return changed

    def _changed(self, path: Path) -> None:
        if path not in self._files or path in self._pending:
            return
        self._pending.add(path)
        asyncio.get_running_loop().call_later(SETTLE, self._fire, path)

    def _fire(self, path: Path) -> None:
        self._pending.discard(path)
        try:
            self._on_change(path)
        except Exception:  # one account's trouble must not stop the watch
            log.exception("handling a change of %s failed", path)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _mtime(directory: Path) -> int:
    try:
        return os.stat(directory).st_mtime_ns
    except OSError:
        return 0
