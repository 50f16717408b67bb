"""File mode stays as light as before fleet mode: psycopg and cryptography are never loaded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemonproc import login, start_daemon, write_config
from kakao_tokend.emulator import KakaoEmulator

pytestmark = pytest.mark.timeout(60)

#: Top-level packages that only fleet mode may load.
FLEET_ONLY = ("psycopg", "psycopg_binary", "psycopg_c", "psycopg_pool", "cryptography")

_REPORT = """
import json, sys
{body}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({fleet_only!r}))))
"""


def loaded_fleet_packages(body: str) -> list[str]:
    """Run ``body`` in a fresh interpreter; return which fleet-only packages it imported."""
    code = _REPORT.format(body=body, fleet_only=FLEET_ONLY)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def mapped_fleet_files(pid: int) -> set[str]:
    """Return the shared objects of fleet-only packages mapped into process ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {
        line.split()[-1]
        for line in maps.splitlines()
        if any(f"/{name}" in line for name in FLEET_ONLY)
    }


def test_the_daemon_and_cli_modules_import_no_fleet_library(tmp_path: Path) -> None:
    """Importing the service, the CLI and loading a file-mode config loads none of them —
    even with a [store] section that names a database and a key for a later migration."""
    from kakao_tokend.fleet.crypto import new_key_line

    key = tmp_path / "store.key"
    key.write_text(new_key_line())
    key.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{tmp_path}/s"\nruntime_dir = "{tmp_path}/r"\n'
        '[kakao]\nrest_api_key = "k"\n'
        f'[store]\nbackend = "file"\ndsn = "host=db dbname=x"\nkey_file = "{key}"\n'
    )
    config.chmod(0o600)  # an inline DSN is a secret like any other: refused in a readable file
    body = (
        "import kakao_tokend.service, kakao_tokend.cli, kakao_tokend.api\n"
        "from pathlib import Path\n"
        "from kakao_tokend.config import load_config\n"
        f"c = load_config(Path({str(config)!r}))\n"
        "assert c.store.keyring is not None\n"
    )
    assert loaded_fleet_packages(body) == []


def test_the_import_check_does_see_fleet_libraries_when_they_load() -> None:
    """Control for the test above: using the fleet modules does load them, and it shows."""
    body = (
        "from kakao_tokend.fleet import db\n"
        "from kakao_tokend.fleet.crypto import Keyring, new_key_line\n"
        "db.conninfo('host=x', node='n', purpose='p')\n"
        "import uuid\n"
        "Keyring.parse(new_key_line()).seal(b'x', account='a', row_id=uuid.uuid4(), column='c')\n"
    )
    assert set(loaded_fleet_packages(body)) >= {"psycopg", "cryptography"}


async def test_a_running_file_mode_daemon_maps_no_fleet_library(
    tmp_path: Path, emulator: KakaoEmulator
) -> None:
    """The real `kakao-tokend run` process, after start and a refresh, has neither psycopg's
    libpq nor cryptography's Rust module in its memory map."""
    emulator.settings.access_lifetime = 2
    config = write_config(tmp_path, emulator, extra='[store]\nbackend = "file"\n')
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 2, what="a refresh")
        assert mapped_fleet_files(daemon.pid) == set()
    finally:
        assert await daemon.stop() == 0


async def test_the_memory_map_check_does_see_fleet_libraries() -> None:
    """Control: a process that loaded psycopg and cryptography shows them in its map."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import psycopg, sys; from cryptography.hazmat.primitives.ciphers.aead import AESGCM;"
        " psycopg.pq.version(); print('ready', flush=True); sys.stdin.read()",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        mapped = mapped_fleet_files(proc.pid)
        assert any("cryptography" in path for path in mapped), mapped
        assert any("psycopg" in path for path in mapped), mapped
    finally:
        proc.kill()
        await proc.wait()
