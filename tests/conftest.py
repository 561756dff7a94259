from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on both runtimes; a missing trio fails instead of being skipped."""
    return str(request.param)


# The shared fixtures (servers, backend factories) come from _servers.py, which the root
# conftest.py loads as a plugin for every test folder.
__all__ = ["anyio_backend"]
