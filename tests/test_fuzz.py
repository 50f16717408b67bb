"""Fuzzing the parsers: config, token files, seed files and Kakao's answers.

Malformed input must end in one of our own errors with a readable message — never a traceback
of another exception type, and never a lost token.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kakao_tokend.config import KakaoApp, config_from_toml_text
from kakao_tokend.errors import ConfigError, KakaoError, StateCorrupt
from kakao_tokend.importer import ImportFileError, read_seed_file
from kakao_tokend.kakao import KakaoClient, create_session
from kakao_tokend.store import AccountStore
from kakao_tokend.tokens import TokenSet

FUZZ = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

# TOML-ish documents built from the real section and key names plus noise, so the fuzzer
# reaches the checks behind the TOML parser instead of failing at its first character.
SECTIONS = ["", "paths", "kakao", "refresh", "publish", "alerts", "api", "accounts.x", "bogus"]
KEYS = [
    "log_level", "default_account", "state_dir", "runtime_dir", "rest_api_key",
    "rest_api_key_file", "rest_api_key_env", "client_secret", "auth_url", "api_url",
    "redirect_uri", "scopes", "timeout", "refresh_at", "jitter", "heartbeat", "retry_initial",
    "retry_max", "rotation_window", "mode", "group", "thresholds", "socket", "tcp", "typo",
]  # fmt: skip
toml_values = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(['"90s"', '"75%"', '"0640"', '"http://127.0.0.1:1"', '"x"', "true", "[]"]),
    st.text(max_size=12).map(json.dumps),
    st.lists(st.text(max_size=5).map(json.dumps), max_size=3).map(lambda v: f"[{', '.join(v)}]"),
)


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    """Draw a TOML-shaped document from known sections and keys, with random values."""
    lines: list[str] = []
    for section in draw(st.lists(st.sampled_from(SECTIONS), max_size=4, unique=True)):
        if section:
            lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True)):
            lines.append(f"{key} = {draw(toml_values)}")
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=30)))  # plain noise
    return "\n".join(lines)


@FUZZ
@given(text=toml_documents())
def test_any_config_text_gives_a_config_or_a_config_error(tmp_path: Path, text: str) -> None:
    """Whatever the file says, loading ends in a Config or a ConfigError, never anything else."""
    try:
        config_from_toml_text(text, source=tmp_path / "config.toml", environ={})
    except ConfigError as exc:
        assert str(exc).strip()
        assert "Traceback" not in str(exc)


@FUZZ
@given(data=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_state_file_bytes_load_or_are_kept_aside(tmp_path: Path, data: bytes) -> None:
    """A damaged state file raises StateCorrupt and its bytes survive in the .corrupt copy."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example
    store = AccountStore.from_paths("default", state_file=directory / "default.state.json")
    store.state_path.write_bytes(data)
    try:
        state = store.load()
    except StateCorrupt as exc:
        assert exc.quarantined is not None and exc.quarantined.read_bytes() == data
        assert not store.state_path.exists()
    else:
        assert state is not None  # only a genuinely valid document loads


@FUZZ
@given(document=json_values)
def test_any_seed_file_imports_or_is_refused_clearly(tmp_path: Path, document: Any) -> None:
    """`import` of any JSON value either parses or raises ImportFileError (exit 65)."""
    path = tmp_path / "kakao_token.json"
    path.write_text(json.dumps(document))
    try:
        seed = read_seed_file(path)
    except ImportFileError as exc:
        assert str(exc).strip()
    else:
        assert seed.refresh_token and seed.access_token


class ScriptedKakao:
    """A loopback server (in its own thread) answering the token endpoint with given bytes."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.content_type = "application/json"
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            status=self.status, body=self.body, headers={"Content-Type": self.content_type}
        )

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> None:
        """Start serving and wait until the port is known."""
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        """Stop the server and its thread."""
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedKakao]:
    """One scripted server for all examples of the module."""
    server = ScriptedKakao()
    server.start()
    yield server
    server.stop()


OLD = TokenSet(
    access_token="OLD-ACCESS-TOKEN-abcdefghijklmnop",
    refresh_token="OLD-REFRESH-TOKEN-abcdefghijklmnop",
    access_expires_at=datetime(2026, 1, 1, 6, tzinfo=UTC),
    refresh_expires_at=datetime(2026, 3, 1, tzinfo=UTC),
    access_issued_at=datetime(2026, 1, 1, tzinfo=UTC),
)


async def _refresh_against(url: str) -> tuple[TokenSet, bool]:
    app = KakaoApp(
        rest_api_key="fuzz-key", client_secret="fuzz-secret", auth_url=url, api_url=url,
        timeout=5, connect_timeout=2,
    )  # fmt: skip
    session = create_session()
    try:
        return await KakaoClient(session, app).refresh(OLD)
    finally:
        await session.close()


kakao_bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"access_token": st.text(max_size=8), "expires_in": json_values},
        optional={
            "refresh_token": json_values,
            "refresh_token_expires_in": json_values,
            "error": st.sampled_from(["invalid_grant", "invalid_client", "server_error", "?"]),
            "error_code": st.sampled_from(["KOE322", "KOE010", "KOE237", "KOE999", ""]),
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80),
    st.just(b"<html><body>502 Bad Gateway</body></html>"),
)


@FUZZ
@given(
    status=st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 429, 500, 502, 503]),
    body=kakao_bodies,
    content_type=st.sampled_from(["application/json", "text/html", "text/plain"]),
)
def test_any_token_endpoint_answer_is_a_result_or_one_of_our_errors(
    scripted: ScriptedKakao, status: int, body: bytes, content_type: str
) -> None:
    """Odd statuses, bodies and content types end in a token set or a KakaoError subclass.

    A refresh that "succeeds" keeps the old refresh token unless a valid new one arrived, and no
    message ever contains either token.
    """
    scripted.status, scripted.body, scripted.content_type = status, body, content_type
    try:
        tokens, rotated = asyncio.run(_refresh_against(scripted.url))
    except KakaoError as exc:
        text = f"{exc} {exc!r}"
        assert OLD.refresh_token not in text and OLD.access_token not in text
    else:
        assert tokens.refresh_token == OLD.refresh_token or rotated
        assert tokens.access_expires_at > OLD.access_issued_at - timedelta(days=1)
