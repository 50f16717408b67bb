"""kapi.kakao.com: the bearer check, access_token_info, logout, unlink, user/me and memo send."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .state import AccessTokenRecord, EmulatorState, EmulatorStats


def api_error(stats: EmulatorStats, status: int, code: int, msg: str, **extra: Any) -> web.Response:
    """Return kapi's JSON error ``{"msg","code",...}`` (401s with WWW-Authenticate); count it."""
    stats.errors[str(code)] += 1
    headers = {"WWW-Authenticate": "Bearer error=invalid_token"} if status == 401 else None
    return web.json_response({"msg": msg, "code": code, **extra}, status=status, headers=headers)


class Kapi:
    """The resource APIs a token daemon uses, all behind Kakao's bearer check."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register the kapi paths."""
        router.add_get("/v1/user/access_token_info", self.access_token_info)
        router.add_post("/v1/user/logout", self.logout)
        router.add_post("/v1/user/unlink", self.unlink)
        router.add_get("/v2/user/me", self.user_me)
        router.add_post("/v2/user/me", self.user_me)
        router.add_post("/v2/api/talk/memo/default/send", self.memo)

    def _api_error(self, status: int, code: int, msg: str, **extra: Any) -> web.Response:
        return api_error(self.state.stats, status, code, msg, **extra)

    def _bearer(self, request: web.Request) -> AccessTokenRecord | web.Response:
        """Return the caller's access-token record, or the error Kakao answers instead."""
        state = self.state
        settings = state.settings
        header = request.headers.get("Authorization")
        if header is None:
            return self._api_error(401, -401, "this access token does not exist")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
            return self._api_error(400, -2, "invalid authorization header; expected Bearer token")
        if settings.deactivated:
            return self._api_error(
                401, -401, f"appKey({settings.client_id}) is already deactivated"
            )
        if settings.allowed_ips is not None and request.remote not in settings.allowed_ips:
            return self._api_error(
                401, -401, f"ip mismatched! callerIp={request.remote}. check out registered ips."
            )
        record = state.access_tokens.get(token)
        if record is None:
            return self._api_error(401, -401, "this access token does not exist")
        if record.expires_at <= state.now():
            return self._api_error(401, -401, "this access token is already expired")
        user = state.users[record.user_id]
        if user.dormant:
            return self._api_error(400, -103, "dormant or nonexistent kakao account")
        if user.sanctioned:
            return self._api_error(403, -4, "account is sanctioned")
        return record

    async def access_token_info(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/user/access_token_info: ``{"id","expires_in","app_id"}``, seconds remaining."""
        record = self._bearer(request)
        if isinstance(record, web.Response):
            return record
        remaining = max(0, int(record.expires_at - self.state.now()))
        return web.json_response(
            {"id": record.user_id, "expires_in": remaining, "app_id": self.state.settings.app_id}
        )

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/user/logout: revoke this token set (its login's access and refresh tokens)."""
        record = self._bearer(request)
        if isinstance(record, web.Response):
            return record
        state = self.state
        for table in (state.access_tokens, state.refresh_tokens):
            doomed = [t for t, rec in table.items() if rec.grant_id == record.grant_id]
            for token in doomed:
                del table[token]
        state.stats.logout_log.append(state.now())
        return web.json_response({"id": record.user_id})

    async def unlink(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/user/unlink: revoke every token of the user and the consent."""
        record = self._bearer(request)
        if isinstance(record, web.Response):
            return record
        self.state.unlink_user(record.user_id)
        return web.json_response({"id": record.user_id})

    async def user_me(self, request: web.Request) -> web.StreamResponse:
        """GET|POST /v2/user/me: id, connected_at, a nickname if consented; completes signup."""
        record = self._bearer(request)
        if isinstance(record, web.Response):
            return record
        user = self.state.users[record.user_id]
        user.personal_info_called = True
        connected = datetime.fromtimestamp(user.connected_at or self.state.now(), UTC)
        body: dict[str, Any] = {
            "id": user.id,
            "connected_at": connected.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        }
        if user.scopes & {"profile", "profile_nickname"}:
            body["properties"] = {"nickname": user.name}
            body["kakao_account"] = {
                "profile_nickname_needs_agreement": False,
                "profile": {"nickname": user.name, "is_default_nickname": False},
            }
        return web.json_response(body)

    async def memo(self, request: web.Request) -> web.StreamResponse:
        """POST /v2/api/talk/memo/default/send: check scope and template, deliver to the inbox."""
        record = self._bearer(request)
        if isinstance(record, web.Response):
            return record
        state = self.state
        user = state.users[record.user_id]
        if "talk_message" not in user.scopes:
            return self._api_error(
                403,
                -402,
                "insufficient scopes.",
                api_type="TALK_MEMO_DEFAULT_SEND",
                required_scopes=["talk_message"],
                allowed_scopes=sorted(user.scopes),
            )
        form = await request.post()
        raw = form.get("template_object")
        if not isinstance(raw, str):
            return self._api_error(400, -2, "template_object is required")
        try:
            template = json.loads(raw)
        except ValueError:
            return self._api_error(400, -2, "template_object is not valid JSON")
        problem = self._template_problem(template)
        if problem:
            return self._api_error(400, -2, problem)
        if not user.talk_user:
            return self._api_error(400, -501, "not a kakao talk user")
        state.messages.append(
            {
                "user_id": user.id,
                "at": state.now(),
                "text": template.get("text"),
                "template": template,
            }
        )
        return web.json_response({"result_code": 0})

    def _template_problem(self, template: Any) -> str | None:
        if not isinstance(template, dict):
            return "template_object must be a JSON object"
        if "object_type" not in template:
            return "template_object.object_type is required"
        if template["object_type"] != "text":
            return None  # other template types are accepted without inspection
        text = template.get("text")
        limit = self.state.settings.memo_text_limit
        if not isinstance(text, str) or not text:
            return "template_object.text is required"
        if len(text) > limit:
            return f"template_object.text is longer than {limit} characters"
        if not isinstance(template.get("link"), dict):
            return "template_object.link is required"
        return None
