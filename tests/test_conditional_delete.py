"""delete(expected_version=...) and stale versions on sessions past their TTL, on every backend kind.

The conformance kit checks conditional deletes of live and missing sessions, and that a
deleted session's versions never match the session created again under its key; it cannot
move a backend's clock, so expiry is checked here, with a clock the test moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _servers import SERVERS, BackendFactory

from cognitia import VersionConflictError
from cognitia.session.backends import BackendBase, InMemorySessionBackend, SqliteSessionBackend

pytestmark = pytest.mark.anyio

TTL = 60.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "sqlite", *SERVERS])
def expiring(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[BackendFactory]:
    """Backends of each kind over one storage, with a TTL of ``TTL`` seconds on the test's clock."""
    kind = request.param
    if kind == "memory":
        memory = InMemorySessionBackend(ttl=TTL, clock=clock)
        factory = BackendFactory(kind, lambda: memory)
    elif kind == "sqlite":
        path = tmp_path / "ttl.db"
        factory = BackendFactory(kind, lambda: SqliteSessionBackend(db_path=path, ttl=TTL, clock=clock))
    elif kind == "postgres":
        from cognitia.session.backends import PostgresSessionBackend

        dsn: str = request.getfixturevalue("postgres_dsn")
        schema: str = request.getfixturevalue("postgres_schemas")()
        factory = BackendFactory(
            kind, lambda: PostgresSessionBackend(dsn, schema=schema, ttl=TTL, clock=clock)
        )
    else:
        from cognitia.session.backends import RedisSessionBackend

        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        # The server drops the keys TTL seconds of real time after a write; moving the
        # test's clock past the TTL makes the backend's own check see the session expired
        # while the server still holds it.
        factory = BackendFactory(
            kind, lambda: RedisSessionBackend(url, key_prefix=prefix, ttl=TTL, clock=clock)
        )
    yield factory
    factory.close()


async def test_a_conditional_delete_of_an_expired_session_conflicts_and_deletes_nothing(
    expiring: BackendFactory, clock: Clock
) -> None:
    backend = expiring()
    assert await backend.commit("agent:old", {"n": 1}, turns=[{"t": 0}]) == 1
    clock.now += TTL + 1

    with pytest.raises(VersionConflictError) as caught:
        await backend.delete("agent:old", expected_version=1)
    assert (caught.value.key, caught.value.expected, caught.value.actual) == ("agent:old", 1, None)
    assert "agent:old" in str(caught.value)
    # Nothing was deleted: the expired session is still there for prune to find.
    assert await backend.prune(dry_run=True) == ["agent:old"]
    # An unconditional delete removes it, and reports that nothing live was there.
    assert await backend.delete("agent:old") is False
    assert await backend.prune(dry_run=True) == []


async def test_a_conditional_delete_before_expiry_deletes(expiring: BackendFactory, clock: Clock) -> None:
    backend = expiring()
    await backend.commit("agent:young", {"n": 1}, turns=[{"t": 0}])
    await backend.commit("agent:young", {"n": 2}, expected_version=1)
    clock.now += TTL - 1
    assert await backend.delete("agent:young", expected_version=2) is True
    assert await backend.load_record("agent:young") is None
    assert await backend.prune(dry_run=True) == []
    # A new session under the key starts over, above the deleted version, with an empty turn log.
    assert await backend.commit("agent:young", {"n": 3}, expected_version=0) == 3
    assert await backend.load_turns("agent:young") == []


async def test_a_stale_version_of_a_session_created_again_over_an_expired_one_conflicts(
    expiring: BackendFactory, clock: Clock
) -> None:
    """A worker holding the expired session's version cannot delete the session that replaced it."""
    first, second = expiring(), expiring()
    await first.commit("agent:k", {"gen": 1})
    await first.commit("agent:k", {"gen": 1}, expected_version=1)
    clock.now += TTL + 1
    await second.commit("agent:k", {"gen": 2}, expected_version=0)
    current = await second.load_record("agent:k")
    assert current is not None
    with pytest.raises(VersionConflictError) as caught:
        await first.delete("agent:k", expected_version=2)
    assert caught.value.actual == current.version != 2
    assert await second.load("agent:k") == {"gen": 2}
    assert await first.delete("agent:k", expected_version=current.version) is True
    assert await second.load("agent:k") is None


async def _commit_until(backend: BackendBase, key: str, version: int) -> int:
    """Create ``key`` again and commit until it reached ``version``; return the version it has."""
    current = await backend.commit(key, {"life": "new"}, expected_version=0, turns=[{"new": 0}])
    while current < version:
        current = await backend.commit(key, {"life": "new"}, expected_version=current)
    return current


async def _expect_stale_refused(backend: BackendBase, key: str, stale: int, current: int) -> None:
    with pytest.raises(VersionConflictError) as caught:
        await backend.commit(key, {"life": "stale"}, expected_version=stale, turns=[{"stale": True}])
    assert (caught.value.expected, caught.value.actual) == (stale, current)
    with pytest.raises(VersionConflictError) as caught:
        await backend.delete(key, expected_version=stale)
    assert (caught.value.expected, caught.value.actual) == (stale, current)
    record = await backend.load_record(key)
    assert record is not None and (record.state, record.version) == ({"life": "new"}, current)
    assert await backend.load_turns(key) == [{"new": 0}]


@pytest.mark.parametrize("removal", ["prune", "delete"])
async def test_a_version_of_an_expired_and_removed_session_never_matches_the_next_one(
    expiring: BackendFactory, clock: Clock, removal: str
) -> None:
    """A worker that read version 3 before the session expired and was pruned (or deleted)
    cannot write over, or delete, the session created later under the key at any version."""
    first, second = expiring(), expiring()
    for i in range(3):
        stale = await first.commit("agent:k", {"life": "old", "i": i}, turns=[{"old": i}])
    clock.now += TTL + 1
    if removal == "prune":
        assert await first.prune() == ["agent:k"]
    else:
        assert await first.delete("agent:k") is False  # expired: nothing live was deleted
    current = await _commit_until(second, "agent:k", stale)
    await _expect_stale_refused(first, "agent:k", stale, current)
    assert current > stale  # the new session started above the old one's versions
