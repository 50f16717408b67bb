"""`kakao-tokend import`: adopting a seed-style kakao_token.json, with inferred expiries."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from daemonproc import write_config
from kakao_tokend.cli import main
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.state import AccountState


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


async def refresh_at_kakao(emulator: KakaoEmulator, refresh_token: str) -> dict[str, Any]:
    """Refresh the way a blog script does (a plain POST), returning Kakao's raw answer."""
    form = {
        "grant_type": "refresh_token",
        "client_id": emulator.settings.client_id,
        "client_secret": str(emulator.settings.client_secret),
        "refresh_token": refresh_token,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{emulator.url}/oauth/token", data=form) as response,
    ):
        answer: dict[str, Any] = await response.json()
        assert response.status == 200, answer
        return answer


async def koe322_victim(emulator: KakaoEmulator) -> dict[str, Any]:
    """The file of a blog-script user whose refresh token Kakao rotated out.

    The script refreshed inside the last month, saved the new access token and app_key, and
    dropped the rotated refresh token Kakao sent along: the old one is dead from then on.
    """
    body = emulator.issue_tokens(refresh_remaining=20 * 86400)
    answer = await refresh_at_kakao(emulator, body["refresh_token"])
    assert answer["refresh_token"] != body["refresh_token"]  # Kakao rotated it
    assert emulator.refresh_token_status(body["refresh_token"]) == "retired"
    return {**body, "access_token": answer["access_token"], "app_key": emulator.settings.client_id}


def saved_state(tmp_path: Path) -> AccountState:
    """Read the account's private state file."""
    return AccountState.from_dict(
        json.loads((tmp_path / "state" / "default.state.json").read_text())
    )


class TestAdopt:
    """A valid seed file becomes the account's state and token file."""

    async def test_expiries_inferred(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """Access expiry comes from the checking refresh (a new access token, full life);
        refresh expiry from mtime, estimated (Kakao says it only when it rotates)."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        emulator.advance_clock(1000)  # the access token has been in use for 1000 s
        path = seed_file(tmp_path, body, age=1000)  # written right after the login
        before = datetime.now(UTC)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        state = saved_state(tmp_path)
        tokens = state.tokens
        assert tokens.access_token != body["access_token"]
        assert emulator.access_token_valid(tokens.access_token)
        assert tokens.refresh_token == body["refresh_token"]
        remaining = (tokens.access_expires_at - before).total_seconds()
        assert body["expires_in"] - 5 <= remaining <= body["expires_in"] + 5
        assert tokens.refresh_expiry_estimated is True
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        expected = mtime + timedelta(seconds=body["refresh_token_expires_in"])
        assert abs((tokens.refresh_expires_at - expected).total_seconds()) <= 2
        assert state.user_id == 1234567890
        published = json.loads((tmp_path / "state" / "default.token.json").read_text())
        assert published["refresh_token_expires_estimated"] is True
        assert "estimated" in result.stdout

    @pytest.mark.parametrize("value", ["missing", None])
    async def test_a_file_without_the_refresh_tokens_life_is_adopted_with_a_warning(
        self, tmp_path: Path, emulator: KakaoEmulator, value: str | None
    ) -> None:
        """A blog-recipe kakao_token.json without ``refresh_token_expires_in`` (or with null):
        adopted, the refresh token's expiry Kakao's documented 60 days from the file's age,
        estimated, and the CLI warns that the file did not say."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        if value == "missing":
            del body["refresh_token_expires_in"]
        else:
            body["refresh_token_expires_in"] = value
        path = seed_file(tmp_path, body, age=100)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        tokens = saved_state(tmp_path).tokens
        assert tokens.refresh_token == body["refresh_token"]
        assert tokens.refresh_expiry_estimated is True
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        expected = mtime + timedelta(seconds=5183999)
        assert abs((tokens.refresh_expires_at - expected).total_seconds()) <= 2
        assert "does not say how long the refresh token lives" in result.stderr
        assert body["refresh_token"] not in result.output

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

    async def test_rejected_access_token_is_replaced_by_one_refresh(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """-401 from access_token_info: one refresh checks the refresh token and is saved."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        emulator.inject("access_token_info", "-401")
        path = seed_file(tmp_path, body, age=3600)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        tokens = saved_state(tmp_path).tokens
        assert tokens.refresh_token == body["refresh_token"]  # outside the window: no rotation
        assert tokens.access_token != body["access_token"]
        assert emulator.access_token_valid(tokens.access_token)
        assert "Kakao accepted the refresh token (one refresh)" in result.stdout
        status = await cli(config, "status")
        assert status.exit_code == 0, status.output

    async def test_refuses_to_overwrite_without_force(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """An account with state is not overwritten unless --force; --force bumps generation.
        The hint's command for another account keeps the --config a plain run would not find."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, emulator.issue_tokens())
        assert (await cli(config, "import", str(path))).exit_code == 0
        again = await cli(config, "import", str(path))
        assert again.exit_code == 1
        assert "--force" in again.stderr
        assert f"kakao-tokend --config {config} --account NEW import FILE" in again.stderr
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
            # deeper than Python's parser recurses: was "internal error: RecursionError", 70
            ("[" * 20000 + "]" * 20000, "not valid JSON"),
            ("[1, 2]", "JSON object"),
            ({"access_token": 123, "refresh_token": "x"}, "'access_token' must be"),
            (
                # the foss4g variant: a refresh response without refresh_token was dumped
                {"access_token": "abc", "token_type": "bearer", "expires_in": 21599},
                "has no refresh_token",
            ),
            ({"access_token": "a", "refresh_token": "b", "expires_in": "soon"}, "expires_in"),
            # Numbers json.loads accepts that no lifetime can be (an overflow or NaN later).
            (
                '{"access_token": "a", "refresh_token": "b", "expires_in": 1' + "0" * 30 + "}",
                "'expires_in' must be",
            ),
            (
                '{"access_token": "a", "refresh_token": "b", "expires_in": Infinity}',
                "'expires_in' must be",
            ),
            (
                '{"access_token": "a", "refresh_token": "b", "expires_in": NaN}',
                "'expires_in' must be",
            ),
            (
                '{"access_token": "a", "refresh_token": "b", "refresh_token_expires_in": 1e300}',
                "'refresh_token_expires_in' must be",
            ),
            # What the blog recipe saves when its code exchange failed: Kakao's error answer.
            (
                {
                    "error": "invalid_grant",
                    "error_description": "authorization code not found for code=abc",
                    "error_code": "KOE320",
                },
                "holds Kakao's error answer (KOE320), not tokens",
            ),
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

    async def test_a_file_in_another_encoding_is_named_as_such(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A file re-saved in CP949 (a Korean Windows editor's default) is "not UTF-8", with
        the fix, not "not valid JSON"."""
        config = write_config(tmp_path, emulator)
        path = tmp_path / "kakao_token.json"
        path.write_bytes(
            json.dumps({**emulator.issue_tokens(), "memo": "토큰"}, ensure_ascii=False).encode(
                "cp949"
            )
        )
        result = await cli(config, "import", str(path))
        assert result.exit_code == 65, result.output
        assert "is not UTF-8 text" in result.stderr and "CP949" in result.stderr

    async def test_a_byte_order_mark_before_the_json_is_accepted(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """Notepad's "UTF-8" puts an invisible byte-order mark first; the file is meant as
        UTF-8 JSON and is imported."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        path = tmp_path / "kakao_token.json"
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(body).encode())
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        assert saved_state(tmp_path).tokens.refresh_token == body["refresh_token"]

    @pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
    async def test_a_file_that_is_no_token_file_is_refused_without_reading_it(
        self, tmp_path: Path, emulator: KakaoEmulator, kind: str
    ) -> None:
        """A FIFO (the read would block for ever), a device (/dev/zero: never ends) or a huge
        file is refused at once with exit 65."""
        config = write_config(tmp_path, emulator)
        if kind == "fifo":
            path = tmp_path / "kakao_token.json"
            os.mkfifo(path)
        elif kind == "device":
            path = Path("/dev/zero")
        else:
            path = tmp_path / "kakao_token.json"
            body = json.dumps(emulator.issue_tokens()).encode()
            path.write_bytes(body + b" " * (1024 * 1024))  # valid JSON, but no token file
        result = await asyncio.wait_for(cli(config, "import", str(path)), 20)
        assert result.exit_code == 65, result.output
        assert "Traceback" not in result.output

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
        assert f"kakao-tokend --config {config} login" in result.stderr


class TestVerification:
    """Import asks Kakao before adopting a file; a dead token is refused with 77."""

    async def test_rotated_out_refresh_token_is_refused_with_77(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """The KOE322 victim's file (dead refresh token) is refused, with the login command.

        Before the check, this file was imported with exit 0 and "(in 59d) (estimated)".
        """
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, await koe322_victim(emulator), age=2 * 86400)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 77, result.output
        assert "Kakao refused its refresh token (KOE322)" in result.stderr
        assert f"run `kakao-tokend --config {config} login` to get new tokens" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""
        assert not (tmp_path / "state" / "default.state.json").exists()
        assert not (tmp_path / "state" / "default.token.json").exists()

    async def test_live_access_token_does_not_vouch_for_the_refresh_token(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A script-rewritten file whose access token still works is checked with a refresh.

        The script saved the access token of the refresh that rotated its refresh token out,
        so access_token_info says yes while the refresh token is dead.
        """
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, await koe322_victim(emulator), age=60)
        before = emulator.stats.requests["access_token_info"]
        result = await cli(config, "import", str(path))
        assert result.exit_code == 77, result.output
        assert emulator.stats.requests["access_token_info"] == before + 1
        assert "KOE322" in result.stderr
        assert not (tmp_path / "state" / "default.state.json").exists()

    async def test_other_account_gets_the_account_flag_in_the_login_command(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """The login command in the refusal is one that runs: --account (for an account that
        is not the default one) and --config (for a file not found by default) go first."""
        config = write_config(tmp_path, emulator)
        with config.open("a") as handle:
            handle.write("[accounts.default]\n[accounts.bot]\n")
        path = seed_file(tmp_path, await koe322_victim(emulator), age=2 * 86400)
        result = await cli(config, "--account", "bot", "import", str(path))
        assert result.exit_code == 77, result.output
        assert f"run `kakao-tokend --config {config} --account bot login`" in result.stderr

    async def test_a_rotation_during_the_check_is_saved(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """Inside the rotation window the check's refresh rotates; the new token is kept."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens(refresh_remaining=10 * 86400)
        path = seed_file(tmp_path, body, age=60)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        state = saved_state(tmp_path)
        assert state.tokens.refresh_token != body["refresh_token"]
        assert emulator.refresh_token_status(state.tokens.refresh_token) == "live"
        assert emulator.refresh_token_status(body["refresh_token"]) == "retired"
        assert len(state.rotations) == 1
        assert state.tokens.refresh_expiry_estimated is False  # Kakao said how long it lives
        published = json.loads((tmp_path / "state" / "default.token.json").read_text())
        assert published["access_token"] == state.tokens.access_token
        assert "ROTATED" in result.stdout
        assert "its copy of the refresh token is dead now" in result.stdout

    async def test_a_fresh_login_file_is_confirmed_with_one_refresh(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A file as login left it (live access token, far from rotation): its refresh token is
        still tested, with one refresh that does not rotate it."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        path = seed_file(tmp_path, body, age=600)
        refreshes = emulator.stats.refreshes_ok
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        assert emulator.stats.refreshes_ok == refreshes + 1
        assert saved_state(tmp_path).tokens.refresh_token == body["refresh_token"]
        assert "Kakao accepted the refresh token (one refresh)" in result.stdout

    async def test_a_live_access_token_never_vouches_for_the_refresh_token(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A refresh script that saves only the new access token (no app_key, a fresh file
        time) leaves a dead refresh token beside a live access token: refused, KOE322."""
        config = write_config(tmp_path, emulator)
        victim = await koe322_victim(emulator)
        del victim["app_key"]
        victim["refresh_token_expires_in"] = 5183999  # as the login's answer said
        path = seed_file(tmp_path, victim, age=60)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 77, result.output
        assert "KOE322" in result.stderr
        assert not (tmp_path / "state" / "default.state.json").exists()

    async def test_forcing_an_old_file_over_rotated_tokens_is_refused(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """`import --force` of the file whose refresh token kakao-tokend has since rotated
        out is refused, and the live tokens stay as they were."""
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens(refresh_remaining=10 * 86400)
        path = seed_file(tmp_path, {**body, "refresh_token_expires_in": 5183999}, age=60)
        assert (await cli(config, "import", str(path))).exit_code == 0
        assert (await cli(config, "refresh")).exit_code == 0
        live = saved_state(tmp_path)
        assert emulator.refresh_token_status(body["refresh_token"]) == "retired"
        forced = await cli(config, "import", str(path), "--force")
        assert forced.exit_code == 77, forced.output
        assert saved_state(tmp_path) == live
        assert emulator.refresh_token_status(live.tokens.refresh_token) == "live"

    async def test_forced_import_keeps_a_copy_of_the_tokens_it_replaces(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """`import --force --no-verify` trusts the file; the state it replaces is kept beside
        it as .replaced-<stamp>, so a refresh token it held is never gone for good."""
        config = write_config(tmp_path, emulator)
        first = seed_file(tmp_path, emulator.issue_tokens(), age=60)
        assert (await cli(config, "import", str(first))).exit_code == 0
        replaced = (tmp_path / "state" / "default.state.json").read_bytes()
        second = seed_file(tmp_path, emulator.issue_tokens(), age=60, name="other.json")
        forced = await cli(config, "import", str(second), "--force", "--no-verify")
        assert forced.exit_code == 0, forced.output
        copies = list((tmp_path / "state").glob("default.state.json.replaced-*"))
        assert [c.read_bytes() for c in copies] == [replaced]
        assert str(copies[0]) in forced.stdout

    async def test_an_imported_blog_token_completes_kakaos_signup(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """The blog script never calls a user-info API, and Kakao unlinks users who made none
        within a day of their first login. `import` makes that call (/v2/user/me), so the
        grant still lives a day later."""
        emulator.settings.auto_unlink_incomplete_signup = True
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        assert not emulator.user().personal_info_called
        result = await cli(config, "import", str(seed_file(tmp_path, body, age=600)))
        assert result.exit_code == 0, result.output
        assert emulator.user().personal_info_called
        assert saved_state(tmp_path).user_id == emulator.user().id
        emulator.advance_clock(emulator.settings.incomplete_signup_window + 3600)
        assert emulator.user().linked
        await refresh_at_kakao(emulator, body["refresh_token"])  # asserts a 200

    async def test_no_verify_asks_kakao_nothing(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """--no-verify imports offline: no request at all, and the output says it is unchecked
        and which status command (with the --config given) to watch."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, await koe322_victim(emulator), age=2 * 86400)
        requests = sum(emulator.stats.requests.values())
        result = await cli(config, "import", str(path), "--no-verify")
        assert result.exit_code == 0, result.output
        assert sum(emulator.stats.requests.values()) == requests
        assert "NOT checked with Kakao (--no-verify)" in result.stdout
        assert f"watch `kakao-tokend --config {config} status`" in result.stdout
        tokens = saved_state(tmp_path).tokens
        assert tokens.access_expires_at <= datetime.now(UTC)  # the daemon refreshes at once

    @pytest.mark.parametrize(("endpoint", "age"), [("access_token_info", 60), ("token", 86400)])
    async def test_kakao_out_of_reach_refuses_with_69(
        self, tmp_path: Path, emulator: KakaoEmulator, endpoint: str, age: float
    ) -> None:
        """When Kakao cannot answer, nothing is imported and --no-verify is offered (69)."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, emulator.issue_tokens(), age=age)
        emulator.inject(endpoint, "http503", count=10)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 69, result.output
        assert "--no-verify" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "state" / "default.state.json").exists()


class TestAfterImport:
    """What the user is told to do once the tokens are adopted."""

    async def test_next_steps_name_the_old_refresher_and_the_file(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """Stop the old refresher (cron, timers) and delete or chmod 600 the old file."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, emulator.issue_tokens(), age=60)
        path.chmod(0o600)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        assert "crontab -l" in result.stdout and "systemctl list-timers" in result.stdout
        assert f"rm {path}" in result.stdout and f"chmod 600 {path}" in result.stdout
        assert "readable by" not in result.stderr

    @pytest.mark.parametrize(
        ("mode", "who"), [(0o644, "every user on this machine"), (0o640, "the file's group")]
    )
    async def test_a_file_others_can_read_is_called_out(
        self, tmp_path: Path, emulator: KakaoEmulator, mode: int, who: str
    ) -> None:
        """An old file readable by group or others gets a warning naming who can read it."""
        config = write_config(tmp_path, emulator)
        path = seed_file(tmp_path, emulator.issue_tokens(), age=60)
        path.chmod(mode)
        result = await cli(config, "import", str(path))
        assert result.exit_code == 0, result.output
        assert f"{path} is readable by {who} (mode {mode:04o})" in result.stderr

    async def test_a_short_refresh_token_from_a_file_gets_alerts_of_its_own_scale(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A file from an emulator issuing 10-minute refresh tokens (it says so:
        refresh_token_expires_in 600): the default alert ladder keeps its share of that life,
        as after a login, so a fresh import is not "critical: expires in 9m"."""
        emulator.settings.access_lifetime = 60
        emulator.settings.refresh_lifetime = 600
        emulator.settings.rotation_window = 300
        config = write_config(tmp_path, emulator, rotation_window=300)
        path = seed_file(tmp_path, emulator.issue_tokens(), age=5)
        assert (await cli(config, "import", str(path))).exit_code == 0
        status = await cli(config, "status")
        assert status.exit_code == 0, status.output
        assert saved_state(tmp_path).tokens.refresh_issued_at is not None


class TestNewAccount:
    """`--account NEW import` for an account that is not configured yet."""

    async def test_prints_the_exact_lines_that_make_it_work(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """The unknown account error lists the lines; appending them makes the import work,
        and the reload it mentions names the config.

        The old hint ("or --account to import into another account") led to a bare
        "unknown account 'old'".
        """
        config = write_config(tmp_path, emulator)
        first = seed_file(tmp_path, emulator.issue_tokens(), age=60, name="first.json")
        assert (await cli(config, "import", str(first))).exit_code == 0
        other = emulator.issue_tokens(user_id=42)
        second = seed_file(tmp_path, other, age=60, name="second.json")
        refused = await cli(config, "--account", "old", "import", str(second))
        assert refused.exit_code == 64
        assert "unknown account 'old'" in refused.stderr
        assert f"`kakao-tokend --config {config} reload`" in refused.stderr
        block = refused.stderr.split(":\n\n", 1)[1].split("\n\n", 1)[0]
        assert block.splitlines() == ["[accounts.default]", "[accounts.old]"]
        with config.open("a") as handle:
            handle.write("\n" + block + "\n")
        result = await cli(config, "--account", "old", "import", str(second))
        assert result.exit_code == 0, result.output
        old_state = json.loads((tmp_path / "state" / "old.state.json").read_text())
        assert old_state["tokens"]["refresh_token"] == other["refresh_token"]
        assert (await cli(config, "status")).exit_code == 0  # "default" kept its tokens

    async def test_with_accounts_already_listed_only_the_new_table_is_printed(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """A config that already has [accounts.*] tables needs just one more."""
        config = write_config(tmp_path, emulator)
        with config.open("a") as handle:
            handle.write("[accounts.main]\n")
        refused = await cli(config, "--account", "old", "status")
        assert refused.exit_code == 64
        block = refused.stderr.split(":\n\n", 1)[1].split("\n\n", 1)[0]
        assert block.splitlines() == ["[accounts.old]"]

    async def test_a_name_that_cannot_be_an_account_says_why(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """No lines for a name the config would reject; the naming rule instead."""
        config = write_config(tmp_path, emulator)
        refused = await cli(config, "--account", "Old Bot", "status")
        assert refused.exit_code == 64
        assert "lowercase letters" in refused.stderr
        assert "[accounts." not in refused.stderr
