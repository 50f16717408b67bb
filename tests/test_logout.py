"""`kakao-tokend logout`: what it leaves behind, and where a login after it starts counting."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from daemonproc import run_cli
from kakao_tokend.emulator import KakaoEmulator
from loginproc import LoginProcess, follow_authorize, get_page


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
