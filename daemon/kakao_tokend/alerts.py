"""Alerts: per-account conditions, once-only/repeat bookkeeping, and delivery to every channel.

An :class:`AlertCenter` watches every :class:`~kakao_tokend.refresher.AccountManager` (through
its event listeners and a heartbeat), decides which conditions are active, and sends each
change once: to the log (always; the log level is the severity) and, in background
tasks, to KakaoTalk "send to me", a webhook and a command. What was sent is saved next to the
state file, so a restart sends nothing twice. No alert, log line or environment variable ever
carries a token.

In fleet mode (:class:`SharedAlerts`, filled by fleet/alertshare.py) every node still grades
every account, but an account's conditions go out once per fleet: only the node that
``delivers`` for the account sends them, and their bookkeeping is the store's, so the next
node continues from it. The conditions about the node itself (:data:`~.health.NODE_LOCAL`)
are sent by that node, with its own bookkeeping on its disk.

An account is graded again when something about it changes (its events, a reload, the
fleet's records or its live nodes) and when time alone could change the answer: the moment
the grading names (:attr:`~.health.AccountHealth.changes_at`: a rung of the expiry ladder,
``failing_after`` ...) or a critical alert's next repeat. The heartbeat grades only the
accounts due then, from a heap of those moments, so an idle daemon's heartbeat costs nothing
per account; a wall clock stepped back (which could undo a crossed threshold) grades them all.

Alert texts are :mod:`~kakao_tokend.i18n` messages: the channels get them in the account's
``[alerts] language`` (Korean or English), the log always in English (its lines are what the
operator's guide and ``journalctl -g`` recipes quote). A KakaoTalk memo is composed to fit
Kakao's 200 characters with the condition and the exact command whole (:meth:`Alert.memo`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, Protocol, cast
from urllib.parse import urlsplit

import aiohttp

from . import supervisor
from .config import AccountConfig, AlertsConfig
from .errors import KakaoError, KakaoRequestRejected, KakaoUnavailable, StoreError
from .health import (
    NODE_LOCAL,
    REPLACED_BY,
    AccountHealth,
    Condition,
    Severity,
    condition_name,
    first_moment,
    full_action,
    printable,
)
from .i18n import N_, Language, Message, resolve_language
from .kakao import KakaoClient
from .refresher import AccountManager
from .relogin import cli_command
from .state import AccountState
from .status import WITHOUT_TOKENS, AccountEvent, active_alerts
from .storage import StateStore
from .tokens import Clock, backoff_delay, format_time, parse_time, utcnow

__all__ = [
    "CLOSE_GRACE",
    "KAKAOTALK_TEXT_LIMIT",
    "PASSED_ENV",
    "Alert",
    "AlertCenter",
    "AlertSetup",
    "Condition",
    "Severity",
    "SharedAlerts",
    "resolution_alert",
    "send_test",
]

log = logging.getLogger(__name__)

#: Kakao's limit for the text of a "send to me" message.
KAKAOTALK_TEXT_LIMIT = 200
#: The memo's budget (Alert.memo), the one rule every brief and fix is written to: in
#: KAKAOTALK_TEXT_LIMIT characters, the condition's brief and its fix line (with the exact
#: command) whole, in both languages, repeat or not, for any account name the config accepts
#: (32 characters), any error label (health.REASON_LIMIT), however the daemon runs (the
#: shipped units, the per-account one included, or by hand: supervisor.py), and a --config
#: file or a log file of up to MEMO_PATH_BUDGET characters (tests/test_alerts.py checks
#: every condition against it). Longer paths still make a memo of at most the limit, with
#: the condition cut first.
MEMO_PATH_BUDGET = 40
#: Retries for KakaoTalk and the command (the webhook has its own setting).
CHANNEL_RETRIES = 2
#: First step before retrying a failed delivery; doubles per attempt up to RETRY_DELAY_MAX
#: (tokens.backoff_delay, the one back-off rule, with its jitter).
RETRY_DELAY = 2.0
RETRY_DELAY_MAX = 60.0
_RNG = random.Random()
#: How long a stopping daemon waits for queued deliveries.
CLOSE_GRACE = 3.0
#: The center's heap holds only the grading moments within this much of the latest
#: heartbeat; a later one stays on its account (AccountAlerts.due) until the horizon, moved
#: on every half of it, reaches it. Most of a node's 10,000 healthy accounts are next graded
#: hours ahead (their access token's expiry): a heap entry each was 72 bytes.
MOMENT_HORIZON = timedelta(minutes=10)
#: The shortest sleep before a grading moment (run_periodic), so a moment is never spun on.
MOMENT_FLOOR = 0.001
#: Environment passed on to the alert command (nothing else: the daemon's environment may
#: hold the REST API key or client secret): the message locale whole (i18n.py reads LC_ALL,
#: LC_MESSAGES, LANG and GNU gettext's LANGUAGE), so the command speaks as the daemon does.
PASSED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_MESSAGES",
    "LANGUAGE",
    "LC_CTYPE",
    "TZ",
    "USER",
    "LOGNAME",
)
BOOKKEEPING_VERSION = 1

#: Conditions that only make sense while the account has tokens.
_TOKEN_CONDITIONS = frozenset(
    {
        "refresh_expiry",
        "refresh_failing",
        "access_expiring",
        "missed_rotation",
        "write_failed",
        "publish_failed",
        "state_conflict",
        "store_unavailable",
    }
)


AlertState = Literal["firing", "resolved"]

#: The records of an account without an active alert, in fleet mode: one shared read-only
#: mapping instead of an empty dictionary for each of a node's 10,000 accounts.
NO_RECORDS: Mapping[str, dict[str, Any]] = MappingProxyType({})


@dataclass(frozen=True)
class Alert:
    """One notification about a condition: it started (again) or it cleared.

    ``fix`` is None for a resolution. Every text is rendered in ``language`` when sent.
    """

    account: str
    condition: str
    severity: Severity
    state: AlertState
    message: Message
    fix: Message | None
    at: datetime
    host: str = field(default_factory=socket.gethostname)
    repeat: bool = False
    test: bool = False
    brief: Message | None = None
    hint: Message | None = None
    language: Language = "en"

    @property
    def action(self) -> Message | None:
        """Return the whole fix (``fix`` plus ``hint``); None for a resolution."""
        return None if self.fix is None else full_action(self.fix, self.hint)

    def title(self, language: Language) -> str:
        """Return "CRITICAL", "CRITICAL (repeat)", "RESOLVED" ... in ``language``."""
        if self.state == "resolved":
            return N_("RESOLVED").render(language)
        if self.repeat:
            return N_("{severity} (repeat)", severity=self.severity.title).render(language)
        return self.severity.title.render(language)

    def text(self) -> str:
        """Return the whole text as one paragraph (webhook, command), in the alert's language."""
        language = self.language
        head = f"{self.title(language)} kakao-tokend {self.account}@{self.host}: "
        body = _sentence(self.message.render(language))
        action = self.action
        if action is None or self.state != "firing":
            return head + body
        return head + body + " " + N_("Fix: {action}", action=action).render(language)

    def memo(self, limit: int = KAKAOTALK_TEXT_LIMIT) -> str:
        """Return the KakaoTalk text: at most ``limit`` characters, condition and fix whole.

        Lines, from the last given up to the first: the condition in brief and the fix with
        its exact command; the severity and account; the tool's name and the host (cut first);
        the hint; a pointer to the log when something did not fit. The account gives way
        only when the fix's command names it (``--account NAME``), after the host and the
        tool's name (MEMO_PATH_BUDGET says what must fit).
        """
        language = self.language
        brief = _sentence((self.brief or self.message).render(language))
        fix = ""
        if self.state == "firing" and self.fix is not None:
            fix = N_("Fix: {action}", action=self.fix).render(language)
        required = [line for line in (brief, fix) if line]
        room = limit - sum(len(line) + 1 for line in required)
        title = self.title(language)
        named = _names_account(fix, self.account)
        head = _memo_head(title, self.account, self.host, room, named=named)
        if len(head) > room:  # beyond the budget: a text from outside the catalog, say
            smallest = title if named else f"{title} {self.account}"
            keep = limit - len(smallest) - len(fix) - 2
            head, brief = smallest, brief[: max(0, keep - 1)] + "…"
            required = [line for line in (brief, fix) if line]
        lines = [head, *required]
        used = sum(len(line) for line in lines) + len(lines) - 1
        left_out = self.brief is not None and self.brief != self.message
        if self.hint is not None and self.state == "firing":
            hint = _sentence(self.hint.render(language))
            if used + 1 + len(hint) <= limit:
                lines.append(hint)
                used += 1 + len(hint)
            else:
                left_out = True
        log = supervisor.current().log
        if left_out and log.render(language) not in "".join(lines):
            more = N_("More in the log: {log}", log=log).render(language)
            if used + 1 + len(more) <= limit:
                lines.append(more)
        return "\n".join(lines)[:limit]

    def payload(self) -> dict[str, Any]:
        """Return the webhook's JSON body: a plain ``text`` plus structured fields."""
        action = self.action
        return {
            "text": self.text(),
            "account": self.account,
            "condition": self.condition,
            "severity": self.severity.label,
            "state": self.state,
            "message": self.message.render(self.language),
            "action": "" if action is None else action.render(self.language),
            "at": format_time(self.at),
            "host": self.host,
            "repeat": self.repeat,
            "test": self.test,
            "language": self.language,
        }

    def environ(self) -> dict[str, str]:
        """Return the KAKAO_TOKEND_ALERT_* variables for the command."""
        action = self.action
        return {
            "KAKAO_TOKEND_ALERT_ACCOUNT": self.account,
            "KAKAO_TOKEND_ALERT_CONDITION": self.condition,
            "KAKAO_TOKEND_ALERT_SEVERITY": self.severity.label,
            "KAKAO_TOKEND_ALERT_STATE": self.state,
            "KAKAO_TOKEND_ALERT_MESSAGE": self.message.render(self.language),
            "KAKAO_TOKEND_ALERT_ACTION": "" if action is None else action.render(self.language),
            "KAKAO_TOKEND_ALERT_AT": format_time(self.at),
            "KAKAO_TOKEND_ALERT_HOST": self.host,
            "KAKAO_TOKEND_ALERT_TEXT": self.text(),
            "KAKAO_TOKEND_ALERT_LANGUAGE": self.language,
        }


def _sentence(text: str) -> str:
    """End ``text`` with exactly one full stop."""
    return text.rstrip(".") + "."


def _memo_head(title: str, account: str, host: str, room: int, *, named: bool = False) -> str:
    """Return the richest first line that fits ``room``: title, tool, account and host.

    ``named``: the fix's command names the account, so the line may be the title alone.
    """
    host = printable(host)
    full = f"{title} kakao-tokend {account}@{host}"
    if len(full) <= room:
        return full
    cut = f"{title} kakao-tokend {account}@"
    if room - len(cut) >= 8:  # a recognisable start of the host name
        return cut + host[: room - len(cut) - 1] + "…"
    for head in (f"{title} kakao-tokend {account}", f"{title} {account}"):
        if len(head) <= room:
            return head
    return title if named else f"{title} {account}"


def _names_account(fix: str, account: str) -> bool:
    """True when ``fix`` names ``account`` in a command: ``--account NAME``, or the account's
    own unit ``kakao-tokend@NAME`` (systemd/kakao-tokend@.service)."""
    for named in (f"--account {account}", f"{supervisor.UNIT}@{account}"):
        at = fix.find(named)
        end = at + len(named)
        if at >= 0 and (end == len(fix) or fix[end] in " `"):
            return True
    return False


# --------------------------------------------------------------------------- channels


class ChannelError(Exception):
    """A delivery failed; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Channel(Protocol):
    """Somewhere alerts go besides the log."""

    name: str
    min_severity: Severity
    retries: int

    def wants(self, alert: Alert) -> bool:
        """Return True when this channel should carry ``alert``."""
        ...

    async def send(self, alert: Alert) -> None:
        """Deliver ``alert`` or raise ChannelError."""
        ...


class KakaoTalkChannel:
    """KakaoTalk "send to me" with the account's own access token."""

    retries = CHANNEL_RETRIES

    def __init__(
        self,
        account: AccountConfig,
        *,
        mode: bool | None,
        min_severity: Severity,
        get_state: Callable[[], AccountState | None],
        get_client: Callable[[], KakaoClient],
        clock: Clock = utcnow,
        link: str | None = None,
    ) -> None:
        self.name = "kakaotalk"
        self.account = account.name
        self._account = account
        self.mode = mode
        self.link = link
        self.min_severity = min_severity
        self._get_state = get_state
        self._get_client = get_client
        self._clock = clock
        self._said_no_consent = False

    def enabled(self) -> bool:
        """True when configured on, or on "auto" when the token has the talk_message consent."""
        if self.mode is not None:
            return self.mode
        state = self._get_state()
        return state is not None and "talk_message" in (state.tokens.scope or "").split()

    @property
    def consent_fix(self) -> str:
        """What grants the consent again: the account's login asking for it (made when said:
        one such command held for each of 10,000 accounts of a fleet node was 1.5 MiB)."""
        return cli_command(self._account, "login", "--scope", "talk_message")

    def wants(self, alert: Alert) -> bool:
        """Carry alerts of at least the minimum severity while the channel is enabled."""
        return (alert.test or alert.severity >= self.min_severity) and self.enabled()

    async def send(self, alert: Alert) -> None:
        """Send the alert's memo (at most 200 characters) to the user's own chat."""
        state = self._get_state()
        if state is None or state.tokens.access_expires_at <= self._clock():
            raise ChannelError("no valid access token to send with", retry=False)
        try:
            await self._get_client().send_to_me(
                state.tokens.access_token, alert.memo(KAKAOTALK_TEXT_LIMIT), link_url=self.link
            )
        except KakaoRequestRejected as exc:
            if exc.code == "-402":
                if not self._said_no_consent:
                    self._said_no_consent = True
                    log.warning(
                        "account %s: KakaoTalk alerts cannot be delivered: the token lacks the"
                        " talk_message consent (-402); run `%s` or set [alerts] kakaotalk ="
                        " false",
                        self.account,
                        self.consent_fix,
                    )
                raise ChannelError("talk_message consent missing (-402)", retry=False) from None
            raise ChannelError(str(exc), retry=False) from None
        except KakaoUnavailable as exc:
            raise ChannelError(str(exc), retry=True) from None
        except KakaoError as exc:
            raise ChannelError(str(exc), retry=False) from None
        self._said_no_consent = False


class WebhookChannel:
    """A JSON POST with a plain ``text`` field plus structured fields."""

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession,
        timeout: float,
        retries: int,
        min_severity: Severity,
    ) -> None:
        parts = urlsplit(url)
        # The path of a webhook URL is often its secret: name only scheme and host.
        self.name = f"webhook {parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._url = url
        self._session = session
        self._timeout = timeout
        self.retries = retries
        self.min_severity = min_severity

    def wants(self, alert: Alert) -> bool:
        """Carry alerts of at least the minimum severity."""
        return alert.test or alert.severity >= self.min_severity

    async def send(self, alert: Alert) -> None:
        """POST the alert; any 2xx answer is success."""
        try:
            async with self._session.post(
                self._url,
                json=alert.payload(),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                allow_redirects=False,
            ) as response:
                if not 200 <= response.status < 300:
                    raise ChannelError(f"HTTP {response.status}", retry=True)
        except TimeoutError:
            raise ChannelError(f"no answer within {self._timeout:g}s", retry=True) from None
        except aiohttp.ClientError as exc:
            raise ChannelError(type(exc).__name__, retry=True) from None


class CommandChannel:
    """A command run without a shell, with the alert in KAKAO_TOKEND_ALERT_* variables."""

    retries = CHANNEL_RETRIES

    def __init__(self, argv: Iterable[str], *, timeout: float, min_severity: Severity) -> None:
        self.argv = tuple(argv)
        self.name = f"command {self.argv[0]}"
        self._timeout = timeout
        self.min_severity = min_severity

    def wants(self, alert: Alert) -> bool:
        """Carry alerts of at least the minimum severity."""
        return alert.test or alert.severity >= self.min_severity

    async def send(self, alert: Alert) -> None:
        """Run the command; exit status 0 is success; killed after the timeout."""
        env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
        env.update(alert.environ())
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ChannelError(f"cannot run it: {exc.strerror or exc}", retry=False) from None
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            raise ChannelError(f"killed after {self._timeout:g}s", retry=True) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            raise
        if proc.returncode != 0:
            last = stderr.decode(errors="replace").strip().splitlines()[-1:] if stderr else []
            said = f": {last[0][:200]}" if last else ""
            raise ChannelError(f"exit status {proc.returncode}{said}", retry=True)


def build_channels(
    account: AccountConfig,
    settings: AlertsConfig,
    *,
    session: aiohttp.ClientSession,
    get_state: Callable[[], AccountState | None],
    get_client: Callable[[], KakaoClient],
    clock: Clock = utcnow,
) -> list[Channel]:
    """Return the configured channels for one account (the log is not one of them)."""
    channels: list[Channel] = []
    if settings.kakaotalk is not False:
        channels.append(
            KakaoTalkChannel(
                account,
                mode=settings.kakaotalk,
                min_severity=Severity.parse(settings.kakaotalk_min_severity),
                get_state=get_state,
                get_client=get_client,
                clock=clock,
                link=settings.kakaotalk_link,
            )
        )
    if settings.webhook_url:
        channels.append(
            WebhookChannel(
                settings.webhook_url,
                session=session,
                timeout=settings.webhook_timeout,
                retries=settings.webhook_retries,
                min_severity=Severity.parse(settings.webhook_min_severity),
            )
        )
    if settings.command:
        channels.append(
            CommandChannel(
                settings.command,
                timeout=settings.command_timeout,
                min_severity=Severity.parse(settings.command_min_severity),
            )
        )
    return channels


def log_alert(alert: Alert) -> None:
    """Write the alert to the log, in English, at its severity's level (resolutions at INFO)."""
    if alert.state == "resolved":
        log.info(
            "alert resolved: account %s: %s: %s",
            alert.account,
            alert.condition,
            alert.message.render("en"),
        )
        return
    log.log(
        int(alert.severity),
        "ALERT %s%s: account %s: %s: %s; fix: %s",
        alert.severity.label,
        " (repeat)" if alert.repeat else "",
        alert.account,
        alert.condition,
        alert.message.render("en"),
        alert.action.render("en") if alert.action is not None else "",
    )


async def deliver_once(channel: Channel, alert: Alert) -> ChannelError | None:
    """Try one delivery; return None on success, else what went wrong (never raises)."""
    try:
        await channel.send(alert)
    except ChannelError as exc:
        return exc
    except Exception as exc:  # a channel bug must not take anything else down
        log.error("alert channel %s crashed: %r", channel.name, exc)
        return ChannelError(f"internal error: {type(exc).__name__}", retry=False)
    return None


# --------------------------------------------------------------------------- per account


class SharedAlerts(Protocol):
    """Fleet mode: the fleet-wide bookkeeping (every condition not in NODE_LOCAL) and who
    delivers it. Synchronous: it answers from the node's copy of the store's records."""

    def delivers(self, account: str) -> bool:
        """Return True when this node sends ``account``'s fleet-wide alerts now."""
        ...

    def records(self, account: str) -> dict[str, dict[str, Any]]:
        """Return ``account``'s fleet-wide records as last known (the caller may not change
        the mapping, only replace it through :meth:`record`)."""
        ...

    def record(self, account: str, active: dict[str, dict[str, Any]]) -> None:
        """Make ``active`` the account's fleet-wide records (written to the store later)."""
        ...

    def changed(self) -> set[str] | None:
        """Return the accounts whose records (written by another node) or whose delivering
        node may have changed since the last call; None: possibly every account's."""
        ...


class AlertSetup:
    """What the alerts of every account of one daemon share: one object, not five slots in
    each of a fleet node's 10,000 :class:`AccountAlerts`."""

    __slots__ = ("clock", "host", "retry_delay", "session", "shared")

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        clock: Clock,
        host: str,
        retry_delay: float,
        shared: SharedAlerts | None,
    ) -> None:
        self.session = session
        self.clock = clock
        self.host = host
        self.retry_delay = retry_delay
        #: Fleet mode: where the fleet-wide bookkeeping lives (None: all of it is local).
        self.shared = shared

    def members(self) -> tuple[object, ...]:
        """Return what this setup holds."""
        return (self.session, self.clock, self.host, self.retry_delay, self.shared)

    def same_as(self, other: AlertSetup) -> bool:
        """Return whether ``other`` holds the very same objects (identity, not equality: a
        replaced session or clock that compares equal is still a new one)."""
        return all(a is b for a, b in zip(self.members(), other.members(), strict=True))


class AccountAlerts:
    """One account's conditions, bookkeeping and delivery queues."""

    # One per account, 10,000 on a fleet node: slots instead of an instance dictionary
    # (``__dict__`` is made only for what a test patches onto one account's object).
    __slots__ = (
        "__dict__",
        "_channels",
        "_language",
        "_queues",
        "_save_failed",
        "active",
        "due",
        "manager",
        "setup",
        "store",
    )

    def __init__(
        self,
        manager: AccountManager,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Clock = utcnow,
        host: str = "",
        retry_delay: float = RETRY_DELAY,
        shared: SharedAlerts | None = None,
        setup: AlertSetup | None = None,
    ) -> None:
        """Watch ``manager``'s account with ``setup`` (the center's), or one made of the
        other arguments (without a session, only channels that send nothing over HTTP)."""
        if setup is None:
            setup = AlertSetup(
                session=cast("aiohttp.ClientSession", session),
                clock=clock,
                host=host,
                retry_delay=retry_delay,
                shared=shared,
            )
        self.manager = manager
        self.setup = setup
        self.store: StateStore = manager.store
        #: What was sent and is still active: every condition (in fleet mode the node-local
        #: records and a copy of the fleet-wide ones, refreshed at each evaluation, and the
        #: one read-only NO_RECORDS while there are none: most of a node's accounts).
        self.active: Mapping[str, dict[str, Any]] = {} if shared is None else NO_RECORDS
        #: None: built at the first alert (most accounts never send one, and a channel with
        #: its callbacks is half a KiB for each of a fleet node's 10,000 accounts).
        self._channels: list[Channel] | None = []
        #: Resolved when first needed (None: not yet): the locale is read from the
        #: environment, which a thousand accounts would each read at start for nothing.
        self._language: Language | None = None
        #: Made with the first delivery worker (most accounts never start one).
        self._queues: list[tuple[Channel, asyncio.Queue[Alert], asyncio.Task[None]]] | None = None
        self._save_failed = False
        #: When the center grades this account again with nothing changed (its heap entry).
        self.due: datetime | None = None
        self._load()
        self.configure()

    @property
    def name(self) -> str:
        """Return the account's name."""
        return self.manager.name

    @property
    def session(self) -> aiohttp.ClientSession:
        """Return the HTTP session the channels send with (the setup's)."""
        return self.setup.session

    @property
    def clock(self) -> Clock:
        """Return the clock alerts are graded and stamped with (the setup's)."""
        return self.setup.clock

    @property
    def host(self) -> str:
        """Return the host name alerts carry (the setup's)."""
        return self.setup.host

    @property
    def retry_delay(self) -> float:
        """Return the first delay before a failed delivery is retried (the setup's)."""
        return self.setup.retry_delay

    @property
    def shared(self) -> SharedAlerts | None:
        """Return the fleet's bookkeeping (the setup's; None: everything is local)."""
        return self.setup.shared

    @property
    def settings(self) -> AlertsConfig:
        """Return the account's effective [alerts] settings."""
        return self.manager.account.alerts

    def _load(self) -> None:
        document = self.store.load_alerts() or {}
        active = document.get("active")
        if isinstance(active, dict):
            self.active = {k: v for k, v in active.items() if isinstance(v, dict)}
        if self.shared is not None:
            # The store's records are the fleet's; a local file holds only this node's own
            # (one from before the fleet kept them may list others: the store wins).
            local = {k: v for k, v in self.active.items() if k in NODE_LOCAL}
            self.active = {**self.shared.records(self.name), **local} or NO_RECORDS

    def _save(self, active: dict[str, dict[str, Any]] | None = None) -> None:
        """Save ``active`` (default: every record) as the account's local bookkeeping."""
        document = {
            "version": BOOKKEEPING_VERSION,
            "account": self.name,
            "active": dict(self.active) if active is None else active,
        }
        try:
            self.store.save_alerts(document)
        except StoreError as exc:
            if not self._save_failed:
                log.error("account %s: cannot save alert bookkeeping: %s", self.name, exc)
            self._save_failed = True
        else:
            self._save_failed = False

    # ---------------------------------------------------------------- channels and workers

    def configure(self) -> None:
        """Take the account's settings: the channels are built anew from them at the next
        alert (and workers start with the first alert for their channel: most accounts
        never need one, and each costs a task)."""
        self.stop_workers()
        self._language = None
        self._channels = None

    @property
    def language(self) -> Language:
        """Return the language of the account's alerts ([alerts] language, else the locale's)."""
        if self._language is None:
            self._language = resolve_language(self.settings.language)
        return self._language

    @property
    def channels(self) -> list[Channel]:
        """Return the account's channels, building them from its settings the first time."""
        if self._channels is None:
            self._channels = build_channels(
                self.manager.account,
                self.settings,
                session=self.session,
                get_state=self._usable_state,
                get_client=self._client,
                clock=self.clock,
            )
        return self._channels

    def _queue(self, channel: Channel) -> asyncio.Queue[Alert]:
        """Return ``channel``'s delivery queue, starting its worker the first time."""
        if self._queues is None:
            self._queues = []
        for known, queue, _ in self._queues:
            if known is channel:
                return queue
        queue = asyncio.Queue()
        task = asyncio.create_task(self._worker(channel, queue))
        self._queues.append((channel, queue, task))
        return queue

    @property
    def queues(self) -> list[tuple[Channel, asyncio.Queue[Alert], asyncio.Task[None]]]:
        """Return the delivery queues started so far, with their channels and workers."""
        return self._queues or []

    def _client(self) -> KakaoClient:
        return self.manager.client

    def _usable_state(self) -> AccountState | None:
        if self.manager.status.health in WITHOUT_TOKENS:
            return None
        return self.manager.state

    def stop_workers(self) -> None:
        """Cancel the delivery workers (queued alerts are dropped, and logged)."""
        for channel, queue, task in self.queues:
            task.cancel()
            if not queue.empty():
                log.warning(
                    "account %s: %d alert(s) for %s not delivered",
                    self.name,
                    queue.qsize(),
                    channel.name,
                )
        self._queues = None
        self._channels = []  # until configure(): nothing is queued after a stop

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for queued deliveries, then stop the workers."""
        waits = [asyncio.create_task(queue.join()) for _, queue, _ in self.queues]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for task in pending:
                task.cancel()
        tasks = [task for _, _, task in self.queues]
        self.stop_workers()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _worker(self, channel: Channel, queue: asyncio.Queue[Alert]) -> None:
        while True:
            alert = await queue.get()
            try:
                await self._deliver(channel, alert)
            finally:
                queue.task_done()

    async def _deliver(self, channel: Channel, alert: Alert) -> None:
        attempts = channel.retries + 1
        for attempt in range(1, attempts + 1):
            error = await deliver_once(channel, alert)
            if error is None:
                log.debug(
                    "alert %s/%s (%s) sent via %s",
                    alert.account,
                    alert.condition,
                    alert.state,
                    channel.name,
                )
                return
            final = attempt == attempts or not error.retry
            log.warning(
                "account %s: alert %s (%s) via %s failed (attempt %d/%d): %s%s",
                alert.account,
                alert.condition,
                alert.state,
                channel.name,
                attempt,
                attempts,
                error,
                "; giving up" if final else "; retrying",
            )
            if final:
                return
            await asyncio.sleep(
                backoff_delay(attempt, initial=self.retry_delay, cap=RETRY_DELAY_MAX, rng=_RNG)
            )

    def dispatch(self, alert: Alert) -> None:
        """Log the alert now and queue it for every channel that wants it."""
        log_alert(alert)
        for channel in self.channels:
            if channel.wants(alert):
                self._queue(channel).put_nowait(alert)

    # ---------------------------------------------------------------- deciding

    def evaluate(self, now: datetime | None = None) -> list[Alert]:
        """Compare the conditions now with what was sent; send and record the differences."""
        return self.grade(now or self.clock())[0]

    def grade(self, now: datetime) -> tuple[list[Alert], datetime | None]:
        """Evaluate at ``now``; return the alerts sent, and the first moment at which grading
        again could send something while nothing about the account changes (None: never)."""
        health = self.manager.health(now, host=self.host)
        current = {c.name: c for c in health.conditions}
        if self.shared is not None:
            alerts = self._evaluate_in_fleet(self.shared, current, now)
        else:
            active = self.active
            if not isinstance(active, dict):
                active = self.active = dict(active)
            alerts, changed = self._decide(current, active, now)
            if changed:
                self._save()
        for alert in alerts:
            self.dispatch(alert)
        return alerts, self._next_grade(health, current, now)

    def _next_grade(
        self, health: AccountHealth, current: dict[str, Condition], now: datetime
    ) -> datetime | None:
        """The grading's own next moment, or a critical condition's next repeat
        (:meth:`_repeat_due`), whichever comes first."""
        moments = [health.changes_at] if health.changes_at is not None else []
        for name, record in self.active.items():
            condition = current.get(name)
            if condition is None or condition.severity is not Severity.CRITICAL:
                continue
            try:
                last = parse_time(str(record.get("last_sent_at")))
            except ValueError:
                continue  # due at once: _decide sent it now (or another node delivers it)
            moments.append(last + timedelta(seconds=self.settings.repeat))
        return first_moment(moments, now)

    def _evaluate_in_fleet(
        self, shared: SharedAlerts, current: dict[str, Condition], now: datetime
    ) -> list[Alert]:
        """Decide this node's own conditions always, the account's only where it delivers."""
        local = {k: v for k, v in self.active.items() if k in NODE_LOCAL}
        mine = {k: c for k, c in current.items() if k in NODE_LOCAL}
        alerts, changed = self._decide(mine, local, now)
        if changed:
            self._save(local)
        fleetwide = dict(shared.records(self.name))
        if shared.delivers(self.name):
            theirs = {k: c for k, c in current.items() if k not in NODE_LOCAL}
            # A node's own condition (config) can take the place of one of the account's.
            more, changed = self._decide(theirs, fleetwide, now, taking_over=_fired(alerts))
            if changed:
                shared.record(self.name, fleetwide)
            alerts += more
        self.active = {**fleetwide, **local} or NO_RECORDS
        return alerts

    def _decide(
        self,
        current: dict[str, Condition],
        active: dict[str, dict[str, Any]],
        now: datetime,
        *,
        taking_over: frozenset[str] = frozenset(),
    ) -> tuple[list[Alert], bool]:
        """Compare ``current`` with the records in ``active`` and update them; return the
        alerts to send and whether a record changed. ``taking_over``: conditions that fired
        (anew or escalated) in this grading outside ``current`` (:func:`_ended_unfixed`)."""
        alerts: list[Alert] = []
        changed = False
        for name, condition in current.items():
            record = active.get(name)
            repeat = False
            if record is not None:
                stage = record.get("stage")
                escalated = (
                    condition.stage is not None
                    and (not isinstance(stage, int | float) or condition.stage < stage)
                ) or (Severity.parse(str(record.get("severity", "info"))) < condition.severity)
                if not escalated:
                    if condition.severity is not Severity.CRITICAL or not self._repeat_due(
                        record, now
                    ):
                        continue
                    repeat = True
            alert = Alert(
                self.name,
                name,
                condition.severity,
                "firing",
                condition.message,
                condition.fix,
                now,
                host=self.host,
                repeat=repeat,
                brief=condition.brief,
                hint=condition.hint,
                language=self.language,
            )
            active[name] = {
                "severity": condition.severity.label,
                "stage": condition.stage,
                # In English for `status`; "texts" lets the resolution speak any language.
                "message": condition.message.render("en"),
                "action": condition.action.render("en"),
                "texts": {
                    "message": condition.message.to_json(),
                    "brief": (condition.brief or condition.message).to_json(),
                },
                "since": record.get("since") if record else format_time(now),
                "last_sent_at": format_time(now),
                "sent": int(record.get("sent", 0)) + 1 if record else 1,
            }
            alerts.append(alert)
            changed = True
        fired = _fired(alerts) | taking_over
        has_tokens = self.manager.state is not None
        for name in [n for n in active if n not in current]:
            record = active.pop(name)
            changed = True
            if _ended_unfixed(name, fired, has_tokens=has_tokens):
                continue
            alerts.append(resolution_alert(self.name, name, record, now, self.host, self.language))
        return alerts, changed

    def _repeat_due(self, record: dict[str, Any], now: datetime) -> bool:
        try:
            last = parse_time(str(record.get("last_sent_at")))
        except ValueError:
            return True
        return (now - last).total_seconds() >= self.settings.repeat

    def describe_active(self) -> list[dict[str, Any]]:
        """Return the active alerts as JSON-ready data."""
        return active_alerts(self.active)


def _fired(alerts: Iterable[Alert]) -> frozenset[str]:
    """Return the conditions that ``alerts`` fire anew or escalated (not repeats)."""
    return frozenset(a.condition for a in alerts if a.state == "firing" and not a.repeat)


def _ended_unfixed(name: str, fired: frozenset[str], *, has_tokens: bool) -> bool:
    """True when condition ``name`` ended without anything getting fixed, so announcing it
    resolved would be wrong: the tokens it was about are gone (logged out), or a condition
    that takes its place when things get worse (health.REPLACED_BY) fired in the same
    grading (``fired``) — the missed rotation whose refresh token has now expired."""
    if not has_tokens and name in _TOKEN_CONDITIONS:
        return True
    return not REPLACED_BY.get(name, frozenset()).isdisjoint(fired)


def resolution_alert(
    account: str,
    condition: str,
    record: dict[str, Any],
    now: datetime,
    host: str,
    language: Language,
) -> Alert:
    """Return the alert saying ``condition`` (as saved in ``record``) has cleared."""
    texts = record.get("texts")
    texts = texts if isinstance(texts, dict) else {}
    # Bookkeeping from before the texts were saved has only the English message.
    was = Message.from_json(texts.get("message")) or Message.verbatim(
        str(record.get("message", ""))
    )
    brief = Message.from_json(texts.get("brief")) or was
    try:
        severity = Severity.parse(str(record.get("severity", "info")))
    except KeyError:
        severity = Severity.INFO
    # The title says RESOLVED: the text names what in words, then what the alert said.
    name = condition_name(condition)
    return Alert(
        account,
        condition,
        severity,
        "resolved",
        N_("{condition} — earlier alert: {message}", condition=name, message=was),
        None,
        now,
        host=host,
        brief=N_("{condition} — earlier alert: {message}", condition=name, message=brief),
        language=language,
    )


# --------------------------------------------------------------------------- the center


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    """Give ``future`` its result unless it has one (or was cancelled)."""
    if not future.done():
        future.set_result(value)


class AlertCenter:
    """Every account's alerts: attach managers, evaluate on events and when they are due."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        clock: Clock = utcnow,
        host: str | None = None,
        retry_delay: float = RETRY_DELAY,
        shared: SharedAlerts | None = None,
    ) -> None:
        self.session = session
        self.clock = clock
        self.host = host or socket.gethostname()
        self.retry_delay = retry_delay
        #: Fleet mode: the store's bookkeeping and who delivers (None: everything is local).
        self.shared = shared
        self.accounts: dict[str, AccountAlerts] = {}
        #: One listener object for every account (a closure per account costs 400 bytes).
        self._listener: Callable[[AccountEvent], None] = self._on_event
        self._pending: set[str] = set()
        #: (moment, account): when each account is graded again with nothing changed (its
        #: AccountAlerts.due; an entry that no longer matches it is stale and skipped).
        self._moments: list[tuple[datetime, str]] = []
        #: Accounts to grade at the next heartbeat (new, reconfigured, or failed to grade).
        self._dirty: set[str] = set()
        #: The latest moment an account was graded at since every account was: a clock
        #: that went back behind it may have undone a threshold crossed since.
        self._latest: datetime | None = None
        #: What every attached account's alerts share (see _alert_setup).
        self._setup: AlertSetup | None = None
        #: The heap holds every planned moment before this one, none from it on (None: it
        #: holds them all, until the first heartbeat); it only moves forward.
        self._horizon: datetime | None = None
        #: While run_periodic sleeps: the future that ends its sleep (True: for a beat, False:
        #: to work out its sleep again) and the wall-clock moment its timer ends it at.
        self._waker: asyncio.Future[bool] | None = None
        self._wakes_at: datetime | None = None

    def _alert_setup(self) -> AlertSetup:
        """Return the setup every account's alerts share, made anew when this center's
        session, clock, host, retry delay or fleet bookkeeping was replaced."""
        wanted = AlertSetup(
            session=self.session,
            clock=self.clock,
            host=self.host,
            retry_delay=self.retry_delay,
            shared=self.shared,
        )
        setup = self._setup
        if setup is None or not setup.same_as(wanted):
            setup = self._setup = wanted
        return setup

    def attach(self, manager: AccountManager) -> AccountAlerts:
        """Start watching ``manager`` (replacing an earlier manager of the same account)."""
        old = self.accounts.pop(manager.name, None)
        if old is not None:
            self._unlisten(old)
            old.stop_workers()
        alerts = AccountAlerts(manager, setup=self._alert_setup())
        self.accounts[manager.name] = alerts
        manager.listen(self._listener)
        self._dirty.add(manager.name)
        self.wake()  # graded at the next beat, fitted to the accounts now known
        return alerts

    def _on_event(self, event: AccountEvent) -> None:
        self._schedule(event.account)

    def _unlisten(self, alerts: AccountAlerts) -> None:
        alerts.manager.unlisten(self._listener)

    async def detach(self, name: str) -> None:
        """Stop watching an account (removed by a reload); deliver what is queued first."""
        alerts = self.accounts.pop(name, None)
        if alerts is not None:
            self._unlisten(alerts)
            await alerts.drain(CLOSE_GRACE)

    def reconfigure(self, name: str) -> None:
        """Rebuild an account's channels after a reload changed its settings."""
        alerts = self.accounts.get(name)
        if alerts is not None:
            alerts.store = alerts.manager.store
            alerts.configure()
            self._dirty.add(name)  # new thresholds, repeat, policy: graded at the heartbeat

    def _schedule(self, name: str) -> None:
        """Evaluate soon, after the refresh step that emitted the event has finished."""
        if name in self._pending:
            return
        self._pending.add(name)
        asyncio.get_running_loop().call_soon(self._evaluate_scheduled, name)

    def _evaluate_scheduled(self, name: str) -> None:
        self._pending.discard(name)
        self.evaluate(name)

    def evaluate(self, name: str | None = None) -> list[Alert]:
        """Evaluate one account (or all); never raises."""
        if name is None:
            self._dirty.clear()
            self._latest = None  # every account is graded at this moment
            return self._grade_all(list(self.accounts.values()), self.clock())
        alerts = self.accounts.get(name)
        return [] if alerts is None else self._grade_all([alerts], self.clock())

    def beat(self) -> list[Alert]:
        """The heartbeat: evaluate the accounts that are due or changed; never raises.

        Due: the moment their last grading named has come (the wall clock, so a suspend or
        a clock stepped forward makes them due at once). Changed: attached or reconfigured
        since, or named by the fleet's bookkeeping. A wall clock that went back behind the
        latest grading evaluates every account, as a threshold crossed may be undone.
        """
        now = self.clock()
        if self._latest is not None and now < self._latest:
            log.info(
                "the clock went back %s: evaluating every account's alerts", self._latest - now
            )
            return self.evaluate()
        names, self._dirty = self._dirty, set()
        if self.shared is not None:
            try:
                changed = self.shared.changed()
            except Exception:
                log.exception("reading the fleet's alert changes failed")
                changed = None
            if changed is None:
                return self.evaluate()
            names |= changed
        self._advance_horizon(now)
        moments = self._moments
        while moments and moments[0][0] <= now:
            when, name = heapq.heappop(moments)
            alerts = self.accounts.get(name)
            if alerts is not None and alerts.due == when:
                alerts.due = None
                names.add(name)
        return self._grade_all([a for n in names if (a := self.accounts.get(n)) is not None], now)

    def _grade_all(self, accounts: list[AccountAlerts], now: datetime) -> list[Alert]:
        """Grade ``accounts`` at ``now`` and plan each one's next grading; never raises."""
        sent: list[Alert] = []
        for alerts in accounts:
            try:
                more, due = alerts.grade(now)
            except Exception:
                log.exception("account %s: evaluating alerts failed", alerts.name)
                self._dirty.add(alerts.name)  # again at the next heartbeat
                continue
            sent += more
            self._plan(alerts, due)
        if accounts and (self._latest is None or now > self._latest):
            self._latest = now
        return sent

    def _plan(self, alerts: AccountAlerts, due: datetime | None) -> None:
        """Grade ``alerts`` again at ``due`` (None: only when something changes)."""
        if due == alerts.due:
            return
        alerts.due = due
        if due is None:
            return  # its heap entry, if any, is stale now
        if self._horizon is not None and due >= self._horizon:
            return  # beyond the horizon: _advance_horizon puts it on the heap in time
        heapq.heappush(self._moments, (due, alerts.name))
        if self._wakes_at is not None and due < self._wakes_at:
            self.wake()  # planned while the loop sleeps past it (an event's grading)
        if len(self._moments) > 2 * len(self.accounts) + 64:
            # Re-planning leaves stale entries behind; drop them before they add up.
            self._moments = [
                (when, name)
                for when, name in self._moments
                if (a := self.accounts.get(name)) is not None and a.due == when
            ]
            heapq.heapify(self._moments)

    def _advance_horizon(self, now: datetime) -> None:
        """Move the horizon to ``now`` + MOMENT_HORIZON once half of it has passed, and put
        on the heap every moment it now covers and the old one did not (before a heartbeat
        pops what is due: a clock stepped far forward makes those due at once)."""
        old = self._horizon
        if old is not None and now + MOMENT_HORIZON / 2 < old:
            return
        horizon = now + MOMENT_HORIZON
        if old is not None and horizon <= old:
            return  # it never moves back (a wall clock that went back)
        self._horizon = horizon
        if old is None:
            return  # the heap holds every moment planned so far
        for alerts in self.accounts.values():
            due = alerts.due
            if due is not None and old <= due < horizon:
                heapq.heappush(self._moments, (due, alerts.name))

    async def run_periodic(self, interval: Callable[[], float]) -> None:
        """Every ``interval()`` seconds (the refresh heartbeat), evaluate what is due — and at
        the first moment a grading named, when that comes sooner.

        The beat is at most 1/8 of a short token's life but 1/360 of a 6-hour one's (60 s):
        graded only at beats, a 6-second token's `access_expiring` page came up to 0.75 s
        late, after the expiry, where a 6-hour token's is at most a minute late. Waiting for
        the moment itself keeps the page's lead the same share of the life at every scale.

        The sleep is worked out again (:meth:`wake`) when what it was worked out from
        changed while it lasts: a moment planned sooner than it ends (an event's grading), or
        a beat that may be shorter (the scheduler started, accounts attached, a reload). A
        daemon's first sleep began before its accounts were taken up, with the unfitted 60 s:
        for that first minute, alerts were graded only when a refresh happened to come.
        """
        loop = asyncio.get_running_loop()
        while True:
            delay = self._until_due(interval())
            waker: asyncio.Future[bool] = loop.create_future()
            timer = loop.call_later(delay, _settle, waker, True)
            self._waker, self._wakes_at = waker, self.clock() + timedelta(seconds=delay)
            try:
                beat = await waker
            finally:
                timer.cancel()
                self._waker = self._wakes_at = None
            if beat:
                self.beat()

    def wake(self) -> None:
        """Have run_periodic work out its sleep again (no grading by itself): the next
        grading may be due sooner than its sleep ends. Does nothing while it does not sleep."""
        if self._waker is not None:
            _settle(self._waker, False)

    def _until_due(self, beat: float) -> float:
        """Return how long to sleep: ``beat``, or until the earliest moment on the heap."""
        if not self._moments:
            return beat
        ahead = (self._moments[0][0] - self.clock()).total_seconds()
        # Never a busy loop: a moment the beat did not take (a fleet's re-grading of every
        # account takes none) is taken by the next one, a millisecond later at the soonest.
        return min(beat, max(ahead, MOMENT_FLOOR))

    async def wait_delivered(self, timeout: float) -> bool:
        """Wait until every queued alert was delivered or given up; False on timeout."""
        joins = [
            asyncio.create_task(queue.join())
            for alerts in self.accounts.values()
            for _, queue, _ in alerts.queues
        ]
        if not joins:
            return True
        _, pending = await asyncio.wait(joins, timeout=timeout)
        for task in pending:
            task.cancel()
        return not pending

    def active(self, name: str) -> list[dict[str, Any]]:
        """Return the active alerts of one account (empty if unknown)."""
        alerts = self.accounts.get(name)
        return alerts.describe_active() if alerts is not None else []

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Deliver what is queued (up to ``grace`` seconds), then stop every worker."""
        await asyncio.gather(*(a.drain(grace) for a in self.accounts.values()))
        for alerts in self.accounts.values():
            self._unlisten(alerts)
        self.accounts.clear()


# --------------------------------------------------------------------------- `alerts test`


def test_alert(
    account: str,
    *,
    host: str | None = None,
    now: datetime | None = None,
    language: Language = "en",
) -> Alert:
    """Return the alert `kakao-tokend alerts test` sends."""
    return Alert(
        account,
        "test",
        Severity.INFO,
        "firing",
        N_("test alert: this channel works"),
        N_("nothing to do"),
        now or utcnow(),
        host=host or socket.gethostname(),
        test=True,
        language=language,
    )


async def send_test(
    account: AccountConfig,
    *,
    session: aiohttp.ClientSession,
    state: AccountState | None,
    client: KakaoClient,
) -> list[tuple[str, str | None, bool]]:
    """Send a test alert through every channel of ``account``.

    Returns (channel name, failure reason or None, skipped) per channel, the log first.
    """
    alert = test_alert(account.name, language=resolve_language(account.alerts.language))
    log_alert(alert)
    results: list[tuple[str, str | None, bool]] = [("log", None, False)]
    channels = build_channels(
        account, account.alerts, session=session, get_state=lambda: state, get_client=lambda: client
    )
    sends: list[Awaitable[ChannelError | None]] = []
    used: list[Channel] = []
    for channel in channels:
        if isinstance(channel, KakaoTalkChannel) and not channel.enabled():
            results.append(
                (
                    channel.name,
                    'off: the token has no talk_message consent (kakaotalk = "auto")',
                    True,
                )
            )
            continue
        used.append(channel)
        sends.append(deliver_once(channel, alert))
    for channel, error in zip(used, await asyncio.gather(*sends), strict=True):
        results.append((channel.name, None if error is None else str(error), False))
    return results
