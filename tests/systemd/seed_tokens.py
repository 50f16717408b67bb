"""Seed an account's tokens inside the nspawn test container by logging in against the emulator."""

# Runs INSIDE the container with the installed package (/opt/kakao-tokend/bin/python), under
# `systemd-run` with the unit's user, StateDirectory and LoadCredential, so the files it writes
# have exactly the owner and modes the service would give them. Same recipe as
# tests/daemonproc.py `login()` (the emulator's consent=auto redirects at once).

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from kakao_tokend.config import load_config
from kakao_tokend.kakao import KakaoClient, create_session, new_pkce_pair, new_state
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore


async def wait_for(url: str, timeout: float) -> None:
    """Wait until ``url`` answers at all (the emulator unit has no readiness notification)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{url}/_emulator/stats") as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"seed: the emulator at {url} did not answer in {timeout}s"
                    ) from None
                await asyncio.sleep(0.2)


async def seed(config_path: Path, account: str) -> AccountState:
    """Log ``account`` in (auth code + PKCE) and save + publish its state like `login` does."""
    config = load_config(config_path)
    settings = config.accounts[account]
    await wait_for(settings.app.auth_url, 30.0)
    session = create_session()
    try:
        client = KakaoClient(session, settings.app)
        verifier, challenge = new_pkce_pair()
        url = client.authorize_url(state=new_state(), code_challenge=challenge)
        async with session.get(url, allow_redirects=False) as response:
            location = response.headers["Location"]
        code = parse_qs(urlsplit(location).query)["code"][0]
        tokens = await client.exchange_code(code=code, code_verifier=verifier)
        me = await client.user_me(tokens.access_token)
    finally:
        await session.close()
    store = AccountStore(settings)
    with store.lock():
        state = AccountState(
            account=account,
            tokens=tokens,
            refreshed_at=tokens.access_issued_at,
            user_id=me["id"],
            generation=1,
        )
        store.save(state)
        store.publish(state)
    return state


def main(argv: list[str]) -> int:
    """``seed_tokens.py CONFIG [ACCOUNT]``: print where the state went."""
    config_path = Path(argv[1])
    account = argv[2] if len(argv) > 2 else "default"
    state = asyncio.run(seed(config_path, account))
    print(f"seed: {account} logged in as user {state.user_id}, generation {state.generation}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
