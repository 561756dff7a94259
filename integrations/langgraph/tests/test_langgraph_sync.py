"""LangGraph's sync API (graph.invoke) through the saver: from plain code, and from trio via a thread."""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.graph import END, START, StateGraph

from cognitia import SessionEvent
from cognitia.session.backends import SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver

CFG: RunnableConfig = {"configurable": {"thread_id": "sync-thread"}}
A = TypeVar("A")


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


class Fan(TypedDict):
    log: Annotated[list[str], operator.add]


def fan_out_graph(saver: CognitiaSaver, width: int) -> Any:
    """One step of ``width`` nodes run at once: LangGraph saves their writes from its own threads."""
    builder = StateGraph(Fan)
    for i in range(width):
        builder.add_node(f"n{i}", lambda state, i=i: {"log": [f"n{i}"]})
        builder.add_edge(START, f"n{i}")
        builder.add_edge(f"n{i}", END)
    return builder.compile(checkpointer=saver)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("thread", ["anyio worker", "plain thread"])
async def test_parallel_branches_in_a_worker_thread_save_on_the_host_loop(
    anyio_backend: str, thread: str, tmp_path: Path
) -> None:
    """Writes LangGraph saves from its pool threads (outside the caller's context) go to the host
    loop too, as do the calls of a thread anyio did not start (the saver was made on the loop)."""
    async with SqliteSessionBackend(db_path=tmp_path / "fan.db") as backend:
        saver = CognitiaSaver(backend)
        events: list[SessionEvent] = []
        saver.manager.on("saved", events.append)
        graph = fan_out_graph(saver, 8)

        def invoke(n: int) -> Any:
            return graph.invoke({"log": [f"start {n}"]}, {"configurable": {"thread_id": "fan"}})

        outputs = []
        with anyio.fail_after(60):  # a call stuck on a second loop fails the test, not the run
            for n in range(3):
                if thread == "anyio worker":
                    outputs.append(await anyio.to_thread.run_sync(invoke, n, abandon_on_cancel=True))
                else:
                    outputs.append(await in_plain_thread(invoke, n))

        assert sorted(outputs[-1]["log"]) == sorted(
            [f"start {n}" for n in range(3)] + [f"n{i}" for n in range(3) for i in range(8)]
        )
        assert {e.runtime for e in events} == {anyio_backend}
        latest = await saver.aget_tuple({"configurable": {"thread_id": "fan"}})
        assert latest is not None and len(latest.checkpoint["channel_values"]["log"]) == 27


async def in_plain_thread(fn: Callable[[A], Any], arg: A) -> Any:
    """``fn(arg)`` in a thread of its own (as ``asyncio.to_thread`` or an executor would run it)."""
    done = anyio.Event()
    token = anyio.lowlevel.current_token()
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(fn(arg))
        except BaseException as exc:  # handed to the awaiting task
            result.append(exc)
        anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=target, daemon=True).start()
    await done.wait()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_saver_made_off_the_loop_is_never_driven_by_two_loops_at_once(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A saver made where no event loop runs, first called from a plain thread (as
    ``asyncio.to_thread(graph.invoke)`` does): that call runs on a loop of the saver's own, and
    an async call on the application's loop meanwhile waits for it instead of driving the
    session manager from a second loop. Later sync calls go to the application's loop."""
    async with SqliteSessionBackend(db_path=tmp_path / "two-loops.db") as backend:
        saver = await anyio.to_thread.run_sync(CognitiaSaver, backend)  # no loop in that thread
        off_loop, on_loop = saver.key("off-loop"), saver.key("on-loop")
        entered, release = threading.Event(), threading.Event()
        order: list[tuple[str, threading.Thread]] = []

        def on_saved(event: SessionEvent) -> None:
            if event.key == off_loop and not entered.is_set():
                entered.set()
                release.wait(30)  # holds the first off-loop save open while the loop calls aput
            order.append((event.key, threading.current_thread()))

        saver.manager.on("saved", on_saved)

        def put(thread_id: str) -> Any:
            config: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
            return saver.put(config, empty_checkpoint(), {}, {})

        async def release_soon() -> None:
            await anyio.sleep(0.5)
            release.set()

        loop_thread = threading.current_thread()
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(in_plain_thread, put, "off-loop")
                await anyio.to_thread.run_sync(entered.wait, 30)
                tg.start_soon(release_soon)
                await saver.aput(
                    {"configurable": {"thread_id": "on-loop", "checkpoint_ns": ""}},
                    empty_checkpoint(),
                    {},
                    {},
                )
            await in_plain_thread(put, "off-loop")

        assert [key for key, _ in order] == [off_loop, on_loop, off_loop]
        assert order[0][1] is not loop_thread  # the first ran on a loop of the saver's own
        assert [thread for _, thread in order[1:]] == [loop_thread, loop_thread]
        assert len(list(await saver.manager.list_keys())) == 2
