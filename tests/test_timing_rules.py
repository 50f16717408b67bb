"""The timing rules agree with each other at every token lifetime, from 3 seconds to 6 hours.

One refresh cycle is played out on paper with the daemon's own pieces — the refresh plan
(tokens.refresh_due_at), the Kakao client's request limits, the refresher's back-off, the
status transitions and health's grading — for any lifetime and any refresh policy the config
accepts. What must hold at every scale, as it does for Kakao's 6-hour tokens:

* one failed attempt of any kind, at the latest planned refresh, never pages
  ``access_expiring`` before the retry after it had its chance;
* failures that go on page it with the same share of the lifetime left, before the expiry.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kakao_tokend.config import AccountConfig, Config, RefreshPolicy, config_from_toml_text
from kakao_tokend.errors import ConfigError, KakaoUnavailable
from kakao_tokend.health import assess
from kakao_tokend.kakao import KakaoClient
from kakao_tokend.refresher import AccountManager
from kakao_tokend.state import AccountState
from kakao_tokend.status import AccountStatus
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet, refresh_due_at, request_timeout_share

ISSUED = datetime(2026, 12, 3, 3, 0, 0, tzinfo=UTC)
SIX_HOURS = 21600.0
#: How a refresh attempt can fail: a request that hangs to the timeout, a connect timeout, a
#: refused connection, a 5xx, a 429 without Retry-After, the account's lock held elsewhere.
KINDS = ("hang", "connect_timeout", "refused", "http5xx", "http429", "lock_busy")


class _Latest(random.Random):
    """A jitter that always lands at the end of its window: the latest planned refresh."""

    def uniform(self, a: float, b: float) -> float:
        return max(a, b)


@dataclass(frozen=True)
class Setup:
    """One account on ``lifetime``-second access tokens under a policy the config accepted."""

    lifetime: float
    config: Config
    #: `[kakao] timeout` set by hand (None: left at its default).
    timeout: str | None = None

    @property
    def account(self) -> AccountConfig:
        return self.config.accounts["default"]

    @property
    def policy(self) -> RefreshPolicy:
        return self.config.refresh

    def tokens(self) -> TokenSet:
        # The refresh token far away: its own rules (within_refresh_life) are not at stake.
        return TokenSet(
            access_token="a" * 40,
            refresh_token="r" * 40,
            access_expires_at=ISSUED + timedelta(seconds=self.lifetime),
            refresh_expires_at=ISSUED + timedelta(days=50),
            access_issued_at=ISSUED,
            refresh_issued_at=ISSUED - timedelta(days=10),
        )


def make_setup(lifetime: float, refresh: dict[str, str], kakao: dict[str, str]) -> Setup:
    """Build the account through the config's own checks (a policy it refuses is no case)."""
    lines = ['[paths]\nstate_dir = "/nonexistent/state"\nruntime_dir = "/nonexistent/run"']
    lines.append('[kakao]\nrest_api_key = "k"')
    lines += [f'{key} = "{value}"' for key, value in kakao.items()]
    lines.append("[refresh]")
    lines += [f'{key} = "{value}"' for key, value in refresh.items()]
    lines.append("[alerts]\nkakaotalk = false\n[accounts.default]")
    config = config_from_toml_text("\n".join(lines) + "\n", source=None, environ={})
    return Setup(lifetime, config, kakao.get("timeout"))


class Attempts:
    """The refresher's side of a refresh cycle on paper: its client's request limits, its
    back-off (AccountManager._retry_delay: the one rule, as the daemon calls it) and the
    status transitions it makes; health grades what results."""

    def __init__(self, setup: Setup, seed: int) -> None:
        self.setup = setup
        self.state = AccountState("default", setup.tokens())
        self.now = ISSUED
        self.client = KakaoClient(
            None,  # type: ignore[arg-type]  # only its limits are asked for, no request
            setup.account.app,
            clock=lambda: self.now,
            policy=setup.policy,
        )
        self.manager = AccountManager(
            setup.account,
            store=AccountStore(setup.account),
            client=self.client,
            policy=setup.policy,
            clock=lambda: self.now,
            rng=random.Random(seed),
        )
        self.manager.state = self.state
        self.status = AccountStatus()
        self.status.adopted(self.state)

    def latest_planned(self) -> datetime:
        """The latest moment the refresh can be planned at (the end of the jitter window)."""
        policy = self.setup.policy
        return refresh_due_at(
            self.state.tokens, share=policy.refresh_at, jitter=policy.jitter, rng=_Latest()
        )

    def limits(self, at: datetime) -> tuple[float, float]:
        """The (total, connect) limits of a request sent at ``at``."""
        self.now = at
        tokens = self.state.tokens
        timeout = self.client._timeout(
            tokens.access_lifetime, tokens.refresh_expires_at, self.status.unanswered
        )
        assert timeout.total is not None and timeout.connect is not None
        return timeout.total, timeout.connect

    def ends(self, kind: str, start: datetime) -> datetime:
        """When an attempt sent at ``start`` that fails as ``kind`` ends."""
        total, connect = self.limits(start)
        if kind == "lock_busy":
            return start + timedelta(seconds=self.manager._lock_wait())
        return start + timedelta(seconds={"hang": total, "connect_timeout": connect}.get(kind, 0))

    def fail(self, kind: str, start: datetime, attempt: int) -> tuple[datetime, datetime]:
        """An attempt sent at ``start`` fails as ``kind``: return when, and the retry's moment."""
        end = self.ends(kind, start)
        self.now = end
        error = (
            None  # no Kakao error: the refresher's own lock (_record_transient)
            if kind == "lock_busy"
            else KakaoUnavailable(
                kind,
                endpoint="/oauth/token",
                status=429 if kind == "http429" else None,
                rate_limited=kind == "http429",
            )
        )
        delay = self.manager._retry_delay(attempt, error)
        retry_at = end + timedelta(seconds=delay)
        self.status.attempted()
        if kind == "hang":  # no answer in time: the next request waits longer
            self.status.went_unanswered()
        elif kind in ("http5xx", "http429"):  # an answer
            self.status.answered()
        self.status.failed_transient(kind, kind, now=end, retry_at=retry_at)
        return end, retry_at

    def first_page(
        self, start: datetime, until: datetime, condition: str = "access_expiring"
    ) -> datetime | None:
        """Grade as the alerts do — now, then at each moment the grading names — from
        ``start`` to before ``until``: return when ``condition`` is first found."""
        moment: datetime | None = start
        while moment is not None and moment < until:
            health = assess(self.setup.account, self.state, self.status, self.setup.policy, moment)
            if condition in health.names():
                return moment
            moment = health.changes_at
        return None


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    """A lifetime from 3 s to 6 h (log-uniform), the default policy or one a user may set."""
    lifetime = math.exp(draw(st.floats(math.log(3.0), math.log(SIX_HOURS))))
    refresh: dict[str, str] = {}
    if draw(st.booleans()):
        # Any share, and more often the edges, where the time before the page is shortest.
        refresh_at = draw(st.integers(5, 95) | st.sampled_from([5, 90, 94, 95]))
        top = min(refresh_at - 1, 99 - refresh_at)
        refresh["refresh_at"] = f"{refresh_at}%"
        refresh["jitter"] = f"{draw(st.integers(0, top) | st.just(top))}%"
    if draw(st.booleans()):
        refresh["retry_initial"] = draw(st.sampled_from(["1s", "10s", "1m"]))
        refresh["retry_max"] = draw(st.sampled_from(["30s", "5m", "1h"]))
    try:
        return make_setup(lifetime, refresh, {})
    except ConfigError:
        assume(False)
        raise


def _share(seconds: float, setup: Setup) -> float:
    return seconds / setup.lifetime


@settings(max_examples=300, deadline=None)
@given(setup=setups(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_one_failed_attempt_at_the_latest_refresh_never_pages_before_its_retry_had_its_chance(
    setup: Setup, kind: str, seed: int
) -> None:
    """The refresh planned at the end of the jitter window fails once (a request that hangs
    to the timeout, a connect timeout, a refused connection, a 5xx, a 429 without
    Retry-After): no `access_expiring` until the retry has been sent and could have run out
    its own timeout — before the expiry, as a 6-hour token gets many retries before that page.
    With the default 1/8 timeout a hung request of a 6-second token ended at 92.5 % of its
    life, inside the page's last 10 %: one hang paged a critical alert."""
    attempts = Attempts(setup, seed)
    start = attempts.latest_planned()
    end, retry_at = attempts.fail(kind, start, 1)
    total, _ = attempts.limits(retry_at)
    chance = retry_at + timedelta(seconds=total)
    expires = attempts.state.tokens.access_expires_at
    assert chance < expires, (_share((chance - ISSUED).total_seconds(), setup), total)
    paged = attempts.first_page(end, chance)
    assert paged is None, (
        f"paged at {_share((paged - ISSUED).total_seconds(), setup):.4f} of the life; the "
        f"retry at {_share((retry_at - ISSUED).total_seconds(), setup):.4f} could run until "
        f"{_share((chance - ISSUED).total_seconds(), setup):.4f}"
    )
    # Nor a warning: the pause before the retry (a 429's is the longest: 1/12 of a life
    # under an hour) is shorter than `failing_after` (10 %) at every lifetime.
    assert attempts.first_page(end, retry_at + timedelta(microseconds=1), "refresh_failing") is None


@settings(max_examples=300, deadline=None)
@given(setup=setups(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_failures_that_go_on_page_with_the_same_share_of_the_life_left_at_every_scale(
    setup: Setup, kind: str, seed: int
) -> None:
    """Every attempt from the latest planned refresh on fails the same way: `access_expiring`
    pages before the expiry, with half of the time between that refresh and the expiry left
    — the share a 6-hour token gets, whatever the lifetime and the kind of failure.

    Requests that hang are the one exception, below 10.5 minutes of life: after the first
    timeout the retry may wait longer (tokens.request_timeout: twice the fitted wait, at
    most 1/8 of the life), and the page waits for it (health._held_for_retry). It then comes
    when that second request ran out, at most one fitted wait later (4.75 % of the life
    with the default policy), still before the expiry; from 10.5 minutes up the configured
    30 s does not grow and nothing changes."""
    attempts = Attempts(setup, seed)
    start = attempts.latest_planned()
    expires = attempts.state.tokens.access_expires_at
    lead = (expires - start) / 2
    paged: datetime | None = None
    ends: list[datetime] = []
    for attempt in range(1, 1000):
        end, retry_at = attempts.fail(kind, start, attempt)
        ends.append(end)
        # Until the retry fails in turn (its request may be in flight at the page's moment).
        paged = attempts.first_page(end, min(attempts.ends(kind, retry_at), expires))
        if paged is not None or end >= expires:
            break
        start = retry_at
    assert paged is not None and paged < expires
    due = expires - lead
    if kind == "hang" and len(ends) > 1 and due < ends[1] < expires:
        # The page waited for the grown second request and comes as it runs out.
        policy = setup.policy
        grown_by = request_timeout_share(policy.refresh_at, policy.jitter) * setup.lifetime
        assert ends[1] - due <= timedelta(seconds=grown_by + 1e-4)
        due = ends[1]
    # The page comes at its moment (to a few microseconds: the grading's moments are ticks).
    late = due - paged
    assert abs(late.total_seconds()) < 1e-4, (
        f"paged with {_share((expires - paged).total_seconds(), setup):.4f} of the life left,"
        f" not {_share((expires - due).total_seconds(), setup):.4f}"
    )


@pytest.mark.parametrize(
    ("lifetime", "timeout", "pages_at_once"),
    [
        (6.0, "2s", True),  # the hang outlasts the token: it has expired
        (12.0, "2s", True),  # 1/6 of the life: the retry cannot end before the expiry
        (60.0, "2s", False),  # 1/30 of the life: the retry ends in time, the page waits
        (SIX_HOURS, "30s", False),  # Kakao's scale, the default's value set by hand
    ],
)
def test_a_hand_set_timeout_holds_the_page_only_while_its_retry_can_end_before_the_expiry(
    lifetime: float, timeout: str, pages_at_once: bool
) -> None:
    """`[kakao] timeout` set by hand is used as written: after one hung request the page waits
    for the retry only while that retry, hanging as long, would still end before the access
    token expires; otherwise it pages at once (the access token will run out)."""
    setup = make_setup(lifetime, {}, {"timeout": timeout})
    attempts = Attempts(setup, 7)
    start = attempts.latest_planned()
    end, retry_at = attempts.fail("hang", start, 1)
    expires = attempts.state.tokens.access_expires_at
    if end >= expires:
        assert pages_at_once  # the hang outlasted the token: EXPIRED, and it pages
        assert attempts.first_page(end, end + timedelta(seconds=1)) == end
        return
    total, _ = attempts.limits(retry_at)
    paged = attempts.first_page(end, expires)
    if pages_at_once:
        assert paged == end
    else:
        assert paged is None or paged >= retry_at + timedelta(seconds=total)
