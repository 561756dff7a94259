from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on both runtimes; a missing trio fails instead of being skipped."""
    return str(request.param)


# Test helpers live next to the tests; --import-mode=importlib does not put this directory
# on sys.path, so it is added here for them.
sys.path.insert(0, str(Path(__file__).parent))

from _servers import postgres_dsn, redis_url  # noqa: E402  (fixtures: importing them registers them)

__all__ = ["anyio_backend", "postgres_dsn", "redis_url"]
