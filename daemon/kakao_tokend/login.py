"""The interactive first login: PKCE authorize URL, loopback redirect server, code exchange."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import os
import shutil
import string
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from .config import AccountConfig
from .errors import KakaoError, KakaoTokendError, KakaoUnavailable, StateCorrupt
from .kakao import KakaoClient, create_session, new_pkce_pair, new_state
from .relogin import cli_command, login_command
from .state import AccountState
from .store import AccountStore
from .tokens import Clock, TokenSet, backoff_delay, format_local_time, utcnow

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
#: How often `login` calls /v2/user/me when Kakao answers with a transient error, and the
#: first pause between the calls (tokens.backoff_delay: less for a short-lived token).
USER_ME_ATTEMPTS = 3
USER_ME_RETRY_INITIAL = 1.0
#: When `login` explains KOE006 at the latest (a quarter of --timeout when that is shorter).
KOE006_HELP_AFTER = 20.0
#: How many failed answers through the browser one login survives (the next failure ends it).
#: Only success ends a login early, so an answer forged with a leaked state cannot end it;
#: this bounds the token requests such answers cost at Kakao. A person retrying needs a few.
BROWSER_FAILURES_KEPT = 10

Notify = Callable[[str], None]
#: Checks the state a login is about to replace (LoginFlow.check_replacing; raises to refuse).
CheckReplacing = Callable[[AccountState | None], None]
#: Stores a fresh login's tokens (tokens, Kakao user id, now) and returns the state written;
#: it calls the check with the state it replaces, under the same lock as the write.
Persist = Callable[[TokenSet, int | None, datetime, CheckReplacing], Awaitable[AccountState]]


class LoginFailed(KakaoTokendError):
    """The login did not produce tokens (cancelled, state mismatch, timeout, bad redirect)."""


class LoginCancelled(LoginFailed):
    """The user pressed Cancel on Kakao's consent page (error=access_denied)."""


class LoginStateMismatch(LoginFailed):
    """The redirect's ``state`` is not the one we sent: a stale tab or a forged request."""


class LoginOtherUser(LoginFailed):
    """The login is for another Kakao user than the one whose tokens the account holds."""


@dataclass(frozen=True)
class RedirectTarget:
    """Where Kakao sends the browser back to, split into what the loopback server needs."""

    uri: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def is_loopback(self) -> bool:
        """Return True when we can serve the redirect ourselves on this machine."""
        return self.scheme == "http" and self.host in LOOPBACK_HOSTS

    @classmethod
    def parse(cls, uri: str) -> RedirectTarget:
        """Split a redirect URI; raise LoginFailed when it is not an absolute http(s) URL."""
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoginFailed(
                f"redirect URI {uri!r} is not an absolute http(s) URL",
                hint="set kakao.redirect_uri, e.g. http://127.0.0.1:8765/callback",
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise LoginFailed(f"redirect URI {uri!r} has an invalid port") from None
        return cls(uri, parts.scheme, parts.hostname, port, parts.path or "/")


@dataclass(frozen=True)
class LoginResult:
    """What a successful login produced, for the CLI to report."""

    state: AccountState
    user_id: int | None
    #: Why /v2/user/me could not be called (None when it succeeded).
    user_me_problem: str | None
    #: "browser" when the loopback server received the redirect, "pasted" for stdin.
    via: str


def parse_pasted(text: str) -> dict[str, str]:
    """Turn a pasted redirect URL (or a bare authorization code) into query parameters."""
    text = text.strip()
    if not text:
        return {}
    if "?" in text or "://" in text or "=" in text:
        query = urlsplit(text).query if "?" in text else text
        parsed = parse_qs(query, keep_blank_values=True)
        return {key: values[-1] for key, values in parsed.items()}
    return {"code": text}


class PasteRejected(LoginFailed):
    """A pasted line that cannot be a login answer; refused before anything reaches Kakao."""


#: Shortest bare authorization code accepted: RFC 6749 §10.10 asks for at least 128 bits of
#: entropy (22 URL-safe characters); Kakao's codes are far longer. Anything shorter is a typo.
MIN_CODE_LENGTH = 16
_CODE_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~+/=")


def check_pasted(text: str, *, redirect_uri: str, state: str) -> dict[str, str]:
    """Return the login answer in a pasted line, or raise PasteRejected saying what is wrong.

    Only local checks: a code Kakao has not seen is never sent, because a failed exchange
    ends the attempt (and a code that was sent can never be used again).
    """
    paste_hint = (
        f"paste the whole address the browser ends up on after the login (it starts with"
        f" {redirect_uri}?code=), or just its code, and press Enter"
    )
    text = text.strip()
    params = parse_pasted(text)
    if "?" in text or "://" in text or "=" in text:
        if not params.get("code") and not params.get("error"):
            if urlsplit(text).path.endswith("/oauth/authorize"):
                raise PasteRejected(
                    "that is the login URL itself",
                    hint=f"open it in a browser, log in, then {paste_hint}",
                )
            raise PasteRejected("the address has no code= in it", hint=paste_hint)
        if "state" in params and params["state"] != state:
            raise PasteRejected(
                "the address belongs to another login attempt (its state differs)",
                hint=f"open the URL printed above, log in, then {paste_hint}",
            )
        return params
    if any(character.isspace() for character in text):
        raise PasteRejected("it contains spaces", hint=paste_hint)
    if not set(text) <= _CODE_CHARACTERS:
        raise PasteRejected("it has characters no authorization code has", hint=paste_hint)
    if len(text) < MIN_CODE_LENGTH:
        raise PasteRejected("it is too short for an authorization code", hint=paste_hint)
    return params


def koe006_help(redirect_uri: str, account: AccountConfig) -> str:
    """Explain the one login failure that never reaches us: Kakao's KOE006 error page."""
    return (
        f"Still waiting. If the browser shows a Kakao error page with KOE006, Kakao does not know"
        f" the redirect URI {redirect_uri}: register exactly this address for the app (Kakao"
        f" Developers > My Application > Kakao Login > Redirect URI; 카카오 로그인 > Redirect URI)"
        f" or set kakao.redirect_uri to one that is registered, then run"
        f" `{login_command(account)}` again."
    )


def write_browser_page(url: str) -> Path:
    """Write a private page that sends a browser on to ``url``; return its path.

    Every local user can read every process's command line (`ps`, /proc/PID/cmdline). The
    authorize URL carries the login's ``state``, and whoever knows it can answer the loopback
    listener as if they were Kakao; so a browser is never started with the URL itself but with
    this file's path (Jupyter opens its token URL the same way). The file is 0600 in a fresh
    0700 directory (whatever the umask); the caller removes the directory when the login ends.
    """
    directory = Path(tempfile.mkdtemp(prefix="kakao-tokend-login-"))
    try:
        os.chmod(directory, 0o700)
        path = directory / "login.html"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(fd, 0o600)
            target = html.escape(url, quote=True)
            handle.write(
                "<!doctype html><html><head><meta charset='utf-8'>"
                "<meta name='referrer' content='no-referrer'>"
                f"<meta http-equiv='refresh' content='0;url={target}'>"
                "<title>kakao-tokend: Kakao login</title></head>"
                "<body style='font-family:sans-serif;max-width:40em;margin:3em auto'>"
                f"<p>Opening the Kakao login… If nothing happens, <a href='{target}'>continue"
                " to Kakao</a>.</p></body></html>"
            )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return path


def _page(title: str, message: str, *, ok: bool) -> web.Response:
    colour = "#1a7f37" if ok else "#b42318"
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>kakao-tokend: {html.escape(title)}</title></head>"
        "<body style='font-family:sans-serif;max-width:40em;margin:3em auto'>"
        f"<h1 style='color:{colour}'>{html.escape(title)}</h1>"
        f"<p>{html.escape(message)}</p></body></html>"
    )
    return web.Response(text=body, content_type="text/html", status=200 if ok else 400)


class LoginFlow:
    """One login attempt: the PKCE pair, the state, and whichever redirect arrives first."""

    def __init__(
        self,
        account: AccountConfig,
        *,
        scopes: Sequence[str] = (),
        clock: Clock = utcnow,
        lock_timeout: float = 10.0,
        persist: Persist | None = None,
        switch_user: bool = False,
    ) -> None:
        self.account = account
        #: Whether the account may change hands to another Kakao user (`login --switch-user`).
        self.switch_user = switch_user
        #: Where the tokens go (fleet mode: the store's row); None: the account's files.
        self.persist = persist
        self.scopes = tuple(scopes) or account.app.scopes
        self.clock = clock
        self.lock_timeout = lock_timeout
        self.redirect = RedirectTarget.parse(account.app.redirect_uri)
        self.code_verifier, self.code_challenge = new_pkce_pair()
        self.state = new_state()
        self._done: asyncio.Future[LoginResult] | None = None
        self._busy = asyncio.Lock()
        self._client: KakaoClient | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._notify: Notify = log.info
        #: The failed answers from the browser so far, and when the login gives up waiting.
        self._failures: list[KakaoTokendError] = []
        self._deadline: datetime | None = None
        self._explain: asyncio.TimerHandle | None = None

    def authorize_url(self, client: KakaoClient) -> str:
        """Return the Kakao authorize URL for this attempt."""
        return client.authorize_url(
            state=self.state,
            code_challenge=self.code_challenge,
            redirect_uri=self.redirect.uri,
            scopes=list(self.scopes) or None,
        )

    async def complete(self, params: Mapping[str, str], *, via: str) -> LoginResult:
        """Check one redirect's parameters, exchange the code and persist the tokens.

        The first redirect that settles the attempt wins; later ones get LoginFailed. The
        outcome (result or error) is also handed to whoever waits in :meth:`run`. A failed
        answer from the browser does not settle it (see :meth:`_keep_waiting`).
        """
        async with self._busy:
            assert self._done is not None and self._client is not None
            if self._done.done():
                raise LoginFailed("this login attempt is already finished")
            if self._explain is not None:
                self._explain.cancel()  # an answer came: the redirect URI is no KOE006
            try:
                result = await self._complete(self._client, params, via=via)
            except KakaoTokendError as exc:
                if not (via == "browser" and self._keep_waiting(exc)):
                    self._done.set_exception(exc)
                raise
            self._done.set_result(result)
            return result

    def _keep_waiting(self, failure: KakaoTokendError) -> bool:
        """Note a failed answer from the browser; return whether the login waits on.

        Anyone who knows the login's state can send the listener a cancel, an error or a
        code that fails; were that final, a leaked state would let them end the login. So
        only success ends it early: the person sees the failure (page and terminal) and may
        open the URL again — after pressing Cancel by mistake, or logging in as the wrong
        Kakao user. At --timeout the last failure is the login's error.
        """
        self._failures.append(failure)
        if len(self._failures) > BROWSER_FAILURES_KEPT:
            return False
        until = format_local_time(self._deadline) if self._deadline else "--timeout"
        # A cancel's hint (run login again) is for when the login has ended.
        what = failure.message if isinstance(failure, LoginCancelled) else str(failure)
        self._notify(
            f"The browser's answer did not log in: {what}. This login still waits until"
            f" {until}: open the URL above again, or press Ctrl-C to stop."
        )
        return True

    def matches_state(self, params: Mapping[str, str]) -> bool:
        """Whether ``params`` carry this attempt's ``state`` (compared in constant time)."""
        given = params.get("state")
        return given is not None and hmac.compare_digest(given.encode(), self.state.encode())

    async def _complete(
        self, client: KakaoClient, params: Mapping[str, str], *, via: str
    ) -> LoginResult:
        # The state first: nothing else in a request that is not Kakao's answer to this attempt
        # may matter. A pasted bare code carries no state; anything from a browser must.
        if (via == "browser" or "state" in params) and not self.matches_state(params):
            raise LoginStateMismatch(
                "the login answer does not belong to this login attempt (state mismatch)",
                hint=f"close old Kakao login tabs and run `{login_command(self.account)}` again",
            )
        error = params.get("error")
        if error:
            if error == "access_denied":
                raise LoginCancelled(
                    "login was cancelled on Kakao's consent page",
                    hint=f"run `{login_command(self.account)}` again and press Agree",
                )
            description = params.get("error_description") or "no description"
            raise LoginFailed(
                f"Kakao refused the login: {error} ({description})",
                hint="check the app's Kakao Login settings and the requested scopes",
            )
        code = params.get("code")
        if not code:
            raise LoginFailed(
                "the redirect carries no authorization code",
                hint="paste the whole address the browser was sent to, including ?code=...",
            )
        tokens = await client.exchange_code(
            code=code, code_verifier=self.code_verifier, redirect_uri=self.redirect.uri
        )
        user_id, problem = await self._sign_up(client, tokens)

        def check(old: AccountState | None) -> None:
            self.check_replacing(old, user_id)

        if self.persist is not None:
            state = await self.persist(tokens, user_id, self.clock(), check)
        else:
            state = await asyncio.to_thread(self._persist, tokens, user_id, check)
        return LoginResult(state=state, user_id=user_id, user_me_problem=problem, via=via)

    def check_replacing(self, old: AccountState | None, user_id: int | None) -> None:
        """Refuse (LoginOtherUser) to replace one Kakao user's tokens with another's.

        The person may have picked the wrong Kakao account in the browser, or the answer may
        not be theirs at all (someone who learned the login's state answered with a code of
        their own account): either way the account would silently act as someone else.
        `login --switch-user` accepts it on purpose. Unknown ids (an import, a failed
        /v2/user/me) cannot be compared and pass.
        """
        if self.switch_user or old is None or old.user_id is None or user_id is None:
            return
        if old.user_id == user_id:
            return
        raise LoginOtherUser(
            f"the login is for Kakao user {user_id}, but account '{self.account.name}' holds"
            f" Kakao user {old.user_id}'s tokens, which are kept",
            hint=f"log out of Kakao in the browser and log in as Kakao user {old.user_id},"
            f" or run `{cli_command(self.account, 'login', '--switch-user')}` to make the"
            f" account Kakao user {user_id}'s",
        )

    async def _sign_up(
        self, client: KakaoClient, tokens: TokenSet
    ) -> tuple[int | None, str | None]:
        """Call /v2/user/me; return (the user id, why the call failed: None when it worked).

        Kakao unlinks users who never call a personal-info API within 24 h of their first
        login (docs/kakao.md, "What ends a login early"), and nothing but `login` makes that
        call: a transient failure is tried again (tokens.backoff_delay, a few short steps of
        the token's lifetime) before the login ends with a warning.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                me = await client.user_me(tokens.access_token)
            except KakaoUnavailable as exc:
                if attempt >= USER_ME_ATTEMPTS:
                    log.warning("could not call /v2/user/me after login: %s", exc)
                    return None, str(exc)
                log.info("/v2/user/me failed after login (%s); trying again", exc.label)
                await asyncio.sleep(
                    backoff_delay(
                        attempt,
                        now=self.clock(),
                        expires_at=tokens.access_expires_at,
                        lifetime=tokens.access_lifetime,
                        initial=USER_ME_RETRY_INITIAL,
                        cap=2 * USER_ME_RETRY_INITIAL,
                    )
                )
            except KakaoError as exc:
                log.warning("could not call /v2/user/me after login: %s", exc)
                return None, str(exc)
            else:
                raw_id = me.get("id")
                if isinstance(raw_id, str) and raw_id.strip().isdigit():
                    raw_id = int(raw_id)  # an id sent as a string of digits
                if isinstance(raw_id, int) and not isinstance(raw_id, bool):
                    return raw_id, None
                return None, None

    def _persist(
        self, tokens: TokenSet, user_id: int | None, check: CheckReplacing
    ) -> AccountState:
        store = AccountStore(self.account)
        now = self.clock()
        with store.lock(timeout=self.lock_timeout):
            try:
                old = store.load()
            except StateCorrupt:
                old = None  # moved aside by the store; a fresh login replaces it
            check(old)
            state = AccountState(
                account=self.account.name,
                tokens=tokens,
                generation=store.next_generation(old),
                refreshed_at=now,
                user_id=user_id,
            )
            store.save(state)
            store.publish(state, now=now)
        return state

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        params = {key: request.query[key] for key in request.query}
        if not self.matches_state(params):
            # Any local process or web page can send a request here. Without this attempt's
            # state it is not Kakao's answer: it must not end the login (a forged
            # error=access_denied would cancel it) and learns nothing; keep waiting.
            return _page(
                "Waiting for Kakao",
                "This address is where Kakao sends you after login. "
                "Open the login URL printed by kakao-tokend instead.",
                ok=False,
            )
        try:
            await self.complete(params, via="browser")
        except KakaoTokendError as exc:
            assert self._done is not None
            if self._done.done():
                then = f"Run `{login_command(self.account)}` again to log in."
            else:
                then = (
                    "kakao-tokend is still waiting: open the login URL it printed again to"
                    " log in, or press Ctrl-C where it runs to stop."
                )
            if isinstance(exc, LoginCancelled):
                return _page(
                    "Login cancelled",
                    f"You cancelled the Kakao login, so no tokens were stored. {then}",
                    ok=False,
                )
            return _page("Login failed", f"{exc}. Nothing was stored. {then}", ok=False)
        return _page(
            "Login succeeded — you can close this window",
            f"kakao-tokend stored the tokens for account '{self.account.name}'.",
            ok=True,
        )

    async def run(
        self,
        *,
        notify: Notify,
        open_browser: Callable[[str], object] | None = None,
        stdin: TextIO | None = None,
        timeout: float = 300.0,
    ) -> LoginResult:
        """Show the URL, wait for the redirect (browser or pasted line), return the result.

        ``notify`` receives human-readable lines (the CLI prints them). ``stdin``, when given,
        is read line by line on a daemon thread; the first non-empty line counts as a pasted
        redirect URL or bare code.
        """
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._notify = notify
        self._deadline = self.clock() + timedelta(seconds=timeout)
        runner: web.AppRunner | None = None
        page: Path | None = None
        # Kakao shows its KOE006 page in the browser and never redirects: say what it means
        # once the answer is overdue for a person who clicked through.
        explain = self._explain = loop.call_later(
            min(KOE006_HELP_AFTER, timeout / 4),
            notify,
            koe006_help(self.redirect.uri, self.account),
        )
        async with create_session() as session:
            self._client = KakaoClient(session, self.account.app, clock=self.clock)
            url = self.authorize_url(self._client)
            try:
                if self.redirect.is_loopback:
                    runner = await self._start_server()
                elif stdin is None:
                    raise LoginFailed(
                        f"redirect URI {self.redirect.uri} is not a local http address, "
                        "so kakao-tokend cannot receive the redirect itself",
                        hint="use --no-browser and paste the address, or set kakao.redirect_uri "
                        "to http://127.0.0.1:8765/callback (and register it at Kakao)",
                    )
                notify("Open this URL in a browser and log in with Kakao:")
                notify("")
                notify(f"  {url}")
                notify("")
                if open_browser is not None:
                    try:
                        page = write_browser_page(url)
                    except OSError as exc:
                        notify(
                            f"(cannot open a browser: {exc.strerror or exc}; open the URL yourself)"
                        )
                    else:
                        open_browser(page.as_uri())
                        notify(
                            "A browser opens on it through a private file (so that `ps` shows"
                            " no one the URL); if it cannot open that file (a snap-packaged"
                            " browser cannot), copy the URL into it."
                        )
                if runner is not None:
                    notify(f"Waiting for Kakao to redirect the browser to {self.redirect.uri} ...")
                if stdin is not None:
                    if runner is not None:
                        port = self.redirect.port
                        notify(
                            "On a remote server, either forward the port first "
                            f"(ssh -L {port}:127.0.0.1:{port} server) and open the URL locally,"
                        )
                        notify(
                            "or paste here the address your browser ended up on "
                            "(or just its code) and press Enter:"
                        )
                    else:
                        notify(
                            "After logging in, copy the address your browser ended up on "
                            "(or just its code=... value), paste it here and press Enter:"
                        )
                    self._read_stdin(stdin, loop)
                try:
                    return await asyncio.wait_for(asyncio.shield(self._done), timeout)
                except TimeoutError:
                    if self._failures:
                        raise self._failures[-1] from None
                    raise LoginFailed(
                        f"no login answer arrived within {int(timeout)} s",
                        hint=f"run `{login_command(self.account)} --timeout 10m` again"
                        " for more time",
                    ) from None
            finally:
                explain.cancel()
                if page is not None:
                    shutil.rmtree(page.parent, ignore_errors=True)
                if runner is not None:
                    await runner.cleanup()
                if not self._done.done():
                    self._done.cancel()
                self._client = None

    async def _start_server(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get(self.redirect.path, self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host = self.redirect.host.strip("[]")
        try:
            await web.TCPSite(runner, host, self.redirect.port, shutdown_timeout=1).start()
        except OSError as exc:
            await runner.cleanup()
            raise LoginFailed(
                f"cannot listen on {self.redirect.host}:{self.redirect.port} for the login "
                f"redirect: {exc.strerror or exc}",
                hint="is another `kakao-tokend login` running? otherwise change "
                "kakao.redirect_uri (and register the new one at Kakao)",
            ) from None
        return runner

    def _read_stdin(self, stdin: TextIO, loop: asyncio.AbstractEventLoop) -> None:
        accepted = threading.Event()

        def deliver(line: str) -> None:
            if self._done is None or self._done.done():
                return
            try:
                params = check_pasted(line, redirect_uri=self.redirect.uri, state=self.state)
            except PasteRejected as exc:
                self._notify(f"That is not a login answer: {exc.message}; {exc.hint}.")
                return
            accepted.set()
            task = loop.create_task(self._complete_pasted(params))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        def reader() -> None:
            # A daemon thread: a blocked readline must not keep the process alive. It reads
            # until a line is accepted, so a mistyped paste can be followed by the right one.
            while not accepted.is_set():
                try:
                    line = stdin.readline()
                except (OSError, ValueError):
                    return
                if not line:
                    return
                if line.strip():
                    try:
                        loop.call_soon_threadsafe(deliver, line)
                    except RuntimeError:
                        return  # the loop is closed: the login is over

        threading.Thread(target=reader, name="login-stdin", daemon=True).start()

    async def _complete_pasted(self, params: Mapping[str, str]) -> None:
        with contextlib.suppress(KakaoTokendError):  # already handed to the waiter in run()
            await self.complete(params, via="pasted")
