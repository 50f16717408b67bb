"""Translated texts: gettext catalogs, the language choice, and messages rendered per language.

Texts that a person reads away from the server (the alerts: KakaoTalk on a phone, a webhook, a
command) are written as :func:`N_` messages: an English msgid with ``{name}`` placeholders and
their values. They are rendered only when sent, in the account's ``[alerts] language``, so the
same alert can go to the (English) log and to a Korean phone. The catalogs live next to this
module (``locale/<lang>/LC_MESSAGES/kakao_tokend.po``) and are compiled to ``.mo`` files when
the package is built or installed (``setup.py``'s ``build_catalogs`` step), never committed.
"""

from __future__ import annotations

import functools
import gettext
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from .tokens import format_duration

log = logging.getLogger(__name__)

Language = Literal["en", "ko"]
#: Every language the alerts can be written in; English is the msgids themselves.
LANGUAGES: Final[tuple[Language, ...]] = ("en", "ko")
#: The gettext domain: ``locale/<lang>/LC_MESSAGES/<DOMAIN>.mo``.
DOMAIN: Final = "kakao_tokend"
LOCALE_DIR: Final = Path(__file__).with_name("locale")
#: The variables that name the message locale, strongest first (the POSIX order).
LOCALE_VARIABLES: Final = ("LC_ALL", "LC_MESSAGES", "LANG")
#: GNU gettext's priority list of languages ("ko:en"), read before the locale unless that
#: is C or POSIX.
LANGUAGE_VARIABLE: Final = "LANGUAGE"
#: The message locales under which GNU gettext ignores LANGUAGE (C.UTF-8 is not one).
_C_LOCALES: Final = frozenset({"", "C", "POSIX"})

#: Korean unit words for format_duration's compact units ("4h12m" → "4시간 12분").
_KO_UNITS: Final = {"d": "일", "h": "시간", "m": "분", "s": "초"}
_DURATION_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([dhms])")


def language_from_locale(environ: Mapping[str, str] | None = None) -> Language:
    """Return the language the environment asks messages in, "ko" or "en", as GNU gettext
    chooses a catalog.

    The message locale is the first non-empty of LC_ALL, LC_MESSAGES and LANG (under systemd
    the system locale, ``/etc/locale.conf``, unless the unit sets one). Unless it is C or
    POSIX (or none is set), LANGUAGE's list (``ko:en``) comes first: its first language we
    have decides, and English (the untranslated texts) when it names none of them. Otherwise
    the locale's language does: ``ko_KR.UTF-8`` or ``ko`` is Korean, anything else English.
    """
    env = os.environ if environ is None else environ
    locale = next((value for name in LOCALE_VARIABLES if (value := env.get(name, ""))), "")
    wanted = [part for part in env.get(LANGUAGE_VARIABLE, "").split(":") if part]
    if wanted and locale not in _C_LOCALES:
        return next((found for part in wanted if (found := _language(part))), "en")
    return _language(locale) or "en"


def _language(name: str) -> Language | None:
    """Return the language a locale or LANGUAGE entry names, if we have it (``ko_KR.UTF-8``
    → "ko", ``en_GB`` → "en"; English is the texts themselves)."""
    code = name.split("_")[0].split(".")[0].split("@")[0].lower()
    return code if code in LANGUAGES else None


def resolve_language(configured: str | None, environ: Mapping[str, str] | None = None) -> Language:
    """Return the configured language, or the locale's when none is configured."""
    if configured in LANGUAGES:
        return configured
    return language_from_locale(environ)


@functools.cache
def translations(language: Language) -> gettext.NullTranslations:
    """Return the compiled catalog for ``language`` (English needs none)."""
    if language == "en":
        return gettext.NullTranslations()
    try:
        return gettext.translation(DOMAIN, LOCALE_DIR, languages=[language])
    except OSError:
        # Only a package built without its build step lacks the .mo; say so once, stay usable.
        log.warning(
            "the %s message catalog is missing (%s/%s/LC_MESSAGES/%s.mo): reinstall kakao-tokend"
            " with pip so its build step compiles it; alerts are sent in English until then",
            language,
            LOCALE_DIR,
            language,
            DOMAIN,
        )
        return gettext.NullTranslations()


@dataclass(frozen=True)
class Duration:
    """A length of time inside a message, rendered in the message's language."""

    seconds: float

    def render(self, language: Language) -> str:
        """Return ``4h12m``/``2h00m`` in English, ``4시간 12분``/``2시간`` in Korean."""
        text = format_duration(self.seconds)
        if language != "ko":
            return text
        sign = "-" if text.startswith("-") else ""
        parts = [(float(n), unit) for n, unit in _DURATION_PART_RE.findall(text)]
        # "2h00m" reads "2시간", not "2시간 0분"; "0.5s" (seconds-long tokens) reads "0.5초".
        shown = [f"{n:g}{_KO_UNITS[unit]}" for n, unit in parts if n] or ["0초"]
        return sign + " ".join(shown)


Value: TypeAlias = "str | int | Duration | Message"


@dataclass(frozen=True)
class Message:
    """An English msgid with ``{name}`` placeholders, and their values; rendered on demand.

    ``translate=False`` marks a text that is not in the catalog (e.g. read back from an older
    bookkeeping file): it is shown as it is.
    """

    msgid: str
    values: tuple[tuple[str, Value], ...] = ()
    translate: bool = True

    @classmethod
    def verbatim(cls, text: str) -> Message:
        """Return a message shown exactly as ``text`` in every language."""
        return cls(text, (), translate=False)

    def render(self, language: Language = "en") -> str:
        """Return the text in ``language`` (English when the catalog lacks it)."""
        if not self.translate:
            return self.msgid
        values = {name: _render_value(value, language) for name, value in self.values}
        template = translations(language).gettext(self.msgid)
        for candidate in (template, self.msgid):
            try:
                return candidate.format_map(values)
            except (KeyError, IndexError, ValueError):
                # A catalog whose placeholders do not match (a test forbids it): fall back.
                continue
        return self.msgid

    def __str__(self) -> str:
        return self.render("en")

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready form that :meth:`from_json` reads back."""
        if not self.translate:
            return {"text": self.msgid}
        return {"id": self.msgid, "values": {k: _value_to_json(v) for k, v in self.values}}

    @classmethod
    def from_json(cls, data: Any) -> Message | None:
        """Read :meth:`to_json`'s form; None for anything else (a hand-edited file)."""
        if not isinstance(data, dict):
            return None
        if isinstance(data.get("text"), str):
            return cls.verbatim(data["text"])
        msgid, raw = data.get("id"), data.get("values", {})
        if not isinstance(msgid, str) or not msgid or not isinstance(raw, dict):
            return None
        values: list[tuple[str, Value]] = []
        for name, item in raw.items():
            value = _value_from_json(item)
            if not isinstance(name, str) or value is None:
                return None
            values.append((name, value))
        return cls(msgid, tuple(values))


def N_(msgid: str, /, **values: Value) -> Message:
    """Mark ``msgid`` for translation and bind its placeholder values.

    The name is gettext's convention for "mark now, translate later"; Babel extracts it.
    """
    return Message(msgid, tuple(values.items()))


def _render_value(value: Value, language: Language) -> str:
    if isinstance(value, Message | Duration):
        return value.render(language)
    return str(value)


def _value_to_json(value: Value) -> Any:
    if isinstance(value, Message):
        return {"message": value.to_json()}
    if isinstance(value, Duration):
        return {"seconds": value.seconds}
    return value


def _value_from_json(item: Any) -> Value | None:
    if isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool)):
        return item
    if isinstance(item, dict):
        seconds = item.get("seconds")
        if (
            isinstance(seconds, int | float)
            and not isinstance(seconds, bool)
            and math.isfinite(seconds)
        ):
            return Duration(float(seconds))
        return Message.from_json(item.get("message"))
    return None
