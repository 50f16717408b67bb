"""Logging setup: journald priority prefixes under systemd, readable local-time lines elsewhere."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import TextIO

__all__ = [
    "LEVELS",
    "JournalFormatter",
    "RedactingFilter",
    "redact",
    "setup_logging",
    "stderr_is_journal",
]

#: Accepted ``log_level`` names (config and ``--log-level``), lowest first.
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Loggers that are too chatty at INFO: APScheduler logs every job run, aiohttp every request.
QUIET_LOGGERS = ("apscheduler", "aiohttp.access")

TERMINAL_FORMAT = "%(asctime)s %(levelname)-5s %(message)s"
#: Local time with the zone's name (as tokens.format_local_time writes times in messages).
TERMINAL_DATEFMT = "%Y-%m-%d %H:%M:%S %Z"

_log = logging.getLogger("kakao_tokend")


def stderr_is_journal(environ: Mapping[str, str] | None = None, *, fd: int = 2) -> bool:
    """Is ``fd`` (stderr by default) connected to journald?

    systemd sets ``JOURNAL_STREAM=<dev>:<ino>`` for the stream it connects to the journal
    (systemd.exec(5)); it is inherited by children whose stderr may be redirected elsewhere, so
    compare it with what ``fd`` really is.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


# --- redaction ------------------------------------------------------------------------------------
# The primary rule is that tokens are NEVER logged: code names a token by
# kakao_tokend.tokens.fingerprint(). This filter is only a safety net for mistakes (an exception
# message quoting a request body, a URL with ?access_token=...), so a slip does not end up in the
# journal that every member of systemd-journal / adm can read.

_SECRET_KEYS = r"access_token|refresh_token|id_token|client_secret|code_verifier"
_FINGERPRINT = r"sha256:[0-9a-f]{8}\b"
# A key name at the end of a file name (``/out/default.access_token: No space left on device``,
# the documented access_token_file example) is a path followed by an error, not ``key: value``:
# after ``.``, ``/`` or ``-`` only the ``key=value`` form counts.
_NOT_A_FILE_NAME = rf"""(?:(?<![./-])|(?=(?:{_SECRET_KEYS})["']?\s*=))"""
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # access_token=abc / "refresh_token": "abc" / 'id_token': 'abc' / refresh_token: abc
    (
        re.compile(
            rf"""(?i)\b{_NOT_A_FILE_NAME}({_SECRET_KEYS})(["']?\s*[:=]\s*["']?)"""
            rf"""(?!{_FINGERPRINT}|\[redacted\])[^\s"'&,;)}}\]]+"""
        ),
        r"\1\2[redacted]",
    ),
    # Authorization: Bearer abc / KakaoAK abc (the admin key form)
    (
        re.compile(r"(?i)\b(bearer|kakaoak)(\s+)(?!\[redacted\])[A-Za-z0-9\-._~+/=]{16,}"),
        r"\1\2[redacted]",
    ),
)


def redact(text: str) -> str:
    """Replace anything that looks like a bearer token or ``*_token=`` value with ``[redacted]``."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Redact token-looking values from a record's message and traceback (belt and braces)."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format: let the handler report it as logging normally does
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Formatter.format() reuses exc_text when it is set, so the redacted text is printed.
            record.exc_text = redact(self._formatter.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# --- formatters -----------------------------------------------------------------------------------

_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def syslog_priority(levelno: int) -> int:
    """Map a logging level to a syslog priority: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>message`` on every line (journald splits lines); no timestamp (journald adds one)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


_HANDLER_MARK = "_kakao_tokend_handler"


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """Log an uncaught exception at CRITICAL (the default hook's output lands at PRIORITY=6)."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    _log.critical("uncaught exception, exiting", exc_info=(exc_type, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """Log an exception that ended a thread at CRITICAL instead of printing it raw."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    _log.critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def _enable_faulthandler(stream: TextIO) -> None:
    """Dump Python stacks on SIGABRT/SIGSEGV (the watchdog kills with SIGABRT) to ``stream``.

    The dump is written raw by C code, so under journald it is stored at PRIORITY=6 unprefixed.
    """
    try:
        faulthandler.enable(file=stream)
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        # stream without a real file descriptor (tests' StringIO): fall back to fd 2 if possible
        with contextlib.suppress(AttributeError, ValueError, OSError, io.UnsupportedOperation):
            faulthandler.enable()


def setup_logging(level: str = "info", *, stream: TextIO | None = None) -> None:
    """Configure the root logger once for the whole process (safe to call again, e.g. on reload).

    ``level`` is one of :data:`LEVELS` (case-insensitive); ``stream`` defaults to ``sys.stderr``.
    When that stream is the journal, every line gets a ``<N>`` priority prefix and no timestamp;
    otherwise lines look like ``2026-11-26 13:05:01 KST INFO  message`` in local time.
    Also routes uncaught exceptions (main thread and other threads) through logging at CRITICAL,
    enables faulthandler, quiets APScheduler and aiohttp.access to WARNING, and installs a
    :class:`RedactingFilter` safety net.
    """
    levelno = LEVELS.get(level.strip().lower())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    out: TextIO = sys.stderr if stream is None else stream
    try:
        fd = out.fileno()
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        fd = -1
    journal = fd >= 0 and stderr_is_journal(fd=fd)

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT, TERMINAL_DATEFMT)
    )
    handler.addFilter(RedactingFilter())
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(levelno, logging.WARNING))

    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    _enable_faulthandler(out)
