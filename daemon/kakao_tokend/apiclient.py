"""The CLI's client for the daemon's local API on its Unix socket.

It speaks HTTP/1.1 with the standard library (http.client over AF_UNIX), not aiohttp: one
request per command needs no event-loop client, and importing aiohttp (about 0.13 s of CPU,
half of what `status` or `token` costs) made every such command slower for nothing. Even
http.client (with the email parser and ssl it imports) is imported only once a daemon
answers on the socket: without one, `status` and `token` read the files and never need it.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .config import load_locations
from .errors import KakaoTokendError
from .state import parse_json


class DaemonNotRunning(Exception):
    """Nothing accepts connections on the socket: the caller falls back to the files."""


class DaemonUnreachable(KakaoTokendError):
    """The socket exists (or may), but this user is not allowed to connect to it."""


class DaemonApiError(KakaoTokendError):
    """The daemon answered, but not with what was asked for (its JSON ``error`` is the message)."""

    def __init__(self, status: int, message: str, body: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def socket_path_without_secrets(
    config_path: Path | None, environ: Mapping[str, str] | None = None
) -> Path:
    """Locate the socket from the config file's [api] socket / [paths] runtime_dir alone.

    Reads no secret and ignores every other setting (config.load_locations), so it works
    where credentials are unreadable (an ExecReload= process on systemd 252, systemd issue #35227)
    and where the file has a mistake the daemon is about to report.
    """
    return load_locations(config_path, environ=environ).api_socket


def daemon_running(path: Path) -> bool:
    """Return True when something accepts connections on the Unix socket ``path``.

    Raises DaemonUnreachable when the connection is refused for lack of permission: then the
    daemon may well run, and falling back to the files (which need the secrets this user
    cannot read either) would only produce a misleading error.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except PermissionError:
        raise permission_error(path) from None
    except OSError:
        return False
    finally:
        probe.close()
    return True


def permission_error(path: Path) -> DaemonUnreachable:
    """Explain why this user may not connect to the socket ``path``, and how to fix it."""
    from .access import current_identity, find_blocker

    who = current_identity()
    blocked = find_blocker(path, who, need="connect")
    where = f": {blocked.path} {blocked.reason}" if blocked is not None else ""
    if blocked is not None and blocked.fix is not None and blocked.fix.startswith("usermod"):
        hint = f"run: {blocked.fix}"  # a group may pass: join it
    else:
        hint = (
            "the daemon's [api] socket_group decides who may connect (with a runtime directory"
            " that group may enter); ask its administrator to add you to that group"
        )
    return DaemonUnreachable(
        f"cannot connect to the daemon's socket {path}: permission denied for {who.label}{where}",
        hint=hint,
    )


def call(
    path: Path,
    method: str,
    url_path: str,
    *,
    params: dict[str, str] | None = None,
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[int, dict[str, Any]]:
    """Send one request over the Unix socket; return (status, JSON body).

    ``data`` is sent form-encoded (what the /kapi proxy passes on to Kakao). Raises
    DaemonNotRunning when the connection cannot be opened (nothing was sent, so the caller can
    safely do the work itself), DaemonApiError when no answer comes or it is not JSON.
    Blocking: a command sends one request and has nothing else to do meanwhile.
    """
    status, text = _request(path, method, url_path, params, data, headers, timeout)
    try:
        body = parse_json(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise DaemonApiError(status, f"the daemon answered HTTP {status} without JSON", {})
    return status, body


def _request(
    path: Path,
    method: str,
    url_path: str,
    params: Mapping[str, str] | None,
    data: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
    timeout: float,
) -> tuple[int, str]:
    """Send one request; return (status, body text)."""
    target = url_path + (f"?{urlencode(params)}" if params else "")
    sent_headers = dict(headers) if headers is not None else {}
    body = None
    if data is not None:
        body = urlencode(data).encode()
        sent_headers["Content-Type"] = "application/x-www-form-urlencoded"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise DaemonNotRunning(str(path)) from exc
    import http.client  # a daemon answers: see the module's docstring

    # The Host header names the daemon; the connection uses the Unix socket given to it.
    connection = http.client.HTTPConnection("kakao-tokend", timeout=timeout)
    connection.sock = sock
    try:
        try:
            connection.request(method, target, body=body, headers=sent_headers)
            response = connection.getresponse()
            return response.status, response.read().decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonApiError(
                0, f"the daemon did not answer {method} {url_path} on {path}: {exc}", {}
            ) from None
    finally:
        connection.close()
