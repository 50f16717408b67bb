"""Account rows in a real PostgreSQL: round trip, encryption at rest, CAS, claims, NOTIFY."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleetkit import NODE, migrated, sample_state
from kakao_tokend.errors import StoreError, StoreUnavailable, TokenDecryptError
from kakao_tokend.fleet import accounts, db
from kakao_tokend.fleet.accounts import AccountRow, RefreshStatus, RowLock
from kakao_tokend.fleet.crypto import Keyring, new_key_line
from kakao_tokend.state import Rotation
from kakao_tokend.tokens import fingerprint

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keyring() -> Keyring:
    """One fresh key."""
    return Keyring.parse(new_key_line())


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[str]:
    """A migrated, empty store; yields its DSN."""
    await migrated(pg_dsn)
    yield pg_dsn


async def node_conn(dsn: str, node: str = NODE) -> psycopg.AsyncConnection[Any]:
    """A store connection as a node opens it (not autocommit: row locks need transactions)."""
    return await db.connect(dsn, node=node, purpose="test")


async def add(dsn: str, keyring: Keyring, name: str, **kwargs: Any) -> AccountRow:
    """Insert one sample account, committed."""
    due_at = kwargs.pop("due_at", datetime.now(UTC) - timedelta(seconds=1))
    conn = await node_conn(dsn)
    async with conn:
        row = await accounts.insert_account(
            conn, keyring, sample_state(name, **kwargs), node=NODE, due_at=due_at
        )
    assert row is not None
    return row


async def test_an_account_comes_back_exactly_as_it_was_written(
    store: str, keyring: Keyring
) -> None:
    """Every field of the state survives the round trip: tokens, times, rotations, extras."""
    state = sample_state("shop", rotations=3)
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=4)
    status = RefreshStatus(
        attempts=2,
        failing_since=state.refreshed_at,
        last_attempt_at=state.refreshed_at,
        last_attempt_by="web-2",
        last_error="Kakao answered 503",
        last_error_class="http503",
        rotation_missed_at=state.refreshed_at,
    )
    conn = await node_conn(store)
    async with conn:
        inserted = await accounts.insert_account(
            conn, keyring, state, node="web-1", due_at=due, status=status
        )
        await conn.commit()
        loaded = await accounts.load_account(conn, keyring, "shop")
    assert inserted is not None and loaded is not None
    assert loaded.state == state
    assert loaded.id == inserted.id
    assert loaded.key_id == keyring.newest.key_id
    assert loaded.due_at == due
    assert loaded.refreshed_by == "web-1"
    assert loaded.status == status
    assert loaded.updated_at is not None


async def test_minimal_states_round_trip_too(store: str, keyring: Keyring) -> None:
    """Optional fields left empty (an imported token: no id_token, no extra, no rotations)."""
    base = sample_state("bare", rotations=0, refreshed_at=None, user_id=None, extras={})
    state = dataclasses.replace(
        base,
        tokens=dataclasses.replace(
            base.tokens,
            id_token=None,
            extra={},
            scope=None,
            refresh_issued_at=None,
            refresh_expiry_estimated=True,
        ),
    )
    conn = await node_conn(store)
    async with conn:
        inserted = await accounts.insert_account(conn, keyring, state, node=NODE, due_at=None)
        loaded = await accounts.load_account(conn, keyring, "bare")
    assert inserted is not None and inserted.refreshed_by is None
    assert loaded is not None and loaded.state == state and loaded.refreshed_by is None


async def test_the_relogin_cause_and_retired_tokens_survive_like_a_state_file(
    store: str, keyring: Keyring
) -> None:
    """What a state file holds beyond the tokens comes back too: the re-login cause and
    which refresh token each rotation retired (not part of Rotation's equality, so the
    state file's own serialisation is compared)."""
    base = sample_state("gone", rotations=3)
    history = tuple(
        dataclasses.replace(r, replaced=fingerprint(f"retired-{i}"))
        for i, r in enumerate(base.rotations)
    )
    state = dataclasses.replace(
        base,
        rotations=history,
        relogin_reason="Kakao refused the refresh token (KOE322)",
        relogin_cause="revoked",
    )
    conn = await node_conn(store)
    async with conn:
        row = await accounts.insert_account(conn, keyring, state, node=NODE, due_at=None)
        assert row is not None
        loaded = await accounts.load_account(conn, keyring, "gone")
        assert loaded is not None
        assert loaded.state.to_dict() == state.to_dict()
        newer = dataclasses.replace(state, generation=2, relogin_reason=None, relogin_cause=None)
        assert await accounts.save_account(conn, keyring, loaded, newer, node=NODE, due_at=None)
        again = await accounts.load_account(conn, keyring, "gone")
    assert again is not None and again.state.to_dict() == newer.to_dict()


async def test_no_token_is_stored_in_plain_text(store: str, keyring: Keyring) -> None:
    """A dump of the database shows ciphertext and fingerprints, never a token."""
    state = sample_state("shop")
    await add(store, keyring, "shop")
    secrets = [
        state.tokens.access_token,
        state.tokens.refresh_token,
        state.tokens.id_token,
        "future_field",
    ]
    async with await psycopg.AsyncConnection.connect(store) as conn:
        dump = ""
        for table in ("accounts", "rotations", "alerts", "nodes", "store_meta"):
            cur = await conn.execute(f"SELECT * FROM {table}")
            rows = await cur.fetchall()
            dump += repr(rows) + "".join(
                bytes(v).decode("latin-1") for r in rows for v in r if isinstance(v, bytes)
            )
    assert "shop" in dump  # the dump does hold the row
    for secret in secrets:
        assert secret is not None and secret not in dump


async def test_a_fingerprint_column_refuses_a_token(store: str, keyring: Keyring) -> None:
    """The rotation log's check constraint keeps a raw token out even if code slips."""
    state = sample_state("shop")
    bad = dataclasses.replace(
        state, rotations=(Rotation(datetime.now(UTC), state.tokens.refresh_token),)
    )
    conn = await node_conn(store)
    async with conn:
        with pytest.raises(StoreError, match="rotations_fingerprint_check"):
            await accounts.insert_account(conn, keyring, bad, node=NODE, due_at=None)


async def test_a_second_insert_of_the_same_name_is_refused(store: str, keyring: Keyring) -> None:
    """insert_account never overwrites: an existing name returns None, the row is unchanged."""
    first = await add(store, keyring, "shop")
    conn = await node_conn(store)
    async with conn:
        again = await accounts.insert_account(
            conn, keyring, sample_state("shop", generation=9), node=NODE, due_at=None
        )
        loaded = await accounts.load_account(conn, keyring, "shop")
    assert again is None
    assert loaded is not None and loaded.id == first.id and loaded.generation == 1


async def test_compare_and_swap_lets_exactly_one_of_two_writers_win(
    store: str, keyring: Keyring
) -> None:
    """Two nodes refresh from the same read: the first write wins, the second changes nothing."""
    row = await add(store, keyring, "shop")
    now = datetime.now(UTC)
    first = row.state.with_tokens(
        dataclasses.replace(row.state.tokens, access_token="AT-from-web-1"),
        refreshed_at=now,
        rotated=False,
    )
    second = row.state.with_tokens(
        dataclasses.replace(row.state.tokens, access_token="AT-from-web-2"),
        refreshed_at=now + timedelta(seconds=1),
        rotated=False,
    )
    conn = await node_conn(store)
    async with conn:
        assert await accounts.save_account(conn, keyring, row, first, node="web-1", due_at=now)
        await conn.commit()
        assert not await accounts.save_account(conn, keyring, row, second, node="web-2", due_at=now)
        await conn.commit()
        loaded = await accounts.load_account(conn, keyring, "shop")
    assert loaded is not None
    assert loaded.state.tokens.access_token == "AT-from-web-1"
    assert loaded.generation == row.generation + 1
    assert loaded.refreshed_by == "web-1"


async def test_a_losing_writer_waits_for_the_winners_commit_then_loses(
    store: str, keyring: Keyring
) -> None:
    """Under READ COMMITTED a concurrent CAS blocks until the winner commits, then sees 0 rows."""
    row = await add(store, keyring, "shop")
    now = datetime.now(UTC)
    winner_state = row.state.with_tokens(row.state.tokens, refreshed_at=now, rotated=False)
    winner = await node_conn(store, "web-1")
    loser = await node_conn(store, "web-2")
    async with winner, loser:
        assert await accounts.save_account(
            winner, keyring, row, winner_state, node="web-1", due_at=now
        )
        started = time.monotonic()
        losing = asyncio.create_task(
            accounts.save_account(loser, keyring, row, winner_state, node="web-2", due_at=now)
        )
        await asyncio.sleep(0.5)
        assert not losing.done()  # blocked on the winner's row lock
        await winner.commit()
        assert await losing is False
        assert time.monotonic() - started >= 0.5


async def test_a_rotation_is_logged_once_with_its_node(store: str, keyring: Keyring) -> None:
    """A rotating refresh adds one log row (fingerprint, node, generation); repeats add none."""
    row = await add(store, keyring, "shop", rotations=1)
    now = datetime.now(UTC)
    rotated = row.state.with_tokens(
        dataclasses.replace(row.state.tokens, refresh_token="RT-new-secret"),
        refreshed_at=now,
        rotated=True,
    )
    conn = await node_conn(store)
    async with conn:
        assert await accounts.save_account(conn, keyring, row, rotated, node="web-3", due_at=now)
        await conn.commit()
        loaded = await accounts.load_account(conn, keyring, "shop")
        assert loaded is not None
        plain = rotated.with_tokens(rotated.tokens, refreshed_at=now, rotated=False)
        assert await accounts.save_account(conn, keyring, loaded, plain, node="web-1", due_at=now)
        cur = await conn.execute(
            "SELECT fingerprint, node, generation FROM rotations ORDER BY rotated_at"
        )
        log = await cur.fetchall()
    assert loaded.state.rotations == rotated.rotations
    assert log[-1] == (fingerprint("RT-new-secret"), "web-3", rotated.generation)
    assert len(log) == 2


async def test_only_the_newest_rotations_are_loaded_but_all_are_kept(
    store: str, keyring: Keyring
) -> None:
    """A state holds the newest 50 rotations (as in file mode); the log keeps every one."""
    now = datetime.now(UTC)  # one moment for both samples: their rotation times must match
    await add(store, keyring, "shop", rotations=60, now=now)
    conn = await node_conn(store)
    async with conn:
        loaded = await accounts.load_account(conn, keyring, "shop")
        cur = await conn.execute("SELECT count(*) FROM rotations")
        assert await cur.fetchone() == (60,)
    assert loaded is not None
    assert loaded.state.rotations == sample_state("shop", now=now, rotations=60).rotations[-50:]


async def test_writing_an_older_generation_is_refused(store: str, keyring: Keyring) -> None:
    """A stale state can never be written back over a newer row."""
    row = await add(store, keyring, "shop", generation=5)
    conn = await node_conn(store)
    async with conn:
        with pytest.raises(ValueError, match="generation 4 is older than the row's 5"):
            await accounts.save_account(
                conn, keyring, row, sample_state("shop", generation=4), node=NODE, due_at=None
            )


async def test_status_updates_are_compare_and_swap_too(store: str, keyring: Keyring) -> None:
    """Failure bookkeeping for a token set another node already replaced is not written."""
    row = await add(store, keyring, "shop")
    later = datetime.now(UTC) + timedelta(minutes=5)
    failing = RefreshStatus(attempts=1, last_error="timeout", last_error_class="timeout")
    conn = await node_conn(store)
    async with conn:
        assert await accounts.save_status(conn, row, due_at=later, status=failing)
        await conn.commit()
        loaded = await accounts.load_account(conn, keyring, "shop")
        assert loaded is not None
        assert (loaded.status, loaded.due_at) == (failing, later)
        newer = loaded.state.with_tokens(loaded.state.tokens, refreshed_at=later, rotated=False)
        assert await accounts.save_account(conn, keyring, loaded, newer, node=NODE, due_at=later)
        await conn.commit()
        assert not await accounts.save_status(conn, loaded, due_at=None, status=failing)


async def test_claims_by_two_nodes_never_overlap_and_skip_what_is_not_due(
    store: str, keyring: Keyring
) -> None:
    """FOR UPDATE SKIP LOCKED: each due account goes to one node; future ones to none."""
    for i in range(6):
        await add(store, keyring, f"due{i}")
    await add(store, keyring, "later", due_at=datetime.now(UTC) + timedelta(hours=1))
    await add(store, keyring, "never", due_at=None)
    one = await node_conn(store, "web-1")
    two = await node_conn(store, "web-2")
    async with one, two:
        first = await accounts.claim_due(one, keyring, limit=4)
        second = await accounts.claim_due(two, keyring, limit=4)
        names_one = {r.name for r in first}
        names_two = {r.name for r in second}
        assert len(names_one) == 4 and len(names_two) == 2
        assert names_one.isdisjoint(names_two)
        assert names_one | names_two == {f"due{i}" for i in range(6)}
        # While held, nobody else can take them; a rollback frees them at once.
        assert await accounts.claim_due(two, keyring, limit=10) == second  # own locks: same rows
        await one.rollback()
        again = await accounts.claim_due(two, keyring, limit=10)
        assert {r.name for r in again} == {f"due{i}" for i in range(6)}


async def test_row_locks_need_a_transaction(store: str, keyring: Keyring) -> None:
    """In autocommit a FOR UPDATE would end with its statement: refused, not silently useless."""
    conn = await db.connect(store, node=NODE, purpose="test", autocommit=True)
    async with conn:
        with pytest.raises(RuntimeError, match="not in autocommit"):
            await accounts.claim_due(conn, keyring)
        with pytest.raises(RuntimeError, match="not in autocommit"):
            await accounts.load_account(conn, keyring, "shop", lock=RowLock.WAIT)


async def test_load_with_skip_and_nowait_respect_a_held_lock(store: str, keyring: Keyring) -> None:
    """A row another node holds: SKIP reads as absent, NOWAIT fails at once (not a hang)."""
    await add(store, keyring, "shop")
    holder = await node_conn(store, "web-1")
    other = await node_conn(store, "web-2")
    async with holder, other:
        assert await accounts.load_account(holder, keyring, "shop", lock=RowLock.WAIT)
        assert await accounts.load_account(other, keyring, "shop", lock=RowLock.SKIP) is None
        await other.rollback()
        with pytest.raises(StoreUnavailable, match="could not obtain lock"):
            await accounts.load_account(other, keyring, "shop", lock=RowLock.NOWAIT)
        await other.rollback()
        assert await accounts.load_account(other, keyring, "shop") is not None  # plain read


async def test_a_ciphertext_swapped_between_rows_is_refused(store: str, keyring: Keyring) -> None:
    """Copying one account's refresh token blob into another row does not decrypt there."""
    await add(store, keyring, "alice")
    await add(store, keyring, "bob")
    async with await psycopg.AsyncConnection.connect(store) as raw:
        await raw.execute(
            "UPDATE accounts SET refresh_token ="
            " (SELECT refresh_token FROM accounts WHERE name = 'alice') WHERE name = 'bob'"
        )
    conn = await node_conn(store)
    async with conn:
        assert await accounts.load_account(conn, keyring, "alice") is not None
        with pytest.raises(TokenDecryptError) as caught:
            await accounts.load_account(conn, keyring, "bob")
    assert str(caught.value).startswith(
        f"cannot decrypt the refresh_token of account 'bob' with key {keyring.newest.key_id}: "
        "wrong key or the ciphertext was moved between rows"
    )


async def test_a_ciphertext_restored_into_a_recreated_row_is_refused(
    store: str, keyring: Keyring
) -> None:
    """Same name, new row (logout, login): an old blob copied back does not decrypt."""
    old = await add(store, keyring, "shop")
    async with await psycopg.AsyncConnection.connect(store) as raw:
        cur = await raw.execute("SELECT access_token FROM accounts WHERE name = 'shop'")
        row = await cur.fetchone()
        assert row is not None
        old_blob = row[0]
    conn = await node_conn(store)
    async with conn:
        assert await accounts.delete_account(conn, "shop")
        await conn.commit()
    new = await add(store, keyring, "shop")
    assert new.id != old.id
    async with await psycopg.AsyncConnection.connect(store) as raw:
        await raw.execute("UPDATE accounts SET access_token = %s WHERE name = 'shop'", (old_blob,))
    conn = await node_conn(store)
    async with conn:
        with pytest.raises(TokenDecryptError, match="access_token of account 'shop'"):
            await accounts.load_account(conn, keyring, "shop")


async def test_a_flipped_bit_in_the_database_is_refused(store: str, keyring: Keyring) -> None:
    """Corruption (or tampering) of a stored blob is detected, not decrypted into garbage."""
    await add(store, keyring, "shop")
    async with await psycopg.AsyncConnection.connect(store) as raw:
        await raw.execute(
            "UPDATE accounts SET access_token = set_byte(access_token, 30,"
            " get_byte(access_token, 30) # 1) WHERE name = 'shop'"
        )
    conn = await node_conn(store)
    async with conn:
        with pytest.raises(TokenDecryptError, match="wrong key or the ciphertext was moved"):
            await accounts.load_account(conn, keyring, "shop")


async def test_delete_removes_the_row_and_its_rotation_log(store: str, keyring: Keyring) -> None:
    """Logout: the account and its rotations go; a second delete finds nothing."""
    await add(store, keyring, "shop")
    conn = await node_conn(store)
    async with conn:
        assert await accounts.delete_account(conn, "shop")
        assert not await accounts.delete_account(conn, "shop")
        assert await accounts.load_account(conn, keyring, "shop") is None
        cur = await conn.execute("SELECT count(*) FROM rotations")
        assert await cur.fetchone() == (0,)
        assert await accounts.list_account_names(conn) == []


async def test_a_change_is_announced_at_commit_and_never_after_a_rollback(store: str) -> None:
    """NOTIFY is delivered when the writer commits; a rolled-back change says nothing."""
    listener = await psycopg.AsyncConnection.connect(store, autocommit=True)
    writer = await node_conn(store)
    async with listener, writer:
        await listener.execute(f"LISTEN {accounts.CHANNEL}")
        await accounts.notify_changed(writer, "gone", 7)
        await writer.rollback()
        await accounts.notify_changed(writer, "shop", 8)
        early = [n async for n in listener.notifies(timeout=0.3)]
        await writer.commit()
        late = [n async for n in listener.notifies(timeout=2.0, stop_after=1)]
    assert early == []
    assert [(n.channel, n.payload) for n in late] == [(accounts.CHANNEL, "shop:8")]
    assert accounts.parse_notification(late[0].payload) == ("shop", 8)


@pytest.mark.parametrize("payload", ["", "shop", "shop:", ":3", "shop:x", "shop:-1"])
def test_foreign_notification_payloads_are_ignored(payload: str) -> None:
    """Anything else on the channel is not mistaken for an account change."""
    assert accounts.parse_notification(payload) is None


async def test_every_account_is_read_in_one_query_and_a_bad_row_does_not_hide_the_others(
    store: str, keyring: Keyring
) -> None:
    """A node's start reads all rows with one scan of the accounts table, not one query per
    account (3,000 accounts took longer than the start's deadline that way), and a row that
    does not decrypt is reported by name while every other row still arrives."""
    names = [f"acct{i:03d}" for i in range(60)]
    for name in names:
        await add(store, keyring, name)
    async with await psycopg.AsyncConnection.connect(store) as raw:
        await raw.execute(
            "UPDATE accounts SET refresh_token ="
            " (SELECT refresh_token FROM accounts WHERE name = 'acct000') WHERE name = 'acct007'"
        )
    conn = await node_conn(store)
    async with conn:
        rows, unreadable = await accounts.load_every_account(conn, keyring)
        cur = await conn.execute(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0)"
            " FROM pg_stat_xact_user_tables WHERE relname = 'accounts'"
        )
        found = await cur.fetchone()
        one_by_one = {name: await accounts.load_account(conn, keyring, name) for name in rows}
    assert found is not None and found[0] == 1, f"{found[0] if found else 0} scans of accounts"
    assert sorted(rows) == [name for name in names if name != "acct007"]
    for name, row in rows.items():  # the same rows as the one-account reader returns
        expected = one_by_one[name]
        assert expected is not None and (row.id, row.state) == (expected.id, expected.state)
    assert list(unreadable) == ["acct007"]
    assert "refresh_token of account 'acct007'" in str(unreadable["acct007"])


async def test_accounts_are_read_page_by_page_in_name_order_with_the_rotations_asked_for(
    store: str, keyring: Keyring
) -> None:
    """``after``/``limit`` read one page of rows in the names' code point order (the order
    in which Python finds where the next page starts, whatever the database's collation),
    and ``rotations`` caps each state's rotation log to its newest entries (a node caches
    only the newest one)."""
    names = ["a-b", "a0", "a_b", "acct0", "acct1"]  # code point order
    written = {name: (await add(store, keyring, name, rotations=3)).state for name in names}
    async with await psycopg.AsyncConnection.connect(store) as raw:
        # A database created with a locale: ICU's root collation sorts "a_b" before "a-b".
        await raw.execute('ALTER TABLE accounts ALTER COLUMN name TYPE text COLLATE "und-x-icu"')
    conn = await node_conn(store)
    async with conn:
        pages = []
        after = None
        while True:
            rows, unreadable = await accounts.load_every_account(
                conn, keyring, after=after, limit=2, rotations=1
            )
            assert not unreadable
            if not rows:
                break
            pages.append(list(rows))
            after = max(rows)
            for name, row in rows.items():
                assert row.state.rotations == written[name].rotations[-1:]
                assert row.state.tokens == written[name].tokens
        whole, _ = await accounts.load_every_account(conn, keyring)
    assert pages == [["a-b", "a0"], ["a_b", "acct0"], ["acct1"]]
    assert all(whole[name].state.rotations == written[name].rotations for name in names)


async def test_a_node_reads_its_rows_in_pages_and_caches_the_newest_rotation_of_each(
    store: str, keyring: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FleetStore.load_all reads every row, a page at a time (all at once held every row
    twice and the process kept the freed half), each with its newest rotation only."""
    from kakao_tokend.fleet import store as fleet_store

    monkeypatch.setattr(fleet_store, "LOAD_PAGE", 2)
    names = [f"acct{i}" for i in range(5)]
    written = {name: (await add(store, keyring, name, rotations=3)).state for name in names}
    fleet = fleet_store.FleetStore(
        dsn=store, keyring=keyring, node=NODE, timeouts=db.DbTimeouts(), state_dir=tmp_path
    )
    await fleet.open()
    try:
        assert sorted(fleet.rows) == names
        for name in names:
            assert fleet.rows[name].state.rotations == written[name].rotations[-1:]
        assert fleet.stats.row_reads == 0  # the start's read is not a re-read
    finally:
        await fleet.close()
