"""A full disk for tests: a tiny tmpfs where the state directory goes, and a filler."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tiny_state_fs(tmp_path: Path) -> Iterator[Path]:
    """Mount a 512 KiB tmpfs where the state directory goes, so a test can fill it up."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0750", "tmpfs", str(state_dir)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield state_dir
    finally:
        subprocess.run(["umount", "-l", str(state_dir)], check=False)


def _fill(directory: Path, name: str = "filler") -> Path:
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
