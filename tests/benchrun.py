"""Run a benchmark script's --quick mode for a test, killed with everything it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def run_quick(script: Path, cwd: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script --quick`` in ``cwd``; fail the test when it takes longer than ``timeout``.

    In a session of its own: a benchmark that hangs is killed with every daemon, node and
    baseline process it started (killing the script alone left them running, seen after a
    time-out), and so is anything it left behind when it ends.
    """
    with subprocess.Popen(
        [sys.executable, str(script), "--quick"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(
                f"{script.name} --quick took more than {timeout:g} s:\n{stdout}{stderr[-4000:]}"
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
