"""Translations: every alert text has its Korean, the catalogs are built, the locale decides."""

from __future__ import annotations

import gettext
import io
import json
import logging
import shutil
import string
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po
from hypothesis import given
from hypothesis import strategies as st

from kakao_tokend import i18n
from kakao_tokend.i18n import N_, Duration, Message, language_from_locale, resolve_language

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "daemon" / "kakao_tokend"
KOREAN_PO = PACKAGE / "locale" / "ko" / "LC_MESSAGES" / "kakao_tokend.po"
MO_IN_WHEEL = "kakao_tokend/locale/ko/LC_MESSAGES/kakao_tokend.mo"


def korean_catalog() -> Catalog:
    """Return the committed Korean catalog."""
    with KOREAN_PO.open("rb") as source:
        return read_po(source)


def placeholders(text: str) -> set[str]:
    """Return the ``{name}`` fields of a str.format template."""
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def has_words(text: str) -> bool:
    """True when ``text`` has letters outside its placeholders (so it needs translating)."""
    bare = "".join(literal for literal, _, _, _ in string.Formatter().parse(text))
    return any(ch.isalpha() for ch in bare)


def is_hangul(ch: str) -> bool:
    """True for a Hangul syllable or letter."""
    return unicodedata.name(ch, "").startswith("HANGUL")


def test_every_message_in_the_code_has_a_korean_translation_with_the_same_placeholders() -> None:
    """The msgids Babel extracts from the package are exactly those of the Korean catalog
    (none missing, none stale); each has a Korean text that is not fuzzy, is written in
    Hangul when the English has words, and uses exactly the English placeholders.
    """
    extracted = {
        message
        for _, _, message, _, _ in extract_from_dir(
            str(PACKAGE), keywords={"N_": None}, comment_tags=()
        )
    }
    assert extracted, "no N_() messages found: did the keyword change?"
    catalog = korean_catalog()
    translated = {message.id: message for message in catalog if message.id}
    assert sorted(extracted - set(translated)) == [], "missing: update the .po (README)"
    assert sorted(set(translated) - extracted) == [], "stale: no longer in the code"
    for msgid, message in translated.items():
        assert isinstance(msgid, str) and isinstance(message.string, str), msgid
        assert message.string, f"no Korean for {msgid!r}"
        assert not message.fuzzy, f"fuzzy (unchecked) Korean for {msgid!r}"
        assert placeholders(message.string) == placeholders(msgid), msgid
        if has_words(msgid):
            assert any(is_hangul(ch) for ch in message.string), msgid


def test_the_installed_package_reads_the_compiled_catalog_of_the_committed_po() -> None:
    """The build step compiled the .po that is committed: gettext, reading the installed .mo,
    returns every Korean text of the .po (a stale or missing .mo fails here; rebuild with
    `pip install -e .`).
    """
    translation = gettext.translation(i18n.DOMAIN, i18n.LOCALE_DIR, languages=["ko"])
    for message in korean_catalog():
        if message.id:
            assert translation.gettext(str(message.id)) == message.string, message.id


def test_no_compiled_catalog_is_committed() -> None:
    """Only .po sources are in git; the .mo files come from the build."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "*.mo"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert tracked == ""


@pytest.mark.slow(seconds=20)
@pytest.mark.timeout(300)
def test_a_wheel_built_from_a_clean_checkout_carries_the_korean_catalog(tmp_path: Path) -> None:
    """A wheel built from exactly the files git tracks (no .mo among them) contains the
    compiled Korean catalog, and it translates.
    """
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    source = tmp_path / "checkout"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    assert not list(source.rglob("*.mo"))
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("kakao_tokend-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert MO_IN_WHEEL in archive.namelist()
        compiled = gettext.GNUTranslations(io.BytesIO(archive.read(MO_IN_WHEEL)))
    assert compiled.gettext("CRITICAL") == "긴급"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "en"),
        ({"LANG": "ko_KR.UTF-8"}, "ko"),
        ({"LANG": "ko"}, "ko"),
        ({"LANG": "en_US.UTF-8"}, "en"),
        ({"LANG": "C.UTF-8"}, "en"),
        ({"LC_MESSAGES": "ko_KR.UTF-8", "LANG": "en_US.UTF-8"}, "ko"),
        ({"LC_ALL": "C", "LC_MESSAGES": "ko_KR.UTF-8", "LANG": "ko_KR.UTF-8"}, "en"),
        ({"LC_ALL": "ko_KR.eucKR", "LANG": "en_US.UTF-8"}, "ko"),
        ({"LC_ALL": "", "LC_MESSAGES": "", "LANG": "ko_KR.UTF-8"}, "ko"),
        # GNU gettext's LANGUAGE: a priority list over the locale, ignored under C/POSIX.
        ({"LANG": "C.UTF-8", "LANGUAGE": "ko"}, "ko"),
        ({"LC_MESSAGES": "C.utf8", "LANGUAGE": "ko"}, "ko"),
        ({"LANG": "C", "LANGUAGE": "ko"}, "en"),
        ({"LC_ALL": "POSIX", "LANG": "ko_KR.UTF-8", "LANGUAGE": "ko"}, "en"),
        ({"LANGUAGE": "ko"}, "en"),  # no locale at all is the C locale
        ({"LANG": "ko_KR.UTF-8", "LANGUAGE": "en"}, "en"),
        ({"LANG": "en_US.UTF-8", "LANGUAGE": "fr:ko_KR"}, "ko"),  # the first one we speak
        ({"LANG": "en_US.UTF-8", "LANGUAGE": "en:ko"}, "en"),
        ({"LANG": "ko_KR.UTF-8", "LANGUAGE": "fr"}, "en"),  # none we speak: untranslated
        ({"LANG": "ko_KR.UTF-8", "LANGUAGE": ""}, "ko"),
        ({"LANG": "ko_KR.UTF-8", "LANGUAGE": "::"}, "ko"),
    ],
)
def test_the_language_follows_the_message_locale(environ: dict[str, str], expected: str) -> None:
    """As GNU gettext chooses: the message locale is the first non-empty of LC_ALL,
    LC_MESSAGES and LANG; unless it is C or POSIX (or none is set), LANGUAGE's list comes
    first and its first language we have decides, English when none is. Korean → "ko"."""
    assert language_from_locale(environ) == expected
    assert resolve_language(None, environ) == expected


def test_a_configured_language_wins_over_the_locale() -> None:
    """[alerts] language = "en" under a Korean locale, and "ko" under an English one."""
    assert resolve_language("en", {"LANG": "ko_KR.UTF-8"}) == "en"
    assert resolve_language("ko", {"LANG": "en_US.UTF-8"}) == "ko"


@pytest.mark.parametrize(
    ("seconds", "english", "korean"),
    [
        (41 * 86400, "41d", "41일"),
        (86400 + 3 * 3600, "1d3h", "1일 3시간"),
        (4 * 3600 + 12 * 60, "4h12m", "4시간 12분"),
        (2 * 3600, "2h00m", "2시간"),
        (185, "3m05s", "3분 5초"),
        (0, "0s", "0초"),
        (0.5, "0.5s", "0.5초"),
        (-12, "-12s", "-12초"),
    ],
)
def test_durations_read_naturally_in_both_languages(
    seconds: float, english: str, korean: str
) -> None:
    """A Duration is rendered with the compact English units or Korean unit words."""
    assert Duration(seconds).render("en") == english
    assert Duration(seconds).render("ko") == korean


def test_a_message_is_rendered_per_language_with_nested_values() -> None:
    """Values that are messages or durations are rendered in the message's language."""
    inner = N_("run `{command}`", command="kakao-tokend login")
    message = N_("Fix: {action}", action=inner)
    assert str(message) == "Fix: run `kakao-tokend login`"
    assert message.render("ko") == "조치: `kakao-tokend login` 실행"
    left = N_("the refresh token expires in {left} and was not renewed", left=Duration(7200))
    assert left.render("ko") == "리프레시 토큰이 2시간 후 만료되는데 아직 새로 발급되지 않았습니다"


@pytest.mark.parametrize(
    ("message", "korean"),
    [
        # A Korean newcomer's audit (2026-12-05): these read as translated.
        (
            N_(
                "the refresh token expired at {expiry} before it could be renewed; a new login"
                " is needed",
                expiry="2026-12-05 09:00 KST",
            ),
            "리프레시 토큰이 갱신되지 못한 채 2026-12-05 09:00 KST에 만료되었습니다."
            " 다시 로그인해야 합니다",
        ),
        (
            N_(
                "cannot write the token files for consumers ({error}); they read an older token",
                error="disk full",
            ),
            "다른 프로그램이 읽는 토큰 파일을 쓸 수 없습니다(disk full)."
            " 그 프로그램들은 예전 토큰을 읽고 있습니다",
        ),
        (N_("cannot write the token files"), "다른 프로그램이 읽는 토큰 파일을 쓸 수 없습니다"),
        (
            N_("More in the log: {log}", log=Message.verbatim("`journalctl -u kakao-tokend`")),
            "자세한 내용은 로그 참고: `journalctl -u kakao-tokend`",
        ),
        (N_("Fix: {action}", action=N_("nothing to do")), "조치: 필요 없음"),
        (
            N_("watch `{command}`", command="kakao-tokend status"),
            "`kakao-tokend status`로 상태를 확인하세요",
        ),
        # 알림 is the whole feature's name: an INFO alert's title says 안내.
        (N_("INFO"), "안내"),
        (
            N_("Kakao rejects the app configuration ({reason})", reason="KOE101"),
            "카카오 앱 설정이 맞지 않습니다(KOE101)",
        ),
    ],
)
def test_korean_texts_read_as_written_in_korean(message: Message, korean: str) -> None:
    """The Korean of these texts says what a Korean writer would, not a word-for-word
    translation of the English."""
    assert message.render("ko") == korean


def test_a_verbatim_text_is_never_translated_or_formatted() -> None:
    """Text from outside the catalog (braces and all) is shown exactly as given."""
    text = Message.verbatim("CRITICAL {not a placeholder}")
    assert text.render("ko") == text.render("en") == "CRITICAL {not a placeholder}"


values = st.recursive(
    st.text(max_size=20)
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(min_value=-1e7, max_value=1e7).map(Duration),
    lambda inner: st.builds(
        lambda msgid, items: Message(msgid, tuple(items.items())),
        st.text(min_size=1, max_size=20),
        st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3),
    ),
    max_leaves=8,
)


@given(
    msgid=st.text(min_size=1, max_size=40),
    items=st.dictionaries(st.text(min_size=1, max_size=6), values, max_size=4),
)
def test_messages_survive_the_bookkeeping_round_trip(msgid: str, items: dict[str, object]) -> None:
    """to_json/from_json gives back an equal message, nested messages and durations included
    (alerts.json keeps the texts of active alerts across restarts this way).
    """
    message = Message(msgid, tuple(items.items()))  # type: ignore[arg-type]
    assert Message.from_json(json.loads(json.dumps(message.to_json()))) == message


@pytest.mark.parametrize(
    "document",
    [
        *(None, "text", [], {}, {"id": ""}, {"id": 3}, {"id": "x", "values": []}),
        {"id": "x", "values": {"a": []}},
        {"id": "x", "values": {"a": {"seconds": float("nan")}}},
    ],
)
def test_a_damaged_saved_message_is_refused_not_raised(document: object) -> None:
    """Anything but to_json's shape (a hand-edited alerts.json) reads back as None."""
    assert Message.from_json(document) is None


def test_a_catalog_text_with_wrong_placeholders_falls_back_to_english(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should a translation name a placeholder the code does not give, the English text is
    sent rather than nothing (the catalog test keeps this from happening).
    """

    class Broken(gettext.NullTranslations):
        def gettext(self, message: str) -> str:
            return "{missing} 깨짐"

    monkeypatch.setattr(i18n, "translations", lambda language: Broken())
    assert N_("cleared: {what}", what="x").render("ko") == "cleared: x"


def test_a_package_built_without_its_catalogs_sends_english_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the .mo is missing (a copy of the sources without the build step), Korean texts
    fall back to English and one warning names the missing file and the fix.
    """
    caplog.set_level(logging.WARNING, logger="kakao_tokend.i18n")
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    i18n.translations.cache_clear()
    try:
        assert N_("CRITICAL").render("ko") == "CRITICAL"
        assert N_("WARNING").render("ko") == "WARNING"
    finally:
        i18n.translations.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert str(tmp_path / "ko" / "LC_MESSAGES" / "kakao_tokend.mo") in warnings[0]
    assert "reinstall kakao-tokend with pip" in warnings[0]
