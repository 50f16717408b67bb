"""`kakao-tokend doctor`: every check a person would run by hand, each ✗ with its exact fix.

The checks, in the order a person would go: the config and where its secrets come from; the
directories' owners and modes; each account's state; a live ``access_token_info`` call; the
clock against Kakao's ``Date`` header; the API socket for the calling user; a TCP listener
that speaks plain HTTP to other machines; critical alerts left to KakaoTalk alone; the
published token file (and socket) for a consumer user or group; the systemd unit. Each check
returns
:class:`Finding` objects graded like ``status``: 0 ok, 1 warning, 2 critical. The CLI prints
them and exits with the worst grade. Nothing here changes anything.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import access, paths, supervisor
from .config import (
    AccountConfig,
    Config,
    kakaotalk_only_warning,
    load_config,
    plain_http_exposure,
    tcp_address,
)
from .errors import (
    ConfigError,
    KakaoConfigError,
    KakaoError,
    KakaoTokendError,
    ReloginRequired,
    StoreError,
)
from .exitcodes import CRITICAL, OK, WARNING
from .health import assess
from .relogin import cli_command, command_line, config_command, login_command
from .state import AccountState
from .store import STATE_FILE_MODE, AccountStore, output_problems
from .tokens import Clock, format_duration, utcnow

__all__ = [
    "CLOCK_SKEW_LIMIT",
    "Finding",
    "check_accounts",
    "check_clock",
    "check_config",
    "check_consumer",
    "check_directories",
    "check_group_access",
    "check_listener",
    "check_outputs",
    "check_socket",
    "check_unit",
    "run_checks",
]

#: Beyond this the clock is wrong enough to notice (Kakao's Date has 1 s resolution).
CLOCK_SKEW_LIMIT = 10.0
#: systemd's marker for "booted with systemd" (sd_booted(3)).
SYSTEMD_MARKER = Path("/run/systemd/system")
SYSTEM_UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
UNIT_NAMES = ("kakao-tokend.service", "kakao-tokend@.service")


@dataclass(frozen=True)
class Finding:
    """One line of the report: what was checked, the grade, what was found, and the fix."""

    name: str
    level: int
    detail: str
    fix: str | None = None
    #: Not applicable here (no systemd, no consumer named): shown, but never a failure.
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the finding for ``doctor --json``."""
        state = "skipped" if self.skipped else ("ok" if self.level == OK else "failed")
        return {
            "check": self.name,
            "result": state,
            "level": ("ok", "warning", "critical")[self.level],
            "detail": self.detail,
            "fix": self.fix,
        }


def _mode(info: os.stat_result) -> int:
    return stat.S_IMODE(info.st_mode)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --------------------------------------------------------------------------- config


def check_config(config_path: Path | None) -> tuple[list[Finding], Config | None]:
    """Load the config with its secrets; fall back to the paths alone for the other checks."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        where = exc.message
        detail = "; ".join(line.strip() for line in lines[1:])  # none: the message says it
        credentials = "CREDENTIALS_DIRECTORY" in str(exc)
        fix = (
            "run the checks the way the service runs, with its credentials: `kt doctor`"
            " (the kt helper in docs/operations.md)"
            if credentials
            else f"edit {_config_name(config_path)}, then"
            f" `{command_line(paths.config_options(config_path, os.environ), 'check-config')}`"
        )
        finding = Finding("config", CRITICAL, f"{where} {detail}".strip(), fix)
        try:
            partial = load_config(config_path, with_secrets=False)
        except ConfigError:
            return [finding], None
        return [finding], partial
    return [Finding("config", OK, _describe_config(config))], config


def _config_name(config_path: Path | None) -> str:
    if config_path is not None:
        return str(config_path)
    return "the config file"


def _describe_config(config: Config) -> str:
    if config.source is None:
        where = "no config file (built-in defaults and the environment)"
    else:
        info = config.source.stat()
        where = f"{config.source} ({_user_name(info.st_uid)}, {_mode(info):04o})"
    sources = sorted(
        {
            part
            for account in config.accounts.values()
            for part in (
                f"REST API key from {account.app.rest_api_key_source}",
                f"client secret from {account.app.client_secret_source}"
                if account.app.client_secret_source
                else "no client secret",
            )
        }
    )
    names = ", ".join(config.accounts)
    return f"{where} is valid: account(s) {names}; {'; '.join(sources)}"


# --------------------------------------------------------------------------- directories


def expected_owner(config: Config) -> tuple[int, str]:
    """Return the user the daemon runs as: the system unit's user for the system config."""
    if paths.is_system_config(config.source):
        try:
            entry = pwd.getpwnam(paths.APP_NAME)
        except KeyError:
            pass
        else:
            return entry.pw_uid, entry.pw_name
    uid = os.geteuid()
    return uid, _user_name(uid)


def check_directories(config: Config) -> list[Finding]:
    """The state and runtime directories, and the account files: owners and modes; the
    directories of the extra token files and templates (check_outputs)."""
    uid, user = expected_owner(config)
    findings: list[Finding] = []
    places = {config.state_dir: "state directory", config.runtime_dir: "runtime directory"}
    places.setdefault(config.api_socket.parent, "socket directory")
    for directory, label in places.items():
        login = login_command(config.account())
        findings.append(_check_directory(directory, label, uid, user, login=login))
    for account in config.accounts.values():
        findings.extend(_check_account_files(account, uid, user))
    findings.extend(check_outputs(config))
    return findings


def check_outputs(config: Config) -> list[Finding]:
    """The directories the accounts publish into beside their token files (store.
    output_problems): critical where every local user may write (`run` refuses it), a
    warning where their group or another user may."""
    uid, _ = expected_owner(config)
    return [
        Finding(
            found.key,
            CRITICAL if found.refused else WARNING,
            found.problem.message,
            found.problem.hint.removeprefix("run: ") if found.problem.hint else None,
        )
        for found in output_problems(config.accounts.values(), owner=uid)
    ]


def _check_directory(directory: Path, label: str, uid: int, user: str, *, login: str) -> Finding:
    try:
        info = directory.stat()
    except FileNotFoundError:
        if label == "state directory":
            return Finding(
                label,
                WARNING,
                f"{directory} does not exist yet",
                f"`{login}` (or `import`) creates it with the first tokens",
            )
        return Finding(label, OK, f"{directory} does not exist yet; the daemon creates it")
    except OSError as exc:
        return Finding(label, CRITICAL, f"cannot inspect {directory}: {exc.strerror}", None)
    if not stat.S_ISDIR(info.st_mode):
        return Finding(label, CRITICAL, f"{directory} is not a directory", f"rm {directory}")
    shown = access.describe(info)
    if _mode(info) & 0o022:
        return Finding(
            label,
            CRITICAL,
            f"{directory} is {shown}: others may replace the files in it",
            f"chmod go-w {directory}",
        )
    if info.st_uid not in (0, uid):
        return Finding(
            label,
            CRITICAL,
            f"{directory} is {shown}, but the daemon runs as {user}",
            f"chown {user} {directory}",
        )
    unusable = _cannot_create_in(directory) if uid == os.geteuid() else None
    if unusable is not None:
        key = _DIRECTORY_KEYS.get(label, "paths")
        return Finding(
            label,
            CRITICAL,
            f"{directory} is {shown}, but {user} cannot create a file in {directory}: {unusable}",
            f"point {key} at a directory {user} may write to, or fix its permissions or mount",
        )
    return Finding(label, OK, f"{directory} is {shown}")


#: The setting that names each directory _check_directory looks at (for its fix).
_DIRECTORY_KEYS = {
    "state directory": "paths.state_dir",
    "runtime directory": "paths.runtime_dir",
    "socket directory": "api.socket",
}


def _cannot_create_in(directory: Path) -> str | None:
    """Create and remove a probe file in ``directory`` (as the daemon creates its lock and
    state files there); return why that failed, or None. Owner and mode alone do not tell:
    root's /proc/1 is 0555 and takes no new file; nor does a read-only mount."""
    probe = directory / f".kakao-tokend.doctor-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()
    return None


def _check_account_files(account: AccountConfig, uid: int, user: str) -> list[Finding]:
    findings: list[Finding] = []
    name = f"{account.name}: state file"
    try:
        info = account.state_file.stat()
    except OSError:
        info = None
    if info is not None:
        if _mode(info) & ~STATE_FILE_MODE & 0o777:
            findings.append(
                Finding(
                    name,
                    CRITICAL,
                    f"{account.state_file} is {access.describe(info)}: it holds the refresh"
                    " token and must be 0600",
                    f"chmod 600 {account.state_file}",
                )
            )
        elif info.st_uid not in (0, uid):
            findings.append(
                Finding(
                    name,
                    CRITICAL,
                    f"{account.state_file} is {access.describe(info)}; the daemon runs as {user}",
                    f"chown {user} {account.state_file}",
                )
            )
        else:
            findings.append(Finding(name, OK, f"{account.state_file} is {access.describe(info)}"))
    name = f"{account.name}: token file"
    try:
        info = account.token_file.stat()
    except OSError:
        return findings
    wanted_group = _gid(account.token_file_group)
    wrong_mode = _mode(info) != account.token_file_mode
    wrong_group = wanted_group is not None and info.st_gid != wanted_group
    if wrong_mode or wrong_group:
        want = f"{account.token_file_mode:04o}" + (
            f" and group {account.token_file_group}" if wanted_group is not None else ""
        )
        findings.append(
            Finding(
                name,
                WARNING,
                f"{account.token_file} is {access.describe(info)}, the config says {want}",
                f"`{cli_command(account, 'refresh')}` rewrites it with the configured"
                " mode and group",
            )
        )
    else:
        findings.append(Finding(name, OK, f"{account.token_file} is {access.describe(info)}"))
    return findings


def _gid(group: str | int | None) -> int | None:
    if group is None:
        return None
    try:
        return access.group_identity(str(group)).gid
    except (KeyError, ValueError, OverflowError):
        return None


# --------------------------------------------------------------------------- state and Kakao


def check_accounts(
    config: Config, *, now: datetime
) -> tuple[list[Finding], dict[str, AccountState]]:
    """Each account's state, graded like `status` (health.assess); the findings and states."""
    findings: list[Finding] = []
    states: dict[str, AccountState] = {}
    for name, account in config.accounts.items():
        load_error: StoreError | None = None
        try:
            state = AccountStore(account).load(quarantine=False)  # doctor changes nothing
        except StoreError as exc:
            state, load_error = None, exc
        graded = assess(account, state, None, config.refresh, now, load_error=load_error)
        if state is not None:
            states[name] = state
            tokens = state.tokens
            estimated = ", estimated" if tokens.refresh_expiry_estimated else ""
            detail = (
                f"refresh token {_left(tokens.refresh_remaining(now).total_seconds())}"
                f"{estimated}, access token {_left(tokens.access_remaining(now).total_seconds())}"
                f", generation {state.generation}"
            )
        else:
            detail = "no usable state"
        conditions = graded.ordered()
        if conditions:
            detail += ": " + "; ".join(c.message.render("en") for c in conditions)
        fix = None
        if conditions:
            worst = conditions[0]
            fix = f"`{worst.command}`" if worst.command else worst.action.render("en")
        findings.append(Finding(f"{name}: state", graded.level, detail, fix))
    return findings, states


def _left(seconds: float) -> str:
    return f"expires in {format_duration(seconds)}" if seconds > 0 else "EXPIRED"


async def check_live(config: Config, states: dict[str, AccountState]) -> list[Finding]:
    """Ask Kakao about each stored access token (``access_token_info``)."""
    # Here, not at the top: the Kakao client brings aiohttp, and `check-config` (which uses
    # this module's access checks) never talks to Kakao.
    from .kakao import AccessTokenRejected, KakaoClient, create_session

    findings: list[Finding] = []
    async with create_session() as session:
        for name, state in states.items():
            account = config.accounts[name]
            client = KakaoClient(session, account.app)
            label = f"{name}: Kakao"
            try:
                info = await client.access_token_info(state.tokens.access_token)
            except AccessTokenRejected:
                findings.append(
                    Finding(
                        label,
                        WARNING,
                        "Kakao no longer accepts the stored access token (-401)",
                        f"`{cli_command(account, 'refresh')}`",
                    )
                )
            except ReloginRequired as exc:
                findings.append(Finding(label, CRITICAL, str(exc), f"`{login_command(account)}`"))
            except KakaoConfigError as exc:
                findings.append(Finding(label, CRITICAL, str(exc), exc.hint))
            except KakaoError as exc:
                findings.append(
                    Finding(
                        label,
                        WARNING,
                        f"Kakao could not be asked: {exc}",
                        f"check that this machine reaches {account.app.api_url}",
                    )
                )
            else:
                findings.append(
                    Finding(
                        label,
                        OK,
                        f"access_token_info: user {info.user_id},"
                        f" {format_duration(info.expires_in)} left",
                    )
                )
    return findings


async def check_clock(config: Config, *, clock: Clock = utcnow) -> Finding:
    """Compare our clock with the ``Date`` header of Kakao's answer."""
    from .kakao import KakaoClient, create_session  # aiohttp: see check_live

    account = next(iter(config.accounts.values()))
    async with create_session() as session:
        client = KakaoClient(session, account.app, clock=clock)
        try:
            kakao_time, ours = await client.server_clock()
        except KakaoError as exc:
            return Finding("clock", WARNING, f"could not read Kakao's clock: {exc}", None)
    skew = (ours - kakao_time).total_seconds()
    direction = "ahead of" if skew > 0 else "behind"
    if abs(skew) <= CLOCK_SKEW_LIMIT:
        return Finding("clock", OK, f"within {max(abs(skew), 1.0):.0f}s of Kakao's Date header")
    return Finding(
        "clock",
        WARNING,
        f"this machine's clock is {format_duration(abs(skew))} {direction} Kakao's"
        " (its Date header); expiry times and the file-age estimates of `import` drift by as"
        " much",
        "turn on time synchronisation: `timedatectl set-ntp true` (or `chronyc makestep`"
        " with chrony)",
    )


# --------------------------------------------------------------------------- access


def check_socket(config: Config) -> Finding:
    """Whether the calling user reaches the daemon over its socket."""
    from .apiclient import daemon_running

    sock = config.api_socket
    try:
        running = daemon_running(sock)
    except KakaoTokendError as exc:
        return Finding("socket", CRITICAL, exc.message, exc.hint)
    if running:
        return Finding("socket", OK, f"the daemon answers on {sock}")
    return Finding(
        "socket",
        WARNING,
        f"no daemon answers on {sock}: the tokens are not kept fresh",
        "`systemctl enable --now kakao-tokend` (or run `kakao-tokend run`)",
    )


def check_listener(config: Config) -> list[Finding]:
    """Whether the API's TCP listener (when there is one) serves only this machine: over
    plain HTTP to other machines, the bearer token and the access tokens cross the network
    unencrypted — allowed (`allow_non_loopback`), so a warning, the same as `run` logs."""
    if config.api.tcp is None:
        return []
    exposure = plain_http_exposure(config.api)
    if exposure is not None:
        problem, fix = exposure
        return [Finding("TCP listener", WARNING, problem, fix)]
    address = tcp_address(config.api.tcp)
    return [Finding("TCP listener", OK, f"{address} serves this machine only")]


def check_alert_channels(config: Config) -> list[Finding]:
    """Whether each account's critical alerts have a channel that works once its token is
    dead (KakaoTalk alone cannot deliver then): a warning, the same as `check-config`."""
    findings: list[Finding] = []
    for account in config.accounts.values():
        warning = kakaotalk_only_warning(account)
        if warning is not None:
            problem, fix = warning
            findings.append(Finding(f"{account.name}: alert channels", WARNING, problem, fix))
    if not findings:  # one line, not one per account (a fleet node may have thousands)
        findings.append(
            Finding(
                "alert channels", OK, "no account relies on KakaoTalk alone for critical alerts"
            )
        )
    return findings


def check_consumer(config: Config, who: access.Identity) -> list[Finding]:
    """Whether ``who`` can read each published token file and connect to the socket."""
    findings: list[Finding] = []
    own = [config.state_dir, config.runtime_dir]
    for account in config.accounts.values():
        findings.append(
            _consumer_finding(
                f"{account.name}: token file for {who.label}",
                account.token_file,
                who,
                "read",
                own,
                _publish_fix(account, who),
            )
        )
    sock = config.api_socket
    socket_fix = (
        f'set [api] socket_group = "{who.name if who.kind == "group" else "GROUP"}"'
        ' (and socket_mode = "0660") in the config, then restart the daemon'
    )
    findings.append(
        _consumer_finding(f"socket for {who.label}", sock, who, "connect", own, socket_fix)
    )
    return findings


def _publish_fix(account: AccountConfig, who: access.Identity) -> str:
    table = "[publish]" if account.name == "default" else f"[accounts.{account.name}.publish]"
    if who.kind == "group":
        return (
            f'set {table} group = "{who.name}" and mode = "0640" in the config, then'
            f" `{config_command(account, 'reload')}`"
        )
    if account.token_file_group is not None:
        return f"usermod -aG {account.token_file_group} {who.name}  (then log in again)"
    return (
        f'set {table} group = "GROUP" (a group of {who.name}) in the config, then'
        f" `{config_command(account, 'reload')}`"
    )


def _consumer_finding(
    name: str,
    target: Path,
    who: access.Identity,
    need: access.Need,
    own: Iterable[Path],
    target_fix: str,
) -> Finding:
    exists = target.exists()
    verdict = access.probe(target, who, need=need) if exists else None
    blocked = access.find_blocker(target, who, need=need, own_dirs=own)
    if verdict is True or (verdict is None and blocked is None):
        how = "checked as that user" if verdict is True else "by the permission bits"
        what = "can read" if need == "read" else "can connect to"
        if not exists:
            return Finding(name, OK, f"the way to {target} is open (it does not exist yet)")
        return Finding(name, OK, f"{who.label} {what} {target} ({how})")
    if blocked is None:  # the kernel says no, the bits say yes: an ACL or a mount option
        return Finding(
            name,
            CRITICAL,
            f"{who.label} may not reach {target} (ACL or mount options; the bits allow it)",
            f"check `getfacl` along {target}",
        )
    if blocked.reason == "does not exist":
        return Finding(
            name,
            WARNING,
            f"{blocked.path} does not exist yet: check again once there are tokens and the"
            " daemon runs",
            blocked.fix if who.kind == "group" else None,
        )
    fix = blocked.fix if blocked.fix is not None else target_fix
    return Finding(name, CRITICAL, f"{blocked.path} {blocked.reason}", fix)


def check_group_access(config: Config) -> list[Finding]:
    """[publish] group and [api] socket_group: can members of the group reach the files?

    Outside systemd nobody sets up the directories for the group; this says what to run.
    """
    findings: list[Finding] = []
    own = [config.state_dir, config.runtime_dir]
    for account in config.accounts.values():
        if account.token_file_group is None:
            continue
        try:
            who = access.group_identity(str(account.token_file_group))
        except (KeyError, ValueError, OverflowError):
            continue  # the config check already reports an unknown group
        findings.append(
            _group_way(f"{account.name}: [publish] group", account.token_file, who, "read", own)
        )
    if config.api.socket_group is not None:
        try:
            who = access.group_identity(str(config.api.socket_group))
        except (KeyError, ValueError, OverflowError):
            return findings
        findings.append(_group_way("[api] socket_group", config.api_socket, who, "connect", own))
    return findings


def _group_way(
    name: str, target: Path, who: access.Identity, need: access.Need, own: Sequence[Path]
) -> Finding:
    """Check the way to ``target`` for members of a group (the file itself may come later)."""
    blocked = access.find_blocker(target, who, need=need, own_dirs=own)
    if blocked is None:
        verb = "read" if need == "read" else "connect to"
        return Finding(name, OK, f"members of group {who.name} can {verb} {target}")
    if blocked.reason == "does not exist":
        return Finding(
            name,
            WARNING,
            f"{blocked.path} does not exist; created later, group {who.name} could not enter it",
            blocked.fix,
        )
    fix = blocked.fix
    if fix is None:  # the file itself: the daemon writes it with the configured mode and group
        fix = "check the mode and group settings for it in the config, then restart the daemon"
    return Finding(
        name,
        WARNING,
        f"group {who.name} cannot reach {target}: {blocked.path} {blocked.reason}",
        fix,
    )


# --------------------------------------------------------------------------- systemd


Systemctl = Callable[[Sequence[str]], str | None]


def _systemctl(args: Sequence[str]) -> str | None:
    """Run ``systemctl ARGS``; return its stdout, or None when it cannot run."""
    binary = shutil.which("systemctl")
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def check_unit(
    config: Config,
    *,
    marker: Path = SYSTEMD_MARKER,
    unit_dirs: Sequence[Path] | None = None,
    systemctl: Systemctl = _systemctl,
) -> Finding:
    """When systemd runs this machine: is the unit installed, enabled and running?"""
    if not marker.is_dir():
        return Finding("systemd unit", OK, "no systemd on this machine; not checked", skipped=True)
    system = supervisor.for_config(config.source).manager == "system"
    if unit_dirs is None:
        unit_dirs = SYSTEM_UNIT_DIRS if system else _user_unit_dirs()
    scope: list[str] = [] if system else ["--user"]
    found = next(
        (d / n for n in UNIT_NAMES for d in unit_dirs if (d / n).is_file()),
        None,
    )
    if found is None:
        where = unit_dirs[0]
        fix = (
            f"install -D -m 0644 systemd/{'' if system else 'user/'}kakao-tokend.service"
            f" {where}/kakao-tokend.service && systemctl {' '.join(scope)} daemon-reload".replace(
                "  ", " "
            )
        )
        return Finding("systemd unit", WARNING, "kakao-tokend.service is not installed", fix)
    if found.name == "kakao-tokend@.service":
        return Finding("systemd unit", OK, f"the per-account template is installed: {found}")
    state = systemctl([*scope, "is-active", "kakao-tokend.service"])
    enabled = systemctl([*scope, "is-enabled", "kakao-tokend.service"])
    if state is not None and state != "active":
        start = " ".join(["systemctl", *scope, "enable", "--now", "kakao-tokend"])
        return Finding(
            "systemd unit",
            WARNING,
            f"{found} is installed but {state or 'not running'} ({enabled or 'unknown'})",
            start,
        )
    return Finding("systemd unit", OK, f"{found} is installed ({state or '?'}, {enabled or '?'})")


def _user_unit_dirs() -> list[Path]:
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [
        home / "systemd" / "user",
        Path("/etc/systemd/user"),
        Path("/usr/lib/systemd/user"),
    ]


# --------------------------------------------------------------------------- all of them


async def run_checks(
    config_path: Path | None,
    *,
    consumer: access.Identity | None = None,
    clock: Clock = utcnow,
) -> list[Finding]:
    """Run every check in order; later checks run on whatever the earlier ones could load."""
    findings, config = check_config(config_path)
    if config is None:
        return findings
    findings += check_directories(config)
    account_findings, states = check_accounts(config, now=clock())
    findings += account_findings
    findings += await check_live(config, states)
    findings.append(await check_clock(config, clock=clock))
    findings.append(check_socket(config))
    findings += check_listener(config)
    findings += check_alert_channels(config)
    findings += check_group_access(config)
    if consumer is not None:
        findings += check_consumer(config, consumer)
    else:
        findings.append(
            Finding(
                "consumer",
                OK,
                "not checked: name a program's user or group with --consumer USER|GROUP",
                skipped=True,
            )
        )
    findings.append(check_unit(config))
    return findings
