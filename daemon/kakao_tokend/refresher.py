"""One account's refresh cycle: load, decide, call Kakao, persist, publish, report.

The scheduler, the CLI and the local API all go through :class:`AccountManager`, which makes a
refresh single-flight (concurrent callers share one in-flight task), re-reads the state under
the account's file lock before refreshing (so a token written by `login` is never overwritten
with stale data), and makes a new token set durable before anything else happens.

Nothing here ever writes an older state over a newer one: every write of the state file
happens under the account's lock right after checking what is on disk; a state file that
another process changed is adopted (published and hooked like our own refresh) unless it goes
backwards (an old backup), and tokens the disk cannot take go to the store's rescue file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from .config import AccountConfig, AlertsConfig, RefreshPolicy
from .errors import (
    KakaoConfigError,
    KakaoError,
    KakaoRequestRejected,
    KakaoUnavailable,
    PartialRefresh,
    ReloginRequired,
    StateCorrupt,
    StoreClaimed,
    StoreError,
    StoreLocked,
    StoreOvertaken,
    StoreWriteError,
)
from .health import AccountHealth, assess, config_action, full_action
from .kakao import KakaoClient
from .relogin import (
    AccessCheck,
    ReloginCause,
    RenderedCause,
    classify,
    cli_command,
    login_command,
    render,
)
from .sidefields import add_side_fields
from .state import AccountState, goes_backwards, rotations_shown
from .status import AccountEvent, AccountStatus, EventKind, EventListener, Health
from .storage import AccountStorage, in_flight_path
from .tokens import (
    HEARD_MARGIN,
    Clock,
    TokenSet,
    backoff_delay,
    expiring_margin,
    format_duration,
    format_local_time,
    format_time,
    issued_in_the_future,
    refresh_due_at,
    request_timeout_share,
    rotation_certain,
    rotation_window,
    same_token_strings,
    utcnow,
    within_refresh_life,
)

__all__ = ["AccountManager"]

log = logging.getLogger(__name__)

# How long a refresh waits for the account's lock (held briefly by `login`, `refresh`,
# `import`) before treating the attempt as a transient failure: at most FILE_LOCK_WAIT, and no
# more than LOCK_WAIT_SHARE of the access token's lifetime (a 4-second token waits 80 ms).
FILE_LOCK_WAIT = 5.0
LOCK_WAIT_SHARE = 0.02
#: The jitter and back-off dice of every account: one generator (its state is 2.5 KiB), not one
#: per account. Tests that need fixed dice pass their own ``rng``.
SHARED_RNG = random.Random()
#: An attempt number past the top of the back-off ladder: its longest step, the pace at which
#: a configuration Kakao refused is tried again.
LONGEST_STEP = 64
#: The default rotation window, Kakao's "less than one month".
KAKAO_ROTATION_WINDOW = RefreshPolicy().rotation_window


#: Bumped at every assignment of any manager's state: the scheduler's beat, computed from
#: every account's tokens, is current while this has not moved (RefreshScheduler.interval).
_state_changes = 0


def state_changes() -> int:
    """Return how many times a manager's state was assigned (see RefreshScheduler.interval)."""
    return _state_changes


class _Lingering(NamedTuple):
    """A refresh request given up on after its wait but kept open for Kakao's late answer
    (KakaoClient.refresh's ``late``): it may carry the only live refresh token."""

    call: asyncio.Future[tuple[TokenSet, bool]]
    #: The token set the request was sent with: its answer replaces only that one.
    tokens: TokenSet
    #: When it was sent (time.monotonic()).
    started: float


#: The reason of a refresh run that only takes a late answer: it calls Kakao for nothing else
#: (a newer state read under the lock, e.g. another fleet node's commit, makes it stale).
LATE_ANSWER = "Kakao's late answer"
#: Runs started by a late answer (AccountManager._late_done), kept until they end.
_LATE_RUNS: set[asyncio.Task[AccountState | None]] = set()


class Packed(Protocol):
    """An account's state kept packed by its store (fleet/packed.py PackedState)."""

    @property
    def state(self) -> AccountState: ...
    def token_times(self) -> tuple[timedelta, datetime]: ...


class AccountManager:
    """Keeps one account's token set fresh; every refresh of that account goes through here."""

    # One per account, 10,000 on a fleet node: slots are a fifth smaller than the instance
    # dictionary. ``__dict__`` stays for what tests patch onto one manager (a counting tick).
    # The fields of _BUSY_DEFAULTS live in one side object while any differs from its
    # default (a refresh, a pending write or publish, a retry): an idle account has none.
    __slots__ = (
        "__dict__",
        "_busy",
        "_disk_signature",
        "_planned_refresh_at",
        "_state",
        "account",
        "client",
        "clock",
        "hub",
        "monotonic",
        "policy",
        "rng",
        "status",
        "store",
    )

    def __init__(
        self,
        account: AccountConfig,
        *,
        store: AccountStorage,
        client: KakaoClient,
        policy: RefreshPolicy,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        hub: list[EventListener] | None = None,
    ) -> None:
        self._busy: object | None = None  # before the fields it holds (see _BUSY_DEFAULTS)
        self.account = account
        self.store = store
        self.client = client
        self.policy = policy
        self.clock = clock
        self.rng = rng or SHARED_RNG
        self.monotonic = monotonic
        self._state: AccountState | Packed | None = None
        self.status = AccountStatus()
        #: The listeners every account of a daemon shares (Daemon.listeners: one list, not
        #: one per account); told before this manager's own.
        self.hub = hub
        #: This manager's own listeners, made when the first is added (see listeners).
        self._listeners: list[EventListener] | None = None
        #: Made at the first change (see _exclusive): most accounts of a large node wait idle.
        self._single_flight: asyncio.Lock | None = None
        self._exclusive_users = 0  # holding or waiting for it (see _exclusive)
        self._inflight: asyncio.Task[AccountState | None] | None = None
        self._planned_refresh_at: datetime | None = None
        #: While the account is held for a change: what to do once it is committed.
        self._held = False
        #: A list only while something waits for a commit (a shared empty tuple otherwise).
        self._after_commit: Sequence[Callable[[], object]] = ()
        #: The state file as we last wrote or read it; a different one was written by others.
        self._disk_signature: Hashable | None = None
        #: The planned retry on the monotonic clock, which a stepped wall clock cannot move.
        self._retry_due_mono: float | None = None
        #: The generation whose missing user-info call was last tried (see tick).
        self._sign_up_tried: int | None = None
        self._write_attempt = 0
        self._next_write_at: datetime | None = None
        self._publish_attempt = 0
        self._next_publish_at: datetime | None = None
        self._last_failure_ambiguous = False
        #: Fleet mode, a refresh token Kakao refused while another node may hold its
        #: successor unsaved: (its fingerprint, when it was first refused), see
        #: _superseded_elsewhere.
        self._superseded: tuple[str, datetime] | None = None
        #: Refresh requests given up on but kept open for Kakao's late answer (_linger).
        self._lingering: tuple[_Lingering, ...] = ()

    @property
    def name(self) -> str:
        """Return the account's name."""
        return self.account.name

    @property
    def state(self) -> AccountState | None:
        """Return the account's state (None: no tokens yet)."""
        held = self._state
        if held is None or isinstance(held, AccountState):
            return held
        return held.state  # packed (fleet mode): the same object while anyone holds it

    @state.setter
    def state(self, state: AccountState | None) -> None:
        global _state_changes
        _state_changes += 1
        # A store that keeps idle states packed (fleet/store.py, packed_state) holds an
        # adopted state as its cached row's: 10,000 idle accounts on a node would otherwise
        # keep theirs as objects (docs/benchmarks.md, "Memory, seventh session").
        pack: Callable[[AccountState], AccountState | Packed] | None = getattr(
            self.store, "packed_state", None
        )
        self._state = state if state is None or pack is None else pack(state)

    def token_times(self) -> tuple[timedelta, datetime] | None:
        """Return the access token's lifetime and the refresh token's expiry (None: no
        tokens) without making a packed state's objects (the heartbeat asks every account)."""
        held = self._state
        if held is None:
            return None
        if isinstance(held, AccountState):
            tokens = held.tokens
            return tokens.access_lifetime, tokens.refresh_expires_at
        return held.token_times()

    def repack_state(self) -> None:
        """Keep the state packed again when the store's cached row now holds it (fleet mode:
        after a commit of the state this manager set before it was written)."""
        held = self._state
        if isinstance(held, AccountState):
            self.state = held

    @property
    def listeners(self) -> list[EventListener]:
        """Return the listeners of this manager alone (besides its daemon's shared ones)."""
        if self._listeners is None:
            self._listeners = []
        return self._listeners

    def listen(self, listener: EventListener) -> None:
        """Tell ``listener`` this account's events: once on the shared list when the manager
        has one (the listener is told every account's events, and knows them by name),
        else on its own."""
        listeners = self.hub if self.hub is not None else self.listeners
        if listener not in listeners:
            listeners.append(listener)

    def unlisten(self, listener: EventListener) -> None:
        """Stop telling ``listener`` this account's events; one on the shared list stays (it
        is every account's, and ignores an account it no longer knows)."""
        if self._listeners is not None and listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def refreshing(self) -> bool:
        """Return True while a refresh (a call to Kakao and its saving) is in flight."""
        return self._inflight is not None

    @property
    def awaiting_kakao(self) -> bool:
        """Return True while a refresh is in flight or a request given up on is still open
        for Kakao's late answer (a stop waits for both, and asks systemd for the time)."""
        return self._inflight is not None or any(not e.call.done() for e in self._lingering)

    @property
    def busy(self) -> bool:
        """Return True while a refresh runs or a new state still waits to be written."""
        return self._inflight is not None or self.status.write_pending

    @property
    def request_grace(self) -> float:
        """Return how long an in-flight refresh may still take: the longest wait of its
        request, as the client computes it for these tokens (fitted to their lifetime, at its
        most grown: how long a request given up on stays open for its late answer), and as
        much again, at most 1 s more (60 + 1 s for Kakao's 6-hour token, 1.5 s for a
        6-second one; tokens.answer_patience).

        Giving up earlier (at a stop or a reload) would close the session or swap the store
        under a request Kakao may already have answered with a rotated refresh token.
        """
        state = self.state
        if state is None:
            return self.account.app.timeout + 1.0
        tokens = state.tokens
        # A request given up on stays open this long for its late answer, and the next
        # attempt waits for it (KakaoClient.refresh's late, tokens.answer_patience).
        wait = self.account.app.answer_patience(
            self.policy,
            tokens.access_lifetime,
            tokens.refresh_remaining(self.clock()).total_seconds(),
            heard=self.status.heard_in,
        )
        return wait + min(wait, 1.0)

    # ------------------------------------------------------------------ loading and planning

    def load(self) -> AccountState | None:
        """Read the state from disk (and the rescue file) and set the health (no network).

        A rescue file left by a process that could not write the state file wins when it is
        newer (a higher generation with tokens no older); an older one never does.
        """
        try:
            state: AccountState | None = self.store.load()
        except StateCorrupt as exc:
            log.critical("account %s: %s", self.name, exc)
            state = None
            corrupt: StateCorrupt | None = exc
        else:
            corrupt = None
        self._disk_signature = self.store.loaded_signature()
        path = self._in_flight_path()
        if path is not None and os.path.exists(path):
            # The process before us died while a refresh was at Kakao (_mark_in_flight).
            self._last_failure_ambiguous = True
        rescued = self._recover_rescue(state)
        if rescued is not None:
            return rescued
        if corrupt is not None:
            self.status.unreadable(str(corrupt))
            return None
        self._adopt(state)
        return state

    def _recover_rescue(self, on_disk: AccountState | None) -> AccountState | None:
        """Take the rescue file's state when it is newer than ``on_disk``; return it, else None."""
        rescued = self.store.load_rescue()
        if rescued is None:
            return None
        if on_disk is not None:
            if rescued.tokens == on_disk.tokens and rescued.generation <= on_disk.generation:
                self.store.discard_rescue()  # the state file caught up before the process ended
                return None
            why = goes_backwards(on_disk, rescued)
            if why is None:
                kept = self.store.set_aside_rescue("superseded")
                log.warning(
                    "account %s: the rescue file (generation %d) is not newer than the state"
                    " file (generation %d); using the state file, the rescue file is kept as %s",
                    self.name,
                    rescued.generation,
                    on_disk.generation,
                    kept,
                )
                return None
        kept = None
        if on_disk is not None:
            # Nothing lost: the state the rescued one replaces is kept as .replaced-<stamp>.
            try:
                kept = self.store.set_aside_state("replaced", keep=True)
            except StoreError as exc:
                log.warning("account %s: %s; recovering the rescue file without it", self.name, exc)
        held = "nothing usable"
        if on_disk is not None:
            held = f"generation {on_disk.generation}" + (f", kept as {kept}" if kept else "")
        log.warning(
            "account %s: recovered the tokens from the rescue file %s (generation %d, refresh"
            " token %s); the state file held %s",
            self.name,
            self.store.rescue_path,
            rescued.generation,
            rescued.tokens.refresh_fingerprint,
            held,
        )
        self._adopt(rescued)
        if self.store.shared:
            # A fleet row is written only under its row lock, which a start does not hold:
            # the first tick commits it (_retry_pending_write) and publishes it then; the
            # rescue file stays until the commit. Waiting for the lock is no failed write.
            self.status.write_waiting()
            self._next_write_at = None
            return rescued
        if self._persist(rescued):
            self._publish(rescued)
        return rescued

    def _adopt(self, state: AccountState | None) -> None:
        self.state = state
        self._planned_refresh_at = None
        self.status.adopted(state)
        if self.status.health is Health.OK:
            self._retry_due_mono = None

    def notice_outside_changes(self) -> bool:
        """Adopt a state another process wrote (e.g. `login`); return True when it changed.

        A cheap stat (called on a directory-watch notice, before a refresh, and by the
        heartbeat for the accounts it checks); never replaces a newer in-memory state that is still
        waiting to be written. An adopted state is published (token file and extra files) and
        announced as an ``adopted`` event, so hooks and alerts react as to our own refresh. A
        state that goes backwards (an old backup copied over the live file) is refused.
        """
        signature = self.store.state_signature()
        if signature == self._disk_signature:
            return False
        try:
            state = self.store.load()
        except StoreError as exc:
            log.error("account %s: cannot re-read state: %s", self.name, exc)
            self._disk_signature = signature
            return False
        self._disk_signature = signature
        if state is None:
            if self.state is not None and not self.status.write_pending:
                log.warning("account %s: state file was removed (logout?)", self.name)
                self._adopt(None)
                self._emit(
                    EventKind.ADOPTED, f"{self.name}: state file removed", {"generation": None}
                )
                return True
            return False
        if self.state is not None and (
            state.tokens.refresh_token == self.state.tokens.refresh_token
            and state.tokens.access_token == self.state.tokens.access_token
        ):
            return False
        if self.state is not None:
            why = goes_backwards(state, self.state)
            if why is not None:
                self._refuse(state, why)
                return False
        self._take_over(state)
        return True

    def _take_over(self, state: AccountState) -> None:
        """Adopt a state another process wrote: publish it and announce it like a refresh."""
        # In a fleet every other node's refresh is adopted here: at INFO, three nodes with
        # thousands of accounts wrote dozens of these lines a second into the journal.
        log.log(
            logging.DEBUG if self.store.shared else logging.INFO,
            "account %s: adopted tokens written by another process (generation %d, refresh %s)",
            self.name,
            state.generation,
            state.tokens.refresh_fingerprint,
        )
        self.status.write_dropped()
        self._adopt(state)
        self._publish(state)
        self._emit(
            EventKind.ADOPTED,
            f"{self.name}: adopted tokens written by another process",
            {"generation": state.generation},
        )

    def _refuse(self, older: AccountState, why: str) -> None:
        """Keep our newer state over ``older`` (an old backup): set it aside, write ours back.

        The refused file is never destroyed: it is moved to ``.refused-<stamp>`` first. When
        that is impossible (lock busy, file system trouble) ours goes to the rescue file, so a
        restart cannot fall back to the older state, and we look again at the next tick.
        """
        assert self.state is not None
        store = self.store
        try:
            locked = store.try_lock()
        except StoreError:
            locked = False
        if not locked:
            self.store.save_rescue(self.state)
            self._disk_signature = None  # look again at the next tick
            return
        try:
            try:
                aside = store.set_aside_state("refused")
            except StoreError as exc:
                log.error(
                    "account %s: cannot keep the refused state file aside: %s", self.name, exc
                )
                self.store.save_rescue(self.state)
                self._disk_signature = None
                return
            kept = f"kept the newer tokens (generation {self.state.generation}) and put them back"
            if store.shared:
                # A fleet's row goes back when a database is restored, or a replica promoted
                # without its last commits, while this node holds what was committed after.
                message = (
                    f"the store's row went back to an older state: {why} (a database restored"
                    f" or a replica promoted without its last commits?); {kept}"
                )
                log.critical("account %s: %s", self.name, message)
            else:
                message = (
                    f"refused the state file written by another process: {why} (an old"
                    f" backup?); {kept}"
                    + (f"; the refused file is kept as {aside}" if aside else "")
                )
                log.critical(
                    "account %s: %s — if you really mean to go back to it, run `%s`",
                    self.name,
                    message,
                    cli_command(self.account, "restore", str(aside or "BACKUP")),
                )
            if self._persist(self.state):
                self._publish(self.state)
            self._conflict(message, refused_file=None if store.shared or not aside else str(aside))
        finally:
            store.unlock()

    def _conflict(self, message: str, *, refused_file: str | None = None) -> None:
        self.status.conflicted(message, refused_file=refused_file)
        self._emit(EventKind.CONFLICT, f"{self.name}: {message}", {})

    def planned_refresh_at(self) -> datetime | None:
        """Return when the next refresh (or retry) should run, or None if nothing is planned."""
        planned = self._planned_refresh_at
        if planned is not None and self.status.health is Health.OK and self.state is not None:
            return planned  # the usual answer, asked several times per account at start
        if self.state is None or self.status.health is Health.RELOGIN:
            return None
        if self.status.health in (Health.RETRYING, Health.CONFIG):
            return self.status.next_attempt_at
        if self._planned_refresh_at is None:
            # Fleet mode: the store says when (the node that committed these tokens planned
            # it by the same rule), so every node plans the same moment.
            self._planned_refresh_at = self.store.shared_due_at(self.state) or refresh_due_at(
                self.state.tokens,
                share=self.policy.refresh_at,
                jitter=self.policy.jitter,
                rng=self.rng,
            )
        return self._planned_refresh_at

    def forget_plan(self) -> None:
        """Plan the next refresh anew (the store's plan for the account changed)."""
        self._planned_refresh_at = None

    def take_over(self, state: AccountState) -> None:
        """Adopt ``state`` another node wrote without a new generation (a re-login mark)."""
        if not self.busy:
            self._take_over(state)

    def next_wakeup(self) -> datetime | None:
        """Return the earliest moment this account needs attention (refresh, write, publish)."""
        planned = self.planned_refresh_at()
        if self._next_write_at is None and self._next_publish_at is None:
            return planned  # the usual case (a thousand accounts are planned at start)
        moments = [
            m for m in (planned, self._next_write_at, self._next_publish_at) if m is not None
        ]
        return min(moments) if moments else None

    def needs_refresh(self, now: datetime) -> bool:
        """Return True when a refresh (or a due retry) should run now.

        Only the planned (jittered) moment counts, so heartbeats never bunch accounts onto
        their ticks. After a suspend or a forward clock jump the plan simply lies in the past.
        A wall clock stepped backwards would push every absolute time away; a token issued
        "in the future" betrays that (kubelet's rule), and then we refresh at once — except
        during a back-off (a KOE237 above all), which runs until its planned retry: that one
        is also kept on the monotonic clock, which no step moves.
        """
        planned = self.planned_refresh_at()
        if planned is None or self.state is None:
            return False
        if now >= planned:
            return True
        if (
            self.status.health in (Health.RETRYING, Health.CONFIG)
            and self.status.next_attempt_at is not None
        ):
            due = self._retry_due_mono
            return due is not None and self.monotonic() >= due
        return issued_in_the_future(self.state.tokens, now)

    def set_policy(self, policy: RefreshPolicy) -> None:
        """Apply a reloaded refresh policy; the next refresh is planned with it."""
        if policy != self.policy:
            self.policy = policy
            self._planned_refresh_at = None

    def reconfigure(
        self,
        account: AccountConfig,
        *,
        store: AccountStorage,
        client: KakaoClient,
        policy: RefreshPolicy,
    ) -> None:
        """Apply a reloaded configuration: the account's settings, store, client and policy.

        Call it while no refresh is in flight (:meth:`wait_idle`): a refresh releases its lock
        through the store it took it with, but a new client under a running request would
        lose that request's answer. A configuration Kakao refused is tried again at once.
        """
        self.account = account
        self.store = store
        self.client = client
        self.set_policy(policy)
        self.clear_config_error()

    def _rotation_window(self, tokens: TokenSet) -> timedelta:
        """Return ``[refresh] rotation_window``: left at Kakao's month, fitted to a shorter
        refresh token (tokens.rotation_window); set by hand, as written."""
        configured = self.policy.rotation_window
        if configured != KAKAO_ROTATION_WINDOW:
            return timedelta(seconds=configured)
        return rotation_window(tokens, configured)

    def _retry_delay(self, attempt: int, exc: KakaoError | None = None) -> float:
        """Return the wait before retry ``attempt`` (tokens.backoff_delay, the one rule)."""
        assert self.state is not None
        tokens = self.state.tokens
        unavailable = exc if isinstance(exc, KakaoUnavailable) else None
        life = tokens.access_lifetime.total_seconds()
        margin = expiring_margin(self.policy.refresh_at, self.policy.jitter, life)
        return backoff_delay(
            attempt,
            now=self.clock(),
            expires_at=tokens.access_expires_at,
            lifetime=tokens.access_lifetime,
            initial=self.policy.retry_initial,
            cap=self.policy.retry_max,
            rng=self.rng,
            refresh_expires_at=tokens.refresh_expires_at,
            rate_limited=unavailable is not None and unavailable.rate_limited,
            retry_after=unavailable.retry_after if unavailable is not None else None,
            # When health's access_expiring may page: a retry before it, not a page (a 429).
            pages_at=tokens.access_expires_at - timedelta(seconds=margin),
        )

    # ------------------------------------------------------------------ the periodic check

    async def tick(self) -> None:
        """Do whatever is due now: retry a pending write or publish, pick up outside changes,
        refresh."""
        now = self.clock()
        if self.status.write_pending and (
            self._next_write_at is None or now >= self._next_write_at
        ):
            await self._retry_pending_write()
        if (
            self.status.publish_pending
            and self.state is not None
            and (self._next_publish_at is None or now >= self._next_publish_at)
        ):
            self._publish(self.state)
        if not self.busy:
            self.notice_outside_changes()
        if self.needs_refresh(self.clock()):
            await self.refresh(reason="due")
        state = self.state
        if (
            state is not None
            and state.user_id is None
            and state.generation != self._sign_up_tried
            and self.status.health is Health.OK
            and not self.busy
        ):
            # A login (or import) made while we run could not make the user-info call; we
            # adopted its tokens, so make it now, once per generation (see _sign_up), after
            # a refresh that was due: the call must never hold one up.
            await self._sign_up(state)

    async def verify(self) -> None:
        """At start: check the access token with access_token_info, so a revoked one shows now.

        An access token that Kakao no longer accepts gets one refresh; if that is refused too,
        the account is marked for re-login by :meth:`refresh`.
        """
        state = self.state
        if state is None or self.status.health is not Health.OK:
            return
        if state.user_id is None:
            if self.needs_refresh(self.clock()):
                return  # the refresh goes first; the next tick makes the call (tick)
            await self._sign_up(state)
            state = self.state
            if state is None or self.status.health is not Health.OK:
                return
        asked_at = self.clock()
        try:
            # The start-up refresh waits for this answer: it must not outlast the refresh token.
            info = await self.client.access_token_info(
                state.tokens.access_token,
                lifetime=state.tokens.access_lifetime,
                refresh_expires_at=state.tokens.refresh_expires_at,
            )
        except ReloginRequired as exc:
            log.warning(
                "account %s: Kakao rejected the stored access token (%s); refreshing now",
                self.name,
                exc.label,
            )
            await self.refresh(force=True, reason="access token rejected at start")
            return
        except KakaoConfigError as exc:
            self._mark_permanent(Health.CONFIG, exc)
            return
        except KakaoError as exc:
            log.warning(
                "account %s: could not verify the access token at start (%s); will rely on"
                " the schedule",
                self.name,
                exc,
            )
            return
        if self.state is not state:
            return  # a refresh replaced the tokens meanwhile; nothing to correct
        if state.user_id is not None and state.user_id != info.user_id:
            # (None stays None: it means the user-info call is still to be made, tick.)
            state = self.state = replace(state, user_id=info.user_id)
        log.info(
            "account %s: access token verified (user %s, %s left)",
            self.name,
            info.user_id,
            format_duration(info.expires_in),
        )
        await self._trust_kakaos_expiry(state, asked_at + timedelta(seconds=info.expires_in))

    async def _sign_up(self, state: AccountState) -> None:
        """Call /v2/user/me for an account whose login could not (no user id is known).

        Kakao unlinks users who make no personal-info call within a day of their first login
        (docs/kakao.md, "What ends a login early"); `login` makes it, but when Kakao failed it
        there, the daemon's check at start, or its next tick after adopting that login's
        tokens, is the next chance: once per generation.
        """
        self._sign_up_tried = state.generation
        try:
            me = await self.client.user_me(
                state.tokens.access_token,
                lifetime=state.tokens.access_lifetime,
                refresh_expires_at=state.tokens.refresh_expires_at,
            )
        except KakaoError as exc:
            log.warning(
                "account %s: could not call /v2/user/me (%s); Kakao unlinks users that never"
                " call a user-info API within a day of their first login",
                self.name,
                exc,
            )
            return
        log.info("account %s: called /v2/user/me, which the login could not", self.name)
        if self.state is state:
            # Known from now on (and saved with the next write): the call is not made again.
            self.state = replace(state, user_id=int(me["id"]))

    async def _trust_kakaos_expiry(self, state: AccountState, kakao_expiry: datetime) -> None:
        """Kakao says the access token dies sooner than we computed: believe Kakao.

        Our expiry is our clock plus ``expires_in`` at issue; a stepped clock, a suspended host
        or Kakao's own view can disagree. Refreshing late is the one thing that must not
        happen, so an earlier expiry from access_token_info wins (a later one is ignored).
        The correction is saved under the account's locks after re-reading the state file: a
        `login`, `refresh` or `import` that landed meanwhile wins, and the correction (about
        the old access token) is dropped. When the lock is busy it stays in memory.
        """
        tokens = state.tokens
        slack = max(2.0, tokens.access_lifetime.total_seconds() * 0.01)
        if kakao_expiry >= tokens.access_expires_at - timedelta(seconds=slack):
            return
        async with self._exclusive(), self._holding(self.store, self._lock_wait()) as busy:
            if busy is None and not self.status.write_pending:
                self.notice_outside_changes()
            if self.state is not state:
                log.info(
                    "account %s: the tokens changed while Kakao was asked; the earlier"
                    " expiry it reported no longer applies",
                    self.name,
                )
                return
            log.warning(
                "account %s: Kakao says the access token expires %s, %s earlier than"
                " computed (clock skew?); planning by Kakao's time",
                self.name,
                format_local_time(kakao_expiry),
                format_duration((tokens.access_expires_at - kakao_expiry).total_seconds()),
            )
            corrected = replace(
                state,
                tokens=replace(
                    tokens,
                    access_expires_at=kakao_expiry,
                    # Keep the lifetime: the token was issued one lifetime before it expires.
                    access_issued_at=kakao_expiry - tokens.access_lifetime,
                ),
            )
            self.state = corrected
            self._planned_refresh_at = None
            if busy is None and self._persist(corrected):
                self._publish(corrected)

    # ------------------------------------------------------------------ refreshing

    async def refresh(
        self, *, force: bool = False, reason: str = "", min_valid: float | None = None
    ) -> AccountState | None:
        """Refresh now if still needed (or ``force``); concurrent callers share one refresh.

        The refresh itself runs in a task this manager owns, so a cancelled caller (a scheduler
        shutting down, a client hanging up) never interrupts a refresh half-way: the response
        is always persisted. With ``min_valid`` (an on-demand request) the refresh waits for
        the account's lock as long as another holder's request may take, and does not call
        Kakao when the tokens read under the lock are valid that long: another process (a
        fleet node) refreshed them meanwhile.
        """
        if self._inflight is None:
            self._inflight = asyncio.create_task(
                self._refresh_exclusive(force=force, reason=reason, min_valid=min_valid)
            )
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, task: asyncio.Task[AccountState | None]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "account %s: refresh crashed: %r", self.name, task.exception(), exc_info=False
            )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no refresh is in flight and no request given up on is still open (its
        late answer, when it brings one, is kept first: a stop, a reload or a command that
        ended before it would close the session under a rotated refresh token); return False
        when ``timeout`` ran out first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            running = self._inflight
            open_calls = [e.call for e in self._lingering if not e.call.done()]
            state = self.state
            if running is None and not open_calls:
                if state is None or not self._has_late_answer(state.tokens):
                    return True
                running = asyncio.ensure_future(self.refresh(force=True, reason=LATE_ANSWER))
            left = deadline - loop.time()
            if left <= 0:
                return False
            waited = [asyncio.shield(running)] if running is not None else open_calls
            with contextlib.suppress(Exception):
                await asyncio.wait(waited, timeout=left)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Hold the lock that lets one change of the account run at a time in this process.

        The lock exists while someone holds or waits for it: kept, it would be one more
        object (and a side object) for each account a fleet node ever refreshed.
        """
        lock = self._single_flight
        if lock is None:
            lock = self._single_flight = asyncio.Lock()
        self._exclusive_users += 1
        try:
            async with lock:
                yield
        finally:
            self._exclusive_users -= 1
            if self._exclusive_users == 0:
                self._single_flight = None

    def _lock_wait(self) -> float:
        """Return how long a scheduled refresh waits for the account's lock: a share of the
        access token's life, and never past half of the refresh token's (another holder that
        never lets go must leave time for the attempt after this one).

        The share is no more than a Kakao request's under the policy
        (tokens.request_timeout_share): two attempts that wait out the lock must fit before
        access_expiring pages, as two hung requests do; with a late refresh_at + jitter a
        fixed 2 % made a short token's page come later than a 6-hour token's (whose wait is
        5 s)."""
        if self.state is None:
            return FILE_LOCK_WAIT
        tokens = self.state.tokens
        life = tokens.access_lifetime.total_seconds()
        policy = self.policy
        share = min(LOCK_WAIT_SHARE, request_timeout_share(policy.refresh_at, policy.jitter))
        wait = max(0.0, min(FILE_LOCK_WAIT, life * share))
        return within_refresh_life(wait, tokens.refresh_remaining(self.clock()).total_seconds())

    @contextlib.asynccontextmanager
    async def _holding(
        self, store: AccountStorage, wait: float, *, decided_on: int | None = None
    ) -> AsyncIterator[StoreError | None]:
        """Hold the account in ``store`` for a change; yield why it could not be held, or None.

        What is published and announced while it is held happens once the hold ended, that
        is once the change is committed (storage.StateStore.hold). A commit that fails as the
        hold ends is a failed write: the state stays in memory and in the rescue file.
        ``decided_on``: as storage.StateStore.hold's (StoreOvertaken is yielded).
        """
        held = False
        try:
            async with store.hold(wait, decided_on=decided_on):
                held = True
                self._held = True
                try:
                    yield None
                finally:
                    self._held = False
        except StoreError as exc:
            if held and isinstance(exc, StoreWriteError) and self.state is not None:
                self._keep_unsaved(self.state, exc)
            elif held:
                raise
            else:  # busy, or the lock is unusable (permissions, ...)
                yield exc
        finally:
            actions, self._after_commit = self._after_commit, ()
            for action in actions:
                action()

    async def _refresh_exclusive(
        self, *, force: bool, reason: str, min_valid: float | None = None
    ) -> AccountState | None:
        async with self._exclusive():
            if not force and min_valid is None and await self._no_longer_due():
                return self.state
            return await self._refresh_held(force=force, reason=reason, min_valid=min_valid)

    async def _no_longer_due(self) -> bool:
        """Return True when the account no longer needs the refresh that was decided for it:
        another process refreshed it meanwhile, and its tokens are adopted already (a fleet
        notification's re-read) or are adopted here from the store, brought up to date first
        when it had fallen behind (a fleet node continued after a pause). No hold needed,
        nothing to do. Without this look a claim decided before an adoption locked the row
        only to find it current (an idle hold)."""
        caught_up = await self.store.catch_up()
        if self.status.write_pending:
            return False
        if caught_up:
            self.notice_outside_changes()
        return not self.needs_refresh(self.clock())

    async def _refresh_held(
        self, *, force: bool, reason: str, min_valid: float | None
    ) -> AccountState | None:
        wait = self._lock_wait() if min_valid is None else self.request_grace
        # A scheduled claim holds the account only at the generation it was decided on: when
        # another fleet node committed a newer one while it waited (for the store's re-read,
        # a connection, the row), that one is adopted instead, and the scheduler plans the
        # account anew from it. Locking the row would only find it current.
        decided_on = None
        if not force and min_valid is None and not self.status.write_pending and self.state:
            decided_on = self.state.generation
        while True:
            # The store is captured: a reload may swap self.store while Kakao answers, and
            # the hold must be released through the object that holds it.
            async with self._holding(self.store, wait, decided_on=decided_on) as busy:
                if isinstance(busy, StoreOvertaken):
                    if self.notice_outside_changes():
                        return self.state
                    decided_on = None  # nothing adopted (a row refused as older): claim it
                    continue
                return await self._refresh_in(busy, force=force, reason=reason, min_valid=min_valid)

    async def _refresh_in(
        self, busy: StoreError | None, *, force: bool, reason: str, min_valid: float | None
    ) -> AccountState | None:
        """The refresh inside :meth:`_refresh_held`'s hold (``busy``: why it is not held)."""
        if isinstance(busy, StoreClaimed):
            # Another fleet node is refreshing it: nothing failed. Its commit is announced
            # (LISTEN/NOTIFY); look again soon in case that node dies on the way.
            self._look_again_soon()
            return self.state
        if busy is not None:
            if self.state is not None:
                # (A fleet node's lock is a database row: what fails there is the database.)
                failed = "row_lock_error" if self.store.shared else "lock_error"
                label = "lock_busy" if isinstance(busy, StoreLocked) else failed
                self._record_transient(str(busy), label, ambiguous=False)
            return self.state
        # Re-read under the lock: `login` or another tool may have written newer tokens.
        self._sync_with_disk()
        state = self.state
        if state is None:
            return None
        if self.status.health is Health.RELOGIN and not force:
            return state
        if reason == LATE_ANSWER and not self._has_late_answer(state.tokens):
            return state  # taken already, or newer tokens were read under the lock
        now = self.clock()
        if not force and not self.needs_refresh(now):
            # What the row under the lock said moved the plan (a fleet node's claim that
            # found it current: tests/test_fleet_e2e.py counts these by the store's log line).
            log.debug(
                "account %s: not due under the lock (%s; planned %s, generation %d)",
                self.name,
                reason or "requested",
                _to_the_millisecond(self.planned_refresh_at()),
                state.generation,
            )
            return state
        if (
            min_valid is not None
            and self.status.health is Health.OK
            and state.tokens.access_remaining(now).total_seconds() >= min_valid
        ):
            return state  # refreshed by another process while we waited for the lock
        return await self._call_kakao(state, reason)

    def _look_again_soon(self) -> None:
        """Plan the next look at a share of the lifetime, at most a heartbeat, from now."""
        life = self.state.tokens.access_lifetime.total_seconds() if self.state else 60.0
        delay = max(0.05, min(self.policy.heartbeat, life * LOCK_WAIT_SHARE))
        self._planned_refresh_at = self.clock() + timedelta(seconds=delay)

    def _sync_with_disk(self) -> None:
        """Under the lock: take in what other processes wrote since we last wrote or read.

        With a write pending, a state file that changed meanwhile is a conflict: we never write
        over it (see :meth:`_write_conflict`).
        """
        if not self.status.write_pending:
            self.notice_outside_changes()
        elif self.store.state_signature() != self._disk_signature:
            self._write_conflict()

    async def _call_kakao(self, state: AccountState, reason: str) -> AccountState | None:
        now = self.clock()
        window = self._rotation_window(state.tokens)
        expect_rotation = rotation_certain(state.tokens, now, window=window)
        self.status.attempted()
        log.debug("account %s: refreshing (%s)", self.name, reason or "requested")
        try:
            try:
                tokens, rotated = await self._timed_refresh(state.tokens)
            except KakaoUnavailable as exc:
                answer = await self._late_answer_under_the_hold(state.tokens, exc)
                if answer is None:
                    raise
                tokens, rotated = answer
        except PartialRefresh as exc:
            return self._salvage(state, exc)
        except KakaoUnavailable as exc:
            self._record_transient(str(exc), exc.label, ambiguous=exc.ambiguous, exc=exc)
            return state
        except ReloginRequired as exc:
            cause = await self._refusal_cause(state, exc)
            if self._superseded_elsewhere(state, exc, cause):
                return state
            self._mark_permanent(Health.RELOGIN, exc, cause=cause)
            return self.state
        except KakaoConfigError as exc:
            self._mark_permanent(Health.CONFIG, exc)
            return self.state
        except KakaoRequestRejected as exc:
            self._record_transient(str(exc), exc.label, ambiguous=False, exc=exc)
            return state
        return self._accept(state, tokens, rotated, expect_rotation=expect_rotation)

    async def _timed_refresh(self, tokens: TokenSet) -> tuple[TokenSet, bool]:
        """Call Kakao's refresh and tell the listeners how long it took (/metrics' histogram).

        A request Kakao did not answer in time is counted, and the next waits longer
        (tokens.request_timeout). An answer, an error too, sets the count to the fewest that
        would have waited long enough for it: a Kakao that stays slow keeps the longer wait
        (it would otherwise cost a timeout at every refresh), and a quick answer ends it; and
        the next waits at least twice as long as it took (_heard_after). Other failures
        without an answer (a refused connection, a reset) leave both as they are."""
        late = await self._answer_of_open_request(tokens)
        if late is not None:
            return late
        started = time.monotonic()
        status = self.status
        self._mark_in_flight(True)
        try:
            result = await self.client.refresh(
                tokens,
                unanswered=status.unanswered,
                heard=status.heard_in,
                late=partial(self._linger, tokens, started),
                rotation_window=self._rotation_window(tokens),
            )
        except KakaoError as exc:
            self._emit_call_time(started, "failure")
            if exc.status is not None:
                self._heard_after(tokens, time.monotonic() - started)
                if not self._last_failure_ambiguous:  # (an earlier attempt may have rotated)
                    self._mark_in_flight(False)  # an answer: Kakao changed nothing unheard
            elif isinstance(exc, KakaoUnavailable) and exc.code == "timeout":
                status.went_unanswered()
            raise
        self._heard_after(tokens, time.monotonic() - started, result[0])
        self._emit_call_time(started, "success")
        return result

    async def _late_answer_under_the_hold(
        self, tokens: TokenSet, exc: KakaoUnavailable
    ) -> tuple[TokenSet, bool] | None:
        """Fleet mode: the answer to a request sent with ``tokens`` that Kakao did not answer
        in time, waited for under the hold (the row lock) while the request stays open for it
        (tokens.answer_patience); None when it brought no answer, or outside fleet mode.
        Kakao's refusal in that answer is raised, as this attempt's.

        Kakao may have rotated already. Released at the timeout, the row went to the next
        node that claimed it, which presented the refresh token Kakao had just retired
        (KOE322, and for the node whose answer then came late a rotation it could not commit
        at once, a false relogin). The hold lasts as long as the request stays open, which
        the transaction's backstop outlasts (fleet/db.py DbTimeouts.idle_for), and so does
        an on-demand refresh's wait for the row (:attr:`request_grace`)."""
        if exc.code != "timeout" or not self.store.shared:
            return None
        return await self._answer_of_open_request(tokens)

    def _linger(
        self, tokens: TokenSet, started: float, call: asyncio.Future[tuple[TokenSet, bool]]
    ) -> None:
        """Keep a request Kakao did not answer in time open for its late answer."""
        self._lingering = (*self._lingering, _Lingering(call, tokens, started))
        call.add_done_callback(self._late_done)

    def _late_done(self, call: asyncio.Future[tuple[TokenSet, bool]]) -> None:
        """A request given up on ended. With tokens that still replace the account's, take
        them at once (through a refresh run, under the account's locks): the next planned
        attempt may be a back-off away, and the process could die before it."""
        entry = next((e for e in self._lingering if e.call is call), None)
        if entry is None:
            return
        if call.cancelled() or call.exception() is not None:
            failure = None if call.cancelled() else call.exception()
            if isinstance(failure, PartialRefresh):
                # A rotation with an unusable access part: its new refresh token is the only
                # live one, so it is kept like any late rotation (the run's attempt takes it
                # from _answer_of_open_request and salvages it).
                self._heard_after(entry.tokens, time.monotonic() - entry.started)
                state = self.state
                if state is None or not same_token_strings(state.tokens, entry.tokens):
                    self._lingering = tuple(e for e in self._lingering if e.call is not call)
                    return
                self._rescue_late_rotation(state, failure.salvaged)
                self._start_keeping_late_answer()
                return
            if isinstance(failure, KakaoError) and failure.status is not None:
                # Kakao's late verdict on these tokens (a KOE322): the next attempt takes it
                # (_answer_of_open_request) instead of asking again.
                self._heard_after(entry.tokens, time.monotonic() - entry.started)
                log.debug("account %s: a refresh given up on was refused late", self.name)
                return
            self._lingering = tuple(e for e in self._lingering if e.call is not call)
            return
        took = time.monotonic() - entry.started
        self._heard_after(entry.tokens, took, call.result()[0])
        state = self.state
        if state is None or not same_token_strings(state.tokens, entry.tokens):
            self._lingering = tuple(e for e in self._lingering if e.call is not call)
            return  # a later request's answer (or a login) came first: this one is old
        log.info(
            "account %s: Kakao answered a refresh given up on %s after it was sent;"
            " keeping its tokens",
            self.name,
            format_duration(took),
        )
        tokens, rotated = call.result()
        if rotated:
            self._rescue_late_rotation(state, tokens)
        self._start_keeping_late_answer()

    def _start_keeping_late_answer(self) -> None:
        run = asyncio.ensure_future(self._keep_late_answer())
        _LATE_RUNS.add(run)
        run.add_done_callback(_LATE_RUNS.discard)

    def _rescue_late_rotation(self, state: AccountState, tokens: TokenSet) -> None:
        """A late answer rotated the refresh token: into the rescue file with it at once.

        It is saved through a refresh run, under the account's locks, which another process
        may hold for a while (a `login`, a command; a fleet node whose hold was lost): until
        then Kakao's only live refresh token would be in memory alone, and a kill -9 would
        lose it. The run that saves it removes the file (:meth:`_persist`)."""
        rescued = state.with_tokens(
            tokens, refreshed_at=self.clock(), rotated=True, keep=self.store.rotations_kept
        )
        self.store.save_rescue(rescued)  # (a failure is logged there)

    async def _keep_late_answer(self) -> AccountState | None:
        """Refresh with the late answer waiting in :attr:`_lingering`, unless a refresh in
        flight takes it first (its KOE322, or its next attempt, looks there)."""
        while (running := self._inflight) is not None:
            if running.done():
                await asyncio.sleep(0)  # its done callback (_clear_inflight) runs first
                continue
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        state = self.state
        if state is None or not self._has_late_answer(state.tokens):
            return state
        return await self.refresh(force=True, reason=LATE_ANSWER)

    def _has_late_answer(self, tokens: TokenSet) -> bool:
        """Whether a request with ``tokens`` given up on brought tokens to keep: an answer,
        or a rotation whose access part was unusable (PartialRefresh)."""
        return any(
            e.call.done()
            and not e.call.cancelled()
            and (e.call.exception() is None or isinstance(e.call.exception(), PartialRefresh))
            and same_token_strings(e.tokens, tokens)
            for e in self._lingering
        )

    def _take_late_answer(self, tokens: TokenSet) -> tuple[TokenSet, bool] | None:
        """The late answer to a request sent with ``tokens``, if one came (once); requests
        that ended otherwise are forgotten."""
        found: tuple[TokenSet, bool] | None = None
        kept: list[_Lingering] = []
        for entry in self._lingering:
            call = entry.call
            if not call.done():
                kept.append(entry)
            elif (
                found is None
                and not call.cancelled()
                and call.exception() is None
                and same_token_strings(entry.tokens, tokens)
            ):
                found = call.result()
        self._lingering = tuple(kept)
        return found

    async def _answer_of_open_request(self, tokens: TokenSet) -> tuple[TokenSet, bool] | None:
        """The answer to a request with ``tokens`` that an earlier attempt gave up on: waited
        for while it is open (up to the longest wait), instead of sending a second request
        beside it — if the first rotated the refresh token, the second would present a
        retired one, which Kakao refuses (KOE322) and an authorization server may take for a
        replay. Kakao's refusal in that answer is this attempt's; None when it brought no
        answer (then a new request goes out)."""
        pending = [
            e.call
            for e in self._lingering
            if not e.call.done() and same_token_strings(e.tokens, tokens)
        ]
        if pending:
            log.debug("account %s: waiting for the answer to the refresh sent before", self.name)
            await asyncio.wait(pending)
        for entry in self._lingering:
            call = entry.call
            if not call.done() or call.cancelled() or not same_token_strings(entry.tokens, tokens):
                continue
            failure = call.exception()
            if isinstance(failure, KakaoError) and failure.status is not None:
                self._lingering = tuple(e for e in self._lingering if e.call is not call)
                raise failure
        return self._take_late_answer(tokens)

    def _in_flight_path(self) -> Path | None:
        """The marker of a token request whose answer is not yet safe: beside the rescue
        file, in the runtime directory (a tmpfs: a crash or kill -9 does not empty it)."""
        return in_flight_path(self.store.rescue_path, self.name)

    def _mark_in_flight(self, flying: bool) -> None:
        """Leave (or remove) the in-flight marker. It is there from the moment a refresh is
        sent until its answer is heard and its tokens are kept (state or rescue file): a
        process that finds it at start knows an attempt may have reached Kakao unheard,
        so a KOE322 then is the lost rotation (relogin.classify), not an unknown cause."""
        path = self._in_flight_path()
        if path is None:
            return
        with contextlib.suppress(OSError, StoreError):  # only an explanation depends on it
            if flying:
                # Its directory may not exist yet: a fleet node's <state_dir>/rescue/ is
                # otherwise made with the first rescue file (the marker went unwritten).
                self.store.ready_rescue_dir()
                # Never through a link, never waiting on a FIFO: refused instead (ELOOP, ENXIO).
                flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                os.close(os.open(path, flags, 0o600))
            else:
                os.unlink(path)

    def _heard_after(self, tokens: TokenSet, took: float, answer: TokenSet | None = None) -> None:
        """Kakao answered a token request sent with ``tokens`` after ``took`` seconds (with
        ``answer``'s tokens, or an error): keep the fewest unanswered requests whose wait
        (tokens.request_timeout) would still have heard it, and ``took`` itself while the
        waits for the next request's token (``answer``, else ``tokens``) would otherwise
        not be twice it (tokens.heard_floor): network delay does not shrink with the life
        Kakao gives a token, and one answer saying a token lives 1 s, from a Kakao taking
        0.2 s, left every later wait (0.0475 s, at most 0.125 s) too short to hear it. An
        answer that shortens the token's life, however quick, counts as taking half the wait
        its request had: the next waits as long as that one could (nothing says the network
        got faster with the life). An account whose Kakao answers within its usual waits
        keeps nothing (no side object)."""
        status = self.status
        app, policy = self.account.app, self.policy
        left = tokens.refresh_remaining(self.clock()).total_seconds()
        level = 0
        while level < status.unanswered:
            wait, _ = app.request_timeouts(policy, tokens.access_lifetime, left, unanswered=level)
            if wait >= took:
                break
            level += 1
        life = (answer or tokens).access_lifetime
        if life < tokens.access_lifetime:
            had, _ = app.request_timeouts(
                policy, tokens.access_lifetime, None, heard=status.heard_in
            )
            took = max(took, had / HEARD_MARGIN)
        floored = (
            app.request_timeouts(policy, life, None, heard=took)
            != app.request_timeouts(policy, life, None)
        ) or app.answer_patience(policy, life, None, heard=took) != app.answer_patience(
            policy, life, None
        )
        status.answered(level, took if floored else None)

    def _emit_call_time(self, started: float, outcome: str) -> None:
        seconds = time.monotonic() - started
        data = {"seconds": seconds, "outcome": outcome}
        self._emit(
            EventKind.REFRESH_CALL, f"{self.name}: refresh call {outcome} in {seconds:.3f}s", data
        )

    def _superseded_elsewhere(
        self, state: AccountState, exc: ReloginRequired, cause: RenderedCause
    ) -> bool:
        """Fleet mode: wait a little before taking a refusal as the end of the grant.

        Kakao refused the refresh token but still accepts the access token issued with it
        (cause UNKNOWN): the grant lives, and someone holds a newer refresh token. In a fleet
        that is, first of all, a node whose database went away while Kakao rotated: its new
        tokens wait in its memory and rescue file until it can commit them, which it does as
        soon as the database answers it. Asking a person to log in meanwhile would be a false
        alarm. So the refusal is a transient failure for the store's ``peer_grace`` from the
        first refusal (as long as the other nodes count a silent node live: three heartbeats,
        fitted to the token), and the committed row, when it comes, is adopted like any other
        node's refresh. Return True while waiting.

        The wait used to end at half the access token's remaining life, so that a login was
        asked for while the token served: for Kakao's 6-hour tokens never sooner than the
        grace, but for a 6-second one after 0.75 s, and a PostgreSQL restart of a second paged
        `relogin`. Once the access token has expired (the outage outlasted it) Kakao cannot
        be asked whether the grant lives: the refusal is "revoked" only for want of evidence,
        and is waited for the same way.

        A refusal after a request of this node's own went unanswered (ROTATED_LOST: its
        rotation may have been lost) is waited for the same way: the row's refresh token is
        the one every node presents, and a peer may have rotated it and not committed yet
        (an outside audit: a critical page with every node healthy, resolved 0.12 s later).
        What that costs a node that really lost its own rotation: its page comes the grace
        later, after one more refused request.
        """
        grace = self.store.peer_grace
        now = self.clock()
        tokens = state.tokens
        expired = tokens.access_expires_at <= now
        unknown = cause.cause in (ReloginCause.UNKNOWN, ReloginCause.ROTATED_LOST) or (
            expired and cause.cause is ReloginCause.REVOKED
        )
        if grace <= 0 or not unknown:
            return False
        fingerprint = tokens.refresh_fingerprint
        if self._superseded is None or self._superseded[0] != fingerprint:
            self._superseded = (fingerprint, now)
        give_up_at = self._superseded[1] + timedelta(seconds=grace)
        if now >= give_up_at:
            return False
        if cause.cause is ReloginCause.ROTATED_LOST:
            why = "a request of this node went unanswered before, but that is not the only"
            why += " explanation"
        elif expired:
            why = "the access token has expired, so Kakao cannot tell whether the grant lives"
        else:
            why = "Kakao still accepts the access token"
        self._record_transient(
            f"{exc}; {why}, so another node may hold newer tokens it has not saved yet:"
            f" waiting for them until {format_local_time(give_up_at)} before asking for a new"
            " login",
            "superseded",
            ambiguous=False,
            delay=(give_up_at - now).total_seconds(),
        )
        return True

    async def _refusal_cause(self, state: AccountState, exc: ReloginRequired) -> RenderedCause:
        """Work out why Kakao refused the refresh token (see relogin.classify)."""
        now = self.clock()
        tokens = state.tokens

        # Kakao may rotate with less than its month left, an absolute rule that holds for a
        # refresh token born shorter too (the fitted window plans our refreshes, not Kakao's):
        # for the cause, the wider of the two says whether a lost answer can explain KOE322.
        possible = max(
            self._rotation_window(tokens), timedelta(seconds=self.policy.rotation_window)
        )

        def decide(access: AccessCheck) -> ReloginCause:
            return classify(
                tokens,
                now,
                ambiguous_before=self._last_failure_ambiguous,
                rotation_window=possible,
                access=access,
            )

        cause = decide(AccessCheck.NOT_ASKED)
        if cause is ReloginCause.REVOKED and tokens.access_expires_at > now:
            # Our clock says the access token still lives: ask Kakao whether it agrees.
            try:
                await self.client.access_token_info(
                    tokens.access_token, lifetime=tokens.access_lifetime
                )
            except ReloginRequired:  # -401 (gone), -101 (unlinked), -103 (dormant)
                cause = decide(AccessCheck.REJECTED)
            except KakaoError:
                pass
            else:
                cause = decide(AccessCheck.VALID)
        return render(
            cause,
            account=self.name,
            login=login_command(self.account),
            code=exc.label,
            fingerprint=tokens.refresh_fingerprint,
            expiry=tokens.refresh_expires_at,
        )

    def _salvage(self, state: AccountState, exc: PartialRefresh) -> AccountState:
        """Kakao rotated but the access part was broken: save the new refresh token first."""
        now = self.clock()
        salvaged = state.with_tokens(
            exc.salvaged, refreshed_at=now, rotated=True, keep=self.store.rotations_kept
        )
        self.state = salvaged
        log.warning(
            "account %s: Kakao rotated the refresh token to %s but the access part of its"
            " answer was unusable (%s); saved the new refresh token, fetching an access token"
            " with it",
            self.name,
            salvaged.tokens.refresh_fingerprint,
            exc,
        )
        if self._persist(salvaged):
            self._mark_in_flight(False)
            self._publish(salvaged)
        self._planned_refresh_at = None
        self.status.rotated()
        # We know the current refresh token: nothing about this attempt is ambiguous.
        self._last_failure_ambiguous = False
        self._emit(
            EventKind.ROTATED,
            f"refresh token of {self.name} rotated to {salvaged.tokens.refresh_fingerprint}",
            {"fingerprint": salvaged.tokens.refresh_fingerprint},
        )
        self._record_transient(str(exc), exc.label, ambiguous=False, exc=exc)
        return salvaged

    def _accept(
        self, state: AccountState, tokens: TokenSet, rotated: bool, *, expect_rotation: bool
    ) -> AccountState:
        """Make the new token set durable first, then publish, then tell everyone."""
        now = self.clock()
        new_state = state.with_tokens(
            tokens, refreshed_at=now, rotated=rotated, keep=self.store.rotations_kept
        )
        # Memory first: from here on the new refresh token is the only one that works.
        self.state = new_state
        if self._persist(new_state):
            self._mark_in_flight(False)  # kept (else it waits in memory and the rescue file)
        self._publish(new_state)
        self._planned_refresh_at = None
        self.status.succeeded(now, rotated=rotated)
        self._retry_due_mono = None
        self._last_failure_ambiguous = False
        next_at = self.planned_refresh_at()
        # Said once committed and published (the log line is what people and tests wait for).
        self._then(
            lambda: log.info(
                "refreshed %s: access token %s expires %s (in %s), refresh token %s expires %s"
                " (in %s%s), rotated=%s, next refresh %s (in %s)",
                self.name,
                tokens.access_fingerprint,
                format_local_time(tokens.access_expires_at),
                format_duration(tokens.access_remaining(now).total_seconds()),
                tokens.refresh_fingerprint,
                format_local_time(tokens.refresh_expires_at),
                format_duration(tokens.refresh_remaining(now).total_seconds()),
                ", estimated" if tokens.refresh_expiry_estimated else "",
                "yes" if rotated else "no",
                format_local_time(next_at) if next_at else "-",
                format_duration((next_at - now).total_seconds()) if next_at else "-",
            )
        )
        data = {"rotated": rotated, "generation": new_state.generation}
        self._emit(EventKind.REFRESHED, f"refreshed {self.name}", data)
        if rotated:
            self._emit(
                EventKind.ROTATED,
                f"refresh token of {self.name} rotated to {tokens.refresh_fingerprint}",
                {"fingerprint": tokens.refresh_fingerprint},
            )
        elif (
            tokens.refresh_expiry_estimated
            and tokens.refresh_expires_at > state.tokens.refresh_expires_at
        ):
            self._rebased(state.tokens, tokens)
        elif expect_rotation:
            self.status.rotation_missed()
            log.warning(
                "account %s: refresh inside the rotation window did not rotate the refresh token"
                " (%s left on %s); Kakao normally issues a new one when less than %s remains",
                self.name,
                format_duration(tokens.refresh_remaining(now).total_seconds()),
                tokens.refresh_fingerprint,
                format_duration(self._rotation_window(tokens).total_seconds()),
            )
            self._emit(EventKind.NO_ROTATION, f"{self.name}: expected rotation did not happen", {})
        return new_state

    def _rebased(self, old: TokenSet, tokens: TokenSet) -> None:
        """A refresh without a rotation moved the refresh expiry later (the merge re-based an
        expiry Kakao's answer proved wrong, TokenSet.merge_refresh): no missed rotation.

        Said once, as a warning, when our clock had the token dead (it was behind when the
        expiry was stamped); an estimate raised again at later refreshes only at debug level.
        """
        self.status.missed_rotation = False  # judged by an expiry that was wrong
        issued = tokens.access_issued_at  # when the refresh was sent
        if old.refresh_expires_at > issued:
            log.debug(
                "account %s: Kakao kept refresh token %s without rotating it: it has at least"
                " %s left, estimated expiry %s",
                self.name,
                tokens.refresh_fingerprint,
                format_duration(tokens.refresh_remaining(issued).total_seconds()),
                format_local_time(tokens.refresh_expires_at),
            )
            return
        why = (
            "that expiry was only an estimate"
            if old.refresh_expiry_estimated
            else "the clock must have been behind when it was stamped and set forward since"
            " (by NTP, on a machine without a real-time clock or before its time sync)"
        )
        log.warning(
            "account %s: Kakao accepted refresh token %s, which by this machine's clock expired"
            " %s ago (%s): %s; its expiry is now estimated as %s (in %s: Kakao did not rotate"
            " it, so at least its rotation window is left)",
            self.name,
            tokens.refresh_fingerprint,
            format_duration((issued - old.refresh_expires_at).total_seconds()),
            format_local_time(old.refresh_expires_at),
            why,
            format_local_time(tokens.refresh_expires_at),
            format_duration(tokens.refresh_remaining(issued).total_seconds()),
        )

    # ------------------------------------------------------------------ persistence

    def _persist(self, state: AccountState) -> bool:
        """Write ``state`` to the store; on failure keep it in the rescue file and retry.

        Callers hold the account (:meth:`_holding`), or own it otherwise (at start).
        """
        try:
            self.store.save(state)
        except StoreWriteError as exc:
            self._keep_unsaved(state, exc)
            return False
        self._disk_signature = self.store.state_signature()
        self.store.restore_reserve()
        self.store.discard_rescue()
        if self.status.saved():
            log.warning(
                "account %s: state saved again after %d tries", self.name, self._write_attempt
            )
            self._emit(EventKind.WRITE_OK, f"{self.name}: state saved again", {})
        self._write_attempt = 0
        self._next_write_at = None
        return True

    def _keep_unsaved(self, state: AccountState, exc: StoreWriteError) -> None:
        """The store did not take ``state``: keep it in memory and the rescue file, retry."""
        # What failed, and its errno: each report adds the fix that follows it.
        first = self.status.write_failed(exc.message, exc.errno)
        rescued = self.store.save_rescue(state)
        self._write_attempt += 1
        self._next_write_at = self.clock() + timedelta(
            seconds=self._retry_delay(self._write_attempt)
        )
        if first:
            log.critical(
                "account %s: cannot save the new tokens (%s); keeping them in memory%s and"
                " retrying — do not stop kakao-tokend until this clears",
                self.name,
                exc,
                f" and in the rescue file {self.store.rescue_path}" if rescued else "",
            )
            self._emit(EventKind.WRITE_FAILED, str(exc), {"rescued": rescued})

    def publish(self, *, token_file: bool = True) -> None:
        """Write the published files from the state in memory (failures are retried).

        ``token_file=False`` writes only the extra token files (``access_token_file``,
        ``env_file``), e.g. at start when the token file is already current.
        """
        account = self.account
        if self.state is None or not (
            token_file
            or self.status.publish_pending
            or account.access_token_file is not None
            or account.env_file is not None
        ):
            return  # nothing to write: a start with a thousand current token files
        self._publish(self.state, token_file=token_file)

    def _publish(self, state: AccountState, *, token_file: bool = True) -> None:
        """Publish ``state`` once it is committed (at once when the account is not held)."""
        self._then(lambda: self._publish_now(state, token_file=token_file))

    def _then(self, action: Callable[[], object]) -> None:
        """Run ``action`` once what is being written is committed: when the hold ends.

        Publishing, events (and so hooks, alerts, templates) come after the commit, so nothing
        uses a token set the store may still refuse (storage.StateStore.hold).
        """
        if self._held:
            self._after_commit = [*self._after_commit, action]
        else:
            action()

    def _publish_now(self, state: AccountState, *, token_file: bool = True) -> bool:
        """Write the token file and the extra token files; mark a failure pending, retry it."""
        problems: list[str] = []
        if token_file or self.status.publish_pending:
            try:
                self.store.publish(state, now=self.clock())
            except StoreError as exc:
                problems.append(f"token file: {exc}")
        problems += self.store.publish_sinks(state)
        if problems:
            error = "; ".join(problems)
            if self.status.publish_failed(error):
                log.error(
                    "account %s: cannot publish the tokens (%s); consumers read an older token"
                    " until this clears — retrying",
                    self.name,
                    error,
                )
                self._emit(EventKind.PUBLISH_FAILED, error, {})
            self._publish_attempt += 1
            delay = min(self.policy.heartbeat, self._retry_delay(self._publish_attempt))
            self._next_publish_at = self.clock() + timedelta(seconds=delay)
            return False
        if self.status.published():
            log.warning(
                "account %s: tokens published again after %d tries",
                self.name,
                self._publish_attempt,
            )
            self._emit(EventKind.PUBLISH_OK, f"{self.name}: tokens published again", {})
        self._publish_attempt = 0
        self._next_publish_at = None
        return True

    async def _retry_pending_write(self) -> None:
        """Retry a pending write holding the account, never over another process's state."""
        if self.state is None:
            return
        async with self._exclusive(), self._holding(self.store, 0.0) as busy:
            if busy is not None:  # another process is writing right now: try again later
                if not isinstance(busy, StoreLocked):
                    log.error(
                        "account %s: cannot take the account lock to save: %s", self.name, busy
                    )
                self._write_attempt += 1
                self._next_write_at = self.clock() + timedelta(
                    seconds=self._retry_delay(self._write_attempt)
                )
                return
            if self.state is None or not self.status.write_pending:
                return  # a refresh that held the account meanwhile has written it
            if self.store.state_signature() != self._disk_signature:
                self._write_conflict()
            elif self._persist(self.state):
                self._publish(self.state)

    def _write_conflict(self) -> None:
        """Our newer state waited to be written, and another process wrote the file meanwhile.

        Never write over it: keep ours in the rescue file, then treat the file like any
        outside change — adopted when it is not older than ours (a new login; ours is kept
        aside as ``.superseded-<stamp>``), refused and set aside when it is (an old backup).
        Either way an alert says what happened. Called with the account lock held.
        """
        ours = self.state
        assert ours is not None
        store = self.store
        store.save_rescue(ours)
        log.critical(
            "account %s: the state file was changed by another process while our newer tokens"
            " (generation %d, refresh token %s) waited to be written; not writing over it",
            self.name,
            ours.generation,
            ours.tokens.refresh_fingerprint,
        )
        try:
            theirs = store.load()
        except StoreError as exc:
            log.error("account %s: cannot read the changed state file: %s", self.name, exc)
            self._write_attempt += 1
            self._next_write_at = self.clock() + timedelta(
                seconds=self._retry_delay(self._write_attempt)
            )
            return
        self._disk_signature = store.state_signature()
        self.status.write_dropped()
        self._write_attempt = 0
        self._next_write_at = None
        why = goes_backwards(theirs, ours) if theirs is not None else None
        if theirs is not None and why is not None:
            self._refuse(theirs, why)
            return
        if theirs is None:
            log.warning("account %s: state file was removed (logout?)", self.name)
            self._adopt(None)
            what = "removed the state file (logout?)"
        else:
            self._take_over(theirs)
            what = "wrote the state file"
        kept = store.set_aside_rescue("superseded")
        self._conflict(
            f"another process {what} while newer tokens (generation {ours.generation}) waited"
            " to be saved; took its version"
            + (f", the unsaved tokens are kept in {kept}" if kept else "")
        )

    def write_again_now(self) -> bool:
        """The store answers again: try a waiting write at the next tick instead of after
        the back-off, so tokens that wait in the rescue file reach the store (and the other
        nodes, which wait for them) at once. Return True when a write waits."""
        if not self.status.write_pending:
            return False
        self._next_write_at = None
        return True

    async def flush(self) -> bool:
        """Try once more to write a pending state (used at shutdown); return True when clean."""
        if self.status.write_pending and self.state is not None:
            await self._retry_pending_write()
        return not self.status.write_pending

    # ------------------------------------------------------------------ failures

    def _record_transient(
        self,
        message: str,
        label: str,
        *,
        ambiguous: bool,
        exc: KakaoError | None = None,
        delay: float | None = None,
    ) -> None:
        """Record a failure that may pass; retry after ``delay`` (default: the back-off)."""
        now = self.clock()
        status = self.status
        self._last_failure_ambiguous = ambiguous or self._last_failure_ambiguous
        state = self.state
        assert state is not None
        tokens = state.tokens
        if delay is None:
            delay = self._retry_delay(status.attempt + 1, exc)
        status.failed_transient(message, label, now=now, retry_at=now + timedelta(seconds=delay))
        assert status.next_attempt_at is not None
        self._retry_due_mono = self.monotonic() + delay
        log.warning(
            "account %s: refresh failed (%s): %s; attempt %d, next try %s (in %s), access token %s",
            self.name,
            label,
            message,
            status.attempt,
            format_local_time(status.next_attempt_at),
            format_duration(delay),
            (
                f"expires in {format_duration(tokens.access_remaining(now).total_seconds())}"
                if tokens.access_expires_at > now
                else "has EXPIRED"
            ),
        )
        self._emit(
            EventKind.RETRYING,
            f"{self.name}: refresh failed ({label}), retrying",
            {"attempt": status.attempt, "error_class": label},
        )

    def _mark_permanent(
        self,
        health: Health,
        exc: KakaoError,
        *,
        cause: RenderedCause | None = None,
    ) -> None:
        self._retry_due_mono = None
        if health is not Health.RELOGIN:
            # The fix may be made in Kakao's console (a client secret switched back, a key or
            # Kakao Login enabled again) and not in our configuration: try again at the
            # ladder's slowest pace, which still leaves an attempt before the refresh token
            # dies (tokens.backoff_delay), rather than wait for a reload that never comes.
            repeated = self.status.health is Health.CONFIG
            now = self.clock()
            delay = self._retry_delay(LONGEST_STEP) if self.state is not None else None
            retry_at = now + timedelta(seconds=delay) if delay is not None else None
            self.status.failed_permanent(health, str(exc), exc.label, now=now, retry_at=retry_at)
            if delay is not None:
                self._retry_due_mono = self.monotonic() + delay
            next_try = f"tried again in {format_duration(delay)}" if delay is not None else ""
            if repeated:  # said and alerted already
                log.warning(
                    "account %s: Kakao still says the configuration is wrong: %s; %s",
                    self.name,
                    exc,
                    next_try,
                )
                return
            log.critical(
                "account %s: Kakao says the configuration is wrong: %s; fix: %s; %s",
                self.name,
                exc,
                full_action(*config_action()).render("en"),
                next_try,
            )
            self._emit(EventKind.CONFIG, str(exc), {"error_class": exc.label})
            return
        login = login_command(self.account)
        if cause is not None:
            reason = f"{cause.reason}; {cause.fix.render('en')}"
            log.critical("%s", cause.log)
        else:
            reason = f"{exc}; run `{login}`"
            log.critical(
                "account %s needs a new login: %s; stopped refreshing it — run `%s`",
                self.name,
                exc,
                login,
            )
        # What happened and its fix, said once (API, status).
        self.status.failed_permanent(
            health,
            reason,
            exc.label,
            now=self.clock(),
            cause=cause.cause if cause is not None else None,
        )
        if self.state is not None:
            self.state = replace(
                self.state,
                relogin_reason=reason,
                relogin_cause=cause.cause.value if cause is not None else None,
            )
            self._persist(self.state)
        self._emit(
            EventKind.RELOGIN,
            reason,
            {"error_class": exc.label, "cause": cause.cause.value if cause else None},
        )

    def clear_config_error(self) -> None:
        """After a reload the configuration may be fixed: try again at the next tick."""
        if self.status.config_reloaded(self.clock()):
            self._retry_due_mono = self.monotonic()

    def _emit(self, kind: EventKind, message: str, data: dict[str, Any]) -> None:
        event = AccountEvent(kind, self.name, message, self.clock(), data)
        self._then(lambda: self._tell(event))

    def _tell(self, event: AccountEvent) -> None:
        kind = event.kind
        for listener in [*(self.hub or ()), *(self._listeners or ())]:
            try:
                listener(event)
            except Exception:  # a broken listener must never break a refresh
                log.exception("event listener failed for %s", kind)

    # ------------------------------------------------------------------ reporting

    def health(
        self,
        now: datetime | None = None,
        *,
        alerts: AlertsConfig | None = None,
        host: str | None = None,
    ) -> AccountHealth:
        """Grade the account now (health.assess: the one grading everything reads)."""
        return assess(
            self.account,
            self.state,
            self.status,
            self.policy,
            now or self.clock(),
            alerts=alerts,
            host=host,
        )

    def summary(self, now: datetime | None = None) -> str:
        """Return a one-line status such as ``default: access 4h12m, refresh 41d``."""
        now = now or self.clock()
        if self.state is None:
            return f"{self.name}: no tokens (login needed)"
        tokens = self.state.tokens
        text = (
            f"{self.name}: access {format_duration(tokens.access_remaining(now).total_seconds())},"
            f" refresh {format_duration(tokens.refresh_remaining(now).total_seconds())}"
        )
        if self.status.health is not Health.OK:
            text += f" [{self.status.health.value}]"
        if self.status.write_pending:
            text += " [NOT SAVED]"
        if self.status.publish_pending:
            text += " [NOT PUBLISHED]"
        return text

    def describe(self, now: datetime | None = None) -> dict[str, Any]:
        """Return this account's status as JSON-ready data (no secrets)."""
        now = now or self.clock()
        state = self.state
        status = self.status
        result: dict[str, Any] = {
            "account": self.name,
            "health": status.health.value,
            "last_error": status.last_error,
            "last_error_class": status.last_error_class,
            "failing_since": format_time(status.failing_since) if status.failing_since else None,
            "attempt": status.attempt,
            "next_attempt_at": (
                format_time(status.next_attempt_at) if status.next_attempt_at else None
            ),
            "write_pending": status.write_pending,
            "write_error": status.write_error,
            "publish_pending": status.publish_pending,
            "publish_error": status.publish_error,
            "state_conflict": status.state_conflict,
            "missed_rotation": status.missed_rotation,
            "counters": dict(status.counters),
        }
        if state is not None:
            tokens = state.tokens
            planned = self.planned_refresh_at()
            result.update(
                generation=state.generation,
                refreshed_at=format_time(state.refreshed_at) if state.refreshed_at else None,
                access_expires_at=format_time(tokens.access_expires_at),
                access_expires_in=int(tokens.access_remaining(now).total_seconds()),
                refresh_expires_at=format_time(tokens.refresh_expires_at),
                refresh_expires_in=int(tokens.refresh_remaining(now).total_seconds()),
                refresh_expiry_estimated=tokens.refresh_expiry_estimated,
                access_fingerprint=tokens.access_fingerprint,
                refresh_fingerprint=tokens.refresh_fingerprint,
                next_refresh_at=format_time(planned) if planned else None,
                # Fleet mode keeps only the newest rotation here: the API reads the log.
                rotations=rotations_shown(state.rotations),
                relogin_reason=state.relogin_reason,
                relogin_cause=state.relogin_cause,
                user_id=state.user_id,
            )
        return result


#: The fields of an AccountManager set only while something happens to the account (a
#: refresh or a change in flight, a write or publish to retry, a retry planned, a refusal
#: another node may explain), with their defaults. They read and assign as attributes
#: (sidefields.add_side_fields); an idle account holds none: 14 slots of each of 10,000.
_BUSY_DEFAULTS: dict[str, object] = {
    "_after_commit": (),
    "_held": False,
    "_inflight": None,
    "_last_failure_ambiguous": False,
    "_lingering": (),
    "_listeners": None,
    "_next_publish_at": None,
    "_next_write_at": None,
    "_publish_attempt": 0,
    "_retry_due_mono": None,
    "_sign_up_tried": None,
    "_single_flight": None,
    "_exclusive_users": 0,
    "_superseded": None,
    "_write_attempt": 0,
}


add_side_fields(AccountManager, "_busy", _BUSY_DEFAULTS)


def _to_the_millisecond(moment: datetime | None) -> str:
    """Return ``moment`` for a debug line about timers (UTC, milliseconds), or "none"."""
    return "none" if moment is None else moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]
