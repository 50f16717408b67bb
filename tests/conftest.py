"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kakao_tokend.emulator import EmulatorSettings, KakaoEmulator, running_emulator
from pgcluster import pg_cluster, pg_dsn, pg_server

__all__ = ["pg_cluster", "pg_dsn", "pg_server"]  # PostgreSQL fixtures, see pgcluster.py


@pytest.fixture
async def emulator() -> AsyncIterator[KakaoEmulator]:
    """Run a Kakao emulator on 127.0.0.1:0 with rate limits high enough for fast tests.

    Change ``emulator.settings`` (lifetimes, window, rates, consent ...) inside a test as needed;
    the emulator reads them on every request.
    """
    settings = EmulatorSettings(access_rate=(10_000, 600), refresh_rate=(10_000, 3600))
    async with running_emulator(settings) as emu:
        yield emu
