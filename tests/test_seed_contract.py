"""The design document's contract (seeds/session-backends.md), exactly as written there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cognitia
import cognitia.session.backends

pytestmark = pytest.mark.anyio


class RedisShapedBackend:
    """The seed's custom-backend example, with a dict of bytes standing in for the Redis server."""

    def __init__(self, server: dict[str, bytes]) -> None:
        self._redis = server

    async def save(self, key: str, state: dict[str, Any]) -> None:
        self._redis[key] = json.dumps(state).encode()

    async def load(self, key: str) -> dict[str, Any] | None:
        data = self._redis.get(key)
        return json.loads(data) if data else None

    async def delete(self, key: str) -> bool:
        return self._redis.pop(key, None) is not None

    async def list_keys(self) -> list[str]:
        return [k.encode().decode() for k in self._redis]


def test_the_seed_imports_work() -> None:
    from cognitia.session.backends import (  # noqa: F401
        InMemorySessionBackend,
        MemoryScope,
        SessionBackend,
        SqliteSessionBackend,
        scoped_key,
    )
    from cognitia.session.manager import InMemorySessionManager  # noqa: F401


async def test_quick_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cognitia.session.backends import MemoryScope, SqliteSessionBackend, scoped_key

    monkeypatch.chdir(tmp_path)
    backend = SqliteSessionBackend(db_path="sessions.db")

    key = scoped_key(MemoryScope.AGENT, "user:42:session:abc")
    await backend.save(key, {"role": "coach", "turn": 7})

    state = await backend.load(key)
    assert state == {"role": "coach", "turn": 7}

    keys = await backend.list_keys()
    assert keys == ["agent:user:42:session:abc"]

    backend.close()  # a plain sync call, as in the seed
    assert backend.closed
    assert backend.closed
    assert (tmp_path / "sessions.db").exists()


async def test_quick_start_with_aclose_and_async_with(tmp_path: Path) -> None:
    from cognitia.session.backends import MemoryScope, SqliteSessionBackend, scoped_key

    key = scoped_key(MemoryScope.AGENT, "user:42:session:abc")
    async with SqliteSessionBackend(db_path=tmp_path / "sessions.db") as backend:
        await backend.save(key, {"role": "coach", "turn": 7})
    assert backend.closed

    other = SqliteSessionBackend(db_path=tmp_path / "sessions.db")
    assert await other.load(key) == {"role": "coach", "turn": 7}
    await other.aclose()
    assert other.closed


async def test_quick_start_in_memory() -> None:
    from cognitia.session.backends import InMemorySessionBackend, MemoryScope, scoped_key

    backend = InMemorySessionBackend()
    key = scoped_key(MemoryScope.AGENT, "user:42:session:abc")
    await backend.save(key, {"role": "coach", "turn": 7})
    assert await backend.load(key) == {"role": "coach", "turn": 7}
    assert await backend.list_keys() == ["agent:user:42:session:abc"]
    backend.close()


def test_memory_scopes_and_scoped_key() -> None:
    from cognitia.session.backends import MemoryScope, scoped_key

    assert scoped_key(MemoryScope.GLOBAL, "settings") == "global:settings"
    assert scoped_key(MemoryScope.AGENT, "session:123") == "agent:session:123"
    assert scoped_key(MemoryScope.SHARED, "team-context") == "shared:team-context"
    assert [s.prefix for s in MemoryScope] == ["global:", "agent:", "shared:"]
    assert scoped_key("agent", "x") == "agent:x"
    assert MemoryScope.of("agent:session:123") is MemoryScope.AGENT
    assert MemoryScope.of("plain-key") is None
    assert MemoryScope.of("other:key") is None
    with pytest.raises(ValueError):
        scoped_key("nonsense", "x")


async def test_scopes_isolate_the_same_key_name() -> None:
    from cognitia.session.backends import InMemorySessionBackend, MemoryScope, scoped_key

    backend = InMemorySessionBackend()
    for scope in MemoryScope:
        await backend.save(scoped_key(scope, "settings"), {"owner": scope.value})
    for scope in MemoryScope:
        assert await backend.load(scoped_key(scope, "settings")) == {"owner": scope.value}
    assert await backend.list_keys(MemoryScope.SHARED) == ["shared:settings"]


def test_session_backend_is_runtime_checkable() -> None:
    from cognitia.session.backends import InMemorySessionBackend, SessionBackend, SqliteSessionBackend

    assert isinstance(InMemorySessionBackend(), SessionBackend)
    assert isinstance(SqliteSessionBackend(db_path=":memory:"), SessionBackend)
    assert isinstance(RedisShapedBackend({}), SessionBackend)
    assert not isinstance(object(), SessionBackend)
    assert not isinstance({"save": 1}, SessionBackend)


def test_a_non_backend_is_refused_by_the_manager() -> None:
    from cognitia.session.manager import InMemorySessionManager

    with pytest.raises(TypeError, match="SessionBackend"):
        InMemorySessionManager(backend=object())  # type: ignore[arg-type]


async def test_custom_backend_works_with_the_manager() -> None:
    from cognitia.session.manager import InMemorySessionManager

    server: dict[str, bytes] = {}
    manager = InMemorySessionManager(backend=RedisShapedBackend(server))
    session = await manager.register("agent:u1", {"role": "coach"})
    assert "agent:u1" in server  # register() synced to the backend
    session.state["turn"] = 1
    assert await manager.close("agent:u1")

    # A new manager over a new backend object on the same server sees it.
    again = InMemorySessionManager(backend=RedisShapedBackend(server))
    restored = await again.get("agent:u1")
    assert restored.state == {"role": "coach", "turn": 1}
    assert await again.list_keys("agent:") == ["agent:u1"]
    assert await again.delete("agent:u1")
    assert server == {}


async def test_custom_backend_works_with_the_decorator() -> None:
    server: dict[str, bytes] = {}

    @cognitia.persisted_session(RedisShapedBackend(server), key="session_id")
    async def chat(message: str, *, session_id: str, session: cognitia.Session) -> str:
        session.state["count"] = session.state.get("count", 0) + 1
        return f"reply #{session.state['count']} to {message}"

    assert await chat("hi", session_id="user:42") == "reply #1 to hi"
    assert await chat("again", session_id="user:42") == "reply #2 to again"

    @cognitia.persisted_session(RedisShapedBackend(server), key="session_id")
    async def resumed(message: str, *, session_id: str, session: cognitia.Session) -> list[Any]:
        return [turn["output"] for turn in await session.turns.all()]

    assert await resumed("x", session_id="user:42") == ["reply #1 to hi", "reply #2 to again"]


async def test_manager_syncs_on_register_and_close(tmp_path: Path) -> None:
    from cognitia.session.backends import SqliteSessionBackend
    from cognitia.session.manager import InMemorySessionManager

    backend = SqliteSessionBackend(db_path=tmp_path / "sessions.db")
    manager = InMemorySessionManager(backend=backend)

    session = await manager.register("agent:s1", {"role": "coach"})
    assert await backend.load("agent:s1") == {"role": "coach"}

    session.state["turn"] = 7
    assert await backend.load("agent:s1") == {"role": "coach"}  # not synced until close/save
    assert await manager.close("agent:s1")
    assert await backend.load("agent:s1") == {"role": "coach", "turn": 7}
    assert "agent:s1" not in manager
    assert not await manager.close("agent:s1")
    await backend.aclose()


async def test_manager_without_a_backend_is_in_memory_only() -> None:
    from cognitia.session.manager import InMemorySessionManager

    manager = InMemorySessionManager()
    assert manager.backend is None
    session = await manager.register("agent:s1", {"role": "coach"})
    session.state["turn"] = 1
    await manager.save(session)
    assert session.version == 2
    assert (await manager.get("agent:s1")).state == {"role": "coach", "turn": 1}
    assert await manager.list_keys() == ["agent:s1"]
    assert await manager.close("agent:s1")
    with pytest.raises(cognitia.SessionNotFound):
        await manager.get("agent:s1")
    assert await manager.list_keys() == []


PUBLIC_TOP = {
    "EVENTS",
    "BackendClosedError",
    "CognitiaError",
    "HookError",
    "InMemorySessionManager",
    "InvalidKeyError",
    "MemoryScope",
    "MissingDependencyError",
    "Session",
    "SessionEvent",
    "SessionNotFound",
    "StateNotSerializableError",
    "StorageError",
    "Subscription",
    "Turns",
    "VersionConflictError",
    "__version__",
    "persisted_session",
    "scoped_key",
}

PUBLIC_BACKENDS = {
    "BackendBase",
    "Capability",
    "InMemorySessionBackend",
    "MemoryScope",
    "PostgresSessionBackend",
    "RedisSessionBackend",
    "SessionBackend",
    "SessionRecord",
    "SqliteSessionBackend",
    "StoreBackend",
    "Write",
    "capabilities_of",
    "scoped_key",
}


def _public_names(module: object) -> set[str]:
    return {
        name
        for name in vars(module)
        if not name.startswith("_")
        and name not in {"annotations", "TYPE_CHECKING", "Any"}
        and not isinstance(vars(module)[name], type(json))  # submodules are not exports
    }


def test_cognitia_all_is_the_public_api() -> None:
    assert set(cognitia.__all__) == PUBLIC_TOP
    assert len(cognitia.__all__) == len(PUBLIC_TOP)
    assert _public_names(cognitia) | {"__version__"} == PUBLIC_TOP | {"PackageNotFoundError", "version"}
    for name in cognitia.__all__:
        assert getattr(cognitia, name) is not None


def test_backends_all_is_the_public_api() -> None:
    module = cognitia.session.backends
    assert set(module.__all__) == PUBLIC_BACKENDS
    assert len(module.__all__) == len(PUBLIC_BACKENDS)
    # The server backends are lazy (optional drivers); every other name is defined eagerly.
    assert _public_names(module) == PUBLIC_BACKENDS - {"PostgresSessionBackend", "RedisSessionBackend"}
