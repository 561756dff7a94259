"""How LangGraph checkpoints and writes become cognitia turns: plain JSON, never pickle.

Values LangGraph hands us (channel values, pending writes) are arbitrary Python objects, so
they go through LangGraph's own serializer (``saver.serde``), and the ``(type, bytes)`` pair
it returns is stored as ``[type, base64]``. Everything else (ids, versions, timestamps,
metadata) is stored as the plain JSON it already is, so the log stays readable and
``list(filter=...)`` can match metadata without decoding anything.

The turns of a live session are kept in memory, and LangGraph changes the checkpoint dicts
it loads (applying a step's writes bumps ``channel_versions`` and ``versions_seen`` in
place). So the saver shares no container with its callers, either way:
:func:`checkpoint_turn` copies the fields it keeps (metadata as the JSON it is checked as),
and :func:`load_checkpoint` and :func:`copied` hand out copies. Channel values and pending
writes are decoded anew on every read, or served again only while they still encode to the
stored bytes (see ``_reuse``).

A checkpoint turn::

    {"kind": "checkpoint", "ns": "", "id": "1f0...", "parent": "1f0..." | null,
     "checkpoint": {"v": 4, "ts": "...", "channel_versions": {...}, "versions_seen": {...},
                    "updated_channels": [...] | null,
                    "channel_values": {"messages": ["msgpack", "<base64>"]},
                    "carried": ["tools"]},
     "metadata": {"source": "loop", "step": 3, "parents": {}, ...}}

A channel value is stored once per channel version, like LangGraph's Postgres saver stores
one blob per (channel, version): ``channel_values`` holds the channels whose value this turn
stores, and ``carried`` (present only when not empty) names the channels whose value is the
one an earlier checkpoint turn of the same namespace stored under the same version
(``channel_versions[name]``). A graph step that changes one channel encodes and stores that
channel only.

A list that grew from a version stored earlier (a chat's messages) is stored as that version
plus its new items: ``extends`` (present only when not empty) maps such a channel to
``[base version, length]``, and its entry in ``channel_values`` holds the encodings of the new
items only. The value's bytes are a msgpack array header for ``length`` items, the items of
the base version's bytes, then these: exactly what the serializer makes for the whole list.
So a turn costs what it adds, not the conversation's length::

    "channel_values": {"messages": ["msgpack", "<base64 of the two new messages>"]},
    "extends": {"messages": ["00...0041.0.73", 84]}

A batch of pending writes (one ``put_writes`` call)::

    {"kind": "writes", "ns": "", "checkpoint": "1f0...", "task": "<task id>", "path": "<task path>",
     "writes": [[0, "messages", "msgpack", "<base64>"], ...]}
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, TypeAlias, cast

from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    Checkpoint,
    CheckpointMetadata,
    PendingWrite,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from cognitia import CognitiaError, StateNotSerializableError
from cognitia._json import dumps, loads

__all__ = [
    "CHECKPOINT",
    "WRITES",
    "Encode",
    "Encoding",
    "Extension",
    "Pair",
    "PickleRefusedError",
    "Source",
    "Stored",
    "array_header",
    "carried",
    "checkpoint_turn",
    "chosen_writes",
    "copied",
    "extended",
    "load_checkpoint",
    "load_value",
    "pair_of",
    "pending_writes",
    "raw",
    "refuse_pickle",
    "resolve",
    "sources",
    "stored_values",
    "typed",
    "writes_turn",
]

Pair = list[str]
"""A stored value: ``[type, base64]`` as LangGraph's serializer typed it."""
Source = tuple[str, str, Any]
"""Where a stored channel value is found: ``(namespace, channel, version)``."""


class Encoding(NamedTuple):
    """An encoded value as ``(type, base64)``; with ``extends``, only the new items of a list."""

    kind: str
    text: str
    extends: tuple[Any, int] | None = None
    """``(base version, length)``: ``text`` encodes the items past the base version's."""


@dataclass(frozen=True, slots=True)
class Extension:
    """A stored list value: the value stored as ``base`` plus new items (see the module docstring)."""

    base: Stored
    length: int
    kind: str
    tail: str
    """The new items' encodings, concatenated, in base64."""


Stored: TypeAlias = Pair | Extension
"""A channel value as the log holds it: ``[type, base64]``, or an :class:`Extension` of one."""

CHECKPOINT = "checkpoint"
WRITES = "writes"

# Checkpoint fields that are JSON by LangGraph's own contract; any other field (such as
# the legacy ``pending_sends``) is kept too, through the serializer, under "extra".
_PLAIN_FIELDS = ("v", "ts", "channel_versions", "versions_seen", "updated_channels")


class PickleRefusedError(CognitiaError, TypeError):
    """A serializer produced (or a stored turn holds) pickled data, which cognitia never loads."""


def refuse_pickle(serde: SerializerProtocol) -> None:
    """Raise if ``serde`` (or a serializer it wraps) would fall back to pickle."""
    layer: object = serde
    for _ in range(8):  # EncryptedSerializer and friends wrap another serializer in `.serde`
        if getattr(layer, "pickle_fallback", False):
            raise PickleRefusedError(
                f"{type(layer).__name__} has pickle_fallback enabled; cognitia stores plain JSON "
                "and never pickles. Use JsonPlusSerializer() (its default has no pickle fallback)."
            )
        layer = getattr(layer, "serde", None)
        if layer is None:
            return


def copied(value: Any) -> Any:
    """``value`` with every dict and list in it copied, at any depth.

    For the JSON the saver keeps in its turns (metadata, versions): no container of the
    result is one of ``value``'s.
    """
    if isinstance(value, dict):
        return {key: item if type(item) in _SCALARS else copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [item if type(item) in _SCALARS else copied(item) for item in value]
    return value


_SCALARS = frozenset((str, int, float, bool, type(None)))


Encode = Callable[[Any], Encoding]
"""Encodes a value; the saver passes one that reuses (and extends) earlier encodings."""


def typed(serde: SerializerProtocol) -> Encode:
    """The plain encoder: ``serde.dumps_typed``, base64."""

    def encode(value: Any) -> Encoding:
        kind, data = serde.dumps_typed(value)
        return Encoding(kind, base64.b64encode(data).decode("ascii"))

    return encode


def _dump(encode: Encode, value: Any, key: str, path: str) -> Encoding:
    try:
        encoded = encode(value)
    except Exception as exc:
        name = type(value).__name__
        article = "an" if name[:1].lower() in "aeiou" else "a"
        raise StateNotSerializableError(
            key, path, f"is {article} {name} that LangGraph's serializer rejected ({exc})"
        ) from exc
    if "pickle" in encoded.kind:
        raise PickleRefusedError(f"session {key!r}: the serializer pickled {path}; refusing to store it")
    return encoded


def array_header(length: int) -> bytes:
    """The msgpack header of an array of ``length`` items."""
    if length < 16:
        return bytes((0x90 | length,))
    if length < 1 << 16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


_HEADER_SIZES = {**{0x90 | n: 1 for n in range(16)}, 0xDC: 3, 0xDD: 5}


def raw(value: Stored) -> tuple[str, bytes]:
    """The type and bytes of a stored value, an extension's assembled from its chain."""
    if not isinstance(value, Extension):
        return value[0], base64.b64decode(value[1])
    tails: list[str] = []
    node: Stored = value
    while isinstance(node, Extension):
        tails.append(node.tail)
        node = node.base
    root = base64.b64decode(node[1])
    size = _HEADER_SIZES.get(root[0]) if root else None
    if size is None or node[0] != value.kind:
        raise CognitiaError("a stored list extends a value that is not a msgpack list; the log is damaged")
    parts = [array_header(value.length), root[size:]]
    parts.extend(base64.b64decode(tail) for tail in reversed(tails))
    return value.kind, b"".join(parts)


def pair_of(value: Stored) -> Pair:
    """A stored value as a self-contained ``[type, base64]``."""
    if not isinstance(value, Extension):
        return value
    kind, data = raw(value)
    return [kind, base64.b64encode(data).decode("ascii")]


def load_value(serde: SerializerProtocol, value: Stored) -> Any:
    """Decode one stored value; refuses pickle."""
    kind = value.kind if isinstance(value, Extension) else value[0]
    if "pickle" in kind:
        raise PickleRefusedError("a stored value is marked as pickled; cognitia never loads pickle")
    return serde.loads_typed(raw(value))


def checkpoint_turn(
    serde: SerializerProtocol,
    key: str,
    ns: str,
    checkpoint: Checkpoint,
    parent_id: str | None,
    metadata: CheckpointMetadata,
    stored: Mapping[str, Any],
    encode_channel: Callable[[str, Any], Encoding] | None = None,
) -> dict[str, Any]:
    """The turn that stores one checkpoint, validated as JSON before anything is written.

    ``stored`` maps channels to the version whose value the namespace's log already holds
    within reach: a channel still at that version is carried, not encoded again.
    ``encode_channel(channel, value)`` encodes a channel value (default: ``serde``'s); it
    may return an extension of the version ``stored`` names for the channel.
    """
    plain = typed(serde)
    # Metadata is the one part that is not JSON by construction (it may carry user values
    # from the config); check it here so a bad value fails before the session is touched.
    # The turn keeps the JSON read back: a copy, and what a reader of storage gets.
    kept_metadata = loads(dumps(key, metadata, root="metadata"))
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in checkpoint.items():
        if name in _PLAIN_FIELDS:
            fields[name] = copied(value)  # the caller may change its dicts after the save
        elif name not in ("id", "channel_values"):
            extra[name] = value
    versions = checkpoint["channel_versions"]
    values: dict[str, Pair] = {}
    kept: list[str] = []
    extends: dict[str, list[Any]] = {}
    for channel, value in checkpoint["channel_values"].items():
        version = versions.get(channel)
        if version is not None and channel in stored and stored[channel] == version:
            kept.append(channel)
            continue
        encode = plain if encode_channel is None else partial(encode_channel, channel)
        encoded = _dump(encode, value, key, f'checkpoint["channel_values"][{channel!r}]')
        values[channel] = [encoded.kind, encoded.text]
        if encoded.extends is not None:
            base, length = encoded.extends
            if version is None or channel not in stored or stored[channel] != base:
                raise CognitiaError(f"session {key!r}: {channel!r} extends a value the log does not hold")
            extends[channel] = [base, length]
    fields["channel_values"] = values
    if kept:
        fields["carried"] = kept
    if extends:
        fields["extends"] = extends
    turn: dict[str, Any] = {
        "kind": CHECKPOINT,
        "ns": ns,
        "id": checkpoint["id"],
        "parent": parent_id,
        "checkpoint": fields,
        "metadata": kept_metadata,
    }
    if extra:
        encoded = _dump(plain, extra, key, "checkpoint (fields beyond LangGraph's standard ones)")
        turn["extra"] = [encoded.kind, encoded.text]
    return turn


def writes_turn(
    serde: SerializerProtocol,
    key: str,
    ns: str,
    checkpoint_id: str,
    task_id: str,
    task_path: str,
    writes: Sequence[tuple[str, Any]],
) -> dict[str, Any]:
    """The turn that stores one ``put_writes`` batch; special channels get LangGraph's fixed indexes."""
    encode = typed(serde)
    return {
        "kind": WRITES,
        "ns": ns,
        "checkpoint": checkpoint_id,
        "task": task_id,
        "path": task_path,
        "writes": [
            [
                WRITES_IDX_MAP.get(channel, idx),
                channel,
                *_dump(encode, value, key, f"writes[{idx}] ({channel})")[:2],
            ]
            for idx, (channel, value) in enumerate(writes)
        ],
    }


def stored_values(turn: dict[str, Any]) -> dict[str, Pair]:
    """The channel values a checkpoint turn stores itself, still encoded."""
    values: dict[str, Pair] = turn["checkpoint"]["channel_values"]
    return values


def carried(turn: dict[str, Any]) -> list[str]:
    """The channels whose value a checkpoint turn takes from an earlier turn (see the module docstring)."""
    names: list[str] = turn["checkpoint"].get("carried", [])
    return names


def extended(turn: dict[str, Any]) -> dict[str, list[Any]]:
    """The channels a checkpoint turn stores as an earlier version plus new items: ``[base, length]``."""
    links: dict[str, list[Any]] = turn["checkpoint"].get("extends", {})
    return links


def sources(turns: Iterable[dict[str, Any]]) -> dict[Source, Stored]:
    """Every channel value stored in ``turns``, by namespace, channel and version.

    An extension whose base is not in ``turns`` (an older part of the log) is left out.
    """
    found: dict[Source, Stored] = {}
    for turn in turns:
        if turn["kind"] == CHECKPOINT:
            versions = turn["checkpoint"]["channel_versions"]
            links = extended(turn)
            ns = turn["ns"]
            for channel, pair in turn["checkpoint"]["channel_values"].items():
                version = versions.get(channel)
                if version is None:
                    continue
                link = links.get(channel)
                if link is None:
                    found[(ns, channel, version)] = pair
                else:
                    base = found.get((ns, channel, link[0]))
                    if base is not None:
                        found[(ns, channel, version)] = Extension(base, link[1], pair[0], pair[1])
    return found


def resolve(turn: dict[str, Any], found: Mapping[Source, Stored]) -> dict[str, Stored] | None:
    """Every stored channel value of a checkpoint turn; ``None`` if one it refers to is not in ``found``."""
    values: dict[str, Stored] = dict(stored_values(turn))
    versions = turn["checkpoint"]["channel_versions"]
    for channel in (*carried(turn), *extended(turn)):
        value = found.get((turn["ns"], channel, versions.get(channel)))
        if value is None:
            return None
        values[channel] = value
    return values


def load_checkpoint(
    serde: SerializerProtocol, turn: dict[str, Any], channel_values: dict[str, Any]
) -> Checkpoint:
    """Rebuild the :class:`Checkpoint` stored by :func:`checkpoint_turn`, with its decoded values.

    Its versions are copies: LangGraph changes them in place when it runs from the checkpoint.
    """
    stored = turn["checkpoint"]
    checkpoint: dict[str, Any] = {name: copied(stored[name]) for name in _PLAIN_FIELDS if name in stored}
    checkpoint["id"] = turn["id"]
    checkpoint["channel_values"] = channel_values
    if "extra" in turn:
        checkpoint.update(load_value(serde, turn["extra"]))
    return cast(Checkpoint, checkpoint)


def chosen_writes(
    turns: Iterable[dict[str, Any]], channels: Container[str] | None = None
) -> list[tuple[str, int, str, Pair]]:
    """The writes in ``turns`` as ``(task, idx, channel, [kind, data])``, still encoded.

    Oldest first, deduplicated and in ``writes_sort_key`` order: like LangGraph's own savers,
    a repeated regular write (same task, same index) keeps the first value, and a repeated
    special write (error, interrupt, ...) the last one. With ``channels``, only the writes
    to those channels.
    """
    chosen: dict[tuple[str, int], tuple[str, str, int, str, Pair]] = {}
    for turn in turns:
        task, path = turn["task"], turn["path"]
        for idx, channel, kind, data in turn["writes"]:
            if idx >= 0 and (task, idx) in chosen:
                continue
            chosen[(task, idx)] = (path, task, idx, channel, [kind, data])
    ordered = sorted(chosen.values(), key=lambda w: writes_sort_key(w[0], w[1], w[2]))
    return [
        (task, idx, channel, value)
        for _, task, idx, channel, value in ordered
        if channels is None or channel in channels
    ]


def pending_writes(
    serde: SerializerProtocol, turns: Iterable[dict[str, Any]], channels: Container[str] | None = None
) -> list[PendingWrite]:
    """The pending writes in ``turns``, decoded (see :func:`chosen_writes`)."""
    return [
        (task, channel, load_value(serde, value))
        for task, _, channel, value in chosen_writes(turns, channels)
    ]
