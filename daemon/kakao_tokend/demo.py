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
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from .alerts import Alert
from .config import AccountConfig, AlertsConfig, RefreshPolicy, load_config
from .emulator import EmulatorSettings, running_emulator
from .health import assess
from .kakao import KakaoClient, create_session, new_pkce_pair, new_state
from .service import serve
from .state import AccountState
from .status import AccountEvent, AccountStatus, EventKind
from .store import AccountStore
from .systemd import setup_logging
from .tokens import KAKAO_REFRESH_LIFETIME, format_duration, utcnow

log = logging.getLogger("kakao_tokend.demo")

DEMO_ACCESS_LIFETIME = 8.0
DEMO_REFRESH_LIFETIME = 40.0
DEMO_ROTATION_WINDOW = 20.0
#: A real alert shown on purpose: the last expiry threshold of a real 2-month refresh token.
DEMONSTRATED_REFRESH_LEFT = 23 * 3600.0

DEMO_CONFIG_HEAD = """\
# Written by `kakao-tokend demo`: the emulator stands in for kauth/kapi.kakao.com.
log_level = "info"

[paths]
state_dir = "{state_dir}"
runtime_dir = "{runtime_dir}"

"""


def _seconds(value: float) -> str:
    """A duration for the config in its largest whole unit ("30d", "6h") or to the millisecond."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f'"{int(value // size)}{unit}"'
    return f'"{round(value, 3):g}s"'


def scaled_alerts(settings: EmulatorSettings) -> AlertsConfig:
    """Return [alerts] timings scaled from Kakao's lifetimes to the emulator's.

    The refresh-token expiry thresholds (14d 7d 3d 1d of a 60-day token) shrink in proportion,
    and any that a healthy daemon could still cross before its next refresh rotates the token
    (the rotation window minus one access lifetime) is dropped: against the emulator, as
    against Kakao, an expiry alert then always means that something is really wrong.
    """
    real = AlertsConfig()
    scale = min(1.0, settings.refresh_lifetime / KAKAO_REFRESH_LIFETIME)
    latest_healthy = settings.rotation_window - settings.access_lifetime
    thresholds = tuple(t * scale for t in real.thresholds if t * scale < latest_healthy)
    if not thresholds:  # a window shorter than one access lifetime: keep a last warning
        thresholds = (real.thresholds[-1] * scale,)
    return replace(
        real,
        thresholds=thresholds,
        critical_below=real.critical_below * scale,
        # No more often than once per access lifetime (Kakao's: 1 day against 6 hours).
        repeat=max(real.repeat * scale, settings.access_lifetime),
    )


def emulator_config(settings: EmulatorSettings, url: str) -> str:
    """Return the [kakao], [refresh] and [alerts] sections that fit the emulator at ``url``.

    The rotation window is the emulator's (else every refresh near the end of a short refresh
    token warns of a missed rotation) and the alert timings are scaled to its lifetimes
    (else a 40-second refresh token raises a critical "expires in 38s" alert at once).
    """
    alerts = scaled_alerts(settings)
    # No timeout, heartbeat or retry here: left out, the daemon fits them to each token's
    # lifetime (config.KakaoApp.request_timeouts, tokens.heartbeat_interval, backoff_delay);
    # written into a config they count as set by hand and are used as written.
    secret = settings.client_secret
    lines = [
        "# kakao-tokend config for the Kakao emulator at " + url,
        f"# (its tokens: access {format_duration(settings.access_lifetime)}, refresh"
        f" {format_duration(settings.refresh_lifetime)}, rotated with less than"
        f" {format_duration(settings.rotation_window)} left; alert timings scaled to match)",
        "[kakao]",
        f'rest_api_key = "{settings.client_id}"',
        *([f'client_secret = "{secret}"'] if secret is not None else []),
        f'auth_url = "{url}"',
        f'api_url = "{url}"',
        f'redirect_uri = "{settings.redirect_uris[0]}"',
        'scopes = ["talk_message"]',
        "",
        "[refresh]",
        f"rotation_window = {_seconds(settings.rotation_window)}",
        "",
        "[alerts]",
        "thresholds = [" + ", ".join(_seconds(t) for t in alerts.thresholds) + "]",
        f"critical_below = {_seconds(alerts.critical_below)}",
        f"repeat = {_seconds(alerts.repeat)}",
        "# end of config",
    ]
    return "\n".join(lines) + "\n"


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


def demonstration_alert(account: AccountConfig, state: AccountState, client: KakaoClient) -> Alert:
    """Return the alert a person would get a day before a real refresh token dies.

    The real grading words it (health.assess with Kakao's real thresholds), for a copy of
    the demo's token set whose refresh token has DEMONSTRATED_REFRESH_LEFT left.
    """
    now = utcnow()
    doomed = replace(
        state.tokens, refresh_expires_at=now + timedelta(seconds=DEMONSTRATED_REFRESH_LEFT)
    )
    status = AccountStatus()
    status.adopted(state)
    graded = assess(
        account, replace(state, tokens=doomed), status, RefreshPolicy(), now, alerts=AlertsConfig()
    )
    (condition,) = [c for c in graded.conditions if c.name == "refresh_expiry"]
    return Alert(
        account.name,
        condition.name,
        condition.severity,
        "firing",
        condition.message,
        condition.action,
        now,
    )


def _print_event(event: AccountEvent) -> None:
    if event.kind is EventKind.ROTATED:
        print(
            f"  ↻ rotation: Kakao issued a new refresh token ({event.data['fingerprint']});"
            " it is already on disk, the old one is dead now"
        )
    elif event.kind in (EventKind.RELOGIN, EventKind.CONFIG, EventKind.WRITE_FAILED):
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
            DEMO_CONFIG_HEAD.format(state_dir=state_dir, runtime_dir=workdir / "run")
            + emulator_config(settings, emulator.url)
        )
        config = load_config(config_path)
        account = config.accounts["default"]
        session = create_session()
        try:
            client = KakaoClient(session, account.app)
            state = await auto_login(client, session)
            demonstration = demonstration_alert(account, state, client)
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
        print(
            "  Nothing here needs you, so no alert will fire. This is what a real one looks like"
            " (in the log, and on KakaoTalk, a webhook or a command if configured):"
        )
        print(f"  ⚑ [DEMONSTRATION — nothing is wrong] {demonstration.text()}")
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
