"""access.py: which directory keeps a user or group from a file, and the command that opens it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kakao_tokend import access

IS_ROOT = os.geteuid() == 0
#: A user that is nobody's owner here: uid and group 65534 (nobody/nogroup on Debian).
STRANGER = access.Identity("user", "nobody", 65534, 65534, frozenset({65534}))
NOGROUP = access.Identity("group", "nogroup", None, 65534, frozenset({65534}))


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory under /tmp that everyone may enter (pytest's own tmp is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="kakao-access-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def make(path: Path, mode: int, *, gid: int = -1, directory: bool = True) -> Path:
    """Create ``path`` (a directory or a file) with ``mode`` and optionally a group."""
    if directory:
        path.mkdir()
    else:
        path.write_text("{}")
    path.chmod(mode)
    if gid >= 0 and IS_ROOT:
        os.chown(path, -1, gid)
    return path


class TestFindBlocker:
    """The mode bits along the chain, the way the kernel applies them."""

    def test_a_private_directory_on_the_way_is_named_with_its_fix(self, shared: Path) -> None:
        """A 0700 directory blocks a stranger; someone else's directory gets `chmod o+x`."""
        private = make(shared / "private", 0o700)
        target = make(private / "token.json", 0o644, directory=False)
        blocked = access.find_blocker(target, STRANGER, need="read")
        assert blocked is not None
        assert blocked.path == private
        assert "no search (x) permission for user nobody" in blocked.reason
        assert blocked.fix == f"chmod o+x {private}"
        assert not blocked.is_target

    def test_our_own_directory_gets_the_group(self, shared: Path) -> None:
        """The state directory (ours) gets the group and g+x instead of opening it to all."""
        state = make(shared / "state", 0o700)
        target = state / "default.token.json"
        blocked = access.find_blocker(target, NOGROUP, need="read", own_dirs=[state])
        assert blocked is not None and blocked.path == state
        assert blocked.fix == f"chgrp nogroup {state} && chmod g+x {state}"

    @pytest.mark.skipif(not IS_ROOT, reason="needs root to give a directory another group")
    def test_group_without_x_gets_chmod_g_x(self, shared: Path) -> None:
        """The directory already has the group, only the bit is missing."""
        state = make(shared / "state", 0o700, gid=65534)
        blocked = access.find_blocker(state / "f", NOGROUP, need="read")
        assert blocked is not None and blocked.fix == f"chmod g+x {state}"

    @pytest.mark.skipif(not IS_ROOT, reason="needs root to give a file another group")
    def test_a_user_outside_the_group_is_told_to_join_it(self, shared: Path) -> None:
        """When the group may read, a user just has to join it (never root's group)."""
        state = make(shared / "state", 0o750, gid=65534)
        outsider = access.Identity("user", "alice", 4242, 4242, frozenset({4242}))
        blocked = access.find_blocker(state / "f", outsider, need="read")
        assert blocked is not None
        assert blocked.fix == "usermod -aG nogroup alice  (then log in again)"
        root_group = make(shared / "rootgroup", 0o750, gid=0)
        blocked = access.find_blocker(root_group / "f", outsider, need="read")
        assert blocked is not None and "usermod" not in str(blocked.fix)

    def test_the_target_itself(self, shared: Path) -> None:
        """An unreadable file (the daemon's own) is reported as the target, fix left open."""
        target = make(shared / "token.json", 0o600, directory=False)
        blocked = access.find_blocker(target, STRANGER, need="read")
        assert blocked is not None and blocked.is_target and blocked.fix is None
        assert "no read (r) permission" in blocked.reason

    def test_connecting_needs_write_on_the_socket(self, shared: Path) -> None:
        """A socket readable but not writable by others cannot be connected to."""
        target = make(shared / "api.sock", 0o644, directory=False)
        blocked = access.find_blocker(target, STRANGER, need="connect")
        assert blocked is not None and "no connect (w) permission" in blocked.reason
        assert access.find_blocker(target, STRANGER, need="read") is None

    def test_an_open_way_and_a_missing_file(self, shared: Path) -> None:
        """Nothing blocks when every directory lets others pass; a missing file is fine."""
        assert access.find_blocker(shared / "not-yet.json", STRANGER, need="read") is None

    def test_a_missing_directory_is_reported_with_the_group_in_the_fix(self, shared: Path) -> None:
        """A directory that is not there yet: create it with the group before the daemon does."""
        blocked = access.find_blocker(shared / "state" / "f", NOGROUP, need="read")
        assert blocked is not None and blocked.reason == "does not exist"
        assert blocked.fix == f"install -d -m 0750 -g nogroup {shared / 'state'}"

    def test_root_passes_everything(self, shared: Path) -> None:
        """Root needs no bits on directories."""
        private = make(shared / "private", 0o700)
        root = access.Identity("user", "root", 0, 0, frozenset({0}))
        assert access.find_blocker(private / "x", root, need="read") is None


@pytest.mark.skipif(not IS_ROOT, reason="probing as another user needs root")
class TestProbe:
    """The kernel's own answer, as the user or group."""

    def test_probe_agrees_with_the_bits(self, shared: Path) -> None:
        """A stranger may read a 0644 file in the open, not one behind a 0700 directory."""
        open_file = make(shared / "open.json", 0o644, directory=False)
        private = make(shared / "private", 0o700)
        hidden = make(private / "hidden.json", 0o644, directory=False)
        assert access.probe(open_file, STRANGER, need="read") is True
        assert access.probe(hidden, STRANGER, need="read") is False

    def test_a_group_member_reads_a_group_file(self, shared: Path) -> None:
        """0640 root:nogroup is readable for members of nogroup, not for others."""
        target = make(shared / "token.json", 0o640, gid=65534, directory=False)
        assert access.probe(target, NOGROUP, need="read") is True
        other = access.Identity("group", "g4242", None, 4242, frozenset({4242}))
        assert access.probe(target, other, need="read") is False


class TestIdentity:
    """--consumer USER|GROUP."""

    def test_user_wins_over_group(self) -> None:
        """A name that is a user resolves to the user, with its groups."""
        who = access.identity_for("nobody")
        assert who.kind == "user" and who.uid == 65534

    def test_group_when_there_is_no_such_user(self) -> None:
        """A name that is only a group is "any member of that group"."""
        who = access.identity_for("nogroup")
        assert who.kind == "group" and who.uid is None and who.gid == 65534

    def test_unknown_name(self) -> None:
        """Neither a user nor a group: a readable error naming the lookups."""
        with pytest.raises(ValueError, match="no user or group named 'no-such-thing-42'"):
            access.identity_for("no-such-thing-42")
