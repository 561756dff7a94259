"""InMemorySessionManager: the lifecycle of sessions, locking, retention and multi-worker conflicts."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _servers import SERVERS
from structlog.testing import capture_logs

from cognitia import (
    BackendClosedError,
    InMemorySessionManager,
    Session,
    SessionEvent,
    SessionNotFound,
    StateNotSerializableError,
    VersionConflictError,
    persisted_session,
)
from cognitia.session._session import MAX_CACHED_TURNS
from cognitia.session.backends import (
    InMemorySessionBackend,
    MemoryScope,
    SessionBackend,
    SqliteSessionBackend,
)

pytestmark = pytest.mark.anyio


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DictBackend:
    """A user-written four-method backend (no capabilities declared)."""

    def __init__(self, storage: dict[str, str]) -> None:
        self._data = storage

    async def save(self, key: str, state: dict[str, Any]) -> None:
        await anyio.lowlevel.checkpoint()
        self._data[key] = json.dumps(state)

    async def load(self, key: str) -> dict[str, Any] | None:
        await anyio.lowlevel.checkpoint()
        data = self._data.get(key)
        return json.loads(data) if data else None

    async def delete(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    async def list_keys(self) -> list[str]:
        return list(self._data)


def record(manager: InMemorySessionManager, *names: str) -> list[SessionEvent]:
    events: list[SessionEvent] = []
    for name in names:
        manager.on(name, events.append)
    return events


@pytest.fixture(params=["memory", "sqlite", "custom"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionBackend]:
    if request.param == "memory":
        async with InMemorySessionBackend() as memory:
            yield memory
    elif request.param == "sqlite":
        async with SqliteSessionBackend(db_path=tmp_path / "m.db") as sqlite:
            yield sqlite
    else:
        yield DictBackend({})


async def test_lifecycle(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    session = await manager.register("agent:s1", {"role": "coach"})
    assert isinstance(session, Session)
    assert session.key == "agent:s1" and session.scope is MemoryScope.AGENT
    assert session.version == 1 and "agent:s1" in manager and len(manager) == 1
    assert await manager.get("agent:s1") is session

    session.state["turn"] = 1
    session.turns.append({"said": "hi"})
    assert await manager.save(session) is session
    assert session.version == 2
    assert await manager.save("agent:s1") is session  # by key
    assert session.version == 3

    assert await manager.close("agent:s1")
    assert "agent:s1" not in manager
    restored = await manager.get("agent:s1")
    assert restored is not session
    assert restored.state == {"role": "coach", "turn": 1}
    assert restored.version == 3
    assert await restored.turns.all() == [{"said": "hi"}]

    assert await manager.delete("agent:s1")
    assert not await manager.delete("agent:s1")
    assert "agent:s1" not in manager
    with pytest.raises(SessionNotFound):
        await manager.get("agent:s1")
    assert await manager.list_keys() == []


async def test_open_gets_or_creates_and_first_save_stores(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    created = await manager.open("k", {"fresh": True})
    assert created.version == 0
    assert await backend.load("k") is None  # live, not stored yet
    assert await manager.list_keys() == ["k"]  # but listed
    assert await manager.open("k", {"ignored": True}) is created
    await manager.save(created)
    assert created.version == 1
    await manager.close("k")
    again = await manager.open("k", {"ignored": True})
    assert again.state == {"fresh": True} and again.version == 1


async def test_save_refuses_a_session_that_is_no_longer_live(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    old = await manager.register("k", {"n": 1})
    await manager.close("k")
    await manager.get("k")
    with pytest.raises(ValueError, match="not the manager's live session"):
        await manager.save(old)


async def test_versions_grow_by_one_on_every_save(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    versions = []
    session = await manager.register("k", {"n": 0})
    versions.append(session.version)
    for n in range(1, 4):
        session.state["n"] = n
        await manager.save(session)
        versions.append(session.version)
    await manager.update("k", lambda s: s.state.update(n=4))
    versions.append(session.version)
    session.state["n"] = 5
    await manager.close("k")  # changed: saved on close
    versions.append(session.version)
    unchanged = await manager.get("k")
    await manager.close("k")  # unchanged: not saved again
    versions.append(unchanged.version)
    assert versions == [1, 2, 3, 4, 5, 6, 6]


async def test_close_all_persists_every_changed_session(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    for i in range(5):
        session = await manager.register(f"k{i}", {"i": i})
        session.state["closed"] = True
    await manager.close_all()
    assert len(manager) == 0
    for i in range(5):
        assert await backend.load(f"k{i}") in (
            {"i": i, "closed": True},
            {"i": i, "closed": True, "__cognitia__": {"version": 2, "turns": []}},
        )
        assert (await manager.get(f"k{i}")).state == {"i": i, "closed": True}


async def test_list_keys_by_prefix_and_scope(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    await manager.register("agent:b", {})
    await manager.register("agent:a", {})
    await manager.register("global:settings", {})
    await manager.open("agent:c")  # live only
    await manager.close("agent:a")  # stored only
    assert await manager.list_keys() == ["agent:a", "agent:b", "agent:c", "global:settings"]
    assert await manager.list_keys(MemoryScope.AGENT) == ["agent:a", "agent:b", "agent:c"]
    assert await manager.list_keys("global:") == ["global:settings"]
    assert await manager.list_keys(MemoryScope.SHARED) == []


async def test_turns_from_memory_and_from_storage(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    session = await manager.register("k", {})
    for i in range(5):
        session.turns.append({"i": i})
    assert len(session.turns) == 5
    assert await manager.turns("k", last=2) == [{"i": 3}, {"i": 4}]  # queued turns count too
    await manager.save(session)
    assert await manager.turns("k") == [{"i": i} for i in range(5)]
    await manager.close("k")
    assert await manager.turns("k") == [{"i": i} for i in range(5)]
    assert await manager.turns("k", last=2) == [{"i": 3}, {"i": 4}]
    assert await manager.turns("k", last=0) == []
    assert await manager.turns("nobody") == []


async def test_rehydration_after_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    async with SqliteSessionBackend(db_path=db) as backend:
        manager = InMemorySessionManager(backend=backend)
        session = await manager.register("agent:u1", {"role": "coach"})
        for i in range(3):
            session.state["turn"] = i
            session.turns.append({"i": i})
            await manager.save(session)
        await manager.close_all()

    async with SqliteSessionBackend(db_path=db) as backend:  # "the process restarted"
        manager = InMemorySessionManager(backend=backend)
        events = record(manager, "loaded")
        session = await manager.get("agent:u1")
        assert session.state == {"role": "coach", "turn": 2}
        assert session.version == 4
        assert len(session.turns) == 3
        assert await session.turns.last(1) == [{"i": 2}]
        assert [(e.name, e.version, e.turns) for e in events] == [("loaded", 4, 3)]
        session.turns.append({"i": 3})
        await manager.save(session)
        assert await backend.load_turns("agent:u1") == [{"i": i} for i in range(4)]


async def test_register_over_a_stored_session_keeps_its_turn_log(backend: SessionBackend) -> None:
    first = InMemorySessionManager(backend=backend)
    session = await first.register("k", {"n": 1})
    session.turns.append({"i": 0})
    session.turns.append({"i": 1})
    await first.close("k")

    second = InMemorySessionManager(backend=backend)
    session = await second.register("k", {"n": 2})
    assert session.version == 3
    assert len(session.turns) == 2
    assert await session.turns.all() == [{"i": 0}, {"i": 1}]
    assert await second.turns("k") == [{"i": 0}, {"i": 1}]


async def test_updates_on_one_key_are_serialized(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    await manager.register("counter", {"n": 0})

    async def increment(session: Session) -> None:
        seen = session.state["n"]
        await anyio.lowlevel.checkpoint()  # a lost update would show here
        session.state["n"] = seen + 1
        session.turns.append({"n": seen + 1})

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(manager.update, "counter", increment)
    assert (await manager.get("counter")).state == {"n": 100}
    await manager.close("counter")
    assert (await InMemorySessionManager(backend=backend).get("counter")).state == {"n": 100}
    assert await manager.turns("counter") == [{"n": n} for n in range(1, 101)]


async def test_different_keys_do_not_wait_on_each_other(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    await manager.register("slow", {})
    inside, release = anyio.Event(), anyio.Event()

    async def blocked_change(session: Session) -> None:
        inside.set()
        await release.wait()
        session.state["done"] = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.update, "slow", blocked_change)
        await inside.wait()
        with anyio.fail_after(5):
            fast = await manager.register("fast", {"n": 0})
            await manager.update("fast", lambda s: s.state.update(n=1))
            await manager.save(fast)
            assert (await manager.get("fast")).state == {"n": 1}
            assert await manager.turns("fast") == []
            assert await manager.close("fast")
            assert await manager.delete("fast")
        with anyio.move_on_after(0.05) as waited:
            await manager.get("slow")  # the same key does wait
        assert waited.cancel_called
        release.set()
    assert (await manager.get("slow")).state == {"done": True}


async def test_a_caller_cancelled_while_waiting_for_a_key_neither_runs_nor_blocks_it(
    backend: SessionBackend,
) -> None:
    """Waiters on a busy key run in turn; a cancelled one is skipped, and no lock outlives its key."""
    manager = InMemorySessionManager(backend=backend)
    inside, release = anyio.Event(), anyio.Event()
    order: list[str] = []

    async def first(session: Session) -> None:
        inside.set()
        await release.wait()
        order.append("first")

    def then(name: str) -> Callable[[Session], None]:
        return lambda session: order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.update, "k", first)
        await inside.wait()
        with anyio.CancelScope() as abandoned:
            async with anyio.create_task_group() as waiters:
                waiters.start_soon(manager.update, "k", then("cancelled"))
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(manager.update, "k", then("second"))
                await anyio.wait_all_tasks_blocked()
                abandoned.cancel()
        release.set()
    assert order == ["first", "second"]
    assert (await manager.get("k")).version == 2
    assert manager._locks._locks == {}  # dropped once nobody holds or waits
    await manager.update("k", then("third"))  # the key is free again
    assert order == ["first", "second", "third"]


async def test_a_blocked_hook_holds_only_its_own_key(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    inside, release = anyio.Event(), anyio.Event()

    @manager.on("saved")
    async def slow_hook(event: SessionEvent) -> None:
        if event.key == "slow":
            inside.set()
            await release.wait()

    slow = await manager.register("slow", {})
    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.save, slow)
        await inside.wait()
        with anyio.fail_after(5):
            other = await manager.register("other", {})
            await manager.save(other)
            await manager.close("other")
        release.set()


async def test_a_failing_change_is_rolled_back(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    session = await manager.register("k", {"n": 1})
    session.turns.append({"i": 0})
    session.turns.append({"i": 1})
    await manager.save(session)

    async def change(s: Session) -> None:
        s.state["n"] = 99
        s.turns.append({"i": "half"})
        assert await s.turns.pop() == {"i": "half"}
        assert await s.turns.pop() == {"i": 1}
        raise RuntimeError("model unavailable")

    with pytest.raises(RuntimeError, match="model unavailable"):
        await manager.update("k", change)
    live = await manager.get("k")
    assert live.state == {"n": 1} and live.version == 2
    assert len(live.turns) == 2
    assert await live.turns.all() == [{"i": 0}, {"i": 1}]
    await manager.update("k", lambda s: s.state.update(n=2))
    assert await backend.load("k") in (
        {"n": 2},
        {"n": 2, "__cognitia__": {"version": 3, "turns": [{"i": 0}, {"i": 1}]}},
    )
    assert await manager.turns("k") == [{"i": 0}, {"i": 1}]


async def test_idle_sessions_expire(backend: SessionBackend) -> None:
    clock = Clock()
    manager = InMemorySessionManager(backend=backend, idle_ttl=10, clock=clock)
    events = record(manager, "expired", "loaded", "saved")
    a = await manager.register("a", {"n": 0})
    await manager.register("b", {"n": 0})
    clock.advance(6)
    await manager.get("a")  # touching a keeps it live
    a.state["n"] = 1  # an unsaved change is saved when it expires
    clock.advance(6)
    assert await manager.evict_idle() == ["b"]
    assert manager.live_keys() == ["a"]
    assert [(e.name, e.key, e.reason) for e in events] == [("expired", "b", "idle")]
    assert (await manager.get("b")).state == {"n": 0}  # still stored: loaded again

    events.clear()
    clock.advance(11)
    again = await manager.get("a")  # lazy expiry on access
    assert again is not a
    assert again.state == {"n": 1}
    assert [(e.name, e.key) for e in events] == [("saved", "a"), ("expired", "a"), ("loaded", "a")]
    assert await manager.evict_idle() == ["b"]


async def test_idle_sessions_without_a_backend_are_gone() -> None:
    clock = Clock()
    manager = InMemorySessionManager(idle_ttl=10, clock=clock)
    events = record(manager, "expired")
    await manager.register("a", {"n": 0})
    clock.advance(11)
    with pytest.raises(SessionNotFound):
        await manager.get("a")
    assert [(e.name, e.key) for e in events] == [("expired", "a")]
    assert await manager.evict_idle() == []
    assert await InMemorySessionManager(clock=clock).evict_idle() == []  # no idle_ttl


async def test_max_sessions_evicts_the_least_recently_used(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend, max_sessions=2)
    events = record(manager, "evicted")
    a = await manager.register("a", {"n": 0})
    await manager.register("b", {"n": 0})
    a.state["n"] = 1
    await manager.get("a")  # a is now the most recently used
    await manager.register("c", {"n": 0})
    assert manager.live_keys() == ["a", "c"]
    assert [(e.name, e.key, e.reason) for e in events] == [("evicted", "b", "capacity")]
    assert (await manager.get("b")).state == {"n": 0}  # still stored
    assert manager.live_keys() == ["c", "b"]
    assert [e.key for e in events] == ["b", "a"]
    assert (await manager.get("a")).state == {"n": 1}  # its change was saved on eviction


async def test_a_manager_made_for_a_component_is_bounded(backend: SessionBackend) -> None:
    """``of(backend)`` (what the integrations do with a backend) revalidates and keeps at
    most ``max_sessions`` live; ``of(manager)`` is the manager itself, settings untouched."""
    made = InMemorySessionManager.of(backend, max_sessions=3)
    assert made.revalidate and made.max_sessions == 3
    assert InMemorySessionManager.of(backend).max_sessions == 256
    for i in range(5):
        await made.update(f"chat:{i}", lambda session: session.turns.append({"n": 1}))
    assert made.live_keys() == ["chat:2", "chat:3", "chat:4"]
    assert await made.turns("chat:0") == [{"n": 1}]  # evicted, still stored
    own = InMemorySessionManager(backend)
    assert InMemorySessionManager.of(own) is own and own.max_sessions is None


async def test_the_sweeper_expires_idle_sessions_in_the_background(backend: SessionBackend) -> None:
    # Idleness is measured on the manager's clock, moved by hand here, so a slow machine
    # cannot make "busy" look idle; the sweeper itself wakes every 10 ms of real time.
    clock = Clock()
    manager = InMemorySessionManager(backend=backend, idle_ttl=10, sweep_interval=0.01, clock=clock)
    events = record(manager, "expired", "closed")
    async with manager:
        session = await manager.register("idle", {"n": 0})
        session.state["n"] = 1
        await manager.register("busy", {"n": 0})
        clock.advance(6)
        await manager.get("busy")
        clock.advance(6)  # "idle" has been idle 12 s, "busy" 6 s
        for _ in range(1_000):
            if events:
                break
            await anyio.sleep(0.01)
        assert manager.live_keys() == ["busy"]
        assert [(e.name, e.key) for e in events] == [("expired", "idle")]
    assert [(e.name, e.key) for e in events] == [("expired", "idle"), ("closed", "busy")]
    assert manager.closed and len(manager) == 0
    fresh = InMemorySessionManager(backend=backend)
    assert (await fresh.get("idle")).state == {"n": 1}
    with pytest.raises(BackendClosedError):
        await manager.get("idle")
    with pytest.raises(BackendClosedError):
        await manager.register("new", {})


async def test_entering_a_manager_twice_is_refused() -> None:
    manager = InMemorySessionManager()
    async with manager:
        with pytest.raises(RuntimeError, match="already entered"):
            await manager.__aenter__()


async def test_a_failure_while_closing_on_exit_propagates(tmp_path: Path) -> None:
    backend = SqliteSessionBackend(db_path=tmp_path / "s.db")
    with pytest.raises(BackendClosedError):
        async with InMemorySessionManager(backend=backend) as manager:
            session = await manager.register("k", {"n": 0})
            session.state["n"] = 1  # must be saved on exit, but the backend is gone
            await backend.aclose()


async def _two_workers(tmp_path: Path) -> tuple[SqliteSessionBackend, SqliteSessionBackend]:
    db = tmp_path / "shared.db"
    return SqliteSessionBackend(db_path=db), SqliteSessionBackend(db_path=db)


async def test_two_workers_saving_one_session_conflict(tmp_path: Path) -> None:
    backend1, backend2 = await _two_workers(tmp_path)
    async with backend1, backend2:
        worker1 = InMemorySessionManager(backend=backend1)
        worker2 = InMemorySessionManager(backend=backend2)
        conflicts = record(worker2, "conflict")
        mine = await worker1.register("k", {"n": 0})
        theirs = await worker2.get("k")
        mine.state["n"] = 1
        await worker1.save(mine)

        theirs.state["n"] = 100
        with pytest.raises(VersionConflictError) as info:
            await worker2.save(theirs)
        assert (info.value.key, info.value.expected, info.value.actual) == ("k", 1, 2)
        assert [(e.name, e.key, e.version, e.reason) for e in conflicts] == [("conflict", "k", 1, "found 2")]
        assert "k" not in worker2  # the stale copy was dropped
        fresh = await worker2.get("k")
        assert fresh.state == {"n": 1} and fresh.version == 2
        assert await backend1.load("k") == {"n": 1}


async def test_update_retries_after_a_conflict(tmp_path: Path) -> None:
    backend1, backend2 = await _two_workers(tmp_path)
    async with backend1, backend2:
        worker1 = InMemorySessionManager(backend=backend1)
        worker2 = InMemorySessionManager(backend=backend2)
        conflicts = record(worker2, "conflict")
        await worker1.register("k", {"log": []})
        await worker2.get("k")  # worker2 now holds version 1
        await worker1.update("k", lambda s: s.state["log"].append("w1"))

        calls: list[int] = []

        def change(session: Session) -> None:
            calls.append(session.version)
            session.state["log"].append("w2")

        session = await worker2.update("k", change)
        assert calls == [1, 2]  # applied to the stale copy, then again to the fresh one
        assert session.state == {"log": ["w1", "w2"]} and session.version == 3
        assert len(conflicts) == 1
        assert await backend1.load("k") == {"log": ["w1", "w2"]}

        await worker1.get("k")  # worker1's copy is stale now
        await worker2.update("k", change)
        with pytest.raises(VersionConflictError):
            await worker1.update("k", change, retries=0)


async def test_two_workers_creating_one_key(tmp_path: Path) -> None:
    backend1, backend2 = await _two_workers(tmp_path)
    async with backend1, backend2:
        worker1 = InMemorySessionManager(backend=backend1)
        worker2 = InMemorySessionManager(backend=backend2)
        one = await worker1.open("k", {"by": 1})
        two = await worker2.open("k", {"by": 2})
        await worker1.save(one)
        with pytest.raises(VersionConflictError) as info:
            await worker2.save(two)
        assert (info.value.expected, info.value.actual) == (0, 1)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_prune_with_a_backend_ttl(tmp_path: Path, kind: str) -> None:
    clock = Clock(now=1_700_000_000.0)
    db = tmp_path / "ttl.db"
    made: Callable[[], Any] = (
        (lambda: InMemorySessionBackend(ttl=60, clock=clock))
        if kind == "memory"
        else (lambda: SqliteSessionBackend(db_path=db, ttl=60, clock=clock))
    )
    async with made() as backend:
        manager = InMemorySessionManager(backend=backend)
        events = record(manager, "pruned")
        await manager.register("old", {"n": 0})
        await manager.register("young", {"n": 0})
        await manager.close_all()
        clock.advance(30)
        await manager.update("young", lambda s: s.state.update(n=1))
        clock.advance(40)  # old: 70 s since its save, young: 40 s

        assert await manager.prune(dry_run=True) == ["old"]
        assert [(e.name, e.key, e.reason) for e in events] == [("pruned", "old", "dry_run")]
        assert await backend.prune(dry_run=True) == ["old"]  # reported, not deleted
        if kind == "sqlite":
            with sqlite3.connect(db) as conn:
                assert [r[0] for r in conn.execute("SELECT key FROM cognitia_sessions ORDER BY key")] == [
                    "old",
                    "young",
                ]
        assert await manager.list_keys() == ["young"]  # expired is invisible meanwhile

        events.clear()
        assert await manager.prune() == ["old"]
        assert [(e.name, e.key, e.reason) for e in events] == [("pruned", "old", "ttl")]
        assert await backend.prune(dry_run=True) == []
        if kind == "sqlite":
            with sqlite3.connect(db) as conn:
                assert [r[0] for r in conn.execute("SELECT key FROM cognitia_sessions")] == ["young"]
        assert await manager.prune() == []


async def test_prune_without_expiry_is_a_no_op(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend=backend)
    await manager.register("k", {})
    assert await manager.prune() == []
    assert await manager.prune(dry_run=True) == []
    assert await manager.list_keys() == ["k"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        InMemorySessionManager(idle_ttl=0)
    with pytest.raises(ValueError):
        InMemorySessionManager(max_sessions=0)
    with pytest.raises(ValueError):
        InMemorySessionManager(retries=-1)
    with pytest.raises(ValueError):
        InMemorySessionBackend(ttl=0)
    assert "backend=none" in repr(InMemorySessionManager())


async def test_locked_holds_off_writers_of_that_key_only(anyio_backend: str) -> None:
    manager = InMemorySessionManager(backend=InMemorySessionBackend())
    await manager.register("agent:a", {"n": 0})
    await manager.register("agent:b", {"n": 0})
    order: list[str] = []

    async def bump(key: str) -> None:
        await manager.update(key, lambda s: s.state.update(n=s.state["n"] + 1))
        order.append(key)

    async with anyio.create_task_group() as tg:
        async with manager.locked("agent:a") as session:
            assert session is not None and session.state == {"n": 0}
            tg.start_soon(bump, "agent:a")
            tg.start_soon(bump, "agent:b")
            await anyio.wait_all_tasks_blocked()
            assert order == ["agent:b"]  # a waits for the lock; b does not
            assert session.state == {"n": 0}
    assert order == ["agent:b", "agent:a"]
    assert (await manager.get("agent:a")).state == {"n": 1}
    async with manager.locked("agent:none") as missing:
        assert missing is None


# -- revalidate: live copies that another worker has made stale ----------------------------------


@pytest.fixture(params=["memory", "sqlite", *SERVERS, "custom"])
def two_workers(request: pytest.FixtureRequest) -> Callable[[], SessionBackend]:
    """Backend objects over one storage: every backend kind, and a four-method user backend."""
    if request.param == "custom":
        storage: dict[str, str] = {}
        return lambda: DictBackend(storage)
    factory: Callable[[], SessionBackend] = request.getfixturevalue(f"{request.param}_backend_factory")
    return factory


def texts(turns: list[dict[str, Any]]) -> list[str]:
    return [turn["text"] for turn in turns]


def say(text: str) -> Callable[[Session], None]:
    return lambda session: session.turns.append({"text": text})


async def test_revalidate_reloads_a_live_copy_another_worker_saved_over(
    two_workers: Callable[[], SessionBackend],
) -> None:
    a = InMemorySessionManager(two_workers(), revalidate=True)
    b = InMemorySessionManager(two_workers(), revalidate=True)
    loaded = record(a, "loaded")
    conflicts = record(a, "conflict") + record(b, "conflict")
    await a.update("agent:chat", say("one"))
    await b.update("agent:chat", say("two"))
    assert texts(await a.turns("agent:chat")) == ["one", "two"]
    assert [(e.name, e.version, e.reason) for e in loaded] == [("loaded", 2, "stale")]
    # A conversation moving between workers on every turn never conflicts.
    for i in range(3, 9):
        await (a if i % 2 else b).update("agent:chat", say(str(i)))
    assert conflicts == []
    for worker in (a, b):
        session = await worker.get("agent:chat")
        assert session.version == 8
        assert texts(await session.turns.all()) == ["one", "two", *map(str, range(3, 9))]
        assert texts(await worker.turns("agent:chat", last=2)) == ["7", "8"]


async def test_without_revalidate_a_live_copy_is_served_until_a_save_conflicts(
    two_workers: Callable[[], SessionBackend],
) -> None:
    """The default: reads come from memory; writes are still protected by versions."""
    a = InMemorySessionManager(two_workers())
    b = InMemorySessionManager(two_workers())
    await a.update("agent:chat", say("one"))
    await b.update("agent:chat", say("two"))
    assert texts(await a.turns("agent:chat")) == ["one"]
    await a.update("agent:chat", say("three"))  # conflicts, reloads, applies again
    assert texts(await b.turns("agent:chat")) == ["one", "two"]
    assert texts(await InMemorySessionManager(two_workers()).turns("agent:chat")) == ["one", "two", "three"]


async def test_revalidate_keeps_an_unchanged_live_copy_and_its_turns(
    two_workers: Callable[[], SessionBackend],
) -> None:
    a = InMemorySessionManager(two_workers(), revalidate=True)
    await a.update("agent:chat", say("one"))
    session = await a.get("agent:chat")
    loaded = record(a, "loaded")
    await a.update("agent:chat", say("two"))
    assert await a.get("agent:chat") is session
    assert texts(await a.turns("agent:chat")) == ["one", "two"]
    assert loaded == []


async def test_revalidate_drops_a_live_copy_another_worker_deleted(
    two_workers: Callable[[], SessionBackend],
) -> None:
    a = InMemorySessionManager(two_workers(), revalidate=True)
    b = InMemorySessionManager(two_workers(), revalidate=True)
    evicted = record(a, "evicted")
    await a.update("agent:chat", say("one"))
    assert await b.delete("agent:chat")
    assert await a.turns("agent:chat") == []
    assert [(e.name, e.key, e.reason) for e in evicted] == [("evicted", "agent:chat", "gone")]
    assert "agent:chat" not in a
    with pytest.raises(SessionNotFound):
        await a.get("agent:chat")
    # A session created again elsewhere is found, with only its own turns.
    await b.update("agent:chat", say("again"))
    assert texts(await a.turns("agent:chat")) == ["again"]


async def test_revalidate_never_drops_unsaved_changes(two_workers: Callable[[], SessionBackend]) -> None:
    a = InMemorySessionManager(two_workers(), revalidate=True)
    b = InMemorySessionManager(two_workers(), revalidate=True)
    await a.register("agent:chat", {"n": 0})
    mine = await a.get("agent:chat")
    mine.state["n"] = 1  # changed, not saved yet
    await b.update("agent:chat", lambda s: s.state.update(n=100))
    assert await a.get("agent:chat") is mine and mine.state == {"n": 1}
    with pytest.raises(VersionConflictError):
        await a.save(mine)
    assert (await a.get("agent:chat")).state == {"n": 100}

    # A session created by open() and not stored yet stays live.
    fresh = await a.open("agent:new", {"n": 1})
    assert await a.get("agent:new") is fresh
    await a.save(fresh)
    assert (await b.get("agent:new")).state == {"n": 1}


# -- conditional delete --------------------------------------------------------------------------


async def test_a_delete_expecting_a_version_refuses_a_session_saved_since(
    two_workers: Callable[[], SessionBackend],
) -> None:
    a = InMemorySessionManager(two_workers())
    b = InMemorySessionManager(two_workers())
    events = record(a, "deleted", "conflict")
    await a.update("agent:chat", say("one"))
    await b.update("agent:chat", say("two"))  # a's live copy is at version 1 now, storage at 2

    with pytest.raises(VersionConflictError) as caught:
        await a.delete("agent:chat", expected_version=1)
    assert (caught.value.key, caught.value.expected, caught.value.actual) == ("agent:chat", 1, 2)
    assert "agent:chat" not in a  # the stale live copy is dropped, as after a conflicting save
    assert [(e.name, e.version, e.reason) for e in events] == [("conflict", 1, "found 2")]
    assert texts(await InMemorySessionManager(two_workers()).turns("agent:chat")) == ["one", "two"]

    events.clear()
    assert await a.delete("agent:chat", expected_version=2) is True
    assert [(e.name, e.key, e.version) for e in events] == [("deleted", "agent:chat", 2)]
    assert await InMemorySessionManager(two_workers()).turns("agent:chat") == []

    events.clear()
    with pytest.raises(VersionConflictError) as caught:  # nothing is stored any more
        await b.delete("agent:chat", expected_version=2)
    assert caught.value.actual is None
    assert "agent:chat" not in b  # b's copy (version 2) no longer matches storage
    assert await a.list_keys() == [] and events == []


async def test_a_conflicting_delete_keeps_a_live_copy_at_the_stored_version(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend)
    session = await manager.register("agent:k", {"n": 1})
    session.state["n"] = 2  # changed, not saved yet
    with pytest.raises(VersionConflictError) as caught:
        await manager.delete("agent:k", expected_version=2)
    assert caught.value.actual == 1
    assert await manager.get("agent:k") is session and session.state == {"n": 2}
    assert await manager.delete("agent:k", expected_version=1) is True
    assert "agent:k" not in manager
    assert await backend.load("agent:k") is None


async def test_a_delete_expecting_a_version_without_a_backend_checks_the_live_set() -> None:
    manager = InMemorySessionManager()
    deleted = record(manager, "deleted")
    fresh = await manager.open("agent:new", {})
    with pytest.raises(VersionConflictError) as caught:  # created by open(), never saved
        await manager.delete("agent:new", expected_version=1)
    assert caught.value.actual is None
    assert await manager.get("agent:new") is fresh
    await manager.save(fresh)
    assert await manager.delete("agent:new", expected_version=1) is True
    assert "agent:new" not in manager
    assert [(e.name, e.version) for e in deleted] == [("deleted", 1)]


# -- a version names one life of a key -----------------------------------------------------------


async def test_a_live_copy_of_a_deleted_session_never_overwrites_the_one_created_again(
    backend_factory: Callable[[], SessionBackend],
) -> None:
    """Worker a holds version 3 of a session; worker b deletes it and creates the key again,
    saving as often as the old one was: a's save and a's delete of version 3 are conflicts."""
    a = InMemorySessionManager(backend_factory())
    b = InMemorySessionManager(backend_factory())
    conflicts = record(a, "conflict")
    for i in range(3):
        await a.update("agent:chat", say(f"old {i}"))
    stale = await a.get("agent:chat")
    assert stale.version == 3

    assert await b.delete("agent:chat") is True
    created = await b.update("agent:chat", say("new 0"))
    while created.version < stale.version:
        created = await b.update("agent:chat", lambda session: session.state.update(n=session.version))
    stale.state["overwrite"] = True
    stale.turns.append({"text": "lost update"})
    with pytest.raises(VersionConflictError) as caught:
        await a.save(stale)
    assert (caught.value.expected, caught.value.actual) == (3, created.version)
    assert [(e.name, e.version) for e in conflicts] == [("conflict", 3)]
    with pytest.raises(VersionConflictError):
        await a.delete("agent:chat", expected_version=3)

    stored = InMemorySessionManager(backend_factory())
    assert (await stored.get("agent:chat")).state == created.state
    assert texts(await stored.turns("agent:chat")) == ["new 0"]


@pytest.mark.parametrize("gone", ["deleted", "closed", "evicted"])
async def test_without_a_backend_a_version_never_names_two_lives_of_a_key(gone: str) -> None:
    """Without a backend a session that leaves the live set is gone; one created again under
    its key is numbered above it, so a delete expecting the old version conflicts."""
    clock = Clock()
    manager = InMemorySessionManager(idle_ttl=10, clock=clock)
    for i in range(3):
        await manager.update("agent:k", say(f"old {i}"))
    stale = (await manager.get("agent:k")).version
    if gone == "deleted":
        assert await manager.delete("agent:k") is True
    elif gone == "closed":
        assert await manager.close("agent:k") is True
    else:
        clock.advance(11)
        assert await manager.evict_idle() == ["agent:k"]
    assert "agent:k" not in manager

    session = await manager.register("agent:k", {"life": "new"})
    while session.version < stale:
        await manager.save(session)
    with pytest.raises(VersionConflictError) as caught:
        await manager.delete("agent:k", expected_version=stale)
    assert caught.value.actual == session.version
    assert await manager.get("agent:k") is session


async def test_turns_refuses_a_negative_count_whether_live_or_stored(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend)
    await manager.update("agent:chat", say("one"))
    for _ in ("live", "stored only"):
        with pytest.raises(ValueError, match="agent:chat"):
            await manager.turns("agent:chat", last=-1)
        assert await manager.turns("agent:chat", last=0) == []
        assert texts(await manager.turns("agent:chat", last=5)) == ["one"]
        await manager.close("agent:chat")
    assert "agent:chat" not in manager


async def test_register_over_a_live_copy_keeps_the_turns_another_worker_stored(
    two_workers: Callable[[], SessionBackend],
) -> None:
    a = InMemorySessionManager(two_workers(), revalidate=True)
    b = InMemorySessionManager(two_workers(), revalidate=True)
    await a.register("agent:chat", {"topic": None})
    await b.update("agent:chat", say("one"))
    await b.update("agent:chat", say("two"))
    session = await a.register("agent:chat", {"topic": "reset"})  # a's live copy is stale
    assert len(session.turns) == 2
    assert texts(await a.turns("agent:chat")) == ["one", "two"]
    await a.update("agent:chat", say("three"))

    async def undo(session: Session) -> None:
        await session.turns.pop()

    await a.update("agent:chat", undo)  # removes "three", and nothing else
    assert texts(await InMemorySessionManager(two_workers()).turns("agent:chat")) == ["one", "two"]


async def test_eviction_never_waits_for_a_key_in_use(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend, max_sessions=1)
    evicted = record(manager, "evicted")

    # A handler that calls a sub-agent under another key: the sub-call fills the live set
    # while the outer key is held, and must not wait for it.
    async def outer(session: Session) -> None:
        await manager.update("agent:sub", say("sub"))
        session.turns.append({"text": "main"})

    with anyio.fail_after(10):
        await manager.update("agent:main", outer)
    assert texts(await manager.turns("agent:main")) == ["main"]
    assert texts(await manager.turns("agent:sub")) == ["sub"]
    assert [e.key for e in evicted] == ["agent:sub"]

    # A key held by a long operation is skipped while others come and go.
    held, release = anyio.Event(), anyio.Event()

    async def hold() -> None:
        async with manager.locked("agent:main"):
            held.set()
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await held.wait()
        with anyio.fail_after(10):
            await manager.register("agent:b", {})
            await manager.register("agent:c", {})
        assert manager.live_keys() == ["agent:main", "agent:c"]
        release.set()
    assert manager.live_keys() == ["agent:main"]


async def test_a_session_that_cannot_be_saved_fails_only_its_own_key(backend: SessionBackend) -> None:
    def poison(session: Session) -> None:
        session.state["SECRET"] = {"a set"}  # JSON cannot hold it: every save of it fails

    crowded = InMemorySessionManager(backend, max_sessions=1)
    poison(await crowded.register("agent:bad", {"n": 0}))
    clock = Clock()
    idle = InMemorySessionManager(backend, idle_ttl=60, clock=clock)
    poison(await idle.register("agent:bad-too", {"n": 0}))
    with capture_logs() as logs:
        good = await crowded.register("agent:good", {"n": 1})  # over capacity
        good.state["n"] = 2
        fine = await idle.register("agent:fine", {"n": 1})
        fine.state["n"] = 2
        clock.advance(61)
        assert await idle.evict_idle() == ["agent:fine"]
    failures = [entry for entry in logs if entry["event"] == "session.retire_failed"]
    assert [(f["key"], f["lifecycle_event"], f["error"]) for f in failures] == [
        ("agent:bad", "evicted", "cognitia.errors.StateNotSerializableError"),
        ("agent:bad-too", "expired", "cognitia.errors.StateNotSerializableError"),
    ]
    assert "SECRET" not in repr(logs)
    assert crowded.live_keys() == ["agent:bad", "agent:good"]
    assert idle.live_keys() == ["agent:bad-too"]
    assert (await InMemorySessionManager(backend).get("agent:fine")).state == {"n": 2}

    # Closing tries every session, then raises what failed; the manager is closed anyway.
    worse = await crowded.register("agent:worse", {})
    worse.state["when"] = object()
    with pytest.raises(ExceptionGroup) as failed:
        await crowded.aclose()
    refused = failed.value.exceptions
    assert all(isinstance(exc, StateNotSerializableError) for exc in refused)
    assert sorted(exc.key for exc in refused if isinstance(exc, StateNotSerializableError)) == [
        "agent:bad",
        "agent:worse",
    ]
    assert crowded.closed
    assert (await InMemorySessionManager(backend).get("agent:good")).state == {"n": 2}
    with pytest.raises(StateNotSerializableError, match="agent:bad-too"):
        await idle.aclose()
    assert idle.closed


@pytest.mark.parametrize("via", ["update", "decorator"])
async def test_a_conflict_raised_by_the_change_itself_is_not_retried(
    backend: SessionBackend, via: str
) -> None:
    manager = InMemorySessionManager(backend)
    await manager.register("agent:a", {"n": 0})
    runs = 0

    def change(session: Session) -> None:
        nonlocal runs
        runs += 1
        session.state["n"] += 1
        session.turns.append({"text": "half done"})
        raise VersionConflictError("agent:elsewhere", 1, 2)  # from some other session it touched

    if via == "update":
        with pytest.raises(VersionConflictError):
            await manager.update("agent:a", change)
    else:

        @persisted_session(manager, initial={"n": 0})
        async def handler(*, session_id: str, session: Session) -> None:
            change(session)

        with pytest.raises(VersionConflictError):
            await handler(session_id="agent:a")
    assert runs == 1
    live = await manager.get("agent:a")
    assert live.state == {"n": 0} and len(live.turns) == 0
    assert (await InMemorySessionManager(backend).get("agent:a")).state == {"n": 0}


async def test_a_save_that_committed_is_never_reported_as_cancelled() -> None:
    """The caller is cancelled while its save is being written: the save completes (it is
    shielded), and making room in a full live set afterwards must not turn that into a
    cancellation, or a caller retrying it would store the turn twice."""
    scope = anyio.CancelScope()

    class CancelledDuringWrite(DictBackend):
        async def save(self, key: str, state: dict[str, Any]) -> None:
            if key == "agent:b":
                scope.cancel()
            await super().save(key, state)

    storage: dict[str, str] = {}
    manager = InMemorySessionManager(CancelledDuringWrite(storage), max_sessions=1)
    await manager.update("agent:a", say("first"))
    returned = False
    with scope:
        await manager.update("agent:b", say("hello"))
        returned = True
    assert scope.cancel_called and returned
    assert manager.live_keys() == ["agent:b"]  # agent:a was evicted all the same
    assert texts(await InMemorySessionManager(DictBackend(storage)).turns("agent:b")) == ["hello"]


async def test_a_failed_change_drops_what_was_not_saved_state_and_turns_alike(
    backend: SessionBackend,
) -> None:
    """A turn queued with a state edit, neither saved, goes with it when a later change fails:
    restoring the turn without the edit would store one without the other."""
    manager = InMemorySessionManager(backend)
    session = await manager.register("agent:a", {"messages": 0})
    await manager.update("agent:a", say("stored"))
    session.state["messages"] = 1
    session.turns.append({"text": "queued"})
    await session.turns.pop()  # the queued turn
    await session.turns.pop()  # and the stored one, not saved yet

    def fail(session: Session) -> None:
        session.state["messages"] = 2
        session.turns.append({"text": "failed"})
        raise RuntimeError("the model is down")

    with pytest.raises(RuntimeError):
        await manager.update("agent:a", fail)
    live = await manager.get("agent:a")
    assert live.state == {"messages": 0}
    assert texts(await live.turns.all()) == ["stored"]
    await manager.save(live)
    assert texts(await InMemorySessionManager(backend).turns("agent:a")) == ["stored"]


async def test_a_session_storage_refuses_on_its_way_out_stays_live_with_its_unsaved_turns() -> None:
    """Storage down while a session expires or closes: it stays live, unsaved turn and all,
    and goes out once storage is back."""
    down = True

    class Flaky(DictBackend):
        async def save(self, key: str, state: dict[str, Any]) -> None:
            if down:
                raise ConnectionError("storage is unreachable")
            await super().save(key, state)

    storage: dict[str, str] = {}
    clock = Clock()
    manager = InMemorySessionManager(Flaky(storage), idle_ttl=60, clock=clock)
    down = False
    await manager.register("agent:a", {"n": 1})
    await manager.register("agent:b", {"n": 1})
    down = True
    (await manager.get("agent:a")).turns.append({"text": "unsaved"})
    (await manager.get("agent:b")).state["n"] = 2
    clock.advance(61)
    with capture_logs() as logs:
        assert await manager.evict_idle() == []
    assert [entry["key"] for entry in logs if entry["event"] == "session.retire_failed"] == [
        "agent:a",
        "agent:b",
    ]
    assert sorted(manager.live_keys()) == ["agent:a", "agent:b"]
    with pytest.raises(ExceptionGroup):
        await manager.close_all()
    assert sorted(manager.live_keys()) == ["agent:a", "agent:b"]
    down = False
    assert sorted(await manager.evict_idle()) == ["agent:a", "agent:b"]
    fresh = InMemorySessionManager(DictBackend(storage))
    assert texts(await fresh.turns("agent:a")) == ["unsaved"]
    assert (await fresh.get("agent:b")).state == {"n": 2}


async def test_callers_making_room_at_once_evict_only_what_is_over(anyio_backend: str) -> None:
    """Two sessions admitted at once into a full live set: exactly two are evicted, though
    each eviction's save is still running when the other caller looks."""

    class SlowSaves(DictBackend):
        slow = False

        async def save(self, key: str, state: dict[str, Any]) -> None:
            if self.slow:
                await anyio.sleep(0.05)
            await super().save(key, state)

    backend = SlowSaves({})
    manager = InMemorySessionManager(backend, max_sessions=3)
    evicted = record(manager, "evicted")
    for key in ("k:1", "k:2", "k:3"):
        (await manager.register(key, {})).state["dirty"] = True  # eviction must save them
    backend.slow = True
    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.register, "k:4", {})
        tg.start_soon(manager.register, "k:5", {})
    assert sorted(e.key for e in evicted) == ["k:1", "k:2"]
    assert sorted(manager.live_keys()) == ["k:3", "k:4", "k:5"]


async def test_registering_a_new_key_reads_storage_once(two_workers: Callable[[], SessionBackend]) -> None:
    """Even after deletes (on cognitia's backends a new key's first version is above every
    version removed)."""
    backend = two_workers()
    reads: list[str] = []
    manager = InMemorySessionManager(backend, revalidate=True)
    original = manager._store.read

    async def read(key: str) -> Any:
        reads.append(key)
        return await original(key)

    manager._store.read = read  # type: ignore[method-assign]
    await manager.register("agent:gone", {})
    await manager.delete("agent:gone")
    reads.clear()
    await manager.register("agent:new", {"n": 1})
    assert reads == ["agent:new"]


@pytest.mark.parametrize("retries", [0, 3])
async def test_register_replaces_the_state_however_busy_the_key(retries: int) -> None:
    """Another worker saving between every read and write: register() still goes through
    (it replaces the state whatever is stored) and knows the stored turn count."""
    storage: dict[str, str] = {}
    other = InMemorySessionManager(DictBackend(storage))
    busy = 0

    class Busy(DictBackend):
        async def load(self, key: str) -> dict[str, Any] | None:
            nonlocal busy
            loaded = await super().load(key)
            if busy:
                busy -= 1
                await other.update(key, say("from the other worker"))
            return loaded

    await other.update("agent:x", say("first"))
    busy = retries + 1
    manager = InMemorySessionManager(Busy(storage), retries=retries, revalidate=True)
    session = await manager.register("agent:x", {"replaced": True})
    stored = InMemorySessionManager(DictBackend(storage))
    assert (await stored.get("agent:x")).state == {"replaced": True}
    assert len(session.turns) == len(await stored.turns("agent:x")) == retries + 2


async def test_register_after_a_save_that_timed_out_but_landed_repeats_no_turn(
    anyio_backend: str, tmp_path: Path
) -> None:
    """close() times out while another process holds the write lock, and its write lands
    later: the live copy comes back with turns that are stored already. register() must see
    that storage moved past it, not store those turns a second time."""
    backend = SqliteSessionBackend(db_path=tmp_path / "s.db")
    manager = InMemorySessionManager(backend, save_timeout=0.2)
    session = await manager.open("agent:k", {})
    session.turns.append({"id": 1})
    await manager.save(session)
    session.turns.append({"id": 2})
    locked = threading.Event()

    def hold_the_write_lock() -> None:
        holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(2.0)  # far longer than save_timeout, shorter than the writer's 5 s busy timeout
        holder.execute("COMMIT")
        holder.close()

    other = threading.Thread(target=hold_the_write_lock)
    other.start()
    await anyio.to_thread.run_sync(locked.wait)
    with pytest.raises(TimeoutError):
        await manager.close("agent:k")
    assert "agent:k" in manager  # the outcome is unknown: the live copy stays
    await anyio.to_thread.run_sync(other.join)
    for _ in range(1000):  # the timed-out write goes through once the lock is free
        stored = await backend.load_record("agent:k")
        if stored is not None and stored.version == 2:
            break
        await anyio.sleep(0.01)
    else:
        pytest.fail("the write that timed out never landed")
    registered = await manager.register("agent:k", {"fresh": True})
    assert [t["id"] for t in await backend.load_turns("agent:k")] == [1, 2]
    assert len(registered.turns) == 2 and registered.version == 3
    await manager.aclose()
    await backend.aclose()


async def test_register_never_cuts_a_turn_it_did_not_read(anyio_backend: str) -> None:
    """A live copy with a queued pop() loses the race to another worker's append: register()
    writes its state, and the other worker's turn stays (the pop was based on a stale count)."""
    backend = InMemorySessionBackend()
    a = InMemorySessionManager(backend, revalidate=True, retries=0)
    b = InMemorySessionManager(backend, revalidate=True)
    session = await a.open("agent:k", {})
    for n in (1, 2, 3):
        session.turns.append({"text": str(n)})
    await a.save(session)
    await session.turns.pop()
    read = a._store.read
    appends = [say("4")]

    async def read_then_b_appends(key: str) -> Any:
        loaded = await read(key)
        if appends:  # once, between a's first read and its write
            await b.update("agent:k", appends.pop())
        return loaded

    a._store.read = read_then_b_appends  # type: ignore[method-assign]
    registered = await a.register("agent:k", {"fresh": True})
    a._store.read = read  # type: ignore[method-assign]
    assert texts(await b.turns("agent:k")) == ["1", "2", "3", "4"]
    assert (await b.get("agent:k")).state == {"fresh": True}
    assert len(registered.turns) == 4


async def test_a_register_that_cannot_be_stored_leaves_the_live_state(anyio_backend: str) -> None:
    manager = InMemorySessionManager(InMemorySessionBackend())
    session = await manager.register("agent:k", {"a": 1})
    with pytest.raises(StateNotSerializableError):
        await manager.register("agent:k", {"bad": object()})
    assert session.state == {"a": 1}
    session.state["a"] = 2
    await manager.save(session)
    assert (await manager.get("agent:k")).state == {"a": 2}


async def test_a_conflict_met_while_an_idle_copy_is_retired_is_retried(anyio_backend: str) -> None:
    """update() and a decorated call find their live copy idle, with unsaved changes another
    worker's save has overtaken: that conflict is retried like their own save's."""
    backend = InMemorySessionBackend()
    now = [0.0]
    a = InMemorySessionManager(backend, idle_ttl=10, revalidate=True, clock=lambda: now[0])
    b = InMemorySessionManager(backend)
    await a.register("agent:k", {"n": 0})

    @persisted_session(a, key="session_id")
    async def handler(*, session_id: str, session: Session) -> str:
        return f"n={session.state['n']}"

    for n, turn in ((1, a.update("agent:k", say("updated"))), (2, handler(session_id="agent:k"))):
        (await a.get("agent:k")).state["unsaved"] = True
        await b.update("agent:k", lambda session, n=n: session.state.update(n=n))  # type: ignore[misc]
        now[0] += 100  # a's copy is idle now
        await turn
    fresh = InMemorySessionManager(backend)
    assert (await fresh.get("agent:k")).state == {"n": 2}
    assert len(await fresh.turns("agent:k")) == 2


async def test_a_failed_change_to_a_session_never_stored_is_undone(anyio_backend: str) -> None:
    """A session made by open() has no stored copy to go back to: a change that fails drops it
    from the live set and leaves it as it was when the change began, so saving the handle
    later stores none of the change."""
    manager = InMemorySessionManager(InMemorySessionBackend())
    session = await manager.open("agent:k", {"v": 0})

    def fails(session: Session) -> None:
        session.state["half"] = True
        session.turns.append({"text": "half"})
        raise ValueError("the change fails")

    with pytest.raises(ValueError, match="the change fails"):
        await manager.update("agent:k", fails)
    assert session.state == {"v": 0} and "agent:k" not in manager
    await manager.save(session)
    fresh = InMemorySessionManager(manager._store.backend)
    assert (await fresh.get("agent:k")).state == {"v": 0}
    assert await fresh.turns("agent:k") == []


# -- calling back into the manager, and retention around keys in use ------------------------------


@pytest.mark.parametrize("step", ["saved", "evicted", "expired"])
async def test_a_hook_calling_the_manager_for_its_own_key_gets_an_error_not_a_wait(step: str) -> None:
    """A hook runs while its step holds the key: a call for that key from the hook would wait
    for itself forever. It raises RuntimeError instead."""
    clock = Clock()
    manager = InMemorySessionManager(InMemorySessionBackend(), max_sessions=1, idle_ttl=10, clock=clock)
    errors: list[str] = []

    async def reenter(event: SessionEvent) -> None:
        try:
            await manager.get(event.key)
        except RuntimeError as exc:
            errors.append(str(exc))

    manager.on(step, reenter)
    with anyio.fail_after(10):
        session = await manager.register("agent:a", {"n": 0})
        if step == "evicted":
            await manager.register("agent:b", {})  # pushes agent:a out
        elif step == "expired":
            clock.advance(60)
            await manager.evict_idle()
        else:
            await manager.save(session)
    assert len(errors) == 1
    assert "session 'agent:a' is held by this very task" in errors[0]
    # Nothing is left held: the key is usable at once.
    with anyio.fail_after(10):
        assert (await manager.get("agent:a")).state == {"n": 0}


async def test_a_decorated_handler_calling_itself_for_its_key_gets_an_error(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend)

    @persisted_session(manager)
    async def handler(depth: int, *, session_id: str, session: Session) -> int:
        session.state["depth"] = depth
        if depth == 0:
            return await handler(1, session_id=session_id)
        return depth

    with anyio.fail_after(10), pytest.raises(RuntimeError, match="'chat:1' is held by this very task"):
        await handler(0, session_id="chat:1")
    assert "chat:1" not in await manager.list_keys()  # the outer turn failed: nothing stored


async def test_another_task_waits_for_a_key_a_handler_holds(backend: SessionBackend) -> None:
    """Only the holding task itself is refused: a task the handler starts in a task group that
    outlives it waits for the key, as any other task does."""
    manager = InMemorySessionManager(backend)
    async with anyio.create_task_group() as background:

        @persisted_session(manager)
        async def handler(*, session_id: str, session: Session) -> None:
            async def later() -> None:
                await manager.update(session_id, lambda s: s.turns.append({"from": "background"}))

            background.start_soon(later)
            await anyio.sleep(0.01)  # the background task is now waiting for the key

        await handler(session_id="chat:2")
    assert [turn.get("from") for turn in await manager.turns("chat:2")] == [None, "background"]


async def test_without_a_backend_a_handle_kept_across_a_delete_is_a_conflict() -> None:
    manager = InMemorySessionManager()
    stale = await manager.register("agent:a", {"n": 1})
    await manager.delete("agent:a")
    stale.state["n"] = 2
    with pytest.raises(VersionConflictError, match="'agent:a'"):
        await manager.save(stale)
    assert "agent:a" not in manager
    closed = await manager.register("agent:b", {})
    await manager.close("agent:b")
    with pytest.raises(VersionConflictError, match="'agent:b'"):
        await manager.save(closed)


async def test_an_eviction_whose_hook_is_still_running_counts_its_session_gone_once() -> None:
    """While a slow ``evicted`` hook runs, other operations still evict down to max_sessions."""
    manager = InMemorySessionManager(InMemorySessionBackend(), max_sessions=1)
    hook_running = anyio.Event()
    release_hook = anyio.Event()

    async def slow(event: SessionEvent) -> None:
        hook_running.set()
        await release_hook.wait()

    manager.on("evicted", slow)
    await manager.register("x", {})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.register, "a", {})  # evicts x; its hook waits
            await hook_running.wait()
            manager.off("evicted", slow)
            try:
                await manager.register("b", {})  # evicts a while x's hook still runs
                live_meanwhile = manager.live_keys()
            finally:
                release_hook.set()
    assert live_meanwhile == ["b"]
    assert manager.live_keys() == ["b"]


async def test_idle_eviction_passes_over_a_key_in_use(backend: SessionBackend) -> None:
    """A handler longer than idle_ttl neither holds up the others' expiry nor deadlocks when it
    calls evict_idle itself: a key in use is not idle."""
    clock = Clock()
    manager = InMemorySessionManager(backend, idle_ttl=10, clock=clock)
    await manager.register("agent:idle", {})

    @persisted_session(manager)
    async def busy(*, session_id: str, session: Session) -> list[str]:
        clock.advance(60)
        return await manager.evict_idle()

    with anyio.fail_after(10):
        assert await busy(session_id="agent:busy") == ["agent:idle"]
    assert manager.live_keys() == ["agent:busy"]


async def test_aclose_waits_for_operations_under_way_and_closes_what_they_leave_live(tmp_path: Path) -> None:
    manager = InMemorySessionManager(SqliteSessionBackend(db_path=tmp_path / "s.db"))
    closed = record(manager, "closed")
    await manager.register("a", {})
    reading = anyio.Event()
    finish = anyio.Event()

    async def change(session: Session) -> None:
        reading.set()
        await finish.wait()
        session.state["x"] = 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.update, "n", change)
        await reading.wait()  # the update holds "n"
        tg.start_soon(manager.aclose)
        await anyio.sleep(0.05)
        with pytest.raises(BackendClosedError):
            await manager.get("b")  # closed at once for new operations
        finish.set()
    assert manager.closed and manager.live_keys() == []
    assert sorted(event.key for event in closed) == ["a", "n"]
    assert await manager.backend.load("n") == {"x": 1}  # type: ignore[union-attr]
    await manager.backend.aclose()  # type: ignore[union-attr]


@pytest.mark.parametrize("step", ["evicted", "expired", "saved"])
async def test_a_strict_hook_failing_in_an_eviction_is_logged_as_that_hook_not_as_a_failed_retirement(
    step: str,
) -> None:
    """Evictions run on behalf of another caller, so even strict hooks are not raised there.
    The step happened: the failure is the hook's, logged as ``session.hook_failed``."""
    clock = Clock()
    backend = InMemorySessionBackend()
    manager = InMemorySessionManager(backend, max_sessions=1, idle_ttl=60, clock=clock, strict_hooks=True)

    def broken(event: SessionEvent) -> None:
        raise RuntimeError("metrics are down")

    session = await manager.register("agent:a", {"n": 0})
    manager.on(step, broken)
    session.state["n"] = 1  # changed: retiring it saves it first
    with capture_logs() as logs:
        if step == "expired":
            clock.advance(61)
            assert await manager.evict_idle() == ["agent:a"]
        else:
            await manager.register("agent:b", {})  # pushes agent:a out
    failed = [(e["event"], e.get("lifecycle_event"), e.get("key")) for e in logs if e["log_level"] != "info"]
    assert failed == [("session.hook_failed", step, "agent:a")]
    assert await backend.load("agent:a") == {"n": 1}
    # Retired, or (a failed `saved` hook stops the retirement after the save) retired next time.
    if step == "saved":
        manager.off(step, broken)
        clock.advance(61)
        await manager.evict_idle()
    assert "agent:a" not in manager.live_keys()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_live_copy_dropped_on_a_conflict_is_freed_at_once(tmp_path: Path, kind: str) -> None:
    """A conflict drops the stale live copy. Nothing the error passed through keeps it (a
    frame or a job holding the error would make a cycle through its traceback), so it is
    freed by reference counting, with what integrations cache for it, not at the next
    garbage collection."""
    import gc
    import weakref

    backend: InMemorySessionBackend | SqliteSessionBackend = (
        InMemorySessionBackend() if kind == "memory" else SqliteSessionBackend(db_path=tmp_path / "c.db")
    )
    one, two = InMemorySessionManager(backend), InMemorySessionManager(backend)
    await one.register("agent:a", {"n": 0})
    await two.update("agent:a", lambda s: s.state.update(n=1))
    gc.collect()
    gc.disable()
    try:
        stale = await one.get("agent:a")
        stale.state["n"] = 2
        gone = weakref.ref(stale)
        with pytest.raises(VersionConflictError):
            await one.save(stale)
        del stale
        assert gone() is None
    finally:
        gc.enable()
        await backend.aclose()


class SharingBackend:
    """A four-method backend that keeps and hands out the very dicts it is given."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    async def save(self, key: str, state: dict[str, Any]) -> None:
        self.data[key] = state

    async def load(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def list_keys(self) -> list[str]:
        return list(self.data)


async def test_a_failed_turn_never_reaches_a_backend_that_hands_out_its_own_dicts(anyio_backend: str) -> None:
    backend = SharingBackend()
    manager = InMemorySessionManager(backend)

    @persisted_session(manager)
    async def answer(message: str, *, session_id: str, session: Session) -> str:
        session.state.setdefault("notes", []).append(message)
        if message == "boom":
            raise ValueError("the model call failed")
        return "ok"

    await answer("hello", session_id="s")
    await manager.close("s")  # the next call loads the backend's dict
    with pytest.raises(ValueError, match="model call failed"):
        await answer("boom", session_id="s")
    assert backend.data["s"]["notes"] == ["hello"]
    assert (await InMemorySessionManager(backend).get("s")).state == {"notes": ["hello"]}
    turns = await manager.turns("s")
    turns[0]["output"] = "changed by the caller"
    assert [t["output"] for t in await InMemorySessionManager(backend).turns("s")] == ["ok"]


@pytest.mark.parametrize("method", ["open", "register"])
async def test_a_session_starts_from_a_copy_of_the_state_it_is_given(
    backend: SessionBackend, method: str
) -> None:
    manager = InMemorySessionManager(backend)
    default: dict[str, Any] = {"role": "coach", "history": []}
    make = manager.open if method == "open" else manager.register
    alice = await make("agent:alice", default)
    alice.state["history"].append("alice: my diagnosis is X")
    await manager.save(alice)
    bob = await make("agent:bob", default)
    assert default == {"role": "coach", "history": []}
    assert bob.state == {"role": "coach", "history": []}
    # Checked before anything else: a state that cannot be stored never becomes live.
    with pytest.raises(StateNotSerializableError, match=r"'agent:carol': state\[.when.\] is a object"):
        await make("agent:carol", {"when": object()})
    with pytest.raises(StateNotSerializableError, match="must be a dict, got str"):
        await make("agent:carol", "not a dict")  # type: ignore[arg-type]
    assert "agent:carol" not in manager


async def test_without_a_backend_the_turn_log_is_kept_whole(anyio_backend: str) -> None:
    """The cache bound of a live turn log applies only where storage holds the older turns."""
    manager = InMemorySessionManager()
    session = await manager.open("agent:chat", {})
    count = MAX_CACHED_TURNS + 5
    for i in range(count):
        session.turns.append({"i": i})
        await manager.save(session)
    assert [t["i"] for t in await manager.turns("agent:chat")] == list(range(count))
    assert [t["i"] for t in await session.turns.last(2)] == [count - 2, count - 1]
    assert [t["i"] for t in await manager.turns("agent:chat", last=3)] == [count - 3, count - 2, count - 1]
    popped = await session.turns.pop()
    assert popped is not None and popped["i"] == count - 1
    await manager.save(session)
    assert len(await session.turns.all()) == count - 1


async def test_max_sessions_holds_when_operations_fail_or_are_cancelled(backend: SessionBackend) -> None:
    for i in range(20):
        await backend.save(f"user:{i}", {"n": i})
    manager = InMemorySessionManager(backend, max_sessions=2)

    @persisted_session(manager)
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        raise RuntimeError("the model provider is down")

    def refuse(session: Session) -> None:
        raise ValueError("bad change")

    for i in range(20):
        with pytest.raises(RuntimeError):
            await chat("hi", session_id=f"user:{i}")
        assert len(manager) <= 2
        with pytest.raises(ValueError):
            await manager.update(f"user:{19 - i}", refuse)
        assert len(manager) <= 2
        with anyio.CancelScope() as scope:
            async with manager.locked(f"user:{i}"):
                scope.cancel()
                await anyio.lowlevel.checkpoint()
        assert len(manager) <= 2
    assert (await InMemorySessionManager(backend).get("user:7")).state == {"n": 7}


async def test_a_failed_or_cancelled_operation_makes_room_without_writing(anyio_backend: str) -> None:
    """After a failure or a cancellation, eviction lets go only of sessions with nothing to
    save: the caller is not held by writes to storage that may be what is failing."""
    storage: dict[str, str] = {}
    backend = DictBackend(storage)
    manager = InMemorySessionManager(backend)
    for i in range(4):
        (await manager.open(f"agent:{i}", {"n": i})).state["changed"] = True  # unsaved
    await manager.open("agent:clean", {})
    await manager.save("agent:clean")
    manager.max_sessions = 2  # five live now: over the bound
    saves: list[str] = []
    save = backend.save

    async def counted(key: str, state: dict[str, Any]) -> None:
        saves.append(key)
        await save(key, state)

    backend.save = counted  # type: ignore[method-assign]
    with anyio.CancelScope() as scope:
        async with manager.locked("agent:new"):
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    assert saves == []
    assert sorted(manager.live_keys()) == [f"agent:{i}" for i in range(4)]  # the unsaved ones wait
    with pytest.raises(ValueError):
        await manager.update("agent:other", lambda session: (_ for _ in ()).throw(ValueError()))
    assert saves == []
    await manager.get("agent:0")  # succeeds: saves and evicts down to the bound
    assert saves == ["agent:1", "agent:2"] and manager.live_keys() == ["agent:3", "agent:0"]
    assert json.loads(storage["agent:1"])["changed"] is True


async def test_an_exception_in_the_body_of_an_entered_manager_propagates_as_raised(
    anyio_backend: str,
) -> None:
    for idle_ttl in (None, 60.0):  # without and with a sweeper task
        with pytest.raises(SessionNotFound):
            async with InMemorySessionManager(idle_ttl=idle_ttl) as manager:
                await manager.get("agent:nobody")
        with pytest.raises(KeyError):
            async with InMemorySessionManager(idle_ttl=idle_ttl):
                raise KeyError("mine")
        # Also when the caller's scope is cancelled as the body fails: the exception is
        # not replaced by the cancellation met while the sweeper stops.
        with pytest.raises(ValueError, match="body failed"):
            with anyio.CancelScope() as scope:
                async with InMemorySessionManager(idle_ttl=idle_ttl):
                    scope.cancel()
                    raise ValueError("body failed")


async def test_update_refuses_a_negative_retry_count(backend: SessionBackend) -> None:
    manager = InMemorySessionManager(backend)
    with pytest.raises(ValueError, match=r"retries must be an int >= 0, got -1 \(sessions 'k'\)"):
        await manager.update("k", lambda session: None, retries=-1)
    with pytest.raises(ValueError, match=r"retries must be an int >= 0, got -2 \(sessions 'j', 'k'\)"):
        await manager.update_many(["k", "j"], lambda sessions: None, retries=-2)
    assert await backend.load("k") is None
