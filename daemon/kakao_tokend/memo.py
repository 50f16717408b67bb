"""`kakao-tokend memo`: a KakaoTalk "send to me" text message, and Kakao's refusals in words.

The message goes through the daemon's ``/kapi`` proxy when the daemon runs (it holds the fresh
token and retries once after a -401), or straight to Kakao with a token the CLI refreshed
under the account lock. Both paths end in :func:`refusal`, so a missing consent, a quota or a
dead token reads the same whichever way the message went.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import (
    KakaoConfigError,
    KakaoError,
    KakaoRequestRejected,
    KakaoTokendError,
    KakaoUnavailable,
    ReloginRequired,
    StateMissing,
)
from .kakao import MEMO_PATH, MEMO_TEXT_LIMIT, KakaoClient
from .relogin import Named, cli_command, config_command

__all__ = [
    "MEMO_TEXT_LIMIT",
    "link_problem",
    "refusal",
    "send_direct",
    "send_via_daemon",
    "text_problem",
    "text_template",
]

#: Where the talk_message consent item lives in the Kakao Developers console (Korean menus).
CONSENT_MENU = "내 애플리케이션 › 카카오 로그인 › 동의항목 › 카카오톡 메시지 전송 (talk_message)"

_QUOTAS = {
    -531: "the monthly message quota",
    -532: "the sender's daily message quota",
    -533: "the recipient's daily message quota",
    -534: "a message quota",
    -535: "a message quota",
    -536: "the daily quota between sender and recipient",
}
_QUOTE_LIMIT = 160


def text_problem(text: str) -> str | None:
    """Return why ``text`` cannot be sent as a text template, or None when it can."""
    if not text.strip():
        return "the message is empty"
    if len(text) > MEMO_TEXT_LIMIT:
        return (
            f"the message has {len(text)} characters; KakaoTalk's text message takes at most"
            f" {MEMO_TEXT_LIMIT} (shorten it, or put the rest behind --link)"
        )
    return None


def link_problem(url: str) -> str | None:
    """Return why ``url`` cannot be the message's link, or None when it can."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"--link must be an http:// or https:// address, got {url!r}"
    return None


def text_template(
    text: str, *, link: str | None = None, button_title: str | None = None
) -> dict[str, Any]:
    """Return Kakao's text template object (``link`` is required by Kakao, empty is fine)."""
    template: dict[str, Any] = {
        "object_type": "text",
        "text": text,
        "link": {"web_url": link, "mobile_web_url": link} if link else {},
    }
    if button_title:
        template["button_title"] = button_title
    return template


def _login(account: Named, scope: str | None = None) -> str:
    """The account's login command (relogin.cli_command), asking for ``scope`` if given."""
    return cli_command(account, "login", *(("--scope", scope) if scope else ()))


def refusal(code: int | None, message: str, *, account: Named, status: int) -> KakaoTokendError:
    """Turn Kakao's answer to a refused message into an error that says what to do.

    ``code`` is Kakao's kapi code (``-402`` ...), ``message`` its ``msg`` (or our own text).
    The error's type picks the CLI's exit code: 77 when a person must log in again, 69 for
    a quota or an outage, 78 for an app setting, 1 otherwise.
    """
    quoted = f": {message[:_QUOTE_LIMIT]}" if message else ""
    if code == -402:
        return ReloginRequired(
            f"account '{account.name}' may not send KakaoTalk messages: the user has not agreed to"
            " the talk_message consent item (-402)",
            code="-402",
            hint=f"enable it in Kakao Developers ({CONSENT_MENU}), then log in again asking"
            f" for it: `{_login(account, 'talk_message')}`",
        )
    if code == -401:
        return ReloginRequired(
            f"Kakao rejected account '{account.name}''s access token, even after a refresh (-401)",
            code="-401",
            hint=f"run `{_login(account)}`",
        )
    if code in (-101, -103):
        return ReloginRequired(
            f"Kakao refused the message ({code}): the user is no longer linked to the app"
            " or the Kakao account is dormant",
            code=str(code),
            hint=f"run `{_login(account)}`",
        )
    if code == -501:
        return KakaoRequestRejected(
            f"account '{account.name}' is not a KakaoTalk user, so there is no chat to send to"
            " (-501)",
            code="-501",
        )
    if code in _QUOTAS:
        return KakaoUnavailable(
            f"KakaoTalk refused the message: {_QUOTAS[code]} is used up ({code})",
            code=str(code),
            hint="try again tomorrow",
        )
    if code in (-3, -5, -9, -12, -903):
        return KakaoConfigError(
            f"the Kakao app may not send KakaoTalk messages ({code}){quoted}",
            code=str(code),
            hint="check the app's KakaoTalk message settings in Kakao Developers",
        )
    if code in (-1, -7, -10, -603, -9798) or status >= 500 or status == 429:
        return KakaoUnavailable(
            f"Kakao could not take the message now ({code if code is not None else status})"
            f"{quoted}",
            code=str(code) if code is not None else None,
            status=status,
            hint="try again later",
        )
    shown = code if code is not None else f"HTTP {status}"
    return KakaoRequestRejected(f"Kakao refused the message ({shown}){quoted}", status=status)


async def send_direct(
    client: KakaoClient, access_token: str, template: Mapping[str, Any], *, account: Named
) -> None:
    """Send straight to Kakao; a rejected token is re-raised for the caller to refresh once.

    Raises :class:`kakao_tokend.kakao.AccessTokenRejected` on -401 (refresh, then call again)
    and :func:`refusal`'s errors for every other refusal.
    """
    from .kakao import AccessTokenRejected

    try:
        await client.send_template(access_token, template)
    except AccessTokenRejected:
        raise
    except KakaoConfigError as exc:
        if exc.code == "-401":  # "ip mismatched", "appKey deactivated": the message says it
            raise
        raise refusal(_int(exc.code), "", account=account, status=exc.status or 400) from None
    except (KakaoRequestRejected, ReloginRequired) as exc:
        code = _int(exc.code)
        raise refusal(code, "", account=account, status=exc.status or 400) from None
    except KakaoUnavailable as exc:
        code = _int(exc.code)
        if code in _QUOTAS:
            raise refusal(code, "", account=account, status=exc.status or 400) from None
        raise


def send_via_daemon(
    socket: Path, template: Mapping[str, Any], *, account: Named, timeout: float = 60.0
) -> None:
    """Send through the daemon's /kapi proxy (it holds the token and retries after a -401).

    Raises :class:`kakao_tokend.apiclient.DaemonNotRunning` when nothing answers on the socket
    (nothing was sent: the caller may send directly).
    """
    from .apiclient import call

    status, body = call(
        socket,
        "POST",
        "/kapi" + MEMO_PATH,
        data={"template_object": json.dumps(template, ensure_ascii=False)},
        headers={"X-Kakao-Account": account.name},
        timeout=timeout,
    )
    if status == 200 and _int(body.get("result_code")) in (None, 0):
        return
    if "error" in body and "code" not in body:  # the daemon's own answer, not Kakao's
        raise _daemon_refusal(status, str(body["error"]), account=account)
    if status == 200:
        raise KakaoRequestRejected(
            f"Kakao did not deliver the message (result_code {body.get('result_code')})"
        )
    raise refusal(
        _int(body.get("code")), str(body.get("msg") or ""), account=account, status=status
    )


def _daemon_refusal(status: int, message: str, *, account: Named) -> KakaoError | StateMissing:
    if status == 409:
        return StateMissing(message, hint=f"run `{_login(account)}`")
    if status == 404:
        return KakaoRequestRejected(
            f"the running daemon does not serve account '{account.name}' ({message})",
            hint="if the account was added to the config after the daemon started, run"
            f" `{config_command(account, 'reload')}`",
        )
    return KakaoUnavailable(
        f"the daemon could not pass the message on ({status}: {message})", hint="try again later"
    )


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None
