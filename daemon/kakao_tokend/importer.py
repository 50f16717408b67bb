"""Adopting a seed-style kakao_token.json (a raw Kakao token response with durations only)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .config import AccountConfig
from .errors import KakaoConfigError, KakaoError, KakaoTokendError, ReloginRequired, StateCorrupt
from .kakao import AccessTokenRejected, KakaoClient
from .state import AccountState
from .store import AccountStore
from .tokens import Clock, TokenSet, format_duration, format_time, utcnow

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


class ImportFileError(KakaoTokendError):
    """The file to import is not a usable token file (the CLI exits with EX_DATAERR, 65)."""


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


@dataclass(frozen=True)
class ImportResult:
    """What an import produced and what was inferred, for the CLI to report."""

    state: AccountState
    #: How the access expiry was learned: "access_token_info", "expired" or "unverified".
    access_source: str
    warnings: tuple[str, ...] = ()


def _duration(data: Mapping[str, Any], name: str, default: int, path: Path) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ImportFileError(f"{path}: {name!r} must be a positive number of seconds")
    return int(value)


def read_seed_file(path: Path) -> SeedFile:
    """Read and check a seed-style token file; raise ImportFileError with one clear line."""
    try:
        raw = path.read_bytes()
        mtime = datetime.fromtimestamp(os.stat(path).st_mtime, UTC)
    except FileNotFoundError:
        raise ImportFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImportFileError(f"{path}: is a directory, expected a kakao_token.json file") from None
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
    for name in ("access_token", "refresh_token"):
        if name not in data:
            if name == "refresh_token":
                raise ImportFileError(
                    f"{path}: has no refresh_token (a refresh script probably overwrote the file "
                    "with a refresh response); without it the tokens cannot be kept fresh — "
                    "run `kakao-tokend login` instead"
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
    )


async def infer_tokens(
    seed: SeedFile, client: KakaoClient, *, now: datetime
) -> tuple[TokenSet, str, int | None, list[str]]:
    """Turn durations into absolute expiries; return (tokens, access source, user id, warnings).

    The access expiry comes from ``access_token_info`` (remaining seconds) when Kakao answers;
    a rejected token (-401) counts as expired now so the daemon refreshes at once. The refresh
    token's real issue time is unknowable: it was issued no later than the file was written
    and no later than the access token, so its expiry is estimated from the earlier of the two
    and never trusted to lie further away than the file's mtime allows.
    """
    warnings: list[str] = []
    access_lifetime = timedelta(seconds=seed.expires_in)
    user_id: int | None = None
    try:
        info = await client.access_token_info(seed.access_token)
    except AccessTokenRejected:
        access_expires = now
        source = "expired"
        warnings.append(
            "Kakao no longer accepts the access token (-401); the daemon will refresh it at once"
        )
    except (KakaoConfigError, ReloginRequired):
        raise  # wrong app, or the user is no longer linked: importing cannot help
    except KakaoError as exc:
        access_expires = now
        source = "unverified"
        warnings.append(
            f"could not ask Kakao about the access token ({exc}); treating it as expired"
        )
    else:
        user_id = info.user_id
        access_expires = now + timedelta(seconds=max(info.expires_in, 0))
        source = "access_token_info"
    access_issued = access_expires - access_lifetime
    refresh_issued_bound = min(seed.mtime, access_issued)
    refresh_expires = refresh_issued_bound + timedelta(seconds=seed.refresh_token_expires_in)
    if seed.app_key is not None:
        warnings.append(
            "the file was rewritten by a refresh script (it holds app_key), so the refresh "
            "token may be older than the file; its expiry is an upper bound"
        )
    if refresh_expires <= now:
        raise ReloginRequired(
            f"{seed.path}: the refresh token expired around {format_time(refresh_expires)} "
            "(estimated from the file's age)",
            hint="run `kakao-tokend login` to get new tokens",
        )
    tokens = TokenSet(
        access_token=seed.access_token,
        refresh_token=seed.refresh_token,
        access_expires_at=access_expires,
        refresh_expires_at=refresh_expires,
        access_issued_at=access_issued,
        refresh_issued_at=None,
        refresh_expiry_estimated=True,
        token_type=seed.token_type,
        scope=seed.scope,
        extra=dict(seed.extra),
    )
    return tokens, source, user_id, warnings


async def import_seed_file(
    path: Path,
    account: AccountConfig,
    client: KakaoClient,
    *,
    force: bool = False,
    clock: Clock = utcnow,
    lock_timeout: float = 10.0,
) -> ImportResult:
    """Adopt ``path`` as the account's token set: write the state, then publish the token file."""
    seed = read_seed_file(path)
    if seed.app_key is not None and seed.app_key != account.app.rest_api_key:
        raise ImportFileError(
            f"{path}: its app_key differs from the REST API key configured for account "
            f"'{account.name}' ({account.app.rest_api_key_source}); a refresh token only works "
            "with the key it was issued for"
        )
    store = AccountStore(account)
    if not force and store.state_path.exists():
        raise StateExists(
            f"account '{account.name}' already has tokens in {store.state_path}",
            hint="use --force to replace them, or --account to import into another account",
        )
    now = clock()
    tokens, source, user_id, warnings = await infer_tokens(seed, client, now=now)
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
        state = AccountState(
            account=account.name,
            tokens=tokens,
            generation=(old.generation + 1) if old else 1,
            refreshed_at=None,
            user_id=user_id,
            extras={"imported": {"at": format_time(now), "file_mtime": format_time(seed.mtime)}},
        )
        store.save(state)
        store.publish(state, now=now)
    log.info(
        "imported %s for account %s: access %s (%s), refresh %s estimated %s left",
        path,
        account.name,
        tokens.access_fingerprint,
        source,
        tokens.refresh_fingerprint,
        format_duration(tokens.refresh_remaining(now).total_seconds()),
    )
    return ImportResult(state=state, access_source=source, warnings=tuple(warnings))
