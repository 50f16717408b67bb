"""Throwaway PostgreSQL clusters for tests: a real server in a temporary directory.

Fixtures (imported by conftest.py, so every test module can use them):

- ``pg_server`` (session): one server shared by the whole run, by every pytest-xdist worker
  too. ``TOKEND_TEST_DSN`` names a server started outside; otherwise the first worker that
  needs one creates a cluster with ``initdb`` and starts it with ``pg_ctl`` (under a file lock
  in the run's shared directory, see conftest.py), the others connect to it, and the
  controller stops it when the run ends. As root the server binaries run as the ``postgres``
  user, because ``initdb``, ``pg_ctl`` and ``postgres`` refuse to run as root.
- ``pg_dsn`` (function): a fresh, empty database on ``pg_server``, dropped afterwards, so tests
  never see each other's rows.
- ``pg_cluster`` (function): a private cluster the test may stop, kill -9 and restart.

``initdb`` costs about a second and 0.6 CPU-seconds; a cluster is a copy of one data directory
made once per run (``TOKEND_PG_TEMPLATE``, set by conftest.py for the workers and every process
they start, the benchmarks too) with its own port and socket directory: half a second and a
quarter of a CPU-second.

When PostgreSQL is not installed the tests skip and say why; with ``TOKEND_REQUIRE_PG=1`` (set
by .ci/run) they fail instead, so CI cannot silently skip them. The server binaries live in
``/usr/lib/postgresql/<major>/bin`` on Debian, which is not on ``PATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemonproc import free_port

DSN_ENV = "TOKEND_TEST_DSN"
#: The run's shared directory: the controller's stash key, and the name it has in each worker's
#: workerinput (conftest.py makes the directory and removes it at the end).
SHARED_DIR_KEY = pytest.StashKey[Path]()
SHARED_DIR_INPUT = "tokend_shared_dir"
#: In the shared directory: the lock and the record of the run's one server.
SERVER_LOCK = "pg-server.lock"
SERVER_RECORD = "pg-server.json"
REQUIRE_ENV = "TOKEND_REQUIRE_PG"
#: A directory where the first cluster of a run leaves a pristine data directory ("data") for
#: the later ones to copy; unset: every cluster runs initdb itself.
TEMPLATE_ENV = "TOKEND_PG_TEMPLATE"
#: Where Debian's postgresql-NN packages put the server binaries; newest major wins.
BINDIR_GLOB = "/usr/lib/postgresql/*/bin/pg_ctl"
#: Fast and good enough for tests only: fsync=off loses data on an OS crash (never in production).
TEST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "32MB",
}


def find_pg_bindir() -> Path | None:
    """Return the newest installed PostgreSQL server bin directory, or None."""
    found = glob.glob(BINDIR_GLOB)
    if not found:
        which = shutil.which("pg_ctl")
        return Path(which).parent if which else None

    def major(path: str) -> int:
        try:
            return int(Path(path).parts[-3])
        except ValueError:
            return 0

    return Path(max(found, key=major)).parent


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``, or fail when CI demands the PostgreSQL tests run."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the PostgreSQL tests must run here)")
    pytest.skip(reason)


#: How many ports the first start of a cluster tries (see PgCluster.start).
PORT_ATTEMPTS = 3


class PgCluster:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:<port>.

    All options go into ``postgresql.conf`` (options given to ``pg_ctl start -o`` are forgotten
    by a later plain start). The socket directory is the base directory (Unix socket paths must
    stay under 108 bytes, and the default /var/run/postgresql may not exist).
    """

    def __init__(
        self, *, bindir: Path | None = None, port: int | None = None, base: Path | None = None
    ) -> None:
        """Create a new cluster (initdb), or with ``base`` take over one made earlier."""
        found = bindir or find_pg_bindir()
        if found is None:
            raise FileNotFoundError("PostgreSQL server binaries not found")
        self.bindir = found
        self.port = port or free_port()
        #: The port was picked here (free_port), so the first start may pick another.
        self._port_picked = port is None
        self._started = False
        self.base = base or Path(tempfile.mkdtemp(prefix="tokend-pg-"))
        self.data = self.base / "data"
        self.log_path = self.base / "server.log"
        self._as_postgres: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self._as_postgres = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": [],
            }
        if base is not None:
            return
        if self._as_postgres:
            # The data directory and every parent must be reachable by 'postgres'; mkdtemp in
            # /tmp gives a 0700 root directory, so hand it over. user= alone keeps gid 0.
            os.chown(self.base, self._as_postgres["user"], self._as_postgres["group"])
        self._initdb()

    # -- lifecycle -----------------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.base,
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            **self._as_postgres,
        )

    def _initdb(self) -> None:
        template = os.environ.get(TEMPLATE_ENV)
        if template:
            self._copy_template(Path(template))
        else:
            self._run_initdb(self.data)
        lines = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.base}'",
            *(f"{name} = '{value}'" for name, value in TEST_SETTINGS.items()),
        ]
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n".join(lines) + "\n")

    def _run_initdb(self, data: Path) -> None:
        self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")

    def _copy_template(self, template: Path) -> None:
        """Copy the run's pristine data directory, making it first if no cluster has yet."""
        pristine = template / "data"
        template.mkdir(exist_ok=True)
        with (template / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not pristine.exists():
                if self._as_postgres:
                    os.chown(template, self._as_postgres["user"], self._as_postgres["group"])
                # initdb into a side directory and rename: a half-made template is never seen.
                making = template / f"making-{os.getpid()}"
                shutil.rmtree(making, ignore_errors=True)
                self._run_initdb(making)
                making.rename(pristine)
        # cp -a keeps the owner (postgres, when root runs the tests) and the 0700 modes the
        # server insists on; the copy is the cluster initdb would have made, byte for byte.
        subprocess.run(["cp", "-a", str(pristine), str(self.data)], check=True, timeout=120)

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        The port free_port picked is free when picked, not when the server binds it: the data
        directory is copied in between, and another worker's pick may take it meanwhile (a
        CI run once failed at "Address already in use"). So the first start of a cluster
        whose port was picked here picks another and tries again, a few times. A restart
        keeps its port: clients know it.
        """
        self._wait_for_old_postmaster()
        for attempt in range(PORT_ATTEMPTS):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                "start", check=False,
            )  # fmt: skip
            if result.returncode == 0:
                self._started = True
                return
            taken = "Address already in use" in self._log_since(logged)
            if not (taken and self._port_picked and not self._started):
                break
            if attempt + 1 < PORT_ATTEMPTS:
                self.port = free_port()
                with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                    conf.write(f"port = {self.port}\n")  # the last setting of a name wins
        raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{self.log_tail()}")

    def _log_since(self, offset: int) -> str:
        """Return what the server logged after ``offset`` bytes of its log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back sessions; ``immediate``: like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port; every session is cut."""
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        """Return the running postmaster's pid (first line of postmaster.pid), if any."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        return int(first) if first.strip().isdigit() else None

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would. Its children notice and exit by themselves."""
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _wait_for_old_postmaster(self, timeout: float = 15.0) -> None:
        """After a kill -9 a restart fails while postmaster.pid's process (or its shared
        memory) still exists; wait until it is gone."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop the server hard and delete its files."""
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- access --------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq key=value DSN for ``dbname`` over TCP."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the server log (for failure messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class PgServer:
    """A running server the session shares: either our own cluster or the one CI started."""

    admin_dsn: str
    cluster: PgCluster | None = None

    def create_database(self) -> tuple[str, str]:
        """Create an empty database with a unique name; return (name, dsn)."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        name = f"tokend_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = name
        return name, make_conninfo(**params)  # type: ignore[arg-type]

    def drop_database(self, name: str) -> None:
        """Drop a database made by :meth:`create_database`, disconnecting its sessions."""
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_or_fail("psycopg is not installed: pip install -e '.[test]'")


def shared_directory(config: pytest.Config) -> Path:
    """Return the directory every pytest-xdist worker of this run shares (see conftest.py)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return Path(workerinput[SHARED_DIR_INPUT])
    return config.stash[SHARED_DIR_KEY]


def shared_server(directory: Path) -> PgServer:
    """Return the run's one throwaway server, starting it if no worker has yet."""
    with (directory / SERVER_LOCK).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        record = directory / SERVER_RECORD
        if record.exists():
            return PgServer(admin_dsn=json.loads(record.read_text())["dsn"])
        cluster = PgCluster()
        try:
            cluster.start()
        except BaseException:
            cluster.cleanup()
            raise
        described = {"dsn": cluster.dsn(), "base": str(cluster.base), "port": cluster.port}
        record.write_text(json.dumps({**described, "bindir": str(cluster.bindir)}))
        return PgServer(admin_dsn=cluster.dsn(), cluster=cluster)


def stop_shared_server(directory: Path) -> None:
    """Stop and delete the run's server, if a worker started one (the controller, at the end)."""
    record = directory / SERVER_RECORD
    if not record.exists():
        return
    made = json.loads(record.read_text())
    PgCluster(bindir=Path(made["bindir"]), port=made["port"], base=Path(made["base"])).cleanup()
    record.unlink()


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    """A PostgreSQL server for the whole run (TOKEND_TEST_DSN, else a throwaway cluster)."""
    _require_psycopg()
    external = os.environ.get(DSN_ENV)
    if external:
        return PgServer(admin_dsn=external)
    if find_pg_bindir() is None:
        skip_or_fail(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl; "
            f"apt-get install postgresql) and {DSN_ENV} is not set"
        )
    return shared_server(shared_directory(request.config))


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    name, dsn = pg_server.create_database()
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A private, running cluster for one test, which may stop, kill or restart it."""
    _require_psycopg()
    if find_pg_bindir() is None:
        skip_or_fail(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl; "
            "apt-get install postgresql); this test needs its own server to restart"
        )
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
