"""A real `kakao-tokend run` whose config holds only the required keys, at short time scales."""

from __future__ import annotations

import asyncio
import glob
import re
import time
from pathlib import Path

import pytest

from daemonproc import DaemonProcess, login, short_tokens, start_daemon
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.store import AccountStore


def required_only_config(directory: Path, emulator: KakaoEmulator) -> Path:
    """Write a config with only the keys a config must have: every timing at its default."""
    settings = emulator.settings
    secret = directory / "client_secret"
    secret.write_text(str(settings.client_secret))
    secret.chmod(0o600)
    path = directory / "config.toml"
    path.write_text(
        "\n".join(
            [
                "[paths]",
                f'state_dir = "{directory / "state"}"',
                f'runtime_dir = "{directory / "run"}"',
                "[kakao]",
                f'rest_api_key = "{settings.client_id}"',
                f'client_secret_file = "{secret}"',
                f'auth_url = "{emulator.url}"',
                f'api_url = "{emulator.url}"',
                f'redirect_uri = "{settings.redirect_uris[0]}"',
            ]
        )
        + "\n"
    )
    return path


async def running_daemon(
    emulator: KakaoEmulator, directory: Path, *, access: int, env: dict[str, str] | None = None
) -> tuple[Path, DaemonProcess]:
    """Log in with `access`-second tokens, start a daemon on the required-keys config, and
    wait for its first refresh: the start every scenario here shares."""
    short_tokens(emulator, access=access, refresh=3600)
    config = required_only_config(directory, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config, env=env)
    try:
        await daemon.wait_log("refreshed default", count=1, timeout=15)
    except BaseException:
        await daemon.stop()
        raise
    return config, daemon


@pytest.mark.parametrize("kind", ["http500", "reset"])
async def test_one_failed_refresh_of_a_short_token_under_defaults_pages_nobody(
    emulator: KakaoEmulator, tmp_path: Path, kind: str
) -> None:
    """3-second access tokens, the default config, one refresh failure that the immediate retry
    mends: as with Kakao's 6-hour tokens (where the access_expiring alert waits until half the
    last quarter of the life is gone), no CRITICAL line and no KakaoTalk alert. A fixed
    one-second floor on that margin made every single failure of a token under 5 s critical."""
    config, daemon = await running_daemon(emulator, tmp_path, access=3)
    try:
        emulator.inject("token", kind, count=1)
        await daemon.wait_for(
            lambda: emulator.stats.faults_fired[kind] == 1, timeout=15, what="the fault"
        )
        after = daemon.log_text().count("refreshed default")
        # The retry, then a whole further cycle: time for an alert to have been sent.
        await daemon.wait_log("refreshed default", count=after + 2, timeout=15)
        assert emulator.access_token_valid(daemon.published()["access_token"])
    finally:
        assert await daemon.stop() == 0
    log = daemon.log_text()
    assert "refresh failed" in log  # the fault reached the refresher
    critical = [line for line in log.splitlines() if " CRITICAL " in line]
    assert critical == [], "\n".join(critical)
    assert emulator.inbox() == []
    saved = AccountStore(load_config(config).accounts["default"]).load()
    assert saved is not None
    assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"


async def test_a_login_after_a_dead_refresh_token_is_refreshed_within_the_short_tokens_life(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """3-second access tokens, the default config (heartbeat 60 s): Kakao kills the refresh
    token, the daemon stops and asks for a login; the login's tokens are adopted and then
    refreshed on their own schedule — before the login's 3-second access token expires, not at
    the next minute-long heartbeat twenty lifetimes later."""
    config, daemon = await running_daemon(emulator, tmp_path, access=3)
    try:
        emulator.revoke_user_tokens(emulator.user().id)
        await daemon.wait_log("needs a new login", timeout=15)
        refreshed = daemon.log_text().count("refreshed default")
        relogin = await login(emulator, config)
        await daemon.wait_log("adopted tokens written by another process", timeout=10)
        # Planned at 75-80 % of the login's 3 s: a few lifetimes is generous on a busy machine.
        await daemon.wait_log("refreshed default", count=refreshed + 1, timeout=9)
        published = daemon.published()
        assert published["generation"] > relogin.generation
        assert emulator.access_token_valid(published["access_token"])
    finally:
        assert await daemon.stop() == 0


def _libfaketime() -> str | None:
    """Return Debian's libfaketime, which lets a test step the daemon's wall clock."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


@pytest.mark.skipif(_libfaketime() is None, reason="libfaketime is not installed")
async def test_a_wall_clock_stepped_back_is_noticed_within_the_short_tokens_life(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """3-second access tokens, the default config: the daemon's wall clock steps back 20 s
    (its token now looks issued in the future, and its planned refresh is 20 s away). The
    heartbeat that notices a clock gone back must beat at a share of the token's life, as its
    60 s does for Kakao's 6-hour tokens: a fresh token comes within a couple of lifetimes, not
    when the wall clock has caught up or the minute is over."""
    clock = tmp_path / "faketime.rc"
    clock.write_text("+0\n")
    env = {
        "LD_PRELOAD": str(_libfaketime()),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_CACHE_DURATION": "1",  # the file is re-read at most once a second
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # asyncio's clock stays true
    }
    _, daemon = await running_daemon(emulator, tmp_path, access=3, env=env)
    try:
        refreshed = daemon.log_text().count("refreshed default")
        clock.write_text("-20\n")
        stepped = time.monotonic()
        await daemon.wait_log("refreshed default", count=refreshed + 2, timeout=25)
        took = time.monotonic() - stepped
        assert emulator.access_token_valid(daemon.published()["access_token"])
    finally:
        assert await daemon.stop() == 0
    # Two refreshes after the step: 1 s for libfaketime to read the file, the beat that sees
    # the step (3/8 s), then the next refresh at 75-80 % of 3 s. 20 s would be the catch-up.
    assert took < 8.0, f"{took:.1f}s after the clock went back 20 s"


async def test_a_client_secret_fixed_in_kakaos_console_is_picked_up_by_a_running_daemon(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """6-second access tokens, the default config: the client secret is switched in Kakao's
    console (KOE010, a configuration error) and switched back, with nothing changed in our
    config and no reload. The daemon says so once, critically, keeps asking Kakao at the
    back-off ladder's slowest pace (a twelfth of the lifetime here, not Kakao's real-scale
    minutes), and refreshes again by itself once the console is right."""
    _, daemon = await running_daemon(emulator, tmp_path, access=6)
    try:
        secret = emulator.settings.client_secret
        emulator.regenerate_client_secret()
        await daemon.wait_log("KOE010", timeout=15)
        refused = emulator.stats.requests["token"]
        await daemon.wait_for(
            lambda: emulator.stats.requests["token"] >= refused + 2,
            timeout=6,
            what="two more attempts within one lifetime",
        )
        emulator.set_client_secret(secret)
        refreshed = daemon.log_text().count("refreshed default")
        await daemon.wait_log("refreshed default", count=refreshed + 1, timeout=6)
        assert emulator.access_token_valid(daemon.published()["access_token"])
    finally:
        assert await daemon.stop() == 0
    critical = [line for line in daemon.log_text().splitlines() if " CRITICAL " in line]
    said = [line for line in critical if "Kakao says the configuration is wrong" in line]
    alerted = [line for line in critical if "ALERT critical: account default: config" in line]
    # Once in the log and once as an alert, however many times Kakao refused meanwhile.
    assert len(said) == 1 and len(alerted) == 1 and len(critical) == 2, "\n".join(critical)
    # The slowest step is a twelfth of the 6 s lifetime, less its jitter: not "0s".
    assert "KOE010" in said[0] and re.search(r"tried again in 0\.[1-5]s", said[0]), said[0]
    assert "picked up by itself" in said[0] and "picked up by itself" in alerted[0]


@pytest.mark.slow(seconds=16)
async def test_one_hung_refresh_late_in_the_jitter_window_pages_nobody(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """12-second access tokens, `[kakao] timeout` at its default, the refresh planned at the
    latest moment of the default jitter window (80 %: refresh_at and jitter pinned there, so
    the case is the same every run), and Kakao hangs on that one request: the daemon gives up
    in time for a retry before `access_expiring` may page (with 10 % of the life left), the
    retry refreshes, and no critical line or alert is raised — as for a 6-hour token, whose
    30 s timeout leaves dozens of retries before that page. With the timeout at 1/8 of the
    life the hang ended at 92.5 %, and that one request paged a critical alert."""
    short_tokens(emulator, access=12, refresh=3600)
    config = required_only_config(tmp_path, emulator)
    with config.open("a") as file:
        file.write('[refresh]\nrefresh_at = "80%"\njitter = "0%"\n')
    state = await login(emulator, config)
    emulator.inject("token", "timeout", delay=60.0, count=1)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(
            lambda: emulator.stats.faults_fired["timeout"] == 1, timeout=20, what="the hang"
        )
        await daemon.wait_log("refreshed default", timeout=12)
        published = daemon.published()
        assert published["generation"] > state.generation
        assert emulator.access_token_valid(published["access_token"])
        # Past the moment the old token would have expired: time for any page to be sent.
        await asyncio.sleep(
            max(0.0, 12 - (time.time() - state.tokens.access_issued_at.timestamp()))
        )
    finally:
        assert await daemon.stop() == 0
    log = daemon.log_text()
    assert "did not answer /oauth/token within" in log  # the hang reached the refresher
    critical = [line for line in log.splitlines() if " CRITICAL " in line]
    assert critical == [], "\n".join(critical)
    assert emulator.inbox() == []
