"""A full or read-only disk for tests: a tiny tmpfs (where the state directory goes), a filler,
and a read-only view of it."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tiny_tmpfs(directory: Path, *, inodes: int | None = None) -> Iterator[Path]:
    """Make ``directory`` a 512 KiB tmpfs while the block runs (skip the test if we cannot
    mount: that needs root); ``inodes`` limits its files (and hard links) too."""
    directory.mkdir()
    options = "size=512k,mode=0750" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def tiny_state_fs(tmp_path: Path) -> Iterator[Path]:
    """Mount a 512 KiB tmpfs where the state directory goes, so a test can fill it up."""
    with tiny_tmpfs(tmp_path / "state") as state_dir:
        yield state_dir


def fill_up(directory: Path, name: str = "filler") -> Path:
    """Fill the file system under ``directory`` until a write fails with ENOSPC."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` read-only while the block runs: a read-only bind mount stacked on it
    (remounting the file system itself fails while files are open for writing); files
    opened from then on are read-only, those open before stay as they were."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def use_up_inodes(directory: Path) -> list[Path]:
    """Create empty files in ``directory`` until the file system has no inode left."""
    made: list[Path] = []
    for index in range(10_000):
        path = directory / f"inode-filler-{index}"
        try:
            path.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return made
        made.append(path)
    raise AssertionError("the file system never ran out of inodes")
