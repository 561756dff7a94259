"""Lifecycle hooks and structlog events: one code path, measurements only, never state content."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

import cognitia
from cognitia import EVENTS, HookError, InMemorySessionManager, Session, SessionEvent, persisted_session
from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend

pytestmark = pytest.mark.anyio

SECRET = "tr0ub4dor-SECRET-7f3a"


def test_the_event_names() -> None:
    assert set(EVENTS) == {
        "registered",
        "loaded",
        "saved",
        "closed",
        "deleted",
        "expired",
        "evicted",
        "conflict",
        "pruned",
    }


async def test_sync_and_async_hooks_see_a_typical_lifecycle_in_order(anyio_backend: str) -> None:
    manager = InMemorySessionManager(backend=InMemorySessionBackend())
    seen: list[tuple[str, str]] = []

    def sync_hook(event: SessionEvent) -> None:
        seen.append(("sync", event.name))

    async def async_hook(event: SessionEvent) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(("async", event.name))

    for name in EVENTS:
        manager.on(name, sync_hook)
        manager.on(name, async_hook)

    session = await manager.register("agent:u1", {"n": 0})
    session.state["n"] = 1
    await manager.save(session)
    await manager.close("agent:u1")
    await manager.get("agent:u1")
    await manager.delete("agent:u1")

    names = ["registered", "saved", "closed", "loaded", "deleted"]
    assert seen == [(kind, name) for name in names for kind in ("sync", "async")]


async def test_event_payload(anyio_backend: str, tmp_path: Path) -> None:
    async with SqliteSessionBackend(db_path=tmp_path / "s.db") as backend:
        manager = InMemorySessionManager(backend=backend)
        events: list[SessionEvent] = []
        for name in EVENTS:
            manager.on(name, events.append)

        session = await manager.register("agent:u1", {"text": "héllo"})
        session.turns.append({"said": "hi"})
        session.turns.append({"said": "yo"})
        await manager.save(session)
        await manager.close("agent:u1")
        await manager.get("agent:u1")
        await manager.delete("agent:u1")
        await manager.register("plain", {})

    size = len('{"text":"héllo"}'.encode())
    registered, saved, closed, loaded, deleted, plain = events
    for event in events:
        assert event.runtime == anyio_backend
        assert event.backend == "sqlite"
        assert event.duration >= 0
        assert isinstance(event.duration, float)
    assert [e.name for e in events] == ["registered", "saved", "closed", "loaded", "deleted", "registered"]
    assert {e.key for e in events[:5]} == {"agent:u1"}
    assert {e.scope for e in events[:5]} == {"agent"}
    assert plain.scope is None and plain.key == "plain"
    assert (registered.version, registered.bytes, registered.turns) == (1, size, 0)
    assert (saved.version, saved.bytes, saved.turns) == (2, size, 2)
    assert (closed.version, closed.reason) == (2, None)
    assert (loaded.version, loaded.bytes, loaded.turns) == (2, size, 2)
    assert deleted.version == 2
    with pytest.raises(AttributeError):
        saved.version = 3  # type: ignore[misc]
    assert not hasattr(saved, "state")


async def test_events_without_a_backend_name_the_backend_none() -> None:
    manager = InMemorySessionManager()
    events: list[SessionEvent] = []
    manager.on("registered", events.append)
    await manager.register("k", {})
    assert events[0].backend == "none"


async def test_unregister_with_the_handle_and_with_off() -> None:
    manager = InMemorySessionManager()
    calls: list[str] = []

    def first(event: SessionEvent) -> None:
        calls.append("first")

    def second(event: SessionEvent) -> None:
        calls.append("second")

    handle = manager.on("saved", first)
    manager.on("saved", second)
    assert "first" in repr(handle) and handle.event == "saved" and handle.hook is first
    session = await manager.register("k", {})
    await manager.save(session)
    assert calls == ["first", "second"]

    assert handle() is True
    assert handle.cancel() is False  # already gone
    await manager.save(session)
    assert calls == ["first", "second", "second"]

    assert manager.off("saved", second) is True
    assert manager.off("saved", second) is False
    await manager.save(session)
    assert calls == ["first", "second", "second"]


async def test_the_decorator_form() -> None:
    manager = InMemorySessionManager()
    seen: list[int] = []

    @manager.on("saved")
    async def on_saved(event: SessionEvent) -> None:
        seen.append(event.version)

    assert callable(on_saved) and on_saved.__name__ == "on_saved"  # returned unchanged
    session = await manager.register("k", {})
    await manager.save(session)
    assert manager.off("saved", on_saved)
    await manager.save(session)
    assert seen == [2]


def test_unknown_event_names_are_rejected() -> None:
    manager = InMemorySessionManager()
    with pytest.raises(ValueError, match="unknown lifecycle event 'save'"):
        manager.on("save", print)
    with pytest.raises(ValueError, match="unknown lifecycle event"):
        manager.on("bogus")
    with pytest.raises(ValueError, match="unknown lifecycle event"):
        manager.off("bogus", print)
    with pytest.raises(TypeError, match="callable"):
        manager.on("saved", "not a function")  # type: ignore[call-overload]


async def test_a_raising_hook_neither_fails_nor_undoes_the_step() -> None:
    backend = InMemorySessionBackend()
    manager = InMemorySessionManager(backend=backend)
    after: list[int] = []

    def broken_hook(event: SessionEvent) -> None:
        raise RuntimeError("hook bug")

    async def broken_async_hook(event: SessionEvent) -> None:
        await anyio.lowlevel.checkpoint()
        raise KeyError("async hook bug")

    manager.on("saved", broken_hook)
    manager.on("saved", broken_async_hook)
    manager.on("saved", lambda event: after.append(event.version))  # later hooks still run

    session = await manager.register("k", {"n": 0})
    session.state["n"] = 1
    with capture_logs() as logs:
        await manager.save(session)
    assert session.version == 2
    assert await backend.load("k") == {"n": 1}
    assert after == [2]
    failures = [entry for entry in logs if entry["event"] == "session.hook_failed"]
    where = "test_a_raising_hook_neither_fails_nor_undoes_the_step.<locals>."
    assert [(f["hook"], f["error"], f["lifecycle_event"]) for f in failures] == [
        (where + "broken_hook", "RuntimeError", "saved"),
        (where + "broken_async_hook", "KeyError", "saved"),
    ]
    assert all(f["log_level"] == "error" and f["key"] == "k" for f in failures)


async def test_strict_hooks_raise_hook_error() -> None:
    backend = InMemorySessionBackend()
    manager = InMemorySessionManager(backend=backend, strict_hooks=True)

    def broken_hook(event: SessionEvent) -> None:
        raise RuntimeError("hook bug")

    manager.on("registered", broken_hook)
    with pytest.raises(HookError) as info:
        await manager.register("k", {"n": 0})
    error = info.value
    assert (error.event, error.key) == ("registered", "k")
    assert error.hook.endswith("broken_hook")
    assert isinstance(error.__cause__, RuntimeError)
    assert await backend.load("k") == {"n": 0}  # the step itself happened


async def test_hooks_fire_for_decorated_calls_through_a_manager() -> None:
    manager = InMemorySessionManager(backend=InMemorySessionBackend())
    events: list[tuple[str, int, int]] = []
    manager.on("saved", lambda e: events.append((e.name, e.version, e.turns)))

    @persisted_session(manager, key="session_id")
    async def chat(message: str, *, session_id: str, session: Session) -> str:
        return message

    await chat("a", session_id="k")
    await chat("b", session_id="k")
    assert events == [("saved", 1, 1), ("saved", 2, 1)]


def _flatten(logs: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(repr(sorted(entry.items(), key=lambda kv: kv[0])) for entry in logs)


async def test_logs_carry_measurements_and_never_state_content(anyio_backend: str, tmp_path: Path) -> None:
    async with SqliteSessionBackend(db_path=tmp_path / "s.db") as backend:
        manager = InMemorySessionManager(backend=backend, max_sessions=1)

        def broken_hook(event: SessionEvent) -> None:
            raise RuntimeError("hook bug")

        manager.on("closed", broken_hook)

        @persisted_session(manager, key="session_id")
        async def chat(message: str, *, session_id: str, session: Session) -> str:
            session.state["notes"] = [f"the user said {message}"]
            return f"echo {message}"

        with capture_logs() as logs:
            session = await manager.register("agent:u1", {"password": SECRET})
            session.turns.append({"said": SECRET})
            await manager.save(session)
            await manager.close("agent:u1")
            session = await manager.get("agent:u1")
            await chat(SECRET, session_id="agent:u2")  # evicts agent:u1 (capacity)
            await manager.get("agent:u1")
            await manager.delete("agent:u1")

    names = [entry["event"] for entry in logs]
    assert names == [
        "session.registered",
        "session.saved",
        "session.closed",
        "session.hook_failed",
        "session.loaded",
        "session.saved",
        "session.evicted",
        "session.loaded",
        "session.evicted",
        "session.deleted",
    ]
    for entry in logs:
        if entry["event"] == "session.hook_failed":
            continue
        assert entry["log_level"] == "info"
        fields = {"key", "scope", "backend", "runtime", "version", "bytes", "duration_ms", "turns"}
        assert set(entry) >= fields
        assert entry["runtime"] == anyio_backend
        assert entry["backend"] == "sqlite"
        assert entry["scope"] == "agent"
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] >= 0
    saved = logs[1]
    assert (saved["key"], saved["version"], saved["turns"]) == ("agent:u1", 2, 1)
    assert saved["bytes"] == len(f'{{"password":"{SECRET}"}}')
    assert logs[6]["reason"] == "capacity"

    text = _flatten(logs)
    assert SECRET not in text
    assert "the user said" not in text and "echo" not in text and "password" not in text


async def test_the_log_event_and_the_hook_come_from_one_emission() -> None:
    manager = InMemorySessionManager()
    hooked: list[SessionEvent] = []
    for name in EVENTS:
        manager.on(name, hooked.append)
    with capture_logs() as logs:
        session = await manager.register("k", {})
        await manager.save(session)
        await manager.close("k")
    assert [entry["event"] for entry in logs] == [f"session.{e.name}" for e in hooked]
    assert [entry["version"] for entry in logs] == [e.version for e in hooked]
    assert [entry["bytes"] for entry in logs] == [e.bytes for e in hooked]


def test_the_library_does_not_configure_structlog() -> None:
    package = Path(cognitia.__file__).parent
    for source in package.rglob("*.py"):
        assert "structlog.configure" not in source.read_text(), source


async def test_a_hook_slower_than_save_timeout_does_not_fail_the_committed_save() -> None:
    backend = InMemorySessionBackend()
    manager = InMemorySessionManager(backend=backend, save_timeout=0.5)

    async def slow(event: SessionEvent) -> None:
        await anyio.sleep(0.8)

    manager.on("saved", slow)
    session = await manager.register("agent:slow", {"n": 0})
    session.state["n"] = 1
    saved = await manager.save(session)
    assert saved.version == 2
    assert await backend.load("agent:slow") == {"n": 1}


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("step", list(EVENTS))
async def test_every_step_that_happened_reaches_its_hooks_even_if_the_caller_is_cancelled(
    step: str, anyio_backend: str
) -> None:
    """The caller is cancelled while the step's first hook runs: the step happened and is
    logged, so every hook of it still runs to the end, whichever step it is."""
    clock = _Clock()
    backend = InMemorySessionBackend(ttl=60, clock=clock)
    manager = InMemorySessionManager(backend, max_sessions=2, idle_ttl=30, clock=clock)
    other = InMemorySessionManager(backend)
    await manager.register("agent:a", {"n": 0})
    await manager.register("agent:b", {"n": 0})
    stale = await other.get("agent:a")
    await manager.update("agent:a", lambda s: s.state.update(n=1))
    if step == "loaded":
        await manager.close("agent:a")
    elif step == "pruned":
        await manager.close_all()
        clock.now += 120

    reached: list[str] = []
    scope = anyio.CancelScope()

    def cancel_the_caller(event: SessionEvent) -> None:
        scope.cancel()

    async def finish(event: SessionEvent) -> None:
        await anyio.lowlevel.checkpoint()  # where an unshielded hook would be cancelled
        reached.append(event.name)

    manager.on(step, cancel_the_caller)
    manager.on(step, finish)
    other.on(step, cancel_the_caller)
    other.on(step, finish)
    with scope:
        if step == "registered":
            await manager.register("agent:c", {})
        elif step == "loaded":
            await manager.get("agent:a")
        elif step == "saved":
            await manager.update("agent:a", lambda s: s.state.update(n=2))
        elif step == "closed":
            await manager.close("agent:a")
        elif step == "deleted":
            await manager.delete("agent:a")
        elif step == "expired":
            clock.now += 60
            await manager.evict_idle()
        elif step == "evicted":
            await manager.register("agent:c", {})
        elif step == "conflict":
            stale.state["n"] = 9
            with pytest.raises(cognitia.VersionConflictError):
                await other.save(stale)
        elif step == "pruned":
            assert await manager.prune() == ["agent:a", "agent:b"]
    assert scope.cancel_called
    assert reached and set(reached) == {step}


async def test_a_hook_that_never_returns_is_cancelled_after_save_timeout(anyio_backend: str) -> None:
    """Hooks are shielded, but not for ever: one still running after the manager's
    save_timeout is cancelled and logged as failed, and the step, done, returns."""
    manager = InMemorySessionManager(InMemorySessionBackend(), save_timeout=0.2)
    after: list[str] = []

    async def stuck(event: SessionEvent) -> None:
        await anyio.sleep_forever()

    manager.on("deleted", stuck)
    manager.on("deleted", lambda event: after.append(event.name))
    await manager.register("agent:a", {})
    with capture_logs() as logs, anyio.fail_after(10):
        assert await manager.delete("agent:a") is True
    failed = [e for e in logs if e["event"] == "session.hook_failed"]
    assert [(e["lifecycle_event"], e["hook"].rsplit(".", 1)[-1], e["error"]) for e in failed] == [
        ("deleted", "stuck", "TimeoutError")
    ]
    assert after == ["deleted"]  # the hooks after it still ran

    strict = InMemorySessionManager(InMemorySessionBackend(), save_timeout=0.2, strict_hooks=True)
    strict.on("deleted", stuck)
    await strict.register("agent:a", {})
    with anyio.fail_after(10), pytest.raises(HookError) as raised:
        await strict.delete("agent:a")
    assert isinstance(raised.value.__cause__, TimeoutError)
    assert await strict.list_keys() == []
