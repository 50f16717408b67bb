"""Whose turn it is (fleet/turns.py): an even, stable, coordination-free first claimant."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from kakao_tokend.fleet.turns import (
    CLAIM_DEFER_SHARE,
    LIVE_HEARTBEATS,
    claim_delay,
    first_claimant,
    live_nodes,
)

ACCOUNTS = [f"acct{i:05d}" for i in range(10_000)]
NODES = ["web-1", "web-2", "web-3"]


def test_three_nodes_are_each_first_for_a_third_of_ten_thousand_accounts() -> None:
    """The shares the spread benchmark's goal asks for (a third ± 15 %), and much tighter."""
    shares = Counter(first_claimant(account, NODES) for account in ACCOUNTS)
    assert set(shares) == set(NODES)
    for node in NODES:
        assert abs(shares[node] / len(ACCOUNTS) - 1 / 3) < 0.02, shares


def test_a_node_that_leaves_hands_on_only_its_own_accounts() -> None:
    """Rendezvous hashing: removing web-2 moves web-2's accounts and no others."""
    before = {account: first_claimant(account, NODES) for account in ACCOUNTS}
    after = {account: first_claimant(account, ["web-1", "web-3"]) for account in ACCOUNTS}
    moved = {account for account in ACCOUNTS if before[account] != after[account]}
    assert moved == {account for account in ACCOUNTS if before[account] == "web-2"}


@given(
    account=st.text(min_size=1, max_size=20),
    nodes=st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=6, unique=True),
)
def test_every_node_names_the_same_first_claimant_whatever_the_order(
    account: str, nodes: list[str]
) -> None:
    """No coordination: the answer depends on the set of nodes only, never on the order."""
    assert first_claimant(account, nodes) == first_claimant(account, list(reversed(nodes)))
    assert first_claimant(account, nodes) in nodes


@given(
    lifetime=st.floats(min_value=0.5, max_value=30 * 86400),
    heartbeat=st.floats(min_value=0.1, max_value=60),
)
def test_only_the_first_claimant_claims_at_once_and_the_others_wait_a_share_of_the_life(
    lifetime: float, heartbeat: float
) -> None:
    """The others wait min(heartbeat, 2 % of the lifetime): never near the token's expiry."""
    account = "shop"
    first = first_claimant(account, NODES)
    for node in NODES:
        delay = claim_delay(account, me=node, nodes=NODES, lifetime=lifetime, heartbeat=heartbeat)
        if node == first:
            assert delay == 0.0
        else:
            assert delay == min(heartbeat, lifetime * CLAIM_DEFER_SHARE)
            assert delay <= lifetime * 0.2  # due_at leaves 25 % ± 5 % of the life


def test_a_node_silent_for_more_than_three_heartbeats_is_no_longer_live() -> None:
    """Judged against the newest row (the nodes' clocks need not agree); ``me`` always counts."""
    newest = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
    heartbeat = 2.0
    nodes = {
        "web-1": newest,
        "web-2": newest - timedelta(seconds=LIVE_HEARTBEATS * heartbeat - 0.5),
        "web-3": newest - timedelta(seconds=LIVE_HEARTBEATS * heartbeat + 0.5),
    }
    assert live_nodes(nodes, me="web-1", heartbeat=heartbeat) == ["web-1", "web-2"]
    assert live_nodes(nodes, me="web-3", heartbeat=heartbeat) == ["web-1", "web-2", "web-3"]
    assert live_nodes({}, me="web-9", heartbeat=heartbeat) == ["web-9"]


def test_a_retry_is_claimed_by_every_node_at_once() -> None:
    """After a failed attempt nobody waits: the first claimant may be the node whose Kakao
    calls fail (its egress is down), and the others must be able to take the account."""
    for node in NODES:
        delay = claim_delay(
            "shop", me=node, nodes=NODES, lifetime=21600, heartbeat=60, retrying=True
        )
        assert delay == 0.0
