"""A growing list is stored as the version before it plus its new items, and read back whole."""

from __future__ import annotations

import base64
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from cognitia import Session
from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver
from cognitia_langgraph import _index as index
from cognitia_langgraph._codec import array_header, extended
from cognitia_langgraph._saver import REACH

pytestmark = pytest.mark.anyio
SERDE = JsonPlusSerializer()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests call the saver's async methods directly, which run on both runtimes."""
    return str(request.param)


def cfg(thread_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    conf = {"thread_id": thread_id, "checkpoint_ns": ""}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def exchange(n: int) -> list[BaseMessage]:
    return [HumanMessage(content=f"question {n}", id=f"h{n}"), AIMessage(content=f"answer {n}", id=f"a{n}")]


async def converse(
    saver: CognitiaSaver, thread_id: str, steps: int, run_id: str | None = None
) -> list[list[BaseMessage]]:
    """``steps`` checkpoints, each adding an exchange to ``messages``; returns the list at each."""
    config = cfg(thread_id)
    messages: list[BaseMessage] = []
    version: Any = None
    history = []
    for n in range(steps):
        messages = [*messages, *exchange(n)]  # a new list holding the same items, as add_messages makes
        version = saver.get_next_version(version, None)
        cp: Checkpoint = empty_checkpoint()
        cp["channel_values"] = {"messages": messages, "step": n}
        cp["channel_versions"] = {"messages": version, "step": version}
        metadata: CheckpointMetadata = {"step": n} if run_id is None else {"step": n, "run_id": run_id}
        config = await saver.aput(config, cp, metadata, {"messages": version})
        history.append(messages)
    return history


async def follow(saver: CognitiaSaver, messages: list[BaseMessage], metadata: CheckpointMetadata) -> None:
    """A new checkpoint of thread "t" after its latest, with ``messages`` at a new version."""
    latest = await saver.aget_tuple(cfg("t"))
    assert latest is not None
    version = saver.get_next_version(str(latest.checkpoint["channel_versions"]["messages"]), None)
    cp = empty_checkpoint()
    cp["channel_values"] = {**latest.checkpoint["channel_values"], "messages": messages}
    cp["channel_versions"] = {**latest.checkpoint["channel_versions"], "messages": version}
    await saver.aput(latest.config, cp, metadata, {"messages": version})


def same(value: Any, expected: Any) -> bool:
    """Equal as storage sees it: the serializer makes the same bytes of both."""
    return SERDE.dumps_typed(value) == SERDE.dumps_typed(expected)


async def stored_turns(path: Path) -> list[dict[str, Any]]:
    """The log of thread "t" as a new backend object on the file reads it."""
    async with SqliteSessionBackend(db_path=path) as backend:
        saver = CognitiaSaver(backend)
        return await saver.manager.turns(saver.key("t"))


async def test_a_growing_list_is_stored_as_its_new_items(tmp_path: Path) -> None:
    path = tmp_path / "grow.db"
    async with SqliteSessionBackend(db_path=path) as backend:
        history = await converse(CognitiaSaver(backend), "t", 30)
    turns = await stored_turns(path)
    extensions = [(i, t) for i, t in enumerate(turns) if "messages" in extended(t)]
    assert len(extensions) >= 25
    for i, turn in extensions:
        base, length = turn["checkpoint"]["extends"]["messages"]
        assert base == turns[i - 1]["checkpoint"]["channel_versions"]["messages"]
        step = turn["metadata"]["step"]
        assert length == 2 * (step + 1)
        kind, text = turn["checkpoint"]["channel_values"]["messages"]
        # Exactly the serializer's encodings of the two new messages, without an array header.
        whole = SERDE.dumps_typed(exchange(step))[1]
        assert (kind, base64.b64decode(text)) == ("msgpack", whole[len(array_header(2)) :])

    # A new backend object on the same file: every checkpoint reads back whole.
    async with SqliteSessionBackend(db_path=path) as backend:
        saver = CognitiaSaver(backend)
        latest = await saver.aget_tuple(cfg("t"))
        assert latest is not None and same(latest.checkpoint["channel_values"]["messages"], history[-1])
        listed = [t async for t in saver.alist(cfg("t"))]
        assert len(listed) == len(history)
        for found, expected in zip(reversed(listed), history, strict=True):
            assert same(found.checkpoint["channel_values"]["messages"], expected)
            older = await CognitiaSaver(backend).aget_tuple(found.config)
            assert older is not None and same(older.checkpoint["channel_values"]["messages"], expected)


async def test_a_chain_reaches_a_whole_value_within_reach(tmp_path: Path) -> None:
    """Resuming reads at most REACH turns, so a list is stored whole again at least that often."""
    path = tmp_path / "long.db"
    steps = 4 * REACH
    async with SqliteSessionBackend(db_path=path) as backend:
        saver = CognitiaSaver(backend)
        history = await converse(saver, "t", steps)
        session = await saver.manager.get(saver.key("t"))
        assert isinstance(session, Session)
        hint = index.latest(session.state, "")
    turns = await stored_turns(path)
    at: dict[str, int] = {}  # the log position of each version of messages
    roots: list[int] = []
    for seq, turn in enumerate(turns):
        version = turn["checkpoint"]["channel_versions"]["messages"]
        at[version] = seq
        link = extended(turn).get("messages")
        root = seq if link is None else roots[at[link[0]]]
        roots.append(root)
        assert seq - root < REACH, f"turn {seq} needs turn {root}"
    assert len(set(roots)) >= steps // REACH  # whole values recur
    assert hint is not None and hint[1] == roots[-1] >= len(turns) - REACH

    # What a turn costs does not depend on the conversation's length, except the whole values.
    sizes = [len(json.dumps(t)) for t in turns if "messages" in extended(t)]
    assert statistics.median(sizes[-20:]) < 1.2 * statistics.median(sizes[:20])
    async with SqliteSessionBackend(db_path=path) as backend:
        latest = await CognitiaSaver(backend).aget_tuple(cfg("t"))
    assert latest is not None and same(latest.checkpoint["channel_values"]["messages"], history[-1])


async def test_a_list_changed_other_than_by_appending_is_stored_whole() -> None:
    saver = CognitiaSaver(InMemorySessionBackend())
    history = await converse(saver, "t", 3)
    messages = [history[-1][0].model_copy(update={"content": "edited"}), *history[-1][1:]]
    await follow(saver, messages, {"step": 3})
    turns = await saver.manager.turns(saver.key("t"))
    assert "messages" not in extended(turns[-1])
    assert saver.manager.backend is not None
    fresh = await CognitiaSaver(saver.manager.backend).aget_tuple(cfg("t"))
    assert fresh is not None and same(fresh.checkpoint["channel_values"]["messages"], messages)


@pytest.mark.parametrize("strategy", ["prune", "delete_for_runs"])
async def test_rewrites_store_a_list_whole_when_its_base_is_dropped(strategy: str) -> None:
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    await converse(saver, "t", 5, run_id="old")
    latest = await saver.aget_tuple(cfg("t"))
    assert latest is not None
    messages = [*latest.checkpoint["channel_values"]["messages"], *exchange(5)]
    await follow(saver, messages, {"step": 5, "run_id": "new"})
    assert "messages" in extended((await saver.manager.turns(saver.key("t")))[-1])
    if strategy == "prune":
        await saver.aprune(["t"], strategy="keep_latest")
    else:
        await saver.adelete_for_runs(["old"])
    turns = await saver.manager.turns(saver.key("t"))
    assert len(turns) == 1 and "extends" not in turns[0]["checkpoint"]
    for reader in (saver, CognitiaSaver(backend)):
        found = await reader.aget_tuple(cfg("t"))
        assert found is not None and same(found.checkpoint["channel_values"]["messages"], messages)


async def test_a_copied_thread_reads_back_whole() -> None:
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    await converse(saver, "target", 2)
    history = await converse(saver, "source", 12)  # newer: its latest is the target's latest after the copy
    await saver.acopy_thread("source", "target")
    reader = CognitiaSaver(backend)
    listed = [t async for t in reader.alist(cfg("target"))]
    assert len(listed) == 14
    latest = await reader.aget_tuple(cfg("target"))
    assert latest is not None and same(latest.checkpoint["channel_values"]["messages"], history[-1])
    # The next save after the copy extends what the target's index knows, or stores whole.
    await converse(saver, "target", 1)
    found = await CognitiaSaver(backend).aget_tuple(cfg("target"))
    assert found is not None and same(found.checkpoint["channel_values"]["messages"], exchange(0))


async def test_a_wrong_index_falls_back_to_the_whole_log() -> None:
    """The index is a hint: pointing it past a chain's whole value still reads the right list."""
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    history = await converse(saver, "t", 10)

    def mislead(session: Session) -> None:
        entry = session.state["namespaces"][""]
        for where in entry["values"].values():
            where[-1] = entry["at"]  # claims every chain starts at the latest turn

    await saver.manager.update(saver.key("t"), mislead)
    fresh = CognitiaSaver(backend)
    latest = await fresh.aget_tuple(cfg("t"))
    assert latest is not None and same(latest.checkpoint["channel_values"]["messages"], history[-1])


async def test_forks_read_back_whole(tmp_path: Path) -> None:
    """Time travel: checkpoints forked from older ones, each list exact whatever it extends."""
    path = tmp_path / "forks.db"
    async with SqliteSessionBackend(db_path=path) as backend:
        saver = CognitiaSaver(backend)
        history = await converse(saver, "t", 5)
        listed = [t async for t in saver.alist(cfg("t"))][::-1]
        expected = {t.checkpoint["id"]: history[i] for i, t in enumerate(listed)}
        for n, parent in enumerate([listed[2], listed[4], listed[1], None]):
            base = await saver.aget_tuple(parent.config if parent else cfg("t"))
            assert base is not None
            messages = [*base.checkpoint["channel_values"]["messages"], *exchange(10 + n)]
            version = saver.get_next_version(str(base.checkpoint["channel_versions"]["messages"]), None)
            cp = empty_checkpoint()
            cp["channel_values"] = {"messages": messages, "step": n}
            cp["channel_versions"] = {"messages": version, "step": version}
            await saver.aput(base.config, cp, {"step": 10 + n}, {"messages": version})
            expected[cp["id"]] = messages
    async with SqliteSessionBackend(db_path=path) as backend:
        found = {t.checkpoint["id"]: t async for t in CognitiaSaver(backend).alist(cfg("t"))}
    assert found.keys() == expected.keys()
    for checkpoint_id, messages in expected.items():
        assert same(found[checkpoint_id].checkpoint["channel_values"]["messages"], messages)
