"""Where the tests find database servers, and what happens when one is not configured.

A test that needs a server asks for the ``postgres_dsn`` or ``redis_url`` fixture. The
address comes from an environment variable; when it is unset, or the driver is not
installed, the test is skipped with a message saying what to set or install. Under
``COGNITIA_REQUIRE_SERVERS=1`` (as in CI) it fails instead: a CI run must never pass by
skipping.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NoReturn

import pytest

__all__ = ["REQUIRE_SERVERS", "postgres_dsn", "redis_url", "require_driver", "server_address"]

REQUIRE_SERVERS = "COGNITIA_REQUIRE_SERVERS"


def server_address(variable: str, what: str, example: str, *, driver: str, extra: str) -> str:
    """The value of ``variable``, once ``driver`` is importable too.

    Skips the test if either is missing, or fails it under ``COGNITIA_REQUIRE_SERVERS=1``.
    """
    value = os.environ.get(variable, "").strip()
    if not value:
        _unavailable(f"{what} tests need a server: set {variable}, e.g. {variable}={example}")
    require_driver(driver, extra, what)
    return value


def require_driver(driver: str, extra: str, what: str) -> None:
    """Skip the test if ``driver`` is not installed (fail it under ``COGNITIA_REQUIRE_SERVERS=1``)."""
    if importlib.util.find_spec(driver) is None:
        _unavailable(f"{what} tests need {driver}: pip install 'cognitia-sessions[{extra}]'")


def _unavailable(message: str) -> NoReturn:
    if os.environ.get(REQUIRE_SERVERS) == "1":
        pytest.fail(f"{message} ({REQUIRE_SERVERS}=1 forbids skipping these tests)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The PostgreSQL server for tests, from ``COGNITIA_TEST_POSTGRES_DSN``."""
    return server_address(
        "COGNITIA_TEST_POSTGRES_DSN",
        "PostgreSQL",
        "postgresql://postgres@127.0.0.1:5432/test",
        driver="psycopg",
        extra="postgres",
    )


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server for tests, from ``COGNITIA_TEST_REDIS_URL``."""
    return server_address(
        "COGNITIA_TEST_REDIS_URL", "Redis", "redis://127.0.0.1:6379/0", driver="redis", extra="redis"
    )
