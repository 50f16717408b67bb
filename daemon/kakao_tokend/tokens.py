"""Token set value object, Kakao response parsing/merging, and the pure timing rules.

Everything here is pure: time comes in as arguments (see :data:`Clock`), so the rules can be
tested without a scheduler, and a 6-second token behaves like a 6-hour one. Kakao's lifetimes
and its rotation rule, which the merge follows: docs/kakao.md.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime."""

#: Longest lifetime we accept from Kakao (10 years); larger values are garbage and would
#: overflow datetime arithmetic. Real ones are 6 h (access) and 60 d (refresh).
MAX_LIFETIME = 10 * 366 * 86400

# Fields of Kakao's token response that we interpret; everything else is kept verbatim.
_KNOWN_FIELDS = frozenset(
    {
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "refresh_token_expires_in",
        "scope",
        "id_token",
    }
)


def utcnow() -> datetime:
    """Return the current wall-clock time as an aware UTC datetime."""
    return datetime.now(UTC)


def fingerprint(token: str | None) -> str:
    """Return a short, non-reversible name for a token, safe for logs (``sha256:1a2b3c4d``)."""
    if not token:
        return "none"
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:8]


def format_time(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with a ``Z`` suffix, to the second."""
    if moment.tzinfo is None:
        # A naive time would silently be read as local time; refuse it instead.
        raise ValueError("cannot format a datetime without a time zone")
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def format_local_time(moment: datetime) -> str:
    """Format an aware datetime for people: local wall-clock time and the zone's name.

    ``2026-12-02 11:10:10 KST`` under TZ=Asia/Seoul; the zone follows $TZ or the system's
    setting. Files and JSON use :func:`format_time` (UTC) instead.
    """
    if moment.tzinfo is None:
        raise ValueError("cannot format a datetime without a time zone")
    local = moment.astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S ") + (local.strftime("%Z") or local.strftime("%z"))


#: The times a token's moments may lie between: anything else is damage (year one, 9999),
#: and date arithmetic on it would overflow far from where it was read.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9000, 1, 1, tzinfo=UTC)


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime; raise ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected an RFC 3339 timestamp string, got {type(text).__name__}")
    try:
        # Python 3.11 reads a "Z" itself: what we write, five times per account at start.
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))  # what it cannot read
    if moment.tzinfo is not UTC:  # what we write ("...Z") is UTC already
        if moment.tzinfo is None:
            raise ValueError(f"timestamp {text!r} has no time zone")
        try:
            moment = moment.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+05:00 has no UTC equivalent
            raise ValueError(f"timestamp {text!r} is out of range") from None
    if not EARLIEST_TIME <= moment < LATEST_TIME:
        raise ValueError(f"timestamp {text!r} is out of range")
    return moment


def format_duration(seconds: float) -> str:
    """Render a duration compactly for humans: ``41d``, ``4h12m``, ``3m05s``, ``-12s``."""
    sign = "-" if seconds < 0 else ""
    total = int(abs(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days >= 2:
        text = f"{days}d"
    elif days:
        text = f"{days}d{hours}h"
    elif hours:
        text = f"{hours}h{minutes:02d}m"
    elif minutes:
        text = f"{minutes}m{secs:02d}s"
    elif total == 0 and seconds:
        # A retry a fraction of a second away (seconds-long tokens) is not "0s".
        text = f"{abs(seconds):.1f}s"
    else:
        text = f"{secs}s"
    return sign + text


class TokenResponseError(ValueError):
    """Kakao's token response lacks a field we need or has one of the wrong type."""


class PartialTokenResponse(TokenResponseError):
    """A refresh answer with a usable new refresh token but an unusable access part.

    ``salvaged`` is the token set with the new refresh token (and its expiry) and the old
    access token: the old refresh token is dead now, so this set must be saved at once.
    """

    def __init__(self, message: str, salvaged: TokenSet) -> None:
        super().__init__(message)
        self.salvaged = salvaged


def _lifetime(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, str):
        # Kakao sends numbers, but a gateway that re-encodes JSON may send "21599": a plain
        # count of seconds is unambiguous, and refusing it would refuse a working token set.
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 12:
            value = int(text)
    # bool is an int subclass; "true" is never a lifetime. NaN/inf/huge values would crash
    # datetime arithmetic (NaN fails both comparisons), and 0.5 s rounds to a zero lifetime.
    # Compare before any float conversion: json.loads gives ints of any size.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 1 <= value <= MAX_LIFETIME
    ):
        raise TokenResponseError(
            f"token response field {name!r} must be a number of seconds"
            f" between 1 and {MAX_LIFETIME}"
        )
    return int(value)


def _token_string(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise TokenResponseError(f"token response field {name!r} must be a non-empty string")
    return value


def _token_type(body: Mapping[str, Any], default: str) -> str:
    value = body.get("token_type")
    return value if isinstance(value, str) and value else default


def _time_field(data: Mapping[str, Any], name: str) -> datetime:
    if name not in data:
        raise ValueError(f"field {name!r} is missing")
    try:
        return parse_time(data[name])
    except ValueError:
        # Do not echo the value: a mixed-up file could hold a token here.
        raise ValueError(f"field {name!r} is not an RFC 3339 timestamp with a zone") from None


@dataclass(frozen=True, slots=True)  # one per account, kept for the daemon's life
class TokenSet:
    """One account's tokens with absolute expiries; secrets are hidden from ``repr``."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_expires_at: datetime
    refresh_expires_at: datetime
    #: When the request that produced the current access token was sent.
    access_issued_at: datetime
    #: When the current refresh token was issued (None if unknown, e.g. after `import`).
    refresh_issued_at: datetime | None = None
    #: True when the refresh expiry is a guess (imported from a file with durations only).
    refresh_expiry_estimated: bool = False
    token_type: str = "bearer"
    scope: str | None = None
    id_token: str | None = field(default=None, repr=False)
    #: Response fields we do not interpret, kept verbatim.
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (
            self.access_expires_at.tzinfo is None
            or self.refresh_expires_at.tzinfo is None
            or self.access_issued_at.tzinfo is None
        ):
            for name in ("access_expires_at", "refresh_expires_at", "access_issued_at"):
                if getattr(self, name).tzinfo is None:
                    raise ValueError(f"{name} must be timezone-aware")

    @property
    def access_fingerprint(self) -> str:
        """Return the log-safe fingerprint of the access token."""
        return fingerprint(self.access_token)

    @property
    def refresh_fingerprint(self) -> str:
        """Return the log-safe fingerprint of the refresh token."""
        return fingerprint(self.refresh_token)

    @property
    def access_lifetime(self) -> timedelta:
        """Return the access token's full lifetime (expiry minus issue time)."""
        return self.access_expires_at - self.access_issued_at

    def access_remaining(self, now: datetime) -> timedelta:
        """Return how long the access token stays valid after ``now`` (negative if expired):
        never more than its whole lifetime, also when the wall clock stepped back to before
        its issue (Kakao counts the lifetime on its own clock, so that much is all it has)."""
        return min(self.access_expires_at - now, self.access_lifetime)

    def refresh_remaining(self, now: datetime) -> timedelta:
        """Return how long the refresh token stays valid after ``now`` (negative if expired)."""
        return self.refresh_expires_at - now

    @classmethod
    def from_token_response(cls, body: Mapping[str, Any], *, requested_at: datetime) -> TokenSet:
        """Build a token set from an ``authorization_code`` grant response.

        Expiries count from ``requested_at`` (when the request was sent), never from when the
        answer arrived, so a slow answer can only make us refresh early, not late.

        Kakao documents ``refresh_token_expires_in`` with every login answer, but an answer
        without a usable one still carries a working refresh token: refusing it would throw
        a good login away. Its expiry is then estimated as Kakao's documented life
        (:data:`KAKAO_REFRESH_LIFETIME`) and marked estimated, as a rotation's without an
        expiry is (:meth:`merge_refresh`), until a rotation brings Kakao's own.
        """
        if not isinstance(body, Mapping):
            raise TokenResponseError("token response is not a JSON object")
        access_token = _token_string(body, "access_token")
        refresh_token = _token_string(body, "refresh_token")
        expires_in = _lifetime(body, "expires_in")
        estimated = False
        try:
            refresh_expires_in: float = _lifetime(body, "refresh_token_expires_in")
        except TokenResponseError:
            refresh_expires_in, estimated = KAKAO_REFRESH_LIFETIME, True
        return cls(
            access_token=access_token,
            refresh_token=refresh_token,
            access_expires_at=requested_at + timedelta(seconds=expires_in),
            refresh_expires_at=requested_at + timedelta(seconds=refresh_expires_in),
            access_issued_at=requested_at,
            refresh_issued_at=requested_at,
            refresh_expiry_estimated=estimated,
            token_type=_token_type(body, "bearer"),
            scope=body["scope"] if isinstance(body.get("scope"), str) else None,
            id_token=body["id_token"] if isinstance(body.get("id_token"), str) else None,
            extra={k: v for k, v in body.items() if k not in _KNOWN_FIELDS},
        )

    def merge_refresh(
        self,
        body: Mapping[str, Any],
        *,
        requested_at: datetime,
        rotation_window: timedelta | None = None,
    ) -> tuple[TokenSet, bool]:
        """Apply a ``refresh_token`` grant response by Kakao's rules; return (new set, rotated).

        A new access token comes every time. ``refresh_token`` (with its expiry) arrives only on
        rotation; otherwise the old refresh token and its old expiry stay. ``scope`` and
        ``id_token`` are kept when the response leaves them out. The current refresh token
        echoed back is not a rotation, and an empty one is none. A new refresh token without a
        usable expiry is still taken (the old one may be dead), its expiry estimated as the
        full life the previous one was issued with (the old expiry when that is unknown).

        ``rotation_window``: the window in which Kakao rotates (fitted to this refresh token).
        An answer without a rotation then also says something of the old expiry: Kakao kept
        a refresh token that lives at least that long. An expiry that says less and is only a
        guess, or that has already passed by our clock (stamped while the clock was behind,
        then stepped forward: a board without a real-time clock before NTP), is wrong: it is
        re-based to the request time plus the window (at most the token's life), marked
        estimated. The issue time moves with it, so the life (and the window fitted to it)
        stays. An expiry we know and that has not passed stays: a refresh without the
        rotation it promised is a missed rotation, said by the caller.

        The refresh part is read first: when it holds a new refresh token but the access part
        is unusable, :class:`PartialTokenResponse` carries the salvaged set (new refresh token,
        old access token) so the caller can save it before anything else.
        """
        if not isinstance(body, Mapping):
            raise TokenResponseError("token response is not a JSON object")
        changes: dict[str, Any] = {}
        rotated = False
        # An empty string, like null, carries no new refresh token.
        if body.get("refresh_token") not in (None, ""):
            new_refresh = _token_string(body, "refresh_token")
            rotated = new_refresh != self.refresh_token
            changes["refresh_token"] = new_refresh
            if rotated:
                changes["refresh_issued_at"] = requested_at
            try:
                refresh_expires_in = _lifetime(body, "refresh_token_expires_in")
            except TokenResponseError:
                # The old refresh token may already be dead, so a new one must never be
                # dropped over a bad expiry. Kakao gives every new refresh token a full life:
                # estimate it as the life the previous one was issued with. Keeping the dying
                # token's expiry instead made a healthy account look unrenewed (alerts) and
                # every later refresh a missed rotation. Unknown (an import): keep the old one.
                if rotated:
                    changes["refresh_expiry_estimated"] = True
                    issued = self.refresh_issued_at
                    if issued is not None and self.refresh_expires_at > issued:
                        life = self.refresh_expires_at - issued
                        changes["refresh_expires_at"] = requested_at + life
            else:
                changes["refresh_expires_at"] = requested_at + timedelta(seconds=refresh_expires_in)
                changes["refresh_expiry_estimated"] = False
        if not rotated and "refresh_expires_at" not in changes and rotation_window is not None:
            changes.update(self._proven_alive(requested_at, rotation_window))
        try:
            access_token = _token_string(body, "access_token")
            expires_in = _lifetime(body, "expires_in")
        except TokenResponseError as exc:
            if rotated:
                raise PartialTokenResponse(str(exc), replace(self, **changes)) from None
            raise
        changes.update(
            access_token=access_token,
            access_expires_at=requested_at + timedelta(seconds=expires_in),
            access_issued_at=requested_at,
            token_type=_token_type(body, self.token_type),
            extra={**self.extra, **{k: v for k, v in body.items() if k not in _KNOWN_FIELDS}},
        )
        if isinstance(body.get("scope"), str):
            changes["scope"] = body["scope"]
        if isinstance(body.get("id_token"), str):
            changes["id_token"] = body["id_token"]
        return replace(self, **changes), rotated

    def _proven_alive(self, requested_at: datetime, window: timedelta) -> dict[str, Any]:
        """The changes a refresh Kakao answered without rotating makes to the refresh expiry
        (see :meth:`merge_refresh`): none while our expiry may be right."""
        life = refresh_lifetime(self)
        if life is not None:
            window = min(window, timedelta(seconds=life))
        proven = requested_at + window
        expires = self.refresh_expires_at
        if expires >= proven or not (self.refresh_expiry_estimated or expires <= requested_at):
            return {}
        changes: dict[str, Any] = {"refresh_expires_at": proven, "refresh_expiry_estimated": True}
        if self.refresh_issued_at is not None:
            changes["refresh_issued_at"] = self.refresh_issued_at + (proven - expires)
        return changes

    def to_dict(self) -> dict[str, Any]:
        """Serialise everything (secrets included) for the private state file."""
        return {
            "token_type": self.token_type,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "access_expires_at": format_time(self.access_expires_at),
            "refresh_expires_at": format_time(self.refresh_expires_at),
            "access_issued_at": format_time(self.access_issued_at),
            "refresh_issued_at": (
                format_time(self.refresh_issued_at) if self.refresh_issued_at else None
            ),
            "refresh_expiry_estimated": self.refresh_expiry_estimated,
            "scope": self.scope,
            "id_token": self.id_token,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet:
        """Rebuild a token set written by :meth:`to_dict`; raise ValueError when malformed."""
        # type(...) is dict first: what json.loads gives, without the ABC's isinstance check.
        if type(data) is not dict and not isinstance(data, Mapping):
            raise ValueError("tokens must be a JSON object")
        extra = data.get("extra")
        if extra is None:
            extra = {}
        if type(extra) is not dict and not isinstance(extra, Mapping):
            raise ValueError("field 'extra' must be an object")
        for name in ("access_token", "refresh_token"):
            if name not in data:
                raise ValueError(f"field {name!r} is missing")
            if not isinstance(data[name], str) or not data[name]:
                raise ValueError(f"field {name!r} must be a non-empty string")
        for name in ("scope", "id_token", "token_type"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"field {name!r} must be a string")
        estimated = data.get("refresh_expiry_estimated", False)
        if not isinstance(estimated, bool):
            raise ValueError("field 'refresh_expiry_estimated' must be true or false")
        # Positional, in the fields' order: a start builds one per account, and keywords
        # cost a frozen dataclass a quarter more (docs/benchmarks.md).
        return cls(
            data["access_token"],
            data["refresh_token"],
            _time_field(data, "access_expires_at"),
            _time_field(data, "refresh_expires_at"),
            _time_field(data, "access_issued_at"),
            (
                None
                if data.get("refresh_issued_at") is None
                else _time_field(data, "refresh_issued_at")
            ),
            estimated,
            data.get("token_type") or "bearer",
            data.get("scope"),
            data.get("id_token"),
            dict(extra),
        )


# ---------------------------------------------------------------------------------------------
# Timing rules. All are relative to the access token's lifetime, so tests with second-long
# tokens exercise exactly the code paths a six-hour token does.

#: The refresh token's safety margin, as a share of the access token's lifetime: no wait ends
#: later than this before the refresh token dies (3.6 minutes for a 6-hour access token), so
#: clock skew and the request's own time still leave an attempt that reaches Kakao in time.
REFRESH_SAFETY_SHARE = 0.01
#: How far a token's issue time may lie in the future, as a share of its lifetime, before we
#: decide the wall clock was stepped back (3.6 minutes for a 6-hour token).
CLOCK_STEP_SHARE = 0.01


def refresh_safety_margin(tokens: TokenSet) -> timedelta:
    """Return how long before the refresh token's expiry every wait must have ended."""
    return tokens.access_lifetime * REFRESH_SAFETY_SHARE


def refresh_deadline(tokens: TokenSet) -> datetime:
    """Return the last moment a wait may end: the refresh token's expiry minus the margin."""
    return tokens.refresh_expires_at - refresh_safety_margin(tokens)


def issued_in_the_future(tokens: TokenSet, now: datetime) -> bool:
    """Return True when the access token claims an issue time clearly after ``now``.

    Our own clock stamped that time, so the wall clock must have been stepped back since
    (kubelet's rule); every absolute time we planned by is then that much too far away.
    """
    return tokens.access_issued_at - now > tokens.access_lifetime * CLOCK_STEP_SHARE


def refresh_due_at(
    tokens: TokenSet, *, share: float = 0.75, jitter: float = 0.05, rng: random.Random | None = None
) -> datetime:
    """Return when to refresh: ``share`` of the access lifetime after issue, ± ``jitter``.

    The result always lies strictly inside the lifetime (between 5 % and 95 % of it), whatever
    the settings, so a refresh is never planned at or after expiry. A refresh token that dies
    before that moment moves the refresh to :func:`roomy_refresh_deadline`, or, for an access
    token issued after that, to :func:`refresh_deadline` (once each: an access token issued
    after both is planned normally, so a refresh that did not rotate a nearly-dead refresh
    token cannot loop).
    """
    rng = rng or random.Random()
    lifetime = tokens.access_lifetime.total_seconds()
    fraction = share + rng.uniform(-jitter, jitter)
    fraction = min(max(fraction, EARLIEST_REFRESH_SHARE), LATEST_REFRESH_SHARE)
    planned = tokens.access_issued_at + timedelta(seconds=lifetime * fraction)
    for deadline in (
        roomy_refresh_deadline(tokens, share=share, jitter=jitter),
        refresh_deadline(tokens),
    ):
        if tokens.access_issued_at < deadline < planned:
            return deadline
    return planned


def roomy_refresh_deadline(tokens: TokenSet, *, share: float, jitter: float) -> datetime:
    """Return the moment a refresh is planned for a refresh token that dies sooner.

    An attempt there may hang to its timeout, wait the back-off's first step and try again,
    and both end before the refresh token dies: the room the access token's page leaves
    (:func:`expiring_margin`, a tenth of the access lifetime with the defaults). A refresh
    token born shorter than twice that gets half its own life, and no margin is below
    :func:`refresh_safety_margin`. Neither this moment nor :func:`refresh_deadline` depends
    on when the access token was issued: a refresh here that did not rotate is followed by
    at most one more, at the refresh deadline, and then the normal plan (no loop, no storm
    of refreshes Kakao counts against its rate limit).
    """
    room = expiring_margin(share, jitter, tokens.access_lifetime.total_seconds())
    if (
        tokens.refresh_issued_at is not None
        and tokens.refresh_expires_at > tokens.refresh_issued_at
    ):
        room = min(room, (tokens.refresh_expires_at - tokens.refresh_issued_at).total_seconds() / 2)
    margin = max(timedelta(seconds=room), refresh_safety_margin(tokens))
    return tokens.refresh_expires_at - margin


#: What a caller asks by default of the token it is handed (`kakao-tokend token`,
#: ``min_valid=auto``): 60 s of Kakao's 6-hour token, and that share of a shorter one.
DEFAULT_MIN_VALID = 60.0
DEFAULT_MIN_VALID_SHARE = DEFAULT_MIN_VALID / 21600


def default_min_valid(lifetime: timedelta) -> float:
    """Return the seconds a token handed out by default must still be valid for: 60 s, or
    1/360 of a shorter lifetime (a 6-second token: 17 ms), so a default a token fresh from
    Kakao cannot meet is never asked (every call would refresh, or be refused)."""
    return min(DEFAULT_MIN_VALID, max(lifetime.total_seconds(), 0.0) * DEFAULT_MIN_VALID_SHARE)


#: The bounds of a planned refresh, as shares of the access lifetime (refresh_due_at).
EARLIEST_REFRESH_SHARE = 0.05
LATEST_REFRESH_SHARE = 0.95
#: The back-off ladder's first step is at most this share of the access lifetime
#: (backoff_delay: 10 s of a 6-hour token, 30 ms of a 6-second one).
FIRST_STEP_SHARE = 1 / 200
#: The most of the access lifetime a Kakao request left at the default timeout may take,
#: whatever the policy (request_timeout_share gives less with the default policy; the fleet's
#: idle-in-transaction backstop is sized for this bound).
REQUEST_TIMEOUT_SHARE = 1 / 8


def latest_refresh_share(refresh_at: float, jitter: float) -> float:
    """Return the latest moment a refresh is planned, as a share of the access lifetime:
    ``refresh_at + jitter``, within the bounds refresh_due_at keeps."""
    return min(max(refresh_at + jitter, EARLIEST_REFRESH_SHARE), LATEST_REFRESH_SHARE)


def expiring_margin(refresh_at: float, jitter: float, lifetime: float) -> float:
    """Return the ``access_expiring`` margin (seconds): half the time between the latest
    planned refresh and the access token's expiry (health grades by it).

    A share of the lifetime, 1/10 of it with the defaults (36 minutes of a 6-hour token, 0.6 s
    of a 6-second one), and at least 1/40 (the latest planned refresh is at 95 % at most).
    """
    return (1 - latest_refresh_share(refresh_at, jitter)) * max(lifetime, 0.0) / 2


#: min_valid must stay below this share of the access token's lifetime: a token fresh from
#: Kakao has already lost a little of its life by the time it is served, and a min_valid it
#: cannot meet would make every request refresh.
MIN_VALID_SHARE = 0.95


def plain_seconds(value: float) -> str:
    """``57`` or ``20519.05``: seconds to the hundredth, without trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def min_valid_problem(min_valid: float, lifetime: timedelta) -> str | None:
    """Why no token can ever meet ``min_valid`` seconds, for a token living ``lifetime``
    (the API's 400 and `kakao-tokend token`'s error alike); None when one can."""
    life = lifetime.total_seconds()
    limit = life * MIN_VALID_SHARE
    if min_valid < limit:
        return None
    return (
        f"min_valid must be below {plain_seconds(limit)}s, {MIN_VALID_SHARE * 100:g} % of the"
        f" token's {plain_seconds(life)}s lifetime"
    )


def no_token_valid_for(name: str, min_valid: float) -> str:
    """Why no token is handed out: none valid at all (``min_valid`` 0), or none valid for at
    least ``min_valid`` (said as asked: ``0.5s``, ``600s``)."""
    if min_valid <= 0:
        return f"no valid token is available for {name}"
    return f"no token valid for at least {plain_seconds(min_valid)}s is available for {name}"


def same_token_strings(a: TokenSet, b: TokenSet) -> bool:
    """Whether ``a`` and ``b`` hold the same access and refresh tokens (times aside: a copy
    read back from a file keeps them to the second)."""
    return a.refresh_token == b.refresh_token and a.access_token == b.access_token


def request_timeout_share(refresh_at: float, jitter: float) -> float:
    """Return the share of the access lifetime a Kakao request left at its default timeout
    may take under this refresh policy (request_timeout fits the wait to it).

    The rule, at every lifetime: a refresh planned at the latest moment whose request hangs
    to the timeout, the back-off's first step, and a second request that hangs as long all
    end by the time ``access_expiring`` may page (:func:`expiring_margin` before the expiry).
    So one hung request never pages anyone — a 6-second token gets its retry as a 6-hour one
    does — while requests that keep hanging page at that moment, at every scale. With the
    defaults (refresh at 75 % ± 5 %, the page with 10 % left) that is (10 % − 0.5 %) / 2 =
    4.75 % of the life: 0.29 s of a 6-second token; tokens living 10.5 minutes or more keep
    the configured 30 s. Never more than :data:`REQUEST_TIMEOUT_SHARE`.
    """
    window = expiring_margin(refresh_at, jitter, 1.0)  # the page's moment minus the latest plan
    return min(REQUEST_TIMEOUT_SHARE, max(window - FIRST_STEP_SHARE, 0.0) / 2)


#: The share of the refresh token's remaining life one wait (a request, a lock) may use: the
#: rest is left for the next attempt, which may still save it.
REFRESH_LEFT_SHARE = 0.5


def within_refresh_life(wait: float, refresh_left: float | None) -> float:
    """Cap ``wait`` (seconds) so it ends while the refresh token lives ``refresh_left`` more.

    A wait that outlasts the refresh token loses the account when the attempt it waits on
    fails (a request Kakao never answers, a lock another process keeps): so no wait takes more
    than half of what is left, and the other half is for the attempt after it. A refresh token
    already dead by our clock (None, or <= 0 left) leaves ``wait`` as it is: the clock may be
    wrong, and there is nothing left to save time for.
    """
    if refresh_left is None or refresh_left <= 0:
        return wait
    return min(wait, refresh_left * REFRESH_LEFT_SHARE)


#: The share of the access lifetime a command waits for the running daemon's answer: two of
#: the longest Kakao requests the daemon may make for it (:data:`REQUEST_TIMEOUT_SHARE`).
DAEMON_ANSWER_SHARE = 2 * REQUEST_TIMEOUT_SHARE
#: The shortest such wait: a healthy daemon answers within a few milliseconds.
DAEMON_ANSWER_FLOOR = 0.1
#: The longest wait for the daemon while the state file holds a token good enough to hand
#: out instead: a daemon answers that from memory at once; 10 s covers a loaded machine or a
#: loop stalled by a slow disk, and is 1/2160 of a 6-hour token's life.
DAEMON_SPARE_WAIT = 10.0


def daemon_answer_wait(
    ceiling: float, lifetime: timedelta | None, spare: float | None = None
) -> float:
    """Return how long a command waits for the running daemon's answer (seconds).

    ``ceiling`` is the wait without a token to go by (the daemon's own deadline, ``[api]
    request_timeout``, and as much again). A token in the state file whose access token lives
    ``lifetime`` shortens it to :data:`DAEMON_ANSWER_SHARE` of that life: a daemon that must
    refresh first waits for Kakao at most a share of it too (:func:`request_timeout`), and a
    6-second token must not wait twenty of its lifetimes for a daemon that was stopped.

    ``spare``: how much longer the state file's access token lives than the caller asks
    (``min_valid``); positive, it can stand in for the daemon's answer. Then the wait is at
    most :data:`DAEMON_SPARE_WAIT`, and half the spare, so the token handed out after it
    still meets ``min_valid``. Never less than :data:`DAEMON_ANSWER_FLOOR` (within the
    ceiling): a daemon that answers in milliseconds is not taken for a frozen one.
    """
    wait = ceiling
    if lifetime is not None:
        wait = min(wait, max(lifetime.total_seconds(), 0.0) * DAEMON_ANSWER_SHARE)
    if spare is not None and spare > 0:
        wait = min(wait, DAEMON_SPARE_WAIT, spare * REFRESH_LEFT_SHARE)
    return min(ceiling, max(wait, DAEMON_ANSWER_FLOOR))


#: How much longer a token request may wait than the one before it that Kakao left
#: unanswered (request_timeout): twice as long, within the same bounds.
UNANSWERED_GROWTH = 2.0


def request_timeout(
    configured: float,
    default: float,
    lifetime: timedelta | None,
    refresh_left: float | None = None,
    *,
    share: float = REQUEST_TIMEOUT_SHARE,
    unanswered: int = 0,
    heard: float | None = None,
) -> float:
    """Return how long a Kakao request for a token living ``lifetime`` may wait for an answer.

    The defaults (``[kakao] timeout`` 30 s, ``connect_timeout`` 10 s) are sized for Kakao's
    hours-long tokens: 1/720 of a 6-hour one. Left at its default, the wait is at most
    ``share`` of a shorter token's lifetime: the refresh policy's
    :func:`request_timeout_share` (4.75 % with the defaults), so that one hung request leaves
    a retry before ``access_expiring`` pages, as with a 6-hour token (a 6-second token would
    otherwise wait 30 s, five lifetimes without a token). Without a policy (a caller that only
    needs the bound) it is :data:`REQUEST_TIMEOUT_SHARE`. Long-lived tokens, and values set by
    hand, keep the configured wait — except that no wait, set by hand or not, outlasts half
    of the refresh token's remaining life (``refresh_left`` seconds,
    :func:`within_refresh_life`): a 60 s timeout with 5 s left gives up after 2.5 s and
    leaves a retry that may still save it.

    ``unanswered``: how many token requests in a row Kakao did not answer in time (the
    account's status counts them; an answer sets it back to the fewest that would have heard
    it, refresher._heard_after). Each doubles the fitted
    wait (:data:`UNANSWERED_GROWTH`) up to :data:`REQUEST_TIMEOUT_SHARE` of the life: a Kakao
    that answers a 10-second token in 1 s, more than its 0.475 s, is heard after one or two
    timeouts (0.95 s, then 1.25 s) rather than never. The configured wait stays the ceiling
    (Kakao's 6-hour tokens, and values set by hand, do not grow), and so does half of the
    refresh token's remaining life.

    ``heard``: how long Kakao took to answer the account's latest answered token request
    (refresher._heard_after; None: nothing worth keeping). Network delay does not shrink
    with the token's life, so the fitted wait is at least :func:`heard_floor` of it, even
    above 1/8 of the life: once Kakao said a token lives 1 s while it takes 0.2 s to answer,
    the wait fitted to 1 s (0.0475 s, grown at most to 0.125 s) never heard an answer again.
    """
    wait = configured
    if lifetime is not None and configured == default:
        life = max(lifetime.total_seconds(), 0.0)
        fitted = life * share
        if unanswered > 0:
            # The exponent is clamped: a float overflows after ~1000 doublings (days of them).
            grown = fitted * UNANSWERED_GROWTH ** min(unanswered, 64)
            fitted = max(fitted, min(grown, life * REQUEST_TIMEOUT_SHARE))
        wait = min(configured, max(fitted, heard_floor(configured, default, heard)))
    return within_refresh_life(wait, refresh_left)


#: How much longer than Kakao's latest answer to the account's token request the next one
#: waits at least (heard_floor): twice as long, so a Kakao as slow as before is heard.
HEARD_MARGIN = 2.0


def heard_floor(configured: float, default: float, heard: float | None) -> float:
    """Return the least a token request waits after Kakao answered the account's latest one
    in ``heard`` seconds: :data:`HEARD_MARGIN` times that, while the wait is left at its
    default (a value set by hand is used as written); 0 without an answer to go by.
    :func:`request_timeout` and :func:`answer_patience` keep it within the configured wait
    (and twice it) and half of the refresh token's remaining life."""
    if heard is None or configured != default:
        return 0.0
    return max(heard, 0.0) * HEARD_MARGIN


#: How much longer than its configured wait a token request given up on may stay open for
#: Kakao's late answer (:func:`answer_patience`): twice that wait.
ANSWER_PATIENCE_FACTOR = 2.0


def longest_open_request(configured: float) -> float:
    """Return the longest a token request whose wait is ``configured`` stays open, its late
    answer included (:func:`answer_patience` never exceeds it, at any lifetime): what a stop
    must wait for an in-flight refresh (service.refresh_grace)."""
    return ANSWER_PATIENCE_FACTOR * configured


def answer_patience(
    configured: float,
    default: float,
    lifetime: timedelta | None,
    refresh_left: float | None = None,
    *,
    share: float = REQUEST_TIMEOUT_SHARE,
    heard: float | None = None,
) -> float:
    """Return how long a token request given up on stays open for Kakao's late answer (the
    next attempt waits for it rather than present the same refresh token beside it).

    Kakao may have rotated already and killed the old refresh token, and network delay does
    not shrink with the token's life. It is the longest wait :func:`request_timeout` grows to
    (1/8 of a short life), and for a longer-lived token twice the configured wait (60 s for
    Kakao's 6-hour token, whose wait stays the configured 30 s: an answer after 31 s is still
    heard), never more than 1/8 of the life, nor past half of the refresh token's remaining
    life. A wait set by hand keeps its value for short tokens (the soak's 2 s for a 3 s token).
    After an answer that took ``heard`` seconds it is at least twice :func:`heard_floor`, as
    twice the configured wait for a long life: a 1-second token whose Kakao answered in 0.2 s
    waits 0.4 s and keeps the request open 0.8 s (never past :func:`longest_open_request`).
    """
    longest = request_timeout(
        configured, default, lifetime, refresh_left, share=share, unanswered=64, heard=heard
    )
    if lifetime is None:
        return longest
    life = max(lifetime.total_seconds(), 0.0)
    floor = ANSWER_PATIENCE_FACTOR * heard_floor(configured, default, heard)
    longer = min(longest_open_request(configured), max(life * REQUEST_TIMEOUT_SHARE, floor))
    return within_refresh_life(max(longest, longer), refresh_left)


#: The shortest heartbeat: a share of a very short life, or a refresh token's last moments.
HEARTBEAT_FLOOR = 0.05
#: The most of the shortest access lifetime the heartbeat left at its default may take. It
#: runs retries only after the wall clock went back (the due queue runs them otherwise), and
#: every fleet timer counts in it (fleet/store.py): it is not the request timeout's share.
HEARTBEAT_SHARE = 1 / 8


def heartbeat_interval(
    configured: float,
    default: float,
    lifetime: timedelta | None,
    refresh_left: float | None = None,
) -> float:
    """Return how often the heartbeat beats for accounts whose shortest token lives ``lifetime``.

    The beat is what notices a wall clock stepped back (a token "issued in the future", a
    planned refresh pushed away) and hands over what a suspend made due. Its default of 60 s is
    1/360 of Kakao's 6-hour token; left at it, it is at most HEARTBEAT_SHARE of a shorter
    token's life (a 3-second token would otherwise wait twenty lifetimes). Tokens living 8
    minutes or more, and values set by hand, keep the configured beat — except that, set by
    hand or not, it never outlasts half of what the first refresh token to die has left
    (``refresh_left`` seconds, :func:`within_refresh_life`): after the wall clock went back,
    the beat is what runs a retry kept on the monotonic clock.
    """
    beat = configured
    if lifetime is not None and configured == default:
        beat = min(configured, max(lifetime.total_seconds() * HEARTBEAT_SHARE, HEARTBEAT_FLOOR))
    return max(within_refresh_life(beat, refresh_left), min(beat, HEARTBEAT_FLOOR))


def backoff_delay(
    attempt: int,
    *,
    now: datetime | None = None,
    expires_at: datetime | None = None,
    lifetime: timedelta | None = None,
    initial: float = 10.0,
    cap: float = 300.0,
    rng: random.Random | None = None,
    refresh_expires_at: datetime | None = None,
    rate_limited: bool = False,
    retry_after: float | None = None,
    pages_at: datetime | None = None,
) -> float:
    """Return seconds to wait before retry number ``attempt`` (1-based) after a failure.

    This is the one back-off rule of kakao-tokend; every wait in the refresh path comes
    from here, and all of it scales with the access token's ``lifetime``:

    * The ladder: exponential with full jitter between half and all of the step. The first
      step is ``initial`` seconds, scaled down for short lifetimes (never more than
      :data:`FIRST_STEP_SHARE` of the lifetime, so a 6-hour token keeps 10 s and a 6-second
      one retries in 30 ms); the
      longest step is ``cap``, or 1/12 of a lifetime shorter than 12 caps.
    * A rate limit (KOE237, HTTP 429) while the access token still serves: the longest
      step at once, and Kakao's ``retry_after`` is honoured up to ``cap`` — retrying sooner
      only prolongs the limit. Once the access token has expired (or is about to), nobody
      has a token and the ladder's pace holds instead: a rate limit is no reason to leave
      consumers without a token for longer than the lifetime's own rhythm.
    * Deadlines: while more than one first step is left before the access token's expiry
      (``expires_at``), before the refresh token's expiry minus its safety margin, or before
      the refresh token's expiry itself, the retry lands at least half a first step before
      it — whatever Kakao asked for; one attempt before the refresh token dies is worth more
      than honouring the pause. With less left than that, the ladder's pace holds: retrying
      ever faster in the last seconds (a Zeno-like storm) would only earn KOE237. The one
      exception is the refresh token's own death: with between a quarter and one first step
      left, the retry comes at half of what is left (a step, a rate limit's pause or the
      config-error pace would end after it; a 6-hour token's first step is 10 s), so one or
      two more attempts may still save it.
    * ``pages_at``, the moment ``access_expiring`` may page (health), is such a deadline too:
      a retry is worth more than a rate limit's pause that would make a person get up. It
      matters where the longest step is a large share of the life (a twelfth of a token
      under an hour, against 1/72 of a 6-hour one) and the policy leaves little time before
      the page (refresh_at + jitter above 5/6): there, a single 429 paged before its retry.

    Without a token (``lifetime`` and the expiries None: an alert's delivery) only the
    ladder applies, from ``initial`` up to ``cap``.
    """
    rng = rng or random.Random()
    life = max(lifetime.total_seconds(), 1e-3) if lifetime is not None else None
    base = min(initial, life * FIRST_STEP_SHARE) if life is not None else initial
    top = min(cap, life / 12.0) if life is not None and life < cap * 12 else cap
    # Clamp the exponent: after ~1000 attempts (days of outage) 2**n overflows a float.
    step = min(top, base * (2.0 ** min(max(attempt - 1, 0), 64)))
    deadlines: list[float] = []
    if now is not None and expires_at is not None:
        deadlines.append((expires_at - now).total_seconds())
    serving = not deadlines or deadlines[0] > base
    if rate_limited and serving:
        step = top
    delay = rng.uniform(step / 2, step)
    if retry_after is not None and retry_after > 0 and serving:
        delay = max(delay, min(retry_after, cap))
    if now is not None and refresh_expires_at is not None:
        refresh_left = (refresh_expires_at - now).total_seconds()
        margin = (life or 0.0) * REFRESH_SAFETY_SHARE
        deadlines += [refresh_left - margin, refresh_left]
    ahead = list(deadlines)
    if now is not None and pages_at is not None:
        ahead.append((pages_at - now).total_seconds())
    for left in ahead:
        if left > base:
            delay = min(delay, left - base / 2)
    if refresh_expires_at is not None and now is not None and base / 4 < deadlines[-1] <= base:
        # Less than a first step before the refresh token dies, yet enough for an attempt:
        # the ladder's pace (and a rate limit's pause) would end after its death, so try at
        # half of what is left. Below a quarter step nothing fits any more (no storm).
        delay = min(delay, deadlines[-1] / 2)
    return max(delay, 0.0)


#: The refresh-token lifetime Kakao hands out (60 days less a second): the yardstick of the
#: settings written in Kakao's terms (the rotation window, the alert thresholds).
KAKAO_REFRESH_LIFETIME = 5183999.0


def refresh_lifetime(tokens: TokenSet) -> float | None:
    """Return the life (seconds) the current refresh token was issued with; None if unknown."""
    issued = tokens.refresh_issued_at
    if issued is None or tokens.refresh_expires_at <= issued:
        return None
    return (tokens.refresh_expires_at - issued).total_seconds()


def kakao_scale(tokens: TokenSet) -> float:
    """Return the factor that fits durations set in Kakao's terms to this refresh token.

    A 30-day rotation window and alerts from 14 days left are shares of Kakao's 60-day
    refresh token. A token born shorter (a test emulator's: minutes, or 20 days) keeps those
    shares: the factor is its life over Kakao's, so the window stays half of any refresh
    token's life and the ladder the same part of it. 1 for Kakao's own tokens, for longer
    ones, and when the life is unknown (an import).
    """
    life = refresh_lifetime(tokens)
    if life is None or life >= KAKAO_REFRESH_LIFETIME:
        return 1.0
    return life / KAKAO_REFRESH_LIFETIME


def rotation_window(tokens: TokenSet, configured: float) -> timedelta:
    """Return a rotation window of Kakao's terms (one month) fitted to ``tokens``."""
    return timedelta(seconds=configured * kakao_scale(tokens))


def in_rotation_window(tokens: TokenSet, now: datetime, *, window: timedelta) -> bool:
    """Return True when Kakao may rotate the refresh token at the next refresh."""
    return tokens.refresh_remaining(now) < window


def rotation_certain(tokens: TokenSet, now: datetime, *, window: timedelta) -> bool:
    """Return True when a refresh that did not rotate the refresh token is a missed rotation.

    Kakao rotates with "less than a month" left, but a month is not a fixed length (28 to 31
    days) and our expiry is an estimate made at request time, a little earlier than Kakao's
    own. So only well inside the window is a refresh without a rotation surprising: a tenth
    of the window, or one access lifetime (the next refresh), whichever is longer, inside it.
    Against Kakao that is 27 days left; against a test emulator with second-long tokens it is
    one access lifetime.
    """
    slack = max(window * 0.1, tokens.access_lifetime)
    return tokens.refresh_remaining(now) < window - slack
