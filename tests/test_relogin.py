"""Tests for kakao_tokend.relogin: classifying a refused refresh token, and its texts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kakao_tokend.relogin import AccessCheck, ReloginCause, classify, render
from kakao_tokend.tokens import TokenSet

T0 = datetime(2026, 11, 26, 3, 0, 0, tzinfo=UTC)


class TestClassify:
    """The pure rule behind the causes (relogin.classify), at the edges."""

    def tokens(self, *, refresh_left: float, estimated: bool = False) -> TokenSet:
        """A 6-hour token set at T0 whose refresh token has ``refresh_left`` seconds."""
        return TokenSet(
            access_token="a",
            refresh_token="r",
            access_expires_at=T0 + timedelta(hours=1),
            refresh_expires_at=T0 + timedelta(seconds=refresh_left),
            access_issued_at=T0 - timedelta(hours=5),
            refresh_expiry_estimated=estimated,
        )

    def cause(self, tokens: TokenSet, *, ambiguous: bool, access: AccessCheck) -> str:
        """Classify with Kakao's 30-day rotation window."""
        return classify(
            tokens,
            T0,
            ambiguous_before=ambiguous,
            rotation_window=timedelta(days=30),
            access=access,
        )

    def test_within_the_safety_margin_of_its_expiry_counts_as_expired(self) -> None:
        """A token 1 minute from expiry (inside 1 % of 6 h) was refused as expired: clock skew
        between us and Kakao, not a revocation."""
        near = self.tokens(refresh_left=60)
        assert self.cause(near, ambiguous=True, access=AccessCheck.REJECTED) == "expired"

    def test_an_ambiguous_attempt_outside_the_rotation_window_cannot_be_a_lost_rotation(
        self,
    ) -> None:
        """Kakao rotates only in the last month: with 40 days left a lost answer rotated
        nothing, so the refusal has another cause."""
        young = self.tokens(refresh_left=40 * 86400)
        assert self.cause(young, ambiguous=True, access=AccessCheck.REJECTED) == "revoked"
        assert self.cause(young, ambiguous=True, access=AccessCheck.NOT_ASKED) == "unknown"

    def test_an_estimated_expiry_leaves_a_rotation_possible(self) -> None:
        """An imported token's expiry is only a guess: an ambiguous attempt may have rotated."""
        guessed = self.tokens(refresh_left=40 * 86400, estimated=True)
        assert self.cause(guessed, ambiguous=True, access=AccessCheck.NOT_ASKED) == "rotated_lost"

    def test_every_cause_has_every_text_with_the_login_command(self) -> None:
        """Each cause renders a log line, reason, alert and fix, all naming the account's
        login command where a person reads it."""
        for cause in ReloginCause:
            texts = render(
                cause, account="bot", login="kakao-tokend --account bot login", expiry=T0
            )
            for language in ("en", "ko"):
                alert, fix = texts.alert.render(language), texts.fix.render(language)
                assert "kakao-tokend --account bot login" in fix, (language, fix)
                assert texts.reason and alert
                assert "{" not in alert + fix, (language, alert, fix)
            assert "kakao-tokend --account bot login" in texts.log
            assert "{" not in texts.log + texts.reason
