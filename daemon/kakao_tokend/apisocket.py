"""The local API's Unix socket, bound so that only its owner and group can ever connect."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

from .errors import StoreError
from .paths import SUN_PATH_MAX
from .store import STALE_TEMP_AGE, make_dirs, resolve_group

#: Private directories a socket is bound in before it moves to its place (see bind_unix_socket).
SOCKET_STAGE_PREFIX = ".kts-socket."
SOCKET_BACKLOG = 128
#: sizeof(sockaddr_un.sun_path) on Linux, the terminating NUL included.


def bind_unix_socket(path: Path, *, mode: int, group: str | None) -> socket.socket:
    """Return a listening Unix socket at ``path`` that had its final mode and group before it
    became reachable there; raise StoreError saying which step failed (nothing is left then).

    bind() creates the socket file with the umask's mode, and chown/chmod can only follow. So
    the socket is bound under umask 0177 inside a fresh private directory (0700: nobody else
    can even reach it), given its group (api.socket_group, else ours: never one a setgid
    directory hands down) and mode there, and only then renamed onto ``path``. A chown that
    is not permitted (the daemon is not in the group, or PrivateUsers= leaves it unmapped)
    therefore means no socket at all, never a socket with whatever mode the umask made.
    """
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise StoreError(
            f"cannot bind the API socket {path}: the path is longer than a Unix socket address"
            f" allows ({SUN_PATH_MAX - 1} bytes)",
            hint="set api.socket or paths.runtime_dir to a shorter path",
        )
    parent = path.parent
    make_dirs(parent)
    _remove_socket_stages(parent)
    try:
        existing = path.lstat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot use {path} for the API socket: {exc.strerror or exc}") from None
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise StoreError(
                f"cannot use {path} for the API socket: something else is there",
                hint="move it away, or set api.socket to another path",
            )
    gid = os.getegid() if group is None else resolve_group(group)
    assert gid is not None
    try:
        stage = Path(tempfile.mkdtemp(prefix=SOCKET_STAGE_PREFIX, dir=parent))
    except OSError as exc:
        raise StoreError(f"cannot bind the API socket {path}: {exc.strerror or exc}") from None
    staged = stage / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    step, hint = f"cannot bind the API socket {path}", None
    stage_fd = -1
    try:
        address = str(staged)
        if len(os.fsencode(address)) >= SUN_PATH_MAX:
            # The staging path is longer than ``path``; bind through the directory's fd.
            stage_fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            address = f"/proc/self/fd/{stage_fd}/s"
        old_umask = os.umask(0o177)
        try:
            sock.bind(address)
        finally:
            os.umask(old_umask)
        step = f"cannot give the API socket {path} to group {group or gid}"
        hint = (
            "the daemon's user must be a member of api.socket_group; under systemd "
            "PrivateUsers= maps only the unit's own group"
        )
        if os.lstat(staged).st_gid != gid:  # chown only when needed (see store.set_group)
            os.chown(staged, -1, gid)
        step, hint = f"cannot set mode {mode:04o} on the API socket {path}", None
        os.chmod(staged, mode)
        step = f"cannot listen on the API socket {path}"
        sock.listen(SOCKET_BACKLOG)
        step = f"cannot move the API socket into place at {path}"
        os.rename(staged, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            staged.unlink()
        raise StoreError(f"{step}: {exc.strerror or exc}", hint=hint) from None
    finally:
        if stage_fd >= 0:
            os.close(stage_fd)
        with contextlib.suppress(OSError):
            stage.rmdir()
    return sock


def _remove_socket_stages(directory: Path) -> None:
    """Remove our staging directories that a daemon killed mid-bind left behind."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    cutoff = time.time() - STALE_TEMP_AGE
    for entry in entries:
        if not entry.name.startswith(SOCKET_STAGE_PREFIX):
            continue
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            if info.st_mtime > cutoff:
                continue  # another daemon sharing this directory may be binding right now
            for inner in os.scandir(entry.path):
                if stat.S_ISSOCK(inner.stat(follow_symlinks=False).st_mode):
                    os.unlink(inner.path)
            os.rmdir(entry.path)
