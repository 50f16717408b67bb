"""The CLI in fleet mode: login, logout, refresh and status through the same rows and locks.

A command opens the store like a node (schema checked under the advisory lock, the "moved"
marker, a small pool), holds the account's row (``FOR UPDATE``, waiting for a node that is
refreshing it), commits with compare-and-swap and a notification: every node adopts and
publishes the change within about a second (fleet/node.py). Commands publish no files
themselves; the nodes do, each for its own consumers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from ..config import AccountConfig, Config
from ..errors import StoreError
from ..state import AccountState
from ..tokens import TokenSet, refresh_due_at
from .accounts import RefreshStatus
from .admin import db_timeouts, require_dsn, require_keyring
from .store import FleetStore

__all__ = ["logout_account", "opened", "read_states", "save_login"]

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


async def save_login(
    config: Config, account: AccountConfig, tokens: TokenSet, user_id: int | None, now: datetime
) -> AccountState:
    """Store a fresh login as the account's newest generation (a new row, or CAS over it)."""
    async with opened(config) as fleet:
        store = fleet.account_store(account)
        async with store.hold(COMMAND_LOCK_WAIT):
            old = store.load()
            state = AccountState(
                account=account.name,
                tokens=tokens,
                generation=(old.generation + 1) if old else 1,
                refreshed_at=now,
                user_id=user_id,
            )
            store.planner = lambda: _plan_for(config, state)
            store.save(state)
    return state


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
            problem = fleet.unreadable.get(name)
            error = StoreError(problem) if problem else None
            found[name] = (row.state if row else None, error, row.refreshed_by if row else None)
        return found
