"""InMemorySessionManager.update_many: several sessions changed and stored together, or not at all."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _servers import BackendFactory

from cognitia import (
    InMemorySessionManager,
    InvalidKeyError,
    Session,
    StateNotSerializableError,
    StorageError,
    VersionConflictError,
)
from cognitia.session.backends import (
    BackendBase,
    Capability,
    InMemorySessionBackend,
    Write,
    capabilities_of,
)

pytestmark = pytest.mark.anyio


def transfer(amount: int) -> Any:
    """A change that moves credits from one session to the other and logs a turn on each."""

    def change(sessions: dict[str, Session]) -> None:
        a, b = sessions["agent:a"], sessions["agent:b"]
        a.state["credits"] = a.state.get("credits", 100) - amount
        b.state["credits"] = b.state.get("credits", 100) + amount
        a.turns.append({"sent": amount})
        b.turns.append({"got": amount})

    return change


async def stored(backend: Any, key: str) -> tuple[Any, ...] | None:
    record = await backend.load_record(key)
    if record is None:
        return None
    return record.state, record.version, await backend.load_turns(key)


async def test_sessions_are_changed_and_stored_together(backend_factory: BackendFactory) -> None:
    manager = InMemorySessionManager(backend_factory())
    saved = []
    manager.on("saved", lambda event: saved.append((event.key, event.version, event.turns)))
    await manager.register("agent:a", {"credits": 10})
    sessions = await manager.update_many(["agent:b", "agent:a"], transfer(3))
    assert list(sessions) == ["agent:a", "agent:b"]
    assert sessions["agent:a"].state == {"credits": 7} and sessions["agent:a"].version == 2
    assert sessions["agent:b"].state == {"credits": 103}
    assert saved == [("agent:a", 2, 1), ("agent:b", sessions["agent:b"].version, 1)]
    assert await manager.get("agent:a") is sessions["agent:a"]

    reader = backend_factory()  # a new backend object: what another process reads
    assert await stored(reader, "agent:a") == ({"credits": 7}, 2, [{"sent": 3}])
    assert (await stored(reader, "agent:b"))[::2] == ({"credits": 103}, [{"got": 3}])  # type: ignore[index]


async def test_a_conflict_on_one_session_stores_neither_and_retries_both(
    backend_factory: BackendFactory,
) -> None:
    storage = backend_factory()
    manager = InMemorySessionManager(storage)
    other = InMemorySessionManager(backend_factory())  # another worker on the same storage
    conflicts = []
    manager.on("conflict", lambda event: conflicts.append(event.key))
    await manager.register("agent:a", {"credits": 100})
    await manager.register("agent:b", {"credits": 100})
    await other.update("agent:b", lambda s: s.state.update(credits=50))  # manager's copy of b is stale

    with pytest.raises(VersionConflictError) as info:
        await manager.update_many(["agent:a", "agent:b"], transfer(10), retries=0)
    assert info.value.key == "agent:b" and conflicts == ["agent:b"]
    assert await stored(storage, "agent:a") == ({"credits": 100}, 1, [])
    assert await stored(storage, "agent:b") == ({"credits": 50}, 2, [])

    await other.update("agent:b", lambda s: s.state.update(credits=60))
    calls = []

    def counted(sessions: dict[str, Session]) -> None:
        calls.append(sessions["agent:b"].state["credits"])
        transfer(10)(sessions)

    sessions = await manager.update_many(["agent:a", "agent:b"], counted)
    assert calls == [60]  # the conflict dropped the stale copies: fresh ones were read
    assert sessions["agent:b"].state == {"credits": 70} and sessions["agent:a"].state == {"credits": 90}
    assert await stored(storage, "agent:a") == ({"credits": 90}, 2, [{"sent": 10}])


async def test_a_change_that_fails_leaves_every_session_as_it_was(backend_factory: BackendFactory) -> None:
    storage = backend_factory()
    manager = InMemorySessionManager(storage)
    a = await manager.register("agent:a", {"credits": 100})
    b = await manager.register("agent:b", {"credits": 100})

    def half_then_fail(sessions: dict[str, Session]) -> None:
        transfer(5)(sessions)
        raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError):
        await manager.update_many(["agent:a", "agent:b"], half_then_fail)
    assert a.state == {"credits": 100} and b.state == {"credits": 100}
    assert await a.turns.all() == [] and await b.turns.all() == []

    def unstorable(sessions: dict[str, Session]) -> None:
        transfer(5)(sessions)
        sessions["agent:b"].state["handle"] = object()

    with pytest.raises(StateNotSerializableError) as info:
        await manager.update_many(["agent:a", "agent:b"], unstorable)
    assert info.value.key == "agent:b"
    assert await stored(storage, "agent:a") == ({"credits": 100}, 1, [])
    assert await stored(storage, "agent:b") == ({"credits": 100}, 1, [])
    await manager.update_many(["agent:a", "agent:b"], transfer(1))  # nothing half-applied lingers
    assert await stored(storage, "agent:a") == ({"credits": 99}, 2, [{"sent": 1}])


async def test_a_cancelled_caller_still_stores_all_of_it(backend_factory: BackendFactory) -> None:
    storage = backend_factory()
    manager = InMemorySessionManager(storage)
    saved = []
    manager.on("saved", lambda event: saved.append(event.key))

    async def change(sessions: dict[str, Session]) -> None:
        transfer(2)(sessions)
        scope.cancel()  # the caller gives up while the save is about to start
        await anyio.lowlevel.checkpoint()

    with anyio.CancelScope() as scope:
        await manager.update_many(["agent:a", "agent:b"], change)
    # Cancelled inside the change: nothing was stored, nothing half-applied is live.
    assert await stored(storage, "agent:a") is None and saved == []

    def cancel_then_change(sessions: dict[str, Session]) -> None:
        scope.cancel()  # the caller gives up just as the save starts: the save is shielded
        transfer(2)(sessions)

    with anyio.CancelScope() as scope:
        await manager.update_many(["agent:a", "agent:b"], cancel_then_change)
    assert saved == ["agent:a", "agent:b"]
    assert (await stored(storage, "agent:a"))[0] == {"credits": 98}  # type: ignore[index]
    assert (await stored(storage, "agent:b"))[0] == {"credits": 102}  # type: ignore[index]


async def test_overlapping_updates_never_deadlock_and_never_lose_a_change(
    backend_factory: BackendFactory,
) -> None:
    manager = InMemorySessionManager(backend_factory())
    keys = ["agent:a", "agent:b", "agent:c"]

    async def mover(i: int) -> None:
        pair = [keys[i % 3], keys[(i + 1) % 3]]

        def move(sessions: dict[str, Session]) -> None:
            src, dst = (sessions[k] for k in (pair if i % 2 else pair[::-1]))
            src.state["credits"] = src.state.get("credits", 100) - 1
            dst.state["credits"] = dst.state.get("credits", 100) + 1

        for _ in range(10):
            await manager.update_many(pair if i % 2 else pair[::-1], move)
            await manager.update(pair[0], lambda s: s.state.update(seen=True))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(9):
                tg.start_soon(mover, i)
    credits = [(await manager.get(key)).state["credits"] for key in keys]
    # Movers 0-5 cancel out in pairs; 6 moves b -> a, 7 b -> c, 8 a -> c, ten credits each time.
    assert credits == [100, 80, 120]


async def test_bad_arguments_are_refused(backend_factory: BackendFactory) -> None:
    manager = InMemorySessionManager(backend_factory())
    with pytest.raises(ValueError, match="'agent:a' is given twice"):
        await manager.update_many(["agent:a", "agent:b", "agent:a"], transfer(1))
    with pytest.raises(ValueError, match="at least one key"):
        await manager.update_many([], transfer(1))
    assert await manager.list_keys() == []


class PlainBackend:
    """A user-written four-method backend: no multi-key commits."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def save(self, key: str, state: dict[str, Any]) -> None:
        await anyio.lowlevel.checkpoint()
        self.data[key] = json.dumps(state)

    async def load(self, key: str) -> dict[str, Any] | None:
        await anyio.lowlevel.checkpoint()
        return json.loads(self.data[key]) if key in self.data else None

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def list_keys(self) -> list[str]:
        return list(self.data)


async def test_plain_backends_check_every_version_before_writing_any() -> None:
    plain = PlainBackend()
    manager = InMemorySessionManager(plain)
    other = InMemorySessionManager(plain)
    await manager.register("agent:a", {"credits": 100})
    await manager.register("agent:b", {"credits": 100})
    await other.update("agent:b", lambda s: s.state.update(credits=1))
    before = dict(plain.data)
    with pytest.raises(VersionConflictError):
        await manager.update_many(["agent:a", "agent:b"], transfer(5), retries=0)
    assert plain.data == before
    sessions = await manager.update_many(["agent:a", "agent:b"], transfer(5))
    assert sessions["agent:b"].state == {"credits": 6}


async def test_without_a_backend_sessions_are_updated_together() -> None:
    manager = InMemorySessionManager()
    sessions = await manager.update_many(["agent:a", "agent:b"], transfer(4))
    assert [s.version for s in sessions.values()] == [1, 1]
    again = await manager.update_many(["agent:a", "agent:b"], transfer(4))
    assert again["agent:a"].state == {"credits": 92} and [s.version for s in again.values()] == [2, 2]


async def test_a_failure_part_way_through_the_transaction_writes_nothing(
    postgres_backend_factory: BackendFactory,
) -> None:
    """A value only the storage engine refuses fails the commit after the first session's statement ran.

    PostgreSQL is the engine that refuses JSON cognitia encoded (jsonb holds no U+0000).
    """
    backend_factory = postgres_backend_factory
    storage = backend_factory()
    manager = InMemorySessionManager(storage)
    await manager.register("agent:a", {"credits": 100})

    def bad_second(sessions: dict[str, Session]) -> None:
        transfer(1)(sessions)
        sessions["agent:b"].state["note"] = "nul \x00 inside"

    with pytest.raises(StateNotSerializableError) as info:
        await manager.update_many(["agent:a", "agent:b"], bad_second)
    assert info.value.key == "agent:b"
    assert await stored(storage, "agent:a") == ({"credits": 100}, 1, [])
    assert await stored(storage, "agent:b") is None


async def test_memory_backend_reports_the_first_conflicting_key() -> None:
    backend = InMemorySessionBackend()
    manager = InMemorySessionManager(backend)
    await manager.register("agent:a", {})
    await backend.save("agent:a", {"moved": True})
    with pytest.raises(VersionConflictError) as info:
        await manager.update_many(["agent:a", "agent:b"], transfer(1), retries=0)
    assert (info.value.key, info.value.expected, info.value.actual) == ("agent:a", 1, 2)
    assert await backend.load("agent:b") is None


async def test_a_handler_taking_keys_in_sorted_order_never_deadlocks_with_it() -> None:
    """A task holding ``a`` updates ``b`` (a handler calling a sub-agent, keys in sorted order)
    while update_many wants both: one waits for the other, and both complete."""
    manager = InMemorySessionManager(InMemorySessionBackend())
    await manager.register("agent:a", {"credits": 100})
    await manager.register("agent:b", {"credits": 100})
    a_held = anyio.Event()

    async def handler_of_a() -> None:
        async with manager.locked("agent:a"):
            a_held.set()
            await anyio.sleep(0.05)  # update_many is waiting by now
            await manager.update("agent:b", lambda s: s.state.update(seen=True))

    async def both() -> None:
        await a_held.wait()
        await manager.update_many(["agent:a", "agent:b"], transfer(10))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(handler_of_a)
            tg.start_soon(both)
    assert (await manager.get("agent:b")).state == {"credits": 110, "seen": True}
    assert manager._locks._locks == {}  # every key let go


async def test_keys_are_checked_before_anything_is_written() -> None:
    manager = InMemorySessionManager(InMemorySessionBackend())
    with pytest.raises(TypeError, match="a list of keys, not one key"):
        await manager.update_many("agent:a", transfer(1))
    with pytest.raises(InvalidKeyError, match="must be a str"):
        await manager.update_many(["agent:a", 1], transfer(1))  # type: ignore[list-item]
    assert await manager.list_keys() == []


async def test_plain_backends_refuse_a_reserved_key_in_any_state_before_writing() -> None:
    plain = PlainBackend()
    manager = InMemorySessionManager(plain)

    def reserved(sessions: dict[str, Session]) -> None:
        transfer(1)(sessions)
        sessions["agent:b"].state["__cognitia__"] = 1

    with pytest.raises(StateNotSerializableError, match="'agent:b'"):
        await manager.update_many(["agent:a", "agent:b"], reserved)
    assert plain.data == {}


async def test_a_plain_backend_failing_part_way_is_not_retried_as_a_conflict() -> None:
    """Another process writes ``b`` just after ``a`` is written: ``a`` cannot be taken back, so
    the change must not be applied again; the error says which sessions were stored."""
    plain = PlainBackend()
    manager = InMemorySessionManager(plain)
    other = InMemorySessionManager(plain)
    await manager.register("agent:a", {"credits": 100})
    await manager.register("agent:b", {"credits": 100})
    saved = plain.save

    async def save_then_race(key: str, state: dict[str, Any]) -> None:
        await saved(key, state)
        if key == "agent:a":
            plain.save = saved  # type: ignore[method-assign]
            await other.update("agent:b", lambda s: s.state.update(credits=s.state["credits"] + 1))

    plain.save = save_then_race  # type: ignore[method-assign]
    calls = []

    def counted(sessions: dict[str, Session]) -> None:
        calls.append(1)
        transfer(10)(sessions)

    with pytest.raises(StorageError, match="stored sessions 'agent:a' but not 'agent:b'"):
        await manager.update_many(["agent:a", "agent:b"], counted)
    assert len(calls) == 1
    assert (await manager.get("agent:a")).state == {"credits": 90}  # what storage holds, reloaded
    assert (await manager.get("agent:b")).state == {"credits": 101}


async def test_an_engine_without_multi_key_commits_does_not_claim_them(tmp_path: Any) -> None:
    """A BackendBase subclass written before commit_many existed keeps working: it does not
    declare multi_key_commit, and update_many writes its sessions one after the other."""

    class OlderEngine(InMemorySessionBackend):
        _raw_commit_many = BackendBase._raw_commit_many

    backend = OlderEngine()
    assert Capability.MULTI_KEY_COMMIT not in capabilities_of(backend)
    assert Capability.MULTI_KEY_COMMIT in capabilities_of(InMemorySessionBackend())
    with pytest.raises(TypeError, match="cannot commit several sessions at once"):
        await backend.commit_many([Write("agent:a", {}), Write("agent:b", {})])
    manager = InMemorySessionManager(backend)
    await manager.update_many(["agent:a", "agent:b"], transfer(1))
    assert await backend.load("agent:b") == {"credits": 101}
