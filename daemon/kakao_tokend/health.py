"""An account's health, graded once: its conditions, each with a severity, a message and a fix.

:func:`assess` is pure. It takes what is known about one account — its configuration and
alert settings, its stored state, the daemon's live status of it (None when no daemon looks
after it: `status` and `doctor` reading the files), the refresh policy and the time — and
returns :class:`AccountHealth`: the conditions a person must know about, whether consumers get
a valid and current token, and whether a consumer's request may make Kakao refresh now.

Beside the grading, :attr:`AccountHealth.changes_at` says when the same inputs could first
grade differently (a threshold of the expiry ladder, ``failing_after``, the access token's
expiry ...): the alerts grade an account again only then or when something about it changes,
instead of every account at every heartbeat.

Everything that grades an account reads this one result: `status` (from the daemon and from
the files) and `doctor`, ``/healthz``, ``/v1/status``, the token endpoint's and the proxy's
refusals, the alerts and the metrics. So they cannot disagree. The texts are i18n messages:
alerts send them in the account's language, everything else shows English. Each fix names
the exact command, built by :func:`~kakao_tokend.relogin.login_command` and its sibling
:func:`~kakao_tokend.relogin.cli_command` with the options this account needs.
"""

from __future__ import annotations

import enum
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from . import exitcodes
from .config import AccountConfig, AlertsConfig, RefreshPolicy
from .errors import DATABASE_FIX, KAKAO_CONFIG_CODES, StoreError, write_fix
from .i18n import N_, Duration, Message
from .relogin import RenderedCause, cli_command, login_command, parse_cause, render
from .state import AccountState
from .status import STOPPED, AccountStatus, Health
from .supervisor import Supervisor
from .supervisor import current as current_supervisor
from .tokens import (
    TokenSet,
    expiring_margin,
    format_local_time,
    format_time,
    kakao_scale,
)

__all__ = [
    "CONDITION_NAMES",
    "FROM_FILES",
    "NODE_LOCAL",
    "AccountHealth",
    "Condition",
    "Severity",
    "assess",
    "condition_name",
    "first_moment",
    "fitted_alerts",
    "full_action",
    "login_fix",
    "login_hint",
    "moved_thresholds",
    "printable",
    "still_active",
]

#: Error labels (``KOE322``, ``http503`` ...) are cut to this many characters in the texts,
#: so that a KakaoTalk memo always has room for the condition and the command.
REASON_LIMIT = 20


def network_fix(supervisor: Supervisor) -> tuple[Message, Message]:
    """The fix and hint while refreshing fails for a reason that is not ours to fix."""
    return N_("check that this host reaches Kakao"), details(supervisor)


def peers_fix(supervisor: Supervisor) -> tuple[Message, Message]:
    """The fix and hint while a fleet node waits out Kakao's refusal because another node may
    hold newer tokens it has not saved yet (refresher._superseded_elsewhere)."""
    return N_("check the other nodes and the database"), details(supervisor)


def database_fix(supervisor: Supervisor) -> tuple[Message, Message]:
    """The fix and hint when a fleet node cannot take the account's row lock (its database
    does not answer)."""
    return DATABASE_FIX, details(supervisor)


def files_fix(supervisor: Supervisor) -> tuple[Message, Message]:
    """The fix and hint when the account's lock file is what fails (health._failing)."""
    return (
        N_("check the account's files and directory (free space, read-only, owner, permissions)"),
        details(supervisor),
    )


def details(supervisor: Supervisor) -> Message:
    """Return the pointer to the daemon's log: "details: `journalctl -u kakao-tokend`" ..."""
    return N_("details: {log}", log=supervisor.log)


#: The conditions that the stored state alone decides (status without a daemon can judge
#: them); every other one needs the daemon's live status (writes, publishing, refreshing).
FROM_FILES = frozenset(
    {"relogin", "no_tokens", "state_unreadable", "refresh_expiry", "access_expired"}
)
#: Fleet mode: the conditions about the node that finds them, not about the account — each
#: node alerts them itself, with its own bookkeeping on its own disk. ``store_unavailable``:
#: this node cannot reach the database (so it could not record them there either);
#: ``write_failed``: a rotated token only this node holds (memory, its rescue file) is not
#: committed yet; ``publish_failed``: this node's token files; ``config``: Kakao refuses this
#: node's app settings or secrets (each node has its own config); ``state_conflict``: a local
#: state file. Every other condition is the account's: its first claimant alerts it once for
#: the fleet, with the bookkeeping in the store (docs/fleet.md, "Alerts in a fleet").
NODE_LOCAL = frozenset(
    {"store_unavailable", "write_failed", "publish_failed", "config", "state_conflict"}
)


#: The conditions that take another's place when things get worse: the refresh token that was
#: not renewed expires (``refresh_expiry`` reaches its "expired" rung at the moment
#: ``missed_rotation`` stops holding); Kakao refuses the token (``relogin``) or the app
#: (``config``) that refreshing kept failing for, and the refresher stops retrying. A condition
#: that ends in the grading where one that replaces it fires (anew or escalated) was not fixed:
#: the worse one says it now, so no resolution is announced for it (alerts).
REPLACED_BY: Mapping[str, frozenset[str]] = {
    "missed_rotation": frozenset({"refresh_expiry"}),
    "refresh_failing": frozenset({"relogin", "config"}),
    "access_expiring": frozenset({"relogin", "config"}),
}


#: Each condition's name in words, for a text that names one (a resolution): the raw key
#: (``relogin``) stays in the structured fields, the logs and the bookkeeping.
CONDITION_NAMES: Mapping[str, Message] = {
    "relogin": N_("re-login needed"),
    "config": N_("app configuration rejected"),
    "no_tokens": N_("no tokens"),
    "state_unreadable": N_("state file unreadable"),
    "refresh_expiry": N_("refresh token expiry"),
    "access_expired": N_("access token expired"),
    "access_expiring": N_("access token expiring"),
    "refresh_failing": N_("refreshing failing"),
    "write_failed": N_("tokens not saved"),
    "publish_failed": N_("token files not written"),
    "state_conflict": N_("state changed by another program"),
    "missed_rotation": N_("refresh token not renewed"),
    "store_unavailable": N_("shared store unreachable"),
}


def condition_name(name: str) -> Message:
    """Return the condition ``name`` in words (its key itself when it has none: a condition
    of a newer version read from its bookkeeping)."""
    return CONDITION_NAMES.get(name) or Message.verbatim(name)


class Severity(enum.IntEnum):
    """How urgent a condition is; the value is the matching logging level."""

    INFO = logging.INFO
    WARNING = logging.WARNING
    CRITICAL = logging.CRITICAL

    @property
    def label(self) -> str:
        """Return "info", "warning" or "critical"."""
        return self.name.lower()

    @property
    def title(self) -> Message:
        """Return the word that opens an alert's text ("CRITICAL", "긴급" ...)."""
        return _SEVERITY_TITLES[self]

    @classmethod
    def parse(cls, text: str) -> Severity:
        """Return the severity named ``text`` ("info", "warning", "critical")."""
        return cls[text.upper()]


_SEVERITY_TITLES = {
    Severity.INFO: N_("INFO"),
    Severity.WARNING: N_("WARNING"),
    Severity.CRITICAL: N_("CRITICAL"),
}


def full_action(fix: Message, hint: Message | None) -> Message:
    """Return the whole fix: the fix itself, then the hint in parentheses."""
    return fix if hint is None else N_("{fix} ({hint})", fix=fix, hint=hint)


@dataclass(frozen=True)
class Condition:
    """Something that is wrong with an account right now, and what fixes it.

    A KakaoTalk memo always carries ``brief`` (default: ``message``) and ``fix`` whole: keep
    both within the memo's budget (alerts.MEMO_PATH_BUDGET says it), with one exact command
    in ``fix`` (and in ``command``, for `doctor`).
    ``hint`` and the long ``message`` go where there is room; the log, the webhook, the
    command and `status` always get everything.
    """

    name: str
    severity: Severity
    message: Message
    fix: Message
    #: For the expiry ladder: the threshold crossed (seconds; 0 = expired). More severe = lower.
    stage: float | None = None
    brief: Message | None = None
    hint: Message | None = None
    #: The exact command the fix runs, when it is one command.
    command: str | None = None

    @property
    def action(self) -> Message:
        """Return the whole fix (``fix`` plus ``hint``)."""
        return full_action(self.fix, self.hint)

    def to_json(self) -> dict[str, Any]:
        """Return the condition for /v1/status and `status --json` (English texts)."""
        return {
            "condition": self.name,
            "severity": self.severity.label,
            "message": self.message.render("en"),
            "fix": self.action.render("en"),
            "command": self.command,
        }


_LEVELS: Mapping[Severity | None, int] = {
    None: exitcodes.OK,
    Severity.INFO: exitcodes.OK,
    Severity.WARNING: exitcodes.WARNING,
    Severity.CRITICAL: exitcodes.CRITICAL,
}
_LEVEL_NAMES: Mapping[int, str] = {
    exitcodes.OK: "ok",
    exitcodes.WARNING: "warning",
    exitcodes.CRITICAL: "critical",
}


@dataclass(frozen=True)
class AccountHealth:
    """One account, graded: what a person must know, and what consumers get."""

    account: str
    conditions: tuple[Condition, ...]
    #: Why consumers do not get a valid, current token right now (None: they do) — /healthz.
    serving_problem: str | None
    #: Why a consumer's request must not make Kakao refresh now (None: it may) — the token
    #: endpoint and the proxy. An explicit POST .../refresh still forces one.
    refresh_blocked: str | None
    #: The first moment after the grading's ``now`` at which the same inputs (state, status,
    #: settings) could grade differently: a condition appears or goes, or its severity or
    #: stage changes, or serving / refresh_blocked flips (the texts' durations change all
    #: the time and do not count). None: only a change of the inputs can change it.
    changes_at: datetime | None = None

    @property
    def severity(self) -> Severity | None:
        """Return the most urgent condition's severity (None when there is none)."""
        return max((c.severity for c in self.conditions), default=None)

    @property
    def level(self) -> int:
        """Return the exit code of `status`: 0 ok, 1 warning, 2 critical."""
        return _LEVELS[self.severity]

    @property
    def label(self) -> str:
        """Return "ok", "warning" or "critical"."""
        return _LEVEL_NAMES[self.level]

    def names(self) -> list[str]:
        """Return the conditions' names, most urgent first."""
        return [c.name for c in self.ordered()]

    def ordered(self) -> list[Condition]:
        """Return the conditions, most urgent first (stable otherwise)."""
        return sorted(self.conditions, key=lambda c: -c.severity)

    def to_json(self) -> dict[str, Any]:
        """Return the grading for /v1/status and `status --json`."""
        return {
            "level": self.label,
            "conditions": [c.to_json() for c in self.ordered()],
            "serving": self.serving_problem is None,
            "serving_problem": self.serving_problem,
        }


# --------------------------------------------------------------------------- texts


def printable(text: str) -> str:
    """Replace line breaks and other control characters, which would break a memo's lines."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _reason(label: str | None, default: str) -> str:
    """Return an error label for a text, cut to REASON_LIMIT characters."""
    text = printable(label or default)
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 1] + "…"


def login_fix(account: AccountConfig) -> Message:
    """Return the fix for dead tokens: the exact login command."""
    return N_("run `{command}`", command=login_command(account))


def config_action(supervisor: Supervisor | None = None) -> tuple[Message, Message]:
    """The fix and hint for an app configuration Kakao rejects (alert and log line alike),
    for the daemon ``supervisor`` runs (default: this process's)."""
    # Secrets given as systemd credentials are read at start: restart, not reload. A fix in
    # Kakao's console needs nothing from us: the refresher keeps trying at its slowest pace.
    who = supervisor or current_supervisor()
    return (
        N_("fix [kakao] or the secrets, then {restart}", restart=who.restart),
        N_(
            "a fix in Kakao's console is picked up by itself; details: {log}",
            log=who.log,
        ),
    )


def login_hint(account: AccountConfig, host: str | None = None) -> Message:
    """Return the ssh port-forward hint for logging in on a remote server."""
    port = urlsplit(account.app.redirect_uri).port or 80
    return N_(
        "on a remote server, log in through `ssh -L {port}:127.0.0.1:{port} {host}`",
        port=port,
        host=host or socket.gethostname(),
    )


def relogin_texts(
    account: AccountConfig, state: AccountState | None, status: AccountStatus | None
) -> RenderedCause | None:
    """Return the texts of the known re-login cause (expired, lost rotation, revoked ...)."""
    if status is not None:
        cause = status.relogin_cause if status.health is Health.RELOGIN else None
        label = status.last_error_class
    else:
        cause = parse_cause(state.relogin_cause) if state is not None else None
        label = None
    if cause is None:
        return None
    tokens = state.tokens if state is not None else None
    return render(
        cause,
        account=account.name,
        login=login_command(account),
        code=_reason(label, "KOE322") if label not in (None, "relogin") else "KOE322",
        fingerprint=tokens.refresh_fingerprint if tokens else "-",
        expiry=tokens.refresh_expires_at if tokens else None,
    )


# --------------------------------------------------------------------------- grading


def assess(
    account: AccountConfig,
    state: AccountState | None,
    status: AccountStatus | None,
    policy: RefreshPolicy,
    now: datetime,
    *,
    alerts: AlertsConfig | None = None,
    host: str | None = None,
    load_error: StoreError | None = None,
    supervisor: Supervisor | None = None,
) -> AccountHealth:
    """Grade one account at ``now`` (pure: no I/O).

    ``status`` is the daemon's live status, or None when no daemon looks after the account
    (the files alone); ``load_error`` is why the stored state could not be read then.
    ``alerts`` overrides the account's alert settings (`status --warn/--crit`); ``host``
    names this machine in the ssh hint; ``supervisor`` runs the daemon whose log and
    restart the fixes name (default: this process's, supervisor.current()).
    """
    settings = alerts or fitted_alerts(account.alerts, state)
    who = supervisor or current_supervisor()
    found = _conditions(account, state, status, policy, now, settings, host, load_error, who)
    return AccountHealth(
        account=account.name,
        conditions=tuple(found),
        serving_problem=_serving_problem(state, status, now, found),
        refresh_blocked=_refresh_blocked(status, now, found),
        changes_at=_changes_at(account, state, status, policy, now, settings),
    )


#: The resolution of datetime: a threshold given in seconds lands within this of its moment.
_TICK = timedelta(microseconds=1)


def first_moment(moments: Iterable[datetime], now: datetime) -> datetime | None:
    """Return the earliest of ``moments`` still to come, as a moment to grade again at.

    A moment computed as "expiry minus a threshold" is rounded to the microsecond, so the
    comparison it stands for may flip up to a tick either side of it: one that is already a
    tick behind ``now`` has flipped (the grading at ``now`` saw it); any other is returned a
    tick early, but always after ``now`` (grading again at ``now`` would change nothing).
    """
    ahead = [max(now + _TICK, at - _TICK) for at in moments if at + _TICK > now]
    return min(ahead, default=None)


def _changes_at(
    account: AccountConfig,
    state: AccountState | None,
    status: AccountStatus | None,
    policy: RefreshPolicy,
    now: datetime,
    settings: AlertsConfig,
) -> datetime | None:
    """Return when the grading could first change with these inputs (see
    :attr:`AccountHealth.changes_at`): every moment at which a comparison with ``now`` in
    this module flips."""
    moments: list[datetime] = []
    if status is not None and status.health is Health.RETRYING and status.next_attempt_at:
        moments.append(status.next_attempt_at)  # refresh_blocked
    if state is not None:
        tokens = state.tokens
        expires = tokens.refresh_expires_at
        # The expiry ladder's stages and critical_below, the expiry itself (and access_expired
        # from the files); the access token's expiry (serving).
        for threshold in (*settings.thresholds, settings.critical_below):
            moments.append(expires - timedelta(seconds=threshold))
        moments += (expires, tokens.access_expires_at)
        if status is not None:
            lifetime = tokens.access_lifetime.total_seconds()
            failing = timedelta(seconds=settings.failing_after * lifetime)
            if status.health is Health.RETRYING:
                margin = timedelta(seconds=_margin(policy, lifetime))
                moments.append(tokens.access_expires_at - margin)
                held = _held_for_retry(account, tokens, status, policy)
                if held is not None:
                    moments.append(held)
                if status.failing_since is not None:
                    moments.append(status.failing_since + failing)
            if status.store_unavailable_since is not None:
                moments.append(status.store_unavailable_since + failing)
    return first_moment(moments, now)


def _conditions(
    account: AccountConfig,
    state: AccountState | None,
    status: AccountStatus | None,
    policy: RefreshPolicy,
    now: datetime,
    settings: AlertsConfig,
    host: str | None,
    load_error: StoreError | None,
    supervisor: Supervisor,
) -> list[Condition]:
    login = login_command(account)
    status_command = cli_command(account, "status")
    relogin_fix, relogin_hint = login_fix(account), login_hint(account, host)
    found: list[Condition] = []
    health = status.health if status is not None else None
    if health is Health.RELOGIN or (status is None and state is not None and state.relogin_reason):
        found.append(_relogin(account, state, status, relogin_fix, relogin_hint, login))
    elif health is Health.CONFIG:
        found.append(_config(status.last_error_class if status else None, supervisor))
    if state is None:
        if status is None and load_error is not None:
            found.append(
                Condition(
                    "state_unreadable",
                    Severity.CRITICAL,
                    Message.verbatim(load_error.message),
                    Message.verbatim(load_error.hint) if load_error.hint else relogin_fix,
                    command=None if load_error.hint else login,
                )
            )
        elif not found:  # no tokens, and no refusal or bad configuration that says more
            found.append(
                Condition(
                    "no_tokens",
                    Severity.CRITICAL,
                    N_("no tokens (not logged in)"),
                    relogin_fix,
                    hint=relogin_hint,
                    command=login,
                )
            )
        return found
    tokens = state.tokens
    refresh_left = tokens.refresh_remaining(now).total_seconds()
    access_left = tokens.access_remaining(now).total_seconds()
    expiry = _refresh_expiry(tokens.refresh_expires_at, refresh_left, settings)
    if expiry is not None:
        severity, stage, message, brief = expiry
        found.append(
            Condition(
                "refresh_expiry",
                severity,
                message,
                relogin_fix,
                stage=stage,
                brief=brief,
                hint=relogin_hint,
                command=login,
            )
        )
    if status is None:
        if access_left <= 0 < refresh_left and not state.relogin_reason:
            refresh = cli_command(account, "refresh")
            found.append(
                Condition(
                    "access_expired",
                    Severity.WARNING,
                    N_("the access token has expired and no running kakao-tokend renewed it"),
                    N_("start kakao-tokend, or run `{command}` to renew it now", command=refresh),
                    command=refresh,
                )
            )
        return found
    if health is Health.RETRYING:
        lifetime = tokens.access_lifetime.total_seconds()
        held = _held_for_retry(account, tokens, status, policy)
        found += _failing(
            status,
            policy,
            now,
            settings,
            lifetime=lifetime,
            access_left=access_left,
            held=held is not None and now < held,
            supervisor=supervisor,
        )
    store_down = store_unavailable_condition(
        status, now, settings, tokens.access_lifetime.total_seconds(), supervisor
    )
    if store_down is not None:
        found.append(store_down)
    if status.write_pending and status.write_error is not None:  # (waiting is no failure)
        found.append(
            Condition(
                "write_failed",
                Severity.CRITICAL,
                N_(
                    "cannot save the new tokens ({error})",
                    error=status.write_error or "write error",
                ),
                N_(
                    "{fix}; do not stop kakao-tokend until it is saved",
                    fix=write_fix(status.write_errno),
                ),
                brief=N_("cannot save the new tokens"),
                hint=N_("state directory: {directory}", directory=str(account.state_file.parent)),
            )
        )
    if status.publish_pending:
        found.append(
            Condition(
                "publish_failed",
                Severity.CRITICAL,
                N_(
                    "cannot write the token files for consumers ({error}); they read an older"
                    " token",
                    error=status.publish_error or "write error",
                ),
                # The memo's brief does not name the file: the fix says where to read it.
                N_("fix the file or directory `{command}` shows", command=status_command),
                brief=N_("cannot write the token files"),
                hint=N_("kakao-tokend retries by itself"),
            )
        )
    if status.state_conflict:
        # One command in the fix (a memo holds it whole); going back to the refused file on
        # purpose is the hint, with the file itself: `restore` without one is refused.
        refused = status.conflict_file
        found.append(
            Condition(
                "state_conflict",
                Severity.CRITICAL,
                N_(
                    "another program changed the stored tokens: {detail}",
                    detail=status.state_conflict,
                ),
                N_("see what was kept: `{command}`", command=status_command),
                brief=N_("another program wrote the state"),
                hint=None
                if refused is None
                else N_(
                    "to go back to the refused file on purpose, run `{command}`",
                    command=cli_command(account, "restore", refused),
                ),
            )
        )
    if status.missed_rotation and refresh_left > 0:  # expired: refresh_expiry says it
        found.append(
            Condition(
                "missed_rotation",
                Severity.WARNING,
                N_(
                    "Kakao did not renew the refresh token although only {left} is left",
                    left=Duration(refresh_left),
                ),
                N_("watch `{command}`", command=status_command),
                brief=N_(
                    "the refresh token was not renewed ({left} left)", left=Duration(refresh_left)
                ),
                hint=N_("if it is not renewed soon, run `{command}`", command=login),
                command=login,
            )
        )
    return found


def _relogin(
    account: AccountConfig,
    state: AccountState | None,
    status: AccountStatus | None,
    fix: Message,
    hint: Message,
    login: str,
) -> Condition:
    """The re-login condition: why (when the cause is known), and the login command."""
    cause = relogin_texts(account, state, status)
    brief: Message | None = None
    if cause is not None:
        message, fix, brief = cause.alert, cause.fix, cause.brief
    elif status is not None and status.last_error_class == "corrupt_state":
        message = N_("the stored state could not be read; a new login is needed")
    else:
        label = status.last_error_class if status is not None else None
        message = N_(
            "Kakao refuses the tokens ({reason}); a new login is needed",
            reason=_reason(label, "refused"),
        )
        brief = N_("Kakao refuses the tokens ({reason})", reason=_reason(label, "refused"))
    return Condition(
        "relogin", Severity.CRITICAL, message, fix, brief=brief, hint=hint, command=login
    )


def _config(label: str | None, supervisor: Supervisor) -> Condition:
    """Kakao rejects the app's configuration: the code, and what it means when known."""
    reason = _reason(label, "config")
    meaning = KAKAO_CONFIG_CODES.get(label or "")
    if meaning is None:
        message = N_("Kakao rejects the app configuration ({reason})", reason=reason)
        brief = None
    else:
        message = N_(
            "Kakao rejects the app configuration ({reason}): {meaning}",
            reason=reason,
            meaning=meaning,
        )
        brief = N_("{meaning} ({reason})", meaning=meaning, reason=reason)
    fix, hint = config_action(supervisor)
    return Condition(
        "config",
        Severity.CRITICAL,
        message,
        fix,
        brief=brief,
        hint=hint,
        command=supervisor.restart_command,
    )


def _refresh_expiry(
    expires_at: datetime, left: float, settings: AlertsConfig
) -> tuple[Severity, float, Message, Message | None] | None:
    """The expiry ladder: (severity, stage, message, brief), or None above every threshold.

    Each threshold of ``[alerts] thresholds`` is a stage; less than ``critical_below`` left
    (or a stage at or below it) is critical, and so is an expired token.
    """
    stages = [t for t in settings.thresholds if left < t]
    if left > 0 and not stages:
        return None
    if left <= 0:
        return Severity.CRITICAL, 0.0, N_("the refresh token has EXPIRED"), None
    stage = min(stages)
    critical = left < settings.critical_below or stage <= settings.critical_below
    message = N_(
        "the refresh token expires in {left} ({at}) and was not renewed",
        left=Duration(left),
        at=format_local_time(expires_at),
    )
    brief = N_("the refresh token expires in {left} and was not renewed", left=Duration(left))
    return Severity.CRITICAL if critical else Severity.WARNING, stage, message, brief


def _failing(
    status: AccountStatus,
    policy: RefreshPolicy,
    now: datetime,
    settings: AlertsConfig,
    *,
    lifetime: float,
    access_left: float,
    held: bool = False,
    supervisor: Supervisor,
) -> list[Condition]:
    """Refreshing keeps failing: the access token runs out soon, or it has failed for long.

    "Soon" is half the time between the latest planned refresh and the expiry
    (tokens.expiring_margin); "long" is ``failing_after`` of the access token's lifetime.
    Both scale with the lifetime. ``held``: one attempt has failed and its retry may still
    end before the expiry (:func:`_held_for_retry`), so "keeps failing" is not known yet.
    """
    found: list[Condition] = []
    reason = _reason(status.last_error_class, "error")
    # What fails decides where to look: the account's own files (its lock), the database (a
    # fleet node's row lock), another node (a refusal waited out for its unsaved rotation),
    # or the network.
    where = {"lock_error": files_fix, "row_lock_error": database_fix, "superseded": peers_fix}
    fix, hint = where.get(status.last_error_class or "", network_fix)(supervisor)
    since = status.failing_since
    failing_for = (now - since).total_seconds() if since else 0.0
    if access_left < _margin(policy, lifetime) and not held:
        if access_left > 0:
            left = Duration(access_left)
            message = N_(
                "the access token expires in {left} and refreshing keeps failing ({reason})",
                left=left,
                reason=reason,
            )
            # Briefs this short: the memo's budget (alerts.MEMO_PATH_BUDGET) holds the longest
            # account name with "(repeat)", a REASON_LIMIT label and the fix whole (the full
            # sentences made 202-206 characters; tests/test_alerts.py).
            brief: Message | None = N_(
                "access token: {left} left, refresh fails ({reason})",
                left=left,
                reason=reason,
            )
        else:
            message = N_(
                "the access token has EXPIRED and refreshing keeps failing ({reason})",
                reason=reason,
            )
            brief = N_("access token EXPIRED, refresh fails ({reason})", reason=reason)
        found.append(
            Condition("access_expiring", Severity.CRITICAL, message, fix, brief=brief, hint=hint)
        )
    if since is not None and failing_for > settings.failing_after * lifetime:
        found.append(
            Condition(
                "refresh_failing",
                Severity.WARNING,
                N_(
                    "refreshing has failed for {duration} ({reason}); the access token is"
                    " valid for {left} more",
                    duration=Duration(failing_for),
                    reason=reason,
                    left=Duration(access_left),
                )
                if access_left > 0
                else N_(
                    "refreshing has failed for {duration} ({reason}); the access token has EXPIRED",
                    duration=Duration(failing_for),
                    reason=reason,
                ),
                fix,
                brief=N_(
                    "refreshing has failed for {duration} ({reason})",
                    duration=Duration(failing_for),
                    reason=reason,
                ),
                hint=hint,
            )
        )
    return found


def _margin(policy: RefreshPolicy, lifetime: float) -> float:
    """Return the access_expiring margin under ``policy`` (tokens.expiring_margin)."""
    return expiring_margin(policy.refresh_at, policy.jitter, lifetime)


def _held_for_retry(
    account: AccountConfig, tokens: TokenSet, status: AccountStatus, policy: RefreshPolicy
) -> datetime | None:
    """Return until when ``access_expiring`` waits for the retry after a single failed
    attempt (None: it does not wait).

    A page says refreshing *keeps* failing. After one failed attempt that is not known yet:
    the retry may mend it. So the page waits until that retry has had its chance — its
    planned start plus the longest its request may wait (tokens.request_timeout, as the
    client computes it then) — unless that is no sooner than the access token's expiry
    (a wait set by hand that long: then the page comes at once). Two failed attempts, or a
    retry that has not reported by then, page as before. With the request timeout fitted to
    the policy (tokens.request_timeout_share) the wait ends before the page's moment anyway,
    at every lifetime; it matters for a pause longer than that (a 429's, a hand-set timeout,
    and a retry after a request Kakao left unanswered, which may wait up to 1/8 of a short
    token's life: the page then comes when it ran out, up to 4.75 % of the life later).
    """
    retry_at = status.next_attempt_at
    if status.attempt > 1 or retry_at is None:
        return None
    refresh_left = (tokens.refresh_expires_at - retry_at).total_seconds()
    wait, _ = account.app.request_timeouts(
        policy,
        tokens.access_lifetime,
        refresh_left,
        unanswered=status.unanswered,
        heard=status.heard_in,
    )
    ends = retry_at + timedelta(seconds=wait)
    return ends if ends < tokens.access_expires_at else None


def store_unavailable_condition(
    status: AccountStatus,
    now: datetime,
    settings: AlertsConfig,
    lifetime: float,
    supervisor: Supervisor | None = None,
) -> Condition | None:
    """Fleet mode: the shared store has been unreachable for ``failing_after`` of the access
    lifetime. Nothing is refreshed (no Kakao call without the row lock), so the current access
    token lasts until it expires: a running node serves the token it holds until then, a start
    waiting for the store serves none and leaves its token files (fleet/startwait.py). One text
    true of both; the expiry conditions say when that runs out."""
    since = status.store_unavailable_since
    if since is None:
        return None
    down_for = (now - since).total_seconds()
    if down_for < settings.failing_after * lifetime:
        return None
    text = (status.store_error or "").lower()
    error = "timeout" if "within" in text or "timeout" in text else "unreachable"
    return Condition(
        "store_unavailable",
        Severity.WARNING,
        N_(
            "the shared PostgreSQL store has been unreachable for {duration} ({error}); not"
            " refreshing, so the current access token lasts only until it expires",
            duration=Duration(down_for),
            error=error,
        ),
        N_("check PostgreSQL and the network from this node to it"),
        hint=details(supervisor or current_supervisor()),
        brief=N_(
            "the shared PostgreSQL store is unreachable for {duration}", duration=Duration(down_for)
        ),
    )


def _serving_problem(
    state: AccountState | None,
    status: AccountStatus | None,
    now: datetime,
    found: list[Condition],
) -> str | None:
    """Why consumers lack a valid, current token (None: they have one)."""
    if state is None or (status is not None and status.health in STOPPED):
        return _said(found, ("relogin", "config", "no_tokens", "state_unreadable"))
    if state.tokens.access_expires_at <= now:
        return f"the access token expired at {format_time(state.tokens.access_expires_at)}" + (
            f"; {status.last_error}" if status is not None and status.last_error else ""
        )
    if status is not None and status.publish_pending:
        # Consumers reading the files get an older token until the retry succeeds.
        return f"the published token files are stale: {status.publish_error}"
    return None


def _refresh_blocked(
    status: AccountStatus | None, now: datetime, found: list[Condition]
) -> str | None:
    """Why a consumer's request must not make Kakao refresh now (None: it may).

    It must not override the account's back-off (KOE237, outages) nor present a refresh
    token Kakao already refused: every such request would otherwise reach Kakao again.
    """
    if status is None:
        return None
    if status.health in STOPPED:
        return _said(found, ("relogin", "config", "no_tokens")) or status.health.value
    if (
        status.health is Health.RETRYING
        and status.next_attempt_at is not None
        and status.next_attempt_at > now
    ):
        return status.last_error or status.health.value
    return None


def _said(found: list[Condition], names: Iterable[str]) -> str:
    """Return the first of the named conditions as one English line: what, then the fix."""
    wanted = tuple(names)
    for condition in found:
        if condition.name in wanted:
            return f"{condition.message.render('en')}; {condition.action.render('en')}"
    return ""


#: The default expiry ladder: written for Kakao's 60-day refresh token.
_KAKAO_LADDER = (AlertsConfig().thresholds, AlertsConfig().critical_below)


def fitted_alerts(settings: AlertsConfig, state: AccountState | None) -> AlertsConfig:
    """Return the expiry ladder fitted to the refresh token's life (tokens.kakao_scale).

    The default ladder (14d 7d 3d 1d, critical below 3d) keeps its share of Kakao's 60-day
    life for a token born shorter (else a 10-minute token would be an alert from birth); the
    rotation window shrinks alike (refresher). A ladder set by hand is used as written.
    """
    if state is None or (settings.thresholds, settings.critical_below) != _KAKAO_LADDER:
        return settings
    scale = kakao_scale(state.tokens)
    if scale == 1.0:
        return settings
    return replace(
        settings,
        thresholds=tuple(t * scale for t in settings.thresholds),
        critical_below=settings.critical_below * scale,
    )


def moved_thresholds(
    settings: AlertsConfig, *, warn: float | None = None, crit: float | None = None
) -> AlertsConfig | None:
    """Return ``settings`` with the expiry ladder moved (`status --warn/--crit`), or None.

    ``warn`` becomes the longest threshold (longer ones are dropped), ``crit`` becomes
    ``critical_below``. None when neither is given: the account's own settings apply.
    """
    if warn is None and crit is None:
        return None
    thresholds = settings.thresholds
    if warn is not None:
        thresholds = (warn, *(t for t in thresholds if t < warn))
    return replace(
        settings,
        thresholds=thresholds,
        critical_below=settings.critical_below if crit is None else crit,
    )


def still_active(
    recorded: Iterable[Mapping[str, Any]], health: AccountHealth
) -> list[Mapping[str, Any]]:
    """Return the recorded alerts that the current grading does not contradict.

    Alert bookkeeping can still list conditions about tokens a login or an import replaced
    (no daemon saw the new state yet). A condition the stored state decides (:data:`FROM_FILES`)
    is shown only while the grading still finds it; the others need the daemon to judge them
    and stay as recorded.
    """
    current = set(health.names())
    return [
        alert
        for alert in recorded
        if alert.get("condition") not in FROM_FILES or alert.get("condition") in current
    ]
