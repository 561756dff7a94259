"""Channel values stored once per version, and the latest values served without decoding."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import START, MessagesState, StateGraph

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver
from cognitia_langgraph._saver import REACH

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests call the saver's async methods directly, which run on both runtimes."""
    return str(request.param)


class CountingSerializer(JsonPlusSerializer):
    """LangGraph's serializer, counting how often it decodes."""

    def __init__(self) -> None:
        super().__init__()
        self.decoded = 0

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        self.decoded += 1
        return super().loads_typed(data)


def cfg(thread_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    conf = {"thread_id": thread_id, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def checkpoint(values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    cp = empty_checkpoint()
    cp.pop("pending_sends", None)  # type: ignore[typeddict-item]  # legacy; graphs of checkpoint format 4 have none
    cp["channel_values"] = values
    cp["channel_versions"] = versions
    return cp


def stored_turns(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT turn FROM cognitia_turns ORDER BY seq").fetchall()
    conn.close()
    return [json.loads(row[0]) for row in rows]


async def test_unchanged_channels_are_stored_once(tmp_path: Path) -> None:
    """A channel whose version did not change is carried, not encoded and stored again."""
    path = tmp_path / "values.db"
    async with SqliteSessionBackend(db_path=path) as backend:
        saver = CognitiaSaver(backend)
        first = await saver.aput(
            cfg("t"),
            checkpoint({"big": "x" * 1000, "n": 1}, {"big": 1, "n": 1}),
            {"step": 0},
            {"big": 1, "n": 1},
        )
        second = await saver.aput(
            first, checkpoint({"big": "x" * 1000, "n": 2}, {"big": 1, "n": 2}), {"step": 1}, {"n": 2}
        )
        turns = stored_turns(path)
        assert sorted(turns[0]["checkpoint"]["channel_values"]) == ["big", "n"]
        assert sorted(turns[1]["checkpoint"]["channel_values"]) == ["n"]
        assert turns[1]["checkpoint"]["carried"] == ["big"]

        # A fresh saver (nothing live) resolves the carried value from the log.
        for reader in (saver, CognitiaSaver(backend)):
            latest = await reader.aget_tuple(cfg("t"))
            assert latest is not None
            assert latest.checkpoint["channel_values"] == {"big": "x" * 1000, "n": 2}
            older = await reader.aget_tuple(first)
            assert older is not None and older.checkpoint["channel_values"] == {"big": "x" * 1000, "n": 1}
        listed = [t.checkpoint["channel_values"]["big"] async for t in CognitiaSaver(backend).alist(cfg("t"))]
        assert listed == ["x" * 1000, "x" * 1000]
        assert second["configurable"]["checkpoint_id"] == turns[1]["id"]


async def test_a_value_unchanged_for_long_is_stored_again() -> None:
    """Resuming reads at most REACH turns: an old unchanged value is stored anew."""
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    config = cfg("long")
    for step in range(REACH + 5):
        config = await saver.aput(
            config, checkpoint({"fixed": "same", "n": step}, {"fixed": 1, "n": step + 1}), {"step": step}, {}
        )
    turns = await saver.manager.turns(saver.key("long"))
    storing = [i for i, t in enumerate(turns) if "fixed" in t["checkpoint"]["channel_values"]]
    assert storing[0] == 0 and len(storing) == 2 and storing[1] - storing[0] > REACH - 1
    latest = await CognitiaSaver(backend).aget_tuple(cfg("long"))
    assert latest is not None and latest.checkpoint["channel_values"]["fixed"] == "same"


async def test_latest_values_are_served_without_decoding_only_while_unchanged() -> None:
    serde = CountingSerializer()
    saver = CognitiaSaver(InMemorySessionBackend(), serde=serde)
    value = {"items": [1, 2, 3]}
    await saver.aput(cfg("t"), checkpoint({"v": value}, {"v": 1}), {"step": 0}, {"v": 1})
    # Saving a value decodes its encoding once, to see that it decodes back to the value.
    assert serde.decoded == 1

    latest = await saver.aget_tuple(cfg("t"))
    assert latest is not None and latest.checkpoint["channel_values"]["v"] is value
    assert serde.decoded == 1, "the value just saved is served, not decoded"

    # The caller changes the object it saved (as a caller of ainvoke may change its result):
    # the saver notices and returns what storage holds.
    value["items"].append(4)
    latest = await saver.aget_tuple(cfg("t"))
    assert latest is not None and latest.checkpoint["channel_values"]["v"] == {"items": [1, 2, 3]}
    assert serde.decoded == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # LangGraph's graph loop is asyncio-only
async def test_mutating_an_ainvoke_result_does_not_leak_into_the_thread() -> None:
    """LangGraph returns the very objects it saved; changing them must not change the thread."""

    def reply(state: MessagesState) -> dict[str, list[AIMessage]]:
        return {"messages": [AIMessage(content=f"re: {state['messages'][-1].content}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    graph = builder.compile(checkpointer=CognitiaSaver(InMemorySessionBackend()))
    config: RunnableConfig = {"configurable": {"thread_id": "chat"}}
    result = await graph.ainvoke({"messages": [HumanMessage(content="one")]}, config)
    result["messages"].append(HumanMessage(content="never sent", id="stray"))
    result["messages"][0].content = "edited"
    second = await graph.ainvoke({"messages": [HumanMessage(content="two")]}, config)
    assert [m.content for m in second["messages"]] == ["one", "re: one", "two", "re: two"]


@pytest.mark.parametrize("strategy", ["prune", "delete_for_runs"])
async def test_rewrites_keep_carried_values(strategy: str) -> None:
    """Dropping the turn that stored a value keeps the value for the checkpoints that carry it."""
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    first = await saver.aput(
        cfg("t"), checkpoint({"keep": "kept", "n": 0}, {"keep": 1, "n": 1}), {"step": 0, "run_id": "old"}, {}
    )
    await saver.aput(
        first, checkpoint({"keep": "kept", "n": 1}, {"keep": 1, "n": 2}), {"step": 1, "run_id": "new"}, {}
    )
    if strategy == "prune":
        await saver.aprune(["t"], strategy="keep_latest")
    else:
        await saver.adelete_for_runs(["old"])
    turns = await saver.manager.turns(saver.key("t"))
    assert len(turns) == 1 and "carried" not in turns[0]["checkpoint"]
    for reader in (saver, CognitiaSaver(backend)):
        latest = await reader.aget_tuple(cfg("t"))
        assert latest is not None and latest.checkpoint["channel_values"] == {"keep": "kept", "n": 1}
