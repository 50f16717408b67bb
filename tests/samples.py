"""A fixed token set and account state, for tests that need one without Kakao."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kakao_tokend.state import AccountState
from kakao_tokend.tokens import TokenSet

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ACCESS = "access-token-value-0123456789abcdef0123456789abcdef"
REFRESH = "refresh-token-value-0123456789abcdef0123456789abcdef"


def make_state(account: str = "default", *, generation: int = 3) -> AccountState:
    """An account state with a 6-hour access and a 60-day refresh token issued at NOW."""
    tokens = TokenSet(
        access_token=ACCESS,
        refresh_token=REFRESH,
        access_expires_at=NOW + timedelta(hours=6),
        refresh_expires_at=NOW + timedelta(days=60),
        access_issued_at=NOW,
        refresh_issued_at=NOW - timedelta(days=1),
        scope="profile_nickname talk_message",
    )
    return AccountState(
        account=account, tokens=tokens, generation=generation, refreshed_at=NOW, user_id=42
    )
