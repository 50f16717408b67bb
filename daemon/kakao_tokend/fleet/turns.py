"""Whose turn it is: each account's first claimant among the live nodes; the others wait.

Every node plans every account at the moment the row's ``due_at`` says, so without a rule
the node whose timer fires first claims it (``SKIP LOCKED``), and under uneven CPU load the
least loaded node took almost half of all refreshes (bench/fleet_bench.py: 46 % / 23 %).
Rendezvous (highest-random-weight) hashing names one *first claimant* per account among the
nodes seen lately: it claims at ``due_at``, every other node a small share of the lifetime
later. The shares come out even (each node is first for about a third of the accounts with
three nodes), the rule needs no coordination (every node computes the same answer from the
``nodes`` table), and when a node dies or is added only its own accounts change hands.

A node the others still count as live although it died only delays its accounts by that
share (never past a heartbeat); a retry after a failed attempt is raced by every node, so a
node that cannot reach Kakao keeps nothing to itself; two nodes that disagree about who is
live both claim, and ``SKIP LOCKED`` lets one win, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime

__all__ = ["CLAIM_DEFER_SHARE", "LIVE_HEARTBEATS", "claim_delay", "first_claimant", "live_nodes"]

#: A node that is not an account's first claimant claims it this share of the access token's
#: lifetime after ``due_at`` (at most a heartbeat): 2 % of 6 h is 7 min, capped at the
#: heartbeat (60 s by default); of a 15 s test token, 0.3 s. The token has 25 % ± 5 % of its
#: life left at ``due_at``, so the wait never comes near its expiry.
CLAIM_DEFER_SHARE = 0.02
#: A node whose ``nodes`` row is older than this many heartbeats (against the newest row, so
#: the nodes' clocks need not agree) no longer counts as live.
LIVE_HEARTBEATS = 3.0


def live_nodes(nodes: Mapping[str, datetime], *, me: str, heartbeat: float) -> list[str]:
    """Return the nodes seen within LIVE_HEARTBEATS heartbeats of the newest, and ``me``."""
    live = {me}
    if nodes:
        newest = max(nodes.values())
        window = LIVE_HEARTBEATS * heartbeat
        live.update(n for n, seen in nodes.items() if (newest - seen).total_seconds() <= window)
    return sorted(live)


def first_claimant(account: str, nodes: Iterable[str]) -> str:
    """Return the node with the highest weight for ``account`` (the same on every node)."""
    return max(nodes, key=lambda node: (_weight(node, account), node))


def claim_delay(
    account: str,
    *,
    me: str,
    nodes: Iterable[str],
    lifetime: float,
    heartbeat: float,
    retrying: bool = False,
) -> float:
    """Return how many seconds after ``due_at`` node ``me`` claims ``account``.

    A retry (the row records a failed attempt) is claimed by every node at once: the first
    claimant may be the node that cannot reach Kakao, and it must not keep the account to
    itself while the others could refresh it.
    """
    if retrying or first_claimant(account, nodes) == me:
        return 0.0
    return max(0.0, min(heartbeat, lifetime * CLAIM_DEFER_SHARE))


def _weight(node: str, account: str) -> int:
    digest = hashlib.blake2b(f"{node}\0{account}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
