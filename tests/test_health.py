"""One grading of an account: the CLI, the API, the alerts and the metrics never disagree.

health.assess is the one place that decides what is wrong with an account. These tests
drive the real readers of that decision — the API's /v1/status and /healthz handlers, the
CLI's `status` built from the daemon's answer and from the files, the alerts and /metrics — with
accounts in every state hypothesis can think of, and check that they say the same thing.
The login hint they all give is checked too: the exact command, with ``--config`` and
``--account`` when (and only when) a person needs them.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from daemonproc import login, run_cli, start_daemon, write_config
from kakao_tokend import api, cli, doctor, memo
from kakao_tokend.access import Identity
from kakao_tokend.alerts import AccountAlerts
from kakao_tokend.config import (
    AccountConfig,
    AlertsConfig,
    Config,
    config_from_toml_text,
    load_config,
)
from kakao_tokend.daemon import DAEMON, Daemon
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.health import FROM_FILES, AccountHealth, assess, store_unavailable_condition
from kakao_tokend.metrics import DaemonCollector
from kakao_tokend.paths import SYSTEM
from kakao_tokend.refresher import AccountManager
from kakao_tokend.relogin import ReloginCause, cli_command, login_command, new_account_command
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountStatus, Health
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0
ACCESS_LIFE = 21599.0
LEVELS = {"ok": 0, "warning": 1, "critical": 2}


def make_config(directory: Path, *, thresholds: list[str], critical_below: str) -> Config:
    """Two accounts, "default" and "bot", with an expiry ladder of their own."""
    quoted = ", ".join(f'"{t}"' for t in thresholds)
    text = (
        f'[paths]\nstate_dir = "{directory}"\nruntime_dir = "{directory}/run"\n'
        '[kakao]\nrest_api_key = "k"\n'
        "[alerts]\nkakaotalk = false\n"
        f'thresholds = [{quoted}]\ncritical_below = "{critical_below}"\n'
        "[accounts.default]\n[accounts.bot]\n"
    )
    return config_from_toml_text(text, source=None, environ={})


def on_the_unix_socket(method: str, path: str, app: web.Application) -> web.Request:
    """A request as the API's Unix socket receives it (its socket name is a path, so the
    answers hold every detail; aiohttp's mocked request comes from TCP by default)."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        "/run/kakao-tokend/api.sock" if key == "sockname" else default
    )
    return make_mocked_request(method, path, app=app, transport=transport)


@dataclass(frozen=True)
class Case:
    """One account as hypothesis made it: its name, stored state and live status."""

    name: str
    state: AccountState | None
    steps: tuple[str, ...]
    thresholds: tuple[str, ...]
    critical_below: str

    def status(self) -> AccountStatus:
        """Replay the named transitions a daemon could have gone through."""
        status = AccountStatus()
        status.adopted(self.state)
        for step in self.steps:
            if step == "transient" and self.state is not None:
                status.failed_transient(
                    "Kakao server error",
                    "http503",
                    now=NOW - timedelta(hours=2),
                    retry_at=NOW + timedelta(seconds=30),
                )
            elif step == "relogin":
                status.failed_permanent(
                    Health.RELOGIN, "refused", "KOE322", now=NOW, cause=ReloginCause.REVOKED
                )
            elif step == "config":
                status.failed_permanent(Health.CONFIG, "bad key", "KOE101", now=NOW)
            elif step == "unreadable":
                status.unreadable("state file damaged")
            elif step == "write_failed":
                status.write_failed("cannot write: No space left on device")
            elif step == "publish_failed":
                status.publish_failed("token file: cannot write")
            elif step == "conflict":
                status.conflicted("an old backup was copied over the state file")
            elif step == "missed_rotation":
                status.rotation_missed()
            elif step == "succeeded" and self.state is not None:
                status.succeeded(NOW, rotated=False)
            elif step == "reloaded":
                status.config_reloaded(NOW)
            elif step == "saved":
                status.saved()
            elif step == "published":
                status.published()
        return status


@st.composite
def token_states(draw: st.DrawFn, name: str) -> AccountState | None:
    if draw(st.booleans()):
        return None
    access_left = draw(st.floats(min_value=-2 * DAY, max_value=ACCESS_LIFE))
    refresh_left = draw(st.floats(min_value=-5 * DAY, max_value=70 * DAY))
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW + timedelta(seconds=access_left),
        refresh_expires_at=NOW + timedelta(seconds=refresh_left),
        access_issued_at=NOW + timedelta(seconds=access_left - ACCESS_LIFE),
    )
    cause = draw(st.sampled_from([None, *ReloginCause]))
    reason = draw(st.sampled_from([None, "tokens revoked at Kakao (KOE322)"]))
    return AccountState(
        name,
        tokens,
        relogin_reason=reason,
        relogin_cause=cause.value if cause is not None and reason else None,
    )


STEPS = (
    "transient",
    "relogin",
    "config",
    "unreadable",
    "write_failed",
    "publish_failed",
    "conflict",
    "missed_rotation",
    "succeeded",
    "reloaded",
    "saved",
    "published",
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    name = draw(st.sampled_from(["default", "bot"]))
    ladder = draw(
        st.lists(st.sampled_from(["60d", "30d", "14d", "7d", "3d", "1d", "1h"]), min_size=1)
    )
    return Case(
        name=name,
        state=draw(token_states(name)),
        steps=tuple(draw(st.lists(st.sampled_from(STEPS), max_size=4))),
        thresholds=tuple(dict.fromkeys(ladder)),
        critical_below=draw(st.sampled_from(["12h", "3d", "20d"])),
    )


async def every_view(case: Case, directory: Path) -> dict[str, Any]:
    """What the API, the CLI (from the daemon's answer) and the alerts say about ``case``."""
    config = make_config(
        directory, thresholds=list(case.thresholds), critical_below=case.critical_below
    )
    account = config.accounts[case.name]
    manager = AccountManager(
        account,
        store=AccountStore(account),
        client=None,  # type: ignore[arg-type]  # grading never calls Kakao
        policy=config.refresh,
        clock=lambda: NOW,
    )
    manager.state = case.state
    manager.status = case.status()
    app = web.Application()
    app[DAEMON] = Daemon(config=config, clock=lambda: NOW, managers={case.name: manager})
    answer = await api.status(on_the_unix_socket("GET", "/v1/status", app))
    [entry] = json.loads(answer.text)["accounts"]
    healthz = await api.healthz(on_the_unix_socket("GET", "/healthz", app))
    report = cli._report_from_daemon(entry)
    alerts = AccountAlerts(
        manager,
        session=None,  # type: ignore[arg-type]  # no channel but the log (kakaotalk = false)
        clock=lambda: NOW,
        host="box",
        retry_delay=0.01,
    )
    fired = alerts.evaluate(NOW)
    scraped = {
        (sample.name, sample.labels.get("severity")): sample.value
        for family in DaemonCollector(app[DAEMON]).collect()
        for sample in family.samples
        if sample.labels.get("account") == case.name
    }
    return {
        "account": account,
        "entry": entry,
        "healthz": (healthz.status, json.loads(healthz.text)),
        "report": report,
        "fired": fired,
        "metrics": scraped,
    }


@settings(max_examples=300, deadline=None)
@given(case=cases())
def test_the_cli_the_api_and_the_alerts_never_disagree(case: Case) -> None:
    """For any account state and any history of its status: /v1/status, `status` built from
    it and the alerts name the same conditions with the same severities and the same level;
    /healthz and the serving metric fail exactly when the grading says consumers lack a valid,
    current token; /metrics counts the same conditions at the same level; and `status` gives
    each fix command once."""
    with tempfile.TemporaryDirectory() as directory:
        seen = asyncio.run(every_view(case, Path(directory)))
    entry, report, fired = seen["entry"], seen["report"], seen["fired"]
    api_said = {c["condition"]: c["severity"] for c in entry["conditions"]}
    cli_said = {c["condition"]: c["severity"] for c in report.conditions}
    alerted = {a.condition: a.severity.label for a in fired}
    assert api_said == cli_said == alerted, case
    worst = max((LEVELS[s] for s in alerted.values()), default=0)
    assert LEVELS[entry["level"]] == report.level == worst
    code, body = seen["healthz"]
    assert (code == 200) == entry["serving"] == (entry["serving_problem"] is None)
    assert body == {"ok": True} if code == 200 else case.name in body["problems"]
    scraped = seen["metrics"]
    assert scraped["kakao_tokend_account_level", None] == worst
    assert scraped["kakao_tokend_account_serving", None] == (1.0 if entry["serving"] else 0.0)
    for severity in ("warning", "critical"):
        counted = scraped["kakao_tokend_account_conditions", severity]
        assert counted == sum(s == severity for s in api_said.values()), (severity, case)
    commands = [c["command"] for c in report.conditions if c["command"]]
    for command in set(commands):
        assert sum(command in line for line in report.data["problems"]) == 1, report.data
    if {"relogin", "no_tokens", "refresh_expiry"} & set(api_said):
        assert any(login_command(seen["account"]) in line for line in report.data["problems"])
    # Every command a condition names is one that runs for this account, not the default one.
    prefix = cli_command(seen["account"])
    for condition in entry["conditions"]:
        for command in re.findall(
            r"`(kakao-tokend[^`]*)`", condition["message"] + condition["fix"]
        ):
            assert command.startswith(prefix), (command, condition)


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_status_from_the_files_agrees_with_a_daemon_that_just_read_them(case: Case) -> None:
    """What the stored state decides (re-login, no tokens, the expiry ladder) is graded the
    same from the files alone as by a daemon that has just loaded them."""
    with tempfile.TemporaryDirectory() as directory:
        config = make_config(
            Path(directory), thresholds=list(case.thresholds), critical_below=case.critical_below
        )
    account = config.accounts[case.name]
    loaded = AccountStatus()
    loaded.adopted(case.state)
    by_daemon = assess(account, case.state, loaded, config.refresh, NOW)
    from_files = assess(account, case.state, None, config.refresh, NOW)
    stored = FROM_FILES - {"access_expired", "state_unreadable"}
    assert {(c.name, c.severity) for c in by_daemon.conditions if c.name in stored} == {
        (c.name, c.severity) for c in from_files.conditions if c.name in stored
    }
    assert set(c.name for c in from_files.conditions) <= FROM_FILES


def graded_key(health: AccountHealth) -> tuple[object, ...]:
    """What changes_at promises stays the same: conditions, severities, stages, and whether
    consumers are served and may make Kakao refresh."""
    conditions = sorted((c.name, c.severity, c.stage) for c in health.conditions)
    return (conditions, health.serving_problem is None, health.refresh_blocked is None)


@settings(max_examples=300, deadline=None)
@given(
    case=cases(),
    failing_for=st.none() | st.floats(min_value=0, max_value=2 * ACCESS_LIFE),
    store_down_for=st.none() | st.floats(min_value=0, max_value=2 * ACCESS_LIFE),
    from_files=st.booleans(),
    shares=st.lists(st.floats(min_value=0, max_value=1, exclude_max=True), min_size=1, max_size=4),
)
def test_the_grading_holds_until_the_moment_it_names(
    case: Case,
    failing_for: float | None,
    store_down_for: float | None,
    from_files: bool,
    shares: list[float],
) -> None:
    """Walk forward from NOW by changes_at alone (what the alerts do between events): at any
    later moment the grading equals the one at the last moment walked to, so grading again
    only at changes_at misses no condition that appears, goes, escalates or clears."""
    with tempfile.TemporaryDirectory() as directory:
        config = make_config(
            Path(directory), thresholds=list(case.thresholds), critical_below=case.critical_below
        )
    account = config.accounts[case.name]
    status: AccountStatus | None = None
    if not from_files:
        status = case.status()
        if failing_for is not None and status.failing_since is not None:
            status.failing_since = NOW - timedelta(seconds=failing_for)
        if store_down_for is not None:
            status.store_unavailable_since = NOW - timedelta(seconds=store_down_for)

    def grade(at: datetime) -> AccountHealth:
        return assess(account, case.state, status, config.refresh, at)

    walked = [(NOW, grade(NOW))]
    while walked[-1][1].changes_at is not None:
        at = walked[-1][1].changes_at
        assert at is not None and at > walked[-1][0]
        walked.append((at, grade(at)))
        assert len(walked) < 40, walked  # every moment is a threshold: few of them
    # Moments inside each stretch the walk skipped (the last one: 80 days long), and just
    # before each walked moment: the last chance for a change the walk would miss.
    ends = [at for at, _ in walked[1:]] + [walked[-1][0] + timedelta(days=80)]
    moments = [
        start + (end - start) * share
        for (start, _), end in zip(walked, ends, strict=True)
        for share in shares
    ]
    moments += [at - timedelta(microseconds=1) for at, _ in walked[1:]]
    for moment in moments:
        at, graded = max((w for w in walked if w[0] <= moment), key=lambda w: w[0])
        assert graded_key(grade(moment)) == graded_key(graded), (moment, at)


def test_changes_at_names_the_next_rung_of_the_ladder() -> None:
    """A healthy account with 40 days of refresh token left on a 30 d / 20 d ladder: the
    grading holds until just before 30 days are left, then until just before 20 days."""
    with tempfile.TemporaryDirectory() as directory:
        config = make_config(Path(directory), thresholds=["30d", "20d"], critical_below="20d")
    account = config.accounts["default"]
    expires = NOW + timedelta(days=40)
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW + timedelta(days=100),  # out of the way of the ladder
        refresh_expires_at=expires,
        access_issued_at=NOW,
    )
    state = AccountState("default", tokens)
    status = AccountStatus()
    status.adopted(state)
    tick = timedelta(microseconds=1)
    graded = assess(account, state, status, config.refresh, NOW)
    assert graded.conditions == () and graded.changes_at == expires - timedelta(days=30) - tick
    later = assess(account, state, status, config.refresh, graded.changes_at + 2 * tick)
    assert [c.severity.label for c in later.conditions] == ["warning"]
    assert later.changes_at == expires - timedelta(days=20) - tick


def test_a_missed_rotation_is_not_said_with_a_negative_time_left() -> None:
    """A refresh without the rotation it promised was flagged while the refresh token lived;
    it has expired since (by our clock). The EXPIRED condition says all there is: no
    "Kakao did not renew the refresh token although only -3h00m is left" beside it. Before
    that moment the missed rotation is said, with the positive time left."""
    with tempfile.TemporaryDirectory() as directory:
        config = make_config(Path(directory), thresholds=["14d"], critical_below="3d")
    account = config.accounts["default"]
    expires = NOW - timedelta(hours=3)
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW + timedelta(hours=5),
        refresh_expires_at=expires,
        access_issued_at=NOW - timedelta(hours=1),
    )
    state = AccountState("default", tokens)
    status = AccountStatus()
    status.adopted(state)
    status.rotation_missed()
    graded = assess(account, state, status, config.refresh, NOW)
    said = [c.to_json()["message"] for c in graded.conditions]
    assert graded.names() == ["refresh_expiry"], said
    assert not any(re.search(r"-\d", text) for text in said), said
    before = assess(account, state, status, config.refresh, expires - timedelta(hours=1))
    assert "missed_rotation" in before.names()
    assert any("only 1h00m is left" in c.to_json()["message"] for c in before.conditions)


# --------------------------------------------------------------------------- the login hint


def save(config_path: Path, account: str, **changes: Any) -> None:
    """Store a token set for ``account`` (a week of refresh token left unless changed)."""
    now = datetime.now(UTC)
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=now + timedelta(hours=5),
        refresh_expires_at=now + timedelta(days=40),
        access_issued_at=now - timedelta(hours=1),
    )
    token_changes = {k: v for k, v in changes.items() if k in TokenSet.__dataclass_fields__}
    state = AccountState(
        account,
        replace(tokens, **token_changes),
        relogin_reason=changes.get("relogin_reason"),
        relogin_cause=changes.get("relogin_cause"),
    )
    AccountStore(load_config(config_path).accounts[account]).save(state)


def dead(config_path: Path, account: str) -> None:
    """Store a refused token set whose refresh and access tokens have expired too."""
    now = datetime.now(UTC)
    save(
        config_path,
        account,
        access_expires_at=now - timedelta(hours=1),
        refresh_expires_at=now - timedelta(days=1),
        # What an older version saved: its own (wrong) idea of the command.
        relogin_reason="refresh token expired (KOE322); run `kakao-tokend login`",
        relogin_cause="expired",
    )


def two_accounts(path: Path) -> Path:
    """Write a config with "default" and "bot" at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[paths]\nstate_dir = "{path.parent / "state"}"\nruntime_dir = "{path.parent / "run"}"\n'
        '[kakao]\nrest_api_key = "k"\n[accounts.default]\n[accounts.bot]\n'
    )
    return path


def test_status_names_a_config_that_is_not_found_by_default_and_the_account_once(
    tmp_path: Path,
) -> None:
    """The reported bug: for account "bot" of a config given with --config, the re-login
    line said `run kakao-tokend login` (the wrong command) and the fix came twice. Now the one
    command that works — `kakao-tokend --config FILE --account bot login` — is said once."""
    config = two_accounts(tmp_path / "custom.toml")
    dead(config, "bot")
    result = CliRunner().invoke(cli.main, ["--config", str(config), "--account", "bot", "status"])
    assert result.exit_code == 2, result.output
    command = f"kakao-tokend --config {config} --account bot login"
    lines = [line for line in result.stdout.splitlines() if "login`" in line]
    assert len(lines) == 1, result.stdout
    assert f"`{command}`" in lines[0]
    assert "critical relogin" in result.stdout and "critical refresh_expiry" in result.stdout
    document = json.loads(
        CliRunner()
        .invoke(cli.main, ["--config", str(config), "--account", "bot", "status", "--json"])
        .stdout
    )
    [entry] = document["accounts"]
    assert {c["command"] for c in entry["conditions"]} == {command}


def test_the_config_a_plain_kakao_tokend_finds_is_not_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's own config file (found without --config) is not named in the hint, and the
    default account needs no --account; another account still does."""
    if SYSTEM.config_file.exists():
        pytest.skip(f"{SYSTEM.config_file} exists here: it is found before the user's file")
    for variable in ("KAKAO_TOKEND_CONFIG", "CONFIGURATION_DIRECTORY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = two_accounts(tmp_path / "xdg" / "kakao-tokend" / "config.toml")
    dead(config, "default")
    dead(config, "bot")
    for prefix in ([], ["--config", str(config)]):  # named or found: the same file
        result = CliRunner().invoke(cli.main, [*prefix, "status"])
        assert result.exit_code == 2, result.output
        assert "`kakao-tokend login`" in result.stdout
        assert "`kakao-tokend --account bot login`" in result.stdout
        assert "--config" not in result.stdout


def test_login_command_puts_the_global_options_first(tmp_path: Path) -> None:
    """The command is one that runs: global options before `login`; a path with a space is
    quoted for the shell."""
    config = two_accounts(tmp_path / "my configs" / "x.toml")
    loaded = load_config(config)
    assert login_command(loaded.accounts["bot"]) == (
        f"kakao-tokend --config '{config}' --account bot login"
    )
    assert login_command(loaded.accounts["default"]) == f"kakao-tokend --config '{config}' login"


def test_a_command_for_another_account_keeps_the_config_and_drops_the_account(
    tmp_path: Path,
) -> None:
    """The hint that points at a new account (import into NEW) names the config file a plain
    run would not find, and only the new --account, whichever account refused."""
    config = two_accounts(tmp_path / "my configs" / "x.toml")
    loaded = load_config(config)
    expected = f"kakao-tokend --config '{config}' --account NEW import FILE"
    for name in ("default", "bot"):
        assert new_account_command(loaded.accounts[name], "import", "FILE") == expected


def test_the_fixes_that_reload_name_the_config_the_daemon_reads(tmp_path: Path) -> None:
    """`reload` in doctor's publish fix and in memo's "not served" refusal carries --config
    (the socket is found through it) and no --account (reload is for every account)."""
    config = two_accounts(tmp_path / "cfg" / "x.toml")
    bot = load_config(config).accounts["bot"]
    reload = f"`kakao-tokend --config {config} reload`"
    group = Identity("group", "readers", None, 1234, frozenset({1234}))
    assert doctor._publish_fix(bot, group).endswith(reload)
    user = Identity("user", "alice", 1001, 1001, frozenset({1001}))
    assert doctor._publish_fix(bot, user).endswith(reload)
    refusal = memo._daemon_refusal(404, "unknown account", account=bot)
    assert refusal.hint is not None and refusal.hint.endswith(reload)


# --------------------------------------------------------------------------- thresholds

THRESHOLDS = '[alerts]\nthresholds = ["30d", "20d"]\ncritical_below = "20d"\n'


@pytest.mark.parametrize(
    ("days_left", "code", "level"), [(40, 0, "ok"), (25, 1, "warning"), (10, 2, "critical")]
)
def test_status_from_the_files_honours_the_alert_thresholds(
    tmp_path: Path, days_left: float, code: int, level: str
) -> None:
    """`status` grades the refresh token with [alerts] thresholds and critical_below (before,
    it used a fixed 14 d / 3 d: 10 days left with critical_below = 20 d was a mere warning)."""
    config = two_accounts(tmp_path / "config.toml")
    config.write_text(
        config.read_text().replace("[accounts.default]", THRESHOLDS + "[accounts.default]")
    )
    save(config, "default", refresh_expires_at=datetime.now(UTC) + timedelta(days=days_left))
    args = ["--config", str(config), "--account", "default", "status", "--json"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == code, result.output
    assert json.loads(result.stdout)["accounts"][0]["level"] == level


async def test_status_from_a_running_daemon_honours_the_alert_thresholds(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Through the real daemon: /v1/status, `status` and the alert all grade a refresh token
    with 10 days left as critical, because [alerts] critical_below is 20 days."""
    extra = THRESHOLDS.replace("[alerts]", "[alerts]\nkakaotalk = false")
    config = write_config(tmp_path, emulator, extra=extra)
    emulator.settings.refresh_lifetime = int(10 * DAY)  # what the login hands out
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("ALERT critical: account default: refresh_expiry")
        code, out, err = await run_cli(config, "status")
        assert code == 2, out + err
        assert "critical refresh_expiry" in out
        _, body = await daemon.api("GET", "/v1/status")
        [entry] = body["accounts"]
        assert entry["level"] == "critical"
        assert [c["condition"] for c in entry["conditions"]] == ["refresh_expiry"]
        # --warn/--crit still move the ladder, through the daemon too.
        code, out, err = await run_cli(config, "status", "--crit", "5d")
        assert code == 1, out + err
    finally:
        assert await daemon.stop() == 0


def test_a_status_without_tokens_exits_critical_like_the_alert(tmp_path: Path) -> None:
    """No tokens: `status` is critical, and so is the alert a daemon would send."""
    config = two_accounts(tmp_path / "config.toml")
    result = CliRunner().invoke(cli.main, ["--config", str(config), "status", "--json"])
    assert result.exit_code == 2
    [entry] = [a for a in json.loads(result.stdout)["accounts"] if a["account"] == "default"]
    assert [(c["condition"], c["severity"]) for c in entry["conditions"]] == [
        ("no_tokens", "critical")
    ]
    account: AccountConfig = load_config(config).accounts["default"]
    status = AccountStatus()
    status.adopted(None)
    graded = assess(account, None, status, load_config(config).refresh, datetime.now(UTC))
    assert [(c.name, c.severity.label) for c in graded.conditions] == [("no_tokens", "critical")]


def test_store_unavailable_says_what_holds_for_a_running_node_and_a_waiting_start() -> None:
    """The condition is graded for a running node (which serves the token it holds) and for
    a start waiting for the store (which serves none; its token files stay): its text says
    only what is true of both, in both languages: nothing is refreshed, and the current
    access token lasts until it expires. It claims no serving."""
    status = AccountStatus()
    status.store_unavailable_since = NOW - timedelta(seconds=ACCESS_LIFE)
    status.store_error = "cannot poll the store's accounts: the database did not answer within 7s"
    condition = store_unavailable_condition(status, NOW, AlertsConfig(), ACCESS_LIFE)
    assert condition is not None
    english = condition.message.render("en")
    assert "(timeout); not refreshing" in english
    assert "the current access token lasts only until it expires" in english
    assert "serving" not in english
    korean = condition.message.render("ko")
    assert "갱신하지 않으므로" in korean and "제공" not in korean


def test_a_healthy_status_holds_no_trouble_fields_and_gives_them_back_when_healthy_again() -> None:
    """A status's failure fields (errors, back-off, pending writes, the store's outage) are
    one object made at the first failure and dropped once all are clear again: a healthy
    account's status is five slots (10,000 on a fleet node). They read and assign as
    fields throughout."""
    status = AccountStatus()
    assert status._trouble is None and status.last_error is None and not status.write_pending
    small = sys.getsizeof(status)
    status.failed_transient("timed out", "timeout", now=NOW, retry_at=NOW + timedelta(seconds=5))
    assert (status.health, status.last_error, status.last_error_class) == (
        Health.RETRYING,
        "timed out",
        "timeout",
    )
    assert status.failing_since == NOW and status.next_attempt_at == NOW + timedelta(seconds=5)
    assert status._trouble is not None
    assert status.write_failed("disk full") and status.write_pending
    status.succeeded(NOW, rotated=False)
    assert status.write_pending and status.last_error is None and status._trouble is not None
    assert status.saved() and not status.write_pending
    assert status._trouble is None and sys.getsizeof(status) == small
    status.store_unavailable_since = NOW
    assert status.store_unavailable_since == NOW
    status.store_unavailable_since = None
    assert status._trouble is None


def test_access_expiring_waits_for_the_retry_after_one_failure_but_not_for_a_silent_one(
    tmp_path: Path,
) -> None:
    """A 6-second token, the default policy: one refresh failed with 0.5 s left (inside the
    page's 0.6 s margin) and its retry is due in 30 ms. The page waits until that retry could
    have run out its request (tokens.request_timeout: 0.285 s) — and comes then if the retry
    has not reported (a stalled daemon must still page); a second failure pages at once."""
    config = make_config(tmp_path, thresholds=["14d"], critical_below="3d")
    account = config.accounts["default"]
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW + timedelta(seconds=0.5),
        refresh_expires_at=NOW + timedelta(days=50),
        access_issued_at=NOW - timedelta(seconds=5.5),
    )
    state = AccountState("default", tokens)
    status = AccountStatus()
    status.adopted(state)
    retry_at = NOW + timedelta(seconds=0.03)
    status.failed_transient("timeout", "timeout", now=NOW, retry_at=retry_at)
    graded = assess(account, state, status, config.refresh, NOW)
    assert "access_expiring" not in graded.names()
    ends = retry_at + timedelta(seconds=0.285)
    assert graded.changes_at is not None and graded.changes_at <= ends
    assert "access_expiring" in assess(account, state, status, config.refresh, ends).names()
    status.failed_transient("timeout", "timeout", now=NOW, retry_at=retry_at)  # the second
    assert "access_expiring" in assess(account, state, status, config.refresh, NOW).names()


def test_access_expiring_waits_for_a_retry_as_long_as_its_grown_request(tmp_path: Path) -> None:
    """A 10-second token, the default policy: one refresh request went unanswered (a
    timeout) with 0.99 s left (inside the page's 1 s margin) and its retry is due in 30 ms.
    That retry may wait twice the fitted 0.475 s (tokens.request_timeout), so the page waits
    until 0.98 s from now, not 0.505 s: it paged while the retry that would succeed still
    waited for Kakao's answer. Once the retry has had that chance, it pages."""
    config = make_config(tmp_path, thresholds=["14d"], critical_below="3d")
    account = config.accounts["default"]
    assert account.app.timeout == 30.0  # the default: fitted to the token
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW + timedelta(seconds=0.99),
        refresh_expires_at=NOW + timedelta(days=50),
        access_issued_at=NOW - timedelta(seconds=9.01),
    )
    state = AccountState("default", tokens)
    status = AccountStatus()
    status.adopted(state)
    retry_at = NOW + timedelta(seconds=0.03)
    status.went_unanswered()
    status.failed_transient("timeout", "timeout", now=NOW, retry_at=retry_at)
    ends = retry_at + timedelta(seconds=0.95)
    for moment in (NOW, NOW + timedelta(seconds=0.6), ends - timedelta(milliseconds=1)):
        graded = assess(account, state, status, config.refresh, moment)
        assert "access_expiring" not in graded.names()
    assert "access_expiring" in assess(account, state, status, config.refresh, ends).names()


@pytest.mark.parametrize(
    ("label", "fix"),
    [
        ("lock_error", "the account's files"),
        ("timeout", "reaches Kakao"),
        ("superseded", "other nodes"),
        ("row_lock_error", "the database"),
    ],
)
def test_the_fix_of_a_failing_refresh_names_where_it_fails(
    tmp_path: Path, label: str, fix: str
) -> None:
    """Refreshes that fail to take the account's lock file (a read-only or full disk, a
    directory another user owns) are not "check that this host reaches Kakao": the fix
    points at the files; a timeout still points at the network; a fleet node waiting for
    another node's unsaved rotation (a refusal it waits out) points at the other nodes, and
    one that cannot take the account's row lock (the database away) at the database."""
    config = make_config(tmp_path, thresholds=["14d"], critical_below="3d")
    account = config.accounts["default"]
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW - timedelta(seconds=1),
        refresh_expires_at=NOW + timedelta(days=50),
        access_issued_at=NOW - timedelta(seconds=7),
    )
    state = AccountState("default", tokens)
    status = AccountStatus()
    status.adopted(state)
    for _ in range(2):
        status.failed_transient("it failed", label, now=NOW, retry_at=NOW + timedelta(seconds=1))
    graded = assess(account, state, status, config.refresh, NOW)
    (condition,) = [c for c in graded.conditions if c.name == "access_expiring"]
    assert condition.action is not None and fix in condition.action.render("en")


def test_refreshing_that_failed_past_the_expiry_says_the_token_expired(tmp_path: Path) -> None:
    """Refreshing has failed long enough to warn, and the access token is already gone: the
    warning says it has expired, not that it is "valid for -3s more"."""
    config = make_config(tmp_path, thresholds=["14d"], critical_below="3d")
    account = config.accounts["default"]
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW - timedelta(seconds=3),
        refresh_expires_at=NOW + timedelta(days=50),
        access_issued_at=NOW - timedelta(seconds=9),
    )
    state = AccountState("default", tokens)
    status = AccountStatus()
    status.adopted(state)
    started = NOW - timedelta(seconds=8)
    status.failed_transient("it failed", "timeout", now=started, retry_at=NOW)
    status.failed_transient("it failed", "timeout", now=NOW, retry_at=NOW + timedelta(seconds=1))
    graded = assess(account, state, status, config.refresh, NOW)
    (condition,) = [c for c in graded.conditions if c.name == "refresh_failing"]
    for language in ("en", "ko"):
        text = condition.message.render(language)
        assert "-3" not in text, text
    assert "expired" in condition.message.render("en").lower()


def test_a_commit_the_database_did_not_take_is_fixed_at_the_database(tmp_path: Path) -> None:
    """A fleet node's commit failed because PostgreSQL went away (no OS error): the
    write_failed alert points at the database, not at "free disk space or fix permissions"
    (an outside audit saw that fix on every database restart)."""
    from kakao_tokend.errors import DATABASE_WRITE

    config = make_config(tmp_path, thresholds=["14d"], critical_below="3d")
    account = config.accounts["default"]
    tokens = TokenSet(
        access_token="a" * 40,
        refresh_token="r" * 40,
        access_expires_at=NOW + timedelta(hours=5),
        refresh_expires_at=NOW + timedelta(days=50),
        access_issued_at=NOW - timedelta(hours=1),
    )
    state = AccountState("default", tokens)
    status = AccountStatus()
    status.adopted(state)
    status.write_failed("cannot commit account 'default' to the store", DATABASE_WRITE)
    graded = assess(account, state, status, config.refresh, NOW)
    (condition,) = [c for c in graded.conditions if c.name == "write_failed"]
    assert condition.action is not None
    english = condition.action.render("en")
    assert "the database" in english and "disk space" not in english, english
    assert "데이터베이스" in condition.action.render("ko")
