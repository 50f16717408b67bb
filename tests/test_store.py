"""Tests for the token files: atomic writes, modes, locking, damaged state and write failures."""

from __future__ import annotations

import grp
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from kakao_tokend.errors import (
    StateCorrupt,
    StoreError,
    StoreLocked,
    StoreMoved,
    StoreWriteError,
    UnsafePath,
)
from kakao_tokend.store import (
    MOVED_NAME,
    TEMP_PREFIX,
    AccountStore,
    Listing,
    StorePaths,
    atomic_write,
    parse_json,
    read_file,
    read_state_file,
    remove_stale_temp_files,
)
from samples import ACCESS, NOW, REFRESH, make_state

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def store(tmp_path: Path) -> AccountStore:
    return AccountStore.from_paths("default", state_file=tmp_path / "state" / "default.state.json")


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that an unprivileged subprocess (nobody) can enter, unlike pytest's tmp."""
    directory = Path(tempfile.mkdtemp(prefix="kakao-store-test-"))
    directory.chmod(0o755)
    yield directory
    subprocess.run(["rm", "-rf", str(directory)], check=True)


def run_python(code: str, *, as_nobody: bool = False, timeout: float = 30) -> str:
    """Run ``code`` in a fresh interpreter (optionally dropped to nobody); return its stdout.

    The privilege drop happens inside the child after our package is imported, because nobody
    may not be able to read the interpreter's installation.
    """
    prelude = "import kakao_tokend.store, kakao_tokend.errors, os\n"
    if as_nobody and IS_ROOT:
        prelude += "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


# -- round trip and published document ---------------------------------------------------------


def test_load_without_file_returns_none(store: AccountStore) -> None:
    """No state file yet means None (not an error), and no signature."""
    assert store.load() is None
    assert store.state_signature() is None
    assert store.read_published() is None


def test_save_load_round_trip(store: AccountStore) -> None:
    """What save() writes, load() returns unchanged, and parent directories are created."""
    state = make_state()
    store.save(state)
    assert store.load() == state


def test_published_document_keeps_kakao_field_names(store: AccountStore) -> None:
    """The token file uses Kakao's names, remaining seconds at write time and RFC 3339 times."""
    now = NOW + timedelta(hours=1)
    store.publish(make_state(), now=now)
    with open(store.token_path) as handle:
        document = json.load(handle)
    assert document == {
        "access_token": ACCESS,
        "token_type": "bearer",
        "expires_in": 5 * 3600,
        "refresh_token_expires_in": 60 * 86400 - 3600,
        "scope": "profile_nickname talk_message",
        "expires_at": "2026-03-01T18:00:00Z",
        "refresh_token_expires_at": "2026-04-30T12:00:00Z",
        "refresh_token_expires_estimated": False,
        "refreshed_at": "2026-03-01T12:00:00Z",
        "generation": 3,
        "account": "default",
    }
    assert store.read_published() == document


def test_a_damaged_token_file_names_the_refresh_command_for_its_account(tmp_path: Path) -> None:
    """The hint's command refreshes this account, not the default one."""
    store = AccountStore.from_paths("bot", state_file=tmp_path / "bot.state.json")
    store.token_path.write_text("{not json")
    with pytest.raises(StoreError) as caught:
        store.read_published()
    assert "`kakao-tokend --account bot refresh`" in str(caught.value.hint)


def test_a_deeply_nested_token_file_is_damaged_not_an_internal_error(tmp_path: Path) -> None:
    """Brackets nested deeper than the parser recurses make the same "damaged" StoreError as
    any other broken token file (it was an internal RecursionError, exit 70)."""
    store = AccountStore.from_paths("bot", state_file=tmp_path / "bot.state.json")
    store.token_path.write_bytes(b"[" * 20000 + b"]" * 20000)
    with pytest.raises(StoreError, match="is damaged") as caught:
        store.read_published()
    assert "`kakao-tokend --account bot refresh`" in str(caught.value.hint)
    assert store.published_current(1) is False


def test_a_deeply_nested_alert_bookkeeping_is_ignored_as_damaged(
    store: AccountStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The alert bookkeeping nested deeper than the parser recurses is ignored with one
    warning, like any damaged bookkeeping (it stopped `run` for every account)."""
    store.save(make_state())
    store.alerts_path.write_bytes(b"{" + b'"a":{' * 20000 + b"}" * 20001)
    assert store.load_alerts() is None
    assert "ignoring damaged" in caplog.text


def test_a_deeply_nested_backup_is_not_a_state_file(tmp_path: Path) -> None:
    """`restore` of a file nested deeper than the parser recurses says what is wrong."""
    path = tmp_path / "backup.json"
    path.write_bytes(b"[" * 20000 + b"]" * 20000)
    with pytest.raises(ValueError, match="is not a kakao-tokend state file"):
        read_state_file(path)


def test_published_expiry_never_negative(store: AccountStore) -> None:
    """An expired token is published with expires_in 0, not a negative number."""
    document = store.published_document(make_state(), now=NOW + timedelta(days=90))
    assert document["expires_in"] == 0
    assert document["refresh_token_expires_in"] == 0


def test_refresh_token_published_only_when_opted_in(tmp_path: Path) -> None:
    """refresh_token is left out of the token file unless include_refresh_token is set."""
    plain = AccountStore.from_paths("a", state_file=tmp_path / "a.state.json")
    opted = AccountStore.from_paths(
        "b", state_file=tmp_path / "b.state.json", include_refresh_token=True
    )
    plain.publish(make_state("a"), now=NOW)
    opted.publish(make_state("b"), now=NOW)
    assert "refresh_token" not in json.loads(plain.token_path.read_text())
    assert REFRESH not in plain.token_path.read_text()
    assert json.loads(opted.token_path.read_text())["refresh_token"] == REFRESH


def test_state_of_other_account_is_adopted(store: AccountStore) -> None:
    """A state file written for another account name (renamed account) loads as this account."""
    store.save(make_state("old-name"))
    loaded = store.load()
    assert loaded is not None
    assert loaded.account == "default"
    assert loaded.tokens.refresh_token == REFRESH


def test_state_signature_changes_on_write(store: AccountStore) -> None:
    """Each save changes the (inode, mtime, size) signature, so outside writers are noticed."""
    store.save(make_state(generation=1))
    first = store.state_signature()
    store.save(make_state(generation=2))
    second = store.state_signature()
    assert first is not None and second is not None
    assert first != second


def test_remove_deletes_state_and_token_files(store: AccountStore) -> None:
    """remove() deletes both files and is harmless when they are already gone."""
    store.save(make_state())
    store.publish(make_state(), now=NOW)
    store.remove()
    assert not store.state_path.exists()
    assert not store.token_path.exists()
    store.remove()


def test_accepts_account_config(tmp_path: Path) -> None:
    """AccountStore takes config.AccountConfig directly and honours its publish settings."""
    from kakao_tokend.config import AccountConfig, KakaoApp

    account = AccountConfig(
        name="work",
        app=KakaoApp(rest_api_key="key", client_secret=None),
        state_file=tmp_path / "work.state.json",
        lock_file=tmp_path / "work.lock",
        token_file=tmp_path / "pub" / "work.json",
        token_file_mode=0o600,
        include_refresh_token=True,
    )
    store = AccountStore(account)
    with store.lock(timeout=0):
        store.save(make_state("work"))
        store.publish(make_state("work"), now=NOW)
    assert store.lock_path == tmp_path / "work.lock"
    assert (tmp_path / "pub" / "work.json").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "pub" / "work.json").read_text())["refresh_token"] == REFRESH


def test_repr_shows_no_token(store: AccountStore) -> None:
    """The store's repr names the account and path only."""
    store.save(make_state())
    assert ACCESS not in repr(store) and REFRESH not in repr(store)


# -- modes, groups, directories, symlinks -----------------------------------------------------


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize("mask", [0o000, 0o077])
@pytest.mark.parametrize("token_mode", [0o640, 0o600, 0o644])
def test_modes_independent_of_umask(tmp_path: Path, mask: int, token_mode: int) -> None:
    """State is 0600 and the token file has its configured mode whatever the umask is."""
    os.umask(mask)
    store = AccountStore.from_paths(
        "default", state_file=tmp_path / "default.state.json", token_file_mode=token_mode
    )
    for _ in range(2):  # creation and replacement
        store.save(make_state())
        store.publish(make_state(), now=NOW)
        assert store.state_path.stat().st_mode & 0o7777 == 0o600
        assert store.token_path.stat().st_mode & 0o7777 == token_mode


@pytest.mark.usefixtures("umask")
def test_missing_directories_created_0750(tmp_path: Path) -> None:
    """Missing parent directories (all levels) are created with 0750, even under umask 000."""
    os.umask(0)
    store = AccountStore.from_paths("default", state_file=tmp_path / "a" / "b" / "s.json")
    store.save(make_state())
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o750


@pytest.mark.skipif(not IS_ROOT, reason="changing a file's group to any group needs root")
@pytest.mark.parametrize("group", ["daemon", "nogroup", 1])
def test_token_file_group_applied(tmp_path: Path, group: str | int) -> None:
    """The token file gets the configured group (by name or gid); the owner is unchanged."""
    store = AccountStore.from_paths(
        "default", state_file=tmp_path / "s.json", token_file_group=group
    )
    store.publish(make_state(), now=NOW)
    info = store.token_path.stat()
    expected = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
    assert info.st_gid == expected
    assert info.st_uid == os.geteuid()
    assert info.st_mode & 0o7777 == 0o640


def test_unknown_group_is_a_clear_error(store: AccountStore, tmp_path: Path) -> None:
    """A group name that does not exist fails with a message naming it, and writes nothing."""
    bad = AccountStore.from_paths(
        "default", state_file=tmp_path / "s.json", token_file_group="no-such-group-xyz"
    )
    with pytest.raises(StoreError, match="group 'no-such-group-xyz' does not exist"):
        bad.publish(make_state(), now=NOW)
    assert not bad.token_path.exists()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a subprocess as nobody")
def test_group_change_not_permitted(shared_dir: Path) -> None:
    """A group the process may not use gives StoreWriteError and leaves no file behind."""
    shared_dir.chmod(0o777)
    out = run_python(
        f"""
        from pathlib import Path
        from kakao_tokend.store import atomic_write
        from kakao_tokend.errors import StoreWriteError
        try:
            atomic_write(Path({str(shared_dir / "t.json")!r}), b"{{}}", mode=0o640, group=0)
        except StoreWriteError as exc:
            print(exc)
        """,
        as_nobody=True,
    )
    assert "cannot give" in out and "not permitted" in out
    assert list(shared_dir.iterdir()) == []


def test_symlinked_token_file_is_never_followed(tmp_path: Path) -> None:
    """A token path that is a symlink is refused by check_paths; a write replaces the link
    itself and a logout removes only the link: the file it points to is never touched."""
    target = tmp_path / "elsewhere" / "token.json"
    target.parent.mkdir()
    target.write_text("not ours\n")
    link = tmp_path / "default.token.json"
    link.symlink_to(target)
    store = AccountStore.from_paths("default", state_file=tmp_path / "s.json", token_file=link)
    with pytest.raises(UnsafePath, match="symbolic link"):
        store.check_paths()
    with pytest.raises(UnsafePath, match="symbolic link"):
        store.read_published()
    store.publish(make_state(), now=NOW)
    assert not link.is_symlink() and json.loads(link.read_text())["generation"] == 3
    assert target.read_text() == "not ours\n"
    link.unlink()
    link.symlink_to(target)
    store.remove()
    assert not link.exists() and not link.is_symlink()
    assert target.read_text() == "not ours\n"


def test_a_shared_directory_is_judged_once_but_every_file_still_is(tmp_path: Path) -> None:
    """check_paths with a shared ``checked`` set (a start of many accounts) judges a directory
    once: the set remembers it, so a later change to it goes unseen in that pass. Every
    account's own files are still judged (a symlinked token file is refused), and a directory
    not in the set is judged as ever."""
    shared = tmp_path / "state"
    shared.mkdir(mode=0o700)
    first = AccountStore.from_paths("a", state_file=shared / "a.state.json")
    checked: set[str] = set()
    first.check_paths(checked)
    assert checked == {str(shared)}
    shared.chmod(0o777)
    AccountStore.from_paths("b", state_file=shared / "b.state.json").check_paths(checked)
    (shared / "c.token.json").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePath, match="symbolic link"):
        AccountStore.from_paths("c", state_file=shared / "c.state.json").check_paths(checked)
    with pytest.raises(UnsafePath, match="writable by group and others"):
        first.check_paths()
    other = tmp_path / "other"
    other.mkdir(mode=0o777)
    other.chmod(0o777)
    with pytest.raises(UnsafePath, match="writable by group and others"):
        AccountStore.from_paths("d", state_file=other / "d.state.json").check_paths(checked)
    assert str(other) not in checked


def _listed(listing: Listing, directory: Path, name: str) -> AccountStore:
    """A store of account ``name`` in ``directory`` that answers from ``listing`` (as at start)."""
    paths = StorePaths(
        name=name,
        state_file=directory / f"{name}.state.json",
        lock_file=directory / f"{name}.lock",
        token_file=directory / f"{name}.token.json",
    )
    return AccountStore(paths, rescue_dir=directory / "run", listing=listing)


def test_a_listing_judges_every_file_as_the_lookups_do_and_is_only_as_new_as_its_moment(
    tmp_path: Path,
) -> None:
    """A start of many accounts judges their files from one listing of the directory: a
    symlinked token file or a directory in place of a state file is refused as without one,
    a state file is read, and a missing one loads as None. A state written after the listing
    was taken is not seen while it is open (the watch and the heartbeat notice it), and is
    once it is closed; a migration marker in the directory is refused."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    listing = Listing()
    written = make_state("a")
    _listed(Listing(), directory, "a").save(written)
    (directory / "b.token.json").symlink_to(tmp_path / "elsewhere")
    (directory / "c.state.json").mkdir()
    a, b, c, d = (_listed(listing, directory, name) for name in "abcd")
    a.check_paths()
    assert a.load() == written
    with pytest.raises(UnsafePath, match="symbolic link"):
        b.check_paths()
    with pytest.raises(UnsafePath, match="not a regular file"):
        c.check_paths()
    d.check_paths()
    assert d.load() is None and d.load_rescue() is None and d.read_published() is None
    AccountStore.from_paths("d", state_file=d.state_path).save(make_state("d"))
    assert d.load() is None  # the listing's moment
    listing.close()
    assert d.load() == make_state("d")
    (directory / MOVED_NAME).write_text("{}")
    with pytest.raises(StoreMoved):
        _listed(Listing(), directory, "a").load()


def test_accounts_in_a_judged_directory_are_judged_from_the_listing_alone(
    tmp_path: Path,
) -> None:
    """The usual account of a large start, its files in a directory judged already, is
    judged from the listing's entries alone, and still refuses a symlinked token, lock or
    alert bookkeeping file and a directory in place of its state file. Alert bookkeeping the
    listing did not name is not looked for once more after the listing is closed (only
    holders of the instance lock write it: the daemon, `store migrate`) - once; a listed one
    is read, and one the store saves itself is read back."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    document = {"version": 1, "account": "g", "active": {"x": {"at": "2026-01-01T00:00:00Z"}}}
    _listed(Listing(), directory, "g").save_alerts(document)
    (directory / "b.token.json").symlink_to(tmp_path / "elsewhere")
    (directory / "c.state.json").mkdir()
    (directory / "e.lock").symlink_to(tmp_path / "elsewhere")
    (directory / "f.alerts.json").symlink_to(tmp_path / "elsewhere")
    listing = Listing()
    checked: set[str] = set()
    _listed(listing, directory, "a").check_paths(checked)
    assert checked == {str(directory), str(directory / "run")}  # the rescue directory too
    for name, refusal in (
        ("b", "symbolic link"),
        ("c", "not a regular file"),
        ("e", "symbolic link"),
        ("f", "symbolic link"),
    ):
        with pytest.raises(UnsafePath, match=refusal):
            _listed(listing, directory, name).check_paths(checked)
    g, h, i = (_listed(listing, directory, name) for name in "ghi")
    for store in (g, h, i):
        store.check_paths(checked)
    listing.close()
    assert g.load_alerts() == document
    later = {**document, "account": "h"}
    _listed(Listing(), directory, "h").save_alerts(later)
    assert h.load_alerts() is None  # the listing's word, once
    assert h.load_alerts() == later
    i.save_alerts({**document, "account": "i"})
    assert i.load_alerts() == {**document, "account": "i"}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": [1, 2.5, null, true], "b": "\\u00e9"}\n',
        b'  {"a": 1}',
        b'{"a": 1}\n\r\t ',
        b'{"a": 1} x',
        b'{"a": 1}\x0b',
        "{}\u3000".encode(),
        b"",
        b"{",
        b"[1]",
        b"1",
        b"\xff",
    ],
)
def test_parse_json_answers_as_json_loads(raw: bytes) -> None:
    """The start's JSON reader gives what json.loads gives, or raises the same error."""
    try:
        expected: object = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        with pytest.raises(type(exc), match="^" + re.escape(str(exc)) + "$"):
            parse_json(raw)
    else:
        assert parse_json(raw) == expected


def test_read_file_reads_every_byte_and_refuses_what_is_not_a_regular_file(
    tmp_path: Path,
) -> None:
    """read_file returns a whole file of any size (an empty one too, and one far larger than
    its first read); a FIFO is refused at once instead of blocking, a symlink is refused."""
    for size in (0, 1, 4095, 4096, 300_000):
        path = tmp_path / f"f{size}"
        data = random.Random(size).randbytes(size)
        path.write_bytes(data)
        assert read_file(path, what="test file") == data
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath, match="not a regular file"):
        read_file(fifo, what="test file")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "f1")
    with pytest.raises(UnsafePath, match="symbolic link"):
        read_file(link, what="test file")


def test_read_file_refuses_a_file_larger_than_any_of_ours(tmp_path: Path) -> None:
    """A file far larger than kakao-tokend ever writes (planted where a token file or a
    template destination is read back) is refused with one line, not read into memory; a
    smaller limit can be asked for (a rendered template's size)."""
    huge = tmp_path / "huge"
    with huge.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(StoreError, match=r"larger than .* MiB"):
        read_file(huge, what="test file")
    small = tmp_path / "small"
    small.write_bytes(b"x" * 100)
    assert read_file(small, what="test file", limit=100) == b"x" * 100
    with pytest.raises(StoreError, match="larger than 99 bytes"):
        read_file(small, what="test file", limit=99)


def test_stale_temp_files_removed(tmp_path: Path) -> None:
    """Only our own temp files older than the limit are removed; others are left alone."""
    old = tmp_path / f"{TEMP_PREFIX}default.state.json.aaaa.tmp"
    fresh = tmp_path / f"{TEMP_PREFIX}default.state.json.bbbb.tmp"
    foreign = tmp_path / ".other.tmp"
    for path in (old, fresh, foreign):
        path.write_bytes(b"{")
    past = time.time() - 120
    os.utime(old, (past, past))
    os.utime(foreign, (past, past))
    assert remove_stale_temp_files(tmp_path) == [old]
    assert fresh.exists() and foreign.exists() and not old.exists()


def test_first_lock_cleans_stale_temp_files(store: AccountStore) -> None:
    """Taking the lock the first time removes crash leftovers in the state directory."""
    store.save(make_state())
    stale = store.state_path.parent / f"{TEMP_PREFIX}default.state.json.cccc.tmp"
    stale.write_bytes(b"")
    past = time.time() - 120
    os.utime(stale, (past, past))
    with store.lock(timeout=0):
        pass
    assert not stale.exists()


# -- locking -----------------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from kakao_tokend.store import AccountStore
store = AccountStore.from_paths("default", state_file=Path(sys.argv[1]))
with store.lock(timeout=0):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lock_holder(store: AccountStore) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.state_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def test_lock_refuses_second_process(
    store: AccountStore, lock_holder: subprocess.Popen[str]
) -> None:
    """While another process holds the lock, we time out with StoreLocked naming its pid."""
    start = time.monotonic()
    with pytest.raises(StoreLocked, match=rf"\(pid {lock_holder.pid}\)"), store.lock(timeout=0.3):
        pass
    assert time.monotonic() - start >= 0.3
    assert store.try_lock() is False
    assert not store.locked


def test_lock_released_by_other_process_can_be_taken(
    store: AccountStore, lock_holder: subprocess.Popen[str]
) -> None:
    """Once the holder ends, lock() waits for and gets the lock within its timeout."""
    assert lock_holder.stdin is not None
    lock_holder.stdin.close()  # the holder leaves its with-block and exits
    with store.lock(timeout=10):
        assert store.lock_holder() == os.getpid()
    assert not store.locked
    assert store.lock_holder() is None


def test_lock_is_reentrant_within_one_store(store: AccountStore) -> None:
    """Nested lock() on one store does not deadlock; the flock lasts until the outer exit."""
    other = AccountStore.from_paths("default", state_file=store.state_path)
    with store.lock(timeout=0):
        with store.lock(timeout=0):
            assert store.try_lock()
            store.unlock()
        assert other.try_lock() is False  # still held after the inner block
    assert other.try_lock() is True
    other.unlock()


def test_lock_excludes_second_store_object_in_same_process(store: AccountStore) -> None:
    """Two store objects (two open file descriptions) exclude each other, like two processes."""
    other = AccountStore.from_paths("default", state_file=store.state_path)
    assert store.try_lock()
    with pytest.raises(StoreLocked, match=rf"pid {os.getpid()}"), other.lock(timeout=0):
        pass
    store.unlock()


def test_unlock_without_lock_is_a_bug(store: AccountStore) -> None:
    """unlock() without a matching lock raises instead of silently unbalancing the depth."""
    with pytest.raises(RuntimeError):
        store.unlock()


def test_lock_is_not_on_the_data_file(store: AccountStore) -> None:
    """Saving under the lock (which replaces the state file) does not affect the lock file."""
    with store.lock(timeout=0):
        store.save(make_state())
        other = AccountStore.from_paths("default", state_file=store.state_path)
        assert other.try_lock() is False
    assert store.lock_path != store.state_path


# -- damaged state -----------------------------------------------------------------------------

VALID = json.dumps(make_state().to_dict()).encode()
CORRUPTIONS = {
    "empty": b"",
    "whitespace": b"  \n",
    "truncated": VALID[: len(VALID) // 2],
    "bad json": b"{not json",
    "list": b"[]",
    "wrong shape": b'{"version": 1, "account": "default"}',
    "wrong version": b'{"version": 99}',
    "invalid utf-8": b"\xff\xfe\x00garbage",
    "zeros": b"\x00" * 64,
    # 40 kB of brackets: deeper than Python's parser recurses (RecursionError, not ValueError).
    "nested too deep": b"[" * 20000 + b"]" * 20000,
    # A time no token was ever issued or expires at (date arithmetic overflowed in `status`).
    "year one": json.dumps(
        {
            **make_state().to_dict(),
            "tokens": {
                **make_state().to_dict()["tokens"],
                "refresh_expires_at": "0001-01-01T00:00:00Z",
            },
        }
    ).encode(),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damaged_state_is_kept_aside(store: AccountStore, kind: str) -> None:
    """A damaged state file is moved to .corrupt-<stamp> with its bytes and never overwritten."""
    store.save(make_state())  # creates the directory
    store.state_path.write_bytes(CORRUPTIONS[kind])
    with pytest.raises(StateCorrupt) as info:
        store.load()
    kept = info.value.quarantined
    assert kept is not None
    assert kept.read_bytes() == CORRUPTIONS[kind]
    assert kept.name.startswith("default.state.json.corrupt-")
    assert not store.state_path.exists()
    message = str(info.value)
    assert str(kept) in message
    assert "kakao-tokend --account default login" in message
    assert store.load() is None  # the damaged file no longer blocks a fresh login


def test_second_corruption_does_not_clobber_first_copy(store: AccountStore) -> None:
    """Two damaged files in the same second end up in two different, intact copies."""
    store.save(make_state())
    store.state_path.write_bytes(b"first")
    with pytest.raises(StateCorrupt) as first:
        store.load()
    store.state_path.write_bytes(b"second")
    with pytest.raises(StateCorrupt) as second:
        store.load()
    assert first.value.quarantined != second.value.quarantined
    assert first.value.quarantined is not None and second.value.quarantined is not None
    assert first.value.quarantined.read_bytes() == b"first"
    assert second.value.quarantined.read_bytes() == b"second"


def test_corrupt_message_never_contains_a_token(store: AccountStore) -> None:
    """A damaged field holding a token-like value is not echoed into the error message."""
    data = make_state().to_dict()
    data["tokens"]["access_expires_at"] = ACCESS  # unparsable as a time
    store.save(make_state())
    store.state_path.write_text(json.dumps(data))
    with pytest.raises(StateCorrupt) as info:
        store.load()
    assert ACCESS not in str(info.value)


def test_unreadable_state_is_store_error(shared_dir: Path) -> None:
    """Permission denied on the state file is a StoreError with a hint, not 'corrupt'."""
    path = shared_dir / "default.state.json"
    path.write_bytes(VALID)
    path.chmod(0o000)
    out = run_python(
        f"""
        from pathlib import Path
        from kakao_tokend.store import AccountStore
        from kakao_tokend.errors import StoreError, StateCorrupt
        store = AccountStore.from_paths("default", state_file=Path({str(path)!r}))
        try:
            store.load()
        except StateCorrupt:
            print("corrupt")
        except StoreError as exc:
            print(exc)
        """,
        as_nobody=True,
    )
    assert "permission denied" in out and "run kakao-tokend as the user" in out
    path.chmod(0o600)
    assert path.read_bytes() == VALID


# -- write failures ----------------------------------------------------------------------------


def test_write_failure_keeps_previous_file(store: AccountStore) -> None:
    """A file-size limit (EFBIG, like a full disk) raises StoreWriteError; old file intact."""
    store.save(make_state(generation=1))
    before = store.state_path.read_bytes()
    out = run_python(
        f"""
        import resource, signal
        from pathlib import Path
        from kakao_tokend.store import atomic_write
        from kakao_tokend.errors import StoreWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
        try:
            atomic_write(Path({str(store.state_path)!r}), b"x" * 5000, mode=0o600)
        except StoreWriteError as exc:
            print(exc)
        """
    )
    assert f"cannot write {store.state_path}: File too large" in out
    assert store.state_path.read_bytes() == before
    assert leftovers(store.state_path.parent) == []


FULL_DISK = """
import json, os, subprocess, sys
from pathlib import Path
from kakao_tokend.store import AccountStore
from kakao_tokend.errors import StoreWriteError
from kakao_tokend.state import AccountState
root, kind, state_json = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(root)], check=True)
store = AccountStore.from_paths("default", state_file=root / "default.state.json")
state = AccountState.from_dict(json.loads(state_json))
store.save(state)
before = store.state_path.read_bytes()
if kind == "full":
    fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        os.close(fd)
    state = AccountState.from_dict({**state.to_dict(), "extras": {"big": "y" * 8192}})
else:
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
try:
    store.save(state)
    message = None
except StoreWriteError as exc:
    message = str(exc)
after = store.state_path.read_bytes()
names = sorted(p.name for p in root.iterdir())
print(json.dumps({"message": message, "intact": before == after, "names": names}))
"""


def _can_mount_privately() -> bool:
    if not IS_ROOT:
        return False
    with tempfile.TemporaryDirectory() as directory:
        probe = subprocess.run(
            ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", directory],
            capture_output=True,
        )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_privately(), reason="needs a private mount namespace")
@pytest.mark.parametrize(
    ("kind", "reason"), [("full", "No space left on device"), ("ro", "Read-only file system")]
)
def test_full_or_read_only_file_system(tmp_path: Path, kind: str, reason: str) -> None:
    """On a full or read-only tmpfs, save() raises a readable StoreWriteError, old file intact."""
    (tmp_path / "fs").mkdir()
    result = subprocess.run(
        [
            "unshare",
            "-m",
            sys.executable,
            "-c",
            FULL_DISK,
            str(tmp_path / "fs"),
            kind,
            json.dumps(make_state().to_dict()),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    path = tmp_path / "fs" / "default.state.json"
    assert outcome["message"].startswith(f"cannot write {path}: {reason}")
    assert outcome["intact"]
    assert not any(name.startswith(TEMP_PREFIX) for name in outcome["names"])


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a subprocess as nobody")
def test_write_to_unwritable_directory(shared_dir: Path) -> None:
    """A directory we may not write to gives a readable StoreWriteError, nothing created."""
    out = run_python(
        f"""
        from pathlib import Path
        from kakao_tokend.store import atomic_write
        from kakao_tokend.errors import StoreWriteError
        try:
            atomic_write(Path({str(shared_dir / "t.json")!r}), b"{{}}", mode=0o600)
        except StoreWriteError as exc:
            print(exc)
        """,
        as_nobody=True,
    )
    assert f"cannot write {shared_dir / 't.json'}: Permission denied" in out
    assert list(shared_dir.iterdir()) == []


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a subprocess as nobody")
def test_directory_creation_failure_is_store_write_error(shared_dir: Path) -> None:
    """A parent directory that cannot be created gives StoreWriteError naming it."""
    out = run_python(
        f"""
        from pathlib import Path
        from kakao_tokend.store import AccountStore
        from kakao_tokend.errors import StoreWriteError
        state_file = Path({str(shared_dir)!r}) / "a" / "s.json"
        try:
            AccountStore.from_paths("default", state_file=state_file).try_lock()
        except StoreWriteError as exc:
            print(exc)
        """,
        as_nobody=True,
    )
    assert f"cannot create directory {shared_dir / 'a'}: Permission denied" in out


def test_write_error_on_directory_target(tmp_path: Path) -> None:
    """Replacing a directory with a file fails cleanly and removes the temp file."""
    (tmp_path / "t.json").mkdir()
    with pytest.raises(StoreWriteError, match="cannot write"):
        atomic_write(tmp_path / "t.json", b"{}", mode=0o600)
    assert leftovers(tmp_path) == []


# -- concurrency and crashes -------------------------------------------------------------------

READER = """
import json, sys
path, wanted = sys.argv[1], int(sys.argv[2])
failures = reads = 0
generations = set()
while len(generations) < wanted:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        failures += 1
        if failures > 1000:
            break
        continue
    reads += 1
    try:
        doc = json.loads(raw)
        assert len(doc["padding"]) == doc["size"]
        generations.add(doc["generation"])
    except Exception:
        failures += 1
        if failures > 1000:
            break
print(json.dumps({"failures": failures, "reads": reads, "generations": len(generations)}))
"""


def payload(generation: int, size: int) -> bytes:
    return json.dumps({"generation": generation, "size": size, "padding": "p" * size}).encode()


def test_concurrent_readers_never_see_partial_file(tmp_path: Path) -> None:
    """4 reader processes in a tight loop never read a partial file while we rewrite it.

    Counted, not timed: each reader reads until it has seen 50 versions of the file, and we
    rewrite it (at least 100 times) until every reader is done, however slow the machine.
    """
    path = tmp_path / "token.json"
    atomic_write(path, payload(0, 10), mode=0o640)
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(path), "50"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    rng = random.Random(7)
    generation = 0
    while generation < 100 or any(proc.poll() is None for proc in readers):
        generation += 1
        atomic_write(path, payload(generation, rng.choice([1, 500, 20_000, 200_000])), mode=0o640)
        if generation == 50_000:  # a bound on the loop, not a time budget: readers are stuck
            for proc in readers:
                proc.kill()
            raise AssertionError("the readers never saw 50 versions in 50,000 rewrites")
    results = [json.loads(proc.communicate()[0]) for proc in readers]
    assert generation >= 100
    for result in results:
        assert result["failures"] == 0
        assert result["reads"] > 0
        assert result["generations"] >= 3
    assert leftovers(tmp_path) == []


WRITER = """
import hashlib, json, sys
from pathlib import Path
from kakao_tokend.store import atomic_write
path = Path(sys.argv[1])
generation = int(json.loads(path.read_bytes())["generation"])
print("ready", flush=True)
while True:
    generation += 1
    body = "x" * (100_000 + generation % 7 * 10_000)
    doc = {"generation": generation, "body": body, "sha": hashlib.sha256(body.encode()).hexdigest()}
    atomic_write(path, json.dumps(doc).encode(), mode=0o600)
"""


def test_kill_9_during_writes_leaves_old_or_new_file(tmp_path: Path) -> None:
    """A writer killed with SIGKILL at random moments always leaves one complete version."""
    import hashlib

    path = tmp_path / "default.state.json"
    body = "start"
    path.write_text(
        json.dumps({"generation": 0, "body": body, "sha": hashlib.sha256(b"start").hexdigest()})
    )
    rng = random.Random(11)
    last = 0
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        doc = json.loads(path.read_bytes())
        assert hashlib.sha256(doc["body"].encode()).hexdigest() == doc["sha"]
        assert doc["generation"] >= last
        last = doc["generation"]
    assert last > 0
    # Crash leftovers are recognised as ours and cleaned up once they are old enough.
    for name in leftovers(tmp_path):
        past = time.time() - 120
        os.utime(tmp_path / name, (past, past))
    remove_stale_temp_files(tmp_path)
    assert leftovers(tmp_path) == []


def test_the_emergency_reserve_is_allocated_and_given_up_once(tmp_path: Path) -> None:
    """ensure_reserve allocates real blocks (not a sparse file); release deletes it once."""
    from kakao_tokend.store import RESERVE_NAME, RESERVE_SIZE, ensure_reserve, release_reserve

    assert ensure_reserve(tmp_path)
    reserve = tmp_path / RESERVE_NAME
    info = reserve.stat()
    assert info.st_size == RESERVE_SIZE
    assert info.st_blocks * 512 >= RESERVE_SIZE
    assert oct(info.st_mode & 0o777) == oct(0o600)
    assert ensure_reserve(tmp_path)  # idempotent
    assert release_reserve(tmp_path)
    assert not reserve.exists()
    assert not release_reserve(tmp_path)


def test_a_copy_that_cannot_be_made_stops_the_save_unless_new_tokens_come_first(
    tmp_path: Path,
) -> None:
    """save_keeping_a_copy on a file system with no inode left (the copy is a hard link):
    by default nothing changes and StoreError says so (`restore`, an import without a
    refresh); with copy_required=False (tokens Kakao has just issued) the new state is
    saved without the copy (the emergency reserve gives way to its temporary file)."""
    from dataclasses import replace as changed

    from diskfull import tiny_tmpfs, use_up_inodes
    from kakao_tokend.store import ensure_reserve

    with tiny_tmpfs(tmp_path / "state", inodes=16) as directory:
        store = AccountStore.from_paths("default", state_file=directory / "default.state.json")
        old = make_state()
        store.save(old)
        assert ensure_reserve(directory)  # what a save on a full disk gives up
        before = store.state_path.read_bytes()
        use_up_inodes(directory)
        new = changed(old, generation=old.generation + 1)
        with pytest.raises(StoreError, match="could not be moved aside"):
            store.save_keeping_a_copy(new, "replaced")
        assert store.state_path.read_bytes() == before
        assert store.save_keeping_a_copy(new, "replaced", copy_required=False) is None
        loaded = store.load()
        assert loaded is not None and loaded.generation == old.generation + 1
