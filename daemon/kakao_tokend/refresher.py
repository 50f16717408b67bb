"""One account's refresh cycle: load, decide, call Kakao, persist, publish, report.

The scheduler, the CLI and the local API all go through :class:`AccountManager`, which makes a
refresh single-flight (concurrent callers share one in-flight task), re-reads the state under
the account's file lock before refreshing (so a token written by `login` is never overwritten
with stale data), and makes a new token set durable before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from .config import AccountConfig, RefreshPolicy
from .errors import (
    KakaoConfigError,
    KakaoError,
    KakaoRequestRejected,
    KakaoUnavailable,
    ReloginRequired,
    StateCorrupt,
    StoreError,
    StoreLocked,
    StoreWriteError,
)
from .kakao import KakaoClient
from .state import AccountState
from .store import AccountStore
from .tokens import (
    Clock,
    TokenSet,
    backoff_delay,
    format_duration,
    format_time,
    in_rotation_window,
    refresh_due_at,
    utcnow,
)

log = logging.getLogger(__name__)

# How long a refresh waits for the account's file lock (held briefly by `login`, `refresh`,
# `import`) before treating the attempt as a transient failure.
FILE_LOCK_WAIT = 5.0
FILE_LOCK_POLL = 0.05
# Retry schedule for a state file that could not be written (disk full, read-only fs).
WRITE_RETRY_INITIAL = 1.0
WRITE_RETRY_MAX = 60.0
#: How far in the future a token's issue time may lie before we decide the clock went back.
CLOCK_STEP_TOLERANCE = timedelta(seconds=2)


class Health(enum.StrEnum):
    """What an account needs, in order of urgency."""

    OK = "ok"
    RETRYING = "retrying"  # transient failures; backing off
    NO_STATE = "no_state"  # never logged in (or logged out)
    RELOGIN = "relogin"  # a person must run `kakao-tokend login`
    CONFIG = "config"  # the configuration must be fixed (then reload)


@dataclass
class AccountStatus:
    """Live, in-memory status of one account (not persisted except via AccountState)."""

    health: Health = Health.NO_STATE
    last_error: str | None = None
    last_error_class: str | None = None
    failing_since: datetime | None = None
    attempt: int = 0
    next_attempt_at: datetime | None = None
    last_success_at: datetime | None = None
    last_attempt_at: datetime | None = None
    #: The state in memory could not be written to disk yet.
    write_pending: bool = False
    write_error: str | None = None
    missed_rotation: bool = False
    counters: dict[str, int] = field(
        default_factory=lambda: {"attempts": 0, "successes": 0, "failures": 0, "rotations": 0}
    )


@dataclass(frozen=True)
class AccountEvent:
    """Something worth telling an operator (logs already did); consumed by alerts and the demo."""

    # refreshed, rotated, retrying, relogin, config, write_failed, write_ok, no_rotation, adopted
    kind: str
    account: str
    message: str
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)


EventListener = Callable[[AccountEvent], None]


def login_command(account: str) -> str:
    """Return the exact command that fixes a dead token set for ``account``."""
    return "kakao-tokend login" + ("" if account == "default" else f" --account {account}")


class AccountManager:
    """Keeps one account's token set fresh; every refresh of that account goes through here."""

    def __init__(
        self,
        account: AccountConfig,
        *,
        store: AccountStore,
        client: KakaoClient,
        policy: RefreshPolicy,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.account = account
        self.store = store
        self.client = client
        self.policy = policy
        self.clock = clock
        self.rng = rng or random.Random()
        self.state: AccountState | None = None
        self.status = AccountStatus()
        self.listeners: list[EventListener] = []
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Task[AccountState | None] | None = None
        self._planned_refresh_at: datetime | None = None
        self._disk_signature: tuple[int, int, int] | None = None
        self._write_attempt = 0
        self._next_write_at: datetime | None = None
        self._last_failure_ambiguous = False

    @property
    def name(self) -> str:
        """Return the account's name."""
        return self.account.name

    @property
    def refreshing(self) -> bool:
        """Return True while a refresh (a call to Kakao and its saving) is in flight."""
        return self._inflight is not None

    @property
    def busy(self) -> bool:
        """Return True while a refresh runs or a new state still waits to be written."""
        return self._inflight is not None or self.status.write_pending

    # ------------------------------------------------------------------ loading and planning

    def load(self) -> AccountState | None:
        """Read the state from disk and set the health accordingly (no network)."""
        try:
            state = self.store.load()
        except StateCorrupt as exc:
            log.critical("account %s: %s", self.name, exc)
            self._set_health(Health.RELOGIN, str(exc), "corrupt_state")
            return None
        self._disk_signature = self.store.state_signature()
        self._adopt(state)
        return state

    def _adopt(self, state: AccountState | None) -> None:
        self.state = state
        self._planned_refresh_at = None
        if state is None:
            self._set_health(
                Health.NO_STATE,
                f"no tokens yet: run `{login_command(self.name)}`",
                "no_state",
            )
        elif state.relogin_reason:
            self._set_health(Health.RELOGIN, state.relogin_reason, "relogin")
        else:
            self.status.health = Health.OK
            self.status.last_error = None
            self.status.last_error_class = None
            self.status.attempt = 0
            self.status.failing_since = None
            self.status.next_attempt_at = None
            self.status.last_success_at = state.refreshed_at

    def notice_outside_changes(self) -> bool:
        """Adopt a state another process wrote (e.g. `login`); return True when it changed.

        A cheap stat per heartbeat; never replaces a newer in-memory state that is still
        waiting to be written.
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
                self._emit("adopted", f"{self.name}: state file removed", {"generation": None})
                return True
            return False
        if self.state is not None and (
            state.tokens.refresh_token == self.state.tokens.refresh_token
            and state.tokens.access_token == self.state.tokens.access_token
        ):
            return False
        log.info(
            "account %s: adopted tokens written by another process (generation %d, refresh %s)",
            self.name,
            state.generation,
            state.tokens.refresh_fingerprint,
        )
        self.status.write_pending = False
        self._adopt(state)
        self._emit("adopted", f"{self.name}: adopted", {"generation": state.generation})
        return True

    def planned_refresh_at(self) -> datetime | None:
        """Return when the next refresh (or retry) should run, or None if nothing is planned."""
        if self.state is None or self.status.health in (Health.RELOGIN, Health.CONFIG):
            return None
        if self.status.health is Health.RETRYING and self.status.next_attempt_at:
            return self.status.next_attempt_at
        if self._planned_refresh_at is None:
            self._planned_refresh_at = refresh_due_at(
                self.state.tokens,
                share=self.policy.refresh_at,
                jitter=self.policy.jitter,
                rng=self.rng,
            )
        return self._planned_refresh_at

    def next_wakeup(self) -> datetime | None:
        """Return the earliest moment this account needs attention (refresh or pending write)."""
        moments = [m for m in (self.planned_refresh_at(), self._next_write_at) if m is not None]
        return min(moments) if moments else None

    def needs_refresh(self, now: datetime) -> bool:
        """Return True when a refresh (or a due retry) should run now.

        Only the planned (jittered) moment counts, so heartbeats never bunch accounts onto
        their ticks. After a suspend or a forward clock jump the plan simply lies in the past.
        A wall clock stepped backwards would push every absolute time away; a token issued
        "in the future" betrays that (kubelet's rule), and then we refresh at once.
        """
        planned = self.planned_refresh_at()
        if planned is None or self.state is None:
            return False
        if now >= planned:
            return True
        return self.state.tokens.access_issued_at - now > CLOCK_STEP_TOLERANCE

    def set_policy(self, policy: RefreshPolicy) -> None:
        """Apply a reloaded refresh policy; the next refresh is planned with it."""
        if policy != self.policy:
            self.policy = policy
            self._planned_refresh_at = None

    # ------------------------------------------------------------------ the periodic check

    async def tick(self) -> None:
        """Do whatever is due now: retry a pending write, pick up outside changes, refresh."""
        now = self.clock()
        if self.status.write_pending and (
            self._next_write_at is None or now >= self._next_write_at
        ):
            self._retry_pending_write()
        if not self.busy:
            self.notice_outside_changes()
        if self.needs_refresh(self.clock()):
            await self.refresh(reason="due")

    async def verify(self) -> None:
        """At start: check the access token with access_token_info, so a revoked one shows now.

        An access token that Kakao no longer accepts gets one refresh; if that is refused too,
        the account is marked for re-login by :meth:`refresh`.
        """
        state = self.state
        if state is None or self.status.health is not Health.OK:
            return
        asked_at = self.clock()
        try:
            info = await self.client.access_token_info(state.tokens.access_token)
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
        if state.user_id != info.user_id:
            state = self.state = replace(state, user_id=info.user_id)
        log.info(
            "account %s: access token verified (user %s, %s left)",
            self.name,
            info.user_id,
            format_duration(info.expires_in),
        )
        self._trust_kakaos_expiry(state, asked_at + timedelta(seconds=info.expires_in))

    def _trust_kakaos_expiry(self, state: AccountState, kakao_expiry: datetime) -> None:
        """Kakao says the access token dies sooner than we computed: believe Kakao.

        Our expiry is our clock plus ``expires_in`` at issue; a stepped clock, a suspended host
        or Kakao's own view can disagree. Refreshing late is the one thing that must not
        happen, so an earlier expiry from access_token_info wins (a later one is ignored).
        """
        tokens = state.tokens
        slack = max(2.0, tokens.access_lifetime.total_seconds() * 0.01)
        if kakao_expiry >= tokens.access_expires_at - timedelta(seconds=slack):
            return
        log.warning(
            "account %s: Kakao says the access token expires %s, %s earlier than computed"
            " (clock skew?); planning by Kakao's time",
            self.name,
            format_time(kakao_expiry),
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
        if self._persist(corrected):
            self._publish(corrected)

    # ------------------------------------------------------------------ refreshing

    async def refresh(self, *, force: bool = False, reason: str = "") -> AccountState | None:
        """Refresh now if still needed (or ``force``); concurrent callers share one refresh.

        The refresh itself runs in a task this manager owns, so a cancelled caller (a scheduler
        shutting down, a client hanging up) never interrupts a refresh half-way: the response
        is always persisted.
        """
        if self._inflight is None:
            self._inflight = asyncio.create_task(
                self._refresh_exclusive(force=force, reason=reason)
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
        """Wait until no refresh is in flight; return False when ``timeout`` ran out first."""
        task = self._inflight
        if task is None:
            return True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        return task.done()

    async def _acquire_file_lock(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FILE_LOCK_WAIT
        while not self.store.try_lock():
            if loop.time() >= deadline:
                raise StoreLocked(
                    f"account {self.name}: another process holds {self.store.lock_path}"
                )
            await asyncio.sleep(FILE_LOCK_POLL)

    async def _refresh_exclusive(self, *, force: bool, reason: str) -> AccountState | None:
        async with self._lock:
            try:
                await self._acquire_file_lock()
            except StoreError as exc:  # busy, or the lock file is unusable (permissions, ...)
                if self.state is not None:
                    label = "lock_busy" if isinstance(exc, StoreLocked) else "lock_error"
                    self._record_transient(str(exc), label, ambiguous=False)
                return self.state
            try:
                # Re-read under the lock: `login` or another tool may have written newer tokens.
                if not self.status.write_pending:
                    self.notice_outside_changes()
                state = self.state
                if state is None:
                    return None
                if self.status.health in (Health.RELOGIN, Health.CONFIG) and not force:
                    return state
                now = self.clock()
                if not force and not self.needs_refresh(now):
                    return state
                return await self._call_kakao(state, reason)
            finally:
                self.store.unlock()

    async def _call_kakao(self, state: AccountState, reason: str) -> AccountState | None:
        now = self.clock()
        window = timedelta(seconds=self.policy.rotation_window)
        expect_rotation = in_rotation_window(state.tokens, now, window=window)
        self.status.last_attempt_at = now
        self.status.counters["attempts"] += 1
        log.debug("account %s: refreshing (%s)", self.name, reason or "requested")
        try:
            tokens, rotated = await self.client.refresh(state.tokens)
        except KakaoUnavailable as exc:
            self._record_transient(str(exc), exc.label, ambiguous=exc.ambiguous, exc=exc)
            return state
        except ReloginRequired as exc:
            if self._last_failure_ambiguous and exc.code == "KOE322":
                # The previous attempt may have reached Kakao, which then rotated the refresh
                # token; its answer never arrived. Nothing can recover that token.
                log.critical(
                    "account %s: the refresh response was lost after Kakao rotated the refresh"
                    " token (%s presented, now rejected as KOE322); a new login is needed: run"
                    " `%s`",
                    self.name,
                    state.tokens.refresh_fingerprint,
                    login_command(self.name),
                )
                self._mark_permanent(Health.RELOGIN, exc, logged=True, lost_response=True)
            else:
                self._mark_permanent(Health.RELOGIN, exc)
            return self.state
        except KakaoConfigError as exc:
            self._mark_permanent(Health.CONFIG, exc)
            return self.state
        except KakaoRequestRejected as exc:
            self._record_transient(str(exc), exc.label, ambiguous=False, exc=exc)
            return state
        return self._accept(state, tokens, rotated, expect_rotation=expect_rotation)

    def _accept(
        self, state: AccountState, tokens: TokenSet, rotated: bool, *, expect_rotation: bool
    ) -> AccountState:
        """Make the new token set durable first, then publish, then tell everyone."""
        now = self.clock()
        new_state = state.with_tokens(tokens, refreshed_at=now, rotated=rotated)
        # Memory first: from here on the new refresh token is the only one that works.
        self.state = new_state
        self._persist(new_state)
        self._publish(new_state)
        self._planned_refresh_at = None
        status = self.status
        status.health = Health.OK
        status.attempt = 0
        status.failing_since = None
        status.next_attempt_at = None
        status.last_error = None
        status.last_error_class = None
        status.last_success_at = now
        status.counters["successes"] += 1
        self._last_failure_ambiguous = False
        if rotated:
            status.counters["rotations"] += 1
            status.missed_rotation = False
        next_at = self.planned_refresh_at()
        log.info(
            "refreshed %s: access token %s expires %s (in %s), refresh token %s expires %s"
            " (in %s%s), rotated=%s, next refresh %s (in %s)",
            self.name,
            tokens.access_fingerprint,
            format_time(tokens.access_expires_at),
            format_duration(tokens.access_remaining(now).total_seconds()),
            tokens.refresh_fingerprint,
            format_time(tokens.refresh_expires_at),
            format_duration(tokens.refresh_remaining(now).total_seconds()),
            ", estimated" if tokens.refresh_expiry_estimated else "",
            "yes" if rotated else "no",
            format_time(next_at) if next_at else "-",
            format_duration((next_at - now).total_seconds()) if next_at else "-",
        )
        data = {"rotated": rotated, "generation": new_state.generation}
        self._emit("refreshed", f"refreshed {self.name}", data)
        if rotated:
            self._emit(
                "rotated",
                f"refresh token of {self.name} rotated to {tokens.refresh_fingerprint}",
                {"fingerprint": tokens.refresh_fingerprint},
            )
        elif expect_rotation:
            status.missed_rotation = True
            log.warning(
                "account %s: refresh inside the rotation window did not rotate the refresh token"
                " (%s left on %s); Kakao normally issues a new one when less than %s remains",
                self.name,
                format_duration(tokens.refresh_remaining(now).total_seconds()),
                tokens.refresh_fingerprint,
                format_duration(self.policy.rotation_window),
            )
            self._emit("no_rotation", f"{self.name}: expected rotation did not happen", {})
        return new_state

    # ------------------------------------------------------------------ persistence

    def _persist(self, state: AccountState) -> bool:
        try:
            self.store.save(state)
        except StoreWriteError as exc:
            first = not self.status.write_pending
            self.status.write_pending = True
            self.status.write_error = str(exc)
            self._write_attempt += 1
            delay = min(WRITE_RETRY_MAX, WRITE_RETRY_INITIAL * 2 ** (self._write_attempt - 1))
            self._next_write_at = self.clock() + timedelta(seconds=delay)
            if first:
                log.critical(
                    "account %s: cannot save the new tokens (%s); keeping them in memory and"
                    " retrying every %s at most — do not stop kakao-tokend until this clears",
                    self.name,
                    exc,
                    format_duration(WRITE_RETRY_MAX),
                )
                self._emit("write_failed", str(exc), {})
            return False
        self._disk_signature = self.store.state_signature()
        self.store.restore_reserve()
        if self.status.write_pending:
            log.warning(
                "account %s: state saved again after %d tries", self.name, self._write_attempt
            )
            self._emit("write_ok", f"{self.name}: state saved again", {})
        self.status.write_pending = False
        self.status.write_error = None
        self._write_attempt = 0
        self._next_write_at = None
        return True

    def publish(self) -> None:
        """Write the token file from the state in memory (errors are logged, not raised)."""
        if self.state is not None:
            self._publish(self.state)

    def _publish(self, state: AccountState) -> None:
        try:
            self.store.publish(state, now=self.clock())
        except StoreError as exc:
            log.error("account %s: cannot publish the token file: %s", self.name, exc)

    def _retry_pending_write(self) -> None:
        if self.state is None:
            return
        if self._persist(self.state):
            self._publish(self.state)

    def flush(self) -> bool:
        """Try once more to write a pending state (used at shutdown); return True when clean."""
        if self.status.write_pending and self.state is not None:
            self._retry_pending_write()
        return not self.status.write_pending

    # ------------------------------------------------------------------ failures

    def _record_transient(
        self,
        message: str,
        label: str,
        *,
        ambiguous: bool,
        exc: KakaoError | None = None,
    ) -> None:
        now = self.clock()
        status = self.status
        status.counters["failures"] += 1
        status.attempt += 1
        status.failing_since = status.failing_since or now
        status.last_error = message
        status.last_error_class = label
        status.health = Health.RETRYING
        self._last_failure_ambiguous = ambiguous or self._last_failure_ambiguous
        state = self.state
        assert state is not None
        tokens = state.tokens
        delay = backoff_delay(
            status.attempt,
            now=now,
            expires_at=tokens.access_expires_at,
            lifetime=tokens.access_lifetime,
            initial=self.policy.retry_initial,
            cap=self.policy.retry_max,
            rng=self.rng,
        )
        if isinstance(exc, KakaoUnavailable) and exc.retry_after:
            # Kakao asked for a pause (KOE237 rate limit, 429): honour it, within the cap.
            delay = max(delay, min(exc.retry_after, self.policy.retry_max))
        status.next_attempt_at = now + timedelta(seconds=delay)
        log.warning(
            "account %s: refresh failed (%s): %s; attempt %d, next try %s (in %s), access token %s",
            self.name,
            label,
            message,
            status.attempt,
            format_time(status.next_attempt_at),
            format_duration(delay),
            (
                f"expires in {format_duration(tokens.access_remaining(now).total_seconds())}"
                if tokens.access_expires_at > now
                else "has EXPIRED"
            ),
        )
        self._emit(
            "retrying",
            f"{self.name}: refresh failed ({label}), retrying",
            {"attempt": status.attempt, "error_class": label},
        )

    def _mark_permanent(
        self,
        health: Health,
        exc: KakaoError,
        *,
        logged: bool = False,
        lost_response: bool = False,
    ) -> None:
        now = self.clock()
        status = self.status
        status.counters["failures"] += 1
        status.health = health
        status.last_error = str(exc)
        status.last_error_class = exc.label
        status.failing_since = status.failing_since or now
        status.next_attempt_at = None
        if health is Health.RELOGIN:
            reason = (
                "refresh response lost after rotation" if lost_response else str(exc)
            ) + f"; run `{login_command(self.name)}`"
            if not logged:
                log.critical(
                    "account %s needs a new login: %s; stopped refreshing it — run `%s`",
                    self.name,
                    exc,
                    login_command(self.name),
                )
            if self.state is not None:
                self.state = replace(self.state, relogin_reason=reason)
                self._persist(self.state)
            self._emit("relogin", reason, {"error_class": exc.label})
        else:
            log.critical(
                "account %s: Kakao says the configuration is wrong: %s; stopped refreshing it —"
                " fix the config, then `systemctl reload kakao-tokend` (or send SIGHUP)",
                self.name,
                exc,
            )
            self._emit("config", str(exc), {"error_class": exc.label})

    def clear_config_error(self) -> None:
        """After a reload the configuration may be fixed: try again at the next tick."""
        if self.status.health is Health.CONFIG:
            self.status.health = Health.RETRYING
            self.status.attempt = 0
            self.status.next_attempt_at = self.clock()

    def _set_health(self, health: Health, message: str, label: str) -> None:
        self.status.health = health
        self.status.last_error = message
        self.status.last_error_class = label

    def _emit(self, kind: str, message: str, data: dict[str, Any]) -> None:
        event = AccountEvent(kind, self.name, message, self.clock(), data)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must never break a refresh
                log.exception("event listener failed for %s", kind)

    # ------------------------------------------------------------------ reporting

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
                rotations=[
                    {"at": format_time(r.at), "fingerprint": r.fingerprint} for r in state.rotations
                ],
                relogin_reason=state.relogin_reason,
                user_id=state.user_id,
            )
        return result
