"""Logging: journald priority prefixes, terminal format, excepthooks, token redaction."""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from kakao_tokend import logs
from kakao_tokend.tokens import fingerprint

ACCESS = "Xk3lP9qv0s8ZQe1Rr7tAaBbCcDdEeFfGgHhIiJjKk0000AAAAQ"
REFRESH = "uR2mN8bT4yV6wX0zA1cD3eF5gH7jK9lQ1wE3rT5yU7iO9pAAAAR"
PRIORITY_LINE = re.compile(r"^<[2-7]>")
TERMINAL_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ (DEBUG|INFO |WARNING|ERROR|CRITICAL) "
)


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment minus systemd's variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(extra)
    return env


def run_child(script: str, stderr_path: Path, *, journal: bool, **env: str) -> str:
    """Run ``script`` in a fresh Python whose stderr is a real file; return what it wrote.

    With ``journal`` the child's JOURNAL_STREAM names that file, exactly as systemd would name
    the journal stream it connected.
    """
    stderr_path.touch()
    st = os.stat(stderr_path)
    if journal:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    else:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"  # inherited, but not our stderr
    with stderr_path.open("wb") as err:
        subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            stderr=err,
            stdout=subprocess.DEVNULL,
            env=child_env(**env),
            timeout=60,
            check=False,
        )
    return stderr_path.read_text()


LOGGING_SCRIPT = """
    import logging
    from kakao_tokend.logs import setup_logging
    setup_logging("info")
    log = logging.getLogger("kakao_tokend.test")
    log.warning("token file is stale")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("refresh failed")
    log.info("still running\\nsecond line")
    log.debug("not shown at info")
"""


def test_journal_mode_prefixes_every_line_including_tracebacks(tmp_path: Path) -> None:
    """When stderr is the journal, each line (traceback too) starts <N> and has no timestamp."""
    out = run_child(LOGGING_SCRIPT, tmp_path / "stderr", journal=True)
    lines = out.splitlines()
    assert lines, out
    assert all(PRIORITY_LINE.match(line) for line in lines), out
    assert lines[0] == "<4>token file is stale"
    error_lines = [line for line in lines if line.startswith("<3>")]
    assert error_lines[0] == "<3>refresh failed"
    assert "<3>Traceback (most recent call last):" in error_lines
    assert error_lines[-1] == "<3>ValueError: boom"
    assert lines[-2:] == ["<6>still running", "<6>second line"]
    assert "not shown" not in out
    assert not re.search(r"\d\d:\d\d:\d\d", out)


def test_terminal_mode_uses_readable_local_time_lines(tmp_path: Path) -> None:
    """Not the journal (JOURNAL_STREAM inherited but not matching): 'YYYY-mm-dd HH:MM:SS ZONE
    LEVEL', the local time followed by the zone's name."""
    # A fixed-offset POSIX TZ (UTC+9, Korea), so "local time" is checkable without tzdata.
    out = run_child(LOGGING_SCRIPT, tmp_path / "stderr", journal=False, TZ="KST-9")
    lines = out.splitlines()
    assert not any(PRIORITY_LINE.match(line) for line in lines), out
    assert TERMINAL_LINE.match(lines[0])
    assert lines[0][19:24] == " KST ", lines[0]
    assert lines[0].endswith(" WARNING token file is stale")
    assert any(line.endswith(" INFO  still running") for line in lines)
    assert "Traceback (most recent call last):" in lines
    stamp = datetime.strptime(lines[0][:19], "%Y-%m-%d %H:%M:%S")
    korea_now = datetime.now(timezone(timedelta(hours=9))).replace(tzinfo=None)
    assert abs((korea_now - stamp).total_seconds()) < 30


def test_uncaught_exception_is_logged_critical_on_every_line(tmp_path: Path) -> None:
    """The excepthook routes a crash through logging: <2> on every traceback line, exit 1."""
    script = """
        from kakao_tokend.logs import setup_logging
        setup_logging("info")
        def load():
            raise RuntimeError("kaput")
        load()
    """
    out = run_child(script, tmp_path / "stderr", journal=True)
    lines = out.splitlines()
    assert len(lines) >= 4, out
    assert all(line.startswith("<2>") for line in lines), out
    assert "<2>Traceback (most recent call last):" in lines
    assert lines[-1] == "<2>RuntimeError: kaput"


def test_uncaught_exception_in_a_thread_is_logged_critical(tmp_path: Path) -> None:
    """A thread dying of an exception is logged at CRITICAL too, not printed raw (PRIORITY=6)."""
    script = """
        import threading
        from kakao_tokend.logs import setup_logging
        setup_logging("info")
        def work():
            raise OSError("disk gone")
        t = threading.Thread(target=work, name="writer")
        t.start(); t.join()
    """
    out = run_child(script, tmp_path / "stderr", journal=True)
    lines = out.splitlines()
    assert lines[0] == "<2>uncaught exception in thread writer"
    assert all(line.startswith("<2>") for line in lines), out
    assert lines[-1] == "<2>OSError: disk gone"


def test_faulthandler_is_enabled(tmp_path: Path) -> None:
    """setup_logging enables faulthandler so a watchdog SIGABRT dumps the stuck stack."""
    script = """
        import faulthandler, logging
        from kakao_tokend.logs import setup_logging
        setup_logging("info")
        logging.getLogger("x").warning("faulthandler=%s", faulthandler.is_enabled())
    """
    out = run_child(script, tmp_path / "stderr", journal=True)
    assert out.splitlines() == ["<4>faulthandler=True"]


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only if it names the very file the descriptor is open on."""
    path = tmp_path / "stream"
    with path.open("w") as f:
        st = os.fstat(f.fileno())
        fd = f.fileno()
        assert logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=fd)
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd=fd)
        assert not logs.stderr_is_journal({}, fd=fd)
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd=fd)
        assert not logs.stderr_is_journal({"JOURNAL_STREAM": "1:x"}, fd=fd)


def test_stderr_is_journal_with_a_pipe() -> None:
    """A pipe (both ends share one inode) also matches when JOURNAL_STREAM names it."""
    r, w = os.pipe()
    try:
        st = os.fstat(r)
        assert logs.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=w)
    finally:
        os.close(r)
        os.close(w)


# --- in-process: global logging state is saved and restored around each test --------------------


@pytest.fixture
def isolated_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore root handlers, levels and hooks afterwards; keep pytest's own faulthandler."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    monkeypatch.setattr(faulthandler, "enable", lambda *a, **k: None)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("isolated_logging")
def test_chatty_library_loggers_are_quieted() -> None:
    """APScheduler (logs every job run) and aiohttp.access stay at WARNING under INFO."""
    logs.setup_logging("info", stream=io.StringIO())
    assert logging.getLogger("apscheduler").level == logging.WARNING
    assert logging.getLogger("aiohttp.access").level == logging.WARNING
    assert logging.getLogger().level == logging.INFO


@pytest.mark.usefixtures("isolated_logging")
def test_setup_logging_twice_keeps_one_handler() -> None:
    """Calling setup_logging again (reload) replaces its handler instead of doubling lines."""
    first, second = io.StringIO(), io.StringIO()
    logs.setup_logging("info", stream=first)
    logs.setup_logging("DEBUG", stream=second)
    logging.getLogger("kakao_tokend.t").debug("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


def test_unknown_level_is_one_clear_error() -> None:
    """A bad level names the accepted values."""
    with pytest.raises(ValueError, match="unknown log level 'loud': use one of debug, info"):
        logs.setup_logging("loud")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer " + ACCESS, "Authorization: Bearer [redacted]"),
        (f"POST body access_token={ACCESS}&x=1", "POST body access_token=[redacted]&x=1"),
        (
            f'{{"access_token": "{ACCESS}", "refresh_token": "{REFRESH}"}}',
            '{"access_token": "[redacted]", "refresh_token": "[redacted]"}',
        ),
        (f"{{'refresh_token': '{REFRESH}'}}", "{'refresh_token': '[redacted]'}"),
        ("client_secret=s3cr3t-value", "client_secret=[redacted]"),
        ("KakaoAK 0123456789abcdef0123456789abcdef", "KakaoAK [redacted]"),
    ],
)
def test_redact_token_shapes(text: str, expected: str) -> None:
    """Bearer headers, form/query values, JSON and repr'd dicts lose the secret value."""
    assert logs.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        f"refresh_token={fingerprint(REFRESH)} rotated",
        "token_type bearer, expires in 21599 s",
        "refresh token rotated; next refresh at 2026-11-26T07:30:00Z",
    ],
)
def test_redact_leaves_safe_text_alone(text: str) -> None:
    """Fingerprints and ordinary prose about tokens are not mangled."""
    assert logs.redact(text) == text


@pytest.mark.parametrize(
    "path",
    [
        "/srv/app/out/default.access_token",
        "/run/app/access_token",
        "/srv/app/out/default-refresh_token",
    ],
)
def test_redact_keeps_an_error_about_a_file_named_like_a_token_key(path: str) -> None:
    """``PATH: strerror`` keeps the error when PATH ends in a key name (access_token_file example).

    The key pattern must not take the file name's tail for a key and the error's first word
    ("No" of "No space left on device") for its value.
    """
    text = f"cannot publish the tokens ({path}: No space left on device)"
    assert logs.redact(text) == text


def test_redact_still_hides_a_value_after_a_key_in_a_dotted_or_path_name() -> None:
    """``obj.access_token=VALUE`` and ``?access_token=VALUE`` are still values, not file names."""
    assert logs.redact(f"obj.access_token={ACCESS}") == "obj.access_token=[redacted]"
    assert logs.redact(f"/cb?access_token={ACCESS}") == "/cb?access_token=[redacted]"


@pytest.mark.usefixtures("isolated_logging")
def test_redacting_filter_covers_arguments_and_tracebacks() -> None:
    """A token passed as a %-argument or inside an exception message never reaches the output."""
    stream = io.StringIO()
    logs.setup_logging("info", stream=stream)
    log = logging.getLogger("kakao_tokend.t")
    log.info("sent Authorization: Bearer %s for %s", ACCESS, fingerprint(ACCESS))
    try:
        raise RuntimeError(f"bad response body refresh_token={REFRESH}")
    except RuntimeError:
        log.exception("refresh failed")
    out = stream.getvalue()
    assert ACCESS not in out
    assert REFRESH not in out
    assert f"INFO  sent Authorization: Bearer [redacted] for {fingerprint(ACCESS)}\n" in out
    assert "RuntimeError: bad response body refresh_token=[redacted]" in out
