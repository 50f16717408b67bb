"""The `kakao-tokend store` commands' work: new key, schema init, key rotation.

The CLI prints; these functions connect, act and return what happened.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from ..config import DSN_PROBLEM, KAKAO_TIMEOUT, Config, StoreSettings, dsn_key, dsn_parses
from ..errors import ConfigError, StoreSchemaMismatch
from .accounts import RekeyResult, rekey_accounts
from .crypto import Keyring, key_id_of, new_key_line
from .db import DbTimeouts, connect, store_errors
from .schema import MigrationResult, code_version, migrate, schema_version


@dataclass(frozen=True)
class NewKey:
    """A fresh key: the line for the key file and its id."""

    line: str
    key_id: str


def make_key() -> NewKey:
    """Return a fresh 32-byte key in the key file's format, with its id."""
    line = new_key_line()
    return NewKey(line=line, key_id=key_id_of(base64.b64decode(line)))


def db_timeouts(config: Config) -> DbTimeouts:
    """Return the store timeouts for this config: the backstop outlasts every Kakao call."""
    waits = {account.app.timeout for account in config.accounts.values()} or {KAKAO_TIMEOUT}
    # Fitted to each token's lifetime only while no account's Kakao timeout is set by hand:
    # a wait written by hand is kept, and so is the backstop derived from it.
    return DbTimeouts.for_kakao_timeout(
        max(waits), default=KAKAO_TIMEOUT if waits == {KAKAO_TIMEOUT} else None
    )


def require_dsn(store: StoreSettings) -> str:
    """Return the DSN, or ConfigError saying how to configure it."""
    if store.dsn is None:
        raise ConfigError(
            "no database configured for the store",
            details=[
                ("store.dsn_file", "set dsn_file (or dsn, dsn_env, dsn_credential) in [store]")
            ],
        )
    if not dsn_parses(store.dsn):
        raise ConfigError(
            "the store's database address is not usable",
            details=[(f"store.{dsn_key(store.dsn_source)}", DSN_PROBLEM)],
        )
    return store.dsn


def require_keyring(store: StoreSettings) -> Keyring:
    """Return the keys, or ConfigError: tokens never go into the database unencrypted."""
    if store.keyring is None:
        raise ConfigError(
            "no key configured for the store: tokens are stored encrypted",
            details=[
                (
                    "store.key_file",
                    "run `kakao-tokend store new-key > store.key; chmod 600 store.key` and "
                    "set key_file (or key_env, key_credential) in [store]",
                )
            ],
        )
    return store.keyring


async def init_store(config: Config) -> MigrationResult:
    """Create or upgrade the store's schema (what every node also does at start)."""
    store = config.store
    dsn = require_dsn(store)
    conn = await connect(
        dsn,
        node=store.node_name,
        purpose="migrate",
        timeouts=db_timeouts(config),
        autocommit=True,
        migration=True,
    )
    async with conn:
        return await migrate(conn, node=store.node_name)


async def rotate_key(config: Config, *, batch: int = 100) -> RekeyResult:
    """Re-encrypt every account under the newest key of the key file."""
    store = config.store
    dsn = require_dsn(store)
    keyring = require_keyring(store)
    timeouts = db_timeouts(config)
    conn = await connect(dsn, node=store.node_name, purpose="rotate-key", timeouts=timeouts)
    async with conn:
        with store_errors("read the store's schema version"):
            version = await schema_version(conn)
            await conn.commit()
        if version < code_version():
            raise StoreSchemaMismatch(
                f"the store's schema is at version {version}, this kakao-tokend needs "
                f"{code_version()}",
                hint="run `kakao-tokend store init` first",
            )
        return await rekey_accounts(
            conn, keyring, batch=batch, busy_wait=timeouts.idle_in_transaction
        )
