"""Edges where the four backends must behave alike: pruning while sessions are saved again,
prefixes no key can start with, keys at the byte limit, non-string dict keys, very deep
states, and closing a backend through a cancellation."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _nesting import deep, deepest_storable
from _servers import SERVERS, postgres_query

from cognitia import InvalidKeyError, StateNotSerializableError
from cognitia._json import MAX_KEY_BYTES, dumps
from cognitia.session.backends import BackendBase, InMemorySessionBackend, SqliteSessionBackend

pytestmark = pytest.mark.anyio

Make = Callable[..., BackendBase]


@pytest.fixture(params=["memory", "sqlite", *SERVERS])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    """Opens a backend of each kind with the given options (a TTL, a clock) over the test's
    own storage, and closes it after the test."""
    kind = request.param
    opened: list[BackendBase] = []

    def make(**options: Any) -> BackendBase:
        backend: BackendBase
        if kind == "memory":
            backend = InMemorySessionBackend(**options)
        elif kind == "sqlite":
            backend = SqliteSessionBackend(tmp_path / "sessions.db", **options)
        elif kind == "postgres":
            from cognitia.session.backends import PostgresSessionBackend

            schema = request.getfixturevalue("postgres_schemas")()
            backend = PostgresSessionBackend(
                request.getfixturevalue("postgres_dsn"), schema=schema, **options
            )
        else:
            from cognitia.session.backends import RedisSessionBackend

            prefix = request.getfixturevalue("redis_prefix")
            backend = RedisSessionBackend(request.getfixturevalue("redis_url"), key_prefix=prefix, **options)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


async def _from_a_deeper_stack(frames: int, operation: Callable[[], Any]) -> Any:
    """``await operation()`` called ``frames`` coroutine frames below this one."""
    if frames == 0:
        return await operation()
    return await _from_a_deeper_stack(frames - 1, operation)


async def test_a_prune_never_removes_a_session_saved_again_while_it_runs(make_backend: Make) -> None:
    now = [1000.0]
    backend = make_backend(ttl=60, clock=lambda: now[0])
    keys = [f"agent:{i:02}" for i in range(20)]
    for key in keys:
        await backend.commit(key, {"life": 1}, turns=[{"turn": 1}])
    await backend.save("agent:left", {"life": 1})
    now[0] += 61  # every session has expired

    pruned: list[str] = []

    async def prune() -> None:
        pruned.extend(await backend.prune())

    async def save_again(delay: int, key: str) -> None:
        for _ in range(delay):
            await anyio.lowlevel.checkpoint()
        await backend.commit(key, {"life": 2}, turns=[{"turn": 2}])

    async with anyio.create_task_group() as tg:
        tg.start_soon(prune)
        # The keys the prune reaches last are saved again first, while it is under way.
        for delay, key in enumerate(reversed(keys)):
            tg.start_soon(save_again, delay, key)

    for key in keys:
        assert await backend.load(key) == {"life": 2}, key
        assert await backend.load_turns(key) == [{"turn": 2}], key
    assert "agent:left" in pruned
    assert await backend.list_keys() == keys


@pytest.mark.parametrize("prefix", ["agent\x00", "agent:\ud800", "\udfff"], ids=["nul", "surrogate", "alone"])
async def test_a_prefix_no_key_can_start_with_lists_nothing(store_backend: BackendBase, prefix: str) -> None:
    """Keys hold neither NUL nor a lone surrogate, so no key starts with such a prefix."""
    await store_backend.save("agent:1", {})
    assert await store_backend.list_keys(prefix) == []
    assert await store_backend.list_keys("agent:") == ["agent:1"]


async def test_keys_are_limited_by_their_utf8_bytes(store_backend: BackendBase) -> None:
    """1024 characters and 2048 bytes: what every engine can index (PostgreSQL's B-tree
    entries must stay under 2704 bytes)."""
    four_bytes = "\U0001f413" * (MAX_KEY_BYTES // 4)
    two_bytes = "é" * (MAX_KEY_BYTES // 2)
    for key in (four_bytes, two_bytes, "k" * 1024):
        await store_backend.commit(key, {"ok": True}, turns=[{"turn": 1}])
        assert await store_backend.load(key) == {"ok": True}
        assert await store_backend.load_turns(key) == [{"turn": 1}]
    assert len(await store_backend.list_keys()) == 3

    too_wide = four_bytes + "\U0001f413"
    for call in (
        lambda: store_backend.save(too_wide, {}),
        lambda: store_backend.commit(too_wide, {}, turns=[{"turn": 1}]),
        lambda: store_backend.load(too_wide),
    ):
        with pytest.raises(
            InvalidKeyError, match="is 2052 bytes long in UTF-8, the limit is 2048: '\U0001f413"
        ):
            await call()
    with pytest.raises(InvalidKeyError, match="is 2050 bytes long in UTF-8"):
        await store_backend.save(two_bytes[:-1] + "\U0001f413", {})
    assert len(await store_backend.list_keys()) == 3


async def test_non_string_dict_keys_are_stored_as_json_dumps_writes_them(store_backend: BackendBase) -> None:
    """int, float, bool and None keys become strings; of two keys that become the same
    string, the one written last wins."""
    state: dict[str, dict[Any, str]] = {
        "by_id": {1: "int", "1": "str after the int"},
        "by_name": {"2": "str", 2: "int after the str"},
        "others": {2.5: "float", None: "none", False: "bool"},
    }
    turn: dict[Any, str] = {7: "turn"}
    await store_backend.commit("agent:k", state, turns=[turn])
    assert await store_backend.load("agent:k") == {
        "by_id": {"1": "str after the int"},
        "by_name": {"2": "int after the str"},
        "others": {"2.5": "float", "null": "none", "false": "bool"},
    }
    assert await store_backend.load_turns("agent:k") == [{"7": "turn"}]


async def test_the_deepest_storable_state_is_stored_from_any_stack_and_loads_from_any(
    store_backend: BackendBase,
) -> None:
    """Encoding and decoding recurse once per level of nesting: how deep the caller's own
    stack is decides neither whether a state is stored nor whether it loads back."""
    deepest = deepest_storable()
    state = deep(deepest)

    await _from_a_deeper_stack(300, lambda: store_backend.save("agent:deep", state))
    loaded = await _from_a_deeper_stack(300, lambda: store_backend.load("agent:deep"))
    # Compared as JSON: comparing the dicts recurses once per level too.
    assert dumps("k", loaded) == dumps("k", state)
    record = await _from_a_deeper_stack(300, lambda: store_backend.load_record("agent:deep"))
    assert record is not None and dumps("k", record.state) == dumps("k", state)

    with pytest.raises(StateNotSerializableError) as info:
        await store_backend.save("agent:deeper", deep(deepest + 1))
    assert info.value.key == "agent:deeper"
    assert info.value.path.startswith('state["a"]["a"]')
    assert "recursion limit" in info.value.problem
    assert await store_backend.load("agent:deeper") is None


def _server_connections(dsn: str, application_name: str) -> int:
    """The server's connections from ``application_name``, once the closed ones are gone
    (a server process ends a little after its client closed the connection)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    deadline = time.monotonic() + 30
    while True:
        count = int(postgres_query(dsn, query, application_name)[0][0])
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def _backend_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("cognitia-")]


@pytest.mark.parametrize("how", ["async with", "aclose"])
@pytest.mark.parametrize("kind", ["sqlite", *SERVERS])
async def test_closing_through_a_cancellation_stops_every_thread_and_connection(
    request: pytest.FixtureRequest, kind: str, how: str, tmp_path: Path
) -> None:
    before = set(threading.enumerate())
    backend: Any
    name = f"cognitia-close-{uuid.uuid4().hex[:12]}"
    if kind == "sqlite":
        backend = SqliteSessionBackend(tmp_path / "sessions.db")
    elif kind == "postgres":
        from cognitia.session.backends import PostgresSessionBackend

        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("postgres_schemas")()
        backend = PostgresSessionBackend(f"{dsn}?application_name={name}", schema=schema, readers=2)
    else:
        from cognitia.session.backends import RedisSessionBackend

        prefix = request.getfixturevalue("redis_prefix")
        backend = RedisSessionBackend(request.getfixturevalue("redis_url"), key_prefix=prefix)

    async def use() -> list[threading.Thread]:
        await backend.save("agent:k", {"n": 1})
        async with anyio.create_task_group() as tg:  # every reader and writer thread at work
            for _ in range(4):
                tg.start_soon(functools.partial(backend.load_turns, "agent:k", last=1000))
                tg.start_soon(backend.list_keys)
        threads = _backend_threads(before)
        assert threads
        return threads

    with anyio.CancelScope() as scope:
        if how == "async with":
            async with backend:
                threads = await use()
                scope.cancel()
                await anyio.sleep_forever()
        else:
            threads = await use()
            scope.cancel()
            await backend.aclose()
    assert scope.cancelled_caught and backend.closed

    for thread in threads:
        thread.join(30)  # they were told to stop before the close was cancelled
    assert [t.name for t in threads if t.is_alive()] == []
    if kind == "sqlite":
        assert len(backend._inline_conns) == 0
    elif kind == "postgres":
        assert (
            await anyio.to_thread.run_sync(_server_connections, request.getfixturevalue("postgres_dsn"), name)
            == 0
        )
    else:
        assert backend._pool._connections and all(c._sock is None for c in backend._pool._connections)
    backend.close()  # closing again does nothing
    await backend.aclose()
