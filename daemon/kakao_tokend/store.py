"""Token files: the private state file, the published token file and the per-account lock.

Every file is opened without following a symlink (``O_NOFOLLOW``, relative to a directory file
descriptor where several steps must happen in the same directory), gets its group set
explicitly (never inherited from a setgid directory), and lives in a directory that no other
user may write to (:func:`check_directory`). docs/security.md explains why.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import logging
import os
import pwd
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from .errors import (
    StateCorrupt,
    StoreError,
    StoreLocked,
    StoreMoved,
    StoreWriteError,
    UnsafePath,
    write_fix,
    write_hint,
)
from .relogin import Named, cli_command, command_line, config_command, login_command
from .state import MAX_ROTATIONS_KEPT, RESTORED_KEY, AccountState, parse_json
from .storage import in_flight_path
from .tokens import format_time, utcnow

log = logging.getLogger(__name__)

#: Every temporary file we create starts with this, so stale ones can be found and removed.
#: Consumers watching the directory with inotify should ignore names starting with ".".
TEMP_PREFIX = ".kakao-tokend."
TEMP_SUFFIX = ".tmp"
#: A temporary file older than this is left over from a crash (a write takes milliseconds).
STALE_TEMP_AGE = 60.0
#: The emergency reserve: enough for many rewrites of a state file (about 2 KiB each).
RESERVE_NAME = ".kakao-tokend.reserve"
RESERVE_SIZE = 64 * 1024
STATE_FILE_MODE = 0o600
LOCK_FILE_MODE = 0o600
#: The rescue file (see AccountStore.save_rescue) and its format version.
RESCUE_SUFFIX = ".rescue.json"
#: Each account's alert bookkeeping, next to its state file (AccountStore.alerts_path).
ALERTS_SUFFIX = ".alerts.json"
#: What `logout` keeps of an account, next to its state file: the generation it logged out
#: (no token), so that the next login continues from it (AccountStore.next_generation).
LOGGED_OUT_SUFFIX = ".logged-out.json"
RESCUE_VERSION = 1
DIR_MODE = 0o750
#: No file kakao-tokend reads back comes anywhere near this size (a state file with its whole
#: rotation log is a few KiB): a larger one was not written by it, and is refused instead of
#: being read into memory (read_file). A rendered template is compared up to its own size.
MAX_FILE_BYTES = 8 * 1024 * 1024
#: How often a waiting lock is tried again (seconds).
LOCK_POLL = 0.05
#: The state directory's instance lock: held by `run` (one daemon per state directory) and
#: by `store migrate` while it moves the accounts.
INSTANCE_LOCK_NAME = "kakao-tokend.run.lock"


class AccountFiles(Protocol):
    """What the store needs to know about an account; config.AccountConfig satisfies it."""

    @property
    def name(self) -> str: ...
    @property
    def state_file(self) -> Path: ...
    @property
    def lock_file(self) -> Path: ...
    @property
    def token_file(self) -> Path: ...
    @property
    def token_file_mode(self) -> int: ...
    @property
    def token_file_group(self) -> str | int | None: ...
    @property
    def include_refresh_token(self) -> bool: ...
    @property
    def access_token_file(self) -> Path | None: ...
    @property
    def env_file(self) -> Path | None: ...
    @property
    def cli_options(self) -> tuple[str, ...]: ...
    def file_text(self, field_name: str) -> str:
        """The text of ``state_file``, ``lock_file`` or ``token_file`` (no Path made)."""
        ...


@dataclass(frozen=True)
class StorePaths:
    """Explicit file settings for one account, for callers without an AccountConfig."""

    name: str
    state_file: Path
    lock_file: Path
    token_file: Path
    token_file_mode: int = 0o640
    token_file_group: str | int | None = None
    include_refresh_token: bool = False
    access_token_file: Path | None = None
    env_file: Path | None = None
    #: The global options of its commands (relogin.cli_command); see from_paths.
    cli_options: tuple[str, ...] = ()

    def file_text(self, field_name: str) -> str:
        """The text of ``state_file``, ``lock_file`` or ``token_file``."""
        return str(getattr(self, field_name))


# ---------------------------------------------------------------------------------------------
# Low-level file helpers


def _write_error(path: Path, exc: OSError, action: str = "write") -> StoreWriteError:
    reason = exc.strerror or str(exc)
    hint = write_hint(exc.errno)
    error = StoreWriteError(
        f"cannot {action} {path}: {reason}", hint=None if hint is None else str(hint)
    )
    error.errno = exc.errno
    return error


def ensure_reserve(directory: Path) -> bool:
    """Keep a small emergency reserve file in ``directory``; return True when it exists.

    When the disk fills up, :meth:`AccountStore.save` gives the reserve up so that the one write
    that matters most — a rotated refresh token — still lands (the classic reserved-blocks
    trick). The space is really allocated (``posix_fallocate``), not a sparse file.
    """
    return make_reserve(directory) is None


def make_reserve(directory: Path) -> OSError | None:
    """:func:`ensure_reserve`, returning why the reserve could not be made (None: it exists)."""
    path = directory / RESERVE_NAME
    try:
        fd = _create_exclusive(path, 0o600, os.getegid())
    except FileExistsError:
        return None
    except OSError as exc:
        return exc
    try:
        try:
            os.posix_fallocate(fd, 0, RESERVE_SIZE)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _write_all(fd, bytes(RESERVE_SIZE))  # a file system without fallocate
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
        return exc
    os.close(fd)
    return None


def make_room_before_kakao(directory: Path) -> None:
    """Create ``directory`` and its emergency reserve, or raise StoreWriteError.

    A one-shot command (import, refresh, token) calls this before it asks Kakao for tokens:
    once Kakao rotated, the only live refresh token is the one in the answer, and a save that
    then fails loses it. The reserve is what such a save gives up on a full disk.
    """
    make_dirs(directory)
    refused = make_reserve(directory)
    if refused is not None:
        error = StoreWriteError(
            f"cannot write to {directory} ({refused.strerror or refused}); Kakao was not"
            " asked (a rotated refresh token could not have been saved)",
            hint=str(write_fix(refused.errno)),  # what this errno needs (errors.WRITE_FIXES)
        )
        error.errno = refused.errno
        raise error


def rescue_not_written(name: str, exc: StoreError, before: str | None) -> str:
    """Log that account ``name``'s rescue file cannot be written; return the reason to pass
    as ``before`` next time (and to :func:`rescue_written`).

    CRITICAL once per episode, and again when the reason changes (``before``: the reason of
    the last failure, None after a success); the retries (within seconds for short tokens,
    while the write_failed report already stands) only at DEBUG. The one rule of both
    stores' rescue files.
    """
    reason = str(exc)
    level = logging.DEBUG if reason == before else logging.CRITICAL
    log.log(level, "account %s: cannot write the rescue file either: %s", name, exc)
    return reason


def rescue_written(name: str, path: Path | None, before: str | None) -> None:
    """Account ``name``'s rescue file was written: say so when writes of it failed before
    (``before``: rescue_not_written's reason), which ends that episode."""
    if before is not None:
        log.warning("account %s: rescue file %s written again", name, path)


def release_reserve(directory: Path) -> bool:
    """Delete the emergency reserve in ``directory``; return True when there was one."""
    try:
        os.unlink(directory / RESERVE_NAME)
    except OSError:
        return False
    return True


def unlink_durably(path: Path) -> bool:
    """Remove ``path`` and make the removal durable; False when it was not there.

    OSError when it cannot be removed. A directory that cannot be synced afterwards does not
    undo the removal, so that failure is not the caller's to handle.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    with suppress(OSError):
        _fsync_dir(path.parent)
    return True


def remove_outputs(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """Remove copies of a logged-out access token (the token file, the extra token files,
    rendered templates) durably; return the files removed and what could not be removed.

    A symlink is removed itself: the file it points to is not ours and is left alone. A
    missing file is fine.
    """
    removed: list[Path] = []
    problems: list[str] = []
    for path in paths:
        try:
            if unlink_durably(path):
                removed.append(path)
        except OSError as exc:
            problems.append(str(_write_error(path, exc, "remove")))
    return removed, problems


def sink_paths(account: AccountFiles) -> list[Path]:
    """The extra token files ``account`` publishes (``access_token_file``, ``env_file``):
    written with every new token (AccountStore.publish_sinks), removed at a logout."""
    return [Path(path) for path in (account.access_token_file, account.env_file) if path]


def _fsync_dir(directory: Path) -> None:
    """Make a rename/unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_fd(fd)
    finally:
        os.close(fd)


def _fsync_fd(directory_fd: int) -> None:
    try:
        os.fsync(directory_fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory; nothing more we can do there.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def make_dirs(directory: Path, mode: int = DIR_MODE) -> None:
    """Create ``directory`` and every missing parent with ``mode`` (umask may only narrow it).

    ``Path.mkdir(parents=True)`` would create the parents with the default 0777 instead. Each
    new directory gets this process's group and no setgid bit, whatever its parent has.
    Raises :class:`StoreWriteError` naming the directory that could not be created.
    """
    missing: list[Path] = []
    current = Path(directory)
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for item in reversed(missing):
        try:
            item.mkdir(mode=mode)
            _own_group(item)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_error(item, exc, "create directory") from None


def _own_group(directory: Path) -> None:
    """Give a directory we just created our group, and drop a setgid bit it inherited."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        set_group(fd, os.getegid())
        if info.st_mode & stat.S_ISGID:
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~stat.S_ISGID)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Safe directories and symlink-free opens


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _directory_problem(
    info: os.stat_result, directory: Path, what: str, *, owner: int | None = None
) -> UnsafePath | None:
    """Why another local user could change the files in this directory, or None.

    ``owner``: the user the daemon runs as, when that is not this process (`check-config`
    run by root for the system unit's configuration).
    """
    if not stat.S_ISDIR(info.st_mode):
        return UnsafePath(f"{what} {directory} is not a directory")
    me = os.geteuid() if owner is None else owner
    if info.st_uid not in (me, 0):
        stranger = _user_name(info.st_uid)
        return UnsafePath(
            f"{what} {directory} is owned by {stranger}, who could swap the files in it; only "
            f"this user ({_user_name(me)}) or root may own it",
            hint=f"run kakao-tokend as {stranger}, or: chown {_user_name(me)} {directory}",
        )
    mode = stat.S_IMODE(info.st_mode)
    who = _other_writers(mode)
    if who is not None:
        return UnsafePath(
            f"{what} {directory} is writable by {who} (mode {mode:04o}), so another local user "
            "could replace the files in it",
            hint=f"run: chmod go-w {directory}",
        )
    return None


def open_directory(directory: Path, *, what: str | None = None) -> int:
    """Open ``directory`` (a symlink to it is fine) and return its fd; with ``what``, refuse it
    (:class:`UnsafePath`) when another user could change it: see :func:`check_directory`."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if what is not None:
        problem = _directory_problem(os.fstat(fd), Path(directory), what)
        if problem is not None:
            os.close(fd)
            raise problem
    return fd


def check_directory(directory: Path, *, what: str) -> None:
    """Refuse a directory writable by group or others, or owned by a user other than us or root.

    Whoever can write to the directory can replace the token files in it or plant symlinks;
    whoever owns it can make it writable. ``what`` names it in the error ("state directory").
    The path may be a symlink to the directory (systemd's ``DynamicUser=`` state directory is
    one); the directory it leads to is judged. A missing directory passes (it is created 0750).
    """
    try:
        fd = open_directory(directory, what=what)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot open {what} {directory}: {exc.strerror or exc}") from None
    os.close(fd)


def judge_output_directory(
    directory: Path, *, what: str, owner: int | None = None
) -> tuple[StoreError, bool] | None:
    """Judge the directory of a file published for consumers beside the token file (an extra
    token file, a rendered template) by :func:`check_directory`'s rule; None when it passes
    (or does not exist yet: it is created 0750).

    Returns the problem and whether it is refused. Refused when every local user may write
    there (a sticky 1777 like /tmp too): anyone could plant what the consumers read, or keep
    it from ever being updated. Otherwise (its group may write, or another user owns it: a
    consumer's own directory) the problem is a warning: reading there never waits nor
    follows a link, so they can only spoil their own copy. ``owner`` as for
    :func:`_directory_problem`.
    """
    try:
        fd = open_directory(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot open {what} {directory}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISDIR(info.st_mode) and mode & 0o002:
        return (
            UnsafePath(
                f"{what} {directory} is writable by every local user (mode {mode:04o}): anyone"
                " could replace what the consumers read there, or keep it from being updated",
                hint=f"run: chmod o-w {directory}, or choose a directory that only kakao-tokend"
                " and its consumers may write",
            ),
            True,
        )
    problem = _directory_problem(info, directory, what, owner=owner)
    return None if problem is None else (problem, False)


class PublishesOutputs(Protocol):
    """An account's files beside its token file (config.AccountConfig satisfies it)."""

    @property
    def name(self) -> str: ...
    def outputs(self) -> list[tuple[str, Path]]:
        """(key below ``accounts.NAME``, path) of each extra token file and template."""
        ...


@dataclass(frozen=True)
class OutputProblem:
    """Another user could change a directory an account publishes into (output_problems)."""

    account: str
    #: The setting that names the file: ``accounts.NAME.env_file``.
    key: str
    problem: StoreError
    #: Every local user may write there: `run` and `check-config` refuse it (else a warning).
    refused: bool


def output_problems(
    accounts: Iterable[PublishesOutputs], *, owner: int | None = None
) -> list[OutputProblem]:
    """Judge the directory of every extra token file and rendered template of ``accounts``
    (:func:`judge_output_directory`), each directory once: what `run` refuses or warns of at
    start and at a reload, and what `check-config` and `doctor` report."""
    found: list[OutputProblem] = []
    judged: set[str] = set()
    for account in accounts:
        for key, path in account.outputs():
            directory = directory_text(path)
            if directory in judged:
                continue
            judged.add(directory)
            what = "template destination" if key.startswith("templates") else "extra token file"
            what += " directory"
            try:
                judged_as = judge_output_directory(Path(directory), what=what, owner=owner)
            except StoreError as exc:
                judged_as = (exc, False)
            if judged_as is not None:
                problem, refused = judged_as
                found.append(
                    OutputProblem(account.name, f"accounts.{account.name}.{key}", problem, refused)
                )
    return found


def _other_writers(mode: int) -> str | None:
    """Who besides the owner may write a file or directory of ``mode`` (None: nobody)."""
    return {0o022: "group and others", 0o020: "group", 0o002: "others"}.get(mode & 0o022)


def _private_file_problem(info: os.stat_result, path: Path, what: str) -> UnsafePath | None:
    """Why a file kakao-tokend writes for itself alone (0600, as its own user) may have been
    written by someone else: another owner, or group or others may write it; else None."""
    me = os.geteuid()
    if info.st_uid != me:
        return UnsafePath(
            f"{what} {path} is owned by {_user_name(info.st_uid)}, not {_user_name(me)}:"
            " kakao-tokend did not write it",
            hint=f"chown {_user_name(me)} {path} && chmod 600 {path}",
        )
    mode = stat.S_IMODE(info.st_mode)
    who = _other_writers(mode)
    if who is not None:
        return UnsafePath(
            f"{what} {path} is writable by {who} (mode {mode:04o}): another local user could"
            " have written it",
            hint=f"chmod 600 {path}",
        )
    return None


def symlink_refused(path: Path | str, what: str) -> UnsafePath:
    """The error for one of our files found to be a symbolic link."""
    return UnsafePath(
        f"{what} {path} is a symbolic link; kakao-tokend never follows links for its own files "
        "(another user could aim one at a file they can read, or one that must not be "
        "overwritten)",
        hint="remove the link, or configure the real path instead",
    )


class Listing:
    """What a few directories held at one moment: one ``scandir`` each, read when first asked.

    A start of a thousand accounts would otherwise look up every file of every account one by
    one (its state, token, lock, alert bookkeeping and rescue files, the migration marker):
    thousands of system calls, most of them for files that are not there. With a listing, a
    file it does not name is known to be absent, and one it names has its type from the
    directory entry (``d_type``; ``DirEntry`` falls back to ``lstat`` where a file system
    gives none). It is only as good as the moment it was taken: the daemon uses one while it
    opens its accounts, under its instance lock (which `store migrate` needs too), and closes
    it before READY. A file another process writes meanwhile (a `login`) is noticed like any
    later change: by the state directory watch and the heartbeat's ``stat``. Every file that
    is there is still opened without following a symlink and checked on its descriptor.
    """

    def __init__(self) -> None:
        #: directory -> {name: entry}, or None when it could not be listed (then: ask the disk).
        self._directories: dict[str, dict[str, os.DirEntry[str]] | None] = {}
        self._closed = False

    def _entries(self, path: Path | str) -> tuple[dict[str, os.DirEntry[str]] | None, str]:
        # str.rpartition, not os.path.split or Path.parent: this runs ten times per account.
        directory, slash, name = str(path).rpartition("/")
        return self.directory(directory or slash or "."), name  # "/x" is in "/", "x" in "."

    def directory(self, directory: str) -> dict[str, os.DirEntry[str]] | None:
        """The entries of ``directory`` (its text) by name; None when nobody knows."""
        if self._closed:
            return None
        try:
            return self._directories[directory]
        except KeyError:
            pass
        entries: dict[str, os.DirEntry[str]] | None
        try:
            with os.scandir(directory) as listing:
                entries = {entry.name: entry for entry in listing}
        except OSError:
            entries = None  # missing or unreadable: the file's own lookup says what is wrong
        self._directories[directory] = entries
        return entries

    def absent(self, path: Path | str) -> bool:
        """True when ``path`` is known not to exist (False: it exists, or nobody knows)."""
        entries, name = self._entries(path)
        return entries is not None and name not in entries

    def entry(self, path: Path | str) -> os.DirEntry[str] | Literal[False] | None:
        """The directory entry of ``path``; False when it is known to be absent, None when
        the listing does not know."""
        entries, name = self._entries(path)
        return None if entries is None else entries.get(name, False)

    def close(self) -> None:
        """Forget everything: from now on every question is answered by the disk."""
        self._closed = True
        self._directories.clear()


def directory_text(path: Path | str) -> str:
    """The directory of ``path`` as text: ``str(path.parent)`` without building a Path."""
    directory, slash, _ = str(path).rpartition("/")
    return directory or slash or "."


def check_file(path: Path, *, what: str, listing: Listing | None = None) -> None:
    """Refuse a symlink or anything but a regular file at ``path``; a missing file passes.

    With ``listing`` the answer comes from its directory entry when it has one.
    """
    if listing is not None:
        entry = listing.entry(path)
        if entry is False:
            return
        if isinstance(entry, os.DirEntry):
            try:
                if entry.is_symlink():
                    raise symlink_refused(path, what)
                if entry.is_file(follow_symlinks=False):
                    return
            except OSError:
                pass  # DT_UNKNOWN and the fallback lstat failed: ask again below
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot examine {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(info.st_mode):
        raise symlink_refused(path, what)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(f"{what} {path} is not a regular file", hint="move it away")


def set_group(fd: int, gid: int) -> None:
    """Give the open file group ``gid``, calling fchown only when its group differs.

    The shipped units' ``SystemCallFilter=~@privileged`` denies the chown family with EPERM
    unless ``@chown`` is allowed again; a file we just created in our own directory already has
    our group, so the common case must not depend on the filter at all.
    """
    if os.fstat(fd).st_gid != gid:
        os.fchown(fd, -1, gid)


def published_as_configured(info: os.stat_result, *, mode: int, group: int | None) -> bool:
    """True when a published file (``fstat``) has the mode and group a write gives it:
    ``mode``, and ``group`` or, None, this process's (:func:`atomic_write`)."""
    gid = os.getegid() if group is None else group
    return stat.S_IMODE(info.st_mode) == mode and info.st_gid == gid


def _create_exclusive(path: Path, mode: int, gid: int, *, dir_fd: int | None = None) -> int:
    """Create a new file (never through a symlink) with exactly ``mode`` and group ``gid``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    name = path.name if dir_fd is not None else path
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it
        set_group(fd, gid)  # a setgid directory would have given it the directory's group
    except OSError:
        os.close(fd)
        with suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    return fd


def _open_for_lock(name: str, dir_fd: int) -> int:
    """Open a lock file for reading and writing, or, on a read-only file system, for
    reading: flock works on either, so the account stays locked while the disk is read-only
    and its refreshes go on (the tokens then wait in memory and the rescue file, which is
    on another file system); only the holder's pid is not written then."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, os.O_RDWR | flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        return os.open(name, os.O_RDONLY | flags, dir_fd=dir_fd)


def open_lock_file(path: Path, *, directory_what: str, what: str = "lock file") -> int:
    """Open (or create, 0600, our group) a lock file for reading and writing, safely.

    The directory must pass :func:`check_directory` (checked on the very fd the file is opened
    against), the file is never reached through a symlink, and it must be a regular file with
    no other hard link: its holder truncates and rewrites it, which must never hit another
    file. Raises :class:`UnsafePath` or :class:`StoreError`.
    """
    make_dirs(path.parent)
    try:
        dir_fd = open_directory(path.parent, what=directory_what)
    except OSError as exc:
        raise StoreError(
            f"cannot open {what} {path}: {exc.strerror or exc}",
            hint="check that this user may write to the state directory",
        ) from None
    try:
        for _ in range(10):
            read_only = False
            try:
                fd = _create_exclusive(path, LOCK_FILE_MODE, os.getegid(), dir_fd=dir_fd)
                os.close(fd)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    raise
                read_only = True  # a read-only file system: lock the file that is there
            try:
                fd = _open_for_lock(path.name, dir_fd)
            except FileNotFoundError:
                if read_only:
                    raise StoreError(
                        f"cannot create {what} {path}: read-only file system",
                        hint="remount it read-write, or choose another directory",
                    ) from None
                continue  # removed between the two opens: create it again
            break
        else:  # pragma: no cover - created and removed ten times in a row by someone else
            raise StoreError(f"cannot open {what} {path}: it keeps disappearing")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_refused(path, what) from None
        raise StoreError(
            f"cannot open {what} {path}: {exc.strerror or exc}",
            hint="check that this user may write to the state directory",
        ) from None
    finally:
        os.close(dir_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise UnsafePath(
            f"{what} {path} is not a regular file of its own (it has other hard links or is "
            "special), so truncating it could damage another file",
            hint="remove it; it is re-created",
        )
    return fd


def _as_path(value: Path | str) -> Path:
    return value if isinstance(value, Path) else Path(value)


class FileLock:
    """An exclusive ``flock`` on a lock file that names its holder; the one lock helper.

    Used for each account (``NAME.lock``, by every process that writes the account's files)
    and for the daemon's instance lock. The file is opened safely (:func:`open_lock_file`);
    its holder writes its pid into it, so a refusal can name the process. Reentrant within one
    object (nested holds do not deadlock); two objects, or two processes, exclude each other
    (flock on separate open file descriptions). Not meant to be shared between threads.
    """

    def __init__(self, path: Path, *, directory_what: str, what: str = "lock file") -> None:
        self.path = _as_path(path)
        self.directory_what = directory_what
        self.what = what
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._depth > 0

    def try_acquire(self) -> bool:
        """Take the lock without waiting; True on success (or when already ours)."""
        if self._depth > 0:
            self._depth += 1
            return True
        fd = open_lock_file(self.path, directory_what=self.directory_what, what=self.what)
        try:
            # flock, not lockf: POSIX locks vanish when *any* fd of the file is closed.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        with suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._depth = 1
        return True

    def release(self) -> None:
        """Release one level; the flock is dropped when the outermost level ends."""
        if self._depth == 0:
            raise RuntimeError(f"release() of {self.path} without a matching acquire")
        self._depth -= 1
        if self._depth:
            return
        fd, self._fd = self._fd, None
        assert fd is not None
        with suppress(OSError):
            os.ftruncate(fd, 0)  # so nobody later reports our pid as the holder
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> int | None:
        """Return the pid written into the lock file by its holder, if any."""
        try:
            raw = read_file(self.path, what=self.what)
        except (OSError, StoreError):
            return None
        text = raw.decode("ascii", errors="replace").strip()
        return int(text) if text.isdigit() else None


def read_file(path: Path | str, *, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """Read a whole regular file without following a symlink (UnsafePath) or blocking on a FIFO.

    The one way kakao-tokend reads a file in a directory someone else may write too (the
    token file's, a template's destination): a FIFO or a device is refused at once (opened
    non-blocking, judged by ``fstat``), and a file of more than ``limit`` bytes raises
    StoreError instead of filling the memory. FileNotFoundError and other OSErrors reach the
    caller unchanged.
    """
    return read_regular(path, what=what, limit=limit)[0]


def _too_large(path: Path | str, what: str, limit: int) -> StoreError:
    mib = 1024 * 1024
    size = f"{limit // mib} MiB" if limit and limit % mib == 0 else f"{limit} bytes"
    return StoreError(
        f"{what} {path} is larger than {size}: kakao-tokend did not write it",
        hint="move it away",
    )


def read_regular(
    path: Path | str, *, what: str, limit: int = MAX_FILE_BYTES
) -> tuple[bytes, os.stat_result]:
    """:func:`read_file`, plus the ``fstat`` of the file that was read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_refused(path, what) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"{what} {path} is not a regular file", hint="move it away")
        if info.st_size > limit:
            raise _too_large(path, what, limit)
        # Plain reads on the descriptor, sized by the fstat: a file object would fstat and
        # seek again (a start of a thousand accounts reads two files each). A read that
        # returns less than it asked for has reached the end of a regular file: no further
        # read to hear that (our files are replaced by rename, never appended to). One
        # growing meanwhile is read up to one byte past the limit, never further.
        data = b""
        while True:
            wanted = min(max(info.st_size - len(data), 0) + 4096, limit + 1 - len(data))
            chunk = os.read(fd, wanted)
            data += chunk
            if len(data) > limit:
                raise _too_large(path, what, limit)
            if len(chunk) < wanted:
                return data, info
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(path: Path, data: bytes, *, mode: int, group: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    The temporary file lives in the same directory (rename is atomic only within one file
    system), is created with its final mode (fchmod defeats the umask) and group (``group``, or
    this process's group: never the one a setgid directory would hand down) before any data is
    written, is fsynced before the rename, and the directory is fsynced after it. Every step
    works on one directory file descriptor, so all of them happen in the same directory. On any
    failure the temporary file is removed, the old file is left as it was and
    :class:`StoreWriteError` says what went wrong. ``path`` itself is replaced, never followed:
    a symlink there is replaced by the new file, and the file it pointed to is not touched.
    """
    path = Path(path)
    directory = path.parent
    make_dirs(directory)
    gid = os.getegid() if group is None else group
    tmp: str | None = None
    fd = -1
    dir_fd = -1
    try:
        dir_fd = open_directory(directory)
        for _ in range(10):
            candidate = f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
            try:
                fd = _create_exclusive(Path(candidate), mode, gid, dir_fd=dir_fd)
            except FileExistsError:
                continue
            except PermissionError as exc:
                if group is None or exc.errno != errno.EPERM:
                    raise
                raise StoreWriteError(
                    f"cannot give {path} to group {group}: operation not permitted",
                    hint="run as root or as a member of that group, or unset the token file group",
                ) from None
            tmp = candidate
            break
        else:  # pragma: no cover - ten random-name collisions in a row
            raise FileExistsError(errno.EEXIST, "could not create a temporary file", str(path))
        _write_all(fd, data)
        os.fsync(fd)
        closing, fd = fd, -1
        os.close(closing)  # may report a deferred write error (NFS)
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        tmp = None
        _fsync_fd(dir_fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
        if dir_fd >= 0:
            os.close(dir_fd)


def remove_stale_temp_files(directory: Path, *, max_age: float = STALE_TEMP_AGE) -> list[Path]:
    """Delete our temporary files older than ``max_age`` seconds (left by a crash); list them.

    Only regular files named ``.kakao-tokend.*.tmp`` are touched; a missing or unreadable
    directory is not an error.
    """
    removed: list[Path] = []
    cutoff = time.time() - max_age
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if entry.is_file(follow_symlinks=False) and info.st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError as exc:
            log.debug("could not remove stale temporary file %s: %s", entry.path, exc)
    if removed:
        log.info("removed %d stale temporary file(s) in %s", len(removed), directory)
    return removed


def resolve_group(group: str | int | None) -> int | None:
    """Return the gid for a group name or number; raise StoreError if the name is unknown."""
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StoreError(
            f"group {group!r} does not exist",
            hint="create it (groupadd) or change the token file group in the configuration",
        ) from None


#: The marker `kakao-tokend store migrate --to postgres` leaves in every directory whose
#: accounts it moved (written by kakao_tokend.fleet.migrate; JSON, no secret, mode 0644).
MOVED_NAME = "MOVED"


def check_not_moved(
    directory: Path, *, account: Named | None = None, listing: Listing | None = None
) -> None:
    """Refuse (:class:`StoreMoved`) when the accounts of ``directory`` were migrated away.

    The marker's existence is what counts: a marker that cannot be read or parsed refuses
    too, with a vaguer message. Its fields (``store_id``, ``database``, ``moved_at``,
    ``pending``) only make the message say where the accounts went and how to go back; with
    ``account``, the commands in the hints carry its configuration's ``--config``. A
    ``listing`` that knows the directory spares the lookup.
    """

    def migrate(target: str) -> str:
        words = ("store", "migrate", "--to", target)
        return config_command(account, *words) if account else command_line((), *words)

    marker = os.path.join(directory, MOVED_NAME)  # a string: no Path built when none is there
    if listing is not None and listing.absent(marker):
        return
    try:
        os.lstat(marker)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return  # no marker (or no access to the directory at all: that fails on its own)
    path = Path(marker)
    document: Any = None
    with suppress(OSError, StoreError, ValueError):
        document = parse_json(read_file(path, what="migration marker"))
    if not isinstance(document, dict):
        raise StoreMoved(
            f"the accounts in {directory} were moved to another store by `kakao-tokend store "
            f"migrate` ({path} exists but cannot be read)",
            hint=f"read that file; `{migrate('file')}` moves them back",
        )

    def field(name: str) -> str:
        return " ".join(str(document.get(name, "?")).split())[:200]

    where = f"the PostgreSQL store {field('store_id')} ({field('database')})"
    if document.get("pending"):
        raise StoreMoved(
            f"the accounts in {directory} live in {where}; a migration back to these files "
            f"started at {field('moved_at')} has not finished",
            hint=f'run `{migrate("file")}` again to finish it, or set [store] backend = "postgres"',
        )
    raise StoreMoved(
        f"the accounts in {directory} were moved to {where} at {field('moved_at')} by "
        "`kakao-tokend store migrate --to postgres`",
        hint='set [store] backend = "postgres" to use them there; to move them back to these '
        f"files: {migrate('file')}",
    )


_LONG_QUOTED = re.compile(r"'[^']{20,}'|\"[^\"]{20,}\"")


def read_state_file(path: Path) -> AccountState:
    """Parse a state file given by a person (a backup); raise ValueError saying what is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return AccountState.from_dict(parse_json(raw))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = "the file is empty" if not raw.strip() else _safe_reason(exc)
        raise ValueError(f"{path} is not a kakao-tokend state file ({reason})") from None


def _safe_reason(exc: BaseException) -> str:
    """Describe a parse failure without echoing long values (which could be tokens)."""
    text = str(exc) or type(exc).__name__
    return _LONG_QUOTED.sub("'…'", text)[:200]


def _corrupt_stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


# ---------------------------------------------------------------------------------------------


class AccountStore:
    """One account's files: private state (0600), published token file, and lock.

    This is the only module that opens these files; everything else goes through it.

    The lock is reentrant within one AccountStore object (nested ``with store.lock()`` does not
    deadlock); two objects, or two processes, exclude each other (flock on separate open file
    descriptions). It is not meant to be shared between threads.
    """

    #: Refuse the files once `store migrate` moved them away (:func:`check_not_moved`). Only
    #: the migration itself, which reads and fills moved files on purpose, turns this off.
    honour_moved_marker: ClassVar[bool] = True

    def __init__(
        self,
        account: AccountFiles,
        *,
        rescue_dir: Path | None = None,
        listing: Listing | None = None,
    ) -> None:
        self.account = account
        self.name = account.name
        # The files' text, which is all a start needs of them: it compares, lists and opens
        # them. Their Path objects are the configuration's own, made when first asked for
        # (state_path ...): a thousand accounts' three Paths cost a start more than reading
        # their files (docs/benchmarks.md).
        self.state_text = account.file_text("state_file")
        self.token_text = account.file_text("token_file")
        self.lock_text = account.file_text("lock_file")
        self._rescue_dir = rescue_dir
        self._file_lock: FileLock | None = None
        self._cleaned = False
        self._gid: int | None = None
        self._gid_resolved = False
        #: The directory whose emergency reserve a save gave up (to be re-created later).
        self._reserve_released: Path | None = None
        #: Why the rescue file could not be written, while it cannot (logged once, see
        #: save_rescue).
        self._rescue_failed: str | None = None
        #: While the daemon opens its accounts: the directories as listed then (see Listing).
        self._listing = listing
        #: The listing found no alert bookkeeping file. Believed by the first load_alerts
        #: (after the listing is closed: alerts attach once every account is open), since
        #: only a holder of the instance lock writes one (this daemon, `store migrate`).
        self._no_alerts_listed = False
        #: The state_signature of what load() read last (loaded_signature).
        self._loaded_signature: tuple[int, int, int] | None = None

    @classmethod
    def from_paths(
        cls,
        name: str,
        *,
        state_file: Path,
        lock_file: Path | None = None,
        token_file: Path | None = None,
        token_file_mode: int = 0o640,
        token_file_group: str | int | None = None,
        include_refresh_token: bool = False,
    ) -> AccountStore:
        """Build a store from explicit paths; lock/token files default next to the state file."""
        state_file = Path(state_file)
        return cls(
            StorePaths(
                name=name,
                state_file=state_file,
                lock_file=Path(lock_file or state_file.with_name(f"{name}.lock")),
                token_file=Path(token_file or state_file.with_name(f"{name}.token.json")),
                token_file_mode=token_file_mode,
                token_file_group=token_file_group,
                include_refresh_token=include_refresh_token,
                # Without its config the store cannot know whether this is the default
                # account: its hints name it.
                cli_options=("--account", name),
            )
        )

    def __repr__(self) -> str:
        return f"AccountStore({self.name!r}, state={self.state_text!r})"

    @property
    def state_path(self) -> Path:
        """The private state file."""
        return _as_path(self.account.state_file)

    @property
    def token_path(self) -> Path:
        """The published token file."""
        return _as_path(self.account.token_file)

    @property
    def lock_path(self) -> Path:
        """The account's lock file."""
        return _as_path(self.account.lock_file)

    @property
    def shared(self) -> bool:
        """A state file: another process writing it (login, import, a CLI refresh) is news."""
        return False

    @property
    def peer_grace(self) -> float:
        """No other holder keeps unsaved tokens of a state file: never wait for one."""
        return 0.0

    @property
    def rotations_kept(self) -> int:
        """The state file holds the rotation log: all of it (up to MAX_ROTATIONS_KEPT)."""
        return MAX_ROTATIONS_KEPT

    @property
    def rescue_path(self) -> Path | None:
        """The second, independent place for tokens the state file could not take (None: off)."""
        if self._rescue_dir is None:
            return None
        return _as_path(self._rescue_dir) / f"{self.name}{RESCUE_SUFFIX}"

    @property
    def alerts_path(self) -> Path:
        """Alert bookkeeping (what was sent when; no secrets), next to the state file."""
        return self.state_path.with_name(f"{self.name}{ALERTS_SUFFIX}")

    @property
    def logged_out_path(self) -> Path:
        """The record of the last logout (its generation; no secret), next to the state file."""
        return self.state_path.with_name(f"{self.name}{LOGGED_OUT_SUFFIX}")

    def _alerts_absent(self) -> bool:
        """True when the listing knows there is no alert bookkeeping file (no Path built)."""
        return self._listing is not None and self._listing.absent(
            f"{directory_text(self.state_text)}/{self.name}{ALERTS_SUFFIX}"
        )

    # -- safety --------------------------------------------------------------------------------

    def check_paths(self, checked: set[str] | None = None) -> None:
        """Refuse (:class:`UnsafePath`) to work with files another local user could redirect.

        The directories of the state, lock and token files and the rescue directory (the
        runtime directory: a rescue file planted there would replace the account's tokens)
        must pass :func:`check_directory`; none of the account's files may be a symlink or
        anything but a regular file; the extra token files must not go where every local
        user may write (:func:`judge_output_directory`). Every command that writes the
        account's files calls this first (``try_lock`` does too). Directories in ``checked``
        passed already and are not looked at again; the ones that pass here are added (a
        thousand accounts in one directory: one look at it).
        """
        if checked is not None and self._listing is not None and self._check_listed(checked):
            return
        # Keyed by the directory's text (a Path per file and account adds up at a thousand).
        directories: dict[str, tuple[Path, str]] = {}
        for path, what in (
            (self.state_path, "state directory"),
            (self.lock_path, "lock file directory"),
            (self.token_path, "token file directory"),
        ):
            # Usually one directory: "state directory".
            directories.setdefault(directory_text(path), (path, what))
        rescue = self.rescue_path
        if rescue is not None:
            directories.setdefault(directory_text(rescue), (rescue, "runtime directory"))
        for directory, (path, what) in directories.items():
            if checked is None or directory not in checked:
                check_directory(path.parent, what=what)
        for sink in sink_paths(self.account):
            if directory_text(sink) in directories:
                continue  # judged by the stricter rule above
            try:
                judged = judge_output_directory(sink.parent, what="extra token file directory")
            except StoreError:
                continue  # not even to be looked at: writing there fails, says why, is retried
            if judged is not None and judged[1]:
                raise judged[0]
        listing = self._listing
        for path, what in (
            (self.state_path, "state file"),
            (self.lock_path, "lock file"),
            (self.token_path, "token file"),
        ):
            check_file(path, what=what, listing=listing)
        if self._alerts_absent():
            self._no_alerts_listed = True
        else:
            check_file(self.alerts_path, what="alert bookkeeping file", listing=listing)
        if self.honour_moved_marker and (
            checked is None or directory_text(self.state_path) not in checked
        ):
            check_not_moved(self.state_path.parent, account=self.account, listing=listing)
        if checked is not None:
            checked.update(directories)

    def _check_listed(self, checked: set[str]) -> bool:
        """check_paths for the usual account of a large start: its files in one directory
        that was judged already, each file answered by the listing (regular, or not there).
        False (nothing decided) when any of that does not hold: check_paths then looks at
        each file the long way, which also raises the right error."""
        assert self._listing is not None
        directory, _, state_name = self.state_text.rpartition("/")
        lock_directory, _, lock_name = self.lock_text.rpartition("/")
        token_directory, _, token_name = self.token_text.rpartition("/")
        if not directory or directory not in checked:
            return False
        if self._rescue_dir is not None and str(self._rescue_dir) not in checked:
            return False
        if self.account.access_token_file is not None or self.account.env_file is not None:
            return False  # rare: their directories are judged the long way
        if lock_directory != directory or token_directory != directory:
            return False
        entries = self._listing.directory(directory)
        if entries is None:
            return False
        try:
            for name in (state_name, lock_name, token_name):
                entry = entries.get(name)
                if entry is not None and (
                    entry.is_symlink() or not entry.is_file(follow_symlinks=False)
                ):
                    return False
        except OSError:  # DT_UNKNOWN and the fallback lstat failed: the long way asks again
            return False
        if f"{self.name}{ALERTS_SUFFIX}" in entries:
            return False  # rare (an account that alerted): judged the long way
        self._no_alerts_listed = True
        return True

    # -- locking -------------------------------------------------------------------------------

    @property
    def _lock(self) -> FileLock:
        # Made on first use: a fleet node keeps an AccountStore per account for the token
        # file alone and never takes its lock (the row lock is the account's hold there).
        lock = self._file_lock
        if lock is None:
            lock = self._file_lock = FileLock(self.lock_path, directory_what="lock file directory")
        return lock

    @property
    def locked(self) -> bool:
        """True while this object holds the account lock."""
        return self._lock.held

    def try_lock(self) -> bool:
        """Take the account lock without waiting; True on success (or if already ours)."""
        if self._lock.held:
            return self._lock.try_acquire()
        self.check_paths()
        if not self._lock.try_acquire():
            return False
        if self.honour_moved_marker:
            try:  # again under the lock: a migration marks the files while it holds every lock
                check_not_moved(self.state_path.parent, account=self.account)
            except StoreMoved:
                self._lock.release()
                raise
        if not self._cleaned:
            # Holding the lock, no writer of this account is mid-write.
            self._cleaned = True
            for directory in {self.state_path.parent, self.token_path.parent}:
                remove_stale_temp_files(directory)
        return True

    def unlock(self) -> None:
        """Release one level of the lock; the flock is dropped when the outermost level ends."""
        if not self._lock.held:
            raise RuntimeError(f"unlock() of account {self.name!r} without a matching lock")
        self._lock.release()

    def lock_holder(self) -> int | None:
        """Return the pid written into the lock file by its holder, if any."""
        return self._lock.holder()

    @contextmanager
    def lock(self, timeout: float = 10.0) -> Iterator[None]:
        """Hold the account lock for the block; wait up to ``timeout`` s, then StoreLocked."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while not self.try_lock():
            if time.monotonic() >= deadline:
                raise self._locked_error()
            time.sleep(LOCK_POLL)
        try:
            yield
        finally:
            self.unlock()

    @asynccontextmanager
    async def hold(self, wait: float, *, decided_on: int | None = None) -> AsyncIterator[None]:
        """Hold the account for a change (storage.StateStore.hold): its lock, polled.

        Waits up to ``wait`` seconds without blocking the event loop, then StoreLocked. A
        file is written at once by :meth:`save`, so ending the hold commits nothing more.
        ``decided_on`` is not checked: the caller re-reads the file under the lock.
        """
        # asyncio (and the ssl it imports) only here: the CLI reads and writes the files
        # without an event loop, and a command starts faster without it.
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        while not self.try_lock():
            if loop.time() >= deadline:
                raise self._locked_error()
            await asyncio.sleep(min(LOCK_POLL, max(wait / 10, 0.001)))
        try:
            yield
        finally:
            self.unlock()

    def _locked_error(self) -> StoreLocked:
        pid = self.lock_holder()
        who = f"pid {pid}" if pid is not None else "pid unknown"
        return StoreLocked(
            f"account {self.name!r} is busy: {self.lock_path} is held by another "
            f"kakao-tokend process ({who})",
            hint="stop that process (systemctl stop kakao-tokend) or wait for it to finish",
        )

    # -- private state -------------------------------------------------------------------------

    def _damaged(self, reason: str, kept: Path | None) -> StateCorrupt:
        """The error for a damaged state file, moved to ``kept`` (None: left where it is)."""
        where = f"; it was moved to {kept} and left untouched" if kept is not None else ""
        error = StateCorrupt(
            f"state file {self.state_path} of account {self.name!r} is damaged ({reason}){where}",
            path=self.state_path,
            quarantined=kept,
        )
        error.hint = (
            f"restore a backup to {self.state_path}, or log in again with"
            f" `{login_command(self.account)}`"
            + (" (the damaged file is then kept as .corrupt-<time>)" if kept is None else "")
        )
        return error

    def load(self, *, quarantine: bool = True) -> AccountState | None:
        """Return the saved state, or None when there is none.

        A file that cannot be parsed is never overwritten: it is moved to
        ``<file>.corrupt-<UTC stamp>`` and :class:`StateCorrupt` says where and what to do.
        ``quarantine=False`` (the commands that only look: `status`, `doctor`) leaves it
        where it is and says so. Files that `store migrate` moved away are refused
        (:class:`StoreMoved`).
        """
        path = self.state_text
        listing = self._listing
        # One look at the listing answers both questions (no marker? no state file?).
        directory, slash, name = path.rpartition("/")
        entries = None if listing is None else listing.directory(directory or slash or ".")
        if self.honour_moved_marker and (entries is None or MOVED_NAME in entries):
            check_not_moved(self.state_path.parent, account=self.account, listing=listing)
        self._loaded_signature = None
        if entries is not None and name not in entries:
            return None
        for _ in range(3):
            try:
                raw, info = read_regular(path, what="state file")
            except FileNotFoundError:
                return None
            except PermissionError:
                raise StoreError(
                    f"cannot read {self.state_path}: permission denied",
                    hint="run kakao-tokend as the user that owns the state directory",
                ) from None
            except OSError as exc:
                raise StoreError(f"cannot read {self.state_path}: {exc.strerror or exc}") from None
            try:
                state = AccountState.from_dict(parse_json(raw))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
                reason = "the file is empty" if not raw.strip() else _safe_reason(exc)
                if not quarantine:
                    raise self._damaged(reason, None) from None
                kept = self._set_aside(self.state_path, info.st_ino, "corrupt")
                if kept is None:
                    continue  # replaced by another writer meanwhile: read the new file
                log.error("state file %s is damaged (%s); kept as %s", path, reason, kept)
                raise self._damaged(reason, kept) from None
            if state.account != self.name:
                log.warning(
                    "state file %s was written for account %r; using it for account %r",
                    self.state_path,
                    state.account,
                    self.name,
                )
                state = replace(state, account=self.name)
            self._loaded_signature = (info.st_ino, info.st_mtime_ns, info.st_size)
            return state
        raise StoreError(f"state file {self.state_path} keeps changing while being read")

    def _set_aside_hint(self, label: str, exc: OSError) -> str:
        """What to do when a file could not be set aside: what its errno needs (remount,
        free space, permissions: errors.WRITE_FIXES, as for every write), and a new login only for
        a damaged state file (any other copy is made on the way to tokens that work)."""
        hint = write_hint(exc.errno)
        fix = "move it away by hand" if hint is None else str(hint)
        if label == "corrupt":
            return f"{fix}, then run `{login_command(self.account)}`"
        return fix

    def _set_aside(self, path: Path, inode: int, label: str, *, keep: bool = False) -> Path | None:
        """Move ``path`` to ``<name>.<label>-<stamp>`` without clobbering earlier copies.

        Returns where it went, or None when the file was replaced meanwhile (by another writer:
        that one is not ours to move). ``keep`` leaves ``path`` in place: the new name is a
        second link to the same file, which an atomic replacement of ``path`` then leaves as
        the copy (no data copied, nothing that can fail half-way).
        """
        base = f"{path.name}.{label}-{_corrupt_stamp(utcnow())}"
        for index in range(1000):
            target = path.with_name(base if index == 0 else f"{base}-{index}")
            try:
                os.link(path, target)  # fails if target exists: never clobbers
            except FileExistsError:
                continue
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise StoreError(
                    f"{path} ({label}) could not be moved aside: {exc.strerror or exc}",
                    hint=self._set_aside_hint(label, exc),
                ) from None
            try:
                if os.stat(target).st_ino != inode:
                    # Another writer replaced the file after we read it: that one is not ours.
                    os.unlink(target)
                    return None
                if not keep:
                    os.unlink(path)
            except OSError as exc:
                raise StoreError(
                    f"{path} ({label}): a copy is in {target} but the original "
                    f"could not be removed: {exc.strerror or exc}",
                    hint=f"remove it by hand, then run `{login_command(self.account)}`",
                ) from None
            with suppress(OSError):
                _fsync_dir(path.parent)
            return target
        raise StoreError(f"too many {label} copies of {path}; clean them up")

    def set_aside_file(self, path: Path, label: str) -> Path | None:
        """Move one of this account's files to ``<file>.<label>-<stamp>`` (kept, never
        deleted, never clobbering an earlier copy, durably); return where it went, or None
        when there was no file (or it was replaced meanwhile)."""
        try:
            inode = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {path}: {exc.strerror or exc}") from None
        return self._set_aside(path, inode, label)

    def set_aside_state(self, label: str, *, keep: bool = False) -> Path | None:
        """Move the current state file to ``<file>.<label>-<stamp>`` (kept, never deleted).

        Used for a state the daemon refuses to adopt (an older backup); returns where it went,
        or None when there was no file (or it was replaced meanwhile). ``keep`` leaves the
        file in place too (a second link: the save that replaces it leaves the copy). Hold
        the lock.
        """
        if not keep:
            return self.set_aside_file(self.state_path, label)
        try:
            info = os.stat(self.state_path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {self.state_path}: {exc.strerror or exc}") from None
        if info.st_nlink > 1:
            # Kept already (each start that recovers a rescue file while the disk is still
            # full keeps the same unchanged file again): that copy is the one, no other link.
            kept = self._kept_link(self.state_path, info, label)
            if kept is not None:
                return kept
        return self._set_aside(self.state_path, info.st_ino, label, keep=True)

    @staticmethod
    def _kept_link(path: Path, info: os.stat_result, label: str) -> Path | None:
        """Return a ``<name>.<label>-*`` beside ``path`` that is the same file, if any."""
        prefix = f"{path.name}.{label}-"
        try:
            entries = list(os.scandir(path.parent))
        except OSError:
            return None
        for entry in entries:
            if entry.name.startswith(prefix):
                with suppress(OSError):
                    found = entry.stat(follow_symlinks=False)
                    if (found.st_ino, found.st_dev) == (info.st_ino, info.st_dev):
                        return Path(entry.path)
        return None

    def save_keeping_a_copy(
        self, state: AccountState, label: str, *, copy_required: bool = True
    ) -> Path | None:
        """Save ``state`` over the state file, keeping the file it replaces as
        ``<file>.<label>-<stamp>``; return the copy's path (None when there was no file).

        The copy is made first and the save is atomic, so a failed save (a full disk) leaves
        the live file as it was, and the copy is removed again. A copy that cannot be made
        (a hard link refused: no inode left, a file system without links) raises StoreError,
        nothing changed — unless ``copy_required`` is False: tokens Kakao has just issued
        come first, so they are saved without it (logged). Hold the lock.
        """
        try:
            inode = os.stat(self.state_path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            self.save(state)
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {self.state_path}: {exc.strerror or exc}") from None
        try:
            copy = self._set_aside(self.state_path, inode, label, keep=True)
        except StoreError as exc:
            if copy_required:
                raise
            log.warning("%s; saving the new tokens without that copy", exc)
            copy = None
        try:
            self.save(state)
        except BaseException:
            if copy is not None:
                with suppress(OSError):
                    os.unlink(copy)
            raise
        return copy

    def restore_backup(self, backup: AccountState, *, source: Path, now: datetime) -> AccountState:
        """Put ``backup`` in place as the account's newest state (`kakao-tokend restore`).

        A running daemon refuses a state file that goes backwards (an old backup copied over
        the live one by mistake). Restoring on purpose gives the backup a generation above
        everything on disk and a marker naming that generation, which the daemon honours
        (state.forced_restore). The file that was there is kept as ``.replaced-<stamp>``.
        Hold the account lock.
        """
        try:
            current = self.load()
        except StateCorrupt:
            current = None
        generation = max(backup.generation + 1, self.next_generation(current))
        marker = {
            "at": format_time(now),
            "from": str(source),
            "from_generation": backup.generation,
            "generation": generation,
        }
        state = replace(
            backup,
            account=self.name,
            generation=generation,
            extras={**backup.extras, RESTORED_KEY: marker},
        )
        self.save_keeping_a_copy(state, "replaced")
        self.publish(state, now=now)
        return state

    # -- rescue file ---------------------------------------------------------------------------

    def ready_rescue_dir(self) -> None:
        """Create the rescue file's directory (the runtime directory) when it is missing."""
        if self.rescue_path is not None:
            make_dirs(self.rescue_path.parent)

    def save_rescue(self, state: AccountState) -> bool:
        """Write ``state`` to the rescue file (0600); return True when it is there.

        The rescue file is where tokens go that the state file could not take (disk full even
        after giving up the reserve, read-only file system): it lives in the runtime directory,
        normally a tmpfs on another file system, so a kill -9 loses nothing. It names the state
        file it belongs to, and is read back at start by :meth:`load_rescue`.
        """
        if self.rescue_path is None:
            return False
        document = {
            "version": RESCUE_VERSION,
            "state_file": str(self.state_path),
            "saved_at": format_time(utcnow()),
            "state": state.to_dict(),
        }
        data = json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n"
        try:
            atomic_write(self.rescue_path, data, mode=STATE_FILE_MODE)
        except StoreError as exc:
            self._rescue_failed = rescue_not_written(self.name, exc, self._rescue_failed)
            return False
        rescue_written(self.name, self.rescue_path, self._rescue_failed)
        self._rescue_failed = None
        return True

    def load_rescue(self) -> AccountState | None:
        """Return the state kept in the rescue file, or None (none, damaged, or not ours).

        A damaged rescue file is moved aside (``.corrupt-<stamp>``) and logged, never used.
        """
        if self._rescue_dir is None or (
            self._listing is not None
            and self._listing.absent(f"{self._rescue_dir}/{self.name}{RESCUE_SUFFIX}")
        ):
            return None  # (the text, not rescue_path: no Path built for a file not there)
        path = self.rescue_path
        if path is None:
            return None
        try:
            raw, info = read_regular(path, what="rescue file")
        except FileNotFoundError:
            return None
        except StoreError as exc:  # a symlink or a FIFO planted in the runtime directory
            log.error("account %s: %s", self.name, exc)
            return None
        except OSError as exc:
            log.error("account %s: cannot read %s: %s", self.name, path, exc.strerror or exc)
            return None
        foreign = _private_file_problem(info, path, "rescue file")
        if foreign is not None:
            self._refuse_rescue(path, foreign)
            return None
        try:
            document = parse_json(raw)
            if not isinstance(document, dict) or document.get("version") != RESCUE_VERSION:
                raise ValueError("not a rescue file of this version")
            owner = document.get("state_file")
            state = AccountState.from_dict(document.get("state"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            with suppress(OSError, StoreError):
                kept = self.set_aside_file(path, "corrupt")
                log.error(
                    "account %s: rescue file %s is damaged (%s); kept as %s",
                    self.name,
                    path,
                    _safe_reason(exc),
                    kept,
                )
            return None
        if owner != self.state_text:
            log.warning(
                "account %s: ignoring rescue file %s: it belongs to %s, not %s",
                self.name,
                path,
                owner,
                self.state_path,
            )
            return None
        return replace(state, account=self.name)

    def _refuse_rescue(self, path: Path, why: UnsafePath) -> None:
        """A rescue file kakao-tokend did not write as itself (0600, its own user): never
        recovered (another user may have planted other tokens in it), never deleted either
        (it may still hold tokens someone wants): kept aside as ``.refused-<stamp>``."""
        try:
            kept = self.set_aside_file(path, "refused")
        except StoreError as exc:
            kept, failed = None, f"; it could not be moved aside ({exc.message})"
        else:
            failed = ""
        where = kept if kept is not None else path
        fix = (why.hint or "").replace(str(path), str(where))
        log.error(
            "account %s: %s; refused: kept as %s, not used%s (if you trust the tokens in it:"
            " %s && mv %s %s; else: rm %s)",
            self.name,
            why.message,
            where,
            failed,
            fix,
            where,
            path,
            where,
        )

    def discard_rescue(self) -> None:
        """Delete the rescue file once the state file holds what it kept (missing is fine)."""
        self._rescue_failed = None  # the state file took the tokens: that episode is over
        if self.rescue_path is None:
            return
        try:
            unlink_durably(self.rescue_path)
        except OSError as exc:
            log.warning("account %s: cannot remove %s: %s", self.name, self.rescue_path, exc)

    def set_aside_rescue(self, label: str) -> Path | None:
        """Keep the rescue file under ``<file>.<label>-<stamp>``: never recovered, never lost."""
        path = self.rescue_path
        if path is None:
            return None
        try:
            return self.set_aside_file(path, label)
        except StoreError as exc:
            log.warning("account %s: %s", self.name, exc)
            return None

    def save(self, state: AccountState) -> None:
        """Write the state file atomically with mode 0600 (it holds the refresh token)."""
        data = json.dumps(state.to_dict(), indent=2, ensure_ascii=False).encode() + b"\n"
        target = self.state_path
        try:
            atomic_write(target, data, mode=STATE_FILE_MODE)
        except StoreWriteError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not release_reserve(target.parent):
                raise
            log.warning(
                "disk full while saving %s: gave up the emergency reserve to save it; free some"
                " space soon",
                target,
            )
            self._reserve_released = target.parent
            atomic_write(target, data, mode=STATE_FILE_MODE)

    def restore_reserve(self) -> bool:
        """Re-create the emergency reserve once the disk has room again (after a save).

        Given up by a save of this process, or missing since before it started: the start
        could not make one on a full disk (nor after a kill -9 while the disk was full),
        and nothing else would ever make it.
        """
        directory = self._reserve_released
        if directory is None:
            directory = self.state_path.parent
            if os.path.lexists(os.path.join(directory, RESERVE_NAME)):
                return True
        try:
            info = os.statvfs(directory)
        except OSError:
            return False
        if info.f_bavail * info.f_frsize < 2 * RESERVE_SIZE or not ensure_reserve(directory):
            return False
        self._reserve_released = None
        return True

    def state_signature(self) -> tuple[int, int, int] | None:
        """Return (inode, mtime_ns, size) of the state file (None if absent) to spot changes."""
        try:
            info = os.stat(self.state_text, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {self.state_path}: {exc.strerror or exc}") from None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def loaded_signature(self) -> tuple[int, int, int] | None:
        """Return the signature of the state file load() read, from the descriptor it read."""
        return self._loaded_signature

    def shared_due_at(self, state: AccountState) -> datetime | None:
        """Files plan nothing for the manager: it plans each refresh itself."""
        return None

    async def catch_up(self) -> bool:
        """A state file is read afresh each time: never behind."""
        return False

    # -- published token file ------------------------------------------------------------------

    def published_document(self, state: AccountState, *, now: datetime) -> dict[str, Any]:
        """Return the published JSON: Kakao's field names plus absolute times and metadata."""
        tokens = state.tokens
        document: dict[str, Any] = {
            "access_token": tokens.access_token,
            "token_type": tokens.token_type,
            "expires_in": max(int(tokens.access_remaining(now).total_seconds()), 0),
            "refresh_token_expires_in": max(int(tokens.refresh_remaining(now).total_seconds()), 0),
            "scope": tokens.scope,
            "expires_at": format_time(tokens.access_expires_at),
            "refresh_token_expires_at": format_time(tokens.refresh_expires_at),
            "refresh_token_expires_estimated": tokens.refresh_expiry_estimated,
            "refreshed_at": format_time(state.refreshed_at) if state.refreshed_at else None,
            "generation": state.generation,
            "account": self.name,
        }
        if self.account.include_refresh_token:
            document["refresh_token"] = tokens.refresh_token
        return document

    def _group_id(self) -> int | None:
        if not self._gid_resolved:
            self._gid = resolve_group(self.account.token_file_group)
            self._gid_resolved = True
        return self._gid

    def publish(self, state: AccountState, *, now: datetime | None = None) -> None:
        """Write the token file for other programs, atomically, with the configured mode/group.

        Consumer contract: every publish replaces the file (new inode) via rename, so a reader
        sees the old or the new document, never a partial one. An inotify watch on the *file*
        stays on the old inode and sees no new content; watch the *directory* for
        ``IN_MOVED_TO`` of the file's name, ignore names starting with ``.``, and re-open the
        file on each event.
        """
        document = self.published_document(state, now=now or utcnow())
        data = json.dumps(document, indent=2, ensure_ascii=False).encode() + b"\n"
        atomic_write(
            self.token_path,
            data,
            mode=self.account.token_file_mode,
            group=self._group_id(),
        )

    def publish_sinks(self, state: AccountState) -> list[str]:
        """Write the extra token files (bare access token, env file); return what failed.

        Each is replaced atomically with the token file's mode and group. Failures are
        returned as readable lines (the caller marks the publish pending), never raised.
        """
        account = self.account
        if account.access_token_file is None and account.env_file is None:
            return []  # the usual case (and at start, once per account)
        targets = [
            (account.access_token_file, state.tokens.access_token.encode()),
            (account.env_file, f"KAKAO_ACCESS_TOKEN={state.tokens.access_token}\n".encode()),
        ]
        wanted = [(Path(path), data) for path, data in targets if path is not None]
        try:
            group = self._group_id()
        except StoreError as exc:
            return [f"cannot write the extra token files: {exc}"]
        problems = []
        for path, data in wanted:
            try:
                atomic_write(path, data, mode=account.token_file_mode, group=group)
            except StoreError as exc:
                problems.append(str(exc))
        return problems

    def read_published(self) -> dict[str, Any] | None:
        """Return the published token document, or None when there is no token file."""
        if self._listing is not None and self._listing.absent(self.token_text):
            return None
        try:
            raw = read_file(self.token_text, what="token file")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.token_path}: {exc.strerror or exc}") from None
        try:
            document = parse_json(raw)
        except ValueError as exc:
            raise StoreError(
                f"token file {self.token_path} is damaged ({_safe_reason(exc)})",
                hint="it is rewritten at the next refresh; "
                f"`{cli_command(self.account, 'refresh')}` forces one",
            ) from None
        if not isinstance(document, dict):
            raise StoreError(f"token file {self.token_path} is not a JSON object")
        return document

    def published_current(self, generation: int) -> bool:
        """True when the token file holds ``generation`` with [publish]'s mode and group, so
        a start need not write it (a thousand current files stay untouched). Missing, damaged
        or older: False. A mode or group changed by hand (a chmod 644 gives every local user
        the token) is False too, and logged: the start rewrites the file at once instead of
        at the next refresh, hours later."""
        if self._listing is not None and self._listing.absent(self.token_text):
            return False
        try:
            raw, info = read_regular(self.token_text, what="token file")
            document = parse_json(raw)
            group = self._group_id()
        except (OSError, StoreError, ValueError):
            return False  # the publish that follows says what is wrong, if anything is
        if not isinstance(document, dict) or document.get("generation") != generation:
            return False
        mode = self.account.token_file_mode
        if published_as_configured(info, mode=mode, group=group):
            return True
        wanted = os.getegid() if group is None else group
        log.warning(
            "account %s: token file %s has mode %04o and group %s, not %04o and %s as"
            " configured ([publish] mode, group); writing it again now",
            self.name,
            self.token_path,
            stat.S_IMODE(info.st_mode),
            _group_name(info.st_gid),
            mode,
            _group_name(wanted),
        )
        return False

    # -- alert bookkeeping ---------------------------------------------------------------------

    def load_alerts(self) -> dict[str, Any] | None:
        """Return the saved alert bookkeeping, or None when there is none or it is unreadable.

        It only prevents repeats, so a damaged file is logged and treated as empty.
        """
        if self._no_alerts_listed:
            # Once: a thousand accounts attach their alerts after the start's listing is
            # closed, and a failed open costs each of them an exception.
            self._no_alerts_listed = False
            return None
        if self._alerts_absent():
            return None
        try:
            raw = read_file(self.alerts_path, what="alert bookkeeping file")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s: %s", self.alerts_path, exc.strerror or exc)
            return None
        except StoreError as exc:
            log.warning("ignoring %s", exc)
            return None
        try:
            document = parse_json(raw)
        except ValueError as exc:
            log.warning("ignoring damaged %s (%s)", self.alerts_path, _safe_reason(exc))
            return None
        return document if isinstance(document, dict) else None

    def save_alerts(self, document: dict[str, Any]) -> None:
        """Write the alert bookkeeping atomically (0600); raises StoreWriteError.

        Compact: it is rewritten at every change of an alert, and json's C encoder runs only
        without ``indent`` (with it, a pure-Python one: about three times the CPU for a
        bookkeeping of three alerts).
        """
        data = json.dumps(document, ensure_ascii=False).encode() + b"\n"
        self._no_alerts_listed = False
        atomic_write(self.alerts_path, data, mode=STATE_FILE_MODE)

    # -- generations across a logout, and the logout itself -----------------------------------

    def _generation_in(self, path: Path, what: str) -> int:
        """The ``generation`` of the JSON document at ``path`` (0: missing, damaged, a symlink
        — which is not followed — or without one)."""
        try:
            document = parse_json(read_file(path, what=what))
        except (OSError, StoreError, ValueError):
            return 0
        generation = document.get("generation") if isinstance(document, dict) else None
        if isinstance(generation, int) and not isinstance(generation, bool):
            return generation
        return 0

    def last_generation(self) -> int:
        """The highest generation the account's files remember besides its state file: the
        published token file's and the one the last `logout` recorded (0: neither)."""
        return max(
            self._generation_in(self.token_path, "token file"),
            self._generation_in(self.logged_out_path, "logout record"),
        )

    def next_generation(self, old: AccountState | None) -> int:
        """The generation of a new token set that replaces ``old`` (a login, an import).

        One above every generation the account had, so that it never goes backwards: not
        across a logout (which records the generation it removed, :meth:`remove`), nor after
        a state file deleted by hand (its token file still tells). Consumers, hooks and
        templates take a generation that is not above the last one for tokens they had.
        Hold the account lock.
        """
        return max(old.generation if old is not None else 0, self.last_generation()) + 1

    def record_logout(self, generation: int) -> bool:
        """Write the logout record for ``generation`` (atomically, 0600) unless it says as much
        already; True when written. StoreError when it cannot be written."""
        if generation <= self._generation_in(self.logged_out_path, "logout record"):
            return False
        document = {"account": self.name, "generation": generation, "at": format_time(utcnow())}
        atomic_write(
            self.logged_out_path,
            json.dumps(document).encode() + b"\n",
            mode=STATE_FILE_MODE,
        )
        return True

    def _record_logout(self, generation: int) -> None:
        """:meth:`record_logout`, logging a failure: the logout goes on, and the next login
        counts from what the other files remember."""
        try:
            self.record_logout(generation)
        except StoreError as exc:
            log.warning(
                "cannot record the generation logged out (%s); the next login may count from"
                " 1 again",
                exc,
            )

    def remove(
        self, *, generation: int = 0, outputs: Iterable[Path] = ()
    ) -> tuple[list[Path], list[str]]:
        """Log the account out on disk (`logout`); return the files removed and the problems.

        First the generation logged out — ``generation`` (the state's), or the token file's
        when that is higher — is recorded in :attr:`logged_out_path`, so that the next login
        continues from it (:meth:`next_generation`). Then the rescue file, the state file and
        the token file go (a failure raises StoreWriteError), and every other copy of the
        access token: the extra token files and ``outputs`` (the rendered templates), whose
        failures are returned, since the tokens are logged out anyway. Missing is fine.
        """
        self._record_logout(max(generation, self.last_generation()))
        self.discard_rescue()
        marker = in_flight_path(self.rescue_path, self.name)
        if marker is not None:  # a refresh that was in flight is no one's now
            with suppress(OSError):
                os.unlink(marker)
        removed: list[Path] = []
        for path in (self.state_path, self.token_path):
            try:
                if unlink_durably(path):
                    removed.append(path)
            except OSError as exc:
                raise _write_error(path, exc, "remove") from None
        more, problems = remove_outputs([*sink_paths(self.account), *outputs])
        return removed + more, problems

    def withdraw(self, *, outputs: Iterable[Path] = ()) -> tuple[list[Path], list[str]]:
        """The state file is gone while the daemon runs (a logout by another process, or an
        operator's ``rm``): remove what was published from it as :meth:`remove` does — the
        token file, the extra token files and ``outputs`` — recording its generation first.

        Only under the account lock and while the state file is still absent: a login that
        is writing new files holds the lock (and the daemon adopts what it wrote), a logout
        removes them itself. Return the files removed and the problems; nothing when another
        process holds the lock.
        """
        try:
            if not self.try_lock():
                return [], []
        except StoreError as exc:
            return [], [str(exc)]
        try:
            if os.path.lexists(self.state_path):
                return [], []
            self._record_logout(self.last_generation())
            return remove_outputs([self.token_path, *sink_paths(self.account), *outputs])
        finally:
            self.unlock()
