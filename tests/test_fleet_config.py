"""[store] in the config: the backend, the DSN and key secrets, the node name."""

from __future__ import annotations

import socket
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from kakao_tokend.config import config_from_toml_text, load_config
from kakao_tokend.errors import ConfigError
from kakao_tokend.fleet.admin import db_timeouts
from kakao_tokend.fleet.crypto import new_key_line

BASE = """
[paths]
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
[kakao]
rest_api_key = "rest-key-0123456789abcdef"
"""


def config_text(tmp_path: Path, store: str) -> str:
    """A valid config whose [store] section is ``store``."""
    return BASE.format(tmp=tmp_path) + "[store]\n" + textwrap.dedent(store)


def problems(tmp_path: Path, store: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Load a config that must fail; return {key path: problem}."""
    with pytest.raises(ConfigError) as caught:
        config_from_toml_text(config_text(tmp_path, store), environ=environ or {})
    return dict(caught.value.details)


def secret_file(path: Path, content: str, mode: int = 0o600) -> Path:
    """Write a secret file with ``mode``."""
    path.write_text(content)
    path.chmod(mode)
    return path


def test_without_a_store_section_the_file_backend_is_used(tmp_path: Path) -> None:
    """Nothing changes for a single host: file backend, no DSN, no key, node = host name."""
    config = config_from_toml_text(BASE.format(tmp=tmp_path), environ={})
    assert config.store.backend == "file"
    assert config.store.dsn is None and config.store.keyring is None
    assert config.store.node_name == socket.gethostname()


def test_a_postgres_store_reads_dsn_and_key_files(tmp_path: Path) -> None:
    """DSN with spaces and a key file of several keys are read; repr shows no secret."""
    dsn = secret_file(tmp_path / "dsn", "host=db.example dbname=tokend password='pw s'\n")
    old, new = new_key_line(), new_key_line()
    key = secret_file(tmp_path / "store.key", f"# keys\n{old}\n{new}\n")
    config = config_from_toml_text(
        config_text(
            tmp_path,
            f"""
            backend = "postgres"
            dsn_file = "{dsn}"
            key_file = "{key}"
            node_name = "web-1.example"
            """,
        ),
        environ={},
    )
    store = config.store
    assert store.backend == "postgres"
    assert store.dsn == "host=db.example dbname=tokend password='pw s'"
    assert store.dsn_source == f"file {dsn}"
    assert store.keyring is not None and len(store.keyring.keys) == 2
    assert store.key_source == f"file {key}"
    assert store.node_name == "web-1.example"
    shown = repr(config)
    assert "password" not in shown and old not in shown and new not in shown


def test_a_node_keeps_no_path_of_an_account(tmp_path: Path) -> None:
    """A fleet node never opens an account's state or lock file: its configuration keeps no
    Path of an account, each is made (equal every time) when asked for; the file backend uses
    all three and keeps each once made, so its store, state watch and checks share it."""
    environ = {"DB": "postgresql://tokend@db/tokend", "KEYS": new_key_line()}
    node = config_from_toml_text(
        config_text(tmp_path, 'backend = "postgres"\ndsn_env = "DB"\nkey_env = "KEYS"\n')
        + "[accounts.a]\n[accounts.b]\n",
        environ=environ,
    )
    files = config_from_toml_text(
        BASE.format(tmp=tmp_path) + "[accounts.a]\n[accounts.b]\n", environ=environ
    )
    for name in ("a", "b"):
        for field in ("state_file", "lock_file", "token_file"):
            on_node, on_files = (getattr(c.accounts[name], field) for c in (node, files))
            assert on_node == on_files and on_node.parent == tmp_path / "state"
            assert getattr(node.accounts[name], field) is not on_node
            assert getattr(files.accounts[name], field) is on_files


def test_dsn_and_key_from_the_environment(tmp_path: Path) -> None:
    """dsn_env / key_env work like every other secret (a key variable may hold several lines)."""
    keys = f"{new_key_line()}\n{new_key_line()}"
    config = config_from_toml_text(
        config_text(tmp_path, 'backend = "postgres"\ndsn_env = "DB"\nkey_env = "KEYS"\n'),
        environ={"DB": "postgresql://tokend@db/tokend", "KEYS": keys},
    )
    assert config.store.dsn == "postgresql://tokend@db/tokend"
    assert config.store.keyring is not None and len(config.store.keyring.keys) == 2
    assert config.store.key_source == "env KEYS"


def test_postgres_without_a_key_or_dsn_lists_both_with_the_fix(tmp_path: Path) -> None:
    """Nobody puts plaintext tokens into a shared database by accident: no key, no start."""
    found = problems(tmp_path, 'backend = "postgres"\n')
    assert set(found) == {"store.dsn_file", "store.key_file"}
    assert "stores tokens encrypted and needs a key" in found["store.key_file"]
    assert "kakao-tokend store new-key" in found["store.key_file"]
    assert "needs the database: set dsn_file" in found["store.dsn_file"]


def test_the_file_backend_may_name_a_database_for_a_later_migration(tmp_path: Path) -> None:
    """`store migrate --to postgres` runs while the backend is still "file": DSN and key load."""
    dsn = secret_file(tmp_path / "dsn", "host=db dbname=tokend")
    key = secret_file(tmp_path / "store.key", new_key_line())
    config = config_from_toml_text(
        config_text(tmp_path, f'dsn_file = "{dsn}"\nkey_file = "{key}"\n'), environ={}
    )
    assert config.store.backend == "file"
    assert config.store.dsn == "host=db dbname=tokend" and config.store.keyring is not None


@pytest.mark.parametrize(
    ("store", "key", "expected"),
    [
        ('backend = "postgress"', "store.backend", 'did you mean "postgres"?'),
        ("backend = 1", "store.backend", 'expected "file" or "postgres"'),
        ('node_name = "web 1"', "store.node_name", "letters, digits"),
        ('node_name = ""', "store.node_name", "letters, digits"),
        ('key = "inline"', "store.key", "unknown key"),
        ('dns_file = "x"', "store.dns_file", 'did you mean "dsn_file"?'),
    ],
)
def test_store_mistakes_get_one_line_each(
    tmp_path: Path, store: str, key: str, expected: str
) -> None:
    """A wrong backend, node name or key: the key path and how to fix it."""
    found = problems(tmp_path, store + "\n")
    assert expected in found[key]


def test_publish_accounts_must_name_configured_accounts(tmp_path: Path) -> None:
    """A node told to publish an account the config does not have (a typo, an account
    removed) is refused: the key names the unknown account and the configured ones."""
    text = BASE.format(tmp=tmp_path) + (
        '[store]\npublish_accounts = ["shop", "home"]\n[accounts.home]\n[accounts.work]\n'
    )
    with pytest.raises(ConfigError) as caught:
        config_from_toml_text(text, environ={})
    assert dict(caught.value.details) == {
        "store.publish_accounts": 'no account named "shop" (accounts: home, work)'
    }
    typo = text.replace('"shop", ', '"hom", ')
    with pytest.raises(ConfigError) as caught:
        config_from_toml_text(typo, environ={})
    assert dict(caught.value.details) == {
        "store.publish_accounts": 'no account named "hom" (accounts: home, work);'
        ' did you mean "home"?'
    }
    several = text.replace('"shop", "home"', '"shop", "home", "x"')
    with pytest.raises(ConfigError) as caught:
        config_from_toml_text(several, environ={})
    assert dict(caught.value.details) == {
        "store.publish_accounts": 'no accounts named "shop", "x" (accounts: home, work)'
    }
    fine = text.replace('"shop", ', "")
    assert config_from_toml_text(fine, environ={}).store.publish_accounts == ("home",)
    assert (
        config_from_toml_text(text.replace('"shop", "home"', ""), environ={}).store.publish_accounts
        == ()
    )


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """The key file gets the same permission check as every secret file."""
    key = secret_file(tmp_path / "store.key", new_key_line(), mode=0o644)
    dsn = secret_file(tmp_path / "dsn", "host=db")
    found = problems(tmp_path, f'backend = "postgres"\ndsn_file = "{dsn}"\nkey_file = "{key}"\n')
    assert f"run: chmod 600 {key}" in found["store.key_file"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("MDEyMzQ1Njc4OWFiY2RlZg==\n", "the key is 16 bytes, AES-256 needs 32"),
        ("this is not base64!\n", "line 1: not a base64 key (content not shown)"),
    ],
)
def test_an_unusable_key_file_is_a_config_problem(
    tmp_path: Path, content: str, expected: str
) -> None:
    """A 16-byte key or garbage: refused at config time, naming file and line, not the key."""
    key = secret_file(tmp_path / "store.key", content)
    dsn = secret_file(tmp_path / "dsn", "host=db")
    found = problems(tmp_path, f'backend = "postgres"\ndsn_file = "{dsn}"\nkey_file = "{key}"\n')
    assert expected in found["store.key_file"]
    assert str(key) in found["store.key_file"]
    assert content.strip() not in found["store.key_file"]


def test_two_sources_for_the_dsn_are_refused(tmp_path: Path) -> None:
    """Exactly one source per secret, as everywhere else."""
    found = problems(tmp_path, 'dsn = "host=a"\ndsn_env = "DB"\n', {"DB": "host=b"})
    assert "are both set; give only one source for dsn" in next(iter(found.values()))


def test_a_paths_only_load_reads_neither_dsn_nor_key(tmp_path: Path) -> None:
    """`status` as an operator who cannot read the secrets still gets the config."""
    dsn = secret_file(tmp_path / "dsn", "host=db", mode=0o000)
    key = secret_file(tmp_path / "store.key", new_key_line(), mode=0o000)
    path = tmp_path / "config.toml"
    path.write_text(
        config_text(tmp_path, f'backend = "postgres"\ndsn_file = "{dsn}"\nkey_file = "{key}"\n')
    )
    config = load_config(path, environ={}, with_secrets=False)
    assert config.store.backend == "postgres"
    assert config.store.dsn is None and config.store.keyring is None


@pytest.mark.parametrize(
    ("kakao", "accounts", "fitted"),
    [
        ("", "", True),
        ('timeout = "30s"\n', "", True),
        ('timeout = "10s"\n', "", False),
        ("", '[accounts.a]\n[accounts.b]\n[accounts.b.kakao]\ntimeout = "10s"\n', False),
    ],
)
def test_the_hold_backstop_is_fitted_only_while_every_kakao_timeout_is_the_default(
    tmp_path: Path, kakao: str, accounts: str, fitted: bool
) -> None:
    """A short token's hold gets a backstop fitted to it (DbTimeouts.idle_for) only while no
    account's Kakao wait is set by hand: a wait written by hand keeps the session's backstop."""
    config = config_from_toml_text(BASE.format(tmp=tmp_path) + kakao + accounts, environ={})
    timeouts = db_timeouts(config)
    six_seconds = timeouts.idle_for(timedelta(seconds=6))
    assert (six_seconds < timeouts.idle_in_transaction) is fitted
    assert timeouts.idle_for(timedelta(hours=6)) == timeouts.idle_in_transaction


def test_a_dsn_that_does_not_parse_is_a_config_problem_named_by_its_source(
    tmp_path: Path,
) -> None:
    """A DSN libpq cannot read passed check-config and then failed every command with exit
    1 (`run` too, so systemd restarted it forever): it is a config problem of the key it came
    from, with an example, and the value (it may hold a password) is never shown. (With the
    file backend the config never loads psycopg: `store migrate` checks it, test_fleet_cli.)"""
    keys = secret_file(tmp_path / "store.key", new_key_line() + "\n")
    found = problems(
        tmp_path,
        f'backend = "postgres"\ndsn_env = "DB"\nkey_file = "{keys}"\n',
        environ={"DB": "===not a dsn password=hunter2"},
    )
    assert set(found) == {"store.dsn_env"}
    assert "not a valid libpq connection string" in found["store.dsn_env"]
    assert "hunter2" not in found["store.dsn_env"]
