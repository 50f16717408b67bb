"""Which command shows the daemon's log and which restarts it: from how it really runs."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from daemonproc import login, start_daemon, write_config
from kakao_tokend import supervisor, systemd
from kakao_tokend.config import RefreshPolicy, config_from_toml_text
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.health import assess, config_action
from kakao_tokend.i18n import LANGUAGES, Language
from kakao_tokend.paths import SYSTEM
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountStatus, Health
from kakao_tokend.supervisor import Supervisor, unit_from_cgroup
from kakao_tokend.tokens import TokenSet, utcnow

SYSTEM_UNIT = Supervisor("system")
USER_UNIT = Supervisor("user")
TEMPLATE_UNIT = Supervisor("system", "kakao-tokend@shop")
BY_HAND = Supervisor(None)
TO_A_FILE = Supervisor(None, log_file="/var/log/kakao-tokend.log")


# --------------------------------------------------------------------------- where it runs


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        ("0::/system.slice/kakao-tokend.service\n", ("system", "kakao-tokend")),
        (
            "0::/system.slice/system-kakao\\x2dtokend.slice/kakao-tokend@shop.service\n",
            ("system", "kakao-tokend@shop"),
        ),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/kakao-tokend.service\n",
            ("user", "kakao-tokend"),
        ),
        # cgroup v1: systemd's own hierarchy names the unit.
        (
            "12:pids:/system.slice/kakao-tokend.service\n"
            "1:name=systemd:/system.slice/kakao-tokend.service\n",
            ("system", "kakao-tokend"),
        ),
        # A unit with Delegate= may move its process into a group of its own below the unit.
        ("0::/system.slice/my-tokens.service/payload\n", ("system", "my-tokens")),
        # A login shell, a container, nothing: not a service.
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        ("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", None),
        ("4:memory:/process_api/e7a1\n0::/\n", None),
        ("", None),
    ],
)
def test_the_unit_comes_from_the_cgroup(cgroup: str, expected: tuple[str, str] | None) -> None:
    """The process's cgroup path names its service unit and whether a user's manager runs
    it (its path passes through user@UID.service)."""
    assert unit_from_cgroup(cgroup) == expected


def test_this_process_is_recognised_from_systemds_traces(tmp_path: Path) -> None:
    """INVOCATION_ID (set by systemd for a service only) and the cgroup decide the manager
    and unit; a stderr that is a regular file is where the log goes, the journal is when
    JOURNAL_STREAM names stderr."""
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n")
    log = tmp_path / "daemon.log"
    with log.open("wb") as file:
        fd = file.fileno()
        stat = os.fstat(fd)
        journal = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        found = systemd.supervisor({"INVOCATION_ID": "ab12", **journal}, cgroup=cgroup, fd=fd)
        assert found == Supervisor("user", "x")
        found = systemd.supervisor({"INVOCATION_ID": "ab12"}, cgroup=cgroup, fd=fd)
        assert found == Supervisor("user", "x", log_file=str(log))
        assert systemd.supervisor({}, cgroup=cgroup, fd=fd) == Supervisor(None, log_file=str(log))
        missing = tmp_path / "no-cgroup"
        assert systemd.supervisor({"INVOCATION_ID": "ab12", **journal}, cgroup=missing, fd=fd) == (
            Supervisor(None)
        )
    read, write = os.pipe()
    try:
        assert systemd.supervisor({}, cgroup=cgroup, fd=write) == BY_HAND
        assert systemd.supervisor({"INVOCATION_ID": ""}, cgroup=cgroup, fd=write) == BY_HAND
    finally:
        os.close(read)
        os.close(write)


def test_from_a_shell_the_config_file_says_which_unit(tmp_path: Path) -> None:
    """`status` and `doctor` run from a shell: the system config (or root) means the system
    unit, any other config the user's unit (the rule doctor's unit check uses too)."""
    assert supervisor.for_config(SYSTEM.config_file, euid=1000) == SYSTEM_UNIT
    assert supervisor.for_config(tmp_path / "config.toml", euid=1000) == USER_UNIT
    assert supervisor.for_config(tmp_path / "config.toml", euid=0) == SYSTEM_UNIT
    assert supervisor.for_config(None, euid=1000) == USER_UNIT


# --------------------------------------------------------------------------- the commands


@pytest.mark.parametrize(
    ("who", "log", "restart"),
    [
        (SYSTEM_UNIT, "`journalctl -u kakao-tokend`", "systemctl restart kakao-tokend"),
        (
            USER_UNIT,
            "`journalctl --user-unit kakao-tokend`",
            "systemctl --user restart kakao-tokend",
        ),
        (
            TEMPLATE_UNIT,
            "`journalctl -u kakao-tokend@shop`",
            "systemctl restart kakao-tokend@shop",
        ),
        (BY_HAND, "the standard error of `kakao-tokend run`", None),
        (TO_A_FILE, "the file /var/log/kakao-tokend.log", None),
        (
            Supervisor("system", log_file="/var/log/kt.log"),
            "the file /var/log/kt.log",
            "systemctl restart kakao-tokend",
        ),
    ],
)
def test_each_way_of_running_has_its_log_and_restart(
    who: Supervisor, log: str, restart: str | None
) -> None:
    """The log is the unit's journal (system or user manager), or where stderr goes; the
    restart is the unit's, or none a command could do for a daemon run by hand."""
    assert who.log.render("en") == log
    assert who.restart_command == restart
    fix, _ = config_action(who)
    expected = f"run `{restart}`" if restart else "restart kakao-tokend"
    assert fix.render("en") == f"fix [kakao] or the secrets, then {expected}"


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("who", [SYSTEM_UNIT, USER_UNIT, TEMPLATE_UNIT, BY_HAND, TO_A_FILE])
def test_every_condition_points_at_this_daemons_log_and_restart(
    who: Supervisor, language: Language
) -> None:
    """Each condition whose fix names the log or a restart names this daemon's, in both
    languages: never `journalctl -u` or `systemctl` for a daemon no unit runs, never the
    system unit for a user's."""
    account = config_from_toml_text(
        '[paths]\nstate_dir = "/s"\nruntime_dir = "/r"\n[kakao]\nrest_api_key = "k"\n',
        source=None,
        environ={},
    ).accounts["default"]
    now = utcnow()
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=now + timedelta(seconds=30),
        refresh_expires_at=now + timedelta(days=30),
        access_issued_at=now - timedelta(hours=6),
    )
    state = AccountState(account.name, tokens)
    texts: list[str] = []
    for health, label in (
        (Health.CONFIG, "KOE010"),
        (Health.RETRYING, "timeout"),
        (Health.RETRYING, "lock_error"),
    ):
        status = AccountStatus()
        status.health = health
        status.last_error_class = label
        status.failing_since = now - timedelta(hours=2)
        status.store_unavailable_since = now - timedelta(hours=2)
        graded = assess(account, state, status, RefreshPolicy(), now, supervisor=who)
        names = graded.names()
        assert "config" in names or "access_expiring" in names, names
        assert "store_unavailable" in names, names
        texts += [c.action.render(language) for c in graded.conditions]
        if health is Health.CONFIG:
            [config] = [c for c in graded.conditions if c.name == "config"]
            assert config.command == who.restart_command
    text = "\n".join(texts)
    assert who.log.render(language) in text
    if who.manager is None:
        assert "systemctl" not in text and "journalctl" not in text, text
    if who.manager == "user":
        assert "journalctl -u " not in text and "systemctl restart" not in text, text
    if who.restart_command is not None:
        assert f"`{who.restart_command}`" in text


# --------------------------------------------------------------------------- a real daemon


async def test_a_daemon_run_by_hand_points_at_its_own_log(
    tmp_path: Path, emulator: KakaoEmulator
) -> None:
    """`kakao-tokend run` from a shell, its output going to a file: when Kakao refuses the
    client secret, the status's fix says to restart kakao-tokend (no systemctl) and where
    the details are (that file, not a journal no unit writes to)."""
    config = write_config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config, env={"INVOCATION_ID": ""})  # no unit runs it
    try:
        emulator.regenerate_client_secret()
        status, _ = await daemon.api("POST", "/v1/accounts/default/refresh")
        assert status != 200
        _, body = await daemon.api("GET", "/v1/status")
        [config_condition] = [
            c for c in body["accounts"][0]["conditions"] if c["condition"] == "config"
        ]
        fix = config_condition["fix"]
        assert "KOE010" in config_condition["message"]
        assert "systemctl" not in fix and "journalctl" not in fix, fix
        assert "restart kakao-tokend" in fix and str(daemon.log_path) in fix, fix
        assert config_condition["command"] is None
    finally:
        assert await daemon.stop() == 0
