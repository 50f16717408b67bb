"""`kakao-tokend demo`: the real service against an in-process emulator, with second-long tokens.

A newcomer sees the whole life of a token set in a minute: login, refreshes at 75 % of each
access token's life, and the refresh-token rotation that seed-style scripts never save.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from .config import load_config
from .emulator import EmulatorSettings, running_emulator
from .kakao import KakaoClient, create_session, new_pkce_pair, new_state
from .refresher import AccountEvent
from .service import serve
from .state import AccountState
from .store import AccountStore
from .systemd import setup_logging
from .tokens import format_duration

log = logging.getLogger("kakao_tokend.demo")

DEMO_ACCESS_LIFETIME = 8.0
DEMO_REFRESH_LIFETIME = 40.0
DEMO_ROTATION_WINDOW = 20.0

CONFIG_TEMPLATE = """\
# Written by `kakao-tokend demo`: the emulator stands in for kauth/kapi.kakao.com.
log_level = "info"

[paths]
state_dir = "{state_dir}"
runtime_dir = "{runtime_dir}"

[kakao]
rest_api_key = "{client_id}"
client_secret = "{client_secret}"
auth_url = "{url}"
api_url = "{url}"
redirect_uri = "{redirect_uri}"
scopes = ["talk_message"]
timeout = "5s"
connect_timeout = "2s"

[refresh]
heartbeat = "1s"
retry_initial = "1s"
retry_max = "2s"
rotation_window = "{rotation_window}s"
"""


async def auto_login(
    client: KakaoClient, session: aiohttp.ClientSession, account: str = "default"
) -> AccountState:
    """Do the browser's part of the login against the emulator (which consents by itself).

    Also used by the tests and benchmarks that need a logged-in account quickly.
    """
    verifier, challenge = new_pkce_pair()
    state = new_state()
    url = client.authorize_url(state=state, code_challenge=challenge)
    async with session.get(url, allow_redirects=False) as response:
        location = response.headers["Location"]
    query = parse_qs(urlsplit(location).query)
    if query.get("state") != [state]:
        raise RuntimeError("the emulator returned a different state")
    tokens = await client.exchange_code(code=query["code"][0], code_verifier=verifier)
    me = await client.user_me(tokens.access_token)
    return AccountState(
        account=account, tokens=tokens, refreshed_at=tokens.access_issued_at, user_id=me["id"]
    )


def _print_event(event: AccountEvent) -> None:
    if event.kind == "rotated":
        print(
            f"  ↻ rotation: Kakao issued a new refresh token ({event.data['fingerprint']});"
            " it is already on disk, the old one is dead now"
        )
    elif event.kind in ("relogin", "config", "write_failed"):
        print(f"  ! {event.message}")


async def run_demo_async(duration: float | None, workdir: Path) -> int:
    """Run the emulator and the service together until ``duration`` passes or Ctrl+C."""
    settings = EmulatorSettings(
        access_lifetime=DEMO_ACCESS_LIFETIME,
        refresh_lifetime=DEMO_REFRESH_LIFETIME,
        rotation_window=DEMO_ROTATION_WINDOW,
        # Second-long tokens refresh far more often than Kakao's per-hour limits allow.
        access_rate=(100_000, 600),
        refresh_rate=(100_000, 3600),
    )
    async with running_emulator(settings) as emulator:
        state_dir = workdir / "state"
        config_path = workdir / "config.toml"
        config_path.touch(mode=0o600)
        config_path.chmod(0o600)  # it holds the emulator's client secret inline
        config_path.write_text(
            CONFIG_TEMPLATE.format(
                state_dir=state_dir,
                runtime_dir=workdir / "run",
                client_id=settings.client_id,
                client_secret=settings.client_secret,
                url=emulator.url,
                redirect_uri=settings.redirect_uris[0],
                rotation_window=int(DEMO_ROTATION_WINDOW),
            )
        )
        config = load_config(config_path)
        account = config.accounts["default"]
        session = create_session()
        try:
            state = await auto_login(KakaoClient(session, account.app), session)
        finally:
            await session.close()
        store = AccountStore(account)
        with store.lock():
            store.save(state)
            store.publish(state)
        print(f"kakao-tokend demo — emulator at {emulator.url}")
        print(f"  config:      {config_path}")
        print(f"  token file:  {account.token_file}   (what your programs read)")
        print(f"  state file:  {account.state_file}   (private, mode 0600)")
        print(
            f"  access tokens live {format_duration(DEMO_ACCESS_LIFETIME)}, refresh tokens"
            f" {format_duration(DEMO_REFRESH_LIFETIME)}; Kakao rotates the refresh token once"
            f" less than {format_duration(DEMO_ROTATION_WINDOW)} is left."
        )
        print("  logged in; the service now keeps the tokens fresh. Ctrl+C stops.\n")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(duration, stop.set) if duration else None
        try:
            return await serve(config, config_path=config_path, stop=stop, listeners=[_print_event])
        finally:
            if timer:
                timer.cancel()
            stats = emulator.stats
            print(
                f"\ndemo over: {stats.refreshes_ok} refreshes, {stats.rotations} rotations;"
                f" the token file is {account.token_file}"
            )


def run_demo(duration: float | None = None, workdir: Path | None = None) -> int:
    """`kakao-tokend demo`: set up logging, pick a temporary directory, run until done."""
    setup_logging("info")
    # Ctrl+C is handled by the service (a clean stop); keep the default for the brief setup.
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="kakao-tokend-demo-"))
            )
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            code = asyncio.run(run_demo_async(duration, workdir))
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
    log.debug("demo ran %.1fs", time.monotonic() - started)
    return code
