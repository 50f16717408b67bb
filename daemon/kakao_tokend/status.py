"""An account's live status: its health, the named transitions between them, and the events.

:class:`AccountStatus` is what the daemon knows about an account beyond its stored state:
whether refreshing works, what failed, what still waits to be written or published. It
changes only through its named transitions (``succeeded``, ``failed_transient``,
``failed_permanent``, ``adopted`` ...), each of which sets every field it concerns, so no
caller leaves a half-updated status behind. :class:`AccountEvent` is what the account manager
tells its listeners (alerts, hooks, templates, metrics, the scheduler, the demo); its kind is
an :class:`EventKind`. Nothing here does I/O: :mod:`~kakao_tokend.health` grades the result.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .relogin import ReloginCause, parse_cause
from .sidefields import add_side_fields
from .state import AccountState

__all__ = [
    "AccountEvent",
    "AccountStatus",
    "EventKind",
    "EventListener",
    "Health",
    "active_alerts",
]


class Health(enum.StrEnum):
    """What an account needs, in order of urgency."""

    OK = "ok"
    RETRYING = "retrying"  # transient failures; backing off
    NO_STATE = "no_state"  # never logged in (or logged out)
    RELOGIN = "relogin"  # a person must log in again
    CONFIG = "config"  # the configuration must be fixed (then reload)


#: Health states in which nothing refreshes until a person acts (a login, a fixed config).
STOPPED = frozenset({Health.RELOGIN, Health.CONFIG, Health.NO_STATE})
#: Health states in which the account holds no tokens Kakao accepts.
WITHOUT_TOKENS = frozenset({Health.RELOGIN, Health.NO_STATE})


class EventKind(enum.StrEnum):
    """What happened to an account (the value is what logs and tests see)."""

    #: A refresh succeeded (data: ``rotated``, ``generation``).
    REFRESHED = "refreshed"
    #: Kakao issued a new refresh token (data: ``fingerprint``).
    ROTATED = "rotated"
    #: Tokens another process wrote (login, import, refresh, logout) were taken over
    #: (data: ``generation``, None after a logout).
    ADOPTED = "adopted"
    #: A refresh failed for a reason that may pass (data: ``attempt``, ``error_class``).
    RETRYING = "retrying"
    #: A person must log in again (data: ``error_class``, ``cause``).
    RELOGIN = "relogin"
    #: Kakao says the app's configuration is wrong (data: ``error_class``).
    CONFIG = "config"
    #: The new state could not be written (data: ``rescued``), and later could again.
    WRITE_FAILED = "write_failed"
    WRITE_OK = "write_ok"
    #: The published token files could not be written, and later could again.
    PUBLISH_FAILED = "publish_failed"
    PUBLISH_OK = "publish_ok"
    #: Another process wrote a state file we did not take as it was.
    CONFLICT = "conflict"
    #: A refresh inside the rotation window did not rotate the refresh token.
    NO_ROTATION = "no_rotation"
    #: How long Kakao took to answer a refresh (data: ``seconds``, ``outcome``), for /metrics.
    REFRESH_CALL = "refresh_call"


#: Events that are refresh failures; their ``error_class`` names the class (/metrics).
FAILURES = frozenset({EventKind.RETRYING, EventKind.RELOGIN, EventKind.CONFIG})
#: Events after which the account holds a different token set (hooks, templates).
NEW_TOKENS = frozenset({EventKind.REFRESHED, EventKind.ADOPTED})


@dataclass(frozen=True)
class AccountEvent:
    """Something worth telling an operator (logs already did)."""

    kind: EventKind
    account: str
    message: str
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)


EventListener = Callable[[AccountEvent], None]


#: The counters of an account that has not been tried since the daemon started: one shared,
#: read-only copy (a node serves thousands of accounts that other nodes refresh).
NO_COUNTS: Mapping[str, int] = MappingProxyType(
    {"attempts": 0, "successes": 0, "failures": 0, "rotations": 0}
)


class _Trouble:
    """The fields of an :class:`AccountStatus` that are set only while something is wrong
    (or was: a failure counted, a conflict reported), with their defaults. A healthy
    account's status holds none of them (sidefields.add_side_fields, below the class)."""

    if not TYPE_CHECKING:  # mypy would refuse assigning them: they are properties below
        __slots__ = ()  # the values live in the side object, these are only the defaults

    last_error: str | None = None
    last_error_class: str | None = None
    failing_since: datetime | None = None
    next_attempt_at: datetime | None = None
    #: The state in memory could not be written to the store yet.
    write_pending: bool = False
    write_error: str | None = None
    #: The OS error number of the failed write (errno.EROFS ...), when known: the alert's fix
    #: follows it (errors.write_fix).
    write_errno: int | None = None
    #: The token file or an extra token file could not be written yet (retried).
    publish_pending: bool = False
    publish_error: str | None = None
    #: Why a re-login is needed (with health RELOGIN after a refused refresh token).
    relogin_cause: ReloginCause | None = None
    #: Another process wrote a state file we did not take as it was (refused or superseded).
    state_conflict: str | None = None
    #: The refused state file, kept aside: what `kakao-tokend restore FILE` takes back.
    conflict_file: str | None = None
    missed_rotation: bool = False
    #: Fleet mode: since when this node cannot reach the shared PostgreSQL store (None: it can).
    store_unavailable_since: datetime | None = None
    store_error: str | None = None
    #: Token requests in a row that Kakao did not answer in time: the next one waits longer
    #: (tokens.request_timeout), and health waits as long for it before it pages.
    unanswered: int = 0
    #: How long (s) Kakao took to answer the latest token request, kept only while it makes
    #: the next wait longer than the token's life alone would (a 0.2 s answer, a 1 s token):
    #: the waits are at least twice it (tokens.heard_floor, refresher._heard_after).
    heard_in: float | None = None


@dataclass(slots=True)  # one per account (10,000 on a fleet node): no instance dictionary
class AccountStatus(_Trouble):
    """Live, in-memory status of one account (the stored part is in AccountState).

    The fields of :class:`_Trouble`, which only a failure sets, live in one side object made
    at the first of them and dropped when all are back at their defaults: a healthy
    account's status is five slots, not eighteen (a fleet node holds 10,000). They read and
    assign as fields.
    """

    health: Health = Health.NO_STATE
    attempt: int = 0
    last_success_at: datetime | None = None
    #: attempts, successes, failures, rotations since the daemon started (/metrics).
    counters: Mapping[str, int] = field(default_factory=lambda: NO_COUNTS)
    _trouble: object | None = None

    def _count(self, key: str) -> None:
        counters = self.counters
        if not isinstance(counters, dict):
            counters = self.counters = dict(counters)
        counters[key] += 1

    # ------------------------------------------------------------------ which tokens

    def adopted(self, state: AccountState | None) -> None:
        """The account now holds ``state`` (read at start, or written by another process)."""
        self.state_conflict = None
        self.conflict_file = None
        if state is None:
            self.relogin_cause = None
            self._stopped(Health.NO_STATE, "no tokens yet", "no_state")
        elif state.relogin_reason:
            self.relogin_cause = parse_cause(state.relogin_cause)
            self._stopped(Health.RELOGIN, state.relogin_reason, "relogin")
        else:
            self.relogin_cause = None
            self._healthy()
            self.last_success_at = state.refreshed_at

    def unreadable(self, message: str) -> None:
        """The stored state cannot be read (it was moved aside): only a new login helps."""
        self._stopped(Health.RELOGIN, message, "corrupt_state")

    # ------------------------------------------------------------------ refresh attempts

    def attempted(self) -> None:
        """A refresh call to Kakao starts."""
        self._count("attempts")

    def went_unanswered(self) -> None:
        """A token request ended without Kakao's answer in time (a timeout)."""
        self.unanswered += 1

    def answered(self, needed: int = 0, heard_in: float | None = None) -> None:
        """Kakao answered a token request (with tokens or an error) in the time that
        ``needed`` unanswered requests give (refresher._heard_after): the next one waits as
        long, the usual time when 0; and at least twice ``heard_in`` (None: the usual)."""
        self.unanswered = needed
        self.heard_in = heard_in

    def succeeded(self, now: datetime, *, rotated: bool) -> None:
        """Kakao answered a refresh with new tokens, and they are the account's now."""
        self._count("successes")
        self._healthy()
        self.last_success_at = now
        self.relogin_cause = None
        self.state_conflict = None
        self.conflict_file = None
        if rotated:
            self.rotated()

    def rotated(self) -> None:
        """Kakao issued a new refresh token (also when the rest of its answer was broken)."""
        self._count("rotations")
        self.missed_rotation = False

    def rotation_missed(self) -> None:
        """A refresh inside the rotation window did not rotate the refresh token."""
        self.missed_rotation = True

    def failed_transient(
        self, message: str, label: str, *, now: datetime, retry_at: datetime
    ) -> None:
        """A refresh failed for a reason that may pass; the next try is at ``retry_at``."""
        self._count("failures")
        self.attempt += 1
        self.failing_since = self.failing_since or now
        self.last_error = message
        self.last_error_class = label
        self.health = Health.RETRYING
        self.next_attempt_at = retry_at

    def failed_permanent(
        self,
        health: Health,
        message: str,
        label: str,
        *,
        now: datetime,
        cause: ReloginCause | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        """Refreshing cannot work until a person acts: a new login, or a fixed config
        (``retry_at``: when a configuration is tried again, in case it was fixed at Kakao)."""
        self._count("failures")
        self.health = health
        self.last_error = message
        self.last_error_class = label
        self.failing_since = self.failing_since or now
        self.next_attempt_at = retry_at
        if health is Health.RELOGIN:
            self.relogin_cause = cause

    def config_reloaded(self, now: datetime) -> bool:
        """A reload may have fixed the configuration: retry at once; True when it was broken."""
        if self.health is not Health.CONFIG:
            return False
        self.health = Health.RETRYING
        self.attempt = 0
        self.next_attempt_at = now
        return True

    # ------------------------------------------------------------------ writing, publishing

    def write_failed(self, error: str, error_number: int | None = None) -> bool:
        """The state could not be written (it stays in memory), with the OS error ``error_number``
        when known; True for the first failure."""
        first = not self.write_pending
        self.write_pending = True
        self.write_error = error
        self.write_errno = error_number
        return first

    def write_waiting(self) -> None:
        """A state waits to be written that no write has refused yet (a fleet node's tokens
        recovered from its rescue file wait for the row lock): pending, with no error."""
        self.write_pending = True
        self.write_error = None
        self.write_errno = None

    def saved(self) -> bool:
        """The state was written; True when a failed write was pending until now."""
        was_pending = self.write_pending
        self.write_pending = False
        self.write_error = None
        self.write_errno = None
        return was_pending

    def write_dropped(self) -> None:
        """A pending write is moot: another process's state was taken (or ours set aside)."""
        self.write_pending = False
        self.write_error = None
        self.write_errno = None

    def publish_failed(self, error: str) -> bool:
        """The token files could not be written; True for the first failure."""
        first = not self.publish_pending
        self.publish_pending = True
        self.publish_error = error
        return first

    def published(self) -> bool:
        """The token files were written; True when a failed publish was pending until now."""
        was_pending = self.publish_pending
        self.publish_pending = False
        self.publish_error = None
        return was_pending

    def conflicted(self, message: str, *, refused_file: str | None = None) -> None:
        """Another process wrote a state we did not take as it was (see the message);
        ``refused_file``: where the refused state file was kept (a `restore` takes it back)."""
        self.state_conflict = message
        self.conflict_file = refused_file

    # ------------------------------------------------------------------ helpers

    def _healthy(self) -> None:
        self.health = Health.OK
        self.last_error = None
        self.last_error_class = None
        self.attempt = 0
        self.failing_since = None
        self.next_attempt_at = None

    def _stopped(self, health: Health, message: str, label: str) -> None:
        self.health = health
        self.last_error = message
        self.last_error_class = label


add_side_fields(
    AccountStatus, "_trouble", {name: getattr(_Trouble, name) for name in _Trouble.__annotations__}
)


def active_alerts(active: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Turn saved alert bookkeeping (its "active" mapping) into a list for status output.

    Here, not in :mod:`~kakao_tokend.alerts`: `status` reads the bookkeeping without the
    alert machinery (and the aiohttp it brings).
    """
    result = []
    for name, record in active.items():
        if not isinstance(record, dict):
            continue
        result.append(
            {
                "condition": name,
                "severity": record.get("severity"),
                "message": record.get("message"),
                "action": record.get("action"),
                "since": record.get("since"),
                "last_sent_at": record.get("last_sent_at"),
            }
        )
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(result, key=lambda item: order.get(str(item["severity"]), 3))
