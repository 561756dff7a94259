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
  ``ainvoke`` holds the same objects and may have changed them since).

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
from dataclasses import dataclass
from typing import Any

import ormsgpack
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import BaseModel

from ._codec import Encoding, array_header

__all__ = ["Encoded", "Encodings", "fingerprint"]

_CLASS = 1
_OPTIONS = (
    ormsgpack.OPT_NON_STR_KEYS
    | ormsgpack.OPT_PASSTHROUGH_DATACLASS
    | ormsgpack.OPT_PASSTHROUGH_DATETIME
    | ormsgpack.OPT_PASSTHROUGH_ENUM
    | ormsgpack.OPT_PASSTHROUGH_UUID
    | ormsgpack.OPT_PASSTHROUGH_SUBCLASS
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
        plain = issubclass(cls, enum.Enum) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
    marker = _markers[cls] = (
        ormsgpack.Ext(_CLASS, _pack([next(_serials), cls.__qualname__])) if plain else None
    )
    if model and marker is not None:
        _models[cls] = marker
    return marker


def _serializes_in_code(cls: type[BaseModel]) -> bool:
    """Whether ``model_dump`` of ``cls`` runs code of the class's own, which may read more than the fields.

    ``@field_serializer``, ``@model_serializer`` and ``@computed_field`` (inherited ones
    included), and a serializer attached to a field's type (``Annotated[..., PlainSerializer(...)]``,
    also in a nested model), make what ``model_dump`` returns depend on more than
    ``__dict__``: such a class is not fingerprinted.
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
            if isinstance(serialization, dict) and str(serialization.get("type", "")).startswith("function"):
                return True
            if node.get("computed_fields"):
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
    if isinstance(obj, tuple):  # a named tuple
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
            kind, data = last.kind, last.data
            tail = b"" if items is not None else None
        else:
            kind, data, tail = self._extend(last, mark, value, items)
        memo[channel] = Encoded(mark, kind, data, items, version)
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

    def unchanged(self, memo: dict[Any, Encoded], channel: Any, value: Any, version: Any) -> bool | None:
        """Whether ``value`` encodes to what was stored for ``version``; ``None`` if the memo cannot tell."""
        last = memo.get(channel)
        if last is None or version is None or last.version != version:
            return None
        mark = fingerprint(value)
        if mark is None:
            return None
        return mark == last.fingerprint

    def _extend(
        self, last: Encoded | None, mark: bytes, value: Any, items: int | None
    ) -> tuple[str, bytes, bytes | None]:
        """The encoding of ``value``, and the encodings of its new items when it extends ``last``."""
        if last is not None and items is not None and last.items is not None and items > last.items:
            old = len(array_header(last.items))
            new = len(array_header(items))
            known = last.fingerprint[old:]
            if mark.startswith(known, new):
                # msgpack items are self-delimiting: an equal prefix of item fingerprints
                # means the first `last.items` items are each unchanged.
                kind, added = self._serde.dumps_typed(value[last.items :])
                tail = added[len(array_header(items - last.items)) :]
                return kind, array_header(items) + last.data[old:] + tail, tail
        kind, data = self._serde.dumps_typed(value)
        return kind, data, None


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
