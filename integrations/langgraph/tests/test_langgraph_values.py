"""Channel values stored once per version, and the latest values served without decoding,
only when they are what decoding the stored ones would give."""

from __future__ import annotations

import enum
import json
import sqlite3
from pathlib import Path
from typing import Annotated, Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import START, MessagesState, StateGraph
from pydantic import BaseModel, Field, GetCoreSchemaHandler, PrivateAttr
from pydantic_core import CoreSchema, core_schema

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia_langgraph import CognitiaSaver
from cognitia_langgraph._codec import raw, sources
from cognitia_langgraph._reuse import fingerprint, identical
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


# -- a value served from memory is what a new saver decodes from storage, type for type ------
#
# The saver serves the objects LangGraph saved last instead of decoding them again. That is
# only right when decoding the stored bytes gives those objects back: LangGraph's serializer
# turns a tuple into a list, validates models again, keeps bytes and bytearray apart at the
# top level only. Each case saves a value, reads it back live and from a new saver on the
# same storage, and compares both the stored bytes and the types.

SERDE = JsonPlusSerializer()


class Tagged(BaseModel):
    name: str
    _note: str = PrivateAttr(default="")


def tagged_with_note() -> Tagged:
    value = Tagged(name="a")
    value._note = "set after construction: decoding starts it over"
    return value


async def stored_bytes(saver: CognitiaSaver, channel: str, version: str) -> tuple[str, bytes]:
    turns = await saver.manager.turns(saver.key("t"))
    return raw(sources(turns)[("", channel, version)])


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([(1, 2)], id="tuple"),
        pytest.param([{"k": (1, [2])}], id="tuple-inside"),
        pytest.param([[(1, 2)], [(1, 2), (3, 4)]], id="tuples-appended"),
        pytest.param([b"ab", bytearray(b"ab"), b"ab"], id="bytes-then-bytearray"),
        pytest.param([[tagged_with_note()]], id="private-attribute"),
        pytest.param(
            [[HumanMessage(content="hi"), ToolMessage(content="ok", tool_call_id="c", artifact=(1,))]],
            id="tool-artifact",
        ),
    ],
)
async def test_a_served_value_is_what_decoding_the_stored_one_gives(values: list[Any]) -> None:
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    saved = cfg("t")
    for step, value in enumerate(values):
        version = f"{step + 1:032}"
        values_now = checkpoint({"v": value}, {"v": version})
        saved = await saver.aput(saved, values_now, {"step": step}, {"v": version})
        assert await stored_bytes(saver, "v", version) == SERDE.dumps_typed(value), f"step {step}"
        live = await saver.aget_tuple(cfg("t"))
        fresh = await CognitiaSaver(backend).aget_tuple(cfg("t"))
        assert live is not None and fresh is not None
        served, decoded = live.checkpoint["channel_values"]["v"], fresh.checkpoint["channel_values"]["v"]
        assert identical(served, decoded), f"step {step}: {served!r} served, {decoded!r} stored"


async def test_values_that_decode_to_themselves_are_still_served_from_memory() -> None:
    saver = CognitiaSaver(InMemorySessionBackend())
    messages = [HumanMessage(content="hi", id="h"), ToolMessage(content="ok", tool_call_id="c", artifact=[1])]
    await saver.aput(cfg("t"), checkpoint({"v": messages}, {"v": "1"}), {"step": 0}, {"v": "1"})
    latest = await saver.aget_tuple(cfg("t"))
    assert latest is not None and latest.checkpoint["channel_values"]["v"] is messages


async def test_an_older_checkpoint_is_read_from_storage_not_from_the_latest_objects() -> None:
    """One channel version can be stored twice (again once REACH turns old): after an in-place
    change that LangGraph never saw as a write, the two copies differ, and each checkpoint
    must read its own."""
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    messages = [HumanMessage(content="hi", id="h")]
    first = saved = await saver.aput(
        cfg("t"), checkpoint({"m": messages, "n": 0}, {"m": "1", "n": "1"}), {"step": 0}, {"m": "1", "n": "1"}
    )
    messages[0].additional_kwargs["seen"] = True  # in place, with no new version of "m"
    for step in range(1, REACH + 3):
        version = f"{step + 1}"
        values = checkpoint({"m": messages, "n": step}, {"m": "1", "n": version})
        saved = await saver.aput(saved, values, {"step": step}, {"n": version})
    turns = await saver.manager.turns(saver.key("t"))
    assert sum("m" in turn["checkpoint"]["channel_values"] for turn in turns) == 2, "stored again"
    fresh = CognitiaSaver(backend)
    for wanted in (first, saved):
        live, stored = await saver.aget_tuple(wanted), await fresh.aget_tuple(wanted)
        assert live is not None and stored is not None
        assert identical(live.checkpoint["channel_values"]["m"], stored.checkpoint["channel_values"]["m"])
    old = await saver.aget_tuple(first)
    assert old is not None and old.checkpoint["channel_values"]["m"][0].additional_kwargs == {}


def test_a_tuple_and_a_list_have_different_fingerprints() -> None:
    """They encode alike, but decode as a list: a list changed into a tuple in place is a change."""
    assert SERDE.dumps_typed({"k": (1,)}) == SERDE.dumps_typed({"k": [1]})
    assert fingerprint({"k": (1,)}) != fingerprint({"k": [1]})
    assert fingerprint([(1,)]) != fingerprint([[1]])


def test_top_level_bytes_take_the_full_path() -> None:
    """The serializer stores bytes and a bytearray under kinds of their own."""
    assert SERDE.dumps_typed(b"ab")[0] != SERDE.dumps_typed(bytearray(b"ab"))[0]
    assert fingerprint(b"ab") is None and fingerprint(bytearray(b"ab")) is None


UNIT = {"name": "cm"}


class Size(enum.Enum):
    S = 1

    def __str__(self) -> str:
        return f"{self.value} {UNIT['name']}"


class AsText:
    """A field type serialized through ``str()``: a ``to-string`` serialization schema."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.any_schema(serialization=core_schema.to_string_ser_schema(when_used="always"))


class AsFormat:
    """A field type serialized through ``format()``."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.float_schema(serialization=core_schema.format_ser_schema(".2f"))


class Sized(BaseModel):
    size: Annotated[Size, AsText]


class Priced(BaseModel):
    price: Annotated[float, AsFormat]


class Hidden(BaseModel):
    secret: str = Field("", exclude_if=lambda value: UNIT["name"] == "in")


@pytest.mark.parametrize("model", [Sized(size=Size.S), Priced(price=1.5), Hidden(secret="x")])
def test_fields_serialized_by_code_are_not_fingerprinted(model: BaseModel) -> None:
    """``str()``, ``format()`` and ``exclude_if`` may read more than the fields (here, a setting)."""
    assert fingerprint(model) is None
    assert fingerprint([model]) is None
    before = SERDE.dumps_typed([model])
    UNIT["name"] = "in"
    try:
        changed = SERDE.dumps_typed([model]) != before
    finally:
        UNIT["name"] = "cm"
    assert changed or isinstance(model, Priced)  # format() reads no setting, but is code all the same


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, True),
        (1, 1.0),
        (0.0, -0.0),
        ([1], (1,)),
        (b"a", bytearray(b"a")),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({1: "x"}, {True: "x"}),
        (Tagged(name="a"), tagged_with_note()),
    ],
)
def test_identical_tells_apart_what_equality_does_not(a: Any, b: Any) -> None:
    assert not identical(a, b) and not identical([a], [b]) and not identical({"k": a}, {"k": b})


def test_identical_holds_for_equal_values_of_equal_types() -> None:
    value = {"n": float("nan"), "m": [HumanMessage(content="hi", id="h")], "t": (1, "x"), "b": b"a"}
    copy = {"n": float("nan"), "m": [HumanMessage(content="hi", id="h")], "t": (1, "x"), "b": b"a"}
    assert identical(value, copy)
