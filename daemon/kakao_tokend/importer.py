"""Adopting a seed-style kakao_token.json (a raw Kakao token response with durations only)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .config import AccountConfig
from .errors import (
    ImportFileError,
    ImportUnverified,
    KakaoConfigError,
    KakaoError,
    KakaoRequestRejected,
    KakaoTokendError,
    KakaoUnavailable,
    PartialRefresh,
    ReloginRequired,
    StateCorrupt,
    StoreWriteError,
    write_fix,
)
from .kakao import AccessTokenRejected, KakaoClient
from .relogin import cli_command, login_command, new_account_command
from .state import AccountState, parse_json
from .store import AccountStore, make_room_before_kakao
from .tokens import MAX_LIFETIME, Clock, TokenSet, format_time, utcnow

log = logging.getLogger(__name__)

#: Kakao's documented lifetimes for REST-issued tokens, used when the file lacks a duration.
DEFAULT_ACCESS_LIFETIME = 21599
DEFAULT_REFRESH_LIFETIME = 5183999

_TOKEN_FIELDS = {
    "access_token",
    "refresh_token",
    "token_type",
    "expires_in",
    "refresh_token_expires_in",
    "scope",
    "id_token",
}
# Keys the seed scripts add that are not token data (and are secrets we do not keep).
_DROPPED_FIELDS = {"app_key"}


class StateExists(KakaoTokendError):
    """The account already has state and --force was not given."""


@dataclass(frozen=True)
class SeedFile:
    """The contents of a seed-style kakao_token.json, checked for shape."""

    path: Path
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    refresh_token_expires_in: int
    token_type: str
    scope: str | None
    mtime: datetime
    #: The REST API key the seed refresh script stores next to the tokens, if present.
    app_key: str | None = field(default=None, repr=False)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: False when the file does not say how long the refresh token lives (Kakao's 60 days
    #: are assumed then).
    refresh_lifetime_given: bool = True


@dataclass(frozen=True)
class ImportResult:
    """What an import produced, how it was checked, and what the CLI should tell the user."""

    state: AccountState
    #: How Kakao confirmed the tokens: "access_token_info" (the access token is live),
    #: "refresh" (one refresh succeeded, so the refresh token is live) or "unverified"
    #: (``verify=False``: nothing was asked).
    verified_by: str
    #: The verifying refresh rotated the refresh token: the file's copy is dead from now on.
    rotated: bool = False
    #: Where the state that ``--force`` replaced was kept (``<state file>.replaced-<stamp>``).
    replaced: Path | None = None
    warnings: tuple[str, ...] = ()
    #: Permission bits of the imported file (it holds a refresh token).
    file_mode: int = 0o600


def _duration(data: Mapping[str, Any], name: str, default: int, path: Path) -> int:
    value = data.get(name)
    if value is None:  # left out, or null: a script's json.dump of a partial answer
        value = default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_LIFETIME  # (False for NaN, and for json's Infinity)
    ):
        raise ImportFileError(
            f"{path}: {name!r} must be a positive number of seconds, at most {MAX_LIFETIME}"
        )
    return int(value)


#: The largest file `import` reads: Kakao's token answer is under a kilobyte (an id_token
#: included); anything this large is another file.
SEED_FILE_LIMIT = 64 * 1024


def read_seed_file(path: Path, *, login: str = "kakao-tokend login") -> SeedFile:
    """Read and check a seed-style token file; raise ImportFileError with one clear line.

    ``login`` is the account's login command, for the refusal of a file without a refresh token.
    """
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size > SEED_FILE_LIMIT:
            raise ImportFileError(
                f"{path}: {info.st_size} bytes is far too large for a kakao_token.json"
                f" (a few hundred bytes; at most {SEED_FILE_LIMIT}); is this the right file?"
            )
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
            # A FIFO or a device would block the read, or never end it (/dev/zero).
            raise ImportFileError(f"{path}: not a regular file; expected a kakao_token.json file")
        raw = path.read_bytes()
        mtime = datetime.fromtimestamp(info.st_mtime, UTC)
    except FileNotFoundError:
        raise ImportFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImportFileError(f"{path}: is a directory, expected a kakao_token.json file") from None
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # (an editor's byte-order mark is not JSON, but meant)
    except UnicodeDecodeError:
        raise ImportFileError(
            f"{path}: is not UTF-8 text (saved in another encoding, such as CP949 or"
            " EUC-KR?); save it as UTF-8, or run `json.dump` again"
        ) from None
    try:
        data = parse_json(text)
    except ValueError as exc:  # a RecursionError too (parse_json)
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ImportFileError(
            f"{path}: not valid JSON{where}; expected the kakao_token.json written by "
            "json.dump(response.json())"
        ) from None
    if not isinstance(data, dict):
        raise ImportFileError(
            f"{path}: expected a JSON object with access_token and refresh_token, "
            f"found a JSON {type(data).__name__}"
        )
    if "access_token" not in data and ("error" in data or "error_code" in data):
        code = data.get("error_code") or data.get("error")
        shown = code if isinstance(code, str) and re.fullmatch(r"\w{1,40}", code) else "error"
        raise ImportFileError(
            f"{path}: holds Kakao's error answer ({shown}), not tokens: the script that wrote"
            " it never got any (an authorization code works once, for minutes); run"
            f" `{login}` instead"
        )
    for name in ("access_token", "refresh_token"):
        if name not in data:
            if name == "refresh_token":
                raise ImportFileError(
                    f"{path}: has no refresh_token (a refresh script probably overwrote the file "
                    "with a refresh response); without it the tokens cannot be kept fresh — "
                    f"run `{login}` instead"
                )
            raise ImportFileError(f"{path}: has no access_token; is this a Kakao token file?")
        value = data[name]
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
            raise ImportFileError(f"{path}: {name!r} must be a non-empty string without spaces")
    scope = data.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise ImportFileError(f"{path}: 'scope' must be a string")
    app_key = data.get("app_key")
    if app_key is not None and not isinstance(app_key, str):
        raise ImportFileError(f"{path}: 'app_key' must be a string")
    token_type = data.get("token_type") or "bearer"
    if not isinstance(token_type, str):
        raise ImportFileError(f"{path}: 'token_type' must be a string")
    return SeedFile(
        path=path,
        access_token=data["access_token"],
        refresh_token=data["refresh_token"],
        expires_in=_duration(data, "expires_in", DEFAULT_ACCESS_LIFETIME, path),
        refresh_token_expires_in=_duration(
            data, "refresh_token_expires_in", DEFAULT_REFRESH_LIFETIME, path
        ),
        token_type=token_type,
        scope=scope,
        mtime=mtime,
        app_key=app_key,
        extra={
            k: v for k, v in data.items() if k not in _TOKEN_FIELDS and k not in _DROPPED_FIELDS
        },
        refresh_lifetime_given=data.get("refresh_token_expires_in") is not None,
    )


def estimate_tokens(
    seed: SeedFile, *, now: datetime, access_expires: datetime | None = None
) -> TokenSet:
    """Turn the file's durations into absolute expiries (estimated where Kakao cannot tell).

    ``access_expires`` comes from ``access_token_info`` when Kakao was asked; without it the
    access token counts as expired now, so the daemon refreshes at its first chance. The
    refresh token's issue time is unknowable: it was issued no later than the file was written
    and no later than the access token, so its expiry is estimated from the earlier of the two
    and never trusted to lie further away than the file's mtime allows; that moment is also
    its estimated issue time when the file says how long it lives.
    """
    access_lifetime = timedelta(seconds=seed.expires_in)
    access_expires_at = access_expires if access_expires is not None else now
    access_issued = access_expires_at - access_lifetime
    refresh_issued_bound = min(seed.mtime, access_issued)
    refresh_expires = refresh_issued_bound + timedelta(seconds=seed.refresh_token_expires_in)
    return TokenSet(
        access_token=seed.access_token,
        refresh_token=seed.refresh_token,
        access_expires_at=access_expires_at,
        refresh_expires_at=refresh_expires,
        access_issued_at=access_issued,
        # The life it was issued with is what the file says (Kakao's answer), when it says:
        # the rules kept in Kakao's terms (the alert ladder, the rotation window) fit it.
        refresh_issued_at=refresh_issued_bound if seed.refresh_lifetime_given else None,
        refresh_expiry_estimated=True,
        token_type=seed.token_type,
        scope=seed.scope,
        extra=dict(seed.extra),
    )


def _check_not_expired(seed: SeedFile, *, now: datetime, hint: str) -> None:
    """Refuse a file whose refresh token died of old age, without asking Kakao anything."""
    # The refresh token was issued no later than the file was written: an upper bound.
    latest = seed.mtime + timedelta(seconds=seed.refresh_token_expires_in)
    if latest <= now:
        raise ReloginRequired(
            f"{seed.path}: the refresh token expired around {format_time(latest)} "
            "(estimated from the file's age)",
            hint=hint,
        )


def _unverified(exc: KakaoError, what: str) -> ImportUnverified:
    return ImportUnverified(
        f"could not ask Kakao whether {what} still works ({exc})",
        hint="try again when Kakao is reachable, or import without the check: --no-verify",
    )


@dataclass(frozen=True)
class CheckedSeed:
    """A seed file read and checked with Kakao, before anything is written anywhere."""

    seed: SeedFile
    tokens: TokenSet
    user_id: int | None
    #: "access_token_info", or "unverified"; "refresh" once :func:`refresh_seed` ran.
    verified_by: str
    #: The refresh token must still be tested with one refresh (under the account's lock).
    needs_refresh: bool
    warnings: tuple[str, ...]
    now: datetime


async def check_seed_file(
    path: Path,
    account: AccountConfig,
    client: KakaoClient,
    *,
    exists: bool,
    where: str,
    force: bool = False,
    verify: bool = True,
    login_hint: str | None = None,
    clock: Clock = utcnow,
) -> CheckedSeed:
    """Read ``path`` and check it with Kakao (access_token_info) before anything is written.

    ``exists`` says whether the account has tokens already (in ``where``, for the message).
    Whether one refresh must still test the refresh token is in the result (see
    :func:`import_seed_file`); the caller does it holding the account's lock.
    """
    login = login_command(account)
    login_hint = login_hint or f"run `{login}` to get new tokens"
    seed = read_seed_file(path, login=login)
    if seed.app_key is not None and seed.app_key != account.app.rest_api_key:
        raise ImportFileError(
            f"{path}: its app_key differs from the REST API key configured for account "
            f"'{account.name}' ({account.app.rest_api_key_source}); a refresh token only works "
            "with the key it was issued for"
        )
    if not force and exists:
        raise StateExists(
            f"account '{account.name}' already has tokens in {where}",
            hint="use --force to replace them, or import into another account: "
            f"{new_account_command(account, 'import', 'FILE')} (it shows the config lines to add)",
        )
    now = clock()
    _check_not_expired(seed, now=now, hint=login_hint)
    warnings: list[str] = []
    if seed.app_key is not None:
        warnings.append(
            "the file was rewritten by a refresh script (it holds app_key), so the refresh "
            "token may be older than the file; its expiry is an upper bound"
        )
    if not seed.refresh_lifetime_given:
        warnings.append(
            "the file does not say how long the refresh token lives (no"
            " refresh_token_expires_in): Kakao's documented 60 days are assumed from the file's"
            " age, an estimate until the first rotation brings Kakao's own expiry"
        )
    tokens = estimate_tokens(seed, now=now)
    user_id: int | None = None
    verified_by = "unverified"
    needs_refresh = verify
    access_may_live = seed.mtime + timedelta(seconds=seed.expires_in) > now
    if verify and access_may_live:
        try:
            info = await client.access_token_info(seed.access_token)
        except (AccessTokenRejected, KakaoRequestRejected) as exc:
            warnings.append(f"Kakao no longer accepts the access token ({exc.label})")
        except KakaoConfigError:
            raise  # the wrong app: importing cannot help, and the message says what to fix
        except ReloginRequired as exc:  # the user is no longer linked (-101) or dormant (-103)
            raise ReloginRequired(
                f"{path}: {exc.message}", code=exc.code, hint=login_hint
            ) from None
        except KakaoError as exc:
            raise _unverified(exc, "the access token") from None
        else:
            user_id = await _complete_signup(client, seed.access_token, info.user_id, warnings)
            verified_by = "access_token_info"
            tokens = estimate_tokens(
                seed, now=now, access_expires=now + timedelta(seconds=max(info.expires_in, 0))
            )
    return CheckedSeed(
        seed=seed,
        tokens=tokens,
        user_id=user_id,
        verified_by=verified_by,
        needs_refresh=needs_refresh,
        warnings=tuple(warnings),
        now=now,
    )


async def _complete_signup(
    client: KakaoClient, access_token: str, user_id: int, warnings: list[str]
) -> int | None:
    """Call /v2/user/me once; return ``user_id``, or None when the call failed.

    Kakao unlinks users who made no call to a user-info API within a day of their first login
    (docs/kakao.md), and the blog recipe whose files `import` reads never makes one. None
    tells the daemon's check at start to make the call (refresher's sign-up).
    """
    try:
        await client.user_me(access_token)
    except KakaoError as exc:
        warnings.append(
            f"could not call /v2/user/me ({exc.label}); Kakao unlinks users who made no user-info"
            " call within a day of their first login, so the daemon makes it when it starts"
        )
        return None
    return user_id


def imported_state(
    account: AccountConfig,
    checked: CheckedSeed,
    old: AccountState | None,
    *,
    generation: int | None = None,
) -> AccountState:
    """The account's state from a checked seed file: ``generation``, by default the one after
    ``old``'s (the stores pass their next_generation: above a logged-out one)."""
    return AccountState(
        account=account.name,
        tokens=checked.tokens,
        generation=generation or ((old.generation + 1) if old else 1),
        refreshed_at=None,
        user_id=checked.user_id,
        extras={
            "imported": {
                "at": format_time(checked.now),
                "file_mtime": format_time(checked.seed.mtime),
            }
        },
    )


def log_import(
    path: Path, account: AccountConfig, state: AccountState, how: str, rotated: bool
) -> None:
    """Log what was imported (fingerprints only)."""
    log.info(
        "imported %s for account %s: access %s, refresh %s (%s), checked by %s",
        path,
        account.name,
        state.tokens.access_fingerprint,
        state.tokens.refresh_fingerprint,
        "rotated" if rotated else "estimated expiry",
        how,
    )


async def import_seed_file(
    path: Path,
    account: AccountConfig,
    client: KakaoClient,
    *,
    force: bool = False,
    verify: bool = True,
    login_hint: str | None = None,
    clock: Clock = utcnow,
    lock_timeout: float = 10.0,
    rescue_dir: Path | None = None,
) -> ImportResult:
    """Adopt ``path`` as the account's token set once Kakao has confirmed that it still works.

    The check (skipped with ``verify=False``): ``access_token_info`` when the access token may
    still be valid (the user's id, Kakao's sign-up call), then always one refresh, under the
    account lock. A live access token does not prove a live refresh token: a blog script
    that drops rotated refresh tokens saves the access token of the very refresh that killed
    its refresh token, and nothing in the file tells such a file from one as login left it
    (the script may write no ``app_key``, and its rewrite makes the file's time new). Only a
    refresh tests a refresh token; outside the rotation window it does not rotate. Whatever
    that refresh returns is saved before anything else (a rotated refresh token is the only
    one that works from then on). A dead token raises :class:`ReloginRequired`; Kakao out of
    reach raises :class:`ImportUnverified`; nothing is written in either case. Tokens the
    import replaces (``force``) are kept beside the state file as ``.replaced-<stamp>``.
    """
    login_hint = login_hint or f"run `{login_command(account)}` to get new tokens"
    store = AccountStore(account, rescue_dir=rescue_dir)
    checked = await check_seed_file(
        path,
        account,
        client,
        exists=store.state_path.exists(),
        where=str(store.state_path),
        force=force,
        verify=verify,
        login_hint=login_hint,
        clock=clock,
    )
    verified_by = checked.verified_by
    with store.lock(timeout=lock_timeout):
        try:
            old = store.load()
        except StateCorrupt:
            old = None
        if old is not None and not force:
            raise StateExists(
                f"account '{account.name}' already has tokens in {store.state_path}",
                hint="use --force to replace them",
            )
        state = imported_state(account, checked, old, generation=store.next_generation(old))
        rotated = False
        replaced: Path | None = None
        if checked.needs_refresh:
            state, rotated, replaced = await _verify_by_refresh(
                checked.seed, state, store, client, login_hint, clock
            )
            verified_by = "refresh"
        else:
            replaced = store.save_keeping_a_copy(state, "replaced")
        store.publish(state, now=clock())
    log_import(path, account, state, verified_by, rotated)
    return ImportResult(
        state=state,
        verified_by=verified_by,
        rotated=rotated,
        replaced=replaced,
        warnings=checked.warnings,
        file_mode=file_mode(path),
    )


async def refresh_seed(
    seed: SeedFile, state: AccountState, client: KakaoClient, login_hint: str, clock: Clock
) -> tuple[AccountState, bool]:
    """Test the seed's refresh token with one refresh (the caller holds the account's lock);
    return the new state (same generation) and whether Kakao rotated the refresh token."""
    try:
        tokens, rotated = await client.refresh(state.tokens)
    except PartialRefresh as exc:
        # Kakao rotated but the access part of its answer was unusable: the new refresh token
        # is the only live one, so it is imported; the access token comes with the next
        # refresh (the daemon's, at once: the old one may be expired).
        log.warning(
            "%s: Kakao rotated the refresh token but its answer's access part was unusable"
            " (%s); importing the new refresh token",
            seed.path,
            exc,
        )
        tokens, rotated = exc.salvaged, True
    except ReloginRequired as exc:
        raise ReloginRequired(
            f"{seed.path}: Kakao refused its refresh token ({exc.label}): the token in this "
            "file is dead (expired, revoked, or replaced by a rotation its script did not save)",
            code=exc.code,
            hint=login_hint,
        ) from None
    except KakaoConfigError:
        raise
    except KakaoError as exc:
        unverified = _unverified(exc, "the refresh token")
        if isinstance(exc, KakaoUnavailable) and exc.ambiguous:
            unverified.hint = (
                "the refresh may have reached Kakao: try again, and if Kakao then answers "
                f"KOE322, {login_hint}; or import without the check: --no-verify"
            )
        raise unverified from None
    fresh = state.with_tokens(tokens, refreshed_at=clock(), rotated=rotated)
    return replace(fresh, generation=state.generation), rotated


async def _verify_by_refresh(
    seed: SeedFile,
    state: AccountState,
    store: AccountStore,
    client: KakaoClient,
    login_hint: str,
    clock: Clock,
) -> tuple[AccountState, bool, Path | None]:
    """Refresh once (the caller holds the account lock) and save the result durably first;
    return the new state, whether Kakao rotated, and where a replaced state was kept."""
    make_room_before_kakao(store.state_path.parent)
    fresh, rotated = await refresh_seed(seed, state, client, login_hint, clock)
    last: StoreWriteError | None = None
    for _ in range(3):
        try:
            # Kakao has answered: its tokens are saved even when no copy of the old can be.
            replaced = store.save_keeping_a_copy(fresh, "replaced", copy_required=False)
        except StoreWriteError as exc:
            last = exc
            await asyncio.sleep(0.5)
        else:
            return fresh, rotated, replaced
    assert last is not None
    fix = write_fix(last.errno)  # what the errno needs (remount, free space ...), said once
    if rotated and store.save_rescue(fresh):
        raise StoreWriteError(
            "Kakao rotated the refresh token, but the new tokens could not be saved:"
            f" {last.message}; they are kept in the rescue file {store.rescue_path}",
            hint=f"{fix}, then run `{cli_command(store.account, 'refresh')}` (or start the"
            " daemon): it takes them from there",
        )
    raise StoreWriteError(
        f"Kakao accepted the refresh token{' and rotated it' if rotated else ''}, but the new "
        f"tokens could not be saved: {last.message}",
        hint=f"{fix}, then {login_hint}",
    )


def file_mode(path: Path) -> int:
    """The permission bits of ``path`` (0600 when it cannot be read)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o600
