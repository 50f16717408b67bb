"""The daemon's lifecycle on one screen: build_app() wires everything, run() drives it.

The aiohttp Application owns the lifecycle. Its cleanup contexts start, in dependency order,
the instance lock, the HTTP session, the stores and account managers, alerts, the scheduler and
the systemd notifications, and stop them in reverse. `run` adds the local API socket, signals
(SIGTERM/SIGINT stop, SIGHUP reloads) and turns startup failures into exit codes. What the
running service holds and does is :class:`~kakao_tokend.daemon.Daemon`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from . import api, hooks, supervisor, systemd, template_runner
from .alerts import CLOSE_GRACE, AlertCenter
from .apilimits import RUNNER_OPTIONS, AcceptErrors, Listener, listener_cap, raise_open_file_limit
from .apisocket import SOCKET_BACKLOG, bind_unix_socket
from .config import Config, load_config, plain_http_warning
from .daemon import DAEMON, STOP_GRACE, Daemon, only_account
from .errors import (
    ConfigError,
    KakaoTokendError,
    StoreError,
    StoreLocked,
    StoreMoved,
    StoreSchemaMismatch,
    StoreUnavailable,
    UnsafePath,
)
from .exitcodes import EX_CONFIG, EX_TEMPFAIL, FAILURE, OK
from .hooks import KILL_WAIT
from .kakao import create_session
from .refresher import FILE_LOCK_WAIT
from .scheduler import RefreshScheduler
from .status import EventListener
from .store import check_not_moved, directory_text
from .tokens import Clock, longest_open_request, same_token_strings, utcnow
from .watch import StateWatcher

if TYPE_CHECKING:  # fleet mode only: file mode never imports the fleet package
    from .fleet.store import FleetStore
    from .refresher import AccountManager

log = logging.getLogger(__name__)

#: The event a stop (SIGTERM, SIGINT) sets: a start waiting for the store ends with it.
STOP = web.AppKey("stop", asyncio.Event)


class StoppedWhileWaiting(Exception):
    """A stop came while the node waited for its store at start: a clean stop (exit 0)."""


#: How long a stop lets API requests that are still being answered finish (aiohttp's
#: shutdown_timeout); a refresh they started goes on in its own task.
API_SHUTDOWN_TIMEOUT = 5.0


def refresh_grace(kakao_timeouts: Iterable[float], *, store_commit: float = 0.0) -> float:
    """Return how long a stop waits for in-flight refreshes: the longest one can take.

    A refresh waits up to FILE_LOCK_WAIT for the account's lock, then for Kakao's answer as
    long as its request stays open (twice the app's Kakao timeout at most: a request given up
    on is kept open for a late answer, tokens.longest_open_request), then (fleet mode) up to
    ``store_commit`` for its commit before the tokens go to the rescue file. Giving up earlier
    closes the HTTP session or the store under it, and an answer Kakao already committed (a
    rotated refresh token) would be lost.
    """
    return max(
        [
            STOP_GRACE,
            *(
                FILE_LOCK_WAIT + longest_open_request(timeout) + store_commit + 1.0
                for timeout in kakao_timeouts
            ),
        ]
    )


def stop_budget(kakao_timeouts: Iterable[float], *, store: StoreWaits | None = None) -> float:
    """Return the longest a clean stop can take, in seconds (one home for TimeoutStopSec).

    API requests drain, in-flight refreshes finish, queued alerts are delivered, running hooks
    are killed, and in fleet mode the node's last writes to the store give up by their
    deadlines: one after another in the worst case. The shipped units' TimeoutStopSec= is at
    least this for the default Kakao timeout and store timeouts (tests/test_stop_timing.py
    reads both); with a longer timeout the daemon asks systemd for more time
    (EXTEND_TIMEOUT_USEC) while a refresh is still in flight.
    """
    store = store or StoreWaits()
    grace = refresh_grace(kakao_timeouts, store_commit=store.commit)
    return API_SHUTDOWN_TIMEOUT + grace + CLOSE_GRACE + KILL_WAIT + store.stop


@dataclass(frozen=True)
class StoreWaits:
    """What the store adds to a stop (all zero for the file store; see store_waits): the
    longest a commit can take before it is given up, and the stop's own last writes (the
    node's row, the alert bookkeeping, the pool)."""

    commit: float = 0.0
    stop: float = 0.0


def store_waits(fleet: FleetStore | None) -> StoreWaits:
    """Return what ``fleet`` (None: the file store) adds to a stop; the alert bookkeeping's
    last write is given CLOSE_GRACE (see _alerts_ctx)."""
    if fleet is None:
        return StoreWaits()
    return StoreWaits(commit=fleet.commit_wait, stop=fleet.stop_wait + CLOSE_GRACE)


def _refresh_grace(daemon: Daemon) -> float:
    """The refresh grace for the daemon's accounts and store."""
    return refresh_grace(
        (m.account.app.timeout for m in daemon.managers.values()),
        store_commit=store_waits(daemon.fleet).commit,
    )


async def _instance_lock_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.check_directories()
    daemon.acquire_instance_lock()
    # Under the instance lock, which `store migrate` holds while it moves the accounts. In
    # fleet mode the files are not used (MOVED there is expected); the store's own marker
    # is checked when it opens.
    accounts = daemon.config.accounts.values()
    if daemon.config.store.backend == "file":
        # Each distinct directory once, found by its text (a thousand accounts usually share
        # one: a Path's parent and hash for each of them would cost more than the check).
        directories = {str(daemon.config.state_dir): daemon.config.state_dir}
        for account in accounts:
            text = directory_text(account.file_text("state_file"))
            if text not in directories:
                directories[text] = Path(text)
        for directory in directories.values():
            check_not_moved(directory, account=next(iter(accounts), None))
    yield
    daemon.release_instance_lock()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.session = create_session()
    yield
    daemon.stop_step("closing the HTTP session")
    await daemon.session.close()


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    """Fleet mode: open the PostgreSQL store (schema, marker, pool, every row) first."""
    daemon = app[DAEMON]
    config = daemon.config
    if config.store.backend != "postgres":
        yield
        return
    from .fleet.admin import db_timeouts, require_dsn, require_keyring
    from .fleet.store import FleetStore

    fleet = FleetStore(
        dsn=require_dsn(config.store),
        keyring=require_keyring(config.store),
        node=config.store.node_name,
        timeouts=db_timeouts(config),
        state_dir=config.state_dir,
        pool_size=config.store.pool_size,
        publish_accounts=config.store.publish_accounts,
        heartbeat=lambda: daemon.config.refresh.heartbeat,
        accounts=lambda: daemon.config.accounts,
    )
    from .fleet.db import StoreRefused

    try:
        await fleet.open()
    except StoreUnavailable as exc:
        await fleet.close()
        if isinstance(exc, StoreRefused):
            raise  # a mistake in the DSN or on the server: waiting cannot fix it
        if not await _wait_for_store(app, fleet, exc):
            raise StoppedWhileWaiting from None
    except BaseException:
        await fleet.close()
        raise
    daemon.fleet = fleet
    log.info(
        "fleet node %s: PostgreSQL store %s (schema %d), %d account row(s)",
        fleet.node,
        fleet.store_id,
        fleet.schema_version,
        len(fleet.rows),
    )
    yield
    daemon.stop_step("closing the PostgreSQL store (the node's row, the pool)")
    await fleet.close()
    daemon.fleet = None


async def _wait_for_store(app: web.Application, fleet: FleetStore, first: StoreUnavailable) -> bool:
    """Fleet mode, the database unreachable at start: READY, the local API saying so, the
    store_unavailable alert, and retries until the store opens (True) or a stop (False).

    Every node of a fleet started after a power cut must not wait silently for a database
    that does not come back: exiting before READY (systemd restarting it every few seconds)
    sent no alert while the tokens ran out (docs/fleet.md §10).
    """
    from .fleet.startwait import StoreWait

    daemon = app[DAEMON]
    wait = StoreWait(daemon, fleet, first)
    runner = _api_runner(wait.app())
    await runner.setup()
    listening = await _open_sites(runner, daemon.config)
    watchdog = asyncio.create_task(systemd.watchdog_loop(lambda: True))
    # Said before READY: whoever acts on READY finds the reason in the journal already.
    log.warning(
        "kakao-tokend waiting for the PostgreSQL store before it serves (%s); trying again"
        " with back-off, the local API answers 503 meanwhile",
        first.message,
    )
    systemd.ready(wait.summary())
    try:
        return await wait.run(app[STOP])
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        listening.close()
        await runner.cleanup()
        _remove_socket(daemon.config.api_socket, listening.socket_id)
        await wait.close()


def _api_runner(app: web.Application) -> web.AppRunner:
    """Return the runner that serves ``app`` as the local API (the daemon's, or the one that
    answers 503 while a fleet node waits for its store)."""
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=API_SHUTDOWN_TIMEOUT,
        **RUNNER_OPTIONS,
    )


@dataclass
class Listening:
    """The API's listeners as _open_sites started them."""

    servers: list[asyncio.Server]
    #: The socket file's identity, to remove only our own at the end (None: no socket).
    socket_id: tuple[int, int] | None

    def close(self) -> None:
        """Stop accepting connections (runner.cleanup() then drains those that are open)."""
        for server in self.servers:
            server.close()


async def _open_sites(runner: web.AppRunner, config: Config) -> Listening:
    """Serve ``runner`` on the API socket and the TCP listener (if configured), each through
    an apilimits.Listener (a cap on connections, a deadline for request heads). Failures are
    logged."""
    loop = asyncio.get_running_loop()
    server = runner.server
    assert server is not None  # after runner.setup()
    cap = listener_cap()
    socket_path = config.api_socket
    api = config.api
    listening = Listening([], None)
    try:
        sock = bind_unix_socket(socket_path, mode=api.socket_mode, group=api.socket_group)
    except StoreError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        log.error("%s; the local API socket is off%s", exc.message, hint)
    else:
        factory = Listener(server, str(socket_path), cap=cap)
        try:
            listening.servers.append(
                await loop.create_server(factory, sock=sock, backlog=SOCKET_BACKLOG)
            )
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                socket_path.unlink()
            log.error("cannot serve on %s: %s; the local API socket is off", socket_path, exc)
        else:
            with contextlib.suppress(OSError):
                info = socket_path.lstat()
                listening.socket_id = (info.st_dev, info.st_ino)
            log.info("local API listening on %s (mode %04o)", socket_path, api.socket_mode)
    if api.tcp is not None:
        host, port = api.tcp
        factory = Listener(server, f"{host}:{port}", cap=cap)
        try:
            listening.servers.append(
                await loop.create_server(factory, host, port, backlog=SOCKET_BACKLOG)
            )
            log.info("local API listening on http://%s:%d (bearer token required)", host, port)
            plain_http = plain_http_warning(api)
            if plain_http is not None:
                log.warning("%s", plain_http)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s; the TCP API is off", host, port, exc)
    return listening


def _remove_socket(socket_path: Path, socket_id: tuple[int, int] | None) -> None:
    """Remove the API socket file if it is still ours, not a successor's."""
    with contextlib.suppress(OSError):
        info = socket_path.lstat()
        if (info.st_dev, info.st_ino) == socket_id:
            socket_path.unlink()


async def _fleet_node_ctx(app: web.Application) -> AsyncIterator[None]:
    """Fleet mode: listen for other nodes' commits and poll as the backstop."""
    daemon = app[DAEMON]
    if daemon.fleet is None:
        yield
        return
    from .fleet.node import FleetNode

    node = FleetNode(
        daemon.fleet,
        on_change=daemon.on_store_changed,
        on_due=daemon.on_store_due,
        on_health=daemon.on_store_health,
    )
    daemon.fleet_node = node
    # Before READY: what other nodes committed while this one was down or starting is
    # re-read and published first (bounded: a database that does not answer delays nothing).
    await node.start(wait=daemon.fleet.deadline)
    yield
    daemon.stop_step("stopping the fleet listener and poll")
    await node.stop()
    daemon.fleet_node = None


async def _accounts_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    daemon.open_accounts()
    yield
    # Reverse order: the scheduler is already stopped; let every in-flight refresh finish
    # and be persisted, then make one last try to write a state the disk refused.
    grace = _refresh_grace(daemon)
    daemon.stop_step(f"waiting for in-flight refreshes (up to {grace:g}s)")
    results = await asyncio.gather(*(m.wait_idle(grace) for m in daemon.managers.values()))
    if not all(results):
        log.error("a refresh was still running after %ss; stopping anyway", grace)
    # All at once: on a silent database each write gives up only after its deadline, and the
    # tokens are in the rescue files already; one after another, a stop took that per account.
    managers = list(daemon.managers.values())
    daemon.stop_step("writing the last states")
    flushed = await asyncio.gather(*(m.flush() for m in managers))
    for manager, clean in zip(managers, flushed, strict=True):
        if not clean:
            _report_unsaved(manager)
    await daemon.end_stop()  # nothing is in flight any more: no more EXTEND_TIMEOUT_USEC


def _report_unsaved(manager: AccountManager) -> None:
    """Say where the tokens the store refused at stop are: in the rescue file (read back, so
    the line tells the truth), which the next start recovers, or in no file at all."""
    state = manager.state
    rescue = manager.store.rescue_path
    kept = manager.store.load_rescue() if rescue is not None and state is not None else None
    # (None: a fleet node's rescued tokens that waited for the row lock, no write refused.)
    why = manager.status.write_error or "not committed before the stop"
    if state is not None and kept is not None and same_token_strings(kept.tokens, state.tokens):
        log.error(
            "account %s: the newest tokens could not be saved (%s); they are kept in the rescue"
            " file %s, and the next start recovers them from it (do not delete it)",
            manager.name,
            why,
            rescue,
        )
        return
    log.critical(
        "account %s: the newest tokens could NOT be saved (%s), nor kept in a rescue file;"
        " they are in no file and are lost with this process",
        manager.name,
        why,
    )


async def _alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    assert daemon.session is not None
    book = None
    if daemon.fleet is not None:
        # Fleet mode: each account's alerts go out once per fleet, recorded in the store.
        from .fleet.alertshare import AlertBook

        book = AlertBook(daemon.fleet)
        try:
            await book.load()
        except StoreError as exc:  # the task reads it again; meanwhile nothing fleet-wide
            log.warning("cannot read the alert bookkeeping from the store yet: %s", exc.message)
        book.start()
    center = AlertCenter(session=daemon.session, clock=daemon.clock, shared=book)
    daemon.alerts = center
    if daemon.fleet is not None:  # file mode: right after READY (_take_up_accounts)
        for manager in daemon.managers.values():
            center.attach(manager)
    # First check after one heartbeat: the start-up refresh gets its chance first. The beat is
    # the scheduler's, fitted to short tokens: a fixed minute would grade a 3 s token's
    # failing_after (0.3 s) twenty lifetimes late. The loop starts before the scheduler (the
    # config's beat, unfitted); _start_scheduler wakes it to take the fitted one.
    periodic = asyncio.create_task(center.run_periodic(lambda: _beat(daemon)))
    yield
    periodic.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await periodic
    daemon.stop_step(f"delivering queued alerts (up to {CLOSE_GRACE:g}s)")
    await center.close()
    if book is not None:
        daemon.stop_step("writing the alert bookkeeping to the store")
        await book.close(CLOSE_GRACE)
    daemon.alerts = None


def _beat(daemon: Daemon) -> float:
    """Return the heartbeat's interval: the scheduler's once it runs (RefreshScheduler.interval),
    before that the fleet store's (the same rule, fitted to the rows it read)."""
    if daemon.scheduler is not None:
        return daemon.scheduler.interval()
    if daemon.fleet is not None:
        return daemon.fleet.heartbeat()
    return daemon.config.refresh.heartbeat


def _start_scheduler(daemon: Daemon) -> None:
    """Make and start the refresh scheduler, the daemon's one, with every account's start-up
    check queued; then have the alert loop, asleep since before there was a scheduler, take
    up the beat it fits to the accounts' lifetimes (_beat)."""
    scheduler = RefreshScheduler(heartbeat=daemon.config.refresh.heartbeat)
    if daemon.fleet is not None:
        # The poll names what comes due: only those accounts take a place in the due queue.
        daemon.fleet.names_ahead = True
        scheduler.named_in_time = daemon.fleet.names_in_time
    daemon.scheduler = scheduler
    scheduler.start()
    for manager in daemon.managers.values():
        scheduler.add(manager)
        scheduler.run_soon(manager, "start")
    if daemon.alerts is not None:
        # Its sleep began with the unfitted beat (60 s: ten lifetimes of a 6-second token);
        # left to end, every grading moment of the daemon's first minute went by ungraded.
        daemon.alerts.wake()


async def _scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    if daemon.fleet is not None:  # file mode: right after READY (_take_up_accounts)
        _start_scheduler(daemon)
    yield
    if daemon.scheduler is not None:
        daemon.scheduler.shutdown()
        daemon.stop_step("waiting for the scheduler's running jobs")
        await daemon.scheduler.drain(_refresh_grace(daemon))


def _healthy(daemon: Daemon) -> bool:
    """The watchdog's question: did the scheduler's heartbeat run recently? (Yes while a
    file-mode start has none yet: it makes it right after READY, in the same step.)"""
    return daemon.scheduler is None or daemon.scheduler.is_healthy()


async def _systemd_ctx(app: web.Application) -> AsyncIterator[None]:
    daemon = app[DAEMON]
    watchdog = asyncio.create_task(systemd.watchdog_loop(lambda: _healthy(daemon)))
    status_task = asyncio.create_task(_status_loop(daemon))
    yield
    daemon.begin_stop()
    for task in (watchdog, status_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Stop the state-file watch that serve() starts at READY (see _start_watch)."""
    daemon = app[DAEMON]
    yield
    watcher, daemon.watcher = daemon.watcher, None
    if watcher is not None:
        daemon.stop_step("closing the state-file watch")
        await watcher.close()


def _take_up_accounts(daemon: Daemon) -> None:
    """File mode: attach every account's alerts, start the scheduler and plan every account's
    refreshes, right after READY.

    Nothing READY promises needs them: every account's state is loaded, its token file
    current, and a token request is answered by its manager, which refreshes on its own when
    it must. This runs in the same step of the event loop as READY, so no request, signal or
    reload is handled before every account is planned and its start-up check (an overdue
    token first) queued. Before READY they cost a 1,000-account start about 90 M
    instructions, and every start APScheduler's scheduler module (its entry-point scans, its
    pool executor with multiprocessing: about 88 M; docs/benchmarks.md). Fleet mode keeps
    them in the cleanup contexts: its node takes up the accounts the store hands it there.
    """
    if daemon.fleet is not None:
        return
    alerts = daemon.alerts
    assert alerts is not None
    for manager in daemon.managers.values():
        alerts.attach(manager)
    _start_scheduler(daemon)


def _start_watch(daemon: Daemon) -> None:
    """File mode: watch the state files for what other processes write, from READY on.

    Right after READY, not before it: nothing READY promises needs the watch (every token file
    is current and every account served from memory already), and setting it up costs a start
    the import of asyncinotify, its `ldconfig -p` child and a path per account
    (docs/benchmarks.md). A state file written since the accounts were loaded is found by
    comparing each one once with what was read (one stat each), so the gap between loading and
    watching, which a start always had, is now closed.

    Fleet mode keeps no state files: the CLI writes through the store, and every change
    arrives by LISTEN/NOTIFY or the poll. Watching them held a path per account (10,000 on a
    node) and, without inotify, stat()ed each of them every few seconds.
    """
    if daemon.fleet is not None:
        return
    watcher = StateWatcher(daemon.on_state_file_changed)
    daemon.watcher = watcher
    daemon.watch_state_files()
    watcher.start()
    log.debug("watching the state directories (%s)", watcher.mode)
    for manager in list(daemon.managers.values()):
        try:
            daemon.adopt_outside_changes(manager)
        except Exception:  # one account's trouble must not stop the others' (as in the watch)
            log.exception("account %s: checking the state file failed", manager.name)


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
    app[STOP] = asyncio.Event()  # serve() puts its own here
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
            _fleet_ctx,
            _accounts_ctx,
            _alerts_ctx,
            _scheduler_ctx,
            _fleet_node_ctx,
            _watch_ctx,
            _systemd_ctx,
        ]
    )
    api.add_routes(app)
    hooks.install(app, app[DAEMON])
    template_runner.install(app, app[DAEMON])
    return app


async def serve(
    config: Config,
    *,
    config_path: Path | None,
    stop: asyncio.Event | None = None,
    only_account_name: str | None = None,
    listeners: list[EventListener] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop``); return the exit code."""
    accept_errors = AcceptErrors(asyncio.get_running_loop())
    accept_errors.install()
    try:
        return await _serve(
            config,
            config_path=config_path,
            stop=stop,
            only_account_name=only_account_name,
            listeners=listeners,
        )
    finally:
        accept_errors.uninstall()


async def _serve(
    config: Config,
    *,
    config_path: Path | None,
    stop: asyncio.Event | None,
    only_account_name: str | None,
    listeners: list[EventListener] | None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    app = build_app(
        config, config_path=config_path, only_account_name=only_account_name, listeners=listeners
    )
    daemon = app[DAEMON]
    runner = _api_runner(app)

    def on_stop() -> None:
        # At once, not after the API has drained: no refresh may start once a stop began.
        daemon.begin_stop()
        stop.set()

    # File mode takes up its accounts right after READY (_take_up_accounts): a reload before
    # that would plan the accounts it touched twice.
    taken_up = config.store.backend != "file"

    def on_reload() -> None:
        if daemon.scheduler is None or not taken_up:
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
    app[STOP] = stop
    try:
        await runner.setup()
    except StoppedWhileWaiting:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        log.info("stopped while waiting for the PostgreSQL store")
        return OK
    except KakaoTokendError as exc:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if isinstance(exc, StoreLocked):
            log.error("%s", exc)
            return EX_TEMPFAIL
        log.error("cannot start: %s", exc)
        await runner.cleanup()
        refused = ConfigError | UnsafePath | StoreMoved | StoreSchemaMismatch
        return EX_CONFIG if isinstance(exc, refused) or _refused_by_server(exc) else FAILURE
    socket_path = daemon.config.api_socket
    listening = await _open_sites(runner, daemon.config)

    systemd.ready(daemon.summary())
    gc.enable()  # run() keeps it off until now in file mode
    if not stop.is_set():  # a stop that came meanwhile: no scheduler, nothing started
        _take_up_accounts(daemon)
    taken_up = True
    _start_watch(daemon)
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
        daemon.stop_step(f"draining the local API (up to {API_SHUTDOWN_TIMEOUT:g}s)")
        listening.close()
        try:
            await runner.cleanup()
        finally:
            await daemon.end_stop()
        _remove_socket(socket_path, listening.socket_id)
    log.info("stopped")
    return OK


def _refused_by_server(exc: KakaoTokendError) -> bool:
    """True when the database answered and refused this node (wrong user, password, dbname,
    pg_hba.conf): the operator's mistake, EX_CONFIG like the configuration's own."""
    if not isinstance(exc, StoreUnavailable):
        return False
    from .fleet.db import StoreRefused  # only ever raised in fleet mode

    return isinstance(exc, StoreRefused)


_background: set[asyncio.Task[tuple[bool, str]]] = set()


def run(config_path: Path | None, *, account: str | None = None) -> int:
    """`kakao-tokend run`: load the config, set up logging, serve until stopped."""
    # A file-size limit (LimitFSIZE=, ulimit -f) must fail a write with EFBIG, not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Which unit (if any) runs us, so that every text names our log and restart.
    supervisor.use(systemd.supervisor())
    # The cyclic garbage collector is off until a file-mode start is READY (serve() turns it
    # on then): loading a thousand accounts makes no cyclic garbage worth a collection, and
    # its collections walked every account's new objects again (docs/benchmarks.md). A fleet
    # node turns it on at once: it may wait long for its database before READY.
    gc.disable()
    try:
        return _run(config_path, account=account)
    finally:
        gc.enable()


def _run(config_path: Path | None, *, account: str | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        systemd.setup_logging("info")
        log.error("%s", exc)
        return EX_CONFIG
    systemd.setup_logging(config.log_level)
    raise_open_file_limit()
    if config.store.backend == "postgres":
        gc.enable()
        from .fleet import missing_extra
        from .fleet.admin import require_dsn, require_keyring

        try:  # before anything starts: no key, no database, no extra are the operator's to fix
            require_dsn(config.store)
            require_keyring(config.store)
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ConfigError as exc:
            log.error("cannot start: %s", exc)
            return EX_CONFIG
        except ImportError as exc:
            log.error("cannot start: %s", missing_extra(exc))
            return EX_CONFIG
    if account is not None:
        if account not in config.accounts:
            log.error("no account named %r in the configuration", account)
            return EX_CONFIG
        config = only_account(config, account)
    return asyncio.run(serve(config, config_path=config_path, only_account_name=account))
