"""How LangGraph checkpoints and writes become cognitia turns: plain JSON, never pickle.

Values LangGraph hands us (channel values, pending writes) are arbitrary Python objects, so
they go through LangGraph's own serializer (``saver.serde``), and the ``(type, bytes)`` pair
it returns is stored as ``[type, base64]``. Everything else (ids, versions, timestamps,
metadata) is stored as the plain JSON it already is, so the log stays readable and
``list(filter=...)`` can match metadata without decoding anything.

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

A batch of pending writes (one ``put_writes`` call)::

    {"kind": "writes", "ns": "", "checkpoint": "1f0...", "task": "<task id>", "path": "<task path>",
     "writes": [[0, "messages", "msgpack", "<base64>"], ...]}
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    Checkpoint,
    CheckpointMetadata,
    PendingWrite,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from cognitia import CognitiaError, StateNotSerializableError
from cognitia._json import dumps

__all__ = [
    "CHECKPOINT",
    "WRITES",
    "Encode",
    "Pair",
    "PickleRefusedError",
    "Source",
    "carried",
    "checkpoint_turn",
    "load_checkpoint",
    "load_value",
    "pending_writes",
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


Encode = Callable[[Any], tuple[str, str]]
"""Encodes a value as ``(type, base64)``; the saver passes one that reuses earlier encodings."""


def typed(serde: SerializerProtocol) -> Encode:
    """The plain encoder: ``serde.dumps_typed``, base64."""

    def encode(value: Any) -> tuple[str, str]:
        kind, data = serde.dumps_typed(value)
        return kind, base64.b64encode(data).decode("ascii")

    return encode


def _dump(encode: Encode, value: Any, key: str, path: str) -> Pair:
    try:
        kind, text = encode(value)
    except Exception as exc:
        raise StateNotSerializableError(
            key, path, f"is a {type(value).__name__} that LangGraph's serializer rejected ({exc})"
        ) from exc
    if "pickle" in kind:
        raise PickleRefusedError(f"session {key!r}: the serializer pickled {path}; refusing to store it")
    return [kind, text]


def load_value(serde: SerializerProtocol, pair: Sequence[str]) -> Any:
    """Decode one stored ``[type, base64]`` value; refuses pickle."""
    kind, data = pair
    if "pickle" in kind:
        raise PickleRefusedError("a stored value is marked as pickled; cognitia never loads pickle")
    return serde.loads_typed((kind, base64.b64decode(data)))


def checkpoint_turn(
    serde: SerializerProtocol,
    key: str,
    ns: str,
    checkpoint: Checkpoint,
    parent_id: str | None,
    metadata: CheckpointMetadata,
    stored: Mapping[str, Any],
    encode_channel: Callable[[str, Any], tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The turn that stores one checkpoint, validated as JSON before anything is written.

    ``stored`` maps channels to the version whose value the namespace's log already holds
    within reach: a channel still at that version is carried, not encoded again.
    ``encode_channel(channel, value)`` encodes a channel value (default: ``serde``'s).
    """
    plain = typed(serde)
    # Metadata is the one part that is not JSON by construction (it may carry user values
    # from the config); check it here so a bad value fails before the session is touched.
    dumps(key, metadata, root="metadata")
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in checkpoint.items():
        if name in _PLAIN_FIELDS:
            fields[name] = value
        elif name not in ("id", "channel_values"):
            extra[name] = value
    versions = checkpoint["channel_versions"]
    values: dict[str, Pair] = {}
    kept: list[str] = []
    for channel, value in checkpoint["channel_values"].items():
        version = versions.get(channel)
        if version is not None and channel in stored and stored[channel] == version:
            kept.append(channel)
        else:
            encode = plain if encode_channel is None else partial(encode_channel, channel)
            values[channel] = _dump(encode, value, key, f'checkpoint["channel_values"][{channel!r}]')
    fields["channel_values"] = values
    if kept:
        fields["carried"] = kept
    turn: dict[str, Any] = {
        "kind": CHECKPOINT,
        "ns": ns,
        "id": checkpoint["id"],
        "parent": parent_id,
        "checkpoint": fields,
        "metadata": metadata,
    }
    if extra:
        turn["extra"] = _dump(plain, extra, key, "checkpoint (fields beyond LangGraph's standard ones)")
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
                *_dump(encode, value, key, f"writes[{idx}] ({channel})"),
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


def sources(turns: Iterable[dict[str, Any]]) -> dict[Source, Pair]:
    """Every channel value stored in ``turns``, by namespace, channel and version."""
    found: dict[Source, Pair] = {}
    for turn in turns:
        if turn["kind"] == CHECKPOINT:
            versions = turn["checkpoint"]["channel_versions"]
            ns = turn["ns"]
            for channel, pair in turn["checkpoint"]["channel_values"].items():
                version = versions.get(channel)
                if version is not None:
                    found[(ns, channel, version)] = pair
    return found


def resolve(turn: dict[str, Any], found: Mapping[Source, Pair]) -> dict[str, Pair] | None:
    """Every encoded channel value of a checkpoint turn, or ``None`` if a carried one is not in ``found``."""
    values = stored_values(turn)
    names = carried(turn)
    if not names:
        return values
    values = dict(values)
    versions = turn["checkpoint"]["channel_versions"]
    for channel in names:
        pair = found.get((turn["ns"], channel, versions.get(channel)))
        if pair is None:
            return None
        values[channel] = pair
    return values


def load_checkpoint(
    serde: SerializerProtocol, turn: dict[str, Any], channel_values: dict[str, Any]
) -> Checkpoint:
    """Rebuild the :class:`Checkpoint` stored by :func:`checkpoint_turn`, with its decoded values."""
    stored = turn["checkpoint"]
    checkpoint: dict[str, Any] = {name: stored[name] for name in _PLAIN_FIELDS if name in stored}
    checkpoint["id"] = turn["id"]
    checkpoint["channel_values"] = channel_values
    if "extra" in turn:
        checkpoint.update(load_value(serde, turn["extra"]))
    return cast(Checkpoint, checkpoint)


def pending_writes(
    serde: SerializerProtocol, turns: Iterable[dict[str, Any]], channels: Container[str] | None = None
) -> list[PendingWrite]:
    """The pending writes in ``turns`` (oldest first), deduplicated and in ``writes_sort_key`` order.

    Like LangGraph's own savers, a repeated regular write (same task, same index) keeps the
    first value, and a repeated special write (error, interrupt, ...) the last one. With
    ``channels``, only the writes to those channels are decoded and returned.
    """
    chosen: dict[tuple[str, int], tuple[str, str, int, str, list[str]]] = {}
    for turn in turns:
        task, path = turn["task"], turn["path"]
        for idx, channel, kind, data in turn["writes"]:
            if idx >= 0 and (task, idx) in chosen:
                continue
            chosen[(task, idx)] = (path, task, idx, channel, [kind, data])
    ordered = sorted(chosen.values(), key=lambda w: writes_sort_key(w[0], w[1], w[2]))
    return [
        (task, channel, load_value(serde, value))
        for _, task, _, channel, value in ordered
        if channels is None or channel in channels
    ]
