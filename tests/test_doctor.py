"""`kakao-tokend doctor`: every check against the emulator and real files, each ✗ with its fix."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from daemonproc import login, run_cli, start_daemon, write_config
from kakao_tokend import doctor
from kakao_tokend.config import load_config
from kakao_tokend.emulator import DEFAULT_USER_ID, KakaoEmulator
from kakao_tokend.tokens import utcnow

pytestmark = pytest.mark.timeout(90)
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def shared() -> Iterator[Path]:
    """A working directory under /tmp that other users may enter (for consumer checks)."""
    directory = Path(tempfile.mkdtemp(prefix="kakao-doctor-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def lines(out: str) -> dict[str, str]:
    """Map each check's name to its line (without the mark)."""
    found = {}
    for line in out.splitlines():
        if line[:2] in ("✓ ", "✗ ", "– "):
            name, _, _ = line[2:].partition(": ")
            if line[2:].count(": ") > 1 and name.startswith(("default", "bot", "socket for")):
                name = ": ".join(line[2:].split(": ")[:2])
            found[name] = line
    return found


def fix_after(out: str, name: str) -> str:
    """Return the `fix:` line that follows the check called ``name``."""
    rows = out.splitlines()
    for index, row in enumerate(rows):
        if row[2:].startswith(f"{name}:"):
            following = rows[index + 1].strip()
            assert following.startswith("fix: "), out
            return following.removeprefix("fix: ")
    raise AssertionError(f"no check {name!r} in:\n{out}")


class TestHealthy:
    """A logged-in account with its daemon running: every line is a tick."""

    async def test_all_ticks_and_exit_0(self, shared: Path, emulator: KakaoEmulator) -> None:
        """Config, directories, state, Kakao, clock and socket all pass; exit 0 like status."""
        config = write_config(shared, emulator)
        await login(emulator, config)
        daemon = await start_daemon(config)
        try:
            code, out, err = await run_cli(config, "doctor")
        finally:
            await daemon.stop()
        assert code == 0, out + err
        marks = [line[0] for line in out.splitlines() if not line.startswith("    ")]
        assert set(marks) <= {"✓", "–"}, out
        found = lines(out)
        assert "is valid: account(s) default" in found["config"]
        assert "client secret from file" in found["config"]
        assert f"access_token_info: user {DEFAULT_USER_ID}" in found["default: Kakao"]
        assert "within" in found["clock"]
        assert "the daemon answers on" in found["socket"]
        assert "--consumer" in found["consumer"]

    async def test_json_lists_every_check(self, shared: Path, emulator: KakaoEmulator) -> None:
        """--json: one object per check with its result and fix, plus the exit code."""
        config = write_config(shared, emulator)
        await login(emulator, config)
        code, out, _ = await run_cli(config, "doctor", "--json")
        document = json.loads(out)
        assert document["exit_code"] == code == 1  # no daemon: a warning
        by_name = {check["check"]: check for check in document["checks"]}
        assert by_name["socket"]["result"] == "failed"
        assert by_name["socket"]["level"] == "warning"
        assert "kakao-tokend run" in by_name["socket"]["fix"]
        assert by_name["default: state"]["result"] == "ok"


class TestProblems:
    """Each broken thing is a ✗ with the command that fixes it."""

    async def test_modes_and_owners(self, shared: Path, emulator: KakaoEmulator) -> None:
        """A world-writable state directory and a readable state file: chmod fixes, exit 2."""
        config = write_config(shared, emulator)
        await login(emulator, config)
        state_dir = shared / "state"
        state_dir.chmod(0o777)
        (state_dir / "default.state.json").chmod(0o644)
        code, out, err = await run_cli(config, "doctor")
        assert code == 2, out + err
        assert lines(out)["state directory"].startswith("✗")
        assert fix_after(out, "state directory") == f"chmod go-w {state_dir}"
        assert fix_after(out, "default: state file") == f"chmod 600 {state_dir}/default.state.json"

    async def test_no_tokens_is_critical_with_the_login(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """No state: exit 2 (as `status`), and the fix is the login command (with the config
        file, which is not the one a plain `kakao-tokend` finds)."""
        config = write_config(shared, emulator)
        code, out, _ = await run_cli(config, "doctor")
        assert code == 2
        assert fix_after(out, "default: state") == f"`kakao-tokend --config {config} login`"

    async def test_a_broken_config_names_itself_in_the_check_config_fix(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """A config with a mistake: ✗ config, and check-config is run on that file."""
        config = write_config(shared, emulator)
        config.write_text(config.read_text() + '\n[refresh]\nrefresh_att = "70%"\n')
        code, out, _ = await run_cli(config, "doctor")
        assert code == 2, out
        assert lines(out)["config"].startswith("✗")
        fix = fix_after(out, "config")
        assert fix == f"edit {config}, then `kakao-tokend --config {config} check-config`"

    @pytest.mark.parametrize(
        ("content", "said"),
        [
            (b"[kakao\n", "is not valid TOML"),
            (b'[kakao]\nrest_api_key = "\xff"\n', "is not UTF-8 text"),
        ],
    )
    async def test_a_config_that_cannot_be_parsed_is_said_once(
        self, shared: Path, emulator: KakaoEmulator, content: bytes, said: str
    ) -> None:
        """Not TOML, not UTF-8: the ✗ config line said the loader's message twice over
        ("... is not UTF-8 text ...; save it as UTF-8 config file ... is not UTF-8 text ...")."""
        config = write_config(shared, emulator)
        config.write_bytes(content)
        code, out, _ = await run_cli(config, "doctor")
        assert code == 2, out
        line = lines(out)["config"]
        assert line.count(said) == 1, line
        assert line.count(str(config)) == 1, line

    async def test_a_state_directory_no_file_can_be_created_in_is_critical(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """state_dir = "/proc/1": root's, mode 0555, so the owner and mode checks passed (and
        check-config, which judges the file, not the machine, says OK), yet every command
        failed to create its lock file there. doctor, run as the daemon's user, tries."""
        if os.geteuid() != 0:
            pytest.skip("needs root: the daemon's user must own /proc/1")
        config = write_config(shared, emulator)
        state_line = f'state_dir = "{shared / "state"}"'
        config.write_text(config.read_text().replace(state_line, 'state_dir = "/proc/1"'))
        code, out, _ = await run_cli(config, "doctor")
        assert code == 2, out
        line = lines(out)["state directory"]
        assert line.startswith("✗") and "cannot create a file in /proc/1" in line, line
        assert "paths.state_dir" in fix_after(out, "state directory")

    async def test_fixes_for_another_account_put_the_account_first(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """--account is a global option: the printed command must be one that runs."""
        config = write_config(shared, emulator, accounts=("default", "bot"))
        code, out, _ = await run_cli(config, "doctor")
        assert code == 2
        expected = f"`kakao-tokend --config {config} --account bot login`"
        assert fix_after(out, "bot: state") == expected

    async def test_a_token_kakao_rejects_is_found_live(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """The state looks fine, but Kakao says -401: a ✗ whose fix is a refresh."""
        config = write_config(shared, emulator)
        await login(emulator, config)
        emulator.inject("access_token_info", "-401")
        code, out, _ = await run_cli(config, "doctor")
        assert code == 1, out
        assert lines(out)["default: state"].startswith("✓")
        assert "no longer accepts the stored access token" in lines(out)["default: Kakao"]
        assert fix_after(out, "default: Kakao") == f"`kakao-tokend --config {config} refresh`"

    async def test_an_unreadable_secret_is_a_config_problem(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """A secret file others can read is refused by the config check, which says why."""
        config = write_config(shared, emulator)
        (shared / "client_secret").chmod(0o644)
        code, out, _ = await run_cli(config, "doctor")
        assert code == 2
        assert lines(out)["config"].startswith("✗")
        assert "chmod 600" in lines(out)["config"]
        assert "check-config" in fix_after(out, "config")
        assert "state directory" in lines(out)  # the other checks still ran


@pytest.mark.skipif(not IS_ROOT, reason="checking another user's access needs root")
class TestConsumer:
    """--consumer USER|GROUP: can that program read the token file and reach the socket?"""

    async def test_a_user_behind_a_private_directory(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """nobody cannot enter a 0700 state directory: named, with the group fix."""
        config = write_config(shared, emulator)
        await login(emulator, config)
        (shared / "state").chmod(0o700)
        code, out, _ = await run_cli(config, "doctor", "--consumer", "nobody")
        assert code == 2
        line = lines(out)["default: token file for user nobody"]
        assert line.startswith("✗") and f"{shared / 'state'} is root:root 0700" in line
        fix = fix_after(out, "default: token file for user nobody")
        assert fix == f"chgrp nogroup {shared / 'state'} && chmod g+x {shared / 'state'}"

    async def test_a_group_with_the_publish_group_passes(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """[publish] group = nogroup on a 0750 root:nogroup directory: members read the file."""
        config = write_config(shared, emulator, extra='[publish]\ngroup = "nogroup"\n')
        await login(emulator, config)
        os.chown(shared / "state", -1, 65534)
        (shared / "state").chmod(0o750)
        _, out, _ = await run_cli(config, "doctor", "--consumer", "nogroup")
        line = lines(out)["default: token file for group nogroup"]
        assert line.startswith("✓") and "checked as that user" in line, out
        assert lines(out)["default: [publish] group"].startswith("✓"), out

    async def test_the_token_file_without_the_group_gets_the_config_fix(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """The way is open but the file is 0640 root:root: set [publish] group."""
        config = write_config(shared, emulator)
        await login(emulator, config)
        (shared / "state").chmod(0o755)
        code, out, _ = await run_cli(config, "doctor", "--consumer", "nogroup")
        assert code == 2
        fix = fix_after(out, "default: token file for group nogroup")
        assert fix.startswith('set [publish] group = "nogroup" and mode = "0640"')

    async def test_unknown_consumer_is_a_usage_error(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """A name that is no user and no group: exit 64 naming it."""
        config = write_config(shared, emulator)
        code, _, err = await run_cli(config, "doctor", "--consumer", "no-such-thing-42")
        assert code == 64
        assert "no user or group named 'no-such-thing-42'" in err


class TestCheckConfigGroups:
    """check-config says what to run when a configured group cannot reach its files."""

    async def test_publish_group_behind_a_private_directory(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """A 0700 state directory with [publish] group: exit 0 with the chgrp command."""
        config = write_config(shared, emulator, extra='[publish]\ngroup = "nogroup"\n')
        state = shared / "state"
        state.mkdir(mode=0o700)
        state.chmod(0o700)
        code, out, err = await run_cli(config, "check-config")
        assert code == 0, out + err
        assert "warning: default: [publish] group: group nogroup cannot reach" in err
        assert f"run: chgrp nogroup {state} && chmod g+x {state}" in err

    async def test_socket_group_with_a_missing_runtime_directory(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """[api] socket_group with no runtime directory yet: create it with the group first."""
        config = write_config(shared, emulator, extra='[api]\nsocket_group = "nogroup"\n')
        code, _, err = await run_cli(config, "check-config")
        assert code == 0
        assert f"run: install -d -m 0750 -g nogroup {shared / 'run'}" in err


class TestClock:
    """The clock against Kakao's Date header (the emulator's aiohttp server sets it)."""

    async def test_a_clock_in_step(self, shared: Path, emulator: KakaoEmulator) -> None:
        """Our clock and the server's agree within the limit."""
        config = load_config(write_config(shared, emulator))
        finding = await doctor.check_clock(config)
        assert finding.level == doctor.OK, finding

    async def test_a_clock_three_minutes_fast(self, shared: Path, emulator: KakaoEmulator) -> None:
        """A local clock 3 minutes ahead is a ✗ saying by how much, with the NTP fix."""
        config = load_config(write_config(shared, emulator))

        def fast() -> object:
            return utcnow() + timedelta(minutes=3)

        finding = await doctor.check_clock(config, clock=fast)  # type: ignore[arg-type]
        assert finding.level == doctor.WARNING
        # Kakao's Date header counts whole seconds, so the measured skew is 3 minutes ± 1 s.
        assert re.search(r"clock is (2m59s|3m00s|3m01s) ahead of Kakao's", finding.detail), (
            finding.detail
        )
        assert finding.fix is not None and "timedatectl set-ntp true" in finding.fix


class TestUnit:
    """The systemd unit, when systemd runs the machine (the marker directory exists)."""

    def test_no_systemd_is_skipped(self, shared: Path, emulator: KakaoEmulator) -> None:
        """Without /run/systemd/system the check is shown as skipped, never failed."""
        config = load_config(write_config(shared, emulator))
        finding = doctor.check_unit(config, marker=shared / "no-such")
        assert finding.skipped and finding.level == doctor.OK

    def test_missing_unit_installed_and_stopped_and_running(
        self, shared: Path, emulator: KakaoEmulator
    ) -> None:
        """Missing: the install command; installed but inactive: enable --now; active: ok."""
        config = load_config(write_config(shared, emulator))
        marker = shared / "systemd-marker"
        marker.mkdir()
        units = shared / "units"
        units.mkdir()
        answers = {"is-active": "active", "is-enabled": "enabled"}

        def systemctl(args: object) -> str:
            return answers[list(args)[-2]]  # type: ignore[call-overload]

        missing = doctor.check_unit(config, marker=marker, unit_dirs=[units], systemctl=systemctl)
        assert missing.level == doctor.WARNING
        assert missing.fix is not None and "kakao-tokend.service" in missing.fix
        assert "daemon-reload" in missing.fix
        (units / "kakao-tokend.service").write_text("[Service]\n")
        answers["is-active"] = "inactive"
        stopped = doctor.check_unit(config, marker=marker, unit_dirs=[units], systemctl=systemctl)
        assert stopped.level == doctor.WARNING and stopped.fix is not None
        assert stopped.fix.endswith("enable --now kakao-tokend")
        answers["is-active"] = "active"
        running = doctor.check_unit(config, marker=marker, unit_dirs=[units], systemctl=systemctl)
        assert running.level == doctor.OK and "active, enabled" in running.detail


@pytest.mark.parametrize("command", [("doctor",), ("status",), ("status", "--json")])
@pytest.mark.parametrize(
    "damage",
    # Nested deeper than Python's parser recurses: was "internal error: RecursionError", 70.
    [b'{"version": 1, "acc', b"[" * 20000 + b"]" * 20000],
    ids=["torn", "nested too deep"],
)
async def test_doctor_and_status_report_a_damaged_state_file_without_moving_it(
    tmp_path: Path, command: tuple[str, ...], damage: bytes
) -> None:
    """`doctor` says it changes nothing, and `status` only reads: a damaged state file is
    reported (critical, with the fix) and left where it is, byte for byte."""
    config = write_config(tmp_path)
    state = tmp_path / "state" / "default.state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(damage)
    state.chmod(0o600)
    code, out, err = await run_cli(config, *command)
    assert code == 2, out + err
    assert "damaged" in out + err
    assert "Traceback" not in out + err
    assert "internal error" not in out + err
    assert state.read_bytes() == damage
    assert list(state.parent.glob("default.state.json.corrupt-*")) == []
