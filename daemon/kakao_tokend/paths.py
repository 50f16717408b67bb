"""File locations: explicit setting > systemd $STATE_DIRECTORY & co > system or user dirs.

platformdirs is imported only when a user directory is asked for: the system service (its
config in $CONFIGURATION_DIRECTORY or /etc, its directories from systemd) never needs it, and
its import cost every start (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

APP_NAME = "kakao-tokend"
#: Environment variable naming the config file; wins over every search location.
CONFIG_ENV = "KAKAO_TOKEND_CONFIG"
CONFIG_FILE_NAME = "config.toml"
#: The local API's socket in the runtime directory, unless [api] socket names another.
API_SOCKET_NAME = "api.sock"


@dataclass(frozen=True)
class SystemLayout:
    """Where a system-wide install keeps its files: the system unit's three directories.

    ``ConfigurationDirectory=``, ``StateDirectory=`` and ``RuntimeDirectory=kakao-tokend`` of
    systemd/kakao-tokend.service. Tests (and packagers) build one under another root.
    """

    config_file: Path
    state_dir: Path
    runtime_dir: Path

    @classmethod
    def under(cls, root: Path) -> SystemLayout:
        """Return the same layout below ``root`` (``root``/etc/kakao-tokend/config.toml ...)."""
        base = Path(root)
        return cls(
            config_file=base / "etc" / APP_NAME / CONFIG_FILE_NAME,
            state_dir=base / "var" / "lib" / APP_NAME,
            runtime_dir=base / "run" / APP_NAME,
        )


#: The real system layout. Not platformdirs' site_config_dir(), which is /etc/xdg/<app>.
SYSTEM = SystemLayout.under(Path("/"))


def is_system_config(source: Path | None, system: SystemLayout | None = None) -> bool:
    """Return True when ``source`` is the system config file (also through a symlink)."""
    if source is None:
        return False
    wanted = (system or SYSTEM).config_file
    try:
        return os.path.samefile(source, wanted)
    except OSError:  # one of them does not exist (or is unreadable): compare the names
        return Path(os.path.abspath(source)) == Path(os.path.abspath(wanted))


def systemd_dir(environ: Mapping[str, str], variable: str) -> Path | None:
    """Return the first path of a systemd directory variable such as ``$STATE_DIRECTORY``.

    systemd joins several paths with ':' when a unit lists several directories
    (``StateDirectory=a b``); the first one is ours. Empty or relative values are ignored.
    """
    for part in environ.get(variable, "").split(":"):
        if part and Path(part).is_absolute():
            return Path(part)
    return None


def _platform_dir(function: str, *, what: str, setting: str, systemd_setting: str) -> Path:
    """Call platformdirs' user_*_dir ``function``, turning its failures into a ConfigError."""
    import platformdirs  # only when a default user directory is needed: see the docstring

    hint = (
        f"set {setting} in the config file, or run under systemd with {systemd_setting}= "
        "so that the directory comes from the environment"
    )
    try:
        # user_runtime_dir() warns when it falls back to /tmp; that fallback is fine for an
        # interactive run, and a warning here would escape as noise (or an error in tests).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = getattr(platformdirs, function)(APP_NAME)
    except (RuntimeError, OSError, KeyError) as exc:
        # Under DynamicUser= there is no HOME and possibly no passwd entry: platformdirs raises.
        raise ConfigError(
            f"cannot determine the {what} directory: {exc}",
            details=[(setting, f"cannot determine a default ({exc}); {hint}")],
        ) from exc
    path = Path(raw)
    # With HOME unset under DynamicUser= (nss-systemd present) platformdirs answers
    # /.local/state/<app>, which is on the read-only root: useless, so say so now.
    if not path.is_absolute() or str(path).startswith("/."):
        raise ConfigError(
            f"cannot determine the {what} directory: platformdirs answered {path}",
            details=[(setting, f"the default {path} is not usable (is HOME set?); {hint}")],
        )
    return path


def default_state_dir(
    environ: Mapping[str, str],
    *,
    config_source: Path | None = None,
    system: SystemLayout | None = None,
) -> Path:
    """Return where account state lives when ``paths.state_dir`` is not set.

    ``$STATE_DIRECTORY`` (systemd ``StateDirectory=``) first; else, when the config in use
    is the system one, the system unit's ``/var/lib/kakao-tokend`` (so a shell finds what the
    service writes); else platformdirs' ``user_state_dir("kakao-tokend")``. Raises ConfigError
    if none works.
    """
    found = systemd_dir(environ, "STATE_DIRECTORY")
    if found is not None:
        return found
    if is_system_config(config_source, system):
        return (system or SYSTEM).state_dir
    return _platform_dir(
        "user_state_dir",
        what="state",
        setting="paths.state_dir",
        systemd_setting="StateDirectory",
    )


def default_runtime_dir(
    environ: Mapping[str, str],
    *,
    config_source: Path | None = None,
    system: SystemLayout | None = None,
) -> Path:
    """Return where runtime files (the socket) live when ``paths.runtime_dir`` is not set.

    ``$RUNTIME_DIRECTORY`` (systemd ``RuntimeDirectory=``) first; else, with the system
    config, the system unit's ``/run/kakao-tokend`` (where the service's socket is); else
    platformdirs' ``user_runtime_dir("kakao-tokend")``. Raises ConfigError if none works.
    """
    found = systemd_dir(environ, "RUNTIME_DIRECTORY")
    if found is not None:
        return found
    if is_system_config(config_source, system):
        return (system or SYSTEM).runtime_dir
    return _platform_dir(
        "user_runtime_dir",
        what="runtime",
        setting="paths.runtime_dir",
        systemd_setting="RuntimeDirectory",
    )


#: sockaddr_un's sun_path: a Unix socket's path must be shorter than this many bytes.
SUN_PATH_MAX = 108


def api_socket_path(runtime_dir: Path, configured: Path | None = None) -> Path:
    """Return where the local API's socket is: ``[api] socket``, else <runtime_dir>/api.sock.

    The one rule, used by the daemon that binds it and by every command that looks for it.
    """
    return configured if configured is not None else runtime_dir / API_SOCKET_NAME


def user_config_file() -> Path | None:
    """Return platformdirs' ``user_config_dir()/config.toml``, or None when there is no home."""
    import platformdirs  # see the module docstring

    try:
        raw = platformdirs.user_config_dir(APP_NAME)
    except (RuntimeError, OSError, KeyError):
        return None
    path = Path(raw)
    if not path.is_absolute() or str(path).startswith("/."):
        return None
    return path / CONFIG_FILE_NAME


def config_options(source: Path | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Return ``("--config", FILE)`` when a command shown to people must name ``source`` (a
    plain `kakao-tokend` would not find it by itself), else ``()``."""
    if source is None or found_by_default(source, environ):
        return ()
    return ("--config", os.path.abspath(source))


def found_by_default(source: Path, environ: Mapping[str, str]) -> bool:
    """Return True when a plain `kakao-tokend` in a login shell finds ``source`` by itself.

    That is: the first existing file of the search path without ``--config``,
    ``$KAKAO_TOKEND_CONFIG`` and systemd's ``$CONFIGURATION_DIRECTORY`` (which a person's shell
    does not have). Commands shown to people name any other file with ``--config``.
    """
    plain = {k: v for k, v in environ.items() if k not in (CONFIG_ENV, "CONFIGURATION_DIRECTORY")}
    for candidate in config_search_path(plain):
        if candidate.is_file():
            try:
                return os.path.samefile(candidate, source)
            except OSError:
                return False
    return False


def config_search_path(
    environ: Mapping[str, str],
    explicit: Path | None = None,
    *,
    system: SystemLayout | None = None,
) -> Iterator[Path]:
    """Yield the config file candidates, most specific first.

    Order: ``explicit`` (``--config``) → ``$KAKAO_TOKEND_CONFIG`` →
    ``$CONFIGURATION_DIRECTORY/config.toml`` → ``/etc/kakao-tokend/config.toml`` →
    ``user_config_dir("kakao-tokend")/config.toml`` (omitted when there is no usable home).
    One at a time: a search that stops at an earlier file never asks platformdirs.
    """
    if explicit is not None:
        yield explicit
    if environ.get(CONFIG_ENV):
        yield Path(environ[CONFIG_ENV])
    configuration = systemd_dir(environ, "CONFIGURATION_DIRECTORY")
    if configuration is not None:
        yield configuration / CONFIG_FILE_NAME
    yield (system or SYSTEM).config_file
    # platformdirs may fail under systemd (no HOME); the candidate is then simply left out.
    user_file = user_config_file()
    if user_file is not None:
        yield user_file
