"""The running daemon: its accounts, their managers, reload and stop; what the API serves.

:class:`Daemon` is the one object every capability of a running service reaches: the local
API, hooks, templates and metrics find it in the aiohttp application under :data:`DAEMON`.
How it is started and stopped (cleanup contexts, signals, sockets, exit codes) is
:mod:`~kakao_tokend.service`'s business; this module holds no lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from . import systemd
from .alerts import AlertCenter
from .config import AccountConfig, Config, load_config
from .errors import ConfigError, StoreError, StoreLocked, write_fix
from .kakao import KakaoClient
from .refresher import AccountManager
from .scheduler import RefreshScheduler
from .slowstop import pending_awaits
from .status import EventListener, Health
from .storage import AccountStorage
from .store import (
    INSTANCE_LOCK_NAME,
    RESERVE_SIZE,
    AccountStore,
    FileLock,
    Listing,
    check_directory,
    directory_text,
    make_dirs,
    make_reserve,
    output_problems,
    remove_stale_temp_files,
)
from .tokens import Clock, format_time, utcnow
from .watch import StateWatcher

if TYPE_CHECKING:  # fleet mode only: file mode never imports the fleet package
    from .fleet.node import FleetNode
    from .fleet.store import FleetStore

__all__ = ["DAEMON", "EXTEND_EVERY", "STOP_GRACE", "Daemon", "only_account"]

log = logging.getLogger(__name__)

#: The least a stop (or a reload) waits for an in-flight refresh to finish and be persisted.
STOP_GRACE = 20.0
#: While a refresh is still in flight during a stop, EXTEND_TIMEOUT_USEC goes to systemd this
#: often, each time asking for three times as long (so one lost datagram costs nothing).
EXTEND_EVERY = 5.0
#: A stop still under way after this long says in the log what it waits for, and again as
#: often: a clean stop with nothing in flight takes well under a second, a long one is one
#: of its deadlines running out (service.stop_budget), and the journal should say which.
REPORT_STOP_EVERY = EXTEND_EVERY
#: Up to this many accounts, the start-up log and systemd's STATUS= name every account; with
#: more, only those that need attention (a line for each of a thousand healthy accounts would
#: bury them, and cost a start as much as loading them).
LIST_ACCOUNTS_UP_TO = 10


@dataclass
class Daemon:
    """Everything the running service holds: config, session, managers and scheduler."""

    config: Config
    config_path: Path | None = None
    clock: Clock = utcnow
    session: aiohttp.ClientSession | None = None
    managers: dict[str, AccountManager] = field(default_factory=dict)
    scheduler: RefreshScheduler | None = None
    #: `run --account NAME` keeps only that account, across reloads too.
    only_account: str | None = None
    #: The listeners of every account manager, one list all of them share (the demo prints
    #: rotations through it; metrics, hooks, templates, the alert center and the scheduler
    #: add theirs once, not once per account).
    listeners: list[EventListener] = field(default_factory=list)
    #: Called after every successful reload (templates re-render with the new configuration).
    reload_listeners: list[Callable[[], None]] = field(default_factory=list)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _prepared_dirs: set[str] = field(default_factory=set)
    #: The other directories make_manager swept of stale temporary files (by their text).
    _swept: set[str] = field(default_factory=set)
    #: The Kakao client of each app object (by id; the client keeps its app alive), see _client.
    _clients: dict[int, KakaoClient] = field(default_factory=dict)
    #: Alert conditions and channels (set up by the service's alerts context).
    alerts: AlertCenter | None = None
    _instance_lock: FileLock | None = None
    _stopping: bool = False
    _extender: asyncio.Task[None] | None = None
    #: What the stop is doing now, in words (the cleanup contexts set it; see stop_step).
    _stop_step: str = "closing the local API"
    #: Watches the state directories for files other processes write (set up by the service).
    watcher: StateWatcher | None = None
    #: Fleet mode: the PostgreSQL store and its listener (None with the file store).
    fleet: FleetStore | None = None
    fleet_node: FleetNode | None = None
    #: What on_store_health last handed out (None: nothing yet).
    _store_health_seen: tuple[object, ...] | None = None

    # ---------------------------------------------------------------- instance lock

    def check_directories(self) -> None:
        """Refuse to start (UnsafePath) when another local user could change the state
        directory, the runtime directory (rescue files, in-flight markers; usually the
        socket too) or the directory of the API socket, or when the accounts publish where
        every local user may write (check_outputs)."""
        places = {
            self.config.state_dir: "state directory",
            self.config.runtime_dir: "runtime directory",
        }
        places.setdefault(self.config.api_socket.parent, "socket directory")
        for directory, what in places.items():
            make_dirs(directory)
            check_directory(directory, what=what)
        check_outputs(self.config)

    def acquire_instance_lock(self) -> None:
        """Make this the only `run` on this state directory, or raise StoreLocked."""
        make_dirs(self.config.state_dir)
        lock = FileLock(
            self.config.state_dir / INSTANCE_LOCK_NAME,
            directory_what="state directory",
            what="instance lock",
        )
        if not lock.try_acquire():
            pid = lock.holder()
            holder = f" (pid {pid})" if pid is not None else ""
            raise StoreLocked(
                f"another kakao-tokend is already running on {self.config.state_dir}{holder}",
                hint="stop it first (systemctl stop kakao-tokend), or point --config at another"
                " state directory",
            )
        self._instance_lock = lock

    def release_instance_lock(self) -> None:
        """Release the instance lock (the kernel would do it at exit anyway)."""
        lock, self._instance_lock = self._instance_lock, None
        if lock is not None:
            lock.release()

    # ---------------------------------------------------------------- accounts

    @staticmethod
    def _warn_no_reserve(directory: Path, refused: OSError) -> None:
        """Say once per state directory that its emergency reserve could not be made: what
        that risks, and the fix its errno needs (errors.WRITE_FIXES). A save with room makes
        it later (AccountStore.restore_reserve)."""
        log.warning(
            "cannot make the %d KiB emergency reserve in %s (%s): if the disk fills up, a"
            " rotated refresh token may not be saved (only the rescue file would keep it); %s"
            " — the reserve is made at the next save with room",
            RESERVE_SIZE // 1024,
            directory,
            refused.strerror or refused,
            write_fix(refused.errno),
        )

    def make_manager(
        self, account: AccountConfig, store: AccountStorage | None = None
    ) -> AccountManager:
        """Create the store (unless given), client and manager for one account; load it."""
        assert self.session is not None
        if store is None:
            store = self.new_store(account)
        for field_name in ("state_file", "token_file"):
            # Once per directory, known by its text: 1,000 accounts usually share one.
            text = directory_text(account.file_text(field_name))
            if text not in self._prepared_dirs:
                directory = Path(text)
                make_dirs(directory)
                remove_stale_temp_files(directory)
                refused = make_reserve(directory)
                if refused is not None and field_name == "state_file" and self.fleet is None:
                    self._warn_no_reserve(directory, refused)
                self._prepared_dirs.add(text)
        # The other places written through temporary files: the runtime directory (a rescue
        # file's holds the refresh token) and the extra token files' directories. A kill -9
        # mid-write would leave one there until reboot. Swept once each; no reserve there.
        sweep = [str(self.config.runtime_dir)] if not self._swept else []
        for sink in (account.access_token_file, account.env_file):
            if sink is not None:
                sweep.append(directory_text(str(sink)))
        for text in sweep:
            if text not in self._swept and text not in self._prepared_dirs:
                remove_stale_temp_files(Path(text))
            self._swept.add(text)
        manager = AccountManager(
            account,
            store=store,
            client=self._client(account),
            policy=self.config.refresh,
            clock=self.clock,
            hub=self.listeners,
        )
        if self.fleet is not None:
            from .fleet.node import plan_for

            store.planner = plan_for(manager)  # type: ignore[attr-defined]
            self._give_store_health(manager)  # on_store_health only tells of changes
        manager.load()
        if self.alerts is not None:
            self.alerts.attach(manager)
        waits_for_commit = store.shared and manager.status.write_pending
        if (
            manager.state is not None
            and manager.status.health is Health.OK
            and not waits_for_commit
        ):
            # Publish at once when the token file is missing or stale (another tool wrote the
            # state), or lost [publish]'s mode or group (a chmod while the daemon was
            # stopped); an up-to-date one is left alone, which keeps a large start cheap.
            # The extra token files carry no generation: they are always written. A fleet
            # node's tokens recovered from its rescue file are published by their commit,
            # never before it (storage.StateStore.hold).
            manager.publish(token_file=not store.published_current(manager.state.generation))
        return manager

    def _client(self, account: AccountConfig) -> KakaoClient:
        """Return the client for the account's app: one per app, not one per account.

        Accounts without their own [kakao] table share one app object, and a client holds
        nothing of an account (session, app, clock): 10,000 accounts on a fleet node need one.
        """
        assert self.session is not None
        app = account.app
        client = self._clients.get(id(app))
        if client is None or client.app is not app:
            client = self._clients[id(app)] = KakaoClient(
                self.session, app, clock=self.clock, policy=self.config.refresh
            )
        return client

    def new_store(self, account: AccountConfig) -> AccountStorage:
        """Return where the account's state lives: its files, or its row in the fleet store."""
        if self.fleet is not None:
            return self.fleet.account_store(account)
        return AccountStore(account, rescue_dir=self.config.runtime_dir)

    def open_accounts(self) -> None:
        """Create a manager per configured account (after checking every account's files)."""
        accounts = self.config.accounts.values()
        if self.fleet is not None:  # the state files are not used (maybe MOVED)
            for account in accounts:
                self.managers[account.name] = self.make_manager(account)
        else:
            # One listing of each directory answers for the files that are not there (most
            # of an account's: rescue, alert bookkeeping, the migration marker) and gives the
            # type of those that are. It is closed before anything else can run: the loop
            # below never waits, so no other task (and no refresh) sees it.
            listing = Listing()
            runtime_dir = self.config.runtime_dir
            try:
                stores = [
                    (account, AccountStore(account, rescue_dir=runtime_dir, listing=listing))
                    for account in accounts
                ]
                checked: set[str] = set()  # each shared directory is judged once
                for _, store in stores:
                    store.check_paths(checked)
                for account, store in stores:
                    self.managers[account.name] = self.make_manager(account, store)
            finally:
                listing.close()
        listed = self._listed()
        for manager in listed:
            log.info("account %s", manager.summary())
        if len(listed) < len(self.managers):
            log.info("%d more account(s) ok", len(self.managers) - len(listed))

    def adopt_outside_changes(self, manager: AccountManager) -> bool:
        """Take over a state another process wrote (login, import, logout, refresh) now.

        Called when the CLI says so over the socket and when the state directory watch sees
        the file change. A manager that is refreshing re-reads the file under its lock anyway,
        and a state still waiting to be written is newer than anything on disk: both are left
        alone. Returns True when the tokens in memory changed.
        """
        if manager.busy or self._stopping:
            if self.scheduler is not None:
                self.scheduler.look_at(manager)  # taken at the next heartbeat instead
            return False
        changed = manager.notice_outside_changes()
        if changed:
            if self.scheduler is not None:
                self.scheduler.plan(manager)
            if self.alerts is not None:
                # Now, not at the next heartbeat: alerts about the old tokens resolve at once.
                self.alerts.evaluate(manager.name)
        return changed

    def on_store_changed(self, name: str) -> None:
        """Fleet mode: the account's row changed (a notification or the poll): adopt it."""
        manager = self.managers.get(name)
        if manager is None or self._stopping or self.fleet is None:
            return
        if manager.busy:
            if self.scheduler is not None:
                self.scheduler.look_at(manager)  # taken at the next heartbeat instead
            return
        row = self.fleet.rows.get(name)
        state = manager.state
        if (
            row is not None
            and state is not None
            and row.generation == state.generation
            and row.state.relogin_reason != state.relogin_reason
        ):
            manager.take_over(row.state)  # a re-login mark written without a new generation
        manager.forget_plan()  # the row's due_at may have moved (a retry planned elsewhere)
        had_tokens = manager.state is not None
        if not self.adopt_outside_changes(manager) and self.scheduler is not None:
            self.scheduler.plan(manager)
        if had_tokens and manager.state is None and row is None:
            from .fleet.store import PgAccountStore

            if isinstance(manager.store, PgAccountStore):
                manager.store.unpublish()

    def on_store_health(self) -> None:
        """Fleet mode: give every account the store's health (store_unavailable), and grade
        them again at once when it changed (the alert fires, or is resolved, now). Whenever the
        store answers (a poll) after an outage or a failed commit, tokens waiting to be
        committed are written at once, not after their back-off: other nodes may be waiting
        for them (see AccountManager._superseded_elsewhere).

        Called after every poll, so it walks the accounts only when something changed: the
        store's health, or a commit failed since the last call (every waiting write comes from
        one). An idle node with thousands of accounts spent most of its heartbeat here.
        """
        if self.fleet is None:
            return
        stats = self.fleet.stats
        seen = (stats.unavailable_since, stats.last_error, stats.failed_commits, stats.up)
        if seen == self._store_health_seen:
            return
        self._store_health_seen = seen
        for manager in self.managers.values():
            changed = self._give_store_health(manager)
            if changed and self.alerts is not None:
                self.alerts.evaluate(manager.name)
            write_now = stats.up and manager.write_again_now()
            if self.scheduler is not None:
                if write_now:
                    self.scheduler.run_soon(manager)
                else:
                    # No poll names what comes due while the store is down: every account
                    # takes its place in the due queue; once it answers, only those near.
                    self.scheduler.plan(manager)

    def _give_store_health(self, manager: AccountManager) -> bool:
        """Copy the store's health into the account's status; True when it changed."""
        assert self.fleet is not None
        stats = self.fleet.stats
        status = manager.status
        changed = status.store_unavailable_since != stats.unavailable_since
        status.store_unavailable_since = stats.unavailable_since
        status.store_error = stats.last_error
        return changed

    def fleet_status(self) -> dict[str, Any]:
        """Fleet mode: this node and the store's health, as JSON-ready data (no secrets)."""
        assert self.fleet is not None
        fleet = self.fleet
        stats = fleet.stats
        return {
            "node": fleet.node,
            "store_id": fleet.store_id,
            "schema_version": fleet.schema_version,
            "store_up": stats.up,
            "store_unavailable_since": (
                format_time(stats.unavailable_since) if stats.unavailable_since else None
            ),
            "store_error": stats.last_error,
            "listening": self.fleet_node.listening if self.fleet_node is not None else False,
            "claim_conflicts": stats.claim_conflicts,
            "commits": stats.commits,
            "idle_holds": stats.idle_holds,
            "failed_commits": stats.failed_commits,
            "notifications": stats.notifications,
            "row_reads": stats.row_reads,
            "poll_rows": stats.poll_rows,
            "full_polls": stats.full_polls,
            "notify_lag_seconds": stats.last_notify_lag,
            "nodes": {name: format_time(seen) for name, seen in fleet.nodes.items()},
            "publishes": sorted(fleet.publish_accounts)
            if fleet.publish_accounts is not None
            else "all",
        }

    def on_store_due(self, name: str) -> None:
        """Fleet mode: the database says the account is due (look at it now) or comes due
        within the poll's window (FleetStore.due_window: plan it now, it may have had no
        place in the due queue)."""
        manager = self.managers.get(name)
        if manager is None or self.scheduler is None or manager.busy:
            return
        row = self.fleet.rows.get(name) if self.fleet is not None else None
        if row is not None and row.due_at is not None and row.due_at > self.clock():
            if self.scheduler.planned(name) is None:  # named at every poll till it is due
                self.scheduler.plan(manager)
        else:
            self.scheduler.run_soon(manager)

    def on_state_file_changed(self, path: Path) -> None:
        """StateWatcher callback: adopt the account whose state file ``path`` is."""
        for manager in list(self.managers.values()):
            if manager.account.state_file == path:
                self.adopt_outside_changes(manager)

    def watch_state_files(self) -> None:
        """Point the state directory watch at the current accounts' state files."""
        if self.watcher is not None:
            self.watcher.watch(m.account.state_file for m in self.managers.values())

    def summary(self) -> str:
        """Return the one-line STATUS text, e.g. ``default: access 4h12m, refresh 41d``."""
        now = self.clock()
        listed = self._listed()
        named = [m.summary(now) for m in listed[:LIST_ACCOUNTS_UP_TO]]
        if len(self.managers) <= LIST_ACCOUNTS_UP_TO:
            return "; ".join(named) or "no accounts"
        ok = len(self.managers) - len(listed)
        parts = [f"{len(self.managers)} accounts, {ok} ok", *named]
        if len(listed) > LIST_ACCOUNTS_UP_TO:
            parts.append(f"{len(listed) - LIST_ACCOUNTS_UP_TO} more need attention")
        return "; ".join(parts)

    def _listed(self) -> list[AccountManager]:
        """The managers to name one by one: all of a few, else those that need attention."""
        managers = list(self.managers.values())
        if len(managers) <= LIST_ACCOUNTS_UP_TO:
            return managers
        return [
            m
            for m in managers
            if m.status.health is not Health.OK
            or m.status.write_pending
            or m.status.publish_pending
        ]

    # ---------------------------------------------------------------- stopping

    def begin_stop(self) -> None:
        """Start a stop: schedule nothing more, tell systemd, keep its stop timeout extended.

        Idempotent. In-flight refreshes go on; the cleanup contexts wait for them.
        """
        if self._stopping:
            return
        self._stopping = True
        if self.scheduler is not None:
            self.scheduler.shutdown()
        systemd.stopping("stopping: finishing in-flight refreshes")
        self._extender = asyncio.get_running_loop().create_task(self._watch_stop())

    def stop_step(self, what: str) -> None:
        """Say what the stop does now (\"waiting for in-flight refreshes\"), for its reports."""
        self._stop_step = what

    async def _watch_stop(self) -> None:
        """While a stop runs: ask systemd for more stop time (EXTEND_TIMEOUT_USEC) while a
        refresh is in flight or its request still open, and every REPORT_STOP_EVERY log what
        the stop waits for."""
        last: float | None = None
        loop = asyncio.get_running_loop()
        began = loop.time()
        report_at = began + REPORT_STOP_EVERY
        while True:
            if any(m.awaiting_kakao for m in self.managers.values()) and (
                last is None or loop.time() - last >= EXTEND_EVERY
            ):
                systemd.extend_timeout(3 * EXTEND_EVERY)
                last = loop.time()
            if loop.time() >= report_at:
                report_at += REPORT_STOP_EVERY
                log.warning(
                    "the stop is still under way after %.0fs: %s; waiting in %s",
                    loop.time() - began,
                    self._stop_step,
                    pending_awaits(skip=asyncio.current_task()),
                )
            await asyncio.sleep(0.2)

    async def end_stop(self) -> None:
        """Stop extending systemd's timeout (everything has been waited for)."""
        task, self._extender = self._extender, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---------------------------------------------------------------- reload

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration; keep every token in memory; return (ok, message)."""
        async with self.reload_lock:
            systemd.reloading("reloading configuration")
            try:
                new = load_config(self.config_path)
                if self.only_account is not None:
                    if self.only_account not in new.accounts:
                        raise ConfigError(
                            f"account {self.only_account!r} is no longer in the configuration"
                        )
                    new = only_account(new, self.only_account)
                self._check_accounts_files(new)
            except (ConfigError, StoreError) as exc:
                # One line (a journal entry each), the reason in it: `journalctl -g` finds it.
                reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
                log.error("reload failed, keeping the previous configuration: %s", reason)
                systemd.ready(self.summary())
                return False, reason
            try:
                return await self._apply(new)
            finally:
                if not self._stopping:  # (after STOPPING=1, a READY=1 would contradict it)
                    systemd.ready(self.summary())  # whatever happened: systemd waits for it

    def _check_accounts_files(self, new: Config) -> None:
        """Check what a start checks of every account's files before a reload changes
        anything (StoreError): directories others may write are refused, and the
        directories are created. A reload that failed half-way through used to have dropped
        the accounts it removed already and never told systemd it was ready again."""
        accounts = new.accounts.values()
        # Once per directory (a thousand accounts usually share one), as make_manager does.
        for text in {
            directory_text(account.file_text(field_name))
            for account in accounts
            for field_name in ("state_file", "token_file")
        }:
            make_dirs(Path(text))
        check_outputs(new)
        if self.fleet is None:
            checked: set[str] = set()  # each shared directory is judged once
            for account in accounts:
                AccountStore(account, rescue_dir=new.runtime_dir).check_paths(checked)

    async def _apply(self, new: Config) -> tuple[bool, str]:
        """Swap in the checked configuration ``new`` (reload); return (True, what changed)."""
        assert self.scheduler is not None
        old_accounts = self.config.accounts
        self.config = new
        self._clients.clear()  # the new configuration's app objects get theirs
        self.scheduler.set_heartbeat(new.refresh.heartbeat)
        added, removed, changed = [], [], []
        for name in list(self.managers):
            if name not in new.accounts:
                manager = self.scheduler.remove(name)
                self.managers.pop(name)
                if manager is not None:
                    await manager.wait_idle(max(STOP_GRACE, manager.request_grace))
                    await manager.flush()
                if self.alerts is not None:
                    await self.alerts.detach(name)
                removed.append(name)
        for name, account in new.accounts.items():
            manager = self.managers.get(name)
            if manager is None or (
                old_accounts[name].state_file != account.state_file
                or old_accounts[name].lock_file != account.lock_file
            ):
                if manager is not None:
                    self.scheduler.remove(name)
                    await manager.wait_idle(max(STOP_GRACE, manager.request_grace))
                    await manager.flush()
                manager = self.make_manager(account)
                self.managers[name] = manager
                self.scheduler.add(manager)
                self.scheduler.run_soon(manager, "start")
                added.append(name)
                continue
            if old_accounts[name] != account:
                changed.append(name)
            assert self.session is not None
            # A refresh in flight may take its whole request timeout; swapping the store
            # under it earlier would lose the answer's lock bookkeeping.
            await manager.wait_idle(max(STOP_GRACE, manager.request_grace))
            store = self.new_store(account)
            if self.fleet is not None:
                from .fleet.node import plan_for

                store.planner = plan_for(manager)  # type: ignore[attr-defined]
            manager.reconfigure(
                account,
                store=store,
                client=self._client(account),
                policy=new.refresh,
            )
            if self.alerts is not None:
                self.alerts.reconfigure(name)
            self.scheduler.plan(manager)
            if manager.state is not None and not manager.status.write_pending:
                manager.publish()
        self.watch_state_files()
        if self.alerts is not None:
            self.alerts.wake()  # the beat it sleeps may be another now (heartbeat, accounts)
        message = (
            f"configuration reloaded: {len(new.accounts)} account(s)"
            f"; added {', '.join(added) or '-'}; removed {', '.join(removed) or '-'}"
            f"; changed {', '.join(changed) or '-'}"
        )
        log.info("%s", message)
        for listener in self.reload_listeners:
            listener()
        return True, message


DAEMON = web.AppKey("daemon", Daemon)


def check_outputs(config: Config) -> None:
    """Refuse (UnsafePath) extra token files or templates where every local user may write,
    and log a warning for each directory that its group or another user may (the consumer's
    own): store.output_problems."""
    problems = output_problems(config.accounts.values())
    for found in problems:
        if found.refused:
            raise found.problem
    for found in problems:
        log.warning("account %s: %s", found.account, found.problem)


def only_account(config: Config, account: str) -> Config:
    """Return ``config`` narrowed to one account (`run --account NAME`)."""
    return replace(config, accounts={account: config.accounts[account]}, default_account=account)
