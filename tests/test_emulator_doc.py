"""docs/emulator.md cannot rot: its examples run against real emulators, its tables match the code.

The page's ``sh`` blocks run in one bash script against ``kakao-tokend emulator`` started with the
page's own command line (port replaced by a free one). A ``# ...`` line right after a command is
what the command prints, ``...`` standing for any text; each is compared with the real output.
``python`` blocks run as written in a child Python: a ``# test_*.py`` block under pytest, a block
with ``asyncio.run`` as a script, the others (the control-API calls) as one script against
another fresh ``kakao-tokend emulator``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from daemonproc import REPO, free_port
from kakao_tokend.emulator import ENDPOINTS, FAULT_KINDS, EmulatorSettings, KakaoEmulator

DOC = REPO / "docs" / "emulator.md"
DOC_PORT = "8790"  # the port the page's examples use
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
STEP_MARK = re.compile(r"\n@@STEP (\d+)@@\n")


def blocks(language: str) -> list[str]:
    """Return the page's fenced blocks in one language, in page order."""
    return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == language]


def at_port(text: str, port: int) -> str:
    """Point the page's examples at the emulator on ``port``."""
    return text.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{port}").replace(
        f"--port {DOC_PORT}", f"--port {port}"
    )


def child_env() -> dict[str, str]:
    """The environment for example commands: this venv's python3 and kakao-tokend come first."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def start_command(port: int) -> list[str]:
    """Return the page's `kakao-tokend emulator` command line, on ``port``, as an argv."""
    (command,) = [b.strip() for b in blocks("sh") if b.strip().startswith("kakao-tokend emulator")]
    program, *args = at_port(command, port).split()
    assert program == "kakao-tokend"
    return [sys.executable, "-m", "kakao_tokend", *args]


@asynccontextmanager
async def emulator_process(port: int) -> AsyncIterator[str]:
    """Run the page's start command on ``port``; yield the banner it prints; stop it with TERM."""
    proc = await asyncio.create_subprocess_exec(
        *start_command(port), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        # Starting Python on a loaded machine can take many seconds.
        banner = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        yield banner
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run(argv: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str, str]:
    """Run a command; return its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def shell_steps() -> list[tuple[str, list[str] | None]]:
    """Split the page's shell examples into steps: commands plus the output shown after them.

    A ``#`` line right after a command is expected output; a ``#`` line that starts a paragraph
    (after a blank line or at the top of a block) is a comment and is skipped.
    """
    steps: list[tuple[str, list[str] | None]] = []
    for block in blocks("sh"):
        if block.strip().startswith("kakao-tokend emulator"):
            continue  # the server itself: started by the test
        commands: list[str] = []
        expected: list[str] = []
        for line in [*block.splitlines(), ""]:
            if line.startswith("#") and commands:
                expected.append(line[1:].strip())
                continue
            if (not line.strip() or expected) and commands:
                steps.append(("\n".join(commands), expected or None))
                commands, expected = [], []
            if line.strip() and not line.startswith("#"):
                commands.append(line)
    return steps


def matches(shown: str, actual: str) -> bool:
    """Whether the output shown on the page (``...`` = any text) is what the command printed."""
    pattern = ".*?".join(re.escape(part) for part in shown.split("..."))
    return re.fullmatch(pattern, actual, re.DOTALL) is not None


needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="the page's shell examples use curl; install curl"
)


@needs_curl
async def test_start_command_and_shell_examples_print_what_the_page_shows(tmp_path: Path) -> None:
    """The start command prints the page's banner; every shell example prints what is shown."""
    port = free_port()
    steps = shell_steps()
    assert len(steps) > 10 and sum(shown is not None for _, shown in steps) > 10
    script = ["set -euo pipefail"]
    for number, (commands, _) in enumerate(steps):
        script += [f"printf '\\n@@STEP {number}@@\\n'", at_port(commands, port)]
    async with emulator_process(port) as banner:
        (shown_banner,) = [b.strip() for b in blocks("text") if "listening on" in b]
        assert banner == at_port(shown_banner, port)
        status, out, err = await run(["bash", "-c", "\n".join(script)], tmp_path)
        assert status == 0, f"the shell examples failed:\n{out}\n{err}"
    outputs = STEP_MARK.split(out)[1:]
    printed = {int(n): text.strip() for n, text in zip(outputs[::2], outputs[1::2], strict=True)}
    assert sorted(printed) == list(range(len(steps)))
    for number, (commands, shown) in enumerate(steps):
        if shown is not None:
            page = "\n".join(shown)
            assert matches(page, printed[number]), (
                f"{commands}\nthe page shows:\n{page}\nit printed:\n{printed[number]}"
            )


async def test_python_control_api_examples_work(tmp_path: Path) -> None:
    """The page's Python control-API calls run (with their asserts) and take effect."""
    port = free_port()
    snippets = [
        b for b in blocks("python") if "asyncio.run(" not in b and not b.startswith("# test_")
    ]
    assert snippets and "def control(" in snippets[0]
    (tmp_path / "control_examples.py").write_text(at_port("\n\n".join(snippets), port))
    async with emulator_process(port):
        status, out, err = await run([sys.executable, "control_examples.py"], tmp_path)
        assert status == 0, err
        assert out.strip() == "0 messages; 0 refreshes, 0 rotated"
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/_emulator/users") as response:
                users = (await response.json())["users"]
            async with session.get(url + "/_emulator/app") as response:
                app = await response.json()
            async with session.get(url + "/_emulator/settings") as response:
                settings = await response.json()
            async with session.get(url + "/_emulator/clock") as response:
                clock = await response.json()
    assert [u["dormant"] for u in users if u["name"] == "bob"] == [True]
    assert app["client_secret"] is None
    assert (settings["access_lifetime"], settings["refresh_lifetime"]) == (6, 60)
    assert clock["offset"] == 3600


async def test_in_process_example_runs(tmp_path: Path) -> None:
    """The page's asyncio example (running_emulator, issue_tokens, clock, inject) passes."""
    (script,) = [b for b in blocks("python") if "asyncio.run(" in b]
    (tmp_path / "in_process.py").write_text(script)
    status, _, err = await run([sys.executable, "in_process.py"], tmp_path)
    assert status == 0, err


async def test_pytest_fixture_example_passes(tmp_path: Path) -> None:
    """The page's pytest file passes under plain pytest + pytest-asyncio, as in a user's project."""
    (example,) = [b for b in blocks("python") if b.startswith("# test_")]
    name = example.splitlines()[0].removeprefix("# ").strip()
    (tmp_path / name).write_text(example)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name]
    status, out, err = await run(argv, tmp_path, timeout=120)
    assert status == 0, out + err
    assert "1 passed" in out


async def test_config_example_passes_check_config(tmp_path: Path) -> None:
    """The page's config for kakao-tokend against the emulator is accepted by check-config."""
    (config,) = blocks("toml")
    path = tmp_path / "config.toml"
    path.write_text(config)
    path.chmod(0o600)
    argv = [sys.executable, "-m", "kakao_tokend", "--config", str(path), "check-config"]
    status, out, err = await run(argv, tmp_path)
    assert status == 0, out + err


def table_column(header: str) -> list[str]:
    """Return the first column of the page's markdown table with this header row."""
    text = DOC.read_text()
    table = text[text.index(header) :].split("\n\n")[0]
    return [line.split("|")[1].strip() for line in table.splitlines()[2:]]


def test_fault_kinds_and_endpoints_are_those_of_the_code() -> None:
    """Every fault kind and fault endpoint the code accepts is documented, and no other."""
    kinds = {
        kind
        for cell in table_column("| kind | the answer |")
        for kind in re.findall(r"`([^`]+)`", cell)
    }
    assert kinds == FAULT_KINDS
    text = DOC.read_text()
    listed = text[text.index("Endpoints: `token`") :].split(". Kinds:")[0]
    assert set(re.findall(r"`([^`]+)`", listed)) == ENDPOINTS


def test_settings_table_is_the_settings_dataclass() -> None:
    """The settings table lists every EmulatorSettings field, in order, with its default."""
    rows = table_column("| setting | default | meaning |")
    names = [re.sub(r"`", "", row) for row in rows]
    assert names == [f.name for f in dataclasses.fields(EmulatorSettings)]
    text = DOC.read_text()
    defaults = EmulatorSettings()
    for name in ("access_lifetime", "refresh_lifetime", "code_ttl", "app_id", "memo_text_limit"):
        row = re.search(rf"^\| `{name}` \| (\S+)", text, re.M)
        assert row and float(row.group(1)) == getattr(defaults, name), name


def test_control_paths_and_python_api_are_documented() -> None:
    """Every /_emulator/ route exists and is documented; every public method is in the table."""
    text = DOC.read_text()
    routes = {
        resource.canonical.split("/")[2]
        for resource in KakaoEmulator().make_app().router.resources()
        if resource.canonical.startswith("/_emulator/")
    }
    assert set(re.findall(r"/_emulator/(\w+)", text)) == routes
    api = text[text.index("## The Python API") :]
    public = {
        name
        for name, member in inspect.getmembers(KakaoEmulator)
        if not name.startswith("_") and callable(member)
    }
    missing = {name for name in public if f"{name}(" not in api}
    assert not missing, f"KakaoEmulator methods missing from the page: {sorted(missing)}"
