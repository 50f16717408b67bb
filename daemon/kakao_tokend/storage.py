"""What the daemon needs from where an account's state lives: the seam a store backend fills.

The refresher, the daemon, the alerts and the CLI are written against :class:`AccountStorage`.
The file store (:class:`~kakao_tokend.store.AccountStore`) implements it today; fleet mode's
PostgreSQL store (docs/fleet.md) is built to the same shape, so adding it does not touch
the refresh logic. The contract, and how each backend keeps it:

**Reading is cheap and never waits.** :meth:`StateStore.load` and
:meth:`StateStore.state_signature` are called before each refresh, by the heartbeat for the
accounts it checks, and on every notice of an outside change. Files: a read and a ``stat``.
PostgreSQL: the node's in-memory copy of the account's row, kept current by LISTEN/NOTIFY and
the heartbeat's poll — except while the account is held (see next), when ``load`` returns
the row read under its lock.

**Every change happens while the account is held.** ``async with store.hold(wait):`` is one
step of docs/fleet.md's refresh transaction: take the account (files: the ``flock`` on
``NAME.lock``; PostgreSQL: ``BEGIN`` and the row's ``SELECT … FOR UPDATE``), re-read it
(:meth:`~StateStore.load` inside the block sees what others committed), change it
(:meth:`~StateStore.save`: files write at once; PostgreSQL stages the compare-and-swap ``UPDATE
… WHERE generation = g`` and the ``NOTIFY``), and commit when the block ends. The caller
publishes, serves and announces only after the block: then the new refresh token is durable.
A commit that fails as the block ends raises :class:`~kakao_tokend.errors.StoreWriteError`
like a failed :meth:`~StateStore.save`; the caller keeps the state in memory and in the
rescue file, and writes it again later. :class:`~kakao_tokend.errors.StoreLocked` means
someone else held the account for longer than ``wait``.

**Publishing is local.** The token file and the extra token files (:class:`Publisher`) are
written on every node for its own consumers, from the state in memory, after a commit.
"""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from .state import AccountState

__all__ = ["AccountStorage", "Publisher", "StateStore", "in_flight_path"]

#: Beside an account's rescue file while one of its refreshes is at Kakao, unheard
#: (AccountManager._mark_in_flight); `logout` removes it with the rescue file.
IN_FLIGHT_SUFFIX = ".in-flight"


def in_flight_path(rescue_path: Path | None, name: str) -> Path | None:
    """Where account ``name``'s in-flight marker lives: beside its rescue file (None: no
    rescue file, so no marker either)."""
    return None if rescue_path is None else rescue_path.with_name(f"{name}{IN_FLIGHT_SUFFIX}")


class StateStore(Protocol):
    """The account's state of record: its tokens, their generation, alert bookkeeping."""

    @property
    def name(self) -> str:
        """The account's name."""
        ...

    @property
    def lock_path(self) -> Path:
        """What a person is told holds the account when it stays busy (a file, or a row)."""
        ...

    @property
    def rescue_path(self) -> Path | None:
        """Where tokens go that the store could not take (None: no rescue file)."""
        ...

    @property
    def shared(self) -> bool:
        """True when other nodes write this account as a matter of course (fleet mode):
        taking over the tokens they wrote is routine there, not news worth a log line."""
        ...

    @property
    def peer_grace(self) -> float:
        """Seconds another live holder of this account may need to save a rotation it made.

        0 for files: no other process refreshes while it cannot write (the daemon keeps such
        tokens itself). PostgreSQL: a node whose commit failed retries when the database
        answers again, within a few heartbeats; until then the row's refresh token is one
        Kakao has already retired, and KOE322 for it is no reason to ask for a login.
        """
        ...

    @property
    def rotations_kept(self) -> int:
        """How many of the newest rotations the state in memory holds (files: the whole log
        the state file keeps; PostgreSQL: the newest only, the log is in its own table)."""
        ...

    # ------------------------------------------------------------------ reading

    def load(self) -> AccountState | None:
        """Return the stored state, or None when there is none.

        Raises :class:`~kakao_tokend.errors.StateCorrupt` for a state that cannot be read
        (it was kept aside, never overwritten) and StoreError when the store cannot be used.
        """
        ...

    def state_signature(self) -> Hashable | None:
        """Return a value that changes whenever anyone writes the state (None: there is none).

        Files: the inode, modification time and size; PostgreSQL: the generation and the
        row's ``updated_at``. Compared with the one seen last to notice outside changes.
        """
        ...

    def loaded_signature(self) -> Hashable | None:
        """Return the :meth:`state_signature` of what the last :meth:`load` read.

        Files: taken from the descriptor that was read (a start of a thousand accounts
        spares a ``stat`` each, and a file replaced right after the read is noticed later
        instead of being mistaken for the one read); PostgreSQL: the signature now.
        """
        ...

    def shared_due_at(self, state: AccountState) -> datetime | None:
        """Return when the store says ``state`` is next due (None: the manager plans it).

        Files: None. PostgreSQL: the row's ``due_at``, planned by the node that committed the
        tokens, so every node plans the same moment (docs/fleet.md, "Scheduling").
        """
        ...

    async def catch_up(self) -> bool:
        """Bring what :meth:`load` answers up to date when it may have fallen behind; return
        True when it was re-read (the caller then looks at it again before holding).

        Files: never behind (False). PostgreSQL: a node that heard nothing from the store
        for as long as the other nodes take to count it gone (it was paused, its loop
        stalled) re-reads what changed first, one query shared by every account, so the
        tokens other nodes refreshed meanwhile are adopted without a claim each.
        """
        ...

    # ------------------------------------------------------------------ changing

    def hold(
        self, wait: float, *, decided_on: int | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold the account for a change: nobody else writes it until the block ends.

        Waits up to ``wait`` seconds without blocking the event loop (0: try once), then
        raises StoreLocked; StoreError when the lock itself cannot be used. Committed when
        the block ends normally, rolled back when it raises.

        ``decided_on``: the generation a scheduled claim was decided on. A store whose copy
        already holds a newer one before it locks raises StoreOvertaken instead, holding
        nothing. Files: not checked (the lock is taken at once, and the state re-read under
        it). PostgreSQL: the cached row, looked at again after each wait (a pooled
        connection, a row another node holds): its notification may have come meanwhile.
        """
        ...

    def try_lock(self) -> bool:
        """Hold the account without waiting, from synchronous code; True when it is held.

        For the one change a synchronous caller must make at once: writing our newer state
        back over an older one another process wrote (an old backup copied over the state
        file — the database's compare-and-swap never goes backwards). A store that cannot
        hold synchronously returns False: the caller keeps its state in the rescue file and
        looks again at the next heartbeat. Release with :meth:`unlock`.
        """
        ...

    def unlock(self) -> None:
        """Release a hold taken with :meth:`try_lock`."""
        ...

    def save(self, state: AccountState) -> None:
        """Write ``state`` as the account's state (while held); raises StoreWriteError."""
        ...

    def set_aside_state(self, label: str, *, keep: bool = False) -> Path | None:
        """Keep the stored state aside under ``label`` (never deleted; while held).

        For a state the daemon refuses to adopt (an older backup): returns where it went, or
        None when there was none. ``keep``: a copy, the state stays where it is (before a
        rescued state replaces it).
        """
        ...

    def restore_reserve(self) -> bool:
        """After a successful write: re-create what a full disk made the store give up."""
        ...

    # ------------------------------------------------------------------ the rescue file

    def ready_rescue_dir(self) -> None:
        """Create the directory :attr:`rescue_path` lives in when it is missing (the in-flight
        marker goes beside it before any rescue file exists); StoreError if it cannot be."""
        ...

    def save_rescue(self, state: AccountState) -> bool:
        """Keep ``state`` where a restart finds it although the store refused it; True if so."""
        ...

    def load_rescue(self) -> AccountState | None:
        """Return the state kept by :meth:`save_rescue` (None: none, damaged, or not ours)."""
        ...

    def discard_rescue(self) -> None:
        """Forget the rescued state: the store holds it (or something newer) now."""
        ...

    def set_aside_rescue(self, label: str) -> Path | None:
        """Keep the rescued state under ``label``: never recovered, never lost."""
        ...

    # ------------------------------------------------------------------ alert bookkeeping

    def load_alerts(self) -> dict[str, Any] | None:
        """Return what the alerts recorded as sent (None: nothing, or unreadable)."""
        ...

    def save_alerts(self, document: dict[str, Any]) -> None:
        """Record what the alerts sent; raises StoreWriteError."""
        ...


class Publisher(Protocol):
    """The account's published files on this node: what consumers read."""

    def publish(self, state: AccountState, *, now: datetime | None = None) -> None:
        """Write the token file for ``state`` (atomically); raises StoreError."""
        ...

    def publish_sinks(self, state: AccountState) -> list[str]:
        """Write the extra token files; return what failed, one line each (never raises)."""
        ...

    def read_published(self) -> dict[str, Any] | None:
        """Return the published token document (None: there is none); raises StoreError."""
        ...

    def published_current(self, generation: int) -> bool:
        """True when the token file holds ``generation`` with [publish]'s mode and group: a
        start leaves it alone. Missing, damaged, older, or open to others by a chmod: False,
        and the start writes it at once (never raises)."""
        ...


class AccountStorage(StateStore, Publisher, Protocol):
    """Everything an account manager uses: the state of record and the published files."""
