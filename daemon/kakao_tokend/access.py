"""Who can reach a file: the directory-chain permission checks behind doctor and check-config.

A consumer reads the token file, or connects to the API socket, only if it may search (x) every
directory from ``/`` down to it and may read the file (or write the socket: connecting to a
Unix socket needs write permission on it). One directory without the bit is enough to lock it
out, and the error it then gets (``EACCES``) names neither the directory nor the fix. This
module finds the directory that blocks, and says what to run.

Two ways to check:

* :func:`find_blocker` reads the mode bits along the chain, the way the kernel does (owner,
  then group, then others). It works for any user or group, without privileges; it cannot see
  ACLs, and a user's groups are those of the group database.
* :func:`probe` asks the kernel itself, by running ``test -r`` / ``test -w`` as that user or
  group. Only root can do that; it honours ACLs and mount options.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "Blocked",
    "Identity",
    "Need",
    "current_identity",
    "describe",
    "find_blocker",
    "group_identity",
    "identity_for",
    "probe",
    "user_identity",
]

#: What the last path component must allow: reading a file, or connecting to a socket.
Need = Literal["read", "connect"]

#: The unprivileged user a group check runs as (any member of the group who owns nothing).
NOBODY_UID = 65534


@dataclass(frozen=True)
class Identity:
    """A user, or "any member of a group", whose access is checked."""

    kind: Literal["user", "group"]
    name: str
    #: The user's uid; None for a group (a member who owns none of the paths).
    uid: int | None
    #: The user's primary group, or the group itself.
    gid: int
    #: Every group the identity belongs to (for a user: primary plus supplementary).
    gids: frozenset[int]

    @property
    def label(self) -> str:
        """Return "user alice" or "group kakao-tokend" for messages."""
        return f"{self.kind} {self.name}"

    @property
    def is_root(self) -> bool:
        """Return True for root, who passes every permission check on a directory."""
        return self.uid == 0


def user_identity(name: str) -> Identity:
    """Return the identity of user ``name`` with the groups of the group database (KeyError)."""
    entry = pwd.getpwnam(name)
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Identity("user", entry.pw_name, entry.pw_uid, entry.pw_gid, groups | {entry.pw_gid})


def group_identity(name: str) -> Identity:
    """Return "any member of group ``name``" (``name`` may be a numeric gid; KeyError)."""
    entry = grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
    return Identity("group", entry.gr_name, None, entry.gr_gid, frozenset({entry.gr_gid}))


def identity_for(name: str) -> Identity:
    """Resolve ``--consumer USER|GROUP``: a user when one has that name, else a group.

    Raises ValueError with a readable message when neither exists.
    """
    try:
        return user_identity(name)
    except KeyError:
        pass
    try:
        return group_identity(name)
    except (KeyError, ValueError, OverflowError):
        raise ValueError(
            f"no user or group named {name!r} on this machine"
            f" (check with: getent passwd {name}; getent group {name})"
        ) from None


def current_identity() -> Identity:
    """Return the calling process's identity (effective uid, its real group list)."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    gids = frozenset({os.getegid(), *os.getgroups()})
    return Identity("user", name, uid, os.getegid(), gids)


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def describe(info: os.stat_result) -> str:
    """Return "owner:group 0750" for a stat result."""
    return f"{_owner(info.st_uid)}:{_group(info.st_gid)} {stat.S_IMODE(info.st_mode):04o}"


@dataclass(frozen=True)
class Blocked:
    """The path that locks an identity out, why, and what to run."""

    path: Path
    reason: str
    #: The command that opens the way (None when the caller must supply it, e.g. a config
    #: setting for the file the daemon itself rewrites).
    fix: str | None
    #: True when the blocker is the target itself rather than a directory on the way.
    is_target: bool = False


def _allowed(
    info: os.stat_result, who: Identity, bit_owner: int, bit_group: int, bit_other: int
) -> bool:
    """Apply the kernel's owner → group → others rule (no ACLs)."""
    mode = info.st_mode
    if who.uid is not None and who.uid == info.st_uid:
        return bool(mode & bit_owner)
    if info.st_gid in who.gids:
        return bool(mode & bit_group)
    return bool(mode & bit_other)


def _directory_fix(path: Path, info: os.stat_result, who: Identity, own: bool) -> str:
    """Return the smallest command that lets ``who`` search ``path``."""
    if info.st_gid in who.gids and (who.uid is None or who.uid != info.st_uid):
        return f"chmod g+x {path}"
    if who.kind == "user" and info.st_mode & stat.S_IXGRP and info.st_gid != 0:
        # The group may pass: the user only has to join it (read at login). Never root's group.
        return f"usermod -aG {_group(info.st_gid)} {who.name}  (then log in again)"
    if own:
        group = who.name if who.kind == "group" else _group(who.gid)
        return f"chgrp {group} {path} && chmod g+x {path}"
    # Someone else's directory (a home directory, say): let everybody pass, but not list it.
    return f"chmod o+x {path}"


def find_blocker(
    target: Path,
    who: Identity,
    *,
    need: Need,
    own_dirs: Iterable[Path] = (),
) -> Blocked | None:
    """Return what keeps ``who`` from reading (or connecting to) ``target``; None if nothing.

    Walks from ``/`` down to ``target`` with the mode bits. A directory in ``own_dirs`` (ours:
    the state or runtime directory) gets a ``chgrp`` fix; another one ``chmod o+x``. A missing
    ``target`` is checked up to its parent: the way there is what matters before it exists.
    Paths this process cannot stat are reported as such (run as root for the whole picture).
    """
    if who.is_root:
        return None
    target = Path(os.path.abspath(target))
    own = {Path(os.path.abspath(p)) for p in own_dirs}
    chain = [*reversed(target.parents), target]
    for index, path in enumerate(chain):
        last = index == len(chain) - 1
        try:
            info = os.stat(path)
        except FileNotFoundError:
            if last:
                return None  # the way to it is open; the file comes later
            group = f" -g {who.name}" if who.kind == "group" else ""
            return Blocked(path, "does not exist", f"install -d -m 0750{group} {path}")
        except OSError as exc:
            return Blocked(
                path,
                f"cannot be inspected from here ({exc.strerror}); run the check as root",
                None,
            )
        if not last or stat.S_ISDIR(info.st_mode):
            if not stat.S_ISDIR(info.st_mode):
                return Blocked(path, "is not a directory", None)
            if not last and not _allowed(info, who, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                return Blocked(
                    path,
                    f"is {describe(info)}: no search (x) permission for {who.label}",
                    _directory_fix(path, info, who, path in own),
                )
            continue
        if need == "read":
            bits = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
            verb = "read (r)"
        else:
            bits = (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)
            verb = "connect (w)"
        if not _allowed(info, who, *bits):
            fix = None
            if who.kind == "user" and info.st_mode & bits[1] and info.st_gid not in (0, *who.gids):
                fix = f"usermod -aG {_group(info.st_gid)} {who.name}  (then log in again)"
            return Blocked(
                path, f"is {describe(info)}: no {verb} permission for {who.label}", fix, True
            )
    return None


def probe(target: Path, who: Identity, *, need: Need) -> bool | None:
    """Ask the kernel whether ``who`` may read (connect to) ``target``; None if we cannot ask.

    Runs ``test -r``/``test -w`` with the identity's uid and groups, which only root can do;
    a group is checked as an unprivileged member (uid 65534) of that group alone.
    """
    if os.geteuid() != 0:
        return None
    test = shutil.which("test")
    if test is None:
        return None
    uid = who.uid if who.uid is not None else NOBODY_UID
    flag = "-r" if need == "read" else "-w"
    try:
        done = subprocess.run(
            [test, flag, str(target)],
            user=uid,
            group=who.gid,
            extra_groups=sorted(who.gids),
            check=False,
            timeout=10,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.returncode == 0
