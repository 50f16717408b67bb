"""The `kakao-tokend` command line: the only place that prints for humans and picks exit codes.

Exit codes (also in the README):

====  =================  ===========================================================
code  name               meaning
====  =================  ===========================================================
0     OK                 done; `status`: every account is fine
1     FAILURE / WARNING  generic failure; `status`: a warning (refresh token < 14 d
                         left, or access token expired although no re-login is needed)
2     CRITICAL           `status` only: re-login needed, no tokens, refresh token
                         < 3 d left or expired (monitoring-plugin convention)
64    EX_USAGE           bad command line (unknown option, unknown account)
65    EX_DATAERR         the file given to `import` is not a usable token file
69    EX_UNAVAILABLE     Kakao could not be reached or answered with a transient error
70    EX_SOFTWARE        internal error (a bug); run with --debug for the traceback
75    EX_TEMPFAIL        the account is locked by another kakao-tokend process
77    EX_NOPERM          a person must log in again (`kakao-tokend login`)
78    EX_CONFIG          the configuration is invalid (every problem is listed)
====  =================  ===========================================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import sys
import traceback
import webbrowser
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__
from .errors import (
    ConfigError,
    KakaoConfigError,
    KakaoRequestRejected,
    KakaoTokendError,
    KakaoUnavailable,
    ReloginRequired,
    StateCorrupt,
    StateMissing,
    StoreError,
    StoreLocked,
    StoreWriteError,
)
from .tokens import format_duration, format_time, utcnow

if TYPE_CHECKING:  # kept lazy at run time so `--help` and `--version` stay fast
    from .config import AccountConfig, Config
    from .state import AccountState

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_WARNING = 1
EXIT_CRITICAL = 2
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

#: `status` thresholds for the refresh token's remaining life.
WARN_REFRESH_LEFT = 14 * 86400.0
CRIT_REFRESH_LEFT = 3 * 86400.0

T = TypeVar("T")


def exit_code_for(exc: KakaoTokendError) -> int:
    """Return the exit code for one of our errors (see the table in the module docstring)."""
    from .importer import ImportFileError

    if isinstance(exc, ConfigError | KakaoConfigError):
        return EX_CONFIG
    if isinstance(exc, ImportFileError):
        return EX_DATAERR
    if isinstance(exc, StoreLocked):
        return EX_TEMPFAIL
    if isinstance(exc, ReloginRequired | StateMissing):
        return EX_NOPERM
    if isinstance(exc, KakaoUnavailable):
        return EX_UNAVAILABLE
    return EXIT_FAILURE


# --------------------------------------------------------------------------- plumbing


@dataclass
class Settings:
    """Global options, with the configuration loaded on first use."""

    config_path: Path | None
    account: str | None
    debug: bool
    _config: Config | None = field(default=None, repr=False)
    _paths_config: Config | None = field(default=None, repr=False)

    def config(self, *, secrets: bool = True) -> Config:
        """Load (once) and return the configuration.

        ``secrets=False`` is enough for commands that need only paths (status, or talking to
        the daemon's socket): it works for an operator who cannot read the credentials.
        """
        from .config import load_config

        if self._config is None and secrets:
            self._config = load_config(self.config_path)
        if self._config is not None:
            return self._config
        if self._paths_config is None:
            self._paths_config = load_config(self.config_path, with_secrets=False)
        return self._paths_config

    def account_name(self) -> str:
        """Return the selected account: --account, else the config's default account."""
        config = self.config(secrets=False)
        name = self.account or config.default_account
        if name not in config.accounts:
            known = ", ".join(config.accounts)
            raise click.UsageError(f"unknown account {name!r}; configured accounts: {known}")
        return name

    def account_config(self) -> AccountConfig:
        """Return the selected account's configuration."""
        return self.config().accounts[self.account_name()]


def _settings() -> Settings:
    return click.get_current_context().find_object(Settings) or Settings(None, None, False)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def _setup_logging(debug: bool) -> None:
    """Quiet logging for one-shot commands: results are printed; --debug shows everything."""
    from .logs import _HANDLER_MARK, RedactingFilter

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    # The same mark as logs.setup_logging, so `run` replaces this handler instead of doubling it.
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.CRITICAL + 10)


_GLOBAL_OPTIONS = frozenset({"--config", "--account", "--debug"})


class TokendGroup(click.Group):
    """A click group that turns our errors into one stderr line and the right exit code."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        """Parse the group's own options; usage errors exit with EX_USAGE (64)."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            setattr(exc, "exit_code", EX_USAGE)  # noqa: B010 - instance override of a ClassVar
            raise

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; map KakaoTokendError and unexpected exceptions to exit codes."""
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            setattr(exc, "exit_code", EX_USAGE)  # noqa: B010 - instance override of a ClassVar
            if isinstance(exc, click.NoSuchOption) and exc.option_name in _GLOBAL_OPTIONS:
                # `kakao-tokend check-config --config FILE`: a common slip; say where it goes.
                name = exc.option_name
                where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
                command = where.partition(" ")[2] or "COMMAND"
                value = "" if name == "--debug" else " ..."
                better = click.UsageError(
                    f"{name} is a global option and goes before the command:"
                    f" kakao-tokend {name}{value} {command}",
                    ctx=exc.ctx,
                )
                setattr(better, "exit_code", EX_USAGE)  # noqa: B010 - see above
                raise better from None
            raise
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KakaoTokendError as exc:
            if debug:
                traceback.print_exc(file=sys.stderr)
            _fail(str(exc))
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if debug:
                traceback.print_exc(file=sys.stderr)
            name = type(exc).__name__
            click.echo(
                f"internal error: {name}: {exc} (run with --debug for the traceback)", err=True
            )
            ctx.exit(EX_SOFTWARE)


class Duration(click.ParamType[float]):
    """A duration such as ``90s``, ``5m``, ``1h30m`` or a plain number of seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        """Parse with config.parse_duration; a bad value is a usage error."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        from .config import parse_duration

        try:
            return float(parse_duration(str(value)))
        except ValueError as exc:
            # parse_duration's message already names the accepted forms and the bad value.
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(
        f"kakao-tokend {__version__} ({platform.python_implementation()} "
        f"{platform.python_version()} on {platform.system()} {platform.machine()})"
    )
    ctx.exit()


CONTEXT_SETTINGS: dict[str, Any] = {
    "auto_envvar_prefix": "KAKAO_TOKEND",
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}


@click.group(cls=TokendGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the version, Python version and platform, then exit.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="KAKAO_TOKEND_CONFIG",
    show_envvar=True,
    default=None,
    help="Config file (default: $CONFIGURATION_DIRECTORY/config.toml, "
    "/etc/kakao-tokend/config.toml, then the user config dir).",
)
@click.option(
    "--account",
    default=None,
    show_envvar=True,
    help="Account to act on (default: the config's default_account).",
)
@click.option("--debug", is_flag=True, show_envvar=True, help="Show logs and tracebacks.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, account: str | None, debug: bool) -> None:
    """Keep Kakao user OAuth tokens fresh and publish an always-valid token file.

    \b
    Example:
      kakao-tokend login --no-browser     # once, to get tokens
      kakao-tokend run                    # the daemon (systemd runs this)
      curl -H "Authorization: Bearer $(kakao-tokend token)" https://kapi.kakao.com/v2/user/me
    """
    ctx.obj = Settings(config_path=config_path, account=account, debug=debug)
    _setup_logging(debug)


# --------------------------------------------------------------------------- check-config


@main.command("check-config")
def check_config() -> None:
    """Validate the configuration and exit (0 = valid, 78 = every problem listed).

    \b
    Example:
      kakao-tokend --config /etc/kakao-tokend/config.toml check-config
    """
    settings = _settings()
    config = settings.config()
    names = ", ".join(config.accounts)
    where = f" from {config.source}" if config.source else " (no config file; defaults)"
    click.echo(
        f"config OK{where}: {len(config.accounts)} account(s): {names}; state in {config.state_dir}"
    )
    from .alerts import kakaotalk_only_for_critical

    for account in config.accounts.values():
        if kakaotalk_only_for_critical(account):
            click.echo(
                f"warning: account {account.name}: KakaoTalk is the only channel for critical"
                " alerts, and it cannot deliver once the token is dead; add [alerts] webhook_url"
                " or command",
                err=True,
            )


# --------------------------------------------------------------------------- login


def _display_available() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _describe_files(state: AccountState, account: AccountConfig) -> list[str]:
    now = utcnow()
    tokens = state.tokens
    estimated = " (estimated)" if tokens.refresh_expiry_estimated else ""
    return [
        f"  state file:  {account.state_file} (private, 0600)",
        f"  token file:  {account.token_file} (mode {account.token_file_mode:04o})",
        f"  access token expires {format_time(tokens.access_expires_at)} "
        f"(in {format_duration(tokens.access_remaining(now).total_seconds())})",
        f"  refresh token expires {format_time(tokens.refresh_expires_at)} "
        f"(in {format_duration(tokens.refresh_remaining(now).total_seconds())}){estimated}",
        f"  generation {state.generation}",
    ]


@main.command()
@click.option(
    "--no-browser",
    is_flag=True,
    help="Do not open a browser; also accept the redirect address (or code) pasted on stdin.",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    help="Consent item to request, repeatable (default: kakao.scopes from the config).",
)
@click.option(
    "--timeout",
    type=DURATION,
    default="5m",
    help="How long to wait for the login to finish.",
)
def login(no_browser: bool, scopes: Sequence[str], timeout: float) -> None:
    """Log in with Kakao once (PKCE) and store the tokens for the daemon.

    Prints the Kakao authorize URL, serves the redirect URI from the config on this machine
    (e.g. http://127.0.0.1:8765/callback), exchanges the code, calls /v2/user/me once (Kakao
    unlinks users who never do) and writes the state and token files. A fresh login replaces
    the account's previous tokens.

    \b
    Example:
      kakao-tokend login                       # opens a browser on this machine
      kakao-tokend login --no-browser          # on a server: paste the redirect address
      ssh -L 8765:127.0.0.1:8765 server        # ...or forward the port, then open the URL
    """
    from .login import LoginFlow

    settings = _settings()
    account = settings.account_config()
    flow = LoginFlow(account, scopes=scopes)

    def notify(line: str) -> None:
        click.echo(line, err=True)

    opener: Callable[[str], object] | None = None
    if not no_browser and _display_available():
        opener = webbrowser.open
    # Without a browser here the user finishes elsewhere and may paste the redirect address.
    paste = no_browser or opener is None
    result = _run_async(
        flow.run(
            notify=notify,
            open_browser=opener,
            stdin=sys.stdin if paste else None,
            timeout=timeout,
        )
    )
    state = result.state
    _tell_daemon(account.name)
    who = f" as Kakao user {result.user_id}" if result.user_id is not None else ""
    click.echo(f"Login succeeded for account '{account.name}'{who}.")
    for line in _describe_files(state, account):
        click.echo(line)
    if result.user_me_problem:
        click.echo(
            f"warning: could not call /v2/user/me ({result.user_me_problem}); Kakao unlinks "
            "users that never call a user-info API within 24 h — run `kakao-tokend status` "
            "and log in again if the tokens stop working",
            err=True,
        )


# --------------------------------------------------------------------------- import


@main.command("import")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--force", is_flag=True, help="Replace the account's existing tokens.")
def import_(path: Path, force: bool) -> None:
    """Adopt a kakao_token.json written by the popular blog scripts.

    The file holds Kakao's raw token response (durations only, maybe an extra app_key). The
    access token's expiry is asked from Kakao (access_token_info); the refresh token's expiry
    is estimated from the file's modification time and marked as estimated.

    \b
    Example:
      kakao-tokend import ~/my_squat/kakao_token.json
      kakao-tokend --account bot import ./kakao_token.json --force
    """
    from .importer import import_seed_file
    from .kakao import KakaoClient, create_session

    settings = _settings()
    account = settings.account_config()

    async def go() -> Any:
        async with create_session() as session:
            client = KakaoClient(session, account.app)
            return await import_seed_file(path, account, client, force=force)

    result = _run_async(go())
    _tell_daemon(account.name)
    click.echo(f"Imported {path} into account '{account.name}'.")
    how = {
        "access_token_info": "from Kakao's access_token_info",
        "expired": "already expired at Kakao; the daemon refreshes it at once",
        "unverified": "unverified; treated as expired",
    }[result.access_source]
    click.echo(f"  access token: {how}")
    for line in _describe_files(result.state, account):
        click.echo(line)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


# --------------------------------------------------------------------------- status


@dataclass
class Assessment:
    """One account's status level and the reasons for it."""

    account: str
    level: int
    problems: list[str]
    state: AccountState | None
    data: dict[str, Any]
    #: Detail lines when the assessment came from the daemon (there is no AccountState then).
    lines: list[str] | None = None


_LEVEL_NAMES = {EXIT_OK: "ok", EXIT_WARNING: "warning", EXIT_CRITICAL: "critical"}


def assess(
    name: str,
    state: AccountState | None,
    now: datetime,
    *,
    warn: float = WARN_REFRESH_LEFT,
    crit: float = CRIT_REFRESH_LEFT,
    load_error: str | None = None,
) -> Assessment:
    """Grade one account: 2 critical, 1 warning, 0 ok (monitoring-plugin convention).

    Critical: no state (or unreadable), re-login needed, refresh token expired or with less
    than ``crit`` left. Warning: refresh token with less than ``warn`` left, or an expired
    access token while the refresh token is still usable (the daemon is not keeping up).
    """
    data: dict[str, Any] = {"account": name}
    if state is None:
        problem = load_error or f"no tokens: run `kakao-tokend login{_account_flag(name)}`"
        data.update(level="critical", problems=[problem])
        return Assessment(name, EXIT_CRITICAL, [problem], None, data)
    tokens = state.tokens
    access_left = tokens.access_remaining(now).total_seconds()
    refresh_left = tokens.refresh_remaining(now).total_seconds()
    level = EXIT_OK
    problems: list[str] = []
    if state.relogin_reason:
        level = EXIT_CRITICAL
        problems.append(f"re-login needed: {state.relogin_reason}")
    level = _grade_refresh_left(name, refresh_left, level, problems, warn=warn, crit=crit)
    if access_left <= 0 and level < EXIT_CRITICAL:
        level = max(level, EXIT_WARNING)
        problems.append(
            "access token expired; is the daemon running? (`kakao-tokend refresh` renews it)"
        )
    rotations = state.rotations
    data.update(
        level=_LEVEL_NAMES[level],
        problems=problems,
        access_expires_at=format_time(tokens.access_expires_at),
        access_expires_in=int(access_left),
        refresh_expires_at=format_time(tokens.refresh_expires_at),
        refresh_expires_in=int(refresh_left),
        refresh_expiry_estimated=tokens.refresh_expiry_estimated,
        refreshed_at=format_time(state.refreshed_at) if state.refreshed_at else None,
        generation=state.generation,
        rotations=len(rotations),
        last_rotation_at=format_time(rotations[-1].at) if rotations else None,
        relogin_reason=state.relogin_reason,
        user_id=state.user_id,
        access_fingerprint=tokens.access_fingerprint,
        refresh_fingerprint=tokens.refresh_fingerprint,
    )
    return Assessment(name, level, problems, state, data)


def _grade_refresh_left(
    name: str, refresh_left: float, level: int, problems: list[str], *, warn: float, crit: float
) -> int:
    """Apply the refresh-token ladder (expired / < crit / < warn); return the new level."""
    login_cmd = f"kakao-tokend login{_account_flag(name)}"
    if refresh_left <= 0:
        problems.append(f"refresh token expired; run `{login_cmd}`")
        return EXIT_CRITICAL
    if refresh_left < crit:
        problems.append(
            f"refresh token expires in {format_duration(refresh_left)}; run `{login_cmd}` soon"
        )
        return EXIT_CRITICAL
    if refresh_left < warn:
        problems.append(f"refresh token expires in {format_duration(refresh_left)}")
        return max(level, EXIT_WARNING)
    return level


def _account_flag(name: str) -> str:
    return "" if name == "default" else f" --account {name}"


def _assessment_lines(item: Assessment, now: datetime) -> list[str]:
    level = _LEVEL_NAMES[item.level].upper()
    lines = [f"{item.account}: {level}", *(item.lines or [])]
    state = item.state
    if state is not None:
        tokens = state.tokens
        access_left = tokens.access_remaining(now).total_seconds()
        refresh_left = tokens.refresh_remaining(now).total_seconds()
        access_when = f"in {format_duration(access_left)}" if access_left > 0 else "EXPIRED"
        estimated = ", estimated" if tokens.refresh_expiry_estimated else ""
        refresh_when = (
            f"in {format_duration(refresh_left)}{estimated}" if refresh_left > 0 else "EXPIRED"
        )
        last = format_time(state.refreshed_at) if state.refreshed_at else "never"
        rotation = (
            f"{len(state.rotations)} (last {format_time(state.rotations[-1].at)})"
            if state.rotations
            else "0"
        )
        lines += [
            f"  access token:  expires {format_time(tokens.access_expires_at)} ({access_when})",
            f"  refresh token: expires {format_time(tokens.refresh_expires_at)} ({refresh_when})",
            f"  last refresh:  {last}",
            f"  generation:    {state.generation}",
            f"  rotations:     {rotation}",
        ]
        if state.relogin_reason:
            lines.append(f"  relogin:       {state.relogin_reason}")
    lines += [f"  ! {problem}" for problem in item.problems]
    return lines


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--warn",
    type=DURATION,
    default="14d",
    help="Warn (exit 1) when the refresh token has less than this left.",
)
@click.option(
    "--crit",
    type=DURATION,
    default="3d",
    help="Critical (exit 2) when the refresh token has less than this left.",
)
def status(as_json: bool, warn: float, crit: float) -> None:
    """Show token expiries per account; exit 0 ok, 1 warning, 2 critical.

    Without --account every configured account is shown and the worst level decides the
    exit code, so it works as a monitoring (Nagios/Icinga-style) check.

    \b
    Example:
      kakao-tokend status
      kakao-tokend status --json | jq '.accounts[].refresh_expires_in'
    """
    from .store import AccountStore

    settings = _settings()
    config = settings.config(secrets=False)  # status needs paths only, never a secret
    names = [settings.account_name()] if settings.account else list(config.accounts)
    now = utcnow()
    results: list[Assessment] = []
    remote = _via_daemon(config, "GET", "/v1/status")
    if remote is not None and remote[0] == 200:
        described = {item["account"]: item for item in remote[1].get("accounts", [])}
        results = [
            assess_described(described[name], now, warn=warn, crit=crit)
            for name in names
            if name in described
        ]
        names = [name for name in names if name not in described]
    for name in names:
        store = AccountStore(config.accounts[name])
        load_error: str | None = None
        try:
            state = store.load()
        except StoreError as exc:
            state, load_error = None, str(exc)
        results.append(assess(name, state, now, warn=warn, crit=crit, load_error=load_error))
    for item in results:
        # What the daemon alerted about and has not seen cleared yet (its bookkeeping file).
        item.data["alerts"] = _current_alerts(config.accounts[item.account], item.state, now)
    worst = max(item.level for item in results)
    if config.source is None and any(item.state is None and item.lines is None for item in results):
        # "run `kakao-tokend login`" alone would fail next: there is no config to log in with.
        from .paths import config_search_path

        looked = ", ".join(str(p) for p in config_search_path(os.environ))
        click.echo(
            f"note: no config file found (looked in: {looked}); `kakao-tokend login` needs one:"
            " copy config.example.toml there or pass --config FILE",
            err=True,
        )
    if as_json:
        document = {
            "level": _LEVEL_NAMES[worst],
            "exit_code": worst,
            "checked_at": format_time(now),
            "source": "daemon" if remote is not None and remote[0] == 200 else "files",
            "accounts": [item.data for item in results],
        }
        click.echo(json.dumps(document, indent=2))
    else:
        for item in results:
            for line in _assessment_lines(item, now):
                click.echo(line)
            for alert in item.data["alerts"]:
                click.echo(
                    f"  alert: {alert['severity']} {alert['condition']} since {alert['since']}:"
                    f" {alert['message']}"
                )
    click.get_current_context().exit(worst)


# --------------------------------------------------------------------------- refresh / token


async def _managed_refresh(
    account: AccountConfig,
    config: Config,
    *,
    min_valid: float | None,
    lock_timeout: float = 5.0,
) -> tuple[AccountState, bool, bool]:
    """Refresh one account through the daemon's AccountManager; return (state, refreshed, rotated).

    ``min_valid`` None forces a refresh; otherwise it happens only when the access token has
    less than that many seconds left (checked again under the lock, so concurrent callers
    refresh once).
    """
    from .kakao import KakaoClient, create_session
    from .refresher import AccountManager, Health
    from .store import AccountStore

    store = AccountStore(account)
    with store.lock(timeout=lock_timeout):
        async with create_session() as session:
            manager = AccountManager(
                account,
                store=store,
                client=KakaoClient(session, account.app),
                policy=config.refresh,
            )
            before = manager.load()
            status = manager.status
            if before is None:
                if status.health is Health.RELOGIN:  # unreadable state, moved aside
                    raise StateCorrupt(
                        status.last_error or "state unreadable",
                        path=store.state_path,
                        quarantined=None,
                    )
                raise StateMissing(
                    f"account '{account.name}' has no tokens yet",
                    hint=f"run `kakao-tokend login{_account_flag(account.name)}`",
                )
            if before.relogin_reason:
                raise ReloginRequired(
                    f"account '{account.name}' needs a new login: {before.relogin_reason}"
                )
            now = utcnow()
            if (
                min_valid is not None
                and before.tokens.access_remaining(now).total_seconds() >= min_valid
            ):
                return before, False, False
            after = await manager.refresh(force=True, reason="kakao-tokend CLI")
            for _ in range(3):
                if manager.flush():
                    break
                await asyncio.sleep(0.5)
            else:
                raise StoreWriteError(
                    f"the new tokens of account '{account.name}' could not be saved: "
                    f"{status.write_error}; they are lost when this command exits",
                    hint="free disk space / fix permissions, then run `kakao-tokend login`",
                )
    label = status.last_error_class or ""
    message = status.last_error or "refresh failed"
    if status.health is Health.RETRYING:
        if label == "lock_busy":
            raise StoreLocked(message)
        raise KakaoUnavailable(f"refresh failed: {message}", hint="try again later")
    if status.health is Health.RELOGIN:
        raise ReloginRequired(
            f"Kakao refused the refresh: {message}",
            hint=f"run `kakao-tokend login{_account_flag(account.name)}`",
        )
    if status.health is Health.CONFIG:
        raise KakaoConfigError(f"Kakao refused the refresh: {message}")
    if after is None:
        raise StateMissing(f"account '{account.name}' has no tokens")
    rotated = after.tokens.refresh_token != before.tokens.refresh_token
    return after, True, rotated


LOCK_TIMEOUT_OPTION = click.option(
    "--lock-timeout",
    type=DURATION,
    default="5s",
    help="How long to wait for another kakao-tokend process holding the account lock.",
)


@main.command()
@LOCK_TIMEOUT_OPTION
def refresh(lock_timeout: float) -> None:
    """Refresh the access token now (under the account lock), then publish it.

    The new state is saved before the token file is published. Refuses with exit 75 when
    another kakao-tokend process holds the account's lock for more than a few seconds.

    \b
    Example:
      kakao-tokend refresh
      kakao-tokend --account bot refresh
    """
    settings = _settings()
    name = settings.account_name()
    remote = _via_daemon(settings.config(secrets=False), "POST", f"/v1/accounts/{name}/refresh")
    if remote is not None:
        code, body = remote
        if code != 200:
            raise _daemon_failure(name, code, body)
        click.echo(
            f"refreshed {name} (by the daemon): access token expires"
            f" {body['access_expires_at']} (in {format_duration(body['access_expires_in'])});"
            f" refresh token {'ROTATED' if body.get('rotated') else 'unchanged'}, expires"
            f" {body['refresh_expires_at']} (in {format_duration(body['refresh_expires_in'])}"
            f"{', estimated' if body.get('refresh_expiry_estimated') else ''});"
            f" generation {body['generation']}"
        )
        return
    account = settings.account_config()
    state, _, rotated = _run_async(
        _managed_refresh(account, settings.config(), min_valid=None, lock_timeout=lock_timeout)
    )
    _tell_daemon(account.name)
    now = utcnow()
    tokens = state.tokens
    click.echo(
        f"refreshed {account.name}: access token expires {format_time(tokens.access_expires_at)}"
        f" (in {format_duration(tokens.access_remaining(now).total_seconds())}); "
        f"refresh token {'ROTATED' if rotated else 'unchanged'}, expires "
        f"{format_time(tokens.refresh_expires_at)} "
        f"(in {format_duration(tokens.refresh_remaining(now).total_seconds())}"
        f"{', estimated' if tokens.refresh_expiry_estimated else ''}); "
        f"generation {state.generation}"
    )


@main.command()
@click.option(
    "--min-valid",
    type=DURATION,
    default="60s",
    help="Refresh first when the access token has less than this left.",
)
@LOCK_TIMEOUT_OPTION
def token(min_valid: float, lock_timeout: float) -> None:
    """Print the current access token (only the token) for use in scripts.

    Refreshes first (under the account lock) when the token expires within --min-valid.

    \b
    Example:
      curl -H "Authorization: Bearer $(kakao-tokend token)" https://kapi.kakao.com/v2/user/me
      kakao-tokend token --min-valid 10m
    """
    from .store import AccountStore

    settings = _settings()
    name = settings.account_name()
    remote = _via_daemon(
        settings.config(secrets=False),
        "GET",
        f"/v1/accounts/{name}/token",
        params={"min_valid": f"{min_valid:g}"},
    )
    if remote is not None:
        code, body = remote
        if code != 200:
            raise _daemon_failure(name, code, body)
        click.echo(body["access_token"])
        return
    account = settings.account_config()
    try:
        state, _, _ = _run_async(
            _managed_refresh(
                account, settings.config(), min_valid=min_valid, lock_timeout=lock_timeout
            )
        )
    except (KakaoUnavailable, StoreLocked) as exc:
        # Kakao is down or the daemon is mid-refresh: a token that still works beats none.
        fallback = AccountStore(account).load()
        if fallback is None or fallback.tokens.access_remaining(utcnow()).total_seconds() <= 0:
            raise
        left = format_duration(fallback.tokens.access_remaining(utcnow()).total_seconds())
        click.echo(
            f"warning: could not refresh ({exc}); using the current token ({left} left)", err=True
        )
        state = fallback
    if state.tokens.access_remaining(utcnow()).total_seconds() <= 0:
        raise KakaoUnavailable(f"account '{account.name}': the access token is expired")
    click.echo(state.tokens.access_token)


def _via_daemon(
    config: Config, method: str, path: str, *, params: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]] | None:
    """Ask the running daemon over its socket; None when no daemon runs (use the files)."""
    from .apiclient import DaemonNotRunning, call, daemon_running, socket_path

    sock = socket_path(config)
    if not daemon_running(sock):
        return None
    try:
        return _run_async(call(sock, method, path, params=params))
    except DaemonNotRunning:
        return None


def _tell_daemon(name: str) -> None:
    """Tell a running daemon that this command rewrote (or removed) the account's state.

    Best effort and quick: the daemon takes the new tokens over before this command returns.
    When the socket is out of reach (another user, no daemon) nothing is said; a running
    daemon then notices the file through its watch on the state directory.
    """
    from .apiclient import call, daemon_running, socket_path

    try:
        sock = socket_path(_settings().config(secrets=False))
        if daemon_running(sock):
            _run_async(call(sock, "POST", f"/v1/accounts/{name}/reread", timeout=10.0))
    except Exception as exc:  # never fail a login that worked because of this courtesy call
        logging.getLogger(__name__).debug("could not tell the daemon: %r", exc)


def _daemon_failure(name: str, code: int, body: dict[str, Any]) -> KakaoTokendError:
    """Turn a daemon's error answer into the error (and so the exit code) of the CLI."""
    message = str(body.get("error") or body.get("last_error") or f"HTTP {code}")
    health = body.get("health")
    if code == 409:
        return StateMissing(message, hint=f"run `kakao-tokend login{_account_flag(name)}`")
    if health == "relogin":
        return ReloginRequired(
            f"Kakao refused the refresh: {message}",
            hint=f"run `kakao-tokend login{_account_flag(name)}`",
        )
    if health == "config":
        return KakaoConfigError(f"Kakao refused the refresh: {message}")
    if code == 404 or code == 400:
        return KakaoTokendError(f"the daemon refused the request: {message}")
    return KakaoUnavailable(f"the daemon could not get a token for {name}: {message}")


def assess_described(
    item: dict[str, Any],
    now: datetime,
    *,
    warn: float = WARN_REFRESH_LEFT,
    crit: float = CRIT_REFRESH_LEFT,
) -> Assessment:
    """Grade one account from the daemon's /v1/status entry (same levels as ``assess``)."""
    name = str(item["account"])
    flag = _account_flag(name)
    health = item.get("health", "ok")
    data: dict[str, Any] = {"account": name, "health": health}
    if "access_expires_in" not in item:
        problem = f"no tokens: run `kakao-tokend login{flag}`"
        data.update(level="critical", problems=[problem])
        return Assessment(name, EXIT_CRITICAL, [problem], None, data, lines=[])
    access_left = float(item["access_expires_in"])
    refresh_left = float(item["refresh_expires_in"])
    level = EXIT_OK
    problems: list[str] = []
    if item.get("relogin_reason"):
        level = EXIT_CRITICAL
        problems.append(f"re-login needed: {item['relogin_reason']}")
    elif health == "relogin":
        level = EXIT_CRITICAL
        problems.append(
            f"re-login needed: {item.get('last_error')}; run `kakao-tokend login{flag}`"
        )
    if health == "config":
        level = EXIT_CRITICAL
        problems.append(f"Kakao says the configuration is wrong: {item.get('last_error')}")
    level = _grade_refresh_left(name, refresh_left, level, problems, warn=warn, crit=crit)
    if health == "retrying" and level < EXIT_CRITICAL:
        level = max(level, EXIT_WARNING)
        problems.append(
            f"refresh failing ({item.get('last_error_class')}): {item.get('last_error')};"
            f" next try {item.get('next_attempt_at')}"
        )
    if access_left <= 0 and level < EXIT_CRITICAL:
        level = max(level, EXIT_WARNING)
        problems.append("access token expired")
    rotations = item.get("rotations") or []
    data.update(
        level=_LEVEL_NAMES[level],
        problems=problems,
        access_expires_at=item["access_expires_at"],
        access_expires_in=int(access_left),
        refresh_expires_at=item["refresh_expires_at"],
        refresh_expires_in=int(refresh_left),
        refresh_expiry_estimated=item.get("refresh_expiry_estimated"),
        refreshed_at=item.get("refreshed_at"),
        next_refresh_at=item.get("next_refresh_at"),
        generation=item.get("generation"),
        rotations=len(rotations),
        last_rotation_at=rotations[-1]["at"] if rotations else None,
        relogin_reason=item.get("relogin_reason"),
        user_id=item.get("user_id"),
        access_fingerprint=item.get("access_fingerprint"),
        refresh_fingerprint=item.get("refresh_fingerprint"),
    )
    access_when = f"in {format_duration(access_left)}" if access_left > 0 else "EXPIRED"
    estimated = ", estimated" if item.get("refresh_expiry_estimated") else ""
    refresh_when = (
        f"in {format_duration(refresh_left)}{estimated}" if refresh_left > 0 else "EXPIRED"
    )
    lines = [
        f"  access token:  expires {item['access_expires_at']} ({access_when})",
        f"  refresh token: expires {item['refresh_expires_at']} ({refresh_when})",
        f"  last refresh:  {item.get('refreshed_at') or 'never'}",
        f"  next refresh:  {item.get('next_refresh_at') or '-'}",
        f"  generation:    {item.get('generation')}",
        f"  rotations:     {len(rotations)}"
        + (f" (last {rotations[-1]['at']})" if rotations else ""),
        f"  daemon:        running, health {health}",
    ]
    return Assessment(name, level, problems, None, data, lines=lines)


@main.command()
def reload() -> None:
    """Make the running daemon re-read its configuration; return once it has (ExecReload).

    Exit 0 when the new configuration is in effect, 1 when the daemon refused it (it keeps
    the previous one; the reason is printed) or is not running.

    \b
    Example:
      kakao-tokend reload
    """
    from .apiclient import call, daemon_running, socket_path_without_secrets

    # No load_config here: the daemon re-reads (and checks) the configuration itself, and an
    # ExecReload= process may not be able to read the credentials (systemd 252, #35227).
    sock = socket_path_without_secrets(_settings().config_path)
    if not daemon_running(sock):
        _fail(f"kakao-tokend is not running (nothing answers on {sock})")
        click.get_current_context().exit(EXIT_FAILURE)
    code, body = _run_async(call(sock, "POST", "/v1/reload"))
    if code == 200 and body.get("ok"):
        click.echo(str(body.get("message") or "reloaded"))
        return
    _fail(f"reload refused, the daemon keeps its previous configuration: {body.get('message')}")
    click.get_current_context().exit(EXIT_FAILURE)


# --------------------------------------------------------------------------- logout


@main.command()
@click.option("--keep-files", is_flag=True, help="Log out at Kakao but keep the local files.")
def logout(keep_files: bool) -> None:
    """Log out at Kakao (best effort), then delete the account's state and token files.

    \b
    Example:
      kakao-tokend logout
      kakao-tokend --account bot logout --keep-files
    """
    from .kakao import AccessTokenRejected, KakaoClient, create_session
    from .store import AccountStore

    settings = _settings()
    account = settings.account_config()
    store = AccountStore(account)
    existing: list[Path] = []
    # Under the account lock, so the tokens read are the newest (a refresh in flight ends
    # first). The files go, and a running daemon is told, BEFORE Kakao revokes the tokens:
    # the daemon never hands out a token that is already dead.
    with store.lock(timeout=5.0):
        try:
            state = store.load()
        except StateCorrupt as exc:
            click.echo(f"warning: {exc}", err=True)
            state = None
        if not keep_files:
            existing = [path for path in (store.state_path, store.token_path) if path.exists()]
            store.remove()
    if not keep_files:
        _tell_daemon(account.name)
    if state is None:
        click.echo(f"account '{account.name}' has no tokens; nothing to log out at Kakao")
    else:

        async def go() -> int:
            async with create_session() as session:
                return await KakaoClient(session, account.app).logout(state.tokens.access_token)

        try:
            user_id = _run_async(go())
        except AccessTokenRejected:
            click.echo("Kakao no longer accepts the access token; it was already logged out")
        except (KakaoUnavailable, KakaoRequestRejected, KakaoConfigError, ReloginRequired) as exc:
            click.echo(
                f"warning: could not log out at Kakao ({exc}); the tokens stay valid there "
                "until they expire",
                err=True,
            )
        else:
            click.echo(f"logged out at Kakao (user {user_id})")
    if keep_files:
        click.echo(f"kept {store.state_path} and {store.token_path}")
        return
    if existing:
        click.echo("removed " + " and ".join(str(path) for path in existing))
    else:
        click.echo(f"no files to remove for account '{account.name}'")


# --------------------------------------------------------------------------- daemon / tools


# --------------------------------------------------------------------------- alerts


def _active_alerts(account: AccountConfig) -> list[dict[str, Any]]:
    from .alerts import active_alerts
    from .store import AccountStore

    return active_alerts((AccountStore(account).load_alerts() or {}).get("active") or {})


def _current_alerts(
    account: AccountConfig, state: AccountState | None, now: datetime
) -> list[dict[str, Any]]:
    """The daemon's recorded alerts, minus those about tokens a login or import replaced.

    With no daemon running (or one that has not seen the new state yet) the bookkeeping can
    still list `no_tokens`, `relogin` or `refresh_expiry` for the old tokens; next to the new
    state's OK they would only mislead. A daemon re-evaluates them (and announces the
    resolution) as soon as it sees the new state.
    """
    alerts = _active_alerts(account)
    if state is None:
        return alerts
    stale = {"no_tokens"}
    if not state.relogin_reason:
        stale.add("relogin")
    left = state.tokens.refresh_remaining(now).total_seconds()
    if left > 0 and not any(left < threshold for threshold in account.alerts.thresholds):
        stale.add("refresh_expiry")
    return [alert for alert in alerts if alert["condition"] not in stale]


@main.group()
def alerts() -> None:
    """Alert channels (KakaoTalk, webhook, command; configured in [alerts])."""


@alerts.command("test")
def alerts_test() -> None:
    """Send a test alert through every configured channel; exit 0 if all worked, else 1.

    Without --account every account's channels are tried. KakaoTalk uses the account's
    stored access token as it is (no refresh).

    \b
    Example:
      kakao-tokend alerts test
      kakao-tokend --account shop alerts test
    """
    from .alerts import send_test
    from .kakao import KakaoClient, create_session
    from .store import AccountStore

    settings = _settings()
    config = settings.config()
    names = [settings.account_name()] if settings.account else list(config.accounts)

    async def go() -> list[tuple[str, list[tuple[str, str | None, bool]]]]:
        session = create_session()
        try:
            results = []
            for name in names:
                account = config.accounts[name]
                try:
                    state = AccountStore(account).load()
                except StoreError:
                    state = None
                client = KakaoClient(session, account.app)
                results.append(
                    (name, await send_test(account, session=session, state=state, client=client))
                )
            return results
        finally:
            await session.close()

    failed = 0
    for name, channels in _run_async(go()):
        for channel, reason, skipped in channels:
            if skipped:
                click.echo(f"{name}: {channel}: skipped ({reason})")
            elif reason is None:
                click.echo(f"{name}: {channel}: ok")
            else:
                failed += 1
                click.echo(f"{name}: {channel}: FAILED: {reason}")
    click.get_current_context().exit(EXIT_FAILURE if failed else EXIT_OK)


@main.command()
def run() -> None:
    """Run the daemon in the foreground (what the systemd unit starts).

    \b
    Example:
      kakao-tokend --config /etc/kakao-tokend/config.toml run
    """
    from .service import run as run_service

    settings = _settings()
    code = run_service(settings.config_path, account=settings.account)
    click.get_current_context().exit(code)


@main.command()
@click.option(
    "--duration", type=DURATION, default="60s", help="How long the demo runs (0: until Ctrl+C)."
)
def demo(duration: float) -> None:
    """Show the daemon at work against the built-in Kakao emulator (no Kakao account needed).

    \b
    Example:
      kakao-tokend demo --duration 30s
    """
    from .demo import run_demo

    click.get_current_context().exit(run_demo(duration))


@main.command()
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8790, help="Port to listen on.")
@click.option("--access-lifetime", type=DURATION, default="21599s", help="Access token lifetime.")
@click.option(
    "--refresh-lifetime", type=DURATION, default="5183999s", help="Refresh token lifetime."
)
@click.option(
    "--rotation-window",
    type=DURATION,
    default="30d",
    help="Refresh tokens with less than this left are rotated on refresh.",
)
@click.option(
    "--consent",
    type=click.Choice(["auto", "page"]),
    default="auto",
    help="auto: redirect at once; page: show a consent page with Agree/Cancel.",
)
@click.option(
    "--client-secret",
    default="emulator-client-secret",
    show_default=False,
    help="Client secret the emulator expects ('' for none).",
)
def emulator(
    host: str,
    port: int,
    access_lifetime: float,
    refresh_lifetime: float,
    rotation_window: float,
    consent: str,
    client_secret: str,
) -> None:
    """Run the Kakao emulator (kauth + kapi on one port) in the foreground.

    Point a config at it with auth_url = api_url = the printed URL and
    rest_api_key = "emulator-rest-key".

    \b
    Example:
      kakao-tokend emulator --port 8790 --access-lifetime 60s --rotation-window 59d
    """
    from .emulator import EmulatorSettings, serve_emulator

    emu_settings = EmulatorSettings(
        access_lifetime=access_lifetime,
        refresh_lifetime=refresh_lifetime,
        rotation_window=rotation_window,
        consent="page" if consent == "page" else "auto",
        client_secret=client_secret or None,
    )
    try:
        serve_emulator(host, port, emu_settings, announce=click.echo)
    except OSError as exc:
        raise KakaoTokendError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="pick another --port",
        ) from None


__all__ = ["assess", "exit_code_for", "main"]
