"""The /_emulator/ control API: faults, clock, inbox, stats, users, app, settings and consent."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from aiohttp import web

from .faults import FaultPlan
from .state import EmulatorState


async def _json_body(request: web.Request) -> dict[str, Any]:
    """Return the request's JSON object; an empty, broken or non-object body counts as {}."""
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class ControlApi:
    """HTTP handlers that let an out-of-process test drive and read the emulator."""

    def __init__(self, state: EmulatorState, faults: FaultPlan) -> None:
        self.state = state
        self.faults = faults

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register the /_emulator/ paths."""
        router.add_route("*", "/_emulator/faults", self.faults_endpoint)
        router.add_post("/_emulator/faults/release", self.release_held)
        router.add_route("*", "/_emulator/clock", self.clock)
        router.add_get("/_emulator/inbox", self.inbox)
        router.add_get("/_emulator/stats", self.stats)
        router.add_route("*", "/_emulator/users", self.users)
        router.add_post("/_emulator/users/{user_id}/{action}", self.user_action)
        router.add_route("*", "/_emulator/app", self.app)
        router.add_route("*", "/_emulator/settings", self.settings)
        router.add_post("/_emulator/consent", self.consent)

    def _armed(self) -> list[dict[str, Any]]:
        return [fault.to_dict() for fault in self.faults.armed]

    async def faults_endpoint(self, request: web.Request) -> web.StreamResponse:
        """GET lists the armed faults, POST arms one (201), DELETE disarms all."""
        if request.method == "DELETE":
            self.faults.clear()
            return web.json_response({"faults": []})
        if request.method == "GET":
            return web.json_response({"faults": self._armed()})
        data = await _json_body(request)
        try:
            self.faults.inject(
                str(data.get("endpoint", "*")),
                str(data.get("kind", "")),
                count=int(data["count"]) if data.get("count") is not None else 1,
                rate=float(data["rate"]) if data.get("rate") is not None else None,
                delay=float(data["delay"]) if data.get("delay") is not None else None,
            )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"faults": self._armed()}, status=201)

    async def release_held(self, request: web.Request) -> web.StreamResponse:
        """POST lets every request a ``hold`` fault keeps go on; answers how many were held."""
        held = self.faults.held
        self.faults.release_held()
        return web.json_response({"released": held})

    async def clock(self, request: web.Request) -> web.StreamResponse:
        """GET reads the virtual clock; POST ``{"advance": seconds}`` moves it forward."""
        state = self.state
        if request.method == "POST":
            data = await _json_body(request)
            try:
                state.advance_clock(float(data.get("advance", 0)))
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(
            {
                "now": state.now(),
                "iso": state.now_datetime().isoformat(),
                "offset": state.clock_offset,
            }
        )

    async def inbox(self, request: web.Request) -> web.StreamResponse:
        """GET the delivered "send to me" messages (``?user_id=N`` for one user's)."""
        raw = request.query.get("user_id")
        user_id = int(raw) if raw and raw.isdigit() else None
        return web.json_response({"messages": self.state.inbox(user_id)})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        """GET the counters and the refresh log (fingerprints only, never a token)."""
        return web.json_response(self.state.stats.to_dict())

    async def users(self, request: web.Request) -> web.StreamResponse:
        """GET lists the users; POST creates one (201)."""
        state = self.state
        if request.method == "POST":
            data = await _json_body(request)
            user = state.add_user(
                int(data["id"]) if data.get("id") is not None else None,
                name=data.get("name"),
                talk_user=bool(data.get("talk_user", True)),
                dormant=bool(data.get("dormant", False)),
                sanctioned=bool(data.get("sanctioned", False)),
            )
            return web.json_response(user.to_dict(), status=201)
        return web.json_response({"users": [u.to_dict() for u in state.users.values()]})

    async def user_action(self, request: web.Request) -> web.StreamResponse:
        """POST unlink, revoke, withdraw, delete or flags for one user."""
        state = self.state
        try:
            user = state.user(int(request.match_info["user_id"]))
        except (KeyError, ValueError):
            return web.json_response({"error": "unknown user id"}, status=404)
        action = request.match_info["action"]
        data = await _json_body(request)
        if action == "unlink":
            state.unlink_user(user.id)
        elif action == "revoke":
            state.revoke_user_tokens(user.id)
        elif action == "withdraw":
            state.withdraw_scope(user.id, str(data.get("scope", "talk_message")))
        elif action == "delete":
            state.delete_user(user.id)
        elif action == "flags":
            for name in ("dormant", "sanctioned", "talk_user"):
                if name in data:
                    setattr(user, name, bool(data[name]))
        else:
            return web.json_response(
                {"error": "action must be unlink, revoke, withdraw, delete or flags"}, status=404
            )
        return web.json_response(user.to_dict())

    async def app(self, request: web.Request) -> web.StreamResponse:
        """GET the app's console settings; POST changes secret, activation, URIs, OIDC, IPs."""
        state = self.state
        settings = state.settings
        if request.method == "POST":
            data = await _json_body(request)
            if "client_secret" in data:
                secret = data["client_secret"]
                if secret == "regenerate":
                    state.regenerate_client_secret()
                else:
                    state.set_client_secret(None if secret is None else str(secret))
            if "deactivated" in data:
                state.deactivate_app(bool(data["deactivated"]))
            if "redirect_uris" in data:
                settings.redirect_uris = [str(uri) for uri in data["redirect_uris"]]
            if "oidc" in data:
                settings.oidc = bool(data["oidc"])
            if "allowed_ips" in data:
                ips = data["allowed_ips"]
                settings.allowed_ips = None if ips is None else [str(ip) for ip in ips]
            if "auto_unlink_incomplete_signup" in data:
                settings.auto_unlink_incomplete_signup = bool(data["auto_unlink_incomplete_signup"])
        return web.json_response(
            {
                "client_id": settings.client_id,
                "client_secret": settings.client_secret,
                "app_id": settings.app_id,
                "redirect_uris": settings.redirect_uris,
                "oidc": settings.oidc,
                "deactivated": settings.deactivated,
                "allowed_ips": settings.allowed_ips,
                "auto_unlink_incomplete_signup": settings.auto_unlink_incomplete_signup,
            }
        )

    async def settings(self, request: web.Request) -> web.StreamResponse:
        """GET the settings (without the secret); POST changes lifetimes, window, rates, grace..."""
        settings = self.state.settings
        if request.method == "POST":
            data = await _json_body(request)
            known = {f.name for f in fields(settings)}
            for key, value in data.items():
                if key not in known or key in ("client_secret", "seed"):
                    return web.json_response({"error": f"unknown setting {key!r}"}, status=400)
                current = getattr(settings, key)
                if isinstance(current, tuple):
                    value = (int(value[0]), float(value[1]))
                elif isinstance(current, bool):
                    value = bool(value)
                elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
                    return web.json_response({"error": f"{key} must be a number"}, status=400)
                setattr(settings, key, value)
        snapshot = asdict(settings)
        snapshot.pop("client_secret")
        return web.json_response(snapshot)

    async def consent(self, request: web.Request) -> web.StreamResponse:
        """POST ``{"next": "agree"|"deny"|null}``: what the user does at the next authorize."""
        data = await _json_body(request)
        decision = data.get("next")
        if decision not in ("agree", "deny", None):
            return web.json_response({"error": "next must be 'agree', 'deny' or null"}, status=400)
        self.state.set_next_consent(decision)
        return web.json_response({"next": decision})
