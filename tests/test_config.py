"""Tests for config.py: every kind of mistake gets one readable line with its key path."""

from __future__ import annotations

import dataclasses
import gc
import grp
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakao_tokend import config as config_module
from kakao_tokend.config import (
    Config,
    KakaoApp,
    RefreshPolicy,
    config_from_toml_text,
    find_config_file,
    load_config,
    parse_duration,
    parse_share,
)
from kakao_tokend.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
KEY = "rest-key-0123456789abcdef"
SECRET = "client-secret-zyxwvu987654"

WriteToml = Callable[..., Path]
WriteSecret = Callable[..., Path]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment like a systemd unit's, pointing at temporary directories."""
    return {
        "STATE_DIRECTORY": str(tmp_path / "state"),
        "RUNTIME_DIRECTORY": str(tmp_path / "run"),
        "KAKAO_KEY": KEY,
    }


@pytest.fixture
def write_toml(tmp_path: Path) -> WriteToml:
    """Return a factory writing dedented TOML to <tmp>/etc/<name> (mode 0644)."""

    def write(text: str, name: str = "config.toml", mode: int = 0o644) -> Path:
        path = tmp_path / "etc" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(text))
        path.chmod(mode)
        return path

    return write


@pytest.fixture
def write_secret(tmp_path: Path) -> WriteSecret:
    """Return a factory writing a secret file under <tmp>/etc with the given mode."""

    def write(name: str, content: str, mode: int = 0o600, where: Path | None = None) -> Path:
        directory = where or tmp_path / "etc"
        directory.mkdir(exist_ok=True)
        path = directory / name
        path.write_text(content)
        path.chmod(mode)
        return path

    return write


def problems_of(text: str, environ: dict[str, str], **kwargs: object) -> dict[str, str]:
    """Load TOML text that must fail; return {key path: problem}."""
    with pytest.raises(ConfigError) as caught:
        config_from_toml_text(textwrap.dedent(text), environ=environ, **kwargs)  # type: ignore[arg-type]
    details = caught.value.details
    assert details, str(caught.value)
    return dict(details)


def load(text: str, environ: dict[str, str]) -> Config:
    """Load TOML text that must succeed."""
    return config_from_toml_text(textwrap.dedent(text), environ=environ)


MINIMAL = """
[kakao]
rest_api_key_env = "KAKAO_KEY"
"""


class TestDurationsAndShares:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("90s", 90),
            ("30m", 1800),
            ("6h", 21600),
            ("14d", 14 * 86400),
            ("1h30m", 5400),
            ("1d 2h", 93600),
            ("0.5s", 0.5),
            ("250ms", 0.25),
            ("45", 45),
            (90, 90),
            (1.5, 1.5),
        ],
    )
    def test_accepted_forms(self, text: str | int | float, seconds: float) -> None:
        """Durations with units, combinations and plain numbers all become seconds."""
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["soon", "", "5x", "30m1h", "5s5s", "-3s", True, "1h-"])
    def test_rejected_forms_name_the_accepted_ones(self, text: str | bool) -> None:
        """Anything else is a ValueError whose message shows examples of valid durations."""
        with pytest.raises(ValueError, match=r'expected a duration like "90s", "30m"'):
            parse_duration(text)

    @pytest.mark.parametrize("text", ["99999999999999999d", "1e15", 1e300, "4000d"])
    def test_durations_longer_than_any_token_life_are_refused(self, text: str | float) -> None:
        """No duration in kakao-tokend is longer than the longest token life it accepts (ten
        years): a longer one is a typo, refused with the limit, never an overflow later."""
        with pytest.raises(ValueError, match=r"at most 3660d"):
            parse_duration(text)

    @pytest.mark.parametrize(("value", "share"), [("75%", 0.75), (0.75, 0.75), ("5%", 0.05)])
    def test_shares(self, value: str | float, share: float) -> None:
        """Shares are written "75%" or 0.75."""
        assert parse_share(value) == pytest.approx(share)

    @pytest.mark.parametrize("value", ["lots", 75, "150%", True])
    def test_bad_shares(self, value: str | int) -> None:
        """A share outside 0..1 (e.g. 75 meant as percent) or not a number is refused."""
        with pytest.raises(ValueError, match=r'expected a share like "75%" or 0.75'):
            parse_share(value)


class TestShortConfig:
    def test_three_line_config_gives_one_default_account(
        self, write_toml: WriteToml, write_secret: WriteSecret, env: dict[str, str]
    ) -> None:
        """Two secret files are all a single-account setup needs; the rest are defaults."""
        write_secret("rest_api_key", KEY + "\n")
        write_secret("client_secret", SECRET + "\n")
        path = write_toml(
            """\
            [kakao]
            rest_api_key_file = "rest_api_key"
            client_secret_file = "client_secret"
            """
        )
        config = load_config(path, environ=env)
        assert config.source == path
        assert list(config.accounts) == ["default"]
        assert config.default_account == "default"
        account = config.account()
        assert account.app.rest_api_key == KEY  # trailing newline stripped
        assert account.app.client_secret == SECRET
        assert account.app.rest_api_key_source == f"file {path.parent / 'rest_api_key'}"
        assert account.app.auth_url == "https://kauth.kakao.com"
        assert account.app.api_url == "https://kapi.kakao.com"
        assert account.app.redirect_uri == "http://127.0.0.1:8765/callback"
        state = Path(env["STATE_DIRECTORY"])
        assert account.state_file == state / "default.state.json"
        assert account.token_file == state / "default.token.json"
        assert account.lock_file == state / "default.lock"
        assert account.token_file_mode == 0o640
        assert config.runtime_dir == Path(env["RUNTIME_DIRECTORY"])
        assert config.refresh == RefreshPolicy()
        assert config.log_level == "info"

    def test_a_byte_order_mark_in_a_secret_file_is_not_part_of_the_secret(
        self, write_toml: WriteToml, write_secret: WriteSecret, env: dict[str, str]
    ) -> None:
        """An editor that saves UTF-8 with a byte-order mark (Windows Notepad) puts an
        invisible U+FEFF before the key; it was sent to Kakao as part of it."""
        write_secret("rest_api_key", "\ufeff" + KEY + "\n")
        path = write_toml('[kakao]\nrest_api_key_file = "rest_api_key"\n')
        assert load_config(path, environ=env).account().app.rest_api_key == KEY

    def test_a_config_file_with_a_byte_order_mark_loads(
        self, write_toml: WriteToml, env: dict[str, str]
    ) -> None:
        """Notepad's "UTF-8" starts the file with a byte-order mark, which TOML does not
        allow; the user meant UTF-8, and it loads (it was "Invalid statement" at 1:1)."""
        path = write_toml(MINIMAL)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        config = load_config(path, environ={**env, "KAKAO_KEY": KEY})
        assert config.account().app.rest_api_key == KEY

    def test_secrets_never_in_repr_and_config_is_frozen(self, env: dict[str, str]) -> None:
        """repr() of the config hides both secrets, and settings cannot be changed later."""
        config = load(MINIMAL + 'client_secret_env = "SECRET"\n', {**env, "SECRET": SECRET})
        text = repr(config)
        assert KEY not in text and SECRET not in text
        assert "env KAKAO_KEY" in text
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.log_level = "debug"  # type: ignore[misc]
        with pytest.raises(TypeError):
            config.accounts["x"] = config.account()  # type: ignore[index]

    def test_client_secret_may_be_absent(self, env: dict[str, str]) -> None:
        """Apps can switch Client Secret OFF, so no client secret source is fine."""
        app = load(MINIMAL, env).account().app
        assert app.client_secret is None and app.client_secret_source is None

    def test_relative_paths_are_relative_to_the_config_file(
        self, write_toml: WriteToml, env: dict[str, str], tmp_path: Path
    ) -> None:
        """paths.state_dir = "state" next to /x/config.toml means /x/state, not $PWD/state."""
        path = write_toml(MINIMAL + '[paths]\nstate_dir = "st"\nruntime_dir = "../rt"\n')
        config = load_config(path, environ={"KAKAO_KEY": KEY})
        assert config.state_dir == tmp_path / "etc" / "st"
        assert config.runtime_dir == tmp_path / "rt"
        assert config.account().state_file == tmp_path / "etc" / "st" / "default.state.json"

    def test_settings_are_parsed(self, env: dict[str, str]) -> None:
        """Every non-secret setting reaches the dataclasses in its parsed form."""
        config = load(
            MINIMAL
            + """\
            auth_url = "http://127.0.0.1:9000/"
            api_url = "http://localhost:9000"
            scopes = ["talk_message", "profile_nickname"]
            timeout = "5s"
            connect_timeout = "500ms"
            [refresh]
            refresh_at = 0.5
            jitter = "10%"
            heartbeat = "0.5s"
            retry_initial = "1s"
            retry_max = "1m"
            rotation_window = "14d"
            verify_on_start = false
            [publish]
            mode = "0600"
            include_refresh_token = true
            """,
            env,
        )
        app = config.account().app
        assert app.auth_url == "http://127.0.0.1:9000"  # loopback http allowed, slash dropped
        assert app.api_url == "http://localhost:9000"
        assert app.scopes == ("talk_message", "profile_nickname")
        assert (app.timeout, app.connect_timeout) == (5.0, 0.5)
        assert config.refresh == RefreshPolicy(0.5, 0.1, 0.5, 1.0, 60.0, 14 * 86400.0, False)
        assert config.account().token_file_mode == 0o600
        assert config.account().include_refresh_token is True


class TestUnknownKeys:
    def test_top_level_with_suggestion(self, env: dict[str, str]) -> None:
        """A misspelt top-level key is rejected with a "did you mean" hint."""
        found = problems_of('log_levl = "debug"\n' + MINIMAL, env)
        assert found == {"log_levl": 'unknown key; did you mean "log_level"?'}

    def test_nested_with_suggestion(self, env: dict[str, str]) -> None:
        """Unknown keys inside tables are reported with their full dotted path."""
        found = problems_of(MINIMAL + '[refresh]\nhartbeat = "30s"\n', env)
        assert found == {"refresh.hartbeat": 'unknown key; did you mean "heartbeat"?'}

    def test_deep_in_an_account_override(self, env: dict[str, str]) -> None:
        """Even keys in [accounts.NAME.kakao] are checked, path and all."""
        found = problems_of(MINIMAL + '[accounts.me.kakao]\nclient_secert_env = "X"\n', env)
        assert found == {
            "accounts.me.kakao.client_secert_env": 'unknown key; did you mean "client_secret_env"?'
        }

    def test_no_close_match_lists_the_allowed_keys(self, env: dict[str, str]) -> None:
        """Without a close match the message lists what is allowed in that table."""
        found = problems_of(MINIMAL + "[paths]\nzzz = 1\n", env)
        assert found == {"paths.zzz": "unknown key; allowed here: state_dir, runtime_dir"}

    def test_api_section_typo_is_named(self, env: dict[str, str]) -> None:
        """[api] is accepted, and a mistyped key in it is named with a suggestion."""
        found = problems_of(MINIMAL + '[api]\nsocket_mod = "0660"\n', env)
        assert "socket_mode" in found["api.socket_mod"]


class TestValues:
    def test_bad_duration(self, env: dict[str, str]) -> None:
        """A duration typo names the key and shows what a duration looks like."""
        found = problems_of(MINIMAL + '[refresh]\nheartbeat = "soon"\n', env)
        assert found == {
            "refresh.heartbeat": 'expected a duration like "90s", "30m", "6h", "14d" or "1h30m", '
            'got "soon"'
        }

    def test_a_huge_alert_threshold_is_refused(self, env: dict[str, str]) -> None:
        """thresholds = ["99999999999999999d"] passed the check and then crashed `status`."""
        found = problems_of(MINIMAL + '[alerts]\nthresholds = ["99999999999999999d"]\n', env)
        assert "at most 3660d" in found["alerts.thresholds[0]"]

    def test_a_path_with_a_nul_character_is_refused(self, env: dict[str, str]) -> None:
        """A NUL in a path passed the check, then every command crashed on it."""
        found = problems_of(MINIMAL + '[paths]\nstate_dir = "a\\u0000b"\n', env)
        assert "NUL" in found["paths.state_dir"]

    def test_a_state_or_runtime_dir_that_is_a_file_is_refused(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        """A regular file where a directory must be passed the check; then `run` exited 1
        (restarted forever) and `status` said "run login", which cannot help."""
        plain = tmp_path / "plain"
        plain.write_text("x")
        found = problems_of(
            MINIMAL + f'[paths]\nstate_dir = "{plain}"\nruntime_dir = "{plain}"\n', env
        )
        assert "is a file, not a directory" in found["paths.state_dir"]
        assert "is a file, not a directory" in found["paths.runtime_dir"]

    def test_an_api_socket_path_too_long_for_a_unix_socket_is_refused(
        self, env: dict[str, str], tmp_path: Path
    ) -> None:
        """A socket path of 108 bytes or more cannot be bound: the daemon ran with its API
        off and `status` said "no daemon". The check names the limit and the two keys."""
        deep = tmp_path / ("r" * 110)
        found = problems_of(MINIMAL + f'[paths]\nruntime_dir = "{deep}"\n', env)
        assert "107 bytes" in found["paths.runtime_dir"]
        assert "api.socket" in found["paths.runtime_dir"]
        found = problems_of(MINIMAL + f'[api]\nsocket = "{deep}/api.sock"\n', env)
        assert "107 bytes" in found["api.socket"]

    def test_bad_share(self, env: dict[str, str]) -> None:
        """refresh_at = 75 (meant as percent) is refused with the two accepted spellings."""
        found = problems_of(MINIMAL + "[refresh]\nrefresh_at = 75\n", env)
        assert found == {"refresh.refresh_at": 'expected a share like "75%" or 0.75, got 75'}

    @pytest.mark.parametrize(
        ("table", "key", "fragment"),
        [
            ('refresh_at = "99%"', "refresh.refresh_at", "between 5% and 95%"),
            ('refresh_at = "10%"\njitter = "10%"', "refresh.jitter", "smaller than refresh"),
            ('heartbeat = "0.05s"', "refresh.heartbeat", "between 0.1s and 60s"),
            ('heartbeat = "2m"', "refresh.heartbeat", "between 0.1s and 60s"),
            ('retry_initial = "0s"', "refresh.retry_initial", "more than 0s"),
            ('retry_initial = "1m"\nretry_max = "30s"', "refresh.retry_max", "at least"),
            ("verify_on_start = 1", "refresh.verify_on_start", "expected true or false"),
        ],
    )
    def test_ranges(self, env: dict[str, str], table: str, key: str, fragment: str) -> None:
        """Values that parse but make no sense are refused with the allowed range."""
        found = problems_of(MINIMAL + f"[refresh]\n{table}\n", env)
        assert list(found) == [key]
        assert fragment in found[key]

    def test_log_level(self, env: dict[str, str]) -> None:
        """log_level must be one of the four names; "warn" gets a suggestion."""
        found = problems_of('log_level = "warn"\n' + MINIMAL, env)
        assert found == {
            "log_level": 'expected one of debug, info, warning, error, got "warn"; '
            'did you mean "warning"?'
        }

    def test_wrong_type_for_a_table(self, env: dict[str, str]) -> None:
        """`refresh = 5` instead of a [refresh] table is reported, not a crash."""
        found = problems_of("refresh = 5\n" + MINIMAL, env)
        assert found == {"refresh": "expected a table [refresh], got 5"}


class TestSecrets:
    def test_missing_key_source(self, env: dict[str, str]) -> None:
        """No REST API key source at all says which settings can provide one."""
        found = problems_of("[kakao]\n", env)
        assert list(found) == ["kakao.rest_api_key"]
        assert found["kakao.rest_api_key"].startswith("missing; set rest_api_key_file")

    def test_two_sources(self, env: dict[str, str]) -> None:
        """Giving both rest_api_key_env and rest_api_key_file is ambiguous and refused."""
        found = problems_of(MINIMAL + 'rest_api_key_file = "k"\n', env)
        assert found == {
            "kakao.rest_api_key_file": "rest_api_key_env and rest_api_key_file are both set; "
            "give only one source for rest_api_key"
        }

    def test_group_readable_file_refused_with_chmod_hint(
        self, write_secret: WriteSecret, env: dict[str, str]
    ) -> None:
        """A 0644 secret file is refused with the exact chmod to run; the secret is not shown."""
        secret = write_secret("client_secret", SECRET, mode=0o644)
        found = problems_of(MINIMAL + f'client_secret_file = "{secret}"\n', env)
        assert found == {
            "kakao.client_secret_file": f"{secret} is readable by group/others (mode 0644); "
            f"run: chmod 600 {secret}"
        }

    def test_missing_secret_file(self, env: dict[str, str], tmp_path: Path) -> None:
        """A secret file that does not exist is named, with how to create it."""
        missing = tmp_path / "nope"
        found = problems_of(MINIMAL + f'client_secret_file = "{missing}"\n', env)
        assert found["kakao.client_secret_file"].startswith(f"{missing} does not exist")

    def test_empty_secret_file(self, write_secret: WriteSecret, env: dict[str, str]) -> None:
        """A file holding only a newline is an empty secret: refused."""
        secret = write_secret("client_secret", "\n")
        found = problems_of(MINIMAL + f'client_secret_file = "{secret}"\n', env)
        assert found == {
            "kakao.client_secret_file": f"{secret} is empty; it must hold the client_secret"
        }

    def test_multi_line_secret_is_refused_without_showing_it(
        self, write_secret: WriteSecret, env: dict[str, str]
    ) -> None:
        """A file with a comment or two values is refused, and no part of it is echoed."""
        secret = write_secret("client_secret", f"# my secret\n{SECRET}\n")
        found = problems_of(MINIMAL + f'client_secret_file = "{secret}"\n', env)
        message = found["kakao.client_secret_file"]
        assert "several lines" in message
        assert SECRET not in message and "my secret" not in message

    def test_an_oversized_secret_file_is_refused_without_reading_it_whole(
        self, write_secret: WriteSecret, env: dict[str, str]
    ) -> None:
        """A huge one-word file (a log, a dump named by mistake) was read whole into memory
        and sent to Kakao as the client secret: refused, with its size cap, nothing echoed."""
        secret = write_secret("client_secret", "A" * (1024 * 1024) + "\n")
        found = problems_of(MINIMAL + f'client_secret_file = "{secret}"\n', env)
        assert found == {
            "kakao.client_secret_file": f"{secret} is larger than 64 KiB; it must hold only"
            " the client_secret"
        }

    def test_env_unset(self, env: dict[str, str]) -> None:
        """Naming an environment variable that is not set says so."""
        found = problems_of(MINIMAL + 'client_secret_env = "NOT_THERE"\n', env)
        assert found == {
            "kakao.client_secret_env": "environment variable NOT_THERE is not set; export it, "
            "or use client_secret_file instead"
        }

    def test_env_empty(self, env: dict[str, str]) -> None:
        """An empty environment variable is an empty secret."""
        found = problems_of(MINIMAL + 'client_secret_env = "EMPTY"\n', {**env, "EMPTY": ""})
        assert "is empty" in found["kakao.client_secret_env"]

    def test_credential_named(
        self, write_secret: WriteSecret, env: dict[str, str], tmp_path: Path
    ) -> None:
        """X_credential reads $CREDENTIALS_DIRECTORY/name, trusting systemd's file mode."""
        creds = tmp_path / "credentials"
        write_secret("kakao-secret", SECRET + "\n", mode=0o444, where=creds)
        config = load(
            MINIMAL + 'client_secret_credential = "kakao-secret"\n',
            {**env, "CREDENTIALS_DIRECTORY": str(creds)},
        )
        assert config.account().app.client_secret == SECRET
        assert config.account().app.client_secret_source == "credential kakao-secret"

    def test_credentials_used_without_any_setting(
        self, write_secret: WriteSecret, env: dict[str, str], tmp_path: Path
    ) -> None:
        """LoadCredential=rest_api_key:... and client_secret:... need no config lines at all."""
        creds = tmp_path / "credentials"
        write_secret("rest_api_key", KEY, mode=0o400, where=creds)
        write_secret("client_secret", SECRET, mode=0o400, where=creds)
        app = load("", {**env, "CREDENTIALS_DIRECTORY": str(creds)}).account().app
        assert (app.rest_api_key, app.client_secret) == (KEY, SECRET)
        assert app.rest_api_key_source == "credential rest_api_key"
        assert app.client_secret_source == "credential client_secret"

    def test_credential_without_systemd(self, env: dict[str, str]) -> None:
        """X_credential outside systemd explains that only LoadCredential= provides it."""
        found = problems_of(MINIMAL + 'client_secret_credential = "client_secret"\n', env)
        message = found["kakao.client_secret_credential"]
        assert message.startswith("$CREDENTIALS_DIRECTORY is not set")
        assert "client_secret_file" in message

    def test_credential_missing_from_directory(self, env: dict[str, str], tmp_path: Path) -> None:
        """A credential the unit did not load names the LoadCredential= line to add."""
        creds = tmp_path / "credentials"
        creds.mkdir()
        found = problems_of(
            MINIMAL + 'client_secret_credential = "cs"\n',
            {**env, "CREDENTIALS_DIRECTORY": str(creds)},
        )
        assert "add LoadCredential=cs:" in found["kakao.client_secret_credential"]

    def test_inline_client_secret_in_readable_config_refused(
        self, write_toml: WriteToml, env: dict[str, str]
    ) -> None:
        """An inline client secret in a 0644 config file is refused; the value is not shown."""
        path = write_toml(MINIMAL + f'client_secret = "{SECRET}"\n')
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=env)
        text = str(caught.value)
        assert "kakao.client_secret: is written inline" in text
        assert f"chmod 600 {path}" in text
        assert SECRET not in text

    def test_inline_client_secret_in_private_config_accepted(
        self, write_toml: WriteToml, env: dict[str, str]
    ) -> None:
        """An inline secret in a 0600 config file is allowed and reported as "inline"."""
        path = write_toml(MINIMAL + f'client_secret = "{SECRET}"\n', mode=0o600)
        app = load_config(path, environ=env).account().app
        assert (app.client_secret, app.client_secret_source) == (SECRET, "inline")

    def test_inline_secret_of_wrong_type_is_not_echoed(self, env: dict[str, str]) -> None:
        """rest_api_key = 12345 (unquoted) is refused without repeating the number."""
        found = problems_of("[kakao]\nrest_api_key = 1234567890\n", env)
        assert found == {
            "kakao.rest_api_key": "expected the rest_api_key as a string (value not shown)"
        }


class TestUrls:
    def test_bad_url(self, env: dict[str, str]) -> None:
        """Something that is not an http(s) URL with a host is refused with an example."""
        found = problems_of(MINIMAL + 'auth_url = "kauth.kakao.com"\n', env)
        assert found == {
            "kakao.auth_url": "expected an http(s) URL with a host, like "
            'https://kauth.kakao.com, got "kauth.kakao.com"'
        }

    def test_http_for_a_real_host(self, env: dict[str, str]) -> None:
        """Plain http to a non-loopback host is refused with the https URL to use instead."""
        found = problems_of(MINIMAL + 'api_url = "http://kapi.kakao.com"\n', env)
        message = found["kakao.api_url"]
        assert message.startswith("plain http is only allowed for loopback hosts")
        assert message.endswith("real Kakao needs https://kapi.kakao.com")

    def test_query_refused(self, env: dict[str, str]) -> None:
        """Base URLs take no query string."""
        found = problems_of(MINIMAL + 'auth_url = "https://kauth.kakao.com/?a=b"\n', env)
        assert "must not have a query" in found["kakao.auth_url"]

    def test_ipv6_loopback_allowed(self, env: dict[str, str]) -> None:
        """http://[::1]:port (an emulator on IPv6 loopback) is accepted."""
        app = load(MINIMAL + 'auth_url = "http://[::1]:8080"\n', env).account().app
        assert app.auth_url == "http://[::1]:8080"


class TestAccounts:
    def test_bad_account_name(self, env: dict[str, str]) -> None:
        """Account names with capitals or spaces are refused with the naming rule."""
        found = problems_of(MINIMAL + "[accounts.Work]\n", env)
        assert list(found) == ["accounts.Work"]
        assert "lowercase letters, digits" in found["accounts.Work"]

    def test_duplicate_file_paths(self, env: dict[str, str]) -> None:
        """Two accounts sharing a file would clobber each other's tokens: refused."""
        found = problems_of(
            MINIMAL
            + '[accounts.a]\nstate_file = "/tmp/kt/x"\n[accounts.b]\ntoken_file = "/tmp/kt/x"\n',
            env,
        )
        assert found == {
            "accounts.b.token_file": "/tmp/kt/x is also used as accounts.a.state_file; every "
            "account needs its own state, token and lock files"
        }

    def test_an_account_file_that_is_the_config_file_is_refused(
        self, write_toml: WriteToml, env: dict[str, str]
    ) -> None:
        """A state file set to the config file's own path passed the check; the first login
        would have replaced the configuration with the tokens (0600, refresh token in it)."""
        path = write_toml(MINIMAL)
        path.write_text(MINIMAL + f'[accounts.a]\nstate_file = "{path}"\n')
        for typed in (path, Path(os.path.relpath(path))):  # --config as typed: relative too
            with pytest.raises(ConfigError) as caught:
                load_config(typed, environ={**env, "KAKAO_KEY": KEY})
            found = dict(caught.value.details)
            assert (
                f"{path} is also used as the config file itself" in found["accounts.a.state_file"]
            )

    def test_explicit_file_clashing_with_a_default(self, env: dict[str, str]) -> None:
        """An explicit path equal to another account's default path is caught too."""
        state = env["STATE_DIRECTORY"]
        found = problems_of(
            MINIMAL + f'[accounts.a]\n[accounts.b]\nstate_file = "{state}/a.state.json"\n', env
        )
        assert "accounts.a.state_file (default)" in found["accounts.b.state_file"]

    def test_unknown_default_account(self, env: dict[str, str]) -> None:
        """default_account must name a configured account; close names are suggested."""
        found = problems_of(
            'default_account = "hom"\n' + MINIMAL + "[accounts.home]\n[accounts.work]\n", env
        )
        assert found == {
            "default_account": 'no account named "hom" (accounts: home, work); did you mean "home"?'
        }

    def test_several_accounts_with_overrides(
        self, write_secret: WriteSecret, env: dict[str, str]
    ) -> None:
        """Accounts inherit [kakao]/[publish] and override per key; a secret source override
        replaces the global source instead of clashing with it."""
        shop_key = write_secret("shop_key", "shop-key-42")
        grp_name = grp.getgrgid(os.getgid()).gr_name
        config = load(
            'default_account = "shop"\n'
            + MINIMAL
            + f"""\
            [publish]
            mode = "0600"
            [accounts.me]
            token_file = "/tmp/kt/me.json"
            [accounts.shop.kakao]
            rest_api_key_file = "{shop_key}"
            auth_url = "http://127.0.0.1:1234"
            [accounts.shop.publish]
            mode = "0640"
            group = "{grp_name}"
            """,
            env,
        )
        assert list(config.accounts) == ["me", "shop"]
        assert config.default_account == "shop"
        me, shop = config.accounts["me"], config.accounts["shop"]
        assert me.app.rest_api_key == KEY and me.token_file_mode == 0o600
        assert me.token_file == Path("/tmp/kt/me.json")
        assert me.state_file == Path(env["STATE_DIRECTORY"]) / "me.state.json"
        assert shop.app.rest_api_key == "shop-key-42"
        assert shop.app.auth_url == "http://127.0.0.1:1234"
        assert me.app.auth_url == KakaoApp("k", None).auth_url
        assert (shop.token_file_mode, shop.token_file_group) == (0o640, grp_name)

    def test_first_account_is_the_default(self, env: dict[str, str]) -> None:
        """Without default_account the first [accounts.NAME] in the file is the default."""
        config = load(MINIMAL + "[accounts.zeta]\n[accounts.alpha]\n", env)
        assert config.default_account == "zeta"
        assert config.account().name == "zeta"

    def test_unknown_account_lookup(self, env: dict[str, str]) -> None:
        """Config.account("x") for a missing name raises ConfigError with a suggestion."""
        config = load(MINIMAL + "[accounts.home]\n", env)
        with pytest.raises(ConfigError, match='did you mean "home"'):
            config.account("hme")

    def test_empty_accounts_table(self, env: dict[str, str]) -> None:
        """An [accounts] table with no account in it is refused, not silently empty."""
        found = problems_of(MINIMAL + "[accounts]\n", env)
        assert "no accounts defined" in found["accounts"]


class TestPublish:
    @pytest.mark.parametrize(
        ("mode", "fragment"),
        [
            ('"0644"', "gives access to all users"),
            ('"0666"', "gives access to all users"),
            ('"0660"', "must not be group-writable"),
            ('"0440"', "owner (the daemon) needs read and write"),
            ("640", 'as a string like "0640"'),
            ('"rw-r-----"', 'as a string like "0640"'),
        ],
    )
    def test_unsafe_or_malformed_modes(self, env: dict[str, str], mode: str, fragment: str) -> None:
        """The token file may never be writable by the group or visible to others."""
        found = problems_of(MINIMAL + f"[publish]\nmode = {mode}\n", env)
        assert fragment in found["publish.mode"]

    def test_unknown_group(self, env: dict[str, str]) -> None:
        """A group that does not exist is refused with the getent command to check."""
        found = problems_of(MINIMAL + '[publish]\ngroup = "no-such-group-kt"\n', env)
        assert found == {
            "publish.group": 'group "no-such-group-kt" does not exist on this machine; check '
            "with: getent group no-such-group-kt"
        }

    def test_numeric_gid(self, env: dict[str, str]) -> None:
        """A numeric gid that exists is accepted."""
        config = load(MINIMAL + f"[publish]\ngroup = {os.getgid()}\n", env)
        assert config.account().token_file_group == str(os.getgid())


class TestReporting:
    def test_toml_syntax_error_names_file_line_and_column(
        self, write_toml: WriteToml, env: dict[str, str]
    ) -> None:
        """A TOML syntax error is one line with the file, the line and the column."""
        path = write_toml('[kakao]\nrest_api_key_env = "KAKAO_KEY"\ntimeout = \n')
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=env)
        text = str(caught.value)
        assert "\n" not in text
        assert text == f"config file {path} is not valid TOML: line 3, column 11: Invalid value"

    def test_all_problems_reported_together(
        self, write_toml: WriteToml, env: dict[str, str], tmp_path: Path
    ) -> None:
        """One run lists every problem, headed by the file and the count, one per line."""
        path = write_toml(
            """\
            log_level = "loud"
            [kakao]
            rest_api_key_env = "UNSET_VAR"
            api_url = "ftp://x"
            [refresh]
            heartbeat = "soon"
            [accounts."Bad Name"]
            """
        )
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=env)
        lines = str(caught.value).splitlines()
        assert lines[0] == f"config file {path} has 5 problems:"
        keys = [line.split(":", 1)[0].strip() for line in lines[1:]]
        assert sorted(keys) == sorted(
            [
                "log_level",
                "kakao.rest_api_key_env",
                "kakao.api_url",
                "refresh.heartbeat",
                "accounts.Bad Name",
            ]
        )

    def test_a_global_mistake_is_reported_once_for_many_accounts(self, env: dict[str, str]) -> None:
        """A bad [kakao] value shared by three accounts gives one problem, not three."""
        found = problems_of(
            MINIMAL + 'timeout = "x"\n[accounts.a]\n[accounts.b]\n[accounts.c]\n', env
        )
        assert list(found) == ["kakao.timeout"]

    def test_a_broken_app_does_not_hide_the_accounts_other_mistakes(
        self, env: dict[str, str]
    ) -> None:
        """A missing REST API key is one problem, reported once where it belongs ([kakao]);
        the accounts' bad hooks and templates are still reported in the same run."""
        found = problems_of(
            """
            [accounts.a]
            hooks = [["reload-bot"]]
            [[accounts.a.templates]]
            mode = "0644"
            [accounts.b]
            hook_timeout = "soon"
            """,
            env,
        )
        assert set(found) == {
            "kakao.rest_api_key",
            "accounts.a.hooks[0]",
            "accounts.a.templates[0].source",
            "accounts.a.templates[0].destination",
            "accounts.a.templates[0].mode",
            "accounts.b.hook_timeout",
        }

    def test_accounts_without_overrides_share_one_app_and_one_alerts(
        self, env: dict[str, str]
    ) -> None:
        """Accounts without their own [kakao] or [alerts] table share one parsed KakaoApp and
        AlertsConfig (a thousand accounts cost one app, not a thousand); an account with an
        override gets its own, with the override applied."""
        config = load(
            MINIMAL
            + """\
            [alerts]
            repeat = "2h"
            [accounts.a]
            [accounts.b]
            [accounts.c]
            [accounts.own.kakao]
            timeout = "5s"
            [accounts.own.alerts]
            repeat = "1h"
            """,
            env,
        )
        a, b, c, own = (config.accounts[name] for name in ("a", "b", "c", "own"))
        assert a.app is b.app is c.app
        assert a.alerts is b.alerts is c.alerts
        assert (a.app.timeout, a.alerts.repeat) == (30.0, 7200.0)
        assert own.app is not a.app and own.alerts is not a.alerts
        assert (own.app.timeout, own.app.rest_api_key) == (5.0, KEY)
        assert own.alerts.repeat == 3600.0

    def test_accounts_without_a_table_are_the_first_one_renamed(self, env: dict[str, str]) -> None:
        """An account with an empty [accounts.NAME] table is the first such account with its
        own name, files and command-line options, equal to what reading it field by field
        gives; an account after one with overrides, and one with a table, are read as such."""
        config = load(
            MINIMAL
            + """\
            [publish]
            mode = "0600"
            [accounts.a]
            [accounts.own.publish]
            include_refresh_token = true
            [accounts.b]
            [accounts.c]
            """,
            env,
        )
        a, own, b, c = (config.accounts[name] for name in ("a", "own", "b", "c"))
        state = Path(env["STATE_DIRECTORY"])
        for account in (b, c):
            name = account.name
            assert account == dataclasses.replace(
                a,
                name=name,
                state_file=state / f"{name}.state.json",
                lock_file=state / f"{name}.lock",
                token_file=state / f"{name}.token.json",
                cli_options=("--account", name),
            )
            assert str(account.state_file) == f"{state}/{name}.state.json"
            assert account.token_file_mode == 0o600 and not account.include_refresh_token
        assert a.cli_options == () and own.include_refresh_token
        assert a.app is b.app is c.app

    def test_unset_files_and_options_are_derived_from_the_name(
        self, write_toml: WriteToml, tmp_path: Path
    ) -> None:
        """Every account's unset state, lock and token file is <state_dir>/<name> plus its
        suffix, and its command-line options follow from its name: for the default account and
        the others, the first account without a table, the ones built from it, and one with a
        table of its own; a file an account sets is used as written (relative to the config)."""
        path = write_toml(
            'default_account = "b"\n'
            + MINIMAL
            + """\
            [paths]
            state_dir = "st"
            runtime_dir = "rt"
            [accounts.a]
            [accounts.b]
            [accounts.own]
            lock_file = "locks/own.lock"
            [accounts.own.publish]
            include_refresh_token = true
            [accounts.c]
            """
        )
        # A file a plain `kakao-tokend` would not find: every hint names it with --config.
        config = load_config(path, environ={"KAKAO_KEY": KEY, "HOME": str(tmp_path / "home")})
        state = tmp_path / "etc" / "st"
        assert list(config.accounts) == ["a", "b", "own", "c"]
        for name, account in config.accounts.items():
            assert account.name == name
            assert account.state_file == state / f"{name}.state.json"
            assert str(account.state_file) == f"{state}/{name}.state.json"
            assert account.token_file == state / f"{name}.token.json"
            if name != "own":
                assert account.lock_file == state / f"{name}.lock"
            named = ("--config", str(path))
            assert account.cli_options == (named if name == "b" else (*named, "--account", name))
        own = config.accounts["own"]
        assert own.lock_file == tmp_path / "etc" / "locks" / "own.lock"
        assert own.include_refresh_token and not config.accounts["c"].include_refresh_token

    def test_a_file_is_known_by_its_text_without_making_its_path(
        self, write_toml: WriteToml, tmp_path: Path
    ) -> None:
        """file_text gives the text of each state, lock and token file, derived or set, and
        makes no Path for a derived one (a start compares and opens files by their text)."""
        path = write_toml(
            MINIMAL
            + """            [paths]
            state_dir = "st"
            [accounts.a]
            [accounts.own]
            lock_file = "locks/own.lock"
            [accounts.c]
            """
        )
        config = load_config(path, environ={"KAKAO_KEY": KEY, "HOME": str(tmp_path / "home")})
        state = tmp_path / "etc" / "st"
        own = config.accounts["own"]
        assert own.file_text("lock_file") == str(tmp_path / "etc" / "locks" / "own.lock")
        for name, account in config.accounts.items():
            texts = {f: account.file_text(f) for f in ("state_file", "lock_file", "token_file")}
            assert texts["state_file"] == f"{state}/{name}.state.json"
            assert texts["token_file"] == f"{state}/{name}.token.json"
            if account is not own:
                assert texts["lock_file"] == f"{state}/{name}.lock"
                assert not {"state_file", "lock_file", "token_file"} & set(vars(account))
            assert texts == {f: str(getattr(account, f)) for f in texts}

    def test_reading_a_file_text_makes_no_instance_dictionary(self, env: dict[str, str]) -> None:
        """file_text leaves the account's attributes where Python keeps them inline: reading
        ``__dict__`` would make a dictionary for each account, kept (64 bytes; 10,000 accounts
        on a fleet node)."""
        config = load(MINIMAL + "[accounts.a]\n[accounts.b]\n[accounts.c]\n", env)
        for name in ("b", "c"):  # "a" was the model the others copy (its vars() were read)
            account = config.accounts[name]
            state = Path(env["STATE_DIRECTORY"])
            assert account.file_text("state_file") == str(state / f"{name}.state.json")
            assert account.file_text("lock_file") == str(state / f"{name}.lock")
            assert account.file_text("token_file") == str(state / f"{name}.token.json")
            assert not any(type(r) is dict for r in gc.get_referents(account)), name

    def test_an_account_with_derived_files_is_a_plain_frozen_dataclass(
        self, env: dict[str, str]
    ) -> None:
        """replace(), ==, hash and repr see the derived files and options like set ones, and
        they cannot be assigned."""
        config = load(MINIMAL + "[accounts.a]\n[accounts.b]\n", env)
        a, b = config.accounts["a"], config.accounts["b"]
        state = Path(env["STATE_DIRECTORY"])
        same = dataclasses.replace(b, alerts=dataclasses.replace(b.alerts))
        assert same == b and hash(same) == hash(b) and repr(same) == repr(b)
        assert (same.state_file, same.lock_file, same.token_file, same.cli_options) == (
            state / "b.state.json",
            state / "b.lock",
            state / "b.token.json",
            ("--account", "b"),
        )
        assert f"state_file={state / 'b.state.json'!r}" in repr(b)
        moved = dataclasses.replace(b, state_file=Path("/x/b.json"), cli_options=("-x",))
        assert (moved.state_file, moved.cli_options) == (Path("/x/b.json"), ("-x",))
        assert moved != b and b.state_file == state / "b.state.json"
        assert a != b
        for name in ("state_file", "lock_file", "token_file", "cli_options"):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(b, name, Path("/x"))

    @pytest.mark.parametrize("spelling", ["{tmp}/state/", "{tmp}//state", "/"])
    def test_a_default_file_is_known_by_its_text_however_the_directory_is_written(
        self, env: dict[str, str], tmp_path: Path, spelling: str
    ) -> None:
        """A default file's text is the one pathlib gives its Path, whatever way the state
        directory is written (a trailing or doubled slash, the root): a file set to it is
        still refused."""
        state = spelling.format(tmp=tmp_path)
        environ = {**env, "STATE_DIRECTORY": state}
        config = load(MINIMAL + "[accounts.a]\n[accounts.b]\n", environ)
        assert config.accounts["b"].file_text("state_file") == str(Path(state) / "b.state.json")
        assert config.accounts["b"].state_file == Path(state) / "b.state.json"
        taken = Path(state) / "a.state.json"
        found = problems_of(
            MINIMAL + f'[accounts.a]\n[accounts.b]\n[accounts.c]\nstate_file = "{taken}"\n',
            environ,
        )
        assert found == {
            "accounts.c.state_file": f"{taken} is also used as accounts.a.state_file (default);"
            " every account needs its own state, token and lock files"
        }

    def test_a_clash_with_a_default_of_an_account_without_a_table(
        self, env: dict[str, str]
    ) -> None:
        """The accounts built from the first one without a table still claim their three
        default files: a file set to one of them is refused, before or after that account,
        at the later of the two keys."""
        state = env["STATE_DIRECTORY"]
        found = problems_of(
            MINIMAL
            + f"""\
            [accounts.a]
            [accounts.b]
            [accounts.c]
            lock_file = "{state}/b.lock"
            [accounts.d]
            token_file = "{state}/../state/e.token.json"
            [accounts.e]
            """,
            env,
        )
        tail = "; every account needs its own state, token and lock files"
        assert found == {
            "accounts.c.lock_file": f"{state}/b.lock is also used as accounts.b.lock_file"
            f" (default){tail}",
            "accounts.e.token_file": f"{state}/e.token.json is also used as"
            f" accounts.d.token_file{tail}",
        }

    def test_a_mistake_in_an_override_is_reported_for_each_account(
        self, env: dict[str, str]
    ) -> None:
        """Sharing the inherited tables hides no mistake: each account's bad override is
        reported at its own key path, while the accounts without overrides load."""
        found = problems_of(
            MINIMAL
            + """\
            [accounts.a]
            [accounts.b.kakao]
            timeout = "soon"
            [accounts.c]
            [accounts.d.kakao]
            timeout = "later"
            [accounts.e.alerts]
            repeat = "never"
            """,
            env,
        )
        assert set(found) == {
            "accounts.b.kakao.timeout",
            "accounts.d.kakao.timeout",
            "accounts.e.alerts.repeat",
        }

    def test_one_problem_is_singular(self, env: dict[str, str]) -> None:
        """The header says "1 problem", not "1 problems"."""
        with pytest.raises(ConfigError, match=r"^configuration has 1 problem:"):
            config_from_toml_text("[kakao]\n", environ=env)

    def test_writable_config_file_refused(self, write_toml: WriteToml, env: dict[str, str]) -> None:
        """Whoever can write the config could redirect auth_url, so 0666 is refused."""
        path = write_toml(MINIMAL, mode=0o666)
        with pytest.raises(ConfigError, match=r"writable by group/others \(mode 0666\)"):
            load_config(path, environ=env)

    def test_state_dir_unknown_without_home(
        self, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
    ) -> None:
        """No $STATE_DIRECTORY and platformdirs failing gives a problem at paths.state_dir."""
        import platformdirs

        def fails(appname: str) -> str:
            raise RuntimeError("could not determine the home directory")

        monkeypatch.setattr(platformdirs, "user_state_dir", fails)
        found = problems_of(MINIMAL, {"RUNTIME_DIRECTORY": "/run/x", "KAKAO_KEY": KEY})
        assert "set paths.state_dir" in found["paths.state_dir"]


class TestFinding:
    def test_explicit_path_wins_even_if_missing(self, tmp_path: Path) -> None:
        """--config FILE that does not exist is an error, never a silent fallback."""
        missing = tmp_path / "missing.toml"
        assert find_config_file(missing, {}) == missing
        with pytest.raises(ConfigError, match="does not exist"):
            load_config(missing, environ={})

    def test_environment_variable(self, write_toml: WriteToml, env: dict[str, str]) -> None:
        """$KAKAO_TOKEND_CONFIG names the file when no --config is given."""
        path = write_toml(MINIMAL, name="other.toml")
        config = load_config(environ={**env, "KAKAO_TOKEND_CONFIG": str(path)})
        assert config.source == path

    def test_configuration_directory(self, write_toml: WriteToml, env: dict[str, str]) -> None:
        """$CONFIGURATION_DIRECTORY/config.toml is found (systemd ConfigurationDirectory=)."""
        path = write_toml(MINIMAL)
        assert find_config_file(None, {"CONFIGURATION_DIRECTORY": str(path.parent)}) == path

    def test_no_file_anywhere(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Without any config file the error lists where it looked and what is missing."""
        import platformdirs

        monkeypatch.setattr(platformdirs, "user_config_dir", lambda app: str(tmp_path / app))
        environ = {"STATE_DIRECTORY": "/s", "RUNTIME_DIRECTORY": "/r"}
        if find_config_file(None, environ) is not None:
            pytest.skip("this machine has a system-wide kakao-tokend config")
        with pytest.raises(ConfigError) as caught:
            load_config(environ=environ)
        assert str(caught.value).startswith("no config file found (looked in: ")
        assert str(tmp_path / "kakao-tokend" / "config.toml") in str(caught.value)
        assert [key for key, _ in caught.value.details] == ["kakao.rest_api_key"]

    def test_no_file_but_systemd_credentials(
        self, monkeypatch: pytest.MonkeyPatch, write_secret: WriteSecret, tmp_path: Path
    ) -> None:
        """A unit with LoadCredential=rest_api_key:... runs with no config file at all."""
        import platformdirs

        monkeypatch.setattr(platformdirs, "user_config_dir", lambda app: str(tmp_path / app))
        creds = tmp_path / "credentials"
        write_secret("rest_api_key", KEY, mode=0o400, where=creds)
        environ = {"STATE_DIRECTORY": "/s", "RUNTIME_DIRECTORY": "/r"}
        if find_config_file(None, environ) is not None:
            pytest.skip("this machine has a system-wide kakao-tokend config")
        config = load_config(environ={**environ, "CREDENTIALS_DIRECTORY": str(creds)})
        assert config.source is None
        assert config.account().app.rest_api_key == KEY


EXAMPLE_ENV = {
    "KAKAO_REST_API_KEY": KEY,
    "STATE_DIRECTORY": "/var/lib/kt",
    "RUNTIME_DIRECTORY": "/run/kt",
}


class TestExample:
    def test_example_loads_as_shipped(self) -> None:
        """config.example.toml is a valid config, so it cannot rot."""
        config = load_config(EXAMPLE, environ=EXAMPLE_ENV)
        assert config.account().app.rest_api_key == KEY

    def test_documented_defaults_are_the_real_defaults(self) -> None:
        """Uncommenting every `#key = value` default line changes nothing at all."""
        text = EXAMPLE.read_text()
        uncommented = re.sub(r"(?m)^#([a-z_]+ = )", r"\1", text)
        assert uncommented != text
        shipped = config_from_toml_text(text, source=EXAMPLE, environ=EXAMPLE_ENV)
        explicit = config_from_toml_text(uncommented, source=EXAMPLE, environ=EXAMPLE_ENV)
        assert explicit == shipped

    def test_every_key_is_documented(self) -> None:
        """Each key the loader accepts appears in the example, so new keys get documented."""
        documented = set(re.findall(r"(?m)^#?\s*([a-z_]+) = ", EXAMPLE.read_text()))
        tables = {name for _, _, name in schema_tables()}
        accepted = {key for cls, sub, _ in schema_tables() for key in schema_keys(cls, sub)}
        assert accepted - tables - documented == set()


def schema_tables() -> list[tuple[type[Any], str | None, str]]:
    """Every table the loader reads, found from Config's field metadata alone: (dataclass read
    from it, sub-table of that dataclass's own keys such as "publish", table name)."""
    found: list[tuple[type[Any], str | None, str]] = [(Config, None, "")]
    for cls, sub, _ in found:
        for item in dataclasses.fields(cls) if sub is None else ():
            spec = item.metadata[config_module._META]
            if isinstance(spec, config_module._Table):
                found.append((spec.cls, None, spec.name))
            elif isinstance(spec, config_module._Key) and spec.table:
                found.append((cls, spec.table, spec.table))
    return list(dict.fromkeys(found))


def schema_keys(cls: type[Any], sub: str | None) -> tuple[str, ...]:
    """The keys accepted in one table (its plain keys, secret sources and sub-tables)."""
    return config_module._schema(cls, sub).keys


#: Where each table of the schema is written in a file (global tables may be overridden).
PLACES = {
    "": [""], "paths": ["paths"], "refresh": ["refresh"], "api": ["api"], "store": ["store"],
    "kakao": ["kakao", "accounts.x.kakao"], "publish": ["publish", "accounts.x.publish"],
    "alerts": ["alerts", "accounts.x.alerts"], "accounts": ["accounts.x"],
    "templates": ["accounts.x.templates[0]"],
}  # fmt: skip
#: Every plain key (no secret, no table) at every place it can be written.
PLAIN_KEYS = [
    (place, key)
    for cls, sub, name in schema_tables()
    for place in PLACES.get(name, [name])
    for _, key, _ in config_module._schema(cls, sub).values
]


class TestSchema:
    """The dataclasses are the schema: every field says how the file sets it."""

    def test_every_field_says_how_it_is_read(self) -> None:
        """Every field's metadata is a parser, a secret, a table or "derived"; a field with no
        metadata at all stops the import with an error naming it."""
        bare = dataclasses.fields(dataclasses.make_dataclass("Bare", ["forgotten"]))[0]
        with pytest.raises(TypeError, match="config field forgotten says neither"):
            config_module._spec(bare)
        kinds = (config_module._Key, config_module._Secret, config_module._Table)
        for cls, sub, _ in schema_tables():
            for item in dataclasses.fields(cls) if sub is None else ():
                spec = item.metadata.get(config_module._META)
                assert isinstance(spec, kinds) or spec == config_module._DERIVED, (cls, item.name)
                if isinstance(spec, config_module._Key):
                    assert callable(spec.parse), (cls, item.name)

    def test_the_walk_finds_every_table(self) -> None:
        """The tables found from the fields are exactly the file's tables (so PLAIN_KEYS and the
        documentation test see every key), and every registered secret lives in one of them."""
        assert {name for _, _, name in schema_tables()} == set(PLACES)
        assert set(config_module.SECRETS) <= set(PLACES)
        assert len(PLAIN_KEYS) > 60

    @pytest.mark.parametrize(("place", "key"), PLAIN_KEYS)
    def test_a_value_of_the_wrong_type_is_one_problem_at_its_key(
        self, env: dict[str, str], tmp_path: Path, place: str, key: str
    ) -> None:
        """Every plain key refuses a table instead of coercing it, with exactly one problem at
        its exact key path, e.g. accounts.x.templates[0].mode."""
        source = tmp_path / "t.tmpl"
        source.write_text("{access_token}")
        if place == "":
            text = f"{key} = {{}}\n{MINIMAL}"
        elif place == "kakao":
            text = f"{MINIMAL}{key} = {{}}\n"
        elif place.endswith("templates[0]"):
            entry = {"source": f'"{source}"', "destination": f'"{tmp_path / "out"}"', key: "{}"}
            text = MINIMAL + "[[accounts.x.templates]]\n"
            text += "".join(f"{name} = {value}\n" for name, value in entry.items())
        else:
            text = f"{MINIMAL}[{place}]\n{key} = {{}}\n"
        found = problems_of(text, env)
        path = f"{place}.{key}" if place else key
        assert list(found) == [path], found
        assert found[path].startswith(("expected", "must")) and "a table" in found[path]


def test_a_paths_only_load_reads_no_secret(tmp_path: Path) -> None:
    """with_secrets=False never opens a secret: an unreadable or missing one is no problem."""
    unreadable = tmp_path / "rest_api_key"
    unreadable.write_text("key")
    unreadable.chmod(0o644)  # refused by a full load
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        f'[kakao]\nrest_api_key_file = "{unreadable}"\nclient_secret_env = "UNSET_SECRET_VAR"\n'
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
    )
    with pytest.raises(ConfigError):
        load_config(config_file, environ={})
    config = load_config(config_file, environ={}, with_secrets=False)
    app = config.accounts["default"].app
    assert app.rest_api_key == "" and app.client_secret is None
    assert config.state_dir == tmp_path / "state"


_PLAIN_TAIL = "[accounts.a]\n\n[accounts.b-2]  \n[accounts.c_3]\n"


@pytest.mark.parametrize(
    "text",
    [
        'log_level = "info"\n[paths]\nstate_dir = "s"\n' + _PLAIN_TAIL,
        _PLAIN_TAIL,
        'log_level = "info"\r\n[refresh]\r\n' + _PLAIN_TAIL.replace("\n", "\r\n"),
        '[refresh]\nheartbeat = "1m"\n' + _PLAIN_TAIL + "[accounts.own.publish]\nmode = 0o600\n",
        '[accounts.own]\nstate_file = "x"\n' + _PLAIN_TAIL,
        "[accounts.own.kakao]\nrest_api_key = 'k'\n" + _PLAIN_TAIL + "[accounts.own]\n",
        "[x]\naccounts.y = 1\n" + _PLAIN_TAIL,
        '"\\u0061ccounts" = 1\n' + _PLAIN_TAIL,
        "accounts = {}\n" + _PLAIN_TAIL,
        "accounts = 1\n" + _PLAIN_TAIL,
        "[[accounts]]\n" + _PLAIN_TAIL,
        "[accounts.b-2]\n" + _PLAIN_TAIL,
        _PLAIN_TAIL + "[accounts.a]\n",
        "x = [\n" + _PLAIN_TAIL,
        'x = """\n' + _PLAIN_TAIL,
        "x = 1\n\n" + _PLAIN_TAIL.replace("[accounts.a]", " [accounts.a]"),
        "x = 1\n" + _PLAIN_TAIL + "# the end\n",
        "x = \n" + _PLAIN_TAIL,
        _PLAIN_TAIL + "[accounts.d]\r",  # a carriage return that ends no line: not TOML
        "x = 1\r\n[accounts.d]\r",
    ],
)
def test_a_tail_of_plain_accounts_reads_as_tomllib_reads_it(text: str) -> None:
    """The shortcut for a file ending in plain ``[accounts.NAME]`` lines gives what tomllib
    gives for the whole file, or raises its error with the same line and column: valid
    files, an ``accounts`` defined earlier (as a table, a value, inline, an array, through
    an escaped key), a name repeated, a value left open before the tail, CRLF lines."""
    assert_reads_as_tomllib(text)


def assert_reads_as_tomllib(text: str) -> None:
    """Assert that config._load_toml gives what tomllib gives for ``text`` (the same tables
    in the same order), or raises its error with the same line and column."""
    import tomllib

    try:
        expected: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        with pytest.raises(tomllib.TOMLDecodeError) as raised:
            config_module._load_toml(text)
        assert str(raised.value) == str(exc)
        return
    got = config_module._load_toml(text)
    assert got == expected
    assert list(got) == list(expected)
    assert list(got.get("accounts", {})) == list(expected.get("accounts", {}))


#: Lines a configuration may hold before its tail, tricky ones included (an open string or
#: array, an ``accounts`` defined in every way, headers that only look plain, a bare CR).
_TOML_LINES = [
    "[kakao]",
    'rest_api_key = "x"',
    'a = """',
    '"""',
    "b = '''",
    "'''",
    "[accounts]",
    "[accounts.a]",
    "accounts.b.x = 1",
    "[[accounts.c]]",
    "x = [",
    "]",
    "y = { accounts = 1 }",
    '[accounts."q.r"]',
    "[accounts.a] # c",
    "  [accounts.z]",
    "[accounts.z]  ",
    "[ accounts.k ]",
    '"accounts".x = 1',
    "#[accounts.c]",
    "",
    "\r",
    'z = "\\',
    "[accounts.a.b]",
    "[accounts.é]",
    "[accounts.a]\r",
    'm = """[accounts.zz]',
    "[accounts.y]]",
    "[[accounts.y]]",
]
_TAIL_LINES = ["[accounts.a]", "[accounts.b]", "[accounts.c-d]", "", " ", "[accounts.a]\r"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(_TOML_LINES), max_size=8),
    st.lists(st.sampled_from(_TAIL_LINES), max_size=4),
    st.sampled_from(["", "\n", "\r\n"]),
)
def test_any_file_reads_as_tomllib_reads_it(head: list[str], tail: list[str], end: str) -> None:
    """Whatever comes before a tail of plain account lines, and however the lines end, the
    shortcut answers as tomllib does: the same tables in the same order, or its error."""
    assert_reads_as_tomllib("\n".join(head + tail) + end)
