"""Helpers for tests that run real fleet nodes: a node's config, a login into the store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from daemonproc import DaemonProcess, write_config
from kakao_tokend.config import Config, load_config
from kakao_tokend.demo import auto_login
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.fleet import accounts, db
from kakao_tokend.fleet.crypto import new_key_line
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.state import AccountState


def node_config(
    tmp_path: Path,
    emulator: KakaoEmulator,
    dsn: str,
    node: str,
    *,
    extra: str = "",
    heartbeat: str = "3s",
) -> Path:
    """A node's config: its own state and runtime directories, the shared DSN and key."""
    key_file = tmp_path / "store.key"
    if not key_file.exists():
        key_file.write_text(new_key_line() + "\n")
        key_file.chmod(0o600)
    dsn_file = tmp_path / f"dsn-{node}"  # a node may reach the database through a proxy
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    directory = tmp_path / node
    directory.mkdir(exist_ok=True)
    return write_config(
        directory,
        emulator,
        # Long by default: what arrives within a second came by NOTIFY, not the poll.
        heartbeat=heartbeat,
        extra=(
            f'[store]\nbackend = "postgres"\ndsn_file = "{dsn_file}"\n'
            f'key_file = "{key_file}"\nnode_name = "{node}"\n{extra}'
        ),
    )


async def store_login(emulator: KakaoEmulator, config: Config, dsn: str) -> AccountState:
    """Log the default account in and insert its row with a notification (as `login`)."""
    account = config.account()
    session = create_session()
    try:
        state = await auto_login(KakaoClient(session, account.app), session, account.name)
    finally:
        await session.close()
    assert config.store.keyring is not None
    conn = await db.connect(dsn, node="cli", purpose="test")
    async with conn:
        row = await accounts.insert_account(
            conn, config.store.keyring, state, node="cli", due_at=None
        )
        assert row is not None
        await accounts.notify_changed(conn, account.name, state.generation)
        await conn.commit()
    return state


async def login_published(
    emulator: KakaoEmulator, config_path: Path, dsn: str, node: DaemonProcess
) -> AccountState:
    """Log the default account in through the store (:func:`store_login`) and wait until the
    running ``node`` has published it (it heard of the login)."""
    state = await store_login(emulator, load_config(config_path), dsn)
    await node.wait_for(
        lambda: (published(node) or {}).get("generation") == state.generation,
        timeout=5,
        what="the login published",
    )
    return state


def published(node: DaemonProcess) -> dict[str, object] | None:
    """The node's token file, or None."""
    try:
        document: dict[str, object] = json.loads(
            (node.state_dir / "default.token.json").read_text()
        )
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return document


async def kakao_holds_the_refresh(emulator: KakaoEmulator) -> None:
    """Wait until a ``hold`` fault keeps a token request: the node is inside Kakao's call."""
    for _ in range(400):
        if emulator.held_requests:
            return
        await asyncio.sleep(0.025)
    raise AssertionError("no token request reached Kakao within 10 s")
