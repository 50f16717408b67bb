"""Tests for paths.py: systemd directories win over platformdirs, which is consulted lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import platformdirs
import pytest

from kakao_tokend import paths
from kakao_tokend.errors import ConfigError


def _platformdirs_must_not_be_called(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("platformdirs was consulted although systemd gave a directory")


def _platformdirs_fails(*args: object, **kwargs: object) -> NoReturn:
    # What platformdirs 4.14 raises under DynamicUser= without nss-systemd.
    raise RuntimeError("could not determine the home directory")


@pytest.fixture
def no_platformdirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every platformdirs user_*_dir call fail the test."""
    for name in ("user_state_dir", "user_runtime_dir", "user_config_dir"):
        monkeypatch.setattr(platformdirs, name, _platformdirs_must_not_be_called)


class TestSystemdDirectories:
    def test_state_directory_wins_without_touching_platformdirs(
        self, no_platformdirs: None
    ) -> None:
        """$STATE_DIRECTORY is used as is and platformdirs is never called when it is set."""
        assert paths.default_state_dir({"STATE_DIRECTORY": "/var/lib/kt"}) == Path("/var/lib/kt")

    def test_runtime_directory_wins_without_touching_platformdirs(
        self, no_platformdirs: None
    ) -> None:
        """$RUNTIME_DIRECTORY is used as is and platformdirs is never called when it is set."""
        assert paths.default_runtime_dir({"RUNTIME_DIRECTORY": "/run/kt"}) == Path("/run/kt")

    def test_colon_separated_list_takes_the_first(self, no_platformdirs: None) -> None:
        """A unit with `StateDirectory=a b` gives "/var/lib/a:/var/lib/b"; the first is ours."""
        environ = {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b", "RUNTIME_DIRECTORY": "/run/x:/run/y"}
        assert paths.default_state_dir(environ) == Path("/var/lib/a")
        assert paths.default_runtime_dir(environ) == Path("/run/x")

    def test_empty_or_relative_values_are_ignored(self) -> None:
        """An empty or relative $STATE_DIRECTORY is not a directory systemd made: ignored."""
        assert paths.systemd_dir({"STATE_DIRECTORY": ""}, "STATE_DIRECTORY") is None
        assert paths.systemd_dir({"STATE_DIRECTORY": "rel:/abs"}, "STATE_DIRECTORY") == Path("/abs")


class TestPlatformdirsFallback:
    def test_interactive_run_uses_user_state_dir(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without systemd variables the platformdirs user state dir for the app is used."""
        seen: list[str] = []

        def fake(appname: str) -> str:
            seen.append(appname)
            return "/home/u/.local/state/kakao-tokend"

        monkeypatch.setattr(platformdirs, "user_state_dir", fake)
        assert paths.default_state_dir({}) == Path("/home/u/.local/state/kakao-tokend")
        assert seen == ["kakao-tokend"]

    def test_platformdirs_failure_becomes_config_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A HOME-less sandbox makes platformdirs raise; we say to set paths.state_dir instead."""
        monkeypatch.setattr(platformdirs, "user_state_dir", _platformdirs_fails)
        with pytest.raises(ConfigError) as caught:
            paths.default_state_dir({})
        assert caught.value.details[0][0] == "paths.state_dir"
        assert "set paths.state_dir" in caught.value.details[0][1]
        assert "StateDirectory=" in caught.value.details[0][1]

    def test_root_relative_answer_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With HOME unset under DynamicUser= platformdirs says /.local/state/...; refused."""
        monkeypatch.setattr(platformdirs, "user_runtime_dir", lambda app: f"/.local/run/{app}")
        with pytest.raises(ConfigError) as caught:
            paths.default_runtime_dir({})
        assert caught.value.details[0][0] == "paths.runtime_dir"
        assert "is HOME set?" in caught.value.details[0][1]

    def test_importing_never_consults_platformdirs(self) -> None:
        """Importing the modules computes no directory (it would raise under DynamicUser=)."""
        script = (
            "import platformdirs\n"
            "def boom(*a, **k): raise SystemExit('platformdirs called at import')\n"
            "for n in ('user_state_dir', 'user_runtime_dir', 'user_config_dir'):\n"
            "    setattr(platformdirs, n, boom)\n"
            "import kakao_tokend.paths, kakao_tokend.config\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr


class TestConfigSearchPath:
    def test_order(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """explicit → $KAKAO_TOKEND_CONFIG → $CONFIGURATION_DIRECTORY → /etc → user config."""
        monkeypatch.setattr(platformdirs, "user_config_dir", lambda app: f"/home/u/.config/{app}")
        environ = {
            "KAKAO_TOKEND_CONFIG": "/opt/kt.toml",
            "CONFIGURATION_DIRECTORY": "/etc/kt:/etc/other",
        }
        assert list(paths.config_search_path(environ, Path("/cli.toml"))) == [
            Path("/cli.toml"),
            Path("/opt/kt.toml"),
            Path("/etc/kt/config.toml"),
            Path("/etc/kakao-tokend/config.toml"),
            Path("/home/u/.config/kakao-tokend/config.toml"),
        ]

    def test_no_home_leaves_out_the_user_file(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """When platformdirs cannot find a home the search path simply omits the user file."""
        monkeypatch.setattr(platformdirs, "user_config_dir", _platformdirs_fails)
        assert list(paths.config_search_path({})) == [Path("/etc/kakao-tokend/config.toml")]


class TestSystemLayout:
    """With the system config and no systemd variables, the system unit's directories win."""

    def test_system_config_defaults_to_the_system_directories(
        self, tmp_path: Path, no_platformdirs: None
    ) -> None:
        """A shell using /etc/kakao-tokend/config.toml looks where the service writes."""
        layout = paths.SystemLayout.under(tmp_path)
        layout.config_file.parent.mkdir(parents=True)
        layout.config_file.write_text("")
        source = layout.config_file
        assert paths.default_state_dir({}, config_source=source, system=layout) == (
            tmp_path / "var/lib/kakao-tokend"
        )
        assert paths.default_runtime_dir({}, config_source=source, system=layout) == (
            tmp_path / "run/kakao-tokend"
        )

    def test_a_symlink_to_the_system_config_counts_as_the_system_config(
        self, tmp_path: Path, no_platformdirs: None
    ) -> None:
        """`--config /some/link` pointing at the system file is the system config too."""
        layout = paths.SystemLayout.under(tmp_path)
        layout.config_file.parent.mkdir(parents=True)
        layout.config_file.write_text("")
        link = tmp_path / "link.toml"
        link.symlink_to(layout.config_file)
        assert paths.is_system_config(link, layout)
        assert paths.default_state_dir({}, config_source=link, system=layout) == layout.state_dir

    def test_systemd_variables_still_win(self, tmp_path: Path, no_platformdirs: None) -> None:
        """Under the unit (or the `kt` helper) $STATE_DIRECTORY/$RUNTIME_DIRECTORY are used."""
        layout = paths.SystemLayout.under(tmp_path)
        environ = {"STATE_DIRECTORY": "/srv/state", "RUNTIME_DIRECTORY": "/srv/run"}
        source = layout.config_file
        assert paths.default_state_dir(environ, config_source=source, system=layout) == Path(
            "/srv/state"
        )
        assert paths.default_runtime_dir(environ, config_source=source, system=layout) == Path(
            "/srv/run"
        )

    def test_another_config_keeps_the_user_directories(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A personal config (not the system file) still uses platformdirs' user dirs."""
        layout = paths.SystemLayout.under(tmp_path)
        monkeypatch.setattr(platformdirs, "user_state_dir", lambda app: f"/home/u/.state/{app}")
        own = tmp_path / "mine.toml"
        own.write_text("")
        assert paths.default_state_dir({}, config_source=own, system=layout) == Path(
            "/home/u/.state/kakao-tokend"
        )
        assert paths.default_state_dir({}, config_source=None, system=layout) == Path(
            "/home/u/.state/kakao-tokend"
        )

    def test_load_config_finds_the_system_file_and_its_directories(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The whole path from the search to the Config: no [paths], system config → /var/lib."""
        from kakao_tokend.apiclient import socket_path_without_secrets
        from kakao_tokend.config import load_config

        layout = paths.SystemLayout.under(tmp_path)
        monkeypatch.setattr(paths, "SYSTEM", layout)
        for name in ("user_state_dir", "user_runtime_dir"):
            monkeypatch.setattr(platformdirs, name, _platformdirs_must_not_be_called)
        monkeypatch.setattr(platformdirs, "user_config_dir", lambda app: str(tmp_path / "none"))
        layout.config_file.parent.mkdir(parents=True)
        layout.config_file.write_text('[kakao]\nrest_api_key_env = "KEY"\n')
        layout.config_file.chmod(0o644)
        config = load_config(environ={"KEY": "k"})
        assert config.source == layout.config_file
        assert config.state_dir == layout.state_dir
        assert config.runtime_dir == layout.runtime_dir
        assert config.accounts["default"].state_file == layout.state_dir / "default.state.json"
        assert config.api_socket == layout.runtime_dir / "api.sock"
        # `reload` finds the socket without reading any secret, by the same rule.
        assert socket_path_without_secrets(None, {}) == layout.runtime_dir / "api.sock"
