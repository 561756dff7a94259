"""A real LangGraph agent (tool-calling loop, fake model, no network) checkpointed through cognitia."""

from __future__ import annotations

import base64
import json
import operator
from collections.abc import Callable
from typing import Annotated, Any, TypedDict

import anyio
import pytest
import structlog.testing
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from cognitia import SessionEvent
from cognitia.session.backends import InMemorySessionBackend
from cognitia_langgraph import CognitiaSaver

pytestmark = pytest.mark.anyio

ToolCall = Callable[[str, str], AIMessage]


def config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


async def test_multi_turn_run_resumes_after_restart(
    build_agent: Any, tool_call_message: ToolCall, persistent_backend_factory: Any
) -> None:
    """A new backend object over the same storage resumes the thread, its messages and checkpoint history."""
    cfg = config("user-42")

    async with persistent_backend_factory() as backend:
        graph = build_agent(
            CognitiaSaver(backend),
            [tool_call_message("Paris", "call-1"), AIMessage(content="It is sunny in Paris.")],
        )
        first = await graph.ainvoke({"messages": [HumanMessage(content="Weather in Paris?")]}, cfg)
        assert [type(m) for m in first["messages"]] == [HumanMessage, AIMessage, ToolMessage, AIMessage]
        assert first["messages"][2].content == "sunny, 24 degrees in Paris"
        history_before = [
            s.config["configurable"]["checkpoint_id"] async for s in graph.aget_state_history(cfg)
        ]

    async with persistent_backend_factory() as backend:
        saver = CognitiaSaver(backend)
        graph = build_agent(
            saver, [tool_call_message("Oslo", "call-2"), AIMessage(content="Oslo is sunny too.")]
        )
        resumed = await graph.aget_state(cfg)
        assert [m.content for m in resumed.values["messages"]] == [m.content for m in first["messages"]]
        assert resumed.next == ()

        second = await graph.ainvoke({"messages": [HumanMessage(content="And in Oslo?")]}, cfg)
        contents = [m.content for m in second["messages"]]
        assert contents[:4] == [m.content for m in first["messages"]]
        assert contents[4:] == ["And in Oslo?", "", "sunny, 24 degrees in Oslo", "Oslo is sunny too."]

        history = [s async for s in graph.aget_state_history(cfg)]
        ids = [s.config["configurable"]["checkpoint_id"] for s in history]
        assert ids[len(ids) - len(history_before) :] == history_before, (
            "the old checkpoints are all still there"
        )
        assert len(ids) > len(history_before)
        assert ids == sorted(ids, reverse=True)
        # Every checkpoint but the first points at the one before it.
        parents = [
            s.parent_config["configurable"]["checkpoint_id"] if s.parent_config else None for s in history
        ]
        assert parents == [*ids[1:], None]

        # Time travel: an old checkpoint is readable with its state at that time.
        oldest_full = next(s for s in reversed(history) if len(s.values.get("messages", [])) == 4)
        tup = await saver.aget_tuple(oldest_full.config)
        assert tup is not None and len(tup.checkpoint["channel_values"]["messages"]) == 4


async def test_failed_step_keeps_pending_writes_for_resume(persistent_backend_factory: Any) -> None:
    """When one of two parallel nodes fails, the other's writes are stored and not redone on resume."""
    calls = {"fetch": 0, "flaky": 0}

    class State(TypedDict):
        log: Annotated[list[str], operator.add]

    def fetch(state: State) -> dict[str, list[str]]:
        calls["fetch"] += 1
        return {"log": ["fetched"]}

    def flaky(state: State) -> dict[str, list[str]]:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("upstream down")
        return {"log": ["flaky ok"]}

    builder = StateGraph(State)
    builder.add_node("fetch", fetch)
    builder.add_node("flaky", flaky)
    builder.add_edge(START, "fetch")
    builder.add_edge(START, "flaky")
    builder.add_edge(["fetch", "flaky"], END)
    cfg = config("flaky")

    async with persistent_backend_factory() as backend:
        graph = builder.compile(checkpointer=CognitiaSaver(backend))
        with pytest.raises(ConnectionError):
            await graph.ainvoke({"log": ["start"]}, cfg)

    async with persistent_backend_factory() as backend:
        saver = CognitiaSaver(backend)
        latest = await saver.aget_tuple(cfg)
        assert latest is not None and latest.pending_writes is not None
        assert ("log", ["fetched"]) in [(channel, value) for _, channel, value in latest.pending_writes]
        assert any(channel == "__error__" for _, channel, _ in latest.pending_writes)

        graph = builder.compile(checkpointer=saver)
        done = await graph.ainvoke(None, cfg)
    assert calls == {"fetch": 1, "flaky": 2}, "the successful node's stored writes were reused"
    assert sorted(done["log"]) == ["fetched", "flaky ok", "start"]


async def test_concurrent_threads_stay_separate(
    build_agent: Any, tool_call_message: ToolCall, backend_factory: Any
) -> None:
    """Threads run at the same time through one saver never see each other's messages."""
    saver = CognitiaSaver(backend_factory())
    cities = ["Lima", "Kyiv", "Baku", "Doha"]
    results: dict[str, list[str]] = {}

    async def run(city: str) -> None:
        graph = build_agent(
            saver, [tool_call_message(city, f"call-{city}"), AIMessage(content=f"done {city}")]
        )
        out = await graph.ainvoke({"messages": [HumanMessage(content=f"weather {city}")]}, config(city))
        results[city] = [str(m.content) for m in out["messages"]]

    async with anyio.create_task_group() as tg:
        for city in cities:
            tg.start_soon(run, city)

    for city in cities:
        assert results[city] == [f"weather {city}", "", f"sunny, 24 degrees in {city}", f"done {city}"]
        state = await build_agent(saver, []).aget_state(config(city))
        assert [m.content for m in state.values["messages"]] == results[city]
    assert sorted(await saver.manager.list_keys("langgraph:")) == sorted(f"langgraph:{c}" for c in cities)


async def test_a_thread_moving_between_workers_on_every_turn(
    build_agent: Any, tool_call_message: ToolCall, persistent_backend_factory: Any
) -> None:
    """Turns alternate between two workers (a saver over its own backend object each, on the
    same storage): each reads the checkpoint the other saved last, never its own older one."""
    async with persistent_backend_factory() as backend_a, persistent_backend_factory() as backend_b:
        savers = [CognitiaSaver(backend_a), CognitiaSaver(backend_b)]
        cities = ["Lima", "Kyiv", "Baku", "Doha"]
        out: dict[str, Any] = {}
        for i, city in enumerate(cities):
            graph = build_agent(
                savers[i % 2], [tool_call_message(city, f"call-{i}"), AIMessage(content=f"done {city}")]
            )
            out = await graph.ainvoke({"messages": [HumanMessage(content=f"weather {city}")]}, config("t"))
        expected = [
            text
            for city in cities
            for text in (f"weather {city}", "", f"sunny, 24 degrees in {city}", f"done {city}")
        ]
        assert [m.content for m in out["messages"]] == expected
        for saver in savers:
            state = await build_agent(saver, []).aget_state(config("t"))
            assert [m.content for m in state.values["messages"]] == expected


async def test_saved_hooks_and_logs_fire_for_graph_steps(
    build_agent: Any, tool_call_message: ToolCall
) -> None:
    """Each checkpoint and each batch of writes is one manager save: hooks fire, logs carry no content."""
    saver = CognitiaSaver(InMemorySessionBackend())
    events: list[SessionEvent] = []
    saver.manager.on("saved", events.append)
    graph = build_agent(saver, [tool_call_message("Quito", "call-q"), AIMessage(content="secret answer")])

    with structlog.testing.capture_logs() as logs:
        await graph.ainvoke({"messages": [HumanMessage(content="secret question")]}, config("hooked"))

    checkpoints = [s async for s in graph.aget_state_history(config("hooked"))]
    assert events, "no saved hook fired"
    assert {e.key for e in events} == {"langgraph:hooked"}
    assert all(e.turns == 1 and e.runtime == "asyncio" for e in events)
    stored_turns = await saver.manager.turns("langgraph:hooked")
    assert len(events) == len(stored_turns)
    assert sum(t["kind"] == "checkpoint" for t in stored_turns) == len(checkpoints)
    assert events[-1].version == len(events)
    saved_logs = [entry for entry in logs if entry["event"] == "session.saved"]
    assert len(saved_logs) == len(events)
    assert "secret" not in repr(logs)


async def test_stored_data_is_plain_json(
    build_agent: Any, tool_call_message: ToolCall, persistent_backend_factory: Any
) -> None:
    """The storage holds JSON only: ids and metadata in clear, values as [type, base64], no pickle."""
    async with persistent_backend_factory() as backend:
        graph = build_agent(
            CognitiaSaver(backend), [tool_call_message("Lagos", "c1"), AIMessage(content="ok")]
        )
        await graph.ainvoke({"messages": [HumanMessage(content="Lagos?")]}, config("json"))
        assert await backend.list_keys() == ["langgraph:json"]

    state_text, rows = persistent_backend_factory.stored("langgraph:json")
    turns = [json.loads(turn) for turn in rows]
    kinds = {t["kind"] for t in turns}
    assert kinds == {"checkpoint", "writes"}
    for turn in turns:
        if turn["kind"] == "checkpoint":
            assert isinstance(turn["metadata"]["step"], int)
            assert isinstance(turn["checkpoint"]["channel_versions"], dict)
            pairs = list(turn["checkpoint"]["channel_values"].values())
        else:
            pairs = [w[2:] for w in turn["writes"]]
        for kind, data in pairs:
            assert "pickle" not in kind
            base64.b64decode(data, validate=True)
    state = json.loads(state_text)
    last_checkpoint = max(t["id"] for t in turns if t["kind"] == "checkpoint")
    assert state["namespaces"][""]["latest"] == last_checkpoint
    assert turns[state["namespaces"][""]["at"]]["id"] == last_checkpoint


def build_with_subgraph(saver: Any) -> Any:
    """A parent graph whose one node is a subgraph sharing its messages: every turn saves
    checkpoints under a namespace of its own (the subgraph call's task)."""
    from langgraph.graph import MessagesState

    inner = StateGraph(MessagesState)
    inner.add_node("answer", lambda s: {"messages": [AIMessage(content=f"answer {len(s['messages'])}")]})
    inner.add_edge(START, "answer")
    outer = StateGraph(MessagesState)
    outer.add_node("sub", inner.compile())
    outer.add_edge(START, "sub")
    return outer.compile(checkpointer=saver)


async def test_a_graph_with_a_subgraph_keeps_what_the_in_memory_saver_keeps_and_bounded_caches(
    persistent_backend_factory: Any,
) -> None:
    """Each subgraph call saves under a new namespace. The thread's history, every
    namespace's latest state included, is InMemorySaver's, also after a restart. The
    stored index lists only the most recent namespaces, yet the latest checkpoint of every
    one is found, and a live thread keeps encodings of only its most recent namespaces."""
    from langgraph.checkpoint.memory import InMemorySaver

    from cognitia_langgraph import _index
    from cognitia_langgraph._saver import KEPT_NAMESPACES

    cfg = config("t")
    reference = build_with_subgraph(InMemorySaver())

    async def history(graph: Any) -> list[tuple[str, list[str]]]:
        return [
            (s.config["configurable"]["checkpoint_ns"], [m.content for m in s.values.get("messages", [])])
            async for s in graph.aget_state_history(cfg)
        ]

    async def checkpoints(saver: Any) -> list[tuple[str, list[str]]]:
        """Every checkpoint of every namespace: its namespace and its messages, sorted."""
        found = [
            (s.config["configurable"]["checkpoint_ns"], s.checkpoint["channel_values"].get("messages", []))
            async for s in saver.alist(None)
        ]
        return sorted((ns, [m.content for m in messages]) for ns, messages in found)

    def strip(found: list[tuple[str, list[str]]]) -> list[tuple[bool, list[str]]]:
        return sorted((bool(ns), messages) for ns, messages in found)

    async def every_latest_is_found(saver: CognitiaSaver) -> None:
        latest: dict[str, str] = {}
        async for s in saver.alist(None):
            ns, checkpoint_id = s.config["configurable"]["checkpoint_ns"], s.checkpoint["id"]
            latest[ns] = max(latest.get(ns, ""), checkpoint_id)
        assert len(latest) > _index.KEPT + 1
        for ns, checkpoint_id in latest.items():
            found = await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ns}})
            assert found is not None and found.checkpoint["id"] == checkpoint_id, ns
        new: RunnableConfig = {"configurable": {"thread_id": "t", "checkpoint_ns": "sub:not-called-yet"}}
        assert await saver.aget_tuple(new) is None

    async with persistent_backend_factory() as backend:
        saver = CognitiaSaver(backend)
        graph = build_with_subgraph(saver)
        for n in range(2 * _index.KEPT + 4):  # namespaces go from the index after the first miss
            for g in (graph, reference):
                await g.ainvoke({"messages": [HumanMessage(content=f"q{n}")]}, cfg)
        session = await saver.manager.get(saver.key("t"))
        # The caches are internal; this is the bound that keeps a long thread's memory flat.
        assert len({ns for ns, _ in saver._memos[session]}) <= KEPT_NAMESPACES + 1
        assert len(saver._saved[session]) <= KEPT_NAMESPACES + 1
        assert await history(graph) == await history(reference)
        everything = await checkpoints(saver)
        # The same checkpoints, namespaces aside (a subgraph call's namespace names its task).
        assert strip(everything) == strip(await checkpoints(reference.checkpointer))
        assert len({ns for ns, _ in everything}) > KEPT_NAMESPACES + 1
        # The state, written at every save, lists a bounded number of namespaces.
        state = await backend.load(saver.key("t"))
        assert state is not None and len(state["namespaces"]) == _index.KEPT + 1 and state["pruned"]
        await every_latest_is_found(saver)

    async with persistent_backend_factory() as backend:
        saver = CognitiaSaver(backend)
        graph = build_with_subgraph(saver)
        assert await history(graph) == await history(reference)
        assert await checkpoints(saver) == everything
        await every_latest_is_found(saver)
        final = await graph.ainvoke({"messages": [HumanMessage(content="last")]}, cfg)
        expected = await reference.ainvoke({"messages": [HumanMessage(content="last")]}, cfg)
        assert [m.content for m in final["messages"]] == [m.content for m in expected["messages"]]
