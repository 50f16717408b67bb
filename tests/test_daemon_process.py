"""End-to-end tests of the real `kakao-tokend run` process against the emulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from daemonproc import (
    NotifyReceiver,
    access_token_valid,
    issued_tokens,
    login,
    release_into_a_rotation,
    run_cli,
    short_tokens,
    start_daemon,
    write_config,
)
from diskfull import fill_up
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.tokens import parse_time

pytestmark = pytest.mark.timeout(180)


@pytest.mark.slow(seconds=50)
async def test_hundreds_of_refreshes_never_publish_an_expired_token(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Sixteen accounts with 5-second tokens refresh hundreds of times; no read sees a dead token.

    The daemon refreshes at 70-80 % of the life, so a published token has at least a second
    left: enough for a loaded machine to wake the daemon, and still a token that dies within
    seconds if a refresh were late or never published. Reads start once the daemon published
    its own tokens for every account: the ones `login` wrote may die while it starts up.
    """
    short_tokens(emulator, access=5, refresh=30)
    emulator.settings.rotation_window = 12
    names = [f"a{number:02d}" for number in range(16)]
    config = write_config(tmp_path, emulator, accounts=names, rotation_window=12)
    for name in names:
        await login(emulator, config, name)
    daemon = await start_daemon(config)
    reads = 0
    bad: list[str] = []
    try:
        await daemon.wait_for(
            lambda: all(daemon.published(name)["generation"] >= 2 for name in names),
            timeout=20,
            what="the daemon's first refresh of every account",
        )
        deadline = time.monotonic() + 120
        tick = 0
        while time.monotonic() < deadline and emulator.stats.refreshes_ok < 200 + len(names):
            for name in names[tick % 4 :: 4]:  # a quarter of the accounts per tick
                document = daemon.published(name)
                reads += 1
                if not access_token_valid(emulator, document["access_token"]):
                    bad.append(f"{name} generation {document['generation']}")
            tick += 1
            await asyncio.sleep(0.05)
    finally:
        assert await daemon.stop() == 0
    assert emulator.stats.refreshes_ok >= 200 + len(names), daemon.log_text()[-3000:]
    assert emulator.stats.rotations >= 4
    assert bad == []
    assert reads > 1000
    # Kakao killed every rotated-out refresh token; the daemon never presented one again.
    assert emulator.stats.retired_refresh_presented == 0
    assert emulator.stats.errors.get("KOE237", 0) == 0
    log = daemon.log_text()
    assert not [t for t in issued_tokens(emulator) if t in log]


@pytest.mark.slow(seconds=11)
async def test_rotation_is_persisted_and_the_old_refresh_token_never_used_again(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Each rotated refresh token is on disk at once, and the dead one is never presented."""
    short_tokens(emulator, access=2, refresh=8)
    emulator.settings.rotation_window = 4
    config = write_config(tmp_path, emulator, rotation_window=4)
    daemon = await start_daemon(config)
    try:
        # Log in once the daemon runs (it takes the new state file at once): on a loaded
        # machine its start-up alone can outlast an 8-second refresh token issued before.
        first = await login(emulator, config)
        await daemon.wait_for(
            lambda: len(daemon.state()["rotations"]) >= 2, timeout=30, what="two rotations"
        )
        state = daemon.state()
        current = state["tokens"]["refresh_token"]
        assert current != first.tokens.refresh_token
        # The emulator's view: the state file holds the one refresh token that still works.
        assert emulator.refresh_token_status(current) == "live"
        assert emulator.refresh_token_status(first.tokens.refresh_token) == "retired"
        assert emulator.stats.retired_refresh_presented == 0
        assert "rotated=yes" in daemon.log_text()
    finally:
        assert await daemon.stop() == 0


@pytest.mark.parametrize(
    "kind",
    ["http500", "http502_html", "http503", "koe003", "reset", "truncated", "non_json", "timeout"],
)
async def test_transient_faults_are_retried_until_the_token_is_fresh_again(
    emulator: KakaoEmulator, tmp_path: Path, kind: str
) -> None:
    """A transient failure of the token endpoint is retried with backoff and then succeeds."""
    short_tokens(emulator, access=3)
    config = write_config(tmp_path, emulator, timeout="1s")
    await login(emulator, config)
    emulator.inject("token", kind, count=2, delay=1.5)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(
            lambda: daemon.state()["generation"] >= 3, timeout=20, what="a refresh after faults"
        )
        assert emulator.stats.faults_fired[kind] == 2
        log = daemon.log_text()
        assert "refresh failed" in log
        assert "next try" in log
        assert access_token_valid(emulator, daemon.published()["access_token"])
    finally:
        assert await daemon.stop() == 0


async def test_rate_limit_is_backed_off_not_hammered(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """KOE237 is a pause request: the daemon waits and then refreshes, without a storm."""
    short_tokens(emulator, access=3)
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    emulator.inject("token", "koe237", count=1)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 3, timeout=20, what="refresh")
        assert emulator.stats.faults_fired["koe237"] == 1
        assert "KOE237" in daemon.log_text()
    finally:
        assert await daemon.stop() == 0


async def test_unlinked_user_is_marked_for_relogin_and_not_retried(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """KOE322 stops the refreshes, names the fix command, and no retry storm follows."""
    short_tokens(emulator, access=2)
    config = write_config(tmp_path, emulator, accounts=["main", "other"])
    main = await login(emulator, config, "main")
    await login(emulator, config, "other")
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: daemon.state("main")["generation"] >= 2, what="first refresh")
        # Revoke only main's tokens (the emulator's logout of that token set).
        emulator.revoke_user_tokens(main.user_id or 0)
        await daemon.wait_log("needs a new login", timeout=10)
        attempts_after_mark = emulator.stats.requests["token"]
        await asyncio.sleep(3)
        log = daemon.log_text()
        assert f"kakao-tokend --config {config} login" in log  # main is the default account
        assert daemon.state("main")["relogin_reason"]
        status, body = await daemon.api("GET", "/healthz")
        assert status == 503 and "main" in body["problems"]
        # A KOE322 account is left alone; the "other" account (same user here) also dies, so
        # count only that nothing hammers Kakao: at most one more refusal per account.
        assert emulator.stats.requests["token"] - attempts_after_mark <= 2
    finally:
        assert await daemon.stop() == 0


async def test_one_accounts_trouble_never_stops_another(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """An account with a dead refresh token does not keep the healthy one from refreshing."""
    short_tokens(emulator, access=2)
    second_user = emulator.add_user(2222, name="second")
    config = write_config(tmp_path, emulator, accounts=["good", "bad"])
    await login(emulator, config, "good")
    await login(emulator, config, "bad")
    # Break "bad" on disk: a refresh token Kakao never issued.
    state_file = tmp_path / "state" / "bad.state.json"
    data = json.loads(state_file.read_text())
    data["tokens"]["refresh_token"] = "not-a-real-refresh-token"
    state_file.write_text(json.dumps(data))
    del second_user
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("needs a new login", timeout=10)
        generation = daemon.state("good")["generation"]
        await daemon.wait_for(
            lambda: daemon.state("good")["generation"] >= generation + 2,
            timeout=10,
            what="the good account to keep refreshing",
        )
    finally:
        assert await daemon.stop() == 0


async def test_lost_rotation_response_marks_relogin_with_one_critical_line(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Kakao rotated but the answer was lost: one critical line, relogin, no retry storm."""
    short_tokens(emulator, access=3, refresh=20)
    emulator.settings.rotation_window = 19.5  # every refresh now rotates
    config = write_config(tmp_path, emulator, rotation_window=19.5)
    await login(emulator, config)
    emulator.inject("token", "lost_response", count=1)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("refresh response was lost", timeout=15)
        await asyncio.sleep(2)
        log = daemon.log_text()
        assert log.count("refresh response was lost") == 1
        assert "CRITICAL" in log
        # One lost rotation, then exactly one KOE322 that proved it; nothing after that.
        assert emulator.stats.errors["KOE322"] == 1
        assert daemon.state()["relogin_reason"].startswith("refresh response lost")
    finally:
        assert await daemon.stop() == 0


async def test_restart_with_an_overdue_token_refreshes_at_once(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A token past its refresh point when the daemon starts is refreshed immediately."""
    short_tokens(emulator, access=4)
    config = write_config(tmp_path, emulator, heartbeat="30s")
    await login(emulator, config)
    await asyncio.sleep(3.2)  # past 75 % of the 4-second life
    daemon = await start_daemon(config)
    # Measured from the daemon's "running" line, not from the spawn: on a loaded machine the
    # interpreter's start alone can take seconds. Either way it is far below the 30-s heartbeat
    # a refresh would otherwise wait for.
    started = time.monotonic()
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 2, timeout=5, what="refresh")
        assert time.monotonic() - started < 5
        # The daemon saves the state first and logs "refreshed" after it: wait for the line.
        await daemon.wait_log("refreshed default", timeout=5)
        assert "overdue" in daemon.log_text() or "refreshed default" in daemon.log_text()
        # The check above is vacuous ("overdue" is only a debug-level refresh reason, and
        # generation >= 2 already implies "refreshed default"). What proves "at once" is the
        # start-up path: an overdue token is refreshed directly, without first being verified
        # (and then rejected) at Kakao.
        log_text = daemon.log_text()
        assert "refreshed default" in log_text
        assert "access token verified" not in log_text
        assert "rejected" not in log_text
    finally:
        assert await daemon.stop() == 0


async def test_resume_after_sigstop_refreshes_within_one_heartbeat(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A process frozen past the token's life refreshes within a heartbeat of waking up."""
    # 4-second tokens: the fresh token must still be valid when the test reads it after the
    # refresh, although a loaded machine may take a second or two to save and publish it.
    short_tokens(emulator, access=4)
    config = write_config(tmp_path, emulator, heartbeat="0.5s")
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 2, what="first refresh")
        daemon.send(signal.SIGSTOP)
        await asyncio.sleep(5)  # longer than the whole access lifetime
        expired = daemon.published()
        assert not access_token_valid(emulator, expired["access_token"])
        generation = expired["generation"]
        daemon.send(signal.SIGCONT)
        resumed = time.monotonic()
        # A refresh answered just before the freeze is read after it, already dead: saved
        # and published (it may carry a rotation), it must be followed by another at once.
        await daemon.wait_for(
            lambda: (
                daemon.published()["generation"] > generation
                and access_token_valid(emulator, daemon.published()["access_token"])
            ),
            timeout=5,
            what="a valid token after the refresh",
        )
        assert time.monotonic() - resumed < 1.5
    finally:
        assert await daemon.stop() == 0


async def test_an_answer_that_came_while_the_daemon_was_stopped_is_read_not_timed_out(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """SIGSTOP while Kakao holds a rotating refresh; Kakao answers while the daemon is
    stopped, for longer than its request may wait. At SIGCONT the answer is in the socket:
    it is read and its rotated refresh token saved. The request's deadline ran out at the
    SIGCONT first, took it for a hang, and the rotation was lost (KOE322, a new login)."""
    short_tokens(emulator, access=4, refresh=3600)
    emulator.settings.rotation_window = 4000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=4000, timeout="2s")
    await login(emulator, config)
    emulator.inject("token", "hold", count=1, delay=60.0)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: emulator.held_requests == 1, what="a refresh at Kakao")
        daemon.send(signal.SIGSTOP)
        await release_into_a_rotation(emulator)
        await asyncio.sleep(3.0)  # longer than the request's 2 s
        daemon.send(signal.SIGCONT)
        await daemon.wait_for(
            lambda: (
                emulator.refresh_token_status(daemon.state()["tokens"]["refresh_token"]) == "live"
                and daemon.state()["generation"] >= 2
            ),
            timeout=10,
            what="the rotated refresh token saved",
        )
    finally:
        assert await daemon.stop() == 0
    assert "needs a new login" not in daemon.log_text()
    assert emulator.stats.retired_refresh_presented == 0


async def test_sighup_adds_an_account_without_refetching_tokens(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """SIGHUP re-reads the config: a new account is served, the old one keeps its tokens."""
    short_tokens(emulator, access=3600)
    config = write_config(tmp_path, emulator, accounts=["one"])
    await login(emulator, config, "one")
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("access token verified")
        before = daemon.state("one")
        requests_before = emulator.stats.requests["token"]
        write_config(tmp_path, emulator, accounts=["one", "two"])
        await login(emulator, config, "two")
        daemon.send(signal.SIGHUP)
        await daemon.wait_log("configuration reloaded")
        status, body = await daemon.api("GET", "/v1/status")
        assert status == 200
        assert [a["account"] for a in body["accounts"]] == ["one", "two"]
        assert daemon.state("one")["generation"] == before["generation"]
        # The login of "two" made one token request; the reload made none.
        assert emulator.stats.requests["token"] == requests_before + 1
    finally:
        assert await daemon.stop() == 0


@pytest.mark.parametrize("problem", ["not_a_directory", "writable_by_others"])
async def test_a_reload_that_cannot_open_an_account_changes_nothing(
    emulator: KakaoEmulator, tmp_path: Path, problem: str
) -> None:
    """A reload that removes "two" and adds "three", whose files cannot be used (under a
    regular file; in a directory others may write, which a start refuses), is refused as a
    whole: "two" keeps being served, the reason is one log line and the CLI's answer, and
    systemd hears READY=1 again (it was half applied: "two" dropped, READY never sent)."""
    from daemonproc import NotifyReceiver, run_cli

    short_tokens(emulator, access=3600)
    config = write_config(tmp_path, emulator, accounts=["one", "two"])
    await login(emulator, config, "one")
    await login(emulator, config, "two")
    if problem == "not_a_directory":
        (tmp_path / "plain").write_text("x")
        where = tmp_path / "plain" / "sub"
    else:
        where = tmp_path / "shared"
        where.mkdir()
        where.chmod(0o777)
    with NotifyReceiver() as notify:
        daemon = await start_daemon(config, env=notify.env)
        try:
            await notify.wait_for_line("READY=1", daemon, timeout=10)
            write_config(
                tmp_path,
                emulator,
                accounts=["one", "three"],
                extra=f'state_file = "{where}/three.state.json"\n',
            )
            code, out, err = await run_cli(config, "reload")
            assert code != 0, out
            assert "keeps its previous configuration" in err and "None" not in err
            await daemon.wait_for(lambda: notify.text().count("READY=1") >= 2, what="READY")
            status, body = await daemon.api("GET", "/v1/status")
            assert status == 200
            assert [a["account"] for a in body["accounts"]] == ["one", "two"]
        finally:
            assert await daemon.stop() == 0
    failed = [line for line in daemon.log_text().splitlines() if "reload failed" in line]
    assert len(failed) == 1 and where.name in failed[0], failed
    assert "Traceback" not in daemon.log_text()


async def test_sigterm_during_a_refresh_lets_it_finish_and_persist(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """SIGTERM while Kakao is answering slowly: the answer is saved, then the process exits 0."""
    short_tokens(emulator, access=3)
    config = write_config(tmp_path, emulator, timeout="5s")
    await login(emulator, config)  # a 3-second token: the refresh comes within seconds
    # The token the slow answer brings lives a minute, so it is still valid when the test
    # reads it, however long a loaded machine takes to stop the process.
    emulator.settings.access_lifetime = 60
    emulator.inject("token", "slow", count=1, delay=1.5)
    daemon = await start_daemon(config)
    await daemon.wait_for(
        lambda: emulator.stats.faults_fired["slow"] == 1, timeout=10, what="refresh in flight"
    )
    code = await daemon.stop(signal.SIGTERM)
    assert code == 0
    state = daemon.state()
    assert state["generation"] == 2
    assert access_token_valid(emulator, state["tokens"]["access_token"])


async def test_a_second_instance_is_refused(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """Two `run` processes on one state directory: the second exits with a clear message."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        second = await start_daemon(config, wait_ready=False)
        code = await asyncio.wait_for(second.proc.wait(), 20)
        assert code == 75
        assert "already running" in second.log_text()
        assert f"pid {daemon.pid}" in second.log_text()
    finally:
        assert await daemon.stop() == 0


async def test_disk_full_keeps_tokens_in_memory_and_writes_them_later(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """A full disk: the emergency reserve saves the first rotation at once; when even that is
    used up, rotated tokens live on in memory and are written once there is room again."""
    short_tokens(emulator, access=2, refresh=3600)
    emulator.settings.rotation_window = 3000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=3000)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: daemon.state()["generation"] >= 2, what="first refresh")
        assert (tiny_state_fs / ".kakao-tokend.reserve").stat().st_size == 64 * 1024
        filler = fill_up(tiny_state_fs)
        # The first failing save gives up the emergency reserve and lands on disk at once.
        await daemon.wait_log("gave up the emergency reserve", timeout=10)
        assert not (tiny_state_fs / ".kakao-tokend.reserve").exists()
        await daemon.wait_for(
            lambda: (
                emulator.refresh_token_status(daemon.state()["tokens"]["refresh_token"]) == "live"
            ),
            what="the rotated refresh token saved through the reserve",
        )
        # Whatever filled the disk goes on filling it: now nothing can be saved.
        second_filler = fill_up(tiny_state_fs, name="filler2")
        await daemon.wait_log("cannot save the new tokens", timeout=10)
        stuck_generation = daemon.state()["generation"]
        await asyncio.sleep(3)  # more refreshes (and rotations) happen while the disk is full
        status, body = await daemon.api("GET", "/v1/accounts/default/token")
        assert status == 200
        assert body["generation"] > stuck_generation + 1  # served from memory
        assert emulator.access_token_valid(body["access_token"])
        status, health = await daemon.api("GET", "/v1/status")
        assert health["accounts"][0]["write_pending"] is True
        filler.unlink()
        second_filler.unlink()
        await daemon.wait_log("state saved again", timeout=10)
        state = daemon.state()
        assert state["generation"] > stuck_generation
        # The refresh token on disk is the one Kakao still accepts: nothing was lost.
        assert emulator.refresh_token_status(state["tokens"]["refresh_token"]) == "live"
        assert emulator.stats.retired_refresh_presented == 0
        # With room again, the reserve is back for the next time.
        await daemon.wait_for(
            lambda: (tiny_state_fs / ".kakao-tokend.reserve").exists(), what="reserve restored"
        )
    finally:
        assert await daemon.stop() == 0


async def test_a_reserve_missing_at_start_is_created_once_the_disk_has_room(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """Started on a full disk (or after a kill -9 while it was full), the daemon finds no
    emergency reserve and cannot make one; once there is room again, the next save makes it.
    Before, only a reserve this process had given up itself was ever re-created."""
    short_tokens(emulator, access=2, refresh=3600)
    emulator.settings.rotation_window = 3000  # every refresh rotates
    config = write_config(tmp_path, emulator, rotation_window=3000)
    await login(emulator, config)
    reserve = tiny_state_fs / ".kakao-tokend.reserve"
    reserve.unlink(missing_ok=True)
    filler = fill_up(tiny_state_fs)
    daemon = await start_daemon(config)
    try:
        assert not reserve.exists()
        generation = daemon.state()["generation"]
        filler.unlink()
        await daemon.wait_for(
            lambda: daemon.state()["generation"] > generation + 1, what="saves with room again"
        )
        await daemon.wait_for(reserve.exists, timeout=3, what="the reserve made")
        assert reserve.stat().st_size == 64 * 1024
    finally:
        assert await daemon.stop() == 0


async def test_a_start_that_cannot_make_the_reserve_warns_once_what_it_means(
    emulator: KakaoEmulator, tmp_path: Path, tiny_state_fs: Path
) -> None:
    """Started on a full state disk, the daemon cannot make its 64 KiB emergency reserve:
    one warning line (for two accounts in that directory) says so, what it means (a rotated
    refresh token may not be saved) and what to do (free some space). It said nothing."""
    config = write_config(tmp_path, emulator, accounts=["default", "bot"])
    await login(emulator, config)
    (tiny_state_fs / ".kakao-tokend.reserve").unlink(missing_ok=True)
    filler = fill_up(tiny_state_fs)
    daemon = await start_daemon(config)
    try:
        lines = [line for line in daemon.log_text().splitlines() if "emergency reserve" in line]
        assert len(lines) == 1, lines
        (line,) = lines
        assert "WARNING" in line and str(tiny_state_fs) in line, line
        assert "64 KiB" in line and "refresh token" in line, line
        assert "free some disk space" in line, line
    finally:
        filler.unlink()
        assert await daemon.stop() == 0


async def test_the_start_removes_stale_temp_files_wherever_it_writes(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Temporary files a kill -9 left mid-write (a rescue file's holds the refresh token) are
    removed at the start in every directory the daemon writes: the runtime directory and
    those of access_token_file and env_file too, not only the state and token-file ones.
    A fresh one (a writer at work right now) and files not ours are left alone."""
    sinks = tmp_path / "sinks"
    extra = (
        "[accounts.default]\n"
        f'access_token_file = "{sinks / "access" / "token"}"\n'
        f'env_file = "{sinks / "env" / "kakao.env"}"\n'
    )
    config = write_config(tmp_path, emulator, extra=extra)
    await login(emulator, config)
    old = time.time() - 3600
    stale = []
    for directory, name in [
        (tmp_path / "run", "default.rescue.json"),
        (sinks / "access", "token"),
        (sinks / "env", "kakao.env"),
    ]:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f".kakao-tokend.{name}.0badf00d.tmp"
        path.write_text('{"refresh_token": "left by a kill -9"}')
        os.utime(path, (old, old))
        stale.append(path)
    fresh = tmp_path / "run" / ".kakao-tokend.default.rescue.json.5eed5eed.tmp"
    fresh.write_text("being written right now")
    other = tmp_path / "run" / "someone-elses.tmp"
    other.write_text("not ours")
    os.utime(other, (old, old))
    daemon = await start_daemon(config)
    try:
        assert [path for path in stale if path.exists()] == []
        assert fresh.exists() and other.exists()
    finally:
        assert await daemon.stop() == 0


async def test_sd_notify_messages_reach_the_notify_socket(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """READY, STATUS, WATCHDOG, RELOADING and STOPPING arrive on a fake NOTIFY_SOCKET."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    with NotifyReceiver() as notify:
        env = {**notify.env, "WATCHDOG_USEC": "1000000"}
        daemon = await start_daemon(config, env=env)
        try:
            await daemon.wait_for(lambda: notify.seen("WATCHDOG=1"), what="watchdog ping")
            daemon.send(signal.SIGHUP)
            await daemon.wait_for(lambda: notify.seen("RELOADING=1"), what="reloading")
        finally:
            assert await daemon.stop() == 0
        text = notify.text()
    assert "READY=1" in text
    assert "STATUS=default: access" in text
    assert "MONOTONIC_USEC=" in text
    assert "STOPPING=1" in text
    assert text.index("READY=1") < text.index("STOPPING=1")


async def test_journald_priority_prefixes_when_stderr_is_the_journal(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """With JOURNAL_STREAM naming stderr, every line carries a <N> priority prefix."""
    short_tokens(emulator, access=2)
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    emulator.inject("token", "http500", count=1)
    # JOURNAL_STREAM names the device and inode of the stream systemd connected to stderr.
    log_path = tmp_path / "journal.log"
    log_path.touch()
    stat = os.stat(log_path)
    with log_path.open("ab") as stream:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kakao_tokend",
            "--config",
            str(config),
            "run",
            stdout=stream,
            stderr=stream,
            env={**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"},
        )
    await asyncio.sleep(0)
    deadline = time.monotonic() + 15
    while "refreshed default" not in log_path.read_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    lines = [line for line in log_path.read_text().splitlines() if line]
    assert lines
    assert all(line[:1] == "<" and line[2] == ">" for line in lines), lines[:5]
    assert any(line.startswith("<4>") and "refresh failed" in line for line in lines)
    assert any(line.startswith("<6>") and "refreshed default" in line for line in lines)
    assert not any(parse_time_prefix(line) for line in lines)


def parse_time_prefix(line: str) -> bool:
    """Return True when a log line starts with a timestamp (journald adds its own)."""
    try:
        parse_time(line[3:22].replace(" ", "T") + "Z")
    except ValueError:
        return False
    return True


async def test_a_damaged_token_file_is_rewritten_at_start(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A torn published file (e.g. written by hand) does not stop the start; it is republished."""
    config = write_config(tmp_path, emulator)
    state = await login(emulator, config)
    (tmp_path / "state" / "default.token.json").write_text('{"access_tok')
    daemon = await start_daemon(config)
    try:
        assert daemon.published()["access_token"] == state.tokens.access_token
    finally:
        assert await daemon.stop() == 0


async def test_deeply_nested_token_and_alert_files_do_not_stop_the_start(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """40 kB of brackets in the published token file and the alert bookkeeping (deeper than
    Python's parser recurses) are damaged files like any other: the daemon starts, says so in
    one line each and republishes. It refused to start with "internal error: RecursionError"."""
    config = write_config(tmp_path, emulator)
    state = await login(emulator, config)
    nested = "[" * 20000 + "]" * 20000
    for name in ("default.token.json", "default.alerts.json"):
        (tmp_path / "state" / name).write_text(nested)
        (tmp_path / "state" / name).chmod(0o600)
    daemon = await start_daemon(config)
    try:
        assert daemon.published()["access_token"] == state.tokens.access_token
        log = daemon.log_text()
        assert "RecursionError" not in log and "Traceback" not in log
        assert "default.alerts.json" in log
    finally:
        assert await daemon.stop() == 0


async def test_a_stop_keeps_the_late_answer_of_a_refresh_still_open(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`systemctl restart` (SIGTERM) while a refresh given up on is still open: Kakao rotated
    at once and answers 1 s later, after the 0.475 s wait of a 10-second token. The stop
    waits for that answer and keeps the rotated refresh token, so the next start refreshes
    with a live one. Before, the stop closed the session under it, and the next start
    needed a new login (the saved refresh token was retired)."""
    short_tokens(emulator, access=10, refresh=3600)
    emulator.settings.rotation_window = 7200  # every refresh rotates
    # The retry waits 1.5 s, so the stop meets the open request alone (no retry waits on it).
    config = write_config(
        tmp_path,
        emulator,
        timeout="30s",
        connect_timeout="10s",
        retry_initial="1.5s",
        retry_max="1.5s",
    )
    await login(emulator, config)
    daemon = await start_daemon(config)
    emulator.inject("token", "late", count=1, delay=1.0)
    try:
        await daemon.wait_log("unanswered after", timeout=15)
    finally:
        assert await daemon.stop() == 0
    state = daemon.state()
    assert state["generation"] == 2, daemon.log_text()[-2000:]
    saved_refresh = load_state_tokens(config)
    assert emulator.refresh_token_status(saved_refresh) == "live"


@pytest.mark.slow(50)
async def test_a_stop_waits_for_a_long_lived_tokens_request_as_long_as_it_stays_open(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A token living hours keeps a request given up on open for twice its configured wait
    (tokens.answer_patience: 60 s for Kakao's 6-hour token and 30 s wait). A stop that comes
    just after such a request was sent (here one `kakao-tokend refresh` asked for) waits for
    it that long: Kakao rotated at once and answers after 46 s, past the 25 s wait set here.
    Before, the stop waited for the API's requests (5 to 10 s) and then the account lock's
    wait, the configured wait and a second (31 s), closed the session under the open request,
    and the saved refresh token was the retired one (the next start: a new login)."""
    short_tokens(emulator, access=3600, refresh=7200)
    emulator.settings.rotation_window = 14400  # every refresh rotates
    config = write_config(
        tmp_path,
        emulator,
        timeout="25s",
        connect_timeout="5s",
        retry_initial="60s",
        retry_max="60s",
    )
    await login(emulator, config)
    daemon = await start_daemon(config)
    emulator.inject("token", "late", count=1, delay=46.0)
    sent = emulator.stats.requests["token"]
    asked = asyncio.ensure_future(run_cli(config, "refresh"))
    try:
        await daemon.wait_for(
            lambda: emulator.stats.requests["token"] > sent, timeout=10, what="the request"
        )
        began = time.monotonic()
        assert await daemon.stop(timeout=70) == 0
        assert time.monotonic() - began >= 45, daemon.log_text()[-2000:]
    finally:
        asked.cancel()
    state = daemon.state()
    assert state["generation"] == 2, daemon.log_text()[-2000:]
    saved_refresh = load_state_tokens(config)
    assert emulator.refresh_token_status(saved_refresh) == "live"


def load_state_tokens(config: Path) -> str:
    """The refresh token in the default account's state file."""
    from kakao_tokend.config import load_config
    from kakao_tokend.store import AccountStore

    saved = AccountStore(load_config(config).accounts["default"]).load()
    assert saved is not None
    return saved.tokens.refresh_token
