"""Fixtures of the reliability suite (the shared ones live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.faults import RedisServer


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test only, on a free port: restart it, flush it, kill it."""
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tenant(seeded: dict[str, Any]) -> str:
    return str(seeded["tenants"][0]["external_id"])
