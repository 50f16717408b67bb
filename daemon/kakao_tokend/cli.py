"""The `kakao-tokend` command line: the only place that prints for humans and picks exit codes.

The exit codes and what each means are in :mod:`~kakao_tokend.exitcodes` (and the README).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from . import __version__
from .errors import (
    ConfigError,
    ImportFileError,
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
    TokenDecryptError,
    write_fix,
)
from .exitcodes import (
    CRITICAL,
    EX_SOFTWARE,
    EX_USAGE,
    FAILURE,
    INTERRUPTED,
    OK,
    WARNING,
    exit_code_for,
)
from .tokens import (
    default_min_valid,
    format_duration,
    format_local_time,
    format_time,
    min_valid_problem,
    no_token_valid_for,
    parse_time,
    plain_seconds,
    utcnow,
)

if TYPE_CHECKING:  # kept lazy at run time so `--help` and `--version` stay fast
    from .config import AccountConfig, Config
    from .importer import ImportResult
    from .state import AccountState
    from .tokens import TokenSet

T = TypeVar("T")


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
        from . import supervisor
        from .config import load_config

        if self._config is None and secrets:
            self._config = load_config(self.config_path)
        elif self._config is None and self._paths_config is None:
            self._paths_config = load_config(self.config_path, with_secrets=False)
        config = self._config or self._paths_config
        assert config is not None
        # A command from a shell names the unit that runs this config's daemon (its log, its
        # restart), not this process: `run` finds its own (service.run).
        supervisor.use(supervisor.for_config(config.source))
        return config

    def account_name(self) -> str:
        """Return the selected account: --account, else the config's default account."""
        config = self.config(secrets=False)
        name = self.account or config.default_account
        if name not in config.accounts:
            raise click.UsageError(_unknown_account(config, name))
        return name

    def account_config(self) -> AccountConfig:
        """Return the selected account's configuration."""
        return self.config().accounts[self.account_name()]


def _unknown_account(config: Config, name: str) -> str:
    """Say that ``name`` is not configured, and print the exact lines that would add it.

    Printing beats editing the file for the user: a system config is root's and read-only for
    the service user, a TOML rewrite would lose the comments, and the running daemon needs a
    reload anyway. The first [accounts.NAME] table replaces the implicit "default" account,
    so that one is named too when the file has no [accounts] yet.
    """
    import tomllib

    from .config import ACCOUNT_NAME_RE
    from .relogin import config_command

    message = f"unknown account {name!r}; configured accounts: {', '.join(config.accounts)}"
    if not ACCOUNT_NAME_RE.match(name):
        return message + (
            "; a new account's name must be 1-32 lowercase letters, digits, '_' or '-'"
        )
    explicit = False
    if config.source is not None:
        try:
            explicit = "accounts" in tomllib.loads(config.source.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            explicit = True  # it loaded a moment ago; do not guess a second table
    lines = [] if explicit else ["[accounts.default]"]
    lines.append(f"[accounts.{name}]")
    where = str(config.source) if config.source is not None else "a config file (see --config)"
    command = config_command(next(iter(config.accounts.values())), "reload")
    reload = f"then run the command again (and `{command}` if the daemon runs)"
    return (
        f"{message}. To add it, append these lines to {where}, {reload}:\n\n"
        + "\n".join(lines)
        + "\n\n(An account of another Kakao app also needs its own"
        f" [accounts.{name}.kakao] with rest_api_key_file or rest_api_key_credential.)"
    )


def _settings() -> Settings:
    return click.get_current_context().find_object(Settings) or Settings(None, None, False)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    # asyncio (with ssl) is imported by the commands that run a loop, not by every command:
    # `status`, `check-config` and the daemon's socket client never need it.
    import asyncio

    return asyncio.run(coro)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)


def _refuse_unsafe_paths(account: AccountConfig, config: Config) -> None:
    """Fail before any work (UnsafePath, exit 78) when another user could redirect the files,
    the runtime directory's rescue file among them.

    Commands that write the account's files check again when they take its lock.
    """
    from .store import AccountStore

    AccountStore(account, rescue_dir=config.runtime_dir).check_paths()


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
            _fail(_with_login_fix(exc, ctx))
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as exc:
            if debug:
                traceback.print_exc(file=sys.stderr)
            name = type(exc).__name__
            click.echo(
                f"internal error: {name}: {exc} (run with --debug for the traceback)", err=True
            )
            ctx.exit(EX_SOFTWARE)


def _with_login_fix(exc: KakaoTokendError, ctx: click.Context) -> str:
    """Return the error's text; for dead tokens with the account's login command, said once.

    Kakao's client cannot name the account, so its ReloginRequired errors carry no command;
    the CLI adds it here unless the message already says it.
    """
    text = str(exc)
    if not isinstance(exc, ReloginRequired | StateMissing):
        return text
    settings = ctx.find_object(Settings)
    if settings is None:
        return text
    try:
        config = settings.config(secrets=False)
        account = config.accounts[settings.account or config.default_account]
    except (KakaoTokendError, KeyError):
        return text
    return _said_once(text, _login_command(account))


def _said_once(text: str, command: str) -> str:
    """Return ``text`` ending with ``command`` (a login command), unless it names one."""
    if command in text:
        return text
    return f"{text}; run `{command}`"


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
    import platform  # here: it compiles a dozen regular expressions, every command paid for it

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
    # A directory is judged by the loader (one line, exit 78), not click (usage, exit 64).
    type=click.Path(path_type=Path),
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
    from .doctor import check_group_access, check_outputs
    from .exitcodes import CRITICAL

    settings = _settings()
    config = settings.config()
    outputs = check_outputs(config)
    refused = [finding for finding in outputs if finding.level == CRITICAL]
    if refused:  # `run` would refuse them
        raise ConfigError(
            "tokens would be published where every local user may write",
            details=[(f.name, f"{f.detail} ({f.fix})" if f.fix else f.detail) for f in refused],
        )
    names = ", ".join(config.accounts)
    where = f" from {config.source}" if config.source else " (no config file; defaults)"
    click.echo(
        f"config OK{where}: {len(config.accounts)} account(s): {names}; state in {config.state_dir}"
    )
    # Outside systemd nobody prepares the directories; a consumer's own one is fine, but said.
    for finding in [*check_group_access(config), *outputs]:
        if finding.level:
            fix = f"; run: {finding.fix}" if finding.fix else ""
            click.echo(f"warning: {finding.name}: {finding.detail}{fix}", err=True)
    from .config import kakaotalk_only_warning, plain_http_warning

    plain_http = plain_http_warning(config.api)
    if plain_http is not None:
        click.echo(f"warning: {plain_http}", err=True)
    for account in config.accounts.values():
        kakaotalk_only = kakaotalk_only_warning(account)
        if kakaotalk_only is not None:
            problem, fix = kakaotalk_only
            click.echo(f"warning: account {account.name}: {problem}; {fix}", err=True)


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
        f"  access token expires {format_local_time(tokens.access_expires_at)} "
        f"(in {format_duration(tokens.access_remaining(now).total_seconds())})",
        f"  refresh token expires {format_local_time(tokens.refresh_expires_at)} "
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
@click.option(
    "--switch-user",
    is_flag=True,
    help="Accept a Kakao user other than the one whose tokens the account holds (refused"
    " otherwise).",
)
def login(no_browser: bool, scopes: Sequence[str], timeout: float, switch_user: bool) -> None:
    """Log in with Kakao once (PKCE) and store the tokens for the daemon.

    Prints the Kakao authorize URL, serves the redirect URI from the config on this machine
    (e.g. http://127.0.0.1:8765/callback), exchanges the code, calls /v2/user/me once (Kakao
    unlinks users who never do) and writes the state and token files. A fresh login replaces
    the account's previous tokens, when it is for the same Kakao user (--switch-user: any).

    \b
    Example:
      kakao-tokend login                       # opens a browser on this machine
      kakao-tokend login --no-browser          # on a server: paste the redirect address
      ssh -L 8765:127.0.0.1:8765 server        # ...or forward the port, then open the URL
    """
    from .login import LoginFlow

    settings = _settings()
    account = settings.account_config()
    config = settings.config()
    in_store = config.store.backend == "postgres"

    async def to_store(
        tokens: TokenSet,
        user_id: int | None,
        now: datetime,
        check: Callable[[AccountState | None], None],
    ) -> AccountState:
        from .fleet.commands import save_login

        return await save_login(config, account, tokens, user_id, now, check)

    if in_store:
        from .fleet.commands import check_login

        # Before anyone logs in at Kakao: a row this host cannot decrypt is refused.
        _run_async(check_login(config, account))
    else:
        _refuse_unsafe_paths(account, config)
    flow = LoginFlow(
        account,
        scopes=scopes,
        persist=to_store if in_store else None,
        switch_user=switch_user,
    )

    def notify(line: str) -> None:
        click.echo(line, err=True)

    opener: Callable[[str], object] | None = None
    if not no_browser and _display_available():
        import webbrowser  # only `login` opens a browser

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
    if in_store:
        click.echo(
            f"stored in the PostgreSQL store as generation {state.generation}; every node"
            " publishes it within a second"
        )
    else:
        for line in _describe_files(state, account):
            click.echo(line)
    if state.tokens.refresh_expiry_estimated:
        click.echo(
            "warning: Kakao's answer did not say how long the refresh token lives; its expiry"
            " is estimated as Kakao's documented 60 days until the first rotation brings"
            f" Kakao's own — `{_status_command(account)}` shows it",
            err=True,
        )
    if result.user_me_problem:
        click.echo(
            f"warning: could not call /v2/user/me ({result.user_me_problem}); Kakao unlinks "
            f"users that never call a user-info API within 24 h — run `{_status_command(account)}`"
            " and log in again if the tokens stop working",
            err=True,
        )


# --------------------------------------------------------------------------- import


@main.command("import")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--force", is_flag=True, help="Replace the account's existing tokens.")
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not ask Kakao whether the tokens still work (offline use); the daemon's first "
    "refresh will tell.",
)
def import_(path: Path, force: bool, no_verify: bool) -> None:
    """Adopt a kakao_token.json written by the popular blog scripts, once Kakao confirms it.

    The file holds Kakao's raw token response (durations only, maybe an extra app_key).
    Kakao is asked first: access_token_info while the access token may be valid, then one
    refresh (under the account lock, its answer saved at once): only a refresh tests the
    refresh token. A dead refresh token is refused with exit 77 and the login command. The
    refresh token's expiry is estimated from the file's age until the next rotation.

    \b
    Example:
      kakao-tokend import ~/my_squat/kakao_token.json
      kakao-tokend --account bot import ./kakao_token.json --force
      kakao-tokend import kakao_token.json --no-verify     # offline: check later
    """
    from .importer import import_seed_file
    from .kakao import KakaoClient, create_session

    settings = _settings()
    account = settings.account_config()
    config = settings.config()
    in_store = config.store.backend == "postgres"
    if not in_store:
        _refuse_unsafe_paths(account, config)

    async def go() -> Any:
        async with create_session() as session:
            client = KakaoClient(session, account.app)
            if in_store:
                from .fleet.commands import import_into_store

                return await import_into_store(
                    config,
                    account,
                    path,
                    client,
                    force=force,
                    verify=not no_verify,
                    login_hint=f"run `{_login_command(account)}` to get new tokens",
                )
            return await import_seed_file(
                path,
                account,
                client,
                force=force,
                verify=not no_verify,
                login_hint=f"run `{_login_command(account)}` to get new tokens",
                rescue_dir=config.runtime_dir,
            )

    result = _run_async(go())
    _tell_daemon(account.name)
    _report_import(path, account, result, in_store=in_store)


def _report_import(
    path: Path, account: AccountConfig, result: ImportResult, *, in_store: bool = False
) -> None:
    """Say what was imported, how Kakao confirmed it, and what the user must do next."""
    checked = {
        "access_token_info": "Kakao confirmed the access token (access_token_info)",
        "refresh": "Kakao accepted the refresh token (one refresh"
        + (", which ROTATED it)" if result.rotated else ")"),
        "unverified": "NOT checked with Kakao (--no-verify): the daemon's first refresh will"
        " tell whether the refresh token still works; watch"
        f" `{_status_command(account)}`",
    }[result.verified_by]
    click.echo(f"Imported {path} into account '{account.name}'; {checked}.")
    if result.replaced is not None:
        click.echo(f"the tokens it replaced are kept in {result.replaced}")
    if in_store:
        click.echo(
            f"stored in the PostgreSQL store as generation {result.state.generation}; every"
            " node publishes it within a second"
        )
    else:
        for line in _describe_files(result.state, account):
            click.echo(line)
    old_copy = (
        "its copy of the refresh token is dead now (Kakao rotated it during the check)"
        if result.rotated
        else "two refreshers sharing one refresh token kill each other's at the next rotation"
    )
    click.echo("Next:")
    click.echo(
        "  1. stop the script that refreshed this file: it must never refresh again"
        f" ({old_copy}); look in `crontab -l` (and root's: `sudo crontab -l`) and"
        " `systemctl list-timers`"
    )
    click.echo(
        f"  2. delete the old file, it holds a refresh token: rm {path}"
        f"  (or at least keep it private: chmod 600 {path})"
    )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    mode = result.file_mode
    if mode & 0o044:
        who = "every user on this machine" if mode & 0o004 else "the file's group"
        click.echo(
            f"warning: {path} is readable by {who} (mode {mode:04o}): they can read the"
            f" refresh token in it; delete it now, or chmod 600 {path}",
            err=True,
        )


# --------------------------------------------------------------------------- status


@dataclass
class AccountReport:
    """One account as `status` shows it: its grading (health.assess), facts and lines."""

    account: str
    level: int
    #: The account's entry in `status --json`.
    data: dict[str, Any]
    #: Facts about the tokens (expiries, generation, rotations ...), one per line.
    facts: list[str]
    #: The grading's conditions, most urgent first (health.Condition.to_json).
    conditions: list[dict[str, Any]]
    #: Alerts the daemon recorded that the conditions above do not already say.
    alerts: list[Mapping[str, Any]] = field(default_factory=list)
    #: Graded from the files, which hold no tokens for it.
    without_tokens: bool = False


def _local_time(text: object, missing: str = "-") -> str:
    """Show a UTC time from JSON (the daemon's answers, alert bookkeeping) in local time."""
    if not isinstance(text, str) or not text:
        return missing
    try:
        return format_local_time(parse_time(text))
    except ValueError:
        return text


def _login_command(account: AccountConfig) -> str:
    """The exact login command for ``account`` (its one home is relogin.login_command)."""
    from .relogin import login_command

    return login_command(account)


def _status_command(account: AccountConfig) -> str:
    """The exact `status` command for ``account`` (relogin.cli_command)."""
    return _cli_command(account, "status")


def _cli_command(account: AccountConfig, command: str) -> str:
    """The exact `kakao-tokend … COMMAND` for ``account`` (relogin.cli_command)."""
    from .relogin import cli_command

    return cli_command(account, command)


def _token_facts(data: dict[str, Any], rotation_times: Sequence[str]) -> list[str]:
    """The lines about the tokens, from the JSON both the daemon and the files give."""
    if "access_expires_in" not in data:
        return []
    access_left = float(data["access_expires_in"])
    refresh_left = float(data["refresh_expires_in"])
    access_when = f"in {format_duration(access_left)}" if access_left > 0 else "EXPIRED"
    estimated = ", estimated" if data.get("refresh_expiry_estimated") else ""
    refresh_when = (
        f"in {format_duration(refresh_left)}{estimated}" if refresh_left > 0 else "EXPIRED"
    )
    lines = [
        f"  access token:  expires {_local_time(data['access_expires_at'])} ({access_when})",
        f"  refresh token: expires {_local_time(data['refresh_expires_at'])} ({refresh_when})",
        f"  last refresh:  {_local_time(data.get('refreshed_at'), 'never')}",
    ]
    if "next_refresh_at" in data:
        lines.append(f"  next refresh:  {_local_time(data.get('next_refresh_at'))}")
    lines += [
        f"  generation:    {data.get('generation')}",
        f"  rotations:     {len(rotation_times)}"
        + (f" (last {_local_time(rotation_times[-1])})" if rotation_times else ""),
    ]
    return lines


def _problems(conditions: Sequence[dict[str, Any]]) -> list[str]:
    """Each condition as one line, its fix after it; a command already given is not repeated.

    A dead refresh token is both a re-login and an expired token: the login command is said
    once, after the first condition it fixes.
    """
    said: set[str] = set()
    lines = []
    for condition in conditions:
        command = condition.get("command")
        if command is not None and command in said:
            lines.append(str(condition["message"]))
            continue
        if command is not None:
            said.add(command)
        lines.append(f"{condition['message']}; fix: {condition['fix']}")
    return lines


def _report(
    account: str,
    health: dict[str, Any],
    facts: dict[str, Any],
    rotation_times: Sequence[str],
    recorded: Sequence[Mapping[str, Any]],
) -> AccountReport:
    """Build the report from a grading (health.AccountHealth.to_json) and the token facts.

    ``recorded`` are the alerts the daemon sent and has not seen cleared; those the grading
    does not say itself are listed after it.
    """
    conditions = list(health["conditions"])
    names = {c["condition"] for c in conditions}
    level = {"ok": OK, "warning": WARNING, "critical": CRITICAL}[health["level"]]
    data = {
        "account": account,
        "level": health["level"],
        "problems": _problems(conditions),
        "conditions": conditions,
        **facts,
        "rotations": len(rotation_times),
        "last_rotation_at": rotation_times[-1] if rotation_times else None,
        "alerts": list(recorded),
    }
    return AccountReport(
        account,
        level,
        data,
        _token_facts(facts, rotation_times),
        conditions,
        # The conditions say the others already, with "alerted since".
        [a for a in recorded if a.get("condition") not in names],
    )


def _report_from_daemon(item: dict[str, Any]) -> AccountReport:
    """An account as the daemon graded it (its /v1/status entry)."""
    rotation_times = [r["at"] for r in item.get("rotations") or []]
    keys = (
        "health",
        "access_expires_at",
        "access_expires_in",
        "refresh_expires_at",
        "refresh_expires_in",
        "refresh_expiry_estimated",
        "refreshed_at",
        "next_refresh_at",
        "generation",
        "relogin_reason",
        "user_id",
        "access_fingerprint",
        "refresh_fingerprint",
    )
    facts = {key: item[key] for key in keys if key in item}
    # The daemon's grading is live: an alert it does not grade any more is about to resolve.
    report = _report(str(item["account"]), item, facts, rotation_times, item.get("alerts") or [])
    report.alerts = []
    health = item.get("health", "ok")
    daemon = f"  daemon:        running, health {health}"
    if health == "retrying":
        daemon += (
            f" ({item.get('last_error_class')}: {item.get('last_error')};"
            f" next try {_local_time(item.get('next_attempt_at'))})"
        )
    report.facts.append(daemon)
    return report


def _report_from_files(
    account: AccountConfig,
    config: Config,
    now: datetime,
    *,
    warn: float | None,
    crit: float | None,
    stored: tuple[AccountState | None, StoreError | None, str | None] | None = None,
) -> AccountReport:
    """An account graded from its files alone, or its row in the PostgreSQL store
    (``stored``: state, why unreadable, the node that refreshed it), no daemon answering."""
    from .health import assess, moved_thresholds, still_active
    from .store import AccountStore

    load_error: StoreError | None = None
    refreshed_by: str | None = None
    if stored is not None:
        state, load_error, refreshed_by = stored
    else:
        try:
            state = AccountStore(account).load(quarantine=False)  # status only looks
        except StoreError as exc:
            state, load_error = None, exc
    graded = assess(
        account,
        state,
        None,
        config.refresh,
        now,
        alerts=moved_thresholds(account.alerts, warn=warn, crit=crit),
        load_error=load_error,
    )
    facts: dict[str, Any] = {}
    rotation_times: list[str] = []
    if state is not None:
        tokens = state.tokens
        rotation_times = [format_time(r.at) for r in state.rotations]
        facts = {
            "access_expires_at": format_time(tokens.access_expires_at),
            "access_expires_in": int(tokens.access_remaining(now).total_seconds()),
            "refresh_expires_at": format_time(tokens.refresh_expires_at),
            "refresh_expires_in": int(tokens.refresh_remaining(now).total_seconds()),
            "refresh_expiry_estimated": tokens.refresh_expiry_estimated,
            "refreshed_at": format_time(state.refreshed_at) if state.refreshed_at else None,
            "generation": state.generation,
            "relogin_reason": state.relogin_reason,
            "user_id": state.user_id,
            "access_fingerprint": tokens.access_fingerprint,
            "refresh_fingerprint": tokens.refresh_fingerprint,
        }
        if refreshed_by is not None:
            facts["refreshed_by"] = refreshed_by
    recorded = still_active(_active_alerts(account), graded)
    report = _report(account.name, graded.to_json(), facts, rotation_times, recorded)
    report.without_tokens = state is None
    return report


def _report_lines(report: AccountReport) -> list[str]:
    level = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}[report.level]
    lines = [f"{report.account}: {level}", *report.facts]
    since = {a.get("condition"): a.get("since") for a in report.data["alerts"] if a.get("since")}
    for problem, condition in zip(report.data["problems"], report.conditions, strict=True):
        alerted = since.get(condition["condition"])
        said = f", alerted since {_local_time(alerted)}" if alerted else ""
        lines.append(f"  ! {condition['severity']} {condition['condition']}{said}: {problem}")
    for alert in report.alerts:
        lines.append(
            f"  alert: {alert.get('severity')} {alert.get('condition')} since"
            f" {_local_time(alert.get('since'))}: {alert.get('message')}"
        )
    return lines


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--warn",
    type=DURATION,
    default=None,
    help="Warn (exit 1) when the refresh token has less than this left"
    " (default: the longest of [alerts] thresholds).",
)
@click.option(
    "--crit",
    type=DURATION,
    default=None,
    help="Critical (exit 2) when the refresh token has less than this left"
    " (default: [alerts] critical_below).",
)
def status(as_json: bool, warn: float | None, crit: float | None) -> None:
    """Show token expiries per account; exit 0 ok, 1 warning, 2 critical.

    Without --account every configured account is shown and the worst level decides the
    exit code, so it works as a monitoring (Nagios/Icinga-style) check. The grading is the
    daemon's own (the same that drives its alerts), from the files when no daemon runs.

    \b
    Example:
      kakao-tokend status
      kakao-tokend status --json | jq '.accounts[].refresh_expires_in'
    """
    settings = _settings()
    config = settings.config(secrets=False)  # status needs paths only, never a secret
    names = [settings.account_name()] if settings.account else list(config.accounts)
    now = utcnow()
    where = _status_locations(config)
    from .apiclient import DaemonApiError, DaemonUnreachable

    params = {key: f"{value:g}" for key, value in (("warn", warn), ("crit", crit)) if value}
    silent = False
    try:
        remote = _via_daemon(
            config, "GET", "/v1/status", params=params or None, timeout=STATUS_DAEMON_WAIT
        )
    except DaemonUnreachable as exc:  # the socket refused this user: show what the files say
        click.echo(f"note: {exc}; showing the files instead", err=True)
        remote = None
        where["socket_state"] = "permission denied"
    except DaemonApiError as exc:
        if exc.status != 0:
            raise
        # Stopped (SIGSTOP) or frozen: it refreshes nothing, so this is a warning at least.
        from .supervisor import current

        log_command = current().log_command
        look = f"see `{log_command}`" if log_command else "is `kakao-tokend run` stopped?"
        click.echo(
            f"warning: the daemon did not answer within {STATUS_DAEMON_WAIT:g}s (stopped or"
            f" frozen? {look}); showing the files instead",
            err=True,
        )
        remote = None
        silent = True
        where["socket_state"] = f"no answer within {STATUS_DAEMON_WAIT:g}s"
    else:
        where["socket_state"] = "the daemon answered" if remote is not None else "no daemon"
    described: dict[str, dict[str, Any]] = {}
    if remote is not None and remote[0] == 200:
        described = {item["account"]: item for item in remote[1].get("accounts", [])}
    stored: dict[str, tuple[AccountState | None, StoreError | None, str | None]] = {}
    missing = [name for name in names if name not in described]
    if missing and config.store.backend == "postgres":
        from .fleet.commands import read_states

        stored = _run_async(read_states(settings.config(), missing))
        where["source"] = "store"
    results = [
        _report_from_daemon(described[name])
        if name in described
        else _report_from_files(
            config.accounts[name], config, now, warn=warn, crit=crit, stored=stored.get(name)
        )
        for name in names
    ]
    worst = max(item.level for item in results)
    if silent:
        worst = max(worst, WARNING)
    if config.source is None and any(item.without_tokens for item in results):
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
            "level": {OK: "ok", WARNING: "warning", CRITICAL: "critical"}[worst],
            "exit_code": worst,
            "checked_at": format_time(now),
            "source": "daemon" if described else "files",
            **where,
            "accounts": [item.data for item in results],
        }
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(f"config: {where['config'] or 'none (built-in defaults)'}")
        click.echo(f"state:  {where['state_dir']}")
        click.echo(f"socket: {where['socket']} ({where['socket_state']})")
        if silent:
            click.echo("WARNING the daemon does not answer on its socket: nothing is refreshed")
        for item in results:
            for line in _report_lines(item):
                click.echo(line)
    click.get_current_context().exit(worst)


#: How long `status` waits for the daemon's answer (it answers from memory at once): a
#: monitoring check's runner kills it after about 10 s (nrpe's default), so it must have
#: graded from the files by then. Not a refresh-path wait: the token's life does not enter.
STATUS_DAEMON_WAIT = 5.0


def _status_locations(config: Config) -> dict[str, Any]:
    """Return the config file, state directory and socket that `status` uses (it prints them)."""
    return {
        "config": str(config.source) if config.source is not None else None,
        "state_dir": str(config.state_dir),
        "socket": str(config.api_socket),
    }


# --------------------------------------------------------------------------- refresh / token


async def _managed_refresh(
    account: AccountConfig,
    config: Config,
    *,
    min_valid: float | Literal["auto"] | None,
    lock_timeout: float = 5.0,
) -> tuple[AccountState, bool, bool]:
    """Refresh one account through the daemon's AccountManager; return (state, refreshed, rotated).

    ``min_valid`` None forces a refresh; otherwise it happens only when the access token has
    less than that many seconds left (checked again under the lock, so concurrent callers
    refresh once); "auto" is the default one, fitted to the token's lifetime
    (tokens.default_min_valid, the API's ``min_valid=auto``).
    """
    import asyncio

    from .kakao import KakaoClient, create_session
    from .refresher import AccountManager
    from .status import Health
    from .store import AccountStore, make_room_before_kakao

    fleet_ctx: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
    file_lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if config.store.backend == "postgres":
        from .fleet.commands import opened

        fleet_ctx = opened(config)
    else:
        # With the daemon's rescue directory: tokens the disk refuses after Kakao rotated wait
        # there, and the next command (or the daemon's start) takes them back.
        file_store = AccountStore(account, rescue_dir=config.runtime_dir)
        file_lock = file_store.lock(timeout=lock_timeout)
    with file_lock:
        async with fleet_ctx as fleet, create_session() as session:
            store: Any = file_store if fleet is None else fleet.account_store(account)
            manager = AccountManager(
                account,
                store=store,
                client=KakaoClient(session, account.app, policy=config.refresh),
                policy=config.refresh,
            )
            if fleet is not None:
                from .fleet.node import plan_for

                store.planner = plan_for(manager)
                await fleet.reload(account.name)
                from .fleet.commands import unreadable_error

                unreadable = unreadable_error(fleet, account.name)
                if unreadable is not None:
                    raise unreadable
            before = manager.load()
            status = manager.status
            if before is None:
                if status.health is Health.RELOGIN:  # unreadable state, moved aside
                    raise StateCorrupt(
                        status.last_error or "state unreadable",
                        path=account.state_file,
                        quarantined=None,
                    )
                raise StateMissing(
                    f"account '{account.name}' has no tokens yet",
                    hint=f"run `{_login_command(account)}`",
                )
            if before.relogin_reason:
                raise ReloginRequired(
                    f"account '{account.name}' needs a new login: {before.relogin_reason}"
                )
            now = utcnow()
            if min_valid == "auto":
                min_valid = default_min_valid(before.tokens.access_lifetime)
            elif min_valid is not None:
                # No token of this life can meet it: the daemon's API refuses it the same way.
                unmeetable = min_valid_problem(min_valid, before.tokens.access_lifetime)
                if unmeetable is not None:
                    raise KakaoTokendError(unmeetable)
            if (
                min_valid is not None
                and before.tokens.access_remaining(now).total_seconds() >= min_valid
            ):
                return before, False, False
            if fleet is None:
                make_room_before_kakao(account.state_file.parent)
            after = await manager.refresh(
                force=True, reason="kakao-tokend CLI", min_valid=min_valid
            )
            if (
                fleet is not None
                and min_valid is None
                and after is not None
                and after.generation == before.generation
                and status.health is Health.OK
            ):
                raise StoreLocked(
                    f"account '{account.name}' is being refreshed by a node right now",
                    hint="try again in a moment (`kakao-tokend status` shows its tokens)",
                )
            # A request given up on may still bring Kakao's late answer (a rotated refresh
            # token): it is kept before the session closes under it.
            await manager.wait_idle(manager.request_grace)
            after = manager.state if manager.state is not None else after
            for _ in range(3):
                if await manager.flush():
                    break
                await asyncio.sleep(0.5)
            else:
                rescue = store.rescue_path if fleet is None else None
                kept = rescue is not None and rescue.exists()
                raise StoreWriteError(
                    f"the new tokens of account '{account.name}' could not be saved"
                    f" ({status.write_error}); "
                    + (
                        f"they are kept in the rescue file {rescue}"
                        if kept
                        else "they are lost when this command exits"
                    ),
                    hint=f"{write_fix(status.write_errno)}, then run "
                    + (
                        f"`{_cli_command(account, 'refresh')}` again (or start the daemon):"
                        " it takes them from there"
                        if kept
                        else f"`{_login_command(account)}`"
                    ),
                )
    label = status.last_error_class or ""
    message = status.last_error or "refresh failed"
    if status.health is Health.RETRYING:
        if label == "lock_busy":
            raise StoreLocked(message)
        # The message may carry its own hint already: add none, say "later" in the text.
        raise KakaoUnavailable(f"refresh failed, try again later: {message}")
    if status.health is Health.RELOGIN:
        # The message ends with the login command (refresher); _with_login_fix checks.
        raise ReloginRequired(f"account '{account.name}' needs a new login: {message}")
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
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@LOCK_TIMEOUT_OPTION
def restore(path: Path, lock_timeout: float) -> None:
    """Put a backup of an account's state file back, even though it is older.

    A running daemon refuses a state file whose generation or rotation history goes backwards
    (an old backup copied over the live file by mistake: its refresh token may have been
    retired by a rotation since), keeps its newer tokens and alerts. This command is how you
    really mean it: the backup becomes the newest state, and a running daemon adopts it. The
    file it replaces is kept next to it as NAME.state.json.replaced-<time>.

    \b
    Example:
      kakao-tokend restore /backup/kakao-tokend/default.state.json
      kakao-tokend --account bot restore ./bot.state.json.refused-20261201T101500Z
    """
    from .store import AccountStore, read_state_file

    settings = _settings()
    account = settings.account_config()
    try:
        backup = read_state_file(path)
    except ValueError as exc:
        raise ImportFileError(str(exc), hint="give a copy of a NAME.state.json file") from None
    store = AccountStore(account)
    now = utcnow()
    with store.lock(timeout=lock_timeout):
        state = store.restore_backup(backup, source=path, now=now)
    tokens = state.tokens
    click.echo(
        f"restored {path} into account '{account.name}' as generation {state.generation}"
        f" (refresh token {tokens.refresh_fingerprint}, expires"
        f" {format_local_time(tokens.refresh_expires_at)}); a running daemon adopts it within a"
        " heartbeat"
    )
    if tokens.refresh_remaining(now).total_seconds() <= 0:
        click.echo(
            f"warning: this refresh token has expired; run `{_login_command(account)}`",
            err=True,
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
            f" {_local_time(body['access_expires_at'])}"
            f" (in {format_duration(body['access_expires_in'])});"
            f" refresh token {'ROTATED' if body.get('rotated') else 'unchanged'}, expires"
            f" {_local_time(body['refresh_expires_at'])}"
            f" (in {format_duration(body['refresh_expires_in'])}"
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
        f"refreshed {account.name}: access token expires"
        f" {format_local_time(tokens.access_expires_at)}"
        f" (in {format_duration(tokens.access_remaining(now).total_seconds())}); "
        f"refresh token {'ROTATED' if rotated else 'unchanged'}, expires "
        f"{format_local_time(tokens.refresh_expires_at)} "
        f"(in {format_duration(tokens.refresh_remaining(now).total_seconds())}"
        f"{', estimated' if tokens.refresh_expiry_estimated else ''}); "
        f"generation {state.generation}"
    )


@main.command()
@click.option(
    "--min-valid",
    type=DURATION,
    default=None,
    help="Refresh first when the access token has less than this left (default: 60s of a"
    " 6-hour token, the same share, 1/360, of a shorter one).",
)
@LOCK_TIMEOUT_OPTION
def token(min_valid: float | None, lock_timeout: float) -> None:
    """Print the current access token (only the token) for use in scripts.

    Refreshes first (under the account lock) when the token expires within --min-valid.

    \b
    Example:
      curl -H "Authorization: Bearer $(kakao-tokend token)" https://kapi.kakao.com/v2/user/me
      kakao-tokend token --min-valid 10m
    """
    from .apiclient import DaemonApiError
    from .store import AccountStore

    settings = _settings()
    name = settings.account_name()
    paths = settings.config(secrets=False)
    # What the files could hand out if the daemon does not answer (stopped, frozen): it also
    # sizes the wait for the daemon to the token's life (tokens.daemon_answer_wait).
    stand_in = _stand_in(paths, name)
    wait = _daemon_wait(paths, stand_in, min_valid)
    try:
        remote = _via_daemon(
            paths,
            "GET",
            f"/v1/accounts/{name}/token",
            params={"min_valid": "auto" if min_valid is None else f"{min_valid:g}"},
            timeout=wait,
        )
    except DaemonApiError as exc:
        if exc.status != 0:  # it answered, with something else than JSON
            raise
        click.echo(_from_files_instead(paths, name, stand_in, min_valid, wait))
        return
    if remote is not None:
        code, body = remote
        if code != 200:
            raise _daemon_failure(name, code, body)
        click.echo(body["access_token"])
        return
    if paths.store.backend == "file":
        # A token that is still good for --min-valid is read and printed as it is: no
        # secrets, no lock, no Kakao client, no event loop (a script may call this every
        # minute). Anything else (no tokens, a re-login, a refresh due) takes the path below.
        # The files are judged first, as for a refresh (the runtime directory too): a token
        # planted in a directory other users may write to is refused, never printed (read
        # above when that went well).
        current = stand_in
        if current is None:
            store = AccountStore(paths.accounts[name], rescue_dir=paths.runtime_dir)
            store.check_paths()
            current = store.load()
        if current is not None and not current.relogin_reason:
            remaining = current.tokens.access_remaining(utcnow()).total_seconds()
            wanted = min_valid
            if wanted is None:
                wanted = default_min_valid(current.tokens.access_lifetime)
            if remaining >= wanted and remaining > 0:
                click.echo(current.tokens.access_token)
                return
    account = settings.account_config()
    try:
        state, _, _ = _run_async(
            _managed_refresh(
                account,
                settings.config(),
                min_valid="auto" if min_valid is None else min_valid,
                lock_timeout=lock_timeout,
            )
        )
    except (KakaoUnavailable, StoreLocked) as exc:
        # Kakao is down or the daemon is mid-refresh: a token that still works beats none,
        # unless --min-valid asked for more than it has (then it is no answer either).
        fallback = AccountStore(account).load()
        if fallback is None or fallback.tokens.access_remaining(utcnow()).total_seconds() <= 0:
            raise
        spare = fallback.tokens.access_remaining(utcnow()).total_seconds()
        if min_valid is not None and spare < min_valid:
            raise KakaoUnavailable(
                f"{no_token_valid_for(account.name, min_valid)}: {exc}"
            ) from None
        left = format_duration(spare)
        click.echo(
            f"warning: could not refresh ({exc}); using the current token ({left} left)", err=True
        )
        state = fallback
    remaining = state.tokens.access_remaining(utcnow()).total_seconds()
    if remaining <= 0:
        raise KakaoUnavailable(f"account '{account.name}': the access token is expired")
    if min_valid is not None and remaining < min_valid:
        raise KakaoUnavailable(no_token_valid_for(account.name, min_valid))
    click.echo(state.tokens.access_token)


def _stand_in(config: Config, name: str) -> AccountState | None:
    """Return the account's state from the files, for `token` to hand out when the daemon
    does not answer; None when there is none, or it cannot (or must not) be read: files
    other users could have planted are never used (AccountStore.check_paths)."""
    from .store import AccountStore

    if config.store.backend != "file":
        return None
    store = AccountStore(config.accounts[name], rescue_dir=config.runtime_dir)
    try:
        store.check_paths()
        return store.load(quarantine=False)  # a damaged file is the daemon's to move aside
    except KakaoTokendError:
        return None


def _spare(state: AccountState | None, min_valid: float | None, now: datetime) -> float | None:
    """Return how much longer than asked (``min_valid``; None: auto) the access token of
    ``state`` lives, or None when it cannot be handed out (no state, a new login needed)."""
    if state is None or state.relogin_reason:
        return None
    tokens = state.tokens
    wanted = default_min_valid(tokens.access_lifetime) if min_valid is None else min_valid
    return tokens.access_remaining(now).total_seconds() - max(wanted, 0.0)


def _daemon_wait(config: Config, state: AccountState | None, min_valid: float | None) -> float:
    """How long `token` waits for the daemon (tokens.daemon_answer_wait): twice the daemon's
    own deadline, [api] request_timeout, fitted to the life of the token in the files."""
    from .tokens import daemon_answer_wait

    lifetime = state.tokens.access_lifetime if state is not None else None
    spare = _spare(state, min_valid, utcnow())
    return daemon_answer_wait(2 * config.api.request_timeout, lifetime, spare)


#: What to look at when the daemon takes connections but does not answer.
_FROZEN_HINT = (
    "is it stopped or frozen? `systemctl status kakao-tokend` shows it,"
    " `systemctl restart kakao-tokend` restarts it"
)


def _from_files_instead(
    config: Config, name: str, state: AccountState | None, min_valid: float | None, wait: float
) -> str:
    """The daemon did not answer `token` within ``wait``: return the files' access token when
    it is still valid for ``min_valid`` (said on stderr), else raise one error line."""
    sock = config.api_socket
    silent = f"the daemon did not answer on {sock} within {format_duration(wait)}"
    now = utcnow()
    spare = _spare(state, min_valid, now)
    if state is not None and spare is not None and spare > 0:
        left = format_duration(state.tokens.access_remaining(now).total_seconds())
        click.echo(
            f"warning: {silent} ({_FROZEN_HINT}); printed the token from the state file"
            f" instead ({left} left)",
            err=True,
        )
        return state.tokens.access_token
    if state is None:
        why = "no state file could be read to use instead"
    elif state.relogin_reason:
        why = "the state file says the account needs a new login"
    else:
        tokens = state.tokens
        wanted = default_min_valid(tokens.access_lifetime) if min_valid is None else min_valid
        remaining = tokens.access_remaining(now).total_seconds()
        why = f"the state file's access token has expired ({_seconds(wanted)} of validity asked)"
        if remaining > 0:
            why = (
                f"the state file's access token has only {format_duration(remaining)} left,"
                f" less than the {_seconds(wanted)} asked"
            )
    raise KakaoTokendError(f"{silent}, and {why}", hint=_FROZEN_HINT)


def _seconds(value: float) -> str:
    """``7.9s``, ``60s``: a short duration to the hundredth; longer ones as format_duration."""
    if value >= 60:
        return format_duration(value)
    return plain_seconds(value) + "s"


def _via_daemon(
    config: Config,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[int, dict[str, Any]] | None:
    """Ask the running daemon over its socket; None when no daemon runs (use the files).

    ``timeout``: how long to wait for its answer (apiclient.call's 120 s: twice the daemon's
    default [api] request_timeout, after which it answers 504 itself)."""
    from .apiclient import DaemonNotRunning, call, daemon_running

    sock = config.api_socket
    if not daemon_running(sock):
        return None
    try:
        return call(sock, method, path, params=params, timeout=timeout)
    except DaemonNotRunning:
        return None


def _tell_daemon(name: str) -> None:
    """Tell a running daemon that this command rewrote (or removed) the account's state.

    Best effort and quick: the daemon takes the new tokens over before this command returns.
    When the socket is out of reach (another user, no daemon) nothing is said; a running
    daemon then notices the file through its watch on the state directory.
    """
    from .apiclient import call, daemon_running

    try:
        sock = _settings().config(secrets=False).api_socket
        if daemon_running(sock):
            call(sock, "POST", f"/v1/accounts/{name}/reread", timeout=10.0)
    except Exception as exc:  # never fail a login that worked because of this courtesy call
        logging.getLogger(__name__).debug("could not tell the daemon: %r", exc)


def _daemon_failure(name: str, code: int, body: dict[str, Any]) -> KakaoTokendError:
    """Turn a daemon's error answer into the error (and so the exit code) of the CLI."""
    message = str(body.get("error") or body.get("last_error") or f"HTTP {code}")
    reason = body.get("reason")
    if isinstance(reason, str) and reason and reason not in message:
        message = f"{message} ({reason})"
    health = body.get("health")
    if code == 409:
        return StateMissing(message)  # the daemon's message already names the login command
    if health == "relogin":
        # The daemon's message names the login command; _with_login_fix adds it if not.
        return ReloginRequired(f"account '{name}' needs a new login: {message}")
    if health == "config":
        return KakaoConfigError(f"Kakao refused the refresh: {message}")
    if code == 404 or code == 400:
        return KakaoTokendError(f"the daemon refused the request: {message}")
    return KakaoUnavailable(f"the daemon could not get a token for {name}: {message}")


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
        click.get_current_context().exit(FAILURE)
    code, body = call(sock, "POST", "/v1/reload")
    if code == 200 and body.get("ok"):
        click.echo(str(body.get("message") or "reloaded"))
        return
    _fail(f"reload refused, the daemon keeps its previous configuration: {body.get('message')}")
    click.get_current_context().exit(FAILURE)


# --------------------------------------------------------------------------- logout


@main.command()
@click.option("--keep-files", is_flag=True, help="Log out at Kakao but keep the local files.")
def logout(keep_files: bool) -> None:
    """Log out at Kakao (best effort), then delete the account's state and token files, its
    extra token files and its rendered templates.

    \b
    Example:
      kakao-tokend logout
      kakao-tokend --account bot logout --keep-files
    """
    from .kakao import AccessTokenRejected, KakaoClient, create_session
    from .store import AccountStore

    settings = _settings()
    account = settings.account_config()
    config = settings.config()
    in_store = config.store.backend == "postgres"
    # With the rescue directory, so a rescue file cannot bring the logged-out tokens back.
    store = AccountStore(account, rescue_dir=config.runtime_dir)
    removed: list[Path] = []
    if in_store:
        from .fleet.commands import forget_unreadable_account, logout_account

        # The row goes (under its lock, after a node's refresh in flight) and every node
        # hears of it BEFORE Kakao revokes the tokens.
        try:
            state = None if keep_files else _run_async(logout_account(config, account))
        except TokenDecryptError as exc:
            # Its key is lost here: the row goes unread, and Kakao cannot be told.
            _run_async(forget_unreadable_account(config, account))
            click.echo(
                f"warning: {exc.message}; Kakao could not be told, so its tokens stay valid"
                " there until they expire (no one can read them)",
                err=True,
            )
            click.echo(f"removed account '{account.name}' from the PostgreSQL store")
            _tell_daemon(account.name)
            return
        if keep_files:
            raise ConfigError(
                "--keep-files has no meaning with the PostgreSQL store",
                details=[("store.backend", "run `kakao-tokend logout` without --keep-files")],
            )
    else:
        store.check_paths()
        # Under the account lock, so the tokens read are the newest (a refresh in flight ends
        # first). The files go, and a running daemon is told, BEFORE Kakao revokes the tokens:
        # the daemon never hands out a token that is already dead. Every copy of the access
        # token goes with them (the extra token files, the rendered templates), so a program
        # that reads one finds it gone instead of holding a revoked token.
        with store.lock(timeout=5.0):
            try:
                state = store.load()
            except StateCorrupt as exc:
                click.echo(f"warning: {exc}", err=True)
                state = None
            if not keep_files:
                removed, problems = store.remove(
                    generation=state.generation if state is not None else 0,
                    outputs=[template.destination for template in account.templates],
                )
                for problem in problems:
                    click.echo(f"warning: {problem}", err=True)
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
    if in_store:
        click.echo(f"removed account '{account.name}' from the PostgreSQL store")
        return
    if removed:
        names = [str(path) for path in removed]
        listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        click.echo(f"removed {listed}")
    else:
        click.echo(f"no files to remove for account '{account.name}'")


# --------------------------------------------------------------------------- doctor


@main.command()
@click.option(
    "--consumer",
    metavar="USER|GROUP",
    help="Also check that this user (or any member of this group) can read the token file and"
    " reach the socket.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def doctor(consumer: str | None, as_json: bool) -> None:
    """Run every check a person would, and print ✓/✗ with the exact fix for each ✗.

    Checks the config and its secrets, the directories' owners and modes, each account's
    state, the access token at Kakao (access_token_info), the clock against Kakao's, the API
    socket for you, a TCP listener that speaks plain HTTP to other machines, the token file
    for --consumer, and the systemd unit. Exit 0 when all is well, 1 for a warning, 2 for a
    critical problem (like `status`). Changes nothing.

    \b
    Example:
      kakao-tokend doctor
      kakao-tokend doctor --consumer www-data
      kt doctor --consumer kakao-tokend        # a system install, as the service
    """
    from .access import identity_for
    from .doctor import run_checks

    who = None
    if consumer is not None:
        try:
            who = identity_for(consumer)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--consumer") from None

    findings = _run_async(run_checks(_settings().config_path, consumer=who))
    worst = max((f.level for f in findings if not f.skipped), default=OK)
    if as_json:
        document = {"exit_code": worst, "checks": [f.to_dict() for f in findings]}
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        ok, bad, skip = _marks()
        for finding in findings:
            mark = skip if finding.skipped else (ok if finding.level == OK else bad)
            click.echo(f"{mark} {finding.name}: {finding.detail}")
            if finding.fix and not finding.skipped and finding.level:
                click.echo(f"    fix: {finding.fix}")
    click.get_current_context().exit(worst)


def _marks() -> tuple[str, str, str]:
    """Return the ok / failed / skipped marks, in ASCII when stdout cannot show ✓ and ✗."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗–".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "OK  ", "FAIL", "--  "
    return "✓", "✗", "–"


# --------------------------------------------------------------------------- memo


@main.command()
@click.argument("text", required=False)
@click.option("--link", "link", metavar="URL", help="Address the message (and its button) opens.")
@click.option(
    "--button-title",
    metavar="TEXT",
    help="Label of the message's button (default: Kakao's 자세히 보기); needs --link.",
)
@LOCK_TIMEOUT_OPTION
def memo(text: str | None, link: str | None, button_title: str | None, lock_timeout: float) -> None:
    """Send a KakaoTalk message to yourself ("send to me") with the account's fresh token.

    TEXT (at most 200 characters) is the message; without it, or with "-", it is read from
    stdin. The message goes through the running daemon's proxy; without a daemon it is sent
    directly, after a refresh under the account lock when the token is about to expire.
    Needs the talk_message consent (kakao-tokend login --scope talk_message).

    \b
    Example:
      kakao-tokend memo "백업 완료"
      df -h / | tail -n 1 | kakao-tokend memo
      kakao-tokend memo "배포 끝" --link https://example.com/deploys --button-title "보기"
    """
    from .apiclient import DaemonNotRunning, daemon_running
    from .memo import link_problem, send_via_daemon, text_problem, text_template

    if text is None or text == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give the message as an argument, or pipe it in on stdin")
        text = sys.stdin.read().rstrip("\n")
    problem = text_problem(text)
    if problem is None and link is not None:
        problem = link_problem(link)
    if problem is None and button_title is not None and link is None:
        problem = "--button-title needs --link: the button opens that address"
    if problem is not None:
        raise click.UsageError(problem)
    template = text_template(text, link=link, button_title=button_title)
    settings = _settings()
    name = settings.account_name()
    config = settings.config(secrets=False)
    sock = config.api_socket
    if daemon_running(sock):
        try:
            # Twice the daemon's own deadline: its answer (sent, or a 504) always comes first.
            wait = 2 * config.api.request_timeout
            send_via_daemon(sock, template, account=config.accounts[name], timeout=wait)
        except DaemonNotRunning:
            pass  # it stopped in between; nothing was sent
        else:
            click.echo(
                f"sent to the KakaoTalk chat with yourself of account '{name}' (by the daemon)"
            )
            return
    account = settings.account_config()
    _run_async(_send_memo_directly(account, settings.config(), template, lock_timeout))
    click.echo(f"sent to the KakaoTalk chat with yourself of account '{name}'")


async def _send_memo_directly(
    account: AccountConfig, config: Config, template: dict[str, Any], lock_timeout: float
) -> None:
    """No daemon: refresh under the account lock if needed, send, and refresh once on -401."""
    from .kakao import AccessTokenRejected, KakaoClient, create_session
    from .memo import refusal, send_direct

    state, _, _ = await _managed_refresh(
        account,
        config,
        min_valid="auto",
        lock_timeout=lock_timeout,
    )
    async with create_session() as session:
        client = KakaoClient(session, account.app)
        try:
            await send_direct(client, state.tokens.access_token, template, account=account)
            return
        except AccessTokenRejected:
            pass  # revoked or expired early: one forced refresh, then one more try
        state, _, _ = await _managed_refresh(
            account, config, min_valid=None, lock_timeout=lock_timeout
        )
        try:
            await send_direct(client, state.tokens.access_token, template, account=account)
        except AccessTokenRejected:
            raise refusal(-401, "", account=account, status=401) from None


# --------------------------------------------------------------------------- daemon / tools


# --------------------------------------------------------------------------- alerts


def _active_alerts(account: AccountConfig) -> list[dict[str, Any]]:
    from .status import active_alerts
    from .store import AccountStore

    return active_alerts((AccountStore(account).load_alerts() or {}).get("active") or {})


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
    click.get_current_context().exit(FAILURE if failed else OK)


# --------------------------------------------------------------------------- store


@main.group()
def store() -> None:
    """The PostgreSQL store for fleet mode ([store] in the config; docs/fleet.md)."""


@store.command("new-key")
def store_new_key() -> None:
    """Print a fresh encryption key for the store's key file (one line, base64).

    Append it to the key file of every node (the newest key is the last line and encrypts;
    older ones still decrypt), reload them, then run `kakao-tokend store rotate-key`.

    \b
    Example:
      kakao-tokend store new-key > /etc/kakao-tokend/store.key    # the first key
      chmod 600 /etc/kakao-tokend/store.key
      kakao-tokend store new-key >> /etc/kakao-tokend/store.key   # a new key, later
    """
    from .fleet.admin import make_key

    key = make_key()
    click.echo(key.line)
    click.echo(
        f"new key {key.key_id}: keep the key file mode 600, the same on every node (newest "
        "last); after adding it run `kakao-tokend store rotate-key`",
        err=True,
    )


@store.command("init")
def store_init() -> None:
    """Create the store's tables in PostgreSQL, or upgrade them (idempotent).

    Every node does the same at start; run it once by hand to check the database and the
    [store] settings before starting the nodes.

    \b
    Example:
      kakao-tokend --config /etc/kakao-tokend/config.toml store init
    """
    from .fleet.admin import init_store

    config = _settings().config()
    result = _run_async(init_store(config))
    where = config.store.dsn_source or "the configured database"
    if result.applied:
        click.echo(
            f"store schema ({where}): version {result.before} -> {result.after} "
            f"(applied {', '.join(result.applied)})"
        )
    else:
        click.echo(f"store schema ({where}): already at version {result.after}; nothing to do")


@store.command("rotate-key")
@click.option(
    "--batch", type=click.IntRange(1, 10_000), default=100, help="Accounts per transaction."
)
def store_rotate_key(batch: int) -> None:
    """Re-encrypt every account under the newest key of the key file (idempotent).

    Rows are locked in batches; an account being refreshed is waited for. Remove an old key
    from the key files only when this reports that no account uses it.

    \b
    Example:
      kakao-tokend store new-key >> /etc/kakao-tokend/store.key   # on every node, then reload
      kakao-tokend store rotate-key
    """
    from .fleet.admin import rotate_key

    config = _settings().config()
    result = _run_async(rotate_key(config, batch=batch))
    total = sum(result.by_key.values())
    click.echo(f"re-encrypted {result.rekeyed} account(s) under key {result.newest}")
    if result.remaining:
        older = ", ".join(
            f"{k} ({n})" for k, n in sorted(result.by_key.items()) if k != result.newest
        )
        _fail(
            f"{result.remaining} of {total} account(s) are still under older keys: {older}; a "
            "node without the new key may have re-sealed them: give every node the same key "
            "file, reload them and run this again"
        )
        click.get_current_context().exit(FAILURE)
    click.echo(f"all {total} account(s) are under key {result.newest}; older keys are unused")


@store.command("migrate")
@click.option(
    "--to",
    "target",
    type=click.Choice(["postgres", "file"]),
    required=True,
    help="Where the accounts go: into the PostgreSQL store, or back into the files.",
)
@LOCK_TIMEOUT_OPTION
def store_migrate(target: str, lock_timeout: float) -> None:
    """Move every account (tokens, history, alert bookkeeping) to the other store.

    Stop kakao-tokend first: the migration refuses while a daemon runs on the files or a
    node is connected to the database. Afterwards the old side is marked moved and every
    daemon and writing command refuses it, naming where the accounts went; published token
    files stay. Safe to run again: a run that was interrupted is finished, one that is done
    says so. docs/fleet.md §12.

    \b
    Example:
      systemctl stop kakao-tokend
      kakao-tokend store migrate --to postgres    # then set [store] backend = "postgres"
      kakao-tokend store migrate --to file        # back; then [store] backend = "file"
    """
    from .fleet.migrate import Step, migrate

    settings = _settings()
    if settings.account is not None:
        raise click.UsageError(
            "store migrate moves every account of the configuration together; drop --account"
        )
    config = settings.config()
    report = _run_async(
        migrate(config, "file" if target == "file" else "postgres", lock_timeout=lock_timeout)
    )
    store_name = f"PostgreSQL store {report.store_id} ({report.database})"
    if report.nothing_to_do is not None:
        click.echo(f"nothing to do: {report.nothing_to_do}")
        return
    source, dest = (
        (report.files, store_name) if target == "postgres" else (store_name, report.files)
    )
    moved = report.names(Step.COPY, Step.UPDATE, Step.SAME)
    click.echo(f"moved {len(moved)} account(s) from {source} to {dest}:")
    for step in (Step.COPY, Step.UPDATE, Step.SAME, Step.REMOVE, Step.KEEP):
        names = report.names(step)
        if names:
            click.echo(f"  {step.value}: {', '.join(names)}")
    click.echo(f"  alert records: {report.alerts}")
    if report.others:
        click.echo(f"  other accounts in the store, left alone: {', '.join(report.others)}")
    for path in report.set_aside:
        click.echo(f"  kept aside: {path}")
    where = config.source or "the configuration"
    if target == "postgres":
        click.echo(
            f"the files are marked moved ({', '.join(str(p) for p in report.markers)}): "
            "kakao-tokend refuses them from now on; published token files stay"
        )
        click.echo(
            f'next: set [store] backend = "postgres" in {where}; '
            "to move back: kakao-tokend store migrate --to file"
        )
    else:
        click.echo("the store is marked moved: kakao-tokend nodes refuse it from now on")
        click.echo(
            f'next: set [store] backend = "file" in {where} and start kakao-tokend; '
            "to move back: kakao-tokend store migrate --to postgres"
        )


@main.command()
def run() -> None:
    """Run the daemon in the foreground (what the systemd unit starts).

    \b
    Example:
      kakao-tokend --config /etc/kakao-tokend/config.toml run
    """
    import gc

    # What the service imports lives as long as the process: the cyclic garbage collector is
    # off while it is imported (its collections there only walked the new modules again:
    # about 3 % of a start's instructions, docs/benchmarks.md), and all of it is then taken
    # out of the collector's sight, so that the collections while a thousand accounts load
    # (and every full one afterwards) do not walk aiohttp's and our own module objects again.
    gc.disable()
    try:
        from .service import run as run_service
    finally:
        gc.freeze()
        gc.enable()
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

    Prints a config for it: [kakao] pointing at it, the emulator's rotation window, and alert
    thresholds scaled to its token lifetimes (so short tokens raise no false alarms). Add
    [paths] and save it with mode 600 (it holds the emulator's client secret).

    \b
    Example:
      kakao-tokend emulator --port 8790 --access-lifetime 60s --rotation-window 59d
    """
    from .demo import emulator_config
    from .emulator import EmulatorSettings, serve_emulator

    emu_settings = EmulatorSettings(
        access_lifetime=access_lifetime,
        refresh_lifetime=refresh_lifetime,
        rotation_window=rotation_window,
        consent="page" if consent == "page" else "auto",
        client_secret=client_secret or None,
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def announce(banner: str) -> None:
        click.echo(banner)
        click.echo("\nA config for it (add [paths] if you like; chmod 600, it holds a secret):\n")
        click.echo(emulator_config(emu_settings, url), nl=False)

    try:
        serve_emulator(host, port, emu_settings, announce=announce)
    except OSError as exc:
        raise KakaoTokendError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="pick another --port",
        ) from None


__all__ = ["exit_code_for", "main"]
