"""Templates in the running daemon: render on start, refresh, adoption and reload; run commands.

The daemon renders every account's templates (:mod:`~kakao_tokend.templates`) at start-up,
after each refresh and after adopting tokens another process wrote (``login``, ``import``),
writes each destination atomically with the ``[publish]`` rules only when the rendered bytes
differ from what is there, and then runs the template's optional command.

When the account's state goes (a logout by another process, an operator's ``rm``), the runner
takes every published copy of the token with it — the rendered templates, the extra token
files and, with the file store, the token file (store.AccountStore.withdraw) — as `logout`
does itself: nothing is left holding a token that was logged out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .alerts import PASSED_ENV
from .config import TemplateConfig
from .daemon import Daemon
from .errors import StoreError
from .hooks import CommandWorkers
from .refresher import AccountManager
from .status import NEW_TOKENS, WITHOUT_TOKENS, AccountEvent, EventKind
from .store import (
    AccountStore,
    atomic_write,
    published_as_configured,
    read_regular,
    remove_outputs,
    resolve_group,
    sink_paths,
)
from .templates import render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteOutcome:
    """What :func:`write_if_changed` did."""

    written: bool
    content_changed: bool


def write_if_changed(path: Path, data: bytes, *, mode: int, group: int | None) -> WriteOutcome:
    """Atomically replace ``path`` unless it already holds ``data`` with the right mode/group.

    A destination that only lost its mode or group is rewritten too, but that is no change of
    content (the template's command does not run for it). The destination's directory may
    be the consumer's, so what is there is read as store.read_file reads: never waiting (a
    FIFO planted there would stop the whole daemon), never through a symlink, and never more
    than ``data`` holds. Anything but a regular file of ours is simply replaced, as a
    changed file is: the replacement never follows a link either.
    """
    try:
        current, info = read_regular(path, what="template destination", limit=len(data))
    except (OSError, StoreError):
        current, info = None, None  # missing, a FIFO, a symlink, larger: rewritten
    if (
        current == data
        and info is not None
        and published_as_configured(info, mode=mode, group=group)
    ):
        return WriteOutcome(written=False, content_changed=False)
    atomic_write(path, data, mode=mode, group=group)
    return WriteOutcome(written=True, content_changed=current != data)


def command_environment(account: str, destination: Path, generation: int) -> dict[str, str]:
    """The command's environment: what alert commands get, plus which file changed; no token."""
    env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    env.update(
        KAKAO_TOKEND_ACCOUNT=account,
        KAKAO_TOKEND_TEMPLATE_DESTINATION=str(destination),
        KAKAO_TOKEND_GENERATION=str(generation),
    )
    return env


class TemplateRunner(CommandWorkers[tuple[str, Path], tuple[TemplateConfig, int]]):
    """Renders every account's templates on start, refresh, adoption and reload; runs commands.

    A template's command runs after a change of its destination's content, one run at a time
    per template: a change that arrives while the command runs is merged into one more run.
    """

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon

    def on_event(self, event: AccountEvent) -> None:
        """Manager listener: a new token set (refresh) or one another process wrote (adoption);
        a removed state (``adopted`` without tokens, or the ``conflict`` it won) withdraws."""
        if event.kind not in NEW_TOKENS and event.kind is not EventKind.CONFLICT:
            return
        manager = self.daemon.managers.get(event.account)
        if manager is None:
            return
        if manager.state is None:
            self.withdraw_account(manager)
        elif event.kind in NEW_TOKENS:
            self.render_account(manager)

    def withdraw_account(self, manager: AccountManager) -> None:
        """The account's state is gone: remove its rendered templates and extra token files,
        and (file store) its token file. No command runs: there is nothing to reload."""
        account = manager.account
        for key in [key for key in self._pending if key[0] == account.name]:
            del self._pending[key]  # no command for tokens that are gone
        destinations = [template.destination for template in account.templates]
        store = manager.store
        if isinstance(store, AccountStore):
            removed, problems = store.withdraw(outputs=destinations)
        elif getattr(store, "publishes", True):
            # A fleet node removes its token file itself (Daemon.on_store_changed).
            removed, problems = remove_outputs([*sink_paths(account), *destinations])
        else:
            return
        if removed:
            log.info(
                "account %s: state removed; removed %s",
                account.name,
                ", ".join(str(path) for path in removed),
            )
        for problem in problems:
            log.error("account %s: after the state was removed: %s", account.name, problem)

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
        if manager.status.health in WITHOUT_TOKENS:
            return  # dead tokens: leave the last good files alone
        for template in account.templates:
            try:
                data = render(
                    template.text, state, include_refresh_token=account.include_refresh_token
                )
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


TEMPLATES = web.AppKey("templates", TemplateRunner)


async def _templates_ctx(app: web.Application) -> AsyncIterator[None]:
    runner = app[TEMPLATES]
    runner.render_all()
    yield
    runner.daemon.stop_step("ending template renders")
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
