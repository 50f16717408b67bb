"""`kakao-tokend import`: adopting a seed-style kakao_token.json, with inferred expiries."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from kakao_tokend.cli import main
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.state import AccountState


def write_config(tmp_path: Path, emulator: KakaoEmulator, *, app_key: str | None = None) -> Path:
    """Write a config pointing at the emulator."""
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[paths]
state_dir = "{tmp_path / "state"}"
runtime_dir = "{tmp_path / "run"}"

[kakao]
rest_api_key = "{app_key or emulator.settings.client_id}"
client_secret = "{emulator.settings.client_secret}"
auth_url = "{emulator.url}"
api_url = "{emulator.url}"
"""
    )
    path.chmod(0o600)
    return path


async def cli(config: Path, *args: str) -> Result:
    """Run the CLI in-process on a worker thread (the emulator serves on this loop)."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, main, ["--config", str(config), *args], catch_exceptions=False
    )


def seed_file(
    tmp_path: Path, body: Any, *, age: float = 0.0, name: str = "kakao_token.json"
) -> Path:
    """Write a file the way the blog script does (json.dump) and backdate its mtime."""
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def saved_state(tmp_path: Path) -> AccountState:
    """Read the account's private state file."""
    return AccountState.from_dict(
        json.loads((tmp_path / "state" / "default.state.json").read_text())
    )


class TestAdopt:
    """A valid seed file becomes the account's state and token file."""

    async def test_expiries_inferred(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """Access expiry comes from access_token_info; refresh expiry from mtime, estimated."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        emulator.advance_clock(1000)  # the access token has been in use for 1000 s
        ten_days = 10 * 86400.0
        path = seed_file(tmp_path, body, age=ten_days)
        before = datetime.now(UTC)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        state = saved_state(tmp_path)
        tokens = state.tokens
        assert tokens.access_token == body["access_token"]
        assert tokens.refresh_token == body["refresh_token"]
        remaining = (tokens.access_expires_at - before).total_seconds()
        assert body["expires_in"] - 1000 - 5 <= remaining <= body["expires_in"] - 1000 + 5
        assert tokens.refresh_expiry_estimated is True
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        expected = mtime + timedelta(seconds=body["refresh_token_expires_in"])
        assert abs((tokens.refresh_expires_at - expected).total_seconds()) <= 1
        assert state.user_id == 1234567890
        published = json.loads((tmp_path / "state" / "default.token.json").read_text())
        assert published["refresh_token_expires_estimated"] is True
        assert "estimated" in result.stdout

    async def test_refresh_expiry_never_later_than_the_access_token_allows(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A freshly touched file (refresh script rewrote it) cannot push the estimate out.

        The refresh token is at least as old as the access token, so its estimated expiry
        counts from the access token's issue time when that is earlier than the mtime.
        """
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        emulator.advance_clock(5000)
        path = seed_file(tmp_path, {**body, "app_key": emulator.settings.client_id}, age=0)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        tokens = saved_state(tmp_path).tokens
        latest_allowed = (
            datetime.now(UTC)
            - timedelta(seconds=5000)
            + timedelta(seconds=body["refresh_token_expires_in"])
        )
        assert tokens.refresh_expires_at <= latest_allowed + timedelta(seconds=5)
        assert "app_key" in result.stderr  # warned that the file was rewritten by a script

    async def test_dead_access_token_is_marked_expired(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """-401 from access_token_info marks the access token expired now (refresh at once)."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        emulator.inject("access_token_info", "-401")
        path = seed_file(tmp_path, body, age=3600)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        tokens = saved_state(tmp_path).tokens
        assert tokens.access_expires_at <= datetime.now(UTC)
        status = await cli(config, "status")
        assert status.exit_code == 1  # warning: access token expired
        assert "access token expired" in status.stdout

    async def test_refuses_to_overwrite_without_force(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """An account with state is not overwritten unless --force; --force bumps generation."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, emulator.issue_tokens())
        assert (await cli(config, "import", str(path))).exit_code == 0
        again = await cli(config, "import", str(path))
        assert again.exit_code == 1
        assert "--force" in again.stderr
        forced = await cli(config, "import", str(path), "--force")
        assert forced.exit_code == 0, forced.output
        assert saved_state(tmp_path).generation == 2

    async def test_refresh_works_after_import(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """The imported refresh token is usable: `refresh` gets a new access token."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        path = seed_file(tmp_path, body, age=60)
        assert (await cli(config, "import", str(path))).exit_code == 0
        result = await cli(config, "refresh")
        assert result.exit_code == 0, result.output
        assert saved_state(tmp_path).tokens.access_token != body["access_token"]


class TestBadFiles:
    """Unusable files: one clear line on stderr and EX_DATAERR (65)."""

    @pytest.mark.parametrize(
        ("body", "needle"),
        [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "JSON object"),
            ({"access_token": 123, "refresh_token": "x"}, "'access_token' must be"),
            (
                # the foss4g variant: a refresh response without refresh_token was dumped
                {"access_token": "abc", "token_type": "bearer", "expires_in": 21599},
                "has no refresh_token",
            ),
            ({"access_token": "a", "refresh_token": "b", "expires_in": "soon"}, "expires_in"),
        ],
    )
    async def test_rejected_with_65(
        self, tmp_path: Path, emulator: KakaoEmulator, body: Any, needle: str
    ) -> None:
        """Each malformed variant exits 65 with one line naming the problem, no traceback."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, body)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 65, result.output
        assert needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output
        assert not (tmp_path / "state" / "default.state.json").exists()

    async def test_missing_file(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """A path that does not exist is a data error too, not a crash."""
        config = write_config(tmp_path, emulator)
        result = await cli(config, "import", str(tmp_path / "nope.json"))
        assert result.exit_code == 65
        assert "no such file" in result.stderr

    async def test_app_key_of_another_app(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """A file whose app_key differs from the configured key is refused (tokens are bound)."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, {**emulator.issue_tokens(), "app_key": "some-other-key"})
        result = await cli(config, "import", str(path))
        assert result.exit_code == 65
        assert "differs from the REST API key" in result.stderr
        assert "some-other-key" not in result.stderr

    async def test_refresh_token_past_estimated_expiry(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A file older than the refresh lifetime cannot be imported: log in instead (77)."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        emulator.inject("access_token_info", "-401")
        path = seed_file(tmp_path, body, age=61 * 86400)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 77
        assert "kakao-tokend login" in result.stderr
