"""Reusing the saver's own encodings: a growing message list costs its new messages, not its length.

LangGraph's checkpoint format stores a channel's whole value at every version, so a chat
thread's ``messages`` list is encoded again at each step, and a read of the latest
checkpoint must hand back an object equal to what storage holds. Both are linear in the
conversation with LangGraph's serializer, whose cost is mostly ``model_dump`` per message.

A *fingerprint* is a msgpack encoding of a value, made in native code, that captures
everything ``JsonPlusSerializer`` reads from it: a pydantic model becomes a list that starts
with an ext record of its class identity, followed by its ``__dict__``, extra and private
fields (what ``model_dump`` reads); an enum or a named tuple is its class's ext record and
its value or fields; any
other kind of object (a dataclass, a datetime, a subclass of a built-in type, a model with
serialization code of its own, ...) makes the fingerprint unavailable. Two values with equal
fingerprints therefore encode to equal bytes, which gives two exact shortcuts, each about
eight times cheaper than the encoding it replaces:

- Encoding: when a list's fingerprint extends the fingerprint of the list encoded last for
  the same channel, the items already encoded are unchanged, so the new encoding is a
  msgpack array header, the bytes already made, and the encoding of the new items only.
  msgpack encodes an array as its header followed by each item's encoding, so the result is
  byte for byte what the serializer would return (checked when a saver is created). When
  the log holds the previous version, only the new items are stored (an extension, see
  ``_codec``).
- Reading back: the object a thread saved last is served without decoding when its
  fingerprint still equals the one taken when its bytes were made (the caller of
  ``ainvoke`` holds the same objects and may have changed them since), and those bytes
  were seen to decode back to it (:func:`identical`: same types and fields all the way
  down). Equal bytes alone are not enough: the serializer decodes a tuple as a list, a
  model by validating it again (validators may fill in fields, private attributes start
  over). A list's new items are decoded once when they are encoded; anything else that
  does not decode back to itself is decoded at every read.

Tuples have a record of their own in fingerprints (they encode as lists do), so a list
turned into a tuple in place is a change. Two cases remain that a fingerprint does not
see: a ``bytes`` and a ``bytearray`` inside a value (both msgpack binaries; at the top
level, where the serializer keeps them apart, they are not fingerprinted), and a class
defined again under the same name after a value was saved (decoding would make an
instance of the new class; the saved object keeps the old one).

A pydantic model whose class overrides ``model_dump``, or whose ``model_dump`` runs code of
its own (``@field_serializer``, ``@model_serializer``, ``@computed_field``, a
``PlainSerializer`` or ``WrapSerializer`` on a field's type), is not fingerprinted: that code
may read more than the fields (a setting, the clock). Neither is any value when the
serializer's ``dumps_typed`` is not ``JsonPlusSerializer``'s. Those take the full path.
"""

from __future__ import annotations

import base64
import enum
import itertools
import math
from dataclasses import dataclass
from typing import Any

import ormsgpack
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import BaseModel

from ._codec import Encoding, array_header

__all__ = ["Encoded", "Encodings", "fingerprint", "identical"]

_CLASS = 1
_OPTIONS = (
    ormsgpack.OPT_NON_STR_KEYS
    | ormsgpack.OPT_PASSTHROUGH_DATACLASS
    | ormsgpack.OPT_PASSTHROUGH_DATETIME
    | ormsgpack.OPT_PASSTHROUGH_ENUM
    | ormsgpack.OPT_PASSTHROUGH_UUID
    | ormsgpack.OPT_PASSTHROUGH_SUBCLASS
    | ormsgpack.OPT_PASSTHROUGH_TUPLE
)
_MAX_CLASSES = 4096
_markers: dict[type[Any], ormsgpack.Ext | None] = {}
"""Per class met: the ext record standing for it in fingerprints (``None``: not fingerprinted).

Each record holds a number never given to another class in this process, so a class
created again under the same name (or at a reused address) never shares one. The dict
holds its classes alive; it starts over past ``_MAX_CLASSES`` (graphs that make model
classes on the fly), which only costs the next fingerprints their match with older ones.
"""
_models: dict[type[Any], ormsgpack.Ext] = {}
"""The pydantic model classes of ``_markers`` with their records (a list's items, in Python)."""
_serials = itertools.count()
_UNSEEN = ormsgpack.Ext(0, b"")


def _pack(value: Any) -> bytes:
    return ormsgpack.packb(value, default=_default, option=_OPTIONS)


def _marker(cls: type[Any]) -> ormsgpack.Ext | None:
    if len(_markers) >= _MAX_CLASSES:
        _markers.clear()
        _models.clear()
    model = issubclass(cls, BaseModel)
    if model:
        plain = cls.model_dump is BaseModel.model_dump and not _serializes_in_code(cls)
    else:
        # A tuple has a record too: it encodes as a list does, but decodes as a list.
        named = issubclass(cls, tuple) and hasattr(cls, "_fields")
        plain = issubclass(cls, enum.Enum) or cls is tuple or named
    marker = _markers[cls] = (
        ormsgpack.Ext(_CLASS, _pack([next(_serials), cls.__qualname__])) if plain else None
    )
    if model and marker is not None:
        _models[cls] = marker
    return marker


_DATA_SERIALIZATION = frozenset({"simple", "include-exclude-sequence", "include-exclude-dict"})
"""Serialization schemas that only say how data is laid out; any other may run code."""


def _serializes_in_code(cls: type[BaseModel]) -> bool:
    """Whether ``model_dump`` of ``cls`` runs code of the class's own, which may read more than the fields.

    ``@field_serializer``, ``@model_serializer`` and ``@computed_field`` (inherited ones
    included), a serializer attached to a field's type (``Annotated[..., PlainSerializer(...)]``,
    also in a nested model), a field's ``exclude_if``, and a field serialized through its
    ``str()`` or ``format()`` make what ``model_dump`` returns depend on more than
    ``__dict__``: such a class is not fingerprinted. Any serialization the schema names
    other than plain data (a type's own, or an include/exclude filter) counts as code.
    """
    decorators = cls.__pydantic_decorators__
    if decorators.field_serializers or decorators.model_serializers or decorators.computed_fields:
        return True
    try:
        schema: Any = cls.__pydantic_core_schema__
    except Exception:
        return True
    if not isinstance(schema, dict):  # not built yet (``defer_build``): nothing to go by
        return True
    pending: list[Any] = [schema]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if id(node) in seen:
                continue
            seen.add(id(node))
            serialization = node.get("serialization")
            if isinstance(serialization, dict) and serialization.get("type") not in _DATA_SERIALIZATION:
                return True
            if node.get("computed_fields") or node.get("serialization_exclude_if") is not None:
                return True
            pending.extend(node.values())
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
    return False


def _model(obj: Any, marker: ormsgpack.Ext) -> list[Any]:
    # A list that starts with an ext record: no other value's fingerprint starts so.
    return [marker, obj.__dict__, obj.__pydantic_extra__, obj.__pydantic_private__]


def _default(obj: Any) -> Any:
    cls = type(obj)
    marker = _markers.get(cls, _UNSEEN)
    if marker is _UNSEEN:
        marker = _marker(cls)
    if marker is None:
        # Anything else (dataclasses, datetimes, UUIDs, subclasses of built-in types, a
        # model with serialization code of its own, ...) is rare in a message list and takes
        # the serializer's full path.
        raise TypeError(f"no fingerprint for {cls.__name__}")
    if isinstance(obj, enum.Enum):
        return [marker, obj.value]
    if isinstance(obj, tuple):  # a tuple or a named tuple
        return [marker, list(obj)]
    return _model(obj, marker)


def _items(value: list[Any]) -> list[Any]:
    # The items of a message list are described here rather than by a call back from the
    # encoder per item, which costs about half the time; the bytes are the same. Each
    # model's record is spelled out as in _model: a call per item would cost a sixth more.
    models = _models
    return [
        [m, obj.__dict__, obj.__pydantic_extra__, obj.__pydantic_private__]
        if (m := models.get(type(obj))) is not None
        else obj
        for obj in value
    ]


def fingerprint(value: Any) -> bytes | None:
    """The value's fingerprint, or ``None`` if it holds an object the fingerprint cannot describe."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        # The serializer gives bytes and a bytearray kinds of their own, which msgpack
        # does not tell apart: they take the full path.
        return None
    if type(value) is list:
        value = _items(value)
    elif isinstance(value, tuple) and type(value) is not tuple:
        # A named tuple holding a list (LangGraph's DeltaChannel snapshot): its record,
        # as _default makes it, with its lists' items described in Python.
        marker = _markers.get(type(value), _UNSEEN)
        if marker is not None and marker is not _UNSEEN:
            value = [marker, [_items(field) if type(field) is list else field for field in value]]
    try:
        return _pack(value)
    except Exception:
        return None


@dataclass(slots=True)
class Encoded:
    """A channel's last encoding: the fingerprint it was made from, its type and bytes."""

    fingerprint: bytes
    kind: str
    data: bytes
    items: int | None
    """The list's length, when the value was a list (its encoding can then be extended)."""
    version: Any
    """The channel version the encoding was made for (``None``: not known)."""
    faithful: bool
    """Whether decoding ``data`` gives back the value itself: the same types and fields all
    the way down. Only then may the value be served for what storage holds."""


class Encodings:
    """Encodes channel values for one serializer, reusing the last encoding of each channel.

    ``memo`` maps a channel (any hashable name) to its :class:`Encoded`; the caller keeps one
    per live thread. When the serializer is not a ``JsonPlusSerializer`` with its own
    ``dumps_typed`` (or this process's ``ormsgpack`` breaks the array property), every call
    takes the full path.
    """

    def __init__(self, serde: SerializerProtocol) -> None:
        self._serde = serde
        self.enabled = (
            isinstance(serde, JsonPlusSerializer)
            and type(serde).dumps_typed is JsonPlusSerializer.dumps_typed
            and _arrays_concatenate(serde)
        )

    def encode(
        self, memo: dict[Any, Encoded], channel: Any, value: Any, *, version: Any = None, base: Any = None
    ) -> Encoding:
        """``value``, exactly as the serializer would encode it, for channel ``version``.

        With ``base``, a version of the channel whose value storage holds: when the last
        encoding was made for ``base`` and ``value`` is that list with items appended, the
        result is an extension holding the new items only.
        """
        mark = fingerprint(value) if self.enabled else None
        if mark is None:
            memo.pop(channel, None)
            kind, data = self._serde.dumps_typed(value)
            return Encoding(kind, base64.b64encode(data).decode("ascii"))
        last = memo.get(channel)
        items = len(value) if type(value) is list else None
        tail: bytes | None = None
        if last is not None and last.fingerprint == mark:
            kind, data, faithful = last.kind, last.data, last.faithful
            tail = b"" if items is not None else None
        else:
            kind, data, tail, faithful = self._extend(last, mark, value, items)
        memo[channel] = Encoded(mark, kind, data, items, version, faithful)
        if (
            tail is not None
            and items is not None
            and base is not None
            and last is not None
            and last.version == base
            and last.kind == kind
        ):
            return Encoding(kind, base64.b64encode(tail).decode("ascii"), (base, items))
        return Encoding(kind, base64.b64encode(data).decode("ascii"))

    def unchanged(self, memo: dict[Any, Encoded], channel: Any, value: Any, version: Any) -> bool:
        """Whether ``value`` is what decoding the encoding stored for ``version`` gives back.

        True only when ``value`` still encodes to those bytes and was seen to decode back to
        itself when they were made.
        """
        last = memo.get(channel)
        if last is None or version is None or last.version != version or not last.faithful:
            return False
        return fingerprint(value) == last.fingerprint

    def _extend(
        self, last: Encoded | None, mark: bytes, value: Any, items: int | None
    ) -> tuple[str, bytes, bytes | None, bool]:
        """The encoding of ``value``, the encodings of its new items when it extends ``last``,
        and whether the encoding decodes back to ``value`` (for an extension: whether
        ``last``'s did and the new items' do)."""
        if last is not None and items is not None and last.items is not None and items > last.items:
            old = len(array_header(last.items))
            new = len(array_header(items))
            known = last.fingerprint[old:]
            if mark.startswith(known, new):
                # msgpack items are self-delimiting: an equal prefix of item fingerprints
                # means the first `last.items` items are each unchanged.
                added_items = value[last.items :]
                kind, added = self._serde.dumps_typed(added_items)
                tail = added[len(array_header(items - last.items)) :]
                faithful = last.faithful and self._decodes_to(kind, added, added_items)
                return kind, array_header(items) + last.data[old:] + tail, tail, faithful
        kind, data = self._serde.dumps_typed(value)
        return kind, data, None, self._decodes_to(kind, data, value)

    def _decodes_to(self, kind: str, data: bytes, value: Any) -> bool:
        """Whether the serializer decodes ``(kind, data)`` to an object identical to ``value``.

        Not always so: a tuple comes back as a list, a subclass of a built-in type as the
        type, and a model is validated again (its validators may fill in or change fields,
        private attributes start over, a class the serializer does not allow comes back as
        a dict).
        """
        try:
            decoded = self._serde.loads_typed((kind, data))
        except Exception:
            return False
        return identical(decoded, value)


def identical(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are equal and of the same types all the way down.

    Stricter than ``==``, which holds between ``1``, ``1.0`` and ``True``, ``0.0`` and
    ``-0.0``, a tuple and a list with equal items (inside models), a ``bytes`` and a
    ``bytearray``, and dicts in another order. Models are compared by class and by what
    their fingerprint reads; NaN equals NaN.
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(identical, a, b))
    if isinstance(a, dict):
        # In order, keys included: the encoding keeps both.
        return len(a) == len(b) and all(map(identical, a.items(), b.items()))
    if isinstance(a, BaseModel):
        return (
            identical(a.__dict__, b.__dict__)
            and identical(a.__pydantic_extra__, b.__pydantic_extra__)
            and identical(a.__pydantic_private__, b.__pydantic_private__)
        )
    if isinstance(a, float):
        return (a == b and math.copysign(1.0, a) == math.copysign(1.0, b)) or (a != a and b != b)
    try:
        return bool(a == b)
    except Exception:
        return False


class _Sample(enum.Enum):
    A = 1


def _arrays_concatenate(serde: SerializerProtocol) -> bool:
    """Whether the serializer encodes a list as an array header plus its items' encodings."""
    sample: list[Any] = ["text", {"key": [1, 2.5, None]}, _Sample.A, b"raw", *range(20)]
    parts = (sample[:3], sample[3:])
    encoded = [serde.dumps_typed(part) for part in (sample, *parts)]
    if any(kind != "msgpack" for kind, _ in encoded):
        return False
    (_, whole), *pieces = encoded
    body = b"".join(
        data[len(array_header(len(part))) :] for part, (_, data) in zip(parts, pieces, strict=True)
    )
    return whole == array_header(len(sample)) + body
