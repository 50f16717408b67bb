"""Why a person must log in again: the causes of a refused refresh token and every text about them.

Kakao answers KOE322 ("expired_or_invalid_refresh_token") for a refresh token that expired,
was retired by a rotation, or was revoked (the user unlinked the app or logged out, or the
Kakao account changed: password, dormancy, deletion). The answer does not say which, but the
fix and the lesson differ, so :func:`classify` works it out from what we know, and
:data:`CAUSES` holds, in one place, the log line, the reason saved in the state file, the
alert text and the fix for each cause (for translations and the health model too).
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from .i18n import N_, Message
from .tokens import (
    TokenSet,
    format_local_time,
    format_time,
    in_rotation_window,
    refresh_safety_margin,
)


class Named(Protocol):
    """An account as the command line names it (config.AccountConfig satisfies this)."""

    @property
    def name(self) -> str: ...

    @property
    def cli_options(self) -> tuple[str, ...]: ...


def command_line(options: Sequence[str], *words: str) -> str:
    """Return `kakao-tokend OPTIONS WORDS`, quoted for a shell: the one way a hint's command
    is written (global options first: `kakao-tokend login --account x` fails)."""
    return shlex.join(["kakao-tokend", *options, *words])


def cli_command(account: Named, *words: str) -> str:
    """Return the exact `kakao-tokend ... WORDS` command line a person runs for ``account``.

    The global options go before the command (`kakao-tokend login --account x` fails): the
    account's ``cli_options`` are ``--config FILE`` when the configuration is not the file a
    plain `kakao-tokend` finds, and ``--account NAME`` when it is not the default account.
    """
    return command_line(account.cli_options, *words)


def config_command(account: Named, *words: str) -> str:
    """Return the `kakao-tokend ... WORDS` command for the whole configuration ``account`` is
    in (`reload`, `check-config`): its ``--config`` when needed, never its ``--account``."""
    options = list(account.cli_options)
    if "--account" in options:
        at = options.index("--account")
        del options[at : at + 2]
    return command_line(options, *words)


def new_account_command(account: Named, *words: str) -> str:
    """Return the `kakao-tokend ... --account NEW WORDS` command for an account not configured
    yet, with the ``--config`` that ``account``'s configuration needs."""
    return config_command(account, "--account", "NEW", *words)


def login_command(account: Named) -> str:
    """Return the exact command that fixes a dead token set for ``account`` (one home)."""
    return cli_command(account, "login")


class ReloginCause(enum.StrEnum):
    """Why Kakao refused the refresh token (saved in the state file as its value)."""

    #: Its expiry passed by our clock (kakao-tokend was stopped, or failing, for too long).
    EXPIRED = "expired"
    #: An earlier attempt may have reached Kakao, which rotated the token; the answer was lost.
    ROTATED_LOST = "rotated_lost"
    #: It should still be alive and nothing was ambiguous: Kakao revoked the tokens.
    REVOKED = "revoked"
    #: None of the above fits (e.g. our access token is still accepted).
    UNKNOWN = "unknown"


class AccessCheck(enum.StrEnum):
    """What access_token_info said about the access token after the refusal."""

    REJECTED = "rejected"  # -401 (token gone) or -101/-103: Kakao dropped the whole grant
    VALID = "valid"  # Kakao still accepts the access token
    NOT_ASKED = "not_asked"  # expired by our clock, or Kakao could not answer


@dataclass(frozen=True)
class CauseTexts:
    """Every text about one cause; ``{placeholders}`` are filled by :func:`render`.

    The alert and the fix are translatable (``N_``: Korean in ``locale/ko``); the log line and
    the saved reason stay English, so journalctl recipes and `status` read the same anywhere.

    Placeholders: ``account``, ``login`` (the exact command), ``code`` (Kakao's code),
    ``fingerprint`` (of the refused refresh token), ``expiry`` (its expiry, RFC 3339).
    """

    #: The one critical log line (journalctl -p crit shows it).
    log: str
    #: Saved in the state file as ``relogin_reason`` (shown by `status`), before "; run ...".
    reason: str
    #: The alert's message.
    alert: Message
    #: What to do; alerts add the ssh port-forward hint for remote servers.
    fix: Message
    #: The alert's condition in brief, for a KakaoTalk memo: the fix line already says to
    #: log in, so this says only why (alerts.Alert.memo's budget).
    brief: Message


CAUSES: dict[ReloginCause, CauseTexts] = {
    ReloginCause.EXPIRED: CauseTexts(
        log="account {account} needs a new login: the refresh token {fingerprint} expired at"
        " {expiry} before it could be renewed (kakao-tokend was stopped, or could not refresh,"
        " for too long; Kakao answered {code}); stopped refreshing it — run `{login}`",
        reason="refresh token expired at {expiry} ({code})",
        alert=N_(
            "the refresh token expired at {expiry} before it could be renewed; a new login"
            " is needed"
        ),
        fix=N_("run `{command}`"),
        brief=N_("the refresh token expired"),
    ),
    ReloginCause.ROTATED_LOST: CauseTexts(
        log="account {account} needs a new login: the refresh response was lost after Kakao"
        " rotated the refresh token ({fingerprint} presented, now rejected as {code});"
        " stopped refreshing it — run `{login}`",
        reason="refresh response lost after rotation ({code})",
        alert=N_(
            "an earlier refresh reached Kakao, which rotated the refresh token, but its"
            " answer was lost; a new login is needed"
        ),
        fix=N_("run `{command}`"),
        brief=N_("Kakao's answer with the new token was lost"),
    ),
    ReloginCause.REVOKED: CauseTexts(
        log="account {account} needs a new login: Kakao revoked the tokens ({code} for refresh"
        " token {fingerprint}, which should be valid until {expiry}): the user unlinked the"
        " app or logged out, or the Kakao account changed; stopped refreshing it — run"
        " `{login}`",
        reason="tokens revoked at Kakao ({code}: app unlinked, logout or account change)",
        alert=N_(
            "Kakao revoked the tokens (the app was unlinked, the user logged out, or the"
            " Kakao account changed); a new login is needed"
        ),
        fix=N_("run `{command}` and agree to the app again"),
        brief=N_("Kakao revoked the tokens"),
    ),
    ReloginCause.UNKNOWN: CauseTexts(
        log="account {account} needs a new login: Kakao refused the refresh token {fingerprint}"
        " ({code}) for an unknown reason although it is valid until {expiry} (is another"
        " program using the same refresh token, or was an old copy of the state file"
        " restored?); stopped refreshing it — run `{login}`",
        reason="Kakao refused the refresh token ({code}) for an unknown reason",
        alert=N_(
            "Kakao refused the refresh token ({code}) for an unknown reason (another program"
            " using the same token, or an old state file restored?); a new login is needed"
        ),
        fix=N_("run `{command}`"),
        brief=N_("Kakao refused the refresh token ({code})"),
    ),
}


@dataclass(frozen=True)
class RenderedCause:
    """The texts of one cause with every placeholder filled in."""

    cause: ReloginCause
    log: str
    reason: str
    alert: Message
    fix: Message
    brief: Message


def render(
    cause: ReloginCause,
    *,
    account: str,
    login: str,
    code: str = "KOE322",
    fingerprint: str = "-",
    expiry: datetime | None = None,
) -> RenderedCause:
    """Fill in the texts of ``cause`` for one account; ``login`` is its login_command()."""
    values = {
        "account": account,
        "login": login,
        "command": login,
        "code": code,
        "fingerprint": fingerprint,
        "expiry": format_time(expiry) if expiry is not None else "an unknown time",
    }
    # A person reads the alert in the local time zone (and language); logs and files keep
    # UTC and English.
    localised: dict[str, str | Message] = {
        **values,
        "expiry": format_local_time(expiry) if expiry is not None else N_("an unknown time"),
    }
    texts = CAUSES[cause]
    return RenderedCause(
        cause,
        log=texts.log.format(**values),
        reason=texts.reason.format(**values),
        alert=Message(texts.alert.msgid, tuple(localised.items())),
        fix=Message(texts.fix.msgid, tuple(localised.items())),
        brief=Message(texts.brief.msgid, tuple(localised.items())),
    )


def classify(
    tokens: TokenSet,
    now: datetime,
    *,
    ambiguous_before: bool,
    rotation_window: timedelta,
    access: AccessCheck,
) -> ReloginCause:
    """Tell why Kakao refused ``tokens``' refresh token at ``now``.

    In this order: expired by our clock (within the safety margin of its expiry); an earlier
    ambiguous attempt while Kakao would rotate (less than ``rotation_window`` left, or an
    expiry that is only estimated) means the rotation's answer was lost; Kakao rejecting the
    access token too means the grant was revoked, and so does no evidence at all (the token
    should be alive and nothing was ambiguous); an access token Kakao still accepts, or an
    ambiguity that cannot explain it, leaves the cause unknown.
    """
    if tokens.refresh_remaining(now) <= refresh_safety_margin(tokens):
        return ReloginCause.EXPIRED
    rotation_possible = tokens.refresh_expiry_estimated or in_rotation_window(
        tokens, now, window=rotation_window
    )
    if ambiguous_before and rotation_possible:
        return ReloginCause.ROTATED_LOST
    if access is AccessCheck.REJECTED:
        return ReloginCause.REVOKED
    if access is AccessCheck.NOT_ASKED and not ambiguous_before:
        return ReloginCause.REVOKED
    return ReloginCause.UNKNOWN


def parse_cause(value: str | None) -> ReloginCause | None:
    """Return the cause saved in a state file, or None (absent, or from a newer version)."""
    if value is None:
        return None
    try:
        return ReloginCause(value)
    except ValueError:
        return None
