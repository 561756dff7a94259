"""LangGraph's DeltaChannel: the saver rebuilds a channel's history from its log in one read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict, cast

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.channels import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver, _saver

pytestmark = pytest.mark.anyio


def fold(state: list[Any], batches: Sequence[list[Any]]) -> list[Any]:
    """add_messages over a batch of writes (DeltaChannel reducers take the whole batch)."""
    for batch in batches:
        state = cast(list[Any], add_messages(state, batch))
    return state


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], DeltaChannel(fold, snapshot_frequency=3)]
    turns: int


def chat_graph(saver: CognitiaSaver) -> Any:
    def reply(state: Chat) -> dict[str, Any]:
        last = state["messages"][-1].content
        return {"messages": [AIMessage(content=f"re: {last}")], "turns": state.get("turns", 0) + 1}

    builder = StateGraph(Chat)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    return builder.compile(checkpointer=saver)


async def default_walk(saver: CognitiaSaver, config: RunnableConfig, channels: list[str]) -> Any:
    """LangGraph's own implementation: one get_tuple per ancestor."""
    return await BaseCheckpointSaver.aget_delta_channel_history(saver, config=config, channels=channels)


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read the log in small tails, so walks have to read further back."""
    monkeypatch.setattr(_saver, "_WALK_SPAN", 4)
    monkeypatch.setattr(_saver, "_WALK_MARGIN", 2)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # LangGraph's graph loop is asyncio-only
@pytest.mark.parametrize("windows", ["default", "small"])
async def test_the_history_of_every_checkpoint_matches_langgraphs_walk(
    windows: str, request: pytest.FixtureRequest
) -> None:
    if windows == "small":
        request.getfixturevalue("small_windows")
    saver = CognitiaSaver(InMemorySessionBackend())
    graph = chat_graph(saver)
    config: RunnableConfig = {"configurable": {"thread_id": "t"}}
    for i in range(7):
        await graph.ainvoke({"messages": [HumanMessage(content=f"m{i}", id=f"h{i}")]}, config)
    # A fork from an older checkpoint: its history follows its own parents.
    history = [c async for c in saver.alist(config)]
    older = history[len(history) // 2].config
    await graph.ainvoke({"messages": [HumanMessage(content="fork", id="fork")]}, older)

    checkpoints = [c async for c in saver.alist(config)]
    assert len(checkpoints) > 20
    seeded = 0
    for tup in checkpoints:
        ours = await saver.aget_delta_channel_history(config=tup.config, channels=["messages", "turns"])
        assert ours == await default_walk(saver, tup.config, ["messages", "turns"])
        seeded += "seed" in ours["messages"]
    assert seeded, "some walks end at a snapshot"
    latest = await saver.aget_delta_channel_history(config=config, channels=["messages"])
    assert latest == await default_walk(saver, config, ["messages"])
    state = await graph.aget_state(config)
    assert [m.content for m in state.values["messages"]][-2:] == ["fork", "re: fork"]
    assert await saver.aget_delta_channel_history(config=config, channels=[]) == {}
    missing: RunnableConfig = {"configurable": {"thread_id": "nobody"}}
    assert await saver.aget_delta_channel_history(config=missing, channels=["messages"]) == {
        "messages": {"writes": []}
    }


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # LangGraph's graph loop is asyncio-only
async def test_a_delta_channel_thread_resumes_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "delta.db"
    config: RunnableConfig = {"configurable": {"thread_id": "chat"}}
    async with SqliteSessionBackend(db_path=path) as backend:
        graph = chat_graph(CognitiaSaver(backend))
        for i in range(5):
            await graph.ainvoke({"messages": [HumanMessage(content=f"m{i}")]}, config)
    async with SqliteSessionBackend(db_path=path) as backend:
        graph = chat_graph(CognitiaSaver(backend))
        result = await graph.ainvoke({"messages": [HumanMessage(content="after")]}, config)
    contents = [m.content for m in result["messages"]]
    assert contents == [x for i in range(5) for x in (f"m{i}", f"re: m{i}")] + ["after", "re: after"]
    assert result["turns"] == 6


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.usefixtures("small_windows")
async def test_walks_over_hand_made_checkpoints_match_on_both_runtimes(anyio_backend: str) -> None:
    """A chain of checkpoints with writes and occasional stored values, saved directly."""
    saver = CognitiaSaver(InMemorySessionBackend())
    config: RunnableConfig = {"configurable": {"thread_id": "h", "checkpoint_ns": ""}}
    versions: dict[str, Any] = {}
    configs = []
    for step in range(12):
        cp = empty_checkpoint()
        values: dict[str, Any] = {}
        if step % 5 == 0:
            versions["log"] = saver.get_next_version(versions.get("log"), None)
            values["log"] = [f"snapshot {step}"]
        versions["n"] = saver.get_next_version(versions.get("n"), None)
        values["n"] = step
        cp["channel_values"] = values
        cp["channel_versions"] = dict(versions)
        target: RunnableConfig = {"configurable": {**config["configurable"], "checkpoint_id": cp["id"]}}
        if step % 2:
            # Writes saved before their checkpoint, as LangGraph's background saves allow.
            await saver.aput_writes(target, [("log", [f"early {step}"])], f"task-{step}-a")
        config = await saver.aput(config, cp, {"step": step}, {})
        await saver.aput_writes(config, [("log", [f"write {step}"]), ("n", step)], f"task-{step}")
        await saver.aput_writes(config, [("log", [f"late {step}"])], f"task-{step}-b")
        configs.append(config)
    for cfg in configs:
        ours = await saver.aget_delta_channel_history(config=cfg, channels=["log", "n", "absent"])
        assert ours == await default_walk(saver, cfg, ["log", "n", "absent"])
    last = await saver.aget_delta_channel_history(config=configs[-1], channels=["log"])
    assert last["log"]["seed"] == ["snapshot 10"]
    assert [w[2] for w in last["log"]["writes"]] == [["write 10"], ["late 10"]]
    # Whatever tail of the log a walk starts with, it either asks for more or finds what the
    # whole log gives (writes saved before their checkpoint included).
    turns = await saver.manager.turns(saver.key("h"))
    for cfg in configs:
        checkpoint_id = cfg["configurable"]["checkpoint_id"]
        whole = _saver._delta_walk(turns, "", checkpoint_id, {"log", "n"}, complete=True)
        assert whole is not None
        for start in range(1, len(turns)):
            tail = _saver._delta_walk(turns[start:], "", checkpoint_id, {"log", "n"}, complete=False)
            assert tail is None or (tail[0], tail[1]) == (whole[0], whole[1]), (checkpoint_id, start)


def test_graph_invoke_rebuilds_delta_channels_through_the_sync_api(tmp_path: Path) -> None:
    backend = SqliteSessionBackend(db_path=tmp_path / "sync-delta.db")
    try:
        graph = chat_graph(CognitiaSaver(backend))
        config: RunnableConfig = {"configurable": {"thread_id": "sync"}}
        for i in range(4):
            result = graph.invoke({"messages": [HumanMessage(content=f"m{i}")]}, config)
        assert [m.content for m in result["messages"]] == [
            x for i in range(4) for x in (f"m{i}", f"re: m{i}")
        ]
    finally:
        backend.close()


class CountingSerializer(JsonPlusSerializer):
    """LangGraph's serializer, counting the decodes of DeltaChannel snapshots and of lists
    (the writes to a messages channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots = 0
        self.lists = 0

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        value = super().loads_typed(data)
        self.snapshots += type(value).__name__ == "_DeltaSnapshot"
        self.lists += type(value) is list
        return value


async def counted_chat(turns: int) -> tuple[CountingSerializer, CognitiaSaver, Any, RunnableConfig]:
    """A chat graph whose saver counts decodes, after ``turns`` turns of one thread."""
    serde = CountingSerializer()
    saver = CognitiaSaver(InMemorySessionBackend(), serde=serde)
    graph = chat_graph(saver)
    config: RunnableConfig = {"configurable": {"thread_id": "counted"}}
    for i in range(turns):
        await graph.ainvoke({"messages": [HumanMessage(content=f"m{i}", id=f"h{i}")]}, config)
    return serde, saver, graph, config


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # LangGraph's graph loop is asyncio-only
async def test_a_seed_is_decoded_once_and_served_again_only_while_unchanged() -> None:
    serde, saver, graph, config = await counted_chat(12)

    first = await saver.aget_delta_channel_history(config=config, channels=["messages"])
    decoded = serde.snapshots
    again = await saver.aget_delta_channel_history(config=config, channels=["messages"])
    assert again["messages"]["seed"] is first["messages"]["seed"]
    assert serde.snapshots == decoded, "served, not decoded again"

    # Whoever got the seed changes it in place: the next read decodes the stored one.
    stored = [m.content for m in first["messages"]["seed"].value]
    first["messages"]["seed"].value.append(HumanMessage(content="stray"))
    fresh = await saver.aget_delta_channel_history(config=config, channels=["messages"])
    assert [m.content for m in fresh["messages"]["seed"].value] == stored
    assert serde.snapshots == decoded + 1
    first["messages"]["seed"].value[0].content = "edited"
    assert (await saver.aget_delta_channel_history(config=config, channels=["messages"])) == fresh
    assert serde.snapshots == decoded + 1, "an unrelated object's change does not matter"

    state = await graph.aget_state(config)
    assert [m.content for m in state.values["messages"]][:2] == ["m0", "re: m0"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # LangGraph's graph loop is asyncio-only
async def test_writes_are_decoded_once_and_served_again_only_while_unchanged() -> None:
    serde, saver, graph, config = await counted_chat(13)

    first = (await saver.aget_delta_channel_history(config=config, channels=["messages"]))["messages"]
    writes = first["writes"]
    assert len(writes) >= 2
    decoded = serde.lists
    again = (await saver.aget_delta_channel_history(config=config, channels=["messages"]))["messages"]
    assert [w[2] for w in again["writes"]] == [w[2] for w in writes]
    assert all(a[2] is w[2] for a, w in zip(again["writes"], writes, strict=True))
    assert serde.lists == decoded, "served, not decoded again"

    # A reducer (or the caller holding the rebuilt state) changes a write in place: only that
    # write is decoded again, and the read hands back what is stored.
    stored = [m.content for m in writes[0][2]]
    writes[0][2][0].content = "edited"
    fresh = (await saver.aget_delta_channel_history(config=config, channels=["messages"]))["messages"]
    assert [m.content for m in fresh["writes"][0][2]] == stored
    assert fresh["writes"][0][2] is not writes[0][2]
    assert all(f[2] is w[2] for f, w in zip(fresh["writes"][1:], writes[1:], strict=True))
    assert serde.lists == decoded + 1

    # The next turn's read serves the writes it shares with this one and decodes the new ones.
    await graph.ainvoke({"messages": [HumanMessage(content="m13", id="h13")]}, config)
    latest = (await saver.aget_delta_channel_history(config=config, channels=["messages"]))["messages"]
    assert latest == (await default_walk(saver, config, ["messages"]))["messages"]
    state = await graph.aget_state(config)
    assert [m.content for m in state.values["messages"]][-4:] == ["m12", "re: m12", "m13", "re: m13"]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_write_stored_again_at_the_same_place_is_decoded_again() -> None:
    """A thread deleted and written again with the same ids reads its new writes, not the old ones."""
    saver = CognitiaSaver(InMemorySessionBackend())
    config: RunnableConfig = {"configurable": {"thread_id": "again", "checkpoint_ns": ""}}

    async def thread(words: list[str]) -> list[Any]:
        parent = await saver.aput(config, {**empty_checkpoint(), "id": "c1"}, {}, {})
        await saver.aput_writes(
            parent, [("messages", [HumanMessage(content=w, id=w)]) for w in words], "task"
        )
        await saver.aput(parent, {**empty_checkpoint(), "id": "c2"}, {}, {})
        history = await saver.aget_delta_channel_history(config=config, channels=["messages"])
        return [m.content for _, _, value in history["messages"]["writes"] for m in value]

    assert await thread(["one", "two"]) == ["one", "two"]
    await saver.adelete_thread("again")
    assert await thread(["three", "four"]) == ["three", "four"]


def test_named_tuples_are_told_apart_by_class() -> None:
    from typing import NamedTuple

    from cognitia_langgraph._reuse import fingerprint

    class One(NamedTuple):
        value: Any

    class Two(NamedTuple):
        value: Any

    assert fingerprint(One([1])) == fingerprint(One([1]))
    assert fingerprint(One([1])) != fingerprint(Two([1]))
    assert fingerprint(One([1])) != fingerprint(One([2]))
