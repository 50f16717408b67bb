"""`kakao-tokend logout`: what it leaves behind, and where a login after it starts counting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from daemonproc import DaemonProcess, login, run_cli, start_daemon, write_config
from fleetrun import login_published, node_config
from kakao_tokend.emulator import KakaoEmulator
from loginproc import LoginProcess, follow_authorize, get_page

pytestmark = pytest.mark.timeout(90)


def generations(state_dir: Path) -> tuple[int, int]:
    """The generation in the account's state file and in its token file."""
    state = json.loads((state_dir / "default.state.json").read_text())
    published = json.loads((state_dir / "default.token.json").read_text())
    return state["generation"], published["generation"]


async def test_a_login_or_import_after_a_logout_continues_the_generation(
    start_login: Callable[..., Awaitable[LoginProcess]],
    emulator: KakaoEmulator,
    tmp_path: Path,
) -> None:
    """`generation` grows by one with every new token set, across `logout` too: a login or an
    import after a logout starts above the generation logged out (it started at 1 again, and
    consumers, hooks and templates comparing generations took the new tokens for old ones),
    and a login after the state file was deleted by hand starts above the token file's."""
    config = tmp_path / "config.toml"
    state_dir = tmp_path / "state"

    async def log_in() -> None:
        login = await start_login()
        await get_page(await follow_authorize(login.url))
        code, _, err = await login.finish()
        assert code == 0, err

    await log_in()
    await log_in()
    assert generations(state_dir) == (2, 2)
    code, out, err = await run_cli(config, "logout")
    assert code == 0, out + err
    assert not (state_dir / "default.state.json").exists()
    await log_in()
    assert generations(state_dir) == (3, 3)

    code, out, err = await run_cli(config, "logout")
    assert code == 0, out + err
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    code, out, err = await run_cli(config, "import", "--no-verify", str(seed))
    assert code == 0, out + err
    assert generations(state_dir) == (4, 4)

    (state_dir / "default.state.json").unlink()  # by hand: the token file stays
    await log_in()
    assert generations(state_dir) == (5, 5)


def sinks_config(tmp_path: Path, emulator: KakaoEmulator) -> Path:
    """A config whose account writes both extra token files and renders one template."""
    (tmp_path / "bot.conf.tmpl").write_text("token={access_token}\ngeneration={generation}\n")
    sinks = tmp_path / "sink"
    return write_config(
        tmp_path,
        emulator,
        extra=f"""
[accounts.default]
access_token_file = "{sinks / "token"}"
env_file = "{sinks / "kakao.env"}"
[[accounts.default.templates]]
source = "bot.conf.tmpl"
destination = "{sinks / "rendered.conf"}"
""",
    )


def outputs(tmp_path: Path) -> list[Path]:
    """Every file that holds the access token: the token file, the extra ones, the template's."""
    sinks = tmp_path / "sink"
    return [
        tmp_path / "state" / "default.token.json",
        sinks / "token",
        sinks / "kakao.env",
        sinks / "rendered.conf",
    ]


async def published_everywhere(daemon: DaemonProcess, tmp_path: Path, token: str) -> None:
    """Wait until every output holds ``token``."""
    await daemon.wait_for(
        lambda: all(token in path.read_text() for path in outputs(tmp_path)),
        what="the token in every output",
    )


async def test_logout_with_the_daemon_running_leaves_no_token_in_any_output(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """`kakao-tokend logout` while the daemon runs removes the extra token files
    (`access_token_file`, `env_file`) and the rendered templates with the state and token
    files, before it returns; they used to stay behind holding the revoked token, so programs
    reading them got no signal. The daemon does not write them again."""
    config = sinks_config(tmp_path, emulator)
    state = await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await published_everywhere(daemon, tmp_path, state.tokens.access_token)
        code, out, err = await run_cli(config, "logout")
        assert code == 0, out + err
        left = [path for path in outputs(tmp_path) if path.exists()]
        assert left == []
        for path in outputs(tmp_path)[1:]:
            assert str(path) in out  # named as removed
        await asyncio.sleep(1.0)  # several heartbeats: time enough to (wrongly) write again
        assert [path for path in outputs(tmp_path) if path.exists()] == []
        assert "Traceback" not in daemon.log_text()
    finally:
        assert await daemon.stop() == 0


async def test_logout_without_a_daemon_removes_every_output_but_never_follows_a_link(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """With no daemon running, `logout` removes the extra token files and the rendered
    template too. A symlink found at one of those paths is removed itself: the file it points
    to is not kakao-tokend's and keeps its content."""
    config = sinks_config(tmp_path, emulator)
    state = await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        await published_everywhere(daemon, tmp_path, state.tokens.access_token)
    finally:
        assert await daemon.stop() == 0
    elsewhere = tmp_path / "not-ours.env"
    elsewhere.write_text("KEEP=me\n")
    env_file = tmp_path / "sink" / "kakao.env"
    env_file.unlink()
    env_file.symlink_to(elsewhere)
    code, out, err = await run_cli(config, "logout")
    assert code == 0, out + err
    assert [path for path in outputs(tmp_path) if path.is_symlink() or path.exists()] == []
    assert elsewhere.read_text() == "KEEP=me\n"


async def test_a_state_file_removed_by_hand_takes_every_output_with_it(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """When the running daemon sees the state file gone without the CLI (an operator's `rm`,
    a logout from an older version), it removes the token file, the extra token files and
    the rendered template as `logout` does, and records the generation: the next login
    continues above it."""
    config = sinks_config(tmp_path, emulator)
    await login(emulator, config)
    daemon = await start_daemon(config)
    try:
        status, body = await daemon.api("POST", "/v1/accounts/default/refresh")
        assert status == 200 and body["generation"] == 2, body
        await published_everywhere(daemon, tmp_path, daemon.published()["access_token"])
        (tmp_path / "state" / "default.state.json").unlink()
        await daemon.wait_for(
            lambda: not any(path.exists() for path in outputs(tmp_path)),
            what="every output removed",
        )
        record = json.loads((tmp_path / "state" / "default.logged-out.json").read_text())
        assert record["generation"] == 2
        fresh = await login(emulator, config)  # the test's login counts from the state only
        assert fresh.generation == 1
        await published_everywhere(daemon, tmp_path, fresh.tokens.access_token)
        assert "Traceback" not in daemon.log_text()
    finally:
        assert await daemon.stop() == 0


async def test_a_fleet_node_removes_the_extra_files_and_templates_after_a_logout(
    pg_dsn: str, emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Fleet mode: a `logout` from another host deletes the account's row; the node that
    published the account removes its extra token files and rendered template along with
    its token file, within about a second."""
    (tmp_path / "bot.conf.tmpl").write_text("token={access_token}\n")
    sinks = tmp_path / "sink"
    node_path = node_config(
        tmp_path,
        emulator,
        pg_dsn,
        "web-1",
        extra=f"""
[accounts.default]
access_token_file = "{sinks / "token"}"
env_file = "{sinks / "kakao.env"}"
[[accounts.default.templates]]
source = "{tmp_path / "bot.conf.tmpl"}"
destination = "{sinks / "rendered.conf"}"
""",
    )
    node = await start_daemon(node_path)
    files = [node.state_dir / "default.token.json", *(sinks / n for n in ("token", "kakao.env"))]
    files.append(sinks / "rendered.conf")
    try:
        state = await login_published(emulator, node_path, pg_dsn, node)
        await node.wait_for(
            lambda: all(state.tokens.access_token in path.read_text() for path in files),
            what="the token in every output",
        )
        ops = node_config(tmp_path, emulator, pg_dsn, "ops-1")
        code, out, err = await run_cli(ops, "logout")
        assert code == 0, out + err
        await node.wait_for(
            lambda: not any(path.exists() for path in files),
            timeout=3,
            what="every output removed",
        )
        assert "Traceback" not in node.log_text()
    finally:
        await node.stop()
