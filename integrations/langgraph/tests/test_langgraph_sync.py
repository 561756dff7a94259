"""LangGraph's sync API (graph.invoke) through the saver: from plain code, and from trio via a thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig

from cognitia import SessionEvent
from cognitia.session.backends import SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver

CFG: RunnableConfig = {"configurable": {"thread_id": "sync-thread"}}


def test_invoke_without_an_event_loop(build_agent: Any, tool_call_message: Any, tmp_path: Path) -> None:
    """A plain script: graph.invoke works, and a second backend on the file sees the thread."""
    backend = SqliteSessionBackend(db_path=tmp_path / "sync.db")
    try:
        graph = build_agent(
            CognitiaSaver(backend), [tool_call_message("Nice", "c1"), AIMessage(content="warm")]
        )
        out = graph.invoke({"messages": [HumanMessage(content="Nice?")]}, CFG)
        assert out["messages"][-1].content == "warm"
    finally:
        backend.close()

    reopened = SqliteSessionBackend(db_path=tmp_path / "sync.db")
    try:
        saver = CognitiaSaver(reopened)
        graph = build_agent(saver, [AIMessage(content="still warm")])
        assert len(list(saver.list(CFG))) == len(list(graph.get_state_history(CFG)))
        out = graph.invoke({"messages": [HumanMessage(content="again?")]}, CFG)
        assert [m.content for m in out["messages"]][-2:] == ["again?", "still warm"]
    finally:
        reopened.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_invoke_in_a_worker_thread_runs_on_the_host_loop(
    anyio_backend: str, build_agent: Any, tool_call_message: Any, tmp_path: Path
) -> None:
    """graph.invoke in anyio.to_thread.run_sync: every save, from any LangGraph thread, runs on the host loop.

    This is how a trio application uses LangGraph, whose own async loop is asyncio-only.
    """
    async with SqliteSessionBackend(db_path=tmp_path / "thread.db") as backend:
        saver = CognitiaSaver(backend)
        events: list[SessionEvent] = []
        saver.manager.on("saved", events.append)
        graph = build_agent(saver, [tool_call_message("Bern", "c1"), AIMessage(content="cool")])

        out = await anyio.to_thread.run_sync(graph.invoke, {"messages": [HumanMessage(content="Bern?")]}, CFG)

        assert out["messages"][-1].content == "cool"
        assert events and {e.runtime for e in events} == {anyio_backend}
        latest = await saver.aget_tuple(CFG)
        assert latest is not None
        assert [m.content for m in latest.checkpoint["channel_values"]["messages"]][-1] == "cool"


@pytest.mark.anyio
async def test_sync_call_on_the_event_loop_thread_is_refused() -> None:
    """Blocking the loop's own thread would stall it: the error says what to use instead."""
    from cognitia.session.backends import InMemorySessionBackend

    saver = CognitiaSaver(InMemorySessionBackend())
    with pytest.raises(RuntimeError, match="ainvoke"):
        saver.get_tuple(CFG)
