"""Templates: write the account's token into any file, in the consumer's own format.

Many programs want the token inside their own configuration file, not ours (Vault Agent's
most used feature). Per account, ``[[accounts.NAME.templates]]`` names a source file with
``{access_token}``-style placeholders and a destination. The daemon renders every template at
start-up, after each refresh and after adopting tokens another process wrote (``login``,
``import``), writes the destination atomically with the ``[publish]`` rules only when the
rendered bytes differ from what is there, and then runs the template's optional command.

The engine is :class:`string.Template` from the standard library with a brace pattern: only
``{name}`` with a known lowercase name is replaced, every other character (the braces of JSON,
``${HOME}`` of a shell script) is copied as it is, and there is no expression language at all,
so a template cannot run code or reach anything but the values below. ``{{`` writes a literal
``{`` for the rare file that needs the text ``{name}`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import os
import re
import signal
import stat
import string
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .errors import StoreError
from .refresher import AccountEvent, AccountManager, Health
from .state import AccountState
from .store import atomic_write, resolve_group
from .tokens import format_time

if TYPE_CHECKING:
    from .config import AccountConfig, TemplateConfig
    from .service import Daemon

log = logging.getLogger(__name__)

#: Every placeholder a template may use, with what it becomes (also the docs' source of truth).
PLACEHOLDERS: Mapping[str, str] = {
    "access_token": "the access token",
    "token_type": 'the token type Kakao gave ("bearer")',
    "expires_at": "when the access token expires, RFC 3339 in UTC (2026-12-02T02:10:10Z)",
    "expires_at_unix": "the same moment as Unix seconds",
    "expires_in": "the access token's lifetime in seconds, counted from issued_at (Kakao's field)",
    "issued_at": "when the access token was issued, RFC 3339 in UTC",
    "refresh_token_expires_at": "when the refresh token expires, RFC 3339 in UTC",
    "scope": "the granted consent items, space-separated (may be empty)",
    "generation": "grows by one with every new token set",
    "account": "the account's name",
    "refresh_token": "the refresh token; only with [publish] include_refresh_token = true",
}
#: Largest template source accepted: a configuration file, not a data set.
MAX_SOURCE_BYTES = 1024 * 1024
#: How long a killed command may take to disappear before we stop waiting for it.
KILL_WAIT = 5.0


_PLACEHOLDER_PATTERN = r"""
    \{(?:
      (?P<escaped>\{)                      # {{  -> {
    | (?P<named>[a-z][a-z0-9_]*)\}         # {access_token}
    | (?P<braced>(?!))                     # unused
    | (?P<invalid>(?!))                    # nothing else is special
    )
"""
_PLACEHOLDER = re.compile(_PLACEHOLDER_PATTERN, re.VERBOSE)


class TokenTemplate(string.Template):
    """``{name}`` placeholders; anything else, including other braces, is copied verbatim."""

    delimiter = "{"  # what an escaped "{{" turns into
    flags = re.RegexFlag(0)  # case-sensitive: names are lowercase, so ${HOME} stays text
    # A string on purpose: Template compiles it (adding re.VERBOSE) when the class is created.
    pattern = _PLACEHOLDER_PATTERN  # type: ignore[assignment]


class TemplateProblem(ValueError):
    """A template that cannot be rendered; the message says where and how to fix it."""


_MUSTACHE = re.compile(r"\{\{\s*([a-z][a-z0-9_]*)\s*\}\}")


def compile_template(text: str, *, refresh_token_allowed: bool) -> TokenTemplate:
    """Return the template for ``text``; raise TemplateProblem naming the first bad placeholder.

    Every placeholder must be known (see :data:`PLACEHOLDERS`), so a template that passes this
    check always renders.
    """
    mustache = _MUSTACHE.search(text)
    if mustache and mustache.group(1) in PLACEHOLDERS:
        name = mustache.group(1)
        raise TemplateProblem(
            f"line {_line_of(text, mustache.start())}: {mustache.group(0)} is not a placeholder"
            f" here; write {{{name}}} with single braces"
        )
    template = TokenTemplate(text)
    for match in _PLACEHOLDER.finditer(text):
        name = match.group("named")
        if name is None or (
            name in PLACEHOLDERS and (name != "refresh_token" or refresh_token_allowed)
        ):
            continue
        line = _line_of(text, match.start())
        if name == "refresh_token":
            raise TemplateProblem(
                f"line {line}: {{refresh_token}} needs [publish] include_refresh_token = true"
                " (whoever reads the file can then mint tokens for two months)"
            )
        close = difflib.get_close_matches(name, list(PLACEHOLDERS), n=1, cutoff=0.6)
        hint = f'; did you mean "{{{close[0]}}}"?' if close else ""
        raise TemplateProblem(
            f"line {line}: unknown placeholder {{{name}}}{hint} (known: "
            + ", ".join(f"{{{known}}}" for known in PLACEHOLDERS)
            + "; write {{ for a literal {)"
        )
    return template


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def read_template_source(path: Path) -> str:
    """Read a template source file as UTF-8 text; raise TemplateProblem with a readable reason."""
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise TemplateProblem(f"{path} is not a regular file")
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        raise TemplateProblem(f"{path} does not exist; create the template file") from None
    except OSError as exc:
        raise TemplateProblem(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise TemplateProblem(f"{path} is larger than {MAX_SOURCE_BYTES // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateProblem(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
        ) from None


def template_values(state: AccountState, *, include_refresh_token: bool) -> dict[str, str]:
    """Return what each placeholder becomes for ``state``.

    Nothing depends on the moment of rendering, so the same token set always renders to the
    same bytes, and a restart rewrites nothing (and runs no command).
    """
    tokens = state.tokens
    values = {
        "access_token": tokens.access_token,
        "token_type": tokens.token_type,
        "expires_at": format_time(tokens.access_expires_at),
        "expires_at_unix": str(int(tokens.access_expires_at.timestamp())),
        "expires_in": str(int(tokens.access_lifetime.total_seconds())),
        "issued_at": format_time(tokens.access_issued_at),
        "refresh_token_expires_at": format_time(tokens.refresh_expires_at),
        "scope": tokens.scope or "",
        "generation": str(state.generation),
        "account": state.account,
    }
    if include_refresh_token:
        values["refresh_token"] = tokens.refresh_token
    return values


def render(template: TemplateConfig, state: AccountState, account: AccountConfig) -> bytes:
    """Render one template for ``state`` (the config check made sure every name is known)."""
    compiled = compile_template(template.text, refresh_token_allowed=account.include_refresh_token)
    values = template_values(state, include_refresh_token=account.include_refresh_token)
    return compiled.substitute(values).encode("utf-8")


@dataclass(frozen=True)
class WriteOutcome:
    """What :func:`write_if_changed` did."""

    written: bool
    content_changed: bool


def write_if_changed(path: Path, data: bytes, *, mode: int, group: int | None) -> WriteOutcome:
    """Atomically replace ``path`` unless it already holds ``data`` with the right mode/group.

    A destination that only lost its mode or group is rewritten too, but that is no change of
    content (the template's command does not run for it).
    """
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            current: bytes | None = handle.read(len(data) + 1)
    except OSError:
        current, info = None, None
    if (
        current == data
        and info is not None
        and stat.S_IMODE(info.st_mode) == mode
        and (group is None or info.st_gid == group)
    ):
        return WriteOutcome(written=False, content_changed=False)
    atomic_write(path, data, mode=mode, group=group)
    return WriteOutcome(written=True, content_changed=current != data)


def command_environment(account: str, destination: Path, generation: int) -> dict[str, str]:
    """The command's environment: what alert commands get, plus which file changed; no token."""
    from .alerts import PASSED_ENV  # the one list of variables a command may inherit

    env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    env.update(
        KAKAO_TOKEND_ACCOUNT=account,
        KAKAO_TOKEND_TEMPLATE_DESTINATION=str(destination),
        KAKAO_TOKEND_GENERATION=str(generation),
    )
    return env


class TemplateRunner:
    """Renders every account's templates on start, refresh, adoption and reload; runs commands.

    A template's command runs after a change of its destination's content, one run at a time
    per template: a change that arrives while the command runs is merged into one more run.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._pending: dict[tuple[str, Path], tuple[TemplateConfig, int]] = {}
        self._workers: dict[tuple[str, Path], asyncio.Task[None]] = {}
        self._procs: set[asyncio.subprocess.Process] = set()
        self.commands_run = 0

    def on_event(self, event: AccountEvent) -> None:
        """Manager listener: a new token set (refresh) or one another process wrote (adoption)."""
        if event.kind not in ("refreshed", "adopted"):
            return
        manager = self.daemon.managers.get(event.account)
        if manager is not None:
            self.render_account(manager)

    def render_all(self) -> None:
        """Render every account's templates (at start-up and after a reload)."""
        for manager in list(self.daemon.managers.values()):
            self.render_account(manager)

    def render_account(self, manager: AccountManager) -> None:
        """Render and write one account's templates; queue the commands of changed ones."""
        account = manager.account
        state = manager.state
        if not account.templates or state is None:
            return
        if manager.status.health in (Health.RELOGIN, Health.NO_STATE):
            return  # dead tokens: leave the last good files alone
        for template in account.templates:
            try:
                data = render(template, state, account)
                outcome = write_if_changed(
                    template.destination,
                    data,
                    mode=template.mode,
                    group=resolve_group(template.group),
                )
            except StoreError as exc:
                log.error(
                    "account %s: cannot write template %s: %s",
                    account.name,
                    template.destination,
                    exc,
                )
                continue
            if not outcome.content_changed:
                continue
            log.info(
                "account %s: rendered %s (generation %d)",
                account.name,
                template.destination,
                state.generation,
            )
            if template.command:
                self._queue(account.name, template, state.generation)

    def _queue(self, account: str, template: TemplateConfig, generation: int) -> None:
        key = (account, template.destination)
        self._pending[key] = (template, generation)
        worker = self._workers.get(key)
        if worker is None or worker.done():
            self._workers[key] = asyncio.create_task(self._work(key))

    async def _work(self, key: tuple[str, Path]) -> None:
        while key in self._pending:
            template, generation = self._pending.pop(key)
            await self.run_command(key[0], template, generation)

    async def run_command(self, account: str, template: TemplateConfig, generation: int) -> None:
        """Run one template's command with a timeout; never raises."""
        program = Path(template.command[0]).name
        self.commands_run += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *template.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=command_environment(account, template.destination, generation),
                start_new_session=True,
            )
        except OSError as exc:
            log.error(
                "account %s: template command %s could not start: %s",
                account,
                program,
                exc.strerror or exc,
            )
            return
        self._procs.add(proc)
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), template.command_timeout)
        except TimeoutError:
            log.error(
                "account %s: template command %s still running after %ss; killed it",
                account,
                program,
                f"{template.command_timeout:g}",
            )
            await self._kill(proc)
            return
        finally:
            self._procs.discard(proc)
        if proc.returncode == 0:
            log.info("account %s: template command %s done", account, program)
            return
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] if stderr else []
        said = f": {last[0][:200]}" if last else ""
        log.warning(
            "account %s: template command %s exited with %s%s",
            account,
            program,
            proc.returncode,
            said,
        )

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_WAIT)

    async def idle(self) -> None:
        """Wait until no command is queued or running."""
        while any(not worker.done() for worker in self._workers.values()):
            await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop: kill running commands and wait for the workers."""
        self._pending.clear()
        for proc in list(self._procs):
            await self._kill(proc)
        for worker in self._workers.values():
            worker.cancel()
        for worker in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await worker


TEMPLATES = web.AppKey("templates", TemplateRunner)


async def _templates_ctx(app: web.Application) -> AsyncIterator[None]:
    runner = app[TEMPLATES]
    runner.render_all()
    yield
    await runner.close()


def install(app: web.Application, daemon: Daemon) -> TemplateRunner:
    """Attach a TemplateRunner to the daemon's managers, its reloads and the app's lifecycle.

    Call before the app starts; the cleanup context goes last, so it renders after the
    accounts are loaded.
    """
    runner = TemplateRunner(daemon)
    app[TEMPLATES] = runner
    daemon.listeners.append(runner.on_event)
    daemon.reload_listeners.append(runner.render_all)
    app.cleanup_ctx.append(_templates_ctx)
    return runner
