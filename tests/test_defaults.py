"""A real `kakao-tokend run` whose config holds only the required keys, at short time scales."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemonproc import login, short_tokens, start_daemon
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


@pytest.mark.parametrize("kind", ["http500", "reset"])
async def test_one_failed_refresh_of_a_short_token_under_defaults_pages_nobody(
    emulator: KakaoEmulator, tmp_path: Path, kind: str
) -> None:
    """3-second access tokens, the default config, one refresh failure that the immediate retry
    mends: as with Kakao's 6-hour tokens (where the access_expiring alert waits until half the
    last quarter of the life is gone), no CRITICAL line and no KakaoTalk alert. A fixed
    one-second floor on that margin made every single failure of a token under 5 s critical."""
    short_tokens(emulator, access=3, refresh=3600)
    config = required_only_config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("refreshed default", count=1, timeout=15)
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
