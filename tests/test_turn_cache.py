"""A live session's in-memory turn tail: bounded, and never stale after a read races a save."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from cognitia import InMemorySessionManager
from cognitia.session import _session
from cognitia.session.backends import InMemorySessionBackend

pytestmark = pytest.mark.anyio


async def test_the_cached_tail_is_bounded_and_older_turns_are_reread(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_session, "MAX_CACHED_TURNS", 10)
    manager = InMemorySessionManager(backend=InMemorySessionBackend())
    session = await manager.register("agent:long", {})
    for i in range(25):
        session.turns.append({"i": i})
        await manager.save(session)
    assert len(session.turns._known) == 10
    assert await session.turns.last(3) == [{"i": 22}, {"i": 23}, {"i": 24}]
    assert await session.turns.all() == [{"i": i} for i in range(25)]
    # Reads of more than the bound return everything and keep the bound: a read-only
    # session (a history view) does not hold its whole log until its next save.
    assert len(session.turns._known) == 10
    assert await session.turns.last(20) == [{"i": i} for i in range(5, 25)]
    assert len(session.turns._known) == 10
    session.turns.append({"i": 25})
    assert await session.turns.last(30) == [{"i": i} for i in range(26)]
    assert await session.turns.all() == [{"i": i} for i in range(26)]
    await manager.save(session)
    assert await session.turns.all() == [{"i": i} for i in range(26)]
    assert len(session.turns._known) == 10


async def test_the_newest_turns_span_stored_and_queued_ones(anyio_backend: str) -> None:
    manager = InMemorySessionManager(backend=InMemorySessionBackend())
    session = await manager.register("agent:mixed", {})
    for i in range(5):
        session.turns.append({"i": i})
    await manager.save(session)
    for i in range(5, 8):
        session.turns.append({"i": i})  # queued, not saved yet
    every = [{"i": i} for i in range(8)]
    for n in range(11):
        newest = await session.turns.last(n)
        assert newest == (every[-n:] if n else [])
        newest.append({"mine": True})  # a list of the caller's own
    assert await session.turns.all() == every


class GatedBackend(InMemorySessionBackend):
    """Holds load_turns until released, so a save can land while a read is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = anyio.Event()
        self.release = anyio.Event()
        self.gate = False

    async def load_turns(self, key: str, *, last: int | None = None) -> list[dict[str, Any]]:
        result = await super().load_turns(key, last=last)
        if self.gate:
            self.gate = False
            self.reading.set()
            await self.release.wait()
        return result


async def test_a_read_that_raced_a_save_is_redone(anyio_backend: str) -> None:
    backend = GatedBackend()
    writer = InMemorySessionManager(backend=backend)
    session = await writer.register("agent:race", {})
    for i in range(3):
        session.turns.append({"i": i})
        await writer.save(session)
    reader = InMemorySessionManager(backend=backend)
    live = await reader.get("agent:race")
    backend.gate = True
    results: list[list[dict[str, Any]]] = []

    async def read_all() -> None:
        results.append(await live.turns.all())

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_all)
        await backend.reading.wait()
        live.turns.append({"i": 3})
        await reader.save(live)  # commits while the read above is still in flight
        backend.release.set()
    assert results == [[{"i": i} for i in range(4)]]
    assert await live.turns.last(4) == [{"i": i} for i in range(4)]
