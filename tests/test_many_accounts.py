"""Many accounts: the start-up log and systemd's STATUS= name only the accounts that need
attention, so a thousand healthy accounts neither bury a broken one nor slow the start."""

from __future__ import annotations

import re
from pathlib import Path

from daemonproc import NotifyReceiver, start_daemon, write_config
from kakao_tokend.config import load_config
from kakao_tokend.daemon import LIST_ACCOUNTS_UP_TO
from kakao_tokend.emulator import KakaoEmulator
from kakao_tokend.state import AccountState
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet, utcnow


def seed(emulator: KakaoEmulator, config_path: Path, names: list[str]) -> None:
    """Give ``names`` fresh tokens straight from the emulator (no login round trip)."""
    config = load_config(config_path)
    for index, name in enumerate(names):
        tokens = TokenSet.from_token_response(
            emulator.issue_tokens(9000 + index), requested_at=utcnow()
        )
        state = AccountState(
            account=name, tokens=tokens, refreshed_at=tokens.access_issued_at, user_id=9000 + index
        )
        store = AccountStore(config.accounts[name])
        store.save(state)
        store.publish(state)


async def test_with_many_accounts_only_those_needing_attention_are_named(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """With more than LIST_ACCOUNTS_UP_TO accounts, the start-up log has one line for the
    account without tokens and one count of the healthy ones, and READY's STATUS= says how
    many are ok and names the one that is not."""
    names = [f"acct{i:02d}" for i in range(LIST_ACCOUNTS_UP_TO + 2)]
    config = write_config(tmp_path, emulator, accounts=names, heartbeat="60s")
    seed(emulator, config, names[:-1])
    with NotifyReceiver() as notify:
        daemon = await start_daemon(config, env=notify.env)
        try:
            ready = await notify.wait_for_line("READY=1", daemon, timeout=10)
        finally:
            assert await daemon.stop() == 0
    status = next(line for line in ready if line.startswith("STATUS="))
    ok = len(names) - 1
    assert status == f"STATUS={len(names)} accounts, {ok} ok; {names[-1]}: no tokens (login needed)"
    log = daemon.log_text()
    assert f"account {names[-1]}: no tokens" in log
    assert f"{ok} more account(s) ok" in log
    # A summary line reads "account NAME: access 5h59m, refresh 59d".
    assert not re.search(r"account acct\d\d: access \d", log), log


async def test_with_many_accounts_all_needing_attention_the_count_says_how_many_more(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Twelve accounts and none logged in: STATUS= still starts with the count and ends
    with how many more need attention beyond the ten it names (it listed ten and dropped
    the other two without a word)."""
    names = [f"acct{i:02d}" for i in range(LIST_ACCOUNTS_UP_TO + 2)]
    config = write_config(tmp_path, emulator, accounts=names, heartbeat="60s")
    with NotifyReceiver() as notify:
        daemon = await start_daemon(config, env=notify.env)
        try:
            ready = await notify.wait_for_line("READY=1", daemon, timeout=10)
        finally:
            assert await daemon.stop() == 0
    status = next(line for line in ready if line.startswith("STATUS="))
    assert status.startswith(f"STATUS={len(names)} accounts, 0 ok; acct00: no tokens")
    assert status.endswith("; 2 more need attention")


async def test_with_a_few_accounts_each_is_named(emulator: KakaoEmulator, tmp_path: Path) -> None:
    """Up to LIST_ACCOUNTS_UP_TO accounts, every account has its start-up line, healthy or not."""
    names = ["home", "work", "shop"]
    config = write_config(tmp_path, emulator, accounts=names, heartbeat="60s")
    seed(emulator, config, names[:2])
    daemon = await start_daemon(config)
    try:
        log = daemon.log_text()
    finally:
        assert await daemon.stop() == 0
    assert "account home: access" in log and "account work: access" in log
    assert "account shop: no tokens" in log
    assert "more account(s) ok" not in log


async def test_right_after_ready_every_account_is_served_and_checked(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """A file-mode daemon plans its accounts and attaches their alerts right after READY (in
    the same step of its event loop): a token asked for at READY is the one the state file
    holds, and every account with tokens still gets its start-up check."""
    names = [f"acct{i:02d}" for i in range(LIST_ACCOUNTS_UP_TO + 2)]
    config = write_config(tmp_path, emulator, accounts=names, heartbeat="60s")
    seed(emulator, config, names[:-1])
    with NotifyReceiver() as notify:
        daemon = await start_daemon(config, env=notify.env, wait_ready=False)
        try:
            await notify.wait_for_line("READY=1", daemon, timeout=10)
            status, body = await daemon.api("GET", f"/v1/accounts/{names[3]}/token")
            assert status == 200
            assert body["access_token"] == daemon.state(names[3])["tokens"]["access_token"]
            await daemon.wait_log("access token verified", count=len(names) - 1)
            verified = daemon.log_text()
            for name in names[:-1]:
                assert f"account {name}: access token verified" in verified
        finally:
            assert await daemon.stop() == 0
