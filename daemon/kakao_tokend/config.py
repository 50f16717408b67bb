"""TOML config -> frozen dataclasses; unknown keys rejected; every problem reported at once."""

from __future__ import annotations

import difflib
import grp
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from . import paths
from .errors import ConfigError
from .i18n import LANGUAGES

if TYPE_CHECKING:  # imported only when [store] backend is "postgres"
    from .fleet.crypto import Keyring

__all__ = [
    "DEFAULT_ACCOUNT",
    "LOG_LEVELS",
    "SECRETS",
    "SEVERITIES",
    "AccountConfig",
    "AlertsConfig",
    "ApiSettings",
    "Config",
    "KakaoApp",
    "RefreshPolicy",
    "SecretSpec",
    "StoreSettings",
    "TemplateConfig",
    "config_from_toml_text",
    "find_config_file",
    "load_config",
    "parse_duration",
    "parse_share",
]

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEFAULT_ACCOUNT: Final = "default"
ACCOUNT_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: Sections later versions will add; named specially so the message says "not yet".
_FUTURE_SECTIONS: Final[frozenset[str]] = frozenset()
#: Alert severities, least urgent first (alerts.py maps them onto log levels).
SEVERITIES: Final = ("info", "warning", "critical")


# ---------------------------------------------------------------------------------------------
# The frozen result


@dataclass(frozen=True)
class KakaoApp:
    """One Kakao app registration: credentials and endpoints. Secrets never appear in repr."""

    rest_api_key: str = field(repr=False)
    client_secret: str | None = field(repr=False)
    auth_url: str = "https://kauth.kakao.com"
    api_url: str = "https://kapi.kakao.com"
    redirect_uri: str = "http://127.0.0.1:8765/callback"
    scopes: tuple[str, ...] = ()
    timeout: float = 30.0
    connect_timeout: float = 10.0
    #: Where the key came from: "file /etc/x", "env KAKAO_KEY", "credential x" or "inline".
    rest_api_key_source: str = "inline"
    #: Where the client secret came from; None when there is no client secret.
    client_secret_source: str | None = None

    def __post_init__(self) -> None:
        """Default the secret's source to "inline" when a secret was given directly."""
        if self.client_secret is not None and self.client_secret_source is None:
            object.__setattr__(self, "client_secret_source", "inline")
        if self.client_secret is None and self.client_secret_source is not None:
            object.__setattr__(self, "client_secret_source", None)


@dataclass(frozen=True)
class RefreshPolicy:
    """When to refresh and how to retry; shares are fractions of the access token lifetime."""

    refresh_at: float = 0.75
    jitter: float = 0.05
    heartbeat: float = 60.0
    retry_initial: float = 10.0
    retry_max: float = 300.0
    rotation_window: float = 30 * 86400.0
    verify_on_start: bool = True


@dataclass(frozen=True)
class AlertsConfig:
    """When to alert and through which channels (the log is always one); see [alerts]."""

    #: Remaining refresh-token life at which to alert, longest first; each fires once.
    thresholds: tuple[float, ...] = (14 * 86400.0, 7 * 86400.0, 3 * 86400.0, 86400.0)
    #: Expiry alerts with less than this left are critical (warning before).
    critical_below: float = 3 * 86400.0
    #: A critical alert that is still active is sent again after this long.
    repeat: float = 86400.0
    #: Alert when refreshing has failed for longer than this share of the access lifetime.
    failing_after: float = 0.10
    #: KakaoTalk "send to me": True, False, or None = when the token has talk_message.
    kakaotalk: bool | None = None
    kakaotalk_min_severity: str = "info"
    #: May hold a secret (Slack/Discord URLs do): never shown in repr or logs.
    webhook_url: str | None = field(default=None, repr=False)
    webhook_timeout: float = 10.0
    webhook_retries: int = 3
    webhook_min_severity: str = "info"
    command: tuple[str, ...] = ()
    command_timeout: float = 30.0
    command_min_severity: str = "info"
    #: "ko" or "en" for the texts the channels send; None = from the locale (LC_ALL, LANG ...).
    language: str | None = None
    #: A page the KakaoTalk memo links to (its domain must be registered for the Kakao app).
    kakaotalk_link: str | None = None


@dataclass(frozen=True)
class TemplateConfig:
    """One [[accounts.NAME.templates]] entry: a file the token is rendered into (templates.py)."""

    source: Path
    destination: Path
    mode: int
    group: str | None
    #: Run (no shell) after the destination's content changed; empty for none.
    command: tuple[str, ...] = ()
    command_timeout: float = 30.0
    #: The source's text as read when the configuration was loaded (and checked).
    text: str = field(default="", repr=False)


@dataclass(frozen=True)
class AccountConfig:
    """One Kakao user account: its app and its files."""

    name: str
    app: KakaoApp
    state_file: Path
    lock_file: Path
    token_file: Path
    token_file_mode: int = 0o640
    token_file_group: str | None = None
    include_refresh_token: bool = False
    #: Commands (argv, no shell) run after each refresh that changed the token.
    hooks: tuple[tuple[str, ...], ...] = ()
    hook_timeout: float = 30.0
    #: Extra sinks: a file with only the access token; a KAKAO_ACCESS_TOKEN=... env file.
    access_token_file: Path | None = None
    env_file: Path | None = None
    #: Files the token is rendered into, in the consumer's own format.
    templates: tuple[TemplateConfig, ...] = ()
    #: [alerts] with this account's [accounts.NAME.alerts] overrides applied.
    alerts: AlertsConfig = field(default_factory=AlertsConfig)


@dataclass(frozen=True)
class ApiSettings:
    """The local API: a Unix socket (always) and an optional TCP listener with a bearer token."""

    #: None means <runtime_dir>/api.sock.
    socket: Path | None = None
    socket_mode: int = 0o660
    socket_group: str | None = None
    #: (host, port) when the TCP listener is on.
    tcp: tuple[str, int] | None = None
    bearer_token: str | None = field(default=None, repr=False)
    allow_non_loopback: bool = False
    #: Largest request body accepted (413 beyond); proxied bodies up to proxy_retry_body are
    #: buffered so the request can be retried after a -401.
    max_body: int = 16 * 1024 * 1024
    proxy_retry_body: int = 1024 * 1024
    request_timeout: float = 60.0


STORE_BACKENDS: Final = ("file", "postgres")
#: A fleet node's name: shown in status, metrics and pg_stat_activity.
NODE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def default_node_name() -> str:
    """Return the host name, the default [store] node_name."""
    return socket.gethostname()


@dataclass(frozen=True)
class StoreSettings:
    """[store]: where account state lives: "file" (the default) or "postgres" (fleet mode).

    The DSN and the key file's text are secrets (repr hides them). They are read whenever
    they are configured, also with the file backend: `store migrate --to postgres` needs them
    before the backend is switched.
    """

    backend: str = "file"
    dsn: str | None = field(default=None, repr=False)
    #: Where the DSN came from: "file /etc/x", "env X", "credential x" or "inline".
    dsn_source: str | None = None
    #: The keys of the key file (newest last); None when no key is configured.
    keyring: Keyring | None = field(default=None, repr=False)
    key_source: str | None = None
    node_name: str = field(default_factory=default_node_name)


@dataclass(frozen=True)
class Config:
    """The whole, checked configuration."""

    source: Path | None
    state_dir: Path
    runtime_dir: Path
    log_level: str
    refresh: RefreshPolicy
    accounts: Mapping[str, AccountConfig]
    default_account: str
    api: ApiSettings = field(default_factory=ApiSettings)
    #: The global [alerts] section (each account's effective settings are in its .alerts).
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    store: StoreSettings = field(default_factory=StoreSettings)

    def account(self, name: str | None = None) -> AccountConfig:
        """Return the named account (the default one for None); ConfigError if unknown."""
        wanted = name or self.default_account
        try:
            return self.accounts[wanted]
        except KeyError:
            problem = f"no account named {wanted!r}{_suggest(wanted, self.accounts)}"
            raise ConfigError(
                f"unknown account {wanted!r}",
                details=[("", f"{problem} (configured: {', '.join(self.accounts)})")],
            ) from None


# ---------------------------------------------------------------------------------------------
# Value parsers (public: the CLI uses them for flags too)

_DURATION_EXAMPLES: Final = 'a duration like "90s", "30m", "6h", "14d" or "1h30m"'
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|d|h|m|s)")
_UNIT_SECONDS: Final = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_UNIT_ORDER: Final = ("d", "h", "m", "s", "ms")


def _describe(value: object) -> str:
    """Name a bad value for an error message (strings quoted, other types by kind)."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def parse_duration(text: str | int | float) -> float:
    """Parse "90s", "30m", "6h", "14d", "1h30m", "500ms" or a plain number of seconds.

    Raises ValueError (with a message naming the accepted forms) for anything else,
    including negative, infinite and boolean values.
    """
    problem = f"expected {_DURATION_EXAMPLES}, got {_describe(text)}"
    if isinstance(text, bool):
        raise ValueError(problem)
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise ValueError(problem)
        return float(text)
    if not isinstance(text, str):
        raise ValueError(problem)
    compact = text.strip().replace(" ", "").lower()
    try:
        number = float(compact)
    except ValueError:
        pass
    else:
        if math.isfinite(number) and number >= 0:
            return number
        raise ValueError(problem)
    total = 0.0
    position = 0
    last_unit = -1
    for match in _DURATION_PART_RE.finditer(compact):
        unit_index = _UNIT_ORDER.index(match.group(2))
        # "30m1h" or "5s5s" is more likely a typo than a duration: largest unit first, once.
        if match.start() != position or unit_index <= last_unit:
            raise ValueError(problem)
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
        last_unit = unit_index
    if not compact or position != len(compact):
        raise ValueError(problem)
    return total


def parse_share(value: str | int | float) -> float:
    """Parse a share of a lifetime: "75%" or 0.75 (a fraction between 0 and 1)."""
    problem = f'expected a share like "75%" or 0.75, got {_describe(value)}'
    if isinstance(value, bool):
        raise ValueError(problem)
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(problem) from None
    elif isinstance(value, int | float):
        number = float(value)
    else:
        raise ValueError(problem)
    if not math.isfinite(number) or not 0 <= number <= 1:
        raise ValueError(problem)
    return number


# ---------------------------------------------------------------------------------------------
# Finding and loading the file


def find_config_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """Return the config file to use, or None when none exists.

    An explicit path (``--config``) or ``$KAKAO_TOKEND_CONFIG`` is returned even when it does
    not exist, so that loading it reports the mistake instead of silently using another file.
    """
    if explicit is not None:
        return explicit
    named = environ.get(paths.CONFIG_ENV)
    if named:
        return Path(named)
    for candidate in paths.config_search_path(environ):
        if candidate.is_file():
            return candidate
    return None


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    with_secrets: bool = True,
) -> Config:
    """Find, read, parse, check and freeze the configuration.

    Raises ConfigError listing every problem found, each as (key path, problem with a hint).
    ``with_secrets=False`` reads no secret at all (the REST API key comes back empty and the
    client secret as None): commands that only need paths, such as ``status``, then work for an
    operator who cannot read the credentials (systemd's LoadCredential= files are private).
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    source = find_config_file(path, env)
    if source is None:
        # A systemd unit can run without any file: LoadCredential=rest_api_key:... is enough.
        try:
            return _build("", source=None, environ=env, extra=[], with_secrets=with_secrets)
        except ConfigError as exc:
            looked = ", ".join(str(p) for p in paths.config_search_path(env))
            raise ConfigError(
                f"no config file found (looked in: {looked}); copy config.example.toml to one "
                f"of these places or pass --config FILE. Without a file:",
                details=exc.details,
            ) from None
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist; check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {source} is not UTF-8 text (bad byte at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    extra: list[tuple[str, str]] = []
    mode = _file_mode(source)
    if mode is not None and mode & 0o022:
        # Whoever can write the config can point auth_url at their own server and read tokens.
        extra.append(
            (
                "",
                f"config file {source} is writable by group/others (mode {mode:04o}); "
                f"run: chmod 644 {source}",
            )
        )
    return _build(text, source=source, environ=env, extra=extra, with_secrets=with_secrets)


def config_from_toml_text(
    text: str, *, source: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build a Config from TOML text (relative paths are relative to ``source``'s directory)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    return _build(text, source=source, environ=env, extra=[])


def _build(
    text: str,
    *,
    source: Path | None,
    environ: Mapping[str, str],
    extra: list[tuple[str, str]],
    with_secrets: bool = True,
) -> Config:
    where = f"config file {source}" if source is not None else "configuration"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {_toml_reason(exc)}") from None
    checker = _Checker(source=source, environ=environ, with_secrets=with_secrets)
    checker.problems.extend(extra)
    config = checker.config(raw)
    problems = list(dict.fromkeys(checker.problems))  # the same global mistake seen per account
    if problems or config is None:
        count = len(problems)
        noun = "problem" if count == 1 else "problems"
        raise ConfigError(f"{where} has {count} {noun}:", details=problems)
    return config


def _toml_reason(exc: tomllib.TOMLDecodeError) -> str:
    """Turn "Invalid value (at line 3, column 9)" into "line 3, column 9: Invalid value"."""
    message = str(exc)
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match is None:
        return message
    return f"line {match.group(2)}, column {match.group(3)}: {match.group(1)}"


def _file_mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _suggest(word: str, choices: Iterable[str]) -> str:
    """Return '; did you mean "x"?' for a close match, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# ---------------------------------------------------------------------------------------------
# The checker: shape first (types, unknown keys), then cross-field rules; never stops early.

_TOP_KEYS: Final = (
    "log_level",
    "default_account",
    "paths",
    "kakao",
    "refresh",
    "publish",
    "accounts",
    "api",
    "store",
)
_PATHS_KEYS: Final = ("state_dir", "runtime_dir")


@dataclass(frozen=True)
class SecretSpec:
    """One secret setting: given by exactly one of NAME (inline), NAME_file, NAME_env or
    NAME_credential, or found as $CREDENTIALS_DIRECTORY/NAME when none is set."""

    name: str
    #: Whether NAME itself (the value written into the config file) is accepted.
    inline: bool = True
    #: Whether an inline value needs a config file that only its owner can read. The REST API
    #: key is no secret from other local users: it is the client_id of every authorize URL.
    private: bool = True
    #: Whether the value may contain spaces and lines (a libpq DSN "host=x dbname=y", a key
    #: file with one key per line); other secrets are one word, so a stray space is a mistake.
    multiword: bool = False

    def sources(self) -> tuple[str, ...]:
        """The config keys that can give this secret."""
        files = tuple(self.name + suffix for suffix in ("_file", "_env", "_credential"))
        return (self.name, *files) if self.inline else files


#: Every secret, by the config table it is set in. Adding one is one line here (plus using its
#: value): its keys, the file-mode and inline checks, systemd credentials, per-account
#: overrides and the "only one source" rule all follow from this table.
SECRETS: Final[Mapping[str, tuple[SecretSpec, ...]]] = MappingProxyType(
    {
        "kakao": (SecretSpec("rest_api_key", private=False), SecretSpec("client_secret")),
        # Slack/Discord-style webhook URLs are bearer credentials themselves.
        "alerts": (SecretSpec("webhook_url"),),
        "api": (SecretSpec("bearer_token"),),
        # Fleet mode: the database (a password-less DSN is often inline) and the key that
        # encrypts tokens at rest (never inline: it would sit next to the database's address).
        "store": (
            SecretSpec("dsn", multiword=True),
            SecretSpec("key", inline=False, multiword=True),
        ),
    }
)
_SECRET_SPECS: Final = {spec.name: spec for specs in SECRETS.values() for spec in specs}


def _secret_keys(table: str) -> tuple[str, ...]:
    return tuple(key for spec in SECRETS.get(table, ()) for key in spec.sources())


_KAKAO_KEYS: Final = (
    *_secret_keys("kakao"),
    "auth_url",
    "api_url",
    "redirect_uri",
    "scopes",
    "timeout",
    "connect_timeout",
)
_REFRESH_KEYS: Final = (
    "refresh_at",
    "jitter",
    "heartbeat",
    "retry_initial",
    "retry_max",
    "rotation_window",
    "verify_on_start",
)
_PUBLISH_KEYS: Final = ("mode", "group", "include_refresh_token")
_ACCOUNT_KEYS: Final = (
    "token_file",
    "state_file",
    "lock_file",
    "kakao",
    "publish",
    "hooks",
    "hook_timeout",
    "access_token_file",
    "env_file",
    "templates",
)
_TEMPLATE_KEYS: Final = (
    "source",
    "destination",
    "mode",
    "group",
    "command",
    "command_timeout",
)
_API_KEYS: Final = (
    "socket",
    "socket_mode",
    "socket_group",
    "tcp",
    *_secret_keys("api"),
    "allow_non_loopback",
    "max_body",
    "proxy_retry_body",
    "request_timeout",
)
_ALERTS_KEYS: Final = (
    "thresholds",
    "critical_below",
    "repeat",
    "failing_after",
    "kakaotalk",
    "kakaotalk_min_severity",
    *_secret_keys("alerts"),
    "webhook_timeout",
    "webhook_retries",
    "webhook_min_severity",
    "command",
    "command_timeout",
    "language",
    "kakaotalk_link",
    "command_min_severity",
)
_STORE_KEYS: Final = ("backend", *_secret_keys("store"), "node_name")
_FILE_KINDS: Final = (
    ("state_file", ".state.json"),
    ("lock_file", ".lock"),
    ("token_file", ".token.json"),
)

#: A setting's value with the key path it came from (global [kakao] or an account override).
_Setting = tuple[Any, str]


class _Checker:
    def __init__(
        self, *, source: Path | None, environ: Mapping[str, str], with_secrets: bool = True
    ) -> None:
        self.source = source
        self.with_secrets = with_secrets
        self.environ = environ
        self.base_dir = source.parent if source is not None else Path.cwd()
        credentials = environ.get("CREDENTIALS_DIRECTORY", "")
        self.credentials_dir = Path(credentials) if credentials else None
        self.problems: list[tuple[str, str]] = []
        #: Every account file seen: (key path, resolved path, set explicitly?).
        self.files: list[tuple[str, Path, bool]] = []
        #: The inherited [kakao] app and [alerts] of accounts without their own overrides.
        self.inherited: dict[str, Any] = {}

    def problem(self, key: str, text: str) -> None:
        self.problems.append((key, text))

    # -- shape helpers ------------------------------------------------------------------------

    def table(self, raw: Mapping[str, Any], key: str, prefix: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.problem(
                _join(prefix, key),
                f"expected a table [{_join(prefix, key)}], got {_describe(value)}",
            )
            return {}
        return value

    def known_keys(self, table: Mapping[str, Any], allowed: Iterable[str], prefix: str) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key in allowed:
                continue
            if not prefix and key in _FUTURE_SECTIONS:
                self.problem(
                    key,
                    f"[{key}] is not supported by this version of kakao-tokend; remove the section",
                )
                continue
            hint = _suggest(key, allowed) or f"; allowed here: {', '.join(allowed)}"
            self.problem(_join(prefix, key), f"unknown key{hint}")

    def string(self, value: Any, key: str, *, what: str = "a string") -> str | None:
        if not isinstance(value, str) or not value.strip():
            self.problem(key, f"expected {what}, got {_describe(value)}")
            return None
        return value

    def boolean(self, value: Any, key: str) -> bool | None:
        if not isinstance(value, bool):
            self.problem(key, f"expected true or false, got {_describe(value)}")
            return None
        return value

    def duration(self, value: Any, key: str) -> float | None:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return None

    def share(self, value: Any, key: str) -> float | None:
        try:
            return parse_share(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return None

    def path(self, value: Any, key: str) -> Path | None:
        text = self.string(value, key, what="a path")
        if text is None:
            return None
        candidate = Path(text)
        if text.startswith("~"):
            try:
                candidate = candidate.expanduser()
            except RuntimeError:
                self.problem(
                    key, f'cannot expand "~" in {text} (no home directory); use an absolute path'
                )
                return None
        if not candidate.is_absolute():
            candidate = self.base_dir / candidate
        return Path(os.path.normpath(candidate))

    # -- the whole file -----------------------------------------------------------------------

    def config(self, raw: Mapping[str, Any]) -> Config | None:
        api = self.api_settings(raw)
        store = self.store_settings(raw)
        self.known_keys(raw, (*_TOP_KEYS, "alerts"), "")
        log_level = self.log_level(raw.get("log_level", "info"))
        paths_table = self.table(raw, "paths", "")
        self.known_keys(paths_table, _PATHS_KEYS, "paths")
        kakao = self.table(raw, "kakao", "")
        self.known_keys(kakao, _KAKAO_KEYS, "kakao")
        publish = self.table(raw, "publish", "")
        self.known_keys(publish, _PUBLISH_KEYS, "publish")
        refresh = self.refresh_policy(self.table(raw, "refresh", ""))
        alerts_table = self.table(raw, "alerts", "")
        self.known_keys(alerts_table, _ALERTS_KEYS, "alerts")
        alerts = self.alerts(_overlay(alerts_table, "alerts", {}, ""))

        state_dir = self.directory(paths_table, "state_dir", paths.default_state_dir)
        runtime_dir = self.directory(paths_table, "runtime_dir", paths.default_runtime_dir)

        account_tables = self.account_tables(raw)
        accounts: dict[str, AccountConfig] = {}
        for name, (prefix, table) in account_tables.items():
            account = self.account(name, prefix, table, kakao, publish, state_dir, alerts_table)
            if account is not None:
                accounts[name] = account
        if not account_tables:
            # No usable account to check them through: still report bad global values.
            self.kakao_app(
                _overlay(kakao, "kakao", {}, ""), missing_prefix="kakao", require_key=False
            )
            self.publish_settings(_overlay(publish, "publish", {}, ""))
        self.check_distinct_files()

        default_account = self.default_account(raw, list(account_tables))
        if (
            self.problems
            or state_dir is None
            or runtime_dir is None
            or default_account is None
            or not accounts
            or alerts is None
        ):
            return None
        return Config(
            source=self.source,
            state_dir=state_dir,
            runtime_dir=runtime_dir,
            log_level=log_level,
            refresh=refresh,
            accounts=MappingProxyType(accounts),
            default_account=default_account,
            api=api,
            alerts=alerts,
            store=store,
        )

    def store_settings(self, raw: Mapping[str, Any]) -> StoreSettings:
        """[store]: the backend, its DSN and key file (secrets) and this node's name."""
        table = self.table(raw, "store", "")
        self.known_keys(table, _STORE_KEYS, "store")
        values: dict[str, Any] = {}
        backend = table.get("backend", "file")
        if backend not in STORE_BACKENDS:
            hint = _suggest(backend, STORE_BACKENDS) if isinstance(backend, str) else ""
            self.problem(
                "store.backend",
                f'expected "file" or "postgres", got {_describe(backend)}{hint}',
            )
            backend = "file"
        values["backend"] = backend
        if "node_name" in table:
            node = table["node_name"]
            if isinstance(node, str) and NODE_NAME_RE.match(node):
                values["node_name"] = node
            else:
                self.problem(
                    "store.node_name",
                    "expected a name of letters, digits, '.', '_' and '-' (at most 63), "
                    f"got {_describe(node)}",
                )
        elif backend == "postgres" and not NODE_NAME_RE.match(default_node_name()):
            self.problem(
                "store.node_name",
                f"the host name {default_node_name()!r} is not usable as a node name; set "
                "node_name (letters, digits, '.', '_' and '-')",
            )
        for spec in SECRETS["store"]:
            name = spec.name
            settings = {k: (v, f"store.{k}") for k, v in table.items() if k in spec.sources()}
            if not settings and backend != "postgres":
                continue  # file mode ignores a store credential systemd happens to provide
            value, source = self.secret(settings, name, missing_prefix="store", required=False)
            if value is None:
                if not settings and self.with_secrets:
                    self.problem(f"store.{name}_file", _STORE_MISSING[name])
                continue
            if name == "dsn":
                values["dsn"], values["dsn_source"] = value, source
                continue
            from .fleet.crypto import KeyFileError, Keyring

            key_path = _source_key(settings, name, "store")
            try:
                values["keyring"] = Keyring.parse(value, source=_source_words(source))
            except KeyFileError as exc:
                self.problem(key_path, str(exc))
                continue
            values["key_source"] = source
        return StoreSettings(**values)

    def log_level(self, value: Any) -> str:
        if isinstance(value, str) and value.lower() in LOG_LEVELS:
            return value.lower()
        hint = _suggest(value.lower(), LOG_LEVELS) if isinstance(value, str) else ""
        self.problem(
            "log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {_describe(value)}{hint}"
        )
        return "info"

    def directory(self, table: Mapping[str, Any], key: str, default: Any) -> Path | None:
        if key in table:
            return self.path(table[key], f"paths.{key}")
        try:
            # The config file in use decides between the system and the user directories.
            found: Path = default(self.environ, config_source=self.source)
        except ConfigError as exc:
            self.problems.extend(exc.details or [(f"paths.{key}", exc.message)])
            return None
        return found

    def refresh_policy(self, table: Mapping[str, Any]) -> RefreshPolicy:
        self.known_keys(table, _REFRESH_KEYS, "refresh")
        base = RefreshPolicy()
        values: dict[str, Any] = {}
        for key in ("refresh_at", "jitter"):
            if key in table:
                values[key] = self.share(table[key], f"refresh.{key}")
        for key in ("heartbeat", "retry_initial", "retry_max", "rotation_window"):
            if key in table:
                values[key] = self.duration(table[key], f"refresh.{key}")
        if "verify_on_start" in table:
            values["verify_on_start"] = self.boolean(
                table["verify_on_start"], "refresh.verify_on_start"
            )
        bad = {key for key, value in values.items() if value is None}
        merged = {k: v for k, v in values.items() if v is not None}
        policy = RefreshPolicy(**{**base.__dict__, **merged})

        # Cross-field rules, only between values that parsed.
        if "refresh_at" not in bad and not 0.05 <= policy.refresh_at <= 0.95:
            self.problem(
                "refresh.refresh_at",
                "must be between 5% and 95% of the access "
                f"token lifetime, got {policy.refresh_at:.0%}",
            )
        if not bad & {"jitter", "refresh_at"} and policy.jitter >= policy.refresh_at:
            self.problem(
                "refresh.jitter",
                f"must be smaller than refresh.refresh_at "
                f"({policy.refresh_at:.0%}), got {policy.jitter:.0%}",
            )
        if (
            not bad & {"jitter", "refresh_at"}
            and policy.refresh_at <= 0.95
            and policy.refresh_at + policy.jitter >= 1
        ):
            self.problem(
                "refresh.jitter",
                "refresh.refresh_at + refresh.jitter must stay "
                "below 100% so the refresh always happens before expiry",
            )
        if "heartbeat" not in bad and not 0.1 <= policy.heartbeat <= 60:
            self.problem(
                "refresh.heartbeat",
                "must be between 0.1s and 60s (it bounds how "
                f"late a refresh can be after suspend), got {policy.heartbeat:g}s",
            )
        if "retry_initial" not in bad and policy.retry_initial <= 0:
            self.problem("refresh.retry_initial", 'must be more than 0s, e.g. "10s"')
        if not bad & {"retry_initial", "retry_max"} and policy.retry_max < policy.retry_initial:
            self.problem(
                "refresh.retry_max",
                f"must be at least refresh.retry_initial "
                f"({policy.retry_initial:g}s), got {policy.retry_max:g}s",
            )
        if "rotation_window" not in bad and policy.rotation_window <= 0:
            self.problem("refresh.rotation_window", 'must be more than 0s, e.g. "30d"')
        return policy

    # -- accounts -----------------------------------------------------------------------------

    def account_tables(self, raw: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Return {name: (key prefix for messages, table)}; one "default" without [accounts]."""
        if "accounts" not in raw:
            return {DEFAULT_ACCOUNT: ("", {})}
        accounts = self.table(raw, "accounts", "")
        if not accounts:
            if isinstance(raw["accounts"], dict):
                self.problem(
                    "accounts",
                    "no accounts defined; add an [accounts.NAME] table or "
                    'remove [accounts] to use the single account "default"',
                )
            return {}
        result: dict[str, tuple[str, dict[str, Any]]] = {}
        for name, table in accounts.items():
            prefix = f"accounts.{name}"
            if not ACCOUNT_NAME_RE.match(name):
                self.problem(
                    prefix,
                    "account names must be 1-32 lowercase letters, digits, "
                    f'"_" or "-", starting with a letter or digit; got "{name}"',
                )
                continue
            if not isinstance(table, dict):
                self.problem(prefix, f"expected a table [{prefix}], got {_describe(table)}")
                continue
            self.known_keys(table, (*_ACCOUNT_KEYS, "alerts"), prefix)
            result[name] = (prefix, table)
        return result

    def account(
        self,
        name: str,
        prefix: str,
        table: Mapping[str, Any],
        kakao: Mapping[str, Any],
        publish: Mapping[str, Any],
        state_dir: Path | None,
        alerts: Mapping[str, Any] | None = None,
    ) -> AccountConfig | None:
        own_kakao = self.table(table, "kakao", prefix) if prefix else {}
        own_publish = self.table(table, "publish", prefix) if prefix else {}
        own_alerts = self.table(table, "alerts", prefix) if prefix else {}
        if prefix:
            self.known_keys(own_kakao, _KAKAO_KEYS, f"{prefix}.kakao")
            self.known_keys(own_publish, _PUBLISH_KEYS, f"{prefix}.publish")
            self.known_keys(own_alerts, _ALERTS_KEYS, f"{prefix}.alerts")
        # A mistake in the global [alerts] shows up per account too; _build drops duplicates.
        # Accounts without overrides share one parsed [alerts] and [kakao] (its secret files
        # read once): a thousand accounts, one object. Only a clean result is shared, so a
        # mistake is still reported for every account, as before.
        account_alerts = self.inherited.get("alerts") if not own_alerts else None
        if account_alerts is None:
            account_alerts = self.alerts(
                _overlay(alerts or {}, "alerts", own_alerts, f"{prefix}.alerts")
            )
            if not own_alerts:
                self.inherited["alerts"] = account_alerts
        app = self.inherited.get("kakao") if not own_kakao else None
        if app is None:
            app = self.kakao_app(
                _overlay(kakao, "kakao", own_kakao, f"{prefix}.kakao"),
                missing_prefix=f"{prefix}.kakao" if prefix else "kakao",
            )
            if not own_kakao:
                self.inherited["kakao"] = app
        mode, group, include = self.publish_settings(
            _overlay(publish, "publish", own_publish, f"{prefix}.publish")
        )
        files: dict[str, Path | None] = {}
        for kind, suffix in _FILE_KINDS:
            if kind in table:
                files[kind] = self.path(table[kind], f"{prefix}.{kind}")
            else:
                files[kind] = state_dir / f"{name}{suffix}" if state_dir is not None else None
            file = files[kind]
            if file is not None:
                self.files.append((f"{prefix or 'accounts.' + name}.{kind}", file, kind in table))
        if app is None or mode is None or include is None or account_alerts is None:
            return None
        extras = self.account_extras(prefix or f"accounts.{name}", table)
        if extras is not None and "templates" in table:
            templates = self.templates(
                table["templates"], f"{prefix}.templates", mode=mode, group=group, include=include
            )
            extras = None if templates is None else {**extras, "templates": templates}
        if extras is None:
            return None
        state_file, lock_file, token_file = (files[kind] for kind, _ in _FILE_KINDS)
        if state_file is None or lock_file is None or token_file is None:
            return None
        return AccountConfig(
            name=name,
            app=app,
            state_file=state_file,
            lock_file=lock_file,
            token_file=token_file,
            token_file_mode=mode,
            token_file_group=group,
            include_refresh_token=include,
            **extras,
            alerts=account_alerts,
        )

    def account_extras(self, prefix: str, table: Mapping[str, Any]) -> dict[str, Any] | None:
        """Hooks and extra sinks of one account (keys of [accounts.NAME])."""
        values: dict[str, Any] = {}
        if "hooks" in table:
            values["hooks"] = self.hooks(table["hooks"], f"{prefix}.hooks")
        if "hook_timeout" in table:
            values["hook_timeout"] = self.duration(table["hook_timeout"], f"{prefix}.hook_timeout")
        for kind in ("access_token_file", "env_file"):
            if kind in table:
                values[kind] = self.path(table[kind], f"{prefix}.{kind}")
                if values[kind] is not None:
                    self.files.append((f"{prefix}.{kind}", values[kind], True))
        if any(value is None for value in values.values()):
            return None
        return values

    def hooks(self, value: Any, key: str) -> tuple[tuple[str, ...], ...] | None:
        example = 'e.g. hooks = [["/usr/local/bin/reload-bot", "--quiet"]]'
        if not isinstance(value, list):
            self.problem(key, f"expected a list of commands, {example}; got {_describe(value)}")
            return None
        result: list[tuple[str, ...]] = []
        for index, command in enumerate(value):
            if (
                not isinstance(command, list)
                or not command
                or not all(isinstance(arg, str) and arg for arg in command)
            ):
                self.problem(
                    f"{key}[{index}]",
                    f"expected a command as a non-empty list of strings (no shell), {example}",
                )
                return None
            if not Path(command[0]).is_absolute():
                self.problem(
                    f"{key}[{index}]",
                    "the program must be an absolute path (hooks run without a shell or PATH"
                    f" lookup), got {_describe(command[0])}",
                )
                return None
            result.append(tuple(command))
        return tuple(result)

    def templates(
        self, value: Any, key: str, *, mode: int, group: str | None, include: bool
    ) -> tuple[TemplateConfig, ...] | None:
        """[[accounts.NAME.templates]]: read and check every source, so a bad one fails here."""
        from .templates import TemplateProblem, compile_template, read_template_source

        example = 'e.g. [[accounts.me.templates]] source = "bot.conf.tmpl", destination = "..."'
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.problem(key, f"expected a list of tables, {example}; got {_describe(value)}")
            return None
        result: list[TemplateConfig] = []
        bad = False
        for index, table in enumerate(value):
            where = f"{key}[{index}]"
            self.known_keys(table, _TEMPLATE_KEYS, where)
            for required in ("source", "destination"):
                if required not in table:
                    self.problem(f"{where}.{required}", f"missing; {example}")
            source = self.path(table["source"], f"{where}.source") if "source" in table else None
            destination = (
                self.path(table["destination"], f"{where}.destination")
                if "destination" in table
                else None
            )
            if destination is not None:
                self.files.append((f"{where}.destination", destination, True))
            values: dict[str, Any] = {"mode": mode, "group": group}
            if "mode" in table:
                values["mode"] = self.mode(table["mode"], f"{where}.mode")
            if "group" in table:
                values["group"] = self.group(table["group"], f"{where}.group")
            if "command" in table:
                values["command"] = self.command(table["command"], f"{where}.command")
            if "command_timeout" in table:
                timeout = self.duration(table["command_timeout"], f"{where}.command_timeout")
                if timeout is not None and timeout <= 0:
                    self.problem(f"{where}.command_timeout", 'must be more than 0s, e.g. "30s"')
                    timeout = None
                values["command_timeout"] = timeout
            text: str | None = None
            if source is not None:
                try:
                    text = read_template_source(source)
                    compile_template(text, refresh_token_allowed=include)
                except TemplateProblem as exc:
                    self.problem(f"{where}.source", f"{source}: {exc}" if text else str(exc))
                    text = None
            if (
                source is None
                or destination is None
                or text is None
                or any(v is None for k, v in values.items() if k != "group")
                or ("group" in table and values["group"] is None)
            ):
                bad = True
                continue
            result.append(
                TemplateConfig(source=source, destination=destination, text=text, **values)
            )
        return None if bad else tuple(result)

    # -- [api] --------------------------------------------------------------------------------

    def api_settings(self, raw: Mapping[str, Any]) -> ApiSettings:
        table = self.table(raw, "api", "")
        self.known_keys(table, _API_KEYS, "api")
        base = ApiSettings()
        values: dict[str, Any] = {}
        if "socket" in table:
            values["socket"] = self.path(table["socket"], "api.socket")
        if "socket_mode" in table:
            values["socket_mode"] = self.socket_mode(table["socket_mode"])
        if "socket_group" in table:
            values["socket_group"] = self.group(table["socket_group"], "api.socket_group")
        if "allow_non_loopback" in table:
            values["allow_non_loopback"] = self.boolean(
                table["allow_non_loopback"], "api.allow_non_loopback"
            )
        for key in ("max_body", "proxy_retry_body"):
            if key in table:
                values[key] = self.size(table[key], f"api.{key}")
        if "request_timeout" in table:
            values["request_timeout"] = self.duration(
                table["request_timeout"], "api.request_timeout"
            )
        bearer_sources = {key: (value, f"api.{key}") for key, value in table.items()}
        bearer_given = any(key in table for key in _SECRET_SPECS["bearer_token"].sources())
        bearer, bearer_source = self.secret(
            bearer_sources, "bearer_token", missing_prefix="api", required=False
        )
        if "tcp" in table:
            values["tcp"] = self.tcp_address(
                table["tcp"], allow_non_loopback=values.get("allow_non_loopback") is True
            )
            if values["tcp"] is not None and bearer_source is None and not bearer_given:
                self.problem(
                    "api.bearer_token_file",
                    "required when api.tcp is set: a file (mode 600) holding a long random"
                    " token, e.g. `openssl rand -hex 32 > FILE; chmod 600 FILE`",
                )
                values["tcp"] = None
        if bearer is not None:
            values["bearer_token"] = self.bearer_token(bearer, bearer_sources)
        if any(value is None for value in values.values()):
            return base
        settings = replace(base, **values)
        if settings.proxy_retry_body > settings.max_body:
            self.problem("api.proxy_retry_body", "must not be larger than api.max_body")
        return settings

    def bearer_token(self, token: str, settings: Mapping[str, _Setting]) -> str | None:
        if len(token) < 16:
            key = _source_key(settings, "bearer_token", "api")
            self.problem(
                key, "the bearer token is shorter than 16 characters; use `openssl rand -hex 32`"
            )
            return None
        return token

    def socket_mode(self, value: Any) -> int | None:
        key = "api.socket_mode"
        if not isinstance(value, str) or not re.fullmatch(r"(0o)?[0-7]{3,4}", value.strip()):
            self.problem(
                key, f'expected an octal mode as a string like "0660", got {_describe(value)}'
            )
            return None
        mode = int(value.strip().removeprefix("0o"), 8)
        if mode & 0o7007 or mode & 0o600 != 0o600:
            self.problem(
                key,
                'whoever can connect can get tokens: use "0600" (owner only) or "0660" with'
                f' api.socket_group, never access for others; got "{value}"',
            )
            return None
        return mode

    def size(self, value: Any, key: str) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = (
            re.fullmatch(r"(\d+)\s*([kKmM]?)(i?[bB])?", value.strip())
            if isinstance(value, str)
            else None
        )
        if match is None or int(match.group(1)) <= 0:
            self.problem(
                key, f'expected a size in bytes like 65536, "64k" or "16M", got {_describe(value)}'
            )
            return None
        return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]

    def tcp_address(self, value: Any, *, allow_non_loopback: bool) -> tuple[str, int] | None:
        text = value.strip() if isinstance(value, str) else ""
        host, _, port_text = text.rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            self.problem(
                "api.tcp", f'expected "HOST:PORT" like "127.0.0.1:8766", got {_describe(value)}'
            )
            return None
        if not _is_loopback(host) and not allow_non_loopback:
            self.problem(
                "api.tcp",
                f"{host} is not a loopback address, so other machines could ask for tokens;"
                " use 127.0.0.1, or set api.allow_non_loopback = true if you really mean it",
            )
            return None
        return host, int(port_text)

    def publish_settings(
        self, settings: Mapping[str, _Setting]
    ) -> tuple[int | None, str | None, bool | None]:
        mode = self.mode(*settings["mode"]) if "mode" in settings else 0o640
        group = self.group(*settings["group"]) if "group" in settings else None
        include = (
            self.boolean(*settings["include_refresh_token"])
            if "include_refresh_token" in settings
            else False
        )
        return mode, group, include

    def check_distinct_files(self) -> None:
        """Two accounts (or two roles) sharing a file would overwrite each other's tokens."""
        seen: dict[Path, str] = {}
        for key, file, explicit in self.files:
            if file in seen:
                self.problem(
                    key,
                    f"{file} is also used as {seen[file]}; every account needs its own "
                    "state, token and lock files",
                )
            else:
                seen[file] = key if explicit else f"{key} (default)"

    def default_account(self, raw: Mapping[str, Any], names: list[str]) -> str | None:
        if "default_account" not in raw:
            return names[0] if names else None
        value = self.string(raw["default_account"], "default_account", what="an account name")
        if value is None:
            return None
        if value not in names:
            known = ", ".join(names) if names else "none"
            self.problem(
                "default_account",
                f'no account named "{value}" (accounts: {known}){_suggest(value, names)}',
            )
            return None
        return value

    # -- [kakao] ------------------------------------------------------------------------------

    def kakao_app(
        self, settings: Mapping[str, _Setting], *, missing_prefix: str, require_key: bool = True
    ) -> KakaoApp | None:
        key, key_source = self.secret(
            settings, "rest_api_key", missing_prefix=missing_prefix, required=require_key
        )
        secret, secret_source = self.secret(
            settings, "client_secret", missing_prefix=missing_prefix, required=False
        )
        base = KakaoApp(rest_api_key="", client_secret=None)
        auth_url = self.url(*settings["auth_url"]) if "auth_url" in settings else base.auth_url
        api_url = self.url(*settings["api_url"]) if "api_url" in settings else base.api_url
        redirect_uri = (
            self.url(*settings["redirect_uri"], redirect=True)
            if "redirect_uri" in settings
            else base.redirect_uri
        )
        scopes = self.scopes(*settings["scopes"]) if "scopes" in settings else ()
        timeout = self.duration(*settings["timeout"]) if "timeout" in settings else base.timeout
        connect_timeout = (
            self.duration(*settings["connect_timeout"])
            if "connect_timeout" in settings
            else base.connect_timeout
        )
        for value, name in ((timeout, "timeout"), (connect_timeout, "connect_timeout")):
            if value is not None and value <= 0:
                self.problem(settings[name][1], 'must be more than 0s, e.g. "10s"')
        if (
            key is None
            or key_source is None
            or auth_url is None
            or api_url is None
            or redirect_uri is None
            or scopes is None
            or timeout is None
            or connect_timeout is None
            or timeout <= 0
            or connect_timeout <= 0
        ):
            return None
        return KakaoApp(
            rest_api_key=key,
            client_secret=secret,
            auth_url=auth_url,
            api_url=api_url,
            redirect_uri=redirect_uri,
            scopes=scopes,
            timeout=timeout,
            connect_timeout=connect_timeout,
            rest_api_key_source=key_source,
            client_secret_source=secret_source,
        )

    def secret(
        self, settings: Mapping[str, _Setting], name: str, *, missing_prefix: str, required: bool
    ) -> tuple[str | None, str | None]:
        """Resolve one secret (see SECRETS) from exactly one of its sources; return
        (value, where it came from) or (None, None) when it is not set or unusable."""
        spec = _SECRET_SPECS[name]
        sources = set(spec.sources())
        given = [(key, setting) for key, setting in settings.items() if key in sources]
        if len(given) > 1:
            keys = " and ".join(key for key, _ in given)
            self.problem(given[1][1][1], f"{keys} are both set; give only one source for {name}")
            return None, None
        if not self.with_secrets:
            # Paths-only load: never open a secret (it may be unreadable to this user).
            return ("" if required else None), "not loaded"
        if not given:
            default = self.credentials_dir / name if self.credentials_dir else None
            if default is not None and default.is_file():
                # systemd LoadCredential=NAME:... with the conventional name needs no setting.
                value = self.read_secret(default, f"{missing_prefix}.{name}", name, trusted=True)
                return value, f"credential {name}" if value is not None else None
            if required:
                self.problem(
                    f"{missing_prefix}.{name}",
                    f"missing; set {name}_file (a file holding only the key, mode 600), "
                    f"{name}_env (an environment variable), or {name}_credential (systemd "
                    "LoadCredential=); find it in Kakao Developers > App > App Keys",
                )
            return None, None
        key, (value, key_path) = given[0]
        if key == name:
            if not isinstance(value, str):
                # Never echo it: a mistyped secret is still a secret.
                self.problem(key_path, f"expected the {name} as a string (value not shown)")
                return None, None
            text = value
            if spec.private and self.source is not None:
                mode = _file_mode(self.source)
                if mode is not None and mode & 0o077:
                    self.problem(
                        key_path,
                        f"is written inline in {self.source}, which is readable by "
                        f"group/others (mode {mode:04o}); move it to {name}_file or "
                        f"run: chmod 600 {self.source}",
                    )
                    return None, None
            return self.clean_secret(text, key_path, name, where="the value"), "inline"
        if key.endswith("_file"):
            file = self.path(value, key_path)
            if file is None:
                return None, None
            trusted = self.credentials_dir is not None and file.is_relative_to(self.credentials_dir)
            return self.read_secret(file, key_path, name, trusted=trusted), f"file {file}"
        if key.endswith("_env"):
            variable = self.string(value, key_path, what="an environment variable name")
            if variable is None:
                return None, None
            if variable not in self.environ:
                self.problem(
                    key_path,
                    f"environment variable {variable} is not set; export "
                    f"it, or use {name}_file instead",
                )
                return None, None
            where = f"environment variable {variable}"
            return self.clean_secret(self.environ[variable], key_path, name, where=where), (
                f"env {variable}"
            )
        # _credential
        credential = self.string(value, key_path, what="a credential name")
        if credential is None:
            return None, None
        if "/" in credential or credential in (".", ".."):
            self.problem(
                key_path,
                f'expected a plain credential name like "{name}", got {_describe(credential)}',
            )
            return None, None
        if self.credentials_dir is None:
            self.problem(
                key_path,
                "$CREDENTIALS_DIRECTORY is not set: credentials exist only "
                f"inside a systemd unit with LoadCredential={credential}:/path; outside "
                f"systemd use {name}_file",
            )
            return None, None
        file = self.credentials_dir / credential
        value_read = self.read_secret(file, key_path, name, trusted=True, credential=credential)
        return value_read, f"credential {credential}"

    def read_secret(
        self, file: Path, key: str, name: str, *, trusted: bool, credential: str | None = None
    ) -> str | None:
        try:
            info = file.stat()
        except FileNotFoundError:
            if credential is not None:
                self.problem(
                    key,
                    f"credential {credential} not found in $CREDENTIALS_DIRECTORY "
                    f"({file}); add LoadCredential={credential}:/path/to/file to the "
                    "unit",
                )
            else:
                self.problem(
                    key,
                    f"{file} does not exist; put the {name} in it (one line) "
                    f"and run: chmod 600 {file}",
                )
            return None
        except OSError as exc:
            self.problem(key, f"cannot read {file}: {exc.strerror or exc}")
            return None
        if not stat.S_ISREG(info.st_mode):
            self.problem(key, f"{file} is not a regular file")
            return None
        mode = stat.S_IMODE(info.st_mode)
        # Files systemd put in $CREDENTIALS_DIRECTORY are trusted as they are.
        if not trusted and mode & 0o077:
            what = "readable" if mode & 0o044 else "accessible"
            self.problem(
                key, f"{file} is {what} by group/others (mode {mode:04o}); run: chmod 600 {file}"
            )
            return None
        try:
            data = file.read_bytes()
        except OSError as exc:
            self.problem(key, f"cannot read {file}: {exc.strerror or exc}")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.problem(key, f"{file} is not UTF-8 text; it must hold only the {name}")
            return None
        return self.clean_secret(text.rstrip("\r\n"), key, name, where=str(file))

    def clean_secret(self, value: str, key: str, name: str, *, where: str) -> str | None:
        """Refuse empty or multi-word secrets without ever echoing the value."""
        if not value:
            self.problem(key, f"{where} is empty; it must hold the {name}")
            return None
        if any(ch.isspace() for ch in value) and not _SECRET_SPECS[name].multiword:
            self.problem(
                key,
                f"{where} contains spaces or several lines; it must hold only "
                f"the {name} (value not shown)",
            )
            return None
        return value

    def url(self, value: Any, key: str, *, redirect: bool = False) -> str | None:
        example = "http://127.0.0.1:8765/callback" if redirect else "https://kauth.kakao.com"
        text = self.string(value, key, what=f"a URL like {example}")
        if text is None:
            return None
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            self.problem(key, f"expected a URL like {example}, got {_describe(text)}")
            return None
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            self.problem(
                key, f"expected an http(s) URL with a host, like {example}, got {_describe(text)}"
            )
            return None
        if parts.username is not None or parts.password is not None:
            self.problem(
                key,
                "must not contain user:password@; credentials go in rest_api_key / client_secret",
            )
            return None
        if parts.fragment or (parts.query and not redirect):
            self.problem(
                key, f"must not have a query (?...) or fragment (#...), got {_describe(text)}"
            )
            return None
        if redirect:
            return text
        if parts.scheme == "http" and not _is_loopback(host):
            self.problem(
                key,
                f"plain http is only allowed for loopback hosts such as the "
                f"emulator (127.0.0.1, ::1, localhost); real Kakao needs "
                f"https://{parts.netloc}{parts.path}",
            )
            return None
        return text.rstrip("/")

    def scopes(self, value: Any, key: str) -> tuple[str, ...] | None:
        if not isinstance(value, list):
            self.problem(
                key, f'expected a list of strings like ["talk_message"], got {_describe(value)}'
            )
            return None
        result: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item or any(c.isspace() or c == "," for c in item):
                self.problem(
                    f"{key}[{index}]",
                    "expected one scope name without spaces or "
                    f'commas, like "talk_message", got {_describe(item)}',
                )
                return None
            result.append(item)
        return tuple(dict.fromkeys(result))

    # -- [alerts] -----------------------------------------------------------------------------

    def alerts(self, settings: Mapping[str, _Setting]) -> AlertsConfig | None:
        base = AlertsConfig()
        values: dict[str, Any] = {}
        bad = False
        # One secret source for every account ("alerts"), so a problem is reported once.
        webhook, _ = self.secret(settings, "webhook_url", missing_prefix="alerts", required=False)
        if webhook is not None:
            webhook = self.webhook_url(webhook, _source_key(settings, "webhook_url", "alerts"))
            bad = webhook is None
            values["webhook_url"] = webhook
        for name, (value, key) in settings.items():
            parsed: Any = None
            if name in _SECRET_SPECS["webhook_url"].sources():
                continue
            if name == "thresholds":
                parsed = self.thresholds(value, key)
            elif name in ("critical_below", "repeat", "webhook_timeout", "command_timeout"):
                parsed = self.duration(value, key)
                if parsed is not None and parsed <= 0:
                    self.problem(key, 'must be more than 0s, e.g. "1d" or "10s"')
                    parsed = None
            elif name == "failing_after":
                parsed = self.share(value, key)
            elif name == "kakaotalk":
                if value == "auto":
                    values[name] = None
                    continue
                if not isinstance(value, bool):
                    self.problem(key, f'expected true, false or "auto", got {_describe(value)}')
                else:
                    parsed = value
            elif name.endswith("_min_severity"):
                if isinstance(value, str) and value.lower() in SEVERITIES:
                    parsed = value.lower()
                else:
                    self.problem(
                        key, f"expected one of {', '.join(SEVERITIES)}, got {_describe(value)}"
                    )
            elif name == "webhook_retries":
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 20:
                    parsed = value
                else:
                    self.problem(key, f"expected a number of retries 0..20, got {_describe(value)}")
            elif name == "command":
                parsed = self.command(value, key)
            elif name == "language":
                if isinstance(value, str) and value.lower() in LANGUAGES:
                    parsed = value.lower()
                else:
                    self.problem(key, f'expected "ko" or "en", got {_describe(value)}')
            elif name == "kakaotalk_link":
                parsed = self.link(value, key)
            else:
                continue  # unknown keys were reported by known_keys
            if parsed is None:
                bad = True
            else:
                values[name] = parsed
        if bad:
            return None
        return AlertsConfig(**{**base.__dict__, **values})

    def thresholds(self, value: Any, key: str) -> tuple[float, ...] | None:
        if not isinstance(value, list):
            self.problem(
                key, f'expected a list like ["14d", "7d", "3d", "1d"], got {_describe(value)}'
            )
            return None
        result: list[float] = []
        for index, item in enumerate(value):
            seconds = self.duration(item, f"{key}[{index}]")
            if seconds is None:
                return None
            if seconds <= 0:
                self.problem(
                    f"{key}[{index}]", "must be more than 0s (expiry itself always alerts)"
                )
                return None
            result.append(seconds)
        return tuple(sorted(set(result), reverse=True))

    def webhook_url(self, value: Any, key: str) -> str | None:
        example = "https://hooks.example.com/T000/B000/XXXX"
        if not isinstance(value, str) or not value.strip():
            self.problem(key, f"expected a URL like {example}, got {_describe(value)}")
            return None
        try:
            parts = urlsplit(value.strip())
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            # The URL may carry a secret path: name the problem, not the value.
            self.problem(key, f"expected an http(s) URL with a host, like {example}")
            return None
        return value.strip()

    def link(self, value: Any, key: str) -> str | None:
        try:
            parts = urlsplit(value.strip()) if isinstance(value, str) else None
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(
                key,
                "expected an http(s) URL whose domain is registered for the Kakao app, like"
                f' "https://status.example.com", got {_describe(value)}',
            )
            return None
        return str(value).strip()

    def command(self, value: Any, key: str) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            self.problem(
                key,
                'expected a list of strings like ["/usr/local/bin/notify", "--urgent"]'
                f" (run without a shell), got {_describe(value)}",
            )
            return None
        if value and not os.path.isabs(value[0]):
            self.problem(f"{key}[0]", f'must be an absolute path like "/usr/local/bin/{value[0]}"')
            return None
        return tuple(value)

    # -- [publish] ----------------------------------------------------------------------------

    def mode(self, value: Any, key: str) -> int | None:
        if not isinstance(value, str) or not re.fullmatch(r"(0o)?[0-7]{3,4}", value.strip()):
            self.problem(
                key, f'expected an octal file mode as a string like "0640", got {_describe(value)}'
            )
            return None
        mode = int(value.strip().removeprefix("0o"), 8)
        if mode > 0o777:
            self.problem(
                key,
                f"setuid/setgid/sticky bits make no sense for the token file; "
                f'use e.g. "0640", got "{value}"',
            )
            return None
        if mode & 0o600 != 0o600:
            self.problem(
                key, f'the owner (the daemon) needs read and write, e.g. "0640", got "{value}"'
            )
            return None
        if mode & 0o007:
            self.problem(
                key,
                f"gives access to all users (others) on the machine; the token "
                f'file holds a live access token: use "0600" or "0640" with '
                f'publish.group, got "{value}"',
            )
            return None
        if mode & 0o020:
            self.problem(key, f'must not be group-writable; use "0640", got "{value}"')
            return None
        return mode

    def group(self, value: Any, key: str) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str) and value.strip():
            text = value.strip()
        else:
            self.problem(key, f"expected a group name or numeric gid, got {_describe(value)}")
            return None
        try:
            if text.isdigit():
                grp.getgrgid(int(text))
            else:
                grp.getgrnam(text)
        except KeyError:
            self.problem(
                key,
                f'group "{text}" does not exist on this machine; check with: getent group {text}',
            )
            return None
        return text


_STORE_MISSING: Final = {
    "dsn": 'backend "postgres" needs the database: set dsn_file (a file, mode 600, holding e.g. '
    '"host=db.example dbname=tokend user=tokend password=..."), dsn_env or dsn_credential',
    "key": 'backend "postgres" stores tokens encrypted and needs a key: run `kakao-tokend store '
    "new-key > /etc/kakao-tokend/store.key; chmod 600 /etc/kakao-tokend/store.key` and set "
    "key_file (or key_env / key_credential)",
}


def _source_words(source: str | None) -> str:
    """Name a secret's source for messages: "file /x" -> "/x", "env X" -> "$X"."""
    kind, _, where = (source or "").partition(" ")
    if kind == "file":
        return where
    if kind == "env":
        return f"${where}"
    if kind == "credential":
        return f"credential {where}"
    return "the key"


def _overlay(
    base: Mapping[str, Any], base_prefix: str, own: Mapping[str, Any], own_prefix: str
) -> dict[str, _Setting]:
    """Merge an account's override table over the global one, keeping each key's origin.

    Naming any source of a secret in the override replaces all of the global sources of that
    secret, so an account can use a _file where the global uses an _env.
    """
    merged: dict[str, _Setting] = {
        key: (value, f"{base_prefix}.{key}") for key, value in base.items()
    }
    for spec in SECRETS.get(base_prefix, ()):
        if any(key in own for key in spec.sources()):
            for key in spec.sources():
                merged.pop(key, None)
    merged.update({key: (value, f"{own_prefix}.{key}") for key, value in own.items()})
    return merged


def _source_key(settings: Mapping[str, _Setting], name: str, prefix: str) -> str:
    """The key path that gave secret ``name`` (for messages), else ``prefix.name``."""
    for key in _SECRET_SPECS[name].sources():
        if key in settings:
            return str(settings[key][1])
    return f"{prefix}.{name}"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
