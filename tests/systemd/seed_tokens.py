"""Write a blog-script style kakao_token.json from the emulator, for the nspawn test's import."""

# Runs INSIDE the nspawn container with the installed venv's python. It does what the popular
# "send myself a KakaoTalk message" scripts do once by hand: authorize, exchange the code, call
# /v2/user/me, and save Kakao's raw token response (durations only) as kakao_token.json. The
# test then adopts that file with `kakao-tokend import`, exactly as docs/operations.md tells an
# operator migrating from such a script.

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

CLIENT_ID = "emulator-rest-key"
CLIENT_SECRET = "emulator-client-secret"
REDIRECT_URI = "http://127.0.0.1:8765/callback"


async def wait_for(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    """Wait until the emulator answers at all (its unit has no readiness notification)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(f"{url}/_emulator/stats") as response:
                await response.read()
                return
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"seed: the emulator at {url} did not answer in {timeout}s"
                ) from None
            await asyncio.sleep(0.2)


async def fetch_tokens(url: str) -> dict[str, Any]:
    """Return Kakao's raw token response for a fresh login (auto consent) at ``url``."""
    async with aiohttp.ClientSession() as session:
        await wait_for(session, url, 30.0)
        query = {"client_id": CLIENT_ID, "redirect_uri": REDIRECT_URI, "response_type": "code"}
        async with session.get(
            f"{url}/oauth/authorize", params=query, allow_redirects=False
        ) as response:
            location = response.headers["Location"]
        code = parse_qs(urlsplit(location).query)["code"][0]
        form = {
            "grant_type": "authorization_code",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uri": REDIRECT_URI,
            "code": code,
        }
        async with session.post(f"{url}/oauth/token", data=form) as response:
            response.raise_for_status()
            tokens: dict[str, Any] = await response.json()
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
        async with session.get(f"{url}/v2/user/me", headers=headers) as response:
            response.raise_for_status()
    return tokens


def main(argv: list[str]) -> int:
    """``seed_tokens.py EMULATOR_URL OUT_FILE``: write the token response to OUT_FILE."""
    url, out = argv[1], Path(argv[2])
    tokens = asyncio.run(fetch_tokens(url))
    out.write_text(json.dumps(tokens))
    print(f"seed: wrote a kakao_token.json with {len(tokens)} fields to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
