"""`kakao-tokend memo`: "send to me" through the daemon or directly, into the emulator's inbox."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemonproc import (
    DaemonProcess,
    frozen_daemon_socket,
    login,
    run_cli,
    start_daemon,
    write_config,
)
from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator

pytestmark = pytest.mark.timeout(90)

PROXY_LOG = "api POST /kapi/v2/api/talk/memo/default/send"


async def run_cli_with_stdin(config: Path, data: bytes, *args: str) -> tuple[int, str, str]:
    """Run the real CLI with ``data`` on its stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kakao_tokend",
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(data), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def logged_in(tmp_path: Path, emulator: KakaoEmulator) -> Path:
    """A config whose default account is logged in (with the talk_message consent)."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    return config


@pytest.fixture(params=["daemon", "direct"])
async def path(
    request: pytest.FixtureRequest, logged_in: Path
) -> AsyncIterator[DaemonProcess | None]:
    """Run each test once with the daemon running (proxy) and once without (direct)."""
    if request.param == "direct":
        yield None
        return
    daemon = await start_daemon(logged_in)
    try:
        yield daemon
    finally:
        await daemon.stop()


class TestSend:
    """The message lands in the user's own chat, whichever way it goes."""

    async def test_text_arrives_in_the_inbox(
        self, logged_in: Path, emulator: KakaoEmulator, path: DaemonProcess | None
    ) -> None:
        """`memo "백업 완료"` delivers that text; the daemon's proxy is used when it runs."""
        code, out, err = await run_cli(logged_in, "memo", "백업 완료")
        assert code == 0, out + err
        messages = emulator.inbox(DEFAULT_USER_ID)
        assert [m["text"] for m in messages] == ["백업 완료"]
        assert messages[0]["template"]["link"] == {}
        if path is None:
            assert "by the daemon" not in out
        else:
            assert "(by the daemon)" in out
            await path.wait_log(PROXY_LOG)

    async def test_text_from_stdin_with_link_and_button(
        self, logged_in: Path, emulator: KakaoEmulator, path: DaemonProcess | None
    ) -> None:
        """Piped text (one trailing newline dropped), --link and --button-title reach Kakao."""
        code, out, err = await run_cli_with_stdin(
            logged_in,
            "디스크 91%\n/var 가득\n".encode(),
            "memo",
            "--link",
            "https://example.com/disk",
            "--button-title",
            "보기",
        )
        assert code == 0, out + err
        (message,) = emulator.inbox(DEFAULT_USER_ID)
        assert message["text"] == "디스크 91%\n/var 가득"
        template = message["template"]
        assert template["link"] == {
            "web_url": "https://example.com/disk",
            "mobile_web_url": "https://example.com/disk",
        }
        assert template["button_title"] == "보기"

    async def test_missing_consent_names_the_console_item_and_the_login(
        self, logged_in: Path, emulator: KakaoEmulator, path: DaemonProcess | None
    ) -> None:
        """-402 (no talk_message consent): which consent item to enable, and the new login."""
        emulator.withdraw_scope(DEFAULT_USER_ID)
        code, out, err = await run_cli(logged_in, "memo", "hello")
        assert code == 77, out + err
        assert "talk_message consent item (-402)" in err
        assert "동의항목 › 카카오톡 메시지 전송" in err
        assert f"`kakao-tokend --config {logged_in} login --scope talk_message`" in err
        assert len(err.strip().splitlines()) == 1, err
        assert emulator.inbox() == []

    async def test_quota_says_try_tomorrow(
        self, logged_in: Path, emulator: KakaoEmulator, path: DaemonProcess | None
    ) -> None:
        """A daily quota refusal (-532) is a 'try again tomorrow' with exit 69."""
        emulator.inject("memo", "-532")
        code, out, err = await run_cli(logged_in, "memo", "hello")
        assert code == 69, out + err
        assert "sender's daily message quota is used up (-532)" in err
        assert "try again tomorrow" in err


class TestDirect:
    """Without a daemon the CLI keeps the token fresh itself."""

    async def test_a_token_kakao_no_longer_accepts_is_refreshed_once(
        self, logged_in: Path, emulator: KakaoEmulator
    ) -> None:
        """Kakao's clock says the access token is dead: one refresh (saved), then it is sent."""
        before = (logged_in.parent / "state" / "default.state.json").read_text()
        emulator.advance_clock(emulator.settings.access_lifetime + 10)
        code, out, err = await run_cli(logged_in, "memo", "still here")
        assert code == 0, out + err
        assert [m["text"] for m in emulator.inbox()] == ["still here"]
        after = (logged_in.parent / "state" / "default.state.json").read_text()
        assert after != before  # the refreshed token set was saved
        assert emulator.stats.refreshes_ok == 1

    async def test_an_account_that_is_not_logged_in_says_login(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """No tokens: exit 77 with the login command, nothing sent."""
        config = write_config(tmp_path, emulator)
        code, out, err = await run_cli(config, "memo", "hello")
        assert code == 77, out + err
        assert f"kakao-tokend --config {config} login" in err
        assert emulator.stats.requests["memo"] == 0


class TestThroughAStuckDaemon:
    async def test_memo_waits_for_the_daemon_as_long_as_its_own_deadline_allows(
        self, tmp_path: Path
    ) -> None:
        """`memo` through the daemon waits twice the daemon's own deadline ([api]
        request_timeout), not a fixed 60 s: with the default 60 s deadline the command gave
        up exactly when the daemon's answer (sent, or 504) was due, so nobody could tell
        whether the message went out. With a 1 s deadline, a daemon that never answers
        ends the command after about 2 s, in one line."""
        config = write_config(tmp_path, extra='[api]\nrequest_timeout = "1s"\n')
        with frozen_daemon_socket(config):
            started = asyncio.get_running_loop().time()
            code, out, err = await run_cli(config, "memo", "hello")
            took = asyncio.get_running_loop().time() - started
        assert code != 0 and out == "", err
        assert 1.5 <= took < 10, f"{took:.1f}s"
        assert "did not answer" in err and "Traceback" not in err


class TestRefusedBeforeSending:
    """Mistakes that are caught locally: exit 64, nothing reaches Kakao."""

    @pytest.mark.parametrize(
        ("args", "needle"),
        [
            (["x" * 201], "the message has 201 characters; KakaoTalk's text message takes at most"),
            (["가" * 201], "at most 200"),
            (["   "], "the message is empty"),
            (["hi", "--link", "example.com"], "--link must be an http:// or https:// address"),
            (["hi", "--button-title", "보기"], "--button-title needs --link"),
        ],
    )
    async def test_refused_with_64(
        self, logged_in: Path, emulator: KakaoEmulator, args: list[str], needle: str
    ) -> None:
        """Over 200 characters, empty text, a bad link or a button without a link."""
        requests = sum(emulator.stats.requests.values())
        code, out, err = await run_cli(logged_in, "memo", *args)
        assert code == 64, out + err
        assert needle in err
        assert "Traceback" not in err
        assert sum(emulator.stats.requests.values()) == requests  # not even a refresh

    async def test_exactly_200_characters_are_sent(
        self, logged_in: Path, emulator: KakaoEmulator
    ) -> None:
        """The limit is inclusive: 200 Korean characters go through unchanged."""
        text = "가" * 200
        code, out, err = await run_cli(logged_in, "memo", text)
        assert code == 0, out + err
        assert [m["text"] for m in emulator.inbox()] == [text]
