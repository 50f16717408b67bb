"""Templates: the token rendered into the consumer's own files by the real daemon process."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from daemonproc import REPO, login, run_cli, start_daemon, write_config
from kakao_tokend.alerts import PASSED_ENV
from kakao_tokend.config import config_from_toml_text
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.state import AccountState
from kakao_tokend.templates import PLACEHOLDERS, TemplateProblem, compile_template

pytestmark = pytest.mark.timeout(90)

SOURCE = """\
{
  "kakao": {"token": "{access_token}", "type": "{token_type}", "until": "{expires_at}"},
  "account": "{account}", "generation": {generation}, "lifetime": {expires_in},
  "shell": "${HOME} stays, {{literal} too"
}
"""

RECORDER = """
import json, os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(dict(os.environ)) + "\\n")
time.sleep(float(sys.argv[2]))
"""


def expected(state: AccountState) -> dict[str, Any]:
    """What SOURCE renders to for ``state``."""
    tokens = state.tokens
    return {
        "kakao": {
            "token": tokens.access_token,
            "type": tokens.token_type,
            "until": tokens.access_expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "account": state.account,
        "generation": state.generation,
        "lifetime": int(tokens.access_lifetime.total_seconds()),
        "shell": "${HOME} stays, {literal} too",
    }


def template_config(
    tmp_path: Path,
    emulator: KakaoEmulator,
    *,
    source: str = SOURCE,
    sleep: float = 0.0,
    extra_keys: str = "",
) -> Path:
    """A daemon config with one JSON template whose command records its environment."""
    (tmp_path / "bot.json.tmpl").write_text(source)
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    extra = f"""
[accounts.default]
[[accounts.default.templates]]
source = "bot.json.tmpl"
destination = "{tmp_path / "bot" / "kakao.json"}"
mode = "0600"
command = ["{sys.executable}", "{script}", "{tmp_path / "runs.jsonl"}", "{sleep}"]
{extra_keys}
"""
    return write_config(tmp_path, emulator, extra=extra)


def runs(tmp_path: Path) -> list[dict[str, str]]:
    """The environments of the template command's runs so far."""
    path = tmp_path / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def rendered(tmp_path: Path) -> dict[str, Any]:
    """The destination, parsed."""
    document: dict[str, Any] = json.loads((tmp_path / "bot" / "kakao.json").read_text())
    return document


class TestEngine:
    """The placeholder rules, without a daemon."""

    def test_only_known_lowercase_names_in_single_braces_are_replaced(self) -> None:
        """JSON braces, ${HOME} and other text pass through; {{ is a literal {."""
        template = compile_template(SOURCE, refresh_token_allowed=False)
        values = dict.fromkeys(PLACEHOLDERS, "V")
        text = template.substitute(values)
        assert '"token": "V"' in text and '"generation": V' in text
        assert '"shell": "${HOME} stays, {literal} too"' in text
        assert text.startswith("{\n")

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("a\n{acess_token}", 'line 2: unknown placeholder {acess_token}; did you mean "'),
            ("{{access_token}}", "write {access_token} with single braces"),
            ("{refresh_token}", "needs [publish] include_refresh_token = true"),
        ],
    )
    def test_a_bad_placeholder_is_named_with_its_line_and_the_fix(
        self, source: str, message: str
    ) -> None:
        """Unknown names (with a suggestion), mustache braces and a refresh token that is not
        published are refused before anything is rendered."""
        with pytest.raises(TemplateProblem, match=re.escape(message)):
            compile_template(source, refresh_token_allowed=False)

    def test_the_refresh_token_is_available_when_it_is_published(self) -> None:
        """With include_refresh_token the {refresh_token} placeholder is accepted."""
        template = compile_template("{refresh_token}", refresh_token_allowed=True)
        assert template.substitute(refresh_token="R") == "R"


class TestCheckConfig:
    """A template that cannot render is a configuration error (exit 78, key path)."""

    @pytest.mark.parametrize(
        ("source", "problem"),
        [
            ("ok {access_token}\nbad {expires}\n", "line 2: unknown placeholder {expires}"),
            (None, "does not exist; create the template file"),
            (b"\xff\xfe{access_token}", "is not UTF-8 text"),
        ],
    )
    async def test_check_config_names_the_template_and_the_problem(
        self, emulator: KakaoEmulator, tmp_path: Path, source: str | bytes | None, problem: str
    ) -> None:
        """`check-config` exits 78 with the template's key path and what is wrong with it."""
        config = template_config(tmp_path, emulator)
        path = tmp_path / "bot.json.tmpl"
        if source is None:
            path.unlink()
        elif isinstance(source, bytes):
            path.write_bytes(source)
        else:
            path.write_text(source)
        code, out, err = await run_cli(config, "check-config")
        assert code == 78, out + err
        line = next(line for line in err.splitlines() if "templates[0]" in line)
        assert line.strip().startswith("accounts.default.templates[0].source:"), err
        assert problem in line and str(path) in line, err
        assert "Traceback" not in err

    async def test_bad_template_settings_are_listed_with_their_keys(
        self, emulator: KakaoEmulator, tmp_path: Path
    ) -> None:
        """A mode open to others, a relative command and an unknown key are each reported."""
        config = template_config(tmp_path, emulator)
        text = config.read_text().replace('mode = "0600"', 'mode = "0644"\ndestnation = "x"')
        text = re.sub(r"command = \[.*\]", 'command = ["systemctl", "reload", "bot"]', text)
        config.write_text(text)
        code, _, err = await run_cli(config, "check-config")
        assert code == 78, err
        assert "accounts.default.templates[0].mode: gives access to all users" in err
        assert "accounts.default.templates[0].command[0]: must be an absolute path" in err
        assert 'templates[0].destnation: unknown key; did you mean "destination"' in err
        assert "Traceback" not in err

    async def test_a_good_template_passes(self, emulator: KakaoEmulator, tmp_path: Path) -> None:
        """The same config with a valid template is OK (exit 0)."""
        config = template_config(tmp_path, emulator)
        code, out, err = await run_cli(config, "check-config")
        assert code == 0, out + err


async def test_the_daemon_renders_on_start_refresh_and_adoption_only_when_bytes_change(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The real daemon writes the destination (0600, atomically) at start, after a refresh and
    after adopting another process's login, runs the command once per change with the alert
    commands' restricted environment (no token, no secret), and a restart with the same tokens
    rewrites nothing and runs nothing."""
    config = template_config(tmp_path, emulator)
    state = await login(emulator, config)
    destination = tmp_path / "bot" / "kakao.json"
    secret_env = {"KAKAO_CLIENT_SECRET_FOR_BOT": "not-for-commands"}
    daemon = await start_daemon(config, env=secret_env)
    try:
        await daemon.wait_for(lambda: len(runs(tmp_path)) == 1, what="the first render")
        assert rendered(tmp_path) == expected(state)
        assert stat.S_IMODE(destination.stat().st_mode) == 0o600
        environment = runs(tmp_path)[0]
        assert environment["KAKAO_TOKEND_ACCOUNT"] == "default"
        assert environment["KAKAO_TOKEND_TEMPLATE_DESTINATION"] == str(destination)
        assert environment["KAKAO_TOKEND_GENERATION"] == "1"
        allowed = {*PASSED_ENV, "KAKAO_TOKEND_ACCOUNT", "KAKAO_TOKEND_TEMPLATE_DESTINATION"}
        allowed |= {"KAKAO_TOKEND_GENERATION", "LC_CTYPE"}  # Python may set LC_CTYPE itself
        assert set(environment) <= allowed, set(environment) - allowed
        assert state.tokens.access_token not in json.dumps(environment)

        status, body = await daemon.api("POST", "/v1/accounts/default/refresh")
        assert status == 200 and body["generation"] == 2, body
        await daemon.wait_for(lambda: rendered(tmp_path)["generation"] == 2, what="refresh")
        await daemon.wait_for(lambda: len(runs(tmp_path)) == 2, what="the second command")
        assert rendered(tmp_path)["kakao"]["token"] == daemon.published()["access_token"]

        adopted = await login(emulator, config)  # another process writes a new token set
        await daemon.wait_for(lambda: rendered(tmp_path)["generation"] == 3, what="adoption")
        assert rendered(tmp_path) == expected(adopted)
        await daemon.wait_for(lambda: len(runs(tmp_path)) == 3, what="the third command")
        assert runs(tmp_path)[-1]["KAKAO_TOKEND_GENERATION"] == "3"
        assert "Traceback" not in daemon.log_text()
    finally:
        assert await daemon.stop() == 0

    before = destination.stat()
    again = await start_daemon(config)
    try:
        await asyncio.sleep(1.0)  # several heartbeats: time enough to (wrongly) rewrite
        after = destination.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert len(runs(tmp_path)) == 3
    finally:
        assert await again.stop() == 0


async def test_a_reload_renders_a_changed_template(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """`kakao-tokend reload` re-reads the template source and rewrites the destination (and
    runs the command) at once, without waiting for the next refresh."""
    config = template_config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_for(lambda: len(runs(tmp_path)) == 1, what="the first render")
        source = tmp_path / "bot.json.tmpl"
        source.write_text(source.read_text().replace('"shell"', '"scope": "{scope}", "shell"'))
        code, out, err = await run_cli(config, "reload")
        assert code == 0, out + err
        await daemon.wait_for(lambda: "scope" in rendered(tmp_path), what="the new render")
        await daemon.wait_for(lambda: len(runs(tmp_path)) == 2, what="the second command")
    finally:
        assert await daemon.stop() == 0


async def test_a_hanging_template_command_is_killed_at_its_timeout(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A command that outlives command_timeout is killed and logged; the daemon keeps going."""
    config = template_config(tmp_path, emulator, sleep=30, extra_keys='command_timeout = "0.5s"')
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await daemon.wait_log("still running after 0.5s; killed it")
        status, _ = await daemon.api("GET", "/healthz")
        assert status == 200
    finally:
        assert await daemon.stop() == 0


def test_the_documented_template_example_loads(tmp_path: Path) -> None:
    """The commented [[accounts.me.templates]] example in config.example.toml is a valid config
    once uncommented (with its paths pointed at this test's directory)."""
    text = (REPO / "config.example.toml").read_text()
    lines = text.splitlines()
    start = lines.index("#   [[accounts.me.templates]]")
    block = []
    for line in lines[start:]:
        if not line.startswith("#   ") or line.startswith("#   #"):
            break
        block.append(line.removeprefix("#   "))
    assert any(line.startswith("command = ") for line in block), block
    source = tmp_path / "bot.conf.tmpl"
    source.write_text("token={access_token}\nexpires={expires_at}\n")
    group = grp.getgrgid(os.getgid()).gr_name
    example = "\n".join(block)
    example = re.sub(r'source = ".*"', f'source = "{source}"', example)
    example = re.sub(r'destination = ".*"', f'destination = "{tmp_path / "out.conf"}"', example)
    example = re.sub(r'group = ".*"', f'group = "{group}"', example)
    config = config_from_toml_text(
        f'[kakao]\nrest_api_key = "k"\n[paths]\nstate_dir = "{tmp_path}"\n'
        f'runtime_dir = "{tmp_path}"\n[accounts.me]\n{example}\n',
        environ={},
    )
    (template,) = config.accounts["me"].templates
    assert template.destination == tmp_path / "out.conf"
    assert template.command and template.command_timeout > 0


async def test_a_fifo_as_template_source_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO where the template source should be is refused at once by the config check
    (exit 78, "not a regular file"), instead of stopping it, and `run` with it, for good."""
    source = tmp_path / "bot.json.tmpl"
    os.mkfifo(source)
    extra = (
        "[accounts.default]\n[[accounts.default.templates]]\n"
        f'source = "{source}"\ndestination = "{tmp_path / "bot" / "kakao.json"}"\n'
    )
    code, out, err = await run_cli(write_config(tmp_path, extra=extra), "check-config")
    assert code == 78, out + err
    assert "not a regular file" in err and str(source) in err
