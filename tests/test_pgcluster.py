"""The tests' PostgreSQL helper: it finds the server, survives kill -9 and says why it skips."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psycopg
import pytest

import pgcluster
from pgcluster import PgCluster

pytestmark = pytest.mark.timeout(60)


def test_the_newest_installed_major_version_is_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 9.6, 13 and 15 installed, 15's binaries are used (numeric, not string order)."""
    for major in ("9.6", "13", "15"):
        bindir = tmp_path / major / "bin"
        bindir.mkdir(parents=True)
        (bindir / "pg_ctl").touch()
    monkeypatch.setattr(pgcluster, "BINDIR_GLOB", str(tmp_path / "*" / "bin" / "pg_ctl"))
    assert pgcluster.find_pg_bindir() == tmp_path / "15" / "bin"


def test_missing_postgres_skips_with_the_reason_or_fails_when_ci_demands_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Locally a missing server is a skip that says why; with TOKEND_REQUIRE_PG=1 a failure."""
    monkeypatch.delenv(pgcluster.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        pgcluster.skip_or_fail("PostgreSQL is not installed (apt-get install postgresql)")
    monkeypatch.setenv(pgcluster.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="TOKEND_REQUIRE_PG=1: the PostgreSQL tests"):
        pgcluster.skip_or_fail("PostgreSQL is not installed")


def test_a_killed_cluster_restarts_with_its_committed_data(pg_cluster: PgCluster) -> None:
    """kill() is a crash (open sessions die), start() waits for the old postmaster to go,
    and what was committed before is still there."""
    old = psycopg.connect(pg_cluster.dsn(), autocommit=True)
    old.execute("CREATE TABLE t (x int)")
    old.execute("INSERT INTO t VALUES (42)")
    pg_cluster.kill()
    pg_cluster.start()
    with pytest.raises(psycopg.OperationalError):
        old.execute("SELECT 1")
    old.close()
    with psycopg.connect(pg_cluster.dsn()) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    assert "database system was interrupted" in pg_cluster.log_tail(100) or (
        "not properly shut down" in pg_cluster.log_tail(100)
    )


def test_clusters_are_copies_of_the_runs_one_initdb_and_share_nothing() -> None:
    """Every cluster of a run copies one pristine data directory (conftest.py sets
    TOKEND_PG_TEMPLATE): two copies run side by side on their own ports, a table made in one
    is not in the other, and the template keeps no cluster's settings."""
    if pgcluster.find_pg_bindir() is None:
        pgcluster.skip_or_fail("PostgreSQL is not installed (apt-get install postgresql)")
    template = Path(os.environ[pgcluster.TEMPLATE_ENV])
    first, second = PgCluster(), PgCluster()
    try:
        first.start()
        second.start()
        assert first.port != second.port
        with psycopg.connect(first.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE only_in_the_first (x int)")
        with psycopg.connect(second.dsn()) as conn:
            found = conn.execute("SELECT to_regclass('only_in_the_first')").fetchone()
        assert found == (None,)
    finally:
        first.cleanup()
        second.cleanup()
    assert (template / "data" / "PG_VERSION").exists()
    assert f"port = {first.port}" not in (template / "data" / "postgresql.conf").read_text()


def test_a_first_start_whose_picked_port_was_taken_meanwhile_moves_to_another() -> None:
    """The port free_port picked may be bound by someone else before the server starts (a CI
    run once failed so): the first start picks another; a port given by hand is kept, and
    its start fails with the server's reason."""
    if pgcluster.find_pg_bindir() is None:
        pgcluster.skip_or_fail("PostgreSQL is not installed (apt-get install postgresql)")
    picked = PgCluster()
    given: PgCluster | None = None
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", picked.port))
        squatter.listen()
        taken = picked.port
        try:
            picked.start()
            assert picked.port != taken
            with psycopg.connect(picked.dsn(), autocommit=True) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            given = PgCluster(port=taken)
            with pytest.raises(RuntimeError, match="Address already in use"):
                given.start()
            assert given.port == taken
        finally:
            picked.cleanup()
            if given is not None:
                given.cleanup()
