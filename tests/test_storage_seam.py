"""The refresher works against the store's seam (storage.AccountStorage): hold, commit, publish.

Fleet mode's PostgreSQL store commits a refresh when the account's hold ends (docs/fleet.md:
claim, call Kakao under the row lock, compare-and-swap, NOTIFY, COMMIT, then publish). These
tests run the real refresher against the emulator with the file store, instrumented at the
seam, and prove the two promises the refresh logic keeps for any backend: nothing is
published or announced before the hold ends (the commit), and a commit that fails as the
hold ends never loses the rotated refresh token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemonproc import login, write_config
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.errors import StoreWriteError
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.status import AccountEvent, Health
from kakao_tokend.store import AccountStore

pytestmark = pytest.mark.timeout(60)


class WatchedStore(AccountStore):
    """The file store, with the end of each hold observable and its commit able to fail."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_commit = False
        #: At the end of each hold: (token file generation, events delivered so far).
        self.at_commit: list[tuple[int | None, int]] = []
        self.events: list[AccountEvent] = []

    @asynccontextmanager
    async def hold(self, wait: float, *, decided_on: int | None = None) -> AsyncIterator[None]:
        async with super().hold(wait, decided_on=decided_on):
            yield
            published = self.read_published()
            self.at_commit.append(
                (published["generation"] if published else None, len(self.events))
            )
            if self.fail_commit:
                self.fail_commit = False
                raise StoreWriteError("COMMIT failed: the connection to the store was lost")


async def watched_manager(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> tuple[AccountManager, WatchedStore]:
    config_path = write_config(tmp_path, emulator)
    await login(emulator, config_path)
    config = load_config(config_path)
    account = config.account()
    store = WatchedStore(account, rescue_dir=config.runtime_dir)
    manager = AccountManager(
        account, store=store, client=KakaoClient(session, account.app), policy=config.refresh
    )
    manager.listeners.append(store.events.append)
    manager.load()
    return manager, store


async def test_nothing_is_published_or_announced_before_the_hold_ends(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """When the hold ends (the commit) the token file still holds the old generation and no
    event has gone out; right after, the new one is published and announced."""
    manager, store = await watched_manager(emulator, tmp_path, session)
    await manager.refresh(force=True, reason="test")
    assert manager.state is not None and manager.state.generation == 2
    assert store.at_commit == [(1, 0)]
    published = store.read_published()
    assert published is not None and published["generation"] == 2
    assert [event.kind for event in store.events][-1] == "refreshed"


async def test_a_commit_that_fails_as_the_hold_ends_keeps_the_rotated_token(
    emulator: KakaoEmulator, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Kakao rotated, then the commit failed: the new tokens stay in memory and in the
    rescue file, are served (published) from memory, and are written once the store works."""
    emulator.settings.rotation_window = emulator.settings.refresh_lifetime  # always rotate
    manager, store = await watched_manager(emulator, tmp_path, session)
    store.fail_commit = True
    await manager.refresh(force=True, reason="test")
    state = manager.state
    assert state is not None and state.generation == 2 and state.rotations
    assert manager.status.write_pending
    assert "COMMIT failed" in (manager.status.write_error or "")
    assert store.rescue_path is not None
    rescued = json.loads(store.rescue_path.read_text())["state"]
    assert rescued["tokens"]["refresh_token"] == state.tokens.refresh_token
    published = store.read_published()
    assert published is not None and published["access_token"] == state.tokens.access_token
    assert [e.kind for e in store.events].count("write_failed") == 1
    assert manager.health().names()[0] == "write_failed"

    assert await manager.flush()  # the pending write, tried again holding the account
    assert not manager.status.write_pending
    assert manager.status.health is Health.OK
    saved = store.load()
    assert saved is not None and saved.tokens.refresh_token == state.tokens.refresh_token
    assert not store.rescue_path.exists()
    assert "write_ok" in [e.kind for e in store.events]
