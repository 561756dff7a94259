"""RedisSessionBackend against a real Redis server (``COGNITIA_TEST_REDIS_URL``), on asyncio and trio."""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

import anyio
import pytest

from cognitia.errors import BackendClosedError, MissingDependencyError, StorageError, VersionConflictError
from cognitia.session.backends import Write
from cognitia.testing import ConformanceRule, conformance_rules

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def make(url: str, prefix: str, **options: Any) -> Any:
    from cognitia.session.backends import RedisSessionBackend

    return RedisSessionBackend(url, key_prefix=prefix, **options)


@pytest.mark.parametrize("rule", conformance_rules(), ids=str)
async def test_conformance(rule: ConformanceRule, redis_url: str, redis_prefix: str) -> None:
    assert await rule.check(lambda: make(redis_url, redis_prefix))


async def test_a_killed_connection_is_reopened(redis_url: str, redis_prefix: str, redis_client: Any) -> None:
    async with make(redis_url, redis_prefix) as backend:
        await backend.commit("agent:k", {"n": 1}, turns=[{"i": 0}])
        ids_before = {c["id"] for c in redis_client.client_list() if c["name"] == "cognitia"}
        killed = redis_client.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1 and ids_before
        # The backend's idle connections are dead now; the next operations must work again.
        assert await backend.load("agent:k") == {"n": 1}
        assert await backend.commit("agent:k", {"n": 2}, expected_version=1, turns=[{"i": 1}]) == 2
        assert await backend.load_turns("agent:k") == [{"i": 0}, {"i": 1}]
        ids_after = {c["id"] for c in redis_client.client_list() if c["name"] == "cognitia"}
        assert ids_after and not ids_after & ids_before


async def test_an_unreachable_server_is_a_storage_error() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    async with make("redis://127.0.0.1:1/0", "x:", timeout=0.5, retries=1) as backend:
        with pytest.raises(StorageError, match="redis backend failed to load session 'agent:x'") as info:
            await backend.load("agent:x")
        assert info.value.__cause__ is not None
        with pytest.raises(StorageError):
            await backend.save("agent:x", {})


async def test_expiry_is_server_side_and_prune_cleans_the_index(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    async with make(redis_url, redis_prefix, ttl=1.0) as backend:
        await backend.commit("agent:short", {"n": 1}, turns=[{"i": 0}])
        await backend.commit("agent:other", {"n": 1})
        record = await backend.load_record("agent:short")
        assert record is not None and record.expires_at is not None
        assert 0 < redis_client.pttl(f"{redis_prefix}s:agent:short") <= 1000
        assert 0 < redis_client.pttl(f"{redis_prefix}t:agent:short") <= 1000
        assert await backend.list_keys() == ["agent:other", "agent:short"]

        # "agent:short" is 1.1 s old when looked at; "agent:other", renewed halfway, only
        # 0.55 s, which leaves a slow machine 0.45 s to finish the checks below.
        await backend.save("agent:other", {"n": 2})  # a save renews the expiry
        await anyio.sleep(0.55)
        await backend.save("agent:other", {"n": 3})
        await anyio.sleep(0.55)

        assert redis_client.exists(f"{redis_prefix}s:agent:short", f"{redis_prefix}t:agent:short") == 0, (
            "Redis did not expire it"
        )
        assert await backend.load("agent:short") is None
        assert await backend.load_turns("agent:short") == []
        assert await backend.list_keys() == ["agent:other"]
        assert await backend.load("agent:other") == {"n": 3}

        assert await backend.prune(dry_run=True) == ["agent:short"]
        assert redis_client.zscore(f"{redis_prefix}index", "agent:short") is not None, (
            "a dry run must not delete"
        )
        assert await backend.prune() == ["agent:short"]
        assert redis_client.zscore(f"{redis_prefix}index", "agent:short") is None
        assert redis_client.zscore(f"{redis_prefix}expiry", "agent:short") is None
        assert await backend.prune() == []

        # A new session under an expired key starts afresh, above the pruned session's version.
        assert await backend.commit("agent:short", {"again": True}, expected_version=0) == 2
        assert await backend.load_turns("agent:short") == []


async def test_without_ttl_keys_do_not_expire(redis_url: str, redis_prefix: str, redis_client: Any) -> None:
    async with make(redis_url, redis_prefix, ttl=5) as backend:
        await backend.commit("agent:p", {}, turns=[{"i": 0}])
    async with make(redis_url, redis_prefix) as backend:
        await backend.save("agent:p", {"kept": True})
    assert (
        redis_client.pttl(f"{redis_prefix}s:agent:p") == -1
        and redis_client.pttl(f"{redis_prefix}t:agent:p") == -1
    )
    assert redis_client.zscore(f"{redis_prefix}expiry", "agent:p") is None


async def test_a_restored_session_expires_at_its_own_deadline_whatever_the_ttl(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    """What ``cognitia import`` writes: a session's own deadline (or none), in the record and
    as the Redis keys' expiry, on a backend with or without a ttl."""
    for ttl in (None, 5.0):
        async with make(redis_url, redis_prefix, ttl=ttl) as backend:
            deadline = time.time() + 1_000
            await backend._restore("agent:kept", {"n": 1}, [{"i": 0}], expected_version=None, expires_at=None)
            await backend._restore(
                "agent:due", {"n": 2}, [{"i": 0}], expected_version=None, expires_at=deadline
            )
            kept, due = await backend.load_record("agent:kept"), await backend.load_record("agent:due")
            assert kept is not None and kept.expires_at is None
            assert due is not None and due.expires_at == deadline
        assert redis_client.pttl(f"{redis_prefix}s:agent:kept") == -1
        assert redis_client.zscore(f"{redis_prefix}expiry", "agent:kept") is None
        assert 990_000 < redis_client.pttl(f"{redis_prefix}s:agent:due") <= 1_000_000
        assert 990_000 < redis_client.pttl(f"{redis_prefix}t:agent:due") <= 1_000_000


async def test_key_prefix_isolates_backends(redis_url: str, redis_prefix: str, redis_client: Any) -> None:
    other = redis_prefix + "other:"
    try:
        async with make(redis_url, redis_prefix) as first, make(redis_url, other) as second:
            await first.commit("agent:same", {"who": "first"}, turns=[{"i": 1}])
            await second.commit("agent:same", {"who": "second"})
            assert await first.load("agent:same") == {"who": "first"}
            assert await second.load("agent:same") == {"who": "second"}
            assert await second.load_turns("agent:same") == []
            assert await first.list_keys() == ["agent:same"] == await second.list_keys()
            assert await first.delete("agent:same")
            assert await second.load("agent:same") == {"who": "second"}
        stored = sorted(redis_client.scan_iter(match=f"{redis_prefix}*", count=1000))
        # first's index went away with its last member (Redis drops empty sorted sets); what
        # stays is the highest version it deleted, and each backend's latest write tokens.
        assert stored == sorted(
            [
                f"{other}index",
                f"{other}s:agent:same",
                f"{other}w:agent:same",
                f"{redis_prefix}removed",
                f"{redis_prefix}w:agent:same",
            ]
        ), "every Redis key must live under its backend's key_prefix"
    finally:
        keys = list(redis_client.scan_iter(match=other + "*", count=1000))
        if keys:
            redis_client.delete(*keys)


async def test_a_conflicting_commit_leaves_state_and_turns_untouched(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    async with make(redis_url, redis_prefix) as backend:
        await backend.commit("agent:a", {"n": 1}, turns=[{"i": 0}, {"i": 1}])
        await backend.commit("agent:a", {"n": 2}, expected_version=1, turns=[{"i": 2}])
        stored_before = redis_client.hgetall(f"{redis_prefix}s:agent:a")
        with pytest.raises(VersionConflictError) as info:
            await backend.commit(
                "agent:a", {"n": "lost"}, expected_version=1, turns=[{"i": "lost"}], truncate=0
            )
        assert (info.value.expected, info.value.actual) == (1, 2)
        assert redis_client.hgetall(f"{redis_prefix}s:agent:a") == stored_before
        assert redis_client.lrange(f"{redis_prefix}t:agent:a", 0, -1) == ['{"i":0}', '{"i":1}', '{"i":2}']
        record = await backend.load_record("agent:a")
        assert record is not None and (record.state, record.version, record.turn_count) == ({"n": 2}, 2, 3)


async def test_a_resent_commit_is_applied_once(redis_url: str, redis_prefix: str, redis_client: Any) -> None:
    """What redis-py does after a connection drops between the server's work and its reply."""
    import redis

    from cognitia.session.backends._redis import _Commands, _execute

    commands = _Commands(redis_prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        args = ("agent:r", "{}", None, ['{"i":0}'], None, 1.0, None, None, "same-token")
        assert _execute(client, commands.commit, *args) == 1
        assert _execute(client, commands.commit, *args) == 1
        assert redis_client.llen(f"{redis_prefix}t:agent:r") == 1
        assert _execute(client, commands.commit, *args[:-1], "next-token") == 2
        assert redis_client.llen(f"{redis_prefix}t:agent:r") == 2
        # Other writers' commits may land between the lost reply and the resend.
        for i in range(3, 10):
            assert _execute(client, commands.commit, *args[:-1], f"other-{i}") == i
        assert _execute(client, commands.commit, *args) == 1
        assert _execute(client, commands.commit, *args[:-1], "next-token") == 2
        assert redis_client.llen(f"{redis_prefix}t:agent:r") == 9
        # A conditional commit resent after others landed is not a conflict either.
        checked = ("agent:r", "{}", 9, ['{"i":9}'], None, 1.0, None, None, "checked")
        assert _execute(client, commands.commit, *checked) == 10
        assert _execute(client, commands.commit, *args[:-1], "other-11") == 11
        assert _execute(client, commands.commit, *checked) == 10
        assert redis_client.llen(f"{redis_prefix}t:agent:r") == 11
        # Only the latest tokens are kept, for a while.
        assert 0 < redis_client.pttl(f"{redis_prefix}w:agent:r") <= 60_000
        for i in range(12, 100):
            _execute(client, commands.commit, *args[:-1], f"other-{i}")
        assert redis_client.zcard(f"{redis_prefix}w:agent:r") == 64
    finally:
        client.close()


async def test_a_resent_commit_many_is_applied_once(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    """A commit of several sessions resent after a lost reply returns the versions it wrote,
    even after other writes to its sessions landed, and writes nothing again."""
    import redis

    from cognitia.session.backends._base import EncodedWrite
    from cognitia.session.backends._redis import _Commands, _execute

    commands = _Commands(redis_prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        b: tuple[Any, ...] = ("agent:b", "{}", None, ['{"i":0}'], None, 1.0, None, None)
        assert _execute(client, commands.commit, *b, "b-first") == 1
        writes = [
            EncodedWrite("agent:a", '{"n":1}', 0, ['{"a":0}']),
            EncodedWrite("agent:b", '{"n":2}', 1, ['{"i":1}'], 0),
        ]
        many = (writes, 1.0, None, None, "same-token")
        assert _execute(client, commands.commit_many, *many) == [1, 2]
        assert _execute(client, commands.commit_many, *many) == [1, 2]
        assert _execute(client, commands.commit, *b, "another-worker") == 3
        assert _execute(client, commands.commit_many, *many) == [1, 2]  # resent: not a conflict
        assert redis_client.lrange(f"{redis_prefix}t:agent:a", 0, -1) == ['{"a":0}']
        assert redis_client.lrange(f"{redis_prefix}t:agent:b", 0, -1) == ['{"i":1}', '{"i":0}']
        assert redis_client.hget(f"{redis_prefix}s:agent:a", "v") == "1"
        assert redis_client.hget(f"{redis_prefix}s:agent:b", "v") == "3"
        with pytest.raises(VersionConflictError) as info:  # a new commit_many is checked again
            _execute(client, commands.commit_many, writes, 1.0, None, None, "next-token")
        assert (info.value.key, info.value.expected, info.value.actual) == ("agent:a", 0, 1)
        # Once the token is gone from one of its sessions (more writes to it than are kept), the
        # resend still writes nothing: the versions it wrote are unknown, which is an error.
        for i in range(64):
            _execute(client, commands.commit, *b, f"other-{i}")
        with pytest.raises(redis.ResponseError, match="resent too late"):
            _execute(client, commands.commit_many, *many)
        assert redis_client.llen(f"{redis_prefix}t:agent:a") == 1
        assert redis_client.hget(f"{redis_prefix}s:agent:a", "v") == "1"
    finally:
        client.close()


async def test_a_resent_conditional_delete_is_applied_once(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    """A conditional delete resent after a lost reply reports success, and never deletes the
    session another worker created under the key in between."""
    import redis

    from cognitia.session.backends._redis import _Commands, _execute

    commands = _Commands(redis_prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        created: tuple[Any, ...] = ("agent:r", "{}", None, [], None, 1.0, None, None)
        assert _execute(client, commands.commit, *created, "first") == 1
        delete = ("agent:r", 1.0, 1, "same-token")
        assert _execute(client, commands.delete, *delete) is True
        assert _execute(client, commands.commit, *created, "another-worker") == 2
        assert _execute(client, commands.delete, *delete) is True  # the resend: already applied
        assert redis_client.hget(f"{redis_prefix}s:agent:r", "v") == "2"
        with pytest.raises(VersionConflictError):  # a new delete is checked again
            _execute(client, commands.delete, "agent:r", 1.0, 1, "next-token")
        assert 0 < redis_client.pttl(f"{redis_prefix}w:agent:r") <= 60_000
    finally:
        client.close()


async def test_a_resent_delete_is_applied_once(redis_url: str, redis_prefix: str, redis_client: Any) -> None:
    """A plain delete resent after a lost reply (a pipeline is resent whole, say behind a
    create of the same key) reports what it did the first time, and never deletes the
    session created under the key in between."""
    import redis

    from cognitia.session.backends._redis import _Commands, _execute

    commands = _Commands(redis_prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        created: tuple[Any, ...] = ("agent:d", "{}", 0, [], None, 1.0, None, None)
        assert _execute(client, commands.commit, *created, "first") == 1
        delete = ("agent:d", 1.0, None, "delete-token")
        assert _execute(client, commands.delete, *delete) is True
        assert _execute(client, commands.commit, *created, "create-again") == 2
        assert _execute(client, commands.delete, *delete) is True  # the resend: already applied
        assert redis_client.hget(f"{redis_prefix}s:agent:d", "v") == "2"
        missing = ("agent:none", 1.0, None, "missing-token")
        assert _execute(client, commands.delete, *missing) is False
        assert _execute(client, commands.delete, *missing) is False  # resent: same answer
    finally:
        client.close()


async def test_a_flushed_script_cache_is_reloaded(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    async with make(redis_url, redis_prefix) as backend:
        await backend.save("agent:s", {"n": 1})
        redis_client.script_flush()
        assert await backend.commit("agent:s", {"n": 2}, expected_version=1) == 2
        redis_client.script_flush()
        async with anyio.create_task_group() as tg:  # several at once: the pipelined path
            for i in range(20):
                tg.start_soon(backend.save, f"agent:s{i}", {"i": i})
        assert len(await backend.list_keys("agent:s")) == 21
        redis_client.script_flush()
        async with anyio.create_task_group() as tg:
            for i in range(10):
                writes = [Write(f"agent:m{i}", {"i": i}), Write(f"agent:s{i}", {"i": i}, expected_version=1)]
                tg.start_soon(backend.commit_many, writes)
        records = [await backend.load_record(f"agent:{k}{i}") for i in range(10) for k in "ms"]
        assert [record and record.version for record in records] == [1, 2] * 10


async def test_listing_uses_the_index_not_keys(redis_url: str, redis_prefix: str, redis_client: Any) -> None:
    async with make(redis_url, redis_prefix) as backend:
        for i in range(30):
            await backend.save(f"agent:{i:02d}", {})
        before = redis_client.info("commandstats").get("cmdstat_keys", {}).get("calls", 0)
        assert await backend.list_keys("agent:1") == [f"agent:{i}" for i in range(10, 20)]
        assert len(await backend.list_keys()) == 30
        assert redis_client.info("commandstats").get("cmdstat_keys", {}).get("calls", 0) == before


async def test_a_closed_backend_refuses_operations(redis_url: str, redis_prefix: str) -> None:
    backend = make(redis_url, redis_prefix)
    await backend.save("agent:c", {})
    await backend.aclose()
    await backend.aclose()
    backend.close()
    assert backend.closed and "closed" in repr(backend)
    with pytest.raises(BackendClosedError, match="redis backend is closed"):
        await backend.load("agent:c")
    with pytest.raises(BackendClosedError):
        await backend.save("agent:c", {})


def test_sync_close_and_repr_hide_the_password() -> None:
    backend = make("redis://user:secret@127.0.0.1:1/0", "x:")
    assert "secret" not in repr(backend) and "***" in repr(backend)
    backend.close()
    backend.close()


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        make("redis://127.0.0.1:1/0", "x:", max_connections=0)
    for bad in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            make("redis://127.0.0.1:1/0", "x:", timeout=bad)
    with pytest.raises(ValueError, match="ttl"):
        make("redis://127.0.0.1:1/0", "x:", ttl=-1)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "cognitia.session.backends._redis", raising=False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'cognitia-sessions\[redis\]'"):
        importlib.import_module("cognitia.session.backends._redis")
    monkeypatch.undo()
    importlib.import_module("cognitia.session.backends._redis")


@pytest.mark.parametrize("pruned", [False, True], ids=["not-pruned", "pruned"])
async def test_a_session_gone_through_redis_expiry_keeps_its_versions_from_the_next_one(
    redis_url: str, redis_prefix: str, redis_client: Any, pruned: bool
) -> None:
    """Redis drops an expired session's keys with no script running; the session created again
    under the key still starts above its version, so a stale expected_version cannot match."""
    now = 1_000.0
    async with make(redis_url, redis_prefix, ttl=60, clock=lambda: now) as backend:
        for i in range(3):
            stale = await backend.commit("agent:k", {"life": "old"}, turns=[{"old": i}])
        now += 61
        # Let Redis' own expiry remove the session's keys now rather than in a minute.
        keys = (f"{redis_prefix}s:agent:k", f"{redis_prefix}t:agent:k")
        for key in keys:
            redis_client.pexpire(key, 1)
        for _ in range(500):  # Redis checks an expiry when a key is read
            if not redis_client.exists(*keys):
                break
            await anyio.sleep(0.01)
        assert not redis_client.exists(*keys), "Redis did not expire the session"
        if pruned:
            assert await backend.prune() == ["agent:k"]

        version = await backend.commit("agent:k", {"life": "new"}, expected_version=0)
        while version < stale:  # a new life numbered from 1 again would now collide with `stale`
            version = await backend.commit("agent:k", {"life": "new"}, expected_version=version)
        with pytest.raises(VersionConflictError) as caught:
            await backend.commit("agent:k", {"life": "stale"}, expected_version=stale)
        assert caught.value.actual == version
        with pytest.raises(VersionConflictError):
            await backend.delete("agent:k", expected_version=stale)
        assert await backend.load("agent:k") == {"life": "new"}
        assert version > stale  # the new session started above the expired one's versions
        # Deleted, nothing of the session stays behind but the highest removed version, and
        # for a minute the tokens of its latest writes (a resent write is still recognised).
        assert await backend.delete("agent:k") is True
        left = sorted(redis_client.scan_iter(match=f"{redis_prefix}*", count=1000))
        assert left == [f"{redis_prefix}removed", f"{redis_prefix}w:agent:k"]
        assert 0 < redis_client.pttl(f"{redis_prefix}w:agent:k") <= 60_000
        assert redis_client.get(f"{redis_prefix}removed") == str(version)
