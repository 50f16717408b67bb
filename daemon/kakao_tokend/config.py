"""TOML config -> frozen dataclasses; unknown keys rejected; every problem reported at once.

The dataclasses are the schema: each field's metadata says which key sets it and how that
key's value is parsed (:class:`_Key`), which secret it holds (:class:`_Secret`) or which table
is read into it (:class:`_Table`). The keys each table accepts, the secrets (:data:`SECRETS`)
and the documentation test all derive from them; one generic reader (``_Checker.read``) parses
every table. Cross-field rules are a table too (``_RULES``).
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, ParamSpec, TypeVar
from urllib.parse import urlsplit

from . import paths
from .errors import ConfigError
from .i18n import LANGUAGES
from .tokens import (
    MAX_LIFETIME,
    answer_patience,
    format_duration,
    request_timeout,
    request_timeout_share,
)

if TYPE_CHECKING:  # imported only when a store key is configured
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
    "kakaotalk_only_for_critical",
    "load_config",
    "load_locations",
    "parse_duration",
    "parse_share",
    "plain_http_exposure",
    "plain_http_warning",
    "tcp_address",
]

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
DEFAULT_ACCOUNT: Final = "default"
ACCOUNT_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: Alert severities, least urgent first (alerts.py maps them onto log levels).
SEVERITIES: Final = ("info", "warning", "critical")
STORE_BACKENDS: Final = ("file", "postgres")
#: A fleet node's name: shown in status, metrics and pg_stat_activity.
NODE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes the TOML value and returns the parsed one, or raises ValueError whose
# text is the problem (one line, with a hint); _Invalid also names the element it is in ("[2]").

_Parser = Callable[[Any], Any]
_P = ParamSpec("_P")

_DURATION_EXAMPLES: Final = 'a duration like "90s", "30m", "6h", "14d" or "1h30m"'
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|d|h|m|s)")
_UNIT_SECONDS: Final = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_UNIT_ORDER: Final = ("d", "h", "m", "s", "ms")


class _Invalid(ValueError):
    """A problem with one element of a list value; ``at`` names it, e.g. "[2]"."""

    def __init__(self, problem: str, at: str) -> None:
        super().__init__(problem)
        self.at = at


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


def _suggest(word: str, choices: Iterable[str]) -> str:
    """Return '; did you mean "x"?' for a close match, else ''."""
    import difflib  # only for a mistake: every start and command would import it for nothing

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def parse_duration(text: str | int | float) -> float:
    """Parse "90s", "30m", "6h", "14d", "1h30m", "500ms" or a plain number of seconds.

    Raises ValueError (with a message naming the accepted forms) for anything else,
    including negative, infinite and boolean values.
    """
    seconds = _duration_seconds(text)
    if seconds > MAX_LIFETIME:
        # No wait, threshold or lifetime here outlives the longest token life accepted: a
        # longer value is a typo, and would overflow date arithmetic later.
        raise ValueError(
            f"expected at most {format_duration(MAX_LIFETIME)} (the longest token life),"
            f" got {_describe(text)}"
        )
    return seconds


def _duration_seconds(text: str | int | float) -> float:
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


def _string(value: Any, what: str = "a string") -> str:
    """A non-blank string, described as ``what`` ("a path") in the problem."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected {what}, got {_describe(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _boolean_or_auto(value: Any) -> bool | None:
    """true, false, or "auto" (None: decided at run time)."""
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ValueError(f'expected true, false or "auto", got {_describe(value)}')
    return value


def _one_of(*choices: str) -> _Parser:
    """One of ``choices`` in any case (returned in lower case); misspellings get a suggestion."""
    if len(choices) == 2:
        expected = f'"{choices[0]}" or "{choices[1]}"'
    else:
        expected = f"one of {', '.join(choices)}"

    def parse(value: Any) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        hint = _suggest(value.lower(), choices) if isinstance(value, str) else ""
        raise ValueError(f"expected {expected}, got {_describe(value)}{hint}")

    return parse


def _positive(example: str) -> _Parser:
    """A duration above zero; ``example`` shows a sensible one."""

    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError(f"must be more than 0s, e.g. {example}")
        return seconds

    return parse


def _path(value: Any) -> Path:
    """A path; "~" is expanded, and the reader makes relative ones relative to the config."""
    text = _string(value, "a path")
    if "\0" in text:
        raise ValueError("contains a NUL character (\\u0000), which no path may hold")
    if not text.startswith("~"):
        return Path(text)
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise ValueError(
            f'cannot expand "~" in {text} (no home directory); use an absolute path'
        ) from None


def _octal_mode(what: str, example: str, *rules: tuple[int, int, str]) -> _Parser:
    """An octal mode string like "0640" whose bits pass every (mask, wanted, problem) rule:
    ``mode & mask == wanted``; a problem's "{}" becomes the value as written."""

    def parse(value: Any) -> int:
        if not isinstance(value, str) or not re.fullmatch(r"(0o)?[0-7]{3,4}", value.strip()):
            raise ValueError(
                f'expected an octal {what} as a string like "{example}", got {_describe(value)}'
            )
        mode = int(value.strip().removeprefix("0o"), 8)
        for mask, wanted, problem in rules:
            if mode & mask != wanted:
                raise ValueError(problem.format(value))
        return mode

    return parse


#: Files holding a live token: the owner (the daemon) reads and writes, the group may read.
_FILE_MODE: Final = _octal_mode(
    "file mode",
    "0640",
    (0o7000, 0, "setuid/setgid/sticky bits make no sense for the token file; "
     'use e.g. "0640", got "{}"'),
    (0o600, 0o600, 'the owner (the daemon) needs read and write, e.g. "0640", got "{}"'),
    (0o007, 0, "gives access to all users (others) on the machine; the token file holds a live "
     'access token: use "0600" or "0640" with publish.group, got "{}"'),
    (0o020, 0, 'must not be group-writable; use "0640", got "{}"'),
)  # fmt: skip
#: The API socket: whoever can connect can get tokens.
_SOCKET_MODE: Final = _octal_mode(
    "mode",
    "0660",
    (0o7607, 0o600, 'whoever can connect can get tokens: use "0600" (owner only) or "0660" with '
     'api.socket_group, never access for others; got "{}"'),
)  # fmt: skip


def _group(value: Any) -> str:
    """A group name or numeric gid that exists on this machine."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
    else:
        raise ValueError(f"expected a group name or numeric gid, got {_describe(value)}")
    try:
        grp.getgrgid(int(text)) if text.isdigit() else grp.getgrnam(text)
    except KeyError:
        raise ValueError(
            f'group "{text}" does not exist on this machine; check with: getent group {text}'
        ) from None
    return text


def _size(value: Any) -> int:
    """A size in bytes: 65536, "64k" or "16M"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = (
        re.fullmatch(r"(\d+)\s*([kKmM]?)(i?[bB])?", value.strip())
        if isinstance(value, str)
        else None
    )
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(
            f'expected a size in bytes like 65536, "64k" or "16M", got {_describe(value)}'
        )
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]


def _host_port(value: Any) -> tuple[str, int]:
    text = value.strip() if isinstance(value, str) else ""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'expected "HOST:PORT" like "127.0.0.1:8766", got {_describe(value)}')
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(*, redirect: bool) -> _Parser:
    """A Kakao base URL (https, or http for loopback), or the login redirect URI."""
    example = "http://127.0.0.1:8765/callback" if redirect else "https://kauth.kakao.com"

    def parse(value: Any) -> str:
        text = _string(value, f"a URL like {example}")
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"expected a URL like {example}, got {_describe(text)}") from None
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError(
                f"expected an http(s) URL with a host, like {example}, got {_describe(text)}"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not contain user:password@; credentials go in rest_api_key / client_secret"
            )
        if parts.fragment or (parts.query and not redirect):
            raise ValueError(
                f"must not have a query (?...) or fragment (#...), got {_describe(text)}"
            )
        if redirect:
            return text
        if parts.scheme == "http" and not _is_loopback(host):
            raise ValueError(
                "plain http is only allowed for loopback hosts such as the emulator (127.0.0.1, "
                f"::1, localhost); real Kakao needs https://{parts.netloc}{parts.path}"
            )
        return text.rstrip("/")

    return parse


def _scopes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(
            f'expected a list of strings like ["talk_message"], got {_describe(value)}'
        )
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item or any(c.isspace() or c == "," for c in item):
            raise _Invalid(
                "expected one scope name without spaces or commas, like "
                f'"talk_message", got {_describe(item)}',
                f"[{index}]",
            )
    return tuple(dict.fromkeys(value))


def _command(value: Any) -> tuple[str, ...]:
    """An argv list (run without a shell) whose program is an absolute path; may be empty."""
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(
            'expected a list of strings like ["/usr/local/bin/notify", "--urgent"]'
            f" (run without a shell), got {_describe(value)}"
        )
    if value and not os.path.isabs(value[0]):
        raise _Invalid(f'must be an absolute path like "/usr/local/bin/{value[0]}"', "[0]")
    return tuple(value)


def _hooks(value: Any) -> tuple[tuple[str, ...], ...]:
    example = 'e.g. hooks = [["/usr/local/bin/reload-bot", "--quiet"]]'
    if not isinstance(value, list):
        raise ValueError(f"expected a list of commands, {example}; got {_describe(value)}")
    for index, command in enumerate(value):
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(arg, str) and arg for arg in command)
        ):
            raise _Invalid(
                f"expected a command as a non-empty list of strings (no shell), {example}",
                f"[{index}]",
            )
        if not Path(command[0]).is_absolute():
            raise _Invalid(
                "the program must be an absolute path (hooks run without a shell or PATH"
                f" lookup), got {_describe(command[0])}",
                f"[{index}]",
            )
    return tuple(tuple(command) for command in value)


def _thresholds(value: Any) -> tuple[float, ...]:
    """Durations before expiry, longest first, each once."""
    if not isinstance(value, list):
        raise ValueError(f'expected a list like ["14d", "7d", "3d", "1d"], got {_describe(value)}')
    result: list[float] = []
    for index, item in enumerate(value):
        try:
            seconds = parse_duration(item)
        except ValueError as exc:
            raise _Invalid(str(exc), f"[{index}]") from None
        if seconds <= 0:
            raise _Invalid("must be more than 0s (expiry itself always alerts)", f"[{index}]")
        result.append(seconds)
    return tuple(sorted(set(result), reverse=True))


def _is_non_directory(path: Path) -> bool:
    """Whether something other than a directory (or a link to one) is at ``path``."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False  # missing (made at start), or unreadable: the start says which


def _is_http_url(text: str) -> bool:
    """Whether ``text`` is an http(s) URL with a host (and a valid port, if any)."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _link(value: Any) -> str:
    if not isinstance(value, str) or not _is_http_url(value.strip()):
        raise ValueError(
            "expected an http(s) URL whose domain is registered for the Kakao app, like"
            f' "https://status.example.com", got {_describe(value)}'
        )
    return value.strip()


def _retries(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 20:
        return value
    raise ValueError(f"expected a number of retries 0..20, got {_describe(value)}")


def _pool_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 100:
        return value
    raise ValueError(f"expected a number of connections 2..100, got {_describe(value)}")


def _account_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(
            f'expected a list of account names like ["default"], got {_describe(value)}'
        )
    for index, item in enumerate(value):
        if not isinstance(item, str) or not ACCOUNT_NAME_RE.match(item):
            raise _Invalid(f"expected an account name, got {_describe(item)}", f"[{index}]")
    return tuple(dict.fromkeys(value))


def _node_name(value: Any) -> str:
    if isinstance(value, str) and NODE_NAME_RE.match(value):
        return value
    raise ValueError(
        f"expected a name of letters, digits, '.', '_' and '-' (at most 63), got {_describe(value)}"
    )


# Checks of a secret's value once read: (value, where it came from) -> the parsed value. Their
# problems never show the value.


def _webhook_url(value: str, source: str) -> str:
    if not _is_http_url(value.strip()):
        # The URL may carry a secret path: name the problem, not the value.
        raise ValueError(
            "expected an http(s) URL with a host, like https://hooks.example.com/T000/B000/XXXX"
        )
    return value.strip()


def _bearer_token(value: str, source: str) -> str:
    if len(value) < 16:
        raise ValueError(
            "the bearer token is shorter than 16 characters; use `openssl rand -hex 32`"
        )
    return value


def _keyring(value: str, source: str) -> Keyring:
    from .fleet.crypto import Keyring  # only a configured store key needs cryptography

    return Keyring.parse(value, source=_source_words(source))  # KeyFileError is a ValueError


def _source_words(source: str) -> str:
    """Name a secret's source for messages: "file /x" -> "/x", "env X" -> "$X"."""
    kind, _, where = source.partition(" ")
    if kind == "file":
        return where
    if kind == "env":
        return f"${where}"
    if kind == "credential":
        return f"credential {where}"
    return "the key"


# ---------------------------------------------------------------------------------------------
# The schema: what each dataclass field's metadata can say


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


_META: Final = "kakao_tokend.config"


class _Key(NamedTuple):
    """The field is set by one config key, parsed by ``parse``."""

    parse: _Parser
    #: The key, when it is not the field's name.
    key: str = ""
    #: The sub-table the key is in ("paths", "publish"); None: the dataclass's own table.
    table: str | None = None
    #: A file of one account: no other account (or role) may use the same one.
    own_file: bool = False
    #: The default file is <state_dir>/<account name><default_name>.
    default_name: str = ""
    #: Unset, it takes the value of this field of the account (templates inherit [publish]).
    inherit: str = ""


class _Secret(NamedTuple):
    """The field holds a secret (see :class:`SecretSpec`), read from one of its sources."""

    spec: SecretSpec
    #: (value, source) -> parsed value; raises ValueError, never naming the value.
    check: Callable[[str, str], Any] | None = None
    #: The field recording where the value came from ("file /x", "env X", ...).
    source_field: str = ""
    #: Missing is a problem (else the field is None).
    required: bool = False
    #: (earlier field, value): unset, the secret is looked for in $CREDENTIALS_DIRECTORY only
    #: when that field has that value (a file-backend store ignores a stray "key" credential).
    only_if: tuple[str, str] | None = None


class _Table(NamedTuple):
    """The field is read from a sub-table (``many``: a list or a table of sub-tables)."""

    name: str
    cls: type[Any]
    many: bool = False


#: A field computed by the loader (a name, where a secret came from): no key of its own.
_DERIVED: Final = "derived"


def _metadata(kind: Callable[_P, object]) -> Callable[_P, dict[str, object]]:
    """Turn a record type into a maker of field metadata: ``metadata=_key(parse_share)``."""

    def make(*args: _P.args, **kwargs: _P.kwargs) -> dict[str, object]:
        return {_META: kind(*args, **kwargs)}

    return make


_key: Final = _metadata(_Key)
_secret: Final = _metadata(_Secret)
_table: Final = _metadata(_Table)


# ---------------------------------------------------------------------------------------------
# The frozen result


#: ``[kakao] timeout`` and ``connect_timeout`` when not set: sized for Kakao's hours-long tokens
#: (tokens.request_timeout fits them to a short-lived token).
KAKAO_TIMEOUT = 30.0
KAKAO_CONNECT_TIMEOUT = 10.0
#: ``[refresh] heartbeat``'s default, fitted to shorter tokens (tokens.heartbeat_interval).
REFRESH_HEARTBEAT = 60.0


@dataclass(frozen=True)
class KakaoApp:
    """One Kakao app registration: credentials and endpoints. Secrets never appear in repr."""

    rest_api_key: str = field(
        repr=False,
        metadata=_secret(
            SecretSpec("rest_api_key", private=False),
            source_field="rest_api_key_source",
            required=True,
        ),
    )
    client_secret: str | None = field(
        repr=False,
        metadata=_secret(SecretSpec("client_secret"), source_field="client_secret_source"),
    )
    auth_url: str = field(default="https://kauth.kakao.com", metadata=_key(_url(redirect=False)))
    api_url: str = field(default="https://kapi.kakao.com", metadata=_key(_url(redirect=False)))
    redirect_uri: str = field(
        default="http://127.0.0.1:8765/callback", metadata=_key(_url(redirect=True))
    )
    scopes: tuple[str, ...] = field(default=(), metadata=_key(_scopes))
    timeout: float = field(default=KAKAO_TIMEOUT, metadata=_key(_positive('"10s"')))
    connect_timeout: float = field(default=KAKAO_CONNECT_TIMEOUT, metadata=_key(_positive('"10s"')))
    #: Where the key came from: "file /etc/x", "env KAKAO_KEY", "credential x" or "inline".
    rest_api_key_source: str = field(default="inline", metadata={_META: _DERIVED})
    #: Where the client secret came from; None when there is no client secret.
    client_secret_source: str | None = field(default=None, metadata={_META: _DERIVED})

    def __post_init__(self) -> None:
        """Default the secret's source to "inline" when a secret was given directly."""
        if self.client_secret is not None and self.client_secret_source is None:
            object.__setattr__(self, "client_secret_source", "inline")
        if self.client_secret is None and self.client_secret_source is not None:
            object.__setattr__(self, "client_secret_source", None)

    def request_timeouts(
        self,
        policy: RefreshPolicy,
        lifetime: timedelta | None,
        refresh_left: float | None,
        *,
        unanswered: int = 0,
        heard: float | None = None,
    ) -> tuple[float, float]:
        """Return (total, connect): how long a Kakao request may wait for an answer and for
        its connection. ``timeout`` and ``connect_timeout``, fitted to a token living
        ``lifetime`` and to ``policy`` when left at their defaults, and never past half of the
        refresh token's remaining life (``refresh_left`` s), set by hand or not
        (tokens.request_timeout). The wait for the answer grows after ``unanswered`` token
        requests in a row that Kakao did not answer in time, and is at least twice the
        ``heard`` seconds Kakao took to answer the latest one; the connection's does not. The
        client waits this long (kakao.py), and health as long for a retry before it pages
        (health._held_for_retry)."""
        share = request_timeout_share(policy.refresh_at, policy.jitter)
        total = request_timeout(
            self.timeout,
            KAKAO_TIMEOUT,
            lifetime,
            refresh_left,
            share=share,
            unanswered=unanswered,
            heard=heard,
        )
        connect = request_timeout(
            self.connect_timeout, KAKAO_CONNECT_TIMEOUT, lifetime, refresh_left, share=share
        )
        return total, min(connect, total)

    def answer_patience(
        self,
        policy: RefreshPolicy,
        lifetime: timedelta | None,
        refresh_left: float | None,
        *,
        heard: float | None = None,
    ) -> float:
        """Return how long a token request given up on stays open for its late answer
        (tokens.answer_patience, with this app's ``timeout`` and ``policy``; ``heard``: how
        long Kakao took to answer the account's latest token request)."""
        share = request_timeout_share(policy.refresh_at, policy.jitter)
        return answer_patience(
            self.timeout, KAKAO_TIMEOUT, lifetime, refresh_left, share=share, heard=heard
        )


@dataclass(frozen=True)
class RefreshPolicy:
    """When to refresh and how to retry; shares are fractions of the access token lifetime."""

    refresh_at: float = field(default=0.75, metadata=_key(parse_share))
    jitter: float = field(default=0.05, metadata=_key(parse_share))
    heartbeat: float = field(default=REFRESH_HEARTBEAT, metadata=_key(parse_duration))
    retry_initial: float = field(default=10.0, metadata=_key(_positive('"10s"')))
    retry_max: float = field(default=300.0, metadata=_key(parse_duration))
    rotation_window: float = field(default=30 * 86400.0, metadata=_key(_positive('"30d"')))
    verify_on_start: bool = field(default=True, metadata=_key(_boolean))


_ALERT_WAIT: Final = _positive('"1d" or "10s"')
_SEVERITY: Final = _one_of(*SEVERITIES)


@dataclass(frozen=True)
class AlertsConfig:
    """When to alert and through which channels (the log is always one); see [alerts]."""

    #: Remaining refresh-token life at which to alert, longest first; each fires once.
    thresholds: tuple[float, ...] = field(
        default=(14 * 86400.0, 7 * 86400.0, 3 * 86400.0, 86400.0), metadata=_key(_thresholds)
    )
    #: Expiry alerts with less than this left are critical (warning before).
    critical_below: float = field(default=3 * 86400.0, metadata=_key(_ALERT_WAIT))
    #: A critical alert that is still active is sent again after this long.
    repeat: float = field(default=86400.0, metadata=_key(_ALERT_WAIT))
    #: Alert when refreshing has failed for longer than this share of the access lifetime.
    failing_after: float = field(default=0.10, metadata=_key(parse_share))
    #: KakaoTalk "send to me": True, False, or None = when the token has talk_message.
    kakaotalk: bool | None = field(default=None, metadata=_key(_boolean_or_auto))
    kakaotalk_min_severity: str = field(default="info", metadata=_key(_SEVERITY))
    #: May hold a secret (Slack/Discord URLs do): never shown in repr or logs.
    webhook_url: str | None = field(
        default=None, repr=False, metadata=_secret(SecretSpec("webhook_url"), check=_webhook_url)
    )
    webhook_timeout: float = field(default=10.0, metadata=_key(_ALERT_WAIT))
    webhook_retries: int = field(default=3, metadata=_key(_retries))
    webhook_min_severity: str = field(default="info", metadata=_key(_SEVERITY))
    command: tuple[str, ...] = field(default=(), metadata=_key(_command))
    command_timeout: float = field(default=30.0, metadata=_key(_ALERT_WAIT))
    command_min_severity: str = field(default="info", metadata=_key(_SEVERITY))
    #: "ko" or "en" for the texts the channels send; None = from the locale (LC_ALL, LANG ...).
    #: ("ko" first in messages: most users are Korean.)
    language: str | None = field(
        default=None, metadata=_key(_one_of(*sorted(LANGUAGES, reverse=True)))
    )
    #: A page the KakaoTalk memo links to (its domain must be registered for the Kakao app).
    kakaotalk_link: str | None = field(default=None, metadata=_key(_link))


@dataclass(frozen=True)
class TemplateConfig:
    """One [[accounts.NAME.templates]] entry: a file the token is rendered into (templates.py)."""

    source: Path = field(metadata=_key(_path))
    destination: Path = field(metadata=_key(_path, own_file=True))
    mode: int = field(metadata=_key(_FILE_MODE, inherit="token_file_mode"))
    group: str | None = field(metadata=_key(_group, inherit="token_file_group"))
    #: Run (no shell) after the destination's content changed; empty for none.
    command: tuple[str, ...] = field(default=(), metadata=_key(_command))
    command_timeout: float = field(default=30.0, metadata=_key(_positive('"30s"')))
    #: The source's text as read when the configuration was loaded (and checked).
    text: str = field(default="", repr=False, metadata={_META: _DERIVED})


@dataclass(frozen=True)
class AccountConfig:
    """One Kakao user account: its app and its files."""

    name: str = field(metadata={_META: _DERIVED})
    app: KakaoApp = field(metadata=_table("kakao", KakaoApp))
    #: Unset, each file is <state_dir>/<name><default_name>, made when read (_Derivable).
    state_file: Path = field(metadata=_key(_path, own_file=True, default_name=".state.json"))
    lock_file: Path = field(metadata=_key(_path, own_file=True, default_name=".lock"))
    token_file: Path = field(metadata=_key(_path, own_file=True, default_name=".token.json"))
    token_file_mode: int = field(
        default=0o640, metadata=_key(_FILE_MODE, key="mode", table="publish")
    )
    token_file_group: str | None = field(
        default=None, metadata=_key(_group, key="group", table="publish")
    )
    include_refresh_token: bool = field(default=False, metadata=_key(_boolean, table="publish"))
    #: Commands (argv, no shell) run after each refresh that changed the token.
    hooks: tuple[tuple[str, ...], ...] = field(default=(), metadata=_key(_hooks))
    hook_timeout: float = field(default=30.0, metadata=_key(parse_duration))
    #: Extra sinks: a file with only the access token; a KAKAO_ACCESS_TOKEN=... env file.
    access_token_file: Path | None = field(default=None, metadata=_key(_path, own_file=True))
    env_file: Path | None = field(default=None, metadata=_key(_path, own_file=True))
    #: Files the token is rendered into, in the consumer's own format.
    templates: tuple[TemplateConfig, ...] = field(
        default=(), metadata=_table("templates", TemplateConfig, many=True)
    )
    #: [alerts] with this account's [accounts.NAME.alerts] overrides applied.
    alerts: AlertsConfig = field(
        default_factory=AlertsConfig, metadata=_table("alerts", AlertsConfig)
    )
    #: The global options a person types to reach this account: ``--config FILE`` unless a
    #: plain `kakao-tokend` finds the file, ``--account NAME`` unless it is the default
    #: account (relogin.cli_command puts them before the command).
    cli_options: tuple[str, ...] = field(default=(), metadata={_META: _DERIVED})

    def outputs(self) -> list[tuple[str, Path]]:
        """What the account publishes besides its token file, each with its setting's key
        below ``accounts.NAME``: the extra token files and the templates' destinations.
        Their directories may be the consumers': `run` and `check-config` judge them
        (store.judge_output_directory)."""
        found = [
            (key, path)
            for key, path in (
                ("access_token_file", self.access_token_file),
                ("env_file", self.env_file),
            )
            if path is not None
        ]
        found += [
            (f"templates[{index}].destination", template.destination)
            for index, template in enumerate(self.templates)
        ]
        return found

    def file_text(self, field_name: str) -> str:
        """The text of the account's ``state_file``, ``lock_file`` or ``token_file``.

        A derived file's text comes from the defaults without making its Path: a start
        compares and opens a thousand accounts' files by their text, and the Paths would
        cost it more than the checks themselves (docs/benchmarks.md).
        """
        # Not through self.__dict__: reading it makes the instance a dictionary of its own
        # (64 bytes an account, kept) where Python otherwise keeps the attributes inline.
        defaults: _AccountDefaults | None = getattr(self, "_defaults", None)
        if defaults is None or field_name in self._own_files:  # type: ignore[attr-defined]
            return str(getattr(self, field_name))  # set, or made by replace(): an attribute
        return defaults.text(self.name, _FILE_SUFFIXES[field_name])


class _AccountDefaults:
    """What the accounts of one configuration derive the settings they leave unset from.

    One object for all of them: an unset state, lock or token file is
    ``<state_dir>/<name><suffix>`` and the ``cli_options`` follow from the name, so an
    account holds no Path or tuple of its own for them (three Paths with their cached text
    and interned names were about 1 KiB an account, and a fleet node never opens the state
    or lock file). A file-backend daemon uses all three files of every account, from its
    store, the state watch and the start-up checks: there a file is made once, when first
    asked for, and kept (``keep``).
    """

    __slots__ = ("default_account", "keep", "options", "prefix", "state_dir")

    def __init__(
        self,
        state_dir: Path | None,
        options: tuple[str, ...],
        default_account: object,
        *,
        keep: bool,
    ) -> None:
        self.state_dir = state_dir
        #: What pathlib writes before a child's name ("/var/lib/kakao-tokend/", "" for "."):
        #: a default file's text without a Path.
        self.prefix = str(state_dir / "-")[:-1] if state_dir is not None else ""
        #: The options naming the configuration (``--config FILE``, or none).
        self.options = options
        self.default_account = default_account
        self.keep = keep

    def text(self, name: str, suffix: str) -> str:
        """Return the text of the account's default file ``<state_dir>/<name><suffix>``."""
        return f"{self.prefix}{name}{suffix}"

    def cli_options(self, name: str) -> tuple[str, ...]:
        """Return the account's ``cli_options`` (see AccountConfig)."""
        if name == self.default_account:
            return self.options
        return (*self.options, "--account", name)


class _Derivable:
    """A field of AccountConfig that most accounts leave unset: derived when read.

    An account that sets the field holds its value as an instance attribute, which Python
    finds before this (non-data) descriptor on the class; on one that leaves it unset the
    attribute is missing, and reading the field asks the configuration's
    :class:`_AccountDefaults` (the account's ``_defaults``). A file kept once made
    (``keep``) becomes the instance attribute, so every later read is a plain one.
    ``replace``, ``==`` and repr read fields as attributes: the class still behaves as a
    plain frozen dataclass.
    """

    __slots__ = ("name", "suffix")

    def __init__(self, name: str, suffix: str | None) -> None:
        self.name = name
        #: The default file's suffix; None for ``cli_options``.
        self.suffix = suffix

    def __get__(self, account: object, owner: object = None) -> Any:
        if account is None:
            return self
        defaults: _AccountDefaults = account._defaults  # type: ignore[attr-defined]
        name: str = account.name  # type: ignore[attr-defined]
        if self.suffix is None:
            return defaults.cli_options(name)
        assert defaults.state_dir is not None  # an unset file is only left to these with one
        path = defaults.state_dir.joinpath(f"{name}{self.suffix}")
        if defaults.keep:
            object.__setattr__(account, self.name, path)
        return path


@dataclass(frozen=True)
class ApiSettings:
    """The local API: a Unix socket (always) and an optional TCP listener with a bearer token."""

    #: None means <runtime_dir>/api.sock (paths.api_socket_path).
    socket: Path | None = field(default=None, metadata=_key(_path))
    socket_mode: int = field(default=0o660, metadata=_key(_SOCKET_MODE))
    socket_group: str | None = field(default=None, metadata=_key(_group))
    #: (host, port) when the TCP listener is on.
    tcp: tuple[str, int] | None = field(default=None, metadata=_key(_host_port))
    bearer_token: str | None = field(
        default=None, repr=False, metadata=_secret(SecretSpec("bearer_token"), check=_bearer_token)
    )
    allow_non_loopback: bool = field(default=False, metadata=_key(_boolean))
    #: Largest request body accepted (413 beyond); proxied bodies up to proxy_retry_body are
    #: buffered so the request can be retried after a -401.
    max_body: int = field(default=16 * 1024 * 1024, metadata=_key(_size))
    proxy_retry_body: int = field(default=1024 * 1024, metadata=_key(_size))
    request_timeout: float = field(default=60.0, metadata=_key(parse_duration))


def default_node_name() -> str:
    """Return the host name, the default [store] node_name."""
    return socket.gethostname()


_POSTGRES: Final = ("backend", "postgres")


@dataclass(frozen=True)
class StoreSettings:
    """[store]: where account state lives: "file" (the default) or "postgres" (fleet mode).

    The DSN and the key file's text are secrets (repr hides them). They are read whenever
    they are configured, also with the file backend: `store migrate --to postgres` needs them
    before the backend is switched.
    """

    backend: str = field(default="file", metadata=_key(_one_of(*STORE_BACKENDS)))
    # Fleet mode: the database (a password-less DSN is often inline) and the key that encrypts
    # tokens at rest (never inline: it would sit next to the database's address).
    dsn: str | None = field(
        default=None,
        repr=False,
        metadata=_secret(
            SecretSpec("dsn", multiword=True), source_field="dsn_source", only_if=_POSTGRES
        ),
    )
    #: Where the DSN came from: "file /etc/x", "env X", "credential x" or "inline".
    dsn_source: str | None = field(default=None, metadata={_META: _DERIVED})
    #: The keys of the key file (newest last); None when no key is configured.
    keyring: Keyring | None = field(
        default=None,
        repr=False,
        metadata=_secret(
            SecretSpec("key", inline=False, multiword=True),
            check=_keyring,
            source_field="key_source",
            only_if=_POSTGRES,
        ),
    )
    key_source: str | None = field(default=None, metadata={_META: _DERIVED})
    node_name: str = field(default_factory=default_node_name, metadata=_key(_node_name))
    #: The accounts whose token files this node writes (None: all of them).
    publish_accounts: tuple[str, ...] | None = field(default=None, metadata=_key(_account_names))
    #: Database connections per node: refreshes that may hold a row lock at once, plus one.
    pool_size: int = field(default=8, metadata=_key(_pool_size))


@dataclass(frozen=True)
class Config:
    """The whole, checked configuration."""

    source: Path | None = field(metadata={_META: _DERIVED})
    state_dir: Path = field(metadata=_key(_path, table="paths"))
    runtime_dir: Path = field(metadata=_key(_path, table="paths"))
    log_level: str = field(metadata=_key(_one_of(*LOG_LEVELS)))
    refresh: RefreshPolicy = field(metadata=_table("refresh", RefreshPolicy))
    accounts: Mapping[str, AccountConfig] = field(
        metadata=_table("accounts", AccountConfig, many=True)
    )
    default_account: str = field(metadata=_key(partial(_string, what="an account name")))
    api: ApiSettings = field(default_factory=ApiSettings, metadata=_table("api", ApiSettings))
    #: The global [alerts] section (each account's effective settings are in its .alerts).
    alerts: AlertsConfig = field(
        default_factory=AlertsConfig, metadata=_table("alerts", AlertsConfig)
    )
    store: StoreSettings = field(
        default_factory=StoreSettings, metadata=_table("store", StoreSettings)
    )

    @property
    def api_socket(self) -> Path:
        """Return where the local API's Unix socket lives (paths.api_socket_path)."""
        return paths.api_socket_path(self.runtime_dir, self.api.socket)

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
# What the schema implies: accepted keys, secrets, and the rules across fields


def _spec(item: Field[Any]) -> Any:
    """The field's _Key, _Secret, _Table or _DERIVED."""
    try:
        return item.metadata[_META]
    except KeyError:
        raise TypeError(
            f"config field {item.name} says neither how it is read nor that it is derived"
        ) from None


class _Schema(NamedTuple):
    """What the table read into a dataclass (or its sub-table) holds, from the fields."""

    #: The keys accepted, in the order of the fields.
    keys: tuple[str, ...]
    #: (field, key, spec) of each plain key.
    values: tuple[tuple[str, str, _Key], ...]
    #: (field, spec, the keys that can give it) of each secret.
    secrets: tuple[tuple[str, _Secret, frozenset[str]], ...]
    #: Fields without a default.
    required: frozenset[str]


_SCHEMAS: Final[dict[tuple[type[Any], str | None], _Schema]] = {}


def _schema(cls: type[Any], table: str | None = None) -> _Schema:
    """The schema of the table read into ``cls`` (or of its sub-table ``table``, e.g. publish)."""
    if (cls, table) in _SCHEMAS:
        return _SCHEMAS[cls, table]
    keys: list[str] = []
    values: list[tuple[str, str, _Key]] = []
    secrets: list[tuple[str, _Secret, frozenset[str]]] = []
    for item in fields(cls):
        spec = _spec(item)
        if isinstance(spec, _Key) and spec.table == table:
            values.append((item.name, spec.key or item.name, spec))
            keys.append(spec.key or item.name)
        elif table is not None:
            continue
        elif isinstance(spec, _Key):
            keys.append(str(spec.table))  # the sub-table itself, e.g. [paths]
        elif isinstance(spec, _Secret):
            secrets.append((item.name, spec, frozenset(spec.spec.sources())))
            keys.extend(spec.spec.sources())
        elif isinstance(spec, _Table):
            keys.append(spec.name)
    required = {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    schema = _Schema(tuple(dict.fromkeys(keys)), tuple(values), tuple(secrets), frozenset(required))
    _SCHEMAS[cls, table] = schema
    return schema


def _subtables(cls: type[Any]) -> dict[str, tuple[type[Any], str | None, str]]:
    """{name: (dataclass, its sub-table, field)} of each single table directly below ``cls``.

    A table read into a field is (its dataclass, None, the field); a sub-table holding keys of
    ``cls`` itself, such as [publish] for AccountConfig, is (cls, "publish", "").
    """
    found: dict[str, tuple[type[Any], str | None, str]] = {}
    for item in fields(cls):
        spec = _spec(item)
        if isinstance(spec, _Key) and spec.table is not None:
            found[spec.table] = (cls, spec.table, "")
        elif isinstance(spec, _Table) and not spec.many:
            found[spec.name] = (spec.cls, None, item.name)
    return found


def _tables(cls: type[Any]) -> Iterator[tuple[str, type[Any]]]:
    """(name, dataclass) of every table read into a field below ``cls``, depth first."""
    for item in fields(cls):
        spec = _spec(item)
        if isinstance(spec, _Table):
            yield spec.name, spec.cls
            yield from _tables(spec.cls)


#: The files an account has in the state directory unless it names them: (field, key,
#: suffix).
_DEFAULT_FILES: Final = tuple(
    (name, key, spec.default_name)
    for name, key, spec in _schema(AccountConfig).values
    if spec.default_name
)
#: The suffix of each default file, by field (AccountConfig.file_text).
_FILE_SUFFIXES: Final = {name: suffix for name, _, suffix in _DEFAULT_FILES}
#: The fields of AccountConfig derived when an account leaves them unset, with the suffix of
#: each default file (None: the command-line options).
_DERIVABLE: Final[tuple[tuple[str, str | None], ...]] = (
    *((name, suffix) for name, _, suffix in _DEFAULT_FILES),
    ("cli_options", None),
)
for _name, _suffix in _DERIVABLE:
    setattr(AccountConfig, _name, _Derivable(_name, _suffix))
del _name, _suffix
#: The files an account with derived defaults names itself (file_text): most name none, and
#: share this class attribute; one that does holds its own set.
AccountConfig._own_files = frozenset()  # type: ignore[attr-defined]
#: The tables each account reads over a global default of the same name: [accounts.NAME.kakao]
#: overrides [kakao] key by key.
_ACCOUNT_TABLES: Final = _subtables(AccountConfig)
#: Every table at the top of the file but [accounts], each read once.
_TOP_TABLES: Final = {**_ACCOUNT_TABLES, **_subtables(Config)}
_TOP_KEYS: Final = tuple(dict.fromkeys((*_schema(Config).keys, *_ACCOUNT_TABLES)))

#: Every secret, by the config table it is set in (derived from the dataclasses: adding one is
#: one field). Its keys, the file-mode and inline checks, systemd credentials, per-account
#: overrides and the "only one source" rule all follow from its SecretSpec.
SECRETS: Final[Mapping[str, tuple[SecretSpec, ...]]] = MappingProxyType(
    {
        name: tuple(entry.spec for _, entry, _ in _schema(cls).secrets)
        for name, cls in _tables(Config)
        if _schema(cls).secrets
    }
)
_SECRET_SPECS: Final = {spec.name: spec for specs in SECRETS.values() for spec in specs}

# Rules across fields, one function per dataclass: ``known(*fields)`` says whether those
# fields parsed (one mistake never gives a second, confusing problem); ``problem(key, text)``
# reports at a key of the table.
_Known = Callable[..., bool]
_Report = Callable[[str, str], None]


def _refresh_rules(p: RefreshPolicy, known: _Known, problem: _Report) -> None:
    if known("refresh_at") and not 0.05 <= p.refresh_at <= 0.95:
        problem(
            "refresh_at",
            f"must be between 5% and 95% of the access token lifetime, got {p.refresh_at:.0%}",
        )
    if known("jitter", "refresh_at") and p.jitter >= p.refresh_at:
        problem(
            "jitter",
            f"must be smaller than refresh.refresh_at ({p.refresh_at:.0%}), got {p.jitter:.0%}",
        )
    if known("jitter", "refresh_at") and p.refresh_at <= 0.95 and p.refresh_at + p.jitter >= 1:
        problem(
            "jitter",
            "refresh.refresh_at + refresh.jitter must stay below 100% so the refresh always "
            "happens before expiry",
        )
    if known("heartbeat") and not 0.1 <= p.heartbeat <= 60:
        problem(
            "heartbeat",
            "must be between 0.1s and 60s (it bounds how late a refresh can be after suspend), "
            f"got {p.heartbeat:g}s",
        )
    if known("retry_initial", "retry_max") and p.retry_max < p.retry_initial:
        problem(
            "retry_max",
            f"must be at least refresh.retry_initial ({p.retry_initial:g}s), got {p.retry_max:g}s",
        )


def _api_rules(a: ApiSettings, known: _Known, problem: _Report) -> None:
    if known("tcp") and a.tcp and not a.allow_non_loopback and not _is_loopback(a.tcp[0]):
        problem(
            "tcp",
            f"{a.tcp[0]} is not a loopback address, so other machines could ask for tokens; "
            "use 127.0.0.1, or set api.allow_non_loopback = true if you really mean it",
        )
    if known("tcp", "bearer_token") and a.tcp and a.bearer_token is None:
        problem(
            "bearer_token_file",
            "required when api.tcp is set: a file (mode 600) holding a long random token, "
            "e.g. `openssl rand -hex 32 > FILE; chmod 600 FILE`",
        )
    if known("max_body", "proxy_retry_body") and a.proxy_retry_body > a.max_body:
        problem("proxy_retry_body", "must not be larger than api.max_body")


def _store_rules(s: StoreSettings, known: _Known, problem: _Report) -> None:
    if not known("backend") or s.backend != "postgres":
        return  # (a file-mode process never loads psycopg: `store migrate` checks the DSN)
    if known("dsn") and s.dsn is not None and not dsn_parses(s.dsn):
        problem(dsn_key(s.dsn_source), DSN_PROBLEM)
    if known("node_name") and not NODE_NAME_RE.match(s.node_name):
        problem(
            "node_name",
            f"the host name {s.node_name!r} is not usable as a node name; set node_name "
            "(letters, digits, '.', '_' and '-')",
        )
    if known("dsn") and s.dsn is None:
        problem(
            "dsn_file",
            'backend "postgres" needs the database: set dsn_file (a file, mode 600, holding '
            'e.g. "host=db.example dbname=tokend user=tokend password=..."), dsn_env or '
            "dsn_credential",
        )
    if known("keyring") and s.keyring is None:
        problem(
            "key_file",
            'backend "postgres" stores tokens encrypted and needs a key: run `kakao-tokend '
            "store new-key > /etc/kakao-tokend/store.key; chmod 600 /etc/kakao-tokend/store.key` "
            "and set key_file (or key_env / key_credential)",
        )


#: What is wrong with a DSN libpq cannot read (the value may hold a password: never shown).
DSN_PROBLEM: Final = (
    "is not a valid libpq connection string or postgresql:// URI (value not shown);"
    ' e.g. "host=db.example port=5432 dbname=tokend user=tokend" or'
    ' "postgresql://tokend@db.example/tokend"'
)


def dsn_key(source: str | None) -> str:
    """The [store] key a DSN came from, by its ``dsn_source`` ("env DB" → "dsn_env")."""
    kind = (source or "inline").split(" ", 1)[0]
    return "dsn" if kind == "inline" else f"dsn_{kind}"


def dsn_parses(dsn: str) -> bool:
    """Whether libpq can read ``dsn`` (True without the postgres extra: the commands that
    need it say that it is missing)."""
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return True
    try:
        conninfo_to_dict(dsn)
    except ProgrammingError:
        return False
    return True


_RULES: Final[Mapping[type[Any], Callable[[Any, _Known, _Report], None]]] = {
    RefreshPolicy: _refresh_rules,
    ApiSettings: _api_rules,
    StoreSettings: _store_rules,
}


def plain_http_exposure(api: ApiSettings) -> tuple[str, str] | None:
    """Return what is wrong and the fix for a TCP listener that other machines can reach
    (None otherwise).

    api.allow_non_loopback permits it, but the API speaks plain HTTP: the bearer token and
    every access token it hands out cross the network unencrypted. `check-config` prints it
    and `run` logs it when the listener starts (:func:`plain_http_warning`); `doctor` reports
    it as a warning with the fix.
    """
    if api.tcp is None or _is_loopback(api.tcp[0]):
        return None
    return (
        f"api.tcp = {tcp_address(api.tcp)} serves the API over plain HTTP to other machines:"
        " the bearer token and every access token it hands out cross the network unencrypted",
        "keep it on 127.0.0.1 and let other machines reach it through an SSH tunnel or a"
        " reverse proxy that speaks TLS",
    )


def plain_http_warning(api: ApiSettings) -> str | None:
    """Return :func:`plain_http_exposure` as one warning line (None when there is none)."""
    exposure = plain_http_exposure(api)
    return None if exposure is None else "; ".join(exposure)


def tcp_address(tcp: tuple[str, int]) -> str:
    """Return the listener's ``host:port`` as written (``[::1]:8766`` for IPv6)."""
    host, port = tcp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def kakaotalk_only_warning(account: AccountConfig) -> tuple[str, str] | None:
    """Return (the problem, its fix) when KakaoTalk alone carries ``account``'s critical
    alerts, else None: one text for `check-config` and `doctor`."""
    if not kakaotalk_only_for_critical(account):
        return None
    return (
        "KakaoTalk is the only channel for critical alerts, and it cannot deliver once the"
        " token is dead",
        "add [alerts] webhook_url or command",
    )


def kakaotalk_only_for_critical(account: AccountConfig) -> bool:
    """True when KakaoTalk would be the only channel carrying critical alerts for ``account``.

    It cannot deliver once the token is dead, which is exactly when critical alerts matter
    (`check-config` warns). With ``kakaotalk = "auto"`` the configured scopes decide.
    """
    settings = account.alerts
    kakaotalk = settings.kakaotalk is True or (
        settings.kakaotalk is None and "talk_message" in account.app.scopes
    )
    return kakaotalk and not (settings.webhook_url or settings.command)


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
        data = read_config_bytes(source)
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist; check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from None
    try:
        # "utf-8-sig": an editor's byte-order mark (Notepad's "UTF-8") is not TOML, but it is
        # invisible, and the user meant UTF-8.
        text = data.decode("utf-8-sig")
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


_FILE_KINDS: Final = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def read_config_bytes(source: Path) -> bytes:
    """Read the config file without waiting on it: ConfigError when it is not a regular file.

    Opened non-blocking (as templates.read_template_source opens a template), so a named pipe
    (or a link to one) is refused at once instead of stopping every command until something
    writes to it; judged by the descriptor's ``fstat``, so a link is followed (a config file
    managed as a symlink is fine) but what is read is what was judged. OSErrors (missing,
    permission denied) reach the caller unchanged.
    """
    info, data = _read_without_waiting(source)
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError(
            f"config file {source} is a directory; pass the config file itself"
            f" (e.g. --config {source / 'config.toml'})"
        )
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
        raise ConfigError(
            f"config file {source} is not a regular file ({kind}); point --config (or"
            f" KAKAO_TOKEND_CONFIG) at the config file itself"
        )
    return data


def _read_without_waiting(path: Path, limit: int | None = None) -> tuple[os.stat_result, bytes]:
    """Open ``path`` non-blocking and return the ``fstat`` of what was opened with its bytes
    (up to one byte past ``limit``; nothing unless it is a regular file, which the caller
    judges by the stat). A named pipe, or a link to one, cannot stop the caller, and what is
    read is what was judged. OSErrors (missing, permission denied) reach the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        chunks: list[bytes] = []
        size = 0
        while stat.S_ISREG(info.st_mode) and (limit is None or size <= limit):
            wanted = 1 << 16 if limit is None else min(1 << 16, limit + 1 - size)
            if not (chunk := os.read(fd, wanted)):
                break
            chunks.append(chunk)
            size += len(chunk)
        return info, b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Locations:
    """Where the configuration puts the files: what :func:`load_locations` returns."""

    source: Path | None
    state_dir: Path
    runtime_dir: Path
    socket: Path | None = None

    @property
    def api_socket(self) -> Path:
        """Return where the local API's Unix socket lives (paths.api_socket_path)."""
        return paths.api_socket_path(self.runtime_dir, self.socket)


def load_locations(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> Locations:
    """Read only ``[paths]`` and ``[api] socket``, by the loader's own rules, and nothing else.

    For commands that must find the daemon whatever else is wrong with the file (`reload`
    asks the daemon to check a config the CLI may not load: a mistake elsewhere, or secrets
    only the service can read). An unreadable file, or a bad value, gives the default. A file
    that is not TOML at all is a ConfigError: which socket it names cannot be known, and the
    default one may be another daemon's.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    source = find_config_file(path, env)
    raw: dict[str, Any] = {}
    if source is not None:
        try:
            raw = tomllib.loads(read_config_bytes(source).decode("utf-8-sig"))
        except OSError:
            raw = {}
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            what = "UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"valid TOML ({exc})"
            raise ConfigError(
                f"config file {source} is not {what}; no daemon was asked: fix it"
                f" first (`kakao-tokend --config {source} check-config`)"
            ) from None
    checker = _Checker(source=source, environ=env, with_secrets=False)

    def setting(table: str, key: str) -> Path | None:
        section = raw.get(table)
        value = section.get(key) if isinstance(section, dict) else None
        if value is None:
            return None
        try:
            return checker.resolve(_path(value))
        except ValueError:
            return None  # a bad value: the default, as if it were not there

    def directory(key: str, default: Callable[..., Path]) -> Path:
        found = setting("paths", key)
        return found if found is not None else default(env, config_source=source)

    return Locations(
        source=source,
        state_dir=directory("state_dir", paths.default_state_dir),
        runtime_dir=directory("runtime_dir", paths.default_runtime_dir),
        socket=setting("api", "socket"),
    )


def config_from_toml_text(
    text: str, *, source: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build a Config from TOML text (relative paths are relative to ``source``'s directory)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    return _build(text, source=source, environ=env, extra=[])


#: A line that declares an account table with nothing of its own: ``[accounts.NAME]``.
_PLAIN_ACCOUNT_LINE: Final = re.compile(r"\[accounts\.([A-Za-z0-9_-]+)\][ \t]*")


def _load_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads(text)``, with a large configuration's tail of plain accounts read by a
    regular expression.

    tomllib spends about 50 K instructions on each ``[accounts.NAME]`` header, most of a
    1,000-account file. When the file ends in such lines (and blank ones), they add exactly
    an ``accounts`` table of empty tables after whatever the rest defines, provided the rest
    defines no ``accounts`` at all and no name repeats: then tomllib reads only the rest.
    Anything else, the rest failing to parse included, goes through tomllib whole, which
    answers or raises exactly as before. (No value can run on into those lines: none holds
    a bare ``accounts.`` and no string can close in them.)
    """
    lines = text.split("\n")
    start = len(lines)
    names: list[str] = []
    match = _PLAIN_ACCOUNT_LINE.fullmatch
    last = len(lines)
    while start:
        line = lines[start - 1]
        if line.endswith("\r") and start < last:
            line = line[:-1]  # CRLF (a carriage return that ends no line is not TOML)
        if line.strip(" \t"):
            found = match(line)
            if found is None:
                break
            names.append(found.group(1))
        start -= 1
    if not names or len(set(names)) != len(names):
        return tomllib.loads(text)
    try:
        raw = tomllib.loads("\n".join(lines[:start]))
    except tomllib.TOMLDecodeError:
        return tomllib.loads(text)  # raises with the whole file's line and column
    if "accounts" in raw:
        return tomllib.loads(text)
    raw["accounts"] = {name: {} for name in reversed(names)}
    return raw


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
        raw = _load_toml(text)
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


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


#: A setting's value with the key path it came from (global [kakao] or an account override).
_Setting = tuple[Any, str]


def _settings(table: Mapping[str, Any], prefix: str) -> dict[str, _Setting]:
    return {key: (value, _join(prefix, key)) for key, value in table.items()}


def _overlay(
    base: Mapping[str, Any], base_prefix: str, own: Mapping[str, Any], own_prefix: str
) -> dict[str, _Setting]:
    """Merge an account's override table over the global one, keeping each key's origin.

    Naming any source of a secret in the override replaces all of the global sources of that
    secret, so an account can use a _file where the global uses an _env.
    """
    merged = _settings(base, base_prefix)
    for spec in SECRETS.get(base_prefix, ()):
        if any(key in own for key in spec.sources()):
            for key in spec.sources():
                merged.pop(key, None)
    merged.update(_settings(own, own_prefix))
    return merged


def _source_key(settings: Mapping[str, _Setting], name: str, prefix: str) -> str:
    """The key path that gave secret ``name`` (for messages), else ``prefix.name``."""
    for key in _SECRET_SPECS[name].sources():
        if key in settings:
            return str(settings[key][1])
    return f"{prefix}.{name}"


# ---------------------------------------------------------------------------------------------
# The checker: reads every table through the schema, then checks the rules; never stops early.

_T = TypeVar("_T")


class _Checker:
    """One load: collects every problem as (key path, text) instead of stopping at the first."""

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
        #: Every account file seen, in order: (key path, its text, set explicitly?); or the
        #: name of an account without a table, for its three default files.
        self.files: list[tuple[str, str, bool] | str] = []
        #: What accounts without their own [kakao], [publish] or [alerts] share, by table.
        self.inherited: dict[str, Any] = {}
        #: What accounts derive their unset files and options from (set by ``config``).
        self.defaults = _AccountDefaults(None, (), None, keep=False)
        #: The attributes of the first account read without a table of its own
        #: (``[accounts.NAME]`` empty), but its name: every other such account has the same.
        self.plain: tuple[tuple[str, Any], ...] | None = None

    def problem(self, key: str, text: str) -> None:
        self.problems.append((key, text))

    # -- tables -------------------------------------------------------------------------------

    def table(self, raw: Mapping[str, Any], key: str, prefix: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.problem(
                _join(prefix, key),
                f"expected a table [{_join(prefix, key)}], got {_describe(value)}",
            )
            return {}
        return value

    def known_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                hint = _suggest(key, allowed) or f"; allowed here: {', '.join(allowed)}"
                self.problem(_join(prefix, key), f"unknown key{hint}")

    def section(
        self, raw: Mapping[str, Any], name: str, prefix: str, cls: type[Any], sub: str | None
    ) -> dict[str, Any]:
        """``raw[name]``, a table of the keys of ``cls`` (or of its sub-table ``sub``)."""
        table = self.table(raw, name, prefix)
        self.known_keys(table, _schema(cls, sub).keys, _join(prefix, name))
        return table

    def read(
        self,
        cls: type[Any],
        settings: Mapping[str, _Setting],
        prefix: str,
        *,
        table: str | None = None,
        required: bool = True,
    ) -> tuple[dict[str, Any], set[str]]:
        """Parse the keys of ``cls``'s fields (those in its sub-table ``table``) that are set.

        Return (field values, names of fields whose value is unknown: bad or a secret not
        loaded). ``prefix`` is where keys that are not set belong (for "missing" problems).
        """
        values: dict[str, Any] = {}
        unknown: set[str] = set()
        schema = _schema(cls, table)
        for name, key, spec in schema.values:
            if key not in settings:
                continue
            value, where = settings[key]
            try:
                parsed = spec.parse(value)
            except ValueError as exc:
                self.problem(where + getattr(exc, "at", ""), str(exc))
                unknown.add(name)
                continue
            values[name] = self.resolve(parsed) if isinstance(parsed, Path) else parsed
        for name, entry, sources in schema.secrets:
            given = not sources.isdisjoint(settings)
            if not given and entry.only_if and values.get(entry.only_if[0]) != entry.only_if[1]:
                continue
            secret, source = self.secret(
                settings,
                entry.spec.name,
                missing_prefix=prefix,
                required=entry.required and required,
            )
            if not self.with_secrets or (secret is None and given):
                unknown.add(name)
            if secret and entry.check is not None and source is not None:
                try:
                    secret = entry.check(secret, source)
                except ValueError as exc:
                    self.problem(_source_key(settings, entry.spec.name, prefix), str(exc))
                    unknown.add(name)
                    continue
            values[name] = secret
            if secret is not None and entry.source_field:
                values[entry.source_field] = source
        return values, unknown

    def build(self, cls: type[_T], settings: Mapping[str, _Setting], prefix: str) -> _T | None:
        """Read ``cls`` from its table and check its rules; None if a required field is unset."""
        values, unknown = self.read(cls, settings, prefix)
        return self.finish(cls, values, unknown, settings, prefix)

    def finish(
        self,
        cls: type[_T],
        values: Mapping[str, Any],
        unknown: set[str],
        settings: Mapping[str, _Setting],
        prefix: str,
    ) -> _T | None:
        """Make ``cls`` from ``values`` (defaults for the rest) and check its rules."""
        if not _schema(cls).required.issubset(values):
            return None
        instance = cls(**values)
        if cls in _RULES:

            def problem(key: str, text: str) -> None:
                self.problem(settings[key][1] if key in settings else _join(prefix, key), text)

            _RULES[cls](instance, lambda *names: unknown.isdisjoint(names), problem)
        return instance

    def resolve(self, path: Path) -> Path:
        """Relative paths are relative to the config file's directory."""
        return Path(os.path.normpath(self.base_dir / path))

    # -- the whole file -----------------------------------------------------------------------

    def config(self, raw: Mapping[str, Any]) -> Config | None:
        self.known_keys(raw, _TOP_KEYS, "")
        values, unknown = self.read(Config, _settings(raw, ""), "")
        tables = {
            name: self.section(raw, name, "", cls, sub)
            for name, (cls, sub, _) in _TOP_TABLES.items()
        }
        for name, (cls, sub, target) in _subtables(Config).items():
            settings = _settings(tables[name], name)
            if target:
                values[target] = self.build(cls, settings, name)
            else:
                values.update(self.read(cls, settings, name, table=sub)[0])
        for name, default in (
            ("state_dir", paths.default_state_dir),
            ("runtime_dir", paths.default_runtime_dir),
        ):
            if name not in tables["paths"]:
                try:
                    # The config file in use decides between the system and the user directories.
                    values[name] = default(self.environ, config_source=self.source)
                except ConfigError as exc:
                    self.problems.extend(exc.details or [(f"paths.{name}", exc.message)])

        account_tables = self.account_tables(raw)
        # The global options that name each account on the command line (its cli_options)
        # follow from its name and the default account. A default_account that names no
        # account is a problem below, and then nothing is built.
        store = values.get("store")
        self.defaults = _AccountDefaults(
            values.get("state_dir"),
            paths.config_options(self.source, self.environ),
            raw.get("default_account", next(iter(account_tables), None)),
            keep=store is None or store.backend == "file",
        )
        accounts: dict[str, AccountConfig] = {}
        for name, table in account_tables.items():
            if not table and self.plain is not None and not self.problems:
                accounts[name] = self.plain_account(name)
                continue
            account = self.account(name, table, tables)
            if account is not None:
                accounts[name] = account
        if not account_tables:
            # No usable account to check them through: still report bad global values.
            for name, (cls, sub, _) in _ACCOUNT_TABLES.items():
                self.read(cls, _settings(tables[name], name), name, table=sub, required=False)
        self.check_distinct_files()
        self.check_directories(values)

        names = list(account_tables)
        if "default_account" not in raw:
            values["default_account"] = names[0] if names else None
        elif "default_account" not in unknown and values["default_account"] not in names:
            wanted = values["default_account"]
            self.problem(
                "default_account",
                f'no account named "{wanted}" (accounts: {", ".join(names) or "none"})'
                f"{_suggest(wanted, names)}",
            )
        self.check_publish_accounts(values.get("store"), names)
        if self.problems or not accounts:
            return None
        values.setdefault("log_level", "info")
        return Config(source=self.source, accounts=MappingProxyType(accounts), **values)

    def check_publish_accounts(self, store: StoreSettings | None, names: list[str]) -> None:
        """``[store] publish_accounts`` names only configured accounts (a typo, or an account
        removed from the config, would publish nothing for it without a word)."""
        if store is None or not store.publish_accounts:
            return
        unknown = [name for name in store.publish_accounts if name not in names]
        if not unknown:
            return
        accounts = f"(accounts: {', '.join(names) or 'none'})"
        if len(unknown) == 1:
            [wanted] = unknown
            problem = f'no account named "{wanted}" {accounts}{_suggest(wanted, names)}'
        else:
            quoted = ", ".join(f'"{name}"' for name in unknown)
            problem = f"no accounts named {quoted} {accounts}"
        self.problem("store.publish_accounts", problem)

    # -- accounts -----------------------------------------------------------------------------

    def account_tables(self, raw: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
        """Return {name: its table}; one "default" (with no table) without [accounts]."""
        if "accounts" not in raw:
            return {DEFAULT_ACCOUNT: None}
        accounts = self.table(raw, "accounts", "")
        if not accounts:
            if isinstance(raw["accounts"], dict):
                self.problem(
                    "accounts",
                    "no accounts defined; add an [accounts.NAME] table or "
                    'remove [accounts] to use the single account "default"',
                )
            return {}
        result: dict[str, dict[str, Any] | None] = {}
        allowed = _schema(AccountConfig).keys
        for name, table in accounts.items():
            if type(table) is dict and not table and ACCOUNT_NAME_RE.match(name):
                result[name] = table  # [accounts.NAME] alone: nothing more to check
                continue
            prefix = f"accounts.{name}"
            if not ACCOUNT_NAME_RE.match(name):
                self.problem(
                    prefix,
                    "account names must be 1-32 lowercase letters, digits, "
                    f'"_" or "-", starting with a letter or digit; got "{name}"',
                )
            elif not isinstance(table, dict):
                self.problem(prefix, f"expected a table [{prefix}], got {_describe(table)}")
            else:
                self.known_keys(table, allowed, prefix)
                result[name] = table
        return result

    def account(
        self,
        name: str,
        table: Mapping[str, Any] | None,
        shared: Mapping[str, Mapping[str, Any]],
    ) -> AccountConfig | None:
        """One account: its own keys, and each shared table with its overrides applied."""
        prefix = f"accounts.{name}"
        defaults = self.defaults
        values, unknown = self.read(AccountConfig, _settings(table or {}, prefix), prefix)
        values["name"] = name
        values["cli_options"] = defaults
        for sub, (cls, sub_table, target) in _ACCOUNT_TABLES.items():
            own = self.section(table, sub, prefix, cls, sub_table) if table is not None else {}
            if not own and sub in self.inherited:
                # A thousand accounts without overrides share one app (its secrets read once),
                # one [alerts] and one reading of [publish].
                if target:
                    values[target] = self.inherited[sub]
                else:
                    values.update(self.inherited[sub])
                continue
            settings = _overlay(shared[sub], sub, own, f"{prefix}.{sub}")
            # Where an unset key (a missing secret) belongs: the account's table if it has one.
            where = f"{prefix}.{sub}" if own else sub
            result: Any = None
            if not target:  # keys of the account itself, kept in a table: [publish] mode
                result, bad = self.read(cls, settings, where, table=sub_table)
                values.update(result)
                unknown |= bad
            elif (result := self.build(cls, settings, where)) is not None:
                values[target] = result
            else:
                unknown.add(target)
            if not own and result is not None and not self.problems:
                # Only a clean result is shared: after a mistake every account is read again
                # and reports for itself.
                self.inherited[sub] = result
        for field_name, _, _ in _DEFAULT_FILES:
            if defaults.state_dir is not None and field_name not in unknown:
                values.setdefault(field_name, defaults)  # derived when read
        self.claim_files(AccountConfig, values, prefix, explicit=table or {})
        if table is not None and "templates" in table:
            # What templates inherit ([publish] mode and group, include_refresh_token), if known.
            known = {
                item.name: values.get(item.name, item.default)
                for item in fields(AccountConfig)
                if item.name not in unknown
            }
            values["templates"] = self.templates(table["templates"], f"{prefix}.templates", known)
        account = self.finish(AccountConfig, values, unknown, {}, prefix)
        if account is not None:
            # What __init__ was given as the defaults is derived when read (_Derivable).
            own_files: list[str] = []
            for field_name, _ in _DERIVABLE:
                if getattr(account, field_name) is defaults:
                    object.__delattr__(account, field_name)
                elif field_name in _FILE_SUFFIXES:
                    own_files.append(field_name)
            object.__setattr__(account, "_defaults", defaults)
            if own_files:
                object.__setattr__(account, "_own_files", frozenset(own_files))
        if (
            account is not None
            and not table
            and defaults.state_dir is not None
            and not self.problems
            and not unknown
        ):
            self.plain = tuple(item for item in vars(account).items() if item[0] != "name")
        return account

    def plain_account(self, name: str) -> AccountConfig:
        """An account without a table of its own: the first such account, renamed.

        A thousand such accounts would each be read through the schema and built field by
        field, to come out equal to the first but for the name, from which their files and
        options are derived (:class:`_AccountDefaults`). Its files are still claimed, so two
        accounts can never share one.
        """
        assert self.plain is not None
        account = object.__new__(AccountConfig)
        # The instance's attributes as __init__ sets them, in its order (so every account
        # shares one key table): what replace() would produce, minus the checks the first
        # account already passed (AccountConfig has no __post_init__).
        setattr_ = object.__setattr__
        setattr_(account, "name", name)
        for attribute, value in self.plain:
            setattr_(account, attribute, value)
        self.files.append(name)  # its three default files (check_distinct_files)
        return account

    def templates(
        self, value: Any, key: str, account: Mapping[str, Any]
    ) -> tuple[TemplateConfig, ...]:
        """[[accounts.NAME.templates]]: read and check every source, so a bad one fails here."""
        from .templates import TemplateProblem, compile_template, read_template_source

        example = 'e.g. [[accounts.me.templates]] source = "bot.conf.tmpl", destination = "..."'
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.problem(key, f"expected a list of tables, {example}; got {_describe(value)}")
            return ()
        result: list[TemplateConfig] = []
        for index, table in enumerate(value):
            where = f"{key}[{index}]"
            self.known_keys(table, _schema(TemplateConfig).keys, where)
            values, unknown = self.read(TemplateConfig, _settings(table, where), where)
            for name, field_key, spec in _schema(TemplateConfig).values:
                if field_key in table:
                    continue
                if spec.inherit in account:
                    values[name] = account[spec.inherit]
                elif spec.inherit:
                    unknown.add(name)
                elif name in _schema(TemplateConfig).required:
                    self.problem(f"{where}.{field_key}", f"missing; {example}")
            self.claim_files(TemplateConfig, values, where, explicit=table)
            source = values.get("source")
            if source is not None:
                text = ""
                try:
                    text = read_template_source(source)
                    # Unknown, the refresh token is allowed: no second problem for one mistake.
                    include = account.get("include_refresh_token", True)
                    compile_template(text, refresh_token_allowed=include)
                    values["text"] = text
                except TemplateProblem as exc:
                    self.problem(f"{where}.source", f"{source}: {exc}" if text else str(exc))
                    unknown.add("source")
            template = self.finish(TemplateConfig, values, unknown, {}, where)
            if template is not None and not unknown:
                result.append(template)
        return tuple(result)

    def claim_files(
        self, cls: type[Any], values: Mapping[str, Any], prefix: str, explicit: Mapping[str, Any]
    ) -> None:
        """Note the files of ``cls`` that only this account may use (check_distinct_files)."""
        for name, key, spec in _schema(cls).values:
            file = values.get(name)
            if not spec.own_file or file is None:
                continue
            if isinstance(file, _AccountDefaults):  # a default file, known by its text
                text = file.text(values["name"], spec.default_name)
            else:
                text = str(file)
            self.files.append((f"{prefix}.{key}", text, key in explicit))

    def check_directories(self, values: Mapping[str, Any]) -> None:
        """The state and runtime directories must not be files, and the API socket's path
        must fit a Unix socket address: each passed the check before, and then `run` failed
        (or ran with its API off) at every start."""
        for name in ("state_dir", "runtime_dir"):
            directory = values.get(name)
            if isinstance(directory, Path) and _is_non_directory(directory):
                self.problem(
                    f"paths.{name}",
                    f"{directory} is a file, not a directory; choose another path or move it",
                )
        runtime_dir, api = values.get("runtime_dir"), values.get("api")
        if not isinstance(runtime_dir, Path) or not isinstance(api, ApiSettings):
            return
        socket_path = paths.api_socket_path(runtime_dir, api.socket)
        size = len(os.fsencode(socket_path))
        if size >= paths.SUN_PATH_MAX:
            self.problem(
                "api.socket" if api.socket is not None else "paths.runtime_dir",
                f"the API socket {socket_path} is {size} bytes long; a Unix socket's path holds"
                f" at most {paths.SUN_PATH_MAX - 1} bytes: set api.socket or paths.runtime_dir"
                " to a shorter path",
            )

    def check_distinct_files(self) -> None:
        """Two accounts (or two roles) sharing a file would overwrite each other's tokens."""
        # Keyed by the text (equal for equal POSIX paths): no Path is made or hashed for a
        # thousand accounts' three files each. Who has a file: its key path, (key path, None)
        # for a default file, (account, key) for a default one of an account without a table.
        seen: dict[str, str | tuple[str, str | None]] = {}
        if self.source is not None:  # a login would write the tokens over the configuration
            seen[os.path.abspath(self.source)] = "the config file itself"

        def clash(key: str, text: str) -> None:
            who = seen[text]
            if isinstance(who, tuple):
                first, key_name = who
                who = f"{first if key_name is None else f'accounts.{first}.{key_name}'} (default)"
            self.problem(
                key,
                f"{text} is also used as {who}; every account needs its own state, token and "
                "lock files",
            )

        defaults = self.defaults
        # Two accounts' default files differ by the name (which has no "."), so those of an
        # account without a table can only meet a file set explicitly in the state directory.
        explicit_there = any(
            not isinstance(entry, str) and entry[2] and entry[1].startswith(defaults.prefix)
            for entry in self.files
        )
        for entry in self.files:
            if isinstance(entry, str):  # an account without a table: its default files
                if not explicit_there:
                    continue
                for _, key, suffix in _DEFAULT_FILES:
                    text = defaults.text(entry, suffix)
                    if text in seen:
                        clash(f"accounts.{entry}.{key}", text)
                    else:
                        seen[text] = (entry, key)
                continue
            key, text, explicit = entry
            if text in seen:
                clash(key, text)
            else:
                seen[text] = key if explicit else (key, None)

    # -- secrets ------------------------------------------------------------------------------

    def secret(
        self, settings: Mapping[str, _Setting], name: str, *, missing_prefix: str, required: bool
    ) -> tuple[str | None, str | None]:
        """Resolve one secret (see SECRETS) from exactly one of its sources; return
        (value, where it came from) or (None, None) when it is not set or unusable."""
        spec = _SECRET_SPECS[name]
        sources = spec.sources()
        given = [(key, setting) for key, setting in settings.items() if key in sources]
        if len(given) > 1:
            keys = " and ".join(key for key, _ in given)
            self.problem(given[1][1][1], f"{keys} are both set; give only one source for {name}")
            return None, None
        if not self.with_secrets:
            # Paths-only load: never open a secret (it may be unreadable to this user).
            return ("" if required else None), "not loaded"
        default = self.credentials_dir / name if self.credentials_dir else None
        if given:
            key, (value, key_path) = given[0]
        elif default is not None and default.is_file():
            # systemd LoadCredential=NAME:... with the conventional name needs no setting.
            key, value, key_path = f"{name}_credential", name, f"{missing_prefix}.{name}"
        else:
            if required:
                self.problem(
                    f"{missing_prefix}.{name}",
                    f"missing; set {name}_file (a file holding only the key, mode 600), "
                    f"{name}_env (an environment variable), or {name}_credential (systemd "
                    "LoadCredential=); find it in Kakao Developers > App > App Keys",
                )
            return None, None
        try:
            return self.read_source(spec, key, value)
        except ValueError as exc:
            self.problem(key_path, str(exc))
            return None, None

    def read_source(self, spec: SecretSpec, key: str, value: Any) -> tuple[str, str]:
        """Read a secret from its setting ``key`` = ``value``: return (secret, its source).

        Raises ValueError naming the problem, never the secret.
        """
        name = spec.name
        if key == name:
            if not isinstance(value, str):
                # Never echo it: a mistyped secret is still a secret.
                raise ValueError(f"expected the {name} as a string (value not shown)")
            mode = _file_mode(self.source) if spec.private and self.source is not None else None
            if mode is not None and mode & 0o077:
                raise ValueError(
                    f"is written inline in {self.source}, which is readable by group/others "
                    f"(mode {mode:04o}); move it to {name}_file or run: chmod 600 {self.source}"
                )
            return _clean_secret(value, spec, "the value"), "inline"
        if key == f"{name}_file":
            file = self.resolve(_path(value))
            trusted = self.credentials_dir is not None and file.is_relative_to(self.credentials_dir)
            return _read_secret(file, spec, trusted=trusted), f"file {file}"
        if key == f"{name}_env":
            variable = _string(value, "an environment variable name")
            if variable not in self.environ:
                raise ValueError(
                    f"environment variable {variable} is not set; export it, or use "
                    f"{name}_file instead"
                )
            where = f"environment variable {variable}"
            return _clean_secret(self.environ[variable], spec, where), f"env {variable}"
        credential = _string(value, "a credential name")
        if "/" in credential or credential in (".", ".."):
            raise ValueError(
                f'expected a plain credential name like "{name}", got {_describe(credential)}'
            )
        if self.credentials_dir is None:
            raise ValueError(
                "$CREDENTIALS_DIRECTORY is not set: credentials exist only inside a systemd "
                f"unit with LoadCredential={credential}:/path; outside systemd use {name}_file"
            )
        file = self.credentials_dir / credential
        missing = (
            f"credential {credential} not found in $CREDENTIALS_DIRECTORY ({file}); add "
            f"LoadCredential={credential}:/path/to/file to the unit"
        )
        # Files systemd put in $CREDENTIALS_DIRECTORY are trusted as they are.
        return _read_secret(file, spec, trusted=True, missing=missing), f"credential {credential}"


#: The largest secret file read: a key, a secret, a DSN or a few keyring lines are far less.
#: A bigger file is a mistake (a log, a dump), not to be read whole nor sent to Kakao.
MAX_SECRET_BYTES: Final = 64 * 1024


def _read_secret(file: Path, spec: SecretSpec, *, trusted: bool, missing: str = "") -> str:
    """Read a secret file (mode 600 unless ``trusted``); ValueError never shows its content.

    Opened non-blocking and judged by ``fstat``: a named pipe is refused at once, and what is
    read is the file that was judged.
    """
    try:
        info, data = _read_without_waiting(file, MAX_SECRET_BYTES)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{file} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if not trusted and mode & 0o077:
            what = "readable" if mode & 0o044 else "accessible"
            raise ValueError(
                f"{file} is {what} by group/others (mode {mode:04o}); run: chmod 600 {file}"
            )
        if len(data) > MAX_SECRET_BYTES:
            raise ValueError(
                f"{file} is larger than {MAX_SECRET_BYTES // 1024} KiB; it must hold only the"
                f" {spec.name}"
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ValueError(
            missing
            or f"{file} does not exist; put the {spec.name} in it (one line) and run: "
            f"chmod 600 {file}"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; it must hold only the {spec.name}") from None
    return _clean_secret(text.rstrip("\r\n"), spec, str(file))


def _clean_secret(value: str, spec: SecretSpec, where: str) -> str:
    """Refuse empty or multi-word secrets without ever echoing the value.

    A leading byte-order mark (an editor saving "UTF-8 with BOM") is dropped: it is invisible,
    and sent along it makes Kakao refuse a key that looks right.
    """
    value = value.removeprefix("\ufeff")
    if not value:
        raise ValueError(f"{where} is empty; it must hold the {spec.name}")
    if any(ch.isspace() for ch in value) and not spec.multiword:
        raise ValueError(
            f"{where} contains spaces or several lines; it must hold only the {spec.name} "
            "(value not shown)"
        )
    return value
