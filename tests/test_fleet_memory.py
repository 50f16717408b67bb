"""What a fleet node holds for each of its many accounts (docs/benchmarks.md, fleet memory).

Each test pins one saving by the behaviour that gives it, and fails on the code before it.
The PostgreSQL-backed ones start a throwaway cluster (tests/conftest.py's ``pg_dsn``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from fleetkit import NODE, migrated, node_store, sample_state, write_store_config
from kakao_tokend.config import Config, load_config
from kakao_tokend.fleet import accounts, db, packed
from kakao_tokend.fleet import store as fleet_store
from kakao_tokend.fleet.accounts import AccountRow, RefreshStatus
from kakao_tokend.fleet.crypto import Keyring, new_key_line
from kakao_tokend.fleet.node import plan_for
from kakao_tokend.fleet.packed import PackedState
from kakao_tokend.fleet.store import FleetStore, PgAccountStore, plan_of
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.refresher import AccountManager
from kakao_tokend.scheduler import RefreshScheduler
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore


def many_accounts(tmp_path: Path, names: list[str]) -> tuple[Config, FleetStore]:
    """A fleet configuration with ``names`` (no table of their own) and its node's store (not
    opened: nothing here reaches the database)."""
    tables = "".join(f"[accounts.{name}]\n" for name in names)
    config = load_config(write_store_config(tmp_path, "postgresql://unused/db", extra=tables))
    config.state_dir.mkdir(mode=0o700)
    return config, node_store(config, "postgresql://unused/db", "web-1")


def count_file_store_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each account whose alert bookkeeping the file store is asked to read."""
    asked: list[str] = []
    read = AccountStore.load_alerts

    def counting(self: AccountStore) -> dict[str, Any] | None:
        asked.append(self.name)
        return read(self)

    monkeypatch.setattr(AccountStore, "load_alerts", counting)
    return asked


def test_accounts_without_alert_bookkeeping_attach_from_one_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's accounts attach their alerts at start: those without a local bookkeeping
    file are answered by one listing of the state directory, with no file store, Path or
    failed open of their own (each Path interned its file names into a table that never
    shrinks); the one account that has a file still reads it."""
    names = [f"acct{i:03d}" for i in range(50)]
    config, fleet = many_accounts(tmp_path, names)
    document = {"active": {"store_unavailable": {"severity": "critical"}}}
    (config.state_dir / "acct007.alerts.json").write_text(json.dumps(document))
    asked = count_file_store_reads(monkeypatch)
    listings: list[str] = []
    scandir = os.scandir

    def counting_scandir(path: str) -> Any:
        listings.append(path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    found = {name: PgAccountStore(config.accounts[name], fleet).load_alerts() for name in names}
    assert found["acct007"] == document
    assert all(found[name] is None for name in names if name != "acct007")
    assert asked == ["acct007"]
    assert listings == [str(config.state_dir)]


def test_bookkeeping_written_by_the_node_is_read_back_within_the_listing(
    tmp_path: Path,
) -> None:
    """A file this node writes after the directory was listed is read back at once (the
    listing notes it), and a state directory that does not exist yet means no file."""
    config, fleet = many_accounts(tmp_path, ["one", "two"])
    config.state_dir.rmdir()
    one, two = (PgAccountStore(config.accounts[name], fleet) for name in ("one", "two"))
    assert one.load_alerts() is None  # listed: no directory
    config.state_dir.mkdir(mode=0o700)
    one.save_alerts({"active": {"x": {}}})
    assert one.load_alerts() == {"active": {"x": {}}}
    assert two.load_alerts() is None


def test_a_file_put_there_later_is_seen_once_the_listing_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing answers for a few seconds only: a bookkeeping file put in place later
    (restored by hand, say) is read by the next attachment after that, as before."""
    config, fleet = many_accounts(tmp_path, ["late"])
    store = PgAccountStore(config.accounts["late"], fleet)
    assert store.load_alerts() is None
    (config.state_dir / "late.alerts.json").write_text('{"active": {}}')
    clock = fleet_store.time.monotonic() + fleet_store.LISTING_FRESH + 1
    monkeypatch.setattr(fleet_store.time, "monotonic", lambda: clock)
    assert store.load_alerts() == {"active": {}}


async def test_a_cached_row_holds_its_id_as_a_number_and_still_binds_its_tokens(
    pg_dsn: str,
) -> None:
    """A row read from the store keeps its id as the UUID's number, no ``uuid.UUID`` object
    (56 bytes of each cached row); the id it gives back is the database's, and a ciphertext
    sealed for that id still opens while one moved to another row does not."""
    await migrated(pg_dsn)
    keyring = Keyring.parse(new_key_line())
    conn = await db.connect(pg_dsn, node=NODE, purpose="test")
    async with conn:
        for name in ("shop", "bot"):
            inserted = await accounts.insert_account(
                conn, keyring, sample_state(name), node=NODE, due_at=None
            )
            assert inserted is not None
        await conn.commit()
        rows, unreadable = await accounts.load_every_account(conn, keyring)
        assert not unreadable
        cur = await conn.execute("SELECT name, id FROM accounts")
        ids = dict(await cur.fetchall())
        shop, bot = rows["shop"], rows["bot"]
        assert not any(isinstance(held, uuid.UUID) for held in gc.get_referents(shop))
        assert shop.id == ids["shop"] and isinstance(shop.id, uuid.UUID)
        await conn.execute(
            "UPDATE accounts SET refresh_token = (SELECT refresh_token FROM accounts"
            " WHERE name = 'bot') WHERE name = 'shop'"
        )
        await conn.commit()
        rows, unreadable = await accounts.load_every_account(conn, keyring)
    assert rows["bot"].state == bot.state
    assert set(unreadable) == {"shop"}


def resident_kib() -> int:
    """Return this process's VmRSS in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(
    not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
    reason="malloc_trim is glibc's",
)
def test_heap_freed_below_objects_still_in_use_is_given_back() -> None:
    """What a read of every row leaves: 16 MiB of C heap freed below objects still in use,
    which glibc keeps mapped by itself (it only trims the top of the heap), is given back."""
    chunks = [bytes(4000) for _ in range(4096)]  # malloc'd, not pymalloc'd (> 512 bytes)
    kept_above = [bytes(4000) for _ in range(64)]
    del chunks
    before = resident_kib()
    fleet_store.give_back_free_heap()
    assert before - resident_kib() > 8 * 1024
    assert len(kept_above) == 64


async def test_rows_read_at_start_carry_the_configured_name_and_are_kept_as_read(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A node that knows its configured accounts names each row it reads with the
    configuration's string from the start: the state an account first serves is the row
    read at start, not a renamed copy of it (each copy freed a row and a state among the
    rows kept, 1.9 MiB of holes at 10,000 accounts); a row of an account this node does not
    configure keeps its own name."""
    await migrated(pg_dsn)
    names = ["shop", "bot"]
    config, _ = many_accounts(tmp_path, names)
    keyring = config.store.keyring
    assert keyring is not None
    conn = await db.connect(pg_dsn, node=NODE, purpose="test")
    async with conn:
        for name in [*names, "elsewhere"]:
            added = await accounts.insert_account(
                conn, keyring, sample_state(name), node=NODE, due_at=None
            )
            assert added is not None
        await conn.commit()
    fleet = FleetStore(
        dsn=pg_dsn,
        keyring=keyring,
        node="web-1",
        timeouts=node_store(config, pg_dsn, "web-1").timeouts,
        state_dir=config.state_dir,
        accounts=lambda: config.accounts,
    )
    await fleet.open()
    try:
        for name in names:
            account = config.accounts[name]
            row = fleet.rows[name]
            assert row.name is account.name
            state = PgAccountStore(account, fleet).load()
            assert state is row.state and fleet.rows[name] is row
        assert fleet.rows["elsewhere"].name == "elsewhere"
    finally:
        await fleet.close()


def test_a_node_opening_its_store_does_not_import_the_migration(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Opening the store (schema, the store's identity and moved check, the pool, every
    row) loads neither `store migrate`'s code nor the admin commands' beyond what the
    node needs: 0.2 MiB of every node's fixed cost."""
    config_path = write_store_config(tmp_path, pg_dsn)
    code = (
        "import asyncio, sys\n"
        "from fleetkit import node_store\n"
        "from pathlib import Path\n"
        "from kakao_tokend.config import load_config\n"
        f"config = load_config(Path({str(config_path)!r}))\n"
        "async def main():\n"
        f"    fleet = node_store(config, {pg_dsn!r}, 'web-1')\n"
        "    await fleet.open()\n"
        "    await fleet.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('kakao_tokend.fleet.')))\n"
    )
    tests = str(Path(__file__).parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1]
    assert "kakao_tokend.fleet.meta" in loaded
    assert "kakao_tokend.fleet.migrate" not in loaded


async def test_a_store_asks_its_manager_itself_for_the_plan(tmp_path: Path) -> None:
    """A node's store holds its account's manager as the planner, no object in between (40
    bytes of each account); a hold's end gets from it the manager's next moment and its
    failure bookkeeping, and a command's plain function still works as a planner."""
    config, fleet = many_accounts(tmp_path, ["shop"])
    account = config.accounts["shop"]
    store = PgAccountStore(account, fleet)
    session = create_session()
    try:
        manager = AccountManager(
            account,
            store=store,
            client=KakaoClient(session, account.app),
            policy=config.refresh,
        )
        store.planner = plan_for(manager)
        assert store.planner is manager
        assert plan_of(manager) == (None, RefreshStatus())
        now = datetime.now(UTC)
        manager.status.failed_transient(
            "Kakao answered 503", "http503", now=now, retry_at=now + timedelta(seconds=5)
        )
        due, status = plan_of(manager)
        assert due == manager.planned_refresh_at()
        assert (status.attempts, status.failing_since, status.last_error_class) == (
            1,
            now,
            "http503",
        )
        assert status.last_attempt_at is not None
    finally:
        await session.close()


def test_a_heartbeat_gives_the_heap_back_after_growth_and_not_while_the_size_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the start leaves freed after its read of every row is given back at a heartbeat
    once the node grew by TRIM_AFTER_GROWTH since the last time; an idle node whose size
    holds is not trimmed again at every beat (a trim walks the whole heap)."""
    size = [50_000]
    trims: list[int] = []
    monkeypatch.setattr(fleet_store, "_resident_kib", lambda: size[0])
    monkeypatch.setattr(fleet_store, "_trim", lambda pad: trims.append(pad) or 0)
    monkeypatch.setattr(fleet_store, "_trimmed_at", None)
    fleet_store.give_back_free_heap()  # the start's read of every row
    assert trims == [0]
    size[0] += fleet_store.TRIM_AFTER_GROWTH - 1
    assert not fleet_store.give_back_if_grown()
    size[0] += 1
    assert fleet_store.give_back_if_grown()
    assert trims == [0, 0]
    assert not fleet_store.give_back_if_grown()
    assert trims == [0, 0]


def let_go_of_made_states() -> None:
    """Forget the states packed.py keeps alive for a moment after making them (RECENT)."""
    packed._recent.clear()
    gc.collect()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"user_id": None, "refreshed_at": None, "relogin_reason": "log in again"},
        {"relogin_cause": "expired", "extras": {}},
        {"user_id": 2**70},  # beyond the packed format: kept as objects
    ],
    ids=["full", "sparse", "relogin", "huge-user-id"],
)
def test_a_packed_state_gives_back_an_equal_state_and_the_same_object_while_held(
    changes: dict[str, Any],
) -> None:
    """A state packed and made again is equal to the original in every field (a state
    without optional values, a re-login mark and a value the format cannot hold too); while
    anyone holds the object made, the packed state gives back that very object."""
    original = replace(sample_state("shop"), **changes)
    if not changes:  # the retired tokens' fingerprints too
        retired = tuple(
            replace(r, replaced=f"sha256:old{i}") for i, r in enumerate(original.rotations)
        )
        original = replace(original, rotations=retired)
    kept = PackedState.of(original)
    assert kept.state is original and kept.holds(original)
    copy = replace(original)  # an equal object, not the original
    del original
    let_go_of_made_states()
    made = kept.state
    assert made == copy and made.tokens == copy.tokens
    assert [r.replaced for r in made.rotations] == [r.replaced for r in copy.rotations]
    assert made.user_id == copy.user_id and made.relogin_cause == copy.relogin_cause
    assert kept.state is made and kept.generation == copy.generation
    assert kept.token_times() == (copy.tokens.access_lifetime, copy.tokens.refresh_expires_at)
    assert kept.renamed("shop").state == copy


def test_a_cached_row_holds_no_state_objects_until_asked_and_one_bytes_object_for_them() -> None:
    """A row keeps its state as one bytes object and a small holder: no AccountState,
    TokenSet, token string or datetime of the state is alive once nobody uses them (a
    node's 10,000 idle rows were about 1 KiB of such objects each)."""
    state = sample_state("shop", rotations=1)
    row = AccountRow(uid=uuid.uuid4().int, state=state, key_id="k1", due_at=None)
    expected = replace(state)
    del state
    let_go_of_made_states()
    held = gc.get_referents(row.packed)
    blobs = [o for o in held if isinstance(o, bytes)]
    assert len(blobs) == 1 and sys.getsizeof(blobs[0]) < 400
    assert not any(isinstance(o, AccountState) for o in held)
    assert not any(isinstance(o, AccountState) for o in gc.get_referents(row))
    assert row.state == expected and row.generation == expected.generation


async def test_an_idle_accounts_manager_keeps_the_rows_packed_state_not_a_copy(
    tmp_path: Path,
) -> None:
    """An account's manager that adopted its cached row's state holds the row's packed
    state, no AccountState of its own; what it serves is equal to the row's, the same object
    while held, and the account is planned from the packed times (the heartbeat's walk)."""
    config, fleet = many_accounts(tmp_path, ["shop"])
    account = config.accounts["shop"]
    fleet.keep_row(
        AccountRow(uid=uuid.uuid4().int, state=sample_state("shop"), key_id="k1", due_at=None)
    )
    store = PgAccountStore(account, fleet)
    session = create_session()
    try:
        manager = AccountManager(
            account, store=store, client=KakaoClient(session, account.app), policy=config.refresh
        )
        store.planner = plan_for(manager)
        manager.load()
        let_go_of_made_states()
        row = fleet.rows["shop"]
        assert not any(isinstance(o, AccountState) for o in gc.get_referents(manager))
        assert any(o is row.packed for o in gc.get_referents(manager))
        served = manager.state
        assert served is not None and served == row.state and manager.state is served
        tokens = served.tokens
        assert manager.token_times() == (tokens.access_lifetime, tokens.refresh_expires_at)
        changed = replace(served, user_id=7)
        manager.state = changed  # a change not in the store: held as it is
        assert manager.state is changed
        assert any(o is changed for o in gc.get_referents(manager))
    finally:
        await session.close()


async def test_a_committed_state_is_held_packed_by_its_manager_after_the_hold(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The refresher sets a new state before it is written (memory first); once the hold
    committed it, the manager holds the cached row's packed copy of it instead, and the
    object it still uses is the one it set."""
    await migrated(pg_dsn)
    config, _ = many_accounts(tmp_path, ["shop"])
    keyring = config.store.keyring
    assert keyring is not None
    conn = await db.connect(pg_dsn, node=NODE, purpose="test")
    async with conn:
        added = await accounts.insert_account(
            conn, keyring, sample_state("shop"), node=NODE, due_at=None
        )
        assert added is not None
        await conn.commit()
    fleet = node_store(config, pg_dsn, "web-1")
    await fleet.open()
    session = create_session()
    try:
        account = config.accounts["shop"]
        store = fleet.account_store(account)
        manager = AccountManager(
            account, store=store, client=KakaoClient(session, account.app), policy=config.refresh
        )
        store.planner = plan_for(manager)
        manager.load()
        current = manager.state
        assert current is not None
        newer = replace(current, generation=current.generation + 1)
        manager.state = newer
        assert any(o is newer for o in gc.get_referents(manager))
        async with store.hold(1.0):
            store.save(newer)
        row = fleet.rows["shop"]
        assert row.generation == newer.generation
        assert any(o is row.packed for o in gc.get_referents(manager))
        assert manager.state is newer
    finally:
        await session.close()
        await fleet.close()


def test_the_heartbeat_walks_the_accounts_only_after_a_state_or_the_accounts_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The beat is asked twice a heartbeat and depends on every account's tokens: it reads
    them again only after some state was set or an account came or went, and then follows
    the shortest lifetime at once."""
    config, fleet = many_accounts(tmp_path, ["shop", "bot"])
    walks: list[str] = []
    token_times = AccountManager.token_times

    def counting(self: AccountManager) -> Any:
        walks.append(self.name)
        return token_times(self)

    monkeypatch.setattr(AccountManager, "token_times", counting)
    scheduler = RefreshScheduler(heartbeat=60.0)
    managers = []
    for name in ("shop", "bot"):
        account = config.accounts[name]
        manager = AccountManager(
            account,
            store=PgAccountStore(account, fleet),
            client=cast(KakaoClient, None),
            policy=config.refresh,
        )
        manager.state = sample_state(name)
        scheduler.managers[name] = manager
        managers.append(manager)
    first = scheduler.interval()
    assert sorted(walks) == ["bot", "shop"]
    assert scheduler.interval() == first
    assert len(walks) == 2
    state = managers[0].state
    assert state is not None
    short = replace(
        state.tokens, access_expires_at=state.tokens.access_issued_at + timedelta(seconds=8)
    )
    managers[0].state = replace(state, tokens=short)
    assert scheduler.interval() < first
    assert len(walks) == 4
    scheduler.remove("shop")
    assert scheduler.interval() == first
    assert walks[4:] == ["bot"]
