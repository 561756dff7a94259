"""Where the tests find database servers, and the backends every test folder makes on them.

A test that needs a server asks for the ``postgres_dsn`` or ``redis_url`` fixture. The
address comes from an environment variable; when it is unset, or the driver is not
installed, the test is skipped with a message saying what to set or install. Under
``COGNITIA_REQUIRE_SERVERS=1`` (as in CI) it fails instead: a CI run must never pass by
skipping.

Each test gets storage of its own on a server: a fresh PostgreSQL schema, dropped after the
test, or a fresh Redis key prefix, whose keys are deleted after it. A
:class:`BackendFactory` opens backend objects over that storage; ``backend_factory`` runs a
test on every kind of backend and ``persistent_backend_factory`` on every kind that survives a
restart. The root ``conftest.py`` loads this module as a plugin, so the core tests and the
integrations' tests share these fixtures.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

from cognitia.session.backends import BackendBase, InMemorySessionBackend, SqliteSessionBackend

__all__ = [
    "REQUIRE_SERVERS",
    "SERVERS",
    "BackendFactory",
    "Stored",
    "backend_factory",
    "memory_backend_factory",
    "offline",
    "persistent_backend_factory",
    "postgres_backend_factory",
    "postgres_dsn",
    "postgres_query",
    "postgres_schemas",
    "redis_backend_factory",
    "redis_client",
    "redis_prefix",
    "redis_url",
    "require_driver",
    "server_address",
    "server_endpoints",
    "sqlite_backend_factory",
    "store_backend",
]

REQUIRE_SERVERS = "COGNITIA_REQUIRE_SERVERS"
POSTGRES_DSN = "COGNITIA_TEST_POSTGRES_DSN"
REDIS_URL = "COGNITIA_TEST_REDIS_URL"

Stored = tuple[str | None, list[str]]
"""A session's state and its turns, as the JSON text the storage holds."""


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
        POSTGRES_DSN,
        "PostgreSQL",
        "postgresql://postgres@127.0.0.1:5432/test",
        driver="psycopg",
        extra="postgres",
    )


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server for tests, from ``COGNITIA_TEST_REDIS_URL``."""
    return server_address(REDIS_URL, "Redis", "redis://127.0.0.1:6379/0", driver="redis", extra="redis")


# -- each test's own storage on a server ---------------------------------------------------------


def postgres_query(dsn: str, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of the test's own (not a backend's)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, args or None)
        return cur.fetchall() if cur.description else []


def _quoted(name: str) -> str:
    return '"{}"'.format(name.replace('"', '""'))


@pytest.fixture
def postgres_schemas(postgres_dsn: str) -> Iterator[Callable[[], str]]:
    """Hands out fresh schema names (not yet created) and drops them after the test."""
    names: list[str] = []

    def new() -> str:
        names.append(f"cognitia_test_{uuid.uuid4().hex[:12]}")
        return names[-1]

    yield new
    for name in names:
        postgres_query(postgres_dsn, f"DROP SCHEMA IF EXISTS {_quoted(name)} CASCADE")


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A plain redis-py client, to look at what a backend stored and to act behind its back."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: Any) -> Iterator[str]:
    """A key prefix no other test uses; every key under it is deleted after the test."""
    prefix = f"cognitia-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        redis_client.delete(*keys)


# -- backend factories ---------------------------------------------------------------------------


class BackendFactory:
    """Opens backend objects over one test's own storage; the fixture closes them all afterwards.

    Each call returns a new object over the same storage, as a restarted process would open
    it; ``memory`` has no storage but the object, so there every call returns the same one
    (``persistent`` is false). ``stored(key)`` reads what the storage holds for ``key``, as
    text, behind the backends' back::

        backend = backend_factory()
        ...
        state, turns = backend_factory.stored("user-1")
        json.loads(state)
    """

    def __init__(
        self, kind: str, open: Callable[[], BackendBase], read: Callable[[str], Stored] | None = None
    ) -> None:
        self.kind = kind
        self.persistent = read is not None
        self._open = open
        self._read = read
        self._opened: list[BackendBase] = []

    def __call__(self) -> BackendBase:
        backend = self._open()
        self._opened.append(backend)
        return backend

    def __repr__(self) -> str:
        return f"BackendFactory({self.kind!r})"

    def stored(self, key: str) -> Stored:
        """The state and turns stored for ``key``, as the JSON text the storage holds."""
        if self._read is None:
            raise TypeError(f"the {self.kind} backend stores nothing outside the process")
        return self._read(key)

    def close(self) -> None:
        for backend in self._opened:
            backend.close()


@pytest.fixture
def memory_backend_factory() -> Iterator[BackendFactory]:
    memory = InMemorySessionBackend()
    factory = BackendFactory("memory", lambda: memory)
    yield factory
    factory.close()


@pytest.fixture
def sqlite_backend_factory(tmp_path: Path) -> Iterator[BackendFactory]:
    path = tmp_path / "sessions.db"

    def read(key: str) -> Stored:
        db = sqlite3.connect(path)
        try:
            state = db.execute("SELECT state FROM cognitia_sessions WHERE key = ?", (key,)).fetchone()
            turns = db.execute("SELECT turn FROM cognitia_turns WHERE key = ? ORDER BY seq", (key,))
            return (state[0] if state else None), [turn for (turn,) in turns]
        finally:
            db.close()

    factory = BackendFactory("sqlite", lambda: SqliteSessionBackend(db_path=path), read)
    yield factory
    factory.close()


@pytest.fixture
def postgres_backend_factory(
    postgres_dsn: str, postgres_schemas: Callable[[], str]
) -> Iterator[BackendFactory]:
    """Backends over one fresh schema (created by the first backend, dropped after the test)."""
    from cognitia.session.backends import PostgresSessionBackend

    name = postgres_schemas()
    schema = _quoted(name)

    def read(key: str) -> Stored:
        # ::text renders jsonb as PostgreSQL stores it, not as the backend decodes it.
        state = postgres_query(
            postgres_dsn, f"SELECT state::text FROM {schema}.cognitia_sessions WHERE key = %s", key
        )
        turns = postgres_query(
            postgres_dsn, f"SELECT turn::text FROM {schema}.cognitia_turns WHERE key = %s ORDER BY seq", key
        )
        return (state[0][0] if state else None), [turn for (turn,) in turns]

    factory = BackendFactory("postgres", lambda: PostgresSessionBackend(postgres_dsn, schema=name), read)
    yield factory
    factory.close()


@pytest.fixture
def redis_backend_factory(redis_url: str, redis_prefix: str, redis_client: Any) -> Iterator[BackendFactory]:
    """Backends over one fresh key prefix (its keys are deleted after the test)."""
    from cognitia.session.backends import RedisSessionBackend

    def read(key: str) -> Stored:
        # The state is field "s" of the session's hash; the turns are its list (see _redis.py).
        state = redis_client.hget(f"{redis_prefix}s:{key}", "s")
        return state, redis_client.lrange(f"{redis_prefix}t:{key}", 0, -1)

    factory = BackendFactory("redis", lambda: RedisSessionBackend(redis_url, key_prefix=redis_prefix), read)
    yield factory
    factory.close()


SERVERS = [  # the server-backed kinds, as parameters marked for the server each needs
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=["memory", "sqlite", *SERVERS])
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """Runs the test on every kind of backend, each over the test's own storage."""
    factory: BackendFactory = request.getfixturevalue(f"{request.param}_backend_factory")
    return factory


@pytest.fixture(params=["sqlite", *SERVERS])
def persistent_backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """Runs the test on every kind of backend whose storage outlives the backend object."""
    factory: BackendFactory = request.getfixturevalue(f"{request.param}_backend_factory")
    return factory


@pytest.fixture
def store_backend(backend_factory: BackendFactory) -> BackendBase:
    """One backend of every kind, over the test's own storage (closed after the test)."""
    return backend_factory()


# -- no network but the test servers -------------------------------------------------------------


@pytest.fixture(scope="session")
def server_endpoints() -> frozenset[tuple[str, int]]:
    """The (host, port) pairs of the configured Redis server, by name and by address.

    Only Redis: psycopg connects through libpq, whose sockets Python never sees.
    """
    url = os.environ.get(REDIS_URL, "").strip()
    parts = urlsplit(url)
    if not url or parts.scheme not in ("redis", "rediss") or parts.hostname is None:
        return frozenset()
    port = parts.port or 6379
    resolved = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
    return frozenset((str(host), port) for host in {parts.hostname, *resolved})


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, server_endpoints: frozenset[tuple[str, int]]) -> None:
    """No test reaches the network: a TCP connection or name lookup fails the test, except for
    the test servers. (Tests of an SDK call their fake API through an in-process transport.)"""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def allowed(host: Any, port: Any) -> bool:
        try:
            return (str(host), int(port)) in server_endpoints
        except (TypeError, ValueError):
            return False

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not allowed(*address[:2]):
            raise RuntimeError(f"network access is forbidden in tests (connect to {address!r})")
        real_connect(sock, address)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not allowed(host, port):
            raise RuntimeError(f"network access is forbidden in tests (lookup of {host!r})")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
