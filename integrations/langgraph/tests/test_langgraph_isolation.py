"""The saver shares no mutable object with its callers: what it hands out and what it is given
can be changed freely, as LangGraph changes a checkpoint it runs from, without changing what
the saver holds (in memory or in storage). InMemorySaver is the reference."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    empty_checkpoint,
)
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import END, START, MessagesState, StateGraph

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver

SERDE = JsonPlusSerializer()
Saver = BaseCheckpointSaver[Any]


def cfg(thread_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    conf: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def checkpoint(checkpoint_id: str, text: str) -> tuple[Checkpoint, CheckpointMetadata, list[tuple[str, Any]]]:
    """A checkpoint with every kind of field LangGraph writes, its metadata and one task's writes."""
    cp = empty_checkpoint()
    cp["id"] = checkpoint_id
    cp["channel_values"] = {"messages": [HumanMessage(text, id=f"m-{text}")], "notes": {"seen": [text]}}
    cp["channel_versions"] = {"messages": f"{checkpoint_id}.0", "notes": f"{checkpoint_id}.0", "x": 1}
    cp["versions_seen"] = {"__input__": {}, "agent": {"messages": f"{checkpoint_id}.0", "x": 1}}
    cp["updated_channels"] = ["messages", "notes"]
    metadata: Any = {"source": "loop", "step": int(checkpoint_id), "parents": {"": "p"}, "tags": [text]}
    writes = [("notes", {"seen": [text, "written"]}), ("messages", [AIMessage(f"re {text}", id=f"a-{text}")])]
    return cp, metadata, writes


def new_versions(cp: Checkpoint) -> dict[str, Any]:
    return {name: cp["channel_versions"][name] for name in cp["channel_values"]}


async def fill(saver: Saver) -> dict[str, Any]:
    """Two checkpoints with writes on thread "t"; what the caller passed in, by checkpoint id."""
    given: dict[str, Any] = {}
    config = cfg("t")
    for checkpoint_id, text in (("1", "first"), ("2", "second")):
        cp, metadata, writes = checkpoint(checkpoint_id, text)
        config = await saver.aput(config, cp, metadata, new_versions(cp))
        await saver.aput_writes(config, writes, f"task-{checkpoint_id}")
        given[checkpoint_id] = (cp, metadata, writes)
    return given


def snapshot(t: CheckpointTuple) -> Any:
    """Everything a reader gets, as a deep copy (messages as their encodings)."""
    cp = t.checkpoint
    return copy.deepcopy(
        {
            "config": t.config,
            "parent": t.parent_config,
            "metadata": t.metadata,
            "versions": cp["channel_versions"],
            "seen": cp["versions_seen"],
            "updated": cp.get("updated_channels"),
            "values": {name: SERDE.dumps_typed(value) for name, value in cp["channel_values"].items()},
            "writes": [
                (task, channel, SERDE.dumps_typed(value)) for task, channel, value in t.pending_writes or []
            ],
        }
    )


def vandalize(t: CheckpointTuple) -> None:
    """Change every part of a returned tuple in place, as a caller (or LangGraph's loop) may."""
    cp = t.checkpoint
    cp["channel_versions"]["messages"] = "999"
    cp["channel_versions"]["vandal"] = "1"
    for seen in cp["versions_seen"].values():
        seen["messages"] = "999"
    cp["versions_seen"]["vandal"] = {}
    updated = cp.get("updated_channels")
    assert updated is not None
    updated.append("vandal")
    messages: list[BaseMessage] = cp["channel_values"]["messages"]
    messages[0].content = "vandal"
    messages.append(AIMessage("vandal"))
    cp["channel_values"]["notes"]["seen"].append("vandal")
    cp["channel_values"]["vandal"] = 1
    metadata: Any = t.metadata
    metadata["step"] = 99
    metadata["parents"][""] = "vandal"
    metadata["tags"].append("vandal")
    metadata["vandal"] = True
    for _, channel, value in t.pending_writes or []:
        if channel == "notes":
            value["seen"].append("vandal")
        else:
            value[0].content = "vandal"
            value.append(AIMessage("vandal"))
    t.config["configurable"]["checkpoint_id"] = "vandal"
    if t.parent_config is not None:
        t.parent_config["configurable"]["checkpoint_id"] = "vandal"


def vandalize_input(given: Iterable[Any]) -> None:
    """Change everything the caller passed to put and put_writes, after the calls returned."""
    for cp, metadata, writes in given:
        cp["channel_versions"]["messages"] = "999"
        cp["versions_seen"]["agent"]["messages"] = "999"
        cp["versions_seen"]["__input__"]["vandal"] = "1"
        cp["updated_channels"].append("vandal")
        cp["channel_values"]["messages"][0].content = "vandal"
        cp["channel_values"]["messages"].append(AIMessage("vandal"))
        cp["channel_values"]["notes"]["seen"].append("vandal")
        metadata["parents"][""] = "vandal"
        metadata["tags"].append("vandal")
        writes[0][1]["seen"].append("vandal")
        writes[1][1].append(AIMessage("vandal"))


async def reads(saver: Saver) -> list[CheckpointTuple]:
    """The thread's checkpoints by every read path: the latest, each by id, and the listing."""
    found = [await saver.aget_tuple(cfg("t")), await saver.aget_tuple(cfg("t", "1"))]
    found.append(await saver.aget_tuple(cfg("t", "2")))
    found += [t async for t in saver.alist(cfg("t"))]
    found += [t async for t in saver.alist(None)]
    assert all(t is not None for t in found)
    return [t for t in found if t is not None]


def sync_reads(saver: Saver) -> list[CheckpointTuple]:
    found = [saver.get_tuple(cfg("t")), saver.get_tuple(cfg("t", "1")), *saver.list(cfg("t"))]
    assert all(t is not None for t in found)
    return [t for t in found if t is not None]


def savers(backend_factory: Any) -> list[Saver]:
    return [InMemorySaver(), CognitiaSaver(backend_factory())]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_changing_a_returned_tuple_changes_nothing_the_saver_holds(
    anyio_backend: str, backend_factory: Any
) -> None:
    """Every part of every tuple read is changed in place; the next reads are as before."""
    seen: list[Any] = []
    for saver in savers(backend_factory):
        await fill(saver)
        first = await reads(saver)
        before = [snapshot(t) for t in first]
        for t in first:
            vandalize(t)
        assert [snapshot(t) for t in await reads(saver)] == before
        for t in await reads(saver):  # and again, now that the reads above were changed too
            vandalize(t)
        assert [snapshot(t) for t in await reads(saver)] == before
        seen.append(before)
    reference, cognitia = seen
    assert cognitia == reference


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_changing_what_was_saved_changes_nothing_the_saver_holds(
    anyio_backend: str, backend_factory: Any
) -> None:
    """The checkpoint, metadata and writes passed in are changed after the calls; reads are unaffected."""
    seen: list[Any] = []
    for saver in savers(backend_factory):
        given = await fill(saver)
        expected = [snapshot(t) for t in await reads(saver)]
        vandalize_input(given.values())
        after = [snapshot(t) for t in await reads(saver)]
        assert after == expected
        seen.append(after)
    reference, cognitia = seen
    assert cognitia == reference


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_sync_api_hands_out_copies(kind: str, tmp_path: Path) -> None:
    """get_tuple, list and put (graph.invoke's API) share nothing with the saver either."""
    backend = (
        InMemorySessionBackend() if kind == "memory" else SqliteSessionBackend(db_path=tmp_path / "s.db")
    )
    try:
        results: list[Any] = []
        for saver in (InMemorySaver(), CognitiaSaver(backend)):
            config = cfg("t")
            given = []
            for checkpoint_id, text in (("1", "first"), ("2", "second")):
                cp, metadata, writes = checkpoint(checkpoint_id, text)
                config = saver.put(config, cp, metadata, new_versions(cp))
                saver.put_writes(config, writes, f"task-{checkpoint_id}")
                given.append((cp, metadata, writes))
            first = sync_reads(saver)
            before = [snapshot(t) for t in first]
            for t in first:
                vandalize(t)
            vandalize_input(given)
            assert [snapshot(t) for t in sync_reads(saver)] == before
            results.append(before)
        assert results[0] == results[1]
    finally:
        if isinstance(backend, SqliteSessionBackend):
            backend.close()


# -- graphs: on asyncio only (LangGraph's async graph loop is asyncio's; see conftest.py) ---------


class Draft(TypedDict, total=False):
    x: int
    log: str


def draft_graph(saver: Saver) -> Any:
    """Drafts, then sends, pausing for approval before sending (interrupt_before)."""

    def draft(state: Draft) -> Draft:
        return {"log": f"draft({state['x']})"}

    def send(state: Draft) -> Draft:
        return {"log": state["log"] + " -> sent"}

    builder = StateGraph(Draft)
    builder.add_node("draft", draft)
    builder.add_node("send", send)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "send")
    builder.add_edge("send", END)
    return builder.compile(checkpointer=saver, interrupt_before=["send"])


async def approve_then_go_back(graph: Any) -> tuple[Any, ...]:
    """Run to the pause, approve (run on), then read the paused checkpoint and replay from it."""
    config = cfg("hitl")
    await graph.ainvoke({"x": 1}, config)
    paused = await graph.aget_state(config)
    done = await graph.ainvoke(None, config)
    again = await graph.aget_state(paused.config)
    replayed = await graph.ainvoke(None, paused.config)
    return paused.values, paused.next, done, again.values, again.next, replayed, paused.config


@pytest.mark.anyio
async def test_the_paused_checkpoint_is_unchanged_after_resuming(persistent_backend_factory: Any) -> None:
    """Approving a paused run must not change the paused checkpoint: reading it again in the
    same process shows what InMemorySaver and a fresh process show, and replays the same."""
    reference = await approve_then_go_back(draft_graph(InMemorySaver()))
    assert reference[:6] == (
        {"x": 1, "log": "draft(1)"},
        ("send",),
        {"x": 1, "log": "draft(1) -> sent"},
        {"x": 1, "log": "draft(1)"},
        ("send",),
        {"x": 1, "log": "draft(1) -> sent"},
    )
    async with persistent_backend_factory() as backend:
        live = await approve_then_go_back(draft_graph(CognitiaSaver(backend)))
    assert live[:6] == reference[:6]
    async with persistent_backend_factory() as backend:
        fresh = await draft_graph(CognitiaSaver(backend)).aget_state(live[6])
    assert (fresh.values, fresh.next) == reference[3:5]


def chat_graph(saver: Saver) -> Any:
    def chat(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [AIMessage(f"echo {len(state['messages'])}")]}

    builder = StateGraph(MessagesState)
    builder.add_node("chat", chat)
    builder.add_edge(START, "chat")
    builder.add_edge("chat", END)
    return builder.compile(checkpointer=saver)


async def stored(backend_factory: Any, thread_id: str) -> dict[str, Any]:
    """A thread's checkpoints as storage holds them, read by a fresh saver: by id, what a reader gets."""
    async with backend_factory() as backend:
        saver = CognitiaSaver(backend)
        graph = chat_graph(saver)
        tuples = {t.checkpoint["id"]: t async for t in saver.alist(cfg(thread_id))}
        nexts = {
            s.config["configurable"]["checkpoint_id"]: s.next
            async for s in graph.aget_state_history(cfg(thread_id))
        }
    return {cid: (snapshot(t), nexts[cid]) for cid, t in tuples.items()}


def run(run_id: str) -> RunnableConfig:
    return {**cfg("t"), "metadata": {"run_id": run_id}}


def forget_thread(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot without thread ids (to compare a copied thread with its source)."""
    out = {}
    for cid, (data, nxt) in snap.items():
        data = {**data, "config": None, "parent": None}
        out[cid] = (data, nxt)
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("rewrite", ["delete_for_runs", "copy_thread"])
async def test_rewriting_a_thread_stores_its_checkpoints_unchanged(
    rewrite: str, persistent_backend_factory: Any
) -> None:
    """A run forked from an old checkpoint, then an unrelated run: deleting that run (or copying
    the thread) rewrites the log from the live session, and must store every checkpoint as it was."""
    async with persistent_backend_factory() as backend:
        saver = CognitiaSaver(backend)
        graph = chat_graph(saver)
        for i in range(3):
            await graph.ainvoke({"messages": [HumanMessage(f"m{i}")]}, run(f"run-{i}"))
        history = [s async for s in graph.aget_state_history(cfg("t"))]
        fork_from = history[2]  # the input checkpoint of the last run
        assert fork_from.next == ("__start__",)
        await graph.ainvoke(
            {"messages": [HumanMessage("fork")]}, {**fork_from.config, "metadata": {"run_id": "fork"}}
        )
        await graph.ainvoke({"messages": [HumanMessage("scratch")]}, run("doomed"))
        live = {t.checkpoint["id"]: snapshot(t) async for t in saver.alist(cfg("t"))}
        before = await stored(persistent_backend_factory, "t")
        assert before[fork_from.config["configurable"]["checkpoint_id"]][1] == ("__start__",)
        if rewrite == "delete_for_runs":
            await saver.adelete_for_runs(["doomed"])
        else:
            await saver.acopy_thread("t", "copy")
    after = await stored(persistent_backend_factory, "t")
    if rewrite == "delete_for_runs":
        doomed = {cid for cid, (data, _) in before.items() if data["metadata"].get("run_id") == "doomed"}
        assert doomed and set(after) == set(before) - doomed
        assert after == {cid: entry for cid, entry in before.items() if cid not in doomed}
    else:
        assert after == before
        assert forget_thread(await stored(persistent_backend_factory, "copy")) == forget_thread(before)
    assert live == {cid: data for cid, (data, _) in before.items()}, "the live view is what storage holds"
