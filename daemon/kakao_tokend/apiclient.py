"""The CLI's client for the daemon's local API on its Unix socket."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .config import load_locations
from .errors import KakaoTokendError


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
    where credentials are unreadable (an ExecReload= process on systemd 252, issue #35227)
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


async def call(
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
    safely do the work itself), DaemonApiError when the answer is not JSON.
    """
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        try:
            async with session.request(
                method,
                f"http://kakao-tokend{url_path}",
                params=params,
                data=dict(data) if data is not None else None,
                headers=dict(headers) if headers is not None else None,
            ) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientConnectorError as exc:
            raise DaemonNotRunning(str(path)) from exc
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise DaemonApiError(status, f"the daemon answered HTTP {status} without JSON", {})
    return status, body
