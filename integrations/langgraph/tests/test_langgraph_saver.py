"""The saver's own guarantees: public names, no pickle, clear errors, cheap reads of the latest checkpoint."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.serde.encrypted import EncryptedSerializer
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

import cognitia_langgraph
from cognitia import InMemorySessionManager, StateNotSerializableError
from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver, PickleRefusedError

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests call the saver's async methods directly, which run on both runtimes."""
    return str(request.param)


def cfg(thread_id: str, checkpoint_id: str | None = None, ns: str = "") -> RunnableConfig:
    conf = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


class CountingBackend(InMemorySessionBackend):
    """A real in-memory backend that records how much of each turn log is read."""

    def __init__(self) -> None:
        super().__init__()
        self.turn_reads: list[int | None] = []

    async def _raw_load_turns(self, key: str, last: int | None, now: float) -> list[str]:
        self.turn_reads.append(last)
        return await super()._raw_load_turns(key, last, now)


class XorCipher:
    def encrypt(self, plaintext: bytes) -> tuple[str, bytes]:
        return "xor", bytes(b ^ 0x5A for b in plaintext)

    def decrypt(self, ciphername: str, ciphertext: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in ciphertext)


def test_public_names() -> None:
    assert sorted(cognitia_langgraph.__all__) == sorted(
        name for name in vars(cognitia_langgraph) if not name.startswith("_") or name == "__version__"
    )


async def test_pickle_fallback_is_refused() -> None:
    """A serializer that may pickle is refused up front, also when wrapped by encryption."""
    with pytest.raises(PickleRefusedError, match="pickle_fallback"):
        CognitiaSaver(InMemorySessionBackend(), serde=JsonPlusSerializer(pickle_fallback=True))
    with pytest.raises(PickleRefusedError):
        CognitiaSaver(
            InMemorySessionBackend(),
            serde=EncryptedSerializer(XorCipher(), JsonPlusSerializer(pickle_fallback=True)),
        )
    saver = CognitiaSaver(
        InMemorySessionBackend(), serde=EncryptedSerializer(XorCipher(), JsonPlusSerializer())
    )
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"x": {"a": 1}}
    await saver.aput(cfg("t"), checkpoint, {"step": 0}, {})
    latest = await saver.aget_tuple(cfg("t"))
    assert latest is not None and latest.checkpoint["channel_values"] == {"x": {"a": 1}}


async def test_a_stored_pickle_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "tampered.db"
    async with SqliteSessionBackend(db_path=path) as backend:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"x": [1, 2]}
        await CognitiaSaver(backend).aput(cfg("t"), checkpoint, {"step": 0}, {})
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE cognitia_turns SET turn = replace(turn, '\"msgpack\"', '\"pickle\"')")
    conn.close()
    async with SqliteSessionBackend(db_path=path) as backend:
        with pytest.raises(PickleRefusedError):
            await CognitiaSaver(backend).aget_tuple(cfg("t"))


async def test_unstorable_values_fail_before_anything_is_written() -> None:
    """The error names the session and the offending value; the thread is left as it was."""
    saver = CognitiaSaver(InMemorySessionBackend())
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"handle": threading.Lock()}
    with pytest.raises(StateNotSerializableError, match=r"langgraph:t.*channel_values.*'handle'"):
        await saver.aput(cfg("t"), checkpoint, {"step": 0}, {})

    good = empty_checkpoint()
    with pytest.raises(StateNotSerializableError, match=r'metadata\["when"\]'):
        await saver.aput(cfg("t"), good, {"step": 0, "when": {1, 2}}, {})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(StateNotSerializableError, match=r"writes\[1\]"):
        await saver.aput_writes(cfg("t", good["id"]), [("a", 1), ("b", lambda: 1)], "task")
    assert await saver.aget_tuple(cfg("t")) is None
    assert await saver.manager.list_keys() == []


async def test_latest_checkpoint_reads_only_the_tail() -> None:
    """Resuming a long thread in a fresh process reads the newest turns, not the history."""
    backend = CountingBackend()
    saver = CognitiaSaver(backend)
    parent = None
    ids = []
    for step in range(40):
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"step": step}
        stored = await saver.aput(cfg("long", parent), checkpoint, {"step": step}, {})
        await saver.aput_writes(stored, [("out", step)], f"task-{step}")
        parent = stored["configurable"]["checkpoint_id"]
        ids.append(parent)

    fresh = CognitiaSaver(backend)  # a new manager: nothing is live
    latest = await fresh.aget_tuple(cfg("long"))
    assert latest is not None and latest.checkpoint["channel_values"] == {"step": 39}
    assert latest.pending_writes == [("task-39", "out", 39)]
    assert backend.turn_reads == [2], "only the latest checkpoint and its writes were read"

    older = await fresh.aget_tuple(cfg("long", ids[3]))
    assert older is not None and older.checkpoint["channel_values"] == {"step": 3}
    assert older.pending_writes == [("task-3", "out", 3)]
    assert len([t async for t in fresh.alist(cfg("long"))]) == 40


async def test_writes_saved_before_their_checkpoint_are_found() -> None:
    """LangGraph saves checkpoints in the background, so a step's writes can land first."""
    backend = CountingBackend()
    saver = CognitiaSaver(backend)
    first, second = empty_checkpoint(), empty_checkpoint()
    assert second["id"] > first["id"]
    await saver.aput(cfg("early"), first, {"step": 0}, {})
    await saver.aput_writes(cfg("early", second["id"]), [("x", "early write")], "task")
    await saver.aput(cfg("early", first["id"]), second, {"step": 1}, {})

    for reader in (saver, CognitiaSaver(backend)):
        latest = await reader.aget_tuple(cfg("early"))
        assert latest is not None and latest.checkpoint["id"] == second["id"]
        assert latest.pending_writes == [("task", "x", "early write")]
    assert backend.turn_reads == [2]


async def test_unknown_namespace_is_answered_from_the_index() -> None:
    backend = CountingBackend()
    saver = CognitiaSaver(backend)
    await saver.aput(cfg("ns"), empty_checkpoint(), {"step": 0}, {})
    fresh = CognitiaSaver(backend)
    assert await fresh.aget_tuple(cfg("ns", ns="child:1")) is None
    assert backend.turn_reads == []


async def test_accepts_a_manager_and_a_key_prefix() -> None:
    manager = InMemorySessionManager(InMemorySessionBackend())
    saver = CognitiaSaver(manager, key_prefix="graphs/")
    assert saver.manager is manager
    await saver.aput(cfg("x"), empty_checkpoint(), {"step": 0}, {})
    assert await manager.list_keys() == ["graphs/x"]
    assert [t.config["configurable"]["thread_id"] async for t in saver.alist(None)] == ["x"]


def test_versions_increase() -> None:
    saver = CognitiaSaver(InMemorySessionBackend())
    versions = [saver.get_next_version(None, None)]
    for _ in range(20):
        versions.append(saver.get_next_version(versions[-1], None))
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert saver.get_next_version(7, None).startswith("0" * 31 + "8.")
