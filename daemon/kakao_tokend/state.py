"""AccountState: everything kakao-tokend remembers about one account besides the files' paths."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .tokens import TokenSet, format_time, parse_time

STATE_VERSION = 1
MAX_ROTATIONS_KEPT = 50

_DECODER = json.JSONDecoder()


def parse_json(raw: bytes | str) -> Any:
    """``json.loads`` for every document someone else could have written or damaged.

    The one JSON reader of the state, rescue, token and alert files, of a file given to
    `import` or `restore` and of the bodies the API reads: a document nested deeper than
    Python's parser recurses (40 kB of ``[``) raises the ValueError of any other damaged
    document, not a RecursionError that no caller expects (it ended commands with an
    internal error and stopped `run` for every account). Bytes are decoded as UTF-8 first
    (a UnicodeDecodeError is a ValueError too).

    A start reads two small JSON files per account; for a document that starts at its first
    byte and ends in whitespace, the decoder's own scan is all json.loads adds up to. Anything
    else (leading whitespace, extra data, a syntax error) goes through json.loads, which
    answers or raises exactly as before.
    """
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    try:
        try:
            value, end = _DECODER.raw_decode(text)
        except ValueError:
            return json.loads(text)
        if end != len(text) and text[end:].strip(" \t\n\r"):  # JSON's whitespace only
            return json.loads(text)  # raises "Extra data"
        return value
    except RecursionError:
        raise ValueError("nested deeper than any JSON file kakao-tokend reads") from None


# slots: a fleet node keeps one state (and its rotations) per account, 10,000 of them; an
# instance dictionary each is a quarter of what they cost.
@dataclass(frozen=True, slots=True)
class Rotation:
    """One refresh-token rotation: when it happened and the new token's fingerprint."""

    at: datetime
    fingerprint: str
    #: The retired token's fingerprint (None in entries written before it was recorded). Not
    #: part of equality: it is bookkeeping that lets an old backup be recognised.
    replaced: str | None = field(default=None, compare=False)


# weakref_slot: a fleet node keeps idle accounts' states packed and hands out the same object
# while anyone holds it (fleet/packed.py); 8 bytes more per state.
@dataclass(frozen=True, slots=True, weakref_slot=True)
class AccountState:
    """An account's token set plus bookkeeping; written whole to the private state file."""

    account: str
    tokens: TokenSet
    #: Bumped on every change of the token set; published so readers can spot new tokens.
    generation: int = 1
    refreshed_at: datetime | None = None
    rotations: tuple[Rotation, ...] = ()
    #: Set when a person must log in again; the reason is shown by `status` and alerts.
    relogin_reason: str | None = None
    #: Why (a relogin.ReloginCause value: expired, rotated_lost, revoked, unknown).
    relogin_cause: str | None = None
    #: Kakao user id, learned from /v2/user/me or access_token_info.
    user_id: int | None = None
    #: Free-form per-feature data (alert bookkeeping, ...), kept across restarts.
    extras: Mapping[str, Any] = field(default_factory=dict)

    def with_tokens(
        self,
        tokens: TokenSet,
        *,
        refreshed_at: datetime,
        rotated: bool,
        keep: int = MAX_ROTATIONS_KEPT,
    ) -> AccountState:
        """Return the state after a successful refresh or login: new generation, reason cleared.

        ``keep`` is how many of the newest rotations the new state holds (the store's
        ``rotations_kept``: a fleet node keeps one, the rotations table keeps the log).
        """
        rotations = self.rotations
        if rotated:
            rotations = (
                *rotations,
                Rotation(
                    refreshed_at,
                    tokens.refresh_fingerprint,
                    replaced=self.tokens.refresh_fingerprint,
                ),
            )
        if len(rotations) > keep:
            rotations = rotations[-keep:] if keep > 0 else ()
        return replace(
            self,
            tokens=tokens,
            generation=self.generation + 1,
            refreshed_at=refreshed_at,
            rotations=rotations,
            relogin_reason=None,
            relogin_cause=None,
        )

    def to_dict(self) -> dict[str, Any]:
        """Serialise for the private state file (contains secrets)."""
        return {
            "version": STATE_VERSION,
            "account": self.account,
            "generation": self.generation,
            "refreshed_at": format_time(self.refreshed_at) if self.refreshed_at else None,
            "relogin_reason": self.relogin_reason,
            "relogin_cause": self.relogin_cause,
            "user_id": self.user_id,
            "rotations": [_rotation_dict(r) for r in self.rotations],
            "tokens": self.tokens.to_dict(),
            "extras": dict(self.extras),
        }

    @classmethod
    def from_dict(cls, data: Any) -> AccountState:
        """Rebuild from :meth:`to_dict` output; raise ValueError with a readable reason."""
        # type(...) is dict first: what json.loads gives, without the ABC's isinstance check.
        if type(data) is not dict and not isinstance(data, Mapping):
            raise ValueError("state is not a JSON object")
        version = data.get("version")
        # bool is an int subclass and 1.0 == 1: both would slip past a plain comparison.
        if type(version) is not int or version != STATE_VERSION:
            shown = repr(version) if type(version) is int else type(version).__name__
            raise ValueError(f"unsupported state version {shown} (expected {STATE_VERSION})")
        account = data.get("account")
        if not isinstance(account, str) or not account:
            raise ValueError("'account' is missing or not a non-empty string")
        generation = data.get("generation", 1)
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise ValueError("'generation' must be a non-negative integer")
        rotations_raw = data.get("rotations")
        if rotations_raw is None:
            rotations_raw = []
        if not isinstance(rotations_raw, list):
            raise ValueError("'rotations' must be a list")
        rotations = []
        for index, item in enumerate(rotations_raw):
            if not isinstance(item, Mapping) or not isinstance(item.get("fingerprint"), str):
                raise ValueError(f"rotation entry {index} is malformed (needs at, fingerprint)")
            replaced = item.get("replaced")
            if replaced is not None and not isinstance(replaced, str):
                raise ValueError(f"rotation entry {index}: 'replaced' must be a string")
            rotations.append(
                Rotation(
                    _time(item, "at", f"rotation entry {index}"),
                    item["fingerprint"],
                    replaced=replaced,
                )
            )
        reason = data.get("relogin_reason")
        cause = data.get("relogin_cause")
        user_id = data.get("user_id")
        extras = data.get("extras")
        if extras is None:
            extras = {}
        if reason is not None and not isinstance(reason, str):
            raise ValueError("'relogin_reason' must be a string")
        if cause is not None and not isinstance(cause, str):
            raise ValueError("'relogin_cause' must be a string")
        if user_id is not None and (isinstance(user_id, bool) or not isinstance(user_id, int)):
            raise ValueError("'user_id' must be an integer")
        if type(extras) is not dict and not isinstance(extras, Mapping):
            raise ValueError("'extras' must be an object")
        refreshed_at = (
            None if data.get("refreshed_at") is None else _time(data, "refreshed_at", "state")
        )
        tokens_raw = data.get("tokens")
        if type(tokens_raw) is not dict and not isinstance(tokens_raw, Mapping):
            raise ValueError("'tokens' is missing or not an object")
        try:
            tokens = TokenSet.from_dict(tokens_raw)
        except ValueError as exc:
            raise ValueError(f"in 'tokens': {exc}") from None
        # Positional, in the fields' order (see TokenSet.from_dict).
        return cls(
            account,
            tokens,
            generation,
            refreshed_at,
            tuple(rotations),
            reason,
            cause,
            user_id,
            dict(extras),
        )


#: Key in ``extras`` written by `kakao-tokend restore`: the generation the operator forced.
RESTORED_KEY = "restored"


def forced_restore(state: AccountState) -> bool:
    """Return True when `kakao-tokend restore` wrote ``state`` (and nothing has changed it since).

    The marker names the generation it was written with, so a later refresh (a new generation)
    ends it, and an old backup of a restored state is not forced again by mistake.
    """
    marker = state.extras.get(RESTORED_KEY)
    return isinstance(marker, Mapping) and marker.get("generation") == state.generation


def goes_backwards(candidate: AccountState, known: AccountState) -> str | None:
    """Return why ``candidate`` is an older state of the account than ``known``, or None.

    Older means, first of all, that its refresh token is one ``known`` has seen retired by a
    rotation (an old backup copied over the live file: Kakao answers KOE322 for it). With the
    same refresh token, a lower generation is older. With a refresh token we never had, the
    state comes from a new login or import — unless it is also clearly older: a lower
    generation or a rotation history that lacks our newest rotation, with tokens issued
    before ours (to the second, as state files keep times). A state written by
    `kakao-tokend restore` is never refused: the operator forced it.
    """
    if forced_restore(candidate):
        return None
    presented = candidate.tokens.refresh_fingerprint
    current = known.tokens.refresh_fingerprint
    retired = {r.fingerprint for r in known.rotations} | {
        r.replaced for r in known.rotations if r.replaced is not None
    }
    retired.discard(current)
    if presented in retired:
        return f"its refresh token {presented} was retired by a rotation since"
    lower = candidate.generation < known.generation
    if presented == current:
        return (
            f"its generation {candidate.generation} is lower than {known.generation}"
            if lower
            else None
        )
    if _second(candidate.tokens.access_issued_at) >= _second(known.tokens.access_issued_at):
        return None  # issued no earlier than ours: a new login or import
    if lower:
        return f"its generation {candidate.generation} is lower than {known.generation}"
    if known.rotations:
        newest = known.rotations[-1]
        if newest.fingerprint not in {r.fingerprint for r in candidate.rotations}:
            return (
                f"its rotation history lacks the rotation to {newest.fingerprint}"
                f" at {format_time(newest.at)}"
            )
    return None


def _second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def rotations_shown(rotations: Iterable[Rotation]) -> list[dict[str, str]]:
    """What status shows of a rotation log: when, and the new refresh token's fingerprint."""
    return [{"at": format_time(r.at), "fingerprint": r.fingerprint} for r in rotations]


def _rotation_dict(rotation: Rotation) -> dict[str, Any]:
    entry = {"at": format_time(rotation.at), "fingerprint": rotation.fingerprint}
    if rotation.replaced is not None:
        entry["replaced"] = rotation.replaced
    return entry


def _time(data: Mapping[str, Any], name: str, where: str) -> datetime:
    value = data.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        return parse_time(value)
    except ValueError:
        # Do not echo the value: a mixed-up file could hold a token here.
        raise ValueError(f"{where}: {name!r} is not an RFC 3339 timestamp with a zone") from None
