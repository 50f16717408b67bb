"""Templates: the account's token in any file, in the consumer's own format — the language.

Many programs want the token inside their own configuration file, not ours (Vault Agent's
most used feature). Per account, ``[[accounts.NAME.templates]]`` names a source file with
``{access_token}``-style placeholders and a destination. This module is the template language:
what a template may say, how it is checked (the config loader reports every problem at load
time) and what it renders to. Writing the destinations when the token changes is
:mod:`~kakao_tokend.template_runner`'s job.

The engine is :class:`string.Template` from the standard library with a brace pattern: only
``{name}`` with a known lowercase name is replaced, every other character (the braces of JSON,
``${HOME}`` of a shell script) is copied as it is, and there is no expression language at all,
so a template cannot run code or reach anything but the values below. ``{{`` writes a literal
``{`` for the rare file that needs the text ``{name}`` itself.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import string
from collections.abc import Mapping
from pathlib import Path

from .state import AccountState
from .tokens import format_time

log = logging.getLogger(__name__)

#: Every placeholder a template may use, with what it becomes (also the docs' source of truth).
PLACEHOLDERS: Mapping[str, str] = {
    "access_token": "the access token",
    "token_type": 'the token type Kakao gave ("bearer")',
    "expires_at": "when the access token expires, RFC 3339 in UTC (2026-12-02T02:10:10Z)",
    "expires_at_unix": "the same moment as Unix seconds",
    "expires_in": "the access token's lifetime in seconds, counted from issued_at (Kakao's field)",
    "issued_at": "when the access token was issued, RFC 3339 in UTC",
    "refresh_token_expires_at": "when the refresh token expires, RFC 3339 in UTC",
    "scope": "the granted consent items, space-separated (may be empty)",
    "generation": "grows by one with every new token set",
    "account": "the account's name",
    "refresh_token": "the refresh token; only with [publish] include_refresh_token = true",
}
#: Largest template source accepted: a configuration file, not a data set.
MAX_SOURCE_BYTES = 1024 * 1024


_PLACEHOLDER_PATTERN = r"""
    \{(?:
      (?P<escaped>\{)                      # {{  -> {
    | (?P<named>[a-z][a-z0-9_]*)\}         # {access_token}
    | (?P<braced>(?!))                     # unused
    | (?P<invalid>(?!))                    # nothing else is special
    )
"""
_PLACEHOLDER = re.compile(_PLACEHOLDER_PATTERN, re.VERBOSE)


class TokenTemplate(string.Template):
    """``{name}`` placeholders; anything else, including other braces, is copied verbatim."""

    delimiter = "{"  # what an escaped "{{" turns into
    flags = re.RegexFlag(0)  # case-sensitive: names are lowercase, so ${HOME} stays text
    # A string on purpose: Template compiles it (adding re.VERBOSE) when the class is created.
    pattern = _PLACEHOLDER_PATTERN  # type: ignore[assignment]


class TemplateProblem(ValueError):
    """A template that cannot be rendered; the message says where and how to fix it."""


_MUSTACHE = re.compile(r"\{\{\s*([a-z][a-z0-9_]*)\s*\}\}")


def compile_template(text: str, *, refresh_token_allowed: bool) -> TokenTemplate:
    """Return the template for ``text``; raise TemplateProblem naming the first bad placeholder.

    Every placeholder must be known (see :data:`PLACEHOLDERS`), so a template that passes this
    check always renders.
    """
    mustache = _MUSTACHE.search(text)
    if mustache and mustache.group(1) in PLACEHOLDERS:
        name = mustache.group(1)
        raise TemplateProblem(
            f"line {_line_of(text, mustache.start())}: {mustache.group(0)} is not a placeholder"
            f" here; write {{{name}}} with single braces"
        )
    template = TokenTemplate(text)
    for match in _PLACEHOLDER.finditer(text):
        name = match.group("named")
        if name is None or (
            name in PLACEHOLDERS and (name != "refresh_token" or refresh_token_allowed)
        ):
            continue
        line = _line_of(text, match.start())
        if name == "refresh_token":
            raise TemplateProblem(
                f"line {line}: {{refresh_token}} needs [publish] include_refresh_token = true"
                " (whoever reads the file can then mint tokens for two months)"
            )
        import difflib  # only for a mistake, as config._suggest

        close = difflib.get_close_matches(name, list(PLACEHOLDERS), n=1, cutoff=0.6)
        hint = f'; did you mean "{{{close[0]}}}"?' if close else ""
        raise TemplateProblem(
            f"line {line}: unknown placeholder {{{name}}}{hint} (known: "
            + ", ".join(f"{{{known}}}" for known in PLACEHOLDERS)
            + "; write {{ for a literal {)"
        )
    return template


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def read_template_source(path: Path) -> str:
    """Read a template source file as UTF-8 text; raise TemplateProblem with a readable reason.

    Opened without waiting: a FIFO (or a link to one) where the source should be is refused
    at once instead of stopping the config check, and with it `run` (store.read_file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise TemplateProblem(f"{path} is not a regular file")
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        raise TemplateProblem(f"{path} does not exist; create the template file") from None
    except OSError as exc:
        raise TemplateProblem(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise TemplateProblem(f"{path} is larger than {MAX_SOURCE_BYTES // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateProblem(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
        ) from None


def template_values(state: AccountState, *, include_refresh_token: bool) -> dict[str, str]:
    """Return what each placeholder becomes for ``state``.

    Nothing depends on the moment of rendering, so the same token set always renders to the
    same bytes, and a restart rewrites nothing (and runs no command).
    """
    tokens = state.tokens
    values = {
        "access_token": tokens.access_token,
        "token_type": tokens.token_type,
        "expires_at": format_time(tokens.access_expires_at),
        "expires_at_unix": str(int(tokens.access_expires_at.timestamp())),
        "expires_in": str(int(tokens.access_lifetime.total_seconds())),
        "issued_at": format_time(tokens.access_issued_at),
        "refresh_token_expires_at": format_time(tokens.refresh_expires_at),
        "scope": tokens.scope or "",
        "generation": str(state.generation),
        "account": state.account,
    }
    if include_refresh_token:
        values["refresh_token"] = tokens.refresh_token
    return values


def render(text: str, state: AccountState, *, include_refresh_token: bool) -> bytes:
    """Render a template's ``text`` for ``state`` (the config check made sure every name is
    known)."""
    compiled = compile_template(text, refresh_token_allowed=include_refresh_token)
    values = template_values(state, include_refresh_token=include_refresh_token)
    return compiled.substitute(values).encode("utf-8")
