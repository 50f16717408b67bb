"""The CLI in fleet mode: login, logout, refresh and status through the same rows and locks.

A command opens the store like a node (schema checked under the advisory lock, the "moved"
marker, a small pool), holds the account's row (``FOR UPDATE``, waiting for a node that is
refreshing it), commits with compare-and-swap and a notification: every node adopts and
publishes the change within about a second (fleet/node.py). Commands publish no files
themselves; the nodes do, each for its own consumers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import AccountConfig, Config
from ..errors import StoreError, StoreWriteError, TokenDecryptError
from ..state import AccountState
from ..tokens import TokenSet, refresh_due_at
from .accounts import RefreshStatus, delete_account, notify_changed
from .admin import db_timeouts, require_dsn, require_keyring
from .store import FleetStore

if TYPE_CHECKING:
    from ..importer import ImportResult
    from ..kakao import KakaoClient

__all__ = [
    "check_login",
    "forget_unreadable_account",
    "import_into_store",
    "logout_account",
    "opened",
    "read_states",
    "save_login",
]

#: How long a command waits for a node that holds the account's row (a refresh in flight
#: takes at most the Kakao timeout).
COMMAND_LOCK_WAIT = 35.0


@asynccontextmanager
async def opened(config: Config, *, read_rows: bool = False) -> AsyncIterator[FleetStore]:
    """Open the configured store for one command; closed when the block ends."""
    store = config.store
    fleet = FleetStore(
        dsn=require_dsn(store),
        keyring=require_keyring(store),
        node=store.node_name,
        timeouts=db_timeouts(config),
        state_dir=config.state_dir,
        pool_size=2,
    )
    try:
        await fleet.open(read_rows=read_rows)
        yield fleet
    finally:
        await fleet.close()


def _plan_for(config: Config, state: AccountState) -> tuple[datetime | None, RefreshStatus]:
    policy = config.refresh
    due = refresh_due_at(state.tokens, share=policy.refresh_at, jitter=policy.jitter)
    return due, RefreshStatus()


#: The fix for a row this host cannot decrypt (FleetStore.unreadable: its key file lacks
#: the key the row was sealed with, or holds another). Not a login: that would seal the
#: shared row with a key the other nodes may not have.
UNREADABLE_HINT = (
    "every node needs the same key file: add the key the store was sealed with back to this"
    " host's key file (newest last), then `kakao-tokend reload` the node here; if that key"
    " is lost on every host, `kakao-tokend logout` removes the row"
)


def unreadable_error(fleet: FleetStore, name: str) -> TokenDecryptError | None:
    """The error for account ``name``'s row when this host cannot decrypt it, else None."""
    problem = fleet.unreadable.get(name)
    return TokenDecryptError(problem, hint=UNREADABLE_HINT) if problem else None


async def refuse_unreadable(fleet: FleetStore, name: str) -> None:
    """Read account ``name``'s row again; raise :func:`unreadable_error` when this host cannot
    decrypt it. A command that writes new tokens (`login`, `import`) must not go on: it would
    seal the shared row with this host's key, which the other nodes may not have, and the
    fix is the key file, not a login."""
    await fleet.reload(name)
    error = unreadable_error(fleet, name)
    if error is not None:
        raise error


@asynccontextmanager
async def _unreadable_fix() -> AsyncIterator[None]:
    """Give a row that stopped decrypting since :func:`refuse_unreadable` read it (its hold
    read it again) the same fix: the key file, not a login."""
    try:
        yield
    except TokenDecryptError as exc:
        raise TokenDecryptError(exc.message, hint=UNREADABLE_HINT) from None


async def check_login(config: Config, account: AccountConfig) -> None:
    """`login`'s check before anyone logs in at Kakao: the store is in use, and the account's
    row, if it has one, decrypts with this host's keys (:func:`refuse_unreadable`)."""
    async with opened(config) as fleet:
        await refuse_unreadable(fleet, account.name)


async def save_login(
    config: Config,
    account: AccountConfig,
    tokens: TokenSet,
    user_id: int | None,
    now: datetime,
    check: Callable[[AccountState | None], None] | None = None,
) -> AccountState:
    """Store a fresh login as the account's newest generation (a new row, or CAS over it):
    above the row's and above the one a logout deleted (PgAccountStore.next_generation).
    Refused for a row this host cannot decrypt (:func:`refuse_unreadable`), and by ``check``
    (login.LoginFlow.check_replacing), which sees the row's state under the row's lock."""
    async with opened(config) as fleet:
        await refuse_unreadable(fleet, account.name)
        store = fleet.account_store(account)
        async with _unreadable_fix(), store.hold(COMMAND_LOCK_WAIT):
            old = store.load()
            if check is not None:
                check(old)
            state = AccountState(
                account=account.name,
                tokens=tokens,
                generation=await store.next_generation(old),
                refreshed_at=now,
                user_id=user_id,
            )
            store.planner = lambda: _plan_for(config, state)
            store.save(state)
    return state


async def forget_unreadable_account(config: Config, account: AccountConfig) -> bool:
    """`logout` of a row this host cannot decrypt (its key is lost): delete it without reading
    its tokens, under its row lock (a node's refresh in flight ends first), and tell every
    node. Deleting seals nothing, so unlike `login` this needs no key; without it a lost key
    would leave the row for good. True if there was a row."""
    name = account.name
    async with opened(config) as fleet, fleet.connection(f"delete account {name!r}") as conn:
        cur = await conn.execute(
            "SELECT generation FROM accounts WHERE name = %s FOR UPDATE", (name,)
        )
        found = await cur.fetchone()
        if found is None:
            return False
        await delete_account(conn, name)
        await notify_changed(conn, name, int(found[0]) + 1)
        await conn.commit()
    return True


async def logout_account(config: Config, account: AccountConfig) -> AccountState | None:
    """Delete the account's row (its rotations go with it); return the state it held."""
    async with opened(config) as fleet:
        store = fleet.account_store(account)
        async with store.hold(COMMAND_LOCK_WAIT):
            state = store.load()
            store.stage_delete()
    return state


async def read_states(
    config: Config, names: list[str]
) -> dict[str, tuple[AccountState | None, StoreError | None, str | None]]:
    """Read the named accounts' rows: (state, why unreadable, the node that refreshed it)."""
    async with opened(config, read_rows=True) as fleet:
        found: dict[str, tuple[AccountState | None, StoreError | None, str | None]] = {}
        for name in names:
            row = fleet.rows.get(name)
            error = unreadable_error(fleet, name)
            found[name] = (row.state if row else None, error, row.refreshed_by if row else None)
        return found


async def import_into_store(
    config: Config,
    account: AccountConfig,
    path: Path,
    client: KakaoClient,
    *,
    force: bool,
    verify: bool,
    login_hint: str,
) -> ImportResult:
    """`import` in fleet mode: the seed file checked as in file mode (importer.py), then
    written as the account's newest generation under its row lock, with a notification.

    The verifying refresh (when the refresh token must be tested) runs holding the row lock
    and is committed in the same transaction. If that commit fails after Kakao rotated, the
    new tokens go to the encrypted rescue file, which the node on this host commits at its
    next start, and the command says so.
    """
    from ..importer import (
        ImportResult,
        StateExists,
        check_seed_file,
        file_mode,
        imported_state,
        log_import,
        refresh_seed,
    )
    from ..tokens import utcnow

    async with opened(config) as fleet:
        await refuse_unreadable(fleet, account.name)  # before Kakao is asked
        store = fleet.account_store(account)
        where = f"the PostgreSQL store {fleet.store_id}"
        checked = await check_seed_file(
            path,
            account,
            client,
            exists=account.name in fleet.rows,
            where=where,
            force=force,
            verify=verify,
            login_hint=login_hint,
        )
        verified_by = checked.verified_by
        rotated = False
        state: AccountState | None = None
        try:
            async with _unreadable_fix(), store.hold(COMMAND_LOCK_WAIT):
                old = store.load()
                if old is not None and not force:
                    raise StateExists(
                        f"account '{account.name}' already has tokens in {where}",
                        hint="use --force to replace them",
                    )
                state = imported_state(
                    account, checked, old, generation=await store.next_generation(old)
                )
                if checked.needs_refresh:
                    state, rotated = await refresh_seed(
                        checked.seed, state, client, login_hint, utcnow
                    )
                    verified_by = "refresh"
                planned = state
                store.planner = lambda: _plan_for(config, planned)
                store.save(state)
        except StoreError as exc:  # a failed commit, or the database gone (StoreUnavailable)
            if state is None or not rotated:
                raise
            kept = store.rescue_path if store.save_rescue(state) else None
            raise StoreWriteError(
                f"Kakao rotated the refresh token while checking {path}, but the store did not "
                f"take the new tokens: {exc.message}",
                hint=(
                    f"they are in the encrypted rescue file {kept}: start (or restart) "
                    "kakao-tokend on this host and it commits them"
                    if kept
                    else f"the file's refresh token is dead now; {login_hint}"
                ),
            ) from None
    log_import(path, account, state, verified_by, rotated)
    return ImportResult(
        state=state,
        verified_by=verified_by,
        rotated=rotated,
        warnings=checked.warnings,
        file_mode=file_mode(path),
    )
