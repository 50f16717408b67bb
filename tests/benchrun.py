"""Bench scripts in tests: import one as a module; run its --quick mode, kill all it started."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

#: The benchmark scripts (bench/), which import their own helpers (bench/common.py) by name.
BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """Import ``bench/NAME.py`` as a module (a script, not part of the package), for tests of
    its definitions."""
    if str(BENCH) not in sys.path:  # appended: a bench module never shadows a test helper
        sys.path.append(str(BENCH))
    module_name = f"kakao_bench_{name}"
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


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
