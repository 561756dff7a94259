"""Reused encodings are exact: byte for byte what LangGraph's serializer makes of the value now."""

from __future__ import annotations

import base64
import enum
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, NamedTuple

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.serde.types import _DeltaSnapshot
from pydantic import (
    BaseModel,
    PlainSerializer,
    PrivateAttr,
    WrapSerializer,
    computed_field,
    field_serializer,
    model_serializer,
)

from cognitia.session.backends import InMemorySessionBackend
from cognitia_langgraph import CognitiaSaver, _reuse
from cognitia_langgraph._codec import Encoding, Extension, array_header, raw, sources
from cognitia_langgraph._reuse import Encoded, Encodings, fingerprint, identical

SERDE = JsonPlusSerializer()


def expected(value: Any) -> Encoding:
    kind, data = SERDE.dumps_typed(value)
    return Encoding(kind, base64.b64encode(data).decode("ascii"))


class Point(BaseModel):
    x: int
    tags: list[str] = []


class Spot(BaseModel):
    """Same fields as Point, another class: it encodes differently."""

    x: int
    tags: list[str] = []


class Secretive(BaseModel):
    x: int
    _note: str = PrivateAttr(default="")


class Open(BaseModel, extra="allow"):
    x: int


class Dumped(BaseModel):
    """A model with its own model_dump: not fingerprinted."""

    x: int

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        return {"x": self.x * 2}


UNIT = {"name": "cm"}
"""A setting that serialization code of the models below reads: their fields do not change with it."""


class FieldSerialized(BaseModel):
    value: float

    @field_serializer("value")
    def _with_unit(self, value: float) -> str:
        return f"{value} {UNIT['name']}"


class InheritsFieldSerializer(FieldSerialized):
    note: str = ""


class ModelSerialized(BaseModel):
    value: float

    @model_serializer
    def _dump(self) -> dict[str, Any]:
        return {"value": self.value, "unit": UNIT["name"]}


class Computed(BaseModel):
    value: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def unit(self) -> str:
        return UNIT["name"]


class PlainAnnotated(BaseModel):
    value: Annotated[float, PlainSerializer(lambda v: f"{v} {UNIT['name']}")]


class WrapAnnotated(BaseModel):
    value: Annotated[float, WrapSerializer(lambda v, handler: [handler(v), UNIT["name"]])]


class HoldsOne(BaseModel):
    """No serialization code of its own, but a field whose model has some."""

    inner: FieldSerialized


SERIALIZING: list[Callable[[float], BaseModel]] = [
    lambda v: FieldSerialized(value=v),
    lambda v: InheritsFieldSerializer(value=v),
    lambda v: ModelSerialized(value=v),
    lambda v: Computed(value=v),
    lambda v: PlainAnnotated(value=v),
    lambda v: WrapAnnotated(value=v),
    lambda v: HoldsOne(inner=FieldSerialized(value=v)),
]


class Pair(NamedTuple):
    first: list[Any]
    second: list[Any]


class Colour(enum.Enum):
    RED = 1
    BLUE = 2


class Shade(enum.Enum):
    RED = 1
    BLUE = 2


def point_class() -> type[BaseModel]:
    class Point(BaseModel):  # same qualified name each call, a different class each time
        x: int

    return Point


def test_array_header_is_msgpacks() -> None:
    import ormsgpack

    for length in (0, 1, 15, 16, 65535, 65536):
        assert array_header(length) == ormsgpack.packb([0] * length)[: len(array_header(length))]
        assert ormsgpack.packb([0] * length) == array_header(length) + b"\x00" * length


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([Point(x=1)], [Spot(x=1)]),
        ([Colour.RED], [Shade.RED]),
        ([Colour.RED], [1]),
        ([Point(x=1)], [{"x": 1, "tags": []}]),
        ([HumanMessage(content="hi", id="1")], [AIMessage(content="hi", id="1")]),
        ([[1, 2]], [[1, 2, None]]),
        ([{"a": 1}], [{1: 1}]),
        ([1], [1.0]),
        ([True], [1]),
    ],
)
def test_values_that_encode_differently_have_different_fingerprints(before: Any, after: Any) -> None:
    assert SERDE.dumps_typed(before) != SERDE.dumps_typed(after)
    assert fingerprint(before) is not None and fingerprint(after) is not None
    assert fingerprint(before) != fingerprint(after)


def test_classes_are_told_apart_by_identity_not_name() -> None:
    """Stricter than the serializer, which names the class: a fingerprint never claims equal wrongly."""
    assert fingerprint([point_class()(x=1)]) != fingerprint([point_class()(x=1)])


def test_a_class_seen_again_after_the_class_table_starts_over_gets_a_new_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_reuse, "_MAX_CLASSES", 3)
    monkeypatch.setattr(_reuse, "_markers", {})
    monkeypatch.setattr(_reuse, "_models", {})
    first = fingerprint([Point(x=1)])
    for _ in range(5):
        assert fingerprint([point_class()(x=1)]) is not None
    assert len(_reuse._markers) <= 3
    assert fingerprint([Point(x=1)]) != first  # no match with older fingerprints: a miss, never a wrong hit
    memo: dict[Any, Encoded] = {}
    assert Encodings(SERDE).encode(memo, "c", [Point(x=1)]) == expected([Point(x=1)])


def test_private_and_extra_fields_are_part_of_the_fingerprint() -> None:
    one, two = Secretive(x=1), Secretive(x=1)
    assert fingerprint(one) == fingerprint(two)
    two._note = "changed"
    assert fingerprint(one) != fingerprint(two)
    assert fingerprint([one]) != fingerprint([two])  # a list's items are described in Python
    wide, wider = Open.model_validate({"x": 1, "y": 2}), Open.model_validate({"x": 1, "y": 3})
    assert SERDE.dumps_typed(wide) != SERDE.dumps_typed(wider)
    assert fingerprint(wide) != fingerprint(wider)
    assert fingerprint([wide]) != fingerprint([wider])


@pytest.mark.parametrize("seed", range(3))
def test_a_lists_items_are_described_as_the_encoder_describes_them(seed: int) -> None:
    """The fast path for a list's items makes the same bytes as the encoder's call back per item,
    for a list and for a named tuple holding one (LangGraph's DeltaChannel snapshot)."""
    rng = random.Random(seed)
    items: list[Any] = []
    for n in range(60):
        items = mutate(rng, items, n)
        for value in (items, _DeltaSnapshot(items), Pair(items, [*items, "x"])):
            try:
                slow: bytes | None = _reuse._pack(value)
            except Exception:
                slow = None
            assert fingerprint(value) == slow


@pytest.mark.parametrize(
    "value",
    [Dumped(x=1), [datetime.now(UTC)], [b"raw"[:0] + b"x", _S := type("S", (str,), {})("sub")]],
)
def test_what_the_fingerprint_cannot_describe_takes_the_full_path(value: Any) -> None:
    assert fingerprint(value) is None
    memo: dict[Any, Encoded] = {}
    assert Encodings(SERDE).encode(memo, "c", value) == expected(value)
    assert memo == {}


@pytest.mark.parametrize(
    "make",
    SERIALIZING,
    ids=["field_serializer", "inherited", "model_serializer", "computed_field", "plain", "wrap", "nested"],
)
def test_a_model_whose_model_dump_runs_its_own_code_takes_the_full_path(
    make: Callable[[float], BaseModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such code may read more than the fields (here a setting): equal fields do not mean equal bytes."""
    monkeypatch.setitem(UNIT, "name", "cm")
    first = make(1.0)
    encodings = Encodings(SERDE)
    memo: dict[Any, Encoded] = {}
    held = encodings.encode(memo, "c", [first], version=1)
    assert held == expected([first])
    grown = [first, make(2.0)]
    in_cm = SERDE.dumps_typed(grown)
    UNIT["name"] = "in"
    assert SERDE.dumps_typed(grown) != in_cm, "the setting changes what the serializer makes"
    encoding = encodings.encode(memo, "c", grown, version=2, base=1)
    stored: Extension | list[str] = [encoding.kind, encoding.text]
    if encoding.extends is not None:
        stored = Extension([held.kind, held.text], len(grown), encoding.kind, encoding.text)
    assert raw(stored) == SERDE.dumps_typed(grown)
    assert fingerprint(grown) is None


def test_models_without_serialization_code_are_fingerprinted() -> None:
    """LangChain's messages (and plain models) keep the shortcut."""
    for value in (HumanMessage("hi"), AIMessage("yo", tool_calls=[]), Point(x=1), Secretive(x=1), Open(x=1)):
        assert fingerprint([value]) is not None, type(value).__name__


def message(rng: random.Random, n: int) -> BaseMessage:
    if rng.random() < 0.5:
        return HumanMessage(content=f"message {n}", id=f"m{n}", additional_kwargs={"n": n})
    return AIMessage(content=f"message {n}", id=f"m{n}", additional_kwargs={"n": n})


def mutate(rng: random.Random, items: list[Any], n: int) -> list[Any]:
    """One change of the kinds a graph (or a caller holding its result) may make."""
    op = rng.randrange(10)
    if op <= 3 or not items:  # append, like add_messages: a new list, the same items
        return [*items, *(message(rng, n + i) for i in range(rng.randint(1, 3)))]
    target = rng.randrange(len(items))
    item = items[target]
    if op == 4 and isinstance(item, BaseMessage):
        item.content = f"edited {n}"  # in place: the list does not change, the item does
    elif op == 5 and isinstance(item, BaseMessage):
        item.additional_kwargs["seen"] = n  # deeper in place
    elif op == 6:
        items[target] = Spot(x=n) if isinstance(item, Point) else Point(x=n)
    elif op == 7:
        return items[:target]  # shorter
    elif op == 8:
        return [*items[:target], message(rng, n), *items[target:]]  # inserted in the middle
    else:
        items.append(rng.choice([Colour.BLUE, datetime(2026, 1, 1), {"nested": [Point(x=n)]}, None, (1, 2)]))
    return items


@pytest.mark.parametrize("seed", range(6))
def test_encodings_are_exact_through_appends_and_changes(seed: int) -> None:
    rng = random.Random(seed)
    encodings = Encodings(SERDE)
    assert encodings.enabled
    memo: dict[Any, Encoded] = {}
    items: list[Any] = []
    reused = extensions = 0
    verdicts: set[bool] = set()
    # What storage holds per version: whole values, and extensions of the version before.
    held: dict[int, Extension | list[str]] = {}
    for n in range(0, 600, 3):
        before = memo.get("c")
        items = mutate(rng, items, n)
        base = n - 3 if n - 3 in held and rng.random() < 0.9 else None
        encoding = encodings.encode(memo, "c", items, version=n, base=base)
        if encoding.extends is None:
            assert encoding == expected(items), f"step {n}"
            held[n] = [encoding.kind, encoding.text]
        else:
            assert encoding.extends == (base, len(items))
            assert base is not None
            held[n] = Extension(held[base], len(items), encoding.kind, encoding.text)
            extensions += 1
        assert raw(held[n]) == SERDE.dumps_typed(items), f"step {n}"
        reused += before is not None and memo.get("c") is not None
        # The read-back check agrees with a full encode and decode, whatever happens to the
        # items next: the value may be served only if decoding what is stored gives it back.
        items_then = items
        items = mutate(rng, items, n + 1000) if rng.random() < 0.3 else items
        assert not encodings.unchanged(memo, "c", items_then, n - 3)  # another version
        same = encodings.unchanged(memo, "c", items_then, n)
        stored = raw(held[n])
        exact = SERDE.dumps_typed(items_then) == stored and identical(SERDE.loads_typed(stored), items_then)
        assert same == (exact and fingerprint(items_then) is not None), f"step {n}"
        verdicts.add(same)
    assert reused > 50, "appends extend the previous encoding"
    assert extensions > 40, "appends to a stored version store the new items only"
    assert verdicts == {True, False}


def test_a_list_crossing_msgpack_header_sizes_is_encoded_exactly() -> None:
    encodings = Encodings(SERDE)
    memo: dict[Any, Encoded] = {}
    for length in (10, 15, 16, 17, 65530, 65535, 65536, 65540):
        value = list(range(length))
        assert encodings.encode(memo, "c", value) == expected(value)


def test_a_serializer_with_its_own_dumps_typed_is_not_second_guessed() -> None:
    class Prefixed(JsonPlusSerializer):
        def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
            kind, data = super().dumps_typed(obj)
            return kind, b"\x00" + data

    assert not Encodings(Prefixed()).enabled
    memo: dict[Any, Encoded] = {}
    assert Encodings(Prefixed()).encode(memo, "c", [1])[1] == base64.b64encode(b"\x00\x91\x01").decode()
    assert memo == {}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_saver_stores_exactly_what_the_serializer_makes(anyio_backend: str) -> None:
    """Growing, edited and shrinking lists: each put stores the serializer's bytes for the value then."""
    saver = CognitiaSaver(InMemorySessionBackend())
    rng = random.Random(7)
    config: Any = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
    items: list[Any] = []
    version: Any = None
    extended = 0
    from langgraph.checkpoint.base import empty_checkpoint

    for n in range(120):
        items = mutate(rng, items, n)
        version = saver.get_next_version(version, None)
        cp = empty_checkpoint()
        cp["channel_values"] = {"messages": items}
        cp["channel_versions"] = {"messages": version}
        want = SERDE.dumps_typed(items)
        config = await saver.aput(config, cp, {"step": n}, {"messages": version})
        turns = await saver.manager.turns(saver.key("t"))
        assert raw(sources(turns)[("", "messages", version)]) == want, f"step {n}"
        extended += "extends" in turns[-1]["checkpoint"]
        latest = await saver.aget_tuple({"configurable": {"thread_id": "t"}})
        assert latest is not None
        assert SERDE.dumps_typed(latest.checkpoint["channel_values"]["messages"]) == SERDE.dumps_typed(
            SERDE.loads_typed(want)
        )
    assert extended > 30, "appends are stored as the new items"


def test_only_the_version_the_last_encoding_was_made_for_is_extended() -> None:
    """An extension names its base version: it must be the one whose bytes it continues."""
    encodings = Encodings(SERDE)
    memo: dict[Any, Encoded] = {}
    first = [Point(x=1)]
    encodings.encode(memo, "c", first, version=1)
    forked = [*first, Point(x=2)]
    assert encodings.encode(memo, "c", forked, version=2).extends is None  # storage holds no base
    later = [*forked, Point(x=3)]
    # Storage holds version 1, but the last encoding is version 2's: stored whole.
    assert encodings.encode(memo, "c", later, version=3, base=1) == expected(later)
    longer = [*later, Point(x=4)]
    extension = encodings.encode(memo, "c", longer, version=4, base=3)
    assert extension.extends == (3, 4)
    assert base64.b64decode(extension.text) == SERDE.dumps_typed([Point(x=4)])[1][1:]
