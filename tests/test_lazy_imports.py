"""Each command imports what it uses: a command or a start does not pay for what it never runs.

The test suite starts hundreds of real processes, and an operator's shell runs `status` and
`check-config` by hand: importing aiohttp (about 0.13 s of CPU), asyncio with ssl, or the
Prometheus client where nothing needs them made each of them slower for nothing.
docs/benchmarks.md ("CPU per command") has the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemonproc import write_config

pytestmark = pytest.mark.timeout(60)

#: Top-level modules whose loading these tests watch.
WATCHED = ("aiohttp", "asyncio", "ssl", "http", "prometheus_client", "webbrowser")

_CLI = """
import json, runpy, sys
sys.argv = ["kakao-tokend", *{argv!r}]
try:
    runpy.run_module("kakao_tokend", run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({watched!r}))))
"""

_BODY = """
import json, sys
{body}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({watched!r}))))
"""


def _loaded(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return set(loaded)


def loaded_by_command(*argv: str) -> set[str]:
    """Run the CLI with ``argv`` in a fresh interpreter; return the watched modules it loaded."""
    return _loaded(_CLI.format(argv=list(argv), watched=WATCHED))


def loaded_by(body: str) -> set[str]:
    """Run ``body`` in a fresh interpreter; return the watched modules it loaded."""
    return _loaded(_BODY.format(body=body, watched=WATCHED))


def test_check_config_and_status_without_a_daemon_load_no_network_stack(tmp_path: Path) -> None:
    """`check-config` and `status` (no daemon: it reads the files) load neither aiohttp, nor
    asyncio (with ssl), nor http.client, nor the browser module; `doctor`, which asks Kakao,
    loads aiohttp and asyncio (so the check sees a module that loads)."""
    config = str(write_config(tmp_path))
    for command in ("check-config", "status"):
        assert loaded_by_command("--config", config, command) == set(), command
    assert {"aiohttp", "asyncio"} <= loaded_by_command("--config", config, "doctor")


def test_the_daemon_imports_the_prometheus_client_at_the_first_scrape(tmp_path: Path) -> None:
    """Building the daemon (its metrics included, counting from the start) does not import
    prometheus_client; rendering /metrics does."""
    config = write_config(tmp_path)
    body = (
        "from pathlib import Path\n"
        "from kakao_tokend.api import METRICS\n"
        "from kakao_tokend.config import load_config\n"
        "from kakao_tokend.service import build_app\n"
        f"app = build_app(load_config(Path({str(config)!r})))\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "{render}"
    )
    assert "prometheus_client" not in loaded_by(body.format(render=""))
    rendered = body.format(render="assert b'kakao_tokend_build_info' in app[METRICS].render()\n")
    assert "prometheus_client" in loaded_by(rendered)


def test_token_without_a_daemon_reads_a_good_token_without_the_network_stack(
    tmp_path: Path,
) -> None:
    """`token` without a daemon prints a token still good for --min-valid from the state file
    without loading aiohttp or asyncio; when a refresh is due it builds the refresh machinery
    (here Kakao is out of reach, so it warns and prints the token it has)."""
    from datetime import UTC, datetime, timedelta

    from kakao_tokend.config import load_config
    from kakao_tokend.state import AccountState
    from kakao_tokend.store import AccountStore
    from kakao_tokend.tokens import TokenSet

    config = write_config(tmp_path)
    store = AccountStore(load_config(config).accounts["default"])
    # A 6-hour token with an hour left (good for 10m), then one with 30 s left (short of the
    # 60 s `token` asks by default: a refresh, Kakao out of reach, the token printed anyway).
    for left, extra, expected in (
        (3600, ["--min-valid", "10m"], set()),
        (30, [], {"aiohttp", "asyncio"}),
    ):
        now = datetime.now(UTC)
        tokens = TokenSet(
            access_token="still-good-access-token",
            refresh_token="its-refresh-token",
            access_expires_at=now + timedelta(seconds=left),
            refresh_expires_at=now + timedelta(days=30),
            access_issued_at=now + timedelta(seconds=left) - timedelta(hours=6),
        )
        store.save(AccountState(account="default", tokens=tokens, refreshed_at=now))
        min_valid = " ".join(extra) or "(default)"
        code = _CLI.format(argv=["--config", str(config), "token", *extra], watched=WATCHED)
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
        )
        printed, loaded = result.stdout.strip().splitlines()
        assert printed == "still-good-access-token", result.stderr
        assert expected <= set(json.loads(loaded)), min_valid
        if not expected:
            assert set(json.loads(loaded)) == set(), result.stderr


#: Run the CLI with {argv} until the daemon's READY=1, then print the watched modules it loaded
#: and exit (systemd.notify replaced: READY is the moment the start's imports are done).
_AT_READY = """
import json, os, runpy, sys
from pathlib import Path
from kakao_tokend import paths, systemd

{setup}

def notify(*lines):
    if "READY=1" in lines:
        loaded = {{m.split(".")[0] for m in sys.modules}} & set({watched!r})
        print(json.dumps(sorted(loaded)), flush=True)
        os._exit(0)
    return False

systemd.notify = notify
sys.argv = ["kakao-tokend", *{argv!r}]
runpy.run_module("kakao_tokend", run_name="__main__")
"""


def test_the_system_service_starts_without_platformdirs(tmp_path: Path) -> None:
    """`run` as the system unit starts it (its config the system one, /etc/kakao-tokend here
    under another root, in $CONFIGURATION_DIRECTORY; the directories from $STATE_DIRECTORY and
    $RUNTIME_DIRECTORY; no --config) is READY without importing platformdirs, which only
    answers for user directories, asyncinotify (the state watch starts right after READY) or
    APScheduler (the refresh scheduler is made right after READY too).
    Control: without a system config, `run --config FILE` loads platformdirs, to tell whether
    FILE would be found without --config (the commands it shows name it if not)."""
    import os

    from kakao_tokend.paths import SystemLayout

    root = tmp_path / "root"
    system = SystemLayout.under(root)
    configuration, state, runtime, home = (
        system.config_file.parent,
        tmp_path / "state",
        tmp_path / "run",
        tmp_path / "home",
    )
    configuration.mkdir(parents=True, mode=0o700)
    for directory in (state, runtime, home):
        directory.mkdir(mode=0o700)
    config = system.config_file
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text('[kakao]\nrest_api_key = "k"\n')
    config.write_text('[kakao]\nrest_api_key = "k"\n')
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAKAO_TOKEND_CONFIG", "NOTIFY_SOCKET", "XDG_CONFIG_HOME")
    }
    env.update(
        HOME=str(home),
        CONFIGURATION_DIRECTORY=str(configuration),
        STATE_DIRECTORY=str(state),
        RUNTIME_DIRECTORY=str(runtime),
    )
    watched = ("platformdirs", "asyncinotify", "apscheduler", "kakao_tokend")

    def loaded_at_ready(*argv: str) -> set[str]:
        setup = f"paths.SYSTEM = paths.SystemLayout.under(Path({str(root)!r}))"
        code = _AT_READY.format(argv=list(argv), watched=watched, setup=setup)
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
        )
        assert result.returncode == 0, result.stderr
        loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
        return set(loaded)

    assert loaded_at_ready("run") == {"kakao_tokend"}
    config.unlink()  # no system config: the user's would be the one found
    assert loaded_at_ready("--config", str(elsewhere), "run") == {"kakao_tokend", "platformdirs"}


def test_the_state_watch_loads_asyncinotify_when_it_watches() -> None:
    """Importing the service (a fleet node's too) loads no asyncinotify: a fleet node keeps no
    state files and never watches them; the file store's watcher loads it when made."""
    body = "import kakao_tokend.service, kakao_tokend.daemon, kakao_tokend.watch\n{make}"
    watched = ("asyncinotify",)

    def loaded(make: str) -> set[str]:
        code = _BODY.format(body=body.format(make=make), watched=watched)
        return _loaded(code)

    assert loaded("") == set()
    made = (
        "from kakao_tokend.watch import StateWatcher\n"
        "assert StateWatcher(print).mode == 'inotify'\n"
    )
    assert loaded(made) == {"asyncinotify"}


def test_the_refresh_scheduler_loads_apscheduler_when_it_is_made() -> None:
    """Importing the service loads no APScheduler (its scheduler module scans every installed
    distribution's entry points): a file-mode daemon makes its scheduler right after READY."""
    body = "import kakao_tokend.service, kakao_tokend.daemon, kakao_tokend.scheduler\n{make}"
    watched = ("apscheduler",)

    def loaded(make: str) -> set[str]:
        return _loaded(_BODY.format(body=body.format(make=make), watched=watched))

    assert loaded("") == set()
    made = "from kakao_tokend.scheduler import new_apscheduler\nnew_apscheduler()\n"
    assert loaded(made) == {"apscheduler"}
