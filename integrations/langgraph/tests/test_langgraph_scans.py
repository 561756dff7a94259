"""Calls that look at every thread: ``list(None)`` and ``delete_for_runs``.

They come newest first across threads, leave the manager's live set as they found it
(a scan of a large store must not keep it in memory), and pass over sessions of the same
manager that are not LangGraph threads; a call naming such a session is refused by key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint

from cognitia import InMemorySessionManager
from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The saver's async methods, called directly, run on both runtimes."""
    return str(request.param)


def cfg(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


async def put(saver: CognitiaSaver, thread_id: str, run_id: str = "r0") -> str:
    checkpoint = empty_checkpoint()  # ids grow with time, across threads too
    await saver.aput(cfg(thread_id), checkpoint, {"run_id": run_id}, {})
    return checkpoint["id"]


async def listed(saver: CognitiaSaver, **kwargs: Any) -> list[tuple[str, str]]:
    return [
        (t.config["configurable"]["thread_id"], t.config["configurable"]["checkpoint_id"])
        async for t in saver.alist(None, **kwargs)
    ]


async def test_every_thread_is_listed_newest_first(anyio_backend: str) -> None:
    saver = CognitiaSaver(InMemorySessionBackend())
    order = [("b", await put(saver, "b")), ("a", await put(saver, "a")), ("b", await put(saver, "b"))]
    newest_first = order[::-1]
    assert await listed(saver) == newest_first
    assert await listed(saver, limit=1) == newest_first[:1]
    assert await listed(saver, limit=2) == newest_first[:2]
    assert await listed(saver, limit=0) == []
    assert await listed(saver, before={"configurable": {"checkpoint_id": order[2][1]}}) == newest_first[1:]


async def test_scans_leave_the_live_set_as_they_found_it(anyio_backend: str, tmp_path: Path) -> None:
    db = tmp_path / "threads.db"
    async with SqliteSessionBackend(db) as backend:
        writer = CognitiaSaver(backend)
        for n in range(30):
            await put(writer, f"t{n}", run_id=f"r{n}")
    async with SqliteSessionBackend(db) as backend:
        saver = CognitiaSaver(backend)
        await saver.aget_tuple(cfg("t7"))  # a thread in use stays live
        assert saver.manager.live_keys() == ["langgraph:t7"]
        assert len(await listed(saver)) == 30
        assert saver.manager.live_keys() == ["langgraph:t7"]
        await saver.adelete_for_runs(["no-such-run"])
        assert saver.manager.live_keys() == ["langgraph:t7"]
        await saver.adelete_for_runs(["r3"])
        assert len(await listed(saver)) == 29
        assert await saver.aget_tuple(cfg("t3")) is None
    async with SqliteSessionBackend(db) as backend:
        assert len(await listed(CognitiaSaver(backend))) == 29


async def test_other_sessions_of_the_manager_are_passed_over_and_refused_by_key(anyio_backend: str) -> None:
    manager = InMemorySessionManager(InMemorySessionBackend())
    saver = CognitiaSaver(manager)
    first = await put(saver, "t1", run_id="r1")
    second = await put(saver, "t2", run_id="r2")
    await manager.register("langgraph:chat", {"messages": ["hello"]})  # the application's own
    assert await listed(saver) == [("t2", second), ("t1", first)]
    await saver.adelete_for_runs(["r1"])
    assert await listed(saver) == [("t2", second)]
    refused = "session 'langgraph:chat' is not a LangGraph thread"
    with pytest.raises(ValueError, match=refused):
        await saver.aget_tuple(cfg("chat"))
    with pytest.raises(ValueError, match=refused):
        await saver.aput(cfg("chat"), empty_checkpoint(), {}, {})
    with pytest.raises(ValueError, match=refused):
        await saver.aput_writes(
            {"configurable": {**cfg("chat")["configurable"], "checkpoint_id": "x"}}, [("c", 1)], "task"
        )
    with pytest.raises(ValueError, match=refused):
        await saver.acopy_thread("chat", "copy")
    with pytest.raises(ValueError, match=refused):
        await saver.acopy_thread("t2", "chat")
    with pytest.raises(ValueError, match=refused):
        await saver.aprune(["chat"])
    stored = await manager.get("langgraph:chat")
    assert stored.state == {"messages": ["hello"]} and len(stored.turns) == 0


def test_the_key_prefix_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="key_prefix must not be empty"):
        CognitiaSaver(InMemorySessionBackend(), key_prefix="")


async def test_listing_every_thread_with_a_limit_holds_only_what_it_returns(
    anyio_backend: str, tmp_path: Path
) -> None:
    """``list(None, limit=1)`` reads every thread, but keeps of each only the checkpoints
    it may still return, not the thread's stored values: its memory does not grow with
    the store."""
    import tracemalloc

    from langgraph.checkpoint.base import create_checkpoint

    async with SqliteSessionBackend(tmp_path / "threads.db") as backend:
        writer = CognitiaSaver(backend)
        for i in range(40):
            base = empty_checkpoint()
            base["channel_values"] = {"notes": f"{i}:" + "x" * 50_000}
            base["channel_versions"] = {"notes": writer.get_next_version(None, None)}
            await writer.aput(cfg(f"t{i}"), create_checkpoint(base, None, 1), {}, base["channel_versions"])
        await writer.manager.close_all()

        reader = CognitiaSaver(backend)
        tracemalloc.start()
        try:
            [newest] = [t async for t in reader.alist(None, limit=1)]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert newest.config["configurable"]["thread_id"] == "t39"
        assert newest.checkpoint["channel_values"]["notes"].startswith("39:")
        # 40 threads of 50 KB each: holding them all would take 2 MB.
        assert peak < 1_000_000, peak
