"""A system install used from a shell: the real /etc, /var/lib and /run paths, in a private mount.

Runs as root only: the test enters a private mount namespace (``unshare --mount``) in which
/etc and /var/lib are overlays whose changes land in the test's temporary directory, and /run
is an empty tmpfs. Inside it, the real file names of a system install exist
(/etc/kakao-tokend/config.toml, /var/lib/kakao-tokend, /run/kakao-tokend) while the machine's
own /etc, /var/lib and /run stay untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemonproc import free_port
from kakao_tokend.emulator import KakaoEmulator

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace"),
    pytest.mark.skipif(
        shutil.which("unshare") is None or shutil.which("nsenter") is None,
        reason="needs unshare and nsenter (util-linux)",
    ),
    pytest.mark.slow(seconds=20),
]

#: Variables that would point the CLI somewhere else than a plain shell would.
_SYSTEMD_VARS = (
    "KAKAO_TOKEND_CONFIG",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "XDG_STATE_HOME",
    "XDG_CONFIG_HOME",
    "NOTIFY_SOCKET",
)

#: Import every module first, then drop to an unprivileged uid (KT_TEST_UID, default nobody)
#: whose group has the same number: the interpreter may live under /root.
_AS_USER = textwrap.dedent(
    """
    import grp, importlib, os, pkgutil, pwd, sys
    import kakao_tokend
    for module in pkgutil.iter_modules(kakao_tokend.__path__):
        if module.name not in ("__main__",):
            importlib.import_module(f"kakao_tokend.{module.name}")
    uid = int(os.environ.get("KT_TEST_UID", "65534"))
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    sys.argv = ["kakao-tokend", *sys.argv[1:]]
    from kakao_tokend.cli import main
    main()
    """
)


@dataclass
class Namespace:
    """A process holding a private mount namespace with a system-style layout."""

    holder: asyncio.subprocess.Process
    home: Path

    def shell_env(self) -> dict[str, str]:
        """The environment of an operator's shell: no systemd variables, a home of its own."""
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
        env.update(HOME=str(self.home), XDG_RUNTIME_DIR=str(self.home / "xdg"), NO_COLOR="1")
        return env

    def command(self, *argv: str) -> list[str]:
        """Return ``argv`` run inside the namespace."""
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--", *argv]

    async def run(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> tuple[int, str, str]:
        """Run a command inside the namespace; return (exit code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *self.command(*argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env or self.shell_env(),
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def cli(self, *args: str, uid: int | None = None) -> tuple[int, str, str]:
        """Run `kakao-tokend ARGS` from a plain shell (no --config), as root or as ``uid``."""
        if uid is not None:
            env = {**self.shell_env(), "KT_TEST_UID": str(uid)}
            return await self.run(sys.executable, "-c", _AS_USER, *args, env=env)
        return await self.run(sys.executable, "-m", "kakao_tokend", *args)

    async def install(self, source: Path, target: str, mode: str) -> None:
        """Copy a file into the namespace's view (root-owned, with ``mode``)."""
        code, _, err = await self.run("install", "-D", "-m", mode, str(source), target)
        assert code == 0, err


@pytest.fixture
async def system_root(tmp_path: Path) -> AsyncIterator[Namespace]:
    """Hold a mount namespace where /etc and /var/lib are overlays and /run is a tmpfs."""
    mounts = []
    for where in ("etc", "var/lib"):
        upper, work = tmp_path / "upper" / where, tmp_path / "work" / where
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        options = f"lowerdir=/{where},upperdir={upper},workdir={work}"
        mounts.append(f"mount -t overlay overlay -o {options} /{where}")
    script = " && ".join([*mounts, "mount -t tmpfs -o mode=0755 tmpfs /run", "echo ready"])
    holder = await asyncio.create_subprocess_exec(
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        f"{script} && exec sleep 3600",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None
    line = await asyncio.wait_for(holder.stdout.readline(), 30)
    if line.strip() != b"ready":
        holder.kill()
        _, err = await holder.communicate()
        pytest.skip(f"cannot build a private system layout here: {err.decode().strip()}")
    home = tmp_path / "home"
    (home / "xdg").mkdir(parents=True)
    try:
        yield Namespace(holder, home)
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await holder.wait()


async def write_system_config(ns: Namespace, tmp_path: Path, emulator: KakaoEmulator) -> None:
    """Install /etc/kakao-tokend/config.toml (no [paths]) and its secret files."""
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [kakao]
            rest_api_key_file = "rest_api_key"
            client_secret_file = "client_secret"
            auth_url = "{emulator.url}"
            api_url = "{emulator.url}"
            redirect_uri = "http://127.0.0.1:{free_port()}/callback"
            [refresh]
            heartbeat = "1s"
            [publish]
            group = "nogroup"
            [api]
            socket_group = "nogroup"
            """
        )
    )
    key, secret = tmp_path / "rest_api_key", tmp_path / "client_secret"
    key.write_text(emulator.settings.client_id)
    secret.write_text(str(emulator.settings.client_secret))
    await ns.install(config, "/etc/kakao-tokend/config.toml", "0644")
    await ns.install(key, "/etc/kakao-tokend/rest_api_key", "0600")
    await ns.install(secret, "/etc/kakao-tokend/client_secret", "0600")


async def test_shell_commands_use_the_system_directories_with_the_system_config(
    system_root: Namespace, tmp_path: Path, emulator: KakaoEmulator
) -> None:
    """With /etc/kakao-tokend/config.toml, a root shell's CLI works on the service's files.

    `import` from a shell writes /var/lib/kakao-tokend (not ~/.local/state); the daemon, run
    with the system unit's variables, serves /run/kakao-tokend/api.sock; `status` from the
    shell finds both and prints the paths and socket it used.
    """
    ns = system_root
    await write_system_config(ns, tmp_path, emulator)
    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))

    code, out, err = await ns.cli("import", str(seed))
    assert code == 0, out + err
    code, listing, _ = await ns.run("ls", "/var/lib/kakao-tokend")
    assert code == 0 and "default.state.json" in listing.split(), listing
    assert not (ns.home / ".local").exists()  # nothing went to the user's directories

    daemon = await start_system_daemon(ns, tmp_path)
    try:
        code, out, err = await ns.cli("status")
        assert code == 0, out + err
        assert "config: /etc/kakao-tokend/config.toml" in out
        assert "state:  /var/lib/kakao-tokend" in out
        assert "socket: /run/kakao-tokend/api.sock (the daemon answered)" in out
        assert "daemon:        running" in out

        code, out, err = await ns.cli("status", "--json")
        document = json.loads(out)
        assert document["source"] == "daemon"
        assert document["socket"] == "/run/kakao-tokend/api.sock"
        assert document["state_dir"] == "/var/lib/kakao-tokend"

        # A user outside the socket's group is told that, not that a secret is unreadable.
        code, out, err = await ns.cli("token", uid=65533)
        assert code == 1, out + err
        assert out == ""
        assert "cannot connect to the daemon's socket /run/kakao-tokend/api.sock" in err
        assert "permission denied for user 65533" in err
        assert "/run/kakao-tokend is root:root 0750" in err
        assert "rest_api_key" not in err
        assert len(err.strip().splitlines()) == 1, err
    finally:
        await stop(daemon)


async def test_check_config_says_what_makes_the_groups_work_and_it_does(
    system_root: Namespace, tmp_path: Path, emulator: KakaoEmulator
) -> None:
    """Outside systemd, [publish] group and [api] socket_group need directories the group
    may enter. check-config names the commands; after running exactly those, a member of
    the group gets a token through the socket and reads the token file, and a non-member is
    told which group to join.
    """
    ns = system_root
    await write_system_config(ns, tmp_path, emulator)
    code, out, err = await ns.cli("check-config")
    assert code == 0, out + err
    commands = [line.split("; run: ", 1)[1] for line in err.splitlines() if "; run: " in line]
    assert commands == [
        "install -d -m 0750 -g nogroup /var/lib/kakao-tokend",
        "install -d -m 0750 -g nogroup /run/kakao-tokend",
    ], err
    for command in commands:
        code, _, failure = await ns.run("sh", "-c", command)
        assert code == 0, failure
    code, out, err = await ns.cli("check-config")
    assert code == 0 and "warning" not in err, err

    seed = tmp_path / "kakao_token.json"
    seed.write_text(json.dumps(emulator.issue_tokens()))
    code, out, err = await ns.cli("import", str(seed))
    assert code == 0, out + err
    daemon = await start_system_daemon(ns, tmp_path)
    try:
        code, token, err = await ns.cli("token", uid=65534)  # nobody, in group nogroup
        assert code == 0, token + err
        code, published, err = await ns.run(
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            "/var/lib/kakao-tokend/default.token.json",
        )
        assert code == 0, err
        assert json.loads(published)["access_token"] == token.strip()

        code, out, err = await ns.cli("token", uid=65533)  # in no group
        assert code == 1, out + err
        assert "/run/kakao-tokend is root:nogroup 0750" in err
        assert "run: usermod -aG nogroup 65533" in err
    finally:
        await stop(daemon)


async def start_system_daemon(ns: Namespace, tmp_path: Path) -> asyncio.subprocess.Process:
    """Start `kakao-tokend run` with the system unit's variables, as systemd would."""
    daemon_env = {
        **ns.shell_env(),
        "STATE_DIRECTORY": "/var/lib/kakao-tokend",
        "RUNTIME_DIRECTORY": "/run/kakao-tokend",
        "CONFIGURATION_DIRECTORY": "/etc/kakao-tokend",
    }
    log_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        daemon = await asyncio.create_subprocess_exec(
            *ns.command(sys.executable, "-m", "kakao_tokend", "run"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=daemon_env,
        )
    for _ in range(200):
        if "kakao-tokend running" in log_path.read_text():
            return daemon
        if daemon.returncode is not None:
            break
        await asyncio.sleep(0.1)
    await stop(daemon)
    raise AssertionError("daemon did not start:\n" + log_path.read_text())


async def stop(daemon: asyncio.subprocess.Process) -> None:
    """Stop the daemon (SIGTERM) and wait for it."""
    if daemon.returncode is None:
        daemon.terminate()
    await asyncio.wait_for(daemon.wait(), 20)
