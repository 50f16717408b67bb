"""The login flow end to end: a real `kakao-tokend login` process against the emulator."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from daemonproc import free_port, write_login_config
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.login import BROWSER_FAILURES_KEPT, parse_pasted
from loginproc import LoginProcess, follow_authorize, get_page, spawn_login, with_query


def mode(path: Path) -> int:
    """Return a file's permission bits."""
    return stat.S_IMODE(path.stat().st_mode)


class TestBrowserCallback:
    """The loopback server receives Kakao's redirect."""

    async def test_login_writes_private_state_and_calls_user_me(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
        tmp_path: Path,
    ) -> None:
        """A login stores 0600 state + published token file and calls /v2/user/me once."""
        login = await start_login()
        location = await follow_authorize(login.url)
        status, page = await get_page(location)
        code, out, err = await login.finish()
        assert status == 200
        assert "Login succeeded — you can close this window" in page
        assert code == 0, err
        assert "Login succeeded for account 'default'" in out
        assert "refresh token expires" in out
        state_file = tmp_path / "state" / "default.state.json"
        token_file = tmp_path / "state" / "default.token.json"
        assert mode(state_file) == 0o600
        assert mode(token_file) == 0o640
        published = json.loads(token_file.read_text())
        assert published["generation"] == 1
        assert published["access_token"] not in out + err  # printed only by `token`
        assert emulator.stats.requests["user_me"] == 1
        assert json.loads(state_file.read_text())["user_id"] == 1234567890

    async def test_an_answer_without_the_refresh_expiry_keeps_the_login_with_an_estimate(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
        tmp_path: Path,
    ) -> None:
        """Kakao's login answer without ``refresh_token_expires_in``: the login succeeds (it
        was refused, and the working login lost, before), the refresh token's expiry is
        Kakao's documented 60 days, marked estimated, and the CLI says so on stderr."""
        emulator.settings.omit_token_fields = ["refresh_token_expires_in"]
        login = await start_login()
        location = await follow_authorize(login.url)
        status, page = await get_page(location)
        code, out, err = await login.finish()
        assert code == 0, out + err
        assert status == 200 and "Login succeeded" in page
        assert "(estimated)" in out
        assert "did not say how long the refresh token lives" in err
        state = json.loads((tmp_path / "state" / "default.state.json").read_text())
        tokens = state["tokens"]
        assert tokens["refresh_expiry_estimated"] is True
        issued = datetime.fromisoformat(tokens["refresh_issued_at"])
        expires = datetime.fromisoformat(tokens["refresh_expires_at"])
        assert abs((expires - issued).total_seconds() - 5183999) <= 1
        assert emulator.refresh_token_status(tokens["refresh_token"]) == "live"
        assert tokens["refresh_token"] not in out + err

    async def test_a_failed_user_me_is_tried_again_before_the_login_ends(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
        tmp_path: Path,
    ) -> None:
        """Kakao unlinks a user whose first day passes without a personal-info call, and
        nothing but `login` makes one: a transient failure of /v2/user/me (a 503) is tried
        again, so the user is signed up and the login ends without the warning."""
        emulator.inject("user_me", "http503")
        login = await start_login()
        await get_page(await follow_authorize(login.url))
        code, _, err = await login.finish()
        assert code == 0, err
        assert emulator.stats.requests["user_me"] == 2
        assert emulator.user().personal_info_called
        assert "could not call /v2/user/me" not in err
        state = json.loads((tmp_path / "state" / "default.state.json").read_text())
        assert state["user_id"] == 1234567890

    async def test_second_login_continues_the_generation(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """A fresh login replaces the previous tokens and continues their generation count."""
        for _ in range(2):
            login = await start_login()
            await get_page(await follow_authorize(login.url))
            code, _, err = await login.finish()
            assert code == 0, err
        state = json.loads((tmp_path / "state" / "default.state.json").read_text())
        assert state["generation"] == 2

    async def test_another_kakao_user_is_refused_unless_switch_user(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
        tmp_path: Path,
    ) -> None:
        """A re-login that comes back as another Kakao user (the wrong account picked in the
        browser, or an answer that is not the person's) is refused: one error line naming
        both users and the option that accepts it; the account keeps its tokens. With
        --switch-user the same login is stored."""
        login = await start_login()
        await get_page(await follow_authorize(login.url))
        assert (await login.finish())[0] == 0
        state_file = tmp_path / "state" / "default.state.json"
        before = state_file.read_bytes()
        other = emulator.add_user(name="second").id
        login = await start_login("--timeout", "3s")
        status, page = await get_page(await follow_authorize(login.url + "&login_hint=second"))
        code, out, err = await login.finish()
        assert status == 400 and f"Kakao user {other}" in page
        assert code == 1, out + err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert f"Kakao user {other}" in errors[0] and "Kakao user 1234567890" in errors[0]
        config = tmp_path / "config.toml"
        assert f"`kakao-tokend --config {config} login --switch-user`" in errors[0]
        assert "Traceback" not in err and "Login succeeded" not in out
        assert state_file.read_bytes() == before

        login = await start_login("--switch-user")
        await get_page(await follow_authorize(login.url + "&login_hint=second"))
        code, out, err = await login.finish()
        assert code == 0, err
        assert f"as Kakao user {other}" in out
        state = json.loads(state_file.read_text())
        assert (state["user_id"], state["generation"]) == (other, 2)

    async def test_state_mismatch_is_ignored(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """A redirect whose state was tampered with gets a neutral 400 page and is ignored:
        the login keeps waiting, and the real redirect still completes it."""
        login = await start_login()
        location = await follow_authorize(login.url)
        status, page = await get_page(with_query(location, state="forged"))
        assert status == 400 and "Login failed" not in page
        assert login.proc.returncode is None
        status, _ = await get_page(location)
        code, _, err = await login.finish()
        assert status == 200 and code == 0, err
        assert (tmp_path / "state" / "default.state.json").exists()

    async def test_pkce_failure_is_reported(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """A code bound to another PKCE challenge is refused at the exchange: the page says
        so at once, and at --timeout (no other answer came) it is the one error line."""
        login = await start_login("--timeout", "3s")
        # The emulator records this challenge; our verifier no longer matches it.
        tampered = with_query(login.url, code_challenge="A" * 43)
        status, page = await get_page(await follow_authorize(tampered))
        code, _, err = await login.finish()
        assert status == 400 and "Login failed" in page
        assert code not in (0, 70)
        assert err.count("error:") == 1 and "Traceback" not in err
        assert not (tmp_path / "state" / "default.state.json").exists()

    async def test_cancel_says_cancelled(
        self, start_login: Callable[..., Awaitable[LoginProcess]], emulator: KakaoEmulator
    ) -> None:
        """Pressing Cancel (error=access_denied) shows a 'cancelled' page at once; the login
        waits on (the person may open the URL again) and at --timeout exits 1 saying it
        was cancelled, with the command to start again."""
        emulator.deny_next_authorize()
        login = await start_login("--timeout", "3s")
        location = await follow_authorize(login.url)
        assert "error=access_denied" in location
        status, page = await get_page(location)
        code, _, err = await login.finish()
        assert status == 400 and "Login cancelled" in page and "still waiting" in page
        assert code == 1
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cancelled" in errors[0], err
        assert "press Ctrl-C to stop" in err and "Traceback" not in err

    async def test_failed_answers_from_the_browser_are_bounded(
        self, start_login: Callable[..., Awaitable[LoginProcess]], emulator: KakaoEmulator
    ) -> None:
        """A failed answer does not end the login, but each may cost a token request at
        Kakao: after BROWSER_FAILURES_KEPT of them the next one ends it, with its error."""
        login = await start_login()
        location = await follow_authorize(login.url)
        bad = with_query(location, code="no-such-code-0123456789")
        for _ in range(BROWSER_FAILURES_KEPT):
            status, page = await get_page(bad)
            assert status == 400 and "still waiting" in page
        status, page = await get_page(bad)
        code, _, err = await login.finish()
        assert status == 400 and "still waiting" not in page
        assert code not in (0, 70) and "Traceback" not in err
        assert emulator.stats.requests["token"] == BROWSER_FAILURES_KEPT + 1

    async def test_timeout_names_the_option_to_wait_longer(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """No redirect within --timeout: one error line with the exact command to wait longer
        (with --config: the test's config file is not one found by default)."""
        login = await start_login("--timeout", "1s")  # the last --timeout wins
        code, _, err = await login.finish()
        assert code == 1, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert "no login answer arrived within 1 s" in errors[0]
        config = tmp_path / "config.toml"
        assert f"`kakao-tokend --config {config} login --timeout 10m`" in errors[0]
        assert "Traceback" not in err


class TestPasted:
    """On a headless server the user pastes the redirect address (or the code) on stdin."""

    async def test_pasted_redirect_url(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """A pasted redirect URL completes the login without the loopback callback."""
        login = await start_login()
        location = await follow_authorize(login.url)
        assert login.proc.stdin is not None
        login.proc.stdin.write(location.encode() + b"\n")
        await login.proc.stdin.drain()
        code, out, err = await login.finish()
        assert code == 0, err
        assert "Login succeeded" in out
        assert (tmp_path / "state" / "default.token.json").exists()

    async def test_pasted_bare_code(
        self, start_login: Callable[..., Awaitable[LoginProcess]], tmp_path: Path
    ) -> None:
        """A pasted bare code (no state to check) is exchanged too."""
        login = await start_login()
        location = await follow_authorize(login.url)
        bare = parse_qs(urlsplit(location).query)["code"][0]
        assert login.proc.stdin is not None
        login.proc.stdin.write(f"  {bare}  \n".encode())
        await login.proc.stdin.drain()
        code, _, err = await login.finish()
        assert code == 0, err
        assert (tmp_path / "state" / "default.state.json").exists()

    async def test_prints_ssh_forward_hint(
        self, start_login: Callable[..., Awaitable[LoginProcess]]
    ) -> None:
        """--no-browser tells the user how to forward the callback port over ssh."""
        login = await start_login()
        assert any("ssh -L" in line and "127.0.0.1" in line for line in login.seen)


class TestWaitingHelp:
    """While `login` waits, it explains the failures that never reach it and checks pastes."""

    async def test_a_mistyped_paste_is_rejected_locally_and_the_login_keeps_waiting(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
    ) -> None:
        """`hello world`, an address without a code and the login URL itself are refused
        with a hint, never sent to Kakao (no token request), and the real redirect address
        pasted afterwards still completes the same login."""
        login = await start_login()
        stdin, stderr = login.proc.stdin, login.proc.stderr
        assert stdin is not None and stderr is not None
        for mistake, expected_hint in (
            (b"hello world\n", "it contains spaces"),
            (b"http://127.0.0.1:1/callback?foo=bar\n", "has no code="),
            (login.url.encode() + b"\n", "that is the login URL itself"),
            (b"short\n", "too short"),
        ):
            stdin.write(mistake)
            await stdin.drain()
            async with asyncio.timeout(10):
                while True:
                    line = (await stderr.readline()).decode()
                    assert line, "".join(login.seen)
                    login.seen.append(line)
                    if "not a login answer" in line:
                        break
            assert expected_hint in line, line
            assert "paste" in line.lower(), line  # the hint: what to paste instead
            assert login.proc.returncode is None  # still waiting
        assert emulator.stats.requests["token"] == 0  # nothing reached Kakao
        location = await follow_authorize(login.url)
        stdin.write(location.encode() + b"\n")
        await stdin.drain()
        code, out, err = await login.finish()
        assert code == 0, err
        assert "Login succeeded" in out
        assert emulator.stats.requests["token"] == 1

    async def test_a_paste_from_another_login_attempt_is_refused_before_kakao(
        self,
        start_login: Callable[..., Awaitable[LoginProcess]],
        emulator: KakaoEmulator,
    ) -> None:
        """A redirect address whose state belongs to an older attempt is refused locally (its
        code stays unused) and the login keeps waiting for the right one."""
        login = await start_login()
        location = await follow_authorize(login.url)
        stale = with_query(location, state="from-an-old-tab")
        assert login.proc.stdin is not None and login.proc.stderr is not None
        login.proc.stdin.write(stale.encode() + b"\n")
        await login.proc.stdin.drain()
        line = ""
        async with asyncio.timeout(10):
            while "not a login answer" not in line:
                line = (await login.proc.stderr.readline()).decode()
                assert line
        assert "another login attempt" in line, line
        assert emulator.stats.requests["token"] == 0
        login.proc.stdin.write(location.encode() + b"\n")
        await login.proc.stdin.drain()
        code, _, err = await login.finish()
        assert code == 0, err

    async def test_while_waiting_login_explains_koe006(
        self, tmp_path: Path, emulator: KakaoEmulator
    ) -> None:
        """With a redirect URI Kakao does not know, the browser shows KOE006 and nothing ever
        arrives: while waiting, `login` says what KOE006 means, names the exact URI to register
        and where, before the final timeout error."""
        config = write_login_config(tmp_path, emulator, redirect_port=free_port())
        unregistered = emulator.settings.redirect_uris.pop()  # a typo at Kakao's side
        proc = await spawn_login(config, timeout="4s")
        assert proc.stderr is not None
        url = ""
        async with asyncio.timeout(30):  # a loaded machine may take long to start Python
            while not url:
                line = (await proc.stderr.readline()).decode()
                assert line
                url = line.strip() if line.strip().startswith("http") else ""
        async with aiohttp.ClientSession() as session, session.get(url) as page:
            assert "KOE006" in await page.text()  # what the person sees in the browser
        _, err_bytes = await asyncio.wait_for(proc.communicate(), 20)
        err = err_bytes.decode()
        assert proc.returncode == 1, err
        hint = next(line for line in err.splitlines() if "KOE006" in line)
        assert unregistered in hint and "Redirect URI" in hint, hint
        assert "kakao.redirect_uri" in hint, hint
        lines = err.splitlines()
        final = next(i for i, line in enumerate(lines) if line.startswith("error:"))
        assert lines.index(hint) < final  # said while waiting, not after giving up
        assert "KOE006" not in lines[final]  # and said once


class TestParsePasted:
    """Pasted text to query parameters."""

    def test_variants(self) -> None:
        """URL, bare query string and bare code are all understood; blanks give nothing."""
        assert parse_pasted("http://127.0.0.1:8765/callback?code=abc&state=xyz\n") == {
            "code": "abc",
            "state": "xyz",
        }
        assert parse_pasted("code=abc&state=xyz") == {"code": "abc", "state": "xyz"}
        assert parse_pasted("  abc123 ") == {"code": "abc123"}
        assert parse_pasted("   ") == {}
