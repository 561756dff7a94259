"""Many checkpoint namespaces (a subgraph call saves under a new one): the stored index lists
only the most recent, and every namespace's latest checkpoint, with its pending writes, is
still found, whatever order LangGraph saved them in and whoever saved them."""

from __future__ import annotations

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver

from cognitia import InMemorySessionManager
from cognitia.session.backends import InMemorySessionBackend
from cognitia_langgraph import CognitiaSaver
from cognitia_langgraph._index import KEPT

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The saver's async methods, called directly, run on both runtimes."""
    return str(request.param)


def cfg(ns: str, checkpoint_id: str | None = None, thread_id: str = "t") -> RunnableConfig:
    configurable = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


async def put(saver: CognitiaSaver | InMemorySaver, ns: str, note: str = "", thread_id: str = "t") -> str:
    base = empty_checkpoint()
    base["channel_values"] = {"note": note}
    base["channel_versions"] = {"note": saver.get_next_version(None, None)}
    checkpoint = create_checkpoint(base, None, 1)
    await saver.aput(cfg(ns, thread_id=thread_id), checkpoint, {}, base["channel_versions"])
    return checkpoint["id"]


@pytest.mark.parametrize("others", [KEPT - 1, KEPT, KEPT + 1, 2 * KEPT])
async def test_writes_saved_before_their_checkpoint_are_found_after_other_namespaces(
    anyio_backend: str, others: int
) -> None:
    """LangGraph saves a step's writes in the background, possibly before the checkpoint
    they belong to; many subgraph calls may save in between. The checkpoint is then read
    with its writes, as InMemorySaver reads it."""
    for saver in (CognitiaSaver(InMemorySessionBackend()), InMemorySaver()):
        await put(saver, "")
        x = create_checkpoint(empty_checkpoint(), None, 1)
        await saver.aput_writes(cfg("sub:x", x["id"]), [("out", "hello")], "task-x")
        for i in range(others):
            await put(saver, f"sub:o{i}")
        await saver.aput(cfg("sub:x"), x, {}, {})
        found = await saver.aget_tuple(cfg("sub:x"))
        assert found is not None and found.checkpoint["id"] == x["id"]
        assert [(channel, value) for _, channel, value in found.pending_writes or []] == [("out", "hello")]


async def test_copying_an_older_checkpoint_in_does_not_hide_the_newer_one(anyio_backend: str) -> None:
    saver = CognitiaSaver(InMemorySessionBackend())
    await put(saver, "sub:x", "older, thread a", thread_id="a")
    await put(saver, "", thread_id="b")
    newer = await put(saver, "sub:x", "newer, thread b", thread_id="b")
    for i in range(KEPT + 1):
        await put(saver, f"sub:o{i}", thread_id="b")
    await saver.acopy_thread("a", "b")
    assert saver.manager.backend is not None
    for reader in (saver, CognitiaSaver(saver.manager.backend)):
        found = await reader.aget_tuple(cfg("sub:x", thread_id="b"))
        assert found is not None and found.checkpoint["id"] == newer


async def test_two_savers_on_one_manager_find_each_others_namespaces(anyio_backend: str) -> None:
    """A saver remembers which namespaces a live thread's log holds; another saver on the
    same manager saving the thread makes it read them again."""
    manager = InMemorySessionManager(InMemorySessionBackend())
    a, b = CognitiaSaver(manager), CognitiaSaver(manager)
    await put(a, "")
    for i in range(KEPT + 2):
        await put(a, f"sub:a{i}")
    assert await a.aget_tuple(cfg("sub:never")) is None  # a now knows the log's namespaces
    x = await put(b, "sub:x")
    for i in range(KEPT + 1):
        await put(b, f"sub:b{i}")  # sub:x leaves the index
    found = await a.aget_tuple(cfg("sub:x"))
    assert found is not None and found.checkpoint["id"] == x
    assert await a.aget_tuple(cfg("sub:never")) is None
