"""Published files always catch up: a failed publish is retried, adopted states are published.

The token file and the extra sinks (``access_token_file``, ``env_file``) are what consumers
read. A publish that failed is marked pending, retried on the heartbeat and reported by
/healthz; tokens written by another process (CLI `login`, `refresh`, `import`) are published
and run the hooks exactly like the daemon's own refresh.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemonproc import config_with, login
from diskfull import fill_up, tiny_tmpfs
from kakao_tokend.emulator import KakaoEmulator
from served import serving

pytestmark = pytest.mark.timeout(60)

RECORDER = """
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"generation": os.environ["KAKAO_TOKEND_GENERATION"]}) + "\\n")
"""


def sink_config(tmp_path: Path, emulator: KakaoEmulator, *, token_file: Path | None = None) -> Path:
    """A config with both extra sinks and a hook that records each run's generation."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    extra = (
        "[accounts.default]\n"
        f'hooks = [["{sys.executable}", "{script}", "{tmp_path / "hook-runs.jsonl"}"]]\n'
        f'access_token_file = "{tmp_path / "sinks" / "token"}"\n'
        f'env_file = "{tmp_path / "sinks" / "kakao.env"}"\n'
        + (f'token_file = "{token_file}"\n' if token_file is not None else "")
    )
    return config_with(tmp_path, emulator, extra)


@pytest.fixture
def tiny_publish_fs(tmp_path: Path) -> Iterator[Path]:
    """Mount a 512 KiB tmpfs for the published token file alone, so a test can fill it."""
    with tiny_tmpfs(tmp_path / "published") as directory:
        yield directory


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def published_generation(tmp_path: Path, token_file: Path | None = None) -> int:
    """The generation in the published token file."""
    path = token_file or tmp_path / "state" / "default.token.json"
    return int(json.loads(path.read_text())["generation"])


async def test_a_failed_token_file_publish_is_retried_and_health_says_so(
    emulator: KakaoEmulator, tmp_path: Path, tiny_publish_fs: Path
) -> None:
    """The token file cannot be replaced during a refresh (its disk is full): /healthz says so
    (503) instead of "ok", and as soon as there is room again the heartbeat publishes the
    current token."""
    token_file = tiny_publish_fs / "default.token.json"
    config = sink_config(tmp_path, emulator, token_file=token_file)
    await login(emulator, config)
    async with serving(config) as served:
        await until(lambda: published_generation(tmp_path, token_file) == 1, what="first publish")
        filler = fill_up(tiny_publish_fs)
        status, body = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 200
        generation = body["generation"]
        status, health = await served.get("/healthz")
        assert status == 503
        assert "token file" in json.dumps(health["problems"]["default"])
        status, described = await served.get("/v1/status")
        assert described["accounts"][0]["publish_pending"] is True
        alerts = [a["condition"] for a in described["accounts"][0]["alerts"]]
        assert "publish_failed" in alerts
        filler.unlink()
        await until(
            lambda: published_generation(tmp_path, token_file) == generation,
            what="the heartbeat's publish",
        )
        status, _ = await served.get("/healthz")
        assert status == 200


async def test_a_failed_extra_sink_write_is_retried_and_health_says_so(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The same for the bare access-token file: pending, reported, then written."""
    config = sink_config(tmp_path, emulator)
    await login(emulator, config)
    sink = tmp_path / "sinks" / "token"
    async with serving(config) as served:
        await until(sink.exists, what="first sink write")
        sink.unlink()
        sink.mkdir()
        status, _ = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 200
        _, token = await served.get("/v1/accounts/default/token")
        status, health = await served.get("/healthz")
        assert status == 503
        assert str(sink) in json.dumps(health["problems"]["default"])
        sink.rmdir()
        await until(
            lambda: sink.read_text() == token["access_token"], what="the heartbeat's sink write"
        )
        env = tmp_path / "sinks" / "kakao.env"
        assert env.read_text() == f"KAKAO_ACCESS_TOKEN={token['access_token']}\n"
        status, _ = await served.get("/healthz")
        assert status == 200


async def test_tokens_written_by_another_process_are_published_and_hooked(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A `login` while the daemon runs: once adopted, the extra sinks hold the new token and
    the hooks run for its generation, exactly as after the daemon's own refresh; listeners get
    an "adopted" event."""
    config = sink_config(tmp_path, emulator)
    await login(emulator, config)
    sink = tmp_path / "sinks" / "token"
    runs = tmp_path / "hook-runs.jsonl"
    async with serving(config) as served:
        await until(sink.exists, what="first sink write")
        fresh = await login(emulator, config)
        await until(lambda: sink.read_text() == fresh.tokens.access_token, what="the sink follows")
        env = tmp_path / "sinks" / "kakao.env"
        assert env.read_text() == f"KAKAO_ACCESS_TOKEN={fresh.tokens.access_token}\n"
        await until(
            lambda: any(
                json.loads(line)["generation"] == str(fresh.generation)
                for line in runs.read_text().splitlines()
            ),
            what="the hook for the adopted generation",
        )
        adopted = served.events_of("adopted")
        assert adopted and adopted[-1].data["generation"] == fresh.generation
