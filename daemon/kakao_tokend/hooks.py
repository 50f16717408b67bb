"""After-refresh hooks: commands (no shell) run one at a time per account after each change.

The extra token files (``access_token_file``, ``env_file``) are written by the account's
manager with the token file (store.publish_sinks), so a failed write is retried with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Generic, TypeVar

from aiohttp import web

from .alerts import PASSED_ENV
from .daemon import Daemon
from .refresher import AccountManager
from .status import NEW_TOKENS, AccountEvent

log = logging.getLogger(__name__)

#: How long a killed hook may take to disappear before we stop waiting for it.
KILL_WAIT = 5.0

K = TypeVar("K")
V = TypeVar("V")


class CommandWorkers(Generic[K, V]):
    """What hooks and template commands share: a worker task per key that runs commands in
    their own process groups, work waiting per key, and a stop that kills every process."""

    def __init__(self) -> None:
        self._pending: dict[K, V] = {}
        self._workers: dict[K, asyncio.Task[None]] = {}
        self._procs: set[asyncio.subprocess.Process] = set()

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_WAIT)

    async def close(self) -> None:
        """Stop: drop waiting work, kill running commands and wait for the workers."""
        self._pending.clear()
        for proc in list(self._procs):
            await self._kill(proc)
        for worker in self._workers.values():
            worker.cancel()
        for worker in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await worker


class HookRunner(CommandWorkers[str, int]):
    """Turns ``refreshed`` and ``adopted`` events into hook runs; one instance per daemon.

    Hooks of one account run one after another: a change that arrives while a hook runs is
    coalesced into one more run for the newest generation. A run happens only when the
    generation grew past the last one hooks were run (or started) for — since the account's
    state was last removed: a logout ends what the runner remembers of the account, so the
    next login runs the hooks whatever its generation.
    """

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon
        self._seen: dict[str, int] = {}

    def baseline(self) -> None:
        """Remember the current generation of every account with hooks (at start, and after
        a reload for one that has hooks now): no hook runs for tokens it had then.

        Accounts without hooks are not remembered: a fleet node's 10,000 accounts usually
        have none, and an entry each was a dictionary as large as the configuration's.
        """
        for manager in self.daemon.managers.values():
            if manager.state is not None and manager.account.hooks:
                self._seen.setdefault(manager.name, manager.state.generation)

    def on_event(self, event: AccountEvent) -> None:
        """Manager listener: quick and non-blocking (hooks run in a task).

        A state adopted from another process (CLI `login`, `refresh`, `import`) runs the hooks
        exactly like the daemon's own refresh. A removed state (``adopted`` with no tokens)
        makes the runner forget the account.
        """
        manager = self.daemon.managers.get(event.account)
        if manager is None:
            return
        if manager.state is None:
            # The state was removed (a logout: ``adopted``, or ``conflict`` when our unsaved
            # tokens lost to it): no hook for the tokens that are gone, and the next login,
            # whose generation may start again at 1, is new whatever it is.
            self._seen.pop(event.account, None)
            self._pending.pop(event.account, None)
            return
        if event.kind not in NEW_TOKENS:
            return
        if not manager.account.hooks:
            self._seen.pop(event.account, None)  # hooks removed by a reload
            return
        generation = int(event.data.get("generation", manager.state.generation))
        if generation <= self._seen.get(event.account, 0):
            return
        self._seen[event.account] = generation
        self._pending[event.account] = generation
        worker = self._workers.get(event.account)
        if worker is None or worker.done():
            self._workers[event.account] = asyncio.create_task(self._work(event.account))

    async def _work(self, name: str) -> None:
        while name in self._pending:
            generation = self._pending.pop(name)
            manager = self.daemon.managers.get(name)
            if manager is None:
                return
            for command in manager.account.hooks:
                await self.run_hook(manager, command, generation)

    async def run_hook(self, manager: AccountManager, command: tuple[str, ...], gen: int) -> None:
        """Run one hook command with a timeout; never raises.

        The hook gets the same short environment as an alert command (the daemon's own may
        hold the REST API key or client secret, from *_env settings) plus three facts.
        """
        account = manager.account
        env = {
            **{key: os.environ[key] for key in PASSED_ENV if key in os.environ},
            "KAKAO_TOKEND_ACCOUNT": account.name,
            "KAKAO_TOKEND_TOKEN_FILE": str(account.token_file),
            "KAKAO_TOKEND_GENERATION": str(gen),
        }
        program = Path(command[0]).name
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True
            )
        except OSError as exc:
            log.error("account %s: hook %s could not start: %s", account.name, program, exc)
            return
        self._procs.add(proc)
        try:
            code = await asyncio.wait_for(proc.wait(), account.hook_timeout)
        except TimeoutError:
            log.error(
                "account %s: hook %s still running after %ss; killed it",
                account.name,
                program,
                account.hook_timeout,
            )
            await self._kill(proc)
            return
        finally:
            self._procs.discard(proc)
        if code == 0:
            log.info("account %s: hook %s done (generation %d)", account.name, program, gen)
        else:
            log.warning("account %s: hook %s exited with %s", account.name, program, code)


HOOKS = web.AppKey("hooks", HookRunner)


async def _hooks_ctx(app: web.Application) -> AsyncIterator[None]:
    runner = app[HOOKS]
    runner.baseline()
    runner.daemon.reload_listeners.append(runner.baseline)  # accounts given hooks by a reload
    yield
    runner.daemon.reload_listeners.remove(runner.baseline)
    runner.daemon.stop_step("ending running hooks")
    await runner.close()


def install(app: web.Application, daemon: Daemon) -> HookRunner:
    """Attach a HookRunner to the daemon's managers (via daemon.listeners) and the app's lifecycle.

    Call before the app starts: every manager made later (at start and on reload) gets the
    listener. The cleanup context goes last, so it starts after the accounts are loaded.
    """
    runner = HookRunner(daemon)
    app[HOOKS] = runner
    daemon.listeners.append(runner.on_event)
    app.cleanup_ctx.append(_hooks_ctx)
    return runner
