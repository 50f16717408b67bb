"""The command line: exit codes, one-line errors, and each command against the emulator."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from daemonproc import frozen_daemon_socket, run_cli, write_config
from kakao_tokend.cli import main
from kakao_tokend.config import load_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet

COMMANDS = [
    "check-config",
    "login",
    "import",
    "status",
    "token",
    "refresh",
    "logout",
    "emulator",
    "run",
    "demo",
    "doctor",
    "memo",
]


def invoke(config: Path | None, *args: str) -> Result:
    """Run the CLI in-process and return the result (stdout and stderr kept apart)."""
    prefix = ["--config", str(config)] if config else []
    return CliRunner().invoke(main, [*prefix, *args])


async def ainvoke(config: Path, *args: str) -> Result:
    """Run the CLI on a worker thread so the emulator keeps serving on this loop."""
    return await asyncio.to_thread(invoke, config, *args)


def store_for(config: Path) -> AccountStore:
    """Return the default account's store for ``config``."""
    return AccountStore(load_config(config).accounts["default"])


def save_state(config: Path, body: dict[str, Any], **changes: Any) -> AccountState:
    """Store a token response as the account's state (what `login` would have written)."""
    now = datetime.now(UTC)
    tokens = TokenSet.from_token_response(body, requested_at=now)
    token_changes = {k: v for k, v in changes.items() if k in TokenSet.__dataclass_fields__}
    tokens = replace(tokens, **token_changes)
    state = AccountState(
        account="default",
        tokens=tokens,
        refreshed_at=now,
        relogin_reason=changes.get("relogin_reason"),
    )
    store = store_for(config)
    store.save(state)
    store.publish(state, now=now)
    return state


OFFLINE_BODY = {
    "access_token": "offline-access-token",
    "refresh_token": "offline-refresh-token",
    "expires_in": 21599,
    "refresh_token_expires_in": 5183999,
    "token_type": "bearer",
}


def save_offline(
    config: Path, *, refresh_left: float, access_left: float = 3600, **kw: Any
) -> None:
    """Save a state whose expiries are ``*_left`` seconds from now.

    The refresh token is a real 60-day one part-way through its life (the daemon fits its
    month-long alert ladder to a refresh token born shorter).
    """
    now = datetime.now(UTC)
    refresh_expires_at = now + timedelta(seconds=refresh_left)
    save_state(
        config,
        OFFLINE_BODY,
        access_expires_at=now + timedelta(seconds=access_left),
        refresh_expires_at=refresh_expires_at,
        refresh_issued_at=refresh_expires_at - timedelta(seconds=5183999),
        **kw,
    )


class TestBasics:
    """Help, version and usage errors."""

    @pytest.mark.parametrize("command", COMMANDS)
    def test_help_has_example(self, command: str) -> None:
        """Every command's --help shows an Example block."""
        result = invoke(None, command, "--help")
        assert result.exit_code == 0, result.output
        assert "Example:" in result.stdout

    def test_group_help_has_example(self) -> None:
        """The top-level help shows an example too, and the env var of --config."""
        result = invoke(None, "--help")
        assert "Example:" in result.stdout
        assert "KAKAO_TOKEND_CONFIG" in result.stdout

    def test_version_names_python_and_platform(self) -> None:
        """--version prints our version, the Python version and the platform."""
        result = invoke(None, "--version")
        assert result.exit_code == 0
        assert result.stdout.startswith("kakao-tokend ")
        assert "Python" in result.stdout or "CPython" in result.stdout
        assert sys.platform.capitalize()[:3] in result.stdout or "Linux" in result.stdout
        # The two checks above pass on any line that says "Python" and "Linux"; these pin the
        # exact version and platform this interpreter runs on.
        assert platform.python_version() in result.stdout
        assert platform.system() in result.stdout

    def test_bad_duration_names_the_value_once(self, tmp_path: Path) -> None:
        """A bad duration is one usage line naming the option, the accepted forms and the value."""
        config = write_config(tmp_path)
        result = invoke(config, "token", "--min-valid", "soon")
        assert result.exit_code == 64
        error_lines = [line for line in result.stderr.splitlines() if "Error:" in line]
        assert len(error_lines) == 1, result.stderr
        assert "'--min-valid'" in error_lines[0]
        assert '"90s"' in error_lines[0] and '"soon"' in error_lines[0]
        assert error_lines[0].count("soon") == 1, error_lines[0]

    def test_global_option_after_the_command_says_where_it_goes(self, tmp_path: Path) -> None:
        """`check-config --config FILE` (a common slip) is exit 64 with the corrected command."""
        config = write_config(tmp_path)
        result = invoke(None, "check-config", "--config", str(config))
        assert result.exit_code == 64
        assert "kakao-tokend --config ... check-config" in result.stderr
        assert "Traceback" not in result.output
        result = invoke(config, "alerts", "test", "--debug")
        assert result.exit_code == 64
        assert "kakao-tokend --debug alerts test" in result.stderr
        # Any other unknown option keeps click's own message.
        assert "No such option '--bogus'" in invoke(config, "status", "--bogus").stderr

    def test_status_without_any_config_says_a_config_is_needed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With no config file anywhere, status adds one stderr line: login needs a config."""
        monkeypatch.delenv("KAKAO_TOKEND_CONFIG", raising=False)
        monkeypatch.delenv("CONFIGURATION_DIRECTORY", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        from kakao_tokend.config import find_config_file

        if find_config_file(None, os.environ) is not None:
            pytest.skip("this machine has a system-wide kakao-tokend config")
        result = invoke(None, "status")
        assert result.exit_code == 2, result.output
        assert "no tokens" in result.stdout
        notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
        assert len(notes) == 1, result.stderr
        assert "no config file found" in notes[0] and "--config FILE" in notes[0]

    def test_demo_help_says_what_zero_duration_does(self) -> None:
        """`demo --duration 0` runs until Ctrl+C; the help says so instead of surprising users."""
        result = invoke(None, "demo", "--help")
        assert result.exit_code == 0
        assert "0: until Ctrl+C" in result.stdout

    def test_usage_error_is_64(self, tmp_path: Path) -> None:
        """Unknown options and bad durations are usage errors with EX_USAGE (64)."""
        config = write_config(tmp_path)
        assert invoke(config, "status", "--bogus").exit_code == 64
        assert invoke(config, "token", "--min-valid", "soon").exit_code == 64
        assert invoke(config, "--bogus").exit_code == 64
        result = invoke(config, "--account", "nope", "status")
        assert result.exit_code == 64
        assert "configured accounts: default" in result.stderr

    def test_no_traceback_for_user_mistakes(self, tmp_path: Path) -> None:
        """Bad invocations give one readable error line and a specific code, never a traceback."""
        config = write_config(tmp_path)
        cases: list[tuple[list[str], int]] = [
            (["--config", str(tmp_path / "missing.toml"), "status"], 78),
            (["--config", str(config), "token"], 77),
            (["--config", str(config), "refresh"], 77),
            (["--config", str(config), "import", str(tmp_path / "nope.json")], 65),
            (["--config", str(config), "--account", "x", "token"], 64),
            (["--config", str(config), "login", "--timeout", "forever"], 64),
        ]
        for args, code in cases:
            result = CliRunner().invoke(main, args)
            assert result.exit_code == code, (args, result.output)
            assert "Traceback" not in result.output, args
            assert result.exception is None or isinstance(result.exception, SystemExit), args

    def test_internal_error_is_70_with_hint(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unexpected exception is one 'internal error' line (exit 70); --debug shows it."""
        config = write_config(tmp_path)

        def boom(self: AccountStore, **_: object) -> None:
            raise RuntimeError("disk gremlin")

        monkeypatch.setattr(AccountStore, "load", boom)
        result = invoke(config, "status")
        assert result.exit_code == 70
        assert "internal error: RuntimeError: disk gremlin" in result.stderr
        assert "--debug" in result.stderr
        assert "Traceback" not in result.output
        debug = invoke(config, "--debug", "status")
        assert debug.exit_code == 70
        assert "Traceback" in debug.stderr


class TestCheckConfig:
    """check-config: 0 with a summary, 78 with every problem."""

    def test_valid(self, tmp_path: Path) -> None:
        """A valid config prints the accounts and state dir and exits 0."""
        config = write_config(tmp_path)
        result = invoke(config, "check-config")
        assert result.exit_code == 0, result.output
        assert "config OK" in result.stdout
        assert "1 account(s): default" in result.stdout
        assert str(tmp_path / "state") in result.stdout

    def test_every_problem_listed(self, tmp_path: Path) -> None:
        """A config with two mistakes exits 78 and names both, without a traceback."""
        config = write_config(tmp_path, timeout="soon", extra="bogus_key = 1\n")
        result = invoke(config, "check-config")
        assert result.exit_code == 78
        assert "timeout" in result.stderr
        assert "bogus_key" in result.stderr
        assert "Traceback" not in result.output

    def test_an_unknown_account_to_publish_is_refused_in_one_line(self, tmp_path: Path) -> None:
        """`[store] publish_accounts = ["shop"]` without an account shop: exit 78, one line
        naming it and the configured accounts, no traceback."""
        config = write_config(tmp_path, extra='[store]\npublish_accounts = ["shop"]\n')
        result = invoke(config, "check-config")
        assert result.exit_code == 78, result.output
        problem = [line for line in result.stderr.splitlines() if "publish_accounts" in line]
        assert len(problem) == 1, result.stderr
        assert 'no account named "shop" (accounts: default)' in problem[0]
        assert "Traceback" not in result.output

    @pytest.mark.parametrize("command", ["check-config", "doctor", "status", "token", "run"])
    def test_a_fifo_as_the_config_file_is_refused_at_once(
        self, tmp_path: Path, command: str
    ) -> None:
        """A named pipe where the config file should be: every command said nothing and
        waited forever for a writer. Now one line names it, exit 78 (EX_CONFIG); doctor
        reports it as its critical config finding (exit 2, as for any broken config)."""
        fifo = tmp_path / "config.toml"
        os.mkfifo(fifo)
        done = subprocess.run(
            [sys.executable, "-m", "kakao_tokend", "--config", str(fifo), command],
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "NO_COLOR": "1"},
            check=False,
        )
        said = f"config file {fifo} is not a regular file (a named pipe)"
        if command == "doctor":
            assert done.returncode == 2, done.stdout + done.stderr
            assert said in done.stdout
            return
        assert done.returncode == 78, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert said in lines[0]

    def test_a_directory_as_the_config_file_is_one_line_exit_78(self, tmp_path: Path) -> None:
        """`--config DIR` gave click's three-line usage error and exit 64; it is a config
        that cannot be read like any other: one line, naming the file to pass, exit 78."""
        result = invoke(tmp_path, "check-config")
        assert result.exit_code == 78, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"config file {tmp_path} is a directory" in lines[0]
        assert "Usage:" not in result.output

    def test_env_var_selects_config(self, tmp_path: Path) -> None:
        """KAKAO_TOKEND_CONFIG works like --config."""
        config = write_config(tmp_path)
        result = CliRunner().invoke(
            main, ["check-config"], env={"KAKAO_TOKEND_CONFIG": str(config)}
        )
        assert result.exit_code == 0, result.output


class TestStatus:
    """status: text and JSON, exit 0 ok / 1 warning / 2 critical."""

    def test_no_state_is_critical(self, tmp_path: Path) -> None:
        """No tokens at all is critical and says to log in (with this config file)."""
        config = write_config(tmp_path)
        result = invoke(config, "status")
        assert result.exit_code == 2
        assert f"kakao-tokend --config {config} login" in result.stdout

    @pytest.mark.parametrize(
        ("refresh_days", "access_left", "code", "level"),
        [
            (40, 3600, 0, "ok"),
            (10, 3600, 1, "warning"),
            (40, -10, 1, "warning"),
            (2, 3600, 2, "critical"),
            (-1, 3600, 2, "critical"),
        ],
    )
    def test_levels(
        self, tmp_path: Path, refresh_days: float, access_left: float, code: int, level: str
    ) -> None:
        """Refresh-token life and access-token expiry decide the level and exit code."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=refresh_days * 86400, access_left=access_left)
        text = invoke(config, "status")
        assert text.exit_code == code, text.output
        assert level.upper() in text.stdout
        data = invoke(config, "status", "--json")
        assert data.exit_code == code
        document = json.loads(data.stdout)
        assert document["level"] == level
        account = document["accounts"][0]
        assert account["account"] == "default"
        assert "access_token" not in data.stdout.replace("access_token_", "")
        assert "offline-access-token" not in data.stdout + text.stdout

    def test_relogin_reason_is_critical(self, tmp_path: Path) -> None:
        """A recorded re-login reason makes the account critical and is shown."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=40 * 86400, relogin_reason="KOE322 refresh token dead")
        result = invoke(config, "status", "--json")
        assert result.exit_code == 2
        assert json.loads(result.stdout)["accounts"][0]["relogin_reason"].startswith("KOE322")

    def test_thresholds_are_options(self, tmp_path: Path) -> None:
        """--warn/--crit move the thresholds."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=10 * 86400)
        assert invoke(config, "status", "--warn", "5d").exit_code == 0
        assert invoke(config, "status", "--crit", "11d").exit_code == 2

    @pytest.mark.parametrize("option", ["--warn", "--crit"])
    def test_a_threshold_longer_than_any_token_life_is_a_usage_error(
        self, tmp_path: Path, option: str
    ) -> None:
        """`status --warn 99999999999999999d` crashed with an OverflowError (exit 70); it is
        a usage error naming the limit."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=10 * 86400)
        result = invoke(config, "status", option, "99999999999999999d")
        assert result.exit_code == 64, result.output
        assert "at most 3660d" in result.stderr
        assert "Traceback" not in result.output

    async def test_a_daemon_that_never_answers_is_a_warning_after_a_short_wait(
        self, tmp_path: Path
    ) -> None:
        """The daemon is stopped (SIGSTOP) or frozen: its socket takes the connection and
        never answers. `status`, a monitoring check (which its plugin runner kills after about
        10 s), waits a few seconds, not 120, then grades from the files with a note, and is
        at least a warning: a daemon that does not answer refreshes nothing."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=40 * 86400, access_left=3600)  # ok by the files
        with frozen_daemon_socket(config):
            started = asyncio.get_running_loop().time()
            code, out, err = await run_cli(config, "status")
            took = asyncio.get_running_loop().time() - started
        assert code == 1, (out, err)
        assert took < 9.0, f"{took:.1f}s"
        assert "did not answer" in err and "files" in err and "Traceback" not in err
        assert "WARNING" in out


class TestTokenRefreshLogout:
    """Commands that talk to Kakao (the emulator)."""

    async def test_token_without_a_daemon_holds_to_min_valid_as_the_daemon_does(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """docs/consumers.md: `--min-valid 10m` guarantees ten minutes. Without a daemon a
        6-second token was printed with exit 0 (it could never be valid that long); the
        daemon refuses such a min_valid, and so does the command now, with the same line.
        And when Kakao fails, the token on disk is printed instead only if it still meets an
        explicit --min-valid: a token with seconds left is no answer to "ten minutes"."""
        from daemonproc import short_tokens

        short_tokens(emulator, access=6, refresh=3600)
        config = write_config(tmp_path, emulator)
        save_state(config, emulator.issue_tokens())
        code, out, err = await run_cli(config, "token", "--min-valid", "10m")
        assert code == 1 and out == "", (code, out, err)
        assert "min_valid must be below 5.7s" in err and "6s lifetime" in err, err
        emulator.inject("token", "http500", count=50)
        await asyncio.sleep(1.0)  # the token on disk has less than 5.5 s left now
        code, out, err = await run_cli(config, "token", "--min-valid", "5.5s")
        assert code != 0 and out == "", (code, out, err)
        assert "5.5s" in err, err

    async def test_token_without_min_valid_works_for_short_lived_tokens(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """`kakao-tokend token` asks by default for 60 s of a 6-hour token: the same share
        (1/360) of a 6-second one, with or without a daemon — not 60 s, which a 6-second
        token cannot meet (the daemon refused it, and without one every call refreshed)."""
        from daemonproc import run_cli, short_tokens, start_daemon

        short_tokens(emulator, access=6, refresh=3600)
        config = write_config(tmp_path, emulator)
        body = emulator.issue_tokens()
        save_state(config, body)
        code, out, err = await run_cli(config, "token")
        assert code == 0, err
        assert out == body["access_token"] + "\n"  # still good: no refresh
        assert emulator.stats.refreshes_ok == 0
        daemon = await start_daemon(config)
        try:
            code, out, err = await run_cli(config, "token")
        finally:
            assert await daemon.stop() == 0
        assert code == 0, err
        assert emulator.access_token_valid(out.strip())

    async def test_token_through_the_daemon_asks_for_a_login_as_without_it(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """Kakao revoked the tokens and the daemon knows it: `kakao-tokend token` exits 77
        (a new login is needed) and names the login command, as it does with no daemon —
        not 69 ("try later"), which would have a script retry forever."""
        from daemonproc import login, start_daemon

        config = write_config(tmp_path, emulator)
        state = await login(emulator, config)
        assert state.user_id is not None
        daemon = await start_daemon(config)
        try:
            emulator.revoke_user_tokens(state.user_id)
            code, _, err = await run_cli(config, "refresh")
            assert code == 77, err
            code, out, err = await run_cli(config, "token")
        finally:
            assert await daemon.stop() == 0
        assert (code, out) == (77, ""), err
        assert "login" in err and len(err.strip().splitlines()) == 1, err

    async def test_token_prints_only_the_token(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """`token` prints exactly the access token and a newline when it is fresh enough."""
        config = write_config(tmp_path, emulator.url)
        body = emulator.issue_tokens()
        save_state(config, body)
        result = await ainvoke(config, "token")
        assert result.exit_code == 0, result.output
        assert result.stdout == body["access_token"] + "\n"
        assert emulator.stats.refreshes_ok == 0

    def test_token_reads_a_good_token_without_the_secrets(self, tmp_path: Path) -> None:
        """Without a daemon, a token good for --min-valid comes straight from the state file:
        the app's secrets (needed only to refresh) are not read; a refresh due still needs
        them (exit 78 once the client secret is gone)."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=30 * 86400, access_left=3600)
        (tmp_path / "client_secret").unlink()
        result = invoke(config, "token", "--min-valid", "10m")
        assert result.exit_code == 0, result.output
        assert result.stdout == OFFLINE_BODY["access_token"] + "\n"
        due = invoke(config, "token", "--min-valid", "2h")
        assert due.exit_code == 78, due.output
        assert "client_secret" in due.stderr and due.stdout == ""

    async def test_token_refreshes_when_close_to_expiry(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """With less than --min-valid left, `token` refreshes first and prints the new token."""
        config = write_config(tmp_path, emulator.url)
        body = emulator.issue_tokens()
        now = datetime.now(UTC)  # a 6-hour token with 30 minutes left
        save_state(
            config,
            body,
            access_issued_at=now - timedelta(hours=5, minutes=30),
            access_expires_at=now + timedelta(minutes=30),
        )
        result = await ainvoke(config, "token", "--min-valid", "1h")
        assert result.exit_code == 0, result.output
        new_token = result.stdout.strip()
        assert new_token != body["access_token"]
        assert emulator.stats.refreshes_ok == 1
        state = store_for(config).load()
        assert state is not None and state.tokens.access_token == new_token
        assert state.generation == 2

    async def test_refresh_rotates_in_window(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """Inside the rotation window `refresh` stores the new refresh token and says ROTATED."""
        config = write_config(tmp_path, emulator.url)
        body = emulator.issue_tokens()
        save_state(config, body)
        emulator.advance_clock(31 * 86400)  # < 30 days left on the refresh token
        result = await ainvoke(config, "refresh")
        assert result.exit_code == 0, result.output
        assert "ROTATED" in result.stdout
        assert emulator.stats.rotations == 1
        state = store_for(config).load()
        assert state is not None
        assert state.tokens.refresh_token != body["refresh_token"]
        assert len(state.rotations) == 1
        published = store_for(config).read_published()
        assert published is not None and published["generation"] == state.generation
        status = json.loads((await ainvoke(config, "status", "--json")).stdout)
        assert status["accounts"][0]["rotations"] == 1

    async def test_refresh_without_rotation(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """Outside the window the refresh token stays and the output says unchanged."""
        config = write_config(tmp_path, emulator.url)
        body = emulator.issue_tokens()
        save_state(config, body)
        result = await ainvoke(config, "refresh")
        assert result.exit_code == 0, result.output
        assert "unchanged" in result.stdout
        state = store_for(config).load()
        assert state is not None and state.tokens.refresh_token == body["refresh_token"]

    async def test_dead_refresh_token_is_77(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """A refresh token Kakao rejects (unlinked user) exits 77 and records the reason."""
        config = write_config(tmp_path, emulator.url)
        save_state(config, emulator.issue_tokens())
        emulator.unlink_user(1234567890)
        result = await ainvoke(config, "refresh")
        assert result.exit_code == 77, result.output
        assert "login" in result.stderr
        status = await ainvoke(config, "status")
        assert status.exit_code == 2
        token = await ainvoke(config, "token")
        assert token.exit_code == 77 and token.stdout == ""

    async def test_kakao_down_is_69(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """A 5xx from Kakao is EX_UNAVAILABLE (69) and keeps the old state."""
        config = write_config(tmp_path, emulator.url)
        body = emulator.issue_tokens()
        save_state(config, body)
        emulator.inject("token", "http503")
        result = await ainvoke(config, "refresh")
        assert result.exit_code == 69, result.output
        state = store_for(config).load()
        assert state is not None and state.tokens.access_token == body["access_token"]

    async def test_token_falls_back_while_kakao_is_down(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """If the refresh fails but the current token still works, `token` prints it (warning)
        when no --min-valid was asked (its default, 60 s of a 6-hour token, is what made it
        refresh); an explicit --min-valid the token does not meet is EX_UNAVAILABLE (69), as
        from the daemon; once the token is expired the failure is 69 and stdout stays empty."""
        config = write_config(tmp_path, emulator.url)
        body = emulator.issue_tokens()
        now = datetime.now(UTC)  # a 6-hour token with 30 seconds left
        save_state(
            config,
            body,
            access_issued_at=now - timedelta(hours=6) + timedelta(seconds=30),
            access_expires_at=now + timedelta(seconds=30),
        )
        emulator.inject("token", "http503", count=4)
        still_valid = await ainvoke(config, "token")
        assert still_valid.exit_code == 0, still_valid.output
        assert still_valid.stdout == body["access_token"] + "\n"
        assert "could not refresh" in still_valid.stderr
        too_short = await ainvoke(config, "token", "--min-valid", "1m")
        assert too_short.exit_code == 69, too_short.output
        assert too_short.stdout == "" and "at least 60s" in too_short.stderr
        save_state(config, body, access_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        expired = await ainvoke(config, "token")
        assert expired.exit_code == 69, expired.output
        assert expired.stdout == ""

    async def test_token_from_a_daemon_that_never_answers_falls_back_to_the_file_in_time(
        self, tmp_path: Path
    ) -> None:
        """The daemon is stopped (SIGSTOP) or frozen: its socket takes the connection and
        never answers. `token` waits a share of the token's life (a quarter of an 8-second
        token's, not a fixed 120 s), then prints the state file's token, still good for
        --min-valid, with a one-line warning saying why. A token the file cannot give (too
        short for --min-valid) is one error line with the fix, after the same short wait."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=30 * 86400, access_left=8)  # an 8-second token
        with frozen_daemon_socket(config):
            started = asyncio.get_running_loop().time()
            code, out, err = await run_cli(config, "token")
            took = asyncio.get_running_loop().time() - started
            short = await run_cli(config, "token", "--min-valid", "7.9s")
        assert code == 0, err
        assert out == OFFLINE_BODY["access_token"] + "\n"
        assert took < 6.0, f"{took:.1f}s"  # 2 s of waiting, and the CLI's own start
        [line] = err.splitlines()
        assert line.startswith("warning: ") and "did not answer" in line, line
        assert "state file" in line and OFFLINE_BODY["access_token"] not in line
        code, out, err = short
        assert code == 1 and out == "", err
        [line] = err.splitlines()
        assert line.startswith("error: ") and "did not answer" in line, line
        assert "7.9s" in line and "systemctl" in line and "Traceback" not in err

    async def test_token_from_a_frozen_daemon_says_what_was_asked_when_the_files_token_expired(
        self, tmp_path: Path
    ) -> None:
        """The state file's token has expired while the daemon does not answer: the error
        line still says how long a token was asked for (as it does for a token with too
        little left), so the two cases read alike; under load the 8-second token of the test
        above could expire between its two commands, and the line lost the 7.9s."""
        config = write_config(tmp_path)
        save_offline(config, refresh_left=30 * 86400, access_left=-5)
        with frozen_daemon_socket(config):
            code, out, err = await run_cli(config, "token", "--min-valid", "7.9s")
        assert code == 1 and out == "", err
        [line] = err.splitlines()
        assert "has expired" in line and "7.9s" in line and "systemctl" in line, line

    async def test_refresh_keeps_a_rotation_whose_answer_comes_after_its_wait(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """No daemon, 10-second tokens inside the rotation window, Kakao rotating at once but
        answering after 1 s (the fitted wait is 0.475 s): `refresh` waits for the open
        request before it exits, keeps the rotated refresh token and exits 0. Before, it said
        "try again later" (69), and trying again needed a new login (the token was retired)."""
        from daemonproc import login, short_tokens

        short_tokens(emulator, access=10, refresh=3600)
        emulator.settings.rotation_window = 7200
        config = write_config(tmp_path, emulator, timeout="30s", connect_timeout="10s")
        await login(emulator, config)
        emulator.inject("token", "late", count=1, delay=1.0)
        code, out, err = await run_cli(config, "refresh")
        assert code == 0, out + err
        saved = store_for(config).load()
        assert saved is not None and saved.generation == 2
        assert emulator.refresh_token_status(saved.tokens.refresh_token) == "live"

    async def test_lock_busy_is_75(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """When another process holds the account lock, refresh gives up with 75."""
        config = write_config(tmp_path, emulator.url)
        save_state(config, emulator.issue_tokens())
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys, fcntl, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
            str(store_for(config).lock_path),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert (await holder.stdout.readline()).strip() == b"locked"
            result = await ainvoke(config, "refresh", "--lock-timeout", "0.3s")
        finally:
            holder.kill()
            await holder.communicate()
        assert result.exit_code == 75, result.output
        assert "busy" in result.stderr
        assert emulator.stats.refreshes_ok == 0

    async def test_logout_removes_files(self, tmp_path: Path, emulator: KakaoEmulator) -> None:
        """logout calls Kakao's logout and deletes the state and token files."""
        config = write_config(tmp_path, emulator.url)
        save_state(config, emulator.issue_tokens())
        store = store_for(config)
        result = await ainvoke(config, "logout")
        assert result.exit_code == 0, result.output
        assert "logged out at Kakao" in result.stdout
        assert emulator.stats.requests["logout"] == 1
        assert not store.state_path.exists() and not store.token_path.exists()

    async def test_logout_keep_files_and_kakao_failure(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """--keep-files keeps the files; a failed Kakao logout is reported, not fatal."""
        config = write_config(tmp_path, emulator.url)
        save_state(config, emulator.issue_tokens())
        store = store_for(config)
        emulator.inject("logout", "http503")
        result = await ainvoke(config, "logout", "--keep-files")
        assert result.exit_code == 0, result.output
        assert "could not log out at Kakao" in result.stderr
        assert store.state_path.exists()

    def test_logout_without_files_claims_no_removal(self, tmp_path: Path) -> None:
        """logout of an account that never logged in does not claim to have removed files."""
        config = write_config(tmp_path)
        result = invoke(config, "logout")
        assert result.exit_code == 0, result.output
        assert "nothing to log out at Kakao" in result.stdout
        assert "removed" not in result.stdout
        assert "no files to remove for account 'default'" in result.stdout

    async def test_logout_names_only_the_files_it_removed(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """When only the state file exists, logout names that file and not the token file."""
        config = write_config(tmp_path, emulator.url)
        save_state(config, emulator.issue_tokens())
        store = store_for(config)
        store.token_path.unlink()
        result = await ainvoke(config, "logout")
        assert result.exit_code == 0, result.output
        assert f"removed {store.state_path}\n" in result.stdout
        assert str(store.token_path) not in result.stdout


class TestEmulatorCommand:
    """`kakao-tokend emulator` runs the emulator in the foreground."""

    async def test_serves_until_interrupted(self, tmp_path: Path) -> None:
        """The command prints its URL and answers the control API on the chosen port."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAKAO_TOKEND")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kakao_tokend",
            "emulator",
            "--port",
            str(port),
            "--access-lifetime",
            "60s",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert f"127.0.0.1:{port}" in line.decode()
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/_emulator/stats") as response,
            ):
                assert response.status == 200
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        assert proc.returncode in (0, -15)

    def test_port_out_of_range_is_a_usage_error(self) -> None:
        """--port 99999 is one usage line with exit 64, not an 'internal error' (70)."""
        result = invoke(None, "emulator", "--port", "99999")
        assert result.exit_code == 64, result.output
        assert "--port" in result.stderr and "99999" in result.stderr
        assert "internal error" not in result.output
