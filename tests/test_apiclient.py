"""The CLI's client for the daemon's socket: a real aiohttp server on a real Unix socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from kakao_tokend.apiclient import DaemonApiError, DaemonNotRunning, call


@pytest.fixture
async def echo_socket(tmp_path: Path) -> AsyncIterator[Path]:
    """An aiohttp server on a Unix socket that answers with what it was sent."""

    async def echo(request: web.Request) -> web.Response:
        form = await request.post()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "form": {k: str(v) for k, v in form.items()},
                "account": request.headers.get("X-Kakao-Account"),
                "host": request.host,
            },
            status=201,
        )

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="not json", status=500)

    app = web.Application()
    app.router.add_get("/plain", plain)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "api.sock"
    await web.UnixSite(runner, str(path)).start()
    yield path
    await runner.cleanup()


async def test_a_request_carries_its_query_form_and_headers_and_returns_the_json(
    echo_socket: Path,
) -> None:
    """Method, path, query string, form body (UTF-8) and headers arrive as sent; the status
    and JSON body come back."""
    status, body = await asyncio.to_thread(
        call,
        echo_socket,
        "POST",
        "/kapi/v2/api/talk/memo/default/send",
        params={"min_valid": "60"},
        data={"template_object": '{"text": "안녕 & bye"}'},
        headers={"X-Kakao-Account": "work"},
    )
    assert status == 201
    assert body == {
        "method": "POST",
        "path": "/kapi/v2/api/talk/memo/default/send",
        "query": {"min_valid": "60"},
        "form": {"template_object": '{"text": "안녕 & bye"}'},
        "account": "work",
        "host": "kakao-tokend",
    }


async def test_an_answer_without_json_is_one_clear_error(echo_socket: Path) -> None:
    """HTTP 500 with a text body: DaemonApiError naming the status, no traceback material."""
    with pytest.raises(DaemonApiError, match="answered HTTP 500 without JSON"):
        await asyncio.to_thread(call, echo_socket, "GET", "/plain")


async def test_nothing_listening_means_not_running_so_the_caller_may_do_the_work(
    tmp_path: Path,
) -> None:
    """No socket file, or a socket nobody accepts on: DaemonNotRunning (nothing was sent)."""
    with pytest.raises(DaemonNotRunning):
        await asyncio.to_thread(call, tmp_path / "missing.sock", "GET", "/v1/status")
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # the file stays, nobody listens: connection refused
    with pytest.raises(DaemonNotRunning):
        await asyncio.to_thread(call, stale, "GET", "/v1/status")


async def test_a_daemon_that_hangs_up_or_stays_silent_is_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    """Accepted, then closed without an answer, or never answered within the timeout:
    DaemonApiError saying the daemon did not answer (one line)."""
    path = tmp_path / "rude.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.close()

    server = await asyncio.start_unix_server(hang_up, path=str(path))
    async with server:
        with pytest.raises(DaemonApiError, match="did not answer GET /v1/status") as caught:
            await asyncio.to_thread(call, path, "GET", "/v1/status")
        assert "\n" not in str(caught.value)
    silent = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(silent))
    listener.listen(1)
    try:
        with pytest.raises(DaemonApiError, match="did not answer GET /v1/status"):
            await asyncio.to_thread(call, silent, "GET", "/v1/status", timeout=0.5)
    finally:
        listener.close()
