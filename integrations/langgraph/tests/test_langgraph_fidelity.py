"""What a live saver serves from memory is what a fresh saver decodes from storage, type for type.

The saver serves the objects LangGraph saved last instead of decoding them again. That is
only right when decoding the stored bytes gives those objects back: LangGraph's serializer
turns a tuple into a list, validates models again, keeps bytes and bytearray apart at the
top level only. Each case here saves a value, reads it back live and from a new saver on
the same storage, and compares both the stored bytes and the types.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import BaseModel, Field, GetCoreSchemaHandler, PrivateAttr
from pydantic_core import CoreSchema, core_schema

from cognitia.session.backends import InMemorySessionBackend
from cognitia_langgraph import CognitiaSaver
from cognitia_langgraph._codec import raw, sources
from cognitia_langgraph._reuse import fingerprint, identical
from cognitia_langgraph._saver import REACH

SERDE = JsonPlusSerializer()

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests call the saver's async methods directly, which run on both runtimes."""
    return str(request.param)


class Tagged(BaseModel):
    name: str
    _note: str = PrivateAttr(default="")


def tagged_with_note() -> Tagged:
    value = Tagged(name="a")
    value._note = "set after construction: decoding starts it over"
    return value


def config(checkpoint_id: str | None = None) -> Any:
    conf = {"thread_id": "t", "checkpoint_ns": ""}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def checkpoint(values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    cp = empty_checkpoint()
    cp.pop("pending_sends", None)  # type: ignore[typeddict-item]  # legacy; graphs of checkpoint format 4 have none
    cp["channel_values"] = values
    cp["channel_versions"] = versions
    return cp


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
    saved = config()
    for step, value in enumerate(values):
        version = f"{step + 1:032}"
        values_now = checkpoint({"v": value}, {"v": version})
        saved = await saver.aput(saved, values_now, {"step": step}, {"v": version})
        assert await stored_bytes(saver, "v", version) == SERDE.dumps_typed(value), f"step {step}"
        live = await saver.aget_tuple(config())
        fresh = await CognitiaSaver(backend).aget_tuple(config())
        assert live is not None and fresh is not None
        served, decoded = live.checkpoint["channel_values"]["v"], fresh.checkpoint["channel_values"]["v"]
        assert identical(served, decoded), f"step {step}: {served!r} served, {decoded!r} stored"


async def test_values_that_decode_to_themselves_are_still_served_from_memory() -> None:
    saver = CognitiaSaver(InMemorySessionBackend())
    messages = [HumanMessage(content="hi", id="h"), ToolMessage(content="ok", tool_call_id="c", artifact=[1])]
    await saver.aput(config(), checkpoint({"v": messages}, {"v": "1"}), {"step": 0}, {"v": "1"})
    latest = await saver.aget_tuple(config())
    assert latest is not None and latest.checkpoint["channel_values"]["v"] is messages


async def test_an_older_checkpoint_is_read_from_storage_not_from_the_latest_objects() -> None:
    """One channel version can be stored twice (again once REACH turns old): after an in-place
    change that LangGraph never saw as a write, the two copies differ, and each checkpoint
    must read its own."""
    backend = InMemorySessionBackend()
    saver = CognitiaSaver(backend)
    messages = [HumanMessage(content="hi", id="h")]
    first = saved = await saver.aput(
        config(), checkpoint({"m": messages, "n": 0}, {"m": "1", "n": "1"}), {"step": 0}, {"m": "1", "n": "1"}
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
