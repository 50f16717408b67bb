"""Tests for kakao_tokend.state: AccountState bookkeeping and its state-file round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kakao_tokend.state import (
    MAX_ROTATIONS_KEPT,
    RESTORED_KEY,
    STATE_VERSION,
    AccountState,
    Rotation,
    forced_restore,
    goes_backwards,
)
from kakao_tokend.tokens import TokenSet, fingerprint

T0 = datetime(2026, 11, 26, 3, 0, 0, tzinfo=UTC)
AT = "AT-state-distinctive-access-Lq3Wz8Xc5Vb1Nm7Kj2Hg4Fd6Sa9"
RT = "RT-state-distinctive-refresh-Po0Iu9Yt8Re7Wq6Az5Sx4Dc3Fv"
AT2 = "AT-state-distinctive-next-access-Mn2Bv4Cx6Zl8Kj0Hg1Fd3S"
RT2 = "RT-state-distinctive-rotated-Qw1Er2Ty3Ui4Op5As6Df7Gh8J"
ID_TOKEN = "eyJ-state-distinctive-id-token.payload.sig"
SECRETS = (AT, RT, AT2, RT2, ID_TOKEN)


def make_tokens(
    access: str = AT, refresh: str = RT, issued: datetime = T0, **extra: Any
) -> TokenSet:
    """Return a token set shaped like a fresh Kakao login at ``issued``."""
    return TokenSet.from_token_response(
        {
            "token_type": "bearer",
            "access_token": access,
            "expires_in": 21599,
            "refresh_token": refresh,
            "refresh_token_expires_in": 5183999,
            "scope": "talk_message",
            "id_token": ID_TOKEN,
            **extra,
        },
        requested_at=issued,
    )


def full_state() -> AccountState:
    """Return a state with every optional field filled in."""
    return AccountState(
        account="home",
        tokens=make_tokens(),
        generation=7,
        refreshed_at=T0 + timedelta(hours=1),
        rotations=(
            Rotation(T0 - timedelta(days=30), fingerprint("older")),
            Rotation(T0, fingerprint(RT)),
        ),
        relogin_reason="KOE322: refresh token expired",
        user_id=4_123_456_789,
        extras={"alerts": {"last_sent": "2026-11-25T00:00:00Z", "count": 2}},
    )


def assert_no_secret(text: str) -> None:
    """Fail if ``text`` contains any of the test's token strings."""
    for secret in SECRETS:
        assert secret not in text, f"a token value leaked into: {text!r}"


class TestAccountState:
    def test_defaults(self) -> None:
        """A new state starts at generation 1 with no history, reason or user id."""
        state = AccountState(account="default", tokens=make_tokens())
        assert state.generation == 1
        assert state.refreshed_at is None
        assert state.rotations == ()
        assert state.relogin_reason is None
        assert state.user_id is None
        assert state.extras == {}

    def test_repr_and_str_never_contain_tokens(self) -> None:
        """repr()/str() of an AccountState (and its nested TokenSet) hide every token."""
        state = full_state()
        for text in (repr(state), str(state), f"{state!r}"):
            assert_no_secret(text)
            assert "home" in text


class TestWithTokens:
    def test_refresh_without_rotation(self) -> None:
        """A plain refresh bumps the generation, records the time and clears relogin_reason."""
        state = full_state()
        new_tokens, rotated = state.tokens.merge_refresh(
            {"access_token": AT2, "expires_in": 21599}, requested_at=T0 + timedelta(hours=5)
        )
        after = state.with_tokens(new_tokens, refreshed_at=T0 + timedelta(hours=5), rotated=rotated)
        assert after.tokens is new_tokens
        assert after.generation == state.generation + 1
        assert after.refreshed_at == T0 + timedelta(hours=5)
        assert after.relogin_reason is None
        assert after.rotations == state.rotations
        # Untouched bookkeeping survives.
        assert (after.account, after.user_id, after.extras) == (
            state.account,
            state.user_id,
            state.extras,
        )

    def test_rotation_is_recorded_with_fingerprint_not_token(self) -> None:
        """A rotation appends (time, new RT fingerprint); the RT itself is never stored there."""
        state = AccountState(account="a", tokens=make_tokens())
        at = T0 + timedelta(days=31)
        new_tokens, rotated = state.tokens.merge_refresh(
            {
                "access_token": AT2,
                "expires_in": 21599,
                "refresh_token": RT2,
                "refresh_token_expires_in": 5183999,
            },
            requested_at=at,
        )
        assert rotated
        after = state.with_tokens(new_tokens, refreshed_at=at, rotated=True)
        assert after.rotations == (Rotation(at, fingerprint(RT2)),)
        assert_no_secret(json.dumps(after.to_dict()["rotations"]))

    def test_with_tokens_leaves_the_original_alone(self) -> None:
        """with_tokens returns a new state; the old one keeps its generation and tokens."""
        state = full_state()
        state.with_tokens(make_tokens(AT2), refreshed_at=T0, rotated=True)
        assert state.generation == 7
        assert state.tokens.access_token == AT
        assert len(state.rotations) == 2

    def test_a_fleet_state_keeps_only_the_newest_rotations_it_is_asked_to(self) -> None:
        """``keep`` (the store's rotations_kept: 1 on a fleet node, whose log is a table)
        caps the log to its newest entries, the new rotation last."""
        state = full_state()
        after = state.with_tokens(make_tokens(AT2, RT2), refreshed_at=T0, rotated=True, keep=1)
        assert after.rotations == (Rotation(T0, fingerprint(RT2)),)
        assert after.rotations[0].replaced == fingerprint(RT)
        same = state.with_tokens(make_tokens(AT2), refreshed_at=T0, rotated=False, keep=1)
        assert same.rotations == state.rotations[-1:]

    def test_rotation_list_is_capped_keeping_the_newest(self) -> None:
        """After many rotations only the newest MAX_ROTATIONS_KEPT remain, oldest dropped."""
        state = AccountState(account="a", tokens=make_tokens())
        total = MAX_ROTATIONS_KEPT + 5
        for i in range(total):
            state = state.with_tokens(
                make_tokens(refresh=f"rt-{i}"), refreshed_at=T0 + timedelta(days=i), rotated=True
            )
        assert len(state.rotations) == MAX_ROTATIONS_KEPT
        assert state.rotations[-1] == Rotation(
            T0 + timedelta(days=total - 1), fingerprint(f"rt-{total - 1}")
        )
        assert state.rotations[0].fingerprint == fingerprint(f"rt-{total - MAX_ROTATIONS_KEPT}")
        assert state.generation == 1 + total


class TestStateDict:
    def test_round_trip(self) -> None:
        """from_dict(to_dict(s)) == s with every field set, through real JSON."""
        state = full_state()
        data = json.loads(json.dumps(state.to_dict()))
        assert data["version"] == STATE_VERSION
        assert AccountState.from_dict(data) == state

    def test_round_trip_minimal(self) -> None:
        """A state with only the required fields round-trips too."""
        state = AccountState(account="x", tokens=make_tokens())
        assert AccountState.from_dict(json.loads(json.dumps(state.to_dict()))) == state

    def test_optional_fields_may_be_absent(self) -> None:
        """Older/hand-written files without optional keys load with defaults."""
        data = {"version": STATE_VERSION, "account": "x", "tokens": make_tokens().to_dict()}
        state = AccountState.from_dict(data)
        assert (state.generation, state.rotations, state.extras) == (1, (), {})

    @pytest.mark.parametrize(
        ("changes", "words"),
        [
            ({"version": None}, "version"),
            ({"version": 2}, "version"),
            ({"version": "1"}, "version"),
            ({"version": True}, "version"),
            ({"version": 1.0}, "version"),
            ({"account": None}, "account"),
            ({"account": ""}, "account"),
            ({"account": 3}, "account"),
            ({"generation": -1}, "generation"),
            ({"generation": True}, "generation"),
            ({"generation": "3"}, "generation"),
            ({"generation": 2.5}, "generation"),
            ({"rotations": {}}, "rotations"),
            ({"rotations": "x"}, "rotations"),
            ({"rotations": [1]}, "rotation"),
            ({"rotations": [{"at": "2026-11-26T03:00:00Z"}]}, "rotation"),
            ({"rotations": [{"fingerprint": "sha256:00000000"}]}, "rotation"),
            ({"rotations": [{"at": "nope", "fingerprint": "sha256:0"}]}, "rotation"),
            ({"rotations": [{"at": None, "fingerprint": "sha256:0"}]}, "rotation"),
            ({"refreshed_at": "nope"}, "refreshed_at"),
            ({"refreshed_at": 5}, "refreshed_at"),
            ({"refreshed_at": "2026-11-26T03:00:00"}, "refreshed_at"),
            ({"relogin_reason": 5}, "relogin_reason"),
            ({"user_id": "42"}, "user_id"),
            ({"user_id": True}, "user_id"),
            ({"extras": []}, "extras"),
            ({"extras": "x"}, "extras"),
            ({"tokens": None}, "tokens"),
            ({"tokens": []}, "tokens"),
            ({"tokens": {}}, "access_token"),
        ],
    )
    def test_from_dict_rejects_each_malformed_shape(
        self, changes: dict[str, Any], words: str
    ) -> None:
        """Each malformed field raises plain ValueError naming the problem, without tokens."""
        data = {**full_state().to_dict(), **changes}
        with pytest.raises(ValueError, match=words) as info:
            AccountState.from_dict(data)
        assert type(info.value) is ValueError
        assert_no_secret(str(info.value))

    @pytest.mark.parametrize("missing", ["version", "account", "tokens"])
    def test_from_dict_rejects_missing_required_key(self, missing: str) -> None:
        """Dropping a required key raises ValueError naming it."""
        data = full_state().to_dict()
        del data[missing]
        with pytest.raises(ValueError, match=missing):
            AccountState.from_dict(data)

    @pytest.mark.parametrize("data", [None, [], "state", 1, True])
    def test_from_dict_rejects_non_objects(self, data: Any) -> None:
        """A state file that is not a JSON object raises ValueError."""
        with pytest.raises(ValueError, match="JSON object"):
            AccountState.from_dict(data)

    def test_token_field_errors_say_they_are_in_tokens(self) -> None:
        """An error inside the nested token set tells the reader where to look."""
        data = full_state().to_dict()
        data["tokens"]["access_expires_at"] = AT
        with pytest.raises(ValueError, match=r"tokens.*access_expires_at") as info:
            AccountState.from_dict(data)
        assert_no_secret(str(info.value))


# ---------------------------------------------------------------------------------------------
# Robustness.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.just(10**400)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["2026-11-26T03:00:00Z", "0001-01-01T00:00:00+05:00", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
_TEMPLATE = full_state().to_dict()


class TestRobustness:
    @settings(deadline=None, max_examples=200)
    @given(json_values)
    def test_arbitrary_json_raises_only_value_error(self, data: Any) -> None:
        """AccountState.from_dict on any JSON value gives a state or ValueError, nothing else."""
        try:
            state = AccountState.from_dict(data)
        except ValueError:
            return
        assert isinstance(state, AccountState)

    @settings(deadline=None, max_examples=200)
    @given(st.sampled_from(sorted(_TEMPLATE)) | st.text(max_size=6), json_values)
    def test_one_field_replaced(self, key: str, value: Any) -> None:
        """Replacing any top-level field gives ValueError or a state that round-trips."""
        data = {**json.loads(json.dumps(_TEMPLATE)), key: value}
        try:
            state = AccountState.from_dict(data)
        except ValueError:
            return
        assert AccountState.from_dict(state.to_dict()) == state

    @settings(deadline=None, max_examples=200)
    @given(
        st.sampled_from(sorted(_TEMPLATE["tokens"])) | st.text(max_size=6),
        json_values,
    )
    def test_one_token_field_replaced(self, key: str, value: Any) -> None:
        """Replacing any field of the nested token set gives ValueError or a valid state."""
        data = json.loads(json.dumps(_TEMPLATE))
        data["tokens"][key] = value
        try:
            state = AccountState.from_dict(data)
        except ValueError as exc:
            assert_no_secret(str(exc))
            return
        assert AccountState.from_dict(state.to_dict()) == state

    @settings(deadline=None, max_examples=200)
    @given(json_values)
    def test_one_rotation_entry_replaced(self, entry: Any) -> None:
        """Any JSON value as a rotation entry gives ValueError or a state, nothing else."""
        data = json.loads(json.dumps(_TEMPLATE))
        data["rotations"] = [entry]
        try:
            state = AccountState.from_dict(data)
        except ValueError:
            return
        assert len(state.rotations) == 1


class TestGoesBackwards:
    """Which state files a running daemon refuses to adopt (old backups) and which it takes."""

    def chain(self) -> tuple[AccountState, AccountState, AccountState]:
        """Login (generation 1), then a rotation (2), then a plain refresh (3)."""
        login = AccountState(account="a", tokens=make_tokens())
        rotated = login.with_tokens(
            make_tokens(AT2, RT2, issued=T0 + timedelta(days=31)),
            refreshed_at=T0 + timedelta(days=31),
            rotated=True,
        )
        refreshed = rotated.with_tokens(
            make_tokens("AT-3", RT2, issued=T0 + timedelta(days=31, hours=5)),
            refreshed_at=T0 + timedelta(days=31, hours=5),
            rotated=False,
        )
        return login, rotated, refreshed

    def test_a_backup_holding_a_rotated_out_refresh_token_is_refused(self) -> None:
        """The backup's refresh token was retired by a rotation we recorded: refused."""
        login, _, newest = self.chain()
        why = goes_backwards(login, newest)
        assert why is not None and "retired by a rotation" in why

    def test_a_lower_generation_with_the_same_refresh_token_is_refused(self) -> None:
        """Same refresh token, an older access token: refused (a harmless but older copy)."""
        _, rotated, newest = self.chain()
        why = goes_backwards(rotated, newest)
        assert why is not None and "generation 2 is lower than 3" in why

    def test_newer_states_and_fresh_logins_are_adopted(self) -> None:
        """A later state of the chain, or a new login (new refresh token, issued later, even
        with a low generation), is not backwards."""
        _, rotated, newest = self.chain()
        assert goes_backwards(newest, rotated) is None
        fresh = AccountState(
            account="a", tokens=make_tokens("AT-new", "RT-new", issued=T0 + timedelta(days=40))
        )
        assert goes_backwards(fresh, newest) is None

    def test_an_unknown_older_state_is_refused_by_generation_or_history(self) -> None:
        """A refresh token we never saw, issued before ours: a lower generation, or a rotation
        history that lacks our newest rotation, gives it away."""
        _, _, newest = self.chain()
        stranger = AccountState(
            account="a", tokens=make_tokens("AT-old", "RT-old", issued=T0 - timedelta(days=5))
        )
        assert goes_backwards(stranger, newest) is not None
        edited = replace_generation(stranger, 99)
        why = goes_backwards(edited, newest)
        assert why is not None and "rotation history" in why

    def test_a_restore_by_the_operator_is_never_refused(self) -> None:
        """The marker written by `kakao-tokend restore` for this generation forces adoption; a
        later generation (or a copy with another generation) is judged normally again."""
        login, _, newest = self.chain()
        forced = replace_generation(
            login, 9, extras={RESTORED_KEY: {"generation": 9, "at": "2026-12-01T00:00:00Z"}}
        )
        assert forced_restore(forced)
        assert goes_backwards(forced, newest) is None
        stale_marker = replace_generation(forced, 10)
        assert not forced_restore(stale_marker)
        assert goes_backwards(stale_marker, newest) is not None

    def test_the_retired_fingerprint_survives_the_state_file(self) -> None:
        """Rotations keep the retired token's fingerprint through to_dict/from_dict, and old
        files without it still load."""
        _, _, newest = self.chain()
        again = AccountState.from_dict(json.loads(json.dumps(newest.to_dict())))
        assert again.rotations[-1].replaced == fingerprint(RT)
        legacy = newest.to_dict()
        for entry in legacy["rotations"]:
            entry.pop("replaced", None)
        assert AccountState.from_dict(legacy).rotations[-1].replaced is None


class TestReloginCauseField:
    def test_the_cause_round_trips_and_a_new_login_clears_it(self) -> None:
        """relogin_cause is saved and read back; with_tokens (a refresh or login) clears it."""
        state = AccountState(
            account="a", tokens=make_tokens(), relogin_reason="x", relogin_cause="revoked"
        )
        again = AccountState.from_dict(json.loads(json.dumps(state.to_dict())))
        assert again.relogin_cause == "revoked"
        cleared = again.with_tokens(make_tokens(AT2), refreshed_at=T0, rotated=False)
        assert cleared.relogin_cause is None and cleared.relogin_reason is None

    def test_a_non_string_cause_is_a_readable_error(self) -> None:
        """A damaged relogin_cause is reported by name, not a traceback."""
        data = AccountState(account="a", tokens=make_tokens()).to_dict()
        data["relogin_cause"] = 5
        with pytest.raises(ValueError, match="relogin_cause"):
            AccountState.from_dict(data)


def replace_generation(state: AccountState, generation: int, **changes: Any) -> AccountState:
    """Return ``state`` with another generation (and other field changes)."""
    from dataclasses import replace

    return replace(state, generation=generation, **changes)
