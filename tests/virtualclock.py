"""Accounts with Kakao's real token lifetimes (6 hours, 60 days) on the emulator's virtual clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import aiohttp

from daemonproc import write_config
from kakao_tokend.config import load_config
from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet

SIX_HOURS = 21599
SIXTY_DAYS = 5183999


async def restarted_on_virtual_clock(
    emulator: KakaoEmulator,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    *,
    access_left: float,
    refresh_left: float,
    account_name: str = "default",
    others: tuple[str, ...] = (),
) -> AccountManager:
    """Return a freshly started manager on the emulator's clock with real-sized tokens.

    The account holds a 6-hour access token with ``access_left`` seconds to go (negative: it
    expired while kakao-tokend was down) and a refresh token with ``refresh_left`` seconds.
    ``others`` are configured before it (the first of them is then the default account).
    """
    config_path = write_config(
        tmp_path, emulator, accounts=(*others, account_name), retry_initial="10s", retry_max="5m"
    )
    config = load_config(config_path)
    account = config.accounts[account_name]
    issued = emulator.now_datetime()
    body = emulator.issue_tokens(refresh_remaining=SIX_HOURS - access_left + refresh_left)
    tokens = TokenSet.from_token_response(body, requested_at=issued)
    # A real refresh token part-way through its 60 days, not one born with refresh_left: the
    # daemon fits its month-long rotation window to a refresh token born shorter.
    tokens = replace(
        tokens, refresh_issued_at=tokens.refresh_expires_at - timedelta(seconds=SIXTY_DAYS)
    )
    store = AccountStore(account)
    store.save(
        AccountState(
            account=account_name, tokens=tokens, refreshed_at=issued, user_id=DEFAULT_USER_ID
        )
    )
    emulator.advance_clock(SIX_HOURS - access_left)
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=KakaoClient(session, account.app, clock=emulator.now_datetime),
        policy=config.refresh,
        clock=emulator.now_datetime,
    )
    manager.load()
    return manager
