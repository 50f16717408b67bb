"""An account's state kept packed in one bytes object while nobody uses it (a node's cache).

A node holds a state for each of its 10,000 accounts, and almost all of them sit idle for
hours. As objects (the AccountState, its TokenSet, two token strings, four datetimes, the
newest rotation with its tuple and two fingerprints, the user id) one state was about 1 KiB;
packed it is the bytes below and a small object (docs/benchmarks.md, "Memory, seventh
session"). :attr:`PackedState.state` makes the objects when asked, and gives back the very
same object as long as anyone still holds it: code that compares states by identity (the
refresher's ``self.state is not state`` after an await) sees no difference.

Values that thousands of rows share (token type, scope, the empty mappings) are references,
not copies; the account name is the configuration's string object.
"""

from __future__ import annotations

import struct
import weakref
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from ..state import AccountState, Rotation
from ..tokens import TokenSet

__all__ = ["EMPTY", "PackedState"]

#: The shared empty ``extra``/``extras`` of the rows (most have none; a dict is 64 bytes).
EMPTY: Mapping[str, Any] = MappingProxyType({})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

#: generation, user id, access expiry, refresh expiry, access issued, refresh issued,
#: refreshed at (microseconds since the epoch), flags, rotations, and the lengths of the
#: access token, refresh token and id token (in bytes of UTF-8).
_HEAD = struct.Struct("<qqqqqqqBHIII")
#: The access expiry, refresh expiry and access issue time within _HEAD.
_TIMES = struct.Struct("<qqq")
_TIMES_AT = 16
#: Per rotation: when (microseconds), flags, and the lengths of the two fingerprints.
_ROTATION = struct.Struct("<qBII")

_HAS_USER = 1
_NO_REFRESH_ISSUED = 2
_REFRESH_ISSUED_AS_ACCESS = 4
_NO_REFRESHED = 8
_REFRESHED_AS_ACCESS = 16
_ESTIMATED = 32
#: Rotation flags.
_AT_REFRESHED = 1
_NO_REPLACED = 2
#: The id token's length when there is none.
_NONE = 0xFFFFFFFF

#: The states made last, kept alive a little longer: the code that serves, plans or grades
#: an account asks for its state a few dozen times in a row (a start: 29 times per account),
#: and each time would make it anew once the previous one was freed. A handful of states,
#: whatever the number of accounts.
RECENT = 64
_recent: deque[AccountState] = deque(maxlen=RECENT)

#: Shared tuples of the references that most rows have alike: (token type, scope, re-login
#: cause) of rows without a re-login reason and with the shared EMPTY mappings. Bounded.
_SHARED_REFS: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_SHARED_REFS_MAX = 256


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return _EPOCH + _MICROSECOND * micros  # twice as fast as timedelta(microseconds=...)


class PackedState:
    """One account's AccountState as bytes, made into objects when asked (see the module)."""

    # One per account and row, 10,000 on a node.
    __slots__ = ("_blob", "_live", "_refs", "account")

    account: str
    #: The packed values (None: the state could not be packed, see _refs).
    _blob: bytes | None
    #: (token_type, scope, relogin_reason, relogin_cause, extras, extra); the state itself
    #: when it does not fit the format (a user id beyond 64 bits).
    _refs: Any
    #: The state made last, while anyone holds it (cleared when it is freed).
    _live: weakref.ref[AccountState] | None

    def __init__(self, account: str, blob: bytes | None, refs: Any) -> None:
        self.account = account
        self._blob = blob
        self._refs = refs
        self._live = None

    @classmethod
    def of(cls, state: AccountState) -> PackedState:
        """Return ``state`` packed; :attr:`state` gives back this very object while it lives."""
        tokens = state.tokens
        packed = cls.pack(
            state.account,
            generation=state.generation,
            user_id=state.user_id,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            access_expires_at=tokens.access_expires_at,
            refresh_expires_at=tokens.refresh_expires_at,
            access_issued_at=tokens.access_issued_at,
            refresh_issued_at=tokens.refresh_issued_at,
            refresh_expiry_estimated=tokens.refresh_expiry_estimated,
            refreshed_at=state.refreshed_at,
            rotations=state.rotations,
            refs=(
                tokens.token_type,
                tokens.scope,
                state.relogin_reason,
                state.relogin_cause,
                state.extras,
                tokens.extra,
            ),
        )
        if packed._blob is None:
            packed._refs = state
        else:
            packed._remember(state)
        return packed

    @classmethod
    def pack(
        cls,
        account: str,
        *,
        generation: int,
        user_id: int | None,
        access_token: str,
        refresh_token: str,
        id_token: str | None,
        access_expires_at: datetime,
        refresh_expires_at: datetime,
        access_issued_at: datetime,
        refresh_issued_at: datetime | None,
        refresh_expiry_estimated: bool,
        refreshed_at: datetime | None,
        rotations: tuple[Rotation, ...] | list[Rotation],
        refs: tuple[Any, ...],
    ) -> PackedState:
        """Return the values packed (a row read from the store: no AccountState made).

        A value the format cannot hold (a user id beyond 64 bits) keeps the state as objects.
        """
        try:
            blob = _pack(
                generation,
                user_id,
                access_token,
                refresh_token,
                id_token,
                access_expires_at,
                refresh_expires_at,
                access_issued_at,
                refresh_issued_at,
                refresh_expiry_estimated,
                refreshed_at,
                rotations,
            )
        except (struct.error, OverflowError, TypeError):
            state = _state(
                account,
                generation,
                user_id,
                access_token,
                refresh_token,
                id_token,
                access_expires_at,
                refresh_expires_at,
                access_issued_at,
                refresh_issued_at,
                refresh_expiry_estimated,
                refreshed_at,
                tuple(rotations),
                refs,
            )
            return cls(account, None, state)
        return cls(account, blob, _shared_refs(refs))

    def renamed(self, account: str) -> PackedState:
        """Return this state under the name object ``account`` (equal to its own)."""
        if self._blob is None:
            from dataclasses import replace

            return PackedState.of(replace(self._refs, account=account))
        return PackedState(account, self._blob, self._refs)

    @property
    def state(self) -> AccountState:
        """Return the state: the object made last while anyone still holds it, else a new one."""
        if self._blob is None:
            return self._refs  # type: ignore[no-any-return]
        live = self._live
        if live is not None:
            state = live()
            if state is not None:
                return state
        state = self._unpack()
        self._remember(state)
        _recent.append(state)
        return state

    def holds(self, state: AccountState) -> bool:
        """Return True when ``state`` is this packed state's object (alive now)."""
        if self._blob is None:
            return self._refs is state
        live = self._live
        return live is not None and live() is state

    def same_as(self, other: PackedState) -> bool:
        """Return True when both hold an equal state (packed alike, or equal when made)."""
        if self is other:
            return True
        if (
            self._blob is not None
            and self._blob == other._blob
            and self.account == other.account
            and self._refs == other._refs
        ):
            return True
        return self.state == other.state

    @property
    def generation(self) -> int:
        """Return the state's generation, without making it."""
        if self._blob is None:
            return self._refs.generation  # type: ignore[no-any-return]
        return _HEAD.unpack_from(self._blob)[0]  # type: ignore[no-any-return]

    @property
    def access_lifetime(self) -> timedelta:
        """Return the access token's full lifetime, without making the state."""
        return self.token_times()[0]

    def token_times(self) -> tuple[timedelta, datetime]:
        """Return the access token's lifetime and the refresh token's expiry, without making
        the state (what the heartbeat asks of every account)."""
        if self._blob is None:
            tokens = self._refs.tokens
            return tokens.access_lifetime, tokens.refresh_expires_at
        access_expires, refresh_expires, issued = _TIMES.unpack_from(self._blob, _TIMES_AT)
        return _MICROSECOND * (access_expires - issued), _EPOCH + _MICROSECOND * refresh_expires

    @property
    def rotation_count(self) -> int:
        """Return how many rotations the state holds, without making it."""
        if self._blob is None:
            return len(self._refs.rotations)
        return _HEAD.unpack_from(self._blob)[8]  # type: ignore[no-any-return]

    def _remember(self, state: AccountState) -> None:
        # The callback clears the slot when the state is freed: a dead weak reference kept
        # in each of 10,000 rows would cost more than the packing saves.
        self._live = weakref.ref(state, self._forget)

    def _forget(self, ref: weakref.ref[AccountState]) -> None:
        if self._live is ref:
            self._live = None

    def _unpack(self) -> AccountState:
        blob = self._blob
        assert blob is not None
        (
            generation,
            user_id,
            access_expires,
            refresh_expires,
            access_issued,
            refresh_issued,
            refreshed,
            flags,
            count,
            access_length,
            refresh_length,
            id_length,
        ) = _HEAD.unpack_from(blob)
        offset = _HEAD.size
        rotation_heads = []
        for _ in range(count):
            rotation_heads.append(_ROTATION.unpack_from(blob, offset))
            offset += _ROTATION.size
        text = memoryview(blob)

        def take(length: int) -> str:
            nonlocal offset
            found = str(text[offset : offset + length], "utf-8")
            offset += length
            return found

        access_token = take(access_length)
        refresh_token = take(refresh_length)
        id_token = None if id_length == _NONE else take(id_length)
        issued = _moment(access_issued)
        if flags & _NO_REFRESH_ISSUED:
            refresh_issued_at = None
        elif flags & _REFRESH_ISSUED_AS_ACCESS:
            refresh_issued_at = issued
        else:
            refresh_issued_at = _moment(refresh_issued)
        if flags & _NO_REFRESHED:
            refreshed_at = None
        elif flags & _REFRESHED_AS_ACCESS:
            refreshed_at = issued
        else:
            refreshed_at = _moment(refreshed)
        rotations = []
        for at, rotation_flags, fingerprint_length, replaced_length in rotation_heads:
            fingerprint = take(fingerprint_length)
            replaced = None if rotation_flags & _NO_REPLACED else take(replaced_length)
            moment = (
                refreshed_at
                if rotation_flags & _AT_REFRESHED and refreshed_at is not None
                else _moment(at)
            )
            rotations.append(Rotation(moment, fingerprint, replaced))
        token_type, scope, relogin_reason, relogin_cause, extras, extra = self._refs
        # Positional, in the fields' order (see TokenSet.from_dict).
        tokens = TokenSet(
            access_token,
            refresh_token,
            _moment(access_expires),
            _moment(refresh_expires),
            issued,
            refresh_issued_at,
            bool(flags & _ESTIMATED),
            token_type,
            scope,
            id_token,
            extra,
        )
        return AccountState(
            self.account,
            tokens,
            generation,
            refreshed_at,
            tuple(rotations),
            relogin_reason,
            relogin_cause,
            user_id if flags & _HAS_USER else None,
            extras,
        )

    def __repr__(self) -> str:
        return f"PackedState({self.account!r}, generation={self.generation})"


def _pack(
    generation: int,
    user_id: int | None,
    access_token: str,
    refresh_token: str,
    id_token: str | None,
    access_expires_at: datetime,
    refresh_expires_at: datetime,
    access_issued_at: datetime,
    refresh_issued_at: datetime | None,
    estimated: bool,
    refreshed_at: datetime | None,
    rotations: tuple[Rotation, ...] | list[Rotation],
) -> bytes:
    issued = _micros(access_issued_at)
    flags = 0
    if user_id is not None:
        flags |= _HAS_USER
    if refresh_issued_at is None:
        flags |= _NO_REFRESH_ISSUED
        refresh_issued = 0
    else:
        refresh_issued = _micros(refresh_issued_at)
        if refresh_issued == issued:
            flags |= _REFRESH_ISSUED_AS_ACCESS
    if refreshed_at is None:
        flags |= _NO_REFRESHED
        refreshed = 0
    else:
        refreshed = _micros(refreshed_at)
        if refreshed == issued:
            flags |= _REFRESHED_AS_ACCESS
    if estimated:
        flags |= _ESTIMATED
    texts = [access_token.encode(), refresh_token.encode()]
    if id_token is not None:
        texts.append(id_token.encode())
    parts = [
        _HEAD.pack(
            generation,
            user_id or 0,
            _micros(access_expires_at),
            _micros(refresh_expires_at),
            issued,
            refresh_issued,
            refreshed,
            flags,
            len(rotations),
            len(texts[0]),
            len(texts[1]),
            _NONE if id_token is None else len(texts[2]),
        )
    ]
    for rotation in rotations:
        at = _micros(rotation.at)
        fingerprint = rotation.fingerprint.encode()
        replaced = None if rotation.replaced is None else rotation.replaced.encode()
        rotation_flags = (_AT_REFRESHED if refreshed_at is not None and at == refreshed else 0) | (
            _NO_REPLACED if replaced is None else 0
        )
        parts.append(
            _ROTATION.pack(
                at, rotation_flags, len(fingerprint), 0 if replaced is None else len(replaced)
            )
        )
        texts.append(fingerprint)
        if replaced is not None:
            texts.append(replaced)
    return b"".join(parts + texts)


def _shared_refs(refs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Return one tuple for the rows whose references are alike (see _SHARED_REFS)."""
    token_type, scope, relogin_reason, relogin_cause, extras, extra = refs
    if relogin_reason is not None or extras is not EMPTY or extra is not EMPTY:
        return refs
    key = (token_type, scope, relogin_cause)
    shared = _SHARED_REFS.get(key)
    if shared is not None:
        return shared
    if len(_SHARED_REFS) < _SHARED_REFS_MAX:
        _SHARED_REFS[key] = refs
    return refs


def _state(
    account: str,
    generation: int,
    user_id: int | None,
    access_token: str,
    refresh_token: str,
    id_token: str | None,
    access_expires_at: datetime,
    refresh_expires_at: datetime,
    access_issued_at: datetime,
    refresh_issued_at: datetime | None,
    estimated: bool,
    refreshed_at: datetime | None,
    rotations: tuple[Rotation, ...],
    refs: tuple[Any, ...],
) -> AccountState:
    token_type, scope, relogin_reason, relogin_cause, extras, extra = refs
    tokens = TokenSet(
        access_token,
        refresh_token,
        access_expires_at,
        refresh_expires_at,
        access_issued_at,
        refresh_issued_at,
        estimated,
        token_type,
        scope,
        id_token,
        extra,
    )
    return AccountState(
        account,
        tokens,
        generation,
        refreshed_at,
        rotations,
        relogin_reason,
        relogin_cause,
        user_id,
        extras,
    )
