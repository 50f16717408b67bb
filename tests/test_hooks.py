"""Change hooks and extra sinks in the running daemon: once per change, timeouts, no token."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from daemonproc import config_with, login, run_cli
from kakao_tokend.config import load_config
from kakao_tokend.daemon import Daemon
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.hooks import HookRunner
from kakao_tokend.refresher import AccountManager
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountEvent, EventKind
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet, utcnow
from served import serving

pytestmark = pytest.mark.timeout(60)

RECORDER = """
import json, os, sys, time
out = sys.argv[1]
record = {k: v for k, v in os.environ.items() if k.startswith("KAKAO")}
record["start"] = time.monotonic()
with open(out + ".pids", "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(float(sys.argv[2]))
record["end"] = time.monotonic()
with open(out, "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def hook_config(tmp_path: Path, emulator: KakaoEmulator, *, sleep: float, timeout: str) -> Path:
    """A config whose account runs the recorder hook and writes both extra sinks."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    out = tmp_path / "hook-runs.jsonl"
    extra = (
        "[accounts.default]\n"
        f'hooks = [["{sys.executable}", "{script}", "{out}", "{sleep}"]]\n'
        f'hook_timeout = "{timeout}"\n'
        f'access_token_file = "{tmp_path / "sinks" / "token"}"\n'
        f'env_file = "{tmp_path / "sinks" / "kakao.env"}"\n'
    )
    return config_with(tmp_path, emulator, extra)


def runs(tmp_path: Path) -> list[dict[str, Any]]:
    """The hook runs recorded so far."""
    path = tmp_path / "hook-runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    """Poll a zero-argument callable until it returns true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_hooks_run_once_per_change_and_sinks_follow(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Each refresh runs the hook once, serially, with account/file/generation but no token;
    starting the daemon runs none; the sinks always hold the current token."""
    config = hook_config(tmp_path, emulator, sleep=0.3, timeout="10s")
    first = await login(emulator, config)
    sinks = tmp_path / "sinks"
    async with serving(config) as served:
        await wait_until(lambda: (sinks / "token").exists())
        assert (sinks / "token").read_text() == first.tokens.access_token
        await asyncio.sleep(0.3)
        assert runs(tmp_path) == []  # nothing changed since start
        for _ in range(3):  # three changes while a hook is still running: coalesced, serial
            status, _ = await served.request("POST", "/v1/accounts/default/refresh")
            assert status == 200
        _, token = await served.get("/v1/accounts/default/token")
        await wait_until(
            lambda: (
                runs(tmp_path)
                and runs(tmp_path)[-1]["KAKAO_TOKEND_GENERATION"] == str(token["generation"])
            )
        )
        await asyncio.sleep(0.5)
        done = runs(tmp_path)
        assert 1 <= len(done) <= 2  # one for the first change, one for the rest
        generations = [int(r["KAKAO_TOKEND_GENERATION"]) for r in done]
        assert generations == sorted(set(generations))
        for earlier, later in itertools.pairwise(done):
            assert later["start"] >= earlier["end"]
        record = done[-1]
        assert record["KAKAO_TOKEND_ACCOUNT"] == "default"
        assert record["KAKAO_TOKEND_TOKEN_FILE"] == str(tmp_path / "state" / "default.token.json")
        assert not any(token["access_token"] in str(v) for v in record.values())
        assert (sinks / "token").read_text() == token["access_token"]
        assert (sinks / "kakao.env").read_text() == f"KAKAO_ACCESS_TOKEN={token['access_token']}\n"
        assert stat.S_IMODE((sinks / "token").stat().st_mode) == 0o640
        assert stat.S_IMODE((sinks / "kakao.env").stat().st_mode) == 0o640
        assert len(served.events_of("refreshed")) == 3


async def test_hooks_run_again_for_a_new_login_after_a_logout(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`kakao-tokend logout` and a new login while the daemon runs: the new login's tokens run
    the hooks although their generation starts again below the old tokens' (a login that
    knows nothing of the tokens before it, as the fleet's does). The runner forgets an
    account's generation when its state is removed; it used to skip every change up to the
    old generation, leaving a `systemctl reload my-bot` hook silent for days."""
    config = hook_config(tmp_path, emulator, sleep=0, timeout="10s")
    await login(emulator, config)
    async with serving(config) as served:
        for _ in range(2):
            status, _ = await served.request("POST", "/v1/accounts/default/refresh")
            assert status == 200
        await wait_until(
            lambda: [r["KAKAO_TOKEND_GENERATION"] for r in runs(tmp_path)][-1:] == ["3"]
        )
        code, out, err = await run_cli(config, "logout")
        assert code == 0, out + err
        await wait_until(
            lambda: any(e.data.get("generation", 0) is None for e in served.events_of("adopted"))
        )
        before = len(runs(tmp_path))
        fresh = await login(emulator, config)
        assert fresh.generation == 1  # the premise: not above the generation logged out
        await wait_until(lambda: len(runs(tmp_path)) == before + 1)
        record = runs(tmp_path)[-1]
        assert record["KAKAO_TOKEND_GENERATION"] == "1"
        await asyncio.sleep(0.3)
        assert len(runs(tmp_path)) == before + 1  # once


async def test_a_hanging_hook_is_killed_at_its_timeout(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A hook that outlives hook_timeout is killed (its process is gone, it never finishes);
    the daemon keeps serving, and the next change runs the hook again."""
    config = hook_config(tmp_path, emulator, sleep=30, timeout="0.5s")
    pids_file = tmp_path / "hook-runs.jsonl.pids"
    await login(emulator, config)

    def pids() -> list[int]:
        return [int(line) for line in pids_file.read_text().split()] if pids_file.exists() else []

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie still answers kill(0); it counts as dead.
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()

    async with serving(config) as served:
        started = time.monotonic()
        status, _ = await served.request("POST", "/v1/accounts/default/refresh")
        assert status == 200
        await wait_until(lambda: len(pids()) == 1)
        await wait_until(lambda: not alive(pids()[0]))
        assert time.monotonic() - started < 5
        status, _ = await served.get("/healthz")
        assert status == 200
        status, _ = await served.request("POST", "/v1/accounts/default/refresh")
        await wait_until(lambda: len(pids()) == 2)
        await wait_until(lambda: not alive(pids()[1]))
    assert runs(tmp_path) == []  # killed before they could record anything


async def test_only_accounts_with_hooks_are_remembered_and_a_reload_adds_one(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The runner remembers the generation of accounts that have hooks only (a fleet node's
    10,000 accounts usually have none); an account given hooks by a reload runs them for the
    next change, not for the tokens it had at the reload."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    hook = (sys.executable, str(script), str(tmp_path / "hook-runs.jsonl"), "0")
    config = load_config(
        config_with(
            tmp_path,
            emulator,
            f"[accounts.plain]\n[accounts.hooked]\nhooks = [{list(hook)!r}]\n".replace("'", '"'),
        )
    )
    managers = {}
    for name in ("plain", "hooked"):
        account = config.accounts[name]
        manager = AccountManager(
            account,
            store=AccountStore(account),
            client=None,  # type: ignore[arg-type]  # nothing here calls Kakao
            policy=config.refresh,
        )
        tokens = TokenSet.from_token_response(emulator.issue_tokens(1), requested_at=utcnow())
        manager.state = AccountState(account=name, tokens=tokens, generation=4)
        managers[name] = manager
    runner = HookRunner(Daemon(config=config, managers=managers))

    def changed(name: str, generation: int) -> None:
        data = {"generation": generation}
        runner.on_event(AccountEvent(EventKind.ADOPTED, name, "changed", utcnow(), data))

    runner.baseline()
    assert runner._seen == {"hooked": 4}
    changed("plain", 5)
    assert runner._seen == {"hooked": 4}
    plain = managers["plain"]
    assert plain.state is not None
    plain.account = replace(config.accounts["plain"], hooks=(hook,))
    plain.state = replace(plain.state, generation=5)
    runner.baseline()  # as after the reload
    assert runner._seen == {"hooked": 4, "plain": 5}
    changed("plain", 5)
    changed("plain", 6)
    await wait_until(lambda: len(runs(tmp_path)) == 1)
    await asyncio.sleep(0.3)
    [record] = runs(tmp_path)
    assert (record["KAKAO_TOKEND_ACCOUNT"], record["KAKAO_TOKEND_GENERATION"]) == ("plain", "6")
    await runner.close()
