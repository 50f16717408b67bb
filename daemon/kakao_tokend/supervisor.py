"""Who runs the daemon (systemd's system or a user's manager, or a person): its log and restart.

The one home of "which command shows my log" and "which command restarts me", for every
text that names them (health.py's fixes, the memo's pointer to the log, the refresher's log
lines). A :class:`Supervisor` is plain data: systemd.supervisor() finds the running daemon's
(``INVOCATION_ID``, ``/proc/self/cgroup``, where stderr goes) and service.run() makes it this
process's with :func:`use`; a command run from a shell uses :func:`for_config` (the system
unit for the system config, the user's unit otherwise, as doctor's unit check decides).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import paths
from .i18n import N_, Message

__all__ = ["UNIT", "Supervisor", "current", "for_config", "unit_from_cgroup", "use"]

Manager = Literal["system", "user"]
#: The shipped units' name (systemd/kakao-tokend.service, systemd/user/kakao-tokend.service).
UNIT = "kakao-tokend"
#: A user's service manager in a cgroup path: user@UID.service.
_USER_MANAGER = re.compile(r"user@\d+\.service")


@dataclass(frozen=True)
class Supervisor:
    """How the daemon runs: under which service manager (None: not under systemd), as which
    unit, and the file its log goes to when that is not the journal (None: the journal, or
    by hand its standard error)."""

    manager: Manager | None
    unit: str = UNIT
    log_file: str | None = None

    @property
    def log_command(self) -> str | None:
        """Return the command that shows the log (None: it is a file, or stderr)."""
        if self.manager is None or self.log_file is not None:
            return None
        option = ["-u"] if self.manager == "system" else ["--user-unit"]
        return shlex.join(["journalctl", *option, self.unit])

    @property
    def log(self) -> Message:
        """Return where the log is, for a text: "`journalctl -u kakao-tokend`" ..."""
        command = self.log_command
        if command is not None:
            return Message.verbatim(f"`{command}`")
        if self.log_file is not None:
            return N_("the file {path}", path=self.log_file)
        return N_("the standard error of `kakao-tokend run`")

    @property
    def restart_command(self) -> str | None:
        """Return the command that restarts the daemon (None: no manager does it)."""
        if self.manager is None:
            return None
        scope = [] if self.manager == "system" else ["--user"]
        return shlex.join(["systemctl", *scope, "restart", self.unit])

    @property
    def restart(self) -> Message:
        """Return the restart as an instruction: "run `systemctl restart kakao-tokend`" ..."""
        command = self.restart_command
        if command is None:
            return N_("restart kakao-tokend")
        return N_("run `{command}`", command=command)


#: The process's supervisor until use() says otherwise: the system unit, the shipped service.
_current = Supervisor("system")


def current() -> Supervisor:
    """Return this process's supervisor (see :func:`use`)."""
    return _current


def use(supervisor: Supervisor) -> Supervisor:
    """Make ``supervisor`` this process's; return the one it replaces."""
    global _current
    before, _current = _current, supervisor
    return before


def for_config(source: Path | None, *, euid: int | None = None) -> Supervisor:
    """Return the unit that runs the daemon of the config ``source``, for a command run from
    a shell: the system unit for the system config (or for root), the user's otherwise."""
    uid = os.geteuid() if euid is None else euid
    system = paths.is_system_config(source) or uid == 0
    return Supervisor("system" if system else "user")


def unit_from_cgroup(text: str) -> tuple[Manager, str] | None:
    """Return (manager, unit without ".service") from a /proc/PID/cgroup text, or None when
    the process is in no service (a login session's scope, a container's root ...).

    cgroup v2's line (``0::PATH``) or v1's systemd hierarchy (``N:name=systemd:PATH``); the
    innermost ``.service`` of the path is the unit (a unit with ``Delegate=`` may put its
    process in a group below it), and a ``user@UID.service`` above it means a user's manager.
    """
    unified, legacy = [], []
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, where = rest.partition(":")
        if controllers == "":
            unified.append(where)
        elif controllers == "name=systemd":
            legacy.append(where)
    for path in (*unified, *legacy):
        found = _unit_in(path)
        if found is not None:
            return found
    return None


def _unit_in(path: str) -> tuple[Manager, str] | None:
    parts = [part for part in path.split("/") if part]
    for at in range(len(parts) - 1, -1, -1):
        part = parts[at]
        if _USER_MANAGER.fullmatch(part):
            return None  # the user manager's own group (init.scope ...): not a service of it
        if part.endswith(".service"):
            manager: Manager = (
                "user" if any(_USER_MANAGER.fullmatch(p) for p in parts[:at]) else "system"
            )
            return manager, part.removesuffix(".service")
    return None
