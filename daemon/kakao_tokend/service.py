"""The daemon's lifecycle on one screen: build_app() wires everything, run() drives it.

The aiohttp Application owns the lifecycle. Its cleanup contexts start, in dependency order,
the instance lock, the HTTP session, the stores and account managers, alerts, the scheduler and
the systemd notifications, and stop them in reverse. `run` adds the local API socket, signals
(SIGTERM/SIGINT stop, SIGHUP reloads) and turns startup failures into exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
from aiohttp import web

from . import systemd
from .alerts import CLOSE_GRACE, AlertCenter
from .apisocket import bind_unix_socket
from .config import AccountConfig, Config, load_config
from .errors import ConfigError, KakaoTokendError, StoreError, StoreLocked, StoreMoved, UnsafePath
from .hooks import KILL_WAIT
from .kakao import KakaoClient, create_session
from .refresher import FILE_LOCK_WAIT, AccountManager, EventListener, Health
from .scheduler import RefreshScheduler
from .store import (
    AccountStore,
    check_directory,
    check_not_moved,
    ensure_reserve,
    make_dirs,
    open_lock_file,
    remove_stale_temp_files,
)
from .tokens import Clock, utcnow
from .watch import StateWatcher

log = logging.getLogger(__name__)

EX_OK = 0
EX_FAILURE = 1
EX_TEMPFAIL = 75
EX_CONFIG = 78
#: The least a stop (or a reload) waits for an in-flight refresh to finish and be persisted.
STOP_GRACE = 20.0
#: How long a stop lets API requests that are still being answered finish (aiohttp's
#: shutdown_timeout); a refresh they started goes on in its own task.
API_SHUTDOWN_TIMEOUT = 5.0
#: While a refresh is still in flight during a stop, EXTEND_TIMEOUT_USEC goes to systemd this
#: often, each time asking for three times as long (so one lost datagram costs nothing).
EXTEND_EVERY = 5.0
INSTANCE_LOCK_NAME = "kakao-tokend.run.lock"


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
    #: Extra listeners every account manager gets (the demo prints rotations through this).
    listeners: list[EventListener] = field(default_factory=list)
    #: Called after every successful reload (templates re-render with the new configuration).
    reload_listeners: list[Callable[[], None]] = field(default_factory=list)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _prepared_dirs: set[Path] = field(default_factory=set)
    #: Alert conditions and channels (set up by _alerts_ctx).
    alerts: AlertCenter | None = None
    _lock_fd: int | None = None
    _stopping: bool = False
    _extender: asyncio.Task[None] | None = None
    #: Watches the state directories for files other processes write (set up by _watch_ctx).
    watcher: StateWatcher | None = None

    # ---------------------------------------------------------------- instance lock

    def check_directories(self) -> None:
        """Refuse to start (UnsafePath) when another local user could change the state
        directory or the directory of the API socket (normally the runtime directory)."""
        socket_dir = api_socket_path(self.config).parent
        socket_what = (
            "runtime directory" if socket_dir == self.config.runtime_dir else "socket directory"
        )
        for directory, what in (
            (self.config.state_dir, "state directory"),
            (socket_dir, socket_what),
        ):
            make_dirs(directory)
            check_directory(directory, what=what)

    def acquire_instance_lock(self) -> None:
        """Make this the only `run` on this state directory, or raise StoreLocked."""
        make_dirs(self.config.state_dir)
        path = self.config.state_dir / INSTANCE_LOCK_NAME
        fd = open_lock_file(path, directory_what="state directory", what="instance lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            raise StoreLocked(
                f"another kakao-tokend is already running on {self.config.state_dir}{holder}",
                hint="stop it first (systemctl stop kakao-tokend), or point --config at another"
                " state directory",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release_instance_lock(self) -> None:
        """Release the instance lock (the kernel would do it at exit anyway)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- accounts

    def make_manager(self, account: AccountConfig) -> AccountManager:
        """Create the store, client and manager for one account and load its state."""
        assert self.session is not None
        store = AccountStore(account, rescue_dir=self.config.runtime_dir)
        for directory in {account.state_file.parent, account.token_file.parent}:
            if directory not in self._prepared_dirs:
                # Once per directory: 1,000 accounts usually share one state directory.
                make_dirs(directory)
                remove_stale_temp_files(directory)
                ensure_reserve(directory)
                self._prepared_dirs.add(directory)
        manager = AccountManager(
            account,
            store=store,
            client=KakaoClient(self.session, account.app, clock=self.clock),
            policy=self.config.refresh,
            clock=self.clock,
        )
        manager.listeners.extend(self.listeners)
        manager.load()
        if self.alerts is not None:
            self.alerts.attach(manager)
        if manager.state is not None and manager.status.health is Health.OK:
            # Publish at once when the token file is missing or stale (another tool wrote the
            # state); an up-to-date one is left alone, which keeps a large start cheap. The
            # extra token files carry no generation: they are always written.
            try:
                published = store.read_published()
            except StoreError:
                published = None  # damaged or unreadable: rewrite it
            stale = published is None or published.get("generation") != manager.state.generation
            manager.publish(token_file=stale)
        return manager

    def open_accounts(self) -> None:
        """Create a manager per configured account (after checking every account's files)."""
        for account in self.config.accounts.values():
            AccountStore(account).check_paths()
        for account in self.config.accounts.values():
            self.managers[account.name] = self.make_manager(account)
        for manager in self.managers.values():
            log.info("account %s", manager.summary())

    def adopt_outside_changes(self, manager: AccountManager) -> bool:
        """Take over a state another process wrote (login, import, logout, refresh) now.

        Called when the CLI says so over the socket and when the state directory watch sees
        the file change. A manager that is refreshing re-reads the file under its lock anyway,
        and a state still waiting to be written is newer than anything on disk: both are left
        alone. Returns True when the tokens in memory changed.
        """
        if manager.busy or self._stopping:
            return False
        changed = manager.notice_outside_changes()
        if changed:
            if self.scheduler is not None:
                self.scheduler.plan(manager)
            if self.alerts is not None:
                # Now, not at the next heartbeat: alerts about the old tokens resolve at once.
                self.alerts.evaluate(manager.name)
        return changed

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
        return "; ".join(m.summary(now) for m in self.managers.values()) or "no accounts"

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
        self._extender = asyncio.get_running_loop().create_task(self._extend_while_refreshing())

    async def _extend_while_refreshing(self) -> None:
        """Ask systemd for more stop time (EXTEND_TIMEOUT_USEC) while a refresh is in flight."""
        last: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            if any(m.refreshing for m in self.managers.values()) and (
                last is None or loop.time() - last >= EXTEND_EVERY
            ):
                systemd.extend_timeout(3 * EXTEND_EVERY)
                last = loop.time()
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
            except ConfigError as exc:
                log.error("reload failed, keeping the previous configuration:\n%s", exc)
                systemd.ready(self.summary())
                return False, str(exc)
            assert self.scheduler is not None
            old_accounts = self.config.accounts
            self.config = new
            self.scheduler.set_heartbeat(new.refresh.heartbeat)
            added, removed, changed = [], [], []
            for name in list(self.managers):
                if name not in new.accounts:
                    manager = self.scheduler.remove(name)
                    self.managers.pop(name)
                    if manager is not None:
                        await manager.wait_idle(max(STOP_GRACE, manager.request_grace))
                        manager.flush()
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
                        manager.flush()
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
                manager.account = account
                manager.store = AccountStore(account, rescue_dir=new.runtime_dir)
                manager.client = KakaoClient(self.session, account.app, clock=self.clock)
                manager.set_policy(new.refresh)
                manager.clear_config_error()
                if self.alerts is not None:
                    self.alerts.reconfigure(name)
                self.scheduler.plan(manager)
                if manager.state is not None and not manager.status.write_pending:
                    manager.publish()
            self.watch_state_files()
            message = (
                f"configuration reloaded: {len(new.accounts)} account(s)"
                f"; added {', '.join(added) or '-'}; removed {', '.join(removed) or '-'}"
                f"; changed {', '.join(changed) or '-'}"
            )
            log.info("%s", message)
            for listener in self.reload_listeners:
                listener()
            systemd.ready(self.summary())
            return True, message


DAEMON = web.AppKey("daemon", Daemon)


def refresh_grace(kakao_timeouts: Iterable[float]) -> float:
    """Return how long a stop waits for in-flight refreshes: the longest one can take.

    A refresh waits up to FILE_LOCK_WAIT for the account's file lock, then up to the app's
    Kakao timeout for the answer. Giving up earlier closes the HTTP session under it, and an
    answer Kakao already committed (a rotated refresh token) would be lost.
    """
    return max([STOP_GRACE, *(FILE_LOCK_WAIT + timeout + 1.0 for timeout in kakao_timeouts)])


def stop_budget(kakao_timeouts: Iterable[float]) -> float:
    """Return the longest a clean stop can take, in seconds (one home for TimeoutStopSec).

    API requests drain, in-flight refreshes finish, queued alerts are delivered, running hooks
    are killed: one after another in the worst case. The shipped units' TimeoutStopSec= is at
    least this for the default Kakao timeout (tests/test_stop_timing.py reads both); with a
    longer timeout the daemon asks systemd for more time (EXTEND_TIMEOUT_USEC) while a refresh
    is still in flight.
    """
    return API_SHUTDOWN_TIMEOUT + refresh_grace(kakao_timeouts) + CLOSE_GRACE + KILL_WAIT


async def _instance_lock_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.check_directories()
    daemon.acquire_instance_lock()
    # Under the instance lock, which `store migrate` holds while it moves the accounts.
    accounts = daemon.config.accounts.values()
    for directory in dict.fromkeys(
        [daemon.config.state_dir, *(a.state_file.parent for a in accounts)]
    ):
        check_not_moved(directory)
    yield
    daemon.release_instance_lock()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.session = create_session()
    yield
    await daemon.session.close()


async def _accounts_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.open_accounts()
    yield
    # Reverse order: the scheduler is already stopped; let every in-flight refresh finish
    # and be persisted, then make one last try to write a state the disk refused.
    grace = refresh_grace(m.account.app.timeout for m in daemon.managers.values())
    results = await asyncio.gather(*(m.wait_idle(grace) for m in daemon.managers.values()))
    if not all(results):
        log.error("a refresh was still running after %ss; stopping anyway", grace)
    for manager in daemon.managers.values():
        if not manager.flush():
            log.critical(
                "account %s: the newest tokens could NOT be saved (%s); they are lost with this"
                " process",
                manager.name,
                manager.status.write_error,
            )
    await daemon.end_stop()  # nothing is in flight any more: no more EXTEND_TIMEOUT_USEC


async def _alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    assert daemon.session is not None
    center = AlertCenter(session=daemon.session, clock=daemon.clock)
    daemon.alerts = center
    for manager in daemon.managers.values():
        center.attach(manager)
    # First check after one heartbeat: the start-up refresh gets its chance first.
    periodic = asyncio.create_task(center.run_periodic(lambda: daemon.config.refresh.heartbeat))
    yield
    periodic.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await periodic
    await center.close()
    daemon.alerts = None


async def _scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    scheduler = RefreshScheduler(heartbeat=daemon.config.refresh.heartbeat)
    daemon.scheduler = scheduler
    scheduler.start()
    for manager in daemon.managers.values():
        scheduler.add(manager)
        scheduler.run_soon(manager, "start")
    yield
    scheduler.shutdown()
    await scheduler.drain(refresh_grace(m.account.app.timeout for m in daemon.managers.values()))


async def _systemd_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    assert daemon.scheduler is not None
    watchdog = asyncio.create_task(systemd.watchdog_loop(daemon.scheduler.is_healthy))
    status_task = asyncio.create_task(_status_loop(daemon))
    yield
    daemon.begin_stop()
    for task in (watchdog, status_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _watch_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    watcher = StateWatcher(daemon.on_state_file_changed)
    daemon.watcher = watcher
    daemon.watch_state_files()
    watcher.start()
    log.debug("watching the state directories (%s)", watcher.mode)
    yield
    await watcher.close()
    daemon.watcher = None


async def _status_loop(daemon: Daemon) -> None:
    """Keep systemd's STATUS= line current (once a minute is plenty for a human)."""
    while True:
        await asyncio.sleep(min(60.0, daemon.config.refresh.heartbeat))
        systemd.status(daemon.summary())


def build_app(
    config: Config,
    *,
    config_path: Path | None = None,
    clock: Clock = utcnow,
    only_account_name: str | None = None,
    listeners: list[EventListener] | None = None,
) -> web.Application:
    """Build the daemon's Application with its cleanup contexts in dependency order."""
    app = web.Application(client_max_size=config.api.max_body)
    app[DAEMON] = Daemon(
        config=config,
        config_path=config_path,
        clock=clock,
        only_account=only_account_name,
        listeners=list(listeners or []),
    )
    app.cleanup_ctx.extend(
        [
            _instance_lock_ctx,
            _session_ctx,
            _accounts_ctx,
            _alerts_ctx,
            _scheduler_ctx,
            _watch_ctx,
            _systemd_ctx,
        ]
    )
    from . import hooks, templates
    from .api import add_routes

    add_routes(app)
    hooks.install(app, app[DAEMON])
    templates.install(app, app[DAEMON])
    return app


def api_socket_path(config: Config) -> Path:
    """Return where the local API's Unix socket lives."""
    return config.api.socket or config.runtime_dir / "api.sock"


async def serve(
    config: Config,
    *,
    config_path: Path | None,
    stop: asyncio.Event | None = None,
    only_account_name: str | None = None,
    listeners: list[EventListener] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop``); return the exit code."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    app = build_app(
        config, config_path=config_path, only_account_name=only_account_name, listeners=listeners
    )
    daemon = app[DAEMON]
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=API_SHUTDOWN_TIMEOUT
    )

    def on_stop() -> None:
        # At once, not after the API has drained: no refresh may start once a stop began.
        daemon.begin_stop()
        stop.set()

    def on_reload() -> None:
        if daemon.scheduler is None:
            log.warning("SIGHUP ignored: still starting")
            return
        task = loop.create_task(daemon.reload())
        _background.add(task)
        task.add_done_callback(_background.discard)

    # Installed before start-up: a stop that arrives while an overdue token is being
    # refreshed at start must still be a clean stop that lets that refresh persist.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        await runner.setup()
    except KakaoTokendError as exc:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if isinstance(exc, StoreLocked):
            log.error("%s", exc)
            return EX_TEMPFAIL
        log.error("cannot start: %s", exc)
        await runner.cleanup()
        return EX_CONFIG if isinstance(exc, ConfigError | UnsafePath | StoreMoved) else EX_FAILURE
    socket_path = api_socket_path(daemon.config)
    api = daemon.config.api
    socket_id: tuple[int, int] | None = None
    try:
        sock = bind_unix_socket(socket_path, mode=api.socket_mode, group=api.socket_group)
    except StoreError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        log.error("%s; the local API socket is off%s", exc.message, hint)
    else:
        try:
            await web.SockSite(runner, sock).start()
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                socket_path.unlink()
            log.error("cannot serve on %s: %s; the local API socket is off", socket_path, exc)
        else:
            with contextlib.suppress(OSError):
                info = socket_path.lstat()
                socket_id = (info.st_dev, info.st_ino)
            log.info("local API listening on %s (mode %04o)", socket_path, api.socket_mode)
    if daemon.config.api.tcp is not None:
        host, port = daemon.config.api.tcp
        try:
            await web.TCPSite(runner, host, port).start()
            log.info("local API listening on http://%s:%d (bearer token required)", host, port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s; the TCP API is off", host, port, exc)

    systemd.ready(daemon.summary())
    log.info(
        "kakao-tokend running: %d account(s), heartbeat %ss, state in %s",
        len(daemon.managers),
        daemon.config.refresh.heartbeat,
        daemon.config.state_dir,
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        daemon.begin_stop()
        try:
            await runner.cleanup()
        finally:
            await daemon.end_stop()
        with contextlib.suppress(OSError):
            info = socket_path.lstat()
            if (info.st_dev, info.st_ino) == socket_id:  # ours, not a successor's
                socket_path.unlink()
    log.info("stopped")
    return EX_OK


_background: set[asyncio.Task[tuple[bool, str]]] = set()


def run(config_path: Path | None, *, account: str | None = None) -> int:
    """`kakao-tokend run`: load the config, set up logging, serve until stopped."""
    # A file-size limit (LimitFSIZE=, ulimit -f) must fail a write with EFBIG, not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        systemd.setup_logging("info")
        log.error("%s", exc)
        return EX_CONFIG
    systemd.setup_logging(config.log_level)
    if config.store.backend != "file":
        from .fleet.migrate import moved_away

        moved = asyncio.run(moved_away(config))  # `store migrate --to file` marked the store
        if moved is not None:
            log.error("cannot start: %s", moved)
            return EX_CONFIG
        # The fleet runtime is not built yet (docs/fleet.md). Running on the files instead
        # would make a second live copy of the refresh token next to the database's.
        log.error(
            '[store] backend = "%s": this version of kakao-tokend cannot run a fleet node yet '
            "(`kakao-tokend store init|new-key|rotate-key` work); use the file backend",
            config.store.backend,
        )
        return EX_CONFIG
    if account is not None:
        if account not in config.accounts:
            log.error("no account named %r in the configuration", account)
            return EX_CONFIG
        config = only_account(config, account)
    return asyncio.run(serve(config, config_path=config_path, only_account_name=account))


def only_account(config: Config, account: str) -> Config:
    """Return ``config`` narrowed to one account."""
    return replace(config, accounts={account: config.accounts[account]}, default_account=account)
