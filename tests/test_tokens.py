"""Tests for kakao_tokend.tokens: Kakao response parsing/merging, time helpers, timing rules."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kakao_tokend.tokens import (
    FIRST_STEP_SHARE,
    KAKAO_REFRESH_LIFETIME,
    REQUEST_TIMEOUT_SHARE,
    PartialTokenResponse,
    TokenResponseError,
    TokenSet,
    answer_patience,
    backoff_delay,
    daemon_answer_wait,
    expiring_margin,
    fingerprint,
    format_duration,
    format_time,
    heartbeat_interval,
    in_rotation_window,
    issued_in_the_future,
    parse_time,
    refresh_deadline,
    refresh_due_at,
    request_timeout,
    request_timeout_share,
    rotation_certain,
)

T0 = datetime(2026, 11, 26, 3, 0, 0, tzinfo=UTC)
# Distinctive strings: if one of these shows up in a message or repr, a secret leaked.
AT = "AT-distinctive-access-Zq9xK2mWv8LrT4nB7cYd1eHf3gJk5pQs"
RT = "RT-distinctive-refresh-Pw6uV0aXs2dFg4hJk8lZx1cVb3nMq5wE"
AT2 = "AT-distinctive-second-access-Nn4Bb7Vv1Cc8Xx2Zz5Ll9Kk3Jj6"
RT2 = "RT-distinctive-rotated-refresh-Hh2Gg5Ff8Dd1Ss4Aa7Qq0Ww3Ee"
ID_TOKEN = "eyJ-distinctive-id-token.payload.signature"
SECRETS = (AT, RT, AT2, RT2, ID_TOKEN)

SIX_HOURS = 21599
SIXTY_DAYS = 5183999


def code_response(**changes: Any) -> dict[str, Any]:
    """Return a real-shaped Kakao authorization_code grant response, with ``changes`` applied."""
    body: dict[str, Any] = {
        "token_type": "bearer",
        "access_token": AT,
        "expires_in": SIX_HOURS,
        "refresh_token": RT,
        "refresh_token_expires_in": SIXTY_DAYS,
        "scope": "talk_message openid",
        "id_token": ID_TOKEN,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP: Any = object()


def initial_tokens() -> TokenSet:
    """Return the token set produced by a real-shaped login response at ``T0``."""
    return TokenSet.from_token_response(code_response(), requested_at=T0)


def assert_no_secret(text: str) -> None:
    """Fail if ``text`` contains any of the test's token strings."""
    for secret in SECRETS:
        assert secret not in text, f"a token value leaked into: {text!r}"


class TestFromTokenResponse:
    def test_real_kakao_response_gives_absolute_expiries_from_request_time(self) -> None:
        """A 21599/5183999 response yields expiries counted from requested_at, not arrival."""
        tokens = initial_tokens()
        assert tokens.access_token == AT
        assert tokens.refresh_token == RT
        assert tokens.access_issued_at == T0
        assert tokens.refresh_issued_at == T0
        assert tokens.access_expires_at == T0 + timedelta(seconds=SIX_HOURS)
        assert tokens.refresh_expires_at == T0 + timedelta(seconds=SIXTY_DAYS)
        assert tokens.access_lifetime == timedelta(seconds=SIX_HOURS)
        assert tokens.token_type == "bearer"
        assert tokens.scope == "talk_message openid"
        assert tokens.id_token == ID_TOKEN
        assert tokens.refresh_expiry_estimated is False
        assert tokens.extra == {}

    def test_remaining_helpers_count_from_now(self) -> None:
        """access_remaining/refresh_remaining are expiry minus now, negative once expired."""
        tokens = initial_tokens()
        later = T0 + timedelta(hours=7)
        assert tokens.access_remaining(T0) == timedelta(seconds=SIX_HOURS)
        assert tokens.access_remaining(later) < timedelta(0)
        assert tokens.refresh_remaining(later) == timedelta(seconds=SIXTY_DAYS - 7 * 3600)

    def test_unknown_fields_are_kept_in_extra(self) -> None:
        """Fields we do not interpret survive verbatim in ``extra``; known ones do not."""
        tokens = TokenSet.from_token_response(
            code_response(new_field={"a": [1, 2]}, other="x"), requested_at=T0
        )
        assert tokens.extra == {"new_field": {"a": [1, 2]}, "other": "x"}

    def test_optional_fields_default_when_absent(self) -> None:
        """Without token_type/scope/id_token the set says bearer and None, not a crash."""
        body = code_response(token_type=_DROP, scope=_DROP, id_token=_DROP)
        tokens = TokenSet.from_token_response(body, requested_at=T0)
        assert (tokens.token_type, tokens.scope, tokens.id_token) == ("bearer", None, None)

    def test_non_string_token_type_falls_back_to_bearer(self) -> None:
        """A token_type that is not a string is ignored rather than stringified."""
        tokens = TokenSet.from_token_response(code_response(token_type=["x"]), requested_at=T0)
        assert tokens.token_type == "bearer"

    def test_float_lifetimes_are_accepted_as_seconds(self) -> None:
        """A lifetime sent as a JSON float (21599.0) is read as whole seconds."""
        tokens = TokenSet.from_token_response(code_response(expires_in=21599.0), requested_at=T0)
        assert tokens.access_lifetime == timedelta(seconds=SIX_HOURS)

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            ({"access_token": _DROP}, "access_token"),
            ({"access_token": ""}, "access_token"),
            ({"access_token": 12345}, "access_token"),
            ({"access_token": "two words"}, "access_token"),
            ({"refresh_token": _DROP}, "refresh_token"),
            ({"refresh_token": 12345}, "refresh_token"),
            ({"refresh_token": [RT]}, "refresh_token"),
            ({"expires_in": _DROP}, "expires_in"),
            ({"expires_in": "6h"}, "expires_in"),
            ({"expires_in": True}, "expires_in"),
            ({"expires_in": -1}, "expires_in"),
            ({"expires_in": 0}, "expires_in"),
            ({"expires_in": 0.5}, "expires_in"),
            ({"expires_in": None}, "expires_in"),
            ({"expires_in": float("nan")}, "expires_in"),
            ({"expires_in": float("inf")}, "expires_in"),
            ({"expires_in": 1e300}, "expires_in"),
            ({"expires_in": 10**30}, "expires_in"),
            ({"expires_in": 10**400}, "expires_in"),
            ({"expires_in": -float("inf")}, "expires_in"),
        ],
    )
    def test_malformed_response_names_the_field_and_hides_tokens(
        self, changes: dict[str, Any], field: str
    ) -> None:
        """Each malformed field raises TokenResponseError naming it, with no token in the text."""
        with pytest.raises(TokenResponseError) as info:
            TokenSet.from_token_response(code_response(**changes), requested_at=T0)
        message = str(info.value)
        assert repr(field) in message
        assert_no_secret(message)

    @pytest.mark.parametrize("value", [_DROP, None, "60d", False, 0, -5])
    def test_a_login_answer_without_a_refresh_expiry_keeps_the_login_estimated(
        self, value: Any
    ) -> None:
        """A login answer whose refresh_token_expires_in is missing or unusable still carries
        working tokens: they are kept, the refresh token's expiry estimated as Kakao's
        documented 60 days and marked so (it was refused, and the login lost, before)."""
        tokens = TokenSet.from_token_response(
            code_response(refresh_token_expires_in=value), requested_at=T0
        )
        assert (tokens.access_token, tokens.refresh_token) == (AT, RT)
        assert tokens.refresh_expiry_estimated is True
        assert tokens.refresh_expires_at == T0 + timedelta(seconds=KAKAO_REFRESH_LIFETIME)
        assert tokens.refresh_issued_at == T0
        assert tokens.access_expires_at == T0 + timedelta(seconds=SIX_HOURS)

    def test_a_login_answer_with_a_refresh_expiry_is_not_estimated(self) -> None:
        tokens = TokenSet.from_token_response(code_response(), requested_at=T0)
        assert tokens.refresh_expiry_estimated is False
        assert tokens.refresh_expires_at == T0 + timedelta(seconds=SIXTY_DAYS)

    def test_lifetimes_sent_as_strings_of_digits_are_read(self) -> None:
        """``"expires_in": "21599"`` (a gateway re-encoding numbers) is 21599 s, not garbage."""
        tokens = TokenSet.from_token_response(
            code_response(expires_in="21599", refresh_token_expires_in=" 5183999 "),
            requested_at=T0,
        )
        assert tokens.access_expires_at == T0 + timedelta(seconds=SIX_HOURS)
        assert tokens.refresh_expires_at == T0 + timedelta(seconds=SIXTY_DAYS)
        assert tokens.refresh_expiry_estimated is False

    @pytest.mark.parametrize("bad", ["", "soon", "-5", "0", "1e3", "21599s", "6.5", "\u00b2"])
    def test_strings_that_are_not_whole_seconds_are_still_refused(self, bad: str) -> None:
        """Only a plain count of seconds is read from a string; anything else stays an error."""
        with pytest.raises(TokenResponseError, match="expires_in"):
            TokenSet.from_token_response(code_response(expires_in=bad), requested_at=T0)

    @pytest.mark.parametrize("body", [None, [AT, RT], AT, 21599, True])
    def test_body_that_is_not_an_object_is_rejected(self, body: Any) -> None:
        """A non-object body (list, string, null, number) raises TokenResponseError, no echo."""
        with pytest.raises(TokenResponseError, match="not a JSON object") as info:
            TokenSet.from_token_response(body, requested_at=T0)
        assert_no_secret(str(info.value))

    def test_token_response_error_is_a_value_error(self) -> None:
        """Callers catching ValueError also catch TokenResponseError."""
        assert issubclass(TokenResponseError, ValueError)


class TestMergeRefresh:
    def test_without_rotation_keeps_refresh_token_its_expiry_scope_and_id_token(self) -> None:
        """No refresh_token in the answer: old RT, its OLD expiry, scope and id_token stay."""
        old = initial_tokens()
        requested = T0 + timedelta(hours=4, minutes=30)
        new, rotated = old.merge_refresh(
            {"token_type": "bearer", "access_token": AT2, "expires_in": SIX_HOURS},
            requested_at=requested,
        )
        assert rotated is False
        assert new.access_token == AT2
        assert new.access_issued_at == requested
        assert new.access_expires_at == requested + timedelta(seconds=SIX_HOURS)
        assert new.refresh_token == RT
        assert new.refresh_expires_at == old.refresh_expires_at
        assert new.refresh_issued_at == old.refresh_issued_at
        assert new.scope == old.scope
        assert new.id_token == ID_TOKEN

    def test_refresh_token_expiry_without_refresh_token_is_ignored(self) -> None:
        """A stray refresh_token_expires_in without refresh_token does not move the RT expiry."""
        old = initial_tokens()
        new, rotated = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token_expires_in": 10},
            requested_at=T0 + timedelta(hours=5),
        )
        assert rotated is False
        assert new.refresh_token == RT
        assert new.refresh_expires_at == old.refresh_expires_at

    def test_null_refresh_token_means_no_rotation(self) -> None:
        """``"refresh_token": null`` is treated like an absent field, keeping the old RT."""
        old = initial_tokens()
        new, rotated = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token": None},
            requested_at=T0 + timedelta(hours=5),
        )
        assert (new.refresh_token, rotated) == (RT, False)

    def test_rotation_replaces_refresh_token_and_its_expiry(self) -> None:
        """A new refresh_token replaces both RT and expiry, and the merge reports rotated."""
        old = initial_tokens()
        requested = T0 + timedelta(days=31)
        new, rotated = old.merge_refresh(
            {
                "access_token": AT2,
                "expires_in": SIX_HOURS,
                "refresh_token": RT2,
                "refresh_token_expires_in": SIXTY_DAYS,
            },
            requested_at=requested,
        )
        assert rotated is True
        assert new.refresh_token == RT2
        assert new.refresh_expires_at == requested + timedelta(seconds=SIXTY_DAYS)
        assert new.refresh_issued_at == requested
        assert new.refresh_expiry_estimated is False
        assert new.scope == old.scope and new.id_token == ID_TOKEN

    def test_rotation_clears_an_estimated_expiry(self) -> None:
        """After an import (estimated RT expiry), a real rotation makes the expiry exact."""
        old = initial_tokens()
        old = TokenSet.from_dict({**old.to_dict(), "refresh_expiry_estimated": True})
        new, _ = old.merge_refresh(
            {
                "access_token": AT2,
                "expires_in": SIX_HOURS,
                "refresh_token": RT2,
                "refresh_token_expires_in": SIXTY_DAYS,
            },
            requested_at=T0,
        )
        assert new.refresh_expiry_estimated is False

    def test_same_refresh_token_string_is_not_a_rotation(self) -> None:
        """Kakao echoing the current RT is not a rotation: rotated False, RT and issue time kept."""
        old = initial_tokens()
        requested = T0 + timedelta(days=40)
        new, rotated = old.merge_refresh(
            {
                "access_token": AT2,
                "expires_in": SIX_HOURS,
                "refresh_token": RT,
                "refresh_token_expires_in": 100,
            },
            requested_at=requested,
        )
        assert rotated is False
        assert new.refresh_token == RT
        assert new.refresh_issued_at == old.refresh_issued_at
        # The server's word on the remaining life of this very token is still the truth.
        assert new.refresh_expires_at == requested + timedelta(seconds=100)

    def test_rotated_token_without_usable_expiry_gets_the_full_lifetime_estimated(self) -> None:
        """A new RT whose expiry is missing/bad is still kept (the old RT is dead); Kakao gives
        every new refresh token a full life, so it is estimated as the lifetime the previous one
        was issued with, counted from the request — not the dying token's expiry, which made a
        healthy account look unrenewed and every later refresh a missed rotation."""
        old = initial_tokens()
        requested = T0 + timedelta(days=31)
        for bad in (_DROP, None, "soon", 0):
            body = {"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token": RT2}
            if bad is not _DROP:
                body["refresh_token_expires_in"] = bad
            new, rotated = old.merge_refresh(body, requested_at=requested)
            assert rotated is True
            assert new.refresh_token == RT2
            assert new.refresh_issued_at == requested
            assert new.refresh_expiry_estimated is True
            assert new.refresh_expires_at == requested + timedelta(seconds=SIXTY_DAYS)

    def test_rotated_token_without_expiry_after_an_import_keeps_the_old_expiry(self) -> None:
        """With the previous lifetime unknown (an imported file), the old expiry is the guess."""
        old = replace(initial_tokens(), refresh_issued_at=None, refresh_expiry_estimated=True)
        new, rotated = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token": RT2},
            requested_at=T0 + timedelta(days=31),
        )
        assert (rotated, new.refresh_token) == (True, RT2)
        assert new.refresh_expiry_estimated is True
        assert new.refresh_expires_at == old.refresh_expires_at

    def test_lifetimes_sent_as_strings_are_read_on_refresh(self) -> None:
        """A rotation whose lifetimes are strings of digits has an exact, not estimated, expiry."""
        old = initial_tokens()
        requested = T0 + timedelta(days=31)
        new, rotated = old.merge_refresh(
            {
                "access_token": AT2,
                "expires_in": "21599",
                "refresh_token": RT2,
                "refresh_token_expires_in": "5183999",
            },
            requested_at=requested,
        )
        assert rotated is True
        assert new.access_expires_at == requested + timedelta(seconds=SIX_HOURS)
        assert new.refresh_expires_at == requested + timedelta(seconds=SIXTY_DAYS)
        assert new.refresh_expiry_estimated is False

    def test_empty_refresh_token_means_no_rotation(self) -> None:
        """``"refresh_token": ""`` carries no new token: like null, the old RT and expiry stay
        and the new access token is taken (refusing the answer lost a working access token)."""
        old = initial_tokens()
        new, rotated = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token": ""},
            requested_at=T0 + timedelta(hours=5),
        )
        assert (new.access_token, new.refresh_token, rotated) == (AT2, RT, False)
        assert new.refresh_expires_at == old.refresh_expires_at

    def test_scope_and_id_token_replaced_when_present(self) -> None:
        """A refresh answer that does carry scope/id_token replaces the old values."""
        old = initial_tokens()
        new, _ = old.merge_refresh(
            {"access_token": AT2, "expires_in": 7199, "scope": "profile", "id_token": "idt2"},
            requested_at=T0,
        )
        assert (new.scope, new.id_token) == ("profile", "idt2")
        assert new.access_lifetime == timedelta(seconds=7199)

    def test_unknown_fields_merge_into_extra(self) -> None:
        """New unknown fields are added to extra and older unknown fields are kept."""
        old = TokenSet.from_token_response(code_response(first=1), requested_at=T0)
        new, _ = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS, "second": 2}, requested_at=T0
        )
        assert new.extra == {"first": 1, "second": 2}

    def test_an_expiry_passed_by_our_clock_is_rebased_by_a_refresh_kakao_kept(self) -> None:
        """The refresh token 'died' by our clock (stamped while the clock was behind, then
        stepped forward), yet Kakao answered without rotating it: by Kakao's rule it has at
        least the rotation window left. Its expiry becomes the request time plus the window,
        estimated; the issue time moves as much, so the life (and the fitted window) stays."""
        old = initial_tokens()
        window = timedelta(days=30)
        requested = old.refresh_expires_at + timedelta(days=10)
        new, rotated = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS},
            requested_at=requested,
            rotation_window=window,
        )
        assert rotated is False and new.refresh_token == RT
        assert new.refresh_expires_at == requested + window
        assert new.refresh_expiry_estimated is True
        assert new.refresh_issued_at is not None and old.refresh_issued_at is not None
        life = old.refresh_expires_at - old.refresh_issued_at
        assert new.refresh_expires_at - new.refresh_issued_at == life
        assert new.refresh_remaining(requested) > timedelta(0)

    def test_a_known_expiry_still_ahead_is_kept_when_kakao_does_not_rotate(self) -> None:
        """Inside the window, with our own expiry still ahead, a refresh without rotation
        changes nothing: it is a missed rotation (the caller warns), not a wrong clock. The
        same without a window (a caller that does not know it)."""
        old = initial_tokens()
        requested = old.refresh_expires_at - timedelta(days=10)
        for window in (timedelta(days=30), None):
            new, _ = old.merge_refresh(
                {"access_token": AT2, "expires_in": SIX_HOURS},
                requested_at=requested,
                rotation_window=window,
            )
            assert new.refresh_expires_at == old.refresh_expires_at
            assert new.refresh_issued_at == old.refresh_issued_at
            assert new.refresh_expiry_estimated is False
        dead = old.refresh_expires_at + timedelta(days=1)
        new, _ = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS}, requested_at=dead
        )
        assert new.refresh_expires_at == old.refresh_expires_at  # no window: nothing proven

    def test_an_estimate_below_what_kakao_proves_is_raised_and_never_lowered(self) -> None:
        """An estimated expiry (an import) with less than the window left is raised to it by
        a refresh Kakao did not rotate; one with more left stays; a window longer than the
        token's life proves at most that life."""
        old = replace(initial_tokens(), refresh_expiry_estimated=True)
        requested = old.refresh_expires_at - timedelta(days=20)
        new, _ = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS},
            requested_at=requested,
            rotation_window=timedelta(days=30),
        )
        assert new.refresh_expires_at == requested + timedelta(days=30)
        assert new.refresh_expiry_estimated is True
        early = old.refresh_expires_at - timedelta(days=40)
        kept, _ = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS},
            requested_at=early,
            rotation_window=timedelta(days=30),
        )
        assert kept.refresh_expires_at == old.refresh_expires_at
        capped, _ = old.merge_refresh(
            {"access_token": AT2, "expires_in": SIX_HOURS},
            requested_at=requested,
            rotation_window=timedelta(days=90),
        )
        assert capped.refresh_expires_at == requested + timedelta(seconds=SIXTY_DAYS)

    def test_merge_does_not_modify_the_original(self) -> None:
        """merge_refresh returns a new set; the old one still holds the old access token."""
        old = initial_tokens()
        old.merge_refresh({"access_token": AT2, "expires_in": SIX_HOURS}, requested_at=T0)
        assert old.access_token == AT

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"expires_in": SIX_HOURS}, "access_token"),
            ({"access_token": AT2}, "expires_in"),
            ({"access_token": AT2, "expires_in": "6h"}, "expires_in"),
            ({"access_token": AT2, "expires_in": True}, "expires_in"),
            ({"access_token": AT2, "expires_in": -5}, "expires_in"),
            ({"access_token": AT2, "expires_in": 0}, "expires_in"),
            ({"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token": 42}, "refresh_token"),
            ({"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token": " "}, "refresh_token"),
            ({"access_token": AT2, "expires_in": SIX_HOURS, "refresh_token": {}}, "refresh_token"),
        ],
    )
    def test_malformed_refresh_response_names_the_field_and_hides_tokens(
        self, body: dict[str, Any], field: str
    ) -> None:
        """A malformed refresh answer raises TokenResponseError naming the field, no secrets."""
        with pytest.raises(TokenResponseError) as info:
            initial_tokens().merge_refresh(body, requested_at=T0)
        assert repr(field) in str(info.value)
        assert_no_secret(str(info.value))

    @pytest.mark.parametrize("body", [None, [], "text", 3])
    def test_refresh_body_not_an_object_is_rejected(self, body: Any) -> None:
        """A refresh answer that is not an object raises TokenResponseError."""
        with pytest.raises(TokenResponseError, match="not a JSON object"):
            initial_tokens().merge_refresh(body, requested_at=T0)


class TestSecretsHidden:
    def test_repr_and_str_never_contain_tokens(self) -> None:
        """repr()/str() of a TokenSet show expiries but no access/refresh/id token."""
        tokens = TokenSet.from_token_response(code_response(secretish=AT2), requested_at=T0)
        for text in (repr(tokens), str(tokens), f"{tokens}", f"{tokens!r}"):
            assert_no_secret(text)
            assert "access_expires_at" in text

    def test_fingerprint_properties_name_the_tokens(self) -> None:
        """access_fingerprint/refresh_fingerprint are the fingerprints of the two tokens."""
        tokens = initial_tokens()
        assert tokens.access_fingerprint == fingerprint(AT)
        assert tokens.refresh_fingerprint == fingerprint(RT)
        assert tokens.access_fingerprint != tokens.refresh_fingerprint


class TestFingerprint:
    def test_stable_short_and_distinct(self) -> None:
        """Same token → same short name; different tokens → different names; no token text."""
        assert fingerprint(AT) == fingerprint(AT)
        assert fingerprint(AT) != fingerprint(RT)
        assert fingerprint(AT).startswith("sha256:")
        assert len(fingerprint(AT)) <= 16
        assert AT not in fingerprint(AT)
        # Pinned so a change of algorithm (which would break log correlation) is noticed.
        assert fingerprint("abc") == "sha256:ba7816bf"

    @pytest.mark.parametrize("token", ["", None])
    def test_empty_is_none(self, token: str | None) -> None:
        """An empty or missing token is named ``none``."""
        assert fingerprint(token) == "none"

    @settings(deadline=None, max_examples=200)
    @given(st.text(min_size=1), st.text(min_size=1))
    def test_fingerprint_is_deterministic_and_fixed_length(self, a: str, b: str) -> None:
        """Any non-empty token gets a 15-character name; equal tokens get equal names."""
        assert len(fingerprint(a)) == len("sha256:") + 8
        assert (fingerprint(a) == fingerprint(b)) or a != b
        # Hypothesis almost never draws a == b, so the line above rarely checks anything:
        # compare a token with an equal copy, and distinct tokens with each other.
        assert fingerprint(a) == fingerprint("".join(list(a)))
        if a != b:
            assert fingerprint(a) != fingerprint(b)


class TestTimeText:
    def test_format_time_is_utc_with_z_to_the_second(self) -> None:
        """format_time converts to UTC, drops microseconds and ends in Z."""
        seoul = timezone(timedelta(hours=9))
        moment = datetime(2026, 11, 26, 12, 0, 5, 999_999, tzinfo=seoul)
        assert format_time(moment) == "2026-11-26T03:00:05Z"

    def test_format_time_rejects_naive(self) -> None:
        """A naive datetime is refused instead of silently read as local time."""
        with pytest.raises(ValueError, match="time zone"):
            format_time(datetime(2026, 11, 26, 3, 0, 0))

    def test_round_trip(self) -> None:
        """parse_time(format_time(t)) == t for whole-second aware times."""
        assert parse_time(format_time(T0)) == T0
        assert format_time(parse_time("2026-11-26T03:00:00Z")) == "2026-11-26T03:00:00Z"

    def test_parse_time_accepts_offsets_and_returns_utc(self) -> None:
        """An offset timestamp is converted to UTC."""
        moment = parse_time("2026-11-26T12:00:00+09:00")
        assert moment == T0
        assert moment.utcoffset() == timedelta(0)

    @pytest.mark.parametrize(
        "text",
        [
            "2026-11-26T03:00:00",  # naive
            "2026-11-26",  # date only, naive
            "yesterday",
            "",
            "0001-01-01T00:00:00+05:00",  # overflows when converted to UTC
            "9999-12-31T23:59:59-05:00",
            "0001-01-01T00:00:00Z",  # no token lives then: date arithmetic would overflow
            "9999-12-31T23:59:59Z",
        ],
    )
    def test_parse_time_rejects_with_value_error(self, text: str) -> None:
        """Naive, unparsable or out-of-range timestamps raise ValueError."""
        with pytest.raises(ValueError):
            parse_time(text)

    @pytest.mark.parametrize("value", [None, 0, 1.5, [], {}])
    def test_parse_time_rejects_non_strings(self, value: Any) -> None:
        """Non-string input raises ValueError, not TypeError/AttributeError."""
        with pytest.raises(ValueError, match="string"):
            parse_time(value)

    @settings(deadline=None, max_examples=200)
    @given(
        st.datetimes(
            min_value=datetime(1970, 1, 1),
            max_value=datetime(8999, 12, 31),
            timezones=st.just(UTC),
        )
    )
    def test_round_trip_property(self, moment: datetime) -> None:
        """Any aware time survives format/parse up to its whole second."""
        assert parse_time(format_time(moment)) == moment.replace(microsecond=0)

    @settings(deadline=None, max_examples=200)
    @given(st.text(max_size=40))
    def test_parse_time_raises_only_value_error(self, text: str) -> None:
        """Arbitrary text either parses to an aware UTC time or raises ValueError."""
        try:
            moment = parse_time(text)
        except ValueError:
            return
        assert moment.utcoffset() == timedelta(0)

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0s"),
            (0.5, "0.5s"),  # a retry of a seconds-long token is not "in 0s"
            (-0.25, "-0.2s"),
            (12, "12s"),
            (12.9, "12s"),
            (-12, "-12s"),
            (185, "3m05s"),
            (3600, "1h00m"),
            (4 * 3600 + 12 * 60 + 7, "4h12m"),
            (21599, "5h59m"),
            (86400, "1d0h"),
            (86400 + 3 * 3600, "1d3h"),
            (2 * 86400, "2d"),
            (SIXTY_DAYS, "59d"),
            (41 * 86400 + 5000, "41d"),
            (-3 * 86400, "-3d"),
        ],
    )
    def test_format_duration_samples(self, seconds: float, text: str) -> None:
        """format_duration renders compact human durations."""
        assert format_duration(seconds) == text


class TestTokenSetDict:
    def test_round_trip(self) -> None:
        """from_dict(to_dict(t)) == t for a set with every optional field set."""
        tokens = TokenSet.from_token_response(code_response(extra_field=[1]), requested_at=T0)
        assert TokenSet.from_dict(tokens.to_dict()) == tokens

    def test_round_trip_through_json(self) -> None:
        """to_dict output is plain JSON and survives json.dumps/loads."""
        tokens = initial_tokens()
        assert TokenSet.from_dict(json.loads(json.dumps(tokens.to_dict()))) == tokens

    def test_round_trip_with_unknowns(self) -> None:
        """Unknown RT issue time, estimated expiry and absent scope/id_token survive."""
        tokens = TokenSet(
            access_token=AT,
            refresh_token=RT,
            access_expires_at=T0 + timedelta(hours=6),
            refresh_expires_at=T0 + timedelta(days=20),
            access_issued_at=T0,
            refresh_expiry_estimated=True,
        )
        data = tokens.to_dict()
        assert data["refresh_issued_at"] is None
        assert TokenSet.from_dict(data) == tokens

    def test_naive_datetimes_are_refused_by_the_constructor(self) -> None:
        """A TokenSet cannot be built with naive times."""
        with pytest.raises(ValueError, match="timezone-aware"):
            TokenSet(
                access_token=AT,
                refresh_token=RT,
                access_expires_at=datetime(2026, 1, 1),
                refresh_expires_at=T0,
                access_issued_at=T0,
            )

    @pytest.mark.parametrize(
        "changes",
        [
            {"access_token": None},
            {"access_token": ""},
            {"access_token": 5},
            {"refresh_token": None},
            {"refresh_token": ["x"]},
            {"access_expires_at": None},
            {"access_expires_at": "soon"},
            {"access_expires_at": "2026-11-26T03:00:00"},
            {"access_expires_at": 1764126000},
            {"refresh_expires_at": "0001-01-01T00:00:00+05:00"},
            {"access_issued_at": {}},
            {"refresh_issued_at": "never"},
            {"refresh_issued_at": 7},
            {"refresh_expiry_estimated": "false"},
            {"scope": 5},
            {"id_token": ["x"]},
            {"token_type": 5},
            {"extra": []},
            {"extra": "x"},
        ],
    )
    def test_from_dict_rejects_malformed_with_value_error(self, changes: dict[str, Any]) -> None:
        """Every malformed field raises ValueError (not KeyError/TypeError), without tokens."""
        data = {**initial_tokens().to_dict(), **changes}
        with pytest.raises(ValueError) as info:
            TokenSet.from_dict(data)
        assert type(info.value) is ValueError
        assert_no_secret(str(info.value))

    @pytest.mark.parametrize(
        "missing",
        ["access_token", "refresh_token", "access_expires_at", "refresh_expires_at",
         "access_issued_at"],
    )  # fmt: skip
    def test_from_dict_names_a_missing_field(self, missing: str) -> None:
        """A missing required field raises ValueError naming it."""
        data = initial_tokens().to_dict()
        del data[missing]
        with pytest.raises(ValueError, match=missing):
            TokenSet.from_dict(data)

    @pytest.mark.parametrize("data", [None, [], "tokens", 1])
    def test_from_dict_rejects_non_objects(self, data: Any) -> None:
        """A non-object raises ValueError."""
        with pytest.raises(ValueError, match="JSON object"):
            TokenSet.from_dict(data)

    def test_timestamp_error_names_field_not_value(self) -> None:
        """A bad timestamp names the field and does not echo its text (it could be a token)."""
        data = {**initial_tokens().to_dict(), "access_expires_at": AT}
        with pytest.raises(ValueError, match="access_expires_at") as info:
            TokenSet.from_dict(data)
        assert_no_secret(str(info.value))


class TestTimingExamples:
    def test_refresh_due_at_without_jitter_is_exactly_the_share(self) -> None:
        """With jitter 0 a 6-hour token is due at 75 % of its life (4.5 h)."""
        tokens = initial_tokens()
        due = refresh_due_at(tokens, share=0.75, jitter=0.0)
        assert due == T0 + timedelta(seconds=SIX_HOURS * 0.75)

    def test_refresh_due_at_is_clamped_inside_the_lifetime(self) -> None:
        """Absurd shares are clamped to 5 %..95 % of the life, never at/after expiry."""
        tokens = initial_tokens()
        assert refresh_due_at(tokens, share=1.5, jitter=0) == T0 + timedelta(
            seconds=SIX_HOURS * 0.95
        )
        assert refresh_due_at(tokens, share=-1, jitter=0) == T0 + timedelta(
            seconds=SIX_HOURS * 0.05
        )

    def test_refresh_due_at_uses_the_given_rng(self) -> None:
        """The same seeded rng gives the same plan (reproducible schedules in tests)."""
        tokens = initial_tokens()
        a = refresh_due_at(tokens, rng=random.Random(7))
        b = refresh_due_at(tokens, rng=random.Random(7))
        assert a == b

    def test_backoff_for_six_second_token_is_tiny(self) -> None:
        """A 6-second token retries within 30 ms first, scaling like a 6-hour one."""
        delay = backoff_delay(
            1, now=T0, expires_at=T0 + timedelta(seconds=6), lifetime=timedelta(seconds=6)
        )
        assert 0.015 <= delay <= 0.03

    def test_backoff_does_not_speed_up_in_the_last_seconds(self) -> None:
        """Retries just before expiry keep at least half a first step apart (no storm)."""
        lifetime = timedelta(hours=6)
        for left in (20.0, 8.0, 1.0, 0.1, 0.001):
            delay = backoff_delay(
                4,
                now=T0 + lifetime - timedelta(seconds=left),
                expires_at=T0 + lifetime,
                lifetime=lifetime,
                rng=random.Random(3),
            )
            assert delay >= 5.0, left
            if left > 10:
                assert delay <= left - 5.0

    def test_backoff_past_expiry_still_backs_off(self) -> None:
        """After expiry the delay is the normal backoff step, not zero (no hot loop)."""
        delay = backoff_delay(
            3,
            now=T0 + timedelta(hours=7),
            expires_at=T0 + timedelta(hours=6),
            lifetime=timedelta(hours=6),
            rng=random.Random(1),
        )
        assert 20 <= delay <= 40

    def test_backoff_survives_thousands_of_attempts(self) -> None:
        """A days-long outage (attempt 5000) gives the cap, not an OverflowError."""
        delay = backoff_delay(
            5000,
            now=T0 + timedelta(days=3),
            expires_at=T0 + timedelta(hours=6),
            lifetime=timedelta(hours=6),
        )
        assert 150 <= delay <= 300

    def test_in_rotation_window(self) -> None:
        """The window opens when less than `window` of refresh life remains."""
        tokens = initial_tokens()
        window = timedelta(days=30)
        opens = tokens.refresh_expires_at - window
        assert not in_rotation_window(tokens, opens - timedelta(seconds=1), window=window)
        assert in_rotation_window(tokens, opens + timedelta(seconds=1), window=window)

    def test_a_rotation_is_certain_only_well_inside_the_window(self) -> None:
        """A refresh that did not rotate with 29 days left is no missed rotation (Kakao's
        "less than a month" may mean 28 days); with 26 days left it is. For second-long
        tokens the slack is one access lifetime: with 5 s left of a 6 s window and 2 s access
        tokens, a late estimate of our own expiry must not raise a false alarm."""
        tokens = initial_tokens()
        window = timedelta(days=30)
        end = tokens.refresh_expires_at
        assert not rotation_certain(tokens, end - timedelta(days=29), window=window)
        assert not rotation_certain(tokens, end - timedelta(days=27, seconds=1), window=window)
        assert rotation_certain(tokens, end - timedelta(days=26), window=window)
        short = tokens_with_lifetime(timedelta(seconds=2))
        short = replace(short, refresh_expires_at=short.access_issued_at + timedelta(seconds=40))
        six = timedelta(seconds=6)
        close = short.refresh_expires_at
        assert not rotation_certain(short, close - timedelta(seconds=5), window=six)
        assert rotation_certain(short, close - timedelta(seconds=3.5), window=six)


# ---------------------------------------------------------------------------------------------
# Property tests.

lifetimes = st.integers(min_value=1_000_000, max_value=12 * 3600 * 1_000_000).map(
    lambda us: timedelta(microseconds=us)
)
shares = st.floats(min_value=0.5, max_value=0.9)
jitters = st.floats(min_value=0.0, max_value=0.1)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def tokens_with_lifetime(lifetime: timedelta, issued: datetime = T0) -> TokenSet:
    """Return a token set issued at ``issued`` whose access token lives ``lifetime``."""
    return TokenSet(
        access_token=AT,
        refresh_token=RT,
        access_expires_at=issued + lifetime,
        refresh_expires_at=issued + timedelta(days=60),
        access_issued_at=issued,
        refresh_issued_at=issued,
    )


class _TopRandom(random.Random):
    """An rng whose uniform() always returns the top of the range (the backoff's bound)."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _BottomRandom(random.Random):
    """An rng whose uniform() always returns the bottom of the range."""

    def uniform(self, a: float, b: float) -> float:
        return a


FAR = T0 + timedelta(days=365)


class TestTimingProperties:
    @settings(deadline=None, max_examples=200)
    @given(lifetimes, shares, jitters, seeds)
    def test_refresh_due_at_lies_strictly_inside_lifetime_and_band(
        self, lifetime: timedelta, share: float, jitter: float, seed: int
    ) -> None:
        """Due time is after issue, before expiry, and within share ± jitter of the life."""
        tokens = tokens_with_lifetime(lifetime)
        due = refresh_due_at(tokens, share=share, jitter=jitter, rng=random.Random(seed))
        assert tokens.access_issued_at < due < tokens.access_expires_at
        fraction = (due - T0) / lifetime
        slack = 2e-6  # timedelta rounds to whole microseconds; lifetime >= 1 s
        assert share - jitter - slack <= fraction <= share + jitter + slack

    @settings(deadline=None, max_examples=200)
    @given(
        attempt=st.integers(min_value=1, max_value=5000),
        lifetime=lifetimes,
        elapsed=st.floats(min_value=0.0, max_value=2.0),
        initial=st.floats(min_value=0.01, max_value=60.0),
        cap=st.floats(min_value=1.0, max_value=3600.0),
        seed=seeds,
    )
    def test_backoff_bounds(
        self,
        attempt: int,
        lifetime: timedelta,
        elapsed: float,
        initial: float,
        cap: float,
        seed: int,
    ) -> None:
        """Delay is ≤ cap, never below half a first step (no storm before expiry), and, while
        more than a first step is left, never reaches past expiry."""
        now = T0 + lifetime * elapsed
        expires_at = T0 + lifetime
        delay = backoff_delay(
            attempt,
            now=now,
            expires_at=expires_at,
            lifetime=lifetime,
            initial=initial,
            cap=cap,
            rng=random.Random(seed),
        )
        assert math.isfinite(delay)
        assert 0.0 <= delay <= cap
        base = min(initial, lifetime.total_seconds() / 200)
        assert delay >= min(base, cap) / 2 * (1 - 1e-9)
        remaining = (expires_at - now).total_seconds()
        if remaining > base:
            assert delay <= remaining

    @settings(deadline=None, max_examples=200)
    @given(
        attempt=st.integers(min_value=1, max_value=60),
        lifetime=lifetimes,
        initial=st.floats(min_value=0.01, max_value=60.0),
        cap=st.floats(min_value=1.0, max_value=3600.0),
    )
    def test_backoff_upper_bound_grows_until_the_cap(
        self, attempt: int, lifetime: timedelta, initial: float, cap: float
    ) -> None:
        """The delay's upper bound never shrinks with more attempts and doubles until a ceiling."""

        def bound(n: int, rng: random.Random | None = None) -> float:
            return backoff_delay(
                n,
                now=T0,
                expires_at=FAR,
                lifetime=lifetime,
                initial=initial,
                cap=cap,
                rng=rng or _TopRandom(),
            )

        here, there, ceiling = bound(attempt), bound(attempt + 1), bound(10_000)
        assert here <= there <= ceiling <= cap
        if there == here:
            assert here == ceiling  # it only stops growing once it has reached the ceiling
        else:
            assert there == pytest.approx(min(2 * here, ceiling))
        # Full jitter between half and all of the step.
        assert bound(attempt, _BottomRandom()) == pytest.approx(here / 2)

    @settings(deadline=None, max_examples=200)
    @given(
        seed=seeds,
        seconds=st.sampled_from([21599, 21600]),
        elapsed=st.floats(min_value=0.0, max_value=0.99),
    )
    def test_six_hour_token_first_retry_is_5_to_10_seconds(
        self, seed: int, seconds: int, elapsed: float
    ) -> None:
        """With default settings a 6-hour token's first retry waits 5-10 s (before expiry)."""
        lifetime = timedelta(seconds=seconds)
        now = T0 + lifetime * elapsed
        assume((T0 + lifetime - now).total_seconds() > 12)
        delay = backoff_delay(
            1, now=now, expires_at=T0 + lifetime, lifetime=lifetime, rng=random.Random(seed)
        )
        assert 5.0 <= delay <= 10.0


# ---------------------------------------------------------------------------------------------
# Robustness: arbitrary input raises only our documented errors.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.just(10**400)
    | st.floats()  # includes nan/inf, which Python's json module accepts
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
token_strings = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20
)
lifetime_values = st.integers(min_value=-5, max_value=10**9) | json_scalars
response_keys = st.sampled_from(
    [
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "refresh_token_expires_in",
        "scope",
        "id_token",
        "other",
    ]
)
arbitrary_bodies = json_values | st.dictionaries(response_keys, json_values, max_size=8)
near_valid_bodies = st.fixed_dictionaries(
    {"access_token": token_strings | json_scalars, "expires_in": lifetime_values},
    optional={
        "refresh_token": token_strings | st.just(RT) | json_scalars,
        "refresh_token_expires_in": lifetime_values,
        "scope": json_scalars,
        "id_token": json_scalars,
        "token_type": json_scalars,
        "unknown": json_values,
    },
)


def check_merge(body: Any) -> None:
    """Merge ``body`` into a known set and check the outcome against Kakao's rules."""
    old = initial_tokens()
    requested = T0 + timedelta(days=40)
    try:
        new, rotated = old.merge_refresh(body, requested_at=requested)
    except TokenResponseError as exc:
        assert_no_secret(str(exc))
        return
    assert isinstance(new, TokenSet)
    assert isinstance(body, dict)
    assert new.access_token == body["access_token"]
    assert new.access_issued_at == requested
    assert new.access_expires_at > requested
    offered = body.get("refresh_token")
    valid_offer = (
        isinstance(offered, str) and offered != "" and not any(c.isspace() for c in offered)
    )
    if valid_offer:
        assert new.refresh_token == offered
    else:
        # No new usable refresh token: the old one and its old expiry are kept.
        assert new.refresh_token == RT
        assert new.refresh_expires_at == old.refresh_expires_at
    assert rotated is (new.refresh_token != RT)
    assert isinstance(new.token_type, str)
    assert new.scope is None or isinstance(new.scope, str)
    # Whatever came in, the result serialises and reloads.
    assert TokenSet.from_dict(json.loads(json.dumps(new.to_dict()))).refresh_token == (
        new.refresh_token
    )


class TestRobustness:
    @settings(deadline=None, max_examples=200)
    @given(arbitrary_bodies)
    def test_merge_refresh_arbitrary_json(self, body: Any) -> None:
        """Any JSON body → a valid merged set or TokenResponseError; the RT is never lost."""
        check_merge(body)

    @settings(deadline=None, max_examples=200)
    @given(near_valid_bodies)
    def test_merge_refresh_near_valid(self, body: dict[str, Any]) -> None:
        """Almost-valid bodies merge by the rules or raise TokenResponseError, nothing else."""
        check_merge(body)

    @settings(deadline=None, max_examples=200)
    @given(arbitrary_bodies | near_valid_bodies)
    def test_from_token_response_arbitrary_json(self, body: Any) -> None:
        """Any login body → a TokenSet with positive lifetimes, or TokenResponseError."""
        try:
            tokens = TokenSet.from_token_response(body, requested_at=T0)
        except TokenResponseError:
            return
        assert tokens.access_expires_at > T0 and tokens.refresh_expires_at > T0

    @settings(deadline=None, max_examples=200)
    @given(json_values)
    def test_from_dict_arbitrary_json_raises_only_value_error(self, data: Any) -> None:
        """TokenSet.from_dict on any JSON value raises ValueError or returns a TokenSet."""
        try:
            tokens = TokenSet.from_dict(data)
        except ValueError:
            return
        assert isinstance(tokens, TokenSet)

    @settings(deadline=None, max_examples=200)
    @given(
        st.sampled_from(sorted(initial_tokens().to_dict())) | st.text(max_size=6),
        json_values,
    )
    def test_from_dict_with_one_field_replaced(self, key: str, value: Any) -> None:
        """Replacing any one field of a valid dict gives ValueError or a valid TokenSet."""
        data = {**initial_tokens().to_dict(), key: value}
        try:
            tokens = TokenSet.from_dict(data)
        except ValueError:
            return
        assert TokenSet.from_dict(tokens.to_dict()) == tokens


# ---------------------------------------------------------------------------------------------
# Never past the tokens: rate limits, the refresh deadline, half-broken answers.


class TestWaitsWithinTheTokensLife:
    @pytest.mark.parametrize("life", [6.0, 60.0, float(SIX_HOURS)])
    def test_rate_limit_pause_is_the_longest_step_of_the_lifetime(self, life: float) -> None:
        """KOE237 while the access token serves: the longest regular step (1/12 of the life,
        at most the cap), landing before expiry — the same rule at every scale."""
        lifetime = timedelta(seconds=life)
        now = T0 + lifetime * 0.5
        delay = backoff_delay(
            1,
            now=now,
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            rate_limited=True,
            rng=_TopRandom(),
        )
        assert delay == pytest.approx(min(300.0, life / 12))
        assert delay < life * 0.5

    def test_rate_limit_after_expiry_keeps_the_ladder_pace(self) -> None:
        """With the access token gone a rate limit does not stretch the wait: the first retry of
        a 6-hour token comes within 10 s, a Retry-After of 120 s notwithstanding."""
        lifetime = timedelta(seconds=SIX_HOURS)
        delay = backoff_delay(
            1,
            now=T0 + lifetime + timedelta(seconds=5),
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            rate_limited=True,
            retry_after=120.0,
            rng=_TopRandom(),
        )
        assert delay == pytest.approx(10.0)

    def test_retry_after_is_honoured_while_the_token_serves(self) -> None:
        """Kakao's Retry-After counts while there is time: 120 s asked, 2 h of access left."""
        lifetime = timedelta(seconds=SIX_HOURS)
        delay = backoff_delay(
            1,
            now=T0 + timedelta(hours=4),
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            retry_after=120.0,
            rng=_BottomRandom(),
        )
        assert delay == pytest.approx(120.0)

    def test_no_wait_reaches_past_the_refresh_tokens_deadline(self) -> None:
        """Kakao asks for 5 minutes, the refresh token dies in 4: the retry comes before its
        expiry minus the safety margin (1 % of the access lifetime), not after."""
        lifetime = timedelta(seconds=SIX_HOURS)
        now = T0 + timedelta(hours=1)
        refresh_expires_at = now + timedelta(minutes=4) + lifetime * 0.01
        delay = backoff_delay(
            1,
            now=now,
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            rate_limited=True,
            retry_after=300.0,
            refresh_expires_at=refresh_expires_at,
            rng=_TopRandom(),
        )
        assert delay <= 240.0 - 5.0

    def test_inside_the_margin_one_attempt_still_lands_before_death(self) -> None:
        """Already inside the safety margin, 60 s of refresh life left: the retry comes before
        the refresh token dies, not after a full step."""
        lifetime = timedelta(seconds=SIX_HOURS)
        now = T0 + lifetime + timedelta(minutes=10)  # the access token has expired
        delay = backoff_delay(
            6,
            now=now,
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            refresh_expires_at=now + timedelta(seconds=60),
            rng=_TopRandom(),
        )
        assert 5.0 <= delay <= 55.0

    @settings(deadline=None, max_examples=200)
    @given(
        attempt=st.integers(min_value=1, max_value=200),
        lifetime=lifetimes,
        elapsed=st.floats(min_value=0.0, max_value=3.0),
        refresh_left=st.floats(min_value=-10.0, max_value=1e6),
        rate_limited=st.booleans(),
        retry_after=st.none() | st.floats(min_value=0.0, max_value=1e5),
        seed=seeds,
    )
    def test_never_past_the_refresh_deadline_while_a_step_is_left(
        self,
        attempt: int,
        lifetime: timedelta,
        elapsed: float,
        refresh_left: float,
        rate_limited: bool,
        retry_after: float | None,
        seed: int,
    ) -> None:
        """Whatever the attempt, rate limit or Retry-After: while more than a first step is
        left before the refresh token's expiry minus the margin, the wait ends before it; with
        between a quarter and one step left before the expiry itself, it ends at half of what
        is left; and it is never below half a first step otherwise (no storm)."""
        now = T0 + lifetime * elapsed
        refresh_expires_at = now + timedelta(seconds=refresh_left)
        delay = backoff_delay(
            attempt,
            now=now,
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            refresh_expires_at=refresh_expires_at,
            rate_limited=rate_limited,
            retry_after=retry_after,
            rng=random.Random(seed),
        )
        base = min(10.0, lifetime.total_seconds() / 200)
        deadline_left = refresh_left - lifetime.total_seconds() * 0.01
        if base / 4 < refresh_left <= base:
            # (timedelta keeps microseconds: the left seen inside differs by up to one)
            assert base / 8 - 1e-6 <= delay <= refresh_left / 2 + 1e-6
        else:
            assert delay >= base / 2 * (1 - 1e-9)
        if deadline_left > base:
            assert delay <= deadline_left
        if refresh_left > base:
            assert delay <= refresh_left

    @pytest.mark.parametrize(
        ("attempt", "rate_limited", "retry_after"),
        [
            (1, True, 3600.0),  # a 429 with an hour of Retry-After
            (1, True, None),  # KOE237: the longest step (5 minutes)
            (64, False, None),  # the config-error pace (refresher.LONGEST_STEP)
            (3, False, None),  # the ladder: 20-40 s
        ],
    )
    def test_less_than_a_step_of_refresh_life_still_gets_an_attempt(
        self, attempt: int, rate_limited: bool, retry_after: float | None
    ) -> None:
        """A 6-hour token still serving, its refresh token dying in 8 s (under the 10 s first
        step): the retry comes at half of what is left, whatever the pause asked for — before,
        it waited the pause out and the refresh token died during it."""
        lifetime = timedelta(seconds=SIX_HOURS)
        now = T0 + timedelta(hours=2)
        delay = backoff_delay(
            attempt,
            now=now,
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            refresh_expires_at=now + timedelta(seconds=8),
            rate_limited=rate_limited,
            retry_after=retry_after,
            rng=_TopRandom(),
        )
        assert delay == pytest.approx(4.0)

    def test_under_a_quarter_step_of_refresh_life_the_ladder_holds(self) -> None:
        """2 s left of a 6-hour token's refresh token (a fifth of the first step): no attempt
        fits any more, and the retries do not speed up into a storm."""
        lifetime = timedelta(seconds=SIX_HOURS)
        now = T0 + timedelta(hours=2)
        delay = backoff_delay(
            2,
            now=now,
            expires_at=T0 + lifetime,
            lifetime=lifetime,
            refresh_expires_at=now + timedelta(seconds=2),
            rng=_TopRandom(),
        )
        assert delay == pytest.approx(20.0)

    def test_a_dying_refresh_token_moves_the_planned_refresh_before_its_deadline(self) -> None:
        """A fresh 6-hour access token but 20 minutes of refresh life: plan by the refresh
        token's deadline; once refreshed after it, plan normally again (no loop)."""
        lifetime = timedelta(seconds=SIX_HOURS)
        tokens = TokenSet(
            access_token=AT,
            refresh_token=RT,
            access_expires_at=T0 + lifetime,
            refresh_expires_at=T0 + timedelta(minutes=20),
            access_issued_at=T0,
        )
        due = refresh_due_at(tokens, rng=random.Random(1))
        assert due == refresh_deadline(tokens) < tokens.refresh_expires_at
        later = TokenSet(
            access_token=AT2,
            refresh_token=RT,
            access_expires_at=due + lifetime,
            refresh_expires_at=tokens.refresh_expires_at,
            access_issued_at=due + timedelta(seconds=1),
        )
        assert refresh_due_at(later, rng=random.Random(1)) > tokens.refresh_expires_at

    @pytest.mark.parametrize(
        ("access", "refresh"), [(10.0, 4.0), (10.0, 30.0), (SIX_HOURS, 20 * 60.0)]
    )
    def test_a_refresh_planned_by_a_dying_refresh_token_leaves_room_for_a_retry(
        self, access: float, refresh: float
    ) -> None:
        """A refresh token that dies before the planned refresh: the refresh comes early
        enough that an attempt hanging to the timeout, the back-off's first step and a second
        attempt all end before the refresh token dies (the same room the access token's
        page leaves), and never later than half the refresh token's own life."""
        lifetime = timedelta(seconds=access)
        tokens = TokenSet(
            access_token=AT,
            refresh_token=RT,
            access_expires_at=T0 + lifetime,
            refresh_expires_at=T0 + timedelta(seconds=refresh),
            access_issued_at=T0,
            refresh_issued_at=T0,
        )
        for seed in range(20):
            due = refresh_due_at(tokens, rng=random.Random(seed))
            left = (tokens.refresh_expires_at - due).total_seconds()
            timeout = access * request_timeout_share(0.75, 0.05)
            room = 2 * timeout + access * FIRST_STEP_SHARE
            assert left >= min(room, refresh / 2) - 1e-6, (left, room)
            assert due > T0

    def test_clock_step_tolerance_scales_with_the_lifetime(self) -> None:
        """A 6-second token issued 0.1 s "in the future" betrays a stepped clock; a 6-hour one
        is allowed 1 % of its life (3.6 minutes) before that conclusion."""
        short = tokens_with_lifetime(timedelta(seconds=6))
        assert issued_in_the_future(short, T0 - timedelta(seconds=0.1))
        assert not issued_in_the_future(short, T0 - timedelta(seconds=0.05))
        long = tokens_with_lifetime(timedelta(hours=6))
        assert not issued_in_the_future(long, T0 - timedelta(minutes=3))
        assert issued_in_the_future(long, T0 - timedelta(minutes=4))


class TestHalfBrokenRefresh:
    @pytest.mark.parametrize(
        "broken",
        [
            {"access_token": ""},
            {"access_token": None},
            {"expires_in": "soon"},
            {"expires_in": 0},
        ],
    )
    def test_a_new_refresh_token_is_salvaged_from_a_broken_access_part(
        self, broken: dict[str, Any]
    ) -> None:
        """The refresh part is usable, the access part is not: PartialTokenResponse carries the
        new refresh token (with its expiry) and the old access token."""
        before = initial_tokens()
        at = T0 + timedelta(days=31)
        body = {
            "access_token": AT2,
            "expires_in": SIX_HOURS,
            "refresh_token": RT2,
            "refresh_token_expires_in": SIXTY_DAYS,
            **broken,
        }
        with pytest.raises(PartialTokenResponse) as caught:
            before.merge_refresh(body, requested_at=at)
        salvaged = caught.value.salvaged
        assert salvaged.refresh_token == RT2
        assert salvaged.refresh_expires_at == at + timedelta(seconds=SIXTY_DAYS)
        assert salvaged.refresh_issued_at == at
        assert salvaged.access_token == AT
        assert salvaged.access_expires_at == before.access_expires_at
        assert_no_secret(str(caught.value))

    def test_a_broken_answer_without_rotation_is_a_plain_error(self) -> None:
        """No new refresh token: nothing to salvage, an ordinary TokenResponseError."""
        with pytest.raises(TokenResponseError) as caught:
            initial_tokens().merge_refresh({"expires_in": SIX_HOURS}, requested_at=T0)
        assert not isinstance(caught.value, PartialTokenResponse)


@pytest.mark.parametrize(
    ("configured", "lifetime", "expected"),
    [
        (30.0, timedelta(seconds=6), 0.75),  # the default, a 6-second token: 1/8 of its life
        (30.0, timedelta(hours=6), 30.0),  # Kakao's own tokens keep the default
        (30.0, timedelta(minutes=4), 30.0),  # the boundary: 1/8 of 240 s is the default
        (30.0, None, 30.0),  # a login: no token yet
        (5.0, timedelta(seconds=6), 5.0),  # set by hand: as written
    ],
)
def test_a_default_request_timeout_is_fitted_to_a_short_lived_token(
    configured: float, lifetime: timedelta | None, expected: float
) -> None:
    """Without a policy: the bound, 1/8 of the life (what the fleet's backstop is sized for)."""
    assert request_timeout(configured, 30.0, lifetime) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("refresh_at", "jitter", "share"),
    [
        (0.75, 0.05, 0.0475),  # the defaults: (10 % - 0.5 %) / 2
        (0.80, 0.0, 0.0475),  # the same latest refresh, without jitter
        (0.90, 0.05, 0.01),  # planned at 95 % at the latest: the page at 97.5 %
        (0.90, 0.09, 0.01),  # planned no later than 95 % whatever the jitter says
        (0.50, 0.0, 0.1225),  # an early refresh leaves more
        (0.05, 0.0, REQUEST_TIMEOUT_SHARE),  # never more than the bound
    ],
)
def test_the_fitted_request_timeout_leaves_two_attempts_before_the_page(
    refresh_at: float, jitter: float, share: float
) -> None:
    """The share a default timeout may take under a refresh policy: two requests that hang
    to it and the back-off's first step (1/200 of the life) fit between the latest planned
    refresh and the moment access_expiring may page (half of the rest of the life)."""
    assert request_timeout_share(refresh_at, jitter) == pytest.approx(share)
    latest = min(refresh_at + jitter, 0.95)
    window = (1 - latest) - expiring_margin(refresh_at, jitter, 1.0)
    assert 2 * share + 1 / 200 <= window + 1e-12


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [
        (timedelta(seconds=6), 0.285),  # the bug's token: not 0.75 s (92.5 % of its life)
        (timedelta(seconds=3), 0.1425),
        (timedelta(seconds=30 / 0.0475), 30.0),  # 10.5 minutes: the boundary
        (timedelta(hours=6), 30.0),  # Kakao's own tokens keep the default
    ],
)
def test_a_default_request_timeout_is_fitted_to_the_default_policy(
    lifetime: timedelta, expected: float
) -> None:
    share = request_timeout_share(0.75, 0.05)
    assert request_timeout(30.0, 30.0, lifetime, share=share) == pytest.approx(expected)
    assert request_timeout(5.0, 30.0, lifetime, share=share) == 5.0  # set by hand: as written


@pytest.mark.parametrize(
    ("refresh_at", "jitter", "margin"),
    [
        (0.75, 0.05, 0.10),  # the defaults: half of the last 20 %
        (0.90, 0.09, 0.025),  # the plan stops at 95 %: half of the last 5 %, not of 1 %
        (0.05, 0.0, 0.475),
    ],
)
def test_the_expiring_margin_is_half_the_time_after_the_latest_planned_refresh(
    refresh_at: float, jitter: float, margin: float
) -> None:
    """A share of the life at every scale: the fixed 1-second floor it had made a 6-hour
    token's margin a different share than a 60-second one's."""
    for lifetime in (3.0, 60.0, 21600.0):
        assert expiring_margin(refresh_at, jitter, lifetime) == pytest.approx(margin * lifetime)


@pytest.mark.parametrize("lifetime", [6.0, 600.0, 3600.0])
def test_a_rate_limit_pause_ends_before_the_page_it_would_cause(lifetime: float) -> None:
    """A 429 while the access token serves waits the ladder's longest step (1/12 of a life
    under an hour): with refresh at 90 % ± 4.9 % the page comes 2.55 % of the life after the
    latest refresh, so a single 429 then paged before its retry. The retry lands half a
    first step before the page instead."""
    issued = T0
    expires = issued + timedelta(seconds=lifetime)
    now = issued + timedelta(seconds=lifetime * 0.949)
    pages_at = expires - timedelta(seconds=expiring_margin(0.9, 0.049, lifetime))
    for seed in range(50):
        delay = backoff_delay(
            1,
            now=now,
            expires_at=expires,
            lifetime=timedelta(seconds=lifetime),
            rng=random.Random(seed),
            refresh_expires_at=issued + timedelta(days=30),
            rate_limited=True,
            pages_at=pages_at,
        )
        first_step = min(10.0, lifetime / 200)
        assert now + timedelta(seconds=delay) <= pages_at - timedelta(seconds=first_step / 2)


@pytest.mark.parametrize(
    ("configured", "lifetime", "refresh_left", "expected"),
    [
        (60.0, timedelta(hours=6), 5.0, 2.5),  # the default beat, 5 s of refresh life: half
        (30.0, timedelta(hours=6), 5.0, 2.5),  # set by hand: the same
        (60.0, timedelta(seconds=3), 30.0, 0.375),  # fitted to a 3 s token, plenty left
        (60.0, timedelta(hours=6), 0.02, 0.05),  # its last moments: the floor, no busy loop
        (30.0, timedelta(hours=6), -1.0, 30.0),  # dead by our clock: as before
        (30.0, timedelta(hours=6), None, 30.0),
    ],
)
def test_no_heartbeat_outlasts_half_the_first_dying_refresh_tokens_life(
    configured: float, lifetime: timedelta, refresh_left: float | None, expected: float
) -> None:
    """After the wall clock went back, the beat runs a retry kept on the monotonic clock: a
    hand-set 30 s beat with 5 s of refresh life left would run it after the death."""
    beat = heartbeat_interval(configured, 60.0, lifetime, refresh_left)
    assert beat == pytest.approx(expected)


@pytest.mark.parametrize(
    ("configured", "lifetime", "refresh_left", "expected"),
    [
        (60.0, timedelta(hours=6), 5.0, 2.5),  # set by hand, 5 s of refresh life: half of it
        (30.0, timedelta(hours=6), 5.0, 2.5),  # the default, a 6-hour token: the same
        (30.0, timedelta(seconds=6), 1.0, 0.5),  # fitted to the life (0.75 s), then capped
        (30.0, timedelta(seconds=6), 60.0, 0.75),  # plenty left: the lifetime's share
        (60.0, timedelta(hours=6), 86400.0, 60.0),  # a day left: as written
        (60.0, timedelta(hours=6), None, 60.0),  # no refresh token (a login)
        (60.0, timedelta(hours=6), -3.0, 60.0),  # dead by our clock: nothing to save time for
    ],
)
def test_no_request_timeout_outlasts_half_the_refresh_tokens_remaining_life(
    configured: float, lifetime: timedelta, refresh_left: float | None, expected: float
) -> None:
    """A 60 s timeout with 5 s of refresh life left waited past its death when Kakao hung."""
    assert request_timeout(configured, 30.0, lifetime, refresh_left) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("unanswered", "configured", "lifetime", "refresh_left", "expected"),
    [
        (0, 30.0, 10.0, None, 0.475),  # none unanswered: the policy's 4.75 %
        (1, 30.0, 10.0, None, 0.95),  # one: twice that
        (2, 30.0, 10.0, None, 1.25),  # two: 1.9 s, capped at 1/8 of the life (the fleet's bound)
        (1000, 30.0, 10.0, None, 1.25),  # days of timeouts: the same cap, no overflow
        (3, 30.0, 21600.0, None, 30.0),  # Kakao's 6-hour token: the configured 30 s, as today
        (3, 30.0, 400.0, None, 30.0),  # 19 s grows to 50 s of the life: the configured 30 s
        (3, 0.3, 10.0, None, 0.3),  # set by hand: as written, whatever went unanswered
        (2, 30.0, 10.0, 1.5, 0.75),  # 1.5 s of refresh life left: half of it
    ],
)
def test_a_request_after_unanswered_ones_waits_longer_within_the_same_bounds(
    unanswered: int,
    configured: float,
    lifetime: float,
    refresh_left: float | None,
    expected: float,
) -> None:
    """A default timeout fitted to a short token doubles per token request Kakao left
    unanswered before it (0 again after any answer): Kakao answering in 1 s never reached
    a 10-second token's 0.475 s, though the answer came with most of its life left. It stays
    at or below the configured 30 s (a value set by hand is used as written), 1/8 of the
    access lifetime, and half of the refresh token's remaining life."""
    share = request_timeout_share(0.75, 0.05)
    wait = request_timeout(
        configured,
        30.0,
        timedelta(seconds=lifetime),
        refresh_left,
        share=share,
        unanswered=unanswered,
    )
    assert wait == pytest.approx(expected)


@pytest.mark.parametrize(
    ("heard", "configured", "lifetime", "refresh_left", "wait", "patience"),
    [
        (None, 30.0, 1.0, None, 0.0475, 0.125),  # nothing heard: the 1 s life's own waits
        (0.2, 30.0, 1.0, None, 0.4, 0.8),  # Kakao took 0.2 s: twice it, open twice as long
        (0.01, 30.0, 1.0, None, 0.0475, 0.125),  # quicker than the life's share: as before
        (0.2, 30.0, 21600.0, None, 30.0, 60.0),  # Kakao's 6-hour token: unchanged
        (20.0, 30.0, 1.0, None, 30.0, 60.0),  # the configured 30 s stays the ceiling
        (0.2, 0.1, 1.0, None, 0.1, 0.125),  # set by hand: as written
        (0.2, 30.0, 1.0, 0.5, 0.25, 0.25),  # 0.5 s of refresh life left: half of it
    ],
)
def test_a_request_waits_at_least_twice_as_long_as_kakaos_latest_answer_took(
    heard: float | None,
    configured: float,
    lifetime: float,
    refresh_left: float | None,
    wait: float,
    patience: float,
) -> None:
    """Network delay does not shrink with a token's life: after one answer saying a token
    lives 1 s, from a Kakao taking 0.2 s, every wait was fitted to 1 s (0.0475 s, grown to
    0.125 s at most) and none heard Kakao again. A wait left at its default is at least
    twice the latest answer's time and the request stays open twice as long again, within
    the configured wait (twice it) and half of the refresh token's remaining life."""
    share = request_timeout_share(0.75, 0.05)
    life = timedelta(seconds=lifetime)
    assert request_timeout(
        configured, 30.0, life, refresh_left, share=share, heard=heard
    ) == pytest.approx(wait)
    assert answer_patience(
        configured, 30.0, life, refresh_left, share=share, heard=heard
    ) == pytest.approx(patience)


@pytest.mark.parametrize(
    ("ceiling", "lifetime", "spare", "expected"),
    [
        (120.0, 21600.0, 21500.0, 10.0),  # a 6-hour token in the file: 10 s, not 120 s
        (120.0, 21600.0, None, 120.0),  # the file cannot stand in: the daemon's own deadline
        (120.0, 21600.0, -30.0, 120.0),  # nor with less left than min_valid
        (120.0, None, None, 120.0),  # no token to go by (unreadable files, fleet mode)
        (120.0, 8.0, 7.9, 2.0),  # an 8-second token: a quarter of its life
        (120.0, 8.0, None, 2.0),  # ... also when the daemon must refresh it first
        (120.0, 8.0, 1.0, 0.5),  # half the spare: what is handed out still meets min_valid
        (120.0, 8.0, 0.02, 0.1),  # never below the floor: a healthy daemon is not frozen
        (0.05, 8.0, 7.9, 0.05),  # ... nor above the ceiling
    ],
)
def test_a_command_waits_for_the_daemon_a_share_of_the_tokens_life(
    ceiling: float, lifetime: float | None, spare: float | None, expected: float
) -> None:
    """`kakao-tokend token` waited a fixed 120 s for a stopped or frozen daemon, although
    the state file held a token with hours left. Its wait is a quarter of the access token's
    life (two of the longest Kakao requests the daemon may make for it), within the daemon's
    own deadline twice over; and while the file's token can stand in, at most 10 s and half
    of what it has beyond min_valid."""
    life = timedelta(seconds=lifetime) if lifetime is not None else None
    assert daemon_answer_wait(ceiling, life, spare) == pytest.approx(expected)


@pytest.mark.parametrize("unanswered", [0, 1, 2, 5])
def test_a_grown_request_timeout_is_the_same_share_of_every_short_lifetime(
    unanswered: int,
) -> None:
    """A 3-second token and a 4-minute one wait the same share of their lives after the
    same number of unanswered requests: up to 4 minutes, even 1/8 of the life stays within
    the configured 30 s."""
    share = request_timeout_share(0.75, 0.05)
    shares = {
        request_timeout(30.0, 30.0, timedelta(seconds=life), share=share, unanswered=unanswered)
        / life
        for life in (3.0, 10.0, 60.0, 240.0)
    }
    assert len(shares) == 1
    (grown,) = shares
    assert grown == pytest.approx(min(share * 2**unanswered, REQUEST_TIMEOUT_SHARE))


def test_an_access_token_never_has_more_left_than_its_whole_lifetime() -> None:
    """After the wall clock stepped back an hour, a 6-second token "issued in the future" still
    has at most its 6 seconds left: the token endpoint's and the status's ``expires_in`` is
    never longer than the token lives (it said 3,603 s, and a consumer caching by it kept a
    dead token for an hour)."""
    tokens = tokens_with_lifetime(timedelta(seconds=6))
    stepped_back = T0 + timedelta(seconds=1) - timedelta(hours=1)
    assert tokens.access_remaining(stepped_back) == timedelta(seconds=6)
    assert tokens.access_remaining(T0 + timedelta(seconds=1)) == timedelta(seconds=5)
    assert tokens.access_remaining(T0 + timedelta(seconds=8)) == timedelta(seconds=-2)


@pytest.mark.parametrize(
    ("configured", "life", "patience"),
    [
        (30.0, 6.0, 0.75),  # a short token: the longest grown wait, 1/8 of the life
        (30.0, 60.0, 7.5),
        (30.0, 600.0, 60.0),  # the wait is already the configured 30 s: twice that
        (30.0, 21599.0, 60.0),  # Kakao's 6-hour token: an answer after 31 s is heard
        (2.0, 3.0, 2.0),  # a wait set by hand for a short token keeps its value
        (1.0, 3600.0, 2.0),  # ... and is doubled for a long-lived one
    ],
)
def test_a_request_given_up_on_stays_open_for_a_share_of_the_life_or_twice_its_wait(
    configured: float, life: float, patience: float
) -> None:
    """How long a token request given up on stays open for Kakao's late answer: never less
    than the longest wait the growth rule gives, twice the configured wait for a token that
    lives long (the wait stays the configured value there, and an answer after it would
    otherwise be lost with its rotation), at most 1/8 of the life."""
    got = answer_patience(configured, 30.0, timedelta(seconds=life), 30 * 86400.0)
    assert got == pytest.approx(patience, rel=0.01)
